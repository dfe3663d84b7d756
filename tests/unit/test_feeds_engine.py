"""Private podcast feeds (engine/feeds.py): the `feed:` key, the capability URL judged as the
request it stands for, minting on unlock and POST /.l402/feed, the capability cache, and the
feed document made private at the mitmproxy and ASGI doors (refused by the nginx door).

The engine runs with a real SQLite store whose feed methods (TokenStore.feed_for, feed_access) a
small fake replaces (FakeFeeds): what is tested here is the engine, not the store.
"""

import asyncio
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from l402proxy import paywall
from l402proxy.doors import asgi as asgi_door
from l402proxy.doors.nginx import new_engine, rule_problem, warn_feeds_off
from l402proxy.engine import Answer, Forward, Outcome, Paywall, Request, feeds
from l402proxy.engine.core import SELLING, caveats_for_pass
from l402proxy.engine.request import get
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import attenuate, mint
from l402proxy.lightning import DevLedger
from l402proxy.rules import RulesError, load_rules, parse_rules
from l402proxy.store import StoreError
from tests.unit.test_asgi_door import Origin, Reply, call
from tests.unit.test_server_addon import flow_for, server_on

HOST = "podcast.example"
RULES = r"""
services:
  - name: podcast
    description: "Ad-free episode"
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\1"]
    feed: /feed.xml
  - name: bonus
    match: {path: "/bonus/*"}
    price_sat: 100
    feed: /bonus.xml
  - name: clips
    match: {path: "/clips/*"}
    price_sat: 5
    bundle: {requests: 2}
    freebies: {requests: 1, per: 1h}
    feed: /clips.xml
  - name: premium
    match: {path: "/premium/*"}
    price_sat: 50
    pass: {name: all, services: [premium, podcast]}
    feed: /premium.xml
  - name: nofeed
    match: {path: "/nofeed/*"}
    price_sat: 3
  - name: adfree
    match: {path: "/adfree/*"}
    mode: deny
  - name: api
    match: {path: "/api/*"}
    price_sat: 1
    bundle: {units: 10, usage_header: X-Usage}
"""
NOT_FOUND = b"Not found.\n"
FEED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0" '
    b'xmlns:podcast="https://podcastindex.org/namespace/1.0"><channel><title>T</title>'
    b'<podcast:value type="lightning" method="keysend"><podcast:valueRecipient name="h" '
    b'type="node" address="02ab" split="100"/></podcast:value>'
    b'<item><enclosure url="http://podcast.example/episodes/ep1.mp3?x=1" type="audio/mpeg" '
    b'length="9"/></item><item><enclosure url="http://elsewhere.example/e.mp3" '
    b'type="audio/mpeg" length="9"/></item></channel></rss>\n'
)


# -- a fake of the store's feed methods (the contract in FEEDS.md) -----------------------------


