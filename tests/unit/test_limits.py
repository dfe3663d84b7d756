"""What a stranger can make the server hold or wait for, and what a restricted token may open.

- The verified-token cache is bounded in bytes, not only entries: attenuating one cheap token
  gives as many distinct valid credentials as anyone likes.
- A credential larger than MAX_CREDENTIAL_SIZE is refused (401 malformed) before any parsing.
- The store's queue of records to write is bounded while the database cannot be written.
- Capabilities (mapping form): a restricted token opens only the methods its capabilities list.
- The upstream guard's option and wiring (its behaviour: tests/e2e/test_origin_failures_e2e.py).
"""

import gc
import hashlib
import logging
import os
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from l402proxy import gate
from l402proxy.doors.mitmproxy import L402Server
from l402proxy.l402 import headers as headers_module
from l402proxy.l402 import token as token_module
from l402proxy.l402.headers import (
    MAX_CREDENTIAL_SIZE,
    CredentialError,
    format_credential,
    parse_credential,
)
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import UNLISTED_CAPABILITY, caveats_for, mint, verify
from l402proxy.rules import parse_rules
from l402proxy.store import ServerStore, StoreError, open_server_store
from l402proxy.upstream import DEFAULT_TIMEOUT, METADATA, UpstreamGuard, gateway_response

from .test_gate import NOW, RULES, attenuated, credential_for, root_key_for
from .test_server_addon import flow_for, server_on
from .test_store import make_token

MiB = 1024 * 1024


