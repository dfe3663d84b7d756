"""The paywall's front doors: each translates its own requests into the engine's `Request` and
the engine's outcome back, and nothing else (mitmproxy.py, asgi.py, nginx.py)."""
