"""The mitmproxy client addon: a local proxy that pays L402 challenges for a player or browser.

    mitmdump --listen-host 127.0.0.1 -s addons/client.py \
        --set l402_max_price_sat=50 --set l402_budget_daily_sat=500

It spends only for clients in l402_clients (default: this machine).

Glue only: what to pay, limits, tokens and the ledger live in payer.py.
"""

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any, Optional
from urllib.parse import quote

import httpx
from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode, UpstreamMode

from . import paths
from .l402.headers import parse_challenges
from .l402.payment import ACCEPT_HEADER, RECEIPT_HEADER
from .lightning import LightningError, Wallet, open_wallet
from .options import OptionGuard
from .payer import (
    ACCEPT_PAYMENT,
    BALANCE_HEADER,
    MAX_PROBLEM_BODY,
    Answer,
    Await,
    Limits,
    Paid,
    Payer,
    Refused,
    Token,
    Verdict,
    has_charge_challenge,
    origin_of,
    parse_prefer,
    problem_type,
)
from .store.client import ClientStore
from .store.database import StoreError

log = logging.getLogger(__name__)

PAID_MARKER = ":zap:"
REFUSED_MARKER = ":no_entry:"
TOKEN_KEY = "l402_client_token"
ADVERTISED_KEY = "l402_client_advertised"
ADVERTISED_PAYMENT_KEY = "l402_client_advertised_payment"
RECOVERY_SECONDS = 30.0
RESEND_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
LIMIT_OPTIONS = (
    "l402_max_price_sat",
    "l402_max_fee_sat",
    "l402_budget_daily_sat",
    "l402_budget_total_sat",
    "l402_allow",
)
# What httpx adds to every request unless told otherwise; the retry is the player's request.
HTTPX_DEFAULTS = ("accept", "accept-encoding", "user-agent", "connection")
# Headers not copied to the retry or back to the player: those about one hop (the retry opens
# its own connection), the length (recomputed) and the credential (the retry sets its own).
NOT_COPIED = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"content-length",
        b"authorization",
    }
)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Who may make the proxy pay when l402_clients is empty: this machine only. (An IPv4 client on a
# dual-stack socket shows as ::ffff:127.x.y.z: client_allowed maps it back.)
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"))
# Foreign clients warned about once each (bounded: anyone may connect).
WARNED_CLIENTS_LIMIT = 1000


def parse_clients(value: str) -> tuple[Network, ...]:
    """l402_clients: comma-separated addresses or networks; empty means LOOPBACK.

    Raises ValueError naming the entry: a host name, or a network written with host bits
    (10.0.0.1/8 is refused, not read as 10.0.0.0/8: the user meant one or the other).
    """
    networks: list[Network] = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry)
        except ValueError as exc:
            if "host bits set" in str(exc):
                meant = ipaddress.ip_network(entry, strict=False)
                raise ValueError(
                    f"l402_clients: {entry} is not a network (host bits set): "
                    f"write {meant} for the network or {entry.split('/')[0]} for the address"
                ) from None
            raise ValueError(
                f"l402_clients: {entry!r} is not an IP address or network "
                "(like 192.168.1.0/24, 10.0.0.5 or fd00::/8)"
            ) from None
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            # ::ffff:10.0.0.0/104 is 10.0.0.0/8: peers are compared in their IPv4 form too.
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks) or LOOPBACK


def clients_text(networks: Sequence[Network]) -> str:
    """The networks as the user writes them: 127.0.0.0/8, ::1 (no /32 or /128)."""
    return ", ".join(str(n.network_address) if n.num_addresses == 1 else str(n) for n in networks)


def describe_clients(networks: Sequence[Network]) -> str:
    return f"paying for clients on {clients_text(networks)} only"


CLIENT_VERDICTS_LIMIT = 4096


def client_allowed(networks: tuple[Network, ...], host: str | None) -> bool:
    """May the client at `host` (a peer address as mitmproxy reports it) make the proxy pay?"""
    if not host:
        return False  # no peer address: never pay for an unknown client
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            candidates.append(ipaddress.IPv6Address(host.split("%", 1)[0]))
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    return any(a in n for a in candidates for n in networks if a.version == n.version)


def client_host(flow: http.HTTPFlow) -> str | None:
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else None


