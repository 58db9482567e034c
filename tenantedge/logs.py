"""
JSON-lines logging: one flat JSON object per event.

Any of these gives the same records: C{twistd tenantedge --log-format json}
(written where twistd would write its log: C{--logfile}, C{twistd.log} when
daemonised, stdout with C{-n}), C{twist --log-format=json tenantedge} or
C{twist tenantedge --log-format json} (stdout or C{--log-file}), and
C{twistd --logger tenantedge.logs.json_observer tenantedge} (stdout).
tenantedge's own events carry C{event} (C{issued}, C{issue-failed},
C{refused}, C{refused-summary}, C{renewed}, C{renew-failed},
C{archived}), C{host}, and where they apply C{reason}, C{duration},
C{issuer}, C{problem} (the CA's problem type) and C{error}.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent, jsonFileLogObserver
from twisted.python import logfile

__all__ = ["json_observer", "json_line", "use_json_logs"]

_SKIP = {"log_logger", "log_source", "log_io", "log_trace", "log_flattened", "log_format", "log_level",
         "log_namespace", "log_time", "log_failure", "log_text", "log_system", "log_legacy"}


def json_line(event: dict[str, Any]) -> str:
    """
    One event as a flat JSON object: time, level, namespace, message, and
    every field the event was logged with (values that are not JSON become
    their C{str()}). Failures are reduced to their message.
    """
    out: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["error_type"] = failure.type.__name__ if failure.type else None
    for key, value in event.items():
        if key in _SKIP or key.startswith("_") or key in out:
            continue
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return json.dumps(out, default=str) + "\n"


def json_observer(stream: IO[str] | None = None) -> FileLogObserver:
    """A log observer writing L{json_line}s (to stdout by default)."""
    return FileLogObserver(stream if stream is not None else sys.stdout, json_line)


def _twistd_log_stream(server_options: Any) -> IO[str]:
    """
    Where C{twistd} itself would write its log (see
    C{twisted.scripts._twistd_unix.UnixAppLogger}): stdout for C{-n} without
    C{--logfile} or for C{--logfile -}, else the file (C{twistd.log} by
    default).
    """
    name = server_options.get("logfile")
    if name == "-" or (server_options.get("nodaemon") and not name):
        return sys.stdout
    stream: IO[str] = logfile.LogFile.fromFullPath(name or "twistd.log")
    return stream


def use_json_logs(runner_options: Any, application: Any) -> None:
    """
    Make the runner that started the plugin log flat JSON lines.

    @param runner_options: the parent of the plugin's options: twistd's
        C{ServerOptions} or twist's C{TwistOptions} (both are mappings).
    @param application: the twistd application, a C{Componentized}: twistd
        uses its C{ILogObserver} component unless C{--logger} is given.
    """
    if runner_options is None:
        return
    if "fileLogObserverFactory" in runner_options:
        # twist: it builds its observer from this factory after makeService.
        runner_options["fileLogObserverFactory"] = lambda stream: FileLogObserver(stream, json_line)
        return
    if runner_options.get("logger"):
        return  # --logger wins, as twistd documents
    if hasattr(application, "setComponent"):
        application.setComponent(ILogObserver, json_observer(_twistd_log_stream(runner_options)))


def wants_json(runner_options: Any) -> bool:
    """Did the runner itself ask for JSON (C{twist --log-format=json})?"""
    if runner_options is None:
        return False
    try:
        return runner_options.get("fileLogObserverFactory") is jsonFileLogObserver
    except AttributeError:
        return False
