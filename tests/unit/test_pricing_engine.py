"""Issue 14's pricing models in the engine (engine/core.py), in process: a `price:` function's
quote in the challenge, bundles and single use drawn from the store, passes, and the pieces
behind them (caveats_for_pass, host_without_port, the PriceRequest view). Also a red-team pass:
what a client could do to get more than it paid for, and what an operator's mistake must not
give away."""

import asyncio
import contextlib
import hashlib
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import bolt11
import pytest

from l402proxy import paywall
from l402proxy.engine import Answer, Forward, Paywall, Request
from l402proxy.engine.answers import BALANCE_HEADER
from l402proxy.engine.core import caveats_for_pass, host_without_port, prices_out_of_range
from l402proxy.engine.events import Watcher
from l402proxy.engine.pricing import PriceRequest
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import (
    TokenError,
    attenuate,
    caveats_for,
    decode_macaroon,
    mint,
    verify,
)
from l402proxy.lightning import DevLedger
from l402proxy.lightning.base import NodeInfo
from l402proxy.rules import RuleSet, load_rules, parse_rules
from l402proxy.store import StoreError

HOST = "shop.example"
OPTED_IN = (b"Accept-Authenticate", b"L402")
BROWSER = (b"Accept", b"text/html,application/xhtml+xml")
# A price module next to the rules file: its functions read their price and record what they
# were asked through module globals, which the tests set (the module is imported once).
PRICE_MODULE = """
import asyncio
import time

price = 42
seen = []


def quote(request):
    seen.append(request)
    return price


def boom(request):
    raise KeyError("rate")


def garbage(request):
    return "lots"


async def later(request):
    await asyncio.sleep(0)
    return price + 1
"""
RULES = """
services:
  - name: podcast
    match: {{path: "/episodes/*"}}
    price_sat: 21
    bundle: {{requests: 3}}
    pass: {{name: premium, services: [podcast, articles]}}
  - name: articles
    match: {{path: "/articles/*"}}
    price_sat: 10
  - name: once
    match: {{path: "/once/*"}}
    price_sat: 5
    single_use: true
  - name: quoted
    match: {{path: "/quoted/*"}}
    price: python:{module}:quote
  - name: quoted_once
    match: {{path: "/quoted-once/*"}}
    price: python:{module}:later
    single_use: true
  - name: broken
    match: {{path: "/broken/*"}}
    price: python:{module}:boom
  - name: nonsense
    match: {{path: "/nonsense/*"}}
    price: python:{module}:garbage
  - name: upgraded
    match: {{path: "/up/*"}}
    mode: upgrade
    price_sat: 7
    single_use: true
    paid: {{set_headers: {{X-Upgraded: "1"}}}}
  - name: other
    match: {{path: "/other/*"}}
    price_sat: 3
"""


@contextlib.contextmanager
def price_module(directory: Path) -> Iterator[str]:
    """PRICE_MODULE under a name of its own in `directory` (a module is imported once per
    process, and one of the same name from another directory is refused); forgotten after."""
    name = f"pricing_engine_{secrets.token_hex(6)}"
    (directory / f"{name}.py").write_text(PRICE_MODULE)
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


