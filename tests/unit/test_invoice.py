import dataclasses
import hashlib

import bolt11
import pytest
from bolt11 import Bolt11, MilliSatoshi, Tags
from coincurve import PrivateKey

from l402proxy.l402.invoice import InvoiceInfo, decode_invoice

# Test vectors from BOLT 11 ("Examples"), all signed with the same key.
SPEC_PAYEE = "03e7156ae33b0a208d0744199163177e909e80176e55d97a2f221ede0f934dd9ad"
SPEC_HASH = bytes.fromhex("0001020304050607080900010203040506070809000102030405060708090102")
SPEC_DATE = 1496314658
DONATION = (  # no amount
    "lnbc1pvjluezsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygspp5qqqsyqcyq5rqwzqfqqqsyqcyq5"
    "rqwzqfqqqsyqcyq5rqwzqfqypqdpl2pkx2ctnv5sxxmmwwd5kgetjypeh2ursdae8g6twvus8g6rfwvs8qun0dfjkxaq9qr"
    "sgq357wnc5r2ueh7ck6q93dj32dlqnls087fxdwk8qakdyafkq3yap9us6v52vjjsrvywa6rt52cm9r9zqt8r2t7mlcwspy"
    "etp5h2tztugp9lfyql"
)
COFFEE = (  # 2500u, one minute
    "lnbc2500u1pvjluezsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygspp5qqqsyqcyq5rqwzqfqqqsy"
    "qcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7enxv4jsxqzpu9qrsgquk0rl77nj30yxdy8j9vdx85fkpmdla2"
    "087ne0xh8nhedh8w27kyke0lp53ut353s06fv3qfegext0eh0ymjpf39tuven09sam30g4vgpfna3rh"
)
NONSENSE = (  # UTF-8 description
    "lnbc2500u1pvjluezsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygspp5qqqsyqcyq5rqwzqfqqqsy"
    "qcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdpquwpc4curk03c9wlrswe78q4eyqc7d8d0xqzpu9qrsgqhtjpauu9ur7fw2thcl4"
    "y9vfvh4m9wlfyz2gem29g5ghe2aak2pm3ps8fdhtceqsaagty2vph7utlgj48u0ged6a337aewvraedendscp573dxr"
)
TESTNET = (  # 20m on testnet, hashed description, fallback address
    "lntb20m1pvjluezsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygshp58yjmdan79s6qqdhdzgynm4z"
    "wqd5d7xmw5fk98klysy043l2ahrqspp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqfpp3x9et2e2"
    "0v6pu37c5d9vax37wxq72un989qrsgqdj545axuxtnfemtpwkc45hx9d2ft7x04mt8q7y6t0k2dge9e7h8kpy9p34ytyslj"
    "3yu569aalz2xdk8xkd7ltxqld94u8h2esmsmacgpghe9k8"
)
PICO = (  # 9678785340p = 967878534 msat, one week, route hint
    "lnbc9678785340p1pwmna7lpp5gc3xfm08u9qy06djf8dfflhugl6p7lgza6dsjxq454gxhj9t7a0sd8dgfkx7cmtwd68yet"
    "pd5s9xar0wfjn5gpc8qhrsdfq24f5ggrxdaezqsnvda3kkum5wfjkzmfqf3jkgem9wgsyuctwdus9xgrcyqcjcgpzgfskx6e"
    "qf9hzqnteypzxz7fzypfhg6trddjhygrcyqezcgpzfysywmm5ypxxjemgw3hxjmn8yptk7untd9hxwg3q2d6xjcmtv4ezq7p"
    "qxgsxzmnyyqcjqmt0wfjjq6t5v4khxsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygsxqyjw5qcqp"
    "2rzjq0gxwkzc8w6323m55m4jyxcjwmy7stt9hwkwe2qxmy8zpsgg7jcuwz87fcqqeuqqqyqqqqlgqqqqn3qq9q9qrsgqrvgk"
    "pnmps664wgkp43l22qsgdw4ve24aca4nymnxddlnp8vh9v2sdxlu5ywdxefsfvm0fq3sesf08uf6q9a2ke0hc9j6z6wlxg5z5"
    "kqpu2v9wz"
)
UPPER = (  # 25m, all upper case
    "LNBC25M1PVJLUEZPP5QQQSYQCYQ5RQWZQFQQQSYQCYQ5RQWZQFQQQSYQCYQ5RQWZQFQYPQDQ5VDHKVEN9V5SXYETPDEESSP5"
    "ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYG3ZYGS9Q5SQQQQQQQQQQQQQQQQSGQ2A25DXL5HRNTDTN6ZVYDT7"
    "D66HYZSYHQS4WDYNAVYS42XGL6SGX9C4G7ME86A27T07MDTFRY458RTJR0V92CNMSWPSJSCGT2VCSE3SGPZ3UAPA"
)

