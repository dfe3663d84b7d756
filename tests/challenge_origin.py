"""An in-process HTTP origin on 127.0.0.1 that asks for payment in every challenge shape.

Client tests point a real HTTP client at it. `/shape/<name>` answers a request without a
credential with a 402 whose WWW-Authenticate header(s) use one of the shapes PROTOCOL.md lists
("Client parsing: shapes seen in the wild"), with a fresh invoice from the dev ledger and a
macaroon minted the way the server addon mints them; a valid credential gets 200 `paid <name>`,
a refused one a fresh challenge (401 invalid, 402 expired or another service's, as our
server answers). `/bad/<name>` serves challenges a client must never pay. The origin and the
client's dev wallet share one dev ledger file, so a test can see exactly which invoices were
settled.
"""

import base64
import contextlib
import hashlib
import os
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from coincurve import PrivateKey

from l402proxy.l402.encoding import b64decode_any
from l402proxy.l402.headers import CredentialError, parse_credential
from l402proxy.l402.identifier import Identifier
from l402proxy.l402.token import TokenError, caveats_for, derive_root_key, mint, verify
from l402proxy.lightning.bolt11_encoder import encode_invoice
from l402proxy.lightning.dev import CURRENCY, MIN_FINAL_CLTV_EXPIRY, DevLedger

SECRET = hashlib.sha256(b"challenge origin test secret").digest()
# A macaroon with a valid layout and the right payment hash, signed with another server's key.
DECOY_SECRET = hashlib.sha256(b"some other server").digest()
MERCHANT = "merchant"
PRICE_SAT = 21
# Above the max_price_sat the tests give the client (100).
EXPENSIVE_SAT = 101
INVOICE_EXPIRY = 600
TOKEN_LIFETIME = 3600
# A real Bitcoin address: the extra parameter some servers add next to the invoice.
ADDRESS = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"


@dataclass(frozen=True)
class Parts:
    """What a challenge is built from. `macaroon` is already in the shape's base64 flavour."""

    macaroon: str
    invoice: str
    # Same payment hash as `macaroon` but signed with DECOY_SECRET: paying with it gets a 401.
    decoy_macaroon: str
    # A payable invoice from the same ledger for another payment hash.
    decoy_invoice: str


@dataclass(frozen=True)
class Shape:
    headers: Callable[[Parts], list[str]]
    # The scheme of the first L402/LSAT challenge listed: the one the client must answer with.
    scheme: str
    # Re-encodes the macaroon (standard padded base64, as minted) for the wire.
    encode: Callable[[str], str] = lambda macaroon: macaroon
    # Re-mint (new token_id) until this holds, so a flavour really shows (e.g. `-` or `_`).
    wants: Callable[[str], bool] = lambda _macaroon: True
    # The service minted into the macaroon when not the shape's name (see service_for).
    service: str | None = None


def _urlsafe_unpadded(macaroon: str) -> str:
    return base64.urlsafe_b64encode(b64decode_any(macaroon)).decode().rstrip("=")


def _urlsafe_padded(macaroon: str) -> str:
    return base64.urlsafe_b64encode(b64decode_any(macaroon)).decode()


def _std_unpadded(macaroon: str) -> str:
    return macaroon.rstrip("=")


def _has_urlsafe_chars(text: str) -> bool:
    return "-" in text or "_" in text


def _has_std_chars(text: str) -> bool:
    return "+" in text or "/" in text


def _l402(p: Parts) -> str:
    return f'L402 macaroon="{p.macaroon}", invoice="{p.invoice}"'


def _lsat(p: Parts) -> str:
    return f'LSAT macaroon="{p.macaroon}", invoice="{p.invoice}"'


