"""A command group's option (`--store`, `--ledger`) is taken before or after its subcommand."""

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from l402proxy.cli import build_parser
from l402proxy.lightning.dev import DEFAULT_CLIENT_WALLET, DEFAULT_SERVER_WALLET, DevLedger
from l402proxy.store import IssuedToken, open_server_store
from tests.unit import test_cli_wallet
from tests.unit.test_cli_wallet import run_json

# L402PROXY_HOME in tmp_path: the default store and ledger, which these tests must not use.
home = test_cli_wallet.home


def subcommand_groups(
    parser: argparse.ArgumentParser,
) -> list[tuple[argparse.ArgumentParser, list[argparse.ArgumentParser]]]:
    """Every parser that has subcommands, with its subcommands, at any depth."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children = list(action.choices.values())
            found.append((parser, children))
            for child in children:
                found.extend(subcommand_groups(child))
    return found


def test_every_group_option_is_also_taken_by_each_subcommand() -> None:
    groups = subcommand_groups(build_parser())
    checked = []
    for group, children in groups:
        for action in group._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            for child in children:
                for flag in action.option_strings:
                    assert flag in child._option_string_actions, (
                        f"{child.prog} does not take {group.prog}'s {flag}"
                    )
            checked.append(f"{group.prog} {action.option_strings[0]}")
    assert sorted(checked) == [
        "l402proxy dev --ledger",
        "l402proxy feeds --store",
        "l402proxy tokens --store",
        "l402proxy wallet --store",
    ]


def issue(store_uri: str, service: str) -> IssuedToken:
    token = IssuedToken(os.urandom(32), os.urandom(32), service, 21, 1_700_000_000.0, None)

    async def go() -> None:
        store = await open_server_store(store_uri)
        try:
            store.note_issued(token)
            await store.flush()
        finally:
            await store.close()

    asyncio.run(go())
    return token


def placed(group: str, option: list[str], subcommand: list[str], where: str) -> list[str]:
    if where == "before":
        return [group, *option, *subcommand]
    return [group, *subcommand, *option]


@pytest.mark.parametrize("where", ["before", "after"])
def test_tokens_store_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, home: Path, where: str
) -> None:
    store = str(tmp_path / "elsewhere.sqlite")
    token = issue(store, "podcast")
    issue(str(home / "server.sqlite"), "default")  # the default store: not this one
    option = ["--store", store]
    listed = run_json(capsys, *placed("tokens", option, ["list"], where))
    assert [t["token_id"] for t in listed] == [token.token_id.hex()]
    listed = run_json(capsys, *placed("tokens", option, ["list", "--service", "podcast"], where))
    assert len(listed) == 1
    revoked = run_json(capsys, *placed("tokens", option, ["revoke", token.token_id.hex()], where))
    assert [t["status"] for t in revoked["revoked"]] == ["revoked"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_dev_ledger_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, home: Path, where: str
) -> None:
    path = tmp_path / "elsewhere.sqlite"

    async def invoice() -> str:
        ledger = DevLedger(path)
        try:
            return (await ledger.create_invoice(DEFAULT_SERVER_WALLET, 21_000, "x", 600)).bolt11
        finally:
            await ledger.close()

    bolt11 = asyncio.run(invoice())
    option = ["--ledger", str(path)]
    paid = run_json(capsys, *placed("dev", option, ["pay", bolt11], where))
    assert paid["amount_msat"] == 21_000
    [listed] = run_json(capsys, *placed("dev", option, ["invoices"], where))
    assert listed["settled"] is True
    balance = run_json(capsys, *placed("dev", option, ["balance"], where))
    default = run_json(capsys, "dev", "balance", "--ledger", str(tmp_path / "fresh.sqlite"))
    assert balance["wallet"] == DEFAULT_CLIENT_WALLET
    assert balance["balance_msat"] == default["balance_msat"] - 21_000
    assert not (home / "devledger.sqlite").exists()  # the default ledger was never touched


def test_the_option_after_the_subcommand_wins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, home: Path
) -> None:
    first, second = str(tmp_path / "first.sqlite"), str(tmp_path / "second.sqlite")
    token = issue(second, "podcast")
    listed = run_json(capsys, "tokens", "--store", first, "list", "--store", second)
    assert [t["token_id"] for t in listed] == [token.token_id.hex()]
