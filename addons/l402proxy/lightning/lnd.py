"""LND over gRPC: the server's invoice backend and the client's wallet.

`lnd://host:port?cert=<tls.cert path>&macaroon=<.macaroon path>` or the lndconnect form Zeus and
Zap use, `lndconnect://host:port?cert=<base64url DER>&macaroon=<base64url>`. Both talk to LND's
own gRPC services (lnrpc.Lightning, routerrpc.Router) through the stubs lnd-grpc-client ships,
on one long-lived grpc.aio channel per node object: TLS pinned to the node's tls.cert (or the
system roots when no cert is given) plus the macaroon as `macaroon: <hex>` call metadata, the
way lncli sends it.

LND answers a bad macaroon with gRPC code UNKNOWN and a plain message (rpcperms/interceptor.go
returns the macaroon service's error unwrapped), so authentication failures are recognised by
their text; see `_classify`.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

# Before grpc (and lndgrpc, which imports it) loads: see grpc_logging.
from l402proxy.lightning import grpc_logging  # noqa: F401

# isort: split
import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from lndgrpc.compiled import lightning_pb2, lightning_pb2_grpc, router_pb2, router_pb2_grpc

from l402proxy.lightning.base import (
    BackendUnavailable,
    Invoice,
    InvoiceBackend,
    InvoiceNotFound,
    InvoiceState,
    LightningError,
    Network,
    NodeInfo,
    NothingSent,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    Wallet,
)
from l402proxy.lightning.common import one_line, payable_invoice
from l402proxy.lightning.uri import (
    SHOWN_SCHEME,
    looks_like_secret,
    parse_query,
    shown_host,
    shown_path,
    shown_value,
)

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 10009
DEFAULT_TIMEOUT_SECONDS: Final = 10.0
# How long LND keeps trying routes (SendPaymentRequest.timeout_seconds). Below the client
# payer's own 60 s limit, so a payment that finds no route ends with a definite FAILED.
PAYMENT_TIMEOUT_SECONDS: Final = 45
# Extra time for the in-flight HTLCs LND waits for after it stops trying new routes.
PAYMENT_STREAM_MARGIN_SECONDS: Final = 30.0
# A payment stream carries a handful of updates; this only stops a misbehaving server.
MAX_STREAM_UPDATES: Final = 10_000
PARAMETERS: Final = ("cert", "macaroon", "timeout")
# What paying needs (routerrpc macPermissions): (method, entity, action, what it is for).
# Checked by info(), so a read-only macaroon stops the client at start, not at every 402.
PAY_PERMISSIONS: Final = (
    ("/routerrpc.Router/SendPaymentV2", "offchain", "write", "pay (SendPaymentV2)"),
    (
        "/routerrpc.Router/TrackPaymentV2",
        "offchain",
        "read",
        "look up payments (TrackPaymentV2)",
    ),
)

# LND's chains[0].network (lncfg.NormalizeNetwork folds testnet3 into "testnet").
_NETWORKS: Final[dict[str, Network | None]] = {
    "mainnet": "mainnet",
    "testnet": "testnet",
    "testnet3": "testnet",
    "testnet4": "testnet",  # BOLT11 "lntb", like testnet3
    "signet": "signet",
    "regtest": "regtest",
    # btcd's private simulation net: its invoices ("lnsb") match none of ours, so claiming
    # regtest would only make the client refuse invoices for the wrong reason.
    "simnet": None,
}

_PAYMENT = lightning_pb2.Payment
_SUCCEEDED: Final = _PAYMENT.SUCCEEDED
_FAILED: Final = _PAYMENT.FAILED
# INITIATED (4) is newer than these stubs (lnd PR 7175); protobuf enums are open, so it
# arrives as the bare number.
_STILL_GOING: Final = frozenset({_PAYMENT.IN_FLIGHT, 4})
# Failures that stop a call before LND's handler runs: nothing can have been sent.
_NEVER_REACHED_LND: Final = frozenset(
    {"refused", "tls", "dns", "auth", "permission", "locked", "starting"}
)


@dataclass(frozen=True)
class LndTarget:
    """One node, as a URI names it: where, how to trust it, and the macaroon to present."""

    scheme: str
    host: str
    port: int
    cert_pem: bytes | None
    cert_source: str  # the cert file path, "inline" (lndconnect), or "system CA roots"
    macaroon: bytes = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    # A name the pinned cert lists, when it does not list `host` (see _name_override).
    name_override: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def shown_address(self) -> str:
        """`address` for messages: a host that looks like a key is not shown."""
        host = f"[{self.host}]" if ":" in self.host else shown_host(self.host)
        return f"{host}:{self.port}"

    def __repr__(self) -> str:
        return (
            f"LndTarget({self.scheme}://{self.shown_address}, cert {self.cert_source}, "
            f"macaroon ***, timeout {self.timeout:g})"
        )


# -- URI parsing ---------------------------------------------------------------------------------


def parse_uri(uri: str) -> LndTarget:
    """Parse and check an lnd:// or lndconnect:// URI, reading the files it names.

    LightningError names the parameter at fault; it never contains the macaroon."""
    text = uri.strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        # urlsplit's message may quote the host: never shown, it may be a macaroon.
        raise LightningError("LND URI: cannot parse it (a bad host in [brackets]?)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("lnd", "lndconnect"):
        shown = repr(scheme) if SHOWN_SCHEME.fullmatch(scheme) else "something else"
        raise LightningError(f"LND URI: scheme must be lnd:// or lndconnect://, not {shown}")
    what = f"{scheme} URI"
    host, port = _host_port(parts.netloc, what)
    if parts.path not in ("", "/"):
        raise LightningError(
            f"{what}: unexpected path {shown_path(parts.path)!r} after host:port (the cert "
            "and macaroon go in ?cert=...&macaroon=...)"
        )
    if parts.fragment:
        raise LightningError(f"{what}: unexpected '#' part")
    query = parse_query(text, what=what, allowed=PARAMETERS)
    timeout = query.timeout(DEFAULT_TIMEOUT_SECONDS)
    given = query.get("macaroon")
    if not given:
        form = "a .macaroon file path" if scheme == "lnd" else "the base64url macaroon"
        raise LightningError(f"{what}: parameter 'macaroon' is missing ({form})")
    if scheme == "lnd":
        macaroon = _macaroon_file(given, what)
        cert_pem, source = _cert_file(query.get("cert"), what)
    else:
        macaroon = _inline_macaroon(given, what)
        cert_pem, source = _cert_inline(query.get("cert"), what)
    override = _name_override(cert_pem, host) if cert_pem is not None else None
    return LndTarget(scheme, host, port, cert_pem, source, macaroon, timeout, override)


def _host_port(netloc: str, what: str) -> tuple[str, int]:
    if not netloc:
        raise LightningError(f"{what}: no host (use {what.split()[0]}://host:port?...)")
    if "@" in netloc:
        raise LightningError(f"{what}: user or password in the host part is not supported")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise LightningError(f"{what}: unclosed '[' in the IPv6 host")
        host, rest = netloc[1:end], netloc[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise LightningError(
                f"{what}: {shown_host(host)!r} in brackets is not an IPv6 address"
            ) from None
        if rest and not rest.startswith(":"):
            raise LightningError(f"{what}: unexpected text after the IPv6 host")
        raw_port = rest[1:] if rest else None
    else:
        host, sep, raw = netloc.rpartition(":")
        if not sep:
            host, raw = netloc, ""
        if ":" in host:
            looks_ipv6 = all(c in "0123456789abcdefABCDEF:." for c in netloc)
            if looks_ipv6 and not looks_like_secret(netloc):
                example = f"[{netloc}]:port"
            else:
                example = "[host]:port"
            raise LightningError(f"{what}: put an IPv6 host in brackets: {example}")
        raw_port = raw if sep else None
    if not host:
        raise LightningError(f"{what}: no host before the port")
    if raw_port is None:
        return host.lower(), DEFAULT_PORT
    if not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
        # A long "port" is more likely a macaroon pasted after the colon: not shown.
        raise LightningError(
            f"{what}: bad port {shown_value(raw_port)}: use a number from 1 to 65535"
        )
    return host.lower(), int(raw_port)


# What a value given inline (lndconnect's form) instead of a file path is, and where it goes.
_INLINE_FORMS: Final = {
    "macaroon": "an inline macaroon (hex or base64)",
    "cert": "an inline certificate (base64 DER or PEM text)",
}


def _read(path_text: str, name: str, what: str) -> tuple[bytes, str]:
    if "\x00" in path_text:
        raise LightningError(f"{what}: the {name} file path contains a NUL character")
    path = Path(path_text).expanduser()
    try:
        return path.read_bytes(), shown_path(str(path))
    except OSError as exc:
        if looks_like_secret(path_text):
            # Not a file, and shaped like the secret itself: never echoed.
            raise LightningError(
                f"{what}: parameter {name!r} looks like {_INLINE_FORMS[name]}, not a file "
                f"path; lnd:// takes the path of the file LND writes, lndconnect://host:port"
                f"?cert=<base64url DER>&macaroon=<base64url> takes them inline"
            ) from None
        reason = exc.strerror or type(exc).__name__
        raise LightningError(
            f"{what}: cannot read the {name} file {shown_path(str(path))}: {reason}"
        ) from None


def _macaroon_file(path_text: str, what: str) -> bytes:
    data, path = _read(path_text, "macaroon", what)
    return _check_macaroon(data, what, f" in {path}")


def _check_macaroon(data: bytes, what: str, where: str) -> bytes:
    """The macaroon if it looks like the binary V2 macaroon LND writes and checks."""
    if not data:
        raise LightningError(f"{what}: the macaroon{where} is empty")
    stripped = data.strip()
    if stripped and all(c in b"0123456789abcdefABCDEF" for c in stripped):
        raise LightningError(
            f"{what}: the macaroon{where} is hex text; give the binary .macaroon file LND "
            "writes (admin.macaroon or invoice.macaroon)"
        )
    # LND accepts only version 2 macaroons (macaroons/service.go), whose binary form starts 0x02.
    if data[0] != 0x02:
        raise LightningError(
            f"{what}: the macaroon{where} is not a binary LND macaroon (version 2)"
        )
    return data


def _inline_macaroon(value: str, what: str) -> bytes:
    text = value.strip()
    # Some generators put the hex form (as in LND's REST header) where lndconnect wants
    # base64url; base64url of a V2 macaroon starts "Ag", which is not hex, so no confusion.
    if len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text):
        return _check_macaroon(bytes.fromhex(text), what, "")
    return _check_macaroon(_b64url(text, "macaroon", what), what, "")


def _b64url(value: str, name: str, what: str) -> bytes:
    # lndconnect uses base64url without padding; tolerate standard base64 and padding too.
    text = "".join(value.split()).replace("+", "-").replace("/", "_").rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise LightningError(f"{what}: parameter {name!r} is not valid base64url") from None


def _cert_file(path_text: str | None, what: str) -> tuple[bytes | None, str]:
    if path_text is None:
        return None, "system CA roots"
    if not path_text:
        raise LightningError(f"{what}: parameter 'cert' is empty (path to the node's tls.cert)")
    data, path = _read(path_text, "cert", what)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError:
            raise LightningError(f"{what}: the cert file {path} is not a certificate") from None
    return cert.public_bytes(Encoding.PEM), path


def _cert_inline(value: str | None, what: str) -> tuple[bytes | None, str]:
    if value is None:
        return None, "system CA roots"
    der = _b64url(value, "cert", what)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise LightningError(
            f"{what}: parameter 'cert' is not a base64url DER certificate"
        ) from None
    return cert.public_bytes(Encoding.PEM), "inline"


def _name_override(cert_pem: bytes, host: str) -> str | None:
    """A name from the pinned cert to verify it against, when it does not name `host`.

    LND's self-signed tls.cert names "localhost", the machine's hostname and its own IPs;
    reached through another address (Docker, a VPN, port forwarding) the hostname check
    fails although the pinned cert is exactly the one the node presents. Trust comes from
    pinning, so checking a name the cert does list keeps it as safe. A cert without names
    (a CA root, say) is left to the normal check."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = [name.lower() for name in names.get_values_for_type(x509.DNSName)]
    ips = names.get_values_for_type(x509.IPAddress)
    try:
        if ipaddress.ip_address(host) in ips:
            return None
    except ValueError:
        if host in dns or any(
            name.startswith("*.") and host.partition(".")[2] == name[2:] for name in dns
        ):
            return None
    if "localhost" in dns:
        return "localhost"
    plain = [name for name in dns if not name.startswith("*.")]
    if plain:
        return plain[0]
    return str(ips[0]) if ips else None


