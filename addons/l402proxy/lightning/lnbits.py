"""LNbits over its REST API (checked against LNbits 1.6.2): invoices into one wallet (server,
invoice/read key) and payments from one wallet (client, admin key).

    lnbits://host[:port][/base path]?key=<api key>      https
    lnbits+https://...                                   the same
    lnbits+http://host:port?key=<api key>                plain http (a LAN or localhost LNbits)

`timeout=<seconds>` (default 10) bounds each HTTP request. The key goes in the `X-Api-Key`
header and never into a log line or an error message.
"""

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    NodeInfo,
    NothingSent,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    Wallet,
)
from l402proxy.lightning.common import payable_invoice
from l402proxy.lightning.http import HttpApi
from l402proxy.lightning.uri import parse_query, redact, usable_http_url

log = logging.getLogger(__name__)

HTTP_SCHEME_FOR: Final = {"lnbits": "https", "lnbits+https": "https", "lnbits+http": "http"}
URI_PARAMS: Final = ("key", "timeout")
DEFAULT_TIMEOUT: Final = 10.0
# LNbits' CreateInvoice.memo has max_length=640; a longer memo is a 400, not a shorter memo.
MAX_MEMO_CHARS: Final = 640
# How long pay() keeps asking about a payment LNbits reports pending (its own wait for the
# funding source is 5 s by default) before leaving it to the payer's recovery.
PAY_PENDING_SECONDS: Final = 30.0
PENDING_POLL_FIRST: Final = 0.25
PENDING_POLL_MAX: Final = 2.0
# The one way LNbits 1.6.2 says "no wallet has this key" (decorators.KeyChecker): a 404.
WALLET_NOT_FOUND: Final = "wallet not found"
# Printable ASCII without spaces: an HTTP header value, and nothing that could split it.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
_HASH_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LNbitsConfig:
    """A parsed LNbits URI. `base_url` holds no secret; `key` is the secret."""

    base_url: str
    key: str
    timeout: float

    @property
    def shown_url(self) -> str:
        """`base_url` for messages: a host or path part that looks like a key is not shown."""
        return redact(self.base_url)

    @property
    def key_id(self) -> str:
        """A short, stable name for the key (a sha256 prefix): tells keys apart, reveals nothing."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"LNbitsConfig({self.shown_url!r}, key=***, timeout={self.timeout:g})"


def parse_uri(uri: str) -> LNbitsConfig:
    """Parse and validate an LNbits URI; LightningError (secret-free) when it is unusable."""
    text = uri.strip()
    form = "lnbits://host[:port][/path]?key=<api key> (lnbits+http://... for plain http)"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise LightningError(f"LNbits URI {redact(text)!r}: bad host or port; use {form}") from None
    scheme = HTTP_SCHEME_FOR.get(parts.scheme.lower())
    if scheme is None:
        raise LightningError(f"not an LNbits URI: {redact(text)!r}; use {form}")
    if "@" in parts.netloc:
        raise LightningError(
            f"LNbits URI {redact(text)!r}: the API key goes in ?key=..., not before the host"
        )
    host = parts.hostname
    if not host:
        raise LightningError(f"LNbits URI {redact(text)!r} has no host; use {form}")
    if parts.fragment:
        raise LightningError(f"LNbits URI {redact(text)!r}: unexpected '#' part")
    query = parse_query(text, what="LNbits URI", allowed=URI_PARAMS)
    key = query.get("key") or ""
    if not key:
        raise LightningError(
            f"LNbits URI {redact(text)!r} has no ?key=: give the wallet's invoice/read key "
            "(server) or admin key (client, to pay)"
        )
    if not _KEY_CHARS.fullmatch(key):
        raise LightningError("LNbits URI: the key has spaces or characters an API key never has")
    timeout = query.timeout(DEFAULT_TIMEOUT)
    if port == 0:
        raise LightningError("LNbits URI: bad port 0: use a number from 1 to 65535")
    url_host = f"[{host}]" if ":" in host else host
    netloc = f"{url_host}:{port}" if port is not None else url_host
    base_url = f"{scheme}://{netloc}{parts.path.rstrip('/')}"
    if not usable_http_url(base_url):
        raise LightningError(f"LNbits URI {redact(text)!r}: not a valid host name; use {form}")
    return LNbitsConfig(base_url, key, timeout)


def _detail(response: httpx.Response) -> str:
    """LNbits' error text ({"detail": ...}), or a short excerpt of whatever came back."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        text = detail if isinstance(detail, str) else str(detail)
    else:
        text = " ".join(response.text.split())
    return text[:200] or "(no details)"


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _is_wallet_not_found(response: httpx.Response) -> bool:
    return response.status_code == 404 and _detail(response).strip(" .").lower() == WALLET_NOT_FOUND


