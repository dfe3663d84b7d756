"""A Nostr Wallet Connect wallet service (NIP-47) for the tests, backed by a dev ledger wallet
so that money really moves.

It speaks NIP-47 over real relays: it publishes its info event (kind 13194), takes requests
(kind 23194) addressed to its key from the one client key it knows, checks their signatures and
expiration, decrypts them (NIP-44 v2, or NIP-04 in `nip04_only` mode), does the work on the dev
ledger and answers (kind 23195, `e` tag = the request id) in the request's encryption. Its own
relay connections reconnect by themselves, like a real service's.

`switches` make it answer error codes or lie in its results, drop answers (the work is done,
the answer never sent), answer late or ignore requests; `budget_msat` gives the connection a
real budget (QUOTA_EXCEEDED past it, reported by get_budget). What it was asked is in
`requests`.

In-process (async tests):   async with NWCWalletService(relays, ledger_path, "merchant") as w
On its own loop in a thread (end-to-end tests, the proxies are other processes):
                            with w.running_in_thread(): ...
`w.uri()` is the connection URI to hand l402_backend / l402_wallet.
"""

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from l402proxy.l402.invoice import decode_invoice
from l402proxy.launch import free_port
from l402proxy.lightning import (
    NEW_WALLET_BALANCE_MSAT,
    Invoice,
    InvoiceNotFound,
    LightningError,
    PaymentFailed,
    open_backend,
    open_wallet,
)
from l402proxy.lightning.dev import DevLedger
from l402proxy.lightning.nostr import (
    Event,
    NostrError,
    conversation_key,
    nip04_decrypt,
    nip04_encrypt,
    nip44_decrypt,
    nip44_encrypt,
    private_key,
    public_key_hex,
    sign_event,
    verify_event,
)
from tests.standins.nostr_relay import TestRelay

if TYPE_CHECKING:
    from tests.backends import Place, Rig

ALL_METHODS = (
    "pay_invoice",
    "make_invoice",
    "lookup_invoice",
    "get_info",
    "get_balance",
    "get_budget",
)
KIND_INFO, KIND_REQUEST, KIND_RESPONSE = 13194, 23194, 23195
RECONNECT_SECONDS = 0.2
THREAD_START_SECONDS = 15.0


@dataclass
class Switches:
    """Ways to make the wallet misbehave; all off by default. Safe to set from another thread
    between requests (each request reads them once)."""

    fail_with: dict[str, str] = field(default_factory=dict)  # method -> NIP-47 error code
    drop_answers: set[str] = field(default_factory=set)  # methods done but never answered
    ignore: set[str] = field(default_factory=set)  # methods neither done nor answered
    delay_answers: dict[str, float] = field(default_factory=dict)  # method -> seconds late
    legacy_lookup: bool = False  # lookup answers without `state` (wallets before it existed)
    patch_results: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> lies


@dataclass(frozen=True)
class Seen:
    method: str
    encryption: str  # "nip44_v2" or "nip04"
    event: Event


