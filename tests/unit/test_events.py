"""What the engine tells its watchers (engine/events.py): one Decision per judged request, with
the kind, service, status, reason and token prefix each outcome stands for, and the events
around it (backend calls, settled invoices, store failures). A watcher that raises never changes
what a request gets. Driven through a real Paywall with the dev backend and a tmp store."""

import asyncio
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from l402proxy.engine import Answer, Forward, Paywall, Request, events
from l402proxy.engine import core as engine_core
from l402proxy.engine.core import decision_of, kind_of
from l402proxy.engine.events import Decision, Watchers
from l402proxy.l402.headers import parse_challenges
from l402proxy.lightning import LightningError
from l402proxy.store import IssuedToken
from tests.unit.test_rate_limits import bought, engine_with, request

# One service per kind of outcome.
RULES = """
services:
  - name: api
    match: {path: "/api/*"}
    price_sat: 5
    free_paths: ["/api/docs*"]
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid: {set_headers: {X-Ad-Free: "1"}}
  - name: trial
    match: {path: "/trial/*"}
    price_sat: 3
    freebies: {requests: 1, per: 1d}
  - name: slow
    match: {path: "/slow/*"}
    price_sat: 3
    rate_limits: [{requests: 1, per: 1h}]
  - name: closed
    match: {path: "/closed/*"}
    mode: deny
"""


class Recorder:
    """A watcher that keeps every event it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def decided(self, decision: Decision) -> None:
        self.events.append(("decided", (decision,)))

    def settled(self, door: str, service: str, price_sat: int) -> None:
        self.events.append(("settled", (door, service, price_sat)))

    def backend_called(self, door: str, operation: str, seconds: float, ok: bool) -> None:
        self.events.append(("backend_called", (door, operation, seconds, ok)))

    def store_failed(self, door: str, operation: str) -> None:
        self.events.append(("store_failed", (door, operation)))

    def upstream_answered(self, door: str, service: str | None, seconds: float) -> None:
        self.events.append(("upstream_answered", (door, service, seconds)))

    @property
    def decisions(self) -> list[Decision]:
        return [args[0] for event, args in self.events if event == "decided"]

    def told(self, name: str) -> list[tuple[Any, ...]]:
        return [args for event, args in self.events if event == name]


class Boom:
    """A watcher that fails at everything."""

    def __init__(self) -> None:
        self.calls = 0

    def decided(self, decision: Decision) -> None:
        self.calls += 1
        raise RuntimeError("watcher broke")

    def settled(self, door: str, service: str, price_sat: int) -> None:
        raise RuntimeError("watcher broke")

    def backend_called(self, door: str, operation: str, seconds: float, ok: bool) -> None:
        raise RuntimeError("watcher broke")

    def store_failed(self, door: str, operation: str) -> None:
        raise RuntimeError("watcher broke")

    def upstream_answered(self, door: str, service: str | None, seconds: float) -> None:
        raise RuntimeError("watcher broke")


def facts(decision: Decision) -> dict[str, Any]:
    """A decision's fields but its timing (checked apart)."""
    found = asdict(decision)
    assert isinstance(found.pop("seconds"), float)
    return found


def expected(kind: str, service: str | None, status: int | None, **more: Any) -> dict[str, Any]:
    base = {"door": "mitmproxy", "kind": kind, "service": service, "status": status,
            "reason": None, "token": None, "method": "GET", "dry_run": False}  # fmt: skip
    return base | more


def unlock_request(macaroon: str, preimage: str | None) -> Request:
    body = json.dumps({"macaroon": macaroon, "preimage": preimage}).encode()
    fields = ((b"Host", b"api.example"), (b"Content-Type", b"application/json"))
    return Request("POST", "/.l402/unlock", "api.example", fields, body=body)


