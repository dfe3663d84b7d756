"""A stand-in for Eclair's HTTP API, backed by a dev ledger wallet.

It answers like eclair-node's API (ACINQ/eclair, https://acinq.github.io/eclair): POST with
form fields, HTTP basic auth with any user and the API password, JSON answers shaped by
eclair's JsonSerializers (invoice objects, PaymentSent / PaymentFailed events with a "type",
status.type hints "pending" / "received" / "expired" / "sent" / "failed"), and errors as
`{"error": "..."}` with 401 / 400 / 404 / 500. Invoices are real regtest BOLT11 from the dev
ledger, so any other wallet on the same ledger can pay them.

Knobs for tests: `pay_hang` (a blocking payinvoice stays in flight until `release()`),
`pay_gap` ("nothing" or "failed": payinvoice stays under way until `release()` pays it or
`give_up()` fails it, while getsentinfo lists no attempt, or one failed attempt, as Eclair
does before its first route and while MultiPartPaymentLifecycle waits for new routes),
`pay_fail` (answer payment-failed and send nothing), `pay_error_after_paying` (pay, then
answer 500 like an ask timeout), `garbage` (answer every call with non-JSON). As a process:

    python -m tests.standins.eclair --port N --password PW --ledger PATH --wallet NAME
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import signal
import socket
import sqlite3
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.base import InvoiceNotFound, PaymentFailed
from l402proxy.lightning.dev import DevLedger

REGTEST_CHAIN_HASH = "06226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f"
NODE_VERSION = "0.13.0-standin"
MIN_FINAL_CLTV_EXPIRY = 18
ASK_TIMEOUT = (
    "Ask timed out on [Actor[akka://eclair-node/user/$l#134241942]] after [30000 ms]. "
    "Message of type [fr.acinq.eclair.payment.send.PaymentInitiator$SendPaymentToNode]."
)

Handler = Callable[[dict[str, str]], Awaitable[web.StreamResponse]]


def _timestamp_milli(when: float) -> dict[str, Any]:
    """TimestampMilliSerializer: {"iso": ..., "unix": seconds}."""
    iso = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return {"iso": iso.replace("+00:00", "Z"), "unix": int(when)}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _stored_preimage(ledger_path: str, payment_hash: bytes) -> bytes | None:
    # Eclair shows an incoming payment's preimage before it is paid; the dev ledger only
    # gives it out once settled, so read it from the file, read-only.
    uri = f"file:{ledger_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute(
            "SELECT preimage FROM invoices WHERE payment_hash = ?", (payment_hash,)
        ).fetchone()
    return bytes(row[0]) if row else None


class EclairStandin:
    """The stand-in server; `await start()`, then use `uri` (or `port`)."""

    def __init__(
        self,
        ledger: DevLedger,
        wallet: str,
        password: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        alias: str = "standin-eclair",
        network: str = "regtest",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self.password = password
        self.host = host
        self.port = port
        self.alias = alias
        self.network = network
        self.ssl_context = ssl_context
        self.pay_hang = False
        self.pay_gap: str | None = None
        # payment hash -> what getsentinfo lists while the payment waits for routes (pay_gap)
        self.gaps: dict[str, list[dict[str, Any]]] = {}
        self.pay_fail: str | None = None
        self.pay_error_after_paying = False
        self.garbage = False
        self.auth_delay = 0.0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.attempts: dict[str, list[dict[str, Any]]] = {}
        self.pending: set[str] = set()
        self._release = asyncio.Event()
        self._gave_up = False
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> "EclairStandin":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def uri(self) -> str:
        scheme = "eclair+https" if self.ssl_context else "eclair"
        return f"{scheme}://:{self.password}@{self.host}:{self.port}"

    async def start(self) -> None:
        await self.ledger.open()
        app = web.Application(middlewares=[self._auth])
        for name, handler in {
            "getinfo": self._getinfo,
            "createinvoice": self._createinvoice,
            "getreceivedinfo": self._getreceivedinfo,
            "payinvoice": self._payinvoice,
            "getsentinfo": self._getsentinfo,
        }.items():
            app.router.add_post(f"/{name}", self._form(name, handler))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # Bound here so that port 0 gives a free port this object can tell.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Let payments held by `pay_hang` or `pay_gap` go through now."""
        self._release.set()

    def give_up(self) -> None:
        """End payments held by `pay_gap` as Eclair does after its last attempt: failed."""
        self._gave_up = True
        self._release.set()

    # -- plumbing --------------------------------------------------------------------------

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # AuthDirective.scala: basic auth, the user name is not checked.
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        password = None
        if scheme.lower() == "basic":
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                password = base64.b64decode(encoded, validate=True).decode().partition(":")[2]
        if password is None or not hmac.compare_digest(password, self.password):
            if self.auth_delay:
                await asyncio.sleep(self.auth_delay)
            response = _error(401, "The supplied authentication is invalid")
            response.headers["WWW-Authenticate"] = 'Basic realm="Access restricted"'
            return response
        if self.garbage:
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        return await handler(request)

    def _form(self, name: str, handler: Handler) -> Callable[[web.Request], Awaitable[Any]]:
        async def route(request: web.Request) -> web.StreamResponse:
            form = {key: str(value) for key, value in (await request.post()).items()}
            self.requests.append((name, form))
            return await handler(form)

        return route

    def _invoice_json(self, row: dict[str, Any]) -> dict[str, Any]:
        """InvoiceSerializer for a Bolt11Invoice."""
        return {
            "prefix": "lnbcrt",
            "timestamp": int(row["created_at"]),
            "nodeId": self.ledger.node_id,
            "serialized": row["bolt11"],
            "description": row["memo"],
            "paymentHash": row["payment_hash"],
            "expiry": int(row["expires_at"] - row["created_at"]),
            "minFinalCltvExpiry": MIN_FINAL_CLTV_EXPIRY,
            "amount": int(row["amount_msat"]),
            "features": {
                "activated": {"payment_secret": "mandatory", "var_onion_optin": "mandatory"},
                "unknown": [],
            },
            "routingInfo": [],
        }

    async def _row(self, payment_hash_hex: str, *, mine: bool) -> dict[str, Any] | None:
        invoices = await self.ledger.list_invoices(wallet=self.wallet if mine else None)
        return next((i for i in invoices if i["payment_hash"] == payment_hash_hex), None)

    # -- endpoints -------------------------------------------------------------------------

    async def _getinfo(self, form: dict[str, str]) -> web.StreamResponse:
        return web.json_response(
            {
                "version": NODE_VERSION,
                "nodeId": self.ledger.node_id,
                "alias": self.alias,
                "color": "#49daaa",
                "features": {"activated": {}, "unknown": []},
                "chainHash": REGTEST_CHAIN_HASH,
                "network": self.network,
                "blockHeight": 110,
                "publicAddresses": [],
                "instanceId": str(uuid.uuid4()),
            }
        )

    async def _createinvoice(self, form: dict[str, str]) -> web.StreamResponse:
        description = form.get("description")
        if description is None:
            return _error(400, "Must specify either description or descriptionHash")
        try:
            amount = int(form["amountMsat"])
            expiry = int(form.get("expireIn", "3600"))
        except (KeyError, ValueError):
            return _error(400, "The form field 'amountMsat' was malformed")
        invoice = await self.ledger.create_invoice(self.wallet, amount, description, expiry)
        row = await self._row(invoice.payment_hash.hex(), mine=True)
        assert row is not None
        return web.json_response(self._invoice_json(row))

    async def _getreceivedinfo(self, form: dict[str, str]) -> web.StreamResponse:
        wanted = form.get("paymentHash", "")
        try:
            payment_hash = bytes.fromhex(wanted)
            state = await self.ledger.lookup_invoice(payment_hash, wallet=self.wallet)
        except (ValueError, InvoiceNotFound):
            return _error(404, "Not found")
        row = await self._row(wanted, mine=True)
        assert row is not None
        preimage = await asyncio.to_thread(_stored_preimage, self.ledger.path, payment_hash)
        if state.settled:
            status: dict[str, Any] = {
                "type": "received",
                "amount": state.amount_msat,
                "receivedAt": _timestamp_milli(float(row["settled_at"])),
            }
        elif time.time() >= row["expires_at"]:
            status = {"type": "expired"}
        else:
            status = {"type": "pending"}
        return web.json_response(
            {
                "invoice": self._invoice_json(row),
                "paymentPreimage": preimage.hex() if preimage else None,
                "paymentType": "Standard",
                "createdAt": _timestamp_milli(float(row["created_at"])),
                "status": status,
            }
        )

    async def _payinvoice(self, form: dict[str, str]) -> web.StreamResponse:
        text = form.get("invoice", "")
        try:
            info = decode_invoice(text)
        except ValueError as exc:
            return _error(400, f"The form field 'invoice' was malformed:\n{exc}")
        if info.amount_msat is None:
            return _error(
                400,
                "The invoice must have an amount or you need to specify one using the field "
                "'amountMsat'",
            )
        if info.is_expired(time.time()):
            return _error(400, "invoice has expired")
        try:
            max_fee_sat = int(form.get("maxFeeFlatSat", "0"))
        except ValueError:
            return _error(400, "The form field 'maxFeeFlatSat' was malformed")
        hash_hex = info.payment_hash.hex()
        parent = str(uuid.uuid4())
        created = time.time()
        attempt: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "parentId": parent,
            "paymentHash": hash_hex,
            "paymentType": "Standard",
            "amount": info.amount_msat,
            "recipientAmount": info.amount_msat,
            "recipientNodeId": info.payee,
            "createdAt": _timestamp_milli(created),
            "invoice": {"serialized": text, "paymentHash": hash_hex, "amount": info.amount_msat},
        }
        if form.get("blocking") != "true":
            # Fire and forget: eclair answers the payment id at once.
            task = asyncio.get_running_loop().create_task(self._send(text, attempt, max_fee_sat))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return web.json_response(parent)
        if self.pay_fail is not None:
            failure = {"amount": info.amount_msat, "route": [], "t": self.pay_fail}
            self.attempts.setdefault(hash_hex, []).append(
                attempt | {"status": {"type": "failed", "failures": [failure]}}
            )
            return web.json_response(
                {
                    "type": "payment-failed",
                    "id": parent,
                    "paymentHash": hash_hex,
                    "failures": [failure],
                    "timestamp": _timestamp_milli(time.time()),
                }
            )
        if self.pay_gap is not None:
            if self.pay_gap not in ("nothing", "failed"):
                raise ValueError("pay_gap must be 'nothing' or 'failed'")
            failure = {"amount": info.amount_msat, "route": [], "t": "temporary channel failure"}
            failed = attempt | {
                "id": str(uuid.uuid4()),
                "status": {"type": "failed", "failures": [failure]},
            }
            self.gaps[hash_hex] = [] if self.pay_gap == "nothing" else [failed]
            try:
                await self._release.wait()
            finally:
                self.gaps.pop(hash_hex, None)
            if self._gave_up:
                self.attempts.setdefault(hash_hex, []).append(failed)
                return web.json_response(
                    {
                        "type": "payment-failed",
                        "id": parent,
                        "paymentHash": hash_hex,
                        "failures": [failure],
                        "timestamp": _timestamp_milli(time.time()),
                    }
                )
        if self.pay_hang:
            self.pending.add(hash_hex)
            try:
                await self._release.wait()
            finally:
                self.pending.discard(hash_hex)
        event = await self._send(text, attempt, max_fee_sat)
        if self.pay_error_after_paying:
            return _error(500, ASK_TIMEOUT)
        return web.json_response(event)

    async def _send(self, text: str, attempt: dict[str, Any], max_fee_sat: int) -> dict[str, Any]:
        """Pay through the ledger; the PaymentEvent eclair would emit."""
        hash_hex = attempt["paymentHash"]
        try:
            result = await self.ledger.pay(self.wallet, text, max_fee_sat * 1000)
        except PaymentFailed as exc:
            failure = {"amount": attempt["amount"], "route": [], "t": str(exc)}
            self.attempts.setdefault(hash_hex, []).append(
                attempt | {"status": {"type": "failed", "failures": [failure]}}
            )
            return {
                "type": "payment-failed",
                "id": attempt["parentId"],
                "paymentHash": hash_hex,
                "failures": [failure],
                "timestamp": _timestamp_milli(time.time()),
            }
        now = time.time()
        self.attempts.setdefault(hash_hex, []).append(
            attempt
            | {
                "status": {
                    "type": "sent",
                    "paymentPreimage": result.preimage.hex(),
                    "feesPaid": result.fee_msat,
                    "route": [],
                    "completedAt": _timestamp_milli(now),
                }
            }
        )
        return {
            "type": "payment-sent",
            "id": attempt["parentId"],
            "paymentHash": hash_hex,
            "paymentPreimage": result.preimage.hex(),
            "recipientAmount": result.amount_msat,
            "recipientNodeId": attempt["recipientNodeId"],
            "parts": [
                {
                    "id": attempt["id"],
                    "amount": result.amount_msat,
                    "feesPaid": result.fee_msat,
                    "toChannelId": hashlib.sha256(attempt["id"].encode()).hexdigest(),
                    "timestamp": _timestamp_milli(now),
                }
            ],
        }

    async def _getsentinfo(self, form: dict[str, str]) -> web.StreamResponse:
        wanted = form.get("paymentHash", "")
        if wanted in self.gaps:
            return web.json_response(self.gaps[wanted])
        if wanted in self.pending:
            return web.json_response(
                [
                    {
                        "id": str(uuid.uuid4()),
                        "parentId": str(uuid.uuid4()),
                        "paymentHash": wanted,
                        "paymentType": "Standard",
                        "status": {"type": "pending"},
                    }
                ]
            )
        return web.json_response(self.attempts.get(wanted, []))


async def _run(port: int, password: str, ledger_path: str, wallet: str, alias: str) -> None:
    ledger = DevLedger(ledger_path)
    standin = EclairStandin(ledger, wallet, password, port=port, alias=alias)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await standin.start()
    print(f"eclair stand-in listening on 127.0.0.1:{standin.port} (wallet {wallet})", flush=True)
    try:
        await stop.wait()
    finally:
        await standin.close()
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password", required=True, help="the API password (eclair.api.password)")
    parser.add_argument("--ledger", required=True, help="the dev ledger file")
    parser.add_argument("--wallet", required=True, help="the dev ledger wallet of this node")
    parser.add_argument("--alias", default="standin-eclair")
    args = parser.parse_args()
    asyncio.run(_run(args.port, args.password, str(Path(args.ledger)), args.wallet, args.alias))


if __name__ == "__main__":
    main()
