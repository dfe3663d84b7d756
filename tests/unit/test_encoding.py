import base64

import pytest

from l402proxy.l402.encoding import b64decode_any, b64encode_std

# Chosen so every flavour differs: standard has '+' and '/', URL-safe '-' and '_', and the
# length needs one '=' of padding.
RAW = b"\xfb\xff\xbf\xfe\x00\x01\xfb\xef"
STD_PADDED = "+/+//gAB++8="


def test_sample_covers_every_alphabet_difference() -> None:
    assert base64.b64encode(RAW).decode() == STD_PADDED
    assert "+" in STD_PADDED and "/" in STD_PADDED and STD_PADDED.endswith("=")


@pytest.mark.parametrize(
    "text",
    [
        STD_PADDED,
        STD_PADDED.rstrip("="),
        STD_PADDED.replace("+", "-").replace("/", "_"),
        STD_PADDED.replace("+", "-").replace("/", "_").rstrip("="),
        f"  {STD_PADDED}\t\r\n",
    ],
    ids=["std-padded", "std-unpadded", "urlsafe-padded", "urlsafe-unpadded", "whitespace"],
)
def test_decode_any_flavour(text: str) -> None:
    assert b64decode_any(text) == RAW


@pytest.mark.parametrize("size", range(1, 40))
def test_round_trip_every_padding_length(size: int) -> None:
    raw = bytes((i * 37 + 250) % 256 for i in range(size))
    encoded = b64encode_std(raw)
    assert encoded == base64.b64encode(raw).decode()
    assert len(encoded) % 4 == 0
    assert b64decode_any(encoded) == raw
    assert b64decode_any(encoded.rstrip("=")) == raw
    assert b64decode_any(base64.urlsafe_b64encode(raw).decode().rstrip("=")) == raw


def test_encode_is_standard_alphabet_with_padding() -> None:
    assert b64encode_std(RAW) == STD_PADDED
    assert b64encode_std(b"\x02") == "Ag=="
    assert b64encode_std(b"") == ""


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "A",  # one char cannot hold a byte
        "AAAAA",  # length 1 mod 4 after padding is stripped
        "AB=C",  # padding in the middle
        "AB===",  # too much padding
        "====",
        "AB CD",
        "AB$D",
        "ABé=",
        "AB\x00D",
    ],
)
def test_decode_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        b64decode_any(text)
