"""Eclair (ACINQ) as invoice backend and wallet, over its HTTP API.

Wire facts this module relies on (ACINQ/eclair, API docs at https://acinq.github.io/eclair):
- every call is a POST with form fields and HTTP basic auth with an empty user and the API
  password; the API listens on 127.0.0.1:8080 by default (eclair.api.port);
- errors are JSON `{"error": "..."}` (api/directives/ErrorResponse.scala): 401 for a wrong
  password (after a 1 s pause, AuthDirective.scala), 404 "Not found" from getreceivedinfo
  (completeOrNotFound), 400 for an IllegalArgumentException (ErrorDirective.scala: e.g.
  "invoice has expired", raised before any payment is attempted), 500 for anything else,
  including an ask timeout while a blocking payment is still in flight;
- every call takes `timeoutSeconds` (default 30, TimeoutDirective.scala);
- /payinvoice with blocking=true answers a PaymentEvent: type "payment-sent" (paymentPreimage,
  recipientAmount, parts[].feesPaid) or "payment-failed", emitted only once every part has
  settled (MultiPartPaymentLifecycle.PaymentAborted waits for pending parts);
- /getsentinfo: a list of attempts, status.type "pending" | "failed" | "sent";
  /getreceivedinfo: status.type "pending" | "expired" | "received" (json/JsonSerializers.scala,
  CustomTypeHints). getreceivedinfo shows paymentPreimage even before payment: it is only
  used here once the status says received.
"""

import hashlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import httpx

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    Network,
    NodeInfo,
    NothingSent,
    PaymentFailed,
    PaymentResult,
    PaymentState,
)
from l402proxy.lightning.common import (
    bad_answer,
    check_hash,
    check_int,
    hex32,
    one_line,
    payable_invoice,
)
from l402proxy.lightning.http import HttpApi
from l402proxy.lightning.uri import (
    looks_like_secret,
    parse_query,
    redact,
    shown_host,
    shown_path,
    usable_http_url,
)

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 8080
DEFAULT_TIMEOUT: Final = 30.0
# Eclair's own time limit for a blocking payment (timeoutSeconds). Below the client's default
# pay timeout (60 s), so Eclair's answer, not ours, ends the wait.
PAY_TIMEOUT: Final = 40
# Eclair keeps paying after the blocking call ended or this process died: between attempts
# (MultiPartPaymentLifecycle back in WAIT_FOR_ROUTES) getsentinfo lists only failed parts,
# and before the first route none at all. Its lifecycle has no deadline of its own, only
# eclair.max-payment-attempts route searches, which take well under PAY_TIMEOUT; the margin
# covers a slow router and a request that reached Eclair late.
SETTLE_MARGIN_SECONDS: Final = 60.0
MAX_MEMO_BYTES: Final = 639
MAX_CERT_BYTES: Final = 1024 * 1024

SCHEMES: Final = {"eclair": "http", "eclair+http": "http", "eclair+https": "https"}
PARAMETERS: Final = ("timeout", "cert")
URI_FORMS: Final = "eclair://:<password>@host:port (eclair+https://... for TLS)"

# getinfo "network" (NodeParams.chainFromHash) -> ours.
NETWORKS: Final[dict[str, Network]] = {
    "mainnet": "mainnet",
    "testnet": "testnet",
    "testnet3": "testnet",
    "testnet4": "testnet",
    "signet": "signet",
    "regtest": "regtest",
}
# Older Eclair only says chainHash (genesis block hash, in Eclair's byte order).
CHAIN_HASHES: Final[dict[str, Network]] = {
    "6fe28c0ab6f1b372c1a6a246ae63f74f931e8365e15a089c68d6190000000000": "mainnet",
    "43497fd7f826957108f4a30fd9cec3aeba79972084e90ead01ea330900000000": "testnet",
    "06226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f": "regtest",
}


