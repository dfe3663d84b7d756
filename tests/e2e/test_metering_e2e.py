"""Bundles of bytes and units at the doors that see the answer (a real mitmdump, the ASGI door
under a real uvicorn), and the nginx door's refusal of them (`l402proxy serve-auth` and
`nginx-config` exit saying why).

The sample origin behind tests/e2e/doors.py's start_door serves the episodes (a player's Range
requests); tests/metering_origin.py serves an API that reports its usage in X-Usage and a live
stream that never listens for its client leaving. Tokens are minted with each door's own secret
(procs.minted_credential): nothing here is about paying.
"""

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.headers import parse_credential
from l402proxy.l402.token import inspect
from l402proxy.launch import started
from l402proxy.origin_asgi import EPISODES, episode_bytes
from l402proxy.store import open_server_store
from tests.metering_origin import CHUNK

from . import procs
from .doors import Door, DoorKind, start_door, uvicorn
from .nginx import serve_auth

pytestmark = pytest.mark.e2e

AUDIO_BYTES = 6500
API_UNITS = 100
RULES = f"""
services:
  - name: audio
    match: {{path: "/episodes/*"}}
    price_sat: 5
    bundle: {{bytes: {AUDIO_BYTES}}}
  - name: api
    match: {{path: "/api/*"}}
    price_sat: 3
    bundle: {{units: {API_UNITS}, usage_header: X-Usage}}
  - name: big
    match: {{path: "/big/*"}}
    price_sat: 3
    bundle: {{bytes: 1GB}}
"""
BIG_BYTES = 1_000_000_000
RANGE_SIZE = 1000
# A player never asks more than this many ranges of one token here: the bundle runs out first.
MAX_RANGES = 20
CHARGE_SECONDS = 30.0
# The origin's report sent twice, in lower case.
TWICE_LOWER_CASE = {"units": "30", "spelling": "x-usage", "twice": "1"}


@dataclass
class Metering:
    """A door in front of tests/metering_origin.py, and the process whose log is the door's."""

    door: Door
    process: procs.Process


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("metering-rules") / "metered.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module", params=["mitmproxy", "asgi"])
def kind(request: pytest.FixtureRequest) -> DoorKind:
    return request.param


