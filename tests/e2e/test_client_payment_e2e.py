"""The paying client proxy (mitmdump -s addons/client.py) and the Python SDK against a server that
sells with the Payment scheme (issue 16): the stand-in tests/payment_server.py, run as a process
of its own (`python -m tests.payment_server`) until the engine speaks Payment. Both share one dev
ledger file, so what was paid is read from the ledger; `GET /_state` says what the server saw.

When the engine offers Payment challenges, these tests should run against procs.server_proxy with
a rules file (`schemes: [payment]`, `[l402, payment]`) in front of the sample origin instead; the
assertions on the client's side stay as they are.
"""

import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.l402.payment import decode_credential
from l402proxy.payer import ACCEPT_PAYMENT
from l402proxy.sdk import L402Auth

from . import procs
from .test_options_e2e import client as bare_client
from .test_options_e2e import stopped_without_serving

pytestmark = pytest.mark.e2e

PRICE_MSAT = 21_000


@dataclass
class World:
    work: Path
    home: Path
    confdir: Path
    server: procs.Process

    def url(self, path: str) -> str:
        return self.server.url + path

    def state(self) -> dict[str, Any]:
        answer = httpx.get(self.url("/_state"), trust_env=False, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def route(self, name: str) -> dict[str, Any]:
        return self.state()["routes"][name]


@dataclass
class Clients:
    world: World
    work: Path
    started: list[procs.Process] = field(default_factory=list)

    def start(self, *settings: str, store: Path | None = None) -> procs.Process:
        store = store or self.work / "client.sqlite"
        process = procs.client_proxy(
            self.work, self.world.home, self.world.confdir, f"l402_store={store}", *settings
        )
        self.started.append(process)
        return process.start()

    def stop(self) -> None:
        for process in reversed(self.started):
            process.stop()


@pytest.fixture(scope="module")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, confdir: Path) -> Iterator[World]:
    work = tmp_path_factory.mktemp("client-payment-e2e")
    home = work / "home"
    home.mkdir()
    port = procs.free_port()
    server = procs.Process(
        name="payment stand-in",
        command=[
            sys.executable,
            "-m",
            "tests.payment_server",
            "--port",
            str(port),
            "--ledger",
            str(home / "devledger.sqlite"),
        ],
        port=port,
        log_path=work / f"payment-server-{port}.log",
        env=procs.env_with_home(home),
    )
    server.start()
    try:
        yield World(work, home, confdir, server)
    finally:
        server.stop()


@pytest.fixture
def clients(world: World, tmp_path: Path) -> Iterator[Clients]:
    started = Clients(world, tmp_path)
    yield started
    started.stop()


def settled(home: Path) -> set[str]:
    return {i["payment_hash"] for i in procs.ledger_invoices(home) if i["settled"]}


def tail(process: procs.Process, chars: int = 3000) -> str:
    return f"\n--- {process.name} log {process.log_path}:\n{process.log()[-chars:]}"


def get(client: procs.Process, url: str) -> httpx.Response:
    response = procs.fetch(client, url)
    assert "Traceback" not in client.log(), tail(client)
    return response


