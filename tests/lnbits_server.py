"""A real LNbits (1.6.2, FakeWallet funding source) for the tests, on 127.0.0.1.

LNbits lives in its own virtualenv (it needs Python < 3.13 and pins its own dependencies):
`scripts/bootstrap.sh` `ensure_lnbits_venv` builds REPO/.venv-lnbits and `scripts/test` exports
`L402PROXY_LNBITS=<venv>/bin/lnbits`. Without it the tests that need LNbits skip locally and fail
in CI (`tests.conftest.require`).

`lnbits` is a session-scoped fixture: one LNbits per test session, in a temporary folder, shared
by every test of the module that imports it (`from tests.lnbits_server import lnbits`). Wallets
made by one test are new wallets, so tests do not see each other's balances.
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.launch import REPO, free_port
from tests.conftest import require

ENV_VAR = "L402PROXY_LNBITS"
DEFAULT_EXECUTABLE = REPO / ".venv-lnbits" / "bin" / "lnbits"
# First start migrates a fresh database (~8 s here); later starts take ~3 s.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
SUPERUSER = "l402test"
SUPERUSER_PASSWORD = "l402proxy-test-password"


def executable() -> Path | None:
    """The `lnbits` command to test with: $L402PROXY_LNBITS, else REPO/.venv-lnbits/bin/lnbits."""
    configured = os.environ.get(ENV_VAR)
    candidate = Path(configured) if configured else DEFAULT_EXECUTABLE
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def package_dir(command: Path) -> Path | None:
    """The installed `lnbits` package beside the command (venv/lib/python3.X/site-packages)."""
    venv = command.resolve().parent.parent
    found = sorted(venv.glob("lib/python3.*/site-packages/lnbits/__init__.py"))
    return found[-1].parent if found else None


class LNbitsStartError(Exception):
    pass


@dataclass(frozen=True)
class WalletKeys:
    """One LNbits wallet: its id and both keys (secrets: tests only)."""

    id: str
    name: str
    adminkey: str
    inkey: str


@dataclass
class LNbitsServer:
    """A running LNbits; `stop()` ends it and the server process it forked."""

    port: int
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, key: str) -> str:
        """The l402_backend / l402_wallet URI for one of its wallets."""
        return f"lnbits+http://127.0.0.1:{self.port}?key={key}"

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, trust_env=False, timeout=REQUEST_TIMEOUT)

    def first_install(self) -> None:
        """Name the super user (LNbits answers 307 to everything before), keep its token."""
        with self._client() as client:
            response = client.put(
                "/api/v1/auth/first_install",
                json={
                    "username": SUPERUSER,
                    "password": SUPERUSER_PASSWORD,
                    "password_repeat": SUPERUSER_PASSWORD,
                },
            )
        if response.status_code != 200:
            raise LNbitsStartError(f"first install: HTTP {response.status_code}: {response.text}")
        self.token = response.json()["access_token"]

    def create_wallet(self, name: str) -> WalletKeys:
        """A new account with one wallet (POST /api/v1/account needs no login)."""
        with self._client() as client:
            response = client.post("/api/v1/account", json={"name": name})
        response.raise_for_status()
        body = response.json()
        return WalletKeys(body["id"], body["name"], body["adminkey"], body["inkey"])

    def fund(self, wallet: WalletKeys, sat: int) -> None:
        """Credit `sat` to a wallet out of thin air (the super user's balance endpoint)."""
        with self._client() as client:
            response = client.put(
                "/users/api/v1/balance",
                json={"id": wallet.id, "amount": sat},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        response.raise_for_status()

    def balance_msat(self, wallet: WalletKeys) -> int:
        with self._client() as client:
            response = client.get("/api/v1/wallet", headers={"X-Api-Key": wallet.inkey})
        response.raise_for_status()
        return int(response.json()["balance"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to its process group (it forks the server), SIGKILL if it lingers."""
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lnbits_env(workdir: Path) -> dict[str, str]:
    """A small, fixed environment: FakeWallet, data under workdir, nothing fetched online."""
    env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL") if name in os.environ}
    env |= {
        "HOME": str(workdir / "home"),
        "PYTHONUNBUFFERED": "1",
        "LNBITS_BACKEND_WALLET_CLASS": "FakeWallet",
        "LNBITS_DATA_FOLDER": str(workdir / "data"),
        "LNBITS_EXTENSIONS_PATH": str(workdir / "ext"),
        # Every test talks to it from one address.
        "LNBITS_RATE_LIMIT_NO": "100000",
        # No internet here: no price feeds, no extension manifests.
        "LNBITS_PRICE_AGGREGATOR_ENABLED": "false",
        "LNBITS_EXCHANGE_RATE_PROVIDERS": "[]",
        "LNBITS_EXTENSIONS_MANIFESTS": "[]",
        "LNBITS_WASM_EXTENSIONS_MANIFESTS": "[]",
    }
    return env


def start(workdir: Path, command: Path, timeout: float = START_TIMEOUT) -> LNbitsServer:
    """Start LNbits in workdir and wait until it answers; first install done, ready for wallets."""
    package = package_dir(command)
    if package is None:
        raise LNbitsStartError(f"no lnbits package found beside {command}")
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("home", "data", "ext"):
        (workdir / sub).mkdir(exist_ok=True)
    # LNbits finds its static files relative to the working directory.
    link = workdir / "lnbits"
    if not link.exists():
        link.symlink_to(package, target_is_directory=True)
    port = free_port()
    log_path = workdir / f"lnbits-{port}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(command), "--port", str(port), "--host", "127.0.0.1"],
            cwd=workdir,
            env=lnbits_env(workdir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = LNbitsServer(port, workdir, log_path, proc)
    try:
        _wait_ready(server, timeout)
        server.first_install()
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: LNbitsServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise LNbitsStartError(
                    f"LNbits exited with status {server.proc.returncode}; "
                    f"log {server.log_path}:\n{server.log()[-4000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                # 307 (to the first-install page) until the super user is named, then 200.
                if client.get("/api/v1/health").status_code in (200, 307):
                    return
            time.sleep(0.2)
    raise LNbitsStartError(
        f"LNbits did not answer on {server.url} within {timeout:g} s; "
        f"log {server.log_path}:\n{server.log()[-4000:]}"
    )


@pytest.fixture(scope="session")
def lnbits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LNbitsServer]:
    """One real LNbits for the session (skips locally, fails in CI, when it is not installed)."""
    command = executable()
    require(
        command is not None,
        f"LNbits (set {ENV_VAR} or run scripts/test, which builds {DEFAULT_EXECUTABLE})",
    )
    assert command is not None
    server = start(tmp_path_factory.mktemp("lnbits"), command)
    try:
        yield server
    finally:
        server.stop()