@pytest.fixture(scope="module")
def podcast(
    kind: DoorKind, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    work = tmp_path_factory.mktemp(f"metering-{kind}-podcast")
    with start_door(kind, work, work / "home", rules) as door:
        yield door


@pytest.fixture(scope="module")
def metered(
    kind: DoorKind, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Metering]:
    """The door as start_door builds it, in front of tests/metering_origin.py instead."""
    work = tmp_path_factory.mktemp(f"metering-{kind}-api")
    home = work / "home"
    home.mkdir()
    store, ledger = home / "server.sqlite", home / "devledger.sqlite"
    if kind == "asgi":
        settings = {
            "L402PROXY_RULES": str(rules),
            "L402PROXY_STORE": str(store),
            "L402PROXY_DEV_LEDGER": str(ledger),
        }
        server = uvicorn(
            work, home, "tests.metering_origin:paywalled", env=settings, factory=True,
            name="metering-asgi-door",
        )  # fmt: skip
        with started(server):
            yield Metering(Door(kind, server.url, home, store, None, work), server)
        return
    origin = uvicorn(work, home, "tests.metering_origin:app", name="metering-origin")
    with started(origin):
        proxy = procs.server_proxy(
            work, home, work / "mitmproxy-conf", origin.url, rules,
            f"l402_store={store}", f"l402_dev_ledger={ledger}",
        )  # fmt: skip
        with started(proxy):
            yield Metering(Door(kind, proxy.url, home, store, origin.url, work), proxy)


def token(door: Door, service: str) -> tuple[str, bytes]:
    """A fresh token of `service` signed with the door's secret, and its id."""
    authorization = procs.minted_credential(door.store, service, int(time.time()) + 3600)
    macaroon = parse_credential(authorization).macaroons[0]
    return authorization, inspect(macaroon).identifier.token_id


def balance_in_store(door: Door, token_id: bytes) -> int | None:
    async def read() -> int | None:
        store = await open_server_store(str(door.store))
        try:
            return await store.balance_of(token_id)
        finally:
            await store.close()

    return asyncio.run(read())


def client(door: Door) -> httpx.Client:
    return httpx.Client(base_url=door.base_url, trust_env=False, timeout=procs.FETCH_TIMEOUT)


def assert_spent(response: httpx.Response, unit: str) -> None:
    """Wire fact 2: the 402 of an unpaid request, with the balance at 0 and why."""
    assert response.status_code == 402, (response.status_code, response.text[:300])
    assert response.headers["X-L402-Balance"] == f"0 {unit}"
    lines = response.headers.get_list("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"], lines
    assert "spent" in response.text


# -- bytes: a player's Range requests ------------------------------------------------------------


def test_a_player_ranges_through_a_bytes_bundle_until_it_is_spent(podcast: Door) -> None:
    """Each 206 costs its part; the one in flight when the balance runs out is served whole;
    the next gets the 402 for a new bundle."""
    authorization, token_id = token(podcast, "audio")
    left, got = AUDIO_BYTES, 0
    episodes = [(f"/episodes/{name}.mp3", episode_bytes("AD-SUPPORTED", name)) for name in EPISODES]
    offset = 0
    with client(podcast) as http:
        for _ in range(MAX_RANGES):
            path, body = episodes[0]
            wanted = f"bytes={offset}-{offset + RANGE_SIZE - 1}"
            answer = http.get(path, headers={"Authorization": authorization, "Range": wanted})
            if answer.status_code == 402:
                break
            assert answer.status_code == 206, (answer.status_code, answer.text[:300])
            part = body[offset : offset + RANGE_SIZE]
            assert answer.content == part
            left = max(left - len(part), 0)
            assert answer.headers["X-L402-Balance"] == f"{left} bytes"
            got += len(part)
            offset += RANGE_SIZE
            if offset >= len(body):  # on to the next episode, as a playlist does
                episodes, offset = episodes[1:] or episodes, 0
        else:
            pytest.fail(f"no 402 after {MAX_RANGES} ranges of a {AUDIO_BYTES}-byte bundle")
    assert_spent(answer, "bytes")
    assert left == 0 and got > AUDIO_BYTES  # the last range was served whole
    assert balance_in_store(podcast, token_id) == 0


def test_head_costs_nothing_and_a_get_its_body(podcast: Door) -> None:
    authorization, token_id = token(podcast, "audio")
    body = episode_bytes("AD-SUPPORTED", "ep2")
    with client(podcast) as http:
        head = http.head("/episodes/ep2.mp3", headers={"Authorization": authorization})
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(body))
        assert head.headers["X-L402-Balance"] == f"{AUDIO_BYTES} bytes"
        assert balance_in_store(podcast, token_id) == AUDIO_BYTES
        get = http.get("/episodes/ep2.mp3", headers={"Authorization": authorization})
        assert get.status_code == 200 and get.content == body
        assert get.headers["X-L402-Balance"] == f"{AUDIO_BYTES - len(body)} bytes"
        again = http.head("/episodes/ep2.mp3", headers={"Authorization": authorization})
        assert again.headers["X-L402-Balance"] == f"{AUDIO_BYTES - len(body)} bytes"
    assert balance_in_store(podcast, token_id) == AUDIO_BYTES - len(body)


def test_the_same_request_is_metered_every_time(podcast: Door) -> None:
    """The engine keeps verdicts for repeated requests; one kept for a metered token would be
    forwarded without its meter, for nothing, for ever."""
    authorization, _ = token(podcast, "audio")
    same = {"Authorization": authorization, "Range": f"bytes=0-{RANGE_SIZE - 1}"}
    balances = []
    with client(podcast) as http:
        for _ in range(MAX_RANGES):
            answer = http.get("/episodes/ep3.mp3", headers=same)
            if answer.status_code == 402:
                break
            balances.append(answer.headers["X-L402-Balance"])
    assert balances == [f"{max(AUDIO_BYTES - n * RANGE_SIZE, 0)} bytes" for n in range(1, 8)]
    assert_spent(answer, "bytes")


# -- bytes: a stream, and a client that hangs up -------------------------------------------------


def test_a_stream_is_charged_as_it_streamed(metered: Metering) -> None:
    door = metered.door
    authorization, token_id = token(door, "big")
    with client(door) as http:
        whole = http.get("/big/16", headers={"Authorization": authorization})
    assert whole.status_code == 200 and len(whole.content) == 16 * CHUNK
    assert "Content-Length" not in whole.headers
    assert whole.headers["X-L402-Balance"] == f"{BIG_BYTES} bytes"  # its size unknown up front
    # Charged before the stream's end reached the client.
    assert balance_in_store(door, token_id) == BIG_BYTES - 16 * CHUNK