@contextlib.asynccontextmanager
async def paywall_on(tmp_path: Path, text: str) -> AsyncIterator[Paywall]:
    """An open engine on the dev ledger and a SQLite store under tmp_path, with `text` as its
    rules file (tmp_path/rules.yaml); closed after."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    engine = Paywall()
    engine.use_rules_file(str(rules))
    engine.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    engine.store_uri = str(tmp_path / "server.sqlite")
    await engine.open()
    try:
        yield engine
    finally:
        await engine.close()


@pytest.fixture
def module(tmp_path: Path) -> Iterator[str]:
    with price_module(tmp_path) as name:
        yield name


@pytest.fixture
async def engine(tmp_path: Path, module: str) -> AsyncIterator[Paywall]:
    async with paywall_on(tmp_path, RULES.format(module=module)) as opened:
        yield opened


def request(
    path: str, *fields: tuple[bytes, bytes], method: str = "GET", client: str = "127.0.0.1"
) -> Request:
    return Request(
        method=method,
        target=path,
        host=HOST,
        fields=((b"Host", HOST.encode()), *fields),
        client=(client, 5000),
    )


def header(answer: Answer, name: str) -> list[str]:
    return [v.decode() for k, v in answer.headers if k.lower() == name.lower().encode()]


def challenge_of(answer: object, status: int = 402) -> tuple[str, str]:
    """(macaroon, invoice) of a challenge answer."""
    assert isinstance(answer, Answer), answer
    assert answer.status == status, (answer.status, answer.body[:300])
    found = parse_challenges(header(answer, "WWW-Authenticate"))[0]
    return found.macaroon, found.invoice


async def pay(tmp_path: Path, invoice: str) -> bytes:
    payer = DevLedger(tmp_path / "devledger.sqlite")
    try:
        return (await payer.pay("listener", invoice, 0)).preimage
    finally:
        await payer.close()


async def invoices(tmp_path: Path) -> int:
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        return len(await ledger.list_invoices())
    finally:
        await ledger.close()


async def buy(engine: Paywall, tmp_path: Path, path: str) -> bytes:
    """An Authorization value bought at `path` (the dev ledger pays the 402's invoice)."""
    macaroon, invoice = challenge_of(await engine.handle(request(path, OPTED_IN)))
    return format_credential([macaroon], await pay(tmp_path, invoice)).encode()


def token_id(authorization: bytes) -> bytes:
    macaroon = authorization.decode().split()[1].split(":")[0]
    return Identifier.decode(decode_macaroon(macaroon).identifier_bytes).token_id


def granted(outcome: object, balance: str | None = None) -> Forward:
    """The paid variant, with `balance` as what the door is told to send as X-L402-Balance."""
    assert isinstance(outcome, Forward), outcome
    assert outcome.note is not None and outcome.note["variant"] == "paid", outcome.note
    assert outcome.note.get("balance") == balance, outcome.note
    return outcome


def spent(outcome: object, unit: str = "requests") -> Answer:
    """The fresh challenge a spent bundle gets: 402, reason spent, X-L402-Balance: 0."""
    assert isinstance(outcome, Answer), outcome
    assert outcome.status == 402, (outcome.status, outcome.body[:300])
    assert outcome.note is not None and outcome.note["reason"] == "spent", outcome.note
    assert header(outcome, BALANCE_HEADER) == [f"0 {unit}"]
    return outcome


# -- the pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "bare"),
    [
        ("example.com", "example.com"),
        ("example.com:8080", "example.com"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # a bare IPv6 address: its last group is no port
        ("2001:db8::8080", "2001:db8::8080"),
        ("example.com:http", "example.com:http"),  # no port: left as it is
        ("", ""),
    ],
)
def test_host_without_port(host: str, bare: str) -> None:
    assert host_without_port(host) == bare


def rules_of(text: str) -> RuleSet:
    return parse_rules(text, "test.yaml")


PASS_RULES = """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    valid_for: 1h
    capabilities: [listen]
    pass: {name: premium, services: [articles, podcast, video], valid_for: 30d}
  - name: articles
    match: {path: "/articles/*"}
    price_sat: 10
  - name: video
    match: {path: "/video/*"}
    price_sat: 10
  - name: solo
    match: {path: "/solo/*"}
    price_sat: 10
    capabilities: [read]
"""


def test_caveats_for_pass_is_caveats_for_without_a_pass() -> None:
    solo = rules_of(PASS_RULES).rules[3]
    for valid_until in (None, 1_900_000_000):
        assert caveats_for_pass(solo, valid_until) == caveats_for(
            "solo", valid_until=valid_until, capabilities=("read",)
        )


def test_caveats_for_pass_names_the_seller_first_and_every_service_until_the_end() -> None:
    podcast = rules_of(PASS_RULES).rules[0]
    caveats = caveats_for_pass(podcast, 1_900_000_000)
    assert caveats == [
        # The seller first, whatever order the file lists the pass's services in.
        "services=podcast:0,articles:0,video:0",
        "podcast_capabilities=listen",  # the seller's own capabilities, for itself only
        "podcast_valid_until=1900000000",
        "articles_valid_until=1900000000",
        "video_valid_until=1900000000",
    ]
    assert caveats_for_pass(podcast, None) == [
        "services=podcast:0,articles:0,video:0",
        "podcast_capabilities=listen",
    ]


def test_a_pass_token_opens_each_listed_service_until_it_ends_and_nothing_else() -> None:
    podcast = rules_of(PASS_RULES).rules[0]
    key = secrets.token_bytes(32)
    preimage = secrets.token_bytes(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    ends = int(time.time()) + 3600
    macaroon = mint(key, identifier, caveats_for_pass(podcast, ends))
    for service in ("podcast", "articles", "video"):
        token = verify(macaroon, preimage, key, service=service, now=time.time())
        assert token.valid_until == ends, service
    with pytest.raises(TokenError) as refused:
        verify(macaroon, preimage, key, service="solo", now=time.time())
    assert refused.value.reason == "wrong_service"
    for service in ("podcast", "articles"):
        with pytest.raises(TokenError) as late:
            verify(macaroon, preimage, key, service=service, now=ends + 1)
        assert late.value.reason == "expired", service


def test_prices_out_of_range_skips_price_functions(tmp_path: Path, module: str) -> None:
    (tmp_path / "rules.yaml").write_text(RULES.format(module=module))
    rules = load_rules(tmp_path / "rules.yaml")
    address = NodeInfo("lnurl", "alice@example.com", invoice_range_msat=(6_000, 20_000))
    problems = prices_out_of_range(rules, address)
    # Fixed prices outside 6..20 sat are named (podcast 21, once 5, other 3); the price:
    # functions (price_sat 0) are not: their quotes are checked one by one.
    assert sorted(problem.split("'")[1] for problem in problems) == ["once", "other", "podcast"]
    assert prices_out_of_range(rules, NodeInfo("dev", "x")) == []


# -- the price request view --------------------------------------------------------------------


async def test_the_price_view_of_a_request(engine: Paywall, module: str) -> None:
    seen: list[PriceRequest] = sys.modules[module].seen
    answer = await engine.handle(
        Request(
            method="get",
            target="/quoted/a%20b?x=1&y=2",
            host=f"{HOST}:8443",  # a door gives it without the port; the view never has one
            fields=(
                (b"Host", f"{HOST}:8443".encode()),
                (b"User-Agent", b"test"),
                (b"Accept", b"a/b"),
                (b"accept", b"c/d"),
                OPTED_IN,
            ),
            client=("192.0.2.9", 1234),
        )
    )
    challenge_of(answer)
    view = seen[-1]
    assert (view.method, view.host, view.path, view.query) == (
        "GET",
        HOST,
        "/quoted/a%20b",
        "x=1&y=2",
    )
    assert (view.client_ip, view.rule) == ("192.0.2.9", "quoted")
    assert view.headers["user-agent"] == "test" and view.headers["Accept"] == "a/b, c/d"


async def test_the_price_view_never_holds_a_credential_of_ours(
    engine: Paywall, module: str
) -> None:
    """The price function is the operator's code, as the origin is: it gets no L402/LSAT
    Authorization and none of our cookies (a live token of another service, a claim), as the
    origin never does; the origin's Basic and cookies stay."""
    seen: list[PriceRequest] = sys.modules[module].seen
    live = "L402_articles=bWFj:" + "ab" * 32
    claim = "L402claim.0011223344556677=cd"
    for scheme in (b"L402", b"LSAT", b"l402"):
        answer = await engine.handle(
            request(
                "/quoted/x",
                (b"Authorization", scheme + b" garbage:00"),
                (b"Authorization", b"Basic dTpw"),
                (b"Cookie", f"theme=dark; {live}; {claim}".encode()),
            )
        )
        challenge_of(answer, 401)
        view = seen[-1]
        assert view.headers["authorization"] == "Basic dTpw", scheme
        assert view.headers["cookie"] == "theme=dark", scheme
        assert "garbage" not in repr(view.headers) and "L402_" not in repr(view.headers)


async def test_the_price_view_reads_the_client_through_trusted_proxies(
    tmp_path: Path, module: str
) -> None:
    text = "trusted_proxies: [127.0.0.1]\n" + RULES.format(module=module)
    async with paywall_on(tmp_path, text) as engine:
        seen: list[PriceRequest] = sys.modules[module].seen
        forwarded = (b"X-Forwarded-For", b"198.51.100.1, 203.0.113.7")
        challenge_of(await engine.handle(request("/quoted/x", forwarded)))
        assert seen[-1].client_ip == "203.0.113.7"
        # Not from an untrusted peer: its X-Forwarded-For is the client's own word.
        challenge_of(await engine.handle(request("/quoted/x", forwarded, client="192.0.2.1")))
        assert seen[-1].client_ip == "192.0.2.1"


# -- dynamic prices ---------------------------------------------------------------------------


class Sales(Watcher):
    """A watcher of the sales the engine records (the other events: Watcher's no-ops)."""

    def __init__(self, sales: list[tuple[str, int]]) -> None:
        self.sales = sales

    def settled(self, door: str, service: str, price_sat: int) -> None:
        self.sales.append((service, price_sat))


async def test_a_quoted_price_is_in_the_invoice_the_body_and_the_sale(
    engine: Paywall, module: str, tmp_path: Path
) -> None:
    prices = sys.modules[module]
    sales: list[tuple[str, int]] = []
    engine.watchers.add(Sales(sales))
    for price in (42, 1234):
        prices.price = price
        answer = await engine.handle(request("/quoted/x"))
        macaroon, invoice = challenge_of(answer)
        assert bolt11.decode(invoice).amount_msat == price * 1000
        assert isinstance(answer, Answer)
        body = answer.body.decode()
        assert f'"price_sat": {price}' in body and f"quoted costs {price} sat" in body
        preimage = await pay(tmp_path, invoice)
        credential = format_credential([macaroon], preimage).encode()
        granted(await engine.handle(request("/quoted/x", (b"Authorization", credential))))
    # What each token was sold for (revenue, listings), once the sales are written.
    await engine._flush()
    assert sorted(sales) == [("quoted", 42), ("quoted", 1234)]
    # An async function too, with its single use.
    answer = await engine.handle(request("/quoted-once/x"))
    assert bolt11.decode(challenge_of(answer)[1]).amount_msat == (prices.price + 1) * 1000


async def test_a_token_request_never_calls_the_price_function(
    engine: Paywall, module: str, tmp_path: Path
) -> None:
    seen: list[PriceRequest] = sys.modules[module].seen
    token = await buy(engine, tmp_path, "/quoted/x")
    asked = len(seen)
    for _ in range(3):
        granted(await engine.handle(request("/quoted/y", (b"Authorization", token))))
    assert len(seen) == asked


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/broken/x", "raised KeyError: 'rate'"),
        ("/nonsense/x", "returned 'lots' (str); a price is a whole number of sats"),
    ],
)
async def test_a_failing_price_function_is_a_503_naming_the_rule(
    engine: Paywall,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    path: str,
    problem: str,
) -> None:
    before = await invoices(tmp_path)
    with caplog.at_level(logging.ERROR, logger="l402proxy"):
        for method in ("GET", "HEAD"):
            answer = await engine.handle(request(path, OPTED_IN, method=method))
            assert isinstance(answer, Answer) and answer.status == 503, answer
            assert header(answer, "Retry-After") and not header(answer, "WWW-Authenticate")
            assert answer.note is not None and answer.note["reason"] == "price"
    service = path.split("/")[1]
    lines = [r.getMessage() for r in caplog.records if f"service '{service}'" in r.getMessage()]
    assert lines and "rules.yaml:" in lines[0] and problem in lines[0], lines
    assert await invoices(tmp_path) == before  # nothing sold
    # The rest of the paywall goes on.
    challenge_of(await engine.handle(request("/other/x")))


