"""Nostr Wallet Connect (lightning/nwc.py) against a wallet service stand-in (tests/nwc_wallet.py:
NIP-47 with real signatures and NIP-44/NIP-04, money on a dev ledger) over an in-process relay
(tests/standins/nostr_relay.py) that can be made to misbehave. The same pieces over a real
relay process, and both proxies end to end, are in tests/e2e/test_nwc_e2e.py."""

import asyncio
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from l402proxy.l402.invoice import decode_invoice
from l402proxy.launch import free_port
from l402proxy.lightning import (
    BackendUnavailable,
    DevLedger,
    InvoiceNotFound,
    LightningError,
    NothingSent,
    PaymentFailed,
    open_backend,
    open_wallet,
    redact,
)
from l402proxy.lightning.nostr import Event, private_key, public_key_hex, sign_event
from l402proxy.lightning.nwc import (
    KIND_REQUEST,
    KIND_RESPONSE,
    LookupNotOffered,
    NWCInvoiceBackend,
    NWCNodeInfo,
    NWCWallet,
    WalletRefused,
    parse_uri,
)
from l402proxy.lightning.uri import SUPPORTED_FORMS, module_for
from tests.backends import eventually
from tests.nwc_wallet import NWCWalletService, Seen, drain
from tests.standins.nostr_relay import TestRelay

LEDGER = "unused-devledger.sqlite"
PUBKEY = public_key_hex(private_key(b"\x07" * 32))
SECRET = "71a8c14c1407c113601079c4302dab36460f0ccd0ad506f1f2dc73b5100e4f3c"
RELAY = "wss://relay.example.com/v1"


def nwc_uri(query: str, pubkey: str = PUBKEY) -> str:
    return f"nostr+walletconnect://{pubkey}?{query}"


# -- the URI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "relays", "lud16", "timeout"),
    [
        (nwc_uri(f"relay={quote(RELAY, safe='')}&secret={SECRET}"), (RELAY,), None, 30.0),
        (
            nwc_uri(f"relay={RELAY}&relay=ws://127.0.0.1:7000&secret={SECRET.upper()}&timeout=5"),
            (RELAY, "ws://127.0.0.1:7000"),
            None,
            5.0,
        ),
        (
            f"nostr+walletconnect:{PUBKEY}?relay={RELAY}&relay={RELAY}&secret={SECRET}"
            "&lud16=alice@getalby.com",
            (RELAY,),
            "alice@getalby.com",
            30.0,
        ),
        (f" NOSTRWALLETCONNECT://{PUBKEY.upper()}?secret={SECRET}&relay={RELAY} ", (RELAY,),
         None, 30),
    ],
)  # fmt: skip
def test_uri_forms(uri: str, relays: tuple[str, ...], lud16: str | None, timeout: float) -> None:
    assert module_for(uri) == "nwc"
    config = parse_uri(uri)
    assert (config.wallet_pubkey, config.relays, config.secret.hex()) == (PUBKEY, relays, SECRET)
    assert (config.lud16, config.timeout) == (lud16, timeout)
    backend = open_backend(uri, dev_ledger=LEDGER)
    wallet = open_wallet(uri, dev_ledger=LEDGER)
    assert isinstance(backend, NWCInvoiceBackend) and isinstance(wallet, NWCWallet)
    client_pubkey = public_key_hex(private_key(bytes.fromhex(SECRET)))
    assert wallet.identity == f"nwc:{client_pubkey}"
    for shown in (backend.describe(), wallet.describe(), repr(config), redact(uri)):
        assert SECRET not in shown.lower() and SECRET[4:24] not in shown.lower()
    assert backend.describe().startswith("NWC wallet")
    assert f"via {RELAY}" in wallet.describe()
    assert "nostr+walletconnect://<wallet pubkey>" in SUPPORTED_FORMS


