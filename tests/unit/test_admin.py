"""The admin API (ops/admin.py): its bearer secret and the file it lives in, who it answers
(the secret, the Host), each endpoint on a real AdminServer (uvicorn on this test's event loop)
in front of a real engine that sold real tokens (dev ledger), and the CLI's `--admin URL`."""

import asyncio
import json
import logging
import os
import re
import signal
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from l402proxy.cli import main
from l402proxy.engine import Answer, Forward, Paywall, Request
from l402proxy.l402.headers import format_credential, parse_challenges
from l402proxy.launch import REPO
from l402proxy.lightning.dev import DevLedger
from l402proxy.ops import admin
from l402proxy.ops.admin import (
    AdminSecretError,
    AdminServer,
    admin_secret,
    default_admin_secret_path,
    read_admin_secret,
    shown_pattern,
)
from l402proxy.ops.listen import ListenError, parse_listen
from l402proxy.store import StoreError
from tests.e2e.procs import free_port

PODCAST = REPO / "rules" / "podcast.yaml"
API = REPO / "rules" / "api.yaml"
SECRET = "s3cret-for-the-admin-tests-0123456789"
OPTED_IN = (b"accept-authenticate", b"L402")
# Bounded waits on the engine's background jobs (flush every 0.25 s, revocations every 1 s).
WAIT_ROUNDS = 200
WAIT_STEP = 0.05


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(admin.SECRET_ENV, raising=False)
    return tmp_path / "home"


# --- the secret file ------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_made_private_once_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "dir" / "admin-secret"
    secret, created = admin_secret(str(path))
    assert created and len(secret) >= 40
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_text() == secret + "\n"
    assert admin_secret(str(path)) == (secret, False)
    assert [p.name for p in path.parent.iterdir()] == ["admin-secret"]  # no temp file left
    assert admin_secret(str(tmp_path / "other"))[0] != secret


def test_processes_starting_together_share_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "admin-secret"
    results: list[tuple[str, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(admin_secret(str(path)))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(results) == 8
    assert len({secret for secret, _ in results}) == 1
    assert sum(created for _, created in results) == 1


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o660, 0o644])
def test_a_secret_others_can_read_is_refused(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "admin-secret"
    path.write_text(SECRET)
    path.chmod(loose)
    with pytest.raises(AdminSecretError) as caught:
        admin_secret(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"can be read by others (mode {loose:04o})" in message
    assert f"chmod 600 {path}" in message
    assert SECRET not in message
    assert isinstance(caught.value, ValueError)  # what Operations turns into OpsError


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no secret of at least 16"),
        ("short\n", "holds no secret of at least 16"),
        ("two words are not one secret\n", "printable ASCII without spaces"),
    ],
)
def test_a_file_without_a_usable_secret_is_refused(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "admin-secret"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(AdminSecretError, match=message):
        admin_secret(str(path))


def test_a_secret_written_by_hand_is_used(tmp_path: Path) -> None:
    path = tmp_path / "admin-secret"
    path.write_text(f"  {SECRET}\n")
    path.chmod(0o600)
    assert admin_secret(str(path)) == (SECRET, False)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(SECRET)
    target.chmod(0o600)
    link = tmp_path / "admin-secret"
    link.symlink_to(target)
    with pytest.raises(AdminSecretError, match="cannot read"):
        admin_secret(str(link))


def test_a_secret_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    path = tmp_path / "admin-secret"
    path.write_text(SECRET)
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(AdminSecretError, match="belongs to another user"):
        admin_secret(str(path))


def test_reading_never_makes_a_secret(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_admin_secret(str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_the_default_secret_file_is_under_the_home(home: Path) -> None:
    assert default_admin_secret_path() == str(home / "admin-secret")


# --- an engine that sold tokens, and its admin server ---------------------------------------


@dataclass
class Admin:
    engine: Paywall
    server: AdminServer
    client: httpx.AsyncClient
    ledger: DevLedger
    tmp: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def get(self, path: str, secret: str | None = SECRET, **headers: str) -> httpx.Response:
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        return await self.client.get(path, headers=headers)

    async def buy(self, path: str) -> tuple[str, bytes]:
        """A 402 for `path`, paid through the dev ledger and used once: (macaroon, preimage)."""
        answer = await handle(self.engine, path, OPTED_IN)
        assert isinstance(answer, Answer) and answer.status == 402
        challenge = parse_challenges(answer.header("WWW-Authenticate") or "")[0]
        preimage = (await self.ledger.pay("listener", challenge.invoice, 0)).preimage
        used = await handle(self.engine, path, authorization(challenge.macaroon, preimage))
        assert isinstance(used, Forward)
        return challenge.macaroon, preimage

    async def flushed(self) -> None:
        """The engine's background flush has written everything it queued."""
        assert self.engine.store is not None
        for _ in range(WAIT_ROUNDS):
            if self.engine.store.pending == 0:
                return
            await asyncio.sleep(WAIT_STEP)
        raise AssertionError("the engine never flushed its queue")


def authorization(macaroon: str, preimage: bytes) -> tuple[bytes, bytes]:
    return (b"authorization", format_credential([macaroon], preimage).encode())


async def handle(engine: Paywall, path: str, *fields: tuple[bytes, bytes]) -> Any:
    request = Request(
        method="GET", target=path, host="podcast.example", fields=((b"host", b"x"), *fields)
    )
    return await engine.handle(request)


async def opened_engine(tmp: Path, rules: Path = PODCAST) -> Paywall:
    engine = Paywall(door="test")
    engine.use_rules_file(str(rules))
    engine.use_backend("dev", dev_ledger=str(tmp / "devledger.sqlite"))
    engine.store_uri = str(tmp / "server.sqlite")
    await engine.open()
    return engine


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Admin]:
    engine = await opened_engine(tmp_path)
    server = await AdminServer.start(engine, "127.0.0.1", 0, SECRET)
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}", trust_env=False, timeout=20
    )
    try:
        yield Admin(engine, server, client, ledger, tmp_path)
    finally:
        await client.aclose()
        await ledger.close()
        await server.close()
        await engine.close()


