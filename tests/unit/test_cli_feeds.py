"""`l402proxy feeds list|revoke|rotate`: listeners' private feed URLs in the server store (a
SQLite file or a real PostgreSQL, chosen as for `tokens`), through the CLI's entry point; the
stored credentials never shown."""

import asyncio
import json
import os
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from l402proxy.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from l402proxy.store import TokenStore, open_server_store
from l402proxy.store.database import FeedAccess, is_feed_capability
from tests.e2e.procs import cli
from tests.postgres import PostgresServer
from tests.unit import test_cli_wallet
from tests.unit.test_store_feeds import FAR, credential, feed_for

home = test_cli_wallet.home  # a fixture: L402PROXY_HOME in tmp_path
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def on(uri: str, job: Callable[[TokenStore], Coroutine[Any, Any, Any]]) -> Any:
    """Run `job` on the store at `uri`, as the paywall would have (its own event loop)."""

    async def go() -> Any:
        store = await open_server_store(uri)
        try:
            return await job(store)
        finally:
            await store.close()

    return asyncio.run(go())


def made(
    uri: str, token: bytes, feed: str = "/feed.xml", secret: str = "", **kwargs: Any
) -> FeedAccess:
    secret = secret or credential()
    return on(uri, lambda s: feed_for(s, token, feed, secret=secret, **kwargs))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(params=["sqlite", "postgresql"])
def uri(request: pytest.FixtureRequest, tmp_path: Path, home: Path) -> str:
    """A fresh server store, never the default one (under `home`)."""
    if request.param == "sqlite":
        return str(tmp_path / "server.sqlite")
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return asyncio.run(postgres.new_database())


# --- list -----------------------------------------------------------------------------------


def test_list_shows_the_active_accesses_in_columns(
    capsys: pytest.CaptureFixture[str], uri: str
) -> None:
    secret = credential()
    token = os.urandom(32)
    active = made(uri, token, secret=secret, valid_until=FAR, when=300.0)
    forever = made(uri, os.urandom(32), "/bonus.xml", valid_until=None, when=400.0)
    expired = made(uri, os.urandom(32), valid_until=250.0, when=200.0)
    revoked = made(uri, os.urandom(32), when=100.0)
    on(uri, lambda s: s.revoke_feeds(revoked.capability, 500.0))

    code, out, err = run(capsys, "feeds", "list", "--store", uri)

    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert header == (
        "CAPABILITY              TOKEN         SERVICE  STATUS  VALID UNTIL           FEED PATH"
    )
    assert [line.split() for line in lines] == [
        [
            forever.capability,
            forever.token_id.hex()[:12],
            "podcast",
            "active",
            "never",
            f"/.l402/feed/{forever.capability}/bonus.xml",
        ],
        [
            active.capability,
            token.hex()[:12],
            "podcast",
            "active",
            "2096-10-02T07:06:40Z",
            f"/.l402/feed/{active.capability}/feed.xml",
        ],
    ]
    # Columns line up: each path starts where the header says.
    assert {line.index("/.l402/") for line in lines} == {header.index("FEED PATH")}
    assert secret not in out
    assert expired.capability not in out and revoked.capability not in out

    code, out, err = run(capsys, "feeds", "list", "--all", "--store", uri)
    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(row[0], row[3]) for row in rows] == [
        (forever.capability, "active"),
        (active.capability, "active"),
        (expired.capability, "expired"),
        (revoked.capability, "revoked"),
    ]
    code, out, _ = run(capsys, "feeds", "list", "--all", "--limit", "1", "--store", uri)
    assert [line.split()[0] for line in out.splitlines()[1:]] == [forever.capability]


def test_list_json_has_no_credential_and_iso_twins(
    capsys: pytest.CaptureFixture[str], uri: str
) -> None:
    secret = credential()
    access = made(uri, os.urandom(32), secret=secret, valid_until=FAR, when=1_796_534_502.0)

    code, out, err = run(capsys, "feeds", "list", "--json", "--store", uri)

    assert (code, err) == (0, "")
    assert secret not in out
    [listed] = json.loads(out)
    assert listed == {
        "capability": access.capability,
        "token_id": access.token_id.hex(),
        "service": "podcast",
        "feed": "/feed.xml",
        "path": f"/.l402/feed/{access.capability}/feed.xml",
        "valid_until": FAR,
        "valid_until_iso": "2096-10-02T07:06:40Z",
        "created_at": 1_796_534_502.0,
        "created_at_iso": "2026-12-06T05:21:42Z",
        "revoked_at": None,
        "revoked_at_iso": None,
        "status": "active",
    }


