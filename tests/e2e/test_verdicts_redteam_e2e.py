"""A red-team pass over the kept verdicts, for real: the engine's kept grants behind a real
mitmdump, and nginx's verdict cache in a real nginx with `l402proxy serve-auth`.

1. A kept grant skipped the mitmproxy door's check of an absolute-form target: with
   keep_host_header (what host: rules need) `GET http://paid.example/h/x` with
   `Host: cheap.example` has the key of the cheap request before it, and went to the origin
   in absolute form, which routes by its authority (RFC 9112 3.2.2, as nginx does).
2. A verdict nginx cached holds the X-L402-Set-N slots numbered by the config that asked;
   a config regenerated for new rules (and nginx restarted on the same cache directory, or
   reloaded) read them under its own numbering: a basic token's cached verdict set the
   premium service's header.
3. Pinned: the cache answers only the method it was asked with, and keeps its files (which
   hold credentials) from other users.

Requests that must be byte for byte go over raw sockets; every loop is bounded in count and
time.
"""

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l402proxy.launch import started

from . import procs
from .nginx import door_config, nginx_binary, running_nginx, serve_auth
from .test_nginx_door_e2e import Echo, client, forwarded
from .test_redteam_regressions import SECRET, VirtualHosts, raw

pytestmark = pytest.mark.e2e

# -- 1. the mitmproxy door: an absolute-form target after a kept grant ---------------------------

HOST_RULES = """
services:
  - name: hosted
    match: {path: "/h/*", host: "paid.example"}
    price_sat: 700
  - name: cheap
    match: {path: "/h/*", host: "cheap.example"}
    price_sat: 1
"""


def test_a_kept_grant_never_opens_another_hosts_service(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(HOST_RULES)
    with procs.in_process_origin(VirtualHosts, "vhosts-origin") as origin_url:
        proxy = procs.server_proxy(
            tmp_path, home, tmp_path / "conf", origin_url, rules, "keep_host_header=true"
        )
        with started(proxy):
            cheap = procs.minted_credential(home / "server.sqlite", "cheap", int(time.time()) + 600)
            fields = f"Host: cheap.example\r\nAuthorization: {cheap}\r\nConnection: close\r\n\r\n"
            # The cheap host's own path, paid: forwarded (this origin has nothing there).
            plain = raw(proxy.port, b"GET /h/x HTTP/1.1\r\n" + fields.encode())
            status_line = plain.split(b"\r\n", 1)[0]
            assert b" 404 " in status_line and SECRET not in plain, plain[:300]
            # Byte for byte the same head but for the authority in the request line.
            answer = raw(proxy.port, b"GET http://paid.example/h/x HTTP/1.1\r\n" + fields.encode())
    assert SECRET not in answer, answer[:300]
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]


# -- 2. and 3. nginx's verdict cache ------------------------------------------------------------

BASIC = """
  - name: basic
    match: {path: "/basic/*"}
    price_sat: 1
    paid:
      set_headers: {X-Basic: "yes"}
"""
PREMIUM = """
  - name: premium
    match: {path: "/premium/*"}
    price_sat: 1000
    paid:
      set_headers: {X-Premium: "yes"}
"""


@pytest.fixture(scope="module")
def echo_origin() -> Iterator[str]:
    nginx_binary()
    with procs.in_process_origin(Echo, "echo-origin") as origin:
        yield origin


def test_a_config_made_again_never_reads_a_verdict_cached_for_the_one_before(
    tmp_path: Path, echo_origin: str
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text("services:\n" + BASIC)
    cache = home / "verdicts"  # one directory, as /run/l402proxy-NAME-verdicts would be
    auth = serve_auth(tmp_path, home, rules)
    with started(auth):
        token = procs.minted_credential(home / "server.sqlite", "basic", int(time.time()) + 600)
        port = procs.free_port()
        cache_args = ("--verdict-cache", "60", "--verdict-cache-dir", str(cache))
        before = door_config(home, auth, echo_origin, port, *cache_args)
        with running_nginx(tmp_path / "before", before), client(f"http://127.0.0.1:{port}") as c:
            paid = c.get("/basic/x", headers={"Authorization": token})
            assert paid.status_code == 200, paid.text
            assert forwarded(paid)[2]["x-basic", "yes"] == 1
        # A premium service with a header of its own, listed first: the operator makes the
        # config again (as the docs say) and (re)starts nginx.
        rules.write_text("services:\n" + PREMIUM + BASIC)

        def reloaded() -> bool:
            with client(f"http://127.0.0.1:{auth.port}") as service:
                return "X-Premium" in service.get("/config").text

        assert procs.wait_until(reloaded, timeout=10, interval=0.2)
        after = door_config(home, auth, echo_origin, port, *cache_args)
        assert after.index("X-Premium $l402_set_1") < after.index("X-Basic $l402_set_2")
        with running_nginx(tmp_path / "after", after), client(f"http://127.0.0.1:{port}") as c:
            again = c.get("/basic/x", headers={"Authorization": token})
            assert again.status_code == 200, again.text
            fields = forwarded(again)[2]
    assert ("x-premium", "yes") not in fields, "a basic token got the premium header"
    assert fields["x-basic", "yes"] == 1


def test_the_verdict_cache_answers_only_the_method_it_was_asked_with_and_is_private(
    tmp_path: Path, echo_origin: str
) -> None:
    """With serve-auth stopped, the GET it granted is granted from the cache (marked private,
    with its Vary); HEAD and POST of the same URL and credential were never asked: 5xx. The
    directory nginx made for it, and every entry (credentials inside), are nginx's alone."""
    home = tmp_path / "home"
    home.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text("services:\n" + BASIC)
    cache = home / "verdicts"
    auth = serve_auth(tmp_path, home, rules)
    with started(auth):
        token = procs.minted_credential(home / "server.sqlite", "basic", int(time.time()) + 600)
        port = procs.free_port()
        config = door_config(
            home,
            auth,
            echo_origin,
            port,
            "--verdict-cache",
            "60",
            "--verdict-cache-dir",
            str(cache),
        )
        with running_nginx(tmp_path, config), client(f"http://127.0.0.1:{port}") as browser:
            headers = {"Authorization": token}
            assert browser.get("/basic/x", headers=headers).status_code == 200
            auth.stop()
            hit = browser.get("/basic/x", headers=headers)
            assert hit.status_code == 200 and forwarded(hit)[2]["x-basic", "yes"] == 1
            assert hit.headers["Cache-Control"] == "private"
            assert hit.headers["Vary"] == "Authorization, Cookie, Accept-Authenticate"
            for method in ("HEAD", "POST"):
                response = browser.request(method, "/basic/x", headers=headers)
                assert response.status_code >= 500, (method, response.status_code)
            entries = [path for path in cache.rglob("*") if path.is_file()]
            assert entries, "nothing cached"
            assert stat.S_IMODE(os.stat(cache).st_mode) & 0o077 == 0
            for path in entries:
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
                assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0, path.parent
