"""The discovery manifest (engine/discovery.py, issue 16): `/.well-known/l402.json` in the shape
of the L402 discovery proposal, generated from the rules. What each kind of rule says in it,
what it must never say (the operator's upstreams, header values, price modules, file paths),
that its bytes and ETag are stable, and how it is answered (caching, 304, HEAD, 405)."""

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l402proxy.doors.asgi import one_host
from l402proxy.engine import Request
from l402proxy.engine.answers import Answer
from l402proxy.engine.core import caveats_for_pass
from l402proxy.engine.discovery import (
    CACHE_CONTROL,
    PATH,
    TIME_PLACEHOLDER,
    is_manifest_target,
    manifest,
    manifest_answer,
    manifest_body,
    path_pattern,
)
from l402proxy.rules import Rule, RulesError, RuleSet, load_rules, parse_rules
from tests.unit.test_pricing_engine import paywall_on, price_module, request

# Secrets of the operator the rules below hold: none may reach the manifest.
UPSTREAM_HOST = "10.9.8.7"
UPSTREAM_PORT = "9443"
API_KEY = "sk-live-0123456789abcdef"
HEADER_NAME = "X-Origin-Api-Key"
REWRITTEN = "/internal-adfree/"
USAGE_HEADER = "X-Metered-Tokens"

RULES = f"""
services:
  - name: podcast
    description: Ad-free episodes
    match: {{path: "/episodes/*", methods: [GET, HEAD]}}
    mode: upgrade
    price_sat: 21
    valid_for: 1d
    paid:
      upstream: "https://{UPSTREAM_HOST}:{UPSTREAM_PORT}"
      rewrite_path: ["^/episodes/(.*)$", "{REWRITTEN}\\\\1"]
      set_headers: {{{HEADER_NAME}: "{API_KEY}"}}
    feed: /feed.xml
  - name: quoted
    match: {{path: "re:^/quote/[0-9]+$"}}
    price: python:MODULE:quote
    rate_limits: [{{requests: 7, per: 13s}}]
  - name: bundled
    match: {{path: "/api/*"}}
    price_sat: 100
    bundle: {{requests: 50}}
    capabilities: {{read: [GET], write: [POST, PUT]}}
  - name: bytes
    match: {{path: "/files/*.iso"}}
    price_sat: 500
    bundle: {{bytes: 2GB}}
    valid_for: never
  - name: metered
    match: {{path: "/llm/*"}}
    price_sat: 1000
    bundle: {{units: 10000, usage_header: {USAGE_HEADER}}}
  - name: once
    match: {{path: "/once/[a-z]?"}}
    price_sat: 5
    single_use: true
    capabilities: [fetch]
  - name: premium
    match: {{path: "/premium/*"}}
    price_sat: 2100
    pass: {{name: all-access, services: [premium, podcast, bundled], valid_for: 30d}}
  - name: elsewhere
    match: {{path: "/news/*", host: "news.example"}}
    price_sat: 3
  - name: open
    match: {{path: "/free/*"}}
    mode: free
  - name: blocked
    match: {{path: "/internal-adfree/*"}}
    mode: deny
"""


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secret-rules-dir"
    directory.mkdir()
    return directory


@pytest.fixture
def module(rules_dir: Path) -> Iterator[str]:
    with price_module(rules_dir) as name:
        yield name


@pytest.fixture
def rules(rules_dir: Path, module: str) -> RuleSet:
    path = rules_dir / "rules.yaml"
    path.write_text(RULES.replace("MODULE", module))
    return load_rules(path)


def services_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {service["name"]: service for service in document["services"]}


def header(answer: Answer, name: str) -> str | None:
    values = [v.decode() for k, v in answer.headers if k.lower() == name.lower().encode()]
    assert len(values) <= 1, values
    return values[0] if values else None


def with_attribute(rule: Rule, **values: Any) -> Rule:
    """A copy of `rule` with attributes rules.py may not have yet (`discovery`, `schemes`): the
    dataclass field once it exists, else an attribute set on the copy."""
    try:
        return dataclasses.replace(rule, **values)
    except TypeError:
        copy = dataclasses.replace(rule)
        for name, value in values.items():
            object.__setattr__(copy, name, value)
        return copy


