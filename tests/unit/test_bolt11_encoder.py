"""Our fast BOLT11 encoder must produce exactly what the bolt11 package produces."""

import hashlib
import os

import bolt11
import pytest
from bolt11 import Bolt11, MilliSatoshi, Tag, TagChar, Tags
from bolt11.models.features import Feature, Features, FeatureState
from coincurve import PrivateKey

from l402proxy.l402.invoice import decode_invoice
from l402proxy.lightning.bolt11_encoder import amount_part, encode_invoice

KEY = PrivateKey(hashlib.sha256(b"test node key").digest())
FEATURES = Features.from_feature_list(
    {Feature.var_onion_optin: FeatureState.required, Feature.payment_secret: FeatureState.required}
)


def reference(amount_msat: int | None, description: str, expiry: int, created_at: int,
              payment_hash: bytes, secret: bytes, currency: str) -> str:  # fmt: skip
    tags = Tags(
        [
            Tag(TagChar.payment_hash, payment_hash.hex()),
            Tag(TagChar.payment_secret, secret.hex()),
            Tag(TagChar.description, description),
            Tag(TagChar.expire_time, expiry),
            Tag(TagChar.min_final_cltv_expiry, 18),
            Tag(TagChar.features, FEATURES),
            Tag(TagChar.payee, KEY.public_key.format().hex()),
        ]
    )
    invoice = Bolt11(
        currency=currency,
        date=created_at,
        tags=tags,
        amount_msat=MilliSatoshi(amount_msat) if amount_msat else None,
    )
    return bolt11.encode(invoice, KEY.secret.hex(), keep_payee=True, strict=True)


@pytest.mark.parametrize(
    ("amount_msat", "description", "expiry", "currency"),
    [
        (21_000, "podcast: Ad-free episode", 600, "bcrt"),
        (1, "one msat", 60, "bcrt"),
        (100_000_000_000, "a whole bitcoin", 3600, "bc"),
        (250_000_000, "1 cup coffee", 60, "tb"),
        (123_456_789, "odd amount ünïcödé ⚡", 86400, "tbs"),
        (None, "no amount", 600, "bcrt"),
        (5_000, "x" * 600, 10**6, "bcrt"),
    ],
)
def test_matches_the_bolt11_package_byte_for_byte(
    amount_msat: int | None, description: str, expiry: int, currency: str
) -> None:
    payment_hash, secret, created_at = os.urandom(32), os.urandom(32), 1_700_000_000
    ours = encode_invoice(
        key=KEY,
        currency=currency,
        amount_msat=amount_msat,
        created_at=created_at,
        payment_hash=payment_hash,
        payment_secret=secret,
        description=description,
        expiry=expiry,
        min_final_cltv_expiry=18,
        payee=KEY.public_key.format(),
    )
    assert ours == reference(
        amount_msat, description, expiry, created_at, payment_hash, secret, currency
    )
    decoded = decode_invoice(ours)  # bolt11.decode checks the signature against the payee
    assert decoded.payment_hash == payment_hash
    assert decoded.amount_msat == amount_msat
    assert decoded.description == description
    assert decoded.expiry == expiry
    assert decoded.payee == KEY.public_key.format().hex()


@pytest.mark.parametrize(
    ("msat", "text"),
    [(21_000, "210n"), (100_000_000_000, "1"), (250_000_000, "2500u"), (1, "10p"),
     (100_000_000, "1m"), (None, ""), (0, "")],
)  # fmt: skip
def test_amount_part_is_the_shortest_form(msat: int | None, text: str) -> None:
    assert amount_part(msat) == text


@pytest.mark.parametrize("size", [0, 1, 5, 32, 33, 64, 65, 600])
def test_bit_regrouping_and_checksum_match_the_bech32_reference(size: int) -> None:
    import bech32

    from l402proxy.lightning import bolt11_encoder as enc

    data = os.urandom(size)
    groups = enc._byte_groups(data)
    assert groups == (bech32.convertbits(data, 8, 5, True) or [])
    assert enc._groups_to_bytes(groups) == bytes(bech32.convertbits(groups, 5, 8, True) or [])
    assert enc.bech32_encode("lnbcrt", groups) == bech32.bech32_encode("lnbcrt", groups)


def test_a_description_hash_replaces_the_description() -> None:
    metadata_hash = hashlib.sha256(b'[["text/plain","Pay merchant"]]').digest()
    text = encode_invoice(
        key=KEY, currency="bcrt", amount_msat=21_000, created_at=1_700_000_000,
        payment_hash=os.urandom(32), payment_secret=os.urandom(32), description="ignored",
        expiry=600, min_final_cltv_expiry=18, payee=KEY.public_key.format(),
        description_hash=metadata_hash,
    )  # fmt: skip
    info = decode_invoice(text)
    assert info.description_hash == metadata_hash
    assert not info.description
    assert bolt11.decode(text).description_hash == metadata_hash.hex()
