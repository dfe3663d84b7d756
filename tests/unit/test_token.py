import base64
import binascii
import hashlib
import hmac
import pickle

import pytest
from pymacaroons import MACAROON_V1, MACAROON_V2, Macaroon
from pymacaroons.caveat import Caveat as RawCaveat
from pymacaroons.serializers.binary_serializer import BinarySerializer
from pymacaroons.utils import sign_first_party_caveat

from l402proxy.l402.encoding import b64decode_any, b64encode_std
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import (
    INVALID_REASONS,
    LOCATION,
    REASONS,
    Caveat,
    TokenError,
    caveats_for,
    decode_macaroon,
    derive_root_key,
    mint,
    parse_caveat,
    verify,
)
from l402proxy.l402.token import attenuate as attenuate_token

NOW = 1_700_000_000
SECRET = b"s" * 32
PREIMAGE = bytes(range(100, 132))
PAYMENT_HASH = hashlib.sha256(PREIMAGE).digest()
IDENT = Identifier(0, PAYMENT_HASH, bytes(range(32)))
ROOT_KEY = derive_root_key(SECRET, IDENT.token_id)
SERVICE = "podcast"

# Minted by Aperture (lsat-js test fixtures); we do not know its root key.
APERTURE_MACAROON = (
    "AgEEbHNhdAJCAAAwpHpumws6ufQoDwiTLNcge0QPUIWA0+tVY+tKPYAJ/zSfmEGlIpNm3VzxuzCqLhEp5KGiyPLUM9L+"
    "kcB7uzS+AAIPc2VydmljZXM9bWVtZTowAAISbWVtZV9jYXBhYmlsaXRpZXM9AAAGILA1VCEIExukt4nG+XR9tX8WJ2BV"
    "MiHG3UNt1uYJ+NRD"
)
# Minted by lsat-js (its test fixtures): URL-safe unpadded, identifier as 132 hex characters.
LSAT_JS_MACAROON = (
    "AgEIbG9jYXRpb24ChAEwMDAwN2NlZjkzZjJjNTFhYTY1MjA4YmVjMTQ0N2ZjMzhmYzU4ZDliY2UxMzc1YTUzMmVkYjBk"
    "Y2QyOTBhMmMzMzBhZTljNTMyNjZiMWJlMzE1MGI2NjZiM2Y2ZWM3MGYyOGJkNDNhOWQ0ZmQxOTQ2MWE2MjBmYmFjYzMz"
    "NzY4YTk5OTQAAhhleHBpcmF0aW9uPTE2NDQxOTQyNjM2OTMAAAYg_1CMq8TuMXv-ERHDWQCtlIhsQwwKiUDmnnh1maDFpkQ"
)


def make(
    caveats: list[str] | None = None, *, key: bytes = ROOT_KEY, ident: Identifier = IDENT
) -> str:
    if caveats is None:
        caveats = caveats_for(SERVICE, valid_until=NOW + 3600, capabilities=["listen", "download"])
    return mint(key, ident, caveats)


def check(token: str, **kwargs: object) -> object:
    args: dict[str, object] = {"service": SERVICE, "now": NOW}
    args.update(kwargs)
    preimage = args.pop("preimage", PREIMAGE)
    key = args.pop("key", ROOT_KEY)
    return verify(token, preimage, key, **args)  # type: ignore[arg-type]


def reason(token: str, **kwargs: object) -> str:
    with pytest.raises(TokenError) as info:
        check(token, **kwargs)
    return info.value.reason


def encode(mac: Macaroon) -> str:
    return b64encode_std(BinarySerializer().serialize_raw(mac))


def attenuate(token: str, *caveats: str) -> str:
    """What a token holder may do: append caveats, chaining the signature correctly."""
    mac = decode_macaroon(token)
    for caveat in caveats:
        mac.add_first_party_caveat(caveat)
    return encode(mac)


# --- minting ---------------------------------------------------------------------------------


