"""Prometheus metrics (ops/metrics.py): which series each engine event moves, bounded labels,
several engines in one process, the /metrics server, and how multiprocess values are chosen.

The families are process-wide, so every test looks at what it changed (`moved`), never at
absolute values."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from l402proxy.engine import Answer, Forward
from l402proxy.engine.events import Decision, Watchers
from l402proxy.launch import REPO, free_port
from l402proxy.ops import metrics as metrics_module
from l402proxy.ops.listen import ListenError
from l402proxy.ops.metrics import (
    CONTENT_TYPE,
    REGISTRY,
    Metrics,
    MetricsServer,
    exposition,
    metrics,
    multiprocess,
)
from tests.unit.test_rate_limits import API, bought, engine_with, request

Key = tuple[str, tuple[tuple[str, str], ...]]


def snapshot() -> dict[Key, float]:
    """Every l402 sample but histogram buckets (their _count and _sum say enough here)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if not sample.name.endswith(("_bucket", "_created"))
    }


@contextlib.contextmanager
def moved() -> Iterator[dict[Key, float]]:
    """The samples that changed inside the block, with how much: filled in on the way out."""
    changes: dict[Key, float] = {}
    before = snapshot()
    yield changes
    for key, value in snapshot().items():
        if value != before.get(key, 0.0):
            changes[key] = value - before.get(key, 0.0)


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def judged(door: str, kind: str, seconds: float, dry_run: str = "false") -> dict[Key, float]:
    """What every decision moves."""
    return {
        key("l402_decisions_total", door=door, kind=kind, dry_run=dry_run): 1,
        key("l402_decision_duration_seconds_count", door=door): 1,
        key("l402_decision_duration_seconds_sum", door=door): seconds,
    }


# -- each event moves its series, and only those ---------------------------------------------

DOOR = "unit"


@pytest.mark.parametrize(
    ("decision", "extra"),
    [
        (
            Decision(DOOR, "challenge", "api", 402, "payment_required", seconds=0.25),
            {key("l402_challenges_total", door=DOOR, service="api", status="402"): 1},
        ),
        (
            Decision(DOOR, "challenge", "api", 401, "bad_signature", token="ab12cd34", seconds=1),
            {
                key("l402_challenges_total", door=DOOR, service="api", status="401"): 1,
                key(
                    "l402_tokens_refused_total", door=DOOR, service="api", reason="bad_signature"
                ): 1,
            },
        ),
        (
            Decision(DOOR, "challenge", "api", 402, "expired", token="ab12cd34", seconds=1),
            {
                key("l402_challenges_total", door=DOOR, service="api", status="402"): 1,
                key("l402_tokens_refused_total", door=DOOR, service="api", reason="expired"): 1,
            },
        ),
        (
            Decision(DOOR, "grant", "api", None, token="ab12cd34", seconds=0.5),
            {key("l402_tokens_accepted_total", door=DOOR, service="api"): 1},
        ),
        (
            Decision(DOOR, "limited", "api", 429, "ip", seconds=0.5),
            {key("l402_rate_limited_requests_total", door=DOOR, service="api", reason="ip"): 1},
        ),
        (
            Decision(DOOR, "limited", "api", 429, "invoices", seconds=0.5),
            {
                key(
                    "l402_rate_limited_requests_total", door=DOOR, service="api", reason="invoices"
                ): 1
            },
        ),
        (Decision(DOOR, "freebie", "api", None, seconds=0.5), {}),
        (Decision(DOOR, "free", "api", None, seconds=0.5), {}),
        (Decision(DOOR, "denied", "api", 404, seconds=0.5), {}),
        (Decision(DOOR, "refused", None, 400, "header", seconds=0.5), {}),
        (Decision(DOOR, "unavailable", "api", 503, "backend", seconds=0.5), {}),
        (Decision(DOOR, "pass", None, None, seconds=0.5), {}),
        (Decision(DOOR, "unlock", "api", 200, seconds=0.5), {}),
        (Decision(DOOR, "endpoint", None, 404, seconds=0.5), {}),
    ],
    ids=lambda value: value.kind if isinstance(value, Decision) else "",
)
def test_each_decision_moves_its_series(decision: Decision, extra: dict[Key, float]) -> None:
    with moved() as changes:
        metrics().decided(decision)
    assert changes == pytest.approx(judged(DOOR, decision.kind, decision.seconds) | extra)


def test_a_dry_run_decision_is_counted_apart_and_as_what_it_would_have_been() -> None:
    decision = Decision(
        DOOR, "challenge", "api", 402, "payment_required", seconds=0.5, dry_run=True
    )
    with moved() as changes:
        metrics().decided(decision)
    assert changes == pytest.approx(
        judged(DOOR, "challenge", 0.5, dry_run="true")
        | {key("l402_challenges_total", door=DOOR, service="api", status="402"): 1}
    )


