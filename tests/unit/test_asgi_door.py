"""The ASGI door (doors/asgi.py) driven directly: plain ASGI callables for the app, the server
and the client, no sockets. The same requests get the same answers as at the mitmproxy door."""

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from l402proxy import paywall
from l402proxy.asgi import L402Middleware
from l402proxy.doors import asgi as door
from l402proxy.engine import Request
from l402proxy.l402.headers import parse_challenges
from l402proxy.lightning import DevLedger, LightningError
from l402proxy.rules import RulesError
from tests.unit.test_server_addon import BROWSER_ACCEPT, RULES, flow_for, server_on

Message = dict[str, Any]
OPTED_IN = (b"accept-authenticate", b"L402")
# Bounded waits: a door that buffers what it must stream fails here instead of hanging.
STEP_SECONDS = 10.0

PAID_RULES = r"""
services:
  - name: podcast
    description: "Ad-free episode"
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\1"]
      set_headers: {X-Ad-Free: "1"}
  - name: bonus
    match: {path: "/bonus/*"}
    price_sat: 100
"""


# -- the app behind the door, and how a test talks to the door ----------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = ((b"content-type", b"text/plain"),)
    chunks: Sequence[bytes] = (b"ok",)


@dataclass
class Origin:
    """A plain ASGI app: records what reaches it, answers `reply` chunk by chunk. `paced` makes
    it wait between chunks until the client has the previous one (so buffering deadlocks)."""

    reply: Reply = field(default_factory=Reply)
    scopes: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    paced: asyncio.Event | None = None
    lifespan: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.run_lifespan(receive, send)
            return
        self.scopes.append(scope)
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        reply = self.reply
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": list(reply.headers)})  # fmt: skip
        for index, chunk in enumerate(reply.chunks):
            more = index < len(reply.chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if more and self.paced is not None:
                await asyncio.wait_for(self.paced.wait(), STEP_SECONDS)
                self.paced.clear()

    async def run_lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.lifespan.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    @property
    def seen(self) -> dict[str, Any]:
        assert self.scopes, "the request never reached the app"
        return self.scopes[-1]

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.seen["headers"] if key == name]


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    body_messages: int

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower().encode()
        return [value.decode() for key, value in self.headers if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return ", ".join(values) if values else None


def http_scope(
    target: str = "/",
    *,
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    host: bytes = b"podcast.example",
    **extra: Any,
) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", host), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        **extra,
    }


async def call(
    app: Any,
    target: str = "/",
    *,
    chunks: Sequence[bytes] = (b"",),
    pulled: list[int] | None = None,
    on_body: asyncio.Event | None = None,
    **scope: Any,
) -> Response:
    """One request through `app` as a server sends it; the response as the client sees it."""
    pending = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if pulled is not None:
            pulled.append(1)
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if on_body is not None and message["type"] == "http.response.body":
            on_body.set()

    await asyncio.wait_for(app(http_scope(target, **scope), receive, send), STEP_SECONDS)
    start = sent[0]
    assert start["type"] == "http.response.start", sent
    bodies = [m for m in sent[1:] if m["type"] == "http.response.body"]
    assert bodies and not bodies[-1].get("more_body"), sent
    headers = [(bytes(k), bytes(v)) for k, v in start["headers"]]
    for name, _ in headers:
        assert name == name.lower(), f"ASGI header names are lower-case: {name!r}"
    return Response(
        start["status"], headers, b"".join(m.get("body", b"") for m in bodies), len(bodies)
    )


def middleware(
    tmp_path: Path, app: Any, rules: Path | str = RULES, **options: Any
) -> L402Middleware:
    options.setdefault("store", str(tmp_path / "server.sqlite"))
    options.setdefault("dev_ledger", str(tmp_path / "devledger.sqlite"))
    return L402Middleware(app, rules=str(rules), **options)


@pytest.fixture
def origin() -> Origin:
    return Origin()


@pytest.fixture
async def mw(tmp_path: Path, origin: Origin) -> AsyncIterator[L402Middleware]:
    wrapped = middleware(tmp_path, origin)
    yield wrapped
    await wrapped.close()


@pytest.fixture
async def paid_mw(tmp_path: Path, origin: Origin) -> AsyncIterator[L402Middleware]:
    rules = tmp_path / "paid.yaml"
    rules.write_text(PAID_RULES)
    wrapped = middleware(tmp_path, origin, rules)
    yield wrapped
    await wrapped.close()


