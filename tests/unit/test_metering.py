"""Bundles of bytes and units (engine/metering.py): the engine checks and notes, the mitmproxy
door (flows, with mitmproxy's test helpers) and the ASGI door (a server that behaves as uvicorn
does: `receive` waits until the client leaves, `send` drops what comes after) count, strip and
charge, and the nginx door refuses them."""

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tutils

from l402proxy.asgi import L402Middleware
from l402proxy.doors import nginx
from l402proxy.doors.mitmproxy import L402Server
from l402proxy.engine import Answer, Forward, Paywall, Request, metering
from l402proxy.engine.metering import Meter, Metered
from l402proxy.l402.headers import format_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import caveats_for, mint
from l402proxy.rules import RulesError, load_rules
from l402proxy.store import StoreError
from tests.unit.test_asgi_door import middleware
from tests.unit.test_server_addon import flow_for, server_on

RULES = """
services:
  - name: audio
    match: {path: "/episodes/*"}
    price_sat: 5
    bundle: {bytes: 10000}
  - name: api
    match: {path: "/api/*"}
    price_sat: 3
    bundle: {units: 100, usage_header: X-Usage}
  - name: listen
    match: {path: "/listen/*"}
    price_sat: 3
    mode: upgrade
    bundle: {units: 20, usage_header: X-Cost}
"""
HOST = "podcast.example"
STEP_SECONDS = 10.0

Message = dict[str, Any]


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture
async def engine(tmp_path: Path, rules: Path) -> AsyncIterator[Paywall]:
    paywall = Paywall()
    paywall.use_rules_file(str(rules))
    paywall.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    paywall.store_uri = str(tmp_path / "server.sqlite")
    await paywall.open()
    yield paywall
    await paywall.close()


def credential(engine: Paywall, service: str) -> tuple[str, bytes]:
    """An Authorization value for a token of `service`, as if the engine had sold it; and its
    token id (whose balance the store keeps)."""
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for(service, valid_until=int(time.time()) + 3600, capabilities=None)
    macaroon = mint(engine.root_key_for(identifier.token_id), identifier, caveats)
    return format_credential([macaroon], preimage), identifier.token_id


def request(path: str, authorization: str | None = None, method: str = "GET") -> Request:
    fields: tuple[tuple[bytes, bytes], ...] = ((b"Host", HOST.encode()),)
    if authorization is not None:
        fields += ((b"Authorization", authorization.encode()),)
    return Request(method=method, target=path, host=HOST, fields=fields, client=("127.0.0.1", 1))


def header(fields: Any, name: str) -> list[bytes]:
    return [value for key, value in fields if key.lower() == name.lower().encode()]


async def settle(awaitable: Awaitable[Any] | None) -> None:
    """What a mitmproxy hook returned, awaited as mitmproxy awaits it."""
    if awaitable is not None:
        await asyncio.wait_for(awaitable, STEP_SECONDS)


# -- reading the origin's answer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "units"),
    [
        (((b"X-Usage", b"7"),), 7),
        (((b"x-usage", b" 0 "),), 0),
        (((b"X-USAGE", b"3"), (b"X-Usage", b"3")), 3),  # a header added twice counts once
        (((b"X-Usage", b"3, 9"),), 9),  # repeats that disagree: the largest
        (((b"X-Usage", b"2"), (b"x-usage", b"5")), 5),
    ],
)
def test_the_usage_report_is_read_in_any_spelling(
    fields: tuple[tuple[bytes, bytes], ...], units: int
) -> None:
    assert metering.read_usage(fields, "X-Usage") == (units, None)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "missing"),
        (b"", "not a whole number"),
        (b"-1", "not a whole number"),
        (b"1.5", "not a whole number"),
        (b"1e3", "not a whole number"),
        (b"12 units", "not a whole number"),
        ("\u0663".encode(), "not a whole number"),  # an Arabic-Indic digit is no ASCII digit
        (b"9" * 19, "not a whole number"),
        (b"4, x", "not a whole number"),
    ],
)
def test_a_missing_or_unreadable_report_says_why(value: bytes | None, why: str) -> None:
    fields = () if value is None else ((b"X-Usage", value),)
    units, problem = metering.read_usage(fields, "X-Usage")
    assert units is None and problem is not None and why in problem and "X-Usage" in problem


