"""Consumed Payment-scheme charges in the server stores (TokenStore.consume_charge,
prune_charges): the contract on SQLite and a real PostgreSQL (test_store.py's `store_uri`,
`store` and `other` fixtures run each test once per store), exactly once per payment hash across
instances and processes, bounded pruning (by hand and from flush()), schema migration, and what
each database does when it cannot be used."""

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from l402proxy.store import StoreError, TokenStore, is_postgres_uri, open_server_store
from l402proxy.store.database import (
    CHARGE_EXPIRY_MARGIN,
    CHARGE_PRUNE_LIMIT,
    ChargePruning,
)
from l402proxy.store.postgres import PostgresServerStore
from l402proxy.store.sqlite import ServerStore
from tests.postgres import PostgresServer
from tests.unit import test_postgres_store, test_store, test_store_balances
from tests.unit.test_postgres_store import BOUND, FreezingRelay, assert_one_clean_line
from tests.unit.test_store import make_token
from tests.unit.test_store_balances import migrations_of, schema_version

# The fixtures of the store suites, under their names (pytest finds a fixture by the name it
# has here): `store_uri`, `store` and `other` run a test once per store.
db_path = test_store.db_path
store_uri = test_store.store_uri
store = test_store.store
other = test_store.other
relay = test_postgres_store.relay
pg_store = test_store_balances.pg_store

# The schema version each store's consumed charges came with: migrating from the one before it
# must keep everything.
CHARGES_VERSION = {"sqlite": 6, "postgresql": 7}
CHALLENGE_ID = "sVh3tq1hI1AjyPVLFkmKq1JAbfn9b_Z6KTZWUL2eUlI"  # a challenge id's shape
LATER = 4_000_000_000.0  # 2096: a challenge that has not expired during the test run


def payment_hash() -> bytes:
    return os.urandom(32)


async def consume(
    instance: TokenStore,
    hashed: bytes,
    *,
    challenge_id: str = CHALLENGE_ID,
    service: str = "podcast",
    expires_at: float = LATER,
    when: float = 1_000.0,
) -> bool:
    return await instance.consume_charge(hashed, challenge_id, service, expires_at, when)


def expired(seconds_ago: float = 10.0) -> float:
    """An expiry that prune_charges(time.time()) may delete: past, and past the margin."""
    return time.time() - CHARGE_EXPIRY_MARGIN - seconds_ago


# --- the contract ---------------------------------------------------------------------------


async def test_a_charge_is_consumed_once_whoever_asks_again(
    store: TokenStore, other: TokenStore
) -> None:
    hashed, another = payment_hash(), payment_hash()
    assert await consume(store, hashed) is True
    # Again here, at another instance, with another challenge id or service: all refused. The
    # payment hash is what was paid; whichever challenge carries it, it opens one request.
    assert await consume(store, hashed) is False
    assert await consume(other, hashed) is False
    assert await consume(other, hashed, challenge_id="another-id", service="articles") is False
    assert await consume(store, hashed, when=2_000.0, expires_at=LATER + 1) is False
    # Another payment is its own.
    assert await consume(other, another) is True
    assert await consume(store, another) is False


async def test_concurrent_consumes_from_two_instances_grant_exactly_one(
    store: TokenStore, other: TokenStore
) -> None:
    """16 identical consumes at once for each of 4 payment hashes, over two instances (SQLite:
    two connections to one file, taking its locks; PostgreSQL: two pools): one True per hash."""
    hashes = [payment_hash() for _ in range(4)]
    calls = [consume(store if n % 2 else other, hashed) for hashed in hashes for n in range(16)]
    results = await asyncio.wait_for(asyncio.gather(*calls), BOUND * 4)
    granted = [results[i * 16 : (i + 1) * 16].count(True) for i in range(len(hashes))]
    assert granted == [1, 1, 1, 1]
    for hashed in hashes:
        assert await consume(store, hashed) is False


