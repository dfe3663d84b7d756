"""What the stores share: for the SQLite stores (server and client), one private file, WAL, a
versioned schema and one transaction at a time on one aiosqlite connection; for the two server
stores (SQLite and PostgreSQL), their records (issued tokens, feed accesses, consumed Payment
charges), token references, the write-behind queue and the interface the engine and the CLI use
(`TokenStore`)."""

import asyncio
import logging
import math
import os
import re
import secrets
import sqlite3
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import unquote, urlsplit

import aiosqlite

from l402proxy.l402.headers import MAX_CREDENTIAL_SIZE
from l402proxy.paths import ensure_parent

log = logging.getLogger("l402proxy.store")

BUSY_TIMEOUT_MS = 5000

# A scheme needs two or more letters so that "C:" style prefixes are not taken for one.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class StoreError(Exception):
    """A store problem worth showing to the user as is (no secrets in the message)."""


class BadTokenRef(StoreError):
    """A token reference that is not hex, or too short or long to be one (the caller's fault,
    not the database's)."""


class UnknownTokenRef(StoreError):
    """A token reference that matches no issued token."""


class AmbiguousTokenRef(StoreError):
    """A token reference (a prefix) that matches several issued tokens."""


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
        # Only the server's token store can live in PostgreSQL (open_server_store), and it
        # never comes here: this store is one user's file.
        raise StoreError(
            "this store is a SQLite file; give a path (PostgreSQL holds only the server's tokens)"
        )
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
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Never open (and close) a descriptor of a file SQLite may already hold in this
        # process: closing any descriptor of a file drops every POSIX lock the process holds
        # on it, SQLite's included, and another connection's transaction then goes unguarded
        # (two dev ledgers in one process lost invoices that way). chmod goes by path.
        try:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
        except PermissionError:
            log.warning("cannot make %s private (mode 0600): not its owner", path)
    else:
        os.close(fd)  # a new, empty file: nobody holds it yet
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
            db = await cls._connect(path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        store = cls(db, path)
        try:
            await store._setup()
        except BaseException:
            await db.close()
            raise
        return store

    @classmethod
    async def _connect(cls, path: Path) -> aiosqlite.Connection:
        """aiosqlite's connection to `path`, autocommit (we BEGIN ourselves); a seam for a
        subclass that must start aiosqlite's worker thread its own way (lightning/dev.py)."""
        return await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)

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

    async def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        # Under the lock so a read never sees another coroutine's uncommitted transaction.
        return await self._statement(sql, params)

    async def _statement(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """One statement in its own transaction (autocommit), its rows; sqlite3 errors become
        StoreError.

        Under the lock: run while another coroutine is between BEGIN and COMMIT on this
        connection, a write would join that transaction and go if it rolled back. One
        aiosqlite call steps the statement to its end, which commits it: a caller cancelled
        meanwhile cannot leave it half done. A write waits for other processes' write lock
        up to the busy timeout (a lone statement, unlike a deferred transaction, retries
        through SQLite's busy handler), then fails "database is locked".
        """
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


# --- what the two server stores (SQLite, PostgreSQL) share ------------------------------------

SECRET_SIZE = 32
ID_SIZE = 32
MIN_PREFIX_LEN = 8
# `healthy` turns False as soon as a queued record has waited this long, or a flush has been
# under way this long: the engine flushes every 0.25 s, so a database that hangs (accepts and
# never answers) stops the selling within this time, not after a flush's whole timeout.
STALL_SECONDS = 2.0
# revenue(): at most this many buckets in one answer (an hour each over 13 months, a day each
# over 27 years), so that a query string cannot ask for a huge table.
MAX_REVENUE_BUCKETS = 10_000
# The settled tokens a store keeps for the next flush() to return: drained every 0.25 s by the
# engine; the bound only matters for a store nobody drains (the CLI's).
MAX_SETTLED_KEPT = 100_000
# A bundle's size and a draw's amount, at most: both databases keep balances in signed 64-bit
# integers (a bytes bundle of 8 EiB is still one).
MAX_BALANCE = 2**63 - 1


@dataclass(frozen=True)
class IssuedToken:
    token_id: bytes
    payment_hash: bytes
    service: str
    price_sat: int
    created_at: float
    valid_until: float | None
    paid_at: float | None = None
    revoked_at: float | None = None
    # False only for a revocation of a token this store never saw issued (its issuance
    # note was lost); payment_hash, service, price_sat and created_at are then placeholders.
    recorded: bool = True
    # What is left of the token's bundle (TokenStore.draw); None: never drawn from (no bundle,
    # or not used yet).
    balance: int | None = None

    def status(self, now: float | None = None) -> str:
        """revoked | expired | paid | unpaid, as of `now` (default: the current time)."""
        if self.revoked_at is not None:
            return "revoked"
        now = time.time() if now is None else now
        # Expiry wins over paid: the status says whether the token still opens anything;
        # paid_at still tells whether it was ever paid.
        if self.valid_until is not None and self.valid_until <= now:
            return "expired"
        return "paid" if self.paid_at is not None else "unpaid"

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        known = self.recorded
        return {
            "token_id": self.token_id.hex(),
            "payment_hash": self.payment_hash.hex() if known else None,
            "service": self.service if known else None,
            "price_sat": self.price_sat if known else None,
            "created_at": self.created_at if known else None,
            "valid_until": self.valid_until,
            "paid_at": self.paid_at,
            "revoked_at": self.revoked_at,
            "recorded": known,
            "status": self.status(now),
            "balance": self.balance,
        }


@dataclass(frozen=True)
class RevenueRow:
    """What one service sold in one bucket of time: the tokens first seen paid in
    [start, start + bucket) and the sats they were sold for. `start` is epoch seconds, a
    multiple of the bucket's length (hours and days begin on UTC boundaries)."""

    start: float
    service: str
    tokens_sold: int
    sats: int

    def to_json(self) -> dict[str, Any]:
        return {
            "start_at": self.start,
            "service": self.service,
            "tokens_sold": self.tokens_sold,
            "sats": self.sats,
        }


def check_revenue_range(since: float, until: float, bucket_seconds: int) -> None:
    """StoreError (one line) unless [since, until) cut into `bucket_seconds` buckets is a range
    revenue() answers: finite, not before 1970, not empty, at most MAX_REVENUE_BUCKETS."""
    if isinstance(bucket_seconds, bool) or not isinstance(bucket_seconds, int):
        raise StoreError(f"bucket must be a whole number of seconds, got {bucket_seconds!r}")
    if bucket_seconds < 1:
        raise StoreError(f"bucket must be at least 1 second, got {bucket_seconds}")
    for name, value in (("since", since), ("until", until)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise StoreError(f"{name} must be an epoch time in seconds, got {value!r}")
    if until <= since:
        raise StoreError(f"until ({until:g}) must be after since ({since:g})")
    buckets = math.floor(until / bucket_seconds) - math.floor(since / bucket_seconds) + 1
    if buckets > MAX_REVENUE_BUCKETS:
        raise StoreError(
            f"{buckets} buckets of {bucket_seconds} s from since to until: at most "
            f"{MAX_REVENUE_BUCKETS}; ask for a shorter range or longer buckets"
        )


def token_from_row(row: Sequence[Any]) -> IssuedToken:
    """An IssuedToken from (token_id, payment_hash, service, price_sat, created_at,
    valid_until, paid_at, revoked_at[, balance])."""
    return IssuedToken(
        token_id=bytes(row[0]),
        payment_hash=bytes(row[1]),
        service=row[2],
        price_sat=row[3],
        created_at=row[4],
        valid_until=row[5],
        paid_at=row[6],
        revoked_at=row[7],
        balance=None if len(row) < 9 or row[8] is None else int(row[8]),
    )


def prefix_range(prefix: str) -> tuple[bytes, bytes | None]:
    """Hex prefix -> [low, high) bounds on 32-byte ids, so the lookup can use an index.

    Both databases compare blobs (bytea) byte by byte, and a longer one sorts after its own
    prefix, so every id starting with the prefix lies in [low, high). high is None when the
    prefix is all 'f' (no upper bound).
    """
    pad = len(prefix) % 2  # an odd prefix ends mid-byte: extend it with a zero nibble
    size = (len(prefix) + pad) // 2
    value = int(prefix, 16)
    low = (value << (4 * pad)).to_bytes(size, "big")
    if value + 1 >= 16 ** len(prefix):
        return low, None
    return low, ((value + 1) << (4 * pad)).to_bytes(size, "big")


def normalize_ref(ref: str) -> str:
    """A token reference as given (token id, payment hash, or a prefix of either) -> lower-case
    hex; StoreError says what is wrong with it."""
    text = ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]+", text):
        raise BadTokenRef(f"token reference '{ref}' is not hexadecimal")
    if len(text) < MIN_PREFIX_LEN:
        raise BadTokenRef(
            f"token reference '{ref}' is too short: give at least {MIN_PREFIX_LEN} hex "
            "characters of a token id or payment hash"
        )
    if len(text) > 2 * ID_SIZE:
        raise BadTokenRef(f"token reference '{ref}' is longer than a token id (64 hex characters)")
    return text


def revocation_target(ref: str, prefix: str, matches: Sequence[IssuedToken]) -> IssuedToken:
    """The one token `ref` (normalized: `prefix`) names among the issued tokens it matches.

    An unknown full 64-hex ref is taken as a token id anyway, since its issuance record may be
    lost; the result then has recorded=False.
    """
    if len(matches) > 1:
        raise AmbiguousTokenRef(
            f"'{ref}' is ambiguous: it matches {len(matches)} issued tokens; give more characters"
        )
    if matches:
        return matches[0]
    if len(prefix) == 2 * ID_SIZE:
        return IssuedToken(
            token_id=bytes.fromhex(prefix),
            payment_hash=b"",
            service="",
            price_sat=0,
            created_at=0.0,
            valid_until=None,
            recorded=False,
        )
    raise UnknownTokenRef(f"no issued token matches '{ref}'")


def warn_unrecorded(token: IssuedToken, prefix: str) -> None:
    if not token.recorded:
        log.warning(
            "no issued token matches %s; revoked it as a token id anyway "
            "(if it is a payment hash, this has no effect)",
            prefix,
        )


def check_id(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != ID_SIZE:
        raise ValueError(f"{name} must be {ID_SIZE} bytes")


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_BALANCE:
        raise ValueError(
            f"{name} must be a whole number from {low} to {MAX_BALANCE}, got {value!r}"
        )


def check_draw(token_id: bytes, size: int, amount: int) -> None:
    """ValueError unless draw()/charge() can take these: checked before the database is asked,
    so that a caller's bug is never a database error (nor a 64-bit overflow in one: with both
    within [0, MAX_BALANCE], size - amount and balance - amount cannot overflow)."""
    check_id("token_id", token_id)
    _check_count("size", size, 1)
    _check_count("amount", amount, 0)


def start_from(cursor: int, top: int, shown: str) -> int:
    """Where to read revocations from, given the caller's cursor and the largest sequence
    number in the store: the cursor, or 0 when the store is behind it.

    Behind means the database went back in time (restored from a backup, a failover to a
    replica that lagged): sequence numbers after `top` will be handed out again, and past
    the cursor, revocations made from now on would never be read. Reading everything again
    costs one larger read and re-announces nothing (the caller keeps a set).
    """
    if top >= cursor:
        return cursor
    log.warning(
        "store %s: its latest revocation (%d) is older than this instance's cursor (%d); "
        "restored from a backup, or a lagging replica? Reading every revocation again",
        shown,
        top,
        cursor,
    )
    return 0


# --- private podcast feeds ------------------------------------------------------------------

# A listener's private feed URL is `<scheme>://<host>/.l402/feed/<capability><feed path>`. The
# capability stands for the listener's credential (the engine judges a request through it as if
# it carried `Authorization: L402 <credential>`), so it is a bearer secret as hard to guess as
# a 128-bit key; unlike the credential it is meant to be handed out, listed and rotated.
FEED_PATH_PREFIX = "/.l402/feed/"
FEED_CAPABILITY_BYTES = 16
FEED_CAPABILITY_CHARS = 22  # base64url of 16 bytes, without padding
_CAPABILITY = re.compile(f"[A-Za-z0-9_-]{{{FEED_CAPABILITY_CHARS}}}")
# What feed_for stores is checked first, so that a caller's bug is a ValueError and never a
# database error: PostgreSQL's constraint messages quote the failing row, credential included.
# A credential is what follows "L402 " in an Authorization value: printable ASCII (", " may
# separate macaroons), at most MAX_CREDENTIAL_SIZE bytes like any the engine accepts.
_CREDENTIAL = re.compile(r"[\x20-\x7e]+")
MAX_FEED_CHARS = 2048
MAX_SERVICE_CHARS = 256


def new_feed_capability() -> str:
    """A new capability: 22 URL-safe characters (128 random bits), never starting with '-'
    (given to `l402proxy feeds revoke|rotate`, such a one would be taken for an option). The
    draws refused cost a fiftieth of a bit; the loop ends at once 63 times in 64."""
    while True:
        capability = secrets.token_urlsafe(FEED_CAPABILITY_BYTES)
        if not capability.startswith("-"):
            return capability


def is_feed_capability(text: str) -> bool:
    """Whether `text` has a capability's shape (22 URL-safe characters), known or not."""
    return isinstance(text, str) and _CAPABILITY.fullmatch(text) is not None


def feed_path(capability: str, feed: str) -> str:
    """The private feed's path: `/.l402/feed/<capability><feed>` (feed starts with '/')."""
    return f"{FEED_PATH_PREFIX}{capability}{feed}"


@dataclass(frozen=True)
class FeedAccess:
    """A listener's private feed: `capability` opens `feed` (and the paid grants of the token)
    with the token's stored credential. One active access per (token, feed, credential) at a
    time (keyed by the credential's SHA-256: a narrowed copy of a token never gets the whole
    token's capability, nor the other way round):
    revoking or rotating sets revoked_at, and the row stays (feed_access() still finds it)."""

    capability: str
    token_id: bytes
    service: str
    feed: str
    # `<macaroon b64>:<preimage hex>`: a bearer secret, never printed, logged or put in JSON.
    credential: str = field(repr=False)
    valid_until: float | None
    created_at: float
    revoked_at: float | None = None

    @property
    def path(self) -> str:
        return feed_path(self.capability, self.feed)

    def status(self, now: float | None = None) -> str:
        """active | revoked | expired, as of `now` (default: the current time). Revoked wins:
        it is what an operator did; expired is the token's own end (valid_until)."""
        if self.revoked_at is not None:
            return "revoked"
        now = time.time() if now is None else now
        if self.valid_until is not None and self.valid_until <= now:
            return "expired"
        return "active"

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """Everything but the credential."""
        return {
            "capability": self.capability,
            "token_id": self.token_id.hex(),
            "service": self.service,
            "feed": self.feed,
            "path": self.path,
            "valid_until": self.valid_until,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
            "status": self.status(now),
        }


def feed_from_row(row: Sequence[Any]) -> FeedAccess:
    """A FeedAccess from (capability, token_id, service, feed, credential, valid_until,
    created_at, revoked_at)."""
    return FeedAccess(
        capability=row[0],
        token_id=bytes(row[1]),
        service=row[2],
        feed=row[3],
        credential=row[4],
        valid_until=row[5],
        created_at=row[6],
        revoked_at=row[7],
    )


def _check_text(name: str, value: object, limit: int) -> None:
    # No NUL or other control character (PostgreSQL's text refuses NUL), no lone surrogate
    # (neither database can store it): either would fail in the database, not here.
    if (
        not isinstance(value, str)
        or not value
        or len(value) > limit
        or any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value)
    ):
        raise ValueError(f"{name} must be a non-empty string of at most {limit} characters")


def _check_time(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be an epoch time in seconds")


def check_feed_for(
    token_id: bytes,
    service: str,
    feed: str,
    credential: str,
    valid_until: float | None,
    when: float,
) -> None:
    """ValueError unless feed_for() can store these (messages never quote the credential)."""
    check_id("token_id", token_id)
    _check_text("service", service, MAX_SERVICE_CHARS)
    _check_text("feed", feed, MAX_FEED_CHARS)
    if not feed.startswith("/"):
        raise ValueError("feed must be a path starting with '/'")
    if (
        not isinstance(credential, str)
        or len(credential) > MAX_CREDENTIAL_SIZE
        or _CREDENTIAL.fullmatch(credential) is None
        or credential != credential.strip()
    ):
        raise ValueError(
            f"credential must be printable ASCII of at most {MAX_CREDENTIAL_SIZE} characters, "
            "without leading or trailing spaces"
        )
    if valid_until is not None:
        _check_time("valid_until", valid_until)
    _check_time("when", when)


@dataclass(frozen=True)
class FeedRef:
    """What a `feeds revoke|rotate` reference names: one capability, or every active access of
    the token a token id prefix names (lower-case hex), or either when the text could be both
    (22 hex characters): the capability is looked up first."""

    shown: str  # the reference as messages quote it
    capability: str | None
    prefix: str | None


def parse_feed_ref(ref: str) -> FeedRef:
    """A feed reference as given -> FeedRef; BadTokenRef (as revoke()'s token references) says
    what is wrong with it."""
    text = ref.strip() if isinstance(ref, str) else ""
    # Quoted in one-line messages: a reference that would break the line is not repeated.
    shown = text if text.isprintable() and len(text) <= 100 else "the reference given"
    capability = text if is_feed_capability(text) else None
    if re.fullmatch(r"[0-9a-fA-F]+", text):
        if len(text) < MIN_PREFIX_LEN:
            raise BadTokenRef(
                f"feed reference '{shown}' is too short: give a capability "
                f"({FEED_CAPABILITY_CHARS} characters) or at least {MIN_PREFIX_LEN} hex "
                "characters of a token id"
            )
        if len(text) > 2 * ID_SIZE:
            raise BadTokenRef(
                f"feed reference '{shown}' is longer than a token id (64 hex characters)"
            )
        return FeedRef(shown, capability, text.lower())
    if capability is None:
        raise BadTokenRef(
            f"feed reference '{shown}' is neither a capability ({FEED_CAPABILITY_CHARS} "
            f"URL-safe characters) nor a token id in hex (at least {MIN_PREFIX_LEN} characters)"
        )
    return FeedRef(shown, capability, None)


def feed_token_target(ref: FeedRef, token_ids: Sequence[bytes]) -> bytes:
    """The one token the prefix of `ref` names, among the distinct tokens with a feed access
    (revoked ones included) that it matches."""
    if len(token_ids) > 1:
        raise AmbiguousTokenRef(
            f"'{ref.shown}' is ambiguous: it matches {len(token_ids)} tokens with feed "
            "accesses; give more characters"
        )
    if not token_ids:
        raise unknown_feed_ref(ref)
    return token_ids[0]


def unknown_feed_ref(ref: FeedRef) -> UnknownTokenRef:
    return UnknownTokenRef(f"no feed access matches '{ref.shown}'")


# A run of characters a credential is made of (base64 either way, ':', hex), long enough not to
# be found in a secret by chance.
_SECRET_RUN = re.compile(r"[A-Za-z0-9+/=_:-]{8,}")


@contextmanager
def hiding(secrets_: Sequence[str]) -> Iterator[None]:
    """A StoreError raised inside says `***` for every part of its text that is a piece of one
    of `secrets_` (read when it is raised: a caller may add the credentials it reads
    meanwhile). Such text comes only from a database's own message: PostgreSQL's DETAIL quotes
    a failing row, each long value cut to its first 64 characters and "...". check_feed_for
    leaves the constraints nothing to refuse: belt and braces."""
    try:
        yield
    except StoreError as exc:
        text = str(exc)
        pieces = [s for s in secrets_ if s]

        def masked(run: re.Match[str]) -> str:
            return "***" if any(run.group() in secret for secret in pieces) else run.group()

        shown = _SECRET_RUN.sub(masked, text) if pieces else text
        if shown == text:
            raise
        raise type(exc)(shown) from None


# --- Payment-scheme charges (consume_charge, prune_charges) -----------------------------------

# A paid charge (l402/payment.py, check_credential) opens one request, once, globally: the
# stores keep one row per payment hash consumed until its challenge has expired. Rows are
# pruned at most CHARGE_PRUNE_LIMIT at a time (a statement that never runs long, whatever
# piled up), every CHARGE_PRUNE_SECONDS from flush(), again at the next flush while a prune
# finds a full batch (0.25 s apart: 4000 rows a second, more than any instance sells).
CHARGE_PRUNE_LIMIT = 1000
CHARGE_PRUNE_SECONDS = 60.0
# A row is pruned only this long after its challenge expired. The engine refuses an expired
# challenge before asking the store, but by its own clock: an instance whose clock is behind
# the pruning one's may still take a challenge the other thinks expired, and must then still
# find its row. So instances' clocks must agree to within this (NTP does far better).
CHARGE_EXPIRY_MARGIN = 300.0
# A challenge id is ours (HMAC-bound: 43 base64url characters); the bound only keeps a
# caller's bug from writing a large row.
MAX_CHALLENGE_ID_CHARS = 256


def check_consume_charge(
    payment_hash: bytes, challenge_id: str, service: str, expires_at: float, when: float
) -> None:
    """ValueError unless consume_charge() can store these: checked before the database is
    asked, so that a caller's bug is never a database error."""
    check_id("payment_hash", payment_hash)
    _check_text("challenge_id", challenge_id, MAX_CHALLENGE_ID_CHARS)
    _check_text("service", service, MAX_SERVICE_CHARS)
    _check_time("expires_at", expires_at)
    _check_time("when", when)


def check_prune_charges(now: float, limit: int) -> None:
    """ValueError unless prune_charges() can take these."""
    _check_time("now", now)
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int)
        or not 1 <= limit <= CHARGE_PRUNE_LIMIT
    ):
        raise ValueError(
            f"limit must be a whole number from 1 to {CHARGE_PRUNE_LIMIT}, got {limit!r}"
        )


