"""The client store: the payment ledger (also the token store), budgets, learned paths, refusals."""

import asyncio
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from l402proxy.store.client import (
    DAY_SECONDS,
    MIGRATIONS,
    BudgetRefusal,
    ClientStore,
    NewPayment,
    Payment,
)
from l402proxy.store.database import StoreError

NOW = 1_700_000_000.0
HOUR = 3600.0
ORIGIN = "http://127.0.0.1:8081"
SCOPE = "services:podcast"
NO_CAP = 10**15  # msat: a budget nothing in these tests reaches


def new_payment(
    *,
    amount_msat: int = 21_000,
    fee_limit_msat: int = 10_000,
    origin: str = ORIGIN,
    scope: str | None = None,
    services: tuple[str, ...] = ("podcast",),
    url: str = ORIGIN + "/bonus/ep1.mp3",
    valid_until: float | None = None,
    owner: str = "",
) -> tuple[NewPayment, bytes]:
    """A payment to reserve, and the preimage that settles it.

    Each gets a scope of its own unless one is given: a scope with a payment pending or a
    usable token takes no second payment (tested on its own below).
    """
    preimage = os.urandom(32)
    payment_hash = hashlib.sha256(preimage).digest()
    payment = NewPayment(
        payment_hash=payment_hash,
        origin=origin,
        url=url,
        scope=scope or f"services:podcast-{payment_hash.hex()[:8]}",
        services=services,
        scheme="L402",
        macaroon="AgEEbHNhdA==",
        bolt11="lnbcrt210n1fake",
        amount_msat=amount_msat,
        fee_limit_msat=fee_limit_msat,
        valid_until=valid_until,
        wallet="dev",
        owner=owner,
    )
    return payment, preimage


async def reserve(
    store: ClientStore,
    payment: NewPayment,
    *,
    now: float = NOW,
    daily: int = NO_CAP,
    total: int | None = None,
) -> Payment | BudgetRefusal:
    return await store.reserve(payment, budget_daily_msat=daily, budget_total_msat=total, now=now)


async def paid(
    store: ClientStore, *, now: float = NOW, fee_msat: int = 0, **kwargs: object
) -> Payment:
    """A settled payment (a usable token unless dropped or expired)."""
    payment, preimage = new_payment(**kwargs)  # type: ignore[arg-type]
    assert isinstance(await reserve(store, payment, now=now), Payment)
    return await store.settle(payment.payment_hash, preimage, fee_msat, now)


async def token_for_scope(
    store: ClientStore, origin: str, scope: str, now: float
) -> Payment | None:
    """The token the payer would use for a scope: the newest usable one (tokens() is oldest
    first)."""
    held = [t for t in await store.tokens(now) if (t.origin, t.scope) == (origin, scope)]
    return held[-1] if held else None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "client.sqlite"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[ClientStore]:
    opened = await ClientStore.open(str(db_path))
    yield opened
    await opened.close()


@pytest.fixture
async def other(db_path: Path, store: ClientStore) -> AsyncIterator[ClientStore]:
    """A second instance on the same file: the SDK or a second proxy."""
    opened = await ClientStore.open(str(db_path))
    yield opened
    await opened.close()


# --- reserve --------------------------------------------------------------------------------


async def test_reserve_writes_a_pending_row(store: ClientStore) -> None:
    payment, _ = new_payment(valid_until=NOW + 60, scope=SCOPE)
    reserved = await reserve(store, payment)
    assert isinstance(reserved, Payment)
    assert reserved.status == "pending"
    assert (reserved.preimage, reserved.fee_msat, reserved.dropped_at) == (None, None, None)
    assert (reserved.created_at, reserved.updated_at) == (NOW, NOW)
    assert reserved.payment_hash == payment.payment_hash
    assert (reserved.origin, reserved.scope, reserved.services) == (ORIGIN, SCOPE, ("podcast",))
    assert (reserved.amount_msat, reserved.fee_limit_msat) == (21_000, 10_000)
    assert (reserved.valid_until, reserved.wallet, reserved.scheme) == (NOW + 60, "dev", "L402")
    assert await store.payment(payment.payment_hash) == reserved
    assert await store.pending() == [reserved]
    assert not reserved.usable(NOW)


