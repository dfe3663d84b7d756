"""The SDK pays every challenge shape from PROTOCOL.md exactly once, and never a bad challenge.

A real HTTP origin on 127.0.0.1 (tests/challenge_origin.py) and the SDK's dev wallet share one
dev ledger file, so "paid" and "not paid" are read from the ledger itself, not from the client.
"""

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.l402.headers import parse_challenges
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.invoice import decode_invoice
from l402proxy.l402.token import TokenError, decode_macaroon, inspect
from l402proxy.lightning.dev import DevLedger
from l402proxy.sdk import L402Auth
from tests.challenge_origin import (
    BAD,
    EXPENSIVE_SAT,
    PRICE_SAT,
    SHAPES,
    ChallengeOrigin,
    challenge_origin,
)

LISTENER = "listener"
MERCHANT = "merchant"
MAX_PRICE_SAT = 100
TIMEOUT = 10.0


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "devledger.sqlite"


@pytest.fixture
async def origin(ledger_path: Path) -> AsyncIterator[ChallengeOrigin]:
    async with challenge_origin(ledger_path) as served:
        yield served


@pytest.fixture
def auth(tmp_path: Path, ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[L402Auth]:
    # Nothing may fall back to ~/.l402proxy.
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    with L402Auth(
        wallet="dev",
        max_price_sat=MAX_PRICE_SAT,
        budget_daily_sat=1000,
        store=str(tmp_path / "client.sqlite"),
        dev_ledger=str(ledger_path),
    ) as opened:
        yield opened


def async_client(auth: L402Auth) -> httpx.AsyncClient:
    return httpx.AsyncClient(auth=auth, trust_env=False, timeout=TIMEOUT)


async def settled(ledger: DevLedger) -> list[dict[str, Any]]:
    return [invoice for invoice in await ledger.list_invoices() if invoice["settled"]]


async def balances(ledger: DevLedger) -> tuple[int, int]:
    return await ledger.balance(LISTENER), await ledger.balance(MERCHANT)


def scheme_of(authorization: str) -> str:
    return authorization.split(None, 1)[0].upper()


def refused_code(response: httpx.Response) -> str | None:
    value = response.headers.get("X-L402-Refused")
    return None if value is None else value.partition(";")[0].strip()


async def assert_nothing_paid(origin: ChallengeOrigin, path: str, before: tuple[int, int]) -> None:
    assert await settled(origin.ledger) == []
    assert await balances(origin.ledger) == before
    assert origin.invoices[path], "the origin issued no invoice: the test proves nothing"
    for payment_hash in origin.invoices[path]:
        state = await origin.ledger.lookup_payment(LISTENER, payment_hash)
        assert state.status == "unknown", (payment_hash.hex(), state)


# -- the origin itself: every shape is payable, every bad one is bad for the stated reason -------


async def test_origin_shapes_are_payable_by_the_reference_parser(origin: ChallengeOrigin) -> None:
    """Control: if this passes and an SDK test fails, the bug is in the SDK."""
    async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
        for name, shape in SHAPES.items():
            path = f"/shape/{name}"
            response = await client.get(origin.url + path)
            assert response.status_code == 402, name
            challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
            assert challenges and challenges[0].scheme == shape.scheme, name
            first = challenges[0]
            identifier = Identifier.decode(decode_macaroon(first.macaroon).identifier_bytes)
            invoice = decode_invoice(first.invoice)
            assert identifier.payment_hash == invoice.payment_hash == origin.invoices[path][0]
            assert invoice.amount_msat == PRICE_SAT * 1000
            paid = await origin.ledger.pay(LISTENER, first.invoice, 0)
            credential = f"{first.scheme} {first.macaroon}:{paid.preimage.hex()}"
            again = await client.get(origin.url + path, headers={"Authorization": credential})
            assert (again.status_code, again.text) == (200, f"paid {name}")


async def test_origin_bad_challenges_are_bad_for_the_stated_reason(
    origin: ChallengeOrigin,
) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=TIMEOUT) as client:
        for name, bad in BAD.items():
            response = await client.get(f"{origin.url}/bad/{name}")
            assert response.status_code == bad.status, name
            challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
            if name in ("no-challenge", "other-schemes-only", "macaroon-without-invoice"):
                assert challenges == [], name
                continue
            assert challenges, name
            try:
                identifier = Identifier.decode(
                    decode_macaroon(challenges[0].macaroon).identifier_bytes
                )
            except (TokenError, ValueError):
                assert name in ("garbled-macaroon", "macaroon-not-base64", "macaroon-truncated")
                continue
            if name == "unreadable-caveat":
                with pytest.raises(TokenError, match="services"):
                    inspect(challenges[0].macaroon)
                continue
            try:
                invoice = decode_invoice(challenges[0].invoice)
            except ValueError:
                assert name == "garbled-invoice"
                continue
            matches = identifier.payment_hash == invoice.payment_hash
            assert matches == (not name.startswith("hash-mismatch")), name
            assert (invoice.amount_msat is None) == (name == "no-amount"), name
            assert invoice.is_expired(time.time()) == (name == "invoice-expired"), name
            expected_msat = {"over-max-price": EXPENSIVE_SAT * 1000, "no-amount": None}
            assert invoice.amount_msat == expected_msat.get(name, PRICE_SAT * 1000), name


