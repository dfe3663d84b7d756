"""Core Lightning (lightningd) as invoice backend and wallet, over its JSON-RPC unix socket.

Wire facts this module relies on (ElementsProject/lightning):
- doc/lightningd-rpc.7.md: JSON-RPC 2.0 requests with unique ids; every reply is one JSON
  object followed by two '\\n'; a reader that sees "\\n\\n" but cannot parse yet keeps reading.
- doc/schemas/{getinfo,invoice,listinvoices,pay,listpays}.json: the fields read below; `msat`
  values are integers (older nodes: strings ending in "msat", also accepted).
- common/jsonrpc_errors.h and the "errors" list of pay.json: the pay error codes.

No pyln-client: it is synchronous only and its dependencies clash with ours on Python 3.12.
"""

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import secrets
from typing import Any, Final
from urllib.parse import unquote, urlsplit

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
from l402proxy.lightning.uri import parse_query, shown_netloc, shown_path

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 30.0
# How long `pay` keeps trying routes before it gives a definite answer. Below the client's
# default pay timeout (60 s), so a payment that cannot be routed comes back as a failure.
PAY_RETRY_FOR: Final = 40
# After `pay` starts, lightningd may begin new attempts until retry_for has passed (the pay
# plugin's deadline), also after our connection closed or this process died; meanwhile
# `listpays` shows nothing (before the first sendonion) or only failed parts (between
# attempts). The margin covers a request that reached lightningd late and an attempt being
# prepared at the deadline.
SETTLE_MARGIN_SECONDS: Final = 60.0
MAX_REPLY_BYTES: Final = 16 * 1024 * 1024
READ_CHUNK: Final = 65536
# sockaddr_un.sun_path holds 108 bytes including the final NUL.
MAX_SUN_PATH: Final = 107
MAX_MEMO_BYTES: Final = 639

# common/jsonrpc_errors.h
JSONRPC2_INVALID_REQUEST: Final = -32600
JSONRPC2_METHOD_NOT_FOUND: Final = -32601
JSONRPC2_INVALID_PARAMS: Final = -32602
PAY_IN_PROGRESS: Final = 200
PAY_DESTINATION_PERM_FAIL: Final = 203
PAY_ROUTE_NOT_FOUND: Final = 205
PAY_ROUTE_TOO_EXPENSIVE: Final = 206
PAY_INVOICE_EXPIRED: Final = 207
PAY_STOPPED_RETRYING: Final = 210

# After these `pay` answers nothing of this payment is in flight, provided no part is listed
# as still pending (see _nothing_in_flight): lightning-pay(7): 203 permanent failure at
# destination, 205 no route, 206 too expensive for maxfee, 207 invoice expired, 210 "Ran out
# of routes to try" / stopped retrying; the JSON-RPC codes mean the request was refused before
# anything was sent. Everything else (-1, 200 in progress, 201, 209, ...) leaves it open.
DEFINITE_PAY_FAILURES: Final = frozenset(
    {
        JSONRPC2_INVALID_REQUEST,
        JSONRPC2_METHOD_NOT_FOUND,
        JSONRPC2_INVALID_PARAMS,
        PAY_DESTINATION_PERM_FAIL,
        PAY_ROUTE_NOT_FOUND,
        PAY_ROUTE_TOO_EXPENSIVE,
        PAY_INVOICE_EXPIRED,
        PAY_STOPPED_RETRYING,
    }
)

# getinfo "network" -> ours (lightningd's names are bitcoind's chain names).
NETWORKS: Final[dict[str, Network]] = {
    "bitcoin": "mainnet",
    "mainnet": "mainnet",
    "testnet": "testnet",
    "testnet4": "testnet",
    "signet": "signet",
    "regtest": "regtest",
}

URI_FORMS: Final = "cln:///path/to/lightning-rpc (or just the absolute path)"


