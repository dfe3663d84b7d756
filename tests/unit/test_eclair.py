"""Eclair backend and wallet (lightning/eclair.py) against the Eclair API stand-in.

The stand-in (tests/standins/eclair.py) is a real HTTP server with basic auth, backed by a dev
ledger, so invoices, payments and balances are real. Answer shapes that the stand-in does not
produce (older Eclair versions, multi-part payments) are fed through httpx.MockTransport.

What every backend does (invoices, lookups, paying, refusals) is the contract in
tests/contract; this file keeps what is particular to Eclair.
"""

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.launch import free_port
from l402proxy.lightning import (
    BackendUnavailable,
    LightningError,
    PaymentFailed,
    open_backend,
    open_wallet,
    redact,
)
from l402proxy.lightning.dev import DevLedger
from l402proxy.lightning.eclair import EclairNode, parse_uri
from tests.backends import wait_for_status
from tests.standins.eclair import EclairStandin, _stored_preimage
from tests.standins.proxy import environment_proxy
from tests.standins.tls import server_context

PASSWORD = "s3cr3t-API-pw"
PRICE_SAT = 21
FAR_PAST = 10_000_000.0


@pytest.fixture
async def merchant(ledger: DevLedger) -> AsyncIterator[EclairStandin]:
    async with EclairStandin(ledger, "merchant", PASSWORD) as node:
        yield node


@pytest.fixture
async def listener(ledger: DevLedger) -> AsyncIterator[EclairStandin]:
    async with EclairStandin(ledger, "listener", PASSWORD) as node:
        yield node


@pytest.fixture
async def backend(merchant: EclairStandin) -> AsyncIterator[EclairNode]:
    node = open_backend(merchant.uri, dev_ledger="unused")
    assert isinstance(node, EclairNode)
    yield node
    await node.close()


@pytest.fixture
async def wallet(listener: EclairStandin) -> AsyncIterator[EclairNode]:
    node = open_wallet(listener.uri, dev_ledger="unused")
    assert isinstance(node, EclairNode)
    yield node
    await node.close()


def last(node: EclairStandin, endpoint: str) -> dict[str, str]:
    return [form for name, form in node.requests if name == endpoint][-1]


# -- URIs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "base_url", "address", "password", "timeout"),
    [
        ("eclair://:pw@127.0.0.1:8080", "http://127.0.0.1:8080", "127.0.0.1:8080", "pw", 30.0),
        ("eclair://:pw@localhost", "http://localhost:8080", "localhost:8080", "pw", 30.0),
        ("eclair://ignored:pw@node.lan:8081", "http://node.lan:8081", "node.lan:8081", "pw", 30.0),
        ("ECLAIR+HTTP://:pw@h:1", "http://h:1", "h:1", "pw", 30.0),
        ("eclair+https://:pw@n.example:443", "https://n.example:443", "n.example:443", "pw", 30.0),
        ("eclair://:p%40ss%3Aword@h:1", "http://h:1", "h:1", "p@ss:word", 30.0),
        ("eclair://:pw@[::1]:8080", "http://[::1]:8080", "[::1]:8080", "pw", 30.0),
        ("eclair://:pw@h:1/eclair/", "http://h:1/eclair", "h:1", "pw", 30.0),
        ("eclair://:pw@h:1?timeout=5", "http://h:1", "h:1", "pw", 5.0),
    ],
)  # fmt: skip
def test_uri_forms(uri: str, base_url: str, address: str, password: str, timeout: float) -> None:
    config = parse_uri(uri)
    assert (config.base_url, config.address, config.password, config.timeout) == (
        base_url,
        address,
        password,
        timeout,
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("eclair://127.0.0.1:8080", "without the API password"),
        ("eclair://user@127.0.0.1:8080", "without the API password"),
        ("eclair://:@127.0.0.1:8080", "without the API password"),
        (f"eclair://:{PASSWORD}@:8080", "without a host"),
        (f"eclair://:{PASSWORD}@h:99999", "bad host or port"),
        (f"eclair://:{PASSWORD}@h:port", "bad host or port"),
        (f"eclair://:{PASSWORD}@h:1?key=abc", "unknown parameter 'key'"),
        (f"eclair://:{PASSWORD}@h:1?cert=/etc/hosts", "cert only makes sense with eclair+https"),
        (f"eclair+https://:{PASSWORD}@h:1?cert=/nonexistent/ca.pem", "cannot read cert"),
        (f"eclair+https://:{PASSWORD}@h:1?cert=/etc/hostname", "is not a PEM certificate"),
    ],
)
def test_bad_uris_are_refused_without_showing_the_password(uri: str, message: str) -> None:
    with pytest.raises(LightningError) as caught:
        parse_uri(uri)
    assert message in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_the_password_is_never_shown(tmp_path: Path) -> None:
    uri = f"eclair://:{PASSWORD}@127.0.0.1:8080"
    node = open_wallet(uri, dev_ledger=tmp_path / "unused.sqlite")
    assert isinstance(node, EclairNode)
    for shown in (node.describe(), node.identity, repr(node.config), redact(uri)):
        assert PASSWORD not in shown
    assert node.identity == "eclair:127.0.0.1:8080"
    assert "http://127.0.0.1:8080" in node.describe()
    assert not (tmp_path / "unused.sqlite").exists()


