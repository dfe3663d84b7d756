"""Core Lightning backend and wallet (lightning/cln.py) against the lightningd stand-in.

The stand-in (tests/standins/cln.py) speaks lightningd's JSON-RPC framing on a real unix
socket and is backed by a dev ledger, so invoices, payments and balances are real. A few
tests script raw replies instead, to pin down framing and odd answers.

What every backend does (invoices, lookups, paying, refusals) is the contract in
tests/contract; this file keeps what is particular to Core Lightning.
"""

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from l402proxy.lightning import (
    BackendUnavailable,
    LightningError,
    PaymentFailed,
    open_backend,
    open_wallet,
)
from l402proxy.lightning.cln import ClnNode, backend_from_uri, parse_uri, wallet_from_uri
from l402proxy.lightning.dev import DevLedger
from tests.backends import wait_for_status
from tests.standins.cln import ClnStandin

PRICE_SAT = 21
FAR_PAST = 10_000_000.0


@pytest.fixture
async def merchant(tmp_path: Path, ledger: DevLedger) -> AsyncIterator[ClnStandin]:
    (tmp_path / "merchant").mkdir()
    async with ClnStandin(tmp_path / "merchant" / "lightning-rpc", ledger, "merchant") as node:
        yield node


@pytest.fixture
async def listener(tmp_path: Path, ledger: DevLedger) -> AsyncIterator[ClnStandin]:
    (tmp_path / "listener").mkdir()
    async with ClnStandin(tmp_path / "listener" / "lightning-rpc", ledger, "listener") as node:
        yield node


@pytest.fixture
def backend(merchant: ClnStandin) -> ClnNode:
    return backend_from_uri(f"cln://{merchant.socket_path}")


@pytest.fixture
def wallet(listener: ClnStandin) -> ClnNode:
    return wallet_from_uri(listener.socket_path)


def last(node: ClnStandin, method: str) -> dict[str, Any]:
    return [r for r in node.requests if r["method"] == method][-1]


# -- URIs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "path", "timeout"),
    [
        ("cln:///home/ln/.lightning/lightning-rpc", "/home/ln/.lightning/lightning-rpc", 30.0),
        ("CLN:///run/ln/rpc", "/run/ln/rpc", 30.0),
        ("cln:/run/ln/rpc", "/run/ln/rpc", 30.0),
        ("/run/ln/lightning-rpc", "/run/ln/lightning-rpc", 30.0),
        ("  /run/ln/lightning-rpc ", "/run/ln/lightning-rpc", 30.0),
        ("cln:///run/my%20node/rpc", "/run/my node/rpc", 30.0),
        ("cln:///run/ln/rpc?timeout=5", "/run/ln/rpc", 5.0),
        ("cln:///run/ln/rpc?timeout=0.5", "/run/ln/rpc", 0.5),
    ],
)  # fmt: skip
def test_uri_forms(uri: str, path: str, timeout: float) -> None:
    assert parse_uri(uri) == (path, timeout)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("cln://node.example/rpc", "names a host ('node.example')"),
        ("cln:relative/lightning-rpc", "'relative/lightning-rpc' must be absolute"),
        ("cln:", "without a socket path"),
        ("cln:///run/rpc?macaroon=x", "unknown parameter 'macaroon'"),
        ("cln:///run/rpc?timeout=1&timeout=2", "parameter 'timeout' given twice"),
        ("cln:///run/rpc#x", "unexpected '#' part"),
    ],
)
def test_bad_uris_are_refused_clearly(uri: str, message: str) -> None:
    with pytest.raises(LightningError) as caught:
        parse_uri(uri)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_dispatch_opens_without_touching_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "not-yet" / "lightning-rpc"
    backend = open_backend(f"cln://{path}", dev_ledger=tmp_path / "unused.sqlite")
    wallet = open_wallet(str(path), dev_ledger=tmp_path / "unused.sqlite")
    assert isinstance(backend, ClnNode) and isinstance(wallet, ClnNode)
    assert backend.socket_path == wallet.socket_path == str(path)
    assert wallet.identity == f"cln:{path}"
    assert str(path) in backend.describe()
    assert not path.parent.exists() and not (tmp_path / "unused.sqlite").exists()


