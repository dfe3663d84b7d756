"""What must never leave a private podcast feed: its capability (to the origin in a Referer, to
the app below an ASGI root_path, to mitmproxy's flow metadata), a shared cache's copy (HEAD and
304 answers private too), and the listener's port (HTTP/2 has no Host field). Each test failed
on the feeds as first built (found by a red-team review).

Reuses test_feeds_engine's Site (an engine with a real SQLite store) and the door test helpers.
"""

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from l402proxy.doors import asgi as asgi_door
from l402proxy.engine import Forward, feeds
from tests.unit.test_asgi_door import Origin, Reply, call
from tests.unit.test_feeds_engine import (
    FEED_XML,
    HOST,
    RULES,
    Clock,
    FakeFeeds,
    Site,
    open_site,
)
from tests.unit.test_server_addon import flow_for, server_on


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    opened = await open_site(tmp_path)
    try:
        yield opened
    finally:
        await opened.engine.close()


def header_values(outcome: Forward) -> list[str]:
    return [value.decode("latin-1") for _, value in outcome.headers]


# -- the capability reaches the origin in a Referer ---------------------------------------------


async def test_a_referer_holding_a_capability_never_reaches_the_origin(site: Site) -> None:
    """A browser shows the private feed (an xml-stylesheet page, a web player with <audio>):
    its same-origin requests carry `Referer: <the private feed URL>` (browsers' default policy,
    strict-origin-when-cross-origin, sends the full URL to the same origin). Through the
    capability (the episode) and beside it (the stylesheet, the cover), the engine forwards the
    Referer as it came, so the origin's access log (the combined format logs Referer) gets the
    capability."""
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")
    referer = f"http://{HOST}/.l402/feed/{cap}/feed.xml"
    for target in (
        f"/.l402/feed/{cap}/episodes/ep1.mp3",  # the enclosure through the capability
        f"/.l402/feed/{cap}/feed.xml",  # the feed, refreshed from a page that shows it
        "/feed.xsl",  # the feed's stylesheet (unpriced), fetched by the browser
        "/episodes/ep1.mp3",  # a priced path, no credential: the free variant (upgrade mode)
    ):
        outcome = await site.get(target, Referer=referer)
        assert isinstance(outcome, Forward), (target, outcome)
        leaked = [value for value in header_values(outcome) if cap in value]
        assert leaked == [], f"{target}: the capability is forwarded to the origin in {leaked}"


# -- the port of the listener's host is lost over HTTP/2 ----------------------------------------


