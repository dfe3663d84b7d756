"""Prometheus metrics (l402_metrics): what the engine tells its watchers, counted, and served as
Prometheus text at /metrics from inside the door's own event loop.

The metric families live once per process, in a registry of our own (never prometheus-client's
global one: importing us never collides with an application's metrics). `Metrics` is a
stateless watcher over them, so any number of engines in one process (two ASGI middlewares,
tests) count into the same series, apart only by their `door` label, and summed when the door
is the same: one process, one set of values.

Several worker processes (uvicorn --workers N): with PROMETHEUS_MULTIPROC_DIR set, each process
writes its values to its own file there, and /metrics sums all the files (prometheus-client's
MultiProcessCollector), so whichever worker serves the scrape answers for all of them.

Every label value comes from a short closed list (decision kinds, refusal reasons, statuses,
operations) or from the configuration (service and door names, checked and capped in number):
never a token id, an address or a path. A value off the lists is counted as "other".
"""

import asyncio
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ..engine import events
from ..engine.events import Decision
from ..l402.token import REASONS as TOKEN_REASONS
from .listen import ListenError, bind

log = logging.getLogger(__name__)

PREFIX = "l402_"
OPTION = "metrics"  # how listen errors name us (the doors' option names all contain it)

# Label values off the closed lists. Services and doors get "_other" instead: a service may be
# called "other", but no rules file name starts with "_", so the two never mix.
OTHER = "other"
OTHER_NAME = "_other"
NO_SERVICE = ""  # a request no rule covers (the origin's latency of unpriced requests)

CHALLENGE_STATUSES = ("402", "401")
PAYMENT_REQUIRED = "payment_required"  # a challenge with no token refused in it
LIMIT_REASONS = ("ip", "token", "invoices")  # rules.py's rate-limit keys, the mint limit
BACKEND_OPERATIONS = ("create_invoice", "lookup_invoice")
# The store calls the engine and doors tell of when they fail: recording issued tokens, reading
# revocations, opening, drawing from a bundle, charging metered bytes/units, feed accesses.
STORE_OPERATIONS = ("flush", "revocations", "open", "draw", "charge", "feed")

# rules.py's service names (1-64 letters, digits, '_', '-'); the doors' names fit too.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_SERVICES = 256  # per process: rules edited and reloaded for weeks stay bounded
MAX_DOORS = 16

# Seconds. A decision is sub-millisecond from memory and up to seconds when it mints an invoice.
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BACKEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Serving: one short request per connection, then the connection is closed.
HEAD_LIMIT = 8192  # bytes of request line and headers
CLIENT_SECONDS = 10.0  # the whole exchange, slow client or not
MAX_CLIENTS = 16  # connections at once; more are dropped unanswered

REGISTRY = CollectorRegistry()


class MetricsError(ValueError):
    """Metrics cannot be kept as configured (a bad PROMETHEUS_MULTIPROC_DIR), as one line."""


def _multiproc_dir() -> str | None:
    # prometheus-client's own test (values.get_value_class): set at all, even empty, means
    # multiprocess; the lower-case name is its deprecated spelling.
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        if name in os.environ:
            return os.environ[name]
    return None


def multiprocess() -> bool:
    """PROMETHEUS_MULTIPROC_DIR is in use: values are shared with the other worker processes
    through files in that directory, and /metrics serves their sum."""
    return _multiproc_dir() is not None


class _Names:
    """Label values taken from the configuration (service and door names): well-formed ones
    as they are, up to `limit` distinct values; anything else is `OTHER_NAME`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def label(self, value: str | None) -> str:
        if value is None:
            return NO_SERVICE
        if value in self.seen:
            return value
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            return OTHER_NAME
        with self.lock:
            if len(self.seen) >= self.limit:
                return OTHER_NAME
            self.seen.add(value)
        return value


_services = _Names(MAX_SERVICES)
_doors = _Names(MAX_DOORS)


def _word(value: object, known: Iterable[str]) -> str:
    return value if isinstance(value, str) and value in known else OTHER


def _seconds(value: float) -> float | None:
    """A duration fit to observe: never negative, never NaN or infinite."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return max(float(value), 0.0)


