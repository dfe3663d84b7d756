"""The mitmproxy server addon: a Lightning paywall in front of an origin.

    mitmdump --mode reverse:http://127.0.0.1:8080 -s addons/server.py \
        --set l402_rules=rules/podcast.yaml

Glue only: decisions live in gate.py, the protocol in l402/, state in store/ and lightning/.
"""

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import ctx, http

from . import gate, paths, paywall
from .l402.headers import Credential, accepts_l402, format_challenge
from .l402.identifier import Identifier
from .l402.token import TokenError, caveats_for, derive_root_key, mint
from .lightning import InvoiceBackend, LightningError, open_backend
from .lightning.base import InvoiceNotFound, LookupUnsupported, NodeInfo
from .options import OptionGuard
from .rules import (
    PRICED_MODES,
    AmbiguousPath,
    PaidVariant,
    PathError,
    Rule,
    RulesError,
    RuleSet,
    load_rules,
    normalize_path,
    rule_warnings,
)
from .store import IssuedToken, ServerStore, StoreError, open_server_store
from .upstream import DEFAULT_TIMEOUT, UpstreamGuard, upstream_timeout_problem

log = logging.getLogger(__name__)

RULES_POLL_SECONDS = 1.0
REVOCATION_POLL_SECONDS = 1.0
FLUSH_SECONDS = 0.25
RETRY_AFTER_SECONDS = 10
BACKEND_CHECK_SECONDS = 15.0
SEEN_PAID_LIMIT = 100_000


