"""The nginx door to the paywall engine: `l402proxy serve-auth` runs the engine as nginx's
auth_request service, and `l402proxy nginx-config` prints the nginx config that asks it.

    l402proxy serve-auth --listen 127.0.0.1:8402 --rules rules/podcast.yaml
    l402proxy nginx-config --auth 127.0.0.1:8402 --upstream http://127.0.0.1:8080 > l402.conf

How one request goes (auth_request lets only 2xx and 401/403 through):

1. nginx asks the service (`location = /.l402/internal/auth`, a subrequest without the body;
   the original method, raw target, host, scheme and client go along in X-Original-* headers,
   which nginx sets over any copy a client sent and the service strips before judging).
   The service judges it with `engine.handle(request)`: the one judgement of this request
   (rate limits and free allowances count once; a 402's one invoice is made here).
2. A plain forward (no rule, or one that lets the request pass) is a 200 whose headers say
   what to send: the target (the paid rewrite, else the raw target as it came), what is left
   of Authorization and Cookie once ours are gone, and the value of every header a rule's
   paid.set_headers names (empty: nginx sends none, so a client's own copy never passes).
   nginx reads them with auth_request_set and proxies to the origin.
3. Anything else is a 401 with X-L402-Route: `paid`, `free` or `offer` (forward, and mark the
   origin's response as the proxy does), or `answer` (the paywall answers it). nginx's
   `error_page 401 = @l402_route` sends the request (method and body kept) to the internal
   location of that name. For `answer` the service holds the answer it decided under a random
   id (X-L402-Answer, which nginx passes to the answer step and sets over any client copy);
   the answer step sends it as it is. An answer no longer held (or a /.l402/ endpoint, which
   needs the body) is judged there in full; should that forward after all (the rules were
   reloaded in between), the client gets a 503 with Retry-After: 1.
4. /.l402/ (the paywall page's endpoints) goes straight to the service, body and all.

Fail closed: nginx declares which set_headers names it carries (X-L402-Config on every call).
If the rules name one it does not carry (an edited rules file), every request gets a 503 saying
so; if the engine changes a request header nginx cannot carry, that request does. The service
down: auth_request fails, and nginx answers 500.

Verdict cache (`nginx-config --verdict-cache`, 1 s by default): nginx keeps a paid grant the
engine calls reusable (no limits to count) under the request's method, URL, Authorization,
Cookie and Accept-Authenticate, and grants the same request alone until it ends (a second
before the token expires at the latest; X-Accel-Expires says how long). Nothing else is kept:
challenges, answers and free variants are judged every time. The engine keeps its token cache
and hears of revocations within a second; a cached grant lasts at most --verdict-cache more.

Rules nginx cannot serve as written (a host-scoped rule, a paid Host) are refused at start and
on reload (`rule_problem`).
"""

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .. import paywall
from ..engine import Answer, Forward, Paywall, Request, StartError
from ..engine.answers import VARIANT_VARY, page_answer, variant_vary
from ..engine.request import REROOTING_HEADERS, Fields, decode, encode, vouched_name
from ..ops import Operations, OpsError, OpsSettings
from ..rules import Rule, RuleSet

log = logging.getLogger(__name__)

# What the printed config and the service agree on; a config from another version (or
# written by hand) gets 503s that say to regenerate it, never a half-understood verdict.
# 2: Authorization and Cookie set by a paid variant go in their own lines (no numbered slot),
# and the config clears the re-rooting headers toward the origin (the service relies on it).
# 4: a paid answer carries the Payment-Receipt of a Payment charge (X-L402-Receipt), and never
# the origin's. A version 3 config is still served while no rule sells Payment charges.
CONFIG_VERSION = 4
# Versions the service still takes, and whether each carries Payment-Receipt.
CONFIG_RECEIPTS = {"3": False, str(CONFIG_VERSION): True}
DEFAULT_LISTEN = "127.0.0.1:8402"
NO_UPSTREAM = "nginx sends every request to its own upstream; use rewrite_path or set_headers"
# The prefix of every upstream, map and variable name of a printed config (--name): several
# printed configs can live in one nginx when each has its own.
DEFAULT_NAME = "l402"
_CONFIG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
# What nginx checks an https origin's certificate against unless --upstream-ca names another
# file (Debian's ca-certificates bundle), and how long a chain it follows.
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SSL_VERIFY_DEPTH = 4

# The service's own paths (nginx reaches them from internal locations only).
AUTH_PATH = "/auth"
ANSWER_PATH = "/answer"
ENDPOINT_PATH = "/endpoint"
INFO_PATH = "/config"

# Request headers nginx sets on every call to the service (over any copy a client sent).
H_METHOD = b"x-original-method"
H_URI = b"x-original-uri"
H_HOST = b"x-original-host"
H_SCHEME = b"x-original-scheme"
H_CLIENT = b"x-original-client"
H_CONFIG = b"x-l402-config"
H_ANSWER = b"x-l402-answer"  # the answer step only: which held answer to send
# The auth step only: how many seconds nginx may keep a paid verdict (its verdict cache).
H_CACHE_FOR = b"x-l402-cache-for"
CONTROL_HEADERS = frozenset(
    {H_METHOD, H_URI, H_HOST, H_SCHEME, H_CLIENT, H_CONFIG, H_ANSWER, H_CACHE_FOR}
)

# Response headers of the auth step, read by auth_request_set ($upstream_http_x_l402_...).
R_ROUTE = b"x-l402-route"
R_TARGET = b"x-l402-target"
R_AUTHORIZATION = b"x-l402-authorization"
R_COOKIE = b"x-l402-cookie"
R_VARY = b"x-l402-vary"
# A dry run: what the paywall would have done, sent back to the client as X-L402-Dry-Run.
R_DRY_RUN = b"x-l402-dry-run"
# What is left of a bundle token, sent back to the client as X-L402-Balance.
R_BALANCE = b"x-l402-balance"
# A Payment charge's receipt, sent back to the client as Payment-Receipt on a successful answer.
R_RECEIPT = b"x-l402-receipt"
R_BANNER = b"x-l402-banner"
R_ANSWER = b"x-l402-answer"
R_SET = "x-l402-set-{}"  # one per set_headers name nginx carries, numbered from 1
R_CLEAR_COOKIE = "x-l402-clear-cookie-{}"
# How long nginx's proxy_cache keeps this verdict (0: not at all; nginx reads it itself).
R_ACCEL_EXPIRES = b"x-accel-expires"
# Set-Cookie lines a free answer may need (paywall.clearing_cookies: the scope and /.l402/).
CLEAR_COOKIE_SLOTS = 2

