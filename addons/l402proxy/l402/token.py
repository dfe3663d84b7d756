"""L402 tokens: V2 macaroons minted and checked the way Aperture does.

pymacaroons does the encoding and the HMAC chain; caveat semantics are checked here, because
pymacaroons reports an expired caveat and a wrong key with the same exception.
"""

import functools
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pymacaroons import MACAROON_V2, Macaroon, Verifier
from pymacaroons.exceptions import MacaroonException
from pymacaroons.serializers.binary_serializer import BinarySerializer

from .encoding import b64decode_any, b64encode_std
from .identifier import IDENTIFIER_SIZE, Identifier, UnknownVersionError

LOCATION = "lsat"

INVALID_REASONS = frozenset(
    {"malformed", "unknown_version", "preimage_mismatch", "bad_signature", "unknown_caveat"}
)
REASONS = (
    "malformed",
    "unknown_version",
    "preimage_mismatch",
    "bad_signature",
    "unknown_caveat",
    "expired",
    "wrong_service",
    "missing_capability",
    "revoked",
)

_VALID_UNTIL = "_valid_until"
_CAPABILITIES = "_capabilities"
_ROOT_KEY_LABEL = b"l402proxy/root-key/v1"
_FORBIDDEN_IN_SERVICE = frozenset(",:= \t\r\n")
_FORBIDDEN_IN_CAPABILITY = frozenset(", \t\r\n")

_CACHE_MAX_CHARS = 2048

# What `verify(capability=...)` is given for a request whose method no capability of the service
# lists: a token restricted to some capabilities (it has a `<service>_capabilities` caveat) never
# grants it, since caveat values are split on "," and no capability can contain one; a token
# without that caveat is unrestricted and still opens it.
UNLISTED_CAPABILITY = ","

_SERIALIZER = BinarySerializer()


def _accept_any(_predicate: str) -> bool:
    return True


# One shared verifier: its callbacks are fixed and verify() keeps no per-call state on it, so
# building a new one (two delegate objects, two lists) on every request would be wasted work.
_VERIFIER = Verifier()
_VERIFIER.satisfy_general(_accept_any)