def test_an_empty_list_says_so(capsys: pytest.CaptureFixture[str], uri: str) -> None:
    assert run(capsys, "feeds", "list", "--store", uri) == (0, "no active feed accesses\n", "")
    assert run(capsys, "feeds", "list", "--all", "--store", uri) == (0, "no feed accesses\n", "")
    assert run(capsys, "feeds", "list", "--json", "--store", uri) == (0, "[]\n", "")


# --- revoke ---------------------------------------------------------------------------------


def test_revoke_by_capability_then_again(capsys: pytest.CaptureFixture[str], uri: str) -> None:
    secret = credential()
    token = os.urandom(32)
    access = made(uri, token, secret=secret)
    kept = made(uri, token, "/bonus.xml")

    code, out, err = run(capsys, "feeds", "revoke", access.capability, "--store", uri)

    assert (code, err) == (0, "")
    assert out == f"revoked {access.path} (token {token.hex()[:12]}, podcast)\n"
    found = on(uri, lambda s: s.feed_access(access.capability))
    assert found.status() == "revoked"
    assert [a.capability for a in on(uri, lambda s: s.list_feeds())] == [kept.capability]

    # Revoked already: said on stderr, nothing on stdout, done (exit 0).
    code, out, err = run(capsys, "feeds", "revoke", access.capability, "--store", uri)
    assert (code, out) == (0, "")
    assert err == (
        f"l402proxy: nothing to revoke: every feed access '{access.capability}' names was "
        "revoked already\n"
    )
    assert secret not in out + err


def test_revoke_by_token_prefix_revokes_every_feed_of_the_token(
    capsys: pytest.CaptureFixture[str], uri: str
) -> None:
    token = os.urandom(32)
    accesses = [made(uri, token, feed) for feed in ("/a.xml", "/b.xml")]
    other = made(uri, os.urandom(32))

    code, out, err = run(capsys, "feeds", "--store", uri, "revoke", token.hex()[:8].upper())

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"revoked {a.path} (token {token.hex()[:12]}, podcast)" for a in accesses
    ]
    assert [a.capability for a in on(uri, lambda s: s.list_feeds())] == [other.capability]


@pytest.mark.parametrize("command", ["revoke", "rotate"])
def test_unknown_and_bad_references_fail_in_one_line(
    capsys: pytest.CaptureFixture[str], uri: str, command: str
) -> None:
    """As for `tokens revoke`: a store error, exit 1, one line on stderr, nothing changed."""
    made(uri, bytes(32))
    made(uri, bytes(31) + b"\x01")
    for ref, message in [
        ("deadbeef", "no feed access matches 'deadbeef'"),
        ("AAAAAAAAAAAAAAAAAAAAA_", "no feed access matches 'AAAAAAAAAAAAAAAAAAAAA_'"),
        ("0000000", "feed reference '0000000' is too short"),
        ("nope", "feed reference 'nope' is neither a capability"),
        ("00000000", "'00000000' is ambiguous: it matches 2 tokens with feed accesses"),
    ]:
        code, out, err = run(capsys, "feeds", command, ref, "--store", uri)
        assert (code, out) == (EXIT_FAILED, "")
        assert err.startswith(f"l402proxy: {message}"), err
        assert err.count("\n") == 1
    assert len(on(uri, lambda s: s.list_feeds())) == 2


# --- rotate ---------------------------------------------------------------------------------


