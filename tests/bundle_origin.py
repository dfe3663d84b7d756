"""A stand-in paywall that speaks issue 14's wire facts 1-3 (bundles, single use, passes), for the
client's tests while the real server side is being built.

`/<service>/<anything>` is paid for with a token for `<service>`: a request without one (or with
one refused) gets a 402 whose challenge carries a fresh dev-ledger invoice and a macaroon minted
the way the server mints them. A service with a bundle answers every granted request with
`X-L402-Balance: <left> requests`; a token with nothing left gets a fresh 402 with
`X-L402-Balance: 0 requests` (wire facts 1 and 2). A service that sells a pass mints tokens whose
`services=` caveat lists every service of the pass, one `<service>_valid_until=` each; the
verifier takes such a token for any service it lists (wire fact 3).

`ContractServer.answer` is the whole server, without HTTP: unit tests call it directly;
`bundle_origin` serves it on 127.0.0.1 with aiohttp, and `bundle_origin_thread` does so from a
thread for synchronous (e2e) tests.
"""

import asyncio
import contextlib
import hashlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from l402proxy.l402.headers import CredentialError, format_challenge, parse_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import TokenError, derive_root_key, inspect, mint, verify
from l402proxy.lightning.dev import DevLedger

SECRET = hashlib.sha256(b"bundle origin test secret").digest()
MERCHANT = "merchant"
INVOICE_EXPIRY = 600
BALANCE_HEADER = "X-L402-Balance"
START_TIMEOUT = 10.0

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Service:
    name: str
    price_sat: int = 21
    # Requests one token is good for; None: no bundle (no X-L402-Balance). 1 = single use.
    bundle: int | None = None
    # The services the token this service's 402 sells carries (a pass; its own name among
    # them); () : this service alone.
    sells: tuple[str, ...] = ()
    valid_for: int = 3600
    # Sent as X-L402-Balance on a granted answer instead of the real balance (a server bug).
    balance_header: str | None = None
    # Refuses any token not minted for this service alone (a pass is not taken here), with
    # this status.
    own_tokens_only: bool = False
    refusal_status: int = 402
    # Answers every token, even one just paid, with a fresh 402 and "0 requests" (hostile).
    spend_on_sight: bool = False
    # Other first path segments this service answers for (/<also>/...).
    also: tuple[str, ...] = ()


