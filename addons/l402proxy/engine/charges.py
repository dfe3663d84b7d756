"""The Payment HTTP authentication scheme (draft-httpauth-payment; Lightning, intent "charge")
in the engine, beside L402: the challenge a 402 carries, and the credential that pays for ONE
request. The protocol itself (encoding, binding, checks, receipts) is l402/payment.py, pure.

A rule whose schemes (its own `schemes:`, else the paywall's default) include "payment" sells
both ways from the one invoice of each 402: the L402/LSAT lines carry it in a macaroon's token
(reusable until the token expires), the Payment line as a charge (one request, once, globally).
The invoice's token row is written whichever scheme pays it, so a sale counts once, in the
revenue as in the settled events, and a bundle token's balance is shared: a charge draws one
request of it (else paying once would buy the bundle AND one charge).

A challenge (`offer`): id bound by HMAC (a key derived from the store's secret, so every
instance on one store verifies every other's challenges), realm the service's name, `expires`
the invoice's expiry, `opaque` {"token": the invoice's token id, "quote": a digest of the
request, for a price: function's rules only}; all of it bound by the id.

A credential (`redeem`): decode -> the pure checks (binding, expiry, method/intent, amount vs
the rule's price for this request, sha256(preimage) == payment hash) -> the charge was offered
for this service (realm), for a method a capability of the rule covers (no charge opens what
no token of the rule opens), and for a price: function's rule for this very request (the quote
digest: what was quoted is what was paid) -> not revoked (the invoice's token id or payment
hash) -> a price: function asked again, the request costing no more than was paid (it reads
headers and the client's address, which the digest does not bind) -> the invoice settled (the
backend's lookup; where a backend cannot look invoices up the preimage is the proof, as for an
L402 token) -> consumed in the store exactly once across instances -> the paid variant for this
request only, never kept (verdict cache, cookies), with the Payment-Receipt the door adds to a
successful answer. Failures are a 402 with a fresh challenge and the draft's problem type
(method-unsupported: 400 without one); the store failing is a 503 (fail closed); a consumed
charge stays consumed even if what follows fails.
"""

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import gate
from ..l402 import payment
from ..l402.accept_payment import parse_accept_payment
from ..l402.token import UNLISTED_CAPABILITY
from ..lightning import LightningError
from ..lightning.base import Invoice, InvoiceNotFound, LookupUnsupported
from ..rules import Rule
from ..store import StoreError
from . import pricing
from .answers import BALANCE_HEADER, Answer, Outcome
from .request import Fields, Request, get, get_all

if TYPE_CHECKING:
    from .core import Paywall

log = logging.getLogger(__name__)

PAYMENT = "payment"
L402 = "l402"
# What the challenge-binding key is derived under (from the store's token secret): a key of its
# own, so a Payment challenge id never doubles as anything the token secret signs.
BINDING_LABEL = b"l402proxy payment challenge binding v1"
# Standing in for a payment hash a bound challenge must carry (we always write one): no
# preimage hashes to it, so such a credential fails as verification-failed, never passes.
_NO_HASH = bytes(32)
_HEX64 = re.compile(r"[0-9a-f]{64}")
# BOLT11 human-readable prefixes -> network, longest first (lntbs before lntb).
_NETWORK_PREFIXES = (("lnbcrt", "regtest"), ("lntbs", "signet"), ("lntb", "testnet"))
_SCHEME_WORDS = re.compile(r"[,\s]+")


def binding_secret(store_secret: bytes) -> bytes:
    """The key challenge ids are bound with: derived from the store's secret, so every instance
    sharing a store mints and verifies the same ids."""
    return hmac.new(store_secret, BINDING_LABEL, hashlib.sha256).digest()


# -- the request's headers ---------------------------------------------------------------------


def credentials(fields: Fields) -> list[str]:
    """The Authorization values in the Payment scheme (any case), in order."""
    return [
        value
        for value in get_all(fields, "authorization")
        if payment.is_payment_authorization(value)
    ]


def drop_credentials(fields: Fields) -> Fields:
    """Every Payment Authorization field out (the origin never sees one, as no L402 one);
    other schemes stay. The same tuple back when none was there."""
    kept = tuple(
        field
        for field in fields
        if field[0].lower() != b"authorization" or not _is_payment(field[1])
    )
    return fields if len(kept) == len(fields) else kept


