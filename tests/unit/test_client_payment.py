# ruff: noqa: F811
"""The client paying the Payment HTTP authentication scheme (issue 16; PROTOCOL.md, "The Payment
scheme"): which scheme a 402 is paid with, the checks before paying, one charge per request
(never cached, shared or sent twice, also for requests at once), the ledger rows, receipts, a
refusal after payment, crash recovery; the payer, the SDK and the client addon.

The server is tests/payment_server.py (a stand-in until the engine speaks Payment), on the same
dev ledger file as the payer's wallet: what was paid is read from the ledger.
"""

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.test import taddons

from l402proxy.client import L402Client, problem_of
from l402proxy.l402.charge_request import ChargeRequest
from l402proxy.l402.headers import parse_credential
from l402proxy.l402.payment import (
    INTENT_CHARGE,
    METHOD_LIGHTNING,
    Challenge,
    challenge_id,
    decode_credential,
    encode_receipt,
    format_rfc3339,
    header_value,
    problem_json,
)
from l402proxy.lightning import NEW_WALLET_BALANCE_MSAT, DevLedger, DevWallet, NodeInfo
from l402proxy.payer import (
    ACCEPT_PAYMENT,
    Answer,
    Await,
    Limits,
    Paid,
    Payer,
    Refused,
    Verdict,
    charge_key,
    parse_prefer,
    pick_charge,
    problem_type,
)
from l402proxy.sdk import L402Auth
from l402proxy.store.client import MIGRATIONS, ClientStore, NewPayment, Payment
from tests.payment_server import (
    NETWORK,
    REALM,
    ROUTES,
    SECRET,
    PaymentServer,
    Route,
    payment_server,
)
from tests.payment_server import Answer as ServerAnswer

# test_payer's and test_client_addon's fixtures, used by name (hence F811 on the arguments).
from tests.unit.test_client_addon import Body, addon, flow_to, home, load  # noqa: F401
from tests.unit.test_payer import (  # noqa: F401
    LISTENER,
    Clock,
    PayerFactory,
    clock,
    flushed,
    foreign_invoice,
    ledger_path,
    make_payer,
    offline_challenge,
    store,
    store_path,
)

ORIGIN = "http://127.0.0.1:8081"
PRICE_MSAT = 21_000


# --- pure pieces ------------------------------------------------------------------------------


def charge_header(
    *,
    amount_sat: int = 21,
    amount_msat: int | None = 21_000,
    method: str = METHOD_LIGHTNING,
    expires_in: float | None = 300,
) -> str:
    """A Payment challenge for a foreign invoice (never payable here)."""
    payment_hash = os.urandom(32)
    invoice = foreign_invoice(payment_hash, amount_msat)
    request = ChargeRequest(amount_sat, invoice, payment_hash, NETWORK).encode()
    expires = None if expires_in is None else format_rfc3339(time.time() + expires_in)
    unbound = Challenge("", REALM, method, INTENT_CHARGE, request, expires=expires)
    return header_value(replace(unbound, id=challenge_id(SECRET, unbound)))


@pytest.mark.parametrize(
    ("text", "expected"), [("l402", "l402"), ("payment", "payment"), (" Payment ", "payment")]
)
def test_parse_prefer(text: str, expected: str) -> None:
    assert parse_prefer(text) == expected


@pytest.mark.parametrize("text", ["", "lsat", "payments", "l402,payment"])
def test_parse_prefer_refuses_in_one_line(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_prefer(text)
    assert str(caught.value) == f"l402_prefer must be l402 or payment, got {text!r}"


def test_pick_charge() -> None:
    good = charge_header()
    picked = pick_charge([offline_challenge(), good])
    assert not isinstance(picked, Refused) and picked is not None
    assert picked.request.amount_sat == 21 and picked.scope == f"payment:{REALM}"
    # Another method or intent is no charge of ours; a malformed Payment challenge is refused.
    assert pick_charge([charge_header(method="tempo")]) is None
    assert pick_charge(['Basic realm="x"', offline_challenge()]) is None
    refused = pick_charge(['Payment id="x", realm="r"'])
    assert isinstance(refused, Refused) and refused.code == "bad_challenge"
    assert "without the method parameter" in refused.message
    broken = good.replace('request="', 'request="!!')
    unreadable = pick_charge([broken])
    assert isinstance(unreadable, Refused) and unreadable.code == "bad_challenge"
    assert unreadable.message.startswith("no usable Payment request in the challenge: ")


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (
            "application/problem+json",
            problem_json("payment-expired", "Payment Expired", "late", 402),
            "payment-expired",
        ),
        ("Application/Problem+JSON; charset=utf-8", b'{"type":"urn:x:odd"}', "urn:x:odd"),
        ("application/json", b'{"type":"https://paymentauth.org/problems/x"}', None),
        ("application/problem+json", b"not json", None),
        ("application/problem+json", b'{"type": 5}', None),
        ("application/problem+json", b"[]", None),
        ("application/problem+json", b'{"type":"a\\r\\nX-Evil: 1"}', "a X-Evil: 1"),
        (None, b'{"type":"x"}', None),
        ("application/problem+json", b"", None),
    ],
)
def test_problem_type(content_type: str | None, body: bytes, expected: str | None) -> None:
    assert problem_type(content_type, body) == expected


