"""WWW-Authenticate challenges and Authorization credentials for L402/LSAT.

The challenge parser is deliberately tolerant: the shapes servers send in the wild (see
PROTOCOL.md) include space-separated parameters, single quotes and unquoted base64 with `=`
padding, which RFC 7235 parsers either reject or misread.
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from .encoding import b64decode_any

SCHEMES = frozenset({"L402", "LSAT"})
PREIMAGE_SIZE = 32
# The largest credential the server reads: an Authorization value, or "L402 " and a credential
# cookie's value, in bytes. Aperture's tokens with several caveats are 0.5-2 KB, so this leaves
# room for several macaroons or a long chain of attenuations; it is what Node.js accepts for all
# of a request's headers (nginx and Apache stop at 8 KiB per line). Anything longer is refused
# before any base64 or macaroon work, so a stranger cannot make the server decode, verify and
# cache large values.
MAX_CREDENTIAL_SIZE = 16 * 1024

_WHITESPACE = " \t\r\n"
# A "word" is a scheme, a parameter name, a token68 or an unquoted value up to one of these.
_WORD_END = frozenset(_WHITESPACE + ",=\"'")
_VALUE_END = frozenset(_WHITESPACE + ",")
_QUOTES = "\"'"
_HEX_PREIMAGE = re.compile(r"[0-9a-fA-F]{64}")
_SCHEME_NAME = re.compile(r"[A-Za-z0-9-]{1,20}")
_UNSAFE_IN_QUOTED = re.compile(r'["\\\x00-\x1f\x7f]')


@dataclass(frozen=True)
class Challenge:
    scheme: str
    macaroon: str
    invoice: str
    version: str | None
    # Left out of hash() so a Challenge stays hashable; still compared by ==.
    params: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True)
class Credential:
    scheme: str
    macaroons: tuple[str, ...]
    # Kept out of repr(): together with the macaroon it is a bearer secret, and reprs get logged.
    preimage: bytes = field(repr=False)


class CredentialError(ValueError):
    """An Authorization value that is not a usable L402/LSAT credential."""


def parse_auth_header(value: str) -> list[tuple[str, dict[str, str]]]:
    """Split one WWW-Authenticate value into (scheme, params) challenges; never raises.

    A bare word starts a new challenge unless it directly follows a scheme (then it is that
    scheme's token68, stored under ""). `name=` is always a parameter of the current
    challenge, so a word followed by whitespace and `name=` is a new scheme, with or without
    a comma before it, and parameters never move from one challenge to another.
    """
    challenges: list[tuple[str, dict[str, str]]] = []
    params: dict[str, str] | None = None  # None until the first scheme: earlier params are dropped
    after_scheme = False  # only whitespace since the scheme: a token68 may come here
    i, n = 0, len(value)
    while i < n:
        char = value[i]
        if char in _WHITESPACE:
            i += 1
            continue
        if char == ",":
            after_scheme = False
            i += 1
            continue
        if char in _QUOTES:
            _, i = _read_quoted(value, i)  # a stray quoted string: nothing to attach it to
            after_scheme = False
            continue
        if char == "=":
            i += 1
            after_scheme = False
            continue

        end = _word_end(value, i)
        word = value[i:end]
        following = _skip_whitespace(value, end)

        if following < n and value[following] == "=":
            i = _read_param(value, word, end, following, params, after_scheme)
            after_scheme = False
            continue

        if after_scheme and params is not None and not _param_starts(value, end, following):
            params[""] = word
            after_scheme = False
            i = end
            continue

        params = {}
        challenges.append((word, params))
        after_scheme = True
        i = end
    return challenges


def _read_param(
    value: str,
    name: str,
    name_end: int,
    equals: int,
    params: dict[str, str] | None,
    after_scheme: bool,
) -> int:
    """Read `name=value` (or a token68 ending in `=`) at `equals`; return the next index."""
    n = len(value)
    pad_end = equals
    while pad_end < n and value[pad_end] == "=":
        pad_end += 1
    pads = pad_end - equals
    start = _skip_whitespace(value, pad_end)

    if pads == 1 and start < n and value[start] in _QUOTES:
        text, next_index = _read_quoted(value, start)
        if text is not None and params is not None:
            params.setdefault(name.lower(), text)
        return next_index

    if pads == 1 and pad_end < n and value[pad_end] not in _VALUE_END:
        # Unquoted: runs to whitespace or comma, so base64 `=` padding stays in the value.
        end = pad_end
        while end < n and value[end] not in _VALUE_END:
            end += 1
        if params is not None:
            params.setdefault(name.lower(), value[pad_end:end])
        return end

    if params is not None:
        if after_scheme and name_end == equals and not _param_follows(value, pad_end):
            params[""] = name + "=" * pads  # `Bearer abc==`: token68 padding, not a parameter
        elif pads == 1:
            params.setdefault(name.lower(), "")
    return pad_end


def _read_quoted(value: str, start: int) -> tuple[str | None, int]:
    """A "double" (with backslash escapes) or 'single' quoted string at `start`."""
    quote = value[start]
    out: list[str] = []
    i, n = start + 1, len(value)
    while i < n:
        char = value[i]
        if char == quote:
            return "".join(out), i + 1
        if char == "\\" and quote == '"' and i + 1 < n:
            i += 1
            char = value[i]
        out.append(char)
        i += 1
    return None, n  # unterminated: unreadable, so dropped


def _word_end(value: str, i: int) -> int:
    n = len(value)
    while i < n and value[i] not in _WORD_END:
        i += 1
    return i


def _skip_whitespace(value: str, i: int) -> int:
    n = len(value)
    while i < n and value[i] in _WHITESPACE:
        i += 1
    return i


def _param_starts(value: str, word_end: int, following: int) -> bool:
    """After whitespace, does `name=` come next (so the word before it is a scheme)?"""
    if following == word_end or following >= len(value) or value[following] in _WORD_END:
        return False
    after_name = _skip_whitespace(value, _word_end(value, following))
    return after_name < len(value) and value[after_name] == "="


def _param_follows(value: str, i: int) -> bool:
    """Is the next item, past whitespace and commas, a `name=` parameter?"""
    n = len(value)
    while i < n and (value[i] in _WHITESPACE or value[i] == ","):
        i += 1
    end = _word_end(value, i)
    if end == i:
        return False
    after_name = _skip_whitespace(value, end)
    return after_name < n and value[after_name] == "="


def parse_challenges(values: str | Iterable[str]) -> list[Challenge]:
    """Every L402/LSAT challenge with a macaroon and an invoice, in the order sent."""
    if isinstance(values, str):
        values = (values,)
    challenges = []
    for value in values:
        for scheme, params in parse_auth_header(value):
            upper = scheme.upper()
            if upper not in SCHEMES:
                continue
            # Servers that send both send the same token; macaroon= is what Aperture names it.
            macaroon = params.get("macaroon") or params.get("token")
            invoice = params.get("invoice")
            if not macaroon or not invoice:
                continue
            challenges.append(
                Challenge(
                    scheme=upper,
                    macaroon=macaroon,
                    invoice=invoice,
                    version=params.get("version"),
                    params=MappingProxyType(dict(params)),
                )
            )
    return challenges


def format_challenge(scheme: str, macaroon: str, invoice: str, *, spec_params: bool = False) -> str:
    """Aperture's form; `spec_params` adds the current spec's version= and token= after it."""
    upper = scheme.upper()
    if upper not in SCHEMES:
        raise ValueError(f"challenge scheme must be L402 or LSAT, not {scheme!r}")
    _check_quotable("macaroon", macaroon)
    _check_quotable("invoice", invoice)
    text = f'{upper} macaroon="{macaroon}", invoice="{invoice}"'
    if spec_params:
        text += f', version="0", token="{macaroon}"'
    return text


def _check_quotable(what: str, text: str) -> None:
    # Base64 and BOLT11 never need escaping; anything that would is a bug upstream, and
    # must not be able to inject another parameter or header line.
    if not text or _UNSAFE_IN_QUOTED.search(text):
        raise ValueError(f"{what} is empty or has characters not allowed in a header value")


def credential_size(value: str) -> int:
    """The size in bytes of a header value as it was sent (decoded with surrogateescape)."""
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogateescape"))


def check_credential_size(value: str) -> None:
    """CredentialError if `value` is longer than MAX_CREDENTIAL_SIZE bytes."""
    size = credential_size(value)
    if size > MAX_CREDENTIAL_SIZE:
        raise CredentialError(
            f"credential too large: {size} bytes, the limit is {MAX_CREDENTIAL_SIZE}"
        )


def parse_credential(value: str) -> Credential:
    """`L402|LSAT <b64>[,<b64>...]:<64 hex>`; CredentialError says what is wrong."""
    # Messages never echo the value: it is a bearer credential.
    check_credential_size(value)  # first: nothing is split or decoded in an oversized value
    parts = value.split(None, 1)
    if not parts:
        raise CredentialError("empty Authorization value")
    scheme = parts[0]
    rest = parts[1] if len(parts) > 1 else ""
    upper = scheme.upper()
    if upper not in SCHEMES:
        if _SCHEME_NAME.fullmatch(scheme):
            raise CredentialError(f"authorization scheme {scheme!r} is not L402 or LSAT")
        # Anything longer may be a bare token sent without a scheme: never echo it.
        raise CredentialError("authorization scheme is not L402 or LSAT")
    macaroon_part, colon, preimage_hex = rest.rpartition(":")
    if not colon:
        raise CredentialError("credential must be <macaroon>[,<macaroon>...]:<preimage hex>")
    macaroons = tuple(part.strip() for part in macaroon_part.split(","))
    if not all(macaroons):
        raise CredentialError("credential has an empty macaroon")
    for macaroon in macaroons:
        try:
            b64decode_any(macaroon)
        except ValueError:
            raise CredentialError("credential macaroon is not valid base64") from None
    preimage_hex = preimage_hex.strip()
    if not _HEX_PREIMAGE.fullmatch(preimage_hex):
        raise CredentialError("preimage must be 64 hex characters (32 bytes)")
    return Credential(upper, macaroons, bytes.fromhex(preimage_hex))


def format_credential(macaroons: Sequence[str], preimage: bytes, scheme: str = "L402") -> str:
    if scheme.upper() not in SCHEMES:
        raise ValueError(f"credential scheme must be L402 or LSAT, not {scheme!r}")
    if not macaroons or not all(macaroons):
        raise ValueError("at least one non-empty macaroon is needed")
    if len(preimage) != PREIMAGE_SIZE:
        raise ValueError(f"preimage must be {PREIMAGE_SIZE} bytes, got {len(preimage)}")
    return f"{scheme.upper()} {','.join(macaroons)}:{preimage.hex()}"


def accepts_l402(value: str | None) -> bool:
    """Does an Accept-Authenticate value list L402 or LSAT (any case, `;params` ignored)?"""
    if not value:
        return False
    for item in re.split(r"[,\s]+", value):
        if item.partition(";")[0].strip().upper() in SCHEMES:
            return True
    return False