async def test_a_payment_hash_is_never_reserved_twice(store: ClientStore) -> None:
    payment, _ = new_payment()
    assert isinstance(await reserve(store, payment), Payment)
    with pytest.raises(StoreError, match="never paid twice"):
        await reserve(store, payment, now=NOW + 1)
    await store.fail(payment.payment_hash, "no route", NOW + 2)
    with pytest.raises(StoreError, match=r"already in the ledger \(failed\)"):
        await reserve(store, payment, now=NOW + 3)
    assert len(await store.history()) == 1


async def test_services_round_trip_including_none(store: ClientStore) -> None:
    several, _ = new_payment(services=("a", "b"), scope="services:a,b")
    none, _ = new_payment(services=(), scope="path:/bonus/")
    assert isinstance(await reserve(store, several), Payment)
    assert isinstance(await reserve(store, none), Payment)
    assert (await store.payment(several.payment_hash)).services == ("a", "b")  # type: ignore[union-attr]
    assert (await store.payment(none.payment_hash)).services == ()  # type: ignore[union-attr]


# --- budgets --------------------------------------------------------------------------------


async def test_daily_budget_is_a_rolling_24_hours(store: ClientStore) -> None:
    old, _ = new_payment(amount_msat=50_000, fee_limit_msat=10_000)
    assert isinstance(await reserve(store, old, now=NOW - 25 * HOUR, daily=100_000), Payment)
    recent, _ = new_payment(amount_msat=50_000, fee_limit_msat=10_000)
    # 25 h later the old 60 sat no longer count: 60 sat fit in 100.
    assert isinstance(await reserve(store, recent, now=NOW, daily=100_000), Payment)
    # 23 h after `recent`, it still counts: 60 + 60 > 100.
    later, _ = new_payment(amount_msat=50_000, fee_limit_msat=10_000)
    refused = await reserve(store, later, now=NOW + 23 * HOUR, daily=100_000)
    assert isinstance(refused, BudgetRefusal) and refused.code == "budget_daily"
    # Once `recent` is 24 h old it drops out of the window.
    assert isinstance(await reserve(store, later, now=NOW + DAY_SECONDS, daily=100_000), Payment)


async def test_pending_counts_with_its_fee_limit_up_to_the_exact_budget(store: ClientStore) -> None:
    first, _ = new_payment(amount_msat=50_000, fee_limit_msat=10_000)
    assert isinstance(await reserve(store, first, daily=100_000), Payment)
    exact, _ = new_payment(amount_msat=30_000, fee_limit_msat=10_000)
    assert isinstance(await reserve(store, exact, daily=100_000), Payment)  # 60 + 40 = 100
    one_more, _ = new_payment(amount_msat=1, fee_limit_msat=0)
    refused = await reserve(store, one_more, daily=100_000)
    assert isinstance(refused, BudgetRefusal) and refused.code == "budget_daily"
    assert len(await store.pending()) == 2  # a refusal writes no row


async def test_failed_payments_do_not_count(store: ClientStore) -> None:
    first, _ = new_payment(amount_msat=90_000, fee_limit_msat=10_000)
    assert isinstance(await reserve(store, first, daily=100_000, total=100_000), Payment)
    second, _ = new_payment(amount_msat=90_000, fee_limit_msat=10_000)
    assert isinstance(await reserve(store, second, daily=100_000), BudgetRefusal)
    await store.fail(first.payment_hash, "no route", NOW)
    assert isinstance(await reserve(store, second, daily=100_000, total=100_000), Payment)


async def test_paid_counts_with_its_actual_fee(store: ClientStore) -> None:
    first, preimage = new_payment(amount_msat=50_000, fee_limit_msat=40_000)
    assert isinstance(await reserve(store, first, daily=100_000), Payment)
    await store.settle(first.payment_hash, preimage, 5_000, NOW)  # 55 sat, not 90
    fits, _ = new_payment(amount_msat=45_000, fee_limit_msat=0)
    assert isinstance(await reserve(store, fits, daily=100_000), Payment)
    over, _ = new_payment(amount_msat=1, fee_limit_msat=0)
    assert isinstance(await reserve(store, over, daily=100_000), BudgetRefusal)
    assert await store.spent_msat() == 100_000
    assert await store.spent_msat(since=NOW - 1) == 100_000
    assert await store.spent_msat(since=NOW) == 0  # created_at > since


