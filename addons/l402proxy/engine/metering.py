"""Bundles of bytes and units: what a door does with the response to a metered request.

A token of a rule with `bundle: {bytes: SIZE}` or `bundle: {units: N, usage_header: X-Usage}`
is not drawn from when the request comes: the engine only checks that something is left (a
spent token gets the 402 for a new bundle, as a bundle of requests does) and forwards the
request with a note saying what to meter (`meter_note`, under METER in the Forward's note). What
the answer costs is known only from the answer, so the door charges it (`Metered`):

- bytes: the response body bytes the door hands to the client, as they go (content-coded as the
  origin sent them, without the HTTP/1 chunk framing; a HEAD answer counts 0, a 206 its part),
  charged once when the response ends, or when the client goes away mid-stream (what was sent
  until then). The announced balance is the balance before, less Content-Length when the
  answer says it (else the balance before: a stream's size is unknown when its head goes out).
- units: the origin reports them in the usage header (a decimal integer >= 0), which never
  reaches the client (every field of that name, any spelling, on every response the door
  forwards: `usage_headers`); charged when the response head comes, so the announced balance
  is what the store has left after the charge. A missing or unreadable report costs
  FALLBACK_UNITS and a warning naming the rule: the bundle still runs out (a buggy origin
  never makes it unlimited), and no client loses its balance to the origin's bug.

X-L402-Balance on the response head says what will be left after this answer, as best known
then. Charges never go below 0 (`TokenStore.charge`): requests in flight when the balance runs
out all finish, and the next request gets the 402. A charge that fails (the store is down) is
logged and told to the watchers (store_failed, operation "charge"); the answer already sent is
not taken back, and nothing is raised into the door. A charge runs to its end even if the
request's task is cancelled (the client went away): it is money.

Plain data and coroutines only: no door library is imported here.
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..rules import Bundle, Rule, RuleSet
from .answers import BALANCE_HEADER, Answer, bad_request_answer
from .request import Fields, set_one

if TYPE_CHECKING:
    from ..store import TokenStore
    from .core import Paywall
    from .events import Watchers

log = logging.getLogger(__name__)

# The Forward note's key for what a door meters.
METER = "meter"
METERED_UNITS = ("bytes", "units")
# What a response whose usage report is missing or unreadable costs (see the module).
FALLBACK_UNITS = 1
# A usage report longer than this is no count of anything (and never a 64-bit overflow).
MAX_USAGE_DIGITS = 18
# The same problem of the same rule is logged at most this often (an origin that never sends
# its usage header would write a line per request).
WARN_EVERY_SECONDS = 60.0
# Statuses whose answers carry no body whatever their Content-Length says.
_NO_BODY_STATUSES = frozenset({204, 304})


def meter_note(
    token_id: bytes, rule: Rule, bundle: Bundle, before: int, source: str
) -> dict[str, Any]:
    """What the engine puts under METER in the Forward's note for a token of `bundle` (the
    one it was sold with: a pass's may be another service's) with `before` left, used at
    `rule`: its origin reports the units, in its own usage header. Plain values (mitmproxy
    keeps the note with the flow)."""
    assert bundle.unit in METERED_UNITS
    header = rule.bundle.usage_header if rule.bundle is not None else None
    return {
        "token": token_id.hex(),
        "unit": bundle.unit,
        "size": bundle.size,
        "before": before,
        "header": header or bundle.usage_header,
        "rule": f"service '{rule.name}' ({source}:{rule.line})",
    }


@dataclass(frozen=True, slots=True)
class Meter:
    """A METER note read back: whose balance, in which unit, what it held before the request."""

    token_id: bytes
    unit: str
    size: int
    before: int
    header: str | None
    rule: str

    @classmethod
    def of(cls, note: Mapping[str, Any] | None) -> "Meter | None":
        """The meter of a Forward's note; None when it has none. ValueError for one that is not
        the engine's (a door must then refuse the answer, never serve it unmetered)."""
        meter = note.get(METER) if note is not None else None
        if meter is None:
            return None
        try:
            found = cls(
                token_id=bytes.fromhex(meter["token"]),
                unit=meter["unit"],
                size=int(meter["size"]),
                before=int(meter["before"]),
                header=meter.get("header"),
                rule=str(meter.get("rule", "a metered service")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a meter note: {meter!r}") from exc
        if found.unit not in METERED_UNITS or found.size < 1 or found.before < 0:
            raise ValueError(f"not a meter note: {meter!r}")
        if found.unit == "units" and not found.header:
            raise ValueError(f"a units meter without its usage header: {meter!r}")
        return found


# -- reading and writing header fields -----------------------------------------------------------


def content_length(fields: Fields) -> int | None:
    """The body size a response head announces: one Content-Length of digits only (repeats of
    the same value count as one), else None (absent, broken or contradictory)."""
    found: int | None = None
    for name, value in fields:
        if name.lower() != b"content-length":
            continue
        text = value.strip()
        if not text.isdigit() or not text.isascii() or len(text) > MAX_USAGE_DIGITS:
            return None
        size = int(text)
        if found is not None and size != found:
            return None
        found = size
    return found


def read_usage(fields: Fields, header: str) -> tuple[int | None, str | None]:
    """The units the origin reports in `header` (any spelling; several fields, or a list in
    one, read as repeats): (units, None), or (None, why not) when it is missing or unreadable.
    Repeats that disagree count the largest (an origin that adds the header twice)."""
    wanted = header.lower().encode()
    values: list[bytes] = []
    for name, value in fields:
        if name.lower() == wanted:
            values.extend(value.split(b","))
    if not values:
        return None, f"its {header} header is missing"
    counts: list[int] = []
    for value in values:
        text = value.strip()
        if not text.isdigit() or not text.isascii() or len(text) > MAX_USAGE_DIGITS:
            shown = value.decode("latin-1")[:40]
            return None, f"its {header} header is not a whole number of units: {shown!r}"
        counts.append(int(text))
    return max(counts), None


def without(fields: Fields, names: frozenset[bytes]) -> Fields:
    """`fields` less every field whose lower-case name is in `names` (the same tuple when none
    is there: nothing is copied on the common path)."""
    if not names or not any(name.lower() in names for name, _ in fields):
        return fields
    return tuple(field for field in fields if field[0].lower() not in names)


_usage_cache: tuple[object, frozenset[bytes]] = (None, frozenset())


def usage_headers(rules: RuleSet | None) -> frozenset[bytes]:
    """Lower-case names of every units rule's usage header: no client ever sees one, on any
    response a door forwards (a free path inside the rule, a free trial, the free variant and
    a dry run too), so what the origin reports stays between the origin and the paywall."""
    global _usage_cache
    cached_rules, names = _usage_cache
    if cached_rules is rules:
        return names
    names = frozenset(
        rule.bundle.usage_header.lower().encode()
        for rule in (rules.rules if rules is not None else ())
        if rule.bundle is not None and rule.bundle.usage_header
    )
    _usage_cache = (rules, names)
    return names


def balance_value(left: int, unit: str) -> str:
    """X-L402-Balance's value: what is left and its unit (wire fact 1)."""
    return f"{max(left, 0)} {unit}"


def bytes_left(before: int, method: str, status: int, fields: Fields) -> int:
    """What a bytes bundle will hold after this answer, as its head tells: `before` less the
    announced body (none for HEAD, 1xx, 204 and 304); `before` when no length is given."""
    if method.upper() == "HEAD" or status < 200 or status in _NO_BODY_STATUSES:
        return before
    length = content_length(fields)
    return before if length is None else max(before - length, 0)


def websocket_refusal(method: str) -> Answer:
    """A WebSocket cannot be metered (its messages are no response body, and it lasts as long
    as it likes): a bytes or units token never opens one, or a bundle would buy it all."""
    answer = bad_request_answer(
        "Bad request: a WebSocket cannot be opened with a token of a bundle of bytes or units "
        "(what it carries cannot be metered)."
    ).for_method(method)
    answer.note = {"variant": "refused", "reason": "websocket"}
    return answer


# -- charging ------------------------------------------------------------------------------------

# Charges under way: kept so a charge outlives the request task it was made for.
_charging: set["asyncio.Task[int | None]"] = set()
# (rule, problem kind) -> (when last logged, repeats since).
_warned: dict[tuple[str, str], tuple[float, int]] = {}


def warn(rule: str, kind: str, message: str) -> None:
    """Log `message` about `rule`, at most once per WARN_EVERY_SECONDS for each kind of
    problem, saying how many repeats went unlogged."""
    now = time.monotonic()
    last, repeats = _warned.get((rule, kind), (None, 0))
    if last is not None and now - last < WARN_EVERY_SECONDS:
        _warned[(rule, kind)] = (last, repeats + 1)
        return
    if len(_warned) > 1024:  # rules come and go with reloads: never grow without bound
        _warned.clear()
    _warned[(rule, kind)] = (now, 0)
    more = f" ({repeats} more since the last such line)" if repeats else ""
    log.warning(f"l402: {rule}: {message}{more}")


async def charge(
    store: "TokenStore", meter: Meter, amount: int, door: str, watchers: "Watchers"
) -> int | None:
    """Charge `amount` (clamped to the bundle's size) to the meter's token: what is left, or
    None when the store failed (logged and told to the watchers, never raised). Runs to its
    end even if the caller is cancelled."""
    task = asyncio.ensure_future(_charge(store, meter, min(amount, meter.size), door, watchers))
    _charging.add(task)
    task.add_done_callback(_charging.discard)
    return await asyncio.shield(task)


async def _charge(
    store: "TokenStore", meter: Meter, amount: int, door: str, watchers: "Watchers"
) -> int | None:
    try:
        return await store.charge(meter.token_id, meter.size, amount)
    except Exception as exc:
        # The answer has gone out: it is not taken back. What it cost is lost, and said so.
        log.warning(
            f"l402: {meter.rule}: cannot charge {amount} {meter.unit} to token "
            f"{meter.token_id.hex()[:16]}: {exc}"
        )
        watchers.tell("store_failed", door, "charge")
        return None


class Metered:
    """One metered response at a door. The door calls `start` with the response head (it
    gets the head to send: X-L402-Balance set, the usage header gone; units are charged
    there), `count` with each body chunk it hands to the client (bytes), and `finish` once
    the response ended or the client went away (bytes are charged there, once)."""

    def __init__(
        self,
        meter: Meter,
        method: str,
        store: "TokenStore",
        watchers: "Watchers",
        door: str,
        dry_run: bool = False,
    ) -> None:
        self.meter = meter
        self.method = method
        self.store = store
        self.watchers = watchers
        self.door = door
        # A dry run charges nothing; it only says what would be left.
        self.dry_run = dry_run
        # HEAD answers carry no body, whatever a door is handed: nothing to count.
        self.counting = meter.unit == "bytes" and method.upper() != "HEAD"
        self.sent = 0
        self.finished = False

    @classmethod
    def of(cls, note: Mapping[str, Any] | None, engine: "Paywall", method: str) -> "Metered | None":
        """The metering for a forwarded request's note (None: not metered); ValueError for a
        meter note the door cannot read."""
        meter = Meter.of(note)
        if meter is None:
            return None
        if engine.store is None:
            raise ValueError("no token store to charge")
        assert note is not None
        return cls(
            meter, method, engine.store, engine.watchers, engine.door, dry_run="dry_run" in note
        )

    @property
    def unit(self) -> str:
        return self.meter.unit

    def start_bytes(self, status: int, fields: Fields) -> Fields:
        """The head of a bytes-metered answer, with X-L402-Balance."""
        left = bytes_left(self.meter.before, self.method, status, fields)
        if status < 200:
            self.counting = False
        return set_one(fields, BALANCE_HEADER, balance_value(left, "bytes"))

    async def start_units(self, fields: Fields) -> Fields:
        """The head of a units-metered answer: the usage header read and removed, the units
        charged, X-L402-Balance what the store has left after."""
        meter = self.meter
        assert meter.header is not None
        units, problem = read_usage(fields, meter.header)
        stripped = without(fields, frozenset({meter.header.lower().encode()}))
        if units is None:
            warn(
                meter.rule,
                "unreadable usage" if stripped is not fields else "missing usage",
                f"the origin's answer is not metered as it should be: {problem}; charged "
                f"{FALLBACK_UNITS} unit",
            )
            units = FALLBACK_UNITS
        fields = stripped
        self.finished = True  # nothing more to charge for this answer
        left: int | None = None
        if units and not self.dry_run:
            left = await charge(self.store, meter, units, self.door, self.watchers)
        if left is None:  # a dry run, nothing used, or the store failed: as best known
            left = max(meter.before - units, 0)
        return set_one(fields, BALANCE_HEADER, balance_value(left, "units"))

    async def start(self, status: int, fields: Fields) -> Fields:
        if self.meter.unit == "units":
            return await self.start_units(fields)
        return self.start_bytes(status, fields)

    def count(self, size: int) -> None:
        """`size` more body bytes handed to the client."""
        if self.counting:
            self.sent += size

    async def finish(self) -> int | None:
        """The response is over (or the client is gone): charge the bytes sent, once. What is
        left, or None when nothing was charged (nothing sent, a dry run, a units meter, or
        the store failed)."""
        if self.finished:
            return None
        self.finished = True
        if self.meter.unit != "bytes" or self.sent <= 0 or self.dry_run:
            return None
        return await charge(self.store, self.meter, self.sent, self.door, self.watchers)


__all__ = [
    "FALLBACK_UNITS",
    "METER",
    "Meter",
    "Metered",
    "balance_value",
    "bytes_left",
    "charge",
    "content_length",
    "meter_note",
    "read_usage",
    "usage_headers",
    "websocket_refusal",
    "without",
]
