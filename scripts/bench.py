"""Benchmark the addons against bare mitmdump, measured in the same run on the same origin.

Server scenarios (each against bare `mitmdump --mode reverse` serving the same origin response):
  paid       requests with a valid token (cached verification, path rewrite to the ad-free file)
  challenge  requests that draw a fresh 402 (invoice from the dev ledger + a new macaroon)
and micro-benchmarks of token verification (uncached) and the cached gate decision.

Client scenarios (the paying forward proxy, `mitmdump -s addons/client.py`):
  client-pass        requests that need no payment, against bare `mitmdump` in regular mode
                     forwarding the same absolute-form requests to the same origin
  client-first-paid  sequential fetches through client proxy -> server proxy -> origin, each of a
                     URL in a service not paid yet (one dev-wallet payment each), paired with
                     unpaid fetches through the same chain: the latency a first payment adds

Door scenarios (the same engine through its other front doors, each against the bare thing):
  asgi-paid, asgi-challenge    L402Middleware around the sample ASGI origin under uvicorn, against
                               the bare app under the same uvicorn
  nginx-paid, nginx-challenge  nginx + `l402proxy serve-auth` (auth_request) against bare nginx
                               proxying the same origin; the 402 also against the mitmproxy door

Store scenario (no HTTP, no proxy; a few seconds):
  store-draw  one bundle draw (TokenStore.draw, awaited on the request path of a bundle token)
              after another, on the SQLite store (a temp file) and on PostgreSQL (a throwaway
              cluster started like the tests' tests/postgres.py, with fsync and synchronous
              commit on as in production; skipped when the server binaries are missing)

Numbers are ratios to the bare thing measured in this run; absolute numbers depend on the machine.
Run with scripts/bench (it sets up the environment; wrk is used when installed);
--scenarios picks some of them (e.g. --scenarios client).
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from l402proxy import gate
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import caveats_for, derive_root_key, mint, verify
from l402proxy.launch import (
    REPO,
    Process,
    client_proxy_command,
    env_with_home,
    free_port,
    nginx_binary,
    nginx_process,
    origin_command,
    server_proxy_command,
    started,
)
from l402proxy.lightning.dev import DevLedger
from l402proxy.rules import load_rules

PODCAST_RULES = REPO / "rules" / "podcast.yaml"
SERVER_SCENARIOS = ("paid", "challenge")
DOOR_SCENARIOS = ("asgi-paid", "asgi-challenge", "nginx-paid", "nginx-challenge")
CLIENT_SCENARIOS = ("client-pass", "client-first-paid")
STORE_SCENARIOS = ("store-draw",)
SCENARIOS = SERVER_SCENARIOS + DOOR_SCENARIOS + CLIENT_SCENARIOS + STORE_SCENARIOS
# Ratio to the bare thing (mitmdump, the bare ASGI app, bare nginx), at least.
TARGETS = {
    "paid": 0.95,
    "challenge": 0.80,
    "asgi-paid": 0.90,
    "asgi-challenge": 0.50,
    "nginx-paid": 0.70,
    "nginx-challenge": 0.0,  # its target is against the mitmproxy door: MITM_TARGETS
    "client-pass": 0.95,
}
# nginx's 402 at least as fast as the mitmproxy door's, measured beside it.
MITM_TARGETS = {"nginx-challenge": 1.0}
FIRST_PAID_TARGET_MS = 50.0  # p50 of (first paid fetch - unpaid fetch)
STORE_DRAW_TARGET_MS = 1.0  # p50 of one draw from a bundle
STORE_DRAW_TOKENS = 100  # bundle tokens drawn from in turn; their first draws insert their rows
STORE_DRAWS = 3000  # draws timed per store, at most ...
STORE_DRAW_SECONDS = 2.0  # ... and for at most this long
FIRST_PAID_TIME_LIMIT = 180.0  # seconds for all the sequential fetches of client-first-paid
FETCH_TIMEOUT = 30.0  # one fetch through the proxies; the client gives up paying before that
CLIENT_PAY_TIMEOUT = 20


@dataclass
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # a challenge run is all 402s by design


class LoadGenerator(Protocol):
    def __call__(
        self,
        url: str,
        headers: dict[str, str],
        seconds: int,
        connections: int,
        proxy: str | None = None,
    ) -> Result: ...


def authority(url: str) -> str:
    return urlsplit(url).netloc


def parse_wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip()).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    url: str, headers: dict[str, str], seconds: int, connections: int, proxy: str | None = None
) -> Result:
    """wrk against url; with proxy, wrk talks to the proxy and asks it for url (absolute form)."""
    with tempfile.TemporaryDirectory(prefix="l402bench-wrk-") as tmp:
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
        if proxy is not None:
            # wrk connects to the host of the URL it is given and sends wrk.path as the request
            # target, so an absolute URI there is a forward-proxy request (RFC 9112 3.2.2).
            script = Path(tmp) / "proxy.lua"
            script.write_text(f"wrk.path = {json.dumps(url)}\n")  # a JSON string is Lua too
            command += ["-s", str(script)]
            headers = {"Host": authority(url), **headers}
            url = proxy + "/"
        command.append(url)
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(
        rate,
        parse_wrk_ms(latency["50"]),
        parse_wrk_ms(latency["99"]),
        int(non_2xx.group(1)) if non_2xx else 0,
    )


async def _one_connection(
    host: str, port: int, request: bytes, deadline: float, limit: int, latencies: list[float]
) -> int:
    """Keep-alive HTTP/1.1 requests on one connection until the deadline or the count limit."""
    reader, writer = await asyncio.open_connection(host, port)
    not_2xx = 0
    try:
        for _ in range(limit):
            if time.monotonic() >= deadline:
                break
            started_at = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started_at)
            if not status_line.split()[1].startswith((b"2", b"3")):
                not_2xx += 1
    finally:
        writer.close()
    return not_2xx


def run_python_load(
    url: str, headers: dict[str, str], seconds: int, connections: int, proxy: str | None = None
) -> Result:
    target = urlsplit(url)
    # Through a forward proxy the request line carries the absolute URI (RFC 9112 3.2.2).
    request_target = url if proxy is not None else target.path or "/"
    connect_to = urlsplit(proxy) if proxy is not None else target
    assert connect_to.hostname is not None and connect_to.port is not None
    host, port = connect_to.hostname, connect_to.port
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {request_target} HTTP/1.1\r\nHost: {target.netloc}\r\n{head}\r\n".encode()

    async def main() -> Result:
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        started_at = time.monotonic()
        not_2xx = await asyncio.gather(
            *(
                _one_connection(host, port, request, deadline, 1_000_000, latencies)
                for _ in range(connections)
            )
        )
        elapsed = time.monotonic() - started_at
        latencies.sort()
        return Result(
            len(latencies) / elapsed,
            latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000,
            sum(not_2xx),
        )

    return asyncio.run(main())


async def paid_authorization(proxy_url: str, ledger: Path) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy_url}/episodes/ep1.mp3", headers={"Accept-Authenticate": "L402"}) as r,
    ):
        challenge = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
    dev = DevLedger(ledger)
    try:
        payment = await dev.pay("listener", challenge.invoice, 0)
    finally:
        await dev.close()
    return format_credential([challenge.macaroon], payment.preimage)


def micro_benchmarks() -> dict[str, float]:
    secret = os.urandom(32)
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    macaroon = mint(
        derive_root_key(secret, identifier.token_id),
        identifier,
        caveats_for("podcast", valid_until=int(time.time()) + 3600, capabilities=["a", "b"]),
    )
    root_key = derive_root_key(secret, identifier.token_id)
    now = time.time()
    number = 2000
    verify_s = min(
        timeit.repeat(
            lambda: verify(macaroon, preimage, root_key, service="podcast", now=now),
            number=number,
            repeat=5,
        )
    )
    rule = load_rules(PODCAST_RULES).match("h", "/episodes/ep1.mp3", "GET")
    authorization = format_credential([macaroon], preimage)
    cache = gate.TokenCache()

    def decide() -> gate.Decision:
        return gate.decide(
            rule=rule,
            authorization=authorization,
            accept_authenticate=None,
            root_key_for=lambda tid: derive_root_key(secret, tid),
            revoked=frozenset(),
            now=now,
            cache=cache,
        )

    assert isinstance(decide(), gate.Grant)
    cached_s = min(timeit.repeat(decide, number=number * 10, repeat=5))
    return {
        "verify_uncached_us": verify_s / number * 1e6,
        "decide_cached_us": cached_s / (number * 10) * 1e6,
    }


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
    }


async def time_draws(uri: str) -> dict[str, object]:
    """Draws one after another from STORE_DRAW_TOKENS bundles on the store `uri` names: the
    first draw of each (an insert) and then the timed ones (updates), as a bundle's life is."""
    from l402proxy.store import open_server_store

    store = await open_server_store(uri)
    try:
        tokens = [os.urandom(32) for _ in range(STORE_DRAW_TOKENS)]
        size = 10**12  # never spent here
        first: list[float] = []
        for token in tokens:
            started_at = time.perf_counter()
            await store.draw(token, size, 1)
            first.append(time.perf_counter() - started_at)
        timed: list[float] = []
        deadline = time.monotonic() + STORE_DRAW_SECONDS
        for n in range(STORE_DRAWS):
            if time.monotonic() >= deadline:
                break
            started_at = time.perf_counter()
            await store.draw(tokens[n % len(tokens)], size, 1)
            timed.append(time.perf_counter() - started_at)
    finally:
        await store.close()
    return {
        "draws": len(timed),
        **latency_summary(timed),
        "first_draw": latency_summary(first),
    }


