"""Rules file parsing, validation (every error with file and line) and request matching."""

import textwrap
from pathlib import Path

import pytest

from l402proxy.l402.token import UNLISTED_CAPABILITY
from l402proxy.rules import (
    DEFAULT_INVOICE_EXPIRY,
    DEFAULT_VALID_FOR,
    PaidVariant,
    Rule,
    RulesError,
    RuleSet,
    load_rules,
    normalize_path,
    parse_duration,
    parse_rules,
    rule_warnings,
)

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


def yaml_text(text: str) -> str:
    """Dedented YAML whose first line is line 1."""
    return textwrap.dedent(text).lstrip("\n")


def parse(text: str) -> RuleSet:
    return parse_rules(yaml_text(text), "rules/test.yaml")


def error(text: str) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse(text)
    return info.value


def one(text: str) -> Rule:
    rules = parse(text).rules
    assert len(rules) == 1
    return rules[0]


MINIMAL = """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
"""


# ---- example files ----------------------------------------------------------------------------


def test_podcast_example() -> None:
    ruleset = load_rules(RULES_DIR / "podcast.yaml")
    assert ruleset.source == str(RULES_DIR / "podcast.yaml")
    podcast, bonus, adfree = ruleset.rules
    # The paid files are not reachable without paying; nothing to warn about.
    assert (adfree.name, adfree.mode, adfree.price_sat) == ("adfree", "deny", 0)
    assert ruleset.match("h", "/adfree/ep1.wav", "GET") is adfree
    assert rule_warnings(ruleset) == []

    assert podcast.name == "podcast"
    assert podcast.description == "Ad-free episode"
    assert podcast.mode == "upgrade"
    assert podcast.price_sat == 21
    assert podcast.valid_for == 30 * 86400
    assert podcast.invoice_expiry == 600
    assert podcast.host is None and podcast.methods is None and podcast.capabilities is None
    assert podcast.paid.rewrite is not None
    pattern, replacement = podcast.paid.rewrite
    assert (pattern.pattern, replacement) == ("^/episodes/(.*)$", "/adfree/\\1")
    assert podcast.paid.upstream is None and dict(podcast.paid.set_headers) == {}
    assert podcast.paid.apply_path("/episodes/ep1.mp3?t=3") == "/adfree/ep1.mp3?t=3"

    assert bonus.name == "bonus"
    assert (bonus.mode, bonus.price_sat, bonus.valid_for) == ("paywall", 100, 7 * 86400)
    assert bonus.paid == PaidVariant()

    assert ruleset.match("pod.example", "/episodes/ep1.mp3", "GET") is podcast
    assert ruleset.match("pod.example", "/bonus/extra.mp3", "GET") is bonus
    for free_path in ("/", "/feed.xml"):
        assert ruleset.match("pod.example", free_path, "GET") is None
    # Rule.line points at the service, so later tools can cite it.
    lines = (RULES_DIR / "podcast.yaml").read_text().splitlines()
    assert lines[podcast.line - 1].strip() == "name: podcast"
    assert lines[bonus.line - 1].strip() == "name: bonus"


def test_api_example() -> None:
    ruleset = load_rules(str(RULES_DIR / "api.yaml"))
    health, quotes, premium = ruleset.rules

    assert (health.name, health.mode, health.price_sat) == ("health", "free", 0)
    assert (quotes.name, quotes.mode, quotes.price_sat) == ("quotes", "paywall", 5)
    assert quotes.valid_for == 3600
    assert quotes.methods == frozenset({"GET", "HEAD"})
    assert (premium.name, premium.mode, premium.price_sat) == ("premium", "paywall", 50)
    assert premium.capabilities == ("read", "write")
    assert premium.capability_for("get") == "read" and premium.capability_for("DELETE") == "write"
    # A method no capability lists is refused to restricted tokens (see test_limits.py).
    assert premium.capability_for("OPTIONS") == UNLISTED_CAPABILITY
    assert dict(premium.paid.set_headers) == {"X-L402-Tier": "premium"}
    assert premium.paid.rewrite is None and premium.paid.upstream is None

    assert ruleset.match("api", "/api/health", "GET") is health
    assert ruleset.match("api", "/api/quotes", "GET") is quotes
    assert ruleset.match("api", "/api/quotes/BTC?currency=EUR", "get") is quotes
    assert ruleset.match("api", "/api/quotes", "POST") is None
    assert ruleset.match("api", "/api/premium/orders", "POST") is premium
    assert ruleset.match("api", "/api/premium", "GET") is None


@pytest.mark.parametrize("name", ["podcast.yaml", "api.yaml"])
def test_example_files_comment_every_key(name: str) -> None:
    # A reference file: every key line has a comment on it or right above it.
    lines = (RULES_DIR / name).read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip().removeprefix("- ")
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        above = lines[number - 1].strip() if number else ""
        assert "#" in line or above.startswith(("#", "- #")), f"{name}:{number + 1}: {line}"


# ---- defaults and values ----------------------------------------------------------------------


def test_defaults() -> None:
    rule = one(MINIMAL)
    assert rule.name == "podcast"
    assert rule.description == "podcast"
    assert rule.mode == "paywall"
    assert rule.valid_for == DEFAULT_VALID_FOR == 3600
    assert rule.invoice_expiry == DEFAULT_INVOICE_EXPIRY == 600
    assert rule.host is None and rule.methods is None and rule.capabilities is None
    assert rule.paid == PaidVariant(rewrite=None, upstream=None, set_headers={})
    assert rule.line == 2
    assert parse(MINIMAL).source == "rules/test.yaml"


