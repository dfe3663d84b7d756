"""LND, Core Lightning and Eclair end to end: the real proxies, with node stand-ins.

A podcast player behind the client proxy (mitmdump -s addons/client.py) fetches an episode
from the server proxy (mitmdump -s addons/server.py, reverse mode, in front of the origin).
The server takes its invoices from one node, the client pays from another; the stand-ins run
as processes (tests/standins/lnd.py: gRPC over TLS with macaroons; tests/standins/cln.py on a
unix socket; tests/standins/eclair.py over HTTP with basic auth) on one dev ledger, so the
payment is real: one invoice settled, 21 sat moved from "listener" to "merchant". LND pays LND
(lnd:// with files for the server, lndconnect:// for the client), CLN invoices are paid by
Eclair, then the other way round.
"""

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from l402proxy.l402.headers import parse_challenges
from l402proxy.launch import started
from tests.standins.lnd import b64url

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
EPISODE_PRICE_MSAT = 21_000
PASSWORD = "e2e-eclair-API-password"
START_SECONDS = 30.0
STOP_SECONDS = 10.0


@dataclass
class Node:
    """One stand-in node: how the proxies reach it, and its dev ledger wallet."""

    uri: str
    wallet: str
    log_path: Path
    shown_as: str  # how the proxies name it in their logs (describe())
    secrets: tuple[str, ...] = ()  # what must never reach a proxy's log


