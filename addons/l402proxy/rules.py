"""Rules file: YAML -> validated, typed rules; request -> rule matching.

The file is edited by hand and a proxy that refuses to start must say exactly where to look, so
parsing works on PyYAML's node tree (which keeps line numbers) rather than on plain Python
objects, and every `RulesError` names the file and the line.
"""

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import importlib
import inspect
import ipaddress
import os
import re
import string
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, get_args
from urllib.parse import quote, unquote_to_bytes, urlsplit

import yaml

from .l402.token import UNLISTED_CAPABILITY

__all__ = [
    "BUNDLE_UNITS",
    "DEFAULT_INVOICE_EXPIRY",
    "DEFAULT_INVOICE_LIMIT",
    "DEFAULT_VALID_FOR",
    "MAX_BUNDLE_SIZE",
    "MAX_PRICE_SAT",
    "MAX_READ_PATH",
    "MIN_INVOICE_EXPIRY",
    "MODES",
    "PLAIN_PATH",
    "PRICED_MODES",
    "SCHEMES",
    "AmbiguousPath",
    "Bundle",
    "BundleUnit",
    "Freebies",
    "MalformedPath",
    "Mode",
    "PaidVariant",
    "PassSpec",
    "PathError",
    "PriceRef",
    "RateLimit",
    "Rule",
    "RuleSet",
    "RulesError",
    "load_rules",
    "normalize_path",
    "parse_duration",
    "parse_rules",
    "parse_schemes",
    "parse_size",
    "path_forms",
    "rule_warnings",
    "scheme_problem",
    "scope_path",
]

Mode = Literal["paywall", "upgrade", "free", "deny"]
MODES: tuple[str, ...] = get_args(Mode)
# How a priced rule may be paid: "l402" (an L402/LSAT token, reusable until it expires) and
# "payment" (the Payment HTTP authentication scheme's Lightning charge: one request per paid
# invoice, engine/charges.py). A rule without `schemes:` takes the paywall's default (the
# l402_schemes option, serve-auth's and the ASGI middleware's `schemes`), DEFAULT_SCHEMES
# unless set.
SCHEMES: tuple[str, ...] = ("l402", "payment")
DEFAULT_SCHEMES: tuple[str, ...] = ("l402",)

DEFAULT_VALID_FOR = 3600
DEFAULT_INVOICE_EXPIRY = 600
# Below a minute a payer (a person, or a wallet with a slow route) cannot settle in time.
MIN_INVOICE_EXPIRY = 60
SUPPORTED_VERSIONS = (1,)
# What fnmatch.translate makes of a glob (3.11-3.13 end in \Z, 3.14 in \z).
_FNMATCH_FORM = re.compile(r"\(\?s:(?P<body>.*)\)\\[Zz]", re.DOTALL)
_REGEX_SPECIAL = frozenset(".^$*+?{}[]|()")
_QUANTIFIERS = frozenset("*+?{")
# RFC 6265 path-value minus what would need care in a header or a cookie (';', ',', quotes).
PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._~!$&'()*+=:@%-]*")
# Priced modes: a request they match costs something (or a token).
PRICED_MODES = frozenset({"paywall", "upgrade"})
# The paywall's own pages (paywall.ENDPOINT_PREFIX; paywall imports this module): never a feed.
_ENDPOINT_PREFIX = "/.l402/"
# 21 million BTC: anything above is a typo, and a huge price would only fail later in the backend.
MAX_PRICE_SAT = 21_000_000 * 100_000_000
# The BOLT11 description field holds at most 639 bytes (10-bit length of 5-bit groups); keep
# room for what the server puts around the description in the memo (e.g. the service name).
MAX_DESCRIPTION_BYTES = 500
# The largest bundle (requests, bytes or units): a petabyte, far beyond any real bundle, and far
# inside the 64-bit integers SQLite and PostgreSQL keep balances in.
MAX_BUNDLE_SIZE = 10**15

# The name goes into caveats (`services=<name>:0`, `<name>_valid_until=...`): ',', ':', '='
# and spaces would change their meaning.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# RFC 9110 token: both header names and method names.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DURATION_RE = re.compile(r"\s*([0-9]+)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_HINT = "use seconds or a number with s, m, h, d or w: '30s', '15m', '12h', '30d', '1w'"
# Headers that frame the message or belong to one connection: setting them towards the origin
# would corrupt the request instead of informing the origin.
_FORBIDDEN_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)
# Hop-by-hop headers besides those (RFC 9110 7.6.1, RFC 2616 13.5.1): one connection's business,
# never the origin's report of what a request used.
_HOP_BY_HOP = frozenset({"proxy-connection", "proxy-authenticate", "proxy-authorization"})
# `price: python:<module>:<attribute>`, both dotted Python names (`pricing.api:Pricer.quote`).
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_PRICE_REF_RE = re.compile(rf"python:(?P<module>{_DOTTED}):(?P<attribute>{_DOTTED})", re.ASCII)
# A size: a number (a fraction allowed: '1.5GB'), then a unit. The unit is read ignoring case.
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", re.ASCII)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_SIZE_HINT = (
    "use a whole number of bytes, or a number with B, kB, MB, GB, TB (powers of 1000) or KiB, "
    "MiB, GiB, TiB (powers of 1024): '500MB', '1.5GB', '10KiB'"
)
_PCT_RUN_RE = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")

_TOP_KEYS = ("version", "mode", "services", "invoice_limit", "trusted_proxies")
# The paywall's top-level mode: enforce it, or only say what it would do (dry_run).
PAYWALL_MODES = ("enforce", "dry_run")
_SERVICE_KEYS = (
    "name",
    "description",
    "match",
    "price_sat",
    "mode",
    "paid",
    "valid_for",
    "capabilities",
    "invoice_expiry",
    "free_paths",
    "rate_limits",
    "freebies",
    "price",
    "bundle",
    "single_use",
    "pass",
    "feed",
    "schemes",
    "discovery",
)
# What a service sells beyond its price: refused where nothing is sold (free, deny).
_SOLD_KEYS = ("price", "bundle", "single_use", "pass", "feed", "schemes", "discovery")
_MATCH_KEYS = ("path", "host", "methods")
_PAID_KEYS = ("rewrite_path", "upstream", "set_headers")
_RATE_KEYS = ("requests", "per", "burst", "key")
_FREEBIE_KEYS = ("requests", "per")
BundleUnit = Literal["requests", "bytes", "units"]
BUNDLE_UNITS: tuple[str, ...] = get_args(BundleUnit)
_BUNDLE_KEYS = (*BUNDLE_UNITS, "usage_header")
_PASS_KEYS = ("name", "services", "valid_for")
RateKey = Literal["ip", "token"]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"


class RulesError(ValueError):
    """Rules file problem: "<file>:<line>: service '<name>': <problem>" (unknown parts omitted)."""

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        service: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.line = line
        self.service = service
        parts: list[str] = []
        if source is not None:
            parts.append(f"{source}:{line}" if line is not None else source)
        elif line is not None:
            parts.append(f"line {line}")
        if service is not None:
            parts.append(f"service '{service}'")
        parts.append(problem)
        super().__init__(": ".join(parts))


