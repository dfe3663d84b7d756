"""The sample origin (l402proxy/origin.py) as a plain ASGI app, for the doors that front ASGI
apps and for the behaviour suite that runs every door in front of the same origin.

Same routes and X-Origin-* headers as origin.py, plus X-Origin-Cookie, HEAD, a single byte
Range on the episode routes (206 / 416, `Accept-Ranges: bytes`) and `/stream/<n>`, which sends
n chunks as separate body messages. `?cache-control=<value>` on any route sets the answer's
Cache-Control (to see how a door marks an origin's own caching for paid and free answers).
No framework: only the ASGI spec.

    python -m uvicorn l402proxy.origin_asgi:app --port 8080
    L402PROXY_RULES=rules/podcast.yaml \
        python -m uvicorn --factory l402proxy.origin_asgi:paywalled --port 8080
"""

import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from html import escape
from typing import Any, Literal
from urllib.parse import parse_qs

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EPISODES = ("ep1", "ep2", "ep3")
EPISODE_LINES = 192  # ~4 KiB per episode: enough for a Range to pick something out
MAX_STREAM_CHUNKS = 1000
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def episode_bytes(kind: str, name: str) -> bytes:
    """The first line is origin.py's whole body; numbered lines that repeat kind and name
    follow, so any byte range tells which variant and episode it came from."""
    lines = [f"{kind} episode {name}\n"]
    lines += [f"{i:04d} {kind} {name}\n" for i in range(EPISODE_LINES)]
    return "".join(lines).encode()


def stream_chunk(index: int) -> bytes:
    return f"chunk {index}\n".encode()


def _header(scope: Scope, name: bytes, sep: str = ", ") -> str | None:
    # Every copy joined: a test must see a second Authorization a door let through.
    values = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name]
    return sep.join(values) if values else None


