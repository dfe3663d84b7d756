"""payer.py: which challenges to pay, within which limits, once per scope; with a real dev
ledger and a real client store in tmp_path, and challenges minted here."""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from coincurve import PrivateKey

from l402proxy import payer as payer_module
from l402proxy.l402.headers import format_challenge, parse_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import TokenInfo, caveats_for, mint, verify
from l402proxy.lightning import (
    NEW_WALLET_BALANCE_MSAT,
    BackendUnavailable,
    DevLedger,
    DevWallet,
    LightningError,
    NodeInfo,
    PaymentFailed,
    PaymentResult,
    PaymentState,
    Wallet,
    open_wallet,
)
from l402proxy.lightning.bolt11_encoder import encode_invoice
from l402proxy.payer import (
    HostPattern,
    Limits,
    Paid,
    Payer,
    Refused,
    Token,
    about_token,
    directory_of,
    has_challenge,
    host_allowed,
    origin_of,
    parse_host_pattern,
    path_candidates,
    pick_challenge,
    scope_of,
    split_url,
    wallet_identity,
)
from l402proxy.store.client import ClientStore, NewPayment, Payment
from tests.standins.cln import ClnStandin
from tests.standins.eclair import EclairStandin

ORIGIN = "http://127.0.0.1:8081"
URL = ORIGIN + "/bonus/ep1.mp3"
MERCHANT = "merchant"
LISTENER = "listener"


# --- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", HostPattern("example.com", None)),
        ("  Example.COM ", HostPattern("example.com", None)),
        ("*.example.com", HostPattern("*.example.com", None)),
        ("127.0.0.1:8081", HostPattern("127.0.0.1", 8081)),
        ("localhost:1", HostPattern("localhost", 1)),
        ("host:65535", HostPattern("host", 65535)),
        ("[::1]:8081", HostPattern("::1", 8081)),
        ("[::1]", HostPattern("::1", None)),
        ("::1", HostPattern("::1", None)),
        ("[2001:DB8::1]:443", HostPattern("2001:db8::1", 443)),
    ],
)
def test_parse_host_pattern(text: str, expected: HostPattern) -> None:
    assert parse_host_pattern(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty host pattern"),
        ("   ", "empty host pattern"),
        ("http://example.com", "not a URL"),
        ("example.com/path", "not a URL"),
        ("user@example.com", "not a URL"),
        ("example.com:0", "port must be 1-65535"),
        ("example.com:65536", "port must be 1-65535"),
        ("example.com:http", "port must be 1-65535"),
        ("example.com:-1", "port must be 1-65535"),
        ("[::1]:99999", "port must be 1-65535"),
        ("[::1", "bad IPv6 literal"),
        ("[::1]8081", "bad IPv6 literal"),
        (":8081", "has no host"),
        ("[]:8081", "has no host"),
    ],
)
def test_parse_host_pattern_refuses(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_host_pattern(text)


def patterns(*texts: str) -> tuple[HostPattern, ...]:
    return tuple(parse_host_pattern(text) for text in texts)


def test_no_patterns_allow_any_host() -> None:
    assert host_allowed((), "anything.example", 1234)
    assert host_allowed(iter(()), "::1", 80)


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("a.example.com", 443, True),
        ("A.Example.COM", 80, True),
        ("deep.a.example.com", 80, True),
        ("example.com", 443, False),
        ("evilexample.com", 443, False),
        ("example.com.evil", 443, False),
    ],
)
def test_wildcard_matches_subdomains_only(host: str, port: int, allowed: bool) -> None:
    assert host_allowed(patterns("*.example.com"), host, port) is allowed


def test_exact_host_and_port_patterns() -> None:
    allow = patterns("example.com", "127.0.0.1:8081", "[::1]:9000")
    assert host_allowed(allow, "example.com", 80)
    assert host_allowed(allow, "example.com", 8443)  # no port in the pattern: any port
    assert not host_allowed(allow, "www.example.com", 80)
    assert host_allowed(allow, "127.0.0.1", 8081)
    assert not host_allowed(allow, "127.0.0.1", 8082)
    assert host_allowed(allow, "::1", 9000)
    assert host_allowed(allow, "[::1]", 9000)
    assert not host_allowed(allow, "::1", 9001)


def test_limits_defaults_match_the_contract() -> None:
    limits = Limits()
    assert (limits.max_price_sat, limits.max_fee_sat) == (100, 10)
    assert (limits.budget_daily_sat, limits.budget_total_sat, limits.allow) == (1000, None, ())
    assert limits.allows("anywhere.example", 443)
    assert "any host" in limits.describe() and "in total" not in limits.describe()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_price_sat", -1),
        ("max_fee_sat", -5),
        ("budget_daily_sat", 1.5),
        ("budget_total_sat", -1),
        ("max_price_sat", True),
        ("max_price_sat", None),
        ("budget_daily_sat", "100"),
    ],
)
def test_limits_refuse_bad_values_naming_the_option(field: str, value: object) -> None:
    with pytest.raises(ValueError) as caught:
        Limits(**{field: value})  # type: ignore[arg-type]
    assert str(caught.value) == f"l402_{field} must be a whole number of sat >= 0, got {value!r}"


def test_limits_zero_and_host_patterns() -> None:
    limits = Limits(max_price_sat=0, budget_daily_sat=0, budget_total_sat=0, allow=("a.test:80",))
    assert limits.hosts == (HostPattern("a.test", 80),)
    assert limits.allows("a.test", 80) and not limits.allows("a.test", 81)
    assert "0 sat in total" in limits.describe() and "a.test:80" in limits.describe()
    with pytest.raises(ValueError, match="port must be"):
        Limits(allow=("a.test:0",))


def test_origin_of() -> None:
    assert origin_of("HTTP", "Example.COM", 80) == "http://example.com:80"
    assert origin_of("https", "::1", 8443) == "https://[::1]:8443"
    assert origin_of("https", "[::1]", 8443) == "https://[::1]:8443"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8081/a/b?x=1", ("http://127.0.0.1:8081", "127.0.0.1", 8081, "/a/b")),
        ("https://Example.com", ("https://example.com:443", "example.com", 443, "/")),
        ("http://example.com/x", ("http://example.com:80", "example.com", 80, "/x")),
        ("http://[::1]:8081/x", ("http://[::1]:8081", "::1", 8081, "/x")),
    ],
)
def test_split_url(url: str, expected: tuple[str, str, int, str]) -> None:
    assert split_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://example.com/x", "/relative/path", "http:///nohost"])