class TokenError(Exception):
    """Why a token was refused; `invalid` tells 401 (forged, garbled) from 402 (pay again)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown token error reason {reason!r}")
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def invalid(self) -> bool:
        return self.reason in INVALID_REASONS


@dataclass(frozen=True)
class Caveat:
    condition: str
    value: str


@dataclass(frozen=True)
class VerifiedToken:
    identifier: Identifier
    services: tuple[tuple[str, int], ...]
    valid_until: float | None
    capabilities: frozenset[str] | None
    caveats: tuple[str, ...]


def parse_caveat(text: str) -> Caveat:
    """`condition=value`, spaces around `=` ignored (Aperture trims them too)."""
    condition, sep, value = text.partition("=")
    condition = condition.strip()
    if not sep or not condition:
        raise TokenError("malformed", f"caveat {text!r} is not 'condition=value'")
    return Caveat(condition, value.strip())


def mint(root_key: bytes, identifier: Identifier, caveats: Sequence[str]) -> str:
    """A V2 macaroon as standard padded base64 (Aperture's wire form)."""
    if not root_key:
        # pymacaroons silently leaves the signature empty for an empty key.
        raise ValueError("root_key must not be empty")
    macaroon = Macaroon(
        location=LOCATION, identifier=identifier.encode(), key=root_key, version=MACAROON_V2
    )
    for caveat in caveats:
        condition, sep, _ = caveat.partition("=")
        if not sep or not condition.strip():
            # A caveat verify() could never read would make a token nobody can use.
            raise ValueError(f"caveat {caveat!r} is not 'condition=value'")
        macaroon.add_first_party_caveat(caveat)
    return b64encode_std(_SERIALIZER.serialize_raw(macaroon))


def decode_macaroon(value: str) -> Macaroon:
    """Any base64 flavour of a V2 binary macaroon."""
    try:
        raw = b64decode_any(value)
    except ValueError:
        raise TokenError("malformed", "macaroon is not valid base64") from None
    # V1 is refused rather than parsed: it cannot carry Aperture's binary identifier.
    if raw[:1] != b"\x02":
        raise TokenError("malformed", "macaroon is not in the V2 binary format")
    try:
        return _SERIALIZER.deserialize_raw(raw)
    except Exception as exc:
        # pymacaroons signals truncation with bare Exception, IndexError, UnicodeDecodeError...
        raise TokenError("malformed", f"macaroon cannot be decoded ({exc})") from None


def attenuate(macaroon_b64: str, caveats: Sequence[str]) -> str:
    """The same token with more first-party caveats: what a holder can do without the server.

    Caveats only ever narrow a token (verify checks every occurrence), so a read-only copy
    of a read/write token can be handed on safely.
    """
    macaroon = decode_macaroon(macaroon_b64)
    for caveat in caveats:
        parse_caveat(caveat)  # refuse text that is no condition=value caveat
        macaroon.add_first_party_caveat(caveat)
    return b64encode_std(_SERIALIZER.serialize_raw(macaroon))


@dataclass(frozen=True)
class TokenInfo:
    """What a client can read from a token it was offered, without the server's key."""

    identifier: Identifier
    # The services every `services=` caveat allows (later caveats narrow); () if none.
    services: tuple[str, ...]
    # The tightest expiry that applies to those services (`<name>_valid_until`, lsat-js
    # `expiration=`), in unix seconds; None if the token names none.
    valid_until: float | None
    caveats: tuple[str, ...]


def _client_identifier(raw: bytes) -> Identifier:
    """Aperture's 66 bytes, or lsat-js/boltwall's hex text of the same 66 bytes."""
    try:
        return Identifier.decode(raw)
    except UnknownVersionError:
        if len(raw) != 2 * IDENTIFIER_SIZE:
            raise
    try:
        return Identifier.decode(bytes.fromhex(raw.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise UnknownVersionError("identifier is neither Aperture's nor lsat-js's layout") from None


def inspect(macaroon_b64: str) -> TokenInfo:
    """Read a token's identifier and scope; TokenError if it cannot be read (not a check)."""
    macaroon = decode_macaroon(macaroon_b64)
    try:
        identifier = _client_identifier(macaroon.identifier_bytes)
    except UnknownVersionError as exc:
        raise TokenError("unknown_version", str(exc)) from None
    except ValueError as exc:
        raise TokenError("malformed", str(exc)) from None
    caveats: list[str] = []
    service_sets: list[set[str]] = []
    service_order: list[str] = []
    expiries: dict[str, list[float]] = {}
    for caveat in macaroon.first_party_caveats():
        try:
            text = caveat.caveat_id_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError("malformed", "caveat is not UTF-8 text") from None
        caveats.append(text)
        parsed = parse_caveat(text)
        if parsed.condition == "services":
            names = [name for name, _ in _parse_services(parsed.value, text)]
            service_sets.append(set(names))
            service_order = service_order or names
        elif parsed.condition == "expiration":
            expiries.setdefault("", []).append(_parse_uint(parsed.value, text) / 1000)
        elif parsed.condition.endswith(_VALID_UNTIL):
            name = parsed.condition.removesuffix(_VALID_UNTIL)
            expiries.setdefault(name, []).append(float(_parse_uint(parsed.value, text)))
    allowed = set.intersection(*service_sets) if service_sets else set()
    services = tuple(name for name in service_order if name in allowed)
    relevant = [
        expiry
        for name, values in expiries.items()
        if name == "" or name in services or not services
        for expiry in values
    ]
    return TokenInfo(identifier, services, min(relevant) if relevant else None, tuple(caveats))


def caveats_for(
    service: str, *, valid_until: int | None, capabilities: Sequence[str] | None
) -> list[str]:
    """The caveats Aperture writes for one service, in Aperture's order."""
    _check_name("service name", service, _FORBIDDEN_IN_SERVICE)
    caveats = [f"services={service}:0"]
    if capabilities is not None:
        for capability in capabilities:
            _check_name("capability", capability, _FORBIDDEN_IN_CAPABILITY)
        caveats.append(f"{service}{_CAPABILITIES}={','.join(capabilities)}")
    if valid_until is not None:
        caveats.append(f"{service}{_VALID_UNTIL}={int(valid_until)}")
    return caveats


def derive_root_key(secret: bytes, token_id: bytes) -> bytes:
    """Per-token root key, recomputed from the server secret so verifying needs no database."""
    if not secret:
        raise ValueError("secret must not be empty")
    return hmac.digest(secret, _ROOT_KEY_LABEL + token_id, "sha256")


_Parsed = tuple[Macaroon, Identifier, tuple[str, ...], tuple[str, str] | None]


def identifier_of(macaroon: Macaroon) -> Identifier:
    """The macaroon's Aperture identifier; TokenError (unknown_version, malformed) otherwise."""
    try:
        return Identifier.decode(macaroon.identifier_bytes)
    except UnknownVersionError as exc:
        raise TokenError("unknown_version", str(exc)) from None
    except ValueError as exc:
        raise TokenError("malformed", str(exc)) from None


def _parse(value: str) -> _Parsed:
    """Decode once what verify needs; a caveat problem is returned, to be raised in order."""
    macaroon = decode_macaroon(value)
    identifier = identifier_of(macaroon)
    caveats: list[str] = []
    for caveat in macaroon.caveats:
        if not caveat.first_party():
            # We never mint third-party caveats and cannot discharge them: fail closed.
            return macaroon, identifier, (), ("unknown_caveat", "third-party caveat unsupported")
        try:
            caveats.append(caveat.caveat_id_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            # Checked before the HMAC chain: pymacaroons' Verifier would raise on it unhandled.
            return macaroon, identifier, (), ("malformed", "caveat is not UTF-8 text")
    return macaroon, identifier, tuple(caveats), None


# pymacaroons' pure-Python V2 parser is about 60% of a verify, and a client sends the same token
# on every request, so parsing is memoised. Entries never leave this module (nothing mutates
# them); values longer than _CACHE_MAX_CHARS are not cached, so the cache stays small.
_parse_cached = functools.lru_cache(maxsize=1024)(_parse)


def verify(
    macaroon_b64: str,
    preimage: bytes,
    root_key: bytes | Callable[[bytes], bytes],
    *,
    service: str,
    now: float,
    capability: str | None = None,
) -> VerifiedToken:
    """Check a paid token for `service` at `now` (unix seconds); raise TokenError if refused.

    `root_key` may also be a function of the token_id, so a caller that derives keys per
    token does not have to decode the macaroon a second time to learn the token_id.
    `capability` is what the request needs (rules.Rule.capability_for): a token restricted to
    capabilities must grant it; a token without a capabilities caveat opens everything.
    """
    if len(macaroon_b64) <= _CACHE_MAX_CHARS:
        macaroon, identifier, caveats, problem = _parse_cached(macaroon_b64)
    else:
        macaroon, identifier, caveats, problem = _parse(macaroon_b64)

    if len(preimage) != 32:
        raise TokenError("malformed", "preimage must be 32 bytes")
    if not hmac.compare_digest(hashlib.sha256(preimage).digest(), identifier.payment_hash):
        raise TokenError("preimage_mismatch", "preimage does not match the token's payment hash")
    if problem is not None:
        raise TokenError(*problem)

    key = root_key(identifier.token_id) if callable(root_key) else root_key
    try:
        _VERIFIER.verify(macaroon, key)
    except MacaroonException:
        raise TokenError("bad_signature", "macaroon signature does not verify") from None

    return _check_caveats(identifier, caveats, service, now, capability)


def _check_caveats(
    identifier: Identifier,
    caveats: tuple[str, ...],
    service: str,
    now: float,
    capability: str | None,
) -> VerifiedToken:
    # Every occurrence of a condition is checked, not only the last: a holder may attenuate
    # (narrow) a token by appending caveats, and must never be able to widen it that way.
    valid_until_condition = service + _VALID_UNTIL
    capabilities_condition = service + _CAPABILITIES
    service_lists: list[tuple[tuple[str, int], ...]] = []
    expiries_s: list[int] = []
    expiries_ms: list[int] = []
    capability_sets: list[frozenset[str]] = []

    for text in caveats:
        condition, sep, value = text.partition("=")
        condition = condition.strip()
        value = value.strip()
        if not sep or not condition:
            raise TokenError("malformed", f"caveat {text!r} is not 'condition=value'")
        if condition == "services":
            service_lists.append(_parse_services(value, text))
        elif condition == valid_until_condition:
            expiries_s.append(_parse_uint(value, text))
        elif condition == "expiration":
            # lsat-js writes unix milliseconds.
            expiries_ms.append(_parse_uint(value, text))
        elif condition == capabilities_condition:
            capability_sets.append(frozenset(_split_list(value)))
        elif _names_other_service(condition):
            continue
        else:
            raise TokenError("unknown_caveat", f"unknown caveat condition {condition!r}")

    if not service_lists:
        raise TokenError("wrong_service", "token has no services caveat")
    for entries in service_lists:
        if not any(name == service for name, _ in entries):
            raise TokenError("wrong_service", f"token is not valid for service {service!r}")

    if any(expiry <= now for expiry in expiries_s) or any(
        expiry <= now * 1000 for expiry in expiries_ms
    ):
        raise TokenError("expired", "token has expired")
    candidates = [float(s) for s in expiries_s] + [ms / 1000 for ms in expiries_ms]
    valid_until = min(candidates) if candidates else None

    capabilities: frozenset[str] | None = None
    if capability_sets:
        capabilities = frozenset.intersection(*capability_sets)
        if capability is not None and capability not in capabilities:
            if capability == UNLISTED_CAPABILITY:
                raise TokenError(
                    "missing_capability",
                    "no capability covers this request's method, and the token is restricted "
                    f"to {', '.join(sorted(capabilities)) or 'no capabilities'}",
                )
            raise TokenError("missing_capability", f"token does not grant {capability!r}")

    services = service_lists[-1]
    if len(service_lists) > 1:
        everywhere = set.intersection(*({name for name, _ in s} for s in service_lists))
        services = tuple(entry for entry in services if entry[0] in everywhere)

    return VerifiedToken(identifier, services, valid_until, capabilities, caveats)


def _names_other_service(condition: str) -> bool:
    # `<other>_valid_until` / `<other>_capabilities` restrict other services, not this one.
    for suffix in (_VALID_UNTIL, _CAPABILITIES):
        if condition.endswith(suffix) and len(condition) > len(suffix):
            return True
    return False


def _parse_services(value: str, text: str) -> tuple[tuple[str, int], ...]:
    entries = []
    for part in value.split(","):
        name, sep, tier = part.partition(":")
        name = name.strip()
        tier = tier.strip()
        if not name or not sep or not (tier.isascii() and tier.isdigit()):
            raise TokenError("malformed", f"caveat {text!r}: expected <name>:<tier>[,...]")
        if not name.isprintable():
            # A name ends up in headers and logs: control characters have no business there.
            raise TokenError("malformed", f"caveat {text!r}: control characters in a name")
        entries.append((name, int(tier)))
    return tuple(entries)


def _parse_uint(value: str, text: str) -> int:
    # isdigit() alone accepts '²' and int() accepts '1_0': neither belongs in a caveat.
    if not (value.isascii() and value.isdigit()):
        raise TokenError("malformed", f"caveat {text!r}: expected a whole number")
    return int(value)


def _split_list(value: str) -> list[str]:
    return [item for item in (part.strip() for part in value.split(",")) if item]


def _check_name(what: str, name: str, forbidden: frozenset[str]) -> None:
    if not name or any(char in forbidden for char in name):
        shown = "".join(sorted(c for c in forbidden if not c.isspace()))
        raise ValueError(f"{what} {name!r} must be non-empty, without spaces or any of {shown!r}")
