"""What the Lightning backend tests share: the dev ledger fixture, polling helpers, invoices
from elsewhere, and one "rig" per backend for the contract suite (tests/contract).

A rig is one backend set up the way its tests run it: the invoice backend (receiving into the
"merchant" side), the wallet paying its invoices (the "payer" side; None for a receive-only
backend), the balances of both sides, and the same backend made unreachable. Each factory below
builds one; `RIGS` names them all. Adding a backend to the contract is one factory and one
line in `RIGS` (plus its kind in `RECEIVE_ONLY` if it cannot pay, in `KEYLESS` if it has no
credentials).
"""

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from bolt11 import Bolt11, Tag, TagChar, Tags
from bolt11 import encode as encode_bolt11
from coincurve import PrivateKey

from l402proxy.l402.invoice import decode_invoice
from l402proxy.launch import free_port
from l402proxy.lightning import (
    NEW_WALLET_BALANCE_MSAT,
    DevLedger,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    LightningError,
    LookupUnsupported,
    Network,
    PaymentState,
    Wallet,
    open_backend,
    open_wallet,
)
from tests.nwc_wallet import nwc_rig  # it imports this module lazily (its Rig, helpers)

T = TypeVar("T")

# An invoice made this long ago (by a ledger whose clock runs behind) expired long since.
FAR_PAST = 10_000_000.0
POLL_INTERVAL = 0.05
POLL_TRIES = 200  # with POLL_INTERVAL: ~10 s at most
UNUSED_LEDGER = "unused-devledger.sqlite"


# -- the dev ledger -------------------------------------------------------------------------------


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """Where the test's dev ledger lives (override it to test another place)."""
    return tmp_path / "devledger.sqlite"


@pytest.fixture
async def ledger(ledger_path: Path) -> AsyncIterator[DevLedger]:
    """A dev ledger on `ledger_path`, opened on first use and closed after the test."""
    opened = DevLedger(ledger_path)
    try:
        yield opened
    finally:
        await opened.close()


# -- polling -------------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    what: str,
    tries: int = POLL_TRIES,
    interval: float = POLL_INTERVAL,
) -> T:
    """`await check()` until `done(result)`; AssertionError naming `what` (and the last result)
    after `tries` tries. Bounded in count and time: never a sleep-and-hope."""
    result = await check()
    for _ in range(tries - 1):
        if done(result):
            return result
        await asyncio.sleep(interval)
        result = await check()
    if done(result):
        return result
    raise AssertionError(f"{what}: still {result!r} after {tries} tries")


async def wait_for_status(wallet: Wallet, payment_hash: bytes, status: str) -> PaymentState:
    """lookup_payment until it says `status` (~10 s at most)."""
    return await eventually(
        lambda: wallet.lookup_payment(payment_hash),
        lambda state: state.status == status,
        what=f"payment {payment_hash.hex()[:16]} {status}",
    )


async def until_expired(invoice: Invoice) -> None:
    """Wait (polling, bounded) until `invoice`'s expiry has passed on this machine's clock."""

    async def now() -> float:
        return time.time()

    await eventually(
        now,
        lambda t: decode_invoice(invoice.bolt11).is_expired(t),
        what="invoice expiry",
        tries=int(10 / POLL_INTERVAL),
    )


# -- invoices from elsewhere ----------------------------------------------------------------------


async def past_invoice(
    ledger_path: str | Path, wallet: str, amount_msat: int, memo: str = "old", expiry: int = 60
) -> Invoice:
    """An invoice of `wallet` on the ledger that expired long ago (made by a clock far behind)."""
    past = DevLedger(ledger_path, clock=lambda: time.time() - FAR_PAST)
    try:
        return await past.create_invoice(wallet, amount_msat, memo, expiry)
    finally:
        await past.close()


async def elsewhere_invoice(path: str | Path, amount_msat: int = 21_000) -> str:
    """A real regtest invoice of another dev ledger: valid, but no node of this test routes it."""
    other = DevLedger(path)
    try:
        return (await other.create_invoice("merchant", amount_msat, "elsewhere", 600)).bolt11
    finally:
        await other.close()


