"""Rate limits, the invoice-mint limit and free allowances: who is asking, and how often.

The counting is a protocol (`Counters`) so it can live where the state lives: in this process
(`LocalCounters`, the default: exact for one instance) or in a shared store (PostgreSQL: global
across instances). Both count the same way:

- a rate limit is a GCRA token bucket: each key keeps the "theoretical arrival time" (TAT) of its
  next request; a request costs `interval` seconds and is allowed while the TAT stays within
  `burst * interval` of now. One number per key, updated atomically: easy to share.
- free allowances count requests per key in fixed windows of `per` seconds.
"""

import ipaddress
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from ..rules import RateLimit
from .request import Fields, get

log = logging.getLogger(__name__)

# Keys kept in memory, at most; forgetting one only forgets how often it asked.
MAX_KEYS = 200_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Counters(Protocol):
    async def take_rate(self, key: str, interval: float, burst: int, now: float) -> float | None:
        """Spend one request of `key`'s bucket: None when allowed, else the seconds to wait."""
        ...

    async def take_allowance(self, key: str, limit: int, window: int, now: float) -> int | None:
        """Spend one of `limit` requests in `key`'s current window of `window` seconds: how many
        are left after this one, or None when none was left (nothing spent)."""
        ...


def gcra(tat: float | None, interval: float, burst: int, now: float) -> tuple[float, float | None]:
    """One GCRA step: (the new TAT, None) when allowed, (the old TAT, seconds to wait) when not."""
    tat = now if tat is None or tat < now else tat
    new_tat = tat + interval
    allowed_at = new_tat - burst * interval
    if allowed_at > now:
        return tat, allowed_at - now
    return new_tat, None


class LocalCounters:
    """Counters of this process only (exact for one instance; each instance counts alone)."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.tats: OrderedDict[str, float] = OrderedDict()
        self.windows: OrderedDict[str, tuple[int, int]] = OrderedDict()

    async def take_rate(self, key: str, interval: float, burst: int, now: float) -> float | None:
        tat, wait = gcra(self.tats.get(key), interval, burst, now)
        self._keep(self.tats, key, tat)
        return wait

    async def take_allowance(self, key: str, limit: int, window: int, now: float) -> int | None:
        start = int(now // window) * window
        seen_start, used = self.windows.get(key, (start, 0))
        if seen_start != start:
            used = 0
        if used >= limit:
            return None
        self._keep(self.windows, key, (start, used + 1))
        return limit - used - 1

    def _keep(self, table: "OrderedDict[str, object]", key: str, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_keys:
            table.popitem(last=False)


class SharedCounters:
    """Counters kept in a shared store (PostgreSQL: global across instances), falling back to
    this process's own while the store does not answer: limits keep working, each instance
    counting alone until the database is back (logged once per outage)."""

    def __init__(self, shared: Counters, local: LocalCounters | None = None) -> None:
        self.shared = shared
        self.local = local or LocalCounters()
        self.failing = False

    async def take_rate(self, key: str, interval: float, burst: int, now: float) -> float | None:
        try:
            wait = await self.shared.take_rate(key, interval, burst, now)
        except Exception as exc:
            self._failed(exc)
            return await self.local.take_rate(key, interval, burst, now)
        self._works()
        return wait

    async def take_allowance(self, key: str, limit: int, window: int, now: float) -> int | None:
        try:
            left = await self.shared.take_allowance(key, limit, window, now)
        except Exception as exc:
            self._failed(exc)
            return await self.local.take_allowance(key, limit, window, now)
        self._works()
        return left

    def _failed(self, exc: Exception) -> None:
        if not self.failing:
            self.failing = True
            log.warning(f"l402: limits counted by this instance alone for now: {exc}")

    def _works(self) -> None:
        if self.failing:
            self.failing = False
            log.warning("l402: limits counted across instances again")


def retry_after(wait: float) -> int:
    """Whole seconds for Retry-After, never 0 (a client told 0 asks again at once)."""
    return max(1, math.ceil(wait))


def ip_key(address: str | None) -> str:
    """The key a client address counts under: IPv6 by its /64 (one host gets a whole /64 and
    could otherwise rotate through it), IPv4 by itself; "unknown" when the door cannot tell."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_address(
    peer: str | None, fields: Fields, trusted: Sequence[Network], trust_unix: bool = False
) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the last
    X-Forwarded-For entry that is not itself a trusted proxy (entries left of it could be
    anything the client wrote). An untrusted peer's X-Forwarded-For changes nothing. A peer
    without an address (a unix socket) is trusted only with `trust_unix`."""
    if not peer:
        if not trust_unix:
            return peer
    elif not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = get(fields, "X-Forwarded-For")
    if not forwarded:
        return peer
    nearest = peer
    for hop in reversed([hop.strip() for hop in forwarded.split(",")]):
        if not _is_ip(hop):
            # A trusted proxy always writes an address: what is not one came from the client,
            # and a made-up value must not buy a fresh key. Count under the proxy it reached.
            return nearest
        if not _trusted(hop, trusted):
            return hop
        nearest = hop
    return nearest


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == network.version and ip in network for network in trusted)


def rate_key(limit: RateLimit, service: str, who: str) -> str:
    """What a rate limit counts under: its service and its own terms, not its place in the
    file, so an edit elsewhere in the rules (or another instance's copy with a line more)
    neither resets it nor splits it."""
    return f"rate:{service}:{limit.key}:{limit.requests}/{limit.per}/{limit.burst}:{who}"