async def test_processes_consuming_together_grant_each_charge_once(store_uri: str) -> None:
    """Separate processes (SQLite's file locks for real, separate PostgreSQL sessions), each
    consuming the same charges in the same order and printing which it was granted."""
    count = 3
    hashes = [payment_hash() for _ in range(20)]
    # Opened first, so that the processes do not race to migrate (that has tests of its own).
    await (await open_server_store(store_uri)).close()
    script = (
        "import asyncio, json, sys\n"
        "from l402proxy.store import open_server_store\n"
        "async def main():\n"
        "    s = await open_server_store(sys.argv[1])\n"
        "    got = []\n"
        "    try:\n"
        "        for h in sys.argv[2].split(','):\n"
        "            if await s.consume_charge(bytes.fromhex(h), 'id', 'podcast', 4e9, 1.0):\n"
        "                got.append(h)\n"
        "    finally:\n"
        "        await s.close()\n"
        "    print(json.dumps(got))\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            store_uri,
            ",".join(h.hex() for h in hashes),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(count)
    ]
    try:
        outputs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), BOUND * 4
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [p.returncode for p in procs] == [0] * count, [err.decode() for _, err in outputs]
    granted = [h for out, _ in outputs for h in json.loads(out)]
    assert sorted(granted) == sorted(h.hex() for h in hashes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hashed": b"short"}, "payment_hash must be 32 bytes"),
        ({"hashed": "ab" * 32}, "payment_hash must be 32 bytes"),
        ({"challenge_id": ""}, "challenge_id must be a non-empty string"),
        ({"challenge_id": "a" * 257}, "challenge_id must be a non-empty string"),
        ({"challenge_id": "id\n"}, "challenge_id must be a non-empty string"),
        ({"challenge_id": None}, "challenge_id must be a non-empty string"),
        ({"service": ""}, "service must be a non-empty string"),
        ({"service": "pod\x00cast"}, "service must be a non-empty string"),
        ({"expires_at": float("nan")}, "expires_at must be an epoch time"),
        ({"expires_at": None}, "expires_at must be an epoch time"),
        ({"when": float("inf")}, "when must be an epoch time"),
        ({"when": True}, "when must be an epoch time"),
    ],
)
async def test_bad_arguments_are_refused_before_the_database(
    store: TokenStore, change: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "hashed": payment_hash(),
        "challenge_id": CHALLENGE_ID,
        "service": "podcast",
        "expires_at": LATER,
        "when": 1_000.0,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        await store.consume_charge(
            args["hashed"],  # type: ignore[arg-type]
            args["challenge_id"],  # type: ignore[arg-type]
            args["service"],  # type: ignore[arg-type]
            args["expires_at"],  # type: ignore[arg-type]
            args["when"],  # type: ignore[arg-type]
        )
    hashed = args["hashed"]
    if isinstance(hashed, bytes) and len(hashed) == 32:
        assert await consume(store, hashed) is True  # nothing was written


async def test_consumed_charges_survive_closing_and_reopening(store_uri: str) -> None:
    hashed = payment_hash()
    first = await open_server_store(store_uri)
    try:
        assert await consume(first, hashed) is True
    finally:
        await first.close()
    second = await open_server_store(store_uri)
    try:
        assert await consume(second, hashed) is False
    finally:
        await second.close()


async def test_a_closed_store_refuses(store_uri: str) -> None:
    closed = await open_server_store(store_uri)
    await closed.close()
    with pytest.raises(StoreError, match="closed"):
        await consume(closed, payment_hash())
    with pytest.raises(StoreError, match="closed"):
        await closed.prune_charges(time.time())


# --- pruning --------------------------------------------------------------------------------


async def test_prune_deletes_only_rows_expired_past_the_margin_oldest_first_and_bounded(
    store: TokenStore, other: TokenStore
) -> None:
    now = time.time()
    oldest = [payment_hash() for _ in range(3)]
    old = [payment_hash() for _ in range(2)]
    within_margin, live = payment_hash(), payment_hash()
    for n, hashed in enumerate(oldest):
        assert await consume(store, hashed, expires_at=now - CHARGE_EXPIRY_MARGIN - 500 - n)
    for hashed in old:
        assert await consume(store, hashed, expires_at=now - CHARGE_EXPIRY_MARGIN - 10)
    # Expired, but not by the margin: an instance whose clock is behind may still take it.
    assert await consume(store, within_margin, expires_at=now - 10)
    assert await consume(store, live, expires_at=now + 600)

    assert await other.prune_charges(now, limit=3) == 3  # bounded: the oldest three
    for hashed in oldest:
        assert await consume(store, hashed) is True  # gone: it could be consumed again
    for hashed in old:
        assert await consume(store, hashed) is False  # still there
    assert await store.prune_charges(now, limit=3) == 2
    assert await store.prune_charges(now) == 0
    for hashed in old:
        assert await consume(other, hashed) is True
    assert await consume(other, within_margin) is False
    assert await consume(other, live) is False
    # Past the margin later on, the row may go.
    assert await store.prune_charges(now + CHARGE_EXPIRY_MARGIN) == 1
    assert await consume(other, within_margin) is True


@pytest.mark.parametrize(
    ("now", "limit", "message"),
    [
        (float("nan"), 10, "now must be an epoch time"),
        (1_000.0, 0, "limit must be a whole number from 1 to 1000"),
        (1_000.0, CHARGE_PRUNE_LIMIT + 1, "limit must be a whole number from 1 to 1000"),
        (1_000.0, 2.0, "limit must be a whole number"),
        (1_000.0, True, "limit must be a whole number"),
    ],
)
async def test_prune_refuses_bad_arguments(
    store: TokenStore, now: float, limit: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await store.prune_charges(now, limit)


async def test_flush_prunes_when_due_and_catches_up_on_a_backlog(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush() prunes every prune_seconds, at most prune_limit rows a time, and at the next
    flush again while a prune found a full batch."""
    monkeypatch.setattr(ChargePruning, "prune_seconds", 0.0)
    monkeypatch.setattr(ChargePruning, "prune_limit", 2)
    opened = await open_server_store(store_uri)
    try:
        gone = [payment_hash() for _ in range(5)]
        kept = payment_hash()
        for n, hashed in enumerate(gone):
            assert await consume(opened, hashed, expires_at=expired(100.0 - n))
        assert await consume(opened, kept, expires_at=time.time() + 600)
        opened.note_issued(make_token())  # a flush with records to write prunes too

        await opened.flush()  # 2 (a full batch: again at the next flush)
        await opened.flush()  # 2
        assert [
            await consume(opened, h, expires_at=expired(100.0 - n)) for n, h in enumerate(gone)
        ] == [
            True,
            True,
            True,
            True,
            False,
        ]
        assert len(await opened.list_tokens()) == 1
    finally:
        await opened.close()


async def test_flush_waits_prune_seconds_between_prunes(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ChargePruning, "prune_seconds", 3600.0)
    opened = await open_server_store(store_uri)
    try:
        hashed = payment_hash()
        assert await consume(opened, hashed, expires_at=expired())
        await opened.flush()
        assert await consume(opened, hashed) is False  # not due: the row is still there
        assert isinstance(opened, ChargePruning)
        opened._next_prune = time.monotonic()  # as if the period had passed
        await opened.flush()
        assert await consume(opened, hashed) is True
    finally:
        await opened.close()


async def test_a_failing_prune_never_fails_the_flush(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows left behind only take room: flush() still writes its records and returns its
    sales, and the failure is logged once until a prune works again."""
    assert isinstance(store, ChargePruning)
    calls: list[float] = []
    failing = True

    async def prune(now: float, limit: int = CHARGE_PRUNE_LIMIT) -> int:
        calls.append(now)
        if failing:
            raise StoreError("store x: no answer within 10 s")
        return 0

    monkeypatch.setattr(store, "prune_charges", prune)
    monkeypatch.setattr(store, "prune_seconds", 0.0)
    store._next_prune = time.monotonic()  # due now, and at every flush from then on
    token = make_token()
    store.note_issued(token)
    store.note_paid(token.token_id, 2_000.0)
    with caplog.at_level(logging.INFO, logger="l402proxy.store"):
        [sold] = await store.flush()
        await store.flush()
        failing = False
        await store.flush()
    assert sold.token_id == token.token_id
    assert len(calls) == 3
    messages = [r.getMessage() for r in caplog.records if "pruning" in r.getMessage()]
    assert len(messages) == 2
    assert "pruning expired charges failed: store x: no answer within 10 s" in messages[0]
    assert "works again" in messages[1]
    assert store.healthy


# --- schema ---------------------------------------------------------------------------------


async def test_migrating_from_the_version_before_charges_keeps_everything(
    request: pytest.FixtureRequest, store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = migrations_of(store_uri)
    version = CHARGES_VERSION["postgresql" if is_postgres_uri(store_uri) else "sqlite"]
    current = list(module.MIGRATIONS)
    assert len(current) >= version
    monkeypatch.setattr(module, "MIGRATIONS", current[: version - 1])
    old = await open_server_store(store_uri)
    tokens = [make_token(created_at=float(n)) for n in range(3)]
    credential = f"AgEB:{os.urandom(32).hex()}"
    try:
        secret = await old.secret()
        for token in tokens:
            old.note_issued(token)
        old.note_paid(tokens[0].token_id, 10.0)
        await old.flush()
        await old.revoke(tokens[1].token_id.hex(), 20.0)
        assert await old.draw(tokens[2].token_id, 5, 1) == 4
        feed = await old.feed_for(tokens[2].token_id, "podcast", "/feed.xml", credential, None, 1.0)
        with pytest.raises(StoreError):  # no such table yet
            await consume(old, payment_hash())
    finally:
        await old.close()
    assert await schema_version(request, store_uri) == version - 1

    monkeypatch.setattr(module, "MIGRATIONS", current)
    new = await open_server_store(store_uri)
    try:
        assert await new.secret() == secret
        listed = {t.token_id: t for t in await new.list_tokens()}
        assert set(listed) == {t.token_id for t in tokens}
        assert listed[tokens[0].token_id].paid_at == 10.0
        assert listed[tokens[1].token_id].revoked_at == 20.0
        assert listed[tokens[2].token_id].balance == 4
        assert await new.feed_access(feed.capability) == feed
        hashed = payment_hash()
        assert await consume(new, hashed) is True
        assert await consume(new, hashed) is False
    finally:
        await new.close()
    assert await schema_version(request, store_uri) == len(current)


# --- SQLite: the file's locks ---------------------------------------------------------------


async def test_a_consume_past_the_busy_timeout_is_a_store_error_and_consumes_nothing(
    db_path: Path,
) -> None:
    opened = await ServerStore.open(str(db_path))
    hashed = payment_hash()
    try:
        assert opened._db is not None
        await opened._db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of after 5 s
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked") as error:
                await consume(opened, hashed)
            assert "\n" not in str(error.value)
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert await consume(opened, hashed) is True
    finally:
        await opened.close()


async def test_a_consume_waits_for_another_process_write_lock(db_path: Path) -> None:
    """Another connection holding the write lock (a flush in another process) makes a consume
    wait, within the busy timeout, not fail."""
    opened = await ServerStore.open(str(db_path))
    hashed = payment_hash()
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        consuming = asyncio.create_task(consume(opened, hashed))
        await asyncio.sleep(0.2)
        assert not consuming.done()  # it cannot have written: the lock is held
        blocker.execute("COMMIT")
        assert await asyncio.wait_for(consuming, BOUND) is True
    finally:
        blocker.close()
        await opened.close()


# --- PostgreSQL: a database that is away ----------------------------------------------------


async def test_an_unreachable_database_is_a_store_error_and_keeps_what_was_consumed(
    postgres: PostgresServer, pg_store: PostgresServerStore
) -> None:
    hashed, fresh = payment_hash(), payment_hash()
    try:
        assert await consume(pg_store, hashed) is True
        async with postgres.down():
            for call in (
                lambda: consume(pg_store, hashed),
                lambda: consume(pg_store, fresh),
                lambda: pg_store.prune_charges(time.time()),
            ):
                with pytest.raises(StoreError) as error:
                    await asyncio.wait_for(call(), BOUND)
                assert_one_clean_line(error.value, postgres.password)
        assert await consume(pg_store, hashed) is False
        assert await consume(pg_store, fresh) is True
    finally:
        await pg_store.close()


async def test_a_hung_database_bounds_every_consume(
    postgres: PostgresServer,
    relay: tuple[FreezingRelay, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the request path: bounded by charge_timeout, not by a whole operation's."""
    monkeypatch.setattr(PostgresServerStore, "charge_timeout", 0.3)
    # Far beyond BOUND: only charge_timeout can end the call in time.
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", BOUND * 4)
    freezer, port = relay
    uri = await postgres.new_database()
    opened = await open_server_store(uri.replace(f":{postgres.port}/", f":{port}/"))
    try:
        assert await consume(opened, payment_hash()) is True
        freezer.frozen.set()
        with pytest.raises(StoreError, match=r"no answer within 0\.3 s") as error:
            await asyncio.wait_for(consume(opened, payment_hash()), BOUND)
        assert_one_clean_line(error.value, postgres.password)
    finally:
        with contextlib.suppress(StoreError):
            await asyncio.wait_for(opened.close(), BOUND)
