"""L402 for Python programs: an httpx.Auth that pays 402 challenges like the client proxy does.

    from l402proxy.sdk import L402Auth

    with L402Auth(max_price_sat=50) as auth, httpx.Client(auth=auth) as client:
        episode = client.get("http://127.0.0.1:8081/episodes/ep1.mp3")

Same limits, ledger and token store as `addons/client.py` (by default the same files), so
what one bought the other uses, and both count against the same budgets. It pays Payment-scheme
charges too (draft-httpauth-payment, lightning charge): when a 402 offers no L402 challenge, or
with `prefer="payment"` (see payer.py: a charge is good for one request).
"""

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, Coroutine, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from . import paths
from .l402.payment import ACCEPT_HEADER, RECEIPT_HEADER
from .lightning import open_wallet
from .payer import (
    ACCEPT_PAYMENT,
    BALANCE_HEADER,
    MAX_PROBLEM_BODY,
    Answer,
    Await,
    Limits,
    Payer,
    Token,
    Verdict,
    parse_prefer,
    problem_type,
    split_url,
)
from .store.client import ClientStore

CLOSE_TIMEOUT_SECONDS = 30.0


@dataclass
class _Io:
    """A step of the flow that runs on the payer's event loop."""

    job: Coroutine[Any, Any, Any]


@dataclass
class _Read:
    """A step of the flow: read this (small) response's body, the sync or the async way."""

    response: httpx.Response


