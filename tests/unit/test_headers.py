import re
from types import MappingProxyType

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

# Real values (lsat-js test fixtures): a Go-minted macaroon with '+', '/' and '=' padding,
# and the testnet invoice for the same payment hash.
MAC = (
    "AgESMy4xMzYuMTc4LjE1OjM0MjM4AkIAAD2b0rX78LATiVo8bKgHuurefeF5OeX2H5ZuacBIK3+RAR1PKU1oZpfCZFib4zd"
    "Doj0pOpgPmhtuzNllU+y//D0AAAYgcWFs9FIteCzpCcEPSwmXKBpcx97hyL5Yt99cbLjRHzU="
)
INV = (
    "lntb20n1psza5dwpp58kda9d0m7zcp8z2683k2spa6at08mcte88jlv8ukde5uqjpt07gsdzjfp85gnpqd9h8vmmfvdjjqu"
    "rp09kk2mn5ypn8ymmdyppksctfdecx76twwssyxmmjv5sxcmny8gcnqvps8ycqzpgsp5m7xru8dlhrhmwjp8gynsj2l9mwa"
    "n2jk52ah5xucrn9kc3p0pj5ns9qy9qsq7jjxypyyc7hvvs8srh6c3lvcp5l5wka94htnfxak99hd5qrx69sya9sj4zm3w5l"
    "ncw0tksf944q73tduhlhs5apd63m9dte9dhva5dgqaceunx"
)
MAC_URLSAFE = MAC.replace("+", "-").replace("/", "_")
# Aperture's challenge, verbatim (lsat-js test fixtures).
APERTURE_CHALLENGE = (
    'LSAT macaroon="AgEEbHNhdAJCAAAwpHpumws6ufQoDwiTLNcge0QPUIWA0+tVY+tKPYAJ/zSfmEGlIpNm3VzxuzCqLhE'
    "p5KGiyPLUM9L+kcB7uzS+AAIPc2VydmljZXM9bWVtZTowAAISbWVtZV9jYXBhYmlsaXRpZXM9AAAGILA1VCEIExukt4n"
    'G+XR9tX8WJ2BVMiHG3UNt1uYJ+NRD", invoice="lnbcrt100n1p3qqkygpp5xzj85m5mpvatnapgpuyfxtxhypa5gr6s'
    "skqd8664v04550vqp8lsdq8f3f5z4qcqzpgsp5tpzvsq5pckqgln3ltpy3e9cf6tf2aj82ffa2tted77ltweuaweks9qyys"
    "sq0w5da3k40wtdukac7hp5s58hsxf8k8f52c5qneezu4xg3xh87xrnkl5jwtw098d2gjywx20nmkxl2y4vq9fr89kg5kzcw"
    'upv9xpdaggp4fc4ms"'
)
PREIMAGE = bytes.fromhex("2ca931a1c36b48f54948b898a271a53ed91ff7d0081939a5fa511249e81cba5c")
PREIMAGE_HEX = PREIMAGE.hex()


def only(values: str | list[str]) -> Challenge:
    challenges = parse_challenges(values)
    assert len(challenges) == 1, challenges
    return challenges[0]


# --- the shapes from PROTOCOL.md "Client parsing" --------------------------------------------


@pytest.mark.parametrize(
    ("header", "scheme", "version"),
    [
        (f'L402 version="0", token="{MAC}", invoice="{INV}"', "L402", "0"),
        (f'LSAT macaroon="{MAC}", invoice="{INV}"', "LSAT", None),
        (f'L402 macaroon="{MAC}", invoice="{INV}"', "L402", None),
        (f'l402 macaroon="{MAC}", invoice="{INV}"', "L402", None),
        (f'lsat macaroon="{MAC}", invoice="{INV}"', "LSAT", None),
        (f'LsAt token="{MAC}", invoice="{INV}"', "LSAT", None),
        (f"L402 macaroon={MAC}, invoice={INV}", "L402", None),
        (f"L402 macaroon='{MAC}', invoice='{INV}', version='0'", "L402", "0"),
        (f'L402 macaroon="{MAC}",invoice="{INV}"', "L402", None),
        (f'L402 macaroon="{MAC}" invoice="{INV}"', "L402", None),
        (f"L402 macaroon={MAC} invoice={INV} version=0", "L402", "0"),
        (f'L402 invoice="{INV}", macaroon="{MAC}"', "L402", None),
        (f'L402 invoice="{INV}", version="0", token="{MAC}"', "L402", "0"),
        (f'L402 MACAROON="{MAC}", Invoice="{INV}"', "L402", None),
        (f'L402 macaroon = "{MAC}" , invoice= "{INV}"', "L402", None),
        (f'  L402   macaroon="{MAC}"  ,  invoice="{INV}"  ', "L402", None),
        (f'L402 address="bc1qxyz", macaroon="{MAC}", foo=bar, invoice="{INV}", x=""', "L402", None),
        (f'L402 macaroon="{MAC}", invoice="{INV}", version="0", token="{MAC}"', "L402", "0"),
    ],
    ids=[
        "spec-token-version",
        "aperture-lsat",
        "aperture-l402",
        "lower-l402",
        "lower-lsat",
        "mixed-case-token",
        "unquoted",
        "single-quoted",
        "no-space-after-comma",
        "space-separated",
        "space-separated-unquoted",
        "reordered",
        "reordered-spec",
        "upper-case-names",
        "spaces-around-equals",
        "extra-whitespace",
        "unknown-params",
        "both-forms",
    ],
)
def test_challenge_shapes(header: str, scheme: str, version: str | None) -> None:
    challenge = only(header)
    assert challenge.scheme == scheme
    assert challenge.macaroon == MAC
    assert challenge.invoice == INV
    assert challenge.version == version