def test_split_url_refuses_what_is_not_an_absolute_http_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an absolute http"):
        split_url(url)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b/c.mp3", ["/a/b/c.mp3", "/a/b/", "/a/", "/"]),
        ("/a/b/", ["/a/b/", "/a/", "/"]),
        ("/a/b?x=/y/z", ["/a/b", "/a/", "/"]),
        ("/", ["/"]),
        ("", ["/"]),
    ],
)
def test_path_candidates_most_specific_first(path: str, expected: list[str]) -> None:
    # Repeats (a directory is its own first candidate) are harmless; the order is what counts.
    assert list(dict.fromkeys(path_candidates(path))) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b/c.mp3", "/a/b/"),
        ("/a/b/", "/a/b/"),
        ("/c.mp3", "/"),
        ("/", "/"),
        ("", "/"),
        ("/a?x=/y/z", "/"),
    ],
)
def test_directory_of(path: str, expected: str) -> None:
    assert directory_of(path) == expected


def test_scope_of_prefers_the_servers_services() -> None:
    identifier = Identifier.new(os.urandom(32))
    named = TokenInfo(identifier, ("b", "a"), None, ())
    unnamed = TokenInfo(identifier, (), None, ())
    assert scope_of(named, "/x/y.mp3") == "services:a,b"
    assert scope_of(unnamed, "/x/y.mp3?q=/z") == "path:/x/"


def offline_challenge(
    *, service: str = "podcast", scheme: str = "L402", amount_msat: int = 21_000
) -> str:
    """A challenge with a real macaroon and a foreign (never payable here) invoice."""
    payment_hash = os.urandom(32)
    macaroon = mint(os.urandom(32), Identifier.new(payment_hash), [f"services={service}:0"])
    return format_challenge(scheme, macaroon, foreign_invoice(payment_hash, amount_msat))


def foreign_invoice(payment_hash: bytes, amount_msat: int | None, description: str = "x") -> str:
    """A valid regtest invoice signed by a node no wallet here can reach."""
    return encode_invoice(
        key=PrivateKey(),
        currency="bcrt",
        amount_msat=amount_msat,
        created_at=int(time.time()),
        payment_hash=payment_hash,
        payment_secret=os.urandom(32),
        description=description,
        expiry=600,
        min_final_cltv_expiry=18,
    )


def test_pick_challenge_follows_the_servers_order() -> None:
    lsat, l402 = offline_challenge(scheme="LSAT"), offline_challenge(scheme="L402")
    first = pick_challenge([lsat, l402], "/bonus/x")
    assert not isinstance(first, Refused) and first is not None
    assert first.challenge.scheme == "LSAT" and first.scope == "services:podcast"
    second = pick_challenge([l402, lsat], "/bonus/x")
    assert not isinstance(second, Refused) and second is not None
    assert second.challenge.scheme == "L402"
    # Both in one header value, as some servers send them.
    joined = pick_challenge([f"{l402}, {lsat}"], "/bonus/x")
    assert not isinstance(joined, Refused) and joined is not None
    assert joined.challenge.scheme == "L402"


def test_pick_challenge_skips_an_unreadable_macaroon() -> None:
    good = offline_challenge(scheme="LSAT")
    broken = 'L402 macaroon="bm90IGEgbWFjYXJvb24=", invoice="lnbcrt1x"'
    picked = pick_challenge([broken, good], "/bonus/x")
    assert not isinstance(picked, Refused) and picked is not None
    assert picked.challenge.scheme == "LSAT"
    refused = pick_challenge([broken], "/bonus/x")
    assert isinstance(refused, Refused) and refused.code == "bad_challenge"
    assert refused.message.startswith("no usable macaroon in the challenge: L402: ")


def test_pick_challenge_none_without_an_l402_challenge() -> None:
    assert pick_challenge([], "/") is None
    assert pick_challenge(['Basic realm="x"', "Bearer"], "/") is None


def test_has_challenge() -> None:
    assert has_challenge([offline_challenge()])
    assert has_challenge(['Basic realm="x"', offline_challenge(scheme="LSAT")])
    assert not has_challenge([])
    assert not has_challenge(['Basic realm="x"'])
    assert not has_challenge(['L402 macaroon="abc"'])  # no invoice: not a challenge


def fake_token(scope: str = "services:podcast") -> Token:
    return Token(ORIGIN, scope, ("podcast",), os.urandom(32), None, "L402 x:00")


def test_about_token() -> None:
    token = fake_token()
    url = f"{ORIGIN}/episodes/ep1.mp3"
    assert about_token([offline_challenge(service="podcast")], token, url)
    assert not about_token([offline_challenge(service="other")], token, url)
    assert not about_token([], token, url)  # no L402 challenge: the origin's own 401/402
    assert about_token(['L402 macaroon="bm90", invoice="x"'], token, url)  # unreadable: assume so


def test_about_token_reads_a_path_scope_at_the_url_asked() -> None:
    """Without services=, the scope is the directory: read at the URL, not at "/"."""
    token = Token(ORIGIN, "path:/bonus/", (), os.urandom(32), None, "L402 x:00")
    macaroon = mint(os.urandom(32), Identifier.new(os.urandom(32)), [])
    challenge = f'L402 macaroon="{macaroon}", invoice="lnbcrt1"'
    assert about_token([challenge], token, f"{ORIGIN}/bonus/b1.mp3")
    assert not about_token([challenge], token, f"{ORIGIN}/other/b1.mp3")


