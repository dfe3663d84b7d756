"""A request as the engine sees it, and plain operations on raw header fields.

Header fields are (name, value) byte pairs in wire order, as mitmproxy, ASGI and nginx all have
them. Reads decode values as UTF-8 with surrogateescape and join repeated fields with ", " (as
mitmproxy's `headers.get()` does); writes follow mitmproxy's `headers[name] = value`: the first
field of that name keeps its place and spelling, the others go.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import gate, paywall

Field = tuple[bytes, bytes]
Fields = tuple[Field, ...]


# Not frozen: a frozen dataclass costs ~2 us more to build, on every request.
@dataclass(slots=True)
class Request:
    """What a door knows about one request.

    `target` is the raw request target in origin form (path and query, undecoded), `host` the
    host the rules match on (no port), `fields` the raw header fields. `body` is the request body
    when the door has it (the /.l402/unlock endpoint reads it), `secure` whether the client
    reached us over TLS (our cookies are then Secure), `client` its address when known.

    `target_check`, when given, is the door's own judgement of the request target against the
    Host fields the engine found (e.g. an absolute-form target naming another host): a message
    means 400, never forwarded. It runs after the /.l402/ endpoints, before anything is judged.
    """

    method: str
    target: str
    host: str
    fields: Fields
    body: bytes | None = None
    secure: bool = False
    client: tuple[str, int] | None = None
    target_check: Callable[[Sequence[bytes]], str | None] | None = None
    # Other targets the origin may route this request by (origin form); each must fall under
    # the rule the target does, else 400 (the ASGI door: the path below a root_path).
    also_targets: tuple[str, ...] = ()
    # host[:port] the client reached us at, for a request without a Host field (HTTP/2 and 3
    # carry it as :authority): a private feed's URL names it, port included.
    authority: str | None = None


def decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def get_all(fields: Fields, name: str) -> list[str]:
    """Every value of one header, decoded, in order."""
    wanted = name.lower().encode()
    return [decode(value) for key, value in fields if key.lower() == wanted]


def get(fields: Fields, name: str, default: str | None = None) -> str | None:
    """One header's values joined with ", " (several fields read as one list); else default."""
    values = get_all(fields, name)
    return ", ".join(values) if values else default


def has(fields: Fields, name: str) -> bool:
    wanted = name.lower().encode()
    return any(key.lower() == wanted for key, _ in fields)


def set_all(fields: Fields, name: str, values: Sequence[str]) -> Fields:
    """Replace a header's values: the first fields of that name keep their place and spelling,
    surplus ones go, missing ones are added at the end."""
    wanted = name.lower().encode()
    left = [encode(value) for value in values]
    out: list[Field] = []
    for field in fields:
        if field[0].lower() == wanted:
            if left:
                out.append((field[0], left.pop(0)))
        else:
            out.append(field)
    out.extend((name.encode(), value) for value in left)
    return tuple(out)


def set_one(fields: Fields, name: str, value: str) -> Fields:
    return set_all(fields, name, [value])


def remove(fields: Fields, name: str) -> Fields:
    return set_all(fields, name, [])


@dataclass(frozen=True, slots=True)
class WatchedHeaders:
    """The request headers the paywall reads on every request, found in one pass over the
    raw fields (each mitmproxy header lookup costs a microsecond or more)."""

    authorization: str | None
    accept_authenticate: str | None
    cookie: bool
    hosts: tuple[bytes, ...] = ()
    upgrade: bool = False
    # A field with CR, LF or NUL in its name or value: an origin may read what follows a
    # bare CR as a header of its own (`X-A: 1\rX-L402-Tier: premium`), or a folded line.
    broken: bool = False

    @classmethod
    def of(cls, fields: Fields) -> "WatchedHeaders":
        authorization: list[bytes] = []
        accept: list[bytes] = []
        hosts: list[bytes] = []
        cookie = upgrade = broken = False
        for name, value in fields:
            # translate() deleting them is the cheapest test per field (no regex call).
            if len(value.translate(None, _BREAKS)) != len(value) or len(
                name.translate(None, _BREAKS)
            ) != len(name):
                broken = True
            lower = name.lower()
            if lower == b"authorization":
                authorization.append(value)
            elif lower == b"accept-authenticate":
                accept.append(value)
            elif lower == b"cookie":
                cookie = True
            elif lower == b"host":
                hosts.append(value)
            elif lower == b"upgrade":
                upgrade = True
        if len(authorization) > 1:
            # `Authorization: Basic ...` for the origin beside our L402 one: judge ours alone.
            ours = [value for value in authorization if is_our_authorization(value)]
            authorization = ours or authorization
        # Several lines of one header read as one list, as mitmproxy's headers.get() has them.
        return cls(_joined(authorization), _joined(accept), cookie, tuple(hosts), upgrade, broken)


