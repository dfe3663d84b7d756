"""The client addon end to end: a podcast player behind the real paying proxy
(mitmdump -s addons/client.py, regular mode), in front of the real server proxy and origin.

Both proxies and the CLI share one dev ledger file (home/devledger.sqlite), so the client's wallet
"listener" pays the server's "merchant" and every payment is visible as a settled invoice there.
Ledger counts are taken as differences around each test, so tests can share the server.
"""

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
EPISODE_PRICE_MSAT = 21_000
BONUS_PRICE_MSAT = 100_000
# What the server's revocation poll logs once it has picked up a revocation.
REVOKED_LOG = "token(s) revoked"


def ad_free(name: str) -> bytes:
    return f"AD-FREE episode {name}\n".encode()


def ad_supported(name: str) -> bytes:
    return f"AD-SUPPORTED episode {name}\n".encode()


@dataclass
class Server:
    work: Path
    home: Path
    confdir: Path
    origin: procs.Process
    proxy: procs.Process

    def url(self, path: str) -> str:
        return self.proxy.url + path


@dataclass(frozen=True)
class Ledger:
    """What the shared dev ledger looked like at one moment."""

    invoices: frozenset[str]
    settled: frozenset[str]
    listener_msat: int

    @classmethod
    def now(cls, home: Path) -> "Ledger":
        invoices = procs.ledger_invoices(home)
        return cls(
            invoices=frozenset(i["payment_hash"] for i in invoices),
            settled=frozenset(i["payment_hash"] for i in invoices if i["settled"]),
            listener_msat=procs.ledger_balance(home, "listener"),
        )


def settled_since(home: Path, before: Ledger) -> list[dict[str, Any]]:
    """Invoices settled after `before` was taken."""
    return [
        i
        for i in procs.ledger_invoices(home)
        if i["settled"] and i["payment_hash"] not in before.settled
    ]


def history(home: Path, store: Path) -> list[dict[str, Any]]:
    result = procs.cli(home, "wallet", "history", "--store", str(store))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wallet_tokens(home: Path, store: Path) -> list[dict[str, Any]]:
    result = procs.cli(home, "wallet", "tokens", "--store", str(store))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def events(entries: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == event]


def tail(process: procs.Process, chars: int = 3000) -> str:
    return f"\n--- {process.name} log {process.log_path}:\n{process.log()[-chars:]}"


@dataclass
class Clients:
    """Client proxies for one test, each with its own store, all on the server's dev ledger."""

    server: Server
    work: Path
    started: list[procs.Process] = field(default_factory=list)

    def start(self, *settings: str, store: Path | None = None) -> procs.Process:
        store = store or self.work / "client.sqlite"
        process = procs.client_proxy(
            self.work, self.server.home, self.server.confdir, f"l402_store={store}", *settings
        )
        self.started.append(process)
        return process.start()

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, confdir: Path) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("client-e2e-server")
    home = work / "home"
    home.mkdir()
    origin = procs.origin(work, home).start()
    try:
        proxy = procs.server_proxy(work, home, confdir, origin.url, PODCAST_RULES).start()
    except Exception:
        origin.stop()
        raise
    yield Server(work, home, confdir, origin, proxy)
    proxy.stop()
    origin.stop()


@pytest.fixture
def clients(server: Server, tmp_path: Path) -> Iterator[Clients]:
    started = Clients(server, tmp_path)
    yield started
    started.stop()


@dataclass
class FirstPayment:
    client: procs.Process
    store: Path
    response: httpx.Response
    before: Ledger
    after: Ledger
    settled: list[dict[str, Any]]


@pytest.fixture(scope="module")
def first(server: Server) -> Iterator[FirstPayment]:
    """One player fetching ep1 through a fresh client proxy: the payment the tests below inspect."""
    store = server.work / "first-client.sqlite"
    client = procs.client_proxy(
        server.work, server.home, server.confdir, f"l402_store={store}"
    ).start()
    try:
        before = Ledger.now(server.home)
        response = procs.fetch(client, server.url("/episodes/ep1.mp3"))
        settled = settled_since(server.home, before)
        yield FirstPayment(client, store, response, before, Ledger.now(server.home), settled)
    finally:
        client.stop()


