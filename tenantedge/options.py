"""
The command line of C{twistd tenantedge} / C{twist tenantedge}: one option
per L{tenantedge.config.OnDemandConfig} setting, plus C{--config FILE}
(TOML, same names; the command line wins).

Options collect raw strings; L{Options.postOptions} hands them to
L{OnDemandConfig.from_settings}, so a bad value is refused with the same
one-line error as in a TOML file or an endpoint string, and
C{options.config} is the validated value.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from . import __version__
from .config import ConfigError, OnDemandConfig, load_toml, settings, show_default

__all__ = ["Options", "PluginOptions", "BadValue"]


class BadValue(usage.UsageError):
    """
    A setting's value is bad (as opposed to an unknown option): one line
    that names it is all the user needs, not the whole C{--help}.
    """


def _option_name(field: Any) -> str:
    return str(field.name).replace("_", "-")


def _default_note(field: Any) -> str:
    shown = show_default(field)
    kind = field.metadata["kind"]
    if kind == "list":
        return f" (repeatable; default: {shown})" if shown else " (repeatable)"
    return f" [default: {shown}]" if shown else ""


class Options(usage.Options):
    """
    Options for C{twistd tenantedge}; every one is described in the
    README's option table and in C{--help}.

    @ivar config: the validated L{OnDemandConfig}, after parsing.
    @ivar explicit: the settings given on the command line or in the file.
    """

    synopsis = "[options]"
    longdesc = (
        "HTTPS edge with on-demand TLS: certificates for tenants' own domains are obtained at the first "
        "handshake and the requests reverse-proxied to the backend. Durations are seconds or take a unit "
        "(250ms, 90s, 10m, 12h, 7d); sizes are bytes or take K, M or G. Every option can also be set in the "
        "TOML file given with --config; the command line wins."
    )

    optFlags: list[list[Any]] = [
        [_option_name(f), None, f.metadata["doc"]] for f in settings() if f.metadata["kind"] == "flag"
    ]
    optParameters: list[list[Any]] = [["config", None, None, "TOML file with option values."]] + [
        [_option_name(f), None, None, f.metadata["doc"] + _default_note(f)]
        for f in settings()
        if f.metadata["kind"] == "value"
    ]

    def __init__(self) -> None:
        super().__init__()
        self.explicit: dict[str, Any] = {}
        self._from_cli: set[str] = set()
        self.config: OnDemandConfig | None = None

    def _add_list_value(self, name: str, value: str) -> None:
        if name not in self._from_cli:
            # The command line replaces a list from the config file.
            self._from_cli.add(name)
            self.explicit[name] = []
        self.explicit[name].append(value)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"tenantedge {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        config = _find_config_argument(argv)
        if config is not None:
            try:
                self.explicit.update(load_toml(config))
            except ConfigError as e:
                raise BadValue(str(e)) from None
        super().parseOptions(argv)

    def postOptions(self) -> None:
        for field in settings():
            name = _option_name(field)
            kind = field.metadata["kind"]
            if kind == "value" and self[name] is not None:
                self.explicit[name] = self[name]
            elif kind == "flag" and self[name]:
                self.explicit[name] = True
        try:
            self.config = OnDemandConfig.from_settings(self.explicit)
        except ConfigError as e:
            raise BadValue(f"--{e.key}: {e.problem}" if e.key else e.problem) from None
        # Keep usage.Options' mapping in step with the value, for code that
        # reads options["store"].
        for field in settings():
            self[_option_name(field)] = getattr(self.config, field.name)


def _find_config_argument(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _list_option(name: str, doc: str) -> Any:
    def option(self: Options, value: str) -> None:
        self._add_list_value(name, value)

    option.__doc__ = doc
    return option


# usage.Options finds repeatable options as opt_<name> methods of the class.
for _field in settings():
    if _field.metadata["kind"] == "list":
        setattr(Options, "opt_" + _field.name, _list_option(_option_name(_field), _field.metadata["doc"] + _default_note(_field)))
del _field


class PluginOptions(Options):
    """
    The twistd plugin's options (L{tenantedge.tap.Options}). twistd and
    twist print the whole C{--help} before any usage error; for a bad
    value, one line naming the setting (and the file) says all there is
    to say, so it ends the process with just that line (status 1).
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except BadValue as e:
            raise SystemExit(f"tenantedge: {e}") from None