def test_unknown_params_are_kept_in_params() -> None:
    challenge = only(f'L402 address="bc1qxyz", macaroon="{MAC}", foo=bar, invoice="{INV}"')
    assert challenge.params["address"] == "bc1qxyz"
    assert challenge.params["foo"] == "bar"


@pytest.mark.parametrize(
    "mac",
    [MAC, MAC.rstrip("="), MAC_URLSAFE, MAC_URLSAFE.rstrip("=")],
    ids=["std-padded", "std-unpadded", "urlsafe-padded", "urlsafe-unpadded"],
)
@pytest.mark.parametrize("quote", ['"', "'", ""])
def test_base64_flavours_survive_every_quoting(mac: str, quote: str) -> None:
    challenge = only(f"L402 macaroon={quote}{mac}{quote}, invoice={quote}{INV}{quote}")
    assert challenge.macaroon == mac
    assert decode_macaroon(challenge.macaroon).signature == decode_macaroon(MAC).signature


@pytest.mark.parametrize(
    "header",
    [
        f'Bearer realm="api", L402 macaroon="{MAC}", invoice="{INV}"',
        f'Bearer realm="api",L402 macaroon="{MAC}",invoice="{INV}"',
        f'Bearer realm="api" L402 macaroon="{MAC}" invoice="{INV}"',
        f'Bearer realm="api", token="NOT-IT", L402 macaroon="{MAC}", invoice="{INV}"',
        f'Bearer token="NOT-IT", invoice="NOT-IT", L402 token="{MAC}", invoice="{INV}"',
        f'Bearer abc123==, L402 macaroon="{MAC}", invoice="{INV}"',
        f'Bearer abc123== L402 macaroon="{MAC}", invoice="{INV}"',
        f'Bearer abc123 L402 macaroon="{MAC}", invoice="{INV}"',
        f'Negotiate, Basic realm="x", LSAT macaroon="{MAC}", invoice="{INV}"',
        f'Negotiate L402 macaroon="{MAC}", invoice="{INV}"',
        f'Payment id="p1", method="lightning", intent="charge", request="eyJhIjoxfQ==", '
        f'L402 macaroon="{MAC}", invoice="{INV}"',
        f'L402 macaroon="{MAC}", invoice="{INV}", Bearer realm="x", token="NOT-IT"',
        f'Basic realm="a, L402 macaroon=\\"nope\\"", L402 macaroon="{MAC}", invoice="{INV}"',
    ],
    ids=[
        "bearer-first",
        "bearer-first-no-spaces",
        "no-commas",
        "bearer-token-param",
        "bearer-token-and-invoice",
        "bearer-token68-padded",
        "bearer-token68-padded-no-comma",
        "bearer-token68-no-comma",
        "several-others",
        "bare-scheme-before",
        "payment-scheme",
        "l402-first",
        "quoted-comma-and-scheme",
    ],
)
def test_other_schemes_first_and_no_leaking(header: str) -> None:
    challenge = only(header)
    assert challenge.macaroon == MAC
    assert challenge.invoice == INV
    assert "NOT-IT" not in challenge.params.values()


