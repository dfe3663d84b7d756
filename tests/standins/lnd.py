"""A stand-in LND: LND's own gRPC services (lnrpc.Lightning, routerrpc.Router) over TLS, checking
the macaroon metadata on every call, backed by the dev ledger.

No lnd can be installed here, so the real client code (l402proxy.lightning.lnd) is tested against
this: the wire protocol is the real one (LND's generated servicers from lnd-grpc-client, TLS with
a certificate made the way LND makes its tls.cert, `macaroon: <hex>` metadata), and the answers,
codes and error texts are LND's (each constant below says where it comes from). Invoices are real
regtest BOLT11 from a dev ledger wallet, so two stand-ins on one ledger pay each other.

In-process:  `async with StandinLnd(ledger, "merchant", tmp_path / "lnd") as lnd: lnd.uri()`
Subprocess:  `python -m tests.standins.lnd --ledger PATH --wallet NAME --dir DIR --port N`
             writes tls.cert, tls.key, admin.macaroon, invoice.macaroon, readonly.macaroon into
             DIR, prints one JSON line (port and file paths) and serves until SIGINT/SIGTERM.

Knobs (`mode`): "normal"; "hang" (SendPaymentV2 never ends: the payment stays in flight);
"no_route" (every payment fails with FAILURE_REASON_NO_ROUTE); "locked" (every call is refused
as by a locked wallet). `check_permissions = False` answers CheckMacaroonPermissions as an LND
that predates it does (UNIMPLEMENTED).
"""

import argparse
import asyncio
import base64
import contextlib
import json
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lndgrpc.compiled import lightning_pb2, lightning_pb2_grpc, router_pb2_grpc
from pymacaroons import MACAROON_V2, Macaroon
from pymacaroons.serializers.binary_serializer import BinarySerializer

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import InvoiceNotFound, LightningError, PaymentFailed
from l402proxy.lightning.dev import DevLedger
from tests.standins.tls import self_signed

MODES: Final = ("normal", "hang", "no_route", "locked")

# LND's texts, with the gRPC code each comes with.
# macaroons/service.go RawMacaroonFromContext; code UNKNOWN (the interceptor returns it as is).
MISSING_MACAROON: Final = "expected 1 macaroon, got {}"
# gopkg.in/macaroon.v2, for a macaroon this node did not bake; code UNKNOWN.
SIGNATURE_MISMATCH: Final = "verification failed: signature mismatch after caveat verification"
# macaroon-bakery's ErrPermissionDenied, for a macaroon without the RPC's permission; UNKNOWN.
PERMISSION_DENIED: Final = "permission denied"
# rpcperms/interceptor.go ErrWalletLocked, checked before the macaroon; UNKNOWN.
WALLET_LOCKED: Final = "wallet locked, unlock it to enable full RPC access"
# invoices/errors.go: ErrInvoiceNotFound (rpcserver LookupInvoice maps it to NOT_FOUND) and
# ErrNoInvoicesCreated (a node that never made an invoice; not mapped, so UNKNOWN).
INVOICE_NOT_FOUND: Final = "unable to locate invoice"
NO_INVOICES: Final = "there are no existing invoices"
# paymentsdb errors: ErrPaymentNotInitiated (TrackPaymentV2 -> NOT_FOUND), ErrAlreadyPaid and
# ErrPaymentInFlight (SendPaymentV2 -> ALREADY_EXISTS).
PAYMENT_NOT_INITIATED: Final = "payment isn't initiated"
ALREADY_PAID: Final = "invoice is already paid"
IN_TRANSITION: Final = "payment is in transition"
# lnrpc ErrSatMsatMutualExclusive (AddInvoice with both value and value_msat); UNKNOWN.
SAT_MSAT_EXCLUSIVE: Final = "sat and msat arguments are mutually exclusive"

DEFAULT_INVOICE_EXPIRY: Final = 24 * 3600  # invoicesrpc.DefaultInvoiceExpiry
# The names LND's cert/selfsigned.go puts in tls.cert (plus the machine's hostname and IPs).
LND_CERT_DNS: Final = ("localhost", "unix", "unixpacket", "bufconn")
LND_CERT_IPS: Final = ("127.0.0.1", "::1")