async def buy(tmp_path: Path, app: Any, target: str) -> str:
    """Pay the challenge `target` gets; the Authorization value that holds the token."""
    answer = await call(app, target, headers=[OPTED_IN])
    assert answer.status == 402, answer.body
    challenge = parse_challenges(answer.get_all("WWW-Authenticate"))[0]
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        paid = await ledger.pay("listener", challenge.invoice, 0)
    finally:
        await ledger.close()
    return f"L402 {challenge.macaroon}:{paid.preimage.hex()}"


# -- answers: the same as the proxy's ---------------------------------------------------------

TOKEN_HEADERS = ("www-authenticate", "set-cookie", "content-length")


@pytest.mark.parametrize("accept", ["application/json", "text/plain", BROWSER_ACCEPT])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_challenge_is_the_proxys_challenge(
    tmp_path: Path, mw: L402Middleware, origin: Origin, accept: str, method: str
) -> None:
    """The same request at both doors: the same status, header fields in the same order with
    the same values (but the token's own), and the same body but for the token."""
    ours = await call(mw, "/bonus/x.mp3", method=method, headers=[(b"accept", accept.encode())])
    assert not origin.scopes
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    async with server_on(proxy_dir, RULES) as addon:
        flow = flow_for("/bonus/x.mp3", Host="podcast.example", Accept=accept)
        flow.request.method = method
        await addon.request(flow)
    assert flow.response is not None
    theirs = flow.response
    assert ours.status == theirs.status_code == 402
    assert [k.lower() for k, _ in ours.headers] == [k.lower() for k, _ in theirs.headers.fields]
    for (name, value), (_, other) in zip(ours.headers, theirs.headers.fields, strict=True):
        if name.decode() not in TOKEN_HEADERS:
            assert value == other, name
    # Both challenge lines, LSAT first (old clients read only the first); never cached.
    lines = ours.get_all("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    assert ours.get("Cache-Control") == "no-store"
    get_length = int(ours.get("Content-Length") or -1)
    if method == "HEAD":
        assert ours.body == b"" and get_length > 0
        return
    assert get_length == len(ours.body)
    assert len(ours.get_all("Set-Cookie")) == len(theirs.headers.get_all("Set-Cookie"))
    if accept == "application/json":
        mine, proxy = json.loads(ours.body), json.loads(theirs.content or b"")
        token_keys = {"invoice", "macaroon", "invoice_expires_at"}
        assert mine.keys() == proxy.keys()
        assert {k: v for k, v in mine.items() if k not in token_keys} == {
            k: v for k, v in proxy.items() if k not in token_keys
        }


async def test_the_answer_is_the_engines_answer(mw: L402Middleware) -> None:
    """Status, fields in order and body as the engine made them (names in ASGI's lower case)."""
    ours = await call(mw, "/feed.xml/../bonus/x.mp3")  # a path the rules refuse: 400, no token
    engine = await mw.engine.handle(
        Request("GET", "/feed.xml/../bonus/x.mp3", "podcast.example", ((b"host", b"x"),))
    )
    assert ours.status == engine.status == 400  # type: ignore[union-attr]
    assert ours.headers == [(k.lower(), v) for k, v in engine.headers]  # type: ignore[union-attr]
    assert ours.body == engine.body  # type: ignore[union-attr]


async def test_two_host_headers_are_refused(mw: L402Middleware, origin: Origin) -> None:
    answer = await call(mw, "/feed.xml", headers=[(b"host", b"other.example")])
    assert answer.status == 400 and b"more than one Host" in answer.body
    assert not origin.scopes


async def test_an_absolute_form_target_is_refused(mw: L402Middleware, origin: Origin) -> None:
    """uvicorn's h11 server hands `GET http://other.example/bonus/x` on with that as the path:
    no rule's path matches it, so it would reach the app unjudged."""
    scope = {"raw_path": b"http://other.example/bonus/x.mp3", "path": "http://other.example/b"}
    answer = await call(mw, "/bonus/x.mp3", **scope)
    assert answer.status == 400 and b"not a path" in answer.body
    denied = await websocket(mw, "/bonus/live", extension=False, **scope)
    assert denied[0]["type"] == "websocket.close"
    assert not origin.scopes
    assert (await call(mw, "*", method="OPTIONS")).status == 200  # OPTIONS * is no path either


async def test_without_raw_path_the_path_is_judged_percent_encoded(
    mw: L402Middleware, origin: Origin
) -> None:
    answer = await call(mw, "/bonus/a b.mp3", raw_path=None)
    assert answer.status == 402
    assert (await call(mw, "/feed.xml?x=1", raw_path=None)).status == 200
    assert origin.seen["query_string"] == b"x=1"


async def test_an_engine_failure_fails_closed(
    mw: L402Middleware, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    await call(mw, "/feed.xml")  # opened

    async def broken(request: Request, **_: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(mw.engine, "handle", broken)
    answer = await call(mw, "/feed.xml", method="HEAD")
    assert answer.status == 503 and answer.body == b"" and answer.get("Retry-After")
    assert len(origin.scopes) == 1


# -- forwarded requests: what reaches the app -----------------------------------------------------


async def test_free_variant_reaches_the_app_unchanged_and_is_marked(
    mw: L402Middleware, origin: Origin
) -> None:
    answer = await call(mw, "/episodes/ep1.mp3?t=3")
    assert answer.status == 200 and answer.body == b"ok"
    assert origin.seen["path"] == "/episodes/ep1.mp3"
    assert origin.seen["query_string"] == b"t=3"
    assert answer.get("Vary") == "Authorization, Cookie, Accept-Authenticate"
    assert answer.get("Cache-Control") is None  # the free copy may be cached (per Vary)
    page = await call(mw, "/episodes/ep1.mp3", headers=[(b"accept", BROWSER_ACCEPT.encode())])
    assert page.get("Vary") == "Authorization, Cookie, Accept-Authenticate, Accept"


async def test_paid_variant_reaches_the_app_rewritten_with_its_headers(
    tmp_path: Path, paid_mw: L402Middleware, origin: Origin
) -> None:
    """rewrite_path gives the app a new path, raw_path and query_string; set_headers arrive in
    lower case; our credential (here the browser's cookie) never arrives, the app's own Basic
    and cookie do, and the client's copy of a header the paid variant sets is gone."""
    token = (await buy(tmp_path, paid_mw, "/episodes/a%20b.mp3")).removeprefix("L402 ")
    answer = await call(
        paid_mw,
        "/episodes/a%20b.mp3?t=3&u=%2F",
        headers=[
            (b"authorization", b"Basic dTpw"),
            (b"cookie", f"L402_podcast={token}; theme=dark".encode()),
            (b"x-ad-free", b"0"),
        ],
    )
    assert answer.status == 200 and answer.body == b"ok"
    seen = origin.seen
    assert seen["path"] == "/adfree/a b.mp3"
    assert seen["raw_path"] == b"/adfree/a%20b.mp3"
    assert seen["query_string"] == b"t=3&u=%2F"
    assert origin.header_values(b"x-ad-free") == [b"1"]
    assert origin.header_values(b"authorization") == [b"Basic dTpw"]
    assert origin.header_values(b"cookie") == [b"theme=dark"]
    for name, _ in seen["headers"]:
        assert name == name.lower()
    assert answer.get("Cache-Control") == "private"
    assert answer.get("Vary") == "Authorization, Cookie, Accept-Authenticate"


async def test_a_header_the_paid_variant_sets_never_comes_from_the_client(
    paid_mw: L402Middleware, origin: Origin
) -> None:
    for target in ("/feed.xml", "/episodes/ep1.mp3"):  # no rule; the free variant
        await call(paid_mw, target, headers=[(b"x-ad-free", b"1"), (b"X-AD-FREE", b"1")])
        assert origin.header_values(b"x-ad-free") == [], target
        assert origin.header_values(b"X-AD-FREE") == [], target


async def test_our_credentials_never_reach_the_app(mw: L402Middleware, origin: Origin) -> None:
    await call(
        mw,
        "/feed.xml",
        headers=[
            (b"authorization", b"L402 forged:00"),
            (b"authorization", b"Basic dTpw"),
            (b"cookie", b"L402_bonus=x:00; theme=dark"),
            (b"cookie", b"L402_podcast=y:00"),
        ],
    )
    assert origin.header_values(b"authorization") == [b"Basic dTpw"]
    assert origin.header_values(b"cookie") == [b"theme=dark"]


async def test_head_reaches_the_app_and_gets_no_banner(mw: L402Middleware, origin: Origin) -> None:
    origin.reply = Reply(headers=[(b"content-type", b"text/html"), (b"content-length", b"14")],
                         chunks=[b""])  # fmt: skip
    answer = await call(
        mw, "/episodes/x.html", method="HEAD", headers=[(b"accept", BROWSER_ACCEPT.encode())]
    )
    assert answer.status == 200 and answer.body == b"" and answer.get("Content-Length") == "14"
    assert origin.seen["method"] == "HEAD"


# -- responses: streamed, ranged, and the banner ---------------------------------------------


@pytest.mark.parametrize(
    ("target", "accept"),
    [
        ("/feed.xml", "*/*"),  # no rule: no note
        ("/episodes/ep1.mp3", "*/*"),  # the free variant, not a page
        ("/episodes/ep1.html", BROWSER_ACCEPT),  # a page, but audio
    ],
)
async def test_a_streamed_response_is_not_buffered(
    mw: L402Middleware, origin: Origin, target: str, accept: str
) -> None:
    """The app sends its next chunk only once the client has the previous one: a door that
    buffered would never give the client anything (and the bounded wait fails the test)."""
    delivered = asyncio.Event()
    origin.paced = delivered
    origin.reply = Reply(headers=[(b"content-type", b"audio/mpeg")], chunks=[b"a", b"b", b"c"])
    answer = await call(mw, target, headers=[(b"accept", accept.encode())], on_body=delivered)
    assert answer.body == b"abc" and answer.body_messages == 3


async def test_a_paid_stream_and_a_range_pass_untouched(
    tmp_path: Path, paid_mw: L402Middleware, origin: Origin
) -> None:
    authorization = (await buy(tmp_path, paid_mw, "/bonus/x.mp3")).encode()
    delivered = asyncio.Event()
    origin.paced = delivered
    origin.reply = Reply(
        status=206,
        headers=[(b"content-type", b"audio/mpeg"), (b"content-range", b"bytes 2-4/10")],
        chunks=[b"c", b"d", b"e"],
    )
    answer = await call(
        paid_mw,
        "/bonus/x.mp3",
        headers=[(b"authorization", authorization), (b"range", b"bytes=2-4")],
        on_body=delivered,
    )
    assert answer.status == 206 and answer.body == b"cde" and answer.body_messages == 3
    assert answer.get("Content-Range") == "bytes 2-4/10"
    assert origin.header_values(b"range") == [b"bytes=2-4"]
    assert answer.get("Cache-Control") == "private"


def page(body: bytes, content_type: bytes = b"text/html; charset=utf-8", **more: bytes) -> Reply:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    headers += [(name.replace("_", "-").encode(), value) for name, value in more.items()]
    # In chunks, as a framework streaming a template would send it.
    return Reply(headers=headers, chunks=[body[i : i + 7] for i in range(0, len(body), 7)] or [b""])


async def browse(mw: L402Middleware, target: str = "/episodes/index.html") -> Response:
    return await call(mw, target, headers=[(b"accept", BROWSER_ACCEPT.encode())])


async def test_the_banner_goes_into_a_free_html_page(mw: L402Middleware, origin: Origin) -> None:
    origin.reply = page(b"<html><body><h1>Episode</h1></body></html>")
    answer = await browse(mw)
    text = answer.body.decode()
    assert text.startswith('<html><body><h1>Episode</h1><div id="l402-upgrade"')
    assert text.endswith("</body></html>")
    assert "Ad-free episode for 21 sats" in text
    assert "/.l402/pay?path=%2Fepisodes%2Findex.html&amp;return=%2Fepisodes%2Findex.html" in text
    assert answer.get_all("Content-Length") == [str(len(answer.body))]


async def test_the_banner_reads_the_pages_charset(mw: L402Middleware, origin: Origin) -> None:
    origin.reply = page("<body>café</body>".encode("latin-1"), b"text/html; charset=ISO-8859-1")
    answer = await browse(mw)
    assert answer.body.decode("latin-1").startswith('<body>café<div id="l402-upgrade"')
    # UTF-16 with its byte order mark and no charset named (latin-1 would garble it).
    origin.reply = page("<body>x</body>".encode("utf-16"), b"text/html")
    assert '<body>x<div id="l402-upgrade"' in (await browse(mw)).body.decode("utf-16")
    origin.reply = page(b'<meta charset="utf-8"><body>\xc3\xa9</body>', b"text/html")
    assert 'é<div id="l402-upgrade"' in (await browse(mw)).body.decode()


@pytest.mark.parametrize(
    "reply",
    [
        page(b"<body>\xff\xfe</body>"),  # not the UTF-8 it claims
        page(b"<body>x</body>", b"text/html; charset=no-such-charset"),
        page(b"<body>x</body>", b"text/html; charset=base64"),  # a codec, not a charset
        page(b"\x1f\x8b compressed", content_encoding=b"gzip"),
        page(b"<body>x</body>", b"application/json"),
        Reply(status=404, headers=[(b"content-type", b"text/html")], chunks=[b"<body></body>"]),
    ],
)
async def test_the_banner_leaves_what_it_cannot_read_alone(
    mw: L402Middleware, origin: Origin, reply: Reply
) -> None:
    origin.reply = reply
    answer = await browse(mw)
    assert answer.body == b"".join(reply.chunks)
    assert answer.get_all("Content-Length") == [
        v.decode() for k, v in reply.headers if k == b"content-length"
    ]


async def test_the_banner_is_bounded(
    mw: L402Middleware, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page past the bound passes unchanged (what was held first, then the rest streamed);
    a big page within it gets the banner on a worker thread."""
    body = b"<body>" + b"x" * 200 + b"</body>"
    monkeypatch.setattr(door, "MAX_BANNER_PAGE", 100)
    origin.reply = page(body)
    answer = await browse(mw)
    assert answer.body == body and answer.get("Content-Length") == str(len(body))
    assert answer.body_messages > 1  # not held to the end

    monkeypatch.setattr(door, "MAX_BANNER_PAGE", 1000)
    monkeypatch.setattr(door, "BANNER_INLINE_BYTES", 10)
    answer = await browse(mw)
    assert b"l402-upgrade" in answer.body and answer.body.endswith(b"</body>")
    assert answer.get("Content-Length") == str(len(answer.body))


async def test_no_banner_for_api_clients_or_when_switched_off(
    tmp_path: Path, origin: Origin
) -> None:
    body = b"<body>x</body>"
    origin.reply = page(body)
    off = middleware(tmp_path, origin, offer_upgrade=False)
    try:
        answer = await browse(off)
        assert answer.body == body
        assert answer.get("Vary") == "Authorization, Cookie, Accept-Authenticate"
    finally:
        await off.close()


async def test_a_stale_cookie_is_cleared_on_the_free_variant(
    mw: L402Middleware, origin: Origin
) -> None:
    answer = await call(mw, "/episodes/ep1.mp3", headers=[(b"cookie", b"L402_podcast=bad:00")])
    assert answer.status == 200
    cleared = answer.get_all("Set-Cookie")
    assert cleared and all(c.startswith("L402_podcast=;") for c in cleared)
    assert origin.header_values(b"cookie") == []


# -- the /.l402/ endpoints --------------------------------------------------------------------


async def test_the_page_unlocks_and_its_cookie_opens_the_path(
    tmp_path: Path, mw: L402Middleware, origin: Origin
) -> None:
    """The paywall page's flow: the 402 page sets a claim cookie, the invoice is paid, the page
    POSTs /.l402/unlock (read here in several body messages) and gets the token as a cookie."""
    shown = await browse(mw, "/bonus/x.mp3")
    assert shown.status == 402 and shown.get("Content-Type") == "text/html; charset=utf-8"
    claim = next(c for c in shown.get_all("Set-Cookie") if c.startswith(paywall.CLAIM_PREFIX))
    challenge = parse_challenges(shown.get_all("WWW-Authenticate"))[0]
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        await ledger.pay("listener", challenge.invoice, 0)
    finally:
        await ledger.close()
    body = json.dumps({"macaroon": challenge.macaroon, "preimage": None}).encode()
    unlocked = await call(
        mw,
        "/.l402/unlock",
        method="POST",
        headers=[(b"content-type", b"application/json"), (b"cookie", claim.split(";")[0].encode())],
        chunks=[body[:10], body[10:50], body[50:]],
    )
    assert unlocked.status == 200, unlocked.body
    assert json.loads(unlocked.body)["unlocked"] is True
    cookie = unlocked.get_all("Set-Cookie")[0].split(";")[0]
    opened = await call(mw, "/bonus/x.mp3", headers=[(b"cookie", cookie.encode())])
    assert opened.status == 200 and opened.body == b"ok"
    assert origin.header_values(b"cookie") == []
    assert len(origin.scopes) == 1  # the endpoint and the 402 never reached the app


async def test_an_endpoint_body_is_bounded(mw: L402Middleware, origin: Origin) -> None:
    """Past the door's bound: a plain 413 before the body is read to the end. Within it, the
    engine's own limit answers as at the proxy (JSON)."""
    pulled: list[int] = []
    chunk = b"x" * 16384
    answer = await call(
        mw,
        "/.l402/unlock",
        method="POST",
        headers=[(b"content-type", b"application/json")],
        chunks=[chunk] * 64,
        pulled=pulled,
    )
    assert answer.status == 413 and answer.get("Content-Type") == "text/plain; charset=utf-8"
    assert answer.get("Content-Length") == str(len(answer.body))
    assert len(pulled) == door.MAX_ENDPOINT_BODY // len(chunk) + 1  # not all 64
    engine_limit = await call(
        mw,
        "/.l402/unlock",
        method="POST",
        headers=[(b"content-type", b"application/json")],
        chunks=[chunk * 2],
    )
    assert engine_limit.status == 413 and json.loads(engine_limit.body)["error"] == "bad_request"
    assert not origin.scopes


# -- configuration and lifecycle -------------------------------------------------------------


def test_broken_rules_are_refused_at_construction(tmp_path: Path, origin: Origin) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text("services:\n  - name: a b\n    match: {path: /x}\n    price_sat: 1\n")
    with pytest.raises(RulesError, match=r"rules\.yaml:2"):
        middleware(tmp_path, origin, broken)
    with pytest.raises(RulesError, match=r"missing\.yaml"):
        middleware(tmp_path, origin, tmp_path / "missing.yaml")
    with pytest.raises(LightningError):
        middleware(tmp_path, origin, backend="carrier-pigeon://x")


UPSTREAM_RULES = """services:
  - name: bonus
    match: {path: "/bonus/*"}
    price_sat: 100
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    paid:
      upstream: http://127.0.0.1:9
"""


async def test_a_paid_upstream_is_refused_naming_file_and_line(
    tmp_path: Path, origin: Origin
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(UPSTREAM_RULES)
    with pytest.raises(RulesError, match=r"rules\.yaml:5: service 'podcast': paid\.upstream"):
        middleware(tmp_path, origin, rules)
    # Added while running: the rules in force stay.
    rules.write_text(UPSTREAM_RULES.split("  - name: podcast")[0])
    wrapped = middleware(tmp_path, origin, rules)
    try:
        assert (await call(wrapped, "/episodes/x.mp3", headers=[OPTED_IN])).status == 200
        rules.write_text(UPSTREAM_RULES + "\n")
        await wrapped.engine.reload_rules_if_changed()
        assert wrapped.engine.rules is not None and len(wrapped.engine.rules.rules) == 1
    finally:
        await wrapped.close()


async def test_without_a_lifespan_it_opens_on_the_first_request_and_fails_closed(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that cannot open: 503 for every request (the app never asked), no retry before
    OPEN_RETRY_SECONDS, then a later request opens it."""
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the store's folder should be")
    wrapped = middleware(tmp_path, origin, store=str(blocker / "server.sqlite"))
    try:
        for target in ("/feed.xml", "/bonus/x.mp3"):
            answer = await call(wrapped, target)
            assert answer.status == 503 and answer.get("Retry-After"), target
            assert b"could not start" in answer.body
        assert not origin.scopes
        blocker.unlink()
        blocker.mkdir()
        assert (await call(wrapped, "/feed.xml")).status == 503  # too soon to try again
        monkeypatch.setattr(door, "OPEN_RETRY_SECONDS", 0.0)
        wrapped._retry_at = 0.0
        assert (await call(wrapped, "/feed.xml")).status == 200
        assert (await call(wrapped, "/bonus/x.mp3")).status == 402
        assert (blocker / "server.sqlite").exists()
    finally:
        await wrapped.close()


async def test_concurrent_first_requests_open_once(
    mw: L402Middleware, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    real_open = mw.engine.open

    async def counted() -> None:
        opened.append(1)
        await real_open()

    monkeypatch.setattr(mw.engine, "open", counted)
    answers = await asyncio.gather(*(call(mw, "/bonus/x.mp3") for _ in range(5)))
    assert [a.status for a in answers] == [402] * 5 and opened == [1]


async def lifespan(app: Any, *, after_startup: Any = None) -> list[Message]:
    """Run a lifespan as a server does: startup, (after_startup), shutdown; what was sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []
    await inbox.put({"type": "lifespan.startup"})

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            if after_startup is not None:
                await after_startup()
            await inbox.put({"type": "lifespan.shutdown"})

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await asyncio.wait_for(app(scope, inbox.get, send), STEP_SECONDS)
    return sent


async def test_the_lifespan_opens_before_the_apps_startup_and_closes_after_its_shutdown(
    tmp_path: Path,
) -> None:
    events: list[str] = []

    class App(Origin):
        async def run_lifespan(self, receive: Any, send: Any) -> None:
            await receive()
            events.append(f"app startup, paywall open: {wrapped.loop is not None}")
            await send({"type": "lifespan.startup.complete"})
            await receive()
            events.append(f"app shutdown, paywall open: {wrapped.loop is not None}")
            await send({"type": "lifespan.shutdown.complete"})

    wrapped = middleware(tmp_path, App())

    async def serving() -> None:
        events.append(f"served {(await call(wrapped, '/bonus/x.mp3')).status}")

    sent = await lifespan(wrapped, after_startup=serving)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == [
        "app startup, paywall open: True",
        "served 402",
        "app shutdown, paywall open: True",
    ]
    assert wrapped.loop is None and (tmp_path / "server.sqlite").exists()
    # A second lifespan (a test client used twice) opens a fresh engine.
    again = await lifespan(wrapped)
    assert [m["type"] for m in again] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_an_app_without_lifespan_support_still_gets_the_lifecycle(tmp_path: Path) -> None:
    async def django_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"can only handle HTTP, not {scope['type']}")
        await Origin()(scope, receive, send)

    wrapped = middleware(tmp_path, django_like)
    opened: list[bool] = []

    async def serving() -> None:
        opened.append(wrapped.loop is not None)
        assert (await call(wrapped, "/feed.xml")).status == 200

    sent = await lifespan(wrapped, after_startup=serving)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert opened == [True] and wrapped.loop is None


async def test_a_store_that_cannot_open_fails_the_startup(tmp_path: Path, origin: Origin) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("not a folder")
    wrapped = middleware(tmp_path, origin, store=str(blocker / "server.sqlite"))
    sent = await lifespan(wrapped)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    message = sent[0]["message"]
    assert message.startswith("l402: cannot open token store") and "\n" not in message
    assert origin.lifespan == []  # the app's own startup never ran


async def test_the_apps_failed_startup_closes_the_paywall(tmp_path: Path) -> None:
    class Failing(Origin):
        async def run_lifespan(self, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "no database"})

    wrapped = middleware(tmp_path, Failing())
    sent = await lifespan(wrapped)
    assert sent == [{"type": "lifespan.startup.failed", "message": "no database"}]
    assert wrapped.loop is None


def test_a_new_loop_after_the_first_closed_gets_a_fresh_engine(
    tmp_path: Path, origin: Origin
) -> None:
    """A test client that runs each request on its own loop (Starlette's TestClient outside a
    `with`): every request is judged, on an engine open on its loop."""
    wrapped = middleware(tmp_path, origin)
    first = asyncio.run(call(wrapped, "/bonus/x.mp3"))
    engine = wrapped.engine
    second = asyncio.run(call(wrapped, "/bonus/x.mp3"))
    assert first.status == second.status == 402
    assert wrapped.engine is not engine
    asyncio.run(wrapped.close())


async def test_another_running_loop_is_refused(tmp_path: Path, origin: Origin) -> None:
    wrapped = middleware(tmp_path, origin)
    try:
        assert (await call(wrapped, "/feed.xml")).status == 200
        other = await asyncio.to_thread(asyncio.run, call(wrapped, "/feed.xml"))
        assert other.status == 503 and len(origin.scopes) == 1
    finally:
        await wrapped.close()


# -- WebSockets -----------------------------------------------------------------------------


async def websocket(
    app: Any,
    target: str,
    *,
    extension: bool,
    raw_path: bytes | None = None,
    path: str | None = None,
    **headers: bytes,
) -> list[Message]:
    scope = http_scope(target, headers=[(k.encode(), v) for k, v in headers.items()])
    if raw_path is not None:
        scope.update(raw_path=raw_path, path=path)
    scope.update(type="websocket", scheme="ws", subprotocols=[])
    scope.pop("method")
    if extension:
        scope["extensions"] = {"websocket.http.response": {}}
    inbox = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), STEP_SECONDS)
    return sent


async def test_a_websocket_handshake_is_judged_like_a_get(
    mw: L402Middleware, origin: Origin
) -> None:
    denied = await websocket(mw, "/bonus/live", extension=True)
    assert [m["type"] for m in denied] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert denied[0]["status"] == 402
    names = [name for name, _ in denied[0]["headers"]]
    assert names.count(b"www-authenticate") == 2
    assert json.loads(denied[1]["body"])["error"] == "payment_required"

    closed = await websocket(mw, "/bonus/live", extension=False)
    assert closed == [{"type": "websocket.close", "code": 1008, "reason": "402 Payment Required"}]
    assert not origin.scopes

    accepted = await websocket(
        mw, "/feed/live", extension=False, authorization=b"L402 forged:00", cookie=b"a=b"
    )
    assert [m["type"] for m in accepted] == ["websocket.accept", "websocket.close"]
    assert origin.seen["type"] == "websocket"
    assert origin.header_values(b"authorization") == []
    assert origin.header_values(b"cookie") == [b"a=b"]


async def test_other_scopes_pass_through(mw: L402Middleware) -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw.app = app
    await mw({"type": "custom"}, None, None)  # type: ignore[arg-type]
    assert seen == ["custom"]


# -- frameworks, through httpx's ASGI transport -----------------------------------------------


async def test_fastapi_add_middleware(tmp_path: Path) -> None:
    import fastapi  # the door needs no framework; its tests do (the dev extra)

    app = fastapi.FastAPI()
    tiers: list[str | None] = []

    @app.get("/api/premium/{item}")
    async def premium(item: str, request: fastapi.Request) -> dict[str, str]:
        tiers.append(request.headers.get("x-l402-tier"))
        return {"item": item}

    app.add_middleware(
        L402Middleware,
        rules=str(RULES.parent / "api.yaml"),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api.example") as client:
        challenged = await client.get("/api/premium/x", headers={"X-L402-Tier": "premium"})
        assert challenged.status_code == 402
        challenge = parse_challenges(challenged.headers.get_list("WWW-Authenticate"))[0]
        ledger = DevLedger(tmp_path / "devledger.sqlite")
        try:
            preimage = (await ledger.pay("listener", challenge.invoice, 0)).preimage
        finally:
            await ledger.close()
        token = f"L402 {challenge.macaroon}:{preimage.hex()}"
        paid = await client.get("/api/premium/x", headers={"Authorization": token})
        assert paid.status_code == 200 and paid.json() == {"item": "x"}
        assert tiers == ["premium"]
        assert paid.headers["Cache-Control"] == "private"
    # No lifespan here: the engine opened on the first request; close it as a shutdown would.
    stack = app.middleware_stack
    while not isinstance(stack, L402Middleware):
        stack = stack.app  # type: ignore[union-attr]
    await stack.close()


# Starlette 1.0 would have its TestClient on httpx2; the httpx one is what FastAPI users have.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_starlettes_test_client_with_and_without_its_lifespan(tmp_path: Path) -> None:
    """The way FastAPI and Starlette apps are tested: TestClient runs each `with` block (the
    lifespan) and, outside one, each request on a loop of its own."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def anything(request: Any) -> PlainTextResponse:
        return PlainTextResponse(request.url.path)

    app = Starlette(routes=[Route("/{path:path}", anything)])
    app.add_middleware(
        L402Middleware,
        rules=str(RULES),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    for _ in range(2):
        with TestClient(app, base_url="http://podcast.example") as client:
            assert client.get("/bonus/x.mp3").status_code == 402
            assert client.get("/feed.xml").text == "/feed.xml"
    client = TestClient(app, base_url="http://podcast.example")
    assert [client.get("/bonus/x.mp3").status_code for _ in range(2)] == [402, 402]
    stack = app.middleware_stack
    while not isinstance(stack, L402Middleware):
        stack = stack.app  # type: ignore[union-attr]
    asyncio.run(stack.close())


# -- where the app routes: root_path and a changed path (review findings F1, F3, F4) ----------

ROOTED_RULES = """
services:
  - name: premium
    match: {path: "/premium/*"}
    price_sat: 10
"""


async def test_a_root_path_that_moves_the_request_under_a_priced_rule_is_refused(
    tmp_path: Path,
) -> None:
    """Daphne takes a client's Daphne-Root-Path header as root_path, and Django and Starlette
    route on the path below it: /anything/premium/x with root_path /anything reaches the
    /premium/ route. Judged on the full path alone it was free."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(ROOTED_RULES)
    origin = Origin()
    door = middleware(tmp_path, origin, rules)
    refused = await call(door, "/anything/premium/x", root_path="/anything")
    assert refused.status == 400 and not origin.scopes
    # FastAPI(root_path="/v1"): /premium/x (path not below the root) and /v1/premium/x both
    # reach the /premium/ route: neither spelling is served unpaid, whichever the rules name.
    for path in ("/premium/x", "/v1/premium/x"):
        assert (await call(door, path, root_path="/v1")).status in (400, 402), path
    assert not origin.scopes
    # A root_path that changes nothing the rules see passes.
    assert (await call(door, "/app/free/x", root_path="/app")).status == 200


async def test_the_path_the_app_routes_on_is_judged_when_raw_path_says_otherwise(
    tmp_path: Path,
) -> None:
    """An outer middleware that strips a prefix from `path` only (not raw_path): the app routes
    on `path`, so that is what must be judged."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(ROOTED_RULES)
    origin = Origin()
    door = middleware(tmp_path, origin, rules)
    response = await call(door, "/v2/premium/x", path="/premium/x")
    assert response.status == 402 and not origin.scopes


def test_a_host_scoped_rule_is_flagged_at_the_asgi_door(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        ROOTED_RULES.replace('{path: "/premium/*"}', '{path: "/premium/*", host: a.example}')
    )
    middleware(tmp_path, Origin(), rules)
    assert any("routes by Host" in record.getMessage() for record in caplog.records)
