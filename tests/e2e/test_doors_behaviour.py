"""One behaviour suite for the three front doors (tests/e2e/doors.py): real mitmdump, the ASGI
middleware under a real uvicorn, and Debian's nginx asking `l402proxy serve-auth`, each in
front of the same sample origin (l402proxy.origin_asgi), with rules/podcast.yaml and
rules/api.yaml. Each door starts once per module (the fixtures are parametrized per door) and
its paid tokens are bought once and shared.

Challenges are read the way field clients read them (a regex on the first line). The last two
tests run all three doors at once on one store: a token bought at one door opens the others,
and the same request gets the same answer from each, but for the invoice and macaroon.
"""

import base64
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from l402proxy.l402.invoice import decode_invoice
from l402proxy.origin_asgi import episode_bytes, stream_chunk

from . import procs
from .doors import KINDS, Door, DoorKind, start_door

pytestmark = pytest.mark.e2e

API_RULES = procs.REPO / "rules" / "api.yaml"
# rules/podcast.yaml prices no streaming route: a paywalled /stream/* service appended to its
# services list (the last key of the file) lets a streamed answer go through a granted request.
STREAM_SERVICE = """
  - name: stream
    match: {path: "/stream/*"}
    price_sat: 3
    mode: paywall
"""
OPTED_IN = {"Accept-Authenticate": "L402"}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
# What decides between a priced URL's free and paid answers (engine/answers.py VARIANT_VARY).
VARY = "Authorization, Cookie, Accept-Authenticate"
REVOCATION_SECONDS = 10.0


@dataclass
class Paid:
    macaroon: str
    invoice: str
    preimage: bytes

    @property
    def authorization(self) -> str:
        return f"L402 {self.macaroon}:{self.preimage.hex()}"


def ask(door: Door, path: str, method: str = "GET", **headers: str) -> httpx.Response:
    with httpx.Client(base_url=door.base_url, trust_env=False, timeout=procs.FETCH_TIMEOUT) as c:
        return c.request(method, path, headers=headers)


def challenge(response: httpx.Response) -> tuple[str, str]:
    """(macaroon, invoice) as most field clients read them: a regex on the first line."""
    assert response.status_code in (401, 402), (response.status_code, response.text[:500])
    return parse_line(response.headers.get_list("WWW-Authenticate")[0])


def parse_line(line: str) -> tuple[str, str]:
    macaroon = re.search(r'macaroon="([^"]+)"', line)
    invoice = re.search(r'invoice="([^"]+)"', line)
    assert macaroon and invoice, line
    return macaroon.group(1), invoice.group(1)


def buy(door: Door, path: str) -> Paid:
    macaroon, invoice = challenge(ask(door, path, **OPTED_IN))
    return Paid(macaroon, invoice, procs.dev_pay(door.home, invoice))


def minted(door: Door, service: str, valid_until: int) -> str:
    """A credential signed with the door's own secret (from its store), as if it had sold it."""
    return procs.minted_credential(door.store, service, valid_until)


