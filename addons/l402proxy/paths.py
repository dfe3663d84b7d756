"""Where l402proxy keeps its state by default."""

import os
from pathlib import Path


def home() -> Path:
    """`$L402PROXY_HOME`, else `~/.l402proxy` (not created here)."""
    configured = os.environ.get("L402PROXY_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".l402proxy"


def default_dev_ledger() -> str:
    # One file for both addons and the CLI, so they pay each other with no setup.
    return str(home() / "devledger.sqlite")


def default_server_store() -> str:
    return str(home() / "server.sqlite")


def default_client_store() -> str:
    return str(home() / "client.sqlite")


def ensure_parent(path: str | Path) -> None:
    """Create the parent folder, private to the user: it holds keys and tokens."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
