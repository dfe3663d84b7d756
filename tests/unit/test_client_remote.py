"""The client proxy pays only for its user: l402_clients, the check and the hooks.

A request from a client outside l402_clients is passed on as a plain proxy would: no
Accept-Authenticate, none of the user's tokens, and a 402 comes back unpaid with
X-L402-Refused: client_not_allowed.
"""

import ipaddress
import logging
import os
from pathlib import Path

import pytest
from mitmproxy import ctx, exceptions, http

from l402proxy.client import (
    LOOPBACK,
    L402Client,
    client_allowed,
    clients_text,
    describe_clients,
    parse_clients,
)
from l402proxy.l402.headers import format_challenge
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import mint
from l402proxy.lightning import NEW_WALLET_BALANCE_MSAT, DevLedger
from tests.unit import test_client_addon as base

# The client addon, started, on tmp_path's dev ledger (test_client_addon's fixtures).
home = base.home
addon = base.addon


def networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return parse_clients(value)


# -- the check ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "::ffff:127.9.9.9"],
)
def test_loopback_is_the_default(host: str) -> None:
    assert parse_clients("") == LOOPBACK
    assert client_allowed(LOOPBACK, host)


@pytest.mark.parametrize(
    "host",
    ["10.0.0.5", "192.168.1.7", "::2", "fe80::1", "::ffff:10.0.0.5", "2001:db8::1", "", None],
)
def test_anyone_else_is_not_allowed_by_default(host: str | None) -> None:
    assert not client_allowed(LOOPBACK, host)


