"""The mitmproxy door to the paywall engine (engine/): a Lightning paywall in front of an origin.

    mitmdump --mode reverse:http://127.0.0.1:8080 -s addons/server.py \
        --set l402_rules=rules/podcast.yaml

Only what is mitmproxy's lives here: the options and their lifecycle (options.py), flows turned
into engine requests and outcomes back into flows, and mitmproxy's own quirks (the connection
strategy, stream_large_bodies, absolute-form targets, 101 switches, the upstream guard).
Decisions live in gate.py, the paywall in engine/, the protocol in l402/.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import ctx, http
from mitmproxy.net.http import status_codes

from .. import gate, paths, paywall
from ..engine import Answer, Outcome, Paywall, Refused, Request, StartError, feeds, metering
from ..engine import answers as engine_answers
from ..engine import charges as engine_charges
from ..engine.metering import Metered
from ..engine.request import (
    Fields,
    WatchedHeaders,
    has,
    is_our_authorization,
    set_one,
    take_our_cookies,
)
from ..engine.request import (
    drop_our_authorization as drop_our_fields,
)
from ..engine.request import (
    drop_upgrade as drop_upgrade_fields,
)
from ..lightning import InvoiceBackend, LightningError
from ..lightning.base import NodeInfo
from ..ops import Operations, OpsError, OpsSettings
from ..options import OptionGuard
from ..rules import RulesError, RuleSet
from ..store import TokenStore
from ..upstream import DEFAULT_TIMEOUT, UpstreamGuard, upstream_timeout_problem

log = logging.getLogger(__name__)

__all__ = [
    "L402Server",
    "WatchedHeaders",
    "check_target",
    "drop_our_authorization",
    "drop_upgrade",
    "is_our_authorization",
    "mark_variant",
]


def drop_our_authorization(headers: http.Headers) -> None:
    """Remove every Authorization field in our schemes (engine.request), on mitmproxy headers."""
    fields = headers.fields
    kept = drop_our_fields(fields)
    if kept is not fields:
        headers.fields = kept


def drop_upgrade(headers: http.Headers) -> None:
    """Remove an Upgrade to anything but WebSocket (engine.request), on mitmproxy headers."""
    fields = headers.fields
    kept = drop_upgrade_fields(fields)
    if kept is not fields:
        headers.fields = kept


def mark_variant(
    headers: http.Headers, *, paid: bool, by_accept: bool = False, by_payment: bool = False
) -> None:
    """The engine's cache marking (engine.answers.mark_variant) on mitmproxy headers."""
    headers.fields = engine_answers.mark_variant(
        headers.fields, paid=paid, by_accept=by_accept, by_payment=by_payment
    )


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


# Why private feeds are off in reverse mode without keep_host_header.
FEEDS_NEED_HOST = (
    "in reverse mode mitmproxy replaces Host with the origin's name, and feed URLs must name "
    "the host players ask for: private feeds are off; add --set keep_host_header=true"
)


def host_replaced() -> bool:
    """Does mitmproxy put the origin's name into Host before the paywall sees a request (reverse
    mode without keep_host_header)? False outside a running mitmproxy."""
    try:
        options = ctx.options
        modes = getattr(options, "mode", ())
        keep = getattr(options, "keep_host_header", True)
    except AttributeError:  # no master: a door built outside mitmproxy
        return False
    return any(str(mode).startswith("reverse") for mode in modes) and not keep


def to_response(answer: Answer) -> http.Response:
    """The engine's answer as a mitmproxy response, byte for byte (Content-Length included)."""
    now = time.time()
    return http.Response(
        b"HTTP/1.1",
        answer.status,
        status_codes.RESPONSES.get(answer.status, "").encode(),
        http.Headers(answer.headers),
        answer.body,
        None,
        now,
        now,
    )


