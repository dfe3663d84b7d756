"""Which module serves a backend URI, redaction of secrets, and `l402proxy backend check`."""

import base64
import json
from pathlib import Path

import pytest

from l402proxy import cli
from l402proxy.lightning import (
    LightningError,
    cln,
    eclair,
    lnbits,
    lnd,
    lnurl,
    open_backend,
    open_wallet,
)
from l402proxy.lightning.uri import (
    looks_like_secret,
    module_for,
    query_params,
    redact,
    scheme_of,
)
from tests.standins.lnd import bake_macaroon


@pytest.mark.parametrize(
    ("uri", "module"),
    [
        ("dev", "dev"),
        ("dev:fan?delay=1", "dev"),
        ("dev?hold=2", "dev"),
        ("lnd://127.0.0.1:10009?cert=/c&macaroon=/m", "lnd"),
        ("LND://node:10009", "lnd"),
        ("lndconnect://node:10009?cert=MIIB&macaroon=AgED", "lnd"),
        ("cln:///home/u/.lightning/bitcoin/lightning-rpc", "cln"),
        ("/home/u/.lightning/bitcoin/lightning-rpc", "cln"),
        ("eclair://:pw@127.0.0.1:8080", "eclair"),
        ("eclair+https://:pw@node.example:443", "eclair"),
        ("lnbits://legend.lnbits.com?key=abc", "lnbits"),
        ("lnbits+http://127.0.0.1:5000?key=abc", "lnbits"),
        ("lnurl:alice@example.com", "lnurl"),
        ("alice@example.com", "lnurl"),
        ("lnurl:LNURL1DP68GURN8GHJ7", "lnurl"),
    ],
)
def test_module_for_each_form_users_have(uri: str, module: str) -> None:
    assert module_for(uri) == module


@pytest.mark.parametrize(
    ("uri", "scheme"),
    [("dev", "dev"), ("Dev:x", "dev"), ("dev?delay=1", "dev"), ("", ""), ("::", "")],
)
def test_scheme_of(uri: str, scheme: str) -> None:
    assert scheme_of(uri) == scheme


SECRET = "0201036c6e6402f801030a10"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (f"lnd://h:10009?cert=/c&macaroon={SECRET}", "lnd://h:10009?cert=***&macaroon=***"),
        (f"lndconnect://h:10009?macaroon={SECRET}", "lndconnect://h:10009?macaroon=***"),
        (f"eclair://:{SECRET}@127.0.0.1:8080", "eclair://:***@127.0.0.1:8080"),
        (f"eclair://user:{SECRET}@h", "eclair://***:***@h"),
        # Pasted in the wrong place: user info without a colon, the host, the path, the port,
        # a bare parameter name, a URL inside an lnurl: URI.
        (f"lnbits://{SECRET}@127.0.0.1:1?key=x", "lnbits://***@127.0.0.1:1?key=***"),
        (f"lnbits://{SECRET}", "lnbits://***"),
        (f"lnbits+http://h:5000/{SECRET}", "lnbits+http://h:5000/***"),
        (f"lnbits://h?{SECRET}", "lnbits://h?***"),
        (f"lnbits://h?{SECRET}=1&timeout=3", "lnbits://h?***&timeout=3"),
        (f"lnd://h:{SECRET}?macaroon=/m", "lnd://h:***?macaroon=***"),
        (f"lnurl:https://user:{SECRET}@h.example/x", "lnurl:https://***:***@h.example/x"),
        (f"cln:///run/{SECRET}/rpc", "cln:/run/***/rpc"),
        # A raw '/', '?' or '#' in a password ends the authority early (the rest of it would
        # show as the path or query), and a missing '@' puts user:password where the host
        # goes: short passwords that do not look like keys must not show either.
        ("eclair://:abc/Sekr1tPW@127.0.0.1:8080", "eclair://***"),
        ("eclair://u:abc?Sekr1tPW@h:1", "eclair://***"),
        ("eclair://u:abc#Sekr1tPW@h:1", "eclair://***"),
        ("eclair+https://u:Sekr1tPW127.0.0.1:8080", "eclair+https://***:8080"),
        # Not secrets: names with dots (onion hosts too), ordinary paths and file names.
        ("lnd://" + "a2" * 28 + ".onion:10009", "lnd://" + "a2" * 28 + ".onion:10009"),
        (
            "lnbits://h/api/tls-2024-01-01-renewed?key=k",
            "lnbits://h/api/tls-2024-01-01-renewed?key=***",
        ),
        (
            f"lnbits://h/path?key={SECRET}&network=regtest",
            "lnbits://h/path?key=***&network=regtest",
        ),
        ("dev:fan?delay=2", "dev:fan?delay=2"),
        ("alice@example.com", "alice@example.com"),
        ("/run/lightning-rpc", "/run/lightning-rpc"),
    ],
)
def test_redact_hides_every_secret_and_keeps_the_rest(uri: str, shown: str) -> None:
    assert redact(uri) == shown
    assert SECRET not in redact(uri)