def test_all_keys() -> None:
    rule = one(
        """
        version: 1
        services:
          - name: full_service-1
            description: "Everything — set"
            match:
              path: "re:/a/[0-9]+"
              host: "*.Example.com"
              methods: [get, Post]
            price_sat: 7
            mode: upgrade
            paid:
              rewrite_path: ['^/a/(?P<n>\\d+)$', '/b/\\g<n>']
              upstream: HTTPS://Adfree.Example:8443/
              set_headers: {X-Ad-Free: "1", Authorization: "Bearer origin-key"}
            valid_for: never
            capabilities: []
            invoice_expiry: 2m
        """
    )
    assert rule.name == "full_service-1"
    assert rule.description == "Everything — set"
    assert rule.methods == frozenset({"GET", "POST"})
    assert rule.mode == "upgrade"
    assert rule.valid_for is None
    assert rule.capabilities == ()
    assert rule.invoice_expiry == 120
    assert rule.paid.upstream == "https://adfree.example:8443"
    assert dict(rule.paid.set_headers) == {"X-Ad-Free": "1", "Authorization": "Bearer origin-key"}
    assert rule.paid.apply_path("/a/42") == "/b/42"
    assert rule.line == 3


@pytest.mark.parametrize(
    ("upstream", "normalised"),
    [
        ("http://origin", "http://origin:80"),
        ("https://origin", "https://origin:443"),
        ("http://origin:8081", "http://origin:8081"),
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("HTTP://ORIGIN.example", "http://origin.example:80"),
    ],
)
def test_upstream_normalised(upstream: str, normalised: str) -> None:
    rule = one(MINIMAL + f"    paid: {{upstream: '{upstream}'}}\n")
    assert rule.paid.upstream == normalised


def test_valid_for_null_means_never() -> None:
    assert one(MINIMAL + "    valid_for:\n").valid_for is None
    assert one(MINIMAL + "    valid_for: ~\n").valid_for is None
    assert one(MINIMAL + "    valid_for: 90\n").valid_for == 90
    assert one(MINIMAL + "    valid_for: '12h'\n").valid_for == 43200


def test_upgrade_without_paid_is_allowed() -> None:
    # DESIGN.md: omitting `paid` means "the same URL, unlocked", in every mode.
    rule = one(MINIMAL + "    mode: upgrade\n")
    assert (rule.mode, rule.paid) == ("upgrade", PaidVariant())


def test_free_mode_needs_no_price() -> None:
    rule = one(
        """
        services:
          - name: health
            match: {path: /health}
            mode: free
        """
    )
    assert (rule.mode, rule.price_sat) == ("free", 0)


def test_merge_keys_are_supported() -> None:
    ruleset = parse(
        """
        services:
          - &base
            name: a
            match: {path: "/a/*"}
            price_sat: 5
          - <<: *base
            name: b
            match: {path: "/b/*"}
        """
    )
    a, b = ruleset.rules
    assert (a.name, b.name, b.price_sat) == ("a", "b", 5)
    assert b.matches("h", "/b/x", "GET") and not b.matches("h", "/a/x", "GET")


def test_rules_are_frozen_and_hashable() -> None:
    rule = one(MINIMAL + "    paid: {set_headers: {X-A: b}}\n")
    with pytest.raises(AttributeError):
        rule.price_sat = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        rule.paid.set_headers["X-A"] = "c"  # type: ignore[index]
    assert hash(rule) == hash(one(MINIMAL + "    paid: {set_headers: {X-A: b}}\n"))
    assert PaidVariant(set_headers={"X": "1"}) == PaidVariant(set_headers={"X": "1"})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (3600, 3600),
        ("3600", 3600),
        ("30s", 30),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 2592000),
        ("1w", 604800),
        (" 2 h ", 7200),
    ],
)
def test_parse_duration(value: str | int, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", [0, -1, "0", "0s", "-5m", "1y", "1.5h", "h", "", "1 hour", "3H", True, 1.5, None, "٣"]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


# ---- matching ---------------------------------------------------------------------------------


def rule_for(match: str) -> Rule:
    return one(
        f"""
        services:
          - name: r
            match: {match}
            price_sat: 1
        """
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/episodes/a.mp3", True),
        ("/episodes/deep/er/a.mp3", True),  # '*' crosses '/'
        ("/episodes/", True),
        ("/episodes/a.mp3?x=1&y=/2", True),  # query ignored
        ("/Episodes/a.mp3", False),  # case-sensitive
        ("/episodes", False),
        ("/x/episodes/a.mp3", False),  # whole path
        ("/%65pisodes/a.mp3", True),  # percent-encoded unreserved characters
        ("/free/../episodes/a.mp3", True),  # dot segments
        ("//episodes//a.mp3", True),
    ],
)
def test_glob_path(path: str, expected: bool) -> None:
    assert rule_for('{path: "/episodes/*"}').matches("host", path, "GET") is expected


def test_glob_question_mark_and_class() -> None:
    rule = rule_for('{path: "/ep?/[0-9].mp3"}')
    assert rule.matches("h", "/ep1/7.mp3", "GET")
    assert not rule.matches("h", "/ep12/7.mp3", "GET")
    assert not rule.matches("h", "/ep1/x.mp3", "GET")
    # A pattern without wildcards is an exact path.
    exact = rule_for("{path: /feed.xml}")
    assert exact.matches("h", "/feed.xml?fresh=1", "GET")
    assert not exact.matches("h", "/feed.xml.bak", "GET")


