"""Private podcast feed accesses in the server stores (TokenStore.feed_for, feed_access,
list_feeds, revoke_feeds, rotate_feeds): the contract on SQLite and a real PostgreSQL
(test_store.py's `store_uri`, `store` and `other` fixtures run each test once per store), one
capability per token and feed across instances, references, rotation in one transaction, schema
migration, the credential kept out of every output, and a database that cannot be used."""

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from l402proxy.store import StoreError, TokenStore, is_postgres_uri, open_server_store
from l402proxy.store import database as store_database
from l402proxy.store.database import (
    AmbiguousTokenRef,
    BadTokenRef,
    FeedAccess,
    UnknownTokenRef,
    is_feed_capability,
    new_feed_capability,
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

FEED = "/feed.xml"
FAR = 4_000_000_000.0  # 2096: a token valid for the whole test run
# The schema version each store's feed accesses came with: migrating from the one before it
# must keep everything.
FEEDS_VERSION = {"sqlite": 5, "postgresql": 6}


def token_id() -> bytes:
    return os.urandom(32)


def credential() -> str:
    """A credential shaped as the engine stores one: `<macaroon b64>:<preimage hex>`."""
    return f"{base64.b64encode(os.urandom(90)).decode()}:{os.urandom(32).hex()}"


def credential_of(token: bytes) -> str:
    """The one credential a token has unless a test says otherwise (as the engine stores the
    same string for each use of one credential): the same for every call with `token`."""
    macaroon = base64.b64encode(hashlib.sha512(token).digest() + token).decode()
    return f"{macaroon}:{hashlib.sha256(token).hexdigest()}"


async def feed_for(
    instance: TokenStore,
    token: bytes,
    feed: str = FEED,
    *,
    service: str = "podcast",
    secret: str | None = None,
    valid_until: float | None = FAR,
    when: float = 1_000.0,
) -> FeedAccess:
    secret = secret or credential_of(token)
    return await instance.feed_for(token, service, feed, secret, valid_until, when)


def caps(accesses: list[FeedAccess]) -> list[str]:
    return [access.capability for access in accesses]


def assert_clean(error: BaseException, secret: str, *others: str) -> None:
    """One line, without the other secrets, nor any 12 characters in a row of the credential
    (PostgreSQL quotes a long value cut short: its beginning and "...")."""
    assert_one_clean_line(error, *others)
    text = str(error)
    for start in range(len(secret) - 11):
        assert secret[start : start + 12] not in text, text


# --- feed_for and feed_access ---------------------------------------------------------------


async def test_feed_for_makes_one_access_per_token_and_feed_and_gives_it_back(
    store: TokenStore, other: TokenStore
) -> None:
    token, secret = token_id(), credential()
    first = await feed_for(store, token, secret=secret, when=100.0)

    assert is_feed_capability(first.capability)
    assert len(first.capability) == 22
    assert (first.token_id, first.service, first.feed) == (token, "podcast", FEED)
    assert (first.credential, first.valid_until, first.created_at) == (secret, FAR, 100.0)
    assert first.revoked_at is None
    assert first.status() == "active"
    assert first.path == f"/.l402/feed/{first.capability}/feed.xml"

    # Asked again with the same credential (the listener unlocks again, here or at another
    # instance): the same row, as it was made, whatever else the later call brings.
    again = await feed_for(store, token, secret=secret, valid_until=None, when=200.0)
    elsewhere = await feed_for(other, token, service="articles", secret=secret, when=300.0)
    assert again == elsewhere == first
    assert again.credential == secret
    assert await store.feed_access(first.capability) == first
    assert await other.feed_access(first.capability) == first


async def test_concurrent_feed_for_from_two_instances_agree_on_one_capability(
    store: TokenStore, other: TokenStore
) -> None:
    """16 calls at once for each of 4 tokens (each with its one credential), over two
    instances (SQLite: two connections to one file, taking its locks; PostgreSQL: two pools):
    every call for a token gets the same capability, and one row is written per token."""
    tokens = [token_id() for _ in range(4)]
    calls = [feed_for(store if n % 2 else other, token) for token in tokens for n in range(16)]
    results = await asyncio.wait_for(asyncio.gather(*calls), BOUND * 4)

    by_token: dict[bytes, set[str]] = {}
    for access in results:
        by_token.setdefault(access.token_id, set()).add(access.capability)
    assert {token: len(found) for token, found in by_token.items()} == dict.fromkeys(tokens, 1)
    listed = await store.list_feeds(include_inactive=True)
    assert sorted(caps(listed)) == sorted(found.pop() for found in by_token.values())


async def test_each_feed_of_a_token_and_each_token_get_their_own_access(
    store: TokenStore,
) -> None:
    token, another = token_id(), token_id()
    main = await feed_for(store, token, "/feed.xml")
    bonus = await feed_for(store, token, "/bonus/feed.xml")
    theirs = await feed_for(store, another, "/feed.xml")
    assert len({main.capability, bonus.capability, theirs.capability}) == 3
    assert (await feed_for(store, token, "/bonus/feed.xml")).capability == bonus.capability


async def test_each_credential_of_a_token_gets_its_own_access(
    store: TokenStore, other: TokenStore
) -> None:
    """A capability is worth exactly the credential that minted it: another credential of the
    same token (an attenuated copy, or the full one asking after the copy) never gets an
    access made for another, at either instance, after a rotation neither; revoking or rotating
    by the token's prefix acts on every credential's access."""
    token, full, narrowed = token_id(), credential(), credential()
    mine = await feed_for(store, token, secret=full, when=100.0)
    theirs = await feed_for(other, token, secret=narrowed, when=200.0)
    assert mine.capability != theirs.capability
    assert (mine.credential, theirs.credential) == (full, narrowed)
    assert await feed_for(other, token, secret=full) == mine
    assert await feed_for(store, token, secret=narrowed) == theirs

    [rotated] = await store.rotate_feeds(theirs.capability, 300.0)
    assert rotated.credential == narrowed
    assert await feed_for(other, token, secret=narrowed) == rotated
    assert await feed_for(other, token, secret=full) == mine

    fresh = await other.rotate_feeds(token.hex()[:8], 400.0)
    assert sorted(a.credential for a in fresh) == sorted([full, narrowed])
    assert {(await feed_for(store, token, secret=a.credential)).capability for a in fresh} == set(
        caps(fresh)
    )
    revoked = await store.revoke_feeds(token.hex()[:8], 500.0)
    assert sorted(caps(revoked)) == sorted(caps(fresh))
    assert await store.list_feeds() == []


async def test_feed_access_finds_revoked_and_expired_rows_and_nothing_else(
    store: TokenStore,
) -> None:
    revoked = await feed_for(store, token_id())
    expired = await feed_for(store, token_id(), valid_until=500.0, when=400.0)
    [done] = await store.revoke_feeds(revoked.capability, 2_000.0)
    assert done.revoked_at == 2_000.0

    found = await store.feed_access(revoked.capability)
    assert found is not None
    assert (found.revoked_at, found.status()) == (2_000.0, "revoked")
    found = await store.feed_access(expired.capability)
    assert found is not None
    assert (found.revoked_at, found.status(), found.status(now=499.0)) == (
        None,
        "expired",
        "active",
    )

    assert await store.feed_access(new_feed_capability()) is None
    for garbage in ("", "short", revoked.capability + "x", "../../../etc/passwd", "a" * 10_000):
        assert await store.feed_access(garbage) is None


async def test_an_expired_access_is_returned_as_it_is(store: TokenStore) -> None:
    """The engine never asks for an expired token's feed; if it does, the active row comes back
    unchanged (no new capability, no new expiry)."""
    token = token_id()
    made = await feed_for(store, token, valid_until=50.0, when=100.0)
    assert made.status() == "expired"
    again = await feed_for(store, token, valid_until=FAR, when=200.0)
    assert again == made


async def test_after_a_revocation_the_next_feed_for_makes_a_new_access(
    store: TokenStore, other: TokenStore
) -> None:
    token = token_id()
    old = await feed_for(store, token)
    await other.revoke_feeds(old.capability, 2_000.0)
    new = await feed_for(store, token, when=3_000.0)
    assert new.capability != old.capability
    assert new.created_at == 3_000.0
    assert await feed_for(other, token) == new


def test_new_capabilities_are_url_safe_and_never_look_like_an_option() -> None:
    """A capability is an argument of `l402proxy feeds revoke|rotate`: one starting with '-'
    (1 in 64 of token_urlsafe's) would be taken for an option."""
    drawn = {new_feed_capability() for _ in range(2000)}
    assert len(drawn) == 2000
    assert all(is_feed_capability(cap) and not cap.startswith("-") for cap in drawn)


# --- the credential -------------------------------------------------------------------------


async def test_the_credential_is_never_in_repr_or_json(store: TokenStore) -> None:
    secret = credential()
    made = await feed_for(store, token_id(), secret=secret)
    [rotated] = await store.rotate_feeds(made.capability, 2_000.0)
    for access in (made, rotated, *(await store.list_feeds(include_inactive=True))):
        assert access.credential == secret
        for text in (repr(access), str(access), json.dumps(access.to_json()), repr([access])):
            assert secret not in text
            assert secret.split(":")[0] not in text  # nor the macaroon alone
        assert "credential" not in access.to_json()
    assert set(made.to_json()) == {
        "capability",
        "token_id",
        "service",
        "feed",
        "path",
        "valid_until",
        "created_at",
        "revoked_at",
        "status",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token": b"short"}, "token_id must be 32 bytes"),
        ({"service": ""}, "service must be a non-empty string"),
        ({"service": 7}, "service must be a non-empty string"),
        ({"feed": "feed.xml"}, "feed must be a path starting with '/'"),
        ({"feed": "/feed\x00.xml"}, "feed must be a non-empty string"),
        ({"feed": "/\udc80.xml"}, "feed must be a non-empty string"),
        ({"feed": "/" + "a" * 5000}, "feed must be a non-empty string"),
        ({"secret": ""}, "credential must be printable ASCII"),
        ({"secret": "AgEB\n:" + "ab" * 32}, "credential must be printable ASCII"),
        ({"secret": " AgEB:" + "ab" * 32}, "credential must be printable ASCII"),
        ({"secret": "AgEB:" + "é" * 32}, "credential must be printable ASCII"),
        ({"secret": "A" * 20_000 + ":" + "ab" * 32}, "credential must be printable ASCII"),
        ({"valid_until": float("nan")}, "valid_until must be an epoch time"),
        ({"valid_until": "9e12"}, "valid_until must be an epoch time"),
        ({"when": float("inf")}, "when must be an epoch time"),
        ({"when": True}, "when must be an epoch time"),
    ],
)
async def test_bad_arguments_are_refused_before_the_database(
    store: TokenStore, change: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "token": token_id(),
        "service": "podcast",
        "feed": FEED,
        "secret": credential(),
        "valid_until": FAR,
        "when": 1_000.0,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message) as error:
        await store.feed_for(
            args["token"],  # type: ignore[arg-type]
            args["service"],  # type: ignore[arg-type]
            args["feed"],  # type: ignore[arg-type]
            args["secret"],  # type: ignore[arg-type]
            args["valid_until"],  # type: ignore[arg-type]
            args["when"],  # type: ignore[arg-type]
        )
    if args["secret"]:
        assert str(args["secret"]) not in str(error.value)
    assert await store.list_feeds(include_inactive=True) == []


