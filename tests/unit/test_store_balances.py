"""Bundle balances in the server stores (TokenStore.draw, charge, balance_of): the contract on
SQLite and a real PostgreSQL (test_store.py's `store_uri`, `store` and `other` fixtures run each
test once per store), exactly-once drawing across instances and processes, schema migration,
and what each database does when it cannot be used."""

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest

from l402proxy.store import (
    ServerStore,
    StoreError,
    TokenStore,
    is_postgres_uri,
    open_server_store,
)
from l402proxy.store import postgres as store_postgres
from l402proxy.store import sqlite as store_sqlite
from l402proxy.store.database import MAX_BALANCE
from l402proxy.store.postgres import PostgresServerStore
from tests.postgres import PostgresServer
from tests.unit import test_postgres_store, test_store
from tests.unit.test_postgres_store import BOUND, FreezingRelay, assert_one_clean_line
from tests.unit.test_store import make_token, user_version

# The fixtures of the two store suites, under their names (pytest finds a fixture by the name
# it has here): `store_uri`, `store` and `other` run a test once per store.
db_path = test_store.db_path
store_uri = test_store.store_uri
store = test_store.store
other = test_store.other
relay = test_postgres_store.relay


def token_id() -> bytes:
    return os.urandom(32)


# --- the contract ---------------------------------------------------------------------------


async def test_a_token_starts_at_its_size_on_its_first_draw(store: TokenStore) -> None:
    token, untouched = token_id(), token_id()
    assert await store.balance_of(token) is None
    assert await store.draw(token, 100, 1) == 99
    assert await store.balance_of(token) == 99
    assert await store.balance_of(untouched) is None


async def test_drawing_to_zero_then_nothing_for_ever(store: TokenStore, other: TokenStore) -> None:
    token = token_id()
    assert [await store.draw(token, 3, 1) for _ in range(3)] == [2, 1, 0]
    for instance in (store, other, store):
        assert await instance.draw(token, 3, 1) is None
    assert await store.balance_of(token) == 0
    assert await other.balance_of(token) == 0


async def test_a_draw_of_more_than_one_and_more_than_is_left(store: TokenStore) -> None:
    """The draw that takes the balance past 0 is granted (it found some left) and leaves 0."""
    token = token_id()
    assert await store.draw(token, 10, 4) == 6
    assert await store.draw(token, 10, 4) == 2
    assert await store.draw(token, 10, 4) == 0
    assert await store.draw(token, 10, 1) is None
    first_too_big = token_id()
    assert await store.draw(first_too_big, 3, 5) == 0
    assert await store.draw(first_too_big, 3, 1) is None


async def test_a_draw_of_zero_only_asks(store: TokenStore) -> None:
    token = token_id()
    assert await store.draw(token, 5, 0) == 5
    assert await store.draw(token, 5, 0) == 5
    assert await store.draw(token, 5, 5) == 0
    assert await store.draw(token, 5, 0) is None


async def test_the_size_counts_only_on_the_first_draw(store: TokenStore) -> None:
    token = token_id()
    assert await store.draw(token, 10, 1) == 9
    assert await store.draw(token, 1_000, 1) == 8
    assert await store.charge(token, 1_000, 1) == 7


async def test_charge_subtracts_and_stops_at_zero(store: TokenStore) -> None:
    token = token_id()
    assert await store.charge(token, 10, 3) == 7  # a first charge starts at the size too
    assert await store.charge(token, 10, 100) == 0
    assert await store.charge(token, 10, 1) == 0
    assert await store.balance_of(token) == 0
    assert await store.draw(token, 10, 1) is None


async def test_the_largest_sizes_and_amounts(store: TokenStore) -> None:
    """Balances are 64-bit in both databases: the largest bundle and draw neither overflow
    nor are refused."""
    token = token_id()
    assert await store.draw(token, MAX_BALANCE, 1) == MAX_BALANCE - 1
    assert await store.charge(token, MAX_BALANCE, MAX_BALANCE) == 0
    assert await store.draw(token, MAX_BALANCE, MAX_BALANCE) is None


