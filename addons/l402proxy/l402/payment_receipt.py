"""The Payment-Receipt header (draft-httpauth-payment; Lightning charge receipt fields): sent on
success only, its reference the payment hash, never the preimage."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .b64url import Base64urlError, b64url_decode, b64url_encode
from .charge_request import MAX_JSON_SIZE, METHOD_LIGHTNING
from .jcs import JsonError, canonical_json, loads_strict
from .rfc3339 import format_rfc3339, parse_rfc3339

RECEIPT_HEADER = "Payment-Receipt"


@dataclass(frozen=True)
class Receipt:
    status: str
    method: str
    timestamp: str
    reference: str
    challenge_id: str | None = None
    # Members this reader does not model (a session's refundSats...), as sent.
    extra: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, hash=False
    )

    def timestamp_at(self) -> float:
        return parse_rfc3339(self.timestamp)


def encode_receipt(challenge_id: str, payment_hash: bytes, now: float) -> str:
    """The Payment-Receipt value; its reference is the payment hash, never the preimage."""
    if len(payment_hash) != 32:
        raise ValueError("payment_hash must be 32 bytes")
    body = {
        "challengeId": challenge_id,
        "method": METHOD_LIGHTNING,
        "reference": payment_hash.hex(),
        "status": "success",
        "timestamp": format_rfc3339(now),
    }
    return b64url_encode(canonical_json(body))


def decode_receipt(value: str) -> Receipt:
    """Strictly decode a Payment-Receipt value; ValueError says in one line what is wrong."""
    try:
        raw = b64url_decode(value.strip(" \t"), max_decoded=MAX_JSON_SIZE, what="receipt")
        body = loads_strict(raw, "receipt")
    except (Base64urlError, JsonError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(body, dict):
        raise ValueError("receipt is not a JSON object")
    if body.get("status") != "success":
        raise ValueError('receipt status is not "success"')
    texts: dict[str, str] = {}
    for name in ("method", "timestamp", "reference"):
        member = body.get(name)
        if not isinstance(member, str) or not member:
            raise ValueError(f"receipt {name} is missing or not a string")
        texts[name] = member
    parse_rfc3339(texts["timestamp"])  # ValueError names the problem
    challenge = body.get("challengeId")
    if challenge is not None and not isinstance(challenge, str):
        raise ValueError("receipt challengeId must be a string")
    known = {"status", "method", "timestamp", "reference", "challengeId"}
    extra = {name: member for name, member in body.items() if name not in known}
    return Receipt(
        status="success",
        method=texts["method"],
        timestamp=texts["timestamp"],
        reference=texts["reference"],
        challenge_id=challenge or None,
        extra=MappingProxyType(extra),
    )
