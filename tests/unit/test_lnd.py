"""The LND backend and wallet (l402proxy.lightning.lnd) against the stand-in LND in this process:
real gRPC over TLS with macaroon metadata, LND's codes and texts, invoices from a dev ledger.

URI parsing needs no node; everything else talks to tests.standins.lnd on 127.0.0.1. What every
backend does (invoices, lookups, paying, refusals) is the contract in tests/contract; this file
keeps what is particular to LND.
"""

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from l402proxy.launch import free_port
from l402proxy.lightning import DevLedger, lnd, open_backend, open_wallet
from l402proxy.lightning.base import (
    BackendUnavailable,
    InvoiceNotFound,
    LightningError,
    NothingSent,
    PaymentFailed,
)
from l402proxy.lightning.common import payable_invoice
from l402proxy.lightning.lnd import (
    DEFAULT_PORT,
    LndInvoiceBackend,
    LndNode,
    LndWallet,
    backend_from_uri,
    parse_uri,
    wallet_from_uri,
)
from tests.backends import until_expired
from tests.conftest import require
from tests.standins.lnd import (
    StandinLnd,
    b64url,
    bake_macaroon,
    make_tls_cert,
)
from tests.standins.proxy import environment_proxy

PRICE_SAT = 21


# -- URI parsing ---------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    cert_pem, _ = make_tls_cert()
    cert = tmp_path / "tls.cert"
    cert.write_bytes(cert_pem)
    macaroon = tmp_path / "admin.macaroon"
    macaroon.write_bytes(bake_macaroon("admin"))
    return {"cert": cert, "macaroon": macaroon}


def lnd_uri(host: str, files: dict[str, Path], extra: str = "") -> str:
    return f"lnd://{host}?cert={files['cert']}&macaroon={files['macaroon']}{extra}"


def der_b64(cert_path: Path) -> str:
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(Encoding.DER)
    return b64url(der)


def test_an_lnd_uri_reads_both_files_now(files: dict[str, Path]) -> None:
    target = parse_uri(lnd_uri("node.example:10010", files))
    assert (target.host, target.port, target.address) == (
        "node.example",
        10010,
        "node.example:10010",
    )
    assert target.macaroon == files["macaroon"].read_bytes()
    assert target.cert_pem is not None and b"BEGIN CERTIFICATE" in target.cert_pem
    assert target.cert_source == str(files["cert"])
    backend = backend_from_uri(lnd_uri("node.example:10010", files))
    assert backend.describe() == f"LND at node.example:10010 (cert {files['cert']})"
    wallet = wallet_from_uri(lnd_uri("node.example:10010", files))
    assert wallet.identity == "lnd:node.example:10010"
    assert backend.name == wallet.name == "lnd"


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("node.example", f"node.example:{DEFAULT_PORT}"),
        ("NODE.example:10009", "node.example:10009"),
        ("[::1]", f"[::1]:{DEFAULT_PORT}"),
        ("[::1]:10011", "[::1]:10011"),
        ("192.0.2.7:1", "192.0.2.7:1"),
    ],
)
def test_hosts_and_default_port(host: str, address: str, files: dict[str, Path]) -> None:
    assert parse_uri(lnd_uri(host, files)).address == address


def test_the_dispatcher_opens_lnd_and_lndconnect_uris(
    files: dict[str, Path], tmp_path: Path
) -> None:
    ledger = tmp_path / "devledger.sqlite"
    assert isinstance(open_backend(lnd_uri("h", files), dev_ledger=ledger), LndInvoiceBackend)
    connect = f"lndconnect://h:1?macaroon={b64url(files['macaroon'].read_bytes())}"
    assert isinstance(open_wallet(connect, dev_ledger=ledger), LndWallet)
    assert not ledger.exists()


