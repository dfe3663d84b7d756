"""Client decisions: which 402 challenges to pay, within which limits, one payment per scope at a
time, and the tokens that come out of it.

No mitmproxy here: the client addon and the httpx SDK (sdk.py) share this. A token's scope is
its origin plus the services its `services=` caveat names; which URLs belong to a scope is
learned from the challenges the server sends (a path, and the directories above it).

Bundles and single use: an answer to a request that carried a token may say what is left of
it (`X-L402-Balance: <remaining> <unit>`); the ledger keeps it, and a token with nothing left
is spent: never sent again, so the next request meets the 402 and pays within the limits.
Passes: a token whose `services=` caveat lists several services is tried, once per service,
for a challenge naming services it covers, before anything is paid.

Requests at once: those that meet a 402 for one scope together wait for one payment and all
retry with its token. A bundle (a single-use token above all) may not last them all: the
server grants some and answers the others with a 402 saying the token is spent. That is no
refusal of a token we paid for but our own requests using it up, so each request that lost
the race pays once more, for itself alone: a token no other request is given before this one
has used it (held back in the client store, `held_until`, so no other process sharing it
takes it either). At most two payments per request, the second only when the server said
"spent" (`X-L402-Balance: 0`) to a token bought for it and another request of ours that sent
that token was GRANTED with it: proof the server really used it. The losing request waits
for the answers of the others that carried it (at most pay_timeout): none granted, "spent" is
the server's refusal (`rejected_after_payment`), so a server that calls every token spent
takes at most one payment per request. A request refused after it paid (that extra payment
refused by the limits, or its token refused) still says what it paid (`Verdict.spent`).

The Payment scheme (draft-httpauth-payment, Lightning "charge"): a 402 whose
`WWW-Authenticate: Payment` challenge the client pays when the server offers no L402/LSAT
challenge, or when told to prefer it (`prefer="payment"`). The same checks as for L402 come
first (the invoice decoded here: its amount, payment hash and network must be the request's;
the challenge's `expires` and the invoice's expiry; the hosts, the price, the fee limit and the
budgets), and the same ledger row is written before paying (scheme "Payment"). A charge is good
for ONE request, which the server consumes: its credential is sent once, with the request it
was paid for, and never cached for a scope, shared or sent again. Requests at once to one scope
each pay for themselves (no single flight: a charge cannot be shared); the budgets, checked
and reserved in one write per payment, still bound what they spend together. A 401/402 to a
charge just paid is a refusal (`rejected_after_payment`, naming the server's problem type),
never a second payment. The answer's `Payment-Receipt` is kept in the ledger.

A charge paid but never presented (the wallet answered after pay_timeout, the process died
between paying and sending, the request went away) is not lost: once no request of ours is
about to send it, it is sent, once, with the next request to the same URL before it expires
(the store marks it presented before it leaves, across processes). Refused then (the server
consumed it after all, or it no longer fits), it is dropped and that request pays for itself.
"""

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from .l402.charge_request import ChargeRequest
from .l402.headers import Challenge, format_credential, parse_challenges
from .l402.invoice import InvoiceInfo, decode_invoice
from .l402.payment import (
    INTENT_CHARGE,
    METHOD_LIGHTNING,
    PROBLEM_BASE,
    PROBLEM_CONTENT_TYPE,
    decode_receipt,
    encode_credential,
    invoice_mismatches,
    read_challenges,
)
from .l402.payment import SCHEME as CHARGE_SCHEME
from .l402.payment import Challenge as PaymentChallenge
from .l402.token import TokenError, TokenInfo, inspect, parse_caveat
from .lightning import BackendUnavailable, LightningError, NodeInfo, PaymentFailed, Wallet
from .store.client import (
    BALANCE_UNITS,
    MAX_BALANCE,
    ClientStore,
    NewPayment,
    Payment,
    sat_number,
)
from .store.database import StoreError

log = logging.getLogger("l402proxy.payer")

REFUSAL_CODES = (
    "not_allowed",
    # The client addon's: a request from a client outside l402_clients is never paid for.
    "client_not_allowed",
    "max_price",
    "budget_daily",
    "budget_total",
    "no_amount",
    "hash_mismatch",
    "invoice_expired",
    "bad_challenge",
    "payment_failed",
    "payment_pending",
    "rejected_after_payment",
    "wrong_network",
    # The wallet's own reasons for paying nothing (an NWC wallet's INSUFFICIENT_BALANCE,
    # QUOTA_EXCEEDED, RATE_LIMITED): see refusal_code().
    "insufficient_balance",
    "quota_exceeded",
    "rate_limited",
    # Payment scheme: the challenge's request disagrees with its own invoice (amount, payment
    # hash or network), or the challenge's `expires` has passed.
    "request_mismatch",
    "challenge_expired",
)
# What a wallet may name as its reason for refusing a payment (PaymentFailed.refusal).
WALLET_REFUSALS = ("insufficient_balance", "quota_exceeded", "rate_limited", "payment_failed")
# Which scheme to pay when a 402 offers both L402/LSAT and Payment (l402_prefer).
PREFERENCES = ("l402", "payment")
# What the client can pay, sent as Accept-Payment: the Lightning charge, no sessions.
ACCEPT_PAYMENT = "lightning/charge"
# A problem+json body is read for its type only up to this size.
MAX_PROBLEM_BODY = 64 * 1024
# The longest problem type quoted in a refusal (a server's text, shown to players).
MAX_PROBLEM_TYPE = 100
# The same refusal (origin, url, reason) is written to the history at most this often.
REFUSAL_RECORD_SECONDS = 60.0
LOOKUP_TIMEOUT_SECONDS = 30.0
# How long the wallet may take to say who it is at start; past that it counts as unreachable.
INFO_TIMEOUT_SECONDS = 15.0
OTHER_PROCESS_POLL_SECONDS = 0.05
# What recovery waits for when a wallet states an unusable `settles_within`.
SETTLES_WITHIN_UNREADABLE = 24 * 3600.0
# What the server says is left of the token a request carried (wire fact 1 of issue 14).
BALANCE_HEADER = "X-L402-Balance"
# A malformed X-L402-Balance is warned about at most this often per origin (debug otherwise).
BALANCE_WARNING_SECONDS = 60.0
# In-memory bookkeeping that anyone can grow (a server answering with new tokens) is
# emptied at this size; losing it costs a round trip, never a payment.
MEMORY_LIMIT = 10_000
_BALANCE_RE = re.compile(r"([0-9]+)[ \t]+([A-Za-z]+)")


def refusal_code(exc: PaymentFailed) -> str:
    """The refusal code for a payment the wallet refused: the wallet's own reason when it names
    one of ours (`refusal`, set by the NWC wallet: insufficient_balance, quota_exceeded,
    rate_limited), else payment_failed."""
    code = getattr(exc, "refusal", None)
    return code if isinstance(code, str) and code in WALLET_REFUSALS else "payment_failed"