def test_mint_emits_standard_padded_base64_of_a_v2_macaroon() -> None:
    token = make()
    assert len(token) % 4 == 0
    assert "-" not in token and "_" not in token
    assert base64.b64encode(base64.b64decode(token, validate=True)).decode() == token
    raw = b64decode_any(token)
    assert raw[0] == 2
    mac = decode_macaroon(token)
    assert mac.version == MACAROON_V2
    assert mac.location == LOCATION == "lsat"
    assert mac.identifier_bytes == IDENT.encode()
    assert [c.caveat_id_bytes.decode() for c in mac.caveats] == [
        f"services={SERVICE}:0",
        f"{SERVICE}_capabilities=listen,download",
        f"{SERVICE}_valid_until={NOW + 3600}",
    ]


def test_mint_signature_is_libmacaroons_hmac_chain() -> None:
    # Recomputed by hand, so a pymacaroons change of key derivation would show up here.
    token = make(["services=podcast:0"])
    key = hmac.digest(b"macaroons-key-generator", ROOT_KEY, "sha256")
    sig = hmac.digest(key, IDENT.encode(), "sha256")
    sig = hmac.digest(sig, b"services=podcast:0", "sha256")
    assert b64decode_any(token).endswith(b"\x06\x20" + sig)


def test_mint_refuses_empty_key_and_unreadable_caveats() -> None:
    with pytest.raises(ValueError, match="root_key"):
        mint(b"", IDENT, [])
    with pytest.raises(ValueError, match="condition=value"):
        mint(ROOT_KEY, IDENT, ["no-equals-sign"])
    with pytest.raises(ValueError, match="condition=value"):
        mint(ROOT_KEY, IDENT, ["=value"])


def test_caveats_for() -> None:
    assert caveats_for("api", valid_until=None, capabilities=None) == ["services=api:0"]
    assert caveats_for("api", valid_until=1700000000, capabilities=["read", "write"]) == [
        "services=api:0",
        "api_capabilities=read,write",
        "api_valid_until=1700000000",
    ]
    assert caveats_for("api", valid_until=None, capabilities=[]) == [
        "services=api:0",
        "api_capabilities=",
    ]


@pytest.mark.parametrize("service", ["", "a,b", "a:b", "a=b", "a b"])
def test_caveats_for_refuses_service_names_that_break_the_caveat(service: str) -> None:
    with pytest.raises(ValueError, match="service name"):
        caveats_for(service, valid_until=None, capabilities=None)


@pytest.mark.parametrize("capability", ["", "a,b", "a b"])
def test_caveats_for_refuses_bad_capabilities(capability: str) -> None:
    with pytest.raises(ValueError, match="capability"):
        caveats_for("api", valid_until=None, capabilities=[capability])


def test_derive_root_key() -> None:
    expected = hmac.new(SECRET, b"l402proxy/root-key/v1" + IDENT.token_id, "sha256").digest()
    assert expected == ROOT_KEY and len(ROOT_KEY) == 32
    assert derive_root_key(SECRET, bytes(32)) != ROOT_KEY
    assert derive_root_key(b"t" * 32, IDENT.token_id) != ROOT_KEY
    with pytest.raises(ValueError):
        derive_root_key(b"", IDENT.token_id)


@pytest.mark.parametrize(
    ("text", "condition", "value"),
    [
        ("a=b", "a", "b"),
        (" a = b ", "a", "b"),
        ("a=b=c", "a", "b=c"),
        ("a=", "a", ""),
        ("services=x:0,y:1", "services", "x:0,y:1"),
    ],
)
def test_parse_caveat(text: str, condition: str, value: str) -> None:
    assert parse_caveat(text) == Caveat(condition, value)


@pytest.mark.parametrize("text", ["", "novalue", "=b", " =b"])
def test_parse_caveat_malformed(text: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_caveat(text)
    assert info.value.reason == "malformed"


# --- TokenError ------------------------------------------------------------------------------


def test_token_error_reasons() -> None:
    assert set(REASONS) == INVALID_REASONS | {
        "expired",
        "wrong_service",
        "missing_capability",
        "revoked",
    }
    for name in REASONS:
        err = TokenError(name, "why")
        assert err.reason == name and str(err) == "why" and err.message == "why"
        assert err.invalid is (name in INVALID_REASONS)
    assert TokenError("bad_signature", "x").invalid
    assert not TokenError("expired", "x").invalid
    with pytest.raises(ValueError):
        TokenError("nope", "x")


def test_token_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(TokenError("expired", "token has expired")))
    assert (err.reason, str(err)) == ("expired", "token has expired")