def test_player_behind_the_client_proxy_gets_the_ad_free_episode(
    server: Server, first: FirstPayment
) -> None:
    response = first.response
    assert response.status_code == 200, response.text + tail(first.client)
    assert response.content == ad_free("ep1")
    assert response.headers["X-Origin-Path"] == "/adfree/ep1.mp3"
    # The credential is the proxies' business: the origin never sees it.
    assert response.headers["X-Origin-Authorization"] == "absent"
    assert response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
    assert "X-L402-Refused" not in response.headers

    assert len(first.settled) == 1, first.settled
    invoice = first.settled[0]
    assert invoice["amount_msat"] == EPISODE_PRICE_MSAT
    assert invoice["wallet"] == "merchant" and invoice["paid_by"] == "listener"
    assert first.before.listener_msat - first.after.listener_msat == EPISODE_PRICE_MSAT

    # The same player without the client proxy keeps working: the ad-supported episode.
    direct = httpx.get(server.url("/episodes/ep1.mp3"), trust_env=False, timeout=30)
    assert direct.status_code == 200
    assert direct.content == ad_supported("ep1")


def test_another_episode_of_the_paid_scope_is_not_paid_again(
    server: Server, first: FirstPayment
) -> None:
    assert first.response.status_code == 200
    before = Ledger.now(server.home)
    response = procs.fetch(first.client, server.url("/episodes/ep2.mp3"))
    assert response.status_code == 200, response.text + tail(first.client)
    assert response.content == ad_free("ep2")
    assert "X-L402-Paid" not in response.headers
    after = Ledger.now(server.home)
    # The token went along up front: the server did not even write a new invoice.
    assert after.invoices == before.invoices
    assert after.listener_msat == before.listener_msat


def test_wallet_history_and_tokens_describe_the_payment(
    server: Server, first: FirstPayment
) -> None:
    assert len(first.settled) == 1
    payment_hash = first.settled[0]["payment_hash"]
    entries = history(server.home, first.store)
    paid = events(entries, "paid")
    assert len(paid) == 1, entries
    entry = paid[0]
    assert entry["origin"] == server.proxy.url
    assert entry["url"] == server.url("/episodes/ep1.mp3")
    assert entry["service"] == "podcast"
    assert entry["amount_sat"] == 21
    assert entry["fee_sat"] == 0
    assert entry["payment_hash"] == payment_hash
    assert entry["reason"] is None
    assert isinstance(entry["when"], int | float)
    assert not events(entries, "refused") and not events(entries, "failed")

    tokens = wallet_tokens(server.home, first.store)
    mine = [t for t in tokens if t["payment_hash"] == payment_hash]
    assert len(mine) == 1, tokens
    token = mine[0]
    assert token["origin"] == server.proxy.url
    assert token["services"] == ["podcast"]
    assert token["status"] == "valid"
    assert token["scheme"] in ("L402", "LSAT")
    assert "preimage" not in json.dumps(tokens)


def test_sixteen_concurrent_requests_to_one_paywall_pay_once(
    server: Server, clients: Clients
) -> None:
    client = clients.start()
    before = Ledger.now(server.home)
    names = [f"rush{i}" for i in range(16)]

    async def fetch_all() -> list[httpx.Response]:
        async with procs.proxied_async_client(client) as http:
            return await asyncio.gather(*(http.get(server.url(f"/bonus/{n}.mp3")) for n in names))

    responses = asyncio.run(fetch_all())
    for name, response in zip(names, responses, strict=True):
        assert response.status_code == 200, f"{name}: {response.text}" + tail(client)
        assert response.content == f"BONUS episode {name}\n".encode()
    # Only the request that paid says so; the others used its token.
    assert sum("X-L402-Paid" in r.headers for r in responses) == 1
    settled = settled_since(server.home, before)
    assert len(settled) == 1, settled
    assert settled[0]["amount_msat"] == BONUS_PRICE_MSAT
    assert before.listener_msat - Ledger.now(server.home).listener_msat == BONUS_PRICE_MSAT