async def draws_on_postgres() -> dict[str, object]:
    """time_draws on a throwaway PostgreSQL started the way the tests start theirs, made
    durable as a production one is (the tests' cluster turns fsync and synchronous commit
    off); {"skipped": why} when it cannot be."""
    sys.path.insert(0, str(REPO))  # the tests' helpers: tests/postgres.py
    from tests.postgres import find_bindir, running_postgres

    if find_bindir() is None:
        return {"skipped": "no PostgreSQL server binaries (apt-get install postgresql)"}
    try:
        with running_postgres() as server:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                await server.admin(f"ALTER SYSTEM SET {setting} = on")
            await server.admin("SELECT pg_reload_conf()")
            for _ in range(100):  # bounded: 5 s for the server to read its settings again
                if await server.admin_value("SHOW synchronous_commit", "postgres") == "on":
                    break
                await asyncio.sleep(0.05)
            else:
                return {"skipped": "the server did not take synchronous_commit = on"}
            return await time_draws(await server.new_database())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"skipped": f"cannot start PostgreSQL: {str(exc).splitlines()[0]}"}


def measure_store_draw(work: Path) -> dict[str, object]:
    async def main() -> dict[str, object]:
        return {
            "sqlite": await time_draws(str(work / "store-draw.sqlite")),
            "postgresql": await draws_on_postgres(),
        }

    return asyncio.run(main())


