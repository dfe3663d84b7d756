"""Shared test settings.

L402PROXY_STRICT=1 (set by .ci/run) turns "component missing" skips into failures, so CI can never
go green by skipping the tests that need real components.
"""

import os
import sys
import threading

import pytest

STRICT = os.environ.get("L402PROXY_STRICT") == "1"


def require(condition: bool, what: str) -> None:
    """Skip when a real component is missing here; fail instead in strict (CI) runs."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"required component missing: {what} (L402PROXY_STRICT=1)")
    pytest.skip(f"component missing: {what}")


_exit_status: int | None = None
_screenshots: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Tests attach screenshots with record_property("screenshot", path).
    if report.when == "call":
        _screenshots.extend(
            (report.nodeid, str(value))
            for name, value in report.user_properties
            if name == "screenshot"
        )


def pytest_terminal_summary(terminalreporter: "pytest.TerminalReporter") -> None:
    """Screenshots the tests took, with their paths, passed or not (they are for people)."""
    if _screenshots:
        terminalreporter.section("screenshots")
        for nodeid, path in _screenshots:
            terminalreporter.write_line(f"{path}  ({nodeid})")


LEFTOVER_THREAD_JOIN_SECONDS = 5.0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Never hang at exit: a test that left a non-daemon thread behind (an unclosed aiosqlite
    connection, usually after another failure) would keep the interpreter waiting forever."""
    main = threading.main_thread()
    leftover = [t for t in threading.enumerate() if t is not main and not t.daemon]
    for thread in leftover:
        thread.join(LEFTOVER_THREAD_JOIN_SECONDS / max(len(leftover), 1))
    alive = [t.name for t in leftover if t.is_alive()]
    if alive:
        sys.stderr.write(f"\nthreads left running after the tests (not closed?): {alive}\n")
        sys.stderr.flush()
        os._exit(_exit_status or 1)
