"""The Payment scheme's wire pieces: strict base64url, RFC 9110 challenge lists, RFC 3339.

base64url vectors: lightninglabs/aperture mpp/testdata/vectors.json, "base64url" (commit 7ee3ed7).
"""

import pytest

from l402proxy.l402.authparams import parse_challenge_list, quote
from l402proxy.l402.b64url import Base64urlError, b64url_decode, b64url_encode, max_encoded_length
from l402proxy.l402.rfc3339 import format_rfc3339, parse_rfc3339

# --- base64url ------------------------------------------------------------------------------

CANONICAL = [
    ("", ""),
    ("AA", "00"),
    ("__4", "fffe"),
    ("__79", "fffefd"),
    ("aGVsbG8", "68656c6c6f"),
    ("-_-_A-__", "fbffbf03efff"),
    (
        "eyJhbW91bnQiOiIxMDAiLCJjdXJyZW5jeSI6InNhdCJ9",
        "7b22616d6f756e74223a22313030222c2263757272656e6379223a22736174227d",
    ),
]

REJECTED = [
    ("AB", "trailing bits"),  # decodes like "AA" in a lenient decoder
    ("aGVs\nbG8", "U+000A"),
    ("aGVs\rbG8", "U+000D"),
    ("aGVs bG8", "' '"),
    ("aGVs\tbG8", "U+0009"),
    (" aGVsbG8", "' '"),
    ("aGVsbG8 ", "' '"),
    ("a+b/", "'+'"),
    ("aGV=bG8", "'='"),  # internal padding
    ("aGVsbG8===", "3 padding"),
    ("aGVsbG8=====", "padding"),
    ("aGVsbG=", "multiple of 4"),
    ("aGVsb", "dangling"),
    ("!!!invalid!!!", "'!'"),
    ("aGVsbG8\u00e9", "U+00E9"),
]


@pytest.mark.parametrize(("encoded", "hex_bytes"), CANONICAL)
def test_base64url_round_trips_canonical_values(encoded: str, hex_bytes: str) -> None:
    raw = bytes.fromhex(hex_bytes)
    assert b64url_encode(raw) == encoded
    assert b64url_decode(encoded, max_decoded=100) == raw


def test_base64url_accepts_correct_padding_only() -> None:
    assert b64url_decode("aGVsbG8=", max_decoded=100) == b"hello"
    assert b64url_decode("AA==", max_decoded=100) == b"\x00"
    with pytest.raises(Base64urlError, match="multiple of 4"):
        b64url_decode("AA=", max_decoded=100)


@pytest.mark.parametrize(("encoded", "reason"), REJECTED)
def test_base64url_rejections(encoded: str, reason: str) -> None:
    with pytest.raises(Base64urlError) as caught:
        b64url_decode(encoded, max_decoded=100)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message and "\r" not in message


def test_base64url_size_limit_is_checked_on_both_lengths() -> None:
    limit = 64 * 1024
    exact = b64url_encode(b"\x01" * limit)
    assert len(b64url_decode(exact, max_decoded=limit)) == limit
    with pytest.raises(Base64urlError, match="too large: 65537 bytes"):
        b64url_decode(b64url_encode(b"\x01" * (limit + 1)), max_decoded=limit)
    # Far beyond the limit: refused on the text's length, before any decoding.
    refused = f"characters, the limit is {max_encoded_length(limit)}"
    with pytest.raises(Base64urlError, match=refused):
        b64url_decode("A" * (10 * limit), max_decoded=limit)


def test_base64url_error_never_echoes_the_value() -> None:
    secret = "c2VjcmV0LXByZWltYWdl" + "!"
    with pytest.raises(Base64urlError) as caught:
        b64url_decode(secret, max_decoded=100, what="credential")
    assert "c2VjcmV0" not in str(caught.value)
    assert str(caught.value).startswith("credential ")


# --- RFC 9110 challenge lists ----------------------------------------------------------------


def test_schemes_and_params_split_across_comma_separated_challenges() -> None:
    parsed = parse_challenge_list(
        'L402 macaroon="bWFj", invoice="lnbc1", Basic realm="x", Payment id="a", realm="r"'
    )
    assert [(c.scheme, dict(c.params)) for c in parsed] == [
        ("L402", {"macaroon": "bWFj", "invoice": "lnbc1"}),
        ("Basic", {"realm": "x"}),
        ("Payment", {"id": "a", "realm": "r"}),
    ]
    assert all(c.problem is None for c in parsed)


def test_param_names_are_lowercased_and_the_first_repeat_wins() -> None:
    (parsed,) = parse_challenge_list('Payment ID="first", Realm=r, id="second", REALM="s"')
    assert dict(parsed.params) == {"id": "first", "realm": "r"}


def test_quoted_pairs_are_unescaped_and_separators_inside_quotes_are_text() -> None:
    (parsed,) = parse_challenge_list(
        'Payment a="x\\"y", b="back\\\\slash", c="one, two=three", d="Payment id=\\"s\\"",'
        ' e="\\q", f="tab\there", g="caf\u00e9"'
    )
    assert dict(parsed.params) == {
        "a": 'x"y',
        "b": "back\\slash",
        "c": "one, two=three",
        "d": 'Payment id="s"',
        "e": "q",  # a quoted-pair carries the next octet, whatever it is
        "f": "tab\there",
        "g": "caf\u00e9",
    }