def offer_upgrade(response: http.Response, banner: str) -> None:
    """Put the upgrade offer into a free HTML page; anything we cannot read is left alone."""
    if response.stream or response.raw_content is None:
        return
    if not engine_answers.wants_banner(response.status_code, response.headers.fields):
        return
    try:
        text = response.get_text(strict=True)  # mitmproxy decodes content coding and charset
    except ValueError:  # an encoding or charset we cannot decode
        return
    if text is None:
        return
    response.text = paywall.insert_banner(text, banner)


class Counting:
    """The stream function of a bytes-metered response (flow.response.stream): each chunk
    goes on to the client as it comes, counted as it goes (after another addon's stream
    function, if one was set). mitmproxy reads the origin only as fast as the client takes
    the chunks, so what is counted is what was sent, less what the sockets still buffer."""

    def __init__(
        self,
        metered: Metered,
        inner: Callable[[bytes], bytes | Iterable[bytes]] | None = None,
    ) -> None:
        self.metered = metered
        self.inner = inner
        self.called = False

    def __call__(self, data: bytes) -> bytes | Iterable[bytes]:
        self.called = True
        out = self.inner(data) if self.inner is not None else data
        if isinstance(out, bytes):
            self.metered.count(len(out))
            return out
        chunks = list(out)
        for chunk in chunks:
            self.metered.count(len(chunk))
        return chunks


def _engine_attribute(name: str) -> Any:
    """An attribute of the engine, readable and settable on the addon (tests and tools)."""

    def get(self: "L402Server") -> Any:
        return getattr(self.engine, name)

    def set(self: "L402Server", value: Any) -> None:
        setattr(self.engine, name, value)

    return property(get, set)


