"""The "Payment" HTTP authentication scheme (draft-httpauth-payment), Lightning method, intent
"charge", with no I/O: every clock reading is a `now` argument.

Server: `mint_challenge` -> `header_value` (WWW-Authenticate) and `problem_json` (the 402 body);
`decode_credential` -> `check_credential` (the pure checks) -> the engine settles and consumes
-> `encode_receipt` (Payment-Receipt). Client: `parse_challenges` -> `Challenge.charge_request`
+ `invoice_mismatches` -> pay -> `encode_credential` -> `decode_receipt`. `order_challenges`
applies Accept-Payment (accept_payment.py). Wire facts: PROTOCOL.md, "The Payment scheme";
where the drafts' examples and Aperture's cross-implementation vectors (lightninglabs/aperture
mpp/testdata/vectors.json) disagree, the vectors win. Pieces by job: b64url.py, jcs.py,
authparams.py, rfc3339.py, charge_request.py, payment_receipt.py, accept_payment.py.

Every JSON document we write is JCS (RFC 8785) then base64url without padding, as the Lightning
charge draft's encoding conventions say (Aperture writes credentials and receipts in field order
instead; readers parse JSON, so both interoperate). Messages of raised errors are one line and
never echo a credential.
"""

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .accept_payment import order_offers
from .authparams import AuthChallenge, parse_challenge_list, quote
from .b64url import Base64urlError, b64url_decode, b64url_encode
from .charge_request import (
    CURRENCY_SAT,
    INTENT_CHARGE,
    MAX_JSON_SIZE,
    METHOD_LIGHTNING,
    NETWORKS,
    ChargeRequest,
    decode_charge_request,
    invoice_mismatches,
)
from .jcs import JsonError, canonical_json, loads_strict
from .payment_receipt import RECEIPT_HEADER, Receipt, decode_receipt, encode_receipt
from .rfc3339 import format_rfc3339, parse_rfc3339

SCHEME = "Payment"
ACCEPT_HEADER = "Accept-Payment"
# draft -01: a challenge may ask for the credential in this field instead of Authorization.
PAYMENT_AUTHORIZATION = "Payment-Authorization"
PROBLEM_BASE = "https://paymentauth.org/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"
MIN_SECRET_SIZE = 16
PREIMAGE_SIZE = 32

# slug -> (HTTP status, title). draft-httpauth-payment section "Error Codes".
PROBLEMS: Mapping[str, tuple[int, str]] = MappingProxyType(
    {
        "payment-required": (402, "Payment Required"),
        "payment-insufficient": (402, "Payment Insufficient"),
        "payment-expired": (402, "Payment Expired"),
        "verification-failed": (402, "Payment Verification Failed"),
        "method-unsupported": (400, "Payment Method Unsupported"),
        "malformed-credential": (402, "Malformed Payment Credential"),
        "invalid-challenge": (402, "Invalid Payment Challenge"),
    }
)