def test_token68_directly_after_a_scheme() -> None:
    parsed = parse_challenge_list("Basic dXNlcjpwYXNz==, Bearer a/b+c, Payment id=x")
    assert [(c.scheme, c.token68) for c in parsed] == [
        ("Basic", "dXNlcjpwYXNz=="),
        ("Bearer", "a/b+c"),
        ("Payment", None),
    ]
    assert parsed[2].params == {"id": "x"}


def test_space_separated_params_and_schemes_still_split() -> None:
    # Shapes seen from L402 servers: no commas. Params never move to another challenge.
    parsed = parse_challenge_list('LSAT macaroon="m" invoice="i" Payment id="a" realm="r"')
    assert [(c.scheme, dict(c.params)) for c in parsed] == [
        ("LSAT", {"macaroon": "m", "invoice": "i"}),
        ("Payment", {"id": "a", "realm": "r"}),
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('Payment id="unterminated', "unterminated quoted string"),
        ('Payment id="a\x01b"', "control character"),
        ("Payment request=abc==", "unexpected '=' after its value"),
        ('Payment id="a"b', "unexpected 'b' after its value"),
        ("Payment id=, realm=r", None),  # `id=` alone is a token68 by the grammar
        ('Payment id="a", realm=@x', "bad value"),
        ('Payment id="a", @', "unexpected '@'"),
        ('Payment id="a", realm=', None),
    ],
)
def test_malformed_params_are_recorded_not_guessed(value: str, problem: str | None) -> None:
    parsed = [c for c in parse_challenge_list(value) if c.scheme == "Payment"]
    assert len(parsed) == 1
    if problem is None:
        assert parsed[0].problem is not None or parsed[0].token68 is not None
    else:
        assert parsed[0].problem is not None and problem in parsed[0].problem
        assert "\n" not in parsed[0].problem


def test_a_malformed_challenge_does_not_hide_the_next_one() -> None:
    parsed = parse_challenge_list(
        'L402 macaroon=abc==, invoice="x", Payment id="ok", realm="r", Basic realm="unterminated'
    )
    assert [c.scheme for c in parsed] == ["L402", "Payment", "Basic"]
    assert parsed[0].problem is not None
    assert parsed[1].problem is None and dict(parsed[1].params) == {"id": "ok", "realm": "r"}
    assert parsed[2].problem is not None


def test_params_before_any_scheme_are_dropped() -> None:
    parsed = parse_challenge_list('realm="x", Payment id="a"')
    assert [(c.scheme, dict(c.params)) for c in parsed] == [("Payment", {"id": "a"})]


@pytest.mark.parametrize("value", ["", " , ,", "\u00e9", '"', "=", "Payment", 'x="'])
def test_parser_never_raises(value: str) -> None:
    parse_challenge_list(value)


def test_quote_escapes_and_refuses_what_a_header_cannot_carry() -> None:
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert quote("tab\tok") == '"tab\tok"'
    for bad in ("cr\rlf", "lf\n", "nul\x00", "del\x7f"):
        with pytest.raises(ValueError, match="control character"):
            quote(bad)
    for text in ('a"b\\c', "café", "one, two=three", ""):
        (parsed,) = parse_challenge_list(f"X p={quote(text)}")
        assert parsed.params["p"] == text


# --- RFC 3339 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "timestamp"),
    [
        ("2026-03-15T12:05:00Z", 1773576300.0),
        ("2026-03-15t12:05:00z", 1773576300.0),
        ("2026-03-15T13:05:00+01:00", 1773576300.0),
        ("2026-03-15T11:35:00-00:30", 1773576300.0),
        ("2026-03-15T12:05:00.25Z", 1773576300.25),
        ("2016-12-31T23:59:60Z", 1483228800.0),  # a leap second ends its minute
        ("1970-01-01T00:00:00Z", 0.0),
    ],
)
def test_rfc3339_parse(text: str, timestamp: float) -> None:
    assert parse_rfc3339(text) == timestamp


@pytest.mark.parametrize(
    "text",
    [
        "2026-03-15 12:05:00Z",
        "2026-03-15T12:05:00",
        "2026-02-30T12:05:00Z",
        "2026-03-15T24:00:00Z",
        "2026-03-15T12:05:00+24:00",
        "2026-03-15T12:05Z",
        "\u0662026-03-15T12:05:00Z",  # a non-ASCII digit
        "",
    ],
)
def test_rfc3339_rejections(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339(text)


def test_rfc3339_format_rounds_down_to_whole_seconds() -> None:
    assert format_rfc3339(1773576300.999) == "2026-03-15T12:05:00Z"
    assert parse_rfc3339(format_rfc3339(1773576300.999)) <= 1773576300.999
    for bad in (float("nan"), float("inf"), -1.0, 1e12):
        with pytest.raises(ValueError, match="out of range"):
            format_rfc3339(bad)
