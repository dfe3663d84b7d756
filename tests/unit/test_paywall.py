"""The paywall page and cookie helpers (pure: no proxy, no browser)."""

import hashlib
import html
import json
import os
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from l402proxy import paywall
from l402proxy.l402.encoding import b64decode_any
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import TokenError, caveats_for, derive_root_key, mint
from l402proxy.rules import Rule, parse_rules

SECRET = b"k" * 32
NOW = 1_800_000_000.0
PREIMAGE = bytes(range(32))
BOLT11 = "lnbcrt210n1pn7x0kxpp5" + "q" * 200 + "xyz"


def root_key_for(token_id: bytes) -> bytes:
    return derive_root_key(SECRET, token_id)


def macaroon_for(service: str = "bonus", secret: bytes = SECRET) -> str:
    identifier = Identifier.new(hashlib.sha256(PREIMAGE).digest())
    caveats = caveats_for(service, valid_until=int(NOW) + 3600, capabilities=None)
    return mint(derive_root_key(secret, identifier.token_id), identifier, caveats)


def rule(path: str, description: str = "Ad-free episode", mode: str = "paywall") -> Rule:
    text = json.dumps(
        {
            "services": [
                {
                    "name": "svc",
                    "description": description,
                    "match": {"path": path},
                    "price_sat": 21,
                    "mode": mode,
                }
            ]
        }
    )
    return parse_rules(text, "test.yaml").rules[0]


def facts(**changes: object) -> paywall.PageFacts:
    base: dict[str, object] = {
        "service": "bonus",
        "description": "Bonus episode",
        "price_sat": 21,
        "valid_for": 30 * 86400,
        "scope": "/bonus/",
        "bolt11": BOLT11,
        "macaroon": macaroon_for(),
        "expires_at": NOW + 600,
        "now": NOW,
    }
    return paywall.PageFacts(**(base | changes))  # type: ignore[arg-type]


def script_data(page: str) -> dict[str, object]:
    found = re.search(r'<script type="application/json" id="l402-data">(.*?)</script>', page, re.S)
    assert found is not None
    return json.loads(found.group(1))


# -- scope path -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "scope"),
    [
        ("/episodes/*", "/episodes/"),
        ("/a/b-c.d/*.mp3", "/a/b-c.d/"),
        ("/exact/file.mp3", "/exact/"),
        ("/premium*", "/"),
        ("*", "/"),
        ("/a/[ab]/*", "/a/"),
        ("/a/b?/x", "/a/"),
        ("/x;y/*", "/"),  # ';' would end the Path attribute
        ("re:/episodes/.*", "/"),
        ("re:(?s:/a/x|/b/.*)\\Z", "/"),  # looks like a glob, but two prefixes
        ("re:(?s:/a/b?c/.*)\\Z", "/a/"),  # the quantifier makes 'b' optional
    ],
)
def test_scope_path_is_the_literal_prefix_up_to_the_last_slash(glob: str, scope: str) -> None:
    assert paywall.scope_path(rule(glob)) == scope


def test_scope_path_covers_every_path_the_rule_matches() -> None:
    episodes = rule("/episodes/*")
    for path in ("/episodes/ep1.mp3", "/episodes/a/b/c"):
        assert episodes.matches("h", path, "GET")
        assert path.startswith(paywall.scope_path(episodes))


# -- return path guard ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["/", "/bonus/x.mp3", "/a?b=1&c=%2F", "/a b"])
def test_local_paths_are_kept(value: str) -> None:
    assert paywall.safe_local_path(value) == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "//evil.example/x",
        "/\\evil.example",
        "https://evil.example/",
        "javascript:alert(1)",
        "/\t/evil.example",
        "/\n/evil.example",
        "bonus/x",
        "/" + "a" * 5000,
    ],
)
def test_other_sites_and_odd_paths_are_refused(value: str | None) -> None:
    assert paywall.safe_local_path(value) is None


@pytest.mark.parametrize(
    ("path", "ours"),
    [
        ("/.l402/unlock", True),
        ("/.l402/pay?path=/x", True),
        ("/%2El402/unlock", True),
        ("//.l402/pay", True),
        ("/x/../.l402/pay", True),
        ("/.l402x/pay", False),
        ("/episodes/.l402/", False),
        ("/feed.xml", False),
    ],
)
def test_endpoint_prefix_is_recognised_however_spelled(path: str, ours: bool) -> None:
    assert paywall.is_endpoint(path) is ours