# Request headers nginx never takes from the client toward the origin whatever the engine
# says: it sets Connection itself, passes Upgrade only for WebSocket (as the engine does) and
# drops HTTP2-Settings (the config sets it empty). The engine changing them needs no carrying.
NGINX_OWN = frozenset({b"connection", b"upgrade", b"http2-settings"})
# Sent to the origin in lines of their own, with what the engine left of them (a paid
# variant's value included): never in a numbered slot, or nginx would send them twice.
CARRIED = frozenset({b"authorization", b"cookie"})
# The printed config clears these toward the origin (proxy_set_header <name> ""), as the
# engine strips them from every forwarded request: nginx sets them, like NGINX_OWN.
CLEARED = REROOTING_HEADERS
# The body the /.l402/unlock endpoint may get, and one byte more so it can tell "too large".
MAX_BODY = paywall.MAX_UNLOCK_BODY + 1
CONFIG_CACHE_LIMIT = 16
# Distinct reasons a single request was refused, each logged once; past this many, no more
# (a client can vary them: header spellings), so the log cannot be flooded.
REFUSAL_LOG_LIMIT = 64
# How long, and in how many bytes at most, answers wait for nginx's answer step (it comes
# within milliseconds; a 402 page is ~20 KB).
HOLD_SECONDS = 30.0
HOLD_BYTES = 32 * 1024 * 1024
# Longer than nginx's keepalive_timeout for upstreams (60 s): nginx, not the service, closes
# an idle connection, so a request is never sent on one the service just closed.
KEEPALIVE_SECONDS = 75
# nginx's verdict cache (--verdict-cache): repeated paid requests with the same credential are
# granted by nginx alone for this long. A revocation waits for it (plus the revocation poll).
DEFAULT_VERDICT_CACHE = 1
MAX_VERDICT_CACHE = 60
# Where nginx keeps the cached verdicts unless --verdict-cache-dir says otherwise: a tmpfs, as
# the entries hold the credential (the cache key) and what the origin gets of Authorization and
# Cookie. {name} is the config's --name.
DEFAULT_VERDICT_CACHE_DIR = "/run/l402proxy-{name}-verdicts"
# A header name nginx can take as written into `proxy_set_header` (a token, no quoting games).
_NGINX_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class ConfigProblem(Exception):
    """The arguments of `nginx-config` or `serve-auth` are no usable value: one line."""


# -- what nginx declares it carries ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Carried:
    """The set_headers names an nginx config carries, in the order of its numbered slots."""

    names: tuple[bytes, ...]
    lookup: frozenset[bytes]
    # What nginx sets itself toward the origin: the engine may change these freely.
    ignored: frozenset[bytes]
    # The names as the rules' vouched_headers spell them (engine.request.vouched_name).
    vouched: frozenset[bytes]
    # Whether its paid answers carry X-L402-Receipt as Payment-Receipt (version 4 on).
    receipts: bool = True

    @classmethod
    def parse(cls, value: bytes) -> "Carried | str":
        """X-L402-Config: "<version> <name> <name>..."; a message when it is not ours."""
        version, *names = value.decode("latin-1").split() or [""]
        receipts = CONFIG_RECEIPTS.get(version)
        if receipts is None:
            return (
                f"the nginx config is version {version or 'unknown'}, "
                f"this l402proxy needs {CONFIG_VERSION}"
            )
        lowered = tuple(name.lower().encode() for name in names)
        slots = slot_names(lowered)
        return cls(
            slots,
            frozenset(slots),
            frozenset(lowered) | CARRIED | NGINX_OWN | CLEARED,
            frozenset(vouched_name(name) for name in lowered),
            receipts,
        )


def slot_names(names: Iterable[bytes]) -> tuple[bytes, ...]:
    """The (lower-case) set_headers names with a numbered slot of their own, in order: all but
    Authorization and Cookie, which the config always sends in lines of their own."""
    return tuple(name for name in names if name not in CARRIED)


def config_header(set_headers: Sequence[str]) -> str:
    return " ".join([str(CONFIG_VERSION), *(name.lower() for name in set_headers)])


# -- rules the nginx door cannot serve as written -------------------------------------------


# set_headers names the config itself sets toward the origin with a value of its own.
_NOT_SETTABLE = {
    "host": "nginx sends the origin the Host of --upstream for every request; "
    "use rewrite_path or another header to tell the paid variant apart",
}


def rule_problem(rule: Rule) -> str | None:
    """Why the nginx door cannot serve this rule as written (Paywall(rule_check=...): the rules
    file is refused at start and on reload, naming file and line), or None."""
    if rule.host is not None:
        return (
            "match.host is not possible with the nginx door: the printed config takes any Host "
            "and sends the origin its own, so a client skips this rule by sending another Host; "
            "give each host a server block of its own (server_name, `nginx-config --name`) with "
            "its own serve-auth and a rules file without match.host"
        )
    if rule.bundle is not None and rule.bundle.unit != "requests":
        # auth_request asks before the origin answers and never shows the service the answer.
        return (
            f"bundle: {rule.bundle.unit} is not possible with the nginx door: nginx's "
            "auth_request never shows the paywall the answer, so it cannot count the "
            f"{rule.bundle.unit} one uses; sell bundles of requests (bundle: {{requests: N}}) "
            "here, or meter behind the proxy or ASGI door"
        )
    for name in rule.paid.set_headers:
        reason = _NOT_SETTABLE.get(name.lower())
        if reason is not None:
            return f"paid.set_headers: {name} is not possible with the nginx door: {reason}"
        if not _NGINX_HEADER_NAME.fullmatch(name):
            return (
                f"paid.set_headers: {name!r} cannot be written into an nginx config "
                "(use letters, digits, '-', '_' and '.')"
            )
    return None


# A private feed's answer is the origin's feed rewritten, and its enclosures are requests to
# another path than the one asked for: auth_request can do neither. The rest of a rule that
# sells a feed works here, so such rules are served with feeds off (no feed URL handed out,
# /.l402/feed/ answers 404), said once, rather than refused: one rules file for every door.
FEEDS_OFF = (
    "the nginx door cannot rewrite a feed (auth_request sees no answer body): private feeds "
    "are off here; serve them through the proxy or ASGI door"
)


def new_engine() -> Paywall:
    """The engine as the nginx door runs it: rules it cannot serve are refused, and private
    feeds are off."""
    engine = Paywall(door="nginx", no_upstream=NO_UPSTREAM, rule_check=rule_problem)
    engine.feeds_off = FEEDS_OFF
    return engine


