"""The server addon in-process, with mitmproxy's own test helpers (no sockets)."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.test import taddons, tflow

from l402proxy import gate
from l402proxy.launch import REPO
from l402proxy.server import L402Server

RULES = REPO / "rules" / "podcast.yaml"


@pytest.fixture
async def addon(tmp_path: Path) -> AsyncIterator[L402Server]:
    server = L402Server()
    with taddons.context(server) as tctx:
        tctx.configure(
            server,
            l402_rules=str(RULES),
            l402_store=str(tmp_path / "server.sqlite"),
            l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
        )
        await server.running()
        yield server
        await server.done()


def flow_for(path: str, **headers: str) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = path
    for name, value in headers.items():
        flow.request.headers[name.replace("_", "-")] = value
    return flow


async def test_challenge_has_both_lines_lsat_first(addon: L402Server) -> None:
    flow = flow_for("/bonus/x.mp3")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 402
    lines = flow.response.headers.get_all("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    assert flow.metadata["l402"]["variant"] == "challenge"


async def test_unexpected_error_on_a_priced_path_fails_closed(
    addon: L402Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: object) -> gate.Decision:
        raise RuntimeError("bug")

    monkeypatch.setattr(gate, "decide", broken)
    flow = flow_for("/bonus/x.mp3")
    await addon.request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert flow.response.headers["Retry-After"].isdigit()

    unpriced = flow_for("/feed.xml")
    await addon.request(unpriced)
    assert unpriced.response is None  # unpriced traffic never touches the paywall


async def test_free_variant_is_marked_and_untouched(addon: L402Server) -> None:
    flow = flow_for("/episodes/ep1.mp3")
    await addon.request(flow)
    assert flow.response is None
    assert flow.request.path == "/episodes/ep1.mp3"
    assert flow.metadata["l402"] == {"service": "podcast", "variant": "free"}


async def test_bad_options_at_startup_log_one_line_and_fail_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = L402Server()
    broken = tmp_path / "rules.yaml"
    broken.write_text("services:\n  - name: a b\n    match: {path: /x}\n    price_sat: 1\n")
    with taddons.context(server) as tctx:
        tctx.configure(server, l402_rules=str(broken))
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "rules.yaml:2" in errors[0].getMessage()
        assert errors[0].exc_info is None
        flow = flow_for("/anything")
        await server.request(flow)
        assert flow.response is not None and flow.response.status_code == 503
        tctx.configure(server, l402_rules=str(RULES))  # fixed before the proxy runs
        again = flow_for("/anything")
        await server.request(again)
        assert again.response is None


async def test_bad_options_while_running_are_rejected(addon: L402Server, tmp_path: Path) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text("services:\n  - name: a b\n    match: {path: /x}\n    price_sat: 1\n")
    rules_before = addon.rules
    with pytest.raises(exceptions.OptionsError, match=r"rules\.yaml:2"):
        ctx.options.update(l402_rules=str(broken))
    with pytest.raises(exceptions.OptionsError, match="l402_backend"):
        ctx.options.update(l402_backend="carrier-pigeon://x")
    assert addon.rules == rules_before and not addon.misconfigured
    assert ctx.options.l402_rules == str(RULES)  # mitmproxy kept the previous value
