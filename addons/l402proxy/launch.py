"""Start and stop the processes of a local setup (origin, mitmdump with our addons), in bounded
time.

Shared by the demo, the benchmark and the end-to-end tests, so all three run the same commands a
user would type.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ADDONS = REPO / "addons"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOCALHOST = "127.0.0.1"


class LaunchError(Exception):
    pass


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def mitmdump() -> str:
    """The mitmdump of this Python environment, so addons run on the mitmproxy we test with."""
    local = Path(sys.executable).parent / "mitmdump"
    return str(local) if local.exists() else (shutil.which("mitmdump") or "mitmdump")


def origin_command(port: int, name: str = "origin", host: str = LOCALHOST) -> list[str]:
    return [
        sys.executable, "-m", "l402proxy.origin",
        "--host", host, "--port", str(port), "--name", name,
    ]  # fmt: skip


def server_proxy_command(
    origin_url: str,
    port: int,
    rules: str | Path | None,
    *,
    settings: Sequence[str] = (),
    host: str = LOCALHOST,
) -> list[str]:
    """mitmdump in reverse mode in front of origin_url; rules=None gives bare mitmdump."""
    command = [
        mitmdump(),
        "--mode", f"reverse:{origin_url}",
        "--listen-host", host,
        "--listen-port", str(port),
    ]  # fmt: skip
    if rules is not None:
        command += ["-s", str(ADDONS / "server.py"), "--set", f"l402_rules={rules}"]
    for setting in settings:
        command += ["--set", setting]
    return command


def client_proxy_command(
    port: int, *, settings: Sequence[str] = (), addon: bool = True, host: str = LOCALHOST
) -> list[str]:
    """mitmdump in regular (forward proxy) mode, with the paying client addon unless addon=False."""
    command = [mitmdump(), "--listen-host", host, "--listen-port", str(port)]
    if addon:
        command += ["-s", str(ADDONS / "client.py")]
    for setting in settings:
        command += ["--set", setting]
    return command


@dataclass
class Process:
    """A child process that serves on a port; its output goes to a log file."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    host: str = LOCALHOST
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, wait: bool = True) -> "Process":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(
                    f"{self.name} exited with status {self.proc.returncode}; "
                    f"log {self.log_path}:\n{self.log()[-4000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise LaunchError(
            f"{self.name} did not listen on {self.host}:{self.port} in {timeout:.0f} s"
        )

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.contextmanager
def started(*processes: Process) -> Iterator[tuple[Process, ...]]:
    """Start in order, stop in reverse order, whatever happens in between."""
    done: list[Process] = []
    try:
        for process in processes:
            # Counted before it is ready: a signal while it starts must stop it too.
            done.append(process)
            process.start()
        yield processes
    finally:
        for process in reversed(done):
            process.stop()


NGINX = "/usr/sbin/nginx"  # Debian's


def nginx_binary() -> str | None:
    """Debian's nginx, or the one on PATH; None when there is none."""
    return NGINX if Path(NGINX).exists() else shutil.which("nginx")


NGINX_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_main_config(prefix: Path, http_conf: str) -> str:
    """A whole nginx.conf around `http_conf` (what goes inside http { }), with every path of
    nginx's own (pid, logs, temp files) under `prefix`."""
    import grp
    import pwd

    # As root, workers would drop to "nobody", who cannot read temp dirs under /tmp or the
    # checkout: run them as whoever starts nginx (nginx ignores `user` when not root).
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in NGINX_TEMP_KINDS)
    return f"""daemon off;
worker_processes 1;
user {user} {group};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    default_type text/plain;
{http_conf}
}}
"""


def nginx_process(
    name: str, prefix: Path, http_conf: str, port: int, binary: str | None = None
) -> Process:
    """nginx in the foreground under `prefix` (nginx_main_config) with `http_conf` inside its
    http { } block; `port` is where http_conf listens."""
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(nginx_main_config(prefix, http_conf))
    return Process(
        name=name,
        command=[binary or nginx_binary() or "nginx", "-p", str(prefix), "-c", str(config),
                 "-e", str(prefix / "error.log")],
        port=port,
        log_path=prefix / "nginx.out",
    )  # fmt: skip


def env_with_home(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["L402PROXY_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env