def parse_prefer(text: str) -> str:
    """l402_prefer: "l402" or "payment" (any case); ValueError in one line otherwise."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value not in PREFERENCES:
        raise ValueError(f"l402_prefer must be l402 or payment, got {text!r}")
    return value


@dataclass(frozen=True)
class HostPattern:
    host: str  # lower-case; may hold * and ? wildcards
    port: int | None


def parse_host_pattern(text: str) -> HostPattern:
    """`example.com`, `*.example.com`, `127.0.0.1:8081`, `[::1]:8081`; ValueError otherwise."""
    value = text.strip().lower()
    if not value:
        raise ValueError("empty host pattern")
    if "/" in value or "@" in value:
        raise ValueError(f"host pattern {text!r} must be a host name, not a URL")
    port: int | None = None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"host pattern {text!r}: bad IPv6 literal")
        has_port, port_text = bool(rest), rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        has_port = True
    else:
        host, port_text, has_port = value, "", False
    if has_port:
        # "example.com:" is a typo, not "any port".
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"host pattern {text!r}: port must be 1-65535")
        port = int(port_text)
    if not host:
        raise ValueError(f"host pattern {text!r} has no host")
    return HostPattern(host, port)


def host_allowed(patterns: Iterable[HostPattern], host: str, port: int) -> bool:
    """No patterns: any host. `*.example.com` matches subdomains, not example.com itself."""
    host = host.lower().strip("[]")
    any_pattern = False
    for pattern in patterns:
        any_pattern = True
        if pattern.port is not None and pattern.port != port:
            continue
        if fnmatch.fnmatchcase(host, pattern.host):
            return True
    return not any_pattern


@dataclass(frozen=True)
class Limits:
    """What the user lets the client spend, in sat. Checked before every payment."""

    max_price_sat: int = 100
    max_fee_sat: int = 10
    budget_daily_sat: int = 1000
    budget_total_sat: int | None = None
    allow: tuple[str, ...] = ()
    hosts: tuple[HostPattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_price_sat", "max_fee_sat", "budget_daily_sat", "budget_total_sat"):
            value = getattr(self, name)
            if value is None and name == "budget_total_sat":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"l402_{name} must be a whole number of sat >= 0, got {value!r}")
        object.__setattr__(self, "hosts", tuple(parse_host_pattern(p) for p in self.allow))

    def allows(self, host: str, port: int) -> bool:
        return host_allowed(self.hosts, host, port)

    def describe(self) -> str:
        total = "" if self.budget_total_sat is None else f", {self.budget_total_sat} sat in total"
        hosts = ", ".join(self.allow) if self.allow else "any host"
        return (
            f"at most {self.max_price_sat} sat per payment (+ {self.max_fee_sat} sat fee), "
            f"{self.budget_daily_sat} sat per 24 h{total}; paying {hosts}"
        )


@dataclass(frozen=True)
class Balance:
    """An `X-L402-Balance` value: what is left of a token after the request it answers."""

    remaining: int
    unit: str

    def text(self) -> str:
        return f"{self.remaining} {self.unit}"


def parse_balance(values: Iterable[str]) -> Balance | None:
    """The balance an answer states (its X-L402-Balance lines); None when it states none.

    ValueError (one line, safe to log) for anything but `<remaining> <unit>`: a decimal
    integer >= 0 and one of requests, bytes, units (any case). Several lines must agree.
    """
    texts = {value.strip() for value in values}
    if not texts:
        return None
    if len(texts) > 1:
        shown = "; ".join(sorted(header_safe(text)[:40] for text in texts)[:3])
        raise ValueError(f"{BALANCE_HEADER} has several different values ({shown})")
    (text,) = texts
    match = _BALANCE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{BALANCE_HEADER} {header_safe(text)[:80]!r} is not '<remaining> <unit>' "
            f"(unit one of {', '.join(BALANCE_UNITS)})"
        )
    digits, unit = match.group(1), match.group(2).lower()
    if unit not in BALANCE_UNITS:
        raise ValueError(
            f"{BALANCE_HEADER} unit {header_safe(unit)[:40]!r} is not one of "
            f"{', '.join(BALANCE_UNITS)}"
        )
    # Compared as text first: int() of a huge string is itself slow.
    if len(digits.lstrip("0")) > len(str(MAX_BALANCE)) or int(digits) > MAX_BALANCE:
        raise ValueError(f"{BALANCE_HEADER} {digits[:40]} is larger than any balance")
    return Balance(int(digits), unit)


def service_expiries(macaroon: str) -> tuple[tuple[str, float], ...]:
    """(service, unix time) of each `<service>_valid_until=` caveat, and ("", time) for each
    lsat-js `expiration=` (any service): when a pass stops opening each of its services.

    () when the macaroon cannot be read: the token's own valid_until then applies (the
    earliest of them, the cautious answer).
    """
    try:
        caveats = inspect(macaroon).caveats
        found: list[tuple[str, float]] = []
        for text in caveats:
            caveat = parse_caveat(text)
            if caveat.condition == "expiration":
                found.append(("", int(caveat.value) / 1000))
            elif caveat.condition.endswith("_valid_until"):
                found.append((caveat.condition.removesuffix("_valid_until"), int(caveat.value)))
    except (TokenError, ValueError):
        return ()
    return tuple(found)


def scope_services(scope: str) -> tuple[str, ...]:
    """The services a scope names ("services:a,b"); () for a path scope."""
    kind, _, names = scope.partition(":")
    return tuple(name for name in names.split(",") if name) if kind == "services" else ()


@dataclass(frozen=True)
class Token:
    """A paid token as it is sent: `Authorization: <credential>`."""

    origin: str
    scope: str
    services: tuple[str, ...]
    payment_hash: bytes
    valid_until: float | None
    credential: str
    # When it stops opening each service (service_expiries); () : valid_until for all.
    expiries: tuple[tuple[str, float], ...] = field(default=(), compare=False, repr=False)
    # A Payment charge (see the module docstring): good for the one request it is sent with;
    # valid_until is when the challenge expires.
    charge: bool = False

    @classmethod
    def from_payment(cls, payment: Payment) -> "Token":
        """The credential of a paid ledger row. ValueError for a charge row whose challenge
        cannot be read back (not written by this code)."""
        assert payment.preimage is not None
        if payment.is_charge:
            return cls(
                origin=payment.origin,
                scope=payment.scope,
                services=(),
                payment_hash=payment.payment_hash,
                valid_until=payment.valid_until,
                credential=encode_credential(
                    challenge_from_json(payment.challenge), payment.preimage
                ),
                charge=True,
            )
        return cls(
            origin=payment.origin,
            scope=payment.scope,
            services=payment.services,
            payment_hash=payment.payment_hash,
            valid_until=payment.valid_until,
            credential=format_credential([payment.macaroon], payment.preimage, payment.scheme),
            expiries=service_expiries(payment.macaroon),
        )

    def until(self, services: Iterable[str] = ()) -> float | None:
        """When it stops opening `services` (by default: all of its own, the earliest)."""
        wanted = set(services)
        if not wanted or not self.expiries or wanted >= set(self.services):
            return self.valid_until
        relevant = [at for name, at in self.expiries if name == "" or name in wanted]
        return min(relevant) if relevant else None

    def usable(self, now: float, services: Iterable[str] = ()) -> bool:
        """Not expired, for `services` (a pass may end at different times per service)."""
        until = self.until(services)
        return until is None or until > now

    def covers(self, services: Iterable[str]) -> bool:
        """Whether it names every one of `services` (and they are some)."""
        wanted = set(services)
        return bool(wanted) and wanted <= set(self.services)

    @property
    def label(self) -> str:
        return ",".join(self.services) or self.scope


def challenge_from_json(text: str | None) -> PaymentChallenge:
    """A charge's challenge as the ledger keeps it (`Challenge.echo()` as JSON)."""
    try:
        echoed = json.loads(text or "")
        if not isinstance(echoed, dict) or not all(
            isinstance(value, str) for value in echoed.values()
        ):
            raise TypeError
        return PaymentChallenge(**echoed)
    except (TypeError, ValueError):
        raise ValueError("the ledger's copy of the Payment challenge is unreadable") from None


def charge_key(url: str) -> str:
    """What a charge paid for `url` is kept under until it is sent: the origin, path and
    query (the proxy and the SDK write URLs differently: :80 or not)."""
    origin = split_url(url)[0]
    parts = urlsplit(url)
    return origin + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def header_safe(text: str) -> str:
    """One printable ASCII line: names and messages may quote what a hostile server sent."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in " ".join(escaped.split()))


@dataclass(frozen=True)
class Paid:
    token: Token
    amount_msat: int
    fee_msat: int
    # False: the token came from another request's payment (or an earlier one): nothing
    # was paid for this request.
    paid_here: bool
    # True: a token held for other services too (a pass), tried for this challenge's.
    borrowed: bool = False
    # True: the token of a payment another request made while this one waited for it.
    waited: bool = False

    def header(self) -> str:
        return header_safe(
            f"{sat_number(self.amount_msat)} sat (fee {sat_number(self.fee_msat)} sat) "
            f"for {self.token.label}"
        )

    def plus(self, later: "Paid") -> "Paid":
        """`later`, with what this payment cost added: the request paid both (this one's
        token went to another request of ours first)."""
        return replace(
            later,
            amount_msat=self.amount_msat + later.amount_msat,
            fee_msat=self.fee_msat + later.fee_msat,
        )


@dataclass(frozen=True)
class Refused:
    code: str
    message: str

    def __post_init__(self) -> None:
        # Players and scripts read the code: only the documented ones may reach them.
        if self.code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {self.code!r}")

    def header(self) -> str:
        return header_safe(f"{self.code}; {self.message}")


Outcome = Paid | Refused


def origin_of(scheme: str, host: str, port: int) -> str:
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme.lower()}://{host}:{port}"


def split_url(url: str) -> tuple[str, str, int, str]:
    """(origin, host, port, path without query) of an absolute http(s) URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    return origin_of(scheme, parts.hostname, port), parts.hostname, port, parts.path or "/"


def path_candidates(path: str) -> Iterator[str]:
    """The path itself, then each directory above it down to "/": where a scope may be known."""
    path = path.split("?", 1)[0] or "/"
    yield path
    cut = len(path)
    while cut > 0:
        cut = path.rfind("/", 0, cut)
        if cut < 0:
            return
        yield path[: cut + 1]


def directory_of(path: str) -> str:
    path = path.split("?", 1)[0] or "/"
    return path[: path.rfind("/") + 1] or "/"


def scope_of(info: TokenInfo, path: str) -> str:
    """The server's own scope (services=) when it names one; else the directory asked for."""
    if info.services:
        return "services:" + ",".join(sorted(info.services))
    return "path:" + directory_of(path)


@dataclass(frozen=True)
class _Offer:
    """The challenge picked from a 402, read and ready to check."""

    challenge: Challenge
    info: TokenInfo
    scope: str


