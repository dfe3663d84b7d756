"""Server decisions, pure: (rule, request headers, token facts) -> what to do with the request.

No I/O and no mitmproxy types here, so the same decisions can back an ASGI middleware or a
benchmark.
"""

import sys
from collections.abc import Callable, Container
from dataclasses import dataclass

from .l402.headers import Credential, CredentialError, accepts_l402, parse_credential
from .l402.identifier import Identifier
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


def is_revoked(identifier: Identifier, revoked: Container[bytes]) -> bool:
    """Revoked by token id, or by payment hash: `tokens revoke <payment hash>` made before the
    store has the token's row (it is written within a quarter second of the sale) records the
    hash as it was given, and it must still take."""
    return identifier.token_id in revoked or identifier.payment_hash in revoked


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
        if is_revoked(token.identifier, revoked):
            failure = TokenError("revoked", "this token has been revoked")
            continue
        return token
    raise failure or TokenError("malformed", "no macaroon in credential")


class TokenCache:
    """Credentials already verified, so a token's later requests skip the HMAC chain.

    Keyed by the exact Authorization value and service: an identical string verifies identically,
    except for time and revocation, which `lookup` re-checks on every hit.

    Bounded by entries and by bytes: anyone holding one cheap token can attenuate it into as many
    distinct valid credentials as they like (each up to headers.MAX_CREDENTIAL_SIZE), so a bound
    on entries alone would let them pin entries x credential size. The oldest entries go first, a
    slice at a time when a store overflows; a hit only reads a dict, so paid requests pay nothing
    for this.
    """

    # What one entry holds besides its strings: the key and value tuples, the Credential,
    # VerifiedToken and Identifier objects, the preimage, the dict slot (measured with
    # tracemalloc: about 1 KiB; a typical token's whole entry is 2 KiB).
    ENTRY_OVERHEAD = 1024
    # A store that overflows frees down to this share of each bound, so evictions come in batches.
    LOW_WATER = 0.9

    def __init__(self, max_entries: int = 65536, max_bytes: int = 32 * 1024 * 1024) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a token cache needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Insertion order is age: the first key is the oldest.
        self._entries: dict[tuple[str, str], tuple[VerifiedToken, Credential]] = {}
        self._bytes = 0

    @classmethod
    def entry_size(
        cls, authorization: str, service: str, token: VerifiedToken, credential: Credential
    ) -> int:
        """A fair estimate of the memory one entry keeps alive, in bytes."""
        # getsizeof is exact for a str (and O(1)): caveats may hold characters of 4 bytes each.
        return (
            cls.ENTRY_OVERHEAD
            + sys.getsizeof(authorization)
            + sys.getsizeof(service)
            + sum(sys.getsizeof(macaroon) for macaroon in credential.macaroons)
            + sum(sys.getsizeof(caveat) for caveat in token.caveats)
        )

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
        if is_revoked(token.identifier, revoked) or (
            token.valid_until is not None and token.valid_until <= now
        ):
            self._remove((authorization, service))
            return None
        return hit

    def store(
        self, authorization: str, service: str, token: VerifiedToken, credential: Credential
    ) -> None:
        key = (authorization, service)
        size = self.entry_size(authorization, service, token, credential)
        if size > self.max_bytes * (1 - self.LOW_WATER):
            return  # one entry that would take a whole eviction batch is not worth keeping
        self._remove(key)
        if len(self._entries) >= self.max_entries or self._bytes + size > self.max_bytes:
            self._evict(
                entries=int(self.max_entries * self.LOW_WATER),
                size=int(self.max_bytes * self.LOW_WATER) - size,
            )
        self._entries[key] = (token, credential)
        self._bytes += size

    def _remove(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= self.entry_size(*key, *entry)

    def _evict(self, *, entries: int, size: int) -> None:
        """Drop the oldest entries until at most `entries` remain, using at most `size` bytes."""
        count, remaining_bytes = len(self._entries), self._bytes
        victims: list[tuple[str, str]] = []
        # One pass from the oldest end; deleting while iterating is not allowed.
        for key, entry in self._entries.items():
            if count < entries and remaining_bytes <= size:
                break
            victims.append(key)
            count -= 1
            remaining_bytes -= self.entry_size(*key, *entry)
        for key in victims:
            del self._entries[key]
        self._bytes = remaining_bytes

    @property
    def size(self) -> int:
        """The estimated bytes held (see entry_size)."""
        return self._bytes

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
            # Its size is checked first: a credential over MAX_CREDENTIAL_SIZE gets no base64 or
            # macaroon work (the cache, which only holds valid ones, simply missed it).
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