@contextlib.contextmanager
def cln_node(work: Path, home: Path, wallet: str) -> Iterator[Node]:
    """The lightningd stand-in as a process; ready once its socket accepts connections."""
    directory = work / f"cln-{wallet}"
    directory.mkdir()
    path = directory / "lightning-rpc"
    log_path = work / f"cln-{wallet}.log"
    command = [
        sys.executable, "-m", "tests.standins.cln",
        "--socket", str(path), "--ledger", str(home / "devledger.sqlite"), "--wallet", wallet,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=procs.env_with_home(home),
            cwd=procs.REPO,
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cln stand-in exited ({proc.returncode}): {log_path.read_text()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                break
            if time.monotonic() > deadline:
                pytest.fail(f"cln stand-in did not listen on {path} in {START_SECONDS:g} s")
            time.sleep(0.05)
        yield Node(f"cln://{path}", wallet, log_path, f"Core Lightning at {path}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_SECONDS)


@contextlib.contextmanager
def eclair_node(work: Path, home: Path, wallet: str) -> Iterator[Node]:
    """The Eclair API stand-in as a process, on a free port."""
    port = procs.free_port()
    command = [
        sys.executable, "-m", "tests.standins.eclair", "--port", str(port),
        "--password", PASSWORD, "--ledger", str(home / "devledger.sqlite"), "--wallet", wallet,
    ]  # fmt: skip
    process = procs.Process(
        name=f"eclair stand-in {wallet}",
        command=command,
        port=port,
        log_path=work / f"eclair-{wallet}.log",
        env=procs.env_with_home(home),
    )
    with started(process):
        yield Node(
            f"eclair://:{PASSWORD}@127.0.0.1:{port}",
            wallet,
            process.log_path,
            f"Eclair at http://127.0.0.1:{port}",
        )


def lnd_process(work: Path, home: Path, wallet: str, port: int) -> procs.Process:
    """The LND stand-in; it keeps its cert and macaroons in work/lnd-<wallet> across restarts."""
    command = [
        sys.executable, "-m", "tests.standins.lnd", "--port", str(port),
        "--ledger", str(home / "devledger.sqlite"), "--wallet", wallet,
        "--dir", str(work / f"lnd-{wallet}"),
    ]  # fmt: skip
    return procs.Process(
        name=f"lnd stand-in {wallet}",
        command=command,
        port=port,
        log_path=work / f"lnd-{wallet}.log",
        env=procs.env_with_home(home),
    )


def lnd_as_node(process: procs.Process, wallet: str, *, lndconnect: bool) -> Node:
    """The server side uses invoice.macaroon from files (lnd://), the client side
    admin.macaroon inline (lndconnect://, as Zeus exports it)."""
    directory = process.log_path.parent / f"lnd-{wallet}"
    cert, port = directory / "tls.cert", process.port
    if lndconnect:
        macaroon = (directory / "admin.macaroon").read_bytes()
        der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
        uri = f"lndconnect://127.0.0.1:{port}?cert={b64url(der)}&macaroon={b64url(macaroon)}"
        source = "inline"
    else:
        macaroon = (directory / "invoice.macaroon").read_bytes()
        uri = f"lnd://127.0.0.1:{port}?cert={cert}&macaroon={directory / 'invoice.macaroon'}"
        source = str(cert)
    return Node(
        uri,
        wallet,
        process.log_path,
        f"LND at 127.0.0.1:{port} (cert {source})",
        secrets=(macaroon.hex(), b64url(macaroon)),
    )


@contextlib.contextmanager
def lnd_node(work: Path, home: Path, wallet: str, *, lndconnect: bool) -> Iterator[Node]:
    process = lnd_process(work, home, wallet, procs.free_port())
    with started(process):
        yield lnd_as_node(process, wallet, lndconnect=lndconnect)


@dataclass(frozen=True)
class Snapshot:
    settled: frozenset[str]
    listener_msat: int
    merchant_msat: int

    @classmethod
    def now(cls, home: Path) -> "Snapshot":
        return cls(
            settled=frozenset(
                i["payment_hash"] for i in procs.ledger_invoices(home) if i["settled"]
            ),
            listener_msat=procs.ledger_balance(home, "listener"),
            merchant_msat=procs.ledger_balance(home, "merchant"),
        )


def settled_since(home: Path, before: Snapshot) -> list[dict[str, Any]]:
    return [
        i
        for i in procs.ledger_invoices(home)
        if i["settled"] and i["payment_hash"] not in before.settled
    ]


def tail(process: procs.Process, chars: int = 3000) -> str:
    return f"\n--- {process.name} log {process.log_path}:\n{process.log()[-chars:]}"


@dataclass
class World:
    work: Path
    home: Path
    confdir: Path
    origin: procs.Process


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("cln-eclair-e2e")
    home = work / "home"
    home.mkdir()
    confdir = work / "mitmproxy-conf"
    confdir.mkdir()
    with started(procs.origin(work, home)) as (origin,):
        yield World(work, home, confdir, origin)


def pay_for_an_episode(world: World, backend: Node, wallet: Node, name: str) -> None:
    """One player fetches one episode through both proxies; everything the payment left
    behind is checked."""
    server = procs.server_proxy(
        world.work,
        world.home,
        world.confdir,
        world.origin.url,
        PODCAST_RULES,
        f"l402_backend={backend.uri}",
        f"l402_store={world.work / f'server-{name}.sqlite'}",
    )
    client = procs.client_proxy(
        world.work,
        world.home,
        world.confdir,
        f"l402_wallet={wallet.uri}",
        f"l402_store={world.work / f'client-{name}.sqlite'}",
    )
    with started(server, client):
        before = Snapshot.now(world.home)
        response = procs.fetch(client, f"{server.url}/episodes/{name}.mp3")
        after = Snapshot.now(world.home)
        logs = tail(server) + tail(client)
        for node in (backend, wallet):
            logs += f"\n--- {node.log_path}:\n{node.log_path.read_text(errors='replace')[-2000:]}"
        assert response.status_code == 200, response.text + logs
        # The proxies really used these nodes, not the dev ledger directly.
        assert backend.shown_as in server.log(), logs
        assert wallet.shown_as in client.log(), logs
        assert response.content == f"AD-FREE episode {name}\n".encode(), logs
        assert response.headers["X-Origin-Path"] == f"/adfree/{name}.mp3"
        assert response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast", logs

        settled = settled_since(world.home, before)
        assert len(settled) == 1, settled
        assert settled[0]["amount_msat"] == EPISODE_PRICE_MSAT
        assert (settled[0]["wallet"], settled[0]["paid_by"]) == ("merchant", "listener")
        assert before.listener_msat - after.listener_msat == EPISODE_PRICE_MSAT
        assert after.merchant_msat - before.merchant_msat == EPISODE_PRICE_MSAT

        # The same episode again: the stored token goes along, nothing is paid twice.
        again = procs.fetch(client, f"{server.url}/episodes/{name}.mp3")
        assert again.status_code == 200 and again.content == response.content
        assert "X-L402-Paid" not in again.headers
        assert Snapshot.now(world.home).listener_msat == after.listener_msat

    # The API password and the macaroons never reach a log line.
    for log_path in (server.log_path, client.log_path):
        text = log_path.read_text(errors="replace")
        for secret in (PASSWORD, *backend.secrets, *wallet.secrets):
            assert secret not in text, f"a secret is in {log_path}"


def test_lnd_invoices_paid_from_lnd(world: World) -> None:
    with (
        lnd_node(world.work, world.home, "merchant", lndconnect=False) as backend,
        lnd_node(world.work, world.home, "listener", lndconnect=True) as wallet,
    ):
        pay_for_an_episode(world, backend, wallet, "ep3")


def test_cln_invoices_paid_from_eclair(world: World) -> None:
    with (
        cln_node(world.work, world.home, "merchant") as backend,
        eclair_node(world.work, world.home, "listener") as wallet,
    ):
        pay_for_an_episode(world, backend, wallet, "ep1")


def test_eclair_invoices_paid_from_cln(world: World) -> None:
    with (
        eclair_node(world.work, world.home, "merchant") as backend,
        cln_node(world.work, world.home, "listener") as wallet,
    ):
        pay_for_an_episode(world, backend, wallet, "ep2")


def test_while_the_node_is_down_priced_requests_get_503_and_the_rest_keeps_working(
    world: World,
) -> None:
    """The invoice backend dies while the proxy runs: no new invoices (503, Retry-After),
    but the free episode and an already paid token keep working; when the node is back,
    so are new invoices."""
    node = lnd_process(world.work, world.home, "merchant-outage", procs.free_port())
    with started(node):
        backend = lnd_as_node(node, "merchant-outage", lndconnect=False)
        server = procs.server_proxy(
            world.work, world.home, world.confdir, world.origin.url, PODCAST_RULES,
            f"l402_backend={backend.uri}",
            f"l402_store={world.work / 'server-outage.sqlite'}",
        )  # fmt: skip
        with started(server), httpx.Client(base_url=server.url, timeout=30) as http:
            challenge = http.get("/episodes/ep1.mp3", headers={"Accept-Authenticate": "L402"})
            assert challenge.status_code == 402, challenge.text + tail(server)
            (first, *_) = parse_challenges(challenge.headers.get_list("WWW-Authenticate"))
            macaroon, invoice = first.macaroon, first.invoice
            preimage = procs.dev_pay(world.home, invoice)
            paid = {"Authorization": f"L402 {macaroon}:{preimage.hex()}"}

            node.stop()
            down = http.get("/episodes/ep2.mp3", headers={"Accept-Authenticate": "L402"})
            assert down.status_code == 503, down.text + tail(server)
            assert down.headers["Retry-After"].isdigit()
            assert down.headers["Content-Type"].startswith("text/plain")
            assert "Payment is unavailable right now" in down.text
            free = http.get("/episodes/ep2.mp3")
            assert free.status_code == 200 and free.content == b"AD-SUPPORTED episode ep2\n"
            token = http.get("/episodes/ep2.mp3", headers=paid)
            assert token.status_code == 200 and token.content == b"AD-FREE episode ep2\n"
            assert "connection refused" in server.log(), tail(server)

            node.start()  # same port, same cert and macaroons: the channel reconnects
            again = procs.wait_until(
                lambda: (
                    http.get(
                        "/episodes/ep3.mp3", headers={"Accept-Authenticate": "L402"}
                    ).status_code
                    == 402
                ),
                timeout=30,
                interval=0.5,
            )
            assert again, tail(server)
