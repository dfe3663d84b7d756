"""Persistence for the server addon (SQLite now; PostgreSQL later for several proxy instances)."""

from l402proxy.store.sqlite import (
    MIGRATIONS,
    POSTGRES_UNAVAILABLE,
    IssuedToken,
    ServerStore,
    StoreError,
    sqlite_path_from_uri,
)

__all__ = [
    "MIGRATIONS",
    "IssuedToken",
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
