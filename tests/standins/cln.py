"""A stand-in for lightningd's JSON-RPC socket, backed by a dev ledger wallet.

It speaks lightningd's framing (requests are bare JSON objects, each reply is one object
followed by "\\n\\n", lightningd-rpc(7)) and answers getinfo, invoice, listinvoices, pay and
listpays with the fields of CLN's doc/schemas/*.json and the error codes of
common/jsonrpc_errors.h. Invoices are real regtest BOLT11 from the dev ledger, so any other
wallet on the same ledger can pay them.

Knobs for tests: `pay_hang` (pay stays in flight until `release()`), `pay_gap` ("nothing" or
"failed": pay stays under way until `release()` pays it or `give_up()` fails it, while
listpays shows no payment, or only a failed part, as lightningd does before its first
sendonion and between two attempts),
`pay_error` (answer pay with this error and send nothing), `garbage` (answer every call with
these bytes), `silent` (never answer). As a process:

    python -m tests.standins.cln --socket PATH --ledger PATH --wallet NAME
"""

import argparse
import asyncio
import codecs
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import bolt11 as bolt11_lib

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import InvoiceNotFound, PaymentFailed
from l402proxy.lightning.dev import DevLedger

# sockaddr_un.sun_path holds 108 bytes including the NUL.
MAX_SUN_PATH = 107

JSONRPC2_METHOD_NOT_FOUND = -32601
JSONRPC2_INVALID_PARAMS = -32602
PAY_DESTINATION_PERM_FAIL = 203
PAY_INVOICE_EXPIRED = 207
PAY_STOPPED_RETRYING = 210
INVOICE_LABEL_ALREADY_EXISTS = 900

NODE_VERSION = "v25.05"


