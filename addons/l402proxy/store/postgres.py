"""The server's PostgreSQL store: the records of store/sqlite.py (root secret, issued tokens,
payments seen, revocations), shared by every instance (any door) and the CLI that use one
database, so that a token bought at one instance works at all of them.

- `l402_store=postgresql://user:password@host:port/database` (or postgres://); asyncpg, a small
  pool. Every connection attempt is bounded by `connect_timeout` (the URI's ?connect_timeout=
  or CONNECT_TIMEOUT) and every operation, waiting for a connection included, by
  OPERATION_TIMEOUT: a dead or silent database raises StoreError, it never hangs a caller. No
  message or log line shows the password (URIs are shown redacted, errors are scrubbed).
- Verifying a paid request never reads the database (as with SQLite): the 402 and paid paths
  only queue records in memory (RecordQueue: bounded, same trim rules) and `flush()` writes
  them. A failing flush keeps its batch and clears `healthy`; the next one that works (or, with
  nothing queued, a probe) sets it again. What a flush wrote is committed: nothing is lost.
- Schema: versioned migrations like the SQLite ones, the version in `l402_schema_version`.
  Instances starting together serialize on an advisory lock, so each step runs once; a database
  from a newer l402proxy is refused, untouched. The secret is inserted once (ON CONFLICT DO
  NOTHING) and read back, so every instance gets the same one.
- Revocations: `revoke()` inserts and NOTIFYs in one transaction. One connection per store
  LISTENs (opened by the first `wait_for_revocations()`, so the CLI never opens it) and wakes
  the waiter on each notification. It reconnects by itself, and each (re)connection wakes the
  waiter too: notifications sent while it was away are lost, so the waiter catches up with
  `revocations_since()`, whose cursor never skips a revocation (see revoke()).
"""

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import asyncpg

from l402proxy.lightning.uri import redact
from l402proxy.store.database import (
    SECRET_SIZE,
    IssuedToken,
    RecordQueue,
    StoreError,
    normalize_ref,
    prefix_range,
    revocation_target,
    token_from_row,
    warn_unrecorded,
)

log = logging.getLogger("l402proxy.store")

SCHEMES = ("postgres", "postgresql")

CONNECT_TIMEOUT = 5.0
MAX_CONNECT_TIMEOUT = 300.0
# One operation: waiting for a pooled connection (connecting, if need be) and its statements.
OPERATION_TIMEOUT = 10.0
# Migrations may rewrite tables, and may wait for another instance's.
MIGRATION_TIMEOUT = 120.0
POOL_SIZE = 4
# How often the listening connection is asked something: an idle connection whose peer vanished
# without closing it (a dead host, a dropped network) otherwise looks alive for ever.
KEEPALIVE_SECONDS = 5.0
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0

CHANNEL = "l402proxy_revocations"
# pg_advisory_xact_lock keys ("L402MIGR", "L402RVKE"): one for migrating, one for revoking.
MIGRATION_LOCK = 0x4C3430324D494752
REVOKE_LOCK = 0x4C34303252564B45

SERVER_SETTINGS = {"application_name": "l402proxy"}

# What a database that is down, unreachable, misconfigured or refusing says through asyncpg.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
    ValueError,
)

VERSION_TABLE = """
    CREATE TABLE l402_schema_version (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        version integer NOT NULL
    )
"""

