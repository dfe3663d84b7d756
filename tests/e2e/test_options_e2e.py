"""Bad l402_* options stop a real mitmdump before it serves: one line, a non-zero exit.

Before, a value mitmproxy could not convert (`l402_offer_upgrade=yes`) or a misspelt name
(`l402_rule=`) left mitmdump running with the addon silently unloaded: paywalled paths served
free, or a client proxy that never pays (or pays outside its limits).
"""

import socket
import time
from pathlib import Path

import pytest

from l402proxy.launch import ADDONS, START_TIMEOUT, client_proxy_command, server_proxy_command

from . import procs

pytestmark = pytest.mark.e2e

RULES = procs.REPO / "rules" / "podcast.yaml"
# Never contacted: the proxy must stop before it forwards anything.
NO_ORIGIN = "http://127.0.0.1:9"
PROBE = b"GET /episodes/ep1.mp3 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
# What a user sees of a failed start, without the info lines about what went well.
QUIET = "termlog_verbosity=warn"


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mitmproxy-conf")


def answered(port: int) -> bytes:
    """What the port answers to an HTTP request: b"" when nothing listens or nothing comes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(PROBE)
            return sock.recv(1024)
    except OSError:  # refused, reset, or no answer within the timeout
        return b""


def stopped_without_serving(process: procs.Process) -> list[str]:
    """Start `process` and ask its port for a page until it exits (bounded): it must exit
    non-zero and never answer. What it printed (warnings and errors only: see QUIET)."""
    process.start(wait=False)
    answers: list[bytes] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        assert process.proc is not None
        while process.proc.poll() is None and time.monotonic() < deadline:
            answers.append(answered(process.port))
            time.sleep(0.02)
        status = process.wait_exit(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        process.kill()
    log = process.log()
    assert status != 0, log
    assert not any(answers), [a for a in answers if a]
    return log.splitlines()


def proxy_process(name: str, command: list[str], port: int, home: Path) -> procs.Process:
    return procs.Process(
        name, command, port, home / f"{name}-{port}.log", procs.env_with_home(home)
    )


def server(tmp_path: Path, confdir: Path, *settings: str, rules: bool = True) -> procs.Process:
    """The server proxy as a user starts it (rules=False: the addon without l402_rules)."""
    port = procs.free_port()
    stores = [
        QUIET,
        f"confdir={confdir}",
        f"l402_store={tmp_path / 'server.sqlite'}",
        f"l402_dev_ledger={tmp_path / 'devledger.sqlite'}",
    ]
    if rules:
        command = server_proxy_command(NO_ORIGIN, port, RULES, settings=[*stores, *settings])
    else:
        bare = server_proxy_command(NO_ORIGIN, port, None, settings=[*stores, *settings])
        command = [*bare, "-s", str(ADDONS / "server.py")]
    return proxy_process("server-proxy", command, port, tmp_path)


def client(tmp_path: Path, confdir: Path, *settings: str) -> procs.Process:
    port = procs.free_port()
    stores = [
        QUIET,
        f"confdir={confdir}",
        f"l402_store={tmp_path / 'client.sqlite'}",
        f"l402_dev_ledger={tmp_path / 'devledger.sqlite'}",
    ]
    return proxy_process(
        "client-proxy", client_proxy_command(port, settings=[*stores, *settings]), port, tmp_path
    )


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        # mitmproxy cannot convert it
        (("l402_offer_upgrade=yes",), "l402: l402_offer_upgrade: 'yes' is not true or false"),
        # the addon refuses it
        (("l402_backend=carrier-pigeon://x",), "l402: l402_backend: unsupported backend URI"),
        # no such option
        (("l402_rule=other.yaml",), "l402: unknown option l402_rule (did you mean l402_rules?)"),
        (("l402_wallet=dev",), "l402: l402_wallet is a client option (addons/client.py)"),
        # mitmproxy would stream a large request body to the origin before it is judged
        (("stream_large_bodies=1k",), "l402: stream_large_bodies: not with the paywall"),
    ],
)
def test_a_bad_server_option_stops_mitmdump_before_it_serves(
    tmp_path: Path, confdir: Path, settings: tuple[str, ...], line: str
) -> None:
    lines = stopped_without_serving(server(tmp_path, confdir, *settings))
    # rules/podcast.yaml sells a private feed, which reverse mode without keep_host_header
    # cannot serve: that warning may come first, and is not about the bad option.
    lines = [text for text in lines if "sells a private feed" not in text]
    assert len(lines) == 1 and line in lines[0], lines


def test_a_server_without_rules_stops_mitmdump_before_it_serves(
    tmp_path: Path, confdir: Path
) -> None:
    lines = stopped_without_serving(server(tmp_path, confdir, rules=False))
    assert len(lines) == 1 and "l402: l402_rules: not set" in lines[0], lines


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (("l402_max_price_sat=abc",), "l402: l402_max_price_sat: 'abc' is not a whole number"),
        (("l402_max_price_sat=-1",), "l402: l402_max_price_sat must be a whole number of sat"),
        (("l402_clients=localhost",), "l402: l402_clients: 'localhost' is not an IP address"),
        (
            ("l402_max_price=5",),
            "l402: unknown option l402_max_price (did you mean l402_max_price_sat?)",
        ),
        (("l402_rules=x.yaml",), "l402: l402_rules is a server option (addons/server.py)"),
    ],
)
def test_a_bad_client_option_stops_mitmdump_before_it_serves(
    tmp_path: Path, confdir: Path, settings: tuple[str, ...], line: str
) -> None:
    lines = stopped_without_serving(client(tmp_path, confdir, *settings))
    assert len(lines) == 1 and line in lines[0], lines