# -- the connection ------------------------------------------------------------------------------


class _MacaroonMetadata(grpc.AuthMetadataPlugin):
    """Adds `macaroon: <hex>` to every call, as lncli does."""

    def __init__(self, macaroon: bytes) -> None:
        self._metadata = (("macaroon", macaroon.hex()),)

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        callback(self._metadata, None)

    def __repr__(self) -> str:
        return "_MacaroonMetadata(***)"


def _classify(exc: grpc.aio.AioRpcError) -> str:
    """What went wrong, from a gRPC error: the code, and for LND's UNKNOWNs, the text."""
    code = exc.code()
    details = (exc.details() or "").lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if code == grpc.StatusCode.UNAVAILABLE:
        if "connection refused" in details:
            return "refused"
        if any(
            marker in details
            for marker in ("handshake", "certificate", "ssl", "tls", "hostname verification")
        ):
            return "tls"
        if "resolv" in details or "domain name not found" in details:
            return "dns"
        return "unreachable"
    if code == grpc.StatusCode.NOT_FOUND:
        return "not_found"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return "already_exists"
    if "permission denied" in details or code == grpc.StatusCode.PERMISSION_DENIED:
        return "permission"
    if (
        code == grpc.StatusCode.UNAUTHENTICATED
        or "macaroon" in details  # "expected 1 macaroon, got 0", "cannot get macaroon: ..."
        or "verification failed" in details  # signature mismatch: not this node's macaroon
        or details.startswith(("invalid id", "encoding/hex"))
    ):
        return "auth"
    if "wallet locked" in details or "wallet not created" in details:
        return "locked"
    if "waiting to start" in details or "in the process of starting up" in details:
        return "starting"
    if code == grpc.StatusCode.UNKNOWN and details.startswith("invoice expired"):
        # routerrpc ValidatePayReqExpiry, "invoice expired. Valid until ...": refused while
        # reading the request, before any payment exists.
        return "expired"
    return "other"