# -- info ---------------------------------------------------------------------------------


async def test_info_says_what_was_reached(
    backend: EclairNode, merchant: EclairStandin, ledger: DevLedger
) -> None:
    info = await backend.info()
    assert info.backend == "eclair"
    assert info.address == f"http://127.0.0.1:{merchant.port}"
    assert info.alias == "standin-eclair"
    assert info.network == "regtest"
    assert info.pubkey == ledger.node_id
    assert PASSWORD not in info.summary()


@pytest.mark.parametrize(
    ("name", "network"),
    [
        ("mainnet", "mainnet"),
        ("testnet", "testnet"),
        ("testnet3", "testnet"),
        ("testnet4", "testnet"),
        ("signet", "signet"),
        ("regtest", "regtest"),
        ("liquid", None),
        # Older Eclair: no "network", only the regtest genesis chainHash.
        (None, "regtest"),
    ],
)
async def test_network_names_are_mapped(
    backend: EclairNode, merchant: EclairStandin, name: str | None, network: str | None
) -> None:
    merchant.network = name  # type: ignore[assignment]
    assert (await backend.info()).network == network


# -- invoices -----------------------------------------------------------------------------


async def test_createinvoice_is_asked_with_form_fields_and_the_unpaid_preimage_kept_back(
    backend: EclairNode, merchant: EclairStandin, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "Ad-free episode", 600)
    assert last(merchant, "createinvoice") == {
        "description": "Ad-free episode",
        "amountMsat": "21000",
        "expireIn": "600",
    }
    state = await backend.lookup_invoice(invoice.payment_hash)
    assert state.preimage is None
    # Eclair hands out the preimage of an unpaid invoice; the backend must not pass it on.
    assert _stored_preimage(ledger.path, invoice.payment_hash) is not None
    assert last(merchant, "getreceivedinfo") == {"paymentHash": invoice.payment_hash.hex()}


# -- payments -----------------------------------------------------------------------------


