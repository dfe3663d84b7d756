"""A Lightning Address or LNURL-pay link as the server's invoice backend (receive only).

    lnurl:alice@example.com      or just  alice@example.com        (LUD-16)
    lnurl:LNURL1DP68GURN8GHJ7...                                    (LUD-01 bech32)
    lnurl:https://example.com/lnurlp/alice                          (the URL itself)

Invoices come from the service's LUD-06 callback and are checked before use: the amount must be
the one asked for and the description hash must be sha256 of the advertised metadata. Whether
an invoice was paid can be asked only where the service offers LUD-21 `verify`; the server never
needs it, since a token carries the preimage that proves payment.

https is required, as LUD-01 says, except for loopback hosts (127.0.0.0/8, ::1, localhost),
where plain http is allowed so a local test service works.
"""

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    LookupUnsupported,
    NodeInfo,
    Wallet,
)
from l402proxy.lightning.bolt11_encoder import bech32_checksum
from l402proxy.lightning.http import HttpApi
from l402proxy.lightning.uri import (
    SHOWN_SCHEME,
    shown_host,
    shown_hostport,
    shown_path,
    usable_http_url,
)

log = logging.getLogger(__name__)

TIMEOUT: Final = 10.0
# The payRequest (limits, metadata) is fetched again after this long: a 402 storm makes one
# request to the service per invoice, not two.
PAY_REQUEST_CACHE_SECONDS: Final = 60.0
# LUD-06 allows metadata images of ~136 kB; anything far larger is not an LNURL answer.
MAX_RESPONSE_BYTES: Final = 1 << 20
# Invoices whose LUD-21 verify URL is remembered (the oldest are forgotten first).
MAX_VERIFY_URLS: Final = 10_000
MAX_REDIRECTS: Final = 3

# LUD-16: <username>@<domain>; username a-z0-9-_. (and + for tags). A port and a bracketed IPv6
# host are accepted for local services.
_ADDRESS = re.compile(
    r"^(?P<user>[a-z0-9._+-]+)@(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(?P<port>\d{1,5}))?$",
    re.IGNORECASE,
)
_BECH32_CHARSET: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_HEX32 = re.compile(r"[0-9a-fA-F]{64}")


class ServiceError(LightningError):
    """The service answered {"status": "ERROR", "reason": ...}."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LnurlTarget:
    """Where the payRequest lives, and how to name it in logs (no query strings)."""

    url: str
    shown: str
    address: str | None = None  # user@domain, for the Lightning Address form


@dataclass(frozen=True)
class PayRequest:
    """A LUD-06 payRequest, validated."""

    callback: str
    min_sendable: int  # msat
    max_sendable: int  # msat
    metadata: str
    comment_allowed: int
    description: str | None  # the text/plain entry of the metadata

    @property
    def description_hash(self) -> bytes:
        # LUD-06: sha256(utf8ByteArray(unescaped_metadata_string)).
        return hashlib.sha256(self.metadata.encode("utf-8")).digest()


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str) -> str:
    """`url` if it is https, or http to a loopback host; else LightningError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise LightningError(f"{what}: not a valid URL") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if not host:
        raise LightningError(f"{what}: URL without a host")
    if port == 0:
        raise LightningError(f"{what}: bad port 0")
    if not usable_http_url(url):
        raise LightningError(f"{what}: {shown_host(host)!r} is not a valid host name")
    if scheme == "https" or (scheme == "http" and is_loopback(host)):
        return url
    if scheme == "http":
        raise LightningError(
            f"{what}: plain http to {shown_host(host)} (LNURL needs https; http only for "
            "127.0.0.1/localhost)"
        )
    raise LightningError(f"{what}: not an https URL")


def _short(url: str) -> str:
    """A URL for messages: without user info, query and fragment (passwords, one-time tokens),
    and with host or path parts that look like keys replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    scheme = parts.scheme if SHOWN_SCHEME.fullmatch(parts.scheme.lower()) else "***"
    netloc = shown_hostport(parts.netloc.rpartition("@")[2])
    return urlunsplit((scheme, netloc, shown_path(parts.path), "", ""))


def _url_secrets(url: str) -> tuple[str, ...]:
    """What in an LNURL's own URL may be secret (a password, a one-time token in the query):
    scrubbed from messages, which name the target by `LnurlTarget.shown` anyway."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ()
    return tuple(part for part in (parts.password, parts.query) if part)


