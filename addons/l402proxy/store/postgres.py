"""The server's PostgreSQL store: the records of store/sqlite.py (root secret, issued tokens,
payments seen, revocations), shared by every instance (any door) and the CLI that use one
database, so that a token bought at one instance works at all of them.

- `l402_store=postgresql://user:password@host:port/database` (or postgres://); asyncpg, a small
  pool. Every connection attempt is bounded by `connect_timeout` (the URI's ?connect_timeout=
  or CONNECT_TIMEOUT) and every operation, waiting for a connection included, by
  OPERATION_TIMEOUT (opening, which may migrate or wait for another instance's migration, by
  MIGRATION_TIMEOUT): a dead or silent database raises StoreError, it never hangs a caller.
  No message or log line shows the user info or the password (split_uri: URIs are shown
  without them, a user info asyncpg would split otherwise is refused; errors are scrubbed).
- Verifying a paid request never reads the database (as with SQLite): the 402 and paid paths
  only queue records in memory (RecordQueue: bounded, same trim rules) and `flush()` writes
  them. A failing flush keeps its batch and clears `healthy`; the next one that works (or, with
  nothing queued, a probe) sets it again. What a flush wrote is committed: nothing is lost.
  `healthy` is also False while a record has waited, or a flush has run, over STALL_SECONDS.
- Paid sightings are upserted into a table of their own (MIGRATIONS, version 3), so that one
  written before the token's row (another instance sold it) is not lost. `flush()` returns the
  tokens this instance was the first to make paid (its sighting, or its row joining another's
  sighting): flushes that write sightings take SETTLE_LOCK alone, so each sale counts once.
- Schema: versioned migrations like the SQLite ones, the version in `l402_schema_version`.
  Instances starting together serialize on an advisory lock, so each step runs once; a database
  from a newer l402proxy is refused, untouched. The secret is inserted once (ON CONFLICT DO
  NOTHING) and read back, so every instance gets the same one.
- Revocations: `revoke()` inserts and NOTIFYs in one transaction. One connection per store
  LISTENs (opened by the first `wait_for_revocations()`, so the CLI never opens it) and wakes
  the waiter on each notification. It reconnects by itself, and each (re)connection wakes the
  waiter too: notifications sent while it was away are lost, so the waiter catches up with
  `revocations_since()`, whose cursor never skips a revocation (see revoke()), and starts
  again from 0 when the database is behind it (restored from a backup).
- Counters (`store.counters`, engine.limits.Counters): the engine's rate limits, invoice-mint
  limit and free allowances, counted in the database so that they are global across
  instances. Each take is ONE statement (an upsert whose row lock serializes the instances;
  see PostgresCounters), bounded by COUNTER_TIMEOUT; failing, it raises StoreError and the
  engine counts locally meanwhile (engine.limits.SharedCounters). Their tables are UNLOGGED:
  no WAL, no fsync per request; a database crash (not a clean restart) empties them, which
  only hands every client a fresh allowance once.
- Balances (`draw`, `charge`, `balance_of`: bundle tokens): money, so not queued and not
  UNLOGGED. Each call is one statement (an upsert, like the counters' takes), awaited on the
  request path and bounded by BALANCE_TIMEOUT; failing, it raises StoreError and the engine
  answers 503. Every instance draws from the same row: a bundle is global.
- Feed accesses (`feed_for`, `feed_access`: private podcast feeds) are written and read at once,
  bounded by FEED_TIMEOUT (the request path); `feed_for` inserts against a unique index of the
  active (token, feed, credential digest) triples and reads the active row back, so instances
  asking at once agree.
  `revoke_feeds` and `rotate_feeds` lock the rows they change (one transaction each); engines
  see a revocation through their capability cache's short TTL, no NOTIFY.
- Consumed Payment charges (`consume_charge`) are written at once, one insert-or-nothing
  statement against the primary key, bounded by CHARGE_TIMEOUT (the request path): once per
  payment hash across every instance. `flush()` prunes the expired ones, a bounded batch at a
  time (ChargePruning).
"""

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, unquote_plus

import asyncpg