class L402Server:
    rules: RuleSet | None = _engine_attribute("rules")
    backend: InvoiceBackend | None = _engine_attribute("backend")
    node: NodeInfo | None = _engine_attribute("node")
    store: TokenStore | None = _engine_attribute("store")
    secret: bytes = _engine_attribute("secret")
    revoked: set[bytes] = _engine_attribute("revoked")
    cache: gate.TokenCache = _engine_attribute("cache")
    started: bool = _engine_attribute("started")

    def __init__(self) -> None:
        self.engine = Paywall()
        # option -> why its value was refused at startup; while any is set, nothing is forwarded.
        self.misconfigured: dict[str, str] = {}
        self.ops: Operations | None = None
        self._undo_json: Callable[[], None] | None = None
        # flow.id -> the metering of its response, from its head to its end or error (not in
        # flow.metadata: mitmproxy saves that with the flow, and this is no plain data).
        self._metered: dict[str, tuple[Metered, Counting | None]] = {}
        # flow.id -> what its private feed's rewrite needs (feeds.FEED_NOTE), from the request
        # to its response or error: it holds the capability, which stays out of flow.metadata.
        self._feeds: dict[str, dict[str, Any]] = {}

    @property
    def root_key_for(self) -> Callable[[bytes], bytes]:
        return self.engine.root_key_for

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
            sqlite:/// URI (one machine), or postgresql://user@host:port/db for several
            instances sharing one state (tokens, revocations, limits). Default: server.sqlite
            under $L402PROXY_HOME or ~/.l402proxy.
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
            "l402_schemes",
            str,
            "l402",
            """
            How services whose rule says no `schemes:` are paid: l402 (an L402/LSAT token,
            reusable until it expires), payment (the Payment HTTP authentication scheme's
            Lightning charge: one request per payment), or both: "l402,payment". Refused when a
            rule cannot be sold so (a pass, a private feed, a bundle need l402).
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
        load_ops_options(loader)
        self.guard.take_deferred(loader)

    def configure(self, updated: set[str]) -> None:
        if "l402_log_format" in updated and not self.started:
            # JSON from the paywall's first line (rules loaded, store opened), not from running().
            self._use_log_format(ctx.options.l402_log_format)
        with self.guard.configuring(updated):
            if "l402_schemes" in updated:
                # Before the rules: they are checked against the default it sets.
                try:
                    self.engine.use_schemes(ctx.options.l402_schemes)
                except Refused as exc:
                    self._refuse("l402_schemes", str(exc))
                else:
                    self.guard.accept("l402_schemes")
            if "l402_rules" in updated:
                try:
                    self.engine.use_rules_file(ctx.options.l402_rules)
                except RulesError as exc:
                    self._refuse("l402_rules", str(exc))
                else:
                    self.guard.accept("l402_rules")
            if "l402_backend" in updated or "l402_dev_ledger" in updated:
                self._configure_backend(
                    "l402_backend" if "l402_backend" in updated else "l402_dev_ledger"
                )
            if "l402_offer_upgrade" in updated:
                self.engine.offer_upgrade = bool(ctx.options.l402_offer_upgrade)
            self._configure_upstream(updated)
            self._configure_streaming(updated)
            self._check_host_rules(updated)
            self._configure_feeds(updated)
            self._configure_ops(updated)

    def _use_log_format(self, value: str) -> None:
        from ..ops.jsonlog import use_json_logs

        if value == "json" and self._undo_json is None:
            self._undo_json = use_json_logs()
        elif value != "json" and self._undo_json is not None:
            self._undo_json()
            self._undo_json = None

    def _configure_ops(self, updated: set[str]) -> None:
        """Metrics, JSON logs, dry run and the admin API (ops/): checked here, started in
        running(). Only the dry run can change while running; the endpoints are bound once."""
        if not updated & OPS_OPTIONS:
            return
        settings = ops_settings()
        problems = dict(settings.problems(OPS_OPTION_NAMES))
        for setting, option in OPS_OPTION_NAMES.items():
            if option not in updated:
                continue
            if setting in problems:
                self._refuse(option, problems[setting])
            elif self.started and setting != "dry_run":
                self._refuse(option, "cannot change while running: restart with the new value")
            else:
                self.guard.accept(option)
        if "l402_dry_run" in updated and self.started:
            was_dry_run = self.engine.dry_run
            self.engine.dry_run_option = settings.dry_run
            self.engine.announce_dry_run(was_dry_run)

    def _check_host_rules(self, updated: set[str]) -> None:
        """In reverse mode mitmproxy puts the origin's name into Host before any addon sees
        the request unless keep_host_header is on; a `match.host` rule would then never match,
        and what it prices would be served free. Refused, at start and while running."""
        if not updated & {"l402_rules", "keep_host_header", "mode"} or self.rules is None:
            return
        if not host_replaced():
            return
        hosted = [rule for rule in self.rules.rules if rule.host is not None]
        if hosted:
            rule = hosted[0]
            self._refuse(
                "l402_rules" if "l402_rules" in updated else "keep_host_header",
                f"service '{rule.name}' (line {rule.line}) matches host:, but in reverse mode "
                "mitmproxy replaces Host with the origin's name: add --set keep_host_header=true",
            )

    def _configure_feeds(self, updated: set[str]) -> None:
        """Private feeds' URLs name the host players asked for. In reverse mode without
        keep_host_header mitmproxy replaces Host with the origin's name before the paywall sees
        a request: no feed URL is handed out or served then (one warning says why), and the
        rest of the paywall works as ever."""
        if not updated & {"l402_rules", "keep_host_header", "mode"}:
            return
        self.engine.feeds_off = FEEDS_NEED_HOST if host_replaced() else None
        rules = self.rules
        fed = [rule for rule in rules.rules if rule.feed is not None] if rules else []
        if fed and self.engine.feeds_off is not None:
            log.warning(
                f"l402: {rules.source if rules else 'rules'}: service '{fed[0].name}' (line "
                f"{fed[0].line}) sells a private feed (feed:), but {self.engine.feeds_off}"
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
        try:
            changed = self.engine.use_backend(ctx.options.l402_backend, self.dev_ledger_path)
        except LightningError as exc:
            self._refuse("l402_backend", str(exc))
            return
        except Refused as exc:
            self._refuse(option, str(exc))
            return
        if changed:
            self.guard.accept("l402_backend")

    def _refuse(self, option: str, problem: str) -> None:
        """Reject a bad option value: an OptionsError while running (the previous value stays);
        at startup one error line, and mitmproxy stops (see options.py)."""
        self.guard.refuse(option, problem, running=self.started)

    @property
    def dev_ledger_path(self) -> str:
        return ctx.options.l402_dev_ledger or paths.default_dev_ledger()

    @property
    def store_uri(self) -> str:
        return ctx.options.l402_store or paths.default_server_store()

    async def running(self) -> None:
        self.engine.store_uri = self.store_uri
        try:
            await self.engine.open()
        except StartError as exc:
            # An error logged during startup makes mitmdump exit instead of running half-configured.
            for problem in exc.problems:
                log.error(f"l402: {problem}")
            return
        # The store is opened only here: another one needs a restart.
        self.guard.pin("l402_store")
        self.ops = Operations(ops_settings(), "mitmproxy", OPS_OPTION_NAMES)
        try:
            await self.ops.start(self.engine)
        except OpsError as exc:
            log.error(f"l402: {exc}")

    async def done(self) -> None:
        if self.ops is not None:
            await self.ops.close()
        await self.engine.close()
        if self._undo_json is not None:
            self._undo_json()
            self._undo_json = None

    async def _reload_rules_if_changed(self) -> None:
        await self.engine.reload_rules_if_changed()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        request = flow.request
        if self.misconfigured:
            # We cannot tell priced from free without our configuration: forward nothing.
            answer = engine_answers.unavailable_answer("the paywall is misconfigured")
            flow.response = to_response(answer.for_method(request.method))
            return
        fields = request.headers.fields
        outcome = await self.engine.handle(
            Request(
                method=request.method,
                target=request.path,
                host=request.pretty_host,
                fields=fields,
                body=request.raw_content,
                secure=bool(flow.client_conn.tls_established),
                client=flow.client_conn.peername,
                target_check=functools.partial(self._check_target, request),
                authority=request.authority or None,
            )
        )
        self._apply(flow, fields, outcome)

    def _check_target(self, request: http.Request, hosts: Sequence[bytes]) -> str | None:
        return check_target(request, hosts, bool(getattr(ctx.options, "keep_host_header", False)))

    def _apply(self, flow: http.HTTPFlow, fields: Any, outcome: Outcome) -> None:
        """The engine's outcome onto the flow: a response, or the request changed to forward."""
        if not isinstance(outcome, Answer) and outcome.note and metering.METER in outcome.note:
            refusal = self._unmeterable(outcome.headers, outcome.note, flow.request.method)
            if refusal is not None:
                outcome = refusal
        if outcome.note is not None:
            note = outcome.note
            if feeds.FEED_NOTE in note and not isinstance(outcome, Answer):
                self._feeds[flow.id] = note[feeds.FEED_NOTE]
                note = {**note, feeds.FEED_NOTE: True}  # the capability kept by the addon only
            flow.metadata["l402"] = note
        if outcome.comment is not None:
            flow.comment = outcome.comment
        if isinstance(outcome, Answer):
            flow.response = to_response(outcome)
            # Not forwarded, but the flow is still recorded (flow files, mitmweb, other
            # addons): our credential and cookies leave it as they would a forwarded one.
            kept, _ = take_our_cookies(engine_charges.drop_credentials(drop_our_fields(fields)))
            if kept is not fields:
                flow.request.headers.fields = kept
            return
        request = flow.request
        if outcome.path is None and feeds.is_feed_target(request.path):
            # Cannot happen (feeds.serve always sets the inner path): never forward a
            # capability's own path, which holds a bearer secret, to the origin.
            log.error("l402: refused to forward a private feed's request without its inner path")
            flow.response = to_response(
                engine_answers.unavailable_answer("internal error in the paywall").for_method(
                    request.method
                )
            )
            return
        flow.metadata[FORWARDED] = True
        if outcome.headers is not fields:
            request.headers.fields = outcome.headers
        if outcome.path is not None:
            request.path = outcome.path
        if outcome.upstream is not None:
            target = urlsplit(outcome.upstream)
            request.scheme = target.scheme
            request.host = target.hostname or request.host
            request.port = target.port or (443 if target.scheme == "https" else 80)
            # mitmproxy rewrote Host for the new origin; the rule's own headers still win.
            for name, value in outcome.set_headers:
                request.headers[name] = value

    def _unmeterable(self, fields: Fields, note: dict[str, Any], method: str) -> Answer | None:
        """Why a metered request is answered instead of forwarded: a WebSocket (what it
        carries is no response body), or a meter this door cannot read (never served
        unmetered: fail closed)."""
        if has(fields, "upgrade"):
            return metering.websocket_refusal(method)
        try:
            metering.Meter.of(note)
        except ValueError as exc:
            log.error(f"l402: refused to forward a metered request: {exc}")
            answer = engine_answers.unavailable_answer("internal error in the paywall")
            return answer.for_method(method)
        return None

    def _tell_upstream(self, flow: http.HTTPFlow, note: dict[str, Any] | None) -> None:
        """How long the origin took: from the request sent on to its response headers."""
        assert flow.response is not None
        sent = flow.request.timestamp_end or flow.request.timestamp_start
        seconds = max(0.0, flow.response.timestamp_start - sent)
        service = note.get("service") if note is not None else None
        self.engine.watchers.tell("upstream_answered", "mitmproxy", service, seconds)

    def responseheaders(self, flow: http.HTTPFlow) -> Awaitable[Any] | None:
        """A 101 to anything but WebSocket would turn the connection into a raw tunnel past the
        paywall (see drop_upgrade, which should have kept it from being asked for).

        The origin's usage headers (units bundles) and Payment-Receipt (only the paywall's
        vouches for a charge; _mark adds it) leave every answer here, and a metered
        answer's head is made here, before it can go out: a bytes-metered body is streamed
        and counted as it goes (Counting); a units one is charged (awaited: mitmproxy awaits
        what a hook returns) before its head is sent."""
        response = flow.response
        if response is None:
            return None
        if response.status_code == 101:
            upgrade = response.headers.get("Upgrade", "").strip().lower()
            if upgrade != "websocket":
                log.warning(f"l402: refused the origin's switch to {upgrade or 'another protocol'}")
                flow.kill()
                return None
        if not flow.metadata.get(FORWARDED):
            return None
        hidden = engine_answers.hidden_from_client(metering.usage_headers(self.engine.rules))
        note = flow.metadata.get("l402")
        if note is None or metering.METER not in note or note.get("variant") != "paid":
            response.headers.fields = metering.without(response.headers.fields, hidden)
            return None
        try:
            metered = Metered.of(note, self.engine, flow.request.method)
        except ValueError as exc:  # checked before forwarding (_unmeterable): cannot happen
            log.error(f"l402: dropped an answer that cannot be metered: {exc}")
            flow.kill()
            return None
        if metered is None:
            return None
        if response.status_code == 101:
            log.warning(f"l402: {metered.meter.rule}: refused a WebSocket on a metered token")
            flow.kill()
            return None
        fields = self._paid_head(note, response.headers.fields)
        if metered.unit == "units":
            self._metered[flow.id] = (metered, None)
            return self._start_units(response, metered, fields, hidden)
        fields = metered.start_bytes(response.status_code, metering.without(fields, hidden))
        response.headers.fields = fields
        stream = response.stream
        counting = Counting(metered, stream if callable(stream) else None)
        response.stream = counting
        self._metered[flow.id] = (metered, counting)
        return None

    @staticmethod
    def _paid_head(note: dict[str, Any], fields: Fields) -> Fields:
        """What response() does to a paid answer's head, for one whose head goes out first."""
        fields = engine_answers.mark_variant(fields, paid=True)
        dry_run = note.get("dry_run")
        if dry_run is not None:
            fields = set_one(fields, engine_answers.DRY_RUN_HEADER, dry_run)
        return fields

    @staticmethod
    async def _start_units(
        response: http.Response, metered: Metered, fields: Fields, hidden: frozenset[bytes]
    ) -> None:
        try:
            fields = await metered.start_units(fields)
        except Exception:
            # Never into mitmproxy: the answer goes out without its balance (and without the
            # usage headers all the same, below).
            log.exception(f"l402: {metered.meter.rule}: metering an answer failed")
        response.headers.fields = metering.without(fields, hidden)

    def error(self, flow: http.HTTPFlow) -> Awaitable[Any] | None:
        """The client went away mid-answer (or the origin did): the bytes sent are charged."""
        self._feeds.pop(flow.id, None)
        held = self._metered.pop(flow.id, None)
        if held is None:
            return None
        return held[0].finish()

    def response(self, flow: http.HTTPFlow) -> Awaitable[Any] | None:
        note = flow.metadata.get("l402")
        held = self._metered.pop(flow.id, None)
        wanted = self._feeds.pop(flow.id, None)
        if flow.response is None:
            return None if held is None else held[0].finish()
        if self.engine.watchers and flow.metadata.get(FORWARDED):
            self._tell_upstream(flow, note)
        if held is not None:
            # The head went out with responseheaders; what is left is the charge.
            metered, counting = held
            raw = flow.response.raw_content
            if counting is not None and not counting.called and raw:
                metered.count(len(raw))  # not streamed after all (another addon's choice)
            return metered.finish()
        if note is None:
            return None
        if feeds.FEED_NOTE in note and flow.metadata.get(FORWARDED):
            return self._private_feed(flow, note, wanted)
        self._mark(flow, note)
        return None

    async def _private_feed(
        self, flow: http.HTTPFlow, note: dict[str, Any], wanted: dict[str, Any] | None
    ) -> None:
        """The origin's feed made the listener's private feed (engine/feeds.py), then marked
        like any answer of its variant. mitmproxy has the whole body here (stream_large_bodies
        is refused); a feed it cannot make private is a 502 with the reason."""
        response = flow.response
        assert response is not None
        method = flow.request.method
        if feeds.rewrites(method, response.status_code):
            problem = None
            raw = response.raw_content
            if raw is None:
                problem = "the feed was streamed"
            elif len(raw) > feeds.MAX_FEED_BYTES:
                problem = f"feed too large: {len(raw)} bytes, at most {feeds.MAX_FEED_BYTES}"
            elif wanted is None:  # cannot happen: _apply kept it for this flow
                problem = "internal error: the feed's rewrite was lost"
            else:
                coding = response.headers.get("Content-Encoding")
                try:
                    body = await asyncio.to_thread(feeds.private_body, raw, coding, wanted)
                except feeds.FeedError as exc:
                    problem = str(exc)
            if problem is None:
                response.headers.fields = feeds.private_fields(response.headers.fields, len(body))
                response.raw_content = body
            else:
                service = note.get("service")
                log.warning(f"l402: a private feed{f' of {service}' if service else ''}: {problem}")
                answer = feeds.bad_feed_answer(problem, method)
                flow.response = to_response(answer)
                return
        else:
            # HEAD, 304, an error: passed as the origin sent it, kept by nobody but the listener.
            response.headers.fields = feeds.private_head(response.headers.fields)
        self._mark(flow, note)

    @staticmethod
    def _mark(flow: http.HTTPFlow, note: dict[str, Any]) -> None:
        """A forwarded answer marked as its variant: paid (private, the balance) or free (the
        cookies to forget, the upgrade banner)."""
        assert flow.response is not None
        dry_run = note.get("dry_run")
        if dry_run is not None:
            flow.response.headers[engine_answers.DRY_RUN_HEADER] = dry_run
        variant = note.get("variant")
        response = flow.response
        if variant == "paid":
            mark_variant(response.headers, paid=True)
            balance = note.get("balance")
            if balance is not None:
                response.headers[engine_answers.BALANCE_HEADER] = balance
            fields = response.headers.fields
            marked = engine_answers.mark_receipt(fields, note.get("receipt"), response.status_code)
            if marked is not fields:
                response.headers.fields = marked
            return
        if variant != "free":
            return
        offer = note.get("offer")
        mark_variant(
            response.headers,
            paid=False,
            by_accept=bool(offer),
            by_payment=bool(note.get("by_payment")),
        )
        for cookie in engine_answers.note_cookies(note):
            flow.response.headers.add("Set-Cookie", cookie)
        if offer and ctx.options.l402_offer_upgrade and flow.request.method.upper() != "HEAD":
            offer_upgrade(flow.response, offer)


