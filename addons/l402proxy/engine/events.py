"""What the engine tells whoever watches it (metrics, JSON logs, the admin page): one
`Decision` per request it judged, and the events around it (invoices settled, backend calls,
store failures, the origin's answers). Plain data: no watcher is imported here.

Every field is safe to log and to count: a service name, a decision kind, a reason word, a
status, the first 8 hex digits of a token id. Never a macaroon, preimage, invoice, cookie,
key, client address or path (metrics labels stay bounded; logs keep no secret).
"""

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# The kinds of decision, as metrics label values and log words.
GRANT = "grant"  # a valid token (or cookie): the paid variant
FREEBIE = "freebie"  # the paid variant from a free allowance
CHALLENGE = "challenge"  # a 402 (or 401 for a bad token) with a fresh invoice
FREE = "free"  # the free variant (upgrade mode, a client that cannot pay)
LIMITED = "limited"  # 429: a rate limit or the invoice-mint limit
REFUSED = "refused"  # 400: a request the paywall will not judge (header, path)
DENIED = "denied"  # 404: a token that does not allow this method
UNAVAILABLE = "unavailable"  # 503: backend, store or internal failure
UNLOCK = "unlock"  # the paywall page's unlock endpoint
ENDPOINT = "endpoint"  # another /.l402/ endpoint
PASS = "pass"  # no priced rule covers the request

KINDS = (
    GRANT,
    FREEBIE,
    CHALLENGE,
    FREE,
    LIMITED,
    REFUSED,
    DENIED,
    UNAVAILABLE,
    UNLOCK,
    ENDPOINT,
    PASS,
)

TOKEN_PREFIX_LEN = 8


@dataclass(frozen=True, slots=True)
class Decision:
    """One request judged. `service` is the rule's name (None: no rule); `status` the status
    the paywall answered with itself (None: forwarded to the origin); `reason` a short word
    (a challenge's reason, why it was refused or limited); `token` the first 8 hex digits of
    the token id; `seconds` how long the engine took; `dry_run` True when the paywall only
    pretended (the request was forwarded whatever `kind` says)."""

    door: str
    kind: str
    service: str | None
    status: int | None
    reason: str | None = None
    token: str | None = None
    seconds: float = 0.0
    method: str = ""
    dry_run: bool = False


class Watcher(Protocol):
    """What the engine calls. Each call is quick and never awaits; a watcher that raises is
    logged once and never breaks a request (Watchers.tell)."""

    def decided(self, decision: Decision) -> None:
        """One request judged."""

    def settled(self, door: str, service: str, price_sat: int) -> None:
        """An invoice was paid and this instance was the one to record it: counted once across
        instances sharing a store."""

    def backend_called(self, door: str, operation: str, seconds: float, ok: bool) -> None:
        """One call to the Lightning backend (operation: create_invoice, lookup_invoice)."""

    def store_failed(self, door: str, operation: str) -> None:
        """A store operation failed (operation: flush, revocations, open)."""

    def upstream_answered(self, door: str, service: str | None, seconds: float) -> None:
        """The origin answered a forwarded request after `seconds` (from the forward to its
        response headers), where the door can see it."""


class Watchers:
    """The engine's watchers, told each event in turn. A watcher that raises is logged (once
    per watcher and event) and skipped: watching never changes what a request gets."""

    def __init__(self) -> None:
        self.all: list[Watcher] = []
        self._failed: set[tuple[int, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.all)

    def add(self, watcher: Watcher) -> None:
        if watcher not in self.all:
            self.all.append(watcher)

    def remove(self, watcher: Watcher) -> None:
        if watcher in self.all:
            self.all.remove(watcher)

    def tell(self, event: str, *args: object) -> None:
        for watcher in self.all:
            try:
                getattr(watcher, event)(*args)
            except Exception as exc:
                key = (id(watcher), event)
                if key not in self._failed:
                    self._failed.add(key)
                    log.warning(f"l402: {type(watcher).__name__}.{event} failed: {exc!r}")