def test_refused_header_is_one_line_and_paid_header_names_the_service() -> None:
    assert Refused("max_price", "too\r\n  dear\tnow").header() == "max_price; too dear now"
    token = fake_token()
    assert Paid(token, 21_000, 0, paid_here=True).header() == "21 sat (fee 0 sat) for podcast"
    assert Paid(token, 1_500, 10, paid_here=True).header() == "1.5 sat (fee 0.01 sat) for podcast"
    unnamed = Token(ORIGIN, "path:/x/", (), os.urandom(32), None, "L402 x:00")
    assert Paid(unnamed, 1000, 0, paid_here=True).header() == "1 sat (fee 0 sat) for path:/x/"


def test_token_usable_until_valid_until() -> None:
    token = Token(ORIGIN, "s", (), os.urandom(32), 100.0, "c")
    assert token.usable(99.9) and not token.usable(100.0)
    assert Token(ORIGIN, "s", (), os.urandom(32), None, "c").usable(1e12)


# --- a shop that mints challenges on the dev ledger ------------------------------------------


@dataclass
class Offer:
    header: str
    payment_hash: bytes
    bolt11: str
    macaroon: str


class Shop:
    """What the server addon does for a 402, done by hand: invoice + macaroon + header."""

    def __init__(self, ledger: DevLedger) -> None:
        self.ledger = ledger
        self.root_key = os.urandom(32)

    async def challenge(
        self,
        *,
        service: str | None = "podcast",
        amount_sat: int = 21,
        expiry: int = 600,
        valid_until: int | None = None,
        scheme: str = "L402",
        macaroon_hash: bytes | None = None,
    ) -> Offer:
        invoice = await self.ledger.create_invoice(MERCHANT, amount_sat * 1000, "ep", expiry)
        identifier = Identifier.new(macaroon_hash or invoice.payment_hash)
        if service is None:
            caveats = [] if valid_until is None else [f"expiration={valid_until * 1000}"]
        else:
            caveats = caveats_for(service, valid_until=valid_until, capabilities=None)
        macaroon = mint(self.root_key, identifier, caveats)
        return Offer(
            format_challenge(scheme, macaroon, invoice.bolt11),
            invoice.payment_hash,
            invoice.bolt11,
            macaroon,
        )

    async def settled(self, offer: Offer) -> bool:
        return (await self.ledger.lookup_invoice(offer.payment_hash)).settled


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "devledger.sqlite"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "client.sqlite"


@pytest.fixture
async def shop(ledger_path: Path) -> AsyncIterator[Shop]:
    ledger = DevLedger(ledger_path)
    yield Shop(ledger)
    await ledger.close()


@pytest.fixture
async def store(store_path: Path) -> AsyncIterator[ClientStore]:
    opened = await ClientStore.open(str(store_path))
    yield opened
    await opened.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


PayerFactory = Callable[..., Payer]


@pytest.fixture
async def make_payer(
    ledger_path: Path, store: ClientStore, clock: Clock
) -> AsyncIterator[PayerFactory]:
    made: list[Payer] = []

    def make(
        *, wallet: object = None, limits: Limits | None = None, pay_timeout: float = 10.0
    ) -> Payer:
        payer = Payer(
            wallet or DevWallet(DevLedger(ledger_path), LISTENER),  # type: ignore[arg-type]
            store,
            limits or Limits(),
            pay_timeout=pay_timeout,
            clock=clock,
        )
        made.append(payer)
        return payer

    yield make
    for payer in made:
        await payer.close()


async def flushed(payer: Payer) -> None:
    """Wait for the write-behind (learned paths, refusals)."""
    if payer.background:
        await asyncio.wait(list(payer.background), timeout=5)


async def payments(store: ClientStore) -> list[dict[str, object]]:
    return [e for e in await store.history() if e["event"] != "refused"]


async def refusals(payer: Payer) -> list[dict[str, object]]:
    await flushed(payer)
    return [e for e in await payer.store.history() if e["event"] == "refused"]


class FakeWallet:
    """A wallet whose pay() and lookup_payment() behave as a test needs."""

    name = "fake"
    settles_within = 0.0

    def __init__(
        self,
        *,
        pay_error: LightningError | None = None,
        pay_sleep: float = 0.0,
        state: PaymentState | Exception | None = None,
    ) -> None:
        self.pay_error = pay_error
        self.pay_sleep = pay_sleep
        self.state = state
        self.paid: list[str] = []
        self.looked_up: list[bytes] = []

    async def pay(self, bolt11: str, max_fee_msat: int) -> PaymentResult:
        self.paid.append(bolt11)
        if self.pay_sleep:
            await asyncio.sleep(self.pay_sleep)
        if self.pay_error is not None:
            raise self.pay_error
        raise AssertionError("this fake wallet never pays")

    async def lookup_payment(self, payment_hash: bytes) -> PaymentState:
        self.looked_up.append(payment_hash)
        if isinstance(self.state, Exception):
            raise self.state
        return self.state or PaymentState(payment_hash, "unknown", None, 0)

    async def info(self) -> NodeInfo:
        return NodeInfo(backend="fake", address="nowhere", network="regtest")

    async def close(self) -> None:
        pass

    def describe(self) -> str:
        return "fake"


# --- paying -----------------------------------------------------------------------------------