def test_a_client_that_hangs_up_pays_for_what_it_got(metered: Metering) -> None:
    """64 MiB on offer, 1 MiB read, then the client is gone: the charge is what went out,
    within what the sockets between buffer (a few MiB on loopback), never the whole stream."""
    door = metered.door
    authorization, token_id = token(door, "big")
    offered, wanted = 1024 * CHUNK, 16 * CHUNK
    host, port = door.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=procs.FETCH_TIMEOUT) as sock:
        sock.sendall(
            f"GET /big/1024 HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n\r\n"
            .encode()
        )  # fmt: skip
        received = b""
        while b"\r\n\r\n" not in received or len(received) < wanted:
            chunk = sock.recv(65536)
            assert chunk, "the door closed the stream early"
            received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert head.startswith("HTTP/1.1 200") and f"x-l402-balance: {BIG_BYTES} bytes" in (
            head.lower()
        ), head
    charged = procs.wait_until(
        lambda: (balance_in_store(door, token_id) or BIG_BYTES) < BIG_BYTES, CHARGE_SECONDS
    )
    assert charged, f"nothing charged:\n{metered.process.log()[-2000:]}"
    spent = BIG_BYTES - (balance_in_store(door, token_id) or 0)
    assert wanted - CHUNK <= spent < offered // 2, (spent, offered)


# -- units: an API that reports what it used ---------------------------------------------------


def test_an_api_is_metered_by_the_units_it_reports(metered: Metering) -> None:
    door = metered.door
    authorization, token_id = token(door, "api")
    auth = {"Authorization": authorization}
    with client(door) as http:
        answers = [
            http.get("/api/search", params={"units": "30"}, headers=auth),
            http.get("/api/search", params=TWICE_LOWER_CASE, headers=auth),
            http.get("/api/search", params={"units": "0"}, headers=auth),
            http.get("/api/search", params={"units": "55"}, headers=auth),
        ]
        spent = http.get("/api/search", params={"units": "1"}, headers=auth)
    for answer in answers:
        assert answer.status_code == 200, (answer.status_code, answer.text[:300])
        assert "X-Usage" not in answer.headers, answer.headers  # the origin's report, never
        assert answer.json()["path"] == "/api/search"
    assert [a.headers["X-L402-Balance"] for a in answers] == [
        "70 units",
        "40 units",
        "40 units",
        "0 units",  # 55 asked of 40 left: served, and the balance stops at 0
    ]
    assert_spent(spent, "units")
    assert "X-Usage" not in spent.headers
    assert balance_in_store(door, token_id) == 0


def test_an_api_that_does_not_report_costs_one_unit_and_says_so(metered: Metering) -> None:
    door = metered.door
    authorization, token_id = token(door, "api")
    with client(door) as http:
        missing = http.get("/api/a", headers={"Authorization": authorization})
        garbage = http.get(
            "/api/b", params={"units": "lots"}, headers={"Authorization": authorization}
        )
    assert missing.status_code == garbage.status_code == 200
    assert missing.headers["X-L402-Balance"] == f"{API_UNITS - 1} units"
    assert garbage.headers["X-L402-Balance"] == f"{API_UNITS - 2} units"
    assert "X-Usage" not in garbage.headers
    assert balance_in_store(door, token_id) == API_UNITS - 2
    if door.kind != "mitmproxy":
        return  # the ASGI door logs as its host configures logging (uvicorn: not ours)
    logged = procs.wait_until(lambda: "'lots'" in metered.process.log(), CHARGE_SECONDS)
    log = metered.process.log()
    assert logged and "service 'api'" in log and "metered.yaml:7" in log, log[-2000:]
    assert "X-Usage header is missing" in log


# -- the nginx door: refused, saying why -----------------------------------------------------


def test_the_nginx_door_refuses_bytes_and_units_at_start(rules: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    auth = serve_auth(tmp_path, home, rules, "--store", str(home / "server.sqlite"))
    auth.start(wait=False)
    try:
        status = auth.wait_exit(timeout=60)
    finally:
        auth.stop()
    log = auth.log()
    assert status != 0, log
    reason = f"{rules}:3: service 'audio': bundle: bytes is not possible with the nginx door"
    assert reason in log and "auth_request" in log, log
    made = procs.cli(
        home, "nginx-config", "--rules", str(rules), "--upstream", "http://127.0.0.1:9"
    )
    assert made.returncode != 0 and reason in made.stderr, made.stderr
    assert len(made.stderr.strip().splitlines()) == 1, made.stderr