class ChargePruning(ABC):
    """flush()'s share of pruning consumed charges: `_prune_when_due()` runs the store's
    `prune_charges` every `prune_seconds`, or at once again after one that found a full batch.
    A failure is logged (once, until a prune works again) and never fails the flush: rows
    left behind only take room, and the flush's own records were written."""

    # Class attributes so that tests (and only tests) can shorten them.
    prune_seconds = CHARGE_PRUNE_SECONDS
    prune_limit = CHARGE_PRUNE_LIMIT

    shown: str

    def _init_pruning(self) -> None:
        # The first prune one period after opening: what an earlier run left can wait as long.
        self._next_prune = time.monotonic() + self.prune_seconds
        self._prune_failing = False

    @abstractmethod
    async def prune_charges(self, now: float, limit: int = CHARGE_PRUNE_LIMIT) -> int:
        """Delete at most `limit` consumed charges whose challenge expired more than
        CHARGE_EXPIRY_MARGIN before `now`, oldest first; how many went."""

    async def _prune_when_due(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self.prune_seconds
        try:
            deleted = await self.prune_charges(time.time(), self.prune_limit)
        except StoreError as exc:
            if not self._prune_failing:
                log.warning("store %s: pruning expired charges failed: %s", self.shown, exc)
                self._prune_failing = True
            return
        if self._prune_failing:
            log.info("store %s: pruning expired charges works again", self.shown)
            self._prune_failing = False
        if deleted >= self.prune_limit:
            self._next_prune = time.monotonic()  # more may be left: again at the next flush


@dataclass
class Batch:
    """Queued records taken by one flush, and when the oldest of them was queued."""

    issued: list[IssuedToken] = field(default_factory=list)
    paid: list[tuple[bytes, float]] = field(default_factory=list)
    queued_at: float | None = None


class RecordQueue(ABC):
    """The server stores' write-behind queue: the 402 path and the paid path only append here
    (never waiting on the database); `flush()` writes a batch and puts it back on failure.

    Subclasses set `shown` (the store as messages name it), implement `_check_open()` and call
    `_take_batch`, `_give_back` and `_flushing` from their flush.
    """

    # Records queued and not yet written, at most, of each kind. Every 402 queues one (anyone
    # can ask for 402s), and a failing store keeps its batches for the next try, so without a
    # bound a stranger could grow this while the database is unwritable. A flush every 0.25 s
    # never comes near it; when it is reached the oldest records go (see _trim).
    max_pending = 100_000
    # A class attribute so that tests (and only tests) can shorten it.
    stall_seconds = STALL_SECONDS

    shown: str

    def __init__(self) -> None:
        self._pending_issued: list[IssuedToken] = []
        self._pending_paid: list[tuple[bytes, float]] = []
        self.dropped = 0  # records dropped at the bound since the store was opened
        self._healthy = True
        # time.monotonic() when the oldest record still queued was queued (None: none is).
        self._queued_at: float | None = None
        # When each flush now under way began (a SQLite store may run two at once).
        self._flights: list[float] = []
        # Tokens a write of the queue was first to mark paid, kept until flush() returns them
        # (list_tokens, revoke and revenue write the queue too, and must not swallow them).
        self._settled: list[IssuedToken] = []

    @abstractmethod
    def _check_open(self) -> None:
        """StoreError if the store is closed."""

    def note_issued(self, token: IssuedToken) -> None:
        """Queue a record of an issued token; `flush()` writes it. Never waits."""
        self._check_open()
        # Reject bad records now: one queued record failing a constraint would block every
        # later flush, since failed batches are kept for the next try.
        check_id("token_id", token.token_id)
        check_id("payment_hash", token.payment_hash)
        if token.price_sat < 0:
            raise ValueError("price_sat must be >= 0")
        if len(self._pending_issued) >= self.max_pending:
            self._trim(self._pending_issued, "issued-token")
        self._pending_issued.append(token)
        self._queued()

    def note_paid(self, token_id: bytes, when: float) -> None:
        """Queue "first seen paid at `when`"; `flush()` writes it. Never waits."""
        self._check_open()
        check_id("token_id", token_id)
        if len(self._pending_paid) >= self.max_pending:
            self._trim(self._pending_paid, "paid-token")
        self._pending_paid.append((token_id, when))
        self._queued()

    def _queued(self) -> None:
        if self._queued_at is None:
            self._queued_at = time.monotonic()

    def _trim(self, pending: list[Any], what: str) -> None:
        """Drop the oldest tenth of a full queue (at least one record), in one slice so that
        a queue held at its bound costs O(1) per note.

        Losing an issuance record loses a row of `tokens list` and revoking by payment hash
        (revoking by token id still works); losing a paid note loses paid_at. Tokens still
        verify: verifying never reads the store.
        """
        count = max(1, len(pending) - self.max_pending + 1, self.max_pending // 10)
        del pending[:count]
        self.dropped += count
        log.warning(
            "store %s: not written for a while; dropped the %d oldest queued %s records "
            "(%d dropped since start)",
            self.shown,
            count,
            what,
            self.dropped,
        )

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._pending_issued) + len(self._pending_paid)

    @property
    def healthy(self) -> bool:
        """False from a failed `flush()` until one succeeds (PostgreSQL: also as soon as its
        notification connection is lost), and while a queued record has waited, or a flush
        has been under way, longer than `stall_seconds` (a database that hangs fails no
        flush for a whole timeout). While False, records still queue (bounded) and nothing
        queued is lost; `flush()` with nothing queued then checks the database, so calling
        it periodically is what brings this back to True."""
        if not self._healthy:
            return False
        since = [*self._flights] if self._queued_at is None else [*self._flights, self._queued_at]
        return not since or time.monotonic() - min(since) <= self.stall_seconds

    def _take_batch(self) -> Batch:
        # Take the batch first: notes queued while a flush awaits go into the next one.
        batch = Batch(self._pending_issued, self._pending_paid, self._queued_at)
        self._pending_issued, self._pending_paid, self._queued_at = [], [], None
        return batch

    def _give_back(self, batch: Batch) -> None:
        """Put a batch that could not be written back in front of newer notes."""
        self._pending_issued[:0] = batch.issued
        self._pending_paid[:0] = batch.paid
        if batch.queued_at is not None:
            self._queued_at = min(batch.queued_at, self._queued_at or batch.queued_at)
        # Kept for the next try, within the bound like everything queued.
        if len(self._pending_issued) > self.max_pending:
            self._trim(self._pending_issued, "issued-token")
        if len(self._pending_paid) > self.max_pending:
            self._trim(self._pending_paid, "paid-token")

    @contextmanager
    def _flushing(self) -> Iterator[None]:
        """Around each flush's database work: `healthy` watches how long it takes."""
        started = time.monotonic()
        self._flights.append(started)
        try:
            yield
        finally:
            self._flights.remove(started)

    def _set_healthy(self, ok: bool) -> None:
        self._healthy = ok

    def _keep_settled(self, tokens: Sequence[IssuedToken]) -> None:
        """Keep what a write first marked paid for the next flush() to return."""
        self._settled.extend(tokens)
        if len(self._settled) > MAX_SETTLED_KEPT:
            del self._settled[: len(self._settled) - MAX_SETTLED_KEPT]

    def _take_settled(self) -> list[IssuedToken]:
        settled, self._settled = self._settled, []
        return settled


class TokenStore(Protocol):
    """What the engine, the admin API and the CLI use of a server store: `open_server_store(uri)`
    returns one (store/sqlite.py's ServerStore or store/postgres.py's PostgresServerStore).

    Every method that reaches the database raises StoreError (one line, no password) when it
    cannot; note_issued/note_paid never wait and raise only ValueError for a malformed record
    (or StoreError once closed).

    A token is paid once its issuance record and a paid sighting (note_paid) are both written,
    whichever comes first and whichever instance writes them. `flush()` writes the queue and
    returns the tokens this store was the FIRST to make paid (since the last flush(): writes
    that list_tokens, revoke and revenue make are included), so that each sale is counted
    once across every instance sharing the database. A batch whose commit succeeded but whose
    answer was lost is retried and then counts nothing: a sale may go uncounted, never twice.

    `revenue(since, until, bucket_seconds, service)`: the paid tokens whose paid_at (first
    sighting) is in [since, until), per service and per bucket of `bucket_seconds` starting
    at a multiple of it since the epoch, oldest first; StoreError for a bad range or more than
    MAX_REVENUE_BUCKETS buckets (check_revenue_range). Revoked tokens count: they were sold.

    Balances (bundles: a token good for `size` requests, bytes or units) are money: they live
    in the database, never only in memory, and each call below is ONE statement in its own
    transaction, awaited on the request path (never queued like note_issued), exactly once
    across every instance and process sharing the database:
    - `draw(token_id, size, amount)`: a token with no balance yet starts at `size`; when its
      balance is 0, nothing is drawn and None is returned (the token is spent); otherwise the
      balance becomes max(balance - amount, 0) and that is returned (amount 0 only asks).
    - `charge(token_id, size, amount)`: usage known after the fact (bytes streamed, units
      reported): always subtracts, never below 0; returns what is left.
    - `balance_of(token_id)`: what is left; None when the token was never drawn from.
    size (>= 1) and amount (>= 0) are whole numbers up to MAX_BALANCE, token_id 32 bytes, else
    ValueError (check_draw). A database that cannot be reached, or does not answer within the
    store's bound (SQLite: its busy timeout; PostgreSQL: BALANCE_TIMEOUT), raises StoreError:
    the caller must then fail closed. A draw whose answer is lost (a timeout after the commit,
    a cancelled caller) may have been made: the buyer may lose a request, the seller never
    gives one away. `list_tokens` and `revoke` return each token's balance too.

    Private podcast feeds (FeedAccess): a capability standing for a paid token's credential,
    written at once like the balances, never queued.
    - `feed_for(token_id, service, feed, credential, valid_until, when)`: the active access of
      that token, feed and credential if there is one (returned as it is: its service and
      valid_until are the first caller's, and it may be expired), else a new one made `when`.
      Atomic across instances and processes: a unique index on the active (token, feed,
      credential digest) triples,
      an insert that does nothing on conflict, then a read of the active row; everyone asking
      at once gets the same capability. Arguments are checked first (ValueError, check_feed_for).
    - `feed_access(capability)`: that access, revoked or expired ones too; None when there is
      none (a string that is no capability is not looked up).
    - `list_feeds(include_inactive=False, limit=1000)`: newest first; the active ones only
      (neither revoked nor expired), or every one.
    - `revoke_feeds(ref, when)`: ref is a capability (that access) or a token id prefix of at
      least MIN_PREFIX_LEN hex characters (every active access of the one token with feed
      accesses it matches); BadTokenRef, UnknownTokenRef, AmbiguousTokenRef as for revoke().
      Returns the accesses it revoked: [] when they were revoked already.
    - `rotate_feeds(ref, when)`: the active accesses `ref` names (as for revoke_feeds) are
      revoked and each replaced by a new one (new capability; same token, service, feed,
      credential and valid_until; made `when`), all in one transaction; returns the new ones
      ([] when nothing named was active).
    PostgreSQL bounds feed_for and feed_access (the request path) by FEED_TIMEOUT, the others
    like any operation. The credential never appears in repr(), to_json() or a message.

    Payment-scheme charges (l402/payment.py): a paid charge opens one request, once, globally.
    - `consume_charge(payment_hash, challenge_id, service, expires_at, when)`: True exactly
      once per payment hash (32 bytes), across every instance and process sharing the
      database, concurrent calls included (one insert-or-nothing statement against the primary
      key, written at once like the balances); False for every later or concurrent duplicate,
      whatever its challenge id. `expires_at` is the challenge's expiry: the row is kept at
      least CHARGE_EXPIRY_MARGIN past it. StoreError when the database cannot say (the engine
      answers 503: fail closed); a consume whose answer was lost (a timeout after the commit)
      may have been made, and a consumed charge stays consumed even if delivery then fails.
      Arguments are checked first (ValueError, check_consume_charge). PostgreSQL bounds it by
      CHARGE_TIMEOUT (the request path).
    - `prune_charges(now, limit=CHARGE_PRUNE_LIMIT)`: deletes at most `limit` (1 to
      CHARGE_PRUNE_LIMIT) rows whose expires_at is more than CHARGE_EXPIRY_MARGIN before
      `now`, oldest first, and returns how many went. flush() runs it by itself every
      CHARGE_PRUNE_SECONDS (sooner while there is a backlog; a failure is logged, never
      raised by flush()).
    """

    max_pending: int
    stall_seconds: float
    dropped: int

    @property
    def pending(self) -> int: ...
    @property
    def healthy(self) -> bool: ...
    async def secret(self) -> bytes: ...
    def note_issued(self, token: IssuedToken) -> None: ...
    def note_paid(self, token_id: bytes, when: float) -> None: ...
    async def flush(self) -> list[IssuedToken]: ...
    async def revoke(self, ref: str, when: float) -> list[IssuedToken]: ...
    async def revocations_since(self, cursor: int) -> tuple[int, set[bytes]]: ...
    async def wait_for_revocations(self, timeout: float) -> None: ...
    async def list_tokens(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[IssuedToken]: ...
    async def revenue(
        self, since: float, until: float, bucket_seconds: int, service: str | None = None
    ) -> list[RevenueRow]: ...
    async def draw(self, token_id: bytes, size: int, amount: int) -> int | None: ...
    async def charge(self, token_id: bytes, size: int, amount: int) -> int: ...
    async def balance_of(self, token_id: bytes) -> int | None: ...
    async def feed_for(
        self,
        token_id: bytes,
        service: str,
        feed: str,
        credential: str,
        valid_until: float | None,
        when: float,
    ) -> FeedAccess: ...
    async def feed_access(self, capability: str) -> FeedAccess | None: ...
    async def list_feeds(
        self, *, include_inactive: bool = False, limit: int = 1000
    ) -> list[FeedAccess]: ...
    async def revoke_feeds(self, ref: str, when: float) -> list[FeedAccess]: ...
    async def rotate_feeds(self, ref: str, when: float) -> list[FeedAccess]: ...
    async def consume_charge(
        self, payment_hash: bytes, challenge_id: str, service: str, expires_at: float, when: float
    ) -> bool: ...
    async def prune_charges(self, now: float, limit: int = CHARGE_PRUNE_LIMIT) -> int: ...
    async def close(self) -> None: ...
