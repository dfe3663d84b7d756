"""The request line and Host the paywall judges are the ones the origin routes by; no upgrade
turns the connection into a tunnel past it (see tests/e2e/test_redteam_regressions.py)."""

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from l402proxy.doors.mitmproxy import L402Server, WatchedHeaders, check_target, drop_upgrade


def request(
    *fields: tuple[bytes, bytes], authority: bytes = b"", version: bytes = b"HTTP/1.1"
) -> http.Request:
    req = tutils.treq(authority=authority, http_version=version)
    req.headers = http.Headers(fields)
    return req


def problem(req: http.Request, keep_host: bool = True) -> str | None:
    return check_target(req, WatchedHeaders.of(req.headers.fields).hosts, keep_host)


def test_origin_form_with_one_host_is_fine() -> None:
    assert problem(request((b"Host", b"paid.example"))) is None


def test_two_host_fields_are_refused() -> None:
    req = request((b"Host", b"other.example"), (b"Host", b"paid.example"))
    assert problem(req) == "Bad request: more than one Host header."


def test_absolute_form_naming_another_host_is_refused() -> None:
    req = request((b"Host", b"other.example"), authority=b"paid.example")
    assert problem(req) is not None


@pytest.mark.parametrize("keep_host", [True, False])
def test_absolute_form_that_agrees_is_forwarded_in_origin_form(keep_host: bool) -> None:
    req = request((b"Host", b"Paid.Example"), authority=b"paid.example")
    assert problem(req, keep_host) is None
    assert req.authority == ""


def test_without_keep_host_header_absolute_form_goes_out_in_origin_form() -> None:
    # Host already names the origin (mitmproxy rewrote it); the path is what is judged.
    req = request((b"Host", b"127.0.0.1:9000"), authority=b"paid.example")
    assert problem(req, keep_host=False) is None
    assert req.authority == ""


def test_http2_authority_and_a_different_host_field_are_refused() -> None:
    req = request((b"Host", b"other.example"), authority=b"paid.example", version=b"HTTP/2.0")
    assert problem(req) == "Bad request: the Host header and :authority name different hosts."
    req = request(authority=b"paid.example", version=b"HTTP/2.0")
    assert problem(req) is None and req.authority == "paid.example"


@pytest.mark.parametrize("upgrade", [b"h2c", b"H2C", b"websocket, h2c", b"TLS/1.2"])
def test_upgrades_to_anything_but_websocket_are_removed(upgrade: bytes) -> None:
    req = request(
        (b"Host", b"x"),
        (b"Connection", b"Upgrade, HTTP2-Settings, keep-alive"),
        (b"Upgrade", upgrade),
        (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA"),
    )
    assert WatchedHeaders.of(req.headers.fields).upgrade
    drop_upgrade(req.headers)
    assert "Upgrade" not in req.headers and "HTTP2-Settings" not in req.headers
    assert req.headers["Connection"] == "keep-alive"


def test_a_websocket_upgrade_stays() -> None:
    fields = ((b"Host", b"x"), (b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket"))
    req = request(*fields)
    drop_upgrade(req.headers)
    assert req.headers.fields == fields


def test_a_switch_to_another_protocol_is_killed() -> None:

    flow = tflow.tflow(resp=tutils.tresp(status_code=101, headers=http.Headers(Upgrade="h2c")))
    L402Server().responseheaders(flow)
    assert flow.error is not None and flow.error.msg == "Connection killed."
    ws = tflow.tflow(resp=tutils.tresp(status_code=101, headers=http.Headers(Upgrade="websocket")))
    L402Server().responseheaders(ws)
    assert ws.error is None
