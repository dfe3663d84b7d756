"""The two small interfaces every Lightning backend implements, and their shared types."""

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class Invoice:
    bolt11: str
    payment_hash: bytes
    amount_msat: int
    expires_at: float


@dataclass(frozen=True)
class InvoiceState:
    payment_hash: bytes
    settled: bool
    # Only set once settled: before that the preimage is the secret being sold.
    preimage: bytes | None
    amount_msat: int


@dataclass(frozen=True)
class PaymentResult:
    payment_hash: bytes
    preimage: bytes
    amount_msat: int
    fee_msat: int


PaymentStatus = Literal["pending", "succeeded", "failed", "unknown"]


@dataclass(frozen=True)
class PaymentState:
    payment_hash: bytes
    status: PaymentStatus
    preimage: bytes | None
    fee_msat: int


class LightningError(Exception):
    """A backend or wallet failure; the message is safe to log and show (no secrets)."""


class BackendUnavailable(LightningError):
    """The node, ledger or service cannot be reached right now."""


class PaymentFailed(LightningError):
    """The payment did not happen (nothing was debited)."""


class InvoiceNotFound(LightningError):
    """The backend does not know this payment hash."""


@runtime_checkable
class InvoiceBackend(Protocol):
    """Server side: issue invoices and learn whether they were paid."""

    name: str

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice: ...

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


@runtime_checkable
class Wallet(Protocol):
    """Client side: pay invoices and, after a crash, find out what happened to a payment."""

    name: str

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult: ...

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...