async def test_a_price_outside_a_lightning_address_range_is_a_503(
    engine: Paywall, module: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Lightning Address invoices only between its min and max: a fixed price is checked at
    start, a quoted one on each quote."""
    engine.node = NodeInfo("lnurl", "alice@example.com", invoice_range_msat=(10_000, 100_000))
    prices = sys.modules[module]
    prices.price = 101
    with caplog.at_level(logging.ERROR, logger="l402proxy"):
        answer = await engine.handle(request("/quoted/x"))
    assert isinstance(answer, Answer) and answer.status == 503
    assert "asked 101 sat, but lnurl at alice@example.com accepts 10 to 100 sat" in caplog.text
    prices.price = 100
    assert bolt11.decode(
        challenge_of(await engine.handle(request("/quoted/x")))[1]
    ).amount_msat == (100_000)


async def test_a_price_module_missing_at_reload_keeps_the_rules_in_force(
    tmp_path: Path, module: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An edit naming a module that is not there is refused in one line; what was in force,
    price function included, stays."""
    async with paywall_on(tmp_path, RULES.format(module=module)) as engine:
        before = engine.rules
        broken = RULES.format(module=module).replace(f"python:{module}:quote", "python:gone:quote")
        (tmp_path / "rules.yaml").write_text(broken + "\n")
        with caplog.at_level(logging.WARNING, logger="l402proxy"):
            await engine.reload_rules_if_changed()
        assert engine.rules is before
        assert "kept the previous rules" in caplog.text and "cannot import module 'gone'" in (
            caplog.text
        )
        sys.modules[module].price = 9
        assert bolt11.decode(
            challenge_of(await engine.handle(request("/quoted/x")))[1]
        ).amount_msat == (9_000)


# -- bundles and single use ------------------------------------------------------------------


async def test_a_bundle_of_three_is_three_requests_then_a_fresh_challenge(
    engine: Paywall, tmp_path: Path
) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    old_macaroon = token.decode().split()[1].split(":")[0]
    for left in (2, 1, 0):
        outcome = granted(
            await engine.handle(request("/episodes/x", (b"Authorization", token))),
            f"{left} requests",
        )
        # Never a verdict a door (nginx) or the engine may give again without counting.
        assert outcome.note is not None and "reusable_until" not in outcome.note
    assert len(engine.verdicts) == 0
    answer = spent(await engine.handle(request("/episodes/x", (b"Authorization", token))))
    macaroon, _ = challenge_of(answer)
    assert macaroon != old_macaroon
    assert b"spent (it held 3 requests)" in answer.body
    assert await engine.store.balance_of(token_id(token)) == 0  # type: ignore[union-attr]
    # Spent means spent: in any spelling, beside an origin's Basic, with HEAD.
    for fields in (
        ((b"authorization", b"LSAT" + token[4:]),),
        ((b"Authorization", b"Basic dTpw"), (b"Authorization", token)),
    ):
        spent(await engine.handle(request("/episodes/y", *fields)))
    spent(await engine.handle(request("/episodes/x", (b"Authorization", token), method="HEAD")))


async def test_head_and_range_requests_draw_too(engine: Paywall, tmp_path: Path) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    auth = (b"Authorization", token)
    granted(await engine.handle(request("/episodes/x", auth, method="HEAD")), "2 requests")
    granted(
        await engine.handle(request("/episodes/x", auth, (b"Range", b"bytes=0-9"))), "1 requests"
    )
    granted(
        await engine.handle(request("/episodes/x", auth, (b"Range", b"bytes=0-9"))), "0 requests"
    )
    spent(await engine.handle(request("/episodes/x", auth, (b"Range", b"bytes=0-9"))))


async def test_single_use_is_one_request(engine: Paywall, tmp_path: Path) -> None:
    token = await buy(engine, tmp_path, "/once/x")
    granted(await engine.handle(request("/once/x", (b"Authorization", token))), "0 requests")
    answer = spent(await engine.handle(request("/once/x", (b"Authorization", token))))
    assert b"this token is used" in answer.body


async def test_the_last_unit_goes_to_one_request_of_many_at_once(
    engine: Paywall, tmp_path: Path
) -> None:
    token = await buy(engine, tmp_path, "/once/x")
    outcomes = await asyncio.gather(
        *(engine.handle(request(f"/once/{n}", (b"Authorization", token))) for n in range(20))
    )
    assert sum(isinstance(outcome, Forward) for outcome in outcomes) == 1
    assert all(
        isinstance(outcome, Answer) and outcome.status == 402
        for outcome in outcomes
        if not isinstance(outcome, Forward)
    )


async def test_a_bundle_grant_is_never_kept_and_a_kept_grant_never_outlives_a_new_bundle(
    tmp_path: Path, module: str
) -> None:
    """The engine keeps plain grants (engine/verdicts.py); a rules edit that puts a bundle on
    the service makes the next identical request draw."""
    text = RULES.format(module=module)
    async with paywall_on(tmp_path, text) as engine:
        token = await buy(engine, tmp_path, "/other/x")
        for _ in range(2):
            granted(await engine.handle(request("/other/x", (b"Authorization", token))))
        assert len(engine.verdicts) == 1
        metered = text.replace("price_sat: 3\n", "price_sat: 3\n    bundle: {requests: 1}\n")
        (tmp_path / "rules.yaml").write_text(metered)
        await engine.reload_rules_if_changed()
        assert engine.rules is not None and engine.rules.rules[-1].bundle is not None
        granted(await engine.handle(request("/other/x", (b"Authorization", token))), "0 requests")
        spent(await engine.handle(request("/other/x", (b"Authorization", token))))


async def test_a_rules_edit_never_refills_a_bundle(tmp_path: Path, module: str) -> None:
    """The balance is the store's: a bigger bundle in the file applies to tokens not yet used,
    never to what a token has left (or had: a spent one stays spent)."""
    text = RULES.format(module=module)
    async with paywall_on(tmp_path, text) as engine:
        token = await buy(engine, tmp_path, "/episodes/x")
        spent_token = await buy(engine, tmp_path, "/episodes/y")
        for left in (2, 1, 0):
            granted(
                await engine.handle(request("/episodes/y", (b"Authorization", spent_token))),
                f"{left} requests",
            )
        granted(
            await engine.handle(request("/episodes/x", (b"Authorization", token))), "2 requests"
        )
        (tmp_path / "rules.yaml").write_text(text.replace("{requests: 3}", "{requests: 100}"))
        await engine.reload_rules_if_changed()
        assert engine.rules is not None and engine.rules.rules[0].bundle is not None
        assert engine.rules.rules[0].bundle.size == 100
        granted(
            await engine.handle(request("/episodes/x", (b"Authorization", token))), "1 requests"
        )
        spent(await engine.handle(request("/episodes/y", (b"Authorization", spent_token))))
        fresh = await buy(engine, tmp_path, "/episodes/z")
        granted(
            await engine.handle(request("/episodes/z", (b"Authorization", fresh))), "99 requests"
        )


# -- failures: fail closed ---------------------------------------------------------------------


async def test_a_store_that_cannot_draw_is_a_503_and_nothing_is_forwarded(
    engine: Paywall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    plain = await buy(engine, tmp_path, "/other/x")
    assert engine.store is not None

    async def unreachable(token_id: bytes, size: int, amount: int) -> int | None:
        raise StoreError("database unreachable")

    monkeypatch.setattr(engine.store, "draw", unreachable)
    for method in ("GET", "HEAD"):
        answer = await engine.handle(
            request("/episodes/x", (b"Authorization", token), method=method)
        )
        assert isinstance(answer, Answer) and answer.status == 503, answer
        assert header(answer, "Retry-After") and answer.note is not None
        assert answer.note["reason"] == "store" and not header(answer, BALANCE_HEADER)
    # A token without a bundle never asks the store.
    granted(await engine.handle(request("/other/x", (b"Authorization", plain))))
    monkeypatch.undo()
    granted(await engine.handle(request("/episodes/x", (b"Authorization", token))), "2 requests")


# -- dry run -------------------------------------------------------------------------------------


async def test_a_dry_run_draws_nothing_and_says_what_a_draw_would_leave(
    engine: Paywall, tmp_path: Path
) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    granted(await engine.handle(request("/episodes/x", (b"Authorization", token))), "2 requests")
    engine.dry_run_option = True
    for _ in range(5):
        outcome = granted(
            await engine.handle(request("/episodes/x", (b"Authorization", token))), "1 requests"
        )
        assert outcome.note is not None and outcome.note["dry_run"] == "grant"
    assert await engine.store.balance_of(token_id(token)) == 2  # type: ignore[union-attr]


async def test_a_dry_run_pretends_the_challenge_of_a_spent_bundle_without_selling(
    engine: Paywall, tmp_path: Path, module: str
) -> None:
    """A dry run forwards what it would refuse and mints nothing: no invoice for a spent
    bundle either (a challenge made in a dry run is never answered, only counted), and no
    price function called."""
    token = await buy(engine, tmp_path, "/once/x")
    quoted = await buy(engine, tmp_path, "/quoted-once/x")
    for authorization, path in ((token, "/once/x"), (quoted, "/quoted-once/x")):
        granted(await engine.handle(request(path, (b"Authorization", authorization))), "0 requests")
    engine.dry_run_option = True
    seen: list[PriceRequest] = sys.modules[module].seen
    asked, before = len(seen), await invoices(tmp_path)
    for authorization, path in ((token, "/once/x"), (quoted, "/quoted-once/x")):
        outcome = await engine.handle(request(path, (b"Authorization", authorization)))
        assert isinstance(outcome, Forward) and outcome.note is not None, outcome
        assert outcome.note["dry_run"] == "challenge" and outcome.note["reason"] == "spent"
        assert outcome.note["dry_status"] == 402
    assert await invoices(tmp_path) == before
    assert len(seen) == asked


async def test_a_dry_run_of_an_unused_bundle_says_it_holds_all_but_this_request(
    engine: Paywall, tmp_path: Path
) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    engine.dry_run_option = True
    for _ in range(4):
        granted(
            await engine.handle(request("/episodes/x", (b"Authorization", token))), "2 requests"
        )
    assert await engine.store.balance_of(token_id(token)) is None  # type: ignore[union-attr]


# -- cookies ------------------------------------------------------------------------------------


async def cookie_of(engine: Paywall, tmp_path: Path, path: str, service: str) -> bytes:
    authorization = await buy(engine, tmp_path, path)
    return f"a=1; L402_{service}={authorization.decode().split()[1]}".encode()


async def test_a_spent_cookie_in_upgrade_mode_gets_the_free_variant_and_is_cleared(
    engine: Paywall, tmp_path: Path
) -> None:
    cookie = (b"Cookie", await cookie_of(engine, tmp_path, "/up/x", "upgraded"))
    first = granted(await engine.handle(request("/up/x", cookie, BROWSER)), "0 requests")
    assert (b"Cookie", b"a=1") in first.headers and (b"X-Upgraded", b"1") in first.headers
    free = await engine.handle(request("/up/x", cookie, BROWSER))
    assert isinstance(free, Forward) and free.note is not None, free
    assert free.note["variant"] == "free"
    cleared = free.note["clear_cookies"]
    assert cleared and all(c.startswith("L402_upgraded=;") and "Max-Age=0" in c for c in cleared)
    assert (b"Cookie", b"a=1") in free.headers and b"L402_" not in repr(free.headers).encode()
    # As for any stale cookie, a page gets the offer to upgrade (the banner): upgrade mode
    # sells there, and a browser whose bundle ran out is the likeliest buyer.
    assert engine.rules is not None and engine.rules.rules[7].name == "upgraded"
    assert free.note["offer"] == paywall.upgrade_banner(engine.rules.rules[7], "/up/x")
    engine.offer_upgrade = False
    plain = await engine.handle(request("/up/x", cookie, BROWSER))
    assert isinstance(plain, Forward) and plain.note is not None and "offer" not in plain.note
    # A client that says it pays gets the fresh challenge, and the cookie cleared too.
    answer = spent(await engine.handle(request("/up/x", cookie, OPTED_IN)))
    assert [c for c in header(answer, "Set-Cookie") if c.startswith("L402_upgraded=;")] == cleared


async def test_a_spent_cookie_in_paywall_mode_gets_the_challenge_and_is_cleared(
    engine: Paywall, tmp_path: Path
) -> None:
    cookie = (b"Cookie", await cookie_of(engine, tmp_path, "/once/x", "once"))
    granted(await engine.handle(request("/once/x", cookie)), "0 requests")
    answer = spent(await engine.handle(request("/once/x", cookie, BROWSER)))
    assert any(c.startswith("L402_once=;") for c in header(answer, "Set-Cookie"))
    assert header(answer, "Content-Type")[0].startswith("text/html")


# -- passes ------------------------------------------------------------------------------------


async def test_a_pass_bought_at_one_service_opens_the_other_and_no_third(
    engine: Paywall, tmp_path: Path
) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    # The pass is sold on podcast's terms (3 requests): they hold wherever it is used, also
    # at articles, which sells no bundle itself (else a bundled pass were unlimited there).
    granted(await engine.handle(request("/articles/a", (b"Authorization", token))), "2 requests")
    granted(await engine.handle(request("/episodes/x", (b"Authorization", token))), "1 requests")
    granted(await engine.handle(request("/articles/b", (b"Authorization", token))), "0 requests")
    spent(await engine.handle(request("/articles/a", (b"Authorization", token))))
    assert await engine.store.balance_of(token_id(token)) == 0  # type: ignore[union-attr]
    token = await buy(engine, tmp_path, "/episodes/x")
    for path in ("/other/x", "/once/x", "/quoted/x"):
        answer = await engine.handle(request(path, (b"Authorization", token)))
        assert isinstance(answer, Answer) and answer.status == 402, path
        assert answer.note is not None and answer.note["reason"] == "wrong_service", path
    # And a token of articles alone opens no podcast.
    articles = await buy(engine, tmp_path, "/articles/a")
    refused = await engine.handle(request("/episodes/x", (b"Authorization", articles)))
    assert isinstance(refused, Answer) and refused.status == 402


async def test_copies_of_a_bundle_token_share_its_balance(engine: Paywall, tmp_path: Path) -> None:
    """A holder may attenuate a token into as many distinct credentials as it likes (each
    its own Authorization value, its own cache entries): they are one token, one balance."""
    token = await buy(engine, tmp_path, "/episodes/x")
    macaroon, preimage = token.decode().split()[1].split(":")
    narrower = [attenuate(macaroon, [f"podcast_valid_until={2_000_000_000 + n}"]) for n in range(3)]
    copies = [token] + [f"L402 {copy}:{preimage}".encode() for copy in narrower]
    outcomes = [await engine.handle(request("/episodes/x", (b"Authorization", c))) for c in copies]
    assert sum(isinstance(outcome, Forward) for outcome in outcomes) == 3
    spent(outcomes[-1])
    # A copy that narrows the pass to articles alone still is the same token, on the same
    # (spent) terms it was sold on.
    narrowed = attenuate(macaroon, ["services=articles:0"])
    spent(await engine.handle(request("/episodes/x", (b"Authorization", copies[1]))))
    spent(
        await engine.handle(
            request("/articles/a", (b"Authorization", f"L402 {narrowed}:{preimage}".encode()))
        )
    )


async def test_a_request_refused_by_a_limit_draws_nothing(tmp_path: Path, module: str) -> None:
    limit = "    rate_limits: [{requests: 1, per: 1h, burst: 1, key: token}]\n"
    text = RULES.format(module=module).replace(
        "    bundle: {requests: 3}\n", "    bundle: {requests: 3}\n" + limit
    )
    async with paywall_on(tmp_path, text) as engine:
        token = await buy(engine, tmp_path, "/episodes/x")
        granted(
            await engine.handle(request("/episodes/x", (b"Authorization", token))), "2 requests"
        )
        for _ in range(3):
            limited = await engine.handle(request("/episodes/x", (b"Authorization", token)))
            assert isinstance(limited, Answer) and limited.status == 429
        assert await engine.store.balance_of(token_id(token)) == 2  # type: ignore[union-attr]


async def test_a_revoked_or_expired_bundle_token_draws_nothing(
    engine: Paywall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await buy(engine, tmp_path, "/episodes/x")
    engine.revoked.add(token_id(token))
    refused = await engine.handle(request("/episodes/x", (b"Authorization", token)))
    assert isinstance(refused, Answer) and refused.note is not None
    assert refused.note["reason"] == "revoked" and not header(refused, BALANCE_HEADER)
    assert await engine.store.balance_of(token_id(token)) is None  # type: ignore[union-attr]


# Two bundled services on one pass: which bundle does the token hold?
PASS_BUNDLES = """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    bundle: {requests: 3}
    pass: {name: premium, services: [podcast, articles]}
  - name: articles
    match: {path: "/articles/*"}
    price_sat: 500
    bundle: {requests: 10}
    pass: {name: reader, services: [articles, podcast]}
"""


@pytest.mark.parametrize(
    ("bought", "size", "used_first", "then"),
    [
        ("/episodes/x", 3, "/articles/a", "/episodes/x"),
        ("/articles/a", 10, "/episodes/x", "/articles/a"),
    ],
    ids=["sold-by-podcast", "sold-by-articles"],
)
async def test_a_pass_holds_the_bundle_its_seller_sold_wherever_it_is_used_first(
    tmp_path: Path, bought: str, size: int, used_first: str, then: str
) -> None:
    """The balance row starts at the size of the first draw: were it the service where the
    pass is used first, a 3-request pass bought at podcast for 21 sat would hold articles'
    10 requests (worth 500 sat) by being used there first, and a 10-request one bought at
    articles only 3 by being used at podcast first. It holds what its seller sold."""
    async with paywall_on(tmp_path, PASS_BUNDLES) as engine:
        token = await buy(engine, tmp_path, bought)
        auth = (b"Authorization", token)
        granted(await engine.handle(request(used_first, auth)), f"{size - 1} requests")
        for left in range(size - 2, -1, -1):
            granted(await engine.handle(request(then, auth)), f"{left} requests")
        spent(await engine.handle(request(used_first, auth)))
        spent(await engine.handle(request(then, auth)))


async def test_the_pay_page_quotes_the_address_it_sells(engine: Paywall, module: str) -> None:
    """A price function that prices by path (the README's mypricing.quote does) must be asked
    about the path the page sells, not about /.l402/pay: else every path of the service sells
    at the page's price."""
    seen: list[PriceRequest] = sys.modules[module].seen
    answer = await engine.handle(request("/.l402/pay?path=/quoted/bulk/1%3Fsize%3D9", BROWSER))
    assert isinstance(answer, Answer) and answer.status == 402, (answer.status, answer.body[:300])
    assert (seen[-1].path, seen[-1].query) == ("/quoted/bulk/1", "size=9")


async def test_a_pass_unlocked_in_a_browser_is_a_cookie_of_the_service_that_sold_it(
    tmp_path: Path, module: str
) -> None:
    """The paywall page sells the pass at podcast; its unlock must set podcast's cookie (the
    page goes back to a podcast path), even when the file lists articles first."""
    text = RULES.format(module=module)
    articles = '  - name: articles\n    match: {path: "/articles/*"}\n    price_sat: 10\n'
    assert articles in text
    reordered = text.replace(articles, "").replace("services:\n", "services:\n" + articles, 1)
    async with paywall_on(tmp_path, reordered) as engine:
        assert engine.rules is not None and engine.rules.rules[0].name == "articles"
        macaroon, invoice = challenge_of(await engine.handle(request("/episodes/x", BROWSER)))
        preimage = await pay(tmp_path, invoice)
        body = f'{{"macaroon": "{macaroon}", "preimage": "{preimage.hex()}"}}'.encode()
        unlocked = await engine.handle(
            Request(
                method="POST",
                target="/.l402/unlock",
                host=HOST,
                fields=((b"Host", HOST.encode()), (b"Content-Type", b"application/json")),
                body=body,
            )
        )
        assert isinstance(unlocked, Answer) and unlocked.status == 200, unlocked
        assert b'"service": "podcast"' in unlocked.body
        cookie = header(unlocked, "Set-Cookie")[0]
        assert cookie.startswith(f"L402_podcast={macaroon}:") and "Path=/episodes/" in cookie
        opened = request("/episodes/x", (b"Cookie", cookie.split(";", 1)[0].encode()))
        granted(await engine.handle(opened), "2 requests")
