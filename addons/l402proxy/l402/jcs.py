"""JSON the Payment scheme writes (RFC 8785 canonical form) and reads (strict I-JSON).

`canonical_json` is the whole of RFC 8785 section 3.2 for the values JSON can carry: object
members sorted by their UTF-16 code units, no whitespace, strings escaped exactly as ECMAScript's
JSON.stringify escapes them (so "<", "&", U+2028 and DEL stay raw), numbers in ECMAScript's
Number::toString form. Numbers are IEEE doubles in JCS: an int beyond 2**53 is rounded to the
nearest double first, as a JavaScript peer would (the same bytes, the same HMAC). The scheme's
own JSON carries amounts as decimal strings, so no value we mint ever meets that rounding.

`loads_strict` reads the JSON a peer sends (credentials, requests, receipts) as I-JSON (RFC 7493):
UTF-8, no duplicate member names (a parser differential waiting to happen: Python keeps the last,
others the first), no NaN/Infinity, no lone surrogates, bounded nesting.
"""

import json
import math
import re
from decimal import Decimal

MAX_SAFE_INTEGER = 2**53
MAX_DEPTH = 64

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
for _code in range(0x20):
    _ESCAPES.setdefault(chr(_code), f"\\u{_code:04x}")
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')
_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonError(ValueError):
    """JSON that cannot be written canonically or read strictly; one line, never the data."""


def canonical_json(value: object) -> bytes:
    """The RFC 8785 serialization of `value` (dict with str keys, list/tuple, str, int, float,
    bool, None), as UTF-8 bytes."""
    parts: list[str] = []
    _write(value, parts, 0)
    return "".join(parts).encode("utf-8")


def canonicalize(data: bytes | str) -> bytes:
    """Read JSON text strictly and write it canonically."""
    return canonical_json(loads_strict(data))


def format_number(value: int | float) -> str:
    """ECMAScript Number::toString, which RFC 8785 section 3.2.2.3 prescribes."""
    if isinstance(value, bool):
        raise JsonError("a boolean is not a number")
    if isinstance(value, int):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return str(value)
        try:
            value = float(value)  # what a JavaScript peer holds for this literal
        except OverflowError:
            raise JsonError("integer out of the range of a double") from None
    if not math.isfinite(value):
        raise JsonError("NaN and Infinity have no JSON form")
    if value == 0:
        return "0"  # both zeros: ECMAScript has no "-0" here
    if value < 0:
        return "-" + _format_positive(-value)
    return _format_positive(value)


def _format_positive(value: float) -> str:
    # repr() is the shortest string that round-trips, nearest to the value on ties, which is
    # the digit string ECMAScript asks for; only the layout differs.
    _, digit_tuple, exponent = Decimal(repr(value)).as_tuple()
    assert isinstance(exponent, int)  # finite by the caller's check
    digits = "".join(map(str, digit_tuple))
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    k = len(stripped)
    n = exponent + k  # value = 0.<digits> x 10**n
    if k <= n <= 21:
        return stripped + "0" * (n - k)
    if 0 < n <= 21:
        return stripped[:n] + "." + stripped[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + stripped
    power = n - 1
    mantissa = stripped if k == 1 else stripped[0] + "." + stripped[1:]
    return f"{mantissa}e{'+' if power >= 0 else '-'}{abs(power)}"


def _write_string(text: str, parts: list[str]) -> None:
    if _SURROGATE.search(text):
        raise JsonError("a string holds a lone surrogate, which UTF-8 cannot carry")
    parts.append('"')
    parts.append(_NEEDS_ESCAPE.sub(lambda match: _ESCAPES[match.group()], text))
    parts.append('"')


def _utf16_key(item: tuple[str, object]) -> bytes:
    # Big-endian UTF-16 bytes compare exactly as the code unit sequences do.
    return item[0].encode("utf-16-be")


def _write(value: object, parts: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise JsonError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        _write_string(value, parts)
    elif isinstance(value, int | float):
        parts.append(format_number(value))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise JsonError(f"object member names must be strings, not {type(key).__name__}")
            _write_string(key, [])  # refuse lone surrogates before sorting on them
        parts.append("{")
        for index, (key, member) in enumerate(sorted(value.items(), key=_utf16_key)):
            if index:
                parts.append(",")
            _write_string(key, parts)
            parts.append(":")
            _write(member, parts, depth + 1)
        parts.append("}")
    elif isinstance(value, list | tuple):
        parts.append("[")
        for index, member in enumerate(value):
            if index:
                parts.append(",")
            _write(member, parts, depth + 1)
        parts.append("]")
    else:
        raise JsonError(f"{type(value).__name__} has no JSON form")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, member in pairs:
        if key in result:
            # The name is the peer's data; say where, not what.
            raise JsonError("an object has a duplicate member name")
        result[key] = member
    return result


def _reject_constant(_name: str) -> object:
    raise JsonError("NaN and Infinity are not JSON")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise JsonError("a number is out of the range of a double")
    return number


def _check_strings(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise JsonError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise JsonError("a string holds a lone surrogate")
    elif isinstance(value, dict):
        for key, member in value.items():
            _check_strings(key, depth)
            _check_strings(member, depth + 1)
    elif isinstance(value, list):
        for member in value:
            _check_strings(member, depth + 1)


def loads_strict(data: bytes | str, what: str = "JSON") -> object:
    """Parse I-JSON; JsonError (a ValueError) says in one line why not."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonError(f"{what} is not UTF-8") from None
    else:
        text = data
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except JsonError as exc:
        raise JsonError(f"{what} is not I-JSON: {exc}") from None
    except RecursionError:
        raise JsonError(f"{what} is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise JsonError(f"{what} is not valid JSON: {exc.msg} at offset {exc.pos}") from None
    except ValueError:  # e.g. an integer literal longer than Python converts
        raise JsonError(f"{what} is not valid JSON: a number is too long") from None
    try:
        _check_strings(value, 0)
    except JsonError as exc:
        raise JsonError(f"{what} is not I-JSON: {exc}") from None
    return value