def assert_challenge(response: httpx.Response, status: int = 402) -> None:
    """The shape every door's challenge has: both lines, LSAT first, no-store, the origin never
    asked, Content-Length right."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    lines = response.headers.get_list("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"], lines
    assert parse_line(lines[0]) == parse_line(lines[1])
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Length"] == str(len(response.content))
    assert "X-Origin-Path" not in response.headers  # the origin was never asked


# -- the doors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def podcast_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rules = tmp_path_factory.mktemp("doors-rules") / "podcast.yaml"
    rules.write_text((procs.REPO / "rules" / "podcast.yaml").read_text() + STREAM_SERVICE)
    return rules


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> DoorKind:
    return request.param


@pytest.fixture(scope="module")
def podcast(
    kind: DoorKind, podcast_rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    work = tmp_path_factory.mktemp(f"door-{kind}-podcast")
    with start_door(kind, work, work / "home", podcast_rules) as door:
        yield door


@pytest.fixture(scope="module")
def api(kind: DoorKind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    work = tmp_path_factory.mktemp(f"door-{kind}-api")
    with start_door(kind, work, work / "home", API_RULES) as door:
        yield door


@pytest.fixture(scope="module")
def episodes(podcast: Door) -> Paid:
    return buy(podcast, "/episodes/ep1.mp3")


@pytest.fixture(scope="module")
def streams(podcast: Door) -> Paid:
    return buy(podcast, "/stream/1")


@pytest.fixture(scope="module")
def premium(api: Door) -> Paid:
    return buy(api, "/api/premium/report")


# -- free, challenged, paid --------------------------------------------------------------------


def test_a_player_that_cannot_pay_gets_the_free_variant(podcast: Door) -> None:
    response = ask(podcast, "/episodes/ep1.mp3")
    assert response.status_code == 200, response.text[:500]
    assert response.content == episode_bytes("AD-SUPPORTED", "ep1")
    assert response.headers["X-Origin-Path"] == "/episodes/ep1.mp3"
    assert response.headers["Vary"] == VARY


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (None, "application/json"),
        ("text/plain", "text/plain; charset=utf-8"),
        (BROWSER_ACCEPT, "text/html; charset=utf-8"),
    ],
    ids=["json", "text", "html"],
)
def test_the_402_shape(podcast: Door, accept: str | None, content_type: str) -> None:
    response = ask(podcast, "/bonus/b1.mp3", **({"Accept": accept} if accept else {}))
    assert_challenge(response)
    assert response.headers["Content-Type"] == content_type
    macaroon, invoice = challenge(response)
    assert decode_invoice(invoice).amount_msat == 100_000
    if accept is None:
        body = response.json()
        assert (body["invoice"], body["macaroon"]) == (invoice, macaroon)
        facts = {key: body[key] for key in ("service", "price_sat", "reason")}
        assert facts == {"service": "bonus", "price_sat": 100, "reason": "payment_required"}
    elif content_type.startswith("text/plain"):
        assert "100 sat" in response.text and invoice in response.text
    else:
        assert f'href="lightning:{invoice}"' in response.text and "<svg" in response.text


def test_paying_opens_the_paid_variant(podcast: Door, episodes: Paid) -> None:
    response = ask(podcast, "/episodes/ep1.mp3?t=5", Authorization=episodes.authorization)
    assert response.status_code == 200, response.text[:500]
    assert response.content == episode_bytes("AD-FREE", "ep1")
    assert response.headers["X-Origin-Path"] == "/adfree/ep1.mp3?t=5"
    assert response.headers["X-Origin-Authorization"] == "absent"
    # One token opens the whole service, in the LSAT scheme too.
    other = ask(podcast, "/episodes/ep2.mp3", Authorization="LSAT" + episodes.authorization[4:])
    assert other.content == episode_bytes("AD-FREE", "ep2")


def test_a_paid_tier_header_reaches_the_origin_and_a_clients_own_never_does(
    api: Door, premium: Paid
) -> None:
    paid = ask(api, "/api/premium/report", Authorization=premium.authorization)
    assert paid.status_code == 200, paid.text[:500]
    assert paid.json() == {"path": "/api/premium/report", "tier": "premium"}
    assert paid.headers["X-Origin-Tier"] == "premium"
    assert paid.headers["X-Origin-Authorization"] == "absent"
    forged = ask(
        api, "/api/premium/report", Authorization=premium.authorization, **{"X-L402-Tier": "gold"}
    )
    assert forged.headers["X-Origin-Tier"] == "premium"
    # Where no paid variant applies (a free rule, a path no rule covers), it is dropped.
    for path in ("/api/health", "/"):
        free = ask(api, path, **{"X-L402-Tier": "premium"})
        assert free.status_code == 200, (path, free.text[:500])
        assert free.headers["X-Origin-Tier"] == "absent", path


def test_our_authorization_never_reaches_the_origin_and_basic_does(
    podcast: Door, episodes: Paid
) -> None:
    paid = ask(podcast, "/episodes/ep3.mp3", Authorization=episodes.authorization)
    assert paid.status_code == 200
    assert paid.headers["X-Origin-Authorization"] == "absent"
    basic = "Basic dXNlcjpwYXNz"
    for path in ("/feed.xml", "/episodes/ep3.mp3"):  # unpriced, and a priced URL's free variant
        response = ask(podcast, path, Authorization=basic)
        assert response.status_code == 200, (path, response.text[:500])
        assert response.headers["X-Origin-Authorization"] == basic, path


# -- refused tokens ----------------------------------------------------------------------------


def tampered_signature(macaroon: str) -> str:
    raw = bytearray(base64.b64decode(macaroon))
    raw[-1] ^= 0x01  # the signature is the last field of a V2 macaroon
    return base64.b64encode(bytes(raw)).decode()


def test_a_forged_token_gets_401(podcast: Door, episodes: Paid) -> None:
    for forged in (
        f"L402 {tampered_signature(episodes.macaroon)}:{episodes.preimage.hex()}",
        f"L402 {episodes.macaroon}:{os.urandom(32).hex()}",
    ):
        response = ask(podcast, "/episodes/ep1.mp3", Authorization=forged)
        assert_challenge(response, 401)
        assert challenge(response)[0] != episodes.macaroon  # a fresh one


def test_an_expired_token_gets_402(podcast: Door) -> None:
    now = int(time.time())
    fresh = ask(podcast, "/episodes/ep1.mp3", Authorization=minted(podcast, "podcast", now + 60))
    assert fresh.status_code == 200, fresh.text[:500]  # so the token is right but for its age
    expired = ask(podcast, "/episodes/ep1.mp3", Authorization=minted(podcast, "podcast", now - 1))
    assert_challenge(expired)
    assert expired.json()["reason"] == "expired"


def test_a_token_for_another_service_gets_402(podcast: Door, episodes: Paid) -> None:
    response = ask(podcast, "/bonus/extra.mp3", Authorization=episodes.authorization)
    assert_challenge(response)
    assert response.json()["reason"] == "wrong_service"


def test_a_revoked_token_gets_402(podcast: Door) -> None:
    paid = buy(podcast, "/bonus/revoked.mp3")
    opened = ask(podcast, "/bonus/revoked.mp3", Authorization=paid.authorization)
    assert opened.status_code == 200, opened.text[:500]
    payment_hash = decode_invoice(paid.invoice).payment_hash.hex()
    store = str(podcast.store)
    revoked = procs.cli(podcast.home, "tokens", "--store", store, "revoke", payment_hash[:16])
    assert revoked.returncode == 0, revoked.stderr

    def refused() -> bool:
        response = ask(podcast, "/bonus/revoked.mp3", Authorization=paid.authorization)
        return response.status_code == 402 and response.json()["reason"] == "revoked"

    assert procs.wait_until(refused, REVOCATION_SECONDS), (
        f"revocation not honoured within {REVOCATION_SECONDS:.0f} s"
    )


# -- HEAD, Range, streaming ------------------------------------------------------------------


def test_head_on_a_402_and_on_a_paid_episode(podcast: Door, episodes: Paid) -> None:
    get = ask(podcast, "/bonus/b1.mp3")
    head = ask(podcast, "/bonus/b1.mp3", "HEAD")
    assert head.status_code == 402 and head.content == b""
    lines = head.headers.get_list("WWW-Authenticate")
    assert [line.split()[0] for line in lines] == ["LSAT", "L402"]
    # What a GET would get (same invoice and macaroon lengths: same price, same service).
    assert head.headers["Content-Length"] == str(len(get.content))
    assert head.headers["Content-Type"] == "application/json"

    paid = ask(podcast, "/episodes/ep2.mp3", "HEAD", Authorization=episodes.authorization)
    assert paid.status_code == 200 and paid.content == b""
    assert paid.headers["Content-Length"] == str(len(episode_bytes("AD-FREE", "ep2")))
    assert paid.headers["X-Origin-Path"] == "/adfree/ep2.mp3"


def test_range_through_a_granted_request(podcast: Door, episodes: Paid) -> None:
    body = episode_bytes("AD-FREE", "ep2")
    auth = episodes.authorization
    part = ask(podcast, "/episodes/ep2.mp3", Authorization=auth, Range="bytes=1000-1499")
    assert part.status_code == 206, part.text[:500]
    assert part.content == body[1000:1500]
    assert part.headers["Content-Range"] == f"bytes 1000-1499/{len(body)}"
    tail = ask(podcast, "/episodes/ep2.mp3", Authorization=auth, Range="bytes=-100")
    assert tail.status_code == 206 and tail.content == body[-100:]
    beyond = ask(podcast, "/episodes/ep2.mp3", Authorization=auth, Range=f"bytes={len(body)}-")
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(body)}"


def test_a_stream_through_a_granted_request(podcast: Door, streams: Paid) -> None:
    count = 200
    with (
        httpx.Client(base_url=podcast.base_url, trust_env=False, timeout=procs.FETCH_TIMEOUT) as c,
        c.stream("GET", f"/stream/{count}", headers={"Authorization": streams.authorization}) as r,
    ):
        assert r.status_code == 200
        received = b"".join(r.iter_bytes())
    assert received == b"".join(stream_chunk(i) for i in range(count))
    assert r.headers["X-Origin-Authorization"] == "absent"
    # Passed on as it came (chunked), not gathered into one body with a length.
    assert "Content-Length" not in r.headers


# -- the browser page's unlock cookie ----------------------------------------------------------


def test_the_paywall_pages_unlock_cookie_opens_the_episode(podcast: Door) -> None:
    with httpx.Client(base_url=podcast.base_url, trust_env=False, timeout=20) as browser:
        page = browser.get("/bonus/b2.mp3", headers={"Accept": BROWSER_ACCEPT})
        macaroon, invoice = challenge(page)
        # The page's claim cookie, kept in the client's jar: only this browser may unlock.
        assert any(c.startswith("L402claim.") for c in page.headers.get_list("Set-Cookie"))
        waiting = browser.post("/.l402/unlock", json={"macaroon": macaroon, "preimage": None})
        assert waiting.status_code == 202 and waiting.json() == {"unlocked": False}
        preimage = procs.dev_pay(podcast.home, invoice).hex()
        unlocked = browser.post("/.l402/unlock", json={"macaroon": macaroon, "preimage": None})
        assert unlocked.status_code == 200, unlocked.text[:500]
        assert unlocked.json()["unlocked"] is True and unlocked.json()["service"] == "bonus"
        set_cookie = unlocked.headers["Set-Cookie"]
        assert set_cookie.startswith(f"L402_bonus={macaroon}:{preimage};")
        assert "Path=/bonus/" in set_cookie and "HttpOnly" in set_cookie
    cookie = set_cookie.split(";", 1)[0]
    # A fresh client: the cookie alone opens the scope, and never reaches the origin.
    with httpx.Client(base_url=podcast.base_url, trust_env=False, timeout=20) as player:
        for name in ("b2", "other"):
            response = player.get(f"/bonus/{name}.mp3", headers={"Cookie": f"a=1; {cookie}; b=2"})
            assert response.status_code == 200, response.text[:500]
            assert response.content == episode_bytes("BONUS", name)
            assert response.headers["X-Origin-Cookie"] == "a=1; b=2"
            assert response.headers["X-Origin-Authorization"] == "absent"


# -- cache marking -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "paid"),
    [
        (None, "private"),
        ("public, max-age=60", "private, max-age=60"),
        ("max-age=60, s-maxage=600", "private, max-age=60"),
        ("private, max-age=5", "private, max-age=5"),
        ("no-store", "no-store"),
    ],
    ids=["none", "public", "s-maxage", "private", "no-store"],
)
def test_free_and_paid_answers_are_marked_for_caches(
    podcast: Door, episodes: Paid, origin: str | None, paid: str
) -> None:
    """Both vary by credential; a paid one is never for shared caches (the origin's own
    Cache-Control, from ?cache-control=, loses public and s-maxage and gains private)."""
    path = "/episodes/ep1.mp3" + (f"?{urlencode({'cache-control': origin})}" if origin else "")
    free = ask(podcast, path)
    assert (free.headers["Vary"], free.headers.get("Cache-Control")) == (VARY, origin)
    for ranges in ({}, {"Range": "bytes=0-9"}):
        answer = ask(podcast, path, Authorization=episodes.authorization, **ranges)
        assert answer.status_code in (200, 206), answer.text[:500]
        assert (answer.headers["Vary"], answer.headers["Cache-Control"]) == (VARY, paid), ranges
    assert ask(podcast, "/feed.xml").headers.get("Vary") is None  # unpriced: untouched


# -- all three doors on one store --------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(
    podcast_rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[DoorKind, Door]]:
    """Every door at once, on one home (dev ledger) and one store (secret, tokens)."""
    work = tmp_path_factory.mktemp("doors-shared")
    home = work / "home"
    with (
        start_door("mitmproxy", work / "mitmproxy", home, podcast_rules) as mitmproxy,
        start_door("asgi", work / "asgi", home, podcast_rules) as asgi,
        start_door("nginx", work / "nginx", home, podcast_rules) as nginx,
    ):
        yield {"mitmproxy": mitmproxy, "asgi": asgi, "nginx": nginx}


def test_a_token_bought_at_one_door_opens_the_others(shared: dict[DoorKind, Door]) -> None:
    paid = buy(shared["mitmproxy"], "/episodes/ep1.mp3")
    for kind, door in shared.items():
        response = ask(door, "/episodes/ep1.mp3", Authorization=paid.authorization)
        assert response.status_code == 200, (kind, response.text[:500])
        assert response.content == episode_bytes("AD-FREE", "ep1"), kind


# Transport, not paywall: each server says these its own way.
TRANSPORT_FIELDS = {"date", "server", "connection", "keep-alive", "transfer-encoding"}


def comparable(door: Door, response: httpx.Response) -> dict[str, Any]:
    """A door's answer with what differs per answer (invoice, macaroon, their expiry, the QR
    code, the claim cookie's token-derived name and value) or per door (its address and its
    origin's, in a feed built from Host) replaced by placeholders."""
    text = response.text
    fields = [(k.lower(), v) for k, v in response.headers.multi_items()]
    html = response.headers.get("Content-Type", "").startswith("text/html")
    for url in filter(None, (door.base_url, door.origin_url)):
        text = text.replace(url.removeprefix("http://"), "<host>")
    if "www-authenticate" in dict(fields):
        macaroon, invoice = challenge(response)
        for old, new in ((invoice, "<invoice>"), (macaroon, "<macaroon>")):
            text = text.replace(old, new)
            fields = [(k, v.replace(old, new)) for k, v in fields]
    text = re.sub(r"<svg.*?</svg>", "<svg/>", text, flags=re.DOTALL)
    # Seconds count down while the doors are asked one after the other.
    text = re.sub(r'"(invoice_expires_at|expires_in)":\s*\d+', r'"\1":<t>', text)
    text = re.sub(r"<time datetime=[^>]*>[^<]*</time>", "<time/>", text)
    claim = r"L402claim\.[0-9a-f]+=[0-9a-f]*(.*Max-Age=)\d+"
    fields = [
        (k, re.sub(claim, r"L402claim.<id>=<v>\1<t>", v))
        for k, v in fields
        # The paywall page's length follows its QR code's, which differs per invoice.
        if k not in TRANSPORT_FIELDS and not (k == "content-length" and html)
    ]
    return {
        "status": response.status_code,
        # Order kept within a field name (LSAT before L402), not across names.
        "fields": sorted(fields, key=lambda kv: kv[0]),
        "body": text,
    }


