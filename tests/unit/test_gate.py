import hashlib
import os
from typing import Any

import pytest

from l402proxy import gate
from l402proxy.l402.headers import format_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import attenuate, caveats_for, derive_root_key, mint
from l402proxy.rules import parse_rules

SECRET = b"s" * 32
NOW = 1_800_000_000.0

RULES = parse_rules(
    """
services:
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    mode: upgrade
  - name: bonus
    match: {path: "/bonus/*"}
    price_sat: 100
    mode: paywall
  - name: open
    match: {path: "/open/*"}
    price_sat: 0
    mode: free
  - name: hidden
    match: {path: "/adfree/*"}
    mode: deny
""",
    "test.yaml",
)


def root_key_for(token_id: bytes) -> bytes:
    return derive_root_key(SECRET, token_id)


def credential_for(service: str, valid_until: int | None = None, scheme: str = "L402") -> str:
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for(service, valid_until=valid_until, capabilities=None)
    macaroon = mint(root_key_for(identifier.token_id), identifier, caveats)
    return format_credential([macaroon], preimage, scheme)


def decide(
    path: str, authorization: str | None = None, accept: str | None = None, **kw: Any
) -> gate.Decision:
    options = {"revoked": frozenset(), "now": NOW} | kw
    return gate.decide(
        rule=RULES.match("example.org", path, "GET"),
        authorization=authorization,
        accept_authenticate=accept,
        root_key_for=root_key_for,
        **options,
    )


def test_unmatched_and_free_rules_pass() -> None:
    assert decide("/feed.xml") == gate.Pass()
    assert decide("/open/x", accept="L402") == gate.Pass()


def test_deny_rules_are_denied_whatever_the_client_sends() -> None:
    assert isinstance(decide("/adfree/1.mp3"), gate.Deny)
    assert isinstance(decide("/adfree/1.mp3", accept="L402"), gate.Deny)
    assert isinstance(decide("/adfree/1.mp3", credential_for("podcast")), gate.Deny)


def test_upgrade_mode_serves_the_free_variant_unless_the_client_can_pay() -> None:
    assert isinstance(decide("/episodes/1.mp3"), gate.Free)
    assert isinstance(decide("/episodes/1.mp3", accept="Basic"), gate.Free)
    challenge = decide("/episodes/1.mp3", accept="lsat")
    assert isinstance(challenge, gate.Challenge) and challenge.status == 402


def test_paywall_mode_always_challenges_without_a_token() -> None:
    challenge = decide("/bonus/1.mp3")
    assert isinstance(challenge, gate.Challenge)
    assert (challenge.status, challenge.reason) == (402, "payment_required")


@pytest.mark.parametrize("scheme", ["L402", "LSAT"])
def test_valid_token_is_granted(scheme: str) -> None:
    decision = decide("/episodes/1.mp3", credential_for("podcast", int(NOW) + 60, scheme))
    assert isinstance(decision, gate.Grant)
    assert decision.rule.name == "podcast"


def test_other_authorization_schemes_are_not_ours() -> None:
    assert isinstance(decide("/episodes/1.mp3", "Basic dXNlcjpwYXNz"), gate.Free)
    assert isinstance(decide("/bonus/1.mp3", "Bearer abc"), gate.Challenge)


@pytest.mark.parametrize(
    ("authorization", "status", "reason"),
    [
        ("L402 garbage", 401, "malformed"),
        (f"L402 {'A' * 40}:{'00' * 32}", 401, None),
    ],
)
def test_invalid_credentials_get_401(authorization: str, status: int, reason: str | None) -> None:
    decision = decide("/episodes/1.mp3", authorization)
    assert isinstance(decision, gate.Challenge)
    assert decision.status == status
    if reason:
        assert decision.reason == reason


def test_wrong_preimage_gets_401() -> None:
    good = credential_for("podcast")
    forged = good.rsplit(":", 1)[0] + ":" + os.urandom(32).hex()
    decision = decide("/episodes/1.mp3", forged)
    assert isinstance(decision, gate.Challenge)
    assert (decision.status, decision.reason) == (401, "preimage_mismatch")


def test_token_from_another_secret_gets_401() -> None:
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    macaroon = mint(
        os.urandom(32), identifier, caveats_for("podcast", valid_until=None, capabilities=None)
    )
    decision = decide("/episodes/1.mp3", format_credential([macaroon], preimage))
    assert isinstance(decision, gate.Challenge)
    assert (decision.status, decision.reason) == (401, "bad_signature")


def test_other_service_expired_and_revoked_get_402() -> None:
    other = decide("/bonus/1.mp3", credential_for("podcast"))
    assert (other.status, other.reason) == (402, "wrong_service")
    expired = decide("/episodes/1.mp3", credential_for("podcast", int(NOW) - 1))
    assert (expired.status, expired.reason) == (402, "expired")

    authorization = credential_for("podcast")
    grant = decide("/episodes/1.mp3", authorization)
    assert isinstance(grant, gate.Grant)
    revoked = decide("/episodes/1.mp3", authorization, revoked={grant.token.identifier.token_id})
    assert (revoked.status, revoked.reason) == (402, "revoked")


