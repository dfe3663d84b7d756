"""The podcast demo: a sample podcast with real audio, the paywall proxy in front of it and a
paying client proxy for a player or browser, all on 127.0.0.1 with the embedded defaults.

scripts/demo            # runs until Ctrl-C
scripts/demo --once     # walk through once and stop (what the tests run)
"""

import argparse
import asyncio
import contextlib
import io
import os
import re
import shlex
import signal
import socket
import sys
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from . import paths, podcast
from .launch import (
    LOCALHOST,
    REPO,
    LaunchError,
    Process,
    client_proxy_command,
    port_is_free,
    server_proxy_command,
    started,
)
from .rules import PRICED_MODES, RulesError, load_rules

DEFAULT_RULES = REPO / "rules" / "podcast.yaml"
MEDIA_FOLDER = "demo-media"
FETCH_TIMEOUT = 30.0
WALK_EPISODE = "ep1"
# A second episode fetched through the client proxy: the token bought for the first covers it.
AGAIN_EPISODE = "ep2"
TRY_EPISODE = "ep3"
EXIT_WAIT = 2.0  # how long to wait for a failing child to exit before blaming the walk-through
WATCH_SECONDS = 0.5  # how often the running demo checks that its children still run


class DemoError(Exception):
    pass


@dataclass(frozen=True)
class Ports:
    origin: int = 8080
    proxy: int = 8081
    client: int = 8082

    def named(self) -> tuple[tuple[int, str], ...]:
        return (
            (self.origin, "--origin-port"),
            (self.proxy, "--proxy-port"),
            (self.client, "--client-port"),
        )


@dataclass(frozen=True)
class Demo:
    """The three processes of the demo, in start order."""

    origin: Process
    proxy: Process
    client: Process
    home: Path

    @property
    def processes(self) -> tuple[Process, Process, Process]:
        return (self.origin, self.proxy, self.client)

    @property
    def media(self) -> Path:
        return self.home / MEDIA_FOLDER


def port_in_use(port: int, host: str = LOCALHOST) -> bool:
    """Whether a server could not listen on the port now.

    Checked the way the servers bind (SO_REUSEADDR), so connections of a demo that just stopped,
    still in TIME_WAIT, do not count as a running demo.
    """
    if port_is_free(port, host):
        return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_problem(ports: Ports) -> str | None:
    """One line saying why the demo cannot use these ports, or None."""
    seen: dict[int, str] = {}
    for port, flag in ports.named():
        if port in seen:
            return f"demo: {seen[port]} and {flag} are both {port}; give each its own port"
        seen[port] = flag
    taken = [(port, flag) for port, flag in ports.named() if port_in_use(port)]
    if len(taken) == 1:
        port, flag = taken[0]
        return (
            f"demo: port {port} on {LOCALHOST} is already in use (is another demo running?); "
            f"stop it or use {flag} N"
        )
    if taken:
        numbers = ", ".join(str(port) for port, _ in taken)
        flags = ", ".join(flag for _, flag in taken)
        return (
            f"demo: ports {numbers} on {LOCALHOST} are already in use (is another demo "
            f"running?); stop it or use {flags} N"
        )
    return None


def episode_price(rules: Path) -> int:
    """What the rules ask for an ad-free episode, for the index page's "Go ad-free" links.
    A broken file is the paywall proxy's to report (it refuses to start, naming the line)."""
    try:
        rule = load_rules(rules).match(LOCALHOST, f"/{podcast.AD_SUPPORTED}/ep1.wav", "GET")
    except RulesError:
        return podcast.DEFAULT_PRICE_SAT
    if rule is None or rule.mode not in PRICED_MODES:
        return podcast.DEFAULT_PRICE_SAT
    return rule.price_sat