_METHOD = re.compile(r"[a-z]+")
_INTENT = re.compile(r"[A-Za-z0-9-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCHEME_NAME = re.compile(r"[A-Za-z0-9-]{1,20}")
_REQUIRED = ("id", "realm", "method", "intent", "request")
_OPTIONAL = ("expires", "digest", "description", "opaque", "header")


class PaymentSchemeError(ValueError):
    """A credential refused, with the draft's problem type for the 402/400 answer."""

    def __init__(self, problem_type: str, message: str) -> None:
        if problem_type not in PROBLEMS:
            raise ValueError(f"unknown Payment problem type {problem_type!r}")
        super().__init__(message)
        self.problem_type = problem_type
        self.message = message

    @property
    def status(self) -> int:
        return PROBLEMS[self.problem_type][0]

    @property
    def title(self) -> str:
        return PROBLEMS[self.problem_type][1]

    def problem_json(self, challenge_id: str | None = None) -> bytes:
        return problem_json(
            self.problem_type, self.title, self.message, self.status, challenge_id=challenge_id
        )


def problem_json(
    problem_type: str, title: str, detail: str, status: int, *, challenge_id: str | None = None
) -> bytes:
    """An RFC 9457 body (application/problem+json) of type PROBLEM_BASE + slug."""
    if problem_type not in PROBLEMS:
        raise ValueError(f"unknown Payment problem type {problem_type!r}")
    if not 400 <= status <= 599:
        raise ValueError(f"a problem's status must be 4xx or 5xx, not {status}")
    body: dict[str, object] = {
        "type": PROBLEM_BASE + problem_type,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if challenge_id:
        body["challengeId"] = challenge_id
    return canonical_json(body)


# --- challenges -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One `WWW-Authenticate: Payment` challenge, values as sent (absent optional ones None).
    `header` is draft -01's optional 8th binding slot; we never mint it but read and echo it."""

    id: str
    realm: str
    method: str
    intent: str
    request: str
    expires: str | None = None
    digest: str | None = None
    description: str | None = None
    opaque: str | None = None
    header: str | None = None

    def binding_input(self) -> bytes:
        """The HMAC input: seven slots joined by "|", absent ones empty (description is not
        bound); the `header` slot is appended only when present (draft -01)."""
        slots = [self.realm, self.method, self.intent, self.request]
        slots += [self.expires or "", self.digest or "", self.opaque or ""]
        if self.header is not None:
            slots.append(self.header)
        # surrogateescape: header text read as UTF-8 with escapes goes back to the bytes sent.
        return "|".join(slots).encode("utf-8", "surrogateescape")

    def expires_at(self) -> float | None:
        """`expires` as a POSIX timestamp (None when absent); ValueError if malformed."""
        return None if self.expires is None else parse_rfc3339(self.expires)

    def charge_request(self) -> ChargeRequest:
        return decode_charge_request(self.request)

    def opaque_map(self) -> dict[str, str] | None:
        """The decoded `opaque` (a flat string map), None when absent; ValueError otherwise."""
        if self.opaque is None:
            return None
        try:
            raw = b64url_decode(self.opaque, max_decoded=MAX_JSON_SIZE, what="opaque")
            value = loads_strict(raw, "opaque")
        except (Base64urlError, JsonError) as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("opaque is not a flat JSON object of strings")
        return value

    def echo(self) -> dict[str, str]:
        """The credential's `challenge` object: every parameter, unchanged."""
        body = {name: getattr(self, name) for name in _REQUIRED}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


def _slots(challenge: Challenge) -> tuple[str | None, ...]:
    return (
        challenge.realm,
        challenge.method,
        challenge.intent,
        challenge.request,
        challenge.expires,
        challenge.digest,
        challenge.opaque,
        challenge.header,
    )


def challenge_id(secret: bytes, challenge: Challenge) -> str:
    """The recommended binding: base64url(HMAC-SHA256(secret, binding_input))."""
    return b64url_encode(hmac.new(secret, challenge.binding_input(), hashlib.sha256).digest())


def verify_binding(challenge: Challenge, secrets: Sequence[bytes]) -> bool:
    """Does `challenge.id` bind its parameters under any of `secrets` (old ones kept while their
    challenges can still be presented)? Constant-time per secret, every secret tried.

    A "|" in any slot is refused outright: the slots are joined unescaped, so such a challenge
    could share its HMAC input with another one (we never mint one, see mint_challenge)."""
    if any(value is not None and "|" in value for value in _slots(challenge)):
        return False
    try:
        presented = challenge.id.encode("utf-8")
        data = challenge.binding_input()
    except UnicodeEncodeError:
        return False
    matched = False
    for secret in secrets:
        expected = b64url_encode(hmac.new(secret, data, hashlib.sha256).digest()).encode("ascii")
        matched |= hmac.compare_digest(expected, presented)
    return matched


def mint_challenge(
    secret: bytes,
    realm: str,
    invoice: str,
    amount_sat: int,
    payment_hash: bytes,
    network: str,
    expires_at: float,
    description: str | None = None,
    opaque: Mapping[str, str] | None = None,
) -> Challenge:
    """A lightning/charge challenge bound by HMAC to `secret`.

    `expires_at` must not be later than the invoice's expiry (the caller knows it; the Lightning
    draft forbids a later one); it is written in whole seconds, rounded down. `description` goes
    into the request (bound by the HMAC), not the unbound display parameter. The caller vouches
    that `invoice` carries `amount_sat`, `payment_hash` and `network` (it just created it)."""
    if len(secret) < MIN_SECRET_SIZE:
        raise ValueError(f"the binding secret must be at least {MIN_SECRET_SIZE} bytes")
    for name, value in (("realm", realm), ("method", METHOD_LIGHTNING), ("intent", INTENT_CHARGE)):
        if "|" in value:
            # Unescaped in the HMAC input: realm "a|b" + method "c" would equal "a" + "b|c".
            raise ValueError(f'{name} must not contain "|" (it separates the binding slots)')
    quote(realm)  # ValueError for a character no header can carry
    if not invoice or not invoice.isascii() or not invoice.isalnum():
        raise ValueError("invoice must be a BOLT11 string")
    if isinstance(amount_sat, bool) or not isinstance(amount_sat, int) or amount_sat <= 0:
        raise ValueError("amount_sat must be a positive whole number of sats")
    if not isinstance(payment_hash, bytes) or len(payment_hash) != 32:
        raise ValueError("payment_hash must be 32 bytes")
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(sorted(NETWORKS))}")
    request = ChargeRequest(amount_sat, invoice, payment_hash, network, description=description)
    opaque_text = None
    if opaque is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in opaque.items()):
            raise ValueError("opaque must map strings to strings")
        opaque_text = b64url_encode(canonical_json(dict(opaque)))
    unbound = Challenge(
        id="",
        realm=realm,
        method=METHOD_LIGHTNING,
        intent=INTENT_CHARGE,
        request=request.encode(),
        expires=format_rfc3339(expires_at),
        opaque=opaque_text,
    )
    return replace(unbound, id=challenge_id(secret, unbound))