# LND's permission for each RPC served here (rpcserver.go MainRPCServerPermissions,
# routerrpc macPermissions) and what each default macaroon grants (rpcserver.go
# readPermissions / invoicePermissions; admin has everything).
METHOD_PERMISSION: Final = {
    "/lnrpc.Lightning/GetInfo": ("info", "read"),
    "/lnrpc.Lightning/CheckMacaroonPermissions": ("macaroon", "read"),
    "/lnrpc.Lightning/AddInvoice": ("invoices", "write"),
    "/lnrpc.Lightning/LookupInvoice": ("invoices", "read"),
    "/routerrpc.Router/SendPaymentV2": ("offchain", "write"),
    "/routerrpc.Router/TrackPaymentV2": ("offchain", "read"),
}
_ENTITIES = ("onchain", "offchain", "address", "message", "peers", "info", "invoices", "signer")
ROLE_PERMISSIONS: Final = {
    "admin": frozenset((e, a) for e in (*_ENTITIES, "macaroon") for a in ("read", "write")),
    "invoice": frozenset(
        {
            ("invoices", "read"),
            ("invoices", "write"),
            ("address", "read"),
            ("address", "write"),
            ("onchain", "read"),
        }
    ),
    "readonly": frozenset((e, "read") for e in (*_ENTITIES, "macaroon")),
    # Baked ones (`lncli bakemacaroon info:read offchain:read offchain:write`, and without
    # offchain:write): no macaroon:read, so they may not ask CheckMacaroonPermissions.
    "pay": frozenset({("info", "read"), ("offchain", "read"), ("offchain", "write")}),
    "track": frozenset({("info", "read"), ("offchain", "read")}),
}
# grpc-go's answer for a method the server does not have (LND before 0.13 lacks
# CheckMacaroonPermissions).
UNKNOWN_METHOD: Final = "unknown method {} for service lnrpc.Lightning"
# routerrpc extractIntentFromSendRequest's first checks, before anything is sent.
TIME_PREF_RANGE: Final = "time preference out of range"
NO_DESTINATION: Final = "invalid vertex length of 0, want 33"

_PAYMENT = lightning_pb2.Payment
_REASON = lightning_pb2.PaymentFailureReason


def make_tls_cert(
    dns_names: Iterable[str] = LND_CERT_DNS, ips: Iterable[str] = LND_CERT_IPS
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) shaped like LND's tls.cert (see tests/standins/tls.py)."""
    return self_signed(dns_names, ips, organization="lnd autogenerated cert")


def bake_macaroon(role: str) -> bytes:
    """A binary V2 macaroon (what LND writes to <role>.macaroon; starts with 0x02)."""
    # LND's identifiers start with the bakery version byte 3; the rest is ours.
    identifier = b"\x03" + secrets.token_bytes(16) + role.encode()
    macaroon = Macaroon(
        location="lnd", identifier=identifier, key=secrets.token_bytes(32), version=MACAROON_V2
    )
    text = macaroon.serialize(serializer=BinarySerializer())
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _go_hex_error(text: str) -> str | None:
    """encoding/hex's error for `text`, as LND returns it for a macaroon that is not hex."""
    for char in text:
        if char not in "0123456789abcdefABCDEF":
            return f"encoding/hex: invalid byte: U+{ord(char):04X} {char!r}"
    return "encoding/hex: odd length hex string" if len(text) % 2 else None


