"""The nginx door without nginx: the auth service as an ASGI app (requests shaped as the printed
config sends them), the config text, and the two CLI commands' refusals."""

import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import EllipsisType

import httpx
import pytest

from l402proxy import cli
from l402proxy.doors import nginx
from l402proxy.engine import Forward, Paywall, Request
from l402proxy.engine.answers import Answer
from l402proxy.l402.headers import parse_challenges
from l402proxy.launch import free_port
from l402proxy.lightning import DevLedger

RULES = """
services:
  - name: podcast
    description: "Ad-free episode"
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
    paid:
      rewrite_path: ["^/episodes/(.*)$", "/adfree/\\\\1"]
      set_headers: {X-L402-Tier: premium, X-Ad-Free: "1"}
  - name: bonus
    match: {path: "/bonus/*"}
    price_sat: 100
  - name: adfree
    match: {path: "/adfree/*"}
    mode: deny
"""
CARRIES = f"{nginx.CONFIG_VERSION} x-l402-tier x-ad-free"
HTML = "text/html,application/xhtml+xml,*/*;q=0.8"


@dataclasses.dataclass
class Door:
    service: nginx.AuthService
    engine: Paywall
    ledger: Path
    # The X-L402-Config the printed config for these rules sends.
    config: str = CARRIES

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.service), base_url="http://auth"
        )

    async def call(
        self,
        step: str,
        uri: str,
        *,
        method: str = "GET",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        config: str | EllipsisType | None = ...,
    ) -> httpx.Response:
        """One call of the printed config: the auth subrequest (always a GET, no body), the
        answer step or an endpoint (the client's method and body), with nginx's headers
        (X-L402-Config: this door's unless `config` says otherwise; None: none)."""
        if isinstance(config, EllipsisType):
            config = self.config
        sent = [
            ("X-Original-Method", method),
            ("X-Original-URI", uri),
            ("X-Original-Host", "podcast.example"),
            ("X-Original-Scheme", "http"),
            ("X-Original-Client", "127.0.0.1 50000"),
            *(() if config is None else (("X-L402-Config", config),)),
            ("Host", "podcast.example"),
            *headers,
        ]
        async with self.client() as client:
            return await client.request(
                "GET" if step == "auth" else method,
                f"/{step}",
                headers=sent,
                content=body if step != "auth" else b"",
            )

    async def nginx(
        self, uri: str, *, method: str = "GET", headers: Sequence[tuple[str, str]] = ()
    ) -> httpx.Response:
        """What the printed config does with a request the service answers: the auth step,
        then the answer step with the id of the answer it holds."""
        verdict = await self.call("auth", uri, method=method, headers=headers)
        assert verdict.status_code == 401 and header(verdict, "X-L402-Route") == "answer"
        held = header(verdict, "X-L402-Answer")
        extra = [("X-L402-Answer", held)] if held else []
        return await self.call("answer", uri, method=method, headers=[*headers, *extra])

    async def invoices(self) -> int:
        ledger = DevLedger(self.ledger)
        try:
            return len(await ledger.list_invoices())
        finally:
            await ledger.close()

    async def buy(self, uri: str = "/episodes/ep1.mp3") -> str:
        """An Authorization value for the service pricing `uri`, paid with the dev ledger."""
        answer = await self.call("answer", uri, headers=[("Accept-Authenticate", "L402")])
        assert answer.status_code == 402, answer.text
        challenge = parse_challenges(answer.headers.get_list("WWW-Authenticate"))[0]
        ledger = DevLedger(self.ledger)
        try:
            preimage = (await ledger.pay("listener", challenge.invoice, 0)).preimage
        finally:
            await ledger.close()
        return f"L402 {challenge.macaroon}:{preimage.hex()}"