# --- verify: the good path -------------------------------------------------------------------


def test_verify_valid_token() -> None:
    token = make()
    result = check(token, capability="listen")
    assert result.identifier == IDENT
    assert result.services == (("podcast", 0),)
    assert result.valid_until == NOW + 3600
    assert result.capabilities == frozenset({"listen", "download"})
    assert result.caveats == (
        "services=podcast:0",
        "podcast_capabilities=listen,download",
        f"podcast_valid_until={NOW + 3600}",
    )


def test_verify_without_expiry_or_capabilities() -> None:
    result = check(make(["services=podcast:0"]), capability="anything")
    assert result.valid_until is None
    assert result.capabilities is None


def test_verify_with_root_key_function_gets_the_token_id() -> None:
    seen: list[bytes] = []

    def root_key_for(token_id: bytes) -> bytes:
        seen.append(token_id)
        return derive_root_key(SECRET, token_id)

    assert check(make(), key=root_key_for).identifier == IDENT
    assert seen == [IDENT.token_id]


def test_verify_reads_services_lists_and_spaces_around_equals() -> None:
    token = make(["services = other:2, podcast:1", f"podcast_valid_until = {NOW + 5}"])
    result = check(token)
    assert result.services == (("other", 2), ("podcast", 1))
    assert result.valid_until == NOW + 5


# --- verify: every tamper --------------------------------------------------------------------


def test_wrong_preimage() -> None:
    err_reason = reason(make(), preimage=bytes(32))
    assert err_reason == "preimage_mismatch"
    assert TokenError(err_reason, "").invalid


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_preimage_of_wrong_size(size: int) -> None:
    assert reason(make(), preimage=b"\x01" * size) == "malformed"


def test_flipped_signature_byte() -> None:
    raw = bytearray(b64decode_any(make()))
    raw[-1] ^= 0x01
    assert reason(b64encode_std(bytes(raw))) == "bad_signature"


def test_flipped_byte_in_a_caveat() -> None:
    raw = b64decode_any(make())
    changed = raw.replace(b"podcast_valid_until=17", b"podcast_valid_until=27")
    assert changed != raw
    assert reason(b64encode_std(changed)) == "bad_signature"


def test_caveat_appended_without_resigning() -> None:
    mac = decode_macaroon(make(["services=podcast:0"]))
    mac.caveats.append(RawCaveat(caveat_id=b"services=other:0", version=MACAROON_V2))
    assert reason(encode(mac)) == "bad_signature"


def test_caveat_removed() -> None:
    # Dropping the expiry is the obvious attack on a token that has run out.
    mac = decode_macaroon(make())
    del mac.caveats[2]
    assert reason(encode(mac), now=NOW + 7200) == "bad_signature"


def test_caveats_reordered() -> None:
    mac = decode_macaroon(make())
    mac.caveats[0], mac.caveats[1] = mac.caveats[1], mac.caveats[0]
    assert reason(encode(mac)) == "bad_signature"


def test_identifier_swapped_same_payment_hash() -> None:
    mac = decode_macaroon(make())
    other = Identifier(0, PAYMENT_HASH, bytes(reversed(range(32))))
    mac.identifier = other.encode()
    assert reason(encode(mac)) == "bad_signature"
    assert reason(encode(mac), key=lambda token_id: derive_root_key(SECRET, token_id)) == (
        "bad_signature"
    )


def test_identifier_swapped_other_payment_hash() -> None:
    mac = decode_macaroon(make())
    mac.identifier = Identifier(0, hashlib.sha256(b"x").digest(), IDENT.token_id).encode()
    assert reason(encode(mac)) == "preimage_mismatch"


def test_wrong_root_key() -> None:
    assert reason(make(), key=derive_root_key(b"other secret", IDENT.token_id)) == "bad_signature"
    assert reason(make(), key=lambda _token_id: b"k" * 32) == "bad_signature"


