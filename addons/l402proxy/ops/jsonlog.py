"""JSON logs (`l402_log_format=json`): one JSON object per line for each of the paywall's log
lines, and one line per decision the engine makes.

- `DecisionLog` is a watcher of engine/events.py: one INFO record per decision on the logger
  "l402proxy.decisions" (a short message for people, the Decision's fields as structured data),
  one line per settled invoice, and one per backend or store failure (repeats of the same
  failure are summed up, at most one line a minute: a database that is down for an hour is not
  14,400 lines).
- `JsonFormatter` writes a record as one line: ts (ISO 8601, UTC), level, logger, msg, the
  record's structured fields, and an exception as `exc` (its type and message) with `exc_trace`
  (its frames, a list): every string escaped, the output ASCII, so no record ever takes two
  lines, whatever a message holds (line breaks, U+2028, stray bytes).
- `use_json_logs()` puts it on the "l402proxy" logger and stops propagation there, so the
  host's own logging (mitmproxy's terminal log, uvicorn's) does not print the line again.

Secrets: the DecisionLog only writes what a Decision holds (events.py: a service name, a kind,
a reason word, a status, the first 8 hex digits of a token id, timings), never a macaroon,
preimage, invoice, cookie, header, path or client address. Every line the formatter writes is
still scrubbed (`redact`), as defence in depth against a message somewhere else that quotes too
much: see REDACTED_SHAPES.
"""

import datetime
import json
import logging
import math
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from ..engine.events import TOKEN_PREFIX_LEN, Decision

ROOT_LOGGER = "l402proxy"
DECISIONS_LOGGER = "l402proxy.decisions"
REDACTED = "[redacted]"
# The same backend or store failure is logged once, then summed up at most this often.
QUIET_SECONDS = 60.0

# -- redaction ---------------------------------------------------------------------------------

_B64 = r"A-Za-z0-9+/_\-"  # base64, standard and URL-safe alphabets
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
# Names whose value is a secret wherever it is written `name=value` or `name: value` (JSON,
# YAML, a query string, a Python repr).
_SECRET_NAMES = (
    r"macaroons?|preimage|secret|password|passwd|api[_-]?key|root[_-]?key|private[_-]?key"
    r"|access[_-]?token|admin[_-]?key|invoice[_-]?key"
)
_HEADER_NAMES = r"(?:proxy-)?authorization|(?:set-)?cookies?|x-api-key|grpc-metadata-macaroon"
# `name: value`, `name=value`, `"name": "value"`, `b'name': b'value'`, `('name', 'value')`.
_SEPARATOR = r"""(?:["']?[ \t]*[:=][ \t]*(?:b?["'])?|["'][ \t]*,[ \t]*b?["'])"""

# (what it is, pattern, replacement), applied in this order to every string a line holds.
# Each pattern starts at a fixed word or at the start of a run, and bounds what it looks back
# over: a long line (a body someone logged) costs linear time, never quadratic.
REDACTED_SHAPES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "an Authorization, Cookie, Set-Cookie, X-Api-Key or Grpc-Metadata-Macaroon header's "
        "value (up to the end of the line or a quote)",
        re.compile(rf"(?i)\b({_HEADER_NAMES})({_SEPARATOR})(?!\[redacted\])[^\s\"'][^\"'\r\n]*"),
        rf"\1\2{REDACTED}",
    ),
    (
        "the credential or macaroon after the L402 / LSAT scheme (`L402 <macaroon>:<preimage>`)",
        re.compile(
            rf"(?i)\b(L402|LSAT)([ \t]+)(?!macaroon=)[{_B64}]{{16,}}={{0,2}}"
            rf"(?:,[{_B64}]+={{0,2}})*(?::[0-9A-Fa-f]*)?"
        ),
        rf"\1\2{REDACTED}",
    ),
    (
        "a bearer token (`Bearer <secret>`)",
        re.compile(r"(?i)\b(Bearer)([ \t]+)(?!\[redacted\])[A-Za-z0-9+/=_\-.~]{8,}"),
        rf"\1\2{REDACTED}",
    ),
    (
        "the value of our cookies (`L402_<service>=...`, `L402claim.<id>=...`)",
        re.compile(r"\b(L402(?:_[\w-]+|claim\.[0-9A-Fa-f]+)=)(?!\[redacted\])[^;\s\"',]+"),
        rf"\1{REDACTED}",
    ),
    (
        "a credential without its scheme (`<base64 macaroon>:<64 hex digits preimage>`)",
        re.compile(rf"(?<![{_B64}])[{_B64}]{{20,}}={{0,2}}:[0-9A-Fa-f]{{64}}\b"),
        REDACTED,
    ),
    (
        "the value after a secret's name (macaroon=, preimage=, secret=, password=, api_key=, "
        "root_key=, ...: 16 characters or more, not a file path)",
        re.compile(
            rf"(?i)((?:{_SECRET_NAMES})[\w-]{{0,24}}?)({_SEPARATOR})"
            r"(?![/~.]|\[redacted\])[A-Za-z0-9+/=_\-.~%:]{16,}"
        ),
        rf"\1\2{REDACTED}",
    ),
    (
        "a BOLT11 invoice (ln<currency><amount>1<bech32 data>, `lightning:` or not)",
        re.compile(rf"(?i)\bln(?!url)[a-z0-9]{{1,24}}?1[{_BECH32}]{{50,}}\b"),
        REDACTED,
    ),
)