@dataclass
class Bench:
    """What every scenario shares: the arguments, the load, a work directory and one origin."""

    args: argparse.Namespace
    load: LoadGenerator
    work: Path
    home: Path
    env: dict[str, str]
    origin: Process
    rules: Path

    def empty_hook_script(self) -> Path:
        """mitmproxy's own cost of running any script hook, to tell it apart from an addon's."""
        script = self.work / "empty_hook.py"
        if not script.exists():
            script.write_text(
                "class EmptyHook:\n    async def request(self, flow):\n        return None\n\n"
                "addons = [EmptyHook()]\n"
            )
        return script

    def settings(self, *extra: str) -> list[str]:
        # mitmproxy's CA goes to the work directory, not ~/.mitmproxy. Each option once only:
        # mitmproxy drops every script option if one is set twice.
        return [f"confdir={self.work / 'mitmproxy'}", "flow_detail=0", *extra]

    def server_proxy(self, name: str, rules: Path | None, *args: str) -> Process:
        port = free_port()
        command = server_proxy_command(self.origin.url, port, rules, settings=self.settings())
        return Process(name, [*command, *args], port, self.work / f"{name}.log", self.env)

    def client_proxy(
        self, name: str, *settings: str, addon: bool = True, args: tuple[str, ...] = ()
    ) -> Process:
        port = free_port()
        command = client_proxy_command(port, settings=self.settings(*settings), addon=addon)
        return Process(name, [*command, *args], port, self.work / f"{name}.log", self.env)

    def interleaved(
        self, sides: dict[str, tuple[str, dict[str, str], str | None]]
    ) -> dict[str, list[Result]]:
        """Round after round, one run per side, so drift on a shared machine hits all sides."""
        runs: dict[str, list[Result]] = {side: [] for side in sides}
        for _ in range(self.args.rounds):
            for side, (url, headers, proxy) in sides.items():
                runs[side].append(
                    self.load(url, headers, self.args.seconds, self.args.connections, proxy)
                )
        return runs


