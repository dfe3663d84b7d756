"""Nostr Wallet Connect end to end: a real relay process (nostr-relay from PyPI, SQLite in a
temp dir, on loopback), two wallet services speaking NIP-47 over it (tests/nwc_wallet.py:
real signatures, NIP-44, money on the shared dev ledger), the server proxy invoicing through
wallet A (l402_backend) and the client proxy paying through wallet B (l402_wallet).

Also: relay down at start (both proxies refuse to start, one line), the relay dropping while a
payment's answer is on its way (the client says payment_pending; after a restart the payment
is recovered by lookup and never paid twice), the wallet's error codes (one-line refusal
codes on the client), and `l402proxy backend check` saying in one line what it reached.
"""

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.launch import started
from l402proxy.lightning.nwc import REFUSAL_FOR_CODE
from l402proxy.payer import REFUSAL_CODES
from tests.conftest import require
from tests.nwc_wallet import NWCWalletService

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
EPISODE_PRICE_MSAT = 21_000
REFUSED = "X-L402-Refused"


def relay_command() -> list[str] | None:
    beside = Path(sys.executable).with_name("nostr-relay")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("nostr-relay")
    return [found] if found else None


def relay_process(work: Path, port: int | None = None) -> procs.Process:
    """nostr-relay on 127.0.0.1 with its SQLite store under `work` (kept across restarts)."""
    command = relay_command()
    require(
        command is not None,
        "nostr-relay (the relay the NWC tests run; pip install nostr-relay, a dev dependency)",
    )
    assert command is not None
    port = port or procs.free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "nostr-relay.yaml"
    config.write_text(
        "DEBUG: false\n"
        "relay_name: l402proxy test relay\n"
        "storage:\n"
        f"  sqlalchemy.url: sqlite+aiosqlite:///{work / 'relay.sqlite3'}\n"
        "  validators:\n"
        "    - nostr_relay.validators.is_not_too_large\n"
        "    - nostr_relay.validators.is_signed\n"
        "    - nostr_relay.validators.is_recent\n"
        "gunicorn:\n"
        f"  bind: 127.0.0.1:{port}\n"
        "  workers: 1\n"
        "  loglevel: warning\n"
        "  reload: false\n"
        "verification:\n"
        "  nip05_verification: disabled\n"
        # NIP-47 asks relays to take at least 64 KB.
        "max_event_size: 65536\n"
    )
    return procs.Process(
        name="nostr relay",
        # uvicorn, one process: killing it kills the relay (under gunicorn, the worker that
        # holds the websockets outlives a killed master).
        command=[*command, "-c", str(config), "serve", "--use-uvicorn"],
        port=port,
        log_path=work / f"relay-{port}.log",
    )


def tail(process: procs.Process, chars: int = 3000) -> str:
    return f"\n--- {process.name} log {process.log_path}:\n{process.log()[-chars:]}"


@dataclass
class World:
    work: Path
    home: Path
    confdir: Path
    origin: procs.Process
    relay: procs.Process
    shop: NWCWalletService  # wallet A: the server's invoices
    listener: NWCWalletService  # wallet B: the client's payments

    @property
    def relay_url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.port}"

    def server(self, uri: str | None = None, name: str = "server") -> procs.Process:
        return procs.server_proxy(
            self.work,
            self.home,
            self.confdir,
            self.origin.url,
            PODCAST_RULES,
            f"l402_backend={uri or self.shop.uri()}",
            f"l402_store={self.work / f'{name}.sqlite'}",
        )

    def client(self, uri: str | None = None, store: str = "client") -> procs.Process:
        return procs.client_proxy(
            self.work,
            self.home,
            self.confdir,
            f"l402_wallet={uri or self.listener.uri()}",
            f"l402_store={self.work / f'{store}.sqlite'}",
        )

    def invoices(self) -> dict[str, dict[str, Any]]:
        return {i["payment_hash"]: i for i in procs.ledger_invoices(self.home)}

    def secrets(self) -> tuple[str, str]:
        return self.shop.client_secret.hex(), self.listener.client_secret.hex()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    home, confdir = tmp_path / "home", tmp_path / "conf"
    home.mkdir()
    confdir.mkdir()
    relay = relay_process(tmp_path / "relay")
    ledger = home / "devledger.sqlite"
    with started(procs.origin(tmp_path, home), relay) as (origin, _):
        url = f"ws://127.0.0.1:{relay.port}"
        shop = NWCWalletService([url], ledger, "merchant")
        listener = NWCWalletService([url], ledger, "listener")
        with shop.running_in_thread(), listener.running_in_thread():
            assert shop.connected.is_set() and listener.connected.is_set(), tail(relay)
            yield World(tmp_path, home, confdir, origin, relay, shop, listener)


