"""What the server and client stores share: one private SQLite file, WAL, a versioned schema,
and one transaction at a time on one aiosqlite connection."""

import asyncio
import logging
import os
import re
import sqlite3
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import aiosqlite

from l402proxy.paths import ensure_parent

log = logging.getLogger("l402proxy.store")

BUSY_TIMEOUT_MS = 5000

POSTGRES_UNAVAILABLE = "PostgreSQL store is not available yet; use a SQLite path"

# A scheme needs two or more letters so that "C:" style prefixes are not taken for one.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class StoreError(Exception):
    """A store problem worth showing to the user as is (no secrets in the message)."""


def sqlite_path_from_uri(uri: str, default: str) -> Path:
    """Store URI or path -> absolute file path; StoreError says how to write it otherwise.

    Accepted: "" (the `default` file), a plain path (`~` expanded, relative to the working
    directory), or `sqlite:///absolute/path`.
    """
    text = uri.strip()
    if not text:
        return Path(default).expanduser().absolute()
    if text == ":memory:":
        raise StoreError("an in-memory store cannot work: its keys and tokens must persist")
    match = _SCHEME_RE.match(text)
    if match is None:
        return Path(text).expanduser().absolute()
    scheme = match.group(1).lower()
    if scheme in ("postgres", "postgresql"):
        raise StoreError(POSTGRES_UNAVAILABLE)
    if scheme != "sqlite":
        raise StoreError(
            f"unsupported store URI scheme '{scheme}' (use a SQLite file path or "
            "sqlite:///absolute/path; for a file name containing ':', write ./name)"
        )
    parts = urlsplit(text)
    if parts.netloc:
        raise StoreError(
            f"store URI '{uri}' is not an absolute path: write sqlite:///absolute/path "
            "(three slashes), or give a relative path without the sqlite:// prefix"
        )
    if parts.query or parts.fragment:
        raise StoreError(f"store URI '{uri}': query parameters are not supported")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise StoreError(
            f"store URI '{uri}' is not an absolute path: write sqlite:///absolute/path, "
            "or give a relative path without the sqlite: prefix"
        )
    if path.endswith("/"):
        raise StoreError(f"store URI '{uri}' names a directory, not a database file")
    return Path(path)


def _prepare_file(path: Path) -> None:
    """Create the database file private to the user before SQLite opens it.

    It holds secrets (the server's token secret, the client's paid tokens). SQLite gives its
    -wal/-shm files the mode of the database file, so fixing the main file is enough for new ones.
    """
    ensure_parent(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except PermissionError:
                log.warning("cannot make %s private (mode 0600): not its owner", path)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        try:
            if stat.S_IMODE(side.stat().st_mode) & 0o077:
                side.chmod(0o600)
        except FileNotFoundError:
            pass
        except PermissionError:
            log.warning("cannot make %s private (mode 0600): not its owner", side)


class Database(ABC):
    """One SQLite connection shared by a process's coroutines.

    Subclasses name their schema history in `migrations()`: entry i brings the file from
    user_version i to i + 1, in one transaction with the version bump, so a crash mid-migration
    leaves the old version intact. Never edit a released entry: append a new one.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db: aiosqlite.Connection | None = db
        self.path = path
        # One connection means one transaction at a time: without this lock, two coroutines
        # could interleave statements inside each other's BEGIN ... COMMIT.
        self._lock = asyncio.Lock()

    @abstractmethod
    def migrations(self) -> Sequence[Sequence[str]]:
        """The schema history of this kind of store."""

    @classmethod
    async def open_path(cls, path: Path) -> Self:
        try:
            await asyncio.to_thread(_prepare_file, path)
        except OSError as exc:
            raise StoreError(f"cannot create store file {path}: {exc.strerror or exc}") from exc
        try:
            db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        store = cls(db, path)
        try:
            await store._setup()
        except BaseException:
            await db.close()
            raise
        return store

    async def _setup(self) -> None:
        db = self._live()
        try:
            # busy_timeout first: switching to WAL and migrating need locks another process
            # opening the same file may hold for a moment.
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await db.execute("PRAGMA foreign_keys = ON")
            # Check the version before anything writes, so a newer file is left untouched.
            version = await self._user_version()
            self._check_version(version)
            await self._enable_wal()
            await db.execute("PRAGMA synchronous = NORMAL")
            if version < len(self.migrations()):
                await self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use store {self.path}: {exc}") from exc

    async def _enable_wal(self) -> None:
        # SQLite answers "locked" at once, without the busy handler, when two connections
        # both hold a read lock and want the write lock (its deadlock guard); that is what
        # two processes switching a fresh file to WAL together do. So wait and retry here.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = 0.005
        while True:
            try:
                row = await self._one("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        if row is None or str(row[0]).lower() != "wal":
            log.warning("%s: WAL journal not available (got %r)", self.path, row)

    def _check_version(self, version: int) -> None:
        known = len(self.migrations())
        if version > known:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this l402proxy "
                f"knows ({known}); upgrade l402proxy or use another store file"
            )

    async def _migrate(self) -> None:
        for target, statements in enumerate(self.migrations(), start=1):
            async with self._transaction() as db:
                # Re-read under the write lock: another process may have migrated meanwhile.
                current = await self._user_version()
                self._check_version(current)
                if current >= target:
                    continue
                try:
                    for statement in statements:
                        await db.execute(statement)
                except sqlite3.Error as exc:
                    raise StoreError(
                        f"store {self.path}: migration to schema version {target} failed: {exc}"
                    ) from exc
                # PRAGMA does not take parameters; target is our own int.
                await db.execute(f"PRAGMA user_version = {int(target)}")
                log.info("store %s migrated to schema version %d", self.path, target)

    async def _user_version(self) -> int:
        row = await self._one("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self._live().execute_fetchall(sql, params)
        return next(iter(rows), None)

    def _live(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is closed")
        return self._db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; sqlite3 errors become StoreError.

        IMMEDIATE takes the write lock up front, so read-then-write sequences cannot race
        another process.
        """
        async with self._lock:
            db = self._live()
            try:
                try:
                    await db.execute("BEGIN IMMEDIATE")
                except BaseException:
                    # Cancelled while aiosqlite's thread ran the BEGIN (a proxy shutting down
                    # cancels its flush task): the transaction may have begun all the same, and
                    # the next BEGIN (close's own flush) would fail "within a transaction".
                    await self._rollback(db)
                    raise
                try:
                    yield db
                    await db.execute("COMMIT")
                except BaseException:
                    await self._rollback(db)
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        # Fails harmlessly when SQLite already rolled back (e.g. after a failed COMMIT).
        with suppress(sqlite3.Error):
            await db.execute("ROLLBACK")

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # Under the lock so a read never sees another coroutine's uncommitted transaction.
        async with self._lock:
            try:
                return list(await self._live().execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._db is None:
            return
        db, self._db = self._db, None
        await db.close()
