"""The server's SQLite store: root secret, issued tokens, payments seen and revocations.

Verifying a paid request never reads this database: root keys are derived from the secret,
which the proxy loads once. The 402 path only queues records (`note_issued`), a background
task writes them with `flush()`, and revocations made by another process (`l402proxy tokens
revoke`) reach the proxy through `revocations_since()`, a cheap indexed poll after each
`wait_for_revocations()` (a plain sleep here: SQLite cannot signal another process's write).
Bundle balances are the exception to writing behind: they are money, so `draw()` and
`charge()` write at once, one statement each, exactly once across processes on the file. So are
private feed accesses (`feed_for()`, `revoke_feeds()`, `rotate_feeds()`): a feed URL handed out
must work at once, and one revoked must stay revoked. And so are consumed Payment charges
(`consume_charge()`): one statement against the primary key, once per payment hash across
processes; `flush()` prunes the expired ones, a bounded batch at a time.
store/postgres.py is the same interface on PostgreSQL, for several instances.
"""

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import aiosqlite

from l402proxy.paths import default_server_store
from l402proxy.store import database
from l402proxy.store.database import (
    CHARGE_EXPIRY_MARGIN,
    CHARGE_PRUNE_LIMIT,
    MIN_PREFIX_LEN,
    SECRET_SIZE,
    ChargePruning,
    Database,
    FeedAccess,
    FeedRef,
    IssuedToken,
    RecordQueue,
    RevenueRow,
    StoreError,
    check_consume_charge,
    check_draw,
    check_feed_for,
    check_id,
    check_prune_charges,
    check_revenue_range,
    feed_from_row,
    feed_token_target,
    hiding,
    is_feed_capability,
    normalize_ref,
    parse_feed_ref,
    prefix_range,
    revocation_target,
    start_from,
    token_from_row,
    unknown_feed_ref,
    warn_unrecorded,
)

__all__ = ["MIGRATIONS", "MIN_PREFIX_LEN", "IssuedToken", "ServerStore", "StoreError"]

log = logging.getLogger("l402proxy.store")

