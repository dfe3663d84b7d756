"""BOLT11 encoding for the invoices the dev ledger issues.

Every 402 needs a fresh invoice. The `bolt11` package encodes through bitstring (about 1.5 ms an
invoice, most of it in `bitarray_to_u5`), and the reference `bech32` package regroups bits and
computes the checksum one bit at a time (about 0.3 ms). Here the bits are regrouped by base64's
base32 (in C) and the checksum takes three groups per table lookup. Signing is coincurve, as in
`bolt11`. Decoding stays with the `bolt11` package, and the tests check this encoder's output byte
for byte against `bolt11.encode` on the same inputs.
"""

import base64
from collections.abc import Iterable
from functools import reduce
from operator import xor

from coincurve import PrivateKey

MSAT_PER_BTC = 100_000_000_000
# Multipliers from largest to smallest, as msat per unit; "p" (pico-BTC) is a tenth of a msat.
_MULTIPLIERS = (("m", 100_000_000), ("u", 100_000), ("n", 100))

# BOLT11 tagged field types.
TAG_PAYMENT_HASH = 1
TAG_PAYMENT_SECRET = 16
TAG_DESCRIPTION = 13
TAG_EXPIRY = 6
TAG_MIN_FINAL_CLTV_EXPIRY = 24
TAG_FEATURES = 5
TAG_PAYEE = 19
TAG_DESCRIPTION_HASH = 23

# var_onion_optin (bit 8) and payment_secret (bit 14), both required: what LND sets.
DEFAULT_FEATURES = (1 << 8) | (1 << 14)


def amount_part(amount_msat: int | None) -> str:
    """The shortest amount string for the human-readable part ("210n" for 21 sat)."""
    if not amount_msat:
        return ""
    if amount_msat % MSAT_PER_BTC == 0:
        return str(amount_msat // MSAT_PER_BTC)
    for suffix, msat in _MULTIPLIERS:
        if amount_msat % msat == 0:
            return f"{amount_msat // msat}{suffix}"
    return f"{amount_msat * 10}p"


def _reduce_xor(values: Iterable[int]) -> int:
    return reduce(xor, values, 0)


_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATORS = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
# The generator XOR for each value of the checksum's top five bits, so each step is one lookup.
_POLYMOD_TABLE = tuple(
    _reduce_xor(g for i, g in enumerate(_GENERATORS) if (top >> i) & 1) for top in range(32)
)


def _three_steps(top: int) -> int:
    """What three polymod steps make of the checksum's top 15 bits (the rest only shifts)."""
    chk = top << 15
    for _ in range(3):
        chk = ((chk & 0x1FFFFFF) << 5) ^ _POLYMOD_TABLE[chk >> 25]
    return chk


# The polymod is linear: three 5-bit values at a time, one lookup each (a third of the loop).
_POLYMOD_TABLE_3 = tuple(_three_steps(top) for top in range(1 << 15))
_CHARSET_BYTES = bytes.maketrans(bytes(range(32)), _CHARSET.encode())


def bech32_checksum(hrp: str, data: list[int]) -> list[int]:
    """BIP-173 checksum (the same result as the reference implementation's polymod)."""
    values = [*(ord(c) >> 5 for c in hrp), 0, *(ord(c) & 31 for c in hrp), *data, 0, 0, 0, 0, 0, 0]
    chk = 1
    head = len(values) % 3
    for value in values[:head]:
        chk = ((chk & 0x1FFFFFF) << 5) ^ value ^ _POLYMOD_TABLE[chk >> 25]
    table = _POLYMOD_TABLE_3
    it = iter(values[head:])
    for a, b, c in zip(it, it, it, strict=True):
        chk = ((chk & 0x7FFF) << 15) ^ table[chk >> 15] ^ (a << 10 | b << 5 | c)
    chk ^= 1
    return [(chk >> 5 * (5 - i)) & 31 for i in range(6)]


def bech32_encode(hrp: str, data: list[int]) -> str:
    return (
        hrp + "1" + bytes((*data, *bech32_checksum(hrp, data))).translate(_CHARSET_BYTES).decode()
    )


def _int_groups(value: int, width: int | None = None) -> list[int]:
    """Big-endian 5-bit groups; minimal length unless a width is given."""
    groups = []
    while value:
        groups.append(value & 31)
        value >>= 5
    if width is not None:
        groups += [0] * (width - len(groups))
    return groups[::-1]


def _field(tag: int, groups: list[int]) -> list[int]:
    return [tag, len(groups) >> 5, len(groups) & 31, *groups]


# base64's base32 is the same regrouping of bits, done in C: only its alphabet differs.
_B32_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_TO_GROUPS = bytes.maketrans(_B32_ALPHABET, bytes(range(32)))
_GROUPS_TO_B32 = bytes.maketrans(bytes(range(32)), _B32_ALPHABET)


def _byte_groups(data: bytes) -> list[int]:
    """8-bit bytes as 5-bit groups, zero bits appended to fill the last group."""
    return list(base64.b32encode(data).rstrip(b"=").translate(_B32_TO_GROUPS))


def _groups_to_bytes(groups: list[int]) -> bytes:
    """5-bit groups as bytes, zero bits appended to fill the last byte."""
    count = -(-len(groups) * 5 // 8)
    text = bytes(groups).translate(_GROUPS_TO_B32)
    text += b"A" * (-len(text) % 8)  # "A" is five zero bits
    return base64.b32decode(text)[:count]


def encode_invoice(
    *,
    key: PrivateKey,
    currency: str,
    amount_msat: int | None,
    created_at: int,
    payment_hash: bytes,
    payment_secret: bytes,
    description: str,
    expiry: int,
    min_final_cltv_expiry: int,
    features: int = DEFAULT_FEATURES,
    payee: bytes | None = None,
    description_hash: bytes | None = None,
) -> str:
    """A signed BOLT11 string. currency is the BOLT11 prefix without "ln": bc, tb, tbs, bcrt.

    With `description_hash` (LNURL-pay: sha256 of the metadata) the `h` field replaces `d`."""
    hrp = f"ln{currency}{amount_part(amount_msat)}"
    data = _int_groups(created_at, 7)
    data += _field(TAG_PAYMENT_HASH, _byte_groups(payment_hash))
    data += _field(TAG_PAYMENT_SECRET, _byte_groups(payment_secret))
    if description_hash is not None:
        data += _field(TAG_DESCRIPTION_HASH, _byte_groups(description_hash))
    else:
        data += _field(TAG_DESCRIPTION, _byte_groups(description.encode()))
    data += _field(TAG_EXPIRY, _int_groups(expiry))
    data += _field(TAG_MIN_FINAL_CLTV_EXPIRY, _int_groups(min_final_cltv_expiry))
    if features:
        data += _field(TAG_FEATURES, _int_groups(features))
    if payee is not None:
        data += _field(TAG_PAYEE, _byte_groups(payee))
    signing_data = _groups_to_bytes(data)
    # r || s || recovery id, signed over sha256(hrp || data), as BOLT11 and the bolt11 package do.
    signature = key.sign_recoverable(hrp.encode() + signing_data)
    return bech32_encode(hrp, data + _byte_groups(signature))
