"""
A real ACME server for tests: Debian's C{pebble}, started on run-time
loopback ports, with a small C{twisted.names} DNS server that answers
127.0.0.1 for every name (NXDOMAIN for names containing C{unvalidatable}),
so Pebble's validation authority connects back to the edge under test.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from tenantedge.testing import UNRESOLVABLE, listen_loopback_dns, write_https_material

from .processes import require_tool, terminate

UNVALIDATABLE = UNRESOLVABLE


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PebbleProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ACME directory available" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("pebble exited: " + self.output.decode("utf-8", "replace")[-2000:]))
        self.ended.callback(None)


class Pebble:
    """
    One Pebble instance for one test.

    @ivar http_port: where Pebble's VA sends HTTP-01 requests (the edge's
        --http port).
    @ivar tls_port: where it sends TLS-ALPN-01 handshakes (the edge's
        --https port).
    """

    def __init__(self, testcase: TestCase, env: dict[str, str] | None = None, validity: int | None = None) -> None:
        self.testcase = testcase
        self.env = env or {}
        self.validity = validity
        self.http_port = free_port()
        self.tls_port = free_port()
        self.process: Any = None
        self.proto: _PebbleProcess | None = None

    async def start(self) -> None:
        binary = require_tool(self.testcase, "pebble")
        work = os.path.abspath(self.testcase.mktemp())
        os.makedirs(work)
        self.ca_root, cert, key = write_https_material(work, "tenantedge test CA for pebble")
        udp, tcp = listen_loopback_dns(reactor)
        self.testcase.addCleanup(udp.stopListening)
        if tcp is not None:
            self.testcase.addCleanup(tcp.stopListening)
        self.port = free_port()
        self.management_port = free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": cert,
                "privateKey": key,
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if self.validity is not None:
            config["pebble"]["certificateValidityPeriod"] = self.validity
        config_path = os.path.join(work, "pebble.json")
        with open(config_path, "w") as f:
            json.dump(config, f)
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", **self.env}  # a test may turn the sleep back on
        self.proto = _PebbleProcess()
        self.process = reactor.spawnProcess(
            self.proto, binary, [binary, "-config", config_path, "-dnsserver", f"127.0.0.1:{udp.getHost().port}"],
            env=env,
        )
        self.testcase.addCleanup(self.stop)
        self.proto.ready.addTimeout(30, reactor)
        await self.proto.ready

    @property
    def directory_url(self) -> str:
        return f"https://localhost:{self.port}/dir"

    @property
    def log(self) -> str:
        return self.proto.output.decode("utf-8", "replace") if self.proto else ""

    def count(self, pattern: str) -> int:
        """How many requests Pebble logged whose line matches C{pattern}."""
        return len(re.findall(pattern, self.log))

    @property
    def orders(self) -> int:
        """Orders Pebble created (not requests: a badNonce retry is not an order)."""
        return self.count(r"Added order \"")

    @property
    def new_accounts(self) -> int:
        """Accounts Pebble created (an existing account's lookup is not counted)."""
        return self.count(r"There are now \d+ accounts in memory")

    async def root_pem(self, path: str) -> str:
        """Fetch Pebble's issuing root (new each run) into C{path}, for curl --cacert."""
        import treq
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        from tenantedge.trust import https_policy

        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.task import deferLater

        client = HTTPClient(Agent(reactor, contextFactory=https_policy([self.ca_root])))
        # Pebble logs "ACME directory available" once its main listener is
        # up; the management listener may come a moment later.
        for attempt in range(100):
            try:
                response = await client.get(f"https://localhost:{self.management_port}/roots/0")
                break
            except ConnectionRefusedError:
                if attempt == 99:
                    raise
                await deferLater(reactor, 0.05, lambda: None)
        body = await treq.content(response)
        with open(path, "wb") as f:
            f.write(body)
        return path

    def stop(self) -> defer.Deferred[None]:
        if self.proto is None:
            return defer.succeed(None)
        return terminate(self.process, self.proto.ended)