@pytest.fixture(scope="module")
def shared_tokens(shared: dict[DoorKind, Door]) -> dict[str, str]:
    """What the compared requests carry: tokens bought once, and a forged one."""
    episodes, bonus = (buy(shared["mitmproxy"], path) for path in ("/episodes/x", "/bonus/x"))
    return {
        "episodes": episodes.authorization,
        "bonus_cookie": f"L402_bonus={bonus.macaroon}:{bonus.preimage.hex()}",
        "forged": f"L402 {episodes.macaroon}:{'00' * 32}",
    }


# (method, path, headers): "{name}" in a header value is shared_tokens[name].
PAID = {"Authorization": "{episodes}"}
SAME_ANSWER_CASES = {
    "402-json": ("GET", "/bonus/b1.mp3", {}),
    "402-text": ("GET", "/bonus/b1.mp3", {"Accept": "text/plain"}),
    "402-html": ("GET", "/bonus/b1.mp3", {"Accept": BROWSER_ACCEPT}),
    "402-head": ("HEAD", "/bonus/b1.mp3", {}),
    "402-opted-in": ("GET", "/episodes/ep1.mp3", OPTED_IN),
    "402-other-service": ("GET", "/bonus/b1.mp3", PAID),
    "401-forged": ("GET", "/episodes/ep1.mp3", {"Authorization": "{forged}"}),
    "401-broken-cookie": ("GET", "/bonus/b1.mp3", {"Cookie": "L402_bonus=garbage"}),
    "free": ("GET", "/episodes/ep1.mp3", {}),
    "free-browser": ("GET", "/episodes/ep1.mp3", {"Accept": BROWSER_ACCEPT}),
    "paid": ("GET", "/episodes/ep1.mp3?t=5", PAID),
    "paid-head": ("HEAD", "/episodes/ep1.mp3", PAID),
    "paid-range": ("GET", "/episodes/ep1.mp3", {**PAID, "Range": "bytes=5-9"}),
    "paid-416": ("GET", "/episodes/ep1.mp3", {**PAID, "Range": "bytes=9999999-"}),
    "paid-public": ("GET", "/episodes/ep1.mp3?cache-control=public,max-age=9", PAID),
    "paid-s-maxage": ("GET", "/episodes/ep1.mp3?cache-control=s-maxage=9,max-age=1", PAID),
    "free-public": ("GET", "/episodes/ep1.mp3?cache-control=public,max-age=9", {}),
    "paid-cookie": ("GET", "/bonus/b1.mp3", {"Cookie": "a=1; {bonus_cookie}; b=2"}),
    "denied": ("GET", "/adfree/ep1.mp3", {}),
    "unpriced": ("GET", "/feed.xml", {"Authorization": "Basic dXNlcjpwYXNz"}),
    "not-allowed": ("POST", "/episodes/ep1.mp3", {}),
    "unlock-get": ("GET", "/.l402/unlock", {}),
    "unlock-empty": ("POST", "/.l402/unlock", {}),
    "pay-page": ("GET", "/.l402/pay?path=/bonus/b1.mp3&return=/bonus/b1.mp3", {}),
    "pay-unpriced": ("GET", "/.l402/pay?path=/feed.xml", {}),
}


