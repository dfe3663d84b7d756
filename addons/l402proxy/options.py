"""The life of the addons' l402_* options, shared by the server and the client addon.

mitmproxy's shape stays: each addon declares its options, with their help, in load() and checks
them in configure(). This module adds what mitmproxy does not do for a script's options, so that
every bad value fails closed:

- `--set l402_x=value` waits in mitmproxy's `options.deferred` until the script's load() declares
  the option; mitmproxy then converts it in `process_deferred`, and a value it cannot convert
  (`l402_offer_upgrade=yes`, an option set twice) raises inside its script loader, which drops
  the whole addon without a word: the proxy runs, without paywall or payer. `take_deferred`
  applies the addon's values itself and turns a bad one into a refusal.
- A misspelt name (`l402_rule`) stays deferred for ever and is ignored: here it is an error,
  with the name meant.
- At startup mitmproxy exits for a logged error only once it listens (its errorcheck looks
  before the scripts load, then after the servers are up). A refusal at startup is logged and
  stops the process at the end of configure(), before it serves anything (mitmproxy 11 has not
  bound its port by then; 12 binds a literal --listen-host before it loads scripts).
- While running, a refusal is an OptionsError: mitmproxy keeps the previous value.
"""

import contextlib
import difflib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.optmanager import OptManager, _UnconvertedStrings

log = logging.getLogger(__name__)

AddonName = Literal["server", "client"]

PREFIX = "l402_"
# Which addon declares which option, so that one given to the other addon is named as such, not
# taken for a typo. (What is known is what load() declared; tests keep this table in step.)
OPTION_NAMES: dict[AddonName, frozenset[str]] = {
    "server": frozenset(
        {
            "l402_rules",
            "l402_backend",
            "l402_store",
            "l402_dev_ledger",
            "l402_offer_upgrade",
            "l402_upstream_timeout",
            "l402_metrics",
            "l402_log_format",
            "l402_dry_run",
            "l402_admin",
            "l402_admin_secret",
            "l402_ops_remote",
            "l402_schemes",
        }
    ),
    "client": frozenset(
        {
            "l402_wallet",
            "l402_max_price_sat",
            "l402_max_fee_sat",
            "l402_budget_daily_sat",
            "l402_budget_total_sat",
            "l402_allow",
            "l402_clients",
            "l402_fallback_free",
            "l402_store",
            "l402_dev_ledger",
            "l402_pay_timeout",
            "l402_prefer",
        }
    ),
}
SCRIPTS: dict[AddonName, str] = {"server": "addons/server.py", "client": "addons/client.py"}
# What a value of each option type must look like, as the refusal says it.
EXPECTED: dict[object, str] = {
    int: "a whole number",
    int | None: "a whole number, or empty for none",
    bool: "true or false",
    str: "a text value",
    Sequence[str]: "a list of text values",
}


def is_ours(name: str) -> bool:
    """An option name meant for one of our addons, however misspelt (l402-rules, L402_rules)."""
    return name.lower().replace("-", "_").startswith(PREFIX)


def unknown_option(name: str, addon: AddonName, declared: Iterable[str]) -> str:
    """Why `name` is none of the options `addon` `declared`: the other addon's, or a typo."""
    for other, names in OPTION_NAMES.items():
        if other != addon and name in names:
            return (
                f"{name} is a {other} option ({SCRIPTS[other]}); "
                f"this is the {addon} addon ({SCRIPTS[addon]})"
            )
    known = sorted(declared)
    close = difflib.get_close_matches(name.lower().replace("-", "_"), known, n=1, cutoff=0.6)
    if close:
        return f"unknown option {name} (did you mean {close[0]}?)"
    return f"unknown option {name}; the {addon} addon has {', '.join(known)}"


def bad_value(name: str, typespec: object, given: object, why: str) -> str:
    """The refusal of a value mitmproxy could not take for an option of type `typespec`.

    `given` is what --set gave (a list of strings: one per --set) or what config.yaml held.
    """
    if isinstance(given, list) and typespec != Sequence[str]:
        if not given:
            return f"{name}: needs a value ({name}=...)"
        if len(given) > 1:
            shown = ", ".join(repr(v) for v in given)
            return f"{name}: set {len(given)} times ({shown}); set it once"
        given = given[0]
    expected = EXPECTED.get(typespec)
    if expected is None:
        return f"{name}: {given!r}: {why}"
    return f"{name}: {given!r} is not {expected}"