def test_regex_path_is_full_match() -> None:
    rule = rule_for('{path: "re:/api/v[12]/items/\\\\d+"}')
    assert rule.matches("h", "/api/v1/items/42", "GET")
    assert rule.matches("h", "/api/v2/items/7?q=1", "GET")
    assert not rule.matches("h", "/api/v1/items/42/extra", "GET")
    assert not rule.matches("h", "/prefix/api/v1/items/42", "GET")


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.example.com", "cdn.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "CDN.Example.COM", True),  # case-insensitive
        ("*.example.com", "cdn.example.com:8443", True),  # port ignored unless written
        ("*.example.com", "cdn.example.com.", True),  # trailing root dot
        ("*.example.com", "cdn.example.com.evil", False),
        ("localhost:8080", "localhost:8080", True),
        ("localhost:8080", "localhost:9090", False),
        ("re:(www\\\\.)?example\\\\.org", "example.org", True),
        ("re:(www\\\\.)?example\\\\.org", "WWW.example.org", True),
        ("re:(www\\\\.)?example\\\\.org", "mail.example.org", False),
        ("re:\\\\[::1\\\\]", "[::1]:8080", True),
        ("re:\\\\[::1\\\\]", "[::2]:8080", False),
    ],
)
def test_host(pattern: str, host: str, expected: bool) -> None:
    rule = rule_for(f'{{path: "/*", host: "{pattern}"}}')
    assert rule.matches(host, "/x", "GET") is expected


def test_methods() -> None:
    rule = rule_for('{path: "/*", methods: [get, HEAD]}')
    assert rule.methods == frozenset({"GET", "HEAD"})
    assert rule.matches("h", "/x", "GET")
    assert rule.matches("h", "/x", "head")
    assert not rule.matches("h", "/x", "POST")
    assert rule_for('{path: "/*"}').matches("h", "/x", "DELETE")


def test_first_match_wins() -> None:
    ruleset = parse(
        """
        services:
          - name: narrow
            match: {path: "/api/special", methods: [GET]}
            mode: free
          - name: broad
            match: {path: "/api/*"}
            price_sat: 5
          - name: broader
            match: {path: "/*"}
            price_sat: 1
        """
    )
    assert ruleset.match("h", "/api/special", "GET").name == "narrow"  # type: ignore[union-attr]
    assert ruleset.match("h", "/api/special", "POST").name == "broad"  # type: ignore[union-attr]
    assert ruleset.match("h", "/api/other?x", "GET").name == "broad"  # type: ignore[union-attr]
    assert ruleset.match("h", "/index.html", "GET").name == "broader"  # type: ignore[union-attr]


def test_no_match() -> None:
    ruleset = parse(MINIMAL)
    assert ruleset.match("h", "/feed.xml", "GET") is None
    assert ruleset.match("h", "/episodes/a.mp3", "GET") is ruleset.rules[0]


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/a/b", "/a/b"),
        ("/a/b?x=1", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/../../a", "/a"),
        ("/a/b/..", "/a/"),
        ("/a//b///", "/a/b/"),
        ("/", "/"),
        ("/%7Euser/%41%2f", "/~user/A%2F"),  # reserved escapes kept (and upper-cased)
        ("/a%2E%2E/x", "/a../x"),
        ("/%2e%2e/x", "/x"),
        ("*", "*"),
    ],
)
def test_normalize_path(raw: str, normalised: str) -> None:
    assert normalize_path(raw) == normalised


def test_rewrite_uses_normalised_path() -> None:
    rule = one(
        MINIMAL
        + '    mode: upgrade\n    paid: {rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]}\n'
    )
    assert rule.paid.apply_path("/episodes/a.mp3") == "/adfree/a.mp3"
    assert rule.paid.apply_path("/episodes/./a.mp3?x=/episodes/") == "/adfree/a.mp3?x=/episodes/"
    assert PaidVariant().apply_path("/episodes//a.mp3?q") == "/episodes//a.mp3?q"
    # One substitution: a rewrite moves the path, it does not search and replace through it.
    once = one(MINIMAL + '    paid: {rewrite_path: ["mp3", "m4a"]}\n')
    assert once.paid.apply_path("/episodes/mp3/a.mp3") == "/episodes/m4a/a.mp3"


# ---- errors: every one names file and line ----------------------------------------------------


