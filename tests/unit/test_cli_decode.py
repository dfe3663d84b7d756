"""`l402proxy decode`: the JSON for every challenge or credential, and an exit status that says
whether anything in the value is usable (0), nothing is (3), or it is no L402 value at all (2)."""

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from l402proxy.cli import EXIT_BAD_INPUT, EXIT_UNUSABLE, main
from l402proxy.l402.headers import format_challenge
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import mint
from tests.unit.test_payer import foreign_invoice

NOT_A_MACAROON = "bm90IGEgbWFjYXJvb24="  # base64 of "not a macaroon"


def macaroon_for(payment_hash: bytes) -> str:
    return mint(os.urandom(32), Identifier.new(payment_hash), ["services=podcast:0"])


def challenge(macaroon: str, invoice: str, scheme: str = "L402") -> str:
    return f'{scheme} macaroon="{macaroon}", invoice="{invoice}"'


def decode(capsys: pytest.CaptureFixture[str], value: str) -> tuple[int, Any]:
    code = main(["decode", value])
    captured = capsys.readouterr()
    assert captured.err == ""
    return code, json.loads(captured.out)


def test_a_good_challenge_is_usable(capsys: pytest.CaptureFixture[str]) -> None:
    payment_hash = os.urandom(32)
    value = format_challenge("L402", macaroon_for(payment_hash), foreign_invoice(payment_hash, 1))
    code, decoded = decode(capsys, f"WWW-Authenticate: {value}")
    assert code == 0
    [entry] = decoded["challenges"]
    assert entry["usable"] is True and entry["payment_hash_matches"] is True


def bad_macaroon() -> str:
    return challenge(NOT_A_MACAROON, foreign_invoice(os.urandom(32), 21_000))


def bad_invoice() -> str:
    return challenge(macaroon_for(os.urandom(32)), "lnbcrt1notaninvoice")


def other_payment() -> str:
    return challenge(macaroon_for(os.urandom(32)), foreign_invoice(os.urandom(32), 21_000))


@pytest.mark.parametrize(
    ("make", "error_at"),
    [
        pytest.param(bad_macaroon, ("error",), id="unreadable-macaroon"),
        pytest.param(bad_invoice, ("invoice_details", "error"), id="unreadable-invoice"),
        pytest.param(other_payment, None, id="invoice-for-another-payment"),
    ],
)
def test_a_challenge_with_nothing_usable_exits_3_with_the_reasons(
    capsys: pytest.CaptureFixture[str], make: Callable[[], str], error_at: tuple[str, ...] | None
) -> None:
    code, decoded = decode(capsys, make())
    assert code == EXIT_UNUSABLE == 3
    [entry] = decoded["challenges"]
    assert entry["usable"] is False and entry["payment_hash_matches"] is False
    if error_at is not None:
        where: Any = entry
        for key in error_at:
            where = where[key]
        assert isinstance(where, str) and where  # the per-field error is kept


def test_one_usable_challenge_among_broken_ones_is_enough(
    capsys: pytest.CaptureFixture[str],
) -> None:
    payment_hash = os.urandom(32)
    good = challenge(macaroon_for(payment_hash), foreign_invoice(payment_hash, 1), "LSAT")
    code, decoded = decode(capsys, f"{bad_macaroon()}, {good}")
    assert code == 0
    assert [c["usable"] for c in decoded["challenges"]] == [False, True]


def test_credentials_usable_only_with_a_readable_macaroon_and_its_preimage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    preimage = os.urandom(32)
    macaroon = macaroon_for(hashlib.sha256(preimage).digest())

    code, decoded = decode(capsys, f"Authorization: L402 {macaroon}:{preimage.hex()}")
    assert code == 0
    assert decoded["credentials"][0]["macaroons"][0]["usable"] is True

    code, decoded = decode(capsys, f"L402 {macaroon}:{os.urandom(32).hex()}")
    assert code == EXIT_UNUSABLE
    assert decoded["credentials"][0]["macaroons"][0]["usable"] is False

    code, decoded = decode(capsys, f"LSAT {NOT_A_MACAROON}:{preimage.hex()}")
    assert code == EXIT_UNUSABLE
    [described] = decoded["credentials"][0]["macaroons"]
    assert described["usable"] is False and described["error"]

    code, decoded = decode(capsys, f"L402 {NOT_A_MACAROON},{macaroon}:{preimage.hex()}")
    assert code == 0


def test_no_l402_value_at_all_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decode", "Bearer nothing-here"]) == EXIT_BAD_INPUT == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("l402proxy: not an L402/LSAT challenge or credential")
