"""The ASGI door under a real uvicorn: Starlette's and FastAPI's add_middleware, the lifespan
(the paywall opens before the app's own startup and closes at shutdown, a startup failure makes
uvicorn exit), the lazy open without a lifespan, and a WebSocket handshake refused with the 402.

What every door does alike (the 402 shape, variants, tokens) is tests/e2e/test_doors_behaviour.py.
"""

import socket
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.headers import parse_challenges

from . import procs

pytestmark = pytest.mark.e2e

API_RULES = procs.REPO / "rules" / "api.yaml"
OPTED_IN = {"Accept-Authenticate": "L402"}
READ_SECONDS = 20.0

# The app module uvicorn imports: a Starlette or a FastAPI app that says what reached it, with
# a lifespan that tells whether the paywall's store was open before the app's own startup.
APP_SOURCE = """
import contextlib
import os
from pathlib import Path

from l402proxy.asgi import L402Middleware

STORE = os.environ.get("STORE") or str(Path(os.environ["L402PROXY_HOME"]) / "server.sqlite")


@contextlib.asynccontextmanager
async def lifespan(app):
    print(f"app startup: store open={Path(STORE).exists()}", flush=True)
    yield
    print("app shutdown", flush=True)


def said(path, headers):
    return f"path={path} tier={headers.get('x-l402-tier')} auth={headers.get('authorization')}"


if os.environ["FRAMEWORK"] == "fastapi":
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI(lifespan=lifespan)

    @app.get("/{path:path}", response_class=PlainTextResponse)
    async def anything(path: str, request: Request) -> str:
        return said(request.url.path, request.headers)
else:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def anything(request):
        return PlainTextResponse(said(request.url.path, request.headers))

    app = Starlette(routes=[Route("/{path:path}", anything)], lifespan=lifespan)

app.add_middleware(
    L402Middleware,
    rules=os.environ["RULES"],
    store=os.environ.get("STORE"),
    dev_ledger=os.environ.get("LEDGER"),
)
"""


def uvicorn_app(
    workdir: Path, home: Path, framework: str, *uvicorn_args: str, **env: str
) -> procs.Process:
    """uvicorn serving the app module as a user runs it (`python -m uvicorn module:app`)."""
    app_dir = workdir / "app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "paid_app.py").write_text(textwrap.dedent(APP_SOURCE))
    port = procs.free_port()
    environment = procs.env_with_home(home) | {
        "FRAMEWORK": framework,
        "RULES": str(API_RULES),
        **env,
    }
    command = [
        sys.executable, "-m", "uvicorn", "paid_app:app",
        "--app-dir", str(app_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", *uvicorn_args,
    ]  # fmt: skip
    return procs.Process(
        name=f"uvicorn ({framework})",
        command=command,
        port=port,
        log_path=workdir / f"uvicorn-{framework}-{port}.log",
        env=environment,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def buy(home: Path, response: httpx.Response) -> str:
    assert response.status_code == 402, response.text
    challenge = parse_challenges(response.headers.get_list("WWW-Authenticate"))[0]
    preimage = procs.dev_pay(home, challenge.invoice)
    return f"L402 {challenge.macaroon}:{preimage.hex()}"


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_add_middleware_under_uvicorn_answers_402_then_200_once_paid(
    tmp_path: Path, home: Path, framework: str
) -> None:
    """The paywall opens in the lifespan, before the app's own startup; a priced call gets the
    402, the dev ledger pays it, the call then reaches the app with the paid variant's header
    and without our credential; SIGINT closes the paywall and uvicorn exits cleanly."""
    server = uvicorn_app(tmp_path, home, framework).start()
    try:
        assert "app startup: store open=True" in server.log()
        url = f"{server.url}/api/premium/quote"
        with httpx.Client(timeout=READ_SECONDS, trust_env=False) as client:
            challenged = client.get(url, headers=OPTED_IN)
            lines = challenged.headers.get_list("WWW-Authenticate")
            assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
            assert challenged.headers["Cache-Control"] == "no-store"
            assert int(challenged.headers["Content-Length"]) == len(challenged.content)
            token = buy(home, challenged)
            paid = client.get(url, headers={"Authorization": token, "X-L402-Tier": "forged"})
            assert paid.status_code == 200, paid.text
            assert paid.text == "path=/api/premium/quote tier=premium auth=None"
            assert paid.headers["Cache-Control"] == "private"
            free = client.get(f"{server.url}/api/health", headers={"X-L402-Tier": "premium"})
            assert free.text == "path=/api/health tier=None auth=None"
        assert (home / "server.sqlite-wal").exists()  # the store is open while serving
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0, server.log()
    assert "app shutdown" in server.log()
    # SQLite removes the write-ahead log when its last connection closes cleanly.
    assert not (home / "server.sqlite-wal").exists(), server.log()


@pytest.mark.parametrize("broken", ["STORE", "LEDGER"])
def test_a_store_or_backend_that_cannot_open_makes_uvicorn_exit(
    tmp_path: Path, home: Path, broken: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    server = uvicorn_app(tmp_path, home, "starlette", **{broken: str(blocker / "x.sqlite")})
    server.start(wait=False)
    try:
        status = server.wait_exit(timeout=60)
    finally:
        server.kill()
    log = server.log()
    assert status != 0, log
    expected = "cannot open token store" if broken == "STORE" else "cannot use the invoice backend"
    # uvicorn prints the lifespan.startup.failed message as one error line.
    reason = [line for line in log.splitlines() if "l402: " in line]
    assert len(reason) == 1 and reason[0].startswith("ERROR:"), log
    assert expected in reason[0], log
    assert "app startup" not in log  # the app's own startup never ran


def test_broken_rules_stop_uvicorn_with_lifespan_on(tmp_path: Path, home: Path) -> None:
    """add_middleware builds the middleware on the app's first call, the lifespan startup:
    with --lifespan on uvicorn exits on the rules error, which names file and line (with
    the default "auto" it would take the error for "no lifespan support" and answer 500)."""
    broken = tmp_path / "rules.yaml"
    broken.write_text("services:\n  - name: a b\n    match: {path: /x}\n    price_sat: 1\n")
    server = uvicorn_app(tmp_path, home, "fastapi", "--lifespan", "on", RULES=str(broken))
    server.start(wait=False)
    try:
        status = server.wait_exit(timeout=60)
    finally:
        server.kill()
    assert status != 0, server.log()
    assert f"RulesError: {broken}:2: invalid service name 'a b'" in server.log()


def test_without_a_lifespan_the_paywall_opens_on_the_first_request(
    tmp_path: Path, home: Path
) -> None:
    server = uvicorn_app(tmp_path, home, "starlette", "--lifespan", "off").start()
    try:
        assert not (home / "server.sqlite").exists()
        response = httpx.get(
            f"{server.url}/api/quotes/BTC", headers=OPTED_IN, timeout=READ_SECONDS, trust_env=False
        )
        assert response.status_code == 402
        assert (home / "server.sqlite").exists()
    finally:
        server.stop()


def test_a_websocket_handshake_gets_the_402(tmp_path: Path, home: Path) -> None:
    """uvicorn lets the door answer a refused handshake with an HTTP response: the client sees
    the same 402 (both challenge lines) as for a GET."""
    server = uvicorn_app(tmp_path, home, "starlette").start()
    try:
        handshake = (
            b"GET /api/premium/live HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=READ_SECONDS) as sock:
            sock.sendall(handshake)
            received = b""
            while b"\r\n\r\n" not in received and len(received) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        assert head.startswith("http/1.1 402"), head
        assert head.count("\r\nwww-authenticate: ") == 2
    finally:
        server.stop()
