"""What the paywall sells, for machines: the discovery manifest at `/.well-known/l402.json`.

Pure: no I/O. The document follows the bespoke profile of the L402 discovery proposal
(lightninglabs/L402 PR #27, discovery-spec.md section 5): `version`, `provider`, `currencies`,
`macaroon_versions`, `payment_methods`, `services` (one per priced rule, named as its
`services=` caveat) each with `resources` (one per method: `path`, `method`, `capability`,
`pricing`), and the `caveats` vocabulary the verifier enforces. What the proposal has no slot
for is added as members of our own, which its section 9 tells clients to ignore when they do not
know them: `path_syntax`, and per service `mode`, `schemes`, `valid_for_seconds`,
`invoice_expiry_seconds`, `token_caveats`, `bundle`, `single_use`, `pass`, `private_feed`.

A `dynamic` price has no quote endpoint here (the proposal asks for one): the 402 tells it, as
for every other price. `valid_for_seconds` and `token_caveats` describe the L402 token a rule
sells, so a rule sold only as Payment charges (one request each) has neither.

Only what a client could learn by asking for a 402 goes in. Never: a paid variant (upstream,
rewrite, set_headers: the operator's internal origins and the secrets it sends them), a price
function's module, the rules file's path or line numbers, a bundle's usage header, rate limits,
and no rule with `discovery: false`, whose name is left out everywhere (a pass lists only the
services the manifest shows).

The bytes are deterministic (sorted keys, rules in file order, methods sorted), so the ETag,
a hash of the body, only changes when what is sold does.
"""

import fnmatch
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from ..l402.identifier import LATEST_VERSION
from ..l402.token import UNLISTED_CAPABILITY
from ..rules import PRICED_MODES, Rule, RuleSet, _host_matches, normalize_path
from .answers import Answer

__all__ = [
    "CACHE_CONTROL",
    "PATH",
    "VERSION",
    "is_manifest_target",
    "manifest",
    "manifest_answer",
    "manifest_body",
    "path_pattern",
]

# RFC 8615 well-known URI the proposal names.
PATH = "/.well-known/l402.json"
# The proposal's manifest schema version.
VERSION = "1.0"
# Catalog data changes when the rules do: five minutes in any cache, then revalidated by ETag.
CACHE_CONTROL = "public, max-age=300"
DEFAULT_PROVIDER = "l402proxy"
# What a `<name>_valid_until` caveat's value stands for in the templates.
TIME_PLACEHOLDER = "<unix seconds>"
# Any method, where a rule names none.
ANY_METHOD = "*"
_ALLOW = "GET, HEAD"
# The wrapper fnmatch.translate puts around a glob's regex (3.11-3.13 end in \Z, 3.14 in \z).
_FNMATCH_FORM = re.compile(r"\(\?s:(?P<body>.*)\)\\[Zz]", re.DOTALL)
_GLOB_SPECIAL = frozenset("*?[")
# Manifests made, by (id(rules), host, schemes, provider): rules are immutable, so a manifest
# is made once per rules and host, not on every request. The entry keeps the RuleSet itself
# (compared with `is`), so its id cannot be reused while the entry lives. Bounded: a client
# choosing Host values can only make us rebuild.
_MADE: dict[tuple[int, str | None, tuple[str, ...], str], tuple[RuleSet, bytes, str]] = {}
_MADE_LIMIT = 64