# Schema history, as for SQLite: entry i brings the database from version i to i + 1, in one
# transaction together with the version bump. Never edit a released entry: append a new one.
# Names start with l402_ so the tables can share a database (and its public schema) with others.
MIGRATIONS: list[Sequence[str]] = [
    (
        """
        CREATE TABLE l402_meta (
            key text PRIMARY KEY,
            value bytea NOT NULL
        )
        """,
        # row_id: insertion order, the tie-break of `tokens list` (SQLite's rowid).
        """
        CREATE TABLE l402_issued_tokens (
            token_id bytea PRIMARY KEY CHECK (length(token_id) = 32),
            payment_hash bytea NOT NULL CHECK (length(payment_hash) = 32),
            service text NOT NULL,
            price_sat bigint NOT NULL CHECK (price_sat >= 0),
            created_at double precision NOT NULL,
            valid_until double precision,
            paid_at double precision,
            row_id bigint GENERATED ALWAYS AS IDENTITY
        )
        """,
        "CREATE INDEX l402_issued_tokens_payment_hash ON l402_issued_tokens (payment_hash)",
        "CREATE INDEX l402_issued_tokens_created ON l402_issued_tokens (created_at, row_id)",
        "CREATE INDEX l402_issued_tokens_service_created"
        " ON l402_issued_tokens (service, created_at, row_id)",
        # seq is never reused, so a cursor never skips a revocation; no foreign key to
        # l402_issued_tokens on purpose: a token whose issuance record was lost must still be
        # revocable.
        """
        CREATE TABLE l402_revocations (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            token_id bytea NOT NULL UNIQUE CHECK (length(token_id) = 32),
            revoked_at double precision NOT NULL
        )
        """,
    ),
]

_TOKEN_SELECT = (
    "SELECT i.token_id, i.payment_hash, i.service, i.price_sat, i.created_at, i.valid_until,"
    " i.paid_at, r.revoked_at FROM l402_issued_tokens i"
    " LEFT JOIN l402_revocations r ON r.token_id = i.token_id"
)


@dataclass(frozen=True)
class Target:
    """A `l402_store` PostgreSQL URI, taken apart: what asyncpg gets, what messages show."""

    dsn: str = field(repr=False)  # holds the password: never printed
    shown: str
    secrets: tuple[str, ...] = field(repr=False)
    connect_timeout: float

    def scrub(self, text: str) -> str:
        """One line, without the password (asyncpg's messages do not quote it, but a
        misplaced one could land anywhere: in the user name, a host, a parameter)."""
        line = " ".join(text.split())
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line

    def failure(self, exc: BaseException, timeout: float) -> StoreError:
        if isinstance(exc, TimeoutError):
            return StoreError(f"store {self.shown}: no answer within {timeout:g} s")
        text = self.scrub(str(exc)) or type(exc).__name__
        if isinstance(exc, OSError):  # refused, reset, no route, unknown host name
            text = f"database unreachable: {text}"
        return StoreError(f"store {self.shown}: {text}")


def parse_uri(uri: str, default_connect_timeout: float = CONNECT_TIMEOUT) -> Target:
    """A PostgreSQL `l402_store` URI -> Target; StoreError (one line, no password) if unusable.

    ?connect_timeout=<seconds> (as libpq spells it) bounds each connection attempt; every
    other parameter goes to asyncpg as given (sslmode=..., or server settings).
    """
    text = uri.strip()
    shown = redact(text)
    if "///" in text.split("?", 1)[0] and ":///" not in shown:
        shown = shown.replace(":/", ":///", 1)  # no host (local socket): keep it recognizable
    try:
        parts = urlsplit(text)
        password = parts.password
        hosts = parts.netloc.rpartition("@")[2]
        if "," not in hosts:
            _ = parts.port  # ValueError for a port that is no port
    except ValueError:
        raise StoreError(f"store URI {shown}: malformed host or port") from None
    # asyncpg also takes the password (and a TLS key's) as query parameters.
    given = [password or ""] + [
        value
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name in ("password", "sslpassword")
    ]
    # Both spellings (as written, percent-decoded); the longer first, so that replacing the
    # shorter cannot leave part of the longer behind.
    forms = {form for value in given for form in (value, unquote(value)) if form}
    secrets = tuple(sorted(forms, key=len, reverse=True))
    if parts.scheme.lower() not in SCHEMES:
        raise StoreError(f"store URI {shown}: not a postgresql:// URI")
    if not parts.path.strip("/"):
        raise StoreError(
            f"store URI {shown}: no database name (postgresql://user:password@host/database)"
        )
    kept: list[str] = []
    timeouts: list[str] = []
    for item in parts.query.split("&") if parts.query else []:
        pairs = parse_qsl(item, keep_blank_values=True)
        if pairs and pairs[0][0] == "connect_timeout":
            timeouts.append(pairs[0][1])
        else:
            kept.append(item)
    connect_timeout = default_connect_timeout
    if len(timeouts) > 1:
        raise StoreError(f"store URI {shown}: connect_timeout given twice")
    if timeouts:
        try:
            connect_timeout = float(timeouts[0])
        except ValueError:
            connect_timeout = -1.0
        if not 0 < connect_timeout <= MAX_CONNECT_TIMEOUT:
            raise StoreError(
                f"store URI {shown}: connect_timeout must be a number of seconds above 0 "
                f"and at most {MAX_CONNECT_TIMEOUT:g}"
            )
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, "&".join(kept), ""))
    return Target(dsn=dsn, shown=shown, secrets=secrets, connect_timeout=connect_timeout)


