"""
A real Redis for tests: Debian's C{redis-server}, started on a loopback port
chosen at run time, with every file it writes (RDB, AOF) inside the test's
temporary directory, and stopped by PID in cleanup. Missing: a failure under
C{CI=true}, a skip elsewhere (L{tests.support.processes.require_tool}).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tenantedge.resp import BlockingCommands, BlockingRedis, RedisAddress, RedisUnavailable

from .pebble import free_port
from .processes import require_tool


class _RedisProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"Ready to accept connections" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("redis-server exited: " + self.output.decode("utf-8", "replace")[-2000:]))
        ended, self.ended = self.ended, defer.Deferred()
        ended.callback(None)


class RedisServer:
    """
    One C{redis-server} for one test.

    @ivar appendonly: AOF with fsync at every write, for tests where a
        restart must lose nothing acknowledged.
    """

    def __init__(self, testcase: TestCase, appendonly: bool = False, password: str | None = None,
                 interface: str = "127.0.0.1", tls: bool = False, username: str | None = None) -> None:
        self.testcase = testcase
        self.appendonly = appendonly
        self.password = password
        self.interface = interface
        #: TLS only (rediss://), with a throwaway CA (C{self.ca}).
        self.tls = tls
        #: An ACL user (with C{password}); the default user is then off.
        self.username = username
        self.ca: str | None = None
        self.port = free_port()
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.process: Any = None
        self.proto: _RedisProcess | None = None
        self._cleanup = False

    def url(self, prefix: str = "tenantedge", db: int = 0) -> str:
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}@" if self.username else ""
        host = "localhost" if self.tls else self.interface  # the name in the test certificate
        return f"{scheme}://{user}{host}:{self.port}/{db}?prefix={prefix}"

    def address(self, prefix: str = "tenantedge", db: int = 0) -> RedisAddress:
        environ = {"TENANTEDGE_REDIS_PASSWORD": self.password} if self.password else {}
        return RedisAddress.from_url(self.url(prefix, db), environ=environ, ca=self.ca)

    async def start(self) -> None:
        binary = require_tool(self.testcase, "redis-server")
        args = [
            binary, "--port", str(self.port), "--bind", self.interface, "--dir", self.directory,
            "--save", "", "--daemonize", "no", "--protected-mode", "no", "--loglevel", "notice",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.username and self.password:
            args += ["--user", "default", "off", "--user", self.username, "on", f">{self.password}", "~*", "&*",
                     "+@all"]
        elif self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            from tenantedge.testing import write_https_material

            if self.ca is None:
                os.makedirs(os.path.join(self.directory, "tls"), exist_ok=True)
                self.ca, cert, key = write_https_material(os.path.join(self.directory, "tls"))
                self._tls_files = (cert, key)
            cert, key = self._tls_files
            args[args.index("--port") + 1] = "0"  # TLS only
            args += ["--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", self.ca, "--tls-auth-clients", "no"]
        self.proto = _RedisProcess()
        self.process = reactor.spawnProcess(self.proto, binary, args, env={"PATH": os.environ.get("PATH", "")},
                                            path=self.directory)
        if not self._cleanup:
            self._cleanup = True
            self.testcase.addCleanup(self.stop)
        self.proto.ready.addTimeout(20, reactor)
        await self.proto.ready

    def stop(self, sig: int = signal.SIGTERM) -> defer.Deferred[None]:
        """Stop it (by PID); fires once it has exited."""
        if self.proto is None or self.process is None or self.process.pid is None:
            return defer.succeed(None)
        ended = self.proto.ended
        try:
            os.kill(self.process.pid, sig)
        except ProcessLookupError:
            pass
        return ended

    async def restart(self) -> None:
        """Stop (SIGTERM: Redis writes its AOF and exits) and start again on the same port."""
        await self.stop()
        await self.start()

    def client(self, db: int = 0) -> BlockingRedis:
        return BlockingRedis(self.address(db=db))

    async def wait_gone(self) -> None:
        for _ in range(100):
            try:
                BlockingRedis(self.address(), timeout=0.2).close()
            except RedisUnavailable:
                return
            await deferLater(reactor, 0.05, lambda: None)


class SyncRedis:
    """
    A real redis-server for a C{SynchronousTestCase}: started with
    C{subprocess} (waiting for its port), stopped by PID in cleanup.
    """

    def __init__(self, testcase: Any) -> None:
        import shutil
        import subprocess
        import time as _time

        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed (make deps installs it)"
            if os.environ.get("CI") == "true":
                testcase.fail(message)
            raise testcase.skipException(message)
        self.port = free_port()
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory, "--save", "",
             "--daemonize", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory,
        )
        testcase.addCleanup(self.stop)
        for _ in range(200):
            try:
                self.connect().close()
                return
            except RedisUnavailable:
                _time.sleep(0.02)
        testcase.fail("redis-server did not start")

    def url(self, prefix: str = "tenantedge") -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix={prefix}"

    def connect(self) -> BlockingRedis:
        return BlockingRedis(RedisAddress.from_url(self.url(), environ={}), timeout=1)

    def stop(self) -> None:
        try:
            os.kill(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.process.wait()


#: The store code over a blocking connection (now part of the library).
BlockingClientAdapter = BlockingCommands
