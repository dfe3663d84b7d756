"""LNbits as invoice backend and as wallet, against a real LNbits 1.6.2 (FakeWallet funding).

The server proxy invoices from wallet A (its invoice/read key), the client proxy pays from
wallet B (its admin key); payments between wallets of one LNbits settle at once. The unit-level
checks run the backend and wallet classes against the same LNbits: keys, lookups, the states a
payment can end in. LNbits runs once per session (tests/lnbits_server.py). What every backend
does (invoices, lookups, paying, refusals) is the contract in tests/contract, LNbits included;
this file keeps what is particular to LNbits.
"""

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.invoice import decode_invoice
from l402proxy.launch import free_port
from l402proxy.lightning import (
    BackendUnavailable,
    DevLedger,
    LightningError,
    PaymentFailed,
    open_backend,
    open_wallet,
)
from l402proxy.lightning.lnbits import (
    LNbitsInvoiceBackend,
    LNbitsWallet,
    parse_uri,
)
from tests.lnbits_server import LNbitsServer, WalletKeys, lnbits  # noqa: F401 (fixture)
from tests.standins.proxy import environment_proxy

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
SECRET = "0123456789abcdef0123456789abcdef"
UNUSED_LEDGER = "unused-devledger.sqlite"


# -- URIs (no LNbits needed) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "base_url", "timeout"),
    [
        (f"lnbits://lnbits.example.com?key={SECRET}", "https://lnbits.example.com", 10.0),
        (
            f"LNbits+https://pay.example.com:5001/lnbits/?key={SECRET}",
            "https://pay.example.com:5001/lnbits",
            10.0,
        ),
        (f"lnbits+http://127.0.0.1:5000?key={SECRET}&timeout=2.5", "http://127.0.0.1:5000", 2.5),
        (f" lnbits+http://[::1]:5000/?timeout=1&key={SECRET} ", "http://[::1]:5000", 1.0),
    ],
)
def test_uri_forms(uri: str, base_url: str, timeout: float) -> None:
    config = parse_uri(uri)
    assert (config.base_url, config.key, config.timeout) == (base_url, SECRET, timeout)
    backend = open_backend(uri, dev_ledger=UNUSED_LEDGER)
    wallet = open_wallet(uri, dev_ledger=UNUSED_LEDGER)
    assert isinstance(backend, LNbitsInvoiceBackend) and isinstance(wallet, LNbitsWallet)
    for shown in (backend.describe(), wallet.describe(), wallet.identity, repr(config)):
        assert SECRET not in shown
    assert backend.describe().startswith(f"LNbits wallet at {base_url} (key ")
    assert wallet.identity == f"lnbits:{base_url.split('://')[1]}/{config.key_id}"