def replaced(rules: RuleSet, name: str, **values: Any) -> RuleSet:
    return dataclasses.replace(
        rules,
        rules=tuple(
            with_attribute(rule, **values) if rule.name == name else rule for rule in rules.rules
        ),
    )


# -- what each rule says --------------------------------------------------------------------


def test_the_proposals_top_level_members(rules: RuleSet) -> None:
    document = manifest(rules)
    assert document["version"] == "1.0"
    assert document["provider"] == {"name": "l402proxy"}
    assert document["currencies"] == ["msat"]
    assert document["macaroon_versions"] == [0]
    assert document["payment_methods"] == ["bolt11"]
    for service in document["services"]:
        assert service["resources"], service["name"]
        for resource in service["resources"]:
            assert resource["pricing"]["model"] in ("fixed", "dynamic")
            assert isinstance(resource["path"], str) and isinstance(resource["method"], str)


def test_only_priced_rules_are_listed_in_file_order(rules: RuleSet) -> None:
    names = [service["name"] for service in manifest(rules)["services"]]
    assert names == [
        "podcast",
        "quoted",
        "bundled",
        "bytes",
        "metered",
        "once",
        "premium",
        "elsewhere",
    ]


def test_a_fixed_price_upgrade_rule(rules: RuleSet) -> None:
    podcast = services_of(manifest(rules))["podcast"]
    assert podcast["description"] == "Ad-free episodes"
    assert podcast["mode"] == "upgrade"
    assert podcast["valid_for_seconds"] == 86400
    assert podcast["invoice_expiry_seconds"] == 600
    assert podcast["schemes"] == ["l402"]
    assert podcast["single_use"] is False
    assert "bundle" not in podcast and "pass" not in podcast and "capabilities" not in podcast
    assert podcast["private_feed"] == "/feed.xml"
    assert podcast["token_caveats"] == [
        "services=podcast:0",
        f"podcast_valid_until={TIME_PLACEHOLDER}",
    ]
    assert podcast["resources"] == [
        {
            "path": "/episodes/*",
            "path_syntax": "glob",
            "method": method,
            "pricing": {"model": "fixed", "price_msat": 21000, "price_sat": 21},
        }
        for method in ("GET", "HEAD")
    ]


def test_a_price_function_is_only_dynamic(rules: RuleSet) -> None:
    quoted = services_of(manifest(rules))["quoted"]
    assert quoted["resources"] == [
        {
            "path": "re:^/quote/[0-9]+$",
            "path_syntax": "regex",
            "method": "*",
            "pricing": {"model": "dynamic"},
        }
    ]


def test_bundles_of_requests_bytes_and_units(rules: RuleSet) -> None:
    services = services_of(manifest(rules))
    assert services["bundled"]["bundle"] == {"unit": "requests", "size": 50}
    assert services["bytes"]["bundle"] == {"unit": "bytes", "size": 2_000_000_000}
    assert services["metered"]["bundle"] == {"unit": "units", "size": 10000}
    # A token that never expires: null validity, and no expiry caveat.
    assert services["bytes"]["valid_for_seconds"] is None
    assert services["bytes"]["token_caveats"] == ["services=bytes:0"]


def test_capabilities_map_each_method_to_what_it_needs(rules: RuleSet) -> None:
    bundled = services_of(manifest(rules))["bundled"]
    assert bundled["capabilities"] == ["read", "write"]
    # HEAD needs GET's capability; DELETE needs one no token sold here has: not offered.
    assert [(r["method"], r.get("capability")) for r in bundled["resources"]] == [
        ("GET", "read"),
        ("HEAD", "read"),
        ("POST", "write"),
        ("PUT", "write"),
    ]
    assert bundled["token_caveats"] == [
        "services=bundled:0",
        "bundled_capabilities=read,write",
        f"bundled_valid_until={TIME_PLACEHOLDER}",
    ]


def test_a_method_no_capability_covers_is_not_sold() -> None:
    rules = parse_rules(
        """
services:
  - name: api
    match: {path: "/api/*", methods: [GET, DELETE]}
    price_sat: 5
    capabilities: {read: [GET]}
"""
    )
    api = services_of(manifest(rules))["api"]
    assert [(r["method"], r.get("capability")) for r in api["resources"]] == [("GET", "read")]


