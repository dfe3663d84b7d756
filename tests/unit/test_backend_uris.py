"""Which module serves a backend URI, redaction of secrets, and `l402proxy backend check`."""

import json
from pathlib import Path

import pytest

from l402proxy import cli
from l402proxy.lightning import LightningError, open_backend
from l402proxy.lightning.uri import module_for, query_params, redact, scheme_of


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
        (f"eclair://user:{SECRET}@h", "eclair://user:***@h"),
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
