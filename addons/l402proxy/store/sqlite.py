"""The server's SQLite store: root secret, issued tokens, payments seen and revocations.

Verifying a paid request never reads this database: root keys are derived from the secret,
which the proxy loads once. The 402 path only queues records (`note_issued`), a background
task writes them with `flush()`, and revocations made by another process (`l402proxy tokens
revoke`) reach the proxy through `revocations_since()`, a cheap indexed poll.
"""

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import aiosqlite

from l402proxy.paths import default_server_store
from l402proxy.store import database
from l402proxy.store.database import Database, StoreError

log = logging.getLogger("l402proxy.store")

SECRET_SIZE = 32
_ID_SIZE = 32
MIN_PREFIX_LEN = 8

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
]


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
        }


_TOKEN_COLUMNS = (
    "i.token_id, i.payment_hash, i.service, i.price_sat, i.created_at, i.valid_until, "
    "i.paid_at, r.revoked_at"
)
_TOKEN_SELECT = (
    f"SELECT {_TOKEN_COLUMNS} FROM issued_tokens i "
    "LEFT JOIN revocations r ON r.token_id = i.token_id"
)


def _token_from_row(row: Sequence[Any]) -> IssuedToken:
    return IssuedToken(
        token_id=bytes(row[0]),
        payment_hash=bytes(row[1]),
        service=row[2],
        price_sat=row[3],
        created_at=row[4],
        valid_until=row[5],
        paid_at=row[6],
        revoked_at=row[7],
    )


def sqlite_path_from_uri(uri: str) -> Path:
    """The server store's file for a `l402_store` value ("" = the default file)."""
    return database.sqlite_path_from_uri(uri, default_server_store())


def _prefix_range(prefix: str) -> tuple[bytes, bytes | None]:
    """Hex prefix -> [low, high) bounds on 32-byte blobs, so the lookup can use an index.

    SQLite compares blobs with memcmp and a longer blob sorts after its own prefix, so
    every id starting with the prefix lies in [low, high). high is None when the prefix is
    all 'f' (no upper bound).
    """
    pad = len(prefix) % 2  # an odd prefix ends mid-byte: extend it with a zero nibble
    size = (len(prefix) + pad) // 2
    value = int(prefix, 16)
    low = (value << (4 * pad)).to_bytes(size, "big")
    if value + 1 >= 16 ** len(prefix):
        return low, None
    return low, ((value + 1) << (4 * pad)).to_bytes(size, "big")


def _normalize_ref(ref: str) -> str:
    text = ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]+", text):
        raise StoreError(f"token reference '{ref}' is not hexadecimal")
    if len(text) < MIN_PREFIX_LEN:
        raise StoreError(
            f"token reference '{ref}' is too short: give at least {MIN_PREFIX_LEN} hex "
            "characters of a token id or payment hash"
        )
    if len(text) > 2 * _ID_SIZE:
        raise StoreError(f"token reference '{ref}' is longer than a token id (64 hex characters)")
    return text


