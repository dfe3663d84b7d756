"""Backend URIs: which module serves a URI, its query parameters, and a form safe to log.

Secrets (macaroons, keys, passwords) travel inside these URIs, so nothing outside this module
prints a URI as given: `redact()` first.
"""

import re
from urllib.parse import parse_qsl, urlsplit

from l402proxy.lightning.base import LightningError

# Query parameters that are never secret and help when reading a log.
PUBLIC_PARAMS = frozenset({"network", "timeout", "delay", "hold", "wallet", "tls"})

# user@domain, the Lightning Address form (LUD-16).
LIGHTNING_ADDRESS = re.compile(r"^[a-z0-9._+-]+@[a-z0-9.-]+\.[a-z]{2,}(:\d+)?$", re.IGNORECASE)

SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)(?::|\?|$)", re.IGNORECASE)

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
}

SUPPORTED_FORMS = (
    "dev, dev:<wallet>, lnd://host:port?cert=<file>&macaroon=<file>, lndconnect://…, "
    "cln:///path/to/lightning-rpc, eclair://:<password>@host:port, "
    "lnbits://host?key=<key>, lnurl:user@domain (or just user@domain)"
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


def module_for(uri: str) -> str:
    """The module name under l402proxy.lightning serving this URI; LightningError if none."""
    if not uri.strip():
        raise LightningError(f"empty backend URI; use one of: {SUPPORTED_FORMS}")
    scheme = scheme_of(uri)
    module = MODULE_FOR_SCHEME.get(scheme)
    if module is None:
        # Only the scheme is shown: the rest may be a key pasted in the wrong place.
        what = f"unsupported backend URI {scheme!r}" if scheme else "backend URI without a scheme"
        raise LightningError(f"{what}; use one of: {SUPPORTED_FORMS}")
    return module


def query_params(uri: str) -> dict[str, str]:
    """Query parameters of a URI; a parameter given twice is an error (which one would win?)."""
    query = urlsplit(uri.strip()).query
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in params:
            raise LightningError(f"backend URI: parameter {name!r} given twice")
        params[name] = value
    return params


def redact(uri: str) -> str:
    """The URI with every secret replaced by `***`: passwords, and query values not known to
    be public. Safe for logs, errors, flow metadata and 402 bodies."""
    text = uri.strip()
    if text.startswith("/") or LIGHTNING_ADDRESS.match(text):
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<unparsable URI>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = "&".join(
        f"{name}={value if name in PUBLIC_PARAMS else '***'}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    if parts.netloc:
        shown = f"{parts.scheme}://{netloc}{parts.path}"
    else:
        shown = f"{parts.scheme}:{parts.path}"
    return f"{shown}?{query}" if query else shown
