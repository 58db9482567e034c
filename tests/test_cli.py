"""
The admin CLI (C{python -m tenantedge certs ...}) as a real subprocess,
against a real store and a running server (in this process, on loopback
ports chosen at run time).
"""

from __future__ import annotations

import json
import os
import sys

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import deferLater

from .support.processes import run
from .test_e2e import EdgeTestCase, start_edge


class CLITests(EdgeTestCase):
    async def cli(self, *args: str, store: str | None = None) -> tuple[bytes, bytes, int]:
        return await run(
            sys.executable,
            ["-m", "tenantedge", "certs", *args, "--store", store or self.edge.store.path,
             "--admin", f"tcp:{self.admin_port}:interface=127.0.0.1"],
        )

    async def _setUp(self) -> None:
        await super()._setUp()
        ports = await self.edge.listening_ports()
        self.admin_port = ports["admin"].getHost().port

    async def test_list_and_show(self) -> None:
        for name in ("a.test", "b.test"):
            out, err, code = await self.fetch(name, "/echo")
            self.assertEqual(code, 0, err)
        out, err, code = await self.cli("list", "--json")
        self.assertEqual(code, 0, err)
        rows = json.loads(out)
        self.assertEqual([r["host"] for r in rows], ["a.test", "b.test"])
        self.assertTrue(rows[0]["issuer"].startswith("tenantedge local root"))
        self.assertEqual(rows[0]["key_type"], "ecdsa-secp256r1")
        self.assertGreater(rows[0]["days_left"], 6.9)
        out, err, code = await self.cli("list")
        self.assertIn(b"a.test", out)
        self.assertIn(b"DAYS", out)
        out, err, code = await self.cli("show", "b.test", "--json")
        self.assertEqual(json.loads(out)["names"], ["b.test"])
        out, err, code = await self.cli("show", "missing.test")
        self.assertEqual(code, 1)
        self.assertIn(b"no usable certificate", err)

    async def test_issue_and_renew_through_the_server(self) -> None:
        """
        issue and renew go through the running server (its policy and
        issuer), and the next handshake gets the renewed certificate.
        """
        out, err, code = await self.cli("issue", "cli.test")
        self.assertEqual(code, 0, err)
        self.assertIn(b"issued, valid until", out)
        first = await self.edge.store.get("cli.test")
        out, err, code = await self.cli("renew", "cli.test")
        self.assertEqual(code, 0, err)
        renewed = await self.edge.store.get("cli.test")
        self.assertNotEqual(renewed.leaf.serial_number, first.leaf.serial_number)
        # The next handshake is served the renewed certificate (hot swap).
        out, err, code = await self.fetch("cli.test", "/echo", "-w", "%{certs}", "-o", "/dev/null")
        self.assertEqual(code, 0, err)
        served = x509.load_pem_x509_certificates(out)[0]
        self.assertEqual(served.serial_number, renewed.leaf.serial_number)
        # The policy still applies: a denied name is refused.
        out, err, code = await self.cli("issue", "www.own.test")
        self.assertEqual(code, 1)
        self.assertIn(b"refused: deny-list", err)

    async def test_remove_while_serving(self) -> None:
        """
        remove archives the entry while the server runs, and the server
        stops serving it from its cache (it obtains a new one at the next
        handshake).
        """
        out, err, code = await self.fetch("gone.test", "/echo")
        self.assertEqual(code, 0, err)
        old = await self.edge.store.get("gone.test")
        self.assertIsNotNone(self.edge.resolver.cached("gone.test"))
        out, err, code = await self.cli("remove", "gone.test")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(os.listdir(os.path.join(self.edge.store.path, "archive"))), 1)
        self.assertIsNone(self.edge.resolver.cached("gone.test"))
        out, err, code = await self.fetch("gone.test", "/echo")
        self.assertEqual(code, 0, err)
        new = await self.edge.store.get("gone.test")
        self.assertNotEqual(new.leaf.serial_number, old.leaf.serial_number)

    async def test_server_notices_changes_without_admin(self) -> None:
        """
        With the admin endpoint unreachable, the server still notices a
        replaced entry within --store-poll.
        """
        edge, port, _ = await start_edge(self, "--store-poll", "0.2", backend=self.backend.url)
        self.root = edge.local_ca.root_path
        out, err, code = await self.fetch("poll.test", "/echo", port=port)
        self.assertEqual(code, 0, err)
        self.admin_port = 1  # nothing listens there
        out, err, code = await self.cli("remove", "poll.test", store=edge.store.path)
        self.assertEqual(code, 0, err)
        self.assertIn(b"--store-poll", out)
        for _ in range(50):
            if edge.resolver.cached("poll.test") is None:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertIsNone(edge.resolver.cached("poll.test"))

    async def test_admin_requires_header(self) -> None:
        """Admin POSTs without the CLI's header are refused (no cross-site orders)."""
        out, err, code = await run(self.curl, ["--silent", "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}",
                                               f"http://127.0.0.1:{self.admin_port}/certs/x.test/issue"])
        self.assertEqual(out, b"403")
        out, err, code = await run(self.curl, ["--silent", "-X", "POST", "-H", "X-Tenantedge-Admin: 1",
                                               f"http://127.0.0.1:{self.admin_port}/certs/..%2Fetc/issue"])
        self.assertIn(b"invalid host name", out)
        self.assertEqual(sum(self.edge.resolver.issuer.counts.values()), 0)

    async def test_usage_errors(self) -> None:
        out, err, code = await run(sys.executable, ["-m", "tenantedge", "certs", "frobnicate"])
        self.assertEqual(code, 1)
        self.assertIn(b"choose list", err)
        out, err, code = await run(sys.executable, ["-m", "tenantedge", "certs", "list", "--store", "/nonexistent"])
        self.assertEqual(code, 1)
        self.assertIn(b"no store at /nonexistent", err)
