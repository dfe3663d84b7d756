"""Persistence: the server's tokens and secret, the client's ledger and tokens (SQLite; a
PostgreSQL server store later, for several proxy instances)."""

from l402proxy.store.client import ClientStore, NewPayment, Payment
from l402proxy.store.database import POSTGRES_UNAVAILABLE
from l402proxy.store.sqlite import (
    MIGRATIONS,
    IssuedToken,
    ServerStore,
    StoreError,
    sqlite_path_from_uri,
)

__all__ = [
    "MIGRATIONS",
    "ClientStore",
    "IssuedToken",
    "NewPayment",
    "Payment",
    "ServerStore",
    "StoreError",
    "open_server_store",
    "sqlite_path_from_uri",
]


async def open_server_store(uri: str) -> ServerStore:
    """Open the store a `l402_store` value names: "" (default file), a path, or a URI."""
    scheme = uri.strip().split(":", 1)[0].lower()
    # Dispatch here so a PostgreSQL store can slot in beside SQLite without touching callers.
    if scheme in ("postgres", "postgresql"):
        raise StoreError(POSTGRES_UNAVAILABLE)
    return await ServerStore.open(uri)
