"""The server addon end to end: a real origin, a real mitmdump in reverse mode, the real CLI.

Challenges are read here the way most field clients read them (a regex on macaroon= and invoice=),
not with our own parser, so these tests also show that clients written for Aperture can pay us.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from l402proxy.l402.invoice import decode_invoice
from l402proxy.l402.token import attenuate

from . import procs

pytestmark = pytest.mark.e2e

PODCAST_RULES = procs.REPO / "rules" / "podcast.yaml"
API_RULES = procs.REPO / "rules" / "api.yaml"
OPTED_IN = {"Accept-Authenticate": "L402"}


@dataclass
class Stack:
    work: Path
    home: Path
    confdir: Path
    origin: procs.Process
    proxy: procs.Process

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(self.proxy.url + path, headers=headers, timeout=20)


@dataclass
class Paid:
    macaroon: str
    invoice: str
    preimage: bytes

    def authorization(self, scheme: str = "L402") -> str:
        return f"{scheme} {self.macaroon}:{self.preimage.hex()}"


def field_client_parse(header: str) -> tuple[str, str]:
    """How lsat-js and most scripts read a challenge."""
    macaroon = re.search(r'macaroon="([^"]+)"', header)
    invoice = re.search(r'invoice="([^"]+)"', header)
    assert macaroon and invoice, header
    return macaroon.group(1), invoice.group(1)


def challenge_of(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code in (401, 402), response.text
    return field_client_parse(response.headers.get_list("WWW-Authenticate")[0])


def pay_for(stack: Stack, path: str) -> Paid:
    macaroon, invoice = challenge_of(stack.get(path, **OPTED_IN))
    return Paid(macaroon, invoice, procs.dev_pay(stack.home, invoice))


def start_stack(
    tmp_path_factory: pytest.TempPathFactory,
    confdir: Path,
    rules: Path,
    *extra_sets: str,
    name: str = "stack",
) -> Stack:
    work = tmp_path_factory.mktemp(name)
    home = work / "home"
    home.mkdir()
    origin = procs.origin(work, home).start()
    try:
        proxy = procs.server_proxy(work, home, confdir, origin.url, rules, *extra_sets).start()
    except Exception:
        origin.stop()
        raise
    return Stack(work, home, confdir, origin, proxy)


def stop_stack(stack: Stack) -> None:
    stack.proxy.stop()
    stack.origin.stop()


@pytest.fixture(scope="session")
def confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture(scope="module")
def podcast(tmp_path_factory: pytest.TempPathFactory, confdir: Path) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory, confdir, PODCAST_RULES, name="podcast")
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, confdir: Path) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory, confdir, API_RULES, name="api")
    yield stack
    stop_stack(stack)


def test_player_that_never_heard_of_lightning_gets_the_free_variant(podcast: Stack) -> None:
    response = podcast.get("/episodes/ep1.mp3")
    assert response.status_code == 200
    assert response.content == b"AD-SUPPORTED episode ep1\n"
    assert response.headers["X-Origin-Path"] == "/episodes/ep1.mp3"


@pytest.mark.parametrize("accept", ["L402", "LSAT", "lsat", "Basic, L402", "foo, LSAT;q=1"])
def test_client_that_can_pay_gets_a_402_challenge(podcast: Stack, accept: str) -> None:
    response = podcast.get("/episodes/ep1.mp3", **{"Accept-Authenticate": accept})
    assert response.status_code == 402
    lines = response.headers.get_list("WWW-Authenticate")
    assert len(lines) == 2
    assert lines[0].startswith("LSAT macaroon=")
    assert lines[1].startswith("L402 macaroon=")
    assert field_client_parse(lines[0]) == field_client_parse(lines[1])
    assert 'version="0"' in lines[1]
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    macaroon, invoice = field_client_parse(lines[0])
    assert body["invoice"] == invoice and body["macaroon"] == macaroon
    assert body["price_sat"] == 21 and body["service"] == "podcast"
    decoded = decode_invoice(invoice)
    assert decoded.network == "regtest" and decoded.amount_msat == 21_000
    assert "X-Origin-Path" not in response.headers  # the origin was never asked


def test_402_body_is_readable_for_people(podcast: Stack) -> None:
    text = podcast.get("/episodes/ep1.mp3", Accept="text/plain", **OPTED_IN)
    assert text.status_code == 402
    assert text.headers["Content-Type"].startswith("text/plain")
    assert "21 sat" in text.text and "lnbcrt" in text.text
    # A browser gets the paywall page (tests/e2e/test_paywall_e2e.py has the rest).
    page = podcast.get("/episodes/ep1.mp3", Accept="text/html", **OPTED_IN)
    assert page.status_code == 402
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    _, invoice = challenge_of(page)
    assert f'href="lightning:{invoice}"' in page.text


def test_paying_unlocks_the_ad_free_file_and_the_origin_never_sees_the_token(
    podcast: Stack,
) -> None:
    macaroon, invoice = challenge_of(podcast.get("/episodes/ep1.mp3", **OPTED_IN))
    paid = procs.cli(podcast.home, "dev", "pay", invoice)
    assert paid.returncode == 0, paid.stderr
    receipt = json.loads(paid.stdout)
    assert receipt["amount_msat"] == 21_000
    preimage = receipt["preimage"]

    response = podcast.get("/episodes/ep1.mp3?t=5", Authorization=f"L402 {macaroon}:{preimage}")
    assert response.status_code == 200, response.text
    assert response.content == b"AD-FREE episode ep1\n"
    assert response.headers["X-Origin-Path"] == "/adfree/ep1.mp3?t=5"
    assert response.headers["X-Origin-Authorization"] == "absent"

    # One token opens the whole service, in both schemes and any case, upper-case hex too.
    for authorization in (
        f"LSAT {macaroon}:{preimage}",
        f"lsat {macaroon}:{preimage.upper()}",
        f"L402 {macaroon.rstrip('=').replace('+', '-').replace('/', '_')}:{preimage}",
    ):
        again = podcast.get("/episodes/ep2.mp3", Authorization=authorization)
        assert again.content == b"AD-FREE episode ep2\n", authorization


def test_the_ad_free_files_cannot_be_fetched_without_paying(podcast: Stack) -> None:
    # The paid rewrite's target (mode: deny in rules/podcast.yaml): 404, the origin never asked.
    for headers in ({}, OPTED_IN, {"Accept": "text/html"}):
        response = podcast.get("/adfree/ep1.mp3", **headers)
        assert response.status_code == 404, response.text
        assert "X-Origin-Path" not in response.headers
        assert b"AD-FREE" not in response.content
    # However it is spelled.
    assert podcast.get("/episodes/../adfree/ep1.mp3").status_code == 404
    assert podcast.get("/%61dfree/ep1.mp3").status_code == 404


def test_a_token_for_one_service_never_opens_another(podcast: Stack) -> None:
    paid = pay_for(podcast, "/episodes/ep1.mp3")
    response = podcast.get("/bonus/extra.mp3", Authorization=paid.authorization())
    assert response.status_code == 402
    assert response.json()["reason"] == "wrong_service"
    assert len(response.headers.get_list("WWW-Authenticate")) == 2


def tampered_signature(macaroon: str) -> str:
    raw = bytearray(base64.b64decode(macaroon))
    raw[-1] ^= 0x01  # the signature is the last field of a V2 macaroon
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda p: f"L402 {p.macaroon}:{os.urandom(32).hex()}", id="wrong-preimage"),
        pytest.param(
            lambda p: f"L402 {tampered_signature(p.macaroon)}:{p.preimage.hex()}",
            id="bad-signature",
        ),
        pytest.param(lambda p: "L402 not-a-macaroon!!:00", id="garbage"),
        pytest.param(lambda p: f"L402 {p.macaroon}:{p.preimage.hex()[:62]}", id="short-preimage"),
        pytest.param(lambda p: f"L402 {p.macaroon}", id="no-preimage"),
    ],
)
def test_invalid_credentials_get_401_with_a_fresh_challenge(
    podcast: Stack, forge: Callable[[Paid], str]
) -> None:
    paid = pay_for(podcast, "/episodes/ep3.mp3")
    response = podcast.get("/episodes/ep3.mp3", Authorization=forge(paid))
    assert response.status_code == 401, response.text
    lines = response.headers.get_list("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    assert field_client_parse(lines[0])[0] != paid.macaroon  # a fresh one
    assert response.headers["Cache-Control"] == "no-store"


def test_paywall_mode_asks_everyone_to_pay(podcast: Stack) -> None:
    response = podcast.get("/bonus/extra.mp3")
    assert response.status_code == 402
    assert response.json()["price_sat"] == 100


def test_unpriced_requests_pass_through_untouched(podcast: Stack) -> None:
    feed = podcast.get("/feed.xml", **OPTED_IN)
    assert feed.status_code == 200 and b"<rss" in feed.content
    # Someone else's Authorization scheme belongs to the origin.
    index = podcast.get("/", Authorization="Basic dXNlcjpwYXNz")
    assert index.headers["X-Origin-Authorization"] == "Basic dXNlcjpwYXNz"


def test_tokens_list_shows_issued_tokens_and_revoke_takes_effect(podcast: Stack) -> None:
    paid = pay_for(podcast, "/episodes/ep1.mp3")
    assert podcast.get("/episodes/ep1.mp3", Authorization=paid.authorization()).status_code == 200
    payment_hash = decode_invoice(paid.invoice).payment_hash.hex()

    def listed() -> dict | None:
        result = procs.cli(podcast.home, "tokens", "list")
        assert result.returncode == 0, result.stderr
        return next(
            (t for t in json.loads(result.stdout) if t["payment_hash"] == payment_hash), None
        )

    assert procs.wait_until(lambda: (t := listed()) is not None and t["status"] == "paid", 10)
    revoked = procs.cli(podcast.home, "tokens", "revoke", payment_hash[:12])
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"][0]["payment_hash"] == payment_hash

    def refused() -> bool:
        response = podcast.get("/episodes/ep1.mp3", Authorization=paid.authorization())
        return response.status_code == 402 and response.json()["reason"] == "revoked"

    assert procs.wait_until(refused, 5), "revocation not honoured within 5 s"

    unknown = procs.cli(podcast.home, "tokens", "revoke", "deadbeefdeadbeef")
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_tokens_survive_a_restart(tmp_path_factory: pytest.TempPathFactory, confdir: Path) -> None:
    stack = start_stack(tmp_path_factory, confdir, PODCAST_RULES, name="restart")
    try:
        paid = pay_for(stack, "/episodes/ep2.mp3")
        stack.proxy.stop()
        stack.proxy = procs.server_proxy(
            stack.work, stack.home, confdir, stack.origin.url, PODCAST_RULES
        ).start()
        response = stack.get("/episodes/ep2.mp3", Authorization=paid.authorization())
        assert response.status_code == 200
        assert response.content == b"AD-FREE episode ep2\n"
    finally:
        stop_stack(stack)


def write_rules(path: Path, *, price: int = 21, valid_for: str = "1h", extra: str = "") -> Path:
    path.write_text(
        "services:\n"
        "  - name: podcast\n"
        "    match: {path: '/episodes/*'}\n"
        f"    price_sat: {price}\n"
        "    mode: upgrade\n"
        f"    valid_for: {valid_for}\n"
        "    paid: {rewrite_path: ['^/episodes/(.*)$', '/adfree/\\1']" + extra + "}\n"
    )
    return path


def server_minted(stack: Stack, service: str, valid_until: int) -> str:
    """A token signed with the running server's own secret, as if it had issued it."""
    return procs.minted_credential(stack.home / "server.sqlite", service, valid_until)