def demo_processes(
    home: Path,
    ports: Ports,
    rules: Path = DEFAULT_RULES,
    *,
    env: dict[str, str] | None = None,
    confdir: Path | None = None,
) -> Demo:
    """The demo's origin, paywall proxy and client proxy, not started; state and logs in home."""
    media = home / MEDIA_FOLDER
    common = [f"l402_dev_ledger={home / 'devledger.sqlite'}"]
    if confdir is not None:
        common.append(f"confdir={confdir}")
    origin = Process(
        "the podcast origin",
        podcast.command(ports.origin, media, host=LOCALHOST, price_sat=episode_price(rules)),
        ports.origin,
        home / "demo-origin.log",
        env=env,
    )
    proxy = Process(
        "the paywall proxy",
        server_proxy_command(
            origin.url,
            ports.proxy,
            rules,
            settings=[
                *common,
                f"l402_store={home / 'server.sqlite'}",
                # The origin sees the Host players asked for, so the feed's episode links point
                # at this proxy rather than past it at the origin.
                "keep_host_header=true",
            ],
        ),
        ports.proxy,
        home / "demo-proxy.log",
        env=env,
    )
    client = Process(
        "the client proxy",
        client_proxy_command(
            ports.client,
            settings=[
                *common,
                f"l402_store={home / 'client.sqlite'}",
                # A demo wallet pays the demo paywall and nothing else a browser visits.
                f"l402_allow={LOCALHOST}:{ports.proxy}",
            ],
        ),
        ports.client,
        home / "demo-client.log",
        env=env,
    )
    return Demo(origin, proxy, client, home)


def _get(url: str, proxy: str | None = None) -> httpx.Response:
    try:
        with httpx.Client(proxy=proxy, trust_env=False, timeout=FETCH_TIMEOUT) as http:
            return http.get(url)
    except httpx.HTTPError as exc:
        via = f" through {proxy}" if proxy else ""
        raise DemoError(f"fetching {url}{via} failed: {exc or type(exc).__name__}") from exc


def _seconds(content: bytes) -> float:
    """Seconds of audio in a WAV body; 0 when it is none."""
    try:
        with wave.open(io.BytesIO(content), "rb") as wav:
            return wav.getnframes() / wav.getframerate()
    except (wave.Error, EOFError):
        return 0.0


def walk_through(demo: Demo) -> list[str]:
    """Fetch an episode as a plain player and through the client proxy; lines telling what came."""
    path = f"/{podcast.AD_SUPPORTED}/{WALK_EPISODE}.wav"
    url = demo.proxy.url + path
    with_ad = podcast.media_path(demo.media, podcast.AD_SUPPORTED, WALK_EPISODE).read_bytes()
    ad_free = podcast.media_path(demo.media, podcast.AD_FREE, WALK_EPISODE).read_bytes()

    plain = _get(url)
    if plain.status_code != 200 or plain.content != with_ad:
        raise DemoError(
            f"a plain player got {plain.status_code} with {len(plain.content)} bytes from {url}, "
            f"not the ad-supported episode ({len(with_ad)} bytes); see {demo.home / 'demo-*.log'}"
        )
    paying = _get(url, demo.client.url)
    if paying.status_code != 200 or paying.content != ad_free:
        refused = paying.headers.get("X-L402-Refused")
        raise DemoError(
            f"through the client proxy {url} gave {paying.status_code} with "
            f"{len(paying.content)} bytes, not the ad-free episode"
            + (f" (X-L402-Refused: {refused})" if refused else "")
            + f"; see {demo.home / 'demo-*.log'}"
        )
    paid = paying.headers.get("X-L402-Paid")
    cost = f"X-L402-Paid: {paid}" if paid else "a token bought earlier, nothing paid now"
    again_url = f"{demo.proxy.url}/{podcast.AD_SUPPORTED}/{AGAIN_EPISODE}.wav"
    again = _get(again_url, demo.client.url)
    again_free = podcast.media_path(demo.media, podcast.AD_FREE, AGAIN_EPISODE).read_bytes()
    if again.status_code != 200 or again.content != again_free:
        raise DemoError(f"through the client proxy {again_url} was not the ad-free episode")
    again_cost = (
        f"X-L402-Paid: {again.headers['X-L402-Paid']}"
        if "X-L402-Paid" in again.headers
        else "same token, nothing paid"
    )
    ad_seconds = _seconds(with_ad) - _seconds(ad_free)

    def row(label: str, response: httpx.Response, note: str) -> str:
        body = response.content
        return (
            f"  {label:<28}{response.status_code}  {len(body):>9,} bytes  "
            f"{_seconds(body):4.1f} s  {note}"
        )

    return [
        f"Walk-through ({url}):",
        row(
            f"plain player, {WALK_EPISODE}",
            plain,
            f"with the ad ({ad_seconds:.1f} s, {len(with_ad) - len(ad_free):,} bytes more)",
        ),
        row(f"via the client proxy, {WALK_EPISODE}", paying, f"ad-free; {cost}"),
        row(f"via the client proxy, {AGAIN_EPISODE}", again, f"ad-free; {again_cost}"),
    ]


