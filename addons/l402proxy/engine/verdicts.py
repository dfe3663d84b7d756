"""Paid grants the engine may give again without judging the request anew.

A client that paid sends the same request many times (a player's Range requests, an API
client's polling): the same method, target, host and header fields, byte for byte. Judging it
again would give the same grant until the token expires or is revoked, or the rules change,
so the engine keeps the verdict under the whole request head and checks only those three. What
could make the same request come out otherwise is never kept: rules with limits (every request
counts), a dry run, anything but a grant.
"""

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .answers import Fields, Forward
from .request import Request

# Sized for the busy tokens of one instance; a miss only costs a full judgement.
MAX_VERDICTS = 4096
# The request head a kept verdict may hold (it is its key): bigger ones are judged every time,
# so memory stays under MAX_VERDICTS * 2 * MAX_HEAD_BYTES however large clients make them.
# Counted twice: the head's bytes, and what the entry holds in memory (entry_size).
MAX_HEAD_BYTES = 4096
# What an entry holds besides its strings and fields: Kept, Forward, the note and its values,
# the ids, the key tuple, the dict slot (sys.getsizeof of each, CPython 3.11/3.12: 1.3 KiB).
ENTRY_OVERHEAD = 1536
# What one header field holds besides its bytes: its (name, value) tuple, two bytes objects,
# and a slot in the key's fields and in the Forward's (56 + 2 * 33 + 2 * 8).
FIELD_OVERHEAD = 140

Key = tuple[str, str, str, tuple[str, ...], bool, Fields]


@dataclass(slots=True)
class Kept:
    forward: Forward
    until: float  # when the token expires (inf: never)
    ids: tuple[bytes, bytes]  # token id and payment hash: revoking either ends the verdict
    rules: object  # the RuleSet that judged it
    # The Host fields among the key's: what the door's target_check reads.
    hosts: tuple[bytes, ...] = ()


def entry_size(key: Key, forward: Forward) -> int:
    """A fair estimate of the memory one kept verdict holds, in bytes (as TokenCache counts:
    getsizeof is exact for a str and O(1); the target and the path may be long)."""
    _, host, target, also_targets, _, fields = key
    return (
        ENTRY_OVERHEAD
        + sys.getsizeof(host)
        + sys.getsizeof(target)
        + sum(sys.getsizeof(other) for other in also_targets)
        + (sys.getsizeof(forward.path) if forward.path is not None else 0)
        + sum(len(name) + len(value) + FIELD_OVERHEAD for name, value in fields)
    )


class VerdictCache:
    def __init__(self, max_entries: int = MAX_VERDICTS) -> None:
        self.max_entries = max_entries
        self.kept: dict[Key, Kept] = {}

    @staticmethod
    def key(request: Request) -> Key:
        """Everything a grant depends on: the client's address and the body do not count (a
        grant of a rule without limits never looks at them; endpoints are never kept)."""
        return (
            request.method,
            request.host,
            request.target,
            request.also_targets,
            request.secure,
            request.fields,  # type: ignore[return-value]
        )

    def reuse(
        self,
        key: Key,
        now: float,
        revoked: Any,
        rules: object,
        target_check: Callable[[Sequence[bytes]], str | None] | None = None,
    ) -> Forward | None:
        """The kept grant for this request head, if it still holds; a copy the door may use."""
        try:
            kept = self.kept.get(key)
        except TypeError:  # fields a door gave as lists: nothing kept under them either
            return None
        if kept is None:
            return None
        token_id, payment_hash = kept.ids
        if (
            kept.rules is not rules
            or kept.until <= now
            or token_id in revoked
            or payment_hash in revoked
        ):
            del self.kept[key]
            return None
        if target_check is not None and target_check(kept.hosts) is not None:
            # The door's own judgement of the target is no part of the key (mitmproxy: the
            # authority of an absolute-form target, which it also turns into origin form): it
            # runs on every request, and a refusal is judged in full (its 400).
            return None
        forward = kept.forward
        # A copy the door may write into (dataclasses.replace costs as much as the rest).
        return Forward(
            forward.headers,
            forward.path,
            forward.upstream,
            forward.set_headers,
            None if forward.note is None else dict(forward.note),
            forward.comment,
        )

    def keep(
        self,
        key: Key,
        forward: Forward,
        until: float | None,
        ids: tuple[bytes, bytes],
        rules: object,
        hosts: tuple[bytes, ...] = (),
    ) -> None:
        if sum(len(name) + len(value) for name, value in key[5]) > MAX_HEAD_BYTES:
            return
        # The target and its other readings are the client's too, as long as it likes (no
        # door but nginx bounds them), and each field costs objects beside its bytes.
        if entry_size(key, forward) > 2 * MAX_HEAD_BYTES:
            return
        if len(self.kept) >= self.max_entries:
            # The oldest first (dicts keep insertion order): cheap, and a miss costs little.
            del self.kept[next(iter(self.kept))]
        # A copy: the door that got `forward` may write into its note.
        if forward.note is not None:
            forward = replace(forward, note=dict(forward.note))
        kept = Kept(forward, math.inf if until is None else until, ids, rules, hosts)
        with contextlib.suppress(TypeError):  # fields a door gave as lists: not kept
            self.kept[key] = kept

    def clear(self) -> None:
        self.kept.clear()

    def __len__(self) -> int:
        return len(self.kept)
