"""`l402proxy`: decode L402 and Payment headers, drive the dev ledger, manage issued tokens and
show the revenue (from the store, or from a running paywall's admin API with `--admin URL`),
list, revoke and rotate listeners' private feed URLs, show what the client paid, check a
Lightning backend; run the paywall behind nginx (`serve-auth`, and the `nginx-config` that asks
it).

JSON on stdout (`backend check` and `feeds list`: lines, JSON with --json; `feeds revoke|rotate`:
lines); on bad input a one-line error on stderr and a non-zero exit, never a traceback. Every
epoch time in the JSON (`when`, `valid_until`, `*_at`) has a `<name>_iso` twin in UTC ISO 8601
("2026-12-06T05:21:42Z").

Exit status: 0 done; 1 failed (store, ledger or backend); 2 bad input (usage, a value that is no
L402/LSAT or Payment challenge, credential or receipt nor a problem+json body, a broken rules
file); 3 `decode` read the value but nothing in it is usable (the JSON says why); 141 the reader
of stdout went away (`| head -1`), as for a tool killed by SIGPIPE.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from . import paths
from .l402 import payment
from .l402.b64url import Base64urlError, b64url_decode
from .l402.headers import SCHEMES as L402_SCHEMES
from .l402.headers import Challenge as L402Challenge
from .l402.headers import parse_challenges, parse_credential
from .l402.identifier import Identifier
from .l402.invoice import InvoiceInfo, decode_invoice
from .l402.jcs import JsonError, loads_strict
from .l402.token import TokenError, decode_macaroon
from .lightning import LightningError, NodeInfo, open_backend, open_wallet
from .lightning.dev import DEFAULT_CLIENT_WALLET, DevLedger
from .rules import RulesError, load_rules, rule_warnings
from .store import StoreError, open_server_store
from .store.client import DAY_SECONDS, ClientStore, sat_number
from .store.client import sqlite_path_from_uri as client_store_path
from .store.database import FeedAccess, feed_path

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# `decode`: challenge- or credential-shaped, but no macaroon/invoice/preimage/request in it fits.
EXIT_UNUSABLE = 3
# 128 + SIGPIPE: what a shell reports for a tool killed by SIGPIPE (`cat big | head -1`), so
# `set -o pipefail` scripts see the same as for any other tool whose reader left early.
EXIT_BROKEN_PIPE = 141

# Header names `decode` tolerates before a value. Payment-Receipt says what the value is; an
# Authorization one, what a bare base64url value is (a credential).
_HEADER_NAMES = (
    "www-authenticate:",
    "authorization:",
    "payment-authorization:",
    "payment-receipt:",
)
_CREDENTIAL_HEADERS = ("authorization", "payment-authorization")
# `Payment <token68>` and nothing else: a credential. (A challenge has auth-params.)
_PAYMENT_CREDENTIAL = re.compile(r"payment[ \t]+[A-Za-z0-9+/_.~-]+=*", re.IGNORECASE)
# A bare base64url value: a Payment credential or receipt without its scheme or header name.
_BARE_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NOT_A_VALUE = "not an L402/LSAT or Payment challenge, credential or receipt"
# Where serve-auth listens and nginx-config looks for it (doors/nginx.py: DEFAULT_LISTEN).
DEFAULT_AUTH_LISTEN = "127.0.0.1:8402"


@dataclasses.dataclass(frozen=True)
class Line:
    """A result meant as one line of text, not JSON."""

    text: str


@dataclasses.dataclass(frozen=True)
class Answer:
    """JSON to print, with the exit status to print it with."""

    value: Any
    code: int = 0


@dataclasses.dataclass(frozen=True)
class Exit:
    """Nothing to print (a service ran and stopped): just the exit status."""

    code: int


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def describe_macaroon(value: str) -> dict[str, Any]:
    try:
        macaroon = decode_macaroon(value)
    except TokenError as exc:
        return {"macaroon": value, "error": str(exc)}
    info: dict[str, Any] = {"macaroon": value, "location": macaroon.location}
    try:
        identifier = Identifier.decode(macaroon.identifier_bytes)
    except ValueError as exc:
        info["identifier"] = {"error": str(exc), "hex": macaroon.identifier_bytes.hex()}
    else:
        info["identifier"] = {
            "version": identifier.version,
            "payment_hash": identifier.payment_hash.hex(),
            "token_id": identifier.token_id.hex(),
        }
    info["caveats"] = [
        caveat.caveat_id_bytes.decode(errors="replace") for caveat in macaroon.first_party_caveats()
    ]
    return info


def describe_invoice(bolt11: str) -> dict[str, Any]:
    try:
        invoice = decode_invoice(bolt11)
    except ValueError as exc:
        return {"error": str(exc)}
    return invoice_details(invoice)


def invoice_details(invoice: InvoiceInfo) -> dict[str, Any]:
    return {
        "payment_hash": invoice.payment_hash.hex(),
        "amount_msat": invoice.amount_msat,
        "network": invoice.network,
        "created_at": invoice.created_at,
        "expires_at": invoice.expires_at,
        "expired": invoice.is_expired(time.time()),
        "description": invoice.description,
        "payee": invoice.payee,
    }


def decode_value(value: str) -> dict[str, Any]:
    """Every challenge or credential in a WWW-Authenticate or Authorization value (L402, LSAT
    and Payment), a Payment-Receipt value, or an RFC 9457 problem body (a Payment 402's)."""
    text = value.strip()
    header = None
    for name in _HEADER_NAMES:
        if text.lower().startswith(name):
            header, text = name[:-1], text[len(name) :].strip()
            break
    if header == "payment-receipt":
        return decode_payment_receipt(text)
    if header is None and text.startswith("{"):
        return decode_problem(text)
    # `Payment <token68>` would read as a malformed challenge (a token68, no parameters).
    if not _PAYMENT_CREDENTIAL.fullmatch(text):
        challenges = parse_challenges(text)
        offered = payment.read_challenges(text)
        if challenges or offered.challenges or offered.skipped:
            decoded = [describe_l402_challenge(challenge) for challenge in challenges]
            decoded += [describe_payment_challenge(challenge) for challenge in offered.challenges]
            # A malformed Payment challenge is shown too, with why it cannot be read.
            decoded += [
                {"scheme": payment.SCHEME, "error": why, "usable": False} for why in offered.skipped
            ]
            return {"kind": "challenge", "challenges": decoded}
    if payment.is_payment_authorization(text):
        return decode_payment_credential(text)
    if _BARE_BASE64URL.fullmatch(text) and text.upper() not in L402_SCHEMES:
        return decode_bare(text, header)
    try:
        credential = parse_credential(text)
    except ValueError as exc:
        raise CliError(f"{_NOT_A_VALUE}: {exc}", EXIT_BAD_INPUT) from None
    preimage_hash = hashlib.sha256(credential.preimage).hexdigest()
    macaroons = [describe_macaroon(m) for m in credential.macaroons]
    for macaroon in macaroons:
        macaroon["preimage_matches"] = (
            macaroon.get("identifier", {}).get("payment_hash") == preimage_hash
        )
        # Presentable: the macaroon reads and the preimage pays for its payment hash.
        macaroon["usable"] = macaroon["preimage_matches"]
    return {
        "kind": "credential",
        "credentials": [
            {
                "scheme": credential.scheme,
                "preimage": credential.preimage.hex(),
                "preimage_hash": preimage_hash,
                "macaroons": macaroons,
            }
        ],
    }


def describe_l402_challenge(challenge: L402Challenge) -> dict[str, Any]:
    entry = {"scheme": challenge.scheme, "version": challenge.version}
    entry |= describe_macaroon(challenge.macaroon)
    entry["invoice"] = challenge.invoice
    entry["invoice_details"] = describe_invoice(challenge.invoice)
    hash_in_token = entry.get("identifier", {}).get("payment_hash")
    entry["payment_hash_matches"] = hash_in_token is not None and hash_in_token == entry[
        "invoice_details"
    ].get("payment_hash")
    # Payable: the macaroon and the invoice both read and name the same payment. An expired
    # invoice still counts (see "expired"): decode is for looking at old ones.
    entry["usable"] = entry["payment_hash_matches"]
    entry["params"] = dict(challenge.params)
    return entry


def describe_payment_challenge(challenge: payment.Challenge) -> dict[str, Any]:
    """A Payment challenge (sent, or echoed in a credential): its parameters, and for
    lightning/charge its decoded request and invoice and whether they agree. Usable (payable)
    when the request and the invoice both read and agree on amount, payment hash and network,
    as a payer checks before paying; an expired challenge still counts (see "expired"), as an
    expired L402 invoice does. The id's binding needs the server's secret: not checked."""
    entry: dict[str, Any] = {
        "scheme": payment.SCHEME,
        "id": challenge.id,
        "realm": challenge.realm,
        "method": challenge.method,
        "intent": challenge.intent,
        "expires": challenge.expires,
    }
    if challenge.expires is not None:
        try:
            expires_at: float | None = challenge.expires_at()
        except ValueError:
            expires_at = None
            entry["expires_error"] = "expires is not an RFC 3339 date-time"
        entry["expires_at"] = expires_at
        entry["expired"] = expires_at is not None and expires_at <= time.time()
    for name in ("description", "digest", "header"):
        if getattr(challenge, name) is not None:
            entry[name] = getattr(challenge, name)
    if challenge.opaque is not None:
        try:
            entry["opaque"] = challenge.opaque_map()
        except ValueError as exc:
            entry["opaque"] = {"error": str(exc)}
    entry["params"] = challenge.echo()
    if (challenge.method, challenge.intent) != (payment.METHOD_LIGHTNING, payment.INTENT_CHARGE):
        entry["error"] = (
            f"method {challenge.method!r} intent {challenge.intent!r}: only lightning/charge "
            "is decoded"
        )
        entry["usable"] = False
        return entry
    try:
        request = challenge.charge_request()
    except ValueError as exc:
        entry["request"] = {"error": str(exc)}
        entry["usable"] = False
        return entry
    entry["request"] = {
        "amount_sat": request.amount_sat,
        "currency": request.currency,
        "invoice": request.invoice,
        "payment_hash": None if request.payment_hash is None else request.payment_hash.hex(),
        "network": request.network,
        "description": request.description,
        "recipient": request.recipient,
        "external_id": request.external_id,
    }
    try:
        invoice = decode_invoice(request.invoice)
    except ValueError as exc:
        entry["invoice_details"] = {"error": str(exc)}
        entry["usable"] = False
        return entry
    entry["invoice_details"] = invoice_details(invoice)
    # The invoice is authoritative: what is paid, and what a preimage must hash to.
    entry["payment_hash"] = invoice.payment_hash.hex()
    entry["mismatches"] = payment.invoice_mismatches(request, invoice)
    entry["usable"] = not entry["mismatches"]
    return entry


def decode_payment_credential(text: str) -> dict[str, Any]:
    """`Payment <base64url JSON>`: the echoed challenge (described as a challenge is) and
    whether the preimage pays for its invoice. The preimage is shown, as for L402 credentials:
    the value decoded holds it already."""
    try:
        credential = payment.decode_credential(text)
    except payment.PaymentSchemeError as exc:
        raise CliError(f"not a Payment credential: {exc.message}", EXIT_BAD_INPUT) from None
    challenge = describe_payment_challenge(credential.challenge)
    payable = challenge.pop("usable")
    entry: dict[str, Any] = {"scheme": payment.SCHEME, "challenge": challenge}
    if credential.source is not None:
        entry["source"] = credential.source
    if credential.preimage is None:
        # Another method's payload: shown as sent, nothing in it checked.
        entry["payload"] = dict(credential.payload)
        entry["usable"] = False
        return {"kind": "credential", "credentials": [entry]}
    preimage_hash = hashlib.sha256(credential.preimage).hexdigest()
    expected = challenge.get("payment_hash") or challenge.get("request", {}).get("payment_hash")
    entry["preimage"] = credential.preimage.hex()
    entry["preimage_hash"] = preimage_hash
    entry["preimage_matches"] = expected is not None and preimage_hash == expected
    # Presentable: the challenge is payable (request and invoice agree) and the preimage pays
    # for its invoice. Whether its server still takes it (binding, expiry, used once) only the
    # server can say.
    entry["usable"] = payable and entry["preimage_matches"]
    return {"kind": "credential", "credentials": [entry]}


def decode_payment_receipt(text: str) -> dict[str, Any]:
    try:
        receipt = payment.decode_receipt(text)
    except ValueError as exc:
        raise CliError(f"not a Payment receipt: {exc}", EXIT_BAD_INPUT) from None
    described: dict[str, Any] = {
        "status": receipt.status,
        "method": receipt.method,
        "timestamp": receipt.timestamp,
        "timestamp_at": receipt.timestamp_at(),
        "reference": receipt.reference,
        "challenge_id": receipt.challenge_id,
    }
    if receipt.method == payment.METHOD_LIGHTNING:
        # A lightning receipt's reference is the payment hash, never the preimage.
        described["reference_is_payment_hash"] = bool(_HEX64.fullmatch(receipt.reference))
    if receipt.extra:
        described["extra"] = dict(receipt.extra)
    return {"kind": "receipt", "receipt": described}


def decode_problem(text: str) -> dict[str, Any]:
    """An RFC 9457 problem+json body: its members, and the Payment problem type it names."""
    try:
        body = loads_strict(text, "problem body")
    except JsonError as exc:
        raise CliError(f"not a problem+json body: {exc}", EXIT_BAD_INPUT) from None
    members = ("type", "title", "status", "detail", "instance")
    if not isinstance(body, dict) or not any(name in body for name in members):
        raise CliError(
            "not a problem+json body: a JSON object with a type, title, status or detail",
            EXIT_BAD_INPUT,
        )
    problem: dict[str, Any] = {name: body[name] for name in members if name in body}
    if "challengeId" in body:
        problem["challenge_id"] = body["challengeId"]
    kind = body.get("type", "about:blank")
    slug = kind.removeprefix(payment.PROBLEM_BASE) if isinstance(kind, str) else ""
    problem["payment_problem"] = slug if slug in payment.PROBLEMS and slug != kind else None
    extra = {name: item for name, item in body.items() if name not in (*members, "challengeId")}
    if extra:
        problem["extra"] = extra
    return {"kind": "problem", "problem": problem}


def decode_bare(text: str, header: str | None) -> dict[str, Any]:
    """A base64url value without a scheme: a Payment credential (it has a challenge) or a
    Payment receipt (it has a status or a reference), told apart by its JSON."""
    try:
        raw = b64url_decode(text, max_decoded=payment.MAX_JSON_SIZE, what="value")
        body = loads_strict(raw, "value")
    except (Base64urlError, JsonError) as exc:
        raise CliError(f"{_NOT_A_VALUE}: {exc}", EXIT_BAD_INPUT) from None
    if isinstance(body, dict) and (header in _CREDENTIAL_HEADERS or "challenge" in body):
        return decode_payment_credential(f"{payment.SCHEME} {text}")
    if isinstance(body, dict) and ("status" in body or "reference" in body):
        return decode_payment_receipt(text)
    raise CliError(
        f"{_NOT_A_VALUE}: base64url JSON that is neither a Payment credential nor a receipt",
        EXIT_BAD_INPUT,
    )


def decode_answer(value: str) -> Answer:
    """`decode`: the JSON, and EXIT_UNUSABLE when no challenge or credential in it is usable
    (a receipt or a problem body that reads is all there is to it)."""
    decoded = decode_value(value)
    if decoded["kind"] == "challenge":
        usable = any(entry["usable"] for entry in decoded["challenges"])
    elif decoded["kind"] == "credential":
        usable = any(
            c["usable"] if "usable" in c else any(m["usable"] for m in c["macaroons"])
            for c in decoded["credentials"]
        )
    else:
        usable = True
    return Answer(decoded, 0 if usable else EXIT_UNUSABLE)


async def dev_pay(ledger_path: str, wallet: str, bolt11: str, max_fee_msat: int) -> dict[str, Any]:
    ledger = DevLedger(ledger_path)
    try:
        result = await ledger.pay(wallet, bolt11, max_fee_msat)
    finally:
        await ledger.close()
    return {
        "preimage": result.preimage.hex(),
        "payment_hash": result.payment_hash.hex(),
        "amount_msat": result.amount_msat,
        "fee_msat": result.fee_msat,
    }


async def dev_invoices(ledger_path: str) -> list[dict[str, Any]]:
    ledger = DevLedger(ledger_path)
    try:
        return await ledger.list_invoices()
    finally:
        await ledger.close()


async def dev_balance(ledger_path: str, wallet: str) -> dict[str, Any]:
    ledger = DevLedger(ledger_path)
    try:
        return {"wallet": wallet, "balance_msat": await ledger.balance(wallet)}
    finally:
        await ledger.close()


async def tokens_list(store_uri: str, service: str | None, limit: int) -> list[dict[str, Any]]:
    store = await open_server_store(store_uri)
    try:
        return [token.to_json() for token in await store.list_tokens(service=service, limit=limit)]
    finally:
        await store.close()


async def tokens_revoke(store_uri: str, ref: str) -> dict[str, Any]:
    store = await open_server_store(store_uri)
    try:
        revoked = await store.revoke(ref, time.time())
    finally:
        await store.close()
    return {"revoked": [token.to_json() for token in revoked]}


async def feeds_list(store_uri: str, include_inactive: bool, limit: int) -> list[FeedAccess]:
    store = await open_server_store(store_uri)
    try:
        return await store.list_feeds(include_inactive=include_inactive, limit=limit)
    finally:
        await store.close()


async def feeds_change(store_uri: str, ref: str, rotate: bool) -> list[FeedAccess]:
    """`feeds revoke` (the accesses revoked) or `feeds rotate` (the new ones)."""
    store = await open_server_store(store_uri)
    try:
        change = store.rotate_feeds if rotate else store.revoke_feeds
        return await change(ref, time.time())
    finally:
        await store.close()


async def revenue_from_store(
    store_uri: str, since: float, until: float, bucket: str, service: str | None
) -> dict[str, Any]:
    from .ops.admin import revenue_report

    store = await open_server_store(store_uri)
    try:
        return await revenue_report(store, since, until, bucket, service)
    finally:
        await store.close()


# -- the admin API as the CLI's other source (--admin URL) -------------------------------------

ADMIN_TIMEOUT = 20.0


def admin_base(url: str) -> str:
    """The admin API's base URL ("http://host:port/", any path prefix kept); CliError for
    what is no such URL, or one that would send the secret in the clear over a network."""
    from .ops.listen import is_loopback

    text = url.strip()
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise CliError(f"--admin: bad port in {url!r}", EXIT_BAD_INPUT) from None
    if parts.fragment:
        raise CliError(
            "--admin: leave out the #... part (the page's secret): give the secret with "
            "--admin-secret-file or $L402PROXY_ADMIN_SECRET",
            EXIT_BAD_INPUT,
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
        raise CliError(
            f"--admin: expected a URL like http://127.0.0.1:9403, got {url!r}", EXIT_BAD_INPUT
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise CliError(
            f"--admin: http:// to {parts.hostname} would send the admin secret in the clear; "
            "use https:// (TLS in front of the admin API) or a loopback address",
            EXIT_BAD_INPUT,
        )
    return text.rstrip("/") + "/"


def admin_secret_for_cli(file: str | None) -> str:
    """--admin-secret-file, else $L402PROXY_ADMIN_SECRET, else the default file: never made
    here (the running paywall makes it)."""
    from .ops.admin import (
        SECRET_ENV,
        AdminSecretError,
        check_secret,
        default_admin_secret_path,
        read_admin_secret,
    )

    try:
        if file is None:
            value = os.environ.get(SECRET_ENV, "").strip()
            if value:
                return check_secret(value, f"${SECRET_ENV}")
            file = default_admin_secret_path()
        return read_admin_secret(file)
    except FileNotFoundError:
        raise CliError(
            f"no admin secret in {file}: give --admin-secret-file FILE or set ${SECRET_ENV}",
            EXIT_BAD_INPUT,
        ) from None
    except AdminSecretError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


def admin_call(
    args: argparse.Namespace, method: str, path: str, params: dict[str, Any] | None = None
) -> Any:
    """One admin API call; its JSON, or CliError in one line (refused secret, unreachable,
    the API's own error)."""
    import httpx

    base = admin_base(args.admin)
    secret = admin_secret_for_cli(args.admin_secret_file)
    shown = base.rstrip("/")
    try:
        # trust_env=False: no proxy from the environment sees the bearer secret.
        with httpx.Client(trust_env=False, timeout=ADMIN_TIMEOUT) as client:
            response = client.request(
                method,
                base + path,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers={"Authorization": f"Bearer {secret}", "Accept": "application/json"},
            )
    except httpx.TimeoutException:
        raise CliError(
            f"the admin API at {shown} did not answer within {ADMIN_TIMEOUT:g} s"
        ) from None
    except httpx.HTTPError as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CliError(f"cannot reach the admin API at {shown}: {why}") from None
    if response.status_code == 401:
        raise CliError(
            f"the admin API at {shown} refused the secret (401): check --admin-secret-file "
            "or $L402PROXY_ADMIN_SECRET"
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise CliError(
            f"the admin API at {shown} answered {response.status_code} without its JSON: is "
            "that an l402proxy admin API?"
        )
    if not response.is_success:
        message = str(body.get("error") or response.reason_phrase).splitlines()[0]
        raise CliError(f"admin API: {message} ({response.status_code})")
    return body


def admin_field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise CliError(f"the admin API's answer has no {name!r}: is it an l402proxy admin API?")
    return body[name]


def tokens_command(args: argparse.Namespace) -> Any:
    """`tokens list|revoke`: from the store, or from a running paywall's admin API."""
    if args.admin is not None:
        if args.store is not None:
            raise CliError("give --store or --admin, not both", EXIT_BAD_INPUT)
        if args.tokens_command == "list":
            params = {"service": args.service, "limit": args.limit}
            return admin_field(admin_call(args, "GET", "api/tokens", params), "tokens")
        path = f"api/tokens/{quote(args.ref.strip(), safe='')}/revoke"
        return {"revoked": admin_field(admin_call(args, "POST", path), "revoked")}
    store = args.store or paths.default_server_store()
    if args.tokens_command == "list":
        return run_async(lambda: tokens_list(store, args.service, args.limit))
    return run_async(lambda: tokens_revoke(store, args.ref))


def feeds_command(args: argparse.Namespace) -> Any:
    """`feeds list|revoke|rotate`: listeners' private feed URLs, in the server store chosen as
    for `tokens` (--store, else the default file). The stored credentials are never shown."""
    store = args.store or paths.default_server_store()
    ref = getattr(args, "ref", "")
    if args.feeds_command == "list":
        accesses = run_async(lambda: feeds_list(store, args.all, args.limit))
        now = time.time()
        if args.json:
            return [access.to_json(now) for access in accesses]
        if not accesses:
            return Line("no feed accesses" if args.all else "no active feed accesses")
        return Line(feeds_table(accesses, now))
    if args.feeds_command == "revoke":
        revoked = run_async(lambda: feeds_change(store, ref, rotate=False))
        if not revoked:
            return nothing_done(
                f"nothing to revoke: every feed access '{ref.strip()}' names was revoked already"
            )
        return Line(
            "\n".join(
                f"revoked {a.path} (token {a.token_id.hex()[:TOKEN_SHOWN]}, {a.service})"
                for a in revoked
            )
        )
    base = feed_base_url(args.base_url) if args.base_url is not None else ""
    fresh = run_async(lambda: feeds_change(store, ref, rotate=True))
    if not fresh:
        return nothing_done(
            f"nothing to rotate: every feed access '{ref.strip()}' names was revoked already "
            "(the listener gets a new one by unlocking again)"
        )
    now = time.time()
    for access in fresh:
        if access.status(now) == "expired":
            print(
                f"l402proxy: warning: the token of {access.path} has expired: its new feed URL "
                "opens nothing",
                file=sys.stderr,
            )
    return Line("\n".join(base + feed_path(a.capability, a.feed) for a in fresh))


# Hex characters of a token id shown in `feeds` lines: enough to tell tokens apart and to give
# as a reference (MIN_PREFIX_LEN is 8).
TOKEN_SHOWN = 12


def nothing_done(note: str) -> Exit:
    """A change that found nothing to change: said on stderr, stdout left empty (a script
    reading new URLs gets none), exit 0 (what was asked is the case already)."""
    print(f"l402proxy: {note}", file=sys.stderr)
    return Exit(0)


def feeds_table(accesses: Sequence[FeedAccess], now: float) -> str:
    """`feeds list` as aligned columns, a header first."""
    rows = [("CAPABILITY", "TOKEN", "SERVICE", "STATUS", "VALID UNTIL", "FEED PATH")]
    for access in accesses:
        until = "never"
        if access.valid_until is not None:
            # Past year 9999 there is no ISO date: the epoch seconds then.
            until = iso_time(access.valid_until) or f"{access.valid_until:.0f}"
        rows.append(
            (
                access.capability,
                access.token_id.hex()[:TOKEN_SHOWN],
                access.service,
                access.status(now),
                until,
                access.path,
            )
        )
    # Every column padded to its widest cell but the last (the path), which ends the line.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(row[i].ljust(width) for i, width in enumerate(widths)), row[-1]])
        for row in rows
    )


def feed_base_url(url: str) -> str:
    """--base-url: where listeners reach the paywall ("https://host[:port][/prefix]"), without
    its trailing '/'; CliError for what is no such URL."""
    text = url.strip()
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise CliError(f"--base-url: bad port in {url!r}", EXIT_BAD_INPUT) from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
        or text.endswith(("?", "#"))
    ):
        raise CliError(
            f"--base-url: expected where listeners reach the paywall, like "
            f"https://podcast.example.com, got {url!r}",
            EXIT_BAD_INPUT,
        )
    return text.rstrip("/")


def revenue_command(args: argparse.Namespace) -> Any:
    """`revenue`: per service and bucket, from the store or a running paywall's admin API.
    Times are read here (relative ones against this machine's clock) and sent as epochs."""
    from .ops.admin import BadQuery, revenue_range

    try:
        since, until, bucket = revenue_range(args.since, args.until, args.bucket, time.time())
    except BadQuery as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if args.admin is not None:
        if args.store is not None:
            raise CliError("give --store or --admin, not both", EXIT_BAD_INPUT)
        params = {"since": repr(since), "until": repr(until), "bucket": bucket}
        params["service"] = args.service
        return admin_call(args, "GET", "api/revenue", params)
    store = args.store or paths.default_server_store()
    return run_async(lambda: revenue_from_store(store, since, until, bucket, args.service))


def rules_check(path: str) -> dict[str, Any]:
    """What a rules file prices, or its first problem with file and line."""
    try:
        rules = load_rules(path)
    except RulesError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    return {
        "file": path,
        "services": [
            {
                "name": rule.name,
                "line": rule.line,
                "mode": rule.mode,
                **rule.pricing_json(),
                "valid_for": rule.valid_for,
                "invoice_expiry": rule.invoice_expiry,
                "capabilities": list(rule.capabilities) if rule.capabilities is not None else None,
            }
            for rule in rules.rules
        ],
        "warnings": rule_warnings(rules),
    }


async def wallet_history(store_uri: str, limit: int) -> list[dict[str, Any]]:
    store = await _existing_client_store(store_uri)
    if store is None:
        return []
    try:
        return await store.history(limit)
    finally:
        await store.close()


async def wallet_tokens(store_uri: str, limit: int) -> list[dict[str, Any]]:
    store = await _existing_client_store(store_uri)
    if store is None:
        return []
    try:
        now = time.time()
        return [payment.token_json(now) for payment in await store.all_tokens(limit)]
    finally:
        await store.close()


async def wallet_spent(store_uri: str) -> dict[str, Any]:
    store = await _existing_client_store(store_uri)
    if store is None:
        return {"last_24h_sat": 0, "total_sat": 0, "pending": 0}
    try:
        day = await store.spent_msat(since=time.time() - DAY_SECONDS)
        total = await store.spent_msat()
        pending = len(await store.pending())
    finally:
        await store.close()
    return {"last_24h_sat": sat_number(day), "total_sat": sat_number(total), "pending": pending}


async def _existing_client_store(store_uri: str) -> ClientStore | None:
    """Reading the history must not create a store where there was none."""
    path = client_store_path(store_uri)
    if not path.exists():
        return None
    return await ClientStore.open(str(path))


BACKEND_CHECK_SECONDS = 20.0


async def backend_check(uri: str, *, wallet: bool, ledger: str) -> NodeInfo:
    """Connect with `uri` as the server's invoice backend (or the client's wallet) and say who
    answered; LightningError names the backend, the address and what failed."""
    opener = open_wallet if wallet else open_backend
    node = opener(uri, dev_ledger=ledger)
    try:
        return await asyncio.wait_for(node.info(), BACKEND_CHECK_SECONDS)
    except TimeoutError:
        raise LightningError(
            f"{node.describe()}: no answer within {BACKEND_CHECK_SECONDS:g} s"
        ) from None
    finally:
        await node.close()


def iso_time(epoch: object) -> str | None:
    """An epoch time in UTC ISO 8601 to the second ("2026-12-06T05:21:42Z"); None for what is
    no such time (None, NaN, beyond year 9999)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int | float) or not math.isfinite(epoch):
        return None
    try:
        moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            seconds=math.floor(epoch)
        )
    except OverflowError:
        return None
    return moment.isoformat().replace("+00:00", "Z")


def is_epoch_field(name: str) -> bool:
    """The JSON fields holding epoch seconds, by the names every output uses for them."""
    return name in ("when", "valid_until") or name.endswith("_at")


def with_iso_times(value: Any) -> Any:
    """`value` with a `<name>_iso` field after every epoch field, at any depth; the epoch
    fields stay as they are for scripts."""
    if isinstance(value, list):
        return [with_iso_times(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        out[key] = with_iso_times(item)
        if isinstance(key, str) and is_epoch_field(key) and f"{key}_iso" not in value:
            out[f"{key}_iso"] = iso_time(item)
    return out


def shared_option(
    group: argparse.ArgumentParser,
    subcommands: Iterable[argparse.ArgumentParser],
    *flags: str,
    **kwargs: Any,
) -> None:
    """An option of a command group, taken before or after its subcommand: `tokens --store X
    list` and `tokens list --store X`. argparse takes a group's options only before the
    subcommand; each subcommand gets a copy whose default (SUPPRESS) leaves the group's value
    alone when it is not given there. Call it after the group's last subcommand is added."""
    group.add_argument(*flags, default=None, **kwargs)
    for subcommand in subcommands:
        subcommand.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l402proxy", description="L402 (LSAT) paywall and auto-pay proxy tools"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    decode = commands.add_parser(
        "decode",
        help="decode a WWW-Authenticate, Authorization or Payment-Receipt header value "
        "(L402, LSAT, Payment), or a problem+json body",
    )
    decode.add_argument("value", help="the header value (a leading header name is tolerated)")

    dev = commands.add_parser("dev", help="the embedded dev Lightning ledger (demos and tests)")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)
    pay = dev_commands.add_parser("pay", help="pay a BOLT11 invoice from a dev wallet")
    pay.add_argument("bolt11")
    pay.add_argument("--wallet", default=DEFAULT_CLIENT_WALLET)
    pay.add_argument("--max-fee-msat", type=int, default=0)
    dev_commands.add_parser("invoices", help="list the ledger's invoices")
    balance = dev_commands.add_parser("balance", help="a dev wallet's balance")
    balance.add_argument("--wallet", default=DEFAULT_CLIENT_WALLET)
    ledger_help = (
        "dev ledger path (default: devledger.sqlite under $L402PROXY_HOME or ~/.l402proxy)"
    )
    shared_option(dev, dev_commands.choices.values(), "--ledger", help=ledger_help)

    rules = commands.add_parser("rules", help="rules files")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_commands.add_parser(
        "check", help="validate a rules file as the proxy would, without starting it"
    )
    check.add_argument("path")

    tokens = commands.add_parser("tokens", help="tokens issued by the server addon")
    tokens_commands = tokens.add_subparsers(dest="tokens_command", required=True)
    listing = tokens_commands.add_parser("list", help="issued tokens, newest first")
    listing.add_argument("--service", default=None)
    listing.add_argument("--limit", type=int, default=100)
    revoke = tokens_commands.add_parser(
        "revoke", help="revoke a token (the running proxy notices within ~1 s)"
    )
    revoke.add_argument("ref", help="token_id or payment_hash in hex, or a unique prefix (>= 8)")
    server_store_help = (
        "server store path or URI (default: server.sqlite under $L402PROXY_HOME or ~/.l402proxy)"
    )
    shared_option(tokens, tokens_commands.choices.values(), "--store", help=server_store_help)
    for leaf in (listing, revoke):
        add_admin_options(leaf)

    feeds = commands.add_parser(
        "feeds", help="private podcast feed URLs handed to paying listeners (rules' feed:)"
    )
    feeds_commands = feeds.add_subparsers(dest="feeds_command", required=True)
    feeds_listing = feeds_commands.add_parser(
        "list", help="feed accesses, newest first: the active ones (--all: every one)"
    )
    feeds_listing.add_argument("--all", action="store_true", help="revoked and expired ones too")
    feeds_listing.add_argument(
        "--limit", type=int, default=1000, help="at most this many, the newest (default 1000)"
    )
    feeds_listing.add_argument("--json", action="store_true", help="JSON instead of columns")
    feed_ref_help = (
        "a capability (22 characters: that feed URL), or a token_id in hex or a unique prefix "
        "(>= 8: every feed URL of that token)"
    )
    feeds_revoke = feeds_commands.add_parser(
        "revoke",
        help="revoke feed URLs (the running paywall notices within ~2 s; the listener gets a "
        "new one by unlocking again)",
    )
    feeds_revoke.add_argument("ref", help=feed_ref_help)
    feeds_rotate = feeds_commands.add_parser(
        "rotate",
        help="replace feed URLs by new ones for the same listener and print them (the old "
        "ones stop within ~2 s)",
    )
    feeds_rotate.add_argument("ref", help=feed_ref_help)
    feeds_rotate.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="where listeners reach the paywall (e.g. https://podcast.example.com): print "
        "whole URLs instead of paths",
    )
    shared_option(feeds, feeds_commands.choices.values(), "--store", help=server_store_help)

    revenue = commands.add_parser(
        "revenue", help="tokens sold and sats earned per service over time (paid tokens)"
    )
    revenue.add_argument(
        "--since",
        default=None,
        help="epoch seconds, an ISO 8601 date or time (UTC unless it says), or a duration back "
        "from now (24h, 7d); default 48h (--bucket hour) or 30d (--bucket day)",
    )
    revenue.add_argument("--until", default=None, help="as --since (default: now)")
    revenue.add_argument(
        "--bucket",
        choices=("hour", "day"),
        default="hour",
        help="one row per service and hour or UTC day (default hour)",
    )
    revenue.add_argument("--service", default=None, help="only this service")
    revenue.add_argument("--store", default=None, help=server_store_help)
    add_admin_options(revenue)

    backend = commands.add_parser("backend", help="Lightning backends and wallets")
    backend_commands = backend.add_subparsers(dest="backend_command", required=True)
    backend_check_cmd = backend_commands.add_parser(
        "check", help="connect with a backend URI and say in one line what answered"
    )
    backend_check_cmd.add_argument(
        "uri", nargs="?", default="dev", help="as for l402_backend / l402_wallet (default: dev)"
    )
    backend_check_cmd.add_argument(
        "--wallet", action="store_true", help="check it as the client's wallet (l402_wallet)"
    )
    backend_check_cmd.add_argument("--ledger", default=None, help="dev ledger path (dev URIs)")
    backend_check_cmd.add_argument("--json", action="store_true", help="JSON instead of a line")

    wallet = commands.add_parser("wallet", help="what the client paid, refused and holds")
    wallet_commands = wallet.add_subparsers(dest="wallet_command", required=True)
    history = wallet_commands.add_parser(
        "history", help="payments (pending, paid, failed) and refusals, newest first"
    )
    tokens_held = wallet_commands.add_parser("tokens", help="tokens bought, newest first")
    for leaf in (history, tokens_held):
        leaf.add_argument("--limit", type=int, default=100)
    wallet_commands.add_parser("spent", help="sat spent in the last 24 hours and in total")
    store_help = "client store path (default: client.sqlite under $L402PROXY_HOME or ~/.l402proxy)"
    shared_option(wallet, wallet_commands.choices.values(), "--store", help=store_help)

    serve_auth_cmd = commands.add_parser(
        "serve-auth",
        help="run the paywall as nginx's auth_request service (see nginx-config)",
    )
    serve_auth_cmd.add_argument(
        "--listen",
        default=DEFAULT_AUTH_LISTEN,
        help=f"HOST:PORT to serve nginx on (default {DEFAULT_AUTH_LISTEN}; only nginx may "
        "reach it)",
    )
    serve_auth_cmd.add_argument("--rules", required=True, help="the YAML rules file")
    serve_auth_cmd.add_argument(
        "--schemes",
        default="l402",
        help="how services whose rule names no schemes: are paid: l402, payment or l402,payment "
        "(default l402)",
    )
    serve_auth_cmd.add_argument(
        "--backend", default="dev", help="invoice backend URI, as l402_backend (default: dev)"
    )
    serve_auth_cmd.add_argument("--store", default=None, help=server_store_help)
    serve_auth_cmd.add_argument("--dev-ledger", default=None, help=ledger_help)
    serve_auth_cmd.add_argument(
        "--metrics",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9402)",
    )
    serve_auth_cmd.add_argument(
        "--log-format",
        default="text",
        help="text, or json: one JSON object per log line and a line per decision",
    )
    serve_auth_cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="judge every request and log and count the decision, but let everything through",
    )
    serve_auth_cmd.add_argument(
        "--admin",
        default="",
        metavar="HOST:PORT",
        help="serve the admin API and revenue page at http://HOST:PORT/ (e.g. 127.0.0.1:9403)",
    )
    serve_auth_cmd.add_argument(
        "--admin-secret",
        default="",
        metavar="FILE",
        help="the admin API's bearer secret (default: admin-secret under $L402PROXY_HOME or "
        "~/.l402proxy; made, mode 0600, when missing)",
    )
    serve_auth_cmd.add_argument(
        "--ops-remote",
        action="store_true",
        help="let --metrics and --admin listen where other machines can reach them",
    )

    nginx_config_cmd = commands.add_parser(
        "nginx-config",
        help="print the nginx config (to include in http { }) that asks serve-auth",
    )
    nginx_config_cmd.add_argument(
        "--auth",
        default=DEFAULT_AUTH_LISTEN,
        help=f"where serve-auth listens (default {DEFAULT_AUTH_LISTEN})",
    )
    nginx_config_cmd.add_argument(
        "--upstream", required=True, help="the origin, as http://HOST:PORT or https://HOST:PORT"
    )
    nginx_config_cmd.add_argument(
        "--listen", default="80", help="nginx's listen: PORT or ADDRESS:PORT (default 80)"
    )
    nginx_config_cmd.add_argument(
        "--rules",
        default=None,
        help="read the headers the paid variants set from this rules file instead of asking "
        "the running serve-auth",
    )
    nginx_config_cmd.add_argument(
        "--name",
        default="l402",
        help="prefix of the config's upstream, map and variable names (default l402): give "
        "each config its own to include several in one nginx",
    )
    nginx_config_cmd.add_argument(
        "--verdict-cache",
        type=int,
        default=1,
        metavar="SECONDS",
        help="how long nginx may grant a repeated paid request (same URL and credential) "
        "without asking serve-auth; a revoked token works that much longer (default 1, "
        "0: off, at most 60)",
    )
    nginx_config_cmd.add_argument(
        "--verdict-cache-dir",
        default=None,
        metavar="DIR",
        help="where nginx keeps those verdicts; they hold credentials, so a tmpfs readable by "
        "nginx only (default /run/l402proxy-NAME-verdicts)",
    )
    nginx_config_cmd.add_argument(
        "--upstream-ca",
        default=None,
        metavar="FILE",
        help="CA certificates (PEM) an https origin's certificate is checked against "
        "(default /etc/ssl/certs/ca-certificates.crt)",
    )
    return parser


