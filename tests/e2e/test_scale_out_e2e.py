"""Several instances, one state (issue 12), with real processes on a real PostgreSQL
(tests/postgres.py): two mitmdump instances and the ASGI door under uvicorn, all with
`l402_store=postgresql://...` on one database, the same rules and the same dev ledger, started
once for the module and stopped after, also on failure.

What one instance sells, counts or revokes holds at all of them: tokens, revocations (within a
second), rate limits, free allowances and the invoice-mint limit. Requests are spread over the
instances, concurrently. Each test counts under its own client address: the instances trust
127.0.0.1 as a proxy, so X-Forwarded-For names the client (uvicorn, under the ASGI door, reads
it from 127.0.0.1 by itself too; the test of trusted forwarding headers also runs a mitmdump
that trusts nobody). The last test stops PostgreSQL in the middle
of traffic and starts it again.
"""

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.token import decode_macaroon, identifier_of
from tests.postgres import PostgresServer

from . import procs
from .doors import uvicorn
from .test_doors_behaviour import Paid, challenge

pytestmark = pytest.mark.e2e

# The mint limit is global and per client: each test below makes fewer invoices than its burst
# for any one client, but the flood.
MINT_BURST = 10
RATE_BURST = 6
FREEBIES = 4
TRUSTING = "trusted_proxies: [127.0.0.1]\n"
RULES = f"""\
invoice_limit: {{requests: 1, per: 1h, burst: {MINT_BURST}}}
services:
  - name: paid
    match: {{path: "/api/paid/*"}}
    price_sat: 5
  - name: limited
    match: {{path: "/api/limited/*"}}
    price_sat: 5
    rate_limits: [{{requests: 1, per: 1h, burst: {RATE_BURST}}}]
  - name: trial
    match: {{path: "/api/trial/*"}}
    price_sat: 5
    freebies: {{requests: {FREEBIES}, per: 1d}}
  - name: mint
    match: {{path: "/api/mint/*"}}
    price_sat: 5
"""
# The promise; measured from the moment `tokens revoke` has returned.
REVOCATION_BOUND = 1.0
# Bounds for what ends as soon as it happens (the machine may be busy): never what a test
# asserts about speed.
OUTAGE_BOUND = 15.0
RECOVERY_BOUND = 30.0
TRAFFIC_MAX_REQUESTS = 5_000


@dataclass
class Cluster:
    uri: str
    home: Path
    workdir: Path
    # name -> base URL: "mitmproxy A", "mitmproxy B", "asgi".
    instances: dict[str, str]
    origin_url: str

    @property
    def names(self) -> list[str]:
        return list(self.instances)


@contextlib.contextmanager
def running(*processes: procs.Process) -> Iterator[None]:
    """Start them all at once (each waits for its own port), stop all, whatever happens."""
    try:
        for process in processes:
            process.start(wait=False)
        for process in processes:
            process.wait_ready()
        yield
    finally:
        for process in reversed(processes):
            process.stop()


def proxy_instance(
    workdir: Path, home: Path, name: str, origin_url: str, rules: Path, uri: str
) -> procs.Process:
    process = procs.server_proxy(
        workdir, home, workdir / f"conf-{name}", origin_url, rules, f"l402_store={uri}"
    )
    process.name = f"mitmdump {name}"
    return process