# -- content negotiation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        (
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8",
            "html",
        ),
        ("text/html", "html"),
        ("text/html, application/json", "html"),
        ("application/json, text/html;q=0.5", "json"),
        ("text/html;q=0, text/plain", "text"),
        ("text/plain", "text"),
        ("text/plain, application/json", "json"),
        ("application/json", "json"),
        ("*/*", "json"),
        (None, "json"),
        ("", "json"),
    ],
)
def test_body_kind_follows_accept(accept: str | None, kind: str) -> None:
    assert paywall.body_kind(accept) == kind


# -- cookies ----------------------------------------------------------------------------------


def test_our_cookie_is_found_and_removed_and_the_rest_stays_byte_for_byte() -> None:
    kept, found = paywall.split_cookies(['a=1;b=2;  L402_bonus=mac:pre ;c="x; y"=z'])
    assert found == {"L402_bonus": "mac:pre"}
    assert kept == ['a=1;b=2;c="x; y"=z']


def test_cookie_header_with_only_ours_disappears() -> None:
    kept, found = paywall.split_cookies(["L402_bonus=m:p", 'L402_podcast="q:r"'])
    assert kept == []
    assert found == {"L402_bonus": "m:p", "L402_podcast": "q:r"}


def test_our_cookie_first_keeps_the_others() -> None:
    kept, _ = paywall.split_cookies(["L402_bonus=m:p; theme=dark; sid=1"])
    assert kept == ["theme=dark; sid=1"]


def test_first_of_two_cookies_with_one_name_wins() -> None:
    _, found = paywall.split_cookies(["L402_bonus=first; L402_bonus=second"])
    assert found == {"L402_bonus": "first"}


def test_cookies_that_only_look_like_ours_stay() -> None:
    values = ["L402_=x; L402_a.b=y; XL402_bonus=z; l402_bonus=w"]
    kept, found = paywall.split_cookies(values)
    assert found == {} and kept == values


def test_credential_cookie_attributes() -> None:
    macaroon = macaroon_for()
    urlsafe = macaroon.rstrip("=").replace("+", "-").replace("/", "_")
    scoped, for_our_pages = paywall.credential_cookies(
        "bonus", urlsafe, PREIMAGE, path="/bonus/", max_age=3600, secure=False
    )
    assert scoped == (
        f"L402_bonus={macaroon}:{PREIMAGE.hex()}; Path=/bonus/; Max-Age=3600; HttpOnly; "
        "SameSite=Lax"
    )
    # The same credential for /.l402/, so the pay page knows this browser has paid.
    assert for_our_pages == scoped.replace("Path=/bonus/", "Path=/.l402/")
    (secure,) = paywall.credential_cookies(
        "bonus", macaroon, PREIMAGE, path="/", max_age=1, secure=True
    )
    assert secure.endswith("; Path=/; Max-Age=1; HttpOnly; SameSite=Lax; Secure")


def test_credential_cookie_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        paywall.credential_cookies("bonus", "AgE", b"short", path="/", max_age=1, secure=False)
    with pytest.raises(ValueError):
        paywall.credential_cookies(
            "bonus", macaroon_for(), PREIMAGE, path="/a;b", max_age=1, secure=False
        )
    with pytest.raises(ValueError):
        paywall.credential_cookies(
            "a b", macaroon_for(), PREIMAGE, path="/", max_age=1, secure=False
        )


def test_clearing_cookies() -> None:
    assert paywall.clearing_cookies("bonus", path="/bonus/", secure=True) == [
        "L402_bonus=; Path=/bonus/; Max-Age=0; HttpOnly; SameSite=Lax; Secure",
        "L402_bonus=; Path=/.l402/; Max-Age=0; HttpOnly; SameSite=Lax; Secure",
    ]


def test_the_claim_cookie_belongs_to_one_token_and_one_secret() -> None:
    secret, token_id = b"s" * 32, bytes(range(32))
    cookie = paywall.claim_cookie(secret, token_id, max_age=720, secure=False)
    name_value, *attributes = cookie.split("; ")
    assert attributes == ["Path=/.l402/unlock", "Max-Age=720", "HttpOnly", "SameSite=Strict"]
    assert name_value.startswith("L402claim.0001020304050607=")
    assert not paywall.is_our_cookie(name_value.split("=")[0])  # never a service's cookie
    assert paywall.holds_claim(["a=b; " + name_value], secret, token_id)
    assert not paywall.holds_claim([name_value], b"t" * 32, token_id)
    other = bytes(range(32))[:8] + bytes(24)  # same name, another token
    assert not paywall.holds_claim([name_value], secret, other)
    assert not paywall.holds_claim([], secret, token_id)
    cleared = paywall.clearing_claim_cookie(token_id, secure=True)
    assert cleared.startswith("L402claim.0001020304050607=; Path=/.l402/unlock; Max-Age=0;")