def redact(text: str) -> str:
    """`text` with every secret-shaped part replaced by [redacted] (REDACTED_SHAPES)."""
    for _what, pattern, replacement in REDACTED_SHAPES:
        text = pattern.sub(replacement, text)
    return text


# -- the formatter -----------------------------------------------------------------------------

# What every LogRecord has; anything else on a record is a structured field (`extra=`).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_TOP = ("ts", "level", "logger", "msg")


def _value(value: Any, depth: int = 0) -> Any:
    """A JSON value for a field, strings redacted; NaN and infinities (invalid JSON) as None."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return redact(value)
    if depth < 4 and isinstance(value, list | tuple | set | frozenset):
        return [_value(item, depth + 1) for item in value]
    if depth < 4 and isinstance(value, dict):
        return {str(key): _value(item, depth + 1) for key, item in value.items()}
    return redact(str(value))


def _timestamp(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _frames(tb: Any) -> list[str]:
    return [
        f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in traceback.extract_tb(tb)
    ]


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts, level, logger, msg, the structured fields
    (the record's `extra=`), and `exc` / `exc_trace` for an exception. Never raises for a
    record: a message whose arguments do not fit is written as it stands."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg} (log arguments did not fit: {record.args!r})"
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(message),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            line[f"field_{key}" if key in _TOP else key] = _value(value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["exc"] = redact(f"{type(exc).__name__}: {exc}")
            line["exc_trace"] = [redact(frame) for frame in _frames(record.exc_info[2])]
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = [redact(part) for part in record.stack_info.splitlines()]
        # ASCII with every control character escaped: one physical line, whatever the content
        # (a bare CR, U+2028, a lone surrogate from a path that was not UTF-8).
        return json_line(line)


def json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=str)


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose own failures are one JSON line too (logging's default prints a
    traceback over several lines)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        try:
            line = {
                "ts": _timestamp(time.time()),
                "level": "ERROR",
                "logger": __name__,
                "msg": f"a log line of {record.name} could not be written: {type(exc).__name__}",
            }
            self.stream.write(json_line(line) + self.terminator)
            self.flush()
        except Exception:
            pass  # the stream itself is gone: nothing left to tell


# One JSON handler per stream, shared by every use_json_logs() on it (two ASGI middlewares in
# one process must not print each line twice); the logger's state from before the first one.
_installed: dict[int, tuple[JsonHandler, int]] = {}
_before: tuple[bool, int] | None = None
_lock = threading.Lock()


def use_json_logs(stream: TextIO | None = None) -> Callable[[], None]:
    """Write the "l402proxy" logger's records (INFO and up) as JSON lines to `stream` (default:
    stderr) and nowhere else: propagation stops there, so mitmproxy's or uvicorn's handlers do
    not print them again. Returns the undo (safe to call twice); the last undo puts the
    logger's level and propagation back."""
    global _before
    target = stream if stream is not None else sys.stderr
    logger = logging.getLogger(ROOT_LOGGER)
    with _lock:
        if not _installed:
            _before = (logger.propagate, logger.level)
        key = id(target)
        handler, count = _installed.get(key, (None, 0))
        if handler is None:
            handler = JsonHandler(target)
            handler.setFormatter(JsonFormatter())
            logger.addHandler(handler)
        _installed[key] = (handler, count + 1)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    undone = False

    def undo() -> None:
        nonlocal undone
        global _before
        with _lock:
            if undone:
                return
            undone = True
            handler, count = _installed[key]
            if count > 1:
                _installed[key] = (handler, count - 1)
                return
            del _installed[key]
            logger.removeHandler(handler)
            if not _installed and _before is not None:
                logger.propagate, level = _before
                logger.setLevel(level)
                _before = None

    return undo


