"""The L402/LSAT protocol with no I/O: tokens, identifiers, headers and invoices."""

from .encoding import b64decode_any, b64encode_std
from .headers import (
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
from .identifier import Identifier
from .invoice import InvoiceInfo, decode_invoice
from .token import (
    Caveat,
    TokenError,
    TokenInfo,
    VerifiedToken,
    caveats_for,
    decode_macaroon,
    derive_root_key,
    inspect,
    mint,
    parse_caveat,
    verify,
)

__all__ = [
    "Caveat",
    "Challenge",
    "Credential",
    "CredentialError",
    "Identifier",
    "InvoiceInfo",
    "TokenError",
    "TokenInfo",
    "VerifiedToken",
    "accepts_l402",
    "b64decode_any",
    "b64encode_std",
    "caveats_for",
    "decode_invoice",
    "decode_macaroon",
    "derive_root_key",
    "format_challenge",
    "format_credential",
    "inspect",
    "mint",
    "parse_auth_header",
    "parse_caveat",
    "parse_challenges",
    "parse_credential",
    "verify",
]
