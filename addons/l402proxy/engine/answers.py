"""The engine's outcomes as plain data, the answers it makes, and the response-phase helpers.

An `Answer` is sent to the client as it is (the request never reaches the origin); a `Forward`
says what to send to the origin instead of the request as it came. Both carry the `note` a door
keeps for the response phase (mitmproxy: flow.metadata["l402"]) and an optional `comment`.
"""

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import paywall
from ..l402.headers import format_challenge
from ..l402.payment import PROBLEM_CONTENT_TYPE, RECEIPT_HEADER
from ..rules import PathError, Rule
from .request import Fields, get, has, remove, set_one

RETRY_AFTER_SECONDS = 10
# On a dry run's responses: what the paywall would have done (events.KINDS).
DRY_RUN_HEADER = "X-L402-Dry-Run"
# What is left of a bundle token after this request: "<n> <unit>" (requests, bytes, units).
BALANCE_HEADER = "X-L402-Balance"
# RECEIPT_HEADER (Payment-Receipt): a Payment charge's receipt, on the paid answer it bought.
# The statuses a receipt goes out with: success only (an error never carries one), and exactly
# those nginx's add_header adds a header to (without `always`), so every door sends it on the
# same answers.
RECEIPT_STATUSES = frozenset({200, 201, 204, 206, 301, 302, 303, 304, 307, 308})


