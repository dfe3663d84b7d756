"""The server addon in-process, with mitmproxy's own test helpers (no sockets)."""

import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from l402proxy import gate, paywall
from l402proxy.doors.mitmproxy import L402Server, mark_variant
from l402proxy.l402.headers import parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import caveats_for, decode_macaroon, derive_root_key, mint
from l402proxy.launch import REPO
from l402proxy.lightning import DevLedger, InvoiceBackend
from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceNotFound,
    InvoiceState,
    LookupUnsupported,
    NodeInfo,
)

RULES = REPO / "rules" / "podcast.yaml"


@contextlib.asynccontextmanager
async def server_on(
    tmp_path: Path, rules: Path, wrap_backend: Callable[[Any], Any] | None = None
) -> AsyncIterator[L402Server]:
    """The server addon in a mitmproxy test context, `running()` done (started or not)."""
    server = L402Server()
    with taddons.context(server) as tctx:
        tctx.configure(
            server,
            l402_rules=str(rules),
            l402_store=str(tmp_path / "server.sqlite"),
            l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
        )
        if wrap_backend is not None:
            server.backend = wrap_backend(server.backend)
        await server.running()
        try:
            yield server
        finally:
            await server.done()


@pytest.fixture
async def addon(tmp_path: Path) -> AsyncIterator[L402Server]:
    async with server_on(tmp_path, RULES) as server:
        yield server


FREE_RULES = """
services:
  - name: bonus
    match: {path: "/bonus/*"}
    price_sat: 100
  - name: paused
    match: {path: "/free/*"}
    price_sat: 0
    mode: free
"""


@pytest.fixture
async def addon_with_free(tmp_path: Path) -> AsyncIterator[L402Server]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(FREE_RULES)
    async with server_on(tmp_path, rules) as server:
        yield server