def _is_payment(value: bytes) -> bool:
    parts = value.split(None, 1)
    return bool(parts) and parts[0].lower() == b"payment"


def asks_to_pay(fields: Fields) -> bool:
    """Does the client say it can pay a Lightning charge: an Accept-Payment with a range taking
    lightning/charge (q > 0), or Payment in Accept-Authenticate? In upgrade mode that is asking
    for the challenge, as `Accept-Authenticate: L402` is."""
    ranges = parse_accept_payment(get(fields, payment.ACCEPT_HEADER))
    if ranges is not None:
        best = None
        for candidate in ranges:
            if candidate.matches(payment.METHOD_LIGHTNING, payment.INTENT_CHARGE) and (
                best is None or candidate.specificity > best.specificity
            ):
                best = candidate
        if best is not None and best.q > 0:
            return True
    return _scheme_rank(get(fields, "Accept-Authenticate"))[0] is not None


def _scheme_rank(accept_authenticate: str | None) -> tuple[int | None, int | None]:
    """Where Accept-Authenticate first names Payment and first names L402/LSAT (None: not)."""
    payment_at = l402_at = None
    words = _SCHEME_WORDS.split(accept_authenticate or "")
    for index, word in enumerate(words):
        name = word.partition(";")[0].strip().upper()
        if name == "PAYMENT" and payment_at is None:
            payment_at = index
        elif name in gate.L402_SCHEMES and l402_at is None:
            l402_at = index
    return payment_at, l402_at


def payment_first(accept_authenticate: str | None) -> bool:
    """Does the client rank Payment before L402/LSAT (or name Payment alone)? Then the Payment
    line leads; otherwise LSAT, L402, Payment (Aperture's order: old clients read only the
    first line, and take the LSAT one)."""
    payment_at, l402_at = _scheme_rank(accept_authenticate)
    return payment_at is not None and (l402_at is None or payment_at < l402_at)


def quote_digest(request: Request) -> str:
    """What a price: function's quote is bound to: the method, host and target of the request
    it was made for (base64url SHA-256), so a cheap quote never pays for a dear request (what
    else the function reads is priced again at redeem: `_dearer`)."""
    text = f"{request.method.upper()}\n{request.host.lower()}\n{request.target}"
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# -- the challenge -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer:
    """A 402's Payment challenges (WWW-Authenticate values, in the order Accept-Payment asks;
    one today, lightning/charge), whether they go before the L402 lines, and the RFC 9457 body
    a 402 carrying them has (unless a browser gets the paywall page)."""

    lines: tuple[str, ...]
    first: bool
    body: bytes


def network_of(bolt11: str) -> str:
    """The network a BOLT11 invoice is for, from its prefix (the invoice is authoritative)."""
    text = bolt11.lower()
    for prefix, network in _NETWORK_PREFIXES:
        if text.startswith(prefix):
            return network
    return "mainnet"


def offer(
    engine: "Paywall",
    request: Request,
    rule: Rule,
    invoice: Invoice,
    token_id: bytes,
    status: int,
    reason: str,
    details: Mapping[str, Any],
) -> Offer:
    """The Payment challenge for the 402's invoice (`rule` at the price quoted), and the body:
    the problem (its type the Payment failure's, `reason`, when it is one) with the other
    facts of the challenge (`details`, what the JSON body always said) as extension members."""
    opaque = {"token": token_id.hex()}
    if rule.price is not None:
        opaque["quote"] = quote_digest(request)
    minted = payment.mint_challenge(
        engine.payment_secret,
        realm=rule.name,
        invoice=invoice.bolt11,
        amount_sat=rule.price_sat,
        payment_hash=invoice.payment_hash,
        network=network_of(invoice.bolt11),
        # Never past the invoice's expiry (mint_challenge writes whole seconds, rounded down).
        expires_at=invoice.expires_at,
        description=rule.description,
        opaque=opaque,
    )
    ordered = payment.order_challenges([minted], get(request.fields, payment.ACCEPT_HEADER))
    lines = tuple(payment.header_value(found) for found in ordered)
    slug = reason if reason in payment.PROBLEMS else "payment-required"
    detail = str(details.get("message") or payment.PROBLEMS[slug][1])
    problem = json.loads(
        payment.problem_json(
            slug, payment.PROBLEMS[slug][1], detail, status, challenge_id=minted.id
        )
    )
    # The problem's members first; the challenge's facts as extension members after them.
    body = json.dumps({**problem, **{k: v for k, v in details.items() if k not in problem}})
    return Offer(lines, payment_first(get(request.fields, "Accept-Authenticate")), body.encode())


