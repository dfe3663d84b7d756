"""The Payment scheme (draft-httpauth-payment, lightning/charge) as l402/payment.py builds it:
minting and binding, the WWW-Authenticate line both ways, credentials, the pure checks,
receipts, problem bodies, Accept-Payment, and a request checked against its own invoice.
Aperture's cross-implementation vectors are in test_payment_vectors.py."""

import dataclasses
import hashlib
import json

import pytest
from coincurve import PrivateKey

from l402proxy.l402.accept_payment import PaymentRange, order_offers, parse_accept_payment
from l402proxy.l402.b64url import b64url_decode, b64url_encode
from l402proxy.l402.invoice import decode_invoice
from l402proxy.l402.jcs import canonical_json, loads_strict
from l402proxy.l402.payment import (
    MAX_JSON_SIZE,
    PROBLEMS,
    Challenge,
    ChargeRequest,
    PaymentSchemeError,
    challenge_id,
    check_credential,
    decode_charge_request,
    decode_credential,
    decode_receipt,
    encode_credential,
    encode_receipt,
    header_value,
    invoice_mismatches,
    is_payment_authorization,
    mint_challenge,
    order_challenges,
    parse_challenges,
    parse_rfc3339,
    problem_json,
    read_challenges,
    verify_binding,
)
from l402proxy.lightning.bolt11_encoder import encode_invoice

SECRET = b"binding secret, 32 bytes long...."
OLD_SECRET = b"the secret we rotated away from!"
PREIMAGE = bytes(range(32))
PAYMENT_HASH = hashlib.sha256(PREIMAGE).digest()
NOW = 1_780_000_000.0
NODE_KEY = PrivateKey(hashlib.sha256(b"payment scheme test node").digest())


def make_invoice(
    amount_msat: int | None = 21_000, payment_hash: bytes = PAYMENT_HASH, currency: str = "bcrt"
) -> str:
    return encode_invoice(
        key=NODE_KEY,
        currency=currency,
        amount_msat=amount_msat,
        created_at=int(NOW),
        payment_hash=payment_hash,
        payment_secret=b"\x11" * 32,
        description="a paid page",
        expiry=600,
        min_final_cltv_expiry=18,
    )


INVOICE = make_invoice()


def mint(secret: bytes = SECRET, **overrides: object) -> Challenge:
    args: dict[str, object] = {
        "realm": "api.example.com",
        "invoice": INVOICE,
        "amount_sat": 21,
        "payment_hash": PAYMENT_HASH,
        "network": "regtest",
        "expires_at": NOW + 300.7,
    }
    args.update(overrides)
    return mint_challenge(secret, **args)  # type: ignore[arg-type]


def credential_json(challenge: dict[str, object], **top: object) -> str:
    body = {"challenge": challenge, "payload": {"preimage": PREIMAGE.hex()}}
    body.update(top)
    return "Payment " + b64url_encode(json.dumps(body).encode())


def check(challenge: Challenge, preimage: bytes = PREIMAGE, **overrides: object) -> object:
    args: dict[str, object] = {
        "secrets": [SECRET],
        "now": NOW,
        "invoice_payment_hash": PAYMENT_HASH,
    }
    args.update(overrides)
    credential = decode_credential(encode_credential(challenge, preimage))
    return check_credential(credential, **args)  # type: ignore[arg-type]


def problem_of(challenge: Challenge, preimage: bytes = PREIMAGE, **overrides: object) -> str:
    with pytest.raises(PaymentSchemeError) as caught:
        check(challenge, preimage, **overrides)
    return caught.value.problem_type


# --- minting ----------------------------------------------------------------------------------


def test_minted_challenge_carries_a_canonical_request_and_binds() -> None:
    challenge = mint(description="Weather report")
    assert (challenge.method, challenge.intent) == ("lightning", "charge")
    assert challenge.expires == "2026-05-28T20:31:40Z"  # NOW + 300.7, rounded down
    assert parse_rfc3339(challenge.expires) <= NOW + 300.7
    assert "=" not in challenge.request and "=" not in challenge.id
    raw = b64url_decode(challenge.request, max_decoded=MAX_JSON_SIZE)
    assert canonical_json(loads_strict(raw)) == raw  # JCS, byte for byte
    assert loads_strict(raw) == {
        "amount": "21",
        "currency": "sat",
        "description": "Weather report",  # in the bound request, not the unbound parameter
        "methodDetails": {
            "invoice": INVOICE,
            "network": "regtest",
            "paymentHash": PAYMENT_HASH.hex(),
        },
    }
    assert challenge.description is None
    assert challenge.charge_request() == ChargeRequest(
        21, INVOICE, PAYMENT_HASH, "regtest", description="Weather report"
    )
    assert challenge.id == challenge_id(SECRET, challenge)
    assert verify_binding(challenge, [SECRET])


