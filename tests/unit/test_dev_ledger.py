"""The dev ledger: real regtest invoices, atomic payments, several instances on one file."""

import asyncio
import hashlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bolt11
import pytest
from bolt11 import Bolt11, MilliSatoshi, Tag, TagChar, Tags
from coincurve import PrivateKey

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning import (
    DEFAULT_CLIENT_WALLET,
    DEFAULT_SERVER_WALLET,
    NEW_WALLET_BALANCE_MSAT,
    BackendUnavailable,
    DevInvoiceBackend,
    DevLedger,
    DevWallet,
    InvoiceBackend,
    InvoiceNotFound,
    LightningError,
    PaymentFailed,
    PaymentResult,
    Wallet,
    open_backend,
    open_wallet,
)
from l402proxy.lightning.bolt11_encoder import encode_invoice
from l402proxy.lightning.dev import SCHEMA_VERSION, _LedgerFile
from l402proxy.lightning.uri import SUPPORTED_FORMS
from l402proxy.store.database import BUSY_TIMEOUT_MS

MERCHANT = "merchant"
LISTENER = "listener"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """In a folder that does not exist yet: the ledger makes it (the shared `ledger` fixture,
    tests/backends.py, opens its file here)."""
    return tmp_path / "dev" / "ledger.sqlite"


@pytest.fixture
def path(ledger_path: Path) -> Path:
    return ledger_path


@pytest.fixture
async def other(path: Path) -> AsyncIterator[DevLedger]:
    """A second instance on the same file: what another process would hold."""
    opened = DevLedger(path)
    yield opened
    await opened.close()


def foreign_invoice(*, amount_msat: int | None, currency: str = "bcrt") -> str:
    """A valid invoice signed by some other node."""
    key = PrivateKey()
    tags = Tags(
        [
            Tag(TagChar.payment_hash, os.urandom(32).hex()),
            Tag(TagChar.payment_secret, os.urandom(32).hex()),
            Tag(TagChar.description, "elsewhere"),
            Tag(TagChar.expire_time, 600),
        ]
    )
    invoice = Bolt11(
        currency=currency,
        date=int(time.time()),
        tags=tags,
        amount_msat=MilliSatoshi(amount_msat) if amount_msat is not None else None,
    )
    return bolt11.encode(invoice, key.secret.hex())


def secrets_in(path: Path) -> list[str]:
    """Every secret in the ledger file as hex: the node key and all preimages."""
    with sqlite3.connect(path) as db:
        key = db.execute("SELECT value FROM meta WHERE key = 'node_key'").fetchone()[0]
        preimages = [row[0] for row in db.execute("SELECT preimage FROM invoices")]
    return [bytes(key).hex(), *(bytes(p).hex() for p in preimages)]


# -- invoices --------------------------------------------------------------------------------


async def test_invoice_is_a_real_signed_regtest_invoice(ledger: DevLedger) -> None:
    before = int(time.time())
    invoice = await ledger.create_invoice(MERCHANT, 21_000, "episode 42: ad-free", 600)

    assert invoice.bolt11.startswith("lnbcrt210n1")
    info = decode_invoice(invoice.bolt11)
    assert info.network == "regtest"
    assert info.amount_msat == invoice.amount_msat == 21_000
    assert info.payment_hash == invoice.payment_hash
    assert info.description == "episode 42: ad-free"
    assert info.expiry == 600
    assert before <= info.created_at <= time.time()
    assert invoice.expires_at == info.created_at + 600
    assert info.payee == ledger.node_id

    decoded = bolt11.decode(invoice.bolt11, strict=True)
    assert decoded.signature is not None and decoded.signature.verify(ledger.node_id)
    assert decoded.signature.recover_public_key() == ledger.node_id
    assert decoded.min_final_cltv_expiry == 18
    assert decoded.payment_secret is not None and len(bytes.fromhex(decoded.payment_secret)) == 32
    assert decoded.features is not None
    assert decoded.features.has_feature("payment_secret") == "required"