def decode_lnurl(text: str) -> str:
    """The URL inside a bech32 LNURL (LUD-01); LightningError if it is not a valid one."""
    if text.lower() != text and text.upper() != text:
        raise LightningError("LNURL: mixed upper and lower case is not bech32")
    lowered = text.lower()
    hrp, sep, rest = lowered.rpartition("1")
    if not sep or hrp != "lnurl" or len(rest) < 6:
        raise LightningError("LNURL: not a bech32 'lnurl1...' string")
    if any(char not in _BECH32_CHARSET for char in rest):
        raise LightningError("LNURL: character outside the bech32 alphabet")
    groups = [_BECH32_CHARSET.index(char) for char in rest]
    data, checksum = groups[:-6], groups[-6:]
    if bech32_checksum(hrp, data) != checksum:
        raise LightningError("LNURL: bech32 checksum mismatch (mistyped or truncated?)")
    value = bits = 0
    out = bytearray()
    for group in data:
        value = (value << 5) | group
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((value >> bits) & 0xFF)
    if bits >= 5 or value & ((1 << bits) - 1):
        raise LightningError("LNURL: bad bech32 padding")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise LightningError("LNURL: the decoded bytes are not UTF-8 text") from None


def parse_uri(uri: str) -> LnurlTarget:
    """Parse `lnurl:user@domain`, `user@domain`, `lnurl:LNURL1...`, `lnurl:https://...`."""
    text = uri.strip()
    body = text[len("lnurl:") :] if text.lower().startswith("lnurl:") else text
    body = body.strip()
    if not body:
        raise LightningError(
            "lnurl URI without a target: use lnurl:user@domain, lnurl:LNURL1... or "
            "lnurl:https://..."
        )
    address = _ADDRESS.match(body)
    if address:
        user = address["user"].lower()
        host = address["host"].lower()
        port = address["port"]
        if port is not None and not 0 < int(port) < 65536:
            raise LightningError(f"Lightning Address {body!r}: bad port {port}")
        netloc = f"{host}:{port}" if port else host
        scheme = "http" if is_loopback(host) else "https"
        url = f"{scheme}://{netloc}/.well-known/lnurlp/{user}"
        if not usable_http_url(url):
            raise LightningError(f"Lightning Address {body!r}: not a valid domain name")
        return LnurlTarget(
            url=url,
            shown=f"{user}@{netloc}",
            address=f"{user}@{netloc}",
        )
    if body.lower().startswith("lnurl1"):
        url = decode_lnurl(body)
        check_url(url, "LNURL")
        return LnurlTarget(url=url, shown=f"LNURL {_short(url)}")
    if "://" in body:
        check_url(body, f"LNURL {_short(body)}")
        return LnurlTarget(url=body, shown=f"LNURL {_short(body)}")
    raise LightningError(
        "lnurl URI: expected user@domain (a Lightning Address), LNURL1... or an https URL"
    )


def _description(metadata: str) -> str | None:
    """The text/plain entry of LUD-06 metadata (a JSON array of [type, value] arrays)."""
    try:
        entries = json.loads(metadata)
    except ValueError:
        return None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if (
            isinstance(entry, list)
            and len(entry) >= 2
            and entry[0] == "text/plain"
            and isinstance(entry[1], str)
        ):
            return entry[1]
    return None


