"""The macaroon identifier: the layout Aperture mints, so tokens stay interchangeable."""

import os
from dataclasses import dataclass

TOKEN_ID_SIZE = 32
PAYMENT_HASH_SIZE = 32
IDENTIFIER_SIZE = 66
LATEST_VERSION = 0
KNOWN_VERSIONS = frozenset({0})
_VERSION_SIZE = 2


class UnknownVersionError(ValueError):
    """The identifier names a layout this code does not know (a 401, not a parse bug)."""


@dataclass(frozen=True)
class Identifier:
    version: int
    payment_hash: bytes
    token_id: bytes

    def __post_init__(self) -> None:
        # Checked here so encode() can never emit something decode() would refuse.
        if not 0 <= self.version <= 0xFFFF:
            raise ValueError(f"identifier version {self.version} does not fit in uint16")
        if len(self.payment_hash) != PAYMENT_HASH_SIZE:
            raise ValueError(
                f"payment_hash must be {PAYMENT_HASH_SIZE} bytes, got {len(self.payment_hash)}"
            )
        if len(self.token_id) != TOKEN_ID_SIZE:
            raise ValueError(f"token_id must be {TOKEN_ID_SIZE} bytes, got {len(self.token_id)}")

    def encode(self) -> bytes:
        """uint16 big-endian version | payment_hash | token_id (66 bytes)."""
        return self.version.to_bytes(_VERSION_SIZE, "big") + self.payment_hash + self.token_id

    @classmethod
    def decode(cls, raw: bytes) -> "Identifier":
        """Parse the 66-byte layout; `UnknownVersionError` (a ValueError) for other versions."""
        raw = bytes(raw)
        if len(raw) < _VERSION_SIZE:
            raise ValueError(f"identifier too short ({len(raw)} bytes)")
        version = int.from_bytes(raw[:_VERSION_SIZE], "big")
        # Version first, as Aperture does: a future version may have another length.
        if version not in KNOWN_VERSIONS:
            raise UnknownVersionError(f"unknown identifier version {version}")
        if len(raw) != IDENTIFIER_SIZE:
            raise ValueError(f"identifier must be {IDENTIFIER_SIZE} bytes, got {len(raw)}")
        return cls(version, raw[2:34], raw[34:])

    @classmethod
    def new(cls, payment_hash: bytes) -> "Identifier":
        return cls(LATEST_VERSION, payment_hash, os.urandom(TOKEN_ID_SIZE))