def test_single_use(rules: RuleSet) -> None:
    once = services_of(manifest(rules))["once"]
    assert once["single_use"] is True
    assert once["bundle"] == {"unit": "requests", "size": 1}
    assert once["capabilities"] == ["fetch"]
    assert once["resources"][0]["path"] == "/once/[a-z]?"
    assert "capability" not in once["resources"][0]  # the list form checks no method


def test_a_pass_names_its_services_and_their_caveats(rules: RuleSet) -> None:
    document = manifest(rules)
    premium = services_of(document)["premium"]
    assert premium["pass"] == {
        "name": "all-access",
        "services": ["premium", "podcast", "bundled"],
        "valid_for_seconds": 30 * 86400,
    }
    assert premium["valid_for_seconds"] == 30 * 86400
    assert premium["token_caveats"] == [
        "services=premium:0,podcast:0,bundled:0",
        *(f"{name}_valid_until={TIME_PLACEHOLDER}" for name in ("premium", "podcast", "bundled")),
    ]
    assert document["caveats"]["services"] == {"type": "service_list", "attenuation": "subset"}
    for name in ("premium", "podcast", "bundled", "once", "elsewhere"):
        assert document["caveats"][f"{name}_valid_until"] == {
            "type": "timestamp",
            "attenuation": "earlier",
        }
    assert document["caveats"]["bundled_capabilities"] == {
        "type": "string",
        "attenuation": "subset",
    }
    assert "bytes_valid_until" not in document["caveats"]  # never expires


def test_token_caveats_are_what_the_engine_mints(rules: RuleSet) -> None:
    """The templates are the caveats engine.core mints, the time filled in: the manifest cannot
    drift from what a token really carries."""
    services = services_of(manifest(rules))
    for rule in rules.rules:
        if rule.name not in services:
            continue
        service = services[rule.name]
        # As engine.core.challenge passes it: None for a token that never expires.
        valid_until = None if service["valid_for_seconds"] is None else 1_700_000_000
        minted = caveats_for_pass(rule, valid_until)
        shown = [c.replace(TIME_PLACEHOLDER, "1700000000") for c in service["token_caveats"]]
        assert shown == minted, rule.name


def test_schemes_from_the_rule_or_the_default(rules: RuleSet) -> None:
    changed = replaced(rules, "quoted", schemes=("payment", "l402"))
    changed = replaced(changed, "podcast", schemes=None)
    services = services_of(manifest(changed, default_schemes=("l402", "payment")))
    assert services["quoted"]["schemes"] == ["payment", "l402"]
    assert services["podcast"]["schemes"] == ["l402", "payment"]
    assert services_of(manifest(rules))["podcast"]["schemes"] == ["l402"]


def test_a_payment_only_rule_sells_no_token(rules: RuleSet) -> None:
    """A Payment charge pays for one request: no token, so no validity and no caveats."""
    document = manifest(replaced(rules, "once", schemes=("payment",)))
    once = services_of(document)["once"]
    assert once["schemes"] == ["payment"]
    assert "token_caveats" not in once and "valid_for_seconds" not in once
    assert "once_valid_until" not in document["caveats"]
    assert once["resources"][0]["pricing"] == {"model": "fixed", "price_msat": 5000, "price_sat": 5}
    both = services_of(manifest(replaced(rules, "once", schemes=("payment", "l402"))))["once"]
    assert both["token_caveats"][0] == "services=once:0"


def test_host_scoped_rules_only_on_their_host(rules: RuleSet) -> None:
    assert "elsewhere" in services_of(manifest(rules))
    assert "elsewhere" in services_of(manifest(rules, host="news.example"))
    assert "elsewhere" in services_of(manifest(rules, host="NEWS.example."))
    on_other = manifest(rules, host="podcast.example")
    assert "elsewhere" not in services_of(on_other)
    assert "/news/" not in json.dumps(on_other)
    assert "podcast" in services_of(on_other)  # rules without a host are everyone's


