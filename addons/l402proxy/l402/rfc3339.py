"""RFC 3339 date-times as the Payment scheme writes (`expires`, receipt `timestamp`) and reads
them, without the clock: callers pass timestamps in."""

import math
import re
from datetime import UTC, datetime, timedelta

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z


def parse_rfc3339(text: str) -> float:
    """An RFC 3339 date-time as a POSIX timestamp; ValueError if it is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    leap = 0
    if second == 60:  # a leap second is the last instant of its minute
        second, leap = 59, 1
    offset = 0
    if match.group(8) is None:
        hours, minutes = int(match.group(10)), int(match.group(11))
        if hours > 23 or minutes > 59:
            raise ValueError("not an RFC 3339 date-time: bad offset")
        offset = (hours * 60 + minutes) * 60 * (-1 if match.group(9) == "-" else 1)
    fraction = float(match.group(7)) if match.group(7) else 0.0
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise ValueError("not an RFC 3339 date-time: no such date or time") from None
    return (moment - _EPOCH).total_seconds() - offset + leap + fraction


def format_rfc3339(timestamp: float) -> str:
    """Whole seconds, UTC, "Z" (Aperture's form); the fraction is dropped, never rounded up."""
    if not math.isfinite(timestamp) or not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError(f"timestamp {timestamp!r} is out of range")
    return (_EPOCH + timedelta(seconds=math.floor(timestamp))).strftime("%Y-%m-%dT%H:%M:%SZ")
