# ruff: noqa: F811
"""The client side of issue 14: bundles and single use (X-L402-Balance, wire facts 1 and 2) and
passes (wire fact 3).

The payer is driven the way the client addon and the SDK drive it, against the contract's
stand-in server (tests/bundle_origin.py) called without HTTP, with a real dev ledger and a real
client store in tmp_path; the SDK is then run over HTTP against the same stand-in served on
127.0.0.1. What was paid is read from the dev ledger itself.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import pytest
from mitmproxy import flow
from mitmproxy import http as mhttp
from mitmproxy.test import taddons

from l402proxy.client import TOKEN_KEY, L402Client
from l402proxy.l402.headers import format_challenge, parse_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import mint
from l402proxy.lightning import DevLedger, DevWallet, LightningError, PaymentFailed, PaymentResult
from l402proxy.lightning.nwc import WalletRefused
from l402proxy.payer import (
    BALANCE_HEADER,
    REFUSAL_CODES,
    Answer,
    Await,
    Balance,
    Limits,
    Paid,
    Payer,
    Refused,
    Token,
    Verdict,
    about_token,
    parse_balance,
    refusal_code,
    scope_services,
    service_expiries,
    split_url,
)
from l402proxy.sdk import L402Auth
from l402proxy.store.client import MIGRATIONS, BudgetRefusal, ClientStore, NewPayment, Payment
from l402proxy.store.database import StoreError
from tests.bundle_origin import Answer as ServerAnswer
from tests.bundle_origin import ContractServer, Service, bundle_origin, bundle_origin_thread
from tests.unit.test_client_addon import Body, flow_to, load

# test_payer's fixtures (a real dev ledger and client store in tmp_path), used by name: pytest
# finds a fixture under the name it has here, hence F811 on the test functions' arguments.
from tests.unit.test_payer import (  # noqa: F401
    LISTENER,
    Clock,
    FakeWallet,
    PayerFactory,
    Shop,
    clock,
    flushed,
    ledger_path,
    make_payer,
    shop,
    store,
    store_path,
)

ORIGIN = "http://127.0.0.1:8081"
PRICE_MSAT = 21_000
NOW = 1_700_000_000.0

PODCAST = Service("podcast", bundle=3)
SINGLE = Service("api", bundle=1)
# A pass: podcast's 402 sells a token for podcast and articles; articles sells only itself.
PASS_PODCAST = Service("podcast", sells=("podcast", "articles"))
ARTICLES = Service("articles")


# --- X-L402-Balance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["99 requests"], Balance(99, "requests")),
        (["0 requests"], Balance(0, "requests")),
        (["500000000 bytes"], Balance(500_000_000, "bytes")),
        (["7 units"], Balance(7, "units")),
        (["  7\tUnits  "], Balance(7, "units")),
        (["12 REQUESTS"], Balance(12, "requests")),
        (["007 requests"], Balance(7, "requests")),
        (["5 requests", "5 requests"], Balance(5, "requests")),
        ([str(2**63 - 1) + " bytes"], Balance(2**63 - 1, "bytes")),
    ],
)
def test_parse_balance(values: list[str], expected: Balance) -> None:
    assert parse_balance(values) == expected


def test_no_balance_header_is_none() -> None:
    assert parse_balance([]) is None


@pytest.mark.parametrize(
    "values",
    [
        [""],
        ["lots"],
        ["requests"],
        ["5"],
        ["-1 requests"],
        ["+1 requests"],
        ["1.5 requests"],
        ["1e3 requests"],
        ["0x10 requests"],
        ["5requests"],
        ["5 apples"],
        ["5 requests extra"],
        ["5 requests, 4 requests"],
        ["\u0663 requests"],  # an Arabic-Indic digit: \d would take it
        ["5 r\u00e9quests"],
        ["5 requests", "4 requests"],
        [str(2**63) + " bytes"],
        ["9" * 5000 + " bytes"],
    ],
)
def test_a_malformed_balance_is_a_value_error(values: list[str]) -> None:
    with pytest.raises(ValueError, match=BALANCE_HEADER) as caught:
        parse_balance(values)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300  # one line, fit for a log


# --- the ledger ---------------------------------------------------------------------------------


def new_payment(scope: str = "services:podcast") -> tuple[NewPayment, bytes]:
    preimage = os.urandom(32)
    payment = NewPayment(
        payment_hash=hashlib.sha256(preimage).digest(),
        origin=ORIGIN,
        url=ORIGIN + "/podcast/ep1.mp3",
        scope=scope,
        services=("podcast",),
        scheme="L402",
        macaroon="AgEEbHNhdA==",
        bolt11="lnbcrt210n1fake",
        amount_msat=PRICE_MSAT,
        fee_limit_msat=0,
        valid_until=None,
        wallet="dev",
    )
    return payment, preimage


async def paid_row(ledger: ClientStore, scope: str = "services:podcast") -> Payment:
    payment, preimage = new_payment(scope)
    reserved = await ledger.reserve(
        payment, budget_daily_msat=10**9, budget_total_msat=None, now=NOW
    )
    assert isinstance(reserved, Payment)
    return await ledger.settle(payment.payment_hash, preimage, 0, NOW)


async def test_a_balance_only_goes_down_and_zero_is_spent(store: ClientStore) -> None:
    row = await paid_row(store)
    assert (row.balance, row.balance_unit, row.balance_at, row.spent) == (None, None, None, False)
    await store.note_balance(row.payment_hash, 2, "requests", NOW + 1)
    # An answer to an earlier, concurrent request arriving late: it does not bring back 3.
    await store.note_balance(row.payment_hash, 3, "requests", NOW + 2)
    again = await store.payment(row.payment_hash)
    assert again is not None and (again.balance, again.balance_unit) == (2, "requests")
    assert again.usable(NOW) and again.token_json(NOW)["status"] == "valid"

    await store.note_balance(row.payment_hash, 0, "requests", NOW + 3)
    await store.note_balance(row.payment_hash, 5, "bytes", NOW + 4)  # 0 stays 0
    spent = await store.payment(row.payment_hash)
    assert spent is not None and spent.spent and not spent.usable(NOW)
    assert (spent.balance, spent.balance_unit) == (0, "requests")
    shown = spent.token_json(NOW)
    assert (shown["status"], shown["balance"], shown["balance_unit"]) == ("spent", 0, "requests")
    assert shown["balance_at"] == NOW + 4


async def test_another_unit_replaces_the_balance(store: ClientStore) -> None:
    row = await paid_row(store)
    await store.note_balance(row.payment_hash, 2, "requests", NOW)
    await store.note_balance(row.payment_hash, 4096, "bytes", NOW)
    again = await store.payment(row.payment_hash)
    assert again is not None and (again.balance, again.balance_unit) == (4096, "bytes")


async def test_a_pending_row_gets_no_balance(store: ClientStore) -> None:
    payment, _ = new_payment()
    reserved = await store.reserve(
        payment, budget_daily_msat=10**9, budget_total_msat=None, now=NOW
    )
    assert isinstance(reserved, Payment)
    await store.note_balance(payment.payment_hash, 0, "requests", NOW)
    row = await store.payment(payment.payment_hash)
    assert row is not None and row.balance is None and row.status == "pending"


@pytest.mark.parametrize(
    ("remaining", "unit", "problem"),
    [
        (-1, "requests", "balance must be 0 to"),
        (2**63, "requests", "balance must be 0 to"),
        (True, "requests", "whole number"),
        (1.0, "requests", "whole number"),
        (1, "apples", "balance unit must be one of"),
    ],
)
async def test_note_balance_refuses_what_is_no_balance(
    store: ClientStore, remaining: object, unit: str, problem: str
) -> None:
    row = await paid_row(store)
    with pytest.raises(StoreError, match=problem):
        await store.note_balance(row.payment_hash, remaining, unit, NOW)  # type: ignore[arg-type]


async def test_a_spent_token_is_no_token_and_its_scope_is_paid_again(store: ClientStore) -> None:
    row = await paid_row(store)
    assert [t.payment_hash for t in await store.tokens(NOW)] == [row.payment_hash]
    await store.note_balance(row.payment_hash, 0, "requests", NOW)
    assert await store.tokens(NOW) == []
    # reserve() hands back a usable token of the scope instead of paying: not a spent one.
    payment, _ = new_payment(row.scope)
    reserved = await store.reserve(
        payment, budget_daily_msat=10**9, budget_total_msat=None, now=NOW
    )
    assert isinstance(reserved, Payment) and reserved.status == "pending"
    assert reserved.payment_hash == payment.payment_hash


async def test_a_ledger_of_schema_1_is_migrated_and_its_tokens_kept(tmp_path: Path) -> None:
    """A ledger written before bundles: its tokens keep working, with no balance."""
    path = tmp_path / "client.sqlite"
    preimage = os.urandom(32)
    payment_hash = hashlib.sha256(preimage).digest()
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO payments (payment_hash, origin, url, scope, services, scheme, macaroon,"
            " bolt11, amount_msat, fee_limit_msat, fee_msat, status, preimage, valid_until,"
            " wallet, owner, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'L402', ?, ?, ?, 0,"
            " 0, 'paid', ?, NULL, 'dev', '', ?, ?)",
            (
                payment_hash,
                ORIGIN,
                ORIGIN + "/podcast/ep1.mp3",
                "services:podcast",
                "podcast",
                "AgEEbHNhdA==",
                "lnbcrt210n1fake",
                PRICE_MSAT,
                preimage,
                NOW,
                NOW,
            ),
        )
    db.close()
    opened = await ClientStore.open(str(path))
    try:
        (token,) = await opened.tokens(NOW)
        assert token.payment_hash == payment_hash and token.balance is None
        assert token.token_json(NOW)["status"] == "valid"
        assert token.token_json(NOW)["balance"] is None
        await opened.note_balance(payment_hash, 9, "requests", NOW)
        again = await opened.payment(payment_hash)
        assert again is not None and again.balance == 9
    finally:
        await opened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    db.close()


# --- scopes, expiries, about_token --------------------------------------------------------------


def pass_macaroon(expiries: dict[str, int]) -> str:
    services = ",".join(f"{name}:0" for name in expiries)
    caveats = [f"services={services}"] + [f"{n}_valid_until={t}" for n, t in expiries.items()]
    return mint(os.urandom(32), Identifier.new(os.urandom(32)), caveats)


def held_pass(expiries: dict[str, int], origin: str = ORIGIN) -> Token:
    macaroon = pass_macaroon(expiries)
    services = tuple(expiries)
    return Token(
        origin=origin,
        scope="services:" + ",".join(sorted(services)),
        services=services,
        payment_hash=os.urandom(32),
        valid_until=min(expiries.values()),
        credential=f"L402 {macaroon}:{'00' * 32}",
        expiries=service_expiries(macaroon),
    )


def test_scope_services() -> None:
    assert scope_services("services:articles,podcast") == ("articles", "podcast")
    assert scope_services("services:podcast") == ("podcast",)
    assert scope_services("path:/bonus/") == ()


def test_a_pass_is_usable_per_service_until_its_own_valid_until() -> None:
    token = held_pass({"podcast": 2000, "articles": 1000})
    assert token.until() == 1000  # all of its own: the earliest
    assert token.until(["podcast"]) == 2000
    assert token.until(["articles"]) == 1000
    assert token.usable(1500, ["podcast"]) and not token.usable(1500, ["articles"])
    assert not token.usable(1500)
    assert token.covers(["articles"]) and token.covers(["podcast", "articles"])
    assert not token.covers([]) and not token.covers(["videos"])


def test_service_expiries_reads_lsat_js_expiration_and_survives_garbage() -> None:
    macaroon = mint(os.urandom(32), Identifier.new(os.urandom(32)), ["expiration=5000"])
    assert service_expiries(macaroon) == (("", 5.0),)
    assert service_expiries("not a macaroon") == ()


def test_about_token_takes_a_challenge_for_a_service_the_pass_names() -> None:
    token = held_pass({"podcast": 2**31, "articles": 2**31})
    for_articles = mint(os.urandom(32), Identifier.new(os.urandom(32)), ["services=articles:0"])
    for_videos = mint(os.urandom(32), Identifier.new(os.urandom(32)), ["services=videos:0"])
    url = ORIGIN + "/articles/a1"
    assert about_token([format_challenge("L402", for_articles, "lnbcrt1")], token, url)
    assert not about_token([format_challenge("L402", for_videos, "lnbcrt1")], token, url)


# --- the payer, driven as the addon and the SDK drive it ----------------------------------------


@pytest.fixture
async def origin(shop: Shop) -> ContractServer:
    """The stand-in server on the test's dev ledger (the shop's), without HTTP."""
    return ContractServer(shop.ledger, {})


def serve(server: ContractServer, *services: Service) -> ContractServer:
    server.services = {service.name: service for service in services}
    return server


def as_answer(answer: ServerAnswer, url: str) -> Answer:
    return Answer(
        answer.status,
        tuple(answer.header("WWW-Authenticate")),
        url,
        tuple(answer.header(BALANCE_HEADER)),
    )


class Answers(Protocol):
    """The server as a test's requests reach it (the stand-in, or a wrapper around it)."""

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer: ...


