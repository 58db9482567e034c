"""
Tests for L{tenantedge.workerlogs}: a worker's log events cross a real
pipe as JSON lines and come out of the supervisor's publisher again.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.main import CONNECTION_DONE
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, LogPublisher, Logger, eventAsJSON, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.workerlogs import WorkerLogReader, pipe_stream, send_logs_to


class WorkerLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.inherited: list[dict[str, Any]] = []
        self.worker = LogPublisher(self.inherited.append)
        self.published: list[dict[str, Any]] = []
        self.reactor = MemoryReactorClock()
        self.reader = WorkerLogReader(self.reactor, self.read_fd, 1, self.published.append)
        self.reader.start()
        # Each descriptor is closed exactly once, by its owner: closing a
        # number twice (or letting a stream's garbage collection close it
        # late) can close a socket a later test got the same number for.
        self.write_open = True
        self.stream: Any = None
        self.addCleanup(self._close)

    def _close(self) -> None:
        if self.stream is not None:
            self.stream.close()  # it owns the write end
        elif self.write_open:
            os.close(self.write_fd)
        if self.reader in self.reactor.getReaders():
            self.reader.connectionLost(Failure(CONNECTION_DONE))  # it owns the read end

    def test_events_cross_the_pipe(self) -> None:
        """
        After C{send_logs_to}, the worker's inherited observers see nothing;
        the supervisor publishes the events, level, text and failure intact,
        marked with the worker.
        """
        self.assertIn(self.reader, self.reactor.getReaders())
        self.stream = pipe_stream(self.write_fd)
        send_logs_to(self.stream, self.worker)
        log = Logger(observer=self.worker, namespace="tenantedge.test")
        log.info("listening: {what}", what="https")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke for {host}", host="a.test")
        self.assertEqual(self.inherited, [])
        self.reader.doRead()
        self.assertEqual([formatEvent(e) for e in self.published], ["listening: https", "it broke for a.test"])
        self.assertEqual([e["log_level"] for e in self.published], [LogLevel.info, LogLevel.critical])
        self.assertEqual({e["log_system"] for e in self.published}, {"worker-1"})
        self.assertIsInstance(self.published[1]["log_failure"], Failure)

    def test_partial_lines_and_stray_text(self) -> None:
        """A line split across reads is joined; a non-JSON line is kept as text."""
        line = eventAsJSON({"log_format": "hello", "log_level": LogLevel.warn}).encode() + b"\n"
        os.write(self.write_fd, b"not json\n" + line[:10])
        self.reader.doRead()
        os.write(self.write_fd, line[10:])
        self.reader.doRead()
        self.assertEqual(self.published[1]["log_level"], LogLevel.warn)
        self.assertEqual([formatEvent(e) for e in self.published], ["not json", "hello"])

    def test_worker_gone(self) -> None:
        """The worker's end closing ends the reader, which leaves the reactor."""
        os.write(self.write_fd, b'{"log_format": "last words"}')
        os.close(self.write_fd)
        self.write_open = False
        self.assertIsNone(self.reader.doRead())
        result = self.reader.doRead()
        self.assertEqual(result, CONNECTION_DONE)
        self.reader.connectionLost(Failure(result))
        self.assertEqual([formatEvent(e) for e in self.published], ["last words"])
        self.assertNotIn(self.reader, self.reactor.getReaders())