def add_admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=None,
        metavar="URL",
        help="ask a running paywall's admin API (e.g. http://127.0.0.1:9403) instead of the store",
    )
    parser.add_argument(
        "--admin-secret-file",
        default=None,
        metavar="FILE",
        help="the admin API's bearer secret (default: $L402PROXY_ADMIN_SECRET, else "
        "admin-secret under $L402PROXY_HOME or ~/.l402proxy)",
    )


def run_async(job: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    try:
        return asyncio.run(job())
    except (LightningError, StoreError) as exc:
        raise CliError(str(exc)) from None


def serve_auth(args: argparse.Namespace) -> Exit:
    """`serve-auth`: the engine as nginx's auth service, until SIGINT/SIGTERM."""
    from .doors import nginx
    from .engine import Refused
    from .ops.listen import is_loopback

    try:
        host, port = nginx.parse_listen(args.listen)
    except nginx.ConfigProblem as exc:
        raise CliError(f"--listen: {exc}", EXIT_BAD_INPUT) from None
    missing = [name for name in ("uvicorn", "httptools") if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"serve-auth needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    # uvicorn's own start and stop lines repeat ours; its warnings and errors still show.
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    if args.log_format == "json":
        # JSON from the first line (the rules loaded, the store opened), for the whole run.
        from .ops.jsonlog import use_json_logs

        use_json_logs()
    if not is_loopback(host):
        print(
            f"l402proxy: warning: --listen {args.listen} is not a loopback address: only nginx "
            "may reach this service (whoever reaches it sees the headers paid variants set)",
            file=sys.stderr,
        )
    try:
        engine = nginx.make_engine(
            args.rules,
            args.backend,
            args.store,
            args.dev_ledger or paths.default_dev_ledger(),
            schemes=args.schemes,
        )
    except RulesError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    except Refused as exc:
        raise CliError(f"--schemes: {exc}", EXIT_BAD_INPUT) from None
    except LightningError as exc:
        raise CliError(f"--backend: {exc}") from None
    try:
        sock = nginx.bind(host, port)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    problems = nginx.run_service(
        engine,
        sock,
        metrics=args.metrics,
        log_format=args.log_format,
        dry_run=args.dry_run,
        admin=args.admin,
        admin_secret=args.admin_secret,
        ops_remote=args.ops_remote,
    )
    for problem in problems:
        print(f"l402proxy: {problem}", file=sys.stderr)
    return Exit(EXIT_FAILED if problems else 0)


def nginx_config(args: argparse.Namespace) -> Line:
    """`nginx-config`: the text for nginx's http { }."""
    from .doors import nginx

    problem = nginx.ConfigProblem
    try:
        auth = nginx.parse_listen(args.auth)
    except problem as exc:
        raise CliError(f"--auth: {exc}", EXIT_BAD_INPUT) from None
    try:
        origin = nginx.parse_origin(args.upstream)
    except problem as exc:
        raise CliError(f"--upstream: {exc}", EXIT_BAD_INPUT) from None
    try:
        listen = nginx.parse_nginx_listen(args.listen)
    except problem as exc:
        raise CliError(f"--listen: {exc}", EXIT_BAD_INPUT) from None
    try:
        name = nginx.check_name(args.name)
    except problem as exc:
        raise CliError(f"--name: {exc}", EXIT_BAD_INPUT) from None
    for flag, check, value in (
        ("--verdict-cache", nginx.check_verdict_cache, args.verdict_cache),
        ("--verdict-cache-dir", nginx.check_cache_dir, args.verdict_cache_dir),
    ):
        try:
            if value is not None:
                check(value)
        except problem as exc:
            raise CliError(f"{flag}: {exc}", EXIT_BAD_INPUT) from None
    upstream_ca = upstream_ca_file(args.upstream_ca, origin.scheme)
    if args.rules is not None:
        try:
            rules = load_rules(args.rules)
        except RulesError as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        refused = nginx.new_engine().unsupported_rule(rules)
        if refused is not None:
            raise CliError(str(refused), EXIT_BAD_INPUT)
        names = nginx.set_header_names(rules)
    else:
        try:
            names = nginx.names_from_service(auth)
        except problem as exc:
            raise CliError(str(exc)) from None
    try:
        text = nginx.render_config(
            auth=auth,
            origin=origin,
            listen=listen,
            set_headers=names,
            name=name,
            upstream_ca=upstream_ca,
            verdict_cache=args.verdict_cache,
            verdict_cache_dir=args.verdict_cache_dir,
        )
    except problem as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    warning = nginx.tls_name_warning(origin)
    if warning is not None:
        print(f"l402proxy: warning: {warning}", file=sys.stderr)
    return Line(text.rstrip("\n"))


def upstream_ca_file(value: str | None, scheme: str) -> str:
    """The CA file nginx checks an https origin's certificate against, as an absolute path
    (nginx reads a relative one from its own prefix); it must exist now."""
    from .doors import nginx

    if value is None:
        if scheme == "https" and not Path(nginx.DEFAULT_CA_BUNDLE).is_file():
            raise CliError(
                f"--upstream: no CA certificates at {nginx.DEFAULT_CA_BUNDLE} to check the "
                "origin's certificate against: name them with --upstream-ca FILE",
                EXIT_BAD_INPUT,
            )
        return nginx.DEFAULT_CA_BUNDLE
    if scheme != "https":
        raise CliError("--upstream-ca: only for an https:// --upstream", EXIT_BAD_INPUT)
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise CliError(f"--upstream-ca: no such file: {value}", EXIT_BAD_INPUT)
    return str(path)


def run(args: argparse.Namespace) -> Any:
    if args.command == "serve-auth":
        return serve_auth(args)
    if args.command == "nginx-config":
        return nginx_config(args)
    if args.command == "decode":
        return decode_answer(args.value)
    if args.command == "rules":
        return rules_check(args.path)
    if args.command == "backend":
        ledger = args.ledger or paths.default_dev_ledger()
        node = run_async(lambda: backend_check(args.uri, wallet=args.wallet, ledger=ledger))
        if args.json:
            return {**dataclasses.asdict(node), "summary": node.summary()}
        return Line(f"reached {node.summary()}")
    if args.command == "dev":
        ledger = args.ledger or paths.default_dev_ledger()
        if args.dev_command == "pay":
            return run_async(lambda: dev_pay(ledger, args.wallet, args.bolt11, args.max_fee_msat))
        if args.dev_command == "invoices":
            return run_async(lambda: dev_invoices(ledger))
        return run_async(lambda: dev_balance(ledger, args.wallet))
    if args.command == "wallet":
        client_store = args.store or paths.default_client_store()
        if getattr(args, "limit", 1) < 1:
            raise CliError(f"limit must be at least 1, got {args.limit}")
        if args.wallet_command == "history":
            return run_async(lambda: wallet_history(client_store, args.limit))
        if args.wallet_command == "tokens":
            return run_async(lambda: wallet_tokens(client_store, args.limit))
        return run_async(lambda: wallet_spent(client_store))
    if args.command == "revenue":
        return revenue_command(args)
    if args.command == "feeds":
        return feeds_command(args)
    return tokens_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)  # or SystemExit, from argparse (--help, usage errors)
        finally:
            sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
    except BrokenPipeError:
        # `l402proxy tokens list | head -1`: the reader has what it wanted. No traceback, and
        # Python's own flush at exit must not hit the closed pipe again. (Not SIG_DFL for
        # SIGPIPE: a closed socket to a backend would then kill the process silently.)
        # (ValueError, OSError: stdout is no file, as in tests; then nothing flushes to it.)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except CliError as exc:
        print(f"l402proxy: {exc}", file=sys.stderr)
        return exc.code
    if isinstance(result, Exit):
        return result.code
    if isinstance(result, Line):
        print(result.text)
        return 0
    answer = result if isinstance(result, Answer) else Answer(result)
    json.dump(with_iso_times(answer.value), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return answer.code
