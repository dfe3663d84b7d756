"""Real Debian nginx for the end-to-end tests: started with everything of its own under a temp
prefix, always stopped; and the nginx door (serve-auth + nginx) started from the two CLI
commands exactly as a user types them."""

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from l402proxy.launch import START_TIMEOUT, LaunchError, nginx_main_config, started
from tests.conftest import require

from . import procs

__all__ = [
    "NGINX",
    "door_config",
    "nginx_binary",
    "nginx_door",
    "nginx_origin",
    "running_nginx",
    "serve_auth",
]

NGINX = "/usr/sbin/nginx"


def nginx_binary() -> str:
    """The system's nginx; a test that needs it skips without it (fails in CI)."""
    nginx = NGINX if Path(NGINX).exists() else shutil.which("nginx")
    require(nginx is not None, f"nginx ({NGINX}; apt-get install nginx)")
    assert nginx is not None
    return nginx


@contextlib.contextmanager
def running_nginx(workdir: Path, http_conf: str) -> Iterator[None]:
    """nginx with `http_conf` inside http { }, in a fresh prefix under workdir; stopped after
    (also when the test fails). LaunchError with nginx's error log if it does not start."""
    nginx = nginx_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir=workdir))
    config = prefix / "nginx.conf"
    config.write_text(nginx_main_config(prefix, http_conf))
    command = [nginx, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    checked = subprocess.run(
        [*command, "-t", "-q"], capture_output=True, text=True, timeout=START_TIMEOUT
    )
    if checked.returncode != 0:
        raise LaunchError(f"nginx -t refused {config}:\n{checked.stderr[-4000:]}")
    process = procs.Process(name="nginx", command=command, port=0, log_path=prefix / "nginx.out")
    with started_listening(process, prefix, listen_addresses(http_conf)):
        yield


def listen_addresses(http_conf: str) -> list[tuple[str, int]]:
    """The (host, port) pairs the config's `listen` directives name (tests listen on
    127.0.0.1 or [::1] with a port)."""
    found = []
    for value in re.findall(r"\blisten\s+([^\s;]+)", http_conf):
        host, _, port = value.rpartition(":")
        found.append((host.strip("[]") or "127.0.0.1", int(port)))
    return found


@contextlib.contextmanager
def started_listening(
    process: procs.Process, prefix: Path, addresses: list[tuple[str, int]]
) -> Iterator[None]:
    """Start nginx and wait until it accepts connections on every address (its pid file comes
    before that); stop it on the way out, whatever happened (also when it never got ready)."""
    process.start(wait=False)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(addresses)
        while waiting:
            assert process.proc is not None
            if process.proc.poll() is not None or time.monotonic() > deadline:
                error_log = prefix / "error.log"
                text = error_log.read_text(errors="replace") if error_log.exists() else ""
                raise LaunchError(f"nginx did not start; error log:\n{text[-4000:]}")
            with contextlib.suppress(OSError), socket.create_connection(waiting[0], timeout=0.5):
                waiting.pop(0)
                continue
            time.sleep(0.05)
        yield
    finally:
        process.stop()


@contextlib.contextmanager
def nginx_origin(root: Path) -> Iterator[str]:
    """The system's nginx serving static files from `root`; yields its URL."""
    port = procs.free_port()
    conf = f"""
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
"""
    with running_nginx(root.parent, conf):
        yield f"http://127.0.0.1:{port}"


# -- the nginx door ----------------------------------------------------------------------------


def l402proxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "l402proxy", *args]


def serve_auth(workdir: Path, home: Path, rules: Path | str, *args: str) -> procs.Process:
    """`l402proxy serve-auth` on a free port (not started)."""
    port = procs.free_port()
    return procs.Process(
        name="serve-auth",
        command=l402proxy_command(
            "serve-auth", "--listen", f"127.0.0.1:{port}", "--rules", str(rules), *args
        ),
        port=port,
        log_path=workdir / f"serve-auth-{port}.log",
        env=procs.env_with_home(home),
    )


def door_config(home: Path, auth: procs.Process, origin_url: str, port: int, *args: str) -> str:
    """What `l402proxy nginx-config` prints for this door (asking the running serve-auth
    which headers the rules set, unless args say otherwise)."""
    made = procs.cli(
        home,
        "nginx-config",
        "--auth", f"127.0.0.1:{auth.port}",
        "--upstream", origin_url,
        "--listen", f"127.0.0.1:{port}",
        # Each nginx its own verdict cache (the default is one per --name, in /run).
        "--verdict-cache-dir", str(Path(tempfile.mkdtemp(prefix="verdicts-", dir=home))),
        *args,
    )  # fmt: skip
    if made.returncode != 0:
        raise LaunchError(f"l402proxy nginx-config failed: {made.stderr.strip()}")
    return made.stdout


@contextlib.contextmanager
def nginx_door(
    workdir: Path,
    home: Path,
    rules: Path,
    origin_url: str,
    *serve_auth_args: str,
    config_args: Sequence[str] = (),
) -> Iterator[str]:
    """serve-auth and nginx in front of `origin_url`, as a user starts them (`config_args`
    go to nginx-config); yields the door's base URL. Both are stopped after."""
    nginx_binary()
    auth = serve_auth(workdir, home, rules, *serve_auth_args)
    with started(auth):
        port = procs.free_port()
        with running_nginx(workdir, door_config(home, auth, origin_url, port, *config_args)):
            yield f"http://127.0.0.1:{port}"
