"""Prometheus metrics end to end: the text passes Debian's `promtool check metrics`, a real
Prometheus scrapes it and answers our values from its query API, worker processes that share
PROMETHEUS_MULTIPROC_DIR are summed by the one that serves, and a real mitmdump serves them
with --set l402_metrics.

Traffic comes from a real engine (dev backend, SQLite store) with the metrics watcher attached,
as a door attaches it; each test sells its own service, so values from other tests in this
process never mix in."""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from l402proxy.engine import Paywall
from l402proxy.launch import started
from l402proxy.ops.metrics import REGISTRY, MetricsServer, exposition, metrics
from tests.conftest import require
from tests.unit.test_rate_limits import bought, engine_with, request, status

from . import procs
from .test_server_e2e import API_RULES, OPTED_IN, start_stack, stop_stack

pytestmark = pytest.mark.e2e

PRICE = 7
RULES = """
services:
  - name: {name}
    match: {{path: "/api/*"}}
    price_sat: {price}
    rate_limits: [{{requests: 1, per: 1h, key: token}}]
"""
# A credential whose macaroon is not base64: refused as malformed (401).
GARBLED = "L402 %%%:" + "00" * 32
WAIT_SECONDS = 60.0


def tool(name: str) -> str:
    """Debian's promtool or prometheus (package prometheus): missing fails CI."""
    path = shutil.which(name) or f"/usr/bin/{name}"
    require(Path(path).exists(), f"{name} (apt-get install prometheus)")
    return path


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def promtool_check(text: bytes) -> None:
    """`promtool check metrics`: the format and its lint rules (names, units, suffixes)."""
    done = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    problems = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0 and not problems, problems


@contextlib.asynccontextmanager
async def selling(tmp_path: Path, service: str) -> AsyncIterator[Paywall]:
    """A real engine selling `service` under /api/, its door named after the service, with
    the metrics watcher attached as Operations attaches it."""
    async with engine_with(tmp_path, RULES.format(name=service, price=PRICE)) as (engine, _):
        engine.door = service
        engine.watchers.add(metrics())
        yield engine


async def drive(engine: Paywall, tmp_path: Path, service: str) -> None:
    """One of each: a challenge (and its invoice), a sale, a grant, a rate limit, a refused
    token, an unpriced request; then wait for the engine's flush to report the sale."""
    paid = await bought(engine, tmp_path)
    assert status(await engine.handle(request("/api/x", authorization=paid))) == 200
    assert status(await engine.handle(request("/api/x", authorization=paid))) == 429
    assert status(await engine.handle(request("/api/x", authorization=GARBLED))) == 401
    assert status(await engine.handle(request("/elsewhere"))) == 200
    deadline = time.monotonic() + WAIT_SECONDS
    while REGISTRY.get_sample_value("l402_invoices_settled_total", {"service": service}) is None:
        assert time.monotonic() < deadline, "the engine's flush never reported the sale"
        await asyncio.sleep(0.1)


async def test_the_exposition_passes_promtool(tmp_path: Path) -> None:
    service = "promtool-check"
    async with selling(tmp_path, service) as engine:
        await drive(engine, tmp_path, service)
        server = await MetricsServer.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                served = await client.get(f"http://127.0.0.1:{server.port}/metrics")
        finally:
            await server.close()
    assert served.status_code == 200
    promtool_check(served.content)
    promtool_check(exposition())
    got = samples(served.text)
    door = ("door", service)
    assert got[
        ("l402_challenges_total", frozenset({door, ("service", service), ("status", "402")}))
    ]
    assert got[("l402_earned_sats_total", frozenset({("service", service)}))] == PRICE


def prometheus(work: Path, target_port: int) -> procs.Process:
    """A real Prometheus scraping 127.0.0.1:<target_port>/metrics every second."""
    work.mkdir()
    config = work / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""\
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
            scrape_configs:
              - job_name: l402
                static_configs:
                  - targets: ["127.0.0.1:{target_port}"]
            """
        )
    )
    port = procs.free_port()
    return procs.Process(
        name="prometheus",
        command=[
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        port=port,
        log_path=work / "prometheus.log",
    )


async def query(client: httpx.AsyncClient, base: str, promql: str) -> dict[str, float]:
    """An instant query; each series' value by its labels shown as `k=v,...`."""
    response = await client.get(f"{base}/api/v1/query", params={"query": promql})
    body: dict[str, Any] = response.json()
    assert body["status"] == "success", body
    return {
        ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items())): float(item["value"][1])
        for item in body["data"]["result"]
    }