class PostgresServerStore(RecordQueue):
    """The server store on PostgreSQL; see the module docstring. Same interface as
    store/sqlite.py's ServerStore (database.TokenStore); open with `open_server_store(uri)`."""

    # Class attributes so that tests (and only tests) can shorten them.
    operation_timeout = OPERATION_TIMEOUT
    migration_timeout = MIGRATION_TIMEOUT
    keepalive_seconds = KEEPALIVE_SECONDS

    def __init__(self, pool: asyncpg.Pool, target: Target) -> None:
        RecordQueue.__init__(self)
        self._pool: asyncpg.Pool | None = pool
        self.target = target
        self.shown = target.shown
        self._secret: bytes | None = None
        # Flushes in order: a paid note must not overtake the issuance record it updates.
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self.listening = False  # the LISTEN connection is up (for tests and diagnostics)

    def migrations(self) -> Sequence[Sequence[str]]:
        return MIGRATIONS  # looked up per call, so tests can extend the history

    @classmethod
    async def open(cls, uri: str) -> Self:
        target = parse_uri(uri)
        try:
            async with asyncio.timeout(target.connect_timeout):
                # min_size=0: connections are made when needed. A floor would have the pool
                # reconnect by itself while the database is down, logging a traceback a time.
                pool = await asyncpg.create_pool(
                    target.dsn,
                    min_size=0,
                    max_size=POOL_SIZE,
                    timeout=target.connect_timeout,
                    command_timeout=cls.operation_timeout,
                    server_settings=SERVER_SETTINGS,
                )
        except DATABASE_ERRORS as exc:
            raise target.failure(exc, target.connect_timeout) from None
        store = cls(pool, target)
        try:
            await store._setup()
        except BaseException:
            pool.terminate()
            raise
        log.info("server store: %s (PostgreSQL)", target.shown)
        return store

    def _check_open(self) -> None:
        self._live()

    def _live(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("store is closed")
        return self._pool

    @asynccontextmanager
    async def _connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """A pooled connection; the whole `async with` body is bounded by `timeout` (default
        OPERATION_TIMEOUT), and what the database says goes out as StoreError."""
        limit = self.operation_timeout if timeout is None else timeout
        pool = self._live()
        connected = False
        try:
            async with asyncio.timeout(limit), pool.acquire() as conn:
                connected = True
                yield conn
        except StoreError:
            raise
        except DATABASE_ERRORS as exc:
            # Not connected yet: the pool was connecting, bounded by connect_timeout.
            waited = limit if connected else min(limit, self.target.connect_timeout)
            raise self.target.failure(exc, waited) from None

    @asynccontextmanager
    async def _transaction(self, timeout: float | None = None) -> AsyncIterator[Any]:
        async with self._connection(timeout) as conn, conn.transaction():
            yield conn

    # -- schema ------------------------------------------------------------------------------

    async def _setup(self) -> None:
        # Read the version before anything writes, so a newer database is left untouched.
        async with self._connection(self.migration_timeout) as conn:
            version = await self._schema_version(conn)
        self._check_version(version)
        if version < len(self.migrations()):
            await self._migrate()

    @staticmethod
    async def _schema_version(conn: Any) -> int:
        if not await conn.fetchval("SELECT to_regclass('l402_schema_version') IS NOT NULL"):
            return 0
        version = await conn.fetchval("SELECT version FROM l402_schema_version")
        return int(version or 0)

    def _check_version(self, version: int) -> None:
        known = len(self.migrations())
        if version > known:
            raise StoreError(
                f"store {self.shown} has schema version {version}, newer than this l402proxy "
                f"knows ({known}); upgrade l402proxy or use another database"
            )

    async def _migrate(self) -> None:
        async with self._connection(self.migration_timeout) as conn:
            # Instances starting together take turns here; who comes second re-reads the
            # version and finds the work done. A session lock, not a transaction's: each step
            # must start a transaction after the wait, or it could still see the catalog as it
            # was before the first instance's commit (and create the tables again). The server
            # drops the lock if the connection dies; asyncpg's pool drops it on release.
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                for target, statements in enumerate(self.migrations(), start=1):
                    async with conn.transaction():
                        await self._migrate_to(conn, target, statements)
            finally:
                with suppress(*DATABASE_ERRORS):
                    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    async def _migrate_to(self, conn: Any, target: int, statements: Sequence[str]) -> None:
        """One step, inside its transaction together with the version bump."""
        if not await conn.fetchval("SELECT to_regclass('l402_schema_version') IS NOT NULL"):
            await conn.execute(VERSION_TABLE)
            await conn.execute("INSERT INTO l402_schema_version (version) VALUES (0)")
        current = await self._schema_version(conn)
        self._check_version(current)
        if current >= target:
            return
        try:
            for statement in statements:
                await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            raise StoreError(
                f"store {self.shown}: migration to schema version {target} failed: "
                f"{self.target.scrub(str(exc))}"
            ) from None
        await conn.execute("UPDATE l402_schema_version SET version = $1", target)
        log.info("store %s migrated to schema version %d", self.shown, target)

    # -- the interface -------------------------------------------------------------------------

    async def secret(self) -> bytes:
        """The server's root secret, created on first use and the same for every instance."""
        if self._secret is None:
            async with self._connection() as conn:
                # Instances opening a fresh database together all insert: the first insert
                # wins (the others wait for its commit, then do nothing) and all read it back.
                await conn.execute(
                    "INSERT INTO l402_meta (key, value) VALUES ('secret', $1)"
                    " ON CONFLICT (key) DO NOTHING",
                    os.urandom(SECRET_SIZE),
                )
                row = await conn.fetchval("SELECT value FROM l402_meta WHERE key = 'secret'")
            value = bytes(row) if row is not None else b""
            if len(value) != SECRET_SIZE:
                raise StoreError(f"store {self.shown}: stored secret is damaged")
            self._secret = value
        return self._secret

    async def flush(self) -> None:
        """Write every queued record in one transaction. On failure keep them (for the next
        flush, within the queue's bound), clear `healthy` and raise StoreError. With nothing
        queued: a no-op while healthy, else a probe of the database that sets `healthy` again
        when it answers (so calling flush periodically is enough to recover)."""
        async with self._flush_lock:
            if not self._pending_issued and not self._pending_paid:
                if not self._healthy:
                    async with self._connection() as conn:
                        await conn.execute("SELECT 1")
                    self._set_healthy(True)
                return
            issued, paid = self._take_batch()
            try:
                async with self._transaction() as conn:
                    if issued:
                        await self._insert_issued(conn, issued)
                    if paid:
                        await self._update_paid(conn, paid)
            except BaseException as exc:
                self._give_back(issued, paid)
                if isinstance(exc, Exception):  # not a cancelled flush: the database failed
                    self._set_healthy(False)
                raise
            self._set_healthy(True)

    @staticmethod
    async def _insert_issued(conn: Any, issued: Sequence[IssuedToken]) -> None:
        # One statement for the batch. ON CONFLICT DO NOTHING: a batch retried after a commit
        # whose answer was lost (a timeout, a cancelled flush) must not fail on its own rows.
        # ORDER BY n: row_id follows the order the tokens were issued in.
        await conn.execute(
            "INSERT INTO l402_issued_tokens (token_id, payment_hash, service, price_sat,"
            " created_at, valid_until, paid_at)"
            " SELECT t, h, s, p, c, v, pa FROM unnest($1::bytea[], $2::bytea[], $3::text[],"
            " $4::bigint[], $5::float8[], $6::float8[], $7::float8[])"
            " WITH ORDINALITY AS u(t, h, s, p, c, v, pa, n) ORDER BY n"
            " ON CONFLICT (token_id) DO NOTHING",
            [t.token_id for t in issued],
            [t.payment_hash for t in issued],
            [t.service for t in issued],
            [t.price_sat for t in issued],
            [t.created_at for t in issued],
            [t.valid_until for t in issued],
            [t.paid_at for t in issued],
        )

    @staticmethod
    async def _update_paid(conn: Any, paid: Sequence[tuple[bytes, float]]) -> None:
        # min() per token and LEAST (which skips NULL): whatever order notes arrive in, and
        # however often a batch is retried, the earliest sighting is kept.
        await conn.execute(
            "UPDATE l402_issued_tokens AS i SET paid_at = LEAST(i.paid_at, p.at)"
            " FROM (SELECT t, min(a) AS at FROM unnest($1::bytea[], $2::float8[]) AS u(t, a)"
            " GROUP BY t) AS p WHERE i.token_id = p.t",
            [token_id for token_id, _ in paid],
            [when for _, when in paid],
        )

    async def revoke(self, ref: str, when: float) -> list[IssuedToken]:
        """Revoke the token `ref` names (token id, payment hash, or a unique prefix of either)
        and notify every instance, in one transaction.

        Revoking a revoked token returns it with its first revoked_at. An unknown full
        64-hex ref is revoked as a token id anyway, since its issuance record may be lost.
        """
        prefix = normalize_ref(ref)
        await self.flush()  # so a token this instance just issued can be found
        low, high = prefix_range(prefix)
        where_id, where_hash = "i.token_id >= $1", "i.payment_hash >= $1"
        params: list[Any] = [low]
        if high is not None:
            where_id += " AND i.token_id < $2"
            where_hash += " AND i.payment_hash < $2"
            params.append(high)
        async with self._transaction() as conn:
            # One revoker at a time, across instances: identity values are handed out at
            # INSERT but become visible at COMMIT, so two concurrent revokers could commit
            # seq n+1 before seq n, and a reader whose cursor passed n+1 would never see n.
            # Under this lock they commit in seq order.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", REVOKE_LOCK)
            rows = await conn.fetch(
                f"{_TOKEN_SELECT} WHERE {where_id} UNION {_TOKEN_SELECT} WHERE {where_hash}",
                *params,
            )
            token = revocation_target(ref, prefix, [token_from_row(row) for row in rows])
            earlier = await conn.fetchval(
                "SELECT revoked_at FROM l402_revocations WHERE token_id = $1", token.token_id
            )
            if earlier is not None:
                return [replace(token, revoked_at=earlier)]
            seq = await conn.fetchval(
                "INSERT INTO l402_revocations (token_id, revoked_at) VALUES ($1, $2) RETURNING seq",
                token.token_id,
                when,
            )
            await self._announce(conn, seq)
        warn_unrecorded(token, prefix)
        return [replace(token, revoked_at=when)]

    @staticmethod
    async def _announce(conn: Any, seq: int) -> None:
        """NOTIFY inside the revoking transaction: listeners hear of it when it commits, and
        never of one that rolled back."""
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(seq))

    async def revocations_since(self, cursor: int) -> tuple[int, set[bytes]]:
        """(new cursor, token ids revoked after `cursor`); start from 0 for all of them.

        Safe to call after any gap (an outage, a lost notification): seq values become visible
        in order (see revoke()), so everything after the cursor is still there to read.
        """
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT seq, token_id FROM l402_revocations WHERE seq > $1 ORDER BY seq", cursor
            )
        if not rows:
            return cursor, set()
        return int(rows[-1][0]), {bytes(row[1]) for row in rows}

    async def wait_for_revocations(self, timeout: float) -> None:
        """Return when a revocation may have happened, at the latest after `timeout` s; the
        caller then reads `revocations_since(cursor)`.

        Returns early when this or another instance revoked something (a NOTIFY), and when
        the listening connection (started by the first call) has connected or reconnected:
        what was revoked while it was not listening was not notified, so the caller must
        catch up then. Never raises for a database that is down: it waits and reconnects.
        """
        self._live()
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="l402proxy store LISTEN")
        if not self._wake.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))
        self._wake.clear()

    def _on_notification(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        """Keep one connection LISTENing, for as long as the store is open."""
        delay = RECONNECT_FIRST_DELAY
        failing = False
        while self._pool is not None:
            try:
                conn, lost = await self._open_listener()
            except Exception as exc:  # whatever it is, the listener must live on
                if not failing:
                    failure = self.target.failure(exc, self.target.connect_timeout)
                    log.warning("cannot listen for revocations (%s); retrying", failure)
                    failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            # Listening: whatever is revoked from now on is notified. Wake the waiter so that
            # it reads what was revoked before (or while this connection was away).
            self.listening = True
            self._wake.set()
            if failing:
                log.info("store %s: listening for revocations again", self.shown)
                failing = False
            delay = RECONNECT_FIRST_DELAY
            try:
                await self._watch(conn, lost)
            except Exception:
                pass  # the connection stopped answering: reconnect below
            finally:
                self.listening = False
                conn.terminate()
            if self._pool is not None:
                # Most likely the database went away: stop selling until a flush gets through.
                self._set_healthy(False)
                log.warning(
                    "store %s: lost the connection listening for revocations; reconnecting",
                    self.shown,
                )
                failing = True

    async def _open_listener(self) -> tuple[Any, asyncio.Event]:
        """A new connection LISTENing on CHANNEL, and the event its loss sets."""
        lost = asyncio.Event()
        async with asyncio.timeout(self.target.connect_timeout):
            conn = await asyncpg.connect(
                self.target.dsn,
                timeout=self.target.connect_timeout,
                command_timeout=self.operation_timeout,
                server_settings=SERVER_SETTINGS,
            )
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            async with asyncio.timeout(self.operation_timeout):
                await conn.add_listener(CHANNEL, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        return conn, lost

    async def _watch(self, conn: Any, lost: asyncio.Event) -> None:
        """Return when the listening connection is lost (or raise when it stops answering)."""
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.keepalive_seconds)
                return
            async with asyncio.timeout(self.operation_timeout):
                await conn.execute("SELECT 1")

    async def list_tokens(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[IssuedToken]:
        """Issued tokens, newest first."""
        if limit < 1:
            # StoreError, not ValueError: the CLI passes --limit straight through.
            raise StoreError(f"limit must be at least 1, got {limit}")
        await self.flush()  # include what this instance has issued
        where, params = "", list[Any]()
        if service is not None:
            where, params = " WHERE i.service = $1", [service]
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"{_TOKEN_SELECT}{where} ORDER BY i.created_at DESC, i.row_id DESC"
                f" LIMIT ${len(params) + 1}",
                *params,
                limit,
            )
        return [token_from_row(row) for row in rows]

    async def close(self) -> None:
        """Flush queued records, stop listening, close the pool. Raises StoreError if records
        could not be written (they are lost then, and the log says how many)."""
        if self._pool is None:
            return
        try:
            await self.flush()
        except StoreError:
            log.error("store %s: %d queued records lost on close", self.shown, self.pending)
            raise
        finally:
            pool, self._pool = self._pool, None
            if self._listener is not None:
                self._listener.cancel()
                with suppress(asyncio.CancelledError):
                    await self._listener
                self._listener = None
            try:
                await asyncio.wait_for(pool.close(), self.operation_timeout)
            except DATABASE_ERRORS:
                pool.terminate()