def test_discovery_false_hides_a_rule_everywhere(rules: RuleSet) -> None:
    hidden = replaced(rules, "bundled", discovery=False)
    text = manifest_body(hidden)[0].decode()
    document = json.loads(text)
    assert "bundled" not in services_of(document)
    # Not even named by the pass that opens it, nor in the caveat vocabulary.
    assert "bundled" not in text
    assert "/api/" not in text
    premium = services_of(document)["premium"]
    assert premium["pass"]["services"] == ["premium", "podcast"]
    assert premium["token_caveats"][0] == "services=premium:0,podcast:0"
    # discovery: true (and the attribute missing) lists it.
    shown = replaced(rules, "bundled", discovery=True)
    assert "bundled" in services_of(manifest(shown))


def test_nothing_to_sell_is_an_empty_catalog() -> None:
    rules = parse_rules('services:\n  - name: open\n    match: {path: "/*"}\n    mode: free\n')
    document = manifest(rules)
    assert document["services"] == []
    assert document["caveats"] == {"services": {"type": "service_list", "attenuation": "subset"}}


# -- what it never says -----------------------------------------------------------------------


def test_no_secret_of_the_operator_is_in_it(rules: RuleSet, module: str, tmp_path: Path) -> None:
    for host in (None, "news.example"):
        text = manifest_body(rules, host=host)[0].decode()
        for secret in (
            UPSTREAM_HOST,
            UPSTREAM_PORT,
            "https://",
            API_KEY,
            HEADER_NAME,
            HEADER_NAME.lower(),
            REWRITTEN.strip("/"),
            module,
            "python:",
            ":quote",
            USAGE_HEADER,
            "secret-rules-dir",
            str(tmp_path),
            "rules.yaml",
            "rate",
            '"line"',
            "upstream",
            "set_headers",
            "rewrite",
            "blocked",  # a deny rule names a place not to be found
            "open",
        ):
            assert secret not in text, secret


# -- the bytes and the answer -------------------------------------------------------------------


def test_the_bytes_are_deterministic(rules_dir: Path, module: str) -> None:
    """Two loads of the same file (new objects, a new cache entry): the very same bytes and
    ETag; keys sorted at every level."""
    path = rules_dir / "rules.yaml"
    path.write_text(RULES.replace("MODULE", module))
    first, second = load_rules(path), load_rules(path)
    assert first is not second
    body, etag = manifest_body(first)
    assert manifest_body(second) == (body, etag)
    assert body == (json.dumps(json.loads(body), sort_keys=True, indent=2) + "\n").encode()
    assert etag == f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def test_new_rules_make_a_new_manifest(rules: RuleSet) -> None:
    """Rules reloaded with another price: the cached bytes of the old rules never answer."""
    body, etag = manifest_body(rules)
    cheaper = replaced(rules, "podcast", price_sat=20)
    new_body, new_etag = manifest_body(cheaper)
    assert new_etag != etag
    assert (
        services_of(json.loads(new_body))["podcast"]["resources"][0]["pricing"]["price_sat"] == 20
    )
    assert manifest_body(rules) == (body, etag)


def test_get_is_cacheable_json(rules: RuleSet) -> None:
    answer = manifest_answer(rules, "GET")
    body, etag = manifest_body(rules)
    assert answer.status == 200
    assert answer.body == body
    assert header(answer, "Content-Type") == "application/json"
    assert header(answer, "Cache-Control") == CACHE_CONTROL == "public, max-age=300"
    assert header(answer, "ETag") == etag
    assert header(answer, "Access-Control-Allow-Origin") == "*"
    assert header(answer, "Content-Length") == str(len(body))
    assert answer.note == {"variant": "endpoint", "endpoint": "discovery"}


def test_head_has_no_body(rules: RuleSet) -> None:
    get = manifest_answer(rules, "GET")
    head = manifest_answer(rules, "head")
    assert head.status == 200 and head.body == b""
    assert header(head, "Content-Length") == str(len(get.body))
    assert header(head, "ETag") == header(get, "ETag")
    assert header(head, "Cache-Control") == CACHE_CONTROL


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "if_none_match", ["{etag}", "W/{etag}", '"other", {etag}', "*", ' "x" ,W/{etag} ']
)
def test_a_matching_if_none_match_is_304(rules: RuleSet, method: str, if_none_match: str) -> None:
    etag = manifest_body(rules)[1]
    answer = manifest_answer(rules, method, if_none_match=if_none_match.format(etag=etag))
    assert answer.status == 304
    assert answer.body == b""
    assert header(answer, "ETag") == etag
    assert header(answer, "Cache-Control") == CACHE_CONTROL
    # A 304's Content-Length would have to be the 200's; servers such as uvicorn refuse a
    # shorter body than one announces, so it has none.
    assert header(answer, "Content-Length") is None


