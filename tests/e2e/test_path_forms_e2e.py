"""Encoded and ambiguous request paths through a real mitmdump, in front of real origins that
read paths their own way: Werkzeug routing (Flask), Python's http.server, aiohttp's static files
and nginx. Whatever the spelling, priced content never comes back without paying for it (nor
with a cheaper service's token), and the plain paid path still works.

The forms are sent byte for byte over a raw socket: HTTP client libraries would normalise them.
"""

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from l402proxy.l402.headers import parse_challenges
from l402proxy.launch import started

from . import procs
from .nginx import nginx_origin

pytestmark = pytest.mark.e2e

PRICED = b"PRICED-SECRET-CONTENT"
CHEAP = b"CHEAP-CONTENT"
FREE = b"FREE-CONTENT"
RULES = """
services:
  - name: priced
    match: {path: "/priced/*"}
    price_sat: 50
  - name: cheap
    match: {path: "/cheap/*"}
    price_sat: 1
"""
RAW_TIMEOUT = 15.0
MAX_RESPONSE = 1 << 20
REFUSALS = (b"ambiguous request path: ", b"malformed request path: ")

# What the proxy does with each spelling, whatever the origin: "400" refused (ambiguous or
# malformed, never forwarded), "402" priced (the strict reading falls under a priced rule and
# every other reading agrees), "pass" forwarded (no reading is priced; the origin answers).
FORMS: list[tuple[bytes, str]] = [
    (b"/priced/secret.txt", "402"),
    (b"/priced/secret.txt?x=%2F..%2Ffree", "402"),
    # Encoded slashes: origins that decode them route to the priced file.
    (b"/priced%2Fsecret.txt", "400"),
    (b"/priced%2fsecret.txt", "400"),
    (b"/free/..%2Fpriced/secret.txt", "400"),
    (b"/free/..%2fpriced%2fsecret.txt", "400"),
    (b"/free%2F..%2Fpriced%2Fsecret.txt", "400"),
    (b"/free/x/..%2F..%2Fpriced/secret.txt", "400"),
    (b"/free/%2e%2e%2Fpriced/secret.txt", "400"),
    # Encoded dots: resolved by some origins, routed as they are by others (Werkzeug).
    (b"/free/%2E%2E/priced/secret.txt", "400"),
    (b"/free/.%2e/priced/secret.txt", "400"),
    (b"/priced/%2e%2e/free/open.txt", "400"),
    # Escapes of unreserved characters only: one reading.
    (b"/%70riced/secret%2Etxt", "402"),
    # Backslashes, raw and encoded.
    (b"/free/..%5Cpriced/secret.txt", "400"),
    (b"/free/..%5cpriced%5csecret.txt", "400"),
    (b"/free\\..\\priced\\secret.txt", "400"),
    (b"/priced\\secret.txt", "400"),
    # Path parameters (Tomcat drops them: `..;` is `..`).
    (b"/free/..;/priced/secret.txt", "400"),
    (b"/priced;x/secret.txt", "400"),
    (b"/priced/secret.txt;x", "402"),
    (b"/free;x/../priced/secret.txt", "400"),
    # Double encoding.
    (b"/priced%252Fsecret.txt", "400"),
    (b"/free/..%252Fpriced%252Fsecret.txt", "400"),
    (b"/free/%252E%252E/priced/secret.txt", "400"),
    # Raw dot segments (clients resolve them before sending; Werkzeug routes them unresolved).
    (b"/./priced/secret.txt", "400"),
    (b"/free/../priced/secret.txt", "400"),
    (b"/priced/../free/open.txt", "400"),
    (b"/priced//../free/open.txt", "400"),
    (b"/priced/secret.txt/.", "402"),
    # Doubled slashes alone: merged by every reading.
    (b"//priced/secret.txt", "402"),
    (b"/priced//secret.txt", "402"),
    # Case: these origins tell /PRICED from /priced (so do the rules).
    (b"/PRICED/secret.txt", "pass"),
    (b"/Priced/Secret.txt", "pass"),
    # Not well-formed: refused whatever they would mean.
    (b"/free/..%c0%afpriced/secret.txt", "400"),
    (b"/free/%c0%ae%c0%ae/priced/secret.txt", "400"),
    (b"/free/%e0%80%afx", "400"),
    (b"/free/%zz/../../priced/secret.txt", "400"),
    (b"/priced/secret.txt%", "400"),
    (b"/priced/secret.txt%00", "400"),
    (b"/priced/secret.txt%00.html", "400"),
    (b"/free/%0a/../priced/secret.txt", "400"),
    (b"/free/%2500/x", "400"),
    (b"/free/\xe9", "400"),
    (b"/priced/secret.txt#x", "400"),
    # A cheaper service's place as a way in.
    (b"/cheap/..%2Fpriced/secret.txt", "400"),
    (b"/cheap/%2e%2e%2fpriced%2fsecret.txt", "400"),
    (b"/cheap/..;/priced/secret.txt", "400"),
    (b"/priced/%2e%2e/cheap/c.txt", "400"),
    (b"/priced/../cheap/c.txt", "400"),
    (b"/cheap/c.txt", "402"),
    # Free places in every spelling keep working.
    (b"/free/open.txt", "pass"),
    (b"/free%2Fopen.txt", "pass"),
    (b"/free/%6Fpen.txt", "pass"),
    (b"/free/caf%C3%A9.txt", "pass"),
    (b"/free/caf\xc3\xa9.txt", "pass"),
    (b"/free/a;b/../open.txt", "pass"),
]