class _FrozenHeaders(Mapping[str, str]):
    """Read-only, hashable header mapping, so a frozen Rule really is immutable and hashable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class PaidVariant:
    """What a paying client gets; all None/empty means the same URL, unlocked."""

    rewrite: tuple[re.Pattern[str], str] | None = None
    upstream: str | None = None  # "http://host:port" or "https://host:port"
    set_headers: Mapping[str, str] = field(default_factory=_FrozenHeaders)

    def __post_init__(self) -> None:
        if not isinstance(self.set_headers, _FrozenHeaders):
            object.__setattr__(self, "set_headers", _FrozenHeaders(self.set_headers))

    def apply_path(self, path: str) -> str:
        """The path (query kept) a paying client's request goes to.

        The rewrite runs on the normalised path, the same one the rule was matched on, so
        `/episodes/../bonus/x` cannot be bought at the episode price and rewritten elsewhere.
        RuleSet.match refuses a path (`%2F`, `;`, `\\`) whose readings the rewrite would send
        to different places, so the strict form stands for every reading here.
        """
        if self.rewrite is None:
            return path
        base, sep, query = path.partition("?")
        pattern, replacement = self.rewrite
        return _rewritten(pattern, replacement, base) + sep + query


@dataclass(frozen=True)
class RateLimit:
    """`requests` per `per` seconds, with up to `burst` at once (a token bucket: GCRA), counted
    per client IP or per token; `line` is where the file sets it."""

    requests: int
    per: int
    burst: int
    key: RateKey = "ip"
    line: int | None = None

    @property
    def interval(self) -> float:
        """Seconds one request costs."""
        return self.per / self.requests


@dataclass(frozen=True)
class Freebies:
    """`requests` free answers per client IP in each window of `per` seconds, before the 402."""

    requests: int
    per: int


@dataclass(frozen=True)
class Bundle:
    """What one token buys: `size` requests, bytes of response body, or units the origin
    reports per request in the response header `usage_header` (units only; compare its name
    ignoring case). `single_use: true` in the file is Bundle("requests", 1, None)."""

    unit: BundleUnit
    size: int
    usage_header: str | None = None


@dataclass(frozen=True)
class PassSpec:
    """`pass:` of a service: its 402 sells a token named `name` that opens every service in
    `services` (the selling service among them), each for `valid_for` seconds (None: never
    expires). The file's `pass.valid_for` or, when it gives none, the service's valid_for."""

    name: str
    services: tuple[str, ...]
    valid_for: int | None


@dataclass(frozen=True)
class PriceRef:
    """`price: python:<module>:<function>`: `text` as the file wrote it, `function` the callable
    imported when the rules loaded (called with an engine.pricing.PriceRequest, returns sats,
    plain or async); `source` and `line` say where the file names it, for error messages."""

    text: str
    function: Callable[..., Any]
    source: str | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        """`<file>:<line>` of the reference (what is known of it)."""
        if self.source is not None:
            return f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"line {self.line}" if self.line is not None else "<rules>"


# Every 402 makes the backend create an invoice: by default one client IP gets at most 60 a
# minute, 120 at once (a browser or an app never needs as many; a flood does not make more).
DEFAULT_INVOICE_LIMIT = RateLimit(requests=60, per=60, burst=120, key="ip")


@dataclass(frozen=True)
class Rule:
    name: str
    path: re.Pattern[str]  # use fullmatch: globs and "re:" patterns both match the whole path
    host: re.Pattern[str] | None
    methods: frozenset[str] | None
    price_sat: int
    mode: Mode
    paid: PaidVariant
    valid_for: int | None  # seconds; None = never expires
    capabilities: tuple[str, ...] | None
    description: str
    invoice_expiry: int
    line: int
    # capability -> the methods that need it, from the mapping form of `capabilities`.
    capability_methods: tuple[tuple[str, frozenset[str]], ...] = ()
    # Paths inside the rule that are free (Aperture's authwhitelistpaths), matched like `path`.
    free_paths: tuple[re.Pattern[str], ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    freebies: Freebies | None = None
    # `price:` instead of price_sat (which is then 0): a price computed per challenge.
    price: PriceRef | None = None
    # What one token buys; single_use is a bundle of 1 request (and `bundle` says so too).
    bundle: Bundle | None = None
    single_use: bool = False
    # `pass:`: the token this rule sells opens several services.
    pass_: PassSpec | None = None
    # `feed:`: the podcast feed (a plain path on this site) a buyer gets a private copy of,
    # at /.l402/feed/<capability><feed> (engine/feeds.py).
    feed: str | None = None
    # `schemes:` in the order written; None: the paywall's default (see SCHEMES).
    schemes: tuple[str, ...] | None = None
    # `discovery: false`: left out of /.well-known/l402.json (engine/discovery.py); still sold.
    discovery: bool = True

    @functools.cached_property
    def free_view(self) -> "Rule":
        """This rule as it stands for one of its free_paths: mode free, nothing sold (no price
        to compute, no bundle to draw from, no pass)."""
        return dataclasses.replace(
            self,
            mode="free",
            free_paths=(),
            freebies=None,
            price=None,
            bundle=None,
            single_use=False,
            pass_=None,
            feed=None,
            schemes=None,
        )

    def pricing_json(self, default_schemes: Sequence[str] = DEFAULT_SCHEMES) -> dict[str, Any]:
        """How the rule sells, for listings (`rules check`, the admin page): price_sat is None
        when a price: function sets it per challenge; `schemes` the rule's own, else
        `default_schemes` (the paywall's default, which `rules check` cannot know: the built-in
        one), with `schemes_default` saying which."""
        bundle = self.bundle
        sold = self.pass_
        return {
            "price_sat": None if self.price is not None else self.price_sat,
            "price": None if self.price is None else self.price.text,
            "bundle": None
            if bundle is None
            else {"unit": bundle.unit, "size": bundle.size, "usage_header": bundle.usage_header},
            "single_use": self.single_use,
            "pass": None
            if sold is None
            else {"name": sold.name, "services": list(sold.services), "valid_for": sold.valid_for},
            "feed": self.feed,
            "schemes": list(self.schemes if self.schemes is not None else default_schemes),
            "schemes_default": self.schemes is None,
        }

    def _judged_as(self, path: str) -> "Rule":
        if self.free_paths and any(free.fullmatch(path) for free in self.free_paths):
            return self.free_view
        return self

    def capability_for(self, method: str) -> str | None:
        """The capability a request with this method needs from a token restricted to some
        capabilities; None when the rule checks none (no mapping form of `capabilities`).

        A method the mapping does not list needs UNLISTED_CAPABILITY, which no restricted token
        grants: a read-only copy of a token must not open OPTIONS, PROPFIND or MOVE because
        nobody thought of them. HEAD, unless listed itself, needs what GET needs (it is a GET
        without the body). A token without a capabilities caveat opens every method.
        """
        method = method.upper()
        for capability, methods in self.capability_methods:
            if method in methods:
                return capability
        if not self.capability_methods:
            return None
        if method == "HEAD":
            return self.capability_for("GET")
        return UNLISTED_CAPABILITY

    def matches(self, host: str, path: str, method: str) -> bool:
        """Whether a request falls under this rule (the query string is ignored), read strictly
        (`normalize_path`): for tools; requests are admitted by RuleSet.match, which also
        refuses paths that origins may read as another place."""
        return self._matches_normalized(host, normalize_path(path), method)

    def _matches_normalized(self, host: str, path: str, method: str) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self.host is not None and not _host_matches(self.host, host):
            return False
        return self.path.fullmatch(path) is not None


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str
    # Invoices one client IP may make the backend create (None: no limit).
    invoice_limit: RateLimit | None = DEFAULT_INVOICE_LIMIT
    # Peers whose X-Forwarded-For names the client (a load balancer, a CDN); empty: none.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # "unix" in trusted_proxies: a peer without an address (a unix socket) is a trusted proxy.
    trust_unix: bool = False
    # `mode: dry_run` at the top level: every decision is made, logged and counted, and every
    # request is forwarded all the same (X-L402-Dry-Run says what the paywall would have done).
    dry_run: bool = False

    @functools.cached_property
    def vouched_headers(self) -> frozenset[bytes]:
        """Lower-case names of the headers some rule's paid variant sets (paid.set_headers).
        The paywall vouches for them: a client must never send one to the origin itself, or
        `X-Ad-Free: 1` would buy the paid variant for nothing."""
        # As engine.request.vouched_name compares them: lower case, "_" read as "-". Host is
        # never one: every request needs its own (the rules and the door judge it), and a
        # paid variant's Host only renames the other origin it goes to.
        return frozenset(
            name.lower().replace("_", "-").encode()
            for rule in self.rules
            for name in rule.paid.set_headers
            if name.lower() != "host"
        )

    def match(self, host: str, path: str, method: str) -> Rule | None:
        """The first rule covering the request, in file order, or None.

        A path with `%`, `\\`, `;`, a dot segment (or a raw '#', a control or non-printable
        character) is matched in every form origins may route it to (`path_forms`):
        AmbiguousPath when the forms fall under different rules (a free rule counts as none),
        MalformedPath when it is no well-formed path. Any other path, nearly every request,
        has one form (`//` merged): the fast path.
        """
        base = path.partition("?")[0]
        if (
            "%" in base
            or "\\" in base
            or ";" in base
            or "#" in base
            or not base.isprintable()
            or ("/." in base and _DOT_SEGMENT_RE.search(base))
        ):
            return self._match_forms(host, path, method)
        if "//" in base and base.startswith("/"):
            base = _resolved(base.split("/")[1:])
        for rule in self.rules:
            if rule._matches_normalized(host, base, method):
                return rule._judged_as(base)
        return None

    def _first(self, host: str, normalized: str, method: str) -> Rule | None:
        for rule in self.rules:
            if rule._matches_normalized(host, normalized, method):
                # A free path is free in every reading or the readings disagree (400).
                return rule._judged_as(normalized)
        return None

    def _match_forms(self, host: str, path: str, method: str) -> Rule | None:
        forms = _interpretations(path)
        found = {form: self._first(host, form, method) for form in dict.fromkeys(forms)}
        rule = found[forms[0]]
        decisive = _free_or(rule)
        for form, other in found.items():
            if _free_or(other) is not decisive:
                raise AmbiguousPath(
                    f"ambiguous request path: servers may read it as {_describe(forms[0], rule)}"
                    f" or as {_describe(form, other)}; send the plain path (no '.' or '..' "
                    "segments, no encoded '/' or '\\', no ';' parameters, no double encoding)"
                )
        if (
            decisive is not None
            and decisive.paid.rewrite is not None
            and len(found) > 1
            and not _rewrite_agrees(decisive.paid, path, forms)
        ):
            raise AmbiguousPath(
                f"ambiguous request path: the paid variant of service '{decisive.name}' "
                "would depend on how the server reads its encoded '/', '\\' or ';'"
            )
        return rule


def scope_path(rule: Rule) -> str:
    """The directory a rule covers: its glob's literal prefix up to the last '/' ("/episodes/*"
    -> "/episodes/"), the paywall cookie's Path. Regular-expression rules, and anything
    unusual, get "/"."""
    match = _FNMATCH_FORM.fullmatch(rule.path.pattern)
    if match is None:
        return "/"
    body = match["body"]
    literal: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            following = body[i + 1 : i + 2]
            if not following or following.isalnum():
                break  # \d, \w...: a class, not a literal character
            literal.append(following)
            i += 2
            continue
        if char in _REGEX_SPECIAL:
            if char in _QUANTIFIERS and literal:
                literal.pop()  # the quantifier makes the previous character optional
            break
        literal.append(char)
        i += 1
    if _has_alternation(body):
        return "/"  # "re:" text that only looks like a glob: no single prefix covers it
    prefix = "".join(literal)
    cut = prefix[: prefix.rfind("/") + 1]
    if not cut or not PLAIN_PATH.fullmatch(cut):
        return "/"
    return cut


def _has_alternation(body: str) -> bool:
    escaped = False
    for char in body:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            return True
    return False


# A path under a rule's directory for trying out its rewrite (no real request has it).
_PROBE_NAME = "l402-probe"


def rule_warnings(rules: RuleSet) -> list[str]:
    """Mistakes the file allows but a user would not want, one line each (logged at start and
    by `l402proxy rules check`): a paid variant anyone can fetch without paying, or an upgrade
    that upgrades nothing."""
    found: list[str] = []
    for rule in rules.rules:
        if rule.mode == "upgrade" and rule.paid == PaidVariant():
            found.append(
                f"service '{rule.name}' (line {rule.line}) is in upgrade mode but has no "
                "'paid:' variant; "
                "paying clients get the same content as everyone else"
            )
        exposed = _exposed_paid_path(rules, rule)
        if exposed is not None:
            found.append(
                f"service '{rule.name}' (line {rule.line}): its paid variant {exposed} can be "
                "fetched through the proxy without paying; add a service with mode: deny for it"
            )
    return found


def _scheme(text: str) -> str:
    """One scheme name (any case) as SCHEMES spells it; ValueError naming it otherwise."""
    scheme = text.strip().lower()
    if scheme in SCHEMES:
        return scheme
    hint = (
        " (LSAT is L402's older name: l402 offers both)"
        if scheme == "lsat"
        else _suggest(scheme, SCHEMES)
    )
    raise ValueError(f"unknown scheme {_clip(text)!r} (expected l402 or payment){hint}")


def parse_schemes(value: str | Sequence[str]) -> tuple[str, ...]:
    """The paywall's default schemes as an option gives them: "l402", "payment", "l402,payment"
    (commas or spaces between) or a list of names; ValueError with one line otherwise."""
    names = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    if not names:
        raise ValueError("no scheme given: l402, payment or both (l402,payment)")
    found: list[str] = []
    for name in names:
        scheme = _scheme(name)
        if scheme in found:
            raise ValueError(f"scheme {scheme} is given twice")
        found.append(scheme)
    return tuple(found)


def scheme_problem(rule: Rule, schemes: Sequence[str]) -> str | None:
    """Why the rule cannot be sold with `schemes` (its own, or the paywall's default for a rule
    that names none), or None. A Payment charge pays for one request: it cannot stand for what
    only an L402 token carries (a bundle of bytes or units counted on it, a pass, a private
    feed, a bundle of several requests), nor be counted in bytes or units itself."""
    if rule.mode not in PRICED_MODES:
        return None
    shown = "[" + ", ".join(schemes) + "]"
    bundle = rule.bundle
    if "payment" in schemes and bundle is not None and bundle.unit != "requests":
        return (
            f"schemes {shown}: a bundle of {bundle.unit} cannot be sold as a Payment charge "
            f"(a charge pays for one request; the {bundle.unit} one uses are counted on an "
            "L402 token only): sell it with schemes: [l402]"
        )
    if "l402" in schemes:
        return None
    if rule.pass_ is not None:
        sold = f"pass '{rule.pass_.name}'"
    elif rule.feed is not None:
        sold = "private feed (feed:)"
    elif bundle is not None and bundle.size > 1:
        sold = f"bundle of {bundle.size} {bundle.unit}"
    else:
        return None
    return (
        f"schemes {shown}: its {sold} is an L402 token's, and a Payment charge pays for one "
        "request only: add l402 to schemes"
    )


def _exposed_paid_path(rules: RuleSet, rule: Rule) -> str | None:
    """Where the rewrite of a sample path under the rule lands, if no priced or deny rule
    covers that place. Another upstream is another origin: not reachable through this one."""
    if rule.mode not in PRICED_MODES or rule.paid.rewrite is None or rule.paid.upstream:
        return None
    sample = scope_path(rule) + _PROBE_NAME
    if not rule.matches("", sample, "GET"):
        return None  # a regular expression we cannot sample
    target = normalize_path(rule.paid.apply_path(sample))
    if target == sample:
        return None
    covering = [r for r in rules.rules if r.host is None or r.host == rule.host]
    for other in covering:
        if other.path.fullmatch(target) and (other.methods is None or "GET" in other.methods):
            if other.mode in PRICED_MODES or other.mode == "deny":
                return None
            break
    return target.replace(_PROBE_NAME, "...")


@functools.lru_cache(maxsize=4096)
def _rewritten(pattern: re.Pattern[str], replacement: str, base: str) -> str:
    """A paid variant's path for `base` (cached: every paid request of an episode asks again,
    and the substitution is a few microseconds of the hot path)."""
    # count=1: a rewrite moves the path once; it is not a search-and-replace over it.
    rewritten = pattern.sub(replacement, normalize_path(base), count=1)
    if not rewritten.isascii():
        # normalize_path decodes escaped UTF-8 text; on the wire a path is ASCII.
        rewritten = quote(rewritten, safe=_WIRE_SAFE, errors="surrogateescape")
    return rewritten


def normalize_path(path: str) -> str:
    """The path rules are matched on: no query, RFC 3986 normal form, no empty segments.

    The origin decodes `%65` to `e`, resolves `..` and (usually) merges `//`; matching the raw
    text instead would let `/%62onus/x.mp3` or `/free/../bonus/x.mp3` past a `/bonus/*` rule.
    Escapes of reserved characters (`%2F`) keep their meaning and stay encoded. Escaped UTF-8
    text becomes characters (the IRI normal form, RFC 3987 5.3.2.3): browsers send `/café` as
    `/caf%C3%A9`, curl may send the raw bytes, and a `/café/*` rule must cover both.

    This is the strict reading only; `RuleSet.match` also weighs how origins that decode more
    (`%2F`, `\\`, `;`) read a path (see `path_forms`).
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = _PCT_RUN_RE.sub(_unquote_run, path)
    if not path.startswith("/") or ("//" not in path and "/." not in path):
        return path
    return _resolved(path.split("/")[1:])


