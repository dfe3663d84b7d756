"""The real processes the end-to-end tests talk to, started as a user would start them."""

import asyncio
import contextlib
import http.server
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from l402proxy.launch import (
    REPO,
    Process,
    client_proxy_command,
    env_with_home,
    free_port,
    origin_command,
    server_proxy_command,
)

__all__ = [
    "REPO",
    "Process",
    "cli",
    "client_proxy",
    "dev_pay",
    "env_with_home",
    "fetch",
    "free_port",
    "in_process_origin",
    "ledger_balance",
    "ledger_invoices",
    "minted_credential",
    "origin",
    "proxied_async_client",
    "server_proxy",
    "wait_until",
]

FETCH_TIMEOUT = 30.0


def origin(workdir: Path, home: Path, name: str = "origin") -> Process:
    port = free_port()
    return Process(
        name=f"origin {name}",
        command=origin_command(port, name),
        port=port,
        log_path=workdir / f"origin-{name}-{port}.log",
        env=env_with_home(home),
    )


def server_proxy(
    workdir: Path, home: Path, confdir: Path, origin_url: str, rules: Path | str, *settings: str
) -> Process:
    port = free_port()
    merged = {
        "confdir": str(confdir),
        "l402_store": str(home / "server.sqlite"),
        "l402_dev_ledger": str(home / "devledger.sqlite"),
    }
    # One --set per option: mitmproxy silently drops every script option if one is set twice.
    merged |= dict(setting.split("=", 1) for setting in settings)
    return Process(
        name="server proxy",
        command=server_proxy_command(
            origin_url, port, rules, settings=[f"{k}={v}" for k, v in merged.items()]
        ),
        port=port,
        log_path=workdir / f"server-proxy-{port}.log",
        env=env_with_home(home),
    )


def client_proxy(workdir: Path, home: Path, confdir: Path, *settings: str) -> Process:
    """The paying client addon in regular (forward proxy) mode, as a podcast player would use it."""
    port = free_port()
    merged = {
        "confdir": str(confdir),
        "l402_store": str(home / "client.sqlite"),
        "l402_dev_ledger": str(home / "devledger.sqlite"),
    }
    # One --set per option (see server_proxy).
    merged |= dict(setting.split("=", 1) for setting in settings)
    return Process(
        name="client proxy",
        command=client_proxy_command(port, settings=[f"{k}={v}" for k, v in merged.items()]),
        port=port,
        log_path=workdir / f"client-proxy-{port}.log",
        env=env_with_home(home),
    )


def fetch(
    proxy: Process,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = FETCH_TIMEOUT,
) -> httpx.Response:
    """GET url through a forward proxy; the environment's own proxy settings never apply."""
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=timeout) as client:
        return client.get(url, headers=headers)


def proxied_async_client(proxy: Process, timeout: float = FETCH_TIMEOUT) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=timeout)


def ledger_invoices(home: Path) -> list[dict[str, Any]]:
    """Every invoice in the dev ledger under home, newest first (the CLI's `dev invoices`)."""
    from l402proxy.lightning.dev import DevLedger

    async def listed() -> list[dict[str, Any]]:
        ledger = DevLedger(home / "devledger.sqlite")
        try:
            return await ledger.list_invoices()
        finally:
            await ledger.close()

    return asyncio.run(listed())


def ledger_balance(home: Path, wallet: str = "listener") -> int:
    """A dev wallet's balance in msat."""
    from l402proxy.lightning.dev import DevLedger

    async def balance() -> int:
        ledger = DevLedger(home / "devledger.sqlite")
        try:
            return await ledger.balance(wallet)
        finally:
            await ledger.close()

    return asyncio.run(balance())


def cli(home: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l402proxy", *args],
        capture_output=True,
        text=True,
        env=env_with_home(home),
        cwd=REPO,
        timeout=timeout,
    )


def dev_pay(home: Path, bolt11: str, wallet: str = "listener") -> bytes:
    """Pay through the dev ledger in-process (fast); tests of the CLI itself use `cli`."""
    from l402proxy.lightning.dev import DevLedger

    async def pay() -> bytes:
        ledger = DevLedger(home / "devledger.sqlite")
        try:
            return (await ledger.pay(wallet, bolt11, 0)).preimage
        finally:
            await ledger.close()

    return asyncio.run(pay())


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def in_process_origin(
    handler: type[socketserver.BaseRequestHandler],
    name: str = "origin",
    server_class: type[socketserver.TCPServer] = http.server.ThreadingHTTPServer,
) -> Iterator[str]:
    """A small origin on a thread of this process (for answers the sample origins never give);
    yields its URL."""
    with serving(server_class(("127.0.0.1", 0), handler), name) as port:
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving(server: socketserver.BaseServer, name: str) -> Iterator[int]:
    """Run a socketserver-style `server` (serve_forever/shutdown) on a thread; yields its
    port, and stops it and waits for the thread (bounded) on the way out."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]  # type: ignore[index]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def minted_credential(store: Path | str, service: str, valid_until: int) -> str:
    """A credential signed with the secret in a server's store, as if that server had sold it:
    the only way to hold an expired token without waiting for one."""
    import hashlib
    import os

    from l402proxy.l402.headers import format_credential
    from l402proxy.l402.identifier import Identifier
    from l402proxy.l402.token import caveats_for, derive_root_key, mint
    from l402proxy.store import open_server_store

    async def secret() -> bytes:
        opened = await open_server_store(str(store))
        try:
            return await opened.secret()
        finally:
            await opened.close()

    key = asyncio.run(secret())
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for(service, valid_until=valid_until, capabilities=None)
    macaroon = mint(derive_root_key(key, identifier.token_id), identifier, caveats)
    return format_credential([macaroon], preimage)