def header_value(challenge: Challenge) -> str:
    """The WWW-Authenticate value: `Payment id="...", realm="...", ...` (RFC 9110 quoted
    strings, Aperture's parameter order); ValueError for a value no header can carry."""
    if not challenge.id:
        raise ValueError("a Payment challenge needs a non-empty id")
    params = [f"{name}={quote(getattr(challenge, name))}" for name in _REQUIRED]
    for name in ("expires", "digest", "description", "opaque", "header"):
        value = getattr(challenge, name)
        if value is not None:
            params.append(f"{name}={quote(value)}")
    return f"{SCHEME} {', '.join(params)}"


@dataclass(frozen=True)
class ChallengeList:
    challenges: list[Challenge]
    # One line per Payment challenge skipped as malformed, saying why.
    skipped: list[str]


def read_challenges(header_values: str | Sequence[str]) -> ChallengeList:
    """Every well-formed Payment challenge in WWW-Authenticate lines (which may also carry L402,
    LSAT, Basic... challenges, several per line), in order, and why each other one was skipped.
    Scheme and parameter names are case-insensitive, a repeated parameter's first value wins,
    unknown parameters are ignored. The request is not decoded here (session and other intents
    have other shapes): `Challenge.charge_request()` does that."""
    if isinstance(header_values, str):
        header_values = (header_values,)
    challenges: list[Challenge] = []
    skipped: list[str] = []
    for value in header_values:
        for parsed in parse_challenge_list(value):
            if parsed.scheme.lower() != SCHEME.lower():
                continue
            try:
                challenges.append(_challenge_from_params(parsed))
            except ValueError as exc:
                skipped.append(str(exc))
    return ChallengeList(challenges, skipped)


def parse_challenges(header_values: str | Sequence[str]) -> list[Challenge]:
    """The well-formed Payment challenges of `read_challenges`."""
    return read_challenges(header_values).challenges


def _challenge_from_params(parsed: AuthChallenge) -> Challenge:
    if parsed.problem is not None:
        raise ValueError(f"malformed Payment challenge: {parsed.problem}")
    if parsed.token68 is not None:
        raise ValueError("malformed Payment challenge: a token68 instead of parameters")
    params = parsed.params
    for name in _REQUIRED:
        if name not in params:
            raise ValueError(f"Payment challenge without the {name} parameter")
    if not params["id"]:
        raise ValueError("Payment challenge with an empty id")
    if not _METHOD.fullmatch(params["method"]):
        raise ValueError("Payment challenge method is not lowercase letters")
    if not _INTENT.fullmatch(params["intent"]):
        raise ValueError("Payment challenge intent is not a token")
    optional = {name: params.get(name) or None for name in _OPTIONAL}
    if optional["expires"] is not None:
        try:
            parse_rfc3339(optional["expires"])
        except ValueError:
            raise ValueError("Payment challenge expires is not an RFC 3339 date-time") from None
    if optional["header"] is not None and optional["header"] != PAYMENT_AUTHORIZATION:
        # draft -01: any other value makes the challenge unrecognised.
        raise ValueError("Payment challenge header parameter names an unsupported field")
    return Challenge(**{name: params[name] for name in _REQUIRED}, **optional)