def test_unknown_identifier_version() -> None:
    token = make(ident=Identifier(1, PAYMENT_HASH, IDENT.token_id))
    assert reason(token) == "unknown_version"


def test_identifier_of_wrong_length() -> None:
    mac = Macaroon(
        location=LOCATION, identifier=IDENT.encode()[:-1], key=ROOT_KEY, version=MACAROON_V2
    )
    mac.add_first_party_caveat("services=podcast:0")
    assert reason(encode(mac)) == "malformed"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not base64!",
        "AAAAA",
        b64encode_std(b"\x02"),
        b64encode_std(b"\x02\x01\x04lsat"),  # truncated
        b64encode_std(b"\x03" + bytes(100)),  # unknown format version
        b64encode_std(bytes(80)),
    ],
)
def test_garbage_is_malformed(value: str) -> None:
    assert reason(value) == "malformed"


def test_truncated_token_is_malformed() -> None:
    raw = b64decode_any(make())
    for cut in (1, 10, 33, len(raw) - 40):
        assert reason(b64encode_std(raw[:cut])) == "malformed"


def test_v1_macaroon_is_refused() -> None:
    mac = Macaroon(location=LOCATION, identifier="plain", key=ROOT_KEY, version=MACAROON_V1)
    mac.add_first_party_caveat("services=podcast:0")
    with pytest.raises(TokenError, match="V2") as info:
        decode_macaroon(mac.serialize())
    assert info.value.reason == "malformed"


def test_third_party_caveat_fails_closed() -> None:
    mac = decode_macaroon(make())
    mac.add_third_party_caveat("https://auth.example", b"k" * 32, "discharge-me")
    assert reason(encode(mac)) == "unknown_caveat"


def test_non_utf8_caveat_with_a_valid_chain_is_malformed() -> None:
    # A holder can append any bytes with a correct chain; pymacaroons' Verifier would crash on it.
    mac = decode_macaroon(make())
    predicate = b"\xff\xfe=1"
    mac.caveats.append(RawCaveat(caveat_id=predicate, version=MACAROON_V2))
    mac.signature = sign_first_party_caveat(binascii.unhexlify(mac.signature_bytes), predicate)
    assert reason(encode(mac)) == "malformed"


def test_cached_parse_still_checks_preimage_and_key_every_time() -> None:
    token = make()
    assert check(token).identifier == IDENT
    assert reason(token, preimage=bytes(32)) == "preimage_mismatch"
    assert reason(token, key=b"k" * 32) == "bad_signature"
    assert check(token).identifier == IDENT


def test_long_token_beyond_the_cache_limit() -> None:
    filler = [f"other{i}_valid_until={NOW}" for i in range(80)]
    token = make([*caveats_for(SERVICE, valid_until=NOW + 60, capabilities=None), *filler])
    assert len(token) > 2048
    assert check(token).valid_until == NOW + 60
    assert reason(token, key=b"k" * 32) == "bad_signature"


# --- verify: expiry --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [(NOW + 9.999, None), (NOW + 10, "expired"), (NOW + 11, "expired")],
)
def test_service_valid_until(now: float, expected: str | None) -> None:
    token = make(["services=podcast:0", f"podcast_valid_until={NOW + 10}"])
    if expected is None:
        assert check(token, now=now).valid_until == NOW + 10
    else:
        assert reason(token, now=now) == expected
        assert not TokenError(expected, "").invalid


@pytest.mark.parametrize(
    ("now", "expected"),
    [(NOW + 9.999, None), (NOW + 10, "expired"), (NOW + 11, "expired")],
)
def test_lsat_js_expiration_in_milliseconds(now: float, expected: str | None) -> None:
    token = make(["services=podcast:0", f"expiration={(NOW + 10) * 1000}"])
    if expected is None:
        assert check(token, now=now).valid_until == NOW + 10
    else:
        assert reason(token, now=now) == expected