async def test_total_budget_counts_every_day_and_none_means_no_cap(store: ClientStore) -> None:
    old, preimage = new_payment(amount_msat=50_000, fee_limit_msat=0)
    assert isinstance(await reserve(store, old, now=NOW - 48 * HOUR, total=100_000), Payment)
    await store.settle(old.payment_hash, preimage, 0, NOW - 48 * HOUR)
    fits, _ = new_payment(amount_msat=50_000, fee_limit_msat=0)
    assert isinstance(await reserve(store, fits, total=100_000), Payment)
    over, _ = new_payment(amount_msat=1, fee_limit_msat=0)
    refused = await reserve(store, over, total=100_000)
    assert isinstance(refused, BudgetRefusal) and refused.code == "budget_total"
    assert isinstance(await reserve(store, over, total=None), Payment)


async def test_refusal_messages_name_the_option_and_the_amounts(store: ClientStore) -> None:
    spent, _ = new_payment(amount_msat=20_000, fee_limit_msat=0)
    assert isinstance(await reserve(store, spent), Payment)
    payment, _ = new_payment(amount_msat=21_500, fee_limit_msat=10_000)
    daily = await reserve(store, payment, daily=30_000)
    assert daily == BudgetRefusal(
        "budget_daily",
        "paying 21.5 sat (+ up to 10 sat fee) would exceed l402_budget_daily_sat 30 sat: "
        "20 sat spent in the last 24 hours",
    )
    total = await reserve(store, payment, total=40_000)
    assert total == BudgetRefusal(
        "budget_total",
        "paying 21.5 sat (+ up to 10 sat fee) would exceed l402_budget_total_sat 40 sat: "
        "20 sat spent so far",
    )


async def test_daily_budget_is_checked_before_the_total(store: ClientStore) -> None:
    payment, _ = new_payment(amount_msat=21_000, fee_limit_msat=0)
    refused = await reserve(store, payment, daily=1_000, total=1_000)
    assert isinstance(refused, BudgetRefusal) and refused.code == "budget_daily"


# --- settle, fail, drop ---------------------------------------------------------------------


async def test_settle_turns_pending_into_a_token(store: ClientStore) -> None:
    payment, preimage = new_payment()
    await reserve(store, payment)
    await store.note_error(payment.payment_hash, "slow node", NOW + 1)
    done = await store.settle(payment.payment_hash, preimage, 7, NOW + 5)
    assert (done.status, done.preimage, done.fee_msat) == ("paid", preimage, 7)
    assert (done.error, done.created_at, done.updated_at) == (None, NOW, NOW + 5)
    assert done.usable(NOW + 5)
    assert await store.pending() == []


async def test_settle_also_from_failed_a_late_success(store: ClientStore) -> None:
    payment, preimage = new_payment()
    await reserve(store, payment)
    await store.fail(payment.payment_hash, "timed out", NOW + 1)
    assert (await store.payment(payment.payment_hash)).status == "failed"  # type: ignore[union-attr]
    done = await store.settle(payment.payment_hash, preimage, 0, NOW + 2)
    assert (done.status, done.preimage, done.error) == ("paid", preimage, None)


async def test_settle_never_rewrites_a_paid_row(store: ClientStore) -> None:
    payment, preimage = new_payment()
    await reserve(store, payment)
    await store.settle(payment.payment_hash, preimage, 1, NOW + 1)
    again = await store.settle(payment.payment_hash, os.urandom(32), 99, NOW + 2)
    assert (again.preimage, again.fee_msat, again.updated_at) == (preimage, 1, NOW + 1)


async def test_settle_unknown_hash_raises(store: ClientStore) -> None:
    with pytest.raises(StoreError, match="no payment"):
        await store.settle(os.urandom(32), os.urandom(32), 0, NOW)