def test_problem_type_reads_no_large_body() -> None:
    body = json.dumps({"type": "big", "detail": "x" * 70_000}).encode()
    assert problem_type("application/problem+json", body) is None


def test_charge_key_is_the_same_for_the_proxy_and_the_sdk() -> None:
    assert charge_key("http://127.0.0.1/a?x=1") == charge_key("http://127.0.0.1:80/a?x=1")
    assert charge_key("http://Example.com/a") == "http://example.com:80/a"
    assert charge_key("http://h/a?x=1") != charge_key("http://h/a?x=2")
    assert charge_key("http://h") == "http://h:80/"


@pytest.mark.parametrize(
    ("prefer", "headers", "expected"),
    [
        ("l402", ["payment"], "payment"),
        ("l402", ["l402", "payment"], "l402"),
        ("l402", ["payment", "l402"], "l402"),
        ("payment", ["l402", "payment"], "payment"),
        ("payment", ["l402"], "l402"),
        ("l402", ["l402"], "l402"),
        ("payment", ["broken l402", "payment"], "payment"),
        ("l402", ["broken l402", "payment"], "payment"),  # a usable one beats a refusal
        ("l402", ["broken l402", "tempo"], "l402"),  # the refusal says why
        ("payment", ["tempo"], None),
        ("l402", [], None),
    ],
)
async def test_scheme_for_follows_the_preference(
    make_payer: PayerFactory, prefer: str, headers: list[str], expected: str | None
) -> None:
    payer = make_payer()
    payer.prefer = prefer
    made = {
        "payment": charge_header(),
        "l402": offline_challenge(),
        "broken l402": 'L402 macaroon="bm90", invoice="lnbcrt1"',
        "tempo": charge_header(method="tempo"),
    }
    values = [made[name] for name in headers]
    assert payer.scheme_for(values, ORIGIN + "/pay/x") == expected


# --- the payer against the stand-in server ----------------------------------------------------


def answer_of(answer: ServerAnswer, url: str) -> Answer:
    return Answer(
        answer.status,
        tuple(answer.header("WWW-Authenticate")),
        url,
        tuple(answer.header("X-L402-Balance")),
        tuple(answer.header("Payment-Receipt")),
        problem_type(answer.content_type, answer.body),
    )


async def drive(payer: Payer, server: PaymentServer, url: str) -> tuple[ServerAnswer, Verdict]:
    """One request as the addon and the SDK drive it: a token held for the URL's scope or a
    charge paid earlier for this URL up front, then the payer's exchange; the server is
    called without HTTP."""
    path = urlsplit(url).path
    sent = payer.up_front(ORIGIN, path) or await payer.take_charge(url)
    answer = await server.answer(path, sent.credential if sent else None, ACCEPT_PAYMENT)
    if answer.status not in (401, 402):
        if sent is not None:
            await payer.note_receipt(sent, answer_of(answer, url))
        return answer, Verdict()
    steps = payer.exchange(url, answer_of(answer, url), sent)
    try:
        step = next(steps)
        while True:
            if isinstance(step, Await):
                step = steps.send(await step.job)
            else:
                answer = await server.answer(path, step.authorization, ACCEPT_PAYMENT)
                step = steps.send(answer_of(answer, url))
    except StopIteration as stop:
        return answer, stop.value


@pytest.fixture
async def server(ledger_path: Path) -> AsyncIterator[PaymentServer]:
    ledger = DevLedger(ledger_path)
    await ledger.open()
    yield PaymentServer(ledger, {route.name: route for route in ROUTES})
    await ledger.close()


@pytest.fixture
async def payer(make_payer: PayerFactory) -> Payer:
    started = make_payer()
    await started.start()
    return started


async def settled_count(server: PaymentServer) -> int:
    return sum(1 for invoice in await server.ledger.list_invoices() if invoice["settled"])


async def charges(store: ClientStore) -> list[Payment]:
    hashes = [e["payment_hash"] for e in await store.history() if e["event"] != "refused"]
    rows = [await store.payment(bytes.fromhex(h)) for h in hashes]
    return [row for row in rows if row is not None and row.is_charge]


