"""Private podcast feeds: a capability URL that stands for a listener's stored credential.

A podcast app can neither send a header nor answer a 402. A rule with `feed: /feed.xml` gives
whoever bought its token a personal URL, `<scheme>://<host>/.l402/feed/<capability>/feed.xml`,
to paste into any app. The store keeps the token's credential under the capability
(`TokenStore.feed_for`); a request for `/.l402/feed/<capability><inner>` is judged as the request
for `<inner>` with `Authorization: L402 <credential>` (the client's own Authorization and our
cookies dropped), by the engine's normal path: verdict cache, revocation, expiry, bundles,
passes, rate limits, the paid variant. What comes out is served only when it is

- the access's own feed path (GET or HEAD): forwarded as the rules say, with a note telling the
  door to make the origin's feed private (`engine.feed_xml.make_private`: enclosures under the
  capability, block tags), or
- a paid grant of the token (variant "paid"): the ad-free enclosure, Range and HEAD as usual;

and forwarded to `<inner>` (Forward.path), never to the capability's path. Anything else is a
plain 404, as is an unknown, revoked or expired capability (one body for all: nobody learns
which); a spent bundle is 410 Gone naming the pay page (a player cannot pay a 402). No invoice is
ever made for a request through a capability (core.SELLING).

The stored credential goes into the inner request's Authorization only, which the engine drops
before anything is forwarded: it never reaches the origin, a log line, a note or an answer.

Capabilities are looked up in the store with a small cache (CACHE_SECONDS, CACHE_ENTRIES), so a
revocation or rotation by `l402proxy feeds` reaches every instance within ~2 s. Doors: the
mitmproxy and ASGI doors serve feeds; the nginx door refuses rules with `feed:`.

The door's part, for a Forward whose note has FEED_NOTE: buffer the answer (MAX_FEED_BYTES),
`private_body` in a thread, `private_fields` on the head; FeedError -> `bad_feed_answer` (502).
An answer it does not rewrite (`rewrites` false: HEAD, 304, an error) gets `private_head`: every
answer through a capability is kept by nobody but the listener.
"""

import asyncio
import hmac
import logging
import re
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from .. import gate, paywall
from ..l402.encoding import b64decode_any, b64encode_std
from ..l402.headers import Credential, CredentialError, parse_credential
from ..l402.token import TokenError, VerifiedToken
from ..rules import PRICED_MODES, Rule, normalize_path
from .answers import (
    _CDN_CACHE_FIELDS,
    Answer,
    Outcome,
    json_answer,
    not_found_answer,
    unavailable_answer,
)
from .feed_xml import MAX_FEED_BYTES, FeedError, make_private
from .limits import _trusted
from .request import Fields, Request, get, get_all, remove, set_all, take_our_cookies

if TYPE_CHECKING:
    from .core import Paywall

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENTRIES",
    "CACHE_SECONDS",
    "FEED_NOTE",
    "FEED_PREFIX",
    "MAX_FEED_BYTES",
    "MINT_PATH",
    "AccessCache",
    "FeedError",
    "FeedTarget",
    "bad_feed_answer",
    "feed_url",
    "is_feed_target",
    "mint",
    "mint_endpoint",
    "private_body",
    "private_fields",
    "private_head",
    "rewrites",
    "serve",
    "split_target",
]