async def test_tampered_invoice_fails_signature_check(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 1_000, "x", 600)
    decoded = bolt11.decode(invoice.bolt11)
    decoded.tags.get(TagChar.description).data = "y"  # type: ignore[union-attr]
    forged = bolt11.encode(decoded, keep_payee=True)  # old signature, new content
    with pytest.raises(ValueError, match="invalid BOLT11"):
        decode_invoice(forged)


async def test_invoices_have_fresh_preimages_and_sub_sat_amounts(ledger: DevLedger) -> None:
    first = await ledger.create_invoice(MERCHANT, 1, "one msat", 60)
    second = await ledger.create_invoice(MERCHANT, 1, "one msat", 60)
    assert first.payment_hash != second.payment_hash
    assert decode_invoice(first.bolt11).amount_msat == 1


@pytest.mark.parametrize(
    ("amount_msat", "memo", "expiry", "message"),
    [
        (0, "m", 60, "amount_msat"),
        (-5, "m", 60, "amount_msat"),
        (True, "m", 60, "amount_msat"),
        (1000, "m", 0, "expiry"),
        (1000, "é" * 320, 60, "memo is longer than 639 bytes"),
    ],
)
async def test_create_invoice_refuses_bad_input(
    ledger: DevLedger, amount_msat: int, memo: str, expiry: int, message: str
) -> None:
    with pytest.raises(LightningError, match=message):
        await ledger.create_invoice(MERCHANT, amount_msat, memo, expiry)


async def test_longest_memo_fits(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 1000, "a" * 639, 60)
    assert decode_invoice(invoice.bolt11).description == "a" * 639


# -- paying ----------------------------------------------------------------------------------


async def test_pay_reveals_preimage_and_moves_balances_exactly(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 21_000, "episode", 600)
    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT

    result = await ledger.pay(LISTENER, invoice.bolt11, max_fee_msat=0)

    assert hashlib.sha256(result.preimage).digest() == invoice.payment_hash
    assert result.payment_hash == invoice.payment_hash
    assert (result.amount_msat, result.fee_msat) == (21_000, 0)
    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 21_000
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 21_000


async def test_pay_accepts_lightning_prefix_and_upper_case(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 5_000, "x", 600)
    result = await ledger.pay(LISTENER, f" lightning:{invoice.bolt11.upper()}\n", 0)
    assert hashlib.sha256(result.preimage).digest() == invoice.payment_hash


async def test_paying_twice_fails_and_charges_once(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 21_000, "episode", 600)
    await ledger.pay(LISTENER, invoice.bolt11, 0)

    for payer in (LISTENER, "someone-else"):
        with pytest.raises(PaymentFailed, match="invoice already paid"):
            await ledger.pay(payer, invoice.bolt11, 0)

    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 21_000
    assert await ledger.balance("someone-else") == NEW_WALLET_BALANCE_MSAT
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 21_000
    # The payer's record of success survives the failed second attempt.
    state = await ledger.lookup_payment(LISTENER, invoice.payment_hash)
    assert state.status == "succeeded"
    assert (await ledger.lookup_payment("someone-else", invoice.payment_hash)).status == "failed"


async def test_expired_invoice_is_refused(path: Path, ledger: DevLedger) -> None:
    past = DevLedger(path, clock=lambda: time.time() - 3600)
    try:
        invoice = await past.create_invoice(MERCHANT, 21_000, "old", 600)
    finally:
        await past.close()
    assert decode_invoice(invoice.bolt11).is_expired(time.time())

    with pytest.raises(PaymentFailed, match="invoice expired"):
        await ledger.pay(LISTENER, invoice.bolt11, 0)

    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT
    assert not (await ledger.lookup_invoice(invoice.payment_hash)).settled
    assert (await ledger.lookup_payment(LISTENER, invoice.payment_hash)).status == "failed"