def test_opaque_is_canonical_and_bound() -> None:
    challenge = mint(opaque={"route": "/b", "a": "1"})
    assert b64url_decode(challenge.opaque or "", max_decoded=100) == b'{"a":"1","route":"/b"}'
    assert challenge.opaque_map() == {"a": "1", "route": "/b"}
    tampered = dataclasses.replace(challenge, opaque=b64url_encode(b'{"a":"1","route":"/c"}'))
    assert not verify_binding(tampered, [SECRET])


@pytest.mark.parametrize("realm", ["a|b", "|", "api|"])
def test_mint_refuses_a_pipe_in_the_realm(realm: str) -> None:
    with pytest.raises(ValueError, match='"\\|"'):
        mint(realm=realm)


def test_the_pipe_ambiguity_mint_refuses_is_real() -> None:
    # Unescaped slots: realm "a|b" + method "lightning" and realm "a" + method "b|lightning"
    # have the same HMAC input, so the same id.
    first = Challenge("", "a|b", "lightning", "charge", "cQ")
    second = Challenge("", "a", "b|lightning", "charge", "cQ")
    assert challenge_id(SECRET, first) == challenge_id(SECRET, second)
    assert not verify_binding(dataclasses.replace(first, id=challenge_id(SECRET, first)), [SECRET])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secret": b"short"}, "at least 16 bytes"),
        ({"realm": "api\r\nX-Injected: 1"}, "control character"),
        ({"invoice": ""}, "BOLT11"),
        ({"invoice": "lnbc 1"}, "BOLT11"),
        ({"amount_sat": 0}, "positive"),
        ({"amount_sat": -5}, "positive"),
        ({"amount_sat": True}, "positive"),
        ({"amount_sat": 2.5}, "positive"),
        ({"payment_hash": b"\x00" * 31}, "32 bytes"),
        ({"network": "bitcoin"}, "network"),
        ({"expires_at": float("nan")}, "out of range"),
        ({"opaque": {"n": 1}}, "strings to strings"),
    ],
)
def test_mint_refuses_bad_arguments(overrides: dict[str, object], message: str) -> None:
    secret = overrides.pop("secret", SECRET)
    with pytest.raises(ValueError, match=message):
        mint(secret, **overrides)  # type: ignore[arg-type]


# --- the binding ------------------------------------------------------------------------------


def _with_request(challenge: Challenge, **changes: object) -> Challenge:
    body = loads_strict(b64url_decode(challenge.request, max_decoded=MAX_JSON_SIZE))
    assert isinstance(body, dict)
    body.update(changes)
    return dataclasses.replace(challenge, request=b64url_encode(canonical_json(body)))