@pytest.mark.parametrize(
    ("token", "size", "amount", "message"),
    [
        (b"short", 10, 1, "token_id must be 32 bytes"),
        ("ab" * 32, 10, 1, "token_id must be 32 bytes"),
        (None, 0, 1, "size must be a whole number from 1"),
        (None, True, 1, "size must be a whole number"),
        (None, 10.0, 1, "size must be a whole number"),
        (None, MAX_BALANCE + 1, 1, "size must be a whole number"),
        (None, 10, -1, "amount must be a whole number from 0"),
        (None, 10, False, "amount must be a whole number"),
        (None, 10, MAX_BALANCE + 1, "amount must be a whole number"),
    ],
)
async def test_bad_arguments_are_refused_before_the_database(
    store: TokenStore, token: object, size: object, amount: object, message: str
) -> None:
    target = token_id() if token is None else token
    for call in (store.draw, store.charge):
        with pytest.raises(ValueError, match=message):
            await call(target, size, amount)  # type: ignore[arg-type]
    if isinstance(target, bytes) and len(target) == 32:
        assert await store.balance_of(target) is None  # nothing was written
    else:
        with pytest.raises(ValueError, match="token_id must be 32 bytes"):
            await store.balance_of(target)  # type: ignore[arg-type]


async def test_balances_survive_closing_and_reopening(store_uri: str) -> None:
    token = token_id()
    first = await open_server_store(store_uri)
    try:
        assert await first.draw(token, 50, 7) == 43
    finally:
        await first.close()
    second = await open_server_store(store_uri)
    try:
        assert await second.balance_of(token) == 43
        assert await second.draw(token, 50, 1) == 42
    finally:
        await second.close()


async def test_a_closed_store_refuses(store_uri: str) -> None:
    closed = await open_server_store(store_uri)
    await closed.close()
    with pytest.raises(StoreError, match="closed"):
        await closed.draw(token_id(), 5, 1)
    with pytest.raises(StoreError, match="closed"):
        await closed.charge(token_id(), 5, 1)
    with pytest.raises(StoreError, match="closed"):
        await closed.balance_of(token_id())


# --- exactly once -------------------------------------------------------------------------


async def drain(instance: TokenStore, token: bytes, size: int) -> list[int]:
    """Draw 1 until nothing is left: the balances this caller was handed (bounded: a bundle
    of `size` cannot grant more than `size` draws, whoever draws)."""
    got: list[int] = []
    for _ in range(size + 1):
        left = await instance.draw(token, size, 1)
        if left is None:
            return got
        got.append(left)
    raise AssertionError(f"more than {size} draws granted from a bundle of {size}")


async def test_concurrent_draws_from_two_instances_grant_each_unit_once(
    store: TokenStore, other: TokenStore
) -> None:
    """16 tasks over two instances (SQLite: two connections to one file, taking its locks;
    PostgreSQL: two pools) draw until the bundle is spent: every remaining count is handed out
    exactly once, so exactly `size` draws were granted, none lost, none twice."""
    size = 100
    token = token_id()
    tasks = [drain(store if n % 2 else other, token, size) for n in range(16)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), BOUND * 4)
    granted = [left for got in results for left in got]
    assert len(granted) == size
    assert sorted(granted) == list(range(size))
    assert await store.balance_of(token) == 0
    assert await other.draw(token, size, 1) is None