async def test_the_feed_url_keeps_the_port_over_http2(tmp_path: Path) -> None:
    """mitmproxy gives an HTTP/2 request no Host field (its :authority is request.authority),
    so authority_of falls back to request.host, which has no port: a listener paying at
    https://podcast.example:8443 over h2 is handed https://podcast.example/.l402/feed/<cap>/...,
    which sends the capability to whatever serves port 443 there, and the feed's enclosures at
    :8443 are not taken for this host's."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    async with server_on(tmp_path, rules) as addon:
        fake = FakeFeeds()
        assert addon.engine.store is not None
        addon.engine.store.feed_for = fake.feed_for  # type: ignore[method-assign]
        addon.engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(addon.engine, fake, tmp_path, Clock()).token("bonus")

        def h2_flow(path: str, method: str) -> Any:
            flow = flow_for(path, Authorization=token.authorization)
            flow.client_conn.timestamp_tls_setup = time.time()  # over TLS
            flow.request.method = method
            flow.request.http_version = "HTTP/2.0"
            flow.request.scheme = "https"
            flow.request.host, flow.request.port = "podcast.example", 8443
            flow.request.authority = "podcast.example:8443"
            assert "host" not in flow.request.headers  # as mitmproxy reads an h2 request
            return flow

        flow = h2_flow(feeds.MINT_PATH, "POST")
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 200, flow.response
        url = json.loads(flow.response.content)["feed_url"]
        assert url.startswith("https://podcast.example:8443/.l402/feed/"), url


# -- the ASGI door forwards a capability's path to the app under root_path ----------------------


async def test_the_asgi_door_never_forwards_a_capability_below_root_path(
    tmp_path: Path,
) -> None:
    """uvicorn --root-path /app (uvicorn >= 0.26, as installed) gives the app path and raw_path
    with the root_path in front: a request for /.l402/feed/<cap>/feed.xml arrives as
    path=/app/.l402/feed/<cap>/feed.xml. The door reads the target /app/.l402/feed/..., no
    feed target, no endpoint, covered by no rule, and forwards it to the app, capability and
    all; the engine's other reading (below root_path) is the capability URL itself. Whatever
    the door makes of it (serve it, 404), the app must never get the capability."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    origin = Origin(Reply(200, ((b"content-type", b"application/rss+xml"),), (FEED_XML,)))
    mw = asgi_door.L402Middleware(
        origin,
        rules=str(rules),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    try:
        assert await mw.open() is None
        fake = FakeFeeds()
        assert mw.engine.store is not None
        mw.engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(mw.engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)
        for inner in ("/feed.xml", "/episodes/ep1.mp3"):
            await call(mw, f"/app/.l402/feed/{row.capability}{inner}", root_path="/app")
        leaked = [
            scope["path"]
            for scope in origin.scopes
            if row.capability in scope["path"]
            or row.capability.encode() in scope.get("raw_path", b"")
        ]
        assert leaked == [], f"the app got the capability in {leaked}"
    finally:
        await mw.close()


# -- an answer to the feed that is not rewritten keeps the origin's caching --------------------
# (fixed in feeds.private_head; the doors must call it: /tmp/notes/feeds-review-*.diff)

PUBLIC_HEAD = (
    (b"content-type", b"application/rss+xml"),
    (b"etag", b'"v1"'),
    (b"cache-control", b"public, max-age=600"),
    (b"cdn-cache-control", b"max-age=600"),
    (b"link", b'<https://pubsubhubbub.appspot.com/>; rel="hub"'),
)


async def test_a_head_or_304_of_the_private_feed_is_private_at_the_asgi_door(
    tmp_path: Path,
) -> None:
    """A player's HEAD, or its conditional GET answered 304, passes unrewritten (no body to
    rewrite): the origin's `Cache-Control: public`, its CDN field and its hub Link go out with
    the capability's URL, so a CDN keeps (and a 304 refreshes) what it holds for that URL."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    origin = Origin(Reply(200, PUBLIC_HEAD, (FEED_XML,)))
    mw = asgi_door.L402Middleware(
        origin,
        rules=str(rules),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    try:
        assert await mw.open() is None
        fake = FakeFeeds()
        assert mw.engine.store is not None
        mw.engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(mw.engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)
        target = f"/.l402/feed/{row.capability}/feed.xml"
        for status, method in ((200, "HEAD"), (304, "GET"), (404, "GET")):
            origin.reply = Reply(status, PUBLIC_HEAD, (b"",))
            answer = await call(mw, target, method=method)
            assert answer.status == status
            assert answer.get("cache-control") == "private, max-age=600", (status, method)
            assert answer.get("cdn-cache-control") is None and answer.get("link") is None
            assert answer.get("referrer-policy") == "no-referrer"
    finally:
        await mw.close()


async def test_a_head_or_304_of_the_private_feed_is_private_at_the_mitmproxy_door(
    tmp_path: Path,
) -> None:
    from mitmproxy.test import tutils

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    async with server_on(tmp_path, rules) as addon:
        fake = FakeFeeds()
        assert addon.engine.store is not None
        addon.engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(addon.engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)
        for status, method in ((200, "HEAD"), (304, "GET"), (404, "GET")):
            flow = flow_for(f"/.l402/feed/{row.capability}/feed.xml", Host=HOST)
            flow.request.method = method
            await addon.request(flow)
            assert flow.response is None
            flow.response = tutils.tresp(status_code=status, content=b"")
            flow.response.headers.fields = PUBLIC_HEAD
            await addon.response(flow)
            headers = flow.response.headers
            assert headers.get("cache-control") == "private, max-age=600", (status, method)
            assert "cdn-cache-control" not in headers and "link" not in headers
            assert headers.get("referrer-policy") == "no-referrer"


# -- the mitmproxy door keeps the capability in flow.metadata ----------------------------------


async def test_the_mitmproxy_door_keeps_the_capability_out_of_flow_metadata(
    tmp_path: Path,
) -> None:
    """flow.metadata is saved with the flow (mitmdump -w, a flow file for a bug report) and
    read by every other addon: the feed note's private_base and self_url hold the capability.
    The addon keeps them itself, by flow id, until the response (or error)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    async with server_on(tmp_path, rules) as addon:
        fake = FakeFeeds()
        assert addon.engine.store is not None
        addon.engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(addon.engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)
        flow = flow_for(f"/.l402/feed/{row.capability}/feed.xml", Host=HOST)
        await addon.request(flow)
        assert flow.response is None and flow.request.path == "/feed.xml"
        assert row.capability not in repr(flow.get_state()["metadata"])
        from mitmproxy.test import tutils

        flow.response = tutils.tresp(status_code=200, content=FEED_XML)
        await addon.response(flow)
        assert flow.response.status_code == 200
        assert f"/.l402/feed/{row.capability}/episodes/".encode() in flow.response.content
        assert row.capability not in repr(flow.get_state()["metadata"])
