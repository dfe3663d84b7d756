"""A real browser at the paywall: Debian's chromium (headless, driven by Playwright) straight at
the server proxy, a real origin behind it, the dev ledger as the Lightning network.

2. the paywall page's QR code, read back from a screenshot by zbar, is exactly the invoice in the
   WWW-Authenticate header;
3. a WebLN wallet in the page pays with one click and the page opens the paid content, which a
   reload keeps open;
4. a phone wallet pays the QR code out of band (`l402proxy dev pay`) and the open page notices by
   itself and opens the content.
"""

import asyncio
import http.server
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from l402proxy.launch import env_with_home, started
from l402proxy.lightning.dev import DevLedger

from . import procs
from .browser import browser, decode_qr

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
EPISODE = "/bonus/ep1.mp3"
PAID_BODY = b"BONUS episode ep1\n"
# Every wait on the browser is bounded; the page polls every 2 s, so this is ample.
UNLOCK_WAIT_MS = 20_000
PAGE_TIMEOUT_MS = 20_000
CLI_TIMEOUT = 30.0

WEBLN = """
window.webln = {
  enable: async () => {},
  sendPayment: async (paymentRequest) => ({preimage: await window.l402DevPay(paymentRequest)}),
};
"""


@dataclass
class Stack:
    home: Path
    origin: procs.Process
    proxy: procs.Process

    def url(self, path: str) -> str:
        return self.proxy.url + path

    @property
    def ledger_path(self) -> Path:
        return self.home / "devledger.sqlite"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("browser")
    home = work / "home"
    home.mkdir()
    origin = procs.origin(work, home)
    proxy = procs.server_proxy(work, home, work / "conf", origin.url, PODCAST_RULES)
    with started(origin, proxy):
        yield Stack(home, origin, proxy)


@dataclass
class Tab:
    """One open page plus what went wrong in it (JavaScript errors fail the test)."""

    page: Any
    errors: list[str] = field(default_factory=list)


@pytest.fixture
async def open_tab() -> AsyncIterator[Callable[..., Any]]:
    """open_tab(init_script=None) -> a fresh Tab in its own browser context (own cookies)."""
    async with browser() as chromium:
        contexts: list[Any] = []

        async def opener(init_script: str | None = None) -> Tab:
            context = await chromium.new_context(viewport={"width": 1000, "height": 1300})  # type: ignore[attr-defined]
            contexts.append(context)
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            if init_script is not None:
                await context.add_init_script(init_script)
            page = await context.new_page()
            tab = Tab(page)
            page.on("pageerror", lambda error: tab.errors.append(str(error)))
            return tab

        try:
            yield opener
        finally:
            for context in contexts:
                await context.close()


async def invoice_in_header(response: Any) -> str:
    """The invoice of the first WWW-Authenticate line (what old clients read)."""
    lines = [
        h["value"]
        for h in await response.headers_array()
        if h["name"].lower() == "www-authenticate"
    ]
    assert len(lines) == 2, lines
    found = re.search(r'invoice="([^"]+)"', lines[0])
    assert found, lines[0]
    return found.group(1)


async def show_paywall(tab: Tab, stack: Stack, path: str = EPISODE) -> tuple[Any, str]:
    response = await tab.page.goto(stack.url(path))
    assert response is not None and response.status == 402
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    await tab.page.wait_for_selector("svg.qr-code")
    return response, await invoice_in_header(response)


async def screenshot(
    tab: Tab, directory: Path, name: str, record_property: Callable[[str, object], None]
) -> Path:
    path = directory / f"{name}.png"
    await tab.page.screenshot(path=str(path), full_page=True)
    print(f"paywall screenshot: {path}")
    record_property("screenshot", str(path))
    return path


async def settled_invoices(stack: Stack) -> set[str]:
    ledger = DevLedger(stack.ledger_path)
    try:
        return {i["payment_hash"] for i in await ledger.list_invoices() if i["settled"]}
    finally:
        await ledger.close()