async def test_expiry_boundary(path: Path) -> None:
    now = [1_700_000_000.0]
    ledger = DevLedger(path, clock=lambda: now[0])
    try:
        late = await ledger.create_invoice(MERCHANT, 1_000, "late", 60)
        in_time = await ledger.create_invoice(MERCHANT, 1_000, "in time", 60)
        now[0] += 59.9
        await ledger.pay(LISTENER, in_time.bolt11, 0)
        now[0] += 0.1  # exactly created_at + expiry: expired
        with pytest.raises(PaymentFailed, match="expired"):
            await ledger.pay(LISTENER, late.bolt11, 0)
    finally:
        await ledger.close()


async def test_amountless_invoice_is_refused(ledger: DevLedger) -> None:
    with pytest.raises(PaymentFailed, match="no amount"):
        await ledger.pay(LISTENER, foreign_invoice(amount_msat=None), 0)
    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT


@pytest.mark.parametrize("garbage", ["", "hello", "lnbcrt1garbage", "lnbcrt10n1" + "q" * 120])
async def test_garbage_is_refused(ledger: DevLedger, garbage: str) -> None:
    with pytest.raises(PaymentFailed, match="invalid BOLT11"):
        await ledger.pay(LISTENER, garbage, 0)


@pytest.mark.parametrize("currency", ["bcrt", "bc"])
async def test_foreign_invoice_cannot_be_routed(ledger: DevLedger, currency: str) -> None:
    with pytest.raises(PaymentFailed, match="invoice is not from this dev ledger"):
        await ledger.pay(LISTENER, foreign_invoice(amount_msat=1000, currency=currency), 0)
    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT


async def test_invoice_of_another_ledger_cannot_be_routed(
    ledger: DevLedger, tmp_path: Path
) -> None:
    elsewhere = DevLedger(tmp_path / "elsewhere.sqlite")
    try:
        invoice = await elsewhere.create_invoice(MERCHANT, 1000, "x", 600)
    finally:
        await elsewhere.close()
    with pytest.raises(PaymentFailed, match="invoice is not from this dev ledger"):
        await ledger.pay(LISTENER, invoice.bolt11, 0)


async def test_reissued_invoice_with_our_key_but_other_amount_is_refused(
    ledger: DevLedger,
) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 50_000, "x", 600)
    # Same payment hash, signed by the same node, for 1 msat: must not settle the 50 sat one.
    cheap = ledger._encode(invoice.payment_hash, 1, "x", 600, int(time.time()))
    with pytest.raises(PaymentFailed, match="not from this dev ledger"):
        await ledger.pay(LISTENER, cheap, 0)
    assert not (await ledger.lookup_invoice(invoice.payment_hash)).settled


async def test_insufficient_balance_moves_nothing(ledger: DevLedger) -> None:
    too_big = await ledger.create_invoice(MERCHANT, NEW_WALLET_BALANCE_MSAT + 1, "too big", 600)
    with pytest.raises(PaymentFailed, match="insufficient balance"):
        await ledger.pay(LISTENER, too_big.bolt11, 0)

    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT
    assert not (await ledger.lookup_invoice(too_big.payment_hash)).settled
    # Exactly the whole balance is fine.
    exact = await ledger.create_invoice(MERCHANT, NEW_WALLET_BALANCE_MSAT, "all in", 600)
    await ledger.pay(LISTENER, exact.bolt11, 0)
    assert await ledger.balance(LISTENER) == 0


async def test_negative_max_fee_is_refused(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 1000, "x", 600)
    with pytest.raises(LightningError, match="max_fee_msat"):
        await ledger.pay(LISTENER, invoice.bolt11, -1)


