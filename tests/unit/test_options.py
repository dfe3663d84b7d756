"""The option lifecycle both addons share (l402proxy/options.py), in mitmproxy's test context.

`--set` values for a script's options wait in mitmproxy's `options.deferred` until the script's
load() declares them; `deferred()` below puts them there as mitmdump's command line does, then
registers the addon as mitmproxy's script loader does.
"""

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from mitmproxy import ctx, exceptions, hooks
from mitmproxy.addons import errorcheck, script
from mitmproxy.test import taddons, tflow

from l402proxy import options
from l402proxy.client import L402Client
from l402proxy.doors.mitmproxy import L402Server
from l402proxy.launch import REPO
from l402proxy.options import (
    OPTION_NAMES,
    AddonName,
    OptionGuard,
    bad_value,
    is_ours,
    mitmproxy_is_starting,
    unknown_option,
)

RULES = REPO / "rules" / "podcast.yaml"
Addon = L402Server | L402Client


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default stores and ledgers land in tmp_path, never in the real ~/.l402proxy."""
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def tctx() -> Iterator[taddons.context]:
    with taddons.context() as context:
        yield context


def deferred(tctx: taddons.context, addon: Addon, *specs: str, **config: object) -> None:
    """`mitmdump --set spec...` (and config.yaml entries), then the script's addon loads and is
    configured with every option, as mitmproxy's script loader does."""
    tctx.options.set(*specs, defer=True)
    tctx.options.update_defer(**config)
    # mitmproxy's register() (under add()) calls load(), then converts what is still deferred:
    # before the fix a bad value raised here, and the script loader dropped the addon silently.
    tctx.master.addons.add(addon)
    tctx.master.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(tctx.options.keys())))


def rules_set(*specs: str) -> tuple[str, ...]:
    return (f"l402_rules={RULES}", *specs)


@contextlib.asynccontextmanager
async def running_server(tmp_path: Path, tctx: taddons.context) -> AsyncIterator[L402Server]:
    """The server addon started as mitmdump starts it (deferred options, then running)."""
    server = L402Server()
    deferred(
        tctx,
        server,
        *rules_set(
            f"l402_store={tmp_path / 'server.sqlite'}",
            f"l402_dev_ledger={tmp_path / 'devledger.sqlite'}",
        ),
    )
    await server.running()
    try:
        yield server
    finally:
        await server.done()


# -- what each addon declares ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "addon"), [("server", L402Server), ("client", L402Client)])
def test_the_option_table_is_what_each_addon_declares(
    tctx: taddons.context, name: AddonName, addon: type[Addon]
) -> None:
    tctx.master.addons.register(addon())
    declared = {key for key in set(tctx.options.keys()) if key.startswith("l402_")}
    # A new option belongs in options.OPTION_NAMES too, or the other addon calls it a typo.
    assert declared == OPTION_NAMES[name]


# -- values given at start -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addon", "specs", "refused", "message"),
    [
        (
            L402Server,
            rules_set("l402_offer_upgrade=yes"),
            "l402_offer_upgrade",
            "l402_offer_upgrade: 'yes' is not true or false",
        ),
        (
            L402Client,
            ("l402_max_price_sat=abc",),
            "l402_max_price_sat",
            "l402_max_price_sat: 'abc' is not a whole number",
        ),
        (
            L402Client,
            ("l402_budget_total_sat=lots",),
            "l402_budget_total_sat",
            "l402_budget_total_sat: 'lots' is not a whole number, or empty for none",
        ),
        (
            L402Client,
            ("l402_wallet=dev", "l402_wallet=dev:fan"),
            "l402_wallet",
            "l402_wallet: set 2 times ('dev', 'dev:fan'); set it once",
        ),
        (L402Server, ("l402_rules",), "l402_rules", "l402_rules: needs a value (l402_rules=...)"),
    ],
)
def test_a_value_mitmproxy_cannot_convert_is_refused_not_the_addon_dropped(
    tctx: taddons.context,
    caplog: pytest.LogCaptureFixture,
    addon: type[Addon],
    specs: tuple[str, ...],
    refused: str,
    message: str,
) -> None:
    instance = addon()
    deferred(tctx, instance, *specs)
    assert errors(caplog)[0] == f"l402: {message}"
    assert instance.misconfigured[refused] == message
    assert not [name for name in tctx.options.deferred if name.startswith("l402_")]
    assert getattr(tctx.options, refused) == tctx.options.default(refused)  # never applied


def test_good_values_given_at_start_apply(tctx: taddons.context) -> None:
    client = L402Client()
    deferred(
        tctx,
        client,
        "l402_max_price_sat=50",
        "l402_allow=example.com",
        "l402_allow=*.example.org",
        "l402_budget_total_sat=",
        "l402_fallback_free",
        "l402_clients=10.0.0.0/8, ::1",
    )
    assert client.misconfigured == {}
    assert tctx.options.l402_max_price_sat == 50
    assert list(tctx.options.l402_allow) == ["example.com", "*.example.org"]
    assert tctx.options.l402_budget_total_sat is None
    assert tctx.options.l402_fallback_free is True
    assert client.limits.max_price_sat == 50
    assert [str(n) for n in client.clients] == ["10.0.0.0/8", "::1/128"]


