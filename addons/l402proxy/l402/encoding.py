"""Base64 as it appears in L402 headers: read every flavour, write Aperture's."""

import base64
import binascii
import re

_B64_CHARS = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")


def b64decode_any(value: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not."""
    text = value.strip()
    if not text or not _B64_CHARS.match(text):
        raise ValueError("not valid base64")
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    if len(text) % 4 == 1:
        raise ValueError("not valid base64 (truncated)")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not valid base64 ({exc})") from None


def b64encode_std(raw: bytes) -> str:
    """Standard alphabet with padding: what Aperture emits and every client reads."""
    return base64.b64encode(raw).decode("ascii")
