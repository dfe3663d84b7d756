"""mitmdump -s addons/server.py: the L402 paywall in front of an origin (see README)."""

import sys
from pathlib import Path

# Running from a checkout without `pip install`: make the package beside this file importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from l402proxy.doors.mitmproxy import L402Server

addons = [L402Server()]
