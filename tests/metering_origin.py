"""An origin for the metered bundles' end-to-end tests (tests/e2e/test_metering_e2e.py): a plain
ASGI app, served by a real uvicorn, bare (behind mitmdump) or wrapped in the ASGI door.

- `/api/<anything>?units=<value>`: a small JSON answer reporting `<value>` in X-Usage, as an
  API metered by units does (`&spelling=<name>` sends the header under that name, `&twice=1`
  twice; no `units=`: no report at all).
- `/big/<n>`: n chunks of CHUNK bytes, sent as separate body messages with no Content-Length
  (a live stream): the app never listens for the client leaving, so only the door can tell
  how much a client that hung up got.

    python -m uvicorn tests.metering_origin:app --port 8080
    L402PROXY_RULES=rules.yaml python -m uvicorn --factory tests.metering_origin:paywalled
"""

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHUNK = 64 * 1024
MAX_CHUNKS = 4096  # 256 MiB at most: a bound, never reached by a client that hangs up


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    path: str = scope["path"]
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if path.startswith("/api/"):
        headers = [(b"content-type", b"application/json")]
        units = query.get("units", [None])[0]
        if units is not None:
            name = query.get("spelling", ["X-Usage"])[0].encode()
            copies = 2 if query.get("twice") else 1
            headers += [(name, units.encode("latin-1"))] * copies
        body = json.dumps({"path": path, "units": units}).encode()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if path.startswith("/big/") and path[5:].isdigit() and int(path[5:]) <= MAX_CHUNKS:
        count = int(path[5:])
        headers = [(b"content-type", b"application/octet-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunk = b"m" * CHUNK
        for index in range(count):
            more = index < count - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        return
    body = b"not found\n"
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def paywalled() -> ASGIApp:
    """`app` behind the ASGI door, configured as l402proxy.origin_asgi:paywalled is."""
    from l402proxy.asgi import L402Middleware

    return L402Middleware(
        app,
        rules=os.environ["L402PROXY_RULES"],
        backend="dev",
        store=os.environ.get("L402PROXY_STORE") or None,
        dev_ledger=os.environ.get("L402PROXY_DEV_LEDGER") or None,
    )
