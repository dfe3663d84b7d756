"""The PostgreSQL server store's own behaviour, on a real PostgreSQL (tests/postgres.py): several
instances on one database, notifications, schema versions, losing the database and getting it
back, URIs that cannot work, and the counters behind global rate limits and allowances. The
behaviour it shares with SQLite is test_store.py's contract suite."""

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from l402proxy.engine import Forward, Paywall
from l402proxy.engine.limits import LocalCounters, SharedCounters
from l402proxy.launch import free_port
from l402proxy.store import StoreError, open_server_store, shown_store_uri
from l402proxy.store import postgres as store_postgres
from l402proxy.store.postgres import PostgresCounters, PostgresServerStore, counter_key
from tests.postgres import ADMIN, PostgresServer
from tests.unit.test_rate_limits import request as limits_request
from tests.unit.test_store import make_token

# Bounds for waits that end as soon as what they wait for happens: generous, since the machine
# may be busy; never what a test asserts about speed.
BOUND = 15.0


def database_of(uri: str) -> str:
    return uri.rsplit("/", 1)[1]


@pytest.fixture
async def uri(postgres: PostgresServer) -> str:
    return await postgres.new_database()


async def opened(uri: str) -> PostgresServerStore:
    store = await open_server_store(uri)
    assert isinstance(store, PostgresServerStore)
    return store


@pytest.fixture
async def store(uri: str) -> AsyncIterator[PostgresServerStore]:
    first = await opened(uri)
    yield first
    await first.close()


@pytest.fixture
async def other(uri: str, store: PostgresServerStore) -> AsyncIterator[PostgresServerStore]:
    """Another instance (another proxy, or the CLI) on the same database."""
    second = await opened(uri)
    yield second
    await second.close()


async def listening(store: PostgresServerStore) -> None:
    """Start `store` listening; the first wait returns once the connection is up."""
    await asyncio.wait_for(store.wait_for_revocations(BOUND * 4), BOUND)
    assert store.listening


def assert_one_clean_line(error: BaseException, *secrets: str) -> None:
    text = str(error)
    assert text and "\n" not in text, text
    for secret in secrets:
        assert secret not in text, text


# --- several instances, one state -----------------------------------------------------------


async def test_two_instances_share_secret_tokens_and_revocations(
    store: PostgresServerStore, other: PostgresServerStore
) -> None:
    assert await store.secret() == await other.secret()
    token = make_token(valid_until=9e12)
    store.note_issued(token)
    await store.flush()
    assert [t.token_id for t in await other.list_tokens()] == [token.token_id]

    other.note_paid(token.token_id, 1_234.0)
    await other.flush()
    [listed] = await store.list_tokens()
    assert listed.paid_at == 1_234.0

    [revoked] = await other.revoke(token.payment_hash.hex()[:12], 2_000.0)
    assert revoked.token_id == token.token_id
    assert (await store.revocations_since(0))[1] == {token.token_id}


async def test_a_revocation_wakes_the_other_instance(
    store: PostgresServerStore, other: PostgresServerStore
) -> None:
    token = make_token()
    other.note_issued(token)
    await other.flush()
    await listening(store)
    cursor, _ = await store.revocations_since(0)

    # Its own timeout is far beyond the bound: returning within the bound means notified.
    waiting = asyncio.create_task(store.wait_for_revocations(BOUND * 10))
    await other.revoke(token.token_id.hex(), 1.0)
    await asyncio.wait_for(waiting, BOUND)

    assert (await store.revocations_since(cursor))[1] == {token.token_id}


async def test_revocations_become_visible_in_sequence_order(
    uri: str, store: PostgresServerStore, other: PostgresServerStore
) -> None:
    """A cursor must never pass a revocation still being committed: otherwise the instance
    reading it would never learn of that one. Hold one revoker just before its commit while
    another revokes: the second must wait for the first."""
    slow, fast = make_token(), make_token()
    for token in (slow, fast):
        store.note_issued(token)
    await store.flush()
    entered, release = asyncio.Event(), asyncio.Event()
    announce = store._announce

    async def held(conn: object, seq: int) -> None:
        entered.set()
        await release.wait()
        await announce(conn, seq)

    store._announce = held  # type: ignore[method-assign]
    reader = await opened(uri)
    try:
        first = asyncio.create_task(store.revoke(slow.token_id.hex(), 1.0))
        await asyncio.wait_for(entered.wait(), BOUND)
        second = asyncio.create_task(other.revoke(fast.token_id.hex(), 2.0))
        # Give the second revoker every chance to commit ahead of the first.
        await asyncio.wait({second}, timeout=1.0)
        cursor, seen = await reader.revocations_since(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), BOUND)
        _, later = await reader.revocations_since(cursor)
    finally:
        release.set()
        await reader.close()
    assert seen | later == {slow.token_id, fast.token_id}