# -- info ---------------------------------------------------------------------------------


async def test_info_says_what_was_reached(
    backend: ClnNode, merchant: ClnStandin, ledger: DevLedger
) -> None:
    info = await backend.info()
    assert info.backend == "cln"
    assert info.address == merchant.socket_path
    assert info.alias == "standin-cln"
    assert info.network == "regtest"
    assert info.pubkey == ledger.node_id
    assert last(merchant, "getinfo")["params"] == {}


@pytest.mark.parametrize(
    ("name", "network"),
    [
        ("bitcoin", "mainnet"),
        ("testnet", "testnet"),
        ("testnet4", "testnet"),
        ("signet", "signet"),
        ("regtest", "regtest"),
        ("liquid", None),
    ],
)
async def test_network_names_are_mapped(
    backend: ClnNode, merchant: ClnStandin, name: str, network: str | None
) -> None:
    merchant.network = name
    assert (await backend.info()).network == network


# -- invoices -----------------------------------------------------------------------------


async def test_invoice_and_listinvoices_are_asked_as_lightningd_expects(
    backend: ClnNode, merchant: ClnStandin
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "Ad-free episode", 600)
    request = last(merchant, "invoice")
    assert request["jsonrpc"] == "2.0"
    params = request["params"]
    assert params["amount_msat"] == 21_000
    assert params["description"] == "Ad-free episode"
    assert params["expiry"] == 600
    assert params["label"].startswith("l402proxy-")
    await backend.lookup_invoice(invoice.payment_hash)
    assert last(merchant, "listinvoices")["params"] == {"payment_hash": invoice.payment_hash.hex()}


async def test_labels_and_request_ids_are_unique(backend: ClnNode, merchant: ClnStandin) -> None:
    for _ in range(3):
        await backend.create_invoice(1, "x", 60)
    labels = [r["params"]["label"] for r in merchant.requests if r["method"] == "invoice"]
    ids = [r["id"] for r in merchant.requests]
    assert len(set(labels)) == 3
    assert len(set(ids)) == len(ids) == 3
    assert all(i.split(":", 1)[1].startswith("invoice#") for i in ids)


# -- payments -----------------------------------------------------------------------------


async def test_pay_asks_with_the_fee_limit_and_a_retry_deadline(
    backend: ClnNode, wallet: ClnNode, listener: ClnStandin
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    await wallet.pay(invoice.bolt11, 1_000)
    params = last(listener, "pay")["params"]
    assert params == {"bolt11": invoice.bolt11, "maxfee": 1_000, "retry_for": 40}
    await wallet.lookup_payment(invoice.payment_hash)
    assert last(listener, "listpays")["params"] == {"payment_hash": invoice.payment_hash.hex()}


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (203, "failed: WIRE_INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS"),
        (205, "Could not find a route"),
        (206, "Fee exceeds our fee budget: 2000msat > 1000msat, discarding route"),
        (207, "Invoice expired"),
        (210, "Ran out of routes to try after 3 attempts: see `paystatus`"),
        (-32602, "Invalid bolt11: Bad bech32 string"),
    ],
)
async def test_definite_pay_failures_raise_payment_failed(
    backend: ClnNode,
    wallet: ClnNode,
    listener: ClnStandin,
    ledger: DevLedger,
    code: int,
    message: str,
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    before = await ledger.balance("listener")
    listener.pay_error = (code, message, {"status": "failed"} if code == 203 else None)
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, 1_000)
    assert f"code {code}" in str(caught.value)
    assert message.split(":")[0] in str(caught.value)
    assert await ledger.balance("listener") == before


@pytest.mark.parametrize(
    ("code", "data"),
    [
        (-1, None),  # catchall
        (200, None),  # PAY_IN_PROGRESS
        (201, None),  # PAY_RHASH_ALREADY_USED
        (209, None),  # PAY_UNSPECIFIED_ERROR
        (204, None),  # PAY_TRY_OTHER_ROUTE: never final from pay
        (203, {"status": "pending"}),  # a final code, but parts are still out
        (205, {"status": "complete"}),
    ],
)
async def test_uncertain_pay_errors_are_not_payment_failed(
    backend: ClnNode,
    wallet: ClnNode,
    listener: ClnStandin,
    code: int,
    data: dict[str, str] | None,
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    listener.pay_error = (code, "something happened", data)
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 1_000)
    assert not isinstance(caught.value, PaymentFailed)
    assert f"code {code}" in str(caught.value)
    assert "may still complete" in str(caught.value)


