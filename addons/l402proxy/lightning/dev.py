"""The embedded dev ledger: a fake Lightning node in one SQLite file, for demos and tests only.

It issues real regtest BOLT11 invoices signed by a persistent local node key and keeps
per-wallet balances, so the server addon, the client addon and the CLI on one machine can
pay each other with no setup. Several processes may open the same file at once: every write
is one `BEGIN IMMEDIATE` transaction and SQLite's file locks (WAL + busy_timeout) order them.
The file is a store/database.py `Database`, like the server stores: private file, WAL, busy
timeout, migrations by user_version.
"""

import asyncio
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import aiosqlite
from coincurve import PrivateKey

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    NodeInfo,
    NothingSent,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    PaymentStatus,
    Wallet,
)
from l402proxy.lightning.bolt11_encoder import encode_invoice
from l402proxy.lightning.common import check_hash
from l402proxy.store.database import BUSY_TIMEOUT_MS, Database, StoreError

T = TypeVar("T")

DEFAULT_SERVER_WALLET: Final = "merchant"
DEFAULT_CLIENT_WALLET: Final = "listener"
# Generous so demos and benchmarks never run dry.
NEW_WALLET_BALANCE_MSAT: Final = 10_000_000_000

CURRENCY: Final = "bcrt"  # regtest: these invoices can never be mistaken for real money
MIN_FINAL_CLTV_EXPIRY: Final = 18
# A BOLT11 tagged field holds at most 1023 five-bit groups = 639 whole bytes.
MAX_MEMO_BYTES: Final = 639
# 21M BTC; also keeps every amount inside SQLite's signed 64-bit integers.
MAX_AMOUNT_MSAT: Final = 21_000_000 * 100_000_000 * 1000
MAX_EXPIRY: Final = 365 * 24 * 3600
# How long a failed open waits for aiosqlite's worker thread to finish.
WORKER_STOP_SECONDS: Final = 5.0

_WALLET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Ordered migrations; migration i brings the schema to user_version i + 1. Append only: ledger
# files of every earlier l402proxy open with these (tests/unit/test_dev_ledger.py keeps a copy
# of version 1 as first released).
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
        """CREATE TABLE IF NOT EXISTS wallets (
            name TEXT PRIMARY KEY,
            balance_msat INTEGER NOT NULL CHECK (balance_msat >= 0),
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS invoices (
            payment_hash BLOB PRIMARY KEY,
            wallet TEXT NOT NULL,
            bolt11 TEXT NOT NULL,
            preimage BLOB NOT NULL,
            amount_msat INTEGER NOT NULL,
            memo TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            settled_at REAL,
            paid_by TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS invoices_by_created ON invoices (created_at)",
        """CREATE TABLE IF NOT EXISTS payments (
            wallet TEXT NOT NULL,
            payment_hash BLOB NOT NULL,
            amount_msat INTEGER,
            fee_msat INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
            preimage BLOB,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (wallet, payment_hash)
        )""",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

# A wallet's first use: its starting balance (wallet, balance, created_at).
_NEW_WALLET: Final = (
    "INSERT OR IGNORE INTO wallets (name, balance_msat, created_at) VALUES (?, ?, ?)"
)

# What list_invoices() shows (plus "settled"); never the preimage.
_LISTED_COLUMNS: Final = (
    "payment_hash", "amount_msat", "memo", "created_at", "expires_at", "bolt11", "wallet",
    "settled_at", "paid_by",
)  # fmt: skip


def check_wallet_name(name: str) -> str:
    """Return `name` if it is a valid dev wallet name, else raise LightningError."""
    if not isinstance(name, str) or not _WALLET_NAME.fullmatch(name):
        raise LightningError(
            f"invalid dev wallet name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return name


def _daemonize(connection: aiosqlite.Connection) -> None:
    # aiosqlite's worker thread is not a daemon: one DevLedger left unclosed (say, held by
    # a failed test's traceback, or a CLI path that forgot close()) would make the
    # interpreter wait forever at exit. SQLite rolls back an unfinished transaction on the
    # next open, so letting the thread die with the process is safe. Private attribute, so
    # guarded: on an aiosqlite without it, we just keep its default.
    thread = getattr(connection, "_thread", None)
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True


async def _worker_stopped(connection: aiosqlite.Connection) -> None:
    # After a failed connect aiosqlite stops its worker thread without waiting for it; the
    # thread's last act is a callback on this loop, which must still be running then (a CLI's
    # asyncio.run would otherwise have closed it: "Event loop is closed" in that thread).
    thread = getattr(connection, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        await asyncio.to_thread(thread.join, WORKER_STOP_SECONDS)
        await asyncio.sleep(0)  # let that last callback run


def _reason(exc: StoreError) -> str:
    """What went wrong, without the store's own "store <path>" wording (our messages name the
    dev ledger and its path themselves)."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause or exc)


