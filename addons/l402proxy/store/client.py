"""The client's SQLite store: its payment ledger (which is also its token store), the URL paths
it learned belong to a scope, and the challenges it refused to pay.

A payment row is written as "pending" before the wallet is asked to pay, and turns "paid" in
the same UPDATE that stores the preimage, so the token (macaroon + preimage) exists before the
request is retried. A paid row that was not dropped is a usable token. Budgets are sums over
this table, checked and reserved in one write transaction, so they survive restarts and hold
across processes sharing the file (the proxy and the SDK).

A token sold as a bundle (or for single use) has a balance: what the server's last
`X-L402-Balance` said is left of it. A token whose balance is 0 is spent: never sent again,
and its scope may be paid again.

A Payment-scheme charge (scheme 'Payment', no macaroon; the challenge its credential echoes in
`challenge`) is paid and counted like any payment, but it is no token: good for one request,
never handed out for a scope. `presented_at` says when its credential was sent (NULL: never),
`receipt` what the server's Payment-Receipt said.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from l402proxy.l402.payment import SCHEME as CHARGE_SCHEME
from l402proxy.paths import default_client_store
from l402proxy.store import database
from l402proxy.store.database import Database, StoreError

log = logging.getLogger("l402proxy.store")

DAY_SECONDS = 24 * 3600
MAX_REFUSALS = 10_000

MIGRATIONS: list[Sequence[str]] = [
    (
        """
        CREATE TABLE payments (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            payment_hash BLOB NOT NULL UNIQUE CHECK (length(payment_hash) = 32),
            origin TEXT NOT NULL,
            url TEXT NOT NULL,
            scope TEXT NOT NULL,
            services TEXT NOT NULL,
            scheme TEXT NOT NULL,
            macaroon TEXT NOT NULL,
            bolt11 TEXT NOT NULL,
            amount_msat INTEGER NOT NULL CHECK (amount_msat > 0),
            fee_limit_msat INTEGER NOT NULL CHECK (fee_limit_msat >= 0),
            fee_msat INTEGER,
            status TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'failed')),
            preimage BLOB CHECK (preimage IS NULL OR length(preimage) = 32),
            valid_until REAL,
            wallet TEXT NOT NULL,
            owner TEXT NOT NULL,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            dropped_at REAL,
            drop_reason TEXT
        )
        """,
        "CREATE INDEX payments_created ON payments (created_at)",
        "CREATE INDEX payments_status ON payments (status)",
        "CREATE INDEX payments_scope ON payments (origin, scope)",
        """
        CREATE TABLE scope_paths (
            origin TEXT NOT NULL,
            path TEXT NOT NULL,
            scope TEXT NOT NULL,
            learned_at REAL NOT NULL,
            PRIMARY KEY (origin, path)
        )
        """,
        """
        CREATE TABLE refusals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            origin TEXT NOT NULL,
            url TEXT NOT NULL,
            service TEXT,
            reason TEXT NOT NULL,
            message TEXT NOT NULL,
            amount_msat INTEGER,
            payment_hash BLOB
        )
        """,
        "CREATE INDEX refusals_at ON refusals (at)",
    ),
    # 2: bundles. What the server last said is left of a token (X-L402-Balance), in which
    # unit, and when. NULL: it never said (no bundle, or an older ledger): the token is used
    # until the server refuses it, as before.
    (
        "ALTER TABLE payments ADD COLUMN balance INTEGER CHECK (balance IS NULL OR balance >= 0)",
        "ALTER TABLE payments ADD COLUMN balance_unit TEXT",
        "ALTER TABLE payments ADD COLUMN balance_at REAL",
    ),
    # 3: Payment-scheme charges (issue 16). `challenge`: the challenge a charge's credential
    # echoes, as JSON (NULL for L402 tokens); `presented_at`: when its credential was sent
    # (NULL: never, so a paid charge may still be sent, once); `receipt` (JSON) and
    # `receipt_at`: the Payment-Receipt the server answered it with, decoded, and when.
    # Requests at once (issue 14): `held_until`, until when a payment made for one request
    # alone is held back from every other request, of any process sharing the file (NULL:
    # not held). Here, not in a schema 4: schema 3 was never released.
    (
        "ALTER TABLE payments ADD COLUMN challenge TEXT",
        "ALTER TABLE payments ADD COLUMN presented_at REAL",
        "ALTER TABLE payments ADD COLUMN receipt TEXT",
        "ALTER TABLE payments ADD COLUMN receipt_at REAL",
        "ALTER TABLE payments ADD COLUMN held_until REAL",
    ),
]

BALANCE_UNITS = ("requests", "bytes", "units")
# SQLite keeps integers in signed 64 bits: a larger balance is no balance the ledger can hold.
MAX_BALANCE = 2**63 - 1
# A token the ledger may hand out: paid, not dropped, not spent, no Payment charge (good for
# one request, never a scope's token); expiry is checked apart.
_LIVE = (
    "status = 'paid' AND dropped_at IS NULL AND (balance IS NULL OR balance > 0)"
    f" AND scheme != '{CHARGE_SCHEME}'"
)
# Not held back for the one request it was paid for alone (held_until), at time `?`.
_NOT_HELD = "(held_until IS NULL OR held_until <= ?)"
# A charge paid and never presented: it may still be sent, once (see payer.py).
_UNUSED_CHARGE = (
    f"scheme = '{CHARGE_SCHEME}' AND status = 'paid' AND dropped_at IS NULL"
    " AND presented_at IS NULL"
)

PaymentStatus = Literal["pending", "paid", "failed"]


@dataclass(frozen=True)
class NewPayment:
    """What is known before paying: written as the pending row."""

    payment_hash: bytes
    origin: str
    url: str
    scope: str
    services: tuple[str, ...]
    scheme: str
    macaroon: str
    bolt11: str
    amount_msat: int
    fee_limit_msat: int
    valid_until: float | None
    wallet: str
    # "<pid>:<random>" of the process paying: recovery leaves a live owner's payment alone.
    # "" (no owner) is recovered by whoever starts next.
    owner: str = ""
    # A Payment charge's challenge (its credential's echo) as JSON; None for L402.
    challenge: str | None = None

    @property
    def is_charge(self) -> bool:
        """A Payment-scheme charge: good for one request, never a token for a scope."""
        return self.scheme == CHARGE_SCHEME


@dataclass(frozen=True, kw_only=True)
class Payment(NewPayment):
    """A ledger row: what was known before paying, and what became of it."""

    id: int
    fee_msat: int | None
    status: PaymentStatus
    preimage: bytes | None
    error: str | None
    created_at: float
    updated_at: float
    dropped_at: float | None
    # What the server last said is left of the token's bundle (X-L402-Balance), its unit and
    # when; None: it never said.
    balance: int | None = None
    balance_unit: str | None = None
    balance_at: float | None = None
    # A charge: when its credential was sent (None: never), and the decoded Payment-Receipt
    # (JSON) the server answered with, and when.
    presented_at: float | None = None
    receipt: str | None = None
    receipt_at: float | None = None
    # A payment made for one request alone: until when no other request (of any process)
    # may wait for it or take its token; None: not held.
    held_until: float | None = None

    def held(self, now: float) -> bool:
        """Held back for the one request it was paid for alone (see `held_until`)."""
        return self.held_until is not None and self.held_until > now

    @property
    def spent(self) -> bool:
        """The server said nothing is left of this token's bundle: never sent again."""
        return self.balance == 0

    def usable(self, now: float) -> bool:
        """A token that can still be sent: paid, not dropped, not spent, not expired (a charge
        only while it was never presented)."""
        return (
            self.status == "paid"
            and not (self.is_charge and self.presented_at is not None)
            and self.preimage is not None
            and self.dropped_at is None
            and not self.spent
            and (self.valid_until is None or self.valid_until > now)
        )

    def token_json(self, now: float) -> dict[str, Any]:
        if self.spent:
            status = "spent"
        elif self.dropped_at is not None:
            status = "dropped"
        elif self.valid_until is not None and self.valid_until <= now:
            status = "expired"
        else:
            status = "valid"
        # No preimage and no macaroon: together they are the bearer credential.
        return {
            "origin": self.origin,
            "services": list(self.services),
            "scope": self.scope,
            "scheme": self.scheme,
            "payment_hash": self.payment_hash.hex(),
            "amount_sat": sat_number(self.amount_msat),
            "created_at": self.created_at,
            "valid_until": self.valid_until,
            "status": status,
            # What is left of a bundle (or single-use token) as the server last said;
            # None for a token the server never gave a balance for.
            "balance": self.balance,
            "balance_unit": self.balance_unit,
            "balance_at": self.balance_at,
        }