FAILED_PART = {"status": "failed", "partid": 1, "amount_msat": 21_000, "parent_partid": 0}
PENDING_PART = {"status": "pending", "partid": 2, "amount_msat": 21_000, "parent_partid": 0}
ROOT = {"status": "failed", "partid": 0, "amount_msat": 21_000}


@pytest.mark.parametrize(
    ("code", "message", "fields", "data"),
    [
        # An abort (deadline passed, or a part's final failure) answers while another part is
        # still out: the pay plugin lists it "pending" among the attempts.
        (210, "Ran out of routes to try after 2 attempts: see `paystatus`",
         {"attempts": [ROOT, FAILED_PART, PENDING_PART]}, None),
        (205, "Could not find a route", {"attempts": [ROOT, PENDING_PART]}, None),
        (206, "Fee exceeds our fee budget", {"attempts": [ROOT, FAILED_PART, PENDING_PART]},
         None),
        (207, "Invoice expired", {"attempts": [ROOT, FAILED_PART, PENDING_PART]}, None),
        (203, "failed: WIRE_INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS", {"status": "pending"}, None),
        (210, "Ran out of routes", None, {"attempts": [FAILED_PART, PENDING_PART]}),
        # Shapes we do not know: not proof that nothing is out.
        (210, "Ran out of routes", {"attempts": "all of them"}, None),
        (210, "Ran out of routes", {"attempts": [ROOT, "part 1"]}, None),
        (210, "Ran out of routes", {"attempts": [ROOT, {"partid": 1}]}, None),
        (210, "Ran out of routes", {"attempts": [ROOT, {**FAILED_PART, "status": "success"}]},
         None),
        (210, "Ran out of routes", None, ["pending"]),
    ],
)  # fmt: skip
async def test_a_final_code_with_a_part_still_out_is_not_payment_failed(
    backend: ClnNode,
    wallet: ClnNode,
    listener: ClnStandin,
    code: int,
    message: str,
    fields: dict[str, object] | None,
    data: object,
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    listener.pay_error = (code, message, data)  # type: ignore[assignment]
    listener.pay_error_fields = fields
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 1_000)
    assert not isinstance(caught.value, PaymentFailed)
    assert f"code {code}" in str(caught.value)
    assert "may still complete" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "data"),
    [
        ({"attempts": [ROOT, FAILED_PART, {**FAILED_PART, "partid": 2}]}, None),
        (None, {"attempts": [FAILED_PART]}),
        ({"attempts": []}, None),
        (None, None),
    ],
)
async def test_stopped_retrying_with_every_part_failed_is_payment_failed(
    backend: ClnNode,
    wallet: ClnNode,
    listener: ClnStandin,
    fields: dict[str, object] | None,
    data: dict[str, object] | None,
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    listener.pay_error = (210, "Ran out of routes to try after 2 attempts: see `paystatus`", data)
    listener.pay_error_fields = fields
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, 1_000)
    assert "code 210" in str(caught.value)


async def test_an_unroutable_invoice_fails_and_nothing_is_listed(
    wallet: ClnNode, tmp_path: Path
) -> None:
    elsewhere = DevLedger(tmp_path / "another-node.sqlite")
    try:
        invoice = await elsewhere.create_invoice("shop", 1_000, "elsewhere", 600)
    finally:
        await elsewhere.close()
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, 0)
    # lightningd's pay plugin: PAY_STOPPED_RETRYING, every attempt listed as failed.
    assert "Ran out of routes to try after 1 attempt" in str(caught.value)
    assert "code 210" in str(caught.value)
    # No route, so no part was ever sent: lightningd lists nothing for the hash.
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "unknown"


async def test_a_payment_the_destination_refused_is_listed_as_failed(
    backend: ClnNode, wallet: ClnNode, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "sold twice", 600)
    await ledger.pay("someone-else", invoice.bolt11, 0)
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert "code 203" in str(caught.value)
    state = await wallet.lookup_payment(invoice.payment_hash)
    assert (state.status, state.preimage) == ("failed", None)


