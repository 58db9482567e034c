"""
End to end with several processes against a real ACME server (Pebble):
C{twist tenantedge --workers 2} as a real subprocess (real forks), and two
servers on one store. One order per name across processes, an HTTP-01
answer given by a process other than the one that ordered, TLS sessions
resumed by whichever worker a connection reaches, a renewal seen by every
worker, a dead worker restarted, and everything stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from .support.pebble import Pebble, free_port
from .support.processes import Backend, require_tool, run

TWIST = os.path.join(os.path.dirname(sys.executable), "twist")
PYTHON = sys.executable


class Server:
    """One C{twist tenantedge} process (a supervisor and its workers, or a single process)."""

    def __init__(self, testcase: TestCase, args: list[str]) -> None:
        self.testcase = testcase
        self.args = args
        self.output = b""
        self.ended: defer.Deferred[tuple[bytes, bytes, int]] | None = None

    def start(self) -> None:
        def collect(data: bytes) -> None:
            self.output = data

        self.ended = run(TWIST, ["--log-format=text", "tenantedge", *self.args], on_stdout=collect, timeout=200)
        self.testcase.addCleanup(self.stop)

    def alive(self) -> bool:
        """Still running; if it ended, the test fails with what it printed."""
        if self.ended is not None and self.ended.called:
            self.testcase.fail(f"tenantedge {' '.join(self.args)} ended early:\n{self.output[-3000:].decode()}")
        return True

    def pid(self) -> int:
        # Its HTTPS endpoint is unique to it (servers may share a store).
        marker = self.args[self.args.index("--https") + 1].encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker in f.read():
                            pids.append(int(entry))
                except OSError:
                    continue
        return min(pids)  # the supervisor started first

    async def stop(self) -> None:
        if self.ended is None or self.ended.called:
            return
        try:
            os.kill(self.pid(), signal.SIGTERM)
        except (ValueError, ProcessLookupError):
            pass
        await self.ended


class WorkerTests(TestCase):
    timeout = 240

    async def _setUp(self) -> None:
        self.curl = require_tool(self, "curl")
        self.openssl = require_tool(self, "openssl")
        self.pebble = Pebble(self)
        await self.pebble.start()
        self.backend = Backend()
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.store = os.path.join(os.path.abspath(self.mktemp()), "store")
        self.root = await self.pebble.root_pem(os.path.abspath(self.mktemp()))

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    def server_args(self, https: int, http: int | str, admin: int | str, *extra: str) -> list[str]:
        return [
            "--https", f"tcp:{https}:interface=127.0.0.1",
            "--http", f"tcp:{http}:interface=127.0.0.1" if isinstance(http, int) else http,
            "--admin", f"tcp:{admin}:interface=127.0.0.1" if isinstance(admin, int) else admin,
            "--store", self.store, "--ca", self.pebble.directory_url, "--ca-root", self.pebble.ca_root,
            "--allow-suffix", ".test", "--allow-private-suffix", "--backend", self.backend.url,
            "--store-poll", "1s", *extra,
        ]

    async def metrics(self, admin: int) -> str:
        out, err, code = await run(self.curl, ["--silent", f"http://127.0.0.1:{admin}/metrics"])
        return out.decode() if code == 0 else ""

    async def wait_for(self, check: object, what: str, *servers: Server) -> None:
        for _ in range(600):
            if await check():  # type: ignore[operator]
                return
            await deferLater(reactor, 0.1, lambda: None)
        printed = "".join(f"\n--- {' '.join(s.args)}:\n{s.output[-2000:].decode()}" for s in servers)
        self.fail(f"timed out waiting for {what}{printed}")

    async def fetch(self, name: str, port: int, *extra: str) -> tuple[bytes, bytes, int]:
        return await run(
            self.curl,
            ["--silent", "--show-error", "--max-time", "120", "--resolve", f"{name}:{port}:127.0.0.1",
             "--cacert", self.root, *extra, f"https://{name}:{port}/echo"],
        )

    async def start_workers(self, *extra: str) -> int:
        admin = free_port()
        server = Server(self, self.server_args(self.pebble.tls_port, self.pebble.http_port, admin, "--workers", "2",
                                               *extra))
        server.start()
        self.server = server

        async def both_up() -> bool:
            text = await self.metrics(admin)
            return server.alive() and 'worker="0"' in text and 'worker="1"' in text

        await self.wait_for(both_up, "two workers", server)
        return admin

    async def test_two_workers(self) -> None:
        admin = await self.start_workers()
        port = self.pebble.tls_port
        out, err, code = await self.fetch("first.test", port)
        self.assertEqual(code, 0, err)
        # The workers' log lines come out of the supervisor, marked.
        for slot in (b"0", b"1"):
            self.assertIn(b"[worker-" + slot + b"]", self.server.output)
        # The supervisor's banner names every listener and what it is for.
        banner = self.server.output.decode()
        self.assertIn("tenantedge: 2 worker processes", banner)
        self.assertIn(f"listening: admin on 127.0.0.1:{admin} (metrics", banner)
        self.assertIn("listening: https on 127.0.0.1:", banner)
        self.assertIn("(tenant traffic)", banner)
        self.assertIn("listening: http on 127.0.0.1:", banner)
        self.assertEqual(json.loads(out)["path"], "/echo")
        # A burst of 50 first handshakes for one new name, spread over both
        # workers: one order.
        orders = self.pebble.orders
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch("burst.test", port)) for _ in range(50)]
        )
        self.assertEqual([code for _, _, code in results], [0] * 50, results[0][1])
        self.assertEqual(self.pebble.orders - orders, 1)
        # Sessions resume whichever worker the next connection reaches.
        session = os.path.join(os.path.abspath(self.mktemp()))
        await run(self.openssl, ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "first.test",
                                 "-CAfile", self.root, "-ign_eof", "-sess_out", session],
                  stdin=b"GET /echo HTTP/1.0\r\nHost: first.test\r\n\r\n", timeout=30)
        reused = 0
        for _ in range(20):
            out, err, code = await run(
                self.openssl, ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "first.test",
                               "-CAfile", self.root, "-ign_eof", "-sess_in", session],
                stdin=b"GET /echo HTTP/1.0\r\nHost: first.test\r\n\r\n", timeout=30)
            reused += b"Reused, TLSv1.3" in out
        self.assertEqual(reused, 20)
        text = await self.metrics(admin)
        resumed = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'tenantedge_handshakes_total\{worker="(\d)",outcome="resumed"\} ([\d.]+)', text)}
        self.assertEqual(sorted(resumed), ["0", "1"], text)  # both workers resumed sessions
        self.assertEqual(sum(resumed.values()), 20)

        # A renewal on one worker (through the supervisor's admin endpoint)
        # is served by both.
        before = await self.served_serial("first.test", port)
        out, err, code = await run(PYTHON, ["-m", "tenantedge", "certs", "renew", "first.test", "--store", self.store,
                                            "--admin", f"tcp:{admin}:interface=127.0.0.1"])
        self.assertEqual(code, 0, err)

        async def everyone_serves_the_new_one() -> bool:
            serials = {await self.served_serial("first.test", port) for _ in range(10)}
            return len(serials) == 1 and before not in serials

        await self.wait_for(everyone_serves_the_new_one, "both workers to serve the renewed certificate", self.server)

        # A worker that dies is restarted; the server keeps serving.
        text = await self.metrics(admin)
        self.assertIn("tenantedge_workers 2", text)
        worker = max(p for p in self.worker_pids())
        os.kill(worker, signal.SIGKILL)

        async def restarted() -> bool:
            return "tenantedge_worker_restarts_total 1" in await self.metrics(admin) and len(self.worker_pids()) == 2

        await self.wait_for(restarted, "the dead worker to be restarted", self.server)
        out, err, code = await self.fetch("first.test", port)
        self.assertEqual(code, 0, err)
        # SIGTERM on the supervisor stops everything.
        await self.server.stop()
        self.assertEqual(self.worker_pids(), [])

    async def resumed(self, name: str, port: int, session: str) -> bool:
        out, err, code = await run(
            self.openssl, ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", name, "-CAfile", self.root,
                           "-ign_eof", "-sess_in", session],
            stdin=f"GET /echo HTTP/1.0\r\nHost: {name}\r\n\r\n".encode(), timeout=30)
        self.assertIn(b"HTTP/1.1 200", out)
        return b"Reused, TLSv1.3" in out

    async def new_session(self, name: str, port: int) -> str:
        session = os.path.join(os.path.abspath(self.mktemp()))
        await run(self.openssl, ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", name,
                                 "-CAfile", self.root, "-ign_eof", "-sess_out", session],
                  stdin=f"GET /echo HTTP/1.0\r\nHost: {name}\r\n\r\n".encode(), timeout=30)
        return session

    async def test_ticket_key_rotation(self) -> None:
        """
        On schedule the supervisor makes new ticket keys and replaces each
        worker in turn (the old one finishes first): sessions from before no
        longer resume, new ones resume on either worker, and nothing fails.
        """
        admin = await self.start_workers("--ticket-key-lifetime", "8s")
        port = self.pebble.tls_port
        out, err, code = await self.fetch("rotate.test", port)
        self.assertEqual(code, 0, err)
        before = await self.new_session("rotate.test", port)
        self.assertTrue(await self.resumed("rotate.test", port, before))
        pids = self.worker_pids()

        async def rotated() -> bool:
            text = await self.metrics(admin)
            return ("tenantedge_ticket_key_rotations_total 1" in text and 'tenantedge_worker_up{worker="1"} 1' in text
                    and not set(self.worker_pids()) & set(pids))

        await self.wait_for(rotated, "the workers to be replaced with new keys", self.server)
        self.assertFalse(await self.resumed("rotate.test", port, before))
        after = await self.new_session("rotate.test", port)
        results = [await self.resumed("rotate.test", port, after) for _ in range(10)]
        self.assertEqual(results, [True] * 10)

    async def test_hostname_api_through_the_supervisor(self) -> None:
        """
        With --workers 2 and Pebble, the hostname API through the
        supervisor: PUT pre-issues a name (active, one order), an unforced
        renew spends no order, a forced one renews (active again, a new
        serial); a missing token and a rebinding Host are refused; the CLI
        uses the API with the token. (The pending and renewing states in
        between are pinned by tests.test_lifecycle with a Clock.)
        """
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("worker-token-0123456789\n")
        os.chmod(token, 0o600)
        admin = await self.start_workers("--admin-token-file", token)
        auth = ["-H", "Authorization: Bearer worker-token-0123456789"]

        async def api(method: str, path: str, *extra: str) -> tuple[int, dict]:
            out, err, code = await run(self.curl, ["--silent", "--max-time", "120", "-X", method, "-w", "\n%{http_code}",
                                                   *extra, f"http://127.0.0.1:{admin}{path}"])
            body, _, status = out.decode().rpartition("\n")
            return int(status), json.loads(body) if body.strip() else {}

        self.assertEqual((await api("GET", "/v1/hostnames"))[0], 401)
        self.assertEqual((await api("GET", "/v1/hostnames", *auth, "-H", "Host: evil.example"))[0], 421)
        self.assertEqual((await api("GET", "/metrics", "-H", "Host: evil.example"))[0], 421)
        orders = self.pebble.orders
        code, body = await api("PUT", "/v1/hostnames/api.test", *auth)
        self.assertEqual((code, body["state"], body["issued"]), (200, "active", True), body)
        self.assertEqual(self.pebble.orders - orders, 1)
        first = body["certificate"]["serial"]
        code, body = await api("POST", "/v1/hostnames/api.test/renew", *auth)
        self.assertEqual((code, body["renewed"], body.get("reason")), (200, False, "not-due"), body)
        self.assertEqual(self.pebble.orders - orders, 1)
        code, body = await api("POST", "/v1/hostnames/api.test/renew?force=true", *auth)
        self.assertEqual((code, body["renewed"], body["state"]), (200, True, "active"), body)
        self.assertNotEqual(body["certificate"]["serial"], first)
        code, body = await api("GET", "/v1/hostnames?state=active", *auth)
        self.assertEqual([i["name"] for i in body["items"]], ["api.test"])
        log = self.server.output.decode()
        self.assertIn("renewed api.test", log)
        text = await self.metrics(admin)
        self.assertIn('tenantedge_hostnames{worker="0",state="active"} 1.0', text)
        # The CLI uses the API with the token.
        out, err, code = await run(PYTHON, ["-m", "tenantedge", "certs", "renew", "api.test", "--store", self.store,
                                            "--admin", f"tcp:{admin}:interface=127.0.0.1",
                                            "--admin-token-file", token])
        self.assertEqual(code, 0, err)
        await self.server.stop()

    def worker_pids(self) -> list[int]:
        marker = self.store.encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read()
                    with open(f"/proc/{entry}/stat") as f:
                        state = f.read().split()[2]
                except OSError:
                    continue
                if marker in cmdline and state != "Z":
                    pids.append(int(entry))
        return sorted(pids)[1:]  # the first is the supervisor

    async def served_serial(self, name: str, port: int) -> int:
        out, err, code = await run(
            self.openssl, ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", name, "-showcerts"],
            stdin=b"", timeout=30)
        pem = out[out.index(b"-----BEGIN CERTIFICATE-----"):]
        pem = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
        return x509.load_pem_x509_certificate(pem).serial_number

    async def test_challenge_answered_by_another_process(self) -> None:
        """
        Two servers on one store: the one on Pebble's TLS port orders, the
        other one holds Pebble's HTTP port. The order is validated through
        the second, which answers from the shared challenge store (the
        first has no listener the CA could reach on port 80).
        """
        ordering = Server(self, self.server_args(self.pebble.tls_port, free_port(), "none", "--workers", "1"))
        answering = Server(self, self.server_args(free_port(), self.pebble.http_port, "none", "--workers", "1"))
        ordering.start()
        answering.start()

        async def up() -> bool:
            return (ordering.alive() and answering.alive()
                    and b"listening: https" in ordering.output and b"listening: http " in answering.output)

        await self.wait_for(up, "both servers", ordering, answering)
        out, err, code = await self.fetch("shared.test", self.pebble.tls_port)
        self.assertEqual(code, 0, err + ordering.output[-3000:])
        self.assertEqual(json.loads(out)["path"], "/echo")
        self.assertEqual(self.pebble.orders, 1)
