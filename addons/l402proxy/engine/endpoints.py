"""The paywall's own endpoints under /.l402/ (never forwarded): unlock, pay, and feed (a private
podcast feed's URL for a credential; the feeds themselves, /.l402/feed/<capability>/..., are
engine/feeds.py's)."""

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .. import gate, paywall
from ..l402.headers import Credential
from ..l402.token import TokenError
from ..lightning import LightningError
from ..lightning.base import InvoiceNotFound, LookupUnsupported
from ..rules import PRICED_MODES, AmbiguousPath, PathError, normalize_path
from . import charges, feeds
from .answers import RETRY_AFTER_SECONDS, Answer, json_answer, page_answer, unavailable_answer
from .request import Request, get, get_all, has, take_our_cookies

if TYPE_CHECKING:
    from .core import Paywall

log = logging.getLogger(__name__)


@dataclass
class _Notes:
    """What an endpoint noted so far: kept even when it fails halfway."""

    note: dict[str, Any] | None = None
    comment: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def endpoint(engine: "Paywall", request: Request) -> Answer:
    path = normalize_path(request.target)
    if not engine.ready.is_set():
        await engine.ready.wait()
    notes = _Notes()
    try:
        if path == paywall.UNLOCK_PATH:
            if request.method.upper() != "POST":
                answer = json_answer(
                    405, {"error": "method_not_allowed", "message": "use POST"}, {"Allow": "POST"}
                )
            else:
                answer = await unlock(engine, request, notes)
        elif path == paywall.PAY_PATH:
            if request.method.upper() not in ("GET", "HEAD"):
                answer = page_answer(405, "Method not allowed", "Use GET.")
                answer.add("Allow", "GET, HEAD")
            else:
                answer = await pay_page(engine, request, notes)
        elif path == feeds.MINT_PATH:
            if request.method.upper() != "POST":
                answer = json_answer(
                    405, {"error": "method_not_allowed", "message": "use POST"}, {"Allow": "POST"}
                )
            else:
                answer = await feeds.mint_endpoint(engine, request)
                notes.note = answer.note or {"variant": "endpoint", "endpoint": "feed"}
        else:
            answer = page_answer(404, "Not found", "No such paywall page.")
    except Exception:
        log.exception(f"l402: internal error on {request.method} {paywall.ENDPOINT_PREFIX}")
        answer = unavailable_answer("internal error in the paywall")
    answer = answer.for_method(request.method)
    answer.note = notes.note if notes.note is not None else {"variant": "endpoint"}
    answer.comment = notes.comment
    return answer