def test_redact_shows_the_relays_and_hides_the_secret() -> None:
    uri = nwc_uri(
        f"relay={quote(RELAY, safe='')}&relay=wss://r2.example/?token=abc&secret={SECRET}"
    )
    assert redact(uri) == (
        "nostr+walletconnect://***?relay=wss://relay.example.com/v1&relay=wss://r2.example/"
        "?token=***&secret=***"
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (nwc_uri(f"secret={SECRET}"), "has no relay="),
        (nwc_uri(f"relay={RELAY}"), "has no secret="),
        (nwc_uri(f"relay={RELAY}&secret=abc"), "the secret must be 64 hex digits"),
        (nwc_uri(f"relay={RELAY}&secret={'00' * 32}"), "the secret is not a valid key"),
        (nwc_uri(f"relay={RELAY}&secret={'ff' * 32}"), "the secret is not a valid key"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}", pubkey="abc"), "must be 64 hex digits"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}", pubkey="ff" * 32), "is not a valid key"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}&secret={SECRET}"), "'secret' given twice"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}&name=x"), "unknown parameter 'name'"),
        (nwc_uri(f"relay=https://relay.example&secret={SECRET}"), "not a ws:// or wss:// URL"),
        (nwc_uri(f"relay=wss://&secret={SECRET}"), "has no host"),
        (nwc_uri(f"relay=wss://h:99999&secret={SECRET}"), "bad host or port"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}&timeout=0"), "timeout must be a number"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}&timeout=soon"), "timeout must be a number"),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}&lud16=alice"), "lud16 is not a Lightning"),
        (f"nostr+walletconnect://{SECRET}@{PUBKEY}?relay={RELAY}", "the secret goes in ?secret="),
        (nwc_uri(f"relay={RELAY}&secret={SECRET}") + "#x", "unexpected '#' part"),
        (f"nostr+walletconnect://{PUBKEY}/x?relay={RELAY}&secret={SECRET}", "nothing may follow"),
        (nwc_uri("&".join(f"relay=wss://r{n}.example" for n in range(9)) + f"&secret={SECRET}"),
         "at most 8 relays"),
    ],
)  # fmt: skip
def test_bad_uris(uri: str, message: str) -> None:
    for opener in (open_backend, open_wallet):
        with pytest.raises(LightningError) as caught:
            opener(uri, dev_ledger=LEDGER)
        text = str(caught.value)
        assert message in text, text
        assert SECRET not in text and "\n" not in text


def test_a_secret_pasted_as_the_wallet_key_never_shows() -> None:
    # The secret where the wallet's key goes (and the key as the secret): parsed, since both
    # are 64 hex digits, but neither describe() nor identity shows the first 64 hex digits.
    secret_as_pubkey = "9a1f" + SECRET[4:]
    uri = nwc_uri(f"relay={RELAY}&secret={PUBKEY}", pubkey=secret_as_pubkey)
    try:
        wallet = open_wallet(uri, dev_ledger=LEDGER)
    except LightningError as exc:
        shown = str(exc)
    else:
        shown = wallet.describe() + wallet.identity + redact(uri)  # type: ignore[attr-defined]
    assert secret_as_pubkey[4:24] not in shown


# -- against the stand-in wallet --------------------------------------------------------------


@pytest.fixture
async def relay() -> AsyncIterator[TestRelay]:
    async with TestRelay() as running:
        yield running


@pytest.fixture
async def shop(relay: TestRelay, ledger_path: Path) -> AsyncIterator[NWCWalletService]:
    async with NWCWalletService([relay.url], ledger_path, "merchant") as service:
        yield service


@pytest.fixture
async def listener(relay: TestRelay, ledger_path: Path) -> AsyncIterator[NWCWalletService]:
    async with NWCWalletService([relay.url], ledger_path, "listener") as service:
        yield service


@pytest.fixture
async def backend(shop: NWCWalletService) -> AsyncIterator[NWCInvoiceBackend]:
    opened = open_backend(shop.uri(timeout=3), dev_ledger=LEDGER)
    assert isinstance(opened, NWCInvoiceBackend)
    yield opened
    await opened.close()


@pytest.fixture
async def wallet(listener: NWCWalletService) -> AsyncIterator[NWCWallet]:
    opened = open_wallet(listener.uri(timeout=3), dev_ledger=LEDGER)
    assert isinstance(opened, NWCWallet)
    yield opened
    await opened.close()


async def request_seen(service: NWCWalletService, method: str) -> Event:
    """The last `method` request the wallet service read (polled, bounded)."""

    async def seen() -> list[Seen]:
        return [s for s in service.requests if s.method == method]

    return (await eventually(seen, bool, what=f"a {method} request"))[-1].event