TAMPERINGS = {
    "realm": lambda c: dataclasses.replace(c, realm="other.example.com"),
    "method": lambda c: dataclasses.replace(c, method="tempo"),
    "intent": lambda c: dataclasses.replace(c, intent="session"),
    "amount": lambda c: _with_request(c, amount="1"),
    "invoice": lambda c: _with_request(c, methodDetails={"invoice": make_invoice(1000)}),
    "request re-encoded (padding)": lambda c: dataclasses.replace(c, request=c.request + "="),
    "expires later": lambda c: dataclasses.replace(c, expires="2099-01-01T00:00:00Z"),
    "expires dropped": lambda c: dataclasses.replace(c, expires=None),
    "digest added": lambda c: dataclasses.replace(c, digest="sha-256=:X48E9q:"),
    "opaque added": lambda c: dataclasses.replace(c, opaque="e30"),
    "header slot added": lambda c: dataclasses.replace(c, header="Payment-Authorization"),
    "id": lambda c: dataclasses.replace(c, id=c.id[:-1] + ("A" if c.id[-1] != "A" else "B")),
    "non-ASCII id": lambda c: dataclasses.replace(c, id="\u00e9" + c.id[1:]),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_any_bound_change_breaks_the_binding(name: str) -> None:
    challenge = mint()
    assert not verify_binding(TAMPERINGS[name](challenge), [SECRET])


@pytest.mark.parametrize(
    "name", ["realm", "amount", "expires later", "request re-encoded (padding)"]
)
def test_a_tampered_credential_is_an_invalid_challenge(name: str) -> None:
    assert problem_of(TAMPERINGS[name](mint())) == "invalid-challenge"


def test_description_parameter_is_not_bound() -> None:
    challenge = mint()
    assert verify_binding(dataclasses.replace(challenge, description="anything"), [SECRET])


def test_secret_rotation_keeps_old_challenges_valid_until_dropped() -> None:
    old = mint(OLD_SECRET)
    assert verify_binding(old, [SECRET, OLD_SECRET])
    assert not verify_binding(old, [SECRET])
    assert not verify_binding(old, [])
    assert check(old, secrets=[SECRET, OLD_SECRET]).challenge_id == old.id  # type: ignore[attr-defined]


def test_the_header_slot_is_an_eighth_slot_only_when_present() -> None:
    plain = Challenge("", "r", "lightning", "charge", "cQ")
    with_header = dataclasses.replace(plain, header="Payment-Authorization")
    assert plain.binding_input() == b"r|lightning|charge|cQ|||"
    assert with_header.binding_input() == b"r|lightning|charge|cQ||||Payment-Authorization"
    bound = dataclasses.replace(with_header, id=challenge_id(SECRET, with_header))
    assert verify_binding(bound, [SECRET])


# --- the WWW-Authenticate line ---------------------------------------------------------------


def test_header_value_round_trips_through_the_parser() -> None:
    challenge = mint(realm='quote " and \\ back, comma=equals', opaque={"k": "v"})
    line = header_value(challenge)
    assert line.startswith('Payment id="')
    assert 'realm="quote \\" and \\\\ back, comma=equals"' in line
    assert parse_challenges([line]) == [challenge]
    assert verify_binding(parse_challenges([line])[0], [SECRET])


def test_header_value_refuses_what_a_header_cannot_carry() -> None:
    with pytest.raises(ValueError, match="control character"):
        header_value(dataclasses.replace(mint(), description="line\nbreak"))
    with pytest.raises(ValueError, match="non-empty id"):
        header_value(dataclasses.replace(mint(), id=""))


def test_payment_challenges_among_aperture_style_lsat_and_l402_lines() -> None:
    challenge = mint()
    lines = [
        'LSAT macaroon="AgEEbHNhdA==", invoice="lnbcrt210n1x"',
        'L402 macaroon="AgEEbHNhdA==", invoice="lnbcrt210n1x"',
        header_value(challenge),
    ]
    assert parse_challenges(lines) == [challenge]
    assert parse_challenges(" , ".join(lines)) == [challenge]  # joined into one value
    assert parse_challenges(header_value(challenge)) == [challenge]  # a bare str is one line


def test_several_payment_challenges_per_line_and_across_lines_keep_their_order() -> None:
    first, second, third = mint(), mint(amount_sat=5), mint(amount_sat=7)
    lines = [f"{header_value(first)}, Basic realm=x, {header_value(second)}", header_value(third)]
    assert parse_challenges(lines) == [first, second, third]


def test_scheme_and_parameter_names_are_case_insensitive() -> None:
    line = 'pAyMeNt ID="i", REALM="r", Method="lightning", inTent="charge", REQUEST="cQ"'
    assert parse_challenges([line]) == [Challenge("i", "r", "lightning", "charge", "cQ")]


def test_repeated_parameters_keep_the_first_and_unknown_ones_are_ignored() -> None:
    line = (
        'Payment id="i", realm="r", method="lightning", intent="charge", request="cQ",'
        ' id="spoofed", request="other", future="x", expires="2026-01-01T00:00:00Z",'
        ' expires="2099-01-01T00:00:00Z"'
    )
    (challenge,) = parse_challenges([line])
    assert (challenge.id, challenge.request) == ("i", "cQ")
    assert challenge.expires == "2026-01-01T00:00:00Z"


def test_empty_optional_parameters_are_absent() -> None:
    line = 'Payment id="i", realm="r", method="lightning", intent="charge", request="cQ", digest=""'
    assert parse_challenges([line])[0].digest is None


BASE = 'id="i", realm="r", method="lightning", intent="charge", request="cQ"'


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('Payment realm="r", method="lightning", intent="charge", request="cQ"', "without the id"),
        ('Payment id="i", method="lightning", intent="charge", request="cQ"', "without the realm"),
        ('Payment id="i", realm="r", intent="charge", request="cQ"', "without the method"),
        ('Payment id="i", realm="r", method="lightning", request="cQ"', "without the intent"),
        ('Payment id="i", realm="r", method="lightning", intent="charge"', "without the request"),
        ("Payment " + BASE.replace('id="i"', 'id=""'), "empty id"),
        (f"Payment {BASE.replace('lightning', 'Lightning')}", "lowercase"),
        (f"Payment {BASE.replace('charge', 'char ge')}", "intent"),
        (f'Payment {BASE}, expires="tomorrow"', "RFC 3339"),
        (f'Payment {BASE}, header="X-Pay"', "unsupported field"),
        ("Payment dG9rZW42OA==", "token68"),
        (f'Payment {BASE}, description="unterminated', "unterminated"),
        (f"Payment {BASE}, opaque=e30=", "unexpected '='"),
        (f'Payment {BASE}, description="bell\x07"', "control character"),
    ],
)
def test_malformed_challenges_are_skipped_with_a_reason(line: str, reason: str) -> None:
    good = header_value(mint())
    read = read_challenges([line, good])
    assert read.challenges == [mint()]
    assert len(read.skipped) == 1 and reason in read.skipped[0]
    assert "\n" not in read.skipped[0]