@dataclass
class Fetched:
    answer: ServerAnswer
    verdict: Verdict | None  # None: the first answer was no 401/402
    sent: Token | None  # the token that went up front


async def fetch(payer: Payer, server: Answers, path: str) -> Fetched:
    """One request as the addon and the SDK make it: a payment under way for its scope
    waited for, the token up front (its answer told to the payer: granted or not), the
    answer's balance noted, a 401/402 through exchange() (its Awaits run here, its Resends
    go to the server)."""
    url = ORIGIN + path
    origin, _, _, request_path = split_url(url)
    flight = payer.flight_for(origin, request_path)
    if flight is not None:
        await asyncio.wait({flight}, timeout=payer.pay_timeout)
    sent = payer.up_front(origin, request_path)
    try:
        answer = await server.answer(path, None if sent is None else sent.credential)
    except BaseException:
        if sent is not None:
            payer.answered(sent, granted=False)
        raise
    if answer.status not in (401, 402):
        if sent is not None:
            payer.answered(sent, granted=True)
            if answer.header(BALANCE_HEADER):
                await payer.note_balance(sent, as_answer(answer, url))
        return Fetched(answer, None, sent)
    steps = payer.exchange(url, as_answer(answer, url), sent)
    try:
        step = next(steps)
        for _ in range(20):  # bounded: exchange takes four rounds at most
            if isinstance(step, Await):
                step = steps.send(await step.job)
            else:
                answer = await server.answer(path, step.authorization)
                step = steps.send(as_answer(answer, url))
        raise AssertionError("exchange() did not end")
    except StopIteration as stop:
        return Fetched(answer, stop.value, sent)
    finally:
        steps.close()


async def settled_count(shop: Shop) -> int:
    return sum(1 for invoice in await shop.ledger.list_invoices() if invoice["settled"])


async def restarted(store_path: Path, ledger_path: Path) -> Payer:
    opened = await ClientStore.open(str(store_path))
    payer = Payer(DevWallet(DevLedger(ledger_path), LISTENER), opened, Limits())
    await payer.start()
    return payer


async def test_a_3_request_bundle_serves_3_requests_then_a_new_payment(
    shop: Shop,
    origin: ContractServer,
    make_payer: PayerFactory,
    store: ClientStore,
    store_path: Path,
    ledger_path: Path,
) -> None:
    server = serve(origin, PODCAST)
    payer = make_payer()
    first = await fetch(payer, server, "/podcast/ep1.mp3")
    assert first.answer.status == 200 and first.verdict is not None
    assert first.verdict.paid is not None and first.verdict.paid.paid_here
    bought = first.verdict.paid.token
    assert first.answer.header(BALANCE_HEADER) == ["2 requests"]
    for n, left in ((2, "1 requests"), (3, "0 requests")):
        again = await fetch(payer, server, f"/podcast/ep{n}.mp3")
        assert again.answer.status == 200 and again.verdict is None
        assert again.sent == bought and again.answer.header(BALANCE_HEADER) == [left]
    assert await settled_count(shop) == 1
    # Spent: the 4th request goes without it, meets the 402 and pays again.
    assert payer.token_for(ORIGIN, "/podcast/ep4.mp3") is None
    fourth = await fetch(payer, server, "/podcast/ep4.mp3")
    assert fourth.sent is None and fourth.answer.status == 200
    assert fourth.verdict is not None and fourth.verdict.paid is not None
    assert fourth.verdict.paid.paid_here and fourth.verdict.paid.token != bought
    assert await settled_count(shop) == 2
    assert server.authorizations["podcast"].count(bought.credential) == 3
    assert server.challenges["podcast"] == 2 and server.granted["podcast"] == 4

    await flushed(payer)
    spent = await store.payment(bought.payment_hash)
    assert spent is not None and (spent.balance, spent.balance_unit) == (0, "requests")
    assert spent.token_json(time.time())["status"] == "spent"
    assert spent.dropped_at is None  # spent, not refused
    fresh = await store.payment(fourth.verdict.paid.token.payment_hash)
    assert fresh is not None and fresh.balance == 2

    # A restart knows: the spent token stays out, the new one is sent up front.
    again = await restarted(store_path, ledger_path)
    try:
        assert again.token_for(ORIGIN, "/podcast/ep5.mp3") == fourth.verdict.paid.token
        assert bought.payment_hash not in {t.payment_hash for t in again.tokens.values()}
    finally:
        await again.close()