def request_url(request: http.Request) -> str:
    """The URL the player asked for, by name: what scopes, tokens and l402_allow are about.

    pretty_host prefers the Host header, so in transparent or WireGuard mode, where the
    connection only knows an IP address, the site is still known by its name. IPv6 hosts get
    their brackets (mitmproxy's request.url leaves them out).
    """
    return origin_of(request.scheme, request.pretty_host, request.port) + request.path


def answer_of(response: http.Response, url: str) -> Answer:
    return Answer(
        response.status_code,
        tuple(response.headers.get_all("WWW-Authenticate")),
        url,
        tuple(response.headers.get_all(BALANCE_HEADER)),
        tuple(response.headers.get_all(RECEIPT_HEADER)),
        problem_of(response),
    )


def problem_of(response: http.Response) -> str | None:
    """The problem type a 401/402's application/problem+json body names (Payment refusals)."""
    if response.status_code not in (401, 402) or response.raw_content is None:
        return None  # not a refusal, or streamed past us: no body to read
    if len(response.raw_content) > MAX_PROBLEM_BODY:
        return None
    try:
        body = response.get_content(strict=False)
    except ValueError:
        return None
    return problem_type(response.headers.get("Content-Type"), body)


async def resend(
    client: httpx.AsyncClient, request: http.Request, authorization: str | None, like: http.Response
) -> http.Response:
    """Send the request again, with `authorization`, and return the answer as it came.

    It goes where the first one went (the connection's address), named as the player named
    it (Host, and TLS server name when the address is not the name). Only the player's own
    headers go out (not httpx's defaults: no Accept-Encoding the player never asked for), and
    the body comes back as sent (still compressed, if it asked).
    """
    headers = [(k, v) for k, v in request.headers.fields if k.lower() not in NOT_COPIED]
    if request.host_header and not any(k.lower() == b"host" for k, _ in headers):
        headers.insert(0, (b"Host", request.host_header.encode()))  # HTTP/2 has :authority
    if authorization is not None:
        headers.append((b"Authorization", authorization.encode()))
    body = request.raw_content or None
    target = origin_of(request.scheme, request.host, request.port) + request.path
    extensions: dict[str, str] = {}
    if request.scheme == "https" and request.pretty_host.lower() != request.host.lower():
        extensions["sni_hostname"] = request.pretty_host
    outgoing = client.build_request(
        request.method, target, headers=headers, content=body, extensions=extensions
    )
    sent = {k.lower() for k, _ in headers}
    for name in HTTPX_DEFAULTS:
        if name.encode() not in sent and name in outgoing.headers:
            del outgoing.headers[name]
    started = time.time()
    answer = await client.send(outgoing, stream=True)
    try:
        raw = b"".join([chunk async for chunk in answer.aiter_raw()])
    finally:
        await answer.aclose()
    fields = [(k, v) for k, v in answer.headers.raw if k.lower() not in NOT_COPIED]
    if like.http_version.startswith("HTTP/2"):
        fields = [(k.lower(), v) for k, v in fields]  # HTTP/2 forbids upper-case names
    if request.method.upper() == "HEAD" or answer.status_code in (204, 304):
        fields += [
            (b"content-length", v) for k, v in answer.headers.raw if k.lower() == b"content-length"
        ]
    else:
        fields.append((b"content-length", str(len(raw)).encode()))
    return http.Response(
        http_version=like.http_version.encode(),
        status_code=answer.status_code,
        reason=answer.reason_phrase.encode(),
        headers=http.Headers(fields),
        content=raw,
        trailers=None,
        timestamp_start=started,
        timestamp_end=time.time(),
    )


def upstream_proxy(modes: Sequence[str], auth: str | None) -> str | None:
    """In `--mode upstream:URL` the retry goes through that proxy too, as the first try did."""
    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, UpstreamMode):
            host, port = mode.address
            host = f"[{host}]" if ":" in host else host
            credentials = f"{quote(auth, safe=':')}@" if auth else ""
            return f"{mode.scheme}://{credentials}{host}:{port}"
    return None


def add_header(response: http.Response, name: str, value: str) -> None:
    if response.http_version.startswith("HTTP/2"):
        name = name.lower()  # HTTP/2 forbids upper-case names
    response.headers.add(name, value)