# --- schema ---------------------------------------------------------------------------------


async def test_a_newer_schema_is_refused_and_left_untouched(
    postgres: PostgresServer, uri: str
) -> None:
    first = await opened(uri)
    await first.secret()
    await first.close()
    newer = len(store_postgres.MIGRATIONS) + 1
    database = database_of(uri)
    await postgres.admin(f"UPDATE l402_schema_version SET version = {newer}", database)

    with pytest.raises(StoreError, match=f"schema version {newer}, newer than") as error:
        await opened(uri)

    assert_one_clean_line(error.value, postgres.password)
    version = await postgres.admin_value("SELECT version FROM l402_schema_version", database)
    assert version == newer


async def test_instances_starting_together_migrate_once(
    uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="l402proxy.store")
    stores = await asyncio.gather(*(opened(uri) for _ in range(6)))
    try:
        secrets = await asyncio.gather(*(s.secret() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    for version in range(1, len(store_postgres.MIGRATIONS) + 1):
        text = f"migrated to schema version {version}"
        assert sum(text in r.getMessage() for r in caplog.records) == 1, text
    assert len(set(secrets)) == 1


async def test_a_new_migration_is_one_list_entry(
    postgres: PostgresServer, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await opened(uri)
    token = make_token()
    first.note_issued(token)
    await first.close()
    newer = len(store_postgres.MIGRATIONS) + 1
    step = ("ALTER TABLE l402_issued_tokens ADD COLUMN note text",)
    monkeypatch.setattr(store_postgres, "MIGRATIONS", [*store_postgres.MIGRATIONS, step])

    second = await opened(uri)
    assert [t.token_id for t in await second.list_tokens()] == [token.token_id]
    await second.close()

    database = database_of(uri)
    assert await postgres.admin_value("SELECT version FROM l402_schema_version", database) == newer
    column = await postgres.admin_value(
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'l402_issued_tokens' AND column_name = 'note'",
        database,
    )
    assert column == 1


async def test_a_failed_migration_leaves_the_previous_version(
    postgres: PostgresServer, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await opened(uri)).close()
    current = len(store_postgres.MIGRATIONS)
    broken = ("CREATE TABLE l402_half_done (a int)", "THIS IS NOT SQL")
    monkeypatch.setattr(store_postgres, "MIGRATIONS", [*store_postgres.MIGRATIONS, broken])

    with pytest.raises(StoreError, match=f"migration to schema version {current + 1} failed") as e:
        await opened(uri)

    assert_one_clean_line(e.value, postgres.password)
    database = database_of(uri)
    assert (
        await postgres.admin_value("SELECT version FROM l402_schema_version", database) == current
    )
    assert await postgres.admin_value("SELECT to_regclass('l402_half_done')", database) is None


async def test_migrating_is_bounded_by_the_migration_timeout_not_each_statements(
    postgres: PostgresServer, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for another instance's migration, and a long migration step, may take longer
    than an operation (asyncpg's command_timeout cuts every statement at operation_timeout
    unless told otherwise)."""
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", 0.5)
    slow = ("SELECT pg_sleep(1)",)  # a step rewriting a big table
    monkeypatch.setattr(store_postgres, "MIGRATIONS", [*store_postgres.MIGRATIONS, slow])
    database = database_of(uri)
    # Another instance migrating: it holds the migration lock.
    holder = await asyncpg.connect(
        host=str(postgres.sockdir), port=postgres.port, user=ADMIN, database=database, timeout=30
    )
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", store_postgres.MIGRATION_LOCK)
        opening = asyncio.create_task(opened(uri))
        for _ in range(int(BOUND / 0.05)):
            waiting = await postgres.admin_value(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                database,
            )
            if waiting or opening.done():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # twice as long as a statement may take
        assert not opening.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", store_postgres.MIGRATION_LOCK)
        store = await asyncio.wait_for(opening, BOUND)
    finally:
        await holder.close()
    await store.close()
    version = await postgres.admin_value("SELECT version FROM l402_schema_version", database)
    assert version == len(store_postgres.MIGRATIONS)


async def test_a_timeout_names_the_limit_that_fired(
    uri: str, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", 0.3)
    store = await opened(uri)
    try:
        # A longer bound around the statement: asyncpg's own command_timeout fires first.
        with pytest.raises(StoreError, match=r"no answer within 0\.3 s") as error:
            async with store._connection(BOUND) as conn:
                await conn.execute("SELECT pg_sleep(3)")
        assert_one_clean_line(error.value, postgres.password)
        with pytest.raises(StoreError, match=r"no answer within 0\.2 s"):
            async with store._connection(0.2) as conn:
                await conn.execute("SELECT pg_sleep(3)")
    finally:
        await store.close()


async def test_reading_the_schema_version_is_bounded_like_any_operation(
    postgres: PostgresServer, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to migrate, opening (the CLI's every command) waits no longer than an
    operation, and says so, even when something holds a lock on the version table."""
    await (await opened(uri)).close()
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", 0.3)
    monkeypatch.setattr(PostgresServerStore, "migration_timeout", BOUND)
    holder = await asyncpg.connect(
        host=str(postgres.sockdir),
        port=postgres.port,
        user=ADMIN,
        database=database_of(uri),
        timeout=30,
    )
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE l402_schema_version IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreError, match=r"no answer within 0\.3 s") as error:
                await asyncio.wait_for(opened(uri), BOUND)
    finally:
        await holder.close()
    assert_one_clean_line(error.value, postgres.password)


# --- losing the database --------------------------------------------------------------------


async def test_losing_the_database_and_getting_it_back(
    postgres: PostgresServer,
    store: PostgresServerStore,
    other: PostgresServerStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    before = make_token(created_at=1.0)
    store.note_issued(before)
    await store.flush()
    await listening(store)
    during = [make_token(created_at=2.0), make_token(created_at=3.0)]

    async with postgres.down():
        store.note_issued(during[0])
        store.note_paid(before.token_id, 50.0)
        with pytest.raises(StoreError) as flush_error:
            await store.flush()
        assert_one_clean_line(flush_error.value, postgres.password)
        assert store.pending == 2  # kept for the next flush
        assert not store.healthy
        store.note_issued(during[1])  # still queues
        with pytest.raises(StoreError) as list_error:
            await store.list_tokens()
        assert_one_clean_line(list_error.value, postgres.password)
        with pytest.raises(StoreError):
            await store.revocations_since(0)
        # Waiting never fails for a database that is away: it times out (and reconnects).
        await asyncio.wait_for(store.wait_for_revocations(0.1), BOUND)
        assert store.pending == 3

    await store.flush()
    assert store.pending == 0
    assert store.healthy
    listed = {t.token_id: t for t in await other.list_tokens()}
    assert set(listed) == {before.token_id, *(t.token_id for t in during)}
    assert listed[before.token_id].paid_at == 50.0

    # Listening again: the reconnection wakes the waiter (to catch up), then a revocation does.
    await listening(store)
    cursor, _ = await store.revocations_since(0)
    waiting = asyncio.create_task(store.wait_for_revocations(BOUND * 10))
    await other.revoke(during[0].token_id.hex(), 5.0)
    await asyncio.wait_for(waiting, BOUND)
    assert (await store.revocations_since(cursor))[1] == {during[0].token_id}

    logged = [record.getMessage() for record in caplog.records]
    assert any("listening for revocations again" in line for line in logged)
    assert not [line for line in logged if postgres.password in line]


async def test_a_lost_listener_marks_the_store_unhealthy_until_a_flush_gets_through(
    postgres: PostgresServer, store: PostgresServerStore
) -> None:
    """With nothing queued the next flush would have nothing to fail on: losing the listening
    connection is what tells of the outage, and the flush checks the database to recover."""
    await listening(store)
    async with postgres.down():
        for _ in range(int(BOUND / 0.05)):
            if not store.healthy:
                break
            await asyncio.sleep(0.05)
        assert not store.healthy
        with pytest.raises(StoreError):
            await store.flush()
        assert not store.healthy
    await store.flush()
    assert store.healthy


async def test_a_revocation_made_while_the_listener_was_away_is_caught_up(
    uri: str, store: PostgresServerStore, other: PostgresServerStore, postgres: PostgresServer
) -> None:
    """Notifications sent while the listening connection is down are lost for good: its
    reconnection must wake the waiter, which then reads revocations_since."""
    token = make_token()
    store.note_issued(token)
    await store.flush()
    store.keepalive_seconds = 3600  # so the listener's last statement stays its LISTEN
    await listening(store)
    cursor, _ = await store.revocations_since(0)
    reconnect = asyncio.Event()
    open_listener = store._open_listener

    async def held() -> tuple[object, asyncio.Event]:
        await reconnect.wait()
        return await open_listener()

    store._open_listener = held  # type: ignore[method-assign]
    waiting = asyncio.create_task(store.wait_for_revocations(BOUND * 10))
    # Cut only the listening connection (and wait until its backend is gone): the database
    # stays up, and the revocation below is notified to nobody.
    await postgres.admin(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
        f" WHERE datname = '{database_of(uri)}' AND query LIKE 'LISTEN%'"
    )
    await other.revoke(token.token_id.hex(), 1.0)
    assert not waiting.done()
    reconnect.set()
    await asyncio.wait_for(waiting, BOUND)

    assert (await store.revocations_since(cursor))[1] == {token.token_id}


class FreezingRelay:
    """A TCP relay to the database that can stop passing bytes without closing anything: a
    database host that hangs, or a network that drops packets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frozen = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.frozen.is_set():
                    await asyncio.Event().wait()  # hold it for ever: cancelled at the end
                writer.write(data)
                await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for a, b in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(a, b))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


@pytest.fixture
async def relay(postgres: PostgresServer) -> AsyncIterator[tuple[FreezingRelay, int]]:
    relay = FreezingRelay(postgres.port)
    server = await asyncio.start_server(relay._serve, "127.0.0.1", 0)
    try:
        yield relay, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(relay.tasks):
            task.cancel()
        await asyncio.gather(*relay.tasks, return_exceptions=True)


async def test_a_database_that_stops_answering_never_hangs_the_store(
    uri: str,
    postgres: PostgresServer,
    relay: tuple[FreezingRelay, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", 0.5)
    freezer, port = relay
    store = await opened(uri.replace(f":{postgres.port}/", f":{port}/"))
    try:
        await listening(store)
        store.note_issued(make_token())
        freezer.frozen.set()
        for operation in (store.flush, store.list_tokens, lambda: store.revocations_since(0)):
            with pytest.raises(StoreError, match="no answer within") as error:
                await asyncio.wait_for(operation(), BOUND)
            assert_one_clean_line(error.value, postgres.password)
        assert not store.healthy
        assert store.pending == 1
        # The waiter is not stuck either: it times out as asked.
        await asyncio.wait_for(store.wait_for_revocations(0.1), BOUND)
        with pytest.raises(StoreError, match="no answer within"):
            await asyncio.wait_for(store.close(), BOUND)  # its record cannot be written
    finally:
        with contextlib.suppress(StoreError):
            await asyncio.wait_for(store.close(), BOUND)


async def test_a_hung_database_makes_the_store_unhealthy_before_a_flush_times_out(
    uri: str,
    postgres: PostgresServer,
    relay: tuple[FreezingRelay, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instances must stop selling within `stall_seconds` of the database hanging, not after
    a whole operation_timeout: a flush under way that long is enough to tell."""
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", 3.0)
    monkeypatch.setattr(PostgresServerStore, "stall_seconds", 0.1)
    freezer, port = relay
    store = await opened(uri.replace(f":{postgres.port}/", f":{port}/"))
    try:
        store.note_issued(make_token())
        await store.flush()  # a connection in the pool, as in a running instance
        assert store.healthy
        store.note_issued(make_token())
        freezer.frozen.set()
        flushing = asyncio.create_task(store.flush())
        for _ in range(50):  # bounded, and well within the flush's 3 s
            if not store.healthy:
                break
            await asyncio.sleep(0.05)
        assert not store.healthy
        assert not flushing.done()
        flushing.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreError):
            await flushing
        assert store.pending == 1  # kept
    finally:
        with contextlib.suppress(StoreError):
            await asyncio.wait_for(store.close(), BOUND)


# --- URIs that cannot work ------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says anything (a hung database)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        yield sock.getsockname()[1]


async def test_a_silent_server_times_out_in_one_line(silent_server: int) -> None:
    uri = f"postgresql://l402:Sekr1tPassw0rd@127.0.0.1:{silent_server}/db?connect_timeout=0.5"
    with pytest.raises(StoreError, match=r"no answer within 0\.5 s") as error:
        await asyncio.wait_for(open_server_store(uri), BOUND)
    assert_one_clean_line(error.value, "Sekr1tPassw0rd")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong password", "password authentication failed"),
        ("wrong password in the query", "password authentication failed"),
        ("nothing listening", "database unreachable"),
        ("no such database", 'database "no_such_database" does not exist'),
        ("port is no port", "malformed host or port"),
        ("no '@'", "malformed host or port"),
        ("password in place of the user", "password authentication failed"),
        ("no database", "no database name"),
        ("bad connect_timeout", "connect_timeout must be a number of seconds"),
        ("connect_timeout twice", "connect_timeout given twice"),
    ],
)
async def test_unusable_uris_fail_in_one_line_without_the_password(
    postgres: PostgresServer, case: str, message: str
) -> None:
    secret = "Sekr1t-" + os.urandom(8).hex()
    here = f"127.0.0.1:{postgres.port}"
    uri = {
        "wrong password": postgres.uri("postgres", password=secret),
        "wrong password in the query": f"postgresql://l402@{here}/postgres?password={secret}",
        "nothing listening": f"postgresql://l402:{secret}@127.0.0.1:{free_port()}/db",
        "no such database": postgres.uri("no_such_database"),
        "port is no port": f"postgresql://l402:{secret}@127.0.0.1:{secret}/db",
        "no '@'": f"postgresql://l402:{secret}127.0.0.1:{postgres.port}/db",
        "password in place of the user": f"postgresql://{secret}@{here}/postgres",
        "no database": f"postgres://l402:{secret}@{here}",
        "bad connect_timeout": f"postgresql://l402:{secret}@{here}/db?connect_timeout=soon",
        "connect_timeout twice": (
            f"postgresql://l402:{secret}@{here}/db?connect_timeout=1&connect_timeout=2"
        ),
    }[case]
    with pytest.raises(StoreError, match=message) as error:
        await asyncio.wait_for(open_server_store(uri), BOUND)
    assert_one_clean_line(error.value, secret, postgres.password)
    assert "***" in str(error.value)  # the URI is named, redacted


# Short and not key-like: only taking the URI apart right can hide it.
PASSWORD = "Sekr1tPW"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (
            "postgresql://l402:Sekr1tPassw0rd@db.example:5432/tokens",
            "postgresql://***:***@db.example:5432/tokens",
        ),
        # Parameters that are no secret are shown; the others are not.
        (
            f"postgresql://l402:{PASSWORD}@db:5432/t?connect_timeout=5&sslmode=verify-full",
            "postgresql://***:***@db:5432/t?connect_timeout=5&sslmode=verify-full",
        ),
        (
            f"postgresql://l402@db/t?password={PASSWORD}&sslpassword=x&work_mem=64MB",
            "postgresql://***@db/t?password=***&sslpassword=***&work_mem=***",
        ),
        ("postgres:///tokens?host=/run/postgresql", "postgres:///tokens?host=/run/postgresql"),
        (
            f"postgresql://l402:{PASSWORD}@h1:5432,h2:5433/t",
            "postgresql://***:***@h1:5432,h2:5433/t",
        ),
        (f"postgresql://l402:{PASSWORD}@[::1]:5432/t", "postgresql://***:***@[::1]:5432/t"),
        # All of the user info, up to the LAST '@': asyncpg would take the first.
        (f"postgresql://l402:abc@{PASSWORD}@db/t", "postgresql://***:***@db/t"),
        # A raw '/', '?' or '#' ends the authority early, the rest of the password follows.
        (f"postgresql://l402:abc/{PASSWORD}@db/t", "postgresql://***"),
        (f"postgresql://l402:abc?{PASSWORD}@db/t", "postgresql://***"),
        (f"postgresql://l402:abc#{PASSWORD}@db/t", "postgresql://***"),
        # No '@': the password is where the host goes.
        (f"postgresql://l402:{PASSWORD}127.0.0.1:5432/t", "postgresql://***"),
        (f"postgresql://l402:{PASSWORD}/t", "postgresql://***"),
        # Misplaced: the password as the database name, in a shown parameter, with no '//'.
        (f"postgresql://l402:{PASSWORD}@db/{PASSWORD}", "postgresql://***:***@db/***"),
        (
            f"postgresql://l402:{PASSWORD}@db/t?sslrootcert=/x/{PASSWORD}",
            "postgresql://***:***@db/t?sslrootcert=/x/***",
        ),
        (f"postgresql:l402:{PASSWORD}@db/t", "postgresql:***"),
    ],
)
def test_uris_are_shown_without_any_of_their_user_info(uri: str, shown: str) -> None:
    assert shown_store_uri(uri) == shown


