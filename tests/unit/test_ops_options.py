"""The operations options of every door (ops/__init__.py's OpsSettings and Operations): a bad
value stops the door before it serves, a non-loopback address needs the operator's say-so, and
the endpoints start after the engine opens and are gone when it closes."""

import asyncio
import logging
import re
from pathlib import Path

import pytest
from mitmproxy import ctx
from mitmproxy.test import taddons

from l402proxy.doors import nginx
from l402proxy.doors.mitmproxy import L402Server
from l402proxy.engine import Paywall
from l402proxy.launch import REPO
from l402proxy.ops import Operations, OpsError, OpsSettings
from l402proxy.ops.listen import ListenError, bind, parse_listen
from tests.e2e.procs import free_port
from tests.unit.test_asgi_door import middleware
from tests.unit.test_options import deferred, errors, rules_set, running_server

RULES = REPO / "rules" / "podcast.yaml"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9402", "is not host:port"),
        ("127.0.0.1:", "is not a number from 1 to 65535"),
        ("127.0.0.1:70000", "is not a number from 1 to 65535"),
        ("::1:9402", "write an IPv6 address in brackets"),
        ("[::1", "is not [IPv6]:port"),
        ("0.0.0.0:9402", "0.0.0.0 is not a loopback address"),
        ("192.0.2.1:9402", "192.0.2.1 is not a loopback address"),
        ("example.com:9402", "example.com is not a loopback address"),
    ],
)
def test_a_bad_listen_address_is_one_line_naming_the_option(value: str, message: str) -> None:
    with pytest.raises(ListenError, match=re.escape(message)) as caught:
        parse_listen(value, option="l402_metrics")
    assert str(caught.value).startswith("l402_metrics: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9402", ("127.0.0.1", 9402)),
        ("localhost:9402", ("localhost", 9402)),
        ("[::1]:9402", ("::1", 9402)),
        (":9402", ("127.0.0.1", 9402)),
    ],
)
def test_loopback_addresses_are_taken(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value, option="l402_metrics") == expected


def test_other_machines_only_when_allowed() -> None:
    assert parse_listen("0.0.0.0:9402", option="x", allow_remote=True) == ("0.0.0.0", 9402)
    settings = OpsSettings(metrics="0.0.0.0:1", admin="192.0.2.1:2")
    assert [setting for setting, _ in settings.problems()] == ["metrics", "admin"]
    assert OpsSettings(metrics="0.0.0.0:1", admin="192.0.2.1:2", allow_remote=True).problems() == []


def test_an_unknown_log_format_is_refused() -> None:
    problems = OpsSettings(log_format="xml").problems({"log_format": "--log-format"})
    assert problems == [("log_format", "--log-format: 'xml' is not one of text, json")]


def test_a_port_in_use_is_one_line() -> None:
    taken = bind("127.0.0.1", 0, option="x")
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"l402_admin: cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port, option="l402_admin").close()
    finally:
        taken.close()


# -- the mitmproxy door -------------------------------------------------------------------------


@pytest.fixture
def tctx() -> taddons.context:
    with taddons.context() as context:
        yield context


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("l402_metrics=0.0.0.0:9402", "l402_metrics: 0.0.0.0 is not a loopback address"),
        ("l402_admin=192.0.2.7:9403", "l402_admin: 192.0.2.7 is not a loopback address"),
        ("l402_metrics=9402", "l402_metrics: '9402' is not host:port"),
    ],
)
def test_the_proxy_refuses_a_bad_ops_option_at_start(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture, spec: str, message: str
) -> None:
    server = L402Server()
    deferred(tctx, server, *rules_set(spec))
    assert any(message in line for line in errors(caplog)), errors(caplog)
    assert server.misconfigured  # nothing is forwarded while an option is refused


def test_a_bad_log_format_is_refused(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture
) -> None:
    server = L402Server()
    deferred(tctx, server, *rules_set("l402_log_format=xml"))
    assert server.misconfigured
    assert any("l402_log_format" in line for line in errors(caplog)), errors(caplog)


