"""The Nostr primitives NWC stands on (lightning/nostr.py): NIP-44 v2 against the official test
vectors, NIP-04 against a payload another implementation wrote, NIP-01 event ids and BIP-340
signatures cross-checked with an independent implementation (aionostr, which the nostr-relay
test dependency brings, serializing with rapidjson)."""

import base64
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from l402proxy.lightning.nostr import (
    NIP44_MAX_PLAINTEXT,
    NIP44_SPEC_MAX_PLAINTEXT,
    Event,
    NostrError,
    calc_padded_len,
    check_public_key,
    conversation_key,
    event_id,
    max_payload_chars,
    message_keys,
    nip04_decrypt,
    nip04_encrypt,
    nip44_decrypt,
    nip44_encrypt,
    private_key,
    public_key_hex,
    sign_event,
    verify_event,
)

VECTORS_FILE = Path(__file__).parent.parent / "fixtures" / "nip44.vectors.json"
# The checksum NIP-44 publishes for its vectors file (nostr-protocol/nips 44.md), so the copy
# here is the official one (github.com/paulmillr/nip44, nip44.vectors.json).
VECTORS_SHA256 = "269ed0f69e4c192512cc779e78c555090cebc7c785b609e338a62afc3ce25040"


def vectors() -> dict[str, Any]:
    data = VECTORS_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == VECTORS_SHA256
    return json.loads(data)["v2"]  # type: ignore[no-any-return]


V2 = vectors()


def key(hex_secret: str) -> Any:
    return private_key(bytes.fromhex(hex_secret))


# -- NIP-44 v2: valid vectors -----------------------------------------------------------------


@pytest.mark.parametrize("case", V2["valid"]["get_conversation_key"])
def test_conversation_key(case: dict[str, str]) -> None:
    got = conversation_key(key(case["sec1"]), case["pub2"])
    assert got.hex() == case["conversation_key"], case.get("note")


def test_message_keys() -> None:
    cases = V2["valid"]["get_message_keys"]
    conv = bytes.fromhex(cases["conversation_key"])
    for case in cases["keys"]:
        chacha_key, chacha_nonce, hmac_key = message_keys(conv, bytes.fromhex(case["nonce"]))
        assert chacha_key.hex() == case["chacha_key"]
        assert chacha_nonce.hex() == case["chacha_nonce"]
        assert hmac_key.hex() == case["hmac_key"]


@pytest.mark.parametrize(("unpadded", "padded"), V2["valid"]["calc_padded_len"])
def test_calc_padded_len(unpadded: int, padded: int) -> None:
    assert calc_padded_len(unpadded) == padded


@pytest.mark.parametrize("case", V2["valid"]["encrypt_decrypt"])
def test_encrypt_decrypt(case: dict[str, str]) -> None:
    sec1, sec2 = key(case["sec1"]), key(case["sec2"])
    conv = conversation_key(sec1, public_key_hex(sec2))
    assert conv.hex() == case["conversation_key"]
    payload = nip44_encrypt(case["plaintext"], conv, bytes.fromhex(case["nonce"]))
    assert payload == case["payload"]
    # The other side derives the same key and reads it back.
    back = conversation_key(sec2, public_key_hex(sec1))
    assert back == conv
    assert nip44_decrypt(payload, back) == case["plaintext"]


@pytest.mark.parametrize("case", V2["valid"]["encrypt_decrypt_long_msg"])
def test_encrypt_decrypt_long_messages(case: dict[str, Any]) -> None:
    plaintext = case["pattern"] * case["repeat"]
    assert hashlib.sha256(plaintext.encode()).hexdigest() == case["plaintext_sha256"]
    conv = bytes.fromhex(case["conversation_key"])
    payload = nip44_encrypt(plaintext, conv, bytes.fromhex(case["nonce"]))
    assert hashlib.sha256(payload.encode()).hexdigest() == case["payload_sha256"]
    assert nip44_decrypt(payload, conv) == plaintext