class NWCWalletService:
    def __init__(
        self,
        relays: list[str],
        ledger_path: Path | str,
        wallet: str,
        *,
        methods: tuple[str, ...] = ALL_METHODS,
        nip04_only: bool = False,
        budget_msat: int | None = None,
        alias: str | None = None,
    ) -> None:
        self.relays = relays
        self.ledger_path = Path(ledger_path)
        self.wallet = wallet
        self.methods = methods
        self.nip04_only = nip04_only
        self.budget_msat = budget_msat
        self.spent_msat = 0
        self.alias = alias or f"dev wallet {wallet}"
        self.switches = Switches()
        self.service_key = private_key(secrets.token_bytes(32))
        self.service_pubkey = public_key_hex(self.service_key)
        self.client_secret = secrets.token_bytes(32)
        self.client_pubkey = public_key_hex(private_key(self.client_secret))
        self.requests: list[Seen] = []
        self.answered: list[str] = []  # request ids answered
        self._handled: set[str] = set()
        self._info_ids: set[str] = set()
        self._conv = conversation_key(self.service_key, self.client_pubkey)
        self._ledger: DevLedger | None = None
        self._sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._work: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._started_at = int(time.time())
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the connection URI ------------------------------------------------------------------

    def uri(
        self,
        *,
        timeout: float | None = None,
        lud16: str | None = None,
        relays: list[str] | None = None,
    ) -> str:
        """The connection URI; `relays` to name others than the ones it listens on."""
        query = "&".join(f"relay={quote(relay, safe='')}" for relay in relays or self.relays)
        query += f"&secret={self.client_secret.hex()}"
        if lud16:
            query += f"&lud16={lud16}"
        if timeout is not None:
            query += f"&timeout={timeout:g}"
        return f"nostr+walletconnect://{self.service_pubkey}?{query}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> "NWCWalletService":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self, wait: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        self.connected = asyncio.Event()
        self._ledger = DevLedger(self.ledger_path)
        await self._ledger.open()
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._relay(url)) for url in self.relays]
        with contextlib.suppress(TimeoutError):
            # A relay that is down now is fine (tests of that start it later).
            await asyncio.wait_for(self.connected.wait(), wait)

    async def stop(self) -> None:
        for task in [*self._tasks, *self._work]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._work, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._ledger is not None:
            await self._ledger.close()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator["NWCWalletService"]:
        """Run on a loop of its own in a daemon thread (end-to-end tests)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        stopping = asyncio.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                raise
            ready.set()
            await stopping.wait()
            await self.stop()

        thread = threading.Thread(
            target=loop.run_until_complete, args=(main(),), daemon=True, name="nwc wallet"
        )
        thread.start()
        ready.wait(THREAD_START_SECONDS)
        if failure:
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(stopping.set)
            thread.join(THREAD_START_SECONDS)
            if not thread.is_alive():
                loop.close()

    @property
    def relays_connected(self) -> int:
        return len(self._sockets)

    # -- relays ------------------------------------------------------------------------------

    async def _relay(self, url: str) -> None:
        """One relay: connect, announce, listen; again after every drop, until stopped."""
        assert self._session is not None
        while True:
            try:
                async with self._session.ws_connect(url, heartbeat=5) as ws:
                    self._sockets[url] = ws
                    info = self._info_event()
                    self._info_ids.add(info.id)
                    await self._send(ws, ["EVENT", info.to_json()])
                    since = self._started_at - 60
                    flt = {"kinds": [KIND_REQUEST], "#p": [self.service_pubkey], "since": since}
                    await self._send(ws, ["REQ", "requests", flt])
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self._receive(message.data)
            except asyncio.CancelledError:
                raise
            except Exception:
                pass
            finally:
                self._sockets.pop(url, None)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, message: list[Any]) -> None:
        await ws.send_str(json.dumps(message))

    def _info_event(self) -> Event:
        tags = [] if self.nip04_only else [["encryption", "nip44_v2 nip04"]]
        return sign_event(self.service_key, KIND_INFO, tags, " ".join(self.methods))

    async def republish_info(self) -> None:
        """Announce again (after changing `methods` or `nip04_only`)."""
        for ws in list(self._sockets.values()):
            await self._send(ws, ["EVENT", self._info_event().to_json()])

    def _receive(self, text: str) -> None:
        message = json.loads(text)
        if message[0] == "OK" and message[1] in self._info_ids:
            # Announced (the relay stored the info event) and listening: ready.
            self.connected.set()
            return
        if message[0] != "EVENT" or message[1] != "requests":
            return
        try:
            event = Event.from_json(message[2])
        except NostrError:
            return
        if event.id in self._handled or not verify_event(event):
            return
        self._handled.add(event.id)
        task = asyncio.get_running_loop().create_task(self._handle(event))
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _publish(self, event: Event) -> None:
        for ws in list(self._sockets.values()):
            with contextlib.suppress(Exception):
                await self._send(ws, ["EVENT", event.to_json()])

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, request: Event) -> None:
        if request.kind != KIND_REQUEST or request.tag("p") != self.service_pubkey:
            return
        expiration = request.tag("expiration")
        if expiration is not None and int(expiration) < time.time():
            return  # NIP-47: an expired request is ignored
        scheme = request.tag("encryption") or "nip04"
        if request.pubkey != self.client_pubkey:
            await self._answer(request, scheme, "", error=("UNAUTHORIZED", "unknown connection"))
            return
        if (scheme == "nip44_v2" and self.nip04_only) or scheme not in ("nip44_v2", "nip04"):
            await self._answer(
                request, "nip04", "", error=("UNSUPPORTED_ENCRYPTION", f"{scheme} unknown")
            )
            return
        try:
            if scheme == "nip44_v2":
                body = json.loads(nip44_decrypt(request.content, self._conv))
            else:
                body = json.loads(nip04_decrypt(request.content, self.service_key, request.pubkey))
        except (NostrError, ValueError):
            await self._answer(request, scheme, "", error=("OTHER", "cannot decrypt"))
            return
        method, params = body.get("method", ""), body.get("params") or {}
        self.requests.append(Seen(method, scheme, request))
        switches = self.switches
        if method in switches.ignore:
            return
        if method in switches.fail_with:
            code = switches.fail_with[method]
            await self._answer(request, scheme, method, error=(code, f"test wallet says {code}"))
            return
        if method not in ALL_METHODS:
            await self._answer(request, scheme, method, error=("NOT_IMPLEMENTED", method))
            return
        if method not in self.methods:
            await self._answer(request, scheme, method, error=("RESTRICTED", f"no {method}"))
            return
        try:
            result = await getattr(self, f"_{method}")(params)
        except _Error as exc:
            await self._answer(request, scheme, method, error=(exc.code, exc.message))
            return
        if method in switches.drop_answers:
            return
        result = {**result, **switches.patch_results.get(method, {})}
        delay = switches.delay_answers.get(method, 0.0)
        if delay:
            await asyncio.sleep(delay)
        await self._answer(request, scheme, method, result=result)

    async def _answer(
        self,
        request: Event,
        scheme: str,
        method: str,
        *,
        result: dict[str, Any] | None = None,
        error: tuple[str, str] | None = None,
    ) -> None:
        body: dict[str, Any] = {"result_type": method, "result": result, "error": None}
        if error is not None:
            body["error"] = {"code": error[0], "message": error[1]}
        plaintext = json.dumps(body)
        if scheme == "nip44_v2":
            content = nip44_encrypt(plaintext, conversation_key(self.service_key, request.pubkey))
        else:
            content = nip04_encrypt(plaintext, self.service_key, request.pubkey)
        tags = [["p", request.pubkey], ["e", request.id]]
        await self._publish(sign_event(self.service_key, KIND_RESPONSE, tags, content))
        self.answered.append(request.id)

    # -- the methods, on the dev ledger ------------------------------------------------------

    @property
    def ledger(self) -> DevLedger:
        assert self._ledger is not None
        return self._ledger

    async def _get_info(self, _: dict[str, Any]) -> dict[str, Any]:
        await self.ledger.open()
        return {
            "alias": self.alias,
            "color": "#3399ff",
            "pubkey": self.ledger.node_id,
            "network": "regtest",
            "block_height": 1,
            "block_hash": "00" * 32,
            "methods": list(self.methods),
            "notifications": [],
        }

    async def _get_balance(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"balance": await self.ledger.balance(self.wallet)}

    async def _get_budget(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.budget_msat is None:
            return {}
        return {
            "used_budget": self.spent_msat,
            "total_budget": self.budget_msat,
            "renews_at": int(time.time()) + 30 * 86400,
            "renewal_period": "monthly",
        }

    async def _make_invoice(self, params: dict[str, Any]) -> dict[str, Any]:
        amount, expiry = params.get("amount"), params.get("expiry") or 3600
        description = params.get("description") or ""
        try:
            invoice = await self.ledger.create_invoice(self.wallet, amount, description, expiry)
        except LightningError as exc:
            raise _Error("OTHER", str(exc)) from None
        return {
            "type": "incoming",
            "state": "pending",
            "invoice": invoice.bolt11,
            "description": description,
            "payment_hash": invoice.payment_hash.hex(),
            "amount": invoice.amount_msat,
            "fees_paid": 0,
            "created_at": int(time.time()),
            "expires_at": int(invoice.expires_at),
        }

    async def _lookup_invoice(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            payment_hash = bytes.fromhex(params.get("payment_hash", ""))
        except ValueError:
            raise _Error("OTHER", "bad payment_hash") from None
        now = int(time.time())
        try:
            state = await self.ledger.lookup_invoice(payment_hash, wallet=self.wallet)
        except InvoiceNotFound:
            state = None
        except LightningError as exc:
            raise _Error("OTHER", str(exc)) from None
        if state is not None:
            result: dict[str, Any] = {
                "type": "incoming",
                "state": "settled" if state.settled else "pending",
                "payment_hash": payment_hash.hex(),
                "amount": state.amount_msat,
                "fees_paid": 0,
                "created_at": now,
                "settled_at": now if state.settled else None,
            }
            if state.preimage is not None:
                result["preimage"] = state.preimage.hex()
        else:
            paid = await self.ledger.lookup_payment(self.wallet, payment_hash)
            if paid.status == "unknown":
                raise _Error("NOT_FOUND", "no such invoice or payment")
            result = {
                "type": "outgoing",
                "state": {"succeeded": "settled"}.get(paid.status, paid.status),
                "payment_hash": payment_hash.hex(),
                "amount": 0,
                "fees_paid": paid.fee_msat,
                "created_at": now,
                "settled_at": now if paid.status == "succeeded" else None,
            }
            if paid.preimage is not None:
                result["preimage"] = paid.preimage.hex()
        if self.switches.legacy_lookup:
            result.pop("state")
        return result

    async def _pay_invoice(self, params: dict[str, Any]) -> dict[str, Any]:
        bolt11 = params.get("invoice", "")
        try:
            amount = decode_invoice(bolt11).amount_msat or 0
        except ValueError as exc:
            raise _Error("OTHER", str(exc)) from None
        if self.budget_msat is not None and self.spent_msat + amount > self.budget_msat:
            raise _Error("QUOTA_EXCEEDED", "this connection's budget is spent")
        try:
            paid = await self.ledger.pay(self.wallet, bolt11, 10**12)
        except PaymentFailed as exc:
            code = (
                "INSUFFICIENT_BALANCE" if "insufficient balance" in str(exc) else "PAYMENT_FAILED"
            )
            raise _Error(code, str(exc)) from None
        self.spent_msat += paid.amount_msat
        return {"preimage": paid.preimage.hex(), "fees_paid": paid.fee_msat}


class _Error(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


async def drain(ledger_path: Path | str, wallet: str, keep_msat: int = 0) -> None:
    """Empty a dev wallet (pays all but `keep_msat` to a sink): a real INSUFFICIENT_BALANCE."""
    ledger = DevLedger(ledger_path)
    try:
        balance = await ledger.balance(wallet)
        if balance > keep_msat:
            invoice = await ledger.create_invoice("sink", balance - keep_msat, "drain", 600)
            await ledger.pay(wallet, invoice.bolt11, 0)
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def nwc_rig(place: "Place") -> AsyncIterator["Rig"]:
    """Nostr Wallet Connect under the backend contract (tests/backends.py `RIGS`): wallet
    services for "merchant" and "listener" on the dev ledger, over an in-process relay."""
    # Here, not at the top: tests/backends.py imports this module for its RIGS.
    from tests.backends import Rig, Unreachable, past_invoice

    unused = "unused-devledger.sqlite"
    ledger = DevLedger(place.ledger_path)
    async with (
        TestRelay() as relay,
        NWCWalletService([relay.url], place.ledger_path, "merchant") as shop,
        NWCWalletService([relay.url], place.ledger_path, "listener") as listener,
    ):
        down = [f"ws://127.0.0.1:{free_port()}"]
        stranger = secrets.token_bytes(32).hex()

        async def balances() -> tuple[int, int]:
            return await ledger.balance("merchant"), await ledger.balance("listener")

        async def settle(invoice: Invoice) -> bytes:
            return (await ledger.pay("outsider", invoice.bolt11, 0)).preimage

        async def expired(sat: int) -> Invoice:
            return await past_invoice(place.ledger_path, "merchant", sat * 1000)

        def refused() -> Unreachable:
            # The wallet's key and relay, but a connection secret it never handed out.
            def uri(service: NWCWalletService) -> str:
                return service.uri(timeout=5).replace(service.client_secret.hex(), stranger)

            return Unreachable(
                open_backend(uri(shop), dev_ledger=unused),
                open_wallet(uri(listener), dev_ledger=unused),
            )

        rig = Rig(
            kind="nwc",
            backend=open_backend(shop.uri(timeout=5), dev_ledger=unused),
            wallet=open_wallet(listener.uri(timeout=5), dev_ledger=unused),
            too_dear_sat=NEW_WALLET_BALANCE_MSAT // 1000 + 1,
            balances=balances,
            settle=settle,
            expired_invoice=expired,
            reopen_wallet=lambda: open_wallet(listener.uri(timeout=5), dev_ledger=unused),
            unreachable=lambda: Unreachable(
                open_backend(shop.uri(relays=down), dev_ledger=unused),
                open_wallet(listener.uri(relays=down), dev_ledger=unused),
            ),
            refused=refused,
            secrets=(shop.client_secret.hex(), listener.client_secret.hex(), stranger),
        )
        rig.opened(rig.backend)
        rig.opened(rig.wallet)
        try:
            yield rig
        finally:
            await rig.close()
            await ledger.close()