def _check_hash(payment_hash: bytes) -> str:
    if not isinstance(payment_hash, bytes | bytearray) or len(payment_hash) != 32:
        raise LightningError("payment_hash must be 32 bytes")
    return bytes(payment_hash).hex()


def _preimage_for(value: Any, payment_hash: bytes) -> bytes | None:
    """The preimage if `value` is one for `payment_hash`, else None."""
    if not isinstance(value, str) or not _HASH_HEX.fullmatch(value.lower()):
        return None
    preimage = bytes.fromhex(value)
    return preimage if hashlib.sha256(preimage).digest() == payment_hash else None


def _int(value: Any) -> int | None:
    # LNbits amounts and fees are msat integers; a bool is never one.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _LNbitsAPI(HttpApi):
    """One LNbits wallet's REST API: the shared HTTP client (http.py, the key in the X-Api-Key
    header and scrubbed from every message) and LNbits' error conventions."""

    def __init__(self, config: LNbitsConfig) -> None:
        super().__init__(
            f"LNbits at {config.shown_url}",
            base_url=config.base_url,
            headers={"X-Api-Key": config.key, "Accept": "application/json"},
            timeout=config.timeout,
            secrets=(config.key,),
            hint=self._plain_http_hint,
        )
        self.config = config

    @property
    def address(self) -> str:
        """Where LNbits is, for messages (requests go to `config.base_url`)."""
        return self.config.shown_url

    def _where(self) -> str:
        return self.where

    def _plain_http_hint(self, what: str) -> str:
        if "WRONG_VERSION_NUMBER" in what and self.base_url.startswith("https:"):
            return "; if this LNbits speaks plain http, use lnbits+http://"
        return ""

    def refused(self, response: httpx.Response, doing: str) -> BackendUnavailable:
        """The key was not accepted (LNbits says so with 401/403, or 404 'Wallet not found')."""
        return BackendUnavailable(
            self.scrub(
                f"{self._where()}: {doing}: the API key was refused "
                f"(HTTP {response.status_code}: {_detail(response)})"
            )
        )

    def bad_answer(self, response: httpx.Response, doing: str) -> LightningError:
        error = BackendUnavailable if response.status_code >= 500 else LightningError
        return error(
            self.scrub(
                f"{self._where()}: {doing}: HTTP {response.status_code}: {_detail(response)}"
            )
        )

    async def wallet(self, doing: str = "reading the wallet") -> dict[str, Any]:
        """GET /api/v1/wallet: {name, balance, id (admin key only)}; checks the key."""
        response = await self.request("GET", "/api/v1/wallet", doing)
        if response.status_code in (401, 403) or _is_wallet_not_found(response):
            raise self.refused(response, doing)
        body = _json_object(response)
        if response.status_code != 200 or body is None or "balance" not in body:
            raise self.bad_answer(response, doing)
        return body

    async def node_info(self) -> NodeInfo:
        body = await self.wallet()
        name = body.get("name")
        return NodeInfo(
            backend="lnbits",
            address=self.address,
            alias=name if isinstance(name, str) and name else None,
            # No LNbits endpoint a wallet key may call names the chain; the invoices' prefix
            # would, but FakeWallet writes "lnbc" whatever it runs on.
            network=None,
        )

    async def payment(self, payment_hash: bytes, doing: str) -> dict[str, Any] | None:
        """GET /api/v1/payments/{hash} for this wallet: LNbits' answer, or None if it has none.

        LNbits 1.6.2 answers this route for any key, even a wrong one (then it searches every
        wallet and leaves out "details"), so an answer counts only with details of this wallet,
        and "not found" only after the key has been checked.
        """
        response = await self.request("GET", f"/api/v1/payments/{_check_hash(payment_hash)}", doing)
        if response.status_code == 404:
            await self.wallet(doing)  # raises if the key is the reason
            return None
        body = _json_object(response)
        if response.status_code != 200 or body is None:
            raise self.bad_answer(response, doing)
        details = body.get("details")
        if not isinstance(details, dict):
            raise BackendUnavailable(
                f"{self._where()}: {doing}: the API key does not belong to the wallet of this "
                "payment (LNbits left out its details)"
            )
        if details.get("payment_hash") != payment_hash.hex():
            raise LightningError(f"{self._where()}: {doing}: the answer is about another payment")
        return body