# The spec's own table for the 6-byte length prefix (2026: plaintexts of 65536 bytes and more).
EXTENDED = [
    (65535, "6e1bebca6a8229364a162a72ef064826c4cd7457bf54f190ef782bd9deff3e42",
     "6d8c2810d1e870fbaa1f0a0937126cca837a15f9260e27060c331d70a3c0bc84"),
    (65536, "bf718b6f653bebc184e1479f1935b8da974d701b893afcf49e701f3e2f9f9c5a",
     "b7b4edb36ba92e267d322d56d9aebc22e7fa96ff52e3c12adc07f07a43cbc616"),
    (65537, "008ffc88d3c96a9f307524eb361e47c5222a887fc45fa0c1fb8d429c5c23b430",
     "eeb7c7c5373894ea2c1547cfd3ccb15d5a0b2d619da852e5c79df792dcc9e435"),
]  # fmt: skip


@pytest.mark.parametrize(("length", "plaintext_sha256", "payload_sha256"), EXTENDED)
def test_extended_length_prefix_from_the_spec(
    length: int, plaintext_sha256: str, payload_sha256: str
) -> None:
    conv = bytes.fromhex("c41c775356fd92eadc63ff5a0dc1da211b268cbea22316767095b2871ea1412d")
    nonce = bytes.fromhex("00" * 31 + "01")
    plaintext = "a" * length
    assert hashlib.sha256(plaintext.encode()).hexdigest() == plaintext_sha256
    payload = nip44_encrypt(plaintext, conv, nonce, max_plaintext=NIP44_SPEC_MAX_PLAINTEXT)
    assert hashlib.sha256(payload.encode()).hexdigest() == payload_sha256
    assert nip44_decrypt(payload, conv, max_plaintext=NIP44_SPEC_MAX_PLAINTEXT) == plaintext
    if length > NIP44_MAX_PLAINTEXT:
        # Our own limit (what every v2 implementation reads) refuses it before decoding.
        with pytest.raises(NostrError, match="invalid payload size"):
            nip44_decrypt(payload, conv)


def test_a_fresh_nonce_every_time() -> None:
    conv = bytes(range(32))
    one, two = nip44_encrypt("same", conv), nip44_encrypt("same", conv)
    assert one != two
    assert nip44_decrypt(one, conv) == nip44_decrypt(two, conv) == "same"


# -- NIP-44 v2: invalid vectors ---------------------------------------------------------------


@pytest.mark.parametrize("length", V2["invalid"]["encrypt_msg_lengths"])
def test_encrypt_refuses_message_lengths(length: int) -> None:
    # Built lazily for the 10 MB case: the length check comes before anything else.
    with pytest.raises(NostrError, match="plaintext must be"):
        nip44_encrypt("a" * length, bytes(32))


@pytest.mark.parametrize("case", V2["invalid"]["get_conversation_key"])
def test_conversation_key_refuses_bad_keys(case: dict[str, str]) -> None:
    with pytest.raises(NostrError):
        conversation_key(key(case["sec1"]), case["pub2"])


@pytest.mark.parametrize("case", V2["invalid"]["decrypt"], ids=lambda c: c["note"])
def test_decrypt_refuses(case: dict[str, str]) -> None:
    with pytest.raises(NostrError):
        nip44_decrypt(case["payload"], bytes.fromhex(case["conversation_key"]))


def test_oversized_payloads_are_refused_before_decoding() -> None:
    with pytest.raises(NostrError, match="invalid payload size"):
        nip44_decrypt("A" * (max_payload_chars() + 4), bytes(32))
    with pytest.raises(NostrError, match="unknown encryption version"):
        nip44_decrypt("", bytes(32))


# -- NIP-04 -----------------------------------------------------------------------------------

# A NIP-47 pay_invoice request another implementation encrypted (kumulynja/dartstr,
# packages/nip04/example/nip04_example.dart): a NIP-04 that hashed the ECDH point, as
# libsecp256k1 does by default, could not read it.
DART_SECRET = "9bdc0737ecc9b7871b21537cc707c972389c829028f9fa8e6c95b331768ee4ac"
DART_PEER = "7a29579ddcb698db1b93f7078c5020dc932de36cba53fedd6a0746005db7fd7f"
DART_PAYLOAD = (
    "zdiUBdrfA+HNM4qF67oKN2HcUv4kxnlRkpjHP5mqd9UrFuoSbwGAXQeTBUUrYO1svYBvhnpBK4s5XNVvXmvQ4yuji+"
    "v7KOwrDYjQzFveXLXXlyoFPakp5CD2BUdGkNn3pVzodWD84dgmfuuUDNYNfmm8EyjVyGBE1TmiBHawOI0MkhZ+uHf4"
    "VGhO6EIvhunLYQITe4YQvTRHiNlO4hoHh9kOjQLxYEY9AEkZ2EEPcfYpSkuYqUnvwUii7qzPJWU8o7PI86k4R3Iry"
    "Ef7hnN1DvZgZxRiWrwJwXP7P9PTiaorzjsEZWrKsus+65vU2e1F6L0jOPX0f5+/lZkSwF7Qgq4YZc/OlyJSqMDrz0S"
    "oMw0NbugGYOU/DxO4pP75o0NPIeG6lyr4jA4VsXMyA2NiNfFQRlGbRuk/qF8nmG4we70=?iv=yIIcMRiYu41Qlztn0"
    "asP3g=="
)


