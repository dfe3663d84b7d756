"""Server decisions, pure: (rule, request headers, token facts) -> what to do with the request.

No I/O and no mitmproxy types here, so the same decisions can back an ASGI middleware or a
benchmark.
"""

from collections.abc import Callable, Container
from dataclasses import dataclass

from .l402.headers import Credential, CredentialError, accepts_l402, parse_credential
from .l402.token import TokenError, VerifiedToken, verify
from .rules import Rule

L402_SCHEMES = frozenset({"L402", "LSAT"})


@dataclass(frozen=True)
class Pass:
    """Not ours to judge: forward untouched."""


@dataclass(frozen=True)
class Deny:
    """Reachable only through a paid rewrite (mode: deny): answered 404, never forwarded."""

    rule: Rule


@dataclass(frozen=True)
class Free:
    """Priced content, but the client never said it can pay: serve the free variant."""

    rule: Rule


@dataclass(frozen=True)
class Grant:
    """A paid, valid token: serve the paid variant."""

    rule: Rule
    token: VerifiedToken
    credential: Credential


@dataclass(frozen=True)
class Challenge:
    """Answer with a fresh invoice: 402 (pay, or pay again) or 401 (the credential is bad)."""

    rule: Rule
    status: int
    reason: str
    detail: str


Decision = Pass | Deny | Free | Grant | Challenge


def is_l402_authorization(value: str | None) -> bool:
    """True when an Authorization value uses our schemes; other schemes belong to the origin."""
    if not value:
        return False
    scheme = value.strip().split(None, 1)[0] if value.strip() else ""
    return scheme.upper() in L402_SCHEMES


def check_credential(
    credential: Credential,
    *,
    service: str,
    root_key_for: Callable[[bytes], bytes],
    revoked: Container[bytes],
    now: float,
    capability: str | None = None,
) -> VerifiedToken:
    """Verify a credential for one service; raises TokenError with the reason of the last failure.

    A credential may carry several macaroons (the spec allows it); the first that verifies wins.
    """
    failure: TokenError | None = None
    for macaroon in credential.macaroons:
        try:
            token = verify(
                macaroon,
                credential.preimage,
                root_key_for,
                service=service,
                now=now,
                capability=capability,
            )
        except TokenError as exc:
            failure = exc
            continue
        if token.identifier.token_id in revoked:
            failure = TokenError("revoked", "this token has been revoked")
            continue
        return token
    raise failure or TokenError("malformed", "no macaroon in credential")


class TokenCache:
    """Credentials already verified, so a token's later requests skip the HMAC chain.

    Keyed by the exact Authorization value and service: an identical string verifies identically,
    except for time and revocation, which `lookup` re-checks on every hit.
    """

    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[VerifiedToken, Credential]] = {}

    def lookup(
        self,
        authorization: str,
        service: str,
        revoked: Container[bytes],
        now: float,
        capability: str | None = None,
    ) -> tuple[VerifiedToken, Credential] | None:
        hit = self._entries.get((authorization, service))
        if hit is None:
            return None
        token = hit[0]
        if (
            capability is not None
            and token.capabilities is not None
            and capability not in token.capabilities
        ):
            return None  # verify again, so the refusal carries its reason
        if token.identifier.token_id in revoked or (
            token.valid_until is not None and token.valid_until <= now
        ):
            del self._entries[(authorization, service)]
            return None
        return hit

    def store(
        self, authorization: str, service: str, token: VerifiedToken, credential: Credential
    ) -> None:
        if len(self._entries) >= self.max_entries:
            # Dropping everything is crude but bounded and cheap; a miss only costs one verify.
            self._entries.clear()
        self._entries[(authorization, service)] = (token, credential)

    def __len__(self) -> int:
        return len(self._entries)


def decide(
    *,
    rule: Rule | None,
    authorization: str | None,
    accept_authenticate: str | None,
    root_key_for: Callable[[bytes], bytes],
    revoked: Container[bytes],
    now: float,
    method: str = "GET",
    cache: TokenCache | None = None,
) -> Decision:
    if rule is None or rule.mode == "free":
        return Pass()
    if rule.mode == "deny":
        return Deny(rule)
    if is_l402_authorization(authorization):
        assert authorization is not None
        capability = rule.capability_for(method)
        if cache is not None and (
            hit := cache.lookup(authorization, rule.name, revoked, now, capability)
        ):
            return Grant(rule, *hit)
        try:
            credential = parse_credential(authorization)
        except CredentialError as exc:
            return Challenge(rule, 401, "malformed", str(exc))
        try:
            token = check_credential(
                credential,
                service=rule.name,
                root_key_for=root_key_for,
                revoked=revoked,
                now=now,
                capability=capability,
            )
        except TokenError as exc:
            return Challenge(rule, 401 if exc.invalid else 402, exc.reason, str(exc))
        if cache is not None:
            cache.store(authorization, rule.name, token, credential)
        return Grant(rule, token, credential)
    if rule.mode == "paywall" or accepts_l402(accept_authenticate):
        return Challenge(rule, 402, "payment_required", f"{rule.name} costs {rule.price_sat} sat")
    return Free(rule)