async def test_a_hung_payment_is_uncertain_then_lookup_finds_it(
    backend: ClnNode, listener: ClnStandin, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "slow", 600)
    impatient = ClnNode(listener.socket_path, timeout=0.3, pay_retry_for=0)
    listener.pay_hang = True
    with pytest.raises(LightningError) as caught:
        await impatient.pay(invoice.bolt11, 0)
    assert isinstance(caught.value, BackendUnavailable)
    assert "no answer to pay within 0.3 s" in str(caught.value)
    pending = await impatient.lookup_payment(invoice.payment_hash)
    assert (pending.status, pending.preimage) == ("pending", None)

    # lightningd keeps paying after our connection closed: the lookup then finds the preimage.
    listener.release()
    done = await wait_for_status(impatient, invoice.payment_hash, "succeeded")
    assert done.preimage is not None
    assert hashlib.sha256(done.preimage).digest() == invoice.payment_hash
    assert (await ledger.lookup_invoice(invoice.payment_hash)).settled


async def test_an_invalid_invoice_is_refused_before_asking_the_node(
    wallet: ClnNode, listener: ClnStandin
) -> None:
    with pytest.raises(PaymentFailed):
        await wallet.pay("lnbcrt1notaninvoice", 0)
    assert not [r for r in listener.requests if r["method"] == "pay"]


# -- reaching the node --------------------------------------------------------------------


async def test_a_missing_socket_is_named(tmp_path: Path) -> None:
    node = ClnNode(str(tmp_path / "lightning-rpc"))
    with pytest.raises(BackendUnavailable) as caught:
        await node.info()
    assert str(caught.value).startswith(f"cln {tmp_path / 'lightning-rpc'}: no such socket")


async def test_a_socket_nobody_listens_on_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lightning-rpc"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound but never listening: what a crashed lightningd leaves
        with pytest.raises(BackendUnavailable) as caught:
            await ClnNode(str(path)).info()
    assert "connection refused" in str(caught.value)


async def test_permission_denied_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores file modes, so the refusal is injected where the OS would raise it.
    async def refuse(path: str) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(asyncio, "open_unix_connection", refuse)
    with pytest.raises(BackendUnavailable) as caught:
        await ClnNode(str(tmp_path / "lightning-rpc")).info()
    assert "permission denied" in str(caught.value)


async def test_a_silent_node_times_out(merchant: ClnStandin) -> None:
    merchant.silent = True
    with pytest.raises(BackendUnavailable) as caught:
        await ClnNode(merchant.socket_path, timeout=0.3).info()
    assert str(caught.value) == f"cln {merchant.socket_path}: no answer to getinfo within 0.3 s"


async def test_a_long_socket_path_works(tmp_path: Path, ledger: DevLedger) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    path = deep / "lightning-rpc"
    assert len(str(path)) > 108
    async with ClnStandin(path, ledger, "merchant"):
        assert (await ClnNode(str(path)).info()).pubkey == ledger.node_id


PREIMAGE_HEX = "5e" * 32


@pytest.mark.parametrize(
    ("garbage", "message"),
    [
        (b"this is not JSON\n\n", "bad answer to pay: not a JSON object"),
        (b"[1, 2, 3]\n\n", "bad answer to pay: not a JSON object"),
        (b'{"jsonrpc": "2.0", "result": {"preimage": "' + PREIMAGE_HEX.encode(), "not JSON"),
        (b'{"jsonrpc": "2.0", "id": "someone-else", "result": {}}\n\n', "closed the connection"),
        (b"", "closed the connection before answering pay"),
    ],
)  # fmt: skip
async def test_garbage_is_a_bad_answer_never_a_failed_payment(
    backend: ClnNode, wallet: ClnNode, listener: ClnStandin, garbage: bytes, message: str
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, "episode", 600)
    listener.garbage = garbage
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert message in str(caught.value)
    # A reply may hold a preimage: an error never echoes it.
    assert PREIMAGE_HEX not in str(caught.value)


# -- framing and odd answers, with scripted replies ---------------------------------------


