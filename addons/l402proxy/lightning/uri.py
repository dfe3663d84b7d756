"""Backend URIs: which module serves a URI, its query parameters, and a form safe to log.

Secrets (macaroons, keys, passwords) travel inside these URIs, so nothing outside this module
prints a URI as given: `redact()` first. A secret pasted in the wrong place (a key where the
host goes, a macaroon as the path or as a parameter name) must not show either, so messages
about URI parts go through `shown_name`, `shown_host`, `shown_path`, `shown_value`: anything
that looks like a key is replaced by `***`, and a parameter value is shown only when it is a
few characters (a typo like "soon"), never when it could be a key.

Every backend reads its query with `parse_query` (one parser: '+' stays '+', each value is
percent-decoded once, unknown and repeated names refused in the same words) and its
`timeout=` with `Query.timeout` (one rule: seconds, more than 0, at most MAX_TIMEOUT).
"""

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

import httpx

from l402proxy.lightning.base import LightningError

# The one timeout rule of every backend URI: `timeout=<seconds>` bounds each call to the node
# (payments have their own, longer limits), more than 0 and at most this.
MAX_TIMEOUT: Final = 600.0

# Query parameters that are never secret and help when reading a log.
PUBLIC_PARAMS = frozenset({"network", "timeout", "delay", "hold", "wallet", "tls"})
# Query parameters whose values are URLs: shown redacted themselves (an NWC URI's relays).
URL_PARAMS = frozenset({"relay"})

# user@domain, the Lightning Address form (LUD-16).
LIGHTNING_ADDRESS = re.compile(r"^[a-z0-9._+-]+@[a-z0-9.-]+\.[a-z]{2,}(:\d+)?$", re.IGNORECASE)

SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)(?::|\?|$)", re.IGNORECASE)
# A scheme worth naming in an error; anything longer may be a key without a scheme.
SHOWN_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,15}")
# Parameter names we name in messages: short identifiers (any case: a case typo is worth
# showing). Anything else may be a key pasted as `?<key>`.
SHOWN_NAME = re.compile(r"[a-z_]{1,16}", re.IGNORECASE)
# Parameter values are shown only this short (a typo like "soon" or "1s"), never a key.
SHOWN_VALUE_CHARS = 8
# Runs of base64/hex characters; long ones that mix letters and digits are taken for keys.
_RUN = re.compile(r"[A-Za-z0-9+=_-]+")
SECRET_RUN_CHARS = 20

# scheme -> module under l402proxy.lightning
MODULE_FOR_SCHEME = {
    "dev": "dev",
    "lnd": "lnd",
    "lndconnect": "lnd",
    "cln": "cln",
    "eclair": "eclair",
    "eclair+http": "eclair",
    "eclair+https": "eclair",
    "lnbits": "lnbits",
    "lnbits+http": "lnbits",
    "lnbits+https": "lnbits",
    "lnurl": "lnurl",
    # Nostr Wallet Connect (NIP-47); the second spelling is the NIP's first one, still seen.
    "nostr+walletconnect": "nwc",
    "nostrwalletconnect": "nwc",
}

SUPPORTED_FORMS = (
    "dev, dev:<wallet>, lnd://host:port?cert=<file>&macaroon=<file>, lndconnect://…, "
    "cln:///path/to/lightning-rpc, eclair://:<password>@host:port, "
    "lnbits://host?key=<key>, lnurl:user@domain (or just user@domain), "
    "nostr+walletconnect://<wallet pubkey>?relay=wss://…&secret=<hex>"
)


def scheme_of(uri: str) -> str:
    """The lower-cased scheme; a bare socket path is `cln`, a bare `user@domain` is `lnurl`."""
    text = uri.strip()
    if text.startswith("/"):
        return "cln"
    if LIGHTNING_ADDRESS.match(text):
        return "lnurl"
    # "dev?delay=1" has no colon: a bare word before "?" or the end names the scheme too.
    found = SCHEME.match(text)
    return found.group(1).lower() if found else ""