SHAPES: dict[str, Shape] = {
    "spec": Shape(
        lambda p: [f'L402 version="0", token="{p.macaroon}", invoice="{p.invoice}"'], "L402"
    ),
    "aperture": Shape(lambda p: [_lsat(p), _l402(p)], "LSAT"),
    "aperture-l402-first": Shape(lambda p: [_l402(p), _lsat(p)], "L402"),
    "aperture-with-spec-params": Shape(
        lambda p: [
            f'{_lsat(p)}, version="0", token="{p.macaroon}"',
            f'{_l402(p)}, version="0", token="{p.macaroon}"',
        ],
        "LSAT",
    ),
    "lsat-only": Shape(lambda p: [_lsat(p)], "LSAT"),
    "lower-case-l402": Shape(
        lambda p: [f'l402 macaroon="{p.macaroon}", invoice="{p.invoice}"'], "L402"
    ),
    "lower-case-lsat": Shape(
        lambda p: [f'lsat token="{p.macaroon}", invoice="{p.invoice}"'], "LSAT"
    ),
    "mixed-case": Shape(lambda p: [f'lSaT macaroon="{p.macaroon}", invoice="{p.invoice}"'], "LSAT"),
    "token-only": Shape(lambda p: [f'L402 token="{p.macaroon}", invoice="{p.invoice}"'], "L402"),
    "macaroon-only": Shape(lambda p: [_l402(p)], "L402"),
    "macaroon-with-version": Shape(
        lambda p: [f'L402 version="0", macaroon="{p.macaroon}", invoice="{p.invoice}"'], "L402"
    ),
    "unquoted": Shape(lambda p: [f"L402 macaroon={p.macaroon}, invoice={p.invoice}"], "L402"),
    "unquoted-spec": Shape(
        lambda p: [f"L402 version=0, token={p.macaroon}, invoice={p.invoice}"], "L402"
    ),
    "single-quoted": Shape(
        lambda p: [f"L402 macaroon='{p.macaroon}', invoice='{p.invoice}'"], "L402"
    ),
    "mixed-quoting": Shape(
        lambda p: [f"L402 version=0, token='{p.macaroon}', invoice=\"{p.invoice}\""], "L402"
    ),
    "no-space-after-comma": Shape(
        lambda p: [f'L402 version="0",token="{p.macaroon}",invoice="{p.invoice}"'], "L402"
    ),
    "space-separated": Shape(
        lambda p: [f'L402 macaroon="{p.macaroon}" invoice="{p.invoice}"'], "L402"
    ),
    "space-separated-unquoted": Shape(
        lambda p: [f"L402 version=0 token={p.macaroon} invoice={p.invoice}"], "L402"
    ),
    "reverse-order": Shape(
        lambda p: [f'L402 invoice="{p.invoice}", token="{p.macaroon}", version="0"'], "L402"
    ),
    "reverse-order-aperture": Shape(
        lambda p: [
            f'LSAT invoice="{p.invoice}", macaroon="{p.macaroon}"',
            f'L402 invoice="{p.invoice}", macaroon="{p.macaroon}"',
        ],
        "LSAT",
    ),
    "unknown-params": Shape(
        lambda p: [
            f'L402 address="{ADDRESS}", macaroon="{p.macaroon}", realm="podcast", '
            f'invoice="{p.invoice}", amount=21, description="one episode"'
        ],
        "L402",
    ),
    "bearer-first": Shape(lambda p: [f'Bearer realm="api", {_l402(p)}'], "L402"),
    "bearer-first-no-comma": Shape(lambda p: [f'Bearer realm="api" {_l402(p)}'], "L402"),
    "payment-first": Shape(lambda p: [f'Payment id="x", method="lightning", {_l402(p)}'], "L402"),
    # Another scheme's invoice= and token= / macaroon= must not leak into the L402 challenge.
    "payment-first-own-invoice": Shape(
        lambda p: [
            f'Payment id="x", method="lightning", invoice="{p.decoy_invoice}", '
            f'L402 version="0", token="{p.macaroon}", invoice="{p.invoice}"'
        ],
        "L402",
    ),
    "bearer-own-token": Shape(
        lambda p: [
            f'Bearer realm="api", token="{p.decoy_macaroon}", '
            f'L402 version="0", token="{p.macaroon}", invoice="{p.invoice}"'
        ],
        "L402",
    ),
    "bearer-own-macaroon": Shape(
        lambda p: [
            f'Bearer realm="api", macaroon="{p.decoy_macaroon}", '
            f'L402 token="{p.macaroon}", invoice="{p.invoice}"'
        ],
        "L402",
    ),
    "bearer-after-l402": Shape(
        lambda p: [
            f'L402 token="{p.macaroon}", invoice="{p.invoice}", '
            f'Bearer realm="api", token="{p.decoy_macaroon}", invoice="{p.decoy_invoice}"'
        ],
        "L402",
    ),
    "bearer-token68-first": Shape(lambda p: [f"Negotiate YWJjZGVm==, {_l402(p)}"], "L402"),
    "one-line-lsat-then-l402": Shape(lambda p: [f"{_lsat(p)}, {_l402(p)}"], "LSAT"),
    "one-line-l402-then-lsat": Shape(lambda p: [f"{_l402(p)}, {_lsat(p)}"], "L402"),
    "lines-other-scheme-first": Shape(
        lambda p: [
            'Bearer realm="api", error="invalid_token"',
            'Basic realm="x"',
            _l402(p),
            _lsat(p),
        ],
        "L402",
    ),
    "lines-decoy-first": Shape(
        lambda p: [
            f'Bearer realm="api", token="{p.decoy_macaroon}", invoice="{p.decoy_invoice}"',
            _lsat(p),
        ],
        "LSAT",
    ),
    "b64-std-padded": Shape(lambda p: [_l402(p)], "L402", wants=_has_std_chars),
    "b64-std-unpadded": Shape(lambda p: [_l402(p)], "L402", _std_unpadded, _has_std_chars),
    "b64-urlsafe-unpadded": Shape(
        lambda p: [f'L402 version="0", token="{p.macaroon}", invoice="{p.invoice}"'],
        "L402",
        _urlsafe_unpadded,
        _has_urlsafe_chars,
    ),
    "b64-urlsafe-padded": Shape(lambda p: [_lsat(p)], "LSAT", _urlsafe_padded, _has_urlsafe_chars),
    "b64-urlsafe-unquoted": Shape(
        lambda p: [f"L402 macaroon={p.macaroon}, invoice={p.invoice}"],
        "L402",
        _urlsafe_unpadded,
        _has_urlsafe_chars,
    ),
    # The service name is the server's text, shown in X-L402-Paid: it must not break the
    # client (httpx header values are ASCII).
    "non-ascii-service": Shape(lambda p: [_l402(p)], "L402", service="épisode-ünïcödé-⚡"),
}


