"""`l402proxy decode`: the JSON for every challenge or credential (L402, LSAT, Payment), Payment
receipt or problem body, and an exit status that says whether anything in the value is usable
(0), nothing is (3), or it is no such value at all (2)."""

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from l402proxy.cli import EXIT_BAD_INPUT, EXIT_UNUSABLE, main
from l402proxy.l402 import payment
from l402proxy.l402.b64url import b64url_encode
from l402proxy.l402.headers import format_challenge
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import mint
from tests.unit.test_payer import foreign_invoice
from tests.unit.test_payment_vectors import CREDENTIAL_VECTORS, RECEIPT_VECTORS

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
    assert captured.err.startswith(
        "l402proxy: not an L402/LSAT or Payment challenge, credential or receipt"
    )


# --- the Payment scheme (draft-httpauth-payment, lightning/charge) ---------------------------

SECRET = b"binding secret, 32 bytes long.."


def paid_challenge(
    preimage: bytes | None = None, *, amount_sat: int = 21, network: str = "regtest"
) -> tuple[payment.Challenge, bytes]:
    """A challenge as our server mints one (request and invoice agree), and its preimage."""
    preimage = preimage or os.urandom(32)
    payment_hash = hashlib.sha256(preimage).digest()
    invoice = foreign_invoice(payment_hash, amount_sat * 1000)
    minted = payment.mint_challenge(
        SECRET,
        "api.example.com",
        invoice,
        amount_sat,
        payment_hash,
        network,
        time.time() + 300,
        opaque={"route": "/bonus"},
    )
    return minted, preimage


def with_request(challenge: payment.Challenge, **changes: object) -> payment.Challenge:
    """`challenge` whose request says something else than its invoice."""
    request = replace(challenge.charge_request(), **changes)  # type: ignore[arg-type]
    return replace(challenge, request=request.encode())