async def test_pays_a_payment_only_challenge_and_keeps_the_receipt(
    payer: Payer, server: PaymentServer, store: ClientStore
) -> None:
    answer, verdict = await drive(payer, server, ORIGIN + "/pay/ep1")
    assert answer.status == 200 and answer.body == b"paid /pay/ep1 with Payment\n"
    paid = verdict.paid
    assert paid is not None and paid.paid_here and paid.token.charge
    assert (paid.amount_msat, paid.fee_msat) == (PRICE_MSAT, 0)
    assert paid.header() == f"21 sat (fee 0 sat) for payment:{REALM}"
    (sent,) = [a for a in server.authorizations["pay"] if a is not None]
    assert sent == paid.token.credential and sent.startswith("Payment ")
    assert server.accept_payment["pay"] == [ACCEPT_PAYMENT] * 2
    assert await settled_count(server) == 1

    (row,) = await charges(store)
    credential = decode_credential(sent)
    assert (row.scheme, row.status, row.macaroon, row.services) == ("Payment", "paid", "", ())
    assert row.scope == f"payment:{REALM}" and row.url == ORIGIN + "/pay/ep1"
    assert json.loads(row.challenge or "") == credential.challenge.echo()
    assert row.presented_at is not None and row.dropped_at is None
    assert row.valid_until == credential.challenge.expires_at()
    receipt = json.loads(row.receipt or "")
    assert receipt["reference"] == row.payment_hash.hex() and receipt["status"] == "success"
    assert receipt["challengeId"] == credential.challenge.id and receipt["method"] == "lightning"

    (event,) = await store.history()
    assert (event["event"], event["scheme"], event["amount_sat"]) == ("paid", "Payment", 21)
    assert event["receipt"] == receipt and event["presented_at"] == row.presented_at
    assert row.preimage is not None and row.preimage.hex() not in json.dumps(event)
    # No token: nothing for the scope, nothing sent up front, nothing in `wallet tokens`.
    assert payer.tokens == {} and payer.paths == {} and payer.unused == {}
    assert await store.tokens(time.time()) == [] and await store.all_tokens() == []
    assert await store.spent_msat() == PRICE_MSAT  # counted in the budgets like any payment


async def test_a_charge_is_never_sent_again(payer: Payer, server: PaymentServer) -> None:
    url = ORIGIN + "/pay/ep1"
    verdicts = [(await drive(payer, server, url))[1] for _ in range(3)]
    assert all(v.paid is not None and v.paid.paid_here for v in verdicts)
    sent = server.authorizations["pay"]
    # Every request starts without a credential, and each pays its own.
    assert sent[0::2] == [None, None, None] and len(set(sent[1::2])) == 3
    assert len(server.consumed) == 3 and await settled_count(server) == 3


async def test_requests_at_once_each_pay_once(payer: Payer, server: PaymentServer) -> None:
    """No single flight for charges: each request pays for itself, and no credential is sent
    with two requests."""
    results = await asyncio.gather(*(drive(payer, server, ORIGIN + "/pay/ep1") for _ in range(6)))
    assert [answer.status for answer, _ in results] == [200] * 6
    assert all(v.paid is not None and v.paid.paid_here for _, v in results)
    credentials = [a for a in server.authorizations["pay"] if a is not None]
    assert len(credentials) == len(set(credentials)) == 6
    assert server.granted["pay"] == 6 and await settled_count(server) == 6
    assert await server.ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 6 * PRICE_MSAT


async def test_requests_at_once_stop_at_the_budget(
    make_payer: PayerFactory, server: PaymentServer
) -> None:
    payer = make_payer(limits=Limits(max_fee_sat=0, budget_daily_sat=3 * 21))
    await payer.start()
    results = await asyncio.gather(*(drive(payer, server, ORIGIN + "/pay/ep1") for _ in range(5)))
    codes = sorted(v.refused.code if v.refused else "paid" for _, v in results)
    assert codes == ["budget_daily", "budget_daily", "paid", "paid", "paid"]
    assert await settled_count(server) == 3


async def test_a_charge_refused_right_after_payment_is_not_paid_again(
    payer: Payer, server: PaymentServer, store: ClientStore
) -> None:
    answer, verdict = await drive(payer, server, ORIGIN + "/expired/ep1")
    assert answer.status == 402 and verdict.paid is None
    refused = verdict.refused
    assert refused is not None and refused.code == "rejected_after_payment"
    assert "(payment-expired)" in refused.message and "not paying again" in refused.message
    assert "\n" not in refused.header()
    assert server.challenges["expired"] == 2 and await settled_count(server) == 1
    (row,) = await charges(store)
    assert row.dropped_at is not None and row.receipt is None
    await flushed(payer)
    reasons = [e["reason"] for e in await store.history() if e["event"] == "refused"]
    assert reasons == ["rejected_after_payment"]


class MainnetWallet(DevWallet):
    async def info(self) -> NodeInfo:
        return NodeInfo(backend="dev", address="x", network="mainnet")


@pytest.mark.parametrize(
    ("path", "limits", "code", "words"),
    [
        (
            "/amount/x",
            None,
            "request_mismatch",
            "the invoice is for 21000 msat, the request for 22",
        ),
        ("/hash/x", None, "request_mismatch", "paymentHash is not the invoice's payment hash"),
        ("/network/x", None, "request_mismatch", "the request says mainnet, the invoice is for"),
        ("/dear/x", None, "max_price", "asks 500 sat, more than l402_max_price_sat 100"),
        ("/pay/x", Limits(allow=("example.com",)), "not_allowed", "not in l402_allow"),
        ("/pay/x", Limits(budget_daily_sat=20), "budget_daily", "l402_budget_daily_sat"),
        ("/pay/x", Limits(budget_total_sat=30), "budget_total", "l402_budget_total_sat"),
        ("/pay/x", Limits(max_price_sat=20), "max_price", "asks 21 sat"),
    ],
)
async def test_a_challenge_that_fails_a_check_is_never_paid(
    make_payer: PayerFactory,
    server: PaymentServer,
    store: ClientStore,
    path: str,
    limits: Limits | None,
    code: str,
    words: str,
) -> None:
    payer = make_payer(limits=limits)
    await payer.start()
    answer, verdict = await drive(payer, server, ORIGIN + path)
    assert answer.status == 402 and verdict.paid is None
    assert verdict.refused is not None and verdict.refused.code == code
    assert words in verdict.refused.message and "\n" not in verdict.refused.message
    assert await settled_count(server) == 0 and server.consumed == set()
    assert await server.ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT
    assert await charges(store) == []
    await flushed(payer)
    (event,) = await store.history()
    assert (event["event"], event["reason"]) == ("refused", code)