def test_tightest_expiry_is_reported() -> None:
    token = make(
        [
            "services=podcast:0",
            f"podcast_valid_until={NOW + 100}",
            f"expiration={NOW * 1000 + 5500}",
        ]
    )
    assert check(token).valid_until == NOW + 5.5
    assert reason(token, now=NOW + 6) == "expired"


def test_attenuation_earlier_valid_until_is_honoured() -> None:
    token = attenuate(make(), f"podcast_valid_until={NOW + 10}")
    assert check(token).valid_until == NOW + 10
    assert reason(token, now=NOW + 20) == "expired"


def test_attenuation_later_valid_until_does_not_widen() -> None:
    token = attenuate(make(), f"podcast_valid_until={NOW + 10 * 3600}")
    assert check(token).valid_until == NOW + 3600
    assert reason(token, now=NOW + 2 * 3600) == "expired"


def test_attenuation_later_expiration_does_not_widen() -> None:
    token = attenuate(
        make(["services=podcast:0", f"expiration={(NOW + 10) * 1000}"]),
        f"expiration={(NOW + 1000) * 1000}",
    )
    assert reason(token, now=NOW + 20) == "expired"


def test_other_services_valid_until_is_ignored() -> None:
    token = make(["services=podcast:0,news:0", f"news_valid_until={NOW - 1}"])
    assert check(token).valid_until is None
    assert reason(token, service="news") == "expired"


@pytest.mark.parametrize("value", ["", "soon", "-5", "1e9", "17.5", "1_000", "١٢٣", " 1 2"])
def test_expiry_that_is_not_a_whole_number(value: str) -> None:
    assert reason(make(["services=podcast:0", f"podcast_valid_until={value}"])) == "malformed"
    assert reason(make(["services=podcast:0", f"expiration={value}"])) == "malformed"


# --- verify: services ------------------------------------------------------------------------


def test_other_service() -> None:
    err = reason(make(), service="news")
    assert err == "wrong_service"
    assert not TokenError(err, "").invalid


def test_missing_services_caveat() -> None:
    assert reason(make([f"podcast_valid_until={NOW + 10}"])) == "wrong_service"
    assert reason(make([])) == "wrong_service"


def test_attenuation_services_narrowed() -> None:
    token = attenuate(make(["services=podcast:0,news:0"]), "services=news:0")
    assert reason(token) == "wrong_service"
    assert check(token, service="news").services == (("news", 0),)


def test_attenuation_services_widening_is_ignored() -> None:
    token = attenuate(make(["services=podcast:0"]), "services=podcast:0,news:0")
    assert reason(token, service="news") == "wrong_service"
    assert check(token).services == (("podcast", 0),)


def test_service_names_match_exactly() -> None:
    token = make(["services=podcasts:0,Podcast:0"])
    assert reason(token) == "wrong_service"


@pytest.mark.parametrize(
    "value", ["", "podcast", "podcast:", "podcast:x", "podcast:-1", ":0", "podcast:0,", "a:1:2"]
)
def test_malformed_services(value: str) -> None:
    assert reason(make([f"services={value}"])) == "malformed"


# --- verify: capabilities --------------------------------------------------------------------


def test_capabilities() -> None:
    token = make()
    assert check(token, capability="download").capabilities == {"listen", "download"}
    err = reason(token, capability="upload")
    assert err == "missing_capability"
    assert not TokenError(err, "").invalid


def test_empty_capabilities_grant_nothing() -> None:
    token = make(["services=podcast:0", "podcast_capabilities="])
    assert check(token).capabilities == frozenset()
    assert reason(token, capability="listen") == "missing_capability"


def test_attenuation_capabilities_narrowed() -> None:
    token = attenuate(make(), "podcast_capabilities=listen")
    assert check(token, capability="listen").capabilities == {"listen"}
    assert reason(token, capability="download") == "missing_capability"


def test_attenuation_capabilities_widening_is_ignored() -> None:
    token = attenuate(
        make(["services=podcast:0", "podcast_capabilities=listen"]),
        "podcast_capabilities=listen,download",
    )
    assert check(token).capabilities == {"listen"}
    assert reason(token, capability="download") == "missing_capability"


