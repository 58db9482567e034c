"""
WebSockets end to end through a real edge on loopback: the service built
by L{build_edge} (local CA), a real WebSocket server (the C{websockets}
library, C{tests/support/wsbackend.py}) as the backend and a real
WebSocket client (C{tests/support/wsclient.py}), each in its own process
on run-time ports.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support.processes import HERE, Backend, run
from .test_e2e import start_edge


class WebSocketTests(TestCase):
    timeout = 300

    async def _setUp(self) -> None:
        self.backend = Backend(script="wsbackend.py")
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.edge, self.https_port, _ = await start_edge(self, backend=self.backend.url)
        self.root = self.edge.on_demand.local_ca.root_path

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    async def client(self, scenario: str, name: str = "ws.test") -> dict[str, Any]:
        """Run one client scenario; its JSON result (the client failing fails the test)."""
        out, err, code = await run(
            sys.executable, [os.path.join(HERE, "wsclient.py"), scenario, name, str(self.https_port), self.root],
            timeout=240,
        )
        self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
        result: dict[str, Any] = json.loads(out)
        return result

    def metrics(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.edge.on_demand.timings.registry).decode()

    async def test_echo(self) -> None:
        """Text and binary messages go through and come back."""
        self.assertEqual(await self.client("echo"), {"text": True, "binary": True})
        self.assertIn('tenantedge_upgrades_total{result="switched"} 1.0', self.metrics())

    async def test_backend_sees_tenant_handshake(self) -> None:
        """
        The backend's handshake request has the tenant's Host, fresh
        X-Forwarded-*, Upgrade and Connection: upgrade, and the client's
        WebSocket headers.
        """
        headers = (await self.client("headers"))["headers"]
        self.assertEqual(headers["host"], f"ws.test:{self.https_port}")
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(headers["x-forwarded-proto"], "https")
        self.assertEqual(headers["upgrade"].lower(), "websocket")
        self.assertEqual(headers["connection"].lower(), "upgrade")
        self.assertIn("sec-websocket-key", headers)
        self.assertEqual(headers["sec-websocket-version"], "13")

    async def test_ten_mebibyte_messages(self) -> None:
        """A 10 MiB message to the backend and its 10 MiB echo, byte for byte."""
        result = await self.client("big")
        self.assertEqual(result["length"], 10 * 1024 * 1024)
        self.assertEqual(result["received"], result["sent"])

    async def test_server_initiated_close(self) -> None:
        """The backend's close frame (code and reason) reaches the client, and the connection ends."""
        result = await self.client("close")
        self.assertEqual(result, {"message": "bye soon", "code": 4000, "reason": "bye"})

    async def test_hundred_concurrent_sockets(self) -> None:
        """100 sockets open at once, each echoing its own message."""
        self.assertEqual(await self.client("many"), {"open": 100, "echoed": 100})

    async def test_over_http2(self) -> None:
        """
        RFC 8441: a WebSocket on an HTTP/2 stream (extended CONNECT),
        relayed to the backend as an HTTP/1.1 upgrade: a text message and
        a 4 MiB binary one echo back, and the close handshake completes.
        """
        out, err, code = await run(
            sys.executable, [os.path.join(HERE, "h2wsclient.py"), "ws2.test", str(self.https_port), self.root,
                             str(4 * 1024 * 1024)],
            timeout=240,
        )
        self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
        self.assertEqual(json.loads(out), {"enabled": True, "status": "200", "text": True, "binary": True,
                                           "close": True})
        self.assertIn('tenantedge_upgrades_total{result="switched"} 1.0', self.metrics())