def test_expired_token_gets_a_fresh_402(podcast: Stack) -> None:
    now = int(time.time())
    assert (
        podcast.get(
            "/episodes/ep1.mp3", Authorization=server_minted(podcast, "podcast", now + 60)
        ).status_code
        == 200
    )
    expired = podcast.get(
        "/episodes/ep1.mp3", Authorization=server_minted(podcast, "podcast", now - 1)
    )
    assert expired.status_code == 402
    assert expired.json()["reason"] == "expired"
    assert len(expired.headers.get_list("WWW-Authenticate")) == 2


def test_a_late_payment_still_buys_the_full_validity(podcast: Stack) -> None:
    response = podcast.get("/episodes/ep1.mp3", **OPTED_IN)
    header = response.headers.get_list("WWW-Authenticate")[0]
    decoded = json.loads(procs.cli(podcast.home, "decode", header).stdout)
    caveats = decoded["challenges"][0]["caveats"]
    valid_until = int(
        next(c for c in caveats if c.startswith("podcast_valid_until=")).split("=")[1]
    )
    # Paid in the last second the invoice allows, the token still has valid_for (30 days) left.
    assert valid_until >= response.json()["invoice_expires_at"] + 30 * 86400


def test_rules_reload_while_running_and_a_broken_edit_keeps_the_old_rules(
    tmp_path_factory: pytest.TempPathFactory, confdir: Path, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "live.yaml", price=21)
    stack = start_stack(tmp_path_factory, confdir, rules, name="reload")

    def price() -> int:
        return stack.get("/episodes/ep1.mp3", **OPTED_IN).json()["price_sat"]

    try:
        assert price() == 21
        write_rules(rules, price=34)
        assert procs.wait_until(lambda: price() == 34, 10), "edited rules not picked up"
        rules.write_text("services:\n  - name: podcast\n    prise_sat: 55\n")
        assert procs.wait_until(lambda: "kept the previous rules" in stack.proxy.log(), 10)
        assert "live.yaml:3" in stack.proxy.log()
        assert price() == 34
        assert stack.get("/episodes/ep1.mp3").content == b"AD-SUPPORTED episode ep1\n"
    finally:
        stop_stack(stack)


