"""The Payment HTTP authentication scheme in the engine (engine/charges.py, issue 16's server
part), in process on the dev ledger and a SQLite store: `schemes:` in the rules and the
paywall's default, the Payment challenge beside the L402 lines (one invoice, RFC 9457 body),
the credential that pays for one request (every check, exactly once, never kept), its receipt,
every refusal with the draft's problem type, and what each door does with the receipt."""

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from l402proxy.cli import main
from l402proxy.doors import nginx
from l402proxy.engine import Answer, Forward, Paywall, Refused, Request, charges
from l402proxy.engine.answers import RECEIPT_STATUSES, mark_receipt, mark_variant
from l402proxy.engine.request import get
from l402proxy.l402 import payment
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning import LightningError
from l402proxy.lightning.base import InvoiceNotFound, InvoiceState, LookupUnsupported
from l402proxy.rules import RulesError, parse_rules, parse_schemes
from l402proxy.store import StoreError

from .test_asgi_door import Origin, Reply, call, middleware
from .test_pricing_engine import OPTED_IN, header, pay, paywall_on, price_module, request
from .test_server_addon import RULES as PODCAST
from .test_server_addon import flow_for, server_on

BROWSER = (b"Accept", b"text/html,application/xhtml+xml")
VARIANTS = ("paid", "free", "offer")
RULES = """
invoice_limit: {{requests: 1000, per: 1m, burst: 1000}}
services:
  - name: both
    match: {{path: "/both/*"}}
    price_sat: 10
    schemes: [l402, payment]
    paid: {{set_headers: {{X-Tier: premium}}}}
  - name: charge
    match: {{path: "/charge/*"}}
    price_sat: 10
    schemes: [payment]
  - name: cheap
    match: {{path: "/cheap/*"}}
    price_sat: 3
    schemes: [Payment]
  - name: twin
    match: {{path: "/twin/*"}}
    price_sat: 10
    schemes: [payment]
  - name: token
    match: {{path: "/token/*"}}
    price_sat: 10
  - name: up
    match: {{path: "/up/*"}}
    mode: upgrade
    price_sat: 5
    schemes: [l402, payment]
    paid: {{set_headers: {{X-Tier: premium}}}}
  - name: once
    match: {{path: "/once/*"}}
    price_sat: 5
    single_use: true
    schemes: [l402, payment]
  - name: quoted
    match: {{path: "/quoted/*"}}
    price: python:{module}:quote
    schemes: [payment]
  - name: open
    match: {{path: "/open/*"}}
    mode: free
  - name: readonly
    match: {{path: "/ro/*"}}
    price_sat: 10
    schemes: [l402, payment]
    capabilities: {{read: [GET]}}
    paid: {{set_headers: {{X-Tier: premium}}}}
  - name: modelled
    match: {{path: "/model/*"}}
    price: python:{module}:by_header
    schemes: [payment]
"""
# The operator's price reads a header (a premium model costs more) and may fail.
BY_HEADER = """

def by_header(request):
    model = request.headers.get("x-model")
    if model == "broken":
        raise RuntimeError("no price list")
    return 1000 if model == "premium" else 1
"""


@pytest.fixture
def module(tmp_path: Path) -> Iterator[str]:
    with price_module(tmp_path) as name:
        source = tmp_path / f"{name}.py"
        source.write_text(source.read_text() + BY_HEADER)
        yield name


@pytest.fixture
async def engine(tmp_path: Path, module: str) -> AsyncIterator[Paywall]:
    async with paywall_on(tmp_path, RULES.format(module=module)) as opened:
        yield opened


def rules_of(text: str) -> list[object]:
    return list(parse_rules(text, "test.yaml").rules)


def payment_lines(answer: Answer) -> list[str]:
    return [line for line in header(answer, "WWW-Authenticate") if line.startswith("Payment ")]


def problem_of(answer: object, status: int = 402) -> dict[str, object]:
    """The RFC 9457 body of an answer, checked for the draft's shape."""
    assert isinstance(answer, Answer), answer
    assert answer.status == status, (answer.status, answer.body[:300])
    assert header(answer, "Content-Type") == ["application/problem+json"]
    assert header(answer, "Cache-Control") == ["no-store"]
    assert header(answer, payment.RECEIPT_HEADER) == []  # an error never carries one
    body = json.loads(answer.body)
    assert isinstance(body, dict)
    assert str(body["type"]).startswith(payment.PROBLEM_BASE) and body["status"] == status
    return body


def challenge_of(answer: object) -> payment.Challenge:
    """The (one) Payment challenge of a 402, whose challengeId the problem names."""
    body = problem_of(answer)
    assert isinstance(answer, Answer)
    lines = payment_lines(answer)
    assert len(lines) == 1, header(answer, "WWW-Authenticate")
    found = payment.parse_challenges(lines)
    assert len(found) == 1 and body["challengeId"] == found[0].id
    return found[0]


async def offered(engine: Paywall, path: str, *fields: tuple[bytes, bytes]) -> payment.Challenge:
    return challenge_of(await engine.handle(request(path, *fields)))


async def bought(engine: Paywall, tmp_path: Path, path: str) -> tuple[payment.Challenge, str]:
    """A Payment challenge at `path`, paid with the dev ledger, and its credential."""
    challenge = await offered(engine, path)
    preimage = await pay(tmp_path, challenge.charge_request().invoice)
    return challenge, payment.encode_credential(challenge, preimage)


def with_credential(path: str, credential: str, *fields: tuple[bytes, bytes]) -> Request:
    return request(path, (b"Authorization", credential.encode()), *fields)


def granted(outcome: object) -> Forward:
    assert isinstance(outcome, Forward), (outcome.status, outcome.body[:300])  # type: ignore[union-attr]
    assert outcome.note is not None and outcome.note["variant"] == "paid", outcome.note
    assert outcome.note["scheme"] == "payment"
    return outcome


