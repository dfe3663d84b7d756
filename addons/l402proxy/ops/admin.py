"""The admin API and its page (`l402_admin=127.0.0.1:9403`): list and revoke issued tokens,
the services and prices in force, revenue per service over time, the paywall's health; a small
HTML page (a chart and tables) that reads the same API.

- Every /api/ call needs `Authorization: Bearer <secret>`; the secret lives in a file only its
  owner can read (`admin_secret`: made on first use, ~/.l402proxy/admin-secret by default).
  A missing or wrong one gets 401 and nothing else.
- The page itself holds no data: it takes the secret from its URL's fragment
  (`http://127.0.0.1:9403/#secret=...`, which browsers never send) or a field, keeps it in the
  tab's sessionStorage and calls the API with it. Its script and style are files of their own
  (a Content-Security-Policy without 'unsafe-inline'); it cannot be framed, and nothing is
  cached. No CORS: another site's script can neither read the API nor send it a bearer secret.
- Listening on loopback, only a Host naming loopback is answered: a page on another site whose
  name was re-pointed to 127.0.0.1 (DNS rebinding) gets 403 before anything else. An operator
  who allows other machines (l402_ops_remote) chooses the names; then any Host goes.
- Served by uvicorn inside the event loop already running (mitmproxy's, the ASGI app's,
  serve-auth's): `Server.startup()` / `shutdown()`, never `serve()`, which would take the
  process's SIGINT and SIGTERM handlers.
"""

import asyncio
import datetime
import fnmatch
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from .. import paths
from ..rules import Rule
from ..store import StoreError, TokenStore
from ..store.database import (
    AmbiguousTokenRef,
    BadTokenRef,
    UnknownTokenRef,
    check_revenue_range,
    normalize_ref,
)
from .listen import bind, is_loopback

if TYPE_CHECKING:
    import socket

    import uvicorn

    from ..engine import Paywall

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SECRET_FILE = "admin-secret"
SECRET_ENV = "L402PROXY_ADMIN_SECRET"
# A secret someone wrote by hand must still be hard to guess.
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 1024

BUCKETS = {"hour": 3600, "day": 86400}
# What the revenue answer covers when `since` is not given, per bucket.
DEFAULT_SPAN = {"hour": 48 * 3600, "day": 30 * 86400}
DEFAULT_LIST = 100
MAX_LIST = 1000
# Query strings are short here; a longer one is refused before it is parsed.
MAX_QUERY_BYTES = 2048
MAX_QUERY_FIELDS = 10
# In-flight requests get this long to finish when the server closes.
CLOSE_GRACE_SECONDS = 2.0
KEEPALIVE_SECONDS = 5
MAX_CONNECTIONS = 64

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_REVOKE_PATH = re.compile(r"/api/tokens/([^/]+)/revoke")


class AdminSecretError(ValueError):
    """The secret file cannot be used (others can read it, not ours, empty): one line."""


class BadQuery(ValueError):
    """A query value the API cannot use: one line, answered with 400."""


# -- the secret ------------------------------------------------------------------------------


def default_admin_secret_path() -> str:
    """~/.l402proxy/admin-secret (under $L402PROXY_HOME when set)."""
    return str(paths.home() / SECRET_FILE)


def admin_secret(path: str) -> tuple[str, bool]:
    """The bearer secret kept in `path`, made now (secrets.token_urlsafe(32), mode 0600, its
    folder made 0700 when missing) if there is none: (secret, True when made now).
    AdminSecretError (one line) for a file others can read, one not ours, or no secret."""
    file = Path(path).expanduser()
    try:
        return read_admin_secret(str(file)), False
    except FileNotFoundError:
        pass
    try:
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = secrets.token_urlsafe(32)
        # Written whole to a private temp file, then linked into place: a second process
        # starting at the same time never reads a half-written secret, and the first link wins.
        fd, temp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secret + "\n")
            try:
                os.link(temp, file)
            except FileExistsError:
                return read_admin_secret(str(file)), False
        finally:
            os.unlink(temp)
    except OSError as exc:
        raise AdminSecretError(
            f"admin secret: cannot create {file}: {exc.strerror or exc}"
        ) from None
    return secret, True


