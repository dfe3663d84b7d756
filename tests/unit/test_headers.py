import json
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from l402proxy.l402.encoding import b64decode_any
from l402proxy.l402.headers import (
    Challenge,
    Credential,
    CredentialError,
    accepts_l402,
    format_challenge,
    format_credential,
    parse_auth_header,
    parse_challenges,
    parse_credential,
)
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.invoice import decode_invoice
from l402proxy.l402.token import decode_macaroon
from tests.challenge_origin import SHAPES, Parts

# The challenge shapes both client parsers must read (this one and the Go SDK's) live in one JSON
# table, so the two cannot drift. Its values are real (lsat-js test fixtures): a Go-minted macaroon
# with '+', '/' and '=' padding, the testnet invoice for the same payment hash, and Aperture's
# challenge verbatim.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "challenge_shapes.json"
TABLE: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
VALUES: dict[str, str] = TABLE["values"]
MAC = VALUES["MAC"]
INV = VALUES["INV"]
MAC_URLSAFE = VALUES["MAC_URLSAFE"]
APERTURE_CHALLENGE = VALUES["APERTURE_CHALLENGE"]
PREIMAGE = bytes.fromhex("2ca931a1c36b48f54948b898a271a53ed91ff7d0081939a5fa511249e81cba5c")
PREIMAGE_HEX = PREIMAGE.hex()


def expand(text: str) -> str:
    """A table string with every {NAME} replaced by VALUES[NAME]."""
    for name, value in VALUES.items():
        text = text.replace("{" + name + "}", value)
    return text


def only(values: str | list[str]) -> Challenge:
    challenges = parse_challenges(values)
    assert len(challenges) == 1, challenges
    return challenges[0]


def table_cases() -> list[Any]:
    return [
        pytest.param(group, case, id=f"{group}/{case['id']}")
        for group, cases in TABLE["challenges"].items()
        for case in cases
    ]


# --- the shapes from PROTOCOL.md "Client parsing" (tests/fixtures/challenge_shapes.json) ------


@pytest.mark.parametrize(("group", "case"), table_cases())
def test_challenge_table(group: str, case: dict[str, Any]) -> None:
    lines = [expand(line) for line in case["headers"]]
    expected = [
        (e["scheme"], expand(e["macaroon"]), expand(e["invoice"]), e["version"])
        for e in case["expect"]
    ]
    for given in (lines, iter(lines)):
        challenges = parse_challenges(given)
        assert [(c.scheme, c.macaroon, c.invoice, c.version) for c in challenges] == expected
    if len(lines) == 1:
        assert parse_challenges(lines[0]) == challenges
    for challenge in challenges:
        assert set(case.get("absent", ())).isdisjoint(challenge.params.values())
    for name, value in case.get("params", {}).items():
        assert challenges[0].params[name] == value
    if group == "base64-flavours":
        # Every flavour decodes to the same macaroon.
        assert decode_macaroon(challenges[0].macaroon).signature == decode_macaroon(MAC).signature


def test_table_has_the_origin_shapes_as_the_challenge_origin_sends_them() -> None:
    """The Go SDK reads the SDK tests' origin shapes from the table: they must stay the same."""
    cases = {case["id"]: case for case in TABLE["challenges"]["origin-shapes"]}
    assert set(cases) == set(SHAPES)
    decoy_mac, decoy_inv = VALUES["DECOY_MAC"], VALUES["DECOY_INV"]
    for name, shape in SHAPES.items():
        parts = Parts(shape.encode(MAC), INV, shape.encode(decoy_mac), decoy_inv)
        assert [expand(line) for line in cases[name]["headers"]] == shape.headers(parts), name
        first = cases[name]["expect"][0]
        assert (first["scheme"], expand(first["macaroon"])) == (shape.scheme, shape.encode(MAC))


def test_aperture_challenge_invoice_matches_macaroon() -> None:
    challenge = only(APERTURE_CHALLENGE)
    assert challenge.scheme == "LSAT"
    identifier = Identifier.decode(decode_macaroon(challenge.macaroon).identifier_bytes)
    invoice = decode_invoice(challenge.invoice)
    assert identifier.payment_hash == invoice.payment_hash
    assert invoice.amount_msat == 10_000 and invoice.network == "regtest"


def test_challenge_params_are_read_only_and_challenge_hashable() -> None:
    challenge = only(f'L402 macaroon="{MAC}", invoice="{INV}", extra="1"')
    assert isinstance(challenge.params, MappingProxyType)
    with pytest.raises(TypeError):
        challenge.params["extra"] = "2"  # type: ignore[index]
    assert hash(challenge) == hash(only(f'L402 macaroon="{MAC}", invoice="{INV}"'))
    assert challenge == only(f'L402 macaroon="{MAC}", invoice="{INV}", extra="1"')


