"""The demo (`python -m l402proxy.demo`, what scripts/demo runs) as a user runs it: its output,
the audio it makes, its port check, and that Ctrl-C stops everything it started."""

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy import podcast
from l402proxy.launch import REPO, env_with_home, free_port

from . import procs

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 120.0
READY_TIMEOUT = 90.0
EXIT_TIMEOUT = 60.0
RUNNING_LINE = "Running. Ctrl-C stops everything."


def demo_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    env = env_with_home(home)
    # mitmproxy keeps its CA under ~/.mitmproxy: keep that in the test's folder too.
    env["HOME"] = str(tmp_path)
    return env


def demo_command(ports: tuple[int, int, int], *extra: str) -> list[str]:
    origin, proxy, client = ports
    return [
        sys.executable, "-m", "l402proxy.demo",
        "--origin-port", str(origin), "--proxy-port", str(proxy), "--client-port", str(client),
        *extra,
    ]  # fmt: skip


def three_ports() -> tuple[int, int, int]:
    ports: set[int] = set()
    for _ in range(20):
        ports.add(free_port())
        if len(ports) == 3:
            break
    origin, proxy, client = sorted(ports)
    return origin, proxy, client


def refuses(port: int) -> bool:
    """Nothing listens on the port any more (a connect, not a bind: TIME_WAIT does not count)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def children_of(pid: int) -> list[int]:
    """Process ids whose parent is pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the parent id follows it.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@dataclass(frozen=True)
class Wav:
    channels: int
    width: int
    rate: int
    frames: bytes

    @property
    def count(self) -> int:
        return len(self.frames) // (self.channels * self.width)


def read_wav(path: Path) -> Wav:
    with wave.open(str(path), "rb") as wav:
        return Wav(
            wav.getnchannels(),
            wav.getsampwidth(),
            wav.getframerate(),
            wav.readframes(wav.getnframes()),
        )