from l402proxy.lightning.uri import (
    SHOWN_NAME,
    SHOWN_SCHEME,
    looks_like_secret,
    shown_hostport,
    shown_path,
)
from l402proxy.store import database
from l402proxy.store.database import (
    CHARGE_EXPIRY_MARGIN,
    CHARGE_PRUNE_LIMIT,
    SECRET_SIZE,
    ChargePruning,
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

log = logging.getLogger("l402proxy.store")

SCHEMES = ("postgres", "postgresql")

CONNECT_TIMEOUT = 5.0
MAX_CONNECT_TIMEOUT = 300.0
# One operation: waiting for a pooled connection (connecting, if need be) and its statements.
OPERATION_TIMEOUT = 10.0
# Migrations may rewrite tables, and may wait for another instance's.
MIGRATION_TIMEOUT = 120.0
# The counters take a pooled connection per priced request (every 402 passes the mint limit).
POOL_SIZE = 10
# How often the listening connection is asked something: an idle connection whose peer vanished
# without closing it (a dead host, a dropped network) otherwise looks alive for ever.
KEEPALIVE_SECONDS = 5.0
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0

CHANNEL = "l402proxy_revocations"
# pg_advisory_xact_lock keys ("L402MIGR", "L402RVKE", "L402STLE"): one for migrating, one for
# revoking, one for flushes (see flush(): who was first to make a token paid).
MIGRATION_LOCK = 0x4C3430324D494752
REVOKE_LOCK = 0x4C34303252564B45
SETTLE_LOCK = 0x4C34303253544C45

SERVER_SETTINGS = {"application_name": "l402proxy"}

# -- balances (draw, charge, balance_of) --
# One call, waiting for a connection included: awaited on the request path, which answers 503
# when it fails (fail closed). Never retried: a retry after a lost answer could draw twice.
BALANCE_TIMEOUT = 2.0

# -- feed accesses (feed_for, feed_access) --
# One call, waiting for a connection included: on the request path (a listener's player, the
# unlock that mints a feed URL), which fails closed when it fails, as for the balances.
FEED_TIMEOUT = 2.0
# feed_for: insert-or-nothing then read, again when the active row it met was revoked between
# the two (a rotation never leaves none: it inserts the new row in its own transaction).
FEED_FOR_ATTEMPTS = 3

# -- consumed charges (consume_charge) --
# One call, waiting for a connection included: on the request path (a Payment credential being
# redeemed), which answers 503 when it fails (fail closed). Never retried: a retry after a lost
# answer would find the charge consumed (by the lost call) and refuse it.
CHARGE_TIMEOUT = 2.0

# -- counters (engine.limits.Counters) --
# One take, waiting for a connection included: a request waits at most this long before the
# engine counts it locally instead.
COUNTER_TIMEOUT = 2.0
# After a failed take, the next ones fail at once (counted locally) for this long: a database
# that hangs must not make every request wait COUNTER_TIMEOUT.
COUNTER_REST_SECONDS = 1.0
# Keys are the engine's ("rate:<service>:<line>:<ip|token>:<who>", "free:...", "mint:..."),
# well under this; a longer one is shortened to a prefix and its SHA-256, so the bound holds.
MAX_COUNTER_KEY_BYTES = 200
# A row may be deleted once its state is the same as no row: a bucket whose TAT has passed (it
# is full again), an allowance whose window is over. expires_at says when, with a margin for
# clocks that disagree between instances, rounded up to EXPIRY_STEP so that most updates leave
# it (an indexed column) unchanged and stay HOT.
EXPIRY_MARGIN = 60
EXPIRY_STEP = 60
# Each instance deletes expired rows every SWEEP_SECONDS (started by a take, in the background),
# at most SWEEP_BATCH rows per statement and SWEEP_ROUNDS statements per sweep.
SWEEP_SECONDS = 60.0
SWEEP_BATCH = 5_000
SWEEP_ROUNDS = 10

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
    # Version 2: the counters (PostgresCounters). UNLOGGED: see the module docstring;
    # fillfactor: room on each page for an updated row, so that updates stay HOT.
    (
        f"""
        CREATE UNLOGGED TABLE l402_rate_buckets (
            key text PRIMARY KEY CHECK (octet_length(key) <= {MAX_COUNTER_KEY_BYTES}),
            tat double precision NOT NULL,
            allowed boolean NOT NULL,
            expires_at double precision NOT NULL
        ) WITH (fillfactor = 70)
        """,
        "CREATE INDEX l402_rate_buckets_expires ON l402_rate_buckets (expires_at)",
        f"""
        CREATE UNLOGGED TABLE l402_allowances (
            key text PRIMARY KEY CHECK (octet_length(key) <= {MAX_COUNTER_KEY_BYTES}),
            window_start bigint NOT NULL,
            used integer NOT NULL CHECK (used >= 1),
            expires_at double precision NOT NULL
        ) WITH (fillfactor = 70)
        """,
        "CREATE INDEX l402_allowances_expires ON l402_allowances (expires_at)",
    ),
    # Version 3: paid sightings apart from the issued rows. The instance that sees a token
    # paid is often not the one that sold it, and may write first (the seller writes every
    # 0.25 s, later after an outage): an UPDATE of the issued row would match nothing and the
    # sighting would be lost. An upsert here never loses one, whatever the order; listings
    # take the earliest of both (l402_issued_tokens.paid_at holds what versions 1-2 wrote).
    (
        """
        CREATE TABLE l402_paid_sightings (
            token_id bytea PRIMARY KEY CHECK (length(token_id) = 32),
            paid_at double precision NOT NULL
        )
        """,
    ),
    # Version 4: revenue() reads the paid tokens of a time range by when they were paid: the
    # sightings, and the few issued rows versions 1-2 wrote a paid_at into (partial: the rest
    # of that column is NULL, one row per 402).
    (
        "CREATE INDEX l402_paid_sightings_paid_at ON l402_paid_sightings (paid_at)",
        "CREATE INDEX l402_issued_tokens_paid_at ON l402_issued_tokens (paid_at)"
        " WHERE paid_at IS NOT NULL",
    ),
    # Version 5: what is left of each bundle token (draw, charge): a row from the token's first
    # draw on. Logged, unlike the counters: balances are money and must survive a crash.
    # fillfactor: a row is updated once per request, room on its page keeps the updates HOT.
    (
        """
        CREATE TABLE l402_token_balances (
            token_id bytea PRIMARY KEY CHECK (length(token_id) = 32),
            balance bigint NOT NULL CHECK (balance >= 0)
        ) WITH (fillfactor = 70)
        """,
    ),
    # Version 6: private podcast feeds (database.FeedAccess), as SQLite's version 5. No foreign
    # key to l402_issued_tokens (written behind, may be lost). A revoked access stays, its
    # capability known and never handed out again; the partial unique index keeps one access
    # of a (token, feed, credential) active across instances (feed_for inserts against it),
    # the credential in it by its SHA-256 (credential_digest()): a narrowed (attenuated) copy
    # of a token gets a capability of its own, never the full credential's. row_id: the
    # tie-break of `feeds list`, as for the tokens.
    (
        """
        CREATE TABLE l402_feed_accesses (
            capability text PRIMARY KEY CHECK (length(capability) = 22),
            token_id bytea NOT NULL CHECK (length(token_id) = 32),
            service text NOT NULL,
            feed text NOT NULL CHECK (left(feed, 1) = '/'),
            credential text NOT NULL,
            credential_digest bytea NOT NULL CHECK (length(credential_digest) = 32),
            valid_until double precision,
            created_at double precision NOT NULL,
            revoked_at double precision,
            row_id bigint GENERATED ALWAYS AS IDENTITY
        )
        """,
        "CREATE UNIQUE INDEX l402_feed_accesses_active"
        " ON l402_feed_accesses (token_id, feed, credential_digest) WHERE revoked_at IS NULL",
        "CREATE INDEX l402_feed_accesses_token ON l402_feed_accesses (token_id)",
        "CREATE INDEX l402_feed_accesses_created ON l402_feed_accesses (created_at, row_id)",
    ),
    # Version 7: Payment-scheme charges consumed (database.TokenStore.consume_charge), as
    # SQLite's version 6: a paid charge opens one request, once, across every instance; the
    # primary key makes it so (consume_charge inserts against it, doing nothing on a conflict).
    # Logged, unlike the counters: a crash must not let a charge be spent again. A row may go
    # some time after its challenge expired (prune_charges, through l402_consumed_charges_expires).
    (
        """
        CREATE TABLE l402_consumed_charges (
            payment_hash bytea PRIMARY KEY CHECK (length(payment_hash) = 32),
            challenge_id text NOT NULL,
            service text NOT NULL,
            consumed_at double precision NOT NULL,
            expires_at double precision NOT NULL
        )
        """,
        "CREATE INDEX l402_consumed_charges_expires ON l402_consumed_charges (expires_at)",
    ),
]

