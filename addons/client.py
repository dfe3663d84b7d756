"""mitmdump -s addons/client.py: a local proxy that pays L402 challenges (see README)."""

import sys
from pathlib import Path

# Running from a checkout without `pip install`: make the package beside this file importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from l402proxy.client import L402Client

addons = [L402Client()]