def refused(outcome: object, problem_type: str, status: int = 402) -> dict[str, object]:
    """A refused credential: the problem type, and (402) a fresh, different challenge."""
    body = problem_of(outcome, status)
    assert body["type"] == payment.PROBLEM_BASE + problem_type, body
    assert isinstance(outcome, Answer) and outcome.note is not None
    assert outcome.note["reason"] == problem_type
    return body


def resigned(
    engine: Paywall, challenge: payment.Challenge, **changes: str | None
) -> payment.Challenge:
    """`challenge` with `changes`, bound again with the engine's own key: a challenge this
    paywall could have minted, to reach the checks behind the binding."""
    changed = dataclasses.replace(challenge, id="", **changes)
    return dataclasses.replace(changed, id=payment.challenge_id(engine.payment_secret, changed))


# -- rules: schemes per rule, the default, rules check -----------------------------------------


def test_schemes_are_read_per_rule_in_any_case_and_default_to_the_paywalls() -> None:
    text = RULES.format(module="unused").split("  - name: quoted")[0]
    rules = parse_rules(text, "test.yaml").rules
    by_name = {rule.name: rule for rule in rules}
    assert by_name["both"].schemes == ("l402", "payment")
    assert by_name["cheap"].schemes == ("payment",)
    assert by_name["token"].schemes is None  # the paywall's default
    assert by_name["both"].pricing_json()["schemes"] == ["l402", "payment"]
    assert by_name["token"].pricing_json()["schemes"] == ["l402"]
    assert by_name["token"].pricing_json()["schemes_default"] is True
    assert by_name["token"].pricing_json(("payment",))["schemes"] == ["payment"]


@pytest.mark.parametrize(
    ("schemes", "problem"),
    [
        ("[lsat]", "unknown scheme 'lsat' (expected l402 or payment) (LSAT is L402's older name"),
        ("[paymnt]", "unknown scheme 'paymnt' (expected l402 or payment) (did you mean 'payment'"),
        ("[]", "schemes is empty"),
        ("payment", "schemes must be a list like [l402, payment], got 'payment'"),
        ("[l402, L402]", "scheme l402 is listed twice"),
        ("[1]", "a scheme must be a string"),
    ],
)
def test_a_bad_schemes_list_is_refused_with_its_line(schemes: str, problem: str) -> None:
    text = f"""services:
  - name: a
    match: {{path: "/a/*"}}
    price_sat: 3
    schemes: {schemes}
"""
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "test.yaml")
    assert str(caught.value).startswith("test.yaml:5: service 'a': "), str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "schemes", "problem"),
    [
        ("bundle: {bytes: 10MB}", "[l402, payment]", "a bundle of bytes cannot be sold as a"),
        (
            "bundle: {units: 100, usage_header: X-Used}",
            "[payment]",
            "a bundle of units cannot be sold as a Payment",
        ),
        ("bundle: {requests: 5}", "[payment]", "its bundle of 5 requests is an L402 token's"),
        ("pass: {name: p, services: [a]}", "[payment]", "its pass 'p' is an L402 token's"),
        ("feed: /feed.xml", "[payment]", "its private feed (feed:) is an L402 token's"),
        ("mode: free", "[payment]", "'schemes' has no meaning with mode: free"),
    ],
)
def test_what_a_charge_cannot_stand_for_is_refused(extra: str, schemes: str, problem: str) -> None:
    text = f"""services:
  - name: a
    match: {{path: "/a/*"}}
    {"" if extra == "mode: free" else "price_sat: 3"}
    {extra}
    schemes: {schemes}
"""
    with pytest.raises(RulesError, match=r"test.yaml:[0-9]+: service 'a': ") as caught:
        parse_rules(text, "test.yaml")
    assert problem in str(caught.value)


def test_single_use_and_requests_bundles_sell_charges_beside_tokens() -> None:
    for extra in ("single_use: true", "bundle: {requests: 5}"):
        schemes = "[payment]" if extra == "single_use: true" else "[l402, payment]"
        text = f"""services:
  - name: a
    match: {{path: "/a/*"}}
    price_sat: 3
    {extra}
    schemes: {schemes}
"""
        assert parse_rules(text, "test.yaml").rules[0].schemes is not None


def test_the_default_schemes_option_is_read_and_checked() -> None:
    assert parse_schemes("l402") == ("l402",)
    assert parse_schemes(" Payment , l402 ") == ("payment", "l402")
    assert parse_schemes(["l402", "payment"]) == ("l402", "payment")
    for bad, problem in (
        ("", "no scheme given"),
        ("l402,bogus", "unknown scheme 'bogus'"),
        ("payment payment", "scheme payment is given twice"),
    ):
        with pytest.raises(ValueError, match=problem):
            parse_schemes(bad)


async def test_the_default_applies_to_rules_that_name_none_and_a_rule_it_cannot_sell_is_named(
    tmp_path: Path,
) -> None:
    text = """services:
  - name: plain
    match: {path: "/plain/*"}
    price_sat: 3
  - name: pass
    match: {path: "/pass/*"}
    price_sat: 3
    pass: {name: p, services: [pass, plain]}
"""
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    engine = Paywall()
    engine.use_rules_file(str(rules))
    with pytest.raises(Refused) as caught:
        engine.use_schemes("payment")
    assert f"{rules}:5: service 'pass': schemes [payment]: its pass 'p'" in str(caught.value)
    assert engine.default_schemes == ("l402",)  # the refused value never took
    with pytest.raises(Refused, match="unknown scheme 'nope'"):
        engine.use_schemes("nope")
    engine.use_schemes("l402,payment")
    by_name = {rule.name: rule for rule in engine.rules.rules}  # type: ignore[union-attr]
    assert engine.schemes_for(by_name["plain"]) == ("l402", "payment")
    # The other way round: a rules file the default cannot sell is refused, with its line.
    fresh = Paywall()
    fresh.use_schemes("payment")
    with pytest.raises(RulesError, match=r"rules.yaml:5: service 'pass': .*l402_schemes"):
        fresh.use_rules_file(str(rules))