@dataclass(frozen=True)
class Stack:
    kind: str
    proxy: procs.Process
    home: Path
    priced_token: str
    cheap_token: str


def docroot(path: Path) -> Path:
    for name, body in (
        ("priced/secret.txt", PRICED),
        ("cheap/c.txt", CHEAP),
        ("free/open.txt", FREE),
        ("free/café.txt", FREE),
    ):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(body + b"\n")
    return path


# -- the origins --------------------------------------------------------------------------------


@contextlib.contextmanager
def werkzeug_origin(root: Path) -> Iterator[str]:
    """Routing as a Flask app does it: each area is a handler, whatever the rest of the path."""
    from werkzeug.exceptions import HTTPException
    from werkzeug.routing import Map
    from werkzeug.routing import Rule as Route
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    bodies = {"priced": PRICED, "cheap": CHEAP, "free": FREE}
    routes = Map([Route(f"/{area}/<path:rest>", endpoint=area) for area in bodies])

    @Request.application  # type: ignore[misc]
    def app(request: Request) -> Response | HTTPException:
        try:
            area, _ = routes.bind_to_environ(request.environ).match()
        except HTTPException as exc:
            return exc
        return Response(bodies[area] + b"\n", content_type="text/plain")

    with procs.serving(make_server("127.0.0.1", 0, app, threaded=True), "werkzeug-origin") as port:
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def http_server_origin(root: Path) -> Iterator[str]:
    import http.server

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    with procs.in_process_origin(Files, "http.server-origin") as url:
        yield url


