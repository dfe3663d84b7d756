"""Ways around the paywall found by a red-team pass (issue 10), each against a real mitmdump.

1. An h2c upgrade on a free path: mitmproxy's own h2c guard (addons/disable_h2c.py) only
   strips `Upgrade: h2c` spelled in lower case; with `Upgrade: H2C` an origin that speaks h2c
   (Apache `Protocols h2c`, Go's h2c handler, Jetty, Tomcat) answers 101, mitmproxy turns the
   connection into a raw TCP tunnel (rawtcp is on by default), and every request on it reaches
   the origin without the paywall seeing it.
2. An absolute-form request target (`GET http://paid.example/h/x`) with another Host: with
   keep_host_header (which host: rules need) the proxy judges the Host header, the origin routes
   by the target's authority as RFC 9112 3.2.2 requires (nginx does), so a host-scoped rule is
   skipped.
3. A rules file with a host: match on a proxy without keep_host_header: in reverse mode
   mitmproxy rewrites Host to the origin before addons run, so the rule never matches and its
   content is free. The proxy starts anyway, without a word.

Requests are sent byte for byte over raw sockets; every loop is bounded in count and time.
"""

import contextlib
import http.server
import socket
import socketserver
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import pytest

from l402proxy.launch import started

from . import procs
from .test_options_e2e import stopped_without_serving

pytestmark = pytest.mark.e2e

SECRET = b"PRICED-SECRET-CONTENT"
FREE = b"FREE-CONTENT"
RAW_TIMEOUT = 10.0
MAX_READS = 200
MAX_RESPONSE = 1 << 20

PATH_RULES = """
services:
  - name: priced
    match: {path: "/priced/*"}
    price_sat: 50
  - name: hidden
    match: {path: "/adfree/*"}
    mode: deny
"""
HOST_RULES = """
services:
  - name: hosted
    match: {path: "/h/*", host: "paid.example"}
    price_sat: 7
"""


def body_for(path: str) -> tuple[int, bytes]:
    place = path.split("?", 1)[0]
    if place in ("/priced/secret.txt", "/adfree/secret.txt"):
        return 200, SECRET
    if place == "/free/open.txt":
        return 200, FREE
    return 404, b"not found\n"


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The bytes up to the blank line after the headers, and whatever came after them."""
    data = b""
    for _ in range(MAX_READS):
        if b"\r\n\r\n" in data or len(data) > MAX_RESPONSE:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


# -- 1. h2c upgrade ------------------------------------------------------------------------------


class H2cOrigin(socketserver.BaseRequestHandler):
    """An origin that accepts `Upgrade: h2c` (token compared in any case, as Go and Apache do)
    and then serves HTTP/2 on the same connection."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(RAW_TIMEOUT)
        head, rest = read_head(sock)
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return
        path = parts[1].decode("latin-1")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"upgrade", b"").lower() != b"h2c":
            status, body = body_for(path)
            sock.sendall(
                b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, len(body), body)
            )
            return
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        )
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_upgrade_connection(headers.get(b"http2-settings", b""))
        self.respond(conn, 1, *body_for(path))
        sock.sendall(conn.data_to_send())
        data = rest
        for _ in range(MAX_READS):
            for event in conn.receive_data(data) if data else ():
                if isinstance(event, h2.events.RequestReceived):
                    fields = {bytes(k): bytes(v) for k, v in event.headers}
                    self.respond(conn, event.stream_id, *body_for(fields[b":path"].decode()))
            sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return

    @staticmethod
    def respond(conn: h2.connection.H2Connection, stream: int, status: int, body: bytes) -> None:
        conn.send_headers(stream, [(":status", str(status)), ("content-length", str(len(body)))])
        conn.send_data(stream, body, end_stream=True)


class ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def h2c_origin() -> Iterator[str]:
    with procs.in_process_origin(H2cOrigin, "h2c-origin", ThreadingServer) as url:
        yield url


