"""Persistence: the server's tokens and secret (SQLite, or PostgreSQL for several instances
sharing one state), the client's ledger and tokens (SQLite)."""

from l402proxy.store.client import ClientStore, NewPayment, Payment
from l402proxy.store.database import TokenStore
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
    "TokenStore",
    "is_postgres_uri",
    "open_server_store",
    "shown_store_uri",
    "sqlite_path_from_uri",
]


def is_postgres_uri(uri: str) -> bool:
    """Whether a `l402_store` value names a PostgreSQL database (postgres:// or postgresql://)."""
    return uri.strip().split(":", 1)[0].lower() in ("postgres", "postgresql")


def shown_store_uri(uri: str) -> str:
    """A `l402_store` value fit for messages and logs: a PostgreSQL URI without its user
    info, its password wherever it was put, or anything when it cannot be taken apart
    (store/postgres.py's split_uri); a SQLite path as given."""
    if not is_postgres_uri(uri):
        return uri
    # Imported here, as in open_server_store (asyncpg is slow to import).
    from l402proxy.store.postgres import shown_uri

    return shown_uri(uri)


async def open_server_store(uri: str) -> TokenStore:
    """Open the store a `l402_store` value names: "" (default file), a path, a sqlite:/// URI,
    or a postgresql:// URI (see store/postgres.py)."""
    if is_postgres_uri(uri):
        # Imported here: asyncpg takes a tenth of a second to import, and SQLite is the default.
        from l402proxy.store.postgres import PostgresServerStore

        return await PostgresServerStore.open(uri)
    return await ServerStore.open(uri)
