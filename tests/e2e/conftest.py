import shutil
from pathlib import Path

import pytest

from l402proxy.launch import mitmdump
from tests.conftest import require


@pytest.fixture(autouse=True, scope="session")
def _mitmdump_is_installed() -> None:
    """Every test here runs a real mitmdump; without one they cannot say anything."""
    command = mitmdump()
    require(Path(command).exists() or shutil.which(command) is not None, f"mitmdump ({command})")