def flow_for(path: str, **headers: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.client_conn.timestamp_tls_setup = None  # plain HTTP unless a test says otherwise
    flow.request.path = path
    for name, value in headers.items():
        flow.request.headers[name.replace("_", "-")] = value
    return flow


async def test_challenge_has_both_lines_lsat_first(addon: L402Server) -> None:
    flow = flow_for("/bonus/x.mp3")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    lines = flow.response.headers.get_all("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    assert flow.metadata["l402"]["variant"] == "challenge"


async def test_unexpected_error_on_a_priced_path_fails_closed(
    addon: L402Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> gate.Decision:
        raise RuntimeError("bug")

    monkeypatch.setattr(gate, "decide", broken)
    flow = flow_for("/bonus/x.mp3")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert flow.response.headers["Retry-After"].isdigit()

    unpriced = flow_for("/feed.xml")
    await addon.request(unpriced)
    assert unpriced.response is None  # unpriced traffic never touches the paywall


async def test_free_variant_is_marked_and_untouched(addon: L402Server) -> None:
    flow = flow_for("/episodes/ep1.mp3")
    await addon.request(flow)
    assert flow.response is None
    assert flow.request.path == "/episodes/ep1.mp3"
    assert flow.metadata["l402"] == {"service": "podcast", "variant": "free"}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_paid_files_are_not_found_without_the_rewrite(addon: L402Server, method: str) -> None:
    flow = flow_for("/adfree/ep1.mp3", Accept_Authenticate="L402")
    flow.request.method = method
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 404
    assert flow.response.headers["Cache-Control"] == "no-store"
    assert flow.response.content == (b"" if method == "HEAD" else b"Not found.\n")
    assert flow.metadata["l402"] == {"service": "adfree", "variant": "denied"}


async def test_bad_options_at_startup_log_one_line_and_fail_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = L402Server()
    broken = tmp_path / "rules.yaml"
    broken.write_text("services:\n  - name: a b\n    match: {path: /x}\n    price_sat: 1\n")
    with taddons.context(server) as tctx:
        tctx.configure(server, l402_rules=str(broken))
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "rules.yaml:2" in errors[0].getMessage()
        assert errors[0].exc_info is None
        flow = flow_for("/anything")
        await server.request(flow)
        assert flow.response is not None and flow.response.status_code == 503
        tctx.configure(server, l402_rules=str(RULES))  # fixed before the proxy runs
        again = flow_for("/anything")
        await server.request(again)
        assert again.response is None


async def test_bad_options_while_running_are_rejected(addon: L402Server, tmp_path: Path) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text("services:\n  - name: a b\n    match: {path: /x}\n    price_sat: 1\n")
    rules_before = addon.rules
    with pytest.raises(exceptions.OptionsError, match=r"rules\.yaml:2"):
        ctx.options.update(l402_rules=str(broken))
    with pytest.raises(exceptions.OptionsError, match="l402_backend"):
        ctx.options.update(l402_backend="carrier-pigeon://x")
    backend = addon.backend
    # A good backend is checked only at start: switching means a restart.
    with pytest.raises(exceptions.OptionsError, match="cannot change while running: restart"):
        ctx.options.update(l402_backend="dev:someone-else")
    assert addon.backend is backend and ctx.options.l402_backend == "dev"
    assert addon.rules == rules_before and not addon.misconfigured
    assert ctx.options.l402_rules == str(RULES)  # mitmproxy kept the previous value


# -- the paywall page, the unlock endpoint and the L402 cookie --------------------------------

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class CountingBackend:
    """The dev backend for invoices; lookups counted and, when told, failing."""

    name = "counting"

    def __init__(self, real: InvoiceBackend) -> None:
        self.real = real
        self.lookups = 0
        self.fail_with: Exception | None = None

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        return await self.real.create_invoice(amount_sat, memo, expiry)

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        self.lookups += 1
        if self.fail_with is not None:
            raise self.fail_with
        return await self.real.lookup_invoice(payment_hash)

    async def info(self) -> NodeInfo:
        return await self.real.info()

    async def close(self) -> None:
        await self.real.close()

    def describe(self) -> str:
        return "counting " + self.real.describe()


@pytest.fixture
async def counting(addon: L402Server) -> CountingBackend:
    assert addon.backend is not None
    backend = CountingBackend(addon.backend)
    addon.backend = backend  # type: ignore[assignment]
    return backend


@pytest.fixture
async def payer(tmp_path: Path) -> AsyncIterator[DevLedger]:
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    yield ledger
    await ledger.close()


async def challenge(
    addon: L402Server, path: str = "/bonus/x.mp3", **headers: str
) -> tuple[str, str]:
    """(macaroon, invoice) of a fresh challenge for `path`."""
    flow = flow_for(path, Accept_Authenticate="L402", **headers)
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    parsed = parse_challenges(flow.response.headers.get_all("WWW-Authenticate"))
    return parsed[0].macaroon, parsed[0].invoice


def challenge_of(response: http.Response) -> tuple[str, str]:
    parsed = parse_challenges(response.headers.get_all("WWW-Authenticate"))
    return parsed[0].macaroon, parsed[0].invoice


def unlock_flow(
    body: object, content_type: str = "application/json", **headers: str
) -> http.HTTPFlow:
    flow = flow_for("/.l402/unlock", Content_Type=content_type, **headers)
    flow.request.method = "POST"
    flow.request.content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return flow


def claim_for(addon: L402Server, macaroon: str) -> str:
    """The Cookie pair of the claim the paywall page gave the browser it was shown to."""
    identifier = Identifier.decode(decode_macaroon(macaroon).identifier_bytes)
    set_cookie = paywall.claim_cookie(addon.secret, identifier.token_id, max_age=1, secure=False)
    return set_cookie.split(";", 1)[0]


async def unlock(
    addon: L402Server, macaroon: str, preimage: bytes | None = None, *, claim: bool = True
) -> http.Response:
    """POST /.l402/unlock as the page does, from the browser the page was shown to (`claim`)."""
    headers = {"Cookie": claim_for(addon, macaroon)} if claim else {}
    flow = unlock_flow(
        {"macaroon": macaroon, "preimage": preimage.hex() if preimage else None}, **headers
    )
    await addon.request(flow)
    assert flow.response is not None
    return flow.response


def cookie_value(set_cookie: str) -> str:
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


async def bought_cookie(addon: L402Server, payer: DevLedger, path: str = "/bonus/x.mp3") -> str:
    macaroon, invoice = await challenge(addon, path)
    await payer.pay("listener", invoice, 0)
    response = await unlock(addon, macaroon)
    assert response.status_code == 200, response.text
    return response.headers.get_all("Set-Cookie")[0]


def expired_cookie(addon: L402Server, service: str = "bonus") -> str:
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for(service, valid_until=int(time.time()) - 10, capabilities=None)
    macaroon = mint(addon.root_key_for(identifier.token_id), identifier, caveats)
    return f"{macaroon}:{preimage.hex()}"


async def test_unpaid_invoice_answers_202_after_one_lookup(
    addon: L402Server, counting: CountingBackend
) -> None:
    macaroon, _ = await challenge(addon)
    response = await unlock(addon, macaroon)
    assert response.status_code == 202
    assert json.loads(response.content) == {"unlocked": False}
    assert counting.lookups == 1
    assert "Set-Cookie" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"


async def test_paid_invoice_unlocks_with_an_httponly_cookie_for_the_scope(
    addon: L402Server, counting: CountingBackend, payer: DevLedger
) -> None:
    macaroon, invoice = await challenge(addon)
    paid = await payer.pay("listener", invoice, 0)
    before = time.time()
    response = await unlock(addon, macaroon)
    assert response.status_code == 200, response.text
    body = json.loads(response.content)
    assert body["unlocked"] is True and body["service"] == "bonus"
    # bonus: valid_for 7d, invoice_expiry default 600 s, counted from the invoice's expiry.
    assert before + 7 * 86400 <= body["expires_at"] <= time.time() + 7 * 86400 + 601
    cookie, for_our_pages, claim_cleared = response.headers.get_all("Set-Cookie")
    name_value, *attributes = cookie.split("; ")
    assert name_value == f"L402_bonus={macaroon}:{paid.preimage.hex()}"
    assert "Path=/bonus/" in attributes and "HttpOnly" in attributes
    assert "SameSite=Lax" in attributes and "Secure" not in attributes
    max_age = int(next(a for a in attributes if a.startswith("Max-Age=")).split("=")[1])
    assert abs(max_age - (body["expires_at"] - before)) <= 2
    assert for_our_pages == cookie.replace("Path=/bonus/", "Path=/.l402/")
    assert claim_cleared.startswith("L402claim.") and "Max-Age=0" in claim_cleared
    assert paid.preimage.hex() not in response.text  # the credential lives in the cookie only
    assert counting.lookups == 1


async def test_cookie_is_secure_when_the_browser_came_over_https(
    addon: L402Server, payer: DevLedger
) -> None:
    macaroon, invoice = await challenge(addon)
    await payer.pay("listener", invoice, 0)
    flow = unlock_flow({"macaroon": macaroon}, Cookie=claim_for(addon, macaroon))
    flow.client_conn.timestamp_tls_setup = time.time()  # the browser came over TLS
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 200
    cookies = flow.response.headers.get_all("Set-Cookie")
    assert len(cookies) == 3 and all(cookie.endswith("; Secure") for cookie in cookies)


async def test_webln_preimage_unlocks_without_asking_the_backend(
    addon: L402Server, counting: CountingBackend, payer: DevLedger
) -> None:
    macaroon, invoice = await challenge(addon)
    paid = await payer.pay("listener", invoice, 0)
    wrong = await unlock(addon, macaroon, os.urandom(32))
    assert wrong.status_code == 401
    assert json.loads(wrong.content)["reason"] == "preimage_mismatch"
    # The preimage is the proof: no claim cookie needed (a WebLN wallet, another browser).
    right = await unlock(addon, macaroon, paid.preimage, claim=False)
    assert right.status_code == 200
    assert right.headers.get_all("Set-Cookie")[0].startswith(
        f"L402_bonus={macaroon}:{paid.preimage.hex()};"
    )
    assert counting.lookups == 0


async def test_the_page_gives_its_browser_a_claim_and_only_it_unlocks_without_the_preimage(
    addon: L402Server, counting: CountingBackend, payer: DevLedger
) -> None:
    flow = flow_for("/bonus/x.mp3", Accept=BROWSER_ACCEPT)
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    (claim,) = [c for c in flow.response.headers.get_all("Set-Cookie") if "L402claim." in c]
    name_value, *attributes = claim.split("; ")
    assert "Path=/.l402/unlock" in attributes and "HttpOnly" in attributes
    assert "SameSite=Strict" in attributes
    max_age = int(next(a for a in attributes if a.startswith("Max-Age=")).split("=")[1])
    assert 600 <= max_age <= 600 + paywall.CLAIM_GRACE_SECONDS  # the invoice's life, and a bit
    macaroon, invoice = challenge_of(flow.response)
    assert name_value == claim_for(addon, macaroon)
    await payer.pay("listener", invoice, 0)

    # Someone else who read the macaroon (it is in every 402) gets nothing, and costs no lookup.
    stranger = await unlock(addon, macaroon, claim=False)
    assert stranger.status_code == 403
    assert json.loads(stranger.content)["error"] == "not_this_browser"
    assert "Set-Cookie" not in stranger.headers
    wrong_claim = unlock_flow({"macaroon": macaroon}, Cookie=name_value[:-4] + "0000")
    await addon.request(wrong_claim)
    assert wrong_claim.response is not None and wrong_claim.response.status_code == 403
    assert counting.lookups == 0

    browser = await unlock(addon, macaroon)
    assert browser.status_code == 200 and counting.lookups == 1


async def test_api_clients_get_no_claim_cookie(addon: L402Server) -> None:
    flow = flow_for("/bonus/x.mp3", Accept_Authenticate="L402")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert "Set-Cookie" not in flow.response.headers


@pytest.mark.parametrize("forge", ["tampered", "foreign"])
async def test_forged_or_foreign_macaroon_gets_401_without_a_backend_call(
    addon: L402Server, counting: CountingBackend, forge: str
) -> None:
    macaroon, _ = await challenge(addon)
    if forge == "tampered":
        raw = bytearray(base64.b64decode(macaroon))
        raw[-1] ^= 1
        macaroon = base64.b64encode(bytes(raw)).decode()
    else:
        identifier = Identifier.new(os.urandom(32))
        key = derive_root_key(b"another server" * 3, identifier.token_id)
        macaroon = mint(key, identifier, caveats_for("bonus", valid_until=None, capabilities=None))
    for preimage in (None, os.urandom(32)):
        response = await unlock(addon, macaroon, preimage)
        assert response.status_code == 401
        assert json.loads(response.content)["error"] == "invalid_token"
    assert counting.lookups == 0


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (LookupUnsupported("a Lightning Address cannot look invoices up"), 501),
        (BackendUnavailable("lnd at 127.0.0.1:10009: connection refused"), 503),
        (InvoiceNotFound("no such invoice"), 404),
    ],
)
async def test_backend_answers_become_page_messages(
    addon: L402Server, counting: CountingBackend, failure: Exception, status: int
) -> None:
    macaroon, _ = await challenge(addon)
    counting.fail_with = failure
    response = await unlock(addon, macaroon)
    assert response.status_code == status
    body = json.loads(response.content)
    assert body["message"]
    if status == 501:
        assert "WebLN" in body["message"]
    if status == 503:
        assert response.headers["Retry-After"].isdigit()
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"not json", "application/json", 400),
        ({"macaroon": 1}, "application/json", 400),
        ({"macaroon": "AgE", "preimage": "xyz"}, "application/json", 400),
        ({"macaroon": "AgE"}, "application/x-www-form-urlencoded", 400),
        (b'{"macaroon": "' + b"A" * 17000 + b'"}', "application/json", 413),
    ],
)
async def test_bad_unlock_bodies_are_refused_without_a_backend_call(
    addon: L402Server, counting: CountingBackend, body: object, content_type: str, status: int
) -> None:
    flow = unlock_flow(body, content_type)
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == status
    assert json.loads(flow.response.content)["error"] == "bad_request"
    assert counting.lookups == 0