# "Examples of Invalid Invoices" from BOLT 11.
BAD_CHECKSUM = (
    "lnbc2500u1pvjluezpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdpquwpc4curk03c9wlrswe78"
    "q4eyqc7d8d0xqzpuyk0sg5g70me25alkluzd2x62aysf2pyy8edtjeevuv4p2d5p76r4zkmneet7uvyakky2zr4cusd45tftc"
    "9c5fh0nnqpnl2jfll544esqchsrnt"
)
NO_SEPARATOR = (
    "pvjluezpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdpquwpc4curk03c9wlrswe78q4eyqc7d8d"
    "0xqzpuyk0sg5g70me25alkluzd2x62aysf2pyy8edtjeevuv4p2d5p76r4zkmneet7uvyakky2zr4cusd45tftc9c5fh0nnq"
    "pnl2jfll544esqchsrny"
)
NOT_RECOVERABLE = (
    "lnbc2500u1pvjluezpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7enxv4jsx"
    "qzpusp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygs9qrsgqwgt7mcn5yqw3yx0w94pswkpq6j9uh6x"
    "fqqqtsk4tnarugeektd4hg5975x9am52rz4qskukxdmjemg92vvqz8nvmsye63r5ykel43pgz7zq0g2"
)
TOO_SHORT = (
    "lnbc1pvjluezpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdpl2pkx2ctnv5sxxmmwwd5kgetjyp"
    "eh2ursdae8g6na6hlh"
)
BAD_MULTIPLIER = (
    "lnbc2500x1pvjluezpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7enxv4jsx"
    "qzpusp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygs9qrsgqrrzc4cvfue4zp3hggxp47ag7xnrlr8v"
    "gcmkjxk3j5jqethnumgkpqp23z9jclu3v0a7e0aruz366e9wqdykw6dxhdzcjjhldxq0w6wgqcnu43j"
)
SUB_MSAT = (
    "lnbc2500000001p1pvjluezpp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7en"
    "xv4jsxqzpusp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygs9qrsgq0lzc236j96a95uv0m3umg28gcl"
    "m5lqxtqqwk32uuk4k6673k6n5kfvx3d2h8s295fad45fdhmusm8sjudfhlf6dcsxmfvkeywmjdkxcp99202x"
)

NODE_KEY = PrivateKey(b"\x01" * 32)
PREIMAGE = b"\x07" * 32


def make_invoice(
    currency: str, amount_msat: int | None, *, expiry: int = 600, date: int = 1_700_000_000
) -> str:
    """A real, signed invoice from our own key (how the dev ledger makes them)."""
    invoice = Bolt11(
        currency=currency,
        date=date,
        amount_msat=MilliSatoshi(amount_msat) if amount_msat is not None else None,
        tags=Tags.from_dict(
            {
                "payment_hash": hashlib.sha256(PREIMAGE).hexdigest(),
                "payment_secret": "11" * 32,
                "description": "episode 42",
                "expire_time": expiry,
            }
        ),
    )
    return bolt11.encode(invoice, NODE_KEY.to_hex())


def test_spec_donation_without_amount() -> None:
    info = decode_invoice(DONATION)
    assert info == InvoiceInfo(
        payment_hash=SPEC_HASH,
        amount_msat=None,
        network="mainnet",
        created_at=SPEC_DATE,
        expiry=3600,  # the default when no x field
        description="Please consider supporting this project",
        payee=SPEC_PAYEE,
    )