class ClnRpcError(LightningError):
    """lightningd answered with a JSON-RPC error object (`error`, kept whole: the pay plugin
    puts its fields beside code and message, lightningd itself under `data`)."""

    def __init__(
        self, message: str, code: int | None, data: object, error: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.data = data
        self.error: dict[str, Any] = error if error is not None else {}


def parse_uri(uri: str) -> tuple[str, float]:
    """(socket path, call timeout) from `cln:///path`, `cln:/path` or `/path`."""
    text = uri.strip()
    if "\x00" in text:
        raise LightningError("cln URI: the socket path contains a NUL character")
    if text.startswith("/"):
        # A bare path is taken literally: it has no query part.
        return text, DEFAULT_TIMEOUT
    try:
        parts = urlsplit(text)
    except ValueError:
        # urlsplit's message may quote the host, which may be a key: not shown.
        raise LightningError(f"cln URI: cannot parse it; use {URI_FORMS}") from None
    if parts.scheme.lower() != "cln":
        raise LightningError(f"not a cln URI: use {URI_FORMS}")
    if parts.netloc:
        raise LightningError(
            f"cln URI names a host ({shown_netloc(parts.netloc)!r}); lightningd is reached "
            f"through a local socket: use {URI_FORMS}, with three slashes"
        )
    if parts.fragment:
        raise LightningError(f"cln URI: unexpected '#' part; use {URI_FORMS}")
    path = unquote(parts.path)
    if "\x00" in path:
        raise LightningError("cln URI: the socket path contains a NUL character")
    if not path:
        raise LightningError(f"cln URI without a socket path: use {URI_FORMS}")
    if not path.startswith("/"):
        raise LightningError(
            f"cln URI: the socket path {shown_path(path)!r} must be absolute; use {URI_FORMS}"
        )
    query = parse_query(text, what="cln URI", allowed=("timeout",))
    return path, query.timeout(DEFAULT_TIMEOUT)


class ClnRpc:
    """A small asyncio JSON-RPC client for lightningd's unix socket.

    One connection per call: `pay` can take a minute, and on one shared connection behind a
    lock it would hold up every invoice and lookup meanwhile. lightningd keeps running a
    command whose connection closed, so a call that times out just closes its own socket and
    no late reply can ever be read as the answer to another call. Connecting to a unix socket
    costs microseconds (pyln-client also connects per call).
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._prefix = f"l402proxy-{os.getpid()}"

    @property
    def where(self) -> str:
        return f"cln {self.path}"

    async def call(
        self,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float | None = None,
        paying: bool = False,
    ) -> dict[str, Any]:
        """The `result` object of `method`; ClnRpcError for an error reply.

        `paying`: a socket that cannot be connected to is NothingSent (nothing reached
        lightningd); everything after connecting stays BackendUnavailable."""
        # lightningd's id format: PREFIX ':' METHOD '#' NUMBER (lightningd-rpc(7), JSON IDS).
        request_id = f"{self._prefix}:{method}#{next(self._ids)}"
        request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        payload = json.dumps(request, separators=(",", ":")).encode()
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                reply = await self._exchange(method, request_id, payload, paying)
        except TimeoutError:
            raise BackendUnavailable(
                f"{self.where}: no answer to {method} within {limit:g} s"
            ) from None
        return self._result(method, reply)

    async def _exchange(
        self, method: str, request_id: str, payload: bytes, paying: bool
    ) -> dict[str, Any]:
        try:
            reader, writer = await self._connect()
        except BackendUnavailable as exc:
            if paying:
                raise NothingSent(f"{exc}; nothing was sent") from None
            raise
        try:
            try:
                writer.write(payload)
                await writer.drain()
            except OSError as exc:
                raise BackendUnavailable(
                    f"{self.where}: connection lost while sending {method}: {exc.strerror or exc}"
                ) from None
            return await self._read_reply(method, request_id, reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if len(os.fsencode(self.path)) <= MAX_SUN_PATH:
                return await asyncio.open_unix_connection(self.path)
            # Too long for sun_path: connect through the directory's file descriptor, as
            # pyln-client does. Opening a local directory does not wait on the network.
            directory, name = os.path.split(self.path)
            fd = os.open(directory or "/", os.O_RDONLY | os.O_DIRECTORY)
            try:
                return await asyncio.open_unix_connection(f"/proc/self/fd/{fd}/{name}")
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"{self.where}: no such socket (is lightningd running, and is this its "
                "lightning-rpc file?)"
            ) from None
        except PermissionError:
            raise BackendUnavailable(
                f"{self.where}: permission denied (run as the user of lightningd, or give "
                "this user access to the socket)"
            ) from None
        except ConnectionRefusedError:
            raise BackendUnavailable(
                f"{self.where}: connection refused (the socket exists but lightningd is not "
                "listening: stopped or crashed?)"
            ) from None
        except NotADirectoryError:
            raise BackendUnavailable(
                f"{self.where}: a part of the path is not a directory"
            ) from None
        except OSError as exc:
            raise BackendUnavailable(
                f"{self.where}: cannot connect: {exc.strerror or type(exc).__name__}"
            ) from None

    async def _read_reply(
        self, method: str, request_id: str, reader: asyncio.StreamReader
    ) -> dict[str, Any]:
        buffer = b""
        while True:
            try:
                chunk = await reader.read(READ_CHUNK)
            except OSError as exc:
                raise BackendUnavailable(
                    f"{self.where}: connection lost while waiting for {method}: "
                    f"{exc.strerror or exc}"
                ) from None
            if not chunk:
                # The last reply may come without its "\n\n" when lightningd closes at once.
                if buffer.strip():
                    reply = self._parse(method, buffer, final=True)
                    if reply is not None and reply.get("id") == request_id:
                        return reply
                raise BackendUnavailable(
                    f"{self.where}: lightningd closed the connection before answering {method}"
                )
            buffer += chunk
            if len(buffer) > MAX_REPLY_BYTES:
                raise LightningError(
                    f"{self.where}: bad answer to {method}: more than {MAX_REPLY_BYTES} bytes"
                )
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                reply = self._parse(method, buffer[:end], final=False)
                if reply is None:
                    # "\n\n" inside an unfinished object (plugins may print it): read on.
                    if buffer.find(b"\n\n", end + 2) < 0:
                        break
                    # A later delimiter may complete it: blank out this one and look again.
                    buffer = buffer[:end] + b"  " + buffer[end + 2 :]
                    continue
                buffer = buffer[end + 2 :]
                # Notifications carry no id; replies to someone else's id are not ours.
                if reply.get("id") == request_id:
                    return reply

    def _parse(self, method: str, raw: bytes, *, final: bool) -> dict[str, Any] | None:
        """One reply object; None if it may still be incomplete. Never echoes the bytes: a
        reply can hold a preimage."""
        text = raw.strip()
        if not text:
            return None
        if not text.startswith(b"{"):
            raise LightningError(f"{self.where}: bad answer to {method}: not a JSON object")
        try:
            value = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            if final:
                raise LightningError(f"{self.where}: bad answer to {method}: not JSON") from None
            return None
        if not isinstance(value, dict):
            raise LightningError(f"{self.where}: bad answer to {method}: not a JSON object")
        return value

    def _result(self, method: str, reply: dict[str, Any]) -> dict[str, Any]:
        error = reply.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise LightningError(f"{self.where}: bad answer to {method}: malformed error")
            code = error.get("code")
            code = code if isinstance(code, int) and not isinstance(code, bool) else None
            message = one_line(error.get("message", "no message"))
            raise ClnRpcError(
                f"{self.where}: {method} failed: {message} (code {code})",
                code,
                error.get("data"),
                error,
            )
        result = reply.get("result")
        if not isinstance(result, dict):
            raise LightningError(f"{self.where}: bad answer to {method}: no result object")
        return result


def _msat(value: object, where: str, method: str, what: str) -> int:
    """A CLN `msat`: an integer, or (deprecated) a string like "1000msat"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.endswith("msat") and value[:-4].isdigit():
        return int(value[:-4])
    raise bad_answer(where, method, f"{what} is not an amount")


class ClnNode:
    """Core Lightning through its `lightning-rpc` socket: issues invoices and pays them."""

    name = "cln"

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pay_retry_for: int = PAY_RETRY_FOR,
    ) -> None:
        self.socket_path = socket_path
        self.rpc = ClnRpc(socket_path, timeout)
        self.pay_retry_for = pay_retry_for
        # Until then an empty or all-failed listpays may be a gap between attempts.
        self.settles_within = pay_retry_for + SETTLE_MARGIN_SECONDS

    @property
    def where(self) -> str:
        return self.rpc.where

    @property
    def identity(self) -> str:
        return f"cln:{self.socket_path}"

    def describe(self) -> str:
        return f"Core Lightning at {self.socket_path} (JSON-RPC over its unix socket)"

    async def close(self) -> None:
        """Nothing to release: every call has its own connection."""

    async def info(self) -> NodeInfo:
        result = await self.rpc.call("getinfo", {})
        node_id = result.get("id")
        if not (isinstance(node_id, str) and len(node_id) == 66):
            raise bad_answer(self.where, "getinfo", "no node id")
        try:
            bytes.fromhex(node_id)
        except ValueError:
            raise bad_answer(self.where, "getinfo", "node id is not hex") from None
        alias = result.get("alias")
        network = result.get("network")
        return NodeInfo(
            backend="cln",
            address=self.socket_path,
            alias=alias if isinstance(alias, str) and alias else None,
            network=NETWORKS.get(network) if isinstance(network, str) else None,
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
        # Labels must be unique per node; a random one never collides with the operator's.
        label = f"l402proxy-{secrets.token_hex(16)}"
        result = await self.rpc.call(
            "invoice",
            {"amount_msat": amount_msat, "label": label, "description": memo, "expiry": expiry},
        )
        bolt11 = result.get("bolt11")
        if not isinstance(bolt11, str):
            raise bad_answer(self.where, "invoice", "no bolt11")
        payment_hash = hex32(result.get("payment_hash"), self.where, "invoice", "payment_hash")
        expires_at = result.get("expires_at")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise bad_answer(self.where, "invoice", "no expires_at")
        try:
            decoded = decode_invoice(bolt11)
        except ValueError:
            raise bad_answer(self.where, "invoice", "bolt11 does not decode") from None
        if decoded.payment_hash != payment_hash or decoded.amount_msat != amount_msat:
            raise bad_answer(self.where, "invoice", "bolt11 does not match the invoice asked for")
        return Invoice(
            bolt11=bolt11,
            payment_hash=payment_hash,
            amount_msat=amount_msat,
            expires_at=float(expires_at),
        )

    async def lookup_invoice(self, payment_hash: bytes) -> InvoiceState:
        payment_hash = check_hash(payment_hash)
        wanted = payment_hash.hex()
        result = await self.rpc.call("listinvoices", {"payment_hash": wanted})
        invoices = result.get("invoices")
        if not isinstance(invoices, list):
            raise bad_answer(self.where, "listinvoices", "no invoices list")
        mine = [
            i
            for i in invoices
            if isinstance(i, dict) and str(i.get("payment_hash", "")).lower() == wanted
        ]
        if not mine:
            raise InvoiceNotFound(f"{self.where}: no invoice with payment hash {wanted}")
        invoice = mine[0]
        status = invoice.get("status")
        if status == "paid":
            preimage = hex32(
                invoice.get("payment_preimage"), self.where, "listinvoices", "payment_preimage"
            )
            if hashlib.sha256(preimage).digest() != payment_hash:
                raise bad_answer(self.where, "listinvoices", "the preimage does not match the hash")
            received = invoice.get("amount_received_msat", invoice.get("amount_msat"))
            return InvoiceState(
                payment_hash=payment_hash,
                settled=True,
                preimage=preimage,
                amount_msat=_msat(received, self.where, "listinvoices", "amount_received_msat"),
            )
        if status in ("unpaid", "expired"):
            amount = invoice.get("amount_msat")
            return InvoiceState(
                payment_hash=payment_hash,
                settled=False,
                preimage=None,
                amount_msat=0
                if amount is None
                else _msat(amount, self.where, "listinvoices", "amount_msat"),
            )
        raise bad_answer(self.where, "listinvoices", f"unknown invoice status {one_line(status)!r}")

    # -- client side ---------------------------------------------------------------------

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        """Pay with `pay`; PaymentFailed only for answers after which nothing is in flight."""
        check_int(max_fee_msat, "max_fee_msat", 0)
        text, decoded = payable_invoice(bolt11)
        params = {"bolt11": text, "maxfee": max_fee_msat, "retry_for": self.pay_retry_for}
        try:
            result = await self.rpc.call(
                "pay", params, timeout=self.pay_retry_for + self.rpc.timeout, paying=True
            )
        except ClnRpcError as exc:
            if exc.code in DEFINITE_PAY_FAILURES and _nothing_in_flight(exc.code, exc.error):
                raise PaymentFailed(str(exc)) from None
            raise LightningError(f"{exc}; the payment may still complete") from None
        status = result.get("status")
        if status != "complete":
            raise LightningError(
                f"{self.where}: pay answered status {one_line(status)!r}; the payment may "
                "still complete"
            )
        preimage = hex32(result.get("payment_preimage"), self.where, "pay", "payment_preimage")
        if hashlib.sha256(preimage).digest() != decoded.payment_hash:
            raise bad_answer(self.where, "pay", "the preimage does not match the invoice")
        amount = _msat(result.get("amount_msat"), self.where, "pay", "amount_msat")
        sent = _msat(result.get("amount_sent_msat"), self.where, "pay", "amount_sent_msat")
        return PaymentResult(
            payment_hash=decoded.payment_hash,
            preimage=preimage,
            amount_msat=amount,
            fee_msat=max(sent - amount, 0),
        )

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        """From `listpays`: "unknown" only when lightningd lists no payment for the hash.

        listpays only sums up sendpay parts, so within `settles_within` of the pay call
        "unknown" and "failed" may still turn into a payment (see SETTLE_MARGIN_SECONDS)."""
        payment_hash = check_hash(payment_hash)
        wanted = payment_hash.hex()
        result = await self.rpc.call("listpays", {"payment_hash": wanted})
        pays = result.get("pays")
        if not isinstance(pays, list):
            raise bad_answer(self.where, "listpays", "no pays list")
        mine = [
            p
            for p in pays
            if isinstance(p, dict) and str(p.get("payment_hash", "")).lower() == wanted
        ]
        if not mine:
            return PaymentState(payment_hash, "unknown", None, 0)
        statuses = [p.get("status") for p in mine]
        if "complete" in statuses:
            done = mine[statuses.index("complete")]
            preimage = hex32(done.get("preimage"), self.where, "listpays", "preimage")
            if hashlib.sha256(preimage).digest() != payment_hash:
                raise bad_answer(self.where, "listpays", "the preimage does not match the hash")
            sent = _msat(done.get("amount_sent_msat"), self.where, "listpays", "amount_sent_msat")
            amount = done.get("amount_msat")
            fee = sent - _msat(amount, self.where, "listpays", "amount_msat") if amount else 0
            return PaymentState(payment_hash, "succeeded", preimage, max(fee, 0))
        if "pending" in statuses:
            return PaymentState(payment_hash, "pending", None, 0)
        if all(s == "failed" for s in statuses):
            return PaymentState(payment_hash, "failed", None, 0)
        unknown = next(s for s in statuses if s not in ("complete", "pending", "failed"))
        raise bad_answer(self.where, "listpays", f"unknown payment status {one_line(unknown)!r}")


# Refused while reading the request: nothing can have been sent, whatever else the error says.
_REQUEST_REFUSED: Final = frozenset(
    {JSONRPC2_INVALID_REQUEST, JSONRPC2_METHOD_NOT_FOUND, JSONRPC2_INVALID_PARAMS}
)


def _nothing_in_flight(code: int | None, error: dict[str, Any]) -> bool:
    """Whether a pay error says that no part of the payment is still out.

    plugins/libplugin-pay.c (payment_finished) answers once root->abort is set, even while
    parts are still pending, and writes beside code and message either "attempts" (one entry
    per part, "pending" until it resolves) or the payment's "status" ("pending" while some
    leaf is not failed, or even "complete"); lightningd's own errors put such fields under
    "data". Only when every status given is "failed" is the payment over; anything else,
    or a shape we do not know, leaves it open. (A payment split in parts lists its root as
    "pending" whatever its parts did: it stays open here, and recovery reads listpays.)"""
    if code in _REQUEST_REFUSED:
        return True
    data = error.get("data")
    if data is not None and not isinstance(data, dict):
        return False
    for place in (error, data or {}):
        if "status" in place and place["status"] != "failed":
            return False
        if "attempts" in place:
            attempts = place["attempts"]
            if not isinstance(attempts, list):
                return False
            for attempt in attempts:
                if not isinstance(attempt, dict) or attempt.get("status") != "failed":
                    return False
    return True


def backend_from_uri(uri: str) -> ClnNode:
    path, timeout = parse_uri(uri)
    return ClnNode(path, timeout=timeout)


def wallet_from_uri(uri: str) -> ClnNode:
    path, timeout = parse_uri(uri)
    return ClnNode(path, timeout=timeout)


__all__ = [
    "DEFINITE_PAY_FAILURES",
    "ClnNode",
    "ClnRpc",
    "ClnRpcError",
    "backend_from_uri",
    "parse_uri",
    "wallet_from_uri",
]
