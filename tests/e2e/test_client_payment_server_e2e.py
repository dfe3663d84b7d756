"""Issue 16 with both real sides: the paying client proxy (mitmdump -s addons/client.py) and the
Python SDK against the real server door (mitmdump -s addons/server.py) selling with the Payment
scheme, in front of the sample origin. tests/e2e/test_client_payment_e2e.py covers the client's
checks against a stand-in that can misbehave; here both sides are ours, and what each did is read
from the dev ledger they share, the client's history and the server's token list.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from l402proxy.launch import started
from l402proxy.sdk import L402Auth

from . import procs
from .test_client_payment_e2e import Clients, World, cli_json, get, settled, tail

pytestmark = pytest.mark.e2e

PRICE_SAT = 21
RULES = f"""\
invoice_limit: {{requests: 1000, per: 1m, burst: 1000}}
services:
  - name: charged
    match: {{path: "/episodes/*"}}
    price_sat: {PRICE_SAT}
    schemes: [payment]
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
  - name: both
    match: {{path: "/bonus/*"}}
    price_sat: {PRICE_SAT}
    schemes: [l402, payment]
"""


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("client-payment-server")
    home = work / "home"
    home.mkdir()
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    confdir = work / "mitmproxy-conf"
    origin = procs.origin(work, home)
    with started(origin):
        server = procs.server_proxy(work, home, confdir, origin.url, rules)
        with started(server):
            yield World(work, home, confdir, server)


@pytest.fixture
def clients(shop: World, tmp_path: Path) -> Iterator[Clients]:
    running = Clients(shop, tmp_path)
    yield running
    running.stop()


def test_the_proxy_pays_the_real_server_one_charge_per_request(
    shop: World, clients: Clients
) -> None:
    store = clients.work / "client.sqlite"
    client = clients.start()
    paid_before = settled(shop.home)
    answers = [get(client, shop.url("/episodes/ep1.mp3")) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200], tail(client) + tail(shop.server)
    # The paid variant (the ad-free file), a receipt each, and each request paid its own.
    assert all(b"AD-FREE" in a.content for a in answers)
    assert all("Payment-Receipt" in a.headers for a in answers)
    assert all(a.headers["X-L402-Paid"].startswith(f"{PRICE_SAT} sat") for a in answers)
    new = settled(shop.home) - paid_before
    assert len(new) == 2
    history = cli_json(shop.home, "wallet", "history", "--store", str(store))
    paid = [e for e in history if e["event"] == "paid"]
    assert {e["payment_hash"] for e in paid} == new
    assert all(e["scheme"] == "Payment" for e in paid)
    assert all(e["receipt"]["reference"] == e["payment_hash"] for e in paid)
    # The server sold two charges, one row per invoice.
    sold = cli_json(shop.home, "tokens", "list", "--service", "charged")
    assert {t["payment_hash"] for t in sold if t["status"] == "paid"} >= new


def test_a_server_offering_both_is_paid_with_l402_unless_payment_is_preferred(
    shop: World, clients: Clients
) -> None:
    default = clients.start(store=clients.work / "default.sqlite")
    paid_before = settled(shop.home)
    for n in range(2):
        assert get(default, shop.url(f"/bonus/b{n}.mp3")).status_code == 200, tail(default)
    assert len(settled(shop.home) - paid_before) == 1  # one token opens both
    tokens = cli_json(
        shop.home, "wallet", "tokens", "--store", str(clients.work / "default.sqlite")
    )
    assert len(tokens) == 1

    preferring = clients.start("l402_prefer=payment", store=clients.work / "payment.sqlite")
    paid_before = settled(shop.home)
    for n in range(2):
        assert get(preferring, shop.url(f"/bonus/p{n}.mp3")).status_code == 200, tail(preferring)
    assert len(settled(shop.home) - paid_before) == 2  # a charge each


def test_the_sdk_pays_the_real_server(shop: World, tmp_path: Path) -> None:
    paid_before = settled(shop.home)
    with (
        L402Auth(
            store=str(tmp_path / "sdk.sqlite"),
            dev_ledger=str(shop.home / "devledger.sqlite"),
        ) as auth,
        httpx.Client(auth=auth, trust_env=False, timeout=30) as http,
    ):
        first = http.get(shop.url("/episodes/ep2.mp3"))
        second = http.get(shop.url("/episodes/ep2.mp3"))
    for answer in (first, second):
        assert answer.status_code == 200 and b"AD-FREE" in answer.content, answer.headers
        assert "Payment-Receipt" in answer.headers
    assert len(settled(shop.home) - paid_before) == 2