def test_spec_coffee_with_amount_and_expiry() -> None:
    info = decode_invoice(COFFEE)
    assert info.amount_msat == 250_000_000  # 2500 µBTC
    assert info.expiry == 60
    assert info.expires_at == SPEC_DATE + 60
    assert info.description == "1 cup coffee"
    assert info.payment_hash == SPEC_HASH
    assert info.payee == SPEC_PAYEE


def test_spec_utf8_description() -> None:
    assert decode_invoice(NONSENSE).description == "ナンセンス 1杯"


def test_spec_testnet_with_hashed_description() -> None:
    info = decode_invoice(TESTNET)
    assert info.network == "testnet"
    assert info.amount_msat == 2_000_000_000
    assert info.description is None


def test_spec_pico_amount() -> None:
    info = decode_invoice(PICO)
    assert info.amount_msat == 967_878_534
    assert info.expiry == 604_800
    assert info.payment_hash.hex() == (
        "462264ede7e14047e9b249da94fefc47f41f7d02ee9b091815a5506bc8abf75f"
    )


def test_spec_upper_case() -> None:
    info = decode_invoice(UPPER)
    assert info.amount_msat == 2_500_000_000
    assert info.description == "coffee beans"


@pytest.mark.parametrize(
    "text", [f"lightning:{COFFEE}", f"LIGHTNING:{COFFEE}", f"  {COFFEE}\n", f" lightning:{COFFEE} "]
)
def test_uri_prefix_and_whitespace(text: str) -> None:
    assert decode_invoice(text) == decode_invoice(COFFEE)


@pytest.mark.parametrize(
    "text",
    [
        BAD_CHECKSUM,
        NO_SEPARATOR,
        NOT_RECOVERABLE,
        TOO_SHORT,
        BAD_MULTIPLIER,
        COFFEE[:-1],
        COFFEE[:-1] + ("q" if COFFEE[-1] != "q" else "p"),
        "",
        "   ",
        "lightning:",
        "hello",
        "lnbc",
        "lnbc1",
        "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
        "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0v9cxj0m385ekvcenxc6r2c35xvukxefcv5mkvv34x5ekzd3ev56nyd3h",
        "💸",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid BOLT11 invoice: "):
        decode_invoice(text)


@pytest.mark.xfail(
    strict=True,
    reason="bolt11 truncates sub-millisatoshi amounts; BOLT 11 says a reader MUST fail",
)
def test_spec_sub_millisatoshi_precision_is_rejected() -> None:
    with pytest.raises(ValueError):
        decode_invoice(SUB_MSAT)


@pytest.mark.parametrize(
    ("currency", "amount_msat", "prefix", "network"),
    [
        ("bcrt", 21_000, "lnbcrt210n1", "regtest"),
        ("bcrt", 1, "lnbcrt10p1", "regtest"),
        ("bcrt", None, "lnbcrt1", "regtest"),
        ("tbs", 1_000_000, "lntbs10u1", "signet"),
        ("tb", 5_000, "lntb50n1", "testnet"),
        ("bc", 100_000_000_000, "lnbc11", "mainnet"),  # whole BTC: no multiplier
        ("bc", 200_000_000_000, "lnbc21", "mainnet"),
    ],
)
def test_generated_invoices(
    currency: str, amount_msat: int | None, prefix: str, network: str
) -> None:
    text = make_invoice(currency, amount_msat)
    assert text.startswith(prefix)
    info = decode_invoice(text)
    assert info.network == network
    assert info.amount_msat == amount_msat
    assert info.payment_hash == hashlib.sha256(PREIMAGE).digest()
    assert info.payee == NODE_KEY.public_key.format().hex()
    assert info.description == "episode 42"


def test_expiry() -> None:
    info = decode_invoice(make_invoice("bcrt", 21_000, expiry=90, date=1_700_000_000))
    assert (info.created_at, info.expiry, info.expires_at) == (1_700_000_000, 90, 1_700_000_090)
    assert not info.is_expired(1_700_000_089.9)
    assert info.is_expired(1_700_000_090)
    assert info.is_expired(1_800_000_000)


def test_invoice_info_is_frozen() -> None:
    info = decode_invoice(COFFEE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.amount_msat = 1  # type: ignore[misc]
