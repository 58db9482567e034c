"""
The SaaS's view, end to end on loopback: a real edge (built by
L{build_edge}) ordering from a real Pebble, its hostname API driven with a
bearer token, and a real webhook receiver checking every delivery's
signature. A name goes C{pending -> active -> renewing -> active}, and the
receiver gets C{hostname.issued} then C{hostname.renewed}, each signed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tenantedge.options import Options
from tenantedge.tap import build_edge
from tenantedge.webhooks import SIGNATURE_HEADER, verify_signature

from .support.pebble import Pebble
from .support.processes import Backend

TOKEN = "saas-token-0123456789abcdef"
SECRET = "webhook-secret-0123456789abcdef"


def _secret_file(testcase: TestCase, content: str) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        f.write(content + "\n")
    os.chmod(path, 0o600)
    return path


class _Receiver(Resource):
    """The SaaS's webhook endpoint: keeps each delivery, answers 200."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[tuple[bytes, bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        signature = request.getHeader(SIGNATURE_HEADER.lower()) or b""
        self.deliveries.append((signature if isinstance(signature, bytes) else signature.encode(), body))
        return b"ok"


class LifecycleEndToEnd(TestCase):
    timeout = 240

    async def _setUp(self) -> None:
        self.pebble = Pebble(self)
        await self.pebble.start()
        self.backend = Backend()
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.receiver = _Receiver()
        port = reactor.listenTCP(0, Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        options = Options()
        options.parseOptions([
            "--https", f"tcp:{self.pebble.tls_port}:interface=127.0.0.1",
            "--http", f"tcp:{self.pebble.http_port}:interface=127.0.0.1",
            "--admin", "tcp:0:interface=127.0.0.1", "--admin-token-file", _secret_file(self, TOKEN),
            "--store", os.path.join(os.path.abspath(self.mktemp()), "store"),
            "--ca", self.pebble.directory_url, "--ca-root", self.pebble.ca_root,
            "--allow-suffix", ".test", "--allow-private-suffix", "--backend", self.backend.url,
            "--webhook", f"http://127.0.0.1:{port.getHost().port}/hooks",
            "--webhook-secret-file", _secret_file(self, SECRET), "--workers", "1",
        ])
        assert options.config is not None
        self.edge = build_edge(options.config, reactor)
        self.edge.startService()
        self.addCleanup(self.edge.stopService)
        ports = await self.edge.listening_ports()
        self.admin = f"http://127.0.0.1:{ports['admin'].getHost().port}"

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    async def api(self, method: bytes, path: str) -> tuple[int, Any]:
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        headers = Headers({b"authorization": [b"Bearer " + TOKEN.encode()]})
        response = await Agent(reactor).request(method, (self.admin + path).encode(), headers)
        body = await readBody(response)
        return response.code, json.loads(body)

    async def states_during(self, call: defer.Deferred[Any], name: str) -> list[str]:
        """
        The states the name's record goes through while C{call} runs, in
        order, without repeats: read at every turn of the reactor (the
        edge runs in this process), since an order against Pebble may take
        only milliseconds; the API's GET then shows where it ended.
        """
        lifecycle = self.edge.on_demand.lifecycle
        assert lifecycle is not None
        seen: list[str] = []
        while not call.called:
            record = lifecycle.get(name)
            if record is not None and (not seen or seen[-1] != record.state):
                seen.append(record.state)
            await deferLater(reactor, 0, lambda: None)
        return seen

    async def test_pending_active_renewing_active_with_webhooks(self) -> None:
        name = "lifecycle.test"
        put = defer.Deferred.fromCoroutine(self.api(b"PUT", f"/v1/hostnames/{name}"))
        during = await self.states_during(put, name)
        code, body = await put
        self.assertEqual((code, body["state"], body["issued"]), (200, "active", True), body)
        self.assertIn("pending", during)
        first = body["certificate"]
        self.assertEqual(self.pebble.orders, 1)

        renew = defer.Deferred.fromCoroutine(self.api(b"POST", f"/v1/hostnames/{name}/renew?force=true"))
        during = await self.states_during(renew, name)
        code, body = await renew
        self.assertEqual((code, body["renewed"]), (200, True), body)
        self.assertIn("renewing", during)
        code, body = await self.api(b"GET", f"/v1/hostnames/{name}")
        self.assertEqual(body["state"], "active")
        self.assertNotEqual(body["certificate"], first)
        self.assertEqual(self.pebble.orders, 2)

        # The SaaS's receiver got each event, signed with the shared secret.
        for _ in range(100):
            if len(self.receiver.deliveries) >= 2:
                break
            await deferLater(reactor, 0.1, lambda: None)
        events = []
        for signature, body_bytes in self.receiver.deliveries:
            self.assertTrue(verify_signature(SECRET.encode(), signature.decode(), body_bytes), signature)
            event = json.loads(body_bytes)
            events.append((event["type"], event["data"]["hostname"]))
            # A forged body is what a receiver rejects.
            self.assertFalse(verify_signature(SECRET.encode(), signature.decode(), body_bytes.replace(b"lifecycle",
                                                                                                      b"evilcycle")))
        self.assertEqual(events, [("hostname.issued", name), ("hostname.renewed", name)])