async def test_pays_and_returns_a_token_the_server_accepts(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    offer = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(outcome, Paid)
    assert (outcome.paid_here, outcome.amount_msat, outcome.fee_msat) == (True, 21_000, 0)
    assert outcome.header() == "21 sat (fee 0 sat) for podcast"
    token = outcome.token
    assert (token.origin, token.scope, token.services) == (ORIGIN, "services:podcast", ("podcast",))
    assert token.payment_hash == offer.payment_hash
    credential = parse_credential(token.credential)
    assert credential.scheme == "L402" and credential.macaroons == (offer.macaroon,)
    verified = verify(
        offer.macaroon, credential.preimage, shop.root_key, service="podcast", now=time.time()
    )
    assert verified.identifier.payment_hash == offer.payment_hash
    assert await shop.settled(offer)
    row = await store.payment(offer.payment_hash)
    assert row is not None and (row.status, row.preimage) == ("paid", credential.preimage)
    assert (row.url, row.fee_limit_msat) == (URL, 10_000)
    # Precise enough to ask the same wallet after a restart.
    assert row.wallet == wallet_identity(payer.wallet) == f"dev:{LISTENER}@{shop.ledger.path}"


async def test_the_challenge_scheme_is_kept_in_the_credential(
    shop: Shop, make_payer: PayerFactory
) -> None:
    payer = make_payer()
    offer = await shop.challenge(scheme="LSAT")
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(outcome, Paid) and outcome.token.credential.startswith("LSAT ")


async def test_token_for_finds_the_learned_path_and_its_directory(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, store_path: Path, ledger_path: Path
) -> None:
    payer = make_payer()
    offer = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(outcome, Paid)
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") == outcome.token
    assert payer.token_for(ORIGIN, "/bonus/ep2.mp3?t=1") == outcome.token
    assert payer.token_for(ORIGIN, "/bonus/") == outcome.token
    assert payer.token_for(ORIGIN, "/episodes/ep1.mp3") is None
    assert payer.token_for(ORIGIN, "/") is None
    assert payer.token_for("http://127.0.0.1:8082", "/bonus/ep1.mp3") is None
    assert payer.flight_for(ORIGIN, "/bonus/ep1.mp3") is None

    # A new process on the same files knows the token and the paths without paying.
    await flushed(payer)
    restarted_store = await ClientStore.open(str(store_path))
    restarted = Payer(DevWallet(DevLedger(ledger_path), LISTENER), restarted_store, Limits())
    try:
        assert await restarted.start() == []
        assert restarted.token_for(ORIGIN, "/bonus/ep9.mp3") == outcome.token
    finally:
        await restarted.close()


async def test_a_second_challenge_in_the_scope_reuses_the_token(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    first = await shop.challenge()
    paid = await payer.handle_challenge(url=URL, www_authenticate=[first.header])
    assert isinstance(paid, Paid)
    second = await shop.challenge()
    again = await payer.handle_challenge(
        url=ORIGIN + "/bonus/ep2.mp3", www_authenticate=[second.header]
    )
    assert again == Paid(paid.token, 0, 0, paid_here=False)
    assert not await shop.settled(second)
    assert len(await payments(store)) == 1


async def test_a_token_bought_by_another_process_is_used(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, store_path: Path, ledger_path: Path
) -> None:
    elsewhere_store = await ClientStore.open(str(store_path))
    elsewhere = Payer(DevWallet(DevLedger(ledger_path), LISTENER), elsewhere_store, Limits())
    try:
        first = await shop.challenge()
        bought = await elsewhere.handle_challenge(url=URL, www_authenticate=[first.header])
        assert isinstance(bought, Paid) and bought.paid_here
    finally:
        await elsewhere.close()
    payer = make_payer()  # started before the other process paid: nothing in memory
    second = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[second.header])
    assert isinstance(outcome, Paid) and not outcome.paid_here
    assert outcome.token.payment_hash == first.payment_hash
    assert not await shop.settled(second)


async def test_16_concurrent_challenges_in_one_scope_pay_once(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, ledger_path: Path
) -> None:
    wallet = DevWallet(DevLedger(ledger_path), LISTENER, delay=0.05)  # keep the flight open
    payer = make_payer(wallet=wallet)
    offers = [await shop.challenge() for _ in range(16)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(
                payer.handle_challenge(
                    url=f"{ORIGIN}/bonus/ep{i}.mp3", www_authenticate=[offer.header]
                )
                for i, offer in enumerate(offers)
            )
        ),
        timeout=10,
    )
    assert all(isinstance(o, Paid) for o in outcomes)
    paid = [o for o in outcomes if isinstance(o, Paid) and o.paid_here]
    assert len(paid) == 1 and paid[0].amount_msat == 21_000
    assert len({o.token.payment_hash for o in outcomes if isinstance(o, Paid)}) == 1
    assert sum([await shop.settled(offer) for offer in offers]) == 1
    assert len(await payments(store)) == 1
    assert await wallet.balance() == NEW_WALLET_BALANCE_MSAT - 21_000


async def test_concurrent_challenges_for_two_scopes_pay_each_once(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    offers = [await shop.challenge(service=("a", "b")[i % 2]) for i in range(8)]
    outcomes = await asyncio.gather(
        *(payer.handle_challenge(url=URL, www_authenticate=[o.header]) for o in offers)
    )
    paid = [o for o in outcomes if isinstance(o, Paid) and o.paid_here]
    assert sorted(o.token.services for o in paid) == [("a",), ("b",)]
    assert len(await payments(store)) == 2


async def test_an_expired_token_is_not_sent_and_is_paid_again(
    shop: Shop, make_payer: PayerFactory, clock: Clock
) -> None:
    payer = make_payer()
    valid_until = int(clock.now) + 100
    first = await shop.challenge(valid_until=valid_until)
    paid = await payer.handle_challenge(url=URL, www_authenticate=[first.header])
    assert isinstance(paid, Paid) and paid.token.valid_until == valid_until
    clock.now = valid_until - 1
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") == paid.token
    clock.now = valid_until
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") is None
    second = await shop.challenge(valid_until=valid_until + 1000)
    again = await payer.handle_challenge(url=URL, www_authenticate=[second.header])
    assert isinstance(again, Paid) and again.paid_here
    assert again.token.payment_hash == second.payment_hash


async def test_no_l402_challenge_is_not_ours(make_payer: PayerFactory, store: ClientStore) -> None:
    payer = make_payer()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=['Basic realm="x"'])
    assert outcome is None
    assert await store.history() == []


# --- refusals ---------------------------------------------------------------------------------


async def assert_refused(payer: Payer, offer: Offer | str, code: str, *, url: str = URL) -> Refused:
    header = offer if isinstance(offer, str) else offer.header
    outcome = await payer.handle_challenge(url=url, www_authenticate=[header])
    assert isinstance(outcome, Refused), outcome
    assert outcome.code == code, outcome
    recorded = await refusals(payer)
    assert [(e["reason"], e["url"]) for e in recorded][:1] == [(code, url)]
    assert recorded[0]["message"] == outcome.message
    return outcome