def warn_feeds_off(engine: Paywall) -> None:
    """One line when the rules sell a private feed this door cannot serve."""
    rules = engine.rules
    fed = [rule for rule in rules.rules if rule.feed is not None] if rules else []
    if fed and rules is not None:
        log.warning(
            f"l402: {rules.source}: service '{fed[0].name}' (line {fed[0].line}) sells a "
            f"private feed (feed:), but {engine.feeds_off}"
        )


# -- the service ------------------------------------------------------------------------------


class HeldAnswers:
    """Answers the auth step decided, kept for the answer step nginx sends right after it
    (under a random id only nginx learns). Bounded in time and bytes: an answer nobody came
    for is dropped, and the answer step then judges the request itself."""

    def __init__(self, ttl: float = HOLD_SECONDS, max_bytes: int = HOLD_BYTES) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.size = 0
        self._held: OrderedDict[bytes, tuple[float, Answer, int]] = OrderedDict()

    def hold(self, answer: Answer) -> bytes:
        now = time.monotonic()
        key = secrets.token_hex(16).encode()
        size = len(answer.body) + sum(len(n) + len(v) for n, v in answer.headers) + 64
        self._held[key] = (now + self.ttl, answer, size)
        self.size += size
        while self._held:
            oldest_key, (expires, _, oldest_size) = next(iter(self._held.items()))
            if expires > now and self.size <= self.max_bytes:
                break
            del self._held[oldest_key]
            self.size -= oldest_size
        return key

    def take(self, key: bytes | None) -> Answer | None:
        if not key:
            return None
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        expires, answer, size = entry
        self.size -= size
        return answer if expires > time.monotonic() else None

    def __len__(self) -> int:
        return len(self._held)


def _request_parts(scope: Scope) -> tuple[Fields, dict[bytes, bytes]]:
    """The client's header fields as nginx passed them, and our control headers apart."""
    fields: list[tuple[bytes, bytes]] = []
    control: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        lower = name.lower()
        if lower in CONTROL_HEADERS:
            control[lower] = value
        else:
            fields.append((name, value))
    return tuple(fields), control


def _client(value: bytes | None) -> tuple[str, int] | None:
    if not value:
        return None
    address, _, port = value.decode("latin-1").rpartition(" ")
    return (address, int(port)) if address and port.isdigit() else None