def looks_like_secret(text: str) -> bool:
    """Whether `text` holds what may be a key, macaroon or password: a run of 20 or more
    base64/hex characters mixing letters and digits, with few separators (so that file names
    like "tls-2024-01-01-renewed" and host labels do not count)."""
    for run in _RUN.findall(text):
        if len(run) < SECRET_RUN_CHARS:
            continue
        separators = sum(c in "+=_-" for c in run)
        if separators * 10 > len(run):
            continue
        if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return True
    return False


def shown_name(name: str) -> str:
    """A parameter name for a message: quoted if it is a short identifier, else not shown."""
    return repr(name) if SHOWN_NAME.fullmatch(name) else "(name not shown: it may be a key)"


def shown_value(value: str) -> str:
    """A parameter value for a message: quoted if it is short and not key-like, else not."""
    if len(value) <= SHOWN_VALUE_CHARS and not looks_like_secret(value):
        return repr(value)
    return "(value not shown)"


def shown_host(host: str) -> str:
    """A host for a message; a single label that looks like a key (`lnbits://<key>`) is not
    shown. Names with dots (onion addresses too) and IP addresses always are."""
    return "***" if "." not in host and looks_like_secret(host) else host


def shown_path(path: str) -> str:
    """A path for a message, each segment that looks like a key replaced by `***`."""
    return "/".join("***" if looks_like_secret(part) else part for part in path.split("/"))


def shown_hostport(hostport: str) -> str:
    """host:port for a message; a key-like host, or a port that is no port, is not shown."""
    if hostport.startswith("["):
        host, sep, rest = hostport.partition("]")
        host = f"{host}{sep}" if sep and not looks_like_secret(host) else "[***]"
    else:
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, ""
        rest = f":{port}" if sep else ""
        # Two colons: no host:port, but user:password with its '@' missing.
        host = "***" if ":" in host else shown_host(host)
    if rest and not (rest[1:].isdigit() and len(rest) <= 6):
        rest = ":***"  # a port that is no port: maybe a key
    return host + rest


def _masked_userinfo(userinfo: str) -> str:
    # Users, passwords and keys alike: `lnbits://<key>@host` has no colon but is a secret.
    return ":".join("***" if part else "" for part in userinfo.split(":", 1))


def shown_netloc(netloc: str) -> str:
    """user:password@host:port for a message: user info masked, a key-like host or port too."""
    userinfo, at, hostport = netloc.rpartition("@")
    shown = shown_hostport(hostport)
    return f"{_masked_userinfo(userinfo)}@{shown}" if at else shown


def usable_http_url(url: str) -> bool:
    """Whether httpx can make requests to `url`: its host must be a valid (IDNA) host name,
    which `urlsplit` does not check (httpx raises idna's errors, not an httpx.HTTPError)."""
    try:
        parsed = httpx.URL(url)
        # Decoding the host is where an invalid IDNA label (xn--a) fails.
        return bool(parsed.host) and bool(parsed.raw_host)
    except (httpx.InvalidURL, ValueError):  # idna.IDNAError is a UnicodeError
        return False


def module_for(uri: str) -> str:
    """The module name under l402proxy.lightning serving this URI; LightningError if none."""
    if not uri.strip():
        raise LightningError(f"empty backend URI; use one of: {SUPPORTED_FORMS}")
    scheme = scheme_of(uri)
    module = MODULE_FOR_SCHEME.get(scheme)
    if module is None:
        # Only a scheme-like scheme is shown: the rest, or a long "scheme", may be a key.
        if scheme and SHOWN_SCHEME.fullmatch(scheme) and not looks_like_secret(scheme):
            what = f"unsupported backend URI {scheme!r}"
        else:
            what = "backend URI without a scheme"
        raise LightningError(f"{what}; use one of: {SUPPORTED_FORMS}")
    return module


def query_items(query: str) -> list[tuple[str, str]]:
    """The (name, value) pairs of a query string, in order, each percent-decoded once.

    Not parse_qsl: it turns '+' into a space (HTML form encoding), and a URI is no form:
    base64 keys, passwords and file names hold '+'. A literal space is written %20."""
    items = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            items.append((unquote(name), unquote(value)))
    return items