def test_a_sqlite_store_is_shown_as_given() -> None:
    assert shown_store_uri("/var/lib/l402/server.sqlite") == "/var/lib/l402/server.sqlite"


@pytest.mark.parametrize(
    "userinfo",
    [
        f"l402:abc/{PASSWORD}",
        f"l402:abc?{PASSWORD}",
        f"l402:abc#{PASSWORD}",
        f"l402:abc@{PASSWORD}",  # asyncpg would send the tail to DNS as the host
        f"l402@x:abc/{PASSWORD}",
    ],
)
async def test_a_raw_delimiter_in_the_user_info_is_refused_without_echoing_it(
    postgres: PostgresServer, userinfo: str
) -> None:
    uri = f"postgresql://{userinfo}@127.0.0.1:{postgres.port}/postgres"
    with pytest.raises(StoreError, match="percent-encode") as error:
        await asyncio.wait_for(open_server_store(uri), BOUND)
    assert_one_clean_line(error.value, PASSWORD, "abc")
    assert PASSWORD not in shown_store_uri(uri)


async def test_a_percent_encoded_password_with_delimiters_works(postgres: PostgresServer) -> None:
    password = "a/b?c#d@e:f%g+h " + PASSWORD
    suffix = os.urandom(4).hex()
    role, database = f"l402_enc_{suffix}", f"enc_{suffix}"
    await postgres.admin(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    await postgres.admin(f"CREATE DATABASE {database} OWNER {role}")
    uri = f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:{postgres.port}/{database}"
    store = await opened(uri)
    try:
        assert len(await store.secret()) == 32
        assert PASSWORD not in store.shown
    finally:
        await store.close()
        await postgres.admin(f"DROP DATABASE {database}")
        await postgres.admin(f"DROP ROLE {role}")


# --- counters: rate limits and allowances, global across instances --------------------------


async def test_rate_counting_is_limits_gcra_step_for_step(store: PostgresServerStore) -> None:
    """The database and the engine's own counting decide alike (the engine falls back on its
    own while the database is away): same verdicts, same waits, to the last bit."""
    local = LocalCounters()
    rng = random.Random(12)
    # The real time: the background sweep (real clock) takes rows from the past for expired.
    now = time.time()
    limits = [(0.25, 1), (2.0, 3), (7.0, 5), (1 / 3, 2)]  # (interval, burst): one per rule
    for step in range(300):
        now += rng.choice((0.0, 0.0, 0.01, 0.3, 1.0, 7.5, 40.0))
        rule = step % len(limits)
        interval, burst = limits[rule]
        key = f"rate:api:{rule}:ip:192.0.2.{step % 2}"
        wanted = await local.take_rate(key, interval, burst, now)
        assert await store.counters.take_rate(key, interval, burst, now) == wanted, step


async def test_allowance_counting_matches_the_engines_within_windows(
    store: PostgresServerStore,
) -> None:
    local = LocalCounters()
    rng = random.Random(34)
    now = float(int(time.time()) // 60 * 60)
    for step in range(200):
        now += rng.choice((0.0, 1.0, 13.0, 59.0))
        key = f"free:api:198.51.100.{step % 3}"
        wanted = await local.take_allowance(key, 3, 60, now)
        assert await store.counters.take_allowance(key, 3, 60, now) == wanted, step


async def test_concurrent_takes_from_two_instances_allow_exactly_the_burst(
    store: PostgresServerStore, other: PostgresServerStore
) -> None:
    now = time.time()
    takes = [
        instance.counters.take_rate("rate:api:7:ip:192.0.2.1", 3600.0, 7, now)
        for _ in range(40)
        for instance in (store, other)
    ]
    waits = await asyncio.gather(*takes)
    assert sum(wait is None for wait in waits) == 7
    # Every refused take was told the same wait: the bucket stood still once it was empty.
    assert {round(wait, 6) for wait in waits if wait is not None} == {3600.0}

    allowances = [
        instance.counters.take_allowance("free:api:192.0.2.1", 5, 86400, now)
        for _ in range(40)
        for instance in (store, other)
    ]
    left = await asyncio.gather(*allowances)
    # Each remaining count was handed out exactly once: no two takes saw the same row.
    assert sorted(n for n in left if n is not None) == [0, 1, 2, 3, 4]
    assert left.count(None) == 75


async def test_windows_roll_over_and_buckets_refill(store: PostgresServerStore) -> None:
    counters = store.counters
    # A window boundary of the real clock (the background sweep reads it: rows from the past
    # would be expired).
    edge = float(int(time.time()) // 60 * 60 + 60)
    takes = [await counters.take_allowance("free:a", 2, 60, edge - t) for t in (50, 40, 0.1)]
    assert takes == [1, 0, None]
    assert await counters.take_allowance("free:a", 2, 60, edge) == 1  # the next window
    # A take from an instance whose clock is a little behind counts in the newer window: two
    # clocks must not take turns resetting it.
    assert await counters.take_allowance("free:a", 2, 60, edge - 0.5) == 0
    assert await counters.take_allowance("free:a", 2, 60, edge + 1) is None
    assert await counters.take_allowance("free:b", 2, 60, edge + 1) == 1  # keys are apart

    assert await counters.take_rate("rate:a", 10.0, 2, edge) is None
    assert await counters.take_rate("rate:a", 10.0, 2, edge) is None
    assert await counters.take_rate("rate:a", 10.0, 2, edge + 4) == pytest.approx(6.0)
    assert await counters.take_rate("rate:a", 10.0, 2, edge + 10) is None  # one interval back
    assert await counters.take_rate("rate:a", 10.0, 2, edge + 10) == pytest.approx(10.0)


async def test_keys_are_bounded_in_length(postgres: PostgresServer, uri: str) -> None:
    store = await opened(uri)
    try:
        now = time.time()
        long_a, long_b = "rate:" + "a" * 5000 + "1", "rate:" + "a" * 5000 + "2"
        assert await store.counters.take_allowance(long_a, 1, 3600, now) == 0
        assert await store.counters.take_allowance(long_b, 1, 3600, now) == 0  # not the same
        assert await store.counters.take_allowance(long_a, 1, 3600, now) is None
        await store.counters.take_rate("é" * 300, 1.0, 1, now)  # cut between characters
    finally:
        await store.close()
    longest = await postgres.admin_value(
        "SELECT max(octet_length(key)) FROM (SELECT key FROM l402_allowances"
        " UNION ALL SELECT key FROM l402_rate_buckets) AS k",
        database_of(uri),
    )
    assert longest == store_postgres.MAX_COUNTER_KEY_BYTES
    assert counter_key("rate:short") == "rate:short"


async def test_the_sweep_deletes_expired_rows_and_keeps_live_ones(
    postgres: PostgresServer, uri: str, store: PostgresServerStore
) -> None:
    now = time.time()
    counters = store.counters  # its own sweep is a minute away: this test sweeps itself
    for n in range(5):
        await counters.take_rate(f"rate:old{n}", 1.0, 1, now - 3600)  # long refilled
        await counters.take_allowance(f"free:old{n}", 3, 60, now - 3600)  # window long over
    assert await counters.take_rate("rate:live", 3600.0, 2, now) is None
    assert await counters.take_allowance("free:live", 3, 86400, now) == 2

    assert await counters.sweep() == 10
    remaining = await postgres.admin_value(
        "SELECT string_agg(key, ',' ORDER BY key) FROM (SELECT key FROM l402_allowances"
        " UNION ALL SELECT key FROM l402_rate_buckets) AS k",
        database_of(uri),
    )
    assert remaining == "free:live,rate:live"
    # Their counts are intact.
    assert await counters.take_rate("rate:live", 3600.0, 2, now) is None
    assert await counters.take_rate("rate:live", 3600.0, 2, now) is not None
    assert await counters.take_allowance("free:live", 3, 86400, now) == 1


async def test_takes_start_the_sweep_in_the_background(
    postgres: PostgresServer, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PostgresCounters, "sweep_seconds", 0.0)
    store = await opened(uri)
    try:
        now = time.time()
        await store.counters.take_rate("rate:old", 1.0, 1, now - 3600)
        for _ in range(int(BOUND / 0.05)):
            await store.counters.take_rate("rate:live", 1.0, 1000, now)  # starts a sweep
            left = await postgres.admin_value(
                "SELECT count(*) FROM l402_rate_buckets WHERE key = 'rate:old'", database_of(uri)
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0
    finally:
        await store.close()


async def test_counters_fail_at_once_while_the_database_is_down_and_come_back(
    postgres: PostgresServer, store: PostgresServerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PostgresCounters, "rest_seconds", 0.2)
    shared = SharedCounters(store.counters)
    now = time.time()
    assert await store.counters.take_allowance("free:x", 5, 86400, now) == 4
    async with postgres.down():
        with pytest.raises(StoreError) as error:
            await asyncio.wait_for(store.counters.take_rate("rate:x", 1.0, 1, now), BOUND)
        assert_one_clean_line(error.value, postgres.password)
        # Resting: the next take does not even ask (a hung database would cost every request
        # the whole timeout otherwise).
        with pytest.raises(StoreError, match="not asked"):
            await store.counters.take_rate("rate:x", 1.0, 1, now)
        # The engine's wrapper counts here meanwhile.
        assert await shared.take_allowance("free:x", 5, 86400, now) == 4
        assert shared.failing
    for _ in range(int(BOUND / 0.1)):  # the rest is short: bounded retries
        with contextlib.suppress(StoreError):
            left = await store.counters.take_allowance("free:x", 5, 86400, now)
            break
        await asyncio.sleep(0.1)
    assert left == 3  # what the database counted before the outage is still there
    assert await shared.take_allowance("free:x", 5, 86400, now) == 2
    assert not shared.failing


async def test_a_hung_database_bounds_every_take(
    uri: str,
    postgres: PostgresServer,
    relay: tuple[FreezingRelay, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PostgresCounters, "timeout", 0.3)
    # A connection cut mid-statement must not go back to the pool: asyncpg would first wait
    # for the cancellation to go through, as long as the statement timeout (far beyond BOUND
    # here), and the take with it.
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", BOUND * 4)
    freezer, port = relay
    store = await opened(uri.replace(f":{postgres.port}/", f":{port}/"))
    try:
        assert await store.counters.take_rate("rate:h", 1.0, 1, 0.0) is None
        freezer.frozen.set()
        with pytest.raises(StoreError, match=r"no answer within 0\.3 s") as error:
            await asyncio.wait_for(store.counters.take_rate("rate:h", 1.0, 1, 0.0), BOUND)
        assert_one_clean_line(error.value, postgres.password)
    finally:
        with contextlib.suppress(StoreError):
            await asyncio.wait_for(store.close(), BOUND)


async def test_two_engines_on_one_database_share_their_limits(uri: str, tmp_path: Path) -> None:
    """The engine finds the store's counters: a freebie allowance is global, not per engine."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "services:\n  - name: api\n    match: {path: '/api/*'}\n    price_sat: 5\n"
        "    freebies: {requests: 3, per: 1d}\n"
    )
    engines = []
    try:
        for _ in range(2):
            engine = Paywall()
            engine.use_rules_file(str(rules))
            engine.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
            engine.store_uri = uri
            await engine.open()
            engines.append(engine)
            assert isinstance(engine.counters, SharedCounters)
        outcomes = [await engines[n % 2].handle(limits_request("/api/x")) for n in range(8)]
    finally:
        for engine in engines:
            await engine.close()
    assert sum(isinstance(outcome, Forward) for outcome in outcomes) == 3
