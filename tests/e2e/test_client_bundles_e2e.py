"""The paying client proxy (mitmdump -s addons/client.py) against issue 14's bundles, single
use and passes: a player fetches through the real client proxy process; the paywall is the
contract's stand-in (tests/bundle_origin.py, served from a thread of this process) until the
server side lands. Both share one dev ledger file, so what was paid is read from the ledger.

Once the real server sells bundles and passes, these tests should run against procs.server_proxy
with a rules file (bundle: {requests: 3}, single_use: true, pass: {...}) in front of the sample
origin instead of the stand-in; the assertions stay as they are (see the module's helpers).
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bundle_origin import ContractServer, Service, bundle_origin_thread

from . import procs

pytestmark = pytest.mark.e2e

PRICE_MSAT = 21_000
BALANCE = "X-L402-Balance"
SERVICES = (
    Service("podcast", bundle=3),
    Service("api", bundle=1),
    Service("junk", bundle=5, balance_header="plenty of requests"),
    # podcast2's 402 sells a pass for podcast2 and articles; articles sells only itself;
    # strict takes no pass, though the pass sold by passer names it.
    Service("podcast2", sells=("podcast2", "articles")),
    Service("articles"),
    Service("passer", sells=("passer", "strict")),
    Service("strict", own_tokens_only=True),
)


@dataclass
class World:
    work: Path
    home: Path
    confdir: Path
    server: ContractServer

    def url(self, path: str) -> str:
        return self.server.url + path


@dataclass
class Clients:
    world: World
    work: Path
    started: list[procs.Process] = field(default_factory=list)

    def start(self, *settings: str, store: Path | None = None) -> procs.Process:
        store = store or self.work / "client.sqlite"
        process = procs.client_proxy(
            self.work, self.world.home, self.world.confdir, f"l402_store={store}", *settings
        )
        self.started.append(process)
        return process.start()

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("client-bundles-e2e")
    home = work / "home"
    home.mkdir()
    with bundle_origin_thread(home / "devledger.sqlite", SERVICES) as server:
        yield World(work, home, work / "mitmproxy-conf", server)


@pytest.fixture
def clients(world: World, tmp_path: Path) -> Iterator[Clients]:
    started = Clients(world, tmp_path)
    yield started
    started.stop()


def settled(home: Path) -> set[str]:
    return {i["payment_hash"] for i in procs.ledger_invoices(home) if i["settled"]}


def wallet_tokens(home: Path, store: Path) -> list[dict[str, Any]]:
    result = procs.cli(home, "wallet", "tokens", "--store", str(store))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def tail(process: procs.Process, chars: int = 3000) -> str:
    return f"\n--- {process.name} log {process.log_path}:\n{process.log()[-chars:]}"


def get(client: procs.Process, url: str) -> httpx.Response:
    response = procs.fetch(client, url)
    assert "Traceback" not in client.log(), tail(client)
    return response


def test_a_3_request_bundle_serves_3_requests_then_pays_again(
    world: World, clients: Clients
) -> None:
    store = clients.work / "client.sqlite"
    client = clients.start()
    before = settled(world.home)
    answers = [get(client, world.url(f"/podcast/ep{n}.mp3")) for n in range(4)]
    assert [a.status_code for a in answers] == [200] * 4, tail(client)
    assert [a.headers[BALANCE] for a in answers] == [
        "2 requests",
        "1 requests",
        "0 requests",
        "2 requests",
    ]
    assert ["X-L402-Paid" in a.headers for a in answers] == [True, False, False, True]
    bought = settled(world.home) - before
    assert len(bought) == 2
    sent = world.server.authorizations["podcast"][-6:]
    # The first token three times; the spent one stayed home; a new one was bought.
    assert sent[0] is None and sent[1] == sent[2] == sent[3] is not None
    assert sent[4] is None and sent[5] not in (None, sent[1])

    tokens = {t["payment_hash"]: t for t in wallet_tokens(world.home, store)}
    assert set(tokens) == bought
    by_status = {t["status"]: t for t in tokens.values()}
    assert set(by_status) == {"spent", "valid"}
    assert (by_status["spent"]["balance"], by_status["spent"]["balance_unit"]) == (0, "requests")
    assert (by_status["valid"]["balance"], by_status["valid"]["balance_unit"]) == (2, "requests")
    assert "balance_at_iso" in by_status["valid"]

    # A restarted client proxy sends the live token up front and never the spent one.
    client.stop()
    restarted = clients.start(store=store)
    again = get(restarted, world.url("/podcast/ep5.mp3"))
    assert again.status_code == 200 and again.headers[BALANCE] == "1 requests", tail(restarted)
    assert "X-L402-Paid" not in again.headers
    assert settled(world.home) - before == bought
    assert world.server.authorizations["podcast"][-1] == sent[5]


def test_single_use_pays_every_call_within_the_budget_and_stops_at_it(
    world: World, clients: Clients
) -> None:
    # Two payments of 21 sat (no fee allowed) fit in 42 sat a day; a third does not.
    client = clients.start("l402_max_fee_sat=0", "l402_budget_daily_sat=42")
    before = settled(world.home)
    answers = [get(client, world.url(f"/api/call{n}")) for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 402], tail(client)
    assert [a.headers.get(BALANCE) for a in answers[:2]] == ["0 requests", "0 requests"]
    assert all("X-L402-Paid" in a.headers for a in answers[:2])
    assert answers[2].headers["X-L402-Refused"].startswith("budget_daily; "), answers[2].headers
    assert len(settled(world.home) - before) == 2
    sent = [a for a in world.server.authorizations["api"][-5:] if a is not None]
    assert len(sent) == len(set(sent)) == 2  # each token went once: never a spent one


def test_a_malformed_balance_is_ignored_without_paying_again(
    world: World, clients: Clients
) -> None:
    client = clients.start()
    before = settled(world.home)
    answers = [get(client, world.url(f"/junk/x{n}")) for n in range(3)]
    assert [a.status_code for a in answers] == [200] * 3, tail(client)
    assert len(settled(world.home) - before) == 1
    assert procs.wait_until(lambda: "ignored from" in client.log(), 5), tail(client)
    assert client.log().count("is not '<remaining> <unit>'") == 1  # warned once a minute


def test_a_pass_opens_its_other_service_without_paying(world: World, clients: Clients) -> None:
    client = clients.start()
    before = settled(world.home)
    assert get(client, world.url("/podcast2/ep1")).status_code == 200, tail(client)
    assert len(settled(world.home) - before) == 1
    articles = [get(client, world.url(f"/articles/a{n}")) for n in range(2)]
    assert [a.status_code for a in articles] == [200, 200], tail(client)
    assert all("X-L402-Paid" not in a.headers for a in articles)
    assert len(settled(world.home) - before) == 1
    # The pass was tried after the first 402, then went up front.
    pass_credential = world.server.authorizations["articles"][-1]
    assert pass_credential is not None
    assert world.server.authorizations["articles"][-3:] == [None, pass_credential, pass_credential]


def test_a_pass_the_server_refuses_is_tried_once_then_paid_once(
    world: World, clients: Clients
) -> None:
    client = clients.start()
    before = settled(world.home)
    assert get(client, world.url("/passer/p1")).status_code == 200, tail(client)
    first = get(client, world.url("/strict/s1"))
    assert first.status_code == 200 and "X-L402-Paid" in first.headers, tail(client)
    second = get(client, world.url("/strict/s2"))
    assert second.status_code == 200 and "X-L402-Paid" not in second.headers
    assert len(settled(world.home) - before) == 2
    none, tried, bought, reused = world.server.authorizations["strict"][-4:]
    assert none is None and tried is not None and bought not in (None, tried)
    assert reused == bought
    # The pass still opens its own service.
    assert get(client, world.url("/passer/p2")).status_code == 200
    assert len(settled(world.home) - before) == 2