def test_a_broken_rules_file_stops_the_proxy_from_starting(tmp_path: Path, confdir: Path) -> None:
    rules = tmp_path / "broken.yaml"
    rules.write_text("services:\n  - name: podcast\n    match: {path: '/e/*'}\n    price_sat: -5\n")
    proxy = procs.server_proxy(tmp_path, tmp_path, confdir, "http://127.0.0.1:9", rules)
    proxy.start(wait=False)
    try:
        assert proxy.wait_exit() != 0
    finally:
        proxy.kill()
    log = proxy.log()
    assert "broken.yaml:4" in log and "podcast" in log and "price_sat" in log
    assert "Traceback" not in log


def test_an_unusable_store_stops_the_proxy_from_starting(tmp_path: Path, confdir: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    proxy = procs.server_proxy(
        tmp_path, tmp_path, confdir, "http://127.0.0.1:9", PODCAST_RULES,
        f"l402_store={blocker / 'server.sqlite'}",
    )  # fmt: skip
    proxy.start(wait=False)
    try:
        assert proxy.wait_exit() != 0
    finally:
        proxy.kill()
    assert "cannot open token store" in proxy.log() and "Traceback" not in proxy.log()


def test_paid_variant_can_add_headers_for_the_origin(api: Stack) -> None:
    assert api.get("/api/health").json()["tier"] == "free"
    challenge = api.get("/api/premium/report")
    assert challenge.status_code == 402 and challenge.json()["price_sat"] == 50
    macaroon, invoice = challenge_of(challenge)
    preimage = procs.dev_pay(api.home, invoice)
    response = api.get("/api/premium/report", Authorization=f"L402 {macaroon}:{preimage.hex()}")
    assert response.status_code == 200
    assert response.headers["X-Origin-Tier"] == "premium"
    assert response.headers["X-Origin-Authorization"] == "absent"


def test_paid_variant_can_come_from_another_origin(
    tmp_path_factory: pytest.TempPathFactory, confdir: Path, tmp_path: Path
) -> None:
    other = procs.origin(tmp_path, tmp_path, name="adfree-origin").start()
    try:
        rules = write_rules(tmp_path / "upstream.yaml", extra=f", upstream: '{other.url}'")
        stack = start_stack(tmp_path_factory, confdir, rules, name="upstream")
        try:
            paid = pay_for(stack, "/episodes/ep1.mp3")
            response = stack.get("/episodes/ep1.mp3", Authorization=paid.authorization())
            assert response.headers["X-Origin-Name"] == "adfree-origin"
            assert response.content == b"AD-FREE episode ep1\n"
            assert stack.get("/episodes/ep1.mp3").headers["X-Origin-Name"] == "origin"
        finally:
            stop_stack(stack)
    finally:
        other.stop()


def test_an_unusable_invoice_backend_stops_the_proxy_from_starting(
    tmp_path: Path, confdir: Path
) -> None:
    # A directory where the ledger file should be: the backend cannot be opened. (A backend that
    # fails while running gives 503s instead: see tests/e2e/test_node_backends_e2e.py.)
    broken_ledger = tmp_path / "ledger-is-a-dir"
    broken_ledger.mkdir()
    proxy = procs.server_proxy(
        tmp_path, tmp_path, confdir, "http://127.0.0.1:9", PODCAST_RULES,
        f"l402_dev_ledger={broken_ledger}",
    )  # fmt: skip
    proxy.start(wait=False)
    try:
        assert proxy.wait_exit() != 0
    finally:
        proxy.kill()
    log = proxy.log()
    assert "cannot use the invoice backend DEV LEDGER" in log, log
    assert str(broken_ledger) in log and "Traceback" not in log


def test_decode_cli_reads_a_live_challenge_and_credential(podcast: Stack) -> None:
    response = podcast.get("/episodes/ep1.mp3", **OPTED_IN)
    header = ", ".join(response.headers.get_list("WWW-Authenticate"))
    result = procs.cli(podcast.home, "decode", header)
    assert result.returncode == 0, result.stderr
    decoded = json.loads(result.stdout)
    assert [c["scheme"] for c in decoded["challenges"]] == ["LSAT", "L402"]
    first = decoded["challenges"][0]
    assert first["payment_hash_matches"] is True
    assert first["invoice_details"]["amount_msat"] == 21_000
    assert any(c.startswith("services=podcast:0") for c in first["caveats"])
    assert any(c.startswith("podcast_valid_until=") for c in first["caveats"])

    macaroon, invoice = field_client_parse(header)
    preimage = procs.dev_pay(podcast.home, invoice)
    cred = procs.cli(podcast.home, "decode", f"Authorization: L402 {macaroon}:{preimage.hex()}")
    assert cred.returncode == 0, cred.stderr
    assert json.loads(cred.stdout)["credentials"][0]["macaroons"][0]["preimage_matches"] is True

    bad = procs.cli(podcast.home, "decode", "Bearer nothing-here")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_dev_cli_pays_once_and_lists_invoices(podcast: Stack) -> None:
    _, invoice = challenge_of(podcast.get("/bonus/x.mp3"))
    first = procs.cli(podcast.home, "dev", "pay", invoice)
    assert first.returncode == 0, first.stderr
    again = procs.cli(podcast.home, "dev", "pay", invoice)
    assert again.returncode != 0
    assert "already paid" in again.stderr and "Traceback" not in again.stderr
    listed = procs.cli(podcast.home, "dev", "invoices")
    entries = {i["payment_hash"]: i for i in json.loads(listed.stdout)}
    entry = entries[decode_invoice(invoice).payment_hash.hex()]
    assert entry["settled"] is True and entry["amount_msat"] == 100_000


def test_hot_path_survives_many_requests_with_one_token(podcast: Stack) -> None:
    paid = pay_for(podcast, "/episodes/ep1.mp3")
    with httpx.Client(base_url=podcast.proxy.url, timeout=20) as client:
        for _ in range(50):
            response = client.get(
                "/episodes/ep1.mp3", headers={"Authorization": paid.authorization()}
            )
            assert response.content == b"AD-FREE episode ep1\n"


def read_response(stream: socket.socket, buffer: bytearray, head_only: bool) -> tuple[int, dict]:
    """One HTTP/1.1 response off a keep-alive connection, bounded in time by the socket timeout."""
    while b"\r\n\r\n" not in buffer:
        chunk = stream.recv(65536)
        assert chunk, "connection closed"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = stream.recv(65536)
        assert chunk, "connection closed"
        rest += chunk
    buffer[:] = rest[length:]
    return int(lines[0].split()[1]), headers


def test_head_requests_get_a_402_without_a_body_and_the_connection_stays_usable(
    podcast: Stack,
) -> None:
    with socket.create_connection(("127.0.0.1", podcast.proxy.port), timeout=10) as stream:
        buffer = bytearray()
        for method in ("HEAD", "HEAD", "GET"):
            stream.sendall(
                f"{method} /episodes/ep1.mp3 HTTP/1.1\r\nHost: pod\r\n"
                "Accept-Authenticate: L402\r\n\r\n".encode()
            )
            status, headers = read_response(stream, buffer, head_only=method == "HEAD")
            assert status == 402
            assert int(headers["content-length"]) > 0
        assert buffer == b""  # nothing stray left on the connection
        stream.sendall(b"HEAD /feed.xml HTTP/1.1\r\nHost: pod\r\n\r\n")
        assert read_response(stream, buffer, head_only=True)[0] == 200


def test_a_read_only_copy_of_a_token_cannot_write(api: Stack) -> None:
    macaroon, invoice = challenge_of(api.get("/api/premium/report"))
    preimage = procs.dev_pay(api.home, invoice).hex()
    read_only = attenuate(macaroon, ["premium_capabilities=read"])
    url = api.proxy.url + "/api/premium/report"
    full = {"Authorization": f"L402 {macaroon}:{preimage}"}
    limited = {"Authorization": f"L402 {read_only}:{preimage}"}
    assert httpx.post(url, headers=full, timeout=20).status_code == 200
    assert httpx.get(url, headers=limited, timeout=20).status_code == 200
    refused = httpx.post(url, headers=limited, timeout=20)
    assert refused.status_code == 402
    assert refused.json()["reason"] == "missing_capability"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_everything_it_started(tmp_path: Path, signum: int) -> None:
    # Every port its own: the default client port (8082) may be another demo's at the moment.
    origin_port, proxy_port, client_port = procs.free_port(), procs.free_port(), procs.free_port()
    command = [
        sys.executable, "-m", "l402proxy.demo",
        "--origin-port", str(origin_port), "--proxy-port", str(proxy_port),
        "--client-port", str(client_port),
    ]  # fmt: skip
    log = (tmp_path / "demo.log").open("w")
    demo = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env=procs.env_with_home(tmp_path))  # fmt: skip
    try:
        assert procs.wait_until(lambda: "Ctrl-C stops" in (tmp_path / "demo.log").read_text(), 60)
        demo.send_signal(signum)
        assert demo.wait(timeout=30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
        log.close()
    assert "Stopped." in (tmp_path / "demo.log").read_text()
    for port in (origin_port, proxy_port, client_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"


def test_rules_check_cli(tmp_path: Path) -> None:
    good = procs.cli(tmp_path, "rules", "check", str(PODCAST_RULES))
    assert good.returncode == 0, good.stderr
    checked = json.loads(good.stdout)
    assert [(s["name"], s["mode"], s["price_sat"]) for s in checked["services"]] == [
        ("podcast", "upgrade", 21),
        ("bonus", "paywall", 100),
        ("adfree", "deny", 0),
    ]
    assert checked["warnings"] == []
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text(PODCAST_RULES.read_text().split("  # ---- The ad-free files themselves")[0])
    warned = json.loads(procs.cli(tmp_path, "rules", "check", str(exposed)).stdout)
    assert [w.split(":", 1)[0] for w in warned["warnings"]] == ["service 'podcast' (line 24)"]
    assert "/adfree/... can be fetched through the proxy without paying" in warned["warnings"][0]
    broken = tmp_path / "broken.yaml"
    broken.write_text("services:\n  - name: podcast\n    match: {path: /e/*}\n    prise_sat: 5\n")
    bad = procs.cli(tmp_path, "rules", "check", str(broken))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"l402proxy: {broken}:4: service 'podcast': unknown key 'prise_sat' "
        "(did you mean 'price_sat'?)"
    ]