async def test_unlock_only_takes_same_site_posts(addon: L402Server) -> None:
    macaroon, _ = await challenge(addon)
    get = flow_for("/.l402/unlock")
    await addon.request(get)
    assert get.response is not None and get.response.status_code == 405
    assert get.response.headers["Allow"] == "POST"
    cross = unlock_flow({"macaroon": macaroon}, Sec_Fetch_Site="cross-site")
    await addon.request(cross)
    assert cross.response is not None and cross.response.status_code == 403


async def test_endpoints_are_answered_by_the_proxy_however_spelled(addon: L402Server) -> None:
    for path in ("/.l402/nothing", "/%2El402/unlock", "//.l402/pay?path=/feed.xml"):
        flow = flow_for(path)
        await addon.request(flow)
        assert flow.response is not None, path  # never forwarded to the origin
        assert flow.response.status_code in (404, 405), path


async def test_cookie_is_accepted_like_authorization_and_never_reaches_the_origin(
    addon: L402Server, payer: DevLedger
) -> None:
    value = cookie_value(await bought_cookie(addon, payer))
    flow = flow_for(
        "/bonus/x.mp3",
        Cookie=f"theme=dark;  L402_bonus={value}; sid=a%3Db",
        Authorization="Basic dXNlcjpwdw==",
    )
    await addon.request(flow)
    assert flow.response is None  # forwarded: paid
    assert flow.metadata["l402"]["variant"] == "paid"
    assert flow.metadata["l402"]["credential"] == "cookie"
    assert flow.request.headers.get_all("Cookie") == ["theme=dark; sid=a%3Db"]
    # The origin's own Authorization stays: the credential came from the cookie.
    assert flow.request.headers["Authorization"] == "Basic dXNlcjpwdw=="

    as_header = flow_for("/bonus/y.mp3", Authorization=f"L402 {value}")
    await addon.request(as_header)
    assert as_header.response is None and as_header.metadata["l402"]["variant"] == "paid"
    assert "Authorization" not in as_header.request.headers