def test_query_params_refuses_a_parameter_given_twice() -> None:
    assert query_params("lnd://h?cert=a&macaroon=b") == {"cert": "a", "macaroon": "b"}
    with pytest.raises(LightningError, match="'macaroon' given twice"):
        query_params("lnd://h?macaroon=a&macaroon=b")


def test_an_unsupported_uri_never_echoes_its_secrets(tmp_path: Path) -> None:
    with pytest.raises(LightningError) as caught:
        open_backend(f"btcpay://:{SECRET}@h?key={SECRET}", dev_ledger=tmp_path / "l.sqlite")
    assert SECRET not in str(caught.value)
    assert "unsupported backend URI 'btcpay'" in str(caught.value)
    with pytest.raises(LightningError) as caught:
        open_backend(f"{SECRET}", dev_ledger=tmp_path / "l.sqlite")
    assert str(caught.value).startswith("backend URI without a scheme; use one of: dev, ")
    assert SECRET not in str(caught.value)


# --- l402proxy backend check ----------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_backend_check_says_in_one_line_what_it_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = str(tmp_path / "devledger.sqlite")
    code, out, err = run_cli(capsys, "backend", "check", "dev", "--ledger", ledger)
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    assert out.startswith(f"reached dev at {ledger}, alias 'dev wallet merchant', node ")
    assert out.rstrip().endswith("network regtest")

    code, out, _ = run_cli(capsys, "backend", "check", "dev:fan", "--wallet", "--ledger", ledger)
    assert code == 0 and "alias 'dev wallet fan'" in out

    code, out, _ = run_cli(capsys, "backend", "check", "--json", "--ledger", ledger)
    info = json.loads(out)
    assert code == 0
    assert (info["backend"], info["network"], info["address"]) == ("dev", "regtest", ledger)
    assert len(info["pubkey"]) == 66 and info["summary"].startswith("dev at ")


def test_backend_check_failures_are_one_line_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "backend", "check", f"btcpay://h?key={SECRET}")
    assert code == cli.EXIT_FAILED and out == ""
    assert err.startswith("l402proxy: unsupported backend URI 'btcpay'") and SECRET not in err
    assert err.count("\n") == 1

    code, out, err = run_cli(capsys, "backend", "check", "dev", "--ledger", str(tmp_path))
    assert code == cli.EXIT_FAILED and out == ""
    assert err.startswith(f"l402proxy: cannot open dev ledger {tmp_path}")
    assert "Traceback" not in err


# --- secrets pasted in the wrong place never show -------------------------------------------------

MACAROON = bake_macaroon("admin")
MAC_HEX = MACAROON.hex()
MAC_B64 = base64.urlsafe_b64encode(MACAROON).decode().rstrip("=")
KEY = "3c5b1f9e0d7a4c2b8e6f1a9d0c3b5e7f"  # the shape of an LNbits key
PASSWORD = "Zx81Qv7Lk2Mn4Rs9Tw3Yp6"
MARKERS = (MAC_HEX, MAC_B64, KEY, PASSWORD)