def failed_resend_response(problem: str, paid: Paid) -> http.Response:
    """The 502 for a request whose resend with `paid`'s token failed. `paid` says what the
    request paid in all (both payments when it paid twice)."""
    if paid.token.charge:
        # Claimed before it left: it may have reached the server, which would consume it.
        kept = "A Payment charge is good for one request: it is not sent again.\n"
    else:
        kept = "The token is kept: the next request uses it without paying again.\n"
    if paid.paid_here:
        said = f"Paid {paid.header()}, but asking the server again failed"
    else:
        said = f"Asking the server again with the token for {paid.token.label} failed"
    # X-L402-Paid is added by _mark_paid (once, and only if this request paid).
    return http.Response.make(
        502, f"{said}: {problem}\n{kept}".encode(), {"Content-Type": "text/plain; charset=utf-8"}
    )


def paid_in_all(before: Paid | None, result: Paid) -> Paid:
    """What a request paid once `result` came: the token in hand, with the amounts of every
    payment it made summed (a request that lost a race among ours pays twice)."""
    if before is not None and before.paid_here and result.paid_here:
        return before.plus(result)
    if before is not None and before.paid_here:
        return before
    return result


class L402Client:
    def __init__(self) -> None:
        self.payer: Payer | None = None
        self.http: httpx.AsyncClient | None = None
        self.wallet: Wallet | None = None
        self.wallet_source: tuple[str, str] | None = None
        self.limits = Limits()
        self.ready = asyncio.Event()
        self.started = False
        self.tasks: list[asyncio.Task[None]] = []
        # option -> why its value was refused at startup; while any is set, nothing is paid.
        self.misconfigured: dict[str, str] = {}
        self.guard = OptionGuard("client", self.misconfigured)
        self.prefer = "l402"
        self.clients: tuple[Network, ...] = LOOPBACK
        self.client_verdicts: dict[str | None, bool] = {}
        self.warned_clients: set[str] = set()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "l402_wallet",
            str,
            "dev",
            """
            Wallet that pays L402 challenges, as a URI: lnd://host:port?cert=<file>&macaroon=<file>,
            lndconnect://..., cln:///path/to/lightning-rpc, eclair://:<password>@host:port,
            lnbits://host?key=<admin key>. "dev" (default) is the embedded dev ledger's
            "listener" wallet, for demos and tests; "dev:<wallet>" pays from another dev wallet.
            Checked at start; cannot change while running.
            """,
        )
        loader.add_option(
            "l402_max_price_sat",
            int,
            100,
            "Largest invoice paid at all, in sat; a dearer challenge is passed on unpaid.",
        )
        loader.add_option(
            "l402_max_fee_sat",
            int,
            10,
            "Lightning routing fee allowed per payment, in sat (counted in the budgets).",
        )
        loader.add_option(
            "l402_budget_daily_sat",
            int,
            1000,
            """
            Most the client pays in any 24 hours, in sat, fees included; a payment in progress
            counts with its fee limit. Spending is kept in l402_store, so it survives restarts.
            """,
        )
        loader.add_option(
            "l402_budget_total_sat",
            Optional[int],  # noqa: UP045  (mitmproxy's option types predate X | None)
            None,
            "Most the client ever pays from this store, in sat, fees included. Default: no cap.",
        )
        loader.add_option(
            "l402_allow",
            Sequence[str],
            [],
            """
            Hosts the client may pay (repeat the option for more): "example.com",
            "*.example.com", "127.0.0.1:8081". Only these are told the client can pay.
            Default: any host.
            """,
        )
        loader.add_option(
            "l402_clients",
            str,
            "",
            """
            Who may make this proxy pay: comma-separated client addresses or networks, like
            "127.0.0.1, 192.168.1.0/24, fd00::/8". Requests from anyone else pass through as
            from a plain proxy: nothing paid, no token attached, a 402 comes back with
            X-L402-Refused: client_not_allowed. Default: this machine only (127.0.0.0/8, ::1).
            """,
        )
        loader.add_option(
            "l402_fallback_free",
            bool,
            False,
            """
            When a challenge is not paid (a limit, a failed payment), ask again without
            Accept-Authenticate, as a player that cannot pay: a server in upgrade mode then
            answers with its free variant (the episode with ads) instead of the 402.
            """,
        )
        loader.add_option(
            "l402_store",
            str,
            "",
            """
            Where paid tokens and the payment ledger live (SQLite path).
            Default: client.sqlite under $L402PROXY_HOME or ~/.l402proxy.
            """,
        )
        loader.add_option(
            "l402_dev_ledger",
            str,
            "",
            """
            Path of the dev Lightning ledger (SQLite) used by the "dev" wallet.
            Default: devledger.sqlite under $L402PROXY_HOME or ~/.l402proxy, the same file the
            server addon and the l402proxy CLI use.
            """,
        )
        loader.add_option(
            "l402_pay_timeout",
            int,
            60,
            """
            Seconds to wait for the wallet to pay. Past that the player gets the 402; the
            payment stays pending and is checked again, so a late success still yields the token.
            """,
        )
        loader.add_option(
            "l402_prefer",
            str,
            "l402",
            """
            Which scheme to pay when a 402 offers both an L402 (LSAT) challenge and a Payment
            (draft-httpauth-payment, lightning charge) one: "l402" (default; a token is reused
            until it expires) or "payment" (a charge pays for one request). A 402 offering only
            one of them is paid with that one either way.
            """,
        )
        self.guard.take_deferred(loader)

    def configure(self, updated: set[str]) -> None:
        with self.guard.configuring(updated):
            if updated & set(LIMIT_OPTIONS):
                self._configure_limits()
            if "l402_clients" in updated:
                self._configure_clients()
            if "l402_pay_timeout" in updated:
                if ctx.options.l402_pay_timeout < 1:
                    self._refuse("l402_pay_timeout", "must be at least 1 second")
                else:
                    self.guard.accept("l402_pay_timeout")
                    if self.payer is not None:
                        self.payer.pay_timeout = ctx.options.l402_pay_timeout
            if "l402_prefer" in updated:
                self._configure_prefer()
            if "l402_wallet" in updated or "l402_dev_ledger" in updated:
                self._configure_wallet()

    def _configure_limits(self) -> None:
        try:
            self.limits = Limits(
                max_price_sat=ctx.options.l402_max_price_sat,
                max_fee_sat=ctx.options.l402_max_fee_sat,
                budget_daily_sat=ctx.options.l402_budget_daily_sat,
                budget_total_sat=ctx.options.l402_budget_total_sat,
                allow=tuple(ctx.options.l402_allow),
            )
        except ValueError as exc:
            self._refuse("limits", str(exc))
            return
        self.guard.accept("limits")
        if self.payer is not None:
            self.payer.limits = self.limits
            log.info(f"l402: limits now {self.limits.describe()}")

    def _configure_prefer(self) -> None:
        try:
            prefer = parse_prefer(ctx.options.l402_prefer)
        except ValueError as exc:
            self._refuse("l402_prefer", str(exc))
            return
        self.guard.accept("l402_prefer")
        if prefer != self.prefer:
            self.prefer = prefer
            if self.payer is not None:
                self.payer.prefer = prefer
                log.info(f"l402: now paying {prefer} when a server offers L402 and Payment")

    def _configure_clients(self) -> None:
        try:
            clients = parse_clients(ctx.options.l402_clients)
        except ValueError as exc:
            self._refuse("l402_clients", str(exc))
            return
        self.guard.accept("l402_clients")
        if clients != self.clients:
            self.clients = clients
            self.client_verdicts.clear()
            self.warned_clients.clear()
            if self.started:
                log.info(f"l402: now {describe_clients(clients)}")

    def _configure_wallet(self) -> None:
        source = (ctx.options.l402_wallet, self.dev_ledger_path)
        if self.wallet is not None and source == self.wallet_source:
            # mitmproxy re-applies the old value after a refused change: keep the wallet
            # in use (and any payment it is making) rather than reopen it.
            return
        try:
            wallet = open_wallet(ctx.options.l402_wallet, dev_ledger=self.dev_ledger_path)
        except LightningError as exc:
            self._refuse("l402_wallet", str(exc))
            return
        if self.started:
            # A wallet is checked (reachable, may pay, which network) only at start, and
            # payments under way belong to the wallet making them.
            self._refuse(
                "l402_wallet",
                "cannot change while running: restart mitmproxy with the new wallet "
                "(it is checked at start)",
            )
            return
        self.guard.accept("l402_wallet")
        self.wallet = wallet
        self.wallet_source = source

    def _refuse(self, option: str, problem: str) -> None:
        """Reject a bad option value: an OptionsError while running (the previous value stays);
        at startup one error line, and mitmproxy stops (see options.py)."""
        self.guard.refuse(option, problem, running=self.started)

    @property
    def dev_ledger_path(self) -> str:
        return ctx.options.l402_dev_ledger or paths.default_dev_ledger()

    async def running(self) -> None:
        if self.misconfigured or self.wallet is None:
            return
        # httpx logs every retry at INFO; the addon's own line about a payment says more.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        store_uri = ctx.options.l402_store or paths.default_client_store()
        try:
            store = await ClientStore.open(store_uri)
        except (StoreError, OSError) as exc:
            log.error(f"l402: cannot open the client store {store_uri}: {exc}")
            return
        self.payer = Payer(
            self.wallet,
            store,
            self.limits,
            pay_timeout=ctx.options.l402_pay_timeout,
            prefer=self.prefer,
        )
        try:
            recovered = await self.payer.start()
        except (LightningError, StoreError) as exc:
            log.error(f"l402: cannot start paying: {exc}")
            return
        self.http = httpx.AsyncClient(
            # The proxy's own environment may point HTTP_PROXY at this very proxy.
            trust_env=False,
            # upstream_auth belongs to mitmproxy's UpstreamAuth addon, absent in a bare context.
            proxy=upstream_proxy(ctx.options.mode, getattr(ctx.options, "upstream_auth", None)),
            verify=self._verify(),
            follow_redirects=False,
            timeout=RESEND_TIMEOUT,
        )
        self.tasks = [asyncio.create_task(self._recover_every(RECOVERY_SECONDS))]
        log.info(
            f"l402: wallet {self.wallet.describe()}; {self.limits.describe()}; "
            f"{len(self.payer.tokens)} token(s) in {store.path}"
            + (f"; recovered {len(recovered)} interrupted payment(s)" if recovered else "")
        )
        log.info(f"l402: {describe_clients(self.clients)} (l402_clients)")
        log.info(f"l402: paying {self.prefer} when a server offers L402 and Payment (l402_prefer)")
        self.started = True
        # Opened only at start: another store needs a restart.
        self.guard.pin("l402_store")
        self.ready.set()

    def _verify(self) -> bool | ssl.SSLContext:
        # The retry checks certificates like mitmproxy's own upstream connections do.
        if ctx.options.ssl_insecure:
            return False
        cafile = ctx.options.ssl_verify_upstream_trusted_ca
        capath = ctx.options.ssl_verify_upstream_trusted_confdir
        if not cafile and not capath:
            return True  # httpx's default: the certifi bundle, as mitmproxy uses
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None)

    async def done(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        if self.payer is not None:
            await self.payer.close()
        elif self.wallet is not None:
            await self.wallet.close()

    async def _recover_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            assert self.payer is not None
            try:
                await self.payer.recover()
            except (LightningError, StoreError) as exc:
                log.warning(f"l402: checking pending payments failed: {exc}")

    def pays_for(self, flow: http.HTTPFlow) -> bool:
        """Is this flow's client one the proxy spends for (l402_clients)?"""
        # Looked up by peer address alone: hashing the networks for client_allowed's own cache
        # cost 1.5-2 us on every request. Emptied when l402_clients changes; bounded.
        host = client_host(flow)
        verdict = self.client_verdicts.get(host)
        if verdict is None:
            if len(self.client_verdicts) >= CLIENT_VERDICTS_LIMIT:
                self.client_verdicts.clear()
            verdict = self.client_verdicts[host] = client_allowed(self.clients, host)
        return verdict

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not self.pays_for(flow):
            # Someone else reached the proxy: not a word about paying, and never the user's
            # tokens (paid credentials) on their requests.
            return
        if not self.ready.is_set():
            await self.ready.wait()
        payer = self.payer
        assert payer is not None
        request = flow.request
        if not payer.allows(request.pretty_host, request.port):
            return
        # Both schemes are advertised on the same requests: those of clients we pay for, to
        # hosts we may pay, token or not. A server in upgrade mode answers a player that does
        # not say it can pay with the free variant: telling a host we would never pay (or on
        # behalf of a client we never pay for) that we can would only swap that for a 402
        # we refuse, and tell strangers a paying client sits behind this proxy.
        if "Accept-Authenticate" not in request.headers:
            request.headers["Accept-Authenticate"] = "L402"
            flow.metadata[ADVERTISED_KEY] = True
        if ACCEPT_HEADER not in request.headers:  # the player's own preference wins
            request.headers[ACCEPT_HEADER] = ACCEPT_PAYMENT
            flow.metadata[ADVERTISED_PAYMENT_KEY] = True
        if "Authorization" in request.headers:
            return  # the user's own credentials win
        origin = origin_of(request.scheme, request.pretty_host, request.port)
        flight = payer.flight_for(origin, request.path)
        if flight is not None:
            # A payment for this URL's scope is under way: its token beats a fresh 402.
            await asyncio.wait({flight}, timeout=payer.pay_timeout)
        token = payer.up_front(origin, request.path)
        if token is None and payer.unused:
            # A Payment charge paid for this very URL and never sent (see payer.py).
            token = await payer.take_charge(request_url(request))
        if token is not None:
            request.headers["Authorization"] = token.credential
            flow.metadata[TOKEN_KEY] = token

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        sent: Token | None = flow.metadata.get(TOKEN_KEY)
        if response.status_code not in (401, 402):
            if sent is not None and self.payer is not None:
                # Granted with the token it carried: a request of ours that lost that token
                # to this one (a bundle too small for both) may pay once more, alone.
                self.payer.answered(sent, granted=True)
            if sent is not None and sent.charge and self.payer is not None:
                # A charge paid earlier, accepted now: its receipt goes to the ledger.
                await self.payer.note_receipt(sent, answer_of(response, request_url(flow.request)))
                flow.comment = f"Payment charge paid earlier for {sent.label}, no payment"
                return
            if sent is not None and self.payer is not None and BALANCE_HEADER in response.headers:
                # What is left of the token this request carried (a bundle, single use).
                url = request_url(flow.request)
                try:
                    await self.payer.note_balance(sent, answer_of(response, url))
                except (StoreError, ValueError) as exc:
                    log.warning(f"l402: could not note the balance {url} stated: {exc}")
            return
        if not self.pays_for(flow):
            if sent is not None and self.payer is not None:
                self.payer.answered(sent, granted=False)  # l402_clients changed meanwhile
            self._refuse_foreign(flow, response)
            return
        if self.payer is None:
            return
        try:
            await self._handle(flow, response)
        except (StoreError, LightningError, ValueError) as exc:
            log.error(f"l402: could not handle the challenge from {flow.request.url}: {exc}")

    def error(self, flow: http.HTTPFlow) -> None:
        """The request failed without an answer (the server unreachable, the player gone): the
        token it carried was not granted, and no request of ours waits for its answer."""
        sent: Token | None = flow.metadata.get(TOKEN_KEY)
        if sent is not None and flow.response is None and self.payer is not None:
            self.payer.answered(sent, granted=False)

    async def _handle(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Drive the payer's exchange: its Awaits run here, its Resends go out with httpx."""
        payer = self.payer
        assert payer is not None
        request = flow.request
        url = request_url(request)
        steps = payer.exchange(url, answer_of(response, url), flow.metadata.get(TOKEN_KEY))
        paid: Paid | None = None
        try:
            step = next(steps)
            while True:
                if isinstance(step, Await):
                    result = await step.job
                    if isinstance(result, Paid):
                        paid = paid_in_all(paid, result)
                    step = steps.send(result)
                else:
                    response = await self._resend(request, step.authorization, response)
                    step = steps.send(answer_of(response, url))
        except StopIteration as stop:
            verdict: Verdict = stop.value
        except httpx.HTTPError as exc:
            log.warning(f"l402: asking {url} again failed: {exc}")
            if paid is not None:
                flow.response = failed_resend_response(str(exc) or type(exc).__name__, paid)
                self._mark_paid(flow, paid)
            return
        finally:
            # Closed at a Resend that failed: the payer releases what it was about to send.
            steps.close()
        if verdict.paid is not None:
            flow.response = response
            self._mark_paid(flow, verdict.paid)
        elif verdict.refused is not None:
            refused = await self._free_variant(flow, url, response)
            self._mark_refused(flow, refused, verdict.refused, verdict.spent)
        else:
            flow.response = response

    def _refuse_foreign(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """A challenge for a client outside l402_clients passes back unpaid, saying why."""
        if response.status_code != 402:
            return
        challenges = response.headers.get_all("WWW-Authenticate")
        if not parse_challenges(challenges) and not has_charge_challenge(challenges):
            return  # no L402 or Payment challenge: nothing we would have paid either
        host = client_host(flow) or "an unknown address"
        allowed = clients_text(self.clients)
        refused = Refused("client_not_allowed", f"client {host} is not in l402_clients ({allowed})")
        self._mark_refused(flow, response, refused)
        if host not in self.warned_clients:
            # Once per client: anyone who can reach the proxy could fill the log otherwise.
            if len(self.warned_clients) >= WARNED_CLIENTS_LIMIT:
                self.warned_clients.clear()
            self.warned_clients.add(host)
            log.warning(
                f"l402: not paying for client {host}: not in l402_clients ({allowed}); "
                "add it there if this proxy should pay for it"
            )

    async def _free_variant(
        self, flow: http.HTTPFlow, url: str, refused: http.Response
    ) -> http.Response:
        """With l402_fallback_free: ask a challenge we drew by advertising again as a player
        that cannot pay would, so a server in upgrade mode hands out its free variant."""
        advertised = flow.metadata.get(ADVERTISED_KEY) or flow.metadata.get(ADVERTISED_PAYMENT_KEY)
        if not ctx.options.l402_fallback_free or not advertised:
            return refused
        plain = flow.request.copy()
        # Only what this proxy added goes: a player's own header is its own business.
        if flow.metadata.get(ADVERTISED_KEY):
            del plain.headers["Accept-Authenticate"]
        if flow.metadata.get(ADVERTISED_PAYMENT_KEY):
            del plain.headers[ACCEPT_HEADER]
        try:
            answer = await self._resend(plain, None, refused)
        except httpx.HTTPError as exc:
            log.warning(f"l402: asking {url} for its free variant failed: {exc}")
            return refused
        return refused if answer.status_code == 402 else answer

    async def _resend(
        self, request: http.Request, authorization: str | None, like: http.Response
    ) -> http.Response:
        assert self.http is not None
        return await resend(self.http, request, authorization, like)

    @staticmethod
    def _mark_paid(flow: http.HTTPFlow, paid: Paid) -> None:
        assert flow.response is not None
        flow.metadata["l402_client"] = {
            "paid": paid.paid_here,
            "scheme": "Payment" if paid.token.charge else "L402",
            "service": paid.token.label,
            "amount_msat": paid.amount_msat,
            "fee_msat": paid.fee_msat,
            "payment_hash": paid.token.payment_hash.hex(),
        }
        if paid.paid_here:
            add_header(flow.response, "X-L402-Paid", paid.header())
            flow.marked = PAID_MARKER
            scheme = "Payment" if paid.token.charge else "L402"
            flow.comment = f"{scheme} paid {paid.header()}"
        elif paid.borrowed:
            flow.comment = f"L402 token for {paid.token.label} (a pass), no payment"
        else:
            flow.comment = f"L402 token for {paid.token.label} (paid by another request)"

    @staticmethod
    def _mark_refused(
        flow: http.HTTPFlow, response: http.Response, refused: Refused, spent: Paid | None = None
    ) -> None:
        """A refusal; `spent`: what the request paid all the same (X-L402-Paid beside it)."""
        add_header(response, "X-L402-Refused", refused.header())
        flow.response = response
        flow.marked = REFUSED_MARKER
        flow.comment = f"L402 not paid: {refused.code}: {refused.message}"
        flow.metadata["l402_client"] = {"refused": refused.code, "message": refused.message}
        if spent is not None and spent.paid_here:
            add_header(response, "X-L402-Paid", spent.header())
            flow.comment = f"L402 paid {spent.header()}, then not paid: {refused.code}"
            flow.metadata["l402_client"].update(
                paid=True,
                amount_msat=spent.amount_msat,
                fee_msat=spent.fee_msat,
                payment_hash=spent.token.payment_hash.hex(),
            )