async def test_refuses_a_host_not_allowed(shop: Shop, make_payer: PayerFactory) -> None:
    payer = make_payer(limits=Limits(allow=("example.com", "127.0.0.1:9999")))
    offer = await shop.challenge()
    refused = await assert_refused(payer, offer, "not_allowed")
    assert refused.message == "127.0.0.1:8081 is not in l402_allow"
    assert not await shop.settled(offer)
    allowed = make_payer(limits=Limits(allow=("127.0.0.1:8081",)))
    assert isinstance(
        await allowed.handle_challenge(url=URL, www_authenticate=[offer.header]), Paid
    )


async def test_refuses_above_max_price_and_pays_at_it(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer(limits=Limits(max_price_sat=20))
    dear = await shop.challenge(amount_sat=21)
    refused = await assert_refused(payer, dear, "max_price")
    assert refused.message == "the invoice asks 21 sat, more than l402_max_price_sat 20"
    (event,) = await refusals(payer)
    assert (event["amount_sat"], event["service"]) == (21, "podcast")
    assert event["payment_hash"] == dear.payment_hash.hex()
    assert not await shop.settled(dear) and await payments(store) == []
    exact = await shop.challenge(amount_sat=20, service="other")
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[exact.header])
    assert isinstance(outcome, Paid) and outcome.amount_msat == 20_000


async def test_refuses_beyond_the_daily_budget_fee_limit_included(
    shop: Shop, make_payer: PayerFactory
) -> None:
    payer = make_payer(limits=Limits(budget_daily_sat=30, max_fee_sat=10))
    dear = await shop.challenge(amount_sat=21)  # 21 + 10 fee limit > 30
    refused = await assert_refused(payer, dear, "budget_daily")
    assert "l402_budget_daily_sat 30 sat" in refused.message
    assert not await shop.settled(dear)
    fits = await shop.challenge(amount_sat=20, service="other")
    assert isinstance(await payer.handle_challenge(url=URL, www_authenticate=[fits.header]), Paid)


async def test_refuses_beyond_the_total_budget(shop: Shop, make_payer: PayerFactory) -> None:
    payer = make_payer(limits=Limits(budget_total_sat=40, max_fee_sat=0))
    first = await shop.challenge(amount_sat=21, service="a")
    assert isinstance(await payer.handle_challenge(url=URL, www_authenticate=[first.header]), Paid)
    second = await shop.challenge(amount_sat=21, service="b")
    refused = await assert_refused(payer, second, "budget_total")
    assert "l402_budget_total_sat 40 sat: 21 sat spent so far" in refused.message
    assert not await shop.settled(second)


async def test_refuses_an_invoice_without_amount(make_payer: PayerFactory) -> None:
    payer = make_payer()
    payment_hash = os.urandom(32)
    invoice = foreign_invoice(payment_hash, None, "donate")
    macaroon = mint(os.urandom(32), Identifier.new(payment_hash), ["services=podcast:0"])
    refused = await assert_refused(payer, format_challenge("L402", macaroon, invoice), "no_amount")
    assert "never paid blindly" in refused.message


async def test_refuses_an_invoice_for_another_payment_hash(
    shop: Shop, make_payer: PayerFactory
) -> None:
    payer = make_payer()
    offer = await shop.challenge(macaroon_hash=os.urandom(32))
    refused = await assert_refused(payer, offer, "hash_mismatch")
    assert offer.payment_hash.hex()[:16] in refused.message
    assert not await shop.settled(offer)


async def test_refuses_an_expired_invoice(
    shop: Shop, make_payer: PayerFactory, clock: Clock
) -> None:
    payer = make_payer()
    offer = await shop.challenge(expiry=60)
    clock.now += 61
    refused = await assert_refused(payer, offer, "invoice_expired")
    assert refused.message.startswith("the invoice expired at ")
    assert not await shop.settled(offer)


async def test_refuses_an_unreadable_macaroon(make_payer: PayerFactory) -> None:
    payer = make_payer()
    refused = await assert_refused(
        payer, 'L402 macaroon="bm90IGEgbWFjYXJvb24=", invoice="lnbcrt1x"', "bad_challenge"
    )
    assert "no usable macaroon" in refused.message


async def test_refuses_an_unreadable_invoice(make_payer: PayerFactory) -> None:
    payer = make_payer()
    macaroon = mint(os.urandom(32), Identifier.new(os.urandom(32)), ["services=podcast:0"])
    refused = await assert_refused(
        payer, format_challenge("L402", macaroon, "lnbcrt1notaninvoice"), "bad_challenge"
    )
    assert "invalid BOLT11 invoice" in refused.message


async def test_the_same_refusal_is_recorded_once_a_minute(
    shop: Shop, make_payer: PayerFactory, clock: Clock
) -> None:
    payer = make_payer(limits=Limits(max_price_sat=1))
    offer = await shop.challenge()
    for _ in range(3):
        outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
        assert isinstance(outcome, Refused) and outcome.code == "max_price"
    assert len(await refusals(payer)) == 1
    clock.now += 60
    await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert len(await refusals(payer)) == 2


async def test_payment_failed_releases_the_reservation(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, ledger_path: Path
) -> None:
    drain = await shop.ledger.create_invoice(MERCHANT, NEW_WALLET_BALANCE_MSAT, "drain", 600)
    await shop.ledger.pay("poor", drain.bolt11, 0)
    assert await shop.ledger.balance("poor") == 0
    payer = make_payer(wallet=DevWallet(DevLedger(ledger_path), "poor"))
    offer = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(outcome, Refused) and outcome.code == "payment_failed"
    assert "insufficient balance" in outcome.message
    row = await store.payment(offer.payment_hash)
    assert row is not None and row.status == "failed" and row.error == outcome.message
    assert await store.spent_msat() == 0
    assert not await shop.settled(offer)
    assert payer.in_flight == set() and payer.flights == {}


