"""The Paywall engine: rules, backend, store, secret, revocations and the token cache, their
lifecycle, and the judgement of one request (answer it, or forward it changed)."""

import asyncio
import contextvars
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from .. import gate, paths, paywall
from ..l402.headers import accepts_l402
from ..l402.identifier import Identifier
from ..l402.token import UNLISTED_CAPABILITY, caveats_for, derive_root_key, mint
from ..lightning import InvoiceBackend, LightningError, open_backend
from ..lightning.base import NodeInfo
from ..rules import (
    DEFAULT_SCHEMES,
    PRICED_MODES,
    AmbiguousPath,
    Bundle,
    PathError,
    Rule,
    RulesError,
    RuleSet,
    load_rules,
    parse_schemes,
    rule_warnings,
    scheme_problem,
)
from ..store import IssuedToken, StoreError, TokenStore, open_server_store, shown_store_uri
from . import charges, discovery, events, feeds, pricing
from .answers import (
    BALANCE_HEADER,
    Answer,
    Forward,
    Outcome,
    bad_path_answer,
    bad_request_answer,
    challenge_answer,
    challenge_body,
    not_found_answer,
    not_sold_answer,
    too_many_answer,
    unavailable_answer,
)
from .events import Decision, Watchers
from .limits import Counters, LocalCounters, SharedCounters, client_address, ip_key, rate_key
from .request import (
    REROOTING_HEADERS,
    Fields,
    Request,
    WatchedHeaders,
    decode,
    drop_our_authorization,
    drop_upgrade,
    drop_vouched,
    get,
    set_one,
    take_our_cookies,
)
from .verdicts import Key, VerdictCache

log = logging.getLogger(__name__)

RULES_POLL_SECONDS = 1.0
REVOCATION_POLL_SECONDS = 1.0
FLUSH_SECONDS = 0.25
BACKEND_CHECK_SECONDS = 15.0
SEEN_PAID_LIMIT = 100_000

# False while a request through a private feed's capability is judged (engine/feeds.py): a 402
# there is no offer a podcast player could take, so no invoice is made for it (nor a free trial
# spent); feeds.py turns the bare challenge into its own answer.
SELLING: contextvars.ContextVar[bool] = contextvars.ContextVar("l402_selling", default=True)


@functools.lru_cache(maxsize=8)
def never_forwarded(vouched: frozenset[bytes]) -> frozenset[bytes]:
    """Header names no client may send to the origin: the rules' vouched ones and the
    re-rooting ones (cached: one set per rules file, not one per request)."""
    return vouched | REROOTING_HEADERS


class Refused(Exception):
    """A configuration value the engine will not take; the door turns it into its own error
    (mitmproxy: an OptionsError while running, one error line at start)."""


class StartError(Exception):
    """open() could not start the paywall; each line of `problems` is one reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def file_signature(path: str) -> tuple[int, int] | None:
    """What tells us a rules file changed: (mtime_ns, size); None if it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def prices_out_of_range(rules: RuleSet | None, node: NodeInfo | None) -> list[str]:
    """Priced services the backend cannot invoice for (a Lightning Address's min/max)."""
    if rules is None or node is None or node.invoice_range_msat is None:
        return []
    low, high = node.invoice_range_msat
    return [
        f"service '{rule.name}' (line {rule.line}) costs {rule.price_sat} sat, but "
        f"{node.backend} at {node.address} accepts {low / 1000:g} to {high / 1000:g} sat"
        for rule in rules.rules
        # A price: function is checked against the range on each quote instead.
        if rule.mode in PRICED_MODES
        and rule.price is None
        and not low <= rule.price_sat * 1000 <= high
    ]


def warn_about_rules(rules: RuleSet) -> None:
    for warning in rule_warnings(rules):
        log.warning(f"l402: {rules.source}: {warning}")