def fetch_refused(
    client: procs.Process, server: Server, store: Path, path: str, code: str
) -> httpx.Response:
    """The player gets the server's own 402, marked as refused; the refusal is logged and listed."""
    logged = client.log().count(code)
    response = procs.fetch(client, server.url(path))
    assert response.status_code == 402, response.text + tail(client)
    refused = response.headers.get("X-L402-Refused", "")
    assert refused.startswith(f"{code}; ") and len(refused) > len(code) + 2, refused
    # The original challenge is still there, so a player that can pay by itself still could.
    challenges = response.headers.get_list("WWW-Authenticate")
    assert any(line.startswith(("L402 ", "LSAT ")) for line in challenges), challenges
    assert "X-L402-Paid" not in response.headers
    assert procs.wait_until(lambda: client.log().count(code) > logged, 5), tail(client)
    entries = history(server.home, store)
    listed = [e for e in events(entries, "refused") if e["reason"] == code]
    assert len(listed) == 1, entries
    assert listed[0]["origin"] == server.proxy.url
    assert listed[0]["url"] == server.url(path)
    assert listed[0]["message"]
    return response


def test_no_payment_over_the_max_price(server: Server, clients: Clients) -> None:
    client = clients.start("l402_max_price_sat=20")
    before = Ledger.now(server.home)
    fetch_refused(client, server, clients.work / "client.sqlite", "/episodes/ep1.mp3", "max_price")
    assert settled_since(server.home, before) == []
    assert Ledger.now(server.home).listener_msat == before.listener_msat


def test_fallback_free_gives_the_ad_supported_episode_when_not_paying(
    server: Server, clients: Clients
) -> None:
    client = clients.start("l402_max_price_sat=20", "l402_fallback_free=true")
    before = Ledger.now(server.home)
    # Upgrade mode: asked again as a player that cannot pay, the server gives the free variant.
    response = procs.fetch(client, server.url("/episodes/ep2.mp3"))
    assert response.status_code == 200, response.text + tail(client)
    assert response.content == ad_supported("ep2")
    assert response.headers["X-L402-Refused"].startswith("max_price; ")
    # Paywall mode has no free variant: the player still gets the 402, marked.
    bonus = procs.fetch(client, server.url("/bonus/b1.mp3"))
    assert bonus.status_code == 402
    assert bonus.headers["X-L402-Refused"].startswith("max_price; ")
    assert settled_since(server.home, before) == []


def test_no_payment_over_the_daily_budget(server: Server, clients: Clients) -> None:
    # 21 sat fits in 50 even with the 10 sat fee reserve; another 100 sat does not.
    client = clients.start("l402_budget_daily_sat=50")
    store = clients.work / "client.sqlite"
    before = Ledger.now(server.home)
    episode = procs.fetch(client, server.url("/episodes/ep1.mp3"))
    assert episode.status_code == 200, episode.text + tail(client)
    assert episode.content == ad_free("ep1")
    fetch_refused(client, server, store, "/bonus/extra.mp3", "budget_daily")
    settled = settled_since(server.home, before)
    assert [i["amount_msat"] for i in settled] == [EPISODE_PRICE_MSAT]
    assert len(events(history(server.home, store), "paid")) == 1


@pytest.mark.parametrize(
    "allow", ["example.com", "127.0.0.1:{other_port}"], ids=["other-host", "other-port"]
)
def test_hosts_outside_allow_are_never_paid_nor_told_we_can_pay(
    server: Server, clients: Clients, allow: str
) -> None:
    other_port = server.proxy.port + 1 if server.proxy.port < 65535 else server.proxy.port - 1
    client = clients.start(f"l402_allow={allow.format(other_port=other_port)}")
    store = clients.work / "client.sqlite"
    before = Ledger.now(server.home)
    # Upgrade mode: without Accept-Authenticate the server serves the free variant, no 402.
    upgrade = procs.fetch(client, server.url("/episodes/ep1.mp3"))
    assert upgrade.status_code == 200, upgrade.text + tail(client)
    assert upgrade.content == ad_supported("ep1")
    assert "X-L402-Paid" not in upgrade.headers and "X-L402-Refused" not in upgrade.headers
    # Paywall mode: a 402 whatever we say, passed to the player unpaid.
    fetch_refused(client, server, store, "/bonus/extra.mp3", "not_allowed")
    assert settled_since(server.home, before) == []
    assert Ledger.now(server.home).listener_msat == before.listener_msat


