"""The Go SDK (sdk/go) end to end: a Go test binary pays the real server proxy (mitmdump with
rules/podcast.yaml and the dev backend) through the dev ledger, and the ledger shows what it paid.

The Go side (TestE2EServerProxy in sdk/go/l402/e2e_test.go) sends 16 requests at once, checks
they all get the paid variant and that one payment covered them, reuses the token for another
episode, then reopens its file store as a restarted program would and uses the token again.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from l402proxy.launch import started
from l402proxy.lightning.dev import NEW_WALLET_BALANCE_MSAT
from tests.conftest import require

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
GO_MODULE = procs.REPO / "sdk" / "go"
PRICE_MSAT = 21_000
# The first run compiles the test binary (about a minute on a slow machine).
GO_TEST_TIMEOUT = 600.0


def go_env(extra: dict[str, str]) -> dict[str, str]:
    """Offline and self-contained, as scripts/test runs `go test` (CI has no HOME to cache in)."""
    env = dict(os.environ)
    env.update(GOFLAGS="-mod=mod", GOPROXY="off", GOTOOLCHAIN="local")
    env.setdefault("GOCACHE", str(procs.REPO / ".cache" / "go-build"))
    env.setdefault("GOPATH", str(procs.REPO / ".cache" / "go"))
    env.update(extra)
    return env


def test_go_sdk_pays_the_server_proxy_once_and_reuses_the_token(tmp_path: Path) -> None:
    go = shutil.which("go")
    require(go is not None, "go (apt-get install golang-go)")
    assert go is not None
    home = tmp_path / "home"
    home.mkdir()
    origin = procs.origin(tmp_path, home)
    proxy = procs.server_proxy(
        tmp_path, home, tmp_path / "mitmproxy-conf", origin.url, PODCAST_RULES
    )
    with started(origin, proxy):
        result = subprocess.run(
            [go, "test", "-count=1", "-v", "-run", "^TestE2EServerProxy$", "./l402/"],
            cwd=GO_MODULE,
            env=go_env(
                {
                    "L402PROXY_E2E_PROXY": proxy.url,
                    "L402PROXY_E2E_LEDGER": str(home / "devledger.sqlite"),
                    "L402PROXY_E2E_STORE": str(tmp_path / "go-client" / "ledger.json"),
                    "L402PROXY_PYTHON": sys.executable,
                }
            ),
            capture_output=True,
            text=True,
            timeout=GO_TEST_TIMEOUT,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "--- PASS: TestE2EServerProxy" in result.stdout, output[-6000:]

    # The ledger itself: one invoice settled, by the client's wallet, for the episode's price;
    # the other challenges' invoices were left unpaid.
    invoices = procs.ledger_invoices(home)
    settled = [invoice for invoice in invoices if invoice["settled"]]
    assert len(settled) == 1, settled
    assert settled[0]["amount_msat"] == PRICE_MSAT
    assert settled[0]["paid_by"] == "listener"
    assert len(invoices) > 1, "the 16 requests met a single challenge: the test proves less"
    assert procs.ledger_balance(home) == NEW_WALLET_BALANCE_MSAT - PRICE_MSAT
