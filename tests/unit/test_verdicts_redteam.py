"""A red-team pass over the kept verdicts (engine/verdicts.py) and nginx's verdict cache: what
a kept grant must never skip, hold or give away. The findings fail on the code they were found
in; the rest pin properties the speed-up must keep."""

import dataclasses
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons

from l402proxy.doors import nginx
from l402proxy.doors.mitmproxy import L402Server
from l402proxy.engine import Answer, Forward, Paywall, Request
from l402proxy.engine.verdicts import MAX_HEAD_BYTES
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import decode_macaroon
from tests.unit.test_asgi_door import Origin, call, middleware
from tests.unit.test_server_addon import flow_for

# test_verdicts' engine and judge counter, used by name: pytest finds a fixture under the name
# it has here, hence F811 on the test functions' arguments.
from tests.unit.test_verdicts import (  # noqa: F401
    HOST,
    RULES,
    buy,
    engine,
    judged,
    request,
)

REFUSED = "Bad request: the request target names another host than the Host header."


def granted(outcome: object) -> Forward:
    assert isinstance(outcome, Forward), outcome
    assert outcome.note is not None and outcome.note.get("variant") == "paid", outcome.note
    return outcome


# -- 1. the door's own check of the target is no part of the key --------------------------------


async def test_the_doors_own_target_check_runs_on_a_kept_verdict(
    engine: Paywall,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Request.target_check is the door's judgement of what the key does not hold (mitmproxy:
    the authority of an absolute-form target). Two requests with one key may differ there: the
    second must still get the door's 400, never the first one's grant."""
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    checked: list[tuple[bytes, ...]] = []

    def agrees(hosts: tuple[bytes, ...]) -> str | None:
        checked.append(tuple(hosts))
        return None

    def names_another_host(hosts: tuple[bytes, ...]) -> str | None:
        checked.append(tuple(hosts))
        return REFUSED

    first = request("/episodes/ep1.mp3", (b"Authorization", token))
    first.target_check = agrees
    granted(await engine.handle(first))
    second = request("/episodes/ep1.mp3", (b"Authorization", token))
    second.target_check = names_another_host
    outcome = await engine.handle(second)
    assert isinstance(outcome, Answer) and outcome.status == 400, outcome
    assert REFUSED.encode() in outcome.body
    assert checked and set(checked) == {(HOST.encode(),)}
    # The agreeing request is still granted (from the kept verdict or anew).
    third = request("/episodes/ep1.mp3", (b"Authorization", token))
    third.target_check = agrees
    granted(await engine.handle(third))


@asynccontextmanager
async def proxy_door(tmp_path: Path, keep_host: bool) -> AsyncIterator[L402Server]:
    """The mitmproxy door in-process (test_server_addon.server_on, with keep_host_header)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    server = L402Server()
    with taddons.context(server) as tctx:
        tctx.options.add_option("keep_host_header", bool, False, "as mitmproxy's")
        tctx.configure(
            server,
            l402_rules=str(rules),
            l402_store=str(tmp_path / "server.sqlite"),
            l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
            keep_host_header=keep_host,
        )
        await server.running()
        try:
            yield server
        finally:
            await server.done()


@pytest.mark.parametrize("keep_host", [True, False])
async def test_an_absolute_form_target_after_a_kept_verdict_is_checked_as_ever(
    tmp_path: Path, keep_host: bool
) -> None:
    """`GET http://other.example/episodes/ep1.mp3` with `Host: podcast.example` has the key of
    the origin-form request before it (mitmproxy's path and pretty_host leave the authority
    out). With keep_host_header (host: rules) the proxy refuses it, as the origin would route
    by the authority (RFC 9112 3.2.2); without, it goes out in origin form. A kept verdict
    skipped both: the request went to the origin in absolute form, granted."""
    async with proxy_door(tmp_path, keep_host) as server:
        token = (await buy(server.engine, tmp_path, "/episodes/ep1.mp3")).decode()
        first = flow_for("/episodes/ep1.mp3", Host=HOST, Authorization=token)
        await server.request(first)
        assert first.response is None and first.request.path == "/adfree/ep1.mp3"
        second = flow_for("/episodes/ep1.mp3", Host=HOST, Authorization=token)
        second.request.authority = "other.example"
        await server.request(second)
        if keep_host:
            assert second.response is not None, "forwarded in absolute form, granted"
            assert second.response.status_code == 400
        else:
            assert second.response is None
            assert second.request.authority == "", "forwarded in absolute form"


