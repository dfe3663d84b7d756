"""Lightning backends (server: issue invoices) and wallets (client: pay), chosen by URI."""

import importlib
from pathlib import Path

from l402proxy.lightning.base import (
    BackendUnavailable,
    HasBalance,
    Identified,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    LookupUnsupported,
    Network,
    NodeInfo,
    NothingSent,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    PaymentStatus,
    Startable,
    Wallet,
    identity,
    start,
)
from l402proxy.lightning.dev import (
    DEFAULT_CLIENT_WALLET,
    DEFAULT_SERVER_WALLET,
    NEW_WALLET_BALANCE_MSAT,
    DevInvoiceBackend,
    DevLedger,
    DevWallet,
)
from l402proxy.lightning.uri import module_for, parse_query, redact, shown_value

MAX_DEV_DELAY_SECONDS = 600.0


WALLET_TIMINGS = ("delay", "hold")


def _parse_dev_uri(uri: str, default: str, *, wallet: bool) -> tuple[str, dict[str, float]]:
    """(dev wallet name, timings) from `dev`, `dev:<wallet>`, `dev:<wallet>?delay=<s>&hold=<s>`.

    Timings (wallets only) make the dev wallet behave like a slow node, so tests can crash a
    client mid-payment: `hold` waits before paying (the payment is not sent yet), `delay`
    waits after paying (settled, but the preimage has not come back). Any other scheme is
    refused.
    """
    base, _, _ = uri.strip().partition("?")
    if "#" in uri:
        raise LightningError("dev URI: unexpected '#' part")
    _, sep, rest = base.partition(":")
    if sep and not rest:
        raise LightningError("dev URI without a wallet name: use 'dev' or 'dev:<wallet>'")
    timings: dict[str, float] = {}
    query = parse_query(uri, what="dev URI", allowed=WALLET_TIMINGS if wallet else ())
    for name in WALLET_TIMINGS:
        value = query.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            raise LightningError(f"dev URI: {name} {shown_value(value)} is not a number") from None
        if not 0 <= seconds <= MAX_DEV_DELAY_SECONDS:
            raise LightningError(f"dev URI: {name} must be 0-{MAX_DEV_DELAY_SECONDS:g} seconds")
        timings[name] = seconds
    return (rest if sep else default), timings


def _module(uri: str) -> object:
    # Imported on demand: a dev setup never loads grpc, and a missing optional piece only
    # matters to the backend that needs it.
    return importlib.import_module(f"l402proxy.lightning.{module_for(uri)}")


def open_backend(uri: str, *, dev_ledger: str | Path) -> InvoiceBackend:
    """The server's invoice backend for `uri`; cheap: connects on first use, `start()` or `info()`.

    Raises LightningError (secret-free) for a URI it cannot use."""
    if module_for(uri) == "dev":
        wallet, _ = _parse_dev_uri(uri, DEFAULT_SERVER_WALLET, wallet=False)
        return DevInvoiceBackend(DevLedger(dev_ledger), wallet)
    return _module(uri).backend_from_uri(uri)  # type: ignore[attr-defined,no-any-return]


def open_wallet(uri: str, *, dev_ledger: str | Path) -> Wallet:
    """The client's wallet for `uri`; cheap: connects on first use, `start()` or `info()`."""
    if module_for(uri) == "dev":
        wallet, timings = _parse_dev_uri(uri, DEFAULT_CLIENT_WALLET, wallet=True)
        return DevWallet(DevLedger(dev_ledger), wallet, **timings)
    return _module(uri).wallet_from_uri(uri)  # type: ignore[attr-defined,no-any-return]


__all__ = [
    "DEFAULT_CLIENT_WALLET",
    "DEFAULT_SERVER_WALLET",
    "NEW_WALLET_BALANCE_MSAT",
    "BackendUnavailable",
    "DevInvoiceBackend",
    "DevLedger",
    "DevWallet",
    "HasBalance",
    "Identified",
    "Invoice",
    "InvoiceBackend",
    "InvoiceNotFound",
    "InvoiceState",
    "LightningError",
    "LookupUnsupported",
    "Network",
    "NodeInfo",
    "NothingSent",
    "PaymentFailed",
    "PaymentResult",
    "PaymentState",
    "PaymentStatus",
    "Startable",
    "Wallet",
    "identity",
    "open_backend",
    "open_wallet",
    "redact",
    "start",
]
