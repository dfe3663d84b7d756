"""What the CLI prints: epoch times with an ISO 8601 twin, and nothing (no traceback) when the
reader of its output goes away."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from l402proxy.cli import EXIT_BROKEN_PIPE, is_epoch_field, iso_time, main, with_iso_times
from l402proxy.launch import REPO, env_with_home
from l402proxy.lightning.dev import DEFAULT_SERVER_WALLET, DevLedger
from tests.unit import test_cli_wallet
from tests.unit.test_cli_options import issue
from tests.unit.test_cli_wallet import Ledger, run_json

home = test_cli_wallet.home  # a fixture: L402PROXY_HOME in tmp_path
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
RULES = REPO / "rules" / "podcast.yaml"


@pytest.mark.parametrize(
    ("epoch", "iso"),
    [
        (1796534502, "2026-12-06T05:21:42Z"),
        (1796534502.999, "2026-12-06T05:21:42Z"),  # whole seconds, never rounded up
        (0, "1970-01-01T00:00:00Z"),
        (-1, "1969-12-31T23:59:59Z"),
        (253402300799, "9999-12-31T23:59:59Z"),
        (253402300800, None),  # past year 9999: no such date
        (1e300, None),
        (float("nan"), None),
        (float("inf"), None),
        (None, None),
        (True, None),
        ("1796534502", None),
    ],
)
def test_iso_time(epoch: object, iso: str | None) -> None:
    assert iso_time(epoch) == iso


def test_with_iso_times_adds_a_twin_after_each_epoch_field_at_any_depth() -> None:
    value = {"revoked": [{"token_id": "ab", "created_at": 0, "valid_until": None, "price": 1}]}
    assert with_iso_times(value) == {
        "revoked": [
            {
                "token_id": "ab",
                "created_at": 0,
                "created_at_iso": "1970-01-01T00:00:00Z",
                "valid_until": None,
                "valid_until_iso": None,
                "price": 1,
            }
        ]
    }
    assert list(with_iso_times({"when": 1, "x": 2})) == ["when", "when_iso", "x"]


def epoch_fields(value: Any) -> list[tuple[str, Any, Any]]:
    """(name, epoch, twin) for every epoch field in a JSON value."""
    found = []
    if isinstance(value, list):
        for item in value:
            found.extend(epoch_fields(item))
    elif isinstance(value, dict):
        for key, item in value.items():
            if is_epoch_field(key):
                found.append((key, item, value.get(f"{key}_iso", "MISSING")))
            found.extend(epoch_fields(item))
    return found


def assert_twins(output: Any, names: set[str]) -> None:
    fields = epoch_fields(output)
    assert {name for name, _, _ in fields} >= names, fields
    for name, epoch, twin in fields:
        if epoch is None:
            assert twin is None, name
        else:
            assert isinstance(twin, str) and ISO.fullmatch(twin), (name, twin)
            assert twin == iso_time(epoch)


def test_every_json_output_has_iso_times(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, home: Path
) -> None:
    now = time.time()
    client = tmp_path / "client.sqlite"
    ledger = Ledger(client)
    ledger.pay(now=now - 30, valid_until=now + 3600)
    ledger.refuse(now=now - 20)
    dropped, _ = ledger.pay(now=now - 10)
    ledger.drop(dropped.payment_hash, now=now - 5)
    history = run_json(capsys, "wallet", "history", "--store", str(client))
    assert_twins(history, {"when", "settled_at", "dropped_at"})
    assert history[-1]["when_iso"] == iso_time(now - 30)
    assert_twins(run_json(capsys, "wallet", "tokens", "--store", str(client)), {"created_at"})

    server = str(tmp_path / "server.sqlite")
    token = issue(server, "podcast")
    listed = run_json(capsys, "tokens", "list", "--store", server)
    assert_twins(listed, {"created_at", "valid_until", "paid_at", "revoked_at"})
    assert listed[0]["created_at_iso"] == "2023-11-14T22:13:20Z"
    revoked = run_json(capsys, "tokens", "revoke", token.token_id.hex(), "--store", server)
    assert_twins(revoked, {"revoked_at"})
    assert revoked["revoked"][0]["revoked_at_iso"] is not None

    async def invoice() -> str:
        dev = DevLedger(tmp_path / "ledger.sqlite")
        try:
            return (await dev.create_invoice(DEFAULT_SERVER_WALLET, 1_000, "x", 600)).bolt11
        finally:
            await dev.close()

    bolt11 = asyncio.run(invoice())
    invoices = run_json(capsys, "dev", "invoices", "--ledger", str(tmp_path / "ledger.sqlite"))
    assert_twins(invoices, {"created_at", "expires_at", "settled_at"})

    assert main(["decode", f'L402 macaroon="AgEEbHNhdAJCAAA=", invoice="{bolt11}"']) == 3
    assert_twins(json.loads(capsys.readouterr().out), {"created_at", "expires_at"})


def closed_pipe_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI writing into a pipe whose reader is gone, as under `| head -1` once head exits."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "l402proxy", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("unbuffered", [True, False])
@pytest.mark.parametrize(
    "args",
    [["rules", "check", str(RULES)], ["dev", "invoices"], ["backend", "check"], ["--help"]],
    ids=["json", "json-list", "line", "help"],
)
def test_a_reader_that_leaves_early_gets_no_traceback(
    tmp_path: Path, args: list[str], unbuffered: bool
) -> None:
    env = env_with_home(tmp_path)
    if not unbuffered:
        env.pop("PYTHONUNBUFFERED")
    result = closed_pipe_run(args, env)
    assert result.stderr == ""
    if args == ["--help"] and unbuffered:
        # argparse ignores the failed write itself on some 3.11 patch releases (3.11.7: 0),
        # not on others (Debian's 3.11.2: 141); no traceback either way.
        assert result.returncode in (0, EXIT_BROKEN_PIPE)
    else:
        assert result.returncode == EXIT_BROKEN_PIPE == 141
