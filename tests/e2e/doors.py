"""Any of the three front doors, started as a user starts it, in front of the same sample origin
(l402proxy.origin_asgi under a real uvicorn):

- mitmproxy: `mitmdump --mode reverse:<origin> -s addons/server.py` (procs.server_proxy);
- asgi: `uvicorn --factory l402proxy.origin_asgi:paywalled` (the origin wrapped in L402Middleware);
- nginx: Debian's nginx with `l402proxy nginx-config`'s block, asking `l402proxy serve-auth`
  (tests/e2e/nginx.py).

Doors started with the same home and store share the dev ledger and the store (its secret and
tokens), as three doors of one deployment would.
"""

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from l402proxy.launch import started
from tests.conftest import require

from . import procs

DoorKind = Literal["mitmproxy", "asgi", "nginx"]
KINDS: tuple[DoorKind, ...] = ("mitmproxy", "asgi", "nginx")


@dataclass
class Door:
    kind: DoorKind
    base_url: str
    home: Path
    store: Path
    # The bare origin behind the door; None for the ASGI door, whose origin is in its process.
    origin_url: str | None
    # Where the door's processes write their logs (and nginx its prefix).
    workdir: Path


def uvicorn(
    workdir: Path,
    home: Path,
    target: str,
    *,
    env: dict[str, str] | None = None,
    factory: bool = False,
    name: str = "origin",
) -> procs.Process:
    """`python -m uvicorn <target>` on a free port (the door's and the origin's server)."""
    require(importlib.util.find_spec("uvicorn") is not None, "uvicorn (pip install uvicorn)")
    port = procs.free_port()
    command = [
        sys.executable, "-m", "uvicorn", *(["--factory"] if factory else []), target,
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip
    return procs.Process(
        name=f"uvicorn {name}",
        command=command,
        port=port,
        log_path=workdir / f"uvicorn-{name}-{port}.log",
        env=procs.env_with_home(home) | (env or {}),
    )


@contextlib.contextmanager
def start_door(
    kind: DoorKind, workdir: Path, home: Path, rules: Path, store: Path | None = None
) -> Iterator[Door]:
    """Start the door (and its origin), yield it, stop everything after, also on failure."""
    if kind not in KINDS:
        raise ValueError(f"no such door: {kind!r}")
    store = store if store is not None else home / "server.sqlite"
    ledger = home / "devledger.sqlite"
    workdir.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    if kind == "nginx":
        from .nginx import nginx_binary

        nginx_binary()  # skips (fails in CI) before anything starts
    if kind == "asgi":
        settings = {
            "L402PROXY_RULES": str(rules),
            "L402PROXY_BACKEND": "dev",
            "L402PROXY_STORE": str(store),
            "L402PROXY_DEV_LEDGER": str(ledger),
        }
        target = "l402proxy.origin_asgi:paywalled"
        door = uvicorn(workdir, home, target, env=settings, factory=True, name="asgi-door")
        with started(door):
            yield Door(kind, door.url, home, store, None, workdir)
        return
    origin = uvicorn(workdir, home, "l402proxy.origin_asgi:app")
    with started(origin):
        if kind == "mitmproxy":
            proxy = procs.server_proxy(
                workdir, home, workdir / "mitmproxy-conf", origin.url, rules,
                f"l402_store={store}", f"l402_dev_ledger={ledger}",
            )  # fmt: skip
            with started(proxy):
                yield Door(kind, proxy.url, home, store, origin.url, workdir)
        else:
            from .nginx import nginx_door

            with nginx_door(
                workdir, home, rules, origin.url, "--store", str(store), "--dev-ledger", str(ledger)
            ) as base_url:
                yield Door(kind, base_url, home, store, origin.url, workdir)