# --- listing --------------------------------------------------------------------------------


async def test_list_feeds_shows_the_active_ones_newest_first_or_every_one(
    store: TokenStore, other: TokenStore
) -> None:
    older = await feed_for(store, token_id(), when=100.0)
    expired = await feed_for(store, token_id(), valid_until=300.0, when=200.0)
    revoked = await feed_for(other, token_id(), when=300.0)
    newer = await feed_for(other, token_id(), valid_until=None, when=400.0)
    await store.revoke_feeds(revoked.capability, 500.0)

    assert caps(await store.list_feeds()) == caps([newer, older])
    everything = await other.list_feeds(include_inactive=True)
    assert caps(everything) == caps([newer, revoked, expired, older])
    assert [a.status() for a in everything] == ["active", "revoked", "expired", "active"]
    assert caps(await store.list_feeds(include_inactive=True, limit=2)) == caps([newer, revoked])
    assert caps(await store.list_feeds(limit=1)) == caps([newer])
    with pytest.raises(StoreError, match="limit must be at least 1, got 0"):
        await store.list_feeds(limit=0)


async def test_feed_accesses_survive_closing_and_reopening(store_uri: str) -> None:
    token = token_id()
    first = await open_server_store(store_uri)
    try:
        made = await feed_for(first, token)
    finally:
        await first.close()
    second = await open_server_store(store_uri)
    try:
        assert await second.feed_access(made.capability) == made
        assert await feed_for(second, token) == made
    finally:
        await second.close()