def test_an_allowed_host_with_its_port_is_paid(server: Server, clients: Clients) -> None:
    client = clients.start(f"l402_allow=127.0.0.1:{server.proxy.port}")
    before = Ledger.now(server.home)
    response = procs.fetch(client, server.url("/episodes/ep1.mp3"))
    assert response.status_code == 200, response.text + tail(client)
    assert response.content == ad_free("ep1")
    assert len(settled_since(server.home, before)) == 1


def test_tokens_survive_a_restart_of_the_client_proxy(server: Server, clients: Clients) -> None:
    store = clients.work / "restart.sqlite"
    client = clients.start(store=store)
    before = Ledger.now(server.home)
    paid = procs.fetch(client, server.url("/episodes/ep1.mp3"))
    assert paid.status_code == 200 and "X-L402-Paid" in paid.headers, paid.text + tail(client)
    client.stop()

    again = clients.start(store=store)
    response = procs.fetch(again, server.url("/episodes/ep3.mp3"))
    assert response.status_code == 200, response.text + tail(again)
    assert response.content == ad_free("ep3")
    assert "X-L402-Paid" not in response.headers
    assert len(settled_since(server.home, before)) == 1
    assert before.listener_msat - Ledger.now(server.home).listener_msat == EPISODE_PRICE_MSAT


def test_a_crash_after_the_wallet_paid_is_recovered_without_paying_twice(
    server: Server, clients: Clients
) -> None:
    store = clients.work / "crash.sqlite"
    # The wallet settles in the ledger at once, then takes 5 s to answer: we kill in between.
    slow = clients.start("l402_wallet=dev:listener?delay=5", store=store)
    before = Ledger.now(server.home)
    outcome: dict[str, object] = {}

    def player() -> None:
        try:
            outcome["response"] = procs.fetch(slow, server.url("/episodes/ep1.mp3"))
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=player, daemon=True)
    thread.start()
    assert procs.wait_until(lambda: settled_since(server.home, before) != [], 10, 0.05), tail(slow)
    assert thread.is_alive(), f"the player got an answer before the wallet did: {outcome}"
    # Written down before paying: the store knows a payment is in flight.
    assert events(history(server.home, store), "pending"), history(server.home, store)
    slow.kill()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert "response" not in outcome, outcome

    [settled] = settled_since(server.home, before)
    restarted = clients.start(store=store)
    assert procs.wait_until(lambda: not events(history(server.home, store), "pending"), 10, 0.2), (
        history(server.home, store)
    )
    entries = history(server.home, store)
    paid = events(entries, "paid")
    assert len(paid) == 1, entries
    assert paid[0]["payment_hash"] == settled["payment_hash"]
    assert paid[0]["amount_sat"] == 21
    assert not events(entries, "failed"), entries
    assert [t["status"] for t in wallet_tokens(server.home, store)] == ["valid"]

    response = procs.fetch(restarted, server.url("/episodes/ep1.mp3"))
    assert response.status_code == 200, response.text + tail(restarted)
    assert response.content == ad_free("ep1")
    assert "X-L402-Paid" not in response.headers
    assert settled_since(server.home, before) == [settled]
    assert before.listener_msat - Ledger.now(server.home).listener_msat == EPISODE_PRICE_MSAT