def _held_credential(demo: Demo) -> str:
    """The token the client proxy bought in the walk-through, from its wallet's store, as an
    Authorization value."""
    from .store.client import ClientStore

    async def read() -> str | None:
        store = await ClientStore.open(str(demo.home / "client.sqlite"))
        try:
            for payment in await store.tokens(time.time()):
                if "podcast" in payment.services and payment.preimage is not None:
                    return f"{payment.scheme} {payment.macaroon}:{payment.preimage.hex()}"
        finally:
            await store.close()
        return None

    try:
        found = asyncio.run(read())
    except Exception as exc:
        raise DemoError(f"reading the client proxy's token failed: {exc}") from exc
    if found is None:
        raise DemoError("the client proxy holds no token for the podcast service")
    return found


def private_feed(demo: Demo) -> list[str]:
    """Subscribe ad-free as a podcast app does: the token bought above gives a private feed URL
    (POST /.l402/feed; the paywall page shows the same after paying), with the rules'
    `feed: /feed.xml`; that feed, and an episode through it, as a podcast app gets them."""
    url = f"{demo.proxy.url}/.l402/feed"
    try:
        with httpx.Client(trust_env=False, timeout=FETCH_TIMEOUT) as http:
            minted = http.post(url, headers={"Authorization": _held_credential(demo)})
    except httpx.HTTPError as exc:
        raise DemoError(f"asking {url} for the private feed failed: {exc}") from exc
    feed_url = minted.json().get("feed_url") if minted.status_code == 200 else None
    if not isinstance(feed_url, str):
        raise DemoError(
            f"{url} gave no private feed ({minted.status_code}): the podcast service in the "
            "rules needs feed: /feed.xml"
        )
    base = feed_url.rsplit("/", 1)[0]
    feed = _get(feed_url)
    enclosures = re.findall(r'<enclosure url="([^"]+)"', feed.text)
    if (
        feed.status_code != 200
        or not enclosures
        or not all(link.startswith(base + "/") for link in enclosures)
    ):
        raise DemoError(
            f"the private feed answered {feed.status_code} with {len(enclosures)} episode(s) "
            f"not under its own address; see {demo.home / 'demo-*.log'}"
        )
    episode = _get(enclosures[0])
    ad_free = podcast.media_path(demo.media, podcast.AD_FREE, WALK_EPISODE).read_bytes()
    if episode.status_code != 200 or episode.content != ad_free:
        raise DemoError(f"the private feed's first episode was not the ad-free {WALK_EPISODE}")
    return [
        "Subscribe ad-free (the same token, as a podcast app uses it):",
        f"  {'private feed':<28}{feed.status_code}  {len(feed.content):>9,} bytes  "
        f"{len(enclosures)} episodes, each at the feed's own address",
        f"  {'its ' + WALK_EPISODE:<28}{episode.status_code}  {len(episode.content):>9,} bytes  "
        f"{_seconds(episode.content):4.1f} s  ad-free",
        f"  paste into a podcast app: {feed_url}",
    ]


def exited(demo: Demo, wait: float = 0.0) -> DemoError | None:
    """A process of the demo that has stopped (waiting up to `wait` s for one to), as an error
    naming it and the reason its log gives."""
    deadline = time.monotonic() + wait
    while True:
        for process in demo.processes:
            code = process.proc.poll() if process.proc is not None else None
            if code is not None:
                return DemoError(
                    f"{process.name} stopped (exit status {code}){_reason(process.log())}; "
                    f"log {process.log_path}"
                )
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


STARTUP_FAILED = "Error logged during startup"  # mitmdump's last word on a bad option
LISTENING = " listening at "  # mitmdump's line once a proxy mode listens
TRACEBACK_PARTS = ("Traceback", "File ", "During handling", "^")