def test_config_file_values_are_type_checked_the_same_way(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture
) -> None:
    client = L402Client()
    deferred(tctx, client, l402_max_price_sat="abc", l402_allow=["example.com"])
    assert errors(caplog) == ["l402: l402_max_price_sat: 'abc' is not a whole number"]
    assert list(tctx.options.l402_allow) == ["example.com"]


@pytest.mark.parametrize(
    ("addon", "spec", "message"),
    [
        (L402Server, "l402_rule=x", "unknown option l402_rule (did you mean l402_rules?)"),
        (L402Server, "l402-rules=x", "unknown option l402-rules (did you mean l402_rules?)"),
        (
            L402Client,
            "l402_max_price=5",
            "unknown option l402_max_price (did you mean l402_max_price_sat?)",
        ),
        (
            L402Server,
            "l402_wallet=dev",
            "l402_wallet is a client option (addons/client.py); "
            "this is the server addon (addons/server.py)",
        ),
        (
            L402Client,
            "l402_backend=dev",
            "l402_backend is a server option (addons/server.py); "
            "this is the client addon (addons/client.py)",
        ),
    ],
)
def test_an_unknown_l402_name_is_refused_with_the_name_meant(
    tctx: taddons.context,
    caplog: pytest.LogCaptureFixture,
    addon: type[Addon],
    spec: str,
    message: str,
) -> None:
    instance = addon()
    deferred(tctx, instance, *(rules_set(spec) if addon is L402Server else (spec,)))
    assert errors(caplog) == [f"l402: {message}"]
    assert list(instance.misconfigured.values()) == [message]


def test_a_name_far_from_any_option_lists_them() -> None:
    message = unknown_option("l402_zzzzzzzz", "server", OPTION_NAMES["server"])
    assert message.startswith("unknown option l402_zzzzzzzz; the server addon has l402_admin, ")


def test_other_addons_options_are_left_to_mitmproxy(tctx: taddons.context) -> None:
    server = L402Server()
    deferred(tctx, server, *rules_set("some_other_script_option=1"))
    assert server.misconfigured == {}
    assert "some_other_script_option" in tctx.options.deferred


def test_a_value_refused_at_start_stays_refused_until_a_restart(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture
) -> None:
    client = L402Client()
    deferred(tctx, client, "l402_wallet=dev", "l402_wallet=dev:fan")
    # The option still holds its default, which is good: it must not clear the refusal.
    tctx.configure(client, l402_wallet="dev:other")
    assert set(client.misconfigured) == {"l402_wallet"}
    assert len(errors(caplog)) == 1  # the cause, said once


def test_is_ours_reads_misspellings_too() -> None:
    assert is_ours("l402_rules") and is_ours("L402_Rules") and is_ours("l402-rules")
    assert not is_ours("listen_port") and not is_ours("l402")


def test_bad_value_messages() -> None:
    assert bad_value("l402_x", int, ["1", "2"], "") == "l402_x: set 2 times ('1', '2'); set it once"
    assert bad_value("l402_x", bool, ["maybe"], "") == "l402_x: 'maybe' is not true or false"
    assert bad_value("l402_x", bool, "maybe", "") == "l402_x: 'maybe' is not true or false"
    assert bad_value("l402_x", float, ["x"], "why") == "l402_x: 'x': why"
    # config.yaml values come typed
    assert bad_value("l402_x", Sequence[str], "a.example", "") == (
        "l402_x: 'a.example' is not a list of text values"
    )
    assert bad_value("l402_x", str, 5, "") == "l402_x: 5 is not a text value"


# -- the server without rules ----------------------------------------------------------------------


async def test_a_server_without_rules_is_an_error_and_fails_closed(
    tctx: taddons.context, caplog: pytest.LogCaptureFixture
) -> None:
    server = L402Server()
    deferred(tctx, server)
    assert errors(caplog) == [
        "l402: l402_rules: not set: give the rules file, --set l402_rules=<file> (see rules/*.yaml)"
    ]
    flow = tflow.tflow()
    await server.request(flow)
    assert flow.response is not None and flow.response.status_code == 503


# -- while running ---------------------------------------------------------------------------------


def test_while_running_a_refusal_is_an_options_error() -> None:
    guard = OptionGuard("client")
    with pytest.raises(exceptions.OptionsError, match=r"^l402_pay_timeout: too short$"):
        guard.refuse("l402_pay_timeout", "too short", running=True)
    assert guard.misconfigured == {}


def test_before_running_a_refusal_is_logged_and_accept_clears_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    misconfigured: dict[str, str] = {}
    guard = OptionGuard("server", misconfigured)
    guard.refuse("l402_backend", "l402_backend is broken", running=False)
    assert misconfigured == {"l402_backend": "l402_backend is broken"}  # named once, not twice
    assert errors(caplog) == ["l402: l402_backend is broken"]
    guard.accept("l402_backend")
    assert misconfigured == {}