def file_signature(path: str) -> tuple[int, int] | None:
    """What tells us a rules file changed: (mtime_ns, size); None if it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def apply_paid_variant(request: http.Request, paid: PaidVariant) -> None:
    """Turn the request into the one for the paid content: other path, origin or headers."""
    if paid.rewrite is not None:
        request.path = paid.apply_path(request.path)
    if paid.upstream is not None:
        target = urlsplit(paid.upstream)
        request.scheme = target.scheme
        request.host = target.hostname or request.host
        request.port = target.port or (443 if target.scheme == "https" else 80)
    for name, value in paid.set_headers.items():
        request.headers[name] = value


def prices_out_of_range(rules: RuleSet | None, node: NodeInfo | None) -> list[str]:
    """Priced services the backend cannot invoice for (a Lightning Address's min/max)."""
    if rules is None or node is None or node.invoice_range_msat is None:
        return []
    low, high = node.invoice_range_msat
    return [
        f"service '{rule.name}' (line {rule.line}) costs {rule.price_sat} sat, but "
        f"{node.backend} at {node.address} accepts {low / 1000:g} to {high / 1000:g} sat"
        for rule in rules.rules
        if rule.mode in PRICED_MODES and not low <= rule.price_sat * 1000 <= high
    ]


def warn_about_rules(rules: RuleSet) -> None:
    for warning in rule_warnings(rules):
        log.warning(f"l402: {rules.source}: {warning}")


def challenge_body(
    rule: Rule, status: int, reason: str, detail: str, bolt11: str, macaroon: str, expires_at: float
) -> dict[str, Any]:
    return {
        "error": "payment_required" if status == 402 else "invalid_token",
        "reason": reason,
        "message": detail,
        "service": rule.name,
        "description": rule.description,
        "price_sat": rule.price_sat,
        "valid_for": rule.valid_for,
        "invoice": bolt11,
        "macaroon": macaroon,
        "invoice_expires_at": int(expires_at),
        "how_to_pay": (
            "Pay the invoice with a Lightning wallet, then repeat the request with the header "
            "'Authorization: L402 <macaroon>:<preimage hex>'."
        ),
    }


def challenge_text(body: Mapping[str, Any]) -> str:
    valid = body["valid_for"]
    lifetime = "for good" if valid is None else f"for {valid} seconds"
    return (
        f"{'402 Payment Required' if body['error'] == 'payment_required' else '401 Unauthorized'}"
        f"\n\n{body['description']}: {body['price_sat']} sat ({body['message']}).\n"
        f"Paying unlocks '{body['service']}' {lifetime}.\n\n"
        f"Lightning invoice:\n{body['invoice']}\n\n"
        f"Macaroon:\n{body['macaroon']}\n\n{body['how_to_pay']}\n"
    )


def make_challenge_response(
    status: int,
    body: Mapping[str, Any],
    kind: paywall.BodyKind,
    macaroon: str,
    bolt11: str,
    page: str | None = None,
) -> http.Response:
    """The 402/401 with both challenge lines; the body as JSON, text or the HTML `page`."""
    extra: list[tuple[bytes, bytes]] = []
    if kind == "html" and page is not None:
        content, content_type = page.encode(), "text/html; charset=utf-8"
        extra = [(name.encode(), value.encode()) for name, value in paywall.PAGE_HEADERS]
    elif kind == "text":
        content, content_type = challenge_text(body).encode(), "text/plain; charset=utf-8"
    else:
        content, content_type = json.dumps(body).encode(), "application/json"
    # LSAT first: old clients read only the first WWW-Authenticate line and only macaroon=.
    headers = http.Headers(
        [
            (b"WWW-Authenticate", format_challenge("LSAT", macaroon, bolt11).encode()),
            (
                b"WWW-Authenticate",
                format_challenge("L402", macaroon, bolt11, spec_params=True).encode(),
            ),
            (b"Cache-Control", b"no-store"),
            (b"Content-Type", content_type.encode()),
            *extra,
        ]
    )
    return http.Response.make(status, content, headers)


def json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> http.Response:
    """An answer of the proxy's own endpoints: JSON, never cached."""
    return http.Response.make(
        status,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
    )


def page_response(status: int, title: str, message: str) -> http.Response:
    return http.Response.make(
        status,
        paywall.render_message_page(title, message).encode(),
        {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            **dict(paywall.PAGE_HEADERS),
        },
    )


def unavailable_response(message: str) -> http.Response:
    return http.Response.make(
        503,
        f"Payment is unavailable right now: {message}\nPlease try again shortly.\n".encode(),
        {
            "Retry-After": str(RETRY_AFTER_SECONDS),
            "Cache-Control": "no-store",
            "Content-Type": "text/plain; charset=utf-8",
        },
    )


def not_found_response() -> http.Response:
    """A path only a paid rewrite may reach (mode: deny): as if it did not exist."""
    return http.Response.make(
        404,
        b"Not found.\n",
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    )


def bad_path_response(problem: PathError) -> http.Response:
    """A path the proxy cannot judge: origins may read it as a place the rules price otherwise,
    or it is no well-formed path. Never forwarded, and no invoice is made for it."""
    return bad_request_response(str(problem))


def bad_request_response(message: str) -> http.Response:
    """400, one plain line: a request the paywall will not judge or forward."""
    return http.Response.make(
        400,
        f"{message}\n".encode(),
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    )


# gate.L402_SCHEMES as the raw header bytes are compared: one list of our schemes.
_OUR_SCHEMES = frozenset(scheme.lower().encode() for scheme in gate.L402_SCHEMES)


def is_our_authorization(value: bytes) -> bool:
    """An Authorization value in our schemes (L402, LSAT; any case): a credential of ours."""
    parts = value.split(None, 1)
    return bool(parts) and parts[0].lower() in _OUR_SCHEMES


def drop_our_authorization(headers: http.Headers) -> None:
    """Remove every Authorization field in our schemes; other schemes (Basic, Bearer) are the
    origin's and stay. One pass over the raw fields: mitmproxy's header lookups cost
    microseconds each."""
    fields = headers.fields
    kept = tuple(
        field
        for field in fields
        if field[0].lower() != b"authorization" or not is_our_authorization(field[1])
    )
    if len(kept) != len(fields):
        headers.fields = kept


def headers_only_for_head(response: http.Response, method: str) -> http.Response:
    """A response to HEAD must not carry a body: a keep-alive client would read it as the next
    response. Content-Length still tells what a GET would get."""
    # Only a body is taken away, so a second call keeps the length the first one kept.
    if method.upper() == "HEAD" and response.raw_content:
        length = len(response.raw_content)
        response.content = b""
        response.headers["Content-Length"] = str(length)
    return response


# What decides between a priced URL's free and paid answers.
VARIANT_VARY = ("Authorization", "Cookie", "Accept-Authenticate")
# Directives that let a shared cache keep an answer for everyone.
_SHARED_CACHE_DIRECTIVES = ("public", "s-maxage")


_VARY_FIELD = (b"Vary", ", ".join(VARIANT_VARY).encode())
_VARY_ACCEPT_FIELD = (b"Vary", ", ".join((*VARIANT_VARY, "Accept")).encode())
_PRIVATE_FIELD = (b"Cache-Control", b"private")


def mark_variant(headers: http.Headers, *, paid: bool, by_accept: bool = False) -> None:
    """Tell caches that a priced URL's answer depends on who asks, so a browser that just paid
    does not replay its cached free copy, and a shared cache never hands a paid answer (bought
    with a cookie, which shared caches do store) to someone else."""
    # On every paid response: one pass over the raw fields when the origin set neither header
    # (mitmproxy's header lookups cost microseconds each).
    names = {name.lower() for name, _ in headers.fields}
    if b"vary" not in names and (not paid or b"cache-control" not in names):
        added = [_VARY_ACCEPT_FIELD if by_accept else _VARY_FIELD]
        if paid:
            added.append(_PRIVATE_FIELD)
        headers.fields = (*headers.fields, *added)
        return
    vary = [v.strip() for v in headers.get("Vary", "").split(",") if v.strip()]
    if "*" not in vary:
        have = {v.lower() for v in vary}
        wanted = (*VARIANT_VARY, "Accept") if by_accept else VARIANT_VARY
        vary += [v for v in wanted if v.lower() not in have]
        headers["Vary"] = ", ".join(vary)
    if paid:
        directives = [
            d.strip()
            for d in headers.get("Cache-Control", "").split(",")
            if d.strip() and d.split("=", 1)[0].strip().lower() not in _SHARED_CACHE_DIRECTIVES
        ]
        if not any(d.lower() in ("private", "no-store") for d in directives):
            directives.insert(0, "private")
        headers["Cache-Control"] = ", ".join(directives)


@dataclass(frozen=True)
class WatchedHeaders:
    """The request headers the paywall reads on every request, found in one pass over the
    raw fields (each mitmproxy header lookup costs a microsecond or more)."""

    authorization: str | None
    accept_authenticate: str | None
    cookie: bool
    hosts: tuple[bytes, ...] = ()
    upgrade: bool = False

    @classmethod
    def of(cls, headers: http.Headers) -> "WatchedHeaders":
        authorization: list[bytes] = []
        accept: list[bytes] = []
        hosts: list[bytes] = []
        cookie = upgrade = False
        for name, value in headers.fields:
            lower = name.lower()
            if lower == b"authorization":
                authorization.append(value)
            elif lower == b"accept-authenticate":
                accept.append(value)
            elif lower == b"cookie":
                cookie = True
            elif lower == b"host":
                hosts.append(value)
            elif lower == b"upgrade":
                upgrade = True
        # Several lines of one header read as one list, as mitmproxy's headers.get() has them.
        return cls(_joined(authorization), _joined(accept), cookie, tuple(hosts), upgrade)


def check_target(request: http.Request, hosts: Sequence[bytes], keep_host: bool) -> str | None:
    """Why the host the paywall judges by may not be the one the origin routes by, if it may;
    None when it is, after turning an HTTP/1 absolute-form target into origin form.

    An HTTP/1 request line in absolute form (`GET http://paid.example/x`) names its own host, and
    RFC 9112 tells the origin to ignore Host then; two Host fields leave the choice to the origin.
    Rules are matched on Host, so either could open a host-scoped service at the price of another.
    """
    if len(hosts) > 1:
        return "Bad request: more than one Host header."
    authority = request.data.authority
    if not authority:
        return None
    host = hosts[0] if hosts else b""
    if request.is_http2 or request.is_http3:
        # :authority is h2's Host; a Host field beside it must say the same.
        if host and host.lower() != authority.lower():
            return "Bad request: the Host header and :authority name different hosts."
        return None
    if keep_host and host.lower() != authority.lower():
        return "Bad request: the request target names another host than the Host header."
    # Forwarded in origin form, so the origin routes by the Host the rules were matched on
    # (mitmproxy does the same in regular mode: some servers do not take absolute form).
    request.authority = ""
    return None


def drop_upgrade(headers: http.Headers) -> None:
    """Remove an Upgrade to anything but WebSocket (h2c, above all), with its Connection tokens
    and HTTP2-Settings. After a 101 mitmproxy tunnels the connection's raw bytes: the requests
    sent through it would never be judged. mitmproxy's own disable_h2c strips only a lower-case
    `h2c`; origins accept `H2C` too."""
    upgrade = [v.strip().lower() for v in headers.get("Upgrade", "").split(",") if v.strip()]
    if upgrade and all(token == "websocket" for token in upgrade):
        return
    for name in ("Upgrade", "HTTP2-Settings"):
        headers.pop(name, None)
    connection = [
        token.strip()
        for token in headers.get("Connection", "").split(",")
        if token.strip() and token.strip().lower() not in ("upgrade", "http2-settings")
    ]
    if connection:
        headers["Connection"] = ", ".join(connection)
    else:
        headers.pop("Connection", None)


def _joined(values: list[bytes]) -> str | None:
    if not values:
        return None
    return b", ".join(values).decode("utf-8", "surrogateescape")


def is_https(flow: http.HTTPFlow) -> bool:
    """Did the browser reach us over TLS (then our cookies are Secure)?"""
    return bool(flow.client_conn.tls_established)


def take_our_cookies(request: http.Request) -> dict[str, str]:
    """Remove our cookies from the request (the origin's stay as they were); return ours."""
    kept, found = paywall.split_cookies(request.headers.get_all("cookie"))
    if found:
        if kept:
            request.headers.set_all("cookie", kept)
        else:
            del request.headers["cookie"]
    return found


def offer_upgrade(response: http.Response, banner: str) -> None:
    """Put the upgrade offer into a free HTML page; anything we cannot read is left alone."""
    if response.status_code != 200 or response.stream or response.raw_content is None:
        return
    if not response.headers.get("Content-Type", "").lower().startswith("text/html"):
        return
    try:
        text = response.get_text(strict=True)
    except ValueError:  # an encoding or charset we cannot decode
        return
    if text is None:
        return
    response.text = paywall.insert_banner(text, banner)


class L402Server:
    def __init__(self) -> None:
        self.rules: RuleSet | None = None
        self.rules_signature: tuple[int, int] | None = None
        self.backend: InvoiceBackend | None = None
        self.backend_source: tuple[str, str] | None = None
        # What the backend said it is at start (its invoice limits are checked against rules).
        self.node: NodeInfo | None = None
        self.store: ServerStore | None = None
        self.secret: bytes = b""
        self.revoked: set[bytes] = set()
        self.revocation_cursor = 0
        self.cache = gate.TokenCache()
        self.seen_paid: set[bytes] = set()
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closing: set[asyncio.Task[None]] = set()
        self.started = False
        # option -> why its value was refused at startup; while any is set, nothing is forwarded.
        self.misconfigured: dict[str, str] = {}

    def load(self, loader: Any) -> None:
        # The shared option lifecycle (options.py); it fills the dict request() checks.
        self.guard = OptionGuard("server", self.misconfigured)
        loader.add_option(
            "l402_rules",
            str,
            "",
            """
            Path of the YAML rules file: which requests are priced, how much, and what paying
            unlocks. Required: without it the proxy does not start. Edits are picked up while
            running; a broken edit keeps the previous rules.
            """,
        )
        loader.add_option(
            "l402_backend",
            str,
            "dev",
            """
            Where invoices come from, as a URI: lnd://host:port?cert=<file>&macaroon=<file>,
            lndconnect://..., cln:///path/to/lightning-rpc, eclair://:<password>@host:port,
            lnbits://host?key=<invoice key>, or a Lightning Address user@domain. "dev" (default)
            is the embedded dev ledger, for demos and tests only; "dev:<wallet>" credits another
            dev wallet. Checked at start; cannot change while running.
            """,
        )
        loader.add_option(
            "l402_store",
            str,
            "",
            """
            Where issued tokens, revocations and the token secret live: a SQLite path or a
            sqlite:/// URI. Default: server.sqlite under $L402PROXY_HOME or ~/.l402proxy.
            """,
        )
        loader.add_option(
            "l402_dev_ledger",
            str,
            "",
            """
            Path of the dev Lightning ledger (SQLite) used by the "dev" backend.
            Default: devledger.sqlite under $L402PROXY_HOME or ~/.l402proxy, the same file the
            l402proxy CLI's dev commands use.
            """,
        )
        loader.add_option(
            "l402_offer_upgrade",
            bool,
            True,
            """
            In upgrade mode, add a small "<description> for <price> sats" link to the free
            variant's HTML pages that browsers get, leading to the paywall page.
            """,
        )
        loader.add_option(
            "l402_upstream_timeout",
            int,
            DEFAULT_TIMEOUT,
            """
            Seconds the origin has to start answering a forwarded request (connecting, then
            its response headers); past that the client gets a 504. 0 waits for ever.
            """,
        )
        self.guard.take_deferred(loader)

    def configure(self, updated: set[str]) -> None:
        with self.guard.configuring(updated):
            if "l402_rules" in updated:
                try:
                    rules = self._load_rules_option()
                    problems = prices_out_of_range(rules, self.node)
                    if problems:
                        raise RulesError("; ".join(problems))
                except RulesError as exc:
                    self._refuse("l402_rules", str(exc))
                else:
                    self.rules = rules
                    self.guard.accept("l402_rules")
            if "l402_backend" in updated or "l402_dev_ledger" in updated:
                self._configure_backend(
                    "l402_backend" if "l402_backend" in updated else "l402_dev_ledger"
                )
            self._configure_upstream(updated)
            self._configure_streaming(updated)
            self._check_host_rules(updated)

    def _check_host_rules(self, updated: set[str]) -> None:
        """In reverse mode mitmproxy puts the origin's name into Host before any addon sees
        the request unless keep_host_header is on; a `match.host` rule would then never match,
        and what it prices would be served free. Refused, at start and while running."""
        if not updated & {"l402_rules", "keep_host_header", "mode"} or self.rules is None:
            return
        modes = getattr(ctx.options, "mode", ())
        reverse = any(str(mode).startswith("reverse") for mode in modes)
        if not reverse or getattr(ctx.options, "keep_host_header", True):
            return
        hosted = [rule for rule in self.rules.rules if rule.host is not None]
        if hosted:
            rule = hosted[0]
            self._refuse(
                "l402_rules" if "l402_rules" in updated else "keep_host_header",
                f"service '{rule.name}' (line {rule.line}) matches host:, but in reverse mode "
                "mitmproxy replaces Host with the origin's name: add --set keep_host_header=true",
            )

    def _configure_streaming(self, updated: set[str]) -> None:
        """mitmproxy's stream_large_bodies sends a large request body (a POST to a priced API)
        on to the origin before the `request` hook, where the paywall judges: the request would
        reach the origin unpaid. Refused, at start and while running."""
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            self._refuse(
                "stream_large_bodies",
                "not with the paywall: mitmproxy would send a large request body to the origin "
                "before the paywall has judged the request; leave it unset",
            )

    def _configure_upstream(self, updated: set[str]) -> None:
        """l402_upstream_timeout, and the connection strategy the paywall needs (upstream.py)."""
        if "l402_upstream_timeout" in updated:
            value = ctx.options.l402_upstream_timeout
            problem = upstream_timeout_problem(value)
            if problem is not None:
                self._refuse("l402_upstream_timeout", problem)
            else:
                self.upstream.timeout = value
                self.guard.accept("l402_upstream_timeout")
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # With mitmproxy's default "eager", reverse mode connects to the origin before it
            # reads a request, and drops the client when that fails: no 402 (which never needs
            # the origin) and no error, only a closed connection. "lazy" connects when a request
            # is forwarded, so an origin that is down costs only forwarded requests, with a 502.
            if self.started:
                self._refuse("connection_strategy", "the paywall needs lazy (see the log at start)")
            # Debug, not info: at start it is the default's fate on every run, not news (and a
            # refused option's error line must stay the last thing logged).
            log.debug(
                "l402: connection_strategy set to lazy: a 402 never needs the origin, and a "
                "client of an origin that is down gets a 502, not a dropped connection"
            )
            ctx.options.update(connection_strategy="lazy")

    @functools.cached_property
    def upstream(self) -> UpstreamGuard:
        """502 and 504 answers for a failing origin, and the upstream deadline (upstream.py)."""
        return UpstreamGuard()

    @functools.cached_property
    def addons(self) -> list[Any]:
        """Child addons: mitmproxy runs their hooks after this one's, so the upstream guard sees
        only what the paywall forwards."""
        return [self.upstream]

    def _configure_backend(self, option: str) -> None:
        source = (ctx.options.l402_backend, self.dev_ledger_path)
        if self.backend is not None and source == self.backend_source:
            return  # mitmproxy re-applying the value in use after a refused change
        try:
            backend = open_backend(ctx.options.l402_backend, dev_ledger=self.dev_ledger_path)
        except LightningError as exc:
            self._refuse("l402_backend", str(exc))
            return
        if self.started:
            # A backend is checked (who it is, whether it may make invoices) only at start;
            # swapping in an unchecked one would answer 503 to every priced request.
            self._refuse(
                option,
                "cannot change while running: restart mitmproxy with the new value "
                "(the backend is checked at start)",
            )
            return
        self.guard.accept("l402_backend")
        previous, self.backend = self.backend, backend
        self.backend_source = source
        if previous is not None:
            self._close_later(previous)

    def _refuse(self, option: str, problem: str) -> None:
        """Reject a bad option value: an OptionsError while running (the previous value stays);
        at startup one error line, and mitmproxy stops (see options.py)."""
        self.guard.refuse(option, problem, running=self.started)

    def _close_later(self, backend: InvoiceBackend) -> None:
        """configure() is sync; a replaced backend's connection is closed on the event loop."""
        try:
            task = asyncio.get_running_loop().create_task(backend.close())
        except RuntimeError:  # no loop yet: nothing was opened either
            return
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    def _load_rules_option(self) -> RuleSet:
        path = ctx.options.l402_rules
        if not path:
            # Without rules nothing is priced: a paywall that gives everything away.
            raise RulesError(
                "not set: give the rules file, --set l402_rules=<file> (see rules/*.yaml)"
            )
        rules = load_rules(path)
        self.rules_signature = file_signature(path)
        log.info(f"l402: {len(rules.rules)} priced service(s) from {path}")
        warn_about_rules(rules)
        return rules

    @property
    def dev_ledger_path(self) -> str:
        return ctx.options.l402_dev_ledger or paths.default_dev_ledger()

    @property
    def store_uri(self) -> str:
        return ctx.options.l402_store or paths.default_server_store()

    async def running(self) -> None:
        try:
            self.store = await open_server_store(self.store_uri)
            self.secret = await self.store.secret()
            self.revocation_cursor, self.revoked = await self.store.revocations_since(0)
        except (StoreError, OSError) as exc:
            # An error logged during startup makes mitmdump exit instead of running half-configured.
            log.error(f"l402: cannot open token store {self.store_uri}: {exc}")
            return
        if self.backend is not None:
            try:
                node = await asyncio.wait_for(self.backend.info(), BACKEND_CHECK_SECONDS)
            except (LightningError, TimeoutError) as exc:
                # Refuse to start rather than answer every priced request with a 503.
                why = str(exc) or f"no answer within {BACKEND_CHECK_SECONDS:g} s"
                log.error(f"l402: cannot use the invoice backend {self.backend.describe()}: {why}")
                return
            log.info(f"l402: invoices from {node.summary()} ({self.backend.describe()})")
            problems = prices_out_of_range(self.rules, node)
            for problem in problems:
                log.error(f"l402: l402_rules: {problem}")
            if problems:
                return  # every 402 for those services would be a 503
            self.node = node
        self.tasks = [
            asyncio.create_task(self._every(FLUSH_SECONDS, self._flush)),
            asyncio.create_task(self._every(REVOCATION_POLL_SECONDS, self._poll_revocations)),
            asyncio.create_task(self._every(RULES_POLL_SECONDS, self._reload_rules_if_changed)),
        ]
        self.started = True
        # The store is opened only here: another one needs a restart.
        self.guard.pin("l402_store")
        self.ready.set()

    async def done(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        if self.backend is not None:
            await self.backend.close()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if self.misconfigured:
            # We cannot tell priced from free without our configuration: forward nothing.
            flow.response = headers_only_for_head(
                unavailable_response("the paywall is misconfigured"), flow.request.method
            )
            return
        request = flow.request
        if paywall.is_endpoint(request.path):
            await self._endpoint(flow)
            return
        seen = WatchedHeaders.of(request.headers)
        if seen.upgrade:
            drop_upgrade(request.headers)
        problem = check_target(
            request, seen.hosts, bool(getattr(ctx.options, "keep_host_header", False))
        )
        if problem is not None:
            flow.response = headers_only_for_head(bad_request_response(problem), request.method)
            flow.metadata["l402"] = {"variant": "refused", "reason": "target"}
            return
        # Our credentials (cookies, L402/LSAT Authorization) never reach the origin, whatever
        # the path: a token sent to a free path, to one no rule covers or with no rules at all
        # would otherwise leak to whoever runs or logs that origin. `seen` keeps what we read.
        if seen.authorization is not None:
            drop_our_authorization(request.headers)
        cookies = take_our_cookies(request) if seen.cookie else {}
        if self.rules is None:
            return
        try:
            rule = self.rules.match(request.pretty_host, request.path, request.method)
        except PathError as exc:
            # Origins may read the path as a place priced otherwise (`/free/..%2Fpaid/x`), or
            # it is not a path at all: refuse before any invoice, never forward.
            flow.response = headers_only_for_head(bad_path_response(exc), request.method)
            flow.metadata["l402"] = {"variant": "refused", "reason": type(exc).__name__}
            return
        if rule is None:
            return
        if not self.ready.is_set():
            await self.ready.wait()
        try:
            await self._judge(flow, rule, seen, cookies)
        except Exception:
            # Fail closed: forwarding a priced request we could not judge would give it away.
            log.exception(f"l402: internal error on {request.method} {request.path}")
            flow.response = headers_only_for_head(
                unavailable_response("internal error in the paywall"), request.method
            )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A 101 to anything but WebSocket would turn the connection into a raw tunnel past the
        paywall (see drop_upgrade, which should have kept it from being asked for)."""
        response = flow.response
        if response is not None and response.status_code == 101:
            upgrade = response.headers.get("Upgrade", "").strip().lower()
            if upgrade != "websocket":
                log.warning(f"l402: refused the origin's switch to {upgrade or 'another protocol'}")
                flow.kill()

    def response(self, flow: http.HTTPFlow) -> None:
        note = flow.metadata.get("l402")
        if note is None or flow.response is None:
            return
        variant = note.get("variant")
        if variant == "paid":
            mark_variant(flow.response.headers, paid=True)
            return
        if variant != "free":
            return
        offer = note.get("offer")
        mark_variant(flow.response.headers, paid=False, by_accept=bool(offer))
        for cookie in note.get("clear_cookies", ()):
            flow.response.headers.add("Set-Cookie", cookie)
        if offer and ctx.options.l402_offer_upgrade and flow.request.method.upper() != "HEAD":
            offer_upgrade(flow.response, offer)

    async def _judge(
        self,
        flow: http.HTTPFlow,
        rule: Rule,
        seen: WatchedHeaders,
        cookies: Mapping[str, str] | None = None,
    ) -> None:
        request = flow.request
        authorization = seen.authorization
        cookie = cookies.get(paywall.cookie_name(rule.name)) if cookies else None
        # An Authorization header wins; the cookie is the same credential a browser keeps.
        from_cookie = cookie is not None and not gate.is_l402_authorization(authorization)
        if from_cookie:
            authorization = f"L402 {cookie}"
        decision = gate.decide(
            rule=rule,
            authorization=authorization,
            accept_authenticate=seen.accept_authenticate,
            root_key_for=self.root_key_for,
            revoked=self.revoked,
            now=time.time(),
            method=request.method,
            cache=self.cache,
        )
        clear_cookies: list[str] = []
        if from_cookie and isinstance(decision, gate.Challenge):
            # The browser would send it again and again: make it forget it.
            clear_cookies = paywall.clearing_cookies(
                rule.name, path=paywall.scope_path(rule), secure=is_https(flow)
            )
            if rule.mode == "upgrade" and not accepts_l402(seen.accept_authenticate):
                # Upgrade mode keeps unpaid browsers on the free variant: a stale cookie is no
                # request to pay (an <audio> fetch would only break on a 402).
                decision = gate.Free(rule)
        match decision:
            case gate.Deny():
                flow.response = headers_only_for_head(not_found_response(), request.method)
                flow.metadata["l402"] = {"service": rule.name, "variant": "denied"}
            case gate.Grant():
                self._grant(flow, decision, from_cookie=from_cookie)
            case gate.Challenge():
                await self._challenge(flow, decision, set_cookies=clear_cookies)
            case gate.Free():
                note: dict[str, Any] = {"service": rule.name, "variant": "free"}
                if clear_cookies:
                    note["clear_cookies"] = clear_cookies
                if (
                    rule.mode == "upgrade"
                    and ctx.options.l402_offer_upgrade
                    and paywall.body_kind(request.headers.get("Accept")) == "html"
                ):
                    note["offer"] = paywall.upgrade_banner(rule, request.path)
                flow.metadata["l402"] = note

    def root_key_for(self, token_id: bytes) -> bytes:
        return derive_root_key(self.secret, token_id)

    def _grant(self, flow: http.HTTPFlow, grant: gate.Grant, from_cookie: bool = False) -> None:
        # The credential that paid is already off the request: `request` drops every L402/LSAT
        # Authorization field and our cookies; any other Authorization belongs to the origin.
        apply_paid_variant(flow.request, grant.rule.paid)
        token_id = grant.token.identifier.token_id
        flow.metadata["l402"] = {
            "service": grant.rule.name,
            "variant": "paid",
            "token_id": token_id.hex(),
        }
        if from_cookie:
            flow.metadata["l402"]["credential"] = "cookie"
        flow.comment = f"L402 paid: {grant.rule.name}"
        self._note_paid(token_id)

    def _note_paid(self, token_id: bytes) -> None:
        if token_id not in self.seen_paid and self.store is not None:
            if len(self.seen_paid) >= SEEN_PAID_LIMIT:
                # Forgetting only costs a repeated note; the store keeps the first sighting.
                self.seen_paid.clear()
            self.seen_paid.add(token_id)
            self.store.note_paid(token_id, time.time())

    async def _challenge(
        self,
        flow: http.HTTPFlow,
        challenge: gate.Challenge,
        *,
        return_to: str | None = None,
        set_cookies: Sequence[str] = (),
        kind: paywall.BodyKind | None = None,
    ) -> None:
        rule = challenge.rule
        assert self.backend is not None and self.store is not None
        try:
            invoice = await self.backend.create_invoice(
                rule.price_sat, f"{rule.name}: {rule.description}", rule.invoice_expiry
            )
        except LightningError as exc:
            log.warning(f"l402: cannot create an invoice for {rule.name}: {exc}")
            flow.response = headers_only_for_head(
                unavailable_response("the Lightning backend did not answer"), flow.request.method
            )
            return
        now = time.time()
        identifier = Identifier.new(invoice.payment_hash)
        # Counted from the last moment the invoice can be paid: paying late never buys a token
        # that is already expired (or has less than valid_for left).
        valid_until = (
            None if rule.valid_for is None else int(now) + rule.invoice_expiry + rule.valid_for
        )
        macaroon = mint(
            self.root_key_for(identifier.token_id),
            identifier,
            caveats_for(rule.name, valid_until=valid_until, capabilities=rule.capabilities),
        )
        self.store.note_issued(
            IssuedToken(
                token_id=identifier.token_id,
                payment_hash=invoice.payment_hash,
                service=rule.name,
                price_sat=rule.price_sat,
                created_at=now,
                valid_until=valid_until,
                paid_at=None,
                revoked_at=None,
            )
        )
        body = challenge_body(
            rule,
            challenge.status,
            challenge.reason,
            challenge.detail,
            invoice.bolt11,
            macaroon,
            invoice.expires_at,
        )
        if kind is None:
            kind = paywall.body_kind(flow.request.headers.get("Accept"))
        page = None
        if kind == "html":
            page = paywall.render_page(
                paywall.PageFacts(
                    service=rule.name,
                    description=rule.description,
                    price_sat=rule.price_sat,
                    valid_for=rule.valid_for,
                    scope=paywall.scope_path(rule),
                    bolt11=invoice.bolt11,
                    macaroon=macaroon,
                    expires_at=invoice.expires_at,
                    now=now,
                    status=challenge.status,
                    reason=challenge.reason,
                    return_to=return_to,
                )
            )
        response = make_challenge_response(
            challenge.status, body, kind, macaroon, invoice.bolt11, page
        )
        for cookie in set_cookies:
            response.headers.add("Set-Cookie", cookie)
        if kind == "html":
            # Only this browser may later collect the token by the invoice being paid.
            claim_age = int(invoice.expires_at - now) + paywall.CLAIM_GRACE_SECONDS
            response.headers.add(
                "Set-Cookie",
                paywall.claim_cookie(
                    self.secret, identifier.token_id, max_age=claim_age, secure=is_https(flow)
                ),
            )
        flow.response = headers_only_for_head(response, flow.request.method)
        flow.metadata["l402"] = {
            "service": rule.name,
            "variant": "challenge",
            "status": challenge.status,
            "reason": challenge.reason,
        }

    # -- the paywall page's own endpoints (never forwarded) ------------------------------------

    async def _endpoint(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        path = normalize_path(request.path)
        if not self.ready.is_set():
            await self.ready.wait()
        try:
            if path == paywall.UNLOCK_PATH:
                if request.method.upper() != "POST":
                    flow.response = json_response(
                        405,
                        {"error": "method_not_allowed", "message": "use POST"},
                        {"Allow": "POST"},
                    )
                else:
                    await self._unlock(flow)
            elif path == paywall.PAY_PATH:
                if request.method.upper() not in ("GET", "HEAD"):
                    flow.response = page_response(405, "Method not allowed", "Use GET.")
                    flow.response.headers["Allow"] = "GET, HEAD"
                else:
                    await self._pay_page(flow)
            else:
                flow.response = page_response(404, "Not found", "No such paywall page.")
        except Exception:
            log.exception(f"l402: internal error on {request.method} {paywall.ENDPOINT_PREFIX}")
            flow.response = unavailable_response("internal error in the paywall")
        assert flow.response is not None
        flow.response = headers_only_for_head(flow.response, request.method)
        flow.metadata.setdefault("l402", {"variant": "endpoint"})

    async def _unlock(self, flow: http.HTTPFlow) -> None:
        """POST /.l402/unlock: the page asks whether its invoice is paid; if so, the cookie."""
        request = flow.request
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            # Only the paywall page itself (same origin) may store a credential in this browser.
            flow.response = json_response(
                403, {"error": "cross_site", "message": "unlock requests must come from this site"}
            )
            return
        try:
            asked = paywall.parse_unlock_body(
                request.raw_content or b"", request.headers.get("Content-Type")
            )
        except paywall.BadUnlockRequest as exc:
            flow.response = json_response(exc.status, {"error": "bad_request", "message": str(exc)})
            return
        try:
            # Signature first: a forged or foreign macaroon never costs a backend lookup.
            identifier, info = paywall.verify_signature(asked.macaroon, self.root_key_for)
        except TokenError as exc:
            flow.response = json_response(
                401,
                {
                    "error": "invalid_token",
                    "reason": exc.reason,
                    "message": "This payment request was not issued here: reload for a new one.",
                },
            )
            return
        rule = self._rule_named(info.services)
        if rule is None:
            flow.response = json_response(
                404,
                {
                    "error": "unknown_service",
                    "message": "What this invoice paid for is no longer sold here.",
                },
            )
            return
        flow.metadata["l402"] = {"service": rule.name, "variant": "unlock", "unlocked": False}
        if identifier.token_id in self.revoked:
            flow.response = json_response(
                403,
                {"error": "refused", "reason": "revoked", "message": "This token was revoked."},
            )
            return
        preimage = asked.preimage
        if preimage is None and not paywall.holds_claim(
            request.headers.get_all("cookie"), self.secret, identifier.token_id
        ):
            flow.response = json_response(
                403,
                {
                    "error": "not_this_browser",
                    "message": (
                        "Only the browser this invoice was shown to can open it without the "
                        "payment's preimage."
                    ),
                },
            )
            return
        if preimage is None:
            assert self.backend is not None
            try:
                state = await self.backend.lookup_invoice(identifier.payment_hash)
            except LookupUnsupported:
                flow.response = json_response(
                    501,
                    {
                        "error": "lookup_unsupported",
                        "message": (
                            "This paywall cannot see QR payments: pay with a WebLN wallet."
                        ),
                    },
                )
                return
            except InvoiceNotFound:
                flow.response = json_response(
                    404,
                    {
                        "error": "unknown_invoice",
                        "message": "The Lightning node does not know this invoice: reload.",
                    },
                )
                return
            except LightningError as exc:
                log.warning(f"l402: cannot look up an invoice for {rule.name}: {exc}")
                flow.response = json_response(
                    503,
                    {
                        "error": "backend_unavailable",
                        "message": "The Lightning node did not answer; trying again.",
                    },
                    {"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
                return
            if not state.settled or state.preimage is None:
                flow.response = json_response(202, {"unlocked": False})
                return
            preimage = state.preimage
        now = time.time()
        try:
            token = gate.check_credential(
                Credential("L402", (asked.macaroon,), preimage),
                service=rule.name,
                root_key_for=self.root_key_for,
                revoked=self.revoked,
                now=now,
            )
        except TokenError as exc:
            flow.response = json_response(
                401 if exc.invalid else 403,
                {"error": "refused", "reason": exc.reason, "message": f"Not unlocked: {exc}."},
            )
            return
        secure = is_https(flow)
        cookies = paywall.credential_cookies(
            rule.name,
            asked.macaroon,
            preimage,
            path=paywall.scope_path(rule),
            max_age=paywall.cookie_max_age(token.valid_until, now),
            secure=secure,
        )
        cookies.append(paywall.clearing_claim_cookie(identifier.token_id, secure=secure))
        expires_at = None if token.valid_until is None else int(token.valid_until)
        flow.response = json_response(
            200, {"unlocked": True, "service": rule.name, "expires_at": expires_at}
        )
        for cookie in cookies:
            flow.response.headers.add("Set-Cookie", cookie)
        flow.metadata["l402"]["unlocked"] = True
        flow.comment = f"L402 unlocked: {rule.name}"
        self._note_paid(token.identifier.token_id)

    def _rule_named(self, services: Sequence[str]) -> Rule | None:
        """The priced rule a token was sold for (its services= caveat names it)."""
        if self.rules is None:
            return None
        for rule in self.rules.rules:
            if rule.name in services and rule.mode in PRICED_MODES:
                return rule
        return None

    async def _pay_page(self, flow: http.HTTPFlow) -> None:
        """GET /.l402/pay?path=<priced path>[&return=<local path>]: a fresh paywall page."""
        request = flow.request
        target = paywall.safe_local_path(request.query.get("path"))
        rule = None
        if target is not None and self.rules is not None:
            try:
                rule = self.rules.match(request.pretty_host, target, "GET")
            except PathError as exc:
                # The same judgement as the request itself would get: nothing sold for it.
                title = "Ambiguous address" if isinstance(exc, AmbiguousPath) else "Bad address"
                flow.response = page_response(400, title, str(exc))
                return
        if target is None or rule is None or rule.mode not in PRICED_MODES:
            flow.response = page_response(
                404, "Nothing to pay for", "This site sells nothing at that address."
            )
            return
        return_to = paywall.safe_local_path(request.query.get("return")) or target
        cookies = take_our_cookies(request) if "cookie" in request.headers else {}
        cookie = cookies.get(paywall.cookie_name(rule.name))
        if cookie is not None:
            held = gate.decide(
                rule=rule,
                authorization=f"L402 {cookie}",
                accept_authenticate=None,
                root_key_for=self.root_key_for,
                revoked=self.revoked,
                now=time.time(),
                method="GET",
                cache=self.cache,
            )
            if isinstance(held, gate.Grant):
                # Already paid: nothing to sell twice.
                flow.response = http.Response.make(
                    303, b"", {"Location": return_to, "Cache-Control": "no-store"}
                )
                return
        accept = request.headers.get("Accept")
        kind = paywall.body_kind(accept)
        if kind == "json" and "application/json" not in (accept or "").lower():
            kind = "html"  # this address is linked from pages: the page unless JSON is asked for
        await self._challenge(
            flow,
            gate.Challenge(
                rule, 402, "payment_required", f"{rule.name} costs {rule.price_sat} sat"
            ),
            return_to=return_to,
            kind=kind,
        )
        flow.metadata.setdefault("l402", {})["endpoint"] = "pay"

    async def _every(self, seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except (
                Exception
            ) as exc:  # a background job must never die silently or take the proxy down
                log.warning(f"l402: background {job.__name__} failed: {exc}")

    async def _flush(self) -> None:
        assert self.store is not None
        await self.store.flush()

    async def _poll_revocations(self) -> None:
        assert self.store is not None
        self.revocation_cursor, new = await self.store.revocations_since(self.revocation_cursor)
        if new:
            self.revoked |= new
            log.info(f"l402: {len(new)} token(s) revoked")

    async def _reload_rules_if_changed(self) -> None:
        path = ctx.options.l402_rules
        if not path:
            return
        signature = await asyncio.to_thread(file_signature, path)
        if signature is None or signature == self.rules_signature:
            return
        self.rules_signature = signature
        try:
            rules = await asyncio.to_thread(load_rules, path)
        except RulesError as exc:
            # str(exc) is "<file>:<line>: ...": the file is named.
            log.warning(f"l402: kept the previous rules; the edited file is broken: {exc}")
            return
        except Exception as exc:
            # load_rules promises RulesError; should anything else come out of the thread it
            # is still one line naming the file, and the rules in force stay.
            problem = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            log.warning(
                f"l402: kept the previous rules; the edited file is broken: {path}: {problem}"
            )
            return
        problems = prices_out_of_range(rules, self.node)
        if problems:
            log.warning(
                f"l402: kept the previous rules; the edited file {path}: {'; '.join(problems)}"
            )
            return
        self.rules = rules
        warn_about_rules(rules)
        log.info(f"l402: reloaded {len(rules.rules)} priced service(s) from {Path(path)}")
