"""`l402proxy wallet history|tokens|spent`: what the client paid, refused and holds."""

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from l402proxy.cli import main
from l402proxy.store.client import ClientStore, NewPayment, Payment

ORIGIN = "http://127.0.0.1:8081"
DAY = 24 * 3600.0


def new_payment(
    *, amount_msat: int = 21_000, services: tuple[str, ...] = ("podcast",), **extra: Any
) -> tuple[NewPayment, bytes]:
    preimage = os.urandom(32)
    payment_hash = hashlib.sha256(preimage).digest()
    fields: dict[str, Any] = {
        "payment_hash": payment_hash,
        "origin": ORIGIN,
        "url": ORIGIN + "/bonus/ep1.mp3",
        # One scope per payment: a scope with a pending or usable token takes no second one.
        "scope": "services:" + ",".join(services) + "-" + payment_hash.hex()[:8],
        "services": services,
        "scheme": "L402",
        "macaroon": "AgEEbHNhdAJCAAD" + "A" * 20,
        "bolt11": "lnbcrt210n1fake",
        "amount_msat": amount_msat,
        "fee_limit_msat": 10_000,
        "valid_until": None,
        "wallet": "dev",
    }
    fields.update(extra)
    return NewPayment(**fields), preimage


class Ledger:
    """Writes rows through ClientStore as the payer would, one event loop per call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, job: Any) -> Any:
        async def go() -> Any:
            store = await ClientStore.open(str(self.path))
            try:
                return await job(store)
            finally:
                await store.close()

        return asyncio.run(go())

    def pay(
        self, *, now: float, fee_msat: int = 0, settle: bool = True, **kwargs: Any
    ) -> tuple[Payment, bytes]:
        payment, preimage = new_payment(**kwargs)

        async def job(store: ClientStore) -> Payment:
            reserved = await store.reserve(
                payment, budget_daily_msat=10**12, budget_total_msat=None, now=now
            )
            assert isinstance(reserved, Payment)
            if not settle:
                return reserved
            return await store.settle(payment.payment_hash, preimage, fee_msat, now)

        return self.run(job), preimage

    def refuse(self, *, now: float, reason: str = "max_price", message: str = "too dear") -> None:
        async def job(store: ClientStore) -> None:
            await store.refuse(
                origin=ORIGIN,
                url=ORIGIN + "/bonus/dear.mp3",
                service="bonus",
                reason=reason,
                message=message,
                amount_msat=150_000,
                payment_hash=None,
                now=now,
            )

        self.run(job)

    def drop(self, payment_hash: bytes, *, now: float) -> None:
        self.run(lambda store: store.drop(payment_hash, "refused", now))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("L402PROXY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store_path(tmp_path: Path, home: Path) -> Path:
    return tmp_path / "client.sqlite"


@pytest.fixture
def ledger(store_path: Path) -> Ledger:
    return Ledger(store_path)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main(list(argv)) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return json.loads(captured.out)


# --- no store yet -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("history", []),
        ("tokens", []),
        ("spent", {"last_24h_sat": 0, "total_sat": 0, "pending": 0}),
    ],
)
def test_empty_without_a_store_and_nothing_created(
    capsys: pytest.CaptureFixture[str], store_path: Path, command: str, expected: object
) -> None:
    assert run_json(capsys, "wallet", command, "--store", str(store_path)) == expected
    assert not store_path.exists()
    assert not store_path.parent.joinpath("client.sqlite-wal").exists()


def test_default_store_is_under_l402proxy_home(
    capsys: pytest.CaptureFixture[str], home: Path
) -> None:
    assert run_json(capsys, "wallet", "history") == []
    assert not home.exists()
    Ledger(home / "client.sqlite").pay(now=time.time())
    assert len(run_json(capsys, "wallet", "history")) == 1


# --- history ------------------------------------------------------------------------------------


def test_history_shows_payments_and_refusals_newest_first(
    capsys: pytest.CaptureFixture[str], store_path: Path, ledger: Ledger
) -> None:
    now = time.time()
    payment, preimage = ledger.pay(now=now - 30, fee_msat=1_500)
    ledger.refuse(now=now - 20)
    pending, _ = ledger.pay(now=now - 10, settle=False, amount_msat=1_500, services=())

    events = run_json(capsys, "wallet", "history", "--store", str(store_path))
    assert [e["event"] for e in events] == ["pending", "refused", "paid"]
    keys = {"when", "event", "origin", "url", "service", "amount_sat", "fee_sat"}
    keys |= {"payment_hash", "reason", "message"}
    assert all(keys <= set(e) for e in events)
    newest, refusal, paid = events
    assert newest["when"] == pytest.approx(now - 10)
    assert (newest["amount_sat"], newest["fee_sat"], newest["service"]) == (1.5, None, None)
    assert newest["payment_hash"] == pending.payment_hash.hex()
    assert refusal == refusal | {
        "origin": ORIGIN,
        "url": ORIGIN + "/bonus/dear.mp3",
        "service": "bonus",
        "amount_sat": 150,
        "fee_sat": None,
        "payment_hash": None,
        "reason": "max_price",
        "message": "too dear",
    }
    assert paid == paid | {
        "origin": ORIGIN,
        "url": ORIGIN + "/bonus/ep1.mp3",
        "service": "podcast",
        "amount_sat": 21,
        "fee_sat": 1.5,
        "payment_hash": payment.payment_hash.hex(),
        "reason": None,
        "message": None,
    }
    assert type(paid["amount_sat"]) is int
    assert preimage.hex() not in json.dumps(events)  # the bearer secret stays in the store


def test_history_limit(
    capsys: pytest.CaptureFixture[str], store_path: Path, ledger: Ledger
) -> None:
    now = time.time()
    for i in range(3):
        ledger.pay(now=now - 10 + i)
    events = run_json(capsys, "wallet", "history", "--store", str(store_path), "--limit", "2")
    assert [e["when"] for e in events] == pytest.approx([now - 8, now - 9])


@pytest.mark.parametrize("where", ["before", "after"])
def test_store_option_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str],
    store_path: Path,
    ledger: Ledger,
    home: Path,
    where: str,
) -> None:
    ledger.pay(now=time.time())
    Ledger(home / "client.sqlite").refuse(now=time.time())  # the default store: not this one
    for command in ("history", "tokens", "spent"):
        if where == "before":
            argv = ["wallet", "--store", str(store_path), command]
        else:
            argv = ["wallet", command, "--store", str(store_path)]
        result = run_json(capsys, *argv)
        if command == "history":
            assert [e["event"] for e in result] == ["paid"]
        elif command == "tokens":
            assert len(result) == 1
        else:
            assert result == {"last_24h_sat": 21, "total_sat": 21, "pending": 0}


def test_limit_zero_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], store_path: Path, ledger: Ledger
) -> None:
    ledger.pay(now=time.time())
    assert main(["wallet", "history", "--store", str(store_path), "--limit", "0"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "l402proxy: limit must be at least 1, got 0\n"


@pytest.mark.parametrize(
    ("command", "limit", "with_store"),
    [("tokens", "0", True), ("tokens", "-1", True), ("history", "0", False)],
)
def test_bad_limit_is_refused_the_same_way_everywhere(
    capsys: pytest.CaptureFixture[str],
    store_path: Path,
    ledger: Ledger,
    command: str,
    limit: str,
    with_store: bool,
) -> None:
    if with_store:
        ledger.pay(now=time.time())
    assert main(["wallet", command, "--store", str(store_path), "--limit", limit]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("l402proxy: ")


def test_a_newer_store_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], store_path: Path
) -> None:
    import sqlite3

    with sqlite3.connect(store_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    assert main(["wallet", "history", "--store", str(store_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "schema version 99" in captured.err and "Traceback" not in captured.err


# --- tokens -------------------------------------------------------------------------------------


def test_tokens_show_status_and_never_the_secret(
    capsys: pytest.CaptureFixture[str], store_path: Path, ledger: Ledger
) -> None:
    now = time.time()
    valid, valid_preimage = ledger.pay(now=now - 30, valid_until=now + 3600)
    expired, _ = ledger.pay(now=now - 20, valid_until=now - 1, services=("old",))
    dropped, _ = ledger.pay(now=now - 10, services=("a", "b"))
    ledger.drop(dropped.payment_hash, now=now - 5)
    ledger.pay(now=now, settle=False, services=("pending",))  # not a token yet

    tokens = run_json(capsys, "wallet", "tokens", "--store", str(store_path))
    assert [t["payment_hash"] for t in tokens] == [
        dropped.payment_hash.hex(),
        expired.payment_hash.hex(),
        valid.payment_hash.hex(),
    ]
    assert [t["status"] for t in tokens] == ["dropped", "expired", "valid"]
    assert tokens[0]["services"] == ["a", "b"]
    assert tokens[2] == tokens[2] | {
        "origin": ORIGIN,
        "services": ["podcast"],
        "scheme": "L402",
        "created_at": pytest.approx(now - 30),
        "valid_until": pytest.approx(now + 3600),
        "status": "valid",
    }
    text = json.dumps(tokens)
    assert "preimage" not in text and valid_preimage.hex() not in text
    assert valid.macaroon not in text


def test_tokens_limit(capsys: pytest.CaptureFixture[str], store_path: Path, ledger: Ledger) -> None:
    now = time.time()
    hashes = [ledger.pay(now=now + i)[0].payment_hash.hex() for i in range(3)]
    tokens = run_json(capsys, "wallet", "tokens", "--store", str(store_path), "--limit", "2")
    assert [t["payment_hash"] for t in tokens] == hashes[:0:-1]


# --- spent --------------------------------------------------------------------------------------


def test_spent_counts_the_last_24_hours_and_everything(
    capsys: pytest.CaptureFixture[str], store_path: Path, ledger: Ledger
) -> None:
    now = time.time()
    ledger.pay(now=now - 2 * DAY, amount_msat=100_000)
    ledger.pay(now=now - 60, fee_msat=500)
    ledger.pay(now=now - 30, settle=False, amount_msat=5_000)  # counts with its 10 sat fee limit
    ledger.refuse(now=now)
    spent = run_json(capsys, "wallet", "spent", "--store", str(store_path))
    assert spent == {"last_24h_sat": 36.5, "total_sat": 136.5, "pending": 1}