async def test_a_real_prometheus_scrapes_our_values(tmp_path: Path) -> None:
    service = "prometheus-scrape"
    async with selling(tmp_path, service) as engine:
        await drive(engine, tmp_path, service)
        server = await MetricsServer.start("127.0.0.1", 0)
        scraper = prometheus(tmp_path / "prometheus", server.port)
        try:
            # Off the loop: it is this loop that answers Prometheus's scrapes.
            await asyncio.to_thread(scraper.start)
            wanted = {
                f'up{{instance="127.0.0.1:{server.port}"}}': {
                    f"__name__=up,instance=127.0.0.1:{server.port},job=l402": 1.0
                },
                f'sum by (status) (l402_challenges_total{{door="{service}"}})': {
                    "status=401": 1.0,
                    "status=402": 1.0,
                },
                f'sum(l402_tokens_accepted_total{{door="{service}"}})': {"": 1.0},
                f'sum by (reason) (l402_tokens_refused_total{{door="{service}"}})': {
                    "reason=malformed": 1.0
                },
                f'sum by (reason) (l402_rate_limited_requests_total{{door="{service}"}})': {
                    "reason=token": 1.0
                },
                f'sum(l402_earned_sats_total{{service="{service}"}})': {"": float(PRICE)},
                f'sum(l402_decision_duration_seconds_count{{door="{service}"}})': {"": 5.0},
            }
            got: dict[str, dict[str, float]] = {}
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                deadline = time.monotonic() + WAIT_SECONDS
                while got != wanted and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    got = {q: await query(client, scraper.url, q) for q in wanted}
        finally:
            await asyncio.to_thread(scraper.stop)
            await server.close()
    assert got == wanted, scraper.log()[-3000:]


WRITER = """
import sys
from l402proxy.engine.events import Decision
from l402proxy.ops.metrics import metrics

watcher = metrics()
for _ in range(int(sys.argv[1])):
    watcher.decided(Decision("worker", "challenge", "shared", 402, "payment_required", seconds=0.5))
    watcher.settled("worker", "shared", 10)
"""

SERVER = """
import asyncio, sys
from l402proxy.ops.metrics import MetricsServer

async def main() -> None:
    server = await MetricsServer.start("127.0.0.1", int(sys.argv[1]))
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()

asyncio.run(main())
"""


@pytest.fixture
def multiproc_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    shared = tmp_path / "multiproc"
    shared.mkdir()
    env = {k: v for k, v in os.environ.items() if "multiproc" not in k.lower()}
    yield env | {"PROMETHEUS_MULTIPROC_DIR": str(shared)}


def test_worker_processes_are_summed_by_the_one_that_serves(
    tmp_path: Path, multiproc_env: dict[str, str]
) -> None:
    # Two workers count at the same time, each in its own file; a third serves the sum.
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(count)],
            env=multiproc_env,
            cwd=procs.REPO,
            stderr=subprocess.PIPE,
        )
        for count in (3, 4)
    ]
    for writer in writers:
        _, errors = writer.communicate(timeout=60)
        assert writer.returncode == 0, errors.decode()
    files = {p.name for p in Path(multiproc_env["PROMETHEUS_MULTIPROC_DIR"]).iterdir()}
    assert {f"counter_{w.pid}.db" for w in writers} <= files
    port = procs.free_port()
    server = procs.Process(
        name="metrics server",
        command=[sys.executable, "-c", SERVER, str(port)],
        port=port,
        log_path=tmp_path / "server.log",
        env=multiproc_env,
    )
    with started(server):
        served = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=10)
    assert served.status_code == 200, server.log()
    promtool_check(served.content)
    got = samples(served.text)
    worker = ("door", "worker")
    challenge = frozenset({worker, ("service", "shared"), ("status", "402")})
    assert got[("l402_challenges_total", challenge)] == 7
    assert got[("l402_earned_sats_total", frozenset({("service", "shared")}))] == 70
    assert got[("l402_decision_duration_seconds_count", frozenset({worker}))] == 7
    assert got[("l402_decision_duration_seconds_sum", frozenset({worker}))] == 3.5
    bucket = frozenset({worker, ("le", "0.5")})
    assert got[("l402_decision_duration_seconds_bucket", bucket)] == 7
    # The server's own zero error series, once (not once per process).
    assert got[("l402_backend_errors_total", frozenset({("operation", "create_invoice")}))] == 0