def test_rules_check_shows_each_services_schemes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rules.yaml"
    # Without the price: function's rule (rules check would import its module).
    path.write_text(RULES.format(module="unused").split("  - name: quoted")[0])
    assert main(["rules", "check", str(path)]) == 0
    shown = {s["name"]: s for s in json.loads(capsys.readouterr().out)["services"]}
    assert shown["both"]["schemes"] == ["l402", "payment"]
    assert shown["charge"]["schemes"] == ["payment"] and not shown["charge"]["schemes_default"]
    assert shown["token"]["schemes"] == ["l402"] and shown["token"]["schemes_default"]


# -- the challenge ------------------------------------------------------------------------------


async def test_a_402_carries_a_payment_challenge_for_the_same_invoice_beside_lsat_and_l402(
    engine: Paywall,
) -> None:
    before = time.time()
    answer = await engine.handle(request("/both/x"))
    challenge = challenge_of(answer)
    assert isinstance(answer, Answer)
    lines = header(answer, "WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402", "Payment"]
    l402 = parse_challenges(lines)
    charge = challenge.charge_request()
    # One invoice per 402: the L402 lines and the Payment request carry the same one.
    assert {found.invoice for found in l402} == {charge.invoice}
    info = decode_invoice(charge.invoice)
    assert payment.invoice_mismatches(charge, info) == []
    assert charge.amount_sat == 10 and charge.payment_hash == info.payment_hash
    assert (challenge.realm, challenge.method, challenge.intent) == ("both", "lightning", "charge")
    assert challenge.expires is not None
    expires = payment.parse_rfc3339(challenge.expires)
    assert before < expires <= info.expires_at  # never later than the invoice
    # Bound by the key derived from the store's secret: any instance on this store verifies it.
    assert payment.verify_binding(challenge, [charges.binding_secret(engine.secret)])
    assert not payment.verify_binding(challenge, [engine.secret])
    # The problem, and what the JSON body always said, for L402 clients that read it.
    body = problem_of(answer)
    assert body["type"] == payment.PROBLEM_BASE + "payment-required"
    assert body["detail"] == "both costs 10 sat"
    assert body["invoice"] == charge.invoice and body["macaroon"] == l402[0].macaroon
    assert body["reason"] == "payment_required" and body["price_sat"] == 10


async def test_a_rule_without_payment_answers_as_before(engine: Paywall) -> None:
    answer = await engine.handle(request("/token/x"))
    assert isinstance(answer, Answer) and answer.status == 402
    assert [line.split()[0] for line in header(answer, "WWW-Authenticate")] == ["LSAT", "L402"]
    assert header(answer, "Content-Type") == ["application/json"]


async def test_a_payment_only_rule_sells_no_token_and_a_browser_gets_the_problem(
    engine: Paywall,
) -> None:
    for fields in ((), (BROWSER,), ((b"Accept", b"text/plain"),)):
        answer = await engine.handle(request("/charge/x", *fields))
        challenge_of(answer)  # problem+json, whatever Accept says: there is no page to pay from
        assert isinstance(answer, Answer)
        assert len(header(answer, "WWW-Authenticate")) == 1
        body = json.loads(answer.body)
        assert "macaroon" not in body and "Authorization: Payment" in body["how_to_pay"]
        assert header(answer, "Set-Cookie") == []  # no claim cookie: nothing to unlock
    # The paywall page for it says so instead of selling an L402 token.
    page = await engine.handle(request("/.l402/pay?path=/charge/x", BROWSER))
    assert isinstance(page, Answer) and page.status == 404
    assert b"Payment scheme" in page.body


async def test_a_browser_gets_the_page_with_the_payment_line_beside_it(engine: Paywall) -> None:
    answer = await engine.handle(request("/both/x", BROWSER))
    assert isinstance(answer, Answer) and answer.status == 402
    assert header(answer, "Content-Type") == ["text/html; charset=utf-8"]
    assert len(payment_lines(answer)) == 1


async def test_accept_authenticate_ranking_payment_first_puts_its_line_first(
    engine: Paywall,
) -> None:
    for accept, first in (
        ("Payment, L402", "Payment"),
        ("Payment", "Payment"),
        ("L402, Payment", "LSAT"),
        ("L402", "LSAT"),
    ):
        answer = await engine.handle(request("/both/x", (b"Accept-Authenticate", accept.encode())))
        assert isinstance(answer, Answer)
        assert header(answer, "WWW-Authenticate")[0].split()[0] == first, accept
    # Accept-Payment filters and orders the Payment challenges: never none of them.
    refusing = (b"Accept-Payment", b"lightning/charge;q=0, tempo/charge")
    assert await offered(engine, "/both/x", refusing)


async def test_upgrade_mode_challenges_a_client_that_says_it_pays_charges(
    engine: Paywall,
) -> None:
    free = await engine.handle(request("/up/x"))
    assert isinstance(free, Forward) and free.note is not None
    assert free.note["variant"] == "free" and free.note["by_payment"] is True
    for asking in (
        (b"Accept-Payment", b"lightning/charge"),
        (b"Accept-Payment", b"*/*;q=0.5"),
        (b"Accept-Authenticate", b"Payment"),
    ):
        await offered(engine, "/up/x", asking)
    declined = await engine.handle(request("/up/x", (b"Accept-Payment", b"lightning/*;q=0")))
    assert isinstance(declined, Forward) and declined.note is not None
    assert declined.note["variant"] == "free"
    # Its free answers vary by Accept-Payment as well.
    marked = mark_variant(((b"Content-Type", b"text/html"),), paid=False, by_payment=True)
    assert get(marked, "Vary") == "Authorization, Cookie, Accept-Authenticate, Accept-Payment"