# `/.l402/feed/<capability><inner path>`: the private feed and its enclosures.
FEED_PREFIX = paywall.ENDPOINT_PREFIX + "feed/"
# POST here with a credential (Authorization or the service cookie): the token's feed URL.
MINT_PATH = paywall.ENDPOINT_PREFIX + "feed"
# The Forward note's key for the door: make this answer's feed private.
FEED_NOTE = "feed"
# A capability as the store makes it (secrets.token_urlsafe(16)).
_CAPABILITY = re.compile(r"[A-Za-z0-9_-]{22}")
CAPABILITY_CHARS = 22
# How long a looked-up capability is believed, and how many are kept: a revocation or rotation
# reaches every instance within CACHE_SECONDS; memory stays bounded whatever clients send.
CACHE_SECONDS = 2.0
CACHE_ENTRIES = 4096
# Request fields that would make the origin send something we cannot rewrite whole.
_FEED_REQUEST_DROPS = ("Accept-Encoding", "Range", "If-Range")
# Response fields that describe the origin's bytes, which the rewrite changes.
_FEED_RESPONSE_DROPS = (
    "Content-Length",
    "Content-Encoding",
    "Transfer-Encoding",
    "Content-MD5",
    "Digest",
    "Content-Digest",
    "Repr-Digest",
    "Content-Range",
    "Accept-Ranges",
)
_SHARED_CACHE_DIRECTIVES = ("public", "s-maxage")
# Response fields no answer through a capability keeps, whatever the origin sent:
# - the CDN cache controls (answers._CDN_CACHE_FIELDS, as mark_variant drops them from a paid
#   answer) and nginx's X-Accel-Expires: a CDN or caching proxy in front obeys them over
#   Cache-Control, so it would keep the listener's feed for anyone with its URL, and serve it
#   past a revocation or rotation;
# - every Link field. The Link values a feed origin sends are WebSub's (W3C WebSub 4: rel=hub
#   and rel=self, which take precedence over the document's): a hub would be told the private
#   URL (or a self naming the public feed would move the subscriber off it). No Link serves a
#   podcast app, and picking out some means parsing RFC 8288 (quoted commas, rel lists, IRI
#   forms) where one slip leaks the capability: all of them go.
_PRIVATE_DROPS = (
    *sorted(name.decode() for name in _CDN_CACHE_FIELDS),
    "X-Accel-Expires",
    "Link",
)
# A browser showing the private feed (an xml-stylesheet page) would send its URL, capability and
# all, as Referer with what the page loads (same origin: the full URL, by the default policy).
_REFERRER_POLICY = "no-referrer"
# How many feed rewrites run at once, in this process, whichever door or event loop runs them:
# each holds up to MAX_FEED_BYTES decoded plus its parsed tree (several times that), so the
# memory they take is bounded, not the number of players refreshing at once. A rewrite waits
# at most REWRITE_WAIT_SECONDS for its turn (on the door's worker thread, never the event
# loop), then fails with a FeedError (the door answers 502: the app asks again next refresh).
REWRITES_AT_ONCE = 2
REWRITE_WAIT_SECONDS = 1.0
_REWRITES = threading.BoundedSemaphore(REWRITES_AT_ONCE)
# How much of a coded feed zlib is given at a time (see _inflated).
_INFLATE_CHUNK = 4096
# A Host value we put into a URL as it is: a name or an IP literal, and a port.
_AUTHORITY = re.compile(
    r"(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
)


class AccessLookup(Protocol):
    def __call__(self, capability: str) -> Awaitable[Any]: ...


# -- the capability in the target --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedTarget:
    """`/.l402/feed/<capability><inner>` taken apart: `inner` is the inner request's target
    (path and query) exactly as sent."""

    capability: str
    inner: str


def is_feed_target(target: str) -> bool:
    """Is this a request through a private feed's capability (spelled plainly; any other
    spelling of the prefix is one of our pages that does not exist: 404)?"""
    return target.startswith(FEED_PREFIX)


def split_target(target: str) -> FeedTarget | None:
    """The capability and the inner target, or None when the target is no such URL."""
    if not is_feed_target(target):
        return None
    rest = target[len(FEED_PREFIX) :]
    capability, inner = rest[:CAPABILITY_CHARS], rest[CAPABILITY_CHARS:]
    if _CAPABILITY.fullmatch(capability) is None or not inner.startswith("/"):
        return None
    return FeedTarget(capability, inner)


# -- the capability cache ---------------------------------------------------------------------