# -- the credential ----------------------------------------------------------------------------


def _refused(problem_type: str, message: str) -> payment.PaymentSchemeError:
    return payment.PaymentSchemeError(problem_type, message)


@dataclass(frozen=True, slots=True)
class _Checked:
    charge: payment.Charge
    token_id: bytes


def check(engine: "Paywall", request: Request, rule: Rule, value: str, now: float) -> _Checked:
    """Every check that needs no I/O, for this request at this rule; PaymentSchemeError with
    the problem type to answer."""
    if rule.capability_for(request.method) == UNLISTED_CAPABILITY:
        # A charge is bound to the service, not the method: it must open no more than a token
        # of the rule, which no capability covering this method opens (refuse() answers as for
        # such a token: core.Paywall.challenge sells nothing for this method).
        raise _refused(
            "invalid-challenge",
            f"no capability of {rule.name} covers {request.method.upper()}: nothing opens it",
        )
    credential = payment.decode_credential(value)
    challenge = credential.challenge
    secrets = (engine.payment_secret,)
    request_hash = None
    if payment.verify_binding(challenge, secrets):
        # Bound, so written here: its paymentHash is the invoice's (check_credential decodes
        # the request again and refuses it if it does not read).
        try:
            request_hash = challenge.charge_request().payment_hash
        except ValueError:
            request_hash = None
    charge = payment.check_credential(
        credential,
        secrets=secrets,
        now=now,
        invoice_payment_hash=request_hash or _NO_HASH,
        # A price: function's quote is bound to its request below: the amount is what it was.
        price_sat=None if rule.price is not None else rule.price_sat,
    )
    if charge.realm != rule.name:
        raise _refused("invalid-challenge", "this charge was offered for another service")
    opaque = charge.opaque or {}
    token = opaque.get("token", "")
    if not _HEX64.fullmatch(token):
        raise _refused("invalid-challenge", "the challenge names no invoice token")
    if rule.price is not None and opaque.get("quote") != quote_digest(request):
        raise _refused(
            "invalid-challenge", "this charge was quoted for another request: pay this one's"
        )
    return _Checked(charge, bytes.fromhex(token))


async def redeem(
    engine: "Paywall", request: Request, fields: Fields, rule: Rule, values: Sequence[str]
) -> Outcome:
    """The request's Payment credential: the paid variant for this request, or the answer."""
    now = time.time()
    try:
        if len(values) > 1:
            raise _refused("malformed-credential", "more than one Payment credential was sent")
        checked = check(engine, request, rule, values[0], now)
    except payment.PaymentSchemeError as exc:
        return await refuse(engine, request, rule, exc)
    charge, token_id = checked.charge, checked.token_id
    if token_id in engine.revoked or charge.payment_hash in engine.revoked:
        # `tokens revoke` names the invoice's token (id or payment hash): whichever scheme
        # pays with that invoice is refused from then on, as its L402 token is (402, revoked).
        return await refuse(
            engine, request, rule, _refused("invalid-challenge", "this charge has been revoked")
        )
    if rule.rate_limits:
        limited = await engine.rate_limited(request, rule, token_id=token_id)
        if limited is not None:
            return limited  # nothing consumed: the same credential may come again
    if rule.price is not None:
        # The quote digest binds method, host and target only; the price function also reads
        # headers and the client's address: price this very request again (time-boxed).
        dearer = await _dearer(engine, request, rule, charge)
        if dearer is not None:
            return dearer
    unsettled = await _unsettled(engine, rule, charge, request.method)
    if isinstance(unsettled, Answer):
        return unsettled
    if unsettled is not None:
        return await refuse(engine, request, rule, unsettled)
    assert engine.store is not None
    note: dict[str, Any] = {"scheme": PAYMENT, "token_id": token_id.hex()}
    if engine.dry_run:
        # Only pretend: nothing consumed or drawn, and no receipt for what was not sold.
        return engine._forward_paid(request, fields, rule, note)
    try:
        first = await engine.store.consume_charge(
            charge.payment_hash, charge.challenge_id, rule.name, charge.expires_at, now
        )
    except StoreError as exc:
        # Fail closed; a consume whose answer was lost may have been made.
        log.warning(f"l402: cannot consume a Payment charge for {rule.name}: {exc}")
        return _unavailable(engine, rule, request.method)
    if not first:
        return await refuse(
            engine,
            request,
            rule,
            _refused("invalid-challenge", "this charge was used already: pay a new one"),
        )
    # Consumed: from here on it stays consumed, whatever happens to this request.
    engine.note_paid(token_id)
    bundle = rule.bundle
    if bundle is not None:
        # The invoice bought the token's bundle too (an L402 client draws the same balance).
        try:
            left = await engine.store.draw(token_id, bundle.size, 1)
        except StoreError as exc:
            log.warning(f"l402: cannot draw a Payment charge from {token_id.hex()[:16]}: {exc}")
            return _unavailable(engine, rule, request.method)
        if left is None:
            spent = await refuse(
                engine,
                request,
                rule,
                _refused("invalid-challenge", "what this invoice bought is used up: pay a new one"),
            )
            if spent.status == 402:
                spent.add(BALANCE_HEADER, f"0 {bundle.unit}")
            return spent
        note["balance"] = f"{left} {bundle.unit}"
    note["receipt"] = payment.encode_receipt(charge.challenge_id, charge.payment_hash, now)
    return engine._forward_paid(request, fields, rule, note)


