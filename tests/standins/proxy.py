"""A would-be HTTP proxy on 127.0.0.1 that only notes who came: tests point HTTP_PROXY,
HTTPS_PROXY, ALL_PROXY and grpc_proxy at it to show that a backend never goes through the
environment's proxy (where a key or macaroon would pass a third party, or the client proxy
itself)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "grpc_proxy",
)
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy", "no_grpc_proxy")


class ProxyListener:
    """Accepts connections, keeps the first bytes of each and hangs up."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.seen.append(await asyncio.wait_for(reader.read(4096), 5))
        except (TimeoutError, ConnectionError):
            self.seen.append(b"")
        finally:
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None


@contextlib.asynccontextmanager
async def environment_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProxyListener]:
    """Every proxy variable HTTP clients and gRPC read points at a listener, no exceptions."""
    listener = ProxyListener()
    await listener.start()
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, listener.url)
    for name in NO_PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    try:
        yield listener
    finally:
        await listener.close()
