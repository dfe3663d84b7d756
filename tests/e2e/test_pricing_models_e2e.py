"""Issue 14's pricing models through real processes: a `price:` function, bundles of requests,
single use and passes at each front door (tests/e2e/doors.py: mitmdump, the ASGI middleware
under uvicorn, nginx asking serve-auth, here with a 60 s verdict cache so nginx would keep any
grant it is allowed to), in front of the sample origin; a bundle spread over the three doors on
one store; and a 100-request bundle drawn by 16 clients at once from two mitmdump instances on
one PostgreSQL.

What a client sees is checked as a client sees it: X-L402-Balance on each granted answer, a fresh
402 (new invoice and macaroon, reason "spent", X-L402-Balance: 0 requests) once the bundle is
used up, the quoted price in the BOLT11 invoice (decoded by the bolt11 package) and the body.
The price functions live in a module next to the rules file, as an operator writes them.
"""

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import bolt11
import httpx
import pytest

from l402proxy.launch import started
from tests.postgres import PostgresServer

from . import procs
from .doors import KINDS, Door, DoorKind, start_door, uvicorn
from .test_doors_behaviour import OPTED_IN, Paid, ask, assert_challenge, buy, challenge
from .test_scale_out_e2e import proxy_instance, running, statuses

pytestmark = pytest.mark.e2e

BALANCE = "X-L402-Balance"
# nginx keeps a paid verdict this long when the engine lets it (never a bundle's).
VERDICT_CACHE = 60
# The scale-out test: a bundle of 100 requests drawn by 16 clients at once, 9 requests each (144
# in all: 100 granted, 44 refused).
CLIENTS = 16
BUNDLE = 100
REQUESTS_EACH = 9
# A price function that hangs sleeps this long: past the engine's 5 s time box
# (engine.pricing.PRICE_TIMEOUT), so every slow quote takes 5 s before its 503.
HANG_SECONDS = 8
PRICE_MODULE = f"""
import asyncio
import time
from urllib.parse import parse_qsl


def quote(request):
    # ?sats=N names the price: the test asks for the prices it checks.
    return int(dict(parse_qsl(request.query)).get("sats", "37"))


def boom(request):
    raise KeyError("rate")


def garbage(request):
    return "lots"


def slow(request):
    time.sleep({HANG_SECONDS})
    return 5


async def slow_async(request):
    await asyncio.sleep({HANG_SECONDS})
    return 5
"""
RULES = """\
# Every spent bundle's 402 makes an invoice: more than the default 120 at once from one address.
invoice_limit: {{requests: 1000, per: 1m, burst: 1000}}
services:
  - name: podcast
    match: {{path: "/episodes/*"}}
    price_sat: 21
    bundle: {{requests: 3}}
    pass: {{name: premium, services: [podcast, articles]}}
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
  - name: articles
    match: {{path: "/bonus/*"}}
    price_sat: 10
  - name: once
    match: {{path: "/api/once/*"}}
    price_sat: 5
    single_use: true
  - name: metered
    match: {{path: "/api/metered/*"}}
    price_sat: 50
    bundle: {{requests: {bundle}}}
  - name: quoted
    match: {{path: "/api/quoted/*"}}
    price: python:{module}:quote
  - name: broken
    match: {{path: "/api/broken/*"}}
    price: python:{module}:boom
  - name: nonsense
    match: {{path: "/api/nonsense/*"}}
    price: python:{module}:garbage
  - name: slow
    match: {{path: "/api/slow/*"}}
    price: python:{module}:slow
  - name: slow_async
    match: {{path: "/api/slow-async/*"}}
    price: python:{module}:slow_async
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rules file, with its price module next to it (each door process imports it)."""
    directory = tmp_path_factory.mktemp("pricing-rules")
    (directory / "shop_prices.py").write_text(PRICE_MODULE)
    path = directory / "rules.yaml"
    path.write_text(RULES.format(module="shop_prices", bundle=BUNDLE))
    return path