MISPLACED = [
    # LND: a macaroon where a file path, a parameter name, the path, the port or the host goes.
    "lnd://127.0.0.1:1?cert=/x&macaroon={MAC_HEX}",
    "lnd://127.0.0.1:1?cert=/x&macaroon={MAC_B64}",
    "lnd://127.0.0.1:1?macaroon={MACFILE}&cert={MAC_B64}",
    "lnd://127.0.0.1:1/{MAC_B64}?macaroon={MACFILE}",
    "lnd://127.0.0.1:1?{MAC_B64}",
    "lnd://127.0.0.1:1?{MAC_B64}=1&macaroon={MACFILE}",
    "lnd://127.0.0.1:{MAC_HEX}?macaroon={MACFILE}",
    "lnd://{MAC_B64}:10009?macaroon={MACFILE}",
    "lnd://{MAC_B64}?macaroon={MACFILE}",
    "lnd://[{MAC_HEX}]:1?macaroon={MACFILE}",
    "lnd://{MAC_HEX}:{MAC_HEX}:1?macaroon={MACFILE}",
    "lnd://[::1]{MAC_HEX}?macaroon={MACFILE}",
    "lnd://{PASSWORD}@127.0.0.1:1?macaroon={MACFILE}",
    "lnd://127.0.0.1:1?macaroon={MACFILE}&timeout={KEY}",
    "lndconnect://127.0.0.1:1/{MAC_B64}",
    "lndconnect://127.0.0.1:1?{MAC_B64}",
    "lndconnect://127.0.0.1:1?macaroon={MAC_B64}&{KEY}",
    "lndconnect://{MAC_B64}?macaroon={MAC_B64}",
    # LNbits: the key before the host, as the host, as the path, as a bare parameter.
    "lnbits://{KEY}@127.0.0.1:1?key=x",
    "lnbits://{KEY}",
    "lnbits+http://127.0.0.1:5000/{KEY}",
    "lnbits+http://127.0.0.1:5000/{KEY}?key=abc",
    "lnbits://{KEY}?key=abc",
    "lnbits://127.0.0.1?{KEY}",
    "lnbits://127.0.0.1?key=abc&{KEY}=1",
    "lnbits://127.0.0.1?key=abc&timeout={KEY}",
    "lnbits://127.0.0.1:{KEY}?key=abc",
    "lnbits://127.0.0.1?key=abc&key={KEY}",
    # LNURL: user info, key-like hosts and paths.
    "lnurl:https://user:{PASSWORD}@pay.example.com/x",
    "lnurl:https://pay.example.com/{KEY}",
    "lnurl:http://{KEY}/x",
    "lnurl:https://{PASSWORD}@pay.example.com:{KEY}/x",
    # Eclair: parameter values and names, the cert, a key-like host or prefix.
    "eclair://:pw@127.0.0.1:8080?timeout={KEY}",
    "eclair://:pw@127.0.0.1:8080?{KEY}",
    "eclair+https://:pw@127.0.0.1:8080?cert={MAC_B64}",
    "eclair+https://:pw@127.0.0.1:8080?cert=/etc/{KEY}/eclair.pem",
    "eclair://:{PASSWORD}@{KEY}:8080",
    "eclair://:{PASSWORD}@127.0.0.1:8080/{KEY}",
    "eclair://{KEY}@127.0.0.1",
    "eclair://:{PASSWORD}@127.0.0.1:{KEY}",
    # Core Lightning: a key as host, as relative path, as parameter.
    "cln://{KEY}/rpc",
    "cln://{PASSWORD}@host/rpc",
    "cln:{KEY}",
    "cln:///run/rpc?{KEY}",
    "cln:///run/rpc?timeout={KEY}",
    "cln://[{KEY}]/rpc",
    # dev and no scheme at all.
    "dev?{KEY}",
    "dev?hold={KEY}",
    "dev:fan?{KEY}=1",
    "{MAC_B64}",
    "{MAC_B64}:x",
    "{MAC_HEX}",
    "btcpay://h?key={KEY}",
]


def assert_no_marker(text: str, uri: str) -> None:
    for marker in MARKERS:
        assert marker.lower() not in text.lower(), (uri, text)
        assert marker[4:24].lower() not in text.lower(), (uri, text)