@contextlib.asynccontextmanager
async def open_door(
    tmp_path: Path, rules_text: str = RULES, config: str = CARRIES
) -> AsyncIterator[Door]:
    """The auth service on an engine as serve-auth makes it, with these rules (and the
    X-L402-Config of the config printed for them)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    ledger = tmp_path / "devledger.sqlite"
    engine = nginx.make_engine(str(rules), "dev", str(tmp_path / "server.sqlite"), str(ledger))
    await engine.open()
    try:
        yield Door(nginx.AuthService(engine), engine, ledger, config)
    finally:
        await engine.close()


@pytest.fixture
async def door(tmp_path: Path) -> AsyncIterator[Door]:
    async with open_door(tmp_path) as opened:
        yield opened


def header(response: httpx.Response, name: str) -> str | None:
    return response.headers.get(name)


# -- the auth step ------------------------------------------------------------------------------


async def test_a_plain_forward_carries_the_raw_target_and_what_is_left_of_the_credentials(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Request] = []
    judge = door.engine.handle

    async def spy(request: Request) -> object:
        seen.append(request)
        return await judge(request)

    monkeypatch.setattr(door.engine, "handle", spy)
    response = await door.call(
        "auth",
        "/free/caf%C3%A9.txt?x=%2F..",
        headers=[
            ("Authorization", "L402 bogus:00"),
            ("Authorization", "Basic dTpw"),
            ("Cookie", "a=b; L402_bonus=x:00"),
            ("Cookie", "c=d"),
            ("X-L402-Tier", "premium"),
            ("x-ad-free", "1"),
        ],
    )
    assert response.status_code == 200 and response.content == b""
    assert header(response, "X-L402-Target") == "/free/caf%C3%A9.txt?x=%2F.."
    assert header(response, "X-L402-Authorization") == "Basic dTpw"
    assert header(response, "X-L402-Cookie") == "a=b; c=d"
    # The client's own copies of the headers a paid variant sets: nginx sends none.
    assert header(response, "X-L402-Set-1") is None and header(response, "X-L402-Set-2") is None
    assert header(response, "X-L402-Route") is None
    # What nginx adds to each call never reaches the judgement.
    (request,) = seen
    names = {name.lower() for name, _ in request.fields}
    assert not names & nginx.CONTROL_HEADERS
    assert request.target == "/free/caf%C3%A9.txt?x=%2F.." and request.host == "podcast.example"
    assert request.client == ("127.0.0.1", 50000) and not request.secure


async def test_a_request_without_credentials_of_ours_keeps_its_own_headers(door: Door) -> None:
    response = await door.call("auth", "/feed.xml", headers=[("Cookie", "theme=dark")])
    assert response.status_code == 200
    assert header(response, "X-L402-Cookie") == "theme=dark"
    assert header(response, "X-L402-Authorization") is None


async def test_a_challenge_is_decided_once_and_answered_as_decided(door: Door) -> None:
    before = await door.invoices()
    verdict = await door.call("auth", "/bonus/b1.mp3")
    assert verdict.status_code == 401 and verdict.content == b""
    assert header(verdict, "X-L402-Route") == "answer"
    assert "WWW-Authenticate" not in verdict.headers  # auth_request would copy it
    held = header(verdict, "X-L402-Answer")
    assert held is not None and len(held) == 32
    assert await door.invoices() == before + 1  # the 402's one invoice

    answer = await door.call("answer", "/bonus/b1.mp3", headers=[("X-L402-Answer", held)])
    assert await door.invoices() == before + 1
    assert answer.status_code == 402
    assert [line.split()[0] for line in answer.headers.get_list("WWW-Authenticate")] == [
        "LSAT",
        "L402",
    ]
    # The engine's answer as it is: the same header names in the same order.
    direct = await door.engine.handle(
        Request(method="GET", target="/bonus/b1.mp3", host="podcast.example", fields=())
    )
    assert isinstance(direct, Answer)
    assert [name.lower() for name, _ in answer.headers.raw] == [
        name.lower() for name, _ in direct.headers
    ]
    assert answer.json()["service"] == "bonus"
    # Held once: asked again (or with an id nobody holds), the answer step judges anew.
    assert len(door.service.held) == 0
    again = await door.call("answer", "/bonus/b1.mp3", headers=[("X-L402-Answer", held)])
    assert again.status_code == 402 and again.json()["invoice"] != answer.json()["invoice"]


async def test_a_request_counts_once_against_the_rules_limits(tmp_path: Path) -> None:
    """The auth step's judgement is the answer: a per-IP rate limit sees one request, not
    two (a judgement without the invoice, then one with it, spent the limit twice as fast)."""
    limited = RULES.replace(
        '    match: {path: "/bonus/*"}\n',
        '    match: {path: "/bonus/*"}\n    rate_limits: [{requests: 2, per: 1m}]\n',
    )
    async with open_door(tmp_path, limited) as door:
        statuses = [(await door.nginx("/bonus/b1.mp3")).status_code for _ in range(3)]
    assert statuses == [402, 402, 429]


def test_held_answers_are_bounded_in_time_and_bytes() -> None:
    held = nginx.HeldAnswers(ttl=60, max_bytes=10_000)
    small = Answer.make(402, b"x" * 1000)
    keys = [held.hold(small) for _ in range(20)]
    # The oldest went first to stay under the byte bound.
    assert held.size <= 10_000 and 0 < len(held) < 20
    assert held.take(keys[0]) is None and held.take(keys[-1]) is small
    assert held.take(keys[-1]) is None  # once
    assert held.take(b"") is None and held.take(None) is None
    expired = nginx.HeldAnswers(ttl=0)
    assert expired.take(expired.hold(small)) is None and expired.size == 0


async def test_head_answers_keep_the_length_and_carry_no_body(door: Door) -> None:
    answer = await door.call("answer", "/bonus/b1.mp3", method="HEAD")
    assert answer.status_code == 402 and answer.content == b""
    assert int(answer.headers["Content-Length"]) > 100


async def test_a_paid_request_is_routed_with_the_rewrite_and_the_headers_it_bought(
    door: Door,
) -> None:
    token = await door.buy()
    response = await door.call(
        "auth",
        "/episodes/ep1.mp3?t=1",
        headers=[
            ("Authorization", token),
            ("X-Ad-Free", "0"),
            ("Cookie", "L402_podcast=x:00; a=b"),
        ],
    )
    assert response.status_code == 401
    assert header(response, "X-L402-Route") == "paid"
    assert header(response, "X-L402-Target") == "/adfree/ep1.mp3?t=1"
    assert header(response, "X-L402-Set-1") == "premium"
    assert header(response, "X-L402-Set-2") == "1"
    assert header(response, "X-L402-Authorization") is None
    assert header(response, "X-L402-Cookie") == "a=b"
    assert header(response, "X-L402-Vary") == "Authorization, Cookie, Accept-Authenticate"


async def test_free_pages_are_routed_to_be_marked_and_offered_the_upgrade(door: Door) -> None:
    offer = await door.call("auth", "/episodes/ep1.mp3", headers=[("Accept", HTML)])
    assert offer.status_code == 401 and header(offer, "X-L402-Route") == "offer"
    assert header(offer, "X-L402-Vary") == "Authorization, Cookie, Accept-Authenticate, Accept"
    banner = header(offer, "X-L402-Banner")
    assert banner is not None and "/.l402/pay?path=%2Fepisodes%2Fep1.mp3" in banner
    # HEAD has no page to put an offer into; a player gets the free variant, marked.
    for method, accept in (("HEAD", HTML), ("GET", "*/*")):
        free = await door.call(
            "auth", "/episodes/ep1.mp3", method=method, headers=[("Accept", accept)]
        )
        assert header(free, "X-L402-Route") == "free" and header(free, "X-L402-Banner") is None
    # A stale cookie of ours on the free variant: the browser is told to forget it.
    stale = await door.call(
        "auth", "/episodes/ep1.mp3", headers=[("Cookie", "L402_podcast=AgEB:00")]
    )
    assert header(stale, "X-L402-Route") == "free"
    clear = [header(stale, f"X-L402-Clear-Cookie-{n}") for n in (1, 2)]
    assert all(value and value.startswith("L402_podcast=;") for value in clear), clear
    assert header(stale, "X-L402-Cookie") is None


async def test_answers_the_engine_gives_itself_go_to_the_answer_step(door: Door) -> None:
    assert (await door.nginx("/adfree/ep1.mp3")).status_code == 404
    refused = await door.nginx("/free/..%2Fbonus/x.mp3")
    assert refused.status_code == 400 and refused.text.startswith("ambiguous request path")
    # A /.l402/ target that reached `location /` (nginx reads paths its own way): the answer
    # step runs the endpoint, with the body only it gets.
    verdict = await door.call("auth", "/.l402/unlock", method="POST")
    assert header(verdict, "X-L402-Route") == "answer" and not header(verdict, "X-L402-Answer")
    unlock = await door.call(
        "answer",
        "/.l402/unlock",
        method="POST",
        headers=[("Content-Type", "application/json")],
        body=b'{"macaroon": 5}',
    )
    assert unlock.status_code == 400 and "macaroon" in unlock.json()["message"]


CREDENTIAL_RULES = """
services:
  - name: inside
    match: {path: "/inside/*"}
    price_sat: 3
    paid:
      set_headers: {X-A: "1", Authorization: "Bearer inside", cookie: "tier=premium"}
