"""Review of issue 13 (dry run): content the paywall would have withheld, forwarded because of a
dry run, must not be storable by a shared cache in front of the proxy. Otherwise a CDN keeps
serving it free after the operator turns the dry run off (the switch "sticks" in the cache).
Real mitmdump, an in-process origin that marks its media cacheable by anyone."""

import http.server
from pathlib import Path

import httpx
import pytest

from . import procs

pytestmark = pytest.mark.e2e

RULES = procs.REPO / "rules" / "podcast.yaml"


class PublicMedia(http.server.BaseHTTPRequestHandler):
    """Every path: 200, cacheable by shared caches for a day (as static media often is)."""

    def do_GET(self) -> None:
        body = b"media " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Cache-Control", "public, max-age=86400")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def shared_cache_may_store(response: httpx.Response) -> bool:
    directives = {
        part.strip().split("=", 1)[0].lower()
        for part in response.headers.get("Cache-Control", "").split(",")
        if part.strip()
    }
    return not directives & {"private", "no-store"}


def test_withheld_content_forwarded_in_dry_run_is_not_shared_cacheable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    confdir = tmp_path / "conf"
    confdir.mkdir()
    with procs.in_process_origin(PublicMedia) as origin_url:
        proxy = procs.server_proxy(tmp_path, home, confdir, origin_url, RULES, "l402_dry_run=true")
        proxy.start()
        try:
            url = f"http://127.0.0.1:{proxy.port}/bonus/x.wav"
            response = httpx.get(url, trust_env=False, timeout=procs.FETCH_TIMEOUT)
        finally:
            proxy.stop()
    # The paywall would have answered 402: this is paid content, served only because of the
    # dry run. With the origin's `public, max-age=86400` left as it is, a CDN keeps it for a
    # day and hands it to everyone after the dry run is switched off.
    assert response.status_code == 200
    assert response.headers.get("X-L402-Dry-Run") == "challenge"
    assert not shared_cache_may_store(response), dict(response.headers)