async def test_invoice_pay_lookup_and_money_moves(
    backend: NWCInvoiceBackend, wallet: NWCWallet, ledger: DevLedger
) -> None:
    invoice = await backend.create_invoice(21, "podcast: Ad-free episode", 600)
    decoded = decode_invoice(invoice.bolt11)
    assert (decoded.amount_msat, decoded.expiry, decoded.description) == (
        21_000,
        600,
        "podcast: Ad-free episode",
    )
    assert (invoice.payment_hash, invoice.expires_at) == (decoded.payment_hash, decoded.expires_at)
    before = await ledger.balance("merchant"), await ledger.balance("listener")
    state = await backend.lookup_invoice(invoice.payment_hash)
    assert (state.settled, state.preimage, state.amount_msat) == (False, None, 21_000)
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "unknown"

    result = await wallet.pay(invoice.bolt11, 10_000)
    assert hashlib.sha256(result.preimage).digest() == invoice.payment_hash
    assert (result.amount_msat, result.fee_msat) == (21_000, 0)
    after = await ledger.balance("merchant"), await ledger.balance("listener")
    assert (after[0] - before[0], after[1] - before[1]) == (21_000, -21_000)

    settled = await backend.lookup_invoice(invoice.payment_hash)
    assert (settled.settled, settled.preimage) == (True, result.preimage)
    paid = await wallet.lookup_payment(invoice.payment_hash)
    assert (paid.status, paid.preimage) == ("succeeded", result.preimage)
    with pytest.raises(InvoiceNotFound):
        await backend.lookup_invoice(secrets.token_bytes(32))


async def test_requests_expire_and_are_encrypted_with_nip44(
    backend: NWCInvoiceBackend, relay: TestRelay, shop: NWCWalletService
) -> None:
    await backend.create_invoice(5, "x", 600)
    [request] = [e for e in relay.of_kind(KIND_REQUEST) if shop.requests[-1].event.id == e.id]
    assert request.tag("p") == shop.service_pubkey
    assert request.tag("encryption") == "nip44_v2"
    expiration = int(request.tag("expiration") or 0)
    assert expiration == request.created_at + 3  # the URI's timeout=3 (NIP-40)
    assert shop.requests[-1].encryption == "nip44_v2"
    [answer] = [e for e in relay.of_kind(KIND_RESPONSE) if e.tag("e") == request.id]
    assert answer.tag("p") == request.pubkey


async def test_info_says_what_answered(
    backend: NWCInvoiceBackend, wallet: NWCWallet, shop: NWCWalletService
) -> None:
    node = await backend.info()
    assert isinstance(node, NWCNodeInfo)
    assert (node.backend, node.alias, node.network, node.encryption) == (
        "nwc",
        "dev wallet merchant",
        "regtest",
        "nip44_v2",
    )
    assert node.summary().startswith(f"nwc at {shop.relays[0]}, alias 'dev wallet merchant'")
    paying = await wallet.info()
    assert isinstance(paying, NWCNodeInfo)
    assert paying.balance_msat == 10_000_000_000
    assert "balance 10,000,000 sat" in paying.summary()
    assert "offers get_balance get_budget get_info lookup_invoice" in paying.summary()


async def test_a_budget_is_reported_and_enforced(
    relay: TestRelay, ledger_path: Path, backend: NWCInvoiceBackend
) -> None:
    async with NWCWalletService(
        [relay.url], ledger_path, "budgeted", budget_msat=30_000
    ) as service:
        wallet = NWCWallet(parse_uri(service.uri(timeout=3)))
        try:
            info = await wallet.info()
            assert "budget 0 of 30 sat used (monthly)" in info.summary()
            await wallet.pay((await backend.create_invoice(21, "one", 600)).bolt11, 0)
            second = await backend.create_invoice(21, "two", 600)
            with pytest.raises(WalletRefused) as caught:
                await wallet.pay(second.bolt11, 0)
            assert (caught.value.nwc_code, caught.value.refusal) == (
                "QUOTA_EXCEEDED",
                "quota_exceeded",
            )
            assert str(caught.value).endswith(
                ": QUOTA_EXCEEDED: the connection's budget is spent (this connection's budget "
                "is spent); nothing was paid"
            )
            assert "budget 21 of 30 sat used" in (await wallet.info()).summary()
        finally:
            await wallet.close()
    assert (await backend.lookup_invoice(second.payment_hash)).settled is False


async def test_nip04_only_wallets_are_spoken_to_in_nip04(
    relay: TestRelay, ledger_path: Path, backend: NWCInvoiceBackend
) -> None:
    async with NWCWalletService([relay.url], ledger_path, "old", nip04_only=True) as service:
        wallet = NWCWallet(parse_uri(service.uri(timeout=3)))
        try:
            assert (await wallet.info()).encryption == "nip04"  # type: ignore[attr-defined]
            invoice = await backend.create_invoice(3, "x", 600)
            result = await wallet.pay(invoice.bolt11, 0)
            assert (await wallet.lookup_payment(invoice.payment_hash)).preimage == result.preimage
        finally:
            await wallet.close()
    assert {seen.encryption for seen in service.requests} == {"nip04"}
    # No encryption tag on NIP-04 requests: the legacy form.
    assert all(seen.event.tag("encryption") is None for seen in service.requests)


