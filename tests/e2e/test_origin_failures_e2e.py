"""An origin that is down or hangs, behind a real mitmdump in reverse mode.

Down (its port closed): every forwarded request gets a 502 with one plain line, and priced paths
still get their 402, which never needs the origin. Hung (it accepts, or not even that, and never
answers): a 504 once `l402_upstream_timeout` passes, instead of a connection held for minutes.
Only that an answer comes is asserted, within a generous client timeout, never how fast.
"""

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from l402proxy.launch import started

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
UPSTREAM_TIMEOUT = 2
CLIENT_TIMEOUT = 60.0  # far above UPSTREAM_TIMEOUT: only says that an answer came at all


@contextlib.contextmanager
def silent_origin(accept: bool) -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that never answers: it accepts and holds connections
    (`accept`), or never accepts, with its backlog full so that connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0 if not accept else 16)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():  # bounded by `stop`, checked every 0.1 s
            ready, _, _ = select.select([listener], [], [], 0.1)
            if ready:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=hold, name="silent origin", daemon=True)
    if accept:
        thread.start()
    else:
        # Fill the accept queue (never drained): further SYNs are dropped, connects hang.
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            held.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        if accept:
            thread.join(timeout=10)
        for connection in held:
            connection.close()
        listener.close()


@contextlib.contextmanager
def proxy_in_front_of(
    origin_url: str, tmp_path_factory: pytest.TempPathFactory, confdir: Path
) -> Iterator[procs.Process]:
    work = tmp_path_factory.mktemp("origin-failures")
    home = work / "home"
    home.mkdir()
    proxy = procs.server_proxy(
        work,
        home,
        confdir,
        origin_url,
        PODCAST_RULES,
        f"l402_upstream_timeout={UPSTREAM_TIMEOUT}",
    )
    with started(proxy):
        yield proxy


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory, confdir: Path) -> Iterator[procs.Process]:
    closed_port = procs.free_port()  # nothing listens there
    with proxy_in_front_of(f"http://127.0.0.1:{closed_port}", tmp_path_factory, confdir) as proxy:
        yield proxy


def get(proxy: procs.Process, path: str, method: str = "GET", **headers: str) -> httpx.Response:
    return httpx.request(
        method, proxy.url + path, headers=headers, timeout=CLIENT_TIMEOUT, trust_env=False
    )


def assert_plain_line(response: httpx.Response, status: int, head: bool = False) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    if head:
        assert response.content == b""
        return
    text = response.text
    assert text.endswith("\n") and "\n" not in text[:-1], text  # one line
    assert "127.0.0.1" not in text and "Errno" not in text  # nothing about the origin's address


def test_an_origin_that_is_down_gives_a_plain_502(down: procs.Process) -> None:
    response = get(down, "/feed.xml")
    assert_plain_line(response, 502)
    assert response.text.startswith("Bad gateway")
    assert_plain_line(get(down, "/feed.xml", method="HEAD"), 502, head=True)
    # A keep-alive client: every request is answered, none hangs or gets an empty reply.
    with httpx.Client(timeout=CLIENT_TIMEOUT, trust_env=False) as client:
        for _ in range(3):
            assert client.get(down.url + "/episodes/ep1.mp3").status_code == 502


def test_priced_paths_still_get_their_402_while_the_origin_is_down(down: procs.Process) -> None:
    response = get(down, "/episodes/ep1.mp3", **{"Accept-Authenticate": "L402"})
    assert response.status_code == 402
    assert len(response.headers.get_list("WWW-Authenticate")) == 2
    # The paywall's own pages need no origin either.
    page = get(down, "/.l402/pay?path=/episodes/ep1.mp3", Accept="text/html")
    assert page.status_code == 402 and "lnbcrt" in page.text


@pytest.mark.parametrize("accept", [True, False], ids=["accepts", "never-accepts"])
def test_an_origin_that_never_answers_gives_a_504(
    tmp_path_factory: pytest.TempPathFactory, confdir: Path, accept: bool
) -> None:
    with (
        silent_origin(accept) as origin_url,
        proxy_in_front_of(origin_url, tmp_path_factory, confdir) as proxy,
    ):
        response = get(proxy, "/feed.xml")
        assert_plain_line(response, 504)
        assert response.text.startswith("Gateway timeout")
        assert f"within {UPSTREAM_TIMEOUT} seconds" in response.text
        assert_plain_line(get(proxy, "/feed.xml", method="HEAD"), 504, head=True)
        # The proxy is not stuck: the paywall still answers at once.
        challenge = get(proxy, "/episodes/ep1.mp3", **{"Accept-Authenticate": "L402"})
        assert challenge.status_code == 402


def test_a_bad_upstream_timeout_is_refused_at_start(
    tmp_path_factory: pytest.TempPathFactory, confdir: Path
) -> None:
    work = tmp_path_factory.mktemp("bad-timeout")
    home = work / "home"
    home.mkdir()
    proxy = procs.server_proxy(
        work, home, confdir, "http://127.0.0.1:1", PODCAST_RULES, "l402_upstream_timeout=-5"
    )
    proxy.start(wait=False)
    try:
        assert proxy.wait_exit() != 0
    finally:
        proxy.stop()
    assert "l402_upstream_timeout: must be 1 to 3600 seconds, or 0 for no limit" in proxy.log()