def mitmproxy_is_starting() -> bool:
    """Is a mitmproxy tool (mitmdump, mitmweb, mitmproxy) still starting up?

    Its errorcheck addon is there to stop it for an error logged during startup, and its script
    loader has not seen the `running` event. False in mitmproxy's test context (no errorcheck)
    and for a script reloaded while the proxy runs: then a refused value only fails closed.
    """
    try:
        addons = ctx.master.addons
    except AttributeError:  # no mitmproxy at all
        return False
    loader = addons.get("scriptloader")
    return (
        addons.get("errorcheck") is not None
        and loader is not None
        and not getattr(loader, "is_running", True)
    )


class OptionGuard:
    """One addon's l402_* options through mitmproxy's lifecycle.

    `misconfigured` (option -> why its value was refused) is the addon's: while it holds
    anything the addon fails closed. A value refused in load() (deferred from the command line,
    or an unknown name) stays refused: only a restart can give it again.
    """

    def __init__(self, addon: AddonName, misconfigured: dict[str, str] | None = None) -> None:
        self.addon: AddonName = addon
        self.misconfigured: dict[str, str] = {} if misconfigured is None else misconfigured
        self.from_load: set[str] = set()
        # option -> its value when the addon started, for options read only at start.
        self.pinned: dict[str, Any] = {}

    # -- load ----------------------------------------------------------------------------------

    def take_deferred(self, loader: Loader) -> None:
        """Apply the l402_* values mitmproxy kept for this addon; refuse bad ones and unknown
        names. Called at the end of load(), once the options are declared and before mitmproxy
        converts the deferred values itself (and drops the addon on the first bad one)."""
        options = loader.master.options
        declared = {name for name in set(options.keys()) if name.startswith(PREFIX)}
        for name in [n for n in options.deferred if is_ours(n)]:
            given = options.deferred.pop(name)
            if name not in declared:
                self._refuse_at_load(name, unknown_option(name, self.addon, declared))
                continue
            try:
                apply_value(options, name, given)
            except (exceptions.OptionsError, TypeError, ValueError) as exc:
                strings = given.val if isinstance(given, _UnconvertedStrings) else given
                typespec = dict(options.items())[name].typespec
                self._refuse_at_load(name, bad_value(name, typespec, strings, str(exc)))

    def _refuse_at_load(self, option: str, message: str) -> None:
        log.error(f"l402: {message}")
        if option not in self.from_load:
            self.from_load.add(option)
            self.misconfigured[option] = message

    # -- configure -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def configuring(self, updated: set[str]) -> Iterator[None]:
        """Wrap configure(): refuse a change to an option read only at start, and at startup
        stop mitmproxy, before it serves, if anything was refused."""
        for option in sorted(updated & self.pinned.keys()):
            if getattr(ctx.options, option) != self.pinned[option]:
                raise exceptions.OptionsError(
                    f"{option} cannot change while running: restart mitmproxy with the new value"
                )
        yield
        if self.misconfigured and mitmproxy_is_starting():
            self._stop()

    def refuse(self, option: str, problem: str, *, running: bool) -> None:
        """A bad value: while running an OptionsError (mitmproxy keeps the previous value);
        before, one error line, and the addon fails closed (and mitmproxy stops, at startup)."""
        message = problem if problem.startswith(PREFIX) else f"{option}: {problem}"
        if running:
            raise exceptions.OptionsError(message)
        if option in self.from_load:
            return  # the value given at start was refused already: that is the cause
        log.error(f"l402: {message}")
        self.misconfigured[option] = message

    def accept(self, option: str) -> None:
        """`option`'s value is good (again); a value refused in load() stays refused."""
        if option not in self.from_load:
            self.misconfigured.pop(option, None)

    # -- running -------------------------------------------------------------------------------

    def pin(self, *options: str) -> None:
        """Options read only at start: from now on a change is refused."""
        for option in options:
            self.pinned[option] = getattr(ctx.options, option)

    def _stop(self) -> None:
        """Exit now: mitmproxy's errorcheck would only stop the proxy once it listens."""
        checker = ctx.master.addons.get("errorcheck")
        if getattr(checker, "repeat_errors_on_stderr", False):
            # mitmproxy's console keeps log lines to itself: say it where the user looks.
            for message in self.misconfigured.values():
                print(f"l402: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        exit_now(1)


def exit_now(status: int) -> None:
    """End the process at once. Not SystemExit: unwinding runs the event loop on to cancel its
    tasks, and mitmproxy 12 (which binds a literal --listen-host before it loads scripts) would
    meanwhile accept and handle connections. Nothing was served or paid yet, and no store or
    ledger connection is open before the addons' `running`."""
    os._exit(status)


def apply_value(options: OptManager, name: str, given: object) -> None:
    """Set a deferred value as mitmproxy would: strings from --set are converted by its own
    rules; a value from its config.yaml is taken as it is (and type-checked)."""
    if isinstance(given, _UnconvertedStrings):
        options.set(*([f"{name}={v}" for v in given.val] or [name]))
    else:
        options.update(**{name: given})