async def test_a_server_cleared_of_its_rules_while_running_keeps_them(
    tmp_path: Path, tctx: taddons.context
) -> None:
    async with running_server(tmp_path, tctx) as server:
        assert server.started
        rules = server.rules
        with pytest.raises(exceptions.OptionsError, match="l402_rules: not set"):
            ctx.options.update(l402_rules="")
        assert server.rules == rules and ctx.options.l402_rules == str(RULES)
        # The store is opened at start only: another one is refused, the old value stays.
        with pytest.raises(exceptions.OptionsError, match="l402_store cannot change while"):
            ctx.options.update(l402_store=str(tmp_path / "other.sqlite"))
        assert ctx.options.l402_store == str(tmp_path / "server.sqlite")
        assert not server.misconfigured


# -- stopping mitmproxy at startup ---------------------------------------------------------------


class Exited(Exception):
    """What exit_now does here instead of ending pytest."""


def exit_raising(status: int) -> None:
    raise Exited(status)


@pytest.fixture(autouse=True)
def _no_real_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "exit_now", exit_raising)


@pytest.fixture
def starting_tool(tctx: taddons.context) -> Iterator[errorcheck.ErrorCheck]:
    """The addons a real mitmdump has while it starts: errorcheck, a script loader."""
    checker = errorcheck.ErrorCheck()
    try:
        tctx.master.addons.add(checker, script.ScriptLoader())
        yield checker
    finally:
        checker.finish()  # it watches the root logger until told to stop


def test_a_refusal_at_startup_stops_mitmproxy_before_it_serves(
    tctx: taddons.context, starting_tool: errorcheck.ErrorCheck
) -> None:
    assert mitmproxy_is_starting()
    with pytest.raises(Exited) as stopped:
        deferred(tctx, L402Server(), *rules_set("l402_offer_upgrade=yes"))
    assert stopped.value.args == (1,)


def test_a_good_start_is_not_stopped(
    tctx: taddons.context, starting_tool: errorcheck.ErrorCheck
) -> None:
    server = L402Server()
    deferred(tctx, server, *rules_set())
    assert server.misconfigured == {}


def test_the_console_gets_the_reason_on_stderr(
    tctx: taddons.context, capsys: pytest.CaptureFixture[str]
) -> None:
    checker = errorcheck.ErrorCheck(repeat_errors_on_stderr=True)
    try:
        tctx.master.addons.add(checker, script.ScriptLoader())
        with pytest.raises(Exited):
            deferred(tctx, L402Client(), "l402_max_price_sat=abc")
    finally:
        checker.finish()
    assert capsys.readouterr().err == "l402: l402_max_price_sat: 'abc' is not a whole number\n"


def test_once_running_mitmproxy_is_not_stopped(
    tctx: taddons.context, starting_tool: errorcheck.ErrorCheck
) -> None:
    # A script reloaded while the proxy runs (its file edited): the addon fails closed only.
    tctx.master.addons.trigger(hooks.RunningHook())
    assert not mitmproxy_is_starting()
    client = L402Client()
    deferred(tctx, client, "l402_max_price_sat=abc")
    assert set(client.misconfigured) == {"l402_max_price_sat"}


def test_mitmproxys_test_context_is_no_startup(tctx: taddons.context) -> None:
    assert not mitmproxy_is_starting()


# -- mitmproxy options the paywall cannot run with -----------------------------------------------


@pytest.fixture
def with_streaming_option(tctx: taddons.context) -> None:
    # Declared by mitmproxy's proxyserver addon, which the test context does not load.
    tctx.options.add_option("stream_large_bodies", str | None, None, "as mitmproxy's")


@pytest.mark.usefixtures("with_streaming_option")
def test_stream_large_bodies_is_refused_at_start(
    tmp_path: Path, tctx: taddons.context, caplog: pytest.LogCaptureFixture
) -> None:
    """With it, mitmproxy streams a large request body to the origin before the paywall's
    request hook: a POST to a priced API reached the origin unpaid."""
    server = L402Server()
    deferred(tctx, server, *rules_set(f"l402_store={tmp_path / 'server.sqlite'}"))
    tctx.options.update(stream_large_bodies="1k")
    assert "stream_large_bodies" in server.misconfigured
    assert errors(caplog)[-1].startswith("l402: stream_large_bodies: not with the paywall")


@pytest.mark.usefixtures("with_streaming_option")
async def test_stream_large_bodies_is_refused_while_running(
    tmp_path: Path, tctx: taddons.context
) -> None:
    async with running_server(tmp_path, tctx):
        with pytest.raises(exceptions.OptionsError, match="stream_large_bodies: not with"):
            ctx.options.update(stream_large_bodies="1k")
        assert not ctx.options.stream_large_bodies