def cli_json(home: Path, *args: str) -> Any:
    result = procs.cli(home, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def new_since(before: dict[str, Any], after: dict[str, Any], key: str) -> list[Any]:
    return after[key][len(before[key]) :]


def test_the_proxy_pays_a_payment_only_server_once_per_request(
    world: World, clients: Clients
) -> None:
    store = clients.work / "client.sqlite"
    client = clients.start()
    before, paid_before = world.route("pay"), settled(world.home)
    answers = [get(client, world.url("/pay/ep1.mp3")) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200], tail(client)
    assert all(a.text == "paid /pay/ep1.mp3 with Payment\n" for a in answers)
    assert all(
        a.headers["X-L402-Paid"].startswith("21 sat (fee 0 sat) for payment:") for a in answers
    )
    assert all("Payment-Receipt" in a.headers for a in answers)

    after = world.route("pay")
    sent = new_since(before, after, "authorizations")
    # Each request starts without a credential and pays its own: nothing is sent twice.
    assert sent[0] is None and sent[2] is None and len(sent) == 4
    assert sent[1].startswith("Payment ") and sent[3].startswith("Payment ") and sent[1] != sent[3]
    assert new_since(before, after, "accept_payment") == [ACCEPT_PAYMENT] * 4
    new = settled(world.home) - paid_before
    assert len(new) == 2
    invoices = {i["payment_hash"]: i for i in procs.ledger_invoices(world.home)}
    assert all(invoices[h]["paid_by"] == "listener" for h in new)

    history = cli_json(world.home, "wallet", "history", "--store", str(store))
    paid = [e for e in history if e["event"] == "paid"]
    assert len(paid) == 2 and {e["payment_hash"] for e in paid} == new
    for event in paid:
        assert event["scheme"] == "Payment" and event["amount_sat"] == 21
        assert event["receipt"]["reference"] == event["payment_hash"]
        assert event["receipt"]["status"] == "success" and event["presented_at"] is not None
    # A charge is no token.
    assert cli_json(world.home, "wallet", "tokens", "--store", str(store)) == []


def test_requests_at_once_through_the_proxy_each_pay_once(world: World, clients: Clients) -> None:
    client = clients.start()
    before, paid_before = world.route("pay"), settled(world.home)

    async def together() -> list[httpx.Response]:
        async with procs.proxied_async_client(client) as http:
            return await asyncio.gather(
                *(http.get(world.url(f"/pay/batch.mp3?n={n % 2}")) for n in range(4))
            )

    answers = asyncio.run(together())
    assert [a.status_code for a in answers] == [200] * 4, tail(client)
    credentials = [a for a in new_since(before, world.route("pay"), "authorizations") if a]
    assert len(credentials) == len(set(credentials)) == 4
    ids = {decode_credential(c).challenge.id for c in credentials}
    assert len(ids) == 4
    assert len(settled(world.home) - paid_before) == 4


@pytest.mark.parametrize(
    ("route", "words"),
    [
        ("amount", "the invoice is for 21000 msat, the request for 22 sat"),
        ("hash", "the request's paymentHash is not the invoice's payment hash"),
        ("network", "the request says mainnet, the invoice is for regtest"),
    ],
)
def test_a_challenge_whose_request_and_invoice_disagree_is_never_paid(
    world: World, clients: Clients, route: str, words: str
) -> None:
    client = clients.start()
    paid_before = settled(world.home)
    balance = procs.ledger_balance(world.home)
    answer = get(client, world.url(f"/{route}/ep1.mp3"))
    assert answer.status_code == 402
    assert answer.headers["X-L402-Refused"] == f"request_mismatch; {words}"
    assert settled(world.home) == paid_before
    assert procs.ledger_balance(world.home) == balance
    assert world.route(route)["authorizations"][-1] is None  # nothing was ever presented


def test_a_refusal_after_payment_names_the_problem_type_and_pays_nothing_more(
    world: World, clients: Clients
) -> None:
    client = clients.start()
    paid_before = settled(world.home)
    answer = get(client, world.url("/expired/ep1.mp3"))
    assert answer.status_code == 402
    refused = answer.headers["X-L402-Refused"]
    assert refused.startswith("rejected_after_payment; ") and "(payment-expired)" in refused
    assert answer.json()["type"] == "https://paymentauth.org/problems/payment-expired"
    assert len(settled(world.home) - paid_before) == 1


def test_a_server_offering_both_is_paid_with_l402_unless_payment_is_preferred(
    world: World, clients: Clients
) -> None:
    default = clients.start(store=clients.work / "default.sqlite")
    paid_before = settled(world.home)
    for n in range(2):
        assert get(default, world.url(f"/both/ep{n}.mp3")).status_code == 200, tail(default)
    assert world.route("both")["paid_with"][-2:] == ["L402", "L402"]
    assert len(settled(world.home) - paid_before) == 1  # the token opens the second one

    preferring = clients.start("l402_prefer=payment", store=clients.work / "payment.sqlite")
    paid_before = settled(world.home)
    for n in range(2):
        assert get(preferring, world.url(f"/both/ep{n}.mp3")).status_code == 200
    assert world.route("both")["paid_with"][-2:] == ["Payment", "Payment"]
    assert len(settled(world.home) - paid_before) == 2
    assert "paying payment when a server offers L402 and Payment" in preferring.log()


def test_the_sdk_pays_the_stand_in(world: World, tmp_path: Path) -> None:
    paid_before = settled(world.home)
    with (
        L402Auth(
            store=str(tmp_path / "sdk.sqlite"),
            dev_ledger=str(world.home / "devledger.sqlite"),
            prefer="payment",
        ) as auth,
        httpx.Client(auth=auth, trust_env=False, timeout=30) as http,
    ):
        paid = http.get(world.url("/pay/sdk.mp3"))
        both = http.get(world.url("/both/sdk.mp3"))
        mismatch = http.get(world.url("/hash/sdk.mp3"))
    assert paid.status_code == 200 and paid.headers["X-L402-Paid"].startswith("21 sat")
    assert both.status_code == 200 and world.route("both")["paid_with"][-1] == "Payment"
    assert mismatch.headers["X-L402-Refused"].startswith("request_mismatch; ")
    assert len(settled(world.home) - paid_before) == 2


def test_a_bad_l402_prefer_stops_the_proxy_before_it_serves(tmp_path: Path, confdir: Path) -> None:
    lines = stopped_without_serving(bare_client(tmp_path, confdir, "l402_prefer=cheapest"))
    assert len(lines) == 1, lines
    assert lines[0].endswith("l402: l402_prefer must be l402 or payment, got 'cheapest'"), lines