# -- the credential -----------------------------------------------------------------------------


async def test_a_paid_charge_buys_this_one_request_with_a_receipt(
    engine: Paywall, tmp_path: Path
) -> None:
    challenge, credential = await bought(engine, tmp_path, "/both/x")
    cookie = (b"Cookie", b"theme=dark")
    forward = granted(await engine.handle(with_credential("/both/x", credential, cookie)))
    assert forward.note is not None
    # The paid variant, without the credential (the origin never sees it) and no cookie set.
    assert get(forward.headers, "X-Tier") == "premium"
    assert get(forward.headers, "Authorization") is None
    assert "clear_cookies" not in forward.note and "reusable_until" not in forward.note
    receipt = payment.decode_receipt(forward.note["receipt"])
    charge = challenge.charge_request()
    assert receipt.reference == charge.payment_hash.hex()  # type: ignore[union-attr]
    assert receipt.challenge_id == challenge.id and receipt.method == "lightning"
    preimage = json.loads(payment.b64url_decode(credential.split()[1], max_decoded=4096))
    assert preimage["payload"]["preimage"] not in forward.note["receipt"]
    assert preimage["payload"]["preimage"] not in json.dumps(forward.note)
    # Never kept: the very same request again is a replay, not a kept grant.
    assert len(engine.verdicts) == 0
    refused(
        await engine.handle(with_credential("/both/x", credential, cookie)), "invalid-challenge"
    )


async def test_a_second_use_gets_a_fresh_challenge_and_the_sale_is_counted_once(
    engine: Paywall, tmp_path: Path
) -> None:
    challenge, credential = await bought(engine, tmp_path, "/charge/x")
    granted(await engine.handle(with_credential("/charge/x", credential)))
    again = await engine.handle(with_credential("/charge/y", credential))
    body = refused(again, "invalid-challenge")
    assert body["detail"] == "this charge was used already: pay a new one"
    fresh = challenge_of(again)
    assert fresh.id != challenge.id
    assert fresh.charge_request().invoice != challenge.charge_request().invoice
    # The invoice's token row, paid once: the sale shows in tokens and revenue.
    assert engine.store is not None
    paid = [token for token in await engine.store.flush() if token.service == "charge"]
    assert [token.payment_hash for token in paid] == [challenge.charge_request().payment_hash]


async def test_the_same_credential_at_once_is_granted_once(engine: Paywall, tmp_path: Path) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    outcomes = await asyncio.gather(
        *(engine.handle(with_credential("/charge/x", credential)) for _ in range(8))
    )
    assert sum(isinstance(outcome, Forward) for outcome in outcomes) == 1
    for outcome in outcomes:
        if isinstance(outcome, Answer):
            refused(outcome, "invalid-challenge")


async def test_another_instance_on_the_store_verifies_the_challenge_and_refuses_the_replay(
    tmp_path: Path, module: str
) -> None:
    text = RULES.format(module=module)
    async with paywall_on(tmp_path, text) as first, paywall_on(tmp_path, text) as second:
        assert second.payment_secret == first.payment_secret
        _, credential = await bought(first, tmp_path, "/charge/x")
        granted(await second.handle(with_credential("/charge/x", credential)))
        refused(await first.handle(with_credential("/charge/x", credential)), "invalid-challenge")


async def test_another_stores_instance_does_not_take_the_challenge(
    tmp_path: Path, module: str
) -> None:
    text = RULES.format(module=module)
    (tmp_path / "other").mkdir()
    async with paywall_on(tmp_path, text) as first, paywall_on(tmp_path / "other", text) as other:
        challenge = await offered(first, "/charge/x")
        preimage = await pay(tmp_path, challenge.charge_request().invoice)
        credential = payment.encode_credential(challenge, preimage)
        refused(await other.handle(with_credential("/charge/x", credential)), "invalid-challenge")


@pytest.mark.parametrize(
    "value",
    [
        "Payment",
        "Payment !!!",
        "Payment eyJmb28iOjF9",  # {"foo":1}: no challenge
        "Payment eyJjaGFsbGVuZ2UiOnt9fQ=",  # wrong padding
    ],
)
async def test_a_malformed_credential_gets_a_fresh_challenge(engine: Paywall, value: str) -> None:
    body = refused(await engine.handle(with_credential("/charge/x", value)), "malformed-credential")
    assert value.split()[-1] not in str(body["detail"]) or value == "Payment"


async def test_two_payment_credentials_are_malformed(engine: Paywall, tmp_path: Path) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    second = (b"Authorization", credential.encode())
    outcome = await engine.handle(with_credential("/charge/x", credential, second))
    refused(outcome, "malformed-credential")


async def test_a_credential_for_a_challenge_not_bound_here_is_an_invalid_challenge(
    engine: Paywall, tmp_path: Path
) -> None:
    challenge = await offered(engine, "/charge/x")
    preimage = await pay(tmp_path, challenge.charge_request().invoice)
    cheaper = payment.ChargeRequest(
        1, challenge.charge_request().invoice, challenge.charge_request().payment_hash, "regtest"
    ).encode()
    for forged in (
        dataclasses.replace(challenge, request=cheaper),  # the id no longer binds it
        dataclasses.replace(challenge, realm="charge2"),
        dataclasses.replace(challenge, id="A" * 43),
    ):
        outcome = await engine.handle(
            with_credential("/charge/x", payment.encode_credential(forged, preimage))
        )
        refused(outcome, "invalid-challenge")


async def test_an_expired_challenge_is_payment_expired(engine: Paywall, tmp_path: Path) -> None:
    challenge = await offered(engine, "/charge/x")
    preimage = await pay(tmp_path, challenge.charge_request().invoice)
    past = resigned(engine, challenge, expires=payment.format_rfc3339(time.time() - 1))
    outcome = await engine.handle(
        with_credential("/charge/x", payment.encode_credential(past, preimage))
    )
    refused(outcome, "payment-expired")
    # The real one still works: nothing was consumed.
    granted(
        await engine.handle(
            with_credential("/charge/x", payment.encode_credential(challenge, preimage))
        )
    )