def amountless_invoice(currency: str = "bcrt") -> str:
    """A valid, signed invoice without an amount (from a throwaway key)."""
    tags = Tags(
        [
            Tag(TagChar.payment_hash, os.urandom(32).hex()),
            Tag(TagChar.payment_secret, os.urandom(32).hex()),
            Tag(TagChar.description, "any amount"),
            Tag(TagChar.expire_time, 600),
        ]
    )
    return encode_bolt11(
        Bolt11(currency=currency, date=int(time.time()), tags=tags), PrivateKey().secret.hex()
    )


# -- rigs ----------------------------------------------------------------------------------------


@dataclass
class Unreachable:
    """The rig's backend and wallet where nothing answers (or nothing lets them in)."""

    backend: InvoiceBackend
    wallet: Wallet | None


@dataclass
class Rig:
    """One backend under the contract. See the module docstring."""

    kind: str  # NodeInfo.backend of this backend
    backend: InvoiceBackend
    wallet: Wallet | None
    # Sat the wallet cannot pay (more than the payer side holds).
    too_dear_sat: int
    # (merchant msat, payer msat), as the backend's own books say.
    balances: Callable[[], Awaitable[tuple[int, int]]]
    # Pays an invoice of the backend from a third wallet (not the wallet under test).
    settle: Callable[[Invoice], Awaitable[bytes]]
    # A new invoice of the backend for `sat`, already expired when returned.
    expired_invoice: Callable[[int], Awaitable[Invoice]]
    # A new wallet object on the same URI: what a restarted client opens.
    reopen_wallet: Callable[[], Wallet] | None
    unreachable: Callable[[], Unreachable]
    # The rig's backend and wallet with credentials the node refuses (None: it has none).
    refused: Callable[[], Unreachable] | None = None
    network: Network | None = "regtest"
    secrets: tuple[str, ...] = ()  # never in a message
    # A Lightning Address commits to its metadata (description hash): the memo is not in it.
    memo_in_invoice: bool = True
    # A Lightning Address's service chooses the expiry itself.
    honours_expiry: bool = True
    # What looking up an invoice it never issued raises.
    unknown_invoice: type[LightningError] = InvoiceNotFound
    _opened: list[InvoiceBackend | Wallet] = field(default_factory=list)

    def opened(self, thing: T) -> T:
        """Remember `thing` (a backend or wallet) to be closed with the rig."""
        self._opened.append(thing)  # type: ignore[arg-type]
        return thing

    async def close(self) -> None:
        for thing in reversed(self._opened):
            with contextlib.suppress(Exception):
                await thing.close()


class Place(Protocol):
    """Where a rig is built: a temp dir, the dev ledger, and shared services on demand."""

    tmp_path: Path
    ledger_path: Path

    def lnbits(self) -> Any: ...


RigFactory = Callable[[Place], contextlib.AbstractAsyncContextManager[Rig]]


def _ledger_balances(
    ledger: DevLedger, merchant: str, payer: str
) -> Callable[[], Awaitable[tuple[int, int]]]:
    async def balances() -> tuple[int, int]:
        return await ledger.balance(merchant), await ledger.balance(payer)

    return balances


def _ledger_settle(ledger: DevLedger) -> Callable[[Invoice], Awaitable[bytes]]:
    async def settle(invoice: Invoice) -> bytes:
        return (await ledger.pay("outsider", invoice.bolt11, 0)).preimage

    return settle


def _ledger_expired(ledger: DevLedger, wallet: str) -> Callable[[int], Awaitable[Invoice]]:
    async def expired(sat: int) -> Invoice:
        return await past_invoice(ledger.path, wallet, sat * 1000)

    return expired


TOO_DEAR_ON_LEDGER = NEW_WALLET_BALANCE_MSAT // 1000 + 1


