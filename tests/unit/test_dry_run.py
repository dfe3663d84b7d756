"""Dry run (`mode: dry_run` at the rules' top level, or `Paywall.dry_run_option`): every request
is judged, told to the watchers and counted, then forwarded; the Forward's note says what the
paywall would have done (the door sends it back as X-L402-Dry-Run). Nothing is sold: no invoice,
no token row. What is hygiene and not a paywall decision (a header with a bare CR, our
credentials and the vouched headers) stays as it is when enforcing."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from l402proxy.engine import Answer, Forward, Paywall, Request
from l402proxy.engine.request import get, get_all
from l402proxy.lightning.dev import DevLedger
from l402proxy.rules import RulesError, parse_rules
from tests.unit.test_events import RULES, Recorder
from tests.unit.test_rate_limits import CountingBackend, bought, engine_with, request

DRY_RULES = "mode: dry_run\n" + RULES


@dataclass
class Dry:
    engine: Paywall
    backend: CountingBackend
    credential: str  # bought before the dry run began
    recorder: Recorder
    ledger: Path


async def invoices(ledger: Path) -> int:
    opened = DevLedger(ledger)
    try:
        return len(await opened.list_invoices())
    finally:
        await opened.close()


@pytest.fixture(params=["rules", "option"])
async def dry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Dry]:
    """An engine in dry run, by its rules file or by the door's option, with a token bought
    while it still enforced."""
    async with engine_with(tmp_path, RULES) as (engine, backend):
        credential = await bought(engine, tmp_path)
        assert not engine.dry_run
        if request.param == "rules":
            path = tmp_path / "dry.yaml"
            path.write_text(DRY_RULES)
            engine.use_rules_file(str(path))
        else:
            engine.dry_run_option = True
        assert engine.dry_run
        recorder = Recorder()
        engine.watchers.add(recorder)
        yield Dry(engine, backend, credential, recorder, tmp_path / "devledger.sqlite")


def forwarded(outcome: Answer | Forward) -> Forward:
    assert isinstance(outcome, Forward), (outcome.status, outcome.body[:300])  # type: ignore[union-attr]
    assert outcome.note is not None
    return outcome


# -- the rules file ----------------------------------------------------------------------------


def test_the_rules_file_takes_enforce_or_dry_run_and_nothing_else() -> None:
    assert parse_rules(DRY_RULES).dry_run
    assert not parse_rules("mode: enforce\n" + RULES).dry_run
    assert not parse_rules(RULES).dry_run
    wrongs = [("paywall", "'paywall'"), ("DRY_RUN", "'DRY_RUN'"), ("[dry_run]", "a list"),
              ("true", "true"), ("''", "''")]  # fmt: skip
    for wrong, shown in wrongs:
        with pytest.raises(RulesError) as raised:
            parse_rules(f"# the paywall\n\nmode: {wrong}\n" + RULES, "site.yaml")
        message = str(raised.value)
        assert message.startswith("site.yaml:3: ") and "\n" not in message, message
        assert "enforce or dry_run" in message and f"got {shown}" in message


async def test_an_edited_rules_file_starts_and_ends_the_dry_run(tmp_path: Path) -> None:
    async with engine_with(tmp_path, RULES) as (engine, _):
        path = Path(engine.rules_path)
        for text, dry in ((DRY_RULES, True), ("mode: enforce\n" + RULES, False)):
            path.write_text(text)
            engine.rules_signature = None  # the size may not change: read it again anyway
            await engine.reload_rules_if_changed()
            assert engine.dry_run is dry
            outcome = await engine.handle(request("/api/x"))
            assert isinstance(outcome, Forward if dry else Answer)
        # A broken mode keeps the rules in force (enforcing here).
        path.write_text("mode: pretend\n" + RULES)
        engine.rules_signature = None
        await engine.reload_rules_if_changed()
        assert not engine.dry_run


# -- nothing is blocked, nothing is sold --------------------------------------------------------


async def test_a_would_be_challenge_is_forwarded_and_mints_nothing(dry: Dry) -> None:
    engine, backend = dry.engine, dry.backend
    made, minted = await invoices(dry.ledger), backend.created
    store = engine.store
    assert store is not None
    await store.flush()
    for accept in ("application/json", "text/html", "text/plain"):
        outcome = forwarded(await engine.handle(request("/api/x", Accept=accept)))
        assert outcome.note == {"service": "api", "variant": "paid", "status": 402,
                                "reason": "payment_required", "dry_run": "challenge",
                                "dry_status": 402}  # fmt: skip
        assert outcome.path is None and outcome.set_headers == ()
    head = Request("HEAD", "/api/x", "api.example", ((b"Host", b"api.example"),))
    assert forwarded(await engine.handle(head)).note["dry_run"] == "challenge"  # type: ignore[index]
    # An upgrade-mode client that asks to pay, a bad token, a freebie spent.
    opted = forwarded(await engine.handle(request("/episodes/1", Accept_Authenticate="L402")))
    assert opted.note is not None and opted.note["dry_run"] == "challenge"
    bad = forwarded(await engine.handle(request("/api/x", authorization="L402 bogus:00")))
    assert bad.note is not None and (bad.note["dry_run"], bad.note["dry_status"]) == (
        "challenge",
        401,
    )
    await engine.handle(request("/trial/1"))
    spent = forwarded(await engine.handle(request("/trial/2")))
    assert spent.note is not None and spent.note["dry_run"] == "challenge"
    # No invoice asked for, none in the ledger, no token row queued for the store.
    assert backend.created == minted and await invoices(dry.ledger) == made
    assert store.pending == 0


async def test_every_priced_decision_forwards_and_says_what_it_would_have_been(dry: Dry) -> None:
    engine = dry.engine
    cases = [
        (request("/api/x"), "challenge", 402),
        (request("/api/x", authorization=dry.credential), "grant", None),
        (request("/episodes/1.mp3"), "free", None),
        (request("/trial/1"), "freebie", None),
        (request("/slow/1"), "challenge", 402),
        (request("/slow/2"), "limited", 429),  # limits are still counted
        (request("/slow/3"), "limited", 429),
        (request("/closed/1"), "denied", 404),
        (request("/api/docs/..%2Fx"), "refused", 400),
    ]
    for sent, kind, status in cases:
        outcome = forwarded(await engine.handle(sent))
        assert outcome.note is not None and outcome.note["dry_run"] == kind, sent.target
        decision = dry.recorder.decisions[-1]
        assert (decision.kind, decision.status, decision.dry_run) == (kind, status, True)
    # No rule, or a free path: nothing to pretend.
    for target in ("/elsewhere", "/api/docs/intro"):
        outcome = await engine.handle(request(target))
        assert isinstance(outcome, Forward) and outcome.note is None
        assert dry.recorder.decisions[-1].kind == "pass"
        assert not dry.recorder.decisions[-1].dry_run


async def test_the_invoice_limit_is_counted_in_a_dry_run(tmp_path: Path) -> None:
    """A dry run previews what enforcing would do: a client over the invoice-mint limit gets
    429s when enforcing, so the dry run must say "limited" for them (as it does for
    rate_limits), still without making any invoice."""
    limit = "invoice_limit: {requests: 1, per: 1h, burst: 2}\n"
    for mode, wanted in (("enforce", [402, 402, 429, 429]), ("dry_run", [402, 402, 429, 429])):
        (tmp_path / mode).mkdir()
        rules = f"mode: {mode}\n{limit}{RULES}"
        async with engine_with(tmp_path / mode, rules) as (engine, backend):
            recorder = Recorder()
            engine.watchers.add(recorder)
            for _ in wanted:
                await engine.handle(request("/api/x"))
            told = [(d.kind, d.status, d.reason) for d in recorder.decisions]
            assert [status for _, status, _ in told] == wanted, (mode, told)
            assert told[-1] == ("limited", 429, "invoices"), mode
            assert backend.created == (2 if mode == "enforce" else 0)


async def test_a_valid_token_gets_the_paid_variant(dry: Dry) -> None:
    engine = dry.engine
    outcome = forwarded(await engine.handle(request("/api/x", authorization=dry.credential)))
    assert outcome.note is not None and outcome.note["variant"] == "paid"
    assert outcome.note["dry_run"] == "grant"
    assert get_all(outcome.headers, "Authorization") == []  # the credential stays with us
    decision = dry.recorder.decisions[-1]
    assert decision.token == outcome.note["token_id"][:8] and decision.status is None
    # A freebie is the paid variant as well, with the paywall's own header.
    trial = forwarded(await engine.handle(request("/episodes/x", authorization=dry.credential)))
    assert trial.note is not None and trial.note["dry_run"] == "challenge"  # wrong service
    assert get(trial.headers, "X-Ad-Free") is None


async def test_hygiene_is_not_pretended(dry: Dry) -> None:
    """A header with a bare CR is still refused (what it means differs per server: it is not a
    paywall decision); our Authorization and cookies and the headers only the paywall sets are
    still taken off every forwarded request."""
    engine = dry.engine
    broken = await engine.handle(request("/api/x", X_Odd="a\rb"))
    assert isinstance(broken, Answer) and broken.status == 400
    assert broken.note is not None and "dry_run" not in broken.note
    assert not dry.recorder.decisions[-1].dry_run
    sent = Request(
        "GET",
        "/episodes/1.mp3",
        "api.example",
        (
            (b"Host", b"api.example"),
            (b"Accept-Authenticate", b"L402"),
            (b"Authorization", b"L402 bogus:00"),
            (b"Authorization", b"Basic dTpw"),
            (b"Cookie", b"L402_podcast=garbage:00; theme=dark"),
            (b"X-Ad-Free", b"1"),
        ),
        client=("192.0.2.7", 40000),
    )
    outcome = forwarded(await engine.handle(sent))
    assert outcome.note is not None and outcome.note["dry_run"] == "challenge"
    assert get_all(outcome.headers, "Authorization") == ["Basic dTpw"]
    assert get_all(outcome.headers, "Cookie") == ["theme=dark"]
    assert get(outcome.headers, "X-Ad-Free") is None
    # The same on a request the dry run forwards as paid: the paywall's value, once.
    paid = forwarded(
        await engine.handle(
            Request(
                "GET",
                "/trial/x",
                "api.example",
                ((b"Host", b"api.example"), (b"X-Ad-Free", b"spoofed")),
                client=("192.0.2.99", 40000),
            )
        )
    )
    assert paid.note is not None and paid.note["dry_run"] == "freebie"
    assert get(paid.headers, "X-Ad-Free") is None


async def test_the_option_alone_and_the_rules_alone_each_turn_it_on(tmp_path: Path) -> None:
    async with engine_with(tmp_path, DRY_RULES) as (engine, backend):
        assert engine.dry_run and not engine.dry_run_option
        assert isinstance(await engine.handle(request("/api/x")), Forward)
        # The option cannot turn a rules file's dry run off: either one is enough.
        engine.dry_run_option = False
        assert engine.dry_run
        assert backend.created == 0
