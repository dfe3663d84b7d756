"""The engine's kept verdicts (engine/verdicts.py): a repeated paid request is granted without
being judged again, and only while judging it again would grant it too."""

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from l402proxy import gate
from l402proxy.engine import Answer, Forward, Paywall, Request
from l402proxy.engine import verdicts as verdicts_module
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import decode_macaroon
from l402proxy.lightning import DevLedger

RULES = """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
  - name: metered
    match: {path: "/metered/*"}
    price_sat: 5
    rate_limits: [{requests: 100, per: 1h, key: token}]
"""
HOST = "podcast.example"


def request(path: str, *fields: tuple[bytes, bytes]) -> Request:
    return Request(
        method="GET",
        target=path,
        host=HOST,
        fields=((b"Host", HOST.encode()), *fields),
        client=("127.0.0.1", 5000),
    )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Paywall]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    paywall = Paywall()
    paywall.use_rules_file(str(rules))
    paywall.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    paywall.store_uri = str(tmp_path / "server.sqlite")
    await paywall.open()
    yield paywall
    await paywall.close()


async def buy(engine: Paywall, tmp_path: Path, path: str) -> bytes:
    """An Authorization value for `path`, paid through the dev ledger."""
    answer = await engine.handle(request(path, (b"Accept-Authenticate", b"L402")))
    assert isinstance(answer, Answer) and answer.status == 402
    lines = [v.decode() for k, v in answer.headers if k.lower() == b"www-authenticate"]
    challenge = parse_challenges(lines)[0]
    payer = DevLedger(tmp_path / "devledger.sqlite")
    try:
        payment = await payer.pay("listener", challenge.invoice, 0)
    finally:
        await payer.close()
    return format_credential([challenge.macaroon], payment.preimage).encode()


@pytest.fixture
def judged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths gate.decide was asked about: a kept verdict asks it nothing."""
    asked: list[str] = []
    decide = gate.decide

    def counting(**kwargs: Any) -> gate.Decision:
        asked.append(kwargs["rule"].name)
        return decide(**kwargs)

    monkeypatch.setattr(gate, "decide", counting)
    return asked


async def test_a_repeated_paid_request_is_granted_without_judging_it_again(
    engine: Paywall, tmp_path: Path, judged: list[str]
) -> None:
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    judged.clear()
    first = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    again = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert judged == ["podcast"]
    for outcome in (first, again):
        assert isinstance(outcome, Forward) and outcome.path == "/adfree/ep1.mp3"
        assert outcome.headers == ((b"Host", HOST.encode()),)  # our credential never forwarded
    assert isinstance(first, Forward) and isinstance(again, Forward)
    assert again.note == first.note and again.note is not first.note
    # A door writing into its note changes nothing for the next request.
    again.note["variant"] = "free"  # type: ignore[index]
    third = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert isinstance(third, Forward) and third.note is not None
    assert third.note["variant"] == "paid"
    # Any other head is judged: another path, another field, another byte of the credential.
    for other in (
        request("/episodes/ep2.mp3", (b"Authorization", token)),
        request("/episodes/ep1.mp3", (b"Authorization", token), (b"Range", b"bytes=0-")),
        request("/episodes/ep1.mp3", (b"Authorization", token[:-1] + b"0")),
    ):
        await engine.handle(other)
    assert judged == ["podcast"] * 4


async def test_a_kept_verdict_ends_with_a_revocation_by_either_id(
    engine: Paywall, tmp_path: Path
) -> None:
    for revoke in ("token_id", "payment_hash"):
        token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
        macaroon = token.decode().split()[1].split(":")[0]
        identifier = Identifier.decode(decode_macaroon(macaroon).identifier_bytes)
        granted = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
        assert isinstance(granted, Forward)
        engine.revoked.add(getattr(identifier, revoke))
        refused = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
        assert isinstance(refused, Answer) and refused.status == 402, revoke


async def test_a_kept_verdict_ends_when_the_token_expires(
    engine: Paywall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    granted = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert isinstance(granted, Forward)
    later = time.time() + 10 * 24 * 3600  # past valid_for and the invoice expiry
    monkeypatch.setattr(time, "time", lambda: later)
    expired = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert isinstance(expired, Answer) and expired.status == 402


async def test_new_rules_judge_every_request_anew(
    engine: Paywall, tmp_path: Path, judged: list[str]
) -> None:
    token = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("/adfree/", "/premium/"))
    engine.use_rules_file(str(rules))
    judged.clear()
    moved = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", token)))
    assert isinstance(moved, Forward) and moved.path == "/premium/ep1.mp3"
    assert judged == ["podcast"]


async def test_what_counts_every_request_is_never_kept(
    engine: Paywall, tmp_path: Path, judged: list[str]
) -> None:
    token = await buy(engine, tmp_path, "/metered/x")
    podcast = await buy(engine, tmp_path, "/episodes/ep1.mp3")
    judged.clear()
    for _ in range(3):
        granted = await engine.handle(request("/metered/x", (b"Authorization", token)))
        assert isinstance(granted, Forward)
    assert judged == ["metered"] * 3
    # A dry run pretends: nothing it forwards is kept, and nothing kept before is given.
    engine.dry_run_option = True
    for _ in range(2):
        pretended = await engine.handle(request("/episodes/ep1.mp3", (b"Authorization", podcast)))
        assert isinstance(pretended, Forward) and pretended.note is not None
        assert "dry_run" in pretended.note
    assert len(engine.verdicts) == 0


def test_the_kept_verdicts_stay_bounded() -> None:
    cache = verdicts_module.VerdictCache(max_entries=3)
    forward = Forward(headers=())
    ids = (b"t" * 32, b"p" * 32)
    for n in range(5):
        key = ("GET", HOST, f"/p/{n}", (), False, ((b"Host", HOST.encode()),))
        cache.keep(key, forward, None, ids, None)
    assert len(cache) == 3
    assert (
        cache.reuse(("GET", HOST, "/p/0", (), False, ((b"Host", HOST.encode()),)), 0, set(), None)
        is None
    )
    big = ((b"Cookie", b"x" * verdicts_module.MAX_HEAD_BYTES),)
    cache.keep(("GET", HOST, "/big", (), False, big), forward, None, ids, None)
    assert cache.reuse(("GET", HOST, "/big", (), False, big), 0, set(), None) is None
    # Fields given as lists cannot be a key: nothing kept, nothing found, nothing raised.
    listed = ("GET", HOST, "/l", (), False, [[b"Host", b"x"]])
    cache.keep(listed, forward, None, ids, None)  # type: ignore[arg-type]
    assert cache.reuse(listed, 0, set(), None) is None  # type: ignore[arg-type]