class LndNode:
    """One LND node: its URI facts and one lazily opened gRPC channel, shared by every call."""

    def __init__(self, target: LndTarget) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lightning: lightning_pb2_grpc.LightningStub | None = None
        self._router: router_pb2_grpc.RouterStub | None = None
        self._told_override = False

    @property
    def address(self) -> str:
        """Where the node is, for messages (the channel dials `target.address`)."""
        return self.target.shown_address

    @property
    def where(self) -> str:
        return f"lnd at {self.address}"

    def describe(self) -> str:
        return f"LND at {self.address} (cert {self.target.cert_source})"

    def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is loop:
            return
        # A channel belongs to the loop it was made in; a new loop (a CLI's second
        # asyncio.run) gets a new channel, and the old one goes with its closed loop.
        target = self.target
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=target.cert_pem),
            grpc.metadata_call_credentials(_MacaroonMetadata(target.macaroon)),
        )
        options: list[tuple[str, Any]] = [
            # A restarted node is found again within seconds, not after minutes of backoff.
            ("grpc.max_reconnect_backoff_ms", 5_000),
            # Never through grpc_proxy/https_proxy: inside mitmdump that may be this proxy.
            ("grpc.enable_http_proxy", 0),
        ]
        if target.name_override is not None:
            options.append(("grpc.ssl_target_name_override", target.name_override))
            if not self._told_override:
                self._told_override = True
                log.info(
                    f"{self.where}: the pinned cert does not name {target.host}; "
                    f"checking it as {target.name_override!r} instead"
                )
        self._channel = grpc.aio.secure_channel(target.address, credentials, options=options)
        self._loop = loop
        self._lightning = lightning_pb2_grpc.LightningStub(self._channel)
        self._router = router_pb2_grpc.RouterStub(self._channel)

    @property
    def lightning(self) -> lightning_pb2_grpc.LightningStub:
        self._open()
        assert self._lightning is not None
        return self._lightning

    @property
    def router(self) -> router_pb2_grpc.RouterStub:
        self._open()
        assert self._router is not None
        return self._router

    async def unary(self, what: str, method: Callable[..., Any], request: Any) -> Any:
        """Call a unary RPC with the node's timeout; gRPC errors become LightningErrors."""
        try:
            return await method(request, timeout=self.target.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, what) from None

    def error(
        self, exc: grpc.aio.AioRpcError, what: str, timeout: float | None = None
    ) -> LightningError:
        """One secret-free line for a gRPC error: which node, what failed, why."""
        kind = _classify(exc)
        details = one_line(exc.details() or exc.code().name)
        where, target = self.where, self.target
        if kind == "refused":
            return BackendUnavailable(
                f"{where}: connection refused (is lnd running, with gRPC on port {target.port}?)"
            )
        if kind == "tls":
            full = (exc.details() or "").lower()
            if "certificate_verify_failed" not in full and "hostname verification" not in full:
                return BackendUnavailable(f"{where}: TLS handshake failed ({details})")
            if target.cert_pem is None:
                hint = "is not trusted by the system CA roots; add cert=<the node's tls.cert>"
            else:
                hint = f"does not match cert {target.cert_source}"
            return BackendUnavailable(
                f"{where}: TLS handshake failed: the node's certificate {hint}"
            )
        if kind == "dns":
            return BackendUnavailable(f"{where}: cannot resolve host {target.host}")
        if kind == "timeout":
            seconds = target.timeout if timeout is None else timeout
            return BackendUnavailable(f"{where}: no answer to {what} within {seconds:g} s")
        if kind == "unreachable":
            return BackendUnavailable(f"{where}: unreachable ({details})")
        if kind == "permission":
            return BackendUnavailable(
                f"{where}: the macaroon may not {what} (permission denied); use admin.macaroon "
                "or one baked with the needed permissions"
            )
        if kind == "auth":
            return BackendUnavailable(
                f"{where}: macaroon rejected ({details}); is it this node's macaroon?"
            )
        if kind == "locked":
            return BackendUnavailable(f"{where}: {details} (lncli unlock)")
        if kind == "starting":
            return BackendUnavailable(f"{where}: not ready yet ({details})")
        return LightningError(f"{where}: {what} failed: {exc.code().name}: {details}")

    async def get_info(self) -> Any:
        return await self.unary(
            "read node info (GetInfo)", self.lightning.GetInfo, lightning_pb2.GetInfoRequest()
        )

    def node_info(self, answer: Any) -> NodeInfo:
        chains = list(answer.chains)
        network: Network | None
        if chains:
            chain = chains[0]
            network = _NETWORKS.get(chain.network) if chain.chain in ("", "bitcoin") else None
        else:
            network = "testnet" if answer.testnet else None  # LND before `chains` had networks
        return NodeInfo(
            backend="lnd",
            address=self.address,
            alias=answer.alias or None,
            network=network,
            pubkey=answer.identity_pubkey or None,
        )

    async def close(self) -> None:
        channel, loop = self._channel, self._loop
        self._channel = self._loop = self._lightning = self._router = None
        if channel is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            await channel.close()