async def test_a_closed_store_refuses(store_uri: str) -> None:
    closed = await open_server_store(store_uri)
    made = await feed_for(closed, token_id())
    await closed.close()
    for call in (
        lambda: feed_for(closed, token_id()),
        lambda: closed.feed_access(made.capability),
        lambda: closed.list_feeds(),
        lambda: closed.revoke_feeds(made.capability, 1.0),
        lambda: closed.rotate_feeds(made.capability, 1.0),
    ):
        with pytest.raises(StoreError, match="closed"):
            await call()


# --- revoking -------------------------------------------------------------------------------


async def test_revoke_by_capability_revokes_that_access_only(
    store: TokenStore, other: TokenStore
) -> None:
    token = token_id()
    main = await feed_for(store, token, "/feed.xml")
    bonus = await feed_for(store, token, "/bonus.xml")

    [revoked] = await other.revoke_feeds(f"  {main.capability}\n", 2_000.0)
    assert revoked.capability == main.capability
    assert revoked.revoked_at == 2_000.0
    assert revoked.credential == main.credential  # the same row, now revoked
    assert caps(await store.list_feeds()) == [bonus.capability]

    # Revoked already: nothing more to do, and the first time stays.
    assert await store.revoke_feeds(main.capability, 3_000.0) == []
    found = await store.feed_access(main.capability)
    assert found is not None
    assert found.revoked_at == 2_000.0


