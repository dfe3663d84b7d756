"""Accept-Payment (draft-httpauth-payment, "Client Payment Preferences"): which Payment
method/intent pairs a client takes, with q-values, and the server's filtering and ordering of
its offers by it. No dependency on the rest of the scheme, so the L402 side can use it too."""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

_RANGE = re.compile(r"([a-z]+|\*)/([A-Za-z0-9-]+|\*)")
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_Offer = TypeVar("_Offer")


@dataclass(frozen=True)
class PaymentRange:
    """One `method/intent[;q=...]` of Accept-Payment; "*" is a wildcard."""

    method: str
    intent: str
    q: float = 1.0

    def matches(self, method: str, intent: str) -> bool:
        return self.method in ("*", method) and self.intent in ("*", intent)

    @property
    def specificity(self) -> tuple[bool, bool]:
        # An exact method beats an exact intent: "lightning/*" outranks "*/charge".
        return (self.method != "*", self.intent != "*")


def parse_accept_payment(value: str | None) -> list[PaymentRange] | None:
    """The ranges of an Accept-Payment value (lines joined with ","), None when absent or
    nothing in it is readable (the draft: treat as "accepts anything"). A malformed member is
    skipped; parameters other than q are ignored."""
    if value is None:
        return None
    ranges: list[PaymentRange] = []
    for member in value.split(","):
        token, *params = member.split(";")
        match = _RANGE.fullmatch(token.strip(" \t"))
        if match is None:
            continue
        weights = [
            weight.strip(" \t")
            for name, _, weight in (param.strip(" \t").partition("=") for param in params)
            if name.strip(" \t").lower() == "q"
        ]
        if not weights:
            ranges.append(PaymentRange(match.group(1), match.group(2)))
        elif _QVALUE.fullmatch(weights[0]):  # the first q counts; a bad one spoils the member
            ranges.append(PaymentRange(match.group(1), match.group(2), float(weights[0])))
    return ranges or None


def order_offers(
    offers: Sequence[_Offer],
    accept_payment: str | None,
    key: Callable[[_Offer], tuple[str, str]],
) -> list[_Offer]:
    """`offers` (each `key` -> (method, intent)) filtered and ordered as the draft asks: those
    whose most specific matching range has q > 0, by descending q, server order kept on ties.
    Without a usable header, or when nothing would be left, all offers in server order (a 402
    must carry at least one Payment challenge)."""
    ranges = parse_accept_payment(accept_payment)
    if ranges is None:
        return list(offers)
    ranked: list[tuple[float, int, _Offer]] = []
    for index, offer in enumerate(offers):
        method, intent = key(offer)
        best: PaymentRange | None = None
        for candidate in ranges:
            if candidate.matches(method, intent) and (
                best is None or candidate.specificity > best.specificity
            ):
                best = candidate
        if best is not None and best.q > 0:
            ranked.append((-best.q, index, offer))
    if not ranked:
        return list(offers)
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [offer for _, _, offer in ranked]
