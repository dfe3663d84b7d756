"""Lightning Address / LNURL-pay as the server's invoice backend (LUD-01, 06, 12, 16, 21).

The service is tests/standins/lnurl.py on 127.0.0.1: real regtest invoices from a dev ledger,
committing to the payRequest metadata, plus knobs that make it lie. What every backend does
(invoices, lookups, refusals) is the contract in tests/contract; this file keeps what is
particular to LNURL-pay.
"""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from l402proxy.l402.invoice import decode_invoice
from l402proxy.launch import free_port
from l402proxy.lightning import (
    BackendUnavailable,
    DevLedger,
    InvoiceNotFound,
    LightningError,
    LookupUnsupported,
    open_backend,
    open_wallet,
)
from l402proxy.lightning.bolt11_encoder import bech32_encode
from l402proxy.lightning.lnurl import (
    LnurlPayBackend,
    ServiceError,
    decode_lnurl,
    parse_uri,
)
from tests.standins.lnurl import LnurlService
from tests.standins.proxy import environment_proxy
from tests.standins.tls import server_context

# LUD-01's own example.
LUD01_LNURL = (
    "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3EV56NYD3"
    "HXQURZEPEXEJXXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS"
)
LUD01_URL = (
    "https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df"
)


def encode_lnurl(url: str) -> str:
    """bech32 'lnurl' of a URL (LUD-01), with our own encoder: 8-bit bytes as 5-bit groups."""
    value = int.from_bytes(url.encode(), "big")
    bits = len(url.encode()) * 8
    count = -(-bits // 5)
    value <<= count * 5 - bits
    groups = [(value >> shift) & 31 for shift in range(count * 5 - 5, -1, -5)]
    return bech32_encode("lnurl", groups).upper()


# -- URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "url", "shown"),
    [
        (
            "lnurl:alice@example.com",
            "https://example.com/.well-known/lnurlp/alice",
            "alice@example.com",
        ),
        ("alice@example.com", "https://example.com/.well-known/lnurlp/alice", "alice@example.com"),
        (
            " lnurl:Alice.B+tips@Pay.Example.COM ",
            "https://pay.example.com/.well-known/lnurlp/alice.b+tips",
            "alice.b+tips@pay.example.com",
        ),
        (
            "LNURL:bob@example.org:8443",
            "https://example.org:8443/.well-known/lnurlp/bob",
            "bob@example.org:8443",
        ),
        # Loopback hosts may use plain http (local services, tests).
        (
            "lnurl:m@127.0.0.1:8080",
            "http://127.0.0.1:8080/.well-known/lnurlp/m",
            "m@127.0.0.1:8080",
        ),
        ("lnurl:m@localhost:81", "http://localhost:81/.well-known/lnurlp/m", "m@localhost:81"),
        ("lnurl:m@[::1]:8080", "http://[::1]:8080/.well-known/lnurlp/m", "m@[::1]:8080"),
    ],
)
def test_lightning_address_forms(uri: str, url: str, shown: str) -> None:
    target = parse_uri(uri)
    assert (target.url, target.shown, target.address) == (url, shown, shown)


def test_bech32_lnurl_from_lud01() -> None:
    assert decode_lnurl(LUD01_LNURL) == LUD01_URL
    assert decode_lnurl(LUD01_LNURL.lower()) == LUD01_URL
    target = parse_uri(f"lnurl:{LUD01_LNURL}")
    assert target.url == LUD01_URL
    assert target.address is None
    # The query may carry a one-time token: it is never shown.
    assert target.shown == "LNURL https://service.com/api"
    assert parse_uri(f"lnurl:{LUD01_LNURL.lower()}").url == LUD01_URL


def test_bech32_lnurl_round_trip_and_loopback_http() -> None:
    url = "http://127.0.0.1:9999/lnurlp/shop?x=1"
    assert parse_uri(f"lnurl:{encode_lnurl(url)}").url == url


def test_url_form() -> None:
    target = parse_uri("lnurl:https://pay.example.com/lnurlp/alice?k=SECRET1")
    assert target.url == "https://pay.example.com/lnurlp/alice?k=SECRET1"
    assert "SECRET1" not in target.shown
    backend = open_backend("lnurl:https://pay.example.com/lnurlp/alice?k=SECRET1", dev_ledger="x")
    assert isinstance(backend, LnurlPayBackend)
    assert "SECRET1" not in backend.describe()