async def assert_paid_content(tab: Tab, response: Any) -> None:
    """The navigation got the paid file, and the browser keeps getting it on its own.

    Chromium hands an audio navigation to its media player, so the navigation response's own
    body is never available to Playwright (response.body() waits forever): the bytes are
    checked with a fetch from the page instead, which carries the cookie like any request of
    this browser would.
    """
    assert response.status == 200
    headers = await response.all_headers()
    assert headers["x-origin-path"] == EPISODE
    assert headers["content-type"] == "audio/mpeg"
    assert int(headers["content-length"]) == len(PAID_BODY)
    status, origin_path, body = await asyncio.wait_for(
        tab.page.evaluate(
            """async (url) => {
                const response = await fetch(url, {cache: "no-store"});
                return [response.status, response.headers.get("x-origin-path"),
                        await response.text()];
            }""",
            response.url,
        ),
        PAGE_TIMEOUT_MS / 1000,
    )
    assert (status, origin_path, body) == (200, EPISODE, PAID_BODY.decode())


async def reload(tab: Tab) -> Any:
    # "commit": a media document may never fire "load" the way an HTML page does.
    response = await tab.page.reload(wait_until="commit")
    assert response is not None
    return response


async def test_2_the_qr_code_is_exactly_the_invoice_in_the_header(
    stack: Stack,
    open_tab: Callable[..., Any],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    tab = await open_tab()
    _, invoice = await show_paywall(tab, stack)
    text = await tab.page.inner_text("main")
    assert "Bonus episode" in text and "100 sats" in text and "7 days" in text
    assert await tab.page.get_attribute("a.qr", "href") == f"lightning:{invoice}"
    assert await tab.page.inner_text("#invoice") == invoice
    assert await tab.page.is_hidden("#webln-pay")  # no WebLN wallet in this browser
    assert "Waiting for payment" in await tab.page.inner_text("#status")

    shot = await screenshot(tab, tmp_path, "paywall", record_property)
    assert decode_qr(shot) == [invoice]
    assert tab.errors == []


async def test_3_webln_pays_with_one_click_and_the_page_opens_the_content(
    stack: Stack,
    open_tab: Callable[..., Any],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    ledger = DevLedger(stack.ledger_path)
    paid: list[str] = []

    async def dev_pay(bolt11: str) -> str:
        result = await ledger.pay("listener", bolt11, 0)
        paid.append(bolt11)
        return result.preimage.hex()

    try:
        tab = await open_tab(WEBLN)
        await tab.page.expose_function("l402DevPay", dev_pay)
        _, invoice = await show_paywall(tab, stack)
        await tab.page.wait_for_selector("#webln-pay", state="visible")
        await screenshot(tab, tmp_path, "paywall-webln", record_property)

        async with tab.page.expect_navigation(
            url=stack.url(EPISODE), wait_until="commit", timeout=UNLOCK_WAIT_MS
        ) as unlocked:
            await tab.page.click("#webln-pay")
        await assert_paid_content(tab, await unlocked.value)
        assert paid == [invoice]

        settled = await settled_invoices(stack)
        await assert_paid_content(tab, await reload(tab))
        assert await settled_invoices(stack) == settled  # nothing paid or issued anew
        assert paid == [invoice]
        assert tab.errors == []
    finally:
        await ledger.close()


async def test_4_a_qr_payment_out_of_band_opens_the_page_by_itself(
    stack: Stack,
    open_tab: Callable[..., Any],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    tab = await open_tab()
    _, invoice = await show_paywall(tab, stack)
    await screenshot(tab, tmp_path, "paywall-qr", record_property)

    async with tab.page.expect_navigation(
        url=stack.url(EPISODE), wait_until="commit", timeout=UNLOCK_WAIT_MS
    ) as unlocked:
        # The phone wallet: the CLI pays from the dev ledger while the page just sits there.
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "l402proxy", "dev", "pay", invoice,
            env=env_with_home(stack.home),
            cwd=procs.REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, err.decode()
    await assert_paid_content(tab, await unlocked.value)
    await assert_paid_content(tab, await reload(tab))
    assert tab.errors == []


# Every status line the page shows, reported to the test as it appears (the page navigates
# away once unlocked, so its own state cannot be read afterwards).
STATUS_LOG = """
new MutationObserver(() => {
  const line = document.getElementById("status");
  if (line && line.textContent) { window.l402Status(line.textContent); }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


async def test_5_webln_paid_but_the_site_missed_the_first_unlock_the_page_keeps_trying(
    stack: Stack, open_tab: Callable[..., Any]
) -> None:
    ledger = DevLedger(stack.ledger_path)
    statuses: list[str] = []
    aborted: list[str] = []

    async def dev_pay(bolt11: str) -> str:
        return (await ledger.pay("listener", bolt11, 0)).preimage.hex()

    async def lose_the_first_paid_unlock(route: Any) -> None:
        if '"preimage":null' not in (route.request.post_data or "") and not aborted:
            aborted.append(route.request.post_data)
            await route.abort()  # the network drops it after the wallet has paid
        else:
            await route.continue_()

    try:
        tab = await open_tab(WEBLN + STATUS_LOG)
        await tab.page.expose_function("l402DevPay", dev_pay)
        await tab.page.expose_function("l402Status", lambda text: statuses.append(text))
        await tab.page.route("**/.l402/unlock", lose_the_first_paid_unlock)
        await show_paywall(tab, stack, "/bonus/ep5.mp3")
        await tab.page.wait_for_selector("#webln-pay", state="visible")
        async with tab.page.expect_navigation(
            url=stack.url("/bonus/ep5.mp3"), wait_until="commit", timeout=UNLOCK_WAIT_MS
        ):
            await tab.page.click("#webln-pay")
        assert len(aborted) == 1
        assert not [s for s in statuses if "Not paid" in s], statuses
        assert tab.errors == []
    finally:
        await ledger.close()


async def test_6_an_expired_invoice_is_not_offered_and_a_new_one_is(
    stack: Stack, open_tab: Callable[..., Any]
) -> None:
    tab = await open_tab()
    await tab.page.clock.install()
    _, old_invoice = await show_paywall(tab, stack, "/bonus/ep6.mp3")
    assert await tab.page.is_hidden("#renew")
    await tab.page.clock.fast_forward("11:00")  # bonus invoices live 10 minutes
    await tab.page.wait_for_selector("#renew", state="visible")
    assert await tab.page.is_hidden("#copy") and await tab.page.is_hidden("#open-wallet")
    assert await tab.page.get_attribute("a.qr", "href") is None
    assert "expired" in await tab.page.inner_text("#status")
    async with tab.page.expect_navigation(wait_until="commit") as renewed:
        await tab.page.click("#renew")
    response = await renewed.value
    assert response.status == 402
    assert await invoice_in_header(response) != old_invoice
    assert tab.errors == []


class CachingOrigin(http.server.BaseHTTPRequestHandler):
    """An origin that lets browsers keep every answer for an hour, as many CDNs do."""

    def do_GET(self) -> None:
        body = f"{self.path.split('/')[1].upper()} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Cache-Control", "public, max-age=3600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


FETCH_TEXT = """async (url) => {
    const response = await fetch(url);
    return [response.status, await response.text()];
}"""


async def test_paying_takes_effect_although_the_origin_lets_browsers_cache(
    tmp_path: Path, open_tab: Callable[..., Any]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with procs.in_process_origin(CachingOrigin, "caching-origin") as origin_url:
        proxy = procs.server_proxy(tmp_path, home, tmp_path / "conf", origin_url, PODCAST_RULES)
        with started(proxy):
            tab = await open_tab()
            await tab.page.goto(proxy.url + "/feed.xml")
            episode = "/episodes/x.wav"
            before = await tab.page.evaluate(FETCH_TEXT, episode)
            assert before == [200, "EPISODES /episodes/x.wav\n"]  # the free copy, now cached

            response = await tab.page.goto(f"{proxy.url}/.l402/pay?path={episode}&return=/feed.xml")
            assert response is not None and response.status == 402
            invoice = await invoice_in_header(response)
            async with tab.page.expect_navigation(
                url=proxy.url + "/feed.xml", wait_until="commit", timeout=UNLOCK_WAIT_MS
            ):
                ledger = DevLedger(home / "devledger.sqlite")
                try:
                    await ledger.pay("listener", invoice, 0)
                finally:
                    await ledger.close()

            # The browser's cache keys on the Cookie now (Vary), so it asks again.
            after = await tab.page.evaluate(FETCH_TEXT, episode)
            assert after == [200, "ADFREE /adfree/x.wav\n"]
            assert tab.errors == []
