"""
End to end: L{tenantedge.webhooks.WebhookOutbox} on the real reactor with
a real treq client delivers to a twisted.web receiver on a loopback port
chosen at run time, which checks every delivery's signature with
L{verify_signature}, as a SaaS's receiver would.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from treq.client import HTTPClient

from tenantedge.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, WebhookOutbox, sign, verify_signature

SECRET = b"whsec-e2e-0123456789abcdef"


class SigningReceiver(Resource):
    """
    A receiver that does what the README tells receivers to do: refuse a
    delivery whose signature does not verify (400), else answer the next
    status of C{script} (then 200), recording what it accepted.
    """

    isLeaf = True

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script = script
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0
        self.done: Deferred[None] = Deferred()

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        header = request.getHeader(SIGNATURE_HEADER)
        if not verify_signature(SECRET, header, body):
            self.refused += 1
            request.setResponseCode(400)
            return b"bad signature"
        event = json.loads(body)
        assert request.getHeader(EVENT_ID_HEADER) == event["id"]
        code = self.script.pop(0) if self.script else 200
        self.accepted.append({"event": event, "code": code, "header": header, "body": body})
        request.setResponseCode(code)
        if code == 200 and not self.done.called:
            self.done.callback(None)
        return b"thanks"


class LoopbackReceiverTests(TestCase):
    timeout = 30

    async def listen(self, receiver: SigningReceiver) -> str:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(receiver))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/hooks/tenantedge"

    def client(self) -> HTTPClient:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        return HTTPClient(Agent(reactor, pool=pool))

    async def test_signed_retried_delivered_once(self) -> None:
        """
        The receiver answers 500 twice, then 200: the event arrives three
        times with the same id and a valid signature each time, then is
        delivered (once, as far as the outbox is concerned) and gone from
        the outbox; a forged delivery to the same receiver is refused.
        """
        receiver = SigningReceiver([500, 500])
        url = await self.listen(receiver)
        directory = os.path.join(self.mktemp(), "webhooks")
        outbox = WebhookOutbox([url], [SECRET], directory, self.client(), reactor, backoff_base=0.05, timeout=5)
        outbox.prepare()
        outbox.startService()
        self.addCleanup(outbox.stopService)
        outbox.emit({"type": "hostname.issued", "data": {"hostname": "shop.example.com"}})
        await receiver.done
        # Let the 200 be read and the event's file removed.
        for _ in range(50):
            if outbox.results["delivered"]:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual([a["code"] for a in receiver.accepted], [500, 500, 200])
        self.assertEqual(len({a["event"]["id"] for a in receiver.accepted}), 1)
        self.assertEqual(receiver.accepted[0]["event"]["data"], {"hostname": "shop.example.com"})
        self.assertEqual(receiver.refused, 0)
        self.assertEqual(dict(outbox.results), {"failed-attempt": 2, "delivered": 1})
        self.assertEqual(outbox.queued(), 0)
        self.assertEqual([n for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d))
                          for n in os.listdir(os.path.join(directory, d)) if n.endswith(".json")], [])

        # A forger without the secret, or replaying a captured body with
        # a changed payload, is refused by the same receiver.
        http = self.client()
        captured = receiver.accepted[-1]
        forged_body = captured["body"].replace(b"shop.example.com", b"evil.example.com")
        timestamp = int(reactor.seconds())
        for header, body in (
            (captured["header"], forged_body),
            (sign([b"not-the-secret-0123456"], timestamp, forged_body).encode(), forged_body),
            (b"t=%d" % timestamp, forged_body),
        ):
            response = await http.post(url, data=body, headers={SIGNATURE_HEADER: [header]})
            await response.content()
            self.assertEqual(response.code, 400)
        self.assertEqual(receiver.refused, 3)
        self.assertEqual(len(receiver.accepted), 3)