def test_an_lndconnect_uri_carries_cert_and_macaroon_inline(files: dict[str, Path]) -> None:
    macaroon = files["macaroon"].read_bytes()
    uri = f"lndconnect://10.0.0.2:10009?cert={der_b64(files['cert'])}&macaroon={b64url(macaroon)}"
    target = parse_uri(uri)
    assert target.macaroon == macaroon and target.cert_source == "inline"
    assert target.cert_pem == files["cert"].read_bytes()
    assert backend_from_uri(uri).describe() == "LND at 10.0.0.2:10009 (cert inline)"
    # A CA-signed node needs no cert: the system roots decide.
    bare = parse_uri(f"lndconnect://node.example?macaroon={b64url(macaroon)}")
    assert (bare.cert_pem, bare.cert_source, bare.port) == (None, "system CA roots", DEFAULT_PORT)
    # Padded standard base64 and the hex form some generators write are read too.
    padded = base64.b64encode(macaroon).decode()
    assert parse_uri(f"lndconnect://h?macaroon={quote(padded)}").macaroon == macaroon
    assert parse_uri(f"lndconnect://h?macaroon={macaroon.hex()}").macaroon == macaroon


def test_file_paths_may_hold_plus_and_percent_escapes(files: dict[str, Path]) -> None:
    odd = files["macaroon"].with_name("a+b c.macaroon")
    odd.write_bytes(files["macaroon"].read_bytes())
    uri = f"lnd://h?cert={files['cert']}&macaroon={quote(str(odd), safe='/+')}"
    assert parse_uri(uri).macaroon == odd.read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: f"lnd://h?cert={f['cert']}.missing&macaroon={f['macaroon']}", "cert"),
        (lambda f: f"lnd://h?cert={f['cert']}&macaroon={f['macaroon']}.missing", "macaroon"),
        (lambda f: f"lnd://h?cert={f['cert']}", "parameter 'macaroon' is missing"),
        (lambda f: f"lnd://h?cert={f['cert']}&macaroon=", "parameter 'macaroon' is missing"),
        (lambda f: f"lnd://h?cert=&macaroon={f['macaroon']}", "parameter 'cert' is empty"),
        (lambda f: f"lnd://h:abc?macaroon={f['macaroon']}", "bad port 'abc'"),
        (lambda f: f"lnd://h:0?macaroon={f['macaroon']}", "bad port '0'"),
        (lambda f: f"lnd://h:70000?macaroon={f['macaroon']}", "bad port '70000'"),
        (lambda f: f"lnd://h:?macaroon={f['macaroon']}", "bad port ''"),
        (lambda f: f"lnd://::1:10009?macaroon={f['macaroon']}", "IPv6 host in brackets"),
        (lambda f: f"lnd://?macaroon={f['macaroon']}", "no host"),
        (lambda f: f"lnd://u:p@h?macaroon={f['macaroon']}", "user or password"),
        (lambda f: f"lnd://h/x?macaroon={f['macaroon']}", "unexpected path"),
        (lambda f: f"lnd://h?macaroon={f['macaroon']}&tls=1", "unknown parameter 'tls'"),
        (lambda f: f"lnd://h?macaroon={f['macaroon']}&macaroon=x", "'macaroon' given twice"),
        (lambda f: f"lnd://h?cert={f['macaroon']}&macaroon={f['macaroon']}", "not a certificate"),
        (lambda f: "lndconnect://h?macaroon=%%%", "'macaroon' is not valid base64url"),
        (lambda f: "lndconnect://h?macaroon=AgE&cert=!!", "'cert' is not valid base64url"),
        (lambda f: "lndconnect://h?macaroon=AgE&cert=AAAA", "not a base64url DER certificate"),
        (lambda f: "lndconnect://h?macaroon=AAAA", "not a binary LND macaroon"),
    ],
)
def test_bad_uris_say_what_is_wrong(
    make: Callable[[dict[str, Path]], str], message: str, files: dict[str, Path]
) -> None:
    uri = make(files)
    with pytest.raises(LightningError) as caught:
        backend_from_uri(uri)
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text
    assert text.startswith(("lnd URI: ", "lndconnect URI: ")), text
    assert_no_secret(text, files["macaroon"].read_bytes())


def test_unreadable_files_are_named_with_their_path(files: dict[str, Path]) -> None:
    missing = files["cert"].with_name("nope.cert")
    with pytest.raises(LightningError) as caught:
        parse_uri(f"lnd://h?cert={missing}&macaroon={files['macaroon']}")
    assert str(caught.value) == (
        f"lnd URI: cannot read the cert file {missing}: No such file or directory"
    )
    with pytest.raises(LightningError) as caught:
        parse_uri(f"lnd://h?cert={files['cert']}&macaroon={files['cert'].parent}")
    assert f"cannot read the macaroon file {files['cert'].parent}" in str(caught.value)