@pytest.mark.parametrize("case", list(SAME_ANSWER_CASES))
def test_every_door_gives_the_same_answer(
    shared: dict[DoorKind, Door], shared_tokens: dict[str, str], case: str
) -> None:
    method, path, template = SAME_ANSWER_CASES[case]
    headers = {name: value.format(**shared_tokens) for name, value in template.items()}
    answers = {
        kind: comparable(door, ask(door, path, method, **headers)) for kind, door in shared.items()
    }
    reference = answers.pop("mitmproxy")
    differ = {kind: differences(reference, a) for kind, a in answers.items() if a != reference}
    assert not differ, f"{method} {path} {template}, -mitmproxy's +the door's: {differ}"


def differences(reference: dict[str, Any], answer: dict[str, Any]) -> list[str]:
    """What an answer has that the reference has not, and the other way round."""
    found = [f"status {answer['status']}"] if answer["status"] != reference["status"] else []
    found += [f"-{k}: {v}" for k, v in reference["fields"] if (k, v) not in answer["fields"]]
    found += [f"+{k}: {v}" for k, v in answer["fields"] if (k, v) not in reference["fields"]]
    if answer["body"] != reference["body"]:
        found.append(f"body {answer['body'][:300]!r}, not {reference['body'][:300]!r}")
    return found