_BREAKS = b"\r\n\0"


def _joined(values: list[bytes]) -> str | None:
    if not values:
        return None
    return b", ".join(values).decode("utf-8", "surrogateescape")


# gate.L402_SCHEMES as the raw header bytes are compared: one list of our schemes.
_OUR_SCHEMES = frozenset(scheme.lower().encode() for scheme in gate.L402_SCHEMES)


def is_our_authorization(value: bytes) -> bool:
    """An Authorization value in our schemes (L402, LSAT; any case): a credential of ours."""
    parts = value.split(None, 1)
    return bool(parts) and parts[0].lower() in _OUR_SCHEMES


def drop_our_authorization(fields: Fields) -> Fields:
    """Remove every Authorization field in our schemes; other schemes (Basic, Bearer) are the
    origin's and stay. One pass over the raw fields; the same tuple back if nothing went."""
    kept = tuple(
        field
        for field in fields
        if field[0].lower() != b"authorization" or not is_our_authorization(field[1])
    )
    return fields if len(kept) == len(fields) else kept


# Headers by which a client could make an origin route the request below another root than
# the path the paywall judged (Daphne takes Daphne-Root-Path as root_path; frameworks honour
# X-Forwarded-Prefix, X-Script-Name, IIS/Symfony X-Original-URL and X-Rewrite-URL): never
# forwarded from a client, compared as vouched_name spells them.
REROOTING_HEADERS = frozenset(
    {
        b"daphne-root-path",
        b"x-forwarded-prefix",
        b"x-script-name",
        b"script-name",
        b"x-original-url",
        b"x-rewrite-url",
    }
)


def vouched_name(name: bytes) -> bytes:
    """A header name as origins may read it: case-insensitive, and `_` taken for `-` (WSGI and
    CGI put both into the same HTTP_X_AD_FREE)."""
    return name.lower().replace(b"_", b"-")


def drop_vouched(fields: Fields, names: frozenset[bytes]) -> Fields:
    """Remove every field whose name is in `names` (the headers a paid variant sets: only the
    paywall may send them to the origin), compared as `vouched_name` spells them: `X_Ad_Free`
    goes too, since WSGI/CGI origins (and Django) read it as X-Ad-Free. The same tuple back if
    none was there."""
    for name, _ in fields:  # nearly always: none there, one pass, nothing built
        if name.lower().replace(b"_", b"-") in names:
            break
    else:
        return fields
    return tuple(field for field in fields if vouched_name(field[0]) not in names)


def drop_upgrade(fields: Fields) -> Fields:
    """Remove an Upgrade to anything but WebSocket (h2c, above all), with its Connection tokens
    and HTTP2-Settings. After a 101 a proxy tunnels the connection's raw bytes: the requests
    sent through it would never be judged. mitmproxy's own disable_h2c strips only a lower-case
    `h2c`; origins accept `H2C` too."""
    upgrade = [v.strip().lower() for v in (get(fields, "Upgrade") or "").split(",") if v.strip()]
    if upgrade and all(token == "websocket" for token in upgrade):
        return fields
    for name in ("Upgrade", "HTTP2-Settings"):
        fields = remove(fields, name)
    connection = [
        token.strip()
        for token in (get(fields, "Connection") or "").split(",")
        if token.strip() and token.strip().lower() not in ("upgrade", "http2-settings")
    ]
    if connection:
        return set_one(fields, "Connection", ", ".join(connection))
    return remove(fields, "Connection")


def take_our_cookies(fields: Fields) -> tuple[Fields, dict[str, str]]:
    """Our cookies out of the request (the origin's stay as they were): (fields left, ours)."""
    sent = get_all(fields, "cookie")
    kept, found = paywall.split_cookies(sent)
    if kept != sent:  # ours were there (a claim cookie is ours too, but never "found")
        fields = set_all(fields, "cookie", kept)
    return fields, found