@pytest.fixture(scope="module")
def cluster(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    uri = asyncio.run(postgres.new_database())
    workdir = tmp_path_factory.mktemp("scale-out")
    home = workdir / "home"
    home.mkdir()
    rules = workdir / "rules.yaml"
    rules.write_text(TRUSTING + RULES)
    origin = uvicorn(workdir, home, "l402proxy.origin_asgi:app")
    door_settings = {
        "L402PROXY_RULES": str(rules),
        "L402PROXY_BACKEND": "dev",
        "L402PROXY_STORE": uri,
        "L402PROXY_DEV_LEDGER": str(home / "devledger.sqlite"),
    }
    door = uvicorn(
        workdir,
        home,
        "l402proxy.origin_asgi:paywalled",
        env=door_settings,
        factory=True,
        name="asgi-door",
    )
    with running(origin):
        a = proxy_instance(workdir, home, "A", origin.url, rules, uri)
        b = proxy_instance(workdir, home, "B", origin.url, rules, uri)
        with running(a, b, door):
            instances = {"mitmproxy A": a.url, "mitmproxy B": b.url, "asgi": door.url}
            yield Cluster(uri, home, workdir, instances, origin.url)


def headers(client: str, authorization: str | None = None) -> dict[str, str]:
    fields = {"X-Forwarded-For": client, "Accept-Authenticate": "L402"}
    if authorization is not None:
        fields["Authorization"] = authorization
    return fields


def ask(base: str, path: str, client: str, authorization: str | None = None) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        return http.get(base + path, headers=headers(client, authorization))


def spread(
    bases: list[str], path: str, count: int, client: str, authorization: str | None = None
) -> list[httpx.Response]:
    """`count` requests at once, taking turns over the instances."""

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
            return await asyncio.gather(
                *(
                    http.get(bases[n % len(bases)] + path, headers=headers(client, authorization))
                    for n in range(count)
                )
            )

    return asyncio.run(all_at_once())


def buy(cluster: Cluster, name: str, path: str, client: str) -> Paid:
    macaroon, invoice = challenge(ask(cluster.instances[name], path, client))
    return Paid(macaroon, invoice, procs.dev_pay(cluster.home, invoice))


def token_id(paid: Paid) -> str:
    """What `tokens revoke` is given: the token id, which needs no issuance record (a payment
    hash is looked up among them, and an instance writes its records every 0.25 s)."""
    return identifier_of(decode_macaroon(paid.macaroon)).token_id.hex()


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    counted: dict[int, int] = {}
    for response in responses:
        counted[response.status_code] = counted.get(response.status_code, 0) + 1
    return counted


def revoke(cluster: Cluster, paid: Paid) -> None:
    done = procs.cli(cluster.home, "tokens", "revoke", token_id(paid), "--store", cluster.uri)
    assert done.returncode == 0, done.stderr


def until_refused(
    cluster: Cluster, path: str, client: str, paid: Paid, bound: float
) -> dict[str, float]:
    """Seconds until each instance stopped granting `paid` (polled, for at most `bound` s)."""
    start = time.monotonic()
    waiting = dict(cluster.instances)
    delays: dict[str, float] = {}
    with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
        while waiting and time.monotonic() - start < bound:
            for name, base in list(waiting.items()):
                answer = http.get(base + path, headers=headers(client, paid.authorization))
                if answer.status_code != 200:
                    assert answer.status_code in (401, 402), (name, answer.status_code)
                    delays[name] = time.monotonic() - start
                    del waiting[name]
            time.sleep(0.01)
    assert not waiting, f"still granting a revoked token after {bound:g} s: {sorted(waiting)}"
    return delays


def show(what: str, delays: dict[str, float]) -> str:
    line = f"{what}: " + ", ".join(f"{name} {delays[name] * 1000:.0f} ms" for name in delays)
    print(line)
    return line


# -- one state -----------------------------------------------------------------------------------


def test_a_token_bought_at_one_instance_works_at_all(cluster: Cluster) -> None:
    client = "198.51.100.1"
    for seller in ("mitmproxy A", "asgi"):
        paid = buy(cluster, seller, "/api/paid/x", client)
        for name, base in cluster.instances.items():
            answer = ask(base, "/api/paid/x", client, paid.authorization)
            assert answer.status_code == 200, (seller, name, answer.text[:300])
            assert answer.headers["X-Origin-Path"] == "/api/paid/x"


def test_a_revocation_reaches_every_instance_within_a_second(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    client = "198.51.100.2"
    paid = buy(cluster, "mitmproxy B", "/api/paid/r", client)
    for name, base in cluster.instances.items():
        assert ask(base, "/api/paid/r", client, paid.authorization).status_code == 200, name

    revoke(cluster, paid)
    delays = until_refused(cluster, "/api/paid/r", client, paid, REVOCATION_BOUND)

    record_property("revocation", show("revocation reached", delays))


# -- global counters -----------------------------------------------------------------------------


def test_a_rate_limit_counts_across_instances(cluster: Cluster) -> None:
    bases = list(cluster.instances.values())
    answers = spread(bases, "/api/limited/x", 3 * RATE_BURST, "198.51.100.3")
    # The limit lets the burst through (on to the 402), whichever instance each one reached.
    assert statuses(answers) == {402: RATE_BURST, 429: 2 * RATE_BURST}
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert int(limited.headers["Retry-After"]) > 60  # one request an hour
    # Another client has its own.
    assert ask(bases[0], "/api/limited/x", "198.51.100.4").status_code == 402


def test_free_allowances_count_across_instances(cluster: Cluster) -> None:
    bases = list(cluster.instances.values())
    answers = spread(bases, "/api/trial/x", FREEBIES + 5, "198.51.100.5")
    assert statuses(answers) == {200: FREEBIES, 402: 5}
    for answer in answers:
        if answer.status_code == 200:
            assert answer.headers["X-Origin-Path"] == "/api/trial/x"


def test_a_flood_makes_no_more_invoices_than_the_mint_limit(cluster: Cluster) -> None:
    bases = list(cluster.instances.values())
    before = len(procs.ledger_invoices(cluster.home))
    answers = spread(bases, "/api/mint/x", 4 * MINT_BURST, "198.51.100.6")
    created = len(procs.ledger_invoices(cluster.home)) - before
    assert statuses(answers) == {402: MINT_BURST, 429: 3 * MINT_BURST}
    assert created == MINT_BURST  # what the backend really made, not what we answered
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert int(limited.headers["Retry-After"]) > 60
    assert "WWW-Authenticate" not in limited.headers


def test_trusted_forwarding_headers(cluster: Cluster) -> None:
    bases = list(cluster.instances.values())
    # Behind a trusted proxy, each forwarded client has its own allowance, on every instance.
    for client in ("203.0.113.1", "203.0.113.2"):
        answers = spread(bases, "/api/trial/t", FREEBIES + 2, client)
        assert statuses(answers) == {200: FREEBIES, 402: 2}, client
    # What the client itself wrote left of the proxy's entry buys nothing.
    spoofed = spread(bases, "/api/trial/t", len(bases), "198.51.100.77, 203.0.113.1")
    assert statuses(spoofed) == {402: len(bases)}

    # An instance that trusts no proxy: X-Forwarded-For changes nothing, every request counts
    # under the peer's address (127.0.0.1 here), whatever it claims.
    rules = cluster.workdir / "rules-trusting-nobody.yaml"
    rules.write_text(RULES)
    lone = proxy_instance(
        cluster.workdir, cluster.home, "C", cluster.origin_url, rules, cluster.uri
    )
    with running(lone):
        claimed = [
            ask(lone.url, "/api/trial/u", f"203.0.113.{60 + n}").status_code
            for n in range(FREEBIES + 2)
        ]
    assert claimed == [200] * FREEBIES + [402, 402]


# -- losing the database -------------------------------------------------------------------------


class Traffic:
    """A paying client asking every instance in turn, on a thread, until stopped (bounded)."""

    def __init__(self, cluster: Cluster, path: str, client: str, paid: Paid) -> None:
        self.cluster, self.path, self.client, self.paid = cluster, path, client, paid
        self.seen: list[tuple[float, str, int]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="paying traffic", daemon=True)

    def run(self) -> None:
        names = self.cluster.names
        with httpx.Client(trust_env=False, timeout=procs.FETCH_TIMEOUT) as http:
            for n in range(TRAFFIC_MAX_REQUESTS):
                if self.stopped.is_set():
                    return
                name = names[n % len(names)]
                try:
                    answer = http.get(
                        self.cluster.instances[name] + self.path,
                        headers=headers(self.client, self.paid.authorization),
                    )
                    status = answer.status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all: as bad as a 5xx
                self.seen.append((time.monotonic(), name, status))
                time.sleep(0.02)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=procs.FETCH_TIMEOUT + 5)


def new_challenge(base: str, client: str) -> httpx.Response:
    return ask(base, "/api/paid/new", client)


def challenged_until(base: str, client: str, wanted: int, bound: float, seen: list[int]) -> bool:
    """Ask `base` for something new (polled, for at most `bound` s) until it answers `wanted`;
    every status it gave is added to `seen`."""

    def answered() -> bool:
        seen.append(new_challenge(base, client).status_code)
        return seen[-1] == wanted

    return procs.wait_until(answered, bound)


def test_a_database_restart_in_the_middle_of_traffic(
    cluster: Cluster, postgres: PostgresServer, record_property: Callable[[str, object], None]
) -> None:
    """Stopped: paid requests keep their 200 everywhere, new ones get 503 + Retry-After (no
    invoice that could not be recorded), nothing else fails. Started again: the instances
    sell again by themselves, and a revocation reaches them all."""
    client = "198.51.100.8"
    paid = buy(cluster, "asgi", "/api/paid/d", client)
    new_answers: list[int] = []
    with Traffic(cluster, "/api/paid/d", client, paid) as traffic:
        time.sleep(0.3)  # some traffic before
        down_at = time.monotonic()
        try:
            postgres.stop_sync()
            for name, base in cluster.instances.items():
                noticed = challenged_until(base, "198.51.100.9", 503, OUTAGE_BOUND, new_answers)
                assert noticed, f"{name} still sells with its store down: {new_answers[-5:]}"
            # Now every instance refuses to sell, and keeps refusing while it is down.
            for name, base in cluster.instances.items():
                answer = new_challenge(base, "198.51.100.9")
                assert answer.status_code == 503, (name, answer.text[:300])
                assert int(answer.headers["Retry-After"]) >= 1
                assert "WWW-Authenticate" not in answer.headers
            refused = procs.cli(
                cluster.home, "tokens", "revoke", token_id(paid), "--store", cluster.uri
            )
            assert refused.returncode != 0
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            assert postgres.password not in refused.stderr + refused.stdout
            time.sleep(0.3)  # some more traffic while it is down
        finally:
            postgres.start_sync()
        up_at = time.monotonic()
        recovered: dict[str, float] = {}
        for name, base in cluster.instances.items():
            back = challenged_until(base, "198.51.100.10", 402, RECOVERY_BOUND, new_answers)
            assert back, f"{name} does not sell again: {new_answers[-5:]}"
            recovered[name] = time.monotonic() - up_at
        time.sleep(0.3)  # and some after

    during = [status for at, _, status in traffic.seen if down_at <= at <= up_at]
    assert during, "no paid request was made while the database was down"
    assert {status for _, _, status in traffic.seen} == {200}, traffic.seen
    assert {name for _, name, _ in traffic.seen} == set(cluster.names)
    assert set(new_answers) <= {402, 503}, new_answers

    revoke(cluster, paid)
    revoked = until_refused(cluster, "/api/paid/d", client, paid, RECOVERY_BOUND)
    record_property("recovered", show("selling again after the restart", recovered))
    record_property("revocation", show("revocation after the restart reached", revoked))