ERRORS = [
    pytest.param(
        """
        services:
          - name: a
            match: {path: "/a"
            price_sat: 1
        """,
        4,
        "YAML syntax error: ",
        id="yaml-syntax",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            rewrite: "/b/\\1"
        """,
        5,
        "YAML syntax error: ",
        id="yaml-bad-escape",
    ),
    pytest.param("services: []\n---\nservices: []\n", 2, "YAML syntax error: ", id="two-docs"),
    pytest.param("a: 1\nb: \x07\n", 2, "YAML syntax error: character", id="control-char"),
    pytest.param("", 1, "the rules file is empty", id="empty"),
    pytest.param("# only a comment\n", 1, "the rules file is empty", id="only-comment"),
    pytest.param(
        "# rules\n- name: a\n",
        2,
        "top level must be a mapping with a 'services' list, got a list",
        id="top-list",
    ),
    pytest.param("just text\n", 1, "top level must be a mapping", id="top-scalar"),
    pytest.param(
        "version: 1\nservice:\n  - name: a\n",
        2,
        "unknown key 'service' at the top level (did you mean 'services'?)",
        id="unknown-top-key",
    ),
    pytest.param(
        "price_sat: 1\nservices: []\n",
        1,
        "unknown key 'price_sat' at the top level (it belongs to a service)",
        id="service-key-at-top",
    ),
    pytest.param(
        "version: 2\nservices: []\n",
        1,
        "unsupported version 2 (this l402proxy reads version 1)",
        id="version",
    ),
    pytest.param("version: 1\n", 1, "'services' is missing or empty", id="services-missing"),
    pytest.param(
        "version: 1\nservices:\n", 2, "'services' is missing or empty", id="services-null"
    ),
    pytest.param("# a\n# b\nservices: []\n", 3, "'services' is empty", id="services-empty"),
    pytest.param(
        "services:\n  name: a\n", 2, "services must be a list, got a mapping", id="services-map"
    ),
    pytest.param(
        "services:\n  - /episodes/*\n",
        2,
        "service #1 must be a mapping (name:, match:, price_sat:, ...), got '/episodes/*'",
        id="service-not-mapping",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            price_sat: 2
        """,
        5,
        "duplicate key 'price_sat' in service #1 (first on line 4)",
        id="duplicate-key",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a, path: /b}
            price_sat: 1
        """,
        3,
        "duplicate key 'path' in match (first on line 3)",
        id="duplicate-key-flow",
    ),
    pytest.param(
        "services: []\nservices: []\n",
        2,
        "duplicate key 'services' in the top level (first on line 1)",
        id="duplicate-top-key",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            prise_sat: 1
        """,
        4,
        "service 'a': unknown key 'prise_sat' (did you mean 'price_sat'?)",
        id="unknown-service-key",
    ),
    pytest.param(
        """
        services:
          - name: a
            path: /a
            price_sat: 1
        """,
        3,
        "service 'a': unknown key 'path' (it belongs under 'match:')",
        id="match-key-in-service",
    ),
    pytest.param(
        """
        services:
          - name: a
            match:
              path: /a
              method: [GET]
            price_sat: 1
        """,
        5,
        "service 'a': unknown key 'method' in match (did you mean 'methods'?)",
        id="unknown-match-key",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              rewrite: ["^/a$", "/b"]
        """,
        6,
        "service 'a': unknown key 'rewrite' in paid (did you mean 'rewrite_path'?)",
        id="unknown-paid-key",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              valid_for: 1h
        """,
        6,
        "unknown key 'valid_for' in paid (it belongs to the service, not under 'paid:')",
        id="service-key-in-paid",
    ),
    pytest.param(
        """
        services:
          - match: {path: /a}
            price_sat: 1
        """,
        2,
        "service #1 has no 'name'",
        id="missing-name",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1

          - name: a
            match: {path: /b}
            price_sat: 1
        """,
        6,
        "duplicate service name 'a' (first on line 2)",
        id="duplicate-name",
    ),
    pytest.param(
        """
        services:
          - name: "pod cast"
            match: {path: /a}
            price_sat: 1
        """,
        2,
        "invalid service name 'pod cast': use 1-64 letters",
        id="name-space",
    ),
    pytest.param(
        "services:\n  - name: 'a,b'\n    match: {path: /a}\n    price_sat: 1\n",
        2,
        "invalid service name 'a,b'",
        id="name-comma",
    ),
    pytest.param(
        "services:\n  - name: 'a:b'\n    match: {path: /a}\n    price_sat: 1\n",
        2,
        "invalid service name 'a:b'",
        id="name-colon",
    ),
    pytest.param(
        "services:\n  - name: 'a=b'\n    match: {path: /a}\n    price_sat: 1\n",
        2,
        "invalid service name 'a=b'",
        id="name-equals",
    ),
    pytest.param(
        "services:\n  - name: _a\n    match: {path: /a}\n    price_sat: 1\n",
        2,
        "invalid service name '_a'",
        id="name-leading-underscore",
    ),
    pytest.param(
        "services:\n  - name: " + "a" * 65 + "\n    match: {path: /a}\n    price_sat: 1\n",
        2,
        "invalid service name",
        id="name-too-long",
    ),
    pytest.param(
        'services:\n  - name: "a\\n"\n    match: {path: /a}\n    price_sat: 1\n',
        2,
        "invalid service name 'a\\n'",
        id="name-trailing-newline",
    ),
    pytest.param(
        "services:\n  - name: 42\n    match: {path: /a}\n    price_sat: 1\n",
        2,
        "name must be a string, got 42 (quote it)",
        id="name-number",
    ),
    pytest.param(
        """
        services:
          - name: a
            price_sat: 1
        """,
        2,
        "service 'a': missing 'match' (with at least 'path')",
        id="missing-match",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: "/a/*"
            price_sat: 1
        """,
        3,
        "match must be a mapping with a 'path' key, got '/a/*'",
        id="match-not-mapping",
    ),
    pytest.param(
        """
        services:
          - name: a
            match:
              host: example.com
            price_sat: 1
        """,
        4,
        "service 'a': match has no 'path'",
        id="missing-path",
    ),
    pytest.param(
        """
        services:
          - name: a
            match:
              path: "re:/a/(unclosed"
            price_sat: 1
        """,
        4,
        "service 'a': match.path: invalid regular expression '/a/(unclosed': "
        "missing ), unterminated subpattern",
        id="bad-path-regex",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: 're:'}\n    price_sat: 1\n",
        3,
        "match.path: empty regular expression",
        id="empty-regex",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: '/a/[0-9'}\n    price_sat: 1\n",
        3,
        "match.path: bad glob '/a/[0-9': '[' at position 3 is never closed",
        id="glob-unclosed-bracket",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: 'episodes/*'}\n    price_sat: 1\n",
        3,
        "match.path: bad glob 'episodes/*': a path pattern starts with '/'",
        id="glob-relative",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: '/a b'}\n    price_sat: 1\n",
        3,
        "match.path: bad glob '/a b': it contains whitespace",
        id="glob-space",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: ''}\n    price_sat: 1\n",
        3,
        "match.path: bad glob '': it is empty",
        id="glob-empty",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a, host: 'example.com/a'}\n    price_sat: 1\n",
        3,
        "match.host: bad glob 'example.com/a': a host pattern has no '/'",
        id="host-with-path",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a, host: 're:*.com'}\n    price_sat: 1\n",
        3,
        "match.host: invalid regular expression '*.com': nothing to repeat",
        id="bad-host-regex",
    ),
    pytest.param(
        "services:\n  - name: a\n    match:\n      path: /a\n      methods: GET\n"
        "    price_sat: 1\n",
        5,
        "match.methods must be a list like [GET, HEAD], got 'GET'",
        id="methods-not-list",
    ),
    pytest.param(
        "services:\n  - name: a\n    match:\n      path: /a\n      methods: []\n    price_sat: 1\n",
        5,
        "match.methods is empty",
        id="methods-empty",
    ),
    pytest.param(
        "services:\n  - name: a\n    match:\n      path: /a\n      methods:\n        - GET\n"
        "        - 'GE T'\n    price_sat: 1\n",
        7,
        "match.methods: 'GE T' is not an HTTP method name",
        id="methods-bad-name",
    ),
    pytest.param(
        "services:\n  - name: a\n    match:\n      path: /a\n      methods: [1]\n"
        "    price_sat: 1\n",
        5,
        "a method must be a string, got 1",
        id="methods-number",
    ),
    pytest.param(
        """
        services:
          - name: podcast
            match: {path: /a}

            price_sat: -5
        """,
        5,
        "service 'podcast': price_sat must be a whole number >= 0, got -5",
        id="price-negative",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1.5\n",
        4,
        "price_sat must be a whole number >= 0, got 1.5",
        id="price-float",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: '21'\n",
        4,
        "price_sat must be a whole number >= 0, got '21'",
        id="price-string",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: true\n",
        4,
        "price_sat must be a whole number >= 0, got true",
        id="price-bool",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: [1]\n",
        4,
        "price_sat must be a whole number >= 0, got a list",
        id="price-list",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 2100000000000000001\n",
        4,
        "more than 21 million bitcoin",
        id="price-huge",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 0\n",
        4,
        "service 'a': price_sat is 0 but mode is 'paywall': a 0 sat invoice cannot be paid",
        id="price-zero-paywall",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    mode: upgrade\n    price_sat: 0\n"
        "    paid: {upstream: 'http://b'}\n",
        5,
        "price_sat is 0 but mode is 'upgrade'",
        id="price-zero-upgrade",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n",
        2,
        "service 'a': missing 'price_sat' (price in satoshis; required for mode paywall)",
        id="price-missing",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    mode: payall\n",
        5,
        "unknown mode 'payall' (expected paywall, upgrade, free or deny) (did you mean 'paywall'?)",
        id="mode-unknown",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    valid_for: 1y\n",
        5,
        "valid_for: invalid duration '1y' (use seconds or a number with s, m, h, d or w",
        id="duration-unit",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    valid_for: 0\n",
        5,
        "valid_for: duration must be more than 0 seconds, got 0",
        id="duration-zero",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    valid_for: -60\n",
        5,
        "valid_for: duration must be more than 0 seconds, got -60",
        id="duration-negative",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    valid_for: yes\n",
        5,
        "valid_for: invalid duration true",
        id="duration-bool",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    invoice_expiry: 30\n",
        5,
        "invoice_expiry must be at least 60 seconds (time for the payer to pay), got 30",
        id="invoice-expiry-short",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    invoice_expiry: never\n",
        5,
        "invoice_expiry: invalid duration 'never'",
        id="invoice-expiry-never",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              upstream: http://origin:8081/adfree
        """,
        6,
        "paid.upstream must be http(s)://host[:port] with no path, got "
        "'http://origin:8081/adfree' (use paid.rewrite_path to change the path)",
        id="upstream-path",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid: {upstream: 'ftp://origin'}\n",
        5,
        "paid.upstream must be http(s)://host[:port] with no path, got 'ftp://origin'",
        id="upstream-scheme",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid: {upstream: 'origin:8081'}\n",
        5,
        "paid.upstream must be http(s)://host[:port]",
        id="upstream-no-scheme",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid: {upstream: 'http://origin:99999'}\n",
        5,
        "paid.upstream must be http(s)://host[:port] with no path, got 'http://origin:99999' (",
        id="upstream-port-range",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid: {upstream: 'http://origin?x=1'}\n",
        5,
        "with no path, got 'http://origin?x=1'",
        id="upstream-query",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid: {upstream: 'http://user:pw@origin'}\n",
        5,
        "got a URL with credentials",
        id="upstream-credentials",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              set_headers: X-Ad-Free
        """,
        6,
        "paid.set_headers must be a mapping, got 'X-Ad-Free'",
        id="headers-not-mapping",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              set_headers:
                X-Ok: "1"
                X-Ad-Free: 1
        """,
        8,
        'paid.set_headers: value of X-Ad-Free must be a string, got 1 (quote it: "1")',
        id="headers-int-value",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              set_headers:
                "X Bad": "1"
        """,
        7,
        "paid.set_headers: 'X Bad' is not a valid header name",
        id="headers-bad-name",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: /a}
            price_sat: 1
            paid:
              set_headers:
                X-Evil: "a\\r\\nHost: other"
        """,
        7,
        "paid.set_headers: value of X-Evil contains CR, LF or NUL",
        id="headers-crlf",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid:\n      set_headers:\n        X-A: '1'\n        x-a: '2'\n",
        8,
        "paid.set_headers: 'x-a' repeats 'X-A' (header names ignore case)",
        id="headers-case-duplicate",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid:\n      set_headers: {Content-Length: '0'}\n",
        6,
        "paid.set_headers: Content-Length cannot be set",
        id="headers-framing",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: "/episodes/*"}
            price_sat: 1
            paid:
              rewrite_path: "/adfree/\\\\1"
        """,
        6,
        "paid.rewrite_path must be a [regex, replacement] pair",
        id="rewrite-not-pair",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: "/episodes/*"}
            price_sat: 1
            paid:
              rewrite_path: ["^/episodes/(.*)$"]
        """,
        6,
        "paid.rewrite_path must be a [regex, replacement] pair like "
        '["^/a/(.*)$", "/b/\\\\1"], got 1 item(s)',
        id="rewrite-one-item",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: "/episodes/*"}
            price_sat: 1
            paid:
              rewrite_path:
                - "^/episodes/(.*$"
                - "/adfree/\\\\1"
        """,
        7,
        "paid.rewrite_path: invalid regular expression '^/episodes/(.*$': "
        "missing ), unterminated subpattern",
        id="rewrite-bad-regex",
    ),
    pytest.param(
        """
        services:
          - name: a
            match: {path: "/episodes/*"}
            price_sat: 1
            paid:
              rewrite_path:
                - "^/episodes/(.*)$"
                - "/adfree/\\\\2"
        """,
        8,
        "paid.rewrite_path: invalid replacement '/adfree/\\\\2': invalid group reference 2",
        id="rewrite-missing-group",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid:\n      rewrite_path: ['^/(?P<x>.*)$', '/b/\\g<y>']\n",
        6,
        "paid.rewrite_path: invalid replacement '/b/\\\\g<y>': unknown group name 'y'",
        id="rewrite-unknown-group-name",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    paid:\n      rewrite_path: ['^/a$', 'b']\n",
        6,
        "paid.rewrite_path: replacement 'b' must start with '/'",
        id="rewrite-relative",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n    capabilities: read\n",
        5,
        "capabilities must be a list, got 'read'",
        id="capabilities-not-list",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities:\n      - read\n      - 'read,write'\n",
        7,
        "invalid capability 'read,write'",
        id="capabilities-comma",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities: [read, read]\n",
        5,
        "duplicate capability 'read'",
        id="capabilities-duplicate",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities: [{x: 1}]\n",
        5,
        "a capability must be a string, got a mapping",
        id="capabilities-mapping",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities:\n      read: [GET]\n      write: [POST, get]\n",
        7,
        "method GET is listed under both 'read' and 'write' in capabilities",
        id="capabilities-method-twice",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities:\n      read: []\n",
        6,
        "capabilities.read is empty (list the methods that need it)",
        id="capabilities-no-methods",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities:\n      'read,all': [GET]\n",
        6,
        "invalid capability 'read,all'",
        id="capabilities-bad-name-in-mapping",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: 1\n"
        "    capabilities:\n      read: GET\n",
        6,
        "capabilities.read must be a list like [GET, HEAD], got 'GET'",
        id="capabilities-methods-not-list",
    ),
    pytest.param(
        "services:\n  - name: a\n    description: ''\n    match: {path: /a}\n    price_sat: 1\n",
        3,
        "description must not be empty",
        id="description-empty",
    ),
    pytest.param(
        "services:\n  - name: a\n    description: |\n      two\n      lines\n"
        "    match: {path: /a}\n    price_sat: 1\n",
        3,
        "description must be one line",
        id="description-multiline",
    ),
    pytest.param(
        "services:\n  - name: a\n    description: '" + "é" * 251 + "'\n"
        "    match: {path: /a}\n    price_sat: 1\n",
        3,
        "description is 502 bytes; an invoice memo holds at most 500",
        id="description-long",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n"
        "    price_sat: !!python/object:os.system 1\n",
        4,
        "YAML syntax error: could not determine a constructor",
        id="unsafe-tag",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: !custom {path: /a}\n    price_sat: 1\n",
        3,
        "match: unsupported YAML tag '!custom'",
        id="custom-tag",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: /a}\n    price_sat: *nope\n",
        4,
        "YAML syntax error: found undefined alias 'nope'",
        id="undefined-alias",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    exc = error(text)
    assert isinstance(exc, ValueError)
    assert exc.source == "rules/test.yaml"
    assert exc.line == line, str(exc)
    assert str(exc).startswith(f"rules/test.yaml:{line}: "), str(exc)
    assert message in str(exc)