@pytest.mark.parametrize("form", ["prefix", "PREFIX", "odd", "padded", "full"])
async def test_revoke_by_token_prefix_revokes_every_active_access_of_the_token(
    store: TokenStore, form: str
) -> None:
    token, decoy = token_id(), token_id()
    accesses = [await feed_for(store, token, feed) for feed in ("/a.xml", "/b.xml", "/c.xml")]
    await store.revoke_feeds(accesses[2].capability, 1_500.0)
    kept = await feed_for(store, decoy)
    ref = {
        "prefix": token.hex()[:8],
        "PREFIX": token.hex()[:10].upper(),
        "odd": token.hex()[:11],
        "padded": f" {token.hex()[:12]}\t",
        "full": token.hex(),
    }[form]

    revoked = await store.revoke_feeds(ref, 2_000.0)

    assert caps(revoked) == caps(accesses[:2])  # ordered by feed
    assert {a.revoked_at for a in revoked} == {2_000.0}
    assert caps(await store.list_feeds()) == [kept.capability]
    gone = await store.feed_access(accesses[2].capability)
    assert gone is not None
    assert gone.revoked_at == 1_500.0  # revoked before: untouched
    # The token still has (revoked) accesses: known, and nothing left to revoke.
    assert await store.revoke_feeds(ref, 3_000.0) == []


