"""`l402proxy rules check FILE`: a broken file is one stderr line naming file and line, exit 2."""

from collections.abc import Callable
from pathlib import Path

import pytest

from l402proxy.cli import EXIT_BAD_INPUT, main
from tests.unit.test_rules import HOSTILE


@pytest.mark.parametrize(("text", "line", "message"), HOSTILE)
def test_a_broken_file_is_one_line_naming_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["rules", "check", str(path)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"l402proxy: {path}:{line}: ")
    assert captured.err.count("\n") == 1 and captured.err[:-1].isprintable()
    assert message in captured.err


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(lambda p: p.mkdir(), "cannot read rules file: Is a directory", id="directory"),
        pytest.param(lambda p: None, "cannot read rules file: No such file", id="missing"),
        pytest.param(
            lambda p: p.write_bytes(b"services:\n  - name: caf\xe9\n"),
            "2: cannot read rules file: not UTF-8",
            id="latin-1",
        ),
    ],
)
def test_a_file_that_cannot_be_read_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: Callable[[Path], object], problem: str
) -> None:
    path = tmp_path / "rules.yaml"
    make(path)
    assert main(["rules", "check", str(path)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"l402proxy: {path}:")
    assert problem in captured.err