@contextlib.asynccontextmanager
async def dev_rig(place: Place) -> AsyncIterator[Rig]:
    ledger = DevLedger(place.ledger_path)
    uri = "dev"

    def unreachable() -> Unreachable:
        # A directory is no ledger file: it cannot even be opened.
        return Unreachable(
            open_backend(uri, dev_ledger=place.tmp_path),
            open_wallet(uri, dev_ledger=place.tmp_path),
        )

    rig = Rig(
        kind="dev",
        backend=open_backend(uri, dev_ledger=place.ledger_path),
        wallet=open_wallet(uri, dev_ledger=place.ledger_path),
        too_dear_sat=TOO_DEAR_ON_LEDGER,
        balances=_ledger_balances(ledger, "merchant", "listener"),
        settle=_ledger_settle(ledger),
        expired_invoice=_ledger_expired(ledger, "merchant"),
        reopen_wallet=lambda: open_wallet(uri, dev_ledger=place.ledger_path),
        unreachable=unreachable,
    )
    rig.opened(rig.backend)
    rig.opened(rig.wallet)
    rig.opened(ledger)
    try:
        yield rig
    finally:
        await rig.close()


@contextlib.asynccontextmanager
async def lnd_rig(place: Place) -> AsyncIterator[Rig]:
    from urllib.parse import quote

    from tests.standins.lnd import StandinLnd, b64url

    ledger = DevLedger(place.ledger_path)
    async with (
        StandinLnd(place.ledger_path, "merchant", place.tmp_path / "lnd-merchant") as merchant,
        StandinLnd(place.ledger_path, "listener", place.tmp_path / "lnd-listener") as listener,
    ):
        # The server with files (lnd://), the client inline (lndconnect://, as Zeus exports).
        backend_uri, wallet_uri = merchant.uri(), listener.lndconnect_uri()
        dead = f"127.0.0.1:{free_port()}"

        def unreachable() -> Unreachable:
            return Unreachable(
                open_backend(backend_uri.replace(merchant.address, dead), dev_ledger=UNUSED_LEDGER),
                open_wallet(wallet_uri.replace(listener.address, dead), dev_ledger=UNUSED_LEDGER),
            )

        def refused() -> Unreachable:
            # Each node's URI with the other node's macaroon: "verification failed".
            swapped = f"macaroon={quote(str(listener.macaroon_path()), safe='/')}"
            return Unreachable(
                open_backend(
                    backend_uri.split("&macaroon=")[0] + "&" + swapped, dev_ledger=UNUSED_LEDGER
                ),
                open_wallet(
                    wallet_uri.split("macaroon=")[0]
                    + f"macaroon={b64url(merchant.macaroons['admin'])}",
                    dev_ledger=UNUSED_LEDGER,
                ),
            )

        macaroons = [*merchant.macaroons.values(), *listener.macaroons.values()]
        rig = Rig(
            kind="lnd",
            backend=open_backend(backend_uri, dev_ledger=UNUSED_LEDGER),
            wallet=open_wallet(wallet_uri, dev_ledger=UNUSED_LEDGER),
            too_dear_sat=TOO_DEAR_ON_LEDGER,
            balances=_ledger_balances(ledger, "merchant", "listener"),
            settle=_ledger_settle(ledger),
            expired_invoice=_ledger_expired(ledger, "merchant"),
            reopen_wallet=lambda: open_wallet(wallet_uri, dev_ledger=UNUSED_LEDGER),
            unreachable=unreachable,
            refused=refused,
            secrets=tuple(s for m in macaroons for s in (m.hex(), b64url(m))),
        )
        rig.opened(rig.backend)
        rig.opened(rig.wallet)
        rig.opened(ledger)
        try:
            yield rig
        finally:
            await rig.close()