def padded(authorization: str, size: int, tag: int, pad: str = "a") -> str:
    """A distinct valid attenuation of `authorization`, about `size` characters long: the caveat
    names another service, so it narrows nothing and verify accepts it."""
    padding = max(0, (size - len(authorization)) * 3 // 4 // len(pad.encode()))
    return attenuated(authorization, f"x{tag}_capabilities={pad * padding}")


# -- the token cache ---------------------------------------------------------------------------


def test_entry_size_is_a_fair_estimate_of_what_an_entry_keeps_alive() -> None:
    """Measured with tracemalloc: never much more than the estimate (1.25), which errs high for
    small entries (0.8-0.95 of it measured, depending on the interpreter's free lists)."""
    rule = RULES.match("h", "/episodes/1.mp3", "GET")
    assert rule is not None
    base = credential_for("podcast")
    # Emoji in a caveat: 4 bytes a character in the str, the case a count of characters misses.
    for size, pad in ((0, "a"), (4_000, "a"), (15_000, "a"), (15_000, "\U0001f600")):
        raw = [padded(base, size, i, pad).encode() for i in range(200)]
        cache = gate.TokenCache()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for value in raw:
                authorization = value.decode()  # as the server gets it: a new str per request
                credential = parse_credential(authorization)
                token = verify(
                    credential.macaroons[0],
                    credential.preimage,
                    root_key_for,
                    service="podcast",
                    now=NOW,
                )
                cache.store(authorization, "podcast", token, credential)
            del authorization, credential, token
            token_module._parse_cached.cache_clear()  # its own bounded memo, not this cache
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(cache) == len(raw)
        assert 0.6 * cache.size <= held <= 1.25 * cache.size, (size, pad, held, cache.size)


def test_a_cache_under_attack_stays_within_its_byte_bound() -> None:
    """Many distinct big attenuations of one cheap token: the oldest go, the bound holds."""
    cache = gate.TokenCache(max_bytes=2 * MiB)
    base = credential_for("podcast")
    first = last = ""
    for i in range(300):  # about 12 MiB of entries without the byte bound
        last = padded(base, 15_000, i)
        first = first or last
        grant = decide_podcast(last, cache)
        assert isinstance(grant, gate.Grant), grant
        assert cache.size <= cache.max_bytes
    assert 0 < len(cache) <= 2 * MiB // 40_000  # each entry holds about 40 KB
    # The oldest went first; the newest is served from the cache.
    assert cache.lookup(first, "podcast", frozenset(), NOW) is None
    assert cache.lookup(last, "podcast", frozenset(), NOW) is not None


def test_entries_and_bytes_both_bound_the_cache_and_removal_gives_bytes_back() -> None:
    cache = gate.TokenCache(max_entries=10)
    for _ in range(25):
        assert isinstance(decide_podcast(credential_for("podcast"), cache), gate.Grant)
        assert len(cache) <= 10
    expiring = credential_for("podcast", valid_until=int(NOW) + 5)
    decide_podcast(expiring, cache)
    before = cache.size
    later = decide_podcast(expiring, cache, now=NOW + 10)
    assert isinstance(later, gate.Challenge) and later.reason == "expired"
    assert cache.size < before  # the expired entry is gone, and its bytes with it
    assert cache.size == sum(
        gate.TokenCache.entry_size(*key, *entry) for key, entry in cache._entries.items()
    )


def test_a_cache_hit_changes_nothing_in_the_cache() -> None:
    """The hot path only reads: no reordering, no accounting (eviction happens on store)."""
    cache = gate.TokenCache()
    authorization = credential_for("podcast")
    decide_podcast(authorization, cache)
    entries, size = dict(cache._entries), cache.size
    for _ in range(3):
        assert isinstance(decide_podcast(authorization, cache), gate.Grant)
    assert cache._entries == entries and list(cache._entries) == list(entries)
    assert cache.size == size


def decide_podcast(
    authorization: str, cache: gate.TokenCache | None, now: float = NOW, method: str = "GET"
) -> gate.Decision:
    return gate.decide(
        rule=RULES.match("h", "/episodes/1.mp3", "GET"),
        authorization=authorization,
        accept_authenticate=None,
        root_key_for=root_key_for,
        revoked=frozenset(),
        now=now,
        method=method,
        cache=cache,
    )


# -- the credential size limit -----------------------------------------------------------------


@pytest.fixture
def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any base64 or macaroon work fails the test."""

    def forbidden(*_: Any, **__: Any) -> Any:
        raise AssertionError("an oversized credential was parsed")

    monkeypatch.setattr(headers_module, "b64decode_any", forbidden)
    monkeypatch.setattr(gate, "check_credential", forbidden)
    monkeypatch.setattr(gate, "verify", forbidden)


@pytest.mark.usefixtures("no_parsing")
@pytest.mark.parametrize("extra", [1, 100_000])
def test_an_oversized_credential_is_refused_before_any_parsing(extra: int) -> None:
    authorization = "L402 " + "A" * (MAX_CREDENTIAL_SIZE - 5 + extra - 65) + ":" + "0" * 64
    size = len(authorization)
    assert size == MAX_CREDENTIAL_SIZE + extra
    cache = gate.TokenCache()
    refused = decide_podcast(authorization, cache)
    assert isinstance(refused, gate.Challenge)
    assert (refused.status, refused.reason) == (401, "malformed")
    assert refused.detail == (
        f"credential too large: {size} bytes, the limit is {MAX_CREDENTIAL_SIZE}"
    )
    assert len(cache) == 0
    with pytest.raises(CredentialError, match=f"credential too large: {size} bytes"):
        parse_credential(authorization)


@pytest.mark.usefixtures("no_parsing")
def test_the_limit_counts_bytes_not_characters() -> None:
    # 6,000 characters of 3 bytes each: 18,000 bytes as sent.
    authorization = "L402 " + "€" * 6_000 + ":" + "0" * 64
    refused = decide_podcast(authorization, None)
    assert isinstance(refused, gate.Challenge)
    assert refused.detail.startswith(f"credential too large: {5 + 18_000 + 65} bytes")


def test_real_tokens_are_far_below_the_limit() -> None:
    """A token with several caveats and a few attenuations is 1-2 KB; 16 KiB leaves room."""
    authorization = attenuated(
        credential_for("podcast", valid_until=int(NOW) + 3600),
        "podcast_capabilities=read",
        "podcast_valid_until=1900000000",
        "other_capabilities=a,b,c",
    )
    assert len(authorization) < 2048 < MAX_CREDENTIAL_SIZE
    at_the_limit = padded(credential_for("podcast"), MAX_CREDENTIAL_SIZE - 200, 1)
    assert len(at_the_limit) <= MAX_CREDENTIAL_SIZE
    assert isinstance(decide_podcast(at_the_limit, gate.TokenCache()), gate.Grant)


# -- in-process: what the server keeps alive ---------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[L402Server]:
    async with server_on(tmp_path, bonus_rules(tmp_path)) as addon:
        yield addon
        assert addon.store is not None
        await addon.store.list_tokens(limit=1)  # nothing left for done() to cut short


def bonus_rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    # invoice_limit off: these tests send thousands of bad credentials from one address, each
    # answered with a fresh challenge, to measure memory, not the mint limit.
    path.write_text(
        "invoice_limit: off\n"
        "services:\n  - name: bonus\n    match: {path: '/bonus/*'}\n    price_sat: 100\n"
    )
    return path


def server_credential(server: L402Server) -> str:
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for("bonus", valid_until=int(time.time()) + 3600, capabilities=None)
    macaroon = mint(server.root_key_for(identifier.token_id), identifier, caveats)
    return format_credential([macaroon], preimage)


async def retained_after(server: L402Server, credentials: Iterator[str], expect: int) -> int:
    """Bytes still allocated after the server judged each credential on a priced path."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for authorization in credentials:
            flow = flow_for("/bonus/x.mp3", Authorization=authorization)
            await server.request(flow)
            status = 200 if flow.response is None else flow.response.status_code
            assert status == expect, flow.response and flow.response.text[:200]
            del flow, authorization
        assert server.store is not None
        await server.store.flush()  # the 401s' issuance records are written, not held
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


async def test_a_thousand_distinct_64_kib_credentials_keep_nothing_alive(
    server: L402Server,
) -> None:
    base = server_credential(server)
    # Made one at a time, so the test itself never holds 64 MB of credentials.
    credentials = (padded(base, 64 * 1024, i) for i in range(1000))
    held = await retained_after(server, credentials, expect=401)
    assert held < 8 * MiB, f"{held / MiB:.1f} MiB still held"
    assert len(server.cache) == 0


async def test_distinct_valid_credentials_below_the_limit_keep_at_most_the_cache_bound(
    server: L402Server,
) -> None:
    server.cache = gate.TokenCache(max_bytes=4 * MiB)
    base = server_credential(server)
    # About 40 MiB of cache entries without a byte bound.
    credentials = (padded(base, 15_000, i) for i in range(1000))
    held = await retained_after(server, credentials, expect=200)
    assert held < 4 * MiB * 1.5 + 2 * MiB, f"{held / MiB:.1f} MiB still held"
    assert server.cache.size <= 4 * MiB


# -- the store's queue -------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ServerStore]:
    opened = await open_server_store(str(tmp_path / "server.sqlite"))
    yield opened
    await opened.flush()
    await opened.close()


async def test_the_queue_is_bounded_while_the_database_cannot_be_written(
    store: ServerStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.max_pending = 1_000
    assert store._db is not None
    await store._db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of after 5 s
    blocker = sqlite3.connect(tmp_path / "server.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        for round_ in range(10):  # every 402 queues a record; every flush fails
            for _ in range(700):
                store.note_issued(make_token())
                store.note_paid(os.urandom(32), 1.0)
            with pytest.raises(StoreError, match="locked"):
                await store.flush()
            assert store.pending <= 2 * store.max_pending, round_
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.dropped > 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "dropped the" in warnings[-1].getMessage()
    await store.flush()
    assert store.pending == 0
    assert len(await store.list_tokens(limit=5_000)) <= store.max_pending


async def test_a_working_store_drops_nothing(store: ServerStore) -> None:
    store.max_pending = 100
    for _ in range(5):
        for _ in range(90):
            store.note_issued(make_token())
        await store.flush()
    assert store.dropped == 0 and len(await store.list_tokens(limit=1_000)) == 450


# -- capabilities ------------------------------------------------------------------------------

CAPABLE = parse_rules(
    """
services:
  - name: premium
    match: {path: "/api/*"}
    price_sat: 50
    capabilities:
      read: [GET]
      write: [POST, PUT, DELETE]
  - name: listed
    match: {path: "/listed/*"}
    price_sat: 50
    capabilities: [read, write]
  - name: heads
    match: {path: "/heads/*"}
    price_sat: 50
    capabilities:
      read: [GET]
      probe: [HEAD]
""",
    "caps.yaml",
)
PREMIUM = CAPABLE.rules[0]
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PROPFIND", "MOVE", "PATCH", "X")


def premium_credential(capabilities: list[str] | None) -> str:
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for("premium", valid_until=None, capabilities=capabilities)
    return format_credential(
        [mint(root_key_for(identifier.token_id), identifier, caveats)], preimage
    )


def opens(authorization: str, cache: gate.TokenCache | None) -> set[str]:
    """The methods a credential opens on the premium service."""
    opened = set()
    for method in METHODS:
        decision = gate.decide(
            rule=CAPABLE.match("h", "/api/x", method),
            authorization=authorization,
            accept_authenticate=None,
            root_key_for=root_key_for,
            revoked=frozenset(),
            now=NOW,
            method=method,
            cache=cache,
        )
        if isinstance(decision, gate.Grant):
            opened.add(method)
        else:
            assert isinstance(decision, gate.Challenge), decision
            assert (decision.status, decision.reason) == (402, "missing_capability"), decision
    return opened


FULL = {"GET", "HEAD", "POST", "PUT", "DELETE"}


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_restricted_token_opens_only_the_methods_its_capabilities_list(
    use_cache: bool,
) -> None:
    cache = gate.TokenCache() if use_cache else None
    full = premium_credential(["read", "write"])  # what the proxy mints for this rule
    cases = {
        # No capabilities caveat: unrestricted, every method, listed or not.
        premium_credential(None): set(METHODS),
        full: FULL,
        attenuated(full, "premium_capabilities=read"): {"GET", "HEAD"},
        attenuated(full, "premium_capabilities=write"): {"POST", "PUT", "DELETE"},
        attenuated(full, "premium_capabilities="): set(),
        # A later caveat only narrows: read, then "read,write", is still read.
        attenuated(full, "premium_capabilities=read", "premium_capabilities=read,write"): {
            "GET",
            "HEAD",
        },
        # Narrowing an unrestricted token restricts it.
        attenuated(premium_credential(None), "premium_capabilities=read"): {"GET", "HEAD"},
    }
    for authorization, expected in cases.items():
        assert opens(authorization, cache) == expected
        # Asked again: with a cache, every grant now comes from it and must agree.
        assert opens(authorization, cache) == expected


def test_the_cache_never_grants_a_method_the_token_does_not_cover() -> None:
    cache = gate.TokenCache()
    read_only = attenuated(premium_credential(["read", "write"]), "premium_capabilities=read")
    assert opens(read_only, cache) == {"GET", "HEAD"}
    assert len(cache) == 1  # granted once, then served from the cache
    for method in METHODS:
        capability = PREMIUM.capability_for(method)
        hit = cache.lookup(read_only, "premium", frozenset(), NOW, capability)
        assert (hit is not None) == (method in {"GET", "HEAD"}), method


def test_what_each_method_needs() -> None:
    premium, listed, heads = CAPABLE.rules
    assert [premium.capability_for(m) for m in ("get", "HEAD", "post", "DELETE")] == [
        "read",
        "read",  # HEAD is not listed: it needs what GET needs
        "write",
        "write",
    ]
    for method in ("OPTIONS", "PROPFIND", "MOVE", "PATCH", "TRACE"):
        assert premium.capability_for(method) == UNLISTED_CAPABILITY
    assert heads.capability_for("HEAD") == "probe"  # listed itself: its own capability
    # The list form only writes the caveat: the proxy checks no method against it.
    assert all(listed.capability_for(m) is None for m in METHODS)


def test_an_unlisted_method_names_the_tokens_capabilities_in_the_refusal() -> None:
    read_only = attenuated(premium_credential(["read", "write"]), "premium_capabilities=read")
    refused = gate.decide(
        rule=CAPABLE.match("h", "/api/x", "PROPFIND"),
        authorization=read_only,
        accept_authenticate=None,
        root_key_for=root_key_for,
        revoked=frozenset(),
        now=NOW,
        method="PROPFIND",
    )
    assert isinstance(refused, gate.Challenge)
    assert refused.detail == (
        "no capability covers this request's method, and the token is restricted to read"
    )


def test_no_caveat_can_grant_the_unlisted_marker() -> None:
    """Caveat values are split on ",", so no token can hold the marker as a capability."""
    sneaky = attenuated(premium_credential(None), f"premium_capabilities={UNLISTED_CAPABILITY}")
    assert opens(sneaky, None) == set()  # restricted to no capability at all


# -- the upstream guard's option and wiring (tests/e2e/test_origin_failures_e2e.py: behaviour) ---


async def test_the_upstream_timeout_option(server: L402Server) -> None:
    assert ctx.master.addons.get("upstreamguard") is server.upstream  # a child addon
    assert server.upstream.timeout == DEFAULT_TIMEOUT == 30
    ctx.options.update(l402_upstream_timeout=5)
    assert server.upstream.timeout == 5
    for bad in (-1, 3601):
        with pytest.raises(
            exceptions.OptionsError,
            match="l402_upstream_timeout: must be 1 to 3600 seconds, or 0 for no limit",
        ):
            ctx.options.update(l402_upstream_timeout=bad)
    assert server.upstream.timeout == 5 and ctx.options.l402_upstream_timeout == 5
    ctx.options.update(l402_upstream_timeout=0)
    assert server.upstream.timeout == 0


async def test_a_bad_upstream_timeout_at_start_fails_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    addon = L402Server()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, l402_rules=str(bonus_rules(tmp_path)), l402_upstream_timeout=-3)
        assert "l402_upstream_timeout" in addon.misconfigured
        assert "must be 1 to 3600 seconds" in caplog.text
        flow = flow_for("/anything")
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 503


def test_the_paywall_switches_mitmproxy_to_lazy_connections(tmp_path: Path) -> None:
    """With "eager", reverse mode connects to the origin before reading a request and drops
    the client when that fails: not even a 402 would come while the origin is down."""
    addon = L402Server()
    with taddons.context(Proxyserver(), addon) as tctx:
        assert tctx.options.connection_strategy == "eager"  # mitmproxy's default
        tctx.configure(addon, l402_rules=str(bonus_rules(tmp_path)), connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"
        addon.started = True  # while running, going back is refused and lazy stays
        with pytest.raises(exceptions.OptionsError, match="connection_strategy: the paywall"):
            tctx.options.update(connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def test_only_forwarded_flows_are_watched() -> None:
    guard = UpstreamGuard(timeout=5)
    answered = flow_for("/bonus/x")
    answered.response = http.Response.make(402)
    guard.request(answered)
    assert METADATA not in answered.metadata and not guard._waiting
    forwarded = flow_for("/feed.xml")
    forwarded.response = None
    guard.request(forwarded)
    assert forwarded.metadata[METADATA] == "forwarded" and forwarded.id in guard._waiting
    guard.responseheaders(forwarded)
    assert not guard._waiting  # the origin answered: nothing left to watch
    off = UpstreamGuard(timeout=0)
    off.request(forwarded)
    assert not off._waiting  # no deadline, but still marked: a failure still gets its 502


def test_an_intercepted_flow_is_not_timed_out_while_held() -> None:
    guard = UpstreamGuard(timeout=5)
    flow = flow_for("/feed.xml")
    flow.response = None
    guard.request(flow)
    flow.intercept()
    guard._expire(flow)
    assert flow.metadata[METADATA] == "forwarded" and flow.id in guard._waiting


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_gateway_answer_is_one_plain_line(method: str) -> None:
    response = gateway_response(504, "Gateway timeout: the origin did not answer.", method)
    assert response.status_code == 504
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Connection"] == "close"
    body = b"Gateway timeout: the origin did not answer.\n"
    assert response.headers["Content-Length"] == str(len(body))
    assert response.content == (b"" if method == "HEAD" else body)