# flow.metadata key: the engine let this flow go on to the origin (its response is the origin's).
FORWARDED = "l402_forwarded"

# OpsSettings field -> the option that sets it.
OPS_OPTION_NAMES = {
    "metrics": "l402_metrics",
    "log_format": "l402_log_format",
    "dry_run": "l402_dry_run",
    "admin": "l402_admin",
    "admin_secret": "l402_admin_secret",
    "allow_remote": "l402_ops_remote",
}
OPS_OPTIONS = frozenset(OPS_OPTION_NAMES.values())


def load_ops_options(loader: Any) -> None:
    loader.add_option(
        "l402_metrics",
        str,
        "",
        """
        Serve Prometheus metrics at http://<host:port>/metrics, e.g. 127.0.0.1:9402 (off when
        empty). Loopback only unless l402_ops_remote is set.
        """,
    )
    loader.add_option(
        "l402_log_format",
        str,
        "text",
        """
        text, or json: one JSON object per line on stderr for each of the paywall's log lines,
        and a line per decision (grant, challenge, refusal, rate limit, unlock).
        """,
        choices=("text", "json"),
    )
    loader.add_option(
        "l402_dry_run",
        bool,
        False,
        """
        Judge every request, log and count the decision, and forward the request all the same,
        with X-L402-Dry-Run: <decision> on the response; no invoice is made. The rules file's
        top-level "mode: dry_run" does the same.
        """,
    )
    loader.add_option(
        "l402_admin",
        str,
        "",
        """
        Serve the admin API and revenue page at http://<host:port>/, e.g. 127.0.0.1:9403 (off
        when empty): tokens, revocation, services, revenue. Every call needs the bearer secret
        of l402_admin_secret. Loopback only unless l402_ops_remote is set.
        """,
    )
    loader.add_option(
        "l402_admin_secret",
        str,
        "",
        """
        File holding the admin API's bearer secret; made (mode 0600) and shown once when it
        does not exist. Default: admin-secret under $L402PROXY_HOME or ~/.l402proxy.
        """,
    )
    loader.add_option(
        "l402_ops_remote",
        bool,
        False,
        """
        Let l402_metrics and l402_admin listen on an address other machines can reach (put TLS
        in front: the admin secret travels in every call).
        """,
    )


def ops_settings() -> OpsSettings:
    options = ctx.options
    return OpsSettings(
        metrics=options.l402_metrics,
        log_format=options.l402_log_format,
        dry_run=bool(options.l402_dry_run),
        admin=options.l402_admin,
        admin_secret=options.l402_admin_secret,
        allow_remote=bool(options.l402_ops_remote),
    )
