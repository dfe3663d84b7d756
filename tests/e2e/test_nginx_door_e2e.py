"""The nginx door for real: Debian's nginx running the config `l402proxy nginx-config` prints,
`l402proxy serve-auth` behind it, an origin that echoes what it was sent, and the mitmproxy
door in front of the same origin (sharing the store and dev ledger) to compare with: clients
get the same answers and the origin the same forwarded requests through both."""

import contextlib
import http.server
import json
import re
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from l402proxy.l402.headers import parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import decode_macaroon
from l402proxy.launch import started
from tests.standins.tls import self_signed

from . import procs
from .nginx import door_config, nginx_binary, nginx_door, running_nginx, serve_auth

pytestmark = pytest.mark.e2e

RULES = """
services:
  - name: podcast
    description: "Ad-free episode"
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
      set_headers: {X-L402-Tier: premium}
  - name: bonus
    description: "Bonus episode"
    match: {path: "/bonus/*"}
    price_sat: 100
  - name: adfree
    match: {path: "/adfree/*"}
    mode: deny
  - name: limited
    match: {path: "/limited/*"}
    price_sat: 5
    rate_limits: [{requests: 2, per: 1h}]
"""
HTML = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
RAW_TIMEOUT = 15.0
# What nginx adds to every response it sends (the origin's own Date and Server included).
NGINX_OWN = {"date", "server", "connection", "keep-alive", "transfer-encoding", "content-length"}
# Headers of a forwarded request that belong to one hop, not to the request.
HOP = {"connection", "keep-alive", "content-length"}