def test_the_other_events_move_their_series() -> None:
    watcher = metrics()
    with moved() as changes:
        watcher.settled(DOOR, "api", 21)
        watcher.settled(DOOR, "api", 21)
        watcher.backend_called(DOOR, "create_invoice", 0.5, True)
        watcher.backend_called(DOOR, "lookup_invoice", 0.25, False)
        watcher.store_failed(DOOR, "flush")
        watcher.upstream_answered(DOOR, "api", 0.5)
        watcher.upstream_answered(DOOR, None, 0.25)
    assert changes == pytest.approx(
        {
            key("l402_invoices_settled_total", service="api"): 2,
            key("l402_earned_sats_total", service="api"): 42,
            key("l402_backend_request_duration_seconds_count", operation="create_invoice"): 1,
            key("l402_backend_request_duration_seconds_sum", operation="create_invoice"): 0.5,
            key("l402_backend_request_duration_seconds_count", operation="lookup_invoice"): 1,
            key("l402_backend_request_duration_seconds_sum", operation="lookup_invoice"): 0.25,
            key("l402_backend_errors_total", operation="lookup_invoice"): 1,
            key("l402_store_errors_total", operation="flush"): 1,
            key("l402_upstream_duration_seconds_count", door=DOOR, service="api"): 1,
            key("l402_upstream_duration_seconds_sum", door=DOOR, service="api"): 0.5,
            key("l402_upstream_duration_seconds_count", door=DOOR, service=""): 1,
            key("l402_upstream_duration_seconds_sum", door=DOOR, service=""): 0.25,
        }
    )


def test_error_series_exist_before_the_first_error() -> None:
    samples = snapshot()
    for operation in ("create_invoice", "lookup_invoice"):
        assert key("l402_backend_errors_total", operation=operation) in samples
    for operation in ("flush", "revocations", "open", "draw", "charge", "feed"):
        assert key("l402_store_errors_total", operation=operation) in samples


def test_a_failed_bundle_charge_counts_under_its_own_name() -> None:
    """engine/metering.py tells `charge` when a metered answer's cost cannot be stored."""
    watcher = metrics()
    with moved() as changes:
        watcher.store_failed(DOOR, "charge")
        watcher.store_failed(DOOR, "draw")
    assert changes[key("l402_store_errors_total", operation="charge")] == 1
    assert changes[key("l402_store_errors_total", operation="draw")] == 1
    assert key("l402_store_errors_total", operation="other") not in changes


# -- bounded labels ----------------------------------------------------------------------------


def test_labels_off_the_lists_are_clamped_and_no_token_address_or_path_shows() -> None:
    watcher = metrics()
    with moved() as changes:
        watcher.decided(
            Decision(
                DOOR,
                "challenge",
                "api/../x y",
                500,
                "/etc/passwd",
                token="feedface",
                method="GET",
            )
        )
        watcher.decided(Decision("door with spaces", "made-up", "a" * 65, None, seconds=-1.0))
        watcher.decided(Decision(DOOR, "limited", "api", 429, "198.51.100.7"))
        watcher.backend_called(DOOR, "pay_invoice", float("nan"), False)
        watcher.store_failed(DOOR, "DROP TABLE")
        watcher.upstream_answered(DOOR, "ünïcode", float("inf"))
    labels = {value for _, pairs in changes for _, value in pairs}
    assert labels <= {DOOR, "_other", "other", "false", "api", "challenge", "limited"}, labels
    assert changes[key("l402_challenges_total", door=DOOR, service="_other", status="other")] == 1
    assert (
        changes[key("l402_tokens_refused_total", door=DOOR, service="_other", reason="other")] == 1
    )
    assert changes[key("l402_decisions_total", door="_other", kind="other", dry_run="false")] == 1
    # A negative duration counts as 0: observed, the sum unmoved.
    assert changes[key("l402_decision_duration_seconds_count", door="_other")] == 1
    assert key("l402_decision_duration_seconds_sum", door="_other") not in changes
    assert (
        changes[key("l402_rate_limited_requests_total", door=DOOR, service="api", reason="other")]
        == 1
    )
    assert changes[key("l402_backend_errors_total", operation="other")] == 1
    assert changes[key("l402_store_errors_total", operation="other")] == 1
    # A NaN or infinite duration is no observation.
    assert key("l402_backend_request_duration_seconds_count", operation="other") not in changes
    text = exposition().decode()
    for secret in ("feedface", "198.51.100.7", "passwd", "ünïcode"):
        assert secret not in text