# -- decision_of / kind_of ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "kind"),
    [
        (Answer.make(503, b""), events.UNAVAILABLE),  # an answer with no note: a failure
        (Forward(()), events.PASS),
        (Forward((), note={"variant": "paid"}), events.GRANT),
        (Forward((), note={"variant": "paid", "freebie": True}), events.FREEBIE),
        (Forward((), note={"variant": "free"}), events.FREE),
        (Answer.make(402, b"", ()), events.UNAVAILABLE),
        (Answer(402, [], note={"variant": "challenge", "endpoint": "pay"}), events.CHALLENGE),
        (Answer(429, [], note={"variant": "limited"}), events.LIMITED),
        (Answer(400, [], note={"variant": "refused"}), events.REFUSED),
        (Answer(404, [], note={"variant": "denied"}), events.DENIED),
        (Answer(200, [], note={"variant": "unlock"}), events.UNLOCK),
        (Answer(404, [], note={"variant": "endpoint"}), events.ENDPOINT),
        (Answer(418, [], note={"variant": "unheard-of"}), events.ENDPOINT),
        (Forward((), note={"variant": "unheard-of"}), events.PASS),
        # A dry run's note says what the paywall would have done, whatever the variant.
        (Forward((), note={"variant": "free", "dry_run": "challenge"}), events.CHALLENGE),
        (Forward((), note={"variant": "paid", "dry_run": "grant"}), events.GRANT),
    ],
)
def test_kind_of_each_outcome(outcome: Answer | Forward, kind: str) -> None:
    assert kind_of(outcome) == kind and kind in events.KINDS


def test_decision_of_keeps_only_safe_fields() -> None:
    token_id = "ab" * 32
    grant = Forward((), note={"variant": "paid", "service": "api", "token_id": token_id})
    decision = decision_of("asgi", "GET", grant, 0.002)
    assert decision == Decision("asgi", "grant", "api", None, None, "abababab", 0.002, "GET")
    assert len(decision.token or "") == events.TOKEN_PREFIX_LEN
    # A reason that is not a string is written as one; an answer's status is the status.
    limited = Answer(429, [], note={"variant": "limited", "service": "api", "reason": 7})
    assert decision_of("nginx", "HEAD", limited, 0.0).reason == "7"
    assert decision_of("nginx", "HEAD", limited, 0.0).status == 429
    # A dry run: forwarded, but the status is the one the paywall would have answered.
    pretended = Forward((), note={"variant": "free", "dry_run": "challenge", "dry_status": 402})
    decision = decision_of("mitmproxy", "GET", pretended, 0.0)
    assert (decision.kind, decision.status, decision.dry_run) == ("challenge", 402, True)


# -- Watchers ----------------------------------------------------------------------------------


def test_watchers_add_once_remove_quietly() -> None:
    watchers = Watchers()
    recorder = Recorder()
    assert not watchers
    watchers.add(recorder)
    watchers.add(recorder)
    assert watchers and watchers.all == [recorder]
    watchers.tell("settled", "mitmproxy", "api", 5)
    assert recorder.told("settled") == [("mitmproxy", "api", 5)]
    watchers.remove(recorder)
    watchers.remove(recorder)  # not there: no error
    assert not watchers


async def test_a_watcher_that_raises_is_logged_once_and_never_breaks_a_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine_with(tmp_path, RULES) as (engine, _):
        boom, recorder = Boom(), Recorder()
        engine.watchers.add(boom)
        engine.watchers.add(recorder)  # after the one that raises: still told
        caplog.set_level(logging.WARNING, logger="l402proxy.engine.events")
        outcomes = [await engine.handle(request(path)) for path in ("/api/x", "/api/y", "/x")]
        assert [type(o).__name__ for o in outcomes] == ["Answer", "Answer", "Forward"]
        assert [o.status for o in outcomes if isinstance(o, Answer)] == [402, 402]
        assert boom.calls == 3 and len(recorder.decisions) == 3
        engine.watchers.tell("settled", "mitmproxy", "api", 5)
        engine.watchers.tell("settled", "mitmproxy", "api", 5)
        failed = [r.getMessage() for r in caplog.records if "watcher broke" in r.getMessage()]
        # Once per watcher and event (two invoices were made: two backend calls), one line each.
        named = sorted(line.split(" failed")[0].removeprefix("l402: ") for line in failed)
        assert named == ["Boom.backend_called", "Boom.decided", "Boom.settled"], failed
        assert all("\n" not in line for line in failed)
        assert recorder.told("settled") == [("mitmproxy", "api", 5)] * 2


# -- every outcome of a real engine ------------------------------------------------------------


