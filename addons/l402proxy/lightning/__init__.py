"""Lightning backends (server: issue invoices) and wallets (client: pay), chosen by URI."""

from pathlib import Path

from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    PaymentStatus,
    Wallet,
)
from l402proxy.lightning.dev import (
    DEFAULT_CLIENT_WALLET,
    DEFAULT_SERVER_WALLET,
    NEW_WALLET_BALANCE_MSAT,
    DevInvoiceBackend,
    DevLedger,
    DevWallet,
)

SUPPORTED_SCHEMES = ("dev",)


def _dev_wallet_name(uri: str, default: str) -> str:
    """The wallet a `dev` / `dev:<name>` URI names; any other scheme is refused."""
    scheme, sep, rest = uri.strip().partition(":")
    if scheme.strip().lower() != "dev":
        supported = ", ".join(SUPPORTED_SCHEMES)
        raise LightningError(
            f"unsupported backend URI scheme {scheme.strip()!r} (supported now: {supported})"
        )
    if not sep:
        return default
    if not rest:
        raise LightningError("dev URI without a wallet name: use 'dev' or 'dev:<wallet>'")
    return rest


def open_backend(uri: str, *, dev_ledger: str | Path) -> InvoiceBackend:
    """The server's invoice backend for `uri`; cheap: connects on first use or `start()`."""
    wallet = _dev_wallet_name(uri, DEFAULT_SERVER_WALLET)
    return DevInvoiceBackend(DevLedger(dev_ledger), wallet)


def open_wallet(uri: str, *, dev_ledger: str | Path) -> Wallet:
    """The client's wallet for `uri`; cheap: connects on first use or `start()`."""
    wallet = _dev_wallet_name(uri, DEFAULT_CLIENT_WALLET)
    return DevWallet(DevLedger(dev_ledger), wallet)


__all__ = [
    "DEFAULT_CLIENT_WALLET",
    "DEFAULT_SERVER_WALLET",
    "NEW_WALLET_BALANCE_MSAT",
    "BackendUnavailable",
    "DevInvoiceBackend",
    "DevLedger",
    "DevWallet",
    "Invoice",
    "InvoiceBackend",
    "InvoiceNotFound",
    "InvoiceState",
    "LightningError",
    "PaymentFailed",
    "PaymentResult",
    "PaymentState",
    "PaymentStatus",
    "Wallet",
    "open_backend",
    "open_wallet",
]
