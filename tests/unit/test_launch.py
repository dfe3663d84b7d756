"""launch.started: every child it began is stopped, also one interrupted while starting."""

import sys
from pathlib import Path

import pytest

from l402proxy.launch import Process, free_port, started


def sleeper(tmp_path: Path, name: str) -> Process:
    # Never listens: wait_ready() would wait its whole timeout.
    return Process(
        name=name,
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        port=free_port(),
        log_path=tmp_path / f"{name}.log",
    )


def test_a_child_interrupted_while_it_starts_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = sleeper(tmp_path, "child")

    def interrupted(self: Process, timeout: float = 0) -> None:
        assert self.proc is not None and self.proc.poll() is None  # it is running
        raise KeyboardInterrupt  # Ctrl-C or SIGTERM (the demo turns it into this) right now

    monkeypatch.setattr(Process, "wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt), started(child):
        pytest.fail("never reached")
    assert child.proc is not None
    assert child.proc.poll() is not None, "the child was left running"
