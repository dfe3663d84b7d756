"""JSON logs at a real mitmdump server door (`--set l402_log_format=json`), over a whole paid
flow: a 402, paying with the dev ledger, the grant, the paywall page's unlock and its cookie, a
bad token, a revoked token. Everything the door prints is JSON, one object per line; each
decision has its line with its fields; and no line anywhere holds a macaroon, a preimage, an
invoice, a cookie value, the store's secret or the admin secret.

mitmproxy's own terminal lines (its "listening at", connection and flow lines) are not the
paywall's: they are kept to warnings and no flows (termlog_verbosity=warn, flow_detail=0), as
an operator collecting JSON would run it."""

import asyncio
import base64
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.l402.invoice import decode_invoice
from l402proxy.l402.token import decode_macaroon, identifier_of
from l402proxy.launch import started
from l402proxy.store import open_server_store

from . import procs
from .doors import uvicorn
from .test_doors_behaviour import BROWSER_ACCEPT, REVOCATION_SECONDS, challenge

pytestmark = pytest.mark.e2e

RULES = procs.REPO / "rules" / "podcast.yaml"
QUIET_MITMPROXY = ("termlog_verbosity=warn", "flow_detail=0")
DECISIONS = "l402proxy.decisions"
DECISION_FIELDS = {"event", "door", "kind", "service", "status", "reason", "token",
                   "latency_ms", "method", "dry_run"}  # fmt: skip


@dataclass
class Run:
    """What one door printed over a run, and every secret that went through it."""

    output: str = ""
    others: str = ""  # the origin's output: it must never see them either
    secrets: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # what -> token id prefix

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output.splitlines() if line.strip()]

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["logger"] == DECISIONS
                and line.get("event") == "decision"]  # fmt: skip


def store_secret(store: Path) -> bytes:
    async def read() -> bytes:
        opened = await open_server_store(str(store))
        try:
            return await opened.secret()
        finally:
            await opened.close()

    return asyncio.run(read())


def secret_forms(name: str, value: bytes) -> dict[str, str]:
    """Every way a log line could spell a binary secret."""
    return {
        f"{name} (hex)": value.hex(),
        f"{name} (base64)": base64.b64encode(value).decode().rstrip("="),
        f"{name} (base64url)": base64.urlsafe_b64encode(value).decode().rstrip("="),
    }


def token_prefix(macaroon: str) -> str:
    return identifier_of(decode_macaroon(macaroon)).token_id.hex()[:8]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def paid_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    work = tmp_path_factory.mktemp("jsonlog")
    home = work / "home"
    run = Run()
    origin = uvicorn(work, home, "l402proxy.origin_asgi:app")
    with started(origin):
        proxy = procs.server_proxy(
            work, home, work / "conf", origin.url, RULES, "l402_log_format=json", *QUIET_MITMPROXY
        )
        with (
            started(proxy),
            httpx.Client(
                base_url=proxy.url, trust_env=False, timeout=procs.FETCH_TIMEOUT
            ) as client,
        ):
            pay_and_use(client, home, run)
            browse_and_unlock(proxy.url, home, run)
            revoke(client, home, run)
            run.secrets |= secret_forms("store secret", store_secret(home / "server.sqlite"))
        # Stopped: everything it had to say is written.
        run.output = proxy.log()
    run.others = origin.log()
    return run


def pay_and_use(client: httpx.Client, home: Path, run: Run) -> None:
    macaroon, invoice = challenge(client.get("/bonus/b1.mp3"))
    preimage = procs.dev_pay(home, invoice).hex()
    run.secrets |= {"macaroon": macaroon, "invoice": invoice, "preimage": preimage}
    run.tokens["header"] = token_prefix(macaroon)
    for scheme in ("L402", "LSAT"):
        paid = client.get(
            "/bonus/b1.mp3", headers={"Authorization": f"{scheme} {macaroon}:{preimage}"}
        )
        assert paid.status_code == 200, paid.text[:300]
    bad = client.get("/bonus/b1.mp3", headers={"Authorization": "L402 bogus:00"})
    assert bad.status_code == 401


def browse_and_unlock(base_url: str, home: Path, run: Run) -> None:
    """A browser: the paywall page, paid from elsewhere, unlocked by its claim cookie; then
    the credential cookie opens the scope."""
    with httpx.Client(base_url=base_url, trust_env=False, timeout=procs.FETCH_TIMEOUT) as browser:
        page = browser.get("/bonus/b2.mp3", headers={"Accept": BROWSER_ACCEPT})
        macaroon, invoice = challenge(page)
        claims = [c for c in page.headers.get_list("Set-Cookie") if c.startswith("L402claim.")]
        assert claims, page.headers
        claim = claims[0].split(";", 1)[0].split("=", 1)[1]
        preimage = procs.dev_pay(home, invoice).hex()
        unlocked = browser.post("/.l402/unlock", json={"macaroon": macaroon, "preimage": None})
        assert unlocked.status_code == 200, unlocked.text
        cookie = unlocked.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
        assert cookie == f"{macaroon}:{preimage}"
        opened = browser.get("/bonus/b3.mp3", headers={"Cookie": f"L402_bonus={cookie}"})
        assert opened.status_code == 200, opened.text[:300]
    run.secrets |= {"page macaroon": macaroon, "page invoice": invoice,
                    "page preimage": preimage, "claim cookie": claim, "cookie": cookie}  # fmt: skip
    run.tokens["cookie"] = token_prefix(macaroon)