def pick_challenge(values: Iterable[str], path: str) -> _Offer | Refused | None:
    """The first readable L402/LSAT challenge, in the server's order (its preferred scheme).

    None: the response carries no L402/LSAT challenge at all (not ours to handle).
    """
    challenges = parse_challenges(list(values))
    if not challenges:
        return None
    problems = []
    for challenge in challenges:
        try:
            info = inspect(challenge.macaroon)
        except TokenError as exc:
            problems.append(f"{challenge.scheme}: {exc}")
            continue
        return _Offer(challenge, info, scope_of(info, path))
    return Refused("bad_challenge", "no usable macaroon in the challenge: " + "; ".join(problems))


@dataclass(frozen=True)
class _ChargeOffer:
    """The Payment (lightning/charge) challenge picked from a 402, its request decoded."""

    challenge: PaymentChallenge
    request: ChargeRequest

    @property
    def scope(self) -> str:
        # What the ledger's scope column says of a charge: no scope tokens are kept for, only
        # the realm it was paid to (shown in X-L402-Paid and the history).
        return "payment:" + self.challenge.realm


def pick_charge(values: Iterable[str]) -> _ChargeOffer | Refused | None:
    """The first readable lightning/charge Payment challenge, in the server's order.

    None: no Payment challenge we could pay (none, or only other methods and intents).
    """
    listed = read_challenges(list(values))
    charges = [
        c for c in listed.challenges if (c.method, c.intent) == (METHOD_LIGHTNING, INTENT_CHARGE)
    ]
    if not charges:
        if listed.skipped and not listed.challenges:
            return Refused("bad_challenge", "; ".join(listed.skipped))
        return None
    problems = []
    for challenge in charges:
        try:
            return _ChargeOffer(challenge, challenge.charge_request())
        except ValueError as exc:
            problems.append(str(exc))
    return Refused(
        "bad_challenge", "no usable Payment request in the challenge: " + "; ".join(problems)
    )


def has_charge_challenge(www_authenticate: Iterable[str]) -> bool:
    """A Payment challenge we would pay (lightning/charge), readable or not."""
    return pick_charge(www_authenticate) is not None


def problem_type(content_type: str | None, body: bytes | None) -> str | None:
    """The `type` of an RFC 9457 problem body (the draft's slug when it is one of
    https://paymentauth.org/problems/...), one safe line; None when there is none."""
    if not content_type or not body or len(body) > MAX_PROBLEM_BODY:
        return None
    if content_type.partition(";")[0].strip().lower() != PROBLEM_CONTENT_TYPE:
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    kind = document.get("type") if isinstance(document, dict) else None
    if not isinstance(kind, str) or not kind:
        return None
    return header_safe(kind.removeprefix(PROBLEM_BASE))[:MAX_PROBLEM_TYPE]


async def wallet_info(wallet: Wallet) -> NodeInfo:
    """Who the wallet is (network, node), or BackendUnavailable saying why it cannot be reached."""
    try:
        return await asyncio.wait_for(wallet.info(), INFO_TIMEOUT_SECONDS)
    except TimeoutError:
        raise BackendUnavailable(
            f"{wallet.describe()}: no answer within {INFO_TIMEOUT_SECONDS:g} s"
        ) from None