# --- the tokenizer itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "row", TABLE["auth_header"], ids=[row["header"][:40] for row in TABLE["auth_header"]]
)
def test_parse_auth_header(row: dict[str, Any]) -> None:
    # Schemes are kept as sent, parameter names lower-cased; an unterminated value is dropped.
    expected = [(scheme, params) for scheme, params in row["expect"]]
    assert parse_auth_header(row["header"]) == expected


def garbage_value(entry: str | dict[str, Any]) -> str:
    if isinstance(entry, str):
        return entry
    return entry["prefix"] + entry["repeat"] * entry["times"]


@pytest.mark.parametrize("garbage", [garbage_value(entry) for entry in TABLE["garbage"]])
def test_garbage_never_raises(garbage: str) -> None:
    parse_auth_header(garbage)
    assert isinstance(parse_challenges(garbage), list)


# --- format_challenge ------------------------------------------------------------------------


def test_format_challenge_aperture_form() -> None:
    assert format_challenge("LSAT", "M=", "lnbc1") == 'LSAT macaroon="M=", invoice="lnbc1"'
    assert format_challenge("l402", "M=", "lnbc1") == 'L402 macaroon="M=", invoice="lnbc1"'


def test_format_challenge_with_spec_params() -> None:
    assert format_challenge("L402", "M=", "lnbc1", spec_params=True) == (
        'L402 macaroon="M=", invoice="lnbc1", version="0", token="M="'
    )


@pytest.mark.parametrize("scheme", ["L402", "LSAT"])
@pytest.mark.parametrize("spec_params", [False, True])
@pytest.mark.parametrize("mac", [MAC, MAC_URLSAFE.rstrip("=")])
def test_format_then_parse_round_trip(scheme: str, spec_params: bool, mac: str) -> None:
    challenge = only(format_challenge(scheme, mac, INV, spec_params=spec_params))
    assert (challenge.scheme, challenge.macaroon, challenge.invoice) == (scheme, mac, INV)
    assert challenge.version == ("0" if spec_params else None)


def test_aperture_two_line_form_round_trip() -> None:
    lines = [format_challenge("LSAT", MAC, INV), format_challenge("L402", MAC, INV)]
    assert [c.scheme for c in parse_challenges(lines)] == ["LSAT", "L402"]
    # Joined into one line by a proxy, it still parses the same.
    assert [c.scheme for c in parse_challenges(", ".join(lines))] == ["LSAT", "L402"]


@pytest.mark.parametrize(
    ("scheme", "mac", "invoice"),
    [
        ("Bearer", MAC, INV),
        ("L402", 'M", token="evil', INV),
        ("L402", MAC, "lnbc1\r\nSet-Cookie: x=1"),
        ("L402", MAC, "lnbc\\"),
        ("L402", "", INV),
        ("L402", MAC, ""),
    ],
)
def test_format_challenge_refuses_what_would_break_the_header(
    scheme: str, mac: str, invoice: str
) -> None:
    with pytest.raises(ValueError):
        format_challenge(scheme, mac, invoice)