class RpcError(Exception):
    """An error reply. The pay plugin writes its details beside code and message (`fields`,
    libplugin's jsonrpc_stream_fail); lightningd's own commands put them under `data`."""

    def __init__(
        self,
        code: int,
        message: str,
        data: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.fields = fields or {}


class ClnStandin:
    """The stand-in server; `await start()`, then point a `cln://` URI at `socket_path`."""

    def __init__(
        self,
        socket_path: str | Path,
        ledger: DevLedger,
        wallet: str,
        *,
        alias: str = "standin-cln",
        network: str = "regtest",
    ) -> None:
        self.socket_path = str(socket_path)
        self.ledger = ledger
        self.wallet = wallet
        self.alias = alias
        self.network = network
        self.pay_hang = False
        self.pay_gap: str | None = None
        # payment hash -> what listpays shows while pay is between attempts (pay_gap)
        self.gaps: dict[str, dict[str, Any]] = {}
        self.pay_error: tuple[int, str, dict[str, Any] | None] | None = None
        # Written beside code and message of pay_error, as the pay plugin does.
        self.pay_error_fields: dict[str, Any] | None = None
        self.garbage: bytes | None = None
        self.silent = False
        self.requests: list[dict[str, Any]] = []
        self.labels: set[str] = set()
        self.pending: dict[str, dict[str, Any]] = {}
        self._release = asyncio.Event()
        self._gave_up = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pay_index = 0

    async def __aenter__(self) -> "ClnStandin":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.ledger.open()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if len(os.fsencode(self.socket_path)) <= MAX_SUN_PATH:
            self._server = await asyncio.start_unix_server(self._serve, path=self.socket_path)
            return
        # Long paths (deep tmp dirs): bind through the directory's descriptor.
        directory, name = os.path.split(self.socket_path)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=f"/proc/self/fd/{fd}/{name}"
            )
        finally:
            os.close(fd)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def release(self) -> None:
        """Let payments held by `pay_hang` or `pay_gap` go through now."""
        self._release.set()

    def give_up(self) -> None:
        """End payments held by `pay_gap` as lightningd does after its last attempt: failed."""
        self._gave_up = True
        self._release.set()

    # -- connection handling -------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        lock = asyncio.Lock()
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buffer = ""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buffer += utf8.decode(chunk)
                # Requests come without a terminator, like lightningd's own streaming parser
                # reads them: take every complete object off the front.
                while True:
                    text = buffer.lstrip()
                    if not text:
                        buffer = ""
                        break
                    try:
                        request, end = decoder.raw_decode(text)
                    except json.JSONDecodeError:
                        buffer = text
                        break
                    buffer = text[end:]
                    self._spawn(self._answer(request, writer, lock))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            # The caller hung up: commands it started keep running (as in lightningd), their
            # replies go nowhere.
            self._writers.discard(writer)
            writer.close()

    async def _answer(
        self, request: object, writer: asyncio.StreamWriter, lock: asyncio.Lock
    ) -> None:
        if not isinstance(request, dict):
            return
        self.requests.append(request)
        if self.silent:
            return
        if self.garbage is not None:
            await self._send(writer, lock, self.garbage)
            writer.close()
            return
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request.get("id")}
        try:
            reply["result"] = await self._dispatch(
                str(request.get("method")), request.get("params") or {}
            )
        except RpcError as exc:
            error: dict[str, Any] = {"code": exc.code, "message": exc.message, **exc.fields}
            if exc.data is not None:
                error["data"] = exc.data
            reply["error"] = error
        # lightningd ends every reply with two newlines.
        await self._send(writer, lock, json.dumps(reply).encode() + b"\n\n")

    async def _send(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, data: bytes) -> None:
        async with lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(data)
                await writer.drain()

    async def _dispatch(self, method: str, params: object) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise RpcError(JSONRPC2_INVALID_PARAMS, "Expected named parameters (an object)")
        handler = {
            "getinfo": self._getinfo,
            "invoice": self._invoice,
            "listinvoices": self._listinvoices,
            "pay": self._pay,
            "listpays": self._listpays,
        }.get(method)
        if handler is None:
            raise RpcError(JSONRPC2_METHOD_NOT_FOUND, f"Unknown command '{method}'")
        return await handler(params)

    # -- commands (shapes from doc/schemas/<command>.json) ---------------------------------

    async def _getinfo(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.ledger.open()
        return {
            "id": self.ledger.node_id,
            "alias": self.alias,
            "color": "022d22",
            "num_peers": 0,
            "num_pending_channels": 0,
            "num_active_channels": 0,
            "num_inactive_channels": 0,
            "address": [],
            "binding": [{"type": "local socket", "socket": self.socket_path}],
            "version": NODE_VERSION,
            "blockheight": 110,
            "network": self.network,
            "fees_collected_msat": 0,
            "lightning-dir": str(Path(self.socket_path).parent),
            "our_features": {"init": "", "node": "", "channel": "", "invoice": ""},
        }

    async def _invoice(self, params: dict[str, Any]) -> dict[str, Any]:
        amount = params.get("amount_msat")
        label = params.get("label")
        description = params.get("description")
        expiry = params.get("expiry", 604800)
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise RpcError(JSONRPC2_INVALID_PARAMS, "amount_msat: should be a positive msat")
        if not isinstance(label, str | int) or not isinstance(description, str):
            raise RpcError(JSONRPC2_INVALID_PARAMS, "label and description are required")
        if str(label) in self.labels:
            raise RpcError(INVOICE_LABEL_ALREADY_EXISTS, "Duplicate label")
        invoice = await self.ledger.create_invoice(self.wallet, amount, description, int(expiry))
        self.labels.add(str(label))
        return {
            "payment_hash": invoice.payment_hash.hex(),
            "expires_at": int(invoice.expires_at),
            "bolt11": invoice.bolt11,
            "payment_secret": bolt11_lib.decode(invoice.bolt11).payment_secret,
            "created_index": len(self.labels),
        }

    async def _listinvoices(self, params: dict[str, Any]) -> dict[str, Any]:
        wanted = params.get("payment_hash")
        if not isinstance(wanted, str):
            raise RpcError(JSONRPC2_INVALID_PARAMS, "this stand-in only lists by payment_hash")
        try:
            payment_hash = bytes.fromhex(wanted)
            state = await self.ledger.lookup_invoice(payment_hash, wallet=self.wallet)
        except (ValueError, InvoiceNotFound):
            return {"invoices": []}
        listed = [
            i
            for i in await self.ledger.list_invoices(wallet=self.wallet)
            if i["payment_hash"] == wanted
        ]
        row = listed[0]
        invoice: dict[str, Any] = {
            "label": f"standin-{wanted[:16]}",
            "bolt11": row["bolt11"],
            "payment_hash": wanted,
            "amount_msat": row["amount_msat"],
            "description": row["memo"],
            "expires_at": row["expires_at"],
            "created_index": 1,
        }
        if state.settled:
            self._pay_index += 1
            invoice |= {
                "status": "paid",
                "pay_index": self._pay_index,
                "amount_received_msat": state.amount_msat,
                "paid_at": int(row["settled_at"]),
                "payment_preimage": state.preimage.hex() if state.preimage else None,
                "updated_index": 2,
            }
        else:
            invoice["status"] = "expired" if time.time() >= row["expires_at"] else "unpaid"
        return {"invoices": [invoice]}

    async def _pay(self, params: dict[str, Any]) -> dict[str, Any]:
        text = params.get("bolt11")
        if not isinstance(text, str):
            raise RpcError(JSONRPC2_INVALID_PARAMS, "bolt11: should be a string")
        try:
            info = decode_invoice(text)
        except ValueError as exc:
            raise RpcError(JSONRPC2_INVALID_PARAMS, f"Invalid bolt11: {exc}") from None
        maxfee = params.get("maxfee", 0)
        if not isinstance(maxfee, int) or isinstance(maxfee, bool) or maxfee < 0:
            raise RpcError(JSONRPC2_INVALID_PARAMS, "maxfee: should be a millisatoshi amount")
        if self.pay_error is not None:
            code, message, data = self.pay_error
            raise RpcError(code, message, data, self.pay_error_fields)
        created_at = time.time()
        if self.pay_gap is not None:
            if self.pay_gap not in ("nothing", "failed"):
                raise ValueError("pay_gap must be 'nothing' or 'failed'")
            # Still trying, but no part is out: only the failed ones (or none) are listed.
            gap = {
                "bolt11": text,
                "destination": info.payee,
                "created_at": int(created_at),
                "listed": self.pay_gap,
            }
            self.gaps[info.payment_hash.hex()] = gap
            try:
                await self._release.wait()
            finally:
                if not self._gave_up:
                    self.gaps.pop(info.payment_hash.hex(), None)
            if self._gave_up:
                gap["listed"] = "failed"  # its last part failed: listpays says so from now on
                raise RpcError(
                    PAY_STOPPED_RETRYING,
                    "Ran out of routes to try after 2 attempts: see `paystatus`",
                    fields={"attempts": _failed_attempts(info.amount_msat, 2)},
                )
        if self.pay_hang:
            # In flight: listpays says "pending" until the test lets it through.
            self.pending[info.payment_hash.hex()] = {
                "bolt11": text,
                "destination": info.payee,
                "created_at": int(created_at),
            }
            try:
                await self._release.wait()
            finally:
                self.pending.pop(info.payment_hash.hex(), None)
        if info.is_expired(created_at):
            raise RpcError(
                PAY_INVOICE_EXPIRED,
                "Invoice expired",
                {"now": int(created_at), "expiry": info.expires_at},
            )
        try:
            result = await self.ledger.pay(self.wallet, text, maxfee)
        except PaymentFailed as exc:
            # What the pay plugin says for the same situations (libplugin-pay.c,
            # payment_finished): one the destination refuses (the failure's code, 203, with the
            # payment's status), or one it cannot route to (210, every attempt listed).
            if "already paid" in str(exc):
                raise RpcError(
                    PAY_DESTINATION_PERM_FAIL,
                    "failed: WIRE_INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS",
                    fields={
                        "status": "failed",
                        "payment_hash": info.payment_hash.hex(),
                        "failcode": 16399,
                        "failcodename": "WIRE_INCORRECT_OR_UNKNOWN_PAYMENT_DETAILS",
                    },
                ) from None
            raise RpcError(
                PAY_STOPPED_RETRYING,
                "Ran out of routes to try after 1 attempt: see `paystatus`",
                fields={"attempts": _failed_attempts(info.amount_msat or 0, 1, str(exc))},
            ) from None
        return {
            "destination": info.payee,
            "payment_hash": result.payment_hash.hex(),
            "created_at": created_at,
            "parts": 1,
            "amount_msat": result.amount_msat,
            "amount_sent_msat": result.amount_msat + result.fee_msat,
            "payment_preimage": result.preimage.hex(),
            "status": "complete",
        }

    async def _listpays(self, params: dict[str, Any]) -> dict[str, Any]:
        wanted = params.get("payment_hash")
        if not isinstance(wanted, str):
            raise RpcError(JSONRPC2_INVALID_PARAMS, "this stand-in only lists by payment_hash")
        gap = self.gaps.get(wanted)
        if gap is not None:
            if gap["listed"] == "nothing":
                return {"pays": []}
            return {
                "pays": [
                    {
                        "payment_hash": wanted,
                        "status": "failed",
                        "created_at": gap["created_at"],
                        "created_index": 1,
                        "bolt11": gap["bolt11"],
                        "destination": gap["destination"],
                        "amount_sent_msat": 0,
                    }
                ]
            }
        held = self.pending.get(wanted)
        if held is not None:
            return {
                "pays": [
                    {
                        "payment_hash": wanted,
                        "status": "pending",
                        "created_at": held["created_at"],
                        "created_index": 1,
                        "bolt11": held["bolt11"],
                        "destination": held["destination"],
                    }
                ]
            }
        try:
            state = await self.ledger.lookup_payment(self.wallet, bytes.fromhex(wanted))
        except ValueError:
            raise RpcError(JSONRPC2_INVALID_PARAMS, "payment_hash: should be a hex hash") from None
        entry: dict[str, Any] = {
            "payment_hash": wanted,
            "created_at": int(time.time()),
            "created_index": 1,
        }
        if state.status == "unknown":
            return {"pays": []}
        if state.status == "succeeded" and state.preimage is not None:
            amount = await self._amount_of(wanted)
            entry |= {
                "status": "complete",
                "completed_at": int(time.time()),
                "preimage": state.preimage.hex(),
                "amount_msat": amount,
                "amount_sent_msat": amount + state.fee_msat,
                "updated_index": 1,
            }
        elif state.status == "failed":
            entry |= {"status": "failed", "amount_sent_msat": 0}
        else:
            entry["status"] = "pending"
        return {"pays": [entry]}

    async def _amount_of(self, payment_hash_hex: str) -> int:
        for invoice in await self.ledger.list_invoices():
            if invoice["payment_hash"] == payment_hash_hex:
                return int(invoice["amount_msat"])
        return 0


def _failed_attempts(amount_msat: int, count: int, reason: str = "") -> list[dict[str, Any]]:
    """The "attempts" of a pay error (libplugin-pay.c payment_add_attempt): the root, then one
    entry per attempt, each "failed" once it resolved."""
    why = f'Error computing a route: "Could not find a route" (205){": " if reason else ""}'
    root = {"status": "failed", "partid": 0, "amount_msat": amount_msat}
    return [root] + [
        {
            "status": "failed",
            "failreason": why + reason,
            "partid": part,
            "amount_msat": amount_msat,
            "parent_partid": 0,
        }
        for part in range(1, count + 1)
    ]


async def _run(socket_path: str, ledger_path: str, wallet: str, alias: str) -> None:
    ledger = DevLedger(ledger_path)
    standin = ClnStandin(socket_path, ledger, wallet, alias=alias)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await standin.start()
    print(f"cln stand-in listening on {socket_path} (wallet {wallet})", flush=True)
    try:
        await stop.wait()
    finally:
        await standin.close()
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="where to create lightning-rpc")
    parser.add_argument("--ledger", required=True, help="the dev ledger file")
    parser.add_argument("--wallet", required=True, help="the dev ledger wallet of this node")
    parser.add_argument("--alias", default="standin-cln")
    args = parser.parse_args()
    asyncio.run(_run(args.socket, args.ledger, args.wallet, args.alias))


if __name__ == "__main__":
    main()
