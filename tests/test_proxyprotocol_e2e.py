"""
End to end behind a pretend load balancer: C{--https haproxy:tcp:...}
and C{--http haproxy:tcp:...} on loopback, a real client that writes a
PROXY header and then a real TLS ClientHello for a name never seen
(L{tests.support.proxyclient}), the local CA, and the test backend, which
echoes the headers it got.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from .support.processes import run
from .test_e2e import EdgeTestCase, start_edge

CLIENT = os.path.join(os.path.dirname(__file__), "support", "proxyclient.py")


class BehindBalancerTests(EdgeTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        self.log = os.path.abspath(self.mktemp())
        self.edge, self.https_port, self.http_port = await start_edge(
            self, "--https", "haproxy:tcp:0:interface=127.0.0.1", "--http", "haproxy:tcp:0:interface=127.0.0.1",
            "--trusted-proxy", "203.0.113.0/24", "--trusted-proxy", "2001:db8::/32",
            "--access-log", self.log, backend=self.backend.url,
        )
        self.root = self.edge.on_demand.local_ca.root_path

    async def client(self, header: str, name: str, *extra: str, port: int | None = None) -> dict[str, Any]:
        out, err, code = await run(sys.executable, [CLIENT, str(port or self.https_port), header, name, self.root,
                                                    *extra])
        self.assertEqual(code, 0, err)
        return dict(json.loads(out))

    def echoed(self, result: dict[str, Any]) -> dict[str, str]:
        self.assertIn("body", result, result)
        self.assertTrue(result["head"].startswith("HTTP/1.1 200 "), result)
        return dict(json.loads(result["body"])["headers"])

    async def test_first_handshake_behind_the_balancer(self) -> None:
        """
        PROXY v1, then the ClientHello for a new name: the certificate is
        issued on that very connection, and the backend and the access log
        see the address from the header.
        """
        headers = self.echoed(await self.client("v1:198.51.100.23", "lb-v1.test"))
        self.assertEqual(headers["x-forwarded-for"], "198.51.100.23")
        self.assertEqual(headers["x-forwarded-proto"], "https")
        self.assertEqual(self.issued, 1)
        headers = self.echoed(await self.client("v2:2001:db9::7", "lb-v2.test"))
        self.assertEqual(headers["x-forwarded-for"], "2001:db9::7")
        self.assertEqual(self.issued, 2)
        await self.edge.stopService()
        with open(self.log) as f:
            lines = f.read().splitlines()
        self.assertEqual([line.split(" ", 1)[0] for line in lines], ["198.51.100.23", "2001:db9::7"])

    async def test_trusted_proxy_chain(self) -> None:
        """
        A peer (after the PROXY header) inside --trusted-proxy hands on its
        chain; any other peer's is dropped.
        """
        headers = self.echoed(await self.client("v1:203.0.113.9", "chain.test", "--xff", "192.0.2.44"))
        self.assertEqual(headers["x-forwarded-for"], "192.0.2.44, 203.0.113.9")
        headers = self.echoed(await self.client("v2:2001:db8::9", "chain.test", "--xff", "192.0.2.44"))
        self.assertEqual(headers["x-forwarded-for"], "192.0.2.44, 2001:db8::9")
        headers = self.echoed(await self.client("v1:198.51.100.23", "chain.test", "--xff", "192.0.2.44"))
        self.assertEqual(headers["x-forwarded-for"], "198.51.100.23")

    async def test_bad_header_closed_at_once(self) -> None:
        """A garbled PROXY header, or none, is closed at once (no hello timeout), counted, never served."""
        for header in ("garbled", "none"):
            result = await self.client(header, "bad-header.test")
            # Reset or closed before the handshake: an error, never a response.
            self.assertIn("error", result)
            self.assertLess(result["seconds"], 5)
        limits = await self.metric("tenantedge_limits_total", '{reason="proxy-header-invalid"}')
        self.assertEqual(limits, 2)
        self.assertEqual(self.issued, 0)

    async def test_port_80(self) -> None:
        """Port 80 takes the PROXY header too: the redirect is served after it, refused without it."""
        result = await self.client("v1:198.51.100.23", "plain.test", "--plain", port=self.http_port)
        self.assertTrue(result["head"].startswith("HTTP/1.1 308 "), result)
        result = await self.client("none", "plain.test", "--plain", port=self.http_port)
        self.assertEqual(result.get("head", ""), "")

    async def metric(self, name: str, labels: str = "") -> float:
        port = (await self.edge.listening_ports())["admin"].getHost().port
        out, err, code = await run(self.curl, ["--silent", f"http://127.0.0.1:{port}/metrics"])
        for line in out.decode().splitlines():
            if line.startswith(name + labels + " "):
                return float(line.split()[-1])
        return 0.0