# LEAST skips NULLs: the earliest sighting, wherever it was written.
_TOKEN_SELECT = (
    "SELECT i.token_id, i.payment_hash, i.service, i.price_sat, i.created_at, i.valid_until,"
    " LEAST(i.paid_at, s.paid_at), r.revoked_at, b.balance FROM l402_issued_tokens i"
    " LEFT JOIN l402_paid_sightings s ON s.token_id = i.token_id"
    " LEFT JOIN l402_revocations r ON r.token_id = i.token_id"
    " LEFT JOIN l402_token_balances b ON b.token_id = i.token_id"
)

# Balances (database.TokenStore): one statement each, like the counters' takes. A token's first
# draw inserts its row at size - amount; instances drawing from it at once then take the
# conflicting row's lock in turn, each reading the latest committed balance (READ COMMITTED's
# DO UPDATE), so every unit is handed out once. When nothing is left the WHERE refuses the
# update and no row comes back (an insert always returns one): that is the None.
# $1 token_id, $2 size, $3 amount.
_DRAW_SQL = (
    "INSERT INTO l402_token_balances AS b (token_id, balance)"
    " VALUES ($1::bytea, GREATEST($2::bigint - $3::bigint, 0))"
    " ON CONFLICT (token_id) DO UPDATE SET balance = GREATEST(b.balance - $3::bigint, 0)"
    " WHERE b.balance > 0"
    " RETURNING b.balance"
)
_CHARGE_SQL = (
    "INSERT INTO l402_token_balances AS b (token_id, balance)"
    " VALUES ($1::bytea, GREATEST($2::bigint - $3::bigint, 0))"
    " ON CONFLICT (token_id) DO UPDATE SET balance = GREATEST(b.balance - $3::bigint, 0)"
    " RETURNING b.balance"
)
# Feed accesses (database.TokenStore). The conflict target names the partial unique index: an
# active access of the same (token, feed, credential) makes the insert do nothing (waiting, if
# another instance's insert of it is not committed yet, for that one's outcome); any other
# conflict (a capability drawn twice) is an error, never a silent no-op. What is read back is
# database.feed_from_row's columns (the digest is only the key).
_FEED_COLUMNS = (
    "capability, token_id, service, feed, credential, valid_until, created_at, revoked_at"
)
_FEED_SELECT = f"SELECT {_FEED_COLUMNS} FROM l402_feed_accesses"
_ACTIVE_FEED_SQL = (
    f"{_FEED_SELECT} WHERE token_id = $1 AND feed = $2 AND credential_digest = $3"
    " AND revoked_at IS NULL"
)
_INSERT_FEED_SQL = (
    f"INSERT INTO l402_feed_accesses ({_FEED_COLUMNS}, credential_digest)"
    " VALUES ($1, $2, $3, $4, $5, $6::float8, $7::float8, $8::float8, $9::bytea)"
)
_NEW_FEED_SQL = (
    f"{_INSERT_FEED_SQL} ON CONFLICT (token_id, feed, credential_digest)"
    " WHERE revoked_at IS NULL DO NOTHING"
)
_REVOKE_FEED_SQL = (
    "UPDATE l402_feed_accesses SET revoked_at = $1::float8"
    " WHERE capability = $2 AND revoked_at IS NULL"
)


# Consumed charges (database.TokenStore). One statement, autocommit: instances consuming one
# payment hash at once all insert; the first insert writes the row, every other one waits for
# its commit (the unique index) and then does nothing, returning no row (were it rolled back,
# the next would write it). Only a primary key conflict is a no-op; a CHECK that fails is an
# error. $1 payment_hash, $2 challenge_id, $3 service, $4 consumed_at, $5 expires_at.
_CONSUME_CHARGE_SQL = (
    "INSERT INTO l402_consumed_charges"
    " (payment_hash, challenge_id, service, consumed_at, expires_at)"
    " VALUES ($1::bytea, $2::text, $3::text, $4::float8, $5::float8)"
    " ON CONFLICT (payment_hash) DO NOTHING RETURNING true"
)
# The oldest expired rows, a bounded batch through the expires_at index. Rows are never
# updated, so the inner condition needs no re-check; instances pruning together each delete
# what the other did not. $1 expired before, $2 limit.
_PRUNE_CHARGES_SQL = (
    "DELETE FROM l402_consumed_charges WHERE payment_hash = ANY(ARRAY("
    "SELECT payment_hash FROM l402_consumed_charges WHERE expires_at < $1::float8"
    " ORDER BY expires_at LIMIT $2::integer))"
)


def credential_digest(credential: str) -> bytes:
    """The key of a feed access's credential in the unique index of active accesses: its
    SHA-256 (store/sqlite.py has the same; a stored row's digest is always this of its
    credential, which rotation keeps)."""
    return hashlib.sha256(credential.encode("utf-8")).digest()


def _feed_args(access: FeedAccess) -> tuple[Any, ...]:
    return (
        access.capability,
        access.token_id,
        access.service,
        access.feed,
        access.credential,
        _float_or_none(access.valid_until),
        float(access.created_at),
        _float_or_none(access.revoked_at),
        credential_digest(access.credential),
    )


def _float_or_none(value: float | None) -> float | None:
    # asyncpg's float8 takes floats only; an int epoch (a caller's time.time() // 1) is fine.
    return None if value is None else float(value)


# The tokens among $1 that are paid: an issued row and a sighting (or a paid_at versions 1-2
# wrote). flush() reads it before and after writing its batch.
_PAID_AMONG = (
    " WHERE i.token_id = ANY($1::bytea[]) AND (i.paid_at IS NOT NULL OR s.paid_at IS NOT NULL)"
)
_PAID_IDS_AMONG = (
    "SELECT i.token_id FROM l402_issued_tokens i"
    " LEFT JOIN l402_paid_sightings s ON s.token_id = i.token_id" + _PAID_AMONG
)