def settles_within(wallet: Wallet) -> float:
    """Seconds after a payment starts during which the wallet's "failed"/"unknown" is not final.

    A wallet written before `Wallet.settles_within` existed promised final lookups (0); a
    value that is not a finite number >= 0 cannot be trusted either way, so it counts as a day.
    """
    value = getattr(wallet, "settles_within", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return SETTLES_WITHIN_UNREADABLE
    if not math.isfinite(value) or value < 0:
        return SETTLES_WITHIN_UNREADABLE
    return float(value)


def wallet_identity(wallet: Wallet) -> str:
    """Which wallet paid, precisely enough to ask the same one after a restart."""
    return str(getattr(wallet, "identity", wallet.name))


def has_challenge(www_authenticate: Iterable[str]) -> bool:
    return bool(parse_challenges(list(www_authenticate)))


def about_token(www_authenticate: Iterable[str], token: Token, url: str) -> bool:
    """Whether a 401/402 to `url` answered to `token` concerns it (not another service): the
    challenge is for its scope (read the way it was when the token was bought, path
    included), or names a service the token names (a pass tried for one of its services)."""
    offer = pick_challenge(www_authenticate, split_url(url)[3])
    if offer is None:
        return False  # no L402 challenge: the origin's own 401/402, not about our token
    if isinstance(offer, Refused) or offer.scope == token.scope:
        return True
    return bool(set(offer.info.services) & set(token.services))


@dataclass(frozen=True)
class Answer:
    """What a (re)sent request got back, as far as paying is concerned."""

    status: int
    www_authenticate: tuple[str, ...]
    url: str  # the URL that answered (after redirects, for clients that follow them)
    # Its X-L402-Balance lines, as sent (read by Payer.note_balance).
    balance: tuple[str, ...] = ()
    # Its Payment-Receipt lines, as sent (read by Payer.note_receipt).
    receipts: tuple[str, ...] = ()
    # The problem type its application/problem+json body names (problem_type), if any.
    problem: str | None = None


@dataclass(frozen=True)
class Resend:
    """Step: send the request again, with this Authorization (None: without a token)."""

    authorization: str | None


@dataclass(frozen=True)
class Await:
    """Step: run this on the payer's event loop and send back its result."""

    job: Coroutine[Any, Any, Any]


@dataclass(frozen=True)
class Verdict:
    """How to present the last answer: paid (X-L402-Paid), refused (X-L402-Refused) or as is.

    `spent`, beside `refused`: what this request paid all the same (its payments summed, as
    X-L402-Paid says it beside X-L402-Refused); None when it paid nothing."""

    paid: Paid | None = None
    refused: Refused | None = None
    spent: Paid | None = None


Step = Resend | Await


def _redirected(asked: str, answer: Answer) -> Refused | None:
    """A challenge from another origin than the one asked (after a redirect) is not paid."""
    answered = split_url(answer.url)[0]
    if answered == asked:
        return None
    return Refused(
        "not_allowed",
        f"the challenge came from {answered} after a redirect; only {asked} was asked",
    )


def owner_is_alive(owner: str) -> bool:
    """Whether the process that wrote a pending payment still runs (and may be paying it)."""
    pid_text = owner.partition(":")[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class _Carriers:
    """The requests of ours given one token to send, and what the server answered them."""

    def __init__(self) -> None:
        self.carried = 0  # given it (up front, or to retry with)
        self.answered = 0  # of those, answered with it (or gone without an answer)
        self.granted = 0  # of those, granted with it: the server used it
        self.changed = asyncio.Event()

    def wake(self) -> None:
        """Tell whoever waits for these answers that one came (a fresh event for the next)."""
        self.changed.set()
        self.changed = asyncio.Event()


class Payer:
    """Pays challenges for one wallet and one client store; see the module docstring."""

    def __init__(
        self,
        wallet: Wallet,
        store: ClientStore,
        limits: Limits,
        *,
        pay_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
        prefer: str = "l402",
    ) -> None:
        self.wallet = wallet
        # Which scheme a 402 offering both L402 and Payment is paid with (parse_prefer).
        self.prefer = parse_prefer(prefer)
        # What the wallet said at start(); its network guards against paying a testnet
        # invoice from a mainnet wallet (or the reverse).
        self.node: NodeInfo | None = None
        self.store = store
        self.limits = limits
        self.pay_timeout = pay_timeout
        self.clock = clock
        self.tokens: dict[tuple[str, str], Token] = {}
        self.paths: dict[str, dict[str, str]] = {}
        self.flights: dict[tuple[str, str], asyncio.Task[Outcome]] = {}
        # Payments made for one request alone (see the module docstring): never joined.
        self.lone_flights: set[asyncio.Task[Outcome]] = set()
        self.in_flight: set[bytes] = set()
        # Payment hash -> the requests of ours given the token to send (up front or to retry
        # with) and what the server answered them: one of them granted, and a "spent" answer
        # to another was our own doing (lost_to_ours).
        self.carriers: dict[bytes, _Carriers] = {}
        # The loop the payer runs on (the SDK drives exchange() from its caller's thread):
        # release() and answered() run their bookkeeping there.
        self.loop: asyncio.AbstractEventLoop | None = None
        # Marks this process's pending payments, so another process's recovery leaves them be.
        self.owner = f"{os.getpid()}:{secrets.token_hex(8)}"
        self.recent_refusals: dict[tuple[str, str, str], float] = {}
        self.background: set[asyncio.Task[None]] = set()
        # Payment hashes of tokens this process saw spent (balance 0): never kept again,
        # even if a store read that predates the news hands one back.
        self.spent: set[bytes] = set()
        # (payment hash, scope): a pass the server refused for that scope's services; not
        # tried for them again.
        self.passes_refused: set[tuple[bytes, str]] = set()
        # origin -> when a malformed X-L402-Balance from it was last warned about.
        self.balance_warned: dict[str, float] = {}
        # Payment charges (see the module docstring). Payment hash -> until when the request
        # that paid it may still send it (from the payment's start until pay_timeout after
        # it ends): no other request takes it meanwhile.
        self.charging: dict[bytes, float] = {}
        # Charges this process sent (or tried to): never sent again, whatever the store says.
        self.presented: set[bytes] = set()
        # charge_key(url) -> charges paid and never presented, for the next request there.
        self.unused: dict[str, list[Token]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> list[Payment]:
        """Load tokens and learned paths, then settle what a crash left pending."""
        self._remember_loop()
        start = getattr(self.wallet, "start", None)
        if start is not None:
            await start()
        self.node = await wallet_info(self.wallet)
        now = self.clock()
        for payment in await self.store.tokens(now):
            token = Token.from_payment(payment)
            self.tokens[(token.origin, token.scope)] = token
        for origin, path, scope in await self.store.learned_paths():
            self.paths.setdefault(origin, {})[path] = scope
        return await self.recover()  # which also picks up charges paid and never sent

    async def close(self) -> None:
        # Let payments under way record their outcome; one cut short stays pending and the
        # next start asks the wallet about it.
        unfinished = [*self.background, *self.flights.values(), *self.lone_flights]
        if unfinished:
            await asyncio.wait(unfinished, timeout=5.0)
        await self.wallet.close()
        await self.store.close()

    async def recover(self) -> list[Payment]:
        """Ask the wallet about every pending payment not being paid by this process now.

        Succeeded: the token is stored (never paid again). Failed, or unknown to the wallet
        (never sent): released, once the wallet's node can no longer start a new attempt on
        its own (`settles_within` after the payment began). Still pending, or the wallet
        cannot say: left for next time.
        """
        settled: list[Payment] = []
        identity = wallet_identity(self.wallet)
        horizon = settles_within(self.wallet)
        for payment in await self.store.pending():
            if payment.payment_hash in self.in_flight:
                continue
            if payment.owner != self.owner and owner_is_alive(payment.owner):
                continue  # another live process is paying it; it records the outcome itself
            if payment.wallet != identity:
                # Another wallet may have paid it: asking this one would wrongly say "never
                # sent" and release it. Left pending until that wallet is configured again.
                log.warning(
                    f"l402: payment {payment.payment_hash.hex()} ({payment.url}) was made "
                    f"with wallet {payment.wallet}; configure that wallet again to settle it"
                )
                continue
            try:
                state = await asyncio.wait_for(
                    self.wallet.lookup_payment(payment.payment_hash), LOOKUP_TIMEOUT_SECONDS
                )
            except (LightningError, TimeoutError) as exc:
                log.warning(
                    f"l402: payment {payment.payment_hash.hex()} is still unresolved: "
                    f"cannot ask the wallet ({exc or 'timed out'}); checking again later"
                )
                continue
            now = self.clock()
            if state.status == "succeeded" and state.preimage is not None:
                if hashlib.sha256(state.preimage).digest() != payment.payment_hash:
                    log.error(
                        f"l402: wallet reports payment {payment.payment_hash.hex()} succeeded "
                        "with a preimage that does not match; leaving it pending"
                    )
                    continue
                done = await self.store.settle(
                    payment.payment_hash, state.preimage, state.fee_msat, now
                )
                settled.append(done)
                if done.is_charge:
                    # Never presented: the next request to its URL sends it (_load_unused).
                    log.info(
                        f"l402: recovered a Payment charge interrupted earlier: "
                        f"{sat_number(done.amount_msat)} sat to {done.origin}; the next "
                        f"request to {done.url} presents it"
                    )
                    continue
                self._keep(Token.from_payment(done))
                # The URL it was bought for belongs to its scope: sent up front from now on.
                self._learn(done.origin, split_url(done.url)[3], done.scope)
                log.info(
                    f"l402: recovered the token of a payment interrupted earlier: "
                    f"{sat_number(done.amount_msat)} sat to {done.origin} ({done.url})"
                )
            elif state.status in ("failed", "unknown"):
                why = "failed" if state.status == "failed" else "was never sent"
                final_at = payment.created_at + horizon
                if horizon > 0 and now < final_at:
                    # Core Lightning and Eclair go on paying without us and show nothing, or
                    # only failed parts, between two attempts: releasing now could pay twice.
                    log.info(
                        f"l402: interrupted payment {payment.payment_hash.hex()} looks like it "
                        f"{why}, but {self.wallet.name} may still be trying for "
                        f"{final_at - now:.0f} s; checking again later"
                    )
                    continue
                await self.store.fail(payment.payment_hash, f"the payment {why}", now)
                log.info(f"l402: interrupted payment {payment.payment_hash.hex()} {why}")
        await self._load_unused()
        return settled

    async def _load_unused(self) -> None:
        """Offer the charges paid and never presented to the next request to their URL:
        those of no request of ours still about to send them, nor of a live other process
        (whose request may still send them)."""
        now = self.clock()
        self.charging = {h: until for h, until in self.charging.items() if until > now}
        pooled = {t.payment_hash for tokens in self.unused.values() for t in tokens}
        for payment in await self.store.unused_charges(now):
            payment_hash = payment.payment_hash
            if (
                payment_hash in pooled
                or payment_hash in self.presented
                or payment_hash in self.in_flight
                or self.charging.get(payment_hash, float("-inf")) > now
                or (payment.owner != self.owner and owner_is_alive(payment.owner))
            ):
                continue
            try:
                token = Token.from_payment(payment)
            except ValueError as exc:
                log.warning(f"l402: charge {payment_hash.hex()} cannot be sent: {exc}")
                continue
            if sum(len(tokens) for tokens in self.unused.values()) >= MEMORY_LIMIT:
                break  # the rest wait in the store for the next round
            self.unused.setdefault(charge_key(payment.url), []).append(token)
            pooled.add(payment_hash)
            log.info(
                f"l402: a Payment charge paid earlier for {payment.url} was never sent; the "
                "next request there presents it"
            )

    # -- request side --------------------------------------------------------------------------

    def allows(self, host: str, port: int) -> bool:
        return self.limits.allows(host, port)

    def scope_for(self, origin: str, path: str) -> str | None:
        known = self.paths.get(origin)
        if not known:
            return None
        for candidate in path_candidates(path):
            scope = known.get(candidate)
            if scope is not None:
                return scope
        return None

    def token_for(self, origin: str, path: str) -> Token | None:
        """The token to send up front, from memory: no I/O on the request path."""
        scope = self.scope_for(origin, path)
        if scope is None:
            return None
        token = self.tokens.get((origin, scope))
        if token is None or not token.usable(self.clock(), scope_services(scope)):
            return None
        return token

    def up_front(self, origin: str, path: str) -> Token | None:
        """The token a request to `origin` `path` carries from the start (token_for), counted
        as carried by one more request."""
        token = self.token_for(origin, path)
        if token is not None:
            self._remember_loop()
            self._carry(token)
        return token

    async def take_charge(self, url: str) -> Token | None:
        """A charge paid earlier for `url` and never sent (see the module docstring), claimed
        for this request alone: marked presented in the store before it is returned, so no
        other request (of any process) sends it too. None when there is none."""
        key = charge_key(url)
        waiting = self.unused.get(key)
        while waiting:
            token = waiting.pop(0)
            if not waiting:
                del self.unused[key]
            now = self.clock()
            if not token.usable(now):
                continue  # expired: the server would refuse it
            try:
                claimed = await self.store.present(token.payment_hash, now)
            except StoreError as exc:
                log.warning(f"l402: could not claim the charge paid for {url}: {exc}")
                return None
            if claimed:
                self._note_presented(token.payment_hash)
                log.info(f"l402: presenting the Payment charge paid earlier for {url}")
                return token
            waiting = self.unused.get(key)
        return None

    def flight_for(self, origin: str, path: str) -> asyncio.Task[Outcome] | None:
        """A payment under way for this URL's scope: better to wait for it than draw a 402."""
        scope = self.scope_for(origin, path)
        return None if scope is None else self.flights.get((origin, scope))

    # -- response side -------------------------------------------------------------------------

    async def handle_challenge(
        self,
        *,
        url: str,
        www_authenticate: Iterable[str],
        sent: Token | None = None,
        passes: bool = True,
        alone: bool = False,
    ) -> Outcome | None:
        """A 402 came back for `url`: a token to retry with, why not, or None (not L402).

        `sent` is the token the request carried, if any: when the server refuses it for its
        own scope it is dropped (a pass tried for this scope is not tried for it again), and
        a new one is paid at most once for this call. `passes`: a token held for other
        services too that covers the challenge's may be returned (borrowed) instead.
        `alone`: paid for this request only, whatever is held or under way for the scope;
        its token is held back from every other request until `release`.
        """
        self._remember_loop()
        origin, host, port, path = split_url(url)
        if not self.allows(host, port):
            return await self._refuse(
                origin, url, Refused("not_allowed", f"{host}:{port} is not in l402_allow"), None
            )
        offer = pick_challenge(www_authenticate, path)
        if offer is None:
            return None
        if isinstance(offer, Refused):
            return await self._refuse(origin, url, offer, None)
        key = (origin, offer.scope)
        if sent is not None and sent.origin == origin:
            if sent.scope == offer.scope:
                if sent.payment_hash not in self.spent:  # a spent one is out already
                    await self.drop(sent, "the server answered 402 to it")
            elif set(sent.services) & set(offer.info.services):
                self._refuse_pass(sent, key)
        rejected = sent.payment_hash if sent is not None else None

        existing = None if alone else self.tokens.get(key)
        if (
            existing is not None
            and existing.payment_hash != rejected
            and existing.usable(self.clock(), offer.info.services)
        ):
            self._learn(origin, path, offer.scope)
            self._carry(existing)
            return Paid(existing, 0, 0, paid_here=False)
        held = self._pass_for(origin, offer, rejected) if passes and not alone else None
        if held is not None:
            # Sent up front for this scope's URLs too from now on, until the server says no.
            self.tokens[key] = held
            self._learn(origin, path, offer.scope)
            log.info(
                f"l402: trying the token held for {origin} {held.label} for "
                f"{','.join(offer.info.services)} before paying"
            )
            self._carry(held)
            return Paid(held, 0, 0, paid_here=False, borrowed=True)
        loop = asyncio.get_running_loop()
        flight = None if alone else self.flights.get(key)
        waiting = flight is not None
        if alone:
            # Not in self.flights: nobody waits for it to share its token.
            flight = loop.create_task(
                self._fly(key, url, offer, alone=True), name=f"l402 payment {origin} (alone)"
            )
            self.lone_flights.add(flight)
            flight.add_done_callback(self.lone_flights.discard)
        elif flight is None:
            flight = loop.create_task(self._fly(key, url, offer), name=f"l402 payment {origin}")
            self.flights[key] = flight
            flight.add_done_callback(lambda _: self.flights.pop(key, None))
        else:
            log.debug(f"l402: waiting for the payment under way for {origin} {offer.scope}")
        # Shielded: a request that goes away must not cancel a payment under way.
        outcome = await asyncio.shield(flight)
        if isinstance(outcome, Paid):
            # Learnt only with a token in hand: refused challenges leave no trace to grow on.
            self._learn(origin, path, offer.scope)
            if outcome.token.payment_hash == rejected:
                return Refused("rejected_after_payment", "the server refused the token just paid")
            if waiting:
                # The request that paid reports it.
                outcome = replace(outcome, paid_here=False, waited=True)
            self._carry(outcome.token)
        return outcome

    async def drop(self, token: Token, reason: str) -> None:
        if self._forget(token):
            log.info(f"l402: dropped the token for {token.origin} {token.label}: {reason}")
        await self.store.drop(token.payment_hash, reason, self.clock())

    async def turned_down(
        self, token: Token, www_authenticate: Iterable[str], url: str, reason: str
    ) -> None:
        """The server refused `token` (401) for `url`: a pass tried for another scope is not
        tried for it again; any other token is dropped."""
        origin, _, _, path = split_url(url)
        offer = pick_challenge(www_authenticate, path)
        if (
            isinstance(offer, _Offer)
            and token.origin == origin
            and offer.scope != token.scope
            and set(token.services) & set(offer.info.services)
        ):
            self._refuse_pass(token, (origin, offer.scope))
            return
        await self.drop(token, reason)

    async def note_balance(self, token: Token, answer: Answer) -> Balance | None:
        """What an answer to a request that carried `token` says is left of it.

        The ledger keeps it; 0 means spent: the token is never sent again (the next request
        meets the 402 and pays within the limits). A malformed X-L402-Balance is ignored
        with a warning: it neither makes the client pay nor stops it using the token. A
        balance above 0 is written behind the answer; 0 before it goes (so no payment of
        this process can pick the spent token up from the store again).
        """
        if not answer.balance or answer.status == 401 or token.charge:
            # A 401 says the token is invalid: dropped, whatever it had left. A charge is
            # used once, whatever the server says is left.
            return None
        if split_url(answer.url)[0] != token.origin:
            return None  # answered after a redirect elsewhere: not about our token
        try:
            balance = parse_balance(answer.balance)
            if balance is not None and balance.remaining and answer.status == 402:
                raise ValueError(f"a 402 says {balance.text()} are left; a 402 grants nothing")
        except ValueError as exc:
            self._warn_balance(token.origin, f"l402: ignored from {answer.url}: {exc}")
            return None
        if balance is None:
            return None
        now = self.clock()
        if balance.remaining:
            log.debug(f"l402: {balance.text()} left of the token for {token.origin} {token.label}")
            self._later(
                self.store.note_balance(token.payment_hash, balance.remaining, balance.unit, now)
            )
            return balance
        if len(self.spent) >= MEMORY_LIMIT:
            self.spent.clear()
        self.spent.add(token.payment_hash)
        if self._forget(token):
            log.info(
                f"l402: the token for {token.origin} {token.label} is used up (0 "
                f"{balance.unit} left); the next request there pays again"
            )
        try:
            await self.store.note_balance(token.payment_hash, 0, balance.unit, now)
        except StoreError as exc:
            log.warning(f"l402: could not record the spent token in the client store: {exc}")
        return balance

    async def rejected_after_payment(self, token: Token, url: str) -> Refused:
        """The retry with a token paid for this very request was refused: stop there."""
        await self.drop(token, "refused by the server right after payment")
        refused = Refused(
            "rejected_after_payment",
            f"{token.origin} refused the token just paid for {token.label}; not paying again "
            "for this request",
        )
        return await self._refuse(token.origin, url, refused, None)

    async def lost_to_ours(self, token: Token, url: str) -> bool:
        """The server said `token`, bought for a request to `url`, is spent: whether another
        request of ours that sent it was granted with it (so the server used it up on ours).

        Waits for the answers to the others that carried it, at most pay_timeout: the first
        grant says yes; all answered (or gone) without one, or no answer in time, says no (a
        server calling every token spent gets no second payment)."""
        deadline = time.monotonic() + self.pay_timeout
        while True:
            entry = self.carriers.get(token.payment_hash)
            if entry is None or entry.carried < 2:
                return False  # no other request of ours sent it (or it was forgotten)
            if entry.granted:
                break
            left = deadline - time.monotonic()
            if entry.answered >= entry.carried or left <= 0:
                log.info(
                    f"l402: {token.origin} called the token for {token.label} spent, and no "
                    f"request of ours was granted with it; not paying again for {url}"
                )
                return False
            with contextlib.suppress(TimeoutError):  # no time left: the next check ends it
                await asyncio.wait_for(entry.changed.wait(), left)
        log.info(
            f"l402: other requests used up the token for {token.origin} {token.label} first; "
            f"paying once more for {url}, for it alone"
        )
        return True

    def answered(self, token: Token, *, granted: bool) -> None:
        """A request that carried `token` got its answer (`granted`: the server did not refuse
        it), or went away without one. Synchronous and safe from any thread: a driver's
        generator may be closed from the SDK caller's thread."""
        if not token.charge:
            self._soon(self._answered, token.payment_hash, granted)

    def _answered(self, payment_hash: bytes, granted: bool) -> None:
        entry = self.carriers.get(payment_hash)
        if entry is None:
            return
        entry.answered += 1
        entry.granted += granted
        entry.wake()

    def release(self, token: Token, *, keep: bool) -> None:
        """The request a token was bought for alone has used it, or never will: other
        requests (of any process sharing the store) may have it now (`keep`: what is left
        of it is sent up front from now on). Synchronous and safe from any thread, so a
        driver's generator closed in a `finally` releases it too."""
        self._soon(self._release, token, keep)

    def _release(self, token: Token, keep: bool) -> None:
        if keep:
            self._keep(token)
        self._later(self.store.release(token.payment_hash))

    def _remember_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # not on a loop: nothing to remember
            self.loop = asyncio.get_running_loop()

    def _soon(self, callback: Callable[..., None], *args: Any) -> None:
        """Run `callback` on the payer's loop: now when called there, else as soon as the
        loop can (from another thread). Nothing to do before the payer ran on any loop."""
        loop = self.loop
        if loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            callback(*args)
            return
        # A closed loop: the payer is gone, and its bookkeeping with it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, *args)

    def exchange(
        self, url: str, answer: Answer, sent: Token | None
    ) -> Generator[Step, Any, Verdict]:
        """After a 401 or 402 to `url`: the steps to a paid answer, for any HTTP client.

        The driver (the addon, the SDK) runs each Await on this payer's loop and answers each
        Resend with the new Answer; the Verdict says how to present the last one. At most one
        payment per request: a token held from before that the server refuses is dropped
        and paid afresh once; a token just bought that it refuses is not paid again. A pass
        is tried at most once per request, before paying; refused, it is not tried for that
        scope again and the challenge is paid as any other. Every answer's X-L402-Balance
        is noted for the token the request carried.

        One exception, a race among our own requests: a token bought for this request (by
        it, or by another that it waited for) that the server answers with a 402 saying it
        is spent, when another request of ours that sent it was granted with it, was used up
        by them, not refused: this request pays once more, alone (within the same limits).
        Whatever happens to that token, nothing more is paid for this request.

        The driver tells the payer what became of a token it sent up front when the answer
        is no 401/402 (`answered(token, granted=True)`); this covers every other answer. A
        driver that closes the generator at a Resend (the request failed) releases what it
        was about to send: a token paid alone goes up front to the next request.

        A 402 is paid with the Payment scheme instead (_charge_exchange) when it offers no
        usable L402/LSAT challenge but a Payment charge, or both and `prefer` is "payment".
        """
        asked = split_url(url)[0]
        if sent is not None and sent.charge:
            # A charge paid earlier and sent up front (take_charge), refused: dropped. Not paid
            # for this request, so the request pays once for itself, as from the start.
            yield Await(self.charge_refused(sent, url, answer))
            sent = None
            if answer.status == 401 and split_url(answer.url)[0] == asked:
                answer = yield Resend(None)  # pay only on 402: ask again without it
        if sent is not None:
            # The token sent up front was not granted (this is a 401 or 402): said before any
            # step, so a request lost to this one never waits for it in vain.
            self.answered(sent, granted=False)
            if answer.balance:
                # "0 left" on the 402: the bundle is spent; the token is not sent again.
                yield Await(self.note_balance(sent, answer))
        held_refused = False  # a token held from before (or another request's) was refused
        pass_tried = False
        alone = False  # the token bought for it went to another request of ours
        spent: Paid | None = None  # what this request paid so far (its payments summed)
        # Four rounds at most: a held token refused, a pass refused, one payment (or the
        # token of another request's), then one alone if that token went to another request.
        for _ in range(4):
            redirected = _redirected(asked, answer)
            if redirected is not None:
                return Verdict(refused=redirected, spent=spent)
            if answer.status == 401:
                if sent is None or not has_challenge(answer.www_authenticate):
                    return Verdict()  # the origin's own 401: not ours
                # Pay only on 402: drop the refused token and ask again without it.
                why = "the server answered 401 (invalid token)"
                yield Await(self.turned_down(sent, answer.www_authenticate, url, why))
                sent = None
                answer = yield Resend(None)
            if answer.status != 402:
                return Verdict()
            if not alone and self.scheme_for(answer.www_authenticate, url) == "payment":
                # (Not after a bundle race: the request pays alone with what it paid before.)
                return (yield from self._charge_exchange(url, answer, sent))
            outcome = yield Await(
                self.handle_challenge(
                    url=url,
                    www_authenticate=answer.www_authenticate,
                    sent=sent,
                    passes=not pass_tried,
                    alone=alone,
                )
            )
            if outcome is None or isinstance(outcome, Refused):
                return Verdict(refused=outcome, spent=spent)
            if outcome.paid_here:
                spent = outcome if spent is None else spent.plus(outcome)
            answer = yield from self._send(outcome.token, alone)
            granted = answer.status not in (401, 402) or not about_token(
                answer.www_authenticate, outcome.token, url
            )
            self.answered(outcome.token, granted=granted)
            left: Balance | None = None
            if answer.balance:
                left = yield Await(self.note_balance(outcome.token, answer))
            if alone:
                self.release(outcome.token, keep=granted)
            if granted:
                # A request that paid twice says both (its first token went to another).
                return Verdict(paid=spent if outcome.paid_here else outcome)
            if (
                not alone
                and (outcome.paid_here or outcome.waited)
                and answer.status == 402
                and left is not None
                and left.remaining == 0
                and (yield Await(self.lost_to_ours(outcome.token, url)))
            ):
                alone = True
                sent = outcome.token
                continue
            if outcome.paid_here or alone or (held_refused and not outcome.borrowed):
                refused = yield Await(self.rejected_after_payment(outcome.token, url))
                return Verdict(refused=refused, spent=spent)
            # A token not bought for this request (held from before, another request's, or a
            # pass) was refused: once more, and handle_challenge takes it out of the way.
            if outcome.borrowed:
                pass_tried = True
            else:
                held_refused = True
            sent = outcome.token
        raise AssertionError("unreachable: the fourth round pays alone or returns")

    def _send(self, token: Token, alone: bool) -> Generator[Step, Any, Answer]:
        """Resend with `token`. Closed there by its driver (the resend failed, the request
        went away), the token was not granted; one paid for this request alone is released
        and kept: paid and never used, it goes up front to the next request instead of
        staying held back while the next one pays again."""
        sent = False
        try:
            answer: Answer = yield Resend(token.credential)
            sent = True
            return answer
        finally:
            if not sent:
                self.answered(token, granted=False)
                if alone:
                    self.release(token, keep=True)

    # -- the Payment scheme --------------------------------------------------------------------

    def scheme_for(self, www_authenticate: Iterable[str], url: str) -> str | None:
        """Which scheme to pay a 402 with: "l402", "payment" or None (no challenge of ours).

        The preferred one (`prefer`) when the 402 offers it usably, else the other; when
        neither is usable, the preferred one's (which then says why it is refused)."""
        values = list(www_authenticate)
        l402 = pick_challenge(values, split_url(url)[3])
        charge = pick_charge(values)
        order = [("l402", l402), ("payment", charge)]
        if self.prefer == "payment":
            order.reverse()
        for name, offer in order:
            if offer is not None and not isinstance(offer, Refused):
                return name
        for name, offer in order:
            if offer is not None:
                return name
        return None

    def _charge_exchange(
        self, url: str, answer: Answer, sent: Token | None
    ) -> Generator[Step, Any, Verdict]:
        """exchange() for a 402 (from the origin asked) paid with the Payment scheme. One
        charge at most is paid for the request, and its credential is sent once: a 401/402 to
        it is a refusal, never a second payment."""
        asked = split_url(url)[0]
        if sent is not None and about_token(answer.www_authenticate, sent, url):
            # An L402 token held from before, refused: not sent again (paying by Payment now).
            yield Await(self.drop(sent, "the server answered 402 to it"))
        outcome = yield Await(self.pay_charge(url=url, www_authenticate=answer.www_authenticate))
        if outcome is None or isinstance(outcome, Refused):
            return Verdict(refused=outcome)
        answer = yield Resend(outcome.token.credential)
        if answer.status in (401, 402) and split_url(answer.url)[0] == asked:
            refused = yield Await(self.charge_rejected(outcome.token, url, answer))
            return Verdict(refused=refused, spent=outcome if outcome.paid_here else None)
        yield Await(self.note_receipt(outcome.token, answer))
        return Verdict(paid=outcome)

    async def pay_charge(self, *, url: str, www_authenticate: Iterable[str]) -> Outcome | None:
        """Pay the Payment charge a 402 to `url` offers, for this one request: the checks,
        the ledger row, the payment; the returned credential is claimed (presented) already,
        to be sent now and never again. None: no Payment challenge we can pay."""
        origin, host, port, _ = split_url(url)
        if not self.allows(host, port):
            return await self._refuse(
                origin, url, Refused("not_allowed", f"{host}:{port} is not in l402_allow"), None
            )
        offer = pick_charge(www_authenticate)
        if offer is None:
            return None
        if isinstance(offer, Refused):
            return await self._refuse(origin, url, offer, None)
        checked = self._check_charge(offer)
        if isinstance(checked, Refused):
            return await self._refuse(origin, url, checked, offer)
        invoice, valid_until = checked
        assert invoice.amount_msat is not None  # _check_charge refuses an amountless one
        payment = NewPayment(
            payment_hash=invoice.payment_hash,
            origin=origin,
            url=url,
            scope=offer.scope,
            services=(),
            scheme=CHARGE_SCHEME,
            macaroon="",
            bolt11=offer.request.invoice,
            amount_msat=invoice.amount_msat,
            fee_limit_msat=self.limits.max_fee_sat * 1000,
            valid_until=valid_until,
            wallet=wallet_identity(self.wallet),
            owner=self.owner,
            challenge=json.dumps(offer.challenge.echo(), sort_keys=True),
        )
        limits = self.limits
        try:
            # A charge is for this request alone: no scope to share or wait for, the budgets
            # only (checked and reserved in one write, so requests at once cannot overspend).
            reserved = await self.store.reserve(
                payment,
                budget_daily_msat=limits.budget_daily_sat * 1000,
                budget_total_msat=(
                    None if limits.budget_total_sat is None else limits.budget_total_sat * 1000
                ),
                now=self.clock(),
                alone=True,
            )
        except StoreError as exc:
            return await self._refuse(origin, url, Refused("payment_failed", str(exc)), offer)
        if not isinstance(reserved, Payment):
            return await self._refuse(origin, url, Refused(reserved.code, reserved.message), offer)
        payment_hash = reserved.payment_hash
        # Until it is presented (or pay_timeout after paying), the charge is this request's:
        # recovery offers it to no other request meanwhile, nor asks the wallet about it
        # before the task below has started paying.
        self.charging[payment_hash] = self.clock() + self.pay_timeout
        self.in_flight.add(payment_hash)
        flight = asyncio.get_running_loop().create_task(
            self._pay(reserved, keep=False), name=f"l402 charge {origin}"
        )
        self.lone_flights.add(flight)
        flight.add_done_callback(self.lone_flights.discard)
        # Shielded: a request that goes away must not cancel a payment under way (a charge
        # paid for it and never sent is offered to the next request to its URL).
        outcome = await asyncio.shield(flight)
        if not isinstance(outcome, Paid):
            self.charging.pop(payment_hash, None)
            return outcome
        self.charging[payment_hash] = self.clock() + self.pay_timeout
        now = self.clock()
        try:
            claimed = await self.store.present(payment_hash, now)
        except StoreError as exc:
            # Sent anyway (it was paid for this request); remembered here so this process
            # never sends it again.
            log.error(f"l402: could not mark the charge for {url} as presented: {exc}")
            claimed = True
        self.charging.pop(payment_hash, None)
        if not claimed:
            # Only after pay_timeout between paying and getting here: another request to the
            # same URL took it as a charge nobody was sending.
            return Refused(
                "payment_failed",
                "the charge paid for this request was sent with another request to the same URL",
            )
        self._note_presented(payment_hash)
        return outcome

    def _check_charge(self, offer: _ChargeOffer) -> tuple[InvoiceInfo, float] | Refused:
        """The decoded invoice and until when the charge can be presented, if it may be paid;
        else why not. The invoice is authoritative: the request must agree with it."""
        try:
            invoice = decode_invoice(offer.request.invoice)
        except ValueError as exc:
            return Refused("bad_challenge", str(exc))
        if invoice.amount_msat is None:
            return Refused("no_amount", "the invoice has no amount; it is never paid blindly")
        mismatches = invoice_mismatches(offer.request, invoice)
        if mismatches:
            return Refused("request_mismatch", "; ".join(mismatches))
        network = self.node.network if self.node is not None else None
        if network is not None and invoice.network != network:
            return Refused(
                "wrong_network",
                f"the invoice is for {invoice.network}, the wallet is on {network}",
            )
        now = self.clock()
        expires_at = offer.challenge.expires_at()
        if expires_at is not None and now >= expires_at:
            return Refused(
                "challenge_expired", f"the Payment challenge expired at {offer.challenge.expires}"
            )
        if invoice.is_expired(now):
            return Refused("invoice_expired", f"the invoice expired at {invoice.expires_at}")
        if invoice.amount_msat > self.limits.max_price_sat * 1000:
            return Refused(
                "max_price",
                f"the invoice asks {sat_number(invoice.amount_msat)} sat, more than "
                f"l402_max_price_sat {self.limits.max_price_sat}",
            )
        # Presentable until the challenge expires; without `expires`, the invoice's expiry
        # is the cautious guess.
        until = float(invoice.expires_at) if expires_at is None else expires_at
        return invoice, until

    async def charge_rejected(self, token: Token, url: str, answer: Answer) -> Refused:
        """A 401/402 to a charge just paid for this request: never paid again."""
        problem = answer.problem or "no problem type stated"
        await self.store.drop(
            token.payment_hash, f"refused right after payment ({problem})", self.clock()
        )
        refused = Refused(
            "rejected_after_payment",
            f"{token.origin} answered {answer.status} ({problem}) to the Payment credential "
            "just paid; not paying again for this request",
        )
        return await self._refuse(token.origin, url, refused, None)

    async def charge_refused(self, token: Token, url: str, answer: Answer) -> None:
        """A charge paid earlier and sent up front was refused: dropped (never sent again);
        the request pays for itself if the answer is a 402 we can pay."""
        problem = answer.problem or "no problem type stated"
        log.info(
            f"l402: {token.origin} answered {answer.status} ({problem}) to the Payment charge "
            f"paid earlier for {url}; dropped"
        )
        await self.store.drop(
            token.payment_hash, f"refused when sent later ({problem})", self.clock()
        )

    async def note_receipt(self, token: Token, answer: Answer) -> None:
        """Keep the Payment-Receipt of an answer to a charge in the ledger (a malformed or
        absent one is logged, never held against the answer)."""
        if not answer.receipts or split_url(answer.url)[0] != token.origin:
            if answer.status < 400:
                log.info(f"l402: {answer.url} answered the Payment charge without a receipt")
            return
        try:
            receipt = decode_receipt(answer.receipts[0])
        except ValueError as exc:
            log.warning(f"l402: ignored the Payment-Receipt from {answer.url}: {exc}")
            return
        if receipt.reference != token.payment_hash.hex():
            log.warning(
                f"l402: the Payment-Receipt from {answer.url} names another payment "
                f"({header_safe(receipt.reference)[:80]}); kept as sent"
            )
        document: dict[str, Any] = {
            **receipt.extra,
            "status": receipt.status,
            "method": receipt.method,
            "timestamp": receipt.timestamp,
            "reference": receipt.reference,
        }
        if receipt.challenge_id is not None:
            document["challengeId"] = receipt.challenge_id
        try:
            await self.store.note_receipt(token.payment_hash, document, self.clock())
        except StoreError as exc:
            log.warning(f"l402: could not keep the Payment-Receipt from {answer.url}: {exc}")

    def _note_presented(self, payment_hash: bytes) -> None:
        if len(self.presented) >= MEMORY_LIMIT:
            self.presented.clear()  # the store says so too; this only covers its failures
        self.presented.add(payment_hash)

    # -- paying --------------------------------------------------------------------------------

    async def _fly(
        self, key: tuple[str, str], url: str, offer: _Offer, alone: bool = False
    ) -> Outcome:
        """Pay `offer` for the scope `key` within the limits. `alone`: for one request only;
        its row held back in the store from every other request (of any process) until
        `release`, or pay_timeout after it was paid."""
        return await self._pay_offer(key, url, offer, alone=alone)

    async def _pay_offer(
        self, key: tuple[str, str], url: str, offer: _Offer, alone: bool
    ) -> Outcome:
        origin = key[0]
        checked = self._check_invoice(offer)
        if isinstance(checked, Refused):
            return await self._refuse(origin, url, checked, offer)
        amount_msat = checked
        payment = NewPayment(
            payment_hash=offer.info.identifier.payment_hash,
            origin=origin,
            url=url,
            scope=offer.scope,
            services=offer.info.services,
            scheme=offer.challenge.scheme,
            macaroon=offer.challenge.macaroon,
            bolt11=offer.challenge.invoice,
            amount_msat=amount_msat,
            fee_limit_msat=self.limits.max_fee_sat * 1000,
            valid_until=offer.info.valid_until,
            wallet=wallet_identity(self.wallet),
            owner=self.owner,
        )
        limits = self.limits
        for _ in range(2):
            try:
                reserved = await self.store.reserve(
                    payment,
                    budget_daily_msat=limits.budget_daily_sat * 1000,
                    budget_total_msat=(
                        None if limits.budget_total_sat is None else limits.budget_total_sat * 1000
                    ),
                    now=self.clock(),
                    alone=alone,
                    # Written with the row: no payment of any process sharing the store
                    # waits for it, nor takes its token, before its request has used it.
                    hold_for=self.pay_timeout if alone else None,
                )
            except StoreError as exc:
                return await self._refuse(origin, url, Refused("payment_failed", str(exc)), offer)
            if isinstance(reserved, Payment):
                break
            pending = reserved.pending
            if pending is None or pending.owner == self.owner:
                return await self._refuse(
                    origin, url, Refused(reserved.code, reserved.message), offer
                )
            if owner_is_alive(pending.owner):
                # Another process (the SDK, a second proxy) is paying this scope: use its token.
                done = await self._wait_for(pending)
                if done is not None:
                    return Paid(self._keep(Token.from_payment(done)), 0, 0, paid_here=False)
            else:
                await self.recover()  # left by a process that died: settle it now
        else:
            return await self._refuse(origin, url, Refused(reserved.code, reserved.message), offer)
        if reserved.status == "paid":
            # Another process sharing the store paid this scope already.
            return Paid(self._keep(Token.from_payment(reserved)), 0, 0, paid_here=False)
        outcome = await self._pay(reserved, keep=not alone, hold=alone)
        if alone and not isinstance(outcome, Paid):
            # Not paid, or not known to be: a pending one is waited for like any other.
            try:
                await self.store.release(reserved.payment_hash)
            except StoreError as exc:
                log.warning(f"l402: client store write failed: {exc}")
        return outcome

    async def _wait_for(self, pending: Payment) -> Payment | None:
        """Poll the store until another process's payment ends: paid (its row) or not (None)."""
        deadline = time.monotonic() + self.pay_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(OTHER_PROCESS_POLL_SECONDS)
            current = await self.store.payment(pending.payment_hash)
            if current is None or current.status == "failed":
                return None
            if current.status == "paid":
                return current
        return None

    def _check_invoice(self, offer: _Offer) -> int | Refused:
        """The invoice amount in msat if it may be paid, or why not."""
        try:
            invoice = decode_invoice(offer.challenge.invoice)
        except ValueError as exc:
            return Refused("bad_challenge", str(exc))
        if invoice.payment_hash != offer.info.identifier.payment_hash:
            return Refused(
                "hash_mismatch",
                "the invoice pays for another payment hash than the macaroon names "
                f"(invoice {invoice.payment_hash.hex()[:16]}..., macaroon "
                f"{offer.info.identifier.payment_hash.hex()[:16]}...)",
            )
        network = self.node.network if self.node is not None else None
        if network is not None and invoice.network != network:
            return Refused(
                "wrong_network",
                f"the invoice is for {invoice.network}, the wallet is on {network}",
            )
        if invoice.amount_msat is None:
            return Refused("no_amount", "the invoice has no amount; it is never paid blindly")
        if invoice.is_expired(self.clock()):
            return Refused("invoice_expired", f"the invoice expired at {invoice.expires_at}")
        if invoice.amount_msat > self.limits.max_price_sat * 1000:
            return Refused(
                "max_price",
                f"the invoice asks {sat_number(invoice.amount_msat)} sat, more than "
                f"l402_max_price_sat {self.limits.max_price_sat}",
            )
        return invoice.amount_msat

    async def _pay(self, payment: Payment, keep: bool = True, hold: bool = False) -> Outcome:
        payment_hash = payment.payment_hash
        self.in_flight.add(payment_hash)
        try:
            return await self._pay_and_record(payment, keep, hold)
        finally:
            self.in_flight.discard(payment_hash)

    async def _pay_and_record(self, payment: Payment, keep: bool, hold: bool = False) -> Outcome:
        """Pay, then store the token; `keep`: sent up front from now on (not a token paid for
        one request alone: that one is kept once it has used it). `hold`: paid for one
        request alone, its row stays held back for pay_timeout from now (to send it)."""
        payment_hash = payment.payment_hash
        origin, url = payment.origin, payment.url
        try:
            result = await asyncio.wait_for(
                self.wallet.pay(payment.bolt11, payment.fee_limit_msat), self.pay_timeout
            )
        except PaymentFailed as exc:
            await self.store.fail(payment_hash, str(exc), self.clock())
            log.warning(f"l402: payment to {origin} failed: {exc}")
            # The wallet's own reason when it names one (not enough funds, its quota).
            return Refused(refusal_code(exc), str(exc))
        except (LightningError, TimeoutError) as exc:
            # Not known to have failed: it may still go through. The reservation stays and
            # the next recovery asks the wallet.
            why = str(exc) or f"no answer from the wallet within {self.pay_timeout:g} s"
            await self.store.note_error(payment_hash, why, self.clock())
            log.warning(f"l402: payment to {origin} unresolved ({why}); will check again")
            return Refused(
                "payment_pending",
                f"{why}; the payment stays pending and is checked again "
                "(see l402proxy wallet history)",
            )
        if hashlib.sha256(result.preimage).digest() != payment_hash:
            await self.store.note_error(
                payment_hash, "the wallet returned a wrong preimage", self.clock()
            )
            log.error(f"l402: the wallet returned a preimage that does not match {url}")
            return Refused("payment_failed", "the wallet returned a preimage that does not match")
        try:
            done = await self.store.settle(
                payment_hash,
                result.preimage,
                result.fee_msat,
                self.clock(),
                hold_for=self.pay_timeout if hold else None,
            )
        except StoreError as exc:
            # Paid, but not on disk: use the token now; the wallet still knows the preimage,
            # so the next recovery writes it.
            log.error(f"l402: paid {url} but could not store the token: {exc}")
            done = replace(
                payment, status="paid", preimage=result.preimage, fee_msat=result.fee_msat
            )
        token = Token.from_payment(done)
        if keep:
            self._keep(token)
        log.info(
            f"l402: paid {sat_number(payment.amount_msat)} sat (fee "
            f"{sat_number(result.fee_msat)} sat) to {origin} for {token.label} ({url})"
        )
        return Paid(token, payment.amount_msat, result.fee_msat, paid_here=True)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _keep(self, token: Token) -> Token:
        if token.payment_hash not in self.spent:
            self.tokens[(token.origin, token.scope)] = token
        return token

    def _carry(self, token: Token) -> None:
        """One more request of ours was given `token` to send."""
        entry = self.carriers.get(token.payment_hash)
        if entry is None:
            if len(self.carriers) >= MEMORY_LIMIT:
                # Forgotten counts make a lost race a refusal, never a payment; whoever
                # waits for them stops waiting.
                for forgotten in self.carriers.values():
                    forgotten.wake()
                self.carriers.clear()
            entry = self.carriers[token.payment_hash] = _Carriers()
        entry.carried += 1

    def _forget(self, token: Token) -> bool:
        """Send `token` no more: under its own scope, nor any a pass was tried for."""
        keys = [key for key, held in self.tokens.items() if held.payment_hash == token.payment_hash]
        for key in keys:
            del self.tokens[key]
        return bool(keys)

    def _pass_for(self, origin: str, offer: _Offer, rejected: bytes | None) -> Token | None:
        """A live token held for `origin` that names every service the challenge names (a
        pass), not refused for this scope before: worth one try before paying."""
        wanted = offer.info.services
        now = self.clock()
        found = None
        for (held_origin, _), token in self.tokens.items():
            if (
                held_origin == origin
                and token.payment_hash != rejected
                and (token.payment_hash, offer.scope) not in self.passes_refused
                and token.covers(wanted)
                and token.usable(now, wanted)
            ):
                found = token  # the newest wins, as when tokens are loaded
        return found

    def _refuse_pass(self, token: Token, key: tuple[str, str]) -> None:
        """The server refused `token` for the scope `key`: not tried there again."""
        if len(self.passes_refused) >= MEMORY_LIMIT:
            self.passes_refused.clear()
        if (token.payment_hash, key[1]) not in self.passes_refused:
            self.passes_refused.add((token.payment_hash, key[1]))
            log.info(
                f"l402: {key[0]} refused the token for {token.label} for {key[1]}; "
                "not trying it there again"
            )
        held = self.tokens.get(key)
        if held is not None and held.payment_hash == token.payment_hash:
            del self.tokens[key]

    def _warn_balance(self, origin: str, message: str) -> None:
        """A warning at most once a minute per origin: a server may send it on every answer."""
        now = self.clock()
        if now - self.balance_warned.get(origin, float("-inf")) < BALANCE_WARNING_SECONDS:
            log.debug(message)
            return
        if len(self.balance_warned) >= MEMORY_LIMIT:
            self.balance_warned.clear()
        self.balance_warned[origin] = now
        log.warning(message)

    def _learn(self, origin: str, path: str, scope: str) -> None:
        known = self.paths.setdefault(origin, {})
        changed = False
        for learned in (path.split("?", 1)[0] or "/", directory_of(path)):
            if known.get(learned) != scope:
                known[learned] = scope
                changed = True
                self._later(self.store.learn_path(origin, learned, scope, self.clock()))
        if changed:
            log.debug(f"l402: {origin}{path} belongs to {scope}")

    def _later(self, job: Coroutine[Any, Any, None]) -> None:
        """Write-behind for bookkeeping the answer does not wait for; failures are logged."""

        async def run() -> None:
            try:
                await job
            except StoreError as exc:
                log.warning(f"l402: client store write failed: {exc}")

        task = asyncio.get_running_loop().create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _refuse(
        self, origin: str, url: str, refused: Refused, offer: _Offer | _ChargeOffer | None
    ) -> Refused:
        log.warning(f"l402: not paying {url}: {refused.code}: {refused.message}")
        key = (origin, url, refused.code)
        now = self.clock()
        if now - self.recent_refusals.get(key, float("-inf")) >= REFUSAL_RECORD_SECONDS:
            if len(self.recent_refusals) > 10_000:
                self.recent_refusals.clear()
            self.recent_refusals[key] = now
            amount = None
            payment_hash = None
            service = None
            if isinstance(offer, _Offer):
                service = ",".join(offer.info.services) or None
                payment_hash = offer.info.identifier.payment_hash
                try:
                    amount = decode_invoice(offer.challenge.invoice).amount_msat
                except ValueError:
                    amount = None
            elif offer is not None:
                # A charge: what its invoice says (authoritative), the request's amount else.
                service = offer.scope
                try:
                    invoice = decode_invoice(offer.request.invoice)
                    payment_hash, amount = invoice.payment_hash, invoice.amount_msat
                except ValueError:
                    payment_hash, amount = offer.request.payment_hash, None
                amount = amount if amount is not None else offer.request.amount_sat * 1000
            self._later(
                self.store.refuse(
                    origin=origin,
                    url=url,
                    service=service,
                    reason=refused.code,
                    message=refused.message,
                    amount_msat=amount,
                    payment_hash=payment_hash,
                    now=now,
                )
            )
        return refused