async def test_fail_only_moves_pending(store: ClientStore) -> None:
    pending, _ = new_payment()
    await reserve(store, pending)
    await store.fail(pending.payment_hash, "no route", NOW + 1)
    failed = await store.payment(pending.payment_hash)
    assert failed is not None
    assert (failed.status, failed.error, failed.updated_at) == ("failed", "no route", NOW + 1)

    token = await paid(store)
    await store.fail(token.payment_hash, "late failure report", NOW + 2)
    still = await store.payment(token.payment_hash)
    assert still is not None and (still.status, still.error) == ("paid", None)
    assert still.preimage == token.preimage


async def test_drop_removes_a_token_once(store: ClientStore) -> None:
    token = await paid(store)
    await store.drop(token.payment_hash, "401", NOW + 10)
    dropped = await store.payment(token.payment_hash)
    assert dropped is not None and dropped.dropped_at == NOW + 10
    assert not dropped.usable(NOW + 10)
    await store.drop(token.payment_hash, "again", NOW + 20)
    assert (await store.payment(token.payment_hash)).dropped_at == NOW + 10  # type: ignore[union-attr]
    assert await store.tokens(NOW + 30) == []


# --- tokens and scopes ------------------------------------------------------------------------


async def test_tokens_are_the_usable_paid_rows_oldest_first(store: ClientStore) -> None:
    forever = await paid(store, scope="services:a", services=("a",))
    dropped = await paid(store, scope="services:b", services=("b",))
    await store.drop(dropped.payment_hash, "refused", NOW)
    await paid(store, scope="services:c", services=("c",), valid_until=NOW + 100)  # expires
    pending, _ = new_payment(scope="services:d", services=("d",))
    await reserve(store, pending)
    failed, _ = new_payment(scope="services:e", services=("e",))
    await reserve(store, failed)
    await store.fail(failed.payment_hash, "no route", NOW)
    timed = await paid(store, scope="services:f", services=("f",), valid_until=NOW + 200)

    assert [t.scope for t in await store.tokens(NOW + 50)] == [
        "services:a",
        "services:c",
        "services:f",
    ]
    # valid_until is exclusive: at that second the token is expired.
    assert [t.payment_hash for t in await store.tokens(NOW + 100)] == [
        forever.payment_hash,
        timed.payment_hash,
    ]
    assert all(t.preimage is not None for t in await store.tokens(NOW))


async def test_token_for_scope_is_the_newest_usable_one(store: ClientStore) -> None:
    older = await paid(store, now=NOW, scope=SCOPE)
    await store.drop(older.payment_hash, "refused", NOW + 1)
    newer = await paid(store, now=NOW + 1, scope=SCOPE)
    await paid(store, scope="services:other", services=("other",))
    await paid(store, origin="http://127.0.0.1:9999", scope=SCOPE)
    found = await token_for_scope(store, ORIGIN, SCOPE, NOW + 2)
    assert found is not None and found.payment_hash == newer.payment_hash
    await store.drop(newer.payment_hash, "refused", NOW + 3)
    assert await token_for_scope(store, ORIGIN, SCOPE, NOW + 3) is None  # dropped stay dropped
    assert await token_for_scope(store, ORIGIN, "services:nothing", NOW) is None
    assert await token_for_scope(store, "http://127.0.0.1:1", SCOPE, NOW) is None


async def test_token_for_scope_skips_expired_and_pending(store: ClientStore) -> None:
    await paid(store, valid_until=NOW + 10, scope=SCOPE)
    pending, _ = new_payment(scope=SCOPE)
    assert isinstance(await reserve(store, pending, now=NOW + 11), Payment)  # the token expired
    assert await token_for_scope(store, ORIGIN, SCOPE, NOW + 9) is not None
    assert await token_for_scope(store, ORIGIN, SCOPE, NOW + 10) is None


async def test_a_scope_with_a_usable_token_is_not_paid_again(store: ClientStore) -> None:
    held = await paid(store, scope=SCOPE)
    again, _ = new_payment(scope=SCOPE)
    assert await reserve(store, again, now=NOW + 1) == held  # that token, not a new payment
    assert await store.payment(again.payment_hash) is None