def _status(body: dict[str, Any]) -> str:
    """LNbits' payment status: "success", "failed" or "pending"."""
    details = body.get("details")
    status = details.get("status") if isinstance(details, dict) else None
    if body.get("paid") is True:
        return "success"
    if status in ("success", "failed", "pending"):
        return str(status)
    return "failed" if body.get("status") == "failed" else "pending"


class LNbitsInvoiceBackend(InvoiceBackend):
    """The server's invoices from one LNbits wallet (its invoice/read key is enough)."""

    name = "lnbits"

    def __init__(self, config: LNbitsConfig) -> None:
        self.api = _LNbitsAPI(config)

    async def start(self) -> None:
        await self.info()

    async def info(self) -> NodeInfo:
        body = await self.api.wallet()
        if "id" in body:
            # Only the admin key makes LNbits show the wallet id: it could also spend.
            log.warning(
                "l402: the LNbits key given to the invoice backend is the wallet's admin key; "
                "its invoice/read key is enough to issue and check invoices"
            )
        return await self.api.node_info()

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        if isinstance(amount_sat, bool) or not isinstance(amount_sat, int) or amount_sat < 1:
            raise LightningError(f"amount_sat must be a positive integer, got {amount_sat!r}")
        doing = f"creating a {amount_sat} sat invoice"
        response = await self.api.request(
            "POST",
            "/api/v1/payments",
            doing,
            # "out" defaults to true in LNbits: always say it.
            json={
                "out": False,
                "amount": amount_sat,
                "unit": "sat",
                "memo": memo[:MAX_MEMO_CHARS],
                "expiry": int(expiry),
            },
        )
        if response.status_code in (401, 403) or _is_wallet_not_found(response):
            raise self.api.refused(response, doing)
        body = _json_object(response)
        if response.status_code not in (200, 201) or body is None:
            raise self.api.bad_answer(response, doing)
        bolt11 = body.get("bolt11") or body.get("payment_request")
        if not isinstance(bolt11, str):
            raise LightningError(f"LNbits at {self.api.address}: {doing}: no invoice in the answer")
        try:
            decoded = decode_invoice(bolt11)
        except ValueError as exc:
            raise LightningError(f"LNbits at {self.api.address}: {doing}: {exc}") from None
        # Trust what the invoice says, not the JSON beside it: the server sells what it names.
        if body.get("payment_hash") != decoded.payment_hash.hex():
            raise LightningError(
                f"LNbits at {self.api.address}: {doing}: the payment hash in the answer is not "
                "the invoice's"
            )
        if decoded.amount_msat != amount_sat * 1000:
            raise LightningError(
                f"LNbits at {self.api.address}: {doing}: the invoice asks "
                f"{decoded.amount_msat} msat, not {amount_sat * 1000}"
            )
        return Invoice(
            bolt11=bolt11,
            payment_hash=decoded.payment_hash,
            amount_msat=decoded.amount_msat,
            expires_at=float(decoded.expires_at),
        )

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        doing = f"looking up invoice {_check_hash(payment_hash)}"
        body = await self.api.payment(payment_hash, doing)
        details = body.get("details") if body is not None else None
        amount = _int(details.get("amount")) if isinstance(details, dict) else None
        if body is None or amount is None or amount <= 0:
            # A negative amount is a payment this wallet made, not an invoice it issued.
            raise InvoiceNotFound(
                f"LNbits at {self.api.address}: no invoice with payment hash "
                f"{payment_hash.hex()} in this wallet"
            )
        settled = _status(body) == "success"
        preimage = None
        if settled:
            # LNbits keeps a preimage for unpaid invoices too; it is read only once paid.
            preimage = _preimage_for(body.get("preimage"), payment_hash)
            if preimage is None:
                raise LightningError(
                    f"LNbits at {self.api.address}: {doing}: paid, but without a matching preimage"
                )
        return InvoiceState(payment_hash, settled, preimage, amount)

    async def close(self) -> None:
        await self.api.close()

    def describe(self) -> str:
        return f"LNbits wallet at {self.api.address} (key {self.api.config.key_id}…, receiving)"