"""


async def test_a_paid_variants_authorization_and_cookie_go_in_their_own_lines(
    tmp_path: Path,
) -> None:
    """The config sends Authorization and Cookie from their own lines, with what the engine
    made of them: a paid variant's value goes there, not into a numbered slot as well (nginx
    sent both lines: the header twice)."""
    async with open_door(tmp_path, CREDENTIAL_RULES, "3 x-a authorization cookie") as door:
        token = await door.buy("/inside/x")
        paid = await door.call(
            "auth", "/inside/x", headers=[("Authorization", token), ("Cookie", "theme=dark")]
        )
        assert paid.status_code == 401 and header(paid, "X-L402-Route") == "paid"
        assert header(paid, "X-L402-Authorization") == "Bearer inside"
        assert header(paid, "X-L402-Cookie") == "tier=premium"
        assert header(paid, "X-L402-Set-1") == "1"  # X-A: the only slot
        assert header(paid, "X-L402-Set-2") is None and header(paid, "X-L402-Set-3") is None
        # Everyone else's go nowhere: the paywall alone sets them for the origin.
        free = await door.call(
            "auth",
            "/feed.xml",
            headers=[("Authorization", "Bearer mine"), ("Cookie", "tier=premium")],
        )
        assert free.status_code == 200
        assert (
            header(free, "X-L402-Authorization") is None and header(free, "X-L402-Cookie") is None
        )
    text = render("X-A", "Authorization", "cookie")
    assert f'X-L402-Config "{nginx.CONFIG_VERSION} x-a authorization cookie"' in text
    # One line each per location to the origin, and no numbered slot for them.
    assert text.count("proxy_set_header Authorization ") == 4
    assert text.count("proxy_set_header Cookie ") == 4 and "proxy_set_header cookie" not in text
    assert "$l402_set_2" not in text
    assert "proxy_set_header X-A $l402_set_1;" in text


async def test_rerooting_headers_are_cleared_by_nginx_so_the_request_is_forwarded(
    door: Door,
) -> None:
    """The engine strips Daphne-Root-Path, X-Forwarded-Prefix, ... from every forwarded
    request; the config clears them toward the origin, so that change needs no carrying (it
    was a 503 for the request)."""
    rerooting = [("Daphne-Root-Path", "/bonus"), ("X-Forwarded-Prefix", "/bonus")]
    free = await door.call("auth", "/feed.xml", headers=rerooting)
    assert free.status_code == 200 and header(free, "X-L402-Route") is None
    token = await door.buy()
    paid = await door.call(
        "auth", "/episodes/ep1.mp3", headers=[("Authorization", token), *rerooting]
    )
    assert paid.status_code == 401 and header(paid, "X-L402-Route") == "paid"
    text = render("X-L402-Tier", "X-Forwarded-Prefix")
    for name in ("Daphne-Root-Path", "X-Script-Name", "Script-Name", "X-Original-Url"):
        assert text.count(f'proxy_set_header {name} "";') == 4, name
    # One a paid variant sets goes in its slot (an empty one sends none), not cleared twice.
    assert 'proxy_set_header X-Forwarded-Prefix "";' not in text
    assert text.count("proxy_set_header X-Forwarded-Prefix $l402_set_2;") == 4


# -- fail closed --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        "2",  # made before the rules set any header
        "3 x-l402-tier",  # made before X-Ad-Free was added
        "1 x-l402-tier x-ad-free",  # another version of the config (it cleared no
        # re-rooting headers: the service must not rely on it)
        "",  # not a config this l402proxy wrote
        None,  # not our config at all
    ],
)
async def test_a_config_that_cannot_carry_what_the_rules_need_gets_503_for_every_request(
    door: Door, config: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="l402proxy.doors.nginx")
    for uri in ("/feed.xml", "/episodes/ep1.mp3", "/bonus/b1.mp3"):
        verdict = await door.call("auth", uri, config=config)
        assert verdict.status_code == 401 and header(verdict, "X-L402-Route") == "answer"
        answer = await door.call("answer", uri, config=config)
        assert answer.status_code == 503, answer.text
        assert answer.text.count("\n") == 1 and "l402proxy nginx-config" in answer.text
    endpoint = await door.call("endpoint", "/.l402/pay?path=/bonus/x", config=config)
    assert endpoint.status_code == 503
    # One warning for the operator, not one per request.
    warnings = [r for r in caplog.records if "answering 503" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_the_missing_header_is_named(door: Door) -> None:
    answer = await door.call("answer", "/feed.xml", config="3 x-l402-tier")
    assert "x-ad-free" in answer.text


async def test_a_header_change_nginx_cannot_carry_fails_closed(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the engine ever change a request header beyond Authorization, Cookie and the
    set_headers names, nginx would send the client's copy: nothing is forwarded then."""

    async def rewrites_another_header(request: Request) -> Forward:
        return Forward((*request.fields, (b"X-Other", b"1")))

    monkeypatch.setattr(door.engine, "handle", rewrites_another_header)
    verdict = await door.call("auth", "/feed.xml")
    assert verdict.status_code == 401 and header(verdict, "X-L402-Route") == "answer"
    answer = await door.call("answer", "/feed.xml")
    assert answer.status_code == 503 and "x-other" in answer.text

    async def drops_upgrade(request: Request) -> Forward:
        return Forward(tuple(f for f in request.fields if f[0].lower() != b"upgrade"))

    async def elsewhere(request: Request) -> Forward:
        return Forward(request.fields, path="@evil.example/x")

    # The target goes right after the origin's address in proxy_pass: only a path may.
    monkeypatch.setattr(door.engine, "handle", elsewhere)
    assert header(await door.call("auth", "/feed.xml"), "X-L402-Route") == "answer"
    assert (await door.call("answer", "/feed.xml")).status_code == 503

    # nginx never takes Upgrade from the client (only a WebSocket one, as the engine does).
    monkeypatch.setattr(door.engine, "handle", drops_upgrade)
    allowed = await door.call("auth", "/feed.xml", headers=[("Upgrade", "h2c")])
    assert allowed.status_code == 200


