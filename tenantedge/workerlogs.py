"""
With C{--workers}, only the supervisor writes the log: each forked worker
sends its log events up a pipe, one JSON line each, and the supervisor
publishes them to its own observers (C{twistd.log}, stdout, JSON lines),
marked with the worker's slot.

Why: a forked worker inherits the supervisor's observers, and with them
twistd's C{LogFile}, which rotates by itself once I{its} count of written
bytes passes a megabyte. N processes each rotating the same file on their
own count renamed it under each other, and kept writing to the renamed
file; messages landed in C{twistd.log.3} or were lost. One writer keeps
twistd's rotation (and an external logrotate) correct.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.internet import fdesc
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import (
    ILogObserver,
    LogLevel,
    LogPublisher,
    eventFromJSON,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["WorkerLogReader", "pipe_stream", "send_logs_to"]


def pipe_stream(fd: int) -> IO[str]:
    """The worker's end of its log pipe, line-buffered text (it owns C{fd} from now on)."""
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")


def send_logs_to(stream: IO[str], publisher: LogPublisher = globalLogPublisher) -> ILogObserver:
    """
    In a forked worker: publish every log event as a JSON line on
    C{stream} (L{pipe_stream}) instead of to the observers inherited from
    the supervisor.

    @return: the observer now writing to C{stream}.
    """
    # LogPublisher offers no public way to list its observers; the
    # attribute is pinned by tests/test_workerlogs.py.
    for observer in list(publisher._observers):
        publisher.removeObserver(observer)
    observer = jsonFileLogObserver(stream, recordSeparator="")
    publisher.addObserver(observer)
    return observer


@implementer(IReadDescriptor)
class WorkerLogReader:
    """
    The supervisor's end of one worker's log pipe: each line becomes a log
    event again, published with C{log_system} naming the worker. The pipe
    ends when the worker does (its end closes); the reader then removes
    itself.

    @ivar slot: the worker's slot, for C{log_system}.
    """

    MAX_LINE = 1024 * 1024

    def __init__(self, reactor: Any, fd: int, slot: int, publish: ILogObserver = globalLogPublisher) -> None:
        self.reactor = reactor
        self.fd = fd
        self.slot = slot
        self.publish = publish
        self._buffer = b""
        fdesc.setNonBlocking(fd)

    def start(self) -> None:
        self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"worker-{self.slot} log"

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, self._received)

    def _received(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.MAX_LINE:
            self._buffer = b""  # no newline in a megabyte: not ours
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            # Not a JSON event (a stray write to the pipe): keep it as text.
            event = {"log_format": "{line}", "line": line.decode("utf-8", "replace"), "log_level": LogLevel.info,
                     "log_namespace": "tenantedge.workers", "log_time": self.reactor.seconds()}
        event["log_system"] = f"worker-{self.slot}"
        self.publish(event)

    def connectionLost(self, reason: Failure) -> None:
        self.reactor.removeReader(self)
        if self._buffer:
            self._emit(self._buffer)
            self._buffer = b""
        try:
            os.close(self.fd)
        except OSError:
            pass