async def test_processes_drawing_together_grant_each_unit_once(store_uri: str) -> None:
    """Separate processes: SQLite's file locks for real (one process shares some of them), and
    separate PostgreSQL sessions. Each draws until the bundle is spent and prints what it got."""
    size, count = 60, 3
    token = token_id()
    # Opened first, so that the processes do not race to migrate (that has tests of its own).
    await (await open_server_store(store_uri)).close()
    script = (
        "import asyncio, json, sys\n"
        "from l402proxy.store import open_server_store\n"
        "async def main():\n"
        "    s = await open_server_store(sys.argv[1])\n"
        "    token, size, got = bytes.fromhex(sys.argv[2]), int(sys.argv[3]), []\n"
        "    try:\n"
        "        for _ in range(size + 1):\n"
        "            left = await s.draw(token, size, 1)\n"
        "            if left is None:\n"
        "                break\n"
        "            got.append(left)\n"
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
            token.hex(),
            str(size),
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
    granted = [left for out, _ in outputs for left in json.loads(out)]
    assert sorted(granted) == list(range(size))


# --- in listings ----------------------------------------------------------------------------


async def test_listings_show_the_balance(store: TokenStore, other: TokenStore) -> None:
    bundle, plain = make_token(created_at=2.0), make_token(created_at=1.0)
    store.note_issued(bundle)
    store.note_issued(plain)
    await store.flush()
    assert await other.draw(bundle.token_id, 10, 3) == 7

    listed = await store.list_tokens()
    assert [(t.token_id, t.balance) for t in listed] == [
        (bundle.token_id, 7),
        (plain.token_id, None),
    ]
    assert [t.to_json()["balance"] for t in listed] == [7, None]
    [revoked] = await store.revoke(bundle.token_id.hex(), 5.0)
    assert revoked.balance == 7


# --- schema -------------------------------------------------------------------------------


def migrations_of(uri: str) -> ModuleType:
    return store_postgres if is_postgres_uri(uri) else store_sqlite


async def run_sql(request: pytest.FixtureRequest, uri: str, *statements: str) -> None:
    """Statements straight into the store's database, as an older release would write them
    (this release's queries read tables that release did not have)."""
    if is_postgres_uri(uri):
        postgres: PostgresServer = request.getfixturevalue("postgres")
        for statement in statements:
            await postgres.admin(statement, uri.rsplit("/", 1)[1])
        return
    with sqlite3.connect(uri) as conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


async def schema_version(request: pytest.FixtureRequest, uri: str) -> int:
    if is_postgres_uri(uri):
        postgres: PostgresServer = request.getfixturevalue("postgres")
        value = await postgres.admin_value(
            "SELECT version FROM l402_schema_version", uri.rsplit("/", 1)[1]
        )
        assert isinstance(value, int)
        return value
    return user_version(Path(uri))


async def test_migrating_from_the_version_before_balances_keeps_every_token(
    request: pytest.FixtureRequest, store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = migrations_of(store_uri)
    current = list(module.MIGRATIONS)
    # The step that brought balances in (later steps came after it: every one is run again).
    balances_at = next(
        n for n, steps in enumerate(current) if any("token_balances" in s for s in steps)
    )
    monkeypatch.setattr(module, "MIGRATIONS", current[:balances_at])
    old = await open_server_store(store_uri)
    try:
        secret = await old.secret()
    finally:
        await old.close()
    assert await schema_version(request, store_uri) == balances_at
    prefix = "l402_" if is_postgres_uri(store_uri) else ""

    def blob(value: bytes) -> str:
        return f"'\\x{value.hex()}'::bytea" if prefix else f"X'{value.hex()}'"

    tokens = [make_token(created_at=float(n)) for n in range(3)]
    await run_sql(
        request,
        store_uri,
        *(
            f"INSERT INTO {prefix}issued_tokens (token_id, payment_hash, service, price_sat,"
            f" created_at) VALUES ({blob(t.token_id)}, {blob(t.payment_hash)}, 'podcast', 21,"
            f" {t.created_at})"
            for t in tokens
        ),
        f"INSERT INTO {prefix}paid_sightings (token_id, paid_at)"
        f" VALUES ({blob(tokens[0].token_id)}, 10.0)",
        f"INSERT INTO {prefix}revocations (token_id, revoked_at)"
        f" VALUES ({blob(tokens[1].token_id)}, 20.0)",
    )

    monkeypatch.setattr(module, "MIGRATIONS", current)
    new = await open_server_store(store_uri)
    try:
        assert await new.secret() == secret
        listed = {t.token_id: t for t in await new.list_tokens()}
        assert set(listed) == {t.token_id for t in tokens}
        assert listed[tokens[0].token_id].paid_at == 10.0
        assert listed[tokens[1].token_id].revoked_at == 20.0
        assert all(t.balance is None for t in listed.values())
        assert await new.draw(tokens[2].token_id, 5, 1) == 4
        assert (await new.list_tokens(limit=1))[0].balance == 4
    finally:
        await new.close()
    assert await schema_version(request, store_uri) == len(current)


# --- SQLite: the file's locks ---------------------------------------------------------------


async def test_a_draw_waits_for_another_process_write_lock(db_path: Path) -> None:
    """Another connection holding the write lock (a flush in another process) makes a draw
    wait, within the busy timeout, not fail."""
    opened = await ServerStore.open(str(db_path))
    token = token_id()
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        drawing = asyncio.create_task(opened.draw(token, 5, 1))
        await asyncio.sleep(0.2)
        assert not drawing.done()  # it cannot have written: the lock is held
        blocker.execute("COMMIT")
        assert await asyncio.wait_for(drawing, BOUND) == 4
    finally:
        blocker.close()
        await opened.close()


async def test_a_draw_past_the_busy_timeout_is_a_store_error_and_draws_nothing(
    db_path: Path,
) -> None:
    opened = await ServerStore.open(str(db_path))
    token = token_id()
    try:
        assert await opened.draw(token, 5, 1) == 4
        assert opened._db is not None
        await opened._db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of after 5 s
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            for call in (opened.draw, opened.charge):
                with pytest.raises(StoreError, match="locked") as error:
                    await call(token, 5, 1)
                assert "\n" not in str(error.value)
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert await opened.balance_of(token) == 4
    finally:
        await opened.close()


async def test_a_draw_never_joins_this_store_s_open_transaction(db_path: Path) -> None:
    """One connection serves every coroutine of the store: a draw run while a flush is between
    BEGIN and COMMIT would be part of the flush's transaction, and undone if it rolled back,
    after the draw's caller was told it was made."""
    opened = await ServerStore.open(str(db_path))
    token = token_id()
    entered, release = asyncio.Event(), asyncio.Event()

    async def rolled_back() -> None:
        async with opened._transaction():
            entered.set()
            await release.wait()
            raise RuntimeError("the flush failed")

    try:
        transaction = asyncio.create_task(rolled_back())
        await asyncio.wait_for(entered.wait(), BOUND)
        drawing = asyncio.create_task(opened.draw(token, 5, 1))
        await asyncio.sleep(0.1)  # the draw reaches the store while the transaction is open
        release.set()
        with pytest.raises(RuntimeError):
            await transaction
        assert await asyncio.wait_for(drawing, BOUND) == 4
        assert await opened.balance_of(token) == 4
    finally:
        await opened.close()


# --- PostgreSQL: a database that is away ----------------------------------------------------


@pytest.fixture
async def pg_store(postgres: PostgresServer) -> PostgresServerStore:
    opened = await open_server_store(await postgres.new_database())
    assert isinstance(opened, PostgresServerStore)
    return opened


async def test_an_unreachable_database_is_a_store_error_and_keeps_the_balance(
    postgres: PostgresServer, pg_store: PostgresServerStore
) -> None:
    token = token_id()
    try:
        assert await pg_store.draw(token, 5, 1) == 4
        async with postgres.down():
            for call in (
                lambda: pg_store.draw(token, 5, 1),
                lambda: pg_store.charge(token, 5, 1),
                lambda: pg_store.balance_of(token),
            ):
                with pytest.raises(StoreError) as error:
                    await asyncio.wait_for(call(), BOUND)
                assert_one_clean_line(error.value, postgres.password)
        assert await pg_store.draw(token, 5, 1) == 3
    finally:
        await pg_store.close()


async def test_a_hung_database_bounds_every_draw(
    postgres: PostgresServer,
    relay: tuple[FreezingRelay, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PostgresServerStore, "balance_timeout", 0.3)
    # Far beyond BOUND: only balance_timeout can end the draw in time.
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", BOUND * 4)
    freezer, port = relay
    uri = await postgres.new_database()
    opened = await open_server_store(uri.replace(f":{postgres.port}/", f":{port}/"))
    token = token_id()
    try:
        assert await opened.draw(token, 5, 1) == 4
        freezer.frozen.set()
        with pytest.raises(StoreError, match=r"no answer within 0\.3 s") as error:
            await asyncio.wait_for(opened.draw(token, 5, 1), BOUND)
        assert_one_clean_line(error.value, postgres.password)
    finally:
        with contextlib.suppress(StoreError):
            await asyncio.wait_for(opened.close(), BOUND)