class AccessCache:
    """Feed accesses by capability, each believed for `seconds` (unknown ones too: a scan of
    made-up capabilities costs one store query each per `seconds`, not one per request), at most
    `max_entries` of them (the oldest go first). Concurrent lookups of one capability (a
    player's parallel Range requests) share one store query."""

    def __init__(
        self,
        seconds: float = CACHE_SECONDS,
        max_entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self.clock = clock
        self.entries: dict[str, tuple[float, Any]] = {}
        self.pending: dict[str, asyncio.Task[Any]] = {}

    async def get(self, capability: str, lookup: AccessLookup) -> Any:
        """The access (a FeedAccess, or None for an unknown capability); what `lookup` raises
        is raised (and nothing kept)."""
        now = self.clock()
        kept = self.entries.get(capability)
        if kept is not None:
            if kept[0] > now:
                return kept[1]
            del self.entries[capability]
        task = self.pending.get(capability)
        if task is None:
            task = asyncio.ensure_future(lookup(capability))
            self.pending[capability] = task
            task.add_done_callback(lambda done: self._settled(capability, done))
        # Shielded: a client that goes away does not cancel the lookup others wait for.
        return await asyncio.shield(task)

    def _settled(self, capability: str, task: "asyncio.Task[Any]") -> None:
        if self.pending.get(capability) is task:
            del self.pending[capability]
        if task.cancelled() or task.exception() is not None:
            return
        self._keep(capability, task.result())

    def put(self, access: Any) -> None:
        """An access just made or read (minting): believed from now on."""
        self._keep(access.capability, access)

    def _keep(self, capability: str, access: Any) -> None:
        self.entries.pop(capability, None)
        while len(self.entries) >= self.max_entries:
            del self.entries[next(iter(self.entries))]
        self.entries[capability] = (self.clock() + self.seconds, access)

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


# -- URLs -------------------------------------------------------------------------------------


def authority_of(request: Request) -> str:
    """The host[:port] the client reached us at, as it wrote it (the Host field), when it is a
    plain one; else the host the rules matched on."""
    hosts = get_all(request.fields, "host")
    if len(hosts) == 1 and _AUTHORITY.fullmatch(hosts[0].strip()):
        return hosts[0].strip()
    authority = request.authority
    if not hosts and authority is not None and _AUTHORITY.fullmatch(authority.strip()):
        return authority.strip()  # HTTP/2 and 3: no Host field, the :authority
    host = request.host
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def scheme_of(engine: "Paywall", request: Request) -> str:
    """https when the client reached us over TLS, or a trusted proxy in front says so
    (X-Forwarded-Proto: https); http otherwise."""
    if request.secure:
        return "https"
    rules = engine.rules
    if rules is None or not (rules.trusted_proxies or rules.trust_unix):
        return "http"
    peer = request.client[0] if request.client else None
    trusted = _trusted(peer, rules.trusted_proxies) if peer else rules.trust_unix
    if not trusted:
        return "http"
    # The nearest proxy writes the last value.
    values = [
        v.strip().lower() for v in (get(request.fields, "X-Forwarded-Proto") or "").split(",")
    ]
    return "https" if values and values[-1] == "https" else "http"


def private_base(engine: "Paywall", request: Request, capability: str) -> str:
    return f"{scheme_of(engine, request)}://{authority_of(request)}{FEED_PREFIX}{capability}"


def feed_url(engine: "Paywall", request: Request, access: Any) -> str:
    """The listener's private feed URL."""
    return private_base(engine, request, access.capability) + access.feed


# -- serving a request through a capability ---------------------------------------------------


def sells_feeds(engine: "Paywall") -> bool:
    """Does this engine serve private feeds: a rule sells one, and the door can (nothing in
    `feeds_off`)?"""
    rules = engine.rules
    return (
        engine.feeds_off is None
        and rules is not None
        and any(rule.feed is not None for rule in rules.rules)
    )


def _refused(method: str, reason: str) -> Answer:
    """404, the same plain body whatever the reason (unknown, revoked, expired, not served)."""
    answer = not_found_answer().for_method(method)
    answer.note = {"variant": "refused", "reason": reason}
    return answer


def _spent(engine: "Paywall", request: Request, inner_path: str, service: Any) -> Answer:
    pay = (
        f"{scheme_of(engine, request)}://{authority_of(request)}{paywall.PAY_PATH}"
        # The path as sent (its escapes kept), made safe as one query value.
        f"?path={quote(inner_path, safe='/%')}"
    )
    answer = Answer.make(
        410,
        f"this private feed's token is spent: buy again at {pay}\n".encode(),
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    ).for_method(request.method)
    answer.note = {"variant": "refused", "reason": "spent", "status": 410}
    if service is not None:
        answer.note["service"] = service
    return answer


def inner_fields(fields: Fields, credential: str) -> Fields:
    """The client's fields with every Authorization and our cookies gone, and the stored
    credential as the only Authorization."""
    fields = remove(fields, "Authorization")
    fields, _ = take_our_cookies(fields)
    return (*fields, (b"Authorization", f"L402 {credential}".encode("ascii")))


async def serve(engine: "Paywall", request: Request) -> Outcome:
    """A request for `/.l402/feed/<capability><inner>` (see the module). Never raises: what
    goes wrong is a 503, never forwarded."""
    try:
        return await _serve(engine, request)
    except Exception as exc:
        # Only the exception's type: its text or traceback might hold what the request held.
        log.error(f"l402: internal error on a private feed's request: {type(exc).__name__}")
        answer = unavailable_answer("internal error in the paywall").for_method(request.method)
        answer.note = {"variant": "unavailable", "reason": "internal"}
        return answer


async def _serve(engine: "Paywall", request: Request) -> Outcome:
    from .core import SELLING  # core imports this module

    method = request.method
    target = split_target(request.target)
    if target is None or not sells_feeds(engine):
        return _refused(method, "feed")
    if not engine.ready.is_set():
        await engine.ready.wait()
    store = engine.store
    assert store is not None
    try:
        access = await engine.feed_accesses.get(target.capability, store.feed_access)
    except Exception as exc:
        # Fail closed: what cannot be looked up is not served.
        log.warning(f"l402: cannot look up a private feed: {type(exc).__name__}: {exc}")
        engine.watchers.tell("store_failed", engine.door, "feed")
        answer = unavailable_answer("the token store is unreachable").for_method(method)
        answer.note = {"variant": "unavailable", "reason": "store"}
        return answer
    now = time.time()
    if (
        access is None
        # The store found it by an index; compared here in constant time all the same.
        or not hmac.compare_digest(access.capability.encode(), target.capability.encode())
        or access.status(now) != "active"
        or access.token_id in engine.revoked
    ):
        return _refused(method, "feed")
    rule = engine.rule_named((access.service,))
    if rule is None or rule.feed != access.feed:
        # The rules in force no longer sell this feed.
        return _refused(method, "feed")
    inner_path = target.inner.partition("?")[0]
    if paywall.is_endpoint(inner_path):
        return _refused(method, "feed")
    inner = Request(
        method=method,
        target=target.inner,
        host=request.host,
        fields=inner_fields(request.fields, access.credential),
        body=request.body,
        secure=request.secure,
        client=request.client,
        target_check=request.target_check,
        # The door gives the inner target's other readings for a feed target (the ASGI door:
        # below root_path).
        also_targets=request.also_targets,
        authority=request.authority,
    )
    selling = SELLING.set(False)
    try:
        outcome = await engine._handle(inner)
    finally:
        SELLING.reset(selling)
    note = outcome.note or {}
    is_feed = method.upper() in ("GET", "HEAD") and normalize_path(inner_path) == access.feed
    if isinstance(outcome, Answer):
        status = outcome.status
        if status == 402 and note.get("reason") == "spent":
            return _spent(engine, request, inner_path, note.get("service"))
        if status in (429, 503):
            # Come again later: a rate limit, a store or backend that is down.
            return outcome
        return _refused(method, "feed_inner")
    granted = (
        note.get("variant") == "paid"
        and note.get("token_id") == access.token_id.hex()
        and not note.get("freebie")
    )
    if not is_feed and not granted:
        if note.get("reason") == "spent":  # a dry run forwards what it would have refused
            return _spent(engine, request, inner_path, note.get("service"))
        return _refused(method, "feed_inner")
    if outcome.path is None:
        # Never the capability's path: the inner one, as the client wrote it.
        outcome.path = target.inner
    if is_feed:
        if "meter" in note:
            log.error(
                f"l402: service '{rule.name}': the feed {access.feed} is sold by the byte or "
                "unit; a private feed is rewritten, so it cannot be metered: not served"
            )
            return bad_feed_answer("the feed is metered", method)
        outcome.headers = _without(outcome.headers, _FEED_REQUEST_DROPS)
        base = private_base(engine, request, access.capability)
        new_note = dict(note)
        new_note[FEED_NOTE] = {
            "private_base": base,
            "public_hosts": [authority_of(request)],
            "self_url": base + access.feed,
        }
        outcome.note = new_note
    return outcome


def _without(fields: Fields, names: Iterable[str]) -> Fields:
    for name in names:
        fields = remove(fields, name)
    return fields


# -- minting ----------------------------------------------------------------------------------


def feed_of(rule: Rule) -> str | None:
    return rule.feed if rule.mode in PRICED_MODES else None


async def mint(
    engine: "Paywall",
    request: Request,
    rule: Rule,
    macaroon: str,
    preimage: bytes,
    token: VerifiedToken,
) -> str | None:
    """The feed URL of a valid paid credential for `rule` (the token's seller), or None when the
    rule sells no feed. The store gives the one active access of this token, feed and
    credential (idempotent; another credential of the token, an attenuated copy, gets its own:
    a capability opens what the credential that minted it opens). A store failure is logged
    and told to the watchers, and raises (the caller answers without URL)."""
    feed = feed_of(rule)
    if feed is None or engine.feeds_off is not None:
        # Off at this door as configured: the door said why when it was configured.
        return None
    assert engine.store is not None
    credential = f"{b64encode_std(b64decode_any(macaroon))}:{preimage.hex()}"
    try:
        access = await engine.store.feed_for(
            token.identifier.token_id, rule.name, feed, credential, token.valid_until, time.time()
        )
    except Exception as exc:
        log.warning(
            f"l402: cannot record the private feed of a {rule.name} token: "
            f"{type(exc).__name__}: {exc}"
        )
        engine.watchers.tell("store_failed", engine.door, "feed")
        raise
    engine.feed_accesses.put(access)
    return feed_url(engine, request, access)


async def mint_endpoint(engine: "Paywall", request: Request) -> Answer:
    """POST /.l402/feed with `Authorization: L402 <mac>:<preimage>` or a service cookie of
    ours: `{"feed_url", "service", "expires_at"}` for the token's private feed."""
    fields = request.fields
    if (get(fields, "Sec-Fetch-Site") or "").lower() == "cross-site":
        return json_answer(
            403, {"error": "cross_site", "message": "feed requests must come from this site"}
        )
    if not sells_feeds(engine):
        return json_answer(
            404, {"error": "no_feed", "message": "this site hands out no private feeds"}
        )
    candidates: list[str] = [
        value for value in get_all(fields, "authorization") if gate.is_l402_authorization(value)
    ]
    _, cookies = take_our_cookies(fields)
    if engine.rules is not None:
        for rule in engine.rules.rules:
            cookie = cookies.get(paywall.cookie_name(rule.name))
            if cookie is not None and feed_of(rule) is not None:
                candidates.append(f"L402 {cookie}")
    if not candidates:
        return json_answer(
            401,
            {
                "error": "no_credential",
                "message": "send Authorization: L402 <macaroon>:<preimage hex> (or the cookie "
                "the paywall page set)",
            },
        )
    found = _verified(engine, candidates)
    if isinstance(found, Answer):
        return found
    rule, macaroon, preimage, token = found
    try:
        url = await mint(engine, request, rule, macaroon, preimage, token)
    except Exception:
        answer = unavailable_answer("the token store is unreachable")
        answer.note = {"variant": "unavailable", "reason": "store"}
        return answer
    if url is None:
        return json_answer(
            404,
            {"error": "no_feed", "message": f"service '{rule.name}' sells no private feed"},
        )
    engine.note_paid(token.identifier.token_id)
    expires_at = None if token.valid_until is None else int(token.valid_until)
    return json_answer(200, {"feed_url": url, "service": rule.name, "expires_at": expires_at})


def _verified(
    engine: "Paywall", candidates: Iterable[str]
) -> tuple[Rule, str, bytes, VerifiedToken] | Answer:
    """The first credential among `candidates` that is a valid paid token of a service sold
    here: (its seller's rule, the macaroon, the preimage, the token); else the 401/403."""
    failure: TokenError | CredentialError | None = None
    now = time.time()
    for value in candidates:
        try:
            credential = parse_credential(value)
        except CredentialError as exc:
            failure = exc
            continue
        for macaroon in credential.macaroons:
            try:
                _, info = paywall.verify_signature(macaroon, engine.root_key_for)
                rule = engine.rule_named(info.services)
                if rule is None:
                    raise TokenError("wrong_service", "what this token paid for is not sold here")
                token = gate.check_credential(
                    Credential(credential.scheme, (macaroon,), credential.preimage),
                    service=rule.name,
                    root_key_for=engine.root_key_for,
                    revoked=engine.revoked,
                    now=now,
                )
            except TokenError as exc:
                failure = exc
                continue
            return rule, macaroon, credential.preimage, token
    if isinstance(failure, TokenError) and not failure.invalid:
        return json_answer(
            403, {"error": "refused", "reason": failure.reason, "message": f"{failure}."}
        )
    reason = failure.reason if isinstance(failure, TokenError) else "malformed"
    return json_answer(
        401, {"error": "invalid_token", "reason": reason, "message": f"Not accepted: {failure}."}
    )


# -- the door's part: the feed document -------------------------------------------------------


def rewrites(method: str, status: int) -> bool:
    """Does this answer to a feed request get rewritten? 2xx with a body; HEAD, 204, 206, 304
    and errors pass unchanged."""
    return method.upper() != "HEAD" and 200 <= status < 300 and status not in (204, 206)


def decoded(body: bytes, coding: str | None) -> bytes:
    """The feed's bytes without their content coding (identity, gzip, deflate), at most
    MAX_FEED_BYTES of them; FeedError for another coding, a broken or cut one, or a bigger
    feed."""
    codings = [c.strip().lower() for c in (coding or "").split(",") if c.strip()]
    for name in reversed(codings):
        if name == "identity":
            continue
        if name in ("gzip", "x-gzip"):
            body = _inflated(body, name, 16 + zlib.MAX_WBITS, members=True)
        elif name == "deflate":
            body = _inflated(body, name, zlib.MAX_WBITS, members=False)
        else:
            raise FeedError(f"the origin sent the feed with Content-Encoding: {name}")
    return body


def _inflated(body: bytes, name: str, wbits: int, *, members: bool) -> bytes:
    """`body` inflated whole, at most MAX_FEED_BYTES: a gzip body may be several members one
    after the other (RFC 1952 2.2; what `cat a.gz b.gz` and some servers' flushes make), each
    read in turn, not the first alone (a feed cut after it would drop episodes, or not be XML);
    zero bytes after a member are padding (as Python's gzip reads them). A deflate body is one
    stream. Anything else after the end, or a stream cut short, is a FeedError.

    Fed _INFLATE_CHUNK bytes at a time: zlib copies what follows a member's end (unused_data),
    so with the whole body at once a body of many tiny members would be copied once per member
    (quadratic); this way each copy is at most a chunk."""
    parts: list[bytes] = []
    size = 0
    view = memoryview(body)
    position = 0
    ended = 0  # members read to their end
    inflater: Any = None  # the member being read; None between members
    data: bytes | memoryview = b""
    while True:
        if not data:
            if position >= len(view):
                break
            data = view[position : position + _INFLATE_CHUNK]
            position += len(data)
        if inflater is None:
            if ended:
                data = bytes(data).lstrip(b"\0")
                if not data:
                    continue
                if not members:
                    raise FeedError(f"the feed's {name} coding has data after its end")
            inflater = zlib.decompressobj(wbits)
        try:
            # Never 0 (which would mean no bound): size is at most MAX_FEED_BYTES here.
            part = inflater.decompress(data, MAX_FEED_BYTES + 1 - size)
        except zlib.error as exc:
            raise FeedError(f"the feed's {name} coding is broken: {exc}") from None
        size += len(part)
        if size > MAX_FEED_BYTES:
            raise FeedError(f"feed too large: more than {MAX_FEED_BYTES} bytes")
        parts.append(part)
        # Under the bound, all of `data` was taken: what is left follows the member's end.
        data = inflater.unused_data
        if inflater.eof:
            inflater, ended = None, ended + 1
    if inflater is not None:
        raise FeedError(f"the feed's {name} coding is cut short")
    return b"".join(parts)


def private_body(body: bytes, coding: str | None, note: Mapping[str, Any]) -> bytes:
    """The origin's feed (with its content coding) as the listener's private feed; FeedError
    (one line) when it cannot be. CPU work: the door runs it in a thread; at most
    REWRITES_AT_ONCE run at once in the process (the others wait, boundedly, their turn)."""
    if not _REWRITES.acquire(timeout=REWRITE_WAIT_SECONDS):
        raise FeedError("too many private feeds are being made at once: try again shortly")
    try:
        return make_private(
            decoded(body, coding),
            private_base=str(note["private_base"]),
            public_hosts=[str(host) for host in note["public_hosts"]],
            self_url=str(note["self_url"]),
        )
    finally:
        _REWRITES.release()


def private_head(fields: Fields) -> Fields:
    """The head of any answer to a request through a capability that passes without its body
    rewritten (HEAD, 304, an error): kept by nobody but the listener (Cache-Control private,
    the origin's shared-cache directives and CDN cache fields gone), no Link (a WebSub hub or
    self), no Referer of its URL sent by a browser showing it. Idempotent."""
    fields = _without(fields, _PRIVATE_DROPS)
    directives = [
        d.strip()
        for d in (get(fields, "Cache-Control") or "").split(",")
        if d.strip() and d.split("=", 1)[0].strip().lower() not in _SHARED_CACHE_DIRECTIVES
    ]
    if not any(d.lower() in ("private", "no-store") for d in directives):
        directives.insert(0, "private")
    fields = set_all(fields, "Cache-Control", [", ".join(directives)])
    return set_all(fields, "Referrer-Policy", [_REFERRER_POLICY])


def private_fields(fields: Fields, length: int) -> Fields:
    """The feed answer's head for the rewritten body: private_head, its length, no content
    coding or digest of the origin's bytes (ETag stays: the rewrite is deterministic, so a 304
    for it is right)."""
    fields = private_head(_without(fields, _FEED_RESPONSE_DROPS))
    return (*fields, (b"content-length", str(length).encode()))


def bad_feed_answer(reason: str, method: str = "GET") -> Answer:
    """502: the origin's feed could not be made private (one line saying why)."""
    answer = Answer.make(
        502,
        f"The private feed could not be made: {reason}\n".encode(),
        {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=utf-8"},
    ).for_method(method)
    answer.note = {"variant": "unavailable", "reason": "feed"}
    return answer