def _values(fields: Fields, names: frozenset[bytes]) -> dict[bytes, list[bytes]]:
    """Every value of the wanted (lower-case) names, in one pass."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        lower = name.lower()
        if lower in names:
            found.setdefault(lower, []).append(value)
    return found


def changed_headers(before: Fields, after: Fields, ignore: frozenset[bytes]) -> set[bytes]:
    """Lower-case names, not in `ignore`, whose values (in order) differ between two sets of
    fields. On every forwarded request: the usual case (nothing else changed) is one pass."""
    if after is before:
        return set()
    old = [(name.lower(), value) for name, value in before if name.lower() not in ignore]
    new = [(name.lower(), value) for name, value in after if name.lower() not in ignore]
    if old == new:
        return set()
    by_name_old: dict[bytes, list[bytes]] = {}
    by_name_new: dict[bytes, list[bytes]] = {}
    for fields, into in ((old, by_name_old), (new, by_name_new)):
        for name, value in fields:
            into.setdefault(name, []).append(value)
    return {
        name
        for name in by_name_old.keys() | by_name_new.keys()
        if by_name_old.get(name) != by_name_new.get(name)
    }


def _one_line(status: int, message: str, extra: Iterable[tuple[str, str]] = ()) -> Answer:
    return Answer.make(
        status,
        f"{message}\n".encode(),
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8", **dict(extra)},
    )


_ANSWER_ROUTE = [(R_ROUTE, b"answer")]
# What no header value may hold (uvicorn refuses to send it; HTAB is fine).
_UNSENDABLE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


class AuthService:
    """The ASGI app `serve-auth` runs: the engine behind nginx's auth_request. The engine is
    opened and closed by whoever runs the app (`serve`); lifespan events are acknowledged."""

    def __init__(self, engine: Paywall) -> None:
        self.engine = engine
        self._configs: dict[bytes, Carried | str] = {}
        # The config problem logged per X-L402-Config value (b"": none sent), until a request
        # with that value passes again: two nginx configs on one service (one stale) do not
        # take turns clearing each other's.
        self._config_reported: dict[bytes, str] = {}
        # Reasons single requests were refused, each logged once (bounded, never cleared).
        self._request_reported: set[str] = set()
        self.held = HeldAnswers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return  # a WebSocket to the service itself: nginx never opens one
        path = scope["path"]
        if path == AUTH_PATH:
            await self.auth(scope, send)
        elif path in (ANSWER_PATH, ENDPOINT_PATH):
            await self.answer(scope, receive, send, endpoint=path == ENDPOINT_PATH)
        elif path == INFO_PATH and scope["method"] in ("GET", "HEAD"):
            await _send(send, _info_answer(self.engine).for_method(scope["method"]))
        else:
            await _send(send, _one_line(404, "not a path of l402proxy serve-auth"))

    # -- what nginx carries -----------------------------------------------------------------

    def problem(self, control: Mapping[bytes, bytes]) -> str | None:
        """Why this nginx config cannot carry what the rules in force need, if it cannot."""
        value = control.get(H_CONFIG)
        if value is None:
            return "the request did not come through the config of `l402proxy nginx-config`"
        carried = self._carried(value)
        if isinstance(carried, str):
            return carried
        rules = self.engine.rules
        vouched = rules.vouched_headers if rules is not None else frozenset()
        if vouched and not vouched <= carried.vouched:
            missing = ", ".join(sorted(name.decode() for name in vouched - carried.vouched))
            return f"the nginx config does not carry the header(s) the rules set: {missing}"
        if not carried.receipts and self.engine.sells_payment():
            return (
                "the nginx config (version 3) cannot send the Payment-Receipt a Payment charge "
                f"needs, and the rules sell Payment charges (schemes: payment); this l402proxy "
                f"writes version {CONFIG_VERSION}"
            )
        if self._config_reported:
            # Fixed for this config: should it break again, the log says so again.
            self._config_reported.pop(value, None)
        return None

    def _carried(self, value: bytes) -> Carried | str:
        carried = self._configs.get(value)
        if carried is None:
            if len(self._configs) >= CONFIG_CACHE_LIMIT:
                self._configs.clear()  # only a config edit makes another value
            carried = self._configs[value] = Carried.parse(value)
        return carried

    def refuse_config(self, problem: str, control: Mapping[bytes, bytes], method: str) -> Answer:
        """503 for every request while this nginx config cannot carry what the rules need:
        one line for the client, one warning in the log per problem until it is fixed."""
        message = f"{problem}; regenerate it with `l402proxy nginx-config` and reload nginx"
        value = control.get(H_CONFIG, b"")
        if self._config_reported.get(value) != message:
            if len(self._config_reported) >= CONFIG_CACHE_LIMIT:
                self._config_reported.clear()  # only config edits make another value
            self._config_reported[value] = message
            log.warning(f"l402: answering 503 to every request: {message}")
        return _one_line(503, f"Payment is unavailable: {message}").for_method(method)

    def refuse_request(self, problem: str, method: str) -> Answer:
        """503 for this request only: nginx cannot send it as the paywall decided (the config
        is fine; the request is not). Each distinct reason is logged once."""
        if problem not in self._request_reported:
            if len(self._request_reported) < REFUSAL_LOG_LIMIT:
                log.warning(
                    f"l402: answered 503 to one request (this request only; the nginx config "
                    f"is fine; logged once): {problem}"
                )
            elif len(self._request_reported) == REFUSAL_LOG_LIMIT:
                log.warning(
                    f"l402: {REFUSAL_LOG_LIMIT} reasons for refusing single requests logged; "
                    "further ones are not"
                )
            if len(self._request_reported) <= REFUSAL_LOG_LIMIT:
                self._request_reported.add(problem)
        return _one_line(503, f"Payment is unavailable: {problem}").for_method(method)

    # -- the auth step ---------------------------------------------------------------------

    async def auth(self, scope: Scope, send: Send) -> None:
        fields, control = _request_parts(scope)
        if H_URI not in control:
            # Not from our config: auth_request turns this into a 500 (fail closed).
            await _send(send, _one_line(400, "no X-Original-URI: not a call from nginx"))
            return
        method = decode(control.get(H_METHOD, b"GET"))
        request = _request(method, fields, control)
        if self.problem(control) is not None or paywall.is_endpoint(request.target):
            # The answer step says what is wrong; a /.l402/ endpoint needs the request body,
            # which only the answer step gets.
            await _respond(send, 401, _ANSWER_ROUTE)
            return
        try:
            # The one judgement of this request: limits and free allowances count here, and
            # a 402's invoice is made here (the answer step sends what was decided).
            outcome = await self.engine.handle(request)
        except Exception:  # handle() promises not to raise; if it does, nothing is forwarded
            log.exception(f"l402: internal error judging {method} {request.target}")
            await _respond(send, 401, _ANSWER_ROUTE)
            return
        if isinstance(outcome, Forward):
            carried = self._carried(control[H_CONFIG])
            assert isinstance(carried, Carried)  # problem() said so
            plan = self.instructions(request, outcome, carried, control.get(H_CACHE_FOR))
            if not isinstance(plan, Answer):
                await _respond(send, *plan)
                return
            outcome = plan
        await _respond(send, 401, [*_ANSWER_ROUTE, (R_ANSWER, self.held.hold(outcome))])

    def instructions(
        self, request: Request, forward: Forward, carried: Carried, cache_for: bytes | None = None
    ) -> tuple[int, list[tuple[bytes, bytes]]] | Answer:
        """What nginx sends to the origin for a forwarded request, and how it marks the
        answer: (200, headers) for a plain forward, (401, headers with a route) otherwise;
        the answer instead when nginx cannot send it (fail closed)."""
        problem = self.uncarried(request, forward, carried)
        if problem is not None:
            return self.refuse_request(problem, request.method)
        headers = [(R_TARGET, encode(_target(request, forward)))]
        lifetime = verdict_lifetime(forward.note, cache_for, time.time())
        if lifetime:
            headers.append((R_ACCEL_EXPIRES, str(lifetime).encode()))
        found = _values(forward.headers, CARRIED | carried.lookup)
        authorization = found.get(b"authorization")
        if authorization:
            headers.append((R_AUTHORIZATION, b", ".join(authorization)))
        cookie = found.get(b"cookie")
        if cookie:
            # Several Cookie fields (HTTP/2 sends one per cookie) go as one line, as nginx
            # itself joins them.
            headers.append((R_COOKIE, b"; ".join(cookie)))
        for number, name in enumerate(carried.names, 1):
            values = found.get(name)
            if values:
                headers.append((R_SET.format(number).encode(), b", ".join(values)))
        if any(_UNSENDABLE.search(value) for _, value in headers):
            # A client's own header with a control character nginx took but no response
            # header can carry back (uvicorn would refuse it): not passed on.
            return _one_line(
                400, "Bad request: a header has a control character the paywall cannot pass on."
            ).for_method(request.method)
        note = forward.note
        variant = note.get("variant") if note is not None else None
        if note is not None and note.get("dry_run") is not None:
            headers.append((R_DRY_RUN, encode(note["dry_run"])))
        if note is not None and note.get("balance") is not None:
            headers.append((R_BALANCE, encode(note["balance"])))
        if note is not None and note.get("receipt") is not None:
            # nginx adds it on a successful answer only (add_header without `always`).
            headers.append((R_RECEIPT, encode(note["receipt"])))
        if variant == "paid":
            headers += [(R_ROUTE, b"paid"), (R_VARY, _VARY)]
            return 401, headers
        if variant != "free":
            return 200, headers
        assert note is not None
        offer = note.get("offer")
        if note.get("by_payment"):
            vary = ", ".join(variant_vary(by_accept=bool(offer), by_payment=True)).encode()
            headers.append((R_VARY, vary))
        else:
            headers.append((R_VARY, _VARY_ACCEPT if offer else _VARY))
        for number, cookie_line in enumerate(note.get("clear_cookies", ()), 1):
            headers.append((R_CLEAR_COOKIE.format(number).encode(), encode(cookie_line)))
        if offer and self.engine.offer_upgrade and request.method.upper() != "HEAD":
            headers += [(R_ROUTE, b"offer"), (R_BANNER, encode(offer))]
        else:
            headers.append((R_ROUTE, b"free"))
        return 401, headers

    def uncarried(self, request: Request, forward: Forward, carried: Carried) -> str | None:
        """Why nginx cannot send what the engine decided, if it cannot (then: 503)."""
        if forward.upstream is not None:
            return f"a paid variant sends requests to {forward.upstream}; {NO_UPSTREAM}"
        if not _target(request, forward).startswith("/"):
            # proxy_pass puts it right after the origin's address: only a path may go there.
            return "the request target to send is no path"
        changed = changed_headers(request.fields, forward.headers, carried.ignored)
        if changed:
            names = ", ".join(sorted(name.decode("latin-1") for name in changed))
            return f"the paywall changed request header(s) the nginx door cannot carry: {names}"
        note = forward.note
        if note is not None and len(note.get("clear_cookies", ())) > CLEAR_COOKIE_SLOTS:
            return "the paywall sets more cookies on a free answer than the nginx config carries"
        return None

    # -- the answer step and the /.l402/ endpoints ------------------------------------------

    async def answer(self, scope: Scope, receive: Receive, send: Send, *, endpoint: bool) -> None:
        fields, control = _request_parts(scope)
        method = scope["method"]
        if H_URI not in control:
            await _send(send, _one_line(400, "no X-Original-URI: not a call from nginx"))
            return
        problem = self.problem(control)
        if problem is not None:
            await _send(send, self.refuse_config(problem, control, method))
            return
        held = None if endpoint else self.held.take(control.get(H_ANSWER))
        if held is not None:
            await _send(send, held.for_method(method))
            return
        # Nothing decided yet (an endpoint, or the answer was no longer held): judge it now.
        request = _request(method, fields, control)
        if endpoint or paywall.is_endpoint(request.target):
            request.body = await _read_body(receive, MAX_BODY)
        try:
            outcome = await self.engine.handle(request)
        except Exception:  # handle() promises not to raise; answer rather than hang up
            log.exception(f"l402: internal error answering {method} {request.target}")
            outcome = _one_line(503, "Payment is unavailable: internal error in the paywall")
        if isinstance(outcome, Forward):
            outcome = self.not_forwarded(request, outcome, control, endpoint=endpoint)
        await _send(send, outcome.for_method(method))

    def not_forwarded(
        self, request: Request, forward: Forward, control: Mapping[bytes, bytes], *, endpoint: bool
    ) -> Answer:
        """A request the answer step judged itself, which the judgement forwards."""
        if endpoint:
            # nginx's /.l402/ location reads a path as ours that the engine does not.
            return page_answer(404, "Not found", "No such paywall page.")
        carried = self._carried(control[H_CONFIG])
        assert isinstance(carried, Carried)
        plan = self.instructions(request, forward, carried)
        if isinstance(plan, Answer):
            return plan
        # The rules were reloaded between the two judgements: ask the client to come again
        # rather than forward from here (this step has no way to the origin).
        return _one_line(
            503,
            "The paywall rules changed while this request was judged; please try again.",
            [("Retry-After", "1")],
        )


def verdict_lifetime(note: Mapping[str, Any] | None, cache_for: bytes | None, now: float) -> int:
    """Seconds nginx may grant the same request (method, URL, credential) again from its
    verdict cache: what the config asks for (X-L402-Cache-For), for a paid grant the engine
    calls reusable, ending a second before the token expires; else 0. Never a dry run's
    verdict (it may end any moment), nor one counted per request (limits)."""
    if not cache_for or note is None or "reusable_until" not in note or "dry_run" in note:
        return 0
    try:
        seconds = min(int(cache_for), MAX_VERDICT_CACHE)
    except ValueError:
        return 0
    until = note["reusable_until"]
    if until is not None:
        # nginx counts whole seconds and may use an entry through the second it ends in.
        seconds = min(seconds, int(until - now) - 1)
    return max(seconds, 0)


def _target(request: Request, forward: Forward) -> str:
    """What nginx sends as the request target: the paid rewrite, or the raw target as it came."""
    return forward.path if forward.path is not None else request.target


_VARY = ", ".join(VARIANT_VARY).encode()
_VARY_ACCEPT = ", ".join((*VARIANT_VARY, "Accept")).encode()


def _request(method: str, fields: Fields, control: Mapping[bytes, bytes]) -> Request:
    return Request(
        method=method,
        target=decode(control[H_URI]),
        host=decode(control.get(H_HOST, b"")),
        fields=fields,
        secure=control.get(H_SCHEME) == b"https",
        client=_client(control.get(H_CLIENT)),
    )


def _info_answer(engine: Paywall) -> Answer:
    """What `nginx-config` asks the running service: the set_headers names to carry."""
    return Answer.make(
        200,
        json.dumps(
            {"config_version": CONFIG_VERSION, "set_headers": set_header_names(engine.rules)}
        ).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def set_header_names(rules: RuleSet | None) -> list[str]:
    """The names the rules' paid.set_headers use, spelled as in the rules (first spelling)."""
    names: dict[str, str] = {}
    if rules is not None:
        for rule in rules.rules:
            for name in rule.paid.set_headers:
                names.setdefault(name.lower(), name)
    return list(names.values())


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, at most `limit` bytes (the rest is left unread: uvicorn drops it)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[:limit]


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _send(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": answer.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- serve-auth -------------------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) -> (host, port); ConfigProblem otherwise."""
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname
    if not host or port is None or port == 0 or parts.username or parts.path:
        raise ConfigProblem(f"expected HOST:PORT like {DEFAULT_LISTEN}, got {value!r}")
    return host, port


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything opens (OSError: say it and stop)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # an answer written as headers then body waits ~40 ms for the delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve(engine: Paywall, sock: socket.socket, settings: OpsSettings | None = None) -> None:
    """Open the engine, serve the auth service on `sock` until SIGINT/SIGTERM, close the
    engine. StartError (nothing served) when the store or backend cannot be opened, or an
    operations endpoint (`settings`: metrics, admin) cannot start."""
    import uvicorn  # the service's own dependency; importing the door stays cheap

    stop = asyncio.Event()
    server: uvicorn.Server | None = None
    ops = Operations(
        settings or OpsSettings(), "nginx", {"metrics": "--metrics", "admin": "--admin"}
    )

    def on_signal(signum: int, frame: object) -> None:
        # uvicorn installs its own handlers while serving and raises the signal again
        # when it is done: then this one runs, and the engine is closed below.
        stop.set()
        if server is not None:
            server.should_exit = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            # Closed below also when it fails halfway (a store opened, a backend that is not).
            await engine.open()
            try:
                await ops.start(engine)
            except OpsError as exc:
                raise StartError([str(exc)]) from exc
            if stop.is_set():
                return
            config = uvicorn.Config(
                AuthService(engine),
                http="httptools",
                loop="asyncio",
                lifespan="off",
                access_log=False,
                log_config=None,
                server_header=False,
                date_header=False,
                proxy_headers=False,
                timeout_keep_alive=KEEPALIVE_SECONDS,
                backlog=2048,
            )
            server = uvicorn.Server(config)
            host, port = sock.getsockname()[:2]
            log.info(f"l402: auth service for nginx on {_address(host, port)}")
            await server.serve(sockets=[sock])
        finally:
            await ops.close()
            await engine.close()
            if server is not None:
                log.info("l402: auth service stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_engine(
    rules: str,
    backend: str,
    store: str | None,
    dev_ledger: str,
    schemes: str | Sequence[str] = "l402",
) -> Paywall:
    """The engine as serve-auth runs it; RulesError / LightningError as the engine raises them,
    Refused for `schemes` (serve-auth's --schemes: how rules that name none are paid)."""
    engine = new_engine()
    engine.use_schemes(schemes)  # before the rules: they are checked against it
    engine.use_rules_file(rules)
    warn_feeds_off(engine)
    engine.use_backend(backend, dev_ledger=dev_ledger)
    engine.store_uri = store or ""
    return engine


def run_service(
    engine: Paywall,
    sock: socket.socket,
    *,
    metrics: str = "",
    log_format: str = "text",
    dry_run: bool = False,
    admin: str = "",
    admin_secret: str = "",
    ops_remote: bool = False,
) -> list[str]:
    """Serve until stopped; the problems that kept it from starting (empty: it ran). The
    keywords are serve-auth's operations options (ops/: --metrics, --log-format, ...)."""
    settings = OpsSettings(
        metrics=metrics,
        log_format=log_format,
        dry_run=dry_run,
        admin=admin,
        admin_secret=admin_secret,
        allow_remote=ops_remote,
    )
    names = {"metrics": "--metrics", "log_format": "--log-format", "admin": "--admin"}
    problems = settings.problems(names)
    if problems:
        sock.close()
        return [problem for _, problem in problems]
    try:
        asyncio.run(serve(engine, sock, settings))
    except StartError as exc:
        return exc.problems
    return []


# -- nginx-config -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """The --upstream origin: how nginx reaches it and the Host it is sent."""

    scheme: str
    server: str  # host:port for the upstream block
    host: str  # the bare host (for TLS SNI)
    authority: str  # Host header: host, and the port when the URL names one


def parse_origin(value: str) -> Origin:
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname
    bare_url = (parts.path in ("", "/")) and not parts.query and not parts.fragment
    if scheme not in ("http", "https") or not host or not bare_url or parts.username:
        raise ConfigProblem(f"expected a URL like http://127.0.0.1:8080, got {value!r}")
    if port is None and ":" in (parts.netloc.rsplit("]", 1)[-1]):
        raise ConfigProblem(f"bad port in {value!r}")
    shown = f"[{host}]" if ":" in host else host
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", shown):
        raise ConfigProblem(f"expected a host name or address in {value!r}")
    default = 443 if scheme == "https" else 80
    authority = shown if port is None else f"{shown}:{port}"
    return Origin(scheme, f"{shown}:{port or default}", host, authority)


def parse_nginx_listen(value: str) -> str:
    """What goes after nginx's `listen`: PORT, ADDRESS:PORT or [IPv6]:PORT."""
    if value.isdigit() and 0 < int(value) < 65536:
        return value
    host, port = parse_listen(value)
    return _address(host, port)


def check_header_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    for name in names:
        if not _NGINX_HEADER_NAME.fullmatch(name):
            raise ConfigProblem(
                f"paid.set_headers name {name!r} cannot be written into an nginx config "
                "(use letters, digits, '-', '_' and '.')"
            )
    return names


def check_name(name: str) -> str:
    """--name: the prefix of the config's upstream, map and variable names."""
    if not _CONFIG_NAME.fullmatch(name):
        raise ConfigProblem(
            f"expected a name of letters, digits and '_' starting with a letter (at most 32), "
            f"got {name!r}"
        )
    return name


def check_verdict_cache(seconds: int) -> int:
    """--verdict-cache: whole seconds, 0 (off) to MAX_VERDICT_CACHE."""
    if not 0 <= seconds <= MAX_VERDICT_CACHE:
        raise ConfigProblem(
            f"expected whole seconds from 0 (no verdict cache) to {MAX_VERDICT_CACHE}, got "
            f"{seconds} (a revocation waits that long)"
        )
    return seconds


def check_cache_dir(path: str) -> str:
    """--verdict-cache-dir: an absolute path nginx can take as written."""
    if not path.startswith("/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", path):
        raise ConfigProblem(
            f"expected an absolute path of letters, digits and . _ - /, got {path!r}"
        )
    return path


def tls_name_warning(origin: Origin) -> str | None:
    """nginx 1.22 checks an https origin's certificate against the name it was given, as a
    host name only (X509_check_host): an IP address entry of the certificate never matches."""
    if origin.scheme != "https":
        return None
    try:
        ipaddress.ip_address(origin.host)
    except ValueError:
        return None
    return (
        f"--upstream names the address {origin.host}: nginx checks the origin's certificate "
        "against it as a host name and never matches the certificate's IP address entries, so "
        "unless the certificate names it as a DNS name every request gets a 502; name the "
        "origin by a host name its certificate carries"
    )


def _header_name(name: bytes) -> str:
    """A lower-case header name as people write it (Daphne-Root-Path)."""
    return "-".join(part.capitalize() for part in name.decode().split("-"))


def render_config(
    *,
    auth: tuple[str, int],
    origin: Origin,
    listen: str,
    set_headers: Sequence[str],
    name: str = DEFAULT_NAME,
    upstream_ca: str = DEFAULT_CA_BUNDLE,
    verdict_cache: int = DEFAULT_VERDICT_CACHE,
    verdict_cache_dir: str | None = None,
) -> str:
    """The text to include in nginx's `http { }`: upstreams, maps and one server. Every
    upstream, map and variable name starts with `name`, so configs made with different names
    can be included in one nginx. `upstream_ca`: what an https origin's certificate is checked
    against (the file is not read here). `verdict_cache`: seconds nginx keeps a paid verdict
    (0: none), in `verdict_cache_dir` (DEFAULT_VERDICT_CACHE_DIR when None)."""
    set_headers = check_header_names(set_headers)
    p = check_name(name)
    verdict_cache = check_verdict_cache(verdict_cache)
    cache_dir = check_cache_dir(verdict_cache_dir or DEFAULT_VERDICT_CACHE_DIR.format(name=p))
    for header in set_headers:
        reason = _NOT_SETTABLE.get(header.lower())
        if reason is not None:
            raise ConfigProblem(f"paid.set_headers: {header} is not possible: {reason}")
    # Authorization and Cookie have lines of their own (CARRIED): no numbered slot.
    slotted = [h for h in set_headers if h.lower().encode() not in CARRIED]
    slots = [(header, f"${p}_set_{number}") for number, header in enumerate(slotted, 1)]
    slot_lookup = {header.lower().encode() for header in slotted}
    auth_sets = [
        (f"{p}_route", "route"),
        (f"{p}_answer", "answer"),
        (f"{p}_target", "target"),
        (f"{p}_authorization", "authorization"),
        (f"{p}_cookie", "cookie"),
        (f"{p}_vary", "vary"),
        (f"{p}_banner", "banner"),
        (f"{p}_dry_run", "dry_run"),
        (f"{p}_balance", "balance"),
        (f"{p}_receipt", "receipt"),
        *((f"{p}_clear_cookie_{n}", f"clear_cookie_{n}") for n in _clear_slots()),
        *((f"{p}_set_{n}", f"set_{n}") for n in range(1, len(slots) + 1)),
    ]
    to_origin = [
        f"proxy_pass {origin.scheme}://{p}_origin${p}_target;",
        f"proxy_set_header Host {_quote(origin.authority)};",
        f"proxy_set_header Connection ${p}_connection;",
        f"proxy_set_header Upgrade ${p}_upgrade;",
        'proxy_set_header HTTP2-Settings "";',
        f"proxy_set_header Authorization ${p}_authorization;",
        f"proxy_set_header Cookie ${p}_cookie;",
        *(f"proxy_set_header {header} {variable};" for header, variable in slots),
        # Only the paywall vouches for a Payment charge: the origin's receipt never goes out
        # (free and unpriced answers too); the paid location adds the charge's own.
        "proxy_hide_header Payment-Receipt;",
        # Headers that make an origin route below another root than the path judged: the
        # engine strips them, and so does nginx (unless a paid variant sets one: its slot).
        *(
            f'proxy_set_header {_header_name(cleared)} "";'
            for cleared in sorted(CLEARED)
            if cleared not in slot_lookup
        ),
    ]
    if origin.scheme == "https":
        # Checked like any TLS client checks a server: a wrong certificate is a 502, never
        # the content.
        to_origin += [
            "proxy_ssl_server_name on;",
            f"proxy_ssl_name {_quote(origin.host)};",
            "proxy_ssl_verify on;",
            f"proxy_ssl_verify_depth {SSL_VERIFY_DEPTH};",
            f"proxy_ssl_trusted_certificate {_quote(upstream_ca)};",
        ]
    config = _quote(config_header(set_headers))
    to_service = [
        "proxy_set_header Host $http_host;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Original-Method $request_method;",
        "proxy_set_header X-Original-URI $request_uri;",
        "proxy_set_header X-Original-Host $host;",
        "proxy_set_header X-Original-Scheme $scheme;",
        'proxy_set_header X-Original-Client "$remote_addr $remote_port";',
        f"proxy_set_header X-L402-Config {config};",
        # Which answer the auth step decided (empty, so never a client's, everywhere else).
        f"proxy_set_header X-L402-Answer ${p}_answer;",
        # How long the verdict cache may keep a paid verdict (0: no cache).
        f"proxy_set_header X-L402-Cache-For {verdict_cache};",
    ]
    # The paywall's answers carry two long challenge lines and cookies; the verdict echoes the
    # client's Authorization and Cookie: room for large ones.
    answer_buffers = ["proxy_buffer_size 32k;", "proxy_buffers 4 32k;"]
    verdict_buffers = ["proxy_buffer_size 64k;", "proxy_buffers 4 64k;"]
    auth_host, auth_port = auth
    cache_path: list[str] = []
    verdicts: list[str] = []
    if verdict_cache:
        cache_path = [
            "# Paid verdicts nginx keeps (--verdict-cache): the same method, URL and credential",
            f"# are granted by nginx alone for up to {verdict_cache} s (never past the token's",
            "# expiry); a revoked token stops working once that has passed. The entries hold",
            "# credentials: keep the directory on a tmpfs, readable by nginx only.",
            f"proxy_cache_path {cache_dir} levels=1:2 keys_zone={p}_verdicts:4m max_size=64m "
            "inactive=60s use_temp_path=off;",
            "",
        ]
        verdicts = [
            f"proxy_cache {p}_verdicts;",
            # Everything a paid verdict depends on: only grants the service marks as lasting
            # (X-Accel-Expires) are kept; nothing else is (no proxy_cache_valid). The config
            # (X-L402-Config) first: a verdict's X-L402-Set-N are numbered by the config that
            # asked, and its entries outlive a reload or restart with another config.
            f'proxy_cache_key "{config_header(set_headers)} $request_method $scheme://$host'
            '$request_uri $http_authorization|$http_cookie|$http_accept_authenticate";',
        ]
    lines = [
        f"# l402proxy nginx door, config version {CONFIG_VERSION}: goes inside http {{ }}.",
        "# Made by `l402proxy nginx-config`; make it again (and reload nginx) when the rules'",
        "# paid.set_headers names change: until then every request gets a 503 saying so.",
        f"# Every upstream, map and variable name starts with {p}_ (--name).",
        "",
        *cache_path,
        f"upstream {p}_auth {{",
        f"    server {_address(auth_host, auth_port)};",
        "    # Both calls for one request (the verdict, then the answer it decided) go to the",
        "    # same serve-auth when you list several: the answer is held where it was decided.",
        "    hash $request_id consistent;",
        "    keepalive 32;",
        "}",
        "",
        f"upstream {p}_origin {{",
        f"    server {origin.server};",
        "    keepalive 32;",
        "}",
        "",
        "# Where a request the auth service sent back with a 401 goes (its X-L402-Route):",
        "# anything unknown is answered by the service.",
        f"map ${p}_route ${p}_route_uri {{",
        "    volatile;",
        "    paid /.l402/internal/paid;",
        "    free /.l402/internal/free;",
        "    offer /.l402/internal/offer;",
        "    default /.l402/internal/answer;",
        "}",
        "",
        "# WebSocket upgrades pass, as through the proxy; no other Upgrade (h2c) ever does.",
        f"map $http_upgrade ${p}_upgrade {{",
        '    "~*^\\s*websocket\\s*(,\\s*websocket\\s*)*$" $http_upgrade;',
        '    default "";',
        "}",
        f"map ${p}_upgrade ${p}_connection {{",
        '    "" "";',
        "    default upgrade;",
        "}",
        "",
        "# A paid answer: the origin's Cache-Control without public and s-maxage, and private",
        "# (as the proxy marks it), so no shared cache keeps what one client paid for.",
        f"map $upstream_http_cache_control ${p}_cache_control_1 {{",
        "    volatile;",
        *_drop_shared("$upstream_http_cache_control", 1, p),
        "}",
        f"map ${p}_cache_control_1 ${p}_cache_control_2 {{",
        "    volatile;",
        *_drop_shared(f"${p}_cache_control_1", 2, p),
        "}",
        f"map ${p}_cache_control_2 ${p}_paid_cache_control {{",
        "    volatile;",
        # nginx tries no regex on an empty value: the origin sent none.
        '    "" private;',
        '    "~*(^|,)\\s*(public|s-maxage)\\s*(=|,|$)" "private, no-store";',
        f'    "~*(^|,)\\s*(private|no-store)\\s*(,|$)" ${p}_cache_control_2;',
        '    "~^[\\s,]*$" private;',
        f'    default "private, ${p}_cache_control_2";',
        "}",
        "",
        "# The upgrade offer goes into free HTML pages the origin answered with 200.",
        f"map $upstream_status ${p}_banner_200 {{",
        "    volatile;",
        f"    200 ${p}_banner;",
        '    default "";',
        "}",
        "",
        "server {",
        f"    listen {listen};",
        "    # Your host name, needed when another server listens on this port too (Debian's",
        "    # default site does on port 80); one config per host, each with its own --name:",
        "    # server_name example.com;",
        "",
        "    proxy_http_version 1.1;",
        "    proxy_redirect off;",
        "",
        "    # Every request is judged by the auth service first (or by its verdict cache).",
        "    location / {",
        "        auth_request /.l402/internal/auth;",
        *(
            f"        auth_request_set ${variable} $upstream_http_x_l402_{header};"
            for variable, header in auth_sets
        ),
        f"        error_page 401 = @{p}_route;",
        *_indent(to_origin, 2),
        "    }",
        "",
        f"    location @{p}_route {{",
        f"        rewrite ^ ${p}_route_uri? last;",
        "    }",
        "",
        "    location = /.l402/internal/paid {",
        "        internal;",
        *_indent(to_origin, 2),
        "        proxy_hide_header Cache-Control;",
        f"        add_header Cache-Control ${p}_paid_cache_control always;",
        f"        add_header Vary ${p}_vary always;",
        f"        add_header X-L402-Dry-Run ${p}_dry_run always;",
        "        proxy_hide_header X-L402-Balance;",
        f"        add_header X-L402-Balance ${p}_balance always;",
        "        # A Payment charge's receipt, on a successful answer only (no `always`); the",
        "        # origin's is hidden (above).",
        f"        add_header Payment-Receipt ${p}_receipt;",
        "    }",
        "",
        "    location = /.l402/internal/free {",
        "        internal;",
        *_indent(to_origin, 2),
        f"        add_header Vary ${p}_vary always;",
        f"        add_header X-L402-Dry-Run ${p}_dry_run always;",
        *(f"        add_header Set-Cookie ${p}_clear_cookie_{n} always;" for n in _clear_slots()),
        "    }",
        "",
        "    location = /.l402/internal/offer {",
        "        internal;",
        *_indent(to_origin, 2),
        "        # sub_filter reads bodies as they come: ask the origin for no compression.",
        '        proxy_set_header Accept-Encoding "";',
        f"        add_header Vary ${p}_vary always;",
        f"        add_header X-L402-Dry-Run ${p}_dry_run always;",
        *(f"        add_header Set-Cookie ${p}_clear_cookie_{n} always;" for n in _clear_slots()),
        f'        sub_filter "</body>" "${p}_banner_200</body>";',
        "        sub_filter_once on;",
        "        sub_filter_last_modified on;",
        "    }",
        "",
        "    # The paywall page's endpoints, answered by the engine.",
        "    location ^~ /.l402/ {",
        "        rewrite ^ /.l402/internal/endpoint? last;",
        "    }",
        "",
        "    location = /.l402/internal/endpoint {",
        "        internal;",
        f"        proxy_pass http://{p}_auth{ENDPOINT_PATH};",
        *_indent(to_service + answer_buffers, 2),
        "    }",
        "",
        "    location = /.l402/internal/answer {",
        "        internal;",
        f"        proxy_pass http://{p}_auth{ANSWER_PATH};",
        *_indent(to_service + answer_buffers, 2),
        "    }",
        "",
        "    location = /.l402/internal/auth {",
        "        internal;",
        f"        proxy_pass http://{p}_auth{AUTH_PATH};",
        "        proxy_pass_request_body off;",
        '        proxy_set_header Content-Length "";',
        *_indent(to_service + verdict_buffers + verdicts, 2),
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _clear_slots() -> range:
    return range(1, CLEAR_COOKIE_SLOTS + 1)


def _drop_shared(source: str, number: int, prefix: str) -> list[str]:
    """Map lines removing the first `public` or `s-maxage[=...]` directive from a
    Cache-Control value (nginx has no global replace: two maps in a row take two)."""
    directive = '(public|s-maxage)(\\s*=\\s*("[^"]*"|[^,]*))?\\s*'
    # Named captures are nginx variables too: prefixed like every other name.
    rest = f"{prefix}_cc{number}_rest"
    left, tail = f"{prefix}_cc{number}_left", f"{prefix}_cc{number}_tail"
    return [
        _quote_map(f"~*^\\s*{directive}(,\\s*(?<{rest}>.*))?$") + f" ${rest};",
        _quote_map(f"~*^(?<{left}>.*?)\\s*,\\s*{directive}(?<{tail}>(,.*)?)$")
        + f' "${left}${tail}";',
        f"    default {source};",
    ]


def _quote_map(pattern: str) -> str:
    return '    "' + pattern.replace('"', '\\"') + '"'


def _quote(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9._:\-\[\]/]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _indent(lines: Iterable[str], depth: int) -> list[str]:
    return ["    " * depth + line for line in lines]


def names_from_service(auth: tuple[str, int], timeout: float = 10.0) -> list[str]:
    """The set_headers names the running service's rules use (ConfigProblem: unreachable)."""
    import httpx

    url = f"http://{_address(*auth)}{INFO_PATH}"
    try:
        response = httpx.get(url, timeout=timeout, trust_env=False)
        response.raise_for_status()
        info = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ConfigProblem(
            f"cannot ask the auth service at {url} which headers the rules set ({exc}); "
            "start `l402proxy serve-auth` first, or give --rules"
        ) from None
    if not isinstance(info, dict):
        info = {}
    names = info.get("set_headers")
    if info.get("config_version") != CONFIG_VERSION or not isinstance(names, list):
        raise ConfigProblem(f"{url} is not an l402proxy serve-auth of this version")
    return [str(name) for name in names]
