"""Issue 16's Payment scheme (a Lightning charge: one request per paid invoice) through real
processes: an exchange through each front door (tests/e2e/doors.py: mitmdump, the ASGI
middleware under uvicorn, nginx asking serve-auth) in front of the sample origin, and the same
credential replayed and spent at once over two mitmdump instances on one PostgreSQL.

A client's view: the 402's Payment line beside the LSAT/L402 ones (or alone), its RFC 9457
body, the invoice paid with the dev ledger, the credential built with l402/payment.py; the
paid variant with its Payment-Receipt (Cache-Control private, the credential never at the
origin: X-Origin-Authorization), and every second use refused with a fresh challenge.
"""

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402 import payment
from l402proxy.l402.headers import parse_challenges
from l402proxy.l402.invoice import decode_invoice
from tests.postgres import PostgresServer

from . import procs
from .doors import KINDS, Door, DoorKind, start_door, uvicorn
from .test_doors_behaviour import ask
from .test_pricing_models_e2e import all_at_once
from .test_scale_out_e2e import proxy_instance, running, statuses

pytestmark = pytest.mark.e2e

RECEIPT = payment.RECEIPT_HEADER
CLIENTS = 16
RULES = """\
invoice_limit: {requests: 1000, per: 1m, burst: 1000}
services:
  - name: api
    match: {path: "/api/*"}
    price_sat: 10
    schemes: [l402, payment]
    paid:
      set_headers: {X-L402-Tier: premium}
  - name: episodes
    match: {path: "/episodes/*"}
    price_sat: 5
    schemes: [payment]
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
"""


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payment-rules") / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module", params=KINDS)
def door(
    request: pytest.FixtureRequest, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    kind: DoorKind = request.param
    work = tmp_path_factory.mktemp(f"payment-{kind}")
    with start_door(kind, work, work / "home", rules) as started_door:
        yield started_door


def problem_of(response: httpx.Response, problem_type: str) -> payment.Challenge:
    """A 402 with its RFC 9457 body of `problem_type`, and the fresh Payment challenge it
    carries (the one the body names); never a receipt."""
    assert response.status_code == 402, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Cache-Control"] == "no-store"
    assert RECEIPT not in response.headers
    body = response.json()
    assert body["type"] == payment.PROBLEM_BASE + problem_type, body
    challenges = payment.parse_challenges(response.headers.get_list("WWW-Authenticate"))
    assert [c.id for c in challenges] == [body["challengeId"]]
    return challenges[0]


def pay(home: Path, challenge: payment.Challenge) -> str:
    """The credential for `challenge`, its invoice checked against the request (as a client
    must) and paid with the dev ledger."""
    request = challenge.charge_request()
    assert payment.invoice_mismatches(request, decode_invoice(request.invoice)) == []
    return payment.encode_credential(challenge, procs.dev_pay(home, request.invoice))


def paid(response: httpx.Response, challenge: payment.Challenge) -> None:
    """The paid variant with the receipt of `challenge`'s charge, private, the credential kept
    from the origin."""
    assert response.status_code in (200, 206), (response.status_code, response.text[:500])
    receipt = payment.decode_receipt(response.headers[RECEIPT])
    assert receipt.challenge_id == challenge.id
    assert receipt.reference == challenge.charge_request().payment_hash.hex()  # type: ignore[union-attr]
    assert response.headers["Cache-Control"] == "private"
    assert "Authorization" in response.headers["Vary"]
    assert response.headers["X-Origin-Authorization"] == "absent"
    assert "set-cookie" not in response.headers


def test_a_charge_pays_for_one_request_beside_an_l402_token(door: Door) -> None:
    offer = ask(door, "/api/x")
    lines = offer.headers.get_list("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402", "Payment"]
    challenge = problem_of(offer, "payment-required")
    # One invoice per 402: the token and the charge are paid by the same one.
    assert {found.invoice for found in parse_challenges(lines)} == {
        challenge.charge_request().invoice
    }
    assert offer.json()["macaroon"] == parse_challenges(lines)[0].macaroon
    credential = pay(door.home, challenge)
    granted = ask(door, "/api/x", Authorization=credential)
    paid(granted, challenge)
    assert granted.json() == {"path": "/api/x", "tier": "premium"}
    # Once: the same request again is a second use, refused with a fresh challenge.
    again = ask(door, "/api/x", Authorization=credential)
    fresh = problem_of(again, "invalid-challenge")
    assert fresh.id != challenge.id
    assert again.json()["detail"] == "this charge was used already: pay a new one"


def test_a_payment_only_service_with_a_rewrite(door: Door) -> None:
    offer = ask(door, "/episodes/ep1.mp3", Accept="text/html")
    assert len(offer.headers.get_list("WWW-Authenticate")) == 1  # no token sold here
    challenge = problem_of(offer, "payment-required")
    assert challenge.charge_request().amount_sat == 5
    credential = pay(door.home, challenge)
    granted = ask(door, "/episodes/ep1.mp3", Authorization=credential, Range="bytes=0-9")
    paid(granted, challenge)
    assert granted.headers["X-Origin-Path"] == "/adfree/ep1.mp3"
    assert granted.content == b"AD-FREE ep"
    problem_of(ask(door, "/episodes/ep1.mp3", Authorization=credential), "invalid-challenge")


def test_a_charge_consumed_stays_consumed_when_the_origin_fails(door: Door) -> None:
    """The origin answers 404 for an episode it does not have: no receipt on that error, and
    the charge is spent all the same (never re-issued)."""
    challenge = problem_of(ask(door, "/episodes/ep9.mp3"), "payment-required")
    credential = pay(door.home, challenge)
    missing = ask(door, "/episodes/ep9.mp3", Authorization=credential)
    assert missing.status_code == 404 and RECEIPT not in missing.headers
    assert missing.headers["X-Origin-Path"] == "/adfree/ep9.mp3"
    problem_of(ask(door, "/episodes/ep1.mp3", Authorization=credential), "invalid-challenge")


def test_refusals_carry_the_problem_type_and_a_fresh_challenge(door: Door) -> None:
    challenge = problem_of(ask(door, "/api/x"), "payment-required")
    problem_of(ask(door, "/api/x", Authorization="Payment !!"), "malformed-credential")
    wrong = payment.encode_credential(challenge, b"\x05" * 32)
    problem_of(ask(door, "/api/x", Authorization=wrong), "verification-failed")
    # A charge for the cheaper service does not buy the dearer one; it still buys its own.
    cheap = problem_of(ask(door, "/episodes/ep2.mp3"), "payment-required")
    credential = pay(door.home, cheap)
    problem_of(ask(door, "/api/x", Authorization=credential), "payment-insufficient")
    paid(ask(door, "/episodes/ep2.mp3", Authorization=credential, Range="bytes=0-3"), cheap)


# -- two instances, one PostgreSQL ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    postgres: PostgresServer, rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[str]]]:
    """Two mitmdump instances on one PostgreSQL database, the same rules and dev ledger:
    (home, [base URL A, base URL B])."""
    uri = asyncio.run(postgres.new_database())
    workdir = tmp_path_factory.mktemp("payment-scale-out")
    home = workdir / "home"
    home.mkdir()
    origin = uvicorn(workdir, home, "l402proxy.origin_asgi:app")
    with running(origin):
        a = proxy_instance(workdir, home, "A", origin.url, rules, uri)
        b = proxy_instance(workdir, home, "B", origin.url, rules, uri)
        with running(a, b):
            yield home, [a.url, b.url]


@dataclass(frozen=True)
class Spender:
    """What all_at_once sends (it reads `.authorization` only): here a Payment credential."""

    authorization: str


def get(base: str, path: str, **headers: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        return http.get(base + path, headers=headers)


def test_a_charge_is_used_once_across_instances(cluster: tuple[Path, list[str]]) -> None:
    home, bases = cluster
    for first, then in ((0, 1), (1, 0)):
        challenge = payment.parse_challenges(
            get(bases[first], "/api/x").headers.get_list("WWW-Authenticate")
        )[0]
        credential = pay(home, challenge)
        # Minted by one instance, taken by the other (one secret, one store), once.
        used = get(bases[then], "/api/x", Authorization=credential)
        assert used.status_code == 200 and RECEIPT in used.headers
        replay = get(bases[first], "/api/x", Authorization=credential)
        assert replay.status_code == 402 and RECEIPT not in replay.headers
        assert replay.json()["type"] == payment.PROBLEM_BASE + "invalid-challenge"


def test_one_credential_spent_at_once_over_both_instances_buys_one_request(
    cluster: tuple[Path, list[str]],
) -> None:
    home, bases = cluster
    challenge = payment.parse_challenges(
        get(bases[0], "/api/x").headers.get_list("WWW-Authenticate")
    )[0]
    credential = Spender(pay(home, challenge))
    answers = all_at_once(bases, "/api/x", credential, CLIENTS, 1)  # type: ignore[arg-type]
    assert statuses(answers) == {200: 1, 402: CLIENTS - 1}
    for answer in answers:
        if answer.status_code == 200:
            receipt = payment.decode_receipt(answer.headers[RECEIPT])
            assert receipt.challenge_id == challenge.id
        else:
            body = json.loads(answer.content)
            assert body["type"] == payment.PROBLEM_BASE + "invalid-challenge"
            assert RECEIPT not in answer.headers
