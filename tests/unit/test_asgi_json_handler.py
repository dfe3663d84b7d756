"""Review of issue 13 (JSON logs, ASGI door): L402Middleware(log_format="json") installs a JSON
handler on the "l402proxy" logger in __init__ (use_json_logs) and never takes it off: after
close() the logger still has the handler and propagation stays off, so a later text-format
middleware in the same process (tests, an app factory run twice) still logs JSON to the stderr
of the first one. The mitmproxy door undoes its own in done()."""

import logging
from pathlib import Path

from l402proxy.doors.asgi import L402Middleware
from l402proxy.ops import jsonlog
from tests.e2e.procs import REPO

RULES = REPO / "rules" / "podcast.yaml"


async def app(scope: object, receive: object, send: object) -> None:
    pass


async def test_close_takes_the_json_handler_off(tmp_path: Path) -> None:
    logger = logging.getLogger("l402proxy")
    handlers, propagate = list(logger.handlers), logger.propagate
    middleware = L402Middleware(
        app,
        rules=str(RULES),
        store=str(tmp_path / "server.sqlite"),
        dev_ledger=str(tmp_path / "devledger.sqlite"),
        log_format="json",
    )
    try:
        assert len(logger.handlers) == len(handlers) + 1  # JSON from the first line on
    finally:
        await middleware.close()
    leftover = [h for h in logger.handlers if h not in handlers]
    for handler in leftover:  # leave the process as it was for the tests after this one
        logger.removeHandler(handler)
    for key, (handler, _count) in list(jsonlog._installed.items()):
        if handler in leftover:
            del jsonlog._installed[key]
    if not jsonlog._installed:
        jsonlog._before = None
    restored = logger.propagate
    logger.propagate = propagate
    assert leftover == [] and restored == propagate, (leftover, restored)
