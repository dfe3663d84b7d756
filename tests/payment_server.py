"""A stand-in server that sells with the Payment HTTP authentication scheme (draft-httpauth-payment,
Lightning "charge"), for the client's tests until the engine speaks Payment.

`/<route>/<anything>` is paid for: a request without a credential (or with one refused) gets a
402 whose `WWW-Authenticate: Payment` challenge (minted with l402/payment.py, bound by HMAC)
carries a fresh dev-ledger invoice, with an RFC 9457 problem body; a route that also sells L402
sends LSAT and L402 challenges first, as Aperture does. A Payment credential is checked with
l402/payment.py (binding, expiry, price, preimage), its invoice must be settled in the dev ledger
and the charge is consumed once: a second use gets a fresh 402 (`invalid-challenge`). Success
carries a Payment-Receipt and `Cache-Control: private`. An L402 token is checked as the server
checks it and is reusable until it expires.

Routes can misbehave on purpose: `tamper` mints a challenge whose request disagrees with its
invoice (amount, hash or network; a client must never pay it), `reject` consumes a good charge
and still answers 402 with that problem type (a hostile or broken server).

`PaymentServer.answer` is the whole server without HTTP; `payment_server` serves it on 127.0.0.1
with aiohttp in this process (unit tests); `python -m tests.payment_server --port N --ledger FILE`
runs it as a process of its own (end-to-end tests), `GET /_state` saying what it saw.
"""

import argparse
import contextlib
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from l402proxy.l402.charge_request import ChargeRequest
from l402proxy.l402.headers import CredentialError, format_challenge, parse_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.invoice import decode_invoice
from l402proxy.l402.payment import (
    INTENT_CHARGE,
    METHOD_LIGHTNING,
    PROBLEM_CONTENT_TYPE,
    PROBLEMS,
    RECEIPT_HEADER,
    Challenge,
    PaymentSchemeError,
    challenge_id,
    check_credential,
    decode_credential,
    encode_receipt,
    format_rfc3339,
    header_value,
    is_payment_authorization,
    mint_challenge,
    problem_json,
)
from l402proxy.l402.token import TokenError, caveats_for, derive_root_key, mint, verify
from l402proxy.lightning import InvoiceNotFound
from l402proxy.lightning.dev import DevLedger

SECRET = hashlib.sha256(b"payment server test secret").digest()
REALM = "payment-standin"
MERCHANT = "merchant"
NETWORK = "regtest"  # the dev ledger's invoices (lnbcrt)
STATE_PATH = "/_state"

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Route:
    name: str
    price_sat: int = 21
    # Also sells L402 (LSAT + L402 lines before the Payment one, and takes L402 tokens).
    l402: bool = False
    # Sells with the Payment scheme (a Payment challenge, and takes Payment credentials).
    payment: bool = True
    # The challenge expires this long after it is minted (never later than the invoice).
    expires_in: int = 300
    invoice_expiry: int = 600
    # "amount" | "hash" | "network": the challenge's request disagrees with its invoice.
    tamper: str | None = None
    # Every good charge is consumed and still answered 402 with this problem type.
    reject: str | None = None
    # Success without a Payment-Receipt (receipts are optional for a client to get).
    receipt: bool = True
    valid_for: int = 3600  # an L402 token's validity


# What `python -m tests.payment_server` sells.
ROUTES = (
    Route("pay"),
    Route("both", l402=True),
    Route("amount", tamper="amount"),
    Route("hash", tamper="hash"),
    Route("network", tamper="network"),
    Route("expired", reject="payment-expired"),
    Route("dear", price_sat=500),
)