@pytest.mark.parametrize(
    ("fields", "length"),
    [
        (((b"Content-Length", b"42"),), 42),
        (((b"content-length", b"42"), (b"Content-Length", b"42")), 42),
        (((b"Content-Length", b"42"), (b"Content-Length", b"43")), None),
        (((b"Content-Length", b"-1"),), None),
        (((b"Content-Length", b"4 2"),), None),
        ((), None),
    ],
)
def test_content_length_is_read_only_when_it_is_one_number(
    fields: tuple[tuple[bytes, bytes], ...], length: int | None
) -> None:
    assert metering.content_length(fields) == length


@pytest.mark.parametrize(
    ("method", "status", "fields", "left"),
    [
        ("GET", 200, ((b"Content-Length", b"300"),), 700),
        ("GET", 206, ((b"Content-Length", b"5000"),), 0),  # clamped: never negative
        ("GET", 200, (), 1000),  # a stream: its size is unknown when its head goes out
        ("HEAD", 200, ((b"Content-Length", b"300"),), 1000),  # a HEAD answer has no body
        ("GET", 304, ((b"Content-Length", b"300"),), 1000),
        ("GET", 204, ((b"Content-Length", b"300"),), 1000),
    ],
)
def test_the_announced_bytes_balance(
    method: str, status: int, fields: tuple[tuple[bytes, bytes], ...], left: int
) -> None:
    assert metering.bytes_left(1000, method, status, fields) == left


def test_usage_headers_are_every_units_rules_header(rules: Path) -> None:
    loaded = load_rules(str(rules))
    assert metering.usage_headers(loaded) == {b"x-usage", b"x-cost"}
    assert metering.usage_headers(None) == frozenset()
    fields = ((b"A", b"1"), (b"X-USAGE", b"1"), (b"x-cost", b"2"), (b"B", b"2"))
    assert metering.without(fields, frozenset({b"x-usage", b"x-cost"})) == (
        (b"A", b"1"),
        (b"B", b"2"),
    )
    untouched = ((b"A", b"1"),)
    assert metering.without(untouched, frozenset({b"x-usage"})) is untouched


def test_a_meter_note_that_is_not_the_engines_is_refused() -> None:
    good = {"token": "ab" * 32, "unit": "bytes", "size": 10, "before": 10, "header": None}
    assert Meter.of({"meter": good}) is not None
    assert Meter.of({"variant": "paid"}) is None
    for broken in (
        {**good, "token": "zz"},
        {**good, "unit": "requests"},
        {**good, "size": 0},
        {**good, "before": -1},
        {**good, "unit": "units"},  # without its usage header
        {"unit": "bytes"},
    ):
        with pytest.raises(ValueError, match="meter"):
            Meter.of({"meter": broken})


def test_a_problem_is_logged_once_a_minute_per_rule(caplog: pytest.LogCaptureFixture) -> None:
    rule = f"service 'x{os.urandom(4).hex()}' (rules.yaml:3)"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            metering.warn(rule, "usage", "its X-Usage header is missing")
        metering.warn(rule, "other", "something else")
    lines = [r.getMessage() for r in caplog.records if rule in r.getMessage()]
    assert lines == [
        f"l402: {rule}: its X-Usage header is missing",
        f"l402: {rule}: something else",
    ]


# -- the engine ------------------------------------------------------------------------------