async def test_a_wallet_on_another_network_pays_nothing(
    make_payer: PayerFactory, server: PaymentServer, ledger_path: Path
) -> None:
    payer = make_payer(wallet=MainnetWallet(DevLedger(ledger_path), LISTENER))
    await payer.start()
    _, verdict = await drive(payer, server, ORIGIN + "/pay/x")
    assert verdict.refused is not None and verdict.refused.code == "wrong_network"
    assert await settled_count(server) == 0


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (lambda: charge_header(expires_in=-1), "challenge_expired"),
        (lambda: charge_header(amount_msat=None), "no_amount"),
        (lambda: charge_header().replace('request="', 'request="x'), "bad_challenge"),
    ],
)
async def test_more_challenges_never_paid(
    payer: Payer, store: ClientStore, header: Callable[[], str], code: str
) -> None:
    outcome = await payer.pay_charge(url=ORIGIN + "/x", www_authenticate=[header()])
    assert isinstance(outcome, Refused) and outcome.code == code
    assert await charges(store) == [] and await store.pending() == []


async def test_an_expired_invoice_is_never_paid(
    payer: Payer, clock: Clock, ledger_path: Path
) -> None:
    """A challenge without `expires` (optional in the draft): the invoice's expiry decides."""
    ledger = DevLedger(ledger_path)
    try:
        invoice = await ledger.create_invoice("merchant", PRICE_MSAT, "x", 60)
    finally:
        await ledger.close()
    request = ChargeRequest(21, invoice.bolt11, invoice.payment_hash, NETWORK).encode()
    unbound = Challenge("", REALM, METHOD_LIGHTNING, INTENT_CHARGE, request)
    made = header_value(replace(unbound, id=challenge_id(SECRET, unbound)))
    clock.now = invoice.expires_at + 1
    outcome = await payer.pay_charge(url=ORIGIN + "/x", www_authenticate=[made])
    assert isinstance(outcome, Refused) and outcome.code == "invoice_expired"
    clock.now = invoice.expires_at - 10
    paid = await payer.pay_charge(url=ORIGIN + "/x", www_authenticate=[made])
    assert isinstance(paid, Paid) and paid.token.valid_until == invoice.expires_at


async def test_the_challenge_expiry_is_checked_with_the_payers_clock(
    payer: Payer, server: PaymentServer, clock: Clock
) -> None:
    clock.now += 301  # the stand-in's challenges expire after 300 s
    _, verdict = await drive(payer, server, ORIGIN + "/pay/x")
    assert verdict.refused is not None and verdict.refused.code == "challenge_expired"
    assert await settled_count(server) == 0


# --- the preference -----------------------------------------------------------------------------


async def test_a_server_offering_both_is_paid_with_l402_by_default(
    payer: Payer, server: PaymentServer
) -> None:
    for n in range(3):
        answer, _ = await drive(payer, server, ORIGIN + f"/both/ep{n}")
        assert answer.status == 200
    # One L402 payment; its token opens the next requests too.
    assert server.paid_with["both"] == ["L402"] * 3
    assert await settled_count(server) == 1
    assert all(parse_credential(a).macaroons for a in server.authorizations["both"][1:])


