"""Dynamic prices: the rules file's `price: python:<module>:<function>`, called per challenge.

The function is the operator's code. It may be slow, hang, raise or return nonsense; none of
that may block the event loop, hold up the rest of the process or sell anything at a price
nobody meant. So `quote` calls it time-boxed, checks what it returns, and turns every failure
into one PriceError line naming the rule (the engine answers 503 and logs it). No I/O here
besides calling that function, and no door imports.
"""

import asyncio
import contextlib
import contextvars
import inspect
import operator
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..rules import MAX_PRICE_SAT, PriceRef, Rule

__all__ = ["MAX_PRICE_THREADS", "PRICE_TIMEOUT", "PriceError", "PriceRequest", "quote"]

# Seconds a price function may take, waiting for a free thread included.
PRICE_TIMEOUT = 5.0
# Plain price functions running at once (per event loop). One that hangs keeps its thread (a
# thread cannot be stopped) and its slot: once every slot is held, quotes wait for one and time
# out (503) instead of piling up threads without end.
MAX_PRICE_THREADS = 32
# A garbage return value is shown this long at most in the message.
_SHOWN_CHARS = 60


class PriceError(Exception):
    """A price function failed: one line, "<file>:<line>: service '<name>': price <ref> ..."."""

    def __init__(self, rule: Rule, problem: str) -> None:
        self.rule = rule.name
        self.problem = problem
        where = rule.price.where if rule.price is not None else f"line {rule.line}"
        text = rule.price.text if rule.price is not None else "(none)"
        super().__init__(f"{where}: service '{rule.name}': price {text} {problem}")


class _Escaped(Exception):
    """SystemExit or KeyboardInterrupt raised by a price function: carried as an ordinary
    exception, because asyncio re-raises those two out of the event loop (stopping the
    process) when a task or a future ends with one. A quote that calls sys.exit() fails; the
    paywall goes on."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class _Headers(Mapping[str, str]):
    """Read-only, hashable header view: lower-case name -> value."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]) -> None:
        joined: dict[str, str] = {}
        for name, value in items.items():
            key = name.lower()
            # "Accept" and "accept" given apart are one header: its values as one list.
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        self._items = joined

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower() if isinstance(key, str) else key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class PriceRequest:
    """What a price function is told about the request it prices (read-only, hashable).

    - `method`: the request method, upper case ("GET").
    - `host`: the host the rules matched on, without the port.
    - `path`: the request path as sent, without the query ("/api/quote").
    - `query`: the raw query string without the '?' ("" when none).
    - `headers`: lower-case header name -> value; a header sent several times has its values
      joined with ", ". Read-only; lookups ignore case (`headers["User-Agent"]` works). The
      paywall's own credentials (Authorization: L402/LSAT ..., its L402_* and L402claim.*
      cookies) are not among them.
    - `client_ip`: the client's address as the paywall judges it (X-Forwarded-For only from
      trusted_proxies), None when unknown (a unix socket).
    - `rule`: the name of the service being priced.

    The function gets this one argument and returns whole sats (an int from 1 to
    21,000,000 * 100,000,000, not a bool), from a plain function or an async one. It is called
    once per 402 challenge, never for a request that carries a token. A plain function runs in
    a thread of its own (it may block); an async one runs on the event loop and must not block.
    Either gets PRICE_TIMEOUT (5 s) to answer.
    """

    method: str
    host: str
    path: str
    query: str
    headers: Mapping[str, str]
    client_ip: str | None
    rule: str

    def __post_init__(self) -> None:
        # A copy: the caller's dict may change later; the function must see what was asked.
        object.__setattr__(self, "headers", _Headers(self.headers))


def _is_async(function: Callable[..., Any]) -> bool:
    """An `async def` function, or an object whose `__call__` is one (functools.partial of
    either is seen through by inspect)."""
    if inspect.iscoroutinefunction(function):
        return True
    call = getattr(function, "__call__", None)  # noqa: B004 (the method is wanted, not a test)
    return call is not None and inspect.iscoroutinefunction(call)


# Per event loop: an asyncio.Semaphore serves one loop only (each test has its own loop).
_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
    weakref.WeakKeyDictionary()
)
_held: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int]" = weakref.WeakKeyDictionary()
# Tasks of async price functions that ran past their time and were cancelled: kept until they
# end (the loop holds tasks weakly), their outcome read so none is logged as never retrieved.
_abandoned: set["asyncio.Task[Any]"] = set()