@dataclass(frozen=True)
class EclairConfig:
    """What an Eclair URI says. `password` never goes into a message or a log line."""

    base_url: str
    address: str  # host:port, for messages (a host that looks like a key is not shown)
    password: str
    timeout: float = DEFAULT_TIMEOUT
    ca_pem: str | None = None

    @property
    def tls(self) -> bool:
        return self.base_url.startswith("https:")

    @property
    def shown_url(self) -> str:
        """`base_url` for messages: a host or path part that looks like a key is not shown."""
        return redact(self.base_url)

    def __repr__(self) -> str:
        return f"EclairConfig({self.shown_url!r}, timeout={self.timeout:g})"


def parse_uri(uri: str) -> EclairConfig:
    """Read `eclair[+http|+https]://[user]:<password>@host[:port][/prefix][?timeout=&cert=]`.

    Messages name the host but never the password."""
    text = uri.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise LightningError(f"eclair URI: bad host or port; use {URI_FORMS}") from None
    scheme = SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise LightningError(f"not an eclair URI: use {URI_FORMS}")
    host = parts.hostname
    if not host:
        raise LightningError(f"eclair URI without a host: use {URI_FORMS}")
    if parts.fragment:
        raise LightningError(f"eclair URI: unexpected '#' part; use {URI_FORMS}")
    password = unquote(parts.password or "")
    if not password:
        raise LightningError(
            f"eclair URI without the API password (eclair.api.password): use {URI_FORMS}"
        )
    if port is None:
        port = DEFAULT_PORT
    elif port == 0:
        # `port or DEFAULT_PORT` would quietly reach another port than the one written.
        raise LightningError("eclair URI: bad port 0: use a number from 1 to 65535")
    url_host = f"[{host}]" if ":" in host else host
    address = f"{url_host if ':' in host else shown_host(host)}:{port}"
    query = parse_query(text, what="eclair URI", allowed=PARAMETERS)
    timeout = query.timeout(DEFAULT_TIMEOUT)
    ca_pem: str | None = None
    cert = query.get("cert")
    if cert is not None:
        if scheme != "https":
            raise LightningError("eclair URI: cert only makes sense with eclair+https://")
        ca_pem = _read_cert(cert)
    prefix = parts.path.rstrip("/")
    base_url = f"{scheme}://{url_host}:{port}{prefix}"
    if not usable_http_url(base_url):
        raise LightningError(
            f"eclair URI: {shown_host(host)!r} is not a valid host name; use {URI_FORMS}"
        )
    return EclairConfig(
        base_url=base_url,
        address=address,
        password=password,
        timeout=timeout,
        ca_pem=ca_pem,
    )