@contextlib.contextmanager
def aiohttp_origin(root: Path) -> Iterator[str]:
    """aiohttp's static files, on an event loop of their own in a thread."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_static("/", root)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    port = procs.free_port()
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, name="aiohttp-origin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


ORIGINS: dict[str, Callable[[Path], contextlib.AbstractContextManager[str]]] = {
    "werkzeug": werkzeug_origin,
    "http.server": http_server_origin,
    "aiohttp": aiohttp_origin,
    "nginx": nginx_origin,
}


# -- the proxy and what it sells ----------------------------------------------------------------


def buy(proxy: procs.Process, home: Path, path: str) -> str:
    """An Authorization value for the service that prices `path`."""
    response = httpx.get(proxy.url + path, timeout=procs.FETCH_TIMEOUT, trust_env=False)
    assert response.status_code == 402, response.text
    challenge = parse_challenges(response.headers.get_list("WWW-Authenticate"))[0]
    preimage = procs.dev_pay(home, challenge.invoice)
    return f"L402 {challenge.macaroon}:{preimage.hex()}"


@pytest.fixture(scope="module", params=list(ORIGINS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    kind: str = request.param
    work = tmp_path_factory.mktemp(f"paths-{kind.replace('.', '-')}")
    home = work / "home"
    home.mkdir()
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    root = docroot(work / "www")
    with ORIGINS[kind](root) as origin_url:
        proxy = procs.server_proxy(work, home, work / "conf", origin_url, rules)
        with started(proxy):
            yield Stack(
                kind,
                proxy,
                home,
                buy(proxy, home, "/priced/secret.txt"),
                buy(proxy, home, "/cheap/c.txt"),
            )


def raw_get(port: int, target: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `target` exactly as given; (status, the whole raw response)."""
    lines = [b"GET " + target + b" HTTP/1.1", f"Host: 127.0.0.1:{port}".encode()]
    lines += [f"{name}: {value}".encode() for name, value in (headers or {}).items()]
    lines.append(b"Connection: close")
    received = bytearray()
    deadline = time.monotonic() + RAW_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=RAW_TIMEOUT) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        while len(received) < MAX_RESPONSE and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status_line = bytes(received).split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2 and status_line[1].isdigit(), (target, bytes(received[:200]))
    return int(status_line[1]), bytes(received)


def test_no_spelling_reaches_priced_content_without_paying_for_it(stack: Stack) -> None:
    wrong: list[str] = []
    for target, expected in FORMS:
        for who, headers in (
            ("anonymous", {}),
            ("opted-in", {"Accept-Authenticate": "L402"}),
            ("cheap token", {"Authorization": stack.cheap_token}),
        ):
            status, raw = raw_get(stack.proxy.port, target, headers)
            body = raw.partition(b"\r\n\r\n")[2]
            # The proxy's own refusal, not an origin's 400 (aiohttp refuses raw UTF-8 itself).
            refused = status == 400 and body.startswith(REFUSALS)
            problems = []
            if PRICED in body:
                problems.append("PRICED CONTENT")
            if CHEAP in body and who != "cheap token":
                problems.append("cheap content unpaid")
            if expected == "400" and not refused:
                problems.append("not refused")
            # A cheap token on a priced place: 401/402; on the cheap place it pays.
            priced_answers = (401, 402) if who == "cheap token" else (402,)
            cheap_paid = who == "cheap token" and status == 200 and CHEAP in body
            if expected == "402" and status not in priced_answers and not cheap_paid:
                problems.append("not priced")
            if expected == "pass" and (refused or status in (401, 402)):
                problems.append("not forwarded")
            if expected == "pass" and status == 200 and FREE not in body:
                problems.append("200 without the free content")
            if problems:
                wrong.append(f"{target!r} ({who}): {status} {', '.join(problems)}")
    assert not wrong, f"{stack.kind}:\n" + "\n".join(wrong)


def test_the_plain_paid_path_still_works(stack: Stack) -> None:
    status, raw = raw_get(
        stack.proxy.port, b"/priced/secret.txt", {"Authorization": stack.priced_token}
    )
    assert status == 200 and PRICED in raw, raw[:300]
    status, raw = raw_get(stack.proxy.port, b"/cheap/c.txt", {"Authorization": stack.cheap_token})
    assert status == 200 and CHEAP in raw, raw[:300]
    # An unambiguous encoded spelling of a paid place is sold like the plain one.
    status, raw = raw_get(
        stack.proxy.port, b"/priced/secret%2Etxt", {"Authorization": stack.priced_token}
    )
    assert status == 200 and PRICED in raw, raw[:300]


def test_refusals_are_one_plain_line(stack: Stack) -> None:
    status, raw = raw_get(stack.proxy.port, b"/free/..%2Fpriced/secret.txt")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert status == 400
    assert b"text/plain" in head and b"WWW-Authenticate" not in head
    assert body.startswith(b"ambiguous request path: ") and body.count(b"\n") == 1, body