@dataclass(frozen=True)
class Bad:
    # Status of the answer that carries the challenge.
    status: int
    # X-L402-Refused codes the client may answer with; None: no header.
    refused: tuple[str | None, ...]


BAD: dict[str, Bad] = {
    "hash-mismatch": Bad(402, ("hash_mismatch",)),
    "hash-mismatch-aperture": Bad(402, ("hash_mismatch",)),
    "no-amount": Bad(402, ("no_amount",)),
    "invoice-expired": Bad(402, ("invoice_expired",)),
    "over-max-price": Bad(402, ("max_price",)),
    "status-401": Bad(401, (None,)),
    "status-403": Bad(403, (None,)),
    "status-200": Bad(200, (None,)),
    "garbled-macaroon": Bad(402, ("bad_challenge",)),
    "macaroon-not-base64": Bad(402, ("bad_challenge",)),
    "macaroon-truncated": Bad(402, ("bad_challenge",)),
    "garbled-invoice": Bad(402, ("bad_challenge",)),
    # A services caveat the client cannot read, in text that is not ASCII.
    "unreadable-caveat": Bad(402, ("bad_challenge",)),
    # A service name that would split the response header (CR LF) if it reached one.
    "control-chars-in-service": Bad(402, ("bad_challenge",)),
    # Not an L402 challenge at all: passing it through untouched is as right as refusing it.
    "no-challenge": Bad(402, (None, "bad_challenge")),
    "other-schemes-only": Bad(402, (None, "bad_challenge")),
    "macaroon-without-invoice": Bad(402, (None, "bad_challenge")),
}