def answer(result: dict[str, Any]) -> bytes:
    """A lightningd reply carrying `result`, for `scripted`."""
    return b'{"jsonrpc": "2.0", "id": $ID, "result": ' + json.dumps(result).encode() + b"}\n\n"


@contextlib.asynccontextmanager
async def scripted(path: Path, reply: bytes, chunk: int = 0) -> AsyncIterator[list[Any]]:
    """A socket that answers every request with `reply` ($ID replaced by the request's id),
    written `chunk` bytes at a time."""
    requests: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, text = json.JSONDecoder(), ""
        while True:
            data = await reader.read(4096)
            if not data:
                writer.close()
                return
            text += data.decode()
            try:
                request, _ = decoder.raw_decode(text)
                break
            except json.JSONDecodeError:
                continue
        requests.append(request)
        answer = reply.replace(b"$ID", json.dumps(request["id"]).encode())
        step = chunk or len(answer)
        for start in range(0, len(answer), step):
            writer.write(answer[start : start + step])
            await writer.drain()
            await asyncio.sleep(0)
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield requests
    finally:
        server.close()
        await server.wait_closed()


async def test_replies_split_in_pieces_with_blank_lines_inside_are_read_whole(
    tmp_path: Path,
) -> None:
    node_id = "02" + "ab" * 32
    reply = (
        # A notification first (no id), then the reply pretty-printed with a blank line.
        b'{"jsonrpc": "2.0", "method": "message", "params": {"message": "hi"}}\n\n'
        b'{"jsonrpc": "2.0",\n\n "id": $ID,\n "result": {"id": "' + node_id.encode() + b'",'
        b' "alias": "split", "network": "bitcoin"}}\n\n'
    )
    path = tmp_path / "rpc"
    async with scripted(path, reply, chunk=7) as requests:
        info = await ClnNode(str(path)).info()
    assert (info.pubkey, info.alias, info.network) == (node_id, "split", "mainnet")
    assert requests[0]["method"] == "getinfo"


async def test_old_msat_strings_are_read(tmp_path: Path, ledger: DevLedger) -> None:
    invoice = await ledger.create_invoice("merchant", 21_000, "x", 600)
    paid = await ledger.pay("listener", invoice.bolt11, 0)
    row = {
        "label": "x",
        "payment_hash": invoice.payment_hash.hex(),
        "status": "paid",
        "amount_msat": "21000msat",
        "amount_received_msat": "21000msat",
        "payment_preimage": paid.preimage.hex(),
        "expires_at": 1,
    }
    path = tmp_path / "rpc"
    async with scripted(path, answer({"invoices": [row]})):
        state = await ClnNode(str(path)).lookup_invoice(invoice.payment_hash)
    assert (state.settled, state.preimage, state.amount_msat) == (True, paid.preimage, 21_000)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"status": "pending"}, "pay answered status 'pending'"),
        (
            {
                "status": "complete",
                "payment_preimage": "11" * 32,
                "amount_msat": 21_000,
                "amount_sent_msat": 21_000,
            },
            "the preimage does not match the invoice",
        ),
    ],
)
async def test_odd_pay_answers_stay_uncertain(
    tmp_path: Path, ledger: DevLedger, result: dict[str, Any], message: str
) -> None:
    invoice = await ledger.create_invoice("merchant", 21_000, "x", 600)
    path = tmp_path / "rpc"
    async with scripted(path, answer(result)):
        with pytest.raises(LightningError) as caught:
            await ClnNode(str(path)).pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert message in str(caught.value)
    assert "11" * 32 not in str(caught.value)


async def test_a_wrong_preimage_in_listinvoices_is_not_trusted(
    tmp_path: Path, ledger: DevLedger
) -> None:
    invoice = await ledger.create_invoice("merchant", 21_000, "x", 600)
    row = {
        "label": "x",
        "payment_hash": invoice.payment_hash.hex(),
        "status": "paid",
        "amount_received_msat": 21_000,
        "payment_preimage": "22" * 32,
        "expires_at": 1,
    }
    path = tmp_path / "rpc"
    async with scripted(path, answer({"invoices": [row]})):
        with pytest.raises(LightningError) as caught:
            await ClnNode(str(path)).lookup_invoice(invoice.payment_hash)
    assert "does not match" in str(caught.value)
