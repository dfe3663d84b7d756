"""Real-browser test 1: Chromium behind the paying client proxy, in front of the demo's paywall
proxy and podcast origin (real audio), gets the ad-free episode and pays for it exactly once;
Chromium without the client proxy gets the ad-supported episode and pays nothing, and after
following the page's "Go ad-free" link and paying there, gets the ad-free one.

The stack is the demo's own (l402proxy.demo.demo_processes), with a temporary home.
"""

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy import podcast
from l402proxy.demo import Demo, Ports, demo_processes
from l402proxy.l402.headers import parse_challenges
from l402proxy.launch import env_with_home, free_port, started
from l402proxy.lightning.dev import DEFAULT_CLIENT_WALLET, DevLedger

from . import procs
from .browser import browser, require_chromium

pytestmark = pytest.mark.e2e

EPISODE = "ep1"
EPISODE_PRICE_MSAT = 21_000
PAGE_TIMEOUT_MS = 30_000
MEDIA_TIMEOUT_MS = 20_000
UNLOCK_TIMEOUT_MS = 20_000

# What the page's player does: fetch the <audio> element's src, from the page, through whatever
# proxy the browser uses. The digest is taken in the page so no bytes travel through Playwright.
FETCH_SRC = """
async (src) => {
  const response = await fetch(src);
  const body = await response.arrayBuffer();
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", body));
  return {
    status: response.status,
    paid: response.headers.get("X-L402-Paid"),
    type: response.headers.get("Content-Type"),
    length: body.byteLength,
    sha256: Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join(""),
  };
}
"""

# A listener pressing play: Chromium's media stack loads the src itself (with its Range request)
# and decodes it; the duration says which copy it got.
LOAD_AUDIO = """
async (timeoutMs) => {
  const audio = document.querySelector("audio");
  audio.preload = "auto";
  return await new Promise((resolve) => {
    const timer = setTimeout(() => resolve({error: "no metadata in time"}), timeoutMs);
    audio.addEventListener("loadedmetadata", () => {
      clearTimeout(timer);
      resolve({duration: audio.duration});
    }, {once: true});
    audio.addEventListener("error", () => {
      clearTimeout(timer);
      resolve({error: "media error " + (audio.error ? audio.error.code : "?")});
    }, {once: true});
    audio.load();
  });
}
"""


@dataclass(frozen=True)
class Seen:
    """What one Chromium saw: the index page, a fetch of the first episode, its player."""

    index_status: int
    src: str
    fetched: dict[str, Any]
    media: dict[str, Any]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    require_chromium()
    work = tmp_path_factory.mktemp("browser-client")
    home = work / "home"
    home.mkdir()
    # Files a year old, like a real podcast's: without the origin's no-cache, a browser would
    # then reuse a cached ad version for weeks (heuristic freshness from Last-Modified).
    year_ago = time.time() - 365 * 86400
    for path in podcast.ensure_media(home / "demo-media").values():
        os.utime(path, (year_ago, year_ago))
    stack = demo_processes(
        home,
        Ports(free_port(), free_port(), free_port()),
        env=env_with_home(home),
        confdir=work / "mitmproxy",
    )
    with started(*stack.processes):
        yield stack


def settled(home: Path) -> set[str]:
    return {i["payment_hash"] for i in procs.ledger_invoices(home) if i["settled"]}


def sha256_of_origin(demo: Demo, path: str) -> str:
    """The origin's own file, fetched directly (not through any proxy)."""
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        response = http.get(demo.origin.url + path)
    assert response.status_code == 200, response.text
    return hashlib.sha256(response.content).hexdigest()


async def visit(index_url: str, proxy: str | None) -> Seen:
    async with browser(proxy=proxy) as chromium:
        page = await chromium.new_page()  # type: ignore[attr-defined]
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        response = await page.goto(index_url)
        assert response is not None
        src = await page.get_attribute("audio", "src")
        assert src, "the index page has no <audio src>"
        fetched = await page.evaluate(FETCH_SRC, src)
        media = await page.evaluate(LOAD_AUDIO, MEDIA_TIMEOUT_MS)
        return Seen(response.status, src, fetched, media)


def logs(demo: Demo) -> str:
    return "".join(f"\n--- {p.name} log {p.log_path}:\n{p.log()[-3000:]}" for p in demo.processes)