async def test_a_wrong_preimage_is_verification_failed(engine: Paywall) -> None:
    challenge = await offered(engine, "/charge/x")
    outcome = await engine.handle(
        with_credential("/charge/x", payment.encode_credential(challenge, b"\x07" * 32))
    )
    refused(outcome, "verification-failed")


async def test_another_method_is_a_400_without_an_invoice(engine: Paywall) -> None:
    challenge = await offered(engine, "/charge/x")
    other = resigned(engine, challenge, method="tempo")
    answer = await engine.handle(
        with_credential("/charge/x", payment.encode_credential(other, b"\x01" * 32))
    )
    refused(answer, "method-unsupported", 400)
    assert isinstance(answer, Answer) and header(answer, "WWW-Authenticate") == []


async def test_a_charge_for_a_cheaper_service_does_not_buy_a_dearer_one(
    engine: Paywall, tmp_path: Path
) -> None:
    _, cheap = await bought(engine, tmp_path, "/cheap/x")
    body = refused(await engine.handle(with_credential("/charge/x", cheap)), "payment-insufficient")
    assert body["detail"] == "the charge is for 3 sat, this resource costs 10"
    # Nor one for another service at the same price: it was offered for its own.
    _, twin = await bought(engine, tmp_path, "/twin/x")
    refused(await engine.handle(with_credential("/charge/x", twin)), "invalid-challenge")
    # Each still buys its own request.
    granted(await engine.handle(with_credential("/cheap/x", cheap)))
    granted(await engine.handle(with_credential("/twin/x", twin)))


async def test_a_charge_bought_before_a_price_rise_is_insufficient(
    engine: Paywall, tmp_path: Path
) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    assert engine.rules is not None
    dearer = tuple(
        dataclasses.replace(rule, price_sat=11) if rule.name == "charge" else rule
        for rule in engine.rules.rules
    )
    engine.rules = dataclasses.replace(engine.rules, rules=dearer)
    refused(await engine.handle(with_credential("/charge/x", credential)), "payment-insufficient")


async def test_a_quote_pays_for_the_request_it_was_made_for_only(
    engine: Paywall, tmp_path: Path, module: str
) -> None:
    sys.modules[module].price = 1  # type: ignore[attr-defined]
    challenge, credential = await bought(engine, tmp_path, "/quoted/cheap?x=1")
    assert challenge.charge_request().amount_sat == 1
    sys.modules[module].price = 1000  # type: ignore[attr-defined]
    for other in ("/quoted/dear", "/quoted/cheap?x=2", "/quoted/cheap"):
        refused(await engine.handle(with_credential(other, credential)), "invalid-challenge")
    # The price is asked again at redeem: risen since the quote, it is insufficient, as for a
    # fixed price (nothing consumed)...
    same = with_credential("/quoted/cheap?x=1", credential)
    refused(await engine.handle(same), "payment-insufficient")
    # ...and what was quoted is what was paid: this request, at that price.
    sys.modules[module].price = 1  # type: ignore[attr-defined]
    granted(await engine.handle(with_credential("/quoted/cheap?x=1", credential)))


async def test_a_quote_for_a_cheap_request_does_not_pay_for_a_dear_one(
    engine: Paywall, tmp_path: Path
) -> None:
    """The quote digest binds method, host and target; the price function reads headers (and
    the client's address) too: a 1-sat quote made without `X-Model: premium` does not pay for
    the same URL with it (1000 sat). The price is asked again at redeem."""
    challenge, credential = await bought(engine, tmp_path, "/model/run")
    assert challenge.charge_request().amount_sat == 1
    dear = await engine.handle(request("/model/run", (b"X-Model", b"premium")))
    assert challenge_of(dear).charge_request().amount_sat == 1000  # what it really costs
    premium = with_credential("/model/run", credential, (b"X-Model", b"premium"))
    body = refused(await engine.handle(premium), "payment-insufficient")
    assert body["detail"] == "this request costs 1000 sat, the charge paid 1: pay this one's"
    # A price function failing at redeem: 503, nothing consumed.
    broken = await engine.handle(with_credential("/model/run", credential, (b"X-Model", b"broken")))
    assert isinstance(broken, Answer) and broken.status == 503
    assert broken.note is not None and broken.note["reason"] == "price"
    # The request it was quoted for, still unpaid for.
    granted(await engine.handle(with_credential("/model/run", credential)))


def paid(outcome: object) -> bool:
    return (
        isinstance(outcome, Forward)
        and outcome.note is not None
        and outcome.note.get("variant") == "paid"
    )


def not_sold(outcome: object) -> None:
    """The 405 a method no capability of the rule covers gets: no invoice, nothing opened."""
    assert isinstance(outcome, Answer), outcome
    assert outcome.status == 405, (outcome.status, outcome.body[:200])
    assert header(outcome, "Allow") == ["GET, HEAD"]
    assert header(outcome, "WWW-Authenticate") == []
    assert outcome.note is not None and outcome.note["reason"] == "missing_capability"


