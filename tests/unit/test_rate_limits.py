"""Rate limits, the invoice-mint limit, free allowances and trusted forwarding headers (issue 12),
judged by the engine itself: every door gets the same answers."""

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from l402proxy.engine import Answer, Forward, Paywall, Request
from l402proxy.engine.limits import LocalCounters, SharedCounters, client_address, gcra, ip_key
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.lightning.dev import DevLedger
from l402proxy.rules import RulesError, parse_rules

API = """
services:
  - name: api
    match: {path: "/api/*"}
    price_sat: 5
    free_paths: ["/api/docs*"]
{extra}
"""


class CountingBackend:
    """The dev backend, counting the invoices it was asked for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.created = 0

    async def create_invoice(self, amount_sat: int, memo: str, expiry: int) -> Any:
        self.created += 1
        return await self.inner.create_invoice(amount_sat, memo, expiry)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.asynccontextmanager
async def engine_with(tmp_path: Path, rules: str) -> AsyncIterator[tuple[Paywall, CountingBackend]]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    engine = Paywall()
    engine.use_rules_file(str(path))
    engine.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    counting = CountingBackend(engine.backend)
    engine.backend = counting  # type: ignore[assignment]
    engine.store_uri = str(tmp_path / "server.sqlite")
    await engine.open()
    try:
        yield engine, counting
    finally:
        await engine.close()


def request(
    path: str, peer: str = "192.0.2.7", *, authorization: str | None = None, **headers: str
) -> Request:
    fields = [(b"Host", b"api.example")]
    if authorization is not None:
        fields.append((b"Authorization", authorization.encode()))
    fields += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return Request(
        method="GET", target=path, host="api.example", fields=tuple(fields), client=(peer, 40000)
    )


async def bought(engine: Paywall, tmp_path: Path) -> str:
    """A paid credential for the api service (paid from the dev ledger's listener wallet)."""
    answer = await engine.handle(request("/api/x", peer="198.51.100.99"))
    assert isinstance(answer, Answer) and answer.status == 402
    challenge = parse_challenges(
        [v.decode() for n, v in answer.headers if n == b"WWW-Authenticate"]
    )
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        payment = await ledger.pay("listener", challenge[0].invoice, 0)
    finally:
        await ledger.close()
    return format_credential([challenge[0].macaroon], payment.preimage)


def status(outcome: Any) -> int:
    return 200 if isinstance(outcome, Forward) else outcome.status


# -- the rules file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line", "message"),
    [
        ("    rate_limits: [{requests: 0, per: 1s}]", 7, "rate_limits.requests must be a whole"),
        ("    rate_limits: [{requests: 5, per: soon}]", 7, "rate_limits.per: invalid duration"),
        ("    rate_limits: [{requests: 5, per: 1s, key: user}]", 7, "key must be ip or token"),
        ("    rate_limits: [{requests: 5, per: 1s, brust: 9}]", 7, "unknown key 'brust'"),
        ("    rate_limits: []", 7, "rate_limits is empty"),
        ("    rate_limits: {requests: 5, per: 1s}", 7, "rate_limits must be a list"),
        ("    freebies: {requests: 3}", 7, "freebies needs 'per'"),
        ("    freebies: 3", 7, "freebies must be a mapping"),
        ("    description: x", 7, None),
    ],
)
def test_bad_limits_name_the_line(extra: str, line: int, message: str | None) -> None:
    if message is None:  # a bad free path
        message, line = "a path pattern starts with '/'", 6
        text = API.replace('["/api/docs*"]', "[docs]").replace("{extra}", "")
    else:
        text = API.replace("{extra}", extra)
    with pytest.raises(RulesError) as raised:
        parse_rules(text, "rules.yaml")
    assert f"rules.yaml:{line}:" in str(raised.value) and message in str(raised.value)