class StandinLnd:
    """One stand-in node: a grpc.aio server on `host` serving LND's RPCs for one ledger wallet."""

    def __init__(
        self,
        ledger: str | Path,
        wallet: str,
        directory: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: str = "normal",
        alias: str | None = None,
        cert_dns: Iterable[str] = LND_CERT_DNS,
        cert_ips: Iterable[str] = LND_CERT_IPS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.ledger = DevLedger(ledger)
        self.wallet = wallet
        self.directory = Path(directory)
        self.host = host
        self.requested_port = port
        self.port = port
        self.mode = mode
        self.alias = alias or f"standin-{wallet}"
        self.cert_dns = tuple(cert_dns)
        self.cert_ips = tuple(cert_ips)
        self.macaroons: dict[str, bytes] = {}
        self.cert_pem = b""
        self.calls: list[str] = []  # full method names served, in order (refused ones too)
        # Hanging payments (mode "hang"): hash -> bolt11, and an event set when they end.
        self.in_flight: dict[bytes, str] = {}
        self.finished: dict[bytes, asyncio.Event] = {}
        # Failures decided here rather than by the ledger (mode "no_route", finish_hanging).
        self.failed: dict[bytes, int] = {}
        # What each payment sent was for, so TrackPaymentV2 reports value_msat as LND does.
        self.amounts: dict[bytes, int] = {}
        self.add_index = 0
        self.check_permissions = True
        self._server: grpc.aio.Server | None = None

    # -- files and addresses ---------------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        return self.directory / "tls.cert"

    def macaroon_path(self, role: str = "admin") -> Path:
        return self.directory / f"{role}.macaroon"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def uri(self, role: str = "admin", *, host: str | None = None) -> str:
        """lnd://host:port?cert=<tls.cert path>&macaroon=<role.macaroon path>."""
        where = self.address if host is None else f"{host}:{self.port}"
        cert = quote(str(self.cert_path), safe="/")
        macaroon = quote(str(self.macaroon_path(role)), safe="/")
        return f"lnd://{where}?cert={cert}&macaroon={macaroon}"

    def lndconnect_uri(self, role: str = "admin", *, cert: bool = True) -> str:
        """lndconnect://host:port?cert=<base64url DER>&macaroon=<base64url>."""
        query = ""
        if cert:
            der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
                serialization.Encoding.DER
            )
            query = f"cert={b64url(der)}&"
        return f"lndconnect://{self.address}?{query}macaroon={b64url(self.macaroons[role])}"

    def _prepare_files(self) -> tuple[bytes, bytes]:
        """Cert, key and macaroons from the directory, made first if missing (a restarted
        stand-in keeps its identity, like a restarted lnd)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        key_path = self.directory / "tls.key"
        if not (self.cert_path.exists() and key_path.exists()):
            cert_pem, key_pem = make_tls_cert(self.cert_dns, self.cert_ips)
            key_path.write_bytes(key_pem)
            key_path.chmod(0o600)
            self.cert_path.write_bytes(cert_pem)
        for role in ROLE_PERMISSIONS:
            path = self.macaroon_path(role)
            if not path.exists():
                path.write_bytes(bake_macaroon(role))
                path.chmod(0o600)
            self.macaroons[role] = path.read_bytes()
        self.cert_pem = self.cert_path.read_bytes()
        return self.cert_pem, key_path.read_bytes()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> "StandinLnd":
        cert_pem, key_pem = self._prepare_files()
        await self.ledger.open()
        server = grpc.aio.server()
        lightning_pb2_grpc.add_LightningServicer_to_server(_Lightning(self), server)
        router_pb2_grpc.add_RouterServicer_to_server(_Router(self), server)
        credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.port = server.add_secure_port(f"{host}:{self.requested_port}", credentials)
        if not self.port:
            raise OSError(f"stand-in LND cannot listen on {host}:{self.requested_port}")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Hanging payment streams are cancelled rather than waited for.
            await server.stop(grace=0.5)
        for event in self.finished.values():
            event.set()
        await self.ledger.close()

    async def __aenter__(self) -> "StandinLnd":
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def finish_hanging(self, *, pay: bool) -> None:
        """End every hanging payment: settle it through the ledger, or fail it (NO_ROUTE)."""
        for payment_hash, bolt11 in list(self.in_flight.items()):
            if pay:
                try:
                    await self.ledger.pay(self.wallet, bolt11, 0)
                except PaymentFailed:
                    self.failed[payment_hash] = _REASON.FAILURE_REASON_ERROR
            else:
                self.failed[payment_hash] = _REASON.FAILURE_REASON_NO_ROUTE
            del self.in_flight[payment_hash]
            self.finished.pop(payment_hash, asyncio.Event()).set()

    # -- what every call goes through ------------------------------------------------------------

    async def admit(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """LND's interceptor chain: RPC state first, then the macaroon and its permission."""
        self.calls.append(method)
        if self.mode == "locked":
            await context.abort(grpc.StatusCode.UNKNOWN, WALLET_LOCKED)
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "macaroon"]
        if len(values) != 1:
            await context.abort(grpc.StatusCode.UNKNOWN, MISSING_MACAROON.format(len(values)))
        text = values[0] if isinstance(values[0], str) else values[0].decode()
        hex_error = _go_hex_error(text)
        if hex_error is not None:
            await context.abort(grpc.StatusCode.UNKNOWN, hex_error)
        presented = bytes.fromhex(text)
        role = self.role_of(presented)
        if role is None:
            await context.abort(grpc.StatusCode.UNKNOWN, SIGNATURE_MISMATCH)
        if METHOD_PERMISSION[method] not in ROLE_PERMISSIONS[role]:
            await context.abort(grpc.StatusCode.UNKNOWN, PERMISSION_DENIED)

    def role_of(self, macaroon: bytes) -> str | None:
        """Which of this node's macaroons it is (None: not baked here)."""
        return next((r for r, m in self.macaroons.items() if m == macaroon), None)

    def payment(
        self,
        payment_hash: bytes,
        status: int,
        *,
        bolt11: str = "",
        amount_msat: int = 0,
        preimage: bytes | None = None,
        reason: int = _REASON.FAILURE_REASON_NONE,
    ) -> Any:
        amount_msat = amount_msat or self.amounts.get(payment_hash, 0)
        return lightning_pb2.Payment(
            payment_hash=payment_hash.hex(),
            value=amount_msat // 1000,
            value_sat=amount_msat // 1000,
            value_msat=amount_msat,
            payment_preimage=preimage.hex() if preimage else "",
            payment_request=bolt11,
            status=status,
            fee=0,
            fee_sat=0,
            fee_msat=0,
            creation_date=int(time.time()),
            creation_time_ns=time.time_ns(),
            failure_reason=reason,
        )