async def test_a_charge_opens_no_method_no_token_of_the_rule_opens(
    engine: Paywall, tmp_path: Path
) -> None:
    """With the mapping form of `capabilities` ({read: [GET]}) the rule sells GET (and HEAD)
    only: no L402 token of it opens DELETE, so neither may a charge (bound to the service, not
    the method), nor is a 402 sold for DELETE (its token or charge could not open it)."""
    answer = await engine.handle(request("/ro/doc", OPTED_IN))
    challenge = challenge_of(answer)
    preimage = await pay(tmp_path, challenge.charge_request().invoice)
    macaroon = parse_challenges(header(answer, "WWW-Authenticate"))[0].macaroon
    token = format_credential([macaroon], preimage)
    by_token = (b"Authorization", token.encode())
    not_sold(await engine.handle(request("/ro/doc", by_token, method="DELETE")))
    assert paid(await engine.handle(request("/ro/doc", by_token)))
    # No 402 for DELETE at all: what it would sell opens nothing there.
    not_sold(await engine.handle(request("/ro/doc", OPTED_IN, method="DELETE")))
    not_sold(await engine.handle(request("/ro/doc", method="PROPFIND")))
    # A charge from a 402 of the same rule, on DELETE: refused before it is consumed.
    _, credential = await bought(engine, tmp_path, "/ro/doc")
    on_delete = request("/ro/doc", (b"Authorization", credential.encode()), method="DELETE")
    not_sold(await engine.handle(on_delete))
    granted(await engine.handle(with_credential("/ro/doc", credential)))


async def test_a_revoked_sale_opens_nothing_by_either_scheme(
    engine: Paywall, tmp_path: Path
) -> None:
    """`l402proxy tokens revoke` names the invoice's token (id or payment hash): the charge of
    that invoice is refused as its L402 token is (402, a fresh challenge), nothing consumed."""
    for revoke_by in ("payment_hash", "token_id"):
        challenge, credential = await bought(engine, tmp_path, "/charge/x")
        payment_hash = challenge.charge_request().payment_hash
        opaque = challenge.opaque_map()
        assert payment_hash is not None and opaque is not None
        token_id = bytes.fromhex(opaque["token"])
        engine.revoked.add(payment_hash if revoke_by == "payment_hash" else token_id)
        body = refused(
            await engine.handle(with_credential("/charge/x", credential)), "invalid-challenge"
        )
        assert body["detail"] == "this charge has been revoked", revoke_by


async def test_a_401_for_a_bad_l402_token_carries_no_payment_challenge(engine: Paywall) -> None:
    """A 401 is about a bad L402 credential: its lines are LSAT and L402, its body the JSON
    one, never a Payment challenge or a payment-required problem with status 401. Where the
    rule sells no token, an L402 credential is none: the 402 a bare request gets."""
    forged = (b"Authorization", b"L402 bm90LWEtbWFjYXJvb24=:" + b"00" * 32)
    answer = await engine.handle(request("/both/x", forged))
    assert isinstance(answer, Answer) and answer.status == 401, answer.body[:200]
    assert payment_lines(answer) == []
    assert header(answer, "Content-Type") == ["application/json"]
    assert [line.split()[0] for line in header(answer, "WWW-Authenticate")] == ["LSAT", "L402"]
    assert json.loads(answer.body).get("type") is None
    only_charges = await engine.handle(request("/charge/x", forged))
    challenge_of(only_charges)  # a 402 with its Payment challenge and problem


def test_every_accept_payment_line_is_read() -> None:
    """Two Accept-Payment fields are one list (RFC 9110 5.3): the second one's range counts."""
    fields = ((b"Accept-Payment", b"tempo/charge"), (b"Accept-Payment", b"lightning/charge"))
    assert charges.asks_to_pay(fields)
    assert not charges.asks_to_pay(fields[:1])


