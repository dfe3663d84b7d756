"""One HTTP client for the REST backends (Eclair, LNbits, LNURL), written once.

What each of them needs and used to build for itself:
- connection reuse: one httpx client per backend object, made lazily inside the running loop
  (an httpx client belongs to the loop it was made in: a CLI's second asyncio.run gets a new
  one) and kept open, so calls reuse their connections;
- timeouts: every call is bounded (connecting at most CONNECT_TIMEOUT of it), a call may ask
  for a longer one (a blocking payment);
- never the environment's proxy: HTTP(S)_PROXY would carry keys through a third party or,
  inside mitmdump, through the client proxy itself;
- failures mapped to the LightningError classes, in one line: BackendUnavailable for anything
  on the way (refused, TLS, DNS, timeout, connection lost), NothingSent when a payment's
  connection never came up (so certainly nothing was sent), LightningError for a URL httpx
  cannot use;
- secrets scrubbed: whatever a server or a library put into a message, the backend's keys and
  passwords never reach a log line.

What an answer means (status codes, JSON shapes) stays with each backend.
"""

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import httpx

from l402proxy.lightning.base import BackendUnavailable, LightningError, NothingSent
from l402proxy.lightning.common import one_line

# Connecting is quick or not happening: a dead host fails within this, whatever the timeout.
CONNECT_TIMEOUT: Final = 5.0
# How deep to look through exception causes for the reason (httpx wraps the OSError twice).
_CAUSE_DEPTH: Final = 8


def transport_failure(exc: httpx.HTTPError, timeout: float) -> str:
    """What went wrong, in a few words: refused / TLS / name lookup / timeout / lost."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    # httpx says "All connection attempts failed"; the cause underneath says which.
    cause: BaseException | None = exc
    for _ in range(_CAUSE_DEPTH):
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({getattr(cause, 'reason', None) or cause})"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host name ({cause.strerror or cause})"
        cause = cause.__cause__ or cause.__context__
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({reason})"
    return f"connection failed ({reason})"


class HttpApi:
    """One backend's HTTP API: a lazily made, reused httpx client and its failure messages.

    `where` starts every message ("eclair 127.0.0.1:8080", "LNbits at https://h"): it must be
    secret-free already. `secrets` are scrubbed from every message all the same. `hint` may add
    a few words to a transport failure ("; use lnbits+http://").
    """

    def __init__(
        self,
        where: str,
        *,
        timeout: float,
        base_url: str = "",
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | bool = True,
        secrets: Iterable[str] = (),
        hint: Callable[[str], str] | None = None,
    ) -> None:
        self.where = where
        self.timeout = timeout
        self.base_url = base_url
        self._headers = dict(headers or {})
        self._auth = auth
        self._verify = verify
        self._secrets = tuple(s for s in secrets if s)
        self._hint = hint
        # A test's stand-in for the network (httpx.MockTransport); None: the real one.
        self.transport: httpx.AsyncBaseTransport | None = None
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"HttpApi({self.where!r}, timeout={self.timeout:g})"

    def client(self) -> httpx.AsyncClient:
        """The client for the running loop, made on first use (and again in a new loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._client.is_closed:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                auth=self._auth,
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT)),
                verify=self._verify,
                follow_redirects=False,
                trust_env=False,
                transport=self.transport,
            )
            self._loop = loop
        return self._client

    async def close(self) -> None:
        """Close the connections; a client of another (finished) loop is just dropped."""
        client, loop = self._client, self._loop
        self._client = self._loop = None
        if client is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            await client.aclose()

    def scrub(self, text: str) -> str:
        """`text` without any of the secrets, whatever put them there."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _failure(self, exc: httpx.HTTPError, doing: str, timeout: float | None) -> str:
        what = transport_failure(exc, self.timeout if timeout is None else timeout)
        if self._hint is not None:
            what += self._hint(what)
        return self.scrub(one_line(f"{self.where}: {doing}: {what}"))

    def unreachable(
        self, exc: httpx.HTTPError, doing: str, *, timeout: float | None = None
    ) -> BackendUnavailable:
        """One line for a transport failure: refused / TLS / timeout / connection lost."""
        return BackendUnavailable(self._failure(exc, doing, timeout))

    def not_usable(self, doing: str) -> LightningError:
        # The URI parsers check hosts; whatever slips through (a redirect, a callback) is
        # still one line, never an idna traceback.
        return LightningError(self.scrub(f"{self.where}: {doing}: not a usable URL"))

    async def request(
        self,
        method: str,
        url: str,
        doing: str,
        *,
        timeout: float | None = None,
        paying: bool = False,
        **options: Any,
    ) -> httpx.Response:
        """One request; transport failures as LightningErrors (see the module docstring).

        `paying`: this request sends a payment, so a connection that never came up is
        NothingSent (a PaymentFailed too), and anything later stays BackendUnavailable: the
        request may have arrived."""
        if timeout is not None:
            options["timeout"] = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))
        try:
            return await self.client().request(method, url, **options)
        except httpx.ConnectError as exc:
            message = self._failure(exc, doing, timeout)
            if paying:
                raise NothingSent(f"{message}; nothing was sent") from None
            raise BackendUnavailable(message) from None
        except httpx.HTTPError as exc:
            raise self.unreachable(exc, doing, timeout=timeout) from None
        except (httpx.InvalidURL, UnicodeError):
            raise self.not_usable(doing) from None


__all__ = ["CONNECT_TIMEOUT", "HttpApi", "transport_failure"]