@dataclass(frozen=True)
class BudgetRefusal:
    """Why a payment may not be made now: budget_daily, budget_total or payment_pending."""

    code: str
    message: str
    # For payment_pending: the payment still under way for this scope.
    pending: "Payment | None" = None


_PAYMENT_FIELDS = (
    "id", "payment_hash", "origin", "url", "scope", "services", "scheme", "macaroon", "bolt11",
    "amount_msat", "fee_limit_msat", "fee_msat", "status", "preimage", "valid_until", "wallet",
    "owner", "error", "created_at", "updated_at", "dropped_at", "balance", "balance_unit",
    "balance_at", "challenge", "presented_at", "receipt", "receipt_at", "held_until",
)  # fmt: skip
_PAYMENT_COLUMNS = ", ".join(_PAYMENT_FIELDS)
# What a payment counts against a budget: its fee once known, until then the fee limit.
_COST = "amount_msat + coalesce(fee_msat, fee_limit_msat)"


def _payment_from_row(row: Sequence[Any]) -> Payment:
    values = dict(zip(_PAYMENT_FIELDS, row, strict=True))
    values["payment_hash"] = bytes(values["payment_hash"])
    values["services"] = tuple(s for s in values["services"].split(",") if s)
    if values["preimage"] is not None:
        values["preimage"] = bytes(values["preimage"])
    return Payment(**values)