async def test_error_messages_and_descriptions_hold_no_secrets(
    path: Path, ledger: DevLedger
) -> None:
    messages = [ledger.describe()]
    invoice = await ledger.create_invoice(MERCHANT, NEW_WALLET_BALANCE_MSAT + 1, "x", 600)
    past = DevLedger(path, clock=lambda: time.time() - 3600)
    expired = await past.create_invoice(MERCHANT, 1000, "x", 60)
    await past.close()
    for bad in (invoice.bolt11, expired.bolt11, foreign_invoice(amount_msat=None), "junk"):
        with pytest.raises(LightningError) as caught:
            await ledger.pay(LISTENER, bad, 0)
        messages.append(str(caught.value))
    messages.append(ledger.describe())
    secrets = secrets_in(path)
    assert len(secrets) == 3
    for message in messages:
        for secret in secrets:
            assert secret not in message.lower()


# -- lookups ---------------------------------------------------------------------------------


async def test_lookup_invoice_states(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 3_000, "x", 600)
    open_state = await ledger.lookup_invoice(invoice.payment_hash)
    assert (open_state.settled, open_state.preimage, open_state.amount_msat) == (False, None, 3000)

    paid = await ledger.pay(LISTENER, invoice.bolt11, 0)
    settled = await ledger.lookup_invoice(invoice.payment_hash)
    assert (settled.settled, settled.preimage) == (True, paid.preimage)

    with pytest.raises(InvoiceNotFound):
        await ledger.lookup_invoice(os.urandom(32))
    with pytest.raises(InvoiceNotFound):
        await ledger.lookup_invoice(invoice.payment_hash, wallet="another-shop")
    with pytest.raises(LightningError, match="32 bytes"):
        await ledger.lookup_invoice(b"short")


async def test_lookup_payment_states(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 3_000, "x", 600)
    unknown = await ledger.lookup_payment(LISTENER, invoice.payment_hash)
    assert (unknown.status, unknown.preimage, unknown.fee_msat) == ("unknown", None, 0)

    paid = await ledger.pay(LISTENER, invoice.bolt11, 0)
    state = await ledger.lookup_payment(LISTENER, invoice.payment_hash)
    assert (state.status, state.preimage, state.fee_msat) == ("succeeded", paid.preimage, 0)
    # Payments are per wallet: another wallet never attempted this one.
    assert (await ledger.lookup_payment("other", invoice.payment_hash)).status == "unknown"


async def test_list_invoices_shape(ledger: DevLedger) -> None:
    assert await ledger.list_invoices() == []
    first = await ledger.create_invoice(MERCHANT, 1_000, "first", 600)
    second = await ledger.create_invoice("shop2", 2_000, "second", 60)
    await ledger.pay(LISTENER, first.bolt11, 0)

    listed = await ledger.list_invoices()
    assert [item["payment_hash"] for item in listed] == [
        second.payment_hash.hex(),
        first.payment_hash.hex(),
    ]
    newest = listed[0]
    assert set(newest) >= {
        "payment_hash", "amount_msat", "settled", "memo", "created_at", "expires_at", "bolt11",
    }  # fmt: skip
    assert "preimage" not in newest
    assert newest["amount_msat"] == 2_000
    assert newest["settled"] is False
    assert newest["memo"] == "second"
    assert newest["bolt11"] == second.bolt11
    assert newest["expires_at"] == newest["created_at"] + 60 == second.expires_at
    assert listed[1]["settled"] is True and listed[1]["paid_by"] == LISTENER
    assert [i["memo"] for i in await ledger.list_invoices(wallet="shop2")] == ["second"]
    assert len(await ledger.list_invoices(limit=1)) == 1


# -- persistence and several instances -------------------------------------------------------


async def test_node_key_persists_and_schema_is_versioned(path: Path) -> None:
    first = DevLedger(path)
    await first.open()
    await first.open()  # idempotent
    node_id = first.node_id
    await first.close()
    await first.open()
    assert first.node_id == node_id
    await first.close()

    second = DevLedger(path)
    invoice = await second.create_invoice(MERCHANT, 1000, "x", 60)  # opens lazily
    assert decode_invoice(invoice.bolt11).payee == node_id
    await second.close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.stat().st_mode & 0o077 == 0