def byte_range(value: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The Range header against a body of `size` bytes: (first, last), inclusive; None to send
    the whole body (no Range, several ranges, or a form we do not read, as RFC 9110 allows)."""
    match = _RANGE.fullmatch(value.strip()) if value else None
    if match is None or match.group() == "bytes=-":
        return None
    first, last = (int(g) if g else None for g in match.groups())
    if first is None:  # suffix form: the last n bytes
        assert last is not None
        return (max(size - last, 0), size - 1) if last and size else "unsatisfiable"
    if first >= size or (last is not None and last < first):
        return "unsatisfiable"
    return first, size - 1 if last is None else min(last, size - 1)


def make_app(name: str = "origin") -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        # Read the whole request body first: some servers stall a keep-alive connection whose
        # body was never read.
        while (await receive()).get("more_body", False):
            pass
        await _route(scope, send, name)

    return app


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _route(scope: Scope, send: Send, name: str) -> None:
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    seen = [
        (b"x-origin-name", name.encode()),
        (b"x-origin-path", raw_path + (b"?" + query if query else b"")),
        *(
            (f"x-origin-{what}".encode(), (_header(scope, header, sep) or "absent").encode())
            for what, header, sep in (
                ("authorization", b"authorization", ", "),
                ("tier", b"x-l402-tier", ", "),
                ("cookie", b"cookie", "; "),
            )
        ),
    ]
    for value in parse_qs(query.decode("latin-1"), encoding="latin-1").get("cache-control", [])[:1]:
        seen.append((b"cache-control", value.encode("latin-1")))
    method, path = scope["method"], scope["path"]
    head = method == "HEAD"
    if path.startswith("/api/"):
        tier = _header(scope, b"x-l402-tier") or "free"
        body = json.dumps({"path": path, "tier": tier}).encode()
        await _send(send, 200, "application/json", body, seen, head)
        return
    if method not in ("GET", "HEAD"):
        await _send(send, 405, "text/plain", b"method not allowed\n", seen, head)
        return
    if path == "/":
        await _send(send, 200, "text/html; charset=utf-8", _index(), seen, head)
    elif path == "/feed.xml":
        base = f"{scope.get('scheme', 'http')}://{_header(scope, b'host') or 'localhost'}"
        await _send(send, 200, "application/rss+xml", _feed(base), seen, head)
    elif match := re.fullmatch(r"/(episodes|adfree|bonus)/([^/]+)", path):
        kind = {"episodes": "AD-SUPPORTED", "adfree": "AD-FREE", "bonus": "BONUS"}[match[1]]
        episode = match[2].removesuffix(".mp3")
        if episode not in EPISODES and kind != "BONUS":
            await _send(send, 404, "text/plain", b"no such episode\n", seen, head)
            return
        await _episode(scope, send, episode_bytes(kind, episode), seen, head)
    elif (match := re.fullmatch(r"/stream/(\d{1,4})", path)) and int(match[1]) <= MAX_STREAM_CHUNKS:
        await _stream(send, int(match[1]), seen, head)
    else:
        await _send(send, 404, "text/plain", b"not found\n", seen, head)


def _index() -> bytes:
    items = "".join(f'<li><a href="/episodes/{e}.mp3">{escape(e)}</a></li>' for e in EPISODES)
    title = "<title>Sample podcast</title><h1>Sample podcast</h1>"
    return f"<!doctype html>{title}<ul>{items}</ul>".encode()


# A Podcasting 2.0 value block (listeners stream sats to these recipients): a private feed keeps
# it as it is. The node key is a made-up one.
VALUE_BLOCK = (
    '<podcast:value type="lightning" method="keysend" suggested="0.00000005000">'
    '<podcast:valueRecipient name="Sample host" type="node" split="100" address="'
    + "02"
    + "ab" * 32
    + '"/></podcast:value>'
)


def _feed(base: str) -> bytes:
    """The RSS feed, its URLs built from the Host the request came with (through a door: the
    door's address): an enclosure per episode, its self link and a podcast:value block."""
    items = "".join(
        f'<item><title>{e}</title><guid isPermaLink="false">sample-{e}</guid>'
        f'<enclosure url="{base}/episodes/{e}.mp3" '
        f'type="audio/mpeg" length="{len(episode_bytes("AD-SUPPORTED", e))}"/></item>'
        for e in EPISODES
    )
    channel = (
        "<channel><title>Sample podcast</title>"
        f'<atom:link rel="self" type="application/rss+xml" href="{base}/feed.xml"/>'
        f"{VALUE_BLOCK}{items}</channel>"
    )
    namespaces = (
        'xmlns:atom="http://www.w3.org/2005/Atom" '
        'xmlns:podcast="https://podcastindex.org/namespace/1.0"'
    )
    return f'<?xml version="1.0"?><rss version="2.0" {namespaces}>{channel}</rss>'.encode()


async def _episode(
    scope: Scope, send: Send, body: bytes, seen: list[tuple[bytes, bytes]], head: bool
) -> None:
    seen = [*seen, (b"accept-ranges", b"bytes")]
    wanted = byte_range(_header(scope, b"range"), len(body))
    if wanted == "unsatisfiable":
        seen.append((b"content-range", f"bytes */{len(body)}".encode()))
        await _send(send, 416, "text/plain", b"range not satisfiable\n", seen, head)
    elif wanted is None:
        await _send(send, 200, "audio/mpeg", body, seen, head)
    else:
        first, last = wanted
        seen.append((b"content-range", f"bytes {first}-{last}/{len(body)}".encode()))
        await _send(send, 206, "audio/mpeg", body[first : last + 1], seen, head)


async def _stream(send: Send, count: int, seen: list[tuple[bytes, bytes]], head: bool) -> None:
    # No Content-Length: the server sends it chunked, one chunk per body message.
    headers = [(b"content-type", b"text/plain"), *seen]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for index in range(0 if head else count):
        await send({"type": "http.response.body", "body": stream_chunk(index), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send(
    send: Send,
    status: int,
    content_type: str,
    body: bytes,
    seen: list[tuple[bytes, bytes]],
    head: bool,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *seen,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


app = make_app()


def paywalled() -> ASGIApp:
    """The sample origin behind the ASGI door, configured from the environment (for
    `uvicorn --factory`): L402PROXY_RULES (required), L402PROXY_BACKEND (default dev),
    L402PROXY_STORE and L402PROXY_DEV_LEDGER (default as on the proxy)."""
    # Imported here: the bare origin must run without the door.
    from l402proxy.asgi import L402Middleware

    rules = os.environ.get("L402PROXY_RULES")
    if not rules:
        raise SystemExit("l402proxy.origin_asgi:paywalled needs L402PROXY_RULES (a rules file)")
    return L402Middleware(
        app,
        rules=rules,
        backend=os.environ.get("L402PROXY_BACKEND") or "dev",
        store=os.environ.get("L402PROXY_STORE") or None,
        dev_ledger=os.environ.get("L402PROXY_DEV_LEDGER") or None,
    )
