"""Load grpc with its own C-core logging at ERROR, unless the user chose a verbosity.

gRPC core logs to stderr by itself: a TLS failure prints "Handshake failed with error ..."
(an INFO line) beside the one-line error lnd.py already gives, so `l402proxy backend check`
and mitmdump's start-up would show two lines for one problem. gRPC reads GRPC_VERBOSITY once,
when grpc is first imported, so the variable is set only around that import: later child
processes and anything reading the environment see it as it was. The threshold is the
process's (gRPC has no per-channel one), which is why it stays untouched when grpc is already
loaded or GRPC_VERBOSITY is set: GRPC_VERBOSITY=INFO brings the lines back.
"""

import os
import sys

QUIET_VERBOSITY = "ERROR"


def import_grpc_quietly() -> None:
    if "grpc" in sys.modules or "GRPC_VERBOSITY" in os.environ:
        return
    os.environ["GRPC_VERBOSITY"] = QUIET_VERBOSITY
    try:
        import grpc  # noqa: F401  (imported here for its side effect: gRPC core reads the env)
    finally:
        os.environ.pop("GRPC_VERBOSITY", None)


import_grpc_quietly()