@pytest.mark.parametrize("if_none_match", ['"stale"', "", "W/", '"' + "0" * 32 + '"'])
def test_another_etag_gets_the_manifest(rules: RuleSet, if_none_match: str) -> None:
    answer = manifest_answer(rules, "GET", if_none_match=if_none_match)
    assert answer.status == 200
    assert answer.body == manifest_body(rules)[0]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
def test_other_methods_are_405(rules: RuleSet, method: str) -> None:
    answer = manifest_answer(rules, method)
    assert answer.status == 405
    assert header(answer, "Allow") == "GET, HEAD"
    assert header(answer, "Cache-Control") == "no-store"
    assert header(answer, "ETag") is None
    assert b"GET and HEAD" in answer.body


def test_answers_follow_the_host(rules: RuleSet) -> None:
    here = manifest_answer(rules, "GET", host="podcast.example")
    there = manifest_answer(rules, "GET", host="news.example")
    assert header(here, "ETag") != header(there, "ETag")
    assert b'"elsewhere"' in there.body and b'"elsewhere"' not in here.body


# -- the path and the pattern -----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        PATH,
        PATH + "?x=1",
        "/.well-known/l402%2Ejson",
        "/.well-known/./l402.json",
        "//.well-known/l402.json",
    ],
)
def test_the_manifest_target(target: str) -> None:
    assert is_manifest_target(target)


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/.well-known/l402.jsonx",
        "/.well-known/l402.json/x",
        "/.well-known/L402.json",
        "/l402.json",
        "*",
    ],
)
def test_other_targets(target: str) -> None:
    assert not is_manifest_target(target)


@pytest.mark.parametrize(
    ("glob", "shown", "syntax"),
    [
        ("/feed.xml", "/feed.xml", "exact"),
        ("/episodes/*", "/episodes/*", "glob"),
        ("/a/*/b*.mp3", "/a/*/b*.mp3", "glob"),
        ("/a/**/c", "/a/*/c", "glob"),  # fnmatch reads ** as *
        ("/x/[!a-c]?.txt", "/x/[!a-c]?.txt", "glob"),
        ("/lit[]]x", "/lit[]]x", "glob"),
        ("/[[]x", "/[[]x", "glob"),
        ("/caf\u00e9/*", "/caf\u00e9/*", "glob"),
        ("/x-y_z~!$&'()+=:@", "/x-y_z~!$&'()+=:@", "exact"),
        ("*", "*", "glob"),
    ],
)
def test_a_glob_is_shown_as_written(glob: str, shown: str, syntax: str) -> None:
    rules = parse_rules(
        f'services:\n  - name: s\n    match: {{path: "{glob}"}}\n    price_sat: 1\n'
    )
    assert path_pattern(rules.rules[0]) == (shown, syntax)
    # Whatever is shown means what the rule matches.
    assert fnmatch.translate(shown) == rules.rules[0].path.pattern


@pytest.mark.parametrize("regex", ["^/a/[0-9]+$", "/(a|b)/.*", r"/v\d/.*", "(?s:/x/.*)"])
def test_a_regex_is_shown_with_its_prefix(regex: str) -> None:
    rules = parse_rules(
        f"services:\n  - name: s\n    match: {{path: 're:{regex}'}}\n    price_sat: 1\n"
    )
    assert path_pattern(rules.rules[0]) == (f"re:{regex}", "regex")


# -- served by the engine ----------------------------------------------------------------------

ENGINE_RULES = """\
version: 1
services:
  - name: everything
    match: {path: /*}
    price_sat: 5
  - name: hidden
    match: {path: /secret/*}
    price_sat: 7
    discovery: false
"""


