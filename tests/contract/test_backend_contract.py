"""The contract every Lightning backend keeps, run against each of them (tests/backends.py).

Invoices: made with the amount and memo asked for, unsettled (and the preimage kept back)
until paid, settled with the preimage after, never settled once expired. Payments: money moves
by exactly the amount (plus a fee within the limit), the preimage comes back, a new wallet
object (a restarted client) finds the payment. Refusals: the same error class from every
backend for the same situation, in one line, never with a secret in it:

    unknown invoice          InvoiceNotFound (a Lightning Address: LookupUnsupported)
    insufficient balance     PaymentFailed, nothing moved
    expired invoice          PaymentFailed, nothing moved
    not an invoice, no amount PaymentFailed, nothing sent
    backend unreachable      BackendUnavailable; pay(): NothingSent (BackendUnavailable and
                             PaymentFailed: the payer ends the payment at once)

Each backend's own test file keeps only what is particular to it.
"""

import hashlib
import secrets
import time

import pytest

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning import (
    BackendUnavailable,
    Identified,
    InvoiceBackend,
    LightningError,
    LookupUnsupported,
    NothingSent,
    PaymentFailed,
    Wallet,
    identity,
    start,
)
from tests.backends import Rig, amountless_invoice

PRICE_SAT = 21
PRICE_MSAT = PRICE_SAT * 1000
MEMO = "podcast: Ad-free episode 7"
EXPIRY = 600
# Enough for every backend's own fee reserve (LNbits: 1 % or at least 2 sat).
MAX_FEE_MSAT = 100_000


def assert_clean(error: BaseException, rig: Rig) -> None:
    """One line, short, and none of the rig's secrets."""
    text = str(error)
    assert text and "\n" not in text and len(text) < 500, text
    for secret in rig.secrets:
        assert secret not in text, text


# -- invoices (every backend) ----------------------------------------------------------------


async def test_info_says_which_backend_and_network(rig: Rig, backend: InvoiceBackend) -> None:
    info = await backend.info()
    assert (info.backend, info.network) == (rig.kind, rig.network)
    for shown in (info.summary(), backend.describe()):
        assert_clean(LightningError(shown), rig)


async def test_an_invoice_has_the_amount_and_memo_asked_for(
    rig: Rig, backend: InvoiceBackend
) -> None:
    before = time.time()
    invoice = await backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    decoded = decode_invoice(invoice.bolt11)
    if rig.network is not None:
        # The chain the backend says it is on (LNbits' FakeWallet writes "lnbc" on any).
        assert decoded.network == rig.network
    assert invoice.amount_msat == decoded.amount_msat == PRICE_MSAT
    assert invoice.payment_hash == decoded.payment_hash
    # Never later than the invoice says (LND's is taken just before asking).
    assert decoded.expires_at - 2 <= invoice.expires_at <= decoded.expires_at + 1
    if rig.memo_in_invoice:
        assert decoded.description == MEMO
    else:
        assert decoded.description_hash is not None
    if rig.honours_expiry:
        assert decoded.expiry == EXPIRY
        assert before + EXPIRY - 2 <= invoice.expires_at <= time.time() + EXPIRY + 1
    other = await backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    assert other.payment_hash != invoice.payment_hash


