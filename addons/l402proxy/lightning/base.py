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

# BOLT11 prefixes name these; `None` where a backend cannot tell (a Lightning Address).
Network = Literal["mainnet", "testnet", "signet", "regtest"]


@dataclass(frozen=True)
class NodeInfo:
    """What `info()` reached: enough for one line of `l402proxy backend check` and the start log."""

    backend: str  # "lnd", "cln", "eclair", "lnbits", "lnurl", "dev"
    address: str  # where, without secrets: "127.0.0.1:10009", "/path/lightning-rpc", "alice@host"
    alias: str | None = None  # the node alias, wallet name, or LNURL description
    network: Network | None = None
    pubkey: str | None = None  # hex node id, when the backend tells
    # The amounts it can issue invoices for, when it has limits: a Lightning Address's
    # minSendable..maxSendable. None: any amount.
    invoice_range_msat: tuple[int, int] | None = None

    def summary(self) -> str:
        parts = [f"{self.backend} at {self.address}"]
        if self.alias:
            parts.append(f"alias {self.alias!r}")
        if self.pubkey:
            parts.append(f"node {self.pubkey[:16]}...")
        parts.append(f"network {self.network or 'unknown'}")
        return ", ".join(parts)


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


class NothingSent(BackendUnavailable, PaymentFailed):
    """pay() could not reach the node at all (connection refused, TLS, a locked wallet, an
    unreadable ledger): the node is unavailable, and certainly nothing was sent.

    Both at once, so that every backend says "unreachable" the same way (BackendUnavailable)
    while the payer, which reads PaymentFailed as "no money moved", can end the payment at once
    instead of keeping it pending for a later lookup. Raised only where the request provably
    never reached the node; a connection lost after sending stays a plain BackendUnavailable.
    """


class InvoiceNotFound(LightningError):
    """The backend does not know this payment hash."""


class LookupUnsupported(LightningError):
    """This backend cannot look invoices up (a Lightning Address only hands out invoices)."""


# -- the optional parts ------------------------------------------------------------------------
#
# A backend or wallet may offer more than the two protocols below ask for. Callers never
# assume these: they go through start() and identity() here, which work for every backend.


@runtime_checkable
class Startable(Protocol):
    """Can connect and check itself now, so that a broken setup fails at start, not on the
    first invoice or payment. Backends without it connect on first use."""

    async def start(self) -> None: ...


@runtime_checkable
class Identified(Protocol):
    """Names which wallet paid, stably across restarts and before connecting (a node address,
    a key digest: never the secret itself). The payer records it with each payment, so that
    recovery after a crash asks the same wallet. Without it, the wallet's `name` is used."""

    @property
    def identity(self) -> str: ...


@runtime_checkable
class HasBalance(Protocol):
    """Can tell what it may still spend, in msat."""

    async def balance(self) -> int: ...


async def start(thing: "InvoiceBackend | Wallet") -> None:
    """Connect `thing` now if it can (Startable); otherwise it connects on first use."""
    if isinstance(thing, Startable):
        await thing.start()


def identity(wallet: "Wallet") -> str:
    """`wallet.identity` when it has one (Identified), else its backend name."""
    value = wallet.identity if isinstance(wallet, Identified) else None
    return value if isinstance(value, str) and value else wallet.name


@runtime_checkable
class InvoiceBackend(Protocol):
    """Server side: issue invoices and learn whether they were paid."""

    name: str

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice: ...

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState: ...

    async def info(self) -> NodeInfo:
        """Connect if needed and say what was reached; LightningError says what failed."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


@runtime_checkable
class Wallet(Protocol):
    """Client side: pay invoices and, after a crash, find out what happened to a payment."""

    name: str
    # Seconds after a pay() call starts during which the node may still start new attempts
    # on its own (after our call was cut off, even after this process died). Until then a
    # lookup_payment() that says "failed" or "unknown" may be a gap between attempts, not the
    # end: recovery keeps such a payment pending. 0 for wallets whose lookup is final at
    # once (the payment is recorded before anything is sent, and a failure is final).
    settles_within: float

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult: ...

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState: ...

    async def info(self) -> NodeInfo:
        """Connect if needed and say what was reached; LightningError says what failed."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...
