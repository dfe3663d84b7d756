"""Fixtures of the backend contract: every backend in tests/backends.py `RIGS`, one at a time.

`rig` runs a test once per backend, `paying_rig` once per backend that can pay (not a Lightning
Address), `guarded_rig` once per backend that takes credentials. `backend` and `wallet` are the
rig's own. LNbits is started once per session, and
only when a test of its rig runs (tests/lnbits_server.py: skipped locally, failed in CI, when
it is not installed).
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from l402proxy.lightning import InvoiceBackend, Wallet
from tests.backends import GUARDED, PAYING, RIGS, Rig
from tests.lnbits_server import lnbits  # noqa: F401 (fixture)


@dataclass
class _Place:
    tmp_path: Path
    ledger_path: Path
    request: pytest.FixtureRequest

    def lnbits(self) -> Any:
        # Asked for only by the LNbits rig: the other backends never start LNbits.
        return self.request.getfixturevalue("lnbits")


async def _rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    place = _Place(tmp_path, tmp_path / "devledger.sqlite", request)
    async with RIGS[request.param](place) as rig:
        yield rig


@pytest.fixture(params=list(RIGS))
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """Each backend in turn, receiving into "merchant" and (if it can) paying from "listener"."""
    async for made in _rig(request, tmp_path):
        yield made


@pytest.fixture(params=list(PAYING))
async def paying_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """Each backend that can pay, in turn."""
    async for made in _rig(request, tmp_path):
        yield made


@pytest.fixture(params=list(GUARDED))
async def guarded_rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    """Each backend that takes credentials (a macaroon, a password, a key), in turn."""
    async for made in _rig(request, tmp_path):
        yield made


@pytest.fixture
def backend(rig: Rig) -> InvoiceBackend:
    return rig.backend


@pytest.fixture
def wallet(paying_rig: Rig) -> Wallet:
    assert paying_rig.wallet is not None
    return paying_rig.wallet
