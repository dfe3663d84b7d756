"""The paywall engine stands alone: no door's library is needed to import or run it."""

import subprocess
import sys
from pathlib import Path

import pytest

from l402proxy.engine import Forward, Paywall, Request
from l402proxy.engine.answers import Answer, mark_variant
from l402proxy.engine.request import drop_upgrade, set_one, take_our_cookies
from l402proxy.l402.headers import format_credential
from l402proxy.lightning.dev import DevLedger
from tests.unit.test_server_addon import REPO, RULES, challenge, flow_for, server_on


def test_engine_imports_without_mitmproxy() -> None:
    # A door-less process: mitmproxy made unimportable before anything of ours is imported.
    code = (
        "import sys; sys.modules['mitmproxy'] = None\n"
        "import l402proxy.engine, l402proxy.engine.core, l402proxy.engine.endpoints\n"
        "assert not any(name.startswith('mitmproxy') and sys.modules[name] is not None "
        "for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_head_answers_keep_the_length_a_get_would_get() -> None:
    answer = Answer.make(200, b"hello", {"Content-Type": "text/plain"}).for_method("HEAD")
    assert answer.body == b"" and answer.header("Content-Length") == "5"


def test_header_writes_keep_the_first_field_in_place() -> None:
    fields = ((b"a", b"1"), (b"X-Y", b"2"), (b"b", b"3"), (b"x-y", b"4"))
    assert set_one(fields, "x-y", "9") == ((b"a", b"1"), (b"X-Y", b"9"), (b"b", b"3"))
    assert set_one(fields, "New", "v")[-1] == (b"New", b"v")


def test_plain_helpers_leave_unrelated_fields_alone() -> None:
    fields = ((b"Host", b"h"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))
    assert drop_upgrade(fields) is fields
    assert drop_upgrade(((b"Upgrade", b"H2C"), (b"Connection", b"Upgrade, close"))) == (
        (b"Connection", b"close"),
    )
    assert take_our_cookies(((b"Cookie", b"a=b"),)) == (((b"Cookie", b"a=b"),), {})
    marked = mark_variant(((b"Content-Type", b"text/html"),), paid=True)
    assert (b"Cache-Control", b"private") in marked


def test_an_answer_header_may_carry_raw_bytes() -> None:
    # /.l402/pay?return=/%FF: the Location of the 303 holds the byte as mitmproxy decoded it;
    # a strict encode made that a 503 with a traceback.
    answer = Answer.make(303, b"", {"Location": "/\udcff"})
    assert (b"Location", b"/\xff") in answer.headers


async def test_a_request_the_engine_answers_keeps_no_credential_of_ours(tmp_path: Path) -> None:
    """Not forwarded, but recorded (flow files, mitmweb, other addons): our Authorization and
    cookies leave the flow as they leave a forwarded one; the origin's Basic stays."""
    async with server_on(tmp_path, RULES) as addon:
        flow = flow_for("/episodes/ep1.mp3")
        flow.request.headers.add("Authorization", "L402 bogus:00")
        flow.request.headers.add("Authorization", "Basic dTpw")
        flow.request.headers["Cookie"] = "L402_podcast=x:00; theme=dark"
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 401
        assert flow.request.headers.get_all("Authorization") == ["Basic dTpw"]
        assert flow.request.headers["Cookie"] == "theme=dark"


async def test_a_header_the_paid_variant_sets_never_comes_from_the_client(tmp_path: Path) -> None:
    """rules/api.yaml's premium variant sets X-L402-Tier: premium. A client that sends it itself
    must not get the premium tier from the origin: on a free rule, a path no rule covers, or a
    request with a (forged) credential, in any spelling and any number of fields."""
    engine = Paywall()
    engine.use_rules_file(str(REPO / "rules" / "api.yaml"))
    engine.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    engine.store_uri = str(tmp_path / "server.sqlite")
    await engine.open()
    try:
        for path in ("/api/health", "/elsewhere", "/api/quotes/1"):
            fields = (
                (b"Host", b"api.example"),
                (b"x-l402-tier", b"premium"),
                (b"X-L402-TIER", b"premium"),
                (b"X_L402_Tier", b"premium"),  # WSGI/CGI origins read it as X-L402-Tier
                (b"Accept", b"*/*"),
            )
            outcome = await engine.handle(
                Request(method="GET", target=path, host="api.example", fields=fields)
            )
            if isinstance(outcome, Forward):
                assert outcome.headers == ((b"Host", b"api.example"), (b"Accept", b"*/*")), path
            else:
                assert outcome.status == 402, path
    finally:
        await engine.close()


async def test_an_origin_basic_authorization_beside_our_token_does_not_spoil_it(
    tmp_path: Path,
) -> None:
    """Two Authorization fields, L402 for us and Basic for the origin: ours is judged alone
    (joined, the two made one unreadable credential: a 401), and the Basic goes on."""
    async with server_on(tmp_path, RULES) as addon:
        payer = DevLedger(tmp_path / "devledger.sqlite")
        try:
            macaroon, invoice = await challenge(addon)
            payment = await payer.pay("listener", invoice, 0)
        finally:
            await payer.close()
        flow = flow_for("/bonus/x.mp3")
        flow.request.headers.add("Authorization", "Basic dTpw")
        flow.request.headers.add("Authorization", format_credential([macaroon], payment.preimage))
        await addon.request(flow)
        assert flow.response is None, flow.response and flow.response.text
        assert flow.request.headers.get_all("Authorization") == ["Basic dTpw"]


async def test_a_claim_cookie_never_reaches_the_origin(tmp_path: Path) -> None:
    async with server_on(tmp_path, RULES) as addon:
        flow = flow_for("/elsewhere", Cookie="L402claim.0011223344556677=ab; theme=dark")
        await addon.request(flow)
        assert flow.response is None and flow.request.headers["Cookie"] == "theme=dark"


async def test_an_unhealthy_store_sells_nothing_but_honours_what_it_sold(tmp_path: Path) -> None:
    """While the token store cannot record a sale (PostgreSQL down), a new challenge is a 503
    with Retry-After and no invoice is made; a token sold before keeps working from memory."""
    async with server_on(tmp_path, RULES) as addon:
        payer = DevLedger(tmp_path / "devledger.sqlite")
        try:
            macaroon, invoice = await challenge(addon)
            payment = await payer.pay("listener", invoice, 0)
            assert addon.store is not None
            addon.store._set_healthy(False)  # type: ignore[attr-defined]
            before = len(await payer.list_invoices())
            flow = flow_for("/bonus/y.mp3", Accept_Authenticate="L402")
            await addon.request(flow)
            assert flow.response is not None and flow.response.status_code == 503
            assert flow.response.headers["Retry-After"] and "token store" in flow.response.text
            assert len(await payer.list_invoices()) == before
            paid = flow_for(
                "/bonus/y.mp3", Authorization=format_credential([macaroon], payment.preimage)
            )
            await addon.request(paid)
            assert paid.response is None
        finally:
            await payer.close()


async def test_no_client_header_makes_the_origin_reroot_the_path(tmp_path: Path) -> None:
    """Daphne takes Daphne-Root-Path as root_path (Django then routes /anything/premium/x as
    /premium/x); frameworks honour X-Forwarded-Prefix, X-Script-Name, X-Original-URL: from a
    client, none reaches the origin, in any spelling."""
    async with server_on(tmp_path, RULES) as addon:
        flow = flow_for("/elsewhere")
        for name in ("Daphne-Root-Path", "X-Forwarded-Prefix", "x_script_name", "X-Original-URL",
                     "X-Rewrite-URL"):  # fmt: skip
            flow.request.headers.add(name, "/anything")
        flow.request.headers.add("X-Other", "kept")
        await addon.request(flow)
        assert flow.response is None
        assert [name for name, _ in flow.request.headers.fields][-1:] == [b"X-Other"]
        assert b"/anything" not in bytes(flow.request.headers)


def test_a_paid_answer_keeps_no_cdn_cache_directive() -> None:
    """CDNs obey CDN-Cache-Control / Surrogate-Control over Cache-Control (and some ignore Vary):
    a paid answer must not be stored for everyone by one. Free answers keep them."""
    fields = (
        (b"Content-Type", b"audio/mpeg"),
        (b"CDN-Cache-Control", b"max-age=3600"),
        (b"Surrogate-Control", b"max-age=3600"),
        (b"Cloudflare-CDN-Cache-Control", b"max-age=60"),
    )
    paid = mark_variant(fields, paid=True)
    assert [name for name, _ in paid] == [b"Content-Type", b"Vary", b"Cache-Control"]
    assert len(mark_variant(fields, paid=False)) == 5


@pytest.mark.parametrize(
    "field",
    [
        (b"X-A", b"1\rX-L402-Tier: premium"),  # a bare CR: some origins start a header there
        (b"X-Foo", b"a\r\n X-L402-Tier: premium"),  # an obs-fold kept as it came
        (b"X-A", b"1\nX-L402-Tier: premium"),
        (b"X-A", b"1\x00"),
        (b"X-A\rX-L402-Tier", b"premium"),
    ],
)
async def test_a_header_field_with_a_line_break_or_nul_is_refused(
    tmp_path: Path, field: tuple[bytes, bytes]
) -> None:
    async with server_on(tmp_path, RULES) as addon:
        flow = flow_for("/elsewhere")
        flow.request.headers.fields = (*flow.request.headers.fields, field)
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 400


async def test_a_paid_variant_that_sets_host_leaves_every_other_request_its_host(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "services:\n  - name: bonus\n    match: {path: '/bonus/*'}\n    price_sat: 10\n"
        "    paid: {upstream: 'http://127.0.0.1:9', set_headers: {Host: premium.internal}}\n"
    )
    async with server_on(tmp_path, rules) as addon:
        flow = flow_for("/elsewhere", Host="podcast.example")
        await addon.request(flow)
        assert flow.response is None and flow.request.headers.get("Host") == "podcast.example"