def test_error_message_format_exact() -> None:
    exc = error(
        """
        services:
          - name: ok
            match: {path: /ok}
            price_sat: 1
          - name: podcast
            match:
              path: "/episodes/*"
            mode: paywall
            description: "x"
            valid_for: 1h

            price_sat: -5
        """
    )
    assert str(exc) == (
        "rules/test.yaml:12: service 'podcast': price_sat must be a whole number >= 0, got -5"
    )
    assert (exc.line, exc.service, exc.problem) == (
        12,
        "podcast",
        "price_sat must be a whole number >= 0, got -5",
    )


def test_unknown_key_message_exact() -> None:
    exc = error("services:\n  - name: podcast\n    match: {path: /a}\n    prise_sat: 21\n")
    assert str(exc) == (
        "rules/test.yaml:4: service 'podcast': unknown key 'prise_sat' (did you mean 'price_sat'?)"
    )


def test_error_with_crlf_line_endings() -> None:
    text = "services:\r\n  - name: a\r\n    match: {path: /a}\r\n    price_sat: -1\r\n"
    with pytest.raises(RulesError) as info:
        parse_rules(text, "win.yaml")
    assert info.value.line == 4


def test_default_source_name() -> None:
    with pytest.raises(RulesError, match=r"^<rules>:1: the rules file is empty"):
        parse_rules("")


