"""A small sample origin for the demo and the tests: a podcast with ad-supported and ad-free
episodes, and a tiny pay-per-call API. It tells, in response headers, what it was asked for,
so a test can see what the proxy forwarded (path, Authorization, headers added by the paywall).

    python -m l402proxy.origin --port 8080
"""

import argparse
import json
import logging
from collections.abc import Awaitable, Callable
from html import escape

from aiohttp import web

EPISODES = ("ep1", "ep2", "ep3")


def episode_bytes(kind: str, name: str) -> bytes:
    return f"{kind} episode {name}\n".encode()


def _seen(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    response.headers["X-Origin-Name"] = request.app["name"]
    response.headers["X-Origin-Path"] = request.path_qs
    response.headers["X-Origin-Authorization"] = request.headers.get("Authorization", "absent")
    response.headers["X-Origin-Tier"] = request.headers.get("X-L402-Tier", "absent")
    return response


async def index(request: web.Request) -> web.StreamResponse:
    items = "".join(f'<li><a href="/episodes/{e}.mp3">{escape(e)}</a></li>' for e in EPISODES)
    page = f"<!doctype html><title>Sample podcast</title><h1>Sample podcast</h1><ul>{items}</ul>"
    return _seen(request, web.Response(text=page, content_type="text/html"))


async def feed(request: web.Request) -> web.StreamResponse:
    base = f"{request.scheme}://{request.host}"
    items = "".join(
        f'<item><title>{e}</title><enclosure url="{base}/episodes/{e}.mp3" '
        f'type="audio/mpeg" length="{len(episode_bytes("AD-SUPPORTED", e))}"/></item>'
        for e in EPISODES
    )
    rss = (
        '<?xml version="1.0"?><rss version="2.0"><channel><title>Sample podcast</title>'
        f"{items}</channel></rss>"
    )
    return _seen(request, web.Response(text=rss, content_type="application/rss+xml"))


def _episode(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"].removesuffix(".mp3")
        if name not in EPISODES and kind != "BONUS":
            return _seen(request, web.Response(status=404, text="no such episode\n"))
        body = episode_bytes(kind, name)
        return _seen(request, web.Response(body=body, content_type="audio/mpeg"))

    return handler


async def api(request: web.Request) -> web.StreamResponse:
    payload = {"path": request.path, "tier": request.headers.get("X-L402-Tier", "free")}
    return _seen(request, web.Response(text=json.dumps(payload), content_type="application/json"))


def make_app(name: str = "origin") -> web.Application:
    app = web.Application()
    app["name"] = name
    app.router.add_get("/", index)
    app.router.add_get("/feed.xml", feed)
    app.router.add_get("/episodes/{name}", _episode("AD-SUPPORTED"))
    app.router.add_get("/adfree/{name}", _episode("AD-FREE"))
    app.router.add_get("/bonus/{name}", _episode("BONUS"))
    app.router.add_route("*", "/api/{tail:.*}", api)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="sample podcast + API origin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="origin", help="reported in X-Origin-Name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # A deep backlog: load tests open many connections at once.
    web.run_app(
        make_app(args.name),
        host=args.host,
        port=args.port,
        backlog=1024,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
