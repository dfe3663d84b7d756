"""BOLT11 facts a payer and a verifier need, read with the `bolt11` package."""

from dataclasses import dataclass

import bolt11
from bolt11.exceptions import Bolt11Exception

_NETWORKS = {"bc": "mainnet", "tb": "testnet", "tbs": "signet", "bcrt": "regtest"}


@dataclass(frozen=True)
class InvoiceInfo:
    payment_hash: bytes
    amount_msat: int | None
    network: str
    created_at: int
    expiry: int
    description: str | None
    payee: str | None
    # LNURL-pay invoices commit to sha256(metadata) here instead of carrying a description.
    description_hash: bytes | None = None

    @property
    def expires_at(self) -> int:
        return self.created_at + self.expiry

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at


def decode_invoice(value: str) -> InvoiceInfo:
    """Decode a BOLT11 string (a `lightning:` prefix is tolerated)."""
    text = value.strip()
    if text.lower().startswith("lightning:"):
        text = text[len("lightning:") :]
    try:
        decoded = bolt11.decode(text)
    except (Bolt11Exception, ValueError, KeyError, IndexError, TypeError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ValueError(f"invalid BOLT11 invoice: {reason}") from None
    return InvoiceInfo(
        payment_hash=bytes.fromhex(decoded.payment_hash),
        amount_msat=int(decoded.amount_msat) if decoded.amount_msat else None,
        network=_NETWORKS.get(decoded.currency, decoded.currency),
        created_at=int(decoded.date),
        expiry=int(decoded.expiry),
        description=decoded.description,
        payee=decoded.payee,
        description_hash=(
            bytes.fromhex(decoded.description_hash) if decoded.description_hash else None
        ),
    )