def test_identity_tells_keys_apart_and_is_stable() -> None:
    one = open_wallet(f"lnbits://h?key={SECRET}", dev_ledger=UNUSED_LEDGER)
    again = open_wallet(f"lnbits://h?key={SECRET}", dev_ledger=UNUSED_LEDGER)
    other = open_wallet(f"lnbits://h?key={SECRET[::-1]}", dev_ledger=UNUSED_LEDGER)
    assert isinstance(one, LNbitsWallet) and isinstance(again, LNbitsWallet)
    assert isinstance(other, LNbitsWallet)
    assert one.identity == again.identity != other.identity


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("lnbits://host", "has no ?key="),
        ("lnbits://host?key=", "has no ?key="),
        (f"lnbits://host?key={SECRET}&wallet=x", "unknown parameter 'wallet'"),
        (f"lnbits://host?key={SECRET}&key={SECRET}", "parameter 'key' given twice"),
        (f"lnbits://host?key={SECRET}%20x", "the key has spaces"),
        (f"lnbits://admin:{SECRET}@host", "the API key goes in ?key="),
        (f"lnbits://?key={SECRET}", "has no host"),
        (f"lnbits://host:99999?key={SECRET}", "bad host or port"),
        (f"lnbits://host?key={SECRET}#frag", "unexpected '#' part"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    for opener in (open_backend, open_wallet):
        with pytest.raises(LightningError) as caught:
            opener(uri, dev_ledger=UNUSED_LEDGER)
        assert message in str(caught.value)
        assert SECRET not in str(caught.value)


async def test_nothing_listening(tmp_path: Path) -> None:
    uri = f"lnbits+http://127.0.0.1:{free_port()}?key={SECRET}"
    backend = open_backend(uri, dev_ledger=UNUSED_LEDGER)
    wallet = open_wallet(uri, dev_ledger=UNUSED_LEDGER)
    bolt11 = await dev_invoice(tmp_path / "devledger.sqlite")
    try:
        with pytest.raises(BackendUnavailable) as down:
            await backend.info()
        assert str(down.value).endswith(": reading the wallet: connection refused")
        with pytest.raises(PaymentFailed) as failed:
            # Not even the fee reserve could be asked: nothing can have been sent.
            await wallet.pay(bolt11, 10_000)
        assert str(failed.value).endswith("connection refused; nothing was paid")
        assert SECRET not in str(down.value) + str(failed.value)
    finally:
        await backend.close()
        await wallet.close()


# -- against the real LNbits --------------------------------------------------------------------


async def dev_invoice(path: Path, amount_msat: int = 21_000) -> str:
    """A regtest invoice from a dev ledger: real, but no LNbits can route it."""
    ledger = DevLedger(path)
    try:
        return (await ledger.create_invoice("merchant", amount_msat, "elsewhere", 600)).bolt11
    finally:
        await ledger.close()


@dataclass
class Pair:
    """Wallet A receives (server side), wallet B pays (client side, funded)."""

    server: LNbitsServer
    a: WalletKeys
    b: WalletKeys
    backend: LNbitsInvoiceBackend
    wallet: LNbitsWallet

    def balances(self) -> tuple[int, int]:
        return self.server.balance_msat(self.a), self.server.balance_msat(self.b)


@pytest.fixture
async def pair(lnbits: LNbitsServer) -> AsyncIterator[Pair]:  # noqa: F811
    tag = secrets.token_hex(3)
    a, b = lnbits.create_wallet(f"shop-{tag}"), lnbits.create_wallet(f"listener-{tag}")
    lnbits.fund(b, 1_000)
    backend = open_backend(lnbits.uri(a.inkey), dev_ledger=UNUSED_LEDGER)
    wallet = open_wallet(lnbits.uri(b.adminkey), dev_ledger=UNUSED_LEDGER)
    assert isinstance(backend, LNbitsInvoiceBackend) and isinstance(wallet, LNbitsWallet)
    try:
        yield Pair(lnbits, a, b, backend, wallet)
    finally:
        await backend.close()
        await wallet.close()


async def test_info(pair: Pair) -> None:
    node = await pair.backend.info()
    assert (node.backend, node.address, node.alias) == ("lnbits", pair.server.url, pair.a.name)
    assert node.network is None and node.pubkey is None
    paying = await pair.wallet.info()
    assert paying.alias == pair.b.name


async def test_the_environments_proxy_is_never_used(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY / HTTPS_PROXY would carry X-Api-Key through someone else (inside mitmdump:
    the client proxy itself); LNbits is always reached directly."""
    async with environment_proxy(monkeypatch) as proxy:
        backend = open_backend(pair.server.uri(pair.a.inkey), dev_ledger=UNUSED_LEDGER)
        wallet = open_wallet(pair.server.uri(pair.b.adminkey), dev_ledger=UNUSED_LEDGER)
        try:
            await backend.info()
            await wallet.info()
            invoice = await backend.create_invoice(3, "direct", 600)
            result = await wallet.pay(invoice.bolt11, 10_000)
            assert result.payment_hash == invoice.payment_hash
        finally:
            await backend.close()
            await wallet.close()
        assert proxy.seen == []


async def test_https_to_a_plain_http_lnbits(lnbits: LNbitsServer) -> None:  # noqa: F811
    backend = open_backend(f"lnbits://127.0.0.1:{lnbits.port}?key={SECRET}", dev_ledger="x")
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.info()
    finally:
        await backend.close()
    assert str(caught.value) == (
        f"LNbits at https://127.0.0.1:{lnbits.port}: reading the wallet: TLS handshake failed "
        "(WRONG_VERSION_NUMBER); if this LNbits speaks plain http, use lnbits+http://"
    )


async def test_an_invoice_key_cannot_be_a_wallet(pair: Pair) -> None:
    wallet = LNbitsWallet(parse_uri(pair.server.uri(pair.b.inkey)))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await wallet.info()
        assert "this is the wallet's invoice/read key; paying needs its admin key" in str(
            caught.value
        )
        invoice = await pair.backend.create_invoice(21, "podcast", 600)
        with pytest.raises(PaymentFailed) as refused:
            await wallet.pay(invoice.bolt11, 10_000)
        assert "paying needs the wallet's admin key; nothing was paid" in str(refused.value)
        assert pair.b.inkey not in str(caught.value) + str(refused.value)
    finally:
        await wallet.close()
    assert (await pair.backend.lookup_invoice(invoice.payment_hash)).settled is False


async def test_a_wrong_key_is_an_auth_error_everywhere(pair: Pair) -> None:
    invoice = await pair.backend.create_invoice(21, "podcast", 600)
    wrong = pair.server.uri(SECRET)
    backend, wallet = LNbitsInvoiceBackend(parse_uri(wrong)), LNbitsWallet(parse_uri(wrong))
    calls = [
        backend.info(),
        backend.create_invoice(21, "x", 600),
        # LNbits answers payment lookups for any key, searching every wallet: a known hash
        # must not look like ours, and an unknown one must not look "never sent".
        backend.lookup_invoice(invoice.payment_hash),
        backend.lookup_invoice(secrets.token_bytes(32)),
        wallet.info(),
        wallet.lookup_payment(invoice.payment_hash),
        wallet.lookup_payment(secrets.token_bytes(32)),
    ]
    try:
        for call in calls:
            with pytest.raises(BackendUnavailable) as caught:
                await call
            message = str(caught.value)
            assert message.startswith(f"LNbits at {pair.server.url}: "), message
            assert "the API key" in message, message
            assert SECRET not in message
    finally:
        await backend.close()
        await wallet.close()


async def test_the_unpaid_preimage_lnbits_holds_is_kept_back(pair: Pair) -> None:
    invoice = await pair.backend.create_invoice(21, "podcast: Ad-free episode", 600)
    state = await pair.backend.lookup_invoice(invoice.payment_hash)
    assert (state.settled, state.preimage) == (False, None)
    # LNbits does hold the preimage of the unpaid invoice: the backend must not pass it on.
    with httpx.Client(base_url=pair.server.url, trust_env=False, timeout=10) as client:
        raw = client.get(
            f"/api/v1/payments/{invoice.payment_hash.hex()}",
            headers={"X-Api-Key": pair.a.inkey},
        ).json()
    assert raw["details"]["preimage"], "LNbits 1.6.2 shows the unpaid preimage in details"


async def test_paying_again_returns_the_same_payment_and_only_the_payer_paid(pair: Pair) -> None:
    invoice = await pair.backend.create_invoice(21, "podcast", 600)
    result = await pair.wallet.pay(invoice.bolt11, 10_000)
    after = pair.balances()
    # Paying again (a retry after a crash) returns the same payment, and pays nothing more.
    again = await pair.wallet.pay(invoice.bolt11, 10_000)
    assert again.preimage == result.preimage
    assert pair.balances() == after
    # The receiving wallet (LNbits lists its incoming row under the same hash) never paid it.
    receiver = LNbitsWallet(parse_uri(pair.server.uri(pair.a.adminkey)))
    try:
        assert (await receiver.lookup_payment(invoice.payment_hash)).status == "unknown"
    finally:
        await receiver.close()


async def test_a_payment_lnbits_cannot_route_fails_for_certain(pair: Pair, tmp_path: Path) -> None:
    bolt11 = await dev_invoice(tmp_path / "devledger.sqlite")
    payment_hash = decode_invoice(bolt11).payment_hash
    before = pair.balances()
    with pytest.raises(PaymentFailed) as caught:
        await pair.wallet.pay(bolt11, 10_000)
    assert "Only internal invoices can be used" in str(caught.value)
    state = await pair.wallet.lookup_payment(payment_hash)
    assert (state.status, state.preimage) == ("failed", None)
    assert pair.balances() == before


async def test_fee_limit_below_lnbits_fee_reserve_is_refused_before_paying(pair: Pair) -> None:
    invoice = await pair.backend.create_invoice(21, "podcast", 600)
    before = pair.balances()
    with pytest.raises(PaymentFailed) as caught:
        await pair.wallet.pay(invoice.bolt11, 1_999)
    # LNbits' default reserve: max(2000 msat, 1 %).
    assert str(caught.value) == (
        f"LNbits at {pair.server.url} may spend up to 2000 msat in fees on this payment (its fee "
        "reserve), more than the limit of 1999 msat; nothing was paid"
    )
    assert (await pair.wallet.lookup_payment(invoice.payment_hash)).status == "unknown"
    assert pair.balances() == before
    result = await pair.wallet.pay(invoice.bolt11, 2_000)
    assert hashlib.sha256(result.preimage).digest() == invoice.payment_hash


async def test_concurrent_invoices(pair: Pair) -> None:
    invoices = await asyncio.gather(
        *(pair.backend.create_invoice(1 + n, f"n{n}", 600) for n in range(5))
    )
    assert sorted(i.amount_msat for i in invoices) == [1_000, 2_000, 3_000, 4_000, 5_000]
    assert len({i.payment_hash for i in invoices}) == 5


# -- both proxies, end to end -------------------------------------------------------------------


@pytest.fixture
def proxies(
    lnbits: LNbitsServer,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[procs.Process, procs.Process, WalletKeys, WalletKeys]]:
    tag = secrets.token_hex(3)
    a, b = lnbits.create_wallet(f"shop-{tag}"), lnbits.create_wallet(f"listener-{tag}")
    lnbits.fund(b, 1_000)
    home, confdir = tmp_path / "home", tmp_path / "conf"
    home.mkdir()
    confdir.mkdir()
    started: list[procs.Process] = []
    try:
        origin = procs.origin(tmp_path, home).start()
        started.append(origin)
        server = procs.server_proxy(
            tmp_path,
            home,
            confdir,
            origin.url,
            PODCAST_RULES,
            f"l402_backend={lnbits.uri(a.inkey)}",
        ).start()
        started.append(server)
        client = procs.client_proxy(
            tmp_path, home, confdir, f"l402_wallet={lnbits.uri(b.adminkey)}"
        ).start()
        started.append(client)
        yield server, client, a, b
    finally:
        for process in reversed(started):
            process.stop()


def test_paid_episode_through_both_proxies_on_lnbits(
    lnbits: LNbitsServer,  # noqa: F811
    proxies: tuple[procs.Process, procs.Process, WalletKeys, WalletKeys],
) -> None:
    server, client, a, b = proxies
    before = (lnbits.balance_msat(a), lnbits.balance_msat(b))
    response = procs.fetch(client, server.url + "/episodes/ep1.mp3")
    logs = f"\n--- server:\n{server.log()[-3000:]}\n--- client:\n{client.log()[-3000:]}"
    assert response.status_code == 200, response.text + logs
    assert response.content == b"AD-FREE episode ep1\n"
    assert response.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
    after = (lnbits.balance_msat(a), lnbits.balance_msat(b))
    assert (after[0] - before[0], after[1] - before[1]) == (21_000, -21_000)

    # The token is reused: a second request pays nothing.
    again = procs.fetch(client, server.url + "/episodes/ep1.mp3")
    assert again.status_code == 200 and again.content == b"AD-FREE episode ep1\n"
    assert (lnbits.balance_msat(a), lnbits.balance_msat(b)) == after

    # Both proxies said where they get invoices and pay from, and never showed a key.
    assert f"LNbits wallet at {lnbits.url}" in server.log()
    assert f"LNbits wallet at {lnbits.url}" in client.log()
    for key in (a.inkey, a.adminkey, b.inkey, b.adminkey):
        assert key not in server.log() + client.log()


# -- answers the real LNbits cannot be made to give (FakeWallet settles at once) --------------


@dataclass
class FakeLNbits:
    """Scripted LNbits answers on 127.0.0.1: pending payments, proxies in front, lies."""

    url: str
    post: list[tuple[int, object]]  # answers to POST /api/v1/payments, in turn
    lookups: list[tuple[int, object]]  # answers to GET /api/v1/payments/{hash}, in turn
    hang: asyncio.Event
    posted: int = 0
    looked_up: int = 0


@pytest.fixture
async def fake_lnbits() -> AsyncIterator[FakeLNbits]:
    from aiohttp import web

    hang = asyncio.Event()
    fake = FakeLNbits("", [], [], hang)

    def answer(script: list[tuple[int, object]]) -> web.Response:
        status, body = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async def wallet(_: web.Request) -> web.Response:
        return web.json_response({"id": "w1", "name": "fake", "balance": 1_000_000})

    async def fee_reserve(_: web.Request) -> web.Response:
        return web.json_response({"fee_reserve": 2_000})

    async def pay(_: web.Request) -> web.Response:
        fake.posted += 1
        if fake.post and fake.post[0][1] == "hang":
            await asyncio.wait_for(hang.wait(), 30)
            return web.json_response({}, status=500)
        return answer(fake.post)

    async def lookup(_: web.Request) -> web.Response:
        fake.looked_up += 1
        return answer(fake.lookups)

    app = web.Application()
    app.router.add_get("/api/v1/wallet", wallet)
    app.router.add_get("/api/v1/payments/fee-reserve", fee_reserve)
    app.router.add_post("/api/v1/payments", pay)
    app.router.add_get("/api/v1/payments/{payment_hash}", lookup)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        hang.set()
        await runner.cleanup()


class SteppingClock:
    """Each reading is 10 s after the last: pay()'s pending wait ends after a few polls."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def payment_body(payment_hash: bytes, status: str, preimage: bytes | None = None) -> object:
    details = {
        "payment_hash": payment_hash.hex(),
        "status": status,
        "amount": -21_000,
        "fee": -1_000,
        # LNbits keeps a preimage for pending payments too (ours, made up here).
        "preimage": (preimage or secrets.token_bytes(32)).hex(),
    }
    return {
        "paid": status == "success",
        "status": status,
        "preimage": preimage.hex() if status == "success" and preimage else None,
        "details": details,
    }


@pytest.fixture
async def fake_wallet(fake_lnbits: FakeLNbits) -> AsyncIterator[LNbitsWallet]:
    wallet = LNbitsWallet(
        parse_uri(f"lnbits+http://{fake_lnbits.url[7:]}?key={SECRET}&timeout=1"),
        clock=SteppingClock(),
    )
    try:
        yield wallet
    finally:
        await wallet.close()


@pytest.fixture
async def invoice(tmp_path: Path) -> tuple[str, bytes, bytes]:
    """A real invoice (dev ledger), its payment hash and the preimage the fake 'learns'."""
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        made = await ledger.create_invoice("merchant", 21_000, "x", 600)
        preimage = (await ledger.pay("listener", made.bolt11, 0)).preimage
    finally:
        await ledger.close()
    return made.bolt11, made.payment_hash, preimage


async def test_a_pending_payment_is_awaited(
    fake_lnbits: FakeLNbits, fake_wallet: LNbitsWallet, invoice: tuple[str, bytes, bytes]
) -> None:
    bolt11, payment_hash, preimage = invoice
    fake_lnbits.post = [(201, {"payment_hash": payment_hash.hex(), "status": "pending"})]
    fake_lnbits.lookups = [
        (200, payment_body(payment_hash, "pending")),
        (200, payment_body(payment_hash, "success", preimage)),
    ]
    result = await fake_wallet.pay(bolt11, 10_000)
    assert (result.preimage, result.amount_msat, result.fee_msat) == (preimage, 21_000, 1_000)
    assert fake_lnbits.looked_up == 2


async def test_a_payment_pending_too_long_stays_unresolved(
    fake_lnbits: FakeLNbits, fake_wallet: LNbitsWallet, invoice: tuple[str, bytes, bytes]
) -> None:
    bolt11, payment_hash, _ = invoice
    fake_lnbits.post = [(201, {"payment_hash": payment_hash.hex(), "status": "pending"})]
    fake_lnbits.lookups = [(200, payment_body(payment_hash, "pending"))]
    with pytest.raises(LightningError) as caught:
        await fake_wallet.pay(bolt11, 10_000)
    assert not isinstance(caught.value, PaymentFailed)
    assert "still pending after 30 s; it is checked again later" in str(caught.value)
    state = await fake_wallet.lookup_payment(payment_hash)
    # LNbits' preimage of a pending payment is never passed on.
    assert (state.status, state.preimage, state.fee_msat) == ("pending", None, 1_000)


async def test_a_pending_payment_that_fails_later(
    fake_lnbits: FakeLNbits, fake_wallet: LNbitsWallet, invoice: tuple[str, bytes, bytes]
) -> None:
    bolt11, payment_hash, _ = invoice
    fake_lnbits.post = [(201, {"payment_hash": payment_hash.hex(), "status": "pending"})]
    fake_lnbits.lookups = [(200, payment_body(payment_hash, "failed"))]
    with pytest.raises(PaymentFailed, match="the payment failed"):
        await fake_wallet.pay(bolt11, 10_000)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        # A proxy in front of LNbits: the payment may still be under way behind it.
        (502, "<html>Bad Gateway</html>", "HTTP 502: <html>Bad Gateway</html>"),
        (504, "<html>Gateway Time-out</html>", "HTTP 504"),
        (520, "<html>Cloudflare: unknown error</html>", "HTTP 520"),
        (500, {"detail": "Unexpected error! ID: x"}, "HTTP 500: Unexpected error! ID: x"),
        (201, "not json", "HTTP 201"),
    ],
)
async def test_uncertain_answers_never_count_as_failed(
    fake_lnbits: FakeLNbits,
    fake_wallet: LNbitsWallet,
    invoice: tuple[str, bytes, bytes],
    status: int,
    body: object,
    message: str,
) -> None:
    bolt11, _, _ = invoice
    fake_lnbits.post = [(status, body)]
    fake_lnbits.lookups = [(404, {"detail": "Payment does not exist."})]
    with pytest.raises(LightningError) as caught:
        await fake_wallet.pay(bolt11, 10_000)
    assert not isinstance(caught.value, PaymentFailed)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