# --- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """A decoded `Authorization: Payment` value. `preimage` is set for lightning/charge (and
    then valid), None for any other method or intent (check_credential refuses those)."""

    challenge: Challenge
    preimage: bytes | None = field(repr=False)  # a bearer secret: kept out of logged reprs
    source: str | None = None
    payload: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False, hash=False
    )


@dataclass(frozen=True)
class Charge:
    """What check_credential vouches for; the engine still settles and consumes it."""

    challenge_id: str
    payment_hash: bytes
    amount_sat: int
    invoice: str
    expires_at: float
    realm: str
    opaque: Mapping[str, str] | None = field(default=None, hash=False)
    source: str | None = None


def is_payment_authorization(value: str) -> bool:
    """Does an Authorization value use the Payment scheme (any case)?"""
    scheme = value.lstrip(" \t").partition(" ")[0]
    return scheme.lower() == SCHEME.lower()


def encode_credential(challenge: Challenge, preimage: bytes, source: str | None = None) -> str:
    """The Authorization value `Payment <base64url(JCS(JSON))>` answering `challenge`."""
    if len(preimage) != PREIMAGE_SIZE:
        raise ValueError(f"preimage must be {PREIMAGE_SIZE} bytes, got {len(preimage)}")
    body: dict[str, object] = {
        "challenge": challenge.echo(),
        "payload": {"preimage": preimage.hex()},
    }
    if source is not None:
        body["source"] = source
    return f"{SCHEME} {b64url_encode(canonical_json(body))}"


def _malformed(message: str) -> PaymentSchemeError:
    return PaymentSchemeError("malformed-credential", message)


def decode_credential(authorization_value: str) -> Credential:
    """Strictly decode `Payment <base64url JSON>`; PaymentSchemeError("malformed-credential")
    says what is wrong. Unknown members are ignored, duplicate ones are not."""
    value = authorization_value.strip(" \t")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != SCHEME.lower():
        shown = f" {scheme!r}" if _SCHEME_NAME.fullmatch(scheme) else ""
        raise _malformed(f"authorization scheme{shown} is not Payment")
    token = token.lstrip(" ")
    if not token:
        raise _malformed("empty Payment credential")
    try:
        raw = b64url_decode(token, max_decoded=MAX_JSON_SIZE, what="credential")
        body = loads_strict(raw, "credential")
    except (Base64urlError, JsonError) as exc:
        raise _malformed(str(exc)) from None
    if not isinstance(body, dict):
        raise _malformed("credential is not a JSON object")
    echoed = body.get("challenge")
    if not isinstance(echoed, dict):
        raise _malformed("credential has no challenge object")
    challenge = _challenge_from_echo(echoed)
    source = body.get("source")
    if source is not None and not isinstance(source, str):
        raise _malformed("credential source must be a string")
    payload = body.get("payload")
    if not isinstance(payload, dict):
        raise _malformed("credential has no payload object")
    preimage = None
    if (challenge.method, challenge.intent) == (METHOD_LIGHTNING, INTENT_CHARGE):
        text = payload.get("preimage")
        if not isinstance(text, str) or not _HEX64.fullmatch(text):
            raise _malformed("payload.preimage must be 64 lowercase hex characters")
        preimage = bytes.fromhex(text)
    return Credential(challenge, preimage, source, MappingProxyType(payload))


def _challenge_from_echo(echoed: dict[str, object]) -> Challenge:
    required: dict[str, str] = {}
    for name in _REQUIRED:
        value = echoed.get(name)
        if not isinstance(value, str) or not value:
            raise _malformed(f"challenge.{name} is missing or not a non-empty string")
        required[name] = value
    optional: dict[str, str | None] = {}
    for name in _OPTIONAL:
        value = echoed.get(name)
        if value is not None and not isinstance(value, str):
            raise _malformed(f"challenge.{name} must be a string")
        optional[name] = value or None  # "" is absent, as Aperture (omitempty) writes it
    return Challenge(**required, **optional)


def check_credential(
    credential: Credential,
    *,
    secrets: Sequence[bytes],
    now: float,
    invoice_payment_hash: bytes,
    price_sat: int | None = None,
) -> Charge:
    """The pure checks, in the draft's order: binding -> expires -> method/intent -> amount
    (when `price_sat` is given: a charge minted for a cheaper route) -> sha256(preimage) ==
    the invoice's payment hash. Raises PaymentSchemeError with the problem type to answer.

    `invoice_payment_hash` is the hash decoded from the challenge's own invoice (authoritative;
    the request's paymentHash must agree with it). NOT done here, and the engine's job: that
    the invoice is settled, and consuming the charge atomically, exactly once across every
    instance (keyed by payment hash, kept until `expires_at` has passed), before serving."""
    challenge = credential.challenge
    if not verify_binding(challenge, secrets):
        raise PaymentSchemeError("invalid-challenge", "the challenge was not issued here")
    if challenge.expires is None:
        # Every challenge we mint expires; one that does not could be consumed-tracked forever.
        raise PaymentSchemeError("invalid-challenge", "the challenge has no expiry")
    try:
        expires_at = parse_rfc3339(challenge.expires)
    except ValueError:
        raise PaymentSchemeError("invalid-challenge", "the challenge expiry is malformed") from None
    if now >= expires_at:
        raise PaymentSchemeError("payment-expired", "the challenge has expired")
    if (challenge.method, challenge.intent) != (METHOD_LIGHTNING, INTENT_CHARGE):
        raise PaymentSchemeError(
            "method-unsupported", "only method lightning with intent charge is accepted"
        )
    try:
        request = challenge.charge_request()
    except ValueError as exc:
        raise PaymentSchemeError("invalid-challenge", str(exc)) from None
    if request.payment_hash is not None and request.payment_hash != invoice_payment_hash:
        raise PaymentSchemeError("invalid-challenge", "the request and its invoice disagree")
    if price_sat is not None and request.amount_sat < price_sat:
        raise PaymentSchemeError(
            "payment-insufficient",
            f"the charge is for {request.amount_sat} sat, this resource costs {price_sat}",
        )
    preimage = credential.preimage
    if preimage is None or not hmac.compare_digest(
        hashlib.sha256(preimage).digest(), invoice_payment_hash
    ):
        raise PaymentSchemeError("verification-failed", "the preimage does not match the invoice")
    try:
        opaque = challenge.opaque_map()
    except ValueError:
        opaque = None  # bound by our HMAC, so ours; unreadable means we never wrote one
    return Charge(
        challenge_id=challenge.id,
        payment_hash=invoice_payment_hash,
        amount_sat=request.amount_sat,
        invoice=request.invoice,
        expires_at=expires_at,
        realm=challenge.realm,
        opaque=MappingProxyType(opaque) if opaque is not None else None,
        source=credential.source,
    )


# --- Accept-Payment (the parsing and ordering live in accept_payment.py) ---------------------


def order_challenges(
    challenges: Sequence[Challenge], accept_payment: str | None
) -> list[Challenge]:
    """accept_payment.order_offers for Payment challenges."""
    return order_offers(challenges, accept_payment, lambda c: (c.method, c.intent))


__all__ = [
    "ACCEPT_HEADER",
    "CURRENCY_SAT",
    "INTENT_CHARGE",
    "MAX_JSON_SIZE",
    "METHOD_LIGHTNING",
    "NETWORKS",
    "PAYMENT_AUTHORIZATION",
    "PROBLEMS",
    "PROBLEM_BASE",
    "PROBLEM_CONTENT_TYPE",
    "RECEIPT_HEADER",
    "SCHEME",
    "Challenge",
    "ChallengeList",
    "Charge",
    "ChargeRequest",
    "Credential",
    "PaymentSchemeError",
    "Receipt",
    "challenge_id",
    "check_credential",
    "decode_charge_request",
    "decode_credential",
    "decode_receipt",
    "encode_credential",
    "encode_receipt",
    "format_rfc3339",
    "header_value",
    "invoice_mismatches",
    "is_payment_authorization",
    "mint_challenge",
    "order_challenges",
    "parse_challenges",
    "parse_rfc3339",
    "problem_json",
    "read_challenges",
    "verify_binding",
]