async def _dearer(
    engine: "Paywall", request: Request, rule: Rule, charge: payment.Charge
) -> Answer | None:
    """None when this request costs no more than the charge paid; else the refusal
    (payment-insufficient), or a 503 when the price function fails (nothing consumed)."""
    try:
        price = await pricing.quote(rule, engine.price_request(request, rule))
    except pricing.PriceError as exc:
        log.error(f"l402: {exc}")
        from .core import unavailable  # core imports this module

        return unavailable(rule, "price", "the price could not be set", request.method)
    if price <= charge.amount_sat:
        return None
    return await refuse(
        engine,
        request,
        rule,
        _refused(
            "payment-insufficient",
            f"this request costs {price} sat, the charge paid {charge.amount_sat}: pay this one's",
        ),
    )


async def _unsettled(
    engine: "Paywall", rule: Rule, charge: payment.Charge, method: str
) -> Answer | payment.PaymentSchemeError | None:
    """None when the invoice is settled (or the backend cannot say and the preimage proves
    it), the refusal when it is not, a 503 when the backend does not answer."""
    assert engine.backend is not None
    started = time.perf_counter()
    try:
        state = await engine.backend.lookup_invoice(charge.payment_hash)
    except LookupUnsupported:
        # A Lightning Address hands out invoices it cannot look up; the preimage is proof of
        # payment (only the payee has it until it is paid), as it is for an L402 token.
        return None
    except InvoiceNotFound:
        engine.backend_called("lookup_invoice", started, ok=True)
        return _refused("verification-failed", "the Lightning node does not know this invoice")
    except LightningError as exc:
        engine.backend_called("lookup_invoice", started, ok=False)
        log.warning(f"l402: cannot look up a Payment charge's invoice for {rule.name}: {exc}")
        return _unavailable(engine, rule, method, reason="backend")
    engine.backend_called("lookup_invoice", started, ok=True)
    if not state.settled:
        return _refused("verification-failed", "the invoice is not paid")
    return None


def _unavailable(engine: "Paywall", rule: Rule, method: str, reason: str = "store") -> Answer:
    from .core import unavailable  # core imports this module

    if reason == "store":
        return unavailable(rule, reason, "the token store is unreachable", method)
    return unavailable(rule, reason, "the Lightning backend did not answer", method)


async def refuse(
    engine: "Paywall", request: Request, rule: Rule, problem: payment.PaymentSchemeError
) -> Answer:
    """A refused credential: 402 with a fresh challenge and the problem type; a method or
    intent we do not take: 400, no invoice made for it."""
    if problem.status != 402:
        answer = Answer.make(
            problem.status,
            problem.problem_json(),
            {"Content-Type": payment.PROBLEM_CONTENT_TYPE, "Cache-Control": "no-store"},
        ).for_method(request.method)
        answer.note = {"service": rule.name, "variant": "refused", "reason": problem.problem_type}
        return answer
    challenge = gate.Challenge(rule, 402, problem.problem_type, problem.message)
    if engine.dry_run:
        return await engine._pretended_challenge(request, challenge)
    return await engine.challenge(request, challenge)