async def test_a_wallet_without_lookup_invoice_cannot_back_the_server(
    relay: TestRelay, ledger_path: Path
) -> None:
    methods = ("make_invoice", "get_info")
    async with NWCWalletService([relay.url], ledger_path, "m", methods=methods) as service:
        backend = NWCInvoiceBackend(parse_uri(service.uri(timeout=3)))
        try:
            with pytest.raises(BackendUnavailable) as caught:
                await backend.info()
        finally:
            await backend.close()
    message = str(caught.value)
    assert "does not offer lookup_invoice, which the server needs to learn that an invoice " in (
        message
    )
    assert message.endswith("it offers: get_info make_invoice") and "\n" not in message


async def test_a_wallet_without_lookup_pays_but_says_payments_cannot_be_recovered(
    relay: TestRelay,
    ledger_path: Path,
    backend: NWCInvoiceBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    methods = ("pay_invoice", "get_info")
    async with NWCWalletService([relay.url], ledger_path, "p", methods=methods) as service:
        wallet = NWCWallet(parse_uri(service.uri(timeout=3)))
        try:
            with caplog.at_level(logging.WARNING):
                await wallet.info()
            assert "does not offer lookup_invoice: a payment whose answer is lost" in caplog.text
            invoice = await backend.create_invoice(3, "x", 600)
            await wallet.pay(invoice.bolt11, 0)
            with pytest.raises(LookupNotOffered):
                await wallet.lookup_payment(invoice.payment_hash)
        finally:
            await wallet.close()


async def test_a_connection_that_cannot_pay_is_refused_as_a_wallet(
    relay: TestRelay, ledger_path: Path
) -> None:
    methods = ("make_invoice", "lookup_invoice", "get_info")
    async with NWCWalletService([relay.url], ledger_path, "r", methods=methods) as service:
        wallet = NWCWallet(parse_uri(service.uri(timeout=3)))
        try:
            with pytest.raises(BackendUnavailable, match="does not offer pay_invoice"):
                await wallet.info()
        finally:
            await wallet.close()


async def test_a_secret_the_wallet_never_handed_out(
    backend: NWCInvoiceBackend, shop: NWCWalletService, listener: NWCWalletService
) -> None:
    """Like a refused macaroon or key: unavailable everywhere, and nothing sent by pay()."""
    stranger = secrets.token_bytes(32).hex()
    wrong_shop = NWCInvoiceBackend(
        parse_uri(shop.uri(timeout=3).replace(shop.client_secret.hex(), stranger))
    )
    wrong_wallet = NWCWallet(
        parse_uri(listener.uri(timeout=3).replace(listener.client_secret.hex(), stranger))
    )
    invoice = await backend.create_invoice(21, "x", 600)
    try:
        for call in (
            wrong_shop.info(),
            wrong_shop.create_invoice(21, "x", 600),
            wrong_shop.lookup_invoice(invoice.payment_hash),
            wrong_wallet.info(),
            wrong_wallet.lookup_payment(invoice.payment_hash),
        ):
            with pytest.raises(BackendUnavailable) as caught:
                await call
            assert ": UNAUTHORIZED: the wallet does not know this connection" in str(caught.value)
        with pytest.raises(NothingSent):
            await wrong_wallet.pay(invoice.bolt11, 0)
    finally:
        await wrong_shop.close()
        await wrong_wallet.close()
    assert (await backend.lookup_invoice(invoice.payment_hash)).settled is False


# -- the wallet's error codes -----------------------------------------------------------------


async def test_a_real_insufficient_balance(
    relay: TestRelay, ledger_path: Path, backend: NWCInvoiceBackend
) -> None:
    async with NWCWalletService([relay.url], ledger_path, "poor") as service:
        await drain(ledger_path, "poor", keep_msat=1_000)
        wallet = NWCWallet(parse_uri(service.uri(timeout=3)))
        invoice = await backend.create_invoice(21, "x", 600)
        try:
            with pytest.raises(WalletRefused) as caught:
                await wallet.pay(invoice.bolt11, 0)
        finally:
            await wallet.close()
    assert caught.value.refusal == "insufficient_balance"
    assert (
        ": INSUFFICIENT_BALANCE: not enough funds in the wallet (insufficient balance in dev "
        in (str(caught.value))
    )
    assert (await backend.lookup_invoice(invoice.payment_hash)).settled is False


@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        ("RATE_LIMITED", "rate_limited"),
        ("QUOTA_EXCEEDED", "quota_exceeded"),
        ("INSUFFICIENT_BALANCE", "insufficient_balance"),
        ("RESTRICTED", "payment_failed"),
        ("UNAUTHORIZED", "payment_failed"),
        ("NOT_IMPLEMENTED", "payment_failed"),
    ],
)
async def test_refusal_codes_mean_nothing_was_paid(
    code: str,
    refusal: str,
    backend: NWCInvoiceBackend,
    wallet: NWCWallet,
    listener: NWCWalletService,
) -> None:
    listener.switches.fail_with["pay_invoice"] = code
    invoice = await backend.create_invoice(21, "x", 600)
    with pytest.raises(WalletRefused) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert isinstance(caught.value, PaymentFailed)
    # A connection the wallet will not let pay at all is refused like a wrong key: NothingSent.
    assert isinstance(caught.value, NothingSent) == (code in ("RESTRICTED", "UNAUTHORIZED"))
    assert (caught.value.nwc_code, caught.value.refusal) == (code, refusal)
    message = str(caught.value)
    assert message.startswith(f"NWC wallet via {listener.relays[0]}: paying invoice ")
    assert f": {code}: " in message and message.endswith("; nothing was paid")
    assert f"(test wallet says {code})" in message and "\n" not in message