# -- the decision log --------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class DecisionLog:
    """A watcher (engine/events.py) that logs each decision, settled invoice and failure. Every
    field comes from the event's own safe fields; the message repeats them for people."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        quiet_seconds: float = QUIET_SECONDS,
    ) -> None:
        self.log = logger if logger is not None else logging.getLogger(DECISIONS_LOGGER)
        self.clock = clock
        self.quiet_seconds = quiet_seconds
        # (event, door, operation) -> (when it was last logged, repeats not logged since).
        self._failures: dict[tuple[str, str, str], tuple[float, int]] = {}

    def decided(self, decision: Decision) -> None:
        token = decision.token[:TOKEN_PREFIX_LEN] if decision.token else None
        fields = {
            "event": "decision",
            "door": decision.door,
            "kind": decision.kind,
            "service": decision.service,
            "status": decision.status,
            "reason": decision.reason,
            "token": token,
            "latency_ms": _ms(decision.seconds),
            "method": decision.method,
            "dry_run": decision.dry_run,
        }
        said = [f"l402: {decision.method or '-'} {decision.service or '-'}: {decision.kind}"]
        if decision.status is not None:
            said.append(str(decision.status))
        if decision.reason:
            said.append(f"({decision.reason})")
        if token:
            said.append(f"token {token}")
        if decision.dry_run:
            said.append("[dry run: forwarded]")
        self.log.info(" ".join(said), extra=fields)

    def settled(self, door: str, service: str, price_sat: int) -> None:
        self.log.info(
            f"l402: invoice settled: {service}, {price_sat} sat",
            extra={"event": "settled", "door": door, "service": service, "price_sat": price_sat},
        )

    def backend_called(self, door: str, operation: str, seconds: float, ok: bool) -> None:
        if ok:
            return  # counted by the metrics; a log line each would only be noise
        repeats = self._repeats("backend", door, operation)
        if repeats is None:
            return
        self.log.warning(
            f"l402: the Lightning backend failed: {operation}" + _more(repeats),
            extra={
                "event": "backend_failed",
                "door": door,
                "operation": operation,
                "latency_ms": _ms(seconds),
                "repeats": repeats,
            },
        )

    def store_failed(self, door: str, operation: str) -> None:
        repeats = self._repeats("store", door, operation)
        if repeats is None:
            return
        self.log.warning(
            f"l402: the token store failed: {operation}" + _more(repeats),
            extra={"event": "store_failed", "door": door, "operation": operation,
                   "repeats": repeats},
        )  # fmt: skip

    def upstream_answered(self, door: str, service: str | None, seconds: float) -> None:
        """The origin's latency is a metric, not a line per request."""

    def _repeats(self, event: str, door: str, operation: str) -> int | None:
        """None: stay quiet (a repeat within quiet_seconds of the last line); else how many
        repeats were not logged since that line."""
        key = (event, door, operation)
        now = self.clock()
        last = self._failures.get(key)
        if last is not None and now - last[0] < self.quiet_seconds:
            self._failures[key] = (last[0], last[1] + 1)
            return None
        self._failures[key] = (now, 0)
        return 0 if last is None else last[1]


def _more(repeats: int) -> str:
    return f" ({repeats} more time(s) since the last line)" if repeats else ""
