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


WALLET_TIMINGS = ("delay", "hold")


def _parse_dev_uri(uri: str, default: str, *, wallet: bool) -> tuple[str, dict[str, float]]:
    """(dev wallet name, timings) from `dev`, `dev:<wallet>`, `dev:<wallet>?delay=<s>&hold=<s>`.

    Timings (wallets only) make the dev wallet behave like a slow node, so tests can crash a
    client mid-payment: `hold` waits before paying (the payment is not sent yet), `delay`
    waits after paying (settled, but the preimage has not come back). Any other scheme is
    refused.
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
    timings: dict[str, float] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in WALLET_TIMINGS or not wallet:
            allowed = ", ".join(f"'{t}'" for t in WALLET_TIMINGS) if wallet else "none"
            raise LightningError(f"dev URI: unknown parameter {name!r} (allowed: {allowed})")
        try:
            seconds = float(values[-1])
        except ValueError:
            raise LightningError(f"dev URI: {name} {values[-1]!r} is not a number") from None
        if not 0 <= seconds <= MAX_DEV_DELAY_SECONDS:
            raise LightningError(f"dev URI: {name} must be 0-{MAX_DEV_DELAY_SECONDS:g} seconds")
        timings[name] = seconds
    return (rest if sep else default), timings


def open_backend(uri: str, *, dev_ledger: str | Path) -> InvoiceBackend:
    """The server's invoice backend for `uri`; cheap: connects on first use or `start()`."""
    wallet, _ = _parse_dev_uri(uri, DEFAULT_SERVER_WALLET, wallet=False)
    return DevInvoiceBackend(DevLedger(dev_ledger), wallet)


def open_wallet(uri: str, *, dev_ledger: str | Path) -> Wallet:
    """The client's wallet for `uri`; cheap: connects on first use or `start()`."""
    wallet, timings = _parse_dev_uri(uri, DEFAULT_CLIENT_WALLET, wallet=True)
    return DevWallet(DevLedger(dev_ledger), wallet, **timings)


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