def test_chromium_through_the_client_proxy_gets_the_ad_free_episode_paying_once(
    demo: Demo,
) -> None:
    before = settled(demo.home)
    seen = asyncio.run(visit(demo.proxy.url + "/", demo.client.url))

    assert seen.index_status == 200
    assert seen.src == f"/episodes/{EPISODE}.wav"
    assert seen.fetched["status"] == 200, logs(demo)
    assert seen.fetched["type"] == podcast.AUDIO_TYPE
    assert seen.fetched["sha256"] == sha256_of_origin(demo, f"/adfree/{EPISODE}.wav"), logs(demo)
    assert seen.fetched["sha256"] != sha256_of_origin(demo, f"/episodes/{EPISODE}.wav")
    assert seen.fetched["paid"] is not None and seen.fetched["paid"].startswith("21 sat"), seen
    # Chromium's own player, loading the same src after the fetch, decodes the ad-free copy.
    ad_free = podcast.duration(podcast.media_path(demo.media, podcast.AD_FREE, EPISODE))
    assert "error" not in seen.media, seen.media
    assert seen.media["duration"] == pytest.approx(ad_free, abs=0.05)

    new = [
        i
        for i in procs.ledger_invoices(demo.home)
        if i["settled"] and i["payment_hash"] not in before
    ]
    assert len(new) == 1, (new, logs(demo))
    assert new[0]["amount_msat"] == EPISODE_PRICE_MSAT


def test_chromium_without_the_client_proxy_gets_the_ad_supported_episode_for_free(
    demo: Demo,
) -> None:
    before = settled(demo.home)
    seen = asyncio.run(visit(demo.proxy.url + "/", None))

    assert seen.index_status == 200
    assert seen.src == f"/episodes/{EPISODE}.wav"
    assert seen.fetched["status"] == 200, logs(demo)
    assert seen.fetched["sha256"] == sha256_of_origin(demo, f"/episodes/{EPISODE}.wav")
    assert seen.fetched["paid"] is None
    with_ad = podcast.duration(podcast.media_path(demo.media, podcast.AD_SUPPORTED, EPISODE))
    assert "error" not in seen.media, seen.media
    assert seen.media["duration"] == pytest.approx(with_ad, abs=0.05)
    assert settled(demo.home) == before


@dataclass(frozen=True)
class Upgraded:
    before: dict[str, Any]  # the player, before paying
    pay_page_url: str
    pay_page_status: int
    after_url: str
    fetched: dict[str, Any]  # after paying
    media: dict[str, Any]
    again_url: str  # the same link followed once more, after paying


async def upgrade_from_the_page(demo: Demo) -> Upgraded:
    """A listener with no client proxy plays the episode, follows "Go ad-free for 21 sats",
    pays the invoice from a wallet of their own (here the dev ledger), and plays it again."""
    index_url = demo.proxy.url + "/"
    async with browser(proxy=None) as chromium:
        page = await chromium.new_page()  # type: ignore[attr-defined]
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        await page.goto(index_url)
        # Played once with the ad, so the browser's cache holds the ad version.
        before = await page.evaluate(LOAD_AUDIO, MEDIA_TIMEOUT_MS)
        async with page.expect_navigation() as navigation:
            await page.click("text=Go ad-free for 21 sats")
        pay_page = await navigation.value
        assert pay_page is not None
        challenges = parse_challenges(await pay_page.header_values("www-authenticate"))
        assert challenges, "the paywall page came without a challenge"
        ledger = DevLedger(demo.home / "devledger.sqlite")
        try:
            await ledger.pay(DEFAULT_CLIENT_WALLET, challenges[0].invoice, 0)
        finally:
            await ledger.close()
        # The page notices the payment by itself and goes back to the index.
        await page.wait_for_url(index_url, timeout=UNLOCK_TIMEOUT_MS)
        src = await page.get_attribute("audio", "src")
        media = await page.evaluate(LOAD_AUDIO, MEDIA_TIMEOUT_MS)
        fetched = await page.evaluate(FETCH_SRC, src)
        after_url = page.url
        # Paid already: the link leads straight back instead of selling it again.
        async with page.expect_navigation(url=index_url):
            await page.click("text=Go ad-free for 21 sats")
        return Upgraded(before, pay_page.url, pay_page.status, after_url, fetched, media, page.url)


def test_chromium_without_the_client_proxy_goes_ad_free_from_the_page_link(demo: Demo) -> None:
    before = settled(demo.home)
    seen = asyncio.run(upgrade_from_the_page(demo))

    with_ad = podcast.duration(podcast.media_path(demo.media, podcast.AD_SUPPORTED, EPISODE))
    ad_free = podcast.duration(podcast.media_path(demo.media, podcast.AD_FREE, EPISODE))
    assert seen.before.get("duration") == pytest.approx(with_ad, abs=0.05), seen.before
    assert seen.pay_page_url == (
        f"{demo.proxy.url}/.l402/pay?path=/episodes/{EPISODE}.wav&return=/"
    )
    assert seen.pay_page_status == 402
    assert seen.after_url == demo.proxy.url + "/"
    # Not the cached ad version: the origin says no-cache, and the cookie unlocks the same URL.
    assert "error" not in seen.media, seen.media
    assert seen.media["duration"] == pytest.approx(ad_free, abs=0.05), logs(demo)
    assert seen.fetched["sha256"] == sha256_of_origin(demo, f"/adfree/{EPISODE}.wav")
    assert seen.fetched["paid"] is None  # paid by the listener, not by a client proxy
    assert seen.again_url == demo.proxy.url + "/"
    new = settled(demo.home) - before
    assert len(new) == 1, logs(demo)