@contextlib.contextmanager
def pricing_door(kind: DoorKind, workdir: Path, home: Path, rules: Path) -> Iterator[Door]:
    """start_door, but nginx's verdict cache is on for VERDICT_CACHE seconds: a bundle's grant
    must still be judged (and drawn) every time."""
    if kind != "nginx":
        with start_door(kind, workdir, home, rules) as door:
            yield door
        return
    from .nginx import nginx_door

    store, ledger = home / "server.sqlite", home / "devledger.sqlite"
    workdir.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    origin = uvicorn(workdir, home, "l402proxy.origin_asgi:app")
    with (
        started(origin),
        nginx_door(
            workdir, home, rules, origin.url, "--store", str(store), "--dev-ledger", str(ledger),
            config_args=("--verdict-cache", str(VERDICT_CACHE)),
        ) as base_url,
    ):  # fmt: skip
        yield Door(kind, base_url, home, store, origin.url, workdir)


@pytest.fixture(scope="module", params=KINDS)
def door(
    request: pytest.FixtureRequest, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    kind: DoorKind = request.param
    work = tmp_path_factory.mktemp(f"pricing-{kind}")
    with pricing_door(kind, work, work / "home", rules) as started_door:
        yield started_door


def paid_get(
    door: Door, path: str, paid: Paid, method: str = "GET", **headers: str
) -> httpx.Response:
    return ask(door, path, method, Authorization=paid.authorization, **headers)


def assert_spent(response: httpx.Response, paid: Paid, head: bool = False) -> None:
    """A fresh challenge for a spent bundle: the shape of every 402, a new invoice and
    macaroon, X-L402-Balance: 0, and (with a body) reason spent."""
    if head:  # a HEAD's Content-Length is the GET's
        assert response.status_code == 402 and response.content == b""
    else:
        assert_challenge(response)
    assert response.headers.get_list(BALANCE) == ["0 requests"]
    macaroon, invoice = challenge(response)
    assert macaroon != paid.macaroon and invoice != paid.invoice
    if not head:
        assert response.json()["reason"] == "spent", response.text[:300]


def verdicts_kept(door: Door) -> int:
    """Files in nginx's verdict cache (tests/e2e/nginx.py puts it under the door's home)."""
    return sum(1 for path in door.home.glob("verdicts-*/**/*") if path.is_file())


def buy_at(home: Path, base: str, path: str) -> Paid:
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        macaroon, invoice = challenge(http.get(base + path, headers=dict(OPTED_IN)))
    return Paid(macaroon, invoice, procs.dev_pay(home, invoice))


def all_at_once(
    bases: list[str], path: str, paid: Paid, clients: int, each: int
) -> list[httpx.Response]:
    """`clients` clients at once, each sending `each` requests one after the other, taking
    turns over the instances."""

    async def client(number: int, http: httpx.AsyncClient) -> list[httpx.Response]:
        answers = []
        for n in range(each):
            base = bases[(number + n) % len(bases)]
            answers.append(
                await http.get(base + path, headers={"Authorization": paid.authorization})
            )
        return answers

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(
            trust_env=False, timeout=procs.FETCH_TIMEOUT, limits=limits
        ) as http:
            done = await asyncio.gather(*(client(n, http) for n in range(clients)))
        return [answer for answers in done for answer in answers]

    return asyncio.run(run())


# -- bundles and single use at each door -------------------------------------------------------


def test_a_bundle_of_three_is_three_requests_then_a_fresh_challenge(door: Door) -> None:
    paid = buy(door, "/episodes/ep1.mp3")
    for left in (2, 1, 0):
        # The same request each time: no door may keep its grant and give it again uncounted.
        response = paid_get(door, "/episodes/ep1.mp3", paid)
        assert response.status_code == 200, response.text[:300]
        assert response.headers["X-Origin-Path"] == "/adfree/ep1.mp3"
        assert response.headers.get_list(BALANCE) == [f"{left} requests"]
        assert response.headers["Cache-Control"] == "private"
    again = paid_get(door, "/episodes/ep1.mp3", paid)
    assert_spent(again, paid)
    assert "spent (it held 3 requests)" in again.json()["message"]
    # Spent whatever the spelling, and the old macaroon opens nothing more.
    lsat = ask(door, "/episodes/ep2.mp3", Authorization="LSAT" + paid.authorization[4:])
    assert_spent(lsat, paid)


def test_single_use_is_one_request(door: Door) -> None:
    paid = buy(door, "/api/once/x")
    first = paid_get(door, "/api/once/x", paid)
    assert first.status_code == 200, first.text[:300]
    assert first.headers.get_list(BALANCE) == ["0 requests"]
    assert first.json() == {"path": "/api/once/x", "tier": "free"}
    replay = paid_get(door, "/api/once/x", paid)
    assert_spent(replay, paid)
    assert "this token is used" in replay.json()["message"]


def test_head_and_range_requests_count_too(door: Door) -> None:
    paid = buy(door, "/episodes/ep2.mp3")
    head = paid_get(door, "/episodes/ep2.mp3", paid, "HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers.get_list(BALANCE) == ["2 requests"]
    part = paid_get(door, "/episodes/ep2.mp3", paid, Range="bytes=0-9")
    assert part.status_code == 206 and len(part.content) == 10
    assert part.headers.get_list(BALANCE) == ["1 requests"]
    whole = paid_get(door, "/episodes/ep2.mp3", paid, Range="bytes=10-19")
    assert whole.status_code == 206 and whole.headers.get_list(BALANCE) == ["0 requests"]
    assert_spent(paid_get(door, "/episodes/ep2.mp3", paid, "HEAD"), paid, head=True)
    assert_spent(paid_get(door, "/episodes/ep2.mp3", paid, Range="bytes=0-9"), paid)


@pytest.mark.parametrize("door", ["nginx"], indirect=True)
def test_nginx_keeps_no_verdict_of_a_bundle_token(door: Door) -> None:
    """With --verdict-cache on, nginx keeps a plain token's grant (the cache is live) and never
    one of a bundle or a single-use token: each such request reaches serve-auth and draws."""
    plain = buy(door, "/bonus/b1")
    before = verdicts_kept(door)
    for _ in range(2):
        assert paid_get(door, "/bonus/b1", plain).status_code == 200
    assert verdicts_kept(door) == before + 1, (
        "the verdict cache is not on: this test proves nothing"
    )
    kept = verdicts_kept(door)
    bundle, once = buy(door, "/episodes/ep3.mp3"), buy(door, "/api/once/y")
    for left in (2, 1, 0):
        assert paid_get(door, "/episodes/ep3.mp3", bundle).headers.get_list(BALANCE) == [
            f"{left} requests"
        ]
    assert paid_get(door, "/api/once/y", once).status_code == 200
    assert_spent(paid_get(door, "/episodes/ep3.mp3", bundle), bundle)
    assert_spent(paid_get(door, "/api/once/y", once), once)
    assert verdicts_kept(door) == kept


# -- passes ----------------------------------------------------------------------------------


def test_a_pass_bought_at_one_service_opens_the_other(door: Door) -> None:
    paid = buy(door, "/episodes/ep1.mp3")
    # The pass is sold on podcast's terms (3 requests) and holds them wherever it is used:
    # articles sells no bundle, and still each request there draws from the pass.
    for name, left in (("b1", "2 requests"), ("b2", "1 requests")):
        opened = paid_get(door, f"/bonus/{name}", paid)
        assert opened.status_code == 200, opened.text[:300]
        assert opened.headers.get_list(BALANCE) == [left]
    assert paid_get(door, "/episodes/ep1.mp3", paid).headers.get_list(BALANCE) == ["0 requests"]
    assert paid_get(door, "/bonus/b1", paid).json()["reason"] == "spent"
    paid = buy(door, "/episodes/ep1.mp3")
    # Nothing beyond the pass: not single use, not a priced API.
    refused = paid_get(door, "/api/once/x", paid)
    assert_challenge(refused)
    assert refused.json()["reason"] == "wrong_service"
    # And an articles token is no pass.
    articles = buy(door, "/bonus/b1")
    assert paid_get(door, "/episodes/ep1.mp3", articles).json()["reason"] == "wrong_service"


# -- price functions ----------------------------------------------------------------------------


def test_a_quoted_price_is_in_the_invoice_and_the_body(door: Door) -> None:
    for sats in (37, 1234):
        query = "" if sats == 37 else f"?sats={sats}"
        response = ask(door, f"/api/quoted/x{query}")
        assert_challenge(response)
        macaroon, invoice = challenge(response)
        assert bolt11.decode(invoice).amount_msat == sats * 1000
        body = response.json()
        assert (body["price_sat"], body["message"]) == (sats, f"quoted costs {sats} sat")
        paid = Paid(macaroon, invoice, procs.dev_pay(door.home, invoice))
        granted = paid_get(door, "/api/quoted/other?sats=1", paid)
        assert granted.status_code == 200, granted.text[:300]


@pytest.mark.parametrize("path", ["/api/broken/x", "/api/nonsense/x"])
def test_a_failing_price_function_answers_503_and_the_door_goes_on(door: Door, path: str) -> None:
    for method in ("GET", "HEAD"):
        response = ask(door, path, method, **OPTED_IN)
        assert response.status_code == 503, (method, response.text[:300])
        assert int(response.headers["Retry-After"]) >= 1
        assert "WWW-Authenticate" not in response.headers
    assert_challenge(ask(door, "/api/quoted/x?sats=5"))
    assert ask(door, "/feed.xml").status_code == 200


def test_a_hanging_price_function_answers_503_and_the_door_keeps_serving(door: Door) -> None:
    """A plain function that sleeps (in a thread) and an async one that sleeps (on the loop)
    past the 5 s time box: each is answered 503, and while they hang the door answers others.
    (This test takes the engine's 5 s time box per door.)"""
    answered: list[str] = []
    slow: dict[str, httpx.Response] = {}

    def hang(path: str) -> None:
        slow[path] = ask(door, path)
        answered.append(path)

    threads = [
        threading.Thread(target=hang, args=(path,), name=f"slow {path}", daemon=True)
        for path in ("/api/slow/x", "/api/slow-async/x")
    ]
    for thread in threads:
        thread.start()
    try:
        # Asked while both quotes hang: the door (its event loop, its threads) is not held up.
        assert_challenge(ask(door, "/api/quoted/x?sats=3"))
        assert ask(door, "/feed.xml").status_code == 200
        answered.append("others")
    finally:
        for thread in threads:
            thread.join(timeout=procs.FETCH_TIMEOUT)
    assert answered[0] == "others", answered
    for path in ("/api/slow/x", "/api/slow-async/x"):
        assert slow[path].status_code == 503, (path, slow[path].text[:300])
        assert "WWW-Authenticate" not in slow[path].headers


# -- switching doors -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(rules: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[DoorKind, Door]]:
    """Every door at once, on one home (dev ledger) and one store: one deployment."""
    work = tmp_path_factory.mktemp("pricing-shared")
    home = work / "home"
    with (
        pricing_door("mitmproxy", work / "mitmproxy", home, rules) as mitmproxy,
        pricing_door("asgi", work / "asgi", home, rules) as asgi,
        pricing_door("nginx", work / "nginx", home, rules) as nginx,
    ):
        yield {"mitmproxy": mitmproxy, "asgi": asgi, "nginx": nginx}


def test_a_bundle_spent_at_one_door_is_spent_at_every_door(shared: dict[DoorKind, Door]) -> None:
    doors = list(shared.values())
    paid = buy(doors[0], "/episodes/ep1.mp3")
    for left, door in zip((2, 1, 0), doors, strict=True):
        response = paid_get(door, "/episodes/ep1.mp3", paid)
        assert response.headers.get_list(BALANCE) == [f"{left} requests"], door.kind
    for door in doors:
        assert_spent(paid_get(door, "/episodes/ep1.mp3", paid), paid)
    once = buy(shared["nginx"], "/api/once/x")
    assert paid_get(shared["asgi"], "/api/once/x", once).status_code == 200
    for door in doors:
        assert_spent(paid_get(door, "/api/once/x", once), once)


def test_the_last_unit_goes_once_when_every_door_asks_for_it_at_once(
    shared: dict[DoorKind, Door],
) -> None:
    """Three processes drawing from one SQLite file at the same moment."""
    bases = [door.base_url for door in shared.values()]
    home = shared["mitmproxy"].home
    for path in ("/api/once/race", "/episodes/ep3.mp3"):
        paid = buy_at(home, bases[0], path)
        answers = all_at_once(bases, path, paid, CLIENTS, 1)
        granted = 1 if path.startswith("/api/once/") else 3
        assert statuses(answers) == {200: granted, 402: CLIENTS - granted}, path


# -- scale-out: one bundle, two instances, one PostgreSQL ---------------------------------------


@pytest.fixture(scope="module")
def cluster(
    postgres: PostgresServer, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[str]]]:
    """Two mitmdump instances on one PostgreSQL database, the same rules and dev ledger:
    (home, [base URL A, base URL B])."""
    uri = asyncio.run(postgres.new_database())
    workdir = tmp_path_factory.mktemp("pricing-scale-out")
    home = workdir / "home"
    home.mkdir()
    origin = uvicorn(workdir, home, "l402proxy.origin_asgi:app")
    with running(origin):
        a = proxy_instance(workdir, home, "A", origin.url, rules, uri)
        b = proxy_instance(workdir, home, "B", origin.url, rules, uri)
        with running(a, b):
            yield home, [a.url, b.url]


def test_a_bundle_drawn_at_once_from_two_instances_gives_each_request_once(
    cluster: tuple[Path, list[str]],
) -> None:
    home, bases = cluster
    paid = buy_at(home, bases[0], "/api/metered/x")
    answers = all_at_once(bases, "/api/metered/x", paid, CLIENTS, REQUESTS_EACH)
    assert statuses(answers) == {200: BUNDLE, 402: CLIENTS * REQUESTS_EACH - BUNDLE}
    # Each unit handed out exactly once: the balances the grants state are 99 down to 0.
    left = sorted(int(a.headers[BALANCE].split()[0]) for a in answers if a.status_code == 200)
    assert left == list(range(BUNDLE))
    for answer in answers:
        if answer.status_code == 402:
            assert answer.headers.get_list(BALANCE) == ["0 requests"]
            assert answer.json()["reason"] == "spent"


def test_single_use_is_refused_on_replay_at_the_other_instance(
    cluster: tuple[Path, list[str]],
) -> None:
    home, bases = cluster
    for first, then in ((0, 1), (1, 0)):
        paid = buy_at(home, bases[first], "/api/once/x")
        with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
            used = http.get(
                bases[first] + "/api/once/x", headers={"Authorization": paid.authorization}
            )
            assert used.status_code == 200 and used.headers[BALANCE] == "0 requests"
            replay = http.get(
                bases[then] + "/api/once/x", headers={"Authorization": paid.authorization}
            )
        assert replay.status_code == 402 and replay.json()["reason"] == "spent"
        assert replay.headers[BALANCE] == "0 requests"
    # Replayed by many at once over both: one request goes through.
    paid = buy_at(home, bases[0], "/api/once/z")
    answers = all_at_once(bases, "/api/once/z", paid, CLIENTS, 1)
    assert statuses(answers) == {200: 1, 402: CLIENTS - 1}