def manifest(
    rules: RuleSet,
    *,
    default_schemes: Sequence[str] = ("l402",),
    host: str | None = None,
    provider: str = DEFAULT_PROVIDER,
) -> dict[str, Any]:
    """The manifest of `rules`: every priced rule (paywall or upgrade) not hidden with
    `discovery: false`. `host` (as the rules match it, no port) leaves out the rules scoped to
    other hosts, so one site's manifest never lists another's catalog; None lists every rule.
    A rule without `schemes` offers `default_schemes`."""
    # A pass may open a service on another host: named, unless the operator hides it.
    visible = {rule.name for rule in rules.rules if _shown(rule)}
    listed = [
        rule
        for rule in rules.rules
        if _shown(rule) and (host is None or rule.host is None or _host_matches(rule.host, host))
    ]
    services = [_service(rule, visible, default_schemes) for rule in listed]
    conditions = [
        caveat.partition("=")[0]
        for service in services
        for caveat in service.get("token_caveats", ())
    ]
    return {
        "version": VERSION,
        "provider": {"name": provider},
        "currencies": ["msat"],
        "macaroon_versions": [LATEST_VERSION],
        "payment_methods": ["bolt11"],
        "services": services,
        "caveats": _vocabulary(conditions),
    }


def manifest_body(
    rules: RuleSet,
    *,
    default_schemes: Sequence[str] = ("l402",),
    host: str | None = None,
    provider: str = DEFAULT_PROVIDER,
) -> tuple[bytes, str]:
    """The manifest's bytes and their strong ETag (quoted), made once per rules and host."""
    schemes = tuple(default_schemes)
    if host is not None and all(rule.host is None for rule in rules.rules):
        host = None  # every host gets the same document: one entry, whatever Host says
    key = (id(rules), host, schemes, provider)
    made = _MADE.get(key)
    if made is not None and made[0] is rules:
        return made[1], made[2]
    document = manifest(rules, default_schemes=schemes, host=host, provider=provider)
    body = (json.dumps(document, sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if len(_MADE) >= _MADE_LIMIT:
        _MADE.clear()
    _MADE[key] = (rules, body, etag)
    return body, etag


def manifest_answer(
    rules: RuleSet,
    method: str,
    *,
    if_none_match: str | None = None,
    default_schemes: Sequence[str] = ("l402",),
    host: str | None = None,
    provider: str = DEFAULT_PROVIDER,
) -> Answer:
    """The answer to a request for PATH: 200 JSON (cacheable by anyone, with an ETag), without
    the body for HEAD, 304 when `if_none_match` (the request's If-None-Match) names the ETag,
    405 with Allow for any other method. Never a 402: the proposal says the manifest is free."""
    verb = method.upper()
    if verb not in ("GET", "HEAD"):
        answer = Answer.make(
            405,
            f"Method not allowed: {PATH} answers GET and HEAD.\n".encode(),
            {
                "Allow": _ALLOW,
                "Cache-Control": "no-store",
                "Content-Type": "text/plain; charset=utf-8",
            },
        )
        answer.note = {"variant": "endpoint", "endpoint": "discovery"}
        return answer
    body, etag = manifest_body(rules, default_schemes=default_schemes, host=host, provider=provider)
    common = [
        (b"ETag", etag.encode()),
        (b"Cache-Control", CACHE_CONTROL.encode()),
        # No credentials involved and nothing secret in it: browser agents may read it
        # (the proposal's section 5.1 recommends this).
        (b"Access-Control-Allow-Origin", b"*"),
        (b"X-Content-Type-Options", b"nosniff"),
    ]
    if any(rule.host is not None for rule in rules.rules):
        # The body follows Host (rules scoped to other hosts are left out): a shared cache
        # whose key leaves Host out must keep each host's catalog apart (on the 304 too).
        common.append((b"Vary", b"Host"))
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        # No Content-Length: one here must equal the 200's length (RFC 9110 8.6), and some
        # servers (uvicorn) refuse to send a shorter body than a Content-Length announces.
        answer = Answer(304, common)
    else:
        answer = Answer.make(200, body, [*common, (b"Content-Type", b"application/json")])
        answer = answer.for_method(verb)
    answer.note = {"variant": "endpoint", "endpoint": "discovery"}
    return answer


def is_manifest_target(target: str) -> bool:
    """Whether a request target (origin form, query ignored) names the manifest, read as the
    rules read paths (`/.well-known/l402%2Ejson` too). Cheap for every other request."""
    base = target.partition("?")[0]
    if base == PATH:
        return True
    if "%" not in base and "l402.json" not in base:
        return False  # without escapes, only dot segments and `//` could still change it
    return normalize_path(base) == PATH


def path_pattern(rule: Rule) -> tuple[str, str]:
    """A rule's match.path as the rules file writes it, and how to read it: ("/x/*", "glob"),
    ("/feed.xml", "exact") or ("re:<regex>", "regex").

    The rule keeps only the compiled regex; a glob is recovered from fnmatch's translation and
    kept only when translating it again gives the very same regex, so what is shown always
    matches what the rule matches."""
    text = rule.path.pattern
    glob = _glob_of(text)
    if glob is None:
        return f"re:{text}", "regex"
    return glob, "glob" if _GLOB_SPECIAL.intersection(glob) else "exact"


# -- one rule ---------------------------------------------------------------------------------


def _shown(rule: Rule) -> bool:
    """A priced rule the operator did not hide (`discovery: false`)."""
    return rule.mode in PRICED_MODES and getattr(rule, "discovery", True) is not False


def _service(rule: Rule, visible: set[str], default_schemes: Sequence[str]) -> dict[str, Any]:
    sold = rule.pass_
    schemes = _schemes(rule, default_schemes)
    service: dict[str, Any] = {
        "name": rule.name,
        "description": rule.description,
        "resources": _resources(rule),
        "mode": rule.mode,
        "schemes": schemes,
        "invoice_expiry_seconds": rule.invoice_expiry,
        "single_use": rule.single_use,
    }
    if "l402" in schemes:
        # What a token is good for; a Payment charge (the other scheme) pays for one request.
        valid_for = rule.valid_for if sold is None else sold.valid_for
        service["valid_for_seconds"] = valid_for
        service["token_caveats"] = _token_caveats(rule, visible, valid_for)
    if rule.capabilities is not None:
        service["capabilities"] = list(rule.capabilities)
    if rule.bundle is not None:
        # Not usage_header: how the origin reports units to the proxy is not the client's concern.
        service["bundle"] = {"unit": rule.bundle.unit, "size": rule.bundle.size}
    if sold is not None:
        service["pass"] = {
            "name": sold.name,
            "services": [name for name in sold.services if name in visible],
            "valid_for_seconds": sold.valid_for,
        }
    if rule.feed is not None:
        service["private_feed"] = rule.feed
    return service


def _resources(rule: Rule) -> list[dict[str, Any]]:
    """One resource per method a token the rule sells opens (the proposal's resources have
    one method), sorted: the methods the rule lists, else "*" (any method). With the mapping
    form of `capabilities`, a token is restricted to the capabilities it names, so only the
    methods they cover (HEAD with GET's) are sold: another method would be charged for and
    then refused."""
    path, syntax = path_pattern(rule)
    methods: list[str]
    if rule.methods is not None:
        methods = sorted(rule.methods)
    elif rule.capability_methods:
        named = {method for _, listed in rule.capability_methods for method in listed}
        methods = sorted(named | {"HEAD"})
    else:
        methods = [ANY_METHOD]
    pricing = _pricing(rule)
    resources = []
    for method in methods:
        resource: dict[str, Any] = {
            "path": path,
            "path_syntax": syntax,
            "method": method,
            "pricing": pricing,
        }
        capability = None if method == ANY_METHOD else rule.capability_for(method)
        if capability == UNLISTED_CAPABILITY:
            continue  # no capability covers it: no token this rule sells opens it
        if capability is not None:
            resource["capability"] = capability
        resources.append(resource)
    return resources


def _pricing(rule: Rule) -> dict[str, Any]:
    if rule.price is not None:
        # Computed per challenge by the operator's function: the 402 tells the price.
        return {"model": "dynamic"}
    return {"model": "fixed", "price_msat": rule.price_sat * 1000, "price_sat": rule.price_sat}


def _schemes(rule: Rule, default_schemes: Sequence[str]) -> list[str]:
    schemes = getattr(rule, "schemes", None)
    chosen = schemes or default_schemes
    return list(dict.fromkeys(str(scheme) for scheme in chosen))


def _token_caveats(rule: Rule, visible: set[str], valid_for: int | None) -> list[str]:
    """The caveats a token this rule sells carries, in the order engine.core.caveats_for_pass
    mints them; a `<name>_valid_until` value is the invoice's expiry plus valid_for_seconds."""
    names = [rule.name]
    if rule.pass_ is not None:
        names += [name for name in rule.pass_.services if name != rule.name and name in visible]
    caveats = ["services=" + ",".join(f"{name}:0" for name in names)]
    if rule.capabilities is not None:
        caveats.append(f"{rule.name}_capabilities={','.join(rule.capabilities)}")
    if valid_for is not None:
        caveats += [f"{name}_valid_until={TIME_PLACEHOLDER}" for name in names]
    return caveats


def _vocabulary(conditions: Sequence[str]) -> dict[str, Any]:
    """The caveat conditions the tokens of the listed services carry, which the verifier
    enforces, and how a holder may narrow each (l402.token checks every occurrence of a
    condition, so appending a caveat only narrows)."""
    vocabulary: dict[str, Any] = {
        "services": {"type": "service_list", "attenuation": "subset"},
    }
    for condition in conditions:
        if condition.endswith("_capabilities"):
            vocabulary[condition] = {"type": "string", "attenuation": "subset"}
        elif condition.endswith("_valid_until"):
            vocabulary[condition] = {"type": "timestamp", "attenuation": "earlier"}
    return vocabulary


# -- helpers ----------------------------------------------------------------------------------


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 13.1.2): `*`, or any listed tag equal to ours
    once a `W/` prefix is set aside."""
    for part in header.split(","):
        tag = part.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def _glob_of(regex: str) -> str | None:
    """The glob fnmatch.translate made `regex` from, or None (a `re:` rule, or a translation
    this reading does not know: the caller shows the regex, which means the same)."""
    form = _FNMATCH_FORM.fullmatch(regex)
    if form is None:
        return None
    body = form["body"]
    out: list[str] = []
    depth = 0  # open atomic groups: `(?>.*?<fixed>)` is a `*` between fixed parts
    i = 0
    while i < len(body):
        if body.startswith("(?>.*?", i):
            out.append("*")
            depth += 1
            i += 6
        elif body.startswith(".*", i):
            out.append("*")
            i += 2
        elif body[i] == ")" and depth:
            depth -= 1
            i += 1
        elif body[i] == ".":
            out.append("?")
            i += 1
        elif body[i] == "\\" and i + 1 < len(body):
            if body[i + 1].isalnum():
                return None  # \d, \w, \Z...: a regex class, not an escaped character
            out.append(body[i + 1])
            i += 2
        elif body[i] == "[":
            end = _class_end(body, i)
            if end is None:
                return None
            out.append(_glob_class(body[i + 1 : end]))
            i = end + 1
        elif body[i] in "()|^$+{}*?]":
            return None
        else:
            out.append(body[i])
            i += 1
    glob = "".join(out)
    if depth or fnmatch.translate(glob) != regex:
        return None
    return glob


def _class_end(body: str, start: int) -> int | None:
    """Where the character class opening at `start` closes (a `]` first in it is literal)."""
    i = start + 1
    if body.startswith("^", i):
        i += 1
    if body.startswith("]", i):
        i += 1
    while i < len(body):
        if body[i] == "\\":
            i += 2
            continue
        if body[i] == "]":
            return i
        i += 1
    return None


def _glob_class(inner: str) -> str:
    """A regex class's inside as fnmatch wrote it, back in glob form (checked by the caller's
    translation round trip): `^` was `!`, escapes undone."""
    negated = inner.startswith("^")
    if negated:
        inner = inner[1:]
    text = re.sub(r"\\(.)", r"\1", inner, flags=re.DOTALL)
    return "[" + ("!" if negated else "") + text + "]"
