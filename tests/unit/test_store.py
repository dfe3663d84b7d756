import asyncio
import os
import sqlite3
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from l402proxy.store import (
    IssuedToken,
    ServerStore,
    StoreError,
    TokenStore,
    is_postgres_uri,
    open_server_store,
    sqlite_path_from_uri,
)
from l402proxy.store import database as store_database
from l402proxy.store import sqlite as store_sqlite
from l402proxy.store.database import RevenueRow
from tests.postgres import PostgresServer

# The contract: what every server store does, whatever its database. Tests that take `store`,
# `other` or `store_uri` run once per store; the SQLite-only ones take `db_path` or
# `sqlite_store`. PostgreSQL-only behaviour is in test_postgres_store.py.
STORES = ["sqlite", "postgresql"]


def make_token(
    *,
    token_id: bytes | None = None,
    payment_hash: bytes | None = None,
    service: str = "podcast",
    created_at: float = 1_000.0,
    valid_until: float | None = None,
    price_sat: int = 21,
) -> IssuedToken:
    return IssuedToken(
        token_id=token_id if token_id is not None else os.urandom(32),
        payment_hash=payment_hash if payment_hash is not None else os.urandom(32),
        service=service,
        price_sat=price_sat,
        created_at=created_at,
        valid_until=valid_until,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "server.sqlite"


@pytest.fixture(params=STORES)
async def store_uri(request: pytest.FixtureRequest, db_path: Path) -> str:
    """A fresh store's `l402_store` value: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(db_path)
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return await postgres.new_database()


@pytest.fixture
async def store(store_uri: str) -> AsyncIterator[TokenStore]:
    opened = await open_server_store(store_uri)
    yield opened
    await opened.close()


@pytest.fixture
async def other(store_uri: str, store: TokenStore) -> AsyncIterator[TokenStore]:
    """A second instance on the same store, standing in for the CLI or another proxy."""
    opened = await open_server_store(store_uri)
    yield opened
    await opened.close()


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[ServerStore]:
    opened = await ServerStore.open(str(db_path))
    yield opened
    await opened.close()


# --- secret -------------------------------------------------------------------------------


async def test_secret_is_stable_across_reopen(store_uri: str) -> None:
    first = await open_server_store(store_uri)
    secret = await first.secret()
    assert len(secret) == 32
    assert await first.secret() == secret
    await first.close()

    second = await open_server_store(store_uri)
    assert await second.secret() == secret
    await second.close()


async def test_instances_opening_a_fresh_store_together_agree_on_the_secret(
    store_uri: str,
) -> None:
    stores = await asyncio.gather(*(open_server_store(store_uri) for _ in range(4)))
    try:
        secrets = await asyncio.gather(*(s.secret() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert len(set(secrets)) == 1


async def test_processes_opening_a_fresh_store_together_agree_on_the_secret(
    store_uri: str,
) -> None:
    # Separate processes take SQLite's file locks for real (one process shares them), and
    # PostgreSQL's advisory locks from separate sessions.
    script = (
        "import asyncio, sys\n"
        "from l402proxy.store import open_server_store\n"
        "async def main():\n"
        "    s = await open_server_store(sys.argv[1])\n"
        "    print((await s.secret()).hex())\n"
        "    await s.close()\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            store_uri,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 20)
    assert [p.returncode for p in procs] == [0, 0], [err.decode() for _, err in outputs]
    secrets = {out.decode().strip() for out, _ in outputs}
    mine = await open_server_store(store_uri)
    secrets.add((await mine.secret()).hex())
    await mine.close()
    assert len(secrets) == 1


# --- issued tokens --------------------------------------------------------------------------


async def test_note_issued_is_written_by_flush_and_listed_newest_first(
    store: TokenStore, other: TokenStore
) -> None:
    tokens = [make_token(created_at=1_000.0 + i, valid_until=5_000.0 + i) for i in range(3)]
    for token in tokens:
        store.note_issued(token)
    assert store.pending == 3
    assert await other.list_tokens() == []  # queued only, nothing on disk yet

    await store.flush()

    assert store.pending == 0
    assert await other.list_tokens() == list(reversed(tokens))


async def test_list_tokens_filters_by_service_and_limits(store: TokenStore) -> None:
    for i in range(5):
        store.note_issued(make_token(service="podcast", created_at=100.0 + i))
        store.note_issued(make_token(service="api", created_at=100.5 + i))
    await store.flush()

    podcast = await store.list_tokens(service="podcast")
    assert [t.created_at for t in podcast] == [104.0, 103.0, 102.0, 101.0, 100.0]
    newest = await store.list_tokens(limit=3)
    assert [(t.service, t.created_at) for t in newest] == [
        ("api", 104.5),
        ("podcast", 104.0),
        ("api", 103.5),
    ]
    assert await store.list_tokens(service="nothing") == []
    with pytest.raises(StoreError, match="limit must be at least 1"):
        await store.list_tokens(limit=0)


async def test_list_tokens_includes_this_process_queue(store: TokenStore) -> None:
    token = make_token()
    store.note_issued(token)
    assert await store.list_tokens() == [token]


async def test_flush_writes_the_whole_queue_in_one_transaction(
    sqlite_store: ServerStore, db_path: Path
) -> None:
    store = sqlite_store
    tokens = [make_token(created_at=float(i)) for i in range(50)]
    for token in tokens:
        store.note_issued(token)
    for token in tokens[:10]:
        store.note_paid(token.token_id, 2_000.0)
    statements: list[str] = []
    assert store._db is not None
    await store._db.set_trace_callback(statements.append)

    await store.flush()
    await store._db.set_trace_callback(None)

    verbs = [s.split()[0].upper() for s in statements]
    assert verbs.count("BEGIN") == 1
    assert verbs.count("COMMIT") == 1
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM issued_tokens").fetchone()[0] == 50
        paid = conn.execute("SELECT count(*) FROM paid_sightings WHERE paid_at = 2000.0")
        assert paid.fetchone()[0] == 10


async def test_flush_keeps_the_queue_when_the_database_is_busy(
    sqlite_store: ServerStore, db_path: Path
) -> None:
    store = sqlite_store
    first = [make_token(created_at=float(i)) for i in range(3)]
    for token in first:
        store.note_issued(token)
    store.note_paid(first[0].token_id, 1_500.0)
    assert store._db is not None
    await store._db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of after 5 s

    assert store.healthy
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            await store.flush()
        assert store.pending == 4
        assert not store.healthy
        later = make_token(created_at=10.0)
        store.note_issued(later)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    await store.flush()
    assert store.pending == 0
    assert store.healthy
    listed = await store.list_tokens()
    assert [t.token_id for t in listed] == [later.token_id] + [t.token_id for t in reversed(first)]
    assert {t.token_id: t.paid_at for t in listed}[first[0].token_id] == 1_500.0


async def test_a_flush_that_hangs_makes_the_store_unhealthy_before_it_fails(
    sqlite_store: ServerStore, db_path: Path
) -> None:
    """Another process holding the write lock makes the flush wait (busy_timeout): `healthy`
    must not wait for it to fail, and comes back once it succeeds."""
    store = sqlite_store
    store.stall_seconds = 0.05
    assert store._db is not None
    await store._db.execute("PRAGMA busy_timeout = 600000")  # the flush waits, it does not fail
    store.note_issued(make_token())
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        flushing = asyncio.create_task(store.flush())
        for _ in range(200):  # bounded: 10 s
            if not store.healthy:
                break
            await asyncio.sleep(0.05)
        assert not store.healthy
        assert not flushing.done()  # unhealthy while the flush still waits
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await asyncio.wait_for(flushing, 10)
    assert store.healthy
    assert store.pending == 0


async def test_flush_is_a_no_op_when_nothing_is_queued(store: TokenStore) -> None:
    await store.flush()
    assert await store.list_tokens() == []


async def test_note_paid_keeps_the_earliest_sighting(store: TokenStore) -> None:
    token = make_token()
    store.note_issued(token)
    store.note_paid(token.token_id, 2_000.0)
    store.note_paid(token.token_id, 1_500.0)
    await store.flush()
    store.note_paid(token.token_id, 3_000.0)
    store.note_paid(os.urandom(32), 3_000.0)  # never issued here: ignored, not an error
    await store.flush()

    [listed] = await store.list_tokens()
    assert listed.paid_at == 1_500.0


async def test_a_sighting_written_before_the_token_row_is_kept(
    store: TokenStore, other: TokenStore
) -> None:
    """One instance sold the token, another saw it paid and flushed first: the seller writes
    its records every 0.25 s (later after an outage), and the other never notes the token
    again. The sighting must survive whatever order the two flushes come in."""
    token = make_token()
    store.note_issued(token)
    other.note_paid(token.token_id, 123.0)
    await other.flush()
    await store.flush()
    [listed] = await other.list_tokens()
    assert listed.paid_at == 123.0
    # Still the earliest of every sighting, wherever each was noted.
    store.note_paid(token.token_id, 456.0)
    await store.flush()
    other.note_paid(token.token_id, 100.0)
    await other.flush()
    [listed] = await store.list_tokens()
    assert listed.paid_at == 100.0
    [revoked] = await store.revoke(token.token_id.hex(), 789.0)
    assert revoked.paid_at == 100.0


# --- flush: who made a token paid (each sale counted once) ----------------------------------


def ids(tokens: list[IssuedToken]) -> list[bytes]:
    return [t.token_id for t in tokens]


async def test_flush_returns_the_tokens_it_made_paid_once(store: TokenStore) -> None:
    sold, unpaid = make_token(price_sat=21), make_token()
    store.note_issued(sold)
    store.note_issued(unpaid)
    store.note_paid(sold.token_id, 2_000.0)
    [settled] = await store.flush()
    assert settled.token_id == sold.token_id
    assert (settled.service, settled.price_sat, settled.paid_at) == ("podcast", 21, 2_000.0)
    # Seen paid again (an earlier sighting, even): the sale is already counted.
    store.note_paid(sold.token_id, 1_000.0)
    assert await store.flush() == []
    assert await store.flush() == []  # nothing queued


async def test_the_instance_that_completes_a_sale_counts_it_whatever_the_order(
    store: TokenStore, other: TokenStore
) -> None:
    """A paid token needs its issued row (written by the seller) and a sighting (written by
    whoever saw it paid): whichever instance writes the second of the two counts the sale."""
    row_first, sighting_first = make_token(), make_token()
    store.note_issued(row_first)
    other.note_paid(sighting_first.token_id, 10.0)
    assert await store.flush() == []
    assert await other.flush() == []  # its row is not written yet: not paid yet
    other.note_paid(row_first.token_id, 11.0)
    store.note_issued(sighting_first)
    assert ids(await other.flush()) == [row_first.token_id]
    assert ids(await store.flush()) == [sighting_first.token_id]
    assert await store.flush() == [] and await other.flush() == []


async def test_instances_flushing_together_count_each_sale_once(
    store: TokenStore, other: TokenStore
) -> None:
    """The seller writes its rows while another instance writes the sightings of the same
    tokens, at the same time: neither may miss that the other's write completed a sale
    (PostgreSQL: two transactions each reading before the other commits), nor may both count
    it."""
    tokens = [make_token() for _ in range(40)]
    counted: list[bytes] = []
    for round_ in range(4):
        batch = tokens[round_ * 10 : (round_ + 1) * 10]
        for token in batch:
            store.note_issued(token)
            other.note_paid(token.token_id, 100.0 + round_)
        results = await asyncio.gather(store.flush(), other.flush())
        counted += [t for result in results for t in ids(result)]
    assert sorted(counted) == sorted(ids(tokens))


async def test_a_token_issued_paid_counts_as_sold(store: TokenStore) -> None:
    """paid_at in the issued row (what schema version 1 wrote) is as good as a sighting."""
    token = replace(make_token(), paid_at=50.0)
    store.note_issued(token)
    assert ids(await store.flush()) == [token.token_id]
    store.note_paid(token.token_id, 40.0)
    assert await store.flush() == []


async def test_sales_written_by_other_calls_are_returned_by_the_next_flush(
    store: TokenStore,
) -> None:
    """list_tokens, revoke and revenue write the queue first: the sales they write are still
    told by flush(), so the engine counts them."""
    listed, revoked, seen = make_token(), make_token(), make_token()
    for token in (listed, revoked, seen):
        store.note_issued(token)
        store.note_paid(token.token_id, 500.0)
        if token is listed:
            await store.list_tokens()
        elif token is revoked:
            await store.revoke(token.token_id.hex(), 600.0)
        else:
            await store.revenue(0, 1_000, 3600)
    assert sorted(ids(await store.flush())) == sorted(ids([listed, revoked, seen]))
    assert await store.flush() == []


async def test_a_failed_flush_tells_its_sales_when_it_is_written(
    sqlite_store: ServerStore, db_path: Path
) -> None:
    store = sqlite_store
    token = make_token()
    store.note_issued(token)
    store.note_paid(token.token_id, 7.0)
    assert store._db is not None
    await store._db.execute("PRAGMA busy_timeout = 0")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            await store.flush()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert ids(await store.flush()) == [token.token_id]


# --- revenue --------------------------------------------------------------------------------

HOUR = 3600


def sold(store: TokenStore, service: str, price_sat: int, paid_at: float) -> IssuedToken:
    token = make_token(service=service, price_sat=price_sat)
    store.note_issued(token)
    store.note_paid(token.token_id, paid_at)
    return token


def table(rows: list[RevenueRow]) -> list[tuple[float, str, int, int]]:
    return [(r.start, r.service, r.tokens_sold, r.sats) for r in rows]


async def test_revenue_per_bucket_and_service(store: TokenStore, other: TokenStore) -> None:
    base = 1_700_000_000 // HOUR * HOUR  # an hour's start
    sold(store, "podcast", 21, base + 10)
    sold(store, "podcast", 21, base + HOUR - 1)
    sold(store, "api", 5, base + 20)
    sold(store, "api", 50, base + 2 * HOUR)
    store.note_issued(make_token(service="api", price_sat=5))  # never paid: no sale
    await store.flush()
    sold(other, "podcast", 100, base + HOUR + 5)  # still queued: revenue() writes it first

    rows = await other.revenue(base, base + 3 * HOUR, HOUR)

    assert table(rows) == [
        (base, "api", 1, 5),
        (base, "podcast", 2, 42),
        (base + HOUR, "podcast", 1, 100),
        (base + 2 * HOUR, "api", 1, 50),
    ]
    assert all(isinstance(r.start, float) for r in rows)
    assert table(await store.revenue(base, base + 3 * HOUR, HOUR, "api")) == [
        (base, "api", 1, 5),
        (base + 2 * HOUR, "api", 1, 50),
    ]
    assert table(await store.revenue(base, base + 3 * HOUR, 86_400, "podcast")) == [
        (base // 86_400 * 86_400, "podcast", 3, 142)
    ]
    assert await store.revenue(base, base + 3 * HOUR, HOUR, "nothing") == []
    assert rows[0].to_json() == {"start_at": base, "service": "api", "tokens_sold": 1, "sats": 5}


async def test_revenue_range_is_since_inclusive_until_exclusive(store: TokenStore) -> None:
    for at in (999.0, 1_000.0, 1_999.5, 2_000.0):
        sold(store, "podcast", 1, at)
    assert table(await store.revenue(1_000, 2_000, 100)) == [
        (1_000.0, "podcast", 1, 1),
        (1_900.0, "podcast", 1, 1),
    ]


async def test_revenue_counts_a_sale_at_its_first_sighting(store: TokenStore) -> None:
    """Seen paid at several times (several instances, a row with a version 1 paid_at): the
    sale happened at the earliest, counted once, and revoking it later takes nothing back."""
    token = sold(store, "podcast", 21, 5_000.0)
    store.note_paid(token.token_id, 1_500.0)
    legacy = replace(make_token(price_sat=7), paid_at=1_200.0)
    store.note_issued(legacy)
    store.note_paid(legacy.token_id, 3_000.0)
    await store.flush()
    await store.revoke(token.token_id.hex(), 6_000.0)
    assert table(await store.revenue(1_000, 10_000, 1_000)) == [(1_000.0, "podcast", 2, 28)]


@pytest.mark.parametrize(
    ("since", "until", "bucket", "message"),
    [
        (0, 100, 0, "at least 1 second"),
        (0, 100, 1.5, "whole number"),
        (100, 100, 10, "must be after since"),
        (200, 100, 10, "must be after since"),
        (-5, 100, 10, "since must be an epoch time"),
        (0, float("inf"), 10, "until must be an epoch time"),
        (0, float("nan"), 10, "until must be an epoch time"),
        (0, 10_000 * HOUR, HOUR, "at most 10000"),
    ],
)
async def test_revenue_refuses_bad_ranges(
    store: TokenStore, since: float, until: float, bucket: int, message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        await store.revenue(since, until, bucket)


async def test_revenue_accepts_the_largest_range(store: TokenStore) -> None:
    sold(store, "podcast", 3, 9_999 * HOUR - 1)
    rows = await store.revenue(0, 9_999 * HOUR, HOUR)
    assert table(rows) == [(9_998.0 * HOUR, "podcast", 1, 3)]


async def test_revenue_reads_a_version_1_database(db_path: Path) -> None:
    token = make_token(price_sat=13)
    write_version_1_database(db_path, token, os.urandom(32))  # paid_at 6.0 in the row
    opened = await ServerStore.open(str(db_path))
    try:
        assert table(await opened.revenue(0, 100, 10)) == [(0.0, "podcast", 1, 13)]
    finally:
        await opened.close()


async def test_close_flushes_the_queue(store_uri: str) -> None:
    first = await open_server_store(store_uri)
    token = make_token()
    first.note_issued(token)
    await first.close()
    await first.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        first.note_issued(make_token())

    second = await open_server_store(store_uri)
    assert await second.list_tokens() == [token]
    await second.close()


async def test_bad_records_are_rejected_when_queued(store: TokenStore) -> None:
    with pytest.raises(ValueError, match="token_id"):
        store.note_issued(make_token(token_id=b"short"))
    with pytest.raises(ValueError, match="payment_hash"):
        store.note_issued(make_token(payment_hash=b"x" * 33))
    with pytest.raises(ValueError, match="price_sat"):
        store.note_issued(make_token(price_sat=-1))
    with pytest.raises(ValueError, match="token_id"):
        store.note_paid(b"", 1.0)
    assert store.pending == 0


# --- revocation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    ["token_id", "TOKEN_ID", "payment_hash", "token_prefix", "hash_prefix_odd", "padded"],
)
async def test_revoke_by_every_reference_form(store: TokenStore, form: str) -> None:
    token = make_token(valid_until=9e12)
    decoy = make_token(valid_until=9e12)
    store.note_issued(token)
    store.note_issued(decoy)
    await store.flush()
    ref = {
        "token_id": token.token_id.hex(),
        "TOKEN_ID": token.token_id.hex().upper(),
        "payment_hash": token.payment_hash.hex(),
        "token_prefix": token.token_id.hex()[:8],
        "hash_prefix_odd": token.payment_hash.hex()[:11].upper(),
        "padded": f"  {token.token_id.hex()[:12]}\n",
    }[form]

    [revoked] = await store.revoke(ref, 7_000.0)

    assert revoked.token_id == token.token_id
    assert revoked.payment_hash == token.payment_hash
    assert revoked.revoked_at == 7_000.0
    assert revoked.to_json()["status"] == "revoked"
    statuses = {t.token_id: t.to_json()["status"] for t in await store.list_tokens()}
    assert statuses == {token.token_id: "revoked", decoy.token_id: "unpaid"}


async def test_revoke_prefix_bounds_are_exact(store: TokenStore) -> None:
    inside = make_token(token_id=bytes.fromhex("abcdef01") + os.urandom(28))
    below = make_token(token_id=bytes.fromhex("abcdef00") + b"\xff" * 28)
    above = make_token(token_id=bytes.fromhex("abcdef02") + bytes(28))
    top = make_token(token_id=b"\xff" * 32)
    for token in (inside, below, above, top):
        store.note_issued(token)
    await store.flush()

    assert [t.token_id for t in await store.revoke("abcdef01", 1.0)] == [inside.token_id]
    # All-'f' prefix: the range has no upper bound.
    assert [t.token_id for t in await store.revoke("fffffffff", 1.0)] == [top.token_id]


async def test_revoke_ambiguous_prefix_says_how_many_match(store: TokenStore) -> None:
    shared = bytes.fromhex("0123456789")
    tokens = [make_token(token_id=shared + os.urandom(27)) for _ in range(3)]
    for token in tokens:
        store.note_issued(token)
    await store.flush()

    with pytest.raises(StoreError, match="ambiguous: it matches 3 issued tokens"):
        await store.revoke("01234567", 1.0)
    _, revoked = await store.revocations_since(0)
    assert revoked == set()
    [one] = await store.revoke(tokens[1].token_id.hex()[:20], 1.0)
    assert one.token_id == tokens[1].token_id


async def test_revoke_with_no_match_or_bad_reference(store: TokenStore) -> None:
    store.note_issued(make_token(token_id=bytes(32), payment_hash=bytes(32)))
    await store.flush()
    with pytest.raises(StoreError) as no_match:
        await store.revoke("DeadBeef", 1.0)
    assert str(no_match.value) == "no issued token matches 'DeadBeef'"
    with pytest.raises(StoreError, match="at least 8 hex"):
        await store.revoke("0000000", 1.0)
    with pytest.raises(StoreError, match="not hexadecimal"):
        await store.revoke("xyz12345", 1.0)
    with pytest.raises(StoreError, match="longer than"):
        await store.revoke("0" * 65, 1.0)


async def test_revoke_is_idempotent_and_keeps_the_first_time(store: TokenStore) -> None:
    token = make_token()
    store.note_issued(token)
    await store.flush()

    [first] = await store.revoke(token.token_id.hex(), 100.0)
    cursor, ids = await store.revocations_since(0)
    assert ids == {token.token_id}
    [again] = await store.revoke(token.payment_hash.hex()[:10], 200.0)

    assert first.revoked_at == again.revoked_at == 100.0
    assert await store.revocations_since(cursor) == (cursor, set())


async def test_revoke_unrecorded_full_token_id(store: TokenStore) -> None:
    # The issuance note may have been lost in a crash; the token must still be rejected.
    token_id = os.urandom(32)
    [revoked] = await store.revoke(token_id.hex().upper(), 50.0)

    assert revoked.token_id == token_id
    assert revoked.recorded is False
    assert revoked.revoked_at == 50.0
    data = revoked.to_json()
    assert data["payment_hash"] is None
    assert data["status"] == "revoked"
    cursor, ids = await store.revocations_since(0)
    assert ids == {token_id}

    [again] = await store.revoke(token_id.hex(), 60.0)
    assert again.revoked_at == 50.0
    assert await store.revocations_since(cursor) == (cursor, set())


async def test_revocations_since_across_instances(store: TokenStore, other: TokenStore) -> None:
    tokens = [make_token(created_at=float(i)) for i in range(3)]
    for token in tokens:
        store.note_issued(token)
    await store.flush()

    cursor, ids = await store.revocations_since(0)
    assert (cursor, ids) == (0, set())

    await other.revoke(tokens[0].token_id.hex(), 1.0)
    cursor, ids = await store.revocations_since(cursor)
    assert ids == {tokens[0].token_id}
    assert cursor > 0
    assert await store.revocations_since(cursor) == (cursor, set())

    await other.revoke(tokens[1].payment_hash.hex(), 2.0)
    await other.revoke(tokens[2].token_id.hex()[:9], 3.0)
    newer, ids = await store.revocations_since(cursor)
    assert ids == {tokens[1].token_id, tokens[2].token_id}
    assert newer > cursor
    assert await store.revocations_since(0) == (newer, {t.token_id for t in tokens})


async def restore_revocations(request: pytest.FixtureRequest, store_uri: str, keep: int) -> None:
    """What restoring a backup taken after revocation `keep` does: later ones are gone, and
    their sequence numbers will be handed out again."""
    if is_postgres_uri(store_uri):
        postgres: PostgresServer = request.getfixturevalue("postgres")
        await postgres.admin(
            f"DELETE FROM l402_revocations WHERE seq > {keep};"
            f" ALTER TABLE l402_revocations ALTER COLUMN seq RESTART WITH {keep + 1}",
            store_uri.rsplit("/", 1)[1],
        )
        return
    with sqlite3.connect(store_uri) as conn:
        conn.execute("DELETE FROM revocations WHERE seq > ?", (keep,))
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'revocations'", (keep,))
    conn.close()


async def test_revocations_are_read_again_when_the_store_went_back(
    request: pytest.FixtureRequest, store_uri: str, store: TokenStore, other: TokenStore
) -> None:
    """Restored from a backup (or failed over to a replica that lagged), the store's last
    sequence number is below an instance's cursor: what is revoked from then on would never
    be read past it. Then everything is read again."""
    tokens = [make_token() for _ in range(5)]
    for token in tokens:
        store.note_issued(token)
    await store.flush()
    for token in tokens[:3]:
        await other.revoke(token.token_id.hex(), 1.0)
    cursor, _ = await store.revocations_since(0)

    await restore_revocations(request, store_uri, keep=1)
    await other.revoke(tokens[3].token_id.hex(), 2.0)  # gets the second sequence number again

    cursor, revoked = await store.revocations_since(cursor)
    assert revoked == {tokens[0].token_id, tokens[3].token_id}
    await other.revoke(tokens[4].token_id.hex(), 3.0)
    assert await store.revocations_since(cursor) == (cursor + 1, {tokens[4].token_id})


async def test_wait_for_revocations_then_revocations_since_sees_another_instance(
    store: TokenStore, other: TokenStore
) -> None:
    """How the engine follows revocations: wait (SQLite: a sleep; PostgreSQL: until notified,
    or its listening connection is up), then read what is new since its cursor."""
    token = make_token()
    store.note_issued(token)
    await store.flush()
    cursor, _ = await store.revocations_since(0)

    await other.revoke(token.token_id.hex(), 1.0)
    await asyncio.wait_for(store.wait_for_revocations(0.2), 10)

    assert (await store.revocations_since(cursor))[1] == {token.token_id}


async def test_a_working_store_is_healthy(store: TokenStore) -> None:
    assert store.healthy
    store.note_issued(make_token())
    await store.flush()
    await store.flush()  # nothing queued
    assert store.healthy


async def test_records_left_waiting_make_the_store_unhealthy(store: TokenStore) -> None:
    """The engine flushes every 0.25 s: a record still queued after `stall_seconds` means the
    database is not taking them (it may hang rather than fail), so the engine stops selling
    at once instead of after a whole flush timeout."""
    store.stall_seconds = 0.05
    store.note_paid(os.urandom(32), 1.0)
    assert store.healthy
    await asyncio.sleep(0.1)
    assert not store.healthy
    await store.flush()
    assert store.healthy


async def test_a_closed_store_refuses_to_wait(store_uri: str) -> None:
    opened = await open_server_store(store_uri)
    await opened.close()
    with pytest.raises(StoreError, match="closed"):
        await opened.wait_for_revocations(0.1)


# --- IssuedToken.to_json ------------------------------------------------------------------


def test_to_json_and_status() -> None:
    token = make_token(created_at=10.0, valid_until=100.0)
    data = token.to_json(now=50.0)
    assert data == {
        "token_id": token.token_id.hex(),
        "payment_hash": token.payment_hash.hex(),
        "service": "podcast",
        "price_sat": 21,
        "created_at": 10.0,
        "valid_until": 100.0,
        "paid_at": None,
        "revoked_at": None,
        "recorded": True,
        "status": "unpaid",
        "balance": None,
    }
    paid = IssuedToken(**{**token.__dict__, "paid_at": 20.0})
    assert paid.to_json(now=50.0)["status"] == "paid"
    assert paid.to_json(now=100.0)["status"] == "expired"
    assert token.to_json(now=150.0)["status"] == "expired"
    revoked = IssuedToken(**{**paid.__dict__, "revoked_at": 30.0})
    assert revoked.to_json(now=150.0)["status"] == "revoked"
    # Without `now`, the current time: valid_until in the far past / no expiry.
    assert paid.to_json()["status"] == "expired"
    forever = make_token(valid_until=None)
    assert forever.to_json()["status"] == "unpaid"


# --- files --------------------------------------------------------------------------------


async def test_file_and_fresh_parent_are_private(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "server.sqlite"
    opened = await ServerStore.open(str(path))
    try:
        await opened.secret()
        assert mode(path.parent) == 0o700
        assert mode(path) == 0o600
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        assert mode(wal) == 0o600
    finally:
        await opened.close()


async def test_existing_loose_file_is_made_private(db_path: Path) -> None:
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    opened = await ServerStore.open(str(db_path))
    await opened.close()
    assert mode(db_path) == 0o600


async def test_opening_an_open_file_again_never_closes_a_descriptor_of_it(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing any descriptor of a file drops every POSIX lock this process holds on it,
    SQLite's too: a second store (or dev ledger) opening a file the process already has open
    must not open and close one (two dev ledgers in one process lost invoices that way)."""
    first = await ServerStore.open(str(db_path))
    opened_paths: list[str] = []
    real_open = os.open

    def recording_open(path: object, *args: object, **kwargs: object) -> int:
        fd = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
        opened_paths.append(os.fspath(path))  # type: ignore[arg-type]  # a descriptor made
        return fd

    try:
        monkeypatch.setattr(os, "open", recording_open)
        await asyncio.to_thread(store_database._prepare_file, db_path)
        monkeypatch.undo()
        second = await ServerStore.open(str(db_path))
        await second.close()
    finally:
        await first.close()
    assert str(db_path) not in opened_paths


async def test_pragmas(sqlite_store: ServerStore) -> None:
    store = sqlite_store
    assert store._db is not None

    async def pragma(name: str) -> object:
        rows = list(await store._db.execute_fetchall(f"PRAGMA {name}"))  # type: ignore[union-attr]
        return rows[0][0]

    assert await pragma("journal_mode") == "wal"
    assert await pragma("synchronous") == 1  # NORMAL
    assert await pragma("busy_timeout") == 5000
    assert await pragma("foreign_keys") == 1


# --- schema versions ----------------------------------------------------------------------


def write_version_1_database(path: Path, token: IssuedToken, secret: bytes) -> None:
    """A file as the release with schema version 1 leaves it."""
    with sqlite3.connect(path) as conn:
        for statement in store_sqlite.MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO meta (key, value) VALUES ('secret', ?)", (secret,))
        conn.execute(
            "INSERT INTO issued_tokens (token_id, payment_hash, service, price_sat, created_at,"
            " valid_until, paid_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (token.token_id, token.payment_hash, token.service, token.price_sat, 5.0, None, 6.0),
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()


async def test_opens_a_version_1_database(db_path: Path) -> None:
    token = make_token(created_at=5.0)
    secret = os.urandom(32)
    write_version_1_database(db_path, token, secret)

    opened = await ServerStore.open(str(db_path))
    try:
        assert await opened.secret() == secret
        [listed] = await opened.list_tokens()
        assert listed.token_id == token.token_id
        assert listed.paid_at == 6.0
    finally:
        await opened.close()
    assert user_version(db_path) == len(store_sqlite.MIGRATIONS)


async def test_a_new_migration_is_one_list_entry(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = make_token()
    write_version_1_database(db_path, token, os.urandom(32))
    step = ("ALTER TABLE issued_tokens ADD COLUMN note TEXT",)
    monkeypatch.setattr(store_sqlite, "MIGRATIONS", [*store_sqlite.MIGRATIONS, step])

    opened = await ServerStore.open(str(db_path))
    assert [t.token_id for t in await opened.list_tokens()] == [token.token_id]
    await opened.close()

    assert user_version(db_path) == len(store_sqlite.MIGRATIONS)
    with sqlite3.connect(db_path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(issued_tokens)")]
    conn.close()
    assert "note" in columns


async def test_a_failed_migration_leaves_the_previous_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_version_1_database(db_path, make_token(), os.urandom(32))
    current = len(store_sqlite.MIGRATIONS)
    broken = ("CREATE TABLE half_done (a)", "THIS IS NOT SQL")
    monkeypatch.setattr(store_sqlite, "MIGRATIONS", [*store_sqlite.MIGRATIONS, broken])

    with pytest.raises(StoreError, match=f"migration to schema version {current + 1} failed"):
        await ServerStore.open(str(db_path))

    assert user_version(db_path) == current
    with sqlite3.connect(db_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "half_done" not in tables


async def test_a_newer_schema_is_refused_and_left_untouched(db_path: Path) -> None:
    opened = await ServerStore.open(str(db_path))
    await opened.secret()
    await opened.close()
    newer = len(store_sqlite.MIGRATIONS) + 1
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    before = db_path.read_bytes()

    with pytest.raises(StoreError, match=f"schema version {newer}, newer than"):
        await ServerStore.open(str(db_path))

    assert db_path.read_bytes() == before


async def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an SQLite database, just some text " * 100)
    with pytest.raises(StoreError, match="not a database"):
        await ServerStore.open(str(db_path))


# --- URIs ---------------------------------------------------------------------------------


def test_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    assert sqlite_path_from_uri("/abs/server.sqlite") == Path("/abs/server.sqlite")
    assert sqlite_path_from_uri("~/s.sqlite") == tmp_path / "s.sqlite"
    assert sqlite_path_from_uri("rel/s.sqlite") == tmp_path / "rel" / "s.sqlite"
    assert sqlite_path_from_uri("sqlite:///abs/server.sqlite") == Path("/abs/server.sqlite")
    assert sqlite_path_from_uri("SQLite:///abs/a%20b.sqlite") == Path("/abs/a b.sqlite")
    assert sqlite_path_from_uri("") == tmp_path / "home" / "server.sqlite"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite://relative.sqlite", "sqlite:///absolute/path"),
        ("sqlite:relative.sqlite", "sqlite:///absolute/path"),
        ("sqlite://", "names a directory|absolute"),
        ("sqlite:///var/lib/", "names a directory"),
        ("sqlite:///a.sqlite?mode=ro", "query parameters"),
        ("mysql://db/tokens", "unsupported store URI scheme 'mysql'"),
        (":memory:", "must persist"),
        # A file path is wanted here: only open_server_store takes PostgreSQL URIs.
        ("postgresql://db/l402", "is a SQLite file"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        sqlite_path_from_uri(uri)


async def test_open_server_store_with_sqlite_uri(db_path: Path) -> None:
    opened = await open_server_store(f"sqlite://{db_path}")
    try:
        assert opened.path == db_path
        assert len(await opened.secret()) == 32
    finally:
        await opened.close()
    assert db_path.exists()


async def test_a_flush_cancelled_during_begin_leaves_no_transaction_open(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy shutting down cancels its flush task; if that lands while aiosqlite's thread
    runs BEGIN, the connection must not stay inside the transaction: close() flushes the queue
    and would fail with "cannot start a transaction within a transaction", losing it."""
    store = await ServerStore.open(str(db_path))
    db = store._live()
    real_execute = db.execute
    begun = asyncio.Event()

    async def slow_begin(sql: str, *args: object) -> object:
        result = await real_execute(sql, *args)
        if sql == "BEGIN IMMEDIATE":
            begun.set()
            await asyncio.sleep(10)  # the BEGIN has run; the await is still pending
        return result

    monkeypatch.setattr(db, "execute", slow_begin)
    token = make_token()
    store.note_issued(token)
    flushing = asyncio.create_task(store.flush())
    await asyncio.wait_for(begun.wait(), 5)
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    monkeypatch.setattr(db, "execute", real_execute)
    await store.close()  # flushes the queue in a transaction of its own

    reopened = await ServerStore.open(str(db_path))
    assert await reopened.list_tokens() == [token]
    await reopened.close()