def measure_server(bench: Bench, selected: list[str]) -> dict[str, object]:
    args = bench.args
    bare = bench.server_proxy("bare", None)
    empty_hook = bench.server_proxy("empty-hook", None, "-s", str(bench.empty_hook_script()))
    addon = bench.server_proxy("addon", bench.rules)
    results: dict[str, object] = {}
    with started(bare, empty_hook, addon):
        authorization = asyncio.run(paid_authorization(addon.url, bench.home / "devledger.sqlite"))
        scenarios = {
            # The same request bytes and the same origin work on both sides: the paid request
            # is rewritten to /adfree/ep1.mp3, and bare mitmdump forwards the token untouched.
            "paid": (
                (bare.url + "/adfree/ep1.mp3", {"Authorization": authorization}),
                (addon.url + "/episodes/ep1.mp3", {"Authorization": authorization}),
            ),
            # A 402 never reaches the origin; bare mitmdump serves the free file for comparison.
            "challenge": (
                (bare.url + "/episodes/ep1.mp3", {"Accept-Authenticate": "L402"}),
                (addon.url + "/episodes/ep1.mp3", {"Accept-Authenticate": "L402"}),
            ),
        }
        bench.load(bare.url + "/", {}, 2, args.connections)  # warm up both proxies
        bench.load(addon.url + "/", {}, 2, args.connections)
        for name, ((bare_url, bare_headers), (addon_url, addon_headers)) in scenarios.items():
            if name not in selected:
                continue
            sides = {
                "bare": (bare_url, bare_headers, None),
                "addon": (addon_url, addon_headers, None),
            }
            if name == "paid":
                sides["empty_hook"] = (
                    bare_url.replace(bare.url, empty_hook.url),
                    bare_headers,
                    None,
                )
            runs = bench.interleaved(sides)
            results[name] = compare(runs)
        # Measured last, so the addon's caches and queues hold what this load put in them.
        results["memory"] = memory(bare, addon)
    return results


def uvicorn_command(app: str, port: int, *, factory: bool = False) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", "--backlog", "1024"]
    return [*command, "--factory"] if factory else command


def measure_asgi(bench: Bench, selected: list[str]) -> dict[str, object]:
    """L402Middleware around the sample ASGI origin against the bare app, both under uvicorn."""
    bare_port, door_port = free_port(), free_port()
    env = {**bench.env, "L402PROXY_RULES": str(bench.rules)}
    bare = Process(
        "asgi-bare", uvicorn_command("l402proxy.origin_asgi:app", bare_port), bare_port,
        bench.work / "asgi-bare.log", env,
    )  # fmt: skip
    door = Process(
        "asgi-door", uvicorn_command("l402proxy.origin_asgi:paywalled", door_port, factory=True),
        door_port, bench.work / "asgi-door.log", env,
    )  # fmt: skip
    results: dict[str, object] = {}
    with started(bare, door):
        authorization = asyncio.run(paid_authorization(door.url, bench.home / "devledger.sqlite"))
        scenarios = door_scenarios(bare.url, door.url, authorization)
        for side in (bare, door):  # warm up
            bench.load(side.url + "/", {}, 2, bench.args.connections)
        for name in ("asgi-paid", "asgi-challenge"):
            if name in selected:
                results[name] = compare(bench.interleaved(scenarios[name.split("-")[1]]))
        results["asgi-memory"] = memory(bare, door)
    results["asgi-log-problems"] = log_problems(door)
    return results


def door_scenarios(
    bare_url: str, door_url: str, authorization: str
) -> dict[str, dict[str, tuple[str, dict[str, str], None]]]:
    """The same requests as the mitmproxy scenarios: a paid one rewritten to /adfree/ (the bare
    side asks for /adfree/ itself), and a fresh 402 (the bare side serves the free file)."""
    paid = {"Authorization": authorization}
    asks = {"Accept-Authenticate": "L402"}
    return {
        "paid": {
            "bare": (bare_url + "/adfree/ep1.mp3", paid, None),
            "addon": (door_url + "/episodes/ep1.mp3", paid, None),
        },
        "challenge": {
            "bare": (bare_url + "/episodes/ep1.mp3", asks, None),
            "addon": (door_url + "/episodes/ep1.mp3", asks, None),
        },
    }


NGINX_BARE_CONF = """
    upstream bench_origin {{ server {origin}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
"""


