"""Request paths origins may read in more than one way: every reading must fall under the same
rule, or the request is refused (400) before anything is sold or forwarded."""

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from mitmproxy import http

from l402proxy import paywall
from l402proxy.doors.mitmproxy import L402Server, drop_our_authorization, is_our_authorization
from l402proxy.lightning.base import Invoice
from l402proxy.rules import (
    MAX_READ_PATH,
    AmbiguousPath,
    MalformedPath,
    PathError,
    RuleSet,
    normalize_path,
    parse_rules,
    path_forms,
)
from tests.unit.test_server_addon import CountingBackend, flow_for, server_on

RULES = r"""
services:
  - name: priced
    match: {path: "/priced/*"}
    price_sat: 50
  - name: cheap
    match: {path: "/cheap/*"}
    price_sat: 1
  - name: open
    match: {path: "/open/*"}
    price_sat: 0
    mode: free
  - name: vault
    match: {path: "/vault/*"}
    mode: deny
  - name: cafe
    match: {path: "/café/*"}
    price_sat: 5
  - name: posts
    match: {path: "/posts/*", methods: [POST]}
    price_sat: 5
  - name: shout
    match: {path: "re:(?i)/shout/.*"}
    price_sat: 5
  - name: exact
    match: {path: "/exact/secret.txt"}
    price_sat: 5
  - name: moved
    match: {path: "/moved/*"}
    price_sat: 5
    mode: upgrade
    paid: {rewrite_path: ["^/moved/(.*)$", "/paid/deeper/\\1"]}
"""


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return parse_rules(RULES)


AMBIGUOUS = "ambiguous"
MALFORMED = "malformed"