def test_other_services_capabilities_are_ignored() -> None:
    token = make(["services=podcast:0", "news_capabilities="])
    assert check(token, capability="listen").capabilities is None


# --- verify: unknown caveats -----------------------------------------------------------------


@pytest.mark.parametrize(
    "caveat", ["ip=127.0.0.1", "_valid_until=9999999999", "_capabilities=x", "Services=podcast:0"]
)
def test_unknown_caveat_fails_closed(caveat: str) -> None:
    err = reason(make(["services=podcast:0", caveat]))
    assert err == "unknown_caveat"
    assert TokenError(err, "").invalid


def test_unknown_caveat_appended_by_holder_fails_closed() -> None:
    assert reason(attenuate(make(), "ip=10.0.0.1")) == "unknown_caveat"


def test_caveat_without_equals_is_malformed() -> None:
    mac = decode_macaroon(make(["services=podcast:0"]))
    mac.add_first_party_caveat("just text")
    assert reason(encode(mac)) == "malformed"


# --- interop ---------------------------------------------------------------------------------


def test_urlsafe_unpadded_token_verifies_after_reencoding_standard_padded() -> None:
    mac = Macaroon(location=LOCATION, identifier=IDENT.encode(), key=ROOT_KEY, version=MACAROON_V2)
    for caveat in caveats_for(SERVICE, valid_until=NOW + 60, capabilities=None):
        mac.add_first_party_caveat(caveat)
    urlsafe = mac.serialize()  # pymacaroons' own form: URL-safe, unpadded
    assert "=" not in urlsafe
    standard = b64encode_std(b64decode_any(urlsafe))
    assert check(urlsafe).valid_until == NOW + 60
    assert check(standard).valid_until == NOW + 60
    assert standard == mint(
        ROOT_KEY, IDENT, caveats_for(SERVICE, valid_until=NOW + 60, capabilities=None)
    )


def test_standard_padded_token_verifies_in_every_other_flavour() -> None:
    token = make()
    urlsafe = token.replace("+", "-").replace("/", "_")
    for flavour in (token, token.rstrip("="), urlsafe, urlsafe.rstrip("=")):
        assert check(flavour).identifier == IDENT
    # ... and pymacaroons itself reads ours.
    assert Macaroon.deserialize(token.rstrip("=")).signature == decode_macaroon(token).signature


def test_aperture_minted_macaroon_decodes() -> None:
    mac = decode_macaroon(APERTURE_MACAROON)
    assert mac.location == "lsat"
    assert [c.caveat_id_bytes for c in mac.caveats] == [b"services=meme:0", b"meme_capabilities="]
    ident = Identifier.decode(mac.identifier_bytes)
    assert ident.payment_hash.hex().startswith("30a47a6e")
    # We hold neither its root key nor its preimage: a random preimage must not pass.
    assert reason(APERTURE_MACAROON, preimage=bytes(32), service="meme") == "preimage_mismatch"


def test_lsat_js_minted_macaroon_decodes_but_its_text_identifier_is_not_aperture_layout() -> None:
    mac = decode_macaroon(LSAT_JS_MACAROON)
    assert mac.location == "location"
    assert mac.identifier_bytes.startswith(b"00007cef93f2")
    assert [c.caveat_id_bytes for c in mac.caveats] == [b"expiration=1644194263693"]
    assert reason(LSAT_JS_MACAROON) == "unknown_version"


def test_attenuate_narrows_a_token_without_the_root_key() -> None:
    narrowed = attenuate_token(
        make(), ["podcast_capabilities=listen", f"podcast_valid_until={NOW + 60}"]
    )
    token = check(narrowed, capability="listen")
    assert token.capabilities == frozenset({"listen"})  # type: ignore[attr-defined]
    assert token.valid_until == NOW + 60  # type: ignore[attr-defined]
    assert reason(narrowed, capability="download") == "missing_capability"
    assert reason(narrowed, now=NOW + 61) == "expired"
    assert b64decode_any(narrowed)  # standard base64, readable by every client


def test_attenuate_refuses_text_that_is_no_caveat() -> None:
    with pytest.raises(TokenError):
        attenuate_token(make(), ["no equals sign"])