async def test_payment_failed_is_asked_again_before_it_counts(
    backend: NWCInvoiceBackend, wallet: NWCWallet, listener: NWCWalletService, tmp_path: Path
) -> None:
    # An invoice the wallet's ledger cannot route: the wallet says PAYMENT_FAILED for real.
    other = DevLedger(tmp_path / "other.sqlite")
    try:
        foreign = await other.create_invoice("elsewhere", 21_000, "x", 600)
    finally:
        await other.close()
    with pytest.raises(WalletRefused) as caught:
        await wallet.pay(foreign.bolt11, 0)
    assert caught.value.nwc_code == "PAYMENT_FAILED"
    assert [seen.method for seen in listener.requests[-2:]] == ["pay_invoice", "lookup_invoice"]

    # PAYMENT_FAILED for a payment the wallet did make (a lying or confused wallet): the
    # lookup finds it paid, and the payment counts as made.
    invoice = await backend.create_invoice(21, "x", 600)
    listener.switches.drop_answers.add("pay_invoice")
    with pytest.raises(BackendUnavailable):
        await wallet.pay(invoice.bolt11, 0)
    listener.switches.drop_answers.clear()
    listener.switches.fail_with["pay_invoice"] = "PAYMENT_FAILED"
    result = await wallet.pay(invoice.bolt11, 0)
    assert hashlib.sha256(result.preimage).digest() == invoice.payment_hash


@pytest.mark.parametrize("code", ["INTERNAL", "OTHER", "SOMETHING_NEW"])
async def test_other_errors_leave_the_payment_to_a_later_lookup(
    code: str, backend: NWCInvoiceBackend, wallet: NWCWallet, listener: NWCWalletService
) -> None:
    listener.switches.fail_with["pay_invoice"] = code
    invoice = await backend.create_invoice(21, "x", 600)
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert str(caught.value).endswith("; the payment is looked up later")


async def test_a_lost_answer_is_recovered_by_lookup(
    backend: NWCInvoiceBackend, wallet: NWCWallet, listener: NWCWalletService
) -> None:
    listener.switches.drop_answers.add("pay_invoice")
    invoice = await backend.create_invoice(21, "x", 600)
    with pytest.raises(BackendUnavailable) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert str(caught.value).endswith(
        ": no answer to pay_invoice within 3 s; the payment may still go through: it is looked "
        "up later"
    )
    state = await wallet.lookup_payment(invoice.payment_hash)
    assert state.status == "succeeded"
    assert state.preimage is not None and hashlib.sha256(state.preimage).digest() == (
        invoice.payment_hash
    )
    assert wallet.settles_within == 3 + 300


