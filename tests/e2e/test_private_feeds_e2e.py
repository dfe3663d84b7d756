"""Private podcast feeds through real processes: the mitmproxy door (mitmdump with
keep_host_header in front of the sample origin, l402proxy.origin_asgi, under uvicorn) and the
ASGI door (the same origin wrapped in L402Middleware under uvicorn), on a SQLite store the real
`l402proxy feeds` CLI manages; the nginx door and a mitmdump that would hide the players' Host
refuse the rules at start.

A listener buys a token on the pay page (its unlock gives the feed URL) or holds one and asks
POST /.l402/feed; reads the private feed with feedparser (enclosures under the capability, the
block tags, podcast:value kept); fetches an enclosure as a player does (HEAD, then Range: 206 of
the ad-free bytes). Revoking the feed URL with the CLI makes it 404 within a bounded wait;
rotating makes the old URL 404 and the printed new one work; a token that expires takes its
feed with it. A real Chromium (mitmproxy door) pays on the pay page with WebLN and is shown the
feed URL to copy.
"""

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import feedparser
import httpx
import pytest

from l402proxy.launch import started
from l402proxy.origin_asgi import EPISODES, episode_bytes

from . import procs
from .doors import Door, DoorKind, start_door, uvicorn
from .nginx import serve_auth

pytestmark = pytest.mark.e2e

RULES = r"""
services:
  - name: podcast
    description: "Ad-free episode"
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid: {rewrite_path: ["^/episodes/(.*)$", "/adfree/\\1"]}
    valid_for: 30d
    feed: /feed.xml
  - name: adfree
    match: {path: "/adfree/*"}
    mode: deny
"""
# The engine believes a looked-up capability for 2 s (engine.feeds.CACHE_SECONDS): a revocation
# shows well within this.
REVOCATION_WAIT = 15.0
EXPIRY_SECONDS = 4
EXPIRY_WAIT = 30.0
FEED_URL = re.compile(r"http://127\.0\.0\.1:\d+/\.l402/feed/([A-Za-z0-9_-]{22})/feed\.xml")


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("feeds-rules") / "feeds.yaml"
    path.write_text(RULES)
    return path


@contextlib.contextmanager
def feed_door(kind: DoorKind, work: Path, rules: Path) -> Iterator[Door]:
    """The door as tests/e2e/doors.py starts it; mitmdump with keep_host_header, which a rule
    with feed: needs in reverse mode (the feed URLs are made from the players' Host)."""
    home = work / "home"
    if kind != "mitmproxy":
        with start_door(kind, work, home, rules) as door:
            yield door
        return
    home.mkdir(parents=True)
    store = home / "server.sqlite"
    origin = uvicorn(work, home, "l402proxy.origin_asgi:app")
    with started(origin):
        proxy = procs.server_proxy(
            work, home, work / "conf", origin.url, rules, "keep_host_header=true"
        )
        with started(proxy):
            yield Door(kind, proxy.url, home, store, origin.url, work)