async def test_a_refused_request_is_logged_once_as_that_request_only(
    door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    """A request nginx cannot send as the paywall decided (here: a client's underscore
    spelling of a header the rules set, which the engine drops and nginx would pass) is
    refused alone: good requests in between do not make it log again, and the log does not
    say every request is refused."""
    caplog.set_level(logging.WARNING, logger="l402proxy.doors.nginx")
    for _ in range(3):
        refused = await door.nginx("/feed.xml", headers=[("X_L402_Tier", "premium")])
        assert refused.status_code == 503 and "x_l402_tier" in refused.text
        assert (await door.call("auth", "/feed.xml")).status_code == 200
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "this request only" in warnings[0] and "every request" not in warnings[0]
    assert "x_l402_tier" in warnings[0]


async def test_logged_refusals_of_single_requests_are_bounded(
    door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    """A client can vary the reason (header spellings): the log holds a bounded number."""
    caplog.set_level(logging.WARNING, logger="l402proxy.doors.nginx")
    for number in range(nginx.REFUSAL_LOG_LIMIT + 20):
        response = door.service.refuse_request(f"reason {number}", "GET")
        assert response.status == 503
    assert len(caplog.records) == nginx.REFUSAL_LOG_LIMIT + 1
    assert "further ones are not" in caplog.records[-1].getMessage()


async def test_a_stale_config_is_logged_once_while_another_config_works(
    door: Door, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nginx configs asking one service, one of them stale: the good one's requests do
    not make the stale one's problem log again on each request; once fixed, a new break is
    logged again."""
    caplog.set_level(logging.WARNING, logger="l402proxy.doors.nginx")
    stale = "3 x-l402-tier"
    for _ in range(3):
        assert (await door.call("answer", "/bonus/b1.mp3", config=stale)).status_code == 503
        assert (await door.call("auth", "/feed.xml")).status_code == 200
    assert len(caplog.records) == 1
    assert "answering 503 to every request" in caplog.records[0].getMessage()
    # The stale config works again (its rules stopped needing X-Ad-Free), then breaks again.
    door.config = stale
    rules = door.engine.rules
    door.engine.rules = None
    assert (await door.call("auth", "/feed.xml")).status_code == 200
    door.engine.rules = rules
    assert (await door.call("answer", "/feed.xml")).status_code == 503
    assert len(caplog.records) == 2


async def test_a_header_value_no_answer_can_carry_is_refused_not_dropped(door: Door) -> None:
    """nginx takes a client's header with a control character; the verdict cannot carry it
    back (uvicorn refuses to write it): a 400, rather than a 500 with a traceback per request."""
    for uri in ("/feed.xml", "/episodes/ep1.mp3"):
        verdict = await door.call("auth", uri, headers=[("Cookie", "a=\x01")])
        assert verdict.status_code == 401 and header(verdict, "X-L402-Route") == "answer"
        answer = await door.call("answer", uri, headers=[("Cookie", "a=\x01")])
        assert answer.status_code == 400 and "control character" in answer.text


async def test_a_forward_at_the_answer_step_asks_the_client_to_come_again(door: Door) -> None:
    """The rules changed between the two judgements: never forwarded from here."""
    answer = await door.call("answer", "/feed.xml")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"


async def test_an_error_in_the_judgement_forwards_nothing(
    door: Door, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: Request) -> Forward:
        raise RuntimeError("boom")

    monkeypatch.setattr(door.engine, "handle", broken)
    verdict = await door.call("auth", "/feed.xml")
    assert verdict.status_code == 401 and header(verdict, "X-L402-Route") == "answer"
    assert (await door.call("answer", "/feed.xml")).status_code == 503


# -- the /.l402/ endpoints and the service's own paths -----------------------------------------


async def test_endpoints_are_answered_by_the_engine_with_the_body(door: Door) -> None:
    page = await door.call("endpoint", "/.l402/pay?path=/bonus/x", headers=[("Accept", HTML)])
    assert page.status_code == 402 and "<svg" in page.text
    unlock = await door.call(
        "endpoint",
        "/.l402/unlock",
        method="POST",
        headers=[("Content-Type", "application/json")],
        body=b'{"macaroon": 5}',
    )
    # The engine read the body: it names what is wrong in it.
    assert unlock.status_code == 400 and "macaroon" in unlock.json()["message"]
    too_big = await door.call(
        "endpoint",
        "/.l402/unlock",
        method="POST",
        headers=[("Content-Type", "application/json")],
        body=b" " * (2 * nginx.MAX_BODY),
    )
    assert too_big.status_code == 413
    # nginx's /.l402/ location reads a path as ours that the engine does not: not found.
    elsewhere = await door.call("endpoint", "/feed.xml")
    assert elsewhere.status_code == 404


async def test_the_service_answers_only_its_own_paths(door: Door) -> None:
    async with door.client() as client:
        info = await client.get("/config")
        assert info.json() == {
            "config_version": nginx.CONFIG_VERSION,
            "set_headers": ["X-L402-Tier", "X-Ad-Free"],
        }
        assert (await client.get("/elsewhere")).status_code == 404
        # A call without nginx's headers is no request to judge (auth_request makes it a 500).
        assert (await client.get("/auth")).status_code == 400
        assert (await client.post("/answer")).status_code == 400


async def test_the_service_socket_sends_answers_without_waiting_for_an_ack() -> None:
    """The service writes an answer's headers, then its body: without TCP_NODELAY on the
    accepted connections (asyncio sets it only on sockets made with IPPROTO_TCP), the body
    waited ~40 ms for nginx's delayed ACK, on every 402."""
    sock = nginx.bind("127.0.0.1", 0)
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            nodelay.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    # As uvicorn serves the socket serve-auth binds.
    server = await asyncio.get_running_loop().create_server(Accept, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(nodelay, 10) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_lifespan_events_are_acknowledged(door: Door) -> None:
    sent: list[str] = []
    events = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, str]:
        return next(events)

    async def send(message: object) -> None:
        assert isinstance(message, dict)
        sent.append(message["type"])

    await door.service({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# -- the config ---------------------------------------------------------------------------------


def render(
    *names: str, upstream: str = "http://127.0.0.1:8080", listen: str = "80", name: str = "l402"
) -> str:
    return nginx.render_config(
        auth=("127.0.0.1", 8402),
        origin=nginx.parse_origin(upstream),
        listen=nginx.parse_nginx_listen(listen),
        set_headers=list(names),
        name=name,
    )


def test_the_config_carries_each_header_the_rules_set_in_numbered_slots() -> None:
    text = render("X-L402-Tier", "X-Ad-Free")
    assert f'proxy_set_header X-L402-Config "{nginx.CONFIG_VERSION} x-l402-tier x-ad-free";' in text
    assert "auth_request_set $l402_set_2 $upstream_http_x_l402_set_2;" in text
    # Every location that sends to the origin overrides them (empty: sent not at all).
    assert text.count("proxy_set_header X-Ad-Free $l402_set_2;") == 4
    assert text.count("proxy_set_header Authorization $l402_authorization;") == 4
    assert "server 127.0.0.1:8080;" in text and "proxy_set_header Host 127.0.0.1:8080;" in text
    assert "listen 80;" in text and "server 127.0.0.1:8402;" in text


def test_the_origin_and_listen_forms() -> None:
    text = render(upstream="https://origin.example", listen="[::1]:8081")
    assert "server origin.example:443;" in text and "proxy_set_header Host origin.example;" in text
    assert "proxy_ssl_server_name on;" in text and "proxy_pass https://l402_origin" in text
    assert "listen [::1]:8081;" in text
    assert "listen 127.0.0.1:80;" in render(listen="127.0.0.1:80")


def test_an_https_origins_certificate_is_checked_in_every_location_that_reaches_it() -> None:
    text = render(upstream="https://origin.example")
    for line in (
        "proxy_ssl_verify on;",
        f"proxy_ssl_verify_depth {nginx.SSL_VERIFY_DEPTH};",
        "proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;",
        "proxy_ssl_name origin.example;",
    ):
        assert text.count(line) == 4, line
    assert "proxy_ssl" not in render(upstream="http://origin.example")
    named = nginx.render_config(
        auth=("127.0.0.1", 8402),
        origin=nginx.parse_origin("https://origin.example"),
        listen="80",
        set_headers=[],
        upstream_ca="/etc/my CA/ca.pem",
    )
    assert named.count('proxy_ssl_trusted_certificate "/etc/my CA/ca.pem";') == 4


@pytest.mark.parametrize(
    ("note", "cache_for", "lifetime"),
    [
        ({"variant": "paid", "reusable_until": None}, b"5", 5),  # a token that never expires
        ({"variant": "paid", "reusable_until": 1000.0 + 3.5}, b"60", 2),  # a second before
        ({"variant": "paid", "reusable_until": 1000.0 + 1.2}, b"60", 0),
        ({"variant": "paid", "reusable_until": 999.0}, b"60", 0),  # expired
        ({"variant": "paid", "reusable_until": None}, b"3600", nginx.MAX_VERDICT_CACHE),
        ({"variant": "paid", "reusable_until": None}, b"0", 0),  # the cache is off
        ({"variant": "paid", "reusable_until": None}, None, 0),  # an older config: no cache
        ({"variant": "paid", "reusable_until": None}, b"soon", 0),
        ({"variant": "paid"}, b"60", 0),  # counted per request (limits), or a free trial
        ({"variant": "paid", "reusable_until": None, "dry_run": "paid"}, b"60", 0),
        (None, b"60", 0),
    ],
)
def test_only_a_lasting_paid_grant_may_be_kept_and_never_past_its_token(
    note: dict | None, cache_for: bytes | None, lifetime: int
) -> None:
    assert nginx.verdict_lifetime(note, cache_for, now=1000.0) == lifetime


def test_the_verdict_cache_is_in_the_auth_step_only_and_keyed_by_the_credential() -> None:
    text = render()
    auth = text.split("location = /.l402/internal/auth {", 1)[1].split("}", 1)[0]
    assert "proxy_cache l402_verdicts;" in auth
    key = re.search(r'proxy_cache_key "([^"]*)";', auth)
    assert key is not None
    for variable in ("$request_method", "$host", "$request_uri", "$http_authorization"):
        assert variable in key.group(1)
    assert "$http_cookie" in key.group(1) and "$http_accept_authenticate" in key.group(1)
    assert text.count("proxy_cache ") == 1 and "proxy_cache_valid" not in text
    assert "proxy_cache_path /run/l402proxy-l402-verdicts " in text
    assert "keys_zone=l402_verdicts:" in text
    assert "proxy_set_header X-L402-Cache-For 1;" in auth
    off = nginx.render_config(
        auth=("127.0.0.1", 8402),
        origin=nginx.parse_origin("http://127.0.0.1:8080"),
        listen="80",
        set_headers=[],
        verdict_cache=0,
    )
    assert "proxy_cache" not in off and "proxy_set_header X-L402-Cache-For 0;" in off


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--verdict-cache", "61"], "--verdict-cache: expected whole seconds from 0"),
        (["--verdict-cache", "-1"], "--verdict-cache: expected whole seconds from 0"),
        (["--verdict-cache-dir", "run/x"], "--verdict-cache-dir: expected an absolute path"),
        (["--verdict-cache-dir", "/run/a b;"], "--verdict-cache-dir: expected an absolute path"),
    ],
)
def test_nginx_config_refuses_a_bad_verdict_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("services:\n  - name: a\n    match: {path: /a/*}\n    price_sat: 1\n")
    code = cli.main(
        ["nginx-config", "--upstream", "http://127.0.0.1:8080", "--rules", str(rules), *args]
    )
    assert code != 0
    assert message in capsys.readouterr().err


def test_the_auth_upstream_sends_both_steps_of_a_request_to_one_instance() -> None:
    """With several serve-auth listed, the answer step must reach the instance holding the
    answer the verdict decided (tests/e2e: two instances, one invoice per 402)."""
    upstream = render().split("upstream l402_auth {", 1)[1].split("}", 1)[0]
    directives = [line.strip() for line in upstream.splitlines()]
    # nginx wants the balancing method before keepalive.
    assert [line for line in directives if line and not line.startswith("#")] == [
        "server 127.0.0.1:8402;",
        "hash $request_id consistent;",
        "keepalive 32;",
    ]


def test_every_name_a_config_defines_starts_with_its_name() -> None:
    """Two printed configs in one nginx: an upstream or map name twice is an error, and a
    variable twice is one variable for both."""
    text = render("X-A", "X-B", name="shop_a")
    defined = re.findall(r"^upstream (\S+) \{", text, re.M)
    defined += re.findall(r"^map \S+ \$(\S+) \{", text, re.M)
    defined += re.findall(r"auth_request_set \$(\S+) ", text)
    defined += re.findall(r"\(\?<(\w+)>", text)  # named captures are variables too
    defined += re.findall(r"location @(\S+) ", text)
    defined += re.findall(r"keys_zone=(\w+):", text)  # shared memory zones are per nginx
    assert len(defined) > 20 and all(name.startswith("shop_a_") for name in defined), defined
    used = set(re.findall(r"\$(\w+)", text))
    nginx_own = {"request_id", "http_upgrade", "http_host", "host", "scheme", "request_method"}
    nginx_own |= {"request_uri", "remote_addr", "remote_port", "upstream_status"}
    nginx_own |= {"http_authorization", "http_cookie", "http_accept_authenticate"}
    assert {v for v in used if not v.startswith(("shop_a_", "upstream_http_"))} == nginx_own
    assert "l402_" not in text.replace("x_l402_", "")


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a b", "a$", "x" * 33])
def test_a_config_name_nginx_cannot_use_is_refused(name: str) -> None:
    with pytest.raises(nginx.ConfigProblem, match="letters, digits and '_'"):
        render(name=name)


@pytest.mark.parametrize(
    "upstream",
    ["ftp://x", "http://", "http://x/path", "http://u:p@x", "http://x:99999", "x:80", "http://a b"],
)
def test_an_origin_that_is_no_plain_url_is_refused(upstream: str) -> None:
    with pytest.raises(nginx.ConfigProblem):
        nginx.parse_origin(upstream)


@pytest.mark.parametrize("listen", ["", "x", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "a:b"])
def test_a_listen_address_that_is_no_host_and_port_is_refused(listen: str) -> None:
    with pytest.raises(nginx.ConfigProblem):
        nginx.parse_listen(listen)


def test_a_header_name_nginx_cannot_take_as_written_is_refused() -> None:
    with pytest.raises(nginx.ConfigProblem, match="cannot be written"):
        render("X-Weird$Name")


# -- the commands -------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def test_nginx_config_from_the_rules_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "nginx-config", "--upstream", "http://127.0.0.1:8080", "--rules",
        str(write(tmp_path, RULES)),
    )  # fmt: skip
    assert code == 0, err
    assert "proxy_set_header X-L402-Tier $l402_set_1;" in out and out.endswith("}\n")


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--upstream", "nope"], 2, "--upstream: "),
        (["--upstream", "http://x", "--auth", "x"], 2, "--auth: "),
        (["--upstream", "http://x", "--listen", "x:y"], 2, "--listen: "),
        # No service to ask and no rules given.
        (["--upstream", "http://x", "--auth", "127.0.0.1:9"], 1, "start `l402proxy serve-auth`"),
        (["--upstream", "http://x", "--name", "a-b"], 2, "--name: "),
        (["--upstream", "https://x", "--upstream-ca", "/no/such.pem"], 2, "no such file"),
        (["--upstream", "http://x", "--upstream-ca", __file__], 2, "only for an https://"),
    ],
)
def test_nginx_config_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], code: int, says: str
) -> None:
    got, out, err = run_cli(capsys, "nginx-config", *args)
    assert (got, out) == (code, "") and err.count("\n") == 1 and says in err, err


