"""HTTPS through the paying client: the player trusts mitmproxy's CA, the paywall speaks TLS.

The server proxy answers TLS on its reverse-mode port with a certificate from its CA; the client
proxy checks it against that CA (`ssl_verify_upstream_trusted_ca`), reads the 402 inside the TLS
connection, pays, and its own retry goes over TLS too.
"""

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from l402proxy.launch import Process, client_proxy_command, env_with_home, free_port, started
from l402proxy.lightning.dev import DevLedger
from tests.e2e import procs

RULES = procs.REPO / "rules" / "podcast.yaml"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Process, Process, Path]]:
    home = tmp_path / "home"
    confdir = tmp_path / "conf"
    origin = procs.origin(tmp_path, home)
    port = free_port()
    origin_port = origin.port
    server = procs.server_proxy(tmp_path, home, confdir, f"http://127.0.0.1:{origin_port}", RULES)
    ca = confdir / "mitmproxy-ca-cert.pem"
    client = Process(
        name="client proxy",
        command=client_proxy_command(
            port,
            settings=[
                f"confdir={confdir}",
                f"l402_store={home / 'client.sqlite'}",
                f"l402_dev_ledger={home / 'devledger.sqlite'}",
                f"ssl_verify_upstream_trusted_ca={ca}",
            ],
        ),
        port=port,
        log_path=tmp_path / "client-proxy.log",
        env=env_with_home(home),
    )
    # The server proxy starts first: it creates the CA both proxies use.
    with started(origin, server, client):
        assert ca.exists()
        yield server, client, home


async def settled_count(home: Path) -> int:
    ledger = DevLedger(home / "devledger.sqlite")
    try:
        return sum(1 for invoice in await ledger.list_invoices() if invoice["settled"])
    finally:
        await ledger.close()


async def test_https_paywall_is_paid_through_the_client_proxy(
    chain: tuple[Process, Process, Path], tmp_path: Path
) -> None:
    server, client, home = chain
    ca = ssl.create_default_context(cafile=tmp_path / "conf" / "mitmproxy-ca-cert.pem")
    url = f"https://127.0.0.1:{server.port}/episodes/ep1.mp3"
    async with httpx.AsyncClient(proxy=client.url, verify=ca, trust_env=False, timeout=30) as http:
        first = await http.get(url)
        second = await http.get(f"https://127.0.0.1:{server.port}/episodes/ep2.mp3")
    assert first.status_code == 200, (first.headers, first.text, client.log()[-2000:])
    assert first.text == "AD-FREE episode ep1\n"
    assert first.headers["X-L402-Paid"] == "21 sat (fee 0 sat) for podcast"
    assert second.text == "AD-FREE episode ep2\n"
    assert "X-L402-Paid" not in second.headers
    assert await settled_count(home) == 1
    # No upper-case header names reached an HTTP/2 client (mitmproxy would warn about each).
    assert "Lowercased" not in client.log()