@pytest.mark.parametrize("template", MISPLACED)
def test_no_parser_message_or_description_shows_a_misplaced_secret(
    template: str, tmp_path: Path
) -> None:
    macaroon_file = tmp_path / "admin.macaroon"
    macaroon_file.write_bytes(MACAROON)
    uri = template.format(
        MAC_HEX=MAC_HEX, MAC_B64=MAC_B64, KEY=KEY, PASSWORD=PASSWORD, MACFILE=macaroon_file
    )
    assert_no_marker(redact(uri), uri)
    ledger = tmp_path / "devledger.sqlite"
    for opener in (open_backend, open_wallet):
        try:
            opened = opener(uri, dev_ledger=ledger)
        except LightningError as exc:
            text = str(exc)
            assert "\n" not in text, (uri, text)
        else:
            text = f"{opened.describe()} {getattr(opened, 'identity', '')} {opened!r}"
        assert_no_marker(text, uri)
    for parse in (lnd.parse_uri, cln.parse_uri, eclair.parse_uri, lnbits.parse_uri):
        try:
            parsed = parse(uri)
        except LightningError as exc:
            assert_no_marker(str(exc), uri)
        else:
            if not isinstance(parsed, tuple):  # cln's (socket path, timeout) is no message
                assert_no_marker(repr(parsed), uri)
    try:
        target = lnurl.parse_uri(uri)
    except LightningError as exc:
        assert_no_marker(str(exc), uri)
    else:
        assert_no_marker(target.shown, uri)


def test_an_lnd_macaroon_given_inline_says_how_to_give_it() -> None:
    for value in (MAC_HEX, MAC_B64):
        with pytest.raises(LightningError) as caught:
            lnd.parse_uri(f"lnd://127.0.0.1:1?cert=/x&macaroon={value}")
        assert str(caught.value) == (
            "lnd URI: parameter 'macaroon' looks like an inline macaroon (hex or base64), not a "
            "file path; lnd:// takes the path of the file LND writes, lndconnect://host:port"
            "?cert=<base64url DER>&macaroon=<base64url> takes them inline"
        )


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (KEY, True),
        (MAC_HEX, True),
        (MAC_B64, True),
        (PASSWORD, True),
        ("admin.macaroon", False),
        ("lightning-rpc", False),
        ("tls-2024-01-01-renewed.cert", False),
        ("a2" * 28 + ".onion", True),  # a label alone; shown_host keeps names with dots
        ("node.example.com", False),
        ("my_lightning_node_2", False),
        ("127.0.0.1", False),
    ],
)
def test_looks_like_secret(text: str, secret: bool) -> None:
    assert looks_like_secret(text) is secret


# --- bad input is one LightningError line, never a traceback --------------------------------------

BROKEN = [
    ("lnurl:https://[::1/x", "not a valid URL"),
    ("lnurl:https://xn--a.com/x", "'xn--a.com' is not a valid host name"),
    ("lnurl:https://pay.example.com:0/x", "bad port 0"),
    ("alice@xn--a.com", "not a valid domain name"),
    ("lnbits+http://xn--a.com?key=k", "not a valid host name"),
    ("lnbits://xn--a.com/lnbits?key=k", "not a valid host name"),
    ("lnbits+http://127.0.0.1:0?key=k", "bad port 0"),
    ("lnbits://[::1?key=k", "bad host or port"),
    ("eclair://:pw@xn--a.com", "'xn--a.com' is not a valid host name"),
    ("eclair://:pw@127.0.0.1:0", "bad port 0"),
    ("eclair://:pw@[::1", "bad host or port"),
    ("eclair+https://:pw@127.0.0.1?cert=%00", "contains a NUL character"),
    ("lnd://127.0.0.1:1?macaroon=%00", "contains a NUL character"),
    ("lnd://[::1?macaroon=/m", "cannot parse it"),
    ("cln:///run/%00/rpc", "contains a NUL character"),
    ("cln://[::1/rpc", "cannot parse it"),
]