def test_once_walks_through_prints_what_to_try_and_makes_real_audio(tmp_path: Path) -> None:
    ports = three_ports()
    origin, proxy, client = ports
    env = demo_env(tmp_path)
    # curl skips even a -x proxy for hosts in NO_PROXY: the ad-free line must override it.
    env["NO_PROXY"] = "127.0.0.1,localhost"
    home = Path(env["L402PROXY_HOME"])
    result = subprocess.run(
        demo_command(ports, "--once"),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=RUN_TIMEOUT,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in out + result.stderr

    # The walk-through's real results.
    assert re.search(r"plain player, ep1 +200 +[\d,]+ bytes +[\d.]+ s +with the ad", out), out
    assert "X-L402-Paid: 21 sat (fee 0 sat) for podcast" in out
    assert "same token, nothing paid" in out
    # The servers are gone after --once: no "Try:" as if they were there, but the command that
    # keeps them running, then the try-lines with the ports it was given.
    lines = out.splitlines()
    assert "Try:" not in lines
    assert lines[lines.index("and then:") - 2 :][:2] == [
        "--once: the servers are stopped. To keep them running and try them yourself, run",
        f"  scripts/demo --origin-port {origin} --proxy-port {proxy} --client-port {client}",
    ]
    try_part = "\n".join(lines[lines.index("and then:") :])
    assert f"curl -s -D - -o ad.wav http://127.0.0.1:{proxy}/episodes/" in try_part
    assert (
        f"-x http://127.0.0.1:{client} --noproxy '' http://127.0.0.1:{proxy}/episodes/" in try_part
    )
    assert (
        f"--proxy-server=http://127.0.0.1:{client} --proxy-bypass-list='<-loopback>' "
        f"http://127.0.0.1:{proxy}/" in try_part
    )
    assert f"http://127.0.0.1:{proxy}/feed.xml" in try_part
    assert "l402proxy wallet history" in try_part
    assert "nothing more to pay: the token bought above covers every episode" in try_part
    assert "client.sqlite, server.sqlite, devledger.sqlite" in try_part
    assert f"http://127.0.0.1:{origin}" in out
    assert lines[-1].startswith("  tokens, payments  ")

    # Real audio: valid WAV, mono 16-bit, 8-16 kHz; the ad-supported copy is the ad jingle
    # followed by exactly the ad-free copy.
    media = home / "demo-media"
    for episode in podcast.EPISODES:
        free = read_wav(media / "adfree" / f"{episode.name}.wav")
        with_ad = read_wav(media / "episodes" / f"{episode.name}.wav")
        bonus = read_wav(media / "bonus" / f"{episode.name}.wav")
        for wav in (free, with_ad, bonus):
            assert (wav.channels, wav.width) == (1, 2)
            assert 8000 <= wav.rate <= 16000
            assert wav.count >= 2 * wav.rate  # a few seconds, not a blip
            assert wav.frames.strip(b"\0"), "silence"
        assert with_ad.count - free.count == podcast.ad_frames()
        assert podcast.ad_frames() >= 2 * with_ad.rate  # a ~2 s jingle
        assert with_ad.frames.endswith(free.frames)
        jingle = with_ad.frames[: len(with_ad.frames) - len(free.frames)]
        assert jingle.strip(b"\0"), "the ad is silence"

    # One paid download, in the ledger where the output says payments are kept.
    settled = [i for i in procs.ledger_invoices(home) if i["settled"]]
    assert [i["amount_msat"] for i in settled] == [21_000]
    assert (home / "client.sqlite").exists() and (home / "server.sqlite").exists()
    assert (home / "demo-proxy.log").exists() and (home / "demo-client.log").exists()


def test_a_child_that_cannot_start_is_one_line_and_the_rest_is_stopped(tmp_path: Path) -> None:
    ports = three_ports()
    missing = tmp_path / "no-such-rules.yaml"
    result = subprocess.run(
        demo_command(ports, "--once", "--rules", str(missing)),
        capture_output=True,
        text=True,
        env=demo_env(tmp_path),
        cwd=REPO,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    # Whether mitmdump exits before or just after it listens, the same one line.
    assert re.match(
        r"demo: the paywall proxy (stopped \(exit status|exited with status) 1", message
    )
    assert f"{missing}: cannot read rules file" in message
    assert all(refuses(port) for port in ports)


@dataclass
class Running:
    process: subprocess.Popen[str]
    lines: list[str]  # what it printed so far, filled in by a reader thread
    ports: tuple[int, int, int]
    children: list[int]


@pytest.fixture
def first_demo(tmp_path: Path) -> Iterator[Running]:
    """A demo running until signalled; stopped (and its children killed) whatever happens."""
    ports = three_ports()
    process = subprocess.Popen(
        demo_command(ports),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_env(tmp_path),
        cwd=REPO,
    )
    lines: list[str] = []
    ready: queue.Queue[bool] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == RUNNING_LINE:
                ready.put(True)
        ready.put(False)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    children: list[int] = []
    try:
        try:
            started = ready.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            started = False
        assert started, "the demo did not get running:\n" + "\n".join(lines)
        children.extend(children_of(process.pid))
        yield Running(process, lines, ports, children)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=EXIT_TIMEOUT)
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        reader.join(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_demo_fails_on_the_port_and_a_signal_stops_everything(
    first_demo: Running, tmp_path: Path, signum: int
) -> None:
    process, lines, children = first_demo.process, first_demo.lines, first_demo.children
    origin, proxy, client = first_demo.ports
    assert "Try:" in lines
    assert len(children) == 3, children

    # The running demo serves the feed and the page through the paywall proxy.
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        feed = http.get(f"http://127.0.0.1:{proxy}/feed.xml")
        page = http.get(f"http://127.0.0.1:{proxy}/")
        part = http.get(
            f"http://127.0.0.1:{proxy}/episodes/ep2.wav", headers={"Range": "bytes=0-99"}
        )
        # The ad-free files are sold, not served to anyone who knows their address.
        direct = http.get(f"http://127.0.0.1:{proxy}/adfree/ep2.wav")
    assert feed.status_code == 200
    enclosures = re.findall(r'<enclosure url="([^"]+)" type="audio/wav" length="(\d+)"', feed.text)
    assert [url for url, _ in enclosures] == [
        f"http://127.0.0.1:{proxy}/episodes/{e.name}.wav" for e in podcast.EPISODES
    ]
    assert page.status_code == 200
    assert direct.status_code == 404 and b"RIFF" not in direct.content
    # Players and <audio> ask for ranges.
    assert part.status_code == 206
    assert part.headers["Content-Type"] == "audio/wav"
    assert part.content[:4] == b"RIFF" and len(part.content) == 100
    for episode in podcast.EPISODES:
        assert f'<audio controls preload="none" src="/episodes/{episode.name}.wav">' in page.text
        assert f'href="/.l402/pay?path=/episodes/{episode.name}.wav&amp;return=/"' in page.text
    assert "Go ad-free for 21 sats" in page.text

    # A second demo on the same ports: one clear line, no traceback, nothing started.
    second = subprocess.run(
        demo_command((origin, proxy, client)),
        capture_output=True,
        text=True,
        env=demo_env(tmp_path / "second"),
        cwd=REPO,
        timeout=RUN_TIMEOUT,
    )
    assert second.returncode == 1
    assert "Traceback" not in second.stdout + second.stderr
    message = second.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "already in use (is another demo running?)" in message
    assert str(proxy) in message and "--proxy-port" in message
    assert children_of(process.pid) == children  # the first demo is untouched

    # The signal stops the first one and everything it started.
    process.send_signal(signum)
    assert process.wait(timeout=EXIT_TIMEOUT) == 0
    deadline = time.monotonic() + 10
    while "Stopped." not in lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines[-1] == "Stopped.", lines
    assert not [pid for pid in children if alive(pid)]
    assert all(refuses(port) for port in (origin, proxy, client))


def test_media_is_deterministic_and_remade_when_missing_or_damaged(tmp_path: Path) -> None:
    first = podcast.ensure_media(tmp_path / "a")
    second = podcast.ensure_media(tmp_path / "b")
    assert len(first) == len(podcast.KINDS) * len(podcast.EPISODES)
    originals = {key: path.read_bytes() for key, path in first.items()}
    assert originals == {key: path.read_bytes() for key, path in second.items()}
    assert len(set(originals.values())) == len(originals)  # every file distinct

    damaged = first["episodes", "ep2"]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    first["adfree", "ep3"].unlink()
    podcast.ensure_media(tmp_path / "a")
    assert {key: path.read_bytes() for key, path in first.items()} == originals
    assert not list((tmp_path / "a").rglob("*.partial"))


def test_a_child_that_dies_while_running_stops_the_demo(first_demo: Running) -> None:
    process, lines, children = first_demo.process, first_demo.lines, first_demo.children
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
    origin = next(pid for pid, command in commands.items() if b"l402proxy.podcast" in command)

    os.kill(origin, signal.SIGKILL)
    assert process.wait(timeout=EXIT_TIMEOUT) == 1
    deadline = time.monotonic() + 10
    while not any(line.startswith("demo: ") for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "demo: the podcast origin stopped (exit status -9); log " in "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)
    assert not [pid for pid in children if alive(pid)]
    assert all(refuses(port) for port in first_demo.ports)
