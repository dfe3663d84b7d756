"""The paywall page for people: HTML, invoice QR code, L402 cookie. Pure: no I/O, no mitmproxy.

A browser that asks for priced content gets a page it can pay from (WebLN button, QR code for a
phone wallet, copy button, `lightning:` link). The page asks the proxy under `ENDPOINT_PREFIX`
whether the invoice was paid and receives the credential as an HttpOnly cookie, which the proxy
then accepts exactly like an `Authorization: L402` header.
"""

import hashlib
import hmac
import html
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlencode, urlsplit

import segno
from pymacaroons import Verifier
from pymacaroons.exceptions import MacaroonException

from .l402.encoding import b64decode_any, b64encode_std
from .l402.identifier import Identifier
from .l402.token import TokenError, TokenInfo, decode_macaroon, identifier_of, inspect
from .rules import PLAIN_PATH, Rule, scope_path

__all__ = [
    "CLAIM_GRACE_SECONDS",
    "COOKIE_PREFIX",
    "ENDPOINT_PREFIX",
    "MAX_UNLOCK_BODY",
    "PAGE_HEADERS",
    "PAY_PATH",
    "POLL_SECONDS",
    "UNLOCK_PATH",
    "BadUnlockRequest",
    "BodyKind",
    "PageFacts",
    "UnlockRequest",
    "body_kind",
    "claim_cookie",
    "claim_value",
    "clearing_claim_cookie",
    "clearing_cookies",
    "cookie_max_age",
    "cookie_name",
    "credential_cookies",
    "holds_claim",
    "insert_banner",
    "is_endpoint",
    "parse_unlock_body",
    "qr_svg",
    "render_feed_page",
    "render_message_page",
    "render_page",
    "safe_local_path",
    "scope_path",
    "split_cookies",
    "upgrade_banner",
    "upgrade_link",
    "verify_signature",
]

# Requests under this prefix are answered by the proxy itself and never reach the origin.
ENDPOINT_PREFIX = "/.l402/"
UNLOCK_PATH = ENDPOINT_PREFIX + "unlock"
PAY_PATH = ENDPOINT_PREFIX + "pay"
COOKIE_PREFIX = "L402_"
MAX_UNLOCK_BODY = 16 * 1024
POLL_SECONDS = 2
# Browsers cap a cookie's lifetime at 400 days (RFC 6265bis); a token that never expires gets that.
MAX_COOKIE_AGE = 400 * 86400
# Anything longer than this is not a path a page of ours links to.
MAX_LOCAL_PATH = 4096
# Modules of the QR code are drawn at a whole number of CSS pixels (crisp for a camera or zbar)
# and the code is about this wide on a desktop; CSS shrinks it on narrow screens.
QR_TARGET_PX = 300
QR_BORDER = 4

BodyKind = Literal["html", "text", "json"]