async def test_the_engine_serves_the_manifest_ahead_of_a_catch_all_rule(tmp_path: Path) -> None:
    """`/*` prices every path, the manifest's too: it is answered free, never forwarded, no
    invoice made, and a rule with discovery: false is not in it."""
    async with paywall_on(tmp_path, ENGINE_RULES) as engine:
        assert engine.rules is not None and engine.rules.rules[1].discovery is False
        answer = await engine.handle(request("/.well-known/l402.json"))
        assert isinstance(answer, Answer) and answer.status == 200
        listed = json.loads(answer.body)
        names = [service["name"] for service in listed["services"]]
        assert names == ["everything"]
        tag = dict(answer.headers)[b"ETag"]
        again = await engine.handle(request("/.well-known/l402.json", (b"If-None-Match", tag)))
        assert isinstance(again, Answer) and again.status == 304
        priced = await engine.handle(request("/other", (b"Accept-Authenticate", b"L402")))
        assert isinstance(priced, Answer) and priced.status == 402
        assert engine.store is not None
        assert len(await engine.store.list_tokens()) == 1  # only /other's invoice


def test_discovery_must_be_true_or_false() -> None:
    bad = ENGINE_RULES.replace("discovery: false", "discovery: sometimes")
    with pytest.raises(RulesError, match=r"rules.yaml:9: .*discovery must be true or false"):
        parse_rules(bad, "rules.yaml")


HOSTED_RULES = """
services:
  - name: shop
    match: {path: "/shop/*", host: "shop.example"}
    price_sat: 5
  - name: internal
    match: {path: "/admin-reports/*", host: "intranet.example"}
    price_sat: 50
"""


def two_hosts(path: str) -> Request:
    """A request with two Host fields, as the ASGI door hands it over (it reads the first)."""
    return Request(
        method="GET",
        target=path,
        host="intranet.example",
        fields=((b"Host", b"intranet.example"), (b"Host", b"shop.example")),
        client=("127.0.0.1", 5000),
        target_check=one_host,
    )


async def test_the_manifest_takes_the_doors_host_check_like_every_other_request(
    tmp_path: Path,
) -> None:
    """The manifest's body follows Host and it is `Cache-Control: public`: an ambiguous Host
    (two fields; an absolute-form target naming another host) is refused for it as for every
    other request, or a cache reading the other Host keeps intranet's catalog as shop's."""
    async with paywall_on(tmp_path, HOSTED_RULES) as engine:
        priced = await engine.handle(two_hosts("/shop/x"))
        assert isinstance(priced, Answer) and priced.status == 400  # as the door asks
        answer = await engine.handle(two_hosts("/.well-known/l402.json"))
        assert isinstance(answer, Answer)
        assert answer.status == 400, (answer.status, answer.body[:200])
        broken = await engine.handle(request("/.well-known/l402.json", (b"X-Bad", b"a\rb")))
        assert isinstance(broken, Answer) and broken.status == 400


async def test_a_manifest_that_depends_on_host_says_so_to_caches(tmp_path: Path) -> None:
    """With host-scoped rules the body follows Host: `Vary: Host` (on the 200 and the 304), so
    a shared cache whose key leaves Host out (nginx's default proxy_cache_key) keeps each
    host's catalog apart; without one, every host gets the same document and no Vary."""
    async with paywall_on(tmp_path, HOSTED_RULES) as engine:
        shop = await engine.handle(request("/.well-known/l402.json"))
        intranet = await engine.handle(
            Request(
                method="GET",
                target="/.well-known/l402.json",
                host="intranet.example",
                fields=((b"Host", b"intranet.example"),),
            )
        )
        assert isinstance(shop, Answer) and isinstance(intranet, Answer)
        assert shop.body != intranet.body  # the body follows Host...
        assert header(shop, "Vary") == "Host"  # ...and says so
        tag = header(shop, "ETag")
        assert tag is not None
        again = await engine.handle(
            request("/.well-known/l402.json", (b"If-None-Match", tag.encode()))
        )
        assert isinstance(again, Answer) and again.status == 304
        assert header(again, "Vary") == "Host"
    everywhere = parse_rules(ENGINE_RULES, "rules.yaml")
    assert header(manifest_answer(everywhere, "GET", host="a.example"), "Vary") is None