def scrape(url: str) -> httpx.Response | None:
    """GET url; None while nothing listens there."""
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(url, trust_env=False, timeout=10)
    return None


def test_mitmdump_serves_metrics_with_l402_metrics(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    port = procs.free_port()
    confdir = tmp_path_factory.mktemp("metrics-conf")
    stack = start_stack(
        tmp_path_factory, confdir, API_RULES, f"l402_metrics=127.0.0.1:{port}", name="metrics"
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        # The metrics start once the engine is open (mitmproxy's `running`), which may be
        # after the proxy listens: traffic waits for them, to be counted.
        assert procs.wait_until(lambda: scrape(url) is not None, WAIT_SECONDS), stack.proxy.log()
        assert stack.get("/api/quotes/BTC", **OPTED_IN).status_code == 402
        assert stack.get("/api/health").status_code == 200
        served = scrape(url)
        assert served is not None and served.status_code == 200
    finally:
        stop_stack(stack)
    promtool_check(served.content)
    got = samples(served.text)
    door = ("door", "mitmproxy")
    quotes = frozenset({door, ("service", "quotes"), ("status", "402")})
    assert got[("l402_challenges_total", quotes)] == 1
    assert (
        got[("l402_decisions_total", frozenset({door, ("kind", "pass"), ("dry_run", "false")}))]
        == 1
    )
    # The free health check went to the origin, and its answer was timed.
    assert got[("l402_upstream_duration_seconds_count", frozenset({door, ("service", "")}))] == 1


# A plain ASGI app behind the ASGI door with metrics on, as a user runs it under uvicorn.
ASGI_APP = """
import os

from l402proxy.asgi import L402Middleware


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"origin"})


app = L402Middleware(
    app, rules=os.environ["RULES"], dev_ledger=os.environ["LEDGER"], metrics=os.environ["METRICS"]
)
"""


def test_uvicorn_workers_share_one_metrics_endpoint(
    tmp_path: Path, multiproc_env: dict[str, str]
) -> None:
    """uvicorn --workers 2 with the ASGI door: one worker gets the metrics address, the other
    finds it taken and leaves it to it; whichever worker judged a request, it is counted."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "asgi_metrics_app.py").write_text(ASGI_APP)
    port, metrics_port = procs.free_port(), procs.free_port()
    env = procs.env_with_home(home) | {
        "PROMETHEUS_MULTIPROC_DIR": multiproc_env["PROMETHEUS_MULTIPROC_DIR"],
        "RULES": str(API_RULES),
        "LEDGER": str(home / "devledger.sqlite"),
        "METRICS": f"127.0.0.1:{metrics_port}",
    }
    command = [
        sys.executable, "-m", "uvicorn", "asgi_metrics_app:app",
        "--app-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2", "--no-access-log",
    ]  # fmt: skip
    app = procs.Process(
        name="uvicorn workers",
        command=command,
        port=port,
        log_path=tmp_path / "uvicorn.log",
        env=env,
    )
    requests = 12
    with started(app):
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert procs.wait_until(lambda: scrape(url) is not None, WAIT_SECONDS), app.log()
        for _ in range(requests):
            # A connection each: the kernel spreads them over the workers.
            got = httpx.get(f"{app.url}/api/quotes/BTC", headers=OPTED_IN, trust_env=False)
            assert got.status_code == 402, got.text
        served = scrape(url)
        # Both workers started, and neither failed on the address the other one holds.
        assert app.log().count("Application startup complete") == 2, app.log()
    assert served is not None and served.status_code == 200, app.log()
    promtool_check(served.content)
    quotes = frozenset({("door", "ASGI"), ("service", "quotes"), ("status", "402")})
    assert samples(served.text)[("l402_challenges_total", quotes)] == requests