async def test_ledger_file_is_set_up_like_the_stores(ledger: DevLedger) -> None:
    file = await ledger._opened()
    assert await file._read("PRAGMA busy_timeout") == [(BUSY_TIMEOUT_MS,)]
    assert await file._read("PRAGMA journal_mode") == [("wal",)]
    assert await file._read("PRAGMA synchronous") == [(1,)]  # NORMAL


# Schema version 1 exactly as the dev ledger first wrote it (before it stood on
# store/database.py), frozen here: a ledger file from any earlier l402proxy must keep opening.
_V1_SCHEMA = (
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
)


def schema_of(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()


def write_v1_ledger(path: Path, key: PrivateKey) -> tuple[bytes, str]:
    """A ledger file as the old code left it: one invoice of 21 sat paid by LISTENER, one of
    5 sat open. Returns (the paid invoice's hash, the open invoice)."""
    now = int(time.time())
    node = key.public_key.format(compressed=True)
    rows = []
    for amount_msat in (21_000, 5_000):
        preimage = os.urandom(32)
        payment_hash = hashlib.sha256(preimage).digest()
        text = encode_invoice(
            key=key, currency="bcrt", amount_msat=amount_msat, created_at=now,
            payment_hash=payment_hash, payment_secret=os.urandom(32), description="old",
            expiry=600, min_final_cltv_expiry=18, payee=node,
        )  # fmt: skip
        rows.append((payment_hash, MERCHANT, text, preimage, amount_msat, "old", now, now + 600))
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        for statement in _V1_SCHEMA:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO meta VALUES ('node_key', ?)", (key.secret,))
        db.executemany("INSERT INTO invoices VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)", rows)
        paid_hash, _, _, paid_preimage = rows[0][:4]
        db.execute(
            "UPDATE invoices SET settled_at = ?, paid_by = ? WHERE payment_hash = ?",
            (now, LISTENER, paid_hash),
        )
        db.executemany(
            "INSERT INTO wallets VALUES (?, ?, ?)",
            [
                (LISTENER, NEW_WALLET_BALANCE_MSAT - 21_000, now),
                (MERCHANT, NEW_WALLET_BALANCE_MSAT + 21_000, now),
            ],
        )
        db.execute(
            "INSERT INTO payments VALUES (?, ?, 21000, 0, 'succeeded', ?, NULL, ?, ?)",
            (LISTENER, paid_hash, paid_preimage, now, now),
        )
        db.execute("COMMIT")
    path.chmod(0o644)  # the old code made only a file it created private
    return paid_hash, rows[1][2]


async def test_a_ledger_file_of_the_old_code_opens_unchanged(path: Path, tmp_path: Path) -> None:
    key = PrivateKey()
    paid_hash, open_invoice = write_v1_ledger(path, key)
    old_schema = schema_of(path)
    fresh = DevLedger(tmp_path / "fresh.sqlite")
    await fresh.open()
    await fresh.close()
    # The same tables as the old code wrote, so nothing needs migrating.
    assert schema_of(tmp_path / "fresh.sqlite") == old_schema

    ledger = DevLedger(path)
    try:
        await ledger.open()
        assert ledger.node_id == key.public_key.format(compressed=True).hex()
        paid = await ledger.lookup_invoice(paid_hash, wallet=MERCHANT)
        assert paid.settled and paid.preimage is not None
        assert hashlib.sha256(paid.preimage).digest() == paid_hash
        state = await ledger.lookup_payment(LISTENER, paid_hash)
        assert (state.status, state.preimage) == ("succeeded", paid.preimage)
        assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 21_000

        await ledger.pay(LISTENER, open_invoice, 0)

        assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 26_000
        assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 26_000
        listed = await ledger.list_invoices()
        assert [(i["settled"], i["paid_by"]) for i in listed] == [(True, LISTENER)] * 2
    finally:
        await ledger.close()
    assert schema_of(path) == old_schema
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1 == SCHEMA_VERSION
    assert path.stat().st_mode & 0o077 == 0  # it holds the node key: now private like the stores


async def test_newer_schema_is_refused(path: Path) -> None:
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(BackendUnavailable, match="schema version"):
        await DevLedger(path).open()


async def test_unopenable_file_is_backend_unavailable(tmp_path: Path) -> None:
    not_a_db = tmp_path / "junk.sqlite"
    not_a_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BackendUnavailable, match="cannot open dev ledger"):
        await DevLedger(not_a_db).open()