class _LedgerClosed(StoreError):
    """The ledger file was closed before this operation took the connection: nothing ran."""


class _LedgerFile(Database):
    """The ledger's SQLite file, on the stores' plumbing (store/database.py)."""

    def migrations(self) -> Sequence[Sequence[str]]:
        return _MIGRATIONS

    @classmethod
    async def _connect(cls, path: Path) -> aiosqlite.Connection:
        connection = aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        _daemonize(connection)
        try:
            return await connection
        except BaseException:
            await _worker_stopped(connection)
            raise

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise BackendUnavailable(
                f"dev ledger {self.path} has schema version {version}; this l402proxy "
                f"knows up to {SCHEMA_VERSION} (upgrade l402proxy)"
            )

    def _live(self) -> aiosqlite.Connection:
        if self._db is None:
            raise _LedgerClosed(f"dev ledger {self.path} is closed")
        return self._db

    async def close(self) -> None:
        # After the running transaction, if any: the base class would close the connection
        # under it, and DevLedger reopens lazily, so close() may come at any time.
        async with self._lock:
            await super().close()


def _check_int(value: int, what: str, low: int, high: int) -> int:
    # bool is an int subclass; True sat is a bug, not a price.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LightningError(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return value


class DevLedger:
    """One SQLite ledger file; one connection per instance, opened lazily."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(Path(path).expanduser())
        # A seam for tests (invoices from the past); everything time-based reads this.
        self._clock = clock
        # One connection shared by every coroutine of this instance (the file's own lock
        # keeps their transactions apart).
        self._file: _LedgerFile | None = None
        self._node_key: PrivateKey | None = None
        self._node_id: str | None = None
        self._open_lock = asyncio.Lock()
        self._known_wallets: set[str] = set()
        self._invoice_queue: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._invoice_writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"DevLedger({self.path!r})"

    @property
    def node_id(self) -> str:
        """The node's compressed public key (hex); the payee of every invoice. Needs open()."""
        if self._node_id is None:
            raise LightningError("dev ledger is not open yet")
        return self._node_id

    def describe(self) -> str:
        node = f", node {self._node_id}" if self._node_id else ""
        return (
            f"DEV LEDGER (fake Lightning for demos and tests only; regtest invoices, no real "
            f"bitcoin): {self.path}{node}"
        )

    async def info(self, wallet: str) -> NodeInfo:
        await self.open()
        return NodeInfo(
            backend="dev",
            address=self.path,
            alias=f"dev wallet {wallet}",
            network="regtest",
            pubkey=self.node_id,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, migrate and load the node key. Calling it again is a no-op."""
        async with self._open_lock:
            if self._file is not None:
                return
            file: _LedgerFile | None = None
            try:
                file = await _LedgerFile.open_path(Path(self.path))
                key = await self._load_node_key(file)
            except BaseException as exc:
                if file is not None:
                    await file.close()
                if isinstance(exc, StoreError):
                    raise BackendUnavailable(
                        f"cannot open dev ledger {self.path}: {_reason(exc)}"
                    ) from None
                raise
            self._file = file
            self._node_key = key
            self._node_id = key.public_key.format(compressed=True).hex()

    async def close(self) -> None:
        """Close the connection (after any running open or transaction); methods reopen lazily."""
        async with self._open_lock:
            file, self._file = self._file, None
            if file is not None:
                await file.close()

    @staticmethod
    async def _load_node_key(file: _LedgerFile) -> PrivateKey:
        # Two processes opening a fresh ledger together must end up with one key: whoever
        # inserts first wins, and both read back the winner.
        async with file._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('node_key', ?)",
                (PrivateKey().secret,),
            )
            rows = await db.execute_fetchall("SELECT value FROM meta WHERE key = 'node_key'")
        return PrivateKey(bytes(next(iter(rows))[0]))

    async def _opened(self) -> _LedgerFile:
        file = self._file
        while file is None:
            await self.open()
            file = self._file  # None again only if close() slipped in between
        return file

    async def _use(self, work: Callable[[_LedgerFile], Awaitable[T]]) -> T:
        """`work` on the open ledger file; a StoreError becomes BackendUnavailable.

        `work` makes ONE _transaction/_read/_statement call: if close() got there first,
        nothing ran, and it runs again on the reopened file.
        """
        while True:
            file = await self._opened()
            try:
                return await work(file)
            except _LedgerClosed:
                continue
            except StoreError as exc:
                raise BackendUnavailable(f"dev ledger {self.path}: {_reason(exc)}") from None

    # -- server side -------------------------------------------------------------------------

    async def create_invoice(
        self,
        wallet: str,
        amount_msat: int,
        memo: str,
        expiry: int,
        *,
        description_hash: bytes | None = None,
    ) -> Invoice:
        """A new regtest invoice payable to `wallet`; with `description_hash` (LNURL-pay) the
        invoice commits to that hash and the memo is kept only in the ledger's listing."""
        check_wallet_name(wallet)
        _check_int(amount_msat, "amount_msat", 1, MAX_AMOUNT_MSAT)
        _check_int(expiry, "expiry", 1, MAX_EXPIRY)
        if not isinstance(memo, str):
            raise LightningError("memo must be a string")
        if len(memo.encode()) > MAX_MEMO_BYTES:
            raise LightningError(f"memo is longer than {MAX_MEMO_BYTES} bytes (UTF-8)")
        await self._opened()  # the node key signs the invoice
        preimage = secrets.token_bytes(32)
        payment_hash = hashlib.sha256(preimage).digest()
        created_at = int(self._clock())
        if description_hash is not None and len(description_hash) != 32:
            raise LightningError("description_hash must be 32 bytes")
        text = self._encode(payment_hash, amount_msat, memo, expiry, created_at, description_hash)
        if wallet not in self._known_wallets:
            # Wallets are never deleted, so once per process is enough.
            await self._use(
                lambda file: file._statement(
                    _NEW_WALLET, (wallet, NEW_WALLET_BALANCE_MSAT, created_at)
                )
            )
            self._known_wallets.add(wallet)
        await self._insert_invoice(
            (payment_hash, wallet, text, preimage, amount_msat, memo, created_at,
             created_at + expiry)
        )  # fmt: skip
        return Invoice(
            bolt11=text,
            payment_hash=payment_hash,
            amount_msat=amount_msat,
            expires_at=float(created_at + expiry),
        )

    async def _insert_invoice(self, row: tuple[Any, ...]) -> None:
        """Insert one invoice row; returns once it is committed.

        Concurrent callers share one trip to the database thread: under load, one round trip
        per invoice behind the lock capped a 402 storm at ~700 invoices/s on two cores.
        """
        done = asyncio.get_running_loop().create_future()
        self._invoice_queue.append((row, done))
        if self._invoice_writer is None or self._invoice_writer.done():
            self._invoice_writer = asyncio.create_task(self._write_invoices())
        await done

    async def _write_invoices(self) -> None:
        while self._invoice_queue:
            batch, self._invoice_queue = self._invoice_queue, []
            rows = [row for row, _ in batch]
            try:
                await self._use(lambda file, rows=rows: self._insert_invoices(file, rows))
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(
                            exc
                            if isinstance(exc, Exception)
                            else LightningError("dev ledger write was interrupted")
                        )
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    @staticmethod
    async def _insert_invoices(file: _LedgerFile, rows: list[tuple[Any, ...]]) -> None:
        # One transaction, one commit for the whole batch.
        async with file._transaction() as db:
            await db.executemany(
                "INSERT INTO invoices (payment_hash, wallet, bolt11, preimage, amount_msat,"
                " memo, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def _encode(
        self,
        payment_hash: bytes,
        amount_msat: int,
        memo: str,
        expiry: int,
        created_at: int,
        description_hash: bytes | None = None,
    ) -> str:
        assert self._node_key is not None and self._node_id is not None
        # The payee field lets decoders verify the signature instead of recovering a key from it.
        return encode_invoice(
            key=self._node_key,
            currency=CURRENCY,
            amount_msat=amount_msat,
            created_at=created_at,
            payment_hash=payment_hash,
            payment_secret=secrets.token_bytes(32),
            description=memo,
            expiry=expiry,
            min_final_cltv_expiry=MIN_FINAL_CLTV_EXPIRY,
            payee=bytes.fromhex(self._node_id),
            description_hash=description_hash,
        )

    async def lookup_invoice(
        self, payment_hash: bytes, *, wallet: str | None = None
    ) -> InvoiceState:
        """State of one invoice; with `wallet`, only that wallet's invoices are visible."""
        payment_hash = check_hash(payment_hash)
        if wallet is not None:
            check_wallet_name(wallet)
        rows = await self._use(
            lambda file: file._read(
                "SELECT wallet, amount_msat, settled_at, preimage FROM invoices"
                " WHERE payment_hash = ?",
                (payment_hash,),
            )
        )
        if not rows or (wallet is not None and rows[0][0] != wallet):
            raise InvoiceNotFound(
                f"no invoice with payment hash {payment_hash.hex()} in dev ledger {self.path}"
            )
        _, amount_msat, settled_at, preimage = rows[0]
        settled = settled_at is not None
        return InvoiceState(
            payment_hash=payment_hash,
            settled=settled,
            preimage=bytes(preimage) if settled else None,
            amount_msat=amount_msat,
        )

    async def list_invoices(
        self, *, wallet: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Invoices, newest first, as JSON-ready dicts (no preimages)."""
        if wallet is not None:
            check_wallet_name(wallet)
        where, params = ("WHERE wallet = ?", [wallet]) if wallet is not None else ("", [])
        columns = ", ".join(_LISTED_COLUMNS)
        sql = f"SELECT {columns} FROM invoices {where} ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(_check_int(limit, "limit", 0, 2**62))
        rows = await self._use(lambda file: file._read(sql, params))
        listed = [dict(zip(_LISTED_COLUMNS, row, strict=True)) for row in rows]
        for item in listed:
            item["payment_hash"] = bytes(item["payment_hash"]).hex()
            item["settled"] = item["settled_at"] is not None
        return listed

    # -- client side -------------------------------------------------------------------------

    async def pay(self, wallet: str, bolt11: str, max_fee_msat: int) -> PaymentResult:
        """Pay `bolt11` from `wallet`: all or nothing, in one transaction. Fee is always 0."""
        check_wallet_name(wallet)
        _check_int(max_fee_msat, "max_fee_msat", 0, 2**63 - 1)
        if not isinstance(bolt11, str):
            raise PaymentFailed("invalid BOLT11 invoice: not a string")
        try:
            info = decode_invoice(bolt11)
        except ValueError as exc:
            raise PaymentFailed(str(exc)) from None
        if info.amount_msat is None:
            raise PaymentFailed(
                "invoice has no amount: the dev ledger never pays amountless invoices"
            )
        try:
            await self._opened()
        except BackendUnavailable as exc:
            # The ledger cannot even be opened: nothing moved.
            raise NothingSent(f"{exc}; nothing was sent") from None
        if info.network != "regtest" or info.payee != self._node_id:
            raise PaymentFailed(
                f"invoice is not from this dev ledger ({self.path}; payee {info.payee}, "
                f"{info.network}): the dev ledger cannot route it"
            )
        text = bolt11.strip().lower().removeprefix("lightning:")
        # Shielded: if the caller is cancelled mid-transaction, the transaction still ends
        # (COMMIT or ROLLBACK) before anyone else uses the shared connection.
        outcome = await asyncio.shield(self._pay_transaction(wallet, info.payment_hash, text))
        if isinstance(outcome, str):
            raise PaymentFailed(outcome)
        return outcome

    async def _pay_transaction(
        self, wallet: str, payment_hash: bytes, text: str
    ) -> PaymentResult | str:
        async def work(file: _LedgerFile) -> PaymentResult | str:
            async with file._transaction() as db:
                now = self._clock()
                outcome = await self._settle(db, wallet, payment_hash, text, now)
                if isinstance(outcome, str):
                    # Keep the failure on record (lookup_payment says "failed", not "unknown");
                    # nothing else changed in this transaction.
                    await self._record_failure(db, wallet, payment_hash, outcome, now)
            return outcome

        return await self._use(work)

    async def _settle(
        self, db: aiosqlite.Connection, wallet: str, payment_hash: bytes, text: str, now: float
    ) -> PaymentResult | str:
        """Inside BEGIN IMMEDIATE: move the money, or return why not."""
        rows = await db.execute_fetchall(
            "SELECT wallet, bolt11, preimage, amount_msat, expires_at, settled_at FROM invoices"
            " WHERE payment_hash = ?",
            (payment_hash,),
        )
        # Same hash but another string (amount, memo...) is not our invoice either.
        if not rows or rows[0][1] != text:
            return f"invoice is not from this dev ledger ({self.path}): it cannot be routed"
        payee, _, preimage, amount_msat, expires_at, settled_at = rows[0]
        if settled_at is not None:
            return "invoice already paid"
        if now >= expires_at:
            return f"invoice expired {int(now - expires_at)} s ago"
        await self._ensure_wallet(db, wallet, now)
        ((balance,),) = await db.execute_fetchall(
            "SELECT balance_msat FROM wallets WHERE name = ?", (wallet,)
        )
        if balance < amount_msat:
            return (
                f"insufficient balance in dev wallet '{wallet}': {balance} msat available, "
                f"{amount_msat} msat needed"
            )
        await db.execute(
            "UPDATE wallets SET balance_msat = balance_msat - ? WHERE name = ?",
            (amount_msat, wallet),
        )
        await self._ensure_wallet(db, payee, now)
        await db.execute(
            "UPDATE wallets SET balance_msat = balance_msat + ? WHERE name = ?",
            (amount_msat, payee),
        )
        cursor = await db.execute(
            "UPDATE invoices SET settled_at = ?, paid_by = ?"
            " WHERE payment_hash = ? AND settled_at IS NULL",
            (now, wallet, payment_hash),
        )
        if cursor.rowcount != 1:  # cannot happen under the write lock; fail closed if it does
            raise BackendUnavailable(f"dev ledger {self.path}: invoice changed during payment")
        await db.execute(
            "INSERT INTO payments (wallet, payment_hash, amount_msat, fee_msat, status, preimage,"
            " error, created_at, updated_at) VALUES (?, ?, ?, 0, 'succeeded', ?, NULL, ?, ?)"
            " ON CONFLICT (wallet, payment_hash) DO UPDATE SET status = 'succeeded',"
            " amount_msat = excluded.amount_msat, preimage = excluded.preimage, error = NULL,"
            " updated_at = excluded.updated_at",
            (wallet, payment_hash, amount_msat, preimage, now, now),
        )
        self._known_wallets.update((wallet, payee))
        return PaymentResult(
            payment_hash=payment_hash,
            preimage=bytes(preimage),
            amount_msat=amount_msat,
            fee_msat=0,
        )

    async def _record_failure(
        self, db: aiosqlite.Connection, wallet: str, payment_hash: bytes, error: str, now: float
    ) -> None:
        # A wallet that already paid this invoice keeps its "succeeded" (and preimage).
        await db.execute(
            "INSERT INTO payments (wallet, payment_hash, fee_msat, status, error, created_at,"
            " updated_at) VALUES (?, ?, 0, 'failed', ?, ?, ?)"
            " ON CONFLICT (wallet, payment_hash) DO UPDATE SET status = 'failed',"
            " error = excluded.error, updated_at = excluded.updated_at"
            " WHERE payments.status != 'succeeded'",
            (wallet, payment_hash, error, now, now),
        )

    async def lookup_payment(self, wallet: str, payment_hash: bytes) -> PaymentState:
        """What happened to `wallet`'s payment of `payment_hash` ("unknown": never attempted)."""
        check_wallet_name(wallet)
        payment_hash = check_hash(payment_hash)
        rows = await self._use(
            lambda file: file._read(
                "SELECT status, preimage, fee_msat FROM payments"
                " WHERE wallet = ? AND payment_hash = ?",
                (wallet, payment_hash),
            )
        )
        if not rows:
            return PaymentState(payment_hash, "unknown", None, 0)
        status, preimage, fee_msat = rows[0]
        return PaymentState(
            payment_hash=payment_hash,
            status=cast(PaymentStatus, status),
            preimage=bytes(preimage) if status == "succeeded" and preimage else None,
            fee_msat=fee_msat,
        )

    async def balance(self, wallet: str) -> int:
        """Balance in msat; a wallet never used yet reports what it will start with."""
        check_wallet_name(wallet)
        rows = await self._use(
            lambda file: file._read("SELECT balance_msat FROM wallets WHERE name = ?", (wallet,))
        )
        return rows[0][0] if rows else NEW_WALLET_BALANCE_MSAT

    async def _ensure_wallet(self, db: aiosqlite.Connection, wallet: str, now: float) -> None:
        await db.execute(_NEW_WALLET, (wallet, NEW_WALLET_BALANCE_MSAT, now))


class DevInvoiceBackend(InvoiceBackend):
    """The server's invoice backend on a dev ledger wallet."""

    name = "dev"

    def __init__(self, ledger: DevLedger, wallet: str = DEFAULT_SERVER_WALLET) -> None:
        self.ledger = ledger
        self.wallet = check_wallet_name(wallet)

    async def start(self) -> None:
        await self.ledger.open()

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        _check_int(amount_sat, "amount_sat", 1, MAX_AMOUNT_MSAT // 1000)
        return await self.ledger.create_invoice(self.wallet, amount_sat * 1000, memo, expiry)

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        return await self.ledger.lookup_invoice(payment_hash, wallet=self.wallet)

    async def info(self) -> NodeInfo:
        return await self.ledger.info(self.wallet)

    async def close(self) -> None:
        await self.ledger.close()

    def describe(self) -> str:
        return f"{self.ledger.describe()}; receiving into wallet '{self.wallet}'"


class DevWallet(Wallet):
    """The client's wallet on a dev ledger."""

    name = "dev"
    # The ledger pays in one transaction inside pay(): nothing carries on once it returns or
    # its process dies, so its lookup is final at once.
    settles_within = 0.0

    def __init__(
        self,
        ledger: DevLedger,
        wallet: str = DEFAULT_CLIENT_WALLET,
        *,
        delay: float = 0.0,
        hold: float = 0.0,
    ) -> None:
        self.ledger = ledger
        self.wallet = check_wallet_name(wallet)
        # A slow node, for crash tests: `hold` seconds before the payment is sent, `delay`
        # seconds between settling and answering.
        self.delay = delay
        self.hold = hold

    async def start(self) -> None:
        await self.ledger.open()

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        if self.hold:
            await asyncio.sleep(self.hold)
        result = await self.ledger.pay(self.wallet, bolt11, max_fee_msat)
        if self.delay:
            await asyncio.sleep(self.delay)
        return result

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        return await self.ledger.lookup_payment(self.wallet, payment_hash)

    async def info(self) -> NodeInfo:
        return await self.ledger.info(self.wallet)

    @property
    def identity(self) -> str:
        return f"dev:{self.wallet}@{self.ledger.path}"

    async def balance(self) -> int:
        return await self.ledger.balance(self.wallet)

    async def close(self) -> None:
        await self.ledger.close()

    def describe(self) -> str:
        slow = f", answering {self.delay:g} s late" if self.delay else ""
        if self.hold:
            slow += f", holding payments {self.hold:g} s"
        return f"{self.ledger.describe()}; paying from wallet '{self.wallet}'{slow}"


__all__ = [
    "DEFAULT_CLIENT_WALLET",
    "DEFAULT_SERVER_WALLET",
    "NEW_WALLET_BALANCE_MSAT",
    "DevInvoiceBackend",
    "DevLedger",
    "DevWallet",
    "check_wallet_name",
]