# -- the SDK pays every shape, once ----------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
async def test_pays_each_shape_once_and_reuses_the_token(
    name: str, origin: ChallengeOrigin, auth: L402Auth
) -> None:
    shape = SHAPES[name]
    path = f"/shape/{name}"
    listener, merchant = await balances(origin.ledger)
    async with async_client(auth) as client:
        first = await client.get(origin.url + path)
        assert first.status_code == 200, (first.headers.get("X-L402-Refused"), first.text)
        assert first.text == f"paid {name}"
        assert first.headers.get("X-L402-Paid", "").startswith(f"{PRICE_SAT} sat")
        assert "X-L402-Refused" not in first.headers
        assert not [value for value in first.headers.values() if "\r" in value or "\n" in value]

        second = await client.get(origin.url + path)
        assert (second.status_code, second.text) == (200, f"paid {name}")
        assert "X-L402-Paid" not in second.headers  # nothing was paid for this one

    # Exactly the challenge's invoice was settled (never a decoy), once.
    paid = await settled(origin.ledger)
    assert [invoice["payment_hash"] for invoice in paid] == [origin.invoices[path][0].hex()]
    assert await balances(origin.ledger) == (
        listener - PRICE_SAT * 1000,
        merchant + PRICE_SAT * 1000,
    )
    # One challenge, then two requests carrying the token: the second was sent with it at once.
    assert origin.challenges[path] == 1
    assert origin.granted[path] == 2
    assert origin.rejected[path] == 0
    sent = origin.authorizations[path]
    assert len(sent) == 2 and sent[0] == sent[1]
    assert scheme_of(sent[0]) == shape.scheme


async def test_paid_header_names_amount_fee_and_service(
    origin: ChallengeOrigin, auth: L402Auth
) -> None:
    async with async_client(auth) as client:
        response = await client.get(f"{origin.url}/shape/spec")
    assert response.status_code == 200
    service = origin.service_for("spec")
    pattern = rf"{PRICE_SAT} sat \(fee 0 sat\) for {re.escape(service)}"
    assert re.fullmatch(pattern, response.headers["X-L402-Paid"])


async def test_two_sibling_services_are_paid_once_each(
    origin: ChallengeOrigin, auth: L402Auth
) -> None:
    """Two paywalls side by side in one directory: going back and forth never pays again."""
    names = ("spec", "aperture")
    async with async_client(auth) as client:
        for _ in range(3):
            for name in names:
                response = await client.get(f"{origin.url}/shape/{name}")
                assert (response.status_code, response.text) == (200, f"paid {name}")
    assert len(await settled(origin.ledger)) == 2
    for name in names:
        assert origin.granted[f"/shape/{name}"] == 3


async def test_sync_client_pays_once_and_reuses_the_token(
    origin: ChallengeOrigin, auth: L402Auth
) -> None:
    path = "/shape/aperture"

    def fetch_twice() -> list[tuple[int, str, str | None]]:
        with httpx.Client(auth=auth, trust_env=False, timeout=TIMEOUT) as client:
            responses = [client.get(origin.url + path) for _ in range(2)]
        return [(r.status_code, r.text, r.headers.get("X-L402-Paid")) for r in responses]

    # The origin runs on this event loop: a blocking client must run off it.
    first, second = await asyncio.wait_for(asyncio.to_thread(fetch_twice), TIMEOUT * 2)
    assert first[:2] == (200, "paid aperture")
    assert first[2] is not None and first[2].startswith(f"{PRICE_SAT} sat")
    assert second == (200, "paid aperture", None)
    assert len(await settled(origin.ledger)) == 1
    assert origin.challenges[path] == 1
    assert [scheme_of(value) for value in origin.authorizations[path]] == ["LSAT", "LSAT"]


async def test_sync_client_refuses_a_hash_mismatch(origin: ChallengeOrigin, auth: L402Auth) -> None:
    path = "/bad/hash-mismatch"
    before = await balances(origin.ledger)

    def fetch() -> tuple[int, str | None]:
        with httpx.Client(auth=auth, trust_env=False, timeout=TIMEOUT) as client:
            response = client.get(origin.url + path)
        return response.status_code, refused_code(response)

    assert await asyncio.wait_for(asyncio.to_thread(fetch), TIMEOUT * 2) == (402, "hash_mismatch")
    await assert_nothing_paid(origin, path, before)


# -- ... and never a bad one -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD))
async def test_never_pays_a_bad_challenge(
    name: str, origin: ChallengeOrigin, auth: L402Auth
) -> None:
    bad = BAD[name]
    path = f"/bad/{name}"
    before = await balances(origin.ledger)
    async with async_client(auth) as client:
        response = await client.get(origin.url + path)

    # Handed back as the origin sent it, plus at most the refusal header.
    assert response.status_code == bad.status
    assert response.text == ("free content\n" if bad.status == 200 else "payment required\n")
    assert response.headers.get_list("WWW-Authenticate") == origin.sent[path][0]
    code = refused_code(response)
    assert code in bad.refused, response.headers.get("X-L402-Refused")
    if code is not None:
        message = response.headers["X-L402-Refused"].partition(";")[2].strip()
        assert message, "the refusal carries no human message"
    assert "X-L402-Paid" not in response.headers

    # No retry with a credential, and nothing moved in the ledger.
    assert origin.requests[path] == 1
    assert origin.authorizations[path] == []
    await assert_nothing_paid(origin, path, before)