# -- 2. memory: what one kept verdict holds ------------------------------------------------------


def deep_size(thing: object, seen: set[int] | None = None) -> int:
    """The bytes `thing` keeps alive: itself and every tuple, list, dict, str, bytes and slots
    dataclass reachable from it, each counted once."""
    seen = set() if seen is None else seen
    if id(thing) in seen or thing is None or isinstance(thing, bool | int | float):
        return 0
    seen.add(id(thing))
    size = sys.getsizeof(thing)
    if isinstance(thing, tuple | list):
        size += sum(deep_size(item, seen) for item in thing)
    elif isinstance(thing, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in thing.items())
    elif dataclasses.is_dataclass(thing):
        for field in dataclasses.fields(thing):
            if field.name != "rules":  # the RuleSet in force: shared, not the entry's own
                size += deep_size(getattr(thing, field.name), seen)
    return size


# The module's promise: "memory stays under MAX_VERDICTS * 2 * MAX_HEAD_BYTES however large
# clients make them", so one entry (its key and what it keeps) under 2 * MAX_HEAD_BYTES.
ENTRY_BOUND = 2 * MAX_HEAD_BYTES


def heads(token: bytes) -> Iterator[tuple[str, Request]]:
    authorization = (b"Authorization", token)
    # A paying client's long target (mitmproxy reads request heads of any size; uvicorn with
    # httptools too): the key holds it, and the rewritten path once more.
    yield "long target", request("/episodes/" + "a" * 200_000 + ".mp3", authorization)
    # Many empty fields: their bytes sum to under MAX_HEAD_BYTES, their objects to ~60 times
    # that (a tuple and two bytes objects each). nginx passes them on to serve-auth.
    many = [(b"X" + b"%d" % (n % 10), b"") for n in range(1500)]
    yield "many fields", request("/episodes/ep1.mp3", authorization, *many)
    # The ASGI door's other reading of the target (below root_path), as long as it likes.
    below = request("/episodes/ep1.mp3", authorization)
    below.also_targets = ("/episodes/" + "b" * 200_000,)
    yield "long also_targets", below


async def test_one_kept_verdict_holds_no_more_than_its_bound(
    engine: Paywall,  # noqa: F811
    tmp_path: Path,
) -> None:
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    too_big = []
    for name, head in heads(token):
        engine.verdicts.clear()
        granted(await engine.handle(head))
        for key, kept in engine.verdicts.kept.items():
            counted: set[int] = set()  # what the key and the entry share is counted once
            size = deep_size(key, counted) + deep_size(kept, counted)
            if size > ENTRY_BOUND:
                too_big.append(f"{name}: {size} bytes")
    assert not too_big, f"kept past {ENTRY_BOUND} bytes: {too_big}"


# -- 3. nginx's verdict cache: the key and the config that reads the verdict -----------------------


def rendered(set_headers: list[str]) -> str:
    return nginx.render_config(
        auth=("127.0.0.1", 8402),
        origin=nginx.parse_origin("http://127.0.0.1:8080"),
        listen="80",
        set_headers=set_headers,
        verdict_cache=60,
    )


def cache_key(text: str) -> str:
    found = re.search(r'proxy_cache_key "([^"]*)";', text)
    assert found is not None
    return found.group(1)