@contextlib.asynccontextmanager
async def cln_rig(place: Place) -> AsyncIterator[Rig]:
    from tests.standins.cln import ClnStandin

    ledger = DevLedger(place.ledger_path)
    for side in ("merchant", "listener"):
        (place.tmp_path / f"cln-{side}").mkdir()
    async with (
        ClnStandin(place.tmp_path / "cln-merchant" / "lightning-rpc", ledger, "merchant") as shop,
        ClnStandin(place.tmp_path / "cln-listener" / "lightning-rpc", ledger, "listener") as fan,
    ):
        # Both URI forms: cln:// for the server, the bare socket path for the client.
        backend_uri, wallet_uri = f"cln://{shop.socket_path}", fan.socket_path
        dead = place.tmp_path / "cln-stopped" / "lightning-rpc"

        def unreachable() -> Unreachable:
            return Unreachable(
                open_backend(f"cln://{dead}", dev_ledger=UNUSED_LEDGER),
                open_wallet(str(dead), dev_ledger=UNUSED_LEDGER),
            )

        rig = Rig(
            kind="cln",
            backend=open_backend(backend_uri, dev_ledger=UNUSED_LEDGER),
            wallet=open_wallet(wallet_uri, dev_ledger=UNUSED_LEDGER),
            too_dear_sat=TOO_DEAR_ON_LEDGER,
            balances=_ledger_balances(ledger, "merchant", "listener"),
            settle=_ledger_settle(ledger),
            expired_invoice=_ledger_expired(ledger, "merchant"),
            reopen_wallet=lambda: open_wallet(wallet_uri, dev_ledger=UNUSED_LEDGER),
            unreachable=unreachable,
        )
        rig.opened(rig.backend)
        rig.opened(rig.wallet)
        try:
            yield rig
        finally:
            await rig.close()
            await ledger.close()


ECLAIR_PASSWORD = "contract-Eclair-pw-7f3a9c"


@contextlib.asynccontextmanager
async def eclair_rig(place: Place) -> AsyncIterator[Rig]:
    from tests.standins.eclair import EclairStandin

    ledger = DevLedger(place.ledger_path)
    async with (
        EclairStandin(ledger, "merchant", ECLAIR_PASSWORD) as shop,
        EclairStandin(ledger, "listener", ECLAIR_PASSWORD) as fan,
    ):
        dead = f"eclair://:{ECLAIR_PASSWORD}@127.0.0.1:{free_port()}"

        def unreachable() -> Unreachable:
            return Unreachable(
                open_backend(dead, dev_ledger=UNUSED_LEDGER),
                open_wallet(dead, dev_ledger=UNUSED_LEDGER),
            )

        def refused() -> Unreachable:
            wrong = f"eclair://:not-{ECLAIR_PASSWORD}@127.0.0.1:"
            return Unreachable(
                open_backend(f"{wrong}{shop.port}", dev_ledger=UNUSED_LEDGER),
                open_wallet(f"{wrong}{fan.port}", dev_ledger=UNUSED_LEDGER),
            )

        rig = Rig(
            kind="eclair",
            backend=open_backend(shop.uri, dev_ledger=UNUSED_LEDGER),
            wallet=open_wallet(fan.uri, dev_ledger=UNUSED_LEDGER),
            too_dear_sat=TOO_DEAR_ON_LEDGER,
            balances=_ledger_balances(ledger, "merchant", "listener"),
            settle=_ledger_settle(ledger),
            expired_invoice=_ledger_expired(ledger, "merchant"),
            reopen_wallet=lambda: open_wallet(fan.uri, dev_ledger=UNUSED_LEDGER),
            unreachable=unreachable,
            refused=refused,
            secrets=(ECLAIR_PASSWORD,),
        )
        rig.opened(rig.backend)
        rig.opened(rig.wallet)
        try:
            yield rig
        finally:
            await rig.close()
            await ledger.close()


LNBITS_PAYER_SAT = 1_000


