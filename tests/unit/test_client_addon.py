"""The client addon in-process, with mitmproxy's own test helpers (no sockets).

Options and the request hook only: paying flows end to end are in tests/e2e.
"""

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from mitmproxy import ctx, exceptions, hooks, http
from mitmproxy.test import taddons, tflow

from l402proxy.client import L402Client, upstream_proxy
from l402proxy.l402.headers import format_challenge
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import mint
from l402proxy.lightning import NEW_WALLET_BALANCE_MSAT, DevLedger, DevWallet
from l402proxy.lightning.uri import SUPPORTED_FORMS
from l402proxy.payer import Limits, Token

UNSUPPORTED = f"unsupported backend URI 'btcpay'; use one of: {SUPPORTED_FORMS}"


def load(tctx: taddons.context, client: L402Client, **options: object) -> None:
    """What `mitmdump -s addons/client.py --set ...` does: configure with every option, then
    the ones given."""
    tctx.master.addons.invoke_addon_sync(client, hooks.ConfigureHook(set(tctx.options.keys())))
    if options:
        tctx.configure(client, **options)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Defaults land in tmp_path, never in the real ~/.l402proxy."""
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
async def addon(tmp_path: Path, home: Path) -> AsyncIterator[L402Client]:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(
            tctx,
            client,
            l402_store=str(tmp_path / "client.sqlite"),
            l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
            l402_allow=["127.0.0.1:8081", "*.example.com"],
        )
        await client.running()
        assert client.started and client.ready.is_set()
        yield client
        await client.done()


def flow_to(host: str, port: int, path: str = "/bonus/ep1.mp3", **headers: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.host, flow.request.port, flow.request.path = host, port, path
    flow.request.scheme = "http"
    for name, value in headers.items():
        flow.request.headers[name.replace("_", "-")] = value
    return flow


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- options ----------------------------------------------------------------------------------


async def test_options_and_defaults(home: Path) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client)
        assert ctx.options.l402_wallet == "dev"
        assert ctx.options.l402_max_price_sat == 100
        assert ctx.options.l402_max_fee_sat == 10
        assert ctx.options.l402_budget_daily_sat == 1000
        assert ctx.options.l402_budget_total_sat is None
        assert list(ctx.options.l402_allow) == []
        assert ctx.options.l402_store == ""
        assert ctx.options.l402_dev_ledger == ""
        assert ctx.options.l402_pay_timeout == 60
        assert client.limits == Limits()
        assert client.misconfigured == {}
        assert isinstance(client.wallet, DevWallet) and client.wallet.wallet == "listener"
        assert client.dev_ledger_path == str(home / "devledger.sqlite")


async def test_options_reach_the_limits_and_the_wallet(tmp_path: Path, home: Path) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(
            tctx,
            client,
            l402_max_price_sat=50,
            l402_max_fee_sat=2,
            l402_budget_daily_sat=500,
            l402_budget_total_sat=5000,
            l402_allow=["example.com"],
            l402_wallet="dev:fan?delay=0.5",
            l402_dev_ledger=str(tmp_path / "ledger.sqlite"),
        )
        assert client.limits == Limits(50, 2, 500, 5000, ("example.com",))
        assert isinstance(client.wallet, DevWallet)
        assert (client.wallet.wallet, client.wallet.delay) == ("fan", 0.5)
        assert client.wallet.ledger.path == str(tmp_path / "ledger.sqlite")


async def test_default_store_is_under_l402proxy_home(home: Path) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client)
        await client.running()
        try:
            assert client.started
            assert (home / "client.sqlite").exists()
            assert (home / "devledger.sqlite").exists()
        finally:
            await client.done()


async def test_bad_limits_at_startup_log_one_error_and_do_not_start(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client, l402_max_price_sat=-1)
        assert errors(caplog) == [
            "l402: l402_max_price_sat must be a whole number of sat >= 0, got -1"
        ]
        assert set(client.misconfigured) == {"limits"}
        assert client.limits == Limits()  # the bad value never applies
        await client.running()
        assert not client.started and client.payer is None and not client.ready.is_set()
        assert not (home / "client.sqlite").exists()
        await client.done()


async def test_a_fixed_limit_before_running_clears_the_error(home: Path) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client, l402_allow=["http://example.com"])
        assert "limits" in client.misconfigured
        tctx.configure(client, l402_allow=["example.com"])
        assert client.misconfigured == {}
        await client.running()
        try:
            assert client.started and client.payer is not None
            assert client.payer.limits.allow == ("example.com",)
        finally:
            await client.done()


async def test_bad_limits_while_running_are_rejected(addon: L402Client) -> None:
    before = addon.limits
    with pytest.raises(exceptions.OptionsError, match="l402_budget_daily_sat must be"):
        ctx.options.update(l402_budget_daily_sat=-5)
    with pytest.raises(exceptions.OptionsError, match="must be a host name, not a URL"):
        ctx.options.update(l402_allow=["https://example.com/"])
    assert ctx.options.l402_budget_daily_sat == 1000  # mitmproxy kept the previous value
    assert list(ctx.options.l402_allow) == ["127.0.0.1:8081", "*.example.com"]
    assert addon.limits == before and addon.misconfigured == {}
    assert addon.payer is not None and addon.payer.limits == before


async def test_good_limits_while_running_reach_the_payer(addon: L402Client) -> None:
    ctx.options.update(l402_max_price_sat=7)
    assert addon.payer is not None and addon.payer.limits.max_price_sat == 7


async def test_pay_timeout_below_one_second_is_refused(addon: L402Client) -> None:
    with pytest.raises(exceptions.OptionsError, match="l402_pay_timeout: must be at least 1"):
        ctx.options.update(l402_pay_timeout=0)
    ctx.options.update(l402_pay_timeout=5)
    assert addon.payer is not None and addon.payer.pay_timeout == 5


async def test_store_cannot_change_while_running(addon: L402Client, tmp_path: Path) -> None:
    with pytest.raises(exceptions.OptionsError, match="l402_store cannot change while running"):
        ctx.options.update(l402_store=str(tmp_path / "other.sqlite"))
    assert ctx.options.l402_store == str(tmp_path / "client.sqlite")
    assert not (tmp_path / "other.sqlite").exists()


async def test_bad_wallet_at_startup_is_one_clear_error(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = L402Client()
    with taddons.context(client) as tctx:
        load(tctx, client, l402_wallet="btcpay://localhost:10009")
        assert errors(caplog) == [f"l402: l402_wallet: {UNSUPPORTED}"]
        assert client.misconfigured == {"l402_wallet": f"l402_wallet: {UNSUPPORTED}"}
        await client.running()
        assert not client.started and client.payer is None


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("btcpay://localhost:10009", UNSUPPORTED),
        ("dev:", "dev URI without a wallet name"),
        ("dev:a b", "invalid dev wallet name 'a b'"),
        ("dev:x?delay=soon", "dev URI: delay 'soon' is not a number"),
        ("dev:x?speed=1", "dev URI: unknown parameter 'speed'"),
    ],
)
async def test_bad_wallet_while_running_is_rejected(
    addon: L402Client, uri: str, problem: str
) -> None:
    with pytest.raises(exceptions.OptionsError) as caught:
        ctx.options.update(l402_wallet=uri)
    assert str(caught.value).startswith("l402_wallet: ")
    assert problem in str(caught.value)
    assert ctx.options.l402_wallet == "dev"
    # mitmproxy's rollback configures the old value again, which may reopen the same wallet.
    assert isinstance(addon.wallet, DevWallet)
    assert (addon.wallet.wallet, addon.wallet.delay) == ("listener", 0.0)
    assert addon.payer is not None and addon.payer.wallet is addon.wallet
    assert addon.misconfigured == {}


async def test_wallet_change_while_running_is_refused(addon: L402Client) -> None:
    # A wallet is checked only at start (reachable, may pay, network), and pending payments
    # belong to the wallet making them: switching means a restart.
    with pytest.raises(exceptions.OptionsError, match="cannot change while running: restart"):
        ctx.options.update(l402_wallet="dev:second")
    assert ctx.options.l402_wallet == "dev"
    assert isinstance(addon.wallet, DevWallet) and addon.wallet.wallet == "listener"
    assert addon.payer is not None and addon.payer.wallet is addon.wallet


# --- request hook -----------------------------------------------------------------------------


async def test_accept_authenticate_only_for_allowed_hosts(addon: L402Client) -> None:
    for host, port in (("127.0.0.1", 8081), ("cdn.example.com", 80)):
        flow = flow_to(host, port)
        await addon.request(flow)
        assert flow.request.headers.get_all("Accept-Authenticate") == ["L402"], host
        assert flow.response is None and "Authorization" not in flow.request.headers

    for host, port in (("127.0.0.1", 8082), ("example.com", 80), ("other.test", 80)):
        flow = flow_to(host, port)
        await addon.request(flow)
        assert "Accept-Authenticate" not in flow.request.headers, host


async def test_an_existing_accept_authenticate_is_kept(addon: L402Client) -> None:
    flow = flow_to("127.0.0.1", 8081, Accept_Authenticate="LSAT")
    await addon.request(flow)
    assert flow.request.headers.get_all("Accept-Authenticate") == ["LSAT"]


def hold_token(addon: L402Client, origin: str = "http://127.0.0.1:8081") -> Token:
    """A token for /bonus/, as if paid earlier (request() reads only memory)."""
    assert addon.payer is not None
    token = Token(origin, "services:bonus", ("bonus",), os.urandom(32), None, "L402 mac:00ff")
    addon.payer.tokens[(origin, token.scope)] = token
    addon.payer.paths.setdefault(origin, {})["/bonus/"] = token.scope
    return token


async def test_a_held_token_is_attached_for_its_scope_only(addon: L402Client) -> None:
    token = hold_token(addon)
    flow = flow_to("127.0.0.1", 8081, "/bonus/ep2.mp3")
    await addon.request(flow)
    assert flow.request.headers["Authorization"] == token.credential
    assert flow.metadata["l402_client_token"] == token

    elsewhere = flow_to("127.0.0.1", 8081, "/episodes/ep2.mp3")
    await addon.request(elsewhere)
    assert "Authorization" not in elsewhere.request.headers
    assert "l402_client_token" not in elsewhere.metadata


async def test_an_existing_authorization_is_kept(addon: L402Client) -> None:
    hold_token(addon)
    flow = flow_to("127.0.0.1", 8081, "/bonus/ep2.mp3", Authorization="Bearer mine")
    await addon.request(flow)
    assert flow.request.headers.get_all("Authorization") == ["Bearer mine"]
    assert "l402_client_token" not in flow.metadata
    assert flow.request.headers["Accept-Authenticate"] == "L402"


async def test_a_token_is_never_sent_to_a_host_not_allowed(addon: L402Client) -> None:
    hold_token(addon, origin="http://127.0.0.1:8082")
    flow = flow_to("127.0.0.1", 8082, "/bonus/ep2.mp3")
    await addon.request(flow)
    assert "Authorization" not in flow.request.headers


async def test_flows_with_a_response_are_left_alone(addon: L402Client) -> None:
    flow = flow_to("127.0.0.1", 8081)
    flow.response = http.Response.make(200, b"cached")
    await addon.request(flow)
    assert "Accept-Authenticate" not in flow.request.headers


async def test_a_402_without_l402_challenge_passes_through(addon: L402Client) -> None:
    flow = flow_to("127.0.0.1", 8081)
    flow.response = http.Response.make(402, b"pay", {"WWW-Authenticate": 'Basic realm="x"'})
    await addon.response(flow)
    assert flow.response.status_code == 402
    assert "X-L402-Refused" not in flow.response.headers and flow.marked == ""


# --- a server that refuses the token just paid ---------------------------------------------------


class Body(httpx.AsyncByteStream):
    """A body read off the wire (httpx treats a bytes body as already read)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