def _check_id(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != _ID_SIZE:
        raise ValueError(f"{name} must be {_ID_SIZE} bytes")


class ServerStore(Database):
    """One SQLite connection shared by the proxy's coroutines; see the module docstring."""

    # Records queued and not yet written, at most, of each kind. Every 402 queues one (anyone
    # can ask for 402s), and a failing store keeps its batches for the next try, so without a
    # bound a stranger could grow this while the database is unwritable. A flush every 0.25 s
    # never comes near it; when it is reached the oldest records go (see _trim).
    max_pending = 100_000

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        super().__init__(db, path)
        self._secret: bytes | None = None
        self._pending_issued: list[IssuedToken] = []
        self._pending_paid: list[tuple[bytes, float]] = []
        self.dropped = 0  # records dropped at the bound since the store was opened

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
            await self.flush()
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

    def note_issued(self, token: IssuedToken) -> None:
        """Queue a record of an issued token; `flush()` writes it. Never waits."""
        self._live()
        # Reject bad records now: one queued record failing a constraint would block every
        # later flush, since failed batches are kept for the next try.
        _check_id("token_id", token.token_id)
        _check_id("payment_hash", token.payment_hash)
        if token.price_sat < 0:
            raise ValueError("price_sat must be >= 0")
        if len(self._pending_issued) >= self.max_pending:
            self._trim(self._pending_issued, "issued-token")
        self._pending_issued.append(token)

    def note_paid(self, token_id: bytes, when: float) -> None:
        """Queue "first seen paid at `when`"; `flush()` writes it. Never waits."""
        self._live()
        _check_id("token_id", token_id)
        if len(self._pending_paid) >= self.max_pending:
            self._trim(self._pending_paid, "paid-token")
        self._pending_paid.append((token_id, when))

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
            self.path,
            count,
            what,
            self.dropped,
        )

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._pending_issued) + len(self._pending_paid)

    async def flush(self) -> None:
        """Write every queued record in one transaction; on failure keep them and raise."""
        if not self._pending_issued and not self._pending_paid:
            return
        # Take the batch first: notes queued while this flush awaits go into the next one.
        issued, self._pending_issued = self._pending_issued, []
        paid, self._pending_paid = self._pending_paid, []
        try:
            async with self._transaction() as db:
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
                    # min(): whatever order notes arrive in, the earliest sighting is kept.
                    await db.executemany(
                        "UPDATE issued_tokens SET paid_at = min(coalesce(paid_at, :when), :when)"
                        " WHERE token_id = :token_id",
                        [{"when": when, "token_id": token_id} for token_id, when in paid],
                    )
        except BaseException:
            self._pending_issued[:0] = issued
            self._pending_paid[:0] = paid
            # Kept for the next try, within the bound like everything queued.
            if len(self._pending_issued) > self.max_pending:
                self._trim(self._pending_issued, "issued-token")
            if len(self._pending_paid) > self.max_pending:
                self._trim(self._pending_paid, "paid-token")
            raise

    async def revoke(self, ref: str, when: float) -> list[IssuedToken]:
        """Revoke the token `ref` names (token id, payment hash, or a unique prefix of either).

        Revoking a revoked token returns it with its first revoked_at. An unknown full
        64-hex ref is revoked as a token id anyway, since its issuance record may be lost.
        """
        prefix = _normalize_ref(ref)
        await self.flush()  # so a token this process just issued can be found
        low, high = _prefix_range(prefix)
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
            matches = [_token_from_row(row) for row in rows]
            if len(matches) > 1:
                raise StoreError(
                    f"'{ref}' is ambiguous: it matches {len(matches)} issued tokens; "
                    "give more characters"
                )
            if matches:
                token = matches[0]
            elif len(prefix) == 2 * _ID_SIZE:
                token = IssuedToken(
                    token_id=bytes.fromhex(prefix),
                    payment_hash=b"",
                    service="",
                    price_sat=0,
                    created_at=0.0,
                    valid_until=None,
                    recorded=False,
                )
            else:
                raise StoreError(f"no issued token matches '{ref}'")
            row = await self._one(
                "SELECT revoked_at FROM revocations WHERE token_id = ?", (token.token_id,)
            )
            if row is not None:
                return [replace(token, revoked_at=row[0])]
            await db.execute(
                "INSERT INTO revocations (token_id, revoked_at) VALUES (?, ?)",
                (token.token_id, when),
            )
        if not token.recorded:
            log.warning(
                "no issued token matches %s; revoked it as a token id anyway "
                "(if it is a payment hash, this has no effect)",
                prefix,
            )
        return [replace(token, revoked_at=when)]

    async def revocations_since(self, cursor: int) -> tuple[int, set[bytes]]:
        """(new cursor, token ids revoked after `cursor`); start from 0 for all of them."""
        # Sequence numbers are assigned under SQLite's single write lock and become visible
        # at commit, in order, so a reader never sees seq n+1 before seq n.
        rows = await self._read(
            "SELECT seq, token_id FROM revocations WHERE seq > ? ORDER BY seq", (cursor,)
        )
        if not rows:
            return cursor, set()
        return int(rows[-1][0]), {bytes(row[1]) for row in rows}

    async def list_tokens(
        self, *, service: str | None = None, limit: int = 100
    ) -> list[IssuedToken]:
        """Issued tokens, newest first."""
        if limit < 1:
            # StoreError, not ValueError: the CLI passes --limit straight through.
            raise StoreError(f"limit must be at least 1, got {limit}")
        await self.flush()  # include what this process has issued
        where, params = "", list[Any]()
        if service is not None:
            where, params = " WHERE i.service = ?", [service]
        rows = await self._read(
            f"{_TOKEN_SELECT}{where} ORDER BY i.created_at DESC, i.rowid DESC LIMIT ?",
            [*params, limit],
        )
        return [_token_from_row(row) for row in rows]
