"""Macaroons minted the way the l402proxy server mints them, and what the Python client reads
from each (l402proxy.l402.token.inspect): the Go SDK's InspectMacaroon must read the same.

    .venv/bin/python sdk/go/l402/testdata/gen_minted.py          # rewrite minted.json
    .venv/bin/python sdk/go/l402/testdata/gen_minted.py --check  # exit 1 if it is out of date

Every input is fixed (keys, identifiers, expiries), so the output is reproducible; the keys are
test values that protect nothing.
"""

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from pymacaroons import MACAROON_V1, MACAROON_V2, Caveat, Macaroon
from pymacaroons.serializers.binary_serializer import BinarySerializer

from l402proxy.l402.encoding import b64encode_std
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import (
    LOCATION,
    TokenError,
    attenuate,
    caveats_for,
    derive_root_key,
    inspect,
    mint,
)

OUT = Path(__file__).with_name("minted.json")
SECRET = hashlib.sha256(b"gosdk fixture secret (protects nothing)").digest()
PAYMENT_HASH = hashlib.sha256(b"gosdk fixture preimage").digest()
TOKEN_ID = hashlib.sha256(b"gosdk fixture token id").digest()
IDENTIFIER = Identifier(0, PAYMENT_HASH, TOKEN_ID)
VALID_UNTIL = 1_900_000_000


def server_mint(caveats: list[str], identifier: Identifier = IDENTIFIER) -> str:
    """What server.py does: a per-token root key derived from the secret, then mint()."""
    return mint(derive_root_key(SECRET, identifier.token_id), identifier, caveats)


def raw_v2(identifier: bytes, caveats: list[bytes], third_party: bool = False) -> str:
    """A V2 macaroon built by hand, for what mint() refuses to write (bad caveats); its
    signature does not verify, which a client never checks."""
    macaroon = Macaroon(location=LOCATION, identifier=identifier, key=b"k", version=MACAROON_V2)
    for caveat in caveats:
        macaroon.caveats.append(Caveat(caveat_id=caveat, version=MACAROON_V2))
    if third_party:
        # Fixed verification id (pymacaroons would encrypt a random nonce): inspect() skips
        # third-party caveats whatever they hold.
        macaroon.caveats.append(
            Caveat(
                caveat_id=b"third party id",
                verification_key_id=b"v" * 40,
                location="https://elsewhere.example",
                version=MACAROON_V2,
            )
        )
    return b64encode_std(BinarySerializer().serialize_raw(macaroon))


def cases() -> dict[str, str]:
    podcast = server_mint(caveats_for("podcast", valid_until=VALID_UNTIL, capabilities=None))
    v1 = Macaroon(location=LOCATION, identifier="plain", key=b"k", version=MACAROON_V1)
    return {
        "server-podcast": podcast,
        "server-capabilities": server_mint(
            caveats_for("premium", valid_until=VALID_UNTIL, capabilities=["read", "write"])
        ),
        "server-never-expires": server_mint(
            caveats_for("bonus", valid_until=None, capabilities=None)
        ),
        "attenuated-earlier-expiry": attenuate(podcast, [" podcast_valid_until = 1800000000"]),
        "two-services-tightest-expiry": server_mint(
            ["services=a:0,b:1", "a_valid_until=1900000000", "b_valid_until=1700000000"]
        ),
        "narrowed-services": server_mint(
            ["services=a:0,b:0", "services=b:0", "a_valid_until=100", "b_valid_until=1900000000"]
        ),
        "other-service-expiry-ignored": server_mint(["services=a:0", "z_valid_until=100"]),
        "lsat-js-hex-identifier-expiration-ms": raw_v2(
            IDENTIFIER.encode().hex().encode(), [b"expiration=1900000000123"]
        ),
        "third-party-caveat-skipped": raw_v2(IDENTIFIER.encode(), [b"services=p:0"], True),
        "no-caveats": server_mint([]),
        "url-safe-unpadded": podcast.replace("+", "-").replace("/", "_").rstrip("="),
        "non-ascii-service": server_mint(["services=épisode-⚡:0"]),
        "unknown-version": raw_v2(b"\x00\x01" + bytes(64), []),
        "short-identifier": raw_v2(b"\x00\x00" + bytes(8), []),
        "v1-macaroon": b64encode_std(BinarySerializer().serialize_raw(v1)),
        "truncated": podcast.rstrip("=")[:-20],
        "not-base64": "%%not*base64!!",
        "caveat-not-utf8": raw_v2(IDENTIFIER.encode(), [b"services=\xff:0"]),
        "caveat-without-equals": raw_v2(IDENTIFIER.encode(), [b"justtext"]),
        "services-without-tier": raw_v2(IDENTIFIER.encode(), [b"services=episode"]),
        "control-chars-in-service": raw_v2(IDENTIFIER.encode(), [b"services=evil\r\ninjected:0"]),
        "expiry-not-a-number": raw_v2(IDENTIFIER.encode(), [b"podcast_valid_until=soon"]),
    }


def expected(macaroon: str) -> dict[str, Any]:
    try:
        info = inspect(macaroon)
    except TokenError as exc:
        return {"error": exc.reason}
    return {
        "version": info.identifier.version,
        "payment_hash": info.identifier.payment_hash.hex(),
        "token_id": info.identifier.token_id.hex(),
        "services": list(info.services),
        "valid_until": info.valid_until,
        "caveats": list(info.caveats),
    }


def render() -> str:
    table = [
        {"id": name, "macaroon": macaroon, "expect": expected(macaroon)}
        for name, macaroon in cases().items()
    ]
    lines = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in table)
    return '{\n "generator": "gen_minted.py",\n "cases": [\n' + lines + "\n ]\n}\n"


def main() -> int:
    text = render()
    if sys.argv[1:] == ["--check"]:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