@dataclass(slots=True)
class Answer:
    """A response the paywall gives itself: status, header fields in order (Content-Length
    included, as the last one the engine wrote), body. For HEAD the body is empty and
    Content-Length still tells what a GET would get."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    note: dict[str, Any] | None = None
    comment: str | None = None

    @classmethod
    def make(
        cls,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | Sequence[tuple[bytes, bytes]] = (),
    ) -> "Answer":
        if isinstance(headers, Mapping):
            # surrogateescape: a Location built from a query may carry raw bytes (`/%FF`).
            fields = [
                (name.encode(), value.encode("utf-8", "surrogateescape"))
                for name, value in headers.items()
            ]
        else:
            fields = list(headers)
        # Where mitmproxy's Response.make puts it, so every door sends the same bytes.
        fields.append((b"content-length", str(len(body)).encode()))
        return cls(status, fields, body)

    def add(self, name: str, value: str) -> None:
        self.headers.append((name.encode(), value.encode("utf-8", "surrogateescape")))

    def header(self, name: str) -> str | None:
        return get(tuple(self.headers), name)

    def for_method(self, method: str) -> "Answer":
        """A response to HEAD must not carry a body: a keep-alive client would read it as the
        next response. Content-Length keeps the length a GET would get."""
        if method.upper() == "HEAD" and self.body:
            length = len(self.body)
            self.body = b""
            self.headers = list(set_one(tuple(self.headers), "content-length", str(length)))
        return self


# Not frozen: a frozen dataclass costs ~2 us more to build, on every request.
@dataclass(slots=True)
class Forward:
    """Send the request on. `headers` are the fields to forward (our Authorization and
    cookies removed, a non-WebSocket Upgrade stripped, the paid variant's set_headers applied);
    `path` the new target when the paid variant rewrites it (None: unchanged); `upstream` the
    paid variant's other origin (None: the door's own). `set_headers` repeats the paid
    variant's headers for doors that change Host when they switch origin (they win over it).
    `note` is None for a request no rule covers."""

    headers: Fields
    path: str | None = None
    upstream: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    note: dict[str, Any] | None = None
    comment: str | None = None


Outcome = Answer | Forward


_HOW_TO_PAY_L402 = (
    "Pay the invoice with a Lightning wallet, then repeat the request with the header "
    "'Authorization: L402 <macaroon>:<preimage hex>'."
)
_HOW_TO_PAY_PAYMENT = (
    "Pay the invoice with a Lightning wallet, then repeat the request with the header "
    "'Authorization: Payment <credential>' answering the Payment challenge "
    "(draft-httpauth-payment); it pays for that one request."
)


def challenge_body(
    rule: Rule,
    status: int,
    reason: str,
    detail: str,
    bolt11: str,
    macaroon: str | None,
    expires_at: float,
) -> dict[str, Any]:
    """The facts of a challenge as the JSON body says them; `macaroon` None: the rule sells no
    L402 token (only Payment charges), and the body says how to pay with a charge."""
    body: dict[str, Any] = {
        "error": "payment_required" if status == 402 else "invalid_token",
        "reason": reason,
        "message": detail,
        "service": rule.name,
        "description": rule.description,
        "price_sat": rule.price_sat,
        "valid_for": rule.valid_for,
        "invoice": bolt11,
    }
    if macaroon is not None:
        body["macaroon"] = macaroon
    body["invoice_expires_at"] = int(expires_at)
    body["how_to_pay"] = _HOW_TO_PAY_L402 if macaroon is not None else _HOW_TO_PAY_PAYMENT
    return body


def challenge_text(body: Mapping[str, Any]) -> str:
    valid = body["valid_for"]
    lifetime = "for good" if valid is None else f"for {valid} seconds"
    macaroon = f"Macaroon:\n{body['macaroon']}\n\n" if "macaroon" in body else ""
    return (
        f"{'402 Payment Required' if body['error'] == 'payment_required' else '401 Unauthorized'}"
        f"\n\n{body['description']}: {body['price_sat']} sat ({body['message']}).\n"
        f"Paying unlocks '{body['service']}' {lifetime}.\n\n"
        f"Lightning invoice:\n{body['invoice']}\n\n"
        f"{macaroon}{body['how_to_pay']}\n"
    )


def challenge_answer(
    status: int,
    body: Mapping[str, Any],
    kind: paywall.BodyKind,
    macaroon: str | None,
    bolt11: str,
    page: str | None = None,
    *,
    payment_lines: Sequence[str] = (),
    payment_first: bool = False,
    problem: bytes | None = None,
) -> Answer:
    """The 402/401 with its challenge lines: LSAT and L402 when `macaroon` is given (the rule
    sells tokens), the Payment ones (`payment_lines`) after them, or first when the client ranks
    Payment first. The body: the HTML `page` for a browser; else, with a Payment challenge, the
    RFC 9457 `problem` (application/problem+json; it carries the JSON body's facts too); else
    JSON or text."""
    extra: list[tuple[bytes, bytes]] = []
    if kind == "html" and page is not None:
        content, content_type = page.encode(), "text/html; charset=utf-8"
        extra = [(name.encode(), value.encode()) for name, value in paywall.PAGE_HEADERS]
    elif payment_lines and problem is not None:
        content, content_type = problem, PROBLEM_CONTENT_TYPE
    elif kind == "text":
        content, content_type = challenge_text(body).encode(), "text/plain; charset=utf-8"
    else:
        content, content_type = json.dumps(body).encode(), "application/json"
    lines: list[tuple[bytes, bytes]] = []
    if macaroon is not None:
        # LSAT first: old clients read only the first WWW-Authenticate line and only macaroon=.
        lines = [
            (b"WWW-Authenticate", format_challenge("LSAT", macaroon, bolt11).encode()),
            (
                b"WWW-Authenticate",
                format_challenge("L402", macaroon, bolt11, spec_params=True).encode(),
            ),
        ]
    offered = [(b"WWW-Authenticate", line.encode()) for line in payment_lines]
    lines = [*offered, *lines] if payment_first else [*lines, *offered]
    return Answer.make(
        status,
        content,
        [
            *lines,
            (b"Cache-Control", b"no-store"),
            (b"Content-Type", content_type.encode()),
            *extra,
        ],
    )


def json_answer(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> Answer:
    """An answer of the proxy's own endpoints: JSON, never cached."""
    return Answer.make(
        status,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
    )


def page_answer(status: int, title: str, message: str) -> Answer:
    return Answer.make(
        status,
        paywall.render_message_page(title, message).encode(),
        {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            **dict(paywall.PAGE_HEADERS),
        },
    )


def unavailable_answer(message: str) -> Answer:
    return Answer.make(
        503,
        f"Payment is unavailable right now: {message}\nPlease try again shortly.\n".encode(),
        {
            "Retry-After": str(RETRY_AFTER_SECONDS),
            "Cache-Control": "no-store",
            "Content-Type": "text/plain; charset=utf-8",
        },
    )


def too_many_answer(wait: float, what: str) -> Answer:
    """429: a rate limit or the invoice-mint limit is spent; Retry-After says when to ask again."""
    seconds = max(1, math.ceil(wait))
    return Answer.make(
        429,
        f"Too many requests for {what}: try again in {seconds} s.\n".encode(),
        {
            "Retry-After": str(seconds),
            "Cache-Control": "no-store",
            "Content-Type": "text/plain; charset=utf-8",
        },
    )


def not_found_answer() -> Answer:
    """A path only a paid rewrite may reach (mode: deny): as if it did not exist."""
    return Answer.make(
        404,
        b"Not found.\n",
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    )


def not_sold_answer(method: str, service: str, allowed: Sequence[str]) -> Answer:
    """405: the rule's capabilities list no method like this one, so no token or charge it sells
    opens it, and no invoice is made for it (RFC 9110: a 405 names the methods in Allow)."""
    return Answer.make(
        405,
        f"{service} sells nothing that opens {method.upper()} here: "
        f"it sells {', '.join(allowed) or 'no method'}.\n".encode(),
        {
            "Allow": ", ".join(allowed),
            "Cache-Control": "no-store",
            "Content-Type": "text/plain; charset=utf-8",
        },
    )


def bad_path_answer(problem: PathError) -> Answer:
    """A path the proxy cannot judge: origins may read it as a place the rules price otherwise,
    or it is no well-formed path. Never forwarded, and no invoice is made for it."""
    return bad_request_answer(str(problem))


def bad_request_answer(message: str) -> Answer:
    """400, one plain line: a request the paywall will not judge or forward."""
    return Answer.make(
        400,
        f"{message}\n".encode(),
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    )


# -- the response phase: what the origin's answer to a priced URL gets -----------------------

# What decides between a priced URL's free and paid answers.
VARIANT_VARY = ("Authorization", "Cookie", "Accept-Authenticate")
# And, in upgrade mode at a rule that sells Payment charges, whether the client asks for one.
PAYMENT_VARY = "Accept-Payment"
# Directives that let a shared cache keep an answer for everyone.
_SHARED_CACHE_DIRECTIVES = ("public", "s-maxage")

# Cache directives for CDNs only, which take precedence there over Cache-Control.
_CDN_CACHE_FIELDS = frozenset(
    {b"cdn-cache-control", b"surrogate-control", b"cloudflare-cdn-cache-control"}
)
_VARY_FIELD = (b"Vary", ", ".join(VARIANT_VARY).encode())
_VARY_ACCEPT_FIELD = (b"Vary", ", ".join((*VARIANT_VARY, "Accept")).encode())
_PRIVATE_FIELD = (b"Cache-Control", b"private")


def variant_vary(*, by_accept: bool = False, by_payment: bool = False) -> tuple[str, ...]:
    """What an answer of a priced URL varies by: VARIANT_VARY, Accept when it may carry the
    upgrade offer, Accept-Payment when a Payment client gets the challenge instead (upgrade
    mode)."""
    return (
        *VARIANT_VARY,
        *(("Accept",) if by_accept else ()),
        *((PAYMENT_VARY,) if by_payment else ()),
    )


def mark_variant(
    fields: Fields, *, paid: bool, by_accept: bool = False, by_payment: bool = False
) -> Fields:
    """Tell caches that a priced URL's answer depends on who asks, so a browser that just paid
    does not replay its cached free copy, and a shared cache never hands a paid answer (bought
    with a cookie, which shared caches do store) to someone else. The response's fields back."""
    # On every paid response: one pass over the raw fields when the origin set neither header.
    names = {name.lower() for name, _ in fields}
    if paid and not names.isdisjoint(_CDN_CACHE_FIELDS):
        # A CDN obeys these over Cache-Control (and may ignore Vary): a paid answer must not
        # be kept for others by one.
        fields = tuple(field for field in fields if field[0].lower() not in _CDN_CACHE_FIELDS)
        names -= _CDN_CACHE_FIELDS
    if b"vary" not in names and (not paid or b"cache-control" not in names):
        if by_payment:
            wanted = variant_vary(by_accept=by_accept, by_payment=True)
            added = [(b"Vary", ", ".join(wanted).encode())]
        else:
            added = [_VARY_ACCEPT_FIELD if by_accept else _VARY_FIELD]
        if paid:
            added.append(_PRIVATE_FIELD)
        return (*fields, *added)
    vary = [v.strip() for v in (get(fields, "Vary") or "").split(",") if v.strip()]
    if "*" not in vary:
        have = {v.lower() for v in vary}
        wanted = variant_vary(by_accept=by_accept, by_payment=by_payment)
        vary += [v for v in wanted if v.lower() not in have]
        fields = set_one(fields, "Vary", ", ".join(vary))
    if paid:
        directives = [
            d.strip()
            for d in (get(fields, "Cache-Control") or "").split(",")
            if d.strip() and d.split("=", 1)[0].strip().lower() not in _SHARED_CACHE_DIRECTIVES
        ]
        if not any(d.lower() in ("private", "no-store") for d in directives):
            directives.insert(0, "private")
        fields = set_one(fields, "Cache-Control", ", ".join(directives))
    return fields


# What no origin's answer takes to the client, whatever its variant (free, unpriced, a dry run):
# a Payment-Receipt is the paywall's word for a charge it took (mark_receipt adds its own).
_FROM_PAYWALL_ONLY = frozenset({RECEIPT_HEADER.lower().encode()})


@functools.lru_cache(maxsize=8)
def hidden_from_client(usage: frozenset[bytes]) -> frozenset[bytes]:
    """The lower-case names a door strips from every answer it forwards: the origin's usage
    headers (metering.usage_headers of the rules in force) and its own Payment-Receipt (cached:
    one set per rules file, not one per answer)."""
    return usage | _FROM_PAYWALL_ONLY


def mark_receipt(fields: Fields, receipt: str | None, status: int) -> Fields:
    """A paid answer's Payment-Receipt: a Payment charge's own (note["receipt"]) on a successful
    answer (RECEIPT_STATUSES), and never the origin's: the paywall vouches for the receipts on
    the answers it sells."""
    if receipt is not None and status in RECEIPT_STATUSES:
        return set_one(fields, RECEIPT_HEADER, receipt)
    return remove(fields, RECEIPT_HEADER) if has(fields, RECEIPT_HEADER) else fields


def note_cookies(note: Mapping[str, Any] | None) -> Sequence[str]:
    """Set-Cookie values the response must carry (a stale cookie of ours to forget)."""
    return note.get("clear_cookies", ()) if note else ()


def wants_banner(status: int, fields: Fields) -> bool:
    """Could the upgrade banner go into this answer (a 200 HTML page)? The door decodes and
    re-encodes the body (content coding, charset) and calls paywall.insert_banner."""
    return status == 200 and (get(fields, "Content-Type") or "").lower().startswith("text/html")