class LNbitsWallet(Wallet):
    """The client's payments from one LNbits wallet (needs the wallet's admin key).

    LNbits takes no fee limit per payment: it lets its funding source spend up to its own fee
    reserve (`GET /api/v1/payments/fee-reserve`, 1 % or at least 2 sat by default, plus any
    service fee). So pay() asks for that reserve first and refuses, before anything is sent, an
    invoice whose reserve exceeds `max_fee_msat`: the payer's budgets then hold whatever happens.
    """

    name = "lnbits"
    # LNbits writes the outgoing payment row (pending) before it calls its funding source and
    # marks it failed only once the funding source said so: its lookup is final at once.
    settles_within = 0.0

    def __init__(
        self, config: LNbitsConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.api = _LNbitsAPI(config)
        self._clock = clock

    @property
    def identity(self) -> str:
        # Stable across restarts and known before connecting: the address and a key digest.
        host = self.api.address.split("://", 1)[1]
        return f"lnbits:{host}/{self.api.config.key_id}"

    async def start(self) -> None:
        await self.info()

    async def info(self) -> NodeInfo:
        body = await self.api.wallet()
        if "id" not in body:
            raise BackendUnavailable(
                f"LNbits at {self.api.address}: this is the wallet's invoice/read key; paying "
                "needs its admin key"
            )
        return await self.api.node_info()

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        text, invoice = payable_invoice(bolt11)
        payment_hash = invoice.payment_hash
        await self._check_fee_reserve(text, max_fee_msat)
        doing = f"paying invoice {payment_hash.hex()}"
        # Not connected: NothingSent. Sent, maybe received: BackendUnavailable, and only a
        # later lookup can tell.
        response = await self.api.request(
            "POST", "/api/v1/payments", doing, json={"out": True, "bolt11": text}, paying=True
        )
        if response.status_code in (401, 403) or _is_wallet_not_found(response):
            # The key was refused before anything happened: like an unreachable node.
            hint = "; paying needs the wallet's admin key" if response.status_code == 403 else ""
            raise NothingSent(f"{self.api.refused(response, doing)}{hint}; nothing was paid")
        body = _json_object(response)
        if response.status_code in (200, 201) and body is not None:
            if body.get("payment_hash") != payment_hash.hex():
                raise LightningError(
                    f"LNbits at {self.api.address}: {doing}: the answer is about another payment"
                )
            status = body.get("status")
            if status == "success":
                preimage = _preimage_for(body.get("preimage"), payment_hash)
                if preimage is not None:
                    return self._result(
                        payment_hash, invoice.amount_msat, body.get("fee"), preimage
                    )
            elif status == "failed":
                raise PaymentFailed(f"LNbits at {self.api.address}: the payment failed")
            return await self._await_outcome(payment_hash, invoice.amount_msat, doing)
        definite = body is not None and (
            (response.status_code == 520 and "status" in body)
            or (response.status_code == 400 and "detail" in body)
        )
        if not definite:
            # A 5xx from LNbits or a proxy in front of it: the payment may still be under way.
            raise self.api.bad_answer(response, doing)
        # LNbits finished the request and said why (PaymentError -> 520, or a 400). It may
        # still have recorded the payment (e.g. "already paid" by this wallet), so ask.
        state = await self.lookup_payment(payment_hash)
        if state.status == "succeeded" and state.preimage is not None:
            return PaymentResult(payment_hash, state.preimage, invoice.amount_msat, state.fee_msat)
        if state.status in ("failed", "unknown"):
            raise PaymentFailed(
                self.api.scrub(
                    f"LNbits at {self.api.address}: the payment failed: {_detail(response)}"
                )
            )
        raise LightningError(
            f"LNbits at {self.api.address}: {doing}: {_detail(response)}; the payment is pending"
        )

    async def _check_fee_reserve(self, bolt11: str, max_fee_msat: int) -> None:
        doing = "asking for the fee reserve"
        try:
            response = await self.api.request(
                "GET", "/api/v1/payments/fee-reserve", doing, params={"invoice": bolt11}
            )
        except BackendUnavailable as exc:
            # Asked before paying: whatever went wrong, nothing was sent.
            raise NothingSent(f"{exc}; nothing was paid") from None
        body = _json_object(response)
        reserve = _int(body.get("fee_reserve")) if body is not None else None
        if response.status_code != 200 or reserve is None:
            raise PaymentFailed(
                f"{self.api.bad_answer(response, doing)}; nothing was paid"
                if response.status_code != 200
                else f"LNbits at {self.api.address}: {doing}: no fee_reserve; nothing was paid"
            )
        if reserve > max_fee_msat:
            raise PaymentFailed(
                f"LNbits at {self.api.address} may spend up to {reserve} msat in fees on this "
                f"payment (its fee reserve), more than the limit of {max_fee_msat} msat; "
                "nothing was paid"
            )

    async def _await_outcome(
        self, payment_hash: bytes, amount_msat: int, doing: str
    ) -> PaymentResult:
        """Ask until LNbits settles or fails a pending payment, within PAY_PENDING_SECONDS."""
        deadline = self._clock() + PAY_PENDING_SECONDS
        interval = PENDING_POLL_FIRST
        while True:
            state = await self.lookup_payment(payment_hash)
            if state.status == "succeeded" and state.preimage is not None:
                return PaymentResult(payment_hash, state.preimage, amount_msat, state.fee_msat)
            if state.status == "failed":
                raise PaymentFailed(f"LNbits at {self.api.address}: the payment failed")
            if self._clock() + interval > deadline:
                raise LightningError(
                    f"LNbits at {self.api.address}: {doing}: still {state.status} after "
                    f"{PAY_PENDING_SECONDS:g} s; it is checked again later"
                )
            await asyncio.sleep(interval)
            interval = min(interval * 2, PENDING_POLL_MAX)

    def _result(
        self, payment_hash: bytes, amount_msat: int, fee: Any, preimage: bytes
    ) -> PaymentResult:
        return PaymentResult(payment_hash, preimage, amount_msat, abs(_int(fee) or 0))

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        doing = f"looking up payment {_check_hash(payment_hash)}"
        body = await self.api.payment(payment_hash, doing)
        details = body.get("details") if body is not None else None
        amount = _int(details.get("amount")) if isinstance(details, dict) else None
        if body is None or not isinstance(details, dict) or amount is None or amount > 0:
            # Nothing for this hash in this wallet, or only an invoice it issued (LNbits lists
            # a wallet's outgoing row first): this wallet never sent a payment for it.
            return PaymentState(payment_hash, "unknown", None, 0)
        # LNbits stores outgoing fees as negative msat (internal payments: zero).
        fee = abs(_int(details.get("fee")) or 0)
        status = _status(body)
        if status == "success":
            preimage = _preimage_for(body.get("preimage"), payment_hash)
            if preimage is None:
                raise LightningError(
                    f"LNbits at {self.api.address}: {doing}: paid, but without a matching preimage"
                )
            return PaymentState(payment_hash, "succeeded", preimage, fee)
        return PaymentState(payment_hash, "failed" if status == "failed" else "pending", None, fee)

    async def close(self) -> None:
        await self.api.close()

    def describe(self) -> str:
        return (
            f"LNbits wallet at {self.api.address} (key {self.api.config.key_id}…, paying; "
            "fee limit enforced through LNbits' fee reserve)"
        )


def backend_from_uri(uri: str) -> LNbitsInvoiceBackend:
    return LNbitsInvoiceBackend(parse_uri(uri))


def wallet_from_uri(uri: str) -> LNbitsWallet:
    return LNbitsWallet(parse_uri(uri))


__all__ = [
    "LNbitsConfig",
    "LNbitsInvoiceBackend",
    "LNbitsWallet",
    "backend_from_uri",
    "parse_uri",
    "wallet_from_uri",
]
