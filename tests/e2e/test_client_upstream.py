"""A client proxy that must reach the web through another proxy (`--mode upstream:URL`): the
retry with the token goes through that proxy too, like the first request did."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from l402proxy.launch import Process, client_proxy_command, env_with_home, free_port, started
from tests.e2e import procs

RULES = procs.REPO / "rules" / "podcast.yaml"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Process, Process, Process, Path]]:
    home = tmp_path / "home"
    confdir = tmp_path / "conf"
    origin = procs.origin(tmp_path, home)
    server = procs.server_proxy(tmp_path, home, confdir, f"http://127.0.0.1:{origin.port}", RULES)
    corporate_port = free_port()
    corporate = Process(
        name="upstream proxy",
        command=client_proxy_command(corporate_port, addon=False, settings=[f"confdir={confdir}"]),
        port=corporate_port,
        log_path=tmp_path / "upstream-proxy.log",
        env=env_with_home(home),
    )
    client = procs.client_proxy(
        tmp_path, home, confdir, f"mode=upstream:http://127.0.0.1:{corporate_port}"
    )
    with started(origin, server, corporate, client):
        yield server, corporate, client, home


def test_the_paid_retry_goes_through_the_upstream_proxy(
    chain: tuple[Process, Process, Process, Path],
) -> None:
    server, corporate, client, home = chain
    url = f"http://127.0.0.1:{server.port}/episodes/ep1.mp3"
    response = procs.fetch(client, url)
    assert response.status_code == 200, response.text + client.log()[-2000:]
    assert response.text == "AD-FREE episode ep1\n"
    assert "X-L402-Paid" in response.headers
    settled = [i for i in procs.ledger_invoices(home) if i["settled"]]
    assert len(settled) == 1
    # The upstream proxy saw both: the request that drew the 402 and the paid retry.
    assert procs.wait_until(lambda: corporate.log().count("GET " + url) == 2, 5), corporate.log()
