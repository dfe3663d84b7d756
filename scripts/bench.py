"""Benchmark the server addon against bare mitmdump, measured in the same run on the same origin.

Scenarios (each against bare `mitmdump --mode reverse` serving the same origin response):
  paid       requests with a valid token (cached verification, path rewrite to the ad-free file)
  challenge  requests that draw a fresh 402 (invoice from the dev ledger + a new macaroon)
and micro-benchmarks of token verification (uncached) and the cached gate decision.

Numbers are ratios to bare mitmdump measured in this run; absolute numbers depend on the machine.
Run with scripts/bench (it sets up the environment; wrk is used when installed).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from l402proxy import gate
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import caveats_for, derive_root_key, mint, verify
from l402proxy.launch import (
    REPO,
    Process,
    env_with_home,
    free_port,
    origin_command,
    server_proxy_command,
    started,
)
from l402proxy.lightning.dev import DevLedger
from l402proxy.rules import load_rules

RULES = REPO / "rules" / "podcast.yaml"


@dataclass
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # a challenge run is all 402s by design


LoadGenerator = Callable[[str, dict[str, str], int, int], Result]


def parse_wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip()).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, headers: dict[str, str], seconds: int, connections: int) -> Result:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
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


def run_python_load(url: str, headers: dict[str, str], seconds: int, connections: int) -> Result:
    host_port, path = url.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\n{head}\r\n".encode()

    async def main() -> Result:
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        started_at = time.monotonic()
        not_2xx = await asyncio.gather(
            *(
                _one_connection(host, int(port), request, deadline, 1_000_000, latencies)
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
    rule = load_rules(RULES).match("h", "/episodes/ep1.mp3", "GET")
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


def measure(args: argparse.Namespace, load: LoadGenerator, work: Path) -> dict[str, object]:
    home = work / "home"
    home.mkdir()
    env = env_with_home(home)
    origin_port = free_port()
    origin = Process("origin", origin_command(origin_port), origin_port, work / "origin.log", env)

    def proxy(name: str, rules: Path | None, *args: str) -> Process:
        port = free_port()
        command = server_proxy_command(origin.url, port, rules, settings=["flow_detail=0"])
        return Process(name, [*command, *args], port, work / f"{name}.log", env)

    # mitmproxy's own cost of running any script hook, to tell it apart from the addon's work.
    empty_script = work / "empty_hook.py"
    empty_script.write_text(
        "class EmptyHook:\n    async def request(self, flow):\n        return None\n\n"
        "addons = [EmptyHook()]\n"
    )
    bare = proxy("bare", None)
    empty_hook = proxy("empty-hook", None, "-s", str(empty_script))
    addon = proxy("addon", RULES)
    results: dict[str, object] = {}
    with started(origin, bare, empty_hook, addon):
        authorization = asyncio.run(paid_authorization(addon.url, home / "devledger.sqlite"))
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
        load(bare.url + "/", {}, 2, args.connections)  # warm up both proxies
        load(addon.url + "/", {}, 2, args.connections)
        for name, ((bare_url, bare_headers), (addon_url, addon_headers)) in scenarios.items():
            bare_runs, addon_runs, hook_runs = [], [], []
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
                bare_runs.append(load(bare_url, bare_headers, args.seconds, args.connections))
                addon_runs.append(load(addon_url, addon_headers, args.seconds, args.connections))
                if name == "paid":
                    hook_url = bare_url.replace(bare.url, empty_hook.url)
                    hook_runs.append(load(hook_url, bare_headers, args.seconds, args.connections))
            bare_rate = statistics.median(r.requests_per_s for r in bare_runs)
            addon_rate = statistics.median(r.requests_per_s for r in addon_runs)
            results[name] = {
                "bare": summarize(bare_runs),
                "addon": summarize(addon_runs),
                "ratio": round(addon_rate / bare_rate, 3),
            }
            if hook_runs:
                hook_rate = statistics.median(r.requests_per_s for r in hook_runs)
                results[name]["empty_hook"] = summarize(hook_runs)
                results[name]["empty_hook_ratio"] = round(hook_rate / bare_rate, 3)
        # Measured last, so the addon's caches and queues hold what this load put in them.
        bare_rss, addon_rss = rss_mib(bare), rss_mib(addon)
        results["memory"] = {
            "bare_rss_mib": round(bare_rss, 1),
            "addon_rss_mib": round(addon_rss, 1),
            "ratio": round(addon_rss / bare_rss, 3),
        }
    return results


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


TARGETS = {"paid": 0.95, "challenge": 0.60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per side")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = parser.parse_args()
    use_wrk = args.tool == "wrk" or (args.tool == "auto" and shutil.which("wrk"))
    load = run_wrk if use_wrk else run_python_load

    micro = micro_benchmarks()
    with tempfile.TemporaryDirectory(prefix="l402bench-") as tmp:
        results = measure(args, load, Path(tmp))
    report = {
        "load_generator": "wrk" if use_wrk else "python asyncio",
        "seconds": args.seconds,
        "rounds": args.rounds,
        "connections": args.connections,
        **results,
        "micro": {k: round(v, 2) for k, v in micro.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"load generator: {report['load_generator']}, {args.connections} connections, "
        f"{args.rounds} x {args.seconds} s per side, interleaved"
    )
    print(f"{'scenario':<10} {'side':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  ratio (target)")
    for name, target in TARGETS.items():
        entry = results[name]
        for side in ("bare", "addon"):
            r = entry[side]
            tail = f"  {entry['ratio']:.2f} (>= {target})" if side == "addon" else ""
            print(
                f"{name:<10} {side:<6} {r['req_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}{tail}"
            )
    reference = results["paid"]
    print(
        f"for reference, bare + an empty request hook: {reference['empty_hook']['req_per_s']} "
        f"req/s, ratio {reference['empty_hook_ratio']:.2f} (mitmproxy's cost of any script)"
    )
    memory = results["memory"]
    print(
        f"memory after the runs (RSS): bare {memory['bare_rss_mib']} MiB, "
        f"addon {memory['addon_rss_mib']} MiB, ratio {memory['ratio']:.2f}"
    )
    print(f"token verify, uncached: {micro['verify_uncached_us']:.1f} us (target < 50 us)")
    print(f"gate decision, cached token: {micro['decide_cached_us']:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
