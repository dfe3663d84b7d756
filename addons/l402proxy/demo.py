"""The podcast demo: a sample origin, the paywall proxy in front of it, one paid download.

scripts/demo            # runs until Ctrl-C
scripts/demo --once     # walk through once and stop (what the tests run)
"""

import argparse
import asyncio
import shlex
import signal
import sys

from aiohttp import ClientSession, ClientTimeout

from . import paths
from .l402.headers import format_credential, parse_challenges
from .launch import (
    LOCALHOST,
    REPO,
    LaunchError,
    Process,
    origin_command,
    port_is_free,
    server_proxy_command,
    started,
)
from .lightning.dev import DEFAULT_CLIENT_WALLET, DevLedger


class DemoError(Exception):
    pass


async def walk_through(proxy: str, ledger_path: str) -> None:
    episode = f"{proxy}/episodes/ep1.mp3"
    timeout = ClientTimeout(total=20)
    async with ClientSession(timeout=timeout) as http:
        async with http.get(episode) as response:
            body = await response.read()
        print(f"\n1. A player that never heard of Lightning:\n   curl -s {episode}")
        print(f"   -> {response.status}: {body.decode().strip()}")

        async with http.get(episode, headers={"Accept-Authenticate": "L402"}) as response:
            challenges = parse_challenges(response.headers.getall("WWW-Authenticate", []))
            await response.read()
        if response.status != 402 or not challenges:
            raise DemoError(f"expected a 402 challenge, got {response.status}")
        challenge = challenges[0]
        print(
            "\n2. A player that says it can pay:\n"
            f"   curl -si -H 'Accept-Authenticate: L402' {episode}"
        )
        print(
            f"   -> 402 Payment Required: {challenge.scheme} challenge, invoice {challenge.invoice}"
        )

        ledger = DevLedger(ledger_path)
        try:
            payment = await ledger.pay(DEFAULT_CLIENT_WALLET, challenge.invoice, 0)
        finally:
            await ledger.close()
        print(
            "\n3. It pays the invoice (here from the dev wallet):\n"
            f"   .venv/bin/l402proxy dev pay {challenge.invoice}\n"
            f"   -> paid {payment.amount_msat // 1000} sat, preimage {payment.preimage.hex()}"
        )

        authorization = format_credential([challenge.macaroon], payment.preimage)
        async with http.get(episode, headers={"Authorization": authorization}) as response:
            body = await response.read()
        print(
            "\n4. And asks again with the token:\n"
            f"   curl -s -H {shlex.quote('Authorization: ' + authorization)} {episode}"
        )
        print(f"   -> {response.status}: {body.decode().strip()}")
        if response.status != 200:
            raise DemoError(f"the paid request failed with {response.status}")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--origin-port", type=int, default=8080)
    parser.add_argument("--proxy-port", type=int, default=8081)
    parser.add_argument("--rules", default=str(REPO / "rules" / "podcast.yaml"))
    parser.add_argument("--once", action="store_true", help="walk through once and stop")
    args = parser.parse_args(argv)
    # Ctrl-C, kill and a closed terminal all stop the children. SIGINT is set explicitly: a
    # shell starts background jobs with it ignored, and Python would keep that.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)

    home = paths.home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    for port, flag in ((args.origin_port, "--origin-port"), (args.proxy_port, "--proxy-port")):
        if not port_is_free(port):
            print(
                f"demo: port {port} on {LOCALHOST} is already in use (another demo running?); "
                f"stop it or pick another with {flag}",
                file=sys.stderr,
            )
            return 1

    origin = Process(
        "the sample origin",
        origin_command(args.origin_port),
        args.origin_port,
        home / "demo-origin.log",
    )
    proxy = Process(
        "the paywall proxy",
        server_proxy_command(origin.url, args.proxy_port, args.rules),
        args.proxy_port,
        home / "demo-proxy.log",
    )
    try:
        with started(origin, proxy):
            print(f"Sample podcast origin  {origin.url}")
            print(f"Paywall proxy          {proxy.url}  (rules: {args.rules})")
            asyncio.run(walk_through(proxy.url, paths.default_dev_ledger()))
            print(
                f"\nTokens issued:  .venv/bin/l402proxy tokens list\n"
                f"Payments:       .venv/bin/l402proxy dev invoices\n"
                f"State:          {home} (logs: demo-*.log)"
            )
            if args.once:
                return 0
            print("\nRunning; try the commands above. Ctrl-C stops everything.")
            signal.pause()
    except (DemoError, LaunchError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    print("\nStopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
