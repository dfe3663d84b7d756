import pytest

from tests import conftest


def test_missing_component_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    conftest.require(True, "anything")  # present: nothing happens
    monkeypatch.setattr(conftest, "STRICT", False)
    with pytest.raises(pytest.skip.Exception, match="component missing: chromium"):
        conftest.require(False, "chromium")
    monkeypatch.setattr(conftest, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="required component missing: chromium"):
        conftest.require(False, "chromium")