def test_nip04_reads_another_implementations_payload() -> None:
    request = json.loads(nip04_decrypt(DART_PAYLOAD, key(DART_SECRET), DART_PEER))
    assert request["method"] == "pay_invoice"
    assert request["params"]["invoice"].startswith("lntbs210n1")


def test_nip04_round_trip_and_refusals() -> None:
    alice, bob = key("01" * 32), key("02" * 32)
    payload = nip04_encrypt('{"method":"get_info","params":{}} ✓', alice, public_key_hex(bob))
    body, iv = payload.split("?iv=")
    assert len(base64.b64decode(iv)) == 16 and len(base64.b64decode(body)) % 16 == 0
    assert nip04_decrypt(payload, bob, public_key_hex(alice)).endswith("} ✓")
    carol = key("03" * 32)
    for bad in (
        payload.replace("?iv=", "&iv="),
        body + "?iv=AAAA",
        "!!!" + payload,
        "",
    ):
        with pytest.raises(NostrError):
            nip04_decrypt(bad, bob, public_key_hex(alice))
    # The wrong key: PKCS7 padding (or UTF-8) gives it away nearly always; never a plaintext
    # that is mistaken for the message.
    try:
        wrong = nip04_decrypt(payload, carol, public_key_hex(alice))
    except NostrError:
        wrong = None
    assert wrong is None or "get_info" not in wrong


# -- NIP-01 events ----------------------------------------------------------------------------

TRICKY = [
    "",
    "hello",
    'quote " backslash \\ slash / ',
    "line\nbreak\rreturn\ttab\bback\ffeed",
    "del \x7f",
    "émoji 🦄 and \u2028 line separator",
    "{}[]:,",
]


@pytest.mark.parametrize("content", TRICKY)
def test_event_ids_agree_with_an_independent_implementation(content: str) -> None:
    aionostr_event = pytest.importorskip("aionostr.event")
    pubkey = public_key_hex(key("11" * 32))
    tags = [["p", "ab" * 32], ["expiration", "1700000000"], ["x", content, ""]]
    mine = event_id(pubkey, 1_700_000_000, 23194, tags, content)
    theirs = aionostr_event.Event.compute_id(pubkey, 1_700_000_000, 23194, tags, content)
    assert mine == theirs


def test_other_control_characters_are_escaped_as_json_stringify_does() -> None:
    """NIP-01 names the escapes of \\n \\" \\\\ \\r \\t \\b \\f; JSON cannot hold the other control
    characters raw, and JSON.stringify (nostr-tools) and serde_json (rust-nostr) write them as
    lowercase \\u00xx. (rapidjson writes uppercase hex: aionostr disagrees on these alone.)"""
    pubkey = "ab" * 32
    # Written out by hand: the bytes JSON.stringify([0, pubkey, 1, 1, [], "\0\x1f"]) gives.
    serialized = '[0,"' + pubkey + '",1,1,[],"\\u0000\\u001f"]'
    assert event_id(pubkey, 1, 1, [], "\x00\x1f") == hashlib.sha256(serialized.encode()).hexdigest()


def test_signed_events_verify_here_and_in_an_independent_implementation() -> None:
    aionostr_event = pytest.importorskip("aionostr.event")
    signer = key("22" * 32)
    event = sign_event(signer, 23194, [["p", "cd" * 32]], "content ✓", 1_700_000_000)
    assert event.pubkey == public_key_hex(signer) and len(event.sig) == 128
    assert verify_event(event)
    theirs = aionostr_event.Event(**event.to_json())
    assert theirs.verify()
    # BIP-340 with fresh auxiliary randomness: two signatures of one event differ, both valid.
    again = sign_event(signer, 23194, [["p", "cd" * 32]], "content ✓", 1_700_000_000)
    assert again.id == event.id and again.sig != event.sig and verify_event(again)


