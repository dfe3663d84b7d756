"""The ASGI door to the paywall engine (engine/): a Lightning paywall around any ASGI app.

    from l402proxy.asgi import L402Middleware
    app = L402Middleware(app, rules="rules/api.yaml")
    # or: app.add_middleware(L402Middleware, rules="rules/api.yaml")

Pure ASGI (no framework needed): HTTP and WebSocket scopes are judged by the engine, and what it
forwards reaches the wrapped app with the paid variant applied (rewrite_path, set_headers) and
none of our credentials; answers (402/401, the /.l402/ endpoints, 503) never reach the app. The
lifespan is wrapped so the engine opens at startup and closes at shutdown; without a lifespan
(uvicorn --lifespan off, test transports) it opens on the first request.

The engine is not thread-safe: one middleware instance serves one event loop (one uvicorn worker
process; several workers each build their own, sharing the store). A request on another loop
while the first still runs is refused (503); after a loop has closed (a test client's loop per
request) the next loop gets a fresh engine.
"""

import asyncio
import codecs
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import quote, unquote

from .. import paths, paywall
from ..engine import (
    Answer,
    Forward,
    Outcome,
    Paywall,
    Refused,
    Request,
    StartError,
    feeds,
    metering,
)
from ..engine import answers as engine_answers
from ..engine.metering import Metered
from ..engine.request import Fields, encode, get, set_one
from ..ops import Operations, OpsSettings

log = logging.getLogger(__name__)

