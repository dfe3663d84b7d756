"""Issue 14 with both real sides: the paying clients against the real server door.

The server is a real mitmdump server door (`-s addons/server.py`) with a rules file selling a
bundle of 3 requests (with a pass for a second service), single-use calls and a pass without a
bundle, in front of the sample origin, logging its decisions as JSON. The clients, each with a
store of its own, pay from the dev ledger the door invoices from:

- "proxy": the client proxy (`mitmdump -s addons/client.py`), fetched through;
- "sdk": the Python SDK (l402proxy.sdk.L402Auth on an httpx.Client), in this process;
- "go": the Go SDK (sdk/go, l402.NewTransport with a file store), a small program built here
  that fetches the URLs it is given and prints what it got and what its store holds.

Each scenario is checked on both sides: what the client got (statuses, X-L402-Balance, its
X-L402-Paid and X-L402-Refused), what was paid (the ledger), what the client's store holds
(`l402proxy wallet tokens`, or the Go store), what the server's store holds (`l402proxy tokens
list`), and what the server decided about each request (its JSON decision log: the token each
grant was made with, and that no request ever carried a spent token: the server would have
answered it with a 402 "spent").

Each scenario's requests are sent in two runs with the client restarted in between, as a
player is: what the client learnt (spent tokens, balances, passes) must survive it.
"""

import concurrent.futures
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from l402proxy.launch import started
from l402proxy.sdk import L402Auth
from tests.conftest import require

from . import procs
from .test_client_bundles_e2e import BALANCE, get, settled, tail, wallet_tokens
from .test_go_sdk_e2e import GO_MODULE, GO_TEST_TIMEOUT, go_env
from .test_jsonlog_e2e import DECISIONS, QUIET_MITMPROXY

pytestmark = pytest.mark.e2e

Kind = Literal["proxy", "sdk", "go"]
KINDS: tuple[Kind, ...] = ("proxy", "sdk", "go")
PAID = "X-L402-Paid"
REFUSED = "X-L402-Refused"
PODCAST_SAT, ARTICLES_SAT, ONCE_SAT, RADIO_SAT = 21, 10, 5, 7
BUNDLE = 3
RULES = f"""\
# Every spent bundle's 402 makes an invoice: more than the default allows from one address.
invoice_limit: {{requests: 1000, per: 1m, burst: 1000}}
services:
  - name: podcast
    match: {{path: "/episodes/*"}}
    price_sat: {PODCAST_SAT}
    bundle: {{requests: {BUNDLE}}}
    pass: {{name: premium, services: [podcast, articles]}}
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
  - name: articles
    match: {{path: "/api/articles/*"}}
    price_sat: {ARTICLES_SAT}
    paid: {{set_headers: {{X-L402-Tier: articles}}}}
  - name: once
    match: {{path: "/api/once/*"}}
    price_sat: {ONCE_SAT}
    single_use: true
  - name: radio
    match: {{path: "/bonus/*"}}
    price_sat: {RADIO_SAT}
    pass: {{name: allaccess, services: [radio, news]}}
  - name: news
    match: {{path: "/api/news/*"}}
    price_sat: 3
    paid: {{set_headers: {{X-L402-Tier: news}}}}
"""