# --- who is answered ------------------------------------------------------------------------

API_PATHS = ["/api/tokens", "/api/services", "/api/revenue", "/api/health"]


@pytest.mark.parametrize("path", API_PATHS)
async def test_every_api_call_needs_the_secret(running: Admin, path: str) -> None:
    refusals = [
        await running.get(path, secret=None),
        await running.get(path, secret="wrong-" + SECRET),
        await running.get(path, secret=SECRET[:-1]),
        await running.get(path, secret=SECRET + "x"),
        await running.get(path, secret=None, Authorization=f"Basic {SECRET}"),
        await running.get(path, secret=None, Authorization=SECRET),
        await running.get(path, secret=None, Authorization="Bearer"),
    ]
    for refused in refusals:
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        # Missing or wrong, the same answer: nothing about why, nothing of the data.
        assert refused.json() == {"error": "unauthorized"}
        assert refused.headers["Cache-Control"] == "no-store"
    assert (await running.get(path)).status_code == 200
    # The scheme's case does not matter (RFC 9110); the secret's does.
    assert (await running.get(path, secret=None, Authorization=f"bearer {SECRET}")).is_success
    assert (await running.get(path, secret=SECRET.upper())).status_code == 401


async def test_a_revocation_needs_the_secret(running: Admin) -> None:
    await running.buy("/bonus/a.mp3")
    await running.flushed()
    [token] = (await running.get("/api/tokens")).json()["tokens"]
    path = f"/api/tokens/{token['token_id']}/revoke"
    for headers in ({}, {"Authorization": "Bearer nope-nope-nope-nope"}):
        assert (await running.client.post(path, headers=headers)).status_code == 401
    assert running.engine.store is not None
    [listed] = await running.engine.store.list_tokens()
    assert listed.revoked_at is None


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "localhost.evil.example",
        "127.0.0.1:{other}",
        "10.0.0.1:{port}",
        "",
    ],
)
async def test_a_host_naming_no_loopback_address_is_refused(running: Admin, host: str) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 sends its own
    name as Host. It gets neither the page nor the API (even with the secret: the page's
    script could have guessed nothing, but the answer must not depend on that)."""
    value = host.format(port=running.server.port, other=running.server.port + 1)
    for path in ["/", "/admin.js", "/api/health", "/api/tokens"]:
        response = await running.get(path, Host=value)
        assert response.status_code == 403, (path, value)
        assert "Host" in response.json()["error"]


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}"])
async def test_loopback_names_are_answered(running: Admin, host: str) -> None:
    value = host.format(port=running.server.port)
    assert (await running.get("/api/health", Host=value)).status_code == 200


async def test_a_request_without_host_is_refused(running: Admin) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
    try:
        writer.write(f"GET /api/health HTTP/1.0\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]


async def test_a_listener_others_may_reach_answers_any_host(tmp_path: Path) -> None:
    """l402_ops_remote: the operator puts it behind a name (and TLS) of their own."""
    engine = await opened_engine(tmp_path)
    server = await AdminServer.start(engine, "127.0.0.1", 0, SECRET, allow_remote=True)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            response = await client.get(
                f"http://127.0.0.1:{server.port}/api/health",
                headers={"Host": "admin.example.com", "Authorization": f"Bearer {SECRET}"},
            )
        assert response.status_code == 200
    finally:
        await server.close()
        await engine.close()


@pytest.mark.parametrize("value", ["0.0.0.0:9403", "192.0.2.1:9403", "[::]:9403", "example.com:1"])
def test_a_non_loopback_listen_address_is_refused_unless_allowed(value: str) -> None:
    with pytest.raises(ListenError, match="is not a loopback address"):
        parse_listen(value, option="l402_admin")
    assert parse_listen(value, option="l402_admin", allow_remote=True)[1] > 0


async def test_a_taken_port_is_one_line(running: Admin, tmp_path: Path) -> None:
    with pytest.raises(
        ListenError, match=f"admin: cannot listen on 127.0.0.1:{running.server.port}"
    ):
        await AdminServer.start(running.engine, "127.0.0.1", running.server.port, SECRET)


async def test_no_cors_for_any_origin(running: Admin) -> None:
    origin = {"Origin": "http://evil.example"}
    for response in [
        await running.get("/api/tokens", **origin),
        await running.client.options(
            "/api/tokens",
            headers={
                **origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        ),
    ]:
        assert not any(name.lower().startswith("access-control-") for name in response.headers)
    preflight = await running.client.options("/api/tokens", headers=origin)
    assert preflight.status_code == 401  # no secret: nothing, not even which methods go


# --- the page -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/admin"])
async def test_the_page_is_served_with_its_guards(running: Admin, path: str) -> None:
    page = await running.get(path, secret=None)
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    # Nothing from elsewhere, no code in the page itself, no data in it.
    assert "http" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert (
        "<script>" not in page.text
        and "<style" not in page.text
        and not re.search(r"\son[a-z]+=", page.text)
    )
    assert '<script src="/admin.js"' in page.text
    script = await running.get("/admin.js", secret=None)
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert "sessionStorage" in script.text and "fetch(" in script.text
    assert "innerHTML" not in script.text  # text goes in as text
    style = await running.get("/admin.css", secret=None)
    assert style.headers["Content-Type"].startswith("text/css")
    head = await running.client.head("/")
    assert head.status_code == 200 and head.content == b""


async def test_unknown_pages_and_methods(running: Admin) -> None:
    assert (await running.get("/nothing", secret=None)).status_code == 404
    assert (await running.get("/api/nothing")).status_code == 404
    assert (await running.get("/api/tokens/")).status_code == 404
    posted = await running.client.post("/api/tokens", headers={"Authorization": f"Bearer {SECRET}"})
    assert posted.status_code == 405 and "GET" in posted.headers["Allow"]
    assert (await running.client.post("/")).status_code == 405
    assert (await running.get("/favicon.ico", secret=None)).status_code == 204


# --- the endpoints --------------------------------------------------------------------------


async def test_tokens_lists_what_was_sold(running: Admin) -> None:
    await running.buy("/bonus/a.mp3")
    await running.buy("/episodes/1.mp3")
    await handle(running.engine, "/bonus/b.mp3", OPTED_IN)  # a 402 never paid
    await running.flushed()

    tokens = (await running.get("/api/tokens")).json()["tokens"]
    assert [(t["service"], t["price_sat"], t["status"]) for t in tokens] == [
        ("bonus", 100, "unpaid"),
        ("podcast", 21, "paid"),
        ("bonus", 100, "paid"),
    ]
    assert running.engine.store is not None
    stored = await running.engine.store.list_tokens()
    assert strip_status(tokens) == strip_status([token.to_json() for token in stored])
    bonus = (
        await running.client.get(
            "/api/tokens",
            params={"service": "bonus", "limit": "1"},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
    ).json()["tokens"]
    assert [t["status"] for t in bonus] == ["unpaid"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit: '0' is not a number from 1 to 1000"),
        ("limit=1001", "limit: '1001' is not a number from 1 to 1000"),
        ("limit=ten", "limit: 'ten' is not a number"),
        ("limit=-1", "limit: '-1' is not a number"),
        ("limit=1&limit=2", "limit is given twice"),
        ("serivce=bonus", "unknown query parameter 'serivce'"),
        ("service=%FF", "cannot be read"),
    ],
)
async def test_bad_token_queries_are_400(running: Admin, query: str, message: str) -> None:
    response = await running.get(f"/api/tokens?{query}")
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert "\n" not in response.json()["error"]


async def test_revoke_reaches_the_engine(running: Admin) -> None:
    macaroon, preimage = await running.buy("/bonus/a.mp3")
    await running.flushed()
    [token] = (await running.get("/api/tokens")).json()["tokens"]

    response = await running.client.post(
        f"/api/tokens/{token['token_id'][:12]}/revoke",
        headers={"Authorization": f"Bearer {SECRET}"},
    )

    assert response.status_code == 200
    [revoked] = response.json()["revoked"]
    assert revoked["token_id"] == token["token_id"] and revoked["status"] == "revoked"
    # The engine hears of it through its revocation polling (within a second), then refuses.
    token_id = bytes.fromhex(token["token_id"])
    for _ in range(WAIT_ROUNDS):
        if token_id in running.engine.revoked:
            break
        await asyncio.sleep(WAIT_STEP)
    refused = await handle(running.engine, "/bonus/a.mp3", authorization(macaroon, preimage))
    assert isinstance(refused, Answer) and refused.status == 402
    assert refused.note is not None and refused.note["reason"] == "revoked"
    again = await running.client.post(
        f"/api/tokens/{token['token_id']}/revoke", headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert again.json()["revoked"][0]["revoked_at"] == revoked["revoked_at"]


@pytest.mark.parametrize(
    ("ref", "status", "message"),
    [
        ("xyz-not-hex", 400, "is not hexadecimal"),
        ("abc", 400, "too short"),
        ("0123456789abcdef", 404, "no issued token matches"),
    ],
)
async def test_bad_revocations(running: Admin, ref: str, status: int, message: str) -> None:
    auth = {"Authorization": f"Bearer {SECRET}"}
    response = await running.client.post(f"/api/tokens/{ref}/revoke", headers=auth)
    assert response.status_code == status
    assert message in response.json()["error"]
    listed = await running.client.get(f"/api/tokens/{ref}/revoke", headers=auth)
    assert listed.status_code == 405 and listed.headers["Allow"] == "POST"


async def test_an_ambiguous_revocation_is_409(running: Admin) -> None:
    assert running.engine.store is not None
    store = running.engine.store
    for tail in ("aa", "bb"):
        store.note_issued(
            admin_token(bytes.fromhex("ab" * 31 + tail), bytes.fromhex("cd" * 31 + tail))
        )
    response = await running.client.post(
        "/api/tokens/abababab/revoke", headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert response.status_code == 409
    assert "ambiguous" in response.json()["error"]


def admin_token(token_id: bytes, payment_hash: bytes) -> Any:
    from l402proxy.store import IssuedToken

    return IssuedToken(token_id, payment_hash, "bonus", 100, 1_000.0, None)


async def test_services_show_rules_in_force_and_no_secret(tmp_path: Path) -> None:
    engine = await opened_engine(tmp_path, API)
    server = await AdminServer.start(engine, "127.0.0.1", 0, SECRET)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            response = await client.get(
                f"http://127.0.0.1:{server.port}/api/services",
                headers={"Authorization": f"Bearer {SECRET}"},
            )
    finally:
        await server.close()
        await engine.close()
    answer = response.json()
    assert answer["rules_path"] == str(API) and answer["dry_run"] is False
    by_name = {s["name"]: s for s in answer["services"]}
    assert by_name["quotes"] | {"rate_limits": None} == by_name["quotes"] | {
        "description": "Market quotes API, one hour",
        "mode": "paywall",
        "price_sat": 5,
        "valid_for": 3600,
        "match": {
            "path": "/api/quotes*",
            "host": None,
            "methods": ["GET", "HEAD"],
            "free_paths": [],
        },
        "rate_limits": None,
    }
    assert by_name["health"]["mode"] == "free"
    # The premium variant sets X-L402-Tier for the origin: neither its name nor value shows.
    assert "x-l402-tier" not in response.text.lower()
    assert "set_headers" not in response.text and "upstream" not in response.text


@pytest.mark.parametrize(
    ("pattern", "shown"),
    [
        ("/api/quotes*", "/api/quotes*"),
        ("/a?c/[x]", None),
        ("/plain.path", "/plain.path"),
    ],
)
def test_patterns_are_shown_as_written(pattern: str, shown: str | None) -> None:
    import fnmatch

    compiled = re.compile(fnmatch.translate(pattern))
    assert shown_pattern(compiled) == (shown or f"re:{compiled.pattern}")
    assert shown_pattern(re.compile(r"/x/(\d+)")) == r"re:/x/(\d+)"
    assert shown_pattern(None) is None


async def test_revenue_shows_what_was_paid(running: Admin) -> None:
    await running.buy("/bonus/a.mp3")
    await running.buy("/bonus/b.mp3")
    await running.buy("/episodes/1.mp3")
    await handle(running.engine, "/bonus/c.mp3", OPTED_IN)  # asked, never paid
    await running.flushed()

    hourly = (await running.get("/api/revenue")).json()
    daily = (await running.get("/api/revenue?bucket=day&since=2d")).json()

    for report in (hourly, daily):
        assert report["totals"] == [
            {"service": "bonus", "tokens_sold": 2, "sats": 200},
            {"service": "podcast", "tokens_sold": 1, "sats": 21},
        ]
        assert report["total"] == {"tokens_sold": 3, "sats": 221}
        assert sum(row["sats"] for row in report["rows"]) == 221
    assert hourly["bucket_seconds"] == 3600 and daily["bucket_seconds"] == 86400
    assert hourly["until"] - hourly["since"] == 48 * 3600
    assert all(row["start_at"] % 3600 == 0 for row in hourly["rows"])
    only = (await running.get("/api/revenue?service=podcast")).json()
    assert only["total"] == {"tokens_sold": 1, "sats": 21}
    past = (await running.get("/api/revenue?since=2020-01-01&until=2020-01-02")).json()
    assert past["rows"] == [] and past["total"] == {"tokens_sold": 0, "sats": 0}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("bucket=week", "bucket: 'week' is not one of hour, day"),
        ("since=yesterday", "since: 'yesterday' is not a time"),
        ("until=-5", "until: '-5' is not a time"),
        ("since=1h&until=2h", "must be after since"),
        ("since=0", "buckets of 3600 s"),
        ("since=nan", "is not a time"),
        ("since=1e400", "is not a time"),
        ("since=1h&since=2h", "since is given twice"),
        ("from=1h", "unknown query parameter 'from'"),
    ],
)
async def test_bad_revenue_queries_are_400(running: Admin, query: str, message: str) -> None:
    response = await running.get(f"/api/revenue?{query}")
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_health_says_what_runs_and_when_the_store_fails(running: Admin) -> None:
    healthy = await running.get("/api/health")
    assert healthy.status_code == 200
    assert healthy.json() == {
        "ok": True,
        "door": "test",
        "started": True,
        "dry_run": False,
        "rules": {"path": str(PODCAST), "services": 3},
        "store": {"open": True, "healthy": True, "pending": 0, "dropped": 0},
    }
    assert running.engine.store is not None
    running.engine.store._set_healthy(False)  # type: ignore[attr-defined]
    sick = await running.get("/api/health")
    assert sick.status_code == 503
    assert sick.json()["ok"] is False and sick.json()["store"]["healthy"] is False


async def test_a_store_that_fails_is_503_in_one_line(
    running: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert running.engine.store is not None

    async def broken(**kwargs: object) -> None:
        raise StoreError("store db: connection refused")

    monkeypatch.setattr(running.engine.store, "list_tokens", broken)
    response = await running.get("/api/tokens")
    assert response.status_code == 503
    assert response.json() == {"error": "token store: store db: connection refused"}


async def test_an_unexpected_failure_is_500_without_detail(
    running: Admin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert running.engine.store is not None

    async def broken(**kwargs: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(running.engine.store, "list_tokens", broken)
    response = await running.get("/api/tokens")
    assert response.status_code == 500
    assert "secret detail" not in response.text
    assert "secret detail" in caplog.text  # the log has it, for the operator


# --- each sale told once (store.flush -> the engine's watchers) --------------------------------


class Sales:
    def __init__(self) -> None:
        self.told: list[tuple[str, int]] = []

    def decided(self, decision: object) -> None:
        pass

    def settled(self, door: str, service: str, price_sat: int) -> None:
        self.told.append((service, price_sat))

    def backend_called(self, *args: object) -> None:
        pass

    def store_failed(self, *args: object) -> None:
        pass

    def upstream_answered(self, *args: object) -> None:
        pass


async def test_each_sale_is_told_to_watchers_once(running: Admin) -> None:
    """Also when the admin API's own store reads write the queue before the engine's flush."""
    sales = Sales()
    running.engine.watchers.add(sales)
    macaroon, preimage = await running.buy("/bonus/a.mp3")
    await running.get("/api/tokens")  # writes the queue itself
    await running.buy("/episodes/2.mp3")
    for _ in range(WAIT_ROUNDS):
        if len(sales.told) >= 2:
            break
        await asyncio.sleep(WAIT_STEP)
    running.engine.seen_paid.clear()  # seen paid again, as after a restart
    await handle(running.engine, "/bonus/a.mp3", authorization(macaroon, preimage))
    await running.flushed()
    await asyncio.sleep(0.3)  # one more flush round: nothing more to tell
    assert sorted(sales.told) == [("bonus", 100), ("podcast", 21)]


# --- serving in the running loop -----------------------------------------------------------


async def test_the_server_leaves_signals_and_logging_alone(tmp_path: Path) -> None:
    """It runs inside mitmproxy's (or the app's) loop: SIGINT/SIGTERM stay theirs, and the
    process-wide uvicorn access logger (the ASGI door's host app's) is not emptied."""
    access = logging.getLogger("uvicorn.access")
    handler = logging.NullHandler()
    access.addHandler(handler)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = await opened_engine(tmp_path)
    try:
        server = await AdminServer.start(engine, "127.0.0.1", 0, SECRET)
        assert {sig: signal.getsignal(sig) for sig in before} == before
        await server.close()
        await server.close()  # twice is harmless
        assert {sig: signal.getsignal(sig) for sig in before} == before
        assert handler in access.handlers and access.propagate
    finally:
        access.removeHandler(handler)
        await engine.close()


async def test_close_frees_the_port_even_with_a_client_connected(tmp_path: Path) -> None:
    engine = await opened_engine(tmp_path)
    server = await AdminServer.start(engine, "127.0.0.1", 0, SECRET)
    port = server.port
    client = httpx.AsyncClient(trust_env=False, timeout=20)
    try:
        response = await client.get(
            f"http://127.0.0.1:{port}/api/health", headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert response.status_code == 200  # the connection stays open (keep-alive)
        await asyncio.wait_for(server.close(), 30)
        probe = socket.socket()
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
        finally:
            probe.close()
    finally:
        await client.aclose()
        await engine.close()


# --- the CLI's --admin URL -------------------------------------------------------------------


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in a thread (it blocks), while this loop serves the admin API it calls."""
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "cli-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