@pytest.mark.parametrize(
    "service",
    ["podcast", None],
)
async def test_a_token_refused_right_after_payment_is_reported(
    addon: L402Client, tmp_path: Path, service: str | None
) -> None:
    shop = DevLedger(tmp_path / "devledger.sqlite")
    root_key = os.urandom(32)

    async def challenge() -> str:
        invoice = await shop.create_invoice("merchant", 21_000, "ep", 600)
        caveats = [f"services={service}:0"] if service else []
        macaroon = mint(root_key, Identifier.new(invoice.payment_hash), caveats)
        return format_challenge("L402", macaroon, invoice.bolt11)

    sent: list[str] = []

    async def refusing_origin(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("Authorization", ""))
        headers = {"WWW-Authenticate": await challenge()}
        return httpx.Response(402, headers=headers, stream=Body(b"pay up\n"))

    assert addon.http is not None
    await addon.http.aclose()
    addon.http = httpx.AsyncClient(transport=httpx.MockTransport(refusing_origin))
    try:
        flow = flow_to("127.0.0.1", 8081, "/bonus/ep1.mp3")
        await addon.request(flow)
        flow.response = http.Response.make(402, b"", {"WWW-Authenticate": await challenge()})
        await addon.response(flow)
        assert len(sent) == 1 and sent[0].startswith("L402 ")  # the retry, with the new token
        assert (flow.response.status_code, flow.response.content) == (402, b"pay up\n")
        # Refused after paying: it says what this request paid too (the sums add up).
        assert flow.response.headers["X-L402-Paid"].startswith("21 sat (fee 0 sat) for ")
        assert flow.response.headers["X-L402-Refused"].startswith("rejected_after_payment; ")
        assert flow.marked == ":no_entry:"
        assert await shop.balance("listener") == NEW_WALLET_BALANCE_MSAT - 21_000

        # The refused token is not sent again.
        again = flow_to("127.0.0.1", 8081, "/bonus/ep2.mp3")
        await addon.request(again)
        assert "Authorization" not in again.request.headers
    finally:
        await shop.close()


def test_upstream_proxy_follows_mitmproxys_upstream_mode() -> None:
    assert upstream_proxy([], None) is None
    assert upstream_proxy(["regular"], "u:p") is None
    assert upstream_proxy(["upstream:http://10.1.2.3:3128"], None) == "http://10.1.2.3:3128"
    assert (
        upstream_proxy(["regular", "upstream:https://proxy.example:8443"], "me:p@ss")
        == "https://me:p%40ss@proxy.example:8443"
    )
    assert upstream_proxy(["upstream:http://[::1]:3128"], None) == "http://[::1]:3128"