async def test_an_unpaid_invoice_is_unsettled_and_its_preimage_kept_back(
    backend: InvoiceBackend,
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    state = await backend.lookup_invoice(invoice.payment_hash)
    assert (state.payment_hash, state.settled, state.preimage) == (
        invoice.payment_hash,
        False,
        None,
    )
    assert state.amount_msat == PRICE_MSAT


async def test_a_paid_invoice_is_settled_with_its_preimage(
    rig: Rig, backend: InvoiceBackend
) -> None:
    invoice = await backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    preimage = await rig.settle(invoice)
    state = await backend.lookup_invoice(invoice.payment_hash)
    assert (state.settled, state.preimage, state.amount_msat) == (True, preimage, PRICE_MSAT)
    assert hashlib.sha256(preimage).digest() == invoice.payment_hash


async def test_an_expired_invoice_cannot_be_paid_and_stays_unsettled(
    rig: Rig, backend: InvoiceBackend
) -> None:
    # Paid before anyone looked it up: LNbits 1.6.2 would settle an expired invoice of one of
    # its wallets that nobody had looked at (a lookup marks it failed).
    invoice = await rig.expired_invoice(PRICE_SAT)
    before = await rig.balances()
    if rig.wallet is not None:
        with pytest.raises(PaymentFailed) as caught:
            await rig.wallet.pay(invoice.bolt11, MAX_FEE_MSAT)
        assert "expired" in str(caught.value)
        assert_clean(caught.value, rig)
        assert (await rig.wallet.lookup_payment(invoice.payment_hash)).status in (
            "failed",
            "unknown",
        )
    else:
        with pytest.raises(PaymentFailed):
            await rig.settle(invoice)
    assert await rig.balances() == before
    state = await backend.lookup_invoice(invoice.payment_hash)
    assert (state.settled, state.preimage) == (False, None)


async def test_an_invoice_it_never_issued_is_not_found(rig: Rig, backend: InvoiceBackend) -> None:
    payment_hash = secrets.token_bytes(32)
    with pytest.raises(LightningError) as caught:
        await backend.lookup_invoice(payment_hash)
    assert type(caught.value) is rig.unknown_invoice
    assert payment_hash.hex() in str(caught.value)
    assert_clean(caught.value, rig)
    with pytest.raises(LightningError, match="32 bytes"):
        await backend.lookup_invoice(b"short")


async def test_an_unreachable_backend_is_unavailable_in_one_line(rig: Rig) -> None:
    dead = rig.unreachable()
    rig.opened(dead.backend)
    calls = [dead.backend.info(), dead.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)]
    if rig.unknown_invoice is not LookupUnsupported:
        # (A Lightning Address has nobody to ask about an invoice it did not hand out.)
        calls.append(dead.backend.lookup_invoice(secrets.token_bytes(32)))
    for call in calls:
        with pytest.raises(BackendUnavailable) as caught:
            await call
        assert_clean(caught.value, rig)
    if dead.wallet is None:
        return
    wallet = rig.opened(dead.wallet)
    for lookup in (wallet.info(), wallet.lookup_payment(secrets.token_bytes(32))):
        with pytest.raises(BackendUnavailable) as caught:
            await lookup
        assert_clean(caught.value, rig)
    invoice = await rig.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    before = await rig.balances()
    with pytest.raises(NothingSent) as unsent:
        await wallet.pay(invoice.bolt11, MAX_FEE_MSAT)
    # Both: the node is unavailable, and the payer may end the payment (nothing was sent).
    assert isinstance(unsent.value, BackendUnavailable)
    assert isinstance(unsent.value, PaymentFailed)
    assert_clean(unsent.value, rig)
    assert await rig.balances() == before


async def test_refused_credentials_are_unavailable_in_one_line(guarded_rig: Rig) -> None:
    """A wrong macaroon, password or key: like an unreachable node, the same classes."""
    rig = guarded_rig
    assert rig.refused is not None
    dead = rig.refused()
    rig.opened(dead.backend)
    invoice = await rig.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    for call in (
        dead.backend.info(),
        dead.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY),
        # Known to the node, unknown or not: never "not found" while the key is wrong.
        dead.backend.lookup_invoice(invoice.payment_hash),
        dead.backend.lookup_invoice(secrets.token_bytes(32)),
    ):
        with pytest.raises(BackendUnavailable) as caught:
            await call
        assert_clean(caught.value, rig)
    assert dead.wallet is not None
    wallet = rig.opened(dead.wallet)
    for lookup in (wallet.info(), wallet.lookup_payment(invoice.payment_hash)):
        with pytest.raises(BackendUnavailable) as caught:
            await lookup
        assert_clean(caught.value, rig)
    before = await rig.balances()
    with pytest.raises(NothingSent) as unsent:
        await wallet.pay(invoice.bolt11, MAX_FEE_MSAT)
    assert_clean(unsent.value, rig)
    assert await rig.balances() == before
    assert not (await rig.backend.lookup_invoice(invoice.payment_hash)).settled


# -- payments (every backend that pays) ------------------------------------------------------


async def test_pay_moves_the_money_and_returns_the_preimage(
    paying_rig: Rig, wallet: Wallet
) -> None:
    rig = paying_rig
    invoice = await rig.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    before = await rig.balances()
    result = await wallet.pay(invoice.bolt11, MAX_FEE_MSAT)
    assert result.payment_hash == invoice.payment_hash
    assert hashlib.sha256(result.preimage).digest() == invoice.payment_hash
    assert result.amount_msat == PRICE_MSAT
    assert 0 <= result.fee_msat <= MAX_FEE_MSAT
    after = await rig.balances()
    assert after[0] - before[0] == PRICE_MSAT
    assert before[1] - after[1] == PRICE_MSAT + result.fee_msat
    # Every side agrees: the backend saw it settle, the wallet knows it paid.
    settled = await rig.backend.lookup_invoice(invoice.payment_hash)
    assert (settled.settled, settled.preimage) == (True, result.preimage)
    paid = await wallet.lookup_payment(invoice.payment_hash)
    assert (paid.status, paid.preimage, paid.fee_msat) == (
        "succeeded",
        result.preimage,
        result.fee_msat,
    )