async def test_revoke_prefix_bounds_are_exact(store: TokenStore) -> None:
    inside = bytes.fromhex("abcdef01") + os.urandom(28)
    below = bytes.fromhex("abcdef00") + b"\xff" * 28
    above = bytes.fromhex("abcdef02") + bytes(28)
    top = b"\xff" * 32
    made = {token: await feed_for(store, token) for token in (inside, below, above, top)}

    assert caps(await store.revoke_feeds("abcdef01", 1.0)) == [made[inside].capability]
    # All-'f' prefix: the range has no upper bound.
    assert caps(await store.revoke_feeds("fffffffff", 1.0)) == [made[top].capability]
    assert sorted(caps(await store.list_feeds())) == sorted(
        [made[below].capability, made[above].capability]
    )


async def test_an_ambiguous_prefix_says_how_many_tokens_it_matches(store: TokenStore) -> None:
    shared = bytes.fromhex("0123456789")
    tokens = [shared + os.urandom(27) for _ in range(3)]
    for token in tokens:
        await feed_for(store, token)
    # Revoked accesses count: the prefix names a token whatever state its accesses are in.
    await store.revoke_feeds(tokens[2].hex(), 1.0)

    for call in (store.revoke_feeds, store.rotate_feeds):
        with pytest.raises(AmbiguousTokenRef) as error:
            await call("01234567", 2.0)
        assert str(error.value) == (
            "'01234567' is ambiguous: it matches 3 tokens with feed accesses; give more characters"
        )
    assert len(await store.list_feeds()) == 2  # nothing was revoked
    [one] = await store.revoke_feeds(tokens[1].hex()[:20], 2.0)
    assert one.token_id == tokens[1]


@pytest.mark.parametrize(
    ("ref", "kind", "message"),
    [
        ("DeadBeef", UnknownTokenRef, "no feed access matches 'DeadBeef'"),
        ("0" * 64, UnknownTokenRef, "no feed access matches '" + "0" * 64 + "'"),
        ("AAAAAAAAAAAAAAAAAAAAA_", UnknownTokenRef, "no feed access matches 'AAAA"),
        ("0000000", BadTokenRef, "too short: give a capability"),
        ("0" * 65, BadTokenRef, "longer than a token id"),
        ("xyz12345", BadTokenRef, "neither a capability"),
        ("", BadTokenRef, "neither a capability"),
        ("AAAAAAAAAAAAAAAAAAAAA/", BadTokenRef, "neither a capability"),
        ("abc\ndef\n" * 3, BadTokenRef, "'the reference given' is neither"),
    ],
)
async def test_unknown_and_bad_references(
    store: TokenStore, ref: str, kind: type[StoreError], message: str
) -> None:
    """As for tokens: StoreError subclasses, one line each. A full token id with no feed
    access is unknown (unlike `tokens revoke`: there is nothing to revoke for it)."""
    await feed_for(store, bytes(31) + b"\x01")  # shares every prefix of "0" * 63
    for call in (store.revoke_feeds, store.rotate_feeds):
        with pytest.raises(kind, match=re.escape(message)) as error:
            await call(ref, 1.0)
        assert "\n" not in str(error.value)
    assert len(await store.list_feeds()) == 1


