"""JSON logs (ops/jsonlog.py): one JSON object per line, whatever a record holds; secrets
scrubbed from every line; the decision log's fields; installing and undoing the handler."""

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l402proxy.engine.events import Decision
from l402proxy.ops.jsonlog import (
    DECISIONS_LOGGER,
    REDACTED,
    DecisionLog,
    JsonFormatter,
    redact,
    use_json_logs,
)
from tests.unit.test_events import RULES
from tests.unit.test_rate_limits import bought, engine_with, request

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
MACAROON = "AgELbDQwMnByb3h5LmRldgJCAAC3b2S1n0nJ0ZpXc8Zs9yq7FfB0eTqV8p7hM1xYzQ"
PREIMAGE = "9f" * 32
INVOICE = (
    "lnbcrt210n1pjq8s0fpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsdqqcqzzsxqyz5vq"
    "sp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygs9qyyssq"
)


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """The JSON log of the "l402proxy" logger, into a buffer; undone after the test."""
    stream = io.StringIO()
    undo = use_json_logs(stream)
    try:
        yield stream
    finally:
        undo()


def read(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


def record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("l402proxy.test", logging.INFO, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


# -- the formatter -----------------------------------------------------------------------------


def test_a_record_is_one_json_object_with_its_fields() -> None:
    line = JsonFormatter().format(record("l402: %s sold", "api", service="api", price_sat=5))
    parsed = json.loads(line)
    assert list(parsed)[:4] == ["ts", "level", "logger", "msg"]
    assert TS.fullmatch(parsed["ts"])
    assert parsed | {"ts": ""} == {
        "ts": "",
        "level": "INFO",
        "logger": "l402proxy.test",
        "msg": "l402: api sold",
        "service": "api",
        "price_sat": 5,
    }


@pytest.mark.parametrize(
    "nasty",
    ["two\nlines", "a bare \r CR", "line\u2028separator", "next\x85line", "raw \udcff byte",
     "tab\tand NUL\x00", "form\x0cfeed", "\u2029"],
)  # fmt: skip
def test_no_record_ever_takes_two_lines(nasty: str) -> None:
    line = JsonFormatter().format(record(nasty, detail=nasty, items=[nasty]))
    assert len(line.splitlines()) == 1 and line.isascii()
    parsed = json.loads(line)
    assert parsed["msg"] == parsed["detail"] == parsed["items"][0] == nasty


def test_an_exception_is_one_line_with_its_frames() -> None:
    def failing() -> None:
        raise ValueError("boom\nsecond line")

    try:
        failing()
    except ValueError:
        made = record("it failed")
        made.exc_info = sys.exc_info()
    line = JsonFormatter().format(made)
    assert len(line.splitlines()) == 1
    parsed = json.loads(line)
    assert parsed["exc"] == "ValueError: boom\nsecond line"
    assert any(frame.endswith("in failing") for frame in parsed["exc_trace"])


def test_odd_values_and_bad_arguments_never_raise() -> None:
    made = record("%d items", "not a number", ratio=float("nan"), big=float("inf"),
                  raw=b"bytes", obj=object(), level="shadows the top key")  # fmt: skip
    parsed = json.loads(JsonFormatter().format(made))
    assert parsed["msg"].startswith("%d items") and "did not fit" in parsed["msg"]
    assert parsed["ratio"] is None and parsed["big"] is None
    assert parsed["raw"] == "b'bytes'" and parsed["obj"].startswith("<object")
    assert parsed["level"] == "INFO" and parsed["field_level"] == "shadows the top key"


# -- redaction ---------------------------------------------------------------------------------

SECRET_LINES = [
    f"Authorization: L402 {MACAROON}:{PREIMAGE}",
    f"l402: got LSAT {MACAROON}:{PREIMAGE} from somewhere",
    f"credential L402 {MACAROON},{MACAROON}:{PREIMAGE}",
    f'WWW-Authenticate: L402 macaroon="{MACAROON}", invoice="{INVOICE}"',
    f'{{"macaroon": "{MACAROON}", "preimage": "{PREIMAGE}", "invoice": "{INVOICE}"}}',
    f"macaroon={MACAROON}&preimage={PREIMAGE}",
    f"[(b'Host', b'x'), (b'Cookie', b'L402_podcast={MACAROON}:{PREIMAGE}; theme=dark')]",
    f"Set-Cookie: L402_bonus={MACAROON}:{PREIMAGE}; Path=/bonus/; HttpOnly",
    f"the cookie L402_bonus={MACAROON}:{PREIMAGE} was sent",
    f"L402claim.0011223344556677={PREIMAGE}.1700000000",
    f"scheme-less {MACAROON}:{PREIMAGE} here",
    f"pay lightning:{INVOICE} now",
    f"pay {INVOICE.upper()} now",
    f"Authorization: Bearer {PREIMAGE}",
    f"bearer {PREIMAGE}",
    f"X-Api-Key: {PREIMAGE}",
    f"Grpc-Metadata-macaroon: {PREIMAGE}{PREIMAGE}",
    f"secret={PREIMAGE}",
    f"'root_key': '{PREIMAGE}'",
    f"admin_secret: {PREIMAGE}",
]


@pytest.mark.parametrize("line", SECRET_LINES)
def test_secrets_are_redacted(line: str) -> None:
    scrubbed = redact(line)
    assert REDACTED in scrubbed
    for secret in (MACAROON, PREIMAGE, INVOICE, INVOICE.upper(), PREIMAGE[:32]):
        assert secret not in scrubbed, scrubbed
    assert redact(scrubbed) == scrubbed  # scrubbing twice changes nothing


@pytest.mark.parametrize(
    "line",
    [
        "l402: GET api: grant token a1b2c3d4",
        "l402: 3 token(s) revoked",
        "l402: admin API and page at http://127.0.0.1:9403/ (bearer secret in /root/.l402/x)",
        "l402_admin_secret: refused, the file is not ours",
        "l402_admin_secret=/var/lib/l402proxy/admin-secret",
        "Vary: Authorization, Cookie, Accept-Authenticate",
        "a paid Authorization/Cookie is sent once",
        f"payment_hash={PREIMAGE}",  # not a secret: it is in the invoice for all to see
        "L402 paid: podcast",
        "L402_bonus=; Path=/bonus/; Max-Age=0",
        "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0v9cxj0m385ekvcenxc6r2c35xvukxefcv5mkvv34x5ekzd3ev",
    ],
)
def test_ordinary_lines_are_left_alone(line: str) -> None:
    assert redact(line) == line


@pytest.mark.parametrize(
    "long",
    ["A" * 200_000, "a." * 100_000, "a-" * 100_000, "L402 " + "A" * 200_000, "ln" + "q" * 200_000,
     "secret_" * 30_000, (PREIMAGE + ":") * 5_000, "Cookie: " + "x=1; " * 40_000],
)  # fmt: skip
def test_a_long_message_is_scrubbed_in_linear_time(long: str) -> None:
    """Someone logs a whole body: every pattern starts at a fixed word or a run's start, so
    this is milliseconds (a quadratic pattern ran for minutes, into the test's timeout)."""
    scrubbed = redact(long)
    assert len(JsonFormatter().format(record(long)).splitlines()) == 1
    assert len(scrubbed) <= len(long)


def test_the_formatter_redacts_the_message_the_fields_and_the_exception() -> None:
    try:
        raise RuntimeError(f"cannot parse L402 {MACAROON}:{PREIMAGE}")
    except RuntimeError:
        made = record(
            "sent %s",
            f"Cookie: L402_api={MACAROON}:{PREIMAGE}",
            header=f"L402 {MACAROON}:{PREIMAGE}",
            nested={"bolt11": [INVOICE]},
        )
        made.exc_info = sys.exc_info()
    line = JsonFormatter().format(made)
    for secret in (MACAROON, PREIMAGE, INVOICE):
        assert secret not in line
    parsed = json.loads(line)
    assert parsed["header"] == f"L402 {REDACTED}" and parsed["nested"] == {"bolt11": [REDACTED]}


# -- installing it -----------------------------------------------------------------------------


def test_use_json_logs_writes_only_json_and_undoes(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("l402proxy")
    before = (logger.propagate, logger.level, list(logger.handlers))
    stream = io.StringIO()
    caplog.set_level(logging.DEBUG)
    undo = use_json_logs(stream)
    try:
        logging.getLogger("l402proxy.engine.core").info("l402: one")
        logging.getLogger("l402proxy.engine.core").debug("l402: too fine")
        logging.getLogger("somebody.else").warning("not ours")
    finally:
        undo()
    undo()  # twice: nothing more happens
    assert [line["msg"] for line in read(stream)] == ["l402: one"]
    # Not propagated: the host's handlers (here pytest's, on the root) print it nowhere else.
    assert [r.getMessage() for r in caplog.records] == ["not ours"]
    assert (logger.propagate, logger.level, list(logger.handlers)) == before
    logging.getLogger("l402proxy.engine.core").info("l402: after")
    assert len(read(stream)) == 1


def test_the_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    undo = use_json_logs()
    try:
        logging.getLogger("l402proxy.x").warning("l402: to stderr")
    finally:
        undo()
    out, err = capsys.readouterr()
    assert out == "" and json.loads(err)["msg"] == "l402: to stderr"


def test_two_installs_on_one_stream_print_each_line_once() -> None:
    stream, other = io.StringIO(), io.StringIO()
    first, second, elsewhere = use_json_logs(stream), use_json_logs(stream), use_json_logs(other)
    log = logging.getLogger("l402proxy.doors.asgi")
    try:
        log.info("l402: both")
        first()
        log.info("l402: still")
        elsewhere()
        log.info("l402: one stream")
    finally:
        second()
        elsewhere()
    log.info("l402: gone")
    assert [line["msg"] for line in read(stream)] == [
        "l402: both",
        "l402: still",
        "l402: one stream",
    ]
    assert [line["msg"] for line in read(other)] == ["l402: both", "l402: still"]
    assert logging.getLogger("l402proxy").propagate


def test_a_stream_that_fails_gives_one_json_line_not_a_traceback() -> None:
    class Flaky(io.StringIO):
        fail = True

        def write(self, text: str) -> int:
            if self.fail:
                self.fail = False
                raise OSError("disk full")
            return super().write(text)

    stream = Flaky()
    undo = use_json_logs(stream)
    try:
        logging.getLogger("l402proxy.x").info("l402: lost")
    finally:
        undo()
    (line,) = read(stream)
    assert line["level"] == "ERROR" and "could not be written: OSError" in line["msg"]


# -- the decision log --------------------------------------------------------------------------


def test_a_decision_is_one_info_line_with_its_fields(lines: io.StringIO) -> None:
    watcher = DecisionLog()
    watcher.decided(
        Decision("asgi", "grant", "api", None, None, "ab" * 32, 0.0012345, "GET", dry_run=True)
    )
    watcher.decided(Decision("nginx", "challenge", "bonus", 402, "payment_required", None, 0.01))
    grant, challenge = read(lines)
    assert grant["logger"] == DECISIONS_LOGGER and grant["level"] == "INFO"
    assert {k: grant[k] for k in list(grant)[4:]} == {
        "event": "decision", "door": "asgi", "kind": "grant", "service": "api", "status": None,
        "reason": None, "token": "abababab", "latency_ms": 1.234, "method": "GET",
        "dry_run": True,
    }  # fmt: skip
    assert grant["msg"] == "l402: GET api: grant token abababab [dry run: forwarded]"
    assert challenge["msg"] == "l402: - bonus: challenge 402 (payment_required)"
    assert (challenge["status"], challenge["reason"]) == (402, "payment_required")


def test_settled_and_failures_are_one_line_each_and_repeats_are_summed(
    lines: io.StringIO,
) -> None:
    now = [1000.0]
    watcher = DecisionLog(clock=lambda: now[0], quiet_seconds=60)
    watcher.settled("mitmproxy", "api", 5)
    watcher.backend_called("mitmproxy", "create_invoice", 0.2, True)  # fine: no line
    watcher.upstream_answered("mitmproxy", "api", 0.1)  # a metric, no line
    for _ in range(5):
        watcher.store_failed("mitmproxy", "flush")
        watcher.backend_called("mitmproxy", "create_invoice", 0.2, False)
        now[0] += 1
    watcher.store_failed("mitmproxy", "revocations")  # another operation: its own line
    now[0] += 60
    watcher.store_failed("mitmproxy", "flush")
    told = [(line["level"], line["event"], line.get("operation"), line.get("repeats"))
            for line in read(lines)]  # fmt: skip
    assert told == [
        ("INFO", "settled", None, None),
        ("WARNING", "store_failed", "flush", 0),
        ("WARNING", "backend_failed", "create_invoice", 0),
        ("WARNING", "store_failed", "revocations", 0),
        ("WARNING", "store_failed", "flush", 4),
    ]
    settled = read(lines)[0]
    assert (settled["service"], settled["price_sat"], settled["door"]) == ("api", 5, "mitmproxy")
    assert read(lines)[-1]["msg"].endswith("(4 more time(s) since the last line)")


async def test_a_paid_flow_logs_every_decision_and_no_secret(
    tmp_path: Path, lines: io.StringIO
) -> None:
    async with engine_with(tmp_path, RULES) as (engine, _):
        engine.watchers.add(DecisionLog())
        credential = await bought(engine, tmp_path)
        macaroon, preimage = credential.removeprefix("L402 ").split(":")
        await engine.handle(request("/api/x", authorization=credential))
        await engine.handle(request("/api/x", Cookie=f"L402_api={macaroon}:{preimage}"))
        await engine.handle(request("/api/x", authorization="L402 bogus:00"))
        await engine.handle(request("/elsewhere"))
        secret = engine.secret.hex()
    text = lines.getvalue()
    decisions = [line for line in read(lines) if line["logger"] == DECISIONS_LOGGER]
    assert [(d["kind"], d["status"]) for d in decisions] == [
        ("challenge", 402), ("grant", None), ("grant", None), ("challenge", 401), ("pass", None)
    ]  # fmt: skip
    assert decisions[1]["token"] == decisions[2]["token"] and len(decisions[1]["token"]) == 8
    for leak in (macaroon, preimage, secret, macaroon[:24]):
        assert leak not in text