@dataclass
class ChallengeOrigin:
    url: str
    ledger: DevLedger
    ledger_path: Path
    # Per request path: requests seen, 402/401 challenges sent, credentials accepted.
    requests: Counter[str] = field(default_factory=Counter)
    challenges: Counter[str] = field(default_factory=Counter)
    granted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    # Per request path: every Authorization value received, in order.
    authorizations: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # Per request path: the WWW-Authenticate lines of each challenge sent.
    sent: defaultdict[str, list[list[str]]] = field(default_factory=lambda: defaultdict(list))
    # Per request path: payment hashes of every invoice put in a challenge (decoys included).
    invoices: defaultdict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    _services: dict[str, str] = field(default_factory=dict)

    # -- helpers for tests -----------------------------------------------------------------

    def service_for(self, name: str) -> str:
        """The service a shape's macaroon is minted for.

        Chosen so that the standard base64 macaroon ends in `=` padding: the unquoted shapes
        must carry their padding through the parser, and the unpadded ones must strip some.
        """
        if name not in self._services:
            base = SHAPES[name].service if name in SHAPES else None
            for suffix in ("", "-x", "-xx"):
                service = f"{base or name}{suffix}"
                probe = mint(b"k", Identifier.new(bytes(32)), self._caveats(service))
                if probe.endswith("="):
                    self._services[name] = service
                    break
            else:
                raise AssertionError(f"no padded macaroon for {name}")
        return self._services[name]

    # -- minting ----------------------------------------------------------------------------

    @staticmethod
    def _caveats(service: str) -> list[str]:
        valid_until = int(time.time()) + TOKEN_LIFETIME
        if any(char in service for char in "\r\n"):
            # A hostile server mints whatever it likes; caveats_for refuses such a name.
            return [f"services={service}:0", f"{service}_valid_until={valid_until}"]
        return caveats_for(service, valid_until=valid_until, capabilities=None)

    @staticmethod
    def _mint(payment_hash: bytes, service: str, secret: bytes = SECRET) -> str:
        identifier = Identifier.new(payment_hash)
        return mint(
            derive_root_key(secret, identifier.token_id),
            identifier,
            ChallengeOrigin._caveats(service),
        )

    async def _invoice(self, path: str, amount_sat: int, memo: str) -> tuple[str, bytes]:
        invoice = await self.ledger.create_invoice(
            MERCHANT, amount_sat * 1000, memo, INVOICE_EXPIRY
        )
        self.invoices[path].append(invoice.payment_hash)
        return invoice.bolt11, invoice.payment_hash

    async def _parts(self, path: str, name: str, shape: Shape) -> Parts:
        service = self.service_for(name)
        invoice, payment_hash = await self._invoice(path, PRICE_SAT, f"shape {name}")
        decoy_invoice, _ = await self._invoice(path, PRICE_SAT, f"decoy {name}")
        decoy = self._mint(payment_hash, service, DECOY_SECRET)
        # A random token_id changes the encoding; 64 tries miss a wanted character with
        # probability below 1e-70.
        for _ in range(64):
            macaroon = shape.encode(self._mint(payment_hash, service))
            if shape.wants(macaroon):
                break
        else:
            raise AssertionError(f"could not mint a macaroon shaped for {name}")
        return Parts(macaroon, invoice, shape.encode(decoy), decoy_invoice)

    # -- HTTP -------------------------------------------------------------------------------

    def _answer(self, path: str, status: int, lines: list[str], body: str) -> web.Response:
        response = web.Response(status=status, text=body)
        for line in lines:
            response.headers.add("WWW-Authenticate", line)
        if status in (401, 402):
            response.headers["Cache-Control"] = "no-store"
        self.sent[path].append(lines)
        self.challenges[path] += 1
        return response

    def _check(self, authorization: str, service: str) -> int:
        """200 for a valid credential; else what our server answers: 401 invalid, 402 stale."""
        try:
            credential = parse_credential(authorization)
            for macaroon in credential.macaroons:
                verify(
                    macaroon,
                    credential.preimage,
                    lambda token_id: derive_root_key(SECRET, token_id),
                    service=service,
                    now=time.time(),
                )
        except CredentialError:
            return 401
        except TokenError as exc:
            return 401 if exc.invalid else 402
        return 200

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind, name, path = request.match_info["kind"], request.match_info["name"], request.path
        self.requests[path] += 1
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            self.authorizations[path].append(authorization)
        if kind == "shape" and name in SHAPES:
            return await self._shape(path, name, SHAPES[name], authorization)
        if kind == "bad" and name in BAD:
            if authorization is not None:
                # Nothing here is payable: any credential is a payment that should not be.
                self.rejected[path] += 1
                return web.Response(status=401, text="never payable\n")
            return await self._bad(path, name)
        raise web.HTTPNotFound()

    async def _shape(
        self, path: str, name: str, shape: Shape, authorization: str | None
    ) -> web.StreamResponse:
        status = 402
        if authorization is not None:
            status = self._check(authorization, self.service_for(name))
            if status == 200:
                self.granted[path] += 1
                return web.Response(text=f"paid {name}")
            self.rejected[path] += 1
        parts = await self._parts(path, name, shape)
        return self._answer(path, status, shape.headers(parts), "payment required\n")

    async def _bad(self, path: str, name: str) -> web.StreamResponse:
        service = f"bad-{name}"
        bad = BAD[name]
        if name == "no-amount":
            invoice, payment_hash = await self._foreign_invoice(amount_msat=None)
            self.invoices[path].append(payment_hash)
        elif name == "invoice-expired":
            invoice, payment_hash = await self._expired_invoice()
            self.invoices[path].append(payment_hash)
        else:
            price = EXPENSIVE_SAT if name == "over-max-price" else PRICE_SAT
            invoice, payment_hash = await self._invoice(path, price, f"bad {name}")
        macaroon = self._mint(payment_hash, service)

        if name.startswith("hash-mismatch"):
            macaroon = self._mint(hashlib.sha256(os.urandom(32)).digest(), service)
        elif name == "garbled-macaroon":
            # Base64 of bytes that start like a V2 macaroon and then make no sense.
            macaroon = base64.b64encode(b"\x02" + os.urandom(90)).decode()
        elif name == "macaroon-not-base64":
            macaroon = "%%not*base64!!"
        elif name == "macaroon-truncated":
            # The identifier (and so the payment hash) is intact; the signature is gone.
            macaroon = _std_unpadded(macaroon)[:-20]
        elif name == "garbled-invoice":
            invoice = "lnbcrt210n1garbage"
        elif name == "unreadable-caveat":
            identifier = Identifier.new(payment_hash)
            key = derive_root_key(SECRET, identifier.token_id)
            macaroon = mint(key, identifier, ["services=épisode"])
        elif name == "control-chars-in-service":
            identifier = Identifier.new(payment_hash)
            key = derive_root_key(SECRET, identifier.token_id)
            macaroon = mint(key, identifier, ["services=evil\r\n\r\ninjected;body:0"])

        lines = [
            f'LSAT macaroon="{macaroon}", invoice="{invoice}"',
            f'L402 macaroon="{macaroon}", invoice="{invoice}"',
        ]
        if name in ("hash-mismatch", "garbled-macaroon", "macaroon-not-base64"):
            lines = [f'L402 version="0", token="{macaroon}", invoice="{invoice}"']
        elif name == "no-challenge":
            lines = []
        elif name == "other-schemes-only":
            lines = [
                'Bearer realm="api"',
                f'Payment id="x", method="lightning", invoice="{invoice}"',
            ]
        elif name == "macaroon-without-invoice":
            lines = [f'L402 macaroon="{macaroon}"', f'LSAT macaroon="{macaroon}"']
        body = "free content\n" if bad.status == 200 else "payment required\n"
        return self._answer(path, bad.status, lines, body)

    async def _foreign_invoice(self, *, amount_msat: int | None) -> tuple[str, bytes]:
        """A valid regtest invoice signed with the ledger's node key but not in its tables."""
        await self.ledger.open()
        with contextlib.closing(sqlite3.connect(self.ledger_path)) as db:
            (key_bytes,) = db.execute("SELECT value FROM meta WHERE key = 'node_key'").fetchone()
        key = PrivateKey(bytes(key_bytes))
        payment_hash = hashlib.sha256(os.urandom(32)).digest()
        bolt11 = encode_invoice(
            key=key,
            currency=CURRENCY,
            amount_msat=amount_msat,
            created_at=int(time.time()),
            payment_hash=payment_hash,
            payment_secret=os.urandom(32),
            description="no amount",
            expiry=INVOICE_EXPIRY,
            min_final_cltv_expiry=MIN_FINAL_CLTV_EXPIRY,
            payee=key.public_key.format(compressed=True),
        )
        return bolt11, payment_hash

    async def _expired_invoice(self) -> tuple[str, bytes]:
        """A real ledger invoice created an hour ago that expired a minute after."""
        past = DevLedger(self.ledger_path, clock=lambda: time.time() - 3600)
        try:
            invoice = await past.create_invoice(MERCHANT, PRICE_SAT * 1000, "expired", 60)
        finally:
            await past.close()
        return invoice.bolt11, invoice.payment_hash


@contextlib.asynccontextmanager
async def challenge_origin(ledger_path: str | Path) -> AsyncIterator[ChallengeOrigin]:
    """Serve the challenge origin on 127.0.0.1 (a free port) for the duration of the block."""
    ledger_path = Path(ledger_path)
    ledger = DevLedger(ledger_path)
    await ledger.open()
    runner: web.AppRunner | None = None
    try:
        app = web.Application()
        origin = ChallengeOrigin(url="", ledger=ledger, ledger_path=ledger_path)
        app.router.add_get(r"/{kind:shape|bad}/{name}", origin.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        origin.url = f"http://127.0.0.1:{port}"
        yield origin
    finally:
        if runner is not None:
            await runner.cleanup()
        await ledger.close()
