"""Answers for the origin when it is down or does not answer in time: 502 and 504, plain text.

mitmproxy (11 and 12) has no timeout for a server connection: an origin that accepts and never
answers holds the client until mitmproxy's 10-minute inactivity timeout, and a connect to a
host that drops packets waits for the kernel's (about two minutes). When a connection fails, it
answers with its own HTML page naming the origin's address, and no addon hook can replace that
answer (the `error` hook cannot set a response).

So this guard, a child addon of the server addon (mitmproxy runs its hooks after the paywall's):

- starts a deadline when a request is forwarded (its `request` hook runs only for requests the
  paywall let through) and stops it when the response headers come; a sweeper task checks the
  deadlines a few times per timeout;
- when the deadline passes, cancels the asyncio task of the flow's server connection (still
  connecting, or waiting for the answer), which makes mitmproxy fail the flow;
- in the `error` hook of a forwarded flow without a response, writes its own one-line answer
  to a plain-HTTP/1 client (504 after its deadline, else 502) and kills the flow, so mitmproxy
  adds nothing and closes the connection. TLS and HTTP/2 clients keep mitmproxy's own error page:
  bytes written under their TLS or HTTP/2 framing would be garbage.

Reaching the tasks and the client's writer goes through mitmproxy's proxyserver addon
(`connections[client.id].transports`), the same way its `inject` commands find a connection; if
that ever changes, the guard logs it once and mitmproxy's own behaviour stays.
"""

import asyncio
import logging
import time
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.net.http import http1

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30
MAX_TIMEOUT = 3600
# flow.metadata[METADATA]: "forwarded" once the request went to the origin, "timeout" once its
# deadline passed. Plain strings: mitmproxy saves metadata with the flow.
METADATA = "l402_upstream"
_CANCEL_MESSAGE = "l402: the origin did not answer in time"


def upstream_timeout_problem(value: object) -> str | None:
    """Why an `l402_upstream_timeout` value is refused, or None if it is good."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number of seconds, got {value!r}"
    if value < 0 or value > MAX_TIMEOUT:
        return f"must be 1 to {MAX_TIMEOUT} seconds, or 0 for no limit; got {value}"
    return None


def gateway_response(status: int, message: str, method: str) -> http.Response:
    """The proxy's own answer for the origin: one plain line, and the connection closes."""
    body = f"{message}\n".encode()
    response = http.Response.make(
        status,
        b"" if method.upper() == "HEAD" else body,
        {
            "Content-Type": "text/plain; charset=utf-8",
            "Cache-Control": "no-store",
            "Connection": "close",
        },
    )
    response.headers["Content-Length"] = str(len(body))  # what a GET gets, for a HEAD too
    return response


