"""A Lightning Address as the server proxy's invoice backend, end to end.

The LNURL-pay service is tests/standins/lnurl.py run as its own process; its invoices belong to
the dev ledger wallet "merchant" under home/, which the client proxy's default dev wallet
("listener") pays. The server proxy never asks whether an invoice was paid: the token carries
the preimage.
"""

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from l402proxy.launch import started

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"


def lnurl_service(workdir: Path, home: Path, *extra: str) -> procs.Process:
    port = procs.free_port()
    ledger = str(home / "devledger.sqlite")
    command = [sys.executable, "-m", "tests.standins.lnurl", "--ledger", ledger]
    command += ["--wallet", "merchant", "--user", "merchant", "--port", str(port), *extra]
    return procs.Process(
        name="lnurl service",
        command=command,
        port=port,
        log_path=workdir / f"lnurl-{port}.log",
        env=procs.env_with_home(home),
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, procs.Process, procs.Process, procs.Process]]:
    home, confdir = tmp_path / "home", tmp_path / "conf"
    home.mkdir()
    confdir.mkdir()
    started: list[procs.Process] = []
    try:
        service = lnurl_service(tmp_path, home).start()
        started.append(service)
        origin = procs.origin(tmp_path, home).start()
        started.append(origin)
        address = f"merchant@127.0.0.1:{service.port}"
        server = procs.server_proxy(
            tmp_path, home, confdir, origin.url, PODCAST_RULES, f"l402_backend=lnurl:{address}"
        ).start()
        started.append(server)
        client = procs.client_proxy(tmp_path, home, confdir).start()
        started.append(client)
        yield home, service, server, client
    finally:
        for process in reversed(started):
            process.stop()


def test_paid_episode_with_a_lightning_address_backend(
    setup: tuple[Path, procs.Process, procs.Process, procs.Process],
) -> None:
    home, service, server, client = setup
    merchant_before = procs.ledger_balance(home, "merchant")
    listener_before = procs.ledger_balance(home, "listener")
    response = procs.fetch(client, server.url + "/episodes/ep1.mp3")
    logs = (
        f"\n--- server:\n{server.log()[-3000:]}\n--- client:\n{client.log()[-3000:]}"
        f"\n--- lnurl service:\n{service.log()[-2000:]}"
    )
    assert response.status_code == 200, response.text + logs
    assert response.content == b"AD-FREE episode ep1\n"
    assert response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
    assert procs.ledger_balance(home, "merchant") - merchant_before == 21_000
    assert listener_before - procs.ledger_balance(home, "listener") == 21_000
    # The invoice came from the service, committed to its metadata (no plain memo).
    (invoice,) = [i for i in procs.ledger_invoices(home) if i["settled"]]
    assert invoice["wallet"] == "merchant" and invoice["paid_by"] == "listener"
    assert f"Lightning Address merchant@127.0.0.1:{service.port}" in server.log()


def test_server_refuses_to_start_when_the_address_does_not_answer(tmp_path: Path) -> None:
    home, confdir = tmp_path / "home", tmp_path / "conf"
    home.mkdir()
    confdir.mkdir()
    origin = procs.origin(tmp_path, home).start()
    try:
        port = procs.free_port()
        server = procs.server_proxy(
            tmp_path,
            home,
            confdir,
            origin.url,
            PODCAST_RULES,
            f"l402_backend=lnurl:nobody@127.0.0.1:{port}",
        )
        server.start(wait=False)
        try:
            status = server.wait_exit(timeout=60)
        finally:
            server.stop()
    finally:
        origin.stop()
    assert status != 0
    assert f"nobody@127.0.0.1:{port}: payRequest: connection refused" in server.log()


def test_server_refuses_to_start_when_a_price_is_outside_what_the_address_accepts(
    tmp_path: Path,
) -> None:
    home, confdir = tmp_path / "home", tmp_path / "conf"
    home.mkdir()
    confdir.mkdir()
    # At most 50 sat: the podcast (21 sat) fits, the bonus episodes (100 sat) do not.
    with started(lnurl_service(tmp_path, home, "--max-sendable", "50000")) as (service,):
        server = procs.server_proxy(
            tmp_path,
            home,
            confdir,
            "http://127.0.0.1:9",
            PODCAST_RULES,
            f"l402_backend=lnurl:merchant@127.0.0.1:{service.port}",
        )
        server.start(wait=False)
        try:
            status = server.wait_exit(timeout=60)
        finally:
            server.stop()
    assert status != 0
    assert (
        "service 'bonus' (line 63) costs 100 sat, but lnurl at "
        f"merchant@127.0.0.1:{service.port} accepts 1 to 50 sat"
    ) in server.log()
    # The podcast's price fits (other lines may name the service: its private feed's).
    assert re.search(r"service 'podcast' \(line \d+\) costs", server.log()) is None
