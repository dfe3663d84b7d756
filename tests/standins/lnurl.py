"""A local LNURL-pay service (LUD-06, LUD-16, LUD-21 verify) on 127.0.0.1 for the tests.

Its invoices are real regtest invoices of a dev ledger wallet, committing to the payRequest
metadata with a description hash (`h` tag) as LUD-06 requires, so any dev wallet on the same
ledger file pays them. `knobs` make it lie (wrong amount, wrong description hash, ERROR answers,
lying verify answers) to test that the backend refuses.

In-process (async tests): `async with LnurlService(ledger) as service: service.address`.
As a process (end-to-end tests): `python -m tests.standins.lnurl --ledger PATH --port N`.
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from l402proxy.launch import free_port
from l402proxy.lightning.base import Invoice, InvoiceNotFound
from l402proxy.lightning.dev import DevLedger

HOST = "127.0.0.1"
DEFAULT_DESCRIPTION = "Ad-free episodes (l402proxy test service)"
INVOICE_EXPIRY = 600


@dataclass
class Knobs:
    """Ways to make the service misbehave; all off by default."""

    amount_offset_msat: int = 0  # the invoice asks this much more than requested
    wrong_description_hash: bool = False  # the invoice commits to other metadata
    callback_error: str | None = None  # the callback answers {"status": "ERROR", "reason"}
    pay_request_error: str | None = None  # so does the payRequest
    pay_request_extra: dict[str, Any] = field(default_factory=dict)  # merged into payRequest
    verify: bool = True  # offer LUD-21 verify URLs
    verify_lie: Literal["preimage", "invoice", "settled"] | None = None
    expiry: int = INVOICE_EXPIRY  # seconds the service's invoices are valid


async def hashed_invoice(
    ledger: DevLedger,
    wallet: str,
    amount_msat: int,
    description_hash: bytes,
    memo: str,
    expiry: int = INVOICE_EXPIRY,
) -> Invoice:
    """A dev ledger invoice whose `h` tag is `description_hash` (LUD-06)."""
    return await ledger.create_invoice(
        wallet, amount_msat, memo, expiry, description_hash=description_hash
    )


class LnurlService:
    """The service: /.well-known/lnurlp/<user>, its callback and LUD-21 verify URLs."""

    def __init__(
        self,
        ledger: DevLedger,
        *,
        wallet: str = "merchant",
        user: str = "merchant",
        min_sendable: int = 1_000,
        max_sendable: int = 100_000_000,
        comment_allowed: int = 0,
        description: str = DEFAULT_DESCRIPTION,
        port: int = 0,
        knobs: Knobs | None = None,
    ) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self.user = user
        self.min_sendable = min_sendable
        self.max_sendable = max_sendable
        self.comment_allowed = comment_allowed
        self.description = description
        self.port = port
        self.knobs = knobs or Knobs()
        self.callbacks: list[dict[str, str]] = []  # the query of every callback request
        self.pay_requests = 0
        self.invoices: dict[bytes, str] = {}
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.user}@{HOST}:{self.port}"

    @property
    def metadata(self) -> str:
        # LUD-16: a text/identifier entry naming the address.
        return json.dumps([["text/plain", self.description], ["text/identifier", self.address]])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/lnurlp/{user}", self._pay_request)
        app.router.add_get("/lnurlp/{user}/callback", self._callback)
        app.router.add_get("/lnurlp/verify/{payment_hash}", self._verify)
        return app

    async def start(self) -> "LnurlService":
        await self.ledger.open()
        # Known before serving: the metadata names the address, port included.
        self.port = self.port or free_port(HOST)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, HOST, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> "LnurlService":
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _pay_request(self, request: web.Request) -> web.Response:
        self.pay_requests += 1
        if request.match_info["user"] != self.user:
            return web.json_response({"status": "ERROR", "reason": "Unknown user"}, status=404)
        if self.knobs.pay_request_error:
            return web.json_response({"status": "ERROR", "reason": self.knobs.pay_request_error})
        body: dict[str, Any] = {
            "tag": "payRequest",
            "callback": f"{self.base}/lnurlp/{self.user}/callback",
            "minSendable": self.min_sendable,
            "maxSendable": self.max_sendable,
            "metadata": self.metadata,
        }
        if self.comment_allowed:
            body["commentAllowed"] = self.comment_allowed
        body |= self.knobs.pay_request_extra
        return web.json_response(body)

    async def _callback(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.callbacks.append(query)
        if self.knobs.callback_error:
            return web.json_response({"status": "ERROR", "reason": self.knobs.callback_error})
        try:
            amount = int(query["amount"])
        except (KeyError, ValueError):
            return web.json_response({"status": "ERROR", "reason": "amount missing"})
        if not self.min_sendable <= amount <= self.max_sendable:
            return web.json_response({"status": "ERROR", "reason": "amount out of range"})
        metadata = self.metadata + (" " if self.knobs.wrong_description_hash else "")
        invoice = await hashed_invoice(
            self.ledger,
            self.wallet,
            amount + self.knobs.amount_offset_msat,
            hashlib.sha256(metadata.encode()).digest(),
            query.get("comment", ""),
            self.knobs.expiry,
        )
        self.invoices[invoice.payment_hash] = invoice.bolt11
        body: dict[str, Any] = {"pr": invoice.bolt11, "routes": []}
        if self.knobs.verify:
            body["verify"] = f"{self.base}/lnurlp/verify/{invoice.payment_hash.hex()}"
        return web.json_response(body)

    async def _verify(self, request: web.Request) -> web.Response:
        try:
            payment_hash = bytes.fromhex(request.match_info["payment_hash"])
            state = await self.ledger.lookup_invoice(payment_hash, wallet=self.wallet)
        except (ValueError, InvoiceNotFound):
            return web.json_response({"status": "ERROR", "reason": "Not found"}, status=404)
        pr = self.invoices.get(payment_hash, "")
        settled, preimage = state.settled, state.preimage
        lie = self.knobs.verify_lie
        if lie == "preimage":
            settled, preimage = True, secrets.token_bytes(32)
        elif lie == "settled":
            settled, preimage = True, None
        elif lie == "invoice":
            pr = next((text for known, text in self.invoices.items() if known != payment_hash), "")
        return web.json_response(
            {
                "status": "OK",
                "settled": settled,
                "preimage": preimage.hex() if preimage else None,
                "pr": pr,
            }
        )


async def _serve(args: argparse.Namespace) -> None:
    ledger = DevLedger(args.ledger)
    service = LnurlService(
        ledger,
        wallet=args.wallet,
        user=args.user,
        port=args.port,
        max_sendable=args.max_sendable,
        knobs=Knobs(verify=not args.no_verify),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
        await ledger.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ledger", type=Path, required=True, help="dev ledger file")
    parser.add_argument("--wallet", default="merchant", help="dev wallet receiving the payments")
    parser.add_argument("--user", default="merchant", help="the address is <user>@127.0.0.1:<port>")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-verify", action="store_true", help="offer no LUD-21 verify URL")
    parser.add_argument("--max-sendable", type=int, default=100_000_000, help="msat")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
