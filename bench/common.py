"""Helpers shared by the benchmark scripts (run from the repository root)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: str, size: int = 3000) -> str:
    """The end of a log file, for error messages."""
    try:
        with open(path, "rb") as f:
            return f.read()[-size:].decode("utf-8", "replace")
    except OSError:
        return ""