async def test_an_unsettled_invoice_is_verification_failed_and_nothing_consumed(
    engine: Paywall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    challenge, credential = await bought(engine, tmp_path, "/charge/x")
    assert engine.backend is not None
    real = engine.backend.lookup_invoice

    async def unsettled(payment_hash: bytes) -> InvoiceState:
        return InvoiceState(payment_hash, False, None, 10_000)

    async def unknown(payment_hash: bytes) -> InvoiceState:
        raise InvoiceNotFound("no such invoice")

    for lookup in (unsettled, unknown):
        monkeypatch.setattr(engine.backend, "lookup_invoice", lookup)
        body = refused(
            await engine.handle(with_credential("/charge/x", credential)), "verification-failed"
        )
        assert body["detail"] in (
            "the invoice is not paid",
            "the Lightning node does not know this invoice",
        )
    monkeypatch.setattr(engine.backend, "lookup_invoice", real)
    granted(await engine.handle(with_credential("/charge/x", credential)))
    assert challenge.id


async def test_a_backend_that_cannot_look_up_takes_the_preimage_as_proof(
    engine: Paywall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")

    async def unsupported(payment_hash: bytes) -> InvoiceState:
        raise LookupUnsupported("a Lightning Address cannot look invoices up")

    assert engine.backend is not None
    monkeypatch.setattr(engine.backend, "lookup_invoice", unsupported)
    granted(await engine.handle(with_credential("/charge/x", credential)))


async def test_a_backend_or_store_failure_is_a_503_that_fails_closed(
    engine: Paywall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    assert engine.backend is not None and engine.store is not None

    async def down(payment_hash: bytes) -> InvoiceState:
        raise LightningError("connection refused")

    async def broken(*args: object) -> bool:
        raise StoreError("database is down")

    for target, name, replacement in (
        (engine.backend, "lookup_invoice", down),
        (engine.store, "consume_charge", broken),
    ):
        with monkeypatch.context() as patched:
            patched.setattr(target, name, replacement)
            answer = await engine.handle(with_credential("/charge/x", credential))
            assert isinstance(answer, Answer) and answer.status == 503, name
            assert header(answer, payment.RECEIPT_HEADER) == []
            assert int(header(answer, "Retry-After")[0]) >= 1
    # Nothing was consumed by either: once they are back, the charge is good.
    granted(await engine.handle(with_credential("/charge/x", credential)))


async def test_one_invoice_buys_one_request_of_a_single_use_rule_by_either_scheme(
    engine: Paywall, tmp_path: Path
) -> None:
    """The 402's invoice pays for the L402 token AND stands behind the charge: both draw the
    token's one request, or paying once would buy two."""
    for charge_first in (True, False):
        answer = await engine.handle(request("/once/x", OPTED_IN))
        challenge = challenge_of(answer)
        preimage = await pay(tmp_path, challenge.charge_request().invoice)
        assert isinstance(answer, Answer)
        macaroon = parse_challenges(header(answer, "WWW-Authenticate"))[0].macaroon
        token = format_credential([macaroon], preimage)
        credential = payment.encode_credential(challenge, preimage)
        first, then = (credential, token) if charge_first else (token, credential)
        used = await engine.handle(with_credential("/once/x", first))
        assert isinstance(used, Forward), used
        assert used.note is not None and used.note["balance"] == "0 requests"
        second = await engine.handle(with_credential("/once/x", then))
        assert isinstance(second, Answer) and second.status == 402, charge_first
        assert header(second, "X-L402-Balance") == ["0 requests"]


async def test_a_dry_run_consumes_nothing_and_sends_no_receipt(
    engine: Paywall, tmp_path: Path
) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    engine.dry_run_option = True
    for _ in range(2):
        pretended = granted(await engine.handle(with_credential("/charge/x", credential)))
        assert pretended.note is not None and pretended.note["dry_run"] == "grant"
        assert "receipt" not in pretended.note
    engine.dry_run_option = False
    granted(await engine.handle(with_credential("/charge/x", credential)))


async def test_the_credential_never_reaches_the_origin_or_a_price_function(
    engine: Paywall, tmp_path: Path, module: str
) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    basic = (b"Authorization", b"Basic dXNlcjpwdw==")
    for path in ("/open/x", "/nowhere", "/token/x"):
        outcome = await engine.handle(with_credential(path, credential, basic, OPTED_IN))
        fields = outcome.headers if isinstance(outcome, Forward) else ()
        assert all(b"Payment" not in value for _, value in fields), path
    assert engine.rules is not None
    quoted = next(rule for rule in engine.rules.rules if rule.name == "quoted")
    seen = engine.price_request(with_credential("/quoted/x", credential, basic), quoted)
    assert seen.headers["authorization"] == "Basic dXNlcjpwdw=="
    # And with the origin's own credential beside it, the charge is still judged and dropped.
    forward = granted(await engine.handle(with_credential("/charge/x", credential, basic)))
    assert [v for k, v in forward.headers if k.lower() == b"authorization"] == [basic[1]]


async def test_a_payment_credential_at_a_rule_that_sells_none_is_no_credential(
    engine: Paywall, tmp_path: Path
) -> None:
    _, credential = await bought(engine, tmp_path, "/charge/x")
    answer = await engine.handle(with_credential("/token/x", credential))
    assert isinstance(answer, Answer) and answer.status == 402
    assert payment_lines(answer) == []
    granted(await engine.handle(with_credential("/charge/x", credential)))  # not consumed


# -- the receipt at the doors -----------------------------------------------------------------


def test_a_receipt_goes_on_success_only_and_never_the_origins() -> None:
    origin = ((b"Content-Type", b"text/plain"), (b"Payment-Receipt", b"forged"))
    for status in range(100, 600):
        fields = mark_receipt(origin, "ours", status)
        expected = ["ours"] if status in RECEIPT_STATUSES else []
        assert [v.decode() for k, v in fields if k.lower() == b"payment-receipt"] == expected
    assert mark_receipt(origin, None, 200) == ((b"Content-Type", b"text/plain"),)
    plain = ((b"Content-Type", b"text/plain"),)
    assert mark_receipt(plain, None, 200) is plain


FORGED_RECEIPT = (b"payment-receipt", b"forged")
# Unpriced (no rule) and the free variant of an upgrade-mode rule (rules/podcast.yaml).
UNPAID_TARGETS = ("/feed.xml", "/episodes/ep1.mp3")


async def test_the_mitmproxy_door_never_passes_the_origins_receipt(tmp_path: Path) -> None:
    """Only the paywall vouches for a charge: an origin's own Payment-Receipt leaves every
    answer, free and unpriced too (a paid one gets the charge's own or none)."""
    async with server_on(tmp_path, PODCAST) as addon:
        for target in UNPAID_TARGETS:
            flow = flow_for(target)
            await addon.request(flow)
            assert flow.response is None, target  # forwarded
            flow.response = tutils.tresp(headers=http.Headers([FORGED_RECEIPT]))
            addon.responseheaders(flow)
            addon.response(flow)
            assert "Payment-Receipt" not in flow.response.headers, target


async def test_the_asgi_door_never_passes_the_origins_receipt(tmp_path: Path) -> None:
    origin = Origin(Reply(headers=((b"content-type", b"text/plain"), FORGED_RECEIPT)))
    app = middleware(tmp_path, origin)
    try:
        for target in UNPAID_TARGETS:
            answer = await call(app, target)
            assert answer.status == 200, (target, answer.body)
            assert answer.get_all("Payment-Receipt") == [], target
    finally:
        await app.close()


def test_the_nginx_config_sends_the_receipt_on_paid_success_only() -> None:
    text = nginx.render_config(
        auth=("127.0.0.1", 8402),
        origin=nginx.parse_origin("http://127.0.0.1:8080"),
        listen="80",
        set_headers=[],
    )
    assert "auth_request_set $l402_receipt $upstream_http_x_l402_receipt;" in text
    # The origin's receipt is hidden wherever nginx proxies to it (unpriced, free, offer,
    # paid), in the same block as each location's other proxy_hide_header lines (nginx inherits
    # array directives only into a level that sets none).
    for location in ("location / {", *(f"location = /.l402/internal/{v} {{" for v in VARIANTS)):
        block = text.split(location)[1].split("}")[0]
        assert "proxy_hide_header Payment-Receipt;" in block, location
    paid = text.split("location = /.l402/internal/paid {")[1].split("}")[0]
    assert "add_header Payment-Receipt $l402_receipt;" in paid  # no `always`: success only
    assert nginx.CONFIG_VERSION == 4
    assert f"proxy_set_header X-L402-Config {nginx.CONFIG_VERSION};" in text


async def test_serve_auth_passes_the_receipt_and_refuses_a_config_without_its_slot(
    tmp_path: Path, module: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(module=module))
    engine = nginx.make_engine(
        str(rules), "dev", str(tmp_path / "server.sqlite"), str(tmp_path / "devledger.sqlite")
    )
    await engine.open()
    service = nginx.AuthService(engine)
    try:
        _, credential = await bought(engine, tmp_path, "/charge/x")
        config = f"{nginx.CONFIG_VERSION} x-tier".encode()
        control = {nginx.H_CONFIG: config, nginx.H_URI: b"/charge/x"}
        assert service.problem(control) is None
        asked = with_credential("/charge/x", credential)
        outcome = await engine.handle(asked)
        assert isinstance(outcome, Forward)
        carried = nginx.Carried.parse(control[nginx.H_CONFIG])
        assert isinstance(carried, nginx.Carried)
        plan = service.instructions(asked, outcome, carried, b"60")
        assert not isinstance(plan, Answer)
        status, headers = plan
        sent = dict(headers)
        assert status == 401 and sent[nginx.R_ROUTE] == b"paid"
        assert sent[nginx.R_RECEIPT].decode() == outcome.note["receipt"]  # type: ignore[index]
        assert nginx.R_ACCEL_EXPIRES not in sent  # never kept by nginx's verdict cache
        assert nginx.R_AUTHORIZATION not in sent  # the credential goes nowhere
        # A config made before receipts (version 3) fails closed while charges are sold...
        stale = {nginx.H_CONFIG: b"3 x-tier", nginx.H_URI: b"/charge/x"}
        problem = service.problem(stale)
        assert problem is not None and "Payment-Receipt" in problem
        # ...and is served as before by rules that sell none.
        engine.use_schemes("l402")
        assert engine.rules is not None
        engine.rules = dataclasses.replace(
            engine.rules,
            rules=tuple(
                dataclasses.replace(rule, schemes=None)
                for rule in engine.rules.rules
                if rule.name != "quoted"
            ),
        )
        assert service.problem(stale) is None
    finally:
        await engine.close()


async def test_the_nginx_door_refuses_a_default_it_cannot_sell(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        'services:\n  - name: a\n    match: {path: "/a/*"}\n    price_sat: 3\n'
        "    bundle: {requests: 4}\n"
    )
    with pytest.raises(RulesError, match=r"rules.yaml:2: service 'a': .*bundle of 4 requests"):
        nginx.make_engine(str(rules), "dev", None, str(tmp_path / "l.sqlite"), schemes="payment")
    with pytest.raises(Refused, match="unknown scheme"):
        nginx.make_engine(str(rules), "dev", None, str(tmp_path / "l.sqlite"), schemes="x")


def test_the_network_of_an_invoice_is_its_prefix() -> None:
    assert charges.network_of("lnbcrt10n1xyz") == "regtest"
    assert charges.network_of("lntbs10n1xyz") == "signet"
    assert charges.network_of("LNTB10n1xyz") == "testnet"
    assert charges.network_of("lnbc10n1xyz") == "mainnet"


# -- the default at each door: l402_schemes, the middleware's and serve-auth's schemes -------

PASS_RULES = """services:
  - name: plain
    match: {path: "/plain/*"}
    price_sat: 3
  - name: pass
    match: {path: "/pass/*"}
    price_sat: 3
    pass: {name: p, services: [pass, plain]}
"""


async def test_the_l402_schemes_option_sets_the_default_and_refuses_what_cannot_be_sold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    from l402proxy.doors.mitmproxy import L402Server

    from .test_server_addon import flow_for, server_on

    rules = tmp_path / "rules.yaml"
    rules.write_text(PASS_RULES)
    async with server_on(tmp_path, rules) as server:
        from mitmproxy import ctx

        flow = flow_for("/plain/x")
        await server.request(flow)
        assert flow.response is not None
        assert [v.split()[0] for v in flow.response.headers.get_all("WWW-Authenticate")] == [
            "LSAT",
            "L402",
        ]
        ctx.options.update(l402_schemes="l402, payment")  # while running
        flow = flow_for("/plain/x")
        await server.request(flow)
        assert flow.response is not None
        assert flow.response.headers.get_all("WWW-Authenticate")[2].startswith("Payment ")
        with pytest.raises(exceptions.OptionsError, match="unknown scheme 'bogus'"):
            ctx.options.update(l402_schemes="bogus")
        with pytest.raises(exceptions.OptionsError, match=r"rules.yaml:5: service 'pass'"):
            ctx.options.update(l402_schemes="payment")
        assert server.engine.default_schemes == ("l402", "payment")
    # At start: one error line, and nothing is served.
    server = L402Server()
    with taddons.context(server) as tctx:
        tctx.configure(server, l402_rules=str(rules), l402_schemes="payment")
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "rules.yaml:5: service 'pass'" in errors[0], errors
        flow = flow_for("/plain/x")
        await server.request(flow)
        assert flow.response is not None and flow.response.status_code == 503


def test_the_asgi_middleware_takes_schemes_and_refuses_what_cannot_be_sold(
    tmp_path: Path,
) -> None:
    from l402proxy.asgi import L402Middleware

    rules = tmp_path / "rules.yaml"
    rules.write_text(PASS_RULES)

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never called")

    settings = {"rules": str(rules), "store": str(tmp_path / "s.sqlite")}
    middleware = L402Middleware(app, schemes="l402,payment", **settings)  # type: ignore[arg-type]
    assert middleware.engine.default_schemes == ("l402", "payment")
    with pytest.raises(
        ValueError,
        match=r"rules.yaml:5: service 'pass': .*\(the paywall's default schemes, schemes=\)",
    ):
        L402Middleware(app, schemes="payment", **settings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown scheme 'x'"):
        L402Middleware(app, schemes="x", **settings)  # type: ignore[arg-type]