def test_cookie_max_age() -> None:
    assert paywall.cookie_max_age(NOW + 3600, NOW) == 3600
    assert paywall.cookie_max_age(NOW - 5, NOW) == 0
    assert paywall.cookie_max_age(None, NOW) == 400 * 86400
    assert paywall.cookie_max_age(NOW + 10**9, NOW) == 400 * 86400


# -- unlock body ------------------------------------------------------------------------------


def test_unlock_body_with_and_without_preimage() -> None:
    with_preimage = paywall.parse_unlock_body(
        json.dumps({"macaroon": "AgE", "preimage": PREIMAGE.hex().upper()}).encode(),
        "application/json; charset=utf-8",
    )
    assert with_preimage == paywall.UnlockRequest("AgE", PREIMAGE)
    assert PREIMAGE.hex() not in repr(with_preimage)
    for body in ({"macaroon": "AgE", "preimage": None}, {"macaroon": "AgE"}):
        asked = paywall.parse_unlock_body(json.dumps(body).encode(), "application/json")
        assert asked.preimage is None


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b"{}" + b" " * (16 * 1024), "application/json", 413),
        (b'{"macaroon": "AgE"}', "text/plain", 400),
        (b'{"macaroon": "AgE"}', None, 400),
        (b"macaroon=AgE", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'{"macaroon": 5}', "application/json", 400),
        (b'{"macaroon": ""}', "application/json", 400),
        (b'{"macaroon": "AgE", "preimage": "abc"}', "application/json", 400),
        (b'{"macaroon": "AgE", "preimage": 7}', "application/json", 400),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),
        (b"\xff\xfe\x00", "application/json", 400),
    ],
)
def test_bad_unlock_bodies(raw: bytes, content_type: str | None, status: int) -> None:
    with pytest.raises(paywall.BadUnlockRequest) as caught:
        paywall.parse_unlock_body(raw, content_type)
    assert caught.value.status == status


# -- signature check before any lookup --------------------------------------------------------


def test_our_macaroon_verifies_without_a_preimage() -> None:
    macaroon = macaroon_for()
    identifier, info = paywall.verify_signature(macaroon, root_key_for)
    assert identifier.payment_hash == hashlib.sha256(PREIMAGE).digest()
    assert info.services == ("bonus",)


def tampered(macaroon: str) -> str:
    import base64

    raw = bytearray(b64decode_any(macaroon))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: tampered(macaroon_for()), "bad_signature"),
        (lambda: macaroon_for(secret=b"other" * 8), "bad_signature"),
        (lambda: "not base64!", "malformed"),
        (lambda: "AgEE", "malformed"),
    ],
)
def test_forged_or_foreign_macaroons_are_refused(make: object, reason: str) -> None:
    with pytest.raises(TokenError) as caught:
        paywall.verify_signature(make(), root_key_for)  # type: ignore[operator]
    assert caught.value.reason == reason


# -- the page ---------------------------------------------------------------------------------


def test_page_shows_price_scope_duration_invoice_qr_and_actions() -> None:
    page = paywall.render_page(facts())
    assert "<svg" in page and 'class="qr-code"' in page
    assert "21 sats" in page and "Bonus episode" in page
    assert "everything under /bonus/ on this site, for 30 days" in page
    assert f'href="lightning:{BOLT11}"' in page
    assert f'<code id="invoice" class="invoice">{BOLT11}</code>' in page
    assert '<button id="webln-pay" class="primary" type="button" hidden>' in page
    assert 'id="copy"' in page
    assert "https://" not in page and "http://" not in page.replace("http://www.w3.org", "")
    data = script_data(page)
    assert data["bolt11"] == BOLT11
    assert data["unlock_url"] == "/.l402/unlock"
    assert data["return_to"] is None
    assert data["expires_in"] == 600
    assert data["poll_ms"] == 2000


def test_page_wording_for_other_situations() -> None:
    assert "with no time limit" in paywall.render_page(facts(valid_for=None))
    assert "for 1 hour" in paywall.render_page(facts(valid_for=3600))
    assert "Your access has expired" in paywall.render_page(facts(status=402, reason="expired"))
    assert "Your token was not accepted" in paywall.render_page(
        facts(status=401, reason="bad_signature")
    )
    assert "1 sat " in paywall.render_page(facts(price_sat=1)).replace("</p>", " ")
    assert "1,000 sats" in paywall.render_page(facts(price_sat=1000))


