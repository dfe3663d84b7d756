# ruff: noqa: F811
"""The client side of issue 14: bundles and single use (X-L402-Balance, wire facts 1 and 2) and
passes (wire fact 3).

The payer is driven the way the client addon and the SDK drive it, against the contract's
stand-in server (tests/bundle_origin.py) called without HTTP, with a real dev ledger and a real
client store in tmp_path; the SDK is then run over HTTP against the same stand-in served on
127.0.0.1. What was paid is read from the dev ledger itself.
"""

import asyncio
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.headers import format_challenge, parse_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import mint
from l402proxy.lightning import DevLedger, DevWallet, LightningError, PaymentResult
from l402proxy.payer import (
    BALANCE_HEADER,
    Answer,
    Await,
    Balance,
    Limits,
    Paid,
    Payer,
    Token,
    Verdict,
    about_token,
    parse_balance,
    scope_services,
    service_expiries,
    split_url,
)
from l402proxy.sdk import L402Auth
from l402proxy.store.client import MIGRATIONS, BudgetRefusal, ClientStore, NewPayment, Payment
from l402proxy.store.database import StoreError
from tests.bundle_origin import Answer as ServerAnswer
from tests.bundle_origin import ContractServer, Service, bundle_origin, bundle_origin_thread

# test_payer's fixtures (a real dev ledger and client store in tmp_path), used by name: pytest
# finds a fixture under the name it has here, hence F811 on the test functions' arguments.
from tests.unit.test_payer import (  # noqa: F401
    LISTENER,
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


@dataclass
class Fetched:
    answer: ServerAnswer
    verdict: Verdict | None  # None: the first answer was no 401/402
    sent: Token | None  # the token that went up front


async def fetch(payer: Payer, server: "ContractServer | Race", path: str) -> Fetched:
    """One request as the addon and the SDK make it: a payment under way for its scope
    waited for, the token up front, the answer's balance noted, a 401/402 through
    exchange() (its Awaits run here, its Resends go to the server)."""
    url = ORIGIN + path
    origin, _, _, request_path = split_url(url)
    flight = payer.flight_for(origin, request_path)
    if flight is not None:
        await asyncio.wait({flight}, timeout=payer.pay_timeout)
    sent = payer.up_front(origin, request_path)
    answer = await server.answer(path, None if sent is None else sent.credential)
    if answer.status not in (401, 402):
        if sent is not None and answer.header(BALANCE_HEADER):
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

    def __init__(
        self, server: ContractServer, want: int, winner: int | str, then: object = None
    ) -> None:
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
    assert payer.held_back == {}


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


async def test_a_request_that_loses_twice_does_not_pay_a_third_time(
    shop: Shop, origin: ContractServer, make_payer: PayerFactory, store: ClientStore
) -> None:
    """A server answering every token with "spent": the three requests that shared one
    payment each pay once more alone, and that token too is "spent": refused, never a
    third payment (four in all, at most two for any request)."""
    server = serve(origin, Service("api", bundle=1, spend_on_sight=True))
    race = Race(server, want=3, winner=0)
    payer = make_payer(limits=Limits(max_fee_sat=0))
    fetched = await asyncio.gather(*(fetch(payer, race, f"/api/s{n}") for n in range(3)))
    assert [refusal(f) for f in fetched] == ["rejected_after_payment"] * 3
    assert [f.answer.status for f in fetched] == [402] * 3
    assert await settled_count(shop) == 4 and await store.spent_msat() == 4 * PRICE_MSAT
    # Each request: no token, the shared one, its own (once), then nothing more.
    sent = server.authorizations["api"]
    assert sent.count(None) == 3 and sent.count(race.raced) == 3
    own = [a for a in sent if a not in (None, race.raced)]
    assert len(own) == len(set(own)) == 3
    await flushed(payer)
    for invoice in server.invoices[-3:]:
        assert await store.payment(invoice) is None  # the last challenges: never paid


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
    assert payer.held_back == {}
    (pending,) = await store.pending()
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
        waiting,
        budget_daily_msat=10**9,
        budget_total_msat=None,
        now=NOW,
        held_back=[live.payment_hash],
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


async def test_reserve_passes_over_payments_held_back(store: ClientStore) -> None:
    """A payment held back for its request is neither waited for (pending) nor taken (paid)
    by another payment of the scope."""
    pending, _ = new_payment()
    await store.reserve(pending, budget_daily_msat=10**9, budget_total_msat=None, now=NOW)
    other, _ = new_payment()
    reserved = await store.reserve(
        other,
        budget_daily_msat=10**9,
        budget_total_msat=None,
        now=NOW,
        held_back=[pending.payment_hash],
    )
    assert isinstance(reserved, Payment) and reserved.payment_hash == other.payment_hash
    paid = await paid_row(store, scope="services:articles")
    again, _ = new_payment("services:articles")
    taken = await store.reserve(again, budget_daily_msat=10**9, budget_total_msat=None, now=NOW)
    assert isinstance(taken, Payment) and taken.payment_hash == paid.payment_hash
    fresh = await store.reserve(
        again,
        budget_daily_msat=10**9,
        budget_total_msat=None,
        now=NOW,
        held_back=[paid.payment_hash],
    )
    assert isinstance(fresh, Payment) and fresh.payment_hash == again.payment_hash
    assert fresh.status == "pending"


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