def test_a_hex_macaroon_file_is_refused_with_a_hint(files: dict[str, Path]) -> None:
    macaroon = files["macaroon"].read_bytes()
    hex_file = files["macaroon"].with_name("admin.hex")
    hex_file.write_text(macaroon.hex() + "\n")
    with pytest.raises(LightningError) as caught:
        parse_uri(f"lnd://h?macaroon={hex_file}")
    text = str(caught.value)
    assert f"the macaroon in {hex_file} is hex text" in text
    assert_no_secret(text, macaroon)


def test_the_macaroon_never_shows_in_repr_or_describe(files: dict[str, Path]) -> None:
    macaroon = files["macaroon"].read_bytes()
    uri = f"lndconnect://h?cert={der_b64(files['cert'])}&macaroon={b64url(macaroon)}"
    target = parse_uri(uri)
    for text in (repr(target), str(target), backend_from_uri(uri).describe()):
        assert_no_secret(text, macaroon)


def test_a_cert_that_does_not_name_the_host_is_checked_under_a_name_it_has(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    full = parse_uri(lnd_uri("127.0.0.1", files))
    assert full.name_override is None  # LND's cert names 127.0.0.1 and localhost
    assert parse_uri(lnd_uri("localhost", files)).name_override is None
    # Reached through an address the cert does not list (Docker, VPN, port forward).
    assert parse_uri(lnd_uri("10.9.8.7", files)).name_override == "localhost"
    assert parse_uri(lnd_uri("node.example", files)).name_override == "localhost"
    only_ip, _ = make_tls_cert(dns_names=(), ips=("192.0.2.1",))
    cert = tmp_path / "ip.cert"
    cert.write_bytes(only_ip)
    target = parse_uri(f"lnd://198.51.100.1?cert={cert}&macaroon={files['macaroon']}")
    assert target.name_override == "192.0.2.1"


def assert_no_secret(text: str, macaroon: bytes) -> None:
    assert macaroon.hex() not in text
    assert macaroon.hex().upper() not in text
    assert b64url(macaroon) not in text
    assert base64.b64encode(macaroon).decode().rstrip("=") not in text
    # Not even a recognisable piece of the macaroon body (its identifier starts at byte 6).
    assert macaroon[6:22].hex() not in text


# -- against the stand-in ------------------------------------------------------------------------


@pytest.fixture
async def merchant(tmp_path: Path, ledger_path: Path) -> AsyncIterator[StandinLnd]:
    async with StandinLnd(ledger_path, "merchant", tmp_path / "lnd-merchant") as node:
        yield node


@pytest.fixture
async def listener(tmp_path: Path, ledger_path: Path) -> AsyncIterator[StandinLnd]:
    async with StandinLnd(ledger_path, "listener", tmp_path / "lnd-listener") as node:
        yield node


@pytest.fixture
async def backend(merchant: StandinLnd) -> AsyncIterator[LndInvoiceBackend]:
    opened = backend_from_uri(merchant.uri())
    yield opened
    await opened.close()


@pytest.fixture
async def wallet(listener: StandinLnd) -> AsyncIterator[LndWallet]:
    opened = wallet_from_uri(listener.lndconnect_uri())
    yield opened
    await opened.close()


@contextlib.asynccontextmanager
async def closing(*nodes: LndInvoiceBackend | LndWallet) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for node in nodes:
            await node.close()


async def balance(ledger_path: Path, wallet: str) -> int:
    ledger = DevLedger(ledger_path)
    try:
        return await ledger.balance(wallet)
    finally:
        await ledger.close()


async def error_of(job: Awaitable[object]) -> LightningError:
    with pytest.raises(LightningError) as caught:
        await job
    return caught.value


async def test_info_says_which_node_answered(
    backend: LndInvoiceBackend, wallet: LndWallet, merchant: StandinLnd, listener: StandinLnd
) -> None:
    ledger = DevLedger(merchant.ledger.path)
    try:
        await ledger.open()
        pubkey = ledger.node_id
    finally:
        await ledger.close()
    info = await backend.info()
    assert (info.backend, info.address, info.alias) == ("lnd", merchant.address, "standin-merchant")
    assert (info.network, info.pubkey) == ("regtest", pubkey)
    assert (await wallet.info()).alias == "standin-listener"
    # The backend also checked, without making an invoice, that it may create invoices.
    assert "/lnrpc.Lightning/AddInvoice" in merchant.calls
    assert await merchant.ledger.list_invoices(wallet="merchant") == []


async def test_paying_an_invoice_lnd_already_paid_returns_the_same_preimage(
    backend: LndInvoiceBackend, wallet: LndWallet, listener: StandinLnd, ledger_path: Path
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
    first = await wallet.pay(invoice.bolt11, 0)
    before = await balance(ledger_path, "listener")
    # LND refuses with ALREADY_EXISTS "invoice is already paid"; the wallet follows the
    # earlier payment instead of calling it failed.
    again = await wallet.pay(invoice.bolt11, 0)
    assert again.preimage == first.preimage and again.amount_msat == 21000
    assert listener.calls.count("/routerrpc.Router/TrackPaymentV2") == 1
    assert await balance(ledger_path, "listener") == before


async def test_an_unknown_invoice_is_not_found_on_a_new_node_and_on_a_busy_one(
    backend: LndInvoiceBackend,
) -> None:
    # No invoice at all yet: LND answers UNKNOWN "there are no existing invoices".
    with pytest.raises(InvoiceNotFound):
        await backend.lookup_invoice(b"\x01" * 32)
    await backend.create_invoice(1, "", 600)
    # Now NOT_FOUND "unable to locate invoice".
    with pytest.raises(InvoiceNotFound) as caught:
        await backend.lookup_invoice(b"\x01" * 32)
    assert "01" * 32 in str(caught.value)


async def test_an_invoice_of_another_wallet_on_the_ledger_is_not_this_nodes(
    backend: LndInvoiceBackend, listener: StandinLnd
) -> None:
    other = backend_from_uri(listener.uri())
    async with closing(other):
        invoice = await other.create_invoice(3, "not the merchant's", 600)
        with pytest.raises(InvoiceNotFound):
            await backend.lookup_invoice(invoice.payment_hash)


async def test_a_payment_lnd_says_failed_raises_payment_failed(
    backend: LndInvoiceBackend, wallet: LndWallet, listener: StandinLnd, ledger_path: Path
) -> None:
    listener.mode = "no_route"
    before = await balance(ledger_path, "listener")
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert str(caught.value) == (
        f"lnd at {listener.address}: payment failed: FAILURE_REASON_NO_ROUTE"
    )
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "failed"
    assert await balance(ledger_path, "listener") == before


async def test_a_payment_that_never_ends_is_unresolved_not_failed(
    backend: LndInvoiceBackend, listener: StandinLnd, ledger_path: Path
) -> None:
    listener.mode = "hang"
    wallet = LndWallet(LndNode(parse_uri(listener.uri())), payment_timeout=1, stream_margin=0.5)
    async with closing(wallet):
        invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
        error = await error_of(wallet.pay(invoice.bolt11, 0))
        assert type(error) is BackendUnavailable, error
        assert str(error) == (
            f"lnd at {listener.address}: no answer to pay (SendPaymentV2) within 1.5 s; "
            "the payment may still complete (checked again later)"
        )
        assert (await wallet.lookup_payment(invoice.payment_hash)).status == "pending"
        # Paying again while LND still has it in flight: refused ("payment is in
        # transition"), followed, and still unresolved, never failed.
        again = await error_of(wallet.pay(invoice.bolt11, 0))
        assert type(again) is BackendUnavailable, again
        assert "payment is in transition" in str(again)

        before = await balance(ledger_path, "listener")
        await listener.finish_hanging(pay=True)
        state = await wallet.lookup_payment(invoice.payment_hash)
        assert state.status == "succeeded" and state.preimage is not None
        assert hashlib.sha256(state.preimage).digest() == invoice.payment_hash
        assert before - await balance(ledger_path, "listener") == 21000


async def wait_in_flight(node: StandinLnd, payment_hash: bytes) -> None:
    for _ in range(500):
        if payment_hash in node.in_flight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the payment never reached the stand-in")


async def test_a_hanging_payment_that_lnd_fails_later_raises_payment_failed(
    backend: LndInvoiceBackend, wallet: LndWallet, listener: StandinLnd
) -> None:
    listener.mode = "hang"
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
    paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
    await wait_in_flight(listener, invoice.payment_hash)
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "pending"
    await listener.finish_hanging(pay=False)
    with pytest.raises(PaymentFailed, match="FAILURE_REASON_NO_ROUTE"):
        await paying
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "failed"


async def test_a_hanging_payment_that_lnd_settles_later_returns_the_preimage(
    backend: LndInvoiceBackend, wallet: LndWallet, listener: StandinLnd
) -> None:
    listener.mode = "hang"
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
    paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
    await wait_in_flight(listener, invoice.payment_hash)
    await listener.finish_hanging(pay=True)
    paid = await paying
    assert hashlib.sha256(paid.preimage).digest() == invoice.payment_hash


async def test_a_stream_cut_mid_payment_is_unresolved_not_failed(
    backend: LndInvoiceBackend, wallet: LndWallet, listener: StandinLnd
) -> None:
    listener.mode = "hang"
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
    paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
    await wait_in_flight(listener, invoice.payment_hash)
    await listener.stop()  # lnd goes away with the payment out
    error = await error_of(paying)
    assert type(error) is BackendUnavailable, error
    assert str(error).startswith(f"lnd at {listener.address}: ")
    assert str(error).endswith("; the payment may still complete (checked again later)")


async def test_a_cancelled_pay_leaves_the_payment_to_lnd(
    backend: LndInvoiceBackend, wallet: LndWallet, listener: StandinLnd
) -> None:
    listener.mode = "hang"
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wallet.pay(invoice.bolt11, 0), 0.5)
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "pending"


async def test_a_bad_invoice_is_refused_before_anything_is_sent(
    wallet: LndWallet, listener: StandinLnd
) -> None:
    with pytest.raises(PaymentFailed, match="not paid: invalid BOLT11 invoice"):
        await wallet.pay("lnbcrt1notaninvoice", 0)
    assert listener.calls == []


async def test_an_invoice_lnd_finds_expired_is_a_definite_failure(
    backend: LndInvoiceBackend,
    wallet: LndWallet,
    listener: StandinLnd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Our clock behind LND's: we send an invoice LND finds expired. It refuses it while reading
    the request ("invoice expired. Valid until ..."), before any payment exists: failed, not
    "may still complete"."""
    invoice = await backend.create_invoice(PRICE_SAT, "ep", 1)
    await until_expired(invoice)
    behind = invoice.expires_at - 30.0
    monkeypatch.setattr(lnd, "payable_invoice", lambda text: payable_invoice(text, now=behind))
    error = await error_of(wallet.pay(invoice.bolt11, 0))
    assert type(error) is PaymentFailed, error
    assert str(error).startswith(f"lnd at {listener.address}: not paid: invoice expired. Valid")
    assert "/routerrpc.Router/SendPaymentV2" in listener.calls
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "unknown"


async def test_one_channel_serves_every_call_and_close_reopens_lazily(
    backend: LndInvoiceBackend,
) -> None:
    await backend.create_invoice(1, "a", 600)
    channel = backend.node._channel
    assert channel is not None
    for _ in range(3):
        await backend.create_invoice(1, "b", 600)
    assert backend.node._channel is channel
    await backend.close()
    assert backend.node._channel is None
    await backend.create_invoice(1, "c", 600)
    assert backend.node._channel is not None and backend.node._channel is not channel


async def test_backend_uri_makes_no_connection_until_used(merchant: StandinLnd) -> None:
    opened = backend_from_uri(merchant.uri())
    async with closing(opened):
        assert opened.node._channel is None and merchant.calls == []


# -- macaroons ---------------------------------------------------------------------------------


async def test_invoice_macaroon_serves_a_paywall(merchant: StandinLnd) -> None:
    """invoice.macaroon has no info:read: info() confirms the node another way."""
    backend = backend_from_uri(merchant.uri("invoice"))
    async with closing(backend):
        info = await backend.info()
        assert (info.backend, info.address, info.alias, info.network) == (
            "lnd",
            merchant.address,
            None,
            None,
        )
        invoice = await backend.create_invoice(2, "ok", 600)
        assert not (await backend.lookup_invoice(invoice.payment_hash)).settled


async def test_a_readonly_macaroon_is_caught_at_start_on_the_server(
    merchant: StandinLnd,
) -> None:
    backend = backend_from_uri(merchant.uri("readonly"))
    async with closing(backend):
        error = await error_of(backend.info())
        assert type(error) is BackendUnavailable
        assert str(error) == (
            f"lnd at {merchant.address}: the macaroon may not create invoices (AddInvoice) "
            "(permission denied); use admin.macaroon or one baked with the needed permissions"
        )
        assert await merchant.ledger.list_invoices(wallet="merchant") == []


def may_not_pay(node: StandinLnd) -> str:
    return (
        f"lnd at {node.address}: the macaroon may not pay (SendPaymentV2) (permission denied); "
        "use admin.macaroon or one baked with offchain:read and offchain:write"
    )


@pytest.mark.parametrize("asks", [True, False], ids=["CheckMacaroonPermissions", "old-lnd-probe"])
async def test_a_readonly_macaroon_is_refused_at_start_and_nothing_is_sent(
    backend: LndInvoiceBackend, listener: StandinLnd, ledger_path: Path, asks: bool
) -> None:
    """readonly.macaroon may GetInfo, so without a permission check the client would start
    and then fail every payment: it is refused at info(), where the client checks at start."""
    listener.check_permissions = asks
    wallet = wallet_from_uri(listener.uri("readonly"))
    async with closing(wallet):
        before = await balance(ledger_path, "listener")
        error = await error_of(wallet.info())
        assert type(error) is BackendUnavailable
        assert str(error) == may_not_pay(listener)
        assert "may still complete" not in str(error)
        assert "/lnrpc.Lightning/CheckMacaroonPermissions" in listener.calls
        # Paying anyway is refused the same way, and this node never saw a payment.
        invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
        error = await error_of(wallet.pay(invoice.bolt11, 0))
        # Refused before LND's handler ran: unavailable, and the payer may end it at once.
        assert type(error) is NothingSent
        assert "the macaroon may not pay (SendPaymentV2) (permission denied)" in str(error)
        assert (await wallet.lookup_payment(invoice.payment_hash)).status == "unknown"
        assert await balance(ledger_path, "listener") == before


async def test_admin_macaroon_passes_the_permission_check_without_paying(
    listener: StandinLnd, ledger_path: Path
) -> None:
    wallet = wallet_from_uri(listener.uri("admin"))
    async with closing(wallet):
        before = await balance(ledger_path, "listener")
        assert (await wallet.info()).alias == "standin-listener"
        assert listener.calls.count("/lnrpc.Lightning/CheckMacaroonPermissions") == 2
        assert "/routerrpc.Router/SendPaymentV2" not in listener.calls
        assert await balance(ledger_path, "listener") == before


@pytest.mark.parametrize("asks", [True, False], ids=["no-macaroon-read", "old-lnd"])
async def test_a_macaroon_baked_for_paying_passes_by_probing(
    backend: LndInvoiceBackend, listener: StandinLnd, ledger_path: Path, asks: bool
) -> None:
    """Without macaroon:read (or on an LND without CheckMacaroonPermissions) the RPCs are
    probed with requests LND refuses after the macaroon check, before doing anything."""
    listener.check_permissions = asks
    wallet = wallet_from_uri(listener.uri("pay"))
    async with closing(wallet):
        before = await balance(ledger_path, "listener")
        assert (await wallet.info()).alias == "standin-listener"
        assert "/routerrpc.Router/SendPaymentV2" in listener.calls
        assert "/routerrpc.Router/TrackPaymentV2" in listener.calls
        assert await balance(ledger_path, "listener") == before
        invoice = await backend.create_invoice(PRICE_SAT, "ep", 600)
        assert (await wallet.pay(invoice.bolt11, 0)).payment_hash == invoice.payment_hash


async def test_a_macaroon_that_may_only_track_is_refused_by_the_probe(
    listener: StandinLnd,
) -> None:
    wallet = wallet_from_uri(listener.uri("track"))
    async with closing(wallet):
        error = await error_of(wallet.info())
        assert type(error) is BackendUnavailable
        assert str(error) == may_not_pay(listener)


async def test_another_nodes_macaroon_is_rejected(
    merchant: StandinLnd, listener: StandinLnd
) -> None:
    uri = f"lnd://{merchant.address}?cert={merchant.cert_path}&macaroon={listener.macaroon_path()}"
    wallet = wallet_from_uri(uri)
    async with closing(wallet):
        error = await error_of(wallet.info())
        assert type(error) is BackendUnavailable
        assert str(error) == (
            f"lnd at {merchant.address}: macaroon rejected (verification failed: signature "
            "mismatch after caveat verification); is it this node's macaroon?"
        )
        assert_no_secret(str(error), listener.macaroons["admin"])


async def test_a_locked_wallet_says_so(merchant: StandinLnd, backend: LndInvoiceBackend) -> None:
    merchant.mode = "locked"
    error = await error_of(backend.create_invoice(1, "", 600))
    assert type(error) is BackendUnavailable
    assert str(error) == (
        f"lnd at {merchant.address}: wallet locked, unlock it to enable full RPC access "
        "(lncli unlock)"
    )


# -- transport failures ----------------------------------------------------------------------------


async def test_a_different_self_signed_cert_fails_the_tls_handshake(
    merchant: StandinLnd, tmp_path: Path
) -> None:
    other, _ = make_tls_cert()
    wrong = tmp_path / "other-tls.cert"
    wrong.write_bytes(other)
    backend = backend_from_uri(
        f"lnd://{merchant.address}?cert={wrong}&macaroon={merchant.macaroon_path()}"
    )
    async with closing(backend):
        error = await error_of(backend.info())
        assert type(error) is BackendUnavailable
        assert str(error) == (
            f"lnd at {merchant.address}: TLS handshake failed: the node's certificate does "
            f"not match cert {wrong}"
        )
        assert merchant.calls == []


async def test_a_self_signed_node_without_a_pinned_cert_is_not_trusted(
    merchant: StandinLnd,
) -> None:
    macaroon = b64url(merchant.macaroons["admin"])
    wallet = wallet_from_uri(f"lndconnect://{merchant.address}?macaroon={macaroon}")
    async with closing(wallet):
        error = await error_of(wallet.info())
        assert str(error) == (
            f"lnd at {merchant.address}: TLS handshake failed: the node's certificate is not "
            "trusted by the system CA roots; add cert=<the node's tls.cert>"
        )


async def test_a_cert_without_the_address_still_works_when_pinned(
    tmp_path: Path, ledger_path: Path
) -> None:
    # What LND users hit reaching the node by an address its tls.cert does not list.
    async with StandinLnd(
        ledger_path, "merchant", tmp_path / "named", cert_dns=("localhost",), cert_ips=()
    ) as node:
        backend = backend_from_uri(node.uri())
        async with closing(backend):
            assert backend.node.target.name_override == "localhost"
            assert (await backend.info()).alias == "standin-merchant"


async def test_ipv6_loopback(tmp_path: Path, ledger_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        require(False, "an IPv6 loopback (::1)")
    async with StandinLnd(ledger_path, "merchant", tmp_path / "v6", host="::1") as node:
        assert node.uri().startswith(f"lnd://[::1]:{node.port}?")
        backend = backend_from_uri(node.uri())
        async with closing(backend):
            assert (await backend.info()).address == f"[::1]:{node.port}"
            await backend.create_invoice(1, "v6", 600)


async def test_a_closed_port_is_connection_refused(files: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    wallet = wallet_from_uri(lnd_uri(f"127.0.0.1:{port}", files))
    async with closing(wallet):
        error = await error_of(wallet.info())
        assert type(error) is BackendUnavailable
        assert str(error) == (
            f"lnd at 127.0.0.1:{port}: connection refused (is lnd running, with gRPC on "
            f"port {port}?)"
        )
        # Refused before anything reached a node: not "may still complete".
        error = await error_of(wallet.pay(await any_invoice(tmp_path), 0))
        assert type(error) is NothingSent and "may still complete" not in str(error)
        assert (await error_of(wallet.lookup_payment(bytes(32)))).args == error.args


async def any_invoice(tmp_path: Path) -> str:
    ledger = DevLedger(tmp_path / "elsewhere.sqlite")
    try:
        return (await ledger.create_invoice("merchant", 1000, "", 600)).bolt11
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def silent_node() -> AsyncIterator[int]:
    """The port of a node that accepts connections and never answers."""
    writers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _r, w: writers.append(w), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # Python 3.12's wait_closed() also waits for open connections: close them first.
        for writer in writers:
            writer.close()
        await asyncio.wait_for(server.wait_closed(), 10)


async def test_a_node_that_never_answers_times_out(files: dict[str, Path]) -> None:
    async with silent_node() as port:
        backend = backend_from_uri(lnd_uri(f"127.0.0.1:{port}", files, "&timeout=1"))
        async with closing(backend):
            error = await error_of(backend.create_invoice(1, "", 600))
            assert type(error) is BackendUnavailable
            assert str(error) == (
                f"lnd at 127.0.0.1:{port}: no answer to create an invoice (AddInvoice) within 1 s"
            )


async def test_failure_messages_are_distinct_one_line_and_secret_free(
    merchant: StandinLnd, listener: StandinLnd, files: dict[str, Path], tmp_path: Path
) -> None:
    other, _ = make_tls_cert()
    wrong = tmp_path / "wrong.cert"
    wrong.write_bytes(other)
    mac = merchant.macaroon_path()
    uris = {
        "refused": f"lnd://127.0.0.1:{free_port()}?cert={merchant.cert_path}&macaroon={mac}",
        "tls": f"lnd://{merchant.address}?cert={wrong}&macaroon={mac}",
        "auth": f"lnd://{merchant.address}?cert={merchant.cert_path}"
        f"&macaroon={listener.macaroon_path()}",
        "permission": merchant.uri("readonly"),
    }
    messages = {}
    for kind, uri in uris.items():
        backend = backend_from_uri(uri)
        async with closing(backend):
            messages[kind] = str(await error_of(backend.info()))
    async with silent_node() as port:
        backend = backend_from_uri(lnd_uri(f"127.0.0.1:{port}", files, "&timeout=1"))
        async with closing(backend):
            messages["timeout"] = str(await error_of(backend.info()))
    assert len(set(messages.values())) == len(messages), messages
    secrets_shown = [*merchant.macaroons.values(), *listener.macaroons.values()]
    for kind, text in messages.items():
        assert text.startswith("lnd at "), (kind, text)
        assert "\n" not in text and len(text) < 300, (kind, text)
        for macaroon in secrets_shown:
            assert_no_secret(text, macaroon)


async def test_the_environments_proxy_is_never_used(
    merchant: StandinLnd,
    listener: StandinLnd,
    ledger_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grpc_proxy / https_proxy would send every call (inside mitmdump: to the client proxy
    itself) through someone else; the node is always reached directly."""
    async with environment_proxy(monkeypatch) as proxy:
        backend = backend_from_uri(merchant.uri())
        wallet = wallet_from_uri(listener.lndconnect_uri())
        async with closing(backend, wallet):
            await backend.info()
            invoice = await backend.create_invoice(PRICE_SAT, "direct", 600)
            result = await wallet.pay(invoice.bolt11, 0)
            assert result.payment_hash == invoice.payment_hash
        assert proxy.seen == []


async def run_python(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """A child Python (bounded: 60 s), without blocking the loop the stand-in serves on."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), 60)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_backend_check_prints_one_line_for_a_tls_failure(
    merchant: StandinLnd, tmp_path: Path
) -> None:
    """gRPC core logs "Handshake failed ..." to stderr by itself; only our line may show."""
    other, _ = make_tls_cert()
    wrong = tmp_path / "other-tls.cert"
    wrong.write_bytes(other)
    uri = f"lnd://{merchant.address}?cert={wrong}&macaroon={merchant.macaroon_path()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    code, out, err = await run_python("-m", "l402proxy", "backend", "check", uri, env=env)
    assert (code, out) == (1, "")
    assert err == (
        f"l402proxy: lnd at {merchant.address}: TLS handshake failed: the node's certificate "
        f"does not match cert {wrong}\n"
    )


async def test_grpc_verbosity_is_set_only_around_the_grpc_import() -> None:
    probe = (
        "import os, sys; import l402proxy.lightning.lnd; "
        "print(os.environ.get('GRPC_VERBOSITY'), 'grpc' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    assert await run_python("-c", probe, env=env) == (0, "None True\n", "")
    # A verbosity the user chose is left alone.
    assert await run_python("-c", probe, env={**env, "GRPC_VERBOSITY": "INFO"}) == (
        0,
        "INFO True\n",
        "",
    )