def test_verify_refuses_what_was_changed() -> None:
    event = sign_event(key("33" * 32), 1, [], "original", 1_700_000_000)
    other = public_key_hex(key("44" * 32))
    flipped = event.sig[:-2] + ("00" if event.sig[-2:] != "00" else "01")
    changed = [
        replace(event, content="changed"),
        replace(event, created_at=event.created_at + 1),
        replace(event, pubkey=other),
        replace(event, sig=flipped),
    ]
    assert [verify_event(e) for e in changed] == [False] * len(changed)


def test_the_nip47_example_info_event_signs_an_id_its_content_no_longer_has() -> None:
    """NIP-47's appendix shows an info event whose signature is valid for its id, but whose
    tags were edited afterwards: the id is not the hash of what it says, so it is refused."""
    from coincurve import PublicKeyXOnly

    example = {
        "id": "df467db0a9f9ec77ffe6f561811714ccaa2e26051c20f58f33c3d66d6c2b4d1c",
        "pubkey": "c04ccd5c82fc1ea3499b9c6a5c0a7ab627fbe00a0116110d4c750faeaecba1e2",
        "created_at": 1713883677,
        "kind": 13194,
        "tags": [
            ["encryption", "nip44_v2 nip04"],
            ["notifications", "payment_received payment_sent"],
        ],
        "content": "pay_invoice pay_keysend get_balance get_info make_invoice lookup_invoice "
        "list_transactions multi_pay_invoice multi_pay_keysend sign_message notifications",
        "sig": "31f57b369459b5306a5353aa9e03be7fbde169bc881c3233625605dd12f53548179def16b9fe113"
        "7e6465d7e4d5bb27ce81fd6e75908c46b06269f4233c845d8",
    }  # fmt: skip
    event = Event.from_json(example)
    assert PublicKeyXOnly(bytes.fromhex(event.pubkey)).verify(
        bytes.fromhex(event.sig), bytes.fromhex(event.id)
    )
    assert not verify_event(event)
    assert event.tag("encryption") == "nip44_v2 nip04"


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"id": "x"},
        {"id": "AB" * 32, "pubkey": "ab" * 32, "created_at": 1, "kind": 1, "tags": [],
         "content": "", "sig": "ab" * 64},
        {"id": "ab" * 32, "pubkey": "ab" * 32, "created_at": True, "kind": 1, "tags": [],
         "content": "", "sig": "ab" * 64},
        {"id": "ab" * 32, "pubkey": "ab" * 32, "created_at": 1, "kind": 70000, "tags": [],
         "content": "", "sig": "ab" * 64},
        {"id": "ab" * 32, "pubkey": "ab" * 32, "created_at": 1, "kind": 1, "tags": [["p", 1]],
         "content": "", "sig": "ab" * 64},
        {"id": "ab" * 32, "pubkey": "ab" * 32, "created_at": 1, "kind": 1, "tags": [],
         "content": None, "sig": "ab" * 64},
    ],
)  # fmt: skip
def test_event_shapes_a_relay_may_send_are_checked(value: object) -> None:
    with pytest.raises(NostrError):
        Event.from_json(value)


def test_a_lone_surrogate_makes_no_event_id() -> None:
    with pytest.raises(NostrError, match="not valid Unicode"):
        event_id("ab" * 32, 1, 1, [], "\ud800")
    event = Event("ab" * 32, "ab" * 32, 1, 1, (), "\ud800", "ab" * 64)
    assert not verify_event(event)


def test_keys() -> None:
    for bad in (b"", bytes(32), b"\xff" * 32, "11" * 32):
        with pytest.raises(NostrError):
            private_key(bad)  # type: ignore[arg-type]
    assert check_public_key(public_key_hex(key("55" * 32))) == public_key_hex(key("55" * 32))
    for bad_pub in ("AB" * 32, "ab" * 31, "ff" * 32, "00" * 32):
        with pytest.raises(NostrError):
            check_public_key(bad_pub)
