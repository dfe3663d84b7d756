"""Nostr, as much of it as Nostr Wallet Connect (nwc.py) needs.

- NIP-01 events: the id is sha256 of the serialized `[0, pubkey, created_at, kind, tags,
  content]`, signed with BIP-340 schnorr over secp256k1 (coincurve). Every event a relay hands
  us is checked (id and signature) before anyone looks at it.
- NIP-44 v2 payload encryption (ECDH x coordinate, HKDF-SHA256, ChaCha20, HMAC-SHA256, the
  spec's padding), checked against the official test vectors (paulmillr/nip44).
- NIP-04 (AES-256-CBC), only for wallets that announce nothing else.
- A small relay client (`RelayPool`) over aiohttp websockets: several relays at once; REQ,
  EVENT, CLOSE out; EVENT, OK, EOSE, CLOSED, NOTICE in; each relay reconnects by itself with a
  bounded backoff and gets its subscriptions again; every wait is bounded.

No secret key ever leaves this module in a message: errors name relays (redacted) and what
failed, never keys or payloads.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from coincurve import PrivateKey, PublicKey, PublicKeyXOnly
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from l402proxy.lightning.common import one_line
from l402proxy.lightning.uri import redact

log = logging.getLogger(__name__)


class NostrError(ValueError):
    """A key, event or payload that is not what the NIPs say; the message holds no secret."""


class RelayError(Exception):
    """No relay could do what was asked (connect, take an event, answer a query); one line."""


# -- keys -------------------------------------------------------------------------------------

_HEX64_CHARS: Final = frozenset("0123456789abcdef")


def is_hex(text: object, length: int) -> bool:
    """Whether `text` is exactly `length` lowercase hex digits."""
    return isinstance(text, str) and len(text) == length and set(text) <= _HEX64_CHARS


def private_key(secret: bytes) -> PrivateKey:
    """The secp256k1 key for a 32-byte secret; NostrError unless it is a scalar in [1, n-1]."""
    if not isinstance(secret, bytes) or len(secret) != 32:
        raise NostrError("a secret key is 32 bytes")
    try:
        return PrivateKey(secret)
    except ValueError:
        raise NostrError("the secret key is not a valid secp256k1 key (0 or not below n)") from None


def public_key_hex(key: PrivateKey) -> str:
    """The x-only public key (BIP-340), as Nostr writes it: 64 lowercase hex digits."""
    return key.public_key_xonly.format().hex()


def _point(pubkey: str | bytes) -> PublicKey:
    """The curve point with x coordinate `pubkey` and even y (BIP-340 `lift_x`)."""
    raw = bytes.fromhex(pubkey) if isinstance(pubkey, str) and is_hex(pubkey, 64) else pubkey
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise NostrError("a public key is 32 bytes (64 hex digits)")
    try:
        return PublicKey(b"\x02" + raw)
    except ValueError:
        raise NostrError("the public key is not a point on secp256k1") from None


def check_public_key(pubkey: str) -> str:
    """`pubkey` if it is a valid x-only public key in lowercase hex, else NostrError."""
    if not is_hex(pubkey, 64):
        raise NostrError("a public key is 64 lowercase hex digits")
    _point(pubkey)
    return pubkey


def shared_x(secret: PrivateKey, pubkey: str | bytes) -> bytes:
    """ECDH as NIP-04 and NIP-44 use it: the x coordinate of secret * P, not hashed (most
    libraries hash it by default; coincurve's `ecdh` does, so the point is multiplied here)."""
    try:
        return _point(pubkey).multiply(secret.secret).format(compressed=True)[1:]
    except ValueError:
        raise NostrError("ECDH failed: the public key is not usable") from None


# -- NIP-01 events ----------------------------------------------------------------------------

MAX_KIND: Final = 65535


@dataclass(frozen=True)
class Event:
    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: tuple[tuple[str, ...], ...]
    content: str
    sig: str

    def tag(self, name: str) -> str | None:
        """The value of the first `name` tag, or None."""
        for tag in self.tags:
            if len(tag) >= 2 and tag[0] == name:
                return tag[1]
        return None

    def tag_values(self, name: str) -> list[str]:
        return [tag[1] for tag in self.tags if len(tag) >= 2 and tag[0] == name]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(tag) for tag in self.tags],
            "content": self.content,
            "sig": self.sig,
        }

    @classmethod
    def from_json(cls, value: object) -> "Event":
        """An event from a relay, its shape checked (not its signature: `verify`)."""
        if not isinstance(value, dict):
            raise NostrError("an event is a JSON object")
        created_at, kind, tags = value.get("created_at"), value.get("kind"), value.get("tags")
        if not (is_hex(value.get("id"), 64) and is_hex(value.get("pubkey"), 64)):
            raise NostrError("event id and pubkey must be 64 lowercase hex digits")
        if not is_hex(value.get("sig"), 128):
            raise NostrError("event sig must be 128 lowercase hex digits")
        if not _is_int(created_at) or created_at < 0:
            raise NostrError("event created_at must be a non-negative integer")
        if not _is_int(kind) or not 0 <= kind <= MAX_KIND:
            raise NostrError(f"event kind must be an integer from 0 to {MAX_KIND}")
        if not isinstance(tags, list) or not all(
            isinstance(tag, list) and all(isinstance(item, str) for item in tag) for tag in tags
        ):
            raise NostrError("event tags must be arrays of strings")
        if not isinstance(value.get("content"), str):
            raise NostrError("event content must be a string")
        return cls(
            id=value["id"],
            pubkey=value["pubkey"],
            created_at=created_at,
            kind=kind,
            tags=tuple(tuple(tag) for tag in tags),
            content=value["content"],
            sig=value["sig"],
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def serialize(
    pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
) -> bytes:
    """NIP-01's serialization: compact JSON, UTF-8, characters verbatim except what JSON must
    escape (`"`, `\\`, control characters) - what JSON.stringify writes, so ids agree with the
    JavaScript implementations. A lone surrogate has no UTF-8 form: NostrError."""
    text = json.dumps(
        [0, pubkey, created_at, kind, [list(tag) for tag in tags], content],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise NostrError("the event holds text that is not valid Unicode") from None


def event_id(
    pubkey: str, created_at: int, kind: int, tags: Sequence[Sequence[str]], content: str
) -> str:
    return hashlib.sha256(serialize(pubkey, created_at, kind, tags, content)).hexdigest()


def sign_event(
    key: PrivateKey,
    kind: int,
    tags: Sequence[Sequence[str]],
    content: str,
    created_at: int | None = None,
) -> Event:
    """A new event by `key`, with its id and a BIP-340 signature (fresh auxiliary randomness)."""
    pubkey = public_key_hex(key)
    when = int(time.time()) if created_at is None else created_at
    ident = event_id(pubkey, when, kind, tags, content)
    sig = key.sign_schnorr(bytes.fromhex(ident), secrets.token_bytes(32)).hex()
    return Event(ident, pubkey, when, kind, tuple(tuple(t) for t in tags), content, sig)


def verify_event(event: Event) -> bool:
    """Whether the event's id is the hash of its content and its signature is its author's."""
    try:
        ident = event_id(event.pubkey, event.created_at, event.kind, event.tags, event.content)
    except NostrError:
        return False
    if ident != event.id:
        return False
    try:
        return bool(
            PublicKeyXOnly(bytes.fromhex(event.pubkey)).verify(
                bytes.fromhex(event.sig), bytes.fromhex(event.id)
            )
        )
    except ValueError:  # not a point on the curve, or a malformed signature
        return False


# -- NIP-44 v2 --------------------------------------------------------------------------------

NIP44_VERSION: Final = 2
NIP44_SALT: Final = b"nip44-v2"
NIP44_MIN_PLAINTEXT: Final = 1
# The spec's absolute limit (2^32 - 1, with the 6-byte length prefix from 65536 on).
NIP44_SPEC_MAX_PLAINTEXT: Final = 2**32 - 1
# Ours by default: what every NIP-44 v2 implementation reads (the 2-byte prefix, up to 2023's
# limit). NWC messages are a few hundred bytes; anything bigger is refused before decoding.
NIP44_MAX_PLAINTEXT: Final = 65535
_EXTENDED_PREFIX_FROM: Final = 65536


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def conversation_key(secret: PrivateKey, pubkey: str | bytes) -> bytes:
    """NIP-44's long-term key between two parties: the same from either side."""
    return _hkdf_extract(NIP44_SALT, shared_x(secret, pubkey))


def message_keys(conv_key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """(chacha key, chacha nonce, hmac key) for one message."""
    if len(conv_key) != 32:
        raise NostrError("NIP-44: the conversation key must be 32 bytes")
    if len(nonce) != 32:
        raise NostrError("NIP-44: the nonce must be 32 bytes")
    keys = _hkdf_expand(conv_key, nonce, 76)
    return keys[0:32], keys[32:44], keys[44:76]


def calc_padded_len(unpadded_len: int) -> int:
    """NIP-44's padded length: 32 bytes at least, then steps that grow with the length."""
    if unpadded_len <= 32:
        return 32
    next_power = 1 << (unpadded_len - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((unpadded_len - 1) // chunk + 1)


def _prefix_len(unpadded_len: int) -> int:
    return 2 if unpadded_len < _EXTENDED_PREFIX_FROM else 6


def pad(plaintext: str, max_plaintext: int = NIP44_MAX_PLAINTEXT) -> bytes:
    unpadded = plaintext.encode("utf-8")
    size = len(unpadded)
    limit = min(max_plaintext, NIP44_SPEC_MAX_PLAINTEXT)
    if not NIP44_MIN_PLAINTEXT <= size <= limit:
        raise NostrError(f"NIP-44: plaintext must be 1 to {limit} bytes, not {size}")
    if size < _EXTENDED_PREFIX_FROM:
        prefix = size.to_bytes(2, "big")
    else:
        prefix = b"\x00\x00" + size.to_bytes(4, "big")
    return prefix + unpadded + bytes(calc_padded_len(size) - size)


def unpad(padded: bytes) -> str:
    if len(padded) < 2:
        raise NostrError("NIP-44: invalid padding")
    size = int.from_bytes(padded[0:2], "big")
    prefix = 2
    if size == 0:
        # Zero in the u16 means the 6-byte form; it must hold a length that needs it.
        if len(padded) < 6:
            raise NostrError("NIP-44: invalid padding")
        size = int.from_bytes(padded[2:6], "big")
        if size < _EXTENDED_PREFIX_FROM:
            raise NostrError("NIP-44: invalid padding")
        prefix = 6
    unpadded = padded[prefix : prefix + size]
    if size == 0 or len(unpadded) != size or len(padded) != prefix + calc_padded_len(size):
        raise NostrError("NIP-44: invalid padding")
    try:
        return unpadded.decode("utf-8")
    except UnicodeDecodeError:
        raise NostrError("NIP-44: the plaintext is not UTF-8") from None


def _chacha20(key: bytes, nonce: bytes, data: bytes) -> bytes:
    # `cryptography` takes a 16-byte nonce: the 32-bit little-endian block counter (0, as
    # RFC 8439 and NIP-44 start it) followed by the 96-bit nonce.
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce), mode=None)
    encryptor = cipher.encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _hmac_aad(key: bytes, message: bytes, aad: bytes) -> bytes:
    if len(aad) != 32:
        raise NostrError("NIP-44: the associated data must be 32 bytes")
    return hmac.new(key, aad + message, hashlib.sha256).digest()


def _b64_len(raw_len: int) -> int:
    return 4 * ((raw_len + 2) // 3)


def max_payload_chars(max_plaintext: int = NIP44_MAX_PLAINTEXT) -> int:
    """The longest base64 payload whose plaintext can be `max_plaintext` bytes."""
    size = min(max_plaintext, NIP44_SPEC_MAX_PLAINTEXT)
    return _b64_len(1 + 32 + _prefix_len(size) + calc_padded_len(size) + 32)


def nip44_encrypt(
    plaintext: str,
    conv_key: bytes,
    nonce: bytes | None = None,
    *,
    max_plaintext: int = NIP44_MAX_PLAINTEXT,
) -> str:
    """A NIP-44 v2 payload; `nonce` only for test vectors (a fresh random one otherwise)."""
    nonce = secrets.token_bytes(32) if nonce is None else nonce
    chacha_key, chacha_nonce, hmac_key = message_keys(conv_key, nonce)
    ciphertext = _chacha20(chacha_key, chacha_nonce, pad(plaintext, max_plaintext))
    mac = _hmac_aad(hmac_key, ciphertext, nonce)
    return base64.b64encode(bytes([NIP44_VERSION]) + nonce + ciphertext + mac).decode("ascii")


def nip44_decrypt(
    payload: str, conv_key: bytes, *, max_plaintext: int = NIP44_MAX_PLAINTEXT
) -> str:
    """The plaintext of a NIP-44 v2 payload; NostrError for anything else (unknown version,
    bad size or base64, wrong MAC, bad padding), the MAC checked before decrypting."""
    if not isinstance(payload, str) or not payload or payload[0] == "#":
        raise NostrError("NIP-44: unknown encryption version")
    # Sizes first: nothing oversized is base64-decoded.
    if not 132 <= len(payload) <= max_payload_chars(max_plaintext):
        raise NostrError(f"NIP-44: invalid payload size ({len(payload)} characters)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise NostrError("NIP-44: invalid base64") from None
    if len(data) < 99:
        raise NostrError("NIP-44: invalid data size")
    if data[0] != NIP44_VERSION:
        raise NostrError(f"NIP-44: unknown encryption version {data[0]}")
    nonce, ciphertext, mac = data[1:33], data[33:-32], data[-32:]
    chacha_key, chacha_nonce, hmac_key = message_keys(conv_key, nonce)
    if not hmac.compare_digest(_hmac_aad(hmac_key, ciphertext, nonce), mac):
        raise NostrError("NIP-44: invalid MAC")
    plaintext = unpad(_chacha20(chacha_key, chacha_nonce, ciphertext))
    if len(plaintext.encode("utf-8")) > max_plaintext:
        raise NostrError("NIP-44: plaintext longer than allowed")
    return plaintext


# -- NIP-04 (deprecated; only for wallets that offer nothing else) ------------------------------

NIP04_SEPARATOR: Final = "?iv="
# The same bound as NIP-44's: a wallet's answer is small.
NIP04_MAX_PAYLOAD_CHARS: Final = max_payload_chars()


def nip04_encrypt(plaintext: str, secret: PrivateKey, pubkey: str) -> str:
    """`<base64 AES-256-CBC ciphertext>?iv=<base64 iv>`, keyed with the unhashed ECDH x."""
    iv = secrets.token_bytes(16)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(shared_x(secret, pubkey)), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return (
        f"{base64.b64encode(ciphertext).decode('ascii')}{NIP04_SEPARATOR}"
        f"{base64.b64encode(iv).decode('ascii')}"
    )


def nip04_decrypt(payload: str, secret: PrivateKey, pubkey: str) -> str:
    """The plaintext of a NIP-04 payload; NostrError for anything else. NIP-04 has no MAC: the
    event's signature is what says who wrote it."""
    if not isinstance(payload, str) or len(payload) > NIP04_MAX_PAYLOAD_CHARS:
        raise NostrError("NIP-04: invalid payload size")
    body, sep, iv_text = payload.partition(NIP04_SEPARATOR)
    if not sep:
        raise NostrError("NIP-04: no ?iv= in the payload")
    try:
        ciphertext = base64.b64decode(body, validate=True)
        iv = base64.b64decode(iv_text, validate=True)
    except (binascii.Error, ValueError):
        raise NostrError("NIP-04: invalid base64") from None
    if len(iv) != 16 or not ciphertext or len(ciphertext) % 16:
        raise NostrError("NIP-04: invalid iv or ciphertext length")
    decryptor = Cipher(algorithms.AES(shared_x(secret, pubkey)), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
        return plain.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise NostrError("NIP-04: wrong key or damaged payload") from None


# -- relays -----------------------------------------------------------------------------------

# One connection attempt: a relay that is up answers the websocket upgrade within this.
CONNECT_SECONDS: Final = 5.0
# Between attempts, after a failure or a lost connection: doubling, never longer than the max.
BACKOFF_FIRST_SECONDS: Final = 0.25
BACKOFF_MAX_SECONDS: Final = 10.0
# A connection that lasted this long was a good one: the next failure starts the backoff anew.
STABLE_SECONDS: Final = 10.0
# Someone waiting for a relay wakes it from its backoff, but never more often than this.
KICK_MIN_SECONDS: Final = 0.5
# Websocket pings: a relay that stops answering them is taken for gone and reconnected.
HEARTBEAT_SECONDS: Final = 20.0
# How long a relay may take to say OK to an event.
OK_SECONDS: Final = 5.0
# Closing a websocket politely, at most.
CLOSE_SECONDS: Final = 2.0
# Relay messages are small for us; anything bigger is a broken or hostile relay.
MAX_MESSAGE_BYTES: Final = 512 * 1024
# Events already delivered (several relays send each one): remembered this many.
SEEN_EVENTS: Final = 4096
# A relay's own words (NOTICE, CLOSED, OK false) in our messages: short.
RELAY_TEXT_CHARS: Final = 120


def relay_text(text: object) -> str:
    """A relay's message, as we show it: one short line."""
    return one_line(text if isinstance(text, str) else repr(text), RELAY_TEXT_CHARS)


# Name lookup failures: the OS resolver's, and aiohttp's own (3.11+, with aiodns).
_DNS_ERRORS: Final[tuple[type[BaseException], ...]] = tuple(
    kind
    for kind in (socket.gaierror, getattr(aiohttp, "ClientConnectorDNSError", None))
    if isinstance(kind, type)
)


def _failure(exc: BaseException) -> str:
    """A connection failure in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no websocket within {CONNECT_SECONDS:g} s"
    cause: BaseException | None = exc
    for _ in range(6):
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, aiohttp.WSServerHandshakeError):
            return f"no websocket there (HTTP {cause.status})"
        if isinstance(cause, aiohttp.ClientConnectorCertificateError):
            return "TLS certificate not accepted"
        if isinstance(cause, aiohttp.ClientSSLError):
            return "TLS handshake failed"
        if isinstance(cause, _DNS_ERRORS):
            return "cannot resolve the host name"
        cause = cause.__cause__ or cause.__context__
    return f"cannot connect ({relay_text(str(exc) or type(exc).__name__)})"


@dataclass
class Subscription:
    """One REQ, sent to every relay of the pool (again after each reconnect)."""

    sub_id: str
    # Called at every (re)subscription: a `since` may move with what is still awaited.
    filters: Callable[[], list[dict[str, Any]]]
    on_event: Callable[["Relay", Event], None]
    # Relay URLs that sent EOSE since our last REQ there / closed it (with their reason).
    eose: set[str] = field(default_factory=set)
    closed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    """What the relays said to one EVENT (relays by their shown URL)."""

    accepted: tuple[str, ...]  # OK true (or "duplicate:")
    refused: tuple[tuple[str, str], ...]  # OK false: (relay, its reason)
    silent: tuple[str, ...]  # sent, but no OK (in time, or before the connection broke)
    unsent: tuple[tuple[str, str], ...]  # could not even be sent: (relay, why)

    @property
    def maybe_sent(self) -> bool:
        """Whether any relay may have taken it (and passed it on)."""
        return bool(self.accepted or self.silent)

    def why_not(self) -> str:
        told = [f"{url} refused it ({reason})" for url, reason in self.refused]
        return "; ".join(told + [f"{url}: {why}" for url, why in self.unsent])


class Relay:
    """One relay: a websocket kept open by a task that reconnects with backoff."""

    def __init__(self, url: str, pool: "RelayPool") -> None:
        self.url = url
        self.shown = redact(url)
        self.pool = pool
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.failure: str | None = None  # why it is not connected, once an attempt failed
        # Connection attempts finished (failed or not): a waiter gives up once every relay
        # failed one that it saw start.
        self.attempts_done = 0
        self.task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._last_attempt = float("-inf")
        self._oks: dict[str, asyncio.Future[tuple[str, str]]] = {}
        self._warned = False

    @property
    def connected(self) -> bool:
        return self.ws is not None and not self.ws.closed

    def kick(self) -> None:
        """Someone needs this relay: skip the rest of the backoff."""
        self._kick.set()

    async def run(self) -> None:
        delay = BACKOFF_FIRST_SECONDS
        while True:
            self._last_attempt = time.monotonic()
            self._kick.clear()
            try:
                async with asyncio.timeout(CONNECT_SECONDS):
                    ws = await self.pool.session().ws_connect(
                        self.url,
                        heartbeat=HEARTBEAT_SECONDS,
                        max_msg_size=MAX_MESSAGE_BYTES,
                        autoclose=True,
                        autoping=True,
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.attempts_done += 1
                self._down(_failure(exc))
            else:
                self.attempts_done += 1
                began = time.monotonic()
                await self._serve(ws)
                if time.monotonic() - began >= STABLE_SECONDS:
                    delay = BACKOFF_FIRST_SECONDS
            # Backoff, cut short by kick() but never to less than KICK_MIN_SECONDS per attempt.
            wake = self._last_attempt + delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(wake - time.monotonic(), 0))
            rest = self._last_attempt + KICK_MIN_SECONDS - time.monotonic()
            if rest > 0:
                await asyncio.sleep(rest)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    def _down(self, why: str) -> None:
        self.failure = why
        if not self._warned:
            log.warning(f"l402: nostr relay {self.shown}: {why}; retrying by itself")
            self._warned = True
        self.pool.changed()

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.failure = None
        if self._warned:
            log.info(f"l402: nostr relay {self.shown} reachable again")
            self._warned = False
        try:
            for sub in list(self.pool.subscriptions.values()):
                await self._req(sub)
            self.pool.changed()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self._receive(message.data)
                elif message.type == aiohttp.WSMsgType.ERROR:
                    break
            why = "connection closed by the relay"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            why = f"connection lost ({relay_text(str(exc) or type(exc).__name__)})"
        finally:
            self.ws = None
            for sub in self.pool.subscriptions.values():
                sub.eose.discard(self.url)
            for future in self._oks.values():
                if not future.done():
                    # Sent, and then the connection broke: it may have been taken.
                    future.set_result(("silent", "connection lost before OK"))
            self._oks.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_SECONDS)
        self._down(why)

    async def send(self, message: list[Any]) -> bool:
        """Send one message now; False if not connected (or the send failed)."""
        ws = self.ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_str(json.dumps(message, separators=(",", ":"), ensure_ascii=False))
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False
        return True

    async def _req(self, sub: Subscription) -> None:
        sub.eose.discard(self.url)
        sub.closed.pop(self.url, None)
        await self.send(["REQ", sub.sub_id, *sub.filters()])

    async def publish(self, event: Event, timeout: float) -> tuple[str, str]:
        """Send the event and wait (at most `timeout`) for the relay's OK: ("accepted" |
        "refused" | "silent" | "unsent", the relay's words or why)."""
        future: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._oks[event.id] = future
        try:
            if not await self.send(["EVENT", event.to_json()]):
                return ("unsent", "not connected")
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                return ("silent", f"no OK within {timeout:g} s")
        finally:
            self._oks.pop(event.id, None)

    def _receive(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, list) or not message or not isinstance(message[0], str):
            return
        kind = message[0]
        if kind == "EVENT" and len(message) >= 3 and isinstance(message[1], str):
            self._event(message[1], message[2])
        elif kind == "OK" and len(message) >= 3 and isinstance(message[1], str):
            future = self._oks.get(message[1])
            if future is not None and not future.done():
                reason = relay_text(message[3]) if len(message) > 3 else ""
                # "duplicate:" - it has the event already: as good as taken.
                accepted = message[2] is True or reason.startswith("duplicate:")
                future.set_result(("accepted" if accepted else "refused", reason))
        elif kind == "EOSE" and len(message) >= 2:
            sub = self.pool.subscriptions.get(message[1])
            if sub is not None:
                sub.eose.add(self.url)
                self.pool.changed()
        elif kind == "CLOSED" and len(message) >= 2:
            sub = self.pool.subscriptions.get(message[1])
            if sub is not None:
                reason = relay_text(message[2]) if len(message) > 2 else "no reason given"
                sub.closed[self.url] = reason
                sub.eose.discard(self.url)
                log.warning(f"l402: nostr relay {self.shown} closed a subscription: {reason}")
                self.pool.changed()
        elif kind == "NOTICE" and len(message) >= 2:
            log.info(f"l402: nostr relay {self.shown} says: {relay_text(message[1])}")

    def _event(self, sub_id: str, value: object) -> None:
        sub = self.pool.subscriptions.get(sub_id)
        if sub is None:
            return
        try:
            event = Event.from_json(value)
        except NostrError:
            return
        if self.pool.seen(sub_id, event.id):
            return
        if not verify_event(event):
            log.debug(f"l402: nostr relay {self.shown} sent an event with a bad id or signature")
            return
        self.pool.remember(sub_id, event.id)
        try:
            sub.on_event(self, event)
        except Exception as exc:  # a subscriber's bug must not cost the connection
            log.warning(f"l402: nostr relay {self.shown}: handling an event failed: {exc!r}")


class RelayPool:
    """Several relays used as one. Cheap to make: nothing connects before the first use, and
    the connections belong to the event loop that first used them (a CLI's second
    `asyncio.run` gets new ones)."""

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = tuple(dict.fromkeys(urls))
        if not self.urls:
            raise RelayError("no relay given")
        self.relays: list[Relay] = []
        self.subscriptions: dict[str, Subscription] = {}
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        # Small sends started from sync code (a REQ to each relay): kept so none is collected.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def shown(self) -> str:
        return ", ".join(redact(url) for url in self.urls)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env=False: never through HTTP(S)_PROXY (inside mitmdump, that may be the
            # client proxy itself).
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    def _ensure(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self.relays:
            return
        # First use, or a new loop: whatever ran on the old one died with it.
        self._loop = loop
        self._session = None
        self._changed = asyncio.Event()
        for sub in self.subscriptions.values():
            sub.eose.clear()
            sub.closed.clear()
        self.relays = [Relay(url, self) for url in self.urls]
        for relay in self.relays:
            relay.task = loop.create_task(relay.run(), name=f"nostr relay {relay.shown}")

    def changed(self) -> None:
        """A relay connected, failed, or answered a subscription: wake whoever waits."""
        if self._changed is not None:
            self._changed.set()

    async def _wait_change(self, deadline: float) -> bool:
        assert self._changed is not None
        self._changed.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(self._changed.wait(), remaining)
        except TimeoutError:
            return False
        return True

    def seen(self, sub_id: str, event_id: str) -> bool:
        return (sub_id, event_id) in self._seen

    def remember(self, sub_id: str, event_id: str) -> None:
        self._seen[(sub_id, event_id)] = None
        while len(self._seen) > SEEN_EVENTS:
            self._seen.popitem(last=False)

    def failures(self) -> str:
        """Why the relays are not connected, one line."""
        parts = [f"{relay.shown}: {relay.failure or 'connecting'}" for relay in self.relays]
        return "; ".join(parts) or "no relay"

    async def connected(self, timeout: float) -> list[Relay]:
        """The relays connected now, waiting (at most `timeout`) for a first one. RelayError
        once every relay has failed an attempt made since the wait began."""
        self._ensure()
        deadline = time.monotonic() + timeout
        started = {id(relay): relay.attempts_done for relay in self.relays}
        while True:
            up = [relay for relay in self.relays if relay.connected]
            if up:
                return up
            if all(
                relay.attempts_done > started[id(relay)] and relay.failure for relay in self.relays
            ):
                raise RelayError(f"no relay reachable: {self.failures()}")
            for relay in self.relays:
                relay.kick()
            if not await self._wait_change(deadline):
                raise RelayError(f"no relay reachable within {timeout:g} s: {self.failures()}")

    def subscribe(
        self,
        filters: Callable[[], list[dict[str, Any]]],
        on_event: Callable[[Relay, Event], None],
        sub_id: str | None = None,
    ) -> Subscription:
        """Subscribe on every relay, now and after each reconnect."""
        self._ensure()
        sub = Subscription(sub_id or secrets.token_hex(8), filters, on_event)
        self.subscriptions[sub.sub_id] = sub
        for relay in self.relays:
            if relay.connected:
                self._spawn(relay._req(sub))
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if self.subscriptions.pop(sub.sub_id, None) is None:
            return
        for relay in self.relays:
            if relay.connected:
                await relay.send(["CLOSE", sub.sub_id])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def live(self, sub: Subscription, timeout: float) -> list[Relay]:
        """The relays on which `sub` is live (EOSE received), waiting for a first one at most
        `timeout`. RelayError when none can be: all closed it, or none is reachable."""
        deadline = time.monotonic() + timeout
        await self.connected(timeout)
        while True:
            up = [r for r in self.relays if r.connected and r.url in sub.eose]
            if up:
                return up
            candidates = [r for r in self.relays if r.url not in sub.closed]
            if not candidates:
                reasons = "; ".join(f"{redact(url)}: {why}" for url, why in sub.closed.items())
                raise RelayError(f"every relay refused the subscription: {reasons}")
            if not await self._wait_change(deadline):
                up = any(r.connected for r in self.relays)
                why = "connected, but no EOSE" if up else self.failures()
                raise RelayError(f"no relay answered the subscription within {timeout:g} s ({why})")

    async def publish(
        self, event: Event, relays: Sequence[Relay], timeout: float = OK_SECONDS
    ) -> Published:
        """Send `event` to `relays`; returns once one accepted it, or all said something, or
        `timeout` (at most OK_SECONDS) passed."""
        timeout = min(timeout, OK_SECONDS)
        tasks = {
            asyncio.get_running_loop().create_task(relay.publish(event, timeout)): relay.shown
            for relay in relays
        }
        outcomes: dict[str, list[tuple[str, str]]] = {
            "accepted": [],
            "refused": [],
            "silent": [],
            "unsent": [],
        }
        pending = set(tasks)
        try:
            while pending and not outcomes["accepted"]:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    outcome, words = task.result()
                    outcomes[outcome].append((tasks[task], words or "no reason given"))
        finally:
            for task in pending:
                task.cancel()
                # Sent, no answer yet: it may still be taken.
                outcomes["silent"].append((tasks[task], "no OK yet"))
        return Published(
            accepted=tuple(url for url, _ in outcomes["accepted"]),
            refused=tuple(outcomes["refused"]),
            silent=tuple(url for url, _ in outcomes["silent"]),
            unsent=tuple(outcomes["unsent"]),
        )

    async def fetch(self, filters: list[dict[str, Any]], timeout: float) -> list[Event]:
        """Stored events matching `filters`, from every reachable relay: until each has sent
        EOSE (or CLOSED), at most `timeout`."""
        events: dict[str, Event] = {}

        def keep(_: Relay, event: Event) -> None:
            events[event.id] = event

        deadline = time.monotonic() + timeout
        await self.connected(timeout)
        sub = self.subscribe(lambda: filters, keep)
        up: list[Relay] = []
        try:
            while True:
                up = [r for r in self.relays if r.connected]
                if up and all(r.url in sub.eose or r.url in sub.closed for r in up):
                    break
                if not await self._wait_change(deadline):
                    break
        finally:
            await self.unsubscribe(sub)
        if not events and up and all(r.url in sub.closed for r in up):
            reasons = "; ".join(f"{redact(url)}: {why}" for url, why in sub.closed.items())
            raise RelayError(f"every relay reached refused the query: {reasons}")
        return list(events.values())

    async def close(self) -> None:
        """Close every connection. Subscriptions are kept: used again, the pool reconnects
        and sends them anew."""
        relays, self.relays = self.relays, []
        same_loop = self._loop is asyncio.get_running_loop()
        if same_loop:
            tasks = [*(r.task for r in relays if r.task is not None), *self._tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._session is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._session.close(), CLOSE_SECONDS)
        self._session = None
        self._loop = None