class UpstreamGuard:
    """See the module docstring. `timeout` (seconds, 0 = none) is set by the server addon."""

    def __init__(self, timeout: int = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        # flow.id -> (deadline in time.monotonic(), flow), while it waits for the origin's
        # response headers. One sweeper task checks them, not a timer per flow: scheduling and
        # cancelling a TimerHandle costs about 4 us on every forwarded request, this 0.3 us.
        self._waiting: dict[str, tuple[float, http.HTTPFlow]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._warned = False

    # -- hooks (run after the server addon's) ---------------------------------------------------

    def running(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._waiting.clear()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return  # answered by the paywall (or killed): nothing goes to the origin
        flow.metadata[METADATA] = "forwarded"
        if self.timeout:
            self._waiting[flow.id] = (time.monotonic() + self.timeout, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        state = flow.metadata.get(METADATA)
        if state is None or flow.response is not None or not flow.killable:
            return  # not a request we forwarded, or already answered or killed
        if state == "timeout":
            status = 504
            message = (
                f"Gateway timeout: the origin server did not answer within {self.timeout} "
                "seconds. Please try again later."
            )
        elif flow.server_conn.timestamp_tcp_setup is None:
            status, message = 502, "Bad gateway: the origin server cannot be reached right now."
        else:
            status = 502
            message = "Bad gateway: the origin server closed the connection without an answer."
        log.info(f"l402: {flow.request.method} {flow.request.path}: {status} ({flow.error})")
        self._answer(flow, gateway_response(status, message, flow.request.method))

    # -- the deadline ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Expire the flows past their deadline, checking a few times per timeout (at least
        once a second): a 504 comes at most that much after the deadline."""
        while True:
            # With no timeout nothing is ever waiting: look once a second, in case one is set.
            await asyncio.sleep(min(1.0, self.timeout / 4) if self.timeout else 1.0)
            now = time.monotonic()
            expired = [flow for deadline, flow in self._waiting.values() if deadline <= now]
            for flow in expired:
                try:
                    self._expire(flow)
                except Exception:  # one odd flow must not end the sweeping for all others
                    log.exception("l402: upstream guard: cannot expire a flow")

    def _expire(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        if flow.intercepted:
            # Held in mitmweb or mitmproxy's console: the origin has not been asked yet.
            self._waiting[flow.id] = (time.monotonic() + self.timeout, flow)
            return
        flow.metadata[METADATA] = "timeout"
        if not self._cancel_upstream(flow):
            self._warn_once("cannot find the server connection to cancel")

    def _cancel_upstream(self, flow: http.HTTPFlow) -> bool:
        """Cancel the task of the flow's server connection: the one it uses, or the one being
        opened for it (mitmproxy assigns flow.server_conn only once connected)."""
        handler = self._connection_handler(flow)
        if handler is None:
            return False
        target = (flow.request.host, flow.request.port)
        cancelled = False
        for connection, io in list(getattr(handler, "transports", {}).items()):
            if connection is flow.client_conn or getattr(io, "handler", None) is None:
                continue
            if connection.alpn == b"h2":
                # One HTTP/2 connection to the origin carries other requests too: cancelling it
                # would fail them all. This one waits for mitmproxy's own timeout instead.
                log.info(
                    f"l402: {flow.request.path}: past l402_upstream_timeout on an HTTP/2 origin "
                    "connection shared with other requests; not cancelled"
                )
                cancelled = True  # handled: nothing is missing
                continue
            if connection is flow.server_conn or (
                not connection.connected and connection.address == target
            ):
                io.handler.cancel(_CANCEL_MESSAGE)
                cancelled = True
        return cancelled

    # -- the answer ------------------------------------------------------------------------------

    def _answer(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Send `response` to a plain-HTTP/1 client and kill the flow (mitmproxy then sends
        nothing more and closes the connection); anything else keeps mitmproxy's own page."""
        client = flow.client_conn
        if client.tls_established or client.alpn not in (None, b"", b"http/1.1"):
            return
        writer = self._client_writer(flow)
        if writer is None or writer.is_closing():
            return
        writer.write(http1.assemble_response(response))
        flow.response = response  # for the record (mitmweb, flow files); already on its way
        flow.kill()

    def _client_writer(self, flow: http.HTTPFlow) -> Any:
        handler = self._connection_handler(flow)
        io = getattr(handler, "transports", {}).get(flow.client_conn) if handler else None
        writer = getattr(io, "writer", None)
        if writer is None:
            self._warn_once("cannot find the client connection to answer on")
        return writer

    def _connection_handler(self, flow: http.HTTPFlow) -> Any:
        try:
            proxyserver = ctx.master.addons.get("proxyserver")
        except AttributeError:
            return None  # no mitmproxy master: nothing to cancel or answer on
        connections: dict[Any, Any] = getattr(proxyserver, "connections", None) or {}
        return connections.get(flow.client_conn.id)

    def _warn_once(self, problem: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                f"l402: upstream guard: {problem} (mitmproxy changed?); mitmproxy's own "
                "behaviour for a failing origin stays"
            )