def test_rotate_prints_the_new_urls(capsys: pytest.CaptureFixture[str], uri: str) -> None:
    secret = credential()
    token = os.urandom(32)
    olds = [made(uri, token, feed, secret=secret) for feed in ("/a.xml", "/show/b.xml")]

    code, out, err = run(
        capsys,
        "feeds",
        "rotate",
        token.hex()[:10],
        "--base-url",
        " https://pod.example.com:8443/ ",
        "--store",
        uri,
    )

    assert (code, err) == (0, "")
    urls = out.splitlines()
    assert [re.sub(r"/feed/[^/]+/", "/feed/CAP/", url) for url in urls] == [
        "https://pod.example.com:8443/.l402/feed/CAP/a.xml",
        "https://pod.example.com:8443/.l402/feed/CAP/show/b.xml",
    ]
    fresh = [url.split("/.l402/feed/")[1].split("/")[0] for url in urls]
    assert all(is_feed_capability(cap) for cap in fresh)
    active = on(uri, lambda s: s.list_feeds())
    assert sorted(a.capability for a in active) == sorted(fresh)
    assert {a.credential for a in active} == {secret}
    for old in olds:
        assert on(uri, lambda s, cap=old.capability: s.feed_access(cap)).status() == "revoked"
    assert secret not in out

    # Without --base-url: the paths; a revoked access has nothing to rotate.
    code, out, err = run(capsys, "feeds", "rotate", fresh[0], "--store", uri)
    assert (code, err) == (0, "")
    [path] = out.splitlines()
    assert re.fullmatch(r"/\.l402/feed/[A-Za-z0-9_-]{22}/a\.xml", path)
    code, out, err = run(capsys, "feeds", "rotate", fresh[0], "--store", uri)
    assert (code, out) == (0, "")
    assert err.startswith(f"l402proxy: nothing to rotate: every feed access '{fresh[0]}' names")


def test_rotating_an_expired_access_warns(capsys: pytest.CaptureFixture[str], uri: str) -> None:
    access = made(uri, os.urandom(32), valid_until=50.0, when=10.0)
    code, out, err = run(capsys, "feeds", "rotate", access.capability, "--store", uri)
    assert code == 0
    [path] = out.splitlines()
    assert err == (
        f"l402proxy: warning: the token of {path} has expired: its new feed URL opens nothing\n"
    )


@pytest.mark.parametrize(
    "base",
    [
        "pod.example.com",
        "ftp://pod.example.com",
        "https://",
        "https://user:pw@pod.example.com",
        "https://pod.example.com/?x=1",
        "https://pod.example.com/#top",
        "https://pod.example.com:99999",
    ],
)
def test_a_bad_base_url_is_bad_input_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], uri: str, base: str
) -> None:
    access = made(uri, os.urandom(32))
    code, out, err = run(
        capsys, "feeds", "rotate", access.capability, "--base-url", base, "--store", uri
    )
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert err.startswith("l402proxy: --base-url: ")
    assert err.count("\n") == 1
    assert on(uri, lambda s: s.feed_access(access.capability)) == access


# --- choosing the store ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_default_store_and_store_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, home: Path, where: str
) -> None:
    default = made(str(home / "server.sqlite"), os.urandom(32))
    elsewhere = made(str(tmp_path / "elsewhere.sqlite"), os.urandom(32))
    option = ["--store", str(tmp_path / "elsewhere.sqlite")]

    _, out, _ = run(capsys, "feeds", "list", "--json")
    assert [a["capability"] for a in json.loads(out)] == [default.capability]
    argv = ["feeds", *option, "list", "--json"] if where == "before" else None
    argv = argv or ["feeds", "list", "--json", *option]
    _, out, _ = run(capsys, *argv)
    assert [a["capability"] for a in json.loads(out)] == [elsewhere.capability]


def test_limit_below_one_fails(capsys: pytest.CaptureFixture[str], uri: str) -> None:
    assert run(capsys, "feeds", "list", "--limit", "0", "--store", uri) == (
        EXIT_FAILED,
        "",
        "l402proxy: limit must be at least 1, got 0\n",
    )


def test_the_command_on_postgresql_never_shows_the_password(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """The installed command, as an operator runs it (a process of its own)."""
    uri = asyncio.run(postgres.new_database())
    secret = credential()
    access = made(uri, os.urandom(32), secret=secret)

    listed = cli(tmp_path, "feeds", "list", "--store", uri)
    assert (listed.returncode, listed.stderr) == (0, "")
    assert access.path in listed.stdout
    revoked = cli(tmp_path, "feeds", "revoke", access.capability, "--store", uri)
    assert (revoked.returncode, revoked.stderr) == (0, "")
    unknown = cli(tmp_path, "feeds", "revoke", "deadbeef", "--store", uri)
    assert unknown.returncode == EXIT_FAILED
    assert unknown.stderr.startswith("l402proxy: no feed access matches 'deadbeef'")
    wrong = uri.replace(postgres.password, "Wr0ng-" + postgres.password)
    refused = cli(tmp_path, "feeds", "list", "--store", wrong)
    assert refused.returncode == EXIT_FAILED
    assert "password authentication failed" in refused.stderr
    for result in (listed, revoked, unknown, refused):
        assert secret not in result.stdout + result.stderr
        assert postgres.password not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