async def test_a_reference_that_could_be_both_is_a_capability_first(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """22 hex characters are both a capability's shape and a token id prefix: a capability of
    that value wins; without one, the token prefix."""
    both = "0123456789abcdef012345"
    token = bytes.fromhex(both + "00") + os.urandom(20)  # its id starts with `both`
    theirs = await feed_for(store, token)

    [by_prefix] = await store.revoke_feeds(both, 1.0)
    assert by_prefix.capability == theirs.capability

    monkeypatch.setattr(store_database, "new_feed_capability", lambda: both)
    ours = await feed_for(store, token_id(), when=2.0)
    monkeypatch.undo()
    again = await feed_for(store, token, when=3.0)
    assert ours.capability == both
    [by_capability] = await store.revoke_feeds(both, 4.0)
    assert by_capability.capability == both
    assert caps(await store.list_feeds()) == [again.capability]


# --- rotating -------------------------------------------------------------------------------


async def test_rotate_replaces_each_active_access_by_a_new_one(
    store: TokenStore, other: TokenStore
) -> None:
    token, secret = token_id(), credential()
    olds = [
        await feed_for(store, token, feed, secret=secret, when=100.0)
        for feed in ("/a.xml", "/b.xml")
    ]
    gone = await feed_for(store, token, "/c.xml", secret=secret)
    await store.revoke_feeds(gone.capability, 150.0)

    fresh = await other.rotate_feeds(token.hex()[:8], 2_000.0)

    assert [a.feed for a in fresh] == ["/a.xml", "/b.xml"]
    for old, new in zip(olds, fresh, strict=True):
        assert is_feed_capability(new.capability)
        assert new.capability != old.capability
        assert (new.token_id, new.service, new.feed, new.credential, new.valid_until) == (
            old.token_id,
            old.service,
            old.feed,
            secret,
            old.valid_until,
        )
        assert (new.created_at, new.revoked_at) == (2_000.0, None)
        assert await store.feed_access(new.capability) == new
        replaced = await store.feed_access(old.capability)
        assert replaced is not None
        assert replaced.revoked_at == 2_000.0
        # What the engine asks for from now on is the new access: the credential (and the key
        # made of it) went over unchanged.
        assert await feed_for(store, token, old.feed, secret=secret, when=3_000.0) == new
    assert sorted(caps(await store.list_feeds())) == sorted(caps(fresh))

    # By capability: that access only; a revoked one has nothing to rotate.
    [newer] = await store.rotate_feeds(fresh[0].capability, 4_000.0)
    assert newer.feed == "/a.xml"
    assert await store.rotate_feeds(fresh[0].capability, 5_000.0) == []
    assert await store.rotate_feeds(gone.capability, 5_000.0) == []
    assert sorted(caps(await store.list_feeds())) == sorted([newer.capability, fresh[1].capability])


async def test_a_rotation_is_one_transaction(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation whose second new access cannot be written (its capability is taken: drawn
    twice) changes nothing, and its error is one line without the credential."""
    token, secret = token_id(), credential()
    olds = [await feed_for(store, token, feed, secret=secret) for feed in ("/a.xml", "/b.xml")]
    taken = (await feed_for(store, token_id())).capability
    drawn = iter([new_feed_capability(), taken])
    monkeypatch.setattr(store_database, "new_feed_capability", lambda: next(drawn))

    with pytest.raises(StoreError) as error:
        await store.rotate_feeds(token.hex(), 2_000.0)

    assert_clean(error.value, secret)
    for old in olds:
        assert await store.feed_access(old.capability) == old  # still active, unchanged
    assert len(await store.list_feeds(include_inactive=True)) == 3


# --- schema ---------------------------------------------------------------------------------


async def test_migrating_from_the_version_before_feeds_keeps_everything(
    request: pytest.FixtureRequest, store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = migrations_of(store_uri)
    version = FEEDS_VERSION["postgresql" if is_postgres_uri(store_uri) else "sqlite"]
    current = list(module.MIGRATIONS)
    assert len(current) >= version
    monkeypatch.setattr(module, "MIGRATIONS", current[: version - 1])
    old = await open_server_store(store_uri)
    tokens = [make_token(created_at=float(n)) for n in range(3)]
    try:
        secret = await old.secret()
        for token in tokens:
            old.note_issued(token)
        old.note_paid(tokens[0].token_id, 10.0)
        await old.flush()
        await old.revoke(tokens[1].token_id.hex(), 20.0)
        assert await old.draw(tokens[2].token_id, 5, 1) == 4
        with pytest.raises(StoreError):  # no such table yet
            await feed_for(old, tokens[2].token_id)
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
        assert await new.list_feeds(include_inactive=True) == []
        made = await feed_for(new, tokens[2].token_id)
        assert await new.feed_access(made.capability) == made
    finally:
        await new.close()
    assert await schema_version(request, store_uri) == len(current)


# --- SQLite: the file's locks ---------------------------------------------------------------


async def test_feed_for_past_the_busy_timeout_is_one_clean_line(db_path: Path) -> None:
    opened = await ServerStore.open(str(db_path))
    secret = credential()
    try:
        assert opened._db is not None
        await opened._db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of after 5 s
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked") as error:
                await feed_for(opened, token_id(), secret=secret)
            assert_clean(error.value, secret)
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert await opened.list_feeds(include_inactive=True) == []
    finally:
        await opened.close()


# --- PostgreSQL: a database that is away ----------------------------------------------------


async def test_an_unreachable_database_is_a_store_error_for_every_feed_call(
    postgres: PostgresServer, pg_store: PostgresServerStore
) -> None:
    token, secret = token_id(), credential()
    try:
        made = await feed_for(pg_store, token, secret=secret)
        async with postgres.down():
            for call in (
                lambda: feed_for(pg_store, token, secret=secret),
                lambda: pg_store.feed_access(made.capability),
                lambda: pg_store.list_feeds(),
                lambda: pg_store.revoke_feeds(made.capability, 1.0),
                lambda: pg_store.rotate_feeds(token.hex(), 1.0),
            ):
                with pytest.raises(StoreError) as error:
                    await asyncio.wait_for(call(), BOUND)
                assert_clean(error.value, secret, postgres.password)
        assert await feed_for(pg_store, token, secret=secret) == made
    finally:
        await pg_store.close()


async def test_a_hung_database_bounds_feed_for_and_feed_access(
    postgres: PostgresServer,
    relay: tuple[FreezingRelay, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the request path: bounded by feed_timeout, not by a whole operation's."""
    monkeypatch.setattr(PostgresServerStore, "feed_timeout", 0.3)
    # Far beyond BOUND: only feed_timeout can end the calls in time.
    monkeypatch.setattr(PostgresServerStore, "operation_timeout", BOUND * 4)
    freezer, port = relay
    uri = await postgres.new_database()
    opened = await open_server_store(uri.replace(f":{postgres.port}/", f":{port}/"))
    token, secret = token_id(), credential()
    try:
        made = await feed_for(opened, token, secret=secret)
        freezer.frozen.set()
        for call in (
            lambda: feed_for(opened, token, secret=secret),
            lambda: opened.feed_access(made.capability),
        ):
            with pytest.raises(StoreError, match=r"no answer within 0\.3 s") as error:
                await asyncio.wait_for(call(), BOUND)
            assert_clean(error.value, secret, postgres.password)
    finally:
        with contextlib.suppress(StoreError):
            await asyncio.wait_for(opened.close(), BOUND)


async def test_a_constraint_message_never_quotes_the_credential(
    postgres: PostgresServer, pg_store: PostgresServerStore
) -> None:
    """PostgreSQL's DETAIL quotes a failing row: a row that gets past check_feed_for and still
    breaks a constraint (here: a table tightened behind the store's back) is reported with the
    credential masked."""
    secret = credential()
    try:
        async with pg_store._connection() as conn:
            await conn.execute(
                "ALTER TABLE l402_feed_accesses ADD CONSTRAINT tight CHECK (service <> 'podcast')"
            )
        with pytest.raises(StoreError, match="violates check constraint") as error:
            await feed_for(pg_store, token_id(), secret=secret)
        assert "Failing row contains" in str(error.value)  # the DETAIL is there, masked
        assert ", podcast, /feed.xml, ***" in str(error.value)
        assert_clean(error.value, secret, postgres.password)
    finally:
        await pg_store.close()