def test_an_episode_paid_through_two_nwc_wallets(world: World) -> None:
    server, client = world.server(), world.client()
    with started(server, client):
        before = (procs.ledger_balance(world.home, "merchant"),
                  procs.ledger_balance(world.home, "listener"))  # fmt: skip
        response = procs.fetch(client, server.url + "/episodes/ep1.mp3")
        logs = tail(server) + tail(client) + tail(world.relay)
        assert response.status_code == 200, response.text + logs
        assert response.content == b"AD-FREE episode ep1\n"
        assert response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
        after = (procs.ledger_balance(world.home, "merchant"),
                 procs.ledger_balance(world.home, "listener"))  # fmt: skip
        assert (after[0] - before[0], after[1] - before[1]) == (21_000, -21_000)
        [settled] = [i for i in world.invoices().values() if i["settled"]]
        assert (settled["wallet"], settled["paid_by"]) == ("merchant", "listener")

        # The token is reused: nothing more is paid.
        again = procs.fetch(client, server.url + "/episodes/ep2.mp3")
        assert again.status_code == 200 and again.content == b"AD-FREE episode ep2\n"
        assert "X-L402-Paid" not in again.headers
        assert procs.ledger_balance(world.home, "listener") == after[1]

    # Each side went through its own wallet service, in NIP-44, and said where it went.
    assert {s.method for s in world.shop.requests} >= {"get_info", "make_invoice"}
    assert {s.method for s in world.listener.requests} >= {"get_info", "pay_invoice"}
    assert {s.encryption for s in world.shop.requests + world.listener.requests} == {"nip44_v2"}
    assert f"NWC wallet via {world.relay_url}" in server.log()
    assert f"NWC wallet via {world.relay_url}" in client.log()
    for secret in world.secrets():
        assert secret not in server.log() + client.log(), "a connection secret reached a log"


def test_relay_down_at_start_stops_both_proxies_with_one_line(world: World) -> None:
    down = f"ws://127.0.0.1:{procs.free_port()}"
    shop_uri, listener_uri = world.shop.uri(relays=[down]), world.listener.uri(relays=[down])
    server = world.server(shop_uri, "server-down")
    client = world.client(listener_uri, "client-down")
    for process in (server, client):
        process.start(wait=False)
        try:
            assert process.wait_exit() != 0, tail(process)
        finally:
            process.kill()
    assert f"cannot use the invoice backend NWC wallet via {down} (app key " in server.log(), tail(
        server
    )
    assert f"no relay reachable: {down}: connection refused" in server.log(), tail(server)
    assert (
        f"l402: cannot start paying: NWC wallet via {down}: no relay reachable: {down}: "
        "connection refused" in client.log()
    ), tail(client)
    for process in (server, client):
        assert "Traceback" not in process.log()
    for secret in world.secrets():
        assert secret not in server.log() + client.log()