async def test_a_timeout_while_paying_is_not_a_failure(
    fake_lnbits: FakeLNbits, fake_wallet: LNbitsWallet, invoice: tuple[str, bytes, bytes]
) -> None:
    bolt11, _, _ = invoice
    fake_lnbits.post = [(201, "hang")]
    with pytest.raises(BackendUnavailable) as caught:
        await fake_wallet.pay(bolt11, 10_000)
    assert str(caught.value).endswith(": no answer within 1 s")
    assert fake_lnbits.posted == 1


@pytest.mark.parametrize(
    ("lookup", "outcome"),
    [
        ((404, {"detail": "Payment does not exist."}), "failed: Insufficient balance."),
        ("pending", "the payment is pending"),
        ("success", "paid"),
    ],
)
async def test_a_payment_error_is_checked_against_the_wallet(
    fake_lnbits: FakeLNbits,
    fake_wallet: LNbitsWallet,
    invoice: tuple[str, bytes, bytes],
    lookup: object,
    outcome: str,
) -> None:
    bolt11, payment_hash, preimage = invoice
    fake_lnbits.post = [(520, {"detail": "Insufficient balance.", "status": "failed"})]
    if lookup == "pending":
        fake_lnbits.lookups = [(200, payment_body(payment_hash, "pending"))]
    elif lookup == "success":
        fake_lnbits.lookups = [(200, payment_body(payment_hash, "success", preimage))]
    else:
        fake_lnbits.lookups = [lookup]  # type: ignore[list-item]
    if outcome == "paid":
        assert (await fake_wallet.pay(bolt11, 10_000)).preimage == preimage
        return
    with pytest.raises(LightningError) as caught:
        await fake_wallet.pay(bolt11, 10_000)
    assert outcome in str(caught.value)
    assert isinstance(caught.value, PaymentFailed) == (outcome.startswith("failed"))


async def test_a_wrong_preimage_is_never_success(
    fake_lnbits: FakeLNbits, fake_wallet: LNbitsWallet, invoice: tuple[str, bytes, bytes]
) -> None:
    bolt11, payment_hash, _ = invoice
    wrong = secrets.token_bytes(32)
    fake_lnbits.post = [
        (201, {"payment_hash": payment_hash.hex(), "status": "success", "preimage": wrong.hex()})
    ]
    fake_lnbits.lookups = [(200, payment_body(payment_hash, "success", wrong))]
    with pytest.raises(LightningError) as caught:
        await fake_wallet.pay(bolt11, 10_000)
    assert not isinstance(caught.value, PaymentFailed)
    assert "paid, but without a matching preimage" in str(caught.value)