def _reason(log: str) -> str:
    """The line of a child's log that says why it stopped, without mitmproxy's timestamp."""
    lines = [re.sub(r"^\[[\d:.]+\]\s*", "", line).strip() for line in log.splitlines()]
    wanted = ("error",)
    if any(line.startswith(STARTUP_FAILED) for line in lines):
        # What our addon logged at start; whatever mitmproxy prints while exiting is noise.
        lines = lines[: next(i for i, line in enumerate(lines) if line.startswith(STARTUP_FAILED))]
        wanted = ("l402:", "error")
    elif not any(LISTENING in line for line in lines):
        # Stopped before it listened: our addon's refusal ("l402: l402_rules: ...: No such
        # file or directory") is the reason, whether or not mitmproxy adds its own last word.
        wanted = ("l402:", "error")
    for word in wanted:
        for line in reversed(lines):
            if word in line.lower() and not line.startswith(TRACEBACK_PARTS):
                return f": {line}"
    return ""


def _one_line(exc: LaunchError) -> str:
    """launch.py's "<name> exited with status N; log <path>:" + the log's tail, as one line."""
    first, _, log = str(exc).partition("\n")
    match = re.fullmatch(r"(.*?); log (.+):", first)
    if match is None:
        return first
    return f"{match[1]}{_reason(log)}; log {match[2]}"


def _shown(path: Path) -> str:
    """A path as a person would type it: relative to here or ~ when shorter."""
    path = path.resolve()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        if path.is_relative_to(base) and path != base:
            return prefix + str(path.relative_to(base))
    return str(path)


def _for_shell(path: Path) -> str:
    """A path for a command line: "$HOME/..." under the home folder (a quoted ~ would not
    expand), else quoted as it is."""
    path = path.resolve()
    home = Path.home().resolve()
    if path.is_relative_to(home) and path != home:
        relative = str(path.relative_to(home))
        if shlex.quote(relative) == relative:
            return f'"$HOME/{relative}"'
    return shlex.quote(str(path))


def _cli_command() -> str:
    installed = Path(sys.executable).parent / "l402proxy"
    command = _shown(installed) if installed.exists() else f"{sys.executable} -m l402proxy"
    if "L402PROXY_HOME" in os.environ:
        command = f"L402PROXY_HOME={_for_shell(paths.home())} {command}"
    return command


def _try_rows(demo: Demo) -> list[str]:
    """What to try against the running servers, one labelled row each."""
    proxy, client = demo.proxy.url, demo.client.url
    # curl applies NO_PROXY even to -x; an empty --noproxy list overrides it.
    noproxy = " --noproxy ''" if os.environ.get("NO_PROXY") or os.environ.get("no_proxy") else ""
    episode = f"{proxy}/{podcast.AD_SUPPORTED}/{TRY_EPISODE}.wav"
    browser = (
        # Its own profile: a chromium already running would open the page without the proxy.
        f"chromium --user-data-dir={_for_shell(demo.home / 'demo-browser')} "
        f"--proxy-server={client} --proxy-bypass-list='<-loopback>' {proxy}/"
    )
    rows = [
        ("with the ad", f"curl -s -D - -o ad.wav {episode}"),
        ("ad-free", f"curl -s -D - -o adfree.wav -x {client}{noproxy} {episode}"),
        ("", "(nothing more to pay: the token bought above covers every episode)"),
        ("in a browser", f"{proxy}/ through the client proxy {client}, e.g."),
        ("", browser),
        ("podcast feed", f"{proxy}/feed.xml (a player set to the client proxy gets it ad-free)"),
        (
            "ad-free feed",
            f"{proxy}{podcast.subscribe_link()} in a browser: pay, then paste the private "
            "feed URL it shows into any podcast app",
        ),
        ("what was paid", f"{_cli_command()} wallet history"),
        (
            "tokens, payments",
            f"{_shown(demo.home)}: client.sqlite, server.sqlite, devledger.sqlite; logs demo-*.log",
        ),
    ]
    return [f"  {label:<18}{text}".rstrip() for label, text in rows]


def try_lines(demo: Demo) -> list[str]:
    """What to try now, the servers running."""
    return ["Try:", *_try_rows(demo)]