async def test_payinvoice_blocks_with_the_fee_limit_in_whole_sat(
    backend: EclairNode, wallet: EclairNode, listener: EclairStandin
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    await wallet.pay(invoice.bolt11, 1_999)
    # The fee limit, rounded down to whole sat: never more than the caller allowed.
    assert last(listener, "payinvoice") == {
        "invoice": invoice.bolt11,
        "blocking": "true",
        "maxFeeFlatSat": "1",
        "maxFeePct": "0",
        "timeoutSeconds": "40",
    }
    await wallet.lookup_payment(invoice.payment_hash)
    assert last(listener, "getsentinfo") == {"paymentHash": invoice.payment_hash.hex()}


async def test_a_refused_payment_request_is_a_definite_failure(ledger: DevLedger) -> None:
    # Eclair answers 400 for an IllegalArgumentException ("invoice has expired", ...), raised
    # before any payment is attempted.
    invoice = await ledger.create_invoice("merchant", 1_000, "x", 600)
    node = mocked(lambda endpoint, form: httpx.Response(400, json={"error": "invoice has expired"}))
    try:
        with pytest.raises(PaymentFailed) as caught:
            await node.pay(invoice.bolt11, 0)
    finally:
        await node.close()
    assert str(caught.value) == "eclair eclair.test:8080: payment refused: invoice has expired"


async def test_a_failed_payment_raises_payment_failed(
    backend: EclairNode, wallet: EclairNode, listener: EclairStandin, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    before = await ledger.balance("listener")
    listener.pay_fail = "route not found"
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, 1_000)
    assert str(caught.value) == (
        f"eclair 127.0.0.1:{listener.port}: payment failed: route not found (1 attempt)"
    )
    assert await ledger.balance("listener") == before
    state = await wallet.lookup_payment(invoice.payment_hash)
    assert (state.status, state.preimage) == ("failed", None)


async def test_an_error_after_the_payment_went_out_is_not_a_failure(
    backend: EclairNode, wallet: EclairNode, listener: EclairStandin
) -> None:
    # LNbits' CVE-2024-34694: a 500 "Ask timed out" while the payment is still in flight.
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    listener.pay_error_after_paying = True
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert "HTTP 500" in str(caught.value) and "may still complete" in str(caught.value)
    state = await wallet.lookup_payment(invoice.payment_hash)
    assert state.status == "succeeded"
    assert state.preimage is not None
    assert hashlib.sha256(state.preimage).digest() == invoice.payment_hash


async def test_a_hung_payment_is_uncertain_then_lookup_finds_it(
    backend: EclairNode, listener: EclairStandin
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "slow", 600)
    impatient = EclairNode(parse_uri(listener.uri + "?timeout=0.3"), pay_timeout=0)
    listener.pay_hang = True
    try:
        with pytest.raises(LightningError) as caught:
            await impatient.pay(invoice.bolt11, 0)
        assert isinstance(caught.value, BackendUnavailable)
        assert "payinvoice: no answer within 0.3 s" in str(caught.value)
        pending = await impatient.lookup_payment(invoice.payment_hash)
        assert (pending.status, pending.preimage) == ("pending", None)

        listener.release()
        await wait_for_status(impatient, invoice.payment_hash, "succeeded")
    finally:
        await impatient.close()


async def test_an_invalid_invoice_is_refused_before_asking_the_node(
    wallet: EclairNode, listener: EclairStandin
) -> None:
    with pytest.raises(PaymentFailed):
        await wallet.pay("lnbcrt1notaninvoice", 0)
    assert not [name for name, _ in listener.requests if name == "payinvoice"]


# -- reaching the node --------------------------------------------------------------------


async def test_a_wrong_password_is_an_auth_error(merchant: EclairStandin) -> None:
    node = EclairNode(parse_uri(f"eclair://:wrong-{PASSWORD}@127.0.0.1:{merchant.port}"))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await node.info()
    finally:
        await node.close()
    assert str(caught.value) == (
        f"eclair 127.0.0.1:{merchant.port}: authentication failed (HTTP 401): wrong API password"
    )
    assert PASSWORD not in str(caught.value)


async def test_a_wrong_password_never_pays(
    backend: EclairNode, listener: EclairStandin, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    before = await ledger.balance("listener")
    node = EclairNode(parse_uri(f"eclair://:nope@127.0.0.1:{listener.port}"))
    try:
        with pytest.raises(BackendUnavailable):
            await node.pay(invoice.bolt11, 0)
    finally:
        await node.close()
    assert await ledger.balance("listener") == before


async def test_connection_refused_is_named() -> None:
    port = free_port()
    node = EclairNode(parse_uri(f"eclair://:{PASSWORD}@127.0.0.1:{port}"))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await node.info()
    finally:
        await node.close()
    assert str(caught.value) == (
        f"eclair 127.0.0.1:{port}: getinfo: connection refused (is Eclair running with "
        "eclair.api.enabled=true?)"
    )


async def test_a_silent_server_times_out() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client gives up and closes

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    node = EclairNode(parse_uri(f"eclair://:{PASSWORD}@127.0.0.1:{port}?timeout=0.3"))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await node.info()
    finally:
        await node.close()
        server.close()
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        await server.wait_closed()
    assert str(caught.value) == f"eclair 127.0.0.1:{port}: getinfo: no answer within 0.3 s"


async def test_garbage_is_a_bad_answer_never_a_failed_payment(
    backend: EclairNode, wallet: EclairNode, listener: EclairStandin
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    listener.garbage = True
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert (
        str(caught.value) == f"eclair 127.0.0.1:{listener.port}: bad answer to payinvoice: not JSON"
    )
    with pytest.raises(LightningError, match="bad answer to getinfo: not JSON"):
        await wallet.info()


async def test_https_with_a_pinned_certificate(tmp_path: Path, ledger: DevLedger) -> None:
    context, cert_path = server_context(tmp_path, "eclair")
    async with EclairStandin(ledger, "merchant", PASSWORD, ssl_context=context) as standin:
        pinned = EclairNode(parse_uri(f"{standin.uri}?cert={cert_path}"))
        untrusted = EclairNode(parse_uri(standin.uri))
        try:
            info = await pinned.info()
            assert info.address == f"https://127.0.0.1:{standin.port}"
            invoice = await pinned.create_invoice(1, "over TLS", 60)
            assert not (await pinned.lookup_invoice(invoice.payment_hash)).settled
            with pytest.raises(BackendUnavailable) as caught:
                await untrusted.info()
            assert "getinfo: TLS handshake failed (CERTIFICATE_VERIFY_FAILED)" in str(caught.value)
            assert PASSWORD not in str(caught.value)
        finally:
            await pinned.close()
            await untrusted.close()


# -- answer shapes the stand-in does not produce --------------------------------------------


def mocked(answers: Callable[[str, dict[str, str]], httpx.Response]) -> EclairNode:
    node = EclairNode(parse_uri(f"eclair://:{PASSWORD}@eclair.test:8080"))

    def handler(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        return answers(request.url.path.strip("/"), form)

    node.api.transport = httpx.MockTransport(handler)
    return node


async def test_multi_part_fees_are_added_up(ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice("merchant", 90_000_000, "mpp", 600)
    paid = await ledger.pay("listener", invoice.bolt11, 0)
    event = {
        "type": "payment-sent",
        "id": "cd5666d5-7678-4458-b50b-21b363b34f5e",
        "paymentHash": invoice.payment_hash.hex(),
        "paymentPreimage": paid.preimage.hex(),
        "recipientAmount": 90_000_000,
        "recipientNodeId": ledger.node_id,
        "parts": [
            {"id": "a", "amount": 4_827_118, "feesPaid": 1_482, "toChannelId": "00" * 32},
            {"id": "b", "amount": 85_172_882, "feesPaid": 9_517, "toChannelId": "00" * 32},
        ],
    }
    attempts = [
        {
            "parentId": "cd5666d5",
            "paymentHash": invoice.payment_hash.hex(),
            "status": {"type": "sent", "paymentPreimage": paid.preimage.hex(), "feesPaid": fee},
        }
        for fee in (1_482, 9_517)
    ] + [{"parentId": "earlier-try", "status": {"type": "failed", "failures": []}}]

    def answers(endpoint: str, form: dict[str, str]) -> httpx.Response:
        return httpx.Response(200, json=event if endpoint == "payinvoice" else attempts)

    node = mocked(answers)
    try:
        result = await node.pay(invoice.bolt11, 20_000)
        assert (result.amount_msat, result.fee_msat) == (90_000_000, 10_999)
        state = await node.lookup_payment(invoice.payment_hash)
        assert (state.status, state.fee_msat) == ("succeeded", 10_999)
    finally:
        await node.close()


@pytest.mark.parametrize(
    ("kinds", "status"),
    [
        (["failed", "pending"], "pending"),
        (["failed", "failed"], "failed"),
        (["pending"], "pending"),
    ],
)
async def test_attempts_are_summed_up(kinds: list[str], status: str) -> None:
    attempts = [{"parentId": str(i), "status": {"type": kind}} for i, kind in enumerate(kinds)]
    node = mocked(lambda endpoint, form: httpx.Response(200, json=attempts))
    try:
        state = await node.lookup_payment(b"\x01" * 32)
    finally:
        await node.close()
    assert (state.status, state.preimage) == (status, None)


async def test_older_received_info_shapes_are_read(ledger: DevLedger) -> None:
    # Eclair 0.6/0.7: "paymentRequest" instead of "invoice", timestamps as plain numbers.
    invoice = await ledger.create_invoice("merchant", 50_000, "old", 600)
    paid = await ledger.pay("listener", invoice.bolt11, 0)
    answers_by_state: dict[str, Any] = {
        "pending": {
            "paymentRequest": {"serialized": invoice.bolt11, "amount": 50_000},
            "paymentPreimage": paid.preimage.hex(),
            "createdAt": 1593698964000,
            "status": {"type": "pending"},
        },
        "received": {
            "paymentRequest": {"serialized": invoice.bolt11, "amount": 50_000},
            "paymentPreimage": paid.preimage.hex(),
            "createdAt": 1593698964000,
            "status": {"type": "received", "amount": 50_000, "receivedAt": 1593698976184},
        },
    }
    for kind, expected in (("pending", (False, None)), ("received", (True, paid.preimage))):
        answer = answers_by_state[kind]
        node = mocked(lambda endpoint, form, answer=answer: httpx.Response(200, json=answer))
        try:
            state = await node.lookup_invoice(invoice.payment_hash)
        finally:
            await node.close()
        assert (state.settled, state.preimage) == expected
        assert state.amount_msat == 50_000


@pytest.mark.parametrize(
    "answer",
    [
        {"type": "payment-sent", "paymentPreimage": "33" * 32, "parts": []},
        "e4227601-38b3-404e-9aa0-75a829e9bec0",
        {"type": "payment-relayed"},
    ],
)
async def test_odd_payment_answers_stay_uncertain(ledger: DevLedger, answer: object) -> None:
    invoice = await ledger.create_invoice("merchant", 1_000, "x", 600)
    node = mocked(lambda endpoint, form: httpx.Response(200, json=answer))
    try:
        with pytest.raises(LightningError) as caught:
            await node.pay(invoice.bolt11, 0)
    finally:
        await node.close()
    assert not isinstance(caught.value, PaymentFailed)
    assert "33" * 32 not in str(caught.value)


async def test_the_environments_proxy_is_never_used(
    merchant: EclairStandin, listener: EclairStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with environment_proxy(monkeypatch) as proxy:
        backend = open_backend(merchant.uri, dev_ledger="unused")
        wallet = open_wallet(listener.uri, dev_ledger="unused")
        try:
            invoice = await backend.create_invoice(PRICE_SAT, "direct", 600)
            await wallet.pay(invoice.bolt11, 0)
        finally:
            await backend.close()
            await wallet.close()
        assert proxy.seen == []
