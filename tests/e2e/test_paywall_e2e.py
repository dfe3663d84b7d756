"""The paywall page over real HTTP: a real origin, a real mitmdump with the server addon, the CLI.

Like a curl user would: read the 402 page, ask the proxy to unlock, pay with `l402proxy dev pay`,
then send the cookie back.
"""

import http.server
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.launch import started

from . import procs

pytestmark = pytest.mark.e2e

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
RULES = """
services:
  - name: home
    description: "Go ad-free"
    match: {path: "/"}
    price_sat: 21
    mode: upgrade
  - name: bonus
    description: "Bonus episode"
    match: {path: "/bonus/*"}
    price_sat: 100
    mode: paywall
    valid_for: 7d
"""


@dataclass
class Stack:
    home: Path
    origin: procs.Process | None
    proxy: procs.Process

    def client(self) -> httpx.Client:
        # No cookie jar surprises: every test says which cookies it sends.
        return httpx.Client(base_url=self.proxy.url, trust_env=False, timeout=20)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("paywall")
    home = work / "home"
    home.mkdir()
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    origin = procs.origin(work, home)
    proxy = procs.server_proxy(work, home, work / "conf", origin.url, rules)
    with started(origin, proxy):
        yield Stack(home, origin, proxy)


def challenge(response: httpx.Response) -> tuple[str, str]:
    """(macaroon, invoice) the way field clients read them: a regex on the first line."""
    line = response.headers.get_list("WWW-Authenticate")[0]
    macaroon = re.search(r'macaroon="([^"]+)"', line)
    invoice = re.search(r'invoice="([^"]+)"', line)
    assert macaroon and invoice, line
    return macaroon.group(1), invoice.group(1)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (None, "application/json"),
        ("text/plain", "text/plain; charset=utf-8"),
        (BROWSER_ACCEPT, "text/html; charset=utf-8"),
    ],
)
def test_402_body_kind_follows_accept(stack: Stack, accept: str | None, content_type: str) -> None:
    headers = {"Accept": accept} if accept else {}
    with stack.client() as client:
        response = client.get("/bonus/b1.mp3", headers=headers)
    assert response.status_code == 402
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Cache-Control"] == "no-store"
    lines = response.headers.get_list("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    macaroon, invoice = challenge(response)
    if accept is None:
        body = response.json()
        assert body["invoice"] == invoice and body["macaroon"] == macaroon
    else:
        assert invoice in response.text
    if content_type.startswith("text/html"):
        assert "<svg" in response.text and f'href="lightning:{invoice}"' in response.text
        assert "X-Origin-Path" not in response.headers  # the origin was never asked


def test_unlock_after_dev_pay_sets_a_cookie_that_opens_the_scope(stack: Stack) -> None:
    with stack.client() as client:
        page = client.get("/bonus/b2.mp3", headers={"Accept": BROWSER_ACCEPT})
        macaroon, invoice = challenge(page)

        unpaid = client.post("/.l402/unlock", json={"macaroon": macaroon, "preimage": None})
        assert unpaid.status_code == 202 and unpaid.json() == {"unlocked": False}

        paid = procs.cli(stack.home, "dev", "pay", invoice)
        assert paid.returncode == 0, paid.stderr
        preimage = json.loads(paid.stdout)["preimage"]

        # Only this browser (it holds the page's claim cookie) may collect the credential.
        with stack.client() as stranger:
            other = stranger.post("/.l402/unlock", json={"macaroon": macaroon, "preimage": None})
            assert other.status_code == 403 and other.json()["error"] == "not_this_browser"

        unlocked = client.post("/.l402/unlock", json={"macaroon": macaroon, "preimage": None})
        assert unlocked.status_code == 200, unlocked.text
        assert unlocked.json()["unlocked"] is True and unlocked.json()["service"] == "bonus"
        set_cookie = unlocked.headers["Set-Cookie"]
        assert set_cookie.startswith(f"L402_bonus={macaroon}:{preimage};")
        for attribute in ("Path=/bonus/", "HttpOnly", "SameSite=Lax", "Max-Age="):
            assert attribute in set_cookie
        assert "Secure" not in set_cookie  # plain HTTP here
        assert preimage not in unlocked.text

        cookie = set_cookie.split(";", 1)[0]
        for name in ("b2", "other"):
            response = client.get(f"/bonus/{name}.mp3", headers={"Cookie": cookie})
            assert response.status_code == 200, response.text
            assert response.content == f"BONUS episode {name}\n".encode()
            assert response.headers["X-Origin-Path"] == f"/bonus/{name}.mp3"

        # The very same credential as an Authorization header works too.
        header = client.get(
            "/bonus/b3.mp3", headers={"Authorization": f"L402 {cookie.split('=', 1)[1]}"}
        )
        assert header.status_code == 200

        # A broken cookie gets the page again and is cleared.
        broken = client.get(
            "/bonus/b2.mp3", headers={"Cookie": "L402_bonus=garbage", "Accept": BROWSER_ACCEPT}
        )
        assert broken.status_code == 401
        assert broken.headers["Set-Cookie"].startswith("L402_bonus=; Path=/bonus/; Max-Age=0")


def test_forged_unlock_is_refused(stack: Stack) -> None:
    with stack.client() as client:
        macaroon, _ = challenge(client.get("/bonus/b4.mp3"))
        forged = macaroon[:-6] + ("AAAAA=" if not macaroon.endswith("AAAAA=") else "BBBBB=")
        response = client.post("/.l402/unlock", json={"macaroon": forged})
        assert response.status_code == 401
        assert client.post("/.l402/unlock", content=b"{}").status_code == 400
        assert client.get("/.l402/unlock").status_code == 405


def test_pay_page_and_upgrade_banner(stack: Stack) -> None:
    with stack.client() as client:
        pay = client.get(
            "/.l402/pay",
            params={"path": "/", "return": "/?from=banner"},
            headers={"Accept": BROWSER_ACCEPT},
        )
        assert pay.status_code == 402
        assert pay.headers["Content-Type"] == "text/html; charset=utf-8"
        assert '"return_to":"/?from=banner"' in pay.text
        assert challenge(pay)[1] in pay.text

        nothing = client.get("/.l402/pay", params={"path": "/feed.xml"})
        assert nothing.status_code == 404

        # The free home page, in upgrade mode, carries the offer for browsers only.
        index = client.get("/", headers={"Accept": BROWSER_ACCEPT})
        assert index.status_code == 200 and "Sample podcast" in index.text
        assert "Go ad-free for 21 sats" in index.text
        assert "/.l402/pay?path=%2F&amp;return=%2F" in index.text
        api = client.get("/", headers={"Accept": "application/json"})
        assert api.status_code == 200 and "l402-upgrade" not in api.text


class EchoCookies(http.server.BaseHTTPRequestHandler):
    """An origin that says which cookies reached it."""

    def do_GET(self) -> None:
        body = json.dumps({"cookie": self.headers.get_all("Cookie") or []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_our_cookie_never_reaches_the_origin(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    with procs.in_process_origin(EchoCookies, "echo-origin") as origin_url:
        proxy = procs.server_proxy(tmp_path, home, tmp_path / "conf", origin_url, rules)
        with started(proxy):
            stack = Stack(home, None, proxy)
            with stack.client() as client:
                macaroon, invoice = challenge(
                    client.get("/bonus/x", headers={"Accept": BROWSER_ACCEPT})
                )
                procs.dev_pay(home, invoice)
                unlocked = client.post("/.l402/unlock", json={"macaroon": macaroon})
                cookie = unlocked.headers["Set-Cookie"].split(";", 1)[0]
                seen = client.get("/bonus/x", headers={"Cookie": f"a=1; {cookie}; b=2"})
                assert seen.status_code == 200
                assert seen.json() == {"cookie": ["a=1; b=2"]}
                unpriced = client.get("/feed", headers={"Cookie": cookie})
                assert unpriced.json() == {"cookie": []}