async def test_a_server_offering_both_is_paid_with_payment_when_preferred(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    payer = make_payer()
    payer.prefer = "payment"
    await payer.start()
    for n in range(3):
        answer, verdict = await drive(payer, server, ORIGIN + f"/both/ep{n}")
        assert answer.status == 200 and verdict.paid is not None and verdict.paid.paid_here
    assert server.paid_with["both"] == ["Payment"] * 3
    assert await settled_count(server) == 3
    assert payer.tokens == {} and len(await charges(store)) == 3


async def test_a_held_l402_token_refused_is_dropped_when_paying_by_payment(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    payer = make_payer()
    await payer.start()
    assert (await drive(payer, server, ORIGIN + "/both/ep1"))[0].status == 200
    (token,) = payer.tokens.values()
    payer.prefer = "payment"
    url = ORIGIN + "/both/ep2"
    sent = payer.up_front(ORIGIN, "/both/ep2")
    assert sent == token
    # The server no longer takes it (as if revoked): a 402, offering both schemes.
    answer = await server.answer("/both/ep2", None, ACCEPT_PAYMENT)
    steps = payer.exchange(url, answer_of(answer, url), sent)
    step = next(steps)
    while isinstance(step, Await):
        step = steps.send(await step.job)
    assert step.authorization is not None and step.authorization.startswith("Payment ")
    steps.close()
    assert payer.tokens == {}
    row = await store.payment(token.payment_hash)
    assert row is not None and row.dropped_at is not None


# --- charges paid and never sent ---------------------------------------------------------------


async def test_a_late_success_is_presented_by_the_next_request_to_its_url(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore, ledger_path: Path
) -> None:
    """The wallet answers after pay_timeout: the request gets the 402; the charge, settled by
    recovery, goes with the next request to that URL, and is not paid again."""
    wallet = DevWallet(DevLedger(ledger_path), LISTENER, delay=30)
    await wallet.start()
    payer = make_payer(wallet=wallet, pay_timeout=0.2)
    await payer.start()
    url = ORIGIN + "/pay/ep1"
    _, verdict = await drive(payer, server, url)
    assert verdict.refused is not None and verdict.refused.code == "payment_pending"
    (settled,) = await payer.recover()
    assert settled.is_charge and settled.presented_at is None
    assert [t.payment_hash for t in payer.unused[charge_key(url)]] == [settled.payment_hash]
    # The wallet is quick again. Another URL does not get the charge: that request pays its own.
    await wallet.close()
    payer.wallet = DevWallet(DevLedger(ledger_path), LISTENER)
    other, _ = await drive(payer, server, ORIGIN + "/pay/other")
    assert server.authorizations["pay"][-2] is None and other.status == 200

    answer, verdict = await drive(payer, server, url)
    assert answer.status == 200 and verdict == Verdict()
    last = server.authorizations["pay"][-1]
    assert last is not None
    preimage = decode_credential(last).preimage or b""
    assert hashlib.sha256(preimage).digest() == settled.payment_hash
    assert server.paid_with["pay"] == ["Payment", "Payment"]
    assert await settled_count(server) == 2
    row = await store.payment(settled.payment_hash)
    assert row is not None and row.presented_at is not None and row.receipt is not None
    # Presented once: never again.
    assert payer.unused == {} and await payer.take_charge(url) is None


async def crashed_charge(
    server: PaymentServer, store: ClientStore, payer: Payer, url: str, owner: str = ""
) -> Payment:
    """What a process that died mid-payment left: a pending charge row, paid in the ledger."""
    first = await server.answer(urlsplit(url).path, None)
    offer = pick_charge(first.header("WWW-Authenticate"))
    assert offer is not None and not isinstance(offer, Refused)
    await server.ledger.pay(LISTENER, offer.request.invoice, 0)
    reserved = await store.reserve(
        NewPayment(
            payment_hash=offer.request.payment_hash or b"",
            origin=ORIGIN,
            url=url,
            scope=offer.scope,
            services=(),
            scheme="Payment",
            macaroon="",
            bolt11=offer.request.invoice,
            amount_msat=PRICE_MSAT,
            fee_limit_msat=0,
            valid_until=offer.challenge.expires_at(),
            wallet=f"dev:{LISTENER}@{server.ledger.path}",
            owner=owner,
            challenge=json.dumps(offer.challenge.echo()),
        ),
        budget_daily_msat=10**9,
        budget_total_msat=None,
        now=time.time(),
    )
    assert isinstance(reserved, Payment)
    return reserved


async def test_a_charge_cut_short_by_a_crash_is_recovered_and_presented(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    url = ORIGIN + "/pay/ep1"
    payer = make_payer()
    left = await crashed_charge(server, store, payer, url)
    (settled,) = await payer.start()
    assert settled.payment_hash == left.payment_hash and settled.status == "paid"
    assert payer.tokens == {}  # no token for a scope
    answer, verdict = await drive(payer, server, url)
    assert answer.status == 200 and verdict == Verdict()
    assert server.paid_with["pay"] == ["Payment"] and await settled_count(server) == 1


async def test_a_recovered_charge_the_server_refuses_is_dropped_and_the_request_pays(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    """Sent before the crash after all (the server consumed it): refused once, dropped, and
    the request pays for itself: one payment for it, not two."""
    url = ORIGIN + "/pay/ep1"
    payer = make_payer()
    left = await crashed_charge(server, store, payer, url)
    server.consumed.add(left.payment_hash)
    await payer.start()
    answer, verdict = await drive(payer, server, url)
    assert answer.status == 200
    assert verdict.paid is not None and verdict.paid.paid_here
    # The held charge, then (paying the fresh challenge of the 402 to it) the request's own.
    held, own = server.authorizations["pay"][1:]
    assert held is not None and own is not None
    assert decode_credential(held).challenge.id != decode_credential(own).challenge.id
    row = await store.payment(left.payment_hash)
    assert row is not None and row.dropped_at is not None
    assert await settled_count(server) == 2


async def test_a_recovered_charge_refused_twice_is_not_paid_a_third_time(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    url = ORIGIN + "/expired/ep1"
    payer = make_payer()
    left = await crashed_charge(server, store, payer, url)
    await payer.start()
    answer, verdict = await drive(payer, server, url)
    assert answer.status == 402
    assert verdict.refused is not None and verdict.refused.code == "rejected_after_payment"
    assert server.challenges["expired"] == 3  # the crashed one's, the held one's, the new one's
    assert await settled_count(server) == 2
    assert (await store.payment(left.payment_hash)).dropped_at is not None  # type: ignore[union-attr]


async def test_an_expired_unused_charge_is_not_sent(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore, clock: Clock
) -> None:
    url = ORIGIN + "/pay/ep1"
    payer = make_payer()
    left = await crashed_charge(server, store, payer, url)
    await payer.start()
    assert charge_key(url) in payer.unused
    assert left.valid_until is not None
    clock.now = left.valid_until + 1
    assert await payer.take_charge(url) is None
    row = await store.payment(left.payment_hash)
    assert row is not None and row.presented_at is None


async def test_a_charge_of_a_live_process_is_left_to_it(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    url = ORIGIN + "/pay/ep1"
    payer = make_payer()
    left = await crashed_charge(server, store, payer, url, owner=f"{os.getpid()}:other")
    await store.settle(left.payment_hash, os.urandom(32), 0, time.time())
    await payer.start()
    assert payer.unused == {}


async def test_a_charge_is_presented_by_one_process_only(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    """Two payers on one store (the proxy and the SDK): the store hands the charge to one."""
    url = ORIGIN + "/pay/ep1"
    first, second = make_payer(), make_payer()
    await crashed_charge(server, store, first, url)
    await first.start()
    await second.start()
    taken = await asyncio.gather(first.take_charge(url), second.take_charge(url))
    assert sum(token is not None for token in taken) == 1


async def test_a_charge_whose_request_went_away_goes_with_the_next_request(
    make_payer: PayerFactory,
    server: PaymentServer,
    store: ClientStore,
    ledger_path: Path,
    clock: Clock,
) -> None:
    """The request is cancelled while its charge is being paid: the payment goes through (it
    is shielded) and, once that request can no longer send it, the next one to the URL does."""
    wallet = DevWallet(DevLedger(ledger_path), LISTENER, hold=0.3)
    payer = make_payer(wallet=wallet, pay_timeout=5)
    await payer.start()
    url = ORIGIN + "/pay/ep1"
    request = asyncio.create_task(drive(payer, server, url))
    await asyncio.sleep(0.1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait(list(payer.lone_flights), timeout=5)
    (row,) = await charges(store)
    assert row.status == "paid" and row.presented_at is None
    await payer.recover()
    assert payer.unused == {}  # still its request's, for pay_timeout
    clock.now += 6
    await payer.recover()
    answer, verdict = await drive(payer, server, url)
    assert answer.status == 200 and verdict == Verdict()
    assert await settled_count(server) == 1


# --- receipts ---------------------------------------------------------------------------------


async def test_an_answer_without_a_receipt_is_still_paid(
    make_payer: PayerFactory, server: PaymentServer, store: ClientStore
) -> None:
    server.routes["plain"] = Route("plain", receipt=False)
    payer = make_payer()
    await payer.start()
    answer, verdict = await drive(payer, server, ORIGIN + "/plain/x")
    assert answer.status == 200 and verdict.paid is not None
    (row,) = await charges(store)
    assert row.receipt is None and row.presented_at is not None


@pytest.mark.parametrize(
    ("receipt", "kept", "log"),
    [
        ("!!!", False, "ignored the Payment-Receipt"),
        ("eyJzdGF0dXMiOiJmYWlsZWQifQ", False, 'receipt status is not "success"'),
        (encode_receipt("other", os.urandom(32), 1e9), True, "names another payment"),
    ],
)
async def test_a_malformed_or_foreign_receipt(
    payer: Payer,
    store: ClientStore,
    server: PaymentServer,
    caplog: pytest.LogCaptureFixture,
    receipt: str,
    kept: bool,
    log: str,
) -> None:
    server.routes["plain"] = Route("plain", receipt=False)
    answer, verdict = await drive(payer, server, ORIGIN + "/plain/x")
    assert answer.status == 200 and verdict.paid is not None
    with caplog.at_level(logging.INFO, logger="l402proxy.payer"):
        await payer.note_receipt(
            verdict.paid.token, Answer(200, (), ORIGIN + "/plain/x", (), (receipt,), None)
        )
    assert log in caplog.text
    (row,) = await charges(store)
    assert (row.receipt is not None) is kept


# --- the ledger ---------------------------------------------------------------------------------


async def test_a_ledger_of_schema_2_is_migrated_and_its_tokens_kept(tmp_path: Path) -> None:
    path = tmp_path / "client.sqlite"
    with sqlite3.connect(path) as db:
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO payments (payment_hash, origin, url, scope, services, scheme, macaroon,"
            " bolt11, amount_msat, fee_limit_msat, fee_msat, status, preimage, valid_until,"
            " wallet, owner, created_at, updated_at, balance, balance_unit)"
            " VALUES (?, ?, ?, 'services:podcast', 'podcast', 'L402', 'AgEEbHNhdA==',"
            " 'lnbcrt1', 21000, 0, 0, 'paid', ?, NULL, 'dev', '', 1, 1, 2, 'requests')",
            (os.urandom(32), ORIGIN, ORIGIN + "/podcast/ep1.mp3", os.urandom(32)),
        )
    db.close()
    opened = await ClientStore.open(str(path))
    try:
        (token,) = await opened.tokens(2.0)
        assert (token.balance, token.challenge, token.presented_at, token.receipt) == (
            2,
            None,
            None,
            None,
        )
        (event,) = await opened.history()
        assert (event["scheme"], event["receipt"], event["presented_at"]) == ("L402", None, None)
    finally:
        await opened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    db.close()


async def test_present_claims_a_charge_once(
    payer: Payer, server: PaymentServer, store: ClientStore
) -> None:
    left = await crashed_charge(server, store, payer, ORIGIN + "/pay/x")
    assert not await store.present(left.payment_hash, 1.0)  # pending: nothing to present
    await store.settle(left.payment_hash, os.urandom(32), 0, 2.0)
    assert [p.payment_hash for p in await store.unused_charges(0.0)] == [left.payment_hash]
    assert await store.present(left.payment_hash, 3.0)
    assert not await store.present(left.payment_hash, 4.0)
    assert await store.unused_charges(0.0) == []
    assert (await store.payment(left.payment_hash)).presented_at == 3.0  # type: ignore[union-attr]


# --- the SDK ------------------------------------------------------------------------------------


@pytest.fixture
def sdk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[PaymentServer]:
    async with payment_server(tmp_path / "sdk-ledger.sqlite") as started:
        yield started


def sdk_auth(tmp_path: Path, **options: object) -> L402Auth:
    return L402Auth(
        wallet="dev",
        store=str(tmp_path / "sdk-client.sqlite"),
        dev_ledger=str(tmp_path / "sdk-ledger.sqlite"),
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def auth(tmp_path: Path, sdk_home: Path) -> Iterator[L402Auth]:
    with sdk_auth(tmp_path) as opened:
        yield opened


async def test_sdk_pays_each_request_once_and_sends_accept_payment(
    served: PaymentServer, auth: L402Auth
) -> None:
    async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
        answers = [await client.get(f"{served.url}/pay/ep1") for _ in range(2)]
        together = await asyncio.gather(*(client.get(f"{served.url}/pay/ep2") for _ in range(5)))
    assert [a.status_code for a in answers + list(together)] == [200] * 7
    assert all(a.headers["X-L402-Paid"].startswith("21 sat") for a in answers + list(together))
    assert "Payment-Receipt" in answers[0].headers
    credentials = [a for a in served.authorizations["pay"] if a is not None]
    assert len(credentials) == len(set(credentials)) == 7
    assert served.accept_payment["pay"] == [ACCEPT_PAYMENT] * 14
    assert await settled_count(served) == 7


async def test_sdk_names_the_problem_type_of_a_refusal_after_payment(
    served: PaymentServer, auth: L402Auth
) -> None:
    async with httpx.AsyncClient(auth=auth, trust_env=False, timeout=10) as client:
        answer = await client.get(f"{served.url}/expired/ep1")
        mismatch = await client.get(f"{served.url}/amount/ep1")
    assert answer.status_code == 402
    refused = answer.headers["X-L402-Refused"]
    assert refused.startswith("rejected_after_payment; ") and "(payment-expired)" in refused
    assert answer.json()["type"].endswith("/payment-expired")  # the body is still there to read
    assert mismatch.headers["X-L402-Refused"].startswith("request_mismatch; ")
    assert await settled_count(served) == 1


def test_sync_sdk_prefers_payment_when_told(
    tmp_path: Path, sdk_home: Path, served_thread: PaymentServer
) -> None:
    with (
        sdk_auth(tmp_path, prefer="payment") as auth,
        httpx.Client(auth=auth, trust_env=False, timeout=10) as client,
    ):
        answers = [client.get(f"{served_thread.url}/both/ep{n}") for n in range(2)]
        refused = client.get(f"{served_thread.url}/expired/ep1")
    assert [a.status_code for a in answers] == [200, 200]
    assert served_thread.paid_with["both"] == ["Payment", "Payment"]
    assert "(payment-expired)" in refused.headers["X-L402-Refused"]


def test_sdk_refuses_a_bad_preference(tmp_path: Path, sdk_home: Path) -> None:
    with pytest.raises(ValueError, match="l402_prefer must be l402 or payment, got 'both'"):
        sdk_auth(tmp_path, prefer="both")


@pytest.fixture
def served_thread(tmp_path: Path) -> Iterator[PaymentServer]:
    """The stand-in on a loop of its own thread, for the synchronous client."""
    loop = asyncio.new_event_loop()
    context = payment_server(tmp_path / "sdk-ledger.sqlite")
    started = loop.run_until_complete(context.__aenter__())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield started
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


# --- the client addon ---------------------------------------------------------------------------


async def test_l402_prefer_option(home: Path) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client)
        assert ctx.options.l402_prefer == "l402" and client.prefer == "l402"
        load(tctx, client, l402_prefer="Payment")
        assert client.prefer == "payment" and client.misconfigured == {}


async def test_a_bad_l402_prefer_fails_closed_in_one_line(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client, l402_prefer="lsat")
        assert client.misconfigured == {
            "l402_prefer": "l402_prefer must be l402 or payment, got 'lsat'"
        }
        assert "l402: l402_prefer must be l402 or payment, got 'lsat'" in caplog.text


async def test_l402_prefer_changes_while_running(addon: L402Client) -> None:
    assert addon.payer is not None and addon.payer.prefer == "l402"
    ctx.options.update(l402_prefer="payment")
    assert addon.payer.prefer == "payment"
    with pytest.raises(exceptions.OptionsError, match="l402_prefer must be l402 or payment"):
        ctx.options.update(l402_prefer="nope")
    assert addon.payer.prefer == "payment" and ctx.options.l402_prefer == "payment"


async def test_accept_payment_where_accept_authenticate_goes(addon: L402Client) -> None:
    for host, port in (("127.0.0.1", 8081), ("cdn.example.com", 80)):
        flow = flow_to(host, port)
        await addon.request(flow)
        assert flow.request.headers.get_all("Accept-Payment") == [ACCEPT_PAYMENT], host
    for host, port in (("127.0.0.1", 8082), ("other.test", 80)):
        flow = flow_to(host, port)
        await addon.request(flow)
        assert "Accept-Payment" not in flow.request.headers, host
    own = flow_to("127.0.0.1", 8081, Accept_Payment="lightning/session")
    await addon.request(own)
    assert own.request.headers.get_all("Accept-Payment") == ["lightning/session"]


def problem_response(status: int, body: bytes, content_type: str) -> http.Response:
    return http.Response.make(status, body, {"Content-Type": content_type})


def test_problem_of_reads_a_refusals_body_only() -> None:
    body = problem_json("payment-expired", "Payment Expired", "late", 402)
    assert problem_of(problem_response(402, body, "application/problem+json")) == (
        "payment-expired"
    )
    assert problem_of(problem_response(200, body, "application/problem+json")) is None
    assert problem_of(problem_response(402, body, "text/plain")) is None


async def test_the_addon_pays_a_payment_challenge(addon: L402Client, tmp_path: Path) -> None:
    """The response hook with the retry sent to the stand-in (no sockets): paid, marked, the
    receipt kept; a refusal after payment names the problem type."""
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    await ledger.open()
    server = PaymentServer(ledger, {route.name: route for route in ROUTES})

    async def origin(request: httpx.Request) -> httpx.Response:
        answer = await server.answer(request.url.path, request.headers.get("Authorization"))
        headers = [*answer.headers, ("Content-Type", answer.content_type)]
        return httpx.Response(answer.status, headers=headers, stream=Body(answer.body))

    assert addon.http is not None and addon.payer is not None
    await addon.http.aclose()
    addon.http = httpx.AsyncClient(transport=httpx.MockTransport(origin))
    try:
        for path, status in (("/pay/ep1.mp3", 200), ("/expired/ep1.mp3", 402)):
            flow = flow_to("127.0.0.1", 8081, path)
            await addon.request(flow)
            assert flow.request.headers["Accept-Payment"] == ACCEPT_PAYMENT
            first = await server.answer(path, None)
            flow.response = http.Response.make(
                402, first.body, [(k.encode(), v.encode()) for k, v in first.headers]
            )
            await addon.response(flow)
            assert flow.response.status_code == status
            if status == 200:
                assert (
                    flow.response.headers["X-L402-Paid"]
                    == f"21 sat (fee 0 sat) for payment:{REALM}"
                )
                assert "Payment-Receipt" in flow.response.headers
                assert flow.metadata["l402_client"]["scheme"] == "Payment"
                assert flow.comment.startswith("Payment paid ")
            else:
                refused = flow.response.headers["X-L402-Refused"]
                assert refused.startswith("rejected_after_payment; ")
                assert "(payment-expired)" in refused
        assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 2 * PRICE_MSAT
        events = await addon.payer.store.history()
        paid = [e for e in events if e["event"] == "paid" and e["receipt"] is not None]
        assert len(paid) == 1 and paid[0]["scheme"] == "Payment"
    finally:
        await ledger.close()


async def test_a_foreign_client_is_told_why_a_payment_challenge_is_not_paid(
    addon: L402Client,
) -> None:
    flow = flow_to("127.0.0.1", 8081)
    flow.client_conn.peername = ("192.0.2.7", 5000)
    flow.response = http.Response.make(402, b"", {"WWW-Authenticate": charge_header()})
    await addon.response(flow)
    assert flow.response.headers["X-L402-Refused"].startswith("client_not_allowed; ")


async def test_the_free_variant_is_asked_for_without_either_accept_header(
    addon: L402Client,
) -> None:
    """l402_fallback_free: a refused Payment challenge is asked again as a player that cannot
    pay: without the Accept-Authenticate and Accept-Payment the proxy added."""
    asked: list[httpx.Headers] = []

    async def upgrade_origin(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers)
        return httpx.Response(200, stream=Body(b"free variant\n"))

    assert addon.http is not None
    await addon.http.aclose()
    addon.http = httpx.AsyncClient(transport=httpx.MockTransport(upgrade_origin))
    ctx.options.update(l402_fallback_free=True)
    flow = flow_to("127.0.0.1", 8081, "/dear/ep1.mp3")
    await addon.request(flow)
    dear = charge_header(amount_sat=500, amount_msat=500_000)
    flow.response = http.Response.make(402, b"", {"WWW-Authenticate": dear})
    await addon.response(flow)
    assert flow.response.content == b"free variant\n"
    assert flow.response.headers["X-L402-Refused"].startswith("max_price; ")
    (headers,) = asked
    assert "Accept-Payment" not in headers and "Accept-Authenticate" not in headers