@dataclass
class Answer:
    status: int
    headers: Headers
    body: str

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class ContractServer:
    ledger: DevLedger
    services: dict[str, Service]
    url: str = ""
    # token_id -> requests left of its bundle (absent: never used).
    balances: dict[bytes, int] = field(default_factory=dict)
    # Per service: requests, 402/401 challenges sent, requests granted.
    requests: Counter[str] = field(default_factory=Counter)
    challenges: Counter[str] = field(default_factory=Counter)
    granted: Counter[str] = field(default_factory=Counter)
    # Per service: the Authorization of every request (None: it carried none), in order.
    authorizations: defaultdict[str, list[str | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # Payment hashes of every invoice put in a challenge, in order.
    invoices: list[bytes] = field(default_factory=list)
    # Authorization values refused with a 402 as if revoked.
    revoked: set[str] = field(default_factory=set)

    async def answer(self, path: str, authorization: str | None) -> Answer:
        segment = path.strip("/").split("/", 1)[0]
        service = next(
            (s for s in self.services.values() if segment == s.name or segment in s.also), None
        )
        if service is None:
            return Answer(404, [], "no such service\n")
        name = service.name
        self.requests[name] += 1
        self.authorizations[name].append(authorization)
        if authorization is None:
            return await self._challenge(service, 402)
        status, token_id = self._check(authorization, service)
        if authorization in self.revoked:
            status, token_id = 402, None
        if status != 200 or token_id is None:
            return await self._challenge(service, status)
        if service.spend_on_sight:
            return await self._challenge(service, 402, spent=True)
        extra: Headers = []
        if service.bundle is not None:
            left = self.balances.get(token_id, service.bundle)
            if left == 0:
                return await self._challenge(service, 402, spent=True)
            self.balances[token_id] = left - 1
            extra.append((BALANCE_HEADER, service.balance_header or f"{left - 1} requests"))
        elif service.balance_header is not None:
            extra.append((BALANCE_HEADER, service.balance_header))
        self.granted[name] += 1
        return Answer(200, extra, f"paid {path}\n")

    def _check(self, authorization: str, service: Service) -> tuple[int, bytes | None]:
        """200 and the token id for a credential good for `service`; else 401 (invalid) or
        402 (expired, another service's), as the real server answers."""
        try:
            credential = parse_credential(authorization)
            token_id = None
            for macaroon in credential.macaroons:
                verified = verify(
                    macaroon,
                    credential.preimage,
                    lambda tid: derive_root_key(SECRET, tid),
                    service=service.name,
                    now=time.time(),
                )
                token_id = verified.identifier.token_id
                if service.own_tokens_only and inspect(macaroon).services != (service.name,):
                    return service.refusal_status, None
        except CredentialError:
            return 401, None
        except TokenError as exc:
            return (401 if exc.invalid else 402), None
        return 200, token_id

    async def _challenge(self, service: Service, status: int, *, spent: bool = False) -> Answer:
        invoice = await self.ledger.create_invoice(
            MERCHANT, service.price_sat * 1000, f"{service.name}", INVOICE_EXPIRY
        )
        self.invoices.append(invoice.payment_hash)
        identifier = Identifier.new(invoice.payment_hash)
        sold = service.sells or (service.name,)
        valid_until = int(time.time()) + service.valid_for
        caveats = [
            "services=" + ",".join(f"{name}:0" for name in sold),
            *(f"{name}_valid_until={valid_until}" for name in sold),
        ]
        macaroon = mint(derive_root_key(SECRET, identifier.token_id), identifier, caveats)
        headers: Headers = [
            ("WWW-Authenticate", format_challenge("LSAT", macaroon, invoice.bolt11)),
            ("WWW-Authenticate", format_challenge("L402", macaroon, invoice.bolt11)),
            ("Cache-Control", "no-store"),
        ]
        body = "payment required\n"
        if spent:
            headers.append((BALANCE_HEADER, "0 requests"))
            body = "this token's bundle is spent; pay again\n"
        self.challenges[service.name] += 1
        return Answer(status, headers, body)


async def _handle(server: ContractServer, request: web.Request) -> web.Response:
    answer = await server.answer(request.path, request.headers.get("Authorization"))
    response = web.Response(status=answer.status, text=answer.body)
    for key, value in answer.headers:
        response.headers.add(key, value)
    return response


@contextlib.asynccontextmanager
async def bundle_origin(
    ledger_path: str | Path, services: Iterable[Service]
) -> AsyncIterator[ContractServer]:
    """Serve a ContractServer on 127.0.0.1 (a free port) for the duration of the block."""
    ledger = DevLedger(Path(ledger_path))
    await ledger.open()
    runner: web.AppRunner | None = None
    try:
        server = ContractServer(ledger, {service.name: service for service in services})
        app = web.Application()

        async def handle(request: web.Request) -> web.Response:
            return await _handle(server, request)

        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield server
    finally:
        if runner is not None:
            await runner.cleanup()
        await ledger.close()


@contextlib.contextmanager
def bundle_origin_thread(
    ledger_path: str | Path, services: Iterable[Service]
) -> Iterator[ContractServer]:
    """bundle_origin on an event loop of its own thread, for synchronous tests; stopped (and
    the thread joined, bounded) on the way out."""
    loop = asyncio.new_event_loop()
    started: asyncio.Future[ContractServer] = loop.create_future()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with bundle_origin(ledger_path, services) as server:
                started.set_result(server)
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    def run() -> None:
        with contextlib.suppress(BaseException):
            loop.run_until_complete(serve())
        loop.close()

    thread = threading.Thread(target=run, name="bundle origin", daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(_wait(started), loop).result(START_TIMEOUT)
        yield server
    finally:
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


async def _wait(future: "asyncio.Future[ContractServer]") -> ContractServer:
    return await future