# revenue(): the paid tokens whose first sighting is in [$1, $2). A token's paid_at is the
# earliest of its sighting and its versions 1-2 column, so it is at or after $1 only if each of
# those it has is: the two indexed ranges below find every one (UNION: those found by both
# once), and the outer WHERE keeps those in range.
_REVENUE_SQL = """
    SELECT floor(p.at / $3::float8) * $3::float8 AS start, p.service,
           count(*), sum(p.price_sat)
    FROM (
        SELECT i.token_id, i.service, i.price_sat, LEAST(i.paid_at, s.paid_at) AS at
        FROM l402_paid_sightings s JOIN l402_issued_tokens i ON i.token_id = s.token_id
        WHERE s.paid_at >= $1
        UNION
        SELECT i.token_id, i.service, i.price_sat, LEAST(i.paid_at, s.paid_at) AS at
        FROM l402_issued_tokens i LEFT JOIN l402_paid_sightings s ON s.token_id = i.token_id
        WHERE i.paid_at IS NOT NULL AND i.paid_at >= $1
    ) AS p
    WHERE p.at >= $1 AND p.at < $2 AND ($4::text IS NULL OR p.service = $4::text)
    GROUP BY 1, 2
    ORDER BY 1, 2
"""


def _gcra_step(tat: str) -> str:
    """A SELECT of one GCRA step from the TAT `tat` (an SQL expression, the caller's time at
    the latest): (new tat, allowed, expires_at). limits.gcra operation for operation, in the
    same IEEE doubles, so both always decide alike: allowed when (tat + interval) - burst *
    interval <= now, the TAT then moving on by one interval; refused, it stays `tat`.
    $2 now, $3 interval, $4 burst."""
    return (
        "SELECT CASE WHEN s.ok THEN s.t + $3 ELSE s.t END, s.ok,"
        f" ceil((s.t + $3 + {EXPIRY_MARGIN}) / {EXPIRY_STEP}) * {EXPIRY_STEP}"
        f" FROM (SELECT {tat} AS t, ({tat} + $3) - $4 * $3 <= $2 AS ok) AS s"
    )


# One statement per take. A new key inserts the step from an empty bucket (TAT = now); a key
# that exists takes the conflicting row's lock and steps from the TAT it holds. Under READ
# COMMITTED the DO UPDATE reads the latest committed version of the row it locked (not the
# statement's snapshot), and every other instance's take of the key waits for that lock: the
# takes of a key run one after another, each on its predecessor's result, each exactly once.
# `allowed` keeps the step's verdict for RETURNING (which sees only the new row: a refused
# step leaves the TAT as it was, and the TAT alone cannot tell which way it went).
TAKE_RATE_SQL = (
    "INSERT INTO l402_rate_buckets AS b (key, tat, allowed, expires_at)"
    f" SELECT $1::text, n.* FROM ({_gcra_step('$2::float8')}) AS n"
    " ON CONFLICT (key) DO UPDATE SET (tat, allowed, expires_at) ="
    f" ({_gcra_step('GREATEST(b.tat, $2)')})"
    " RETURNING tat, allowed"
)

# Fixed windows: `used` counts the requests asked in the window starting at window_start, up
# to limit + 1 (more than limit means refused; the cap keeps it from growing). Same locking as
# above. A take from a newer window starts it at 1; one from an older window (an instance
# whose clock is a little behind, at a window's edge) counts in the newer one, so that two
# clocks never take turns resetting the count. Every SET expression reads the row as it was.
# $1 key, $2 window start, $3 limit, $4 expires_at.
TAKE_ALLOWANCE_SQL = (
    "INSERT INTO l402_allowances AS a (key, window_start, used, expires_at)"
    " VALUES ($1::text, $2::bigint, 1, $4::float8)"
    " ON CONFLICT (key) DO UPDATE SET"
    " used = CASE WHEN a.window_start < EXCLUDED.window_start THEN 1"
    " ELSE LEAST(a.used + 1, $3::integer + 1) END,"
    " window_start = GREATEST(a.window_start, EXCLUDED.window_start),"
    " expires_at = GREATEST(a.expires_at, EXCLUDED.expires_at)"
    " RETURNING used"
)

# Expired rows, a batch at a time (through the expires_at index). The outer condition is
# checked again on the row's latest version: a row a take renewed meanwhile stays.
SWEEP_SQL = {
    table: f"DELETE FROM {table} WHERE key = ANY(ARRAY("
    f"SELECT key FROM {table} WHERE expires_at < $1 LIMIT $2)) AND expires_at < $1"
    for table in ("l402_rate_buckets", "l402_allowances")
}


def counter_key(key: str) -> str:
    """The key as stored: itself, or when longer than MAX_COUNTER_KEY_BYTES its beginning and
    its SHA-256 (so two long keys stay apart, and the row stays small)."""
    data = key.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_COUNTER_KEY_BYTES:
        return key
    digest = hashlib.sha256(data).hexdigest()
    head = data[: MAX_COUNTER_KEY_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}#{digest}"


# Query parameters whose values are shown in messages: none is a secret, and they help when
# reading a log. Any other value (password=, sslpassword=, a server setting) shows as ***.
SHOWN_PARAMS = frozenset(
    {
        "connect_timeout",
        "sslmode",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "krbsrvname",
        "gsslib",
        "host",
        "port",
        "application_name",
    }
)
SHOWN_VALUE_CHARS = 200
# A user name this long is scrubbed from messages like a password (see _secrets).
MISPLACED_SECRET_CHARS = 10
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# One host of a host list: [IPv6] or a name (percent-encoded: a socket directory), and a port.
_HOST = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[^\[\]:,\s]*)(?::([0-9]{1,5}))?")
ENCODE_HINT = (
    "cannot tell where its user name and password end: percent-encode any '/', '?', '#' and "
    "'@' in them (as %2F, %3F, %23, %40), and any '@' after the host"
)


@dataclass(frozen=True)
class UriParts:
    """A `l402_store` PostgreSQL URI taken apart the way asyncpg will read it, what messages
    show of it, and why it cannot be used (None: it can)."""

    scheme: str
    authority: str = field(repr=False)  # user info included: never printed
    userinfo: str | None = field(repr=False)  # None: no '@'
    hosts: str
    path: str
    query: str = field(repr=False)
    shown: str
    secrets: tuple[str, ...] = field(repr=False)
    problem: str | None


def _hosts_ok(hosts: str) -> bool:
    for host in hosts.split(","):
        found = _HOST.fullmatch(host)
        if found is None or (found.group(1) is not None and int(found.group(1)) > 65535):
            return False
    return True


