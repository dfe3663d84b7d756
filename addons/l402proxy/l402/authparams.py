"""RFC 9110 challenge lists (`WWW-Authenticate`), read for the Payment scheme.

headers.parse_auth_header reads the L402 shapes seen in the wild (single quotes, unquoted
base64 with `=` padding) and never says what it dropped. The Payment scheme HMACs its parameter
values, so a value must come back exactly as sent or be refused: this reader keeps RFC 9110's
token and quoted-string rules (quoted-pair unescaped, control characters refused, `=` after a
token value is an error, not part of it) and records, per challenge, the first thing wrong with
it, so a caller can skip a malformed challenge and say why while still reading the others.

Like Aperture's reader it is lenient only where no value can change: commas and whitespace both
separate list members, so params without commas between them and challenges without a comma
before the next scheme still split where they should. A bare token directly after a scheme and
followed by a comma or the end is that challenge's token68 (`Basic dXNlcg==`).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_OWS = " \t"
# What a quoted-string cannot carry, even as a quoted-pair: controls other than HTAB, and DEL.
_UNQUOTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class AuthChallenge:
    """One challenge of a list: parameter names lowercased, the first of a repeated one kept."""

    scheme: str
    params: Mapping[str, str] = field(hash=False)
    token68: str | None = None
    # The first syntax problem in this challenge, None when it is well-formed.
    problem: str | None = None


@dataclass
class _Builder:
    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None
    problem: str | None = None

    def flag(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def freeze(self) -> AuthChallenge:
        return AuthChallenge(self.scheme, MappingProxyType(self.params), self.token68, self.problem)


def quote(value: str) -> str:
    """`value` as an RFC 9110 quoted-string; ValueError if it holds a character that no
    quoted-string can carry (a CR or LF would also split the header)."""
    if _UNQUOTABLE.search(value):
        raise ValueError("a control character cannot be sent in a quoted-string")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_challenge_list(value: str) -> list[AuthChallenge]:
    """Every challenge in one field value, in order; never raises."""
    challenges: list[_Builder] = []
    current: _Builder | None = None
    after_scheme = False  # only whitespace since the scheme: a token68 may come here
    i, n = 0, len(value)
    while i < n:
        char = value[i]
        if char in _OWS:
            i += 1
            continue
        if char == ",":
            after_scheme = False
            i += 1
            continue
        if after_scheme and current is not None:
            match68 = _TOKEN68.match(value, i)
            if match68:
                end = _skip_ows(value, match68.end())
                if end >= n or value[end] == ",":
                    current.token68 = match68.group()
                    after_scheme = False
                    i = end
                    continue
        after_scheme = False
        match = _TOKEN.match(value, i)
        if match is None:
            if current is not None:
                current.flag(f"unexpected {_describe(char)} at offset {i}")
            i = _skip_member(value, i)
            continue
        following = _skip_ows(value, match.end())
        if following < n and value[following] == "=":
            i = _read_param(value, match.group(), following + 1, current)
            continue
        current = _Builder(match.group())
        challenges.append(current)
        after_scheme = True
        i = match.end()
    return [challenge.freeze() for challenge in challenges]


def _read_param(value: str, name: str, start: int, current: _Builder | None) -> int:
    """Read the value of `name=` from `start` (just past "="); return where to go on."""
    n = len(value)
    i = _skip_ows(value, start)
    if i < n and value[i] == '"':
        text, i, problem = _read_quoted(value, i)
        if problem is not None:
            if current is not None:
                current.flag(f"parameter {name!r}: {problem}")
            return i
    else:
        match = _TOKEN.match(value, i)
        if match is None:
            if current is not None:
                what = (
                    "no value"
                    if i >= n or value[i] == ","
                    else f"a bad value ({_describe(value[i])})"
                )
                current.flag(f"parameter {name!r} has {what}")
            return _skip_member(value, i)
        text, i = match.group(), match.end()
    if i < n and value[i] not in _OWS and value[i] != ",":
        # `request=abc==` or `id="a"b`: the value is not what the sender meant; never guess.
        if current is not None:
            current.flag(f"parameter {name!r}: unexpected {_describe(value[i])} after its value")
        return _skip_member(value, i)
    if current is not None:
        current.params.setdefault(name.lower(), text)  # RFC 9110 leaves repeats open: first wins
    return i


def _read_quoted(value: str, start: int) -> tuple[str, int, str | None]:
    """The quoted-string at `start`: (text, index after it, problem or None)."""
    out: list[str] = []
    problem: str | None = None
    i, n = start + 1, len(value)
    while i < n:
        char = value[i]
        if char == '"':
            return "".join(out), i + 1, problem
        if char == "\\":
            i += 1
            if i >= n:
                break
            char = value[i]
        if problem is None and _UNQUOTABLE.match(char):
            problem = "control character in a quoted string"  # read on to its closing quote
        out.append(char)
        i += 1
    return "", n, "unterminated quoted string"


def _skip_member(value: str, i: int) -> int:
    """Index of the next comma outside a quoted string (or the end): resynchronise there."""
    n = len(value)
    while i < n and value[i] != ",":
        if value[i] == '"':
            i += 1
            while i < n and value[i] != '"':
                i += 2 if value[i] == "\\" else 1
        i += 1
    return min(i, n)


def _skip_ows(value: str, i: int) -> int:
    n = len(value)
    while i < n and value[i] in _OWS:
        i += 1
    return i


def _describe(char: str) -> str:
    return repr(char) if char.isprintable() and char.isascii() else f"U+{ord(char):04X}"
