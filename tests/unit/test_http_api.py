"""The HTTP plumbing the REST backends share (lightning/http.py): one client per backend object
and event loop, failures in one secret-free line.

The contract (tests/contract) covers what every backend does when its node is unreachable;
these are the parts only the shared client has.
"""

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from l402proxy.lightning import InvoiceBackend, LightningError, open_backend
from l402proxy.lightning.eclair import EclairNode, parse_uri
from l402proxy.lightning.http import HttpApi

PASSWORD = "http-api-Secret-pw-42"
KEY = "0123456789abcdef0123456789abcdef"
NODE_ID = "02" + "ab" * 32
METADATA = json.dumps([["text/plain", "loops"]])


class _Answers(BaseHTTPRequestHandler):
    """Eclair's getinfo, LNbits' wallet and an LNURL payRequest, whatever is asked."""

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._json({"nodeId": NODE_ID, "alias": "loops", "network": "regtest"})

    def do_GET(self) -> None:
        if self.path.startswith("/api/v1/wallet"):
            self._json({"name": "loops", "balance": 1_000})
            return
        port = self.server.server_address[1]
        self._json(
            {
                "tag": "payRequest",
                "callback": f"http://127.0.0.1:{port}/cb",
                "minSendable": 1_000,
                "maxSendable": 1_000_000,
                "metadata": METADATA,
            }
        )

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    """A keep-alive HTTP server on 127.0.0.1, in its own thread (it outlives event loops)."""
    _Answers.protocol_version = "HTTP/1.1"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.mark.parametrize("kind", ["eclair", "lnbits", "lnurl"])
def test_one_backend_object_serves_one_event_loop_after_another(server: int, kind: str) -> None:
    """A CLI runs asyncio.run more than once on one backend object: the client made in the
    first loop (its pooled connection belongs to that loop) must not be used in the next."""
    uri = {
        "eclair": f"eclair://:{PASSWORD}@127.0.0.1:{server}",
        "lnbits": f"lnbits+http://127.0.0.1:{server}?key={KEY}",
        "lnurl": f"lnurl:shop@127.0.0.1:{server}",
    }[kind]
    backend: InvoiceBackend = open_backend(uri, dev_ledger="unused.sqlite")
    for _ in range(3):
        assert asyncio.run(backend.info()).alias == "loops"
    asyncio.run(backend.close())


async def test_calls_reuse_one_client_and_close_lets_go_of_it(server: int) -> None:
    api = HttpApi("test", base_url=f"http://127.0.0.1:{server}", timeout=5)
    first = api.client()
    for _ in range(3):
        assert (await api.request("GET", "/api/v1/wallet", "reading")).status_code == 200
    assert api.client() is first
    await api.close()
    assert first.is_closed
    assert api.client() is not first
    await api.close()


async def test_what_a_node_says_back_never_carries_the_password_out() -> None:
    """Eclair's error text is shown (one line): a password it echoes is not."""
    node = EclairNode(parse_uri(f"eclair://:{PASSWORD}@eclair.test:8080"))
    node.api.transport = httpx.MockTransport(
        lambda request: httpx.Response(500, json={"error": f"no\nsuch user :{PASSWORD}"})
    )
    try:
        with pytest.raises(LightningError) as caught:
            await node.info()
    finally:
        await node.close()
    assert str(caught.value) == (
        "eclair eclair.test:8080: getinfo failed: HTTP 500: no such user :***"
    )