async def test_a_scope_with_a_payment_pending_takes_no_second_one(store: ClientStore) -> None:
    first, _ = new_payment(scope=SCOPE, owner="123:abc")
    pending = await reserve(store, first)
    second, _ = new_payment(scope=SCOPE)
    refusal = await reserve(store, second, now=NOW + 1)
    assert isinstance(refusal, BudgetRefusal) and refusal.code == "payment_pending"
    assert refusal.pending == pending and refusal.pending.owner == "123:abc"
    assert "still pending" in refusal.message
    await store.fail(first.payment_hash, "no route", NOW + 2)
    assert isinstance(await reserve(store, second, now=NOW + 3), Payment)


async def test_learn_path_upserts(store: ClientStore) -> None:
    await store.learn_path(ORIGIN, "/bonus/", "services:a", NOW)
    await store.learn_path(ORIGIN, "/episodes/", "services:a", NOW + 1)
    await store.learn_path(ORIGIN, "/bonus/", "services:b", NOW + 2)
    await store.learn_path("http://127.0.0.1:1", "/bonus/", "services:c", NOW + 3)
    assert await store.learned_paths() == [
        (ORIGIN, "/episodes/", "services:a"),
        (ORIGIN, "/bonus/", "services:b"),
        ("http://127.0.0.1:1", "/bonus/", "services:c"),
    ]


# --- history ----------------------------------------------------------------------------------


async def test_history_is_newest_first_with_every_field(store: ClientStore) -> None:
    token = await paid(
        store, now=NOW - 30, fee_msat=1_500, url=ORIGIN + "/bonus/a", services=("a", "b")
    )
    await store.drop(token.payment_hash, "refused", NOW - 25)
    refused_hash = os.urandom(32)
    await store.refuse(
        origin=ORIGIN,
        url=ORIGIN + "/bonus/b",
        service="podcast",
        reason="max_price",
        message="too dear",
        amount_msat=150_000,
        payment_hash=refused_hash,
        now=NOW - 20,
    )
    pending, _ = new_payment(amount_msat=1_500, url=ORIGIN + "/bonus/c")
    await reserve(store, pending, now=NOW - 10)
    await store.note_error(pending.payment_hash, "node unreachable", NOW - 9)
    failed, _ = new_payment(services=(), scope="path:/x/", url=ORIGIN + "/x/d")
    await reserve(store, failed, now=NOW - 5)
    await store.fail(failed.payment_hash, "no route", NOW - 4)
    await store.refuse(
        origin="http://example.com:80",
        url="http://example.com:80/e",
        service=None,
        reason="not_allowed",
        message="example.com:80 is not in l402_allow",
        amount_msat=None,
        payment_hash=None,
        now=NOW - 1,
    )

    events = await store.history()
    assert [e["event"] for e in events] == ["refused", "failed", "pending", "refused", "paid"]
    assert [e["when"] for e in events] == [NOW - 1, NOW - 5, NOW - 10, NOW - 20, NOW - 30]
    assert events[0] == {
        "when": NOW - 1,
        "event": "refused",
        "origin": "http://example.com:80",
        "url": "http://example.com:80/e",
        "service": None,
        "amount_sat": None,
        "fee_sat": None,
        "payment_hash": None,
        "reason": "not_allowed",
        "message": "example.com:80 is not in l402_allow",
        "settled_at": None,
        "dropped_at": None,
    }
    failed_event, pending_event, refusal, paid_event = events[1:]
    assert failed_event["service"] is None and failed_event["message"] == "no route"
    assert failed_event["fee_sat"] is None and failed_event["reason"] is None
    assert pending_event["amount_sat"] == 1.5 and pending_event["message"] == "node unreachable"
    assert refusal["payment_hash"] == refused_hash.hex() and refusal["amount_sat"] == 150
    assert (refusal["reason"], refusal["message"], refusal["service"]) == (
        "max_price",
        "too dear",
        "podcast",
    )
    assert paid_event["payment_hash"] == token.payment_hash.hex()
    assert (paid_event["service"], paid_event["fee_sat"]) == ("a,b", 1.5)
    assert (paid_event["settled_at"], paid_event["dropped_at"]) == (NOW - 30, NOW - 25)
    json.dumps(events)  # what the CLI prints


