"""Nostr Wallet Connect (NIP-47): invoices into a wallet (server) and payments from one
(client), through a wallet service reached over Nostr relays.

    nostr+walletconnect://<wallet pubkey>?relay=wss://relay.example&secret=<hex>
        [&relay=wss://...]   more relays: the wallet service listens on all of them
        [&lud16=<address>]   the wallet's Lightning Address, shown in messages
        [&timeout=<seconds>] how long a request may wait for its answer (default 30)

The URI is the one the wallet hands out (Alby Hub, LNbits, Coinos, ...); `secret` is this
connection's key and never reaches a log line, an error, a metric or describe().

How it works: the wallet service publishes an info event (kind 13194) saying which methods and
encryption it offers (`encryption` tag: nip44_v2 and/or nip04; no tag means NIP-04 only). Each
request is an event of kind 23194 to the wallet (a `p` tag) that expires (NIP-40) after the
timeout, its content encrypted with NIP-44 v2 when the wallet offers it, else NIP-04; the answer
is a kind 23195 event from the wallet naming the request (`e` tag). Relays reconnect by
themselves; a payment whose answer is lost is looked up later (lookup_invoice), as with the
other wallets.

Server (l402_backend): make_invoice and lookup_invoice; a connection without lookup_invoice is
refused at start (the paywall page's browser unlock asks it whether an invoice was paid).
Client (l402_wallet): pay_invoice, and lookup_invoice to settle a payment whose answer was lost;
get_info, get_balance and get_budget, where offered, for `l402proxy backend check`. NIP-47 has
no fee limit per payment: the wallet's own fee policy applies (give the connection a budget).
"""

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from coincurve import PrivateKey

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    LookupUnsupported,
    Network,
    NodeInfo,
    NothingSent,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    Wallet,
)
from l402proxy.lightning.common import check_hash, one_line, payable_invoice
from l402proxy.lightning.nostr import (
    Event,
    NostrError,
    Relay,
    RelayError,
    RelayPool,
    Subscription,
    check_public_key,
    conversation_key,
    is_hex,
    nip04_decrypt,
    nip04_encrypt,
    nip44_decrypt,
    nip44_encrypt,
    private_key,
    public_key_hex,
    sign_event,
)
from l402proxy.lightning.uri import LIGHTNING_ADDRESS, parse_query, redact

log = logging.getLogger(__name__)

SCHEMES: Final = ("nostr+walletconnect", "nostrwalletconnect")
URI_PARAMS: Final = ("relay", "secret", "lud16", "timeout")
FORM: Final = "nostr+walletconnect://<wallet pubkey>?relay=wss://<relay>&secret=<hex>"
DEFAULT_TIMEOUT: Final = 30.0
MAX_RELAYS: Final = 8

KIND_INFO: Final = 13194
KIND_REQUEST: Final = 23194
KIND_RESPONSE: Final = 23195
NIP44: Final = "nip44_v2"
NIP04: Final = "nip04"
Encryption = Literal["nip44_v2", "nip04"]

# info() must fit inside the callers' own bounds (15 s at start, 20 s for `backend check`).
INFO_SECONDS: Final = 12.0
# The optional calls of info() (balance, budget) are skipped with less than this left.
INFO_OPTIONAL_MIN_SECONDS: Final = 1.0
# The wallet's info event (methods, encryption) is read again after this long.
INFO_EVENT_CACHE_SECONDS: Final = 600.0
# Answers are asked for from this long before the oldest request still waiting: clocks differ.
CLOCK_SKEW_SECONDS: Final = 60
# A request that could not be sent at all (its relay's connection was just breaking) is sent
# again after this pause, while its time lasts.
RESEND_PAUSE_SECONDS: Final = 0.1
# After a pay request expires the wallet never starts it, but a payment it started may still be
# trying routes on its node for a while (LND, CLN and LDK give up within a few minutes).
NODE_ATTEMPT_SECONDS: Final = 300.0
# A BOLT11 description holds at most 639 bytes.
MAX_MEMO_BYTES: Final = 639
# The wallet's own error text, in our messages.
MAX_WALLET_TEXT: Final = 200

# NIP-47 error codes that say the wallet did not pay (and will not), whatever the method.
REFUSED_CODES: Final = frozenset(
    {
        "INSUFFICIENT_BALANCE",
        "QUOTA_EXCEEDED",
        "RATE_LIMITED",
        "RESTRICTED",
        "UNAUTHORIZED",
        "NOT_IMPLEMENTED",
        "UNSUPPORTED_ENCRYPTION",
    }
)
# The codes that mean the wallet does not let this connection do it at all (refused
# credentials, as a node refuses a macaroon or key).
ACCESS_CODES: Final = frozenset({"UNAUTHORIZED", "RESTRICTED"})
# The codes the client's X-L402-Refused names on their own; every other refusal is
# "payment_failed".
REFUSAL_FOR_CODE: Final = {
    "INSUFFICIENT_BALANCE": "insufficient_balance",
    "QUOTA_EXCEEDED": "quota_exceeded",
    "RATE_LIMITED": "rate_limited",
}
# Codes that say the wallet's info event (methods, encryption) no longer holds.
STALE_INFO_CODES: Final = frozenset({"NOT_IMPLEMENTED", "UNSUPPORTED_ENCRYPTION", "RESTRICTED"})
# A few words for each code, before the wallet's own message.
CODE_MEANING: Final = {
    "INSUFFICIENT_BALANCE": "not enough funds in the wallet",
    "QUOTA_EXCEEDED": "the connection's budget is spent",
    "RATE_LIMITED": "too many requests, retry in a few seconds",
    "RESTRICTED": "this connection may not do that",
    "UNAUTHORIZED": "the wallet does not know this connection",
    "NOT_IMPLEMENTED": "the wallet does not offer that",
    "UNSUPPORTED_ENCRYPTION": "the wallet does not accept this encryption",
    "PAYMENT_FAILED": "the payment failed",
    "NOT_FOUND": "not found",
    "INTERNAL": "the wallet had an internal error",
    "OTHER": "the wallet had an error",
}
_NETWORKS: Final[dict[str, Network]] = {
    "mainnet": "mainnet",
    "bitcoin": "mainnet",
    "testnet": "testnet",
    "testnet3": "testnet",
    "testnet4": "testnet",
    "signet": "signet",
    "regtest": "regtest",
}