async def test_lookups_from_wallets_before_state(
    backend: NWCInvoiceBackend,
    wallet: NWCWallet,
    shop: NWCWalletService,
    listener: NWCWalletService,
) -> None:
    shop.switches.legacy_lookup = listener.switches.legacy_lookup = True
    invoice = await backend.create_invoice(21, "x", 600)
    assert (await backend.lookup_invoice(invoice.payment_hash)).settled is False
    result = await wallet.pay(invoice.bolt11, 0)
    assert (await backend.lookup_invoice(invoice.payment_hash)).preimage == result.preimage
    assert (await wallet.lookup_payment(invoice.payment_hash)).status == "succeeded"


@pytest.mark.parametrize(
    ("method", "lie", "message"),
    [
        ("make_invoice", {"payment_hash": "00" * 32}, "the payment hash in the answer is not the "),
        ("make_invoice", {"invoice": "lnbc1garbage"}, "creating a 21 sat invoice: "),
        ("make_invoice", {"invoice": None}, "no invoice in the answer"),
        ("lookup_invoice", {"state": "settled", "preimage": "11" * 32}, "without a matching "),
        ("lookup_invoice", {"payment_hash": "22" * 32}, "the answer is about another invoice"),
    ],
)
async def test_what_a_lying_wallet_says_is_checked(
    method: str, lie: dict[str, object], message: str, backend: NWCInvoiceBackend,
    shop: NWCWalletService,
) -> None:  # fmt: skip
    invoice = await backend.create_invoice(21, "x", 600)
    shop.switches.patch_results[method] = lie
    with pytest.raises(LightningError) as caught:
        if method == "make_invoice":
            await backend.create_invoice(21, "x", 600)
        else:
            await backend.lookup_invoice(invoice.payment_hash)
    assert message in str(caught.value)