async def test_payment_failed_from_the_wallet(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    wallet = FakeWallet(pay_error=PaymentFailed("no route to the merchant"))
    payer = make_payer(wallet=wallet)
    offer = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert outcome == Refused("payment_failed", "no route to the merchant")
    assert wallet.paid == [offer.bolt11]
    assert (await store.payment(offer.payment_hash)).status == "failed"  # type: ignore[union-attr]


async def test_an_unreachable_wallet_leaves_the_payment_pending(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer(wallet=FakeWallet(pay_error=BackendUnavailable("node unreachable")))
    offer = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(outcome, Refused) and outcome.code == "payment_pending"
    assert outcome.message.startswith("node unreachable; the payment stays pending")
    (row,) = await store.pending()
    assert row.payment_hash == offer.payment_hash and row.error == "node unreachable"
    # Still reserved: it counts against the budget until resolved.
    assert await store.spent_msat() == 31_000


async def test_a_wallet_slower_than_pay_timeout_leaves_the_payment_pending(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer(wallet=FakeWallet(pay_sleep=30), pay_timeout=0.05)
    offer = await shop.challenge()
    started = time.monotonic()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert time.monotonic() - started < 5
    assert isinstance(outcome, Refused) and outcome.code == "payment_pending"
    assert "no answer from the wallet within 0.05 s" in outcome.message
    (row,) = await store.pending()
    assert row.payment_hash == offer.payment_hash
    assert row.error == "no answer from the wallet within 0.05 s"


async def test_a_slow_dev_wallet_times_out_and_recovery_gets_the_token(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, ledger_path: Path
) -> None:
    """`dev:listener?delay=<s>`: settled in the ledger, answered too late for pay_timeout."""
    wallet = DevWallet(DevLedger(ledger_path), LISTENER, delay=30)
    await wallet.start()  # the timeout is for the delay, not for opening the ledger
    payer = make_payer(wallet=wallet, pay_timeout=0.2)
    offer = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(outcome, Refused) and outcome.code == "payment_pending"
    assert await shop.settled(offer)
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") is None
    (settled,) = await payer.recover()
    assert settled.payment_hash == offer.payment_hash and settled.status == "paid"
    token = payer.token_for(ORIGIN, "/bonus/ep1.mp3")
    assert token is not None and token.payment_hash == offer.payment_hash
    assert await wallet.balance() == NEW_WALLET_BALANCE_MSAT - 21_000


async def test_a_pending_payment_is_not_paid_again_for_the_next_challenge(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    wallet = FakeWallet(pay_error=BackendUnavailable("node unreachable"))
    payer = make_payer(wallet=wallet)
    offer = await shop.challenge()
    await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    again = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(again, Refused) and again.code == "payment_failed"
    assert "never paid twice" in again.message
    assert wallet.paid == [offer.bolt11]


# --- recovery ---------------------------------------------------------------------------------


def pending_payment(offer: Offer, wallet: str, *, url: str = URL) -> NewPayment:
    return NewPayment(
        payment_hash=offer.payment_hash,
        origin=ORIGIN,
        url=url,
        scope="services:podcast",
        services=("podcast",),
        scheme="L402",
        macaroon=offer.macaroon,
        bolt11=offer.bolt11,
        amount_msat=21_000,
        fee_limit_msat=10_000,
        valid_until=None,
        wallet=wallet,
    )


async def reserve_pending(store: ClientStore, offer: Offer, payer: Payer) -> Payment:
    """The row a payer that crashed mid-payment left behind, made with `payer`'s wallet."""
    reserved = await store.reserve(
        pending_payment(offer, wallet_identity(payer.wallet)),
        budget_daily_msat=10**9,
        budget_total_msat=None,
        now=time.time(),
    )
    assert isinstance(reserved, Payment)
    return reserved


async def test_recovery_stores_the_token_of_a_payment_the_wallet_settled(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    offer = await shop.challenge()
    result = await shop.ledger.pay(LISTENER, offer.bolt11, 0)  # paid, then the client died
    payer = make_payer()
    await reserve_pending(store, offer, payer)
    await store.learn_path(ORIGIN, "/bonus/", "services:podcast", time.time())
    balance = await shop.ledger.balance(LISTENER)

    (settled,) = await payer.start()
    assert settled.status == "paid" and settled.preimage == result.preimage
    row = await store.payment(offer.payment_hash)
    assert row is not None and row.status == "paid" and row.preimage == result.preimage
    assert await store.pending() == []
    token = payer.token_for(ORIGIN, "/bonus/ep1.mp3")
    assert token is not None and token.payment_hash == offer.payment_hash
    verify(offer.macaroon, result.preimage, shop.root_key, service="podcast", now=time.time())

    fresh = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[fresh.header])
    assert isinstance(outcome, Paid) and not outcome.paid_here
    assert await shop.ledger.balance(LISTENER) == balance  # never paid twice


async def test_recovery_fails_a_payment_the_wallet_never_sent(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    offer = await shop.challenge()
    payer = make_payer()
    await reserve_pending(store, offer, payer)
    assert await payer.start() == []
    row = await store.payment(offer.payment_hash)
    assert row is not None and row.status == "failed"
    assert row.error == "the payment was never sent"
    assert await store.spent_msat() == 0
    assert not await shop.settled(offer)


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("failed", "failed"),
        ("pending", "pending"),
        (BackendUnavailable("node down"), "pending"),
        ("wrong preimage", "pending"),
    ],
)
async def test_recovery_asks_the_wallet(
    shop: Shop,
    make_payer: PayerFactory,
    store: ClientStore,
    state: str | Exception,
    status: str,
) -> None:
    offer = await shop.challenge()
    answer: PaymentState | Exception
    if isinstance(state, Exception):
        answer = state
    elif state == "wrong preimage":
        answer = PaymentState(offer.payment_hash, "succeeded", os.urandom(32), 0)
    else:
        answer = PaymentState(offer.payment_hash, state, None, 0)  # type: ignore[arg-type]
    wallet = FakeWallet(state=answer)
    payer = make_payer(wallet=wallet)
    await reserve_pending(store, offer, payer)
    assert await payer.start() == []
    assert wallet.looked_up == [offer.payment_hash]
    assert wallet.paid == []
    assert (await store.payment(offer.payment_hash)).status == status  # type: ignore[union-attr]
    assert payer.tokens == {}


async def test_recovery_skips_a_payment_being_paid_now(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    offer = await shop.challenge()
    wallet = FakeWallet()
    payer = make_payer(wallet=wallet)
    await reserve_pending(store, offer, payer)
    payer.in_flight.add(offer.payment_hash)
    assert await payer.recover() == []
    assert wallet.looked_up == []
    assert (await store.payment(offer.payment_hash)).status == "pending"  # type: ignore[union-attr]


async def test_recovery_leaves_a_payment_of_another_wallet_alone(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, ledger_path: Path
) -> None:
    """Asking the wrong wallet would hear "never sent" and release a payment that may be paid."""
    offer = await shop.challenge()
    await shop.ledger.pay("someone", offer.bolt11, 0)
    other = make_payer(wallet=DevWallet(DevLedger(ledger_path), "someone"))
    await reserve_pending(store, offer, other)
    wallet = FakeWallet()
    payer = make_payer(wallet=wallet)
    assert await payer.start() == []
    assert wallet.looked_up == []
    assert (await store.payment(offer.payment_hash)).status == "pending"  # type: ignore[union-attr]
    # The same wallet configured again settles it.
    (settled,) = await other.start()
    assert settled.payment_hash == offer.payment_hash and settled.status == "paid"


# --- recovery while the node may still be trying (Core Lightning, Eclair) ------------------------


@contextlib.asynccontextmanager
async def node_between_attempts(
    kind: str, listed: str, tmp_path: Path, ledger_path: Path
) -> AsyncIterator[tuple[ClnStandin | EclairStandin, Wallet]]:
    """A stand-in node paying from LISTENER whose `pay` stays under way while its lookup shows
    no attempt ("nothing") or only a failed one ("failed"), and a wallet on it."""
    ledger = DevLedger(ledger_path)
    node: ClnStandin | EclairStandin
    if kind == "cln":
        (tmp_path / "cln").mkdir()
        node = ClnStandin(tmp_path / "cln" / "lightning-rpc", ledger, LISTENER)
        uri = node.socket_path
    else:
        node = EclairStandin(ledger, LISTENER, "eclair-password")
    await node.start()
    if isinstance(node, EclairStandin):
        uri = node.uri
    node.pay_gap = listed
    wallet = open_wallet(uri, dev_ledger=ledger_path)
    try:
        yield node, wallet
    finally:
        await wallet.close()
        await node.close()
        await ledger.close()


def pay_calls(node: ClnStandin | EclairStandin) -> int:
    if isinstance(node, ClnStandin):
        return sum(1 for r in node.requests if r.get("method") == "pay")
    return sum(1 for name, _ in node.requests if name == "payinvoice")


async def wait_for_lookup(wallet: Wallet, payment_hash: bytes, status: str) -> str:
    """Ask the wallet until it says `status` (bounded: 100 tries, ~5 s)."""
    seen = ""
    for _ in range(100):
        seen = (await wallet.lookup_payment(payment_hash)).status
        if seen == status:
            break
        await asyncio.sleep(0.05)
    return seen


NODES_BETWEEN_ATTEMPTS = [
    ("cln", "nothing", "unknown"),
    ("cln", "failed", "failed"),
    ("eclair", "nothing", "unknown"),
    ("eclair", "failed", "failed"),
]


@pytest.mark.parametrize(("kind", "listed", "looks"), NODES_BETWEEN_ATTEMPTS)
async def test_recovery_keeps_a_payment_the_node_may_still_be_making(
    shop: Shop,
    make_payer: PayerFactory,
    store: ClientStore,
    tmp_path: Path,
    ledger_path: Path,
    kind: str,
    listed: str,
    looks: str,
) -> None:
    """lightningd and Eclair keep paying after our call was cut off; between two attempts their
    lookup says "unknown" or "failed". Releasing the row then would pay the next 402 again."""
    async with node_between_attempts(kind, listed, tmp_path, ledger_path) as (node, wallet):
        payer = make_payer(wallet=wallet, pay_timeout=0.3)
        await payer.start()
        balance = await shop.ledger.balance(LISTENER)
        offer = await shop.challenge()
        outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
        assert isinstance(outcome, Refused) and outcome.code == "payment_pending"
        assert await wait_for_lookup(wallet, offer.payment_hash, looks) == looks

        assert await payer.recover() == []
        assert (await store.payment(offer.payment_hash)).status == "pending"  # type: ignore[union-attr]
        fresh = await shop.challenge()
        again = await payer.handle_challenge(url=URL, www_authenticate=[fresh.header])
        assert isinstance(again, Refused) and again.code == "payment_pending"
        assert pay_calls(node) == 1

        # The node's next attempt goes through: recovery finds the preimage.
        node.release()
        assert await wait_for_lookup(wallet, offer.payment_hash, "succeeded") == "succeeded"
        (settled,) = await payer.recover()
        assert settled.payment_hash == offer.payment_hash and settled.status == "paid"
        assert await shop.settled(offer) and not await shop.settled(fresh)
        assert await shop.ledger.balance(LISTENER) == balance - 21_000
        assert pay_calls(node) == 1


@pytest.mark.parametrize(("kind", "listed", "looks"), NODES_BETWEEN_ATTEMPTS)
async def test_recovery_releases_such_a_payment_once_the_node_cannot_try_any_more(
    shop: Shop,
    make_payer: PayerFactory,
    store: ClientStore,
    clock: Clock,
    tmp_path: Path,
    ledger_path: Path,
    kind: str,
    listed: str,
    looks: str,
) -> None:
    async with node_between_attempts(kind, listed, tmp_path, ledger_path) as (node, wallet):
        assert wallet.settles_within > 40  # the node's own retry limit, and a margin
        payer = make_payer(wallet=wallet, pay_timeout=0.3)
        await payer.start()
        offer = await shop.challenge()
        outcome = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
        assert isinstance(outcome, Refused) and outcome.code == "payment_pending"
        node.give_up()
        assert await wait_for_lookup(wallet, offer.payment_hash, "failed") == "failed"

        clock.now += wallet.settles_within - 1
        assert await payer.recover() == []
        assert (await store.payment(offer.payment_hash)).status == "pending"  # type: ignore[union-attr]

        clock.now += 2
        assert await payer.recover() == []
        row = await store.payment(offer.payment_hash)
        assert row is not None and row.status == "failed"
        assert row.error == "the payment failed"
        assert await store.spent_msat() == 0
        assert not await shop.settled(offer)


async def test_recovery_waits_a_day_for_a_wallet_with_an_unusable_horizon(
    shop: Shop, make_payer: PayerFactory, store: ClientStore, ledger_path: Path
) -> None:
    assert DevWallet(DevLedger(ledger_path), LISTENER).settles_within == 0
    wallet = FakeWallet(state=PaymentState(bytes(32), "failed", None, 0))
    wallet.settles_within = float("nan")  # unusable: counts as a day, never as "final now"
    payer = make_payer(wallet=wallet)
    offer = await shop.challenge()
    await reserve_pending(store, offer, payer)
    assert await payer.start() == []
    assert (await store.payment(offer.payment_hash)).status == "pending"  # type: ignore[union-attr]


# --- the token the request carried -------------------------------------------------------------


async def test_a_402_to_the_sent_token_drops_it_and_pays_once(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    first = await shop.challenge()
    paid = await payer.handle_challenge(url=URL, www_authenticate=[first.header])
    assert isinstance(paid, Paid)
    sent = payer.token_for(ORIGIN, "/bonus/ep1.mp3")
    assert sent == paid.token

    second = await shop.challenge()
    outcome = await payer.handle_challenge(url=URL, www_authenticate=[second.header], sent=sent)
    assert isinstance(outcome, Paid) and outcome.paid_here
    assert outcome.token.payment_hash == second.payment_hash
    dropped = await store.payment(first.payment_hash)
    assert dropped is not None and dropped.dropped_at is not None
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") == outcome.token
    assert len(await payments(store)) == 2


async def test_concurrent_402s_to_the_same_sent_token_pay_once(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    first = await shop.challenge()
    paid = await payer.handle_challenge(url=URL, www_authenticate=[first.header])
    assert isinstance(paid, Paid)
    offers = [await shop.challenge() for _ in range(8)]
    outcomes = await asyncio.gather(
        *(
            payer.handle_challenge(url=URL, www_authenticate=[o.header], sent=paid.token)
            for o in offers
        )
    )
    assert all(isinstance(o, Paid) for o in outcomes)
    assert sum(1 for o in outcomes if isinstance(o, Paid) and o.paid_here) == 1
    assert len(await payments(store)) == 2


async def test_a_402_for_another_scope_keeps_the_sent_token(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    podcast = await shop.challenge(service="podcast")
    paid = await payer.handle_challenge(url=URL, www_authenticate=[podcast.header])
    assert isinstance(paid, Paid)

    extra = await shop.challenge(service="extra")
    outcome = await payer.handle_challenge(
        url=URL, www_authenticate=[extra.header], sent=paid.token
    )
    assert isinstance(outcome, Paid) and outcome.paid_here
    assert outcome.token.services == ("extra",)
    kept = await store.payment(podcast.payment_hash)
    assert kept is not None and kept.dropped_at is None
    assert payer.tokens[(ORIGIN, "services:podcast")] == paid.token


async def test_rejected_after_payment_drops_the_token_and_records_it(
    shop: Shop, make_payer: PayerFactory, store: ClientStore
) -> None:
    payer = make_payer()
    offer = await shop.challenge()
    paid = await payer.handle_challenge(url=URL, www_authenticate=[offer.header])
    assert isinstance(paid, Paid)
    refused = await payer.rejected_after_payment(paid.token, URL)
    assert refused.code == "rejected_after_payment"
    assert "not paying again" in refused.message
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") is None
    row = await store.payment(offer.payment_hash)
    assert row is not None and row.dropped_at is not None
    (event,) = await refusals(payer)
    assert (event["reason"], event["url"], event["message"]) == (
        "rejected_after_payment",
        URL,
        refused.message,
    )


async def test_drop_of_an_old_token_keeps_the_current_one(
    shop: Shop, make_payer: PayerFactory
) -> None:
    payer = make_payer()
    first = await shop.challenge()
    paid = await payer.handle_challenge(url=URL, www_authenticate=[first.header])
    assert isinstance(paid, Paid)
    stale = Token(ORIGIN, paid.token.scope, paid.token.services, os.urandom(32), None, "L402 x:0")
    await payer.drop(stale, "an older token")
    assert payer.token_for(ORIGIN, "/bonus/ep1.mp3") == paid.token


# --- the wallet's network and reachability ------------------------------------------------------


class MainnetDevWallet(DevWallet):
    """A dev wallet that says it is on mainnet, as a real node would."""

    async def info(self) -> NodeInfo:
        return replace(await super().info(), network="mainnet")


async def test_refuses_an_invoice_for_another_network_than_the_wallets(
    shop: Shop, make_payer: PayerFactory, ledger_path: Path
) -> None:
    payer = make_payer(wallet=MainnetDevWallet(DevLedger(ledger_path), LISTENER))
    await payer.start()
    assert payer.node is not None and payer.node.network == "mainnet"
    offer = await shop.challenge()  # a regtest invoice
    refused = await assert_refused(payer, offer, "wrong_network")
    assert refused.message == "the invoice is for regtest, the wallet is on mainnet"
    assert not await shop.settled(offer)


async def test_a_wallet_on_the_invoices_network_pays_after_start(
    shop: Shop, make_payer: PayerFactory
) -> None:
    payer = make_payer()
    await payer.start()
    assert payer.node is not None and payer.node.network == "regtest"
    offer = await shop.challenge()
    assert isinstance(await payer.handle_challenge(url=URL, www_authenticate=[offer.header]), Paid)


class SilentWallet(FakeWallet):
    async def info(self) -> NodeInfo:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


class RefusingWallet(FakeWallet):
    async def info(self) -> NodeInfo:
        raise BackendUnavailable("lnd at 127.0.0.1:9: connection refused")


async def test_start_fails_clearly_when_the_wallet_cannot_be_reached(
    make_payer: PayerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BackendUnavailable, match="connection refused"):
        await make_payer(wallet=RefusingWallet()).start()
    monkeypatch.setattr(payer_module, "INFO_TIMEOUT_SECONDS", 0.05)
    with pytest.raises(BackendUnavailable, match=r"fake: no answer within 0.05 s"):
        await make_payer(wallet=SilentWallet()).start()