def test_dispatch_of_a_bare_address() -> None:
    backend = open_backend("alice@example.com", dev_ledger="unused.sqlite")
    assert isinstance(backend, LnurlPayBackend)
    assert backend.describe().startswith("Lightning Address alice@example.com (receive only")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("lnurl:", "lnurl URI without a target"),
        ("lnurl:   ", "lnurl URI without a target"),
        ("lnurl:not an address", "expected user@domain"),
        ("lnurl:http://example.com/lnurlp/a", "plain http to example.com"),
        ("lnurl:ftp://example.com/a", "not an https URL"),
        ("lnurl:https://example.com:99999/a", "not a valid URL"),
        ("lnurl:alice@example.com:99999", "bad port 99999"),
        ("lnurl:LNURL1QQQ", "not a bech32"),
        (f"lnurl:{LUD01_LNURL[:-1]}Q", "checksum mismatch"),
        (f"lnurl:{LUD01_LNURL[:20]}{LUD01_LNURL[20:].lower()}", "mixed upper and lower case"),
        ("lnurl:LNURL1DP68GURN8GHJ7Q", "checksum mismatch"),
        ("lnurl:lnurl1dp68gurn8ghj7bio", "outside the bech32 alphabet"),
        (f"lnurl:{encode_lnurl('http://example.com/pay')}", "plain http to example.com"),
    ],
)
def test_bad_uris_are_refused_clearly(uri: str, message: str) -> None:
    with pytest.raises(LightningError) as caught:
        open_backend(uri, dev_ledger="unused.sqlite")
    assert message in str(caught.value)


@pytest.mark.parametrize("uri", ["lnurl:alice@example.com", "alice@example.com"])
def test_a_lightning_address_cannot_pay(uri: str) -> None:
    with pytest.raises(LightningError) as caught:
        open_wallet(uri, dev_ledger="unused.sqlite")
    assert str(caught.value) == (
        "a Lightning Address can only receive; use it as l402_backend (the server's invoices), "
        "not as l402_wallet"
    )


# -- against the stand-in service ---------------------------------------------------------------


@pytest.fixture
async def service(ledger: DevLedger) -> AsyncIterator[LnurlService]:
    async with LnurlService(ledger, comment_allowed=12) as started:
        yield started


@pytest.fixture
async def backend(service: LnurlService) -> AsyncIterator[LnurlPayBackend]:
    opened = open_backend(f"lnurl:{service.address}", dev_ledger="unused.sqlite")
    assert isinstance(opened, LnurlPayBackend)
    try:
        yield opened
    finally:
        await opened.close()