class L402Auth(httpx.Auth):
    """Pays L402 challenges for an httpx.Client or httpx.AsyncClient.

    The payment logic runs on a private event loop in one background thread, so one instance
    serves sync and async clients alike and never blocks the caller's loop on SQLite.
    Call close() (or use `with`) when done.
    """

    requires_request_body = True  # a paid request is sent again, body and all

    def __init__(
        self,
        wallet: str = "dev",
        *,
        max_price_sat: int = 100,
        max_fee_sat: int = 10,
        budget_daily_sat: int = 1000,
        budget_total_sat: int | None = None,
        allow: Iterable[str] = (),
        store: str | None = None,
        dev_ledger: str | None = None,
        pay_timeout: float = 60.0,
        prefer: str = "l402",
    ) -> None:
        # Which scheme pays a 402 offering both L402 and Payment: "l402" or "payment".
        self.prefer = parse_prefer(prefer)
        self.limits = Limits(
            max_price_sat=max_price_sat,
            max_fee_sat=max_fee_sat,
            budget_daily_sat=budget_daily_sat,
            budget_total_sat=budget_total_sat,
            allow=tuple(allow),
        )
        self.store_uri = store or paths.default_client_store()
        # Opening a wallet is cheap and checks the URI now, not at the first request.
        self._wallet = open_wallet(wallet, dev_ledger=dev_ledger or paths.default_dev_ledger())
        self.pay_timeout = pay_timeout
        self._payer: Payer | None = None
        self._starting: asyncio.Task[Payer] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- the flow, written once for both kinds of client ------------------------------------

    def _flow(self, request: httpx.Request) -> Generator[_Io | _Read | httpx.Request, Any, None]:
        url = str(request.url)
        try:
            split_url(url)
        except ValueError:
            yield request
            return
        sent: Token | None = yield _Io(self._before(request))
        assert self._payer is not None  # started by _before
        answered = False
        try:
            response: httpx.Response = yield request
            answered = True
        finally:
            if sent is not None and not answered:
                # The request failed (httpx raised): the token it carried was not granted,
                # and no request of ours waits for its answer.
                self._payer.answered(sent, granted=False)
        if response.status_code not in (401, 402):
            if sent is not None:
                # Granted with it: a request of ours that lost that token to this one (a
                # bundle too small for both) may pay once more, alone.
                self._payer.answered(sent, granted=True)
            if sent is not None and sent.charge:
                # A charge paid earlier, accepted now: its receipt goes to the ledger.
                yield _Io(self._payer.note_receipt(sent, _answer(response)))
            elif sent is not None and BALANCE_HEADER in response.headers:
                # What is left of the token this request carried (a bundle, single use).
                yield _Io(self._payer.note_balance(sent, _answer(response)))
            return
        yield _Read(response)
        steps = self._payer.exchange(url, _answer(response), sent)
        try:
            step = next(steps)
            while True:
                if isinstance(step, Await):
                    step = steps.send((yield _Io(step.job)))
                    continue
                if step.authorization is None:
                    request.headers.pop("Authorization", None)
                else:
                    request.headers["Authorization"] = step.authorization
                response = yield request
                yield _Read(response)
                step = steps.send(_answer(response))
        except StopIteration as stop:
            verdict: Verdict = stop.value
        finally:
            # Closed at a Resend that failed (httpx raised): the payer releases what it was
            # about to send.
            steps.close()
        if verdict.refused is not None:
            response.headers["X-L402-Refused"] = verdict.refused.header()
            if verdict.spent is not None and verdict.spent.paid_here:
                # Paid all the same (a race lost to ours, then the extra payment refused).
                response.headers["X-L402-Paid"] = verdict.spent.header()
        elif verdict.paid is not None and verdict.paid.paid_here:
            response.headers["X-L402-Paid"] = verdict.paid.header()

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request)
        try:
            step = next(flow)
            while True:
                try:
                    if isinstance(step, _Io):
                        step = flow.send(self._run(step.job))
                    elif isinstance(step, _Read):
                        if _problem_body(step.response):
                            step.response.read()
                        step = next(flow)
                    else:
                        step = flow.send((yield step))
                except StopIteration:
                    return
        finally:
            flow.close()  # closed by httpx (a send failed): the flow's own cleanup runs now

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request)
        try:
            step = next(flow)
            while True:
                try:
                    if isinstance(step, _Io):
                        step = flow.send(await asyncio.wrap_future(self._submit(step.job)))
                    elif isinstance(step, _Read):
                        if _problem_body(step.response):
                            await step.response.aread()
                        step = next(flow)
                    else:
                        step = flow.send((yield step))
                except StopIteration:
                    return
        finally:
            flow.close()  # closed by httpx (a send failed): the flow's own cleanup runs now

    # -- steps, on the payer's loop ----------------------------------------------------------

    async def _before(self, request: httpx.Request) -> Token | None:
        payer = await self._ready()
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        if not payer.allows(host, port):
            return None
        # Both schemes it can pay, to hosts it may pay only (as the client proxy does).
        request.headers.setdefault("Accept-Authenticate", "L402")
        request.headers.setdefault(ACCEPT_HEADER, ACCEPT_PAYMENT)
        if "Authorization" in request.headers:
            return None  # the caller's own credentials win
        url = str(request.url)
        origin, _, _, path = split_url(url)
        flight = payer.flight_for(origin, path)
        if flight is not None:
            await asyncio.wait({flight}, timeout=payer.pay_timeout)
        token = payer.up_front(origin, path)
        if token is None and payer.unused:
            # A Payment charge paid for this very URL and never sent (see payer.py).
            token = await payer.take_charge(url)
        if token is not None:
            request.headers["Authorization"] = token.credential
        return token

    async def _ready(self) -> Payer:
        # One start for all: concurrent first requests must share one payer (one flight map).
        starting = self._starting
        if starting is None or (starting.done() and starting.exception() is not None):
            starting = self._starting = asyncio.get_running_loop().create_task(self._start())
        return await asyncio.shield(starting)

    async def _start(self) -> Payer:
        store = await ClientStore.open(self.store_uri)
        payer = Payer(
            self._wallet, store, self.limits, pay_timeout=self.pay_timeout, prefer=self.prefer
        )
        try:
            await payer.start()
        except BaseException:
            await store.close()
            raise
        self._payer = payer
        return payer

    # -- the background loop -----------------------------------------------------------------

    def _submit(self, job: Coroutine[Any, Any, Any]) -> "concurrent.futures.Future[Any]":
        with self._lock:
            if self._closed:
                job.close()
                raise RuntimeError("L402Auth is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="l402proxy-sdk", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return asyncio.run_coroutine_threadsafe(job, self._loop)

    def _run(self, job: Coroutine[Any, Any, Any]) -> Any:
        return self._submit(job).result()

    def close(self) -> None:
        """Finish bookkeeping, close the wallet and the store, stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._payer is not None:
                await self._payer.close()
            else:
                await self._wallet.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(CLOSE_TIMEOUT_SECONDS)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CLOSE_TIMEOUT_SECONDS)
            loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _answer(response: httpx.Response) -> Answer:
    # response.request: after redirects, the URL that actually answered.
    problem = None
    if _problem_body(response):
        try:
            problem = problem_type(response.headers.get("Content-Type"), response.content)
        except httpx.ResponseNotRead:
            problem = None
    return Answer(
        response.status_code,
        tuple(response.headers.get_list("WWW-Authenticate")),
        str(response.request.url),
        tuple(response.headers.get_list(BALANCE_HEADER)),
        tuple(response.headers.get_list(RECEIPT_HEADER)),
        problem,
    )


def _problem_body(response: httpx.Response) -> bool:
    """A 401/402 with a problem+json body small enough to read for its type (a Payment
    refusal). Only a stated length is trusted: an endless body is never read here."""
    if response.status_code not in (401, 402):
        return False
    if "problem+json" not in response.headers.get("Content-Type", "").lower():
        return False
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= MAX_PROBLEM_BODY


__all__ = ["L402Auth"]