def _resolved(segments: list[str]) -> str:
    """'/'-joined segments with `.`, `..` and empty ones resolved (RFC 3986 5.2.4, and `//`
    merged as most origins do)."""
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing_slash = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing_slash else "")


def _unquote_run(match: re.Match[str]) -> str:
    """A run of escapes in normal form: unreserved characters and UTF-8 text decoded, anything
    else (reserved characters, controls, bytes that are not UTF-8) kept with upper-case hex."""
    run = match[0]
    if len(run) == 3:  # one escape: by far the most common case
        char = chr(int(run[1:], 16))
        # Upper-case the hex of the escapes we keep so `%2f` and `%2F` match the same rules.
        return char if char in _UNRESERVED else run.upper()
    text = bytes.fromhex(run.replace("%", "")).decode("utf-8", "surrogateescape")
    return "".join(
        char if char in _UNRESERVED or _is_text_char(char) else _escaped(char) for char in text
    )


def _is_text_char(char: str) -> bool:
    # Non-ASCII, not a C1 control, not a byte that failed to decode (surrogateescape).
    code = ord(char)
    return code >= 0xA0 and not 0xD800 <= code <= 0xDFFF


def _escaped(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogateescape"))


# -- how origins read a path: one rule for every reading, or the request is refused ------------


class PathError(ValueError):
    """A request path the proxy refuses to judge (400, never forwarded, no invoice); the message
    is one line for the client."""


class MalformedPath(PathError):
    """Not a well-formed URI path: a broken escape, NUL or another control character, bytes
    that are not UTF-8 (overlong `%C0%AF`, raw Latin-1), a raw '#'."""


class AmbiguousPath(PathError):
    """Origins may route the path to places the rules treat differently."""


# The longest path read in every way origins may read it. Each of the ~36 readings is a pass over
# the path, all on the event loop: a hostile 7 KB path cost 13 ms; at 2 KiB it stays near 4 ms.
# Real paths with escapes or dot segments are far shorter (query strings do not count).
MAX_READ_PATH = 2048
# A '%' that does not start an escape: `%zz`, a trailing `%`.
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# C0 and C1 controls, DEL, and lone surrogates (raw bytes that were not UTF-8).
_BAD_CHAR_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The canonical spelling of a decoded path: RFC 3986 pchar and '/' stay as they are (the '%' of
# escapes does not); other ASCII and C1 are escaped, as normalize_path leaves them; other
# non-ASCII stays text. A translation table: str.translate runs in C.
_PCHAR = frozenset(string.ascii_letters + string.digits + "/-._~!$&'()*+,;=:@")
_CANONICAL = str.maketrans(
    {chr(code): _escaped(chr(code)) for code in range(0xA0) if chr(code) not in _PCHAR}
)
# Printable ASCII: what a rewritten path keeps when its non-ASCII text is escaped for the wire.
_WIRE_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))
# A `.` or `..` segment (the fast path leaves `/.well-known` alone).
_DOT_SEGMENT_RE = re.compile(r"/\.\.?(?:/|$)")
# How dot segments are read: resolved after merging `//` (RFC 3986 plus merging, as nginx and
# Python's http.server do), resolved with empty segments kept (RFC 3986 5.2.4 exactly: `..`
# after `//` only climbs out of the empty segment), or not at all (Werkzeug routes
# `/priced/../free/x` to the `/priced/` handler), or resolved as posixpath.normpath does, with
# a trailing slash only where the path ended in one (Python's http.server serves the file
# `/priced/secret.txt` for `/priced/secret.txt/.`, which the other readings end with a '/').
_DOT_MODES = ("merge", "rfc", "literal", "normpath")
# The readings of a path, aligned: level 0 (escapes decoded as normalize_path decodes them) in
# each dot mode, then levels 1 and 2 (every escape decoded once, twice), each in every
# combination of '\\' kept or made '/', ';params' kept or dropped, and dot mode. The first is
# the strict form, normalize_path's.
_FORM_COUNT = len(_DOT_MODES) * (1 + 2 * 4)


def path_forms(path: str) -> tuple[str, ...]:
    """Where origins may route `path` (the query is ignored): the strict form first, then the
    other distinct forms. Raises MalformedPath for what is not a well-formed URI path.

    Origins read paths differently. Werkzeug (Flask), aiohttp, nginx and Python's http.server
    decode `%2F` and route on the result; Werkzeug routes `..` segments unresolved; Tomcat drops
    `;params` from segments (`/a/..;/b` is `/b`); IIS and WHATWG-style parsers take `\\` for
    `/`; some decode twice (`%252F`). So besides the strict RFC 3986 form (`normalize_path`) a
    path has a form for each combination of: escapes decoded as normalize_path does, all of them
    once or twice; `\\` kept or made `/`; `;params` kept or dropped; dot segments resolved after
    merging `//`, resolved as RFC 3986 says, or left alone. Fully decoded forms are spelled
    canonically (pchar characters as they are, other ASCII escaped, non-ASCII as text) so one
    pattern matches every spelling of the same place.
    """
    return tuple(dict.fromkeys(_interpretations(path)))


def _interpretations(path: str) -> list[str]:
    """path_forms aligned as _FORM_COUNT says (duplicates kept)."""
    base = path.partition("?")[0]
    if len(base) > MAX_READ_PATH:
        # Every reading costs a pass over the path; nginx refuses such request lines anyway.
        raise MalformedPath(
            f"malformed request path: longer than {MAX_READ_PATH} characters "
            "with escapes, '\\', ';' or dot segments"
        )
    if "#" in base:
        raise MalformedPath("malformed request path: a raw '#' (a fragment is never sent)")
    if _BAD_ESCAPE_RE.search(base):
        raise MalformedPath("malformed request path: a '%' that is not followed by two hex digits")
    if _BAD_CHAR_RE.search(base):
        raise MalformedPath(
            "malformed request path: a NUL or control character, or bytes that are not UTF-8"
        )
    once = _decoded(base, "")
    twice = _decoded(once, "double-encoded ") if "%" in once else once
    if not base.startswith("/"):
        return [normalize_path(base)] * _FORM_COUNT  # '*' (OPTIONS) or an odd request target
    strict = _PCT_RUN_RE.sub(_unquote_run, base) if "%" in base else base
    forms = _level_forms(strict, variants=False)
    decoded = _level_forms(once, variants=True)
    return forms + decoded + (decoded if twice == once else _level_forms(twice, variants=True))


