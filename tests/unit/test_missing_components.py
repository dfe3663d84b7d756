"""A local run ends with each missing component and what installs it (tests/conftest.py)."""

import ast
from pathlib import Path

import pytest

from tests import conftest

TESTS = Path(conftest.__file__).parent


def require_calls() -> list[tuple[str, str, str | None]]:
    """(file:line, the text of `what`, key) for every `require(...)` call in the tests; the
    literal parts of an f-string stand for it."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else None
            if isinstance(node.func, ast.Name):
                name = node.func.id
            if name != "require":
                continue
            what = node.args[1]
            if not isinstance(what, ast.JoinedStr | ast.Constant):
                continue  # a variable: the tests of `require` itself
            parts = what.values if isinstance(what, ast.JoinedStr) else [what]
            text = "".join(
                p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)
            )
            key = next(
                (k.value.value for k in node.keywords if k.arg == "key"),
                None,
            )
            found.append((f"{path.relative_to(TESTS)}:{node.lineno}", text, key))
    return found


def test_every_required_component_has_an_install_hint() -> None:
    calls = [c for c in require_calls() if c[1] != "anything"]  # test_strict_mode's
    assert len(calls) >= 6, calls  # the scan finds the real callers
    for where, what, key in calls:
        component = key if key is not None else conftest.component_of(what)
        assert component in conftest.INSTALL_HINTS, f"{where}: no install hint for {what!r}"


@pytest.mark.parametrize(
    ("what", "component"),
    [
        ("chromium (Debian package 'chromium', or set L402PROXY_CHROMIUM)", "chromium"),
        ("the playwright Python package (pip install -e '.[dev]')", "playwright"),
        ("zbarimg (Debian package 'zbar-tools')", "zbarimg"),
        ("LNbits (set L402PROXY_LNBITS or run scripts/test)", "LNbits"),
        ("an IPv6 loopback (::1)", "IPv6 loopback"),
        ("mitmdump (/repo/.venv/bin/mitmdump)", "mitmdump"),
        ("nginx (/usr/sbin/nginx; apt-get install nginx)", "nginx"),
        ("go (apt-get install golang-go)", "go"),
        ("a flux capacitor", None),
    ],
)
def test_component_of(what: str, component: str | None) -> None:
    assert conftest.component_of(what) == component


def skipped(reason: str) -> pytest.TestReport:
    return pytest.TestReport(
        nodeid="t.py::x",
        location=("t.py", 1, "x"),
        keywords={},
        outcome="skipped",
        longrepr=("t.py", 1, f"Skipped: {reason}"),
        when="setup",
    )


def test_the_summary_lists_each_missing_component_with_its_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "STRICT", False)
    monkeypatch.setattr(conftest, "_missing", {})
    reasons = []
    for what, key in [
        ("LNbits (set L402PROXY_LNBITS)", None),
        ("mitmdump (/a/mitmdump)", None),
        ("mitmdump (/b/mitmdump)", None),
        ("a flux capacitor", None),
        ("the web server", "nginx"),
    ]:
        with pytest.raises(pytest.skip.Exception) as info:
            conftest.require(False, what, key)
        reasons.append(str(info.value.msg))
    assert reasons[0] == "component missing: LNbits (set L402PROXY_LNBITS)"  # as before
    # A session fixture's skip is reported by each test that uses it.
    reports = [skipped(reason) for reason in [reasons[0], *reasons]]
    reports.append(skipped("something else"))
    assert conftest.missing_component_lines(reports) == [
        "LNbits: scripts/test sets it up (needs Python 3.11/3.12), or set L402PROXY_LNBITS"
        "  (2 tests skipped)",
        "mitmdump: pip install -e '.[dev]' (scripts/test sets up .venv with it)  (2 tests skipped)",
        "a flux capacitor: no install hint yet (INSTALL_HINTS, tests/conftest.py)"
        "  (1 test skipped)",
        "nginx: apt-get install nginx  (1 test skipped)",
    ]


def test_strict_runs_fail_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "STRICT", True)
    with pytest.raises(pytest.fail.Exception) as info:
        conftest.require(False, "zbarimg (Debian package 'zbar-tools')")
    assert str(info.value.msg) == (
        "required component missing: zbarimg (Debian package 'zbar-tools') "
        "(L402PROXY_STRICT=1); install: apt-get install zbar-tools"
    )