__all__ = ["L402Middleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

NO_UPSTREAM = "the wrapped app is the only origin; use rewrite_path or set_headers"
# The /.l402/ endpoints read the request body (the unlock JSON, 16 KiB at most); a bigger one is
# refused before it is read to the end, so nobody can make us buffer a large upload.
MAX_ENDPOINT_BODY = 64 * 1024
# A free HTML page gets the upgrade banner only up to this size; a bigger one passes unchanged
# (buffering it all would hold the whole page in memory before the first byte goes out).
MAX_BANNER_PAGE = 4 * 1024 * 1024
# A page bigger than this gets its banner on a worker thread.
BANNER_INLINE_BYTES = 64 * 1024
# After a failed lazy open, requests are answered 503 at once for this long before the next try
# (opening may wait up to 15 s for a backend that is down).
OPEN_RETRY_SECONDS = 2.0
# The close code for a refused WebSocket handshake where the server cannot send an HTTP answer.
POLICY_VIOLATION = 1008
# Ways to send a body that a bytes-metered answer cannot count (the server reads a file itself):
# taken out of the scope's extensions, so the app sends the body as messages.
_UNCOUNTED_SENDS = ("http.response.pathsend", "http.response.zerocopysend")
_DISCONNECT: Message = {"type": "http.disconnect"}

_AUTHORITY = re.compile(r"^(?P<host>[^:]+|\[.+\])(?::(?P<port>\d+))?$")
# What a path keeps unescaped when a server gives no raw_path (RFC 3986's pchar, and '/').
_PATH_SAFE = "/:@!$&'()*+,;=~"


def host_of(scope: Scope, fields: Fields) -> str:
    """The host the rules match on: the first Host header without its port (as mitmproxy's
    pretty_host reads it), else the address the server listens on."""
    for name, value in fields:
        if name.lower() == b"host":  # lower case in ASGI; a server that does not still counts
            if b":" not in value and b"[" not in value:  # nearly every request: no port
                return value.decode("utf-8", "surrogateescape")
            text = value.decode("utf-8", "surrogateescape")
            match = _AUTHORITY.match(text)
            if match is None:
                return text
            host = match["host"]
            return host[1:-1] if host.startswith("[") and host.endswith("]") else host
    server = scope.get("server")
    return str(server[0]) if server else ""


def target_of(scope: Scope) -> str:
    """The request target the app routes by: the raw path as the client sent it when it is
    the `path` the app gets (raw, the engine also judges its every reading), else `path`
    percent-encoded (a server without raw_path, or an outer middleware that changed `path`);
    and the query."""
    path = scope.get("path") or "/"
    raw = scope.get("raw_path")
    if raw:
        text = raw.decode("utf-8", "surrogateescape")
        if unquote(text, errors="surrogateescape") != path:
            text = _quoted(path)
    else:
        text = _quoted(path)
    query = scope.get("query_string")
    if query:
        return f"{text}?{query.decode('utf-8', 'surrogateescape')}"
    return text


def also_targets(scope: Scope) -> tuple[str, ...]:
    """Where else the app may route the request: below its `root_path` (Starlette and Django
    strip it from `path`; Daphne takes it from a client's Daphne-Root-Path header; FastAPI's
    root_path= makes both spellings reach one route). The engine refuses (400) when these fall
    under another rule than the target."""
    root = (scope.get("root_path") or "").rstrip("/")
    if not root:
        return ()
    path = scope.get("path") or "/"
    below = path[len(root) :] if path.startswith(root) else root + path
    query = scope.get("query_string")
    target = _quoted(below or "/")
    return (f"{target}?{query.decode('utf-8', 'surrogateescape')}" if query else target,)


def _inner_also_targets(scope: Scope, inner: str) -> tuple[str, ...]:
    """also_targets for a private feed's inner target (path and query as sent), as if the
    client had asked for it: the app gets it as its path, under the same root_path."""
    path, _, query = inner.partition("?")
    if not (scope.get("root_path") or "").rstrip("/"):
        return ()
    inner_scope = {
        **scope,
        "path": unquote(path, errors="surrogateescape"),
        "query_string": query.encode("utf-8", "surrogateescape"),
    }
    return also_targets(inner_scope)


def _quoted(path: str) -> str:
    return quote(path, safe=_PATH_SAFE, errors="surrogateescape")


def fields_of(headers: Sequence[Sequence[bytes]] | None) -> Fields:
    """ASGI header pairs as the engine's fields: tuples, as servers make them (a server that
    gives lists gets them copied)."""
    if not headers:
        return ()
    fields = tuple(headers)
    if type(fields[0]) is not tuple:
        return tuple((name, value) for name, value in fields)
    return fields  # type: ignore[return-value]


def one_host(hosts: Sequence[bytes]) -> str | None:
    """Two Host fields leave the choice to the app: the rules could judge by one host while the
    app routes by the other (the proxy refuses them the same way)."""
    if len(hosts) > 1:
        return "Bad request: more than one Host header."
    return None


def lower_names(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """ASGI wants lower-case header names; the engine writes a set_headers name as the rule
    spells it, and its own answers' names as mitmproxy would send them."""
    return [(name.lower(), value) for name, value in fields]


def http_messages(answer: Answer) -> tuple[Message, Message]:
    return (
        {"type": "http.response.start", "status": answer.status,
         "headers": lower_names(answer.headers)},
        {"type": "http.response.body", "body": answer.body, "more_body": False},
    )  # fmt: skip


def forwarded_scope(scope: Scope, fields: Fields, outcome: Forward) -> Scope:
    """The scope the app gets: the engine's headers, and the rewritten path when paid."""
    if outcome.headers is fields and outcome.path is None:
        return scope
    changed = dict(scope)
    changed["headers"] = lower_names(outcome.headers)
    if outcome.path is not None:
        path, _, query = outcome.path.partition("?")
        raw = path.encode("utf-8", "surrogateescape")
        changed["raw_path"] = raw
        # As servers fill it: the raw path percent-decoded (uvicorn: unquote of the ASCII).
        changed["path"] = unquote(path)
        changed["query_string"] = query.encode("utf-8", "surrogateescape")
    return changed


# Byte order marks, which decide a page's encoding before anything else (HTML's sniffing).
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


_META_CHARSET = re.compile(rb"""<meta[^>]+charset=['"]?([^'">]+)""", re.IGNORECASE)


def charset_of(content_type: str, body: bytes) -> str:
    """The charset an HTML page is in: its byte order mark, else as mitmproxy reads it
    (Content-Type, then a <meta>, else latin-1), so both doors put the banner into the same
    pages (a UTF-16 page with no charset given is not taken for latin-1, and a <meta> is looked
    for where browsers look)."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            return codec
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
            break
    else:
        # In the first 1024 bytes, where browsers look for it (HTML's prescan).
        meta = _META_CHARSET.search(body, 0, 1024)
        charset = meta.group(1).decode("ascii", "ignore") if meta else "latin-1"
    return "gb18030" if charset.lower() in ("gb2312", "gbk") else charset


def with_banner(fields: Fields, body: bytes, banner: str) -> tuple[Fields, bytes] | None:
    """The page with the upgrade banner and its length fixed; None for one we cannot read."""
    charset = charset_of(get(fields, "content-type") or "", body)
    try:
        codecs.lookup(charset)
        text = body.decode(charset)
        page = paywall.insert_banner(text, banner).encode(charset)
    except (LookupError, UnicodeError, ValueError):  # unknown, non-text or wrong charset
        return None
    if get(fields, "transfer-encoding") is None:
        fields = set_one(fields, "content-length", str(len(page)))
    return fields, page


class _FreeVariant:
    """`send` for the free variant: cache marking and cookies on the response start, and the
    upgrade banner in a 200 HTML page (buffered up to MAX_BANNER_PAGE); anything else passes
    through message by message."""

    def __init__(
        self, send: Send, note: dict[str, Any], method: str, hidden: frozenset[bytes] = frozenset()
    ) -> None:
        self.send = send
        self.note = note
        # The origin's usage headers (units bundles): never for the client.
        self.hidden = hidden
        offer = note.get("offer")
        self.banner: str | None = offer if offer and method.upper() != "HEAD" else None
        self.held: Message | None = None  # the response start, while the page is buffered
        self.chunks: list[bytes] = []
        self.size = 0

    async def __call__(self, message: Message) -> None:
        if self.held is not None:
            await self._buffer(message)
            return
        if message["type"] != "http.response.start":
            await self.send(message)
            return
        fields = engine_answers.mark_variant(
            metering.without(fields_of(message.get("headers")), self.hidden),
            paid=False,
            by_accept=bool(self.note.get("offer")),
            by_payment=bool(self.note.get("by_payment")),
        )
        cookies = engine_answers.note_cookies(self.note)
        if cookies:
            fields = (*fields, *((b"set-cookie", encode(cookie)) for cookie in cookies))
        dry_run = self.note.get("dry_run")
        if dry_run is not None:
            fields = set_one(fields, engine_answers.DRY_RUN_HEADER, dry_run)
        start = {**message, "headers": lower_names(fields)}
        if self.banner is not None and self._may_hold(start["status"], fields, message):
            self.held = start
            return
        await self.send(start)

    @staticmethod
    def _may_hold(status: int, fields: Fields, message: Message) -> bool:
        if message.get("trailers") or not engine_answers.wants_banner(status, fields):
            return False
        coding = (get(fields, "content-encoding") or "identity").strip().lower()
        return coding == "identity"

    async def _buffer(self, message: Message) -> None:
        held = self.held
        assert held is not None
        if message["type"] != "http.response.body":
            # Something we do not rewrite (a pathsend, say): the page goes out as it is.
            await self._release(message)
            return
        chunk = message.get("body", b"")
        self.chunks.append(chunk)
        self.size += len(chunk)
        more = bool(message.get("more_body", False))
        if self.size > MAX_BANNER_PAGE:
            await self._release(None, more=more)
            return
        if more:
            return
        body = b"".join(self.chunks)
        fields = tuple(held["headers"])
        if len(body) > BANNER_INLINE_BYTES:
            # Decoding and encoding a page of megabytes takes milliseconds: not on the loop.
            changed = await asyncio.to_thread(with_banner, fields, body, self.banner or "")
        else:
            changed = with_banner(fields, body, self.banner or "")
        if changed is not None:
            fields, body = changed
            held["headers"] = lower_names(fields)
        self.held, self.chunks = None, []
        await self.send(held)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _release(self, message: Message | None, *, more: bool = True) -> None:
        """Give up on the banner: the held start and what was buffered go out unchanged, then
        `message` (a non-body one), or the rest as it comes (`more`)."""
        held, self.held = self.held, None
        assert held is not None
        await self.send(held)
        body, self.chunks = b"".join(self.chunks), []
        if body or not more:
            await self.send({"type": "http.response.body", "body": body, "more_body": more})
        if message is not None:
            await self.send(message)


def _paid_send(
    send: Send,
    dry_run: str | None = None,
    balance: str | None = None,
    hidden: frozenset[bytes] = frozenset(),
    receipt: str | None = None,
) -> Send:
    """`send` for the paid variant: the response start marked private and varying by credential
    (and, in a dry run, saying so; for a bundle token, what is left of it; for a Payment charge
    its receipt on success; without the origin's usage headers or receipt); the body
    untouched."""

    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            fields = metering.without(fields_of(message.get("headers")), hidden)
            fields = engine_answers.mark_variant(fields, paid=True)
            if dry_run is not None:
                fields = set_one(fields, engine_answers.DRY_RUN_HEADER, dry_run)
            if balance is not None:
                fields = set_one(fields, engine_answers.BALANCE_HEADER, balance)
            fields = engine_answers.mark_receipt(fields, receipt, message.get("status", 200))
            message = {**message, "headers": lower_names(fields)}
        await send(message)

    return marked


def _hiding_send(send: Send, hidden: frozenset[bytes]) -> Send:
    """`send` for an answer no rule prices: only the origin's usage headers and Payment-Receipt
    go."""

    async def hiding(message: Message) -> None:
        if message["type"] == "http.response.start":
            fields = fields_of(message.get("headers"))
            kept = metering.without(fields, hidden)
            if kept is not fields:
                message = {**message, "headers": list(kept)}
        await send(message)

    return hiding


class _FeedSend:
    """`send` for a private feed's document (engine/feeds.py): a 2xx answer to a GET is held
    whole (at most MAX_FEED_BYTES, else 502), made private on a worker thread (FeedError:
    502 with the reason) and sent with its new length; anything else passes unchanged. What
    the app sends after a 502 went out is dropped."""

    def __init__(self, send: Send, note: dict[str, Any], method: str) -> None:
        self.send = send
        self.wanted: dict[str, Any] = note[feeds.FEED_NOTE]
        self.service = note.get("service")
        self.method = method
        self.held: Message | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.passing = False
        self.done = False

    async def __call__(self, message: Message) -> None:
        if self.done:
            return
        if self.passing:
            await self.send(message)
            return
        kind = message["type"]
        if self.held is None:
            if kind == "http.response.start" and feeds.rewrites(
                self.method, message.get("status", 200)
            ):
                if message.get("trailers"):
                    await self._fail("the feed came with trailers")
                    return
                self.held = message
                return
            self.passing = True
            if kind == "http.response.start":
                # HEAD, 304, an error: passed as the app sent it, kept by nobody but the listener.
                fields = feeds.private_head(fields_of(message.get("headers")))
                message = {**message, "headers": lower_names(fields)}
            await self.send(message)
            return
        if kind != "http.response.body":
            await self._fail("the feed was not sent as a body")
            return
        chunk = message.get("body", b"")
        self.size += len(chunk)
        if self.size > feeds.MAX_FEED_BYTES:
            await self._fail(f"feed too large: more than {feeds.MAX_FEED_BYTES} bytes")
            return
        self.chunks.append(chunk)
        if message.get("more_body", False):
            return
        body, self.chunks = b"".join(self.chunks), []
        fields = fields_of(self.held.get("headers"))
        try:
            private = await asyncio.to_thread(
                feeds.private_body, body, get(fields, "content-encoding"), self.wanted
            )
        except feeds.FeedError as exc:
            await self._fail(str(exc))
            return
        start = {**self.held, "headers": lower_names(feeds.private_fields(fields, len(private)))}
        self.held, self.done = None, True
        await self.send(start)
        await self.send({"type": "http.response.body", "body": private, "more_body": False})

    async def _fail(self, problem: str) -> None:
        self.held, self.chunks, self.done = None, [], True
        where = f" of {self.service}" if self.service else ""
        log.warning(f"l402: a private feed{where}: {problem}")
        start, body = http_messages(feeds.bad_feed_answer(problem, self.method))
        await self.send(start)
        await self.send(body)


class _Watched:
    """`receive` for the app of a bytes-metered answer. Servers drop what an app sends after
    the client went away (uvicorn's send returns as if it was sent), so from the answer's
    start on the door reads the server's `receive` itself, one message ahead of the app (which
    gets each in turn, unchanged): the client's leaving is known at once, whether or not the
    app listens for it, and what is sent after is not counted."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.gone = False
        self.inside = 0  # the app's receive calls under way (never two readers at once)
        self.wanted = False
        self.task: asyncio.Task[None] | None = None
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)

    async def __call__(self) -> Message:
        if self.task is None:
            self.inside += 1
            try:
                message = await self.receive()
            finally:
                self.inside -= 1
            if message["type"] == "http.disconnect":
                self.gone = True
            if self.wanted and not self.inside:
                self.watch()
            return message
        if self.queue.empty() and self.task.done():
            return _DISCONNECT if self.gone else await self.receive()
        return await self.queue.get()

    def watch(self) -> None:
        """Start reading ahead (once the answer starts; after the app's own read, if one is
        under way)."""
        if self.task is not None or self.gone:
            return
        if self.inside:
            self.wanted = True
            return
        self.task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    self.gone = True
                await self.queue.put(message)
                if self.gone:
                    return
        except Exception as exc:  # the server's receive failed: nothing more to learn
            log.debug(f"l402: reading ahead for a metered answer stopped: {exc!r}")
            if self.queue.empty():
                self.queue.put_nowait(_DISCONNECT)  # an app waiting for a message is woken

    def stop(self) -> None:
        """The app is done: stop reading ahead, and wake any reader left waiting."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        if task is not None and self.queue.empty():
            self.queue.put_nowait(_DISCONNECT)


class _MeteredSend:
    """`send` for a bytes- or units-metered answer: the paid variant's marks, then the head
    the metering makes (X-L402-Balance, the usage header gone, units charged), and each body
    chunk counted once the server took it while the client is there. The last chunk is
    counted and charged before it goes: when the client has the whole answer, the store has
    its cost (a next request sees what is left)."""

    def __init__(
        self,
        send: Send,
        note: dict[str, Any],
        metered: Metered,
        hidden: frozenset[bytes],
        watched: _Watched | None,
    ) -> None:
        self.send = send
        self.note = note
        self.metered = metered
        self.hidden = hidden
        self.watched = watched

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body", b"")
            if not message.get("more_body", False):
                await self._settle()
                if not self.gone:
                    self.metered.count(len(body))
                await self.metered.finish()
                await self.send(message)
                return
            await self.send(message)
            await self._settle()
            if not self.gone:
                self.metered.count(len(body))
            return
        if kind == "http.response.start":
            fields = engine_answers.mark_variant(fields_of(message.get("headers")), paid=True)
            dry_run = self.note.get("dry_run")
            if dry_run is not None:
                fields = set_one(fields, engine_answers.DRY_RUN_HEADER, dry_run)
            try:
                fields = await self.metered.start(message.get("status", 200), fields)
            except Exception:
                # Never into the app: the answer goes without its balance (and without the
                # usage headers all the same, below).
                log.exception(f"l402: {self.metered.meter.rule}: metering an answer failed")
            fields = metering.without(fields, self.hidden)
            message = {**message, "headers": lower_names(fields)}
            if self.watched is not None:
                self.watched.watch()
        await self.send(message)

    async def _settle(self) -> None:
        """Let the loop run once before a chunk is counted. When a write fails, the server
        learns the client is gone only from a callback the loop runs later (asyncio's
        connection_lost), and until then, and after, its `send` returns without yielding: an
        app that never awaits anything else would stream the rest in one go, all counted."""
        if self.watched is not None and not self.watched.gone:
            await asyncio.sleep(0)

    @property
    def gone(self) -> bool:
        return self.watched is not None and self.watched.gone


def _countable(scope: Scope) -> Scope:
    """The scope without the extensions whose bodies the door cannot count."""
    extensions = scope.get("extensions")
    if not extensions or not any(name in extensions for name in _UNCOUNTED_SENDS):
        return scope
    changed = dict(scope)
    changed["extensions"] = {k: v for k, v in extensions.items() if k not in _UNCOUNTED_SENDS}
    return changed


def _timed_send(send: Send, engine: Paywall, service: str | None) -> Send:
    """`send` that tells the engine's watchers how long the app took to start its answer."""
    started = time.perf_counter()
    told = False

    async def timed(message: Message) -> None:
        nonlocal told
        if not told and message["type"] == "http.response.start":
            told = True
            seconds = time.perf_counter() - started
            engine.watchers.tell("upstream_answered", "ASGI", service, seconds)
        await send(message)

    return timed


class L402Middleware:
    """The L402 paywall as ASGI middleware.

        app = L402Middleware(app, rules="rules/api.yaml", backend="dev", store=None,
                             dev_ledger=None, offer_upgrade=True, schemes="l402")

    Construction loads the rules (RulesError naming file and line, also for a paid.upstream,
    which has no meaning inside one app) and parses the backend URI (LightningError).
    `schemes` is how rules that name no `schemes:` are paid ("l402", "payment" or
    "l402,payment", as the proxy's l402_schemes; ValueError for one a rule cannot take). The
    backend and the store open at lifespan startup and close at shutdown (a failure to open is a
    lifespan.startup.failed, so the server exits); without a lifespan on the first request (a
    failure is a 503 and a later request tries again). `store`/`dev_ledger` default to the
    files under $L402PROXY_HOME, as on the proxy.

    Not thread-safe: one instance serves one event loop (one uvicorn worker); see the module.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: str,
        backend: str = "dev",
        store: str | None = None,
        dev_ledger: str | None = None,
        offer_upgrade: bool = True,
        metrics: str = "",
        log_format: str = "text",
        dry_run: bool = False,
        admin: str = "",
        admin_secret: str = "",
        ops_remote: bool = False,
        schemes: str | Sequence[str] = "l402",
    ) -> None:
        self.ops_settings = OpsSettings(
            metrics=metrics,
            log_format=log_format,
            dry_run=dry_run,
            admin=admin,
            admin_secret=admin_secret,
            allow_remote=ops_remote,
        )
        problems = self.ops_settings.problems()
        if problems:
            # Like a broken rules file: the app does not start with an option it cannot honour.
            raise ValueError("; ".join(problem for _, problem in problems))
        self.ops: Operations | None = None
        self._undo_json: Callable[[], None] | None = None
        if log_format == "json":
            # From the first line on (the rules load below) until close().
            from ..ops.jsonlog import use_json_logs

            self._undo_json = use_json_logs()
        self.app = app
        self.rules_path = str(rules)
        self.backend_uri = backend
        self.store_uri = store or paths.default_server_store()
        self.dev_ledger = dev_ledger or paths.default_dev_ledger()
        self.offer_upgrade = offer_upgrade
        self.schemes = schemes
        try:
            self.engine = self._new_engine()
        except BaseException:
            if self._undo_json is not None:
                self._undo_json()
            raise
        # The loop the engine is open on (None: not open). Checked on every request: the
        # engine's tasks, locks and connections belong to it.
        self.loop: asyncio.AbstractEventLoop | None = None
        # The engine was opened (or failed to) and closed: the next open builds a fresh one.
        self._spent = False
        self._open_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._retry_at = 0.0

    def _new_engine(self) -> Paywall:
        engine = Paywall(door="ASGI", no_upstream=NO_UPSTREAM)
        try:
            # Before the rules: they are checked against the default it sets.
            engine.use_schemes(self.schemes)
        except Refused as exc:
            raise ValueError(f"schemes: {exc}") from None
        rules = engine.use_rules_file(self.rules_path)
        hosted = [rule for rule in rules.rules if rule.host is not None]
        if hosted:
            # The client chooses the Host it sends: a host-scoped rule guards nothing in an
            # app that serves the same routes whatever the Host.
            log.warning(
                f"l402: {rules.source}: service '{hosted[0].name}' (line {hosted[0].line}) "
                "matches host:, which holds only if the app routes by Host too"
            )
        engine.use_backend(self.backend_uri, self.dev_ledger)
        engine.store_uri = self.store_uri
        engine.offer_upgrade = self.offer_upgrade
        return engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> str | None:
        """Open the engine on this loop if it is not; None when it is open, else why not."""
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return None
        if self.loop is not None and not self.loop.is_closed():
            log.error("l402: L402Middleware serves one event loop; a request came on another")
            return "the paywall serves another event loop"
        if self._open_lock is None or self._lock_loop is not loop:
            self._open_lock, self._lock_loop = asyncio.Lock(), loop
        async with self._open_lock:
            if self.loop is loop:
                return None
            if self.loop is not None:
                # The loop it was open on is gone (a test client's loop per request): what
                # can be closed from here is, and a fresh engine serves this loop.
                ops, self.ops = self.ops, None
                if ops is not None:
                    with contextlib.suppress(Exception):
                        await ops.close()
                await self._drop(self.engine)
                self.loop, self._spent = None, True
            if loop.time() < self._retry_at:
                return "the paywall could not start; trying again shortly"
            problem = await self._start()
            if problem is not None:
                self._retry_at = loop.time() + OPEN_RETRY_SECONDS
                return problem
            self.loop = loop
        return None

    async def _start(self) -> str | None:
        if self._spent:
            try:
                # Rules and backend as they are now (the file may have been edited); off the
                # loop, as reading the rules is file I/O.
                self.engine = await asyncio.to_thread(self._new_engine)
            except Exception as exc:  # RulesError, LightningError: one line all the same
                return f"l402: {exc}"
            self._spent = False
        if self.ops_settings.log_format == "json" and self._undo_json is None:
            # Opened again after a close (a test client's loop per request, say).
            from ..ops.jsonlog import use_json_logs

            self._undo_json = use_json_logs()
        try:
            await self.engine.open()
            self.ops = Operations(self.ops_settings, "ASGI")
            await self.ops.start(self.engine)
        except Exception as exc:
            problems = exc.problems if isinstance(exc, StartError) else [str(exc) or repr(exc)]
            self._spent = True
            with contextlib.suppress(Exception):
                await self.engine.close()  # whatever opened before the failure
            return "l402: " + "; ".join(problems)
        return None

    async def close(self) -> None:
        """Close the engine (on the loop it is open on); a later open builds a fresh one."""
        undo, self._undo_json = self._undo_json, None
        if undo is not None:
            undo()
        loop = self.loop
        if loop is None:
            return
        self.loop, self._spent = None, True
        ops, self.ops = self.ops, None
        if ops is not None:
            with contextlib.suppress(Exception):
                await ops.close()
        if loop.is_closed():
            await self._drop(self.engine)
        else:
            await self.engine.close()

    @staticmethod
    async def _drop(engine: Paywall) -> None:
        # Its background tasks died with their loop; the store and backend may still close.
        for resource in (engine.store, engine.backend):
            if resource is not None:
                with contextlib.suppress(Exception):
                    await resource.close()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open before the app's own startup, close after its shutdown; an app that does not
        speak the lifespan protocol gets the engine's lifecycle all the same."""
        message = await receive()
        if message["type"] != "lifespan.startup":
            await self.app(scope, _replay(message, receive), send)
            return
        problem = await self.open()
        if problem is not None:
            await send({"type": "lifespan.startup.failed", "message": problem})
            return
        replayed = _replay(message, receive)
        spoke = False  # did the app take the startup message or answer it?

        async def app_receive() -> Message:
            nonlocal spoke
            spoke = True
            return await replayed()

        async def app_send(message: Message) -> None:
            nonlocal spoke
            spoke = True
            kind = message["type"]
            if kind == "lifespan.startup.failed":
                await self._close_quietly()
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # Before the server hears of it: it may stop the loop right after.
                problem = await self._close_quietly()
                if problem is not None and kind == "lifespan.shutdown.complete":
                    message = {"type": "lifespan.shutdown.failed", "message": problem}
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception:
            if spoke:
                # The app's own startup or shutdown failed: the server decides what that means
                # (uvicorn's --lifespan auto serves on; the engine then opens on a request).
                await self._close_quietly()
                raise
            # An app without lifespan support (Django's raises at once): the engine's
            # lifecycle is ours to run.
            await self._run_lifespan(receive, send)
            return
        if not spoke:  # an app that ignores lifespan scopes and returns
            await self._run_lifespan(receive, send)
            return
        await self._close_quietly()  # returned without saying it shut down

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        problem = await self._close_quietly()
        if problem is None:
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await send({"type": "lifespan.shutdown.failed", "message": problem})

    async def _close_quietly(self) -> str | None:
        try:
            await self.close()
        except Exception as exc:  # the store could not write what it had queued
            log.error(f"l402: closing the paywall: {exc}")
            return f"l402: closing the paywall: {exc}"
        return None

    # -- requests ---------------------------------------------------------------------------------

    async def _judge(self, request: Request) -> Outcome:
        try:
            return await self.engine.handle(request)
        except Exception:
            return _failed(request)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if self.loop is not asyncio.get_running_loop():
            problem = await self.open()
            if problem is not None:
                await self._answer(send, _unavailable(method))
                return
        fields = fields_of(scope.get("headers"))
        target = target_of(scope)
        if target[:1] != "/" and target != "*":
            await self._answer(send, _not_a_path(method))
            return
        body = None
        also = also_targets(scope)
        feed = feeds.split_target(target)
        # A private feed's request is judged as its inner one (engine/feeds.py) and may be
        # forwarded there with its body: not read here. The app may route the inner target
        # below root_path too: those are its other readings.
        endpoint = feed is None and paywall.is_endpoint(target)
        if feed is not None:
            also = _inner_also_targets(scope, feed.inner)
        elif not endpoint and any(paywall.is_endpoint(other) for other in also):
            # Below root_path the app would route this as one of ours (/.l402/...: a private
            # feed's capability, a paywall page), which is never the app's to see: refused
            # (the paywall's own pages are served at the server's root, not under root_path).
            await self._answer(send, engine_answers.not_found_answer().for_method(method))
            return
        if endpoint:
            body = await _read_body(receive)
            if body is None:  # the client went away
                return
            if len(body) > MAX_ENDPOINT_BODY:
                await self._answer(send, _too_large().for_method(method))
                return
        request = Request(
            method=method,
            target=target,
            host=host_of(scope, fields),
            fields=fields,
            body=body,
            secure=scope.get("scheme") == "https",
            client=_client(scope),
            target_check=one_host,
            also_targets=also,
        )
        try:  # inline, not _judge: one coroutine less on every request
            outcome = await self.engine.handle(request)
        except Exception:
            outcome = _failed(request)
        if isinstance(outcome, Answer):
            await self._answer(send, outcome)
            return
        if endpoint or outcome.upstream is not None or (feed is not None and outcome.path is None):
            # None can happen (endpoints are always answered; paid.upstream is refused when
            # the rules load; a feed's request goes to its inner path): never forward a request
            # elsewhere, with its body consumed, or to a capability's path.
            log.error(f"l402: refused to forward {method} {target}: {outcome!r}")
            await self._answer(send, _unavailable(method))
            return
        note = outcome.note
        hidden = engine_answers.hidden_from_client(metering.usage_headers(self.engine.rules))
        metered: Metered | None = None
        if note is not None:
            variant = note.get("variant")
            if variant == "paid":
                if metering.METER in note:
                    refusal, metered = self._metered(note, method)
                    if refusal is not None:
                        await self._answer(send, refusal)
                        return
                if metered is None:
                    send = _paid_send(
                        send, note.get("dry_run"), note.get("balance"), hidden, note.get("receipt")
                    )
            elif variant == "free":
                send = _FreeVariant(send, note, method, hidden)
            else:  # a private feed's unpriced document
                send = _hiding_send(send, hidden)
        else:
            # Unpriced: the origin's usage headers and Payment-Receipt all the same.
            send = _hiding_send(send, hidden)
        if metered is not None:
            assert note is not None
            await self._forward_metered(scope, fields, outcome, receive, send, note, metered)
            return
        forwarded = forwarded_scope(scope, fields, outcome)
        if note is not None and feeds.FEED_NOTE in note:
            send = _FeedSend(send, note, method)
            # The body must come as messages to be rewritten, not as a file the server reads.
            forwarded = _countable(forwarded)
        if self.engine.watchers:
            send = _timed_send(send, self.engine, note.get("service") if note else None)
        await self.app(forwarded, receive, send)

    def _metered(self, note: dict[str, Any], method: str) -> tuple[Answer | None, Metered | None]:
        """The metering of a paid answer, or the answer that refuses it: a meter this door
        cannot read is never served unmetered (fail closed)."""
        try:
            return None, Metered.of(note, self.engine, method)
        except ValueError as exc:
            log.error(f"l402: refused to forward a metered request: {exc}")
            return _failed_meter(method), None

    async def _forward_metered(
        self,
        scope: Scope,
        fields: Fields,
        outcome: Forward,
        receive: Receive,
        send: Send,
        note: dict[str, Any],
        metered: Metered,
    ) -> None:
        """Forward to the app, metering its answer; the bytes sent are charged however the app
        ends (done, failed, or cancelled with its client gone)."""
        hidden = engine_answers.hidden_from_client(metering.usage_headers(self.engine.rules))
        forwarded = forwarded_scope(scope, fields, outcome)
        watched: _Watched | None = None
        if metered.unit == "bytes":
            forwarded = _countable(forwarded)
            watched = _Watched(receive)
            receive = watched
        send = _MeteredSend(send, note, metered, hidden, watched)
        if self.engine.watchers:
            send = _timed_send(send, self.engine, note.get("service"))
        try:
            await self.app(forwarded, receive, send)
        finally:
            if watched is not None:
                watched.stop()
            await metered.finish()

    @staticmethod
    async def _answer(send: Send, answer: Answer) -> None:
        start, body = http_messages(answer)
        await send(start)
        await send(body)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A handshake is judged as the GET it is; a refusal is the engine's answer when the
        server can send one (websocket.http.response), else a policy-violation close."""
        if self.loop is not asyncio.get_running_loop():
            problem = await self.open()
            if problem is not None:
                await self._deny(scope, receive, send, _unavailable("GET"))
                return
        fields = fields_of(scope.get("headers"))
        target = target_of(scope)
        if target[:1] != "/":
            await self._deny(scope, receive, send, _not_a_path("GET"))
            return
        outcome = await self._judge(
            Request(
                method="GET",
                target=target,
                host=host_of(scope, fields),
                fields=fields,
                secure=scope.get("scheme") == "wss",
                client=_client(scope),
                target_check=one_host,
                also_targets=also_targets(scope),
            )
        )
        if isinstance(outcome, Answer):
            await self._deny(scope, receive, send, outcome)
            return
        if outcome.upstream is not None:
            log.error(f"l402: refused to forward WebSocket {target}: {outcome!r}")
            await self._deny(scope, receive, send, _unavailable("GET"))
            return
        if outcome.note is not None and metering.METER in outcome.note:
            await self._deny(scope, receive, send, metering.websocket_refusal("GET"))
            return
        await self.app(forwarded_scope(scope, fields, outcome), receive, send)

    @staticmethod
    async def _deny(scope: Scope, receive: Receive, send: Send, answer: Answer) -> None:
        message = await receive()  # websocket.connect comes first
        if message["type"] != "websocket.connect":
            return  # the client is gone
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({**http_messages(answer)[0], "type": "websocket.http.response.start"})
            await send(
                {"type": "websocket.http.response.body", "body": answer.body, "more_body": False}
            )
            return
        reason = f"{answer.status} {_REASONS.get(answer.status, 'refused')}"
        await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": reason})


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    404: "Not Found",
    503: "Service Unavailable",
}


def _unavailable(method: str) -> Answer:
    return engine_answers.unavailable_answer("the paywall could not start").for_method(method)


def _not_a_path(method: str) -> Answer:
    """An absolute-form target (`GET http://other.example/x`, which uvicorn's h11 server hands
    on as the path): the rules match paths, and the app may read the target either way."""
    answer = engine_answers.bad_request_answer("Bad request: the request target is not a path.")
    return answer.for_method(method)


def _too_large() -> Answer:
    return Answer.make(
        413,
        f"Request body too large: the paywall's endpoints take {MAX_ENDPOINT_BODY} bytes "
        "at most.\n".encode(),
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    )


def _failed_meter(method: str) -> Answer:
    return engine_answers.unavailable_answer("internal error in the paywall").for_method(method)


def _failed(request: Request) -> Answer:
    """Fail closed: a request the engine could not judge is never forwarded."""
    log.exception(f"l402: internal error on {request.method} {request.target}")
    answer = engine_answers.unavailable_answer("internal error in the paywall")
    return answer.for_method(request.method)


def _client(scope: Scope) -> tuple[str, int] | None:
    client = scope.get("client")
    if client is None or type(client) is tuple:
        return client
    return (str(client[0]), int(client[1]))


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, up to one byte past MAX_ENDPOINT_BODY (the rest is left unread); None
    when the client disconnects first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_ENDPOINT_BODY or not message.get("more_body", False):
            return b"".join(chunks)


def _replay(first: Message, receive: Receive) -> Receive:
    """`receive` that gives `first` once, then the server's messages."""
    pending: list[Message] = [first]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