@dataclass(frozen=True)
class Query:
    """A backend URI's query parameters, checked: names known, each given once (except the
    `repeatable` ones, such as NWC's relays)."""

    what: str  # "eclair URI": how messages name the URI
    values: dict[str, list[str]]

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def get(self, name: str, default: str | None = None) -> str | None:
        """The parameter's value (the first, for a repeatable one), or `default`."""
        found = self.values.get(name)
        return found[0] if found else default

    def all(self, name: str) -> list[str]:
        """Every value of a repeatable parameter, in order."""
        return list(self.values.get(name, ()))

    def timeout(self, default: float) -> float:
        """`timeout=<seconds>` by the one rule every backend follows, or `default`."""
        value = self.get("timeout")
        return default if value is None else timeout_seconds(value, self.what)


def parse_query(
    uri: str,
    *,
    what: str = "backend URI",
    allowed: Sequence[str] | None = None,
    repeatable: Collection[str] = (),
) -> Query:
    """The query of `uri`: LightningError (secret-free, naming `what`) for a parameter not in
    `allowed` (None: any), or one given twice that is not `repeatable` (which one would win?)."""
    values: dict[str, list[str]] = {}
    # What urlsplit calls the query, without its ValueError for a broken host ("dev://[x").
    query = uri.strip().partition("#")[0].partition("?")[2]
    for name, value in query_items(query):
        if allowed is not None and name not in allowed:
            listed = ", ".join(repr(a) for a in allowed) or "none"
            raise LightningError(
                f"{what}: unknown parameter {shown_name(name)} (allowed: {listed})"
            )
        if name in values and name not in repeatable:
            raise LightningError(f"{what}: parameter {shown_name(name)} given twice")
        values.setdefault(name, []).append(value)
    return Query(what, values)


def query_params(uri: str, *, what: str = "backend URI") -> dict[str, str]:
    """Query parameters of a URI, any names, each given once."""
    return {name: values[0] for name, values in parse_query(uri, what=what).values.items()}


def timeout_seconds(value: str, what: str) -> float:
    """A `timeout=` value: a number of seconds, more than 0 and at most MAX_TIMEOUT."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT):
        raise LightningError(
            f"{what}: timeout must be a number of seconds more than 0 and at most "
            f"{MAX_TIMEOUT:g}, got {shown_value(value)}"
        )
    return seconds


def _public(name: str, value: str) -> bool:
    # timeout=<a key> is a key in the wrong place all the same.
    return name in PUBLIC_PARAMS and len(value) <= 16 and not looks_like_secret(value)


def _shown_param(name: str, value: str) -> str:
    if _public(name, value):
        return value
    if name in URL_PARAMS and value.lower().startswith(("ws://", "wss://")):
        return redact(value)
    return "***"


def redact(uri: str) -> str:
    """The URI with every secret replaced by `***`: user info, query values not known to be
    public, and hosts, ports, paths and parameter names that look like keys. Safe for logs,
    errors, flow metadata and 402 bodies."""
    text = uri.strip()
    if LIGHTNING_ADDRESS.match(text):
        return text
    if text.startswith("/"):
        return shown_path(text)
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<unparsable URI>"
    query = "&".join(
        f"{name}={_shown_param(name, value)}" if SHOWN_NAME.fullmatch(name) else "***"
        for name, value in query_items(parts.query)
    )
    # A scheme we serve is shown whatever its length (nostr+walletconnect).
    known = parts.scheme.lower() in MODULE_FOR_SCHEME
    scheme = parts.scheme if known or SHOWN_SCHEME.fullmatch(parts.scheme.lower()) else "***"
    if parts.netloc and "@" in f"{parts.path}{parts.query}{parts.fragment}":
        # An '@' after the authority: a '/', '?' or '#' in the user info ended it early, and
        # the rest of a password follows. Where it ends cannot be told: show none of it.
        return f"{scheme}://***"
    if parts.netloc:
        shown = f"{scheme}://{shown_netloc(parts.netloc)}{shown_path(parts.path)}"
    elif "://" in parts.path:
        # A URL inside the URI (lnurl:https://user:pw@host/...): redacted the same way.
        inner = f"{parts.path}?{parts.query}" if parts.query else parts.path
        return f"{scheme}:{redact(inner)}"
    else:
        shown = f"{scheme}:{shown_path(parts.path)}"
    return f"{shown}?{query}" if query else shown