def test_top_level_limits_parse_and_refuse_nonsense() -> None:
    rules = parse_rules(
        "invoice_limit: {requests: 2, per: 1m}\ntrusted_proxies: [10.0.0.0/8, '::1']\n"
        + API.replace("{extra}", "")
    )
    assert rules.invoice_limit is not None and rules.invoice_limit.burst == 2
    assert [str(n) for n in rules.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert parse_rules("invoice_limit: off\n" + API.replace("{extra}", "")).invoice_limit is None
    with pytest.raises(RulesError, match=r"rules:1:.*not an IP address or network"):
        parse_rules("trusted_proxies: [proxy.example]\n" + API.replace("{extra}", ""), "rules")
    with pytest.raises(RulesError, match="has no meaning with mode: free"):
        parse_rules(
            "services:\n  - name: f\n    match: {path: /f}\n    mode: free\n"
            "    rate_limits: [{requests: 1, per: 1s}]\n"
        )


# -- counting ----------------------------------------------------------------------------------


def test_gcra_allows_the_burst_then_one_per_interval() -> None:
    tat = None
    for _ in range(3):
        tat, wait = gcra(tat, interval=1.0, burst=3, now=100.0)
        assert wait is None
    tat, wait = gcra(tat, interval=1.0, burst=3, now=100.0)
    assert wait == pytest.approx(1.0)
    tat, wait = gcra(tat, interval=1.0, burst=3, now=101.0)
    assert wait is None


async def test_allowances_count_per_window_and_bound_their_keys() -> None:
    counters = LocalCounters(max_keys=2)
    assert [await counters.take_allowance("a", 2, 60, 10.0) for _ in range(3)] == [1, 0, None]
    assert await counters.take_allowance("a", 2, 60, 61.0) == 1  # a new window
    for key in ("b", "c", "d"):
        await counters.take_rate(key, 1.0, 1, 0.0)
    assert len(counters.tats) == 2


def test_client_address_trusts_forwarding_only_from_trusted_proxies() -> None:
    trusted = parse_rules("trusted_proxies: [10.0.0.0/8]\n" + API.replace("{extra}", ""))
    networks = trusted.trusted_proxies
    xff = ((b"X-Forwarded-For", b"1.2.3.4, 203.0.113.9, 10.0.0.5"),)
    # An untrusted peer's header changes nothing.
    assert client_address("198.51.100.1", xff, networks) == "198.51.100.1"
    # A trusted peer: the last hop that is not a trusted proxy, never what the client wrote left.
    assert client_address("10.0.0.1", xff, networks) == "203.0.113.9"
    # Garbage where a proxy would write an address counts under the nearest proxy.
    assert client_address("10.0.0.1", ((b"X-Forwarded-For", b"x, 10.0.0.5"),), networks) == (
        "10.0.0.5"
    )
    assert client_address("10.0.0.1", (), networks) == "10.0.0.1"
    assert ip_key("2001:db8::1") == ip_key("2001:db8::ffff") == "2001:db8::/64"
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1" and ip_key(None) == "unknown"


# -- the engine --------------------------------------------------------------------------------


async def test_a_flood_makes_no_more_invoices_than_the_mint_limit(tmp_path: Path) -> None:
    rules = "invoice_limit: {requests: 3, per: 1h, burst: 4}\n" + API.replace("{extra}", "")
    async with engine_with(tmp_path, rules) as (engine, backend):
        answers = [await engine.handle(request("/api/x")) for _ in range(20)]
        assert [status(a) for a in answers] == [402] * 4 + [429] * 16
        assert backend.created == 4
        limited = answers[-1]
        assert isinstance(limited, Answer)
        assert int(limited.header("Retry-After") or 0) >= 1
        assert limited.header("Cache-Control") == "no-store"
        # Another client is not punished for the flood.
        assert status(await engine.handle(request("/api/x", peer="192.0.2.8"))) == 402
        assert backend.created == 5


async def test_a_per_ip_rate_limit_answers_429_before_anything_is_judged(tmp_path: Path) -> None:
    extra = "    rate_limits: [{requests: 2, per: 1h}]"
    async with engine_with(tmp_path, API.replace("{extra}", extra)) as (engine, backend):
        statuses = [status(await engine.handle(request("/api/x"))) for _ in range(4)]
        assert statuses == [402, 402, 429, 429]
        assert backend.created == 2


async def test_a_per_token_limit_counts_each_token_alone(tmp_path: Path) -> None:
    extra = "    rate_limits: [{requests: 2, per: 1h, key: token}]"
    async with engine_with(tmp_path, API.replace("{extra}", extra)) as (engine, _):
        first, second = await bought(engine, tmp_path), await bought(engine, tmp_path)
        runs = [status(await engine.handle(request("/api/x", authorization=first))) for _ in "abc"]
        assert runs == [200, 200, 429]
        # Another token, from the same address, has its own allowance.
        assert status(await engine.handle(request("/api/x", authorization=second))) == 200
        # Requests without a token are not counted against tokens (they get the 402).
        assert status(await engine.handle(request("/api/x"))) == 402


async def test_freebies_come_before_the_402_per_client(tmp_path: Path) -> None:
    extra = "    freebies: {requests: 2, per: 1d}\n    paid: {set_headers: {X-Tier: paid}}"
    async with engine_with(tmp_path, API.replace("{extra}", extra)) as (engine, backend):
        outcomes = [await engine.handle(request("/api/x")) for _ in range(3)]
        assert [status(o) for o in outcomes] == [200, 200, 402]
        free = outcomes[0]
        assert isinstance(free, Forward) and (b"X-Tier", b"paid") in free.headers
        assert free.note is not None and free.note["variant"] == "paid" and free.note["freebie"]
        assert backend.created == 1
        assert status(await engine.handle(request("/api/x", peer="192.0.2.8"))) == 200


async def test_free_paths_are_free_in_every_reading(tmp_path: Path) -> None:
    async with engine_with(tmp_path, API.replace("{extra}", "")) as (engine, backend):
        assert status(await engine.handle(request("/api/docs/intro"))) == 200
        assert status(await engine.handle(request("/api/x"))) == 402
        # A free path's prefix must not open the priced path behind it.
        assert status(await engine.handle(request("/api/docs/..%2Fx"))) == 400
        assert backend.created == 1


async def test_an_untrusted_forwarded_for_does_not_buy_a_fresh_allowance(tmp_path: Path) -> None:
    extra = "    freebies: {requests: 1, per: 1d}"
    rules = "trusted_proxies: [10.0.0.0/8]\n" + API.replace("{extra}", extra)
    async with engine_with(tmp_path, rules) as (engine, _):
        spoof = {"X_Forwarded_For": "203.0.113.50"}
        assert status(await engine.handle(request("/api/x", **spoof))) == 200
        assert status(await engine.handle(request("/api/x", X_Forwarded_For="203.0.113.51"))) == 402
        # Behind a trusted proxy, each forwarded client has its own.
        via = {"peer": "10.0.0.2"}
        assert (
            status(await engine.handle(request("/api/x", **via, X_Forwarded_For="1.1.1.1"))) == 200
        )
        assert (
            status(await engine.handle(request("/api/x", **via, X_Forwarded_For="1.1.1.2"))) == 200
        )
        assert (
            status(await engine.handle(request("/api/x", **via, X_Forwarded_For="1.1.1.1"))) == 402
        )


async def test_shared_counters_fall_back_to_this_instance_while_the_store_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky:
        down = True

        async def take_rate(self, key: str, interval: float, burst: int, now: float) -> float:
            if self.down:
                raise OSError("connection refused")
            return 42.0

        async def take_allowance(self, key: str, limit: int, window: int, now: float) -> int:
            if self.down:
                raise OSError("connection refused")
            return 7

    flaky = Flaky()
    counters = SharedCounters(flaky)
    # Down: counted here (a limit of 1 still holds), one warning for the whole outage.
    assert await counters.take_rate("k", 1.0, 1, 0.0) is None
    assert await counters.take_rate("k", 1.0, 1, 0.0) == pytest.approx(1.0)
    assert await counters.take_allowance("a", 1, 60, 0.0) == 0
    assert sum("alone" in r.getMessage() for r in caplog.records) == 1
    flaky.down = False
    assert await counters.take_rate("k", 1.0, 1, 0.0) == 42.0
    assert await counters.take_allowance("a", 1, 60, 0.0) == 7
    assert any("across instances again" in r.getMessage() for r in caplog.records)


async def test_the_pay_page_sells_under_the_same_per_ip_limits(tmp_path: Path) -> None:
    rules = "invoice_limit: off\n" + API.replace(
        "{extra}", "    rate_limits: [{requests: 2, per: 1h}]"
    )
    async with engine_with(tmp_path, rules) as (engine, backend):
        statuses = [
            status(await engine.handle(request("/.l402/pay?path=/api/x", Accept="text/html")))
            for _ in range(4)
        ]
        assert statuses == [402, 402, 429, 429] and backend.created == 2


async def test_a_unix_socket_peer_is_one_client_unless_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a proxy on a unix socket there is no peer address: all requests count as one
    client (said once in the log) unless `unix` is in trusted_proxies."""
    extra = "    freebies: {requests: 1, per: 1d}"
    rules = "trusted_proxies: [unix]\n" + API.replace("{extra}", extra)
    async with engine_with(tmp_path, API.replace("{extra}", extra)) as (engine, _):
        first = Request("GET", "/api/x", "api.example", ((b"X-Forwarded-For", b"1.1.1.1"),))
        second = Request("GET", "/api/x", "api.example", ((b"X-Forwarded-For", b"1.1.1.2"),))
        assert [status(await engine.handle(r)) for r in (first, second)] == [200, 402]
        assert sum("unix" in record.getMessage() for record in caplog.records) == 1
    (tmp_path / "trusting").mkdir()
    async with engine_with(tmp_path / "trusting", rules) as (engine, _):
        assert [status(await engine.handle(r)) for r in (first, second, first)] == [200, 200, 402]


async def test_an_edit_elsewhere_in_the_rules_keeps_the_counts(tmp_path: Path) -> None:
    """The count is keyed by the limit's terms, not its line: a comment added above it (a
    reload, or another instance's copy) neither resets nor splits it."""
    extra = "    rate_limits: [{requests: 2, per: 1h}]"
    async with engine_with(tmp_path, API.replace("{extra}", extra)) as (engine, _):
        assert [status(await engine.handle(request("/api/x"))) for _ in "abc"] == [402, 402, 429]
        edited = tmp_path / "edited.yaml"
        edited.write_text("# a comment\n# and another\n" + API.replace("{extra}", extra))
        engine.use_rules_file(str(edited))
        assert status(await engine.handle(request("/api/x"))) == 429


async def test_closing_with_a_store_that_cannot_write_still_closes_the_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine_with(tmp_path, API.replace("{extra}", "")) as (engine, _):
        closed: list[str] = []

        class Failing:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            async def close(self) -> None:
                await self.inner.close()
                raise OSError("1 queued record lost on close")

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        class Counting:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            async def close(self) -> None:
                closed.append("backend")
                await self.inner.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

        engine.store = Failing(engine.store)  # type: ignore[assignment]
        engine.backend = Counting(engine.backend)  # type: ignore[assignment]
        await engine.close()
        assert closed == ["backend"]
        assert any("closing the token store" in r.getMessage() for r in caplog.records)
        engine.store = engine.backend = None  # closed already
