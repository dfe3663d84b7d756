"""Base64url (RFC 4648 section 5) as the Payment scheme writes and reads it.

Written without padding. Read strictly: every value has exactly one accepted spelling apart from
optional correct padding, because the scheme compares and HMACs the encoded strings, and a
lenient decoder (Python's skips nothing but ignores non-zero trailing bits; others skip line
breaks) lets one payload travel under several spellings that peers then disagree about.
"""

import base64
import binascii
import re

# Only the url-safe alphabet; `=` is handled separately (trailing padding only).
_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


class Base64urlError(ValueError):
    """A value that is not strict base64url; the message is one line and never echoes it."""


def b64url_encode(raw: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def max_encoded_length(max_decoded: int) -> int:
    """The longest (padded) base64url text that can decode to `max_decoded` bytes."""
    return (max_decoded + 2) // 3 * 4


def b64url_decode(text: str, *, max_decoded: int, what: str = "value") -> bytes:
    """Strict base64url: padding accepted only when it makes the length a multiple of 4; no
    whitespace, no `+/`, no internal or excess padding, no non-zero trailing bits; at most
    `max_decoded` bytes (checked on the text's length before any decoding work)."""
    if len(text) > max_encoded_length(max_decoded):
        limit = max_encoded_length(max_decoded)
        raise Base64urlError(f"{what} too large: {len(text)} characters, the limit is {limit}")
    unpadded = text.rstrip("=")
    padding = len(text) - len(unpadded)
    if padding > 2:
        raise Base64urlError(f"{what} has {padding} padding characters, at most 2 are allowed")
    if padding and len(text) % 4:
        raise Base64urlError(f"{what} is padded to a length that is not a multiple of 4")
    if not _ALPHABET.fullmatch(unpadded):
        bad = next(char for char in unpadded if not _ALPHABET.fullmatch(char))
        where = unpadded.index(bad)
        shown = repr(bad) if bad.isprintable() and bad.isascii() else f"U+{ord(bad):04X}"
        raise Base64urlError(f"{what} is not base64url: character {shown} at offset {where}")
    if len(unpadded) % 4 == 1:
        raise Base64urlError(f"{what} is not base64url: a dangling final character")
    try:
        raw = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):  # unreachable after the checks above; fail closed
        raise Base64urlError(f"{what} is not base64url") from None
    # Python ignores the bits a final partial group cannot carry ("AB" == "AA"): re-encoding
    # is the exact test that they were zero, so the spelling is the canonical one.
    if b64url_encode(raw) != unpadded:
        raise Base64urlError(f"{what} is not canonical base64url: non-zero trailing bits")
    if len(raw) > max_decoded:
        raise Base64urlError(f"{what} too large: {len(raw)} bytes, the limit is {max_decoded}")
    return raw