async def test_each_outcome_is_one_decision_of_the_right_kind(tmp_path: Path) -> None:
    async with engine_with(tmp_path, RULES) as (engine, _):
        credential = await bought(engine, tmp_path)
        recorder = Recorder()
        engine.watchers.add(recorder)
        cases: list[tuple[Request, dict[str, Any]]] = [
            (request("/api/x"), expected("challenge", "api", 402, reason="payment_required")),
            (request("/api/x", authorization="L402 bogus:00"),
             expected("challenge", "api", 401, reason="malformed")),
            (request("/episodes/1.mp3"), expected("free", "podcast", None)),
            (request("/episodes/1.mp3", Accept_Authenticate="L402"),
             expected("challenge", "podcast", 402, reason="payment_required")),
            (request("/trial/1"), expected("freebie", "trial", None)),
            (request("/trial/2"), expected("challenge", "trial", 402, reason="payment_required")),
            (request("/slow/1"), expected("challenge", "slow", 402, reason="payment_required")),
            (request("/slow/2"), expected("limited", "slow", 429, reason="ip")),
            (request("/closed/1"), expected("denied", "closed", 404)),
            (request("/api/docs/..%2Fx"), expected("refused", None, 400, reason="AmbiguousPath")),
            (request("/api/x", X_Odd="a\rb"), expected("refused", None, 400, reason="header")),
            (request("/api/docs/intro"), expected("pass", None, None)),  # a free path
            (request("/elsewhere"), expected("pass", None, None)),  # no rule
        ]  # fmt: skip
        granted = await engine.handle(request("/api/x", authorization=credential))
        assert isinstance(granted, Forward) and granted.note is not None
        token = granted.note["token_id"][: events.TOKEN_PREFIX_LEN]
        assert facts(recorder.decisions[0]) == expected("grant", "api", None, token=token)
        for sent, wanted in cases:
            before = len(recorder.decisions)
            await engine.handle(sent)
            assert len(recorder.decisions) == before + 1, sent.target
            assert facts(recorder.decisions[-1]) == wanted, sent.target
        # HEAD is told as HEAD; a token prefix is never more than 8 hex digits.
        head = Request("HEAD", "/api/x", "api.example", ((b"Host", b"api.example"),))
        await engine.handle(head)
        assert recorder.decisions[-1].method == "HEAD"
        assert all(d.token is None or len(d.token) == 8 for d in recorder.decisions)


async def test_the_paywall_pages_endpoints_are_decisions_too(tmp_path: Path) -> None:
    async with engine_with(tmp_path, RULES) as (engine, _):
        recorder = Recorder()
        engine.watchers.add(recorder)
        page = await engine.handle(request("/.l402/pay?path=/api/x", Accept="application/json"))
        assert isinstance(page, Answer) and page.status == 402
        lines = [v.decode() for n, v in page.headers if n.lower() == b"www-authenticate"]
        macaroon = parse_challenges(lines)[0].macaroon
        # Not paid yet, then paid with the preimage: the second opens it.
        unpaid = await engine.handle(unlock_request(macaroon, None))
        assert isinstance(unpaid, Answer) and unpaid.status == 403  # no claim cookie here
        credential = await bought(engine, tmp_path)
        bought_macaroon, preimage = credential.removeprefix("L402 ").split(":")
        unlocked = await engine.handle(unlock_request(bought_macaroon, preimage))
        assert isinstance(unlocked, Answer) and unlocked.status == 200
        forged = await engine.handle(unlock_request("AgEJbm90IG91cnM", "00" * 32))
        assert isinstance(forged, Answer) and forged.status in (400, 401)
        missing = await engine.handle(request("/.l402/nothing"))
        assert isinstance(missing, Answer) and missing.status == 404
        told = [facts(d) for d in recorder.decisions]
        assert told[0] == expected("challenge", "api", 402, reason="payment_required")
        assert told[1] == expected("unlock", "api", 403, method="POST")
        assert told[2] == expected("challenge", "api", 402, reason="payment_required")  # bought
        assert told[3] == expected("unlock", "api", 200, method="POST")
        assert told[4]["kind"] == "endpoint" and told[4]["service"] is None
        assert told[5] == expected("endpoint", None, 404)