class _Families:
    """The metric families, made once per process (`_families()`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, documentation, labels, registry=registry)

        def histogram(
            name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> Histogram:
            return Histogram(name, documentation, labels, registry=registry, buckets=buckets)

        self.decisions = counter(
            "l402_decisions_total",
            "Requests the paywall judged, by decision kind; dry_run=true: judged but forwarded.",
            ("door", "kind", "dry_run"),
        )
        self.decision_seconds = histogram(
            "l402_decision_duration_seconds",
            "Time the paywall took to judge a request (invoice creation included).",
            ("door",),
            DECISION_BUCKETS,
        )
        self.challenges = counter(
            "l402_challenges_total",
            "Challenges answered (402, or 401 for a bad token), each with a fresh invoice; "
            "in dry run, the ones the paywall would have answered.",
            ("door", "service", "status"),
        )
        self.tokens_accepted = counter(
            "l402_tokens_accepted_total",
            "Requests served the paid variant on a valid token (or token cookie).",
            ("door", "service"),
        )
        self.tokens_refused = counter(
            "l402_tokens_refused_total",
            "Tokens refused (each answered with a challenge), by reason.",
            ("door", "service", "reason"),
        )
        self.rate_limited = counter(
            "l402_rate_limited_requests_total",
            "Requests answered 429: reason ip or token (a rule's rate limit), invoices (the "
            "invoice-mint limit).",
            ("door", "service", "reason"),
        )
        self.settled = counter(
            "l402_invoices_settled_total",
            "Invoices paid, each counted once by the instance that recorded it.",
            ("service",),
        )
        self.earned = counter(
            "l402_earned_sats_total",
            "Satoshis earned: the price of each settled invoice.",
            ("service",),
        )
        self.backend_seconds = histogram(
            "l402_backend_request_duration_seconds",
            "Time each call to the Lightning backend took, failed ones included.",
            ("operation",),
            BACKEND_BUCKETS,
        )
        self.backend_errors = counter(
            "l402_backend_errors_total",
            "Calls to the Lightning backend that failed.",
            ("operation",),
        )
        self.store_errors = counter(
            "l402_store_errors_total",
            "Token store operations that failed.",
            ("operation",),
        )
        self.upstream_seconds = histogram(
            "l402_upstream_duration_seconds",
            "Time the origin took to answer a forwarded request (to its response headers); "
            'service="" for requests no rule covers.',
            ("door", "service"),
            UPSTREAM_BUCKETS,
        )
        # The error series exist (at 0) from the start: rate() and increase() see the first
        # error, and an alert on them has a series to watch.
        for operation in BACKEND_OPERATIONS:
            self.backend_errors.labels(operation)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)


_made: _Families | None = None
_making = threading.Lock()


def _families() -> _Families:
    global _made
    if _made is not None:
        return _made
    with _making:
        if _made is None:
            if multiprocess():
                _use_multiprocess_values()
            _made = _Families(REGISTRY)
    return _made


def _use_multiprocess_values() -> None:
    """Check PROMETHEUS_MULTIPROC_DIR, and make sure our values go to files there.

    prometheus-client picks how values are kept once, when prometheus_client.values is first
    imported: in memory, or in files when the variable is set. Set after that import, each
    worker would count on its own and /metrics (which reads the files) would show nothing.
    A metric takes the class when its series are made, so choosing it again here, before our
    first series, puts ours in the files as the variable asks.
    """
    path = _multiproc_dir() or ""
    if not os.path.isdir(path):
        raise MetricsError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not a directory: create it (empty) before "
            "the workers start; each keeps its metric values in a file there"
        )
    if not getattr(values.ValueClass, "_multiprocess", False):
        log.warning(
            "l402: PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: "
            "switching it to multiprocess values now (set it in the environment instead)"
        )
        values.ValueClass = values.get_value_class()


class Metrics:
    """The engine watcher that counts (events.Watcher). Stateless: every instance counts into
    the same process-wide families, and all instances are equal, so adding a second one to an
    engine (Watchers.add) changes nothing and nothing is counted twice."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Metrics)

    def __hash__(self) -> int:
        return hash(Metrics)

    def decided(self, decision: Decision) -> None:
        families = _families()
        door = _doors.label(decision.door)
        kind = _word(decision.kind, events.KINDS)
        dry_run = "true" if decision.dry_run else "false"
        families.decisions.labels(door, kind, dry_run).inc()
        seconds = _seconds(decision.seconds)
        if seconds is not None:
            families.decision_seconds.labels(door).observe(seconds)
        if kind == events.CHALLENGE:
            service = _services.label(decision.service)
            status = _word(str(decision.status), CHALLENGE_STATUSES)
            families.challenges.labels(door, service, status).inc()
            if decision.reason is not None and decision.reason != PAYMENT_REQUIRED:
                # A token came and was not good enough (expired, revoked, forged...).
                reason = _word(decision.reason, TOKEN_REASONS)
                families.tokens_refused.labels(door, service, reason).inc()
        elif kind == events.GRANT:
            families.tokens_accepted.labels(door, _services.label(decision.service)).inc()
        elif kind == events.LIMITED:
            service = _services.label(decision.service)
            reason = _word(decision.reason, LIMIT_REASONS)
            families.rate_limited.labels(door, service, reason).inc()

    def settled(self, door: str, service: str, price_sat: int) -> None:
        families = _families()
        label = _services.label(service)
        families.settled.labels(label).inc()
        if isinstance(price_sat, int) and price_sat > 0:
            families.earned.labels(label).inc(price_sat)

    def backend_called(self, door: str, operation: str, seconds: float, ok: bool) -> None:
        families = _families()
        label = _word(operation, BACKEND_OPERATIONS)
        observed = _seconds(seconds)
        if observed is not None:
            families.backend_seconds.labels(label).observe(observed)
        if not ok:
            families.backend_errors.labels(label).inc()

    def store_failed(self, door: str, operation: str) -> None:
        _families().store_errors.labels(_word(operation, STORE_OPERATIONS)).inc()

    def upstream_answered(self, door: str, service: str | None, seconds: float) -> None:
        observed = _seconds(seconds)
        if observed is None:
            return
        families = _families()
        families.upstream_seconds.labels(_doors.label(door), _services.label(service)).observe(
            observed
        )