class Paywall:
    """One paywall, whatever door it is reached through. Configure it (use_rules_file,
    use_backend, store_uri, offer_upgrade), `await open()`, then `await handle(request)` per
    request; `await close()` at the end. Not thread-safe: one event loop drives it."""

    def __init__(
        self,
        *,
        door: str = "mitmproxy",
        no_upstream: str | None = None,
        rule_check: Callable[[Rule], str | None] | None = None,
    ) -> None:
        # The front door, for messages; `no_upstream` says why a paid variant cannot switch to
        # another origin through this door (None: it can), so such rules are refused, as is
        # any rule `rule_check` has a problem with (a door's own limits).
        self.door = door
        self.no_upstream = no_upstream
        self.rule_check = rule_check
        self.rules: RuleSet | None = None
        self.rules_path = ""
        self.rules_signature: tuple[int, int] | None = None
        self.backend: InvoiceBackend | None = None
        self.backend_source: tuple[str, str] | None = None
        # What the backend said it is at start (its invoice limits are checked against rules).
        self.node: NodeInfo | None = None
        self.store_uri = ""
        self.store: TokenStore | None = None
        self.secret: bytes = b""
        # What Payment challenge ids are bound with (charges.binding_secret of `secret`).
        self.payment_secret: bytes = b""
        # How rules that name no `schemes:` are paid (l402_schemes; use_schemes).
        self.default_schemes: tuple[str, ...] = DEFAULT_SCHEMES
        self.revoked: set[bytes] = set()
        self.revocation_cursor = 0
        self.cache = gate.TokenCache()
        self.verdicts = VerdictCache()
        # Private feeds' capabilities, looked up in the store (feeds.py); `feeds_off` says why
        # this door cannot serve private feeds as configured (None: it can).
        self.feed_accesses = feeds.AccessCache()
        self.feeds_off: str | None = None
        self.seen_paid: set[bytes] = set()
        self.offer_upgrade = True
        # The door's dry-run option; the rules file's `mode: dry_run` turns it on as well.
        self.dry_run_option = False
        # Metrics, JSON logs, the admin page: told of every decision (events.py).
        self.watchers = Watchers()
        # Rate limits, the invoice-mint limit and free allowances count here (limits.py).
        self.counters: Counters = LocalCounters()
        self.warned_unknown_client = False
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closing: set[asyncio.Task[None]] = set()
        self.started = False

    # -- configuration ---------------------------------------------------------------------

    def use_rules_file(self, path: str) -> RuleSet:
        """Load the rules file and put it in force; RulesError (one line naming the file) if
        it is missing, broken or prices what the backend cannot invoice."""
        if not path:
            # Without rules nothing is priced: a paywall that gives everything away.
            raise RulesError(
                "not set: give the rules file, --set l402_rules=<file> (see rules/*.yaml)"
            )
        rules = load_rules(path)
        refused = self.unsupported_rule(rules)
        if refused is not None:
            raise refused
        signature = file_signature(path)
        log.info(f"l402: {len(rules.rules)} priced service(s) from {path}")
        warn_about_rules(rules)
        problems = prices_out_of_range(rules, self.node)
        if problems:
            raise RulesError("; ".join(problems))
        self.rules, self.rules_path, self.rules_signature = rules, path, signature
        return rules

    def unsupported_rule(self, rules: RuleSet) -> RulesError | None:
        """The first rule this door cannot serve as written (a paid variant on another origin
        where the door has only one; what the door's rule_check refuses, such as a bundle of
        bytes or units where the door never sees the answer), as the error naming its file
        and line."""
        for rule in rules.rules:
            problem = self.rule_check(rule) if self.rule_check is not None else None
            if problem is None and rule.schemes is None:
                # Its own schemes were checked as the file was read; the default only now.
                problem = scheme_problem(rule, self.default_schemes)
                if problem is not None:
                    problem += f" (the paywall's default schemes, {self.schemes_setting})"
            if problem is not None:
                return RulesError(problem, source=rules.source, line=rule.line, service=rule.name)
            if self.no_upstream is not None and rule.paid.upstream is not None:
                return RulesError(
                    f"paid.upstream is not possible with the {self.door} door: {self.no_upstream}",
                    source=rules.source,
                    line=rule.line,
                    service=rule.name,
                )
        return None

    def use_schemes(self, value: str | Sequence[str]) -> None:
        """The schemes rules that name none are sold with ("l402", "payment", "l402,payment");
        Refused for a value that is none, or one a rule in force cannot be sold with (its file,
        line and why). May change while running."""
        try:
            schemes = parse_schemes(value)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        rules = self.rules
        for rule in rules.rules if rules is not None else ():
            problem = None if rule.schemes is not None else scheme_problem(rule, schemes)
            if problem is not None and rules is not None:
                where = RulesError(problem, source=rules.source, line=rule.line, service=rule.name)
                raise Refused(f"{where} (it names no schemes: of its own)")
        self.default_schemes = schemes

    @property
    def schemes_setting(self) -> str:
        """Where this door's users set the default schemes, for messages."""
        return _SCHEMES_SETTING.get(self.door, "l402_schemes")

    def schemes_for(self, rule: Rule) -> tuple[str, ...]:
        """How a priced rule is paid: its own `schemes:`, else the paywall's default."""
        return rule.schemes if rule.schemes is not None else self.default_schemes

    def sells_payment(self) -> bool:
        """Does any priced rule in force sell Payment charges?"""
        rules = self.rules
        return rules is not None and any(
            rule.mode in PRICED_MODES and charges.PAYMENT in self.schemes_for(rule)
            for rule in rules.rules
        )

    def use_backend(self, uri: str, dev_ledger: str) -> bool:
        """Open the invoice backend `uri` (False: it is the one in use already). LightningError
        for a bad URI; Refused once running (a backend is checked only at start)."""
        source = (uri, dev_ledger)
        if self.backend is not None and source == self.backend_source:
            return False
        backend = open_backend(uri, dev_ledger=dev_ledger)
        if self.started:
            # Swapping in an unchecked backend would answer 503 to every priced request.
            raise Refused(
                "cannot change while running: restart mitmproxy with the new value "
                "(the backend is checked at start)"
            )
        previous, self.backend = self.backend, backend
        self.backend_source = source
        if previous is not None:
            self._close_later(previous)
        return True

    def _close_later(self, backend: InvoiceBackend) -> None:
        """Configuration is sync; a replaced backend's connection is closed on the event loop."""
        try:
            task = asyncio.get_running_loop().create_task(backend.close())
        except RuntimeError:  # no loop yet: nothing was opened either
            return
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store, check the backend, start the background jobs. StartError (nothing
        started) if the store cannot be opened or the backend cannot serve the rules."""
        store_uri = self.store_uri or paths.default_server_store()
        try:
            self.store = await open_server_store(store_uri)
            self.secret = await self.store.secret()
            self.payment_secret = charges.binding_secret(self.secret)
            self.revocation_cursor, self.revoked = await self.store.revocations_since(0)
            shared = getattr(self.store, "counters", None)
            if shared is not None:
                # Limits and allowances counted across every instance on this store.
                self.counters = SharedCounters(shared)
        except (StoreError, OSError) as exc:
            raise StartError(
                [f"cannot open token store {shown_store_uri(store_uri)}: {exc}"]
            ) from exc
        if self.backend is not None:
            try:
                node = await asyncio.wait_for(self.backend.info(), BACKEND_CHECK_SECONDS)
            except (LightningError, TimeoutError) as exc:
                # Refuse to start rather than answer every priced request with a 503.
                why = str(exc) or f"no answer within {BACKEND_CHECK_SECONDS:g} s"
                raise StartError(
                    [f"cannot use the invoice backend {self.backend.describe()}: {why}"]
                ) from exc
            log.info(f"l402: invoices from {node.summary()} ({self.backend.describe()})")
            problems = prices_out_of_range(self.rules, node)
            if problems:
                raise StartError([f"l402_rules: {problem}" for problem in problems])
            self.node = node
        self.tasks = [
            asyncio.create_task(self._every(FLUSH_SECONDS, self._flush)),
            asyncio.create_task(self._follow_revocations()),
            asyncio.create_task(self._every(RULES_POLL_SECONDS, self.reload_rules_if_changed)),
        ]
        self.started = True
        self.ready.set()

    async def close(self) -> None:
        """Stop the background jobs, then close the store and the backend. Each is closed
        whatever the other did: a store that cannot write its queue (the database is down)
        says so in one line, and the backend still closes."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for name, resource in (("token store", self.store), ("backend", self.backend)):
            if resource is None:
                continue
            try:
                await resource.close()
            except Exception as exc:
                log.error(f"l402: closing the {name}: {exc}")

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        await self._repeat(job, lambda: asyncio.sleep(seconds))

    async def _follow_revocations(self) -> None:
        """Revocations reach this instance as soon as the store hears of them (PostgreSQL's
        LISTEN/NOTIFY), at the latest after REVOCATION_POLL_SECONDS (SQLite: a poll)."""
        assert self.store is not None
        store = self.store
        await self._repeat(
            self._poll_revocations,
            lambda: store.wait_for_revocations(REVOCATION_POLL_SECONDS),
            pause=REVOCATION_POLL_SECONDS,
        )

    @staticmethod
    async def _repeat(
        job: Callable[[], Awaitable[None]],
        wait: Callable[[], Awaitable[None]],
        pause: float = 0.0,
    ) -> None:
        """Run `job` after each `wait`, for ever. A failure is logged once when it starts and
        once when it ends (a database that is down for minutes must not flood the log), and
        never ends the loop or takes the paywall down."""
        name = getattr(job, "__name__", repr(job)).lstrip("_")
        failing = False
        while True:
            try:
                await wait()
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(f"l402: background {name} failed: {exc} (retrying quietly)")
                    failing = True
                await asyncio.sleep(pause)
            else:
                if failing:
                    log.warning(f"l402: background {name} works again")
                    failing = False

    async def _flush(self) -> None:
        assert self.store is not None
        try:
            settled = await self.store.flush()
        except Exception:
            self.watchers.tell("store_failed", self.door, "flush")
            raise
        # The tokens this instance was first to record as paid: each sale is counted once,
        # however many instances saw its token.
        for token in settled or ():
            self.watchers.tell("settled", self.door, token.service, token.price_sat)

    async def _poll_revocations(self) -> None:
        assert self.store is not None
        try:
            cursor, new = await self.store.revocations_since(self.revocation_cursor)
        except Exception:
            self.watchers.tell("store_failed", self.door, "revocations")
            raise
        self.revocation_cursor = cursor
        if new:
            self.revoked |= new
            log.info(f"l402: {len(new)} token(s) revoked")

    async def reload_rules_if_changed(self) -> None:
        path = self.rules_path
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
        refused = self.unsupported_rule(rules)
        problems = [str(refused)] if refused is not None else prices_out_of_range(rules, self.node)
        if problems:
            log.warning(
                f"l402: kept the previous rules; the edited file {path}: {'; '.join(problems)}"
            )
            return
        was_dry_run = self.dry_run
        self.rules = rules
        self.announce_dry_run(was_dry_run)
        warn_about_rules(rules)
        log.info(f"l402: reloaded {len(rules.rules)} priced service(s) from {Path(path)}")

    # -- one request ---------------------------------------------------------------------------

    def root_key_for(self, token_id: bytes) -> bytes:
        return derive_root_key(self.secret, token_id)

    @property
    def dry_run(self) -> bool:
        """Only pretend: judge, log and count every request, forward it all the same."""
        return self.dry_run_option or (self.rules is not None and self.rules.dry_run)

    async def handle(self, request: Request) -> Outcome:
        """Answer the request, or say how to forward it. Never raises for a request: what the
        engine cannot judge is answered (503, fail closed), never forwarded."""
        started = time.perf_counter()
        outcome = await self._handle(request)
        # Asked after, not before: a request that waited for open() is told to the watchers
        # that started with it.
        if self.watchers:
            seconds = time.perf_counter() - started
            self.watchers.tell("decided", decision_of(self.door, request.method, outcome, seconds))
        return outcome

    async def _handle(self, request: Request) -> Outcome:
        if feeds.is_feed_target(request.target):
            # Before the other endpoints: judged as the inner request it stands for.
            return await feeds.serve(self, request)
        if paywall.is_endpoint(request.target):
            from .endpoints import endpoint  # the endpoints import this module

            return await endpoint(self, request)
        kept_key: Key | None = None
        if self.rules is not None and not self.dry_run:
            # The same request head with the same token: the grant it got, without judging.
            kept_key = VerdictCache.key(request)
            reused = self.verdicts.reuse(
                kept_key, time.time(), self.revoked, self.rules, request.target_check
            )
            if reused is not None:
                return reused
        fields = request.fields
        seen = WatchedHeaders.of(fields)
        if seen.broken:
            # Never forwarded: what a bare CR, a line break or a NUL means differs per server.
            answer = bad_request_answer(
                "Bad request: a header field contains CR, LF or NUL."
            ).for_method(request.method)
            answer.note = {"variant": "refused", "reason": "header"}
            return answer
        if seen.upgrade:
            fields = drop_upgrade(fields)
        if request.target_check is not None:
            problem = request.target_check(seen.hosts)
            if problem is not None:
                answer = bad_request_answer(problem).for_method(request.method)
                answer.note = {"variant": "refused", "reason": "target"}
                return answer
        if self.rules is not None and discovery.is_manifest_target(request.target):
            # The catalog of what the rules sell: free (the proposal forbids a 402 for it), never
            # forwarded, ahead of every rule (a `*` rule would price it). Without rules the
            # paywall passes everything through, this path too. After the door's checks: its
            # body follows Host, so an ambiguous Host is refused as for any request. (The
            # verdict cache before them never holds it: it keeps grants only.)
            return discovery.manifest_answer(
                self.rules,
                request.method,
                if_none_match=get(request.fields, "If-None-Match"),
                default_schemes=self.default_schemes,
                host=request.host,
            )
        # Our credentials (cookies, L402/LSAT Authorization) never reach the origin, whatever
        # the path: a token sent to a free path, to one no rule covers or with no rules at all
        # would otherwise leak to whoever runs or logs that origin. `seen` keeps what we read.
        if seen.authorization is not None:
            # A Payment credential too: it pays for a request, it is nothing for the origin.
            fields = charges.drop_credentials(drop_our_authorization(fields))
        cookies: dict[str, str] = {}
        if seen.cookie:
            fields, cookies = take_our_cookies(fields)
        # A page shown from a private feed's URL makes browsers send that URL as Referer, on
        # every request: its capability is a bearer secret the origin must never see (or log).
        fields = drop_capability_referers(fields)
        if self.rules is None:
            return Forward(fields)
        # Headers a paid variant sets come from the paywall only, and headers that make an
        # origin re-root the path (Daphne-Root-Path, X-Forwarded-Prefix, ...) from nobody: the
        # origin would route to another place than the one judged.
        fields = drop_vouched(fields, never_forwarded(self.rules.vouched_headers))
        try:
            rule = self.rules.match(request.host, request.target, request.method)
            if request.also_targets:
                # Other targets the origin may route this request by (the ASGI door: the
                # path below root_path): they must fall under the same rule.
                rule = self._agreeing(request, rule)
        except PathError as exc:
            # Origins may read the path as a place priced otherwise (`/free/..%2Fpaid/x`), or
            # it is not a path at all: refuse before any invoice, never forward.
            answer = bad_path_answer(exc).for_method(request.method)
            answer.note = {"variant": "refused", "reason": type(exc).__name__}
            return pretend(fields, answer) if self.dry_run else answer
        if rule is None:
            return Forward(fields)
        if not self.ready.is_set():
            await self.ready.wait()
        try:
            outcome = await self._judge(request, fields, rule, seen, cookies, kept_key)
        except Exception:
            # Fail closed: forwarding a priced request we could not judge would give it away.
            log.exception(f"l402: internal error on {request.method} {request.target}")
            outcome = unavailable(rule, "internal", "internal error in the paywall", request.method)
        return pretend(fields, outcome) if self.dry_run else outcome

    async def _judge(
        self,
        request: Request,
        fields: Fields,
        rule: Rule,
        seen: WatchedHeaders,
        cookies: Mapping[str, str],
        kept_key: Key | None = None,
    ) -> Outcome:
        if rule.rate_limits:
            limited = await self.rate_limited(request, rule, token_id=None)
            if limited is not None:
                return limited
        authorization = seen.authorization
        sells_charges = charges.PAYMENT in self.schemes_for(rule)
        if (
            sells_charges
            and authorization is not None
            and not gate.is_l402_authorization(authorization)
            and rule.mode in PRICED_MODES
        ):
            # A Payment credential (an L402/LSAT one wins: it is judged as ever): this request.
            credentials = charges.credentials(request.fields)
            if credentials:
                return await charges.redeem(self, request, fields, rule, credentials)
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
                rule.name, path=paywall.scope_path(rule), secure=request.secure
            )
            if rule.mode == "upgrade" and not accepts_l402(seen.accept_authenticate):
                # Upgrade mode keeps unpaid browsers on the free variant: a stale cookie is no
                # request to pay (an <audio> fetch would only break on a 402).
                decision = gate.Free(rule)
        if isinstance(decision, gate.Free) and sells_charges and charges.asks_to_pay(fields):
            # Upgrade mode: a client that says it pays Lightning charges asks for the 402.
            decision = gate.Challenge(
                rule, 402, "payment_required", f"{rule.name} costs {rule.price_sat} sat"
            )
        if isinstance(decision, gate.Challenge):
            # No token or charge this rule sells opens this method: no 402 (nor free trial).
            unsold = self.not_sold(request, rule)
            if unsold is not None:
                return unsold
        match decision:
            case gate.Deny():
                answer = not_found_answer().for_method(request.method)
                answer.note = {"service": rule.name, "variant": "denied"}
                return answer
            case gate.Grant():
                if rule.rate_limits:
                    token_id = decision.token.identifier.token_id
                    limited = await self.rate_limited(request, rule, token_id=token_id)
                    if limited is not None:
                        return limited
                bundle = self.bundle_sold(rule, decision.token.caveats)
                if bundle is not None:
                    return await self._draw(request, fields, decision, from_cookie, seen, bundle)
                forward = self._grant(request, fields, decision, from_cookie=from_cookie)
                if kept_key is not None and not rule.rate_limits:
                    identifier = decision.token.identifier
                    self.verdicts.keep(
                        kept_key,
                        forward,
                        decision.token.valid_until,
                        (identifier.token_id, identifier.payment_hash),
                        self.rules,
                        seen.hosts,
                    )
                return forward
            case gate.Challenge() if (
                rule.freebies is not None and SELLING.get() and await self._freebie(request, rule)
            ):
                return self._forward_paid(request, fields, rule, {"freebie": True})
            case gate.Challenge() if self.dry_run:
                return await self._pretended_challenge(request, decision)
            case gate.Challenge():
                return await self.challenge(request, decision, set_cookies=clear_cookies)
            case gate.Free():
                return self._free(request, fields, rule, clear_cookies)
        # gate.Pass and anything else: forwarded as it is, with no note for the response phase.
        return Forward(fields)

    def _free(
        self, request: Request, fields: Fields, rule: Rule, clear_cookies: Sequence[str]
    ) -> Forward:
        """The free variant of a priced rule: the browser's stale cookies cleared, and on an
        upgrade-mode page the offer to upgrade (the banner)."""
        note: dict[str, Any] = {"service": rule.name, "variant": "free"}
        if clear_cookies:
            note["clear_cookies"] = list(clear_cookies)
        schemes = self.schemes_for(rule)
        if rule.mode == "upgrade" and charges.PAYMENT in schemes:
            # Accept-Payment asks for the 402 instead (caches must tell the answers apart).
            note["by_payment"] = True
        if (
            rule.mode == "upgrade"
            and charges.L402 in schemes  # the banner's page sells an L402 token
            and self.offer_upgrade
            and paywall.body_kind(get(fields, "Accept")) == "html"
        ):
            note["offer"] = paywall.upgrade_banner(rule, request.target)
        return Forward(fields, note=note)

    def _agreeing(self, request: Request, rule: Rule | None) -> Rule | None:
        assert self.rules is not None
        decisive = None if rule is None or rule.mode == "free" else rule
        for target in request.also_targets:
            other = self.rules.match(request.host, target, request.method)
            if (None if other is None or other.mode == "free" else other) is not decisive:
                raise AmbiguousPath(
                    f"ambiguous request path: the application may route {request.target} as "
                    f"{target}, which is priced differently; send the path it routes by"
                )
        return rule

    def client_of(self, request: Request) -> str:
        """The key the client's address counts under (trusted proxies' X-Forwarded-For read)."""
        assert self.rules is not None
        peer = request.client[0] if request.client else None
        rules = self.rules
        address = client_address(peer, request.fields, rules.trusted_proxies, rules.trust_unix)
        if address is None and not self.warned_unknown_client:
            # A unix socket gives no address: every client would count as one.
            self.warned_unknown_client = True
            log.warning(
                "l402: a request came without a client address (a unix socket?): limits count "
                "all such requests together; if a proxy in front sets X-Forwarded-For, add "
                "unix to trusted_proxies in the rules file"
            )
        return ip_key(address)

    async def rate_limited(
        self, request: Request, rule: Rule, token_id: bytes | None
    ) -> Answer | None:
        """429 when one of the rule's limits is spent: the per-IP ones before the token is
        looked at (token_id None), the per-token ones once it is known to be good."""
        now = time.time()
        for limit in rule.rate_limits:
            if (limit.key == "token") != (token_id is not None):
                continue
            who = token_id.hex() if token_id is not None else self.client_of(request)
            wait = await self.counters.take_rate(
                rate_key(limit, rule.name, who), limit.interval, limit.burst, now
            )
            if wait is not None:
                answer = too_many_answer(wait, f"service '{rule.name}'").for_method(request.method)
                answer.note = {"service": rule.name, "variant": "limited", "reason": limit.key}
                return answer
        return None

    async def _freebie(self, request: Request, rule: Rule) -> bool:
        """Spend one of the client's free requests of this rule, if one is left."""
        assert rule.freebies is not None
        key = f"free:{rule.name}:{self.client_of(request)}"
        left = await self.counters.take_allowance(
            key, rule.freebies.requests, rule.freebies.per, time.time()
        )
        return left is not None

    def _forward_paid(
        self, request: Request, fields: Fields, rule: Rule, note: dict[str, Any]
    ) -> Forward:
        """The request on to the origin as the rule's paid variant."""
        paid = rule.paid
        path = paid.apply_path(request.target) if paid.rewrite is not None else None
        set_headers = tuple(paid.set_headers.items())
        for name, value in set_headers:
            fields = set_one(fields, name, value)
        return Forward(
            fields,
            path=path,
            upstream=paid.upstream,
            set_headers=set_headers,
            note={"service": rule.name, "variant": "paid", **note},
            comment=f"{_paid_how(note)}: {rule.name}",
        )

    def _grant(
        self,
        request: Request,
        fields: Fields,
        grant: gate.Grant,
        from_cookie: bool = False,
        metered: bool = False,
    ) -> Forward:
        # The credential that paid is already off the request: `handle` drops every L402/LSAT
        # Authorization field and our cookies; any other Authorization belongs to the origin.
        token_id = grant.token.identifier.token_id
        note: dict[str, Any] = {"token_id": token_id.hex()}
        if from_cookie:
            note["credential"] = "cookie"
        if not grant.rule.rate_limits and not metered:
            # The same request with the same credential gets this same verdict until the token
            # expires (or is revoked): a door may keep it for a moment (nginx's verdict cache).
            # Not with limits or a bundle: every request must be counted.
            note["reusable_until"] = grant.token.valid_until
        self.note_paid(token_id)
        return self._forward_paid(request, fields, grant.rule, note)

    async def _draw(
        self,
        request: Request,
        fields: Fields,
        grant: gate.Grant,
        from_cookie: bool,
        seen: WatchedHeaders,
        bundle: Bundle,
    ) -> Outcome:
        """A bundle token's request: one request drawn from its balance (in the store, so
        exactly once across instances) and forwarded with what is left; a spent bundle is
        challenged again, like a request without a token, for a new one. A bundle of bytes
        or units is only checked to hold something: the door charges what the answer used
        (engine/metering.py), told what to meter by the note."""
        rule = grant.rule
        assert self.store is not None
        token_id = grant.token.identifier.token_id
        # Drawn now: one request; bytes and units are known from the answer only.
        cost = 1 if bundle.unit == "requests" else 0
        try:
            if self.dry_run:
                # Only pretend: say what drawing would leave, and draw nothing.
                known = await self.store.balance_of(token_id)
                before = bundle.size if known is None else known
                left = before - cost if before > 0 else None
            else:
                left = await self.store.draw(token_id, bundle.size, cost)
        except StoreError as exc:
            # Fail closed: what cannot be counted is not given.
            log.warning(f"l402: cannot draw from the bundle of {token_id.hex()[:16]}: {exc}")
            return unavailable(rule, "store", "the token store is unreachable", request.method)
        balance = f"{left or 0} {bundle.unit}"
        if left is not None:
            forward = self._grant(request, fields, grant, from_cookie=from_cookie, metered=True)
            assert forward.note is not None
            if cost:
                forward.note["balance"] = balance
            else:
                from . import metering  # imported here: _draw is all of core.py it touches

                source = self.rules.source if self.rules is not None else "rules"
                forward.note[metering.METER] = metering.meter_note(
                    token_id, rule, bundle, left, source
                )
            return forward
        single = bundle.unit == "requests" and bundle.size == 1
        what = "used" if single else f"spent (it held {bundle.size} {bundle.unit})"
        spent = gate.Challenge(rule, 402, "spent", f"this token is {what}: pay for a new one")
        set_cookies: list[str] = []
        if from_cookie:
            set_cookies = paywall.clearing_cookies(
                rule.name, path=paywall.scope_path(rule), secure=request.secure
            )
            if rule.mode == "upgrade" and not accepts_l402(seen.accept_authenticate):
                # As for any stale cookie: the free variant (with the offer to upgrade), and
                # the browser forgets it.
                return self._free(request, fields, rule, set_cookies)
        if self.dry_run:
            # Pretend the 402 like any other in a dry run: no invoice, no price function.
            return await self._pretended_challenge(request, spent)
        answer = await self.challenge(request, spent, set_cookies=set_cookies)
        if answer.status == 402:
            answer.add(BALANCE_HEADER, balance)
        return answer

    async def _pretended_challenge(self, request: Request, challenge: gate.Challenge) -> Answer:
        """Dry run: what a 402 would be, without its invoice (pretend() forwards the request).
        The mint limit is counted as when enforcing: a client over it would get 429."""
        if not SELLING.get():
            return self._unsold(challenge)
        unsold = self.not_sold(request, challenge.rule)
        if unsold is not None:
            return unsold
        limited = await self.mint_limited(request, challenge.rule)
        if limited is not None:
            return limited
        return self._unsold(challenge)

    @staticmethod
    def not_sold(request: Request, rule: Rule) -> Answer | None:
        """405 when the rule's capabilities cover no method like the request's: no token it
        sells opens it (gate: missing_capability), nor may a charge (charges.check), so no
        402 is sold for it either; None for every other request."""
        if rule.capability_for(request.method) != UNLISTED_CAPABILITY:
            return None
        listed = {method for _, methods in rule.capability_methods for method in methods}
        if "GET" in listed:
            listed.add("HEAD")  # Rule.capability_for: HEAD needs what GET needs
        answer = not_sold_answer(request.method, rule.name, sorted(listed)).for_method(
            request.method
        )
        answer.note = {"service": rule.name, "variant": "refused", "reason": "missing_capability"}
        return answer

    @staticmethod
    def _unsold(challenge: gate.Challenge) -> Answer:
        """The challenge's status and reason without an invoice (a dry run pretends it; a
        private feed's request answers it in its own way)."""
        answer = Answer.make(challenge.status, b"")
        answer.note = {
            "service": challenge.rule.name,
            "variant": "challenge",
            "status": challenge.status,
            "reason": challenge.reason,
        }
        return answer

    def bundle_sold(self, rule: Rule, caveats: Sequence[str]) -> Bundle | None:
        """The bundle a token used at `rule` draws from: the one its seller sold, wherever it
        is used. A pass opens several services on its seller's terms: a 100-request pass is
        100 requests across all of them (not unlimited where the other service sells no
        bundle, nor another size where it sells another), and an unlimited pass stays
        unlimited. The seller is the first service of the first caveat (only we write it; a
        holder can only append); `rule`'s own bundle when that service is gone from the rules."""
        condition, _, value = caveats[0].partition("=") if caveats else ("", "", "")
        seller = value.split(",", 1)[0].partition(":")[0].strip()
        if condition.strip() != "services" or seller == rule.name or self.rules is None:
            return rule.bundle
        for other in self.rules.rules:
            if other.name == seller and other.mode in PRICED_MODES:
                return other.bundle
        return rule.bundle

    def note_paid(self, token_id: bytes) -> None:
        if token_id not in self.seen_paid and self.store is not None:
            if len(self.seen_paid) >= SEEN_PAID_LIMIT:
                # Forgetting only costs a repeated note; the store keeps the first sighting.
                self.seen_paid.clear()
            self.seen_paid.add(token_id)
            self.store.note_paid(token_id, time.time())

    # -- minting: invoice, identifier, macaroon, the token row, and the 402 around them ----------

    async def challenge(
        self,
        request: Request,
        challenge: gate.Challenge,
        *,
        return_to: str | None = None,
        set_cookies: Sequence[str] = (),
        kind: paywall.BodyKind | None = None,
    ) -> Answer:
        rule = challenge.rule
        if not SELLING.get():
            return self._unsold(challenge)
        unsold = self.not_sold(request, rule)
        if unsold is not None:
            # Whoever asks (a refused token or charge, a spent bundle): an invoice for this
            # method would sell what cannot open it.
            return unsold
        if challenge.status != 402 and charges.L402 not in self.schemes_for(rule):
            # A 401 says an L402 credential is bad; where the rule sells none, it is no
            # credential at all: the 402 with the Payment challenge a bare request gets.
            challenge = dataclasses.replace(challenge, status=402)
        assert self.backend is not None and self.store is not None and self.rules is not None
        if not self.store.healthy:
            # The token row could not be recorded (revocation, listing, the unlock endpoint):
            # sell nothing until the store is back. Tokens sold before keep working.
            return unavailable(rule, "store", "the token store is unreachable", request.method)
        limited = await self.mint_limited(request, rule)
        if limited is not None:
            return limited
        if rule.price is not None:
            priced = await self._quote(request, challenge)
            if isinstance(priced, Answer):
                return priced
            challenge = priced
            rule = challenge.rule
        started = time.perf_counter()
        try:
            invoice = await self.backend.create_invoice(
                rule.price_sat, f"{rule.name}: {rule.description}", rule.invoice_expiry
            )
        except LightningError as exc:
            self.backend_called("create_invoice", started, ok=False)
            log.warning(f"l402: cannot create an invoice for {rule.name}: {exc}")
            return unavailable(
                rule, "backend", "the Lightning backend did not answer", request.method
            )
        self.backend_called("create_invoice", started, ok=True)
        now = time.time()
        identifier = Identifier.new(invoice.payment_hash)
        # Counted from the last moment the invoice can be paid: paying late never buys a token
        # that is already expired (or has less than valid_for left).
        valid_until = (
            None if rule.valid_for is None else int(now) + rule.invoice_expiry + rule.valid_for
        )
        if rule.pass_ is not None:
            # A pass: one token for every service it names, each until the pass ends.
            valid_until = (
                None
                if rule.pass_.valid_for is None
                else int(now) + rule.invoice_expiry + rule.pass_.valid_for
            )
        schemes = self.schemes_for(rule)
        # No token handed out where the rule sells only Payment charges; its row is written all
        # the same: the sale is counted whichever scheme pays the invoice (charges.py).
        macaroon = (
            mint(
                self.root_key_for(identifier.token_id),
                identifier,
                caveats_for_pass(rule, valid_until),
            )
            if charges.L402 in schemes
            else None
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
            kind = paywall.body_kind(get(request.fields, "Accept"))
        page = None
        if kind == "html" and macaroon is not None:
            # A browser gets the page whatever else the 402 offers: people pay from it (its
            # cookie is an L402 token); programs read the challenge lines and the problem.
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
        offer = None
        if charges.PAYMENT in schemes and challenge.status == 402:
            # A Payment challenge (and its payment-required problem) on 402s only: a 401 is
            # about a bad L402 credential, and carries the L402 lines to pay anew.
            offer = charges.offer(
                self,
                request,
                rule,
                invoice,
                identifier.token_id,
                challenge.status,
                challenge.reason,
                body,
            )
        answer = challenge_answer(
            challenge.status,
            body,
            kind,
            macaroon,
            invoice.bolt11,
            page,
            payment_lines=offer.lines if offer is not None else (),
            payment_first=offer is not None and offer.first,
            problem=offer.body if offer is not None else None,
        )
        for cookie in set_cookies:
            answer.add("Set-Cookie", cookie)
        if page is not None:
            # Only this browser may later collect the token by the invoice being paid.
            claim_age = int(invoice.expires_at - now) + paywall.CLAIM_GRACE_SECONDS
            answer.add(
                "Set-Cookie",
                paywall.claim_cookie(
                    self.secret, identifier.token_id, max_age=claim_age, secure=request.secure
                ),
            )
        answer = answer.for_method(request.method)
        answer.note = {
            "service": rule.name,
            "variant": "challenge",
            "status": challenge.status,
            "reason": challenge.reason,
        }
        return answer

    async def _quote(self, request: Request, challenge: gate.Challenge) -> gate.Challenge | Answer:
        """The challenge at the price the rule's price: function sets for this request; a 503
        when it fails or names a price the backend cannot invoice (logged with the rule)."""
        rule = challenge.rule
        try:
            price = await pricing.quote(rule, self.price_request(request, rule))
        except pricing.PriceError as exc:
            log.error(f"l402: {exc}")
            return unavailable(rule, "price", "the price could not be set", request.method)
        node = self.node
        if node is not None and node.invoice_range_msat is not None:
            low, high = node.invoice_range_msat
            if not low <= price * 1000 <= high:
                log.error(
                    f"l402: service '{rule.name}' (line {rule.line}): the price function asked "
                    f"{price} sat, but {node.backend} at {node.address} accepts "
                    f"{low / 1000:g} to {high / 1000:g} sat"
                )
                return unavailable(rule, "price", "the price could not be set", request.method)
        priced = dataclasses.replace(rule, price_sat=price)
        detail = challenge.detail
        if challenge.reason == "payment_required":
            detail = f"{rule.name} costs {price} sat"
        return gate.Challenge(priced, challenge.status, challenge.reason, detail)

    def price_request(self, request: Request, rule: Rule) -> pricing.PriceRequest:
        """What a price: function is told about the request (no credential of ours)."""
        assert self.rules is not None
        path, _, query = request.target.partition("?")
        peer = request.client[0] if request.client else None
        rules = self.rules
        # Our credentials (an L402/LSAT Authorization, our cookies: another service's live
        # token, a claim) are no more the price function's than the origin's.
        fields, _ = take_our_cookies(
            charges.drop_credentials(drop_our_authorization(request.fields))
        )
        headers: dict[str, str] = {}
        for name, value in fields:
            key = decode(name).lower()
            headers[key] = f"{headers[key]}, {decode(value)}" if key in headers else decode(value)
        return pricing.PriceRequest(
            method=request.method.upper(),
            host=host_without_port(request.host),
            path=path,
            query=query,
            headers=headers,
            client_ip=client_address(peer, fields, rules.trusted_proxies, rules.trust_unix),
            rule=rule.name,
        )

    async def mint_limited(self, request: Request, rule: Rule) -> Answer | None:
        """429 when the client is over the invoice-mint limit. Every 402 makes the backend
        create an invoice: a flood of requests must not become a flood of invoices."""
        assert self.rules is not None
        limit = self.rules.invoice_limit
        if limit is None:
            return None
        wait = await self.counters.take_rate(
            f"mint:{self.client_of(request)}", limit.interval, limit.burst, time.time()
        )
        if wait is None:
            return None
        answer = too_many_answer(wait, "new invoices").for_method(request.method)
        answer.note = {"service": rule.name, "variant": "limited", "reason": "invoices"}
        return answer

    def announce_dry_run(self, before: bool) -> None:
        """Say so when the dry run went on or off while running (the option, a rules edit)."""
        if self.started and self.dry_run != before:
            if self.dry_run:
                log.warning("l402: DRY RUN from now on: every request is forwarded, paid or not")
            else:
                log.warning("l402: dry run over: the paywall enforces the rules again")

    def backend_called(self, operation: str, started: float, *, ok: bool) -> None:
        """Tell the watchers of one backend call that began at perf_counter() `started`."""
        if self.watchers:
            seconds = time.perf_counter() - started
            self.watchers.tell("backend_called", self.door, operation, seconds, ok)

    def rule_named(self, services: Sequence[str]) -> Rule | None:
        """The priced rule a token was sold for: the first service its services= caveat names
        that is sold here. In the caveat's order, not the file's: a pass names its seller
        first, and the page that sold it must get its seller's cookie, not another's."""
        if self.rules is None:
            return None
        priced = {rule.name: rule for rule in self.rules.rules if rule.mode in PRICED_MODES}
        for name in services:
            if name in priced:
                return priced[name]
        return None


def drop_capability_referers(fields: Fields) -> Fields:
    """`fields` without a Referer that names a private feed's URL (in any case or escaping)."""
    for name, value in fields:
        if name.lower() == b"referer" and _names_a_capability(value):
            break
    else:
        return fields
    return tuple(
        (name, value)
        for name, value in fields
        if not (name.lower() == b"referer" and _names_a_capability(value))
    )


def _names_a_capability(referer: bytes) -> bool:
    return feeds.FEED_PREFIX.encode().lower() in unquote_to_bytes(referer).lower()


def host_without_port(host: str) -> str:
    """ "example.com:8080" -> "example.com", "[::1]:8080" -> "::1"."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else host


def caveats_for_pass(rule: Rule, valid_until: int | None) -> list[str]:
    """The caveats of a token the rule sells: for its own service, or for every service of
    its pass (`services=a:0,b:0` and one `<name>_valid_until` each); the rule's capabilities
    restrict its own service only."""
    caveats = caveats_for(rule.name, valid_until=valid_until, capabilities=rule.capabilities)
    if rule.pass_ is None:
        return caveats
    others = [name for name in rule.pass_.services if name != rule.name]
    caveats[0] = "services=" + ",".join(f"{name}:0" for name in (rule.name, *others))
    for name in others:
        caveats += caveats_for(name, valid_until=valid_until, capabilities=None)[1:]
    return caveats


# The door -> the setting that gives the paywall's default schemes there.
_SCHEMES_SETTING = {"mitmproxy": "l402_schemes", "ASGI": "schemes=", "nginx": "--schemes"}


def _paid_how(note: Mapping[str, Any]) -> str:
    """The flow comment's words for how the paid variant was bought."""
    if note.get("freebie"):
        return "L402 free trial"
    return "Payment charge" if note.get("scheme") == charges.PAYMENT else "L402 paid"


def unavailable(rule: Rule | None, reason: str, message: str, method: str) -> Answer:
    """503 with Retry-After: the paywall cannot judge or sell right now (fail closed)."""
    answer = unavailable_answer(message).for_method(method)
    answer.note = {"variant": "unavailable", "reason": reason}
    if rule is not None:
        answer.note["service"] = rule.name
    return answer


# The note's variant -> the decision's kind (events.py).
_KIND_OF_VARIANT = {
    "challenge": events.CHALLENGE,
    "limited": events.LIMITED,
    "refused": events.REFUSED,
    "denied": events.DENIED,
    "unavailable": events.UNAVAILABLE,
    "unlock": events.UNLOCK,
    "endpoint": events.ENDPOINT,
    "free": events.FREE,
}


def kind_of(outcome: Outcome) -> str:
    """What kind of decision an outcome is (events.KINDS)."""
    note = outcome.note
    if note is None:
        return events.UNAVAILABLE if isinstance(outcome, Answer) else events.PASS
    pretended = note.get("dry_run")
    if pretended is not None:
        return str(pretended)
    variant = note.get("variant")
    if variant == "paid":
        return events.FREEBIE if note.get("freebie") else events.GRANT
    # The pay page's endpoint notes the challenge it made: a challenge like any other.
    fallback = events.ENDPOINT if isinstance(outcome, Answer) else events.PASS
    return _KIND_OF_VARIANT.get(variant, fallback)


def decision_of(door: str, method: str, outcome: Outcome, seconds: float) -> Decision:
    """The event for one judged request, from its outcome and the note the engine left on it."""
    note = outcome.note or {}
    token = note.get("token_id")
    dry_run = "dry_run" in note
    if dry_run:
        status = note.get("dry_status")
    else:
        status = outcome.status if isinstance(outcome, Answer) else None
    reason = note.get("reason")
    return Decision(
        door=door,
        kind=kind_of(outcome),
        service=note.get("service"),
        status=status,
        reason=None if reason is None else str(reason),
        token=None if token is None else str(token)[: events.TOKEN_PREFIX_LEN],
        seconds=seconds,
        method=method,
        dry_run=dry_run,
    )


def pretend(fields: Fields, outcome: Outcome) -> Forward:
    """Dry run: what the paywall decided goes along in the note (the door sends it back as
    X-L402-Dry-Run); the request goes on. An answer becomes the request as it came, less our
    credentials and the headers no client may send, and its response is marked as a paid one
    for caches."""
    kind = kind_of(outcome)
    if isinstance(outcome, Forward):
        if outcome.note is not None:
            outcome.note["dry_run"] = kind
        return outcome
    note: dict[str, Any] = dict(outcome.note or {})
    # What the paywall would have withheld goes out marked as a paid answer (private, varying
    # by credential): no shared cache keeps it to serve for nothing after the dry run.
    note.update(variant="paid", dry_run=kind, dry_status=outcome.status)
    note.pop("offer", None)
    return Forward(fields, note=note)
