"""The admin API and page end to end: a real mitmdump server door with
--set l402_admin=127.0.0.1:<port>, a real origin, tokens bought and paid through the dev ledger
as any client would; then the real CLI asks the admin API, and Debian's Chromium (Playwright)
opens the page with the secret in the URL's fragment and shows the revenue of this run: the
numbers in its table are what was paid, and its chart has a bar per sale's bucket and service.
"""

import asyncio
import json
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.launch import started

from . import procs
from .browser import browser
from .test_server_e2e import OPTED_IN, PODCAST_RULES, field_client_parse

pytestmark = pytest.mark.e2e

# What this run buys: (path, service, price) from rules/podcast.yaml.
PURCHASES = [
    ("/bonus/ep1.mp3", "bonus", 100),
    ("/bonus/ep2.mp3", "bonus", 100),
    ("/episodes/ep1.mp3", "podcast", 21),
]
TOTALS = {"bonus": (2, 200), "podcast": (1, 21)}
WAIT_SECONDS = 30.0
PAGE_TIMEOUT_MS = 20_000


@dataclass
class Stack:
    home: Path
    proxy: procs.Process
    admin_port: int
    secret: str
    secret_file: Path

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_get(self, path: str) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=20) as client:
            return client.get(
                self.admin_url + path, headers={"Authorization": f"Bearer {self.secret}"}
            )

    def total_sats(self) -> int | None:
        """What the admin API says was earned; None while it does not answer yet."""
        try:
            return int(self.admin_get("/api/revenue").json()["total"]["sats"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None


def buy(proxy: procs.Process, home: Path, path: str) -> tuple[str, bytes]:
    """A 402 for `path`, paid through the dev ledger and used: (macaroon, preimage)."""
    with httpx.Client(trust_env=False, timeout=20) as client:
        challenge = client.get(proxy.url + path, headers=OPTED_IN)
        assert challenge.status_code == 402, challenge.text
        macaroon, invoice = field_client_parse(challenge.headers.get_list("WWW-Authenticate")[0])
        preimage = procs.dev_pay(home, invoice)
        paid = client.get(
            proxy.url + path, headers={"Authorization": f"L402 {macaroon}:{preimage.hex()}"}
        )
        assert paid.status_code == 200, paid.text
    return macaroon, preimage


def buy_credential(stack: Stack, path: str) -> tuple[str, bytes]:
    return buy(stack.proxy, stack.home, path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("admin")
    home = work / "home"
    home.mkdir()
    admin_port = procs.free_port()
    origin = procs.origin(work, home)
    # No l402_admin_secret: the door makes the default one under the home and says so once.
    proxy = procs.server_proxy(
        work, home, work / "conf", origin.url, PODCAST_RULES, f"l402_admin=127.0.0.1:{admin_port}"
    )
    with started(origin, proxy):
        secret_file = home / "admin-secret"
        assert procs.wait_until(secret_file.exists, WAIT_SECONDS), proxy.log()
        secret = secret_file.read_text().strip()
        for path, _, _ in PURCHASES:
            buy(proxy, home, path)
        stack = Stack(home, proxy, admin_port, secret, secret_file)
        # The engine writes its sales every 0.25 s; the admin API reads them from the store.
        assert procs.wait_until(lambda: stack.total_sats() == 221, WAIT_SECONDS), proxy.log()
        yield stack


def test_the_door_made_a_private_secret_and_showed_it_once(stack: Stack) -> None:
    assert stat.S_IMODE(stack.secret_file.stat().st_mode) == 0o600
    assert stack.proxy.log().count(f"#secret={stack.secret}") == 1
    assert stack.admin_get("/api/health").json()["door"] == "mitmproxy"
    with httpx.Client(trust_env=False, timeout=20) as client:
        refused = client.get(stack.admin_url + "/api/tokens")
    assert refused.status_code == 401


def test_the_admin_api_shows_what_was_sold(stack: Stack) -> None:
    report = stack.admin_get("/api/revenue?bucket=day").json()
    totals = {t["service"]: (t["tokens_sold"], t["sats"]) for t in report["totals"]}
    assert totals == TOTALS
    services = {
        s["name"]: s["price_sat"] for s in stack.admin_get("/api/services").json()["services"]
    }
    assert services["bonus"] == 100 and services["podcast"] == 21
    tokens = stack.admin_get("/api/tokens").json()["tokens"]
    assert sorted(t["service"] for t in tokens if t["paid_at"] is not None) == [
        "bonus",
        "bonus",
        "podcast",
    ]


def test_the_cli_asks_the_running_paywall(stack: Stack) -> None:
    via = ["--admin", stack.admin_url, "--admin-secret-file", str(stack.secret_file)]
    listed = procs.cli(stack.home, "tokens", "list", "--service", "bonus", *via)
    assert listed.returncode == 0, listed.stderr
    assert [t["price_sat"] for t in json.loads(listed.stdout)] == [100, 100]
    revenue = procs.cli(stack.home, "revenue", "--bucket", "day", "--since", "2d", *via)
    assert revenue.returncode == 0, revenue.stderr
    assert json.loads(revenue.stdout)["total"] == {"tokens_sold": 3, "sats": 221}
    wrong = stack.home / "wrong-secret"
    wrong.write_text("not-the-secret-but-long-enough")
    wrong.chmod(0o600)
    refused = procs.cli(
        stack.home, "tokens", "list", "--admin", stack.admin_url, "--admin-secret-file", str(wrong)
    )
    assert refused.returncode == 1
    assert "refused the secret (401)" in refused.stderr and refused.stdout == ""


# --- the page in a real browser ------------------------------------------------------------


@dataclass
class Tab:
    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)


@pytest.fixture
async def open_tab() -> AsyncIterator[Callable[[], Any]]:
    async with browser() as chromium:
        contexts: list[Any] = []

        async def opener() -> Tab:
            context = await chromium.new_context(viewport={"width": 1100, "height": 1400})  # type: ignore[attr-defined]
            contexts.append(context)
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = await context.new_page()
            tab = Tab(page)
            page.on("pageerror", lambda error: tab.errors.append(str(error)))
            # A CSP violation is a console error: the page must need nothing it forbids.
            page.on(
                "console",
                lambda message: message.type == "error" and tab.errors.append(message.text),
            )
            page.on("request", lambda request: tab.requests.append(request))
            return tab

        try:
            yield opener
        finally:
            for context in contexts:
                await context.close()


async def loaded(tab: Tab) -> None:
    await tab.page.wait_for_selector("body[data-loaded]")


async def test_the_page_shows_the_revenue_of_this_run(
    stack: Stack, open_tab: Callable[[], Any], tmp_path: Path
) -> None:
    tab = await open_tab()
    await tab.page.goto(f"{stack.admin_url}/#secret={stack.secret}")
    await loaded(tab)

    # The numbers shown are what was paid, per service and in all.
    assert await tab.page.inner_text("#revenue-total-sats") == "221"
    assert await tab.page.inner_text("#revenue-total-tokens") == "3"
    for service, (tokens, sats) in TOTALS.items():
        row = f'#revenue-totals tr[data-total-service="{service}"]'
        assert await tab.page.inner_text(f"{row} td.sats") == str(sats)
        assert await tab.page.inner_text(f"{row} td.tokens") == str(tokens)
    # The chart draws them: one bar per service in the hour they sold in, sized by sats.
    bars = await tab.page.eval_on_selector_all(
        "svg#chart rect.bar",
        "bars => bars.map(b => [b.dataset.service, Number(b.dataset.sats),"
        " b.getBoundingClientRect().height])",
    )
    shown = sorted((service, sats) for service, sats, _ in bars)
    assert shown == [("bonus", 200), ("podcast", 21)]
    heights = {service: height for service, _, height in bars}
    assert heights["bonus"] > heights["podcast"] > 0
    # Services and prices, the latest tokens.
    services = await tab.page.inner_text("#services-rows")
    assert "bonus" in services and "100" in services and "/bonus/*" in services
    assert await tab.page.locator("#tokens-rows tr").count() == 3

    # The secret left the address bar, and never went to the server in a URL.
    assert "secret" not in tab.page.url
    assert all("secret" not in request.url for request in tab.requests)
    api_calls = [r for r in tab.requests if "/api/" in r.url]
    assert api_calls
    for call in api_calls:
        assert (await call.all_headers()).get("authorization") == f"Bearer {stack.secret}"
    await tab.page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
    assert tab.errors == []

    # A reload keeps the secret (this tab's sessionStorage) and shows the same.
    await tab.page.reload()
    await loaded(tab)
    assert await tab.page.inner_text("#revenue-total-sats") == "221"


async def test_the_page_asks_for_the_secret_and_says_when_it_is_wrong(
    stack: Stack, open_tab: Callable[[], Any]
) -> None:
    tab = await open_tab()
    await tab.page.goto(f"{stack.admin_url}/admin")
    await tab.page.wait_for_selector("#login:not([hidden])")
    assert await tab.page.is_hidden("#content")

    await tab.page.fill("#secret", "not-the-secret-at-all")
    await tab.page.click("#login-form button[type=submit]")
    await tab.page.wait_for_selector("#login-error:has-text('refused')")
    assert await tab.page.is_hidden("#content")

    await tab.page.fill("#secret", stack.secret)
    await tab.page.click("#login-form button[type=submit]")
    await loaded(tab)
    assert await tab.page.inner_text("#revenue-total-sats") == "221"
    # Forgetting it shows the form again; nothing is left in the tab.
    await tab.page.click("#forget")
    await tab.page.wait_for_selector("#login:not([hidden])")
    assert await tab.page.evaluate("sessionStorage.length") == 0
    assert [e for e in tab.errors if "401" not in e] == []  # the refused fetch is logged


async def test_another_site_cannot_read_the_api(stack: Stack, open_tab: Callable[[], Any]) -> None:
    """A page on another origin (here: the origin server's) that knows the URL gets no
    answer it may read: no CORS, and it does not have the secret anyway."""
    tab = await open_tab()
    await tab.page.goto(stack.proxy.url + "/")
    outcome = await asyncio.wait_for(
        tab.page.evaluate(
            """async (url) => {
                try { const r = await fetch(url); return "read " + r.status; }
                catch (e) { return "blocked"; }
            }""",
            stack.admin_url + "/api/health",
        ),
        PAGE_TIMEOUT_MS / 1000,
    )
    assert outcome == "blocked"


async def test_a_token_revoked_on_the_page_is_refused_by_the_door(
    stack: Stack, open_tab: Callable[[], Any]
) -> None:
    """Last in this file: it revokes one of the run's tokens (sold is still sold: the
    revenue stays)."""
    # Blocking calls (they run their own loops, or sleep) go to a thread: Playwright's is this.
    macaroon, preimage = await asyncio.to_thread(buy_credential, stack, "/bonus/ep3.mp3")
    sold = await asyncio.to_thread(
        procs.wait_until, lambda: stack.total_sats() == 321, WAIT_SECONDS
    )
    assert sold
    tab = await open_tab()
    await tab.page.goto(f"{stack.admin_url}/#secret={stack.secret}")
    await loaded(tab)
    token_id = stack.admin_get("/api/tokens?limit=1").json()["tokens"][0]["token_id"]
    tab.page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    row = tab.page.locator("#tokens-rows tr", has_text=token_id[:16])
    await row.get_by_role("button", name="Revoke").click()
    await tab.page.wait_for_function(
        "id => [...document.querySelectorAll('#tokens-rows tr')].some(tr =>"
        " tr.textContent.includes(id) && tr.textContent.includes('revoked'))",
        arg=token_id[:16],
    )
    # The door hears of it within a second (its revocation polling) and sells again instead.
    credential = {"Authorization": f"L402 {macaroon}:{preimage.hex()}"}

    def refused() -> bool:
        with httpx.Client(trust_env=False, timeout=20) as client:
            return (
                client.get(stack.proxy.url + "/bonus/ep3.mp3", headers=credential).status_code
                == 402
            )

    assert await asyncio.to_thread(procs.wait_until, refused, WAIT_SECONDS)
    assert await tab.page.inner_text("#revenue-total-sats") == "321"
    assert tab.errors == []
