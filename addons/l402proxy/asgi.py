"""The L402 paywall as ASGI middleware, for any ASGI app (FastAPI, Starlette, Django):

    from l402proxy.asgi import L402Middleware
    app = L402Middleware(app, rules="rules/api.yaml")

See doors/asgi.py for what it does and README for how to run it.
"""

from .doors.asgi import L402Middleware

__all__ = ["L402Middleware"]