async def unlock(engine: "Paywall", request: Request, notes: _Notes) -> Answer:
    """POST /.l402/unlock: the page asks whether its invoice is paid; if so, the cookie."""
    fields = request.fields
    if (get(fields, "Sec-Fetch-Site") or "").lower() == "cross-site":
        # Only the paywall page itself (same origin) may store a credential in this browser.
        return json_answer(
            403, {"error": "cross_site", "message": "unlock requests must come from this site"}
        )
    try:
        asked = paywall.parse_unlock_body(request.body or b"", get(fields, "Content-Type"))
    except paywall.BadUnlockRequest as exc:
        return json_answer(exc.status, {"error": "bad_request", "message": str(exc)})
    try:
        # Signature first: a forged or foreign macaroon never costs a backend lookup.
        identifier, info = paywall.verify_signature(asked.macaroon, engine.root_key_for)
    except TokenError as exc:
        return json_answer(
            401,
            {
                "error": "invalid_token",
                "reason": exc.reason,
                "message": "This payment request was not issued here: reload for a new one.",
            },
        )
    rule = engine.rule_named(info.services)
    if rule is None:
        return json_answer(
            404,
            {
                "error": "unknown_service",
                "message": "What this invoice paid for is no longer sold here.",
            },
        )
    notes.note = {"service": rule.name, "variant": "unlock", "unlocked": False}
    if identifier.token_id in engine.revoked:
        return json_answer(
            403, {"error": "refused", "reason": "revoked", "message": "This token was revoked."}
        )
    preimage = asked.preimage
    if preimage is None and not paywall.holds_claim(
        get_all(fields, "cookie"), engine.secret, identifier.token_id
    ):
        return json_answer(
            403,
            {
                "error": "not_this_browser",
                "message": (
                    "Only the browser this invoice was shown to can open it without the "
                    "payment's preimage."
                ),
            },
        )
    if preimage is None:
        assert engine.backend is not None
        started = time.perf_counter()
        try:
            state = await engine.backend.lookup_invoice(identifier.payment_hash)
        except LookupUnsupported:
            return json_answer(
                501,
                {
                    "error": "lookup_unsupported",
                    "message": "This paywall cannot see QR payments: pay with a WebLN wallet.",
                },
            )
        except InvoiceNotFound:
            engine.backend_called("lookup_invoice", started, ok=True)  # it answered
            return json_answer(
                404,
                {
                    "error": "unknown_invoice",
                    "message": "The Lightning node does not know this invoice: reload.",
                },
            )
        except LightningError as exc:
            engine.backend_called("lookup_invoice", started, ok=False)
            log.warning(f"l402: cannot look up an invoice for {rule.name}: {exc}")
            return json_answer(
                503,
                {
                    "error": "backend_unavailable",
                    "message": "The Lightning node did not answer; trying again.",
                },
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        engine.backend_called("lookup_invoice", started, ok=True)
        if not state.settled or state.preimage is None:
            return json_answer(202, {"unlocked": False})
        preimage = state.preimage
    now = time.time()
    try:
        token = gate.check_credential(
            Credential("L402", (asked.macaroon,), preimage),
            service=rule.name,
            root_key_for=engine.root_key_for,
            revoked=engine.revoked,
            now=now,
        )
    except TokenError as exc:
        return json_answer(
            401 if exc.invalid else 403,
            {"error": "refused", "reason": exc.reason, "message": f"Not unlocked: {exc}."},
        )
    cookies = paywall.credential_cookies(
        rule.name,
        asked.macaroon,
        preimage,
        path=paywall.scope_path(rule),
        max_age=paywall.cookie_max_age(token.valid_until, now),
        secure=request.secure,
    )
    cookies.append(paywall.clearing_claim_cookie(identifier.token_id, secure=request.secure))
    expires_at = None if token.valid_until is None else int(token.valid_until)
    body: dict[str, Any] = {"unlocked": True, "service": rule.name, "expires_at": expires_at}
    try:
        # The seller's private feed, when it sells one: the page offers it to subscribe to.
        url = await feeds.mint(engine, request, rule, asked.macaroon, preimage, token)
    except Exception:  # logged and counted there; the unlock itself stands
        url = None
    if url is not None:
        body["feed_url"] = url
    answer = json_answer(200, body)
    for cookie in cookies:
        answer.add("Set-Cookie", cookie)
    notes.note["unlocked"] = True
    notes.comment = f"L402 unlocked: {rule.name}"
    engine.note_paid(token.identifier.token_id)
    return answer


def query_value(target: str, name: str) -> str | None:
    """The first value of one query parameter, read as mitmproxy's request.query reads it."""
    query = urlsplit(target).query
    for key, value in parse_qsl(query, keep_blank_values=True, errors="surrogateescape"):
        if key == name:
            return value
    return None


async def pay_page(engine: "Paywall", request: Request, notes: _Notes) -> Answer:
    """GET /.l402/pay?path=<priced path>[&return=<local path>][&subscribe=1]: a fresh paywall
    page (subscribe=1: a browser that paid already is shown its private feed, if the token
    bought one, instead of being sent back at once)."""
    target = paywall.safe_local_path(query_value(request.target, "path"))
    rule = None
    if target is not None and engine.rules is not None:
        try:
            rule = engine.rules.match(request.host, target, "GET")
        except PathError as exc:
            # The same judgement as the request itself would get: nothing sold for it.
            title = "Ambiguous address" if isinstance(exc, AmbiguousPath) else "Bad address"
            return page_answer(400, title, str(exc))
    if target is None or rule is None or rule.mode not in PRICED_MODES:
        return page_answer(404, "Nothing to pay for", "This site sells nothing at that address.")
    if charges.L402 not in engine.schemes_for(rule):
        # The page sells an L402 token (its cookie); this rule sells Payment charges only.
        return page_answer(
            404,
            "Nothing to pay for here",
            "This address is sold per request to programs that pay with the Payment scheme; "
            "there is no page to pay for it from.",
        )
    return_to = paywall.safe_local_path(query_value(request.target, "return")) or target
    cookies = take_our_cookies(request.fields)[1] if has(request.fields, "cookie") else {}
    cookie = cookies.get(paywall.cookie_name(rule.name))
    if cookie is not None:
        held = gate.decide(
            rule=rule,
            authorization=f"L402 {cookie}",
            accept_authenticate=None,
            root_key_for=engine.root_key_for,
            revoked=engine.revoked,
            now=time.time(),
            method="GET",
            cache=engine.cache,
        )
        if isinstance(held, gate.Grant):
            # Already paid: nothing to sell twice. Straight back, or, for a "Subscribe ad-free"
            # link (&subscribe=1), the private feed the token bought, to copy.
            if query_value(request.target, "subscribe") == "1":
                subscribe = await _feed_page(engine, request, held, return_to)
                if subscribe is not None:
                    return subscribe
            return Answer.make(303, b"", {"Location": return_to, "Cache-Control": "no-store"})
    accept = get(request.fields, "Accept")
    kind = paywall.body_kind(accept)
    if kind == "json" and "application/json" not in (accept or "").lower():
        kind = "html"  # this address is linked from pages: the page unless JSON is asked for
    if rule.rate_limits:
        # The page sells what the path sells: the same per-IP limits apply to it.
        limited = await engine.rate_limited(request, rule, token_id=None)
        if limited is not None:
            return limited
    answer = await engine.challenge(
        # A price function prices the address the page sells, not the page's own.
        dataclasses.replace(request, target=target),
        gate.Challenge(rule, 402, "payment_required", f"{rule.name} costs {rule.price_sat} sat"),
        return_to=return_to,
        kind=kind,
    )
    notes.note = answer.note if answer.note is not None else {}
    notes.note["endpoint"] = "pay"
    return answer


async def _feed_page(
    engine: "Paywall", request: Request, held: gate.Grant, return_to: str
) -> Answer | None:
    """The page with the private feed a browser's paid cookie holds (its seller's feed), or
    None when it buys none (or it cannot be recorded now: the browser goes on as before)."""
    if "application/json" in (get(request.fields, "Accept") or "").lower():
        return None  # a program: it has its credential, and POST /.l402/feed
    seller = engine.rule_named(tuple(name for name, _ in held.token.services))
    if seller is None or seller.feed is None or len(held.credential.macaroons) != 1:
        return None
    try:
        url = await feeds.mint(
            engine, request, seller, held.credential.macaroons[0], held.credential.preimage,
            held.token,
        )  # fmt: skip
    except Exception:  # logged and counted there
        return None
    if url is None:
        return None
    page = paywall.render_feed_page(seller.description, url, return_to)
    return Answer.make(
        200,
        page.encode(),
        {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            **dict(paywall.PAGE_HEADERS),
        },
    )
