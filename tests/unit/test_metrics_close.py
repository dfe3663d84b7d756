"""Review of issue 13 (metrics endpoint): closing the /metrics server while a client is still
connected (a scrape in flight, a slow or idle client) must end quietly. Today release() cancels
the client tasks, and asyncio's start_server callback calls task.exception() on a cancelled
task, so the event loop's exception handler gets an "Exception in callback ... CancelledError"
traceback per connected client: multi-line error output from mitmproxy/uvicorn at every
shutdown, outside the JSON log format."""

import asyncio
import socket
from typing import Any

from l402proxy.ops.metrics import MetricsServer


async def test_close_with_connected_clients_reports_nothing_to_the_loop() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    clients: list[socket.socket] = []
    try:
        server = await MetricsServer.start("127.0.0.1", 0)
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            client.sendall(b"GET /metrics HTTP/1.1\r\n")  # the head never ends
            clients.append(client)
        listener = server._listener
        for _ in range(200):  # bounded: until the server has taken the three clients
            if len(listener.clients) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(listener.clients) == 3
        await server.close()
        for _ in range(20):  # let the connection callbacks run
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
        for client in clients:
            client.close()
    assert reported == [], [repr(context.get("exception")) for context in reported]
