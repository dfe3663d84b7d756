import dataclasses
import hashlib

import pytest

from l402proxy.l402.encoding import b64decode_any
from l402proxy.l402.identifier import (
    IDENTIFIER_SIZE,
    LATEST_VERSION,
    TOKEN_ID_SIZE,
    Identifier,
    UnknownVersionError,
)
from l402proxy.l402.token import decode_macaroon

PAYMENT_HASH = hashlib.sha256(b"preimage").digest()
TOKEN_ID = bytes(range(32))

# Minted by Aperture (from the lsat-js test fixtures): location "lsat", services=meme:0.
APERTURE_MACAROON = (
    "AgEEbHNhdAJCAAAwpHpumws6ufQoDwiTLNcge0QPUIWA0+tVY+tKPYAJ/zSfmEGlIpNm3VzxuzCqLhEp5KGiyPLUM9L+"
    "kcB7uzS+AAIPc2VydmljZXM9bWVtZTowAAISbWVtZV9jYXBhYmlsaXRpZXM9AAAGILA1VCEIExukt4nG+XR9tX8WJ2BV"
    "MiHG3UNt1uYJ+NRD"
)


def test_constants() -> None:
    assert (IDENTIFIER_SIZE, TOKEN_ID_SIZE, LATEST_VERSION) == (66, 32, 0)


def test_encode_layout_is_exactly_66_bytes() -> None:
    raw = Identifier(0, PAYMENT_HASH, TOKEN_ID).encode()
    assert len(raw) == 66
    assert raw[:2] == b"\x00\x00"
    assert raw[2:34] == PAYMENT_HASH
    assert raw[34:] == TOKEN_ID


def test_version_is_big_endian_uint16() -> None:
    assert Identifier(0x0102, PAYMENT_HASH, TOKEN_ID).encode()[:2] == b"\x01\x02"
    assert Identifier(0xFFFF, PAYMENT_HASH, TOKEN_ID).encode()[:2] == b"\xff\xff"


def test_decode_round_trip() -> None:
    ident = Identifier(0, PAYMENT_HASH, TOKEN_ID)
    decoded = Identifier.decode(ident.encode())
    assert decoded == ident
    assert type(decoded.payment_hash) is bytes and type(decoded.token_id) is bytes


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = Identifier(0, PAYMENT_HASH, TOKEN_ID).encode()
    assert Identifier.decode(bytearray(raw)).token_id == TOKEN_ID
    assert Identifier.decode(memoryview(raw)).payment_hash == PAYMENT_HASH


@pytest.mark.parametrize("size", [0, 1, 2, 34, 65, 67, 132])
def test_decode_wrong_length(size: int) -> None:
    raw = (b"\x00\x00" + bytes(range(200)))[:size]
    with pytest.raises(ValueError) as info:
        Identifier.decode(raw)
    assert not isinstance(info.value, UnknownVersionError)
    assert str(size) in str(info.value)


@pytest.mark.parametrize(("prefix", "version"), [(b"\x00\x01", 1), (b"\x01\x00", 256)])
def test_decode_unknown_version(prefix: bytes, version: int) -> None:
    with pytest.raises(UnknownVersionError, match=f"unknown identifier version {version}$"):
        Identifier.decode(prefix + PAYMENT_HASH + TOKEN_ID)


def test_unknown_version_is_a_value_error_and_checked_before_length() -> None:
    # A future version may have another layout, so its length says nothing.
    with pytest.raises(ValueError, match="unknown identifier version 1"):
        Identifier.decode(b"\x00\x01" + b"x" * 10)


def test_new_uses_version_zero_and_random_token_ids() -> None:
    first = Identifier.new(PAYMENT_HASH)
    second = Identifier.new(PAYMENT_HASH)
    assert first.version == 0 and first.payment_hash == PAYMENT_HASH
    assert len(first.token_id) == 32
    assert first.token_id != second.token_id
    assert len(first.encode()) == 66


@pytest.mark.parametrize(
    "kwargs",
    [
        {"version": -1},
        {"version": 0x10000},
        {"payment_hash": PAYMENT_HASH[:31]},
        {"payment_hash": PAYMENT_HASH + b"\x00"},
        {"token_id": b""},
        {"token_id": TOKEN_ID + b"\x00"},
    ],
)
def test_constructor_refuses_what_could_not_round_trip(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"version": 0, "payment_hash": PAYMENT_HASH, "token_id": TOKEN_ID}
    fields.update(kwargs)
    with pytest.raises(ValueError):
        Identifier(**fields)  # type: ignore[arg-type]


def test_new_refuses_short_payment_hash() -> None:
    with pytest.raises(ValueError, match="payment_hash must be 32 bytes"):
        Identifier.new(b"short")


def test_frozen() -> None:
    ident = Identifier(0, PAYMENT_HASH, TOKEN_ID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.version = 1  # type: ignore[misc]


def test_aperture_minted_identifier() -> None:
    raw = decode_macaroon(APERTURE_MACAROON).identifier_bytes
    ident = Identifier.decode(raw)
    assert ident.version == 0
    assert ident.payment_hash.hex() == (
        "30a47a6e9b0b3ab9f4280f08932cd7207b440f508580d3eb5563eb4a3d8009ff"
    )
    assert ident.encode() == raw
    # The identifier sits right after the version byte and the location packet.
    assert b64decode_any(APERTURE_MACAROON)[9 : 9 + 66] == raw