def refused(capsys: pytest.CaptureFixture[str], value: str) -> str:
    """Bad input: exit 2, nothing on stdout, one line on stderr (returned)."""
    assert main(["decode", value]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    return captured.err


def test_payment_challenges_beside_l402_ones_are_each_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Aperture's 402: LSAT, L402 and Payment challenges in one value; a malformed Payment
    challenge is shown with why it cannot be read."""
    challenge_, preimage = paid_challenge()
    payment_hash = hashlib.sha256(preimage).digest()
    l402 = format_challenge("L402", macaroon_for(payment_hash), foreign_invoice(payment_hash, 1))
    broken = 'Payment id="abc", realm="api.example.com"'
    value = f"WWW-Authenticate: {l402}, {payment.header_value(challenge_)}, {broken}"

    code, decoded = decode(capsys, value)

    assert code == 0
    assert decoded["kind"] == "challenge"
    l402_entry, offered, skipped = decoded["challenges"]
    assert (l402_entry["scheme"], l402_entry["usable"]) == ("L402", True)
    assert offered["scheme"] == "Payment"
    assert (offered["id"], offered["realm"]) == (challenge_.id, "api.example.com")
    assert (offered["method"], offered["intent"]) == ("lightning", "charge")
    assert offered["expires"] == challenge_.expires
    assert offered["expires_at"] == payment.parse_rfc3339(challenge_.expires or "")
    assert offered["expired"] is False
    assert offered["opaque"] == {"route": "/bonus"}
    assert offered["params"] == challenge_.echo()
    request = offered["request"]
    invoice = challenge_.charge_request().invoice
    assert (request["amount_sat"], request["currency"], request["invoice"]) == (21, "sat", invoice)
    assert (request["payment_hash"], request["network"]) == (payment_hash.hex(), "regtest")
    details = offered["invoice_details"]
    assert (details["payment_hash"], details["amount_msat"]) == (payment_hash.hex(), 21_000)
    assert details["network"] == "regtest"
    assert offered["payment_hash"] == payment_hash.hex()
    assert offered["mismatches"] == []
    assert offered["usable"] is True
    assert skipped == {
        "scheme": "Payment",
        "error": "Payment challenge without the method parameter",
        "usable": False,
    }


def amount_disagrees() -> payment.Challenge:
    return with_request(paid_challenge()[0], amount_sat=1)


def hash_disagrees() -> payment.Challenge:
    return with_request(paid_challenge()[0], payment_hash=os.urandom(32))


def network_disagrees() -> payment.Challenge:
    return with_request(paid_challenge()[0], network="mainnet")


def unreadable_invoice() -> payment.Challenge:
    return with_request(paid_challenge()[0], invoice="lnbcrt1notaninvoice")


def unreadable_request() -> payment.Challenge:
    return replace(paid_challenge()[0], request="eyJhbW91bnQiOjF9")  # {"amount":1}


def another_intent() -> payment.Challenge:
    return replace(paid_challenge()[0], intent="session")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(amount_disagrees, ("mismatches", "msat"), id="amount"),
        pytest.param(hash_disagrees, ("mismatches", "paymentHash"), id="payment-hash"),
        pytest.param(network_disagrees, ("mismatches", "mainnet"), id="network"),
        pytest.param(unreadable_invoice, ("invoice_details", "BOLT11"), id="invoice"),
        pytest.param(unreadable_request, ("request", "amount"), id="request"),
        pytest.param(another_intent, ("error", "only lightning/charge"), id="intent"),
    ],
)
def test_a_payment_challenge_a_payer_would_refuse_exits_3_with_the_reason(
    capsys: pytest.CaptureFixture[str],
    make: Callable[[], payment.Challenge],
    reason: tuple[str, str],
) -> None:
    code, decoded = decode(capsys, payment.header_value(make()))
    assert code == EXIT_UNUSABLE
    [entry] = decoded["challenges"]
    assert entry["usable"] is False
    where, words = reason
    assert words in json.dumps(entry[where]), entry[where]


def test_only_malformed_payment_challenges_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    value = 'Payment id="a", realm="b", method="Lightning", intent="charge", request="e30"'
    code, decoded = decode(capsys, f"{value}, Payment realm=unquoted=")
    assert code == EXIT_UNUSABLE
    assert decoded["challenges"] == [
        {
            "scheme": "Payment",
            "error": "Payment challenge method is not lowercase letters",
            "usable": False,
        },
        {
            "scheme": "Payment",
            "error": (
                "malformed Payment challenge: parameter 'realm': unexpected '=' after its value"
            ),
            "usable": False,
        },
    ]


@pytest.mark.parametrize("form", ["authorization", "payment-authorization", "scheme", "bare"])
def test_a_payment_credential_shows_its_challenge_and_whether_the_preimage_pays(
    capsys: pytest.CaptureFixture[str], form: str
) -> None:
    challenge_, preimage = paid_challenge()
    value = payment.encode_credential(challenge_, preimage, source="did:example:payer")
    token = value.split(" ", 1)[1]
    value = {
        "authorization": f"Authorization: {value}",
        "payment-authorization": f"Payment-Authorization: {token}",
        "scheme": value,
        "bare": token,
    }[form]

    code, decoded = decode(capsys, value)

    assert code == 0
    assert decoded["kind"] == "credential"
    [entry] = decoded["credentials"]
    assert entry["scheme"] == "Payment"
    assert entry["source"] == "did:example:payer"
    echoed = entry["challenge"]
    assert echoed["params"] == challenge_.echo()
    assert echoed["request"]["amount_sat"] == 21
    assert echoed["mismatches"] == []
    payment_hash = hashlib.sha256(preimage).hexdigest()
    assert echoed["payment_hash"] == payment_hash
    # Shown, as decode shows an L402 credential's: the value decoded holds it already.
    assert entry["preimage"] == preimage.hex()
    assert entry["preimage_hash"] == payment_hash
    assert entry["preimage_matches"] is True and entry["usable"] is True


def test_a_payment_credential_that_pays_for_nothing_here_exits_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    challenge_, _ = paid_challenge()
    code, decoded = decode(capsys, payment.encode_credential(challenge_, os.urandom(32)))
    assert code == EXIT_UNUSABLE
    [entry] = decoded["credentials"]
    assert entry["preimage_matches"] is False and entry["usable"] is False

    # The preimage pays for the invoice, but the request disagrees with it: never paid.
    disagreeing = with_request(paid_challenge(preimage := os.urandom(32))[0], amount_sat=1)
    code, decoded = decode(capsys, payment.encode_credential(disagreeing, preimage))
    assert code == EXIT_UNUSABLE
    [entry] = decoded["credentials"]
    assert entry["preimage_matches"] is True and entry["usable"] is False
    assert entry["challenge"]["mismatches"]

    # Another method's credential: shown as sent, nothing checked.
    other = {
        "challenge": {**challenge_.echo(), "method": "stripe"},
        "payload": {"spt": "spt_123"},
    }
    token = b64url_encode(json.dumps(other).encode())
    code, decoded = decode(capsys, f"Payment {token}")
    assert code == EXIT_UNUSABLE
    [entry] = decoded["credentials"]
    assert entry["payload"] == {"spt": "spt_123"}
    assert "only lightning/charge" in entry["challenge"]["error"]
    assert entry["usable"] is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(None, "not base64url: character '+'", id="alphabet"),
        pytest.param(b"not json", "credential is not valid JSON", id="json"),
        pytest.param(b'{"payload": {}}', "credential has no challenge object", id="no-challenge"),
        pytest.param(b"[1]", "credential is not a JSON object", id="array"),
        pytest.param(
            b'{"challenge": {"id": "a"}, "payload": {}}', "challenge.realm is missing", id="echo"
        ),
    ],
)
def test_a_malformed_payment_credential_is_one_line_that_never_echoes_it(
    capsys: pytest.CaptureFixture[str], body: bytes | None, message: str
) -> None:
    challenge_, preimage = paid_challenge()
    good = payment.encode_credential(challenge_, preimage).split(" ", 1)[1]
    token = good[:10] + "+" + good[11:] if body is None else b64url_encode(body)
    err = refused(capsys, f"Payment {token}")
    assert err.startswith("l402proxy: not a Payment credential: ")
    assert message in err
    assert token not in err and preimage.hex() not in err


def test_an_uppercase_preimage_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    challenge_, preimage = paid_challenge()
    body = {"challenge": challenge_.echo(), "payload": {"preimage": preimage.hex().upper()}}
    err = refused(capsys, f"Payment {b64url_encode(json.dumps(body).encode())}")
    assert "payload.preimage must be 64 lowercase hex characters" in err
    assert preimage.hex().upper() not in err


@pytest.mark.parametrize("form", ["header", "bare"])
def test_a_payment_receipt(capsys: pytest.CaptureFixture[str], form: str) -> None:
    payment_hash = os.urandom(32)
    receipt = payment.encode_receipt("the-challenge-id", payment_hash, 1_800_000_000.0)
    value = f"Payment-Receipt: {receipt}" if form == "header" else receipt

    code, decoded = decode(capsys, value)

    assert code == 0
    assert decoded == {
        "kind": "receipt",
        "receipt": {
            "status": "success",
            "method": "lightning",
            "timestamp": "2027-01-15T08:00:00Z",
            "timestamp_at": 1_800_000_000.0,
            "timestamp_at_iso": "2027-01-15T08:00:00Z",
            "reference": payment_hash.hex(),
            "challenge_id": "the-challenge-id",
            "reference_is_payment_hash": True,
        },
    }


def test_a_receipt_whose_reference_is_no_payment_hash_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = {"status": "success", "method": "lightning", "timestamp": "2026-01-01T00:00:00Z"}
    value = b64url_encode(json.dumps({**body, "reference": "0xabc", "extra": 1}).encode())
    code, decoded = decode(capsys, f"Payment-Receipt: {value}")
    assert code == 0
    assert decoded["receipt"]["reference_is_payment_hash"] is False
    assert decoded["receipt"]["extra"] == {"extra": 1}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "Payment-Receipt: " + b64url_encode(b'{"status": "failed", "reference": "x"}'),
            'not a Payment receipt: receipt status is not "success"',
        ),
        (
            "Payment-Receipt: " + b64url_encode(b'{"status": "success", "method": "lightning"}'),
            "not a Payment receipt: receipt timestamp is missing",
        ),
        ("Payment-Receipt: abc/def", "not a Payment receipt: receipt is not base64url"),
        (b64url_encode(b'{"hello": "world"}'), "neither a Payment credential nor a receipt"),
        (b64url_encode(b"plain text"), "value is not valid JSON"),
    ],
)
def test_a_malformed_receipt_or_bare_value_is_one_line(
    capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    assert message in refused(capsys, value)


def test_a_payment_problem_body(capsys: pytest.CaptureFixture[str]) -> None:
    body = payment.problem_json(
        "verification-failed",
        "Payment Verification Failed",
        "the preimage does not match the invoice",
        402,
        challenge_id="the-challenge-id",
    )
    code, decoded = decode(capsys, body.decode())
    assert code == 0
    assert decoded == {
        "kind": "problem",
        "problem": {
            "type": "https://paymentauth.org/problems/verification-failed",
            "title": "Payment Verification Failed",
            "status": 402,
            "detail": "the preimage does not match the invoice",
            "challenge_id": "the-challenge-id",
            "payment_problem": "verification-failed",
        },
    }

    code, decoded = decode(capsys, '{"title": "Not Found", "status": 404, "trace": "x"}')
    assert code == 0
    assert decoded["problem"]["payment_problem"] is None
    assert decoded["problem"]["extra"] == {"trace": "x"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"hello": "world"}', "a JSON object with a type, title, status or detail"),
        ('{"type": "x", "type": "y"}', "duplicate member name"),
        ('{"status": 402', "problem body is not valid JSON"),
    ],
)
def test_a_json_body_that_is_no_problem_is_one_line(
    capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    err = refused(capsys, value)
    assert err.startswith("l402proxy: not a problem+json body: ") and message in err


@pytest.mark.parametrize(("body", "header"), RECEIPT_VECTORS)
def test_aperture_s_receipt_vectors(
    capsys: pytest.CaptureFixture[str], body: str, header: str
) -> None:
    expected = json.loads(body)
    code, decoded = decode(capsys, f"Payment-Receipt: {header}")
    assert code == 0
    receipt = decoded["receipt"]
    assert (receipt["timestamp"], receipt["reference"]) == (
        expected["timestamp"],
        expected["reference"],
    )
    assert receipt["challenge_id"] == expected.get("challengeId")
    # Its stand-in references are short hex, not a payment hash.
    assert receipt["reference_is_payment_hash"] is False


def test_aperture_s_session_credential_vector_is_shown_not_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    [(_, body, header, _)] = [v for v in CREDENTIAL_VECTORS if "with a source" in v[0]]
    code, decoded = decode(capsys, header)
    assert code == EXIT_UNUSABLE
    [entry] = decoded["credentials"]
    assert entry["payload"] == json.loads(body)["payload"]
    assert entry["source"].startswith("did:key:")
    assert entry["challenge"]["intent"] == "session"
    assert entry["challenge"]["description"] == "Q&A endpoint"
    assert entry["usable"] is False


def test_a_challenge_pasted_with_an_authorization_prefix_is_still_read_as_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    challenge_, _ = paid_challenge()
    code, decoded = decode(capsys, f"Authorization: {payment.header_value(challenge_)}")
    assert code == 0
    assert [entry["scheme"] for entry in decoded["challenges"]] == ["Payment"]