async def test_info_names_the_address_and_its_description(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    node = await backend.info()
    assert node.backend == "lnurl"
    assert node.address == service.address
    assert node.alias == "Ad-free episodes (l402proxy test service)"
    assert node.network is None and node.pubkey is None


async def test_invoice_is_checked_and_usable(
    backend: LnurlPayBackend, service: LnurlService, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(21, "podcast: Ad-free episode", 600)
    assert invoice.amount_msat == 21_000
    decoded = decode_invoice(invoice.bolt11)
    assert decoded.payment_hash == invoice.payment_hash
    assert decoded.amount_msat == 21_000
    assert invoice.expires_at == decoded.expires_at
    # LUD-12: the memo travels as the comment, cut to commentAllowed characters.
    assert service.callbacks == [{"amount": "21000", "comment": "podcast: Ad-"}]
    # A real invoice of the merchant's dev wallet: a dev wallet pays it.
    before = await ledger.balance("merchant")
    paid = await ledger.pay("listener", invoice.bolt11, 0)
    assert hashlib.sha256(paid.preimage).digest() == invoice.payment_hash
    assert await ledger.balance("merchant") - before == 21_000


async def test_no_comment_unless_the_service_allows_one(ledger: DevLedger) -> None:
    async with LnurlService(ledger) as quiet:
        backend = LnurlPayBackend(parse_uri(f"lnurl:{quiet.address}"))
        try:
            await backend.create_invoice(5, "a memo", 600)
        finally:
            await backend.close()
    assert quiet.callbacks == [{"amount": "5000"}]


async def test_pay_request_is_cached_but_info_reads_it_afresh(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    await backend.create_invoice(21, "x", 600)
    await backend.create_invoice(21, "x", 600)
    assert service.pay_requests == 1
    await backend.info()
    assert service.pay_requests == 2


async def test_concurrent_invoices_share_one_pay_request(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    invoices = await asyncio.gather(*(backend.create_invoice(21, "x", 600) for _ in range(8)))
    assert len({invoice.payment_hash for invoice in invoices}) == 8
    assert service.pay_requests == 1


async def test_wrong_amount_is_refused(backend: LnurlPayBackend, service: LnurlService) -> None:
    service.knobs.amount_offset_msat = 1_000
    with pytest.raises(LightningError) as caught:
        await backend.create_invoice(21, "x", 600)
    assert str(caught.value) == (
        f"{service.address}: invoice for 21 sat: refused the invoice: it asks 22 sat, not 21 sat"
    )


async def test_wrong_description_hash_is_refused(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    service.knobs.wrong_description_hash = True
    with pytest.raises(LightningError) as caught:
        await backend.create_invoice(21, "x", 600)
    assert "refused the invoice: its description hash is not sha256 of the payRequest" in str(
        caught.value
    )


async def test_a_changed_metadata_is_read_again_after_a_refusal(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    await backend.create_invoice(21, "x", 600)
    # The service changes its metadata: the cached hash no longer matches its invoices once.
    service.description = "New description"
    with pytest.raises(LightningError, match="description hash"):
        await backend.create_invoice(21, "x", 600)
    invoice = await backend.create_invoice(21, "x", 600)
    assert invoice.amount_msat == 21_000
    assert service.pay_requests == 2


async def test_callback_error_reason_is_reported(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    service.knobs.callback_error = "Wallet is   frozen"
    with pytest.raises(ServiceError) as caught:
        await backend.create_invoice(21, "x", 600)
    assert str(caught.value) == (
        f"{service.address}: invoice for 21 sat: the service says: Wallet is frozen"
    )


async def test_pay_request_error_fails_info(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    service.knobs.pay_request_error = "User suspended"
    with pytest.raises(LightningError) as caught:
        await backend.info()
    assert str(caught.value) == f"{service.address}: payRequest: the service says: User suspended"


async def test_unknown_user(service: LnurlService) -> None:
    backend = LnurlPayBackend(parse_uri(f"lnurl:nobody@127.0.0.1:{service.port}"))
    try:
        with pytest.raises(LightningError, match="the service says: Unknown user"):
            await backend.info()
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        (50_000, 100_000, "accepts 50 sat to 100 sat; the price 21 sat is out of range"),
        (1_000, 20_500, "accepts 1 sat to 20500 msat; the price 21 sat is out of range"),
    ],
)
async def test_amount_out_of_range(ledger: DevLedger, low: int, high: int, message: str) -> None:
    async with LnurlService(ledger, min_sendable=low, max_sendable=high) as limited:
        backend = LnurlPayBackend(parse_uri(f"lnurl:{limited.address}"))
        try:
            with pytest.raises(LightningError) as caught:
                await backend.create_invoice(21, "x", 600)
        finally:
            await backend.close()
    assert str(caught.value) == f"{limited.address} {message}"
    assert limited.callbacks == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tag": "withdrawRequest"}, "tag is 'withdrawRequest', not 'payRequest'"),
        ({"callback": None}, "no callback URL"),
        ({"callback": "http://example.com/cb"}, "callback: plain http to example.com"),
        ({"minSendable": 5_000, "maxSendable": 1_000}, "1 <= min <= max"),
        ({"minSendable": 0}, "1 <= min <= max"),
        ({"maxSendable": "1000"}, "1 <= min <= max"),
        ({"metadata": [["text/plain", "x"]]}, "metadata must be a JSON string"),
        # Hosts httpx cannot use (an invalid IDNA label, a broken IPv6 literal, port 0).
        ({"callback": "https://xn--a.com/cb"}, "callback: 'xn--a.com' is not a valid host name"),
        ({"callback": "https://[::1/cb"}, "callback: not a valid URL"),
        ({"callback": "https://pay.example.com:0/cb"}, "callback: bad port 0"),
    ],
)
async def test_bad_pay_requests_are_refused(
    backend: LnurlPayBackend, service: LnurlService, extra: dict[str, object], message: str
) -> None:
    service.knobs.pay_request_extra = extra
    with pytest.raises(LightningError) as caught:
        await backend.info()
    assert message in str(caught.value)
    assert service.callbacks == []


# -- LUD-21 verify ------------------------------------------------------------------------------


async def test_lookup_without_verify_is_unsupported(
    backend: LnurlPayBackend, service: LnurlService
) -> None:
    service.knobs.verify = False
    invoice = await backend.create_invoice(21, "x", 600)
    with pytest.raises(LookupUnsupported) as caught:
        await backend.lookup_invoice(invoice.payment_hash)
    assert str(caught.value).startswith(
        "a Lightning Address cannot tell whether an invoice was paid; "
    )


async def test_verify_not_found(backend: LnurlPayBackend, service: LnurlService) -> None:
    invoice = await backend.create_invoice(21, "x", 600)
    service.wallet = "someone-else"  # the service no longer finds it
    with pytest.raises(InvoiceNotFound, match="the service says: Not found"):
        await backend.lookup_invoice(invoice.payment_hash)


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        ("preimage", "settled, but the preimage does not match the invoice"),
        ("settled", "settled, but without a 32-byte hex preimage"),
        ("invoice", "the answer is about another invoice"),
    ],
)
async def test_lying_verify_answers_are_refused(
    backend: LnurlPayBackend, service: LnurlService, lie: str, message: str
) -> None:
    first = await backend.create_invoice(21, "x", 600)
    await backend.create_invoice(21, "x", 600)  # "another invoice" for the lie to point at
    service.knobs.verify_lie = lie  # type: ignore[assignment]
    with pytest.raises(LightningError) as caught:
        await backend.lookup_invoice(first.payment_hash)
    assert message in str(caught.value)


# -- transport ----------------------------------------------------------------------------------


async def test_nothing_listening() -> None:
    port = free_port()
    backend = LnurlPayBackend(parse_uri(f"lnurl:shop@127.0.0.1:{port}"))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.info()
    finally:
        await backend.close()
    assert str(caught.value) == f"shop@127.0.0.1:{port}: payRequest: connection refused"


@pytest.fixture
async def odd_server() -> AsyncIterator[str]:
    """A loopback server answering in ways no LNURL service should."""
    hang = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await asyncio.wait_for(hang.wait(), 30)
        return web.json_response({})

    async def outward(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.com/.well-known/lnurlp/x")

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def html(_: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", status=503)

    async def huge(_: web.Request) -> web.Response:
        return web.Response(body=b"[" + b"1," * 600_000 + b"1]")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/outward", outward)
    app.router.add_get("/loop", loop)
    app.router.add_get("/html", html)
    app.router.add_get("/huge", huge)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        hang.set()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/slow", BackendUnavailable, "payRequest: no answer within 0.5 s"),
        (
            "/outward",
            LightningError,
            "payRequest: redirected: plain http to example.com "
            "(LNURL needs https; http only for 127.0.0.1/localhost)",
        ),
        ("/loop", LightningError, "payRequest: more than 3 redirects"),
        ("/html", BackendUnavailable, "payRequest: no JSON object in the answer (HTTP 503)"),
        ("/huge", LightningError, "payRequest: answer larger than 1048576 bytes"),
    ],
)
async def test_odd_answers(
    odd_server: str, path: str, error: type[Exception], message: str
) -> None:
    backend = LnurlPayBackend(parse_uri(f"lnurl:{odd_server}{path}"), timeout=0.5)
    try:
        with pytest.raises(error) as caught:
            await backend.info()
    finally:
        await backend.close()
    assert str(caught.value) == f"LNURL {odd_server}{path}: {message}"


async def test_an_untrusted_certificate_is_a_tls_error(
    service: LnurlService, tmp_path: Path
) -> None:
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(
        runner, "127.0.0.1", port, ssl_context=server_context(tmp_path, "lnurl")[0]
    ).start()
    backend = LnurlPayBackend(parse_uri(f"lnurl:https://127.0.0.1:{port}/.well-known/lnurlp/x"))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.info()
    finally:
        await backend.close()
        await runner.cleanup()
    assert str(caught.value) == (
        f"LNURL https://127.0.0.1:{port}/.well-known/lnurlp/x: payRequest: "
        "TLS handshake failed (CERTIFICATE_VERIFY_FAILED)"
    )


def test_metadata_hash_is_sha256_of_the_raw_string() -> None:
    # LUD-06: the hash is over the metadata string exactly as sent, not a re-serialisation.
    from l402proxy.lightning.lnurl import PayRequest

    raw = '[["text/plain",  "spaced"]]'
    request = PayRequest("https://x/cb", 1, 2, raw, 0, "spaced")
    assert request.description_hash == hashlib.sha256(raw.encode()).digest()
    assert request.description_hash != hashlib.sha256(json.dumps(json.loads(raw)).encode()).digest()


async def test_the_environments_proxy_is_never_used(
    service: LnurlService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY inside mitmdump may point at the client proxy itself: never used."""
    async with environment_proxy(monkeypatch) as proxy:
        backend = open_backend(f"lnurl:{service.address}", dev_ledger="unused.sqlite")
        try:
            await backend.info()
            invoice = await backend.create_invoice(21, "direct", 600)
            assert invoice.amount_msat == 21_000
        finally:
            await backend.close()
        assert proxy.seen == []