def test_a_crash_before_the_wallet_sent_the_payment_pays_exactly_once_after_restart(
    server: Server, clients: Clients
) -> None:
    store = clients.work / "hold.sqlite"
    # The wallet waits 5 s before sending anything: we kill while the payment is only pending.
    holding = clients.start("l402_wallet=dev:listener?hold=5", store=store)
    before = Ledger.now(server.home)
    outcome: dict[str, object] = {}

    def player() -> None:
        try:
            outcome["response"] = procs.fetch(holding, server.url("/episodes/ep2.mp3"))
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=player, daemon=True)
    thread.start()
    assert procs.wait_until(lambda: events(history(server.home, store), "pending"), 10, 0.05), tail(
        holding
    )
    assert settled_since(server.home, before) == []  # written down, not sent
    holding.kill()
    thread.join(timeout=15)
    assert not thread.is_alive() and "response" not in outcome, outcome

    restarted = clients.start(store=store)
    assert procs.wait_until(lambda: not events(history(server.home, store), "pending"), 10, 0.2), (
        history(server.home, store)
    )
    [failed] = events(history(server.home, store), "failed")  # never sent: released
    response = procs.fetch(restarted, server.url("/episodes/ep2.mp3"))
    assert response.status_code == 200, response.text + tail(restarted)
    assert response.content == ad_free("ep2")
    assert "X-L402-Paid" in response.headers
    settled = settled_since(server.home, before)
    assert len(settled) == 1 and settled[0]["payment_hash"] != failed["payment_hash"]
    [paid] = events(history(server.home, store), "paid")
    assert paid["payment_hash"] == settled[0]["payment_hash"]
    assert before.listener_msat - Ledger.now(server.home).listener_msat == EPISODE_PRICE_MSAT


def test_a_token_the_server_revoked_is_dropped_and_paid_afresh_once(
    server: Server, clients: Clients
) -> None:
    store = clients.work / "revoke.sqlite"
    client = clients.start(store=store)
    before = Ledger.now(server.home)
    paid = procs.fetch(client, server.url("/episodes/ep1.mp3"))
    assert paid.status_code == 200 and "X-L402-Paid" in paid.headers, paid.text + tail(client)
    [first] = settled_since(server.home, before)
    payment_hash = first["payment_hash"]

    def issued() -> bool:
        listed = procs.cli(server.home, "tokens", "list")
        assert listed.returncode == 0, listed.stderr
        return any(t["payment_hash"] == payment_hash for t in json.loads(listed.stdout))

    # The server writes issued tokens behind the 402; revoke once it has them on record.
    assert procs.wait_until(issued, 10, 0.2)
    polled = server.proxy.log().count(REVOKED_LOG)
    revoked = procs.cli(server.home, "tokens", "revoke", payment_hash)
    assert revoked.returncode == 0, revoked.stderr
    assert procs.wait_until(lambda: server.proxy.log().count(REVOKED_LOG) > polled, 5), tail(
        server.proxy
    )

    response = procs.fetch(client, server.url("/episodes/ep2.mp3"))
    assert response.status_code == 200, response.text + tail(client)
    assert response.content == ad_free("ep2")
    assert response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
    assert len(settled_since(server.home, before)) == 2

    # The fresh token is used from now on; nothing more is paid.
    again = procs.fetch(client, server.url("/episodes/ep3.mp3"))
    assert again.content == ad_free("ep3") and "X-L402-Paid" not in again.headers
    assert len(settled_since(server.home, before)) == 2
    statuses = {t["payment_hash"]: t["status"] for t in wallet_tokens(server.home, store)}
    assert statuses[payment_hash] == "dropped", statuses
    assert sorted(statuses.values()) == ["dropped", "valid"], statuses
    assert len(events(history(server.home, store), "paid")) == 2


def test_an_unusable_store_stops_the_client_proxy_from_starting(
    server: Server, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    client = procs.client_proxy(
        tmp_path, server.home, server.confdir, f"l402_store={blocker / 'client.sqlite'}"
    )
    client.start(wait=False)
    try:
        # A proxy that listened but could never pay would leave the player waiting instead.
        assert client.wait_exit() != 0, tail(client)
    finally:
        client.kill()
    assert "cannot open the client store" in client.log() and "Traceback" not in client.log()