def test_rules_error_without_location() -> None:
    assert str(RulesError("boom")) == "boom"
    assert str(RulesError("boom", source="f.yaml")) == "f.yaml: boom"
    assert (
        str(RulesError("boom", source="f.yaml", line=3, service="s"))
        == "f.yaml:3: service 's': boom"
    )


# ---- load_rules --------------------------------------------------------------------------------


def test_load_rules_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RulesError) as info:
        load_rules(missing)
    assert str(info.value) == f"{missing}: cannot read rules file: No such file or directory"
    assert info.value.line is None


def test_load_rules_directory(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path)


def test_load_rules_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("services:\n  - name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RulesError, match=r"cannot read rules file: not UTF-8"):
        load_rules(path)


def test_load_rules_reads_utf8_and_names_path(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "\ufeffservices:\n  - name: a\n    description: Épisode\n    match: {path: /a}\n"
        "    price_sat: 1\n",
        encoding="utf-8",
    )
    ruleset = load_rules(str(path))
    assert ruleset.source == str(path)
    assert ruleset.rules[0].description == "Épisode"
    path.write_text("services:\n  - name: a\n    match: {path: /a}\n    mode: nope\n")
    with pytest.raises(RulesError) as info:
        load_rules(str(path))
    assert str(info.value).startswith(f"{path}:4: service 'a': unknown mode 'nope'")


def test_parse_is_pure_and_repeatable() -> None:
    text = yaml_text(MINIMAL)
    assert parse_rules(text) == parse_rules(text)


# ---- mode: deny, and the warnings ---------------------------------------------------------------

EXPOSED = """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
"""


def test_a_paid_variant_anyone_can_fetch_is_warned_about() -> None:
    warnings = rule_warnings(parse(EXPOSED))
    assert warnings == [
        "service 'podcast' (line 2): its paid variant /adfree/... can be fetched through the "
        "proxy without paying; add a service with mode: deny for it"
    ]


@pytest.mark.parametrize(
    "guard",
    [
        '  - name: adfree\n    match: {path: "/adfree/*"}\n    mode: deny\n',
        '  - name: adfree\n    match: {path: "/adfree/*"}\n    price_sat: 50\n',
    ],
    ids=["deny", "priced"],
)
def test_a_paid_variant_behind_a_deny_or_priced_rule_is_fine(guard: str) -> None:
    assert rule_warnings(parse(EXPOSED + guard)) == []


def test_a_free_rule_in_front_of_the_paid_files_is_still_a_warning() -> None:
    free = '  - name: open\n    match: {path: "/adfree/*"}\n    mode: free\n'
    assert len(rule_warnings(parse(EXPOSED + free))) == 1


def test_a_paid_variant_on_another_upstream_is_not_warned_about() -> None:
    text = EXPOSED + "      upstream: http://127.0.0.1:9\n"
    assert rule_warnings(parse(text)) == []


def test_an_upgrade_without_a_paid_variant_is_warned_about() -> None:
    text = MINIMAL + "    mode: upgrade\n"
    assert rule_warnings(parse(text)) == [
        "service 'podcast' (line 2) is in upgrade mode but has no 'paid:' variant; paying "
        "clients get the same content as everyone else"
    ]


def test_deny_needs_no_price_and_matches_like_any_rule() -> None:
    rule = one('services:\n  - name: hidden\n    match: {path: "/adfree/*"}\n    mode: deny\n')
    assert (rule.mode, rule.price_sat) == ("deny", 0)
    assert rule.matches("h", "/adfree/x.wav", "GET")


@pytest.mark.parametrize("key", ["price_sat: 5", "paid: {set_headers: {X: y}}", "valid_for: 1h"])
def test_deny_refuses_keys_that_sell_something_naming_their_line(key: str) -> None:
    text = f'services:\n  - name: hidden\n    match: {{path: "/a/*"}}\n    mode: deny\n    {key}\n'
    exc = error(text)
    assert exc.line == 5, str(exc)
    assert "has no meaning with mode: deny" in str(exc)


# ---- hostile or broken files: always one RulesError line, never another exception ------------


def service(extra: str = "", *, path: str = '"/a/*"', price: str = "1") -> str:
    """One service (lines 1-4, `extra` from line 5 on)."""
    return f"services:\n  - name: a\n    match: {{path: {path}}}\n    price_sat: {price}\n{extra}"


def laughs(levels: int, fan_out: int = 9) -> str:
    """ "Billion laughs": each anchor a list of `fan_out` aliases of the one before."""
    lines = ["l0: &l0 [lol]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * fan_out)}]")
    return "\n".join(lines) + f"\nservices: *l{levels - 1}\n"


def merge_bomb(levels: int, fan_out: int = 9) -> str:
    """The same with merge keys, which PyYAML's flatten_mapping really copies."""
    anchors = ["&m0 {k0: 1, k1: 2, k2: 3}"]
    for level in range(1, levels):
        anchors.append(f"&m{level} {{<<: [{', '.join([f'*m{level - 1}'] * fan_out)}]}}")
    return f"services:\n  - <<: [{', '.join(anchors)}]\n    name: a\n"


def alias_chain(length: int) -> str:
    """Each anchor a one-item list of the one before: nested `length` deep, through aliases."""
    items = ["&c0 [x]"] + [f"&c{i} [*c{i - 1}]" for i in range(1, length)]
    return f"services: [{', '.join(items)}]\n"


# (text, line, part of the message). Each of these crashed parse_rules with something other
# than RulesError, or let through what later fails (an unencodable string, a date past 9999),
# or made a message of several lines.
HOSTILE = [
    pytest.param(service(path='"/a\\ud800"'), 3, "lone surrogate", id="surrogate-in-path"),
    pytest.param(
        service('    description: "caf\\udce9"\n'), 5, "lone surrogate", id="surrogate-in-text"
    ),
    pytest.param(service('    "pr\\ud800ice": 1\n'), 5, "lone surrogate", id="surrogate-in-key"),
    pytest.param(
        service('    paid: {set_headers: {X-A: "\\udfff"}}\n'),
        5,
        "lone surrogate",
        id="surrogate-in-header",
    ),
    pytest.param(
        service(path="'re:a{99999999999}'"),
        3,
        "match.path: invalid regular expression 'a{99999999999}': the repetition number is too",
        id="regex-repeat-count-too-large",
    ),
    pytest.param(
        service(path="'re:" + "(" * 5000 + "a" + ")" * 5000 + "'"),
        3,
        "match.path: invalid regular expression '(((",
        id="regex-nested-5000-deep",
    ),
    pytest.param(
        service(
            "    match: {path: /a, host: 're:" + "(?:" * 3000 + "a" + ")" * 3000 + "'}\n"
        ).replace('    match: {path: "/a/*"}\n', ""),
        4,
        "nested too deeply",
        id="host-regex-nested-deep",
    ),
    pytest.param(
        service('    paid: {rewrite_path: ["a{99999999999}", "/b"]}\n'),
        5,
        "paid.rewrite_path: invalid regular expression",
        id="rewrite-regex-repeat-count-too-large",
    ),
    pytest.param(
        service('    paid: {rewrite_path: ["^/a/(.*)$", "/b/\\\\1\\n"]}\n'),
        5,
        "contains whitespace or control characters",
        id="rewrite-replacement-with-a-line-break",
    ),
    pytest.param("[" * 10000, 1, "collections nested more than 50 levels deep", id="flow-lists"),
    pytest.param("{a: " * 10000, 1, "nested more than 50 levels deep", id="flow-mappings"),
    pytest.param(
        "".join("  " * i + "-\n" for i in range(100)), 51, "nested more than 50", id="block-lists"
    ),
    pytest.param(alias_chain(3000), 1, "nest collections more than 50 deep", id="alias-chain"),
    pytest.param(laughs(10), 7, "expand to more than 1,000,000 values", id="billion-laughs"),
    pytest.param(merge_bomb(9), 2, "expand to more than 1,000,000 values", id="merge-bomb"),
    pytest.param(
        "services:\n  - &s {<<: *s, name: a}\n",
        2,
        "an alias refers to a collection that contains it",
        id="merge-of-itself",
    ),
    pytest.param(
        "services: &s [*s]\n", 1, "an alias refers to a collection that contains it", id="cycle"
    ),
    pytest.param(service(price="9" * 5000), 4, "number 99999", id="int-past-str-limit"),
    pytest.param(
        "version: " + "59:" * 3000 + "1\n" + service(), 1, "is too large", id="sexagesimal-int"
    ),
    pytest.param(service(price="!!int xyz"), 4, "cannot read 'xyz' as int", id="int-tag"),
    pytest.param(service(price="!!float xyz"), 4, "cannot read 'xyz' as float", id="float-tag"),
    pytest.param(service(price="!!bool maybe"), 4, "cannot read 'maybe' as bool", id="bool-tag"),
    pytest.param(
        service(price="!!timestamp soon"), 4, "cannot read 'soon' as timestamp", id="time-tag"
    ),
    pytest.param(
        service("    valid_for: 999999999999999999999999999\n"),
        5,
        "valid_for: 999999999999999999999999999 seconds is more than 100 years, or 'never'",
        id="valid-for-past-year-9999",
    ),
    pytest.param(
        service("    invoice_expiry: 99999999999w\n"),
        5,
        "invoice_expiry: 60479999999395200 seconds is more than 100 years",
        id="invoice-expiry-past-year-9999",
    ),
    pytest.param(
        service('    "pr\\nice": 1\n'), 5, "unknown key 'pr\\nice'", id="line-break-in-a-key"
    ),
    pytest.param(
        service('    "\\u202eprice": 1\n'), 5, "unknown key '\\u202eprice'", id="bidi-in-a-key"
    ),
    pytest.param(
        "services: !<tag:%0Ax> []\n", 1, "unsupported YAML tag 'tag:\\nx'", id="line-break-in-tag"
    ),
    pytest.param(service("    mode: " + "x" * 100_000 + "\n"), 5, "unknown mode 'xxx", id="huge"),
    pytest.param("", 1, "the rules file is empty", id="empty"),
    pytest.param("# nothing\n# here\n", 1, "the rules file is empty", id="only-comments"),
    pytest.param("services: []\nservices: []\n", 2, "duplicate key 'services'", id="dup-keys"),
    pytest.param("a: &x 1\nb: &x 2\nservices: []\n", 2, "duplicate anchor", id="dup-anchor"),
    pytest.param(service(price="1.0e+400"), 4, "got inf", id="float-overflow"),
    pytest.param(service(price=".nan"), 4, "got nan", id="nan"),
    pytest.param(service(price="!!binary aGk="), 4, "got b'hi'", id="binary"),
    pytest.param(service("    2: x\n"), 5, "unknown key '2'", id="int-key"),
    pytest.param("? [a]\n: 1\nservices: []\n", 1, "keys must be plain names", id="list-key"),
]


@pytest.mark.parametrize(("text", "line", "message"), HOSTILE)
def test_hostile_files_give_one_rules_error_line(text: str, line: int, message: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules/test.yaml")
    shown = str(info.value)
    assert shown.startswith(f"rules/test.yaml:{line}: "), shown[:300]
    assert message in shown, shown[:300]
    # One printable line of reasonable length: what a log, a terminal or mitmproxy shows.
    assert shown.isprintable() and len(shown) < 1000, shown[:300]
    shown.encode("utf-8")


def test_an_unforeseen_failure_is_still_one_rules_error_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object) -> None:
        raise LookupError("surprise\nsecond line")

    monkeypatch.setattr("l402proxy.rules._Parser.description", broken)
    with pytest.raises(RulesError) as info:
        parse_rules(service("    description: x\n"), "rules/test.yaml")
    assert str(info.value) == (
        "rules/test.yaml:2: service 'a': cannot read the rules "
        "(LookupError: surprise\\nsecond line)"
    )


def test_load_rules_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("services:\n  - name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == (
        f"{path}:2: cannot read rules file: not UTF-8 (invalid continuation byte at byte 23)"
    )


def test_load_rules_refuses_a_huge_file_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("# filler\n" * (1024 * 1024 // 9 + 1))
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert str(info.value) == f"{path}: cannot read rules file: larger than 1024 KiB"


@pytest.mark.parametrize("content", ["", "# just a comment\n"])
def test_load_rules_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    with pytest.raises(RulesError, match=r":1: the rules file is empty"):
        load_rules(path)


def test_load_rules_odd_file_names_stay_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "new\nline.yaml"
    with pytest.raises(RulesError) as info:
        load_rules(missing)
    assert str(info.value) == (
        f"{tmp_path}/new\\nline.yaml: cannot read rules file: No such file or directory"
    )
    weird = tmp_path / "x\udce9.yaml"  # a non-UTF-8 file name, as os.listdir gives it
    weird.write_text(service(price="-1"))
    with pytest.raises(RulesError) as info:
        load_rules(weird)
    assert str(info.value).startswith(f"{tmp_path}/x\\udce9.yaml:4: service 'a': price_sat")
    str(info.value).encode("utf-8")