# --- credentials ------------------------------------------------------------------------------


def test_credential_round_trip() -> None:
    challenge = mint(opaque={"k": "v"})
    value = encode_credential(challenge, PREIMAGE, source="did:key:z6Mk")
    scheme, token = value.split(" ")
    assert scheme == "Payment" and "=" not in token
    raw = b64url_decode(token, max_decoded=MAX_JSON_SIZE)
    assert canonical_json(loads_strict(raw)) == raw
    credential = decode_credential(value)
    assert credential.challenge == challenge
    assert credential.preimage == PREIMAGE
    assert credential.source == "did:key:z6Mk"
    assert PREIMAGE.hex() not in repr(credential)


def test_credential_scheme_is_case_insensitive_and_padding_is_accepted() -> None:
    value = encode_credential(mint(), PREIMAGE)
    token = value.split(" ")[1]
    padded = token + "=" * (-len(token) % 4)
    for variant in (f"payment {token}", f"PAYMENT  {token}", f" Payment {padded} "):
        assert decode_credential(variant).preimage == PREIMAGE
    assert is_payment_authorization(f"payment {token}")
    assert not is_payment_authorization("L402 mac:00")


def test_unknown_members_are_ignored() -> None:
    echo = {**mint().echo(), "future": "x"}
    credential = decode_credential(credential_json(echo, extension={"a": 1}))
    assert credential.challenge == mint()


def test_a_4kb_credential_is_read_and_one_beyond_64kib_is_refused() -> None:
    echo = {**mint().echo(), "description": "d" * 3500}
    value = credential_json(echo)
    assert len(value) > 4096
    assert decode_credential(value).challenge.description == "d" * 3500
    huge = credential_json({**mint().echo(), "description": "d" * MAX_JSON_SIZE})
    with pytest.raises(PaymentSchemeError, match="too large") as caught:
        decode_credential(huge)
    assert caught.value.problem_type == "malformed-credential"


def _without(name: str) -> dict[str, object]:
    echo: dict[str, object] = dict(mint().echo())
    del echo[name]
    return echo


