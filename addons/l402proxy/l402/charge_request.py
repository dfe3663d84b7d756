"""The `request` of a Payment challenge for method "lightning", intent "charge"
(draft-lightning-charge): what to pay, written as base64url(JCS(JSON)) and read strictly."""

import re
from dataclasses import dataclass

from .b64url import Base64urlError, b64url_decode, b64url_encode
from .invoice import InvoiceInfo
from .jcs import JsonError, canonical_json, loads_strict

METHOD_LIGHTNING = "lightning"
INTENT_CHARGE = "charge"
CURRENCY_SAT = "sat"
# The draft names mainnet, regtest and signet; "testnet" is what this project (and Aperture,
# which sends its configured network verbatim) calls lntb invoices, so it is read and written too.
NETWORKS = frozenset({"mainnet", "testnet", "signet", "regtest"})
# The largest decoded credential, request, opaque or receipt JSON read (Aperture's cap; the
# draft asks for at least 4 KB). Checked on the encoded length before any decoding.
MAX_JSON_SIZE = 64 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_AMOUNT = re.compile(r"[1-9][0-9]{0,15}")  # whole sats; 21e6 BTC is 2.1e15 sat, 16 digits


@dataclass(frozen=True)
class ChargeRequest:
    """The decoded `request` of a lightning/charge challenge. The invoice is authoritative:
    a payer checks the rest against it (`invoice_mismatches`)."""

    amount_sat: int
    invoice: str
    payment_hash: bytes | None = None
    network: str | None = None
    currency: str = CURRENCY_SAT
    description: str | None = None
    recipient: str | None = None
    external_id: str | None = None

    def to_json(self) -> dict[str, object]:
        details: dict[str, object] = {"invoice": self.invoice}
        if self.payment_hash is not None:
            details["paymentHash"] = self.payment_hash.hex()
        if self.network is not None:
            details["network"] = self.network
        body: dict[str, object] = {
            "amount": str(self.amount_sat),
            "currency": self.currency,
            "methodDetails": details,
        }
        for name, value in (
            ("description", self.description),
            ("recipient", self.recipient),
            ("externalId", self.external_id),
        ):
            if value is not None:
                body[name] = value
        return body

    def encode(self) -> str:
        """base64url(JCS(JSON)): the challenge's `request` parameter."""
        return b64url_encode(canonical_json(self.to_json()))


def decode_charge_request(request: str) -> ChargeRequest:
    """Strictly decode a lightning/charge `request`; ValueError says in one line what is wrong.
    Unknown members are ignored (the drafts' versioning rule), a methodDetails.version other
    than 1 is not."""
    try:
        raw = b64url_decode(request, max_decoded=MAX_JSON_SIZE, what="request")
        body = loads_strict(raw, "request")
    except (Base64urlError, JsonError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(body, dict):
        raise ValueError("request is not a JSON object")
    amount = body.get("amount")
    if not isinstance(amount, str) or not _AMOUNT.fullmatch(amount):
        raise ValueError("request amount must be a positive whole number of sats as a string")
    if body.get("currency") != CURRENCY_SAT:
        raise ValueError('request currency must be "sat"')
    details = body.get("methodDetails")
    if not isinstance(details, dict):
        raise ValueError("request has no methodDetails object")
    version = details.get("version", 1)
    if type(version) is not int or version != 1:  # absent means 1; True and 1.0 are not 1
        raise ValueError("request methodDetails.version is not one this client knows")
    invoice = details.get("invoice")
    if not isinstance(invoice, str) or not invoice:
        raise ValueError("request has no methodDetails.invoice")
    payment_hash = details.get("paymentHash")
    if payment_hash is not None and (
        not isinstance(payment_hash, str) or not _HEX64.fullmatch(payment_hash)
    ):
        raise ValueError("request paymentHash must be 64 lowercase hex characters")
    network = details.get("network")
    if network is not None and network not in NETWORKS:
        raise ValueError("request network is not mainnet, testnet, signet or regtest")
    texts: dict[str, str | None] = {}
    for name in ("description", "recipient", "externalId"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"request {name} must be a string")
        texts[name] = value
    return ChargeRequest(
        amount_sat=int(amount),
        invoice=invoice,
        payment_hash=bytes.fromhex(payment_hash) if payment_hash is not None else None,
        network=network,
        description=texts["description"],
        recipient=texts["recipient"],
        external_id=texts["externalId"],
    )


def invoice_mismatches(request: ChargeRequest, info: InvoiceInfo) -> list[str]:
    """Where the request disagrees with its own (decoded) invoice; a payer pays only on []."""
    problems = []
    if info.amount_msat is None:
        problems.append("the invoice has no amount")
    elif info.amount_msat != request.amount_sat * 1000:
        problems.append(
            f"the invoice is for {info.amount_msat} msat, the request for {request.amount_sat} sat"
        )
    if request.payment_hash is not None and request.payment_hash != info.payment_hash:
        problems.append("the request's paymentHash is not the invoice's payment hash")
    network = request.network or "mainnet"  # the draft's default when the field is absent
    if network != info.network:
        problems.append(f"the request says {network}, the invoice is for {info.network}")
    return problems