def _failure_reason(message: str) -> int:
    """The LND failure reason closest to why the dev ledger refused a payment."""
    if "insufficient balance" in message:
        return _REASON.FAILURE_REASON_INSUFFICIENT_BALANCE
    if "already paid" in message:
        # The payee rejects a second payment with incorrect_or_unknown_payment_details.
        return _REASON.FAILURE_REASON_INCORRECT_PAYMENT_DETAILS
    if "cannot be routed" in message or "cannot route" in message:
        return _REASON.FAILURE_REASON_NO_ROUTE
    return _REASON.FAILURE_REASON_ERROR


class _Lightning(lightning_pb2_grpc.LightningServicer):
    def __init__(self, node: StandinLnd) -> None:
        self.node = node

    async def GetInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        node = self.node
        await node.admit(context, "/lnrpc.Lightning/GetInfo")
        await node.ledger.open()
        pubkey = node.ledger.node_id
        return lightning_pb2.GetInfoResponse(
            version="0.18.5-beta l402proxy-standin",
            identity_pubkey=pubkey,
            alias=node.alias,
            num_active_channels=1,
            num_peers=1,
            block_height=800,
            synced_to_chain=True,
            synced_to_graph=True,
            chains=[lightning_pb2.Chain(chain="bitcoin", network="regtest")],
            uris=[f"{pubkey}@{node.address}"],
        )

    async def CheckMacaroonPermissions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        """rpcserver.go CheckMacaroonPermissions: macService.CheckMacAuth on the macaroon in
        the request; any failure is INVALID_ARGUMENT with the bakery's text."""
        node = self.node
        if not node.check_permissions:
            node.calls.append("/lnrpc.Lightning/CheckMacaroonPermissions")
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, UNKNOWN_METHOD.format("CheckMacaroonPermissions")
            )
        await node.admit(context, "/lnrpc.Lightning/CheckMacaroonPermissions")
        role = node.role_of(bytes(request.macaroon))
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, SIGNATURE_MISMATCH)
        wanted = {(p.entity, p.action) for p in request.permissions}
        # Broad permissions first, then the special "uri:<method>" one (no macaroon here
        # is baked with those).
        if not wanted <= ROLE_PERMISSIONS[role]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, PERMISSION_DENIED)
        return lightning_pb2.CheckMacPermResponse(valid=True)

    async def AddInvoice(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        node = self.node
        await node.admit(context, "/lnrpc.Lightning/AddInvoice")
        if request.value and request.value_msat:
            await context.abort(grpc.StatusCode.UNKNOWN, SAT_MSAT_EXCLUSIVE)
        amount_msat = request.value_msat or request.value * 1000
        if amount_msat < 0:
            await context.abort(grpc.StatusCode.UNKNOWN, "amount cannot be negative")
        if amount_msat == 0:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "stand-in LND: zero-amount invoices unsupported"
            )
        try:
            invoice = await node.ledger.create_invoice(
                node.wallet, amount_msat, request.memo, request.expiry or DEFAULT_INVOICE_EXPIRY
            )
        except LightningError as exc:
            await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        node.add_index += 1
        return lightning_pb2.AddInvoiceResponse(
            r_hash=invoice.payment_hash,
            payment_request=invoice.bolt11,
            add_index=node.add_index,
            payment_addr=secrets.token_bytes(32),
        )

    async def LookupInvoice(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        node = self.node
        await node.admit(context, "/lnrpc.Lightning/LookupInvoice")
        payment_hash = bytes.fromhex(request.r_hash_str) if request.r_hash_str else request.r_hash
        if len(payment_hash) not in (0, 32):
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"payment hash must be exactly 32 bytes, is instead {len(payment_hash)}",
            )
        payment_hash = payment_hash or bytes(32)
        try:
            state = await node.ledger.lookup_invoice(payment_hash, wallet=node.wallet)
        except InvoiceNotFound:
            if not await node.ledger.list_invoices(wallet=node.wallet, limit=1):
                await context.abort(grpc.StatusCode.UNKNOWN, NO_INVOICES)
            await context.abort(grpc.StatusCode.NOT_FOUND, INVOICE_NOT_FOUND)
        listed = await node.ledger.list_invoices(wallet=node.wallet)
        row = next(i for i in listed if i["payment_hash"] == payment_hash.hex())
        now = time.time()
        if state.settled:
            status = lightning_pb2.Invoice.SETTLED
        elif now >= row["expires_at"]:
            status = lightning_pb2.Invoice.CANCELED  # LND cancels invoices that expire
        else:
            status = lightning_pb2.Invoice.OPEN
        # LND also returns r_preimage for open invoices; the ledger only tells it once settled,
        # which is all the client may rely on anyway.
        return lightning_pb2.Invoice(
            memo=row["memo"],
            r_preimage=state.preimage or b"",
            r_hash=payment_hash,
            value=state.amount_msat // 1000,
            value_msat=state.amount_msat,
            settled=state.settled,
            creation_date=int(row["created_at"]),
            settle_date=int(row["settled_at"] or 0),
            payment_request=row["bolt11"],
            expiry=int(row["expires_at"] - row["created_at"]),
            amt_paid_sat=state.amount_msat // 1000 if state.settled else 0,
            amt_paid_msat=state.amount_msat if state.settled else 0,
            state=status,
        )