async def test_a_payment_answered_without_its_preimage_is_looked_up_later(
    backend: NWCInvoiceBackend,
    wallet: NWCWallet,
    listener: NWCWalletService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    invoice = await backend.create_invoice(21, "x", 600)
    listener.switches.patch_results["pay_invoice"] = {"preimage": "33" * 32}
    with pytest.raises(LightningError) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert not isinstance(caught.value, PaymentFailed)
    assert "the answer holds no preimage for this payment; it is looked up later" in str(
        caught.value
    )
    # The fee a wallet reports above the limit is told (NIP-47 cannot pass the limit on).
    second = await backend.create_invoice(21, "y", 600)
    listener.switches.patch_results["pay_invoice"] = {"fees_paid": 5_000}
    with caplog.at_level(logging.WARNING):
        result = await wallet.pay(second.bolt11, 1_000)
    assert result.fee_msat == 5_000
    assert "paid 5000 msat in fees" in caplog.text and "more than the limit of 1000" in caplog.text


# -- relays -----------------------------------------------------------------------------------


async def test_relay_down_at_start_is_one_line(tmp_path: Path) -> None:
    down = f"ws://127.0.0.1:{free_port()}"
    # A long timeout: a refused connection fails at once, with what failed, instead of
    # "no relay reachable within 30 s".
    uri = nwc_uri(f"relay={down}&secret={SECRET}&timeout=30")
    backend, wallet = open_backend(uri, dev_ledger=LEDGER), open_wallet(uri, dev_ledger=LEDGER)
    ledger = DevLedger(tmp_path / "l.sqlite")
    bolt11 = (await ledger.create_invoice("m", 21_000, "x", 600)).bolt11
    await ledger.close()
    try:
        with pytest.raises(BackendUnavailable) as info_failed:
            await backend.info()
        with pytest.raises(NothingSent) as pay_failed:
            await wallet.pay(bolt11, 0)
    finally:
        await backend.close()
        await wallet.close()
    assert str(info_failed.value) == (
        f"NWC wallet via {down}: no relay reachable: {down}: connection refused"
    )
    assert str(pay_failed.value) == (
        f"NWC wallet via {down}: no relay reachable: {down}: connection refused; nothing was paid"
    )


async def test_relays_reconnect_by_themselves(
    relay: TestRelay, backend: NWCInvoiceBackend, wallet: NWCWallet
) -> None:
    await backend.create_invoice(1, "before", 600)
    connections = relay.connections
    await relay.drop()
    # The stand-in reconnects too; the next calls work once the relay's back.
    invoice = await backend.create_invoice(21, "after a drop", 600)
    await wallet.pay(invoice.bolt11, 0)
    assert relay.connections > connections
    assert (await backend.lookup_invoice(invoice.payment_hash)).settled


async def test_a_relay_down_for_a_while_and_back_on_the_same_port(
    relay: TestRelay, backend: NWCInvoiceBackend, shop: NWCWalletService
) -> None:
    await backend.create_invoice(1, "before", 600)
    await relay.stop()
    with pytest.raises(BackendUnavailable, match="no relay reachable"):
        await backend.create_invoice(1, "while down", 600)
    await relay.start()
    # The info event is gone with the old relay's memory: the wallet announces it again on
    # reconnecting; our cached copy carries on meanwhile.

    async def announced() -> bool:
        return shop.relays_connected > 0

    await eventually(announced, bool, what="the wallet service back on the relay")
    invoice = await backend.create_invoice(21, "back", 600)
    assert invoice.amount_msat == 21_000


async def test_one_relay_down_of_two(ledger_path: Path) -> None:
    down = f"ws://127.0.0.1:{free_port()}"
    async with (
        TestRelay() as up,
        NWCWalletService([up.url, down], ledger_path, "merchant") as service,
    ):
        backend = NWCInvoiceBackend(parse_uri(service.uri(timeout=3)))
        try:
            node = await backend.info()
            assert "relays 1/2 up" in node.summary()
            assert (await backend.create_invoice(3, "x", 600)).amount_msat == 3_000
        finally:
            await backend.close()


async def test_a_relay_that_refuses_events(
    relay: TestRelay, backend: NWCInvoiceBackend, wallet: NWCWallet
) -> None:
    invoice = await backend.create_invoice(21, "x", 600)
    await wallet.info()
    relay.knobs.refuse_events = "blocked: you are banned from posting here"
    with pytest.raises(NothingSent) as caught:
        await wallet.pay(invoice.bolt11, 0)
    assert str(caught.value).endswith(
        f"{relay.url} refused it (blocked: you are banned from posting here); nothing was paid"
    )
    with pytest.raises(BackendUnavailable, match="refused it"):
        await backend.create_invoice(21, "x", 600)


async def test_a_relay_that_closes_subscriptions(
    relay: TestRelay, ledger_path: Path, shop: NWCWalletService
) -> None:
    backend = NWCInvoiceBackend(parse_uri(shop.uri(timeout=3)))
    reason = "auth-required: we only serve known users"
    try:
        relay.knobs.close_subscriptions = reason
        with pytest.raises(BackendUnavailable) as first:
            await backend.create_invoice(21, "x", 600)
        # With the wallet's info event known already, it is the answers' subscription that
        # the relay refuses (again after a reconnect).
        relay.knobs.close_subscriptions = None
        await backend.create_invoice(21, "x", 600)
        relay.knobs.close_subscriptions = reason
        await relay.drop()
        with pytest.raises(BackendUnavailable) as later:
            await backend.create_invoice(21, "x", 600)
    finally:
        await backend.close()
    assert str(first.value) == (
        f"NWC wallet via {relay.url}: every relay reached refused the query: {relay.url}: {reason}"
    )
    assert str(later.value) == (
        f"NWC wallet via {relay.url}: every relay refused the subscription: {relay.url}: {reason}"
    )


async def test_an_info_event_left_behind_by_a_stopped_wallet_service(
    relay: TestRelay, ledger_path: Path
) -> None:
    """The info event stays on the relay when the service stops: start asks the service."""
    service = NWCWalletService([relay.url], ledger_path, "gone")
    await service.start()
    await service.stop()
    backend = NWCInvoiceBackend(parse_uri(service.uri(timeout=2)))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.info()
    finally:
        await backend.close()
    assert str(caught.value) == f"NWC wallet via {relay.url}: no answer to get_info within 2 s"


async def test_a_connection_the_wallet_no_longer_knows_is_refused_at_start(
    backend: NWCInvoiceBackend, shop: NWCWalletService
) -> None:
    shop.switches.fail_with["get_info"] = "UNAUTHORIZED"
    with pytest.raises(BackendUnavailable) as caught:
        await backend.info()
    assert str(caught.value) == (
        f"NWC wallet via {shop.relays[0]}: asking get_info: UNAUTHORIZED: the wallet does not "
        "know this connection (test wallet says UNAUTHORIZED)"
    )


async def test_without_get_info_the_service_is_checked_another_way(
    backend: NWCInvoiceBackend, shop: NWCWalletService
) -> None:
    shop.switches.fail_with["get_info"] = "RESTRICTED"
    node = await backend.info()
    assert (node.alias, node.network) == (None, None)
    assert [seen.method for seen in shop.requests[-2:]] == ["get_info", "lookup_invoice"]
    shop.switches.ignore.add("lookup_invoice")
    with pytest.raises(BackendUnavailable, match="no answer to lookup_invoice within 3 s"):
        await backend.info()


async def test_a_silent_relay_bounds_every_wait(
    relay: TestRelay, backend: NWCInvoiceBackend, wallet: NWCWallet
) -> None:
    invoice = await backend.create_invoice(21, "x", 600)
    await wallet.info()
    relay.knobs.silent = True  # takes EVENTs, says nothing, forwards nothing
    with pytest.raises(BackendUnavailable) as caught:
        await wallet.pay(invoice.bolt11, 0)
    # Sent to a relay that said nothing: it may have been taken, so not "nothing was paid".
    assert not isinstance(caught.value, PaymentFailed)
    assert "no answer to pay_invoice within 3 s" in str(caught.value)


async def test_forged_and_foreign_answers_are_ignored(
    relay: TestRelay, backend: NWCInvoiceBackend, wallet: NWCWallet, listener: NWCWalletService
) -> None:
    invoice = await backend.create_invoice(21, "x", 600)
    listener.switches.ignore.add("pay_invoice")
    paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
    request = await request_seen(listener, "pay_invoice")
    tags = [["p", request.pubkey], ["e", request.id]]
    # An answer by someone else's key, and the wallet's own answer with a broken signature.
    stranger = sign_event(private_key(secrets.token_bytes(32)), KIND_RESPONSE, tags, "x")
    await relay.inject(stranger.to_json())
    genuine = sign_event(listener.service_key, KIND_RESPONSE, tags, "x").to_json()
    genuine["sig"] = "00" * 64
    await relay.inject(genuine)
    with pytest.raises(BackendUnavailable, match="no answer to pay_invoice within 3 s"):
        await paying
    assert (await backend.lookup_invoice(invoice.payment_hash)).settled is False


async def test_an_answer_that_is_no_nip47_answer(
    relay: TestRelay, backend: NWCInvoiceBackend, wallet: NWCWallet, listener: NWCWalletService
) -> None:
    """The wallet's key signed it, but it cannot be read: not "failed", a question."""
    invoice = await backend.create_invoice(21, "x", 600)
    listener.switches.ignore.add("pay_invoice")
    paying = asyncio.create_task(wallet.pay(invoice.bolt11, 0))
    request = await request_seen(listener, "pay_invoice")
    tags = [["p", request.pubkey], ["e", request.id]]
    await relay.inject(sign_event(listener.service_key, KIND_RESPONSE, tags, "garbage").to_json())
    with pytest.raises(LightningError) as caught:
        await paying
    assert not isinstance(caught.value, PaymentFailed)
    assert "cannot read the answer to pay_invoice: NIP-44" in str(caught.value)


async def test_the_secret_never_reaches_a_log_line(
    relay: TestRelay,
    backend: NWCInvoiceBackend,
    wallet: NWCWallet,
    listener: NWCWalletService,
    shop: NWCWalletService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        await backend.info()
        await wallet.info()
        invoice = await backend.create_invoice(21, "x", 600)
        listener.switches.fail_with["pay_invoice"] = "RATE_LIMITED"
        with pytest.raises(WalletRefused) as refused:
            await wallet.pay(invoice.bolt11, 0)
        await relay.drop()
        listener.switches.fail_with.clear()
        await wallet.pay(invoice.bolt11, 0)
    for secret in (shop.client_secret.hex(), listener.client_secret.hex()):
        assert secret not in caplog.text.lower() and secret not in str(refused.value)


def test_a_backend_used_by_two_event_loops(ledger_path: Path) -> None:
    """The CLI runs asyncio.run more than once: connections belong to the loop that made them."""

    async def serve_relay() -> None:
        async with TestRelay(port) as _:
            await stop.wait()

    port = free_port()
    relay_loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    import threading

    thread = threading.Thread(target=relay_loop.run_until_complete, args=(serve_relay(),))
    thread.start()
    try:
        relay_url = f"ws://127.0.0.1:{port}"
        service = NWCWalletService([relay_url], ledger_path, "merchant")
        with service.running_in_thread():
            backend = NWCInvoiceBackend(parse_uri(service.uri(timeout=5)))
            first = asyncio.run(backend.create_invoice(1, "one", 600))
            second = asyncio.run(backend.create_invoice(2, "two", 600))
            asyncio.run(backend.close())
        assert (first.amount_msat, second.amount_msat) == (1_000, 2_000)
    finally:
        relay_loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        relay_loop.close()