def measure_nginx(bench: Bench, selected: list[str]) -> dict[str, object]:
    """nginx + serve-auth against bare nginx proxying the same origin; the 402 also against the
    mitmproxy door, started beside them."""
    nginx = nginx_binary()
    if nginx is None:
        return {"nginx-problems": ["nginx is not installed (apt-get install nginx)"]}
    origin = authority(bench.origin.url)
    bare_port, door_port, auth_port = free_port(), free_port(), free_port()
    bare = nginx_process(
        "nginx-bare", bench.work / "nginx-bare", NGINX_BARE_CONF.format(origin=origin,
        port=bare_port), bare_port,
    )  # fmt: skip
    auth_address = f"127.0.0.1:{auth_port}"
    auth = Process(
        "serve-auth",
        [sys.executable, "-m", "l402proxy", "serve-auth", "--listen", auth_address,
         "--rules", str(bench.rules)],
        auth_port, bench.work / "serve-auth.log", bench.env,
    )  # fmt: skip
    mitm = bench.server_proxy("mitmproxy-door", bench.rules)
    results: dict[str, object] = {}
    with started(bare, auth, mitm):
        config = subprocess.run(
            [sys.executable, "-m", "l402proxy", "nginx-config", "--auth", auth_address,
             "--upstream", bench.origin.url, "--listen", str(door_port)],
            capture_output=True, text=True, check=True, timeout=60, env=bench.env,
        ).stdout  # fmt: skip
        door = nginx_process("nginx-door", bench.work / "nginx-door", config, door_port)
        with started(door):
            ledger = bench.home / "devledger.sqlite"
            authorization = asyncio.run(paid_authorization(door.url, ledger))
            scenarios = door_scenarios(bare.url, door.url, authorization)
            scenarios["challenge"]["mitmproxy"] = (
                mitm.url + "/episodes/ep1.mp3",
                {"Accept-Authenticate": "L402"},
                None,
            )
            for side in (bare, door, mitm):  # warm up
                bench.load(side.url + "/", {}, 2, bench.args.connections)
            for name in ("nginx-paid", "nginx-challenge"):
                if name in selected:
                    results[name] = compare(bench.interleaved(scenarios[name.split("-")[1]]))
            challenge = results.get("nginx-challenge")
            if isinstance(challenge, dict):
                door_rate = challenge["addon"]["req_per_s"]  # type: ignore[index]
                mitm_rate = challenge["mitmproxy"]["req_per_s"]  # type: ignore[index]
                challenge["mitmproxy_door_ratio"] = round(door_rate / mitm_rate, 3)
            results["nginx-memory"] = memory(bare, auth)
    results["nginx-log-problems"] = log_problems(auth)
    return results


def measure_client_pass(bench: Bench) -> dict[str, object]:
    """The client addon on requests that need no payment, against bare mitmdump (regular mode)."""
    args = bench.args
    bare = bench.client_proxy("client-bare", addon=False)
    empty_hook = bench.client_proxy(
        "client-empty-hook", addon=False, args=("-s", str(bench.empty_hook_script()))
    )
    addon = bench.client_proxy("client-addon")
    # Nothing priced on the way: the sample origin directly, no server proxy.
    url = bench.origin.url + "/episodes/ep1.mp3"
    with started(bare, empty_hook, addon):
        for proxy in (bare, empty_hook, addon):  # warm up
            bench.load(url, {}, 2, args.connections, proxy.url)
        runs = bench.interleaved(
            {
                "bare": (url, {}, bare.url),
                "addon": (url, {}, addon.url),
                "empty_hook": (url, {}, empty_hook.url),
            }
        )
        result = compare(runs)
        result["memory"] = memory(bare, addon)
    result["addon_log_problems"] = log_problems(addon)
    return result


