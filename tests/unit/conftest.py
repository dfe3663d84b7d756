"""Fixtures the unit tests share (defined in tests/backends.py, so that tests/contract and the
end-to-end tests use the very same ones): `ledger_path` and `ledger`, a dev ledger per test."""

from tests.backends import ledger, ledger_path  # noqa: F401 (fixtures)