# --- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "scheme", "macaroons"),
    [
        (f"L402 {MAC}:{PREIMAGE_HEX}", "L402", (MAC,)),
        (f"LSAT {MAC}:{PREIMAGE_HEX}", "LSAT", (MAC,)),
        (f"l402 {MAC}:{PREIMAGE_HEX}", "L402", (MAC,)),
        (f"lsat {MAC}:{PREIMAGE_HEX.upper()}", "LSAT", (MAC,)),
        (f"L402 {MAC_URLSAFE.rstrip('=')}:{PREIMAGE_HEX}", "L402", (MAC_URLSAFE.rstrip("="),)),
        (f"L402 {MAC},{MAC_URLSAFE}:{PREIMAGE_HEX}", "L402", (MAC, MAC_URLSAFE)),
        (f"L402 {MAC} , {MAC_URLSAFE} : {PREIMAGE_HEX}", "L402", (MAC, MAC_URLSAFE)),
        (f"  L402\t {MAC}:{PREIMAGE_HEX}\r\n", "L402", (MAC,)),
    ],
)
def test_parse_credential(value: str, scheme: str, macaroons: tuple[str, ...]) -> None:
    assert parse_credential(value) == Credential(scheme, macaroons, PREIMAGE)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (f"Bearer {MAC}:{PREIMAGE_HEX}", "not L402 or LSAT"),
        (f"L402x {MAC}:{PREIMAGE_HEX}", "not L402 or LSAT"),
        (f"{MAC}:{PREIMAGE_HEX}", "not L402 or LSAT"),
        ("L402", "<macaroon>"),
        (f"L402 {MAC}", "<macaroon>"),
        (f"L402 {MAC}{PREIMAGE_HEX}", "<macaroon>"),
        (f"L402 :{PREIMAGE_HEX}", "empty macaroon"),
        (f"L402 {MAC},:{PREIMAGE_HEX}", "empty macaroon"),
        (f"L402 ,{MAC}:{PREIMAGE_HEX}", "empty macaroon"),
        (f"L402 not*base64:{PREIMAGE_HEX}", "not valid base64"),
        (f"L402 {MAC} {MAC}:{PREIMAGE_HEX}", "not valid base64"),
        (f"L402 {MAC}:", "64 hex"),
        (f"L402 {MAC}:{PREIMAGE_HEX[:-1]}", "64 hex"),
        (f"L402 {MAC}:{PREIMAGE_HEX[:-2]}", "64 hex"),
        (f"L402 {MAC}:{PREIMAGE_HEX}0", "64 hex"),
        (f"L402 {MAC}:{PREIMAGE_HEX}00", "64 hex"),
        (f"L402 {MAC}:{'zz' * 32}", "64 hex"),
        (f"L402 {MAC}:{PREIMAGE_HEX[:32]} {PREIMAGE_HEX[32:]}", "64 hex"),
        (f"L402 {MAC}:0x{PREIMAGE_HEX[2:]}", "64 hex"),
        ("L402 💸:" + "ab" * 32, "not valid base64"),
    ],
)
def test_parse_credential_errors(value: str, message: str) -> None:
    with pytest.raises(CredentialError, match=re.escape(message)) as info:
        parse_credential(value)
    assert isinstance(info.value, ValueError)
    # Bearer secrets never end up in messages (they get logged).
    assert PREIMAGE_HEX[:16] not in str(info.value).lower()
    assert MAC[:16] not in str(info.value)


def test_credential_repr_hides_the_preimage() -> None:
    credential = parse_credential(f"L402 {MAC}:{PREIMAGE_HEX}")
    assert PREIMAGE_HEX not in repr(credential)
    assert repr(PREIMAGE) not in repr(credential)


def test_unknown_scheme_is_named_only_when_it_looks_like_a_scheme() -> None:
    with pytest.raises(CredentialError, match="'Bearer' is not L402"):
        parse_credential("Bearer abc")
    with pytest.raises(CredentialError) as info:
        parse_credential("X" * 500 + " abc")
    assert "X" not in str(info.value)


def test_format_credential_round_trip() -> None:
    value = format_credential([MAC], PREIMAGE)
    assert value == f"L402 {MAC}:{PREIMAGE_HEX}"
    assert parse_credential(value) == Credential("L402", (MAC,), PREIMAGE)
    several = format_credential([MAC, MAC_URLSAFE], PREIMAGE, scheme="lsat")
    assert parse_credential(several) == Credential("LSAT", (MAC, MAC_URLSAFE), PREIMAGE)


def test_format_credential_is_what_aperture_reads() -> None:
    # Aperture's own regex and base64.StdEncoding (lsat/header.go).
    match = re.search(r"LSAT (.*?):([a-f0-9]{64})", format_credential([MAC], PREIMAGE, "LSAT"))
    assert match is not None and match.group(2) == PREIMAGE_HEX
    assert b64decode_any(match.group(1)) == b64decode_any(MAC)


@pytest.mark.parametrize(
    ("macaroons", "preimage", "scheme"),
    [
        ([], PREIMAGE, "L402"),
        ([""], PREIMAGE, "L402"),
        ([MAC], PREIMAGE[:31], "L402"),
        ([MAC], PREIMAGE, "Bearer"),
    ],
)
def test_format_credential_refuses(macaroons: list[str], preimage: bytes, scheme: str) -> None:
    with pytest.raises(ValueError):
        format_credential(macaroons, preimage, scheme)


# --- Accept-Authenticate ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "L402",
        "LSAT",
        "l402",
        "lsat",
        " L402 ",
        "Bearer, L402",
        "Bearer,LSAT",
        "basic lsat",
        "L402;q=1",
        "foo, L402 ;v=0, bar",
        "LSAT, L402",
    ],
)
def test_accepts_l402(value: str) -> None:
    assert accepts_l402(value)


@pytest.mark.parametrize(
    "value",
    [None, "", " ", "Bearer", "L402x", "xL402", "L4022", "LSA T", "q=L402", "application/json"],
)
def test_does_not_accept_l402(value: str | None) -> None:
    assert not accepts_l402(value)
