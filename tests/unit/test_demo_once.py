"""`scripts/demo --once`: once the servers are stopped it says what to run to keep them, instead
of "Try:" lines pointing at servers that are gone."""

from pathlib import Path

import pytest

from l402proxy.demo import (
    DEFAULT_RULES,
    Ports,
    _reason,
    demo_processes,
    once_lines,
    rerun_command,
    try_lines,
)
from l402proxy.launch import REPO

PORTS = Ports(40001, 40002, 40003)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # where scripts/demo is run from, as the README says


def test_once_says_what_to_run_and_then_what_to_try(tmp_path: Path) -> None:
    demo = demo_processes(tmp_path / "home", PORTS)
    lines = once_lines(demo, rerun_command(PORTS, DEFAULT_RULES))
    assert "Try:" not in lines
    assert lines[:3] == [
        "--once: the servers are stopped. To keep them running and try them yourself, run",
        "  scripts/demo --origin-port 40001 --proxy-port 40002 --client-port 40003",
        "and then:",
    ]
    # The same rows the running demo offers under "Try:", after the command that makes them true.
    assert lines[3:] == try_lines(demo)[1:]
    assert any("curl -s -D - -o ad.wav http://127.0.0.1:40002/episodes/" in line for line in lines)


def test_rerun_command_keeps_what_was_not_the_default(tmp_path: Path) -> None:
    assert rerun_command(Ports(), DEFAULT_RULES) == "scripts/demo"
    assert rerun_command(Ports(proxy=9001), DEFAULT_RULES) == "scripts/demo --proxy-port 9001"
    rules = tmp_path / "my rules.yaml"
    assert rerun_command(Ports(), rules) == f"scripts/demo --rules '{rules}'"


def test_a_proxy_that_stopped_before_listening_is_explained_by_its_l402_line() -> None:
    # mitmdump refusing a bad option at start, with or without its own "Error logged during
    # startup" line: the addon's line is the reason the demo quotes.
    refused = (
        "[05:42:33.703] Loading script addons/server.py\n"
        "[05:42:34.067] l402: l402_rules: /x/nope.yaml: cannot read rules file: No such file\n"
    )
    reason = ": l402: l402_rules: /x/nope.yaml: cannot read rules file: No such file"
    assert _reason(refused) == reason
    assert _reason(refused + "Error logged during startup, exiting...\n") == reason
    # Once it listened, an l402 info line is no reason; an error line is.
    running = refused.replace("cannot read", "read") + "[1] proxy listening at 127.0.0.1:1.\n"
    assert _reason(running) == ""
    assert _reason(running + "[2] error: boom\n") == ": error: boom"