async def test_a_payment_is_found_after_a_crash(paying_rig: Rig, wallet: Wallet) -> None:
    """The client died after paying, before it stored the preimage: the wallet it opens on
    restart (a new object, nothing shared in memory) finds the payment and its preimage."""
    rig = paying_rig
    invoice = await rig.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    result = await wallet.pay(invoice.bolt11, MAX_FEE_MSAT)
    await wallet.close()
    assert rig.reopen_wallet is not None
    restarted = rig.opened(rig.reopen_wallet())
    assert restarted is not wallet
    state = await restarted.lookup_payment(invoice.payment_hash)
    assert (state.payment_hash, state.status, state.preimage) == (
        invoice.payment_hash,
        "succeeded",
        result.preimage,
    )
    assert state.fee_msat == result.fee_msat


async def test_a_wallet_names_itself_the_same_after_a_restart(
    paying_rig: Rig, wallet: Wallet
) -> None:
    """The payer records which wallet paid (lightning.identity) to ask the same one after a
    crash: stable across wallet objects, known before connecting, never a secret."""
    assert isinstance(wallet, Identified)
    assert paying_rig.reopen_wallet is not None
    again = paying_rig.opened(paying_rig.reopen_wallet())
    assert identity(wallet) == identity(again) != ""
    assert_clean(LightningError(identity(wallet)), paying_rig)
    await start(again)  # connects now where the wallet can (Startable), else on first use
    assert (await again.info()).backend == paying_rig.kind


async def test_a_payment_never_made_is_unknown(paying_rig: Rig, wallet: Wallet) -> None:
    invoice = await paying_rig.backend.create_invoice(PRICE_SAT, MEMO, EXPIRY)
    for payment_hash in (invoice.payment_hash, secrets.token_bytes(32)):
        state = await wallet.lookup_payment(payment_hash)
        assert (state.status, state.preimage, state.fee_msat) == ("unknown", None, 0)
    with pytest.raises(LightningError, match="32 bytes"):
        await wallet.lookup_payment(b"short")


async def test_insufficient_balance_fails_and_moves_nothing(
    paying_rig: Rig, wallet: Wallet
) -> None:
    rig = paying_rig
    invoice = await rig.backend.create_invoice(rig.too_dear_sat, MEMO, EXPIRY)
    before = await rig.balances()
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(invoice.bolt11, MAX_FEE_MSAT)
    assert_clean(caught.value, rig)
    assert await rig.balances() == before
    assert (await wallet.lookup_payment(invoice.payment_hash)).status in ("failed", "unknown")
    assert not (await rig.backend.lookup_invoice(invoice.payment_hash)).settled


@pytest.mark.parametrize(
    "bad",
    ["lnbcrt1notaninvoice", "", "amountless"],
    ids=["garbage", "empty", "amountless"],
)
async def test_what_is_no_payable_invoice_fails_before_anything_is_sent(
    paying_rig: Rig, wallet: Wallet, bad: str
) -> None:
    rig = paying_rig
    before = await rig.balances()
    with pytest.raises(PaymentFailed) as caught:
        await wallet.pay(amountless_invoice() if bad == "amountless" else bad, MAX_FEE_MSAT)
    assert not isinstance(caught.value, BackendUnavailable)
    assert_clean(caught.value, rig)
    assert await rig.balances() == before


# -- the optional parts of the protocols ---------------------------------------------------------


async def test_what_a_backend_may_lack_has_a_fallback() -> None:
    """A backend without start() connects on first use; a wallet without identity is named
    by its backend name (lightning/base.py)."""

    class Minimal:
        name = "minimal"

    class Full:
        name = "full"
        identity = "full:node-1"
        started = False

        async def start(self) -> None:
            self.started = True

    minimal, full = Minimal(), Full()
    await start(minimal)  # type: ignore[arg-type]
    await start(full)  # type: ignore[arg-type]
    assert full.started
    assert identity(minimal) == "minimal"  # type: ignore[arg-type]
    assert identity(full) == "full:node-1"  # type: ignore[arg-type]