async def test_cli_lists_and_revokes_through_the_admin_api_as_through_the_store(
    running: Admin, capsys: pytest.CaptureFixture[str], secret_file: Path
) -> None:
    await running.buy("/bonus/a.mp3")
    await handle(running.engine, "/episodes/1.mp3", OPTED_IN)
    await running.flushed()
    store = str(running.tmp / "server.sqlite")
    via = ["--admin", running.url, "--admin-secret-file", str(secret_file)]

    code, out, err = await cli(capsys, "tokens", "list", *via)
    assert (code, err) == (0, "")
    code, direct, _ = await cli(capsys, "tokens", "list", "--store", store)
    assert code == 0
    assert strip_status(json.loads(out)) == strip_status(json.loads(direct))
    assert len(json.loads(out)) == 2 and "paid_at_iso" in json.loads(out)[0]

    code, out, err = await cli(
        capsys, "tokens", "list", "--service", "podcast", "--limit", "5", *via
    )
    assert code == 0 and [t["service"] for t in json.loads(out)] == ["podcast"]

    token_id = json.loads(out)[0]["token_id"]
    code, out, err = await cli(capsys, "tokens", "revoke", token_id[:10], *via)
    assert (code, err) == (0, "")
    [revoked] = json.loads(out)["revoked"]
    assert revoked["token_id"] == token_id and revoked["status"] == "revoked"
    code, again, _ = await cli(capsys, "tokens", "revoke", token_id, "--store", store)
    assert json.loads(again)["revoked"][0]["revoked_at"] == revoked["revoked_at"]