def revoke(client: httpx.Client, home: Path, run: Run) -> None:
    payment_hash = decode_invoice(run.secrets["invoice"]).payment_hash.hex()
    store = str(home / "server.sqlite")
    revoked = procs.cli(home, "tokens", "--store", store, "revoke", payment_hash[:16])
    assert revoked.returncode == 0, revoked.stderr
    credential = f"L402 {run.secrets['macaroon']}:{run.secrets['preimage']}"

    def refused() -> bool:
        response = client.get("/bonus/b1.mp3", headers={"Authorization": credential})
        return response.status_code == 402 and response.json()["reason"] == "revoked"

    assert procs.wait_until(refused, REVOCATION_SECONDS), "revocation not honoured"


# -- the run's output --------------------------------------------------------------------------


def test_every_line_the_door_prints_is_one_json_object(paid_run: Run) -> None:
    assert paid_run.output.strip(), "the door printed nothing"
    for number, line in enumerate(paid_run.output.splitlines(), start=1):
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line[:300]!r}")
        assert isinstance(parsed, dict) and {"ts", "level", "logger", "msg"} <= set(parsed), line


def test_the_paywalls_start_is_in_the_json_log(paid_run: Run) -> None:
    """The lines the paywall logs while it starts (rules loaded, backend checked) are JSON
    too: not printed as text before the JSON handler is put in place, nor lost."""
    said = " ".join(line["msg"] for line in paid_run.lines)
    assert "priced service(s) from" in said and "invoices from" in said, said[:2000]


def test_each_decision_has_its_line_with_its_fields(paid_run: Run) -> None:
    told = paid_run.decisions
    for line in told:
        assert set(line) >= DECISION_FIELDS, line
        assert line["door"] == "mitmproxy" and line["dry_run"] is False and line["level"] == "INFO"
        assert isinstance(line["latency_ms"], float | int) and line["latency_ms"] >= 0
    seen = [(d["kind"], d["service"], d["status"], d["reason"], d["token"]) for d in told]
    header, cookie = paid_run.tokens["header"], paid_run.tokens["cookie"]
    wanted = [
        ("challenge", "bonus", 402, "payment_required", None),
        ("grant", "bonus", None, None, header),  # L402
        ("grant", "bonus", None, None, header),  # LSAT
        ("challenge", "bonus", 401, "malformed", None),
        ("challenge", "bonus", 402, "payment_required", None),  # the paywall page
        ("unlock", "bonus", 200, None, None),
        ("grant", "bonus", None, None, cookie),  # by the cookie
    ]
    assert seen[: len(wanted)] == wanted, seen
    # Then the revoked token, asked until the door knew (granted until then).
    rest = seen[len(wanted) :]
    assert rest and rest[-1] == ("challenge", "bonus", 402, "revoked", None), rest
    assert all(entry in (("grant", "bonus", None, None, header), rest[-1]) for entry in rest)
    assert [d["method"] for d in told[:7]] == ["GET"] * 5 + ["POST", "GET"]


def test_each_settled_invoice_has_its_line(paid_run: Run) -> None:
    """Both tokens were paid and used: each sale is one line (the store's flush says which
    tokens this instance was first to record as paid)."""
    settled = [line for line in paid_run.lines if line.get("event") == "settled"]
    assert [(s["service"], s["price_sat"], s["door"]) for s in settled] == [
        ("bonus", 100, "mitmproxy")
    ] * 2, paid_run.output[-3000:]


def test_no_line_holds_a_secret(paid_run: Run) -> None:
    assert len(paid_run.secrets) == 11
    everything = paid_run.output + paid_run.others
    for what, secret in paid_run.secrets.items():
        assert secret, what
        for form in {secret, secret.lower(), secret.upper()}:
            assert form not in everything, f"the {what} is in the output"
        # Nor a good part of it (a macaroon's signature, half a preimage).
        assert secret[-24:] not in everything, f"part of the {what} is in the output"


# -- the admin secret --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """A door with the admin API on: its bearer secret (made by the door, in a 0600 file) is
    sent right and wrong; it must not reach the JSON log (it goes to the file only)."""
    work = tmp_path_factory.mktemp("jsonlog-admin")
    home = work / "home"
    secret_file = home / "admin-secret"
    admin_port = procs.free_port()
    run = Run()
    origin = uvicorn(work, home, "l402proxy.origin_asgi:app")
    with started(origin):
        proxy = procs.server_proxy(
            work, home, work / "conf", origin.url, RULES, "l402_log_format=json",
            f"l402_admin=127.0.0.1:{admin_port}", f"l402_admin_secret={secret_file}",
            *QUIET_MITMPROXY,
        )  # fmt: skip
        with started(proxy):
            assert procs.wait_until(lambda: listening(admin_port), 15), proxy.log()[-3000:]
            secret = secret_file.read_text().strip()
            admin = f"http://127.0.0.1:{admin_port}"
            with httpx.Client(base_url=admin, trust_env=False, timeout=procs.FETCH_TIMEOUT) as c:
                for bearer in (secret, secret[::-1], "x"):
                    c.get("/", headers={"Authorization": f"Bearer {bearer}"})
                    c.get("/", params={"secret": bearer})
            with httpx.Client(base_url=proxy.url, trust_env=False) as client:
                # The admin secret is no credential of the paywall's: the origin gets it.
                client.get("/bonus/b1.mp3", headers={"Authorization": f"Bearer {secret}"})
            run.secrets["admin secret"] = secret
        run.output = proxy.log()
    yield run


def test_the_admin_secret_is_in_no_line(admin_run: Run) -> None:
    secret = admin_run.secrets["admin secret"]
    assert len(secret) >= 16
    for number, line in enumerate(admin_run.output.splitlines(), start=1):
        assert secret not in line and secret[::-1] not in line, f"line {number}: {line[:200]}"
        json.loads(line)  # and JSON like every other line
    assert any("admin" in line["msg"] for line in admin_run.lines), admin_run.output[:2000]