def test_service_names_are_capped_in_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_services", metrics_module._Names(2))
    with moved() as changes:
        for name in ("s1", "s2", "s3", "s4", "s1"):
            metrics().decided(Decision(DOOR, "grant", name, None))
    accepted = {
        dict(pairs)["service"]: value
        for (name, pairs), value in changes.items()
        if name == "l402_tokens_accepted_total"
    }
    assert accepted == {"s1": 2, "s2": 1, "_other": 2}


# -- several engines in one process ------------------------------------------------------------


def test_every_metrics_watcher_is_the_same_one() -> None:
    engine_watchers = Watchers()
    engine_watchers.add(metrics())
    engine_watchers.add(Metrics())  # a second instance: registers nothing, counts nothing twice
    assert engine_watchers.all == [metrics()]
    with moved() as changes:
        engine_watchers.tell("settled", DOOR, "api", 3)
    assert changes == {
        key("l402_invoices_settled_total", service="api"): 1,
        key("l402_earned_sats_total", service="api"): 3,
    }


async def test_two_engines_in_one_process_count_apart_by_door(tmp_path: Path) -> None:
    rules = API.replace("{extra}", "    rate_limits: [{requests: 1, per: 1h, key: token}]")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    async with (
        engine_with(tmp_path / "one", rules) as (one, _),
        engine_with(tmp_path / "two", rules) as (two, _),
    ):
        one.door, two.door = "one", "two"
        one.watchers.add(metrics())
        two.watchers.add(metrics())
        with moved() as changes:
            paid = await bought(one, tmp_path / "one")  # a challenge at door one
            granted = await one.handle(request("/api/x", authorization=paid))
            limited = await one.handle(request("/api/x", authorization=paid))
            forged = await two.handle(request("/api/x", authorization=paid))  # not its secret
            unpriced = await two.handle(request("/elsewhere"))
        assert isinstance(granted, Forward) and granted.note and granted.note["variant"] == "paid"
        assert isinstance(limited, Answer) and limited.status == 429
        assert isinstance(forged, Answer) and forged.status == 401
        assert isinstance(unpriced, Forward)
    counted = {k: v for k, v in changes.items() if not k[0].endswith("_sum")}
    assert counted == {
        key("l402_decisions_total", door="one", kind="challenge", dry_run="false"): 1,
        key("l402_decisions_total", door="one", kind="grant", dry_run="false"): 1,
        key("l402_decisions_total", door="one", kind="limited", dry_run="false"): 1,
        key("l402_decisions_total", door="two", kind="challenge", dry_run="false"): 1,
        key("l402_decisions_total", door="two", kind="pass", dry_run="false"): 1,
        key("l402_decision_duration_seconds_count", door="one"): 3,
        key("l402_decision_duration_seconds_count", door="two"): 2,
        key("l402_challenges_total", door="one", service="api", status="402"): 1,
        key("l402_challenges_total", door="two", service="api", status="401"): 1,
        key("l402_tokens_refused_total", door="two", service="api", reason="bad_signature"): 1,
        key("l402_tokens_accepted_total", door="one", service="api"): 1,
        key("l402_rate_limited_requests_total", door="one", service="api", reason="token"): 1,
        # Each challenge came with a fresh invoice (the 401 too); the grant asked for none.
        key("l402_backend_request_duration_seconds_count", operation="create_invoice"): 2,
    }


