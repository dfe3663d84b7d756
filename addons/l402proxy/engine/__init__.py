"""The server's paywall, with no front door in it: no mitmproxy, ASGI or nginx import.

A door builds a plain `Request`, awaits `Paywall.handle`, and translates the outcome back:

    engine = Paywall()
    engine.use_rules_file("rules/podcast.yaml")      # RulesError: one line naming the file
    engine.use_backend("dev", dev_ledger=paths.default_dev_ledger())
    engine.store_uri = "sqlite:///var/lib/l402/server.sqlite"
    await engine.open()                              # StartError: log it and do not serve
    ...
    outcome = await engine.handle(
        Request(method="GET", target="/episodes/1.mp3", host="podcast.example",
                fields=((b"host", b"podcast.example"), (b"authorization", b"L402 ...")),
                secure=True)
    )
    if isinstance(outcome, Answer):      # 402/401 with the challenge, 400, 404, 503, /.l402/*
        send(outcome.status, outcome.headers, outcome.body)
    else:                                # Forward: to the origin, as the engine changed it
        forward(outcome.headers, outcome.path or target, outcome.upstream)
        # then, on the origin's response (when outcome.note is set):
        #   paid: mark_variant(response_fields, paid=True)
        #   free: mark_variant(..., paid=False, by_accept="offer" in note), add the
        #         note's clear_cookies as Set-Cookie, and the upgrade banner on HTML pages
    ...
    await engine.close()

The door keeps its own concerns: option handling, how a request target is read (absolute form,
:authority; `Request.target_check`), which origin is the default, and its transport quirks.
"""

from .answers import Answer, Forward, Outcome, mark_variant
from .core import Paywall, Refused, StartError
from .request import Request

__all__ = [
    "Answer",
    "Forward",
    "Outcome",
    "Paywall",
    "Refused",
    "Request",
    "StartError",
    "mark_variant",
]