def strip_status(tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Each answer computes "status" at its own moment; everything else is the same.
    return [{k: v for k, v in t.items() if k != "status"} for t in tokens]


async def test_cli_revenue_through_the_admin_api_and_the_store(
    running: Admin, capsys: pytest.CaptureFixture[str], secret_file: Path
) -> None:
    await running.buy("/bonus/a.mp3")
    await running.buy("/episodes/1.mp3")
    await running.flushed()
    store = str(running.tmp / "server.sqlite")
    until = time.time() + 3600  # both asked for the same range (a relative one moves)
    window = ["--since", str(until - 5 * 86400), "--until", str(until), "--bucket", "day"]

    code, out, err = await cli(
        capsys, "revenue", *window, "--admin", running.url, "--admin-secret-file", str(secret_file)
    )
    assert (code, err) == (0, "")
    code, direct, err = await cli(capsys, "revenue", *window, "--store", store)
    assert (code, err) == (0, "")
    assert json.loads(out) == json.loads(direct)
    assert json.loads(out)["total"] == {"tokens_sold": 2, "sats": 121}
    assert "start_at_iso" in json.loads(out)["rows"][0]


async def test_cli_takes_the_secret_from_the_environment_or_the_default_file(
    running: Admin,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    home: Path,
) -> None:
    code, _, err = await cli(capsys, "tokens", "list", "--admin", running.url)
    assert code == 2
    assert err == (
        f"l402proxy: no admin secret in {home / 'admin-secret'}: give --admin-secret-file "
        "FILE or set $L402PROXY_ADMIN_SECRET\n"
    )
    home.mkdir(parents=True, exist_ok=True)
    (home / "admin-secret").write_text(SECRET)
    (home / "admin-secret").chmod(0o600)
    assert (await cli(capsys, "tokens", "list", "--admin", running.url))[0] == 0
    (home / "admin-secret").write_text("wrong-but-long-enough-secret")
    monkeypatch.setenv(admin.SECRET_ENV, SECRET)
    assert (await cli(capsys, "tokens", "list", "--admin", running.url))[0] == 0


async def test_cli_refuses_a_secret_in_the_environment_that_is_none(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(admin.SECRET_ENV, "short")
    code, _, err = await cli(capsys, "tokens", "list", "--admin", "http://127.0.0.1:1")
    assert (code, err) == (
        2,
        "l402proxy: admin secret: $L402PROXY_ADMIN_SECRET holds no secret of at least 16 "
        "characters\n",
    )


async def test_cli_says_in_one_line_what_went_wrong(
    running: Admin, capsys: pytest.CaptureFixture[str], tmp_path: Path, secret_file: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-but-long-enough-secret")
    wrong.chmod(0o600)
    code, out, err = await cli(
        capsys, "tokens", "list", "--admin", running.url, "--admin-secret-file", str(wrong)
    )
    assert (code, out) == (1, "")
    assert err == (
        f"l402proxy: the admin API at {running.url} refused the secret (401): check "
        "--admin-secret-file or $L402PROXY_ADMIN_SECRET\n"
    )
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = await cli(
        capsys, "tokens", "list", "--admin", closed, "--admin-secret-file", str(secret_file)
    )
    assert code == 1
    assert err.startswith(f"l402proxy: cannot reach the admin API at {closed}: ")
    assert err.count("\n") == 1
    code, _, err = await cli(
        capsys,
        "tokens",
        "revoke",
        "0123456789abcdef",
        "--admin",
        running.url,
        "--admin-secret-file",
        str(secret_file),
    )
    assert (code, err) == (
        1,
        "l402proxy: admin API: no issued token matches '0123456789abcdef' (404)\n",
    )
    loose = tmp_path / "loose"
    loose.write_text(SECRET)
    loose.chmod(0o644)
    code, _, err = await cli(
        capsys, "tokens", "list", "--admin", running.url, "--admin-secret-file", str(loose)
    )
    assert code == 2 and "can be read by others" in err and SECRET not in err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://127.0.0.1:9403", "expected a URL like http://127.0.0.1:9403"),
        ("127.0.0.1:9403", "expected a URL like http://127.0.0.1:9403"),
        ("http://user:pw@127.0.0.1:9403", "expected a URL like"),
        ("http://127.0.0.1:99999", "bad port"),
        ("http://127.0.0.1:9403/#secret=abc", "leave out the #... part"),
        ("http://192.0.2.1:9403", "would send the admin secret in the clear"),
    ],
)
async def test_cli_refuses_an_admin_url_it_cannot_use(
    capsys: pytest.CaptureFixture[str], secret_file: Path, url: str, message: str
) -> None:
    code, _, err = await cli(
        capsys, "tokens", "list", "--admin", url, "--admin-secret-file", str(secret_file)
    )
    assert code == 2 and message in err and err.count("\n") == 1


async def test_cli_store_or_admin_not_both(
    capsys: pytest.CaptureFixture[str], secret_file: Path, tmp_path: Path
) -> None:
    for command in (["tokens", "list"], ["revenue"]):
        code, _, err = await cli(
            capsys,
            *command,
            "--admin",
            "http://127.0.0.1:1",
            "--store",
            str(tmp_path / "s"),
            "--admin-secret-file",
            str(secret_file),
        )
        assert (code, err) == (2, "l402proxy: give --store or --admin, not both\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "soon"], "since: 'soon' is not a time"),
        (["--since", "1h", "--until", "2h"], "must be after since"),
        (["--since", "2000-01-01"], "buckets of 3600 s"),
    ],
)
async def test_cli_revenue_refuses_a_bad_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    code, _, err = await cli(capsys, "revenue", *args, "--store", str(tmp_path / "s.sqlite"))
    assert code == 2 and message in err
    assert not (tmp_path / "s.sqlite").exists()


