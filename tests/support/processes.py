"""
Process helpers for end-to-end tests: run real clients (curl, openssl) and
a real backend as subprocesses without blocking the reactor, and stop every
process we start by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated

HERE = os.path.dirname(os.path.abspath(__file__))


def require_tool(testcase: Any, name: str) -> str:
    """
    The path of an external tool the test needs. Missing: a failure under
    CI (CI=true), a skip elsewhere.
    """
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make deps installs it)"
        if os.environ.get("CI") == "true":
            testcase.fail(message)
        raise testcase.skipException(message)
    return path


def terminate(process: Any, ended: defer.Deferred[None]) -> defer.Deferred[None]:
    """SIGTERM a process we started (by its PID); fires when it has ended."""
    if process is not None and process.pid is not None:
        try:
            os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return ended


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes | None, on_stdout: Any = None) -> None:
        self.stdin = stdin
        self.out = b""
        self.err = b""
        self.on_stdout = on_stdout
        self.done: defer.Deferred[tuple[bytes, bytes, int]] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.on_stdout is not None:
            self.on_stdout(self.out)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else -1
        self.done.callback((self.out, self.err, code if code is not None else -1))


def run(
    executable: str,
    args: list[str],
    stdin: bytes | None = b"",
    timeout: float = 60,
    on_stdout: Any = None,
) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """
    Run a command; fire with (stdout, stderr, exit code). Killed (by PID)
    if it outlives C{timeout}.
    """
    proto = _Collect(stdin, on_stdout)
    process = reactor.spawnProcess(proto, executable, [executable, *args], env=os.environ.copy())

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except Exception:
            pass

    timer = reactor.callLater(timeout, kill)
    proto.done.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
    return proto.done


class Backend:
    """
    The test backend (L{tests.support.backend}) in its own process: on a
    free loopback port, or C{port}, or the UNIX socket C{unix}; or another
    script here (C{script}) that prints its port first.
    """

    def __init__(self, port: int | None = None, unix: str | None = None, name: str = "backend",
                 script: str = "backend.py") -> None:
        self.port: int | None = port
        self.unix = unix
        self.name = name
        self.script = script
        self.process: Any = None
        self._ended: defer.Deferred[None] = defer.Deferred()

    async def start(self) -> int:
        started: defer.Deferred[int] = defer.Deferred()
        backend = self

        class P(protocol.ProcessProtocol):
            buf = b""

            def outReceived(self, data: bytes) -> None:
                self.buf += data
                if b"\n" in self.buf and not started.called:
                    started.callback(int(self.buf.split(b"\n")[0]))

            def processEnded(self, reason: Any) -> None:
                if not started.called:
                    started.errback(RuntimeError("backend exited before it was ready"))
                backend._ended.callback(None)

        self._ended = defer.Deferred()
        where = ["--unix", self.unix] if self.unix else ["--port", str(self.port or 0)]
        self.process = reactor.spawnProcess(
            P(), sys.executable,
            [sys.executable, os.path.join(HERE, self.script),
             *([*where, "--name", self.name] if self.script == "backend.py" else [])],
            env=os.environ.copy(),
        )
        started.addTimeout(30, reactor)
        port = await started
        if not self.unix:
            self.port = port
        return port

    @property
    def url(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"http://127.0.0.1:{self.port}"

    def stop(self) -> defer.Deferred[None]:
        return terminate(self.process, self._ended)