async def test_single_use_pays_every_call_within_the_budget_and_stops_at_it(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    server = serve(origin, SINGLE)
    # Three payments of 21 sat (no fee allowed) fit in 63 sat; the fourth does not.
    payer = make_payer(limits=Limits(max_fee_sat=0, budget_daily_sat=63))
    for n in range(3):
        fetched = await fetch(payer, server, f"/api/call{n}")
        assert fetched.sent is None, "a single-use token was sent again"
        assert fetched.answer.status == 200
        assert fetched.answer.header(BALANCE_HEADER) == ["0 requests"]
        assert fetched.verdict is not None and fetched.verdict.paid is not None
        assert fetched.verdict.paid.paid_here
    stopped = await fetch(payer, server, "/api/call3")
    assert stopped.answer.status == 402 and stopped.verdict is not None
    assert stopped.verdict.refused is not None and stopped.verdict.refused.code == "budget_daily"
    assert await settled_count(shop) == 3
    # Every token went to the server once: never a spent one.
    sent = [a for a in server.authorizations["api"] if a is not None]
    assert len(sent) == len(set(sent)) == 3
    assert await store.spent_msat() == 3 * PRICE_MSAT


async def test_a_402_saying_the_bundle_is_spent_pays_once_within_the_limits(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """Someone else (another device with a copy, another process) used the bundle up: the
    server answers the token held with a 402 and "0 requests"."""
    server = serve(origin, PODCAST)
    payer = make_payer()
    first = await fetch(payer, server, "/podcast/ep1.mp3")
    assert first.verdict is not None and first.verdict.paid is not None
    held = first.verdict.paid.token
    (token_id,) = server.balances
    server.balances[token_id] = 0  # used up elsewhere
    again = await fetch(payer, server, "/podcast/ep2.mp3")
    assert again.sent == held and again.answer.status == 200
    assert again.verdict is not None and again.verdict.paid is not None
    assert again.verdict.paid.paid_here and again.verdict.paid.token != held
    assert await settled_count(shop) == 2
    row = await store.payment(held.payment_hash)
    assert row is not None and row.spent
    assert payer.token_for(ORIGIN, "/podcast/ep3.mp3") == again.verdict.paid.token


async def test_a_server_refusing_every_fresh_token_costs_one_payment_per_request(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory
) -> None:
    """A server that answers every token, even one just paid, with "spent": bounded, one
    payment per request, and the budget ends it."""
    server = serve(origin, Service("api", bundle=1, spend_on_sight=True))
    payer = make_payer(limits=Limits(max_fee_sat=0, budget_daily_sat=42))
    for n in range(2):
        fetched = await fetch(payer, server, f"/api/call{n}")
        assert fetched.answer.status == 402 and fetched.verdict is not None
        refused = fetched.verdict.refused
        assert refused is not None and refused.code == "rejected_after_payment"
        assert await settled_count(shop) == n + 1
    stopped = await fetch(payer, server, "/api/call2")
    assert stopped.verdict is not None and stopped.verdict.refused is not None
    assert stopped.verdict.refused.code == "budget_daily"
    assert await settled_count(shop) == 2
    assert server.requests["api"] == 2 * 2 + 1  # each: the 402, the paid retry; then one


@pytest.mark.parametrize("value", ["lots of requests", "-1 requests", "5 apples", "1.5 requests"])
async def test_a_malformed_balance_is_ignored_with_a_warning(
    shop: Shop,
    origin: ContractServer,
    make_payer: PayerFactory,
    store: ClientStore,
    caplog: pytest.LogCaptureFixture,
    value: str,
) -> None:
    server = serve(origin, Service("podcast", bundle=10, balance_header=value))
    payer = make_payer()
    caplog.set_level(logging.DEBUG, logger="l402proxy.payer")
    fetched = [await fetch(payer, server, f"/podcast/ep{n}.mp3") for n in range(3)]
    assert [f.answer.status for f in fetched] == [200, 200, 200]
    assert fetched[1].sent is not None and fetched[1].sent == fetched[2].sent  # kept
    assert await settled_count(shop) == 1
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and BALANCE_HEADER in r.getMessage()
    ]
    assert len(warnings) == 1, warnings  # once a minute per origin; debug otherwise
    assert warnings[0].startswith("l402: ignored from ")
    await flushed(payer)
    kept = await store.payment(fetched[1].sent.payment_hash)
    assert kept is not None and kept.balance is None and kept.usable(time.time())


async def test_a_balance_above_zero_on_a_402_is_ignored(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, caplog: pytest.LogCaptureFixture
) -> None:
    payer = make_payer()
    offer = await shop.challenge()
    paid = await payer.handle_challenge(
        url=ORIGIN + "/podcast/ep1.mp3", www_authenticate=[offer.header]
    )
    assert isinstance(paid, Paid)
    answer = Answer(402, (offer.header,), ORIGIN + "/podcast/ep1.mp3", ("5 requests",))
    assert await payer.note_balance(paid.token, answer) is None
    assert "a 402 grants nothing" in caplog.text
    row = await store.payment(paid.token.payment_hash)
    assert row is not None and row.balance is None


async def test_a_balance_from_another_origin_or_on_a_401_is_not_noted(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    offer = await shop.challenge()
    paid = await payer.handle_challenge(
        url=ORIGIN + "/podcast/ep1.mp3", www_authenticate=[offer.header]
    )
    assert isinstance(paid, Paid)
    redirected = Answer(200, (), "http://127.0.0.1:9999/x", ("0 requests",))
    assert await payer.note_balance(paid.token, redirected) is None
    invalid = Answer(401, (offer.header,), ORIGIN + "/podcast/ep1.mp3", ("0 requests",))
    assert await payer.note_balance(paid.token, invalid) is None
    await flushed(payer)
    row = await store.payment(paid.token.payment_hash)
    assert row is not None and row.balance is None
    assert payer.token_for(ORIGIN, "/podcast/ep2.mp3") == paid.token


async def test_a_bundle_shared_by_concurrent_requests_is_bought_once(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory
) -> None:
    server = serve(origin, Service("podcast", bundle=100))
    payer = make_payer()
    fetched = await asyncio.gather(*(fetch(payer, server, f"/podcast/ep{n}.mp3") for n in range(8)))
    assert [f.answer.status for f in fetched] == [200] * 8
    assert await settled_count(shop) == 1
    left = sorted(int(f.answer.header(BALANCE_HEADER)[0].split()[0]) for f in fetched)
    assert left == list(range(92, 100))


# --- requests at once: one payment shared, a bundle too small for them all ---------------------

RACE_TIMEOUT = 10.0


class Race:
    """The stand-in server, holding every request that carries the first token it sees until
    `want` of them have come; then it answers the `winner`-th of them to arrive first (the
    token's one request, for single use) and the others after it ("spent"). Other requests
    pass straight through."""

    def __init__(self, server: Answers, want: int, winner: int | str, then: object = None) -> None:
        self.server, self.want, self.winner = server, want, winner
        self.raced: str | None = None
        self.arrived: list[str] = []
        self.all_in = asyncio.Event()
        self.answered = asyncio.Event()
        # Called once all have come, before any is answered (the server changes its price).
        self.then = then

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        if authorization is None or self.raced not in (None, authorization):
            return await self.server.answer(path, authorization)
        if self.all_in.is_set():
            return await self.server.answer(path, authorization)  # one more, after the race
        self.raced = authorization
        self.arrived.append(path)
        if len(self.arrived) == self.want:
            if callable(self.then):
                self.then()
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), RACE_TIMEOUT)
        winner = self.winner if isinstance(self.winner, str) else self.arrived[self.winner]
        if path != winner:
            await asyncio.wait_for(self.answered.wait(), RACE_TIMEOUT)
            return await self.server.answer(path, authorization)
        try:
            return await self.server.answer(path, authorization)
        finally:
            self.answered.set()


class GatedWallet(DevWallet):
    """A dev wallet that pays only while its gate is open."""

    def __init__(self, ledger: DevLedger, wallet: str, gate: asyncio.Event) -> None:
        super().__init__(ledger, wallet)
        self.gate = gate

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        await asyncio.wait_for(self.gate.wait(), RACE_TIMEOUT)
        return await super().pay(bolt11, max_fee_msat)


def paid_msat(fetched: Fetched) -> int:
    """What X-L402-Paid would say this request paid (0: nothing)."""
    paid = None if fetched.verdict is None else fetched.verdict.paid
    return paid.amount_msat if paid is not None and paid.paid_here else 0


def said_paid_msat(fetched: Fetched) -> int:
    """What X-L402-Paid would say this request paid, granted or refused (0: nothing)."""
    verdict = fetched.verdict
    paid = None if verdict is None else verdict.paid or verdict.spent
    return paid.amount_msat if paid is not None and paid.paid_here else 0


def refusal(fetched: Fetched) -> str | None:
    refused = None if fetched.verdict is None else fetched.verdict.refused
    return None if refused is None else refused.code


@pytest.mark.parametrize("winner", [0, -1], ids=["the-payer-wins", "a-waiter-wins"])
async def test_single_use_calls_at_once_each_pay_for_their_own_call(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore, winner: int
) -> None:
    """Three calls at once wait for one payment and retry with its token; the server grants
    one and says "spent" to the others. Those lost to a request of ours: each pays once
    more, for itself alone, and gets its call. The payer losing (a waiter won) is no refusal
    of a token just paid either."""
    server = serve(origin, SINGLE)
    race = Race(server, want=3, winner=winner)
    payer = make_payer(limits=Limits(max_fee_sat=0))
    paths = [f"/api/call{n}" for n in range(3)]
    fetched = await asyncio.gather(*(fetch(payer, race, path) for path in paths))
    assert [refusal(f) for f in fetched] == [None] * 3
    assert [f.answer.status for f in fetched] == [200] * 3
    assert [f.answer.header(BALANCE_HEADER) for f in fetched] == [["0 requests"]] * 3
    assert await settled_count(shop) == 3
    # Each token granted once: the shared one to the winner, the two bought alone to theirs.
    sent = [a for a in server.authorizations["api"] if a is not None]
    assert len(sent) == 5 and sent.count(race.raced) == 3
    assert server.granted["api"] == 3
    # What X-L402-Paid says adds up to what was paid: a request that paid the shared
    # token and then its own says both.
    assert sum(paid_msat(f) for f in fetched) == 3 * PRICE_MSAT == await store.spent_msat()
    assert sorted(paid_msat(f) for f in fetched) == (
        [PRICE_MSAT] * 3 if winner == 0 else [0, PRICE_MSAT, 2 * PRICE_MSAT]
    )
    # The ledger: three tokens, all spent, none refused (dropped); none held back any more.
    await flushed(payer)
    rows = await store.all_tokens()
    assert len(rows) == 3
    assert all(row.spent and row.dropped_at is None for row in rows), rows
    assert all(row.held_until is None for row in rows), rows


async def test_a_token_sent_up_front_by_another_request_that_wins_is_no_refusal(
    shop: Shop, origin: ContractServer, ledger_path: Path, make_payer: PayerFactory
) -> None:
    """A request arriving while a payment is under way for its scope waits for it and sends
    its token up front; it wins the single use. The request that paid loses it to a request
    of ours, though none waited for its payment in handle_challenge: it pays once more."""
    server = serve(origin, SINGLE)
    gate = asyncio.Event()
    payer = make_payer(
        wallet=GatedWallet(DevLedger(ledger_path), LISTENER, gate), limits=Limits(max_fee_sat=0)
    )
    gate.set()
    assert (await fetch(payer, server, "/api/first")).answer.status == 200  # /api/ learnt
    gate.clear()
    race = Race(server, want=2, winner="/api/y")
    x = asyncio.create_task(fetch(payer, race, "/api/x"))
    for _ in range(1000):  # bounded: until its payment is under way (held at the gate)
        if payer.flight_for(ORIGIN, "/api/y") is not None:
            break
        await asyncio.sleep(0.01)
    y = asyncio.create_task(fetch(payer, race, "/api/y"))
    await asyncio.sleep(0)  # y runs up to its wait for that payment
    gate.set()
    got_x, got_y = await asyncio.wait_for(asyncio.gather(x, y), RACE_TIMEOUT)
    assert got_y.sent is not None and got_y.sent.credential == race.raced
    assert got_y.answer.status == 200 and got_y.verdict is None
    assert refusal(got_x) is None and got_x.answer.status == 200
    assert paid_msat(got_x) == 2 * PRICE_MSAT
    assert await settled_count(shop) == 3