# -- serving -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(port: int = 0, host: str = "127.0.0.1") -> AsyncIterator[MetricsServer]:
    server = await MetricsServer.start(host, port)
    try:
        yield server
    finally:
        await server.close()


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` and read the whole answer (the server closes every connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), headers, body


async def test_metrics_are_served_as_prometheus_text() -> None:
    metrics().decided(Decision(DOOR, "challenge", "api", 402, "payment_required"))
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    async with serving() as server:
        assert server.port > 0
        # The loop's signal handling is the door's: we take none.
        assert signal.getsignal(signal.SIGINT) is sigint
        assert signal.getsignal(signal.SIGTERM) is sigterm
        status, headers, body = await exchange(
            server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert headers["Connection"] == "close"
        assert int(headers["Content-Length"]) == len(body)
        names = {family.name for family in text_string_to_metric_families(body.decode())}
        assert {"l402_decisions", "l402_challenges", "l402_decision_duration_seconds"} <= names
        assert all(name.startswith("l402_") for name in names)
        assert b"_created" not in body
        status, _, _ = await exchange(server.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert status == 200
        status, head_headers, head_body = await exchange(
            server.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 200 and head_body == b""
        assert head_headers["Content-Type"] == CONTENT_TYPE
        assert int(head_headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    ("raw", "status", "empty"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 404, False),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", 404, False),
        (b"GET /metrics/ HTTP/1.1\r\n\r\n", 404, False),
        (b"HEAD /other HTTP/1.1\r\n\r\n", 404, True),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, False),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405, False),
        (b"hello\r\n\r\n", 400, False),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400, False),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400, False),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, 431, False),
    ],
)
async def test_anything_but_get_or_head_of_metrics_is_refused(
    raw: bytes, status: int, empty: bool
) -> None:
    async with serving() as server:
        got, headers, body = await exchange(server.port, raw)
    assert got == status
    assert headers["Connection"] == "close"
    assert (body == b"") is empty
    if status == 405:
        assert headers["Allow"] == "GET, HEAD"


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed or reset the connection."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""


async def test_a_slow_client_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "CLIENT_SECONDS", 0.2)
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        assert await read_until_closed(reader) == b""
        writer.close()


async def test_clients_past_the_limit_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_CLIENTS", 1)
    async with serving() as server:
        # A client that holds the only place with an unfinished request...
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
        slow_writer.write(b"GET /metrics HTTP/1.1\r\n")
        # ...and another connection is dropped unanswered.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert await read_until_closed(reader) == b""
        writer.close()
        # Once the first client gives up (half-closes) and the server has closed its side
        # (it gives the place back before that), the place is free again.
        slow_writer.write_eof()
        assert await read_until_closed(slow_reader) == b""
        slow_writer.close()
        status, _, _ = await exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200


async def test_close_cuts_connected_clients_and_frees_the_port() -> None:
    server = await MetricsServer.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")  # connected, request unfinished
    await asyncio.wait_for(server.close(), 10)
    await server.close()  # twice is fine
    assert await read_until_closed(reader) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_two_servers_on_one_address_in_one_process_share_it() -> None:
    port = free_port()
    first = await MetricsServer.start("127.0.0.1", port)
    second = await MetricsServer.start("127.0.0.1", port)  # a second middleware, same option
    assert first.port == second.port == port
    await first.close()
    status, _, _ = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 200  # still served for the second one
    await second.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    again = await MetricsServer.start("127.0.0.1", port)  # and the address can be had again
    await again.close()


async def test_an_address_that_cannot_be_had_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ListenError, match=rf"^metrics: cannot listen on 127.0.0.1:{port}: .*in use"
        ):
            await MetricsServer.start("127.0.0.1", port)
    # TEST-NET-1: no interface of this machine has it.
    with pytest.raises(ListenError, match=r"^metrics: cannot listen on 192.0.2.1:\d+: "):
        await MetricsServer.start("192.0.2.1", free_port())
    with pytest.raises(ListenError, match=r"^metrics: cannot resolve "):
        await MetricsServer.start("no-such-host.invalid", free_port())


# -- multiprocess values -----------------------------------------------------------------------


def run_python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={k: v for k, v in os.environ.items() if "multiproc" not in k.lower()} | env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


COUNT_ONE = """
    {before}
    from l402proxy.engine.events import Decision
    from l402proxy.ops.metrics import exposition, metrics, multiprocess
    {between}
    metrics().decided(Decision("worker", "grant", "api", None))
    import prometheus_client.values
    print(multiprocess(), prometheus_client.values.ValueClass._multiprocess)
    print(exposition().decode())
"""


@pytest.mark.parametrize(
    ("before", "between"),
    [
        ("", ""),
        # The variable set after prometheus_client was imported (which picks the value class
        # then): our values must still go to the files, or /metrics would miss this worker.
        (
            "import os, prometheus_client",
            "os.environ['PROMETHEUS_MULTIPROC_DIR'] = os.environ.pop('L402_TEST_DIR')",
        ),
    ],
    ids=["set-before", "set-after-import"],
)
def test_multiprocess_values_go_to_the_shared_directory(
    tmp_path: Path, before: str, between: str
) -> None:
    name = "PROMETHEUS_MULTIPROC_DIR" if not between else "L402_TEST_DIR"
    done = run_python(COUNT_ONE.format(before=before, between=between), {name: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "True True"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("counter_")]
    served = {
        (s.name, s.labels.get("door")): s.value
        for family in text_string_to_metric_families(done.stdout.split("\n", 1)[1])
        for s in family.samples
    }
    assert served[("l402_tokens_accepted_total", "worker")] == 1


def test_a_multiprocess_directory_that_is_missing_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = run_python(
        """
        from l402proxy.ops.metrics import MetricsError, metrics
        try:
            metrics()
        except MetricsError as exc:
            print(exc)
        """,
        {"PROMETHEUS_MULTIPROC_DIR": str(missing)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"PROMETHEUS_MULTIPROC_DIR='{missing}' is not a directory: create it (empty) before the "
        "workers start; each keeps its metric values in a file there\n"
    )


def test_multiprocess_follows_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        monkeypatch.delenv(name, raising=False)
    assert not multiprocess()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp")
    assert multiprocess()