async def test_cookie_unlocks_upgrade_mode_paid_variant(
    addon: L402Server, payer: DevLedger
) -> None:
    value = cookie_value(await bought_cookie(addon, payer, "/episodes/ep1.mp3"))
    flow = flow_for("/episodes/ep1.mp3", Cookie=f"L402_podcast={value}", Accept=BROWSER_ACCEPT)
    await addon.request(flow)
    assert flow.response is None
    assert flow.request.path == "/adfree/ep1.mp3"
    assert "Cookie" not in flow.request.headers


async def test_our_cookies_are_stripped_on_unpriced_paths_too(addon: L402Server) -> None:
    flow = flow_for("/feed.xml", Cookie="L402_bonus=m:p; a=1")
    await addon.request(flow)
    assert flow.response is None and flow.request.headers["Cookie"] == "a=1"
    only = flow_for("/feed.xml", Cookie="L402_podcast=m:p")
    await addon.request(only)
    assert "Cookie" not in only.request.headers
    untouched = flow_for("/feed.xml", Cookie="a=1;b=2")
    await addon.request(untouched)
    assert untouched.request.headers["Cookie"] == "a=1;b=2"


async def test_authorization_header_wins_over_the_cookie(
    addon: L402Server, payer: DevLedger
) -> None:
    value = cookie_value(await bought_cookie(addon, payer))
    flow = flow_for(
        "/bonus/x.mp3",
        Cookie=f"L402_bonus={value}",
        Authorization=f"L402 {value.split(':')[0]}:{os.urandom(32).hex()}",
    )
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 401


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda addon: "garbage", 401),
        (lambda addon: f"{expired_cookie(addon).split(':')[0]}:{os.urandom(32).hex()}", 401),
        (expired_cookie, 402),
    ],
)
async def test_invalid_or_expired_cookie_gets_the_page_and_is_cleared(
    addon: L402Server, make: object, status: int
) -> None:
    cookie = make(addon)  # type: ignore[operator]
    flow = flow_for("/bonus/x.mp3", Cookie=f"L402_bonus={cookie}", Accept=BROWSER_ACCEPT)
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == status
    assert flow.response.headers["Content-Type"] == "text/html; charset=utf-8"
    cleared, cleared_for_our_pages, claim = flow.response.headers.get_all("Set-Cookie")
    assert cleared == "L402_bonus=; Path=/bonus/; Max-Age=0; HttpOnly; SameSite=Lax"
    assert cleared_for_our_pages == cleared.replace("Path=/bonus/", "Path=/.l402/")
    assert claim.startswith("L402claim.")  # the page's fresh invoice
    assert len(flow.response.headers.get_all("WWW-Authenticate")) == 2