class WalletRefused(PaymentFailed):
    """The wallet answered a payment with a NIP-47 error code that means it paid nothing.

    `refusal` is the client's refusal code for it (X-L402-Refused): "insufficient_balance",
    "quota_exceeded", "rate_limited", or "payment_failed" for every other code."""

    def __init__(self, message: str, nwc_code: str) -> None:
        super().__init__(message)
        self.nwc_code = nwc_code
        self.refusal = REFUSAL_FOR_CODE.get(nwc_code, "payment_failed")


class ConnectionRefused(WalletRefused, NothingSent):
    """The wallet does not let this connection pay (UNAUTHORIZED: it does not know the key;
    RESTRICTED: not allowed to pay): like credentials a node refuses, nothing was sent."""


class LookupNotOffered(LookupUnsupported):
    """The connection does not offer lookup_invoice: a payment cannot be looked up."""


# -- the URI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NWCConfig:
    """A parsed NWC URI. Everything but `secret` is public (the relays see it anyway)."""

    wallet_pubkey: str
    relays: tuple[str, ...]
    secret: bytes = field(repr=False)
    lud16: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def client_pubkey(self) -> str:
        """This connection's public key (the author of our requests)."""
        return public_key_hex(private_key(self.secret))

    @property
    def shown_relays(self) -> str:
        return ", ".join(redact(relay) for relay in self.relays)

    def __repr__(self) -> str:
        return (
            f"NWCConfig(relays={self.shown_relays!r}, app key {self.client_pubkey[:12]}…, "
            f"secret=***, timeout={self.timeout:g})"
        )


def _check_relay(url: str) -> str:
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise LightningError(f"NWC URI: relay {shown!r} has a bad host or port") from None
    if parts.scheme.lower() not in ("ws", "wss"):
        raise LightningError(f"NWC URI: relay {shown!r} is not a ws:// or wss:// URL")
    if not parts.hostname:
        raise LightningError(f"NWC URI: relay {shown!r} has no host")
    if port == 0:
        raise LightningError(f"NWC URI: relay {shown!r} has port 0")
    return url