# The Go SDK's player: fetches each URL it is given, in order (all at once with
# PLAYER_AT_ONCE=1), with one Transport on one file store; prints one JSON line per answer, in
# the order given, then one with the store's payments.
GO_PLAYER = """\
package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"

	"l402proxy/sdk/go/l402"
)

func number(name string) int64 {
	value, err := strconv.ParseInt(os.Getenv(name), 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, name, err)
		os.Exit(2)
	}
	return value
}

func main() {
	store, err := l402.OpenFileStore(os.Getenv("PLAYER_STORE"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	python, ledger := os.Getenv("PLAYER_PYTHON"), os.Getenv("PLAYER_LEDGER")
	wallet := &l402.DevWallet{Python: python, Ledger: ledger}
	limits := l402.Limits{
		MaxPriceSat:    100,
		MaxFeeSat:      number("PLAYER_MAX_FEE_SAT"),
		DailyBudgetSat: 1000,
		TotalBudgetSat: number("PLAYER_BUDGET_TOTAL_SAT"),
	}
	// No proxy from the environment: the tests talk to 127.0.0.1 only.
	transport := l402.NewTransport(&http.Transport{}, wallet, limits, l402.WithStore(store))
	client := &http.Client{Transport: transport}
	urls := os.Args[1:]
	answers := make([]map[string]interface{}, len(urls))
	fetch := func(i int) {
		resp, err := client.Get(urls[i])
		if err != nil {
			fmt.Fprintln(os.Stderr, urls[i], err)
			os.Exit(1)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, urls[i], err)
			os.Exit(1)
		}
		answers[i] = map[string]interface{}{
			"status": resp.StatusCode, "headers": resp.Header, "body": string(body),
		}
	}
	if os.Getenv("PLAYER_AT_ONCE") == "1" {
		// All at once, each on its own goroutine; printed in the order given.
		var wg sync.WaitGroup
		for i := range urls {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				fetch(i)
			}(i)
		}
		wg.Wait()
	} else {
		for i := range urls {
			fetch(i)
		}
	}
	out := json.NewEncoder(os.Stdout)
	for _, answer := range answers {
		out.Encode(answer)
	}
	payments := []map[string]interface{}{}
	for _, p := range store.Payments() {
		if p.Status != "paid" {
			continue
		}
		status := "valid"
		if p.Spent {
			status = "spent"
		}
		var balance interface{}
		if p.BalanceUnit != "" {
			balance = p.Balance
		}
		payments = append(payments, map[string]interface{}{
			"payment_hash": hex.EncodeToString(p.PaymentHash[:]), "services": p.Services,
			"status": status, "balance": balance, "balance_unit": p.BalanceUnit,
		})
	}
	out.Encode(map[string]interface{}{"payments": payments})
	if err := store.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
"""


# -- the server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decided:
    """One line of the server's decision log, as far as these tests read it."""

    service: str | None
    kind: str
    reason: str | None
    token: str | None  # the first 8 hex digits of the token id


@dataclass
class Shop:
    work: Path
    home: Path
    confdir: Path
    server: procs.Process

    def url(self, path: str) -> str:
        return self.server.url + path

    @property
    def store(self) -> Path:
        return self.home / "server.sqlite"  # procs.server_proxy's

    def decisions(self) -> list[Decided]:
        """Every decision the door has logged so far, in order (logged before it answers)."""
        found = []
        for line in self.server.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # not the paywall's (mitmproxy's own warnings)
            if entry.get("logger") == DECISIONS and entry.get("event") == "decision":
                found.append(
                    Decided(entry["service"], entry["kind"], entry["reason"], entry["token"])
                )
        return found

    def tokens(self, service: str) -> list[dict[str, Any]]:
        """`l402proxy tokens list --service`: what the server's store holds."""
        listed = procs.cli(self.home, "tokens", "--store", str(self.store), "list",
                           "--service", service)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        tokens: list[dict[str, Any]] = json.loads(listed.stdout)
        return tokens


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    work = tmp_path_factory.mktemp("client-server-bundles")
    home = work / "home"
    home.mkdir()
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    confdir = work / "mitmproxy-conf"
    origin = procs.origin(work, home)
    with started(origin):
        server = procs.server_proxy(
            work, home, confdir, origin.url, rules, "l402_log_format=json", *QUIET_MITMPROXY
        )
        with started(server):
            yield Shop(work, home, confdir, server)


# -- the clients ---------------------------------------------------------------------------------


@dataclass
class Limits:
    max_fee_sat: int = 10
    budget_total_sat: int | None = None
    # The dev wallet's URI (proxy and SDK): `dev?hold=1` waits a second before each payment,
    # so requests sent at once all wait for the same one.
    wallet: str = "dev"