@pytest.mark.parametrize(
    "header",
    [
        f'Bearer token="{MAC}", invoice="{INV}"',
        f'Bearer token="{MAC}", L402 invoice="{INV}"',
        f'L402 macaroon="{MAC}", Bearer invoice="{INV}"',
        f'L402 macaroon="{MAC}" Basic invoice="{INV}"',
        f'macaroon="{MAC}", invoice="{INV}"',
        f'L402 macaroon="{MAC}"',
        f'L402 invoice="{INV}"',
        f'L402 macaroon="", invoice="{INV}"',
        "L402",
        f"L402 {MAC}",
    ],
)
def test_params_of_other_schemes_never_complete_a_challenge(header: str) -> None:
    assert parse_challenges(header) == []


def test_several_challenges_in_one_line_keep_their_order() -> None:
    header = f'LSAT macaroon="{MAC}", invoice="{INV}", L402 token="{MAC_URLSAFE}", invoice="lnbc1x"'
    first, second = parse_challenges(header)
    assert (first.scheme, first.macaroon, first.invoice) == ("LSAT", MAC, INV)
    assert (second.scheme, second.macaroon, second.invoice) == ("L402", MAC_URLSAFE, "lnbc1x")


def test_several_header_lines_other_schemes_first() -> None:
    lines = [
        'Bearer realm="api"',
        f'LSAT macaroon="{MAC}", invoice="{INV}"',
        'Basic realm="x"',
        f'L402 macaroon="{MAC}", invoice="{INV}", version="0"',
    ]
    challenges = parse_challenges(lines)
    assert [c.scheme for c in challenges] == ["LSAT", "L402"]
    assert [c.version for c in challenges] == [None, "0"]


def test_params_never_cross_header_lines() -> None:
    assert parse_challenges([f'L402 macaroon="{MAC}"', f'invoice="{INV}"']) == []
    assert parse_challenges(iter([f'L402 macaroon="{MAC}",', f'invoice="{INV}"'])) == []


def test_macaroon_param_wins_over_token() -> None:
    challenge = only(f'L402 token="{MAC_URLSAFE}", macaroon="{MAC}", invoice="{INV}"')
    assert challenge.macaroon == MAC


def test_first_of_duplicate_params_wins() -> None:
    challenge = only(f'L402 macaroon="{MAC}", invoice="{INV}", macaroon="other"')
    assert challenge.macaroon == MAC


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
    ("header", "expected"),
    [
        ("Bearer abc==", [("Bearer", {"": "abc=="})]),
        ("Bearer abc", [("Bearer", {"": "abc"})]),
        ("Bearer a/b+c=", [("Bearer", {"": "a/b+c="})]),
        ("Negotiate", [("Negotiate", {})]),
        ("Basic, Negotiate", [("Basic", {}), ("Negotiate", {})]),
        ('Basic realm="x"', [("Basic", {"realm": "x"})]),
        ('Basic REALM="a\\"b\\\\c"', [("Basic", {"realm": 'a"b\\c'})]),
        ("Basic realm='it''s'", [("Basic", {"realm": "it"})]),  # no escapes in '...'
        ("Basic realm='a\\'", [("Basic", {"realm": "a\\"})]),
        ('Basic realm=""', [("Basic", {"realm": ""})]),
        ("Basic realm=, x=1", [("Basic", {"realm": "", "x": "1"})]),
        ('L402 version= macaroon="m"', [("L402", {"version": "", "macaroon": "m"})]),
        ('Basic realm="x", Bearer', [("Basic", {"realm": "x"}), ("Bearer", {})]),
        ('realm="x", L402', [("L402", {})]),
    ],
)
def test_parse_auth_header(header: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    assert parse_auth_header(header) == expected


def test_scheme_kept_as_sent_and_names_lower_cased() -> None:
    assert parse_auth_header('lSaT MacAroon="M"') == [("lSaT", {"macaroon": "M"})]


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " ",
        ",,,",
        "=",
        "==x",
        '"',
        "'",
        '"unterminated',
        "L402 macaroon='unterminated, invoice='x",
        'L402 macaroon="x\\',
        "L402 ====",
        "L402 =x",
        "\x00\x01\x02",
        "é ü=ö, 💸",
        "a=b=c=d",
        ", L402 , , macaroon",
        "L402 macaroon==x invoice==y",
        "L402 " + "a=1 " * 2000,
        '"' * 1000,
    ],
)
def test_garbage_never_raises(garbage: str) -> None:
    parse_auth_header(garbage)
    assert isinstance(parse_challenges(garbage), list)


def test_unterminated_value_is_dropped_not_guessed() -> None:
    assert parse_auth_header('L402 invoice="x", macaroon="abc') == [("L402", {"invoice": "x"})]


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