async def test_history_sat_numbers_are_ints_when_whole(store: ClientStore) -> None:
    await paid(store, amount_msat=21_000, fee_msat=0)
    (event,) = await store.history()
    assert event["amount_sat"] == 21 and type(event["amount_sat"]) is int
    assert event["fee_sat"] == 0 and type(event["fee_sat"]) is int


async def test_history_limit(store: ClientStore) -> None:
    for i in range(3):
        await paid(store, now=NOW + i)
        await store.refuse(
            origin=ORIGIN,
            url=ORIGIN + "/x",
            service=None,
            reason="max_price",
            message="m",
            amount_msat=None,
            payment_hash=None,
            now=NOW + i + 0.5,
        )
    events = await store.history(limit=3)
    assert [e["when"] for e in events] == [NOW + 2.5, NOW + 2, NOW + 1.5]
    assert len(await store.history()) == 6
    with pytest.raises(StoreError, match="at least 1"):
        await store.history(limit=0)


# --- the file ---------------------------------------------------------------------------------


async def test_file_is_private(db_path: Path, store: ClientStore) -> None:
    await paid(store)
    assert mode(db_path) == 0o600
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists() and mode(wal) == 0o600


async def test_an_existing_readable_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "client.sqlite"
    path.touch(mode=0o644)
    path.chmod(0o644)
    opened = await ClientStore.open(str(path))
    try:
        assert mode(path) == 0o600
    finally:
        await opened.close()


async def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "client.sqlite"
    newer = len(MIGRATIONS) + 1
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(StoreError, match=f"schema version {newer}, newer than"):
        await ClientStore.open(str(path))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "payments" not in tables


async def test_reopen_keeps_everything(db_path: Path, store: ClientStore) -> None:
    token = await paid(store)
    await store.learn_path(ORIGIN, "/bonus/", SCOPE, NOW)
    await store.close()
    again = await ClientStore.open(str(db_path))
    try:
        assert [t.payment_hash for t in await again.tokens(NOW)] == [token.payment_hash]
        assert await again.learned_paths() == [(ORIGIN, "/bonus/", SCOPE)]
    finally:
        await again.close()


async def test_postgres_uri_is_refused() -> None:
    with pytest.raises(StoreError, match="SQLite"):
        await ClientStore.open("postgresql://localhost/l402")


async def test_closed_store_raises_store_error(store: ClientStore) -> None:
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.pending()


# --- two stores on one file -------------------------------------------------------------------


async def test_concurrent_reserves_across_stores_fit_the_budget_once(
    store: ClientStore, other: ClientStore
) -> None:
    for round_ in range(5):
        now = NOW + round_ * 2 * DAY_SECONDS  # each round in a fresh 24 h window
        mine, _ = new_payment(amount_msat=60_000, fee_limit_msat=10_000)
        theirs, _ = new_payment(amount_msat=60_000, fee_limit_msat=10_000)
        results = await asyncio.gather(
            reserve(store, mine, now=now, daily=100_000),
            reserve(other, theirs, now=now, daily=100_000),
        )
        assert sorted(type(r).__name__ for r in results) == ["BudgetRefusal", "Payment"]
    assert len(await store.pending()) == 5
    assert len(await other.pending()) == 5


async def test_the_same_invoice_reserved_by_two_stores_is_paid_once(
    store: ClientStore, other: ClientStore
) -> None:
    payment, _ = new_payment()
    results = await asyncio.gather(
        reserve(store, payment), reserve(other, payment), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["Payment", "StoreError"]


async def test_a_token_bought_by_another_store_is_visible(
    store: ClientStore, other: ClientStore
) -> None:
    token = await paid(other, scope=SCOPE)
    found = await token_for_scope(store, ORIGIN, SCOPE, NOW)
    assert found is not None and found.preimage == token.preimage