# path -> the service it is sold as (None: forwarded unpriced), or how it is refused.
FORMS: list[tuple[str, str | None]] = [
    # The fast path: plain paths, `//` merged.
    ("/priced/secret.txt", "priced"),
    ("/priced/secret.txt?x=%2F..%2Ffree%zz", "priced"),  # the query is not the path
    ("//priced//secret.txt", "priced"),
    ("/free/open.txt", None),
    ("/.well-known/x", None),
    ("/priced/", "priced"),
    ("*", None),
    # Encoded slashes.
    ("/priced%2Fsecret.txt", AMBIGUOUS),
    ("/priced%2fsecret.txt", AMBIGUOUS),
    ("/free/..%2Fpriced/secret.txt", AMBIGUOUS),
    ("/free%2F..%2Fpriced%2Fsecret.txt", AMBIGUOUS),
    ("/free/x/..%2F..%2Fpriced/secret.txt", AMBIGUOUS),
    ("/cheap/..%2Fpriced/secret.txt", AMBIGUOUS),
    ("/priced/a%2Fb", "priced"),  # every reading stays under /priced/
    ("/free%2Fopen.txt", None),  # every reading is free: `%2F` in free places keeps working
    ("/open/..%2Fx", "open"),  # a free rule and no rule forward alike
    ("/open/..%2Fpriced/x", AMBIGUOUS),
    ("/open/..%2Fvault/x", AMBIGUOUS),  # deny is not free
    # Encoded and raw dot segments: resolved by most origins, routed as they are by Werkzeug.
    ("/free/%2E%2E/priced/secret.txt", AMBIGUOUS),
    ("/free/.%2e/priced/secret.txt", AMBIGUOUS),
    ("/priced/%2e%2e/free/open.txt", AMBIGUOUS),
    ("/priced/../cheap/c.txt", AMBIGUOUS),
    ("/free/../priced/secret.txt", AMBIGUOUS),
    ("/./priced/secret.txt", AMBIGUOUS),
    ("/priced//../free/x", AMBIGUOUS),  # RFC 3986 exactly: `..` climbs out of the empty segment
    ("/priced/x/../y", "priced"),
    ("/priced/secret.txt/.", "priced"),
    ("/%70riced/secret%2Etxt", "priced"),  # unreserved escapes: one reading
    # Backslashes.
    ("/free/..%5Cpriced/secret.txt", AMBIGUOUS),
    ("/free\\..\\priced\\secret.txt", AMBIGUOUS),
    ("/priced\\secret.txt", AMBIGUOUS),
    ("/priced/a\\b", "priced"),
    # Path parameters (Tomcat).
    ("/free/..;/priced/secret.txt", AMBIGUOUS),
    ("/priced;x/secret.txt", AMBIGUOUS),
    ("/priced/secret.txt;jsessionid=1", "priced"),
    ("/free/a;b/../open.txt", None),
    ("/free;x/../priced/secret.txt", AMBIGUOUS),
    # Double encoding.
    ("/priced%252Fsecret.txt", AMBIGUOUS),
    ("/free/%252E%252E/priced/secret.txt", AMBIGUOUS),
    ("/free/..%252Fpriced%252Fsecret.txt", AMBIGUOUS),
    ("/free/100%25", None),
    # Case: matched as written; a `re:(?i)` pattern for case-insensitive origins.
    ("/PRICED/secret.txt", None),
    ("/Priced/secret.txt", None),
    ("/SHOUT/x", "shout"),
    ("/Shout%2Fx", AMBIGUOUS),
    # Non-ASCII: escaped UTF-8 and raw UTF-8 are the same place.
    ("/café/x", "cafe"),
    ("/caf%C3%A9/x", "cafe"),
    ("/caf%c3%a9/x", "cafe"),
    ("/free/caf%C3%A9", None),
    # Not well-formed: refused whatever they mean.
    ("/free/%zz", MALFORMED),
    ("/free/%", MALFORMED),
    ("/free/%4", MALFORMED),
    ("/free/%00", MALFORMED),
    ("/free/x\x00", MALFORMED),
    ("/free/%0a", MALFORMED),
    ("/free/%0D%0Ax", MALFORMED),
    ("/free/\t", MALFORMED),
    ("/free/%7F", MALFORMED),
    ("/free/\x7f", MALFORMED),
    ("/free/%C2%85", MALFORMED),  # a C1 control
    ("/free/..%c0%afpriced/x", MALFORMED),  # overlong '/'
    ("/free/%c0%ae%c0%ae/priced/x", MALFORMED),  # overlong '.'
    ("/free/%e0%80%af", MALFORMED),
    ("/free/%ED%A0%80", MALFORMED),  # an encoded surrogate
    ("/free/%FF", MALFORMED),
    ("/free/\udce9", MALFORMED),  # a raw Latin-1 byte, as mitmproxy decodes it
    ("/free/%2500", MALFORMED),
    ("/free/%25C0%25AF", MALFORMED),
    ("/priced/secret.txt#x", MALFORMED),
    # A rule with no wildcard: Python's http.server serves the file for a trailing dot segment
    # (posixpath.normpath drops the '/' the other readings keep).
    ("/exact/secret.txt", "exact"),
    ("/exact/secret.txt/.", AMBIGUOUS),
    ("/exact/secret.txt/x/..", AMBIGUOUS),
    ("/exact/./secret.txt", AMBIGUOUS),
]


def outcome(ruleset: RuleSet, path: str, method: str = "GET") -> str | None:
    try:
        rule = ruleset.match("h", path, method)
    except AmbiguousPath:
        return AMBIGUOUS
    except MalformedPath:
        return MALFORMED
    return None if rule is None else rule.name


@pytest.mark.parametrize(("path", "expected"), FORMS)
def test_every_form_has_one_outcome(ruleset: RuleSet, path: str, expected: str | None) -> None:
    assert outcome(ruleset, path) == expected


