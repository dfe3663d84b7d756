"""Rules file: YAML -> validated, typed rules; request -> rule matching.

The file is edited by hand and a proxy that refuses to start must say exactly where to look, so
parsing works on PyYAML's node tree (which keeps line numbers) rather than on plain Python
objects, and every `RulesError` names the file and the line.
"""

import difflib
import fnmatch
import ipaddress
import os
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, get_args
from urllib.parse import urlsplit

import yaml

__all__ = [
    "DEFAULT_INVOICE_EXPIRY",
    "DEFAULT_VALID_FOR",
    "MIN_INVOICE_EXPIRY",
    "MODES",
    "PLAIN_PATH",
    "PRICED_MODES",
    "Mode",
    "PaidVariant",
    "Rule",
    "RuleSet",
    "RulesError",
    "load_rules",
    "normalize_path",
    "parse_duration",
    "parse_rules",
    "rule_warnings",
    "scope_path",
]

Mode = Literal["paywall", "upgrade", "free", "deny"]
MODES: tuple[str, ...] = get_args(Mode)

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
# 21 million BTC: anything above is a typo, and a huge price would only fail later in the backend.
MAX_PRICE_SAT = 21_000_000 * 100_000_000
# The BOLT11 description field holds at most 639 bytes (10-bit length of 5-bit groups); keep
# room for what the server puts around the description in the memo (e.g. the service name).
MAX_DESCRIPTION_BYTES = 500

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
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")

_TOP_KEYS = ("version", "services")
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
)
_MATCH_KEYS = ("path", "host", "methods")
_PAID_KEYS = ("rewrite_path", "upstream", "set_headers")

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
        """
        if self.rewrite is None:
            return path
        base, sep, query = path.partition("?")
        pattern, replacement = self.rewrite
        # count=1: a rewrite moves the path once; it is not a search-and-replace over it.
        return pattern.sub(replacement, normalize_path(base), count=1) + sep + query


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

    def capability_for(self, method: str) -> str | None:
        """The capability a request with this method needs from the token, if any."""
        method = method.upper()
        for capability, methods in self.capability_methods:
            if method in methods:
                return capability
        return None

    def matches(self, host: str, path: str, method: str) -> bool:
        """Whether a request falls under this rule (the query string is ignored)."""
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

    def match(self, host: str, path: str, method: str) -> Rule | None:
        """The first rule covering the request, in file order, or None."""
        normalized = normalize_path(path)
        for rule in self.rules:
            if rule._matches_normalized(host, normalized, method):
                return rule
        return None


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


def normalize_path(path: str) -> str:
    """The path rules are matched on: no query, RFC 3986 normal form, no empty segments.

    The origin decodes `%65` to `e`, resolves `..` and (usually) merges `//`; matching the raw
    text instead would let `/%62onus/x.mp3` or `/free/../bonus/x.mp3` past a `/bonus/*` rule.
    Escapes of reserved characters (`%2F`) keep their meaning and stay encoded.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = _PCT_RE.sub(_unquote_unreserved, path)
    if not path.startswith("/") or ("//" not in path and "/." not in path):
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing_slash = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing_slash else "")


def _unquote_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match[1], 16))
    # Upper-case the hex of the escapes we keep so `%2f` and `%2F` match the same rules.
    return char if char in _UNRESERVED else "%" + match[1].upper()


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


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read and parse a rules file (UTF-8); errors name the path as given."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(
            f"cannot read rules file: not UTF-8 ({exc.reason} at byte {exc.start})", source=source
        ) from None
    except OSError as exc:
        raise RulesError(f"cannot read rules file: {exc.strerror or exc}", source=source) from None
    return parse_rules(text, source)


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Parse and validate rules from YAML text; raises RulesError naming `source` and the line."""
    return _Parser(source).parse(text)


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


class _Parser:
    """One parse: the source name and the service being read, for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.service: str | None = None
        self._constructor = yaml.constructor.SafeConstructor()

    # -- errors --------------------------------------------------------------------------------

    def fail(self, node: yaml.Node | None, problem: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None and node.start_mark else None
        raise RulesError(problem, source=self.source, line=line, service=self.service)

    def _yaml_fail(self, exc: yaml.MarkedYAMLError) -> NoReturn:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        line = mark.line + 1 if mark is not None else None
        raise RulesError(f"YAML syntax error: {problem}", source=self.source, line=line) from None

    # -- node access ---------------------------------------------------------------------------

    def scalar(self, node: yaml.Node) -> Any:
        """A scalar's Python value; collections come back empty, so messages can name their kind."""
        if isinstance(node, yaml.MappingNode):
            return {}
        if isinstance(node, yaml.SequenceNode):
            return []
        try:
            return self._constructor.construct_object(node)
        except yaml.MarkedYAMLError as exc:
            self._yaml_fail(exc)

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
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self._yaml_fail(exc)
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            raise RulesError(
                f"YAML syntax error: character {exc.character!r} is not allowed ({exc.reason})",
                source=self.source,
                line=line,
            ) from None
        if root is None:
            raise RulesError(
                "the rules file is empty: expected a mapping with a 'services' list",
                source=self.source,
                line=1,
            )
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

        rules: list[Rule] = []
        lines_by_name: dict[str, int] = {}
        for index, item in enumerate(items, start=1):
            self.service = None
            rule = self.service_rule(item, index, lines_by_name)
            lines_by_name[rule.name] = rule.line
            rules.append(rule)
        self.service = None
        return RuleSet(tuple(rules), self.source)

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
        if price_node is not None:
            price_sat = self.price(price_node)
            if price_sat == 0 and mode != "free":
                self.fail(
                    price_node,
                    f"price_sat is 0 but mode is '{mode}': a 0 sat invoice cannot be paid; "
                    "set a price, or use mode: free to let these requests through",
                )
        elif mode in PRICED_MODES:
            self.fail(item, f"missing 'price_sat' (price in satoshis; required for mode {mode})")

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

        return Rule(
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
            try:
                return re.compile(expression, flags)
            except re.error as exc:
                self.fail(node, f"{what}: invalid regular expression {expression!r}: {exc}")
        problem = self.glob_problem(text, host=what == "match.host")
        if problem:
            self.fail(node, f"{what}: bad glob {text!r}: {problem}")
        return re.compile(fnmatch.translate(text), flags)

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

    def duration(self, node: yaml.Node, what: str) -> int:
        value = self.scalar(node)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(node, f"{what}: {exc}")

    def valid_for(self, node: yaml.Node) -> int | None:
        value = self.scalar(node)
        if value is None or value == "never":
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(node, f"valid_for: {exc}, or 'never'")

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
        try:
            pattern = re.compile(expression)
        except re.error as exc:
            self.fail(
                items[0], f"paid.rewrite_path: invalid regular expression {expression!r}: {exc}"
            )
        # Substituting into "" parses the template eagerly: a reference to a group that does not
        # exist fails here, at load, instead of on the first paid request.
        try:
            pattern.sub(replacement, "")
        except (re.error, IndexError) as exc:
            self.fail(items[1], f"paid.rewrite_path: invalid replacement {replacement!r}: {exc}")
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
