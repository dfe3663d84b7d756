"""engine.pricing.quote: a rule's `price:` function called per challenge, time-boxed, its answer
checked; every failure one PriceError line naming the rule. And PriceRequest, the read-only
view the function gets."""

import asyncio
import concurrent.futures
import dataclasses
import enum
import functools
import inspect
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from l402proxy.engine import pricing
from l402proxy.engine.pricing import PRICE_TIMEOUT, PriceError, PriceRequest, quote
from l402proxy.rules import MAX_PRICE_SAT, PriceRef, Rule, load_rules
from tests.unit.test_rules import MINIMAL, one, yaml_text

# Generous bounds for waits that only end early when something is broken; never asserted on.
BOUND = 10.0
SHORT = 0.2


def rule_with(function: Callable[..., Any], text: str = "python:prices:quote") -> Rule:
    """The MINIMAL rule ('podcast', line 2) priced by `function`, as a file at line 7 names it."""
    return dataclasses.replace(
        one(MINIMAL), price_sat=0, price=PriceRef(text, function, "rules/test.yaml", 7)
    )


def view(**changes: Any) -> PriceRequest:
    fields: dict[str, Any] = {
        "method": "GET",
        "host": "example.com",
        "path": "/episodes/1.mp3",
        "query": "t=3",
        "headers": {"accept": "audio/*"},
        "client_ip": "127.0.0.1",
        "rule": "podcast",
    }
    fields.update(changes)
    return PriceRequest(**fields)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test: plain functions that hang wait for it (bounded), so no thread
    outlives its test by more than that."""
    event = threading.Event()
    yield event
    event.set()


# ---- what is returned --------------------------------------------------------------------


async def test_a_fixed_price_is_price_sat_and_calls_nothing() -> None:
    assert await quote(one(MINIMAL), view()) == 21


async def test_a_plain_function_gets_the_view_and_its_price_is_returned() -> None:
    seen: list[PriceRequest] = []

    def price(request: PriceRequest) -> int:
        seen.append(request)
        return 40 if request.path.endswith(".mp3") else 10

    request = view()
    assert await quote(rule_with(price), request) == 40
    assert seen == [request]


async def test_an_async_function_is_awaited() -> None:
    async def price(request: PriceRequest) -> int:
        await asyncio.sleep(0)
        return len(request.query)

    assert await quote(rule_with(price), view(query="abc")) == 3


class AsyncPricer:
    async def __call__(self, request: PriceRequest) -> int:
        await asyncio.sleep(0)
        return 9


async def async_price(base: int, request: PriceRequest) -> int:
    await asyncio.sleep(0)
    return base


class Level(enum.IntEnum):
    HIGH = 500


@pytest.mark.parametrize(
    ("function", "sats"),
    [
        pytest.param(AsyncPricer(), 9, id="object-with-async-call"),
        pytest.param(functools.partial(async_price, 8), 8, id="partial-of-async"),
        pytest.param(lambda request: 1, 1, id="one-sat"),
        pytest.param(lambda request: MAX_PRICE_SAT, MAX_PRICE_SAT, id="all-bitcoin"),
        pytest.param(lambda request: Level.HIGH, 500, id="int-enum"),
    ],
)
async def test_prices_that_are_accepted(function: Callable[..., Any], sats: int) -> None:
    result = await quote(rule_with(function), view())
    assert result == sats and type(result) is int


async def test_a_plain_function_runs_in_a_daemon_thread_not_on_the_loop() -> None:
    # The function waits for the loop to run something: it can only return 5 if it is not
    # blocking the loop itself.
    loop_ran = threading.Event()
    threads: list[threading.Thread] = []

    def price(request: PriceRequest) -> int:
        threads.append(threading.current_thread())
        return 5 if loop_ran.wait(BOUND) else 0

    asyncio.get_running_loop().call_soon(loop_ran.set)
    assert await quote(rule_with(price), view(), timeout=BOUND) == 5
    assert threads[0] is not threading.main_thread() and threads[0].daemon


# ---- what fails --------------------------------------------------------------------------


GARBAGE = [
    pytest.param("21", "returned '21' (str); a price is a whole number of sats", id="str"),
    pytest.param(21.0, "returned 21.0 (float); a price is a whole number of sats", id="float"),
    pytest.param(Decimal(21), "returned Decimal('21') (Decimal)", id="decimal"),
    pytest.param(True, "returned True (bool); a price is a whole number of sats", id="true"),
    pytest.param(False, "returned False (bool)", id="false"),
    pytest.param(None, "returned None (NoneType)", id="none"),
    pytest.param([21], "returned [21] (list)", id="list"),
    pytest.param(0, "returned 0; a price is from 1 to 2,100,000,000,000,000 sats", id="zero"),
    pytest.param(-5, "returned -5; a price is from 1 to", id="negative"),
    pytest.param(MAX_PRICE_SAT + 1, f"returned {MAX_PRICE_SAT + 1}; a price is", id="huge"),
    pytest.param("x" * 500, "returned 'xxxxxxxx", id="long-str"),
    pytest.param("a\nb", "returned 'a\\\\nb' (str)", id="newline"),
]


@pytest.mark.parametrize(("value", "message"), GARBAGE)
@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_garbage_is_a_price_error(value: object, message: str, kind: str) -> None:
    def plain(request: PriceRequest) -> object:
        return value

    async def coroutine(request: PriceRequest) -> object:
        return value

    with pytest.raises(PriceError) as info:
        await quote(rule_with(plain if kind == "plain" else coroutine), view())
    text = str(info.value)
    assert text.startswith("rules/test.yaml:7: service 'podcast': price python:prices:quote ")
    assert message in text
    assert text.isprintable() and len(text) < 300
    assert info.value.rule == "podcast"


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_an_exception_is_a_price_error_with_its_cause(kind: str) -> None:
    boom = ValueError("no rate\nfor this")

    def plain(request: PriceRequest) -> int:
        raise boom

    async def coroutine(request: PriceRequest) -> int:
        await asyncio.sleep(0)
        raise boom

    with pytest.raises(PriceError) as info:
        await quote(rule_with(plain if kind == "plain" else coroutine), view())
    assert str(info.value) == (
        "rules/test.yaml:7: service 'podcast': price python:prices:quote raised ValueError: "
        "no rate for this"
    )
    assert info.value.__cause__ is boom


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_sys_exit_in_a_price_function_fails_the_quote_not_the_process(kind: str) -> None:
    def plain(request: PriceRequest) -> int:
        sys.exit(3)

    async def coroutine(request: PriceRequest) -> int:
        sys.exit(3)

    with pytest.raises(PriceError, match=r"price python:prices:quote raised SystemExit: 3$"):
        await quote(rule_with(plain if kind == "plain" else coroutine), view())
    # The loop goes on.
    assert await quote(rule_with(lambda request: 2), view()) == 2


async def test_a_plain_function_returning_a_coroutine_is_refused_and_the_coroutine_closed() -> None:
    made: list[Coroutine[Any, Any, int]] = []

    async def later() -> int:
        return 5

    def price(request: PriceRequest) -> Coroutine[Any, Any, int]:
        made.append(later())
        return made[-1]

    with pytest.raises(PriceError, match="returned an awaitable from a plain function; make"):
        await quote(rule_with(price), view())
    assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED


async def test_an_async_function_returning_a_coroutine_is_refused() -> None:
    async def later() -> int:
        return 5

    async def price(request: PriceRequest) -> Any:
        return later()

    with pytest.raises(PriceError, match="returned an awaitable from its coroutine; await it"):
        await quote(rule_with(price), view())


async def test_a_hanging_plain_function_times_out_without_taking_the_default_executor(
    release: threading.Event,
) -> None:
    # One default-executor thread: had the hung call taken it (asyncio.to_thread), the
    # to_thread below could never run.
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(executor)

    def price(request: PriceRequest) -> int:
        release.wait(BOUND)
        return 1

    with pytest.raises(PriceError) as info:
        await quote(rule_with(price), view(), timeout=SHORT)
    assert str(info.value).endswith("price python:prices:quote did not answer within 0.2 s")
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), BOUND) == 7
    release.set()


async def test_a_hanging_async_function_times_out_and_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def price(request: PriceRequest) -> int:
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    with pytest.raises(PriceError, match=r"did not answer within 0\.2 s"):
        await quote(rule_with(price), view(), timeout=SHORT)
    await asyncio.wait_for(cancelled.wait(), BOUND)


async def test_an_async_function_that_ignores_cancellation_still_times_out() -> None:
    # asyncio.wait_for would wait for it to give in: forever, for this one.
    ended = asyncio.Event()
    go = asyncio.Event()

    async def price(request: PriceRequest) -> int:
        try:
            for _ in range(100):
                try:
                    await go.wait()
                    return 1
                except asyncio.CancelledError:
                    continue
            return 1
        finally:
            ended.set()

    with pytest.raises(PriceError, match=r"did not answer within 0\.2 s"):
        await quote(rule_with(price), view(), timeout=SHORT)
    go.set()
    await asyncio.wait_for(ended.wait(), BOUND)


async def test_cancelling_the_caller_cancels_an_async_price_function() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def price(request: PriceRequest) -> int:
        started.set()
        try:
            await asyncio.sleep(BOUND)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    task = asyncio.ensure_future(quote(rule_with(price), view()))
    await asyncio.wait_for(started.wait(), BOUND)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), BOUND)


async def test_hung_plain_calls_hold_their_threads_up_to_a_limit(
    monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> None:
    # The limit is read when this loop first prices: one thread.
    monkeypatch.setattr(pricing, "MAX_PRICE_THREADS", 1)
    calls: list[str] = []

    def hang(request: PriceRequest) -> int:
        calls.append("hang")
        release.wait(BOUND)
        return 1

    def quick(request: PriceRequest) -> int:
        calls.append("quick")
        return 3

    with pytest.raises(PriceError, match=r"did not answer within 0.2 s$"):
        await quote(rule_with(hang), view(), timeout=SHORT)
    # The hung call keeps the one thread: the next waits for it and times out, saying why.
    with pytest.raises(PriceError, match=r"0.2 s \(never started: all 1 price threads are held by"):
        await quote(rule_with(quick), view(), timeout=SHORT)
    assert calls == ["hang"]
    release.set()
    # Once the hung call ends its thread is free again.
    assert await quote(rule_with(quick), view(), timeout=BOUND) == 3
    assert calls == ["hang", "quick"]


async def test_a_price_error_names_the_rules_file_and_line_when_loaded(tmp_path: Path) -> None:
    module = f"prices_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{module}.py").write_text("def quote(request):\n    raise KeyError('rate')\n")
    path = tmp_path / "rules.yaml"
    path.write_text(
        yaml_text(
            f"""
            services:
              - name: free
                match: {{path: /}}
                mode: free
              - name: api
                match: {{path: /api/*}}
                price: python:{module}:quote
            """
        )
    )
    try:
        rule = load_rules(path).rules[1]
    finally:
        sys.modules.pop(module, None)
    with pytest.raises(PriceError) as info:
        await quote(rule, view(rule="api"))
    assert str(info.value) == (
        f"{path}:7: service 'api': price python:{module}:quote raised KeyError: 'rate'"
    )


def test_the_default_time_box_is_five_seconds() -> None:
    assert PRICE_TIMEOUT == 5.0
    assert inspect.signature(quote).parameters["timeout"].default == PRICE_TIMEOUT


# ---- the view ----------------------------------------------------------------------------


def test_the_view_is_read_only() -> None:
    request = view()
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.path = "/free"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.headers["accept"] = "*/*"  # type: ignore[index]
    with pytest.raises(TypeError):
        del request.headers["accept"]  # type: ignore[attr-defined]
    assert not hasattr(request.headers, "update") and not hasattr(request.headers, "pop")
    with pytest.raises(AttributeError):
        request.headers.extra = 1  # type: ignore[attr-defined]


def test_the_view_copies_its_headers_lower_cased_and_joined() -> None:
    given = {"Accept": "audio/*", "accept": "text/html", "X-Client": "app"}
    request = view(headers=given)
    given["X-Client"] = "changed"
    assert dict(request.headers) == {"accept": "audio/*, text/html", "x-client": "app"}
    assert request.headers["X-CLIENT"] == "app" and "X-Client" in request.headers
    assert "x-missing" not in request.headers and 5 not in request.headers
    assert request.headers.get("x-missing") is None
    assert request.headers == {"accept": "audio/*, text/html", "x-client": "app"}


def test_the_view_is_hashable_and_comparable() -> None:
    # A price function may cache on it (functools.lru_cache).
    assert view() == view() and hash(view()) == hash(view())
    assert view(headers={"a": "1"}) != view(headers={"a": "2"})
    assert view(client_ip=None).client_ip is None
    assert len({view(), view(), view(query="")}) == 2