def history(world: World, store: str) -> list[dict[str, Any]]:
    result = procs.cli(
        world.home, "wallet", "history", "--store", str(world.work / f"{store}.sqlite")
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_relay_dropping_mid_payment_is_recovered_by_lookup_after_a_restart(
    world: World,
) -> None:
    """Wallet B pays at once but answers 4 s later; the relay dies in between, so the answer is
    lost. The client says payment_pending; restarted (relay back), it looks the payment up,
    keeps the token and never pays again."""
    world.listener.switches.delay_answers["pay_invoice"] = 4.0
    server = world.server()
    client = world.client(world.listener.uri(timeout=6), "drop")
    with started(server):
        client.start()
        try:
            outcome: dict[str, object] = {}

            def player() -> None:
                try:
                    outcome["response"] = procs.fetch(client, server.url + "/episodes/ep1.mp3")
                except httpx.HTTPError as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=player, daemon=True)
            thread.start()
            paid = procs.wait_until(
                lambda: any(i["settled"] for i in world.invoices().values()), 10, 0.05
            )
            assert paid, tail(client) + tail(server)
            world.relay.kill()  # before wallet B's answer goes out
            thread.join(30)
            response = outcome.get("response")
            assert isinstance(response, httpx.Response), outcome
            refused = response.headers.get(REFUSED, "")
            assert refused.startswith("payment_pending; NWC wallet via "), refused + tail(client)
            assert "no answer to pay_invoice within 6 s" in refused
            assert [e["event"] for e in history(world, "drop")][:1] == ["pending"]
        finally:
            client.kill()  # a crash, not a clean stop

        world.listener.switches.delay_answers.clear()
        world.relay.start()
        restarted = world.client(world.listener.uri(timeout=6), "drop").start()
        try:
            assert procs.wait_until(
                lambda: [e["event"] for e in history(world, "drop")].count("paid") == 1, 20, 0.2
            ), history(world, "drop")
            assert "recovered 1 interrupted payment(s)" in restarted.log(), tail(restarted)
            response = procs.fetch(restarted, server.url + "/episodes/ep1.mp3")
            assert response.status_code == 200, response.text + tail(restarted)
            assert response.content == b"AD-FREE episode ep1\n"
            assert "X-L402-Paid" not in response.headers
        finally:
            restarted.stop()
    settled = [i for i in world.invoices().values() if i["settled"]]
    assert len(settled) == 1  # paid exactly once
    assert procs.ledger_balance(world.home, "listener") == 10_000_000_000 - EPISODE_PRICE_MSAT


@pytest.mark.parametrize("code", ["INSUFFICIENT_BALANCE", "QUOTA_EXCEEDED", "RATE_LIMITED"])
def test_wallet_error_codes_are_one_line_refusals(world: World, code: str) -> None:
    world.listener.switches.fail_with["pay_invoice"] = code
    # The client names the wallet's reason on its own (X-L402-Refused: insufficient_balance...).
    expected = REFUSAL_FOR_CODE[code]
    assert expected in REFUSAL_CODES and expected != "payment_failed"
    server, client = world.server(), world.client()
    with started(server, client):
        response = procs.fetch(client, server.url + "/episodes/ep1.mp3")
    refused = response.headers.get(REFUSED, "")
    assert response.status_code == 402, response.text + tail(client)
    assert refused.startswith(f"{expected}; NWC wallet via {world.relay_url}: paying invoice ")
    assert f": {code}: " in refused and refused.endswith("; nothing was paid"), refused
    assert "\n" not in refused
    assert not [i for i in world.invoices().values() if i["settled"]]
    assert [e["event"] for e in history(world, "client")] == ["failed"]


def test_backend_check_says_in_one_line_what_it_reached(world: World) -> None:
    checked = procs.cli(world.home, "backend", "check", world.shop.uri())
    assert checked.returncode == 0, checked.stderr
    line = checked.stdout
    assert line.count("\n") == 1
    assert line.startswith(f"reached nwc at {world.relay_url}, alias 'dev wallet merchant', node ")
    assert ", network regtest, relays 1/1 up, nip44_v2, offers get_balance get_budget " in line

    paying = procs.cli(world.home, "backend", "check", "--wallet", world.listener.uri())
    assert paying.returncode == 0, paying.stderr
    assert ", balance 10,000,000 sat, " in paying.stdout

    as_json = procs.cli(world.home, "backend", "check", "--json", world.shop.uri())
    info = json.loads(as_json.stdout)
    assert (info["backend"], info["network"], info["encryption"]) == ("nwc", "regtest", "nip44_v2")
    assert "make_invoice" in info["methods"] and info["summary"] == line.strip()[len("reached ") :]

    down = f"ws://127.0.0.1:{procs.free_port()}"
    uri = world.listener.uri(relays=[down])
    failed = procs.cli(world.home, "backend", "check", "--wallet", uri)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr == (
        f"l402proxy: NWC wallet via {down}: no relay reachable: {down}: connection refused\n"
    )
    for result in (checked, paying, as_json, failed):
        for secret in world.secrets():
            assert secret not in result.stdout + result.stderr