def test_nginx_config_names_the_ca_file_nginx_checks_the_origin_against(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = str(write(tmp_path, RULES))
    (tmp_path / "origin-ca.pem").write_text("")
    monkeypatch.chdir(tmp_path)
    base = ["nginx-config", "--rules", rules, "--upstream", "https://origin.example"]
    code, out, err = run_cli(capsys, *base, "--upstream-ca", "origin-ca.pem")
    # Absolute: nginx would read a relative path from its own prefix.
    assert code == 0 and err == "", err
    assert out.count(f"proxy_ssl_trusted_certificate {tmp_path / 'origin-ca.pem'};") == 4
    # Without --upstream-ca, Debian's bundle; where there is none, say what to do.
    monkeypatch.setattr(nginx, "DEFAULT_CA_BUNDLE", str(tmp_path / "none.crt"))
    code, out, err = run_cli(capsys, *base)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--upstream-ca FILE" in err
    monkeypatch.setattr(nginx, "DEFAULT_CA_BUNDLE", str(tmp_path / "origin-ca.pem"))
    assert run_cli(capsys, *base)[0] == 0


def test_nginx_config_warns_that_nginx_checks_no_ip_address_in_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nginx 1.22 matches the name it checks against DNS names only (tests/e2e shows the 502)."""
    rules = str(write(tmp_path, RULES))
    for upstream, warned in (
        ("https://127.0.0.1:8443", True),
        ("https://[::1]", True),
        ("https://localhost:8443", False),
        ("http://127.0.0.1", False),
    ):
        code, out, err = run_cli(capsys, "nginx-config", "--rules", rules, "--upstream", upstream)
        assert code == 0 and out.endswith("}\n")
        assert ("warning: --upstream names the address" in err) is warned, (upstream, err)


UPSTREAM_RULES = """
services:
  - name: a
    match: {path: "/a/*"}
    price_sat: 1
    paid: {upstream: "http://127.0.0.1:9"}
"""

# The engine matches host: on the Host the client sends; the printed config takes any Host
# and sends the origin its own: another Host skipped the rule.
HOST_RULES = """
services:
  - name: free
    match: {path: "/free/*"}
    mode: free
  - name: a
    match: {path: "/a/*", host: "paid.example"}
    price_sat: 1
"""
# nginx sends the origin the --upstream's Host; a paid Host went as a second line.
SET_HOST_RULES = """
services:
  - name: a
    match: {path: "/a/*"}
    price_sat: 1
    paid:
      set_headers: {X-A: "1", host: "premium.internal"}
"""
# A valid header name the rules take, that nginx's proxy_set_header cannot.
ODD_NAME_RULES = UPSTREAM_RULES.replace(
    'paid: {upstream: "http://127.0.0.1:9"}', 'paid: {set_headers: {"X-A!": "1"}}'
)


@pytest.mark.parametrize("command", ["serve-auth", "nginx-config"])
@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ("services: [", [":1: "]),
        (UPSTREAM_RULES, [":3: ", "nginx"]),
        (HOST_RULES, [":6: ", "service 'a'", "match.host", "another Host", "server_name"]),
        (SET_HOST_RULES, [":3: ", "set_headers: host is not possible", "--upstream"]),
        (ODD_NAME_RULES, [":3: ", "'X-A!' cannot be written into an nginx config"]),
    ],
    ids=["broken", "upstream", "host", "set-host", "odd-name"],
)
def test_rules_either_command_cannot_use_are_refused_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, rules: str, says: list[str]
) -> None:
    path = write(tmp_path, rules)
    extra = ["--upstream", "http://x"] if command == "nginx-config" else []
    code, out, err = run_cli(capsys, command, "--rules", str(path), *extra)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"l402proxy: {path}:"), err
    assert all(part in err for part in says), err


@pytest.mark.parametrize("rules", [HOST_RULES, SET_HOST_RULES, ODD_NAME_RULES])
async def test_rules_the_door_cannot_serve_are_refused_on_reload_and_the_old_ones_kept(
    tmp_path: Path, rules: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_door(tmp_path) as door:
        path = Path(door.engine.rules_path)
        before = door.engine.rules
        path.write_text(rules)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new signature
        await door.engine.reload_rules_if_changed()
        assert door.engine.rules is before
        # Still served by the rules in force.
        assert (await door.nginx("/bonus/b1.mp3")).status_code == 402
    kept = [r.getMessage() for r in caplog.records if "kept the previous rules" in r.getMessage()]
    assert len(kept) == 1 and f"{path}:" in kept[0] and "nginx" in kept[0], kept


def test_serve_auth_that_cannot_start_says_why_and_never_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = str(write(tmp_path, RULES))
    blocker = tmp_path / "file"
    blocker.write_text("")
    port = str(free_port())
    for args, code, says in (
        (["--store", str(blocker / "server.sqlite")], 1, "cannot open token store"),
        (["--backend", "lnd://"], 1, "--backend: "),
        (["--listen", "127.0.0.1"], 2, "--listen: "),
    ):
        got, _, err = run_cli(
            capsys, "serve-auth", "--listen", f"127.0.0.1:{port}", "--rules", rules,
            "--dev-ledger", str(tmp_path / "devledger.sqlite"), *args,
        )  # fmt: skip
        lines = [line for line in err.splitlines() if line.startswith("l402proxy: ")]
        assert got == code and len(lines) == 1 and says in lines[0], err


def test_serve_auth_without_its_server_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "httptools" else real(name)
    )
    code, _, err = run_cli(capsys, "serve-auth", "--rules", str(write(tmp_path, RULES)))
    assert (code, err) == (1, "l402proxy: serve-auth needs httptools: pip install httptools\n")


def test_serve_auth_warns_about_an_address_nginx_is_not_alone_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # TEST-NET-1: no interface has it, so the bind fails after the warning (nothing listens).
    code, _, err = run_cli(
        capsys, "serve-auth", "--listen", "192.0.2.1:8402", "--rules", str(write(tmp_path, RULES)),
        "--dev-ledger", str(tmp_path / "devledger.sqlite"),
    )  # fmt: skip
    lines = err.splitlines()
    assert code == 1
    assert any("not a loopback address" in line and "only nginx" in line for line in lines), err
    assert lines[-1].startswith("l402proxy: cannot listen on 192.0.2.1:8402")