def parse_uri(uri: str) -> NWCConfig:
    """Parse and check an NWC URI; LightningError (never showing the secret) when unusable."""
    text = uri.strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        raise LightningError(f"NWC URI {redact(text)!r} cannot be parsed; use {FORM}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise LightningError(f"not an NWC URI: {redact(text)!r}; use {FORM}")
    if "@" in parts.netloc:
        raise LightningError("NWC URI: the secret goes in ?secret=..., not before the wallet key")
    if parts.fragment:
        raise LightningError("NWC URI: unexpected '#' part")
    # nostr+walletconnect://<key>?... (the NIP) or nostr+walletconnect:<key>?... (seen too).
    pubkey = (parts.netloc or parts.path).lower()
    if parts.netloc and parts.path not in ("", "/"):
        raise LightningError(f"NWC URI: nothing may follow the wallet's public key; use {FORM}")
    if not is_hex(pubkey, 64):
        raise LightningError(
            "NWC URI: the wallet's public key (after nostr+walletconnect://) must be 64 hex "
            f"digits; use {FORM}"
        )
    try:
        check_public_key(pubkey)
    except NostrError:
        raise LightningError("NWC URI: the wallet's public key is not a valid key") from None
    query = parse_query(text, what="NWC URI", allowed=URI_PARAMS, repeatable=("relay",))
    relays = [_check_relay(value.strip()) for value in query.all("relay")]
    relays = list(dict.fromkeys(relays))
    if not relays:
        raise LightningError(
            f"NWC URI has no relay=: give the relay(s) the wallet listens on; {FORM}"
        )
    if len(relays) > MAX_RELAYS:
        raise LightningError(f"NWC URI: at most {MAX_RELAYS} relays")
    secret_hex = (query.get("secret") or "").strip().lower()
    if not secret_hex:
        raise LightningError("NWC URI has no secret=: give the connection secret the wallet showed")
    if not is_hex(secret_hex, 64):
        raise LightningError("NWC URI: the secret must be 64 hex digits")
    secret = bytes.fromhex(secret_hex)
    try:
        private_key(secret)
    except NostrError:
        raise LightningError("NWC URI: the secret is not a valid key") from None
    lud16 = query.get("lud16") or None
    if lud16 is not None and not LIGHTNING_ADDRESS.match(lud16):
        raise LightningError("NWC URI: lud16 is not a Lightning Address (user@domain)")
    timeout = query.timeout(DEFAULT_TIMEOUT)
    return NWCConfig(pubkey, tuple(relays), secret, lud16, timeout)


# -- talking to the wallet service ------------------------------------------------------------


class _NotSent(Exception):
    """The request reached no relay (or every relay refused it): the wallet cannot have it."""


class _NoAnswer(Exception):
    """The request went out, but no answer came in time: it may or may not have been done."""


class _WalletError(Exception):
    """The wallet answered with a NIP-47 error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _NotOffered(Exception):
    """The wallet connection does not offer the method."""


@dataclass(frozen=True)
class WalletService:
    """What the wallet's info event (kind 13194) announces."""

    methods: frozenset[str]
    encryptions: tuple[str, ...]  # as announced; empty: no tag (NIP-04 only)
    created_at: int

    @property
    def encryption(self) -> Encryption | None:
        """What we use with it: NIP-44 v2 whenever offered, NIP-04 only when it offers nothing
        else; None when it offers neither."""
        if NIP44 in self.encryptions:
            return NIP44
        if not self.encryptions or NIP04 in self.encryptions:
            return NIP04
        return None


@dataclass(frozen=True)
class NWCNodeInfo(NodeInfo):
    """NodeInfo with what an NWC connection tells besides: for `backend check`'s one line."""

    relays_up: int = 0
    relays: int = 0
    encryption: str = ""
    methods: tuple[str, ...] = ()
    balance_msat: int | None = None
    budget_used_msat: int | None = None
    budget_total_msat: int | None = None
    budget_renewal: str | None = None

    def summary(self) -> str:
        parts = [super().summary(), f"relays {self.relays_up}/{self.relays} up"]
        if self.encryption:
            parts.append(self.encryption)
        if self.balance_msat is not None:
            parts.append(f"balance {_sat(self.balance_msat)} sat")
        if self.budget_total_msat is not None:
            used = _sat(self.budget_used_msat or 0)
            renewal = f" ({self.budget_renewal})" if self.budget_renewal else ""
            parts.append(f"budget {used} of {_sat(self.budget_total_msat)} sat used{renewal}")
        if self.methods:
            parts.append(f"offers {' '.join(self.methods)}")
        return ", ".join(parts)


def _sat(msat: int) -> str:
    return f"{msat // 1000:,}" if msat % 1000 == 0 else f"{msat / 1000:,.3f}"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _preimage_for(value: object, payment_hash: bytes) -> bytes | None:
    """The preimage if `value` is the hex of one for `payment_hash`, else None."""
    if not isinstance(value, str) or not is_hex(value.lower(), 64):
        return None
    preimage = bytes.fromhex(value)
    return preimage if hashlib.sha256(preimage).digest() == payment_hash else None


class _Connection:
    """One NWC connection: the relays, the wallet's info event, requests and their answers."""

    def __init__(self, config: NWCConfig) -> None:
        self.config = config
        self.key: PrivateKey = private_key(config.secret)
        self.client_pubkey = public_key_hex(self.key)
        self.pool = RelayPool(config.relays)
        lud16 = f" {config.lud16}" if config.lud16 else ""
        self.where = f"NWC wallet{lud16} via {config.shown_relays}"
        self._service: WalletService | None = None
        self._service_read_at = float("-inf")
        self._service_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        # Per connection (get_info's "methods"), when the wallet says: narrower than the info
        # event's, which speaks for the whole wallet service.
        self.connection_methods: frozenset[str] | None = None
        self._waiters: dict[str, asyncio.Future[Event]] = {}
        self._pending_since: dict[str, int] = {}
        self._answers: Subscription | None = None
        self._conv_key = conversation_key(self.key, config.wallet_pubkey)
        self._secret_pattern = re.compile(re.escape(config.secret.hex()), re.IGNORECASE)

    def scrub(self, text: str) -> str:
        """Never let the secret through, whatever a wallet or relay put into a message."""
        return self._secret_pattern.sub("***", text)

    # -- the info event ---------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._service_lock is None or self._lock_loop is not loop:
            self._service_lock, self._lock_loop = asyncio.Lock(), loop
        return self._service_lock

    async def service(self, timeout: float, *, fresh: bool = False) -> WalletService:
        """The wallet's info event, read at most every INFO_EVENT_CACHE_SECONDS (at once with
        `fresh`); a cached one is used when the relays cannot be read now."""
        async with self._lock():
            age = time.monotonic() - self._service_read_at
            if self._service is not None and age < INFO_EVENT_CACHE_SECONDS and not fresh:
                return self._service
            try:
                service = await self._read_service(timeout)
            except (RelayError, BackendUnavailable) as exc:
                if self._service is None:
                    if isinstance(exc, BackendUnavailable):
                        raise
                    raise BackendUnavailable(self.scrub(f"{self.where}: {exc}")) from None
                log.warning(f"l402: {self.where}: cannot read the wallet's info event: {exc}")
                return self._service
            self._service, self._service_read_at = service, time.monotonic()
            return service

    async def _read_service(self, timeout: float) -> WalletService:
        events = await self.pool.fetch(
            [{"kinds": [KIND_INFO], "authors": [self.config.wallet_pubkey], "limit": 1}], timeout
        )
        mine = [e for e in events if e.kind == KIND_INFO and e.pubkey == self.config.wallet_pubkey]
        if not mine:
            raise BackendUnavailable(
                f"{self.where}: the wallet service has published no info event (kind 13194) "
                "there: is it running, and are these its relays?"
            )
        # The newest; on a tie, the lowest id (NIP-01's rule for replaceable events).
        latest = min(mine, key=lambda e: (-e.created_at, e.id))
        announced = latest.tag("encryption")
        return WalletService(
            methods=frozenset(latest.content.split()),
            encryptions=tuple(announced.split()) if announced is not None else (),
            created_at=latest.created_at,
        )

    def offers(self, service: WalletService, method: str) -> bool:
        methods = self.connection_methods
        return method in (methods if methods is not None else service.methods)

    def offered(self, service: WalletService) -> tuple[str, ...]:
        methods = self.connection_methods
        return tuple(sorted(methods if methods is not None else service.methods))

    # -- requests ---------------------------------------------------------------------------

    def _answer_filters(self) -> list[dict[str, Any]]:
        oldest = min(self._pending_since.values(), default=int(time.time()))
        return [
            {
                "kinds": [KIND_RESPONSE],
                "authors": [self.config.wallet_pubkey],
                "#p": [self.client_pubkey],
                "since": max(oldest - CLOCK_SKEW_SECONDS, 0),
            }
        ]

    def _on_answer(self, _: Relay, event: Event) -> None:
        # Only the wallet's own answers to us count; the relays verified the signature.
        if event.kind != KIND_RESPONSE or event.pubkey != self.config.wallet_pubkey:
            return
        if self.client_pubkey not in event.tag_values("p"):
            return
        for request_id in event.tag_values("e"):
            waiter = self._waiters.get(request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def _subscription(self) -> Subscription:
        # One subscription for every answer, kept for the life of this object: the pool sends
        # it again to each relay that reconnects (with a `since` covering what is awaited).
        if self._answers is None or self._answers.sub_id not in self.pool.subscriptions:
            self._answers = self.pool.subscribe(self._answer_filters, self._on_answer)
        return self._answers

    def _encrypt(self, scheme: Encryption, plaintext: str) -> str:
        if scheme == NIP44:
            return nip44_encrypt(plaintext, self._conv_key)
        return nip04_encrypt(plaintext, self.key, self.config.wallet_pubkey)

    def _decrypt(self, payload: str) -> str:
        # Answers come back in the request's scheme; a NIP-04 payload says so by its "?iv=".
        if "?iv=" in payload:
            return nip04_decrypt(payload, self.key, self.config.wallet_pubkey)
        return nip44_decrypt(payload, self._conv_key)

    async def request(
        self, method: str, params: Mapping[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and return its answer's `result`.

        _NotOffered: the connection lacks the method (nothing sent). _NotSent: no relay took
        the request. _NoAnswer: sent, but no answer in time. _WalletError: the wallet's error
        code. LightningError: an answer that is no NIP-47 answer."""
        limit = self.config.timeout if timeout is None else min(timeout, self.config.timeout)
        deadline = time.monotonic() + limit
        try:
            service = await self.service(limit)
        except BackendUnavailable as exc:
            raise _NotSent(str(exc)) from None
        if not self.offers(service, method):
            raise _NotOffered(method)
        scheme = service.encryption
        if scheme is None:
            raise _NotSent(
                f"{self.where}: the wallet offers only {' '.join(service.encryptions)} "
                "encryption; l402proxy speaks nip44_v2 and nip04"
            )
        content = self._encrypt(scheme, json.dumps({"method": method, "params": dict(params)}))
        now = int(time.time())
        tags = [["p", self.config.wallet_pubkey], ["expiration", str(now + math.ceil(limit))]]
        if scheme == NIP44:
            tags.append(["encryption", NIP44])
        event = sign_event(self.key, KIND_REQUEST, tags, content, now)
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        # Registered before anything is sent: an answer may come back before the relay's OK.
        self._waiters[event.id] = waiter
        self._pending_since[event.id] = now
        try:
            await self._send(event, deadline)
            try:
                answer = await asyncio.wait_for(asyncio.shield(waiter), self._left(deadline))
            except TimeoutError:
                raise _NoAnswer(f"{self.where}: no answer to {method} within {limit:g} s") from None
        finally:
            self._waiters.pop(event.id, None)
            self._pending_since.pop(event.id, None)
            if not waiter.done():
                waiter.cancel()
        try:
            return self._result(method, answer)
        except _WalletError as exc:
            if exc.code in STALE_INFO_CODES:
                # What the wallet offers has changed: its info event is read again next time.
                self._service_read_at = float("-inf")
            raise

    async def _send(self, event: Event, deadline: float) -> None:
        """Hand the request to the relays on which our answers subscription is live; _NotSent
        if none may have taken it. A relay whose connection broke as we sent is waited for
        (nothing went out, so sending again is safe) until the deadline."""
        while True:
            try:
                relays = await self.pool.live(self._subscription(), self._left(deadline))
            except RelayError as exc:
                raise _NotSent(self.scrub(f"{self.where}: {exc}")) from None
            published = await self.pool.publish(event, relays, self._left(deadline))
            if published.maybe_sent:
                return
            if published.refused or deadline - time.monotonic() < RESEND_PAUSE_SECONDS:
                raise _NotSent(self.scrub(f"{self.where}: {published.why_not()}"))
            await asyncio.sleep(RESEND_PAUSE_SECONDS)

    @staticmethod
    def _left(deadline: float) -> float:
        return max(deadline - time.monotonic(), 0.001)

    def _result(self, method: str, answer: Event) -> dict[str, Any]:
        try:
            body = json.loads(self._decrypt(answer.content))
        except NostrError as exc:
            raise LightningError(
                f"{self.where}: cannot read the answer to {method}: {exc}"
            ) from None
        except ValueError:
            raise LightningError(f"{self.where}: the answer to {method} is not JSON") from None
        if not isinstance(body, dict):
            raise LightningError(f"{self.where}: the answer to {method} is not a JSON object")
        error = body.get("error")
        # Some wallets send an empty error object beside a result: no error.
        if error not in (None, {}, ""):
            code = error.get("code") if isinstance(error, dict) else None
            text = error.get("message") if isinstance(error, dict) else error
            code = code.upper() if isinstance(code, str) and code.strip() else "OTHER"
            message = self.scrub(one_line(text if text is not None else "", MAX_WALLET_TEXT))
            raise _WalletError(one_line(code, 40), message)
        # Checked for results only: a wallet refusing a request it could not read (a key it
        # does not know) cannot say which method it was.
        result_type = body.get("result_type")
        if result_type is not None and result_type != method:
            raise LightningError(
                f"{self.where}: the answer to {method} is about {one_line(result_type, 40)}"
            )
        result = body.get("result")
        if not isinstance(result, dict):
            raise LightningError(f"{self.where}: the answer to {method} has no result")
        return result

    def explain(self, error: _WalletError, doing: str) -> str:
        """One line for a wallet's error: what we did, its code, what it means, its words."""
        meaning = CODE_MEANING.get(error.code)
        said = f" ({error.message})" if error.message else ""
        about = f": {meaning}" if meaning else ""
        return self.scrub(f"{self.where}: {doing}: {error.code}{about}{said}")

    # -- what info() reports ----------------------------------------------------------------

    async def node_info(self, *, paying: bool) -> NWCNodeInfo:
        """Reach the relays and the wallet service (bounded by INFO_SECONDS) and say what
        answered. BackendUnavailable for what cannot be reached."""
        deadline = time.monotonic() + min(INFO_SECONDS, self.config.timeout + 5)
        try:
            await self.pool.connected(self._left(deadline))
        except RelayError as exc:
            raise BackendUnavailable(self.scrub(f"{self.where}: {exc}")) from None
        service = await self.service(self._left(deadline), fresh=True)
        if service.encryption is None:
            raise BackendUnavailable(
                f"{self.where}: the wallet offers only {' '.join(service.encryptions)} "
                "encryption; l402proxy speaks nip44_v2 and nip04"
            )
        alias: str | None = None
        network: Network | None = None
        node: str | None = None
        if NIP44 not in service.encryptions:
            log.warning(
                f"l402: {self.where} offers only NIP-04 encryption (deprecated); "
                "update the wallet service for NIP-44"
            )
        got = await self._get_info(service, deadline)
        if got is not None:
            alias = got.get("alias") if isinstance(got.get("alias"), str) else None
            network = _NETWORKS.get(str(got.get("network", "")).lower())
            pubkey = got.get("pubkey")
            node = pubkey if isinstance(pubkey, str) and is_hex(pubkey.lower(), 66) else None
            methods = got.get("methods")
            if isinstance(methods, list) and all(isinstance(m, str) for m in methods):
                self.connection_methods = frozenset(methods)
        else:
            # The info event stays on the relays when the service is gone: ask something to
            # learn that it is up. An unknown payment hash must come back NOT_FOUND.
            await self._alive(service, deadline)
        info = NWCNodeInfo(
            backend="nwc",
            address=self.config.shown_relays,
            alias=one_line(alias, 60) if alias else self.config.lud16,
            network=network,
            pubkey=node.lower() if node else None,
            relays_up=sum(relay.connected for relay in self.pool.relays),
            relays=len(self.pool.urls),
            encryption=service.encryption or "",
            methods=self.offered(service),
        )
        if not paying:
            return info
        return await self._with_money(info, service, deadline)

    async def _get_info(self, service: WalletService, deadline: float) -> dict[str, Any] | None:
        """get_info's answer, or None when the connection may not ask it (then `_alive` checks
        the service is up another way). A connection the wallet does not know is refused."""
        if "get_info" not in service.methods:
            return None
        try:
            return await self._ask("get_info", {}, deadline)
        except _WalletError as exc:
            if exc.code in ("RESTRICTED", "NOT_IMPLEMENTED"):
                return None
            raise BackendUnavailable(self.explain(exc, "asking get_info")) from None

    async def _alive(self, service: WalletService, deadline: float) -> None:
        for method, params in (
            ("lookup_invoice", {"payment_hash": secrets.token_bytes(32).hex()}),
            ("get_balance", {}),
        ):
            if method not in service.methods:
                continue
            try:
                await self._ask(method, params, deadline)
            except _WalletError as exc:
                if exc.code not in ("NOT_FOUND", "NOT_IMPLEMENTED"):
                    raise BackendUnavailable(self.explain(exc, f"asking {method}")) from None
            return
        log.warning(
            f"l402: {self.where} offers neither get_info, lookup_invoice nor get_balance: "
            "whether its wallet service is running cannot be checked"
        )

    async def _ask(self, method: str, params: Mapping[str, Any], deadline: float) -> dict[str, Any]:
        """One request made by info(): every failure but a wallet error is BackendUnavailable."""
        try:
            return await self.request(method, params, self._left(deadline))
        except (_NotSent, _NoAnswer) as exc:
            raise BackendUnavailable(self.scrub(str(exc))) from None
        except _NotOffered:
            raise BackendUnavailable(f"{self.where}: {method} is not offered") from None

    async def _with_money(
        self, info: NWCNodeInfo, service: WalletService, deadline: float
    ) -> NWCNodeInfo:
        """Balance and budget where the connection offers them; a failure here only leaves
        them out (they are for the eye, not for paying)."""

        async def optional(method: str) -> dict[str, Any] | None:
            if not self.offers(service, method):
                return None
            if deadline - time.monotonic() < INFO_OPTIONAL_MIN_SECONDS:
                return None
            try:
                return await self.request(method, {}, self._left(deadline))
            except (_NotSent, _NoAnswer, _NotOffered, _WalletError, LightningError) as exc:
                log.info(f"l402: {self.where}: {method}: {self.scrub(str(exc))}")
                return None

        balance, budget = await asyncio.gather(optional("get_balance"), optional("get_budget"))
        updates: dict[str, Any] = {}
        if balance is not None and (_int(balance.get("balance")) or 0) >= 0:
            updates["balance_msat"] = _int(balance.get("balance"))
        if budget is not None and _int(budget.get("total_budget")) is not None:
            updates["budget_total_msat"] = _int(budget.get("total_budget"))
            updates["budget_used_msat"] = _int(budget.get("used_budget")) or 0
            renewal = budget.get("renewal_period")
            updates["budget_renewal"] = one_line(renewal, 20) if isinstance(renewal, str) else None
        return replace(info, **updates)

    async def close(self) -> None:
        await self.pool.close()


# -- server: invoices -------------------------------------------------------------------------


def _memo(memo: str) -> str:
    """`memo` cut to what a BOLT11 description holds, on a character boundary."""
    data = memo.encode("utf-8")[:MAX_MEMO_BYTES]
    return data.decode("utf-8", errors="ignore")


class NWCInvoiceBackend(InvoiceBackend):
    """The server's invoices from an NWC wallet: make_invoice and lookup_invoice."""

    name = "nwc"

    def __init__(self, config: NWCConfig) -> None:
        self.nwc = _Connection(config)

    async def start(self) -> None:
        await self.info()

    async def info(self) -> NodeInfo:
        nwc = self.nwc
        info = await nwc.node_info(paying=False)
        offered = set(info.methods)
        for method, why in (
            ("make_invoice", "to issue invoices"),
            ("lookup_invoice", "to learn that an invoice was paid (the paywall page's unlock)"),
        ):
            if method not in offered:
                raise BackendUnavailable(
                    f"{nwc.where}: this connection does not offer {method}, which the server "
                    f"needs {why}; it offers: {' '.join(sorted(offered)) or 'nothing'}"
                )
        if nwc.connection_methods is not None and "pay_invoice" in nwc.connection_methods:
            log.warning(
                f"l402: {nwc.where}: this connection may also pay (pay_invoice); the server only "
                "needs make_invoice and lookup_invoice: a receive-only connection is safer"
            )
        return info

    def _unavailable(self, exc: Exception, doing: str) -> BackendUnavailable:
        if isinstance(exc, _NotOffered):
            return BackendUnavailable(f"{self.nwc.where}: {doing}: {exc} is not offered")
        return BackendUnavailable(self.nwc.scrub(str(exc)))

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        if isinstance(amount_sat, bool) or not isinstance(amount_sat, int) or amount_sat < 1:
            raise LightningError(f"amount_sat must be a positive integer, got {amount_sat!r}")
        doing = f"creating a {amount_sat} sat invoice"
        params = {"amount": amount_sat * 1000, "description": _memo(memo), "expiry": int(expiry)}
        try:
            result = await self.nwc.request("make_invoice", params)
        except (_NotSent, _NoAnswer, _NotOffered) as exc:
            raise self._unavailable(exc, doing) from None
        except _WalletError as exc:
            error = LightningError if exc.code == "OTHER" else BackendUnavailable
            raise error(self.nwc.explain(exc, doing)) from None
        bolt11 = result.get("invoice")
        where = f"{self.nwc.where}: {doing}"
        if not isinstance(bolt11, str):
            raise LightningError(f"{where}: no invoice in the answer")
        try:
            decoded = decode_invoice(bolt11)
        except ValueError as exc:
            raise LightningError(f"{where}: {exc}") from None
        # Trust what the invoice says, not the JSON beside it: the server sells what it names.
        stated = result.get("payment_hash")
        if stated is not None and stated != decoded.payment_hash.hex():
            raise LightningError(f"{where}: the payment hash in the answer is not the invoice's")
        if decoded.amount_msat != amount_sat * 1000:
            raise LightningError(
                f"{where}: the invoice asks {decoded.amount_msat} msat, not {amount_sat * 1000}"
            )
        return Invoice(
            bolt11=bolt11,
            payment_hash=decoded.payment_hash,
            amount_msat=decoded.amount_msat,
            expires_at=float(decoded.expires_at),
        )

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        payment_hash = check_hash(payment_hash)
        doing = f"looking up invoice {payment_hash.hex()}"
        try:
            result = await self.nwc.request("lookup_invoice", {"payment_hash": payment_hash.hex()})
        except (_NotSent, _NoAnswer, _NotOffered) as exc:
            raise self._unavailable(exc, doing) from None
        except _WalletError as exc:
            if exc.code == "NOT_FOUND":
                raise InvoiceNotFound(
                    f"{self.nwc.where}: no invoice with payment hash {payment_hash.hex()}"
                ) from None
            raise BackendUnavailable(self.nwc.explain(exc, doing)) from None
        where = f"{self.nwc.where}: {doing}"
        if not _about(result, payment_hash):
            raise LightningError(f"{where}: the answer is about another invoice")
        if result.get("type") == "outgoing":
            # A payment this wallet made, not an invoice it issued.
            raise InvoiceNotFound(
                f"{self.nwc.where}: no invoice with payment hash {payment_hash.hex()}"
            )
        amount = _int(result.get("amount"))
        if amount is None and isinstance(result.get("invoice"), str):
            try:
                amount = decode_invoice(result["invoice"]).amount_msat
            except ValueError:
                amount = None
        if amount is None or amount < 0:
            raise LightningError(f"{where}: no amount in the answer")
        if not _settled(result):
            return InvoiceState(payment_hash, False, None, amount)
        preimage = _preimage_for(result.get("preimage"), payment_hash)
        if preimage is None:
            raise LightningError(f"{where}: settled, but without a matching preimage")
        return InvoiceState(payment_hash, True, preimage, amount)

    async def close(self) -> None:
        await self.nwc.close()

    def describe(self) -> str:
        return f"{self.nwc.where} (app key {self.nwc.client_pubkey[:12]}…, receiving)"


def _about(result: Mapping[str, Any], payment_hash: bytes) -> bool:
    """Whether a lookup's answer is about `payment_hash` (an answer without one is taken as
    the answer to what was asked)."""
    stated = result.get("payment_hash")
    return stated is None or (isinstance(stated, str) and stated.lower() == payment_hash.hex())


def _settled(result: Mapping[str, Any]) -> bool:
    """Settled per NIP-47: `state` says so; wallets from before `state` set `settled_at`."""
    state = result.get("state")
    if isinstance(state, str):
        return state == "settled"
    settled_at = _int(result.get("settled_at"))
    return settled_at is not None and settled_at > 0


# -- client: payments -------------------------------------------------------------------------


class NWCWallet(Wallet):
    """The client's payments from an NWC wallet: pay_invoice, and lookup_invoice after a
    crash. The wallet service gets no fee limit (NIP-47 has none): its own policy and the
    connection's budget bound what a payment may cost beyond the invoice."""

    name = "nwc"

    def __init__(self, config: NWCConfig) -> None:
        self.nwc = _Connection(config)
        # Until a request expires the wallet may still start it, and its node may go on trying
        # for a while after: until then "failed" or "unknown" may not be the end.
        self.settles_within = config.timeout + NODE_ATTEMPT_SECONDS

    @property
    def identity(self) -> str:
        # Stable across restarts and known before connecting: this connection's public key.
        return f"nwc:{self.nwc.client_pubkey}"

    async def start(self) -> None:
        await self.info()

    async def info(self) -> NodeInfo:
        nwc = self.nwc
        info = await nwc.node_info(paying=True)
        if "pay_invoice" not in info.methods:
            raise BackendUnavailable(
                f"{nwc.where}: this connection does not offer pay_invoice; it offers: "
                f"{' '.join(info.methods) or 'nothing'}"
            )
        if "lookup_invoice" not in info.methods:
            log.warning(
                f"l402: {nwc.where}: this connection does not offer lookup_invoice: a payment "
                "whose answer is lost stays pending (never paid twice) until checked by hand"
            )
        return info

    async def balance(self) -> int:
        try:
            result = await self.nwc.request("get_balance", {})
        except (_NotSent, _NoAnswer, _NotOffered) as exc:
            raise BackendUnavailable(
                self.nwc.scrub(f"{self.nwc.where}: get_balance: {exc}")
            ) from None
        except _WalletError as exc:
            raise LightningError(self.nwc.explain(exc, "asking the balance")) from None
        balance = _int(result.get("balance"))
        if balance is None or balance < 0:
            raise LightningError(f"{self.nwc.where}: get_balance: no balance in the answer")
        return balance

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        text, invoice = payable_invoice(bolt11)
        payment_hash = invoice.payment_hash
        doing = f"paying invoice {payment_hash.hex()}"
        where = self.nwc.where
        try:
            result = await self.nwc.request("pay_invoice", {"invoice": text})
        except _NotOffered:
            raise PaymentFailed(
                f"{where}: this connection does not offer pay_invoice; nothing was paid"
            ) from None
        except _NotSent as exc:
            raise NothingSent(f"{exc}; nothing was paid") from None
        except _NoAnswer as exc:
            raise BackendUnavailable(
                f"{exc}; the payment may still go through: it is looked up later"
            ) from None
        except _WalletError as exc:
            return await self._refused(exc, payment_hash, invoice.amount_msat, doing)
        preimage = _preimage_for(result.get("preimage"), payment_hash)
        if preimage is None:
            # Money may have moved: not a failure, a question for lookup later.
            raise LightningError(
                f"{where}: {doing}: the answer holds no preimage for this payment; it is "
                "looked up later"
            )
        fee = max(_int(result.get("fees_paid")) or 0, 0)
        if fee > max_fee_msat:
            log.warning(
                f"l402: {where} paid {fee} msat in fees for {payment_hash.hex()}, more than the "
                f"limit of {max_fee_msat} msat (NIP-47 cannot pass a fee limit to the wallet)"
            )
        return PaymentResult(payment_hash, preimage, invoice.amount_msat, fee)

    async def _refused(
        self, error: _WalletError, payment_hash: bytes, amount_msat: int, doing: str
    ) -> PaymentResult:
        """What a wallet's error to pay_invoice means: refused (nothing paid), failed (asked
        again to be sure), or not known (left to a later lookup)."""
        message = self.nwc.explain(error, doing)
        if error.code in ACCESS_CODES:
            raise ConnectionRefused(f"{message}; nothing was paid", error.code)
        if error.code in REFUSED_CODES:
            raise WalletRefused(f"{message}; nothing was paid", error.code)
        if error.code != "PAYMENT_FAILED":
            # INTERNAL, OTHER, anything else: it may have been sent before the error.
            raise LightningError(f"{message}; the payment is looked up later")
        # "The payment failed" may also mean it timed out on the wallet's side while still
        # in flight: where the wallet can be asked, it is.
        try:
            state = await self.lookup_payment(payment_hash)
        except LookupNotOffered:
            raise WalletRefused(f"{message}; nothing was paid", error.code) from None
        except LightningError as exc:
            raise LightningError(f"{message}; and asking again failed ({exc})") from None
        if state.status == "succeeded" and state.preimage is not None:
            return PaymentResult(payment_hash, state.preimage, amount_msat, state.fee_msat)
        if state.status in ("failed", "unknown"):
            raise WalletRefused(f"{message}; nothing was paid", error.code)
        raise LightningError(f"{message}; but the wallet still shows it pending")

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        payment_hash = check_hash(payment_hash)
        doing = f"looking up payment {payment_hash.hex()}"
        where = f"{self.nwc.where}: {doing}"
        try:
            result = await self.nwc.request("lookup_invoice", {"payment_hash": payment_hash.hex()})
        except _NotOffered:
            raise LookupNotOffered(
                f"{self.nwc.where}: this connection does not offer lookup_invoice: payments "
                "cannot be looked up"
            ) from None
        except (_NotSent, _NoAnswer) as exc:
            raise BackendUnavailable(self.nwc.scrub(str(exc))) from None
        except _WalletError as exc:
            if exc.code == "NOT_FOUND":
                return PaymentState(payment_hash, "unknown", None, 0)
            error = BackendUnavailable if exc.code in ACCESS_CODES else LightningError
            raise error(self.nwc.explain(exc, doing)) from None
        if not _about(result, payment_hash):
            raise LightningError(f"{where}: the answer is about another payment")
        if result.get("type") == "incoming":
            # An invoice this wallet issued: it never paid this hash.
            return PaymentState(payment_hash, "unknown", None, 0)
        fee = max(_int(result.get("fees_paid")) or 0, 0)
        state = result.get("state")
        if _settled(result):
            preimage = _preimage_for(result.get("preimage"), payment_hash)
            if preimage is None:
                raise LightningError(f"{where}: settled, but without a matching preimage")
            return PaymentState(payment_hash, "succeeded", preimage, fee)
        if state == "failed":
            return PaymentState(payment_hash, "failed", None, fee)
        # "pending", or a wallet from before `state` that has not settled it: not over yet.
        return PaymentState(payment_hash, "pending", None, fee)

    async def close(self) -> None:
        await self.nwc.close()

    def describe(self) -> str:
        return (
            f"{self.nwc.where} (app key {self.nwc.client_pubkey[:12]}…, paying; fees: the "
            "wallet's own limits, NIP-47 passes none)"
        )


def backend_from_uri(uri: str) -> NWCInvoiceBackend:
    return NWCInvoiceBackend(parse_uri(uri))


def wallet_from_uri(uri: str) -> NWCWallet:
    return NWCWallet(parse_uri(uri))


__all__ = [
    "ConnectionRefused",
    "LookupNotOffered",
    "NWCConfig",
    "NWCInvoiceBackend",
    "NWCNodeInfo",
    "NWCWallet",
    "WalletRefused",
    "backend_from_uri",
    "parse_uri",
    "wallet_from_uri",
]