async def test_a_bytes_token_is_checked_not_drawn_and_forwarded_with_its_meter(
    engine: Paywall,
) -> None:
    authorization, token_id = credential(engine, "audio")
    assert engine.store is not None
    forward = await engine.handle(request("/episodes/ep1.mp3", authorization))
    assert isinstance(forward, Forward) and forward.note is not None
    assert forward.note["meter"] == {
        "token": token_id.hex(),
        "unit": "bytes",
        "size": 10000,
        "before": 10000,
        "header": None,
        "rule": f"service 'audio' ({engine.rules.source}:3)",  # type: ignore[union-attr]
    }
    # Nothing drawn (the door charges what the answer used), no balance the door would send
    # as it is, and never a verdict kept for the same request again.
    assert await engine.store.balance_of(token_id) == 10000
    assert "balance" not in forward.note and "reusable_until" not in forward.note
    assert len(engine.verdicts) == 0


async def test_a_spent_metered_token_gets_the_402_for_a_new_bundle(engine: Paywall) -> None:
    assert engine.store is not None
    for service, path, unit in (("audio", "/episodes/x", "bytes"), ("api", "/api/x", "units")):
        authorization, token_id = credential(engine, service)
        granted = await engine.handle(request(path, authorization))
        assert isinstance(granted, Forward)
        assert await engine.store.charge(token_id, 10000, 10000) == 0
        spent = await engine.handle(request(path, authorization))
        assert isinstance(spent, Answer) and spent.status == 402, spent
        assert spent.header("X-L402-Balance") == f"0 {unit}"
        assert spent.header("WWW-Authenticate") is not None
        assert b"spent" in spent.body


async def test_the_same_metered_request_is_judged_every_time(engine: Paywall) -> None:
    """A kept verdict would forward without the meter: the answer would go out unmetered."""
    assert engine.store is not None
    authorization, token_id = credential(engine, "audio")
    for _ in range(3):
        forward = await engine.handle(request("/episodes/ep1.mp3", authorization))
        assert isinstance(forward, Forward) and forward.note and "meter" in forward.note
        await engine.store.charge(token_id, 10000, 4000)
    again = await engine.handle(request("/episodes/ep1.mp3", authorization))
    assert isinstance(again, Answer) and again.status == 402
    assert len(engine.verdicts) == 0


async def test_a_dry_run_meters_nothing(engine: Paywall) -> None:
    assert engine.store is not None
    engine.dry_run_option = True
    authorization, token_id = credential(engine, "api")
    forward = await engine.handle(request("/api/x", authorization))
    assert isinstance(forward, Forward) and forward.note is not None
    assert forward.note["dry_run"] == "grant" and forward.note["meter"]["before"] == 100
    assert await engine.store.balance_of(token_id) is None


def test_only_the_nginx_door_refuses_bytes_and_units(rules: Path) -> None:
    loaded = load_rules(str(rules))
    assert Paywall().unsupported_rule(loaded) is None
    assert Paywall(door="ASGI").unsupported_rule(loaded) is None
    refused = nginx.new_engine().unsupported_rule(loaded)
    assert refused is not None
    text = str(refused)
    assert text.startswith(f"{rules}:3:") and "\n" not in text, text
    assert "bundle: bytes is not possible with the nginx door" in text
    assert "auth_request" in text and "bundle: {requests: N}" in text
    with pytest.raises(RulesError, match="bundle: bytes is not possible with the nginx door"):
        nginx.new_engine().use_rules_file(str(rules))
    units = rules.parent / "units.yaml"
    units.write_text(
        "services:\n  - name: api\n    match: {path: /api/*}\n    price_sat: 3\n"
        "    bundle: {units: 10, usage_header: X-Usage}\n"
    )
    assert "bundle: units is not possible with the nginx door" in str(
        nginx.new_engine().unsupported_rule(load_rules(str(units)))
    )


# -- charging --------------------------------------------------------------------------------