@pytest.mark.parametrize(("uri", "problem"), BROKEN)
def test_unusable_uris_are_one_lightning_error_line(uri: str, problem: str, tmp_path: Path) -> None:
    for opener in (open_backend, open_wallet):
        try:
            opener(uri, dev_ledger=tmp_path / "devledger.sqlite")
        except LightningError as exc:
            text = str(exc)
        else:
            raise AssertionError(f"{uri} was accepted")
        if opener is open_wallet and text.startswith("a Lightning Address can only receive"):
            continue
        assert problem in text, text
        assert "\n" not in text and len(text) < 400, text


def test_backend_check_prints_one_line_for_an_idna_invalid_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(capsys, "backend", "check", "eclair://:pw@xn--a.com")
    assert code == cli.EXIT_FAILED and out == ""
    assert err == (
        "l402proxy: eclair URI: 'xn--a.com' is not a valid host name; use "
        "eclair://:<password>@host:port (eclair+https://... for TLS)\n"
    )


# --- one query parser: '+' is a plus, percent escapes are decoded once -----------------------

PLUS_KEY = "ab+cd/ef+gh=="  # base64 keys and file names hold '+'; parse_qsl made it a space


def test_the_query_parser_keeps_a_plus_and_decodes_escapes_once() -> None:
    assert query_params("x://h?a=b+c&d=e%2Bf&g=%2541") == {"a": "b+c", "d": "e+f", "g": "%41"}


def test_an_lnbits_key_with_a_plus_is_the_key() -> None:
    assert lnbits.parse_uri(f"lnbits://h?key={PLUS_KEY}").key == PLUS_KEY


def test_an_eclair_cert_path_with_a_plus_is_read(tmp_path: Path) -> None:
    from tests.standins.tls import server_context

    _, cert = server_context(tmp_path, "eclair")
    odd = cert.with_name("eclair+ca 1.pem")
    odd.write_bytes(cert.read_bytes())
    config = eclair.parse_uri(f"eclair+https://:pw@h:1?cert={str(odd).replace(' ', '%20')}")
    assert config.ca_pem == cert.read_text()


def test_a_cln_socket_path_with_a_plus_is_the_path() -> None:
    assert cln.parse_uri("cln:///run/a+b/rpc?timeout=5") == ("/run/a+b/rpc", 5.0)


# --- one timeout rule ----------------------------------------------------------------------------


def timeout_uris(tmp_path: Path, value: str) -> dict[str, str]:
    """A URI of each backend taking `timeout=`, with `value`."""
    macaroon = tmp_path / "admin.macaroon"
    macaroon.write_bytes(MACAROON)
    return {
        "lnd URI": f"lnd://127.0.0.1:1?macaroon={macaroon}&timeout={value}",
        "cln URI": f"cln:///run/lightning-rpc?timeout={value}",
        "eclair URI": f"eclair://:pw@127.0.0.1:8080?timeout={value}",
        "LNbits URI": f"lnbits://127.0.0.1?key=k&timeout={value}",
    }


def parsed_timeout(uri: str) -> float:
    module = {"lnd": lnd, "cln": cln, "eclair": eclair, "lnbits": lnbits}[module_for(uri)]
    parsed = module.parse_uri(uri)  # type: ignore[attr-defined]
    return float(parsed[1] if isinstance(parsed, tuple) else parsed.timeout)


@pytest.mark.parametrize("value", ["0.5", "1", "30", "600"])
def test_every_backend_takes_the_same_timeouts(value: str, tmp_path: Path) -> None:
    for uri in timeout_uris(tmp_path, value).values():
        assert parsed_timeout(uri) == float(value), uri


@pytest.mark.parametrize("value", ["0", "-1", "600.5", "nan", "inf", "soon", "", "1s"])
def test_every_backend_refuses_the_same_timeouts_in_the_same_words(
    value: str, tmp_path: Path
) -> None:
    shown = repr(value)
    for what, uri in timeout_uris(tmp_path, value).items():
        with pytest.raises(LightningError) as caught:
            parsed_timeout(uri)
        assert str(caught.value) == (
            f"{what}: timeout must be a number of seconds more than 0 and at most 600, got {shown}"
        ), uri