MALFORMED = {
    "wrong scheme": ("Bearer abc", "scheme 'Bearer'"),
    "no token": ("Payment", "empty"),
    "empty token": ("Payment ", "empty"),
    "standard alphabet": ("Payment a+b/", "not base64url"),
    "internal newline": ("Payment eyJh\nYiI6MX0", "not base64url"),
    "trailing bits": ("Payment AB", "trailing bits"),
    "not JSON": ("Payment " + b64url_encode(b"{oops}"), "not valid JSON"),
    "array": ("Payment " + b64url_encode(b"[]"), "not a JSON object"),
    "duplicate member": (
        "Payment " + b64url_encode(b'{"challenge":{},"challenge":{}}'),
        "duplicate",
    ),
    "no challenge": (
        "Payment " + b64url_encode(b'{"payload":{"preimage":"' + PREIMAGE.hex().encode() + b'"}}'),
        "no challenge",
    ),
    "challenge not an object": (credential_json("x"), "no challenge"),  # type: ignore[arg-type]
    "no id": (credential_json(_without("id")), "challenge.id"),
    "no realm": (credential_json(_without("realm")), "challenge.realm"),
    "no method": (credential_json(_without("method")), "challenge.method"),
    "no intent": (credential_json(_without("intent")), "challenge.intent"),
    "no request": (credential_json(_without("request")), "challenge.request"),
    "empty id": (credential_json({**mint().echo(), "id": ""}), "challenge.id"),
    "numeric realm": (credential_json({**mint().echo(), "realm": 5}), "challenge.realm"),
    "numeric expires": (credential_json({**mint().echo(), "expires": 5}), "challenge.expires"),
    "source not a string": (credential_json(mint().echo(), source=5), "source"),
    "no payload": (credential_json(mint().echo(), payload=None), "payload"),
    "payload not an object": (credential_json(mint().echo(), payload="x"), "payload"),
    "no preimage": (credential_json(mint().echo(), payload={}), "preimage"),
    "uppercase preimage": (
        credential_json(mint().echo(), payload={"preimage": PREIMAGE.hex().upper()}),
        "preimage",
    ),
    "short preimage": (
        credential_json(mint().echo(), payload={"preimage": PREIMAGE.hex()[:62]}),
        "preimage",
    ),
    "0x preimage": (
        credential_json(mint().echo(), payload={"preimage": "0x" + PREIMAGE.hex()[2:]}),
        "preimage",
    ),
    "numeric preimage": (credential_json(mint().echo(), payload={"preimage": 7}), "preimage"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_credentials(name: str) -> None:
    value, reason = MALFORMED[name]
    with pytest.raises(PaymentSchemeError) as caught:
        decode_credential(value)
    assert caught.value.problem_type == "malformed-credential"
    assert caught.value.status == 402
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value) and PREIMAGE.hex() not in str(caught.value)


def test_a_credential_for_another_intent_decodes_without_a_preimage() -> None:
    echo = {**mint().echo(), "intent": "session"}
    credential = decode_credential(credential_json(echo, payload={"action": "bearer"}))
    assert credential.preimage is None
    assert credential.challenge.intent == "session"


def test_encode_credential_refuses_a_wrong_sized_preimage() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encode_credential(mint(), PREIMAGE[:31])


# --- check_credential -------------------------------------------------------------------------


def test_a_good_credential_passes_the_pure_checks() -> None:
    challenge = mint(opaque={"route": "/a"})
    charge = check(challenge, price_sat=21)
    assert charge.challenge_id == challenge.id  # type: ignore[attr-defined]
    assert charge.payment_hash == PAYMENT_HASH  # type: ignore[attr-defined]
    assert charge.amount_sat == 21  # type: ignore[attr-defined]
    assert charge.invoice == INVOICE  # type: ignore[attr-defined]
    assert charge.expires_at == parse_rfc3339(challenge.expires or "")  # type: ignore[attr-defined]
    assert charge.opaque == {"route": "/a"}  # type: ignore[attr-defined]


def test_a_preimage_that_does_not_match_fails_verification() -> None:
    wrong = hashlib.sha256(b"another").digest()
    assert problem_of(mint(), wrong) == "verification-failed"


def test_expiry_is_checked_at_and_after_the_instant() -> None:
    challenge = mint()
    expires_at = parse_rfc3339(challenge.expires or "")
    assert check(challenge, now=expires_at - 0.001)
    assert problem_of(challenge, now=expires_at) == "payment-expired"
    assert problem_of(challenge, now=expires_at + 3600) == "payment-expired"


def test_a_bound_challenge_without_expiry_is_refused() -> None:
    unbound = dataclasses.replace(mint(), expires=None)
    bound = dataclasses.replace(unbound, id=challenge_id(SECRET, unbound))
    assert problem_of(bound) == "invalid-challenge"


def test_another_method_or_intent_is_unsupported_with_400() -> None:
    unbound = dataclasses.replace(mint(), intent="session")
    bound = dataclasses.replace(unbound, id=challenge_id(SECRET, unbound))
    credential = decode_credential(credential_json(bound.echo(), payload={"action": "open"}))
    with pytest.raises(PaymentSchemeError) as caught:
        check_credential(credential, secrets=[SECRET], now=NOW, invoice_payment_hash=PAYMENT_HASH)
    assert (caught.value.problem_type, caught.value.status) == ("method-unsupported", 400)


def test_the_request_must_agree_with_the_invoice_hash_given() -> None:
    other = hashlib.sha256(b"other").digest()
    assert problem_of(mint(), invoice_payment_hash=other) == "invalid-challenge"


def test_a_charge_below_the_price_is_insufficient() -> None:
    assert problem_of(mint(), price_sat=22) == "payment-insufficient"


WRONG_PREIMAGE = hashlib.sha256(b"not the preimage").digest()
SESSION = dataclasses.replace(mint(), intent="session")
BOUND_SESSION = dataclasses.replace(SESSION, id=challenge_id(SECRET, SESSION))


@pytest.mark.parametrize(
    ("challenge", "preimage", "overrides", "problem"),
    [
        # binding first: a forged challenge is "not ours", however old.
        (TAMPERINGS["realm"](mint()), WRONG_PREIMAGE, {"now": NOW + 10**6}, "invalid-challenge"),
        # then expiry, before method/intent, amount and preimage.
        (mint(), WRONG_PREIMAGE, {"now": NOW + 10**6, "price_sat": 100}, "payment-expired"),
        # then method/intent, before amount and preimage.
        (BOUND_SESSION, WRONG_PREIMAGE, {"price_sat": 100}, "method-unsupported"),
        # then the request against its invoice, before amount and preimage.
        (
            mint(),
            PREIMAGE,
            {"invoice_payment_hash": bytes(32), "price_sat": 100},
            "invalid-challenge",
        ),
        # then the amount, before the preimage.
        (mint(), WRONG_PREIMAGE, {"price_sat": 100}, "payment-insufficient"),
        # the preimage last.
        (mint(), WRONG_PREIMAGE, {"price_sat": 21}, "verification-failed"),
    ],
)
def test_checks_run_in_the_drafts_order(
    challenge: Challenge, preimage: bytes, overrides: dict[str, object], problem: str
) -> None:
    if challenge.intent == "session":
        body = {"challenge": challenge.echo(), "payload": {"preimage": preimage.hex()}}
        credential = decode_credential("Payment " + b64url_encode(json.dumps(body).encode()))
        args: dict[str, object] = {
            "secrets": [SECRET],
            "now": NOW,
            "invoice_payment_hash": PAYMENT_HASH,
            **overrides,
        }
        with pytest.raises(PaymentSchemeError) as caught:
            check_credential(credential, **args)  # type: ignore[arg-type]
        assert caught.value.problem_type == problem
        return
    assert problem_of(challenge, preimage, **overrides) == problem


def test_no_secrets_verifies_nothing() -> None:
    assert problem_of(mint(), secrets=[]) == "invalid-challenge"


# --- receipts ---------------------------------------------------------------------------------


def test_receipt_round_trip_names_the_payment_hash_never_the_preimage() -> None:
    challenge = mint()
    value = encode_receipt(challenge.id, PAYMENT_HASH, NOW + 0.9)
    raw = b64url_decode(value, max_decoded=MAX_JSON_SIZE)
    assert canonical_json(loads_strict(raw)) == raw
    assert PREIMAGE.hex().encode() not in raw
    receipt = decode_receipt(value)
    assert (receipt.status, receipt.method, receipt.reference) == (
        "success",
        "lightning",
        PAYMENT_HASH.hex(),
    )
    assert receipt.challenge_id == challenge.id
    assert receipt.timestamp == "2026-05-28T20:26:40Z"
    assert receipt.timestamp_at() == NOW


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[]", "not a JSON object"),
        (
            b'{"status":"failed","method":"lightning","timestamp":"2026-01-01T00:00:00Z",'
            b'"reference":"ab"}',
            "status",
        ),
        (b'{"status":"success","timestamp":"2026-01-01T00:00:00Z","reference":"ab"}', "method"),
        (b'{"status":"success","method":"lightning","reference":"ab"}', "timestamp"),
        (b'{"status":"success","method":"lightning","timestamp":"now","reference":"ab"}', "RFC"),
        (b'{"status":"success","method":"lightning","timestamp":"2026-01-01T00:00:00Z"}', "ref"),
        (
            b'{"status":"success","method":"lightning","timestamp":"2026-01-01T00:00:00Z",'
            b'"reference":"ab","challengeId":1}',
            "challengeId",
        ),
    ],
)
def test_malformed_receipts(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_receipt(b64url_encode(body))


def test_receipt_that_is_not_base64url_is_refused() -> None:
    with pytest.raises(ValueError, match="receipt is not base64url"):
        decode_receipt("eyJ+")


def test_encode_receipt_takes_a_32_byte_hash() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encode_receipt("id", PAYMENT_HASH.hex().encode(), NOW)


# --- problem details --------------------------------------------------------------------------


def test_problem_json_is_rfc9457_with_the_draft_type_uri() -> None:
    body = json.loads(problem_json("verification-failed", "Failed", "Invalid proof.", 402))
    assert body == {
        "type": "https://paymentauth.org/problems/verification-failed",
        "title": "Failed",
        "status": 402,
        "detail": "Invalid proof.",
    }
    with_id = json.loads(problem_json("payment-required", "T", "D", 402, challenge_id="abc"))
    assert with_id["challengeId"] == "abc"


def test_problem_json_refuses_unknown_types_and_statuses() -> None:
    with pytest.raises(ValueError, match="unknown"):
        problem_json("made-up", "T", "D", 402)
    with pytest.raises(ValueError, match="status"):
        problem_json("payment-required", "T", "D", 200)
    with pytest.raises(ValueError, match="unknown"):
        PaymentSchemeError("made-up", "x")


@pytest.mark.parametrize("slug", sorted(PROBLEMS))
def test_every_error_carries_its_status_and_title(slug: str) -> None:
    error = PaymentSchemeError(slug, "detail here")
    body = json.loads(error.problem_json(challenge_id="cid"))
    assert body["type"].endswith("/" + slug)
    assert body["status"] == error.status == (400 if slug == "method-unsupported" else 402)
    assert body["title"] == error.title and body["detail"] == "detail here"


# --- Accept-Payment ---------------------------------------------------------------------------


def test_accept_payment_parsing() -> None:
    assert parse_accept_payment("lightning/charge, lightning/session;q=0.5, */*;q=0") == [
        PaymentRange("lightning", "charge", 1.0),
        PaymentRange("lightning", "session", 0.5),
        PaymentRange("*", "*", 0.0),
    ]
    assert parse_accept_payment(None) is None
    assert parse_accept_payment("") is None
    assert parse_accept_payment("garbage") is None
    assert parse_accept_payment("tempo/*;Q=0.600 ; ext=1") == [PaymentRange("tempo", "*", 0.6)]


@pytest.mark.parametrize(
    "member",
    [
        "Lightning/charge",  # method ids are lowercase
        "lightning",
        "lightning/",
        "/charge",
        "lightning/charge/x",
        "lightning/charge;q=1.5",
        "lightning/charge;q=0.1234",
        "lightning/charge;q=",
        "lightning/charge;q=-1",
        "light ning/charge",
    ],
)
def test_malformed_accept_payment_members_are_skipped(member: str) -> None:
    assert parse_accept_payment(f"{member}, tempo/charge") == [PaymentRange("tempo", "charge")]


OFFERS = [("tempo", "session"), ("tempo", "charge"), ("solana", "charge"), ("stripe", "charge")]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # The draft's examples ("Challenge Negotiation with Accept-Payment").
        (
            "tempo/charge, tempo/session, stripe/charge;q=0.5, solana/charge;q=0.3",
            [("tempo", "session"), ("tempo", "charge"), ("stripe", "charge"), ("solana", "charge")],
        ),
        (
            "tempo/*, solana/*;q=0.6, stripe/charge;q=0.2",
            [("tempo", "session"), ("tempo", "charge"), ("solana", "charge"), ("stripe", "charge")],
        ),
        (
            "tempo/charge, tempo/session;q=0, solana/charge;q=0.8, stripe/charge;q=0.4",
            [("tempo", "charge"), ("solana", "charge"), ("stripe", "charge")],
        ),
        # The most specific range decides, even against a higher wildcard q.
        (
            "*/*;q=1, tempo/session;q=0",
            [("tempo", "charge"), ("solana", "charge"), ("stripe", "charge")],
        ),
        (
            "tempo/*;q=0.2, */charge;q=0.9",
            [("solana", "charge"), ("stripe", "charge"), ("tempo", "session"), ("tempo", "charge")],
        ),
        # Absent, unreadable, or nothing left: every offer, server order.
        (None, OFFERS),
        ("not a range", OFFERS),
        ("lightning/charge", OFFERS),
        ("*/*;q=0", OFFERS),
    ],
)
def test_offers_are_filtered_and_ordered(
    header: str | None, expected: list[tuple[str, str]]
) -> None:
    assert order_offers(OFFERS, header, lambda offer: offer) == expected