def test_a_remote_address_is_taken_when_allowed(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture
) -> None:
    server = L402Server()
    deferred(tctx, server, *rules_set("l402_metrics=0.0.0.0:9402", "l402_ops_remote=true"))
    assert errors(caplog) == []
    assert not server.misconfigured


async def test_only_the_dry_run_changes_while_running(
    tmp_path: Path, tctx: taddons.context
) -> None:
    async with running_server(tmp_path, tctx) as server:
        assert not server.engine.dry_run
        ctx.options.update(l402_dry_run=True)
        assert server.engine.dry_run
        ctx.options.update(l402_dry_run=False)
        assert not server.engine.dry_run
        with pytest.raises(Exception, match="cannot change while running"):
            ctx.options.update(l402_metrics="127.0.0.1:9402")


# -- the ASGI door and serve-auth -----------------------------------------------------------------


async def app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called")


def test_the_middleware_refuses_a_bad_ops_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metrics: 192\.0\.2\.1 is not a loopback address"):
        middleware(tmp_path, app, metrics="192.0.2.1:9402")
    with pytest.raises(ValueError, match="log_format: 'yaml' is not one of text, json"):
        middleware(tmp_path, app, log_format="yaml")


def test_serve_auth_refuses_a_bad_ops_value_before_serving(tmp_path: Path) -> None:
    engine = nginx.make_engine(str(RULES), "dev", str(tmp_path / "s.sqlite"), str(tmp_path / "d"))
    sock = bind("127.0.0.1", 0, option="--listen")
    problems = nginx.run_service(engine, sock, admin="0.0.0.0:9403", log_format="yaml")
    assert problems == [
        "--admin: 0.0.0.0 is not a loopback address; listen on 127.0.0.1 or ::1, or allow "
        "other machines explicitly (and put TLS in front)",
        "--log-format: 'yaml' is not one of text, json",
    ]
    assert sock.fileno() == -1  # closed: nothing listens


# -- Operations ----------------------------------------------------------------------------------


async def opened_engine(tmp_path: Path) -> Paywall:
    engine = Paywall(door="test")
    engine.use_rules_file(str(RULES))
    engine.use_backend("dev", dev_ledger=str(tmp_path / "devledger.sqlite"))
    engine.store_uri = str(tmp_path / "server.sqlite")
    await engine.open()
    return engine


async def test_a_failed_endpoint_leaves_nothing_behind(tmp_path: Path) -> None:
    engine = await opened_engine(tmp_path)
    taken = bind("127.0.0.1", 0, option="x")
    try:
        port = taken.getsockname()[1]
        ops = Operations(OpsSettings(log_format="json", metrics=f"127.0.0.1:{port}"), "test")
        with pytest.raises(OpsError, match=f"cannot listen on 127.0.0.1:{port}"):
            await ops.start(engine)
        # The JSON log handler and the watchers that started before the failure are gone.
        assert not engine.watchers
        assert logging.getLogger("l402proxy").propagate
    finally:
        taken.close()
        await engine.close()


async def test_the_dry_run_setting_reaches_the_engine(tmp_path: Path) -> None:
    engine = await opened_engine(tmp_path)
    try:
        ops = Operations(OpsSettings(dry_run=True), "test")
        await ops.start(engine)
        assert engine.dry_run
        await ops.close()
    finally:
        await engine.close()


async def test_metrics_and_admin_listen_while_started_and_stop_after(tmp_path: Path) -> None:
    engine = await opened_engine(tmp_path)
    try:
        ops = Operations(
            OpsSettings(
                metrics=f"127.0.0.1:{free_port()}",
                admin=f"127.0.0.1:{free_port()}",
                admin_secret=str(tmp_path / "admin-secret"),
            ),
            "test",
        )
        await ops.start(engine)
        ports = [ops.metrics_port, ops.admin_port]
        for port in ports:
            assert port is not None
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        await ops.close()
        for port in ports:
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
        assert not engine.watchers
    finally:
        await engine.close()