def read_admin_secret(path: str) -> str:
    """The secret in an existing file (FileNotFoundError when there is none); AdminSecretError
    when others can read it, it is not the user's, or it holds no usable secret."""
    file = Path(path).expanduser()
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AdminSecretError(f"admin secret: cannot read {file}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdminSecretError(f"admin secret: {file} is not a regular file")
        if info.st_uid != os.geteuid():
            raise AdminSecretError(
                f"admin secret: {file} belongs to another user; use a file of your own"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise AdminSecretError(
                f"admin secret: {file} can be read by others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run chmod 600 {file}, or remove it and "
                "a new secret is made"
            )
        data = handle.read(MAX_SECRET_CHARS + 2)
    hint = "; remove the file and a new one is made"
    return check_secret(data.decode("utf-8", "replace").strip(), str(file), hint)


def check_secret(secret: str, source: str, hint: str = "") -> str:
    """`secret` if it is one (16 to 1024 printable ASCII characters, no spaces), else
    AdminSecretError naming `source` (a file, an environment variable) and never the value."""
    if len(secret) < MIN_SECRET_CHARS:
        raise AdminSecretError(
            f"admin secret: {source} holds no secret of at least {MIN_SECRET_CHARS} "
            f"characters{hint}"
        )
    if len(secret) > MAX_SECRET_CHARS or not re.fullmatch(r"[\x21-\x7e]+", secret):
        raise AdminSecretError(
            f"admin secret: {source} must hold one line of printable ASCII without spaces{hint}"
        )
    return secret


# -- what the API answers (also the CLI's store path, so both print the same) -----------------


def parse_when(text: str, now: float, *, name: str) -> float:
    """An epoch time from `text`: epoch seconds, an ISO 8601 date or time (UTC unless it
    says otherwise), or a duration back from now (`90m`, `24h`, `7d`, `2w`)."""
    value = text.strip()
    duration = _DURATION.fullmatch(value)
    if duration:
        return now - float(duration.group(1)) * _UNIT_SECONDS[duration.group(2)]
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or number < 0:
            raise BadQuery(f"{name}: {text!r} is not a time")
        return number
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(
            f"{name}: {text!r} is not a time: give epoch seconds, an ISO 8601 date or time "
            "(2026-05-01, 2026-05-01T12:00Z) or a duration back from now (24h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def revenue_range(
    since: str | None, until: str | None, bucket: str | None, now: float
) -> tuple[float, float, str]:
    """(since, until, bucket name) from the query's text, with the defaults filled in."""
    name = bucket or "hour"
    if name not in BUCKETS:
        raise BadQuery(f"bucket: {name!r} is not one of {', '.join(BUCKETS)}")
    end = now if until is None else parse_when(until, now, name="until")
    start = end - DEFAULT_SPAN[name] if since is None else parse_when(since, now, name="since")
    try:
        check_revenue_range(start, end, BUCKETS[name])
    except StoreError as exc:  # the caller's range, not the database: 400, not 503
        raise BadQuery(str(exc)) from None
    return start, end, name


async def revenue_report(
    store: TokenStore, since: float, until: float, bucket: str, service: str | None
) -> dict[str, Any]:
    """The revenue answer: per bucket and service, and totals. StoreError from the store
    (a range with too many buckets among them)."""
    rows = await store.revenue(since, until, BUCKETS[bucket], service)
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        total = totals.setdefault(
            row.service, {"service": row.service, "tokens_sold": 0, "sats": 0}
        )
        total["tokens_sold"] += row.tokens_sold
        total["sats"] += row.sats
    return {
        "since": since,
        "until": until,
        "bucket": bucket,
        "bucket_seconds": BUCKETS[bucket],
        "service": service,
        "rows": [row.to_json() for row in rows],
        "totals": [totals[name] for name in sorted(totals)],
        "total": {
            "tokens_sold": sum(t["tokens_sold"] for t in totals.values()),
            "sats": sum(t["sats"] for t in totals.values()),
        },
    }


def shown_pattern(pattern: re.Pattern[str] | None) -> str | None:
    """A rule's path or host pattern as the rules file would write it: the glob when it is
    one (fnmatch's own translation gives the pattern back), else `re:<expression>`."""
    if pattern is None:
        return None
    text = pattern.pattern
    match = re.fullmatch(r"\(\?s:(?P<body>.*)\)\\[Zz]", text, re.DOTALL)
    if match:
        glob = _unglob(match.group("body"))
        if glob is not None and fnmatch.translate(glob) == text:
            return glob
    return f"re:{text}"


def _unglob(body: str) -> str | None:
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if body.startswith(".*", index):
            out.append("*")
            index += 2
            continue
        if char == ".":
            out.append("?")
        elif char == "\\" and index + 1 < len(body):
            index += 1
            out.append(body[index])
        elif char in "[]()|^$+{}*?":
            return None
        else:
            out.append(char)
        index += 1
    return "".join(out)


def service_json(rule: Rule) -> dict[str, Any]:
    """What the page shows of a rule: never a set_headers value (it may be an API key the
    origin wants), nor where a paid variant goes."""
    return {
        "name": rule.name,
        "description": rule.description,
        "mode": rule.mode,
        **rule.pricing_json(),
        "valid_for": rule.valid_for,
        "invoice_expiry": rule.invoice_expiry,
        "capabilities": list(rule.capabilities) if rule.capabilities is not None else None,
        "line": rule.line,
        "match": {
            "path": shown_pattern(rule.path),
            "host": shown_pattern(rule.host),
            "methods": sorted(rule.methods) if rule.methods is not None else None,
            "free_paths": [shown_pattern(free) for free in rule.free_paths],
        },
        "rate_limits": [
            {"requests": r.requests, "per": r.per, "burst": r.burst, "key": r.key}
            for r in rule.rate_limits
        ],
        "freebies": (
            {"requests": rule.freebies.requests, "per": rule.freebies.per}
            if rule.freebies is not None
            else None
        ),
    }


# -- the ASGI app ----------------------------------------------------------------------------

_COMMON_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
# The page: its own script and style only (no inline code, so an injected tag runs nothing),
# fetches to itself only, no form posts anywhere (the secret never goes into a URL), no frames.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"


class Reply:
    """One answer: status, body, content type and any extra headers."""

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Collection[tuple[bytes, bytes]] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = list(headers)

    @classmethod
    def json(cls, status: int, value: Any, **extra: str) -> "Reply":
        body = json.dumps(value, indent=1).encode() + b"\n"
        headers = [(b"content-security-policy", API_CSP.encode())]
        headers += [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
        return cls(status, body, "application/json", headers)

    @classmethod
    def error(cls, status: int, message: str, **extra: str) -> "Reply":
        return cls.json(status, {"error": message}, **extra)

    def head(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            *_COMMON_HEADERS,
            *self.headers,
        ]


def _static(body: str, content_type: str, csp: str = API_CSP) -> Reply:
    return Reply(200, body.encode(), content_type, [(b"content-security-policy", csp.encode())])


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host values a loopback listener answers: loopback names and addresses, with its
    port or none (lower case)."""
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
    return frozenset(name.lower() for base in names for name in (base, f"{base}:{port}"))


class AdminApp:
    """The admin API and page of one engine, as a plain ASGI app (no framework: nothing but
    the standard library and the engine). `hosts`: the Host values answered (lower case);
    None answers any (a listener other machines may reach, by the operator's choice)."""

    def __init__(
        self, engine: "Paywall", secret: str, *, hosts: Collection[str] | None = None
    ) -> None:
        self.engine = engine
        self._secret = secret.encode()
        self.hosts = frozenset(hosts) if hosts is not None else None
        self.clock: Callable[[], float] = time.time

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        try:
            reply = await self.reply(scope)
        except Exception:
            log.exception("l402: admin API: unexpected failure")
            reply = Reply.error(500, "internal error (see the paywall's log)")
        head_only = scope.get("method") == "HEAD"
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.head()})
        await send({"type": "http.response.body", "body": b"" if head_only else reply.body})

    async def reply(self, scope: Scope) -> Reply:
        headers = _headers(scope)
        if (
            self.hosts is not None
            and headers.get(b"host", b"").lower().decode("latin-1") not in self.hosts
        ):
            # Before anything else: a page whose name was re-pointed here learns nothing.
            return Reply.error(403, "this Host is not answered here: use the loopback address")
        path, method = scope.get("path", "/"), scope.get("method", "GET")
        if not path.startswith("/api/"):
            return self.page(path, method)
        if not self.authorized(headers.get(b"authorization", b"")):
            return Reply.error(
                401, "unauthorized", www_authenticate='Bearer realm="l402proxy admin"'
            )
        raw_query = scope.get("query_string", b"")
        try:
            query = _query(raw_query)
            return await self.api(path, method, query)
        except (BadQuery, BadTokenRef) as exc:
            return Reply.error(400, str(exc))
        except UnknownTokenRef as exc:
            return Reply.error(404, str(exc))
        except AmbiguousTokenRef as exc:
            return Reply.error(409, str(exc))
        except StoreError as exc:
            return Reply.error(503, f"token store: {exc}")

    def authorized(self, value: bytes) -> bool:
        scheme, _, given = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Constant time: how much of a guess was right must not show in the answer's timing.
        return hmac.compare_digest(given.strip(), self._secret)

    def page(self, path: str, method: str) -> Reply:
        files = {
            "/": (PAGE_HTML, "text/html; charset=utf-8", PAGE_CSP),
            "/admin": (PAGE_HTML, "text/html; charset=utf-8", PAGE_CSP),
            "/admin.js": (PAGE_JS, "text/javascript; charset=utf-8", API_CSP),
            "/admin.css": (PAGE_CSS, "text/css; charset=utf-8", API_CSP),
        }
        if path == "/favicon.ico":
            return Reply(204, b"", "text/plain")
        if path not in files:
            return Reply.error(404, f"no such page: {path} (the page is /, the API /api/)")
        if method not in ("GET", "HEAD"):
            return Reply.error(405, f"{method} is not allowed here", allow="GET, HEAD")
        body, content_type, csp = files[path]
        return _static(body, content_type, csp)

    async def api(self, path: str, method: str, query: dict[str, str]) -> Reply:
        revoke = _REVOKE_PATH.fullmatch(path)
        if revoke is not None:
            if method != "POST":
                return Reply.error(405, f"{method} is not allowed here: POST", allow="POST")
            _only(query, ())
            return await self.revoke(revoke.group(1))
        endpoints: dict[str, Callable[[dict[str, str]], Awaitable[Reply]]] = {
            "/api/tokens": self.tokens,
            "/api/services": self.services,
            "/api/revenue": self.revenue,
            "/api/health": self.health,
        }
        endpoint = endpoints.get(path)
        if endpoint is None:
            return Reply.error(404, f"no such API endpoint: {path}")
        if method not in ("GET", "HEAD"):
            return Reply.error(405, f"{method} is not allowed here: GET", allow="GET, HEAD")
        return await endpoint(query)

    def store(self) -> TokenStore:
        if self.engine.store is None:
            raise StoreError("not open (the paywall has not started)")
        return self.engine.store

    async def tokens(self, query: dict[str, str]) -> Reply:
        _only(query, ("service", "limit"))
        limit = _int(query.get("limit"), "limit", DEFAULT_LIST, 1, MAX_LIST)
        service = query.get("service") or None
        now = self.clock()
        listed = await self.store().list_tokens(service=service, limit=limit)
        return Reply.json(200, {"tokens": [token.to_json(now) for token in listed]})

    async def revoke(self, ref: str) -> Reply:
        normalize_ref(ref)  # BadTokenRef (400) before the store is asked
        revoked = await self.store().revoke(ref, self.clock())
        shown = ", ".join(token.token_id.hex()[:8] for token in revoked)
        log.info(f"l402: admin API: revoked token {shown}")
        now = self.clock()
        return Reply.json(200, {"revoked": [token.to_json(now) for token in revoked]})

    async def services(self, query: dict[str, str]) -> Reply:
        _only(query, ())
        rules = self.engine.rules
        return Reply.json(
            200,
            {
                "rules_path": self.engine.rules_path or None,
                "dry_run": self.engine.dry_run,
                "services": [service_json(rule) for rule in rules.rules] if rules else [],
            },
        )

    async def revenue(self, query: dict[str, str]) -> Reply:
        _only(query, ("since", "until", "bucket", "service"))
        since, until, bucket = revenue_range(
            query.get("since"), query.get("until"), query.get("bucket"), self.clock()
        )
        report = await revenue_report(
            self.store(), since, until, bucket, query.get("service") or None
        )
        return Reply.json(200, report)

    async def health(self, query: dict[str, str]) -> Reply:
        _only(query, ())
        engine = self.engine
        store = engine.store
        healthy = store is not None and store.healthy
        body = {
            "ok": healthy and engine.started,
            "door": engine.door,
            "started": engine.started,
            "dry_run": engine.dry_run,
            "rules": {
                "path": engine.rules_path or None,
                "services": len(engine.rules.rules) if engine.rules is not None else 0,
            },
            "store": {
                "open": store is not None,
                "healthy": healthy,
                "pending": store.pending if store is not None else 0,
                "dropped": store.dropped if store is not None else 0,
            },
        }
        return Reply.json(200 if body["ok"] else 503, body)


def admin_app(engine: "Paywall", secret: str, *, hosts: Collection[str] | None = None) -> AdminApp:
    """The admin API and page of `engine`, as an ASGI app (see AdminApp)."""
    return AdminApp(engine, secret, hosts=hosts)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for name, value in scope.get("headers", ()):
        found.setdefault(bytes(name).lower(), bytes(value))
    return found


def _query(raw: bytes) -> dict[str, str]:
    if len(raw) > MAX_QUERY_BYTES:
        raise BadQuery(f"the query string is longer than {MAX_QUERY_BYTES} bytes")
    try:
        pairs = parse_qsl(
            raw.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_QUERY_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadQuery(f"the query string cannot be read: {exc}") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name in query:
            raise BadQuery(f"{name} is given twice")
        query[name] = value
    return query


def _only(query: dict[str, str], names: Collection[str]) -> None:
    for name in query:
        if name not in names:
            known = f"(known: {', '.join(names)})" if names else "(it takes none)"
            raise BadQuery(f"unknown query parameter {name!r} {known}")


def _int(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadQuery(f"{name}: {text!r} is not a number from {low} to {high}")
    return int(text)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- the server ------------------------------------------------------------------------------


class AdminServer:
    """The admin app served by uvicorn on the running event loop (see the module docstring)."""

    def __init__(self, server: "uvicorn.Server", sock: "socket.socket", app: AdminApp) -> None:
        self._server = server
        self._sock = sock
        self.app = app
        self.port: int = sock.getsockname()[1]
        self._closed = False

    @classmethod
    async def start(
        cls,
        engine: "Paywall",
        host: str,
        port: int,
        secret: str,
        *,
        allow_remote: bool = False,
    ) -> "AdminServer":
        """Listen on (host, port) (port 0: any free one) and serve; ListenError (one line)
        when the address cannot be had. Parse the address with ops.listen.parse_listen
        first: that is where a non-loopback one is refused unless allowed."""
        import uvicorn  # a dependency of the nginx door too; imported only when used

        sock = bind(host, port, option="admin")
        try:
            bound = sock.getsockname()[1]
            local = is_loopback(host) and not allow_remote
            app = AdminApp(engine, secret, hosts=allowed_hosts(host, bound) if local else None)
            config = uvicorn.Config(
                app,
                interface="asgi3",
                http="h11",
                lifespan="off",
                log_config=None,
                server_header=False,
                date_header=False,
                proxy_headers=False,
                timeout_keep_alive=KEEPALIVE_SECONDS,
                timeout_graceful_shutdown=int(CLOSE_GRACE_SECONDS),
                limit_concurrency=MAX_CONNECTIONS,
            )
            # access_log stays True in Config (False empties the process-wide "uvicorn.access"
            # logger: the ASGI door's host app would lose its access log); off per connection.
            config.access_log = False
            config.load()
            server = uvicorn.Server(config)
            # What serve() would have set up before its startup(): lifespan "off" (a no-op).
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        return cls(server, sock, app)

    async def close(self) -> None:
        """Stop listening, let requests under way finish (bounded), close."""
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(CLOSE_GRACE_SECONDS * 3):
                await self._server.shutdown(sockets=[self._sock])
        except TimeoutError:
            log.warning("l402: admin API: connections still open at close; dropped")
        finally:
            self._sock.close()


# -- the page --------------------------------------------------------------------------------

PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>l402proxy admin</title>
<link rel="stylesheet" href="/admin.css">
<script src="/admin.js" defer></script>
</head>
<body>
<header>
  <h1>l402proxy admin</h1>
  <p id="health" class="muted">…</p>
  <button id="forget" type="button" hidden>Forget secret</button>
</header>
<main>
<section id="login" hidden>
  <h2>Admin secret</h2>
  <p>Paste the secret from the admin-secret file (or open the link printed at start).
  It stays in this tab only.</p>
  <form id="login-form" autocomplete="off">
    <input id="secret" type="password" aria-label="admin secret" required>
    <button type="submit">Open</button>
  </form>
  <p id="login-error" class="error" role="alert"></p>
</section>
<div id="content" hidden>
<p id="error" class="error" role="alert"></p>
<section>
  <h2>Revenue</h2>
  <form id="range-form">
    <label>Range
      <select id="range">
        <option value="24h:hour" selected>last 24 hours, per hour</option>
        <option value="7d:hour">last 7 days, per hour</option>
        <option value="30d:day">last 30 days, per day</option>
        <option value="365d:day">last year, per day</option>
      </select>
    </label>
    <button id="refresh" type="button">Refresh</button>
  </form>
  <svg id="chart" role="img" aria-label="revenue per service over time"
       viewBox="0 0 760 260" xmlns="http://www.w3.org/2000/svg"></svg>
  <ul id="legend"></ul>
  <table id="revenue">
    <thead><tr><th>Bucket (UTC)</th><th>Service</th><th class="num">Tokens</th>
      <th class="num">Sats</th></tr></thead>
    <tbody id="revenue-rows"></tbody>
    <tfoot id="revenue-totals"></tfoot>
  </table>
</section>
<section>
  <h2>Services</h2>
  <table id="services">
    <thead><tr><th>Name</th><th>Mode</th><th class="num">Price (sat)</th><th>Valid for</th>
      <th>Match</th><th>Description</th></tr></thead>
    <tbody id="services-rows"></tbody>
  </table>
</section>
<section>
  <h2>Latest tokens</h2>
  <table id="tokens">
    <thead><tr><th>Token</th><th>Service</th><th class="num">Price (sat)</th><th>Status</th>
      <th class="num">Left</th><th>Issued (UTC)</th><th>Paid (UTC)</th><th></th></tr></thead>
    <tbody id="tokens-rows"></tbody>
  </table>
</section>
</div>
</main>
</body>
</html>
"""

PAGE_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1.2em;
  background: #1d2330; color: #fff; }
header h1 { font-size: 1.2em; margin: 0; }
header p { margin: 0; flex: 1; }
main { padding: 0 1.2em 2em; max-width: 1100px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: .4em 1em 1em;
  margin-top: 1em; }
h2 { font-size: 1.05em; }
table { border-collapse: collapse; width: 100%; margin-top: .6em; }
th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #eceef2; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tfoot td { font-weight: 600; border-top: 2px solid #c9ced8; }
code { font-size: .9em; }
svg { width: 100%; height: auto; background: #fbfcfd; border: 1px solid #eceef2; }
svg text { font-size: 11px; fill: #5b6473; }
svg line { stroke: #c9ced8; }
#legend { list-style: none; padding: 0; display: flex; gap: 1.2em; flex-wrap: wrap; }
#legend span { display: inline-block; width: .9em; height: .9em; margin-right: .35em;
  vertical-align: -1px; border-radius: 2px; }
.muted { color: #98a1b3; }
.error { color: #b42318; }
.ok { color: #7ee2a8; }
.bad { color: #ffb4a8; }
button { font: inherit; }
input { font: inherit; width: 28em; max-width: 100%; }
"""

PAGE_JS = r"""
"use strict";
// The admin page: reads the admin API with the bearer secret, which comes from the URL's
// fragment (never sent to the server) or the field, and is kept in this tab only.
(() => {
  const KEY = "l402proxy-admin-secret";
  const COLORS = ["#2f6fde", "#e0793a", "#2a9d6f", "#b04fc6", "#d4b12c", "#d0445c",
    "#3fb1c7", "#7c6a55"];
  const REFRESH_MS = 30000;
  const $ = (id) => document.getElementById(id);
  let timer = null;

  class NeedSecret extends Error {}

  function takeFragment() {
    const hash = location.hash.slice(1);
    if (!hash) return;
    const secret = new URLSearchParams(hash).get("secret");
    if (secret) sessionStorage.setItem(KEY, secret);
    // Out of the address bar and the history: the secret is not to be shared by accident.
    history.replaceState(null, "", location.pathname + location.search);
  }

  async function api(path, options) {
    const secret = sessionStorage.getItem(KEY);
    if (!secret) throw new NeedSecret("");
    const response = await fetch(path, Object.assign({
      headers: { "Authorization": "Bearer " + secret },
      cache: "no-store",
      credentials: "omit",
    }, options || {}));
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      throw new NeedSecret("The secret was refused.");
    }
    let body = {};
    try { body = await response.json(); } catch (e) { body = {}; }
    if (!response.ok && !(path === "/api/health" && response.status === 503)) {
      throw new Error(body.error || (response.status + " " + response.statusText));
    }
    return body;
  }

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function when(epoch, day) {
    if (epoch === null || epoch === undefined) return "";
    const iso = new Date(epoch * 1000).toISOString();
    return day ? iso.slice(0, 10) : iso.slice(0, 16).replace("T", " ");
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "forever";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size && seconds % size === 0) return (seconds / size) + unit;
    }
    return seconds + "s";
  }

  function row(cells) {
    const tr = el("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }

  function num(value, attrs) {
    return el("td", value, Object.assign({ class: "num" }, attrs || {}));
  }

  function colorOf(names) {
    const colors = new Map();
    names.forEach((name, i) => colors.set(name, COLORS[i % COLORS.length]));
    return colors;
  }

  function showHealth(health) {
    const line = $("health");
    const store = health.store || {};
    line.textContent = (health.ok ? "running" : "NOT HEALTHY") + " · " + health.door +
      " door · store " + (store.healthy ? "healthy" : "unhealthy") +
      (store.pending ? " (" + store.pending + " queued)" : "") +
      (health.dry_run ? " · DRY RUN" : "") +
      " · rules " + ((health.rules || {}).path || "none");
    line.className = health.ok ? "ok" : "bad";
  }

  function showServices(answer) {
    const body = $("services-rows");
    body.replaceChildren();
    for (const s of answer.services) {
      const match = [s.match.methods ? s.match.methods.join(",") : "*",
        (s.match.host ? s.match.host : "") + s.match.path].join(" ");
      const sold = s.mode !== "free" && s.mode !== "deny";
      const price = !sold ? "" : s.price_sat === null ? "per request" : s.price_sat;
      body.append(row([el("td", s.name), el("td", s.mode), num(price),
        el("td", sold ? duration(s.valid_for) : ""),
        el("td", null).appendChild(el("code", match)).parentNode, el("td", s.description)]));
    }
  }

  function drawChart(report, colors) {
    const chart = $("chart");
    chart.replaceChildren();
    const width = 760, height = 260, left = 60, right = 10, top = 12, bottom = 30;
    const step = report.bucket_seconds;
    const starts = [];
    for (let t = Math.floor(report.since / step) * step; t < report.until; t += step) {
      starts.push(t);
    }
    const stacks = new Map(starts.map((t) => [t, []]));
    for (const r of report.rows) {
      if (stacks.has(r.start_at)) stacks.get(r.start_at).push(r);
    }
    let most = 1;
    for (const rows of stacks.values()) {
      most = Math.max(most, rows.reduce((sum, r) => sum + r.sats, 0));
    }
    const plotWidth = width - left - right, plotHeight = height - top - bottom;
    const slot = plotWidth / Math.max(starts.length, 1);
    const gap = slot > 4 ? 1 : 0;
    chart.append(svg("line", { x1: left, y1: top + plotHeight, x2: width - right,
      y2: top + plotHeight }));
    chart.append(svg("line", { x1: left, y1: top, x2: left, y2: top + plotHeight }));
    chart.append(svg("text", { x: left - 6, y: top + 10, "text-anchor": "end" }, most));
    chart.append(svg("text", { x: left - 6, y: top + plotHeight, "text-anchor": "end" }, 0));
    chart.append(svg("text", { x: 4, y: top + 24 }, "sat"));
    const day = step >= 86400;
    if (starts.length) {
      chart.append(svg("text", { x: left, y: height - 8 }, when(starts[0], day)));
      chart.append(svg("text", { x: width - right, y: height - 8, "text-anchor": "end" },
        when(starts[starts.length - 1], day)));
    }
    starts.forEach((t, i) => {
      let y = top + plotHeight;
      for (const r of stacks.get(t)) {
        if (r.sats <= 0) continue;
        const h = Math.max(1, (r.sats / most) * plotHeight);
        y -= h;
        const bar = svg("rect", { class: "bar", x: (left + i * slot + gap).toFixed(2),
          y: y.toFixed(2), width: Math.max(slot - 2 * gap, 1).toFixed(2), height: h.toFixed(2),
          fill: colors.get(r.service) || "#888", "data-service": r.service,
          "data-start": t, "data-sats": r.sats });
        bar.append(svg("title", {}, when(t, day) + " UTC · " + r.service + ": " + r.sats +
          " sat, " + r.tokens_sold + " token(s)"));
        chart.append(bar);
      }
    });
  }

  function showRevenue(report) {
    const names = report.totals.map((t) => t.service);
    const colors = colorOf(names);
    drawChart(report, colors);
    const legend = $("legend");
    legend.replaceChildren();
    for (const name of names) {
      const item = el("li", null);
      const swatch = el("span");
      swatch.style.background = colors.get(name);
      item.append(swatch, document.createTextNode(name));
      legend.append(item);
    }
    const day = report.bucket_seconds >= 86400;
    const body = $("revenue-rows");
    body.replaceChildren();
    for (const r of report.rows.slice().reverse()) {
      body.append(row([el("td", when(r.start_at, day)), el("td", r.service),
        num(r.tokens_sold), num(r.sats)]));
    }
    if (!report.rows.length) {
      body.append(row([el("td", "no sales in this range", { colspan: "4", class: "muted" })]));
    }
    const foot = $("revenue-totals");
    foot.replaceChildren();
    for (const t of report.totals) {
      const tr = row([el("td", "total"), el("td", t.service),
        num(t.tokens_sold, { class: "num tokens" }), num(t.sats, { class: "num sats" })]);
      tr.setAttribute("data-total-service", t.service);
      foot.append(tr);
    }
    foot.append(row([el("td", "total"), el("td", "all services"),
      num(report.total.tokens_sold, { id: "revenue-total-tokens" }),
      num(report.total.sats, { id: "revenue-total-sats" })]));
  }

  function showTokens(answer) {
    const body = $("tokens-rows");
    body.replaceChildren();
    for (const t of answer.tokens) {
      const actions = el("td");
      if (t.status !== "revoked") {
        const button = el("button", "Revoke", { type: "button" });
        button.addEventListener("click", () => revoke(t.token_id));
        actions.append(button);
      }
      const id = el("td", null);
      id.append(el("code", t.token_id.slice(0, 16), { title: t.token_id }));
      body.append(row([id, el("td", t.service || "?"), num(t.price_sat === null ? "" :
        t.price_sat), el("td", t.status), num(t.balance === null ? "" : t.balance),
        el("td", when(t.created_at)),
        el("td", when(t.paid_at)), actions]));
    }
  }

  async function revoke(tokenId) {
    if (!window.confirm("Revoke token " + tokenId.slice(0, 16) + "…?")) return;
    try {
      await api("/api/tokens/" + tokenId + "/revoke", { method: "POST" });
      await refresh();
    } catch (e) { fail(e); }
  }

  function fail(error) {
    if (error instanceof NeedSecret) {
      showLogin(error.message);
      return;
    }
    $("error").textContent = error.message;
  }

  function showLogin(message) {
    if (timer !== null) { clearInterval(timer); timer = null; }
    $("content").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("secret").focus();
  }

  async function refresh() {
    const [since, bucket] = $("range").value.split(":");
    try {
      const [health, services, revenue, tokens] = await Promise.all([
        api("/api/health"), api("/api/services"),
        api("/api/revenue?since=" + since + "&bucket=" + bucket),
        api("/api/tokens?limit=20"),
      ]);
      $("login").hidden = true;
      $("content").hidden = false;
      $("forget").hidden = false;
      $("error").textContent = "";
      showHealth(health);
      showServices(services);
      showRevenue(revenue);
      showTokens(tokens);
      document.body.setAttribute("data-loaded", String(Date.now()));
      if (timer === null) timer = setInterval(refresh, REFRESH_MS);
    } catch (e) { fail(e); }
  }

  function start() {
    takeFragment();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $("secret").value.trim());
      $("secret").value = "";
      refresh();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showLogin("");
    });
    $("refresh").addEventListener("click", refresh);
    $("range").addEventListener("change", refresh);
    if (sessionStorage.getItem(KEY)) refresh(); else showLogin("");
  }

  start();
})();
"""
