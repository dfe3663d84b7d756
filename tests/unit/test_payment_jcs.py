"""RFC 8785 (JCS) as the Payment scheme needs it, and the strict JSON reader.

Vectors: RFC 8785 sections 3.2.2-3.2.4 and Appendix B; the RFC authors' test data
(cyberphone/json-canonicalization testdata/input + testdata/output); Aperture's cross-implementation
vectors (lightninglabs/aperture mpp/testdata/vectors.json, "canonicalization", commit 7ee3ed7).
Number strings were also checked against node's JSON.stringify (ECMAScript is the reference).
"""

import random
import struct

import pytest

from l402proxy.l402.jcs import JsonError, canonical_json, canonicalize, format_number, loads_strict

# RFC 8785 section 3.2.2 (also the authors' testdata/input/values.json).
RFC_VALUES_IN = (
    '{\n  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],\n'
    '  "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
    '  "literals": [null, true, false]\n}'
)
RFC_VALUES_OUT = (
    '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
    '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
)

# RFC 8785 Appendix B: IEEE-754 bits -> ECMAScript string.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]

# The authors' testdata: input -> output (structures, arrays, french, weird).
AUTHORS = [
    (
        '{"1": {"f": {"f": "hi","F": 5} ,"\\n": 56.0},"10": { },"": "empty","a": { },'
        '"111": [ {"e": "yes","E": "no" } ],"A": { }}',
        '{"":"empty","1":{"\\n":56,"f":{"F":5,"f":"hi"}},"10":{},"111":[{"E":"no","e":"yes"}],'
        '"A":{},"a":{}}',
    ),
    ('[56, {"d": true, "10": null, "1": [ ]}]', '[56,{"1":[],"10":null,"d":true}]'),
    (
        '{"peach": "This sorting order", "péché": "is wrong according to French",'
        ' "pêche": "but canonicalization MUST", "sin": "ignore locale"}',
        '{"peach":"This sorting order","péché":"is wrong according to French",'
        '"pêche":"but canonicalization MUST","sin":"ignore locale"}',
    ),
    (
        '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\u000a": "Newline", "1": "One",'
        ' "\\u0080": "Control\\u007f", "\\ud83d\\ude02": "Smiley",'
        ' "\\u00f6": "Latin Small Letter O With Diaeresis",'
        ' "\\ufb33": "Hebrew Letter Dalet With Dagesh", "</script>": "Browser Challenge"}',
        '{"\\n":"Newline","\\r":"Carriage Return","1":"One","</script>":"Browser Challenge",'
        '"\u0080":"Control\x7f","\u00f6":"Latin Small Letter O With Diaeresis",'
        '"\u20ac":"Euro Sign",'
        '"\U0001f602":"Smiley","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
]

# Aperture's "canonicalization" vectors (input -> canonical).
APERTURE = [
    ('{"z":1,"m":2,"a":3,"A":4,"10":5,"2":6}', '{"10":5,"2":6,"A":4,"a":3,"m":2,"z":1}'),
    (
        '{"\\ue000":1,"\\ud800\\udc00":2,"\\uffff":3,"\\ud7ff":4}',
        '{"\ud7ff":4,"\U00010000":2,"\ue000":1,"\uffff":3}',
    ),
    ('{"description":"Q&A <b> endpoint"}', '{"description":"Q&A <b> endpoint"}'),
    ('{"s":"x\\u2028y\\u2029z"}', '{"s":"x\u2028y\u2029z"}'),
    ('{"s":"\\b\\f\\n\\r\\t"}', '{"s":"\\b\\f\\n\\r\\t"}'),
    ('{"s":"\\u0000\\u0001\\u001f"}', '{"s":"\\u0000\\u0001\\u001f"}'),
    ('{"s":"a/b\\u007f"}', '{"s":"a/b\x7f"}'),
    (
        '{"a":36028797018963968,"b":1234567890123456789,"c":9007199254740991,"d":9007199254740993}',
        '{"a":36028797018963970,"b":1234567890123456800,"c":9007199254740991,"d":9007199254740992}',
    ),
    (
        '{"a":9.223372036854776e18,"b":-9.223372036854776e18,"c":1e21,"d":-1e21,"e":1e100}',
        '{"a":9223372036854776000,"b":-9223372036854776000,"c":1e+21,"d":-1e+21,"e":1e+100}',
    ),
    (
        '{"a":1e-6,"b":1e-7,"c":1e-10,"d":1e20,"e":1e21,"f":5e-324,"g":1.7976931348623157e308}',
        '{"a":0.000001,"b":1e-7,"c":1e-10,"d":100000000000000000000,"e":1e+21,"f":5e-324,'
        '"g":1.7976931348623157e+308}',
    ),
    ('{"a":0,"b":-0,"c":0.0,"d":-0.0}', '{"a":0,"b":0,"c":0,"d":0}'),
    (
        '{"a":1.0,"b":1e0,"c":1.000e3,"d":0.1,"e":-4.35,"f":1.0000000000000002}',
        '{"a":1,"b":1,"c":1000,"d":0.1,"e":-4.35,"f":1.0000000000000002}',
    ),
    (
        '{"amount":"100","currency":"sat","description":"Weather report","methodDetails":'
        '{"invoice":"lnbc1u1p","paymentHash":"bc230847","network":"mainnet"}}',
        '{"amount":"100","currency":"sat","description":"Weather report","methodDetails":'
        '{"invoice":"lnbc1u1p","network":"mainnet","paymentHash":"bc230847"}}',
    ),
    (
        '{"tier":"gold & silver","orderId":36028797018963968,"note":"he said \\"go\\""}',
        '{"note":"he said \\"go\\"","orderId":36028797018963970,"tier":"gold & silver"}',
    ),
]


def test_rfc8785_section_3_2_2_values() -> None:
    assert canonicalize(RFC_VALUES_IN).decode() == RFC_VALUES_OUT


def test_rfc8785_section_3_2_3_members_sort_by_utf16_code_units() -> None:
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = list(loads_strict(canonical_json(value)).values())  # type: ignore[union-attr]
    assert order == [
        "Carriage Return",
        "One",
        "Control",
        "Latin Small Letter O With Diaeresis",
        "Euro Sign",
        "Emoji: Grinning Face",
        "Hebrew Letter Dalet With Dagesh",
    ]


def test_rfc8785_section_3_2_4_utf8_and_no_normalization() -> None:
    expected = bytes.fromhex(
        "7b 22 55 6e 6e 6f 72 6d 61 6c 69 7a 65 64 20 55 6e 69 63 6f 64 65 22 3a 22 41 cc 8a 22 7d"
    )
    assert canonicalize('{\n  "Unnormalized Unicode":"A\\u030a"\n}') == expected


@pytest.mark.parametrize(("bits", "expected"), APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert format_number(value) == expected
    assert canonical_json([value]) == f"[{expected}]".encode()


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_nan_and_infinity_are_refused(bits: str) -> None:
    with pytest.raises(JsonError):
        canonical_json(struct.unpack(">d", bytes.fromhex(bits))[0])


@pytest.mark.parametrize(("text", "expected"), AUTHORS)
def test_authors_testdata(text: str, expected: str) -> None:
    assert canonicalize(text).decode() == expected


@pytest.mark.parametrize(("text", "expected"), APERTURE)
def test_aperture_canonicalization_vectors(text: str, expected: str) -> None:
    assert canonicalize(text).decode() == expected


def test_numbers_round_trip_and_are_never_longer_than_python_shortest() -> None:
    # A bounded, seeded sweep: every string parses back to the same double.
    rng = random.Random(8785)
    for _ in range(3000):
        value = struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0]
        if value != value or value in (float("inf"), float("-inf")):
            continue
        text = format_number(value)
        assert float(text) == value
        assert "e+0" not in text and "e-0" not in text  # no zero-padded exponents


def test_ints_within_2_53_are_exact_and_beyond_are_rounded_like_javascript() -> None:
    assert format_number(2**53) == "9007199254740992"
    assert format_number(-(2**53)) == "-9007199254740992"
    assert format_number(2**53 + 1) == "9007199254740992"  # JSON.parse would give the same
    with pytest.raises(JsonError):
        format_number(10**400)


@pytest.mark.parametrize(
    "value",
    [
        {1: "a"},  # member names are strings
        {"a": object()},
        "lone \ud800 surrogate",
        {"\udc00": 1},
        b"bytes",
        {"a": float("nan")},
    ],
)
def test_values_without_a_canonical_form_are_refused(value: object) -> None:
    with pytest.raises(JsonError):
        canonical_json(value)


def test_booleans_are_literals_not_numbers() -> None:
    assert canonical_json([True, False, None, 1, 0]) == b"[true,false,null,1,0]"
    with pytest.raises(JsonError):
        format_number(True)


def test_nesting_is_bounded_both_ways() -> None:
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(JsonError, match="nested"):
        canonical_json(deep)
    with pytest.raises(JsonError, match="nested"):
        loads_strict("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a":1,"a":2}', "duplicate"),
        ('{"a":{"b":1,"b":1}}', "duplicate"),
        ('{"a":NaN}', "NaN"),
        ('{"a":-Infinity}', "NaN"),
        ('{"a":1e400}', "range"),
        ('{"a":"\\ud800"}', "surrogate"),
        ('{"\\udc00":1}', "surrogate"),
        ('{"a":', "not valid JSON"),
        ('{"a":"\x01"}', "not valid JSON"),  # raw control character inside a string
        ("\ufeff{}", "not valid JSON"),  # a byte order mark
        ("[" + "1" * 5000 + "]", "too long"),
    ],
)
def test_loads_strict_refuses_what_i_json_forbids(text: str, reason: str) -> None:
    with pytest.raises(JsonError, match=reason) as caught:
        loads_strict(text)
    assert "\n" not in str(caught.value)


def test_loads_strict_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(JsonError, match="not UTF-8"):
        loads_strict(b'{"a":"\xff"}')
    assert loads_strict(b'{"a":"\\ud83d\\ude00"}') == {"a": "\U0001f600"}