def first_paid_rules(path: Path, count: int) -> Path:
    """count paywalled services, /p<i>/* each, 1 sat: each first fetch under one pays once.

    A paid fetch is rewritten to /bonus/<x>, which the sample origin serves for any name, so
    the paid and the unpaid fetch (of /bonus/<x> itself, priced by nothing here) get the same
    response from the same origin handler.
    """
    replacement = "/bonus/\\1"  # re.sub's group 1
    lines = ["version: 1", "services:"]
    for i in range(count):
        lines += [
            f"  - name: p{i}",
            "    match:",
            f"      path: {json.dumps(f'/p{i}/*')}",
            "    price_sat: 1",
            "    mode: paywall",
            "    paid:",
            f"      rewrite_path: {json.dumps([f'^/p{i}/(.*)$', replacement])}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def measure_client_first_paid(bench: Bench) -> dict[str, object]:
    """What the first paid fetch of a URL adds over an unpaid one, through the whole chain."""
    import httpx

    count = bench.args.paid_fetches
    # One more service than samples: the first payment warms up the client's store and wallet.
    rules = first_paid_rules(bench.work / "first-paid-rules.yaml", count + 1)
    server = bench.server_proxy("first-paid-server", rules)
    client = bench.client_proxy(
        "first-paid-client",
        f"l402_store={bench.work / 'first-paid-client.sqlite'}",
        "l402_budget_daily_sat=1000000",
        "l402_max_price_sat=1000",
        f"l402_pay_timeout={CLIENT_PAY_TIMEOUT}",
    )
    unpaid_ms: list[float] = []
    paid_ms: list[float] = []
    repeat_ms: list[float] = []
    extra_ms: list[float] = []
    problems: list[str] = []

    def fetch(http: httpx.Client, url: str, expect_paid: bool) -> float | None:
        """Latency in ms, or None (and a problem noted) if the response is not what it should be."""
        started_at = time.perf_counter()
        try:
            response = http.get(url)
        except httpx.HTTPError as exc:
            problems.append(f"GET {url}: {exc!r}")
            return None
        elapsed = (time.perf_counter() - started_at) * 1000
        paid = response.headers.get("X-L402-Paid")
        body = response.content
        if response.status_code != 200 or (paid is not None) != expect_paid or b"BONUS" not in body:
            problems.append(
                f"GET {url}: {response.status_code}, X-L402-Paid {paid!r}, "
                f"X-L402-Refused {response.headers.get('X-L402-Refused')!r}, body {body[:80]!r}"
            )
            return None
        return elapsed

    with (
        started(server, client),
        httpx.Client(proxy=client.url, trust_env=False, timeout=FETCH_TIMEOUT) as http,
    ):
        for _ in range(3):  # connections, the server's caches
            fetch(http, f"{server.url}/bonus/warm.mp3", expect_paid=False)
        fetch(http, f"{server.url}/p{count}/warm.mp3", expect_paid=True)
        deadline = time.monotonic() + FIRST_PAID_TIME_LIMIT
        for i in range(count):
            if time.monotonic() >= deadline or len(problems) > 10:
                problems.append(f"stopped after {i} of {count} samples (time or problems)")
                break
            # Paired and interleaved: each paid sample is compared with the unpaid one next to it.
            unpaid = fetch(http, f"{server.url}/bonus/x{i}.mp3", expect_paid=False)
            paid = fetch(http, f"{server.url}/p{i}/x{i}.mp3", expect_paid=True)
            # The same URL again: the stored token is attached, nothing is paid.
            repeat = fetch(http, f"{server.url}/p{i}/x{i}.mp3", expect_paid=False)
            if unpaid is None or paid is None:
                continue
            unpaid_ms.append(unpaid)
            paid_ms.append(paid)
            extra_ms.append(paid - unpaid)
            if repeat is not None:
                repeat_ms.append(repeat)
    return {
        "samples": len(extra_ms),
        "extra_ms": percentiles(extra_ms),
        "unpaid_ms": percentiles(unpaid_ms),
        "paid_ms": percentiles(paid_ms),
        "repeat_ms": percentiles(repeat_ms),
        "target_extra_p50_ms": FIRST_PAID_TARGET_MS,
        "problems": problems[:12],
        "client_log_problems": log_problems(client),
        "server_log_problems": log_problems(server),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": round(values[0], 2) if values else None, "p90": None}
    return {
        "p50": round(statistics.median(values), 2),
        "p90": round(statistics.quantiles(values, n=10)[8], 2),
    }


def log_problems(process: Process, limit: int = 5) -> list[str]:
    """Lines of a proxy's log that look like errors, as evidence next to the numbers."""
    pattern = re.compile(r"Traceback|\berror\b|exception", re.IGNORECASE)
    return [line for line in process.log().splitlines() if pattern.search(line)][:limit]


def compare(runs: dict[str, list[Result]]) -> dict[str, object]:
    bare_rate = statistics.median(r.requests_per_s for r in runs["bare"])
    result: dict[str, object] = {}
    for side, side_runs in runs.items():
        result[side] = summarize(side_runs)
        if side != "bare":
            rate = statistics.median(r.requests_per_s for r in side_runs)
            key = "ratio" if side == "addon" else f"{side}_ratio"
            result[key] = round(rate / bare_rate, 3)
    return result


def memory(bare: Process, addon: Process) -> dict[str, float]:
    bare_rss, addon_rss = rss_mib(bare), rss_mib(addon)
    return {
        "bare_rss_mib": round(bare_rss, 1),
        "addon_rss_mib": round(addon_rss, 1),
        "ratio": round(addon_rss / bare_rss, 3),
    }


def rss_mib(process: Process) -> float:
    """Resident memory of a running process, from /proc (Linux)."""
    assert process.proc is not None
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summarize(runs: list[Result]) -> dict[str, float]:
    return {
        "req_per_s": round(statistics.median(r.requests_per_s for r in runs), 1),
        "p50_ms": round(statistics.median(r.p50_ms for r in runs), 2),
        "p99_ms": round(statistics.median(r.p99_ms for r in runs), 2),
        "non_2xx": sum(r.non_2xx for r in runs),
    }


def measure(args: argparse.Namespace, load: LoadGenerator, work: Path) -> dict[str, object]:
    home = work / "home"
    home.mkdir()
    env = env_with_home(home)
    origin_port = free_port()
    origin = Process("origin", origin_command(origin_port), origin_port, work / "origin.log", env)
    # rules/podcast.yaml without the invoice-mint limit: the challenge scenarios ask for
    # thousands of 402s a second from one address, which the default limit answers with 429.
    rules = work / "podcast-bench.yaml"
    rules.write_text("invoice_limit: off\n" + PODCAST_RULES.read_text())
    bench = Bench(args, load, work, home, env, origin, rules)
    results: dict[str, object] = {}
    # Each group starts its own proxies and stops them before the next, around one origin.
    with started(origin):
        if any(name in args.scenarios for name in SERVER_SCENARIOS):
            results |= measure_server(bench, args.scenarios)
        if any(name.startswith("asgi-") for name in args.scenarios):
            results |= measure_asgi(bench, args.scenarios)
        if any(name.startswith("nginx-") for name in args.scenarios):
            results |= measure_nginx(bench, args.scenarios)
        if "client-pass" in args.scenarios:
            results["client-pass"] = measure_client_pass(bench)
        if "client-first-paid" in args.scenarios:
            results["client-first-paid"] = measure_client_first_paid(bench)
    return results


def scenario_list(text: str) -> list[str]:
    """Comma-separated scenario names; `server` and `client` stand for their groups."""
    groups = {
        "all": SCENARIOS,
        "server": SERVER_SCENARIOS,
        "doors": SERVER_SCENARIOS + DOOR_SCENARIOS,
        "client": CLIENT_SCENARIOS,
        "store": STORE_SCENARIOS,
    }
    names: list[str] = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word not in groups and word not in SCENARIOS:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {word!r} (choose from {', '.join([*groups, *SCENARIOS])})"
            )
        names += [n for n in groups.get(word, (word,)) if n not in names]
    if not names:
        raise argparse.ArgumentTypeError("no scenario given")
    return names


def bounded_count(text: str) -> int:
    count = int(text)
    if not 2 <= count <= 500:
        raise argparse.ArgumentTypeError(f"{count} is not in 2..500")
    return count


def print_report(report: dict, args: argparse.Namespace) -> None:
    if any(name not in STORE_SCENARIOS for name in args.scenarios):
        print(
            f"load generator: {report['load_generator']}, {args.connections} connections, "
            f"{args.rounds} x {args.seconds} s per side, interleaved"
        )
    loaded = [name for name in TARGETS if name in report]
    if loaded:
        print(
            f"{'scenario':<16} {'side':<5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  ratio (target)"
        )
    for name in loaded:
        entry = report[name]
        for side in ("bare", "addon", "mitmproxy"):
            if side not in entry:
                continue
            r = entry[side]
            tail = ""
            if side == "addon":
                tail = f"  {entry['ratio']:.2f}"
                tail += f" (>= {TARGETS[name]})" if TARGETS[name] else " (no target against bare)"
            if side == "mitmproxy":
                tail = (
                    f"  the door's 402 at {entry['mitmproxy_door_ratio']:.2f}x the mitmproxy "
                    f"door's (>= {MITM_TARGETS[name]})"
                )
            label = {"bare": "bare", "addon": "door", "mitmproxy": "mitm"}[side]
            print(
                f"{name:<16} {label:<5} {r['req_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}{tail}"
            )
    for name, mode in (("paid", "reverse"), ("client-pass", "regular")):
        if name in report:
            entry = report[name]
            print(
                f"for reference, bare ({mode} mode) + an empty request hook: "
                f"{entry['empty_hook']['req_per_s']} req/s, ratio {entry['empty_hook_ratio']:.2f} "
                "(mitmproxy's cost of any script)"
            )
    for label, memory_entry in (
        ("server", report.get("memory")),
        ("ASGI app", report.get("asgi-memory")),
        ("nginx: bare nginx vs serve-auth", report.get("nginx-memory")),
        ("client", report.get("client-pass", {}).get("memory")),
    ):
        if memory_entry:
            print(
                f"memory after the runs (RSS, {label}): bare {memory_entry['bare_rss_mib']} MiB, "
                f"addon {memory_entry['addon_rss_mib']} MiB, ratio {memory_entry['ratio']:.2f}"
            )
    if "client-first-paid" in report:
        entry = report["client-first-paid"]
        extra, unpaid, paid, repeat = (
            entry[k] for k in ("extra_ms", "unpaid_ms", "paid_ms", "repeat_ms")
        )
        print(
            f"client-first-paid, {entry['samples']} sequential fetches paying 1 sat each "
            f"(dev wallet): first paid - unpaid p50 {extra['p50']} ms, p90 {extra['p90']} ms "
            f"(target p50 < {FIRST_PAID_TARGET_MS:g} ms)"
        )
        print(
            f"  unpaid p50 {unpaid['p50']} ms, first paid p50 {paid['p50']} ms, "
            f"same URL again with the stored token p50 {repeat['p50']} ms"
        )
    for name in CLIENT_SCENARIOS:
        entry = report.get(name, {})
        for key in ("problems", "addon_log_problems", "client_log_problems", "server_log_problems"):
            for line in entry.get(key, []):
                print(f"{name}: {key.replace('_', ' ')}: {line}")
    for key in ("asgi-log-problems", "nginx-log-problems", "nginx-problems"):
        for line in report.get(key, []):
            print(f"{key.replace('-', ' ')}: {line}")
    if "micro" in report:
        micro = report["micro"]
        print(f"token verify, uncached: {micro['verify_uncached_us']:.1f} us (target < 50 us)")
        print(f"gate decision, cached token: {micro['decide_cached_us']:.2f} us")
    for label, key in (("SQLite, temp file", "sqlite"), ("PostgreSQL, local", "postgresql")):
        entry = report.get("store-draw", {}).get(key)
        if entry is None:
            continue
        if "skipped" in entry:
            print(f"store-draw ({label}): skipped, {entry['skipped']}")
            continue
        print(
            f"store-draw ({label}): p50 {entry['p50_ms']} ms, p99 {entry['p99_ms']} ms over "
            f"{entry['draws']} draws (target p50 < {STORE_DRAW_TARGET_MS:g} ms); a token's "
            f"first draw p50 {entry['first_draw']['p50_ms']} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per side")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--scenarios",
        type=scenario_list,
        default=list(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}, or server, doors, client, store, "
        "all (default)",
    )
    parser.add_argument(
        "--paid-fetches",
        type=bounded_count,
        default=30,
        metavar="N",
        help="client-first-paid samples, 2..500 (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    use_wrk = args.tool == "wrk" or (args.tool == "auto" and shutil.which("wrk"))
    load = run_wrk if use_wrk else run_python_load

    micro = micro_benchmarks() if any(n in args.scenarios for n in SERVER_SCENARIOS) else None
    with tempfile.TemporaryDirectory(prefix="l402bench-") as tmp:
        # The HTTP scenarios share an origin; store-draw needs none (nor wrk, nor mitmdump).
        http = any(name not in STORE_SCENARIOS for name in args.scenarios)
        results = measure(args, load, Path(tmp)) if http else {}
        if "store-draw" in args.scenarios:
            results["store-draw"] = measure_store_draw(Path(tmp))
    report: dict = {
        "load_generator": "wrk" if use_wrk else "python asyncio",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "connections": args.connections,
        "scenarios": args.scenarios,
        **results,
    }
    if micro is not None:
        report["micro"] = {k: round(v, 2) for k, v in micro.items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