def test_a_cached_verdict_is_read_only_by_the_config_it_was_made_for() -> None:
    """A cached verdict holds the values of the numbered X-L402-Set-N slots as the config that
    asked numbered them. Regenerated for rules with another header (and nginx reloaded, or
    restarted on the same directory: the entries stay), slot 1 may name another header: the
    key must change with the config (X-L402-Config), or a basic token's cached verdict sets
    the new premium header for up to --verdict-cache seconds."""
    before = rendered(["X-Basic"])
    after = rendered(["X-Premium", "X-Basic"])
    assert "proxy_set_header X-Basic $l402_set_1;" in before
    assert "proxy_set_header X-Premium $l402_set_1;" in after
    assert cache_key(before) != cache_key(after)


# -- pinned: what is never kept, and what ends a kept verdict ------------------------------------

PINNED_RULES = """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
  - name: trial
    match: {path: "/trial/*"}
    price_sat: 3
    freebies: {requests: 1, per: 1d}
  - name: once
    match: {path: "/once/*"}
    price_sat: 2
    single_use: true
  - name: pack
    match: {path: "/pack/*"}
    price_sat: 2
    bundle: {requests: 2}
"""


@pytest.fixture
async def pinned(tmp_path: Path) -> AsyncIterator[Paywall]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(PINNED_RULES)
    paywall = Paywall()
    paywall.use_rules_file(str(rules))
    paywall.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    paywall.store_uri = str(tmp_path / "server.sqlite")
    await paywall.open()
    yield paywall
    await paywall.close()


async def test_a_free_trial_is_never_kept(pinned: Paywall) -> None:
    """The freebie is a paid variant without a token: the same head again is counted."""
    first = granted(await pinned.handle(request("/trial/x")))
    assert first.note is not None and first.note.get("freebie") is True
    again = await pinned.handle(request("/trial/x"))
    assert isinstance(again, Answer) and again.status == 402
    assert len(pinned.verdicts) == 0


@pytest.mark.parametrize(("path", "uses"), [("/once/x", 1), ("/pack/x", 2)])
async def test_a_token_drawn_from_is_never_kept(
    pinned: Paywall, tmp_path: Path, path: str, uses: int
) -> None:
    token = await buy(pinned, tmp_path, path)
    for _ in range(uses):
        forward = granted(await pinned.handle(request(path, (b"Authorization", token))))
        assert forward.note is not None and "reusable_until" not in forward.note
    spent = await pinned.handle(request(path, (b"Authorization", token)))
    assert isinstance(spent, Answer) and spent.status == 402
    assert len(pinned.verdicts) == 0


async def test_a_reload_to_deny_ends_every_kept_verdict_at_once(
    pinned: Paywall, tmp_path: Path
) -> None:
    """Through the engine's own reload (the file polled), not use_rules_file."""
    token = await buy(pinned, tmp_path, "/episodes/ep1.mp3")
    for _ in range(2):
        granted(await pinned.handle(request("/episodes/ep1.mp3", (b"Authorization", token))))
    assert len(pinned.verdicts) == 1
    rules = tmp_path / "rules.yaml"
    rules.write_text(PINNED_RULES.replace("    price_sat: 21\n", "    mode: deny\n", 1))
    await pinned.reload_rules_if_changed()
    denied = await pinned.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert isinstance(denied, Answer) and denied.status == 404


async def test_a_revocation_by_payment_hash_prefix_ends_a_kept_verdict(
    pinned: Paywall, tmp_path: Path
) -> None:
    """`l402proxy tokens revoke <first 8 hex of the payment hash>` as the store does it, then
    the engine's poll: the next identical request is refused."""
    token = await buy(pinned, tmp_path, "/episodes/ep1.mp3")
    macaroon = token.decode().split()[1].split(":")[0]
    identifier = Identifier.decode(decode_macaroon(macaroon).identifier_bytes)
    for _ in range(2):
        granted(await pinned.handle(request("/episodes/ep1.mp3", (b"Authorization", token))))
    assert pinned.store is not None
    await pinned.store.revoke(identifier.payment_hash.hex()[:8], time.time())
    await pinned._poll_revocations()
    refused = await pinned.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert isinstance(refused, Answer) and refused.status == 402