def test_order_challenges_uses_method_and_intent() -> None:
    charge = mint()
    session = dataclasses.replace(charge, intent="session")
    assert order_challenges([charge, session], "lightning/session, lightning/charge;q=0.5") == [
        session,
        charge,
    ]
    assert order_challenges([charge, session], "lightning/charge") == [charge]


# --- the request against its own invoice -------------------------------------------------------


def test_a_request_that_matches_its_invoice_has_no_mismatches() -> None:
    request = mint().charge_request()
    assert invoice_mismatches(request, decode_invoice(INVOICE)) == []


@pytest.mark.parametrize(
    ("invoice", "request_changes", "reason"),
    [
        (make_invoice(22_000), {}, "22000 msat"),
        (make_invoice(None), {}, "no amount"),
        (make_invoice(payment_hash=bytes(32)), {}, "paymentHash"),
        (INVOICE, {"network": "mainnet"}, "mainnet"),
        (INVOICE, {"network": None}, "mainnet"),  # absent means mainnet
        (make_invoice(currency="tb"), {}, "testnet"),
    ],
)
def test_a_request_that_disagrees_with_its_invoice_is_never_paid(
    invoice: str, request_changes: dict[str, object], reason: str
) -> None:
    request = dataclasses.replace(mint().charge_request(), **request_changes)  # type: ignore[arg-type]
    problems = invoice_mismatches(request, decode_invoice(invoice))
    assert problems and any(reason in problem for problem in problems)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"amount": "021"}, "amount"),
        ({"amount": "0"}, "amount"),
        ({"amount": 21}, "amount"),
        ({"amount": "1.5"}, "amount"),
        ({"amount": "12345678901234567"}, "amount"),
        ({"currency": "SAT"}, "currency"),
        ({"currency": "BTC"}, "currency"),
        ({"methodDetails": "x"}, "methodDetails"),
        ({"methodDetails": {}}, "invoice"),
        ({"methodDetails": {"invoice": "lnbc1", "paymentHash": "AB" * 32}}, "paymentHash"),
        ({"methodDetails": {"invoice": "lnbc1", "network": "bitcoin"}}, "network"),
        ({"methodDetails": {"invoice": "lnbc1", "version": 2}}, "version"),
        ({"description": 5}, "description"),
    ],
)
def test_malformed_charge_requests(changes: dict[str, object], reason: str) -> None:
    body: dict[str, object] = {
        "amount": "21",
        "currency": "sat",
        "methodDetails": {"invoice": INVOICE},
    }
    body.update(changes)
    with pytest.raises(ValueError, match=reason):
        decode_charge_request(b64url_encode(json.dumps(body).encode()))


def test_a_charge_request_ignores_unknown_members_and_accepts_padding() -> None:
    body = {"amount": "21", "currency": "sat", "methodDetails": {"invoice": "lnbc1", "x": 1}}
    encoded = b64url_encode(json.dumps({**body, "future": True}).encode())
    padded = encoded + "=" * (-len(encoded) % 4)
    assert decode_charge_request(padded) == ChargeRequest(21, "lnbc1")