async def test_stale_cookie_in_upgrade_mode_gets_the_free_variant_and_is_cleared(
    addon: L402Server,
) -> None:
    flow = flow_for("/episodes/ep1.mp3", Cookie=f"L402_podcast={expired_cookie(addon, 'podcast')}")
    await addon.request(flow)
    assert flow.response is None and flow.request.path == "/episodes/ep1.mp3"
    flow.response = tutils.tresp(content=b"AD-SUPPORTED", headers=http.Headers())
    addon.response(flow)
    assert [
        cookie.split(" Max-Age")[0] for cookie in flow.response.headers.get_all("Set-Cookie")
    ] == [
        "L402_podcast=; Path=/episodes/;",
        "L402_podcast=; Path=/.l402/;",
    ]


async def test_revoked_token_cookie_is_refused(addon: L402Server, payer: DevLedger) -> None:
    value = cookie_value(await bought_cookie(addon, payer))
    macaroon = value.split(":")[0]
    identifier, _ = paywall.verify_signature(macaroon, addon.root_key_for)
    addon.revoked = addon.revoked | {identifier.token_id}
    flow = flow_for("/bonus/x.mp3", Cookie=f"L402_bonus={value}")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert json.loads(flow.response.content)["reason"] == "revoked"
    again = await unlock(addon, macaroon)
    assert again.status_code == 403


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (None, "application/json"),
        ("application/json", "application/json"),
        ("*/*", "application/json"),
        ("text/plain", "text/plain; charset=utf-8"),
        (BROWSER_ACCEPT, "text/html; charset=utf-8"),
    ],
)
async def test_402_body_follows_accept(
    addon: L402Server, accept: str | None, content_type: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    flow = flow_for("/bonus/x.mp3", **headers)
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert flow.response.headers["Content-Type"] == content_type
    assert flow.response.headers["Cache-Control"] == "no-store"
    lines = flow.response.headers.get_all("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    invoice = parse_challenges(lines)[0].invoice
    if content_type == "application/json":
        assert json.loads(flow.response.content)["invoice"] == invoice
    else:
        assert invoice in flow.response.text


async def test_html_page_for_head_has_no_body(addon: L402Server) -> None:
    flow = flow_for("/bonus/x.mp3", Accept=BROWSER_ACCEPT)
    flow.request.method = "HEAD"
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert flow.response.content == b""
    assert int(flow.response.headers["Content-Length"]) > 1000
    assert flow.response.headers["Content-Type"].startswith("text/html")


async def test_pay_page_for_head_keeps_the_length_a_get_would_get(addon: L402Server) -> None:
    flow = flow_for("/.l402/pay?path=/episodes/ep1.mp3")
    flow.request.method = "HEAD"
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert flow.response.content == b""
    assert int(flow.response.headers["Content-Length"]) > 1000


async def test_pay_endpoint_serves_a_fresh_page_for_a_priced_path(addon: L402Server) -> None:
    flow = flow_for("/.l402/pay?path=/episodes/ep1.mp3&return=/episodes/ep1.mp3%3Ft%3D1")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert flow.response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "frame-ancestors 'none'" in flow.response.headers["Content-Security-Policy"]
    data = json.loads(
        flow.response.text.split('id="l402-data">')[1].split("</script>")[0]  # type: ignore[union-attr]
    )
    assert data["return_to"] == "/episodes/ep1.mp3?t=1"
    invoice = parse_challenges(flow.response.headers.get_all("WWW-Authenticate"))[0].invoice
    assert data["bolt11"] == invoice


@pytest.mark.parametrize("bad_return", ["//evil.example/", "https://evil.example/", "/\\evil"])
async def test_pay_endpoint_ignores_a_return_to_another_site(
    addon: L402Server, bad_return: str
) -> None:
    flow = flow_for(f"/.l402/pay?{urlencode({'path': '/bonus/b1.mp3', 'return': bad_return})}")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    assert '"return_to":"/bonus/b1.mp3"' in flow.response.text  # type: ignore[operator]


@pytest.mark.parametrize("path", ["/feed.xml", "/free/x", "", "https://evil.example/bonus/x"])
async def test_pay_endpoint_404s_without_a_priced_rule(
    addon_with_free: L402Server, path: str
) -> None:
    flow = flow_for(f"/.l402/pay?{urlencode({'path': path})}")
    await addon_with_free.request(flow)
    assert flow.response is not None and flow.response.status_code == 404
    assert "WWW-Authenticate" not in flow.response.headers


async def test_pay_endpoint_sends_a_paying_browser_straight_back(
    addon: L402Server, payer: DevLedger
) -> None:
    macaroon, invoice = await challenge(addon, "/episodes/ep1.mp3")
    await payer.pay("listener", invoice, 0)
    unlocked = await unlock(addon, macaroon)
    # What a browser sends to /.l402/pay: only the cookies whose Path covers it.
    sent = [c.split(";")[0] for c in unlocked.headers.get_all("Set-Cookie") if "Path=/.l402/;" in c]
    assert len(sent) == 1
    flow = flow_for("/.l402/pay?path=/episodes/ep1.mp3&return=/", Cookie=sent[0])
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 303
    assert flow.response.headers["Location"] == "/"


def html_response(body: bytes, **headers: str) -> http.Response:
    return http.Response.make(200, body, {"Content-Type": "text/html; charset=utf-8", **headers})


async def free_page_flow(addon: L402Server, accept: str = BROWSER_ACCEPT) -> http.HTTPFlow:
    flow = flow_for("/episodes/index.html", Accept=accept)
    await addon.request(flow)
    assert flow.response is None and flow.metadata["l402"]["variant"] == "free"
    return flow


async def test_upgrade_banner_is_offered_on_free_html_pages(addon: L402Server) -> None:
    flow = await free_page_flow(addon)
    flow.response = html_response(b"<html><body><h1>Episode</h1></body></html>")
    addon.response(flow)
    text = flow.response.text
    assert text is not None and text.startswith(
        '<html><body><h1>Episode</h1><div id="l402-upgrade"'
    )
    assert text.endswith("</body></html>")
    assert "Ad-free episode for 21 sats" in text
    assert "/.l402/pay?path=%2Fepisodes%2Findex.html&amp;return=%2Fepisodes%2Findex.html" in text
    assert int(flow.response.headers["Content-Length"]) == len(flow.response.content or b"")


async def test_upgrade_banner_survives_compression(addon: L402Server) -> None:
    flow = await free_page_flow(addon)
    flow.response = html_response(b"")
    flow.response.headers["Content-Encoding"] = "gzip"
    flow.response.content = b"<body>ok</body>"  # encoded with gzip by mitmproxy
    addon.response(flow)
    assert flow.response.headers["Content-Encoding"] == "gzip"
    assert b"l402-upgrade" in (flow.response.content or b"")
    assert b"l402-upgrade" not in (flow.response.raw_content or b"")


async def test_upgrade_banner_leaves_what_it_cannot_read_alone(addon: L402Server) -> None:
    flow = await free_page_flow(addon)
    flow.response = html_response(b"", **{"Content-Encoding": "gzip"})
    flow.response.raw_content = b"\x1f\x8b garbage"  # not what the header promises
    addon.response(flow)
    assert flow.response.raw_content == b"\x1f\x8b garbage"

    audio = await free_page_flow(addon)
    audio.response = http.Response.make(200, b"<body>", {"Content-Type": "audio/mpeg"})
    addon.response(audio)
    assert audio.response.content == b"<body>"

    missing = await free_page_flow(addon)
    missing.response = html_response(b"<body>gone</body>")
    missing.response.status_code = 404
    addon.response(missing)
    assert missing.response.content == b"<body>gone</body>"


async def test_upgrade_banner_not_for_api_clients_head_or_when_switched_off(
    addon: L402Server,
) -> None:
    page = b"<body>x</body>"
    api = await free_page_flow(addon, accept="application/json")
    api.response = html_response(page)
    addon.response(api)
    assert api.response.content == page

    head = await free_page_flow(addon)
    head.request.method = "HEAD"
    head.response = html_response(b"")
    addon.response(head)
    assert head.response.content == b""

    ctx.options.update(l402_offer_upgrade=False)
    off = await free_page_flow(addon)
    off.response = html_response(page)
    addon.response(off)
    assert off.response.content == page


async def test_paywall_page_is_not_decorated_with_the_banner(addon: L402Server) -> None:
    flow = flow_for("/bonus/x.mp3", Accept=BROWSER_ACCEPT)
    await addon.request(flow)
    assert flow.response is not None
    before = flow.response.content
    addon.response(flow)
    assert flow.response.content == before


async def test_credentials_never_reach_the_log(
    addon: L402Server, payer: DevLedger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    set_cookie = await bought_cookie(addon, payer)
    value = cookie_value(set_cookie)
    flow = flow_for("/bonus/x.mp3", Cookie=f"L402_bonus={value}")
    await addon.request(flow)
    preimage = value.split(":")[1]
    assert preimage not in caplog.text
    assert preimage not in json.dumps(flow.metadata)


# -- caches: a priced URL's answer depends on who asks -----------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"Vary": "Authorization, Cookie, Accept-Authenticate", "Cache-Control": "private"}),
        (
            {
                "Vary": "accept-encoding, cookie",
                "Cache-Control": "public, max-age=3600, s-maxage=60",
            },
            {
                "Vary": "accept-encoding, cookie, Authorization, Accept-Authenticate",
                "Cache-Control": "private, max-age=3600",
            },
        ),
        ({"Vary": "*", "Cache-Control": "no-store"}, {"Vary": "*", "Cache-Control": "no-store"}),
        ({"Cache-Control": "private, max-age=60"}, {"Cache-Control": "private, max-age=60"}),
    ],
)
def test_paid_answers_vary_and_stay_private(before: dict[str, str], after: dict[str, str]) -> None:
    headers = http.Headers(**{k.replace("-", "_"): v for k, v in before.items()})
    mark_variant(headers, paid=True)
    for name, value in after.items():
        assert headers[name] == value


def test_free_answers_vary_but_keep_their_caching() -> None:
    headers = http.Headers(Cache_Control="public, max-age=3600")
    mark_variant(headers, paid=False, by_accept=True)
    assert headers["Vary"] == "Authorization, Cookie, Accept-Authenticate, Accept"
    assert headers["Cache-Control"] == "public, max-age=3600"


async def test_the_response_hook_marks_free_and_paid_answers(
    addon: L402Server, payer: DevLedger
) -> None:
    free = flow_for("/episodes/ep1.mp3")
    await addon.request(free)
    free.response = tutils.tresp(headers=http.Headers(Cache_Control="max-age=3600"))
    addon.response(free)
    assert free.response.headers["Vary"] == "Authorization, Cookie, Accept-Authenticate"
    assert free.response.headers["Cache-Control"] == "max-age=3600"

    value = cookie_value(await bought_cookie(addon, payer))
    paid = flow_for("/bonus/x.mp3", Cookie=f"L402_bonus={value}")
    await addon.request(paid)
    assert paid.metadata["l402"]["variant"] == "paid"
    paid.response = tutils.tresp(headers=http.Headers(Cache_Control="public, max-age=3600"))
    addon.response(paid)
    assert paid.response.headers["Cache-Control"] == "private, max-age=3600"
    assert "Cookie" in paid.response.headers["Vary"]

    unpriced = flow_for("/feed.xml")
    await addon.request(unpriced)
    unpriced.response = tutils.tresp(headers=http.Headers(Cache_Control="public, max-age=60"))
    addon.response(unpriced)
    assert "Vary" not in unpriced.response.headers
    assert unpriced.response.headers["Cache-Control"] == "public, max-age=60"


# -- a backend with invoice limits (a Lightning Address) -----------------------------------------


class LimitedBackend(CountingBackend):
    """The dev backend, telling it invoices only 1 to 50 sat, as a Lightning Address might."""

    async def info(self) -> NodeInfo:
        real = await self.real.info()
        return NodeInfo("lnurl", "alice@example.com", network=real.network,
                        invoice_range_msat=(1_000, 50_000))  # fmt: skip


def limited_server(tmp_path: Path, rules: Path) -> AbstractAsyncContextManager[L402Server]:
    """The server addon on a backend that invoices only 1 to 50 sat."""
    return server_on(tmp_path, rules, LimitedBackend)


async def test_a_price_the_backend_cannot_invoice_stops_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with limited_server(tmp_path, RULES) as server:
        assert not server.started
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [
            "l402: l402_rules: service 'bonus' (line 63) costs 100 sat, but lnurl at "
            "alice@example.com accepts 1 to 50 sat"
        ]


async def test_rules_the_backend_cannot_invoice_are_refused_while_running(
    tmp_path: Path,
) -> None:
    cheap = tmp_path / "cheap.yaml"
    cheap.write_text('services:\n  - name: tip\n    match: {path: "/tip/*"}\n    price_sat: 5\n')
    async with limited_server(tmp_path, cheap) as server:
        assert server.started and server.node is not None
        before = server.rules
        with pytest.raises(exceptions.OptionsError, match="costs 100 sat, but lnurl"):
            ctx.options.update(l402_rules=str(RULES))
        assert server.rules == before
        # The same edit made to the watched file is kept out too.
        cheap.write_text(RULES.read_text())
        os.utime(cheap, (time.time() + 5, time.time() + 5))
        await server._reload_rules_if_changed()
        assert server.rules == before