@pytest.fixture(scope="module", params=["mitmproxy", "asgi"])
def door(
    request: pytest.FixtureRequest, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    kind: DoorKind = request.param
    with feed_door(kind, tmp_path_factory.mktemp(f"feeds-{kind}"), rules) as started_door:
        yield started_door


def client(door: Door) -> httpx.Client:
    return httpx.Client(base_url=door.base_url, trust_env=False, timeout=procs.FETCH_TIMEOUT)


def buy_on_the_pay_page(door: Door, episode: str = "ep1") -> dict[str, Any]:
    """What the paywall page's script does: the page's invoice paid (here by the dev ledger),
    then POST /.l402/unlock with the preimage; its JSON answer."""
    with client(door) as http:
        page = http.get(
            f"/.l402/pay?path=/episodes/{episode}.mp3&return=/",
            headers={"Accept": "application/json"},
        )
        assert page.status_code == 402, page.text[:500]
        offer = page.json()
        preimage = procs.dev_pay(door.home, offer["invoice"])
        unlocked = http.post(
            "/.l402/unlock", json={"macaroon": offer["macaroon"], "preimage": preimage.hex()}
        )
    assert unlocked.status_code == 200, unlocked.text
    body = unlocked.json()
    assert body["unlocked"] is True
    return body


def mint_for(door: Door, authorization: str) -> httpx.Response:
    with client(door) as http:
        return http.post("/.l402/feed", headers={"Authorization": authorization})


def get(url: str, method: str = "GET", **headers: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        return http.request(method, url, headers=headers)


def feeds_cli(door: Door, *args: str) -> str:
    result = procs.cli(door.home, "feeds", *args, "--store", str(door.store))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def gone(url: str, timeout: float) -> bool:
    """Whether the URL answers 404 within `timeout` seconds (asked every 0.2 s)."""
    return procs.wait_until(lambda: get(url).status_code == 404, timeout, interval=0.2)


def test_a_listener_buys_subscribes_and_plays_the_ad_free_episodes(door: Door) -> None:
    body = buy_on_the_pay_page(door)
    url = body["feed_url"]
    match = FEED_URL.fullmatch(url)
    assert match is not None, url
    assert url.startswith(door.base_url + "/.l402/feed/")
    base = url.removesuffix("/feed.xml")
    # The operator sees it listed, without the credential it stands for.
    listed = feeds_cli(door, "list", "--json")
    assert match.group(1) in listed and "credential" not in listed

    response = get(url, Accept_Encoding="gzip")
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Cache-Control"].startswith("private")
    assert int(response.headers["Content-Length"]) == len(response.content)
    parsed = feedparser.parse(response.content)
    assert not parsed.bozo, parsed.bozo_exception
    enclosures = [entry.enclosures[0].href for entry in parsed.entries]
    assert enclosures == [f"{base}/episodes/{name}.mp3" for name in EPISODES]
    assert parsed.feed.podcast_block == "yes" and parsed.feed.itunes_block == 1  # feedparser: 1
    assert [link.href for link in parsed.feed.links if link.rel == "self"] == [url]
    assert "podcast_value" in parsed.feed  # the value block is kept for players that stream sats
    assert b'<podcast:valueRecipient name="Sample host"' in response.content

    # A player: HEAD for the size, then ranges. The ad-free bytes, from the ad-free path, and
    # the origin never saw a credential.
    episode = enclosures[1]
    ad_free = episode_bytes("AD-FREE", EPISODES[1])
    head = get(episode, "HEAD")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(ad_free)
    assert head.headers["X-Origin-Path"] == f"/adfree/{EPISODES[1]}.mp3"
    part = get(episode, Range="bytes=100-299")
    assert part.status_code == 206
    assert part.content == ad_free[100:300]
    assert part.headers["Content-Range"] == f"bytes 100-299/{len(ad_free)}"
    assert part.headers["X-Origin-Authorization"] == "absent"
    assert part.headers["X-Origin-Path"] == f"/adfree/{EPISODES[1]}.mp3"
    whole = get(episode)
    assert whole.status_code == 200 and whole.content == ad_free
    assert "private" in whole.headers["Cache-Control"]
    # The capability opens nothing but the feed and what the token paid for.
    for other in ("/adfree/ep1.mp3", "/", "/.l402/pay?path=/episodes/ep1.mp3", "/bonus/x.mp3"):
        refused = get(base + other)
        assert refused.status_code == 404, (other, refused.status_code)
        assert refused.text == "Not found.\n" and "X-Origin-Path" not in refused.headers


def test_revoking_with_the_cli_ends_the_feed_and_unlocking_gives_a_new_one(door: Door) -> None:
    first = buy_on_the_pay_page(door)["feed_url"]
    assert get(first).status_code == 200
    capability = FEED_URL.fullmatch(first).group(1)  # type: ignore[union-attr]
    out = feeds_cli(door, "revoke", capability)
    assert capability in out
    assert gone(first, REVOCATION_WAIT), "the revoked feed URL still works"
    assert gone(first.replace("/feed.xml", "/episodes/ep1.mp3"), REVOCATION_WAIT)


def test_rotating_replaces_the_url_the_old_one_stops(door: Door) -> None:
    held = procs.minted_credential(door.store, "podcast", int(time.time()) + 3600)
    minted = mint_for(door, held)
    assert minted.status_code == 200, minted.text
    old = minted.json()["feed_url"]
    assert mint_for(door, held).json()["feed_url"] == old  # the same token, the same URL
    assert get(old).status_code == 200
    capability = FEED_URL.fullmatch(old).group(1)  # type: ignore[union-attr]
    out = feeds_cli(door, "rotate", capability, "--base-url", door.base_url)
    new = [line for line in out.split() if line.startswith(door.base_url + "/.l402/feed/")]
    assert len(new) == 1 and new[0] != old, out
    assert gone(old, REVOCATION_WAIT), "the rotated-out feed URL still works"
    fresh = get(new[0])
    assert fresh.status_code == 200 and b"/.l402/feed/" in fresh.content
    assert get(new[0].replace("/feed.xml", "/episodes/ep3.mp3")).content == episode_bytes(
        "AD-FREE", "ep3"
    )


def test_a_token_that_expires_takes_its_feed_with_it(door: Door) -> None:
    expires = int(time.time()) + EXPIRY_SECONDS
    minted = mint_for(door, procs.minted_credential(door.store, "podcast", expires))
    assert minted.status_code == 200, minted.text
    url = minted.json()["feed_url"]
    assert minted.json()["expires_at"] == expires
    episode = url.replace("/feed.xml", "/episodes/ep2.mp3")
    assert get(episode).status_code == 200
    assert gone(episode, EXPIRY_WAIT) and get(url).status_code == 404


def test_a_token_revoked_with_the_cli_ends_its_feed(door: Door) -> None:
    held = procs.minted_credential(door.store, "podcast", int(time.time()) + 3600)
    url = mint_for(door, held).json()["feed_url"]
    assert get(url).status_code == 200
    from l402proxy.l402.token import inspect

    token_id = inspect(held.split()[1].rpartition(":")[0]).identifier.token_id.hex()
    result = procs.cli(door.home, "tokens", "revoke", token_id, "--store", str(door.store))
    assert result.returncode == 0, result.stdout + result.stderr
    assert gone(url.replace("/feed.xml", "/episodes/ep1.mp3"), REVOCATION_WAIT)


# -- a real browser on the pay page --------------------------------------------------------------

WEBLN = """
window.webln = {
  enable: async () => {},
  sendPayment: async (paymentRequest) => ({preimage: await window.l402DevPay(paymentRequest)}),
};
"""
PAGE_TIMEOUT_MS = 20_000


async def test_the_pay_page_shows_the_feed_url_to_copy_after_paying(
    rules: Path, tmp_path: Path
) -> None:
    from l402proxy.lightning.dev import DevLedger

    from .browser import browser

    with feed_door("mitmproxy", tmp_path / "browser", rules) as door:
        async with browser() as chromium:
            context = await chromium.new_context()  # type: ignore[attr-defined]
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            await context.add_init_script(WEBLN)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            ledger = DevLedger(door.home / "devledger.sqlite")

            async def dev_pay(bolt11: str) -> str:
                return (await ledger.pay("listener", bolt11, 0)).preimage.hex()

            try:
                await page.expose_function("l402DevPay", dev_pay)
                response = await page.goto(
                    f"{door.base_url}/.l402/pay?path=/episodes/ep1.mp3&return=/&subscribe=1"
                )
                assert response is not None and response.status == 402
                await page.click("#webln-pay")
                await page.wait_for_selector("#subscribe", state="visible")
                url = await page.input_value("#feed-url")
                assert FEED_URL.fullmatch(url), url
                assert await page.get_attribute("#feed-url", "readonly") is not None
                assert await page.is_visible("#copy-feed")
                assert await page.get_attribute("#continue", "href") == "/"
                assert not await page.is_visible("svg.qr-code")
                # A "Subscribe ad-free" link later (the cookie it set): the same feed, not sold
                # again.
                again = await page.goto(
                    f"{door.base_url}/.l402/pay?path=/episodes/ep2.mp3&return=/&subscribe=1"
                )
                assert again is not None and again.status == 200
                assert await page.input_value("#feed-url") == url
                await page.click("#copy-feed")
                assert errors == []
            finally:
                await ledger.close()
                await context.close()
        assert urlsplit(url).netloc == urlsplit(door.base_url).netloc
        feed = get(url)
        assert feed.status_code == 200 and b"<podcast:block>yes</podcast:block>" in feed.content


# -- where feeds cannot be served: off, said in one line --------------------------------------


def test_the_nginx_door_serves_a_feed_selling_rule_with_feeds_off(
    rules: Path, tmp_path: Path
) -> None:
    """nginx's auth_request sees no answer body, so it cannot rewrite a feed: the rules still
    load (one rules file for every door) and one warning says feeds are off (the engine then
    hands out and serves no feed URL: tests/unit/test_feeds_engine.py)."""
    home = tmp_path / "home"
    home.mkdir()
    auth = serve_auth(tmp_path, home, rules, "--store", str(home / "server.sqlite"))
    auth.start()
    try:
        with httpx.Client(timeout=procs.FETCH_TIMEOUT) as http:
            # Not one of nginx's calls, but an answer: the service is up and serving.
            assert http.get(f"http://127.0.0.1:{auth.port}/").status_code == 404
    finally:
        auth.stop()
    warnings = [line for line in auth.log().splitlines() if "sells a private feed" in line]
    assert len(warnings) == 1 and "private feeds are off here" in warnings[0], auth.log()


def test_mitmdump_hands_out_no_feed_when_it_hides_the_players_host(
    rules: Path, tmp_path: Path
) -> None:
    """Reverse mode without keep_host_header: mitmproxy puts the origin's name into Host, so a
    feed URL could not name the proxy. It serves on, says so in one warning, and hands out no
    feed URL; the paywall itself works as ever."""
    with start_door("mitmproxy", tmp_path, tmp_path / "home", rules) as door:
        body = buy_on_the_pay_page(door)
        held = procs.minted_credential(door.store, "podcast", int(time.time()) + 3600)
        minted = mint_for(door, held)
        with client(door) as http:
            paid = http.get("/episodes/ep1.mp3", headers={"Authorization": held})
    assert "feed_url" not in body
    assert minted.status_code == 404 and minted.json()["error"] == "no_feed"
    assert paid.status_code == 200 and paid.content == episode_bytes("AD-FREE", "ep1")
    log = next(tmp_path.glob("server-proxy-*.log")).read_text()
    warnings = [line for line in log.splitlines() if "sells a private feed" in line]
    assert len(warnings) == 1, log
    assert f"{rules}: service 'podcast' (line 3)" in warnings[0]
    assert "add --set keep_host_header=true" in warnings[0]