def _level_forms(text: str, *, variants: bool) -> list[str]:
    """The forms of one decoding level, aligned: for each ('\\' as '/', ';params' dropped)
    when `variants`, the dot modes. Variants that cannot differ are computed once."""
    choices = (False, True) if variants else (False,)
    made: dict[tuple[bool, bool], list[str]] = {}
    forms: list[str] = []
    for backslash in choices:
        for params in choices:
            key = (backslash and "\\" in text, params and ";" in text)
            if key not in made:
                segments = _segments(text, *key)
                modes = _DOT_MODES if "." in segments or ".." in segments else ("merge",)
                shaped = [_shaped(segments, dots) for dots in modes]
                if variants:
                    # Level 0 keeps its escapes as normalize_path does; decoded text is re-spelled.
                    shaped = [form.translate(_CANONICAL) for form in shaped]
                made[key] = shaped * (len(_DOT_MODES) // len(modes))
            forms += made[key]
    return forms


def _segments(text: str, backslash: bool, params: bool) -> list[str]:
    if backslash:
        text = text.replace("\\", "/")
    segments = text.split("/")[1:]
    if params:
        segments = [segment.split(";", 1)[0] for segment in segments]
    return segments


def _shaped(segments: list[str], dots: str) -> str:
    """The path of `segments` with dot segments read as `dots` says and `//` merged."""
    if dots == "merge":
        return _resolved(segments)
    if dots == "normpath":
        resolved = _resolved(segments)
        if segments[-1] != "" and resolved != "/":
            return resolved.rstrip("/")
        return resolved
    out: list[str] = []
    if dots == "literal":
        out = segments
    else:
        for segment in segments:
            if segment == "..":
                if out:
                    out.pop()
            elif segment != ".":
                out.append(segment)
    kept = [segment for segment in out if segment]
    trailing = bool(kept) and segments[-1] in (("",) if dots == "literal" else ("", ".", ".."))
    return "/" + "/".join(kept) + ("/" if trailing else "")


def _decoded(text: str, what: str) -> str:
    """`text` (checked already) with every valid escape decoded, checked in turn to be UTF-8 text
    without controls."""
    if "%" not in text:
        return text
    try:
        decoded = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPath(
            f"malformed request path: its {what}escapes are not UTF-8 text "
            "(such as the overlong '%C0%AF')"
        ) from None
    if _BAD_CHAR_RE.search(decoded):
        raise MalformedPath(
            f"malformed request path: its {what}escapes decode to a NUL or control character"
        )
    return decoded


def _free_or(rule: Rule | None) -> Rule | None:
    """What decides a request's fate: a free rule forwards it just as no rule does."""
    return None if rule is None or rule.mode == "free" else rule


def _describe(form: str, rule: Rule | None) -> str:
    decisive = _free_or(rule)
    return f"{form} ({'free' if decisive is None else f'service {decisive.name!r}'})"


def _rewrite_agrees(paid: PaidVariant, path: str, forms: list[str]) -> bool:
    """Whether the origin, however it reads the rewritten path, lands where the rewrite of its
    reading of `path` goes. A rewrite that changes the depth (`/a/x` -> `/p/q/x`) would
    otherwise let encoded `..` segments that stayed under the rule climb elsewhere."""
    assert paid.rewrite is not None
    pattern, replacement = paid.rewrite
    try:
        after = _interpretations(paid.apply_path(path))
    except MalformedPath:
        return False
    # Compared resolved: the readings that resolve `..` are the ones that can climb out of the
    # rewritten prefix; one that keeps `..` routes on that prefix, the same for every reading.
    return all(
        normalize_path(after[kind])
        == normalize_path(pattern.sub(replacement, forms[kind], count=1))
        for kind in range(1, len(forms))
    )


def _host_matches(pattern: re.Pattern[str], host: str) -> bool:
    # Clients send Host with or without the port and sometimes with a trailing root dot; a
    # pattern may be written either way, so try the host as sent and the bare host name.
    full = host.strip().lower()
    if pattern.fullmatch(full):
        return True
    bare = full
    if full.startswith("["):
        end = full.find("]")
        if end != -1:
            bare = full[: end + 1]
    elif full.count(":") == 1:
        bare = full.split(":", 1)[0]
    bare = bare.rstrip(".")
    return bare != full and pattern.fullmatch(bare) is not None


def parse_duration(value: str | int) -> int:
    """Seconds from 3600, "3600", "30s", "15m", "12h", "30d" or "1w"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid duration {_show(value)} ({_DURATION_HINT})")
    if isinstance(value, int):
        seconds = value
    else:
        found = _DURATION_RE.fullmatch(value)
        if found is None:
            raise ValueError(f"invalid duration {_show(value)} ({_DURATION_HINT})")
        seconds = int(found[1]) * _DURATION_UNITS[found[2]]
    if seconds <= 0:
        raise ValueError(f"duration must be more than 0 seconds, got {_show(value)}")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from 1000, "1000", "1000B", "500MB", "1.5GB", "10KiB" or "2 MB"; ValueError
    otherwise.

    kB, MB, GB, TB, PB are powers of 1000, KiB, MiB, GiB, TiB, PiB powers of 1024; the unit is
    read ignoring case ('mb' is MB: nobody sizes a bundle in bits). The B is required after a
    prefix: '500M' is 500 MB to some tools and 500 MiB to others (nginx), so it is refused. A
    fraction is fine if the bytes come out whole ('1.5kB'); zero and negative sizes are not.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid size {_show(value)} ({_SIZE_HINT})")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be at least 1 byte, got {value}")
        return value
    found = _SIZE_RE.fullmatch(value) if len(value) <= _MAX_NUMBER_CHARS else None
    if found is None:
        if value.strip().startswith("-"):
            raise ValueError(f"a size must be at least 1 byte, got {_clip(value)!r}")
        raise ValueError(f"invalid size {_clip(value)!r} ({_SIZE_HINT})")
    number, unit = found[1], found[2]
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        if unit.lower() in ("ki", "mi", "gi", "ti", "pi"):
            raise ValueError(f"size {value.strip()!r}: say {number}{unit[0].upper()}iB")
        if unit.lower() in ("k", "m", "g", "t", "p"):
            prefix = unit[0].upper() if unit[0] != "k" else "k"
            raise ValueError(
                f"size {value.strip()!r}: say {number}{prefix}B (powers of 1000) or "
                f"{number}{unit[0].upper()}iB (powers of 1024); a unit without B means either"
            )
        raise ValueError(f"unknown unit {unit!r} in size {_clip(value)!r} ({_SIZE_HINT})")
    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise ValueError(f"size {value.strip()!r} is not a whole number of bytes")
    if size <= 0:
        raise ValueError(f"a size must be at least 1 byte, got {value.strip()!r}")
    return int(size)


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read and parse a rules file (UTF-8); errors name the path as given. `price:` modules
    are looked for next to the file first."""
    source = os.fspath(path)
    shown = _one_line(os.fsdecode(source))
    try:
        with Path(path).open("rb") as file:
            # Bounded: a device or a runaway file must not fill the memory of a running proxy.
            data = file.read(MAX_RULES_BYTES + 1)
    except OSError as exc:
        raise RulesError(
            f"cannot read rules file: {_one_line(exc.strerror or str(exc))}", source=shown
        ) from None
    if len(data) > MAX_RULES_BYTES:
        raise RulesError(
            f"cannot read rules file: larger than {MAX_RULES_BYTES // 1024} KiB", source=shown
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(
            f"cannot read rules file: not UTF-8 ({exc.reason} at byte {exc.start})",
            source=shown,
            line=data.count(b"\n", 0, exc.start) + 1,
        ) from None
    return parse_rules(text, source, directory=os.path.dirname(os.path.abspath(source)))


def parse_rules(
    text: str, source: str = "<rules>", *, directory: str | os.PathLike[str] | None = None
) -> RuleSet:
    """Parse and validate rules from YAML text; raises RulesError naming `source` and the line.

    `price: python:<module>:<function>` references are imported here, with `directory` (the
    rules file's, when load_rules reads one) first on sys.path while importing; without a
    directory, from sys.path as it is.

    Nothing else escapes: a proxy reloading an edited file, or `l402proxy rules check`, must
    get one line to show, never a traceback.
    """
    parser = _Parser(source, None if directory is None else os.fspath(directory))
    try:
        return parser.parse(text)
    except RulesError:
        raise
    except RecursionError:
        raise parser.error(None, "the file is nested too deeply to read") from None
    except Exception as exc:
        # A case the checks above do not know yet: still one line, and the proxy refuses the
        # file (fails closed) instead of crashing.
        raise parser.error(None, f"cannot read the rules ({type(exc).__name__}: {exc})") from exc


# At most this much YAML: 1000 services take ~200 KiB.
MAX_RULES_BYTES = 1024 * 1024
# Collections inside collections: a rules file needs 6 (services > service > match > methods);
# the YAML composer and the merge-key code recurse once per level.
MAX_NESTING = 50
# Values the file amounts to when every alias is expanded: a few thousand for a large file;
# a "billion laughs" file is billions.
MAX_EXPANDED_VALUES = 1_000_000
# The longest number any key needs (price_sat is at most 2.1e15); a longer one would only make
# a message thousands of digits long (or fail Python's int/str conversion limit).
_MAX_NUMBER_CHARS = 30
# A problem message longer than this is cut in the middle (a quoted 1 MiB string, say).
_MAX_PROBLEM_CHARS = 400
# Durations beyond 100 years are typos; 'never' says "no expiry" on purpose.
MAX_DURATION = 100 * 365 * 86400
_INT_TAG = "tag:yaml.org,2002:int"


def _one_line(text: str) -> str:
    """`text` with line breaks, control and format characters and lone surrogates escaped, so
    an error is one printable line (PyYAML resolves "\\n" and "\\ud800" in quoted strings)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _is_text(value: str) -> bool:
    """False for a string with a lone surrogate, which no encoder accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clip(text: str, limit: int = 60) -> str:
    """A long value shortened for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem_line(problem: str) -> str:
    problem = _one_line(problem)
    if len(problem) > _MAX_PROBLEM_CHARS:
        keep = _MAX_PROBLEM_CHARS // 2
        problem = f"{problem[:keep]} ... {problem[-keep:]}"
    return problem


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark | None) -> None:
        super().__init__("nested too deeply")
        self.mark = mark


class _RulesLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops at MAX_NESTING levels instead of recursing until
    Python's stack runs out ("[" * 10000 is a RecursionError otherwise)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _TooDeep(self.peek_event().start_mark)
            return cast(yaml.Node, super().compose_node(parent, index))
        finally:
            self._depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _show(value: object) -> str:
    """A value as the YAML author wrote it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# One import of a price module at a time: sys.path is the whole process's, and the rules are
# loaded on the event loop's thread at start but in a worker thread on reload.
_IMPORT_LOCK = threading.Lock()


class _PriceImportError(Exception):
    """Why a `price:` reference cannot be used (the message goes into a RulesError)."""


def _import_price(module_name: str, attribute: str, directory: str | None) -> Callable[..., Any]:
    """The callable `module_name:attribute` names, imported with `directory` first on sys.path
    (sys.path restored after). A module imported before stays the one used (Python imports a
    module once per process): changed code takes a restart."""
    with _IMPORT_LOCK:
        if directory is not None:
            sys.path.insert(0, directory)
        try:
            # A module written after the process started (`rules check` after an edit, a test)
            # is missed by the finders' cached directory listings otherwise.
            importlib.invalidate_caches()
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:
            looked = f" (looked in {directory} first)" if directory is not None else ""
            raise _PriceImportError(
                f"cannot import module '{module_name}': {type(exc).__name__}: {exc}{looked}"
            ) from None
        finally:
            if directory is not None:
                # Ours is the first equal entry unless the module put an equal one in front:
                # either way one copy goes and sys.path is as it was.
                with contextlib.suppress(ValueError):
                    sys.path.remove(directory)
    _check_not_shadowed(module_name, module, directory)
    target: Any = module
    path = module_name
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            names = [name for name in dir(target) if not name.startswith("_")]
            raise _PriceImportError(
                f"'{path}' has no attribute '{part}'{_suggest(part, names)}"
            ) from None
        except Exception as exc:
            raise _PriceImportError(
                f"reading '{part}' of '{path}' failed: {type(exc).__name__}: {exc}"
            ) from None
        path = f"{path}.{part}" if path != module_name else f"{module_name}:{part}"
    if not callable(target):
        raise _PriceImportError(f"'{path}' is not callable (type {type(target).__name__})")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None  # some builtins have none: their calls are checked when made
    if signature is not None:
        try:
            signature.bind(None)
        except TypeError as exc:
            raise _PriceImportError(
                f"'{path}' cannot be called with one argument (the PriceRequest): {exc}"
            ) from None
    return cast(Callable[..., Any], target)


def _check_not_shadowed(module_name: str, module: Any, directory: str | None) -> None:
    """Refuse a module taken from elsewhere while the rules directory has one of that name
    (a `secrets.py` next to the rules loses to the standard library's, already imported):
    its price function would silently be somebody else's code, or missing."""
    if directory is None:
        return
    top = module_name.split(".", 1)[0]
    ours = [
        os.path.join(directory, f"{top}.py"),
        os.path.join(directory, top, "__init__.py"),
    ]
    ours = [candidate for candidate in ours if os.path.isfile(candidate)]
    if not ours:
        return
    found = getattr(sys.modules.get(top), "__file__", None)
    if found is not None and os.path.realpath(found) == os.path.realpath(ours[0]):
        return
    # A module without a file is built into Python (`time`, `sys`): found before any path.
    origin = "built into Python" if found is None else f"already imported from {found}"
    raise _PriceImportError(
        f"module '{top}' is {origin}, so {ours[0]} next to the rules is not used; rename yours"
    )


class _Parser:
    """One parse: the source name and the service being read, for error messages."""

    def __init__(self, source: str, directory: str | None = None) -> None:
        self.source = source
        # Where `price:` modules are imported from first (the rules file's directory).
        self.directory = directory
        # Pass names seen so far -> (line, service), and each pass's services to look up once
        # every service is known: (service, line, [(name, node)]).
        self.pass_lines: dict[str, tuple[int, str]] = {}
        self.pass_services: list[tuple[str, int, list[tuple[str, yaml.Node]]]] = []
        self.service: str | None = None
        # The line of the service being read: where an unforeseen failure is reported.
        self.line: int | None = None
        self._constructor = yaml.constructor.SafeConstructor()

    # -- errors --------------------------------------------------------------------------------

    def fail(self, node: yaml.Node | None, problem: str) -> NoReturn:
        raise self.error(node, problem)

    def error(
        self,
        where: yaml.Node | yaml.Mark | None,
        problem: str,
        *,
        line: int | None = None,
        in_service: bool = True,
    ) -> RulesError:
        """The one place a RulesError is made: one printable line of bounded length, whatever
        the file holds (keys and values are quoted into messages)."""
        mark = where.start_mark if isinstance(where, yaml.Node) else where
        if line is None:
            line = mark.line + 1 if mark is not None else self.line
        return RulesError(
            _problem_line(problem),
            source=_one_line(os.fsdecode(self.source)),
            line=line,
            service=self.service if in_service else None,
        )

    def _yaml_fail(self, exc: yaml.MarkedYAMLError) -> NoReturn:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        # A syntax error is the file's, not the service's being read.
        raise self.error(mark, f"YAML syntax error: {problem}", in_service=False) from None

    # -- node access ---------------------------------------------------------------------------

    def scalar(self, node: yaml.Node) -> Any:
        """A scalar's Python value; collections come back empty, so messages can name their kind."""
        if isinstance(node, yaml.MappingNode):
            return {}
        if isinstance(node, yaml.SequenceNode):
            return []
        if node.tag == _INT_TAG and len(node.value) > _MAX_NUMBER_CHARS:
            self.fail(node, f"number {_clip(node.value, 24)} is too large")
        try:
            return self._constructor.construct_object(node)
        except yaml.MarkedYAMLError as exc:
            self._yaml_fail(exc)
        except Exception as exc:
            # An explicit tag on a value it does not fit (`!!int abc`, `!!bool maybe`,
            # `!!timestamp soon`): PyYAML raises ValueError, KeyError, AttributeError...
            kind = node.tag.rsplit(":", 1)[-1]
            self.fail(node, f"cannot read {_clip(node.value)!r} as {kind} ({type(exc).__name__})")

    def describe(self, node: yaml.Node) -> str:
        return _show(self.scalar(node))

    def entries(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's keys -> (key node, value node); duplicate keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping, got {self.describe(node)}")
        if node.tag != _MAP_TAG:
            self.fail(node, f"{what}: unsupported YAML tag '{node.tag}'")
        # PyYAML keeps the last of two equal keys without a word; for a paywall that silently
        # drops e.g. the first price, so refuse. Keys brought in by a `<<` merge may be
        # overridden: that is what merges are for.
        first_seen: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, f"{what}: keys must be plain names")
            earlier = first_seen.get(key_node.value)
            if earlier is not None:
                self.fail(
                    key_node,
                    f"duplicate key '{key_node.value}' in {what} "
                    f"(first on line {earlier.start_mark.line + 1})",
                )
            first_seen[key_node.value] = key_node
        try:
            self._constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            self._yaml_fail(exc)
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, f"{what}: keys must be plain names")
            result[key_node.value] = (key_node, value_node)
        return result

    def check_keys(
        self,
        entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
        allowed: Sequence[str],
        where: str,
        elsewhere: Mapping[str, str],
    ) -> None:
        for key, (key_node, _) in entries.items():
            if key in allowed:
                continue
            hint = elsewhere.get(key) or _suggest(key, allowed)
            self.fail(key_node, f"unknown key '{key}'{where}{hint}")

    def items(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} must be a list, got {self.describe(node)}")
        if node.tag != _SEQ_TAG:
            self.fail(node, f"{what}: unsupported YAML tag '{node.tag}'")
        return list(node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float) else ""
            self.fail(node, f"{what} must be a string, got {_show(value)}{hint}")
        return value

    @staticmethod
    def value_node(
        entries: Mapping[str, tuple[yaml.Node, yaml.Node]], key: str
    ) -> yaml.Node | None:
        """The value node of `key`, None when absent or null (null means "not set")."""
        pair = entries.get(key)
        if pair is None or pair[1].tag == _NULL_TAG:
            return None
        return pair[1]

    # -- the file ------------------------------------------------------------------------------

    def parse(self, text: str) -> RuleSet:
        try:
            root = yaml.compose(text, Loader=_RulesLoader)
        except yaml.MarkedYAMLError as exc:
            self._yaml_fail(exc)
        except yaml.reader.ReaderError as exc:
            raise self.error(
                None,
                f"YAML syntax error: character {exc.character!r} is not allowed ({exc.reason})",
                line=text.count("\n", 0, exc.position) + 1,
            ) from None
        except yaml.YAMLError as exc:
            raise self.error(None, f"YAML syntax error: {exc}") from None
        except _TooDeep as exc:
            raise self.error(
                exc.mark, f"collections nested more than {MAX_NESTING} levels deep"
            ) from None
        if root is None:
            raise self.error(
                None, "the rules file is empty: expected a mapping with a 'services' list", line=1
            )
        self.check_graph(root)
        if not isinstance(root, yaml.MappingNode):
            self.fail(
                root,
                f"top level must be a mapping with a 'services' list, got {self.describe(root)}",
            )
        top = self.entries(root, "the top level")
        self.check_keys(
            top,
            _TOP_KEYS,
            " at the top level",
            {k: " (it belongs to a service)" for k in _SERVICE_KEYS},
        )

        version_node = self.value_node(top, "version")
        if version_node is not None:
            version = self.scalar(version_node)
            if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
                self.fail(
                    version_node,
                    f"unsupported version {_show(version)} (this l402proxy reads version 1)",
                )

        services_node = self.value_node(top, "services")
        if services_node is None:
            node = top["services"][1] if "services" in top else root
            self.fail(node, "'services' is missing or empty: list at least one service")
        items = self.items(services_node, "services")
        if not items:
            self.fail(services_node, "'services' is empty: list at least one service")

        invoice_limit: RateLimit | None = DEFAULT_INVOICE_LIMIT
        if "invoice_limit" in top:
            invoice_limit = self.invoice_limit(top["invoice_limit"][1])
        trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        trust_unix = False
        trusted_node = self.value_node(top, "trusted_proxies")
        if trusted_node is not None:
            trusted, trust_unix = self.trusted_proxies(trusted_node)

        dry_run = False
        mode_node = self.value_node(top, "mode")
        if mode_node is not None:
            mode = self.scalar(mode_node)
            if mode not in PAYWALL_MODES:
                self.fail(
                    mode_node,
                    f"mode at the top level must be enforce or dry_run, got {_show(mode)} "
                    "(paywall, upgrade and free are a service's modes)",
                )
            dry_run = mode == "dry_run"

        rules: list[Rule] = []
        lines_by_name: dict[str, int] = {}
        for index, item in enumerate(items, start=1):
            self.service = None
            self.line = item.start_mark.line + 1
            rule = self.service_rule(item, index, lines_by_name)
            lines_by_name[rule.name] = rule.line
            rules.append(rule)
        self.check_pass_services(rules)
        self.service = None
        self.line = None
        return RuleSet(tuple(rules), self.source, invoice_limit, trusted, trust_unix, dry_run)

    # -- limits and free allowances ------------------------------------------------------------

    def count(self, node: yaml.Node, what: str, low: int = 1, high: int = 1_000_000_000) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(node, f"{what} must be a whole number from {low:,} to {high:,}, got "
                      f"{_show(value)}")  # fmt: skip
        return value

    def rate_limit(self, node: yaml.Node, what: str, *, keyed: bool) -> RateLimit:
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                node,
                f"{what} must be a mapping like {{requests: 10, per: 1s, burst: 20"
                f"{', key: ip' if keyed else ''}}}, got {self.describe(node)}",
            )
        entries = self.entries(node, what)
        allowed = _RATE_KEYS if keyed else _RATE_KEYS[:3]
        self.check_keys(entries, allowed, f" in {what}", {})
        for key in ("requests", "per"):
            if self.value_node(entries, key) is None:
                self.fail(node, f"{what} needs '{key}' (e.g. requests: 10, per: 1s)")
        requests = self.count(entries["requests"][1], f"{what}.requests")
        per = self.duration(entries["per"][1], f"{what}.per")
        burst = requests
        burst_node = self.value_node(entries, "burst")
        if burst_node is not None:
            burst = self.count(burst_node, f"{what}.burst")
        key: RateKey = "ip"
        key_node = self.value_node(entries, "key")
        if key_node is not None:
            value = self.scalar(key_node)
            if value not in get_args(RateKey):
                self.fail(key_node, f"{what}.key must be ip or token, got {_show(value)}")
            key = cast(RateKey, value)
        return RateLimit(requests, per, burst, key, line=node.start_mark.line + 1)

    def invoice_limit(self, node: yaml.Node) -> RateLimit | None:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if value is False or value == "off":
            return None
        if node.tag == _NULL_TAG:
            self.fail(node, "invoice_limit is empty: give {requests: N, per: 1m, burst: M} or off")
        return self.rate_limit(node, "invoice_limit", keyed=False)

    def trusted_proxies(
        self, node: yaml.Node
    ) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], bool]:
        items = self.items(node, "trusted_proxies")
        networks = []
        unix = False
        for item in items:
            text = self.string(item, "trusted_proxies")
            if text.strip() == "unix":
                unix = True
                continue
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.fail(
                    item,
                    f"trusted_proxies: {text!r} is not an IP address or network "
                    "(e.g. 10.0.0.0/8, 127.0.0.1, ::1), or unix",
                )
        return tuple(networks), unix

    def free_paths(self, node: yaml.Node) -> tuple[re.Pattern[str], ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(
                node, f"free_paths must be a list of paths or globs, got {self.describe(node)}"
            )
        items = self.items(node, "free_paths")
        if not items:
            self.fail(node, "free_paths is empty (leave it out when nothing is free)")
        return tuple(self.pattern(item, "free_paths") for item in items)

    def rate_limits(self, node: yaml.Node) -> tuple[RateLimit, ...]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(
                node,
                "rate_limits must be a list like [{requests: 10, per: 1s, burst: 20, key: ip}], "
                f"got {self.describe(node)}",
            )
        items = self.items(node, "rate_limits")
        if not items:
            self.fail(node, "rate_limits is empty (leave it out for no limit)")
        return tuple(self.rate_limit(item, "rate_limits", keyed=True) for item in items)

    def freebies(self, node: yaml.Node) -> Freebies:
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                node, f"freebies must be a mapping like {{requests: 3, per: 1d}}, got "
                f"{self.describe(node)}"
            )  # fmt: skip
        entries = self.entries(node, "freebies")
        self.check_keys(entries, _FREEBIE_KEYS, " in freebies", {})
        for key in _FREEBIE_KEYS:
            if self.value_node(entries, key) is None:
                self.fail(node, f"freebies needs '{key}' (e.g. requests: 3, per: 1d)")
        return Freebies(
            self.count(entries["requests"][1], "freebies.requests"),
            self.duration(entries["per"][1], "freebies.per"),
        )

    def check_graph(self, root: yaml.Node) -> None:
        """What the composed document must not be, before anything walks it: an alias that
        contains itself (the merge-key code would recurse forever), aliases that expand to
        more than MAX_EXPANDED_VALUES values or nest more than MAX_NESTING levels ("billion
        laughs"), or a string with a lone surrogate ("\\ud800": not text; it cannot be
        encoded into an invoice memo, a header or a log line).

        Iterative, each node visited once: aliases share their node, so sizes and heights are
        computed once per node, not once per use.
        """
        size: dict[int, int] = {}
        height: dict[int, int] = {}
        on_path: set[int] = set()
        stack: list[tuple[yaml.Node, Iterator[yaml.Node]]] = []

        def enter(node: yaml.Node) -> None:
            if isinstance(node, yaml.ScalarNode):
                if isinstance(node.value, str) and not _is_text(node.value):
                    bad = next(c for c in node.value if 0xD800 <= ord(c) <= 0xDFFF)
                    self.fail(
                        node,
                        f"{_clip(ascii(node.value))} contains {ascii(bad)[1:-1]}, a lone "
                        "surrogate: not a character (write the character itself)",
                    )
                size[id(node)] = height[id(node)] = 1
                return
            on_path.add(id(node))
            stack.append((node, iter(_children(node))))

        enter(root)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(id(node))
                kids = _children(node)
                size[id(node)] = 1 + sum(size[id(kid)] for kid in kids)
                height[id(node)] = 1 + max((height[id(kid)] for kid in kids), default=0)
                if size[id(node)] > MAX_EXPANDED_VALUES:
                    self.fail(
                        node,
                        f"aliases here expand to more than {MAX_EXPANDED_VALUES:,} values",
                    )
                if height[id(node)] > MAX_NESTING:
                    self.fail(node, f"aliases here nest collections more than {MAX_NESTING} deep")
            elif id(child) in on_path:
                self.fail(child, "an alias refers to a collection that contains it")
            elif id(child) not in size:
                enter(child)

    # -- one service ---------------------------------------------------------------------------

    def service_rule(self, item: yaml.Node, index: int, lines_by_name: Mapping[str, int]) -> Rule:
        what = f"service #{index}"
        if not isinstance(item, yaml.MappingNode):
            self.fail(
                item,
                f"{what} must be a mapping (name:, match:, price_sat:, ...), "
                f"got {self.describe(item)}",
            )
        entries = self.entries(item, what)
        line = item.start_mark.line + 1

        name_node = self.value_node(entries, "name")
        if name_node is None:
            self.fail(item, f"{what} has no 'name' (it becomes the services= caveat)")
        name = self.string(name_node, "name")
        if not _NAME_RE.fullmatch(name):
            self.fail(
                name_node,
                f"invalid service name {name!r}: use 1-64 letters, digits, '_' or '-', starting "
                "with a letter or digit (the name goes into caveats like 'services=<name>:0', "
                "where ',', ':', '=' and spaces would break them)",
            )
        if name in lines_by_name:
            self.fail(
                name_node, f"duplicate service name '{name}' (first on line {lines_by_name[name]})"
            )
        self.service = name
        self.check_keys(
            entries,
            _SERVICE_KEYS,
            "",
            {
                **{k: " (it belongs under 'match:')" for k in _MATCH_KEYS},
                **{k: " (it belongs under 'paid:')" for k in _PAID_KEYS},
                **{k: " (it belongs under 'bundle:')" for k in ("bytes", "units", "usage_header")},
            },
        )

        description = name
        description_node = self.value_node(entries, "description")
        if description_node is not None:
            description = self.description(description_node)

        match_node = self.value_node(entries, "match")
        if match_node is None:
            self.fail(item, "missing 'match' (with at least 'path')")
        path, host, methods = self.match(match_node)

        mode_node = self.value_node(entries, "mode")
        mode: Mode = "paywall"
        if mode_node is not None:
            mode = self.mode(mode_node)

        price_node = self.value_node(entries, "price_sat")
        price_sat = 0
        if mode == "deny":
            for key in ("price_sat", "paid", "capabilities", "valid_for", "invoice_expiry"):
                if key in entries:
                    self.fail(
                        entries[key][0],
                        f"'{key}' has no meaning with mode: deny (nothing is sold there)",
                    )
        if mode not in PRICED_MODES:
            for key in _SOLD_KEYS:
                if key in entries:
                    self.fail(
                        entries[key][0],
                        f"'{key}' has no meaning with mode: {mode} (nothing is sold there)",
                    )
        price_ref = None
        ref_node = self.value_node(entries, "price")
        if ref_node is not None and price_node is not None:
            later, earlier = self.later(entries, "price", "price_sat")
            self.fail(
                entries[later][0],
                f"price and price_sat are both set ({earlier} on line "
                f"{entries[earlier][0].start_mark.line + 1}): give price_sat for a fixed price "
                "or price for one computed per request, not both",
            )
        if price_node is not None:
            price_sat = self.price(price_node)
            if price_sat == 0 and mode != "free":
                self.fail(
                    price_node,
                    f"price_sat is 0 but mode is '{mode}': a 0 sat invoice cannot be paid; "
                    "set a price, or use mode: free to let these requests through",
                )
        elif ref_node is not None:
            price_ref = self.price_ref(ref_node)
        elif mode in PRICED_MODES:
            self.fail(
                item,
                f"missing 'price_sat' (price in satoshis; required for mode {mode}) or 'price' "
                "(python:<module>:<function>, a price computed per request)",
            )

        paid = PaidVariant()
        paid_node = self.value_node(entries, "paid")
        if paid_node is not None:
            paid = self.paid(paid_node)
        valid_for: int | None = DEFAULT_VALID_FOR
        if "valid_for" in entries:
            valid_for = self.valid_for(entries["valid_for"][1])

        capabilities = None
        capability_methods: tuple[tuple[str, frozenset[str]], ...] = ()
        capabilities_node = self.value_node(entries, "capabilities")
        if isinstance(capabilities_node, yaml.MappingNode):
            capability_methods = self.capability_methods(capabilities_node)
            capabilities = tuple(name for name, _ in capability_methods)
        elif capabilities_node is not None:
            capabilities = self.capabilities(capabilities_node)

        invoice_expiry = DEFAULT_INVOICE_EXPIRY
        expiry_node = self.value_node(entries, "invoice_expiry")
        if expiry_node is not None:
            invoice_expiry = self.duration(expiry_node, "invoice_expiry")
            if invoice_expiry < MIN_INVOICE_EXPIRY:
                self.fail(
                    expiry_node,
                    f"invoice_expiry must be at least {MIN_INVOICE_EXPIRY} seconds "
                    f"(time for the payer to pay), got {invoice_expiry}",
                )

        free_paths: tuple[re.Pattern[str], ...] = ()
        rate_limits: tuple[RateLimit, ...] = ()
        freebies: Freebies | None = None
        extras = ("free_paths", "rate_limits", "freebies")
        if mode not in PRICED_MODES:
            for key in extras:
                if key in entries:
                    self.fail(
                        entries[key][0],
                        f"'{key}' has no meaning with mode: {mode} (nothing is sold there)",
                    )
        free_node = self.value_node(entries, "free_paths")
        if free_node is not None:
            free_paths = self.free_paths(free_node)
        limits_node = self.value_node(entries, "rate_limits")
        if limits_node is not None:
            rate_limits = self.rate_limits(limits_node)
        freebies_node = self.value_node(entries, "freebies")
        if freebies_node is not None:
            freebies = self.freebies(freebies_node)

        bundle = None
        bundle_node = self.value_node(entries, "bundle")
        if bundle_node is not None:
            bundle = self.bundle(bundle_node)
        single_use = False
        single_node = self.value_node(entries, "single_use")
        if single_node is not None:
            value = self.scalar(single_node)
            if not isinstance(value, bool):
                self.fail(single_node, f"single_use must be true or false, got {_show(value)}")
            single_use = value
        if single_use and bundle is not None:
            later, earlier = self.later(entries, "single_use", "bundle")
            self.fail(
                entries[later][0],
                f"single_use and bundle are both set ({earlier} on line "
                f"{entries[earlier][0].start_mark.line + 1}): single use is a bundle of 1 "
                "request; give one of them",
            )
        if single_use:
            bundle = Bundle("requests", 1, None)
        pass_ = None
        pass_node = self.value_node(entries, "pass")
        if pass_node is not None:
            pass_ = self.pass_spec(pass_node, name, valid_for)
        feed = None
        feed_node = self.value_node(entries, "feed")
        if feed_node is not None:
            feed = self.feed_path(feed_node)
        schemes = None
        schemes_node = self.value_node(entries, "schemes")
        if schemes_node is not None:
            schemes = self.schemes(schemes_node)
        discovery = True
        discovery_node = self.value_node(entries, "discovery")
        if discovery_node is not None:
            value = self.scalar(discovery_node)
            if not isinstance(value, bool):
                self.fail(discovery_node, f"discovery must be true or false, got {_show(value)}")
            discovery = value

        rule = Rule(
            name=name,
            path=path,
            host=host,
            methods=methods,
            price_sat=price_sat,
            mode=mode,
            paid=paid,
            valid_for=valid_for,
            capabilities=capabilities,
            description=description,
            invoice_expiry=invoice_expiry,
            line=line,
            capability_methods=capability_methods,
            free_paths=free_paths,
            rate_limits=rate_limits,
            freebies=freebies,
            price=price_ref,
            bundle=bundle,
            single_use=single_use,
            pass_=pass_,
            feed=feed,
            schemes=schemes,
            discovery=discovery,
        )
        if schemes_node is not None:
            problem = scheme_problem(rule, schemes or ())
            if problem is not None:
                self.fail(schemes_node, problem)
        return rule

    def schemes(self, node: yaml.Node) -> tuple[str, ...]:
        """`schemes: [l402, payment]`: how the service may be paid, in any case, each once."""
        if not isinstance(node, yaml.SequenceNode):
            self.fail(
                node, f"schemes must be a list like [l402, payment], got {self.describe(node)}"
            )
        items = self.items(node, "schemes")
        if not items:
            self.fail(node, "schemes is empty: list l402, payment or both")
        found: list[str] = []
        for item in items:
            try:
                scheme = _scheme(self.string(item, "a scheme"))
            except ValueError as exc:
                self.fail(item, str(exc))
            if scheme in found:
                self.fail(item, f"scheme {scheme} is listed twice")
            found.append(scheme)
        return tuple(found)

    @staticmethod
    def later(
        entries: Mapping[str, tuple[yaml.Node, yaml.Node]], a: str, b: str
    ) -> tuple[str, str]:
        """Of two keys that conflict, (the one further down the file, the other): the error
        names the line where the conflict appears."""
        a_line = entries[a][0].start_mark.line
        b_line = entries[b][0].start_mark.line
        return (a, b) if a_line >= b_line else (b, a)

    # -- what a token buys: dynamic price, bundles, passes -------------------------------------

    def price_ref(self, node: yaml.Node) -> PriceRef:
        value = self.scalar(node)
        if not isinstance(value, str):
            hint = (
                " (a fixed price goes in price_sat)"
                if isinstance(value, int) and not isinstance(value, bool)
                else ""
            )
            self.fail(
                node,
                f"price must be a reference like 'python:mypricing:quote', got {_show(value)}"
                f"{hint}",
            )
        text = value.strip()
        found = _PRICE_REF_RE.fullmatch(text)
        if found is None:
            self.fail(
                node,
                "price must be 'python:<module>:<function>' (e.g. 'python:mypricing:quote'), "
                f"got {_clip(value)!r}",
            )
        try:
            function = _import_price(found["module"], found["attribute"], self.directory)
        except _PriceImportError as exc:
            self.fail(node, f"price {text}: {exc}")
        return PriceRef(
            text,
            function,
            source=_one_line(os.fsdecode(self.source)),
            line=node.start_mark.line + 1,
        )

    def bundle(self, node: yaml.Node) -> Bundle:
        examples = "{requests: 100}, {bytes: 500MB} or {units: 10000, usage_header: X-Usage}"
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"bundle must be a mapping like {examples}, got {self.describe(node)}")
        entries = self.entries(node, "bundle")
        self.check_keys(
            entries,
            _BUNDLE_KEYS,
            " in bundle",
            {k: " (it belongs to the service, not under 'bundle:')" for k in _SERVICE_KEYS},
        )
        given = [key for key in BUNDLE_UNITS if self.value_node(entries, key) is not None]
        if not given:
            self.fail(node, f"bundle needs one of requests, bytes or units: {examples}")
        if len(given) > 1:
            later, earlier = self.later(entries, given[0], given[1])
            self.fail(
                entries[later][0],
                f"bundle has both '{earlier}' and '{later}': a bundle counts one thing",
            )
        unit = cast(BundleUnit, given[0])
        key_node, value_node = entries[unit]
        if unit == "bytes":
            value = self.scalar(value_node)
            try:
                size = parse_size(value)
            except ValueError as exc:
                self.fail(value_node, f"bundle.bytes: {exc}")
            if size > MAX_BUNDLE_SIZE:
                self.fail(
                    value_node, f"bundle.bytes: {size:,} bytes is more than a petabyte (10^15)"
                )
        else:
            size = self.count(value_node, f"bundle.{unit}", 1, MAX_BUNDLE_SIZE)
        usage_header = None
        header_node = self.value_node(entries, "usage_header")
        if unit == "units":
            if header_node is None:
                self.fail(
                    key_node,
                    "bundle.units needs usage_header: the response header in which the origin "
                    "reports the units each request used (e.g. usage_header: X-Usage)",
                )
            usage_header = self.usage_header(header_node)
        elif header_node is not None:
            self.fail(
                entries["usage_header"][0],
                f"bundle.usage_header goes with units only (a bundle of {unit} is counted by "
                "the paywall itself)",
            )
        return Bundle(unit, size, usage_header)

    def usage_header(self, node: yaml.Node) -> str:
        name = self.string(node, "bundle.usage_header")
        if not _TOKEN_RE.fullmatch(name):
            self.fail(node, f"bundle.usage_header: {_clip(name)!r} is not a valid header name")
        lower = name.lower()
        if lower in _FORBIDDEN_HEADERS or lower in _HOP_BY_HOP:
            self.fail(
                node,
                f"bundle.usage_header: {name} frames the message or belongs to one connection; "
                "the origin reports usage in a header of its own, like X-Usage",
            )
        if lower.startswith("x-l402-") or lower == "www-authenticate":
            self.fail(
                node,
                f"bundle.usage_header: {name} is one the paywall writes itself; the origin "
                "reports usage in a header of its own, like X-Usage",
            )
        return name

    def pass_spec(self, node: yaml.Node, service: str, valid_for: int | None) -> PassSpec:
        example = "{name: premium, services: [podcast, articles], valid_for: 30d}"
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"pass must be a mapping like {example}, got {self.describe(node)}")
        entries = self.entries(node, "pass")
        self.check_keys(
            entries,
            _PASS_KEYS,
            " in pass",
            {k: " (it belongs to the service, not under 'pass:')" for k in _SERVICE_KEYS},
        )
        name_node = self.value_node(entries, "name")
        if name_node is None:
            self.fail(node, f"pass needs 'name': {example}")
        name = self.string(name_node, "pass.name")
        if not _NAME_RE.fullmatch(name):
            self.fail(
                name_node,
                f"invalid pass name {_clip(name)!r}: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit (like a service name)",
            )
        if name in self.pass_lines:
            first_line, first_service = self.pass_lines[name]
            self.fail(
                name_node,
                f"duplicate pass name '{name}' (first on line {first_line}, sold by service "
                f"'{first_service}'); one service sells each pass",
            )
        services_node = self.value_node(entries, "services")
        if services_node is None:
            self.fail(node, f"pass needs 'services': {example}")
        items = self.items(services_node, "pass.services")
        if not items:
            self.fail(
                services_node,
                f"pass.services is empty: list the services the pass opens, '{service}' among them",
            )
        listed: list[tuple[str, yaml.Node]] = []
        for item in items:
            listed_name = self.string(item, "pass.services item")
            if any(listed_name == seen for seen, _ in listed):
                self.fail(item, f"pass.services lists '{listed_name}' twice")
            listed.append((listed_name, item))
        if not any(listed_name == service for listed_name, _ in listed):
            self.fail(
                services_node,
                f"pass.services must include this service's own name '{service}' (its 402 "
                "sells the pass)",
            )
        pass_valid_for = valid_for
        if "valid_for" in entries:
            pass_valid_for = self.valid_for(entries["valid_for"][1], "pass.valid_for")
        self.pass_lines[name] = (name_node.start_mark.line + 1, service)
        self.pass_services.append((service, node.start_mark.line + 1, listed))
        return PassSpec(name, tuple(listed_name for listed_name, _ in listed), pass_valid_for)

    def feed_path(self, node: yaml.Node) -> str:
        """`feed: /feed.xml`: the path of the podcast feed this service's buyers get a private
        copy of. A plain path, read the same way by every server (it is compared as written
        with the path under a listener's capability), and never one of the paywall's own."""
        example = "a path like /feed.xml"
        value = self.scalar(node)
        if not isinstance(value, str):
            self.fail(node, f"feed must be {example}, got {_show(value)}")
        if not value.startswith("/"):
            self.fail(node, f"feed must be {example} (starting with '/'), got {_clip(value)!r}")
        if "?" in value or "#" in value:
            self.fail(
                node,
                f"feed {_clip(value)!r} has a query or fragment: give the feed's path alone, "
                f"{example}",
            )
        if len(value) > MAX_READ_PATH or PLAIN_PATH.fullmatch(value) is None or "%" in value:
            self.fail(
                node,
                f"feed {_clip(value)!r} is not a plain path: use letters, digits and "
                "/._~!$&'()*+=:@- (no spaces, percent escapes or ';'), like /feed.xml",
            )
        if normalize_path(value) != value or "//" in value:
            self.fail(
                node,
                f"feed {_clip(value)!r} has '.', '..' or empty segments: give the path as the "
                "origin serves it, like /feed.xml",
            )
        if value == _ENDPOINT_PREFIX.rstrip("/") or value.startswith(_ENDPOINT_PREFIX):
            self.fail(
                node,
                f"feed {_clip(value)!r} is under {_ENDPOINT_PREFIX}, the paywall's own pages; "
                "give the origin's feed path, like /feed.xml",
            )
        return value

    def check_pass_services(self, rules: Sequence[Rule]) -> None:
        """Every service a pass lists exists in the file and sells something (a pass that
        opens a free or denied service opens nothing there)."""
        by_name = {rule.name: rule for rule in rules}
        for service, line, listed in self.pass_services:
            self.service, self.line = service, line
            for listed_name, item in listed:
                other = by_name.get(listed_name)
                if other is None:
                    self.fail(
                        item,
                        f"pass.services: no service named '{_clip(listed_name)}' in this file"
                        + _suggest(listed_name, list(by_name)),
                    )
                if other.mode not in PRICED_MODES:
                    self.fail(
                        item,
                        f"pass.services: service '{listed_name}' (line {other.line}) has mode "
                        f"{other.mode}; a pass opens priced services (paywall or upgrade)",
                    )

    def description(self, node: yaml.Node) -> str:
        text = self.string(node, "description")
        if not text.strip():
            self.fail(node, "description must not be empty (leave it out to use the name)")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            self.fail(node, "description must be one line without control characters")
        if len(text.encode()) > MAX_DESCRIPTION_BYTES:
            self.fail(
                node,
                f"description is {len(text.encode())} bytes; an invoice memo holds at most "
                f"{MAX_DESCRIPTION_BYTES}",
            )
        return text

    def match(
        self, node: yaml.Node
    ) -> tuple[re.Pattern[str], re.Pattern[str] | None, frozenset[str] | None]:
        if isinstance(node, yaml.ScalarNode):
            self.fail(node, f"match must be a mapping with a 'path' key, got {self.describe(node)}")
        entries = self.entries(node, "match")
        self.check_keys(
            entries,
            _MATCH_KEYS,
            " in match",
            {k: " (it belongs to the service, not under 'match:')" for k in _SERVICE_KEYS},
        )
        path_node = self.value_node(entries, "path")
        if path_node is None:
            self.fail(node, "match has no 'path' (a glob like '/episodes/*' or 're:<regex>')")
        path = self.pattern(path_node, "match.path")
        host = None
        host_node = self.value_node(entries, "host")
        if host_node is not None:
            host = self.pattern(host_node, "match.host")
        methods = None
        methods_node = self.value_node(entries, "methods")
        if methods_node is not None:
            methods = self.methods(methods_node)
        return path, host, methods

    def pattern(self, node: yaml.Node, what: str) -> re.Pattern[str]:
        text = self.string(node, what)
        # Host names are case-insensitive; paths are not (most origins serve /A and /a apart).
        flags = re.IGNORECASE if what == "match.host" else 0
        if text.startswith("re:"):
            expression = text[3:]
            if not expression:
                self.fail(node, f"{what}: empty regular expression after 're:'")
            return self.compile(node, what, expression, flags)
        problem = self.glob_problem(text, host=what == "match.host")
        if problem:
            self.fail(node, f"{what}: bad glob {text!r}: {problem}")
        return self.compile(node, what, fnmatch.translate(text), flags, shown=text)

    def compile(
        self, node: yaml.Node, what: str, expression: str, flags: int = 0, shown: str | None = None
    ) -> re.Pattern[str]:
        """re.compile, its every failure a RulesError: re.error, but also OverflowError
        (`a{99999999999}`) and RecursionError (thousands of nested groups)."""
        try:
            return re.compile(expression, flags)
        except re.error as exc:
            reason = str(exc)
        except OverflowError as exc:
            reason = str(exc) or "a number in it is too large"
        except RecursionError:
            reason = "it is nested too deeply"
        except (ValueError, TypeError) as exc:
            reason = str(exc) or type(exc).__name__
        kind = "glob" if shown is not None else "regular expression"
        self.fail(node, f"{what}: invalid {kind} {_clip(shown or expression)!r}: {reason}")

    @staticmethod
    def glob_problem(glob: str, *, host: bool) -> str | None:
        if not glob:
            return "it is empty"
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in glob):
            return "it contains whitespace or control characters"
        if host and "/" in glob:
            return "a host pattern has no '/' (put the path under 'path:')"
        if not host and glob[0] not in "/*":
            return "a path pattern starts with '/' (or '*')"
        # fnmatch quietly turns an unclosed '[' into a literal; that is never what was meant.
        i = 0
        while i < len(glob):
            if glob[i] == "[":
                j = i + 1
                if j < len(glob) and glob[j] == "!":
                    j += 1
                if j < len(glob) and glob[j] == "]":
                    j += 1
                while j < len(glob) and glob[j] != "]":
                    j += 1
                if j >= len(glob):
                    return f"'[' at position {i} is never closed (write '[[]' for a literal '[')"
                i = j
            i += 1
        return None

    def methods(self, node: yaml.Node, what: str = "match.methods") -> frozenset[str]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} must be a list like [GET, HEAD], got {self.describe(node)}")
        items = self.items(node, what)
        if not items:
            if what.startswith("capabilities"):
                self.fail(node, f"{what} is empty (list the methods that need it)")
            self.fail(node, f"{what} is empty (leave it out to match every method)")
        methods: set[str] = set()
        for item in items:
            method = self.string(item, "a method")
            if not _TOKEN_RE.fullmatch(method):
                self.fail(item, f"{what}: {method!r} is not an HTTP method name")
            methods.add(method.upper())
        return frozenset(methods)

    def mode(self, node: yaml.Node) -> Mode:
        value = self.scalar(node)
        if value not in MODES:
            self.fail(
                node,
                f"unknown mode {_show(value)} (expected paywall, upgrade, free or deny)"
                + (_suggest(value, MODES) if isinstance(value, str) else ""),
            )
        return cast(Mode, value)

    def price(self, node: yaml.Node) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(node, f"price_sat must be a whole number >= 0, got {_show(value)}")
        if value > MAX_PRICE_SAT:
            self.fail(node, f"price_sat {value} is more than 21 million bitcoin")
        return value

    def duration(self, node: yaml.Node, what: str, never: str = "") -> int:
        value = self.scalar(node)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(node, f"{what}: {exc}{never}")
        if seconds > MAX_DURATION:
            # Expiry times far past year 9999 break every date conversion (and SQLite's
            # 64-bit integers) downstream.
            self.fail(node, f"{what}: {seconds} seconds is more than 100 years{never}")
        return seconds

    def valid_for(self, node: yaml.Node, what: str = "valid_for") -> int | None:
        value = self.scalar(node)
        if value is None or value == "never":
            return None
        return self.duration(node, what, ", or 'never'")

    def capabilities(self, node: yaml.Node) -> tuple[str, ...]:
        items = self.items(node, "capabilities")
        names: list[str] = []
        for item in items:
            name = self.capability_name(item)
            if name in names:
                self.fail(item, f"duplicate capability '{name}'")
            names.append(name)
        return tuple(names)

    def capability_name(self, node: yaml.Node) -> str:
        name = self.string(node, "a capability")
        if not _NAME_RE.fullmatch(name):
            self.fail(
                node,
                f"invalid capability {name!r}: use 1-64 letters, digits, '_' or '-' "
                "(capabilities are joined with ',' in a caveat)",
            )
        return name

    def capability_methods(self, node: yaml.Node) -> tuple[tuple[str, frozenset[str]], ...]:
        """`capabilities: {read: [GET, HEAD], write: [POST]}`: what each method needs."""
        entries = self.entries(node, "capabilities")
        if not entries:
            self.fail(node, "capabilities is empty (leave it out for tokens without capabilities)")
        needed_by: dict[str, str] = {}
        pairs: list[tuple[str, frozenset[str]]] = []
        for key, (key_node, value_node) in entries.items():
            name = self.capability_name(key_node)
            methods = self.methods(value_node, f"capabilities.{name}")
            for method in sorted(methods):
                if method in needed_by:
                    self.fail(
                        value_node,
                        f"method {method} is listed under both '{needed_by[method]}' and "
                        f"'{key}' in capabilities (a request needs one capability)",
                    )
                needed_by[method] = name
            pairs.append((name, methods))
        return tuple(pairs)

    # -- the paid variant ----------------------------------------------------------------------

    def paid(self, node: yaml.Node) -> PaidVariant:
        entries = self.entries(node, "paid")
        self.check_keys(
            entries,
            _PAID_KEYS,
            " in paid",
            {k: " (it belongs to the service, not under 'paid:')" for k in _SERVICE_KEYS},
        )
        rewrite = None
        rewrite_node = self.value_node(entries, "rewrite_path")
        if rewrite_node is not None:
            rewrite = self.rewrite(rewrite_node)
        upstream = None
        upstream_node = self.value_node(entries, "upstream")
        if upstream_node is not None:
            upstream = self.upstream(upstream_node)
        headers: dict[str, str] = {}
        headers_node = self.value_node(entries, "set_headers")
        if headers_node is not None:
            headers = self.headers(headers_node)
        return PaidVariant(rewrite=rewrite, upstream=upstream, set_headers=headers)

    def rewrite(self, node: yaml.Node) -> tuple[re.Pattern[str], str]:
        shape = (
            'paid.rewrite_path must be a [regex, replacement] pair like ["^/a/(.*)$", "/b/\\\\1"]'
        )
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{shape}, got {self.describe(node)}")
        items = self.items(node, "paid.rewrite_path")
        if len(items) != 2:
            self.fail(node, f"{shape}, got {len(items)} item(s)")
        expression = self.string(items[0], "paid.rewrite_path regex")
        replacement = self.string(items[1], "paid.rewrite_path replacement")
        pattern = self.compile(items[0], "paid.rewrite_path", expression)
        if any(c.isspace() or not c.isprintable() for c in replacement):
            # It goes into the request line: a space or CR/LF there would split the request.
            self.fail(
                items[1],
                f"paid.rewrite_path: replacement {_clip(replacement)!r} contains whitespace or "
                "control characters (write a space as %20)",
            )
        # Substituting into "" parses the template eagerly: a reference to a group that does not
        # exist fails here, at load, instead of on the first paid request.
        try:
            pattern.sub(replacement, "")
        except (re.error, IndexError, OverflowError, ValueError) as exc:
            self.fail(
                items[1], f"paid.rewrite_path: invalid replacement {_clip(replacement)!r}: {exc}"
            )
        if expression.startswith(("^", "\\A")) and not replacement.startswith(("/", "\\")):
            # An anchored pattern replaces the start of the path, so the result must start anew.
            self.fail(
                items[1],
                f"paid.rewrite_path: replacement {replacement!r} must start with '/' "
                "(it replaces the beginning of the path)",
            )
        return pattern, replacement

    def upstream(self, node: yaml.Node) -> str:
        text = self.string(node, "paid.upstream")
        shape = "paid.upstream must be http(s)://host[:port] with no path"
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError as exc:
            self.fail(node, f"{shape}, got {text!r} ({exc})")
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            self.fail(node, f"{shape}, got {text!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text:
            self.fail(node, f"{shape}, got {text!r} (use paid.rewrite_path to change the path)")
        if parts.username is not None or parts.password is not None:
            self.fail(node, f"{shape}, got a URL with credentials (use paid.set_headers)")
        if port == 0:
            self.fail(node, f"{shape}, got port 0")
        host = parts.hostname.lower()
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[a-z0-9_.-]+", host):
                self.fail(node, f"{shape}, got host {host!r}")
        else:
            if address.version == 6:
                host = f"[{address.compressed}]"
        scheme = parts.scheme.lower()
        return f"{scheme}://{host}:{port or (443 if scheme == 'https' else 80)}"

    def headers(self, node: yaml.Node) -> dict[str, str]:
        entries = self.entries(node, "paid.set_headers")
        headers: dict[str, str] = {}
        seen: dict[str, str] = {}
        for name, (key_node, value_node) in entries.items():
            if not _TOKEN_RE.fullmatch(name):
                self.fail(key_node, f"paid.set_headers: {name!r} is not a valid header name")
            if name.lower() in _FORBIDDEN_HEADERS:
                self.fail(
                    key_node,
                    f"paid.set_headers: {name} cannot be set (the proxy manages it per connection)",
                )
            if name.lower() in seen:
                self.fail(
                    key_node,
                    f"paid.set_headers: {name!r} repeats {seen[name.lower()]!r} "
                    "(header names ignore case)",
                )
            seen[name.lower()] = name
            value = self.scalar(value_node)
            if not isinstance(value, str):
                hint = f' (quote it: "{value}")' if isinstance(value, int | float) else ""
                self.fail(
                    value_node,
                    f"paid.set_headers: value of {name} must be a string, got {_show(value)}{hint}",
                )
            if any(c in "\r\n\0" for c in value):
                self.fail(
                    value_node,
                    f"paid.set_headers: value of {name} contains CR, LF or NUL "
                    "(it would split the request)",
                )
            if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
                self.fail(value_node, f"paid.set_headers: value of {name} has control characters")
            headers[name] = value
        return headers
