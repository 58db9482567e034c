"""
JSON-lines logging.

With C{twist}, use its own option: C{twist --log-format=json tenantedge ...}.
With C{twistd}, name this observer: C{twistd --logger
tenantedge.logs.json_observer tenantedge ...}. Either way each log event is
one JSON object per line; tenantedge's own events carry C{event}
(C{issued}, C{issue-failed}, C{refused}, C{renewed}, C{renew-failed},
C{archived}), C{host}, and where they apply C{reason}, C{duration},
C{issuer}, C{problem} (the CA's problem type) and C{error}.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, formatEvent

__all__ = ["json_observer", "json_line"]

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