def _read_cert(path: str) -> str:
    """The PEM file `cert=` names (a self-signed certificate or a private CA)."""
    if not path:
        raise LightningError("eclair URI: cert= needs the path of a PEM file")
    if "\x00" in path:
        raise LightningError("eclair URI: the cert= path contains a NUL character")
    shown = shown_path(path)
    try:
        with Path(path).expanduser().open("rb") as file:
            raw = file.read(MAX_CERT_BYTES + 1)
    except OSError as exc:
        if looks_like_secret(path):
            raise LightningError(
                "eclair URI: cert= looks like certificate text, not a file path; give the path "
                "of the PEM file"
            ) from None
        raise LightningError(
            f"eclair URI: cannot read cert {shown}: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(raw) > MAX_CERT_BYTES or b"-----BEGIN CERTIFICATE-----" not in raw:
        raise LightningError(f"eclair URI: cert {shown} is not a PEM certificate")
    return raw.decode("ascii", errors="replace")


class EclairHttpError(LightningError):
    """Eclair answered with an HTTP error; `error` is its `{"error": ...}` text."""

    def __init__(self, message: str, status: int, error: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


def _amount(value: object, where: str, endpoint: str, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise bad_answer(where, endpoint, f"{what} is not an amount")


def _status_type(item: object) -> object:
    status = item.get("status") if isinstance(item, dict) else None
    return status.get("type") if isinstance(status, dict) else None


class EclairNode:
    """An Eclair node through its HTTP API: issues invoices and pays them."""

    name = "eclair"

    def __init__(self, config: EclairConfig, *, pay_timeout: int = PAY_TIMEOUT) -> None:
        self.config = config
        self.pay_timeout = pay_timeout
        # Until then an empty or all-failed getsentinfo may be a gap between attempts.
        self.settles_within = pay_timeout + SETTLE_MARGIN_SECONDS
        verify: ssl.SSLContext | bool = True
        if config.ca_pem is not None:
            verify = ssl.create_default_context(cadata=config.ca_pem)
        self.api = HttpApi(
            self.where,
            base_url=config.base_url,
            auth=httpx.BasicAuth("", config.password),
            timeout=config.timeout,
            verify=verify,
            secrets=(config.password,),
            hint=_hint,
        )

    @property
    def where(self) -> str:
        return f"eclair {self.config.address}"

    @property
    def identity(self) -> str:
        return f"eclair:{self.config.address}"

    def describe(self) -> str:
        tls = "HTTPS" if self.config.tls else "HTTP"
        return f"Eclair at {self.config.shown_url} ({tls} API, password not shown)"

    async def close(self) -> None:
        await self.api.close()

    async def _post(
        self,
        endpoint: str,
        form: dict[str, str],
        *,
        timeout: float | None = None,
        paying: bool = False,
    ) -> Any:
        """The JSON answer of one call; typed errors that never show the password."""
        response = await self.api.request(
            "POST", f"/{endpoint}", endpoint, data=form, timeout=timeout, paying=paying
        )
        if response.status_code == 401:
            # Refused before Eclair looked at the request: for a payment, nothing was sent.
            refused = NothingSent if paying else BackendUnavailable
            raise refused(f"{self.where}: authentication failed (HTTP 401): wrong API password")
        if response.status_code != 200:
            error = _error_text(response)
            raise EclairHttpError(
                self.api.scrub(
                    f"{self.where}: {endpoint} failed: HTTP {response.status_code}: {error}"
                ),
                response.status_code,
                error,
            )
        try:
            return response.json()
        except ValueError:
            # Never echo the body: it may hold a preimage.
            raise bad_answer(self.where, endpoint, "not JSON") from None

    async def info(self) -> NodeInfo:
        answer = await self._post("getinfo", {})
        if not isinstance(answer, dict):
            raise bad_answer(self.where, "getinfo", "not a JSON object")
        node_id = answer.get("nodeId")
        if not (isinstance(node_id, str) and len(node_id) == 66):
            raise bad_answer(self.where, "getinfo", "no nodeId")
        try:
            bytes.fromhex(node_id)
        except ValueError:
            raise bad_answer(self.where, "getinfo", "nodeId is not hex") from None
        network = answer.get("network")
        chain = answer.get("chainHash")
        found: Network | None = None
        if isinstance(network, str):
            found = NETWORKS.get(network)
        elif isinstance(chain, str):
            found = CHAIN_HASHES.get(chain.lower())
        alias = answer.get("alias")
        return NodeInfo(
            backend="eclair",
            address=self.config.shown_url,
            alias=alias if isinstance(alias, str) and alias else None,
            network=found,
            pubkey=node_id.lower(),
        )

    # -- server side ---------------------------------------------------------------------

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        check_int(amount_sat, "amount_sat", 1)
        check_int(expiry, "expiry", 1)
        if not isinstance(memo, str):
            raise LightningError("memo must be a string")
        if len(memo.encode()) > MAX_MEMO_BYTES:
            raise LightningError(f"memo is longer than {MAX_MEMO_BYTES} bytes (UTF-8)")
        amount_msat = amount_sat * 1000
        answer = await self._post(
            "createinvoice",
            {"description": memo, "amountMsat": str(amount_msat), "expireIn": str(expiry)},
        )
        if not isinstance(answer, dict):
            raise bad_answer(self.where, "createinvoice", "not a JSON object")
        bolt11 = answer.get("serialized")
        if not isinstance(bolt11, str):
            raise bad_answer(self.where, "createinvoice", "no serialized invoice")
        payment_hash = hex32(answer.get("paymentHash"), self.where, "createinvoice", "paymentHash")
        try:
            decoded = decode_invoice(bolt11)
        except ValueError:
            raise bad_answer(self.where, "createinvoice", "the invoice does not decode") from None
        if decoded.payment_hash != payment_hash or decoded.amount_msat != amount_msat:
            raise bad_answer(
                self.where, "createinvoice", "the invoice does not match what was asked"
            )
        return Invoice(
            bolt11=bolt11,
            payment_hash=payment_hash,
            amount_msat=amount_msat,
            expires_at=float(decoded.expires_at),
        )

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        payment_hash = check_hash(payment_hash)
        try:
            answer = await self._post("getreceivedinfo", {"paymentHash": payment_hash.hex()})
        except EclairHttpError as exc:
            if exc.status == 404:
                raise InvoiceNotFound(
                    f"{self.where}: no invoice with payment hash {payment_hash.hex()}"
                ) from None
            raise
        if not isinstance(answer, dict):
            raise bad_answer(self.where, "getreceivedinfo", "not a JSON object")
        kind = _status_type(answer)
        if kind == "received":
            preimage = hex32(
                answer.get("paymentPreimage"), self.where, "getreceivedinfo", "paymentPreimage"
            )
            if hashlib.sha256(preimage).digest() != payment_hash:
                raise bad_answer(
                    self.where, "getreceivedinfo", "the preimage does not match the hash"
                )
            received = answer["status"].get("amount")
            return InvoiceState(
                payment_hash=payment_hash,
                settled=True,
                preimage=preimage,
                amount_msat=_amount(received, self.where, "getreceivedinfo", "status.amount"),
            )
        if kind in ("pending", "expired"):
            # Eclair shows the preimage of an unpaid invoice too: it must not leave here.
            invoice = answer.get("invoice", answer.get("paymentRequest"))
            amount = invoice.get("amount") if isinstance(invoice, dict) else None
            return InvoiceState(
                payment_hash=payment_hash,
                settled=False,
                preimage=None,
                amount_msat=0
                if amount is None
                else _amount(amount, self.where, "getreceivedinfo", "invoice amount"),
            )
        raise bad_answer(self.where, "getreceivedinfo", f"unknown status {one_line(kind)!r}")

    # -- client side ---------------------------------------------------------------------

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        """A blocking /payinvoice; PaymentFailed only when Eclair says nothing is in flight."""
        check_int(max_fee_msat, "max_fee_msat", 0)
        text, decoded = payable_invoice(bolt11)
        form = {
            "invoice": text,
            "blocking": "true",
            # Eclair accepts a route whose fee is below max(maxFeeFlatSat, maxFeePct of the
            # amount): the flat part, rounded down to whole sat, is the whole limit.
            "maxFeeFlatSat": str(max_fee_msat // 1000),
            "maxFeePct": "0",
            "timeoutSeconds": str(self.pay_timeout),
        }
        try:
            answer = await self._post(
                "payinvoice", form, timeout=self.pay_timeout + self.config.timeout, paying=True
            )
        except EclairHttpError as exc:
            if exc.status == 400:
                # An IllegalArgumentException: the request was refused before any attempt.
                raise PaymentFailed(f"{self.where}: payment refused: {exc.error}") from None
            raise LightningError(f"{exc}; the payment may still complete") from None
        if not isinstance(answer, dict):
            raise LightningError(
                f"{self.where}: payinvoice did not answer a payment event; the payment may "
                "still complete"
            )
        kind = answer.get("type")
        if kind == "payment-failed":
            raise PaymentFailed(f"{self.where}: payment failed: {_failure_summary(answer)}")
        if kind not in ("payment-sent", None) or "paymentPreimage" not in answer:
            raise LightningError(
                f"{self.where}: payinvoice answered {one_line(kind)!r}; the payment may still "
                "complete"
            )
        preimage = hex32(answer.get("paymentPreimage"), self.where, "payinvoice", "paymentPreimage")
        if hashlib.sha256(preimage).digest() != decoded.payment_hash:
            raise bad_answer(self.where, "payinvoice", "the preimage does not match the invoice")
        amount = answer.get("recipientAmount", decoded.amount_msat)
        return PaymentResult(
            payment_hash=decoded.payment_hash,
            preimage=preimage,
            amount_msat=_amount(amount, self.where, "payinvoice", "recipientAmount"),
            fee_msat=_fees(answer, self.where),
        )

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        """From /getsentinfo: "unknown" only when Eclair lists no attempt for the hash.

        Within `settles_within` of the pay call "unknown" and "failed" may still turn into a
        payment (see SETTLE_MARGIN_SECONDS)."""
        payment_hash = check_hash(payment_hash)
        answer = await self._post("getsentinfo", {"paymentHash": payment_hash.hex()})
        if not isinstance(answer, list):
            raise bad_answer(self.where, "getsentinfo", "not a list of attempts")
        if not answer:
            return PaymentState(payment_hash, "unknown", None, 0)
        kinds = [_status_type(item) for item in answer]
        if "sent" in kinds:
            done = answer[kinds.index("sent")]
            preimage = hex32(
                done["status"].get("paymentPreimage"), self.where, "getsentinfo", "paymentPreimage"
            )
            if hashlib.sha256(preimage).digest() != payment_hash:
                raise bad_answer(self.where, "getsentinfo", "the preimage does not match the hash")
            # A multi-part payment lists each part, each with its own fee.
            parent = done.get("parentId")
            fee = 0
            for item, kind in zip(answer, kinds, strict=True):
                if kind == "sent" and item.get("parentId") == parent:
                    fees = item["status"].get("feesPaid", 0)
                    fee += _amount(fees, self.where, "getsentinfo", "feesPaid")
            return PaymentState(payment_hash, "succeeded", preimage, fee)
        if "pending" in kinds:
            return PaymentState(payment_hash, "pending", None, 0)
        if all(kind == "failed" for kind in kinds):
            return PaymentState(payment_hash, "failed", None, 0)
        unknown = next(k for k in kinds if k not in ("sent", "pending", "failed"))
        raise bad_answer(self.where, "getsentinfo", f"unknown status {one_line(unknown)!r}")


def _hint(what: str) -> str:
    if what == "connection refused":
        return " (is Eclair running with eclair.api.enabled=true?)"
    return ""


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "no JSON error"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return one_line(body["error"])
    return "no JSON error"


def _failure_summary(answer: dict[str, Any]) -> str:
    failures = answer.get("failures")
    if not isinstance(failures, list) or not failures:
        return "no attempt succeeded"
    last = failures[-1]
    reason = None
    if isinstance(last, dict):
        for key in ("t", "failureMessage", "message"):
            if isinstance(last.get(key), str):
                reason = last[key]
                break
    attempts = f"{len(failures)} attempt{'s' if len(failures) != 1 else ''}"
    return f"{one_line(reason)} ({attempts})" if reason else f"{attempts} failed"


def _fees(answer: dict[str, Any], where: str) -> int:
    parts = answer.get("parts")
    if isinstance(parts, list) and parts:
        total = 0
        for part in parts:
            fees = part.get("feesPaid", 0) if isinstance(part, dict) else None
            total += _amount(fees, where, "payinvoice", "parts[].feesPaid")
        return total
    fees = answer.get("feesPaid", 0)
    return _amount(fees, where, "payinvoice", "feesPaid")


def backend_from_uri(uri: str) -> EclairNode:
    return EclairNode(parse_uri(uri))


def wallet_from_uri(uri: str) -> EclairNode:
    return EclairNode(parse_uri(uri))


__all__ = [
    "EclairConfig",
    "EclairHttpError",
    "EclairNode",
    "backend_from_uri",
    "parse_uri",
    "wallet_from_uri",
]
