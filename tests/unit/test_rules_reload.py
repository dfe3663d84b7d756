"""A broken rules file, at start or edited while running: one log line naming file and line,
the previous rules kept, never a traceback (the reload parses in a worker thread)."""

import logging
import os
import time
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from l402proxy.doors.mitmproxy import L402Server
from tests.unit.test_server_addon import RULES, limited_server, server_on

# (file content, line the message must name): each crashed load_rules with something other
# than RulesError before.
BROKEN = [
    pytest.param("[" * 10000, 1, id="nested-lists"),
    pytest.param(
        "services:\n  - name: a\n    match: {path: 're:a{99999999999}'}\n    price_sat: 1\n",
        3,
        id="regex-repeat-count",
    ),
    pytest.param(
        "services:\n  - name: a\n    match: {path: 're:" + "(" * 5000 + "a" + ")" * 5000 + "'}\n"
        "    price_sat: 1\n",
        3,
        id="regex-nesting",
    ),
    pytest.param(
        'services:\n  - name: a\n    description: "\\ud800"\n    match: {path: /a}\n'
        "    price_sat: 1\n",
        3,
        id="lone-surrogate",
    ),
]


def edit(path: Path, text: str) -> None:
    """Rewrite the file so the watcher sees a change even within one mtime tick."""
    path.write_text(text)
    later = time.time() + 5
    os.utime(path, (later, later))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("text", "line"), BROKEN)
async def test_a_broken_edit_is_one_warning_naming_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, line: int
) -> None:
    live = tmp_path / "live.yaml"
    live.write_text(RULES.read_text())
    async with server_on(tmp_path, live) as server:
        assert server.started
        before = server.rules
        caplog.clear()
        edit(live, text)
        await server._reload_rules_if_changed()
        assert server.rules is before
        warned = warnings_of(caplog)
        assert len(warned) == 1, [r.getMessage() for r in warned]
        message = warned[0].getMessage()
        assert message.startswith("l402: kept the previous rules; the edited file is broken: ")
        assert f"{live}:{line}: " in message
        assert message.isprintable() and warned[0].exc_info is None


@pytest.mark.parametrize(("text", "line"), BROKEN)
async def test_a_broken_file_at_start_is_one_error_naming_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, line: int
) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text(text)
    server = L402Server()
    with taddons.context(server) as tctx:
        tctx.configure(server, l402_rules=str(broken))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert errors[0].getMessage().startswith(f"l402: l402_rules: {broken}:{line}: ")
        assert errors[0].exc_info is None
        assert "l402_rules" in server.misconfigured  # fails closed: nothing is served free


async def test_whatever_load_rules_raises_the_reload_names_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = tmp_path / "live.yaml"
    live.write_text(RULES.read_text())
    async with server_on(tmp_path, live) as server:
        before = server.rules

        def explode(_: object) -> None:
            raise RecursionError("maximum recursion depth exceeded")

        monkeypatch.setattr("l402proxy.engine.core.load_rules", explode)
        caplog.clear()
        edit(live, RULES.read_text() + "\n")
        await server._reload_rules_if_changed()
        assert server.rules is before
        assert [r.getMessage() for r in warnings_of(caplog)] == [
            "l402: kept the previous rules; the edited file is broken: "
            f"{live}: RecursionError: maximum recursion depth exceeded"
        ]


async def test_prices_the_backend_cannot_invoice_name_the_edited_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cheap = tmp_path / "cheap.yaml"
    cheap.write_text('services:\n  - name: tip\n    match: {path: "/tip/*"}\n    price_sat: 5\n')
    async with limited_server(tmp_path, cheap) as server:
        before = server.rules
        caplog.clear()
        edit(cheap, RULES.read_text())
        await server._reload_rules_if_changed()
        assert server.rules is before
        [warning] = [r.getMessage() for r in warnings_of(caplog)]
        assert warning.startswith(f"l402: kept the previous rules; the edited file {cheap}: ")
        assert "costs 100 sat, but lnurl" in warning
