"""
End to end, a fleet: three C{twist tenantedge} processes on three loopback
addresses (127.0.0.2, .3 and .4) sharing one real Redis and one real Pebble.

Pebble's validation authority reaches 127.0.0.1 only, where node A alone
holds the HTTP port: every order started by B or C is validated through A,
which answers from the challenges in Redis. Then: 60 concurrent first
handshakes over the three nodes make one order; a renewal on one node is
served by the others (pub/sub invalidation); Redis restarted loses nothing;
Redis stopped, cached names keep serving and new names are refused fast;
a lock holder killed with SIGKILL mid-order is taken over once its lock
expires.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tenantedge.resp import BlockingRedis, RedisUnavailable

from .support.pebble import Pebble, free_port
from .support.processes import Backend, require_tool, run
from .support.redis import RedisServer
from .test_workers import Server

NODES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2]))


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


class _Fleet(TestCase):
    """Redis, Pebble, the backend and three nodes."""

    timeout = 240

    async def _setUp(self) -> None:
        self.curl = require_tool(self, "curl")
        self.openssl = require_tool(self, "openssl")
        if not all(_can_bind(a) for a in NODES):
            self.fail("cannot bind 127.0.0.2-4 on this machine")
        self.redis = RedisServer(self, appendonly=True)
        await self.redis.start()
        self.pebble = Pebble(self, env=self.pebble_env())
        await self.pebble.start()
        self.backend = Backend()
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.root = await self.pebble.root_pem(os.path.abspath(self.mktemp()))
        self.port = self.pebble.tls_port  # every node's HTTPS port, on its own address
        self.nodes: list[Server] = []
        self.admins: list[int] = []
        for i, address in enumerate(NODES):
            http = (f"tcp:{self.pebble.http_port}:interface=127.0.0.1" if i == 0
                    else f"tcp:{free_port()}:interface={address}")
            admin = free_port()
            node = Server(self, [
                "--https", f"tcp:{self.port}:interface={address}", "--http", http,
                "--admin", f"tcp:{admin}:interface=127.0.0.1",
                "--store", self.redis.url(prefix="fleet"), "--store-lock-ttl", "3s",
                "--ca", self.pebble.directory_url, "--ca-root", self.pebble.ca_root,
                "--allow-suffix", ".test", "--allow-private-suffix", "--backend", self.backend.url,
                "--workers", self.workers(i), "--store-poll", "30s",  # coherence must come from pub/sub, not the poll
            ])
            node.start()
            self.nodes.append(node)
            self.admins.append(admin)
        for admin, node in zip(self.admins, self.nodes):
            await self.wait_for(lambda a=admin: self.connected(a), "a node connected to Redis", node)

    def pebble_env(self) -> dict[str, str]:
        return {}

    def workers(self, node: int) -> str:
        """Worker processes of each node (C{--workers})."""
        return "1"

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    async def metrics(self, admin: int) -> str:
        out, err, code = await run(self.curl, ["--silent", f"http://127.0.0.1:{admin}/metrics"])
        return out.decode() if code == 0 else ""

    async def store_connected(self, admin: int) -> list[float]:
        """The node's store-connected gauge: one value, or one per worker (a supervisor's /metrics)."""
        text = await self.metrics(admin)
        return [float(v) for v in re.findall(r"^tenantedge_store_connected(?:\{[^}]*\})? ([\d.]+)$", text, re.M)]

    async def connected(self, admin: int) -> bool:
        values = await self.store_connected(admin)
        return bool(values) and all(v == 1.0 for v in values)

    async def wait_for(self, check: object, what: str, *servers: Server, tries: int = 600) -> None:
        for _ in range(tries):
            for s in servers:
                s.alive()
            if await check():  # type: ignore[operator]
                return
            await deferLater(reactor, 0.1, lambda: None)
        printed = "".join(f"\n--- {' '.join(s.args[:2])}:\n{s.output[-3000:].decode()}" for s in servers)
        self.fail(f"timed out waiting for {what}{printed}")

    async def fetch(self, name: str, node: int, *extra: str) -> tuple[bytes, bytes, int]:
        return await run(
            self.curl,
            ["--silent", "--show-error", "--max-time", "60", "--resolve", f"{name}:{self.port}:{NODES[node]}",
             "--cacert", self.root, *extra, f"https://{name}:{self.port}/echo"],
        )

    async def served_serial(self, name: str, node: int) -> int:
        out, err, code = await run(
            self.openssl, ["s_client", "-connect", f"{NODES[node]}:{self.port}", "-servername", name, "-showcerts"],
            stdin=b"", timeout=30)
        pem = out[out.index(b"-----BEGIN CERTIFICATE-----"):]
        pem = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
        return x509.load_pem_x509_certificate(pem).serial_number

    def redis_client(self) -> BlockingRedis:
        return self.redis.client()

    async def not_connected(self, admin: int) -> bool:
        values = await self.store_connected(admin)
        return bool(values) and all(v == 0.0 for v in values)

    def account_slug(self) -> str:
        from tenantedge.accounts import account_directory

        return os.path.basename(account_directory("", self.pebble.directory_url))


class FleetTests(_Fleet):
    def workers(self, node: int) -> str:
        # C runs two workers on the Redis store: each has its own Redis
        # connections, and the supervisor's /metrics merges them.
        return "2" if node == 2 else "1"

    async def test_fleet(self) -> None:
        # Ordered by B, validated through A (Pebble reaches only A's port 80).
        out, err, code = await self.fetch("first.test", 1)
        self.assertEqual(code, 0, err + self.nodes[1].output[-3000:])
        self.assertEqual(json.loads(out)["path"], "/echo")
        self.assertEqual(self.pebble.orders, 1)
        self.assertEqual(self.pebble.new_accounts, 1)  # one account for the fleet
        with self.redis_client() as r:
            self.assertEqual(r.execute("SMEMBERS", "fleet:names"), [b"first.test"])
            self.assertEqual(r.execute("KEYS", "fleet:lock:*"), [])  # released
        # Served by the other two from the shared store, no new order.
        for node in (0, 2):
            out, err, code = await self.fetch("first.test", node)
            self.assertEqual(code, 0, err)
        self.assertEqual(self.pebble.orders, 1)

        # 60 concurrent first handshakes for one new name, over three nodes: one order.
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch("burst.test", i % 3)) for i in range(60)]
        )
        self.assertEqual([code for _, _, code in results], [0] * 60, [err for _, err, _ in results][:3])
        self.assertEqual(self.pebble.orders, 2)

        # A renewal on C is served by A and B within seconds (invalidation by
        # pub/sub; --store-poll is 30s here).
        before = {await self.served_serial("first.test", node) for node in range(3)}
        self.assertEqual(len(before), 1)
        out, err, code = await run(self.curl, [
            "--silent", "--show-error", "-X", "POST", "-H", "X-Tenantedge-Admin: 1",
            f"http://127.0.0.1:{self.admins[2]}/certs/first.test/renew"])
        self.assertEqual(code, 0, err)
        self.assertIn(b'"renewed": true', out)
        started = time.monotonic()

        async def everyone_serves_the_new_one() -> bool:
            serials = {await self.served_serial("first.test", node) for node in range(3)}
            return len(serials) == 1 and not serials & before

        await self.wait_for(everyone_serves_the_new_one, "every node to serve the renewed certificate",
                            *self.nodes, tries=50)
        self.assertLess(time.monotonic() - started, 10)

        # Redis restarted (SIGTERM, AOF fsync always): nothing acknowledged is lost.
        with self.redis_client() as r:
            stored = {n: r.execute("HGET", f"fleet:cert:{n.decode()}", "pem") for n in r.execute("SMEMBERS",
                                                                                               "fleet:names")}
            account = _pairs(r.execute("HGETALL", "fleet:account:" + self.account_slug()))
        await self.redis.restart()
        with self.redis_client() as r:
            self.assertEqual(
                {n: r.execute("HGET", f"fleet:cert:{n.decode()}", "pem") for n in r.execute("SMEMBERS",
                                                                                          "fleet:names")},
                stored)
            self.assertEqual(_pairs(r.execute("HGETALL", "fleet:account:" + self.account_slug())), account)
            self.assertIn(b"key", account)
        for admin, node in zip(self.admins, self.nodes):
            await self.wait_for(lambda a=admin: self.connected(a), "a node reconnected to Redis", node)
        out, err, code = await self.fetch("after-restart.test", 0)
        self.assertEqual(code, 0, err)

        # Redis stopped: cached names keep serving on every node; a new name
        # is refused fast; the metric and one log line say why.
        lines = self.nodes[1].output.count(b"lost the connection to Redis")  # one per outage so far
        await self.redis.stop()
        for admin in self.admins:
            await self.wait_for(lambda a=admin: self.not_connected(a), "a node to notice Redis is gone")
        for node in range(3):
            for name in ("first.test", "burst.test"):
                out, err, code = await self.fetch(name, node)
                self.assertEqual(code, 0, (name, node, err))
        started = time.monotonic()
        out, err, code = await self.fetch("new-while-down.test", 1)
        self.assertNotEqual(code, 0)
        self.assertLess(time.monotonic() - started, 5)
        await self.fetch("new-while-down-2.test", 1)
        # One line for the outage, not one per refused handshake.
        self.assertEqual(self.nodes[1].output.count(b"lost the connection to Redis"), lines + 1)
        self.assertRegex(await self.metrics(self.admins[1]), r"tenantedge_store_unavailable_total [1-9]")
        # And back: the node reconnects by itself and issues again.
        await self.redis.start()
        for admin, node in zip(self.admins, self.nodes):
            await self.wait_for(lambda a=admin: self.connected(a), "a node reconnected to Redis", node)
        out, err, code = await self.fetch("new-while-down.test", 1)
        self.assertEqual(code, 0, err)


class LockHolderKilledTests(_Fleet):
    """The lock holder dies (SIGKILL) mid-order; another node finishes once the lock expires."""

    def pebble_env(self) -> dict[str, str]:
        # Pebble's validation waits a while: a window in which B holds the lock.
        return {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "4"}

    async def test_holder_killed(self) -> None:
        first = defer.Deferred.fromCoroutine(self.fetch("orphan.test", 1))
        with self.redis_client() as r:
            for _ in range(1000):
                if r.execute("GET", "fleet:lock:orphan.test") is not None:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            else:
                self.fail("B never took the lock")
            self.assertIsNone(r.execute("HGET", "fleet:cert:orphan.test", "pem"))  # mid-order
            os.kill(self.nodes[1].pid(), signal.SIGKILL)
            self.assertGreater(r.execute("PTTL", "fleet:lock:orphan.test"), 0)  # left behind, expiring
        out, err, code = await first
        self.assertNotEqual(code, 0)  # B died under its client
        started = time.monotonic()
        out, err, code = await self.fetch("orphan.test", 2)
        self.assertEqual(code, 0, err + self.nodes[2].output[-3000:])
        self.assertGreater(time.monotonic() - started, 0.5)  # it waited for the expiry
        await self.nodes[1].ended  # reaped (stop() is then a no-op)