class Player:
    """One paying client of one kind, on a store of its own, that can be restarted."""

    kind: Kind

    def __init__(self, shop: Shop, work: Path, limits: Limits) -> None:
        self.shop, self.work, self.limits = shop, work, limits

    def fetch(self, paths: list[str]) -> list[httpx.Response]:
        raise NotImplementedError

    def fetch_at_once(self, paths: list[str]) -> list[httpx.Response]:
        """Every path at the same time, each on a thread of its own; answers in order."""
        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(lambda path: self.fetch([path])[0], paths))

    def restart(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wallet(self) -> list[dict[str, Any]]:
        """The tokens the client's store holds, newest first, as `l402proxy wallet tokens`
        shows them (payment_hash, services, status, balance, balance_unit)."""
        raise NotImplementedError

    def why(self) -> str:
        """What to show when an assertion fails: the client's own log."""
        return ""


class ProxyPlayer(Player):
    kind: Kind = "proxy"

    def __init__(self, shop: Shop, work: Path, limits: Limits) -> None:
        super().__init__(shop, work, limits)
        self.store = work / "client.sqlite"
        settings = [
            f"l402_store={self.store}",
            f"l402_max_fee_sat={limits.max_fee_sat}",
            f"l402_wallet={limits.wallet}",
        ]
        if limits.budget_total_sat is not None:
            settings.append(f"l402_budget_total_sat={limits.budget_total_sat}")
        self.process = procs.client_proxy(work, shop.home, shop.confdir, *settings).start()

    def fetch(self, paths: list[str]) -> list[httpx.Response]:
        return [get(self.process, self.shop.url(path)) for path in paths]

    def restart(self) -> None:
        self.process.stop()
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def wallet(self) -> list[dict[str, Any]]:
        return wallet_tokens(self.shop.home, self.store)

    def why(self) -> str:
        return tail(self.process)


class SdkPlayer(Player):
    kind: Kind = "sdk"

    def __init__(self, shop: Shop, work: Path, limits: Limits) -> None:
        super().__init__(shop, work, limits)
        self.store = work / "client.sqlite"
        self.auth: L402Auth | None = None
        self.http: httpx.Client | None = None
        self.restart()

    def fetch(self, paths: list[str]) -> list[httpx.Response]:
        assert self.http is not None
        return [self.http.get(self.shop.url(path)) for path in paths]

    def restart(self) -> None:
        self.stop()
        self.auth = L402Auth(
            self.limits.wallet,
            max_fee_sat=self.limits.max_fee_sat,
            budget_total_sat=self.limits.budget_total_sat,
            store=str(self.store),
            dev_ledger=str(self.shop.home / "devledger.sqlite"),
        )
        self.http = httpx.Client(auth=self.auth, trust_env=False, timeout=procs.FETCH_TIMEOUT)

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.auth is not None:
            self.auth.close()
        self.http = self.auth = None

    def wallet(self) -> list[dict[str, Any]]:
        return wallet_tokens(self.shop.home, self.store)


class GoPlayer(Player):
    """Each fetch is one run of the Go program (so a restart is the next fetch)."""

    kind: Kind = "go"

    def __init__(self, shop: Shop, work: Path, limits: Limits, binary: Path) -> None:
        super().__init__(shop, work, limits)
        self.binary = binary
        self.store = work / "go-store.json"
        self.payments: list[dict[str, Any]] = []
        self.stderr = ""

    def fetch(self, paths: list[str], at_once: bool = False) -> list[httpx.Response]:
        env = {
            "PLAYER_AT_ONCE": "1" if at_once else "0",
            "PLAYER_STORE": str(self.store),
            "PLAYER_LEDGER": str(self.shop.home / "devledger.sqlite"),
            "PLAYER_PYTHON": sys.executable,
            "PLAYER_MAX_FEE_SAT": str(self.limits.max_fee_sat),
            "PLAYER_BUDGET_TOTAL_SAT": str(self.limits.budget_total_sat or 0),
        }
        run = subprocess.run(
            [str(self.binary), *(self.shop.url(path) for path in paths)],
            env=procs.env_with_home(self.shop.home) | env,
            capture_output=True,
            text=True,
            timeout=GO_TEST_TIMEOUT,
        )
        self.stderr = run.stderr
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        *answers, stored = (json.loads(line) for line in run.stdout.splitlines())
        self.payments = list(reversed(stored["payments"]))  # newest first, as the CLI lists
        return [
            httpx.Response(
                answer["status"],
                headers=[(k, v) for k, values in answer["headers"].items() for v in values],
                content=answer["body"].encode(),
            )
            for answer in answers
        ]

    def fetch_at_once(self, paths: list[str]) -> list[httpx.Response]:
        # Its DevWallet runs Python for each payment: slow enough for all to wait for one.
        return self.fetch(paths, at_once=True)

    def restart(self) -> None:
        pass  # the next fetch is a new process on the same store

    def stop(self) -> None:
        pass

    def wallet(self) -> list[dict[str, Any]]:
        return self.payments

    def why(self) -> str:
        return f"\n--- go player stderr:\n{self.stderr[-3000:]}"


@pytest.fixture(scope="module")
def go_player(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go player, built once against sdk/go (offline: the SDK has no dependencies)."""
    go = shutil.which("go")
    require(go is not None, "go (apt-get install golang-go)")
    assert go is not None
    source = tmp_path_factory.mktemp("go-player")
    (source / "go.mod").write_text(
        "module player\n\ngo 1.19\n\nrequire l402proxy/sdk/go v0.0.0\n\n"
        f"replace l402proxy/sdk/go => {GO_MODULE}\n"
    )
    (source / "main.go").write_text(GO_PLAYER)
    binary = source / "player"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=source,
        env=go_env({}),
        capture_output=True,
        text=True,
        timeout=GO_TEST_TIMEOUT,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return binary


@dataclass
class Players:
    shop: Shop
    work: Path
    request: pytest.FixtureRequest
    started: list[Player] = field(default_factory=list)

    def start(self, kind: Kind, limits: Limits | None = None) -> Player:
        limits = limits or Limits()
        work = self.work / f"{kind}-{len(self.started)}"
        work.mkdir()
        player: Player
        if kind == "proxy":
            player = ProxyPlayer(self.shop, work, limits)
        elif kind == "sdk":
            player = SdkPlayer(self.shop, work, limits)
        else:
            binary = self.request.getfixturevalue("go_player")
            player = GoPlayer(self.shop, work, limits, binary)
        self.started.append(player)
        return player

    def stop(self) -> None:
        for player in reversed(self.started):
            player.stop()


@pytest.fixture
def players(shop: Shop, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Players]:
    started_players = Players(shop, tmp_path, request)
    yield started_players
    started_players.stop()


# -- helpers ---------------------------------------------------------------------------------


def balances(answers: list[httpx.Response]) -> list[str | None]:
    return [answer.headers.get(BALANCE) for answer in answers]


def paid_marks(answers: list[httpx.Response]) -> list[bool]:
    return [PAID in answer.headers for answer in answers]


def paid_sat(answer: httpx.Response) -> int:
    """What X-L402-Paid says the request paid ("5 sat (fee ...) for once"); 0 without one."""
    value = answer.headers.get(PAID)
    return 0 if value is None else int(value.split(" ", 1)[0])


def token_prefixes(shop: Shop, service: str, payment_hashes: list[str]) -> list[str]:
    """The server's token id prefix (what its decision log names) of each payment, in the
    order given; waits (bounded) for the door's write-behind to record them."""
    by_hash: dict[str, dict[str, Any]] = {}

    def recorded() -> bool:
        by_hash.update({t["payment_hash"]: t for t in shop.tokens(service)})
        return all(h in by_hash for h in payment_hashes)

    assert procs.wait_until(recorded, 15), (payment_hashes, by_hash)
    return [by_hash[h]["token_id"][:8] for h in payment_hashes]


def new_decisions(shop: Shop, since: int, service: str) -> list[tuple[str, str | None, str | None]]:
    return [(d.kind, d.reason, d.token) for d in shop.decisions()[since:] if d.service == service]


def wallet_when(
    player: Player, ready: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The client's tokens once `ready` holds (a balance above 0 is written behind the answer),
    bounded."""
    held: list[dict[str, Any]] = []

    def check() -> bool:
        held[:] = player.wallet()
        return ready(held)

    procs.wait_until(check, 10)
    return held


def by_hash(held: list[dict[str, Any]]) -> dict[str, tuple[str, int | None, str | None]]:
    return {t["payment_hash"]: (t["status"], t["balance"], t["balance_unit"] or None) for t in held}


# -- 1. a bundle of 3 requests -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_bundle_is_paid_once_per_3_requests_and_the_budget_stops_the_third(
    shop: Shop, players: Players, kind: Kind
) -> None:
    # Two payments of 21 sat (no fee allowed) fit in 42 sat in total; a third does not.
    player = players.start(kind, Limits(max_fee_sat=0, budget_total_sat=2 * PODCAST_SAT))
    before, since = settled(shop.home), len(shop.decisions())
    paths = [f"/episodes/ep{n % 3 + 1}.mp3" for n in range(7)]

    first = player.fetch(paths[:4])
    assert [a.status_code for a in first] == [200] * 4, player.why()
    assert balances(first) == ["2 requests", "1 requests", "0 requests", "2 requests"]
    assert paid_marks(first) == [True, False, False, True]
    assert all(a.text.startswith("AD-FREE episode") for a in first), [a.text for a in first]
    bought = settled(shop.home) - before
    assert len(bought) == 2
    # The client's store: the first token spent with 0 left, the second with 2 left.
    held = wallet_when(player, lambda held: len(held) == 2 and held[0]["balance"] == 2)
    older, newer = held[1]["payment_hash"], held[0]["payment_hash"]
    assert {older, newer} == bought
    assert by_hash(held) == {
        older: ("spent", 0, "requests"),
        newer: ("valid", 2, "requests"),
    }, held

    # Restarted, the client sends the live token up front, never the spent one; the 7th
    # request would need a third payment: refused by the budget, the server's 402 passed on.
    player.restart()
    second = player.fetch(paths[4:])
    assert [a.status_code for a in second] == [200, 200, 402], player.why()
    assert balances(second) == ["1 requests", "0 requests", None]
    assert paid_marks(second) == [False, False, False]
    assert second[2].headers[REFUSED].startswith("budget_total; "), second[2].headers
    assert settled(shop.home) - before == bought
    held = wallet_when(player, lambda held: held[0]["balance"] == 0)
    assert by_hash(held) == {h: ("spent", 0, "requests") for h in bought}, held

    # The server: each token granted exactly its 3 requests; every other request came without
    # a token (a spent token sent again would be a 402 "spent" here).
    a, b = token_prefixes(shop, "podcast", [older, newer])
    challenge = ("challenge", "payment_required", None)
    assert new_decisions(shop, since, "podcast") == [
        challenge, *[("grant", None, a)] * 3, challenge, *[("grant", None, b)] * 3, challenge,
    ]  # fmt: skip
    server = {t["payment_hash"]: t["balance"] for t in shop.tokens("podcast")}
    assert (server[older], server[newer]) == (0, 0)


# -- 2. single use -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_single_use_pays_each_call_sends_each_token_once_and_stops_at_the_budget(
    shop: Shop, players: Players, kind: Kind
) -> None:
    player = players.start(kind, Limits(max_fee_sat=0, budget_total_sat=3 * ONCE_SAT))
    before, since = settled(shop.home), len(shop.decisions())
    answers = player.fetch(["/api/once/c1", "/api/once/c2"])
    player.restart()
    answers += player.fetch(["/api/once/c3", "/api/once/c4"])
    assert [a.status_code for a in answers] == [200, 200, 200, 402], player.why()
    assert balances(answers) == ["0 requests"] * 3 + [None]
    assert paid_marks(answers) == [True, True, True, False]
    assert answers[3].headers[REFUSED].startswith("budget_total; "), answers[3].headers
    assert [json.loads(a.text)["path"] for a in answers[:3]] == [
        "/api/once/c1",
        "/api/once/c2",
        "/api/once/c3",
    ]
    bought = settled(shop.home) - before
    assert len(bought) == 3

    held = wallet_when(player, lambda held: len(held) == 3)
    assert by_hash(held) == {h: ("spent", 0, "requests") for h in bought}, held
    hashes = [t["payment_hash"] for t in reversed(held)]  # oldest first
    tokens = token_prefixes(shop, "once", hashes)
    assert len(set(tokens)) == 3
    # Each token used once, by the request that bought it; never sent again.
    challenge = ("challenge", "payment_required", None)
    assert new_decisions(shop, since, "once") == [
        challenge, ("grant", None, tokens[0]), challenge, ("grant", None, tokens[1]),
        challenge, ("grant", None, tokens[2]), challenge,
    ]  # fmt: skip
    server = {t["payment_hash"]: t["balance"] for t in shop.tokens("once")}
    assert {h: server[h] for h in hashes} == {h: 0 for h in hashes}


# -- 3. passes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_pass_opens_its_other_service_without_paying(
    shop: Shop, players: Players, kind: Kind
) -> None:
    player = players.start(kind)
    before, since = settled(shop.home), len(shop.decisions())
    first = player.fetch(["/bonus/b1", "/api/news/n1", "/api/news/n2"])
    player.restart()
    first += player.fetch(["/api/news/n3"])
    assert [a.status_code for a in first] == [200] * 4, player.why()
    assert paid_marks(first) == [True, False, False, False]
    # The paid variant each time (the news rule's header reached the origin); no bundle.
    assert [a.headers["X-Origin-Tier"] for a in first[1:]] == ["news"] * 3
    assert balances(first) == [None] * 4
    bought = settled(shop.home) - before
    assert len(bought) == 1
    (pass_hash,) = bought
    (token,) = token_prefixes(shop, "radio", [pass_hash])
    held = player.wallet()
    assert [(t["payment_hash"], sorted(t["services"])) for t in held] == [
        (pass_hash, ["news", "radio"])
    ]
    # At news: the first request came without a token (402), the client retried with the
    # pass and the server granted it; then the pass went along up front. A restarted client
    # holds the pass under its own services only: one more 402 at news, the pass tried again.
    challenge, granted = ("challenge", "payment_required", None), ("grant", None, token)
    assert new_decisions(shop, since, "news") == [challenge, granted, granted, challenge, granted]


@pytest.mark.parametrize("kind", KINDS)
def test_a_pass_with_a_bundle_is_drawn_at_both_services_then_each_is_paid_anew(
    shop: Shop, players: Players, kind: Kind
) -> None:
    player = players.start(kind)
    before, since = settled(shop.home), len(shop.decisions())
    paths = ["/episodes/ep1.mp3", "/api/articles/a1", "/api/articles/a2", "/api/articles/a3"]
    answers = player.fetch(paths)
    player.restart()
    answers += player.fetch(["/api/articles/a4", "/episodes/ep2.mp3"])
    assert [a.status_code for a in answers] == [200] * 6, player.why()
    # The pass (podcast's 3 requests) at podcast once and at articles twice; spent, articles
    # is paid for on its own terms (no bundle); podcast is paid anew.
    assert balances(answers) == ["2 requests", "1 requests", "0 requests", None, None,
                                 "2 requests"]  # fmt: skip
    assert paid_marks(answers) == [True, False, False, True, False, True]
    assert [a.headers["X-Origin-Tier"] for a in answers[1:5]] == ["articles"] * 4
    assert answers[5].text == "AD-FREE episode ep2\n"
    bought = settled(shop.home) - before
    assert len(bought) == 3
    held = wallet_when(player, lambda held: len(held) == 3 and held[0]["balance"] == 2)
    newest, articles_token, first_pass = (t["payment_hash"] for t in held)
    assert by_hash(held) == {
        first_pass: ("spent", 0, "requests"),
        articles_token: ("valid", None, None),
        newest: ("valid", 2, "requests"),
    }, held
    pass_token, _ = token_prefixes(shop, "podcast", [first_pass, newest])
    (own,) = token_prefixes(shop, "articles", [articles_token])
    # The server's store: the pass drawn to 0 (at both services), the articles token unmetered.
    server = {t["payment_hash"]: t["balance"] for t in shop.tokens("podcast")}
    assert (server[first_pass], server[newest]) == (0, 2)
    assert [
        t["balance"] for t in shop.tokens("articles") if t["payment_hash"] == articles_token
    ] == [None]
    challenge = ("challenge", "payment_required", None)
    assert new_decisions(shop, since, "articles") == [
        challenge, ("grant", None, pass_token), ("grant", None, pass_token),
        challenge, ("grant", None, own), ("grant", None, own),
    ]  # fmt: skip


# -- concurrent requests and a metered token -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_single_use_calls_made_at_once_each_get_their_call_within_the_budget(
    shop: Shop, players: Players, kind: Kind
) -> None:
    """Three calls at once to a single-use service, the budget allowing three payments: all
    three wait for the one payment the first 402 started, and retry with its token; the server
    grants one of them and answers the other two "spent" (X-L402-Balance: 0 requests). The
    contract (wire fact 2): the client stops sending that token and pays the new challenge
    within its limits. A token the server granted is no token "refused right after payment":
    each request that lost it to another of ours pays once more, for itself alone."""
    calls = 3
    player = players.start(
        kind, Limits(max_fee_sat=0, budget_total_sat=calls * ONCE_SAT, wallet="dev?hold=1")
    )
    before, since = settled(shop.home), len(shop.decisions())
    answers = player.fetch_at_once([f"/api/once/burst{n}" for n in range(calls)])
    assert [a.headers.get(REFUSED) for a in answers] == [None] * calls, player.why()
    assert [a.status_code for a in answers] == [200] * calls
    assert balances(answers) == ["0 requests"] * calls
    assert len(settled(shop.home) - before) == calls
    # What X-L402-Paid says adds up to what was paid (a request that paid the shared token
    # and then its own says both); the server granted each token once.
    assert sum(paid_sat(a) for a in answers) == calls * ONCE_SAT, [a.headers for a in answers]
    grants = [d for d in new_decisions(shop, since, "once") if d[0] == "grant"]
    assert len(grants) == len({token for _, _, token in grants}) == calls, grants


@pytest.mark.parametrize("kind", KINDS)
def test_single_use_calls_at_once_beyond_the_budget_say_what_each_paid(
    shop: Shop, players: Players, kind: Kind
) -> None:
    """Three calls at once to a single-use service, the budget allowing two payments: the
    shared payment, then one more for one of the two requests that lost it to ours; the
    third is refused by the budget. A refused request that had paid the shared token says
    so beside the refusal (X-L402-Paid and X-L402-Refused): what X-L402-Paid says adds up to
    what was paid whichever request the server granted first."""
    calls = 3
    player = players.start(
        kind, Limits(max_fee_sat=0, budget_total_sat=2 * ONCE_SAT, wallet="dev?hold=1")
    )
    before = settled(shop.home)
    answers = player.fetch_at_once([f"/api/once/over{n}" for n in range(calls)])
    refusals = sorted((a.headers.get(REFUSED) or "").split(";", 1)[0] for a in answers)
    assert refusals == ["", "", "budget_total"], [a.headers for a in answers] + [player.why()]
    assert sorted(a.status_code for a in answers) == [200, 200, 402]
    assert len(settled(shop.home) - before) == 2
    assert sum(paid_sat(a) for a in answers) == 2 * ONCE_SAT, [a.headers for a in answers]
