"""Adversarial review of the paying client (payer, client addon, SDK): each test here proved a
bug (found by review, failing until it was fixed) and keeps it from coming back."""

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from mitmproxy import hooks, http
from mitmproxy.test import taddons, tflow

from l402proxy.client import L402Client
from l402proxy.l402.headers import format_challenge
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import caveats_for, mint
from l402proxy.lightning import NEW_WALLET_BALANCE_MSAT, DevLedger, DevWallet, PaymentResult
from l402proxy.payer import Limits, Paid, Payer
from l402proxy.sdk import L402Auth
from l402proxy.store.client import ClientStore

ORIGIN = "http://127.0.0.1:8081"
URL = ORIGIN + "/bonus/ep1.mp3"
PRICE_MSAT = 21_000


class Shop:
    """What the server addon does for a 402, by hand: invoice + macaroon + header."""

    def __init__(self, ledger: DevLedger) -> None:
        self.ledger = ledger
        self.root_key = os.urandom(32)

    async def challenge(self, service: str = "podcast") -> str:
        invoice = await self.ledger.create_invoice("merchant", PRICE_MSAT, "ep", 600)
        caveats = caveats_for(service, valid_until=None, capabilities=None)
        macaroon = mint(self.root_key, Identifier.new(invoice.payment_hash), caveats)
        return format_challenge("L402", macaroon, invoice.bolt11)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    yield Shop(ledger)
    await ledger.close()