def through_h2c_upgrade(port: int, free: str, wanted: str, upgrade: str) -> bytes:
    """Upgrade a connection on `free`, then ask for `wanted` on it as an HTTP/2 stream; what
    came back for it (b"" when the upgrade was refused or nothing came)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT) as sock:
        sock.sendall(
            f"GET {free} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n".encode()
            + b"HTTP2-Settings: "
            + settings
            + b"\r\n\r\n"
        )
        head, rest = read_head(sock)
        if not head.startswith(b"HTTP/1.1 101"):
            return b""
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [(":method", "GET"), (":path", wanted), (":scheme", "http"), (":authority", "x")],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        got = b""
        data = rest
        deadline = time.monotonic() + RAW_TIMEOUT
        for _ in range(MAX_READS):
            done = False
            for event in conn.receive_data(data) if data else ():
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    got += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
            sock.sendall(conn.data_to_send())
            if done or time.monotonic() > deadline:
                break
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
        return got


@pytest.mark.parametrize("upgrade", ["h2c", "H2C", "H2c"])
@pytest.mark.parametrize("wanted", ["/priced/secret.txt", "/adfree/secret.txt"])
def test_an_h2c_upgrade_on_a_free_path_is_no_tunnel_past_the_paywall(
    tmp_path: Path, upgrade: str, wanted: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(PATH_RULES)
    with h2c_origin() as origin_url:
        # The origin really tunnels: asked directly, it serves the secret on stream 3.
        direct = urlsplit(origin_url).port
        assert direct is not None
        assert through_h2c_upgrade(direct, "/free/open.txt", wanted, upgrade) == SECRET
        proxy = procs.server_proxy(tmp_path, home, tmp_path / "conf", origin_url, rules)
        with started(proxy):
            got = through_h2c_upgrade(proxy.port, "/free/open.txt", wanted, upgrade)
    assert SECRET not in got, f"{wanted} came through an {upgrade} upgrade without paying"


# -- 2. and 3. host-scoped rules ------------------------------------------------------------------


class VirtualHosts(http.server.BaseHTTPRequestHandler):
    """Routes by the authority of an absolute-form target, else by Host (RFC 9112 3.2.2, as
    nginx does); only paid.example has the secret."""

    def do_GET(self) -> None:
        target = urlsplit(self.path)
        if target.scheme and target.netloc:
            host, path = target.hostname or "", target.path
        else:
            host, path = (self.headers.get("Host") or "").split(":")[0].lower(), self.path
        body = SECRET if host == "paid.example" and path == "/h/x" else b"not here\n"
        self.send_response(200 if body == SECRET else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class AnyHost(VirtualHosts):
    """A single-site origin: /h/x whatever the Host."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(SECRET)))
        self.end_headers()
        self.wfile.write(SECRET)


def raw(port: int, request: bytes) -> bytes:
    received = bytearray()
    deadline = time.monotonic() + RAW_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT) as sock:
        sock.sendall(request)
        for _ in range(MAX_READS):
            if len(received) > MAX_RESPONSE or time.monotonic() > deadline:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return bytes(received)


def test_an_absolute_form_target_is_judged_by_its_own_authority(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOST_RULES)
    with procs.in_process_origin(VirtualHosts, "vhosts-origin") as origin_url:
        proxy = procs.server_proxy(
            tmp_path, home, tmp_path / "conf", origin_url, rules, "keep_host_header=true"
        )
        with started(proxy):
            plain = raw(
                proxy.port,
                b"GET /h/x HTTP/1.1\r\nHost: paid.example\r\nConnection: close\r\n\r\n",
            )
            assert plain.startswith(b"HTTP/1.1 402 "), plain[:200]
            answer = raw(
                proxy.port,
                b"GET http://paid.example/h/x HTTP/1.1\r\nHost: other.example\r\n"
                b"Connection: close\r\n\r\n",
            )
    assert SECRET not in answer, answer[:300]


def test_host_rules_are_never_silently_off_without_keep_host_header(tmp_path: Path) -> None:
    """The proxy refuses to start, with one line saying keep_host_header is needed, and never
    answers meanwhile: never a running proxy that gives the host's content away."""
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOST_RULES)
    with procs.in_process_origin(AnyHost, "any-host-origin") as origin_url:
        proxy = procs.server_proxy(
            tmp_path, home, tmp_path / "conf", origin_url, rules, "termlog_verbosity=warn"
        )
        lines = stopped_without_serving(proxy)
    assert len(lines) == 1 and "add --set keep_host_header=true" in lines[0], lines