def _receipt_json(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sqlite_path_from_uri(uri: str) -> Path:
    """The client store's file for a `l402_store` value ("" = the default file)."""
    return database.sqlite_path_from_uri(uri, default_client_store())


def _sat(msat: int) -> str:
    return f"{sat_number(msat)} sat"


def sat_number(msat: int) -> int | float:
    """Whole sats as an int (what people expect to read), sub-sat amounts as a float."""
    return msat // 1000 if msat % 1000 == 0 else msat / 1000


class ClientStore(Database):
    def migrations(self) -> Sequence[Sequence[str]]:
        return MIGRATIONS

    @classmethod
    async def open(cls, uri: str) -> Self:
        scheme = uri.strip().split(":", 1)[0].lower()
        if scheme in ("postgres", "postgresql"):
            raise StoreError("the client store is a SQLite file; give a path")
        store = await cls.open_path(sqlite_path_from_uri(uri))
        log.info("client store: %s", store.path)
        return store

    async def reserve(
        self,
        payment: NewPayment,
        *,
        budget_daily_msat: int,
        budget_total_msat: int | None,
        now: float,
        alone: bool = False,
        hold_for: float | None = None,
    ) -> Payment | BudgetRefusal:
        """Check the scope and the budgets and write the pending row, in one write transaction.

        Returns the new pending row; or, when the scope already has a usable token (another
        process may have paid), that paid row: nothing is to be paid. A scope with a payment
        still pending, or a budget it would break, is refused. Pending payments count with
        their fee limit, so two payments in flight together cannot both fit in what is left
        for one. A payment hash seen before raises StoreError: an invoice is never paid twice.

        `alone`: a payment for one request only (its token from a shared payment went to
        another request of ours first): the scope is not checked, only the budgets. A Payment
        charge is always for one request alone: its scope is never checked, and it is never
        the scope's token nor a payment another one waits for.
        `hold_for` (with `alone`): the row is held back for `hold_for` seconds from now
        (`held_until`; settle() renews it, release() ends it). The scope check of every
        other payment, of any process sharing the file, passes over a held row: it is
        neither a token to take nor a payment to wait for.
        """
        cost = payment.amount_msat + payment.fee_limit_msat
        async with self._transaction() as db:
            existing = await self._one(
                "SELECT status FROM payments WHERE payment_hash = ?", (payment.payment_hash,)
            )
            if existing is not None:
                raise StoreError(
                    f"invoice {payment.payment_hash.hex()[:16]}... is already in the ledger "
                    f"({existing[0]}); it is never paid twice"
                )
            # A spent token (balance 0) is no token: its scope is paid again.
            row = None
            if not alone and not payment.is_charge:
                row = await self._one(
                    f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE origin = ? AND scope = ?"
                    f" AND scheme != '{CHARGE_SCHEME}'"
                    f" AND (status = 'pending' OR ({_LIVE}"
                    f" AND (valid_until IS NULL OR valid_until > ?))) AND {_NOT_HELD}"
                    " ORDER BY id DESC LIMIT 1",
                    (payment.origin, payment.scope, now, now),
                )
            if row is not None:
                held = _payment_from_row(row)
                if held.status == "paid":
                    return held
                return BudgetRefusal(
                    "payment_pending",
                    f"a payment for this scope is still pending ({held.payment_hash.hex()[:16]}"
                    f"..., {held.url}); not paying a second one until it is settled",
                    held,
                )
            ((day,),) = await db.execute_fetchall(
                f"SELECT coalesce(sum({_COST}), 0) FROM payments"
                " WHERE status != 'failed' AND created_at > ?",
                (now - DAY_SECONDS,),
            )
            if day + cost > budget_daily_msat:
                return BudgetRefusal(
                    "budget_daily",
                    f"paying {_sat(payment.amount_msat)} (+ up to "
                    f"{_sat(payment.fee_limit_msat)} fee) would exceed l402_budget_daily_sat "
                    f"{_sat(budget_daily_msat)}: {_sat(day)} spent in the last 24 hours",
                )
            if budget_total_msat is not None:
                ((total,),) = await db.execute_fetchall(
                    f"SELECT coalesce(sum({_COST}), 0) FROM payments WHERE status != 'failed'"
                )
                if total + cost > budget_total_msat:
                    return BudgetRefusal(
                        "budget_total",
                        f"paying {_sat(payment.amount_msat)} (+ up to "
                        f"{_sat(payment.fee_limit_msat)} fee) would exceed "
                        f"l402_budget_total_sat {_sat(budget_total_msat)}: "
                        f"{_sat(total)} spent so far",
                    )
            cursor = await db.execute(
                "INSERT INTO payments (payment_hash, origin, url, scope, services, scheme,"
                " macaroon, bolt11, amount_msat, fee_limit_msat, status, valid_until, wallet,"
                " owner, created_at, updated_at, challenge, held_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (
                    payment.payment_hash,
                    payment.origin,
                    payment.url,
                    payment.scope,
                    ",".join(payment.services),
                    payment.scheme,
                    payment.macaroon,
                    payment.bolt11,
                    payment.amount_msat,
                    payment.fee_limit_msat,
                    payment.valid_until,
                    payment.wallet,
                    payment.owner,
                    now,
                    now,
                    payment.challenge,
                    now + hold_for if alone and hold_for is not None else None,
                ),
            )
            row = await self._one(
                f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = ?", (cursor.lastrowid,)
            )
        return _payment_from_row(row)

    async def settle(
        self,
        payment_hash: bytes,
        preimage: bytes,
        fee_msat: int,
        now: float,
        hold_for: float | None = None,
    ) -> Payment:
        """pending (or failed: a wallet may report a late success) -> paid, with the token.

        `hold_for`: a row held back for its request (reserve's `hold_for`) stays held for
        that long from now, the time it takes that request to send the token."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET status = 'paid', preimage = ?, fee_msat = ?, error = NULL,"
                " updated_at = ?,"
                " held_until = CASE WHEN held_until IS NULL OR ? IS NULL THEN held_until"
                " ELSE ? END"
                " WHERE payment_hash = ? AND status != 'paid'",
                (
                    preimage,
                    fee_msat,
                    now,
                    hold_for,
                    None if hold_for is None else now + hold_for,
                    payment_hash,
                ),
            )
            row = await self._one(
                f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_hash = ?",
                (payment_hash,),
            )
        if row is None:
            raise StoreError(f"no payment {payment_hash.hex()} in the client ledger")
        return _payment_from_row(row)

    async def release(self, payment_hash: bytes) -> None:
        """End the hold on a payment made for one request alone: that request has used its
        token (or never will); the scope check of other payments sees it again."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET held_until = NULL"
                " WHERE payment_hash = ? AND held_until IS NOT NULL",
                (payment_hash,),
            )

    async def present(self, payment_hash: bytes, now: float) -> bool:
        """Claim a paid charge for sending: True for the one caller (of any process sharing
        the file) that marks it presented; False when it was presented (or dropped) before.
        Written before the credential leaves, so it is never sent twice."""
        async with self._transaction() as db:
            cursor = await db.execute(
                f"UPDATE payments SET presented_at = ?, updated_at = ?"
                f" WHERE payment_hash = ? AND {_UNUSED_CHARGE}",
                (now, now, payment_hash),
            )
            return cursor.rowcount == 1

    async def unused_charges(self, now: float) -> list[Payment]:
        """Charges paid and never presented that have not expired, oldest first."""
        rows = await self._read(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {_UNUSED_CHARGE}"
            " AND (valid_until IS NULL OR valid_until > ?) ORDER BY id",
            (now,),
        )
        return [_payment_from_row(row) for row in rows]

    async def note_receipt(self, payment_hash: bytes, receipt: dict[str, Any], now: float) -> None:
        """Keep the (decoded) Payment-Receipt the server answered a charge with."""
        text = json.dumps(receipt, sort_keys=True, ensure_ascii=False)
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET receipt = ?, receipt_at = ? WHERE payment_hash = ?"
                f" AND scheme = '{CHARGE_SCHEME}'",
                (text, now, payment_hash),
            )

    async def fail(self, payment_hash: bytes, error: str, now: float) -> None:
        """pending -> failed: nothing was paid, the reservation is released."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET status = 'failed', error = ?, updated_at = ?"
                " WHERE payment_hash = ? AND status = 'pending'",
                (error, now, payment_hash),
            )

    async def note_error(self, payment_hash: bytes, error: str, now: float) -> None:
        """Keep why a payment is still pending (timeout, wallet unreachable) for the history."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET error = ?, updated_at = ? WHERE payment_hash = ?",
                (error, now, payment_hash),
            )

    async def drop(self, payment_hash: bytes, reason: str, now: float) -> None:
        """The server no longer accepts this token: never send it again."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET dropped_at = ?, drop_reason = ?"
                " WHERE payment_hash = ? AND dropped_at IS NULL",
                (now, reason, payment_hash),
            )

    async def note_balance(
        self, payment_hash: bytes, remaining: int, unit: str, now: float
    ) -> None:
        """The server said `remaining` `unit` are left of this token (X-L402-Balance).

        A balance only goes down: answers to concurrent requests may arrive out of order, and
        an older, larger one must not bring back what a newer one used (0 stays 0: a spent
        token is never sent again). Another unit replaces the old value (it cannot be
        compared). Only paid rows have a balance.
        """
        if isinstance(remaining, bool) or not isinstance(remaining, int):
            raise StoreError(f"balance must be a whole number, got {remaining!r}")
        if not 0 <= remaining <= MAX_BALANCE:
            raise StoreError(f"balance must be 0 to {MAX_BALANCE}, got {remaining}")
        if unit not in BALANCE_UNITS:
            raise StoreError(f"balance unit must be one of {', '.join(BALANCE_UNITS)}: {unit!r}")
        async with self._transaction() as db:
            await db.execute(
                "UPDATE payments SET balance = CASE"
                " WHEN balance = 0 THEN 0"
                " WHEN balance IS NULL OR balance_unit IS NOT ? THEN ?"
                " ELSE min(balance, ?) END,"
                " balance_unit = CASE WHEN balance = 0 THEN balance_unit ELSE ? END,"
                " balance_at = ? WHERE payment_hash = ? AND status = 'paid'",
                (unit, remaining, remaining, unit, now, payment_hash),
            )

    async def payment(self, payment_hash: bytes) -> Payment | None:
        rows = await self._read(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_hash = ?", (payment_hash,)
        )
        return _payment_from_row(rows[0]) if rows else None

    async def pending(self) -> list[Payment]:
        rows = await self._read(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE status = 'pending' ORDER BY id"
        )
        return [_payment_from_row(row) for row in rows]

    async def tokens(self, now: float) -> list[Payment]:
        """Usable tokens, oldest first (so the newest wins when loaded into a map); not
        those held back for the one request they were paid for alone."""
        rows = await self._read(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE {_LIVE}"
            f" AND (valid_until IS NULL OR valid_until > ?) AND {_NOT_HELD} ORDER BY id",
            (now, now),
        )
        return [_payment_from_row(row) for row in rows]

    async def all_tokens(self, limit: int = 100) -> list[Payment]:
        if limit < 1:
            raise StoreError(f"limit must be at least 1, got {limit}")
        # A charge is no token (one request, then used): the history shows it.
        rows = await self._read(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE status = 'paid'"
            f" AND scheme != '{CHARGE_SCHEME}' ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [_payment_from_row(row) for row in rows]

    async def learn_path(self, origin: str, path: str, scope: str, now: float) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO scope_paths (origin, path, scope, learned_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (origin, path) DO UPDATE SET scope = excluded.scope,"
                " learned_at = excluded.learned_at",
                (origin, path, scope, now),
            )

    async def learned_paths(self) -> list[tuple[str, str, str]]:
        rows = await self._read("SELECT origin, path, scope FROM scope_paths ORDER BY learned_at")
        return [(row[0], row[1], row[2]) for row in rows]

    async def refuse(
        self,
        *,
        origin: str,
        url: str,
        service: str | None,
        reason: str,
        message: str,
        amount_msat: int | None,
        payment_hash: bytes | None,
        now: float,
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO refusals (at, origin, url, service, reason, message, amount_msat,"
                " payment_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now, origin, url, service, reason, message, amount_msat, payment_hash),
            )
            # The history keeps the newest refusals only: a server answering every URL with
            # a challenge we refuse must not grow the file without end.
            await db.execute(
                "DELETE FROM refusals WHERE id <= (SELECT max(id) FROM refusals) - ?",
                (MAX_REFUSALS,),
            )

    async def spent_msat(self, since: float | None = None) -> int:
        """Amounts + fees of payments not failed (pending ones with their fee limit)."""
        where, params = "", list[Any]()
        if since is not None:
            where, params = " AND created_at > ?", [since]
        rows = await self._read(
            f"SELECT coalesce(sum({_COST}), 0) FROM payments WHERE status != 'failed'{where}",
            params,
        )
        return int(rows[0][0])

    async def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """Payments and refusals, newest first, as the CLI shows them."""
        if limit < 1:
            raise StoreError(f"limit must be at least 1, got {limit}")
        payments = await self._read(
            f"SELECT {_PAYMENT_COLUMNS} FROM payments ORDER BY created_at DESC LIMIT ?", (limit,)
        )
        refusals = await self._read(
            "SELECT at, origin, url, service, reason, message, amount_msat, payment_hash"
            " FROM refusals"
            " ORDER BY at DESC LIMIT ?",
            (limit,),
        )
        events: list[dict[str, Any]] = []
        for row in payments:
            p = _payment_from_row(row)
            events.append(
                {
                    "when": p.created_at,
                    "event": p.status,
                    "origin": p.origin,
                    "url": p.url,
                    "service": ",".join(p.services) or None,
                    "amount_sat": sat_number(p.amount_msat),
                    "fee_sat": None if p.fee_msat is None else sat_number(p.fee_msat),
                    "payment_hash": p.payment_hash.hex(),
                    "reason": None,
                    "message": p.error,
                    "settled_at": p.updated_at if p.status == "paid" else None,
                    "dropped_at": p.dropped_at,
                    # "Payment" for a charge (one request), else L402/LSAT (a token).
                    "scheme": p.scheme,
                    "presented_at": p.presented_at,
                    "receipt": _receipt_json(p.receipt),
                }
            )
        for at, origin, url, service, reason, message, amount_msat, payment_hash in refusals:
            events.append(
                {
                    "when": at,
                    "event": "refused",
                    "origin": origin,
                    "url": url,
                    "service": service,
                    "amount_sat": None if amount_msat is None else sat_number(amount_msat),
                    "fee_sat": None,
                    "payment_hash": None if payment_hash is None else bytes(payment_hash).hex(),
                    "reason": reason,
                    "message": message,
                    "settled_at": None,
                    "dropped_at": None,
                }
            )
        events.sort(key=lambda event: event["when"], reverse=True)
        return events[:limit]
