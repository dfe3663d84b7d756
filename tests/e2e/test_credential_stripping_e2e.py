"""Our credentials never reach the origin: through a real mitmdump, an origin that echoes the
Authorization and Cookie headers it got. L402/LSAT Authorization (any case) and our cookies are
taken off every forwarded request, priced or not; the origin's own Basic/Bearer stay.
"""

import http.server
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.headers import parse_challenges
from l402proxy.launch import started

from . import procs

pytestmark = pytest.mark.e2e

RULES = """
services:
  - name: priced
    match: {path: "/priced/*"}
    price_sat: 10
  - name: open
    match: {path: "/open/*"}
    price_sat: 0
    mode: free
"""
BASIC = "Basic dXNlcjpwdw=="


class EchoHeaders(http.server.BaseHTTPRequestHandler):
    """An origin that says which Authorization and Cookie lines reached it."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "authorization": self.headers.get_all("Authorization") or [],
                "cookie": self.headers.get_all("Cookie") or [],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Stack:
    proxy: procs.Process
    token: str  # <macaroon>:<preimage hex>, paid for service "priced"

    def get(self, path: str, headers: list[tuple[str, str]]) -> httpx.Response:
        with httpx.Client(base_url=self.proxy.url, trust_env=False, timeout=20) as client:
            return client.get(path, headers=headers)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("credentials")
    home = work / "home"
    home.mkdir()
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    with procs.in_process_origin(EchoHeaders, "echo-origin") as origin_url:
        proxy = procs.server_proxy(work, home, work / "conf", origin_url, rules)
        with started(proxy):
            yield Stack(proxy, buy(proxy, home))


def buy(proxy: procs.Process, home: Path) -> str:
    response = httpx.get(proxy.url + "/priced/x", timeout=procs.FETCH_TIMEOUT, trust_env=False)
    assert response.status_code == 402, response.text
    challenge = parse_challenges(response.headers.get_list("WWW-Authenticate"))[0]
    return f"{challenge.macaroon}:{procs.dev_pay(home, challenge.invoice).hex()}"


def seen(response: httpx.Response) -> dict[str, list[str]]:
    assert response.status_code == 200, response.text
    result: dict[str, list[str]] = response.json()
    return result


@pytest.mark.parametrize("path", ["/elsewhere/x", "/open/x"], ids=["no-rule", "free-rule"])
@pytest.mark.parametrize("scheme", ["L402", "LSAT", "l402", "Lsat"])
def test_our_credential_is_dropped_where_nothing_is_priced(
    stack: Stack, path: str, scheme: str
) -> None:
    got = seen(
        stack.get(
            path,
            [
                ("Authorization", f"{scheme} {stack.token}"),
                ("Cookie", f"a=1; L402_priced={stack.token}; b=2"),
            ],
        )
    )
    assert got == {"authorization": [], "cookie": ["a=1; b=2"]}


@pytest.mark.parametrize("path", ["/elsewhere/x", "/open/x", "/priced/x"])
def test_the_origins_own_authorization_stays(stack: Stack, path: str) -> None:
    # On the priced path the cookie pays; Basic and Bearer belong to the origin.
    for value in (BASIC, "Bearer abc.def"):
        got = seen(
            stack.get(path, [("Authorization", value), ("Cookie", f"L402_priced={stack.token}")])
        )
        assert got == {"authorization": [value], "cookie": []}


@pytest.mark.parametrize("path", ["/elsewhere/x", "/open/x"], ids=["no-rule", "free-rule"])
def test_only_our_lines_go_when_several_are_sent(stack: Stack, path: str) -> None:
    got = seen(
        stack.get(
            path,
            [
                ("Authorization", BASIC),
                ("Authorization", f"L402 {stack.token}"),
                ("Authorization", f"lsat {stack.token}"),
            ],
        )
    )
    assert got["authorization"] == [BASIC]


@pytest.mark.parametrize("scheme", ["L402", "LSAT", "l402"])
def test_a_granted_request_reaches_the_origin_without_the_credential(
    stack: Stack, scheme: str
) -> None:
    got = seen(
        stack.get(
            "/priced/x",
            [("Authorization", f"{scheme} {stack.token}"), ("Cookie", "theme=dark")],
        )
    )
    assert got == {"authorization": [], "cookie": ["theme=dark"]}