async def test_unavailable_store_backend_and_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine_with(tmp_path, RULES) as (engine, backend):
        recorder = Recorder()
        engine.watchers.add(recorder)
        await engine.handle(request("/api/x"))
        (door, operation, seconds, ok), *_ = recorder.told("backend_called")
        assert (door, operation, ok) == ("mitmproxy", "create_invoice", True) and seconds >= 0

        async def refusing(amount_sat: int, memo: str, expiry: int) -> Any:
            raise LightningError("the node is down")

        monkeypatch.setattr(backend, "create_invoice", refusing)
        failed = await engine.handle(request("/api/x"))
        assert isinstance(failed, Answer) and failed.status == 503
        assert facts(recorder.decisions[-1]) == expected(
            "unavailable", "api", 503, reason="backend"
        )
        assert recorder.told("backend_called")[-1][1:2] + recorder.told("backend_called")[-1][
            3:
        ] == (
            "create_invoice",
            False,
        )

        store = engine.store
        assert store is not None
        monkeypatch.setattr(type(store), "healthy", property(lambda _self: False))
        answer = await engine.handle(request("/api/x"))
        assert isinstance(answer, Answer) and answer.status == 503
        assert facts(recorder.decisions[-1]) == expected("unavailable", "api", 503, reason="store")
        monkeypatch.undo()

        async def broken(*args: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(engine, "_judge", broken)
        answer = await engine.handle(request("/api/x"))
        assert isinstance(answer, Answer) and answer.status == 503
        assert facts(recorder.decisions[-1]) == expected(
            "unavailable", "api", 503, reason="internal"
        )


async def test_settled_invoices_and_store_failures_are_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine tells `settled` once per token its store's flush returns (the tokens this
    instance was first to record as paid), and `store_failed` for a flush or revocation poll
    that fails (and still raises, for the background loop to log)."""
    async with engine_with(tmp_path, RULES) as (engine, _):
        recorder = Recorder()
        engine.watchers.add(recorder)
        store = engine.store
        assert store is not None
        sold = [
            IssuedToken(bytes([n]) * 32, bytes([n + 1]) * 32, service, price, time.time(), None)
            for n, (service, price) in enumerate((("api", 5), ("trial", 3)))
        ]

        async def flushed() -> list[IssuedToken]:
            return sold

        monkeypatch.setattr(store, "flush", flushed)
        await engine._flush()
        assert recorder.told("settled") == [("mitmproxy", "api", 5), ("mitmproxy", "trial", 3)]

        async def failing(*args: Any) -> Any:
            raise OSError("database is gone")

        monkeypatch.setattr(store, "flush", failing)
        monkeypatch.setattr(store, "revocations_since", failing)
        with pytest.raises(OSError):
            await engine._flush()
        with pytest.raises(OSError):
            await engine._poll_revocations()
        assert recorder.told("store_failed") == [
            ("mitmproxy", "flush"),
            ("mitmproxy", "revocations"),
        ]


async def test_a_request_that_waited_for_the_engine_to_open_is_told(tmp_path: Path) -> None:
    """A door listens before its engine is open (mitmproxy 12 serves before the `running`
    hook is done), and adds its watchers once the engine is open. A request that came in
    between waits for the engine, and its decision must still reach the watchers: it was
    missing from the JSON log and the metrics (handle() looked at the watchers before it
    waited)."""
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    engine = Paywall()
    engine.use_rules_file(str(path))
    engine.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    engine.store_uri = str(tmp_path / "server.sqlite")
    early = asyncio.create_task(engine.handle(request("/api/x")))
    await asyncio.sleep(0)
    assert not early.done()  # waiting for the engine
    recorder = Recorder()
    try:
        await engine.open()
        engine.watchers.add(recorder)  # as the doors do (ops.Operations.start after open)
        outcome = await asyncio.wait_for(early, 10)
    finally:
        await engine.close()
    assert isinstance(outcome, Answer) and outcome.status == 402
    assert [(d.kind, d.status) for d in recorder.decisions] == [("challenge", 402)]


async def test_no_watcher_no_decision_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without watchers the engine builds no Decision (handle stays as cheap as before)."""
    calls: list[str] = []

    def counting(*args: Any) -> Decision:
        calls.append("x")
        return Decision("mitmproxy", "pass", None, None)

    monkeypatch.setattr(engine_core, "decision_of", counting)
    async with engine_with(tmp_path, RULES) as (engine, _):
        await engine.handle(request("/elsewhere"))
        assert calls == []
        engine.watchers.add(Recorder())
        await engine.handle(request("/elsewhere"))
        assert calls == ["x"]


def test_every_kind_the_engine_notes_is_a_known_kind() -> None:
    assert set(engine_core._KIND_OF_VARIANT.values()) <= set(events.KINDS)
    assert len(set(events.KINDS)) == len(events.KINDS)


def test_a_paywall_told_nothing_has_no_watchers() -> None:
    assert not Paywall().watchers
