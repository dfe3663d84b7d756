"""A real PostgreSQL for the tests: Debian's server binaries, a throwaway cluster in a temp dir,
listening on 127.0.0.1 and a free port (its Unix socket inside the temp dir), started once per
session (tests/conftest.py's `postgres` fixture) and stopped and removed after, also on failure.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the `postgres`
system user (the Debian package creates it) or else `nobody`, and the temp dir is theirs.

Each test takes a fresh database (`await postgres.new_database()`, a URI with a password, for
the non-superuser role the store logs in as); outage tests stop and start the server
(`async with postgres.down(): ...`).
"""

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from l402proxy.launch import free_port

BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
ADMIN = "l402admin"  # the cluster's superuser: creates databases, nothing else
ROLE = "l402"  # what the stores log in as: owner of each test database, no superuser
START_SECONDS = 60
STOP_SECONDS = 30
START_ATTEMPTS = 3  # a free port can be taken between free_port() and the server binding it
_names = itertools.count(1)


def find_bindir() -> Path | None:
    """The newest installed server's bin directory (Debian keeps it off PATH), else PATH's."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    candidates = [Path(p) for p in sorted(glob.glob(BINDIR_GLOB), key=version, reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if all((candidate / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


def server_account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (it refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root, and no 'postgres' or 'nobody' user to run PostgreSQL as")


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    admin_password: str
    password: str  # ROLE's
    account: tuple[int, int] | None
    running: bool = False

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def uri(self, database: str, *, password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{ROLE}:{secret}@127.0.0.1:{self.port}/{database}"

    # -- running the server --------------------------------------------------------------------

    def _run(self, *command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        prefix: list[str] = []
        if self.account is not None:
            uid, gid = self.account
            prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run(
            [*prefix, *command],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _pg_ctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args, timeout=timeout
        )

    def start_sync(self) -> None:
        result = self._pg_ctl(
            "start", "-w", "-t", str(START_SECONDS), "-l", str(self.log_path), timeout=90
        )
        if result.returncode != 0:
            log = (
                self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            )
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}\n{log}")
        self.running = True

    def stop_sync(self) -> None:
        """Stop it; fast (clients are disconnected at once), or immediate if fast hangs."""
        if not self.running:
            return
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(STOP_SECONDS), timeout=60)
        if result.returncode != 0:
            self._pg_ctl("stop", "-m", "immediate", "-w", "-t", str(STOP_SECONDS), timeout=60)
        self.running = False

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    @contextlib.asynccontextmanager
    async def down(self) -> AsyncIterator[None]:
        """The server stopped for the body of the `async with`, started again after (also when
        the body fails, so later tests find it running)."""
        await self.stop()
        try:
            yield
        finally:
            await self.start()

    # -- databases -----------------------------------------------------------------------------

    async def admin(self, sql: str, database: str = "postgres") -> None:
        """Run SQL as the superuser, over the Unix socket (trusted locally)."""
        conn = await asyncpg.connect(
            host=str(self.sockdir), port=self.port, user=ADMIN, database=database, timeout=30
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def admin_value(self, sql: str, database: str) -> object:
        conn = await asyncpg.connect(
            host=str(self.sockdir), port=self.port, user=ADMIN, database=database, timeout=30
        )
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def new_database(self) -> str:
        """A fresh, empty database owned by the store's role; its URI."""
        name = f"t{next(_names)}_{secrets.token_hex(4)}"
        await self.admin(f'CREATE DATABASE "{name}" OWNER "{ROLE}"')
        return self.uri(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the session; require()s the binaries (CI fails without)."""
    # Imported here: tests/conftest.py imports this module at its end.
    from tests.conftest import require

    bindir = find_bindir()
    require(bindir is not None, "PostgreSQL (apt-get install postgresql)")
    assert bindir is not None
    account = server_account()
    root = Path(tempfile.mkdtemp(prefix="l402proxy-pg-"))
    server = PostgresServer(
        bindir=bindir,
        root=root,
        port=0,
        admin_password=secrets.token_urlsafe(16),
        password=secrets.token_urlsafe(16),
        account=account,
    )
    try:
        server.sockdir.mkdir()
        pwfile = root / "admin-password"
        pwfile.write_text(server.admin_password + "\n")
        if account is not None:
            for path in (root, server.sockdir, pwfile):
                os.chown(path, *account)
        initdb = server._run(
            str(bindir / "initdb"),
            "-D",
            str(server.datadir),
            "-U",
            ADMIN,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
            timeout=120,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed: {initdb.stderr.strip()}")
        settings = server.datadir / "postgresql.conf"
        base = settings.read_text()
        for attempt in range(START_ATTEMPTS):
            server.port = free_port()
            # Throwaway data: durability settings off, for speed; clean stops still write
            # everything (the outage tests stop it the way an operator would).
            settings.write_text(
                base
                + "\nlisten_addresses = '127.0.0.1'\n"
                + f"port = {server.port}\n"
                + f"unix_socket_directories = '{server.sockdir}'\n"
                + "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                + "shared_buffers = 16MB\nmax_connections = 200\n"
            )
            try:
                server.start_sync()
                break
            except RuntimeError:
                if attempt == START_ATTEMPTS - 1:
                    raise
        # psql, not asyncpg: the fixture may be set up from inside a running event loop.
        role = server._run(
            str(bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(server.sockdir),
            "-p",
            str(server.port),
            "-U",
            ADMIN,
            "-d",
            "postgres",
            "-c",
            f"CREATE ROLE \"{ROLE}\" LOGIN PASSWORD '{server.password}'",
            timeout=60,
        )
        if role.returncode != 0:
            raise RuntimeError(f"cannot create role {ROLE}: {role.stderr.strip()}")
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop_sync()
        shutil.rmtree(root, ignore_errors=True)