@pytest.mark.parametrize(
    ("value", "host", "allowed"),
    [
        ("192.168.1.0/24", "192.168.1.77", True),
        ("192.168.1.0/24", "192.168.2.1", False),
        ("192.168.1.0/24", "::ffff:192.168.1.77", True),  # IPv4 on a dual-stack socket
        ("192.168.1.0/24", "127.0.0.1", False),  # a value replaces the default
        ("10.0.0.5", "10.0.0.5", True),
        ("10.0.0.5", "10.0.0.6", False),
        ("fd00::/8", "fd12::3", True),
        ("fd00::/8", "fe80::1", False),
        ("fe80::/10", "fe80::1%eth0", True),  # link-local with its zone
        ("fe80::1", "fe80::1%eth0", True),
        ("::ffff:10.0.0.0/104", "10.1.2.3", True),  # a mapped network is its IPv4 one
        ("::ffff:10.0.0.0/104", "::ffff:10.1.2.3", True),
        ("::ffff:10.0.0.0/104", "11.0.0.1", False),
        (" 127.0.0.1 , ::1 ,", "::1", True),
        ("0.0.0.0/0, ::/0", "203.0.113.9", True),
        ("0.0.0.0/0", "2001:db8::1", False),
        ("10.0.0.0/8", "not-an-address", False),
    ],
)
def test_networks_and_addresses(value: str, host: str, allowed: bool) -> None:
    assert client_allowed(networks(value), host) is allowed


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            "localhost",
            "l402_clients: 'localhost' is not an IP address or network "
            "(like 192.168.1.0/24, 10.0.0.5 or fd00::/8)",
        ),
        ("10.0.0.0/33", "l402_clients: '10.0.0.0/33' is not an IP address or network"),
        ("192.168.1.0/24; 10.0.0.1", "'192.168.1.0/24; 10.0.0.1' is not an IP address"),
        (
            "10.0.0.1/8",
            "l402_clients: 10.0.0.1/8 is not a network (host bits set): "
            "write 10.0.0.0/8 for the network or 10.0.0.1 for the address",
        ),
    ],
)
def test_bad_values_are_refused_with_the_entry_named(value: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_clients(value)
    assert problem in str(caught.value)


def test_who_may_spend_reads_as_written() -> None:
    assert clients_text(LOOPBACK) == "127.0.0.0/8, ::1"
    assert describe_clients(networks("10.0.0.5, fd00::/8")) == (
        "paying for clients on 10.0.0.5, fd00::/8 only"
    )


# -- the option --------------------------------------------------------------------------------


async def test_l402_clients_changes_while_running_and_a_bad_value_is_refused(
    addon: L402Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ctx.options.update(l402_clients="10.0.0.0/8")
    assert addon.clients == (ipaddress.ip_network("10.0.0.0/8"),)
    assert "l402: now paying for clients on 10.0.0.0/8 only" in caplog.messages
    with pytest.raises(exceptions.OptionsError, match="l402_clients: 'nope' is not an IP"):
        ctx.options.update(l402_clients="nope")
    assert ctx.options.l402_clients == "10.0.0.0/8"
    assert addon.clients == (ipaddress.ip_network("10.0.0.0/8"),)
    assert addon.misconfigured == {}


# -- the hooks ---------------------------------------------------------------------------------


def from_client(
    client: str, host: str, port: int, path: str = "/bonus/ep1.mp3", **headers: str
) -> http.HTTPFlow:
    """A request for host:port/path from a client at address `client`."""
    flow = base.flow_to(host, port, path, **headers)
    flow.client_conn.peername = (client, 50000)
    return flow


async def test_a_foreign_client_gets_no_advertising_and_no_token(addon: L402Client) -> None:
    ctx.options.update(l402_clients="10.0.0.0/8")
    base.hold_token(addon)
    flow = from_client("127.0.0.1", "127.0.0.1", 8081, "/bonus/ep2.mp3")
    await addon.request(flow)
    assert "Accept-Authenticate" not in flow.request.headers
    assert "Authorization" not in flow.request.headers
    assert "l402_client_token" not in flow.metadata

    # The same request from an allowed client gets both.
    allowed = from_client("10.1.2.3", "127.0.0.1", 8081, "/bonus/ep2.mp3")
    await addon.request(allowed)
    assert allowed.request.headers["Accept-Authenticate"] == "L402"
    assert allowed.request.headers["Authorization"].startswith("L402 ")


async def test_a_foreign_clients_own_headers_are_left_alone(addon: L402Client) -> None:
    flow = from_client(
        "192.0.2.1", "127.0.0.1", 8081, Authorization="L402 theirs:00", Accept_Authenticate="LSAT"
    )
    await addon.request(flow)
    assert flow.request.headers["Authorization"] == "L402 theirs:00"
    assert flow.request.headers["Accept-Authenticate"] == "LSAT"


async def test_a_402_for_a_foreign_client_is_passed_back_unpaid(
    addon: L402Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = DevLedger(tmp_path / "devledger.sqlite")
    try:
        for attempt in range(2):
            invoice = await ledger.create_invoice("merchant", 21_000, "ep", 600)
            macaroon = mint(os.urandom(32), Identifier.new(invoice.payment_hash), [])
            challenge = format_challenge("L402", macaroon, invoice.bolt11)
            flow = from_client("2001:db8::7", "127.0.0.1", 8081)
            await addon.request(flow)
            flow.response = http.Response.make(402, b"pay", {"WWW-Authenticate": challenge})
            await addon.response(flow)
            assert (flow.response.status_code, flow.response.content) == (402, b"pay")
            assert flow.response.headers["X-L402-Refused"] == (
                "client_not_allowed; client 2001:db8::7 is not in l402_clients (127.0.0.0/8, ::1)"
            )
            assert "X-L402-Paid" not in flow.response.headers
            assert flow.metadata["l402_client"]["refused"] == "client_not_allowed"
            assert not (await ledger.lookup_invoice(invoice.payment_hash)).settled, attempt
        assert await ledger.balance("listener") == NEW_WALLET_BALANCE_MSAT
        warnings = [m for m in caplog.messages if "not paying for client 2001:db8::7" in m]
        assert len(warnings) == 1  # once per client, not once per request
    finally:
        await ledger.close()


async def test_other_answers_to_a_foreign_client_are_untouched(addon: L402Client) -> None:
    for status, headers in ((402, {"WWW-Authenticate": 'Basic realm="x"'}), (401, {})):
        flow = from_client("192.0.2.1", "127.0.0.1", 8081)
        flow.response = http.Response.make(status, b"no", headers)
        await addon.response(flow)
        assert "X-L402-Refused" not in flow.response.headers and flow.marked == ""
