"""
End to end: who may get a certificate, with the real listener, a real allow
endpoint (the test backend's /check-domain and /ask, another process) and
real TLS clients (curl, and in-process Twisted TLS clients for the flood).
"""

from __future__ import annotations

import json
import secrets

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent
from zope.interface import implementer

from tenantedge.allow import AllowChecker, Decision

from .support.processes import run
from .test_e2e import EdgeTestCase, start_edge


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    def __init__(self) -> None:
        self.done: defer.Deferred[bool] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        if not self.done.called:
            self.done.callback(True)
        self.transport.loseConnection()

    def connectionLost(self, reason: object) -> None:
        if not self.done.called:
            self.done.callback(False)


async def handshake(port: int, server_name: str) -> bool:
    """One real TLS handshake with this SNI; True if it completed."""
    proto = _Handshake()
    endpoint = wrapClientTLS(
        optionsForClientTLS(server_name), TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    )
    try:
        await endpoint.connect(Factory.forProtocol(lambda: proto))
    except Exception:
        return False
    return await proto.done


class AllowEndpointTests(EdgeTestCase):
    async def allow_checks(self) -> list[str]:
        out, err, code = await run(self.curl, ["--silent", f"{self.backend.url}/allow-checks"])
        return json.loads(out)

    async def test_checker_against_real_endpoint(self) -> None:
        """The allow checker over real HTTP: 200 allows, 404 denies, down is unknown."""
        checker = AllowChecker(f"{self.backend.url}/check-domain/{{domain}}", False, HTTPClient(Agent(reactor)), reactor)
        self.assertEqual(await checker.decide("ok-shop.acme.com"), Decision.ALLOW)
        self.assertEqual(await checker.decide("nope.acme.com"), Decision.DENY)
        down = AllowChecker("http://127.0.0.1:1/check/{domain}", False, HTTPClient(Agent(reactor)), reactor)
        self.assertEqual(await down.decide("x.acme.com"), Decision.UNKNOWN)
        ask = AllowChecker(f"{self.backend.url}/ask", True, HTTPClient(Agent(reactor)), reactor)
        self.assertEqual(await ask.decide("ok-caddy.acme.com"), Decision.ALLOW)
        self.assertEqual(await ask.decide("no-caddy.acme.com"), Decision.DENY)

    async def test_denied_name_never_reaches_issuer(self) -> None:
        """
        A name the allow endpoint denies gets an alert and never reaches the
        issuer; an allowed one gets its certificate. Allow checks log no
        connection-pool noise (C{Starting factory ...}).
        """
        from twisted.logger import formatEvent, globalLogPublisher

        messages: list[str] = []

        def observe(event: dict) -> None:
            messages.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        edge, port, _ = await start_edge(
            self, "--allow-url", f"{self.backend.url}/check-domain/{{domain}}", backend=self.backend.url,
            suffix=False,
        )
        self.root = edge.on_demand.local_ca.root_path
        out, err, code = await self.fetch("not-a-tenant.test", port=port)
        self.assertEqual(code, 35, err)
        self.assertIn(b"unrecognized name", err)
        self.assertEqual(edge.on_demand.pipeline.events["issue:issued"], 0)
        self.assertEqual(edge.on_demand.resolver.events["refused:allow-check-deny"], 1)
        out, err, code = await self.fetch("ok-tenant.test", "/echo", port=port)
        self.assertEqual(code, 0, err)
        self.assertEqual(edge.on_demand.pipeline.events["issue:issued"], 1)
        self.assertEqual(await self.allow_checks(), ["not-a-tenant.test", "ok-tenant.test"])
        self.assertEqual([m for m in messages if "Starting factory" in m and "HTTP11ClientFactory" in m], [])

    async def test_caddy_ask_endpoint(self) -> None:
        edge, port, _ = await start_edge(self, "--ask", f"{self.backend.url}/ask", backend=self.backend.url,
                                         suffix=False)
        self.root = edge.on_demand.local_ca.root_path
        out, err, code = await self.fetch("ok-caddy.test", "/echo", port=port)
        self.assertEqual(code, 0, err)
        out, err, code = await self.fetch("caddy-no.test", "/echo", port=port)
        self.assertEqual(code, 35, err)

    async def test_flood_of_random_names(self) -> None:
        """
        1,000 handshakes with random SNI names against an endpoint that
        denies them all cause zero issuance, and the server keeps answering
        an allowed name normally.
        """
        edge, port, _ = await start_edge(
            self, "--allow-url", f"{self.backend.url}/check-domain/{{domain}}", backend=self.backend.url,
            suffix=False,
        )
        self.root = edge.on_demand.local_ca.root_path
        names = [f"r{secrets.token_hex(6)}.test" for _ in range(1000)]
        limit = defer.DeferredSemaphore(50)
        results = await defer.gatherResults(
            [limit.run(lambda n=n: defer.Deferred.fromCoroutine(handshake(port, n))) for n in names]
        )
        self.assertEqual(results, [False] * 1000)
        self.assertEqual(edge.on_demand.pipeline.events["issue:issued"], 0)
        # Each was refused by the endpoint (or, if it was too slow under
        # this load, as unknown: fail closed), and asked about at most once.
        events = edge.on_demand.resolver.events
        self.assertEqual(events["refused:allow-check-deny"] + events["refused:allow-check-unknown"], 1000)
        checks = await self.allow_checks()
        self.assertEqual(len(checks), len(set(checks)))
        self.assertLessEqual(set(checks), set(names))
        self.assertGreaterEqual(events["refused:allow-check-deny"], 900)
        out, err, code = await self.fetch("ok-after-flood.test", "/echo", port=port)
        self.assertEqual(code, 0, err)
        self.assertEqual(edge.on_demand.pipeline.events["issue:issued"], 1)