@contextlib.asynccontextmanager
async def lnbits_rig(place: Place) -> AsyncIterator[Rig]:
    from l402proxy.lightning.lnbits import LNbitsWallet, parse_uri

    server = place.lnbits()
    tag = secrets.token_hex(3)
    shop, fan, outsider = await asyncio.gather(
        *(
            asyncio.to_thread(server.create_wallet, f"{name}-{tag}")
            for name in ("shop", "listener", "outsider")
        )
    )
    await asyncio.to_thread(server.fund, fan, LNBITS_PAYER_SAT)
    await asyncio.to_thread(server.fund, outsider, LNBITS_PAYER_SAT)
    backend_uri, wallet_uri = server.uri(shop.inkey), server.uri(fan.adminkey)
    third = LNbitsWallet(parse_uri(server.uri(outsider.adminkey)))

    async def balances() -> tuple[int, int]:
        return (
            await asyncio.to_thread(server.balance_msat, shop),
            await asyncio.to_thread(server.balance_msat, fan),
        )

    async def settle(invoice: Invoice) -> bytes:
        return (await third.pay(invoice.bolt11, 10_000)).preimage

    backend = open_backend(backend_uri, dev_ledger=UNUSED_LEDGER)

    async def expired(sat: int) -> Invoice:
        # LNbits takes any expiry: one second, then wait it out.
        invoice = await backend.create_invoice(sat, "soon expired", 1)
        await until_expired(invoice)
        return invoice

    port = free_port()

    def unreachable() -> Unreachable:
        dead = f"127.0.0.1:{port}"
        return Unreachable(
            open_backend(backend_uri.replace(f"127.0.0.1:{server.port}", dead), dev_ledger="x"),
            open_wallet(wallet_uri.replace(f"127.0.0.1:{server.port}", dead), dev_ledger="x"),
        )

    wrong_key = secrets.token_hex(16)

    def refused() -> Unreachable:
        wrong = server.uri(wrong_key)
        return Unreachable(
            open_backend(wrong, dev_ledger=UNUSED_LEDGER),
            open_wallet(wrong, dev_ledger=UNUSED_LEDGER),
        )

    rig = Rig(
        kind="lnbits",
        backend=backend,
        wallet=open_wallet(wallet_uri, dev_ledger=UNUSED_LEDGER),
        too_dear_sat=2 * LNBITS_PAYER_SAT,
        balances=balances,
        settle=settle,
        expired_invoice=expired,
        reopen_wallet=lambda: open_wallet(wallet_uri, dev_ledger=UNUSED_LEDGER),
        unreachable=unreachable,
        refused=refused,
        # No LNbits endpoint a wallet key may call names the chain.
        network=None,
        secrets=(wrong_key, *(k for w in (shop, fan, outsider) for k in (w.inkey, w.adminkey))),
    )
    rig.opened(rig.backend)
    rig.opened(rig.wallet)
    rig.opened(third)
    try:
        yield rig
    finally:
        await rig.close()


@contextlib.asynccontextmanager
async def lnurl_rig(place: Place) -> AsyncIterator[Rig]:
    from tests.standins.lnurl import Knobs, LnurlService

    ledger = DevLedger(place.ledger_path)
    async with LnurlService(ledger, comment_allowed=100) as service:
        uri = f"lnurl:{service.address}"
        backend = open_backend(uri, dev_ledger=UNUSED_LEDGER)

        async def expired(sat: int) -> Invoice:
            service.knobs = Knobs(expiry=1)
            try:
                invoice = await backend.create_invoice(sat, "soon expired", 600)
            finally:
                service.knobs = Knobs()
            await until_expired(invoice)
            return invoice

        port = free_port()
        rig = Rig(
            kind="lnurl",
            backend=backend,
            wallet=None,
            too_dear_sat=TOO_DEAR_ON_LEDGER,
            balances=_ledger_balances(ledger, "merchant", "listener"),
            settle=_ledger_settle(ledger),
            expired_invoice=expired,
            reopen_wallet=None,
            unreachable=lambda: Unreachable(
                open_backend(f"lnurl:shop@127.0.0.1:{port}", dev_ledger=UNUSED_LEDGER), None
            ),
            network=None,  # nothing in LNURL-pay names the chain
            memo_in_invoice=False,
            honours_expiry=False,
            unknown_invoice=LookupUnsupported,
        )
        rig.opened(backend)
        try:
            yield rig
        finally:
            await rig.close()
            await ledger.close()


# Every backend under the contract, by NodeInfo.backend name.
RIGS: dict[str, RigFactory] = {
    "dev": dev_rig,
    "lnd": lnd_rig,
    "cln": cln_rig,
    "eclair": eclair_rig,
    "lnbits": lnbits_rig,
    "lnurl": lnurl_rig,
    "nwc": nwc_rig,
}
# The ones that only receive (no wallet: the paying half of the contract does not apply).
RECEIVE_ONLY = frozenset({"lnurl"})
# The ones without credentials to get wrong: a ledger file, a unix socket, a public address.
KEYLESS = frozenset({"dev", "cln", "lnurl"})
PAYING = tuple(kind for kind in RIGS if kind not in RECEIVE_ONLY)
GUARDED = tuple(kind for kind in RIGS if kind not in KEYLESS)