HOSTILE = "\"'><script>alert(1)</script><!--&amp;"


def test_hostile_values_are_escaped_in_html() -> None:
    page = paywall.render_page(facts(description=HOSTILE, service=HOSTILE, scope=f"/{HOSTILE}/"))
    assert "<script>alert(1)" not in page
    assert html.escape(HOSTILE, quote=True) in page
    # Exactly our two scripts: the JSON data block and the code.
    assert page.count("<script") == 2


def test_values_in_the_script_cannot_break_out() -> None:
    evil = "/x</script><script>alert(1)</script><!--\u2028"
    page = paywall.render_page(facts(return_to=evil, macaroon=evil, bolt11=BOLT11))
    block = page.split('id="l402-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and ">" not in block and "\u2028" not in block
    data = script_data(page)
    assert data["return_to"] == evil and data["macaroon"] == evil
    assert page.count("<script") == 2
    assert "</script" not in paywall._JS and "<!--" not in paywall._JS


def test_qr_is_drawn_at_whole_pixels_with_a_quiet_zone() -> None:
    svg = paywall.qr_svg(BOLT11)
    found = re.match(r'<svg width="(\d+)" height="(\d+)" role="img" viewBox="0 0 (\d+) (\d+)"', svg)
    assert found is not None, svg[:120]
    width, height, box, _ = map(int, found.groups())
    assert width == height and width % box == 0 and width // box >= 2
    # Dark modules on a white square covering the whole symbol, quiet zone included.
    assert f'<path fill="#fff" d="M0 0h{box}v{box}h-{box}z"/>' in svg
    assert 'stroke="#000"' in svg
    # The payload is encoded as given (lower case, byte mode), not upper-cased.
    import segno

    expected = segno.make_qr(BOLT11, error="m")
    assert f"0 0 {expected.symbol_size(scale=1, border=4)[0]} " in svg
    assert expected.mode == "byte"


def test_message_page_escapes() -> None:
    page = paywall.render_message_page(HOSTILE, HOSTILE)
    assert "<script" not in page and html.escape(HOSTILE, quote=True) in page


# -- upgrade banner ---------------------------------------------------------------------------


def test_banner_links_to_the_pay_page_for_this_path() -> None:
    path = '/episodes/ep1.html?a=1&b="2"'
    banner = paywall.upgrade_banner(rule("/episodes/*", "Go ad-free", "upgrade"), path)
    assert "Go ad-free for 21 sats" in banner
    href = html.unescape(re.search(r'href="([^"]*)"', banner).group(1))  # type: ignore[union-attr]
    parts = urlsplit(href)
    assert parts.path == "/.l402/pay"
    assert parse_qs(parts.query) == {"path": [path], "return": [path]}
    assert banner.isascii()


def test_banner_escapes_a_hostile_description() -> None:
    description = "<img src=x onerror=alert(1)> é"
    banner = paywall.upgrade_banner(rule("/e/*", description, "upgrade"), "/e/1")
    assert "<img" not in banner and "&lt;img" in banner
    assert banner.isascii() and "&#233;" in banner


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("<html><body><p>x</p></body></html>", "<html><body><p>x</p>BANNER</body></html>"),
        ("<p>x</p></BODY >tail</body>end", "<p>x</p></BODY >tailBANNER</body>end"),
        ("<p>no body end</p>", "<p>no body end</p>BANNER"),
        ("\u0130\u0130\u0130</body>", "\u0130\u0130\u0130BANNER</body>"),
    ],
)
def test_banner_goes_before_the_last_body_end(page: str, expected: str) -> None:
    assert paywall.insert_banner(page, "BANNER") == expected


def test_secrets_never_end_up_in_error_messages() -> None:
    preimage_hex = os.urandom(32).hex()
    body = json.dumps({"macaroon": "AgE", "preimage": preimage_hex[:-1]}).encode()
    with pytest.raises(paywall.BadUnlockRequest) as caught:
        paywall.parse_unlock_body(body, "application/json")
    assert preimage_hex[:-1] not in str(caught.value)
    secret_macaroon = tampered(macaroon_for())
    with pytest.raises(TokenError) as refused:
        paywall.verify_signature(secret_macaroon, root_key_for)
    assert secret_macaroon not in str(refused.value)