@dataclass
class Answer:
    status: int
    headers: Headers
    body: bytes
    content_type: str = "text/plain"

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class PaymentServer:
    ledger: DevLedger
    routes: dict[str, Route]
    url: str = ""
    # Per route: requests, 402s sent, requests granted.
    requests: Counter[str] = field(default_factory=Counter)
    challenges: Counter[str] = field(default_factory=Counter)
    granted: Counter[str] = field(default_factory=Counter)
    # Per route, in order: every request's Authorization (None: it had none) and
    # Accept-Payment (None: absent).
    authorizations: defaultdict[str, list[str | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    accept_payment: defaultdict[str, list[str | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # Per route: how each granted request paid ("Payment" or "L402").
    paid_with: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # Payment hashes of charges consumed (used once), and of every invoice put in a challenge.
    consumed: set[bytes] = field(default_factory=set)
    invoices: list[bytes] = field(default_factory=list)

    async def answer(
        self, path: str, authorization: str | None, accept_payment: str | None = None
    ) -> Answer:
        segment = path.strip("/").split("/", 1)[0]
        route = self.routes.get(segment)
        if route is None:
            return Answer(404, [], b"no such route\n")
        self.requests[route.name] += 1
        self.authorizations[route.name].append(authorization)
        self.accept_payment[route.name].append(accept_payment)
        if authorization is None:
            return await self._challenge(route)
        if is_payment_authorization(authorization):
            if not route.payment:
                return await self._challenge(route)
            return await self._charge(route, path, authorization)
        if route.l402 and self._l402_ok(route, authorization):
            return self._grant(route, path, "L402", [])
        return await self._challenge(route)

    async def _charge(self, route: Route, path: str, authorization: str) -> Answer:
        now = time.time()
        try:
            credential = decode_credential(authorization)
            try:
                invoice = decode_invoice(credential.challenge.charge_request().invoice)
            except ValueError as exc:
                raise PaymentSchemeError("invalid-challenge", str(exc)) from None
            charge = check_credential(
                credential,
                secrets=[SECRET],
                now=now,
                invoice_payment_hash=invoice.payment_hash,
                price_sat=route.price_sat,
            )
            try:
                settled = (await self.ledger.lookup_invoice(charge.payment_hash)).settled
            except InvoiceNotFound:
                settled = False
            if not settled:
                raise PaymentSchemeError("verification-failed", "the invoice is not paid")
            if charge.payment_hash in self.consumed:
                raise PaymentSchemeError("invalid-challenge", "this charge was used already")
            self.consumed.add(charge.payment_hash)
        except PaymentSchemeError as exc:
            return await self._challenge(route, exc.problem_type, exc.message)
        if route.reject is not None:
            return await self._challenge(route, route.reject, "refused on purpose")
        headers: Headers = []
        if route.receipt:
            receipt = encode_receipt(charge.challenge_id, charge.payment_hash, now)
            headers.append((RECEIPT_HEADER, receipt))
        return self._grant(route, path, "Payment", headers)

    def _grant(self, route: Route, path: str, scheme: str, headers: Headers) -> Answer:
        self.granted[route.name] += 1
        self.paid_with[route.name].append(scheme)
        # A receipt is for the one who paid: never kept by a shared cache.
        headers = [*headers, ("Cache-Control", "private")]
        return Answer(200, headers, f"paid {path} with {scheme}\n".encode())

    def _l402_ok(self, route: Route, authorization: str) -> bool:
        try:
            credential = parse_credential(authorization)
            for macaroon in credential.macaroons:
                verify(
                    macaroon,
                    credential.preimage,
                    lambda token_id: derive_root_key(SECRET, token_id),
                    service=route.name,
                    now=time.time(),
                )
        except (CredentialError, TokenError):
            return False
        return True

    async def _challenge(
        self, route: Route, problem: str = "payment-required", detail: str = "payment required"
    ) -> Answer:
        invoice = await self.ledger.create_invoice(
            MERCHANT, route.price_sat * 1000, route.name, route.invoice_expiry
        )
        self.invoices.append(invoice.payment_hash)
        headers: Headers = []
        if route.l402:
            identifier = Identifier.new(invoice.payment_hash)
            valid_until = int(time.time()) + route.valid_for
            caveats = caveats_for(route.name, valid_until=valid_until, capabilities=None)
            macaroon = mint(derive_root_key(SECRET, identifier.token_id), identifier, caveats)
            headers.append(("WWW-Authenticate", format_challenge("LSAT", macaroon, invoice.bolt11)))
            headers.append(("WWW-Authenticate", format_challenge("L402", macaroon, invoice.bolt11)))
        if route.payment:
            expires_at = min(time.time() + route.expires_in, invoice.expires_at)
            challenge = self._mint(route, invoice.bolt11, invoice.payment_hash, expires_at)
            headers.append(("WWW-Authenticate", header_value(challenge)))
        headers.append(("Cache-Control", "no-store"))
        self.challenges[route.name] += 1
        if not route.payment:
            return Answer(402, headers, b"payment required\n")
        body = problem_json(problem, PROBLEMS[problem][1], detail, PROBLEMS[problem][0])
        return Answer(402, headers, body, PROBLEM_CONTENT_TYPE)

    def _mint(self, route: Route, bolt11: str, payment_hash: bytes, expires_at: float) -> Challenge:
        if route.tamper is None:
            return mint_challenge(
                SECRET, REALM, bolt11, route.price_sat, payment_hash, NETWORK, expires_at
            )
        # mint_challenge trusts its caller; a hostile server does not deserve that trust.
        amount, network = route.price_sat, NETWORK
        if route.tamper == "amount":
            amount = route.price_sat + 1
        elif route.tamper == "hash":
            payment_hash = os.urandom(32)
        elif route.tamper == "network":
            network = "mainnet"
        else:
            raise ValueError(f"unknown tamper {route.tamper!r}")
        request = ChargeRequest(amount, bolt11, payment_hash, network)
        unbound = Challenge(
            id="",
            realm=REALM,
            method=METHOD_LIGHTNING,
            intent=INTENT_CHARGE,
            request=request.encode(),
            expires=format_rfc3339(expires_at),
        )
        return replace(unbound, id=challenge_id(SECRET, unbound))

    def state(self) -> dict[str, Any]:
        return {
            "routes": {
                name: {
                    "requests": self.requests[name],
                    "challenges": self.challenges[name],
                    "granted": self.granted[name],
                    "authorizations": self.authorizations[name],
                    "accept_payment": self.accept_payment[name],
                    "paid_with": self.paid_with[name],
                }
                for name in self.routes
            },
            "consumed": sorted(h.hex() for h in self.consumed),
            "invoices": [h.hex() for h in self.invoices],
        }


def _app(server: PaymentServer) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if request.path == STATE_PATH:
            return web.json_response(server.state())
        answer = await server.answer(
            request.path,
            request.headers.get("Authorization"),
            request.headers.get("Accept-Payment"),
        )
        response = web.Response(
            status=answer.status, body=answer.body, content_type=answer.content_type
        )
        for key, value in answer.headers:
            response.headers.add(key, value)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.asynccontextmanager
async def payment_server(
    ledger_path: str | Path, routes: Iterable[Route] = ROUTES
) -> AsyncIterator[PaymentServer]:
    """Serve a PaymentServer on 127.0.0.1 (a free port) in this process, for the block."""
    ledger = DevLedger(Path(ledger_path))
    await ledger.open()
    runner: web.AppRunner | None = None
    try:
        server = PaymentServer(ledger, {route.name: route for route in routes})
        runner = web.AppRunner(_app(server), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield server
    finally:
        if runner is not None:
            await runner.cleanup()
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ledger", required=True, help="the dev ledger file (shared)")
    args = parser.parse_args()
    ledger = DevLedger(Path(args.ledger))
    server = PaymentServer(ledger, {route.name: route for route in ROUTES})
    app = _app(server)

    async def open_ledger(_: web.Application) -> None:
        await ledger.open()

    async def close_ledger(_: web.Application) -> None:
        await ledger.close()

    app.on_startup.append(open_ledger)
    app.on_cleanup.append(close_ledger)
    print(json.dumps({"routes": sorted(server.routes)}), flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