def rerun_command(ports: Ports, rules: Path) -> str:
    """scripts/demo with this run's ports and rules, without --once."""
    words = [_shown(REPO / "scripts" / "demo")]
    for (port, flag), (default, _) in zip(ports.named(), Ports().named(), strict=True):
        if port != default:
            words += [flag, str(port)]
    if rules.resolve() != DEFAULT_RULES.resolve():
        words += ["--rules", _for_shell(rules)]
    return " ".join(words)


def once_lines(demo: Demo, rerun: str) -> list[str]:
    """After --once: the servers are gone, so no "Try:" with their addresses as if they were
    there; what to run to keep them, and what to try then."""
    return [
        "--once: the servers are stopped. To keep them running and try them yourself, run",
        f"  {rerun}",
        "and then:",
        *_try_rows(demo),
    ]


def banner(demo: Demo, rules: Path) -> list[str]:
    return [
        "l402proxy podcast demo (dev ledger: play money on this machine, no Lightning node)",
        f"  podcast origin  {demo.origin.url}  real audio in {_shown(demo.media)}",
        f"  paywall proxy   {demo.proxy.url}  rules {_shown(rules)}",
        f"  client proxy    {demo.client.url}  dev wallet, pays only {LOCALHOST}:{demo.proxy.port}",
    ]


class _Signals:
    """The first SIGINT/SIGTERM/SIGHUP ends the demo; later ones cannot cut the cleanup short."""

    def __init__(self) -> None:
        self.stopping = False

    def install(self) -> None:
        # SIGINT is set explicitly: a shell starts background jobs with it ignored, and Python
        # would keep that.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise KeyboardInterrupt


def _say(lines: Sequence[str] = ("",)) -> None:
    # A closed terminal (SIGHUP) or pipe must not turn the shutdown into a traceback.
    with contextlib.suppress(OSError):
        print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("--origin-port", type=int, default=Ports.origin, metavar="N")
    parser.add_argument("--proxy-port", type=int, default=Ports.proxy, metavar="N")
    parser.add_argument("--client-port", type=int, default=Ports.client, metavar="N")
    parser.add_argument("--rules", type=Path, default=DEFAULT_RULES, help="the paywall's rules")
    parser.add_argument("--once", action="store_true", help="walk through once and stop")
    args = parser.parse_args(argv)
    ports = Ports(args.origin_port, args.proxy_port, args.client_port)
    for port, flag in ports.named():
        if not 0 < port < 65536:
            parser.error(f"{flag} must be 1-65535, not {port}")
    signals = _Signals()
    signals.install()
    try:
        return _run(ports, args.rules.resolve(), args.once, signals)
    except KeyboardInterrupt:
        pass
    _say(["", "Stopped."])
    return 0


def _run(ports: Ports, rules: Path, once: bool, signals: _Signals) -> int:
    problem = port_problem(ports)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    home = paths.home()
    media = home / MEDIA_FOLDER
    # Made here, before anything starts, so a problem with the folder is one clear line; the
    # origin checks the files again when it starts.
    demo = demo_processes(home, ports, rules)
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        podcast.ensure_media(media)
        for process in demo.processes:
            process.log_path.write_bytes(b"")  # each run's own log: errors quoted are this run's
    except OSError as exc:
        print(f"demo: cannot write under {home}: {exc}", file=sys.stderr)
        return 1
    _say(banner(demo, rules))
    try:
        with started(*demo.processes):
            try:
                try:
                    walked = [*walk_through(demo), "", *private_feed(demo)]
                except DemoError as exc:
                    # A child that stops right after it started listening (mitmdump does, on a
                    # bad option) is the real story, not the refused connection.
                    raise exited(demo, wait=EXIT_WAIT) or exc from None
                _say()
                _say(walked)
                if not once:
                    _say()
                    _say(try_lines(demo))
                    _say(["", "Running. Ctrl-C stops everything."])
                    while (stopped := exited(demo)) is None:
                        time.sleep(WATCH_SECONDS)
                    raise stopped
            finally:
                # The cleanup that follows runs to its end, whatever signal comes.
                signals.stopping = True
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except LaunchError as exc:
        print(f"demo: {_one_line(exc)}", file=sys.stderr)
        return 1
    # Only --once gets here (a running demo ends by a signal or a stopped child), and only
    # now, `started` having stopped them, is it true that the servers are stopped.
    _say(["", *once_lines(demo, rerun_command(ports, rules))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