def _secrets(userinfo: str | None, query: str) -> tuple[str, ...]:
    """What must never show: the password (in the user info or as ?password=, and a TLS
    key's ?sslpassword=), as written and percent-decoded, longest first (so that replacing
    a shorter one cannot leave part of a longer one behind); and the user name when it is
    long enough to be a password given without its user name (`postgresql://<password>@h`):
    role names are shorter, and worth seeing in the server's messages."""
    user, _, password = (userinfo or "").partition(":")
    forms = {password, unquote(password)}
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if unquote_plus(name) in ("password", "sslpassword"):
            forms |= {value, unquote(value), unquote_plus(value)}
    forms.discard("")
    forms |= {name for name in (user, unquote(user)) if len(name) >= MISPLACED_SECRET_CHARS}
    return tuple(sorted(forms, key=len, reverse=True))


def _shown_query(query: str) -> str:
    shown = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in SHOWN_PARAMS:
            public = len(value) <= SHOWN_VALUE_CHARS and not looks_like_secret(value)
            shown.append(f"{name}={value if public else '***'}")
        else:
            shown.append(f"{name}=***" if SHOWN_NAME.fullmatch(name) else "***")
    return "&".join(shown)


def _scrubbed(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def split_uri(uri: str) -> UriParts:
    """Take a PostgreSQL URI apart as asyncpg will, or say why it cannot be (`problem`).

    The user info is everything between `//` and the last `@` of the authority, and is never
    shown, whatever it holds. asyncpg splits the authority at its FIRST `@`, and every URI
    parser ends the authority at the first `/`, `?` or `#`: so a raw `@` in the user info, or
    any `@` after the authority (where a raw `/`, `?` or `#` in a password puts the rest of
    it), is refused, and shown as the scheme and `***` only. So is a host list that is no
    host list (a URI without its `@` has the password there). Never raises.
    """
    text = uri.strip()
    scheme, sep, rest = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        head = text.split(":", 1)[0]
        shown_scheme = head if SHOWN_SCHEME.fullmatch(head.lower()) else "***"
        return UriParts(
            scheme="",
            authority="",
            userinfo=None,
            hosts="",
            path="",
            query="",
            shown=f"{shown_scheme}:***",
            secrets=(),
            problem="not a postgresql:// URI (postgresql://user:password@host:port/database)",
        )
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    userinfo: str | None
    userinfo, at, hosts = authority.rpartition("@")
    if not at:
        userinfo = None
    before_fragment = tail.partition("#")[0]
    path, _, query = before_fragment.partition("?")
    secrets = _secrets(userinfo, query)
    doubt = f"{scheme}://***"
    hosts_ok = _hosts_ok(hosts)
    problem: str | None = None
    if "@" in tail or "@" in (userinfo or ""):
        problem = ENCODE_HINT
    elif not hosts_ok:
        problem = "malformed host or port"
    if "@" in tail or not hosts_ok:
        shown = doubt
    else:
        mask = "" if userinfo is None else ("***:***@" if ":" in userinfo else "***@")
        shown_hosts = ",".join(shown_hostport(host) for host in hosts.split(","))
        shown = f"{scheme}://{mask}{shown_hosts}{shown_path(path)}"
        shown_params = _shown_query(query)
        if shown_params:
            shown = f"{shown}?{shown_params}"
        # A password may also be misplaced as the database name or a shown parameter.
        shown = _scrubbed(shown, secrets)
    return UriParts(
        scheme=scheme,
        authority=authority,
        userinfo=userinfo,
        hosts=hosts,
        path=path,
        query=query,
        shown=shown,
        secrets=secrets,
        problem=problem,
    )


def shown_uri(uri: str) -> str:
    """A PostgreSQL URI fit for messages and logs: no user info, no password anywhere."""
    return split_uri(uri).shown


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
        return _scrubbed(" ".join(text.split()), self.secrets)

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
    parts = split_uri(uri)
    shown = parts.shown
    if parts.problem is not None:
        raise StoreError(f"store URI {shown}: {parts.problem}")
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
    # The authority as written: split_uri made sure asyncpg splits it as we did.
    dsn = f"postgresql://{parts.authority}{parts.path}"
    if kept:
        dsn = f"{dsn}?{'&'.join(kept)}"
    return Target(dsn=dsn, shown=shown, secrets=parts.secrets, connect_timeout=connect_timeout)


class PostgresCounters:
    """engine.limits.Counters in the store's database: rate limits, the invoice-mint limit and
    free allowances, global across every instance on it. Each take is one statement
    (TAKE_RATE_SQL, TAKE_ALLOWANCE_SQL), run once: never retried, since a retry after a lost
    answer could count the request twice. A take that fails raises StoreError (the engine
    then counts locally); so do the takes in the next COUNTER_REST_SECONDS, without asking.

    Times are the callers' (`now`), as for LocalCounters: instances' clocks must agree to
    within a second or so (NTP) for a shared limit to be exact."""

    # Class attributes so that tests (and only tests) can shorten them.
    timeout = COUNTER_TIMEOUT
    rest_seconds = COUNTER_REST_SECONDS
    sweep_seconds = SWEEP_SECONDS

    def __init__(self, store: "PostgresServerStore") -> None:
        self._store = store
        self._resting_until = 0.0
        # The first sweep one period after opening: what an earlier run left can wait as long.
        self._next_sweep = time.monotonic() + self.sweep_seconds
        self._sweeper: asyncio.Task[None] | None = None

    async def take_rate(self, key: str, interval: float, burst: int, now: float) -> float | None:
        """Spend one request of `key`'s GCRA bucket: None when allowed, else the seconds to
        wait (limits.gcra's answer)."""
        row = await self._take(TAKE_RATE_SQL, counter_key(key), now, interval, burst)
        tat, allowed = float(row[0]), bool(row[1])
        if allowed:
            return None
        return tat + interval - burst * interval - now  # limits.gcra's, in the same order

    async def take_allowance(self, key: str, limit: int, window: int, now: float) -> int | None:
        """Spend one of `limit` requests in `key`'s current window of `window` seconds: how
        many are left, or None when none was (nothing spent)."""
        start = int(now // window) * window
        expires = float(start + window + EXPIRY_MARGIN)
        row = await self._take(TAKE_ALLOWANCE_SQL, counter_key(key), start, limit, expires)
        used = int(row[0])
        return limit - used if used <= limit else None

    async def _take(self, sql: str, *args: object) -> Any:
        if time.monotonic() < self._resting_until:
            raise StoreError(
                f"store {self._store.shown}: not asked, it failed less than "
                f"{self.rest_seconds:g} s ago"
            )
        self._sweep_soon()
        try:
            async with self._store._connection(self.timeout) as conn:
                row = await conn.fetchrow(sql, *args)
        except StoreError:
            self._resting_until = time.monotonic() + self.rest_seconds
            raise
        if row is None:  # an upsert with RETURNING always returns its row
            raise StoreError(f"store {self._store.shown}: the counter update returned nothing")
        return row

    def _sweep_soon(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or (self._sweeper is not None and not self._sweeper.done()):
            return
        self._next_sweep = now + self.sweep_seconds
        self._sweeper = asyncio.create_task(self.sweep(), name="l402proxy counters sweep")

    async def sweep(self) -> int:
        """Delete expired rows (bounded: SWEEP_ROUNDS batches of SWEEP_BATCH per table); how
        many went. A failure is logged at debug level: the next sweep tries again, and rows
        left behind only take room (an expired row counts like no row)."""
        deleted = 0
        now = time.time()
        try:
            for sql in SWEEP_SQL.values():
                for _ in range(SWEEP_ROUNDS):
                    async with self._store._connection() as conn:
                        status = await conn.execute(sql, now, SWEEP_BATCH)
                    count = int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"
                    deleted += count
                    if count < SWEEP_BATCH:
                        break
        except StoreError as exc:
            log.debug("counters sweep failed: %s", exc)
        return deleted

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


class PostgresServerStore(RecordQueue, ChargePruning):
    """The server store on PostgreSQL; see the module docstring. Same interface as
    store/sqlite.py's ServerStore (database.TokenStore); open with `open_server_store(uri)`."""

    # Class attributes so that tests (and only tests) can shorten them.
    operation_timeout = OPERATION_TIMEOUT
    migration_timeout = MIGRATION_TIMEOUT
    keepalive_seconds = KEEPALIVE_SECONDS
    balance_timeout = BALANCE_TIMEOUT
    feed_timeout = FEED_TIMEOUT
    charge_timeout = CHARGE_TIMEOUT

    def __init__(self, pool: asyncpg.Pool, target: Target) -> None:
        RecordQueue.__init__(self)
        self._init_pruning()
        self._pool: asyncpg.Pool | None = pool
        self.target = target
        self.shown = target.shown
        self._secret: bytes | None = None
        # Flushes in order: a paid note must not overtake the issuance record it updates.
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self.listening = False  # the LISTEN connection is up (for tests and diagnostics)
        # Rate limits and allowances, global across instances (the engine looks for this).
        self.counters = PostgresCounters(self)

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
        bound = asyncio.timeout(limit)
        try:
            async with bound, pool.acquire() as conn:
                connected = True
                try:
                    yield conn
                except (asyncio.CancelledError, TimeoutError, OSError):
                    # Cut mid-statement (this bound, a statement's own timeout, a cancelled
                    # caller) or broken. Released as is, the pool would first wait for the
                    # cancellation to reach a database that may not answer (for as long as
                    # it takes: a 2 s counter take took 12 s); a new connection is cheap.
                    conn.terminate()
                    raise
        except StoreError:
            raise
        except DATABASE_ERRORS as exc:
            # Name the limit that fired: this bound; else, not connected yet, the pool's
            # connect_timeout; else a statement's own, asyncpg's command_timeout (statements
            # given a longer one of their own are also given a bound as long).
            if bound.expired():
                waited = limit
            elif not connected:
                waited = min(limit, self.target.connect_timeout)
            else:
                waited = min(limit, self.operation_timeout)
            raise self.target.failure(exc, waited) from None

    @asynccontextmanager
    async def _transaction(self, timeout: float | None = None) -> AsyncIterator[Any]:
        async with self._connection(timeout) as conn, conn.transaction():
            yield conn

    # -- schema ------------------------------------------------------------------------------

    # Reading the schema version is an operation like any other (OPERATION_TIMEOUT): the
    # CLI, and an instance with nothing to migrate, never wait longer. Migrating is bounded
    # by migration_timeout as a whole, and so is each of its statements: asyncpg's
    # command_timeout (operation_timeout) would cut a long step, or the wait for another
    # instance's migration, long before.

    async def _setup(self) -> None:
        # Read the version before anything writes, so a newer database is left untouched.
        async with self._connection() as conn:
            version = await self._schema_version(conn, self.operation_timeout)
        self._check_version(version)
        if version < len(self.migrations()):
            await self._migrate()

    @staticmethod
    async def _schema_version(conn: Any, limit: float) -> int:
        exists = "SELECT to_regclass('l402_schema_version') IS NOT NULL"
        if not await conn.fetchval(exists, timeout=limit):
            return 0
        version = await conn.fetchval("SELECT version FROM l402_schema_version", timeout=limit)
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
            limit = self.migration_timeout
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK, timeout=limit)
            try:
                for target, statements in enumerate(self.migrations(), start=1):
                    async with conn.transaction():
                        await self._migrate_to(conn, target, statements)
            finally:
                with suppress(*DATABASE_ERRORS):
                    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)

    async def _migrate_to(self, conn: Any, target: int, statements: Sequence[str]) -> None:
        """One step, inside its transaction together with the version bump."""
        limit = self.migration_timeout
        exists = "SELECT to_regclass('l402_schema_version') IS NOT NULL"
        if not await conn.fetchval(exists, timeout=limit):
            await conn.execute(VERSION_TABLE, timeout=limit)
            await conn.execute(
                "INSERT INTO l402_schema_version (version) VALUES (0)", timeout=limit
            )
        current = await self._schema_version(conn, limit)
        self._check_version(current)
        if current >= target:
            return
        try:
            for statement in statements:
                await conn.execute(statement, timeout=limit)
        except asyncpg.PostgresError as exc:
            raise StoreError(
                f"store {self.shown}: migration to schema version {target} failed: "
                f"{self.target.scrub(str(exc))}"
            ) from None
        await conn.execute("UPDATE l402_schema_version SET version = $1", target, timeout=limit)
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

    async def flush(self) -> list[IssuedToken]:
        """Write every queued record in one transaction. On failure keep them (for the next
        flush, within the queue's bound), clear `healthy` and raise StoreError. With nothing
        queued: a no-op while healthy, else a probe of the database that sets `healthy` again
        when it answers (so calling flush periodically is enough to recover). Returns the
        tokens this instance was first to make paid (database.TokenStore), also those of
        writes list_tokens, revoke and revenue made since the last flush(). Prunes expired
        consumed charges when due (ChargePruning: a bounded batch, never a failure of the
        flush)."""
        await self._write_queue()
        await self._prune_when_due()
        return self._take_settled()

    async def _write_queue(self) -> None:
        async with self._flush_lock:
            if not self._pending_issued and not self._pending_paid:
                if not self._healthy:
                    with self._flushing():
                        async with self._connection() as conn:
                            await conn.execute("SELECT 1")
                    self._set_healthy(True)
                return
            batch = self._take_batch()
            try:
                with self._flushing():
                    async with self._transaction() as conn:
                        settled = await self._write(conn, batch.issued, batch.paid)
            except BaseException as exc:
                self._give_back(batch)
                if isinstance(exc, Exception):  # not a cancelled flush: the database failed
                    self._set_healthy(False)
                raise
            self._set_healthy(True)
            self._keep_settled(settled)

    async def _write(
        self, conn: Any, issued: Sequence[IssuedToken], paid: Sequence[tuple[bytes, float]]
    ) -> list[IssuedToken]:
        """Write a batch (inside the caller's transaction); the tokens it made paid.

        Paid = an issued row and a sighting, which two instances may write at the same time
        (the seller its row, another its sighting), each reading the other's table before the
        other commits: both would see the token unpaid, and the sale would count nowhere.
        SETTLE_LOCK keeps such flushes apart: one writing sightings holds it alone; the rest
        (issued rows only, the 402s' flood) share it among themselves. Under it, what is paid
        before and after the writes is this batch's doing (READ COMMITTED: each statement sees
        what was committed before it began, so all that the lock's last holder wrote).
        """
        if paid:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SETTLE_LOCK)
        else:
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", SETTLE_LOCK)
        ids = list(dict.fromkeys([t.token_id for t in issued] + [t for t, _ in paid]))
        before = {bytes(row[0]) for row in await conn.fetch(_PAID_IDS_AMONG, ids)}
        if issued:
            await self._insert_issued(conn, issued)
        if paid:
            await self._upsert_sightings(conn, paid)
        after = await conn.fetch(_TOKEN_SELECT + _PAID_AMONG, ids)
        return [token_from_row(row) for row in after if bytes(row[0]) not in before]

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
    async def _upsert_sightings(conn: Any, paid: Sequence[tuple[bytes, float]]) -> None:
        # An upsert, apart from the issued rows (see MIGRATIONS, version 3): the token's row
        # may not be written yet. min() per token (one statement may not update a row twice)
        # and the WHERE: whatever order notes arrive in, and however often a batch is retried,
        # the earliest sighting is kept, and a later one writes nothing. ORDER BY: instances
        # upserting the same tokens lock their rows in one order, so they cannot deadlock.
        await conn.execute(
            "INSERT INTO l402_paid_sightings AS s (token_id, paid_at)"
            " SELECT t, min(a) FROM unnest($1::bytea[], $2::float8[]) AS u(t, a)"
            " GROUP BY t ORDER BY t"
            " ON CONFLICT (token_id) DO UPDATE SET paid_at = EXCLUDED.paid_at"
            " WHERE EXCLUDED.paid_at < s.paid_at",
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
        await self._write_queue()  # so a token this instance just issued can be found
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
        in order (see revoke()), so everything after the cursor is still there to read. One
        statement (one snapshot) reads the largest seq too: a database restored from a backup
        is behind the cursor (see database.start_from). Its first row is there even with no
        match.
        """
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT t.top, r.seq, r.token_id"
                " FROM (SELECT coalesce(max(seq), 0) AS top FROM l402_revocations) AS t"
                " LEFT JOIN l402_revocations r"
                " ON r.seq > (CASE WHEN t.top < $1 THEN 0 ELSE $1 END)"
                " ORDER BY r.seq",
                cursor,
            )
        start = start_from(cursor, int(rows[0][0]), self.shown)
        found = [(int(row[1]), bytes(row[2])) for row in rows if row[1] is not None]
        if not found:
            return start, set()
        return found[-1][0], {token_id for _, token_id in found}

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
        await self._write_queue()  # include what this instance has issued
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

    async def revenue(
        self, since: float, until: float, bucket_seconds: int, service: str | None = None
    ) -> list[RevenueRow]:
        """Sales per bucket and service (database.TokenStore), oldest first."""
        check_revenue_range(since, until, bucket_seconds)
        await self._write_queue()  # include what this instance has seen paid
        async with self._connection() as conn:
            rows = await conn.fetch(
                _REVENUE_SQL, float(since), float(until), float(bucket_seconds), service
            )
        return [RevenueRow(float(row[0]), row[1], int(row[2]), int(row[3])) for row in rows]

    async def draw(self, token_id: bytes, size: int, amount: int) -> int | None:
        """Draw `amount` from the token's bundle of `size`: what is left, or None when nothing
        was (database.TokenStore). One statement, at once (not queued), bounded by
        balance_timeout."""
        check_draw(token_id, size, amount)
        async with self._connection(self.balance_timeout) as conn:
            row = await conn.fetchrow(_DRAW_SQL, token_id, size, amount)
        return None if row is None else int(row[0])

    async def charge(self, token_id: bytes, size: int, amount: int) -> int:
        """Subtract usage known after the fact, never below 0: what is left."""
        check_draw(token_id, size, amount)
        async with self._connection(self.balance_timeout) as conn:
            row = await conn.fetchrow(_CHARGE_SQL, token_id, size, amount)
        if row is None:  # an upsert with RETURNING always returns its row
            raise StoreError(f"store {self.shown}: the balance update returned nothing")
        return int(row[0])

    async def balance_of(self, token_id: bytes) -> int | None:
        """What is left of the token's bundle; None when it was never drawn from."""
        check_id("token_id", token_id)
        async with self._connection(self.balance_timeout) as conn:
            value = await conn.fetchval(
                "SELECT balance FROM l402_token_balances WHERE token_id = $1", token_id
            )
        return None if value is None else int(value)

    # -- private podcast feeds (database.TokenStore) ----------------------------------------

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
        one) has an access of its own: a capability opens what its credential opens. Bounded
        by feed_timeout as a whole."""
        check_feed_for(token_id, service, feed, credential, valid_until, when)
        digest = credential_digest(credential)
        with hiding([credential]):
            async with self._connection(self.feed_timeout) as conn:
                # Each statement on its own (autocommit, READ COMMITTED): the read after the
                # insert takes a new snapshot, so it sees the row another instance committed
                # while the insert waited for it (one statement would not: its snapshot is
                # older than that row, and the insert did nothing).
                for _ in range(FEED_FOR_ATTEMPTS):
                    row = await conn.fetchrow(_ACTIVE_FEED_SQL, token_id, feed, digest)
                    if row is not None:
                        return feed_from_row(row)
                    await conn.execute(
                        _NEW_FEED_SQL,
                        database.new_feed_capability(),
                        token_id,
                        service,
                        feed,
                        credential,
                        _float_or_none(valid_until),
                        float(when),
                        None,
                        digest,
                    )
                row = await conn.fetchrow(_ACTIVE_FEED_SQL, token_id, feed, digest)
        if row is None:  # revoked as often as it was made: someone revokes it in a loop
            raise StoreError(f"store {self.shown}: the feed access was revoked while being made")
        return feed_from_row(row)

    async def feed_access(self, capability: str) -> FeedAccess | None:
        """The access of `capability`, revoked and expired ones too; None if there is none.
        Bounded by feed_timeout."""
        if not is_feed_capability(capability):
            return None
        async with self._connection(self.feed_timeout) as conn:
            row = await conn.fetchrow(f"{_FEED_SELECT} WHERE capability = $1", capability)
        return None if row is None else feed_from_row(row)

    async def list_feeds(
        self, *, include_inactive: bool = False, limit: int = 1000
    ) -> list[FeedAccess]:
        """Feed accesses, newest first: the active ones, or every one."""
        if limit < 1:
            # StoreError, not ValueError: the CLI passes --limit straight through.
            raise StoreError(f"limit must be at least 1, got {limit}")
        where, params = "", list[Any]()
        if not include_inactive:
            where = " WHERE revoked_at IS NULL AND (valid_until IS NULL OR valid_until > $1)"
            params = [time.time()]
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"{_FEED_SELECT}{where} ORDER BY created_at DESC, row_id DESC"
                f" LIMIT ${len(params) + 1}",
                *params,
                limit,
            )
        return [feed_from_row(row) for row in rows]

    async def revoke_feeds(self, ref: str, when: float) -> list[FeedAccess]:
        """Revoke the active accesses `ref` names (database.TokenStore): those revoked now."""
        named = parse_feed_ref(ref)
        async with self._transaction() as conn:
            active = await self._named_feeds(conn, named)
            await conn.executemany(_REVOKE_FEED_SQL, [(float(when), a.capability) for a in active])
        return [replace(access, revoked_at=when) for access in active]

    async def rotate_feeds(self, ref: str, when: float) -> list[FeedAccess]:
        """Replace the active accesses `ref` names by new ones, in one transaction (see
        database.TokenStore); the new ones."""
        named = parse_feed_ref(ref)
        credentials: list[str] = []
        with hiding(credentials):
            async with self._transaction() as conn:
                active = await self._named_feeds(conn, named)
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
                # active accesses (a row this transaction updated no longer conflicts). A plain
                # insert: any conflict fails (and rolls back) the whole rotation.
                await conn.executemany(
                    _REVOKE_FEED_SQL, [(float(when), a.capability) for a in active]
                )
                await conn.executemany(_INSERT_FEED_SQL, [_feed_args(a) for a in fresh])
        return fresh

    # -- Payment-scheme charges (database.TokenStore) ---------------------------------------

    async def consume_charge(
        self, payment_hash: bytes, challenge_id: str, service: str, expires_at: float, when: float
    ) -> bool:
        """True the first time `payment_hash` is consumed, by any instance on the database;
        False for every later or concurrent call (database.TokenStore). One statement, at once
        (not queued), bounded by charge_timeout."""
        check_consume_charge(payment_hash, challenge_id, service, expires_at, when)
        async with self._connection(self.charge_timeout) as conn:
            row = await conn.fetchrow(
                _CONSUME_CHARGE_SQL,
                payment_hash,
                challenge_id,
                service,
                float(when),
                float(expires_at),
            )
        return row is not None

    async def prune_charges(self, now: float, limit: int = CHARGE_PRUNE_LIMIT) -> int:
        """Delete at most `limit` charges whose challenge expired more than
        CHARGE_EXPIRY_MARGIN before `now`; how many went. One statement."""
        check_prune_charges(now, limit)
        async with self._connection() as conn:
            status = await conn.execute(
                _PRUNE_CHARGES_SQL, float(now - CHARGE_EXPIRY_MARGIN), limit
            )
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"

    @staticmethod
    async def _named_feeds(conn: Any, ref: FeedRef) -> list[FeedAccess]:
        """The active accesses `ref` names, locked (FOR UPDATE: a concurrent revocation or
        rotation of them waits, and what it changed first is read again, so each is revoked
        once); UnknownTokenRef or AmbiguousTokenRef when it names nothing or several tokens.
        Always locked in one order (feed, capability), so two rotations cannot deadlock."""
        if ref.capability is not None:
            row = await conn.fetchrow(
                f"{_FEED_SELECT} WHERE capability = $1 FOR UPDATE", ref.capability
            )
            if row is not None:
                access = feed_from_row(row)
                return [access] if access.revoked_at is None else []
            if ref.prefix is None:
                raise unknown_feed_ref(ref)
        assert ref.prefix is not None  # parse_feed_ref gives one or the other
        low, high = prefix_range(ref.prefix)
        where, params = "token_id >= $1", [low]
        if high is not None:
            where, params = f"{where} AND token_id < $2", [low, high]
        found = await conn.fetch(
            f"SELECT DISTINCT token_id FROM l402_feed_accesses WHERE {where}", *params
        )
        token_id = feed_token_target(ref, [bytes(row[0]) for row in found])
        rows = await conn.fetch(
            f"{_FEED_SELECT} WHERE token_id = $1 AND revoked_at IS NULL"
            " ORDER BY feed, capability FOR UPDATE",
            token_id,
        )
        return [feed_from_row(row) for row in rows]

    async def close(self) -> None:
        """Flush queued records, stop listening, close the pool. Raises StoreError if records
        could not be written (they are lost then, and the log says how many)."""
        if self._pool is None:
            return
        try:
            await self._write_queue()
        except StoreError:
            log.error("store %s: %d queued records lost on close", self.shown, self.pending)
            raise
        finally:
            pool, self._pool = self._pool, None
            await self.counters.stop()
            if self._listener is not None:
                self._listener.cancel()
                with suppress(asyncio.CancelledError):
                    await self._listener
                self._listener = None
            try:
                await asyncio.wait_for(pool.close(), self.operation_timeout)
            except DATABASE_ERRORS:
                pool.terminate()
