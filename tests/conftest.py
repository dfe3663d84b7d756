"""Shared test settings.

L402PROXY_STRICT=1 (set by .ci/run) turns "component missing" skips into failures, so CI can never
go green by skipping the tests that need real components. A local run ends with the components
it missed and what installs each.
"""

import logging
import os
import re
import sys
import threading

import pytest

STRICT = os.environ.get("L402PROXY_STRICT") == "1"

# Every real component a test may `require`, and what installs it: the one place for both.
INSTALL_HINTS: dict[str, str] = {
    "mitmdump": "pip install -e '.[dev]' (scripts/test sets up .venv with it)",
    "chromium": "apt-get install chromium (or set L402PROXY_CHROMIUM to a Chrome/Chromium)",
    "playwright": "pip install -e '.[dev]' (no browser download: it drives the system chromium)",
    "zbarimg": "apt-get install zbar-tools",
    "nginx": "apt-get install nginx",
    "LNbits": "scripts/test sets it up (needs Python 3.11/3.12), or set L402PROXY_LNBITS",
    "PostgreSQL": "apt-get install postgresql",
    "IPv6 loopback": "enable IPv6 on lo (sysctl -w net.ipv6.conf.lo.disable_ipv6=0)",
    "go": "apt-get install golang-go (the Go SDK's tests)",
    "uvicorn": "pip install -e . (a dependency; scripts/test sets up .venv with it)",
    "prometheus": "apt-get install prometheus (promtool and the Prometheus server)",
    "nostr-relay": "pip install -e '.[dev]' (nostr-relay from PyPI)",
}
_SKIP_PREFIX = "component missing: "
# What each `require` that skipped was told: its `what` -> the INSTALL_HINTS key (or None).
_missing: dict[str, str | None] = {}


def component_of(what: str) -> str | None:
    """The INSTALL_HINTS key a `require(..., what)` names: the first one found in `what` as
    words ("chromium (Debian package ...)" -> "chromium")."""
    for key in INSTALL_HINTS:
        if re.search(rf"\b{re.escape(key)}\b", what, re.IGNORECASE):
            return key
    return None


def require(condition: bool, what: str, key: str | None = None) -> None:
    """Skip when a real component is missing here; fail instead in strict (CI) runs.

    `key` names the component in INSTALL_HINTS; without it the name is looked up in `what`.
    """
    if condition:
        return
    component = key if key is not None else component_of(what)
    hint = INSTALL_HINTS.get(component) if component is not None else None
    install = f"; install: {hint}" if hint else ""
    if STRICT:
        pytest.fail(f"required component missing: {what} (L402PROXY_STRICT=1){install}")
    _missing[what] = component
    pytest.skip(f"{_SKIP_PREFIX}{what}")


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
    """Screenshots the tests took, with their paths, passed or not (they are for people); the
    components whose tests skipped, with what installs each."""
    if _screenshots:
        terminalreporter.section("screenshots")
        for nodeid, path in _screenshots:
            terminalreporter.write_line(f"{path}  ({nodeid})")
    lines = missing_component_lines(terminalreporter.stats.get("skipped", []))
    if lines:
        terminalreporter.section("missing components (their tests skipped)")
        for line in lines:
            terminalreporter.write_line(line)


def missing_component_lines(skipped: list[pytest.TestReport]) -> list[str]:
    """One line per missing component: name, what installs it, how many tests it skipped. A
    session fixture's skip repeats in every test using it: the count is of tests."""
    reasons = []
    for report in skipped:
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reasons.append(str(longrepr[2]).removeprefix("Skipped: "))
    counts: dict[str, int] = {}
    for what, component in _missing.items():
        name = component or what
        count = sum(reason == f"{_SKIP_PREFIX}{what}" for reason in reasons)
        counts[name] = counts.get(name, 0) + count
    lines = []
    for name, count in counts.items():
        if not count:
            continue  # a skip some test caught itself (tests of `require`)
        hint = INSTALL_HINTS.get(name, "no install hint yet (INSTALL_HINTS, tests/conftest.py)")
        lines.append(f"{name}: {hint}  ({count} test{'s' if count != 1 else ''} skipped)")
    return lines


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
        # os._exit drops what is buffered: pytest's summary may still sit in stdout's buffer.
        sys.stdout.flush()
        sys.stderr.write(f"\nthreads left running after the tests (not closed?): {alive}\n")
        sys.stderr.flush()
        # The tests' own verdict: a thread left behind is worth a line, not a red run.
        os._exit(_exit_status if _exit_status is not None else 1)


# A real PostgreSQL for the whole session, started on first use (tests/postgres.py). Imported
# here, at the end, so that the fixtures and hooks above come first.
from collections.abc import Iterator  # noqa: E402

from tests.postgres import PostgresServer, running_postgres  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL cluster: skipped here, failed in CI, when PostgreSQL is missing."""
    with running_postgres() as server:
        yield server


@pytest.fixture(autouse=True)
def _l402proxy_logger_restored() -> Iterator[None]:
    """The "l402proxy" logger as it was before each test: JSON logs (ops/jsonlog.py) put a
    handler on it and stop its propagation for the life of a run (serve-auth's --log-format
    json does so for good, as a process would), and the next test's caplog must still see
    its lines."""
    from l402proxy.ops import jsonlog

    logger = logging.getLogger("l402proxy")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    installed, before = dict(jsonlog._installed), jsonlog._before
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]
    jsonlog._installed.clear()
    jsonlog._installed.update(installed)
    jsonlog._before = before