async def spent_msat(tmp_path: Path) -> int:
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        return NEW_WALLET_BALANCE_MSAT - await ledger.balance("listener")
    finally:
        await ledger.close()


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Body(httpx.AsyncByteStream):
    """A body read off the wire (httpx treats a bytes body as already read)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


async def running_addon(tmp_path: Path, allow: list[str], handler: Handler) -> L402Client:
    """The client addon, started, with its retry going to `handler` instead of the network."""
    client = L402Client()
    tctx = taddons.context(client)
    tctx.__enter__()
    tctx.master.addons.invoke_addon_sync(client, hooks.ConfigureHook(set(tctx.options.keys())))
    tctx.configure(
        client,
        l402_store=str(tmp_path / "client.sqlite"),
        l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
        l402_allow=allow,
    )
    await client.running()
    assert client.started and client.http is not None
    await client.http.aclose()
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client._tctx = tctx  # type: ignore[attr-defined]
    return client


async def stop_addon(client: L402Client) -> None:
    await client.done()
    client._tctx.__exit__(None, None, None)  # type: ignore[attr-defined]


def flow_to(host: str, port: int, path: str = "/bonus/ep1.mp3") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.host, flow.request.port, flow.request.path = host, port, path
    flow.request.scheme = "http"
    return flow


async def challenged(client: L402Client, flow: http.HTTPFlow, shop: Shop) -> None:
    """Run the flow through the addon with the server answering 402 + a fresh challenge."""
    await client.request(flow)
    flow.response = http.Response.make(402, b"pay", {"WWW-Authenticate": await shop.challenge()})
    await client.response(flow)


# --- client addon ---------------------------------------------------------------------------


async def test_addon_pays_a_challenge_from_an_ipv6_origin(
    tmp_path: Path, home: Path, shop: Shop
) -> None:
    async def origin(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization", "").startswith("L402 "):
            return httpx.Response(200, stream=Body(b"paid"))
        return httpx.Response(
            402, headers={"WWW-Authenticate": await shop.challenge()}, stream=Body(b"pay")
        )

    client = await running_addon(tmp_path, ["[::1]:8081"], origin)
    try:
        flow = flow_to("::1", 8081)
        await challenged(client, flow, shop)
        assert flow.response is not None
        assert (flow.response.status_code, flow.response.content) == (200, b"paid")
    finally:
        await stop_addon(client)


async def test_the_retry_sends_only_the_players_headers(
    tmp_path: Path, home: Path, shop: Shop
) -> None:
    seen: list[httpx.Headers] = []

    async def origin(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, stream=Body(b"paid"))

    client = await running_addon(tmp_path, [], origin)
    try:
        flow = flow_to("127.0.0.1", 8081)
        # A player that cannot decode gzip and says so by sending no Accept-Encoding.
        flow.request.headers["User-Agent"] = "PodPlayer/1.0"
        await challenged(client, flow, shop)
        assert flow.response is not None and flow.response.status_code == 200
        assert len(seen) == 1
        sent = seen[0]
        assert sent["User-Agent"] == "PodPlayer/1.0"
        assert "Accept-Encoding" not in sent, sent
        assert "Accept" not in sent, sent
    finally:
        await stop_addon(client)


async def test_a_paying_flow_is_marked_for_mitmweb(tmp_path: Path, home: Path, shop: Shop) -> None:
    async def origin(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body(b"paid"))

    client = await running_addon(tmp_path, [], origin)
    try:
        flow = flow_to("127.0.0.1", 8081)
        await challenged(client, flow, shop)
        assert flow.response is not None and flow.response.content == b"paid"
        assert flow.marked == ":zap:"
        assert flow.comment == "L402 paid 21 sat (fee 0 sat) for podcast"
        assert flow.response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
        assert flow.metadata["l402_client"]["paid"] is True
        again = flow_to("127.0.0.1", 8081, "/bonus/ep2.mp3")
        await client.request(again)  # sent with the token up front: nothing to mark
        assert again.request.headers["Authorization"].startswith("L402 ")
        assert again.marked == "" and again.comment == ""
    finally:
        await stop_addon(client)


async def test_transparent_mode_knows_the_site_by_name_and_retries_to_its_address(
    tmp_path: Path, home: Path, shop: Shop
) -> None:
    """Transparent/WireGuard mode: the connection has an IP, the player named the site."""
    seen: list[httpx.Request] = []

    async def origin(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Body(b"paid"))

    client = await running_addon(tmp_path, ["podcast.example"], origin)
    try:
        flow = flow_to("10.9.8.7", 443)
        flow.request.scheme = "https"
        flow.request.headers["Host"] = "podcast.example"
        await challenged(client, flow, shop)
        assert flow.response is not None and flow.response.content == b"paid"
        [retry] = seen
        assert (retry.url.host, retry.url.port) == ("10.9.8.7", None)  # 443: https default
        assert retry.headers["Host"] == "podcast.example"
        assert retry.extensions.get("sni_hostname") == "podcast.example"
        tokens = list(client.payer.tokens) if client.payer else []
        assert [origin for origin, _ in tokens] == ["https://podcast.example:443"]
    finally:
        await stop_addon(client)


async def test_an_origin_401_after_paying_keeps_the_token_just_paid(
    tmp_path: Path, home: Path, shop: Shop
) -> None:
    async def origin(request: httpx.Request) -> httpx.Response:
        # The paywall accepted the token; the origin behind it wants its own login.
        headers = {"WWW-Authenticate": 'Basic realm="members"'}
        return httpx.Response(401, headers=headers, stream=Body(b"login"))

    client = await running_addon(tmp_path, [], origin)
    try:
        flow = flow_to("127.0.0.1", 8081)
        await challenged(client, flow, shop)
        assert flow.response is not None and flow.response.status_code == 401
        assert await spent_msat(tmp_path) == PRICE_MSAT
        assert client.payer is not None
        # The token is good: the next request in the scope must carry it, not pay again.
        again = flow_to("127.0.0.1", 8081, "/bonus/ep2.mp3")
        await client.request(again)
        assert again.request.headers.get("Authorization", "").startswith("L402 ")
    finally:
        await stop_addon(client)


async def test_a_held_token_refused_on_a_new_path_is_paid_afresh_once(
    tmp_path: Path, home: Path, shop: Shop
) -> None:
    revoked: set[str] = set()

    async def paywall(request: httpx.Request) -> httpx.Response:
        credential = request.headers.get("Authorization", "")
        if credential.startswith("L402 ") and credential not in revoked:
            return httpx.Response(200, stream=Body(b"paid"))
        return httpx.Response(
            402, headers={"WWW-Authenticate": await shop.challenge()}, stream=Body(b"pay")
        )

    client = await running_addon(tmp_path, [], paywall)
    try:
        first = flow_to("127.0.0.1", 8081, "/episodes/ep1.mp3")
        await challenged(client, first, shop)
        assert first.response is not None and first.response.status_code == 200
        assert client.payer is not None
        (token,) = client.payer.tokens.values()
        revoked.add(token.credential)  # revoked (or expired early) on the server

        # Same service, a directory the client has not seen a challenge for yet.
        other = flow_to("127.0.0.1", 8081, "/bonus/ep1.mp3")
        await challenged(client, other, shop)
        assert other.response is not None
        assert (other.response.status_code, other.response.content) == (200, b"paid")
        assert await spent_msat(tmp_path) == 2 * PRICE_MSAT
    finally:
        await stop_addon(client)


# --- payer ----------------------------------------------------------------------------------


async def test_a_pending_payment_blocks_a_second_invoice_for_the_same_scope(
    tmp_path: Path, shop: Shop
) -> None:
    store = await ClientStore.open(str(tmp_path / "client.sqlite"))
    # The node pays at once but answers late: the first payment times out as pending.
    wallet = DevWallet(DevLedger(tmp_path / "devledger.sqlite"), "listener", delay=1.0)
    payer = Payer(wallet, store, Limits(), pay_timeout=0.2)
    try:
        first = await payer.handle_challenge(url=URL, www_authenticate=[await shop.challenge()])
        assert not isinstance(first, Paid) and first is not None
        assert first.code == "payment_pending"
        # The player asks again; the server sends a fresh invoice for the same service.
        await payer.handle_challenge(
            url=ORIGIN + "/bonus/ep2.mp3", www_authenticate=[await shop.challenge()]
        )
        assert await spent_msat(tmp_path) == PRICE_MSAT  # one service, paid once
    finally:
        await payer.close()


async def test_two_processes_sharing_a_store_pay_once_per_scope(tmp_path: Path, shop: Shop) -> None:
    payers = []
    for _ in range(2):
        store = await ClientStore.open(str(tmp_path / "client.sqlite"))
        wallet = DevWallet(DevLedger(tmp_path / "devledger.sqlite"), "listener", delay=0.2)
        payers.append(Payer(wallet, store, Limits()))
    try:
        challenges = [await shop.challenge(), await shop.challenge()]
        outcomes = await asyncio.gather(
            *(
                payer.handle_challenge(url=URL, www_authenticate=[challenge])
                for payer, challenge in zip(payers, challenges, strict=True)
            )
        )
        assert all(isinstance(o, Paid) for o in outcomes)
        assert await spent_msat(tmp_path) == PRICE_MSAT
    finally:
        for payer in payers:
            await payer.close()


class SlowToSend(DevWallet):
    """A network wallet (LNbits, LND over the net): the payment is registered with the node a
    moment after pay() is called."""

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        await asyncio.sleep(0.3)
        return await super().pay(bolt11, max_fee_msat)


async def test_recovery_does_not_release_a_payment_another_process_is_making(
    tmp_path: Path, shop: Shop
) -> None:
    limits = Limits(budget_daily_sat=31)  # room for one 21 sat payment + its 10 sat fee limit
    ledger = tmp_path / "devledger.sqlite"
    sdk = Payer(
        SlowToSend(DevLedger(ledger)),
        await ClientStore.open(str(tmp_path / "client.sqlite")),
        limits,
    )
    proxy = Payer(
        DevWallet(DevLedger(ledger)),
        await ClientStore.open(str(tmp_path / "client.sqlite")),
        limits,
    )
    try:
        buying = asyncio.create_task(
            sdk.handle_challenge(url=URL, www_authenticate=[await shop.challenge()])
        )
        await asyncio.sleep(0.1)  # reserved (pending) and being sent
        await proxy.recover()  # the proxy's check every 30 s
        await proxy.handle_challenge(
            url=ORIGIN + "/news/1", www_authenticate=[await shop.challenge("news")]
        )
        assert isinstance(await buying, Paid)
        assert await spent_msat(tmp_path) <= 31_000
    finally:
        await sdk.close()
        await proxy.close()


async def test_refused_challenges_do_not_grow_the_client_store(tmp_path: Path, shop: Shop) -> None:
    store = await ClientStore.open(str(tmp_path / "client.sqlite"))
    payer = Payer(
        DevWallet(DevLedger(tmp_path / "devledger.sqlite")), store, Limits(max_price_sat=1)
    )
    try:
        challenge = await shop.challenge()  # 21 sat: refused for max_price every time
        for i in range(200):
            await payer.handle_challenge(url=f"{ORIGIN}/api/{i}/item", www_authenticate=[challenge])
        if payer.background:
            await asyncio.wait(list(payer.background), timeout=5)
        assert await spent_msat(tmp_path) == 0
        assert sum(len(paths) for paths in payer.paths.values()) < 200
        assert len(await store.learned_paths()) < 200
    finally:
        await payer.close()


# --- SDK ------------------------------------------------------------------------------------


async def test_sdk_does_not_pay_a_host_not_allowed_behind_a_redirect(
    tmp_path: Path, shop: Shop
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "allowed.example":
            return httpx.Response(302, headers={"Location": "http://other.example/paid"})
        return httpx.Response(
            402, headers={"WWW-Authenticate": await shop.challenge()}, stream=Body(b"pay")
        )

    auth = L402Auth(
        allow=["allowed.example"],
        store=str(tmp_path / "client.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    try:
        async with httpx.AsyncClient(
            auth=auth, transport=httpx.MockTransport(handler), follow_redirects=True
        ) as client:
            response = await client.get("http://allowed.example/free")
        assert response.status_code == 402
        assert response.headers["X-L402-Refused"].startswith("not_allowed")
    finally:
        auth.close()
    assert await spent_msat(tmp_path) == 0
