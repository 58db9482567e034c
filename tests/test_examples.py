"""
The examples in C{examples/} run as real processes, on run-time ports
(port 0; each prints the ports it bound) with the local CA: a tenant name
never seen before is fetched with curl, verified against the store's
C{localca/root.pem}, and each example is stopped by PID.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from twisted.trial.unittest import TestCase

from .support.processes import require_tool, run
from .test_endpoint import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


class ExampleTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.curl = require_tool(self, "curl")
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.store = os.path.join(self.work, "store")

    def start(self, example: str, *args: str) -> ServerProcess:
        script = os.path.join(EXAMPLES, example)
        return ServerProcess.start(
            self, sys.executable,
            [script, "--https-port", "0", "--http-port", "0", "--store", self.store, "--allow-suffix", ".test",
             *args],
            cwd=self.work,
        )

    async def fetch(self, name: str, port: int) -> bytes:
        out, err, code = await run(self.curl, [
            "--silent", "--show-error", "--max-time", "60", "--resolve", f"{name}:{port}:127.0.0.1",
            "--cacert", os.path.join(self.store, "localca", "root.pem"), f"https://{name}:{port}/"])
        self.assertEqual(code, 0, err)
        return out

    async def redirect(self, name: str, http_port: int) -> str:
        out, err, code = await run(self.curl, [
            "--silent", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", f"Host: {name}",
            f"http://127.0.0.1:{http_port}/some/page"])
        self.assertEqual(code, 0, err)
        return out.decode()

    async def stop(self, server: ServerProcess) -> None:
        await server.stop()
        self.assertEqual(server.exit_code, 0, server.text[-3000:])
        self.assertNotIn("Traceback", server.text)


class WebAppTests(ExampleTestCase):
    async def test_serves_tenants(self) -> None:
        """
        The twisted.web example greets each tenant by its TLS server name,
        with a certificate from the local CA obtained at the first
        handshake, and redirects port 80 to the bound HTTPS port.
        """
        server = self.start("web_app.py")
        match = await server.wait_for(rb"web_app: HTTPS on 127\.0\.0\.1:(\d+), HTTP on 127\.0\.0\.1:(\d+)")
        https_port, http_port = int(match.group(1)), int(match.group(2))
        self.assertEqual(await self.fetch("shop.test", https_port), b"Hello, shop.test! (twisted.web, on-demand TLS)\n")
        self.assertEqual(await self.fetch("blog.other.test", https_port),
                         b"Hello, blog.other.test! (twisted.web, on-demand TLS)\n")
        self.assertTrue(os.path.exists(os.path.join(self.store, "shop.test.pem")))
        self.assertEqual(await self.redirect("shop.test", http_port), f"308 https://shop.test:{https_port}/some/page")
        await self.stop(server)

    async def test_bad_setting(self) -> None:
        """A setting the configuration refuses ends the example with one line."""
        server = self.start("web_app.py", "--ca", "ftp://nowhere")
        await server.ended()
        self.assertEqual(server.exit_code, 2)
        self.assertIn("web_app: ca: ", server.text)
        self.assertNotIn("Traceback", server.text)


class KleinAppTests(ExampleTestCase):
    def setUp(self) -> None:
        super().setUp()
        if importlib.util.find_spec("klein") is None:
            message = "klein is not installed (pip install -e '.[test]')"
            if os.environ.get("CI") == "true":
                self.fail(message)
            raise self.skipException(message)

    async def test_serves_tenants(self) -> None:
        """
        The Klein example, on a C{tenantedge:} endpoint string, greets each
        tenant by its TLS server name; on SIGTERM the endpoint's port (and
        so its service) is stopped before the reactor shuts down.
        """
        server = self.start("klein_app.py")
        match = await server.wait_for(
            rb"tenantedge endpoint: on-demand TLS on 127\.0\.0\.1:(\d+); "
            rb"HTTP-01 answers and redirects on 127\.0\.0\.1:(\d+)")
        https_port, http_port = int(match.group(1)), int(match.group(2))
        self.assertEqual(await self.fetch("shop.test", https_port), b"Hello, shop.test! (Klein, on-demand TLS)\n")
        self.assertEqual(await self.fetch("api.other.test", https_port),
                         b"Hello, api.other.test! (Klein, on-demand TLS)\n")
        self.assertEqual(await self.redirect("shop.test", http_port), f"308 https://shop.test:{https_port}/some/page")
        await self.stop(server)
        self.assertIn("tenantedge endpoint: stopped", server.text)

    async def test_bad_setting(self) -> None:
        server = self.start("klein_app.py", "--ca", "ftp://nowhere")
        await server.ended()
        self.assertEqual(server.exit_code, 2)
        self.assertIn("klein_app: tenantedge endpoint: ca=ftp://nowhere: ", server.text)