async def test_fresh_file_opened_together_gets_one_key(tmp_path: Path) -> None:
    # Racy by nature: enough rounds that a lost race (two keys, or "database is locked")
    # shows up reliably.
    for attempt in range(15):
        ledgers = [DevLedger(tmp_path / f"race{attempt}.sqlite") for _ in range(4)]
        try:
            await asyncio.gather(*(ledger.open() for ledger in ledgers))
            assert len({ledger.node_id for ledger in ledgers}) == 1
        finally:
            await asyncio.gather(*(ledger.close() for ledger in ledgers))


async def test_two_instances_share_state(ledger: DevLedger, other: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 7_000, "x", 600)
    await other.open()
    assert other.node_id == ledger.node_id

    paid = await other.pay(LISTENER, invoice.bolt11, 0)

    assert (await ledger.lookup_invoice(invoice.payment_hash)).preimage == paid.preimage
    assert (await ledger.lookup_payment(LISTENER, invoice.payment_hash)).status == "succeeded"
    for view in (ledger, other):
        assert await view.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 7_000
        assert await view.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - 7_000
    with pytest.raises(PaymentFailed, match="already paid"):
        await ledger.pay(LISTENER, invoice.bolt11, 0)


async def test_concurrent_pay_from_two_instances_exactly_one_wins(
    ledger: DevLedger, other: DevLedger
) -> None:
    for _ in range(10):
        invoice = await ledger.create_invoice(MERCHANT, 1_000, "race", 600)
        outcomes = await asyncio.gather(
            ledger.pay("alice", invoice.bolt11, 0),
            other.pay("bob", invoice.bolt11, 0),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1, outcomes
        assert isinstance(losers[0], PaymentFailed) and "already paid" in str(losers[0])
    spent = (
        (2 * NEW_WALLET_BALANCE_MSAT) - await ledger.balance("alice") - await other.balance("bob")
    )
    assert spent == 10 * 1_000
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 10 * 1_000


async def test_many_concurrent_operations_on_one_instance(ledger: DevLedger) -> None:
    invoices = await asyncio.gather(
        *(ledger.create_invoice(MERCHANT, 1_000 + i, f"n{i}", 600) for i in range(20))
    )
    results = await asyncio.gather(
        *(ledger.pay(f"payer{i % 3}", inv.bolt11, 0) for i, inv in enumerate(invoices)),
        *(ledger.create_invoice(MERCHANT, 5, "meanwhile", 600) for _ in range(5)),
    )
    total = sum(1_000 + i for i in range(20))
    assert sum(r.amount_msat for r in results[:20]) == total  # type: ignore[union-attr]
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + total
    assert len(await ledger.list_invoices()) == 25


async def test_close_amid_operations_loses_none(ledger: DevLedger) -> None:
    # close() may come at any time (each backend and wallet closes its ledger): what runs
    # finishes first, what comes after reopens the file.
    invoices = [await ledger.create_invoice(MERCHANT, 1_000, f"n{i}", 600) for i in range(6)]
    work = [ledger.pay(LISTENER, invoice.bolt11, 0) for invoice in invoices]
    closes = [ledger.close() for _ in range(3)]
    results = await asyncio.gather(
        work[0], closes[0], work[1], work[2], closes[1], work[3], ledger.balance(MERCHANT),
        closes[2], work[4], work[5], ledger.create_invoice(MERCHANT, 7, "after", 600),
    )  # fmt: skip
    assert sum(r.amount_msat for r in results if isinstance(r, PaymentResult)) == 6_000
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 6_000
    assert len(await ledger.list_invoices()) == 7


async def test_an_operation_overtaken_by_close_runs_on_the_reopened_file(
    ledger: DevLedger,
) -> None:
    await ledger.open()
    taken: list[_LedgerFile] = []

    async def work(file: _LedgerFile) -> list[Any]:
        taken.append(file)
        if len(taken) == 1:
            await ledger.close()  # slips in after the operation took the file, before it ran
        return await file._read("SELECT count(*) FROM wallets")

    assert await ledger._use(work) == [(0,)]
    assert len(taken) == 2 and taken[0] is not taken[1]


async def test_cancelled_pay_leaves_ledger_consistent(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 4_000, "x", 600)
    task = asyncio.create_task(ledger.pay(LISTENER, invoice.bolt11, 0))
    for _ in range(3):  # let it get into the transaction
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises((asyncio.CancelledError, PaymentFailed)):
        await task
    # The connection is usable and the books balance whichever way it went.
    await ledger.create_invoice(MERCHANT, 1, "after", 600)
    settled = (await ledger.lookup_invoice(invoice.payment_hash)).settled
    state = await ledger.lookup_payment(LISTENER, invoice.payment_hash)
    assert state.status == ("succeeded" if settled else "unknown")
    moved = 4_000 if settled else 0
    assert await ledger.balance(LISTENER) == NEW_WALLET_BALANCE_MSAT - moved


_CHILD = """
import asyncio, sys, time
from l402proxy.lightning import DevLedger, PaymentFailed

async def main(path, wallet, bolt11, start_at):
    ledger = DevLedger(path)
    await ledger.open()
    time.sleep(max(0.0, start_at - time.time()))  # line both processes up
    try:
        await ledger.pay(wallet, bolt11, 0)
        print("paid")
    except PaymentFailed as exc:
        print("failed:", exc)
    finally:
        await ledger.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


async def test_concurrent_pay_from_two_processes_exactly_one_wins(
    path: Path, ledger: DevLedger
) -> None:
    invoice = await ledger.create_invoice(MERCHANT, 2_100, "race", 600)
    start_at = str(time.time() + 0.5)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, str(path), wallet, invoice.bolt11, start_at,
            stdout=asyncio.subprocess.PIPE,
        )
        for wallet in ("alice", "bob")
    ]  # fmt: skip
    outputs = [(await child.communicate())[0].decode().strip() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert sorted(outputs) == ["failed: invoice already paid", "paid"], outputs
    winner = ("alice", "bob")[outputs.index("paid")]
    assert (await ledger.lookup_payment(winner, invoice.payment_hash)).status == "succeeded"
    assert await ledger.balance(winner) == NEW_WALLET_BALANCE_MSAT - 2_100
    assert await ledger.balance(MERCHANT) == NEW_WALLET_BALANCE_MSAT + 2_100


_LEAKER = """
import asyncio, sys
from l402proxy.lightning import DevLedger

leaked = []

async def main(path):
    leaked.append(DevLedger(path))
    await leaked[0].create_invoice("merchant", 1000, "never closed", 60)

asyncio.run(main(sys.argv[1]))
"""


async def test_unclosed_ledger_does_not_block_interpreter_exit(path: Path) -> None:
    # A forgotten close() (or a failed test holding the ledger) must not hang the process.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _LEAKER, str(path))
    try:
        assert await asyncio.wait_for(child.wait(), timeout=10) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


# -- backend / wallet wrappers and URIs ------------------------------------------------------


async def test_open_backend_and_wallet_are_lazy_and_say_what_they_are(path: Path) -> None:
    backend = open_backend("dev", dev_ledger=str(path))
    wallet = open_wallet("dev", dev_ledger=str(path))
    assert isinstance(backend, DevInvoiceBackend) and isinstance(backend, InvoiceBackend)
    assert isinstance(wallet, DevWallet) and isinstance(wallet, Wallet)
    assert (backend.wallet, wallet.wallet) == (DEFAULT_SERVER_WALLET, DEFAULT_CLIENT_WALLET)
    assert not path.exists()  # opening is lazy
    try:
        for described in (backend.describe(), wallet.describe()):
            assert "demos and tests only" in described and str(path) in described
    finally:
        await backend.close()
        await wallet.close()


async def test_named_dev_wallets(path: Path) -> None:
    backend = open_backend("dev:shop.2", dev_ledger=str(path))
    wallet = open_wallet("DEV:fan_1", dev_ledger=str(path))
    assert (backend.wallet, wallet.wallet) == ("shop.2", "fan_1")  # type: ignore[attr-defined]
    try:
        invoice = await backend.create_invoice(1, "x", 60)
        await wallet.pay(invoice.bolt11, 0)
        assert await wallet.balance() == NEW_WALLET_BALANCE_MSAT - 1000  # type: ignore[attr-defined]
        with pytest.raises(InvoiceNotFound):  # a backend sees only its own wallet's invoices
            await open_backend("dev", dev_ledger=str(path)).lookup_invoice(invoice.payment_hash)
    finally:
        await backend.close()
        await wallet.close()


@pytest.mark.parametrize(
    ("uri", "scheme"),
    [
        ("btcpay://h?key=secret", "unsupported backend URI 'btcpay'"),
        ("https://h/?key=secret", "unsupported backend URI 'https'"),
        ("nonsense", "unsupported backend URI 'nonsense'"),
        ("", "empty backend URI"),
    ],
)
def test_unsupported_uri_schemes(uri: str, scheme: str, path: Path) -> None:
    expected = f"{scheme}; use one of: {SUPPORTED_FORMS}"
    for opener in (open_backend, open_wallet):
        with pytest.raises(LightningError) as caught:
            opener(uri, dev_ledger=str(path))
        assert str(caught.value) == expected


@pytest.mark.parametrize("uri", ["dev:", "dev:a b", "dev://x", "dev:" + "a" * 65, "dev:ü"])
def test_bad_dev_wallet_names(uri: str, path: Path) -> None:
    for opener in (open_backend, open_wallet):
        with pytest.raises(LightningError, match="wallet"):
            opener(uri, dev_ledger=str(path))


async def test_ledger_methods_check_wallet_names(ledger: DevLedger) -> None:
    with pytest.raises(LightningError, match="invalid dev wallet name"):
        await ledger.create_invoice("no spaces", 1000, "x", 60)
    with pytest.raises(LightningError, match="invalid dev wallet name"):
        await ledger.balance("")
    assert await ledger.balance("A-z_0.9" + "x" * 57) == NEW_WALLET_BALANCE_MSAT


async def test_concurrent_invoices_share_writes_and_are_committed_on_return(
    ledger: DevLedger, tmp_path: Path
) -> None:
    writes = 0
    original = ledger._write_invoices

    async def counting() -> None:
        nonlocal writes
        writes += 1
        await original()

    ledger._write_invoices = counting  # type: ignore[method-assign]
    invoices = await asyncio.gather(
        *(ledger.create_invoice("merchant", 1000 * (i + 1), f"n{i}", 600) for i in range(64))
    )
    assert 1 <= writes < 64
    other = DevLedger(ledger.path)
    try:
        listed = {entry["payment_hash"] for entry in await other.list_invoices()}
        assert {invoice.payment_hash.hex() for invoice in invoices} <= listed
        paid = await other.pay("listener", invoices[-1].bolt11, 0)
        assert paid.amount_msat == 64_000
    finally:
        await other.close()


async def test_a_failed_invoice_write_fails_every_waiting_caller(ledger: DevLedger) -> None:
    await ledger.create_invoice("merchant", 1000, "warm up", 600)
    file = await ledger._opened()
    await file._statement("DROP TABLE invoices")
    results = await asyncio.gather(
        *(ledger.create_invoice("merchant", 1000, "x", 600) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, LightningError) for r in results), results