class Echo(http.server.BaseHTTPRequestHandler):
    """An origin that answers with what it got: method, raw target, header fields and body.
    `*.html` paths get an HTML page; `?cc=<value>` sets the answer's Cache-Control."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        if path.endswith(".html"):
            content = b"<!doctype html><html><body><p>FREE PAGE</p></body></html>"
            content_type = "text/html; charset=utf-8"
        else:
            content = json.dumps(
                {
                    "method": self.command,
                    "target": self.path,
                    "headers": self.headers.items(),
                    "body": body.decode("latin-1"),
                }
            ).encode()
            content_type = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        for value in parse_qs(urlsplit(self.path).query, keep_blank_values=True).get("cc", []):
            self.send_header("Cache-Control", value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_POST = do_HEAD = do_PUT = answer


@dataclass
class Stack:
    work: Path
    home: Path
    rules: Path
    origin: str
    door: str  # the nginx door's base URL
    proxy: procs.Process  # the mitmproxy door

    def nginx(self) -> httpx.Client:
        return client(self.door)

    def mitmproxy(self) -> httpx.Client:
        return client(self.proxy.url)

    def both(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, ...]:
        """The same request through the nginx door, then through the mitmproxy door."""
        with self.nginx() as nginx, self.mitmproxy() as proxy:
            return nginx.request(method, path, **kwargs), proxy.request(method, path, **kwargs)

    def buy(self, path: str = "/episodes/ep1.mp3") -> str:
        """An Authorization value bought through the nginx door (it opens the mitmproxy door
        too: one store, one secret)."""
        with self.nginx() as door:
            response = door.get(path, headers={"Accept-Authenticate": "L402"})
        assert response.status_code == 402, response.text
        challenge = parse_challenges(response.headers.get_list("WWW-Authenticate"))[0]
        preimage = procs.dev_pay(self.home, challenge.invoice)
        return f"L402 {challenge.macaroon}:{preimage.hex()}"


def client(base_url: str) -> httpx.Client:
    """A client that keeps no cookies: every test says which cookies it sends."""
    return httpx.Client(
        base_url=base_url,
        trust_env=False,
        timeout=procs.FETCH_TIMEOUT,
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx_binary()
    work = tmp_path_factory.mktemp("nginx-door")
    home = work / "home"
    home.mkdir()
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    with procs.in_process_origin(Echo, "echo-origin") as origin:
        proxy = procs.server_proxy(work, home, work / "conf", origin, rules)
        with started(proxy), nginx_door(work, home, rules, origin) as door:
            yield Stack(work, home, rules, origin, door, proxy)


def raw_request(url: str, request: bytes) -> bytes:
    """Send `request` byte for byte on a fresh connection; everything that came back."""
    port = int(url.rsplit(":", 1)[1])
    received = bytearray()
    deadline = time.monotonic() + RAW_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT) as sock:
        sock.sendall(request)
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return bytes(received)


def raw_get(url: str, target: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: podcast.example", *headers]
    return raw_request(url, b"\r\n".join([*lines, b"Connection: close", b"", b""]))


def masked(text: str, response: httpx.Response) -> str:
    """`text` with what differs between two challenges (invoice, macaroon, QR code, claim
    cookie, and the times, which may fall on either side of a second or minute) replaced by
    placeholders."""
    for challenge in parse_challenges(response.headers.get_list("WWW-Authenticate")):
        text = text.replace(challenge.invoice, "INVOICE").replace(challenge.macaroon, "MACAROON")
    text = re.sub(r"<svg.*?</svg>", "QR", text, flags=re.DOTALL)
    text = re.sub(r"L402claim\.[0-9a-f]+=[0-9a-f]+", "CLAIM", text)
    text = re.sub(r"Max-Age=\d+", "Max-Age=N", text)
    text = re.sub(r'"(invoice_expires_at|expires_at|expires_in)": ?\d+', r'"\1": T', text)
    return re.sub(r"(\d{4}-\d\d-\d\dT)?\d\d:\d\d(:\d\dZ| UTC)", "TIME", text)


def answer_shape(response: httpx.Response) -> tuple[int, Counter[tuple[str, str]], str]:
    """Status, header fields (names in any case, nginx's own left out) and body, masked."""
    fields = Counter(
        (name.lower(), masked(value, response))
        for name, value in response.headers.multi_items()
        if name.lower() not in NGINX_OWN
    )
    return response.status_code, fields, masked(response.text, response)


def forwarded(response: httpx.Response) -> tuple[str, str, Counter[tuple[str, str]], str]:
    """What the echo origin got: method, raw target, header fields (hop ones left out), body."""
    seen = response.json()
    fields = Counter(
        (name.lower(), value) for name, value in seen["headers"] if name.lower() not in HOP
    )
    return seen["method"], seen["target"], fields, seen["body"]


def directives(value: str | None) -> list[str]:
    return [part.strip().lower() for part in (value or "").split(",") if part.strip()]


# -- the printed config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "names"),
    [
        ("http://127.0.0.1:9", []),
        ("http://localhost:9", ["X-L402-Tier"]),
        ("https://127.0.0.1:9443", ["X-A", "x_b.c", "X-Ad-Free"]),
    ],
)
def test_every_config_nginx_config_prints_runs_as_printed(
    tmp_path: Path, upstream: str, names: list[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    headers = "".join(f"        {name}: v\n" for name in names)
    rules.write_text(
        "services:\n  - name: a\n    match: {path: /a/*}\n    price_sat: 1\n"
        + (f"    paid:\n      set_headers:\n{headers}" if names else "")
    )
    port = procs.free_port()
    made = procs.cli(
        tmp_path, "nginx-config", "--upstream", upstream, "--rules", str(rules),
        "--listen", f"127.0.0.1:{port}", "--auth", f"127.0.0.1:{procs.free_port()}",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    # running_nginx runs `nginx -t` on it first, then starts it.
    with running_nginx(tmp_path, made.stdout), client(f"http://127.0.0.1:{port}") as browser:
        # Nothing serves the auth service here: nginx fails closed.
        assert browser.get("/a/x").status_code == 500


# -- answers the paywall gives itself -----------------------------------------------------------


@pytest.mark.parametrize("accept", [None, "text/plain", HTML])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_402_is_the_one_the_mitmproxy_door_gives(
    stack: Stack, accept: str | None, method: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    nginx, proxy = stack.both(method, "/bonus/b1.mp3", headers=headers)
    assert nginx.status_code == 402
    assert answer_shape(nginx) == answer_shape(proxy)
    # LSAT first, as the engine wrote them (nginx keeps the order of a name's lines).
    assert [line.split()[0] for line in nginx.headers.get_list("WWW-Authenticate")] == [
        "LSAT",
        "L402",
    ]
    length = int(nginx.headers["Content-Length"])
    assert length == (len(nginx.content) if method == "GET" else len(proxy.content) or length)


def test_head_on_a_402_has_the_length_and_no_body(stack: Stack) -> None:
    raw = raw_request(
        stack.door,
        b"HEAD /bonus/b1.mp3 HTTP/1.1\r\nHost: podcast.example\r\nConnection: close\r\n\r\n",
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 402") and rest == b"", raw[-200:]
    assert re.search(rb"(?i)\r\ncontent-length: [1-9]\d+\r\n", head), head


@pytest.mark.parametrize(
    ("target", "nginx_refuses"),
    [
        (b"/free/..%2Fbonus/b1.mp3", False),  # ambiguous: refused, never forwarded
        (b"/bonus/b1.mp3%c0%af", False),  # malformed (overlong UTF-8)
        (b"/bonus/b1.mp3%zz", True),  # nginx refuses a bad escape itself
        (b"/adfree/ep1.mp3", False),  # deny: only a paid rewrite reaches it
        (b"/%62onus/b1.mp3", False),  # an escaped spelling of a priced place
        (b"/bonus/b1.mp3%00", True),  # and an escaped NUL (its own 400 page)
    ],
)
def test_the_paywall_judges_the_raw_target_as_the_proxy_does(
    stack: Stack, target: bytes, nginx_refuses: bool
) -> None:
    through_nginx = raw_get(stack.door, target)
    through_proxy = raw_get(stack.proxy.url, target)
    status = through_proxy.split(b" ", 2)[1]
    assert through_nginx.split(b" ", 2)[1] == status, through_nginx[:300]
    if status != b"402" and not nginx_refuses:
        assert through_nginx.partition(b"\r\n\r\n")[2] == through_proxy.partition(b"\r\n\r\n")[2]
    assert b'"target"' not in through_nginx  # the origin was never asked


def test_a_client_cannot_tell_the_service_what_it_asked_for(stack: Stack) -> None:
    """nginx sets the X-Original-* and X-L402-Config headers over any copy a client sends."""
    forged = {
        "X-Original-URI": "/feed.xml",
        "X-Original-Method": "OPTIONS",
        "X-Original-Host": "elsewhere.example",
        "X-L402-Config": "1 x-l402-tier",
    }
    with stack.nginx() as door:
        assert door.get("/bonus/b1.mp3", headers=forged).status_code == 402
        free = door.get("/feed.xml", headers={**forged, "X-Original-URI": "/bonus/b1.mp3"})
    assert free.status_code == 200 and forwarded(free)[1] == "/feed.xml"


def test_a_request_counts_once_against_a_rate_limit_as_through_the_proxy(stack: Stack) -> None:
    with stack.nginx() as nginx, stack.mitmproxy() as proxy:
        through_nginx = [nginx.get("/limited/x").status_code for _ in range(3)]
        through_proxy = [proxy.get("/limited/x").status_code for _ in range(3)]
    assert through_nginx == through_proxy == [402, 402, 429]


def test_one_invoice_per_402(stack: Stack) -> None:
    before = len(procs.ledger_invoices(stack.home))
    with stack.nginx() as door:
        for method, accept in (("GET", "*/*"), ("GET", HTML), ("HEAD", "*/*")):
            response = door.request(method, "/bonus/b9.mp3", headers={"Accept": accept})
            assert response.status_code == 402
        page = door.get("/.l402/pay?path=/bonus/b9.mp3", headers={"Accept": HTML})
        assert page.status_code == 402
    assert len(procs.ledger_invoices(stack.home)) == before + 4


# -- what reaches the origin -------------------------------------------------------------------


def test_a_paid_request_reaches_the_origin_as_through_the_proxy(stack: Stack) -> None:
    token = stack.buy()
    headers = [
        ("Authorization", token),
        ("Cookie", "theme=dark; L402_podcast=AgEB:00"),
        ("X-L402-Tier", "forged"),
        ("Accept", "audio/*"),
    ]
    nginx, proxy = stack.both("GET", "/episodes/ep1.mp3?t=1", headers=headers)
    assert nginx.status_code == proxy.status_code == 200
    assert forwarded(nginx) == forwarded(proxy)
    _, target, fields, _ = forwarded(nginx)
    assert target == "/adfree/ep1.mp3?t=1"
    assert fields["x-l402-tier", "premium"] == 1 and ("x-l402-tier", "forged") not in fields
    assert ("cookie", "theme=dark") in fields
    assert "authorization" not in {name for name, _ in fields}
    # The paid answer is marked for caches as the proxy marks it.
    assert nginx.headers.get("Cache-Control") == "private"
    assert set(directives(nginx.headers.get("Vary"))) == set(directives(proxy.headers.get("Vary")))
    # A POST body (with a length, or chunked) goes past auth_request and the paid route to
    # the origin.
    with stack.nginx() as door:
        for content in (b"BODY-BYTES", iter([b"BODY-", b"BYTES"])):
            posted = door.post(
                "/episodes/ep1.mp3", headers={"Authorization": token}, content=content
            )
            assert forwarded(posted)[0] == "POST" and forwarded(posted)[3] == "BODY-BYTES"


@pytest.mark.parametrize(
    "path",
    [
        "/feed.xml",  # no rule
        "/free/caf%C3%A9.txt?x=%2F..",  # escapes go as they came
    ],
)
def test_our_credentials_never_reach_the_origin_and_the_origins_stay(
    stack: Stack, path: str
) -> None:
    for headers in (
        [("Authorization", "L402 AgEB:00"), ("Cookie", "L402_bonus=AgEB:00; a=b")],
        [("Authorization", "Basic dTpw"), ("Cookie", "a=b"), ("Cookie", "c=d")],
        [("X-L402-Tier", "premium"), ("Upgrade", "h2c"), ("Connection", "Upgrade")],
        # Large credentials of the origin's own fit in the verdict nginx reads.
        [("Authorization", "Bearer " + "t" * 6000), ("Cookie", "big=" + "c" * 6000)],
    ):
        nginx, proxy = stack.both("GET", path, headers=headers)
        assert nginx.status_code == proxy.status_code == 200
        _, target, fields, _ = forwarded(nginx)
        assert target == path
        names = {name for name, _ in fields}
        assert not names & {"x-l402-tier", "upgrade", "http2-settings"}
        assert "L402" not in str(fields)
        # Several Cookie fields go as one line (as nginx joins them); the same cookies.
        got, expected = forwarded(proxy)[2], fields
        cookies = [value for name, value in expected.elements() if name == "cookie"]
        assert "; ".join(v for n, v in got.elements() if n == "cookie") == "; ".join(cookies)
        assert {k: v for k, v in got.items() if k[0] != "cookie"} == {
            k: v for k, v in expected.items() if k[0] != "cookie"
        }


@pytest.mark.parametrize("path", ["/feed.xml", "/episodes/ep1.mp3"])
def test_rerooting_headers_never_reach_the_origin_and_the_request_is_answered(
    stack: Stack, path: str
) -> None:
    """Headers that make an origin route below another root than the path judged: the
    engine strips them and the printed config clears them toward the origin (nginx would
    pass the client's copy: the nginx door answered 503 to such a request)."""
    rerooting = {
        "Daphne-Root-Path": "/bonus",
        "X-Forwarded-Prefix": "/bonus",
        "X-Script-Name": "/bonus",
        "X-Original-URL": "/bonus/b1.mp3",
        "X-Rewrite-URL": "/bonus/b1.mp3",
    }
    headers = {**rerooting, "Authorization": stack.buy()} if "episodes" in path else rerooting
    nginx, proxy = stack.both("GET", path, headers=headers)
    assert nginx.status_code == proxy.status_code == 200, nginx.text
    assert forwarded(nginx) == forwarded(proxy)
    names = {name for name, _ in forwarded(nginx)[2]}
    assert not names & ({name.lower() for name in rerooting} | {"script-name"}), names


def test_two_authorization_fields_get_nginxs_own_400(stack: Stack) -> None:
    """nginx 1.22 takes Authorization once: a second field is its own 400, before the
    paywall or the origin is asked (two Cookie fields go on, as one line)."""
    raw = raw_get(stack.door, b"/feed.xml", b"Authorization: Basic dTpw", b"Authorization: X y")
    assert raw.startswith(b"HTTP/1.1 400") and b'"target"' not in raw, raw[:200]
    raw = raw_get(stack.door, b"/feed.xml", b"Cookie: a=b", b"Cookie: c=d")
    assert raw.startswith(b"HTTP/1.1 200") and b'"a=b; c=d"' in raw, raw[:200]


CREDENTIAL_RULES = """
services:
  - name: inside
    match: {path: "/inside/*"}
    price_sat: 3
    paid:
      set_headers: {Authorization: "Bearer inside", Cookie: "tier=premium", X-Inside: "1"}
"""


def test_a_paid_variant_sets_authorization_and_cookie_once(stack: Stack) -> None:
    """A paid variant's Authorization and Cookie go in the config's own lines for them, once
    (a numbered slot as well made nginx send each twice)."""
    rules = stack.work / "credentials.yaml"
    rules.write_text(CREDENTIAL_RULES)
    with own_door(stack, rules, "credentials") as (_, door), client(door) as browser:
        challenge = browser.get("/inside/x", headers={"Accept-Authenticate": "L402"})
        assert challenge.status_code == 402, challenge.text
        parsed = parse_challenges(challenge.headers.get_list("WWW-Authenticate"))[0]
        token = f"L402 {parsed.macaroon}:{procs.dev_pay(stack.home, parsed.invoice).hex()}"
        paid = browser.get("/inside/x", headers={"Authorization": token, "Cookie": "theme=dark"})
        assert paid.status_code == 200, paid.text
        fields = forwarded(paid)[2]
        assert [v for n, v in fields.elements() if n == "authorization"] == ["Bearer inside"]
        assert [v for n, v in fields.elements() if n == "cookie"] == ["tier=premium"]
        assert fields["x-inside", "1"] == 1
        # Nobody else's Authorization or Cookie reaches the origin: the paywall sets them.
        free = browser.get("/feed.xml", headers={"Authorization": "Bearer x", "Cookie": "a=b"})
        names = {name for name, _ in forwarded(free)[2]}
        assert free.status_code == 200 and not names & {"authorization", "cookie", "x-inside"}


def test_a_websocket_upgrade_is_passed_as_by_the_proxy(stack: Stack) -> None:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    nginx, proxy = stack.both("GET", "/feed.xml", headers=headers)
    # The echo origin answers 200 (no switch): what matters is what it was asked.
    assert forwarded(nginx)[2]["upgrade", "websocket"] == 1
    assert forwarded(nginx)[2] == forwarded(proxy)[2]


def test_raw_bytes_in_a_target_reach_the_origin_unchanged(stack: Stack) -> None:
    for target in (b"/free/caf\xc3\xa9.txt", b"/feed.xml?q=%ZZ&a=%2F"):
        raw = raw_get(stack.door, target)
        seen = json.loads(raw.partition(b"\r\n\r\n")[2])
        # http.server decodes the request line as latin-1.
        assert seen["target"].encode("latin-1") == target


# -- an https origin ------------------------------------------------------------------------------


def tls_echo_server(context: ssl.SSLContext) -> type[http.server.ThreadingHTTPServer]:
    """The echo origin's server class, speaking TLS with `context`."""

    class TLSEcho(http.server.ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            sock, address = super().get_request()
            # The handshake happens at the first read, on the handler's thread.
            wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return wrapped, address

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # nginx refusing our certificate is what some tests want

    return TLSEcho


def test_an_https_origins_certificate_is_checked(stack: Stack) -> None:
    """A certificate nginx cannot check is a 502, never the content: not signed by a CA it
    trusts (Debian's bundle by default), or not for the name nginx asked for (nginx 1.22 checks
    DNS names only: an origin given by IP address fails even with its CA). Signed by the CA
    given with --upstream-ca, for the origin's name: served."""
    work = stack.work / "tls"
    work.mkdir()
    cert_pem, key_pem = self_signed(dns_names=["localhost"], ips=["127.0.0.1"])
    cert, key = work / "origin.pem", work / "origin.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    auth = serve_auth(work, stack.home, stack.rules)
    with (
        procs.in_process_origin(Echo, "tls-origin", tls_echo_server(context)) as origin,
        started(auth),
    ):
        origin_port = urlsplit(origin).port
        doors = {
            # name: (--upstream, extra nginx-config args, what a client gets)
            "untrusted": (f"https://localhost:{origin_port}", [], 502),
            "by_address": (f"https://127.0.0.1:{origin_port}", ["--upstream-ca", str(cert)], 502),
            "trusted": (f"https://localhost:{origin_port}", ["--upstream-ca", str(cert)], 200),
        }
        ports = {name: procs.free_port() for name in doors}
        configs = "".join(
            door_config(stack.home, auth, upstream, ports[name], "--name", name, *args)
            for name, (upstream, args, _) in doors.items()
        )
        with running_nginx(work, configs):
            for name, (_, _, status) in doors.items():
                with client(f"http://127.0.0.1:{ports[name]}") as browser:
                    for path in ("/feed.xml", "/episodes/ep1.mp3"):
                        response = browser.get(path)
                        assert response.status_code == status, (name, path, response.text)
                        if status == 502:
                            assert b'"target"' not in response.content
                        else:
                            assert forwarded(response)[1] == path


# -- several serve-auth, several configs ------------------------------------------------------


def test_two_serve_auth_instances_behind_one_upstream_make_one_invoice_per_402(
    stack: Stack,
) -> None:
    """The verdict and the answer step of one request go to the same instance (the answer is
    held where it was decided): round robin sent the answer step to the other one, which
    judged the request again and made a second invoice."""
    work = stack.work / "two-instances"
    work.mkdir()
    first, second = (serve_auth(work, stack.home, stack.rules) for _ in range(2))
    with started(first, second):
        port = procs.free_port()
        config = door_config(stack.home, first, stack.origin, port)
        listed = f"    server 127.0.0.1:{first.port};\n"
        assert config.count(listed) == 1
        # As an operator adds the second instance to the printed upstream.
        config = config.replace(listed, listed + f"    server 127.0.0.1:{second.port};\n")
        with running_nginx(work, config), client(f"http://127.0.0.1:{port}") as door:
            before = len(procs.ledger_invoices(stack.home))
            for number in range(8):
                response = door.get(f"/bonus/two{number}.mp3")
                assert response.status_code == 402, response.text
                assert response.json()["service"] == "bonus"
            assert len(procs.ledger_invoices(stack.home)) == before + 8
            assert door.get("/feed.xml").status_code == 200


SHOP_RULES = """
services:
  - name: shop-{letter}
    match: {{path: "/{letter}/*"}}
    price_sat: 2
"""


def test_two_printed_configs_share_one_nginx_one_server_block_per_host(stack: Stack) -> None:
    """What to do instead of match.host (refused: nginx takes any Host): one config per host,
    each with its own --name, server_name, serve-auth and rules. Both go into one nginx."""
    work = stack.work / "two-configs"
    work.mkdir()
    rules_a, rules_b = work / "a.yaml", work / "b.yaml"
    rules_a.write_text(SHOP_RULES.format(letter="a"))
    rules_b.write_text(SHOP_RULES.format(letter="b"))
    auth_a, auth_b = serve_auth(work, stack.home, rules_a), serve_auth(work, stack.home, rules_b)
    port = procs.free_port()
    with started(auth_a, auth_b):
        configs = []
        for auth, name in ((auth_a, "shop_a"), (auth_b, "shop_b")):
            printed = door_config(stack.home, auth, stack.origin, port, "--name", name)
            hint = "# server_name example.com;"
            assert hint in printed
            configs.append(printed.replace(hint, f"server_name {name.replace('_', '-')}.test;"))
        # running_nginx runs `nginx -t` first: no upstream, map or variable defined twice.
        with running_nginx(work, "".join(configs)), client(f"http://127.0.0.1:{port}") as door:
            for host, priced, free in (
                ("shop-a.test", "/a/x", "/b/x"),
                ("shop-b.test", "/b/x", "/a/x"),
            ):
                challenge = door.get(priced, headers={"Host": host})
                assert challenge.status_code == 402, (host, challenge.text)
                assert challenge.json()["service"] == f"shop-{priced[1]}"
                passed = door.get(free, headers={"Host": host})
                assert passed.status_code == 200 and forwarded(passed)[1] == free, host


# -- the response phase ------------------------------------------------------------------------


def test_a_free_page_gets_the_upgrade_offer_and_the_marks(stack: Stack) -> None:
    nginx, proxy = stack.both("GET", "/episodes/show.html", headers={"Accept": HTML})
    assert nginx.status_code == proxy.status_code == 200
    assert nginx.text == proxy.text
    assert 'id="l402-upgrade"' in nginx.text and nginx.text.endswith("</div></body></html>")
    assert set(directives(nginx.headers["Vary"])) == set(directives(proxy.headers["Vary"]))
    assert "accept" in directives(nginx.headers["Vary"])
    # The origin was asked for an uncompressed page (sub_filter reads it as it comes).
    with stack.nginx() as door:
        seen = door.get(
            "/episodes/x.json", headers={"Accept": HTML, "Accept-Encoding": "gzip"}
        ).json()
    assert "Accept-Encoding" not in dict(seen["headers"])


def test_a_stale_cookie_on_the_free_variant_is_cleared_as_by_the_proxy(stack: Stack) -> None:
    headers = {"Cookie": "L402_podcast=AgEB:00; theme=dark"}
    nginx, proxy = stack.both("GET", "/episodes/ep1.mp3", headers=headers)
    assert nginx.status_code == proxy.status_code == 200
    assert nginx.headers.get_list("Set-Cookie") == proxy.headers.get_list("Set-Cookie")
    assert len(nginx.headers.get_list("Set-Cookie")) == 2
    assert forwarded(nginx)[2]["cookie", "theme=dark"] == 1


@pytest.mark.parametrize(
    "cache_control",
    [
        None,
        "",
        "public",
        "public, max-age=60",
        "max-age=60, s-maxage=600, public",
        "no-cache, Public, s-maxage=1, max-age=2",
        "s-maxage=5",
        "no-store",
        "Private, max-age=5",
        'private="Set-Cookie", public',
    ],
)
def test_a_paid_answer_is_kept_from_shared_caches_as_by_the_proxy(
    stack: Stack, cache_control: str | None
) -> None:
    token = stack.buy()
    query = "" if cache_control is None else "?" + str(httpx.QueryParams({"cc": cache_control}))
    nginx, proxy = stack.both("GET", f"/episodes/ep1.mp3{query}", headers={"Authorization": token})
    assert nginx.status_code == proxy.status_code == 200
    assert nginx.headers.get("Cache-Control") == proxy.headers.get("Cache-Control")


# -- the paywall page through nginx -------------------------------------------------------------


def test_the_paywall_pages_endpoints_work_through_nginx(stack: Stack) -> None:
    with stack.nginx() as door:
        page = door.get("/bonus/b2.mp3", headers={"Accept": HTML})
        assert page.status_code == 402
        challenge = parse_challenges(page.headers.get_list("WWW-Authenticate"))[0]
        claim = page.headers["Set-Cookie"].split(";", 1)[0]
        ask = {"macaroon": challenge.macaroon, "preimage": None}
        unpaid = door.post("/.l402/unlock", json=ask, headers={"Cookie": claim})
        assert unpaid.status_code == 202 and unpaid.json() == {"unlocked": False}
        paid = procs.cli(stack.home, "dev", "pay", challenge.invoice)
        assert paid.returncode == 0, paid.stderr
        unlocked = door.post("/.l402/unlock", json=ask, headers={"Cookie": claim})
        assert unlocked.status_code == 200 and unlocked.json()["unlocked"] is True
        cookie = unlocked.headers.get_list("Set-Cookie")[0].split(";", 1)[0]
        assert cookie.startswith("L402_bonus=")
        opened = door.get("/bonus/b2.mp3", headers={"Cookie": f"{cookie}; theme=dark"})
        assert opened.status_code == 200
        _, target, fields, _ = forwarded(opened)
        assert target == "/bonus/b2.mp3" and fields["cookie", "theme=dark"] == 1, opened.text
        # The pay page knows this browser paid already.
        again = door.get(
            "/.l402/pay?path=/bonus/b2.mp3", headers={"Cookie": cookie, "Accept": HTML}
        )
        assert again.status_code == 303 and again.headers["Location"] == "/bonus/b2.mp3"


@pytest.mark.parametrize(
    "path",
    [
        "/.l402/internal/auth",
        "/.l402/internal/answer",
        "/.l402/internal/paid",
        "/.l402/internal/endpoint",
        "/.l402/elsewhere",
        "/%2El402/internal/auth",
    ],
)
def test_the_services_own_paths_are_not_reachable_through_nginx(stack: Stack, path: str) -> None:
    with stack.nginx() as door:
        for method in ("GET", "POST"):
            response = door.request(method, path, headers={"Accept-Authenticate": "L402"})
            assert response.status_code in (404, 405), (method, response.status_code)
            assert not [name for name in response.headers if name.lower().startswith("x-l402")]


# -- revocations and the verdict cache ----------------------------------------------------------


def test_a_revoked_token_stops_working_at_nginx_within_the_poll_interval(stack: Stack) -> None:
    token = stack.buy()
    macaroon = token.split()[1].split(":")[0]
    identifier = Identifier.decode(decode_macaroon(macaroon).identifier_bytes)
    with stack.nginx() as door:
        assert door.get("/episodes/ep2.mp3", headers={"Authorization": token}).status_code == 200
        revoked = procs.cli(stack.home, "tokens", "revoke", identifier.payment_hash.hex())
        assert revoked.returncode == 0, revoked.stderr

        def refused() -> bool:
            response = door.get("/episodes/ep2.mp3", headers={"Authorization": token})
            return response.status_code == 402

        # The engine polls revocations every second; nginx keeps a paid verdict 1 s more.
        assert procs.wait_until(refused, timeout=10, interval=0.2)


def test_nginx_grants_a_repeated_paid_request_from_its_verdict_cache_and_nothing_else(
    stack: Stack, tmp_path: Path
) -> None:
    """With serve-auth gone, only what nginx kept still works: the paid request it granted
    (same URL, same credential). Another path, another credential, a challenge: 5xx."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        stack.rules.read_text()
        + "  - name: metered\n    match: {path: /metered/*}\n    price_sat: 5\n"
        "    rate_limits: [{requests: 10, per: 1h, key: token}]\n"
    )
    token = stack.buy()
    with (
        own_door(stack, rules, "verdicts", "--verdict-cache", "60") as (auth, door),
        client(door) as browser,
    ):
        granted = browser.get("/episodes/ep1.mp3", headers={"Authorization": token})
        assert granted.status_code == 200
        challenge = browser.get("/metered/x", headers={"Accept-Authenticate": "L402"})
        assert challenge.status_code == 402
        offer = parse_challenges(challenge.headers.get_list("WWW-Authenticate"))[0]
        metered = f"L402 {offer.macaroon}:{procs.dev_pay(stack.home, offer.invoice).hex()}"
        assert browser.get("/metered/x", headers={"Authorization": metered}).status_code == 200
        auth.stop()
        again = browser.get("/episodes/ep1.mp3", headers={"Authorization": token})
        assert again.status_code == 200
        assert json.loads(again.content)["target"] == "/adfree/ep1.mp3"
        assert again.headers["Cache-Control"].startswith("private")
        for path, headers in (
            ("/episodes/ep2.mp3", {"Authorization": token}),  # another URL
            ("/episodes/ep1.mp3", {"Authorization": token + "0"}),  # another credential
            ("/episodes/ep1.mp3", {"Authorization": token, "Cookie": "a=b"}),
            ("/bonus/b2.mp3", {}),  # a challenge is never kept
            ("/metered/x", {"Authorization": metered}),  # counted per request: never kept
        ):
            response = browser.get(path, headers=headers)
            assert response.status_code >= 500, (path, response.status_code)
            assert b'"target"' not in response.content


def test_a_cached_verdict_ends_before_the_token_does(stack: Stack) -> None:
    # A token with 4 s left (sold ones live an invoice expiry plus valid_for: minutes).
    token = procs.minted_credential(stack.home / "server.sqlite", "bonus", int(time.time()) + 4)
    with (
        own_door(stack, stack.rules, "short", "--verdict-cache", "60") as (_, door),
        client(door) as browser,
    ):
        assert browser.get("/bonus/b3.mp3", headers={"Authorization": token}).status_code == 200

        def expired() -> bool:
            response = browser.get("/bonus/b3.mp3", headers={"Authorization": token})
            return response.status_code == 402 and response.json()["reason"] == "expired"

        # Kept 60 s it would stay 200 that long; the verdict ends before the token does.
        assert procs.wait_until(expired, timeout=15, interval=0.25)


# -- failing closed -----------------------------------------------------------------------------


@contextlib.contextmanager
def own_door(
    stack: Stack, rules: Path, name: str, *config_args: str
) -> Iterator[tuple[procs.Process, str]]:
    """A second door on the same origin and home, for tests that break it (`config_args` go
    to nginx-config)."""
    work = stack.work / name
    work.mkdir()
    auth = serve_auth(work, stack.home, rules)
    with started(auth):
        port = procs.free_port()
        config = door_config(stack.home, auth, stack.origin, port, *config_args)
        with running_nginx(work, config):
            yield auth, f"http://127.0.0.1:{port}"


def test_the_auth_service_down_gives_5xx_and_never_content(stack: Stack) -> None:
    token = stack.buy()
    with own_door(stack, stack.rules, "down") as (auth, door), client(door) as browser:
        assert browser.get("/feed.xml").status_code == 200
        auth.stop()
        for path, headers in (
            ("/feed.xml", {}),
            ("/episodes/ep1.mp3", {"Authorization": token}),
            ("/bonus/b1.mp3", {}),
            ("/.l402/pay?path=/bonus/b1.mp3", {}),
        ):
            response = browser.get(path, headers=headers)
            assert response.status_code >= 500, (path, response.status_code)
            assert b'"target"' not in response.content


def test_a_header_uvicorn_refuses_never_lets_the_request_through(stack: Stack) -> None:
    """nginx takes a control character in a header value; the service's HTTP parser does not:
    the verdict fails, and nginx answers 500 rather than forwarding."""
    token = stack.buy().encode()
    for target, headers in (
        (b"/feed.xml", [b"Cookie: a=\x01b"]),
        (b"/episodes/ep1.mp3", [b"Authorization: " + token, b"X-Note: \x7f"]),
    ):
        raw = raw_get(stack.door, target, *headers)
        assert raw.startswith(b"HTTP/1.1 500") and b'"target"' not in raw, raw[:200]


def test_a_config_that_no_longer_carries_the_rules_headers_answers_503(stack: Stack) -> None:
    rules = stack.work / "reloaded.yaml"
    rules.write_text(RULES.replace("      set_headers: {X-L402-Tier: premium}\n", ""))
    with own_door(stack, rules, "stale") as (auth, door):
        with client(door) as browser:
            assert browser.get("/feed.xml").status_code == 200
            # The rules now set a header this config does not carry: a client's own
            # X-L402-Tier would pass it. Hot reloaded, so every request gets a 503 at once.
            rules.write_text(RULES)

            def stale() -> bool:
                return browser.get("/feed.xml").status_code == 503

            assert procs.wait_until(stale, timeout=10, interval=0.2)
            for path in ("/feed.xml", "/episodes/ep1.mp3", "/bonus/b1.mp3", "/.l402/pay"):
                response = browser.get(path, headers={"X-L402-Tier": "premium"})
                assert response.status_code == 503 and response.text.count("\n") == 1
                assert "X-L402-Tier".lower() in response.text and "nginx-config" in response.text
        assert auth.log().count("answering 503 to every request") == 1


def test_serve_auth_stops_cleanly_on_sigterm(stack: Stack) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        auth = serve_auth(stack.work, stack.home, stack.rules)
        with started(auth):
            assert auth.proc is not None
            auth.proc.send_signal(signum)
            assert auth.wait_exit(timeout=20) == 0
        assert "auth service stopped" in auth.log() and "Traceback" not in auth.log()