def _slots_of(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(MAX_PRICE_THREADS)
    return slots


def _in_thread(
    loop: asyncio.AbstractEventLoop, function: Callable[..., Any], request: PriceRequest
) -> "asyncio.Future[Any]":
    """Run function(request) in a new daemon thread; its outcome lands in the future returned.

    Not asyncio.to_thread: a function that hangs would keep one of the loop's default executor
    threads for good (a handful on a small machine), and once they are all held everything
    else the process runs there (rules reload, metrics, ASGI banners) would stall; and the
    executor's threads are joined at exit, so the process could not stop. A daemon thread of
    its own, counted against MAX_PRICE_THREADS, harms nothing but its own quote.
    """
    future: asyncio.Future[Any] = loop.create_future()
    slots = _slots_of(loop)
    context = contextvars.copy_context()

    def settle(outcome: Any, failure: BaseException | None) -> None:
        slots.release()
        _held[loop] = _held.get(loop, 1) - 1
        if future.done():  # timed out and cancelled: nobody waits for it any more
            if inspect.iscoroutine(outcome):
                outcome.close()
            return
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(outcome)

    def run() -> None:
        outcome: Any = None
        failure: BaseException | None = None
        try:
            outcome = context.run(function, request)
        except Exception as exc:
            failure = exc
        except BaseException as exc:
            # In this thread a KeyboardInterrupt is never the operator's Ctrl-C (signals go to
            # the main thread): it is the function's, like SystemExit.
            failure = _Escaped(exc)
        # RuntimeError: the loop is closed, nothing is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, outcome, failure)

    thread = threading.Thread(target=run, name="l402-price", daemon=True)
    thread.start()
    _held[loop] = _held.get(loop, 0) + 1
    return future


async def _call_plain(
    function: Callable[..., Any], request: PriceRequest, started: list[bool]
) -> Any:
    """function(request) in a thread once one of MAX_PRICE_THREADS is free; `started` gets True
    when the thread starts (a time-out before that means every thread was held)."""
    loop = asyncio.get_running_loop()
    slots = _slots_of(loop)
    # Waits, within the caller's time box, while MAX_PRICE_THREADS calls are running. The slot
    # is given back by the thread when it ends, not when the caller stops waiting: a hung call
    # keeps it.
    await slots.acquire()
    try:
        future = _in_thread(loop, function, request)
    except BaseException:
        slots.release()
        raise
    started.append(True)
    return await future


def _show(value: object) -> str:
    """A returned value for the message: its type and a short repr, on one line."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _sats(rule: Rule, value: object, *, awaited: bool) -> int:
    """The price a function returned, checked: whole sats from 1 to MAX_PRICE_SAT. `awaited`:
    the value is what an async function's coroutine ended with."""
    if isinstance(value, bool):
        raise PriceError(rule, f"returned {_show(value)}; a price is a whole number of sats")
    try:
        # Any integer type (numpy's too) counts; a float or a Decimal does not: 2.5 sats are
        # no price, and rounding would charge what nobody wrote.
        sats = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: no "coroutine was never awaited" warning
            problem = (
                "returned an awaitable from its coroutine; await it and return the price"
                if awaited
                else "returned an awaitable from a plain function; make the function `async "
                "def` to await things, and return the price"
            )
            raise PriceError(rule, problem) from None
        raise PriceError(
            rule, f"returned {_show(value)}; a price is a whole number of sats (an int)"
        ) from None
    if not 1 <= sats <= MAX_PRICE_SAT:
        raise PriceError(
            rule, f"returned {sats}; a price is from 1 to {MAX_PRICE_SAT:,} sats (21M bitcoin)"
        )
    return sats


async def quote(rule: Rule, request: PriceRequest, timeout: float = PRICE_TIMEOUT) -> int:
    """The price of `rule` for `request` in sats: its price_sat for a fixed price, else what its
    `price:` function returns, checked (an int, not a bool, from 1 to MAX_PRICE_SAT).

    A plain function runs in a daemon thread of its own (never blocking the loop, never taking
    the default executor's threads); an async one runs as a task on this loop. Both get
    `timeout` seconds. An exception, a timeout or a bad value is a PriceError, one line naming
    the rule (name and file:line) and what went wrong; the function's own exception is its
    __cause__. Cancelling the caller cancels an async function's task.
    """
    reference: PriceRef | None = rule.price
    if reference is None:
        return rule.price_sat
    function = reference.function
    started: list[bool] = []
    try:
        if _is_async(function):
            call: Awaitable[Any] = function(request)
            if not inspect.isawaitable(call):
                raise PriceError(rule, f"returned {_show(call)}, not an awaitable")
            waiting: asyncio.Future[Any] = asyncio.ensure_future(_guarded(call))
        else:
            waiting = asyncio.ensure_future(_call_plain(function, request, started))
    except PriceError:
        raise
    except Exception as exc:
        # Calling an async function runs none of its body, but a wrapper around it may raise.
        problem = f"raised {type(exc).__name__}: {_one_line(str(exc))}".rstrip(": ")
        raise PriceError(rule, problem) from exc
    try:
        # asyncio.wait, not wait_for: wait_for waits for the cancelled call to finish, forever
        # if the function swallows the cancellation.
        done, _ = await asyncio.wait({waiting}, timeout=timeout)
    except asyncio.CancelledError:
        _abandon(waiting)
        raise
    if not done:
        _abandon(waiting)
        held = ""
        if not started and not _is_async(function):
            held = (
                f" (never started: all {_held.get(asyncio.get_running_loop(), 0)} price threads "
                "are held by calls still running)"
            )
        raise PriceError(rule, f"did not answer within {timeout:g} s{held}")
    try:
        value = waiting.result()
    except asyncio.CancelledError:
        raise PriceError(rule, "was cancelled") from None
    except Exception as exc:
        raised = exc.original if isinstance(exc, _Escaped) else exc
        problem = f"raised {type(raised).__name__}: {_one_line(str(raised))}".rstrip(": ")
        raise PriceError(rule, problem) from raised
    return _sats(rule, value, awaited=_is_async(function))


async def _guarded(call: Awaitable[Any]) -> Any:
    """An async price function's run, its SystemExit an ordinary exception (see _Escaped)."""
    try:
        return await call
    except SystemExit as exc:
        raise _Escaped(exc) from None


def _abandon(waiting: "asyncio.Future[Any]") -> None:
    """Stop waiting for a call: cancel it (a thread's call runs on, holding its slot), keep the
    task until it ends and read its outcome so nothing is logged about it."""
    waiting.cancel()
    if waiting.done():
        return
    _abandoned.add(waiting)  # type: ignore[arg-type]

    def forget(task: "asyncio.Future[Any]") -> None:
        _abandoned.discard(task)  # type: ignore[arg-type]
        if not task.cancelled():
            task.exception()

    waiting.add_done_callback(forget)