# Headers for every HTML page we answer with: nothing may frame the Pay button, and the URL
# (it may carry the priced path) is not sent on to anyone.
PAGE_HEADERS = (
    ("Content-Security-Policy", "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)

_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_HEX_PREIMAGE = re.compile(r"[0-9a-fA-F]{64}")
# RFC 6265 cookie-octet: base64 (either alphabet), ':' and hex all qualify.
_COOKIE_VALUE_CHARS = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


# -- endpoints and paths ---------------------------------------------------------------------


def is_endpoint(path: str) -> bool:
    """Is this request for the proxy's own pages (also when spelled `/%2El402/` or `//.l402/`)?"""
    if path.startswith(ENDPOINT_PREFIX):
        return True
    # Only odd spellings need the full normalisation the rules use; most paths skip it.
    if "%" in path or "//" in path or "/." in path:
        from .rules import normalize_path

        return normalize_path(path).startswith(ENDPOINT_PREFIX)
    return False


def safe_local_path(value: str | None) -> str | None:
    """`value` if it is a path on this site a page may send the browser to, else None.

    Browsers read `//host`, `/\\host` and paths with tabs or newlines (which they drop) as
    other sites, so those are refused along with anything that has a scheme. Encoded, the same
    (`/%2F%2Fhost`, `/%5Chost`, doubly encoded too) stays on this site for a browser but not for
    an origin that decodes a path before redirecting to it (a trailing-slash redirect); and a
    path the proxy itself refuses (`%00`, `%zz`, overlong UTF-8) is no place to send anyone.
    """
    if not value or len(value) > MAX_LOCAL_PATH:
        return None
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    if "%" in parts.path:
        from urllib.parse import unquote

        from .rules import PathError, path_forms

        try:
            path_forms(parts.path)
        except PathError:
            return None
        once = unquote(parts.path)
        if once.startswith(("//", "/\\")) or unquote(once).startswith(("//", "/\\")):
            return None
    return value


def upgrade_link(path: str) -> str:
    """The pay page for a priced path, coming back to the same path once paid."""
    return PAY_PATH + "?" + urlencode({"path": path, "return": path})


# -- content negotiation -----------------------------------------------------------------------


def body_kind(accept: str | None) -> BodyKind:
    """html for a browser (text/html acceptable), text for text/plain-only clients, else json."""
    if not accept:
        return "json"
    quality: dict[str, float] = {}
    for item in accept.lower().split(","):
        media, *params = item.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip()
        quality[media] = max(quality.get(media, 0.0), q)
    html_q = quality.get("text/html", 0.0)
    json_q = quality.get("application/json", 0.0)
    if html_q > 0 and html_q >= json_q:
        return "html"
    if quality.get("text/plain", 0.0) > 0 and "application/json" not in quality:
        return "text"
    return "json"


# -- cookies -----------------------------------------------------------------------------------


def cookie_name(service: str) -> str:
    return COOKIE_PREFIX + service


def is_our_cookie(name: str) -> bool:
    return name.startswith(COOKIE_PREFIX) and bool(
        _SERVICE_NAME.fullmatch(name[len(COOKIE_PREFIX) :])
    )


def split_cookies(values: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Cookie header values without our cookies, and our cookies found (first one per name).

    Everything else stays exactly as sent: the origin's cookies are none of our business.
    A value that held only our cookies disappears from the list.
    """
    kept: list[str] = []
    found: dict[str, str] = {}
    for value in values:
        # Both prefixes (L402_, L402claim.) start so: one test keeps the common case fast.
        if _OUR_COOKIES_START not in value:
            kept.append(value)
            continue
        pieces = value.split(";")
        remaining: list[str] = []
        for piece in pieces:
            name, sep, content = piece.strip().partition("=")
            name = name.strip()
            if sep and is_our_cookie(name):
                content = content.strip()
                if len(content) >= 2 and content[0] == content[-1] == '"':
                    content = content[1:-1]
                found.setdefault(name, content)
            elif not (sep and name.startswith(CLAIM_PREFIX)):
                # A claim cookie (Path=/.l402/, so only a hand-made request sends it here) is
                # ours too: it never reaches the origin, and it is read at /.l402/unlock only.
                remaining.append(piece)
        if len(remaining) == len(pieces):
            kept.append(value)
        elif any(piece.strip() for piece in remaining):
            kept.append(";".join(remaining).lstrip())
    return kept, found


def cookie_max_age(valid_until: float | None, now: float) -> int:
    """Seconds the cookie may live: until the token expires, at most the browser maximum."""
    if valid_until is None:
        return MAX_COOKIE_AGE
    return max(0, min(MAX_COOKIE_AGE, int(valid_until - now)))


def _cookie_paths(scope: str) -> tuple[str, ...]:
    # The scope for the content, and a copy for our own pages, so the pay page can see that
    # this browser has paid already (a cookie for /episodes/ is never sent to /.l402/pay).
    return (scope,) if ENDPOINT_PREFIX.startswith(scope) else (scope, ENDPOINT_PREFIX)


def credential_cookies(
    service: str, macaroon: str, preimage: bytes, *, path: str, max_age: int, secure: bool
) -> list[str]:
    """Set-Cookie values holding `<macaroon>:<preimage hex>` for one service's scope `path`
    (and the same for the proxy's own pages)."""
    if len(preimage) != 32:
        raise ValueError("preimage must be 32 bytes")
    # Standard base64 from whatever flavour the page sent: the value is always cookie-safe.
    value = f"{b64encode_std(b64decode_any(macaroon))}:{preimage.hex()}"
    if not _COOKIE_VALUE_CHARS.fullmatch(value):
        raise ValueError("credential has characters a cookie cannot carry")
    name = _service_cookie_name(service)
    return [_cookie(name, value, each, max_age, secure) for each in _cookie_paths(path)]


def clearing_cookies(service: str, *, path: str, secure: bool) -> list[str]:
    """Set-Cookie values that make the browser drop a service's cookies."""
    name = _service_cookie_name(service)
    return [_cookie(name, "", each, 0, secure) for each in _cookie_paths(path)]


def _service_cookie_name(service: str) -> str:
    if not _SERVICE_NAME.fullmatch(service):
        raise ValueError(f"service name {service!r} cannot name a cookie")
    return cookie_name(service)


def _cookie(
    name: str, value: str, path: str, max_age: int, secure: bool, same_site: str = "Lax"
) -> str:
    if not PLAIN_PATH.fullmatch(path):
        raise ValueError("cookie path must be a plain path")
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly"]
    parts.append(f"SameSite={same_site}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


# -- the claim: which browser was shown an invoice --------------------------------------------
#
# A macaroon is no secret (it travels in every 402), so "this macaroon's invoice is paid" must
# not hand its preimage to whoever asks: only to the browser the paywall page was shown to. That
# browser holds an HttpOnly claim cookie, sent only to the unlock endpoint. (With the preimage,
# as WebLN gives it, no claim is needed: the preimage is the proof.)

CLAIM_PREFIX = "L402claim."
_OUR_COOKIES_START = "L402"
_CLAIM_ID_BYTES = 8
# The invoice can be paid until it expires; the page asks once more right after that.
CLAIM_GRACE_SECONDS = 120


def _claim_name(token_id: bytes) -> str:
    # One per token, so several open paywall pages each keep their own.
    return CLAIM_PREFIX + token_id[:_CLAIM_ID_BYTES].hex()


def claim_value(secret: bytes, token_id: bytes) -> str:
    """What the claim cookie for a token holds: derived from the server secret, not stored."""
    return hmac.new(secret, b"l402proxy claim\x00" + token_id, hashlib.sha256).hexdigest()


def claim_cookie(secret: bytes, token_id: bytes, *, max_age: int, secure: bool) -> str:
    """The Set-Cookie value that lets this browser unlock the token without its preimage."""
    value = claim_value(secret, token_id)
    name = _claim_name(token_id)
    return _cookie(name, value, UNLOCK_PATH, max_age, secure, same_site="Strict")


def clearing_claim_cookie(token_id: bytes, *, secure: bool) -> str:
    return _cookie(_claim_name(token_id), "", UNLOCK_PATH, 0, secure, same_site="Strict")


def holds_claim(cookie_headers: Sequence[str], secret: bytes, token_id: bytes) -> bool:
    """Whether the request carries the claim cookie for this token."""
    name, expected = _claim_name(token_id), claim_value(secret, token_id).encode()
    for header in cookie_headers:
        for piece in header.split(";"):
            key, sep, value = piece.strip().partition("=")
            if sep and key.strip() == name and _same_secret(value.strip(), expected):
                return True
    return False


def _same_secret(given: str, expected: bytes) -> bool:
    """A constant-time comparison that takes any text a client sent: compare_digest refuses a
    str with non-ASCII characters (TypeError), and header values are whatever bytes came.
    surrogatepass encodes every str, lone surrogates included."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)


# -- the unlock request ------------------------------------------------------------------------


class BadUnlockRequest(ValueError):
    """An unlock body we cannot use; `status` is the HTTP answer (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UnlockRequest:
    macaroon: str
    preimage: bytes | None = field(repr=False)


def parse_unlock_body(raw: bytes, content_type: str | None) -> UnlockRequest:
    """`{"macaroon": "<b64>", "preimage": "<64 hex>" | null}`; BadUnlockRequest otherwise.

    JSON only: a cross-site form cannot send application/json without a CORS preflight, which
    the proxy never grants.
    """
    if len(raw) > MAX_UNLOCK_BODY:
        raise BadUnlockRequest(f"body is larger than {MAX_UNLOCK_BODY} bytes", 413)
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadUnlockRequest("send the body as application/json")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadUnlockRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadUnlockRequest('body must be a JSON object {"macaroon": ..., "preimage": ...}')
    macaroon = data.get("macaroon")
    if not isinstance(macaroon, str) or not macaroon.strip():
        raise BadUnlockRequest('"macaroon" must be a non-empty string')
    preimage = data.get("preimage")
    if preimage is None:
        return UnlockRequest(macaroon.strip(), None)
    if not isinstance(preimage, str) or not _HEX_PREIMAGE.fullmatch(preimage.strip()):
        raise BadUnlockRequest('"preimage" must be 64 hex characters or null')
    return UnlockRequest(macaroon.strip(), bytes.fromhex(preimage.strip()))


def verify_signature(
    macaroon_b64: str, root_key_for: Callable[[bytes], bytes]
) -> tuple[Identifier, TokenInfo]:
    """Check that we minted this macaroon (HMAC chain under our root key), without a preimage.

    Caveats are not judged here: the full check (gate.check_credential) runs once a preimage is
    known. This only keeps forged or foreign macaroons away from the invoice backend.
    """
    macaroon = decode_macaroon(macaroon_b64)
    identifier = identifier_of(macaroon)
    if any(not caveat.first_party() for caveat in macaroon.caveats):
        raise TokenError("unknown_caveat", "third-party caveat unsupported")
    verifier = Verifier()
    verifier.satisfy_general(_accept_any)
    try:
        verifier.verify(macaroon, root_key_for(identifier.token_id))
    except MacaroonException:
        raise TokenError("bad_signature", "macaroon signature does not verify") from None
    except Exception:
        # pymacaroons raises bare errors on caveats that are not UTF-8.
        raise TokenError("malformed", "macaroon caveats cannot be read") from None
    return identifier, inspect(macaroon_b64)


def _accept_any(_predicate: str) -> bool:
    return True


# -- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageFacts:
    """Everything the paywall page shows; all of it is escaped when rendered."""

    service: str
    description: str
    price_sat: int
    valid_for: int | None
    scope: str
    bolt11: str
    macaroon: str
    expires_at: float
    now: float
    status: int = 402
    reason: str = "payment_required"
    return_to: str | None = None  # None: reload the page's own URL once paid


_LEADS = {
    "payment_required": "Payment required",
    "expired": "Your access has expired",
    "revoked": "This access was revoked",
    "wrong_service": "Your token is for something else",
    "missing_capability": "Your token does not allow this",
}


def qr_svg(payload: str) -> str:
    """The payload as an inline SVG QR code: error level M, dark on white, 4-module quiet zone.

    `payload` is encoded exactly as given (no upper-casing into alphanumeric mode), so a
    scanner reads back the very string the WWW-Authenticate header carries.
    """
    qr = segno.make_qr(payload, error="m")
    modules = qr.symbol_size(scale=1, border=QR_BORDER)[0]
    scale = max(2, QR_TARGET_PX // modules)
    svg = qr.svg_inline(
        scale=1,
        border=QR_BORDER,
        dark="#000",
        light="#fff",
        omitsize=True,
        svgclass="qr-code",
        lineclass=None,
        title="QR code of the Lightning invoice",
    )
    size = modules * scale
    return svg.replace("<svg ", f'<svg width="{size}" height="{size}" role="img" ', 1)


def render_page(facts: PageFacts) -> str:
    """The HTML paywall page: what it costs and unlocks, the invoice as QR, copy, link, WebLN."""
    e = _escape
    price = _sats(facts.price_sat)
    # Every other reason is a credential we could not accept at all (a 401).
    lead = _LEADS.get(facts.reason, "Your token was not accepted")
    duration = "with no time limit" if facts.valid_for is None else f"for {_human(facts.valid_for)}"
    where = (
        "everything this service covers on this site"
        if facts.scope == "/"
        else f"everything under {facts.scope} on this site"
    )
    expires = time.strftime("%H:%M UTC", time.gmtime(facts.expires_at))
    expires_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(facts.expires_at))
    lightning_uri = "lightning:" + facts.bolt11
    data = {
        "bolt11": facts.bolt11,
        "macaroon": facts.macaroon,
        "unlock_url": UNLOCK_PATH,
        "return_to": facts.return_to,
        "expires_in": max(0, int(facts.expires_at - facts.now)),
        "poll_ms": POLL_SECONDS * 1000,
    }
    return f"""{_page_start(f"{facts.description}: {price}")}
<p class="lead">{e(lead)}</p>
<h1>{e(facts.description)}</h1>
<p class="price">{e(price)}</p>
<p class="what">Paying unlocks {e(where)}, {e(duration)}.</p>
<a class="qr" href="{e(lightning_uri)}" aria-label="Open the invoice in a Lightning wallet">\
{qr_svg(facts.bolt11)}</a>
<p class="hint" id="scan-hint">Scan with a Lightning wallet. This page opens the content by itself \
once paid.</p>
<div class="actions" id="pay-actions">
<button id="webln-pay" class="primary" type="button" hidden>Pay with WebLN</button>
<a id="open-wallet" class="button" href="{e(lightning_uri)}">Open wallet</a>
<button id="copy" type="button">Copy invoice</button>
<button id="renew" class="primary" type="button" hidden>Get a new invoice</button>
</div>
<p id="status" class="status" role="status" aria-live="polite"></p>
<section id="subscribe" class="subscribe" hidden>
<h2>Subscribe ad-free</h2>
<p class="hint">Paste this private feed address into your podcast app. It is yours alone: \
whoever has it listens on your payment.</p>
<input id="feed-url" class="feed-url" type="text" readonly aria-label="Your private feed address">
<div class="actions">
<button id="copy-feed" class="primary" type="button">Copy feed address</button>
<a id="continue" class="button" href="">Continue</a>
</div>
</section>
<p class="expiry" id="expiry-line">The invoice expires <span id="expiry">at \
<time datetime="{e(expires_iso)}">{e(expires)}</time></span>.</p>
<code id="invoice" class="invoice">{e(facts.bolt11)}</code>
<noscript><p class="note">This page needs JavaScript to open the content after you pay.</p>\
</noscript>
<details><summary>For programs</summary>
<p>Pay the invoice, then repeat the request with
<code>Authorization: L402 &lt;macaroon&gt;:&lt;preimage hex&gt;</code>. Service
<code>{e(facts.service)}</code>, macaroon:</p>
<code class="invoice">{e(facts.macaroon)}</code>
</details>
</main>
<script type="application/json" id="l402-data">{_script_json(data)}</script>
<script>{_JS}</script>
</body>
</html>
"""


def _page_start(title: str) -> str:
    """Every page of ours up to the opening of its card: head, title, style."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{_escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main class="card">"""


def render_message_page(title: str, message: str) -> str:
    """A plain page for the proxy's own answers (no such priced path, ...)."""
    return f"""{_page_start(title)}
<h1>{_escape(title)}</h1>
<p class="what">{_escape(message)}</p>
</main>
</body>
</html>
"""


def render_feed_page(description: str, feed_url: str, return_to: str) -> str:
    """The page for a browser that has paid already and whose service sells a private feed:
    the feed's address to copy (as the paywall page shows it after paying), and a link on."""
    data = {"feed_url": feed_url}
    return f"""{_page_start(f"{description}: subscribe ad-free")}
<p class="lead">Paid</p>
<h1>{_escape(description)}</h1>
<section id="subscribe" class="subscribe">
<h2>Subscribe ad-free</h2>
<p class="hint">Paste this private feed address into your podcast app. It is yours alone: \
whoever has it listens on your payment.</p>
<input id="feed-url" class="feed-url" type="text" readonly aria-label="Your private feed address" \
value="{_escape(feed_url)}">
<div class="actions">
<button id="copy-feed" class="primary" type="button">Copy feed address</button>
<a id="continue" class="button" href="{_escape(return_to)}">Continue</a>
</div>
</section>
</main>
<script type="application/json" id="l402-data">{_script_json(data)}</script>
<script>{_FEED_JS}</script>
</body>
</html>
"""


def upgrade_banner(rule: Rule, path: str) -> str:
    """The offer a free page gets in upgrade mode: "<description> for <price> sats" -> pay page.

    ASCII only (character references for the rest), so it fits a page in any charset.
    """
    # A price: function prices each challenge: the page it links to shows the price.
    label = (
        rule.description
        if rule.price is not None
        else f"{rule.description} for {_sats(rule.price_sat)}"
    )
    banner = (
        '<div id="l402-upgrade" style="position:fixed;right:1rem;bottom:1rem;z-index:2147483647;'
        "font:600 15px/1.2 system-ui,sans-serif;background:#f7931a;border-radius:999px;"
        'box-shadow:0 2px 10px rgba(0,0,0,.25)">'
        f'<a href="{_escape(upgrade_link(path))}" style="display:block;padding:.7em 1.1em;'
        f'color:#111;text-decoration:none">&#9889; {_escape(label)}</a></div>'
    )
    return banner.encode("ascii", "xmlcharrefreplace").decode("ascii")


def insert_banner(page: str, banner: str) -> str:
    """`banner` just before the last `</body>`, or at the end of a page without one."""
    last = None
    for last in _BODY_END.finditer(page):  # noqa: B007 - the last match is the one we want
        pass
    if last is None:
        return page + banner
    return page[: last.start()] + banner + page[last.start() :]


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _script_json(data: object) -> str:
    """JSON that stays data inside <script>: '<', '>' and '&' are escaped, so neither
    `</script>` nor `<!--` can appear in it; ensure_ascii covers U+2028/U+2029."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sats(amount: int) -> str:
    return f"{amount:,} sat" + ("" if amount == 1 else "s")


_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def _human(seconds: int) -> str:
    """3600 -> "1 hour", 2592000 -> "30 days"; the largest unit that divides evenly."""
    for size, name in _UNITS:
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count:,} {name}{'' if count == 1 else 's'}"
    return f"{seconds:,} seconds"


def _join(lines: Iterable[str]) -> str:
    return "".join(line.strip() for line in lines)


_CSS = _join(
    """
:root{color-scheme:light dark;--fg:#1c1c1f;--muted:#5f6168;--bg:#f4f4f1;--card:#fff;
--line:#e2e2dd;--accent:#f7931a;--ok:#1e7f3c;--bad:#c5221f}
@media (prefers-color-scheme:dark){:root{--fg:#ececef;--muted:#a3a3ab;--bg:#121214;
--card:#1c1c20;--line:#34343b;--ok:#5cc97f;--bad:#ff7a70}}
*{box-sizing:border-box}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
padding:1rem;background:var(--bg);color:var(--fg);
font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
.card{width:100%;max-width:27rem;padding:1.5rem;background:var(--card);
border:1px solid var(--line);border-radius:16px;text-align:center}
.lead{margin:0;color:var(--muted);font-size:.8rem;letter-spacing:.08em;text-transform:uppercase}
h1{margin:.3rem 0 0;font-size:1.35rem;line-height:1.3;overflow-wrap:anywhere}
.price{margin:.2rem 0;font-size:2rem;font-weight:700}
.what,.hint,.note{margin:.3rem 0 1rem;color:var(--muted);overflow-wrap:anywhere}
.hint{margin:.6rem 0 0;font-size:.85rem}
.qr{display:inline-block;line-height:0;background:#fff;border-radius:6px}
.qr svg{display:block;max-width:100%;height:auto;shape-rendering:crispEdges}
.actions{display:flex;flex-wrap:wrap;gap:.5rem;justify-content:center;margin:1rem 0 .5rem}
button,.button{padding:.6rem 1rem;border:1px solid var(--line);border-radius:10px;
background:transparent;color:var(--fg);font:inherit;font-size:.95rem;text-decoration:none;
cursor:pointer}
button.primary{background:var(--accent);border-color:var(--accent);color:#111;font-weight:600}
button:disabled{opacity:.5;cursor:default}
[hidden]{display:none!important}
.status{min-height:1.5em;margin:.5rem 0;font-weight:500}
.status.ok{color:var(--ok)}
.status.error{color:var(--bad)}
.expiry{margin:0 0 .6rem;color:var(--muted);font-size:.85rem}
.invoice{display:block;max-height:5.5rem;overflow:auto;padding:.5rem;border-radius:8px;
background:var(--bg);font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;
text-align:left;word-break:break-all;user-select:all}
details{margin-top:1rem;color:var(--muted);font-size:.85rem;text-align:left}
.expired .qr{opacity:.2}
.offscreen{position:fixed;top:0;left:-9999px;opacity:0}
.subscribe h2{margin:1rem 0 0;font-size:1.1rem}
.feed-url{width:100%;padding:.5rem;border:1px solid var(--line);border-radius:8px;
background:var(--bg);color:var(--fg);font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
""".splitlines()
)

# Plain ES2017, no framework. It never writes HTML: every text goes through textContent.
_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("l402-data").textContent);
  var statusLine = document.getElementById("status");
  var payButton = document.getElementById("webln-pay");
  var copyButton = document.getElementById("copy");
  var renewButton = document.getElementById("renew");
  var expiry = document.getElementById("expiry");
  var deadline = Date.now() + data.expires_in * 1000;
  var finished = false;
  var polling = true;
  var pollTimer = null;
  var tickTimer = null;
  // Set once a WebLN wallet paid: from then on every unlock carries it, and nothing on this
  // page may say "not paid" again.
  var preimageHex = null;
  var paidPolls = 0;
  var MAX_PAID_POLLS = 150;

  function say(text, kind) {
    statusLine.textContent = text;
    statusLine.className = "status" + (kind ? " " + kind : "");
  }
  function stop() {
    finished = true;
    clearTimeout(pollTimer);
    clearInterval(tickTimer);
  }
  function proceed(answer) {
    stop();
    var feed = answer && answer.body && answer.body.feed_url;
    // The private feed is shown to a listener who came to subscribe (the "Subscribe ad-free"
    // link: subscribe=1) or who has no page to go back to; one who clicked "Go ad-free" on a
    // page goes straight back to it, as before.
    var wantsFeed = !data.return_to || /[?&]subscribe=1(&|$)/.test(window.location.search);
    if (wantsFeed && typeof feed === "string" && /^https?:\\/\\//.test(feed)) {
      subscribe(feed);
      return;
    }
    say("Paid. Opening\\u2026", "ok");
    if (data.return_to) {
      window.location.replace(data.return_to);
    } else {
      window.location.reload();
    }
  }
  // The seller sells a private podcast feed: its address to copy, and a link on to the content.
  function subscribe(feed) {
    say("Paid. Your private feed is ready.", "ok");
    ["a.qr", "#scan-hint", "#pay-actions", "#expiry-line", "#invoice"].forEach(function (which) {
      var element = document.querySelector(which);
      if (element) { element.hidden = true; }
    });
    var field = document.getElementById("feed-url");
    var button = document.getElementById("copy-feed");
    field.value = feed;
    document.getElementById("continue").setAttribute(
      "href", data.return_to || window.location.href);
    document.getElementById("subscribe").hidden = false;
    field.addEventListener("focus", function () { field.select(); });
    button.addEventListener("click", function () {
      copyText(feed, field, function (ok) {
        button.textContent = ok ? "Copied" : "Copy failed: select the address above";
        setTimeout(function () { button.textContent = "Copy feed address"; }, 2500);
      });
    });
  }
  function copyText(text, field, done) {
    function fallback() {
      var area = field;
      if (!area) {
        area = document.createElement("textarea");
        area.value = text;
        area.setAttribute("readonly", "");
        area.className = "offscreen";
        document.body.appendChild(area);
      }
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      if (!field) { document.body.removeChild(area); }
      done(ok);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  }
  function explain(answer) {
    return (answer.body && answer.body.message) ||
      "This invoice cannot unlock anything (HTTP " + answer.status + "): reload for a new one.";
  }
  function unlock(preimage) {
    return fetch(data.unlock_url, {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({macaroon: data.macaroon, preimage: preimage || null}),
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        var retry = Number(response.headers.get("Retry-After")) || 0;
        return {status: response.status, body: body, retry: retry};
      });
    });
  }
  function unlocked(answer) {
    return answer.status === 200 && answer.body && answer.body.unlocked === true;
  }
  function schedule(ms) {
    if (!finished && polling) {
      pollTimer = setTimeout(poll, ms);
    }
  }
  function pollNow() {
    clearTimeout(pollTimer);
    polling = true;
    poll();
  }
  function poll() {
    pollTimer = null;
    if (finished) { return; }
    if (preimageHex) {
      // The invoice's expiry no longer matters; only how long the site takes to answer.
      if (++paidPolls > MAX_PAID_POLLS) {
        stop();
        say("Paid, but this site does not answer. Reload the page in a moment.", "error");
        return;
      }
    } else if (Date.now() >= deadline) {
      expire();
      return;
    }
    unlock(preimageHex).then(function (answer) {
      if (finished) { return; }
      if (unlocked(answer)) { proceed(answer); return; }
      if (answer.status === 202) { schedule(data.poll_ms); return; }
      if (answer.status === 503 || (preimageHex && answer.status >= 500)) {
        schedule(Math.max(data.poll_ms, answer.retry * 1000));
        return;
      }
      polling = false;
      if (answer.status === 501) {
        say(explain(answer), "error");
        return;
      }
      stop();
      say(explain(answer), "error");
    }, function () {
      schedule(data.poll_ms);
    });
  }
  function expire() {
    if (finished || preimageHex) { return; }
    stop();
    document.body.classList.add("expired");
    payButton.disabled = true;
    copyButton.hidden = true;
    document.getElementById("open-wallet").hidden = true;
    document.querySelector("a.qr").removeAttribute("href");
    renewButton.hidden = false;
    expiry.textContent = "now";
    say("This invoice has expired: nothing can be paid with it now.", "error");
    // A payment made in the last seconds is still worth its content.
    unlock(null).then(function (answer) {
      if (unlocked(answer)) { finished = false; proceed(answer); }
    }, function () {});
  }
  function tick() {
    if (preimageHex) { return; }
    var left = Math.ceil((deadline - Date.now()) / 1000);
    if (left <= 0) { expire(); return; }
    var minutes = Math.floor(left / 60);
    var seconds = left % 60;
    expiry.textContent = "in " + minutes + ":" + (seconds < 10 ? "0" : "") + seconds;
  }
  function offerWebln() {
    if (window.webln && payButton.hidden && !finished) {
      payButton.hidden = false;
    }
  }
  payButton.addEventListener("click", function () {
    var webln = window.webln;
    if (finished || !webln || preimageHex) { return; }
    payButton.disabled = true;
    say("Confirm the payment in your wallet\\u2026");
    Promise.resolve(webln.enable ? webln.enable() : null).then(function () {
      return webln.sendPayment(data.bolt11);
    }).then(function (result) {
      var preimage = result && result.preimage;
      if (!preimage) { throw new Error("the wallet returned no preimage"); }
      return preimage;
    }).then(function (preimage) {
      if (finished) { return; }
      // Paid: the poll now carries the preimage and keeps asking until the site takes it.
      preimageHex = preimage;
      say("Paid. Unlocking\\u2026");
      pollNow();
    }, function (error) {
      if (finished) { return; }
      payButton.disabled = false;
      say("Not paid: " + ((error && error.message) || String(error)), "error");
    });
  });
  renewButton.addEventListener("click", function () { window.location.reload(); });
  copyButton.addEventListener("click", function () {
    copyText(data.bolt11, null, function (ok) {
      copyButton.textContent = ok ? "Copied" : "Copy failed: select the invoice below";
      setTimeout(function () { copyButton.textContent = "Copy invoice"; }, 2500);
    });
  });
  offerWebln();
  window.addEventListener("webln:ready", offerWebln);
  setTimeout(offerWebln, 500);
  setTimeout(offerWebln, 2000);
  say("Waiting for payment\\u2026");
  tick();
  tickTimer = setInterval(tick, 1000);
  schedule(data.poll_ms);
})();
"""

# The feed page's copy button (render_feed_page): plain ES2017, no framework.
_FEED_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("l402-data").textContent);
  var field = document.getElementById("feed-url");
  var button = document.getElementById("copy-feed");
  function done(ok) {
    button.textContent = ok ? "Copied" : "Copy failed: select the address above";
    setTimeout(function () { button.textContent = "Copy feed address"; }, 2500);
  }
  field.addEventListener("focus", function () { field.select(); });
  button.addEventListener("click", function () {
    function fallback() {
      field.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      done(ok);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(data.feed_url).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  });
})();
"""