def test_a_huge_path_to_read_many_ways_is_refused(ruleset: RuleSet) -> None:
    # Each reading is a pass over the path: bounded, so one request cannot hold the event loop.
    assert outcome(ruleset, "/free/" + "a%2F" * (MAX_READ_PATH // 4)) == MALFORMED
    assert outcome(ruleset, "/free/" + "a%2F" * (MAX_READ_PATH // 5)) is None
    assert outcome(ruleset, "/priced/" + "a/" * MAX_READ_PATH) == "priced"  # the fast path


def test_readings_are_compared_with_host_and_method(ruleset: RuleSet) -> None:
    # /posts/* is priced for POST only: a GET has no priced reading, a POST has two rules.
    assert outcome(ruleset, "/free/..%2Fposts/x", "GET") is None
    assert outcome(ruleset, "/free/..%2Fposts/x", "POST") == AMBIGUOUS
    assert outcome(ruleset, "/posts/x", "POST") == "posts"


@pytest.mark.parametrize(
    "path",
    [
        "/priced/secret.txt",
        "/feed.xml",
        "//a///b/",
        "/",
        "/a/b.c/.d/",
        "/free/open.txt?q=1",
        "*",
        "/café/x",
        "/posts/x",
    ],
)
def test_the_fast_path_is_the_strict_reading(ruleset: RuleSet, path: str) -> None:
    strict = normalize_path(path)
    expected = next((r for r in ruleset.rules if r.matches("h", strict, "POST")), None)
    assert ruleset.match("h", path, "POST") is expected
    assert path_forms(path) == (strict,)


def test_refusals_say_what_the_readings_are(ruleset: RuleSet) -> None:
    with pytest.raises(AmbiguousPath) as refused:
        ruleset.match("h", "/cheap/..%2Fpriced/x", "GET")
    message = str(refused.value)
    assert message.startswith("ambiguous request path: ")
    assert "/cheap/..%2Fpriced/x (service 'cheap')" in message
    assert "/priced/x (service 'priced')" in message
    assert "\n" not in message
    with pytest.raises(MalformedPath, match=r"^malformed request path: .*overlong"):
        ruleset.match("h", "/%C0%AF", "GET")
    assert issubclass(AmbiguousPath, PathError) and issubclass(MalformedPath, PathError)


@pytest.mark.parametrize(
    ("path", "included"),
    [
        ("/a/..;/b", "/b"),  # ';params' dropped
        ("/a;x/b", "/a/b"),
        ("/a\\..\\b", "/b"),  # '\' as '/'
        ("/a%5C..%5Cb", "/b"),
        ("/a%2F..%2Fb", "/b"),  # decoded once
        ("/a%252F..%252Fb", "/b"),  # decoded twice
        ("/a%252Fb", "/a%252Fb"),  # the strict form keeps it
        ("/a/../b", "/a/../b"),  # dot segments left alone (Werkzeug routes them so)
        ("/a//../b", "/a/b"),  # RFC 3986 resolution keeps the empty segment `..` removes
        ("/a%20b/%3F", "/a%20b/%3F"),  # decoded text is escaped back canonically
        ("/a%21b", "/a!b"),
    ],
)
def test_path_forms_cover_each_reading(path: str, included: str) -> None:
    assert included in path_forms(path)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("/caf%C3%A9", "/café"),
        ("/caf%c3%a9/%41", "/café/A"),
        ("/%E2%82%AC%2F", "/€%2F"),
        ("/%C0%AF", "/%C0%AF"),  # not UTF-8: kept escaped
        ("/%C2%85x", "/%C2%85x"),  # a C1 control: kept escaped
        ("/%ED%A0%80", "/%ED%A0%80"),
        ("/a%25C3%25A9", "/a%25C3%25A9"),
    ],
)
def test_normalize_path_decodes_utf8_text(raw: str, normalised: str) -> None:
    assert normalize_path(raw) == normalised


def test_a_non_ascii_rule_covers_what_browsers_send(ruleset: RuleSet) -> None:
    # Browsers always send `/caf%C3%A9`; before, only raw UTF-8 fell under a `/café/*` rule.
    cafe = next(rule for rule in ruleset.rules if rule.name == "cafe")
    assert ruleset.match("h", "/caf%C3%A9/menu", "GET") is cafe


def test_a_rewritten_path_goes_out_as_ascii(ruleset: RuleSet) -> None:
    moved = next(rule for rule in ruleset.rules if rule.name == "moved")
    assert moved.paid.apply_path("/moved/caf%C3%A9?q=é") == "/paid/deeper/caf%C3%A9?q=é"
    assert moved.paid.apply_path("/moved/a%2Fb") == "/paid/deeper/a%2Fb"


def test_a_rewrite_that_readings_would_send_elsewhere_is_refused(ruleset: RuleSet) -> None:
    # Every reading stays under /moved/, but the rewrite adds a level: an origin that decodes
    # `%2F` and resolves `..` would take the rewritten path to /moved/y, not /paid/deeper/y.
    assert normalize_path("/moved/x/../../../moved/y") == "/moved/y"
    with pytest.raises(AmbiguousPath, match="paid variant of service 'moved'"):
        ruleset.match("h", "/moved/x%2F..%2F..%2F..%2Fmoved%2Fy", "GET")
    # Encoded slashes that only name a file in the paid place keep working.
    assert outcome(ruleset, "/moved/a%2Fb") == "moved"


# -- the return path of the pay page ---------------------------------------------------------


@pytest.mark.parametrize("value", ["/%2F%2Fevil.example/", "/%252F%252Fevil.example", "/%5Cevil"])
def test_encoded_other_sites_are_no_return_path(value: str) -> None:
    assert paywall.safe_local_path(value) is None


@pytest.mark.parametrize("value", ["/x%00", "/x%zz", "/%C0%AF", "/x%0d%0aSet-Cookie:%20a=b"])
def test_paths_the_proxy_refuses_are_no_return_path(value: str) -> None:
    assert paywall.safe_local_path(value) is None


@pytest.mark.parametrize("value", ["/caf%C3%A9", "/a%2Fb", "/bonus/x.mp3?t=%2F%2F", "/a%20b"])
def test_encoded_local_paths_stay_return_paths(value: str) -> None:
    assert paywall.safe_local_path(value) == value


# -- the server addon ------------------------------------------------------------------------


class InvoiceCounter(CountingBackend):
    def __init__(self, real: object) -> None:
        super().__init__(real)  # type: ignore[arg-type]
        self.invoices = 0

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        self.invoices += 1
        return await super().create_invoice(amount_sat, memo, expiry)


@pytest.fixture
async def addon(tmp_path: Path) -> AsyncIterator[L402Server]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    async with server_on(tmp_path, rules, InvoiceCounter) as server:
        yield server


def invoices(addon: L402Server) -> int:
    assert isinstance(addon.backend, InvoiceCounter)
    return addon.backend.invoices


@pytest.mark.parametrize(
    ("path", "start"),
    [
        ("/free/..%2Fpriced/secret.txt", b"ambiguous request path: "),
        ("/free/%C0%AF", b"malformed request path: "),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_refused_paths_get_400_and_no_invoice(
    addon: L402Server, path: str, start: bytes, method: str
) -> None:
    flow = flow_for(path, Accept_Authenticate="L402")
    flow.request.method = method
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert flow.response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert flow.response.headers["Cache-Control"] == "no-store"
    assert "WWW-Authenticate" not in flow.response.headers
    if method == "GET":
        assert flow.response.content.startswith(start)  # type: ignore[union-attr]
        assert flow.response.content.count(b"\n") == 1  # type: ignore[union-attr]
    else:
        assert flow.response.content == b""
    assert flow.metadata["l402"]["variant"] == "refused"
    assert invoices(addon) == 0


async def test_pay_page_refuses_an_ambiguous_target(addon: L402Server) -> None:
    flow = flow_for(f"/.l402/pay?{urlencode({'path': '/cheap/..%2Fpriced/x'})}")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert "WWW-Authenticate" not in flow.response.headers
    assert invoices(addon) == 0
    plain = flow_for(f"/.l402/pay?{urlencode({'path': '/priced/x'})}")
    await addon.request(plain)
    assert plain.response is not None and plain.response.status_code == 402


@pytest.mark.parametrize("path", ["/elsewhere", "/open/x"])
async def test_our_authorization_never_goes_to_the_origin(addon: L402Server, path: str) -> None:
    flow = flow_for(path)
    flow.request.headers.fields = (
        *flow.request.headers.fields,
        (b"Authorization", b"Basic dXNlcjpwdw=="),
        (b"authorization", b"lsat m:p"),
        (b"AUTHORIZATION", b"L402 m:p"),
    )
    await addon.request(flow)
    assert flow.response is None
    assert flow.request.headers.get_all("Authorization") == ["Basic dXNlcjpwdw=="]


@pytest.mark.parametrize(
    ("value", "ours"),
    [
        (b"L402 m:p", True),
        (b"lsat m", True),
        (b"  LsAt\tm", True),
        (b"L402", True),
        (b"L402x m", False),
        (b"Basic L402", False),
        (b"Bearer lsat", False),
        (b"", False),
    ],
)
def test_our_schemes_in_any_case(value: bytes, ours: bool) -> None:
    assert is_our_authorization(value) is ours
    headers = http.Headers([(b"Authorization", value), (b"X-Other", b"1")])
    drop_our_authorization(headers)
    assert headers.get_all("Authorization") == ([] if ours else [value.decode()])
    assert headers["X-Other"] == "1"
