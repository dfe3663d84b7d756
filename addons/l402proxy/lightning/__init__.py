"""Lightning backends (server: issue invoices) and wallets (client: pay), chosen by URI."""

from pathlib import Path
from urllib.parse import parse_qs

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


MAX_DEV_DELAY_SECONDS = 600.0


def _parse_dev_uri(uri: str, default: str, *, wallet: bool) -> tuple[str, float]:
    """(dev wallet name, answer delay) from `dev`, `dev:<wallet>`, `dev:<wallet>?delay=<s>`.

    The delay (wallets only) makes the dev wallet answer late after paying, the way a node
    does when the preimage takes its time to come back: tests use it to crash a client
    mid-payment. Any other scheme is refused.
    """
    base, _, query = uri.strip().partition("?")
    scheme, sep, rest = base.partition(":")
    if scheme.strip().lower() != "dev":
        supported = ", ".join(SUPPORTED_SCHEMES)
        raise LightningError(
            f"unsupported backend URI scheme {scheme.strip()!r} (supported now: {supported})"
        )
    if sep and not rest:
        raise LightningError("dev URI without a wallet name: use 'dev' or 'dev:<wallet>'")
    delay = 0.0
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name != "delay" or not wallet:
            allowed = "'delay'" if wallet else "none"
            raise LightningError(f"dev URI: unknown parameter {name!r} (allowed: {allowed})")
        try:
            delay = float(values[-1])
        except ValueError:
            raise LightningError(f"dev URI: delay {values[-1]!r} is not a number") from None
        if not 0 <= delay <= MAX_DEV_DELAY_SECONDS:
            raise LightningError(f"dev URI: delay must be 0-{MAX_DEV_DELAY_SECONDS:g} seconds")
    return (rest if sep else default), delay


def open_backend(uri: str, *, dev_ledger: str | Path) -> InvoiceBackend:
    """The server's invoice backend for `uri`; cheap: connects on first use or `start()`."""
    wallet, _ = _parse_dev_uri(uri, DEFAULT_SERVER_WALLET, wallet=False)
    return DevInvoiceBackend(DevLedger(dev_ledger), wallet)


def open_wallet(uri: str, *, dev_ledger: str | Path) -> Wallet:
    """The client's wallet for `uri`; cheap: connects on first use or `start()`."""
    wallet, delay = _parse_dev_uri(uri, DEFAULT_CLIENT_WALLET, wallet=True)
    return DevWallet(DevLedger(dev_ledger), wallet, delay=delay)


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