def _bad_answer(where: str, what: str) -> LightningError:
    return LightningError(f"{where}: bad answer to {what}")


# -- server side ---------------------------------------------------------------------------------


class LndInvoiceBackend(InvoiceBackend):
    """Issues invoices on an LND node (AddInvoice) and watches them (LookupInvoice)."""

    name = "lnd"

    def __init__(self, node: LndNode) -> None:
        self.node = node

    async def start(self) -> None:
        self.node._open()

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Invoice:
        if isinstance(amount_sat, bool) or not isinstance(amount_sat, int) or amount_sat < 1:
            raise LightningError(f"amount_sat must be a positive integer, got {amount_sat!r}")
        if isinstance(expiry, bool) or not isinstance(expiry, int) or expiry < 1:
            raise LightningError(f"expiry must be a positive integer, got {expiry!r}")
        # Taken before asking, so our expires_at is never later than the node's.
        now = time.time()
        answer = await self.node.unary(
            "create an invoice (AddInvoice)",
            self.node.lightning.AddInvoice,
            lightning_pb2.Invoice(value=amount_sat, memo=memo, expiry=expiry),
        )
        if len(answer.r_hash) != 32 or not answer.payment_request:
            raise _bad_answer(self.node.where, "AddInvoice")
        return Invoice(
            bolt11=answer.payment_request,
            payment_hash=bytes(answer.r_hash),
            amount_msat=amount_sat * 1000,
            expires_at=now + expiry,
        )

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        if not isinstance(payment_hash, bytes | bytearray) or len(payment_hash) != 32:
            raise LightningError("payment_hash must be 32 bytes")
        payment_hash = bytes(payment_hash)
        what = "look up an invoice (LookupInvoice)"
        try:
            answer = await self.node.lightning.LookupInvoice(
                lightning_pb2.PaymentHash(r_hash=payment_hash), timeout=self.node.target.timeout
            )
        except grpc.aio.AioRpcError as exc:
            if _invoice_unknown(exc):
                raise InvoiceNotFound(
                    f"{self.node.where}: no invoice with payment hash {payment_hash.hex()}"
                ) from None
            raise self.node.error(exc, what) from None
        settled = answer.state == lightning_pb2.Invoice.SETTLED or answer.settled
        preimage: bytes | None = None
        if settled:
            preimage = bytes(answer.r_preimage)
            if hashlib.sha256(preimage).digest() != payment_hash:
                raise _bad_answer(self.node.where, "LookupInvoice (preimage does not match)")
        return InvoiceState(
            payment_hash=payment_hash,
            settled=settled,
            preimage=preimage,
            amount_msat=answer.value_msat or answer.value * 1000,
        )

    async def info(self) -> NodeInfo:
        """GetInfo, and whether the macaroon may create invoices at all.

        invoice.macaroon (the one meant for a paywall) has no info:read: then the node is
        confirmed through LookupInvoice instead, and alias and network stay unknown."""
        what = "read node info (GetInfo)"
        try:
            answer = await self.node.lightning.GetInfo(
                lightning_pb2.GetInfoRequest(), timeout=self.node.target.timeout
            )
        except grpc.aio.AioRpcError as exc:
            if _classify(exc) != "permission":
                raise self.node.error(exc, what) from None
            # Proves the node and the macaroon; InvoiceNotFound is the expected answer.
            with contextlib.suppress(InvoiceNotFound):
                await self.lookup_invoice(bytes(32))
            log.info(f"{self.node.where}: the macaroon may not read node info; alias unknown")
            info = NodeInfo(backend="lnd", address=self.node.address)
        else:
            info = self.node.node_info(answer)
        await self._check_invoice_write()
        return info

    async def _check_invoice_write(self) -> None:
        # Both value and value_msat: LND refuses that before creating anything ("sat and msat
        # arguments are mutually exclusive"), but only after the macaroon check, so a
        # read-only macaroon shows up at start instead of on the first 402.
        try:
            await self.node.lightning.AddInvoice(
                lightning_pb2.Invoice(value=1, value_msat=1, memo="l402proxy permission check"),
                timeout=self.node.target.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            error = self.node.error(exc, "create invoices (AddInvoice)")
            if isinstance(error, BackendUnavailable):
                raise error from None
            return
        log.warning(f"{self.node.where}: the permission check made a 1 sat invoice; ignore it")

    async def close(self) -> None:
        await self.node.close()

    def describe(self) -> str:
        return self.node.describe()


def _invoice_unknown(exc: grpc.aio.AioRpcError) -> bool:
    """Whether LookupInvoice said it has no such invoice.

    NOT_FOUND "unable to locate invoice" since LND checks ErrInvoiceNotFound; a node that has
    never made an invoice answers UNKNOWN "there are no existing invoices" (invoices bucket
    missing), and LND before the NOT_FOUND mapping answered UNKNOWN for both."""
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return True
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNKNOWN and (
        "unable to locate invoice" in details or "there are no existing invoices" in details
    )


# -- client side ---------------------------------------------------------------------------------


class LndWallet(Wallet):
    """Pays through routerrpc.SendPaymentV2 and finds payments again with TrackPaymentV2.

    Money safety: `pay` raises PaymentFailed only on a final FAILED status from LND; anything
    else it cannot vouch for (stream cut, deadline, an unexpected answer) is
    BackendUnavailable/LightningError, and the payment is then looked up again later. The
    stream is not `cancelable`, so cancelling `pay` leaves LND to finish the payment."""

    name = "lnd"
    # LND records the payment (InitPayment) before SendPaymentV2 sends anything and keeps it
    # IN_FLIGHT until its last attempt ends, so TrackPaymentV2's NOT_FOUND and FAILED are final.
    settles_within = 0.0

    def __init__(
        self,
        node: LndNode,
        *,
        payment_timeout: int = PAYMENT_TIMEOUT_SECONDS,
        stream_margin: float = PAYMENT_STREAM_MARGIN_SECONDS,
    ) -> None:
        self.node = node
        self.payment_timeout = payment_timeout
        self.stream_deadline = payment_timeout + stream_margin

    @property
    def identity(self) -> str:
        return f"lnd:{self.node.address}"

    async def start(self) -> None:
        self.node._open()

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        if isinstance(max_fee_msat, bool) or not isinstance(max_fee_msat, int) or max_fee_msat < 0:
            raise LightningError(f"max_fee_msat must be an integer >= 0, got {max_fee_msat!r}")
        try:
            text, invoice = payable_invoice(bolt11)
        except PaymentFailed as exc:
            raise PaymentFailed(f"{self.node.where}: not paid: {exc}") from None
        payment_hash, amount_msat = invoice.payment_hash, invoice.amount_msat or 0
        where = self.node.where
        request = router_pb2.SendPaymentRequest(
            payment_request=text,
            fee_limit_msat=max_fee_msat,
            timeout_seconds=self.payment_timeout,
            no_inflight_updates=True,
        )
        call = self.node.router.SendPaymentV2(request, timeout=self.stream_deadline)
        try:
            for _ in range(MAX_STREAM_UPDATES):
                update = await call.read()
                if update is grpc.aio.EOF:
                    raise BackendUnavailable(
                        f"{where}: the payment stream ended without a final status; "
                        "the payment may still complete"
                    )
                if update.status in _STILL_GOING:
                    continue
                return self._outcome(update, payment_hash, amount_msat, "SendPaymentV2")
            raise BackendUnavailable(f"{where}: too many payment updates without a result")
        except grpc.aio.AioRpcError as exc:
            if _classify(exc) == "already_exists":
                # "invoice is already paid" / "payment is in transition": LND refused to pay
                # twice. Follow the earlier payment instead: its preimage is what we need.
                return await self._follow(payment_hash, amount_msat, exc)
            kind = _classify(exc)
            error = self.node.error(exc, "pay (SendPaymentV2)", timeout=self.stream_deadline)
            if kind in _NEVER_REACHED_LND:
                # Refused before LND's handler ran: unavailable, and nothing was sent.
                raise NothingSent(str(error)) from None
            if kind == "expired":
                raise PaymentFailed(f"{where}: not paid: {one_line(exc.details())}") from None
            # Cut off mid-stream, or an answer we cannot place: it may have been sent.
            raise BackendUnavailable(
                f"{error}; the payment may still complete (checked again later)"
            ) from None
        finally:
            call.cancel()

    async def _follow(
        self, payment_hash: bytes, amount_msat: int, refused: grpc.aio.AioRpcError
    ) -> PaymentResult:
        where = self.node.where
        call = self.node.router.TrackPaymentV2(
            router_pb2.TrackPaymentRequest(payment_hash=payment_hash, no_inflight_updates=True),
            timeout=self.stream_deadline,
        )
        try:
            update = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise BackendUnavailable(
                f"{where}: refused to pay again ({one_line(refused.details() or '')}) and "
                f"cannot follow the earlier payment: {self.node.error(exc, 'TrackPaymentV2')}"
            ) from None
        finally:
            call.cancel()
        if update is grpc.aio.EOF or update.status in _STILL_GOING:
            raise BackendUnavailable(
                f"{where}: this invoice is being paid already "
                f"({one_line(refused.details() or '')}); checked again later"
            )
        return self._outcome(update, payment_hash, amount_msat, "TrackPaymentV2")

    def _outcome(
        self, update: Any, payment_hash: bytes, amount_msat: int, what: str
    ) -> PaymentResult:
        where = self.node.where
        if update.status == _FAILED:
            reason = (
                lightning_pb2.PaymentFailureReason.Name(update.failure_reason)
                if (update.failure_reason in lightning_pb2.PaymentFailureReason.values())
                else str(update.failure_reason)
            )
            raise PaymentFailed(f"{where}: payment failed: {reason}")
        if update.status != _SUCCEEDED:
            raise LightningError(f"{where}: unexpected payment status {update.status} from {what}")
        preimage = _hex_bytes(update.payment_preimage)
        if preimage is None or hashlib.sha256(preimage).digest() != payment_hash:
            raise _bad_answer(where, f"{what} (the preimage does not match the invoice)")
        return PaymentResult(
            payment_hash=payment_hash,
            preimage=preimage,
            amount_msat=update.value_msat or update.value_sat * 1000 or amount_msat,
            fee_msat=update.fee_msat,
        )

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        if not isinstance(payment_hash, bytes | bytearray) or len(payment_hash) != 32:
            raise LightningError("payment_hash must be 32 bytes")
        payment_hash = bytes(payment_hash)
        where = self.node.where
        # With in-flight updates on, LND sends the current state first, right away.
        call = self.node.router.TrackPaymentV2(
            router_pb2.TrackPaymentRequest(payment_hash=payment_hash, no_inflight_updates=False),
            timeout=self.node.target.timeout,
        )
        try:
            update = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # "payment isn't initiated": this node never sent it.
                return PaymentState(payment_hash, "unknown", None, 0)
            raise self.node.error(exc, "look up a payment (TrackPaymentV2)") from None
        finally:
            call.cancel()
        if update is grpc.aio.EOF:
            raise LightningError(f"{where}: TrackPaymentV2 ended without a status")
        if update.status in _STILL_GOING:
            return PaymentState(payment_hash, "pending", None, 0)
        if update.status == _FAILED:
            return PaymentState(payment_hash, "failed", None, update.fee_msat)
        if update.status == _SUCCEEDED:
            preimage = _hex_bytes(update.payment_preimage)
            if preimage is None or hashlib.sha256(preimage).digest() != payment_hash:
                raise _bad_answer(where, "TrackPaymentV2 (the preimage does not match)")
            return PaymentState(payment_hash, "succeeded", preimage, update.fee_msat)
        raise LightningError(f"{where}: unexpected payment status {update.status}")

    async def info(self) -> NodeInfo:
        """GetInfo, and whether the macaroon may pay and look payments up at all."""
        info = self.node.node_info(await self.node.get_info())
        for method, entity, action, what in PAY_PERMISSIONS:
            await self._check_permission(method, entity, action, what)
        return info

    def _may_not(self, what: str, details: str) -> BackendUnavailable:
        reason = "permission denied" if "permission denied" in details.lower() else details
        return BackendUnavailable(
            f"{self.node.where}: the macaroon may not {what} ({one_line(reason)}); use "
            "admin.macaroon or one baked with offchain:read and offchain:write"
        )

    async def _check_permission(self, method: str, entity: str, action: str, what: str) -> None:
        """Ask LND (CheckMacaroonPermissions, its own macaroon check) whether our macaroon may
        call `method`; without macaroon:read, or on an LND without that call, probe instead."""
        request = lightning_pb2.CheckMacPermRequest(
            macaroon=self.node.target.macaroon,
            permissions=[lightning_pb2.MacaroonPermission(entity=entity, action=action)],
            fullMethod=method,
        )
        try:
            answer = await self.node.lightning.CheckMacaroonPermissions(
                request, timeout=self.node.target.timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # CheckMacAuth's verdict on the macaroon in the request.
                raise self._may_not(what, exc.details() or "refused") from None
            if _classify(exc) != "permission" and exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise self.node.error(
                    exc, "check the macaroon's permissions (CheckMacaroonPermissions)"
                ) from None
            await self._probe(method, what)
            return
        if not answer.valid:
            raise self._may_not(what, "permission denied")

    async def _probe(self, method: str, what: str) -> None:
        """Call `method` with a request LND refuses after the macaroon check and before it
        does anything: no invoice and no destination (and a time preference out of range,
        LND's first check) cannot pay, no payment hash cannot be tracked."""
        if method.endswith("/SendPaymentV2"):
            call = self.node.router.SendPaymentV2(
                router_pb2.SendPaymentRequest(time_pref=2.0, no_inflight_updates=True),
                timeout=self.node.target.timeout,
            )
        else:
            call = self.node.router.TrackPaymentV2(
                router_pb2.TrackPaymentRequest(payment_hash=b""),
                timeout=self.node.target.timeout,
            )
        try:
            await call.read()
        except grpc.aio.AioRpcError as exc:
            kind = _classify(exc)
            if kind == "permission":
                raise self._may_not(what, "permission denied") from None
            if kind in _NEVER_REACHED_LND or kind in ("timeout", "unreachable"):
                raise self.node.error(exc, what) from None
            # Refused for the request itself: the macaroon got through.
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.node.close()

    def describe(self) -> str:
        return self.node.describe()


def _hex_bytes(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def backend_from_uri(uri: str) -> LndInvoiceBackend:
    """The server's invoice backend on the LND node `uri` names (no network I/O yet)."""
    return LndInvoiceBackend(LndNode(parse_uri(uri)))


def wallet_from_uri(uri: str) -> LndWallet:
    """The client's wallet on the LND node `uri` names (no network I/O yet)."""
    return LndWallet(LndNode(parse_uri(uri)))


__all__ = [
    "DEFAULT_PORT",
    "LndInvoiceBackend",
    "LndNode",
    "LndTarget",
    "LndWallet",
    "backend_from_uri",
    "parse_uri",
    "wallet_from_uri",
]
