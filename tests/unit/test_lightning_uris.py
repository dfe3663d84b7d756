"""Wallet and backend URIs: `dev`, `dev:<wallet>`, `dev:<wallet>?delay=<s>` (a slow node).

Plain `dev` / `dev:<name>` / unsupported schemes are also in test_dev_ledger.py; this file is
about the query part and the dev wallet's delay.
"""

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import pytest

from l402proxy.lightning import (
    DEFAULT_CLIENT_WALLET,
    DEFAULT_SERVER_WALLET,
    BackendUnavailable,
    DevInvoiceBackend,
    DevLedger,
    DevWallet,
    LightningError,
    open_backend,
    open_wallet,
)


def wallet_for(uri: str, ledger_path: Path) -> DevWallet:
    wallet = open_wallet(uri, dev_ledger=ledger_path)
    assert isinstance(wallet, DevWallet)
    return wallet


@pytest.mark.parametrize(
    ("uri", "name", "delay"),
    [
        ("dev", DEFAULT_CLIENT_WALLET, 0.0),
        (" dev ", DEFAULT_CLIENT_WALLET, 0.0),
        ("dev:fan", "fan", 0.0),
        ("Dev:fan", "fan", 0.0),
        ("dev:fan?delay=2", "fan", 2.0),
        ("dev:fan?delay=0.25", "fan", 0.25),
        ("dev:fan?delay=0", "fan", 0.0),
        ("dev:fan?delay=600", "fan", 600.0),
        ("dev?delay=1.5", DEFAULT_CLIENT_WALLET, 1.5),
        ("dev:fan?", "fan", 0.0),
    ],
)
def test_wallet_uris(uri: str, name: str, delay: float, ledger_path: Path) -> None:
    wallet = wallet_for(uri, ledger_path)
    assert (wallet.wallet, wallet.delay) == (name, delay)
    assert wallet.ledger.path == str(ledger_path)
    assert not ledger_path.exists()  # opening a wallet is lazy


def test_backend_uris(ledger_path: Path) -> None:
    backend = open_backend("dev", dev_ledger=ledger_path)
    assert isinstance(backend, DevInvoiceBackend) and backend.wallet == DEFAULT_SERVER_WALLET
    named = open_backend("dev:shop", dev_ledger=ledger_path)
    assert isinstance(named, DevInvoiceBackend) and named.wallet == "shop"


@pytest.mark.parametrize("uri", ["dev:shop?delay=1", "dev?delay=0", "dev:shop?x=1"])
def test_a_backend_takes_no_parameters(uri: str, ledger_path: Path) -> None:
    with pytest.raises(LightningError) as caught:
        open_backend(uri, dev_ledger=ledger_path)
    name = uri.partition("?")[2].partition("=")[0]
    assert str(caught.value) == f"dev URI: unknown parameter '{name}' (allowed: none)"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("delay=soon", "dev URI: delay 'soon' is not a number"),
        ("delay=", "dev URI: delay '' is not a number"),
        ("delay=1s", "dev URI: delay '1s' is not a number"),
        ("delay=-1", "dev URI: delay must be 0-600 seconds"),
        ("delay=600.5", "dev URI: delay must be 0-600 seconds"),
        ("delay=inf", "dev URI: delay must be 0-600 seconds"),
        ("delay=nan", "dev URI: delay must be 0-600 seconds"),
        ("delay=1&delay=3", "dev URI: parameter 'delay' given twice"),
    ],
)
def test_bad_delays(query: str, message: str, ledger_path: Path) -> None:
    with pytest.raises(LightningError) as caught:
        open_wallet(f"dev:fan?{query}", dev_ledger=ledger_path)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("dev:fan?speed=1", "speed"),
        ("dev:fan?Delay=1", "Delay"),
        ("dev:fan?delay=1&extra=2", "extra"),
        ("dev?wallet=fan", "wallet"),
    ],
)
def test_unknown_wallet_parameters(uri: str, name: str, ledger_path: Path) -> None:
    with pytest.raises(LightningError) as caught:
        open_wallet(uri, dev_ledger=ledger_path)
    assert str(caught.value) == (f"dev URI: unknown parameter '{name}' (allowed: 'delay', 'hold')")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("dev:?delay=1", "dev URI without a wallet name"),
        ("dev:a b?delay=1", "invalid dev wallet name"),
        ("btcpay://host?delay=1", "unsupported backend URI 'btcpay'"),
        ("dev:fan?delay=1#x", "dev URI: unexpected '#' part"),
        ("dev://[x?delay=1", "invalid dev wallet name"),
    ],
)
def test_the_wallet_part_is_still_checked(uri: str, problem: str, ledger_path: Path) -> None:
    with pytest.raises(LightningError, match=problem):
        open_wallet(uri, dev_ledger=ledger_path)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("hold=later", "dev URI: hold 'later' is not a number"),
        ("hold=-2", "dev URI: hold must be 0-600 seconds"),
    ],
)
def test_bad_holds(query: str, message: str, ledger_path: Path) -> None:
    with pytest.raises(LightningError) as caught:
        wallet_for(f"dev:fan?{query}", ledger_path)
    assert str(caught.value) == message


