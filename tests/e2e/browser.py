"""Real Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright.

Playwright downloads no browser here; it drives the system one (executable_path). A missing
chromium skips locally and fails in CI (L402PROXY_STRICT=1), like every real component.
"""

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from tests.conftest import require

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
ZBARIMG_SECONDS = 20.0


def chromium_path() -> str | None:
    configured = os.environ.get("L402PROXY_CHROMIUM")
    if configured:
        return configured if Path(configured).exists() else None
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    path = chromium_path()
    require(path is not None, "chromium (Debian package 'chromium', or set L402PROXY_CHROMIUM)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        require(False, "the playwright Python package (pip install -e '.[dev]')")
    assert path is not None
    return path


def require_zbarimg() -> str:
    path = shutil.which("zbarimg")
    require(path is not None, "zbarimg (Debian package 'zbar-tools')")
    assert path is not None
    return path


def decode_qr(png: Path) -> list[str]:
    """Every QR payload zbarimg finds in the image (empty when none)."""
    result = subprocess.run(
        [require_zbarimg(), "-q", "--raw", str(png)],
        capture_output=True,
        text=True,
        timeout=ZBARIMG_SECONDS,
        check=False,
    )
    # Exit 4 means "no symbol found"; D-Bus noise goes to stderr and is ignored.
    if result.returncode not in (0, 4):
        raise RuntimeError(f"zbarimg failed ({result.returncode}): {result.stderr[-500:]}")
    return [line for line in result.stdout.splitlines() if line]


@contextlib.asynccontextmanager
async def browser(proxy: str | None = None) -> AsyncIterator[object]:
    """A headless Chromium (playwright Browser), optionally sending everything through `proxy`
    (Playwright routes loopback through it too, unlike the bare --proxy-server flag)."""
    executable = require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        options: dict[str, object] = {"executable_path": executable, "headless": True}
        if proxy is not None:
            options["proxy"] = {"server": proxy, "bypass": "<-loopback>"}
        launched = await playwright.chromium.launch(**options)
        try:
            yield launched
        finally:
            await launched.close()