class Told:
    """A watcher that keeps the store failures it is told."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []

    def store_failed(self, door: str, operation: str) -> None:
        self.failures.append((door, operation))


def failing_charges(engine: Paywall, monkeypatch: pytest.MonkeyPatch) -> Told:
    async def down(token_id: bytes, size: int, amount: int) -> int:
        raise StoreError("store server.sqlite: database is locked")

    monkeypatch.setattr(engine.store, "charge", down)
    told = Told()
    engine.watchers.add(told)  # type: ignore[arg-type]
    return told


async def test_a_failed_charge_is_logged_and_told_never_raised(
    engine: Paywall, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    told = failing_charges(engine, monkeypatch)
    authorization, _ = credential(engine, "audio")
    forward = await engine.handle(request("/episodes/x", authorization))
    assert isinstance(forward, Forward)
    metered = Metered.of(forward.note, engine, "GET")
    assert metered is not None
    metered.count(1234)
    with caplog.at_level(logging.WARNING):
        assert await metered.finish() is None
        assert await metered.finish() is None  # once
    assert told.failures == [("mitmproxy", "charge")]
    lines = [r.getMessage() for r in caplog.records if "cannot charge" in r.getMessage()]
    assert len(lines) == 1 and "1234 bytes" in lines[0] and "service 'audio'" in lines[0]


async def test_a_charge_outlives_the_cancelled_request(engine: Paywall) -> None:
    assert engine.store is not None
    authorization, token_id = credential(engine, "audio")
    forward = await engine.handle(request("/episodes/x", authorization))
    metered = Metered.of(forward.note, engine, "GET")
    assert metered is not None
    metered.count(600)
    task = asyncio.ensure_future(metered.finish())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # bounded: the shielded charge finishes on its own
        if await engine.store.balance_of(token_id) == 9400:
            break
        await asyncio.sleep(0.01)
    assert await engine.store.balance_of(token_id) == 9400


# -- the mitmproxy door ------------------------------------------------------------------------


@pytest.fixture
async def proxy(tmp_path: Path, rules: Path) -> AsyncIterator[L402Server]:
    async with server_on(tmp_path, rules) as server:
        yield server


async def forwarded_flow(proxy: L402Server, path: str, method: str = "GET", **headers: str) -> Any:
    flow = flow_for(path, **headers)
    flow.request.method = method
    await proxy.request(flow)
    assert flow.response is None, flow.response and flow.response.content
    return flow


def origin_answers(flow: Any, status: int = 200, body: bytes = b"", **headers: str) -> None:
    flow.response = tutils.tresp(status_code=status, content=body)
    flow.response.headers.clear()
    for name, value in headers.items():
        flow.response.headers.add(name.replace("_", "-"), value)


async def test_the_proxy_counts_a_streamed_answer_and_charges_it_at_its_end(
    proxy: L402Server,
) -> None:
    assert proxy.store is not None
    authorization, token_id = credential(proxy.engine, "audio")
    flow = await forwarded_flow(proxy, "/episodes/ep1.mp3", Authorization=authorization)
    origin_answers(flow, 206, Content_Length="3000", Content_Range="bytes 0-2999/9999")
    await settle(proxy.responseheaders(flow))
    response = flow.response
    assert response.headers["X-L402-Balance"] == "7000 bytes"
    assert response.headers["Cache-Control"] == "private"
    stream = response.stream
    assert callable(stream)
    for _ in range(3):
        assert stream(b"x" * 1000) == b"x" * 1000
    assert stream(b"") == b""
    assert await proxy.store.balance_of(token_id) == 10000  # charged at the end, once
    await settle(proxy.response(flow))
    assert await proxy.store.balance_of(token_id) == 7000
    await settle(proxy.error(flow))  # nothing left to charge
    assert await proxy.store.balance_of(token_id) == 7000


async def test_the_proxy_charges_what_was_sent_when_the_client_leaves(proxy: L402Server) -> None:
    assert proxy.store is not None
    authorization, token_id = credential(proxy.engine, "audio")
    flow = await forwarded_flow(proxy, "/episodes/ep1.mp3", Authorization=authorization)
    origin_answers(flow, 200)  # a stream: no Content-Length
    await settle(proxy.responseheaders(flow))
    assert flow.response.headers["X-L402-Balance"] == "10000 bytes"
    flow.response.stream(b"y" * 1500)
    await settle(proxy.error(flow))
    assert await proxy.store.balance_of(token_id) == 8500


async def test_the_proxy_counts_nothing_for_head(proxy: L402Server) -> None:
    assert proxy.store is not None
    authorization, token_id = credential(proxy.engine, "audio")
    flow = await forwarded_flow(proxy, "/episodes/ep1.mp3", "HEAD", Authorization=authorization)
    origin_answers(flow, 200, Content_Length="4000")
    await settle(proxy.responseheaders(flow))
    assert flow.response.headers["X-L402-Balance"] == "10000 bytes"
    flow.response.stream(b"z" * 10)  # nothing a HEAD answer can carry is counted
    await settle(proxy.response(flow))
    assert await proxy.store.balance_of(token_id) == 10000


async def test_the_proxy_charges_the_reported_units_and_hides_the_report(
    proxy: L402Server,
) -> None:
    assert proxy.store is not None
    authorization, token_id = credential(proxy.engine, "api")
    flow = await forwarded_flow(proxy, "/api/search", Authorization=authorization)
    origin_answers(flow, 200, b"{}", X_Usage="30", x_usage="30", Content_Type="application/json")
    await settle(proxy.responseheaders(flow))
    assert await proxy.store.balance_of(token_id) == 70  # before the head goes out
    await settle(proxy.response(flow))
    headers = flow.response.headers
    assert "X-Usage" not in headers and headers["X-L402-Balance"] == "70 units"
    assert await proxy.store.balance_of(token_id) == 70


async def test_a_missing_report_costs_one_unit_and_a_warning(
    proxy: L402Server, caplog: pytest.LogCaptureFixture
) -> None:
    assert proxy.store is not None
    metering._warned.clear()
    authorization, token_id = credential(proxy.engine, "api")
    with caplog.at_level(logging.WARNING):
        for value in (None, "lots"):
            flow = await forwarded_flow(proxy, "/api/search", Authorization=authorization)
            extra = {} if value is None else {"X_Usage": value}
            origin_answers(flow, 200, b"{}", **extra)
            await settle(proxy.responseheaders(flow))
            await settle(proxy.response(flow))
            assert "X-Usage" not in flow.response.headers
    assert flow.response.headers["X-L402-Balance"] == "98 units"
    assert await proxy.store.balance_of(token_id) == 98
    warnings = [r.getMessage() for r in caplog.records if "not metered" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "service 'api'" in warnings[0] and "rules.yaml:7" in warnings[0]
    assert "missing" in warnings[0] and "'lots'" in warnings[1]


async def test_the_usage_header_never_reaches_a_client_whoever_asks(proxy: L402Server) -> None:
    """Not on a free variant, an unpriced path or a request without a token either."""
    flows = [
        await forwarded_flow(proxy, "/listen/a", Accept="text/html"),  # upgrade: free variant
        await forwarded_flow(proxy, "/elsewhere"),
    ]
    for flow in flows:
        origin_answers(flow, 200, b"ok", X_Cost="5", x_usage="1", Other="kept")
        await settle(proxy.responseheaders(flow))
        await settle(proxy.response(flow))
        headers = flow.response.headers
        assert "X-Cost" not in headers and "X-Usage" not in headers and headers["Other"] == "kept"


async def test_a_metered_token_opens_no_websocket(proxy: L402Server) -> None:
    authorization, _ = credential(proxy.engine, "audio")
    flow = flow_for(
        "/episodes/live", Authorization=authorization, Upgrade="websocket", Connection="Upgrade"
    )
    await proxy.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert b"WebSocket" in flow.response.content
    assert "Authorization" not in flow.request.headers


async def test_a_spent_bytes_token_at_the_proxy_gets_the_402(proxy: L402Server) -> None:
    assert proxy.store is not None
    authorization, token_id = credential(proxy.engine, "audio")
    flow = await forwarded_flow(proxy, "/episodes/ep1.mp3", Authorization=authorization)
    origin_answers(flow, 200, Content_Length="12000")
    await settle(proxy.responseheaders(flow))
    assert flow.response.headers["X-L402-Balance"] == "0 bytes"
    flow.response.stream(b"a" * 12000)  # in flight when the balance ran out: it finishes
    await settle(proxy.response(flow))
    assert await proxy.store.balance_of(token_id) == 0
    spent = flow_for("/episodes/ep2.mp3", Authorization=authorization)
    await proxy.request(spent)
    assert spent.response is not None and spent.response.status_code == 402
    assert spent.response.headers["X-L402-Balance"] == "0 bytes"


# -- the ASGI door -----------------------------------------------------------------------------


class Server:
    """One connection as uvicorn serves it: `receive` gives the (empty) request body, then
    waits until the client leaves or the answer is complete; `send` drops what comes after
    the client left. `leave_after`: the client reads that many body messages, stops reading
    (the next send waits for the socket) and goes away, which wakes `receive` first."""

    def __init__(
        self,
        target: str,
        leave_after: int | None = None,
        write_fails: bool = False,
        **headers: str,
    ) -> None:
        self.target = target
        # How the client's leaving is learnt: a write that waited for the socket (the waiting
        # receive wakes first), or a write that failed (asyncio calls connection_lost later,
        # and sends return at once, without yielding, in between and after).
        self.write_fails = write_fails
        self.headers = [(b"host", HOST.encode())] + [
            (name.replace("_", "-").lower().encode(), value.encode())
            for name, value in headers.items()
        ]
        self.leave_after = leave_after
        self.ended = asyncio.Event()  # the client left, or the answer is complete
        self.gone = False
        self.given = False
        self.start: Message | None = None
        self.bodies: list[bytes] = []

    def scope(self, method: str = "GET") -> Message:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": self.target,
            "raw_path": self.target.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": self.headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "extensions": {"http.response.pathsend": {}},
        }

    async def receive(self) -> Message:
        if not self.given:
            self.given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.ended.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.gone:
            return
        if message["type"] == "http.response.start":
            self.start = message
            return
        if self.leave_after is not None and len(self.bodies) == self.leave_after:
            self.gone = True
            if self.write_fails:
                asyncio.get_running_loop().call_soon(self.ended.set)
                return
            self.ended.set()  # connection_lost: the waiting receive wakes first,
            await asyncio.sleep(0)  # then the write that waited for the socket returns
            return
        self.bodies.append(message.get("body", b""))
        if not message.get("more_body", False):
            self.ended.set()

    async def run(self, app: Any, method: str = "GET") -> None:
        await asyncio.wait_for(app(self.scope(method), self.receive, self.send), STEP_SECONDS)

    def header(self, name: str) -> str | None:
        assert self.start is not None
        values = header(self.start["headers"], name)
        return b", ".join(values).decode() if values else None


class App:
    """A plain ASGI app: `chunks` as body messages with `headers`, without listening for the
    client's leaving (the door must notice it all the same); records the scope it got."""

    def __init__(
        self,
        chunks: list[bytes],
        headers: list[tuple[bytes, bytes]] = [],  # noqa: B006
        yields: bool = True,
    ) -> None:
        self.chunks = chunks
        self.headers = headers
        self.yields = yields  # False: an app with its chunks at hand, awaiting only `send`
        self.scopes: list[Message] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), STEP_SECONDS)
        for index, chunk in enumerate(self.chunks):
            more = index < len(self.chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if self.yields:
                await asyncio.sleep(0)  # as a real app producing its chunks would


@pytest.fixture
async def opened() -> AsyncIterator[list[L402Middleware]]:
    doors: list[L402Middleware] = []
    yield doors
    for door in doors:
        await door.close()


async def asgi_door(
    tmp_path: Path, rules: Path, app: App, opened: list[L402Middleware]
) -> L402Middleware:
    door = middleware(tmp_path, app, rules)
    opened.append(door)
    assert await door.open() is None
    return door


async def test_the_asgi_door_counts_the_chunks_the_client_got(
    tmp_path: Path, rules: Path, opened: list[L402Middleware]
) -> None:
    app = App([b"a" * 1000] * 10, [(b"content-type", b"audio/mpeg")])
    door = await asgi_door(tmp_path, rules, app, opened)
    store = door.engine.store
    assert store is not None
    authorization, token_id = credential(door.engine, "audio")
    server = Server("/episodes/live.mp3", leave_after=3, Authorization=authorization)
    await server.run(door)
    assert server.header("x-l402-balance") == "10000 bytes"  # a stream: as before
    assert server.header("cache-control") == "private"
    assert len(server.bodies) == 3
    assert await store.balance_of(token_id) == 7000
    # The whole answer, for a client that stays, is all charged before its last chunk goes.
    whole = Server("/episodes/live.mp3", Authorization=authorization)
    await whole.run(door)
    assert len(whole.bodies) == 10 and await store.balance_of(token_id) == 0
    # The app never got to send a file the door could not count.
    assert all("http.response.pathsend" not in s["extensions"] for s in app.scopes)
    spent = Server("/episodes/live.mp3", Authorization=authorization)
    await spent.run(door)
    assert spent.start is not None and spent.start["status"] == 402
    assert spent.header("x-l402-balance") == "0 bytes"


@pytest.mark.parametrize("yields", [True, False], ids=["app-yields", "app-never-yields"])
async def test_the_asgi_door_stops_counting_when_a_write_fails(
    tmp_path: Path, rules: Path, opened: list[L402Middleware], yields: bool
) -> None:
    """A failed write is known to the server only from a later callback, and uvicorn's send
    then returns without yielding: an app that awaits nothing else would stream on, all
    counted (CI saw a client that read 1 MiB of 64 charged for all 64)."""
    app = App([b"a" * 1000] * 10, [(b"content-type", b"audio/mpeg")], yields=yields)
    door = await asgi_door(tmp_path, rules, app, opened)
    store = door.engine.store
    assert store is not None
    authorization, token_id = credential(door.engine, "audio")
    server = Server("/episodes/live.mp3", 3, write_fails=True, Authorization=authorization)
    await server.run(door)
    assert len(server.bodies) == 3
    # The three the client got, and at most the one whose write failed.
    assert 6000 <= await store.balance_of(token_id) <= 7000


async def test_the_asgi_door_counts_nothing_for_head_and_a_known_length_up_front(
    tmp_path: Path, rules: Path, opened: list[L402Middleware]
) -> None:
    app = App([b"b" * 2500], [(b"content-length", b"2500")])
    door = await asgi_door(tmp_path, rules, app, opened)
    store = door.engine.store
    assert store is not None
    authorization, token_id = credential(door.engine, "audio")
    head = Server("/episodes/ep1.mp3", Authorization=authorization)
    await head.run(door, "HEAD")
    assert head.header("x-l402-balance") == "10000 bytes"
    assert await store.balance_of(token_id) == 10000
    get = Server("/episodes/ep1.mp3", Authorization=authorization)
    await get.run(door)
    assert get.header("x-l402-balance") == "7500 bytes"
    assert await store.balance_of(token_id) == 7500


async def test_the_asgi_door_charges_reported_units_and_hides_the_report(
    tmp_path: Path, rules: Path, opened: list[L402Middleware]
) -> None:
    reported = [(b"content-type", b"application/json"), (b"x-usage", b"40"), (b"X-Usage", b"40")]
    door = await asgi_door(tmp_path, rules, App([b"{}"], reported), opened)
    store = door.engine.store
    assert store is not None
    authorization, token_id = credential(door.engine, "api")
    answers = []
    for _ in range(3):
        server = Server("/api/search", Authorization=authorization)
        await server.run(door)
        answers.append((server.start["status"] if server.start else None, server))
    assert [status for status, _ in answers] == [200, 200, 200]
    assert [s.header("x-l402-balance") for _, s in answers] == ["60 units", "20 units", "0 units"]
    assert all(s.header("x-usage") is None for _, s in answers)
    assert await store.balance_of(token_id) == 0
    spent = Server("/api/search", Authorization=authorization)
    await spent.run(door)
    assert spent.start is not None and spent.start["status"] == 402
    assert spent.header("x-l402-balance") == "0 units"
    # Nor on an unpriced path.
    free = Server("/elsewhere")
    await free.run(door)
    assert free.header("x-usage") is None and free.header("content-type") == "application/json"


async def test_the_last_bytes_in_flight_all_finish_and_the_balance_ends_at_zero(
    tmp_path: Path, rules: Path, opened: list[L402Middleware]
) -> None:
    app = App([b"c" * 1500] * 2)
    app.gate = asyncio.Event()
    door = await asgi_door(tmp_path, rules, app, opened)
    store = door.engine.store
    assert store is not None
    authorization, token_id = credential(door.engine, "audio")
    await store.charge(token_id, 10000, 9000)  # 1000 bytes left
    servers = [Server("/episodes/x", Authorization=authorization) for _ in range(5)]
    running = [asyncio.ensure_future(s.run(door)) for s in servers]
    for _ in range(200):  # bounded: every request past the paywall, its head out
        if all(s.start is not None for s in servers):
            break
        await asyncio.sleep(0.01)
    app.gate.set()
    await asyncio.gather(*running)
    assert [b"".join(s.bodies) for s in servers] == [b"c" * 3000] * 5
    assert await store.balance_of(token_id) == 0
    late = Server("/episodes/x", Authorization=authorization)
    await late.run(door)
    assert late.start is not None and late.start["status"] == 402


async def test_the_asgi_door_charges_what_was_sent_when_the_app_fails(
    tmp_path: Path, rules: Path, opened: list[L402Middleware]
) -> None:
    class Failing(App):
        async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"d" * 700, "more_body": True})
            raise RuntimeError("the app broke mid-answer")

    door = await asgi_door(tmp_path, rules, Failing([]), opened)
    store = door.engine.store
    assert store is not None
    authorization, token_id = credential(door.engine, "audio")
    server = Server("/episodes/x", Authorization=authorization)
    with pytest.raises(RuntimeError, match="mid-answer"):
        await server.run(door)
    assert await store.balance_of(token_id) == 9300