@dataclass(frozen=True)
class Access:
    capability: str
    token_id: bytes
    service: str
    feed: str
    credential: str = field(repr=False)
    valid_until: float | None
    created_at: float
    revoked_at: float | None = None

    def status(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        now = time.time() if now is None else now
        if self.valid_until is not None and self.valid_until <= now:
            return "expired"
        return "active"


@dataclass
class FakeFeeds:
    rows: dict[str, Access] = field(default_factory=dict)
    lookups: int = 0
    asked: int = 0  # feed_for calls
    failing: bool = False
    counter: int = 0

    async def feed_for(
        self,
        token_id: bytes,
        service: str,
        feed: str,
        credential: str,
        valid_until: float | None,
        when: float,
    ) -> Access:
        self.asked += 1
        if self.failing:
            raise StoreError("the database is down")
        for row in self.rows.values():
            # One active access per (token, feed, credential), as the stores keep them.
            if (row.token_id, row.feed, row.credential, row.revoked_at) == (
                token_id,
                feed,
                credential,
                None,
            ):
                return row
        self.counter += 1
        capability = f"cap{self.counter:019d}"  # 22 URL-safe characters, as the store's
        row = Access(capability, token_id, service, feed, credential, valid_until, when)
        self.rows[capability] = row
        return row

    async def feed_access(self, capability: str) -> Access | None:
        self.lookups += 1
        await asyncio.sleep(0)
        if self.failing:
            raise StoreError("the database is down")
        return self.rows.get(capability)

    def revoke(self, capability: str) -> None:
        self.rows[capability] = dataclasses.replace(self.rows[capability], revoked_at=time.time())


@dataclass
class Token:
    macaroon: str
    preimage: bytes
    token_id: bytes

    @property
    def credential(self) -> str:
        return f"{self.macaroon}:{self.preimage.hex()}"

    @property
    def authorization(self) -> str:
        return f"L402 {self.credential}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Site:
    engine: Paywall
    feeds: FakeFeeds
    home: Path
    clock: Clock

    def token(self, service: str, valid_until: int | None = None) -> Token:
        assert self.engine.rules is not None
        rule = next(rule for rule in self.engine.rules.rules if rule.name == service)
        preimage = os.urandom(32)
        identifier = Identifier.new(hashlib.sha256(preimage).digest())
        macaroon = mint(
            self.engine.root_key_for(identifier.token_id),
            identifier,
            caveats_for_pass(rule, valid_until),
        )
        return Token(macaroon, preimage, identifier.token_id)

    async def access(self, token: Token, service: str, feed: str, **changes: Any) -> str:
        row = await self.feeds.feed_for(
            token.token_id, service, feed, token.credential, None, time.time()
        )
        if changes:
            self.feeds.rows[row.capability] = dataclasses.replace(row, **changes)
        return row.capability

    async def get(self, target: str, method: str = "GET", **headers: str) -> Outcome:
        fields = ((b"Host", HOST.encode()), *header_fields(headers))
        return await self.engine.handle(
            Request(method=method, target=target, host=HOST, fields=fields, body=b"")
        )

    async def post(self, target: str, body: Any = None, **headers: str) -> Answer:
        fields = (
            (b"Host", HOST.encode()),
            (b"Content-Type", b"application/json"),
            *header_fields(headers),
        )
        outcome = await self.engine.handle(
            Request(
                method="POST",
                target=target,
                host=HOST,
                fields=fields,
                body=b"" if body is None else json.dumps(body).encode(),
            )
        )
        assert isinstance(outcome, Answer)
        return outcome

    async def invoices(self) -> int:
        ledger = DevLedger(self.home / "devledger.sqlite")
        try:
            return len(await ledger.list_invoices())
        finally:
            await ledger.close()


def header_fields(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]


async def open_site(home: Path, rules_text: str = RULES) -> Site:
    rules = home / "rules.yaml"
    rules.write_text(rules_text)
    engine = Paywall()
    engine.use_rules_file(str(rules))
    engine.use_backend("dev", dev_ledger=str(home / "devledger.sqlite"))
    engine.store_uri = str(home / "server.sqlite")
    await engine.open()
    fake = FakeFeeds()
    assert engine.store is not None
    # The store's feed methods (helper B's) replaced by the fake, on this instance only.
    engine.store.feed_for = fake.feed_for  # type: ignore[method-assign]
    engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
    clock = Clock()
    engine.feed_accesses = feeds.AccessCache(clock=clock)
    return Site(engine, fake, home, clock)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    opened = await open_site(tmp_path)
    try:
        yield opened
    finally:
        await opened.engine.close()


@pytest.fixture
async def real_store_site(tmp_path: Path) -> AsyncIterator[Site]:
    """The engine with the real SQLite store's feed methods (open_site puts a fake in front)."""
    opened = await open_site(tmp_path)
    store = opened.engine.store
    assert store is not None
    del store.feed_for  # the instance attributes open_site set: the store's own methods again
    del store.feed_access
    try:
        yield opened
    finally:
        await opened.engine.close()


def is_404(outcome: Outcome) -> bool:
    return (
        isinstance(outcome, Answer)
        and outcome.status == 404
        and outcome.body == NOT_FOUND
        and outcome.header("Content-Type") == "text/plain; charset=utf-8"
        and outcome.header("WWW-Authenticate") is None
    )


def forwarded_authorizations(outcome: Outcome) -> list[str]:
    assert isinstance(outcome, Forward)
    return [v.decode() for k, v in outcome.headers if k.lower() == b"authorization"]


# -- the rules' feed: key ---------------------------------------------------------------------

HEAD = 'services:\n  - name: a\n    match: {path: "/e/*"}\n    price_sat: 1\n'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("feed.xml", "starting with '/'"),
        ("'/feed.xml?x=1'", "has a query or fragment"),
        ("'/a#b'", "has a query or fragment"),
        ("/a/../feed.xml", "'.', '..' or empty segments"),
        ("/a//feed.xml", "'.', '..' or empty segments"),
        ("/a%2Ffeed.xml", "not a plain path"),
        ("'/a b'", "not a plain path"),
        ("/a;b", "not a plain path"),
        ("/.l402/feed", "under /.l402/"),
        ("/.l402/feed/x", "under /.l402/"),
        ("12", "must be a path like /feed.xml"),
        ("[/a]", "must be a path like /feed.xml"),
    ],
)
def test_a_bad_feed_is_refused_naming_its_line(value: str, message: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules(HEAD + f"    feed: {value}\n", "rules/test.yaml")
    assert raised.value.line == 5, str(raised.value)
    assert str(raised.value).startswith("rules/test.yaml:5: service 'a': feed"), str(raised.value)
    assert message in str(raised.value)


@pytest.mark.parametrize("mode", ["free", "deny"])
def test_a_feed_where_nothing_is_sold_is_refused(mode: str) -> None:
    text = 'services:\n  - name: a\n    match: {path: "/e/*"}\n'
    with pytest.raises(RulesError) as raised:
        parse_rules(text + f"    mode: {mode}\n    feed: /f.xml\n", "rules/test.yaml")
    assert raised.value.line == 5
    assert f"'feed' has no meaning with mode: {mode}" in str(raised.value)


def test_the_feed_is_read_and_listed_with_how_the_rule_sells() -> None:
    rules = parse_rules(HEAD + "    feed: /shows/feed.xml\n", "rules/test.yaml")
    assert rules.rules[0].feed == "/shows/feed.xml"
    assert rules.rules[0].pricing_json()["feed"] == "/shows/feed.xml"
    assert parse_rules(HEAD, "rules/test.yaml").rules[0].pricing_json()["feed"] is None
    shipped = load_rules(Path(__file__).parents[2] / "rules" / "podcast.yaml")
    assert [rule.feed for rule in shipped.rules if rule.name == "podcast"] == ["/feed.xml"]


def test_the_nginx_door_serves_a_feed_rule_with_feeds_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """auth_request sees no answer body: the rule is served, its feed is not, said once."""
    rules = parse_rules(HEAD + "    feed: /feed.xml\n", "rules/test.yaml")
    assert rule_problem(rules.rules[0]) is None
    engine = new_engine()
    assert engine.feeds_off is not None
    engine.rules = rules
    assert not feeds.sells_feeds(engine)
    with caplog.at_level(logging.WARNING):
        warn_feeds_off(engine)
    lines = [r.getMessage() for r in caplog.records if "sells a private feed" in r.getMessage()]
    assert len(lines) == 1 and "private feeds are off here" in lines[0]


# -- the capability in the target ---------------------------------------------------------------


def test_a_feed_target_is_split_into_capability_and_inner_target() -> None:
    cap = "A" * 21 + "_"
    assert feeds.split_target(f"/.l402/feed/{cap}/feed.xml?a=1") == feeds.FeedTarget(
        cap, "/feed.xml?a=1"
    )
    for bad in (
        f"/.l402/feed/{cap}",  # no inner path
        f"/.l402/feed/{cap}?x",
        f"/.l402/feed/{cap[:-1]}/feed.xml",  # 21 characters
        f"/.l402/feed/{cap}x/feed.xml",  # 23
        f"/.l402/feed/{cap[:-1]}%/feed.xml",
        "/.l402/feed/",
        f"/%2El402/feed/{cap}/feed.xml",
    ):
        assert feeds.split_target(bad) is None, bad


# -- serving through a capability -------------------------------------------------------------


async def test_the_feed_path_is_forwarded_with_the_rewrite_note_and_no_credential(
    site: Site,
) -> None:
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")
    outcome = await site.get(
        f"/.l402/feed/{cap}/feed.xml?since=1",
        Authorization="Basic dTpw",
        Cookie=f"L402_bonus={token.credential}; theme=dark",
        Accept_Encoding="gzip, br",
        Range="bytes=0-10",
        If_Range='"x"',
        Accept="application/rss+xml",
    )
    assert isinstance(outcome, Forward)
    assert outcome.path == "/feed.xml?since=1"
    assert outcome.note is not None
    assert outcome.note[feeds.FEED_NOTE] == {
        "private_base": f"http://{HOST}/.l402/feed/{cap}",
        "public_hosts": [HOST],
        "self_url": f"http://{HOST}/.l402/feed/{cap}/feed.xml",
    }
    names = [name.lower() for name, _ in outcome.headers]
    # The client's own Authorization and our cookies are gone, and so is the stored credential.
    assert forwarded_authorizations(outcome) == []
    assert get(outcome.headers, "Cookie") == "theme=dark"
    assert b"accept-encoding" not in names and b"range" not in names and b"if-range" not in names
    assert get(outcome.headers, "Accept") == "application/rss+xml"
    assert token.credential not in repr(outcome)


async def test_a_paid_enclosure_is_the_paid_variant_at_the_inner_path(site: Site) -> None:
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")
    for method in ("GET", "HEAD"):
        outcome = await site.get(
            f"/.l402/feed/{cap}/episodes/ep1.mp3?t=2", method, Range="bytes=0-99"
        )
        assert isinstance(outcome, Forward), outcome
        assert outcome.path == "/adfree/ep1.mp3?t=2"  # the paid rewrite
        assert outcome.note is not None and outcome.note["variant"] == "paid"
        assert feeds.FEED_NOTE not in outcome.note
        assert get(outcome.headers, "Range") == "bytes=0-99"  # players' ranges pass
        assert forwarded_authorizations(outcome) == []
    # A rule without a rewrite: the Forward still targets the inner path, not the capability's
    # (the verdict cache's second answer too).
    bonus = site.token("bonus")
    bonus_cap = await site.access(bonus, "bonus", "/bonus.xml")
    for _ in range(2):
        outcome = await site.get(f"/.l402/feed/{bonus_cap}/bonus/b1.mp3")
        assert isinstance(outcome, Forward) and outcome.path == "/bonus/b1.mp3"
    assert len(site.engine.verdicts) >= 1


async def test_what_is_neither_the_feed_nor_a_paid_grant_is_not_found(site: Site) -> None:
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")
    before = await site.invoices()
    for inner in (
        "/elsewhere.html",  # no rule: a capability is no open proxy
        "/bonus/b1.mp3",  # another service: its 402 is never made
        "/nofeed/x",
        "/adfree/ep1.mp3",  # deny
        "/bonus.xml",  # another access's feed
        "/.l402/unlock",  # our own pages, in any spelling
        "/.l402/pay?path=/episodes/ep1.mp3",
        "/%2El402/pay",
        "//.l402/pay",
        f"/.l402/feed/{cap}/feed.xml",
        "/episodes/..%2Fbonus/b1.mp3",  # an ambiguous path: the same judgement as anywhere
        "/free/../bonus/b1.mp3",
    ):
        outcome = await site.get(f"/.l402/feed/{cap}{inner}")
        assert is_404(outcome), (inner, outcome)
    # The feed path by another method than GET or HEAD.
    assert is_404(await site.get(f"/.l402/feed/{cap}/feed.xml", "POST"))
    # Our own endpoints are not even asked: no feed minted with the stored credential.
    asked = site.feeds.asked
    assert is_404(await site.post(f"/.l402/feed/{cap}/.l402/feed"))
    assert site.feeds.asked == asked
    assert await site.invoices() == before


async def test_an_unknown_revoked_or_expired_capability_is_the_same_404(site: Site) -> None:
    before = await site.invoices()
    token = site.token("podcast")
    revoked = await site.access(token, "podcast", "/feed.xml", revoked_at=time.time())
    expired = await site.access(
        site.token("podcast"), "podcast", "/feed.xml", valid_until=time.time() - 1
    )
    token_revoked = site.token("podcast")
    revoked_token_cap = await site.access(token_revoked, "podcast", "/feed.xml")
    site.engine.revoked.add(token_revoked.token_id)
    wrong_rule = await site.access(site.token("nofeed"), "nofeed", "/feed.xml")
    answers = [
        await site.get(f"/.l402/feed/{cap}{inner}", method)
        for cap in ("x" * 22, revoked, expired, revoked_token_cap, wrong_rule)
        for inner in ("/feed.xml", "/episodes/ep1.mp3")
        for method in ("GET", "HEAD")
    ]
    for outcome in answers:
        assert isinstance(outcome, Answer) and outcome.status == 404, outcome
        assert outcome.body in (NOT_FOUND, b"")
    assert await site.invoices() == before


async def test_a_capability_is_compared_in_full(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")
    other = cap.swapcase()  # another capability, the same to a case-blind lookup

    async def sloppy(capability: str) -> Access | None:  # a store matching case-insensitively
        return site.feeds.rows[cap] if capability.lower() == cap.lower() else None

    monkeypatch.setattr(site.engine.store, "feed_access", sloppy)
    assert is_404(await site.get(f"/.l402/feed/{other}/feed.xml"))
    assert isinstance(await site.get(f"/.l402/feed/{cap}/feed.xml"), Forward)


async def test_a_spent_bundle_is_gone_naming_the_pay_page_without_an_invoice(site: Site) -> None:
    token = site.token("clips")
    cap = await site.access(token, "clips", "/clips.xml")
    for _ in range(2):
        assert isinstance(await site.get(f"/.l402/feed/{cap}/clips/c1.mp3"), Forward)
    before = await site.invoices()
    for method in ("GET", "HEAD"):
        gone = await site.get(f"/.l402/feed/{cap}/clips/c1.mp3", method)
        assert isinstance(gone, Answer) and gone.status == 410, gone
        assert gone.header("WWW-Authenticate") is None
    gone = await site.get(f"/.l402/feed/{cap}/clips/c1.mp3")
    assert isinstance(gone, Answer)
    assert gone.body == (
        b"this private feed's token is spent: buy again at "
        b"http://podcast.example/.l402/pay?path=/clips/c1.mp3\n"
    )
    assert await site.invoices() == before
    # The feed itself is still forwarded (free here): only what the token paid for is spent.
    assert isinstance(await site.get(f"/.l402/feed/{cap}/clips.xml"), Forward)
    # Outside the capability the engine sells as ever (SELLING is back on): the client's one
    # free request was not spent through the capability, and then a 402 with its invoice.
    assert SELLING.get() is True
    free = await site.get("/clips/c1.mp3")
    assert isinstance(free, Forward) and free.note is not None and free.note.get("freebie")
    sold = await site.get("/clips/c1.mp3")
    assert isinstance(sold, Answer) and sold.status == 402
    assert await site.invoices() == before + 1


async def test_a_token_the_gate_refuses_spends_no_free_request_and_makes_no_invoice(
    site: Site,
) -> None:
    """The access says active, the token itself has expired (the store's copy of valid_until
    lags, say): the gate's challenge is no offer to a player, so neither a free request of the
    client's allowance nor an invoice goes to it."""
    token = site.token("clips", valid_until=int(time.time()) - 5)
    cap = await site.access(token, "clips", "/clips.xml")
    before = await site.invoices()
    assert is_404(await site.get(f"/.l402/feed/{cap}/clips/c1.mp3"))
    assert await site.invoices() == before
    free = await site.get("/clips/c1.mp3")
    assert isinstance(free, Forward) and free.note is not None and free.note.get("freebie")


async def test_a_pass_opens_the_other_services_through_its_sellers_feed(site: Site) -> None:
    token = site.token("premium")
    cap = await site.access(token, "premium", "/premium.xml")
    assert isinstance(await site.get(f"/.l402/feed/{cap}/premium.xml"), Forward)
    for inner, path in (
        ("/premium/p1.mp3", "/premium/p1.mp3"),
        ("/episodes/ep2.mp3", "/adfree/ep2.mp3"),
    ):
        outcome = await site.get(f"/.l402/feed/{cap}{inner}")
        assert isinstance(outcome, Forward) and outcome.path == path, (inner, outcome)
    assert is_404(await site.get(f"/.l402/feed/{cap}/bonus/b1.mp3"))
    assert is_404(await site.get(f"/.l402/feed/{cap}/feed.xml"))  # podcast's feed is not its


async def test_feeds_are_not_served_when_no_rule_sells_one(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^    feed: .*\n", "", RULES)
    opened = await open_site(tmp_path, text)
    try:
        token = opened.token("podcast")
        cap = await opened.access(token, "podcast", "/feed.xml")
        assert is_404(await opened.get(f"/.l402/feed/{cap}/episodes/ep1.mp3"))
        assert opened.feeds.lookups == 0  # not even asked
    finally:
        await opened.engine.close()


async def test_a_store_that_fails_is_a_503_and_counted(site: Site) -> None:
    told: list[tuple[Any, ...]] = []

    class Watcher:
        def store_failed(self, door: str, operation: str) -> None:
            told.append((door, operation))

        def __getattr__(self, name: str) -> Any:
            return lambda *args: None

    site.engine.watchers.add(Watcher())  # type: ignore[arg-type]
    site.feeds.failing = True
    outcome = await site.get(f"/.l402/feed/{'c' * 22}/feed.xml")
    assert isinstance(outcome, Answer) and outcome.status == 503
    assert outcome.header("Retry-After") is not None
    assert ("mitmproxy", "feed") in told


async def test_the_stored_credential_reaches_no_log_line(
    site: Site, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")

    def broken(**_: object) -> Any:
        raise RuntimeError("bug")

    from l402proxy import gate

    monkeypatch.setattr(gate, "decide", broken)
    failed = await site.get(f"/.l402/feed/{cap}/episodes/ep1.mp3")
    assert isinstance(failed, Answer) and failed.status == 503  # fail closed
    assert token.credential not in caplog.text and token.preimage.hex() not in caplog.text
    assert token.credential not in repr(failed) and token.preimage.hex() not in repr(failed)

    def leaky(fields: Any, credential: str) -> Any:  # a bug whose message holds the secret
        raise ValueError(f"cannot use {credential}")

    monkeypatch.setattr(feeds, "inner_fields", leaky)
    failed = await site.get(f"/.l402/feed/{cap}/episodes/ep1.mp3")
    assert isinstance(failed, Answer) and failed.status == 503  # handle() never raises
    assert "internal error on a private feed's request: ValueError" in caplog.text
    assert token.credential not in caplog.text and token.preimage.hex() not in caplog.text


# -- the capability cache ----------------------------------------------------------------------


async def test_a_capability_is_looked_up_once_per_cache_period(site: Site) -> None:
    token = site.token("podcast")
    cap = await site.access(token, "podcast", "/feed.xml")
    for _ in range(3):
        assert isinstance(await site.get(f"/.l402/feed/{cap}/feed.xml"), Forward)
    assert site.feeds.lookups == 1
    # Revoked in the store: believed until the cache period ends, then refused.
    site.feeds.revoke(cap)
    assert isinstance(await site.get(f"/.l402/feed/{cap}/feed.xml"), Forward)
    site.clock.now += feeds.CACHE_SECONDS + 0.01
    assert is_404(await site.get(f"/.l402/feed/{cap}/feed.xml"))
    assert site.feeds.lookups == 2
    # Unknown capabilities are kept too: a scan costs one query per capability and period.
    for _ in range(3):
        assert is_404(await site.get(f"/.l402/feed/{'u' * 22}/feed.xml"))
    assert site.feeds.lookups == 3


async def test_the_cache_is_bounded_and_shares_concurrent_lookups() -> None:
    clock = Clock()
    cache = feeds.AccessCache(seconds=2.0, max_entries=3, clock=clock)
    asked: list[str] = []
    release = asyncio.Event()

    async def lookup(capability: str) -> str:
        asked.append(capability)
        await release.wait()
        return f"access {capability}"

    waiting = [asyncio.ensure_future(cache.get("a", lookup)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == ["access a"] * 5
    assert asked == ["a"]
    for name in "bcde":
        await cache.get(name, lookup)
    assert len(cache) == 3 and set(cache.entries) == {"c", "d", "e"}

    async def failing(capability: str) -> str:
        raise StoreError("down")

    with pytest.raises(StoreError):
        await cache.get("f", failing)
    assert "f" not in cache.entries and not cache.pending  # a failure is not kept


# -- minting ----------------------------------------------------------------------------------


async def pay_page_token(site: Site, path: str) -> tuple[str, bytes]:
    """What the pay page sells for `path`, paid: (macaroon, preimage)."""
    page = await site.get(f"/.l402/pay?path={path}", Accept="application/json")
    assert isinstance(page, Answer) and page.status == 402, page
    body = json.loads(page.body)
    ledger = DevLedger(site.home / "devledger.sqlite")
    try:
        paid = await ledger.pay("listener", body["invoice"], 0)
    finally:
        await ledger.close()
    return body["macaroon"], paid.preimage


async def test_unlock_gives_the_sellers_feed_url_once_and_the_same_again(site: Site) -> None:
    macaroon, preimage = await pay_page_token(site, "/episodes/ep1.mp3")
    asked = {"macaroon": macaroon, "preimage": preimage.hex()}
    first = json.loads((await site.post(paywall.UNLOCK_PATH, asked)).body)
    again = json.loads((await site.post(paywall.UNLOCK_PATH, asked)).body)
    assert first["unlocked"] is True
    url = first["feed_url"]
    assert re.fullmatch(r"http://podcast\.example/\.l402/feed/[A-Za-z0-9_-]{22}/feed\.xml", url)
    assert again["feed_url"] == url and len(site.feeds.rows) == 1
    row = next(iter(site.feeds.rows.values()))
    assert row.service == "podcast" and row.feed == "/feed.xml"
    assert row.credential.endswith(":" + preimage.hex())
    # The URL works at once (minting put it in the cache: no store lookup).
    outcome = await site.get(url.removeprefix(f"http://{HOST}").replace("/feed.xml", "/episodes/e"))
    assert isinstance(outcome, Forward) and outcome.path == "/adfree/e"
    assert site.feeds.lookups == 0
    # A service without a feed: unlocked, no URL.
    macaroon, preimage = await pay_page_token(site, "/nofeed/x")
    plain = json.loads(
        (
            await site.post(paywall.UNLOCK_PATH, {"macaroon": macaroon, "preimage": preimage.hex()})
        ).body
    )
    assert plain["unlocked"] is True and "feed_url" not in plain


async def test_a_browser_that_paid_already_gets_its_feed_on_the_pay_page(site: Site) -> None:
    """The demo page's "Subscribe ad-free" leads to the pay page; a browser holding the cookie
    is not sold again, and sees the feed URL its token bought instead of a bare redirect."""
    token = site.token("podcast")
    cookie = f"L402_podcast={token.credential}"
    back = await site.get("/.l402/pay?path=/episodes/ep1.mp3&return=/e", Cookie=cookie)
    assert isinstance(back, Answer) and back.status == 303  # a "Go ad-free" link: straight back
    page = await site.get(
        "/.l402/pay?path=/episodes/ep1.mp3&return=/&subscribe=1", Cookie=cookie, Accept="text/html"
    )
    assert isinstance(page, Answer) and page.status == 200, page
    assert page.header("Content-Security-Policy") is not None
    text = page.body.decode()
    url = re.search(r'id="feed-url"[^>]*value="([^"]+)"', text)
    assert url is not None and url.group(1).endswith("/feed.xml")
    assert 'href="/"' in text and "Subscribe ad-free" in text
    assert token.preimage.hex() not in text
    # No feed sold, or a program asking for JSON: the redirect as before.
    bonus_less = site.token("nofeed")
    plain = await site.get(
        "/.l402/pay?path=/nofeed/x&return=/n&subscribe=1",
        Cookie=f"L402_nofeed={bonus_less.credential}",
    )
    assert isinstance(plain, Answer) and plain.status == 303 and plain.header("Location") == "/n"
    program = await site.get(
        "/.l402/pay?path=/episodes/ep1.mp3&subscribe=1", Cookie=cookie, Accept="application/json"
    )
    assert isinstance(program, Answer) and program.status == 303


async def test_unlock_stands_when_the_feed_cannot_be_recorded(site: Site) -> None:
    macaroon, preimage = await pay_page_token(site, "/bonus/b.mp3")
    site.feeds.failing = True
    answer = await site.post(
        paywall.UNLOCK_PATH, {"macaroon": macaroon, "preimage": preimage.hex()}
    )
    body = json.loads(answer.body)
    assert answer.status == 200 and body["unlocked"] is True and "feed_url" not in body


async def test_post_feed_mints_for_an_authorization_or_a_cookie(site: Site) -> None:
    token = site.token("bonus")
    by_header = await site.post(feeds.MINT_PATH, Authorization=token.authorization)
    assert by_header.status == 200, by_header.body
    body = json.loads(by_header.body)
    assert body["service"] == "bonus" and body["feed_url"].endswith("/bonus.xml")
    by_cookie = await site.post(feeds.MINT_PATH, Cookie=f"x=1; L402_bonus={token.credential}")
    assert json.loads(by_cookie.body)["feed_url"] == body["feed_url"]
    over_tls = await site.engine.handle(
        Request(
            method="POST",
            target=feeds.MINT_PATH,
            host=HOST,
            fields=(
                (b"Host", b"podcast.example:8443"),
                (b"Authorization", token.authorization.encode()),
            ),
            secure=True,
        )
    )
    assert isinstance(over_tls, Answer)
    assert json.loads(over_tls.body)["feed_url"].startswith(
        "https://podcast.example:8443/.l402/feed/"
    )


async def test_post_feed_refuses_what_it_cannot_mint_for(site: Site) -> None:
    token = site.token("bonus")
    expired = site.token("bonus", valid_until=int(time.time()) - 10)
    cases = [
        (await site.post(feeds.MINT_PATH), 401),
        (await site.post(feeds.MINT_PATH, Authorization="L402 AgEB:" + "00" * 32), 401),
        (await site.post(feeds.MINT_PATH, Authorization=expired.authorization), 403),
        (await site.post(feeds.MINT_PATH, Authorization=site.token("nofeed").authorization), 404),
        (
            await site.post(
                feeds.MINT_PATH, Authorization=token.authorization, Sec_Fetch_Site="cross-site"
            ),
            403,
        ),
    ]
    for answer, status in cases:
        assert answer.status == status, (status, answer.body)
        assert answer.header("Content-Type") == "application/json"
    wrong = await site.get(feeds.MINT_PATH, Authorization=token.authorization)
    assert isinstance(wrong, Answer) and wrong.status == 405
    assert site.feeds.rows == {}


async def test_an_attenuated_credential_never_gets_the_full_tokens_feed(
    real_store_site: Site,
) -> None:
    """l402/token.attenuate: a holder hands on a narrowed copy of its token. A capability is
    worth exactly the credential that minted it (the store keeps one access per token, feed and
    credential): the narrowed copy's feed URL opens what the copy opens, not what the full
    token opens, and the full token's URL stays its own."""
    site = real_store_site
    token = site.token("premium")  # a pass: premium and podcast
    full = await site.post(feeds.MINT_PATH, Authorization=token.authorization)
    assert full.status == 200, full.body
    narrowed = attenuate(token.macaroon, ["services=premium:0"])  # premium only
    narrowed_auth = f"L402 {narrowed}:{token.preimage.hex()}"
    # The narrowed copy does not open podcast itself: a request with it is not the paid variant.
    direct = await site.get("/episodes/ep2.mp3", Authorization=narrowed_auth)
    assert not (
        isinstance(direct, Forward) and direct.note and direct.note.get("variant") == "paid"
    ), direct
    minted = await site.post(feeds.MINT_PATH, Authorization=narrowed_auth)
    assert minted.status == 200, minted.body

    def capability(answer: Answer) -> str:
        url = json.loads(answer.body)["feed_url"]
        return url.split(feeds.FEED_PREFIX, 1)[1].split("/", 1)[0]

    assert capability(minted) != capability(full)
    through = await site.get(f"{feeds.FEED_PREFIX}{capability(minted)}/episodes/ep2.mp3")
    assert is_404(through), (
        "the narrowed credential's feed URL opens podcast, which the narrowed credential does "
        f"not: {through}"
    )
    # The full credential's URL still opens it, and minting again gives each its own back.
    paid = await site.get(f"{feeds.FEED_PREFIX}{capability(full)}/episodes/ep2.mp3")
    assert isinstance(paid, Forward) and paid.note and paid.note["variant"] == "paid", paid
    again = await site.post(feeds.MINT_PATH, Authorization=token.authorization)
    assert capability(again) == capability(full)


# -- the feed document at the doors -------------------------------------------------------------


def test_the_door_helpers_rewrite_only_what_they_can() -> None:
    note = {
        "private_base": "http://podcast.example/.l402/feed/" + "c" * 22,
        "public_hosts": ["podcast.example"],
        "self_url": "http://podcast.example/.l402/feed/" + "c" * 22 + "/feed.xml",
    }
    plain = feeds.private_body(FEED_XML, None, note)
    assert plain == feeds.private_body(gzip.compress(FEED_XML), "gzip", note)
    assert b"/.l402/feed/" + b"c" * 22 + b"/episodes/ep1.mp3?x=1" in plain
    assert b"http://elsewhere.example/e.mp3" in plain and b"podcast:value" in plain
    for body, coding in ((FEED_XML, "br"), (b"not xml", None), (b"\x1f\x8b broken", "gzip")):
        with pytest.raises(feeds.FeedError):
            feeds.private_body(body, coding, note)
    bomb = gzip.compress(b"<" * (feeds.MAX_FEED_BYTES + 10))
    with pytest.raises(feeds.FeedError, match="too large"):
        feeds.private_body(bomb, "gzip", note)
    fields = feeds.private_fields(
        (
            (b"Content-Type", b"application/rss+xml"),
            (b"Content-Length", b"5"),
            (b"Content-Encoding", b"gzip"),
            (b"ETag", b'"v1"'),
            (b"Cache-Control", b"public, max-age=60"),
            (b"Digest", b"sha-256=x"),
        ),
        123,
    )
    assert fields == (
        (b"Content-Type", b"application/rss+xml"),
        (b"ETag", b'"v1"'),
        (b"Cache-Control", b"private, max-age=60"),
        (b"Referrer-Policy", b"no-referrer"),
        (b"content-length", b"123"),
    )
    assert [feeds.rewrites(m, s) for m, s in (("GET", 200), ("HEAD", 200), ("GET", 304))] == [
        True,
        False,
        False,
    ]
    assert not feeds.rewrites("GET", 206) and not feeds.rewrites("GET", 404)


CDN_FIELDS = (
    (b"CDN-Cache-Control", b"max-age=600"),
    (b"Surrogate-Control", b"max-age=600"),
    (b"Cloudflare-CDN-Cache-Control", b"max-age=600"),
    (b"X-Accel-Expires", b"600"),
)
WEBSUB_LINKS = (
    (b"Link", b'<https://pubsubhubbub.appspot.com/>; rel="hub"'),
    (b"link", b'<https://podcast.example/feed.xml>; rel="self", </s.css>; rel=preload'),
)


def test_the_private_feed_carries_no_cdn_cache_fields_links_or_referers() -> None:
    """A CDN obeys CDN-Cache-Control / Surrogate-Control (nginx X-Accel-Expires) over
    Cache-Control (mark_variant drops them from paid answers for that reason): an origin that
    lets its CDN keep the public feed for 10 minutes would make the CDN keep each listener's
    private feed too, served after the capability is revoked or rotated. A WebSub Link (hub,
    self) would hand the private URL to a hub, or move the subscriber to the public feed; a
    browser showing the feed would send its URL as Referer."""
    origin = (
        (b"Content-Type", b"application/rss+xml"),
        (b"Cache-Control", b"public, s-maxage=600, max-age=60"),
        *CDN_FIELDS,
        *WEBSUB_LINKS,
        (b"Referrer-Policy", b"unsafe-url"),
    )
    for fields in (feeds.private_fields(origin, 10), feeds.private_head(origin)):
        names = {name.lower() for name, _ in fields}
        assert names.isdisjoint({name.lower() for name, _ in (*CDN_FIELDS, *WEBSUB_LINKS)})
        assert get(fields, "Cache-Control") == "private, max-age=60"
        assert get(fields, "Referrer-Policy") == "no-referrer"
        assert feeds.private_head(fields) == fields  # idempotent
    # What passes unrewritten (HEAD, 304, an error) keeps its length and coding.
    head = feeds.private_head(
        ((b"Content-Length", b"5"), (b"Content-Encoding", b"gzip"), (b"Cache-Control", b"no-store"))
    )
    assert head == (
        (b"Content-Length", b"5"),
        (b"Content-Encoding", b"gzip"),
        (b"Cache-Control", b"no-store"),
        (b"Referrer-Policy", b"no-referrer"),
    )


def test_a_gzip_feed_of_several_members_is_read_whole_and_bounded() -> None:
    """RFC 1952: a gzip body may be several members in a row (`cat a.gz b.gz`, a server that
    flushes members): all are the feed, not the first alone; zero padding after them is
    nothing; anything else after the end, or a stream cut short, is refused; the bound holds
    over all the members together."""
    whole = FEED_XML * 3
    members = b"".join(gzip.compress(part) for part in (whole[:100], whole[100:250], whole[250:]))
    assert feeds.decoded(members, "gzip") == whole
    assert feeds.decoded(members + bytes(16), "x-gzip") == whole
    assert feeds.decoded(gzip.compress(b"") + gzip.compress(b"x"), "gzip") == b"x"
    for body, coding, message in (
        (members + b"junk", "gzip", "broken"),
        (members[:-4], "gzip", "cut short"),
        (zlib.compress(FEED_XML) + b"junk", "deflate", "data after its end"),
        (zlib.compress(FEED_XML)[:-2], "deflate", "cut short"),
    ):
        with pytest.raises(feeds.FeedError, match=message):
            feeds.decoded(body, coding)
    assert feeds.decoded(zlib.compress(FEED_XML), "deflate") == FEED_XML
    half = b"<" * (feeds.MAX_FEED_BYTES // 2 + 1)
    with pytest.raises(feeds.FeedError, match="too large"):
        feeds.decoded(gzip.compress(half) + gzip.compress(half), "gzip")
    exact = b"<" * (feeds.MAX_FEED_BYTES // 2)
    assert len(feeds.decoded(gzip.compress(exact) * 2, "gzip")) == feeds.MAX_FEED_BYTES


def test_feed_rewrites_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rewrite holds a decoded feed and its parsed tree: at most REWRITES_AT_ONCE run in
    the process, whatever thread or door asks; one that cannot get its turn is a FeedError
    (the door's 502), and a rewrite that failed gives its turn back."""
    note = {
        "private_base": "http://podcast.example/.l402/feed/" + "c" * 22,
        "public_hosts": ["podcast.example"],
        "self_url": "http://podcast.example/.l402/feed/" + "c" * 22 + "/feed.xml",
    }
    monkeypatch.setattr(feeds, "REWRITE_WAIT_SECONDS", 0.01)
    for _ in range(feeds.REWRITES_AT_ONCE + 2):  # failures give their turn back
        with pytest.raises(feeds.FeedError, match="not XML"):
            feeds.private_body(b"not xml", None, note)
    taken = 0
    try:
        while feeds._REWRITES.acquire(blocking=False):  # every turn, as running rewrites hold
            taken += 1
        assert taken == feeds.REWRITES_AT_ONCE
        with pytest.raises(feeds.FeedError, match="too many private feeds"):
            feeds.private_body(FEED_XML, None, note)
    finally:
        for _ in range(taken):
            feeds._REWRITES.release()
    assert b"/.l402/feed/" in feeds.private_body(FEED_XML, None, note)


async def test_the_mitmproxy_door_makes_the_feed_private(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    async with server_on(tmp_path, rules) as addon:
        fake = FakeFeeds()
        assert addon.store is not None
        addon.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        addon.store.feed_for = fake.feed_for  # type: ignore[method-assign]
        token = Site(addon.engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)

        async def through(body: bytes, status: int = 200, method: str = "GET") -> Any:
            flow = flow_for(f"/.l402/feed/{row.capability}/feed.xml", Host=HOST)
            flow.request.method = method
            await addon.request(flow)
            assert flow.response is None and flow.request.path == "/feed.xml"
            assert "authorization" not in flow.request.headers
            flow.response = http_response(status, body)
            await addon.response(flow)
            return flow.response

        private = await through(FEED_XML)
        assert private.status_code == 200
        assert f"/.l402/feed/{row.capability}/episodes/ep1.mp3?x=1".encode() in private.content
        assert private.headers["Content-Length"] == str(len(private.raw_content))
        assert private.headers["Cache-Control"] == "private"
        broken = await through(b"<html>not a feed")
        assert broken.status_code == 502 and broken.text.startswith("The private feed could not")
        assert (await through(b"gone", 404)).content == b"gone"
        assert (await through(FEED_XML, 200, "HEAD")).content == FEED_XML  # unchanged


async def test_the_mitmproxy_door_serves_no_feed_when_it_hides_the_players_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In reverse mode without keep_host_header mitmproxy puts the origin's name into Host
    before the paywall sees a request: feed URLs would name the origin. Private feeds are off
    then (one warning says why), everything else works; keep_host_header turns them on."""
    from mitmproxy.test import taddons

    from l402proxy.doors.mitmproxy import L402Server

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    server = L402Server()
    with taddons.context(server) as tctx:
        tctx.options.add_option("keep_host_header", bool, False, "as mitmproxy's")
        tctx.configure(
            server,
            l402_rules=str(rules),
            l402_store=str(tmp_path / "server.sqlite"),
            l402_dev_ledger=str(tmp_path / "devledger.sqlite"),
            mode=["reverse:http://127.0.0.1:9"],
        )
        await server.running()
        try:
            assert not server.misconfigured
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(
                "service 'podcast' (line 3) sells a private feed (feed:), but in reverse mode"
                in line
                and "add --set keep_host_header=true" in line
                for line in warnings
            ), warnings
            site = Site(server.engine, FakeFeeds(), tmp_path, Clock())
            assert server.engine.store is not None
            server.engine.store.feed_for = site.feeds.feed_for  # type: ignore[method-assign]
            server.engine.store.feed_access = site.feeds.feed_access  # type: ignore[method-assign]
            token = site.token("bonus")
            cap = await site.access(token, "bonus", "/bonus.xml")
            assert is_404(await site.get(f"/.l402/feed/{cap}/bonus/b.mp3"))
            minted = await site.post(feeds.MINT_PATH, Authorization=token.authorization)
            assert minted.status == 404 and site.feeds.counter == 1  # nothing new minted
            tctx.configure(server, keep_host_header=True)
            assert isinstance(await site.get(f"/.l402/feed/{cap}/bonus/b.mp3"), Forward)
            minted = await site.post(feeds.MINT_PATH, Authorization=token.authorization)
            assert minted.status == 200
        finally:
            await server.done()


def http_response(status: int, body: bytes) -> Any:
    from mitmproxy.test import tutils

    response = tutils.tresp(status_code=status, content=body)
    response.headers["Content-Type"] = "application/rss+xml"
    return response


async def test_the_asgi_door_makes_the_feed_private_and_forwards_the_inner_path(
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    origin = Origin(
        Reply(
            200,
            (
                (b"content-type", b"application/rss+xml"),
                (b"content-length", b"9999"),
                (b"x-usage", b"3"),  # an origin's usage report never reaches a client
            ),
            (FEED_XML[:100], FEED_XML[100:]),
        )
    )
    mw = asgi_door.L402Middleware(
        origin,
        rules=str(rules),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    try:
        assert await mw.open() is None
        fake = FakeFeeds()
        engine = mw.engine
        assert engine.store is not None
        engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)
        base = f"/.l402/feed/{row.capability}"
        answer = await call(mw, f"{base}/feed.xml", headers=[(b"accept-encoding", b"gzip")])
        assert answer.status == 200
        assert f"http://{HOST}{base}/episodes/ep1.mp3?x=1".encode() in answer.body
        assert answer.get("content-length") == str(len(answer.body))
        assert answer.get("cache-control") == "private" and answer.get("x-usage") is None
        seen = origin.seen
        assert (seen["path"], seen["raw_path"]) == ("/feed.xml", b"/feed.xml")
        assert all(k not in (b"authorization", b"accept-encoding") for k, _ in seen["headers"])
        # An enclosure: the inner path (paid rewrite).
        origin.reply = Reply(200, ((b"content-type", b"audio/mpeg"),), (b"AD-FREE",))
        episode = await call(mw, f"{base}/episodes/ep1.mp3", headers=[(b"range", b"bytes=0-1")])
        assert episode.status == 200 and episode.body == b"AD-FREE"
        assert (origin.seen["path"], origin.seen["raw_path"]) == (
            "/adfree/ep1.mp3",
            b"/adfree/ep1.mp3",
        )
        assert (b"range", b"bytes=0-1") in origin.seen["headers"]
        # Under a root_path the app gets the inner path below the same root_path, and the
        # inner target's other reading (/app/episodes/...) is judged as for any request: the
        # rules price it otherwise, so it is refused, never forwarded.
        origin.reply = Reply(200, ((b"content-type", b"application/rss+xml"),), (FEED_XML,))
        rooted = await call(mw, f"{base}/feed.xml", root_path="/app")
        assert rooted.status == 200 and b"/.l402/feed/" in rooted.body
        assert (origin.seen["path"], origin.seen["root_path"]) == ("/feed.xml", "/app")
        count = len(origin.scopes)
        assert (await call(mw, f"{base}/episodes/ep1.mp3", root_path="/app")).status == 404
        assert len(origin.scopes) == count
        # What is no feed cannot be made private: a 502 saying why.
        origin.reply = Reply(200, ((b"content-type", b"text/html"),), (b"<html/>",))
        broken = await call(mw, f"{base}/feed.xml")
        assert broken.status == 502 and b"could not be made" in broken.body
    finally:
        await mw.close()


async def test_the_asgi_door_sends_no_cdn_cache_fields_or_links_with_a_free_feed(
    tmp_path: Path,
) -> None:
    """The same at a door, for the usual case: the feed path is unpriced (no rule covers it),
    so no paid marking runs after the rewrite."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    origin = Origin(
        Reply(
            200,
            (
                (b"content-type", b"application/rss+xml"),
                (b"cache-control", b"public, max-age=60"),
                *((name.lower(), value) for name, value in (*CDN_FIELDS, *WEBSUB_LINKS)),
            ),
            (FEED_XML,),
        )
    )
    mw = asgi_door.L402Middleware(
        origin,
        rules=str(rules),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
    )
    try:
        assert await mw.open() is None
        fake = FakeFeeds()
        assert mw.engine.store is not None
        mw.engine.store.feed_access = fake.feed_access  # type: ignore[method-assign]
        token = Site(mw.engine, fake, tmp_path, Clock()).token("podcast")
        row = await fake.feed_for(token.token_id, "podcast", "/feed.xml", token.credential, None, 0)
        answer = await call(mw, f"/.l402/feed/{row.capability}/feed.xml")
        assert answer.status == 200 and answer.get("cache-control") == "private, max-age=60"
        assert answer.get("referrer-policy") == "no-referrer"
        for name, _ in (*CDN_FIELDS, *WEBSUB_LINKS):
            assert answer.get(name.decode().lower()) is None, name
    finally:
        await mw.close()


def test_the_paywall_page_offers_the_feed_it_is_given() -> None:
    page = paywall.render_page(
        paywall.PageFacts(
            service="podcast",
            description="Ad-free episode",
            price_sat=21,
            valid_for=3600,
            scope="/episodes/",
            bolt11="lnbc1",
            macaroon="AgEB",
            expires_at=2000.0,
            now=1000.0,
        )
    )
    assert '<section id="subscribe" class="subscribe" hidden>' in page
    assert "<h2>Subscribe ad-free</h2>" in page
    assert '<input id="feed-url" class="feed-url" type="text" readonly' in page
    assert 'id="copy-feed"' in page
    assert "answer.body.feed_url" in page and "subscribe(feed)" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing external