def test_cache_grants_without_reverifying_but_still_honours_expiry_and_revocation() -> None:
    cache = gate.TokenCache()
    authorization = credential_for("podcast", int(NOW) + 10)
    first = decide("/episodes/1.mp3", authorization, cache=cache)
    assert isinstance(first, gate.Grant) and len(cache) == 1

    calls = []

    def counting_root_key_for(token_id: bytes) -> bytes:
        calls.append(token_id)
        return root_key_for(token_id)

    hit = gate.decide(
        rule=RULES.match("h", "/episodes/2.mp3", "GET"),
        authorization=authorization,
        accept_authenticate=None,
        root_key_for=counting_root_key_for,
        revoked=frozenset(),
        now=NOW,
        cache=cache,
    )
    assert isinstance(hit, gate.Grant) and calls == []

    later = decide("/episodes/1.mp3", authorization, cache=cache, now=NOW + 11)
    assert (later.status, later.reason) == (402, "expired")
    assert len(cache) == 0

    authorization = credential_for("podcast")
    token_id = decide("/episodes/1.mp3", authorization, cache=cache).token.identifier.token_id
    revoked = decide("/episodes/1.mp3", authorization, cache=cache, revoked={token_id})
    assert (revoked.status, revoked.reason) == (402, "revoked")


def test_cache_is_scoped_to_the_service() -> None:
    cache = gate.TokenCache()
    authorization = credential_for("podcast")
    assert isinstance(decide("/episodes/1.mp3", authorization, cache=cache), gate.Grant)
    assert decide("/bonus/1.mp3", authorization, cache=cache).reason == "wrong_service"


def test_cache_stays_bounded() -> None:
    cache = gate.TokenCache(max_entries=3)
    for _ in range(10):
        decide("/episodes/1.mp3", credential_for("podcast"), cache=cache)
    assert len(cache) <= 3


CAPABLE = parse_rules(
    """
services:
  - name: premium
    match: {path: "/api/*"}
    price_sat: 50
    capabilities:
      read: [GET, HEAD]
      write: [POST, DELETE]
""",
    "caps.yaml",
)


def attenuated(authorization: str, *caveats: str) -> str:
    scheme, rest = authorization.split(" ", 1)
    macaroon, preimage = rest.rsplit(":", 1)
    return f"{scheme} {attenuate(macaroon, caveats)}:{preimage}"


def decide_caps(method: str, authorization: str, **kw: Any) -> gate.Decision:
    options = {"revoked": frozenset(), "now": NOW} | kw
    return gate.decide(
        rule=CAPABLE.match("h", "/api/x", method),
        authorization=authorization,
        accept_authenticate=None,
        root_key_for=root_key_for,
        method=method,
        **options,
    )


def capable_credential() -> str:
    preimage = os.urandom(32)
    identifier = Identifier.new(hashlib.sha256(preimage).digest())
    caveats = caveats_for("premium", valid_until=None, capabilities=["read", "write"])
    return format_credential(
        [mint(root_key_for(identifier.token_id), identifier, caveats)], preimage
    )


@pytest.mark.parametrize("use_cache", [False, True])
def test_methods_need_the_capability_the_rule_names(use_cache: bool) -> None:
    cache = gate.TokenCache() if use_cache else None
    full = capable_credential()
    read_only = attenuated(full, "premium_capabilities=read")
    for method in ("GET", "HEAD", "POST", "DELETE"):
        assert isinstance(decide_caps(method, full, cache=cache), gate.Grant), method
    # The minted token is restricted to read and write: a method neither lists is refused
    # (test_limits.py has the rest of the capability rules).
    assert decide_caps("OPTIONS", full, cache=cache).reason == "missing_capability"
    assert isinstance(decide_caps("GET", read_only, cache=cache), gate.Grant)
    assert isinstance(decide_caps("HEAD", read_only, cache=cache), gate.Grant)
    refused = decide_caps("POST", read_only, cache=cache)
    assert isinstance(refused, gate.Challenge)
    assert (refused.status, refused.reason) == (402, "missing_capability")
    # A later caveat cannot widen what an earlier one narrowed.
    widened = attenuated(read_only, "premium_capabilities=read,write")
    assert decide_caps("DELETE", widened, cache=cache).reason == "missing_capability"


def test_a_token_revoked_by_its_payment_hash_is_refused_cached_or_not() -> None:
    """`tokens revoke <payment hash>` made before the store has the token's row records the
    hash itself: it must still take, whether the token was verified before or not."""
    authorization = credential_for("podcast")
    cache = gate.TokenCache()
    grant = decide("/episodes/1.mp3", authorization, cache=cache)
    assert isinstance(grant, gate.Grant)
    by_hash = {grant.token.identifier.payment_hash}
    for use_cache in (cache, None):
        refused = decide("/episodes/1.mp3", authorization, revoked=by_hash, cache=use_cache)
        assert (refused.status, refused.reason) == (402, "revoked")