def test_serve_auth_passes_the_operations_options_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from l402proxy.doors import nginx

    seen: dict[str, Any] = {}

    def run_service(engine: Paywall, sock: socket.socket, **options: Any) -> list[str]:
        sock.close()
        seen.update(options)
        return []

    monkeypatch.setattr(nginx, "run_service", run_service)
    common = [
        "serve-auth",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--rules",
        str(PODCAST),
        "--store",
        str(tmp_path / "s.sqlite"),
        "--dev-ledger",
        str(tmp_path / "d"),
    ]
    assert main(common) == 0
    assert seen == {
        "metrics": "",
        "log_format": "text",
        "dry_run": False,
        "admin": "",
        "admin_secret": "",
        "ops_remote": False,
    }
    assert (
        main(
            [
                *common,
                "--metrics",
                "127.0.0.1:9402",
                "--log-format",
                "json",
                "--dry-run",
                "--admin",
                "127.0.0.1:9403",
                "--admin-secret",
                "/x/secret",
                "--ops-remote",
            ]
        )
        == 0
    )
    assert seen == {
        "metrics": "127.0.0.1:9402",
        "log_format": "json",
        "dry_run": True,
        "admin": "127.0.0.1:9403",
        "admin_secret": "/x/secret",
        "ops_remote": True,
    }