async def test_the_extra_payment_is_within_the_budget(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """Two payments fit the budget: the shared one and one more; the third call is refused
    by the budget, not paid."""
    server = serve(origin, SINGLE)
    race = Race(server, want=3, winner=0)
    payer = make_payer(limits=Limits(max_fee_sat=0, budget_daily_sat=2 * PRICE_MSAT // 1000))
    fetched = await asyncio.gather(*(fetch(payer, race, f"/api/b{n}") for n in range(3)))
    assert sorted(f.answer.status for f in fetched) == [200, 200, 402]
    assert sorted(str(refusal(f)) for f in fetched) == ["None", "None", "budget_daily"]
    assert await settled_count(shop) == 2 and await store.spent_msat() == 2 * PRICE_MSAT


async def test_the_extra_payment_is_within_the_price_limit(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory
) -> None:
    """The server's price went up after the shared payment: the challenges the losers (the
    request that paid among them) get ask more than max_price_sat: refused, not paid."""
    server = serve(origin, SINGLE)

    def dearer() -> None:
        server.services["api"] = Service("api", price_sat=500, bundle=1)

    race = Race(server, want=3, winner=-1, then=dearer)
    payer = make_payer(limits=Limits(max_fee_sat=0, max_price_sat=100))
    fetched = await asyncio.gather(*(fetch(payer, race, f"/api/p{n}") for n in range(3)))
    assert sorted(str(refusal(f)) for f in fetched) == ["None", "max_price", "max_price"]
    assert await settled_count(shop) == 1


class TurnsHostile:
    """The race's server, hostile once it granted the raced token: every token after that,
    even one just paid, gets a fresh 402 saying it is spent."""

    def __init__(self, race: Race, server: ContractServer) -> None:
        self.race, self.server = race, server

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        answer = await self.race.answer(path, authorization)
        if answer.status == 200:
            server = self.server
            server.services = {
                name: replace(service, spend_on_sight=True)
                for name, service in server.services.items()
            }
        return answer


async def test_a_request_that_loses_twice_does_not_pay_a_third_time(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """A real race (one request granted with the shared token), then the server calls every
    token spent: each of the two losers pays once more alone, that token is "spent" too:
    refused, never a third payment (three in all, at most two for any request)."""
    server = serve(origin, SINGLE)
    race = Race(server, want=3, winner=0)
    payer = make_payer(limits=Limits(max_fee_sat=0))
    fetched = await asyncio.gather(
        *(fetch(payer, TurnsHostile(race, server), f"/api/s{n}") for n in range(3))
    )
    assert sorted(str(refusal(f)) for f in fetched) == ["None"] + ["rejected_after_payment"] * 2
    assert sorted(f.answer.status for f in fetched) == [200, 402, 402]
    assert await settled_count(shop) == 3 and await store.spent_msat() == 3 * PRICE_MSAT
    # Each request: no token, the shared one; each loser its own (once), then nothing more.
    sent = server.authorizations["api"]
    assert sent.count(None) == 3 and sent.count(race.raced) == 3
    own = [a for a in sent if a not in (None, race.raced)]
    assert len(own) == len(set(own)) == 2
    # What the requests say they paid (the refused ones too) adds up to what was paid.
    assert sum(said_paid_msat(f) for f in fetched) == 3 * PRICE_MSAT
    await flushed(payer)
    for invoice in server.invoices[-2:]:
        assert await store.payment(invoice) is None  # the last challenges: never paid


async def test_a_server_calling_every_token_spent_gets_no_second_payment_from_any_request(
    shop: Shop,
    origin: ContractServer,
    make_payer: PayerFactory,
    store: ClientStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three requests at once share one payment; the server calls the token spent to all of
    them and grants none: no proof that ours used it, so none pays alone. A request whose
    shared token was refused pays at most once for itself (as any refused token), and the
    server takes at most one payment per request, serving nothing."""
    server = serve(origin, Service("api", bundle=1, spend_on_sight=True))
    race = Race(server, want=3, winner=0)
    payer = make_payer(limits=Limits(max_fee_sat=0))
    caplog.set_level(logging.INFO, logger="l402proxy.payer")
    fetched = await asyncio.gather(*(fetch(payer, race, f"/api/s{n}") for n in range(3)))
    assert [refusal(f) for f in fetched] == ["rejected_after_payment"] * 3
    assert [f.answer.status for f in fetched] == [402] * 3
    paid = await settled_count(shop)
    assert 1 <= paid <= 3 and await store.spent_msat() == paid * PRICE_MSAT
    assert "for it alone" not in caplog.text
    # At most one payment each, and each says what it paid (X-L402-Paid beside the refusal).
    assert all(said_paid_msat(f) <= PRICE_MSAT for f in fetched)
    assert sum(said_paid_msat(f) for f in fetched) == paid * PRICE_MSAT


async def test_a_fresh_token_said_spent_with_no_other_request_is_refused_as_before(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory
) -> None:
    """The token just paid went to no other request of ours: "spent" is the server's
    refusal, and nothing more is paid (the bound for one request alone is one payment)."""
    server = serve(origin, Service("api", bundle=1, spend_on_sight=True))
    payer = make_payer(limits=Limits(max_fee_sat=0))
    fetched = await fetch(payer, server, "/api/alone")
    assert refusal(fetched) == "rejected_after_payment"
    assert await settled_count(shop) == 1


async def test_a_bundle_token_bought_alone_is_shared_once_its_request_used_it(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory
) -> None:
    """A 2-request bundle, three requests at once: two use the shared token, the third pays
    alone; what its token has left goes up front to the next request."""
    server = serve(origin, Service("podcast", bundle=2))
    race = Race(server, want=3, winner=0)
    payer = make_payer()
    fetched = await asyncio.gather(*(fetch(payer, race, f"/podcast/e{n}") for n in range(3)))
    assert [refusal(f) for f in fetched] == [None] * 3
    assert sorted(f.answer.header(BALANCE_HEADER)[0] for f in fetched) == [
        "0 requests",
        "1 requests",
        "1 requests",
    ]
    assert await settled_count(shop) == 2
    alone = next(
        f
        for f in fetched
        if f.verdict
        and f.verdict.paid
        and f.verdict.paid.paid_here
        and f.verdict.paid.token.credential != race.raced
    )
    assert alone.verdict is not None and alone.verdict.paid is not None
    nxt = await fetch(payer, server, "/podcast/e3")
    assert nxt.sent == alone.verdict.paid.token and nxt.answer.status == 200
    assert await settled_count(shop) == 2


class LostAfterPaying(DevWallet):
    """A dev wallet that pays, and from its `lose_from`-th payment on loses the answer (the
    node went away): the payment stays pending in the client's ledger."""

    def __init__(self, ledger: DevLedger, wallet: str, lose_from: int) -> None:
        super().__init__(ledger, wallet)
        self.lose_from, self.paid = lose_from, 0

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        result = await super().pay(bolt11, max_fee_msat)
        self.paid += 1
        if self.paid >= self.lose_from:
            raise LightningError("the node went away")
        return result


async def test_a_payment_made_alone_is_recovered_like_any_other(
    shop: Shop,
    origin: ContractServer,
    ledger_path: Path,
    make_payer: PayerFactory,
    store: ClientStore,
) -> None:
    """The extra payment is an ordinary ledger row: cut short, it stays pending (the request
    is refused, not paid a third time) and the recovery settles its token."""
    server = serve(origin, Service("podcast", bundle=2))
    race = Race(server, want=2, winner=0)
    wallet = LostAfterPaying(DevLedger(ledger_path), LISTENER, lose_from=3)
    payer = make_payer(wallet=wallet)
    fetched = await asyncio.gather(*(fetch(payer, race, f"/podcast/r{n}") for n in range(2)))
    # Both fit the bundle of 2: no race lost, one payment.
    assert [refusal(f) for f in fetched] == [None, None] and wallet.paid == 1
    race = Race(server, want=3, winner=0)
    # Spent: the next three share one payment (bundle of 2), the loser pays alone: lost.
    fetched = await asyncio.gather(*(fetch(payer, race, f"/podcast/q{n}") for n in range(3)))
    assert sorted(str(refusal(f)) for f in fetched) == ["None", "None", "payment_pending"]
    assert wallet.paid == 3 and await settled_count(shop) == 3
    (pending,) = await store.pending()
    # Not known to be paid: no longer held back, waited for like any pending payment.
    assert pending.held_until is None
    # The recovery the client runs at start and every few minutes settles it from the
    # wallet; its token is sent up front from then on.
    (recovered,) = await payer.recover()
    assert recovered.payment_hash == pending.payment_hash and recovered.status == "paid"
    held = payer.token_for(ORIGIN, "/podcast/q9")
    assert held is not None and held.payment_hash == pending.payment_hash
    assert (await fetch(payer, server, "/podcast/q9")).answer.header(BALANCE_HEADER) == [
        "1 requests"
    ]
    assert wallet.paid == 3


async def test_reserve_alone_checks_the_budgets_not_the_scope(store: ClientStore) -> None:
    """A payment for one request alone is made beside a live token and a pending payment of
    the scope, within the budgets."""
    live = await paid_row(store)
    lone, _ = new_payment(live.scope)
    taken = await store.reserve(lone, budget_daily_msat=10**9, budget_total_msat=None, now=NOW)
    assert isinstance(taken, Payment) and taken.payment_hash == live.payment_hash
    waiting, _ = new_payment(live.scope)
    await store.reserve(
        waiting, budget_daily_msat=10**9, budget_total_msat=None, now=NOW, alone=True
    )
    plain = await store.reserve(lone, budget_daily_msat=10**9, budget_total_msat=None, now=NOW)
    assert isinstance(plain, BudgetRefusal) and plain.code == "payment_pending"
    reserved = await store.reserve(
        lone, budget_daily_msat=10**9, budget_total_msat=None, now=NOW, alone=True
    )
    assert isinstance(reserved, Payment) and reserved.payment_hash == lone.payment_hash
    assert reserved.status == "pending"
    dear, _ = new_payment(live.scope)
    refused = await store.reserve(
        dear, budget_daily_msat=3 * PRICE_MSAT + 1, budget_total_msat=None, now=NOW, alone=True
    )
    assert isinstance(refused, BudgetRefusal) and refused.code == "budget_daily"


async def reserve_plain(ledger: ClientStore, scope: str, now: float) -> Payment | BudgetRefusal:
    payment, _ = new_payment(scope)
    return await ledger.reserve(payment, budget_daily_msat=10**9, budget_total_msat=None, now=now)


async def test_a_payment_held_back_in_the_store_is_passed_over_until_released(
    store: ClientStore, store_path: Path
) -> None:
    """A payment made for one request alone is held in the store (held_until), so no payment
    of any process sharing the file waits for it (pending) or takes its token (paid), and no
    start loads it, until its request released it or the hold ran out: reserve() holds it
    for hold_for, settle() renews the hold, release() ends it."""
    scope = "services:podcast"
    lone, preimage = new_payment(scope)
    held = await store.reserve(
        lone, budget_daily_msat=10**9, budget_total_msat=None, now=NOW, alone=True, hold_for=60
    )
    assert isinstance(held, Payment) and held.held_until == NOW + 60 and held.held(NOW)
    # Pending and held: another payment of the scope neither waits for it nor is refused.
    other = await ClientStore.open(str(store_path))  # another process's view of the file
    try:
        passed = await reserve_plain(other, scope, NOW + 1)
        assert isinstance(passed, Payment) and passed.status == "pending"
        assert passed.payment_hash != lone.payment_hash
        await other.fail(passed.payment_hash, "test", NOW + 1)
        # Paid: the hold is renewed for the time it takes to send the token.
        paid = await store.settle(lone.payment_hash, preimage, 0, NOW + 50, hold_for=60)
        assert paid.held_until == NOW + 110
        assert await other.tokens(NOW + 100) == []
        fresh = await reserve_plain(other, scope, NOW + 100)
        assert isinstance(fresh, Payment) and fresh.status == "pending"
        await other.fail(fresh.payment_hash, "test", NOW + 100)
        # Released (its request used it): a token of the scope like any other.
        await store.release(lone.payment_hash)
        (token,) = await other.tokens(NOW + 100)
        assert token.payment_hash == lone.payment_hash and token.held_until is None
        taken = await reserve_plain(other, scope, NOW + 100)
        assert isinstance(taken, Payment) and taken.payment_hash == lone.payment_hash
    finally:
        await other.close()


async def test_a_hold_ends_by_itself_and_recovery_does_not_renew_it(store: ClientStore) -> None:
    """A request that went away does not hold its payment for ever; a settle without
    hold_for (recovery) leaves the hold as it was, and a plain payment is never held."""
    scope = "services:articles"
    lone, preimage = new_payment(scope)
    await store.reserve(
        lone, budget_daily_msat=10**9, budget_total_msat=None, now=NOW, alone=True, hold_for=60
    )
    waited = await reserve_plain(store, scope, NOW + 61)  # pending, no longer held
    assert isinstance(waited, BudgetRefusal) and waited.code == "payment_pending"
    assert waited.pending is not None and waited.pending.payment_hash == lone.payment_hash
    recovered = await store.settle(lone.payment_hash, preimage, 0, NOW + 62)
    assert recovered.held_until == NOW + 60 and not recovered.held(NOW + 62)
    plain = await paid_row(store, scope="services:news")
    assert plain.held_until is None


async def carried_twice(shop: Shop, payer: Payer, service: str = "podcast") -> Token:
    """A token paid for one request (carried by it) and sent up front by a second one."""
    offer = await shop.challenge(service=service)
    url = f"{ORIGIN}/{service}/ep1.mp3"
    paid = await payer.handle_challenge(url=url, www_authenticate=[offer.header])
    assert isinstance(paid, Paid) and paid.paid_here
    assert payer.up_front(ORIGIN, f"/{service}/ep2.mp3") == paid.token
    return paid.token


async def test_a_request_told_spent_waits_for_the_others_answer_and_a_grant_is_the_proof(
    shop: Shop, make_payer: PayerFactory
) -> None:
    """The request told "spent" (and so not granted) waits for the other request that sent
    the token: its grant says ours used the token up (pay once more, alone)."""
    payer = make_payer(pay_timeout=RACE_TIMEOUT)
    token = await carried_twice(shop, payer)
    payer.answered(token, granted=False)  # this request's own answer: "spent"
    waiting = asyncio.create_task(payer.lost_to_ours(token, ORIGIN + "/podcast/ep1.mp3"))
    for _ in range(5):  # it waits, whatever the loop does meanwhile
        await asyncio.sleep(0)
    assert not waiting.done()
    payer.answered(token, granted=True)
    assert await asyncio.wait_for(waiting, RACE_TIMEOUT) is True


async def test_a_request_told_spent_with_no_other_granted_does_not_pay_again(
    shop: Shop, make_payer: PayerFactory
) -> None:
    """All that carried it were answered without a grant: "spent" is the server's refusal. An
    answer that never comes ends the wait after pay_timeout, a refusal too."""
    payer = make_payer(pay_timeout=RACE_TIMEOUT)
    token = await carried_twice(shop, payer)
    payer.answered(token, granted=False)
    waiting = asyncio.create_task(payer.lost_to_ours(token, ORIGIN + "/podcast/ep1.mp3"))
    await asyncio.sleep(0)
    payer.answered(token, granted=False)
    assert await asyncio.wait_for(waiting, RACE_TIMEOUT) is False

    hurried = make_payer(pay_timeout=0.05)
    silent = await carried_twice(shop, hurried, "articles")
    hurried.answered(silent, granted=False)  # the other request never answers
    assert await asyncio.wait_for(hurried.lost_to_ours(silent, "x"), RACE_TIMEOUT) is False


async def test_answers_from_another_thread_reach_the_payers_loop(
    shop: Shop, make_payer: PayerFactory
) -> None:
    """The SDK's generator runs in its caller's thread: answered() and release() made there
    run on the payer's loop (the waiting request wakes up)."""
    payer = make_payer(pay_timeout=RACE_TIMEOUT)
    token = await carried_twice(shop, payer)
    payer.answered(token, granted=False)
    waiting = asyncio.create_task(payer.lost_to_ours(token, ORIGIN + "/podcast/ep1.mp3"))
    await asyncio.sleep(0)
    await asyncio.to_thread(payer.answered, token, granted=True)
    assert await asyncio.wait_for(waiting, RACE_TIMEOUT) is True


# --- requests at once: the review of the race fix ----------------------------------------------


class GateFrom(DevWallet):
    """A dev wallet whose `gated`-th payment (and later ones) waits for its gate; `started`
    is set when that payment has begun (its row is pending in the client store)."""

    def __init__(self, ledger: DevLedger, wallet: str, gated: int) -> None:
        super().__init__(ledger, wallet)
        self.gated, self.paid = gated, 0
        self.gate, self.started = asyncio.Event(), asyncio.Event()

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        self.paid += 1
        if self.paid >= self.gated:
            self.started.set()
            await asyncio.wait_for(self.gate.wait(), RACE_TIMEOUT)
        return await super().pay(bolt11, max_fee_msat)


class Deciding(DevWallet):
    """A dev wallet that sets `decided` when asked to pay."""

    def __init__(self, ledger: DevLedger, wallet: str, decided: asyncio.Event) -> None:
        super().__init__(ledger, wallet)
        self.decided = decided

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        self.decided.set()
        return await super().pay(bolt11, max_fee_msat)


class Watched:
    """The server as another process's requests reach it: `sent` is set once one of them
    carries any token."""

    def __init__(self, server: ContractServer) -> None:
        self.server, self.sent = server, asyncio.Event()

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        if authorization is not None:
            self.sent.set()
        return await self.server.answer(path, authorization)


class AfterOther:
    """The server as this process's requests reach it: a request carrying a token other than
    the raced one (the one bought alone) arrives only after the other process sent one."""

    def __init__(self, race: Race, other: Watched) -> None:
        self.race, self.other = race, other

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        if authorization is not None and self.race.raced not in (None, authorization):
            await asyncio.wait_for(self.other.sent.wait(), RACE_TIMEOUT)
        return await self.race.answer(path, authorization)


async def test_a_token_bought_alone_is_not_given_to_another_process_sharing_the_store(
    shop: Shop,
    origin: ContractServer,
    make_payer: PayerFactory,
    store_path: Path,
    ledger_path: Path,
    clock: Clock,
) -> None:
    """Two calls at once in process A share one single-use token; the loser pays once more,
    alone. While that payment is under way, process B (the SDK, a second proxy) sharing the
    client store meets the 402 for the same scope: the row is held in the store, so B
    neither waits for it nor takes its token (it pays its own), and A's request that paid
    alone gets its call."""
    server = serve(origin, SINGLE)
    wallet_a = GateFrom(DevLedger(ledger_path), LISTENER, gated=2)  # the payment alone waits
    payer_a = make_payer(wallet=wallet_a, limits=Limits(max_fee_sat=0))
    decided = asyncio.Event()
    store_b = await ClientStore.open(str(store_path))
    read_b = store_b.payment

    async def polled(payment_hash: bytes) -> Payment | None:
        decided.set()
        return await read_b(payment_hash)

    store_b.payment = polled  # type: ignore[method-assign]
    payer_b = Payer(
        Deciding(DevLedger(ledger_path), LISTENER, decided),
        store_b,
        Limits(max_fee_sat=0),
        pay_timeout=10.0,
        clock=clock,
    )
    try:
        race = Race(server, want=2, winner=0)
        other = Watched(server)
        in_a = AfterOther(race, other)
        calls_a = asyncio.gather(*(fetch(payer_a, in_a, f"/api/a{n}") for n in range(2)))
        await asyncio.wait_for(wallet_a.started.wait(), RACE_TIMEOUT)  # A's alone payment
        call_b = asyncio.create_task(fetch(payer_b, other, "/api/b"))
        # B decides before A's payment ends: it pays its own, or it waits for A's pending row
        # (polling it with store.payment()).
        await asyncio.wait_for(decided.wait(), RACE_TIMEOUT)
        wallet_a.gate.set()
        got_a = await asyncio.wait_for(calls_a, RACE_TIMEOUT)
        got_b = await asyncio.wait_for(call_b, RACE_TIMEOUT)
        # What A paid, newest first (all_tokens: ORDER BY id DESC): the one alone, the shared.
        paid_by_a = [row for row in await store_b.all_tokens() if row.owner == payer_a.owner]
        assert len(paid_by_a) == 2 and wallet_a.paid == 2
        alone_tokens = {paid_by_a[0].payment_hash}
        assert got_b.verdict is not None
        b_token = got_b.verdict.paid.token if got_b.verdict.paid is not None else None
        # B's request is not given the token A's request bought alone (it pays its own) ...
        assert b_token is None or b_token.payment_hash not in alone_tokens, "B took A's token"
        # ... and the request that paid alone gets its call.
        assert [refusal(f) for f in got_a] == [None, None], [refusal(f) for f in got_a]
    finally:
        await payer_b.close()


async def test_a_request_refused_by_the_budget_after_paying_still_says_what_it_paid(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """Two calls at once share one payment; the waiter wins the single use, so the request
    that paid it lost it to ours and would pay once more, but the budget holds one payment
    only: it is refused (budget_daily). It did pay 21 sat for this call: the Verdict says so
    beside the refusal (`spent`: X-L402-Paid and X-L402-Refused both), so what X-L402-Paid
    says still adds up to what was paid."""
    server = serve(origin, SINGLE)
    race = Race(server, want=2, winner=-1)
    payer = make_payer(limits=Limits(max_fee_sat=0, budget_daily_sat=PRICE_MSAT // 1000))
    fetched = await asyncio.gather(*(fetch(payer, race, f"/api/c{n}") for n in range(2)))
    assert sorted(str(refusal(f)) for f in fetched) == ["None", "budget_daily"]
    assert await settled_count(shop) == 1 and await store.spent_msat() == PRICE_MSAT
    refused = next(f for f in fetched if refusal(f) is not None)
    assert refused.verdict is not None and refused.verdict.spent is not None
    spent = refused.verdict.spent
    assert (spent.amount_msat, spent.paid_here) == (PRICE_MSAT, True)
    assert sum(said_paid_msat(f) for f in fetched) == PRICE_MSAT


class Staggered:
    """A hostile server: every token, even one just paid, gets a fresh 402 with
    `X-L402-Balance: 0 requests` (spend_on_sight). It holds its answer to the first request
    that carries a token until a second request of ours carries that token too (as a
    player's or a poller's overlapping requests do), or until `release_all`."""

    def __init__(self, server: ContractServer) -> None:
        self.server = server
        self.held: dict[str, asyncio.Event] = {}
        self.released = False

    def release_all(self) -> None:
        self.released = True  # and nothing held from now on
        for event in self.held.values():
            event.set()

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        if authorization is not None:
            if authorization in self.held:
                self.held[authorization].set()  # a second request came with it
            else:
                event = self.held[authorization] = asyncio.Event()
                if not self.released:
                    await asyncio.wait_for(event.wait(), RACE_TIMEOUT)
        return await self.server.answer(path, authorization)


async def test_a_server_calling_every_token_spent_while_requests_overlap_takes_one_payment_each(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """A server that says "0 left" to every token, even one just paid, while our requests
    overlap (each next request sends the token up front before the server answers the one
    that paid it): none of ours was granted with it, so "spent" is no proof of a race and
    nobody pays alone. At most one payment per request (it was 2N - 1 before), nothing
    served, and each refused request says what it paid."""
    requests = 4
    server = serve(origin, Service("api", bundle=1, spend_on_sight=True))
    hostile = Staggered(server)
    payer = make_payer(limits=Limits(max_fee_sat=0))
    seen: set[bytes] = set()
    tasks = []
    for n in range(requests):
        tasks.append(asyncio.create_task(fetch(payer, hostile, f"/api/r{n}")))
        # The next request starts once this one has bought its token (it goes up front).
        for _ in range(500):  # bounded: 500 * 10 ms
            held = payer.token_for(ORIGIN, "/api/next")
            if held is not None and held.payment_hash not in seen:
                seen.add(held.payment_hash)
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"request {n} bought no token")
    hostile.release_all()
    fetched = await asyncio.wait_for(asyncio.gather(*tasks), 2 * RACE_TIMEOUT)
    assert [f.answer.status for f in fetched] == [402] * requests
    assert [refusal(f) for f in fetched] == ["rejected_after_payment"] * requests
    paid = await settled_count(shop)
    assert paid <= requests, paid
    assert await store.spent_msat() == paid * PRICE_MSAT
    assert all(said_paid_msat(f) <= PRICE_MSAT for f in fetched)
    assert sum(said_paid_msat(f) for f in fetched) == paid * PRICE_MSAT


class DropsAlone:
    """The server as seen through a connection that breaks when a request carries a token
    other than the raced one (the one bought alone): the resend never arrives."""

    def __init__(self, race: Race) -> None:
        self.race = race
        self.dropped: list[str] = []

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        alone = authorization is not None and self.race.raced not in (None, authorization)
        if alone and not self.dropped:
            assert authorization is not None
            self.dropped.append(authorization)
            raise ConnectionResetError("the connection broke")
        return await self.race.answer(path, authorization)


async def test_a_token_bought_alone_whose_resend_failed_goes_up_front_to_the_next_request(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """The request that paid alone could not send its token (the proxy's httpx error: the
    driver closes the exchange at its Resend). The token, paid and never presented, is
    released at once (kept, in memory and in the store): the next request to the scope
    sends it instead of paying once more."""
    server = serve(origin, SINGLE)
    race = Race(server, want=2, winner=0)
    payer = make_payer(limits=Limits(max_fee_sat=0))
    broken = DropsAlone(race)
    fetched = await asyncio.gather(
        *(fetch(payer, broken, f"/api/d{n}") for n in range(2)), return_exceptions=True
    )
    assert sum(isinstance(f, ConnectionResetError) for f in fetched) == 1, fetched
    assert broken.dropped and await settled_count(shop) == 2
    # The next request: the unused token bought alone opens it, nothing more is paid.
    nxt = await fetch(payer, server, "/api/d9")
    assert nxt.answer.status == 200
    assert nxt.sent is not None and nxt.sent.credential == broken.dropped[0]
    assert await settled_count(shop) == 2
    await flushed(payer)
    row = await store.payment(nxt.sent.payment_hash)
    assert row is not None and row.held_until is None and row.spent


# --- passes -------------------------------------------------------------------------------------


async def test_a_pass_opens_its_other_service_without_paying(
    shop: Shop,
    origin: ContractServer,
    make_payer: PayerFactory,
    store_path: Path,
    ledger_path: Path,
) -> None:
    server = serve(origin, PASS_PODCAST, ARTICLES)
    payer = make_payer()
    bought = await fetch(payer, server, "/podcast/ep1.mp3")
    assert bought.verdict is not None and bought.verdict.paid is not None
    held = bought.verdict.paid.token
    assert held.services == ("podcast", "articles")

    tried = await fetch(payer, server, "/articles/a1")
    assert tried.answer.status == 200 and tried.verdict is not None
    paid = tried.verdict.paid
    assert paid is not None and paid.token == held and paid.borrowed and not paid.paid_here
    assert await settled_count(shop) == 1
    # From now on it goes up front to the articles as well.
    up_front = await fetch(payer, server, "/articles/a2")
    assert up_front.sent == held and up_front.verdict is None and up_front.answer.status == 200
    assert server.authorizations["articles"] == [None, held.credential, held.credential]

    # After a restart it is tried again, once, without paying.
    await flushed(payer)
    again = await restarted(store_path, ledger_path)
    try:
        later = await fetch(again, server, "/articles/a3")
        assert later.answer.status == 200 and await settled_count(shop) == 1
    finally:
        await again.close()


async def test_a_pass_the_server_refuses_is_tried_once_then_paid_once(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    server = serve(origin, PASS_PODCAST, Service("articles", own_tokens_only=True))
    payer = make_payer()
    bought = await fetch(payer, server, "/podcast/ep1.mp3")
    assert bought.verdict is not None and bought.verdict.paid is not None
    held = bought.verdict.paid.token

    refused = await fetch(payer, server, "/articles/a1")
    assert refused.answer.status == 200 and refused.verdict is not None
    paid = refused.verdict.paid
    assert paid is not None and paid.paid_here and paid.token.services == ("articles",)
    assert await settled_count(shop) == 2
    # The pass was tried once; the token just bought goes up front to the articles now.
    assert server.authorizations["articles"] == [None, held.credential, paid.token.credential]
    nxt = await fetch(payer, server, "/articles/a2")
    assert nxt.sent == paid.token and nxt.answer.status == 200
    # The pass is not dropped: it still opens the podcast.
    row = await store.payment(held.payment_hash)
    assert row is not None and row.dropped_at is None
    assert payer.token_for(ORIGIN, "/podcast/ep2.mp3") == held
    # And once the articles token is gone, the pass is not tried there again.
    await payer.drop(paid.token, "test")
    gone = await fetch(payer, server, "/articles/a3")
    assert gone.verdict is not None and gone.verdict.paid is not None
    assert gone.verdict.paid.paid_here
    assert server.authorizations["articles"].count(held.credential) == 1


async def test_a_pass_answered_401_is_not_dropped_and_the_challenge_is_paid_once(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    articles = Service("articles", own_tokens_only=True, refusal_status=401)
    server = serve(origin, PASS_PODCAST, articles)
    payer = make_payer()
    bought = await fetch(payer, server, "/podcast/ep1.mp3")
    assert bought.verdict is not None and bought.verdict.paid is not None
    held = bought.verdict.paid.token
    fetched = await fetch(payer, server, "/articles/a1")
    assert fetched.answer.status == 200 and fetched.verdict is not None
    paid = fetched.verdict.paid
    assert paid is not None and paid.paid_here and paid.token != held
    assert await settled_count(shop) == 2
    # The pass, the 401, the question again without a token (a 401 is never paid), the payment.
    assert server.authorizations["articles"] == [None, held.credential, None, paid.token.credential]
    row = await store.payment(held.payment_hash)
    assert row is not None and row.dropped_at is None
    assert payer.token_for(ORIGIN, "/podcast/ep2.mp3") == held


async def test_a_held_token_refused_then_a_pass_refused_then_one_payment(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """The three rounds of one request: the articles token held (not sent: the URL was not
    known to be the articles') is refused, the pass is refused, one payment; the pass is
    kept."""
    articles = Service("articles", own_tokens_only=True, also=("news",))
    server = serve(origin, PASS_PODCAST, articles)
    payer = make_payer()
    bought = await fetch(payer, server, "/podcast/ep1.mp3")
    assert bought.verdict is not None and bought.verdict.paid is not None
    held = bought.verdict.paid.token
    first = await fetch(payer, server, "/articles/a1")
    assert first.verdict is not None and first.verdict.paid is not None
    articles_token = first.verdict.paid.token
    assert await settled_count(shop) == 2
    # The pass is forgiven (as after a restart), and the articles token is revoked.
    payer.passes_refused.clear()
    server.revoked.add(articles_token.credential)
    again = await fetch(payer, server, "/news/n1")
    assert again.sent is None
    assert again.answer.status == 200 and again.verdict is not None
    assert again.verdict.paid is not None and again.verdict.paid.paid_here
    assert await settled_count(shop) == 3
    assert server.authorizations["articles"][-4:] == [
        None,
        articles_token.credential,
        held.credential,
        again.verdict.paid.token.credential,
    ]
    row = await store.payment(held.payment_hash)
    assert row is not None and row.dropped_at is None
    assert payer.token_for(ORIGIN, "/podcast/ep2.mp3") == held


async def test_a_pass_expired_for_the_service_asked_is_not_tried(
    shop: Shop, make_payer: PayerFactory
) -> None:
    payer = make_payer()
    now = int(time.time())
    token = held_pass({"podcast": now + 3600, "articles": now - 1})
    payer.tokens[(ORIGIN, token.scope)] = token
    for service, tried in (("articles", False), ("podcast", True)):
        offer = await shop.challenge(service=service)
        outcome = await payer.handle_challenge(
            url=f"{ORIGIN}/{service}/x", www_authenticate=[offer.header]
        )
        assert isinstance(outcome, Paid)
        assert (outcome.token == token) is tried
        assert outcome.paid_here is not tried


async def test_a_pass_of_another_origin_is_not_tried(shop: Shop, make_payer: PayerFactory) -> None:
    payer = make_payer()
    token = held_pass({"podcast": 2**31, "articles": 2**31}, origin="http://127.0.0.1:9999")
    payer.tokens[(token.origin, token.scope)] = token
    offer = await shop.challenge(service="articles")
    outcome = await payer.handle_challenge(
        url=ORIGIN + "/articles/x", www_authenticate=[offer.header]
    )
    assert isinstance(outcome, Paid) and outcome.paid_here


# --- the SDK, over HTTP -------------------------------------------------------------------------


@pytest.fixture
def sdk_ledger(tmp_path: Path) -> Path:
    return tmp_path / "sdk-devledger.sqlite"


@pytest.fixture
def sdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))  # nothing falls back to ~
    return tmp_path / "home"


def sdk_auth(tmp_path: Path, ledger: Path, **limits: int) -> L402Auth:
    return L402Auth(
        wallet="dev", store=str(tmp_path / "sdk-client.sqlite"), dev_ledger=str(ledger), **limits
    )


@pytest.fixture
def auth(tmp_path: Path, sdk_ledger: Path, sdk_home: Path) -> Iterator[L402Auth]:
    with sdk_auth(tmp_path, sdk_ledger) as opened:
        yield opened


async def ledger_settled(server: ContractServer) -> int:
    return sum(1 for invoice in await server.ledger.list_invoices() if invoice["settled"])


@pytest.fixture
async def served(sdk_ledger: Path) -> AsyncIterator[ContractServer]:
    services = [
        PODCAST,
        SINGLE,
        Service("junk", bundle=5, balance_header="plenty"),
        Service("pod", sells=("pod", "art")),
        Service("art"),
        Service("strict", own_tokens_only=True),
        Service("passer", sells=("passer", "strict")),
    ]
    async with bundle_origin(sdk_ledger, services) as server:
        yield server


async def test_sdk_uses_a_bundle_up_then_pays_again(
    served: ContractServer, auth: L402Auth, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
        answers = [await client.get(f"{served.url}/podcast/ep{n}.mp3") for n in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.headers[BALANCE_HEADER] for a in answers] == [
        "2 requests",
        "1 requests",
        "0 requests",
        "2 requests",
    ]
    assert ["X-L402-Paid" in a.headers for a in answers] == [True, False, False, True]
    sent = served.authorizations["podcast"]
    # The first token three times; then the spent token stayed home and a new one was bought.
    assert sent[0] is None and sent[1] == sent[2] == sent[3] is not None
    assert sent[4] is None and sent[5] not in (None, sent[1]) and len(sent) == 6
    assert await ledger_settled(served) == 2


async def test_sdk_single_use_pays_each_call_and_stops_at_the_budget(
    served: ContractServer, tmp_path: Path, sdk_ledger: Path, sdk_home: Path
) -> None:
    with sdk_auth(tmp_path, sdk_ledger, max_fee_sat=0, budget_daily_sat=42) as auth:
        async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
            answers = [await client.get(f"{served.url}/api/call{n}") for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 402]
    assert answers[2].headers["X-L402-Refused"].startswith("budget_daily;")
    assert len([a for a in served.authorizations["api"] if a]) == 2


class PayerLoses:
    """A race (Race) whose winner is a request that did not pay the shared token (the
    client's ledger row names the URL it was paid for): the request that paid loses it."""

    def __init__(self, server: Answers, store_path: Path, paths: list[str]) -> None:
        self.race = Race(server, want=len(paths), winner=paths[0])
        self.store_path, self.paths = store_path, paths

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        if authorization is not None and self.race.raced is None:
            ledger = await ClientStore.open(str(self.store_path))
            try:
                newest = (await ledger.all_tokens())[0]
            finally:
                await ledger.close()
            paid_for = urlsplit(newest.url).path
            self.race.winner = next(p for p in self.paths if p != paid_for)
        return await self.race.answer(path, authorization)


@dataclass
class Unpatched:
    """The stand-in's own answer, before a test wrapped it."""

    own: Callable[[str, str | None], Awaitable[ServerAnswer]]

    async def answer(self, path: str, authorization: str | None) -> ServerAnswer:
        return await self.own(path, authorization)


def paid_sat(response: httpx.Response) -> int:
    value = response.headers.get("X-L402-Paid")
    return 0 if value is None else int(value.split(" ", 1)[0])


async def test_sdk_says_what_a_request_refused_after_paying_paid(
    served: ContractServer, tmp_path: Path, sdk_ledger: Path, sdk_home: Path
) -> None:
    """Two SDK calls at once share one payment; the server grants the one that waited and
    calls the token spent to the one that paid, which would pay once more alone, but the
    budget holds one payment: refused. It paid all the same: X-L402-Paid beside
    X-L402-Refused, so what X-L402-Paid says adds up to what was paid."""
    paths = ["/api/w0", "/api/w1"]
    loses = PayerLoses(Unpatched(served.answer), tmp_path / "sdk-client.sqlite", paths)
    served.answer = loses.answer  # type: ignore[method-assign]
    with sdk_auth(tmp_path, sdk_ledger, max_fee_sat=0, budget_daily_sat=21) as auth:
        async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
            answers = await asyncio.gather(*(client.get(served.url + path) for path in paths))
    refused = [a for a in answers if "X-L402-Refused" in a.headers]
    granted = [a for a in answers if a.status_code == 200]
    assert len(refused) == len(granted) == 1, [a.headers for a in answers]
    assert refused[0].headers["X-L402-Refused"].startswith("budget_daily; ")
    assert refused[0].headers["X-L402-Paid"] == "21 sat (fee 0 sat) for api"
    assert "X-L402-Paid" not in granted[0].headers
    assert sum(paid_sat(a) for a in answers) == 21 and await ledger_settled(served) == 1


class BreaksAlone(httpx.AsyncBaseTransport):
    """The SDK's connection breaks once, for the first request that carries a token other
    than the raced one (the one bought alone): httpx raises, the resend never arrives."""

    def __init__(self, race: Race) -> None:
        self.race, self.inner = race, httpx.AsyncHTTPTransport()
        self.broken: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        authorization = request.headers.get("Authorization")
        alone = authorization is not None and self.race.raced not in (None, authorization)
        if alone and not self.broken:
            assert authorization is not None
            self.broken.append(authorization)
            raise httpx.ConnectError("the connection broke", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_sdk_a_token_bought_alone_whose_resend_failed_goes_to_the_next_request(
    served: ContractServer, auth: L402Auth
) -> None:
    """Two SDK calls at once to a single-use service: the one that lost pays alone, and its
    resend fails (httpx raises, the flow is closed from the caller's loop): the token, paid
    and never presented, is released from there and the next call sends it up front."""
    race = Race(Unpatched(served.answer), want=2, winner=0)
    served.answer = race.answer  # type: ignore[method-assign]
    breaks = BreaksAlone(race)
    async with httpx.AsyncClient(auth=auth, transport=breaks, timeout=10) as client:
        got = await asyncio.gather(
            *(client.get(f"{served.url}/api/r{n}") for n in range(2)), return_exceptions=True
        )
        assert sum(isinstance(g, httpx.ConnectError) for g in got) == 1, got
        assert breaks.broken and await ledger_settled(served) == 2
        nxt = await client.get(f"{served.url}/api/r9")
    assert nxt.status_code == 200 and "X-L402-Paid" not in nxt.headers
    assert served.authorizations["api"][-1] == breaks.broken[0]
    assert await ledger_settled(served) == 2


async def test_sdk_ignores_a_malformed_balance(
    served: ContractServer, auth: L402Auth, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
        answers = [await client.get(f"{served.url}/junk/x{n}") for n in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert await ledger_settled(served) == 1
    assert "ignored from" in caplog.text


async def test_sdk_reuses_a_pass_and_pays_once_when_it_is_refused(
    served: ContractServer, auth: L402Auth
) -> None:
    async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
        assert (await client.get(f"{served.url}/pod/ep1")).status_code == 200
        art = await client.get(f"{served.url}/art/a1")
        assert art.status_code == 200 and "X-L402-Paid" not in art.headers
        assert await ledger_settled(served) == 1
        assert (await client.get(f"{served.url}/passer/p1")).status_code == 200
        strict = await client.get(f"{served.url}/strict/s1")
        assert strict.status_code == 200 and "X-L402-Paid" in strict.headers
        again = await client.get(f"{served.url}/strict/s2")
        assert again.status_code == 200 and "X-L402-Paid" not in again.headers
    assert await ledger_settled(served) == 3
    refused_pass = served.authorizations["strict"][1]
    assert refused_pass is not None and served.authorizations["strict"].count(refused_pass) == 1
    assert parse_credential(refused_pass).macaroons  # a real credential was tried


def test_sync_sdk_notes_the_balance_too(tmp_path: Path, sdk_ledger: Path, sdk_home: Path) -> None:
    """httpx.Client runs the SDK's flow through sync_auth_flow: the same notes, the same stop."""
    with (
        bundle_origin_thread(sdk_ledger, [PODCAST]) as server,
        sdk_auth(tmp_path, sdk_ledger) as auth,
        httpx.Client(auth=auth, trust_env=False, timeout=10) as client,
    ):
        answers = [client.get(f"{server.url}/podcast/ep{n}.mp3") for n in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert ["X-L402-Paid" in a.headers for a in answers] == [True, False, False, True]
    assert server.authorizations["podcast"][4] is None  # the spent token stayed home


# --- the client proxy (the addon), driven in-process --------------------------------------------


ProxyFactory = Callable[[int], Awaitable[L402Client]]


@pytest.fixture
async def start_proxy(tmp_path: Path, sdk_home: Path) -> AsyncIterator[ProxyFactory]:
    """Starts the client addon on a store and dev ledger in tmp_path, no fee, with the daily
    budget given (sat); stopped after the test."""
    with contextlib.ExitStack() as stack:
        started: list[L402Client] = []

        async def start(budget_sat: int) -> L402Client:
            addon = L402Client()
            tctx = stack.enter_context(taddons.context(addon))
            load(
                tctx,
                addon,
                l402_store=str(tmp_path / "client.sqlite"),
                l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
                l402_allow=["127.0.0.1:8081"],
                l402_max_fee_sat=0,
                l402_budget_daily_sat=budget_sat,
            )
            await addon.running()
            started.append(addon)
            return addon

        yield start
        for addon in started:
            await addon.done()


@pytest.fixture
async def proxy_origin(tmp_path: Path) -> AsyncIterator[ContractServer]:
    """The stand-in, invoicing from the proxy's dev ledger."""
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    await ledger.open()
    try:
        yield ContractServer(ledger, {SINGLE.name: SINGLE})
    finally:
        await ledger.close()


def through(addon: L402Client, server: Answers) -> None:
    """The addon's resends (httpx) go to `server`."""

    async def handle(request: httpx.Request) -> httpx.Response:
        got = await server.answer(request.url.path, request.headers.get("Authorization"))
        return httpx.Response(got.status, headers=got.headers, stream=Body(got.body.encode()))

    addon.http = httpx.AsyncClient(transport=httpx.MockTransport(handle))


async def proxied(addon: L402Client, server: Answers, path: str) -> mhttp.HTTPFlow:
    """One request through the addon: its request hook, the server's answer, its response
    hook (which pays and resends through `through`)."""
    flow = flow_to("127.0.0.1", 8081, path)
    await addon.request(flow)
    got = await server.answer(path, flow.request.headers.get("Authorization"))
    flow.response = mhttp.Response.make(got.status, got.body.encode(), dict(got.headers))
    await addon.response(flow)
    return flow


async def test_proxy_says_what_a_request_refused_after_paying_paid(
    start_proxy: ProxyFactory, proxy_origin: ContractServer, tmp_path: Path
) -> None:
    """Two calls at once through the proxy share one payment; the one that waited wins the
    single use, the one that paid would pay once more but the budget says no: it gets the
    402 with X-L402-Refused and X-L402-Paid both (it paid 21 sat for this call)."""
    proxy_addon = await start_proxy(PRICE_MSAT // 1000)
    paths = ["/api/x0", "/api/x1"]
    loses = PayerLoses(proxy_origin, tmp_path / "client.sqlite", paths)
    assert proxy_addon.http is not None
    await proxy_addon.http.aclose()
    through(proxy_addon, loses)
    flows = await asyncio.gather(*(proxied(proxy_addon, loses, path) for path in paths))
    responses = [flow.response for flow in flows]
    assert all(r is not None for r in responses)
    refused = [r for r in responses if r is not None and "X-L402-Refused" in r.headers]
    granted = [r for r in responses if r is not None and r.status_code == 200]
    assert len(refused) == len(granted) == 1
    assert refused[0].headers["X-L402-Refused"].startswith("budget_daily; ")
    assert refused[0].headers.get_all("X-L402-Paid") == ["21 sat (fee 0 sat) for api"]
    assert "X-L402-Paid" not in granted[0].headers
    assert await ledger_settled(proxy_origin) == 1
    said = next(f for f in flows if f.response is refused[0]).metadata["l402_client"]
    assert (said["refused"], said["paid"], said["amount_msat"]) == ("budget_daily", True, 21_000)


async def test_proxy_a_failed_resend_after_two_payments_says_both(
    start_proxy: ProxyFactory, proxy_origin: ContractServer, tmp_path: Path
) -> None:
    """The request that paid the shared token loses it and pays once more alone; its resend
    fails (httpx error). The 502 says what it paid in all (both payments, one X-L402-Paid),
    and the token bought alone, never presented, goes up front to the next request."""
    proxy_addon = await start_proxy(1000)
    paths = ["/api/y0", "/api/y1"]
    loses = PayerLoses(proxy_origin, tmp_path / "client.sqlite", paths)
    broken: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        authorization = request.headers.get("Authorization")
        alone = authorization is not None and loses.race.raced not in (None, authorization)
        if alone and not broken:  # the resend with the token bought alone
            assert authorization is not None
            broken.append(authorization)
            raise httpx.ConnectError("the connection broke", request=request)
        got = await loses.answer(request.url.path, authorization)
        return httpx.Response(got.status, headers=got.headers, stream=Body(got.body.encode()))

    assert proxy_addon.http is not None
    await proxy_addon.http.aclose()
    proxy_addon.http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    flows = await asyncio.gather(*(proxied(proxy_addon, loses, path) for path in paths))
    failed = [f.response for f in flows if f.response is not None and f.response.status_code == 502]
    assert len(failed) == 1 and broken
    assert failed[0].headers.get_all("X-L402-Paid") == ["42 sat (fee 0 sat) for api"]
    assert b"Paid 42 sat (fee 0 sat) for api, but asking the server again failed" in (
        failed[0].content or b""
    )
    assert await ledger_settled(proxy_origin) == 2
    nxt = await proxied(proxy_addon, proxy_origin, "/api/y9")
    assert nxt.response is not None and nxt.response.status_code == 200
    assert nxt.request.headers["Authorization"] == broken[0]
    assert "X-L402-Paid" not in nxt.response.headers
    assert await ledger_settled(proxy_origin) == 2


async def test_proxy_a_request_that_failed_says_its_token_was_not_granted(
    start_proxy: ProxyFactory, proxy_origin: ContractServer
) -> None:
    """A request that carried a token up front and failed without an answer (mitmproxy's
    error hook) counts as answered, not granted: a request lost to ours stops waiting."""
    proxy_addon = await start_proxy(1000)
    assert proxy_addon.http is not None
    await proxy_addon.http.aclose()
    through(proxy_addon, proxy_origin)
    proxy_origin.services = {"api": Service("api", bundle=3)}
    first = await proxied(proxy_addon, proxy_origin, "/api/z0")  # pays; /api/ learnt
    assert first.response is not None and first.response.status_code == 200
    payer = proxy_addon.payer
    assert payer is not None
    gone = flow_to("127.0.0.1", 8081, "/api/z1")
    await proxy_addon.request(gone)
    token = gone.metadata.get(TOKEN_KEY)
    assert token is not None  # the token bought first, up front
    gone.error = flow.Error("connection refused")
    proxy_addon.error(gone)
    entry = payer.carriers[token.payment_hash]
    assert (entry.carried, entry.answered, entry.granted) == (2, 2, 1)


# --- the wallet's own refusal codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("nwc_code", "expected"),
    [
        ("INSUFFICIENT_BALANCE", "insufficient_balance"),
        ("QUOTA_EXCEEDED", "quota_exceeded"),
        ("RATE_LIMITED", "rate_limited"),
        ("PAYMENT_FAILED", "payment_failed"),
        ("RESTRICTED", "payment_failed"),
    ],
)
async def test_a_wallet_refusal_keeps_the_wallets_own_code(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, nwc_code: str, expected: str
) -> None:
    """An NWC wallet that pays nothing says why (WalletRefused.refusal): the request is refused
    with that code when it is one of ours, payment_failed otherwise; nothing is paid either
    way and the ledger row is failed (the budget gets it back)."""
    refused = WalletRefused(f"NWC wallet: paying invoice: {nwc_code}: no", nwc_code)
    payer = make_payer(wallet=FakeWallet(pay_error=refused))
    offer = await shop.challenge()
    url = ORIGIN + "/podcast/ep1.mp3"
    outcome = await payer.handle_challenge(url=url, www_authenticate=[offer.header])
    assert outcome == Refused(expected, str(refused))
    assert expected in REFUSAL_CODES
    row = await store.payment(offer.payment_hash)
    assert row is not None and row.status == "failed" and await store.spent_msat() == 0


def test_refusal_code_takes_only_a_wallets_reason_it_knows() -> None:
    """A wallet's `refusal` is read as a reason for paying nothing, never as any other code
    (a wallet cannot make a refusal look like the server's or the budget's)."""
    assert refusal_code(PaymentFailed("no route")) == "payment_failed"
    for odd in ("rejected_after_payment", "budget_daily", "anything", 7, None):
        failed = PaymentFailed("odd")
        failed.refusal = odd  # type: ignore[attr-defined]
        assert refusal_code(failed) == "payment_failed"
    assert refusal_code(WalletRefused("x", "QUOTA_EXCEEDED")) == "quota_exceeded"
