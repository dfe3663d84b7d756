"""l402proxy: both sides of HTTP 402 / L402 as mitmproxy addons, plus a Python SDK."""

import logging

# A library stays quiet unless its host configures logging (mitmproxy does).
logging.getLogger("l402proxy").addHandler(logging.NullHandler())