async def test_a_holding_wallet_has_sent_nothing_until_the_hold_ends(ledger_path: Path) -> None:
    """hold: the crash window where the client wrote "pending" and the wallet sent nothing."""
    shop = DevLedger(ledger_path)
    wallet = wallet_for("dev:fan?hold=0.4&delay=0", ledger_path)
    assert (wallet.hold, wallet.delay) == (0.4, 0.0)
    assert "holding payments 0.4 s" in wallet.describe()
    try:
        invoice = await shop.create_invoice("merchant", 21_000, "ep", 600)
        paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
        await asyncio.sleep(0.2)
        assert (await wallet.lookup_payment(invoice.payment_hash)).status == "unknown"
        paying.cancel()  # the client dies in the hold: nothing was ever sent
        with contextlib.suppress(asyncio.CancelledError):
            await paying
        assert (await wallet.lookup_payment(invoice.payment_hash)).status == "unknown"
        assert not (await shop.lookup_invoice(invoice.payment_hash)).settled
    finally:
        await wallet.close()
        await shop.close()


def test_describe_mentions_the_delay(ledger_path: Path) -> None:
    assert "answering 2 s late" in wallet_for("dev:fan?delay=2", ledger_path).describe()
    assert "late" not in wallet_for("dev:fan", ledger_path).describe()


async def test_a_delayed_wallet_settles_at_once_and_answers_late(ledger_path: Path) -> None:
    merchant = DevLedger(ledger_path)
    wallet = wallet_for("dev:fan?delay=0.4", ledger_path)
    try:
        invoice = await merchant.create_invoice("merchant", 21_000, "ep", 600)
        await wallet.start()
        started = time.monotonic()
        paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
        deadline = started + 5
        while not (await merchant.lookup_invoice(invoice.payment_hash)).settled:
            assert time.monotonic() < deadline, "the dev wallet never settled"
            await asyncio.sleep(0.01)
        settled_after = time.monotonic() - started
        assert not paying.done()  # paid in the ledger, the answer still on its way
        state = await wallet.lookup_payment(invoice.payment_hash)
        assert state.status == "succeeded"
        result = await asyncio.wait_for(paying, 5)
        assert time.monotonic() - started >= 0.4
        assert settled_after < 0.4
        assert result.preimage == state.preimage
    finally:
        await wallet.close()
        await merchant.close()


async def test_a_caller_gone_during_the_delay_leaves_the_payment_settled(
    ledger_path: Path,
) -> None:
    """What a client killed mid-payment leaves behind: recovery finds it succeeded."""
    merchant = DevLedger(ledger_path)
    wallet = wallet_for("dev:fan?delay=30", ledger_path)
    try:
        invoice = await merchant.create_invoice("merchant", 21_000, "ep", 600)
        await wallet.start()  # so the cancellation lands in the delay, not in opening the file
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wallet.pay(invoice.bolt11, 0), 0.3)
        state = await wallet.lookup_payment(invoice.payment_hash)
        assert state.status == "succeeded" and state.preimage is not None
        assert (await merchant.lookup_invoice(invoice.payment_hash)).settled
    finally:
        await wallet.close()
        await merchant.close()


def test_a_ledger_that_cannot_open_leaves_no_worker_thread_behind(tmp_path: Path) -> None:
    """`l402proxy backend check dev --ledger <a directory>`: aiosqlite's worker thread must be
    done before asyncio.run closes the loop, or it dies on "Event loop is closed"."""
    before = set(threading.enumerate())

    async def attempt() -> None:
        with pytest.raises(BackendUnavailable, match="cannot open dev ledger"):
            await DevLedger(tmp_path).open()

    for _ in range(5):
        asyncio.run(attempt())
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert left == []