async def test_a_failed_charge_at_the_asgi_door_still_answers(
    tmp_path: Path,
    rules: Path,
    opened: list[L402Middleware],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    door = await asgi_door(tmp_path, rules, App([b"{}"], [(b"x-usage", b"5")]), opened)
    told = failing_charges(door.engine, monkeypatch)
    authorization, _ = credential(door.engine, "api")
    server = Server("/api/x", Authorization=authorization)
    await server.run(door)
    assert server.start is not None and server.start["status"] == 200
    assert server.bodies == [b"{}"] and server.header("x-usage") is None
    assert server.header("x-l402-balance") == "95 units"  # as best known
    assert told.failures == [("ASGI", "charge")]


async def test_a_metered_token_opens_no_websocket_at_the_asgi_door(
    tmp_path: Path, rules: Path, opened: list[L402Middleware]
) -> None:
    app = App([])
    door = await asgi_door(tmp_path, rules, app, opened)
    authorization, _ = credential(door.engine, "audio")
    sent: list[Message] = []
    scope = {
        **Server("/episodes/live").scope(),
        "type": "websocket",
        "scheme": "ws",
        "headers": [(b"host", HOST.encode()), (b"authorization", authorization.encode())],
        "extensions": {"websocket.http.response": {}},
    }

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(door(scope, receive, send), STEP_SECONDS)
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 400
    assert not app.scopes
