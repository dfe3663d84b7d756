"""A small Nostr relay (NIP-01) on 127.0.0.1 for the unit tests: REQ/EVENT/CLOSE in,
EVENT/OK/EOSE/CLOSED/NOTICE out, replaceable events kept once, everything else kept as sent
(like nostr-relay, which keeps ephemeral events until its garbage collector runs).

The end-to-end tests use a real relay (nostr-relay from PyPI); this one can be made to
misbehave in the ways a real one only does now and then: `knobs` refuse events, close
subscriptions, stay silent, and `drop()` cuts every connection; `stop()`/`start()` take it down
and bring it back on the same port. Every event it took is in `received`, for assertions.

    async with TestRelay() as relay:
        relay.url  # ws://127.0.0.1:<port>
"""

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from l402proxy.launch import free_port
from l402proxy.lightning.nostr import Event, NostrError, verify_event

HOST = "127.0.0.1"


@dataclass
class Knobs:
    refuse_events: str | None = None  # OK false with this reason to every EVENT
    close_subscriptions: str | None = None  # CLOSED with this reason to every REQ
    silent: bool = False  # no OK at all
    notice: str | None = None  # a NOTICE sent after each REQ's EOSE


def matches(filters: Sequence[dict[str, Any]], event: Event) -> bool:
    """NIP-01: any filter; in one filter, every condition."""
    for flt in filters:
        if "ids" in flt and event.id not in flt["ids"]:
            continue
        if "authors" in flt and event.pubkey not in flt["authors"]:
            continue
        if "kinds" in flt and event.kind not in flt["kinds"]:
            continue
        if "since" in flt and event.created_at < flt["since"]:
            continue
        if "until" in flt and event.created_at > flt["until"]:
            continue
        tags = [k for k in flt if k.startswith("#") and len(k) == 2]
        if all(set(event.tag_values(k[1])) & set(flt[k]) for k in tags):
            return True
    return False


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    subs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class TestRelay:
    __test__ = False  # not a pytest test class

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.knobs = Knobs()
        self.stored: dict[str, Event] = {}
        self.received: list[Event] = []
        self.clients: set[_Client] = set()
        self.connections = 0  # websocket connections accepted, ever
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    async def __aenter__(self) -> "TestRelay":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, self.port).start()

    async def stop(self) -> None:
        await self.drop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def drop(self) -> None:
        """Cut every connection (the relay restarts its websockets; clients reconnect)."""
        for client in list(self.clients):
            with contextlib.suppress(Exception):
                await client.ws.close()
        self.clients.clear()

    def of_kind(self, kind: int) -> list[Event]:
        return [e for e in self.received if e.kind == kind]

    async def inject(self, event_json: dict[str, Any]) -> None:
        """Hand an event, unchecked, to every subscription, whatever its filters: a lying
        relay."""
        for client in list(self.clients):
            for sub_id in list(client.subs):
                await self._send(client, ["EVENT", sub_id, event_json])

    async def _send(self, client: _Client, message: list[Any]) -> None:
        with contextlib.suppress(Exception):
            await client.ws.send_str(json.dumps(message))

    async def _serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        client = _Client(ws)
        self.clients.add(client)
        self.connections += 1
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                try:
                    parsed = json.loads(message.data)
                except ValueError:
                    await self._send(client, ["NOTICE", "invalid: not JSON"])
                    continue
                await self._handle(client, parsed)
        finally:
            self.clients.discard(client)
        return ws

    async def _handle(self, client: _Client, message: list[Any]) -> None:
        kind = message[0] if isinstance(message, list) and message else None
        if kind == "EVENT" and len(message) == 2:
            await self._event(client, message[1])
        elif kind == "REQ" and len(message) >= 3:
            await self._req(client, message[1], message[2:])
        elif kind == "CLOSE" and len(message) == 2:
            client.subs.pop(message[1], None)
        else:
            await self._send(client, ["NOTICE", "invalid: unknown message"])

    async def _event(self, client: _Client, value: object) -> None:
        try:
            event = Event.from_json(value)
        except NostrError as exc:
            ident = value.get("id", "") if isinstance(value, dict) else ""
            await self._send(client, ["OK", ident, False, f"invalid: {exc}"])
            return
        if self.knobs.silent:
            return
        if self.knobs.refuse_events is not None:
            await self._send(client, ["OK", event.id, False, self.knobs.refuse_events])
            return
        if not verify_event(event):
            await self._send(client, ["OK", event.id, False, "invalid: bad signature"])
            return
        duplicate = event.id in self.stored
        self.received.append(event)
        if 10000 <= event.kind < 20000:
            # Replaceable: one per author and kind.
            for old in [e for e in self.stored.values() if (e.pubkey, e.kind) == (
                event.pubkey, event.kind)]:  # fmt: skip
                del self.stored[old.id]
        self.stored[event.id] = event
        await self._send(
            client,
            ["OK", event.id, True, "duplicate: already have this event" if duplicate else ""],
        )
        if duplicate:
            return
        for other in list(self.clients):
            for sub_id, filters in other.subs.items():
                if matches(filters, event):
                    await self._send(other, ["EVENT", sub_id, event.to_json()])

    async def _req(self, client: _Client, sub_id: object, filters: list[Any]) -> None:
        if not isinstance(sub_id, str) or not all(isinstance(f, dict) for f in filters):
            await self._send(client, ["NOTICE", "invalid: bad REQ"])
            return
        if self.knobs.close_subscriptions is not None:
            await self._send(client, ["CLOSED", sub_id, self.knobs.close_subscriptions])
            return
        client.subs[sub_id] = filters
        stored = sorted(self.stored.values(), key=lambda e: (-e.created_at, e.id))
        limit = min((f["limit"] for f in filters if isinstance(f.get("limit"), int)), default=None)
        found = [e for e in stored if matches(filters, e)]
        for event in found[:limit] if limit is not None else found:
            await self._send(client, ["EVENT", sub_id, event.to_json()])
        await self._send(client, ["EOSE", sub_id])
        if self.knobs.notice:
            await self._send(client, ["NOTICE", self.knobs.notice])