async def test_a_kept_verdict_is_not_given_to_another_method_scheme_or_reading(
    engine: Paywall,  # noqa: F811
    tmp_path: Path,
    judged: list[str],  # noqa: F811
) -> None:
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    judged.clear()
    granted(await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token))))
    head = request("/episodes/ep1.mp3", (b"Authorization", token))
    head.method = "HEAD"
    secure = request("/episodes/ep1.mp3", (b"Authorization", token))
    secure.secure = True
    below = request("/episodes/ep1.mp3", (b"Authorization", token))
    below.also_targets = ("/bonus/ep1.mp3",)  # no rule there: 400, never the kept grant
    lower = request("/episodes/ep1.mp3", (b"authorization", token))
    for other in (head, secure, lower):
        granted(await engine.handle(other))
    refused = await engine.handle(below)
    assert isinstance(refused, Answer) and refused.status == 400
    assert judged == ["podcast"] * 4


async def test_nginx_gets_the_same_instructions_from_a_kept_verdict(
    engine: Paywall,  # noqa: F811
    tmp_path: Path,
) -> None:
    """serve-auth's plan for the kept Forward is the plan for the judged one: the paid route,
    the rewritten target, the marks, and how long nginx may keep it."""
    service = nginx.AuthService(engine)
    carried = nginx.Carried.parse(nginx.config_header([]).encode())
    assert isinstance(carried, nginx.Carried)
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    plans = []
    for _ in range(2):
        head = request("/episodes/ep1.mp3", (b"Authorization", token), (b"Cookie", b"a=b"))
        forward = granted(await engine.handle(head))
        plans.append(service.instructions(head, forward, carried, b"60"))
    assert plans[0] == plans[1]
    status, headers = plans[0]  # type: ignore[misc]
    found = dict(headers)
    assert status == 401 and found[b"x-l402-route"] == b"paid"
    assert found[b"x-l402-target"] == b"/adfree/ep1.mp3" and found[b"x-l402-cookie"] == b"a=b"
    assert found[b"x-l402-vary"] == b"Authorization, Cookie, Accept-Authenticate"
    assert b"x-l402-authorization" not in found  # our credential goes nowhere
    assert 0 < int(found[b"x-accel-expires"]) <= 60


async def test_the_asgi_door_forwards_a_kept_verdict_as_a_judged_one(tmp_path: Path) -> None:
    """The app gets the rewritten path and no credential, and the answer is marked private,
    the second time (a kept Forward, not the one made for this scope) as the first."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    origin = Origin()
    app = middleware(tmp_path, origin, rules)
    try:
        # The first request opens the engine (no lifespan here); then a token for the path.
        opened = await call(app, "/episodes/ep1.mp3", headers=[(b"accept-authenticate", b"L402")])
        assert opened.status == 402
        token = await buy(app.engine, tmp_path, "/episodes/ep1.mp3")
        seen = []
        for _ in range(2):
            answer = await call(
                app, "/episodes/ep1.mp3", headers=[(b"authorization", token), (b"cookie", b"a=b")]
            )
            assert answer.status == 200
            assert answer.get("Cache-Control") == "private"
            assert answer.get("Vary") == "Authorization, Cookie, Accept-Authenticate"
            scope: dict[str, Any] = origin.seen
            seen.append((scope["path"], scope["raw_path"], scope["headers"]))
        assert seen[0] == seen[1]
        assert seen[0][:2] == ("/adfree/ep1.mp3", b"/adfree/ep1.mp3")
        assert (b"cookie", b"a=b") in seen[0][2]
        assert not [name for name, _ in seen[0][2] if name == b"authorization"]
        assert len(app.engine.verdicts) == 1
    finally:
        await app.close()