class _Router(router_pb2_grpc.RouterServicer):
    def __init__(self, node: StandinLnd) -> None:
        self.node = node

    async def SendPaymentV2(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        node = self.node
        await node.admit(context, "/routerrpc.Router/SendPaymentV2")
        if not -1 <= request.time_pref <= 1:
            await context.abort(grpc.StatusCode.UNKNOWN, TIME_PREF_RANGE)
        bolt11 = request.payment_request
        if not bolt11 and not request.dest:
            await context.abort(grpc.StatusCode.UNKNOWN, NO_DESTINATION)
        try:
            invoice = decode_invoice(bolt11)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        if invoice.network != "regtest":
            await context.abort(
                grpc.StatusCode.UNKNOWN, "invoice not for current active network 'regtest'"
            )
        if invoice.amount_msat is None:
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                "amount must be specified when paying a zero amount invoice",
            )
        if invoice.is_expired(time.time()):
            # routerrpc ValidatePayReqExpiry: fmt.Errorf("invoice expired. Valid until %v").
            valid = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(invoice.expires_at))
            await context.abort(grpc.StatusCode.UNKNOWN, f"invoice expired. Valid until {valid}")
        payment_hash, amount = invoice.payment_hash, invoice.amount_msat
        node.amounts[payment_hash] = amount
        if payment_hash in node.in_flight:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, IN_TRANSITION)
        known = await node.ledger.lookup_payment(node.wallet, payment_hash)
        if known.status == "succeeded":
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, ALREADY_PAID)
        if not request.no_inflight_updates:
            yield node.payment(payment_hash, _PAYMENT.IN_FLIGHT, bolt11=bolt11, amount_msat=amount)
        if node.mode == "no_route":
            node.failed[payment_hash] = _REASON.FAILURE_REASON_NO_ROUTE
            yield node.payment(
                payment_hash,
                _PAYMENT.FAILED,
                bolt11=bolt11,
                amount_msat=amount,
                reason=_REASON.FAILURE_REASON_NO_ROUTE,
            )
            return
        if node.mode == "hang":
            # In flight until finish_hanging(); the stream stays open without a word, as
            # LND's does with no_inflight_updates while HTLCs are out.
            node.in_flight[payment_hash] = bolt11
            done = node.finished.setdefault(payment_hash, asyncio.Event())
            await done.wait()
            if payment_hash in node.failed:
                reason = node.failed[payment_hash]
                yield node.payment(payment_hash, _PAYMENT.FAILED, bolt11=bolt11, reason=reason)
                return
            state = await node.ledger.lookup_payment(node.wallet, payment_hash)
            yield node.payment(
                payment_hash, _PAYMENT.SUCCEEDED, bolt11=bolt11, preimage=state.preimage
            )
            return
        node.failed.pop(payment_hash, None)
        try:
            result = await node.ledger.pay(node.wallet, bolt11, request.fee_limit_msat)
        except PaymentFailed as exc:
            reason = _failure_reason(str(exc))
            node.failed[payment_hash] = reason
            yield node.payment(
                payment_hash, _PAYMENT.FAILED, bolt11=bolt11, amount_msat=amount, reason=reason
            )
            return
        yield node.payment(
            payment_hash,
            _PAYMENT.SUCCEEDED,
            bolt11=bolt11,
            amount_msat=result.amount_msat,
            preimage=result.preimage,
        )

    async def TrackPaymentV2(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        node = self.node
        await node.admit(context, "/routerrpc.Router/TrackPaymentV2")
        payment_hash = request.payment_hash
        if len(payment_hash) != 32:
            await context.abort(
                grpc.StatusCode.UNKNOWN, f"invalid hash length of {len(payment_hash)}, want 32"
            )
        if payment_hash in node.in_flight:
            if not request.no_inflight_updates:
                yield node.payment(payment_hash, _PAYMENT.IN_FLIGHT)
            await node.finished.setdefault(payment_hash, asyncio.Event()).wait()
        if payment_hash in node.failed:
            yield node.payment(payment_hash, _PAYMENT.FAILED, reason=node.failed[payment_hash])
            return
        state = await node.ledger.lookup_payment(node.wallet, payment_hash)
        if state.status == "unknown":
            await context.abort(grpc.StatusCode.NOT_FOUND, PAYMENT_NOT_INITIATED)
        if state.status == "succeeded":
            yield node.payment(payment_hash, _PAYMENT.SUCCEEDED, preimage=state.preimage)
        elif state.status == "failed":
            yield node.payment(payment_hash, _PAYMENT.FAILED, reason=_REASON.FAILURE_REASON_ERROR)
        else:
            yield node.payment(payment_hash, _PAYMENT.IN_FLIGHT)


@contextlib.asynccontextmanager
async def running(
    ledger: str | Path, wallet: str, directory: str | Path, **options: Any
) -> AsyncIterator[StandinLnd]:
    """A started stand-in, stopped on exit whatever happens."""
    node = StandinLnd(ledger, wallet, directory, **options)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def serve(args: argparse.Namespace) -> None:
    node = StandinLnd(
        args.ledger,
        args.wallet,
        args.dir,
        host=args.host,
        port=args.port,
        mode=args.mode,
        alias=args.alias,
    )
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ready = {
        "port": node.port,
        "cert": str(node.cert_path),
        "macaroons": {role: str(node.macaroon_path(role)) for role in ROLE_PERMISSIONS},
    }
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.standins.lnd", description=__doc__)
    parser.add_argument("--ledger", required=True, help="dev ledger SQLite file")
    parser.add_argument("--wallet", required=True, help="dev ledger wallet this node spends")
    parser.add_argument("--dir", required=True, help="where tls.cert and macaroons go")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--mode", choices=MODES, default="normal")
    parser.add_argument("--alias", default=None)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