_METRICS = Metrics()


def metrics() -> Metrics:
    """The watcher to add to an engine; MetricsError when PROMETHEUS_MULTIPROC_DIR is set to
    something that is not a directory."""
    _families()
    return _METRICS


class _Ours(Collector):
    """Our families only, without the `_created` series prometheus-client adds to counters and
    histograms (they double the series, and the multiprocess files do not have them)."""

    def __init__(self, source: Collector) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self.source.collect():
            if not metric.name.startswith(PREFIX):
                continue  # another library's values in a shared PROMETHEUS_MULTIPROC_DIR
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def exposition() -> bytes:
    """The /metrics body: Prometheus text format 0.0.4 (CONTENT_TYPE). In multiprocess mode
    it reads every worker's file, so call it off the event loop there."""
    _families()
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=_multiproc_dir())
        return generate_latest(_Ours(registry))
    return generate_latest(_Ours(REGISTRY))


CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


def _response(status: int, body: bytes, *, head: bool, extra: tuple[str, ...] = ()) -> bytes:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head else body)


class _Listener:
    """One listening socket with the /metrics handler, shared by the MetricsServers started
    on the same address in this process and event loop (two middlewares in one app)."""

    def __init__(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.users = 1
        self.server: asyncio.Server | None = None
        self.clients: set[asyncio.Task[None]] = set()
        # Multiprocess mode reads files on a thread: one read at a time is plenty.
        self.reading = asyncio.Lock()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self.clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self.clients.add(task)  # type: ignore[arg-type]
        answered = False
        try:
            # One deadline for the whole exchange: a client that sends or reads slowly is cut
            # off, never waited for.
            async with asyncio.timeout(CLIENT_SECONDS):
                writer.write(await self.answer(reader))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
                answered = True
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # the client is gone or too slow: nothing to tell it
        except asyncio.CancelledError:
            # release(): the server closes. End as a finished task, not a cancelled one:
            # asyncio's start_server callback asks a cancelled task for its exception and
            # reports a CancelledError traceback for every client still connected.
            pass
        finally:
            self.clients.discard(task)  # type: ignore[arg-type]
            if not answered:
                writer.transport.abort()

    async def answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _response(431, b"Request header too large.\n", head=False)
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, b"Bad request.\n", head=False)
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"Use GET.\n", head=False, extra=("Allow: GET, HEAD",))
        head_only = method == b"HEAD"
        if target.split(b"?", 1)[0] != b"/metrics":
            return _response(404, b"Not found: the metrics are at /metrics.\n", head=head_only)
        return _response(200, await self.text(), head=head_only)

    async def text(self) -> bytes:
        if not multiprocess():
            # Our own values, in memory: a few milliseconds at most, and the watchers update
            # them on this same loop, so the text is taken without a thread hop or a lock.
            return exposition()
        # Every worker's file, read from disk (as many files as workers ever ran): off the
        # loop, so a slow disk never holds up the requests the door is serving.
        async with self.reading:
            return await asyncio.to_thread(exposition)

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if _listeners.get(self.key) is self:
            del _listeners[self.key]
        if self.server is not None:
            self.server.close()
        clients = list(self.clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


_listeners: dict[tuple[str, int], _Listener] = {}


class MetricsServer:
    """/metrics served from the event loop that starts it (mitmproxy's, uvicorn's,
    serve-auth's): asyncio's own server, no thread, no signal handlers. GET or HEAD /metrics
    only; one request per connection."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._closed = False
        self.port = listener.key[1]

    @classmethod
    async def start(cls, host: str, port: int) -> "MetricsServer":
        """Listen on host:port (0: any free port); ListenError when that cannot be had,
        MetricsError for a bad PROMETHEUS_MULTIPROC_DIR. A second start on the same address in
        this process and loop shares the first one's socket."""
        _families()  # a bad PROMETHEUS_MULTIPROC_DIR fails here, not at the first scrape
        loop = asyncio.get_running_loop()
        shared = _listeners.get((host, port)) if port else None
        if shared is not None and shared.loop is loop:
            shared.users += 1
            return cls(shared)
        sock = bind(host, port, option=OPTION)
        bound = (host, sock.getsockname()[1])
        listener = _Listener(bound, loop)
        if port:
            _listeners[bound] = listener  # before the await: a start meanwhile shares it
        try:
            listener.server = await asyncio.start_server(
                listener.serve, sock=sock, limit=HEAD_LIMIT
            )
        except BaseException:
            sock.close()
            await listener.release()
            raise
        return cls(listener)

    async def close(self) -> None:
        """Stop listening (once the last sharer closes); clients still connected are cut."""
        if self._closed:
            return
        self._closed = True
        await self._listener.release()


__all__ = [
    "CONTENT_TYPE",
    "REGISTRY",
    "ListenError",
    "Metrics",
    "MetricsError",
    "MetricsServer",
    "exposition",
    "metrics",
    "multiprocess",
]