def _msat(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sat_text(msat: int) -> str:
    return f"{msat // 1000} sat" if msat % 1000 == 0 else f"{msat} msat"


class LnurlPayBackend(InvoiceBackend):
    """Invoices from an LNURL-pay service (a Lightning Address): receive only."""

    name = "lnurl"

    def __init__(
        self,
        target: LnurlTarget,
        *,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._clock = clock
        self._now = now
        self.api = HttpApi(
            target.shown,
            timeout=timeout,
            headers={"Accept": "application/json"},
            secrets=_url_secrets(target.url),
        )
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._cached: tuple[float, PayRequest] | None = None
        # payment hash -> (LUD-21 verify URL, amount_msat)
        self._verify: OrderedDict[bytes, tuple[str, int]] = OrderedDict()

    # -- HTTP ----------------------------------------------------------------------------------

    def _pay_request_lock(self) -> asyncio.Lock:
        # A lock belongs to its loop, like the HTTP client: a new loop gets a new one.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _get_json(self, url: str, doing: str) -> dict[str, Any]:
        """GET a JSON object. Status codes mean nothing in LNURL (LUD-01): the body decides."""
        chunks: list[bytes] = []
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with self.api.client().stream("GET", url) as response:
                    status = response.status_code
                    location = response.headers.get("location")
                    if response.is_redirect and location:
                        # Each hop is checked before it is followed: never plain http outward.
                        url = check_url(
                            str(response.url.join(location)),
                            f"{self.target.shown}: {doing}: redirected",
                        )
                        continue
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            raise LightningError(
                                f"{self.target.shown}: {doing}: answer larger than "
                                f"{MAX_RESPONSE_BYTES} bytes"
                            )
                        chunks.append(chunk)
                    break
            else:
                raise LightningError(
                    f"{self.target.shown}: {doing}: more than {MAX_REDIRECTS} redirects"
                )
        except httpx.HTTPError as exc:
            raise self.api.unreachable(exc, doing) from None
        except (httpx.InvalidURL, UnicodeError):
            # A redirect or callback httpx cannot use (check_url catches most first).
            raise self.api.not_usable(doing) from None
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            error = BackendUnavailable if status >= 500 else LightningError
            raise error(
                f"{self.target.shown}: {doing}: no JSON object in the answer (HTTP {status})"
            )
        if str(body.get("status", "")).upper() == "ERROR":
            reason = body.get("reason")
            text = " ".join(str(reason).split())[:300] if reason else "no reason given"
            raise ServiceError(f"{self.target.shown}: {doing}: the service says: {text}", text)
        return body

    # -- payRequest ----------------------------------------------------------------------------

    async def pay_request(self, *, fresh: bool = False) -> PayRequest:
        """The service's payRequest (LUD-06 step 3), cached for PAY_REQUEST_CACHE_SECONDS."""
        async with self._pay_request_lock():
            cached = self._cached
            if not fresh and cached is not None and self._clock() < cached[0]:
                return cached[1]
            request = self._parse_pay_request(await self._get_json(self.target.url, "payRequest"))
            self._cached = (self._clock() + PAY_REQUEST_CACHE_SECONDS, request)
            return request

    def _parse_pay_request(self, body: dict[str, Any]) -> PayRequest:
        where = f"{self.target.shown}: payRequest"
        if body.get("tag") != "payRequest":
            raise LightningError(f"{where}: tag is {body.get('tag')!r}, not 'payRequest'")
        callback = body.get("callback")
        if not isinstance(callback, str):
            raise LightningError(f"{where}: no callback URL")
        check_url(callback, f"{where}: callback")
        low, high = _msat(body.get("minSendable")), _msat(body.get("maxSendable"))
        if low is None or high is None or not 1 <= low <= high:
            raise LightningError(
                f"{where}: minSendable/maxSendable must be msat integers with 1 <= min <= max"
            )
        metadata = body.get("metadata")
        if not isinstance(metadata, str):
            raise LightningError(f"{where}: metadata must be a JSON string (LUD-06)")
        comment = _msat(body.get("commentAllowed")) or 0
        return PayRequest(callback, low, high, metadata, max(comment, 0), _description(metadata))

    # -- InvoiceBackend ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.info()

    async def info(self) -> NodeInfo:
        request = await self.pay_request(fresh=True)
        alias = " ".join(request.description.split())[:100] if request.description else None
        return NodeInfo(
            backend="lnurl",
            address=self.target.address or _short(self.target.url),
            alias=alias,
            network=None,  # nothing in LNURL-pay names the chain
            invoice_range_msat=(request.min_sendable, request.max_sendable),
        )

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        """An invoice from the service (LUD-06 steps 4-7); `expiry` is the service's choice."""
        if isinstance(amount_sat, bool) or not isinstance(amount_sat, int) or amount_sat < 1:
            raise LightningError(f"amount_sat must be a positive integer, got {amount_sat!r}")
        amount_msat = amount_sat * 1000
        request = await self.pay_request()
        if not request.min_sendable <= amount_msat <= request.max_sendable:
            raise LightningError(
                f"{self.target.shown} accepts {_sat_text(request.min_sendable)} to "
                f"{_sat_text(request.max_sendable)}; the price {amount_sat} sat is out of range"
            )
        params = [("amount", str(amount_msat))]
        if request.comment_allowed and memo:
            params.append(("comment", memo[: request.comment_allowed]))
        parts = urlsplit(request.callback)
        query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params])
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
        doing = f"invoice for {amount_sat} sat"
        try:
            body = await self._get_json(url, doing)
        except LightningError:
            # Limits or metadata may have changed: read them afresh next time.
            self._cached = None
            raise
        invoice = self._check_invoice(body.get("pr"), amount_msat, request, doing)
        verify = body.get("verify")
        if isinstance(verify, str):
            try:
                self._remember(invoice, check_url(verify, f"{self.target.shown}: verify URL"))
            except LightningError as exc:
                log.warning(f"l402: {exc}; ignoring it")
        return invoice

    def _check_invoice(self, pr: Any, amount_msat: int, request: PayRequest, doing: str) -> Invoice:
        where = f"{self.target.shown}: {doing}"
        if not isinstance(pr, str):
            raise LightningError(f"{where}: no invoice ('pr') in the answer")
        try:
            info = decode_invoice(pr)
            description_hash = info.description_hash
        except ValueError as exc:
            raise LightningError(f"{where}: {exc}") from None
        if info.amount_msat != amount_msat:
            self._cached = None
            shown = "no amount" if info.amount_msat is None else _sat_text(info.amount_msat)
            raise LightningError(
                f"{where}: refused the invoice: it asks {shown}, not {_sat_text(amount_msat)}"
            )
        if description_hash != request.description_hash:
            self._cached = None
            raise LightningError(
                f"{where}: refused the invoice: its description hash is not sha256 of the "
                "payRequest metadata (LUD-06)"
            )
        if info.is_expired(self._now()):
            raise LightningError(f"{where}: refused the invoice: it has already expired")
        return Invoice(
            bolt11=pr.strip(),
            payment_hash=info.payment_hash,
            amount_msat=amount_msat,
            expires_at=float(info.expires_at),
        )

    def _remember(self, invoice: Invoice, verify_url: str) -> None:
        self._verify[invoice.payment_hash] = (verify_url, invoice.amount_msat)
        self._verify.move_to_end(invoice.payment_hash)
        while len(self._verify) > MAX_VERIFY_URLS:
            self._verify.popitem(last=False)

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        """LUD-21 verify, for invoices whose callback offered it (and this process remembers)."""
        if not isinstance(payment_hash, bytes | bytearray) or len(payment_hash) != 32:
            raise LightningError("payment_hash must be 32 bytes")
        payment_hash = bytes(payment_hash)
        known = self._verify.get(payment_hash)
        if known is None:
            raise LookupUnsupported(
                f"a Lightning Address cannot tell whether an invoice was paid; {self.target.shown} "
                f"gave no LUD-21 verify URL for {payment_hash.hex()} (or it was issued before "
                "this process started)"
            )
        verify_url, amount_msat = known
        doing = f"verifying invoice {payment_hash.hex()}"
        try:
            body = await self._get_json(verify_url, doing)
        except ServiceError as exc:
            # LUD-21's own example: {"status": "ERROR", "reason": "Not found"}.
            if "not found" in exc.reason.lower():
                raise InvoiceNotFound(str(exc)) from None
            raise
        where = f"{self.target.shown}: {doing}"
        pr = body.get("pr")
        if isinstance(pr, str):
            try:
                answered = decode_invoice(pr).payment_hash
            except ValueError:
                answered = None
            if answered != payment_hash:
                raise LightningError(f"{where}: the answer is about another invoice")
        settled = body.get("settled")
        if settled is not True:
            if settled is not False:
                raise LightningError(f"{where}: 'settled' is missing or not true/false")
            return InvoiceState(payment_hash, False, None, amount_msat)
        preimage = body.get("preimage")
        if not isinstance(preimage, str) or not _HEX32.fullmatch(preimage):
            raise LightningError(f"{where}: settled, but without a 32-byte hex preimage")
        value = bytes.fromhex(preimage)
        if hashlib.sha256(value).digest() != payment_hash:
            raise LightningError(f"{where}: settled, but the preimage does not match the invoice")
        return InvoiceState(payment_hash, True, value, amount_msat)

    async def close(self) -> None:
        await self.api.close()

    def describe(self) -> str:
        kind = "Lightning Address" if self.target.address else "LNURL-pay"
        return (
            f"{kind} {self.target.shown} (receive only: invoices from its LNURL-pay service, "
            "checked against amount and metadata hash; paid tokens are proven by preimage)"
        )


def backend_from_uri(uri: str) -> LnurlPayBackend:
    return LnurlPayBackend(parse_uri(uri))


def wallet_from_uri(uri: str) -> Wallet:
    parse_uri(uri)  # a broken URI says what is broken first
    raise LightningError(
        "a Lightning Address can only receive; use it as l402_backend (the server's invoices), "
        "not as l402_wallet"
    )


__all__ = [
    "LnurlPayBackend",
    "LnurlTarget",
    "PayRequest",
    "ServiceError",
    "backend_from_uri",
    "check_url",
    "decode_lnurl",
    "parse_uri",
    "wallet_from_uri",
]