# Schema history. Entry i brings the database from user_version i to i + 1, in one
# transaction together with the version bump, so a crash mid-migration leaves the old
# version intact. Never edit a released entry: append a new one.
MIGRATIONS: list[Sequence[str]] = [
    (
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value BLOB NOT NULL
        )
        """,
        """
        CREATE TABLE issued_tokens (
            token_id BLOB PRIMARY KEY CHECK (length(token_id) = 32),
            payment_hash BLOB NOT NULL CHECK (length(payment_hash) = 32),
            service TEXT NOT NULL,
            price_sat INTEGER NOT NULL CHECK (price_sat >= 0),
            created_at REAL NOT NULL,
            valid_until REAL,
            paid_at REAL
        )
        """,
        "CREATE INDEX issued_tokens_payment_hash ON issued_tokens (payment_hash)",
        "CREATE INDEX issued_tokens_created ON issued_tokens (created_at)",
        "CREATE INDEX issued_tokens_service_created ON issued_tokens (service, created_at)",
        # AUTOINCREMENT: a sequence number is never reused, even after a delete, so a poller's
        # cursor can never skip a revocation. No foreign key to issued_tokens on purpose: a
        # token whose issuance record was lost must still be revocable.
        """
        CREATE TABLE revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            token_id BLOB NOT NULL UNIQUE CHECK (length(token_id) = 32),
            revoked_at REAL NOT NULL
        )
        """,
    ),
    # Version 2: paid sightings apart from the issued rows. A sighting is often noted by a
    # process that did not sell the token, and may be written before the seller writes its
    # row; an UPDATE of that row would match nothing and the sighting would be lost. An
    # upsert here never loses one, whatever the order; listings take the earliest of both
    # (issued_tokens.paid_at holds what version 1 wrote).
    (
        """
        CREATE TABLE paid_sightings (
            token_id BLOB PRIMARY KEY CHECK (length(token_id) = 32),
            paid_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ),
    # Version 3: revenue() reads the paid tokens of a time range by when they were paid: the
    # sightings, and the few issued rows version 1 wrote a paid_at into (partial: the rest of
    # that column is NULL, one row per 402).
    (
        "CREATE INDEX paid_sightings_paid_at ON paid_sightings (paid_at)",
        "CREATE INDEX issued_tokens_paid_at ON issued_tokens (paid_at) WHERE paid_at IS NOT NULL",
    ),
    # Version 4: what is left of each bundle token (draw, charge): a row from the token's first
    # draw on. Apart from issued_tokens, like the sightings: the issued row is written behind
    # (and may be lost), the balance is written at once and must never be.
    (
        """
        CREATE TABLE token_balances (
            token_id BLOB PRIMARY KEY CHECK (length(token_id) = 32),
            balance INTEGER NOT NULL CHECK (balance >= 0)
        ) WITHOUT ROWID
        """,
    ),
    # Version 5: private podcast feeds (database.FeedAccess), written at once like the balances.
    # No foreign key to issued_tokens: the issued row is written behind and may be lost. A
    # revoked access stays (revoked_at set) so that its capability is still known, and never
    # handed out again; at most one access of a (token, feed, credential) is active, which the
    # partial unique index enforces across processes (feed_for inserts against it, doing
    # nothing on a conflict). The credential is in it by its digest (credential_digest(): a
    # fixed 32 bytes, where the credential may be kilobytes): a capability is worth exactly the
    # credential that minted it, so a narrowed (attenuated) copy of a token gets its own, never
    # the full credential's. feed_accesses_token finds a token's accesses, revoked ones too
    # (`feeds revoke|rotate <token prefix>`); feed_accesses_created orders `feeds list`.
    (
        """
        CREATE TABLE feed_accesses (
            capability TEXT PRIMARY KEY CHECK (length(capability) = 22),
            token_id BLOB NOT NULL CHECK (length(token_id) = 32),
            service TEXT NOT NULL,
            feed TEXT NOT NULL CHECK (substr(feed, 1, 1) = '/'),
            credential TEXT NOT NULL,
            credential_digest BLOB NOT NULL CHECK (length(credential_digest) = 32),
            valid_until REAL,
            created_at REAL NOT NULL,
            revoked_at REAL
        )
        """,
        "CREATE UNIQUE INDEX feed_accesses_active"
        " ON feed_accesses (token_id, feed, credential_digest) WHERE revoked_at IS NULL",
        "CREATE INDEX feed_accesses_token ON feed_accesses (token_id)",
        "CREATE INDEX feed_accesses_created ON feed_accesses (created_at)",
    ),
    # Version 6: Payment-scheme charges consumed (database.TokenStore.consume_charge), written at
    # once like the balances: a paid charge opens one request, once, whichever process sees it
    # first. The primary key is what makes it once: consume_charge inserts against it, doing
    # nothing on a conflict. Keyed by the payment hash (what was paid, whichever challenge
    # carried it). A row may go some time after its challenge expired (prune_charges, through
    # consumed_charges_expires): an expired challenge is refused before the store is asked.
    (
        """
        CREATE TABLE consumed_charges (
            payment_hash BLOB PRIMARY KEY CHECK (length(payment_hash) = 32),
            challenge_id TEXT NOT NULL,
            service TEXT NOT NULL,
            consumed_at REAL NOT NULL,
            expires_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
        "CREATE INDEX consumed_charges_expires ON consumed_charges (expires_at)",
    ),
]


# SQLite's min() of several values is NULL if any is: coalesce picks the one that is not.
_TOKEN_COLUMNS = (
    "i.token_id, i.payment_hash, i.service, i.price_sat, i.created_at, i.valid_until, "
    "coalesce(min(i.paid_at, s.paid_at), i.paid_at, s.paid_at), r.revoked_at"
)
_TOKEN_SELECT = (
    f"SELECT {_TOKEN_COLUMNS}, b.balance FROM issued_tokens i "
    "LEFT JOIN paid_sightings s ON s.token_id = i.token_id "
    "LEFT JOIN revocations r ON r.token_id = i.token_id "
    "LEFT JOIN token_balances b ON b.token_id = i.token_id"
)

# Balances (database.TokenStore): each call one statement, so one write of the row under
# SQLite's write lock, whichever process makes it. A token's first draw inserts its row at
# size - amount; a later one takes the conflict path, which the WHERE refuses when nothing is
# left: no row then comes back (an insert always returns one), which is how None is told
# apart. In DO UPDATE, a bare `balance` is the row as it was.
_DRAW_SQL = (
    "INSERT INTO token_balances (token_id, balance) VALUES (:token_id, max(:size - :amount, 0))"
    " ON CONFLICT (token_id) DO UPDATE SET balance = max(balance - :amount, 0) WHERE balance > 0"
    " RETURNING balance"
)
_CHARGE_SQL = (
    "INSERT INTO token_balances (token_id, balance) VALUES (:token_id, max(:size - :amount, 0))"
    " ON CONFLICT (token_id) DO UPDATE SET balance = max(balance - :amount, 0)"
    " RETURNING balance"
)

# Feed accesses (database.TokenStore). The conflict target names the partial unique index: an
# active access of the same (token, feed, credential) makes the insert do nothing; any other
# conflict (a capability drawn twice) is an error, never a silent no-op. What is read back is
# database.feed_from_row's columns (the digest is only the key).
_FEED_COLUMNS = (
    "capability, token_id, service, feed, credential, valid_until, created_at, revoked_at"
)
_FEED_SELECT = f"SELECT {_FEED_COLUMNS} FROM feed_accesses"
_ACTIVE_FEED_SQL = (
    f"{_FEED_SELECT} WHERE token_id = ? AND feed = ? AND credential_digest = ?"
    " AND revoked_at IS NULL"
)
_INSERT_FEED_SQL = (
    f"INSERT INTO feed_accesses ({_FEED_COLUMNS}, credential_digest)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_NEW_FEED_SQL = (
    f"{_INSERT_FEED_SQL} ON CONFLICT (token_id, feed, credential_digest)"
    " WHERE revoked_at IS NULL DO NOTHING"
)
_REVOKE_FEED_SQL = (
    "UPDATE feed_accesses SET revoked_at = ? WHERE capability = ? AND revoked_at IS NULL"
)


# Consumed charges (database.TokenStore). One statement: under SQLite's write lock, whichever
# process runs it, the insert either writes the row (and returns it) or meets the row another
# call wrote and does nothing (and returns none). Only a primary key conflict is a no-op; a
# CHECK that fails is an error.
_CONSUME_CHARGE_SQL = (
    "INSERT INTO consumed_charges (payment_hash, challenge_id, service, consumed_at, expires_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (payment_hash) DO NOTHING RETURNING 1"
)
# The oldest expired rows, a bounded batch (DELETE ... LIMIT needs a compile-time option).
_PRUNE_CHARGES_SQL = (
    "DELETE FROM consumed_charges WHERE payment_hash IN (SELECT payment_hash"
    " FROM consumed_charges WHERE expires_at < ? ORDER BY expires_at LIMIT ?) RETURNING 1"
)


def credential_digest(credential: str) -> bytes:
    """The key of a feed access's credential in the unique index of active accesses: its
    SHA-256 (store/postgres.py has the same; a stored row's digest is always this of its
    credential, which rotation keeps)."""
    return hashlib.sha256(credential.encode("utf-8")).digest()


def _feed_row(access: FeedAccess) -> tuple[Any, ...]:
    return (
        access.capability,
        access.token_id,
        access.service,
        access.feed,
        access.credential,
        access.valid_until,
        access.created_at,
        access.revoked_at,
        credential_digest(access.credential),
    )


# The tokens of the batch being flushed (their ids in temp.flush_ids) that are paid: an issued
# row and a sighting (or a paid_at version 1 wrote). CROSS JOIN makes SQLite walk the batch and
# look each id up, never the other way round (issued_tokens holds a row per 402 ever made).
_FLUSH_IDS_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS flush_ids (token_id BLOB PRIMARY KEY) WITHOUT ROWID"
)
_PAID_IN_BATCH = (
    "FROM temp.flush_ids f CROSS JOIN issued_tokens i ON i.token_id = f.token_id "
    "LEFT JOIN paid_sightings s ON s.token_id = i.token_id "
    "LEFT JOIN revocations r ON r.token_id = i.token_id "
    "WHERE coalesce(i.paid_at, s.paid_at) IS NOT NULL"
)

# revenue(): the paid tokens whose first sighting is in [:since, :until). A token's paid_at is
# the earliest of its sighting and its version 1 column, so it is at or after :since only if
# each of those it has is: the two indexed ranges below find every one (UNION: those found
# by both once), and the outer WHERE keeps those in range. :since >= 0, so CAST (which
# truncates) is floor.
_REVENUE_SQL = """
    SELECT CAST(p.at / :bucket AS INTEGER) * :bucket AS start, p.service,
           count(*), sum(p.price_sat)
    FROM (
        SELECT i.token_id, i.service, i.price_sat,
               coalesce(min(i.paid_at, s.paid_at), s.paid_at) AS at
        FROM paid_sightings s CROSS JOIN issued_tokens i ON i.token_id = s.token_id
        WHERE s.paid_at >= :since
        UNION
        SELECT i.token_id, i.service, i.price_sat,
               coalesce(min(i.paid_at, s.paid_at), i.paid_at) AS at
        FROM issued_tokens i LEFT JOIN paid_sightings s ON s.token_id = i.token_id
        WHERE i.paid_at IS NOT NULL AND i.paid_at >= :since
    ) AS p
    WHERE p.at >= :since AND p.at < :until AND (:service IS NULL OR p.service = :service)
    GROUP BY 1, 2
    ORDER BY 1, 2
"""


def sqlite_path_from_uri(uri: str) -> Path:
    """The server store's file for a `l402_store` value ("" = the default file)."""
    return database.sqlite_path_from_uri(uri, default_server_store())


class ServerStore(Database, RecordQueue, ChargePruning):
    """One SQLite connection shared by the proxy's coroutines; see the module docstring.
    Queueing (note_issued, note_paid, pending, healthy) is RecordQueue's; when flush() prunes
    consumed charges, ChargePruning's."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        Database.__init__(self, db, path)
        RecordQueue.__init__(self)
        self._init_pruning()
        self.shown = str(path)
        self._secret: bytes | None = None

    def _check_open(self) -> None:
        self._live()

    def migrations(self) -> Sequence[Sequence[str]]:
        return MIGRATIONS  # looked up per call, so tests can extend the history

    @classmethod
    async def open(cls, uri: str) -> Self:
        store = await cls.open_path(sqlite_path_from_uri(uri))
        log.info("server store: %s", store.path)
        return store

    async def close(self) -> None:
        """Flush queued records, then close. Raises StoreError if records could not be written."""
        if self._db is None:
            return
        try:
            await self._write_queue()
        except StoreError:
            log.error("store %s: %d queued records lost on close", self.path, self.pending)
            raise
        finally:
            await super().close()

    async def secret(self) -> bytes:
        """The server's root secret, created on first use and the same for every process."""
        if self._secret is None:
            async with self._transaction() as db:
                # Two processes starting on a fresh file both try to insert; IMMEDIATE makes
                # them take turns and OR IGNORE keeps the first, which both then read.
                await db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('secret', ?)",
                    (os.urandom(SECRET_SIZE),),
                )
                row = await self._one("SELECT value FROM meta WHERE key = 'secret'")
            value = bytes(row[0]) if row else b""
            if len(value) != SECRET_SIZE:
                raise StoreError(f"store {self.path}: stored secret is damaged")
            self._secret = value
        return self._secret

    async def flush(self) -> list[IssuedToken]:
        """Write every queued record in one transaction; on failure keep them, clear `healthy`
        and raise StoreError (the next flush that works sets it again: a failed batch stays
        queued, so there is always a next one). Returns the tokens this store was first to
        make paid (database.TokenStore), also those of writes list_tokens, revoke and revenue
        made since the last flush(). Prunes expired consumed charges when due (ChargePruning:
        a bounded batch, never a failure of the flush)."""
        await self._write_queue()
        await self._prune_when_due()
        return self._take_settled()

    async def _write_queue(self) -> None:
        if not self._pending_issued and not self._pending_paid:
            return
        batch = self._take_batch()
        issued, paid = batch.issued, batch.paid
        try:
            with self._flushing():
                settled = await self._write(issued, paid)
        except BaseException as exc:
            self._give_back(batch)
            if isinstance(exc, Exception):  # not a cancelled flush: the database failed
                self._set_healthy(False)
            raise
        self._set_healthy(True)
        self._keep_settled(settled)

    async def _write(
        self, issued: list[IssuedToken], paid: list[tuple[bytes, float]]
    ) -> list[IssuedToken]:
        """Write the batch; the tokens it made paid. One IMMEDIATE transaction: every other
        process's writes wait, so what was paid before and after it is this batch's doing."""
        ids = list(dict.fromkeys([t.token_id for t in issued] + [t for t, _ in paid]))
        async with self._transaction() as db:
            await db.execute(_FLUSH_IDS_TABLE)
            await db.execute("DELETE FROM temp.flush_ids")
            await db.executemany(
                "INSERT INTO temp.flush_ids (token_id) VALUES (?)", [(i,) for i in ids]
            )
            before = await db.execute_fetchall(f"SELECT i.token_id {_PAID_IN_BATCH}")
            await self._write_batch(db, issued, paid)
            after = await db.execute_fetchall(f"SELECT {_TOKEN_COLUMNS} {_PAID_IN_BATCH}")
            await db.execute("DELETE FROM temp.flush_ids")
        paid_before = {bytes(row[0]) for row in before}
        return [token_from_row(row) for row in after if bytes(row[0]) not in paid_before]

    @staticmethod
    async def _write_batch(
        db: aiosqlite.Connection, issued: list[IssuedToken], paid: list[tuple[bytes, float]]
    ) -> None:
        if issued:
            # OR IGNORE: a batch retried after a commit whose result was lost (e.g. a
            # cancelled flush) must not fail on its own earlier rows.
            await db.executemany(
                "INSERT OR IGNORE INTO issued_tokens (token_id, payment_hash, service,"
                " price_sat, created_at, valid_until, paid_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        t.token_id,
                        t.payment_hash,
                        t.service,
                        t.price_sat,
                        t.created_at,
                        t.valid_until,
                        t.paid_at,
                    )
                    for t in issued
                ],
            )
        if paid:
            # An upsert, kept apart from issued_tokens (see MIGRATIONS, version 2): the
            # token's row may not be written yet. The WHERE keeps the earliest sighting,
            # whatever order notes arrive in.
            await db.executemany(
                "INSERT INTO paid_sightings (token_id, paid_at) VALUES (?, ?)"
                " ON CONFLICT (token_id) DO UPDATE SET paid_at = excluded.paid_at"
                " WHERE excluded.paid_at < paid_sightings.paid_at",
                paid,
            )

    async def revoke(self, ref: str, when: float) -> list[IssuedToken]:
        """Revoke the token `ref` names (token id, payment hash, or a unique prefix of either).

        Revoking a revoked token returns it with its first revoked_at. An unknown full
        64-hex ref is revoked as a token id anyway, since its issuance record may be lost.
        """
        prefix = normalize_ref(ref)
        await self._write_queue()  # so a token this process just issued can be found
        low, high = prefix_range(prefix)
        where_id, where_hash = "i.token_id >= ?", "i.payment_hash >= ?"
        params: list[Any] = [low, low]
        if high is not None:
            where_id += " AND i.token_id < ?"
            where_hash += " AND i.payment_hash < ?"
            params = [low, high, low, high]
        async with self._transaction() as db:
            rows = await db.execute_fetchall(
                f"{_TOKEN_SELECT} WHERE {where_id} UNION {_TOKEN_SELECT} WHERE {where_hash}",
                params,
            )
            token = revocation_target(ref, prefix, [token_from_row(row) for row in rows])
            row = await self._one(
                "SELECT revoked_at FROM revocations WHERE token_id = ?", (token.token_id,)
            )
            if row is not None:
                return [replace(token, revoked_at=row[0])]
            await db.execute(
                "INSERT INTO revocations (token_id, revoked_at) VALUES (?, ?)",
                (token.token_id, when),
            )
        warn_unrecorded(token, prefix)
        return [replace(token, revoked_at=when)]

    async def revocations_since(self, cursor: int) -> tuple[int, set[bytes]]:
        """(new cursor, token ids revoked after `cursor`); start from 0 for all of them."""
        # Sequence numbers are assigned under SQLite's single write lock and become visible
        # at commit, in order, so a reader never sees seq n+1 before seq n. One statement
        # (one snapshot) reads the largest seq too: a file restored from a backup is behind
        # the cursor (see database.start_from). The first row is there even with no match.
        rows = await self._read(
            "SELECT t.top, r.seq, r.token_id"
            " FROM (SELECT coalesce(max(seq), 0) AS top FROM revocations) AS t"
            " LEFT JOIN revocations r"
            " ON r.seq > (CASE WHEN t.top < ? THEN 0 ELSE ? END)"
            " ORDER BY r.seq",
            (cursor, cursor),
        )
        start = start_from(cursor, int(rows[0][0]), self.shown)
        found = [(int(row[1]), bytes(row[2])) for row in rows if row[1] is not None]
        if not found:
            return start, set()
        return found[-1][0], {token_id for _, token_id in found}

    async def wait_for_revocations(self, timeout: float) -> None:
        """Sleep `timeout` seconds: SQLite cannot signal another process's revocation, so the
        caller polls `revocations_since()` after each wait (pass 1 s to keep the promise that a
        revocation reaches every instance within 1 s)."""
        self._live()
        await asyncio.sleep(max(timeout, 0.0))

    async def list_tokens(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[IssuedToken]:
        """Issued tokens, newest first."""
        if limit < 1:
            # StoreError, not ValueError: the CLI passes --limit straight through.
            raise StoreError(f"limit must be at least 1, got {limit}")
        await self._write_queue()  # include what this process has issued
        where, params = "", list[Any]()
        if service is not None:
            where, params = " WHERE i.service = ?", [service]
        rows = await self._read(
            f"{_TOKEN_SELECT}{where} ORDER BY i.created_at DESC, i.rowid DESC LIMIT ?",
            [*params, limit],
        )
        return [token_from_row(row) for row in rows]

    async def revenue(
        self, since: float, until: float, bucket_seconds: int, service: str | None = None
    ) -> list[RevenueRow]:
        """Sales per bucket and service (database.TokenStore), oldest first."""
        check_revenue_range(since, until, bucket_seconds)
        await self._write_queue()  # include what this process has seen paid
        rows = await self._read(
            _REVENUE_SQL,
            {"since": since, "until": until, "bucket": bucket_seconds, "service": service},
        )
        return [RevenueRow(float(row[0]), row[1], int(row[2]), int(row[3])) for row in rows]

    async def draw(self, token_id: bytes, size: int, amount: int) -> int | None:
        """Draw `amount` from the token's bundle of `size`: what is left, or None when nothing
        was (database.TokenStore). One statement, at once (not queued)."""
        check_draw(token_id, size, amount)
        rows = await self._statement(
            _DRAW_SQL, {"token_id": token_id, "size": size, "amount": amount}
        )
        return int(rows[0][0]) if rows else None

    async def charge(self, token_id: bytes, size: int, amount: int) -> int:
        """Subtract usage known after the fact, never below 0: what is left."""
        check_draw(token_id, size, amount)
        rows = await self._statement(
            _CHARGE_SQL, {"token_id": token_id, "size": size, "amount": amount}
        )
        if not rows:  # an upsert with RETURNING always returns its row
            raise StoreError(f"store {self.path}: the balance update returned nothing")
        return int(rows[0][0])

    async def balance_of(self, token_id: bytes) -> int | None:
        """What is left of the token's bundle; None when it was never drawn from."""
        check_id("token_id", token_id)
        rows = await self._read(
            "SELECT balance FROM token_balances WHERE token_id = ?", (token_id,)
        )
        return int(rows[0][0]) if rows else None

    # -- private podcast feeds (database.TokenStore) ------------------------------------------

    async def feed_for(
        self,
        token_id: bytes,
        service: str,
        feed: str,
        credential: str,
        valid_until: float | None,
        when: float,
    ) -> FeedAccess:
        """The active access of this token, feed and credential, else a new one
        (database.TokenStore). Another credential of the token (an attenuated copy, the full
        one) has an access of its own: a capability opens what its credential opens."""
        check_feed_for(token_id, service, feed, credential, valid_until, when)
        active = (token_id, feed, credential_digest(credential))
        with hiding([credential]):
            # The common case (a listener unlocking again) reads without the write lock.
            rows = await self._read(_ACTIVE_FEED_SQL, active)
            if rows:
                return feed_from_row(rows[0])
            capability = database.new_feed_capability()
            async with self._transaction() as db:
                # IMMEDIATE: every other process's writes wait, so the active row read back is
                # this insert's, or the one another process committed before it.
                await db.execute(
                    _NEW_FEED_SQL,
                    (
                        capability,
                        token_id,
                        service,
                        feed,
                        credential,
                        valid_until,
                        when,
                        None,
                        active[2],
                    ),
                )
                row = await self._one(_ACTIVE_FEED_SQL, active)
        if row is None:  # the insert or the row it met is there, under the write lock
            raise StoreError(f"store {self.path}: the feed access was not written")
        return feed_from_row(row)

    async def feed_access(self, capability: str) -> FeedAccess | None:
        """The access of `capability`, revoked and expired ones too; None if there is none."""
        if not is_feed_capability(capability):
            return None
        rows = await self._read(f"{_FEED_SELECT} WHERE capability = ?", (capability,))
        return feed_from_row(rows[0]) if rows else None

    async def list_feeds(
        self, *, include_inactive: bool = False, limit: int = 1000
    ) -> list[FeedAccess]:
        """Feed accesses, newest first: the active ones, or every one."""
        if limit < 1:
            # StoreError, not ValueError: the CLI passes --limit straight through.
            raise StoreError(f"limit must be at least 1, got {limit}")
        where, params = "", list[Any]()
        if not include_inactive:
            where = " WHERE revoked_at IS NULL AND (valid_until IS NULL OR valid_until > ?)"
            params = [time.time()]
        rows = await self._read(
            f"{_FEED_SELECT}{where} ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [*params, limit],
        )
        return [feed_from_row(row) for row in rows]

    async def revoke_feeds(self, ref: str, when: float) -> list[FeedAccess]:
        """Revoke the active accesses `ref` names (database.TokenStore): those revoked now."""
        named = parse_feed_ref(ref)
        async with self._transaction() as db:
            active = await self._named_feeds(named)
            await db.executemany(_REVOKE_FEED_SQL, [(when, a.capability) for a in active])
        return [replace(access, revoked_at=when) for access in active]

    async def rotate_feeds(self, ref: str, when: float) -> list[FeedAccess]:
        """Replace the active accesses `ref` names by new ones, in one transaction (see
        database.TokenStore); the new ones."""
        named = parse_feed_ref(ref)
        credentials: list[str] = []
        with hiding(credentials):
            async with self._transaction() as db:
                active = await self._named_feeds(named)
                credentials.extend(access.credential for access in active)
                fresh = [
                    replace(
                        access,
                        capability=database.new_feed_capability(),
                        created_at=when,
                        revoked_at=None,
                    )
                    for access in active
                ]
                # Revoked first: the new rows take the old ones' place in the unique index of
                # active accesses. A plain insert: any conflict fails (and rolls back) the whole.
                await db.executemany(_REVOKE_FEED_SQL, [(when, a.capability) for a in active])
                await db.executemany(_INSERT_FEED_SQL, [_feed_row(a) for a in fresh])
        return fresh

    # -- Payment-scheme charges (database.TokenStore) -----------------------------------------

    async def consume_charge(
        self, payment_hash: bytes, challenge_id: str, service: str, expires_at: float, when: float
    ) -> bool:
        """True the first time `payment_hash` is consumed, by any process on the file; False
        for every later call (database.TokenStore). One statement, at once (not queued)."""
        check_consume_charge(payment_hash, challenge_id, service, expires_at, when)
        rows = await self._statement(
            _CONSUME_CHARGE_SQL, (payment_hash, challenge_id, service, when, expires_at)
        )
        return bool(rows)

    async def prune_charges(self, now: float, limit: int = CHARGE_PRUNE_LIMIT) -> int:
        """Delete at most `limit` charges whose challenge expired more than
        CHARGE_EXPIRY_MARGIN before `now`; how many went. One statement."""
        check_prune_charges(now, limit)
        rows = await self._statement(_PRUNE_CHARGES_SQL, (now - CHARGE_EXPIRY_MARGIN, limit))
        return len(rows)

    async def _named_feeds(self, ref: FeedRef) -> list[FeedAccess]:
        """The active accesses `ref` names (inside the caller's transaction); UnknownTokenRef
        or AmbiguousTokenRef when it names nothing or several tokens."""
        if ref.capability is not None:
            row = await self._one(f"{_FEED_SELECT} WHERE capability = ?", (ref.capability,))
            if row is not None:
                access = feed_from_row(row)
                return [access] if access.revoked_at is None else []
            if ref.prefix is None:
                raise unknown_feed_ref(ref)
        assert ref.prefix is not None  # parse_feed_ref gives one or the other
        low, high = prefix_range(ref.prefix)
        where, params = "token_id >= ?", [low]
        if high is not None:
            where, params = f"{where} AND token_id < ?", [low, high]
        found = await self._live().execute_fetchall(
            f"SELECT DISTINCT token_id FROM feed_accesses WHERE {where}", params
        )
        token_id = feed_token_target(ref, [bytes(row[0]) for row in found])
        rows = await self._live().execute_fetchall(
            f"{_FEED_SELECT} WHERE token_id = ? AND revoked_at IS NULL ORDER BY feed, capability",
            (token_id,),
        )
        return [feed_from_row(row) for row in rows]
