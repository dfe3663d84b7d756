"""Odd input to the proxy's own endpoints: always an answer below 500, never a logged exception.

Strangers reach /.l402/unlock and /.l402/pay with whatever bytes they like: non-ASCII, latin-1 or
invalid UTF-8 cookies, bodies and query values, wrong content types, JSON of the wrong shape,
huge bodies. Each case runs through the addon in-process, as mitmproxy would call it.
"""

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mitmproxy import http

from l402proxy import paywall
from l402proxy.doors.mitmproxy import L402Server

from .test_server_addon import RULES, challenge, claim_for, flow_for, server_on

LONG = 70_000  # larger than every limit of ours (16 KiB bodies, credentials and paths)


@pytest.fixture
async def addon(tmp_path: Path) -> AsyncIterator[L402Server]:
    async with server_on(tmp_path, RULES) as server:
        yield server
        # Everything written now (a read waits for a flush under way), so that done() cannot
        # cancel the background flush in the middle of its transaction: a shutdown race of the
        # store, reported separately, that would fail the teardown.
        assert server.store is not None
        await server.store.list_tokens(limit=1)


@pytest.fixture(autouse=True)
def no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on any ERROR record or logged exception (mitmproxy logs an addon's crash so) while
    the requests are handled (the store's shutdown is not what these tests are about)."""
    caplog.set_level(logging.INFO)
    yield
    records = caplog.get_records("call")
    bad = [r for r in records if r.levelno >= logging.ERROR or r.exc_info is not None]
    assert not bad, [r.getMessage() for r in bad]


def raw_flow(
    method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> http.HTTPFlow:
    """A flow with exactly these bytes: mitmproxy keeps header fields and the path as bytes."""
    flow = flow_for("/")
    flow.request.method = method
    flow.request.data.path = path
    flow.request.headers = http.Headers(headers)
    flow.request.content = body
    return flow


async def answer(addon: L402Server, flow: http.HTTPFlow, case: str) -> http.Response:
    await addon.request(flow)
    assert flow.response is not None, f"{case}: an endpoint request must be answered by the proxy"
    assert flow.response.status_code < 500, (case, flow.response.status_code, flow.response.text)
    return flow.response


JSON = (b"content-type", b"application/json")
FORM = b"application/x-www-form-urlencoded"
FULLWIDTH_HEX = "\uff10" * 64 + '"}'  # digits str.isdigit() takes and hex does not
NESTED = b"[" * 100_000 + b"]" * 100_000

UNLOCK_BODIES: list[tuple[str, bytes, list[tuple[bytes, bytes]]]] = [
    ("empty", b"", [JSON]),
    ("no content type", b'{"macaroon": "AgE="}', []),
    ("text/plain", b'{"macaroon": "AgE="}', [(b"content-type", b"text/plain")]),
    ("form", b"macaroon=AgE%3D&preimage=00", [(b"content-type", FORM)]),
    ("multipart", b"--x\r\n\r\n--x--", [(b"content-type", b"multipart/form-data; boundary=x")]),
    ("non-ASCII content type", b"{}", [(b"content-type", "application/json; é".encode())]),
    ("latin-1 content type", b"{}", [(b"content-type", b"application/json; charset=\xe9")]),
    ("invalid UTF-8 content type", b"{}", [(b"content-type", b"application/\xff\xfejson")]),
    ("not JSON", b"macaroon", [JSON]),
    ("invalid UTF-8", b'{"macaroon": "\xff\xfe"}', [JSON]),
    ("latin-1", b'{"macaroon": "caf\xe9"}', [JSON]),
    ("UTF-16", '{"macaroon": "AgE="}'.encode("utf-16"), [JSON]),
    ("BOM", b'\xef\xbb\xbf{"macaroon": "AgE="}', [JSON]),
    ("array", b"[1, 2]", [JSON]),
    ("number", b"42", [JSON]),
    ("string", b'"AgE="', [JSON]),
    ("null", b"null", [JSON]),
    ("NaN", b'{"macaroon": NaN}', [JSON]),
    ("huge exponent", b'{"macaroon": 1e999999}', [JSON]),
    ("huge integer", b'{"macaroon": ' + b"9" * 5000 + b"}", [JSON]),
    ("deep nesting", NESTED[:16_000], [JSON]),
    ("macaroon number", b'{"macaroon": 5}', [JSON]),
    ("macaroon list", b'{"macaroon": ["AgE="]}', [JSON]),
    ("macaroon object", b'{"macaroon": {"a": 1}}', [JSON]),
    ("macaroon empty", b'{"macaroon": "  "}', [JSON]),
    ("macaroon non-ASCII", '{"macaroon": "é€😀"}'.encode(), [JSON]),
    ("macaroon lone surrogate", b'{"macaroon": "\\ud800"}', [JSON]),
    ("macaroon NUL", b'{"macaroon": "Ag\\u0000E="}', [JSON]),
    ("macaroon not base64", b'{"macaroon": "!!!!"}', [JSON]),
    ("macaroon truncated", b'{"macaroon": "AgEEbHNh"}', [JSON]),
    ("macaroon long", b'{"macaroon": "' + b"A" * 16_000 + b'"}', [JSON]),
    ("preimage number", b'{"macaroon": "AgE=", "preimage": 7}', [JSON]),
    ("preimage short", b'{"macaroon": "AgE=", "preimage": "00"}', [JSON]),
    ("preimage non-ASCII", '{"macaroon": "AgE=", "preimage": "é"}'.encode(), [JSON]),
    ("preimage fullwidth", ('{"macaroon": "AgE=", "preimage": "' + FULLWIDTH_HEX).encode(), [JSON]),
    ("too large", b'{"macaroon": "' + b"A" * LONG + b'"}', [JSON]),
    ("deep nesting, too large", NESTED, [JSON]),
]  # fmt: skip


async def test_odd_unlock_bodies_get_a_json_4xx(addon: L402Server) -> None:
    for case, body, headers in UNLOCK_BODIES:
        response = await answer(addon, raw_flow("POST", b"/.l402/unlock", headers, body), case)
        assert 400 <= response.status_code < 500, case
        assert response.headers["Content-Type"] == "application/json", case
        json.loads(response.content)  # the page reads every answer as JSON


ODD_COOKIE_VALUES = [
    ("non-ASCII", "é€😀".encode()),
    ("latin-1", b"caf\xe9"),
    ("invalid UTF-8", b"\xff\xfe\xc3\x28"),
    ("NUL and controls", b"a\x00b\x01\x7f"),
    ("quotes", b'"abc'),
    ("empty", b""),
    ("long", b"a" * LONG),
]


async def test_odd_claim_cookies_are_no_claim(addon: L402Server) -> None:
    macaroon, _ = await challenge(addon)
    name = claim_for(addon, macaroon).split("=", 1)[0].encode()
    body = json.dumps({"macaroon": macaroon}).encode()
    for case, value in ODD_COOKIE_VALUES:
        for cookie in (
            name + b"=" + value,  # the right name, an odd value: the non-ASCII case was a 503
            value + b"=" + value,
            value,
            b"a=1; " + name + b"=" + value + b"; " + value,
        ):
            flow = raw_flow("POST", b"/.l402/unlock", [JSON, (b"cookie", cookie)], body)
            response = await answer(addon, flow, case)
            assert response.status_code == 403, case
            assert json.loads(response.content)["error"] == "not_this_browser", case


ODD_HEADERS: list[tuple[str, tuple[bytes, bytes]]] = [
    ("Sec-Fetch-Site non-ASCII", (b"sec-fetch-site", "crôss-site".encode())),
    ("Sec-Fetch-Site invalid UTF-8", (b"sec-fetch-site", b"\xff")),
    ("Accept non-ASCII", (b"accept", "text/html;q=é".encode())),
    ("Accept odd q", (b"accept", b"text/html;q=nan, application/json;q=1e999, */*;q=-1")),
    ("Accept invalid UTF-8", (b"accept", b"text/\xffhtml")),
    ("Authorization odd", (b"authorization", b"L402 \xff\xfe:" + b"0" * 64)),
    ("Authorization long", (b"authorization", b"L402 " + b"A" * LONG + b":" + b"0" * 64)),
]


async def test_odd_headers_on_both_endpoints(addon: L402Server) -> None:
    body = json.dumps({"macaroon": "AgE="}).encode()
    for case, header in ODD_HEADERS:
        await answer(addon, raw_flow("POST", b"/.l402/unlock", [JSON, header], body), case)
        await answer(addon, raw_flow("GET", b"/.l402/pay?path=/bonus/x", [header], b""), case)


ODD_PAY_QUERIES = [
    ("none", b"/.l402/pay"),
    ("empty", b"/.l402/pay?path="),
    ("no value", b"/.l402/pay?path"),
    ("non-ASCII", "/.l402/pay?path=/bonus/é€😀".encode()),
    ("raw latin-1", b"/.l402/pay?path=/bonus/caf\xe9"),
    ("raw invalid UTF-8", b"/.l402/pay?path=/bonus/\xff\xfe"),
    ("encoded invalid UTF-8", b"/.l402/pay?path=/bonus/%ff%fe%c3%28"),
    ("encoded NUL", b"/.l402/pay?path=/bonus/%00x"),
    ("bad escape", b"/.l402/pay?path=/bonus/%zz&return=%"),
    ("other site", b"/.l402/pay?path=//evil.example/bonus/x"),
    ("backslash", b"/.l402/pay?path=/%5C%5Cevil/bonus/x"),
    ("scheme", b"/.l402/pay?path=javascript:alert(1)"),
    ("twice", b"/.l402/pay?path=/bonus/a&path=/bonus/b&return=/x&return=/y"),
    ("odd return", b"/.l402/pay?path=/bonus/x.mp3&return=%ff%00//evil"),
    ("long", b"/.l402/pay?path=/bonus/" + b"a" * LONG),
    ("many parameters", b"/.l402/pay?" + b"&".join(b"p%d=1" % i for i in range(5000))),
    ("odd endpoint", b"/.l402/%ff%fe"),
    ("odd endpoint, raw", b"/.l402/\xff\xfe"),
]


async def test_odd_pay_queries_get_an_answer_below_500(addon: L402Server) -> None:
    for case, path in ODD_PAY_QUERIES:
        for method in ("GET", "HEAD", "POST"):
            await answer(addon, raw_flow(method, path, [(b"accept", b"text/html")], b""), case)


async def test_odd_credential_cookies_on_the_pay_page(addon: L402Server) -> None:
    for case, value in ODD_COOKIE_VALUES:
        for cookie in (b"L402_bonus=" + value, b"L402_bonus=" + value + b":" + b"0" * 64):
            headers = [(b"cookie", cookie), (b"accept", b"text/html")]
            flow = raw_flow("GET", b"/.l402/pay?path=/bonus/x.mp3", headers, b"")
            response = await answer(addon, flow, case)
            assert response.status_code == 402, case  # not a credential: the page to pay from


async def test_odd_credentials_on_a_priced_path(addon: L402Server) -> None:
    """The same class of input on a priced path: a challenge, never a 5xx."""
    for case, value in ODD_COOKIE_VALUES:
        for header in (
            (b"cookie", b"L402_bonus=" + value),
            (b"cookie", b"L402_bonus=" + value + b":" + b"0" * 64),
            (b"authorization", b"L402 " + value),
            (b"authorization", b"LSAT " + value + b":" + b"0" * 64),
        ):
            flow = raw_flow("GET", b"/bonus/x.mp3", [header], b"")
            await addon.request(flow)
            assert flow.response is not None, case
            # A NUL (or a line break) in any header field is refused before anything else.
            expected = (400,) if b"\x00" in value else (401, 402)
            assert flow.response.status_code in expected, (case, header[0])


async def test_other_methods_on_unlock_get_405(addon: L402Server) -> None:
    for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "X-ODD"):
        response = await answer(addon, raw_flow(method, b"/.l402/unlock", [JSON], b"{}"), method)
        assert response.status_code == 405, method


def test_a_claim_compares_any_text_without_raising() -> None:
    secret, token_id = b"s" * 32, bytes(32)
    name = paywall.claim_cookie(secret, token_id, max_age=1, secure=False).split("=", 1)[0]
    for odd in ("é", "\udcff", "\ud800", "\x00", "😀" * 100):
        assert not paywall.holds_claim([f"{name}={odd}"], secret, token_id)
    right = paywall.claim_value(secret, token_id)
    assert paywall.holds_claim([f"a=é; {name}={right}"], secret, token_id)
