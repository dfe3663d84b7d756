"""The mitmproxy server addon: a Lightning paywall in front of an origin.

    mitmdump --mode reverse:http://127.0.0.1:8080 -s addons/server.py \
        --set l402_rules=rules/podcast.yaml

Glue only: decisions live in gate.py, the protocol in l402/, state in store/ and lightning/.
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

from . import gate, paths
from .l402.headers import format_challenge
from .l402.identifier import Identifier
from .l402.token import caveats_for, derive_root_key, mint
from .lightning import InvoiceBackend, LightningError, open_backend
from .rules import PaidVariant, Rule, RulesError, RuleSet, load_rules
from .store import IssuedToken, ServerStore, StoreError, open_server_store

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


def warn_about_unchanged_upgrades(rules: RuleSet) -> None:
    for rule in rules.rules:
        if rule.mode == "upgrade" and rule.paid == PaidVariant():
            log.warning(
                f"l402: service '{rule.name}' is in upgrade mode but has no 'paid:' variant; "
                "paying clients get the same content as everyone else"
            )


def wants_text(accept: str | None) -> bool:
    """A person's client (browser, curl asking for text) rather than an API client."""
    if not accept:
        return False
    accept = accept.lower()
    return ("text/html" in accept or "text/plain" in accept) and "application/json" not in accept


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
    status: int, body: Mapping[str, Any], as_text: bool, macaroon: str, bolt11: str
) -> http.Response:
    if as_text:
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
        ]
    )
    return http.Response.make(status, content, headers)


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


def headers_only_for_head(response: http.Response, method: str) -> http.Response:
    """A response to HEAD must not carry a body: a keep-alive client would read it as the next
    response. Content-Length still tells what a GET would get."""
    if method.upper() == "HEAD":
        length = len(response.raw_content or b"")
        response.content = b""
        response.headers["Content-Length"] = str(length)
    return response


class L402Server:
    def __init__(self) -> None:
        self.rules: RuleSet | None = None
        self.rules_signature: tuple[int, int] | None = None
        self.backend: InvoiceBackend | None = None
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
        loader.add_option(
            "l402_rules",
            str,
            "",
            """
            Path of the YAML rules file: which requests are priced, how much, and what paying
            unlocks. Edits are picked up while running; a broken edit keeps the previous rules.
            """,
        )
        loader.add_option(
            "l402_backend",
            str,
            "dev",
            """
            Lightning invoice backend URI. "dev" (default) is the embedded dev ledger, for demos and
            tests only; "dev:<wallet>" credits another dev wallet.
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

    def configure(self, updated: set[str]) -> None:
        if "l402_rules" in updated:
            try:
                self.rules = self._load_rules_option()
            except RulesError as exc:
                self._refuse("l402_rules", str(exc))
            else:
                self.misconfigured.pop("l402_rules", None)
        if "l402_backend" in updated or "l402_dev_ledger" in updated:
            try:
                backend = open_backend(ctx.options.l402_backend, dev_ledger=self.dev_ledger_path)
            except LightningError as exc:
                self._refuse("l402_backend", str(exc))
                return
            self.misconfigured.pop("l402_backend", None)
            previous, self.backend = self.backend, backend
            if previous is not None:
                self._close_later(previous)

    def _refuse(self, option: str, problem: str) -> None:
        """Reject a bad option value.

        While running, OptionsError makes mitmproxy keep the previous value. At startup the
        script loader would print it with a traceback; one logged error line says the same and
        mitmproxy still exits before it listens. Until then the addon fails closed.
        """
        message = f"{option}: {problem}"
        if self.started:
            raise exceptions.OptionsError(message)
        log.error(f"l402: {message}")
        self.misconfigured[option] = message

    def _close_later(self, backend: InvoiceBackend) -> None:
        """configure() is sync; a replaced backend's connection is closed on the event loop."""
        try:
            task = asyncio.get_running_loop().create_task(backend.close())
        except RuntimeError:  # no loop yet: nothing was opened either
            return
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    def _load_rules_option(self) -> RuleSet | None:
        path = ctx.options.l402_rules
        if not path:
            log.warning("l402: no l402_rules set; every request passes through unpriced")
            return None
        rules = load_rules(path)
        self.rules_signature = file_signature(path)
        log.info(f"l402: {len(rules.rules)} priced service(s) from {path}")
        warn_about_unchanged_upgrades(rules)
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
        self.tasks = [
            asyncio.create_task(self._every(FLUSH_SECONDS, self._flush)),
            asyncio.create_task(self._every(REVOCATION_POLL_SECONDS, self._poll_revocations)),
            asyncio.create_task(self._every(RULES_POLL_SECONDS, self._reload_rules_if_changed)),
        ]
        self.started = True
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
        if self.rules is None:
            return
        request = flow.request
        rule = self.rules.match(request.pretty_host, request.path, request.method)
        if rule is None:
            return
        if not self.ready.is_set():
            await self.ready.wait()
        try:
            await self._judge(flow, rule)
        except Exception:
            # Fail closed: forwarding a priced request we could not judge would give it away.
            log.exception(f"l402: internal error on {request.method} {request.path}")
            flow.response = headers_only_for_head(
                unavailable_response("internal error in the paywall"), request.method
            )

    async def _judge(self, flow: http.HTTPFlow, rule: Rule) -> None:
        request = flow.request
        decision = gate.decide(
            rule=rule,
            authorization=request.headers.get("Authorization"),
            accept_authenticate=request.headers.get("Accept-Authenticate"),
            root_key_for=self.root_key_for,
            revoked=self.revoked,
            now=time.time(),
            method=request.method,
            cache=self.cache,
        )
        match decision:
            case gate.Grant():
                self._grant(flow, decision)
            case gate.Challenge():
                await self._challenge(flow, decision)
            case gate.Free():
                flow.metadata["l402"] = {"service": rule.name, "variant": "free"}

    def root_key_for(self, token_id: bytes) -> bytes:
        return derive_root_key(self.secret, token_id)

    def _grant(self, flow: http.HTTPFlow, grant: gate.Grant) -> None:
        # The credential is ours, not the origin's: never forward it.
        del flow.request.headers["Authorization"]
        apply_paid_variant(flow.request, grant.rule.paid)
        token_id = grant.token.identifier.token_id
        flow.metadata["l402"] = {
            "service": grant.rule.name,
            "variant": "paid",
            "token_id": token_id.hex(),
        }
        flow.comment = f"L402 paid: {grant.rule.name}"
        if token_id not in self.seen_paid and self.store is not None:
            if len(self.seen_paid) >= SEEN_PAID_LIMIT:
                # Forgetting only costs a repeated note; the store keeps the first sighting.
                self.seen_paid.clear()
            self.seen_paid.add(token_id)
            self.store.note_paid(token_id, time.time())

    async def _challenge(self, flow: http.HTTPFlow, challenge: gate.Challenge) -> None:
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
        flow.response = headers_only_for_head(
            make_challenge_response(
                challenge.status,
                body,
                wants_text(flow.request.headers.get("Accept")),
                macaroon,
                invoice.bolt11,
            ),
            flow.request.method,
        )
        flow.metadata["l402"] = {
            "service": rule.name,
            "variant": "challenge",
            "status": challenge.status,
            "reason": challenge.reason,
        }

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
            log.warning(f"l402: kept the previous rules; the edited file is broken: {exc}")
            return
        self.rules = rules
        warn_about_unchanged_upgrades(rules)
        log.info(f"l402: reloaded {len(rules.rules)} priced service(s) from {Path(path)}")
