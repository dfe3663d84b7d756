"""Small checks and message helpers every backend module shares: argument checks, one-line
texts from a node's answers and the invoice a wallet may pay. (The HTTP plumbing is in
http.py.)"""

import time
from typing import Final

from l402proxy.l402.invoice import InvoiceInfo, decode_invoice
from l402proxy.lightning.base import LightningError, PaymentFailed

# A node's own error text, shown in our messages: long enough to say what, short enough for a
# log line.
MAX_SHOWN_MESSAGE: Final = 300
_LIGHTNING_URI = "lightning:"


def one_line(text: object, limit: int = MAX_SHOWN_MESSAGE) -> str:
    """`text` on one line, cut at `limit` characters."""
    shown = " ".join(str(text).split())
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def bad_answer(where: str, call: str, what: str) -> LightningError:
    return LightningError(f"{where}: bad answer to {call}: {what}")


def check_int(value: object, what: str, low: int) -> int:
    # bool is an int subclass; True sat is a bug, not an amount.
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LightningError(f"{what} must be an integer of at least {low}, got {value!r}")
    return value


def check_hash(payment_hash: bytes) -> bytes:
    if not isinstance(payment_hash, bytes | bytearray) or len(payment_hash) != 32:
        raise LightningError("payment_hash must be 32 bytes")
    return bytes(payment_hash)


def hex32(value: object, where: str, call: str, what: str) -> bytes:
    """32 bytes from a node's 64-hex-digit field, or a bad-answer error naming the field."""
    if isinstance(value, str) and len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise bad_answer(where, call, f"{what} is not 32 bytes of hex")


def payable_invoice(bolt11: object, now: float | None = None) -> tuple[str, InvoiceInfo]:
    """(the BOLT11 text to hand the node, what it says) for an invoice a wallet may pay;
    PaymentFailed (nothing was sent) for anything else: not an invoice, no amount, expired.

    Expiry is checked here, before any node is asked, because not every node does (LNbits
    1.6.2 settles an expired invoice of one of its own wallets), and so that every wallet
    refuses it in the same words."""
    if not isinstance(bolt11, str):
        raise PaymentFailed("invalid BOLT11 invoice: not a string")
    text = bolt11.strip()
    if text[: len(_LIGHTNING_URI)].lower() == _LIGHTNING_URI:
        text = text[len(_LIGHTNING_URI) :]
    try:
        decoded = decode_invoice(text)
    except ValueError as exc:
        raise PaymentFailed(str(exc)) from None
    if decoded.amount_msat is None:
        raise PaymentFailed("invoice has no amount: l402proxy never pays amountless invoices")
    now = time.time() if now is None else now
    if decoded.is_expired(now):
        raise PaymentFailed(
            f"invoice expired {max(int(now - decoded.expires_at), 0)} s ago; nothing was sent"
        )
    return text, decoded
