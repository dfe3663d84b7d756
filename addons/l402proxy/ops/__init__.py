"""Seeing and steering a running paywall: Prometheus metrics (metrics.py), JSON logs
(jsonlog.py), the admin API and page (admin.py), dry run (the engine's). Every door gets them
the same way: it parses its options into `OpsSettings` (check() says what is wrong, in one
line), then `Operations(settings, door)` starts them on an opened engine and closes them before
the engine closes. Each is a watcher of engine/events.py; none imports a door."""

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .listen import ListenError, parse_listen

if TYPE_CHECKING:
    from ..engine import Paywall

log = logging.getLogger(__name__)

LOG_FORMATS = ("text", "json")


class OpsError(Exception):
    """An operations endpoint could not start (a port in use, a secret file not ours)."""


@dataclass(frozen=True)
class OpsSettings:
    """What a door's options say. Listen addresses are host:port, "" for off; anything but
    loopback needs `allow_remote`."""

    metrics: str = ""
    log_format: str = "text"
    dry_run: bool = False
    admin: str = ""
    admin_secret: str = ""  # the bearer secret's file ("": ~/.l402proxy/admin-secret)
    allow_remote: bool = False

    def problems(self, names: dict[str, str] | None = None) -> list[tuple[str, str]]:
        """(setting, one-line problem) for each bad value; `names` renames settings to the
        door's option names (mitmproxy: metrics -> l402_metrics) in the messages."""
        names = names or {}
        found: list[tuple[str, str]] = []
        for setting in ("metrics", "admin"):
            value = getattr(self, setting)
            if not value:
                continue
            try:
                parse_listen(
                    value, option=names.get(setting, setting), allow_remote=self.allow_remote
                )
            except ListenError as exc:
                found.append((setting, str(exc)))
        if self.log_format not in LOG_FORMATS:
            option = names.get("log_format", "log_format")
            found.append(
                (
                    "log_format",
                    f"{option}: {self.log_format!r} is not one of {', '.join(LOG_FORMATS)}",
                )
            )
        return found


class _Server(Protocol):
    port: int

    async def close(self) -> None: ...


class Operations:
    """The operations endpoints and watchers of one engine."""

    def __init__(
        self, settings: OpsSettings, door: str, names: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.door = door
        # OpsSettings field -> the door's option name, for the messages.
        self.names = names or {}
        self.servers: list[_Server] = []
        self.watchers: list[Any] = []
        self.undo: list[Callable[[], None]] = []
        self.engine: Paywall | None = None
        self.metrics_port: int | None = None
        self.admin_port: int | None = None

    async def start(self, engine: "Paywall") -> None:
        """Attach the watchers and start the endpoints; OpsError (nothing left running) when
        one cannot start. The engine must be open (the admin API reads its store)."""
        self.engine = engine
        settings = self.settings
        engine.dry_run_option = settings.dry_run
        try:
            if settings.log_format == "json":
                from .jsonlog import DecisionLog, use_json_logs

                self.undo.append(use_json_logs())
                self._watch(DecisionLog())
            if settings.metrics:
                await self._start_metrics()
            if settings.admin:
                await self._start_admin()
        except (ListenError, OSError, ValueError) as exc:
            await self.close()
            raise OpsError(self._named(str(exc))) from exc
        except BaseException:
            await self.close()
            raise
        if engine.dry_run:
            log.warning(
                "l402: DRY RUN: every request is judged and then forwarded, paid or not "
                "(X-L402-Dry-Run says what the paywall would have done)"
            )

    def _named(self, message: str) -> str:
        """ "metrics: ..." as the door's option says it ("l402_metrics: ...")."""
        setting, sep, rest = message.partition(": ")
        if sep and setting in self.names:
            return f"{self.names[setting]}: {rest}"
        return message

    def _watch(self, watcher: Any) -> None:
        assert self.engine is not None
        self.engine.watchers.add(watcher)
        self.watchers.append(watcher)

    async def _start_metrics(self) -> None:
        from .metrics import MetricsServer, metrics, multiprocess

        host, port = parse_listen(
            self.settings.metrics, option="metrics", allow_remote=self.settings.allow_remote
        )
        self._watch(metrics())
        try:
            server = await MetricsServer.start(host, port)
        except ListenError as exc:
            if multiprocess() and "in use" in str(exc):
                # Several workers of one app (uvicorn --workers): the values are shared
                # through PROMETHEUS_MULTIPROC_DIR and one worker serves them all.
                log.info(f"l402: metrics at {host}:{port} are served by another worker")
                return
            raise
        self.servers.append(server)
        self.metrics_port = server.port
        log.info(f"l402: Prometheus metrics at http://{_shown(host)}:{server.port}/metrics")

    async def _start_admin(self) -> None:
        from .admin import AdminServer, admin_secret, default_admin_secret_path

        assert self.engine is not None
        host, port = parse_listen(
            self.settings.admin, option="admin", allow_remote=self.settings.allow_remote
        )
        path = self.settings.admin_secret or default_admin_secret_path()
        secret, created = admin_secret(path)
        server = await AdminServer.start(
            self.engine, host, port, secret, allow_remote=self.settings.allow_remote
        )
        self.servers.append(server)
        self.admin_port = server.port
        url = f"http://{_shown(host)}:{server.port}/"
        log.info(f"l402: admin API and page at {url} (bearer secret in {path})")
        if created and self.settings.log_format != "json":
            # Shown once, on the terminal only: a JSON log goes to collectors, and no secret
            # belongs there; whoever runs it reads the file.
            print(
                f"l402: new admin secret, shown only now (kept in {path}): open "
                f"{url}#secret={secret}",
                file=sys.stderr,
                flush=True,
            )

    async def close(self) -> None:
        servers, self.servers = self.servers, []
        for server in reversed(servers):
            try:
                await server.close()
            except Exception as exc:
                log.warning(f"l402: closing {type(server).__name__}: {exc}")
        if self.engine is not None:
            for watcher in self.watchers:
                self.engine.watchers.remove(watcher)
        self.watchers = []
        for undo in reversed(self.undo):
            undo()
        self.undo = []


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host
