"""
Unit tests for the proxy's header rules and its resource, driven through
treq's in-memory client (no sockets); the real-socket behaviour is in
C{test_e2e}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from tenantedge.proxy import ProxyResource, downstream_headers, upstream_headers


class UpstreamHeaderTests(SynchronousTestCase):
    def headers(self, **raw: list[bytes]) -> Headers:
        h = Headers()
        for name, values in raw.items():
            h.setRawHeaders(name.replace("_", "-").encode(), values)
        return h

    def test_host_kept_and_forwarded_set(self) -> None:
        out = upstream_headers(self.headers(host=[b"shop.acme.test"]), b"shop.acme.test", "192.0.2.7")
        self.assertEqual(out.getRawHeaders(b"host"), [b"shop.acme.test"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"192.0.2.7"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"shop.acme.test"])

    def test_client_forwarding_headers_replaced(self) -> None:
        """
        Whatever a client claims in X-Forwarded-* or Forwarded is dropped,
        never appended to.
        """
        out = upstream_headers(
            self.headers(
                x_forwarded_for=[b"1.2.3.4"],
                x_forwarded_proto=[b"http"],
                x_forwarded_host=[b"evil.test"],
                x_forwarded_port=[b"1"],
                forwarded=[b"for=1.2.3.4"],
                x_real_ip=[b"1.2.3.4"],
            ),
            b"a.test",
            "192.0.2.7",
        )
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"192.0.2.7"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"a.test"])
        for name in (b"x-forwarded-port", b"forwarded", b"x-real-ip"):
            self.assertFalse(out.hasHeader(name), name)

    def test_middleware_subrequest_stripped(self) -> None:
        """CVE-2025-29927: a client must not reach Next.js with x-middleware-subrequest."""
        out = upstream_headers(
            self.headers(x_middleware_subrequest=[b"middleware:middleware:middleware"]), b"a.test", "192.0.2.7"
        )
        self.assertFalse(out.hasHeader(b"x-middleware-subrequest"))

    def test_underscore_variants_dropped(self) -> None:
        """X_Forwarded_For and X-Forwarded_Host (folded into the dashed name by some frameworks) never pass."""
        from twisted.web.http_headers import Headers

        headers = Headers()
        for name in (b"X_Forwarded_For", b"X-Forwarded_Host", b"X_Real_IP", b"x_middleware_subrequest"):
            headers.addRawHeader(name, b"evil")
        headers.addRawHeader(b"X_Custom", b"kept")
        out = upstream_headers(headers, b"a.test", "192.0.2.7")
        values = [v for _, vs in out.getAllRawHeaders() for v in vs]
        self.assertNotIn(b"evil", values)
        self.assertEqual(out.getRawHeaders(b"X_Custom"), [b"kept"])

    def test_canonical_host(self) -> None:
        from tenantedge.hostnames import canonical_host_header, host_from_header

        def canonical(value: bytes) -> bytes:
            return canonical_host_header(host_from_header(value), value)

        self.assertEqual(canonical(b"SHOP.TEST.:443"), b"shop.test")
        self.assertEqual(canonical(b"Shop.Test:8443"), b"shop.test:8443")
        self.assertEqual(canonical(b"shop.test"), b"shop.test")

    def test_hop_by_hop_dropped(self) -> None:
        out = upstream_headers(
            self.headers(
                connection=[b"keep-alive, X-Secret-Hop"],
                keep_alive=[b"timeout=5"],
                x_secret_hop=[b"1"],
                te=[b"trailers"],
                upgrade=[b"websocket"],
                proxy_authorization=[b"Basic x"],
                transfer_encoding=[b"chunked"],
                cookie=[b"a=1"],
                authorization=[b"Bearer t"],
            ),
            b"a.test",
            "192.0.2.7",
        )
        for name in (b"connection", b"keep-alive", b"x-secret-hop", b"te", b"upgrade",
                     b"proxy-authorization", b"transfer-encoding"):
            self.assertFalse(out.hasHeader(name), name)
        self.assertEqual(out.getRawHeaders(b"cookie"), [b"a=1"])
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Bearer t"])


class DownstreamHeaderTests(SynchronousTestCase):
    def test_set_cookies_and_hop_by_hop(self) -> None:
        backend = Headers()
        backend.setRawHeaders(b"set-cookie", [b"a=1; Path=/", b"b=2; HttpOnly"])
        backend.setRawHeaders(b"connection", [b"close, x-internal"])
        backend.setRawHeaders(b"x-internal", [b"1"])
        backend.setRawHeaders(b"transfer-encoding", [b"chunked"])
        backend.setRawHeaders(b"content-length", [b"12"])
        out = downstream_headers(backend)
        self.assertEqual(out.getRawHeaders(b"set-cookie"), [b"a=1; Path=/", b"b=2; HttpOnly"])
        self.assertEqual(out.getRawHeaders(b"content-length"), [b"12"])
        for name in (b"connection", b"x-internal", b"transfer-encoding"):
            self.assertFalse(out.hasHeader(name), name)


class _RecordingAgent:
    """An IAgent that records requests and leaves them pending."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers, object, Deferred]] = []
        self.cancelled: list[bytes] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        # Like the real Agent, a cancelled request fails with its own
        # wrapper, not a bare CancelledError.
        def cancel(d: Deferred) -> None:
            self.cancelled.append(uri)
            d.errback(ResponseNeverReceived([Failure(CancelledError())]))

        d: Deferred = Deferred(cancel)
        self.requests.append((method, uri, headers, bodyProducer, d))
        return d


class ProxyResourceTests(SynchronousTestCase):
    """
    The resource's decisions before any byte goes upstream, with the
    Host/SNI check turned off where no TLS connection exists.
    """

    def setUp(self) -> None:
        from treq.testing import RequestTraversalAgent

        self.clock = MemoryReactorClock()
        self.agent = _RecordingAgent()
        self.resource = ProxyResource(b"http://127.0.0.1:3000/", self.agent, self.clock, timeout=5)
        self.client = RequestTraversalAgent(self.resource)

    def get(self, url: bytes, headers: Headers | None = None):
        return self.client.request(b"GET", url, headers)

    def test_sni_mismatch_is_421(self) -> None:
        """Without a TLS connection chosen for the Host, the answer is 421."""
        response = self.successResultOf(self.get(b"https://a.test/"))
        self.assertEqual(response.code, 421)
        self.assertEqual(self.agent.requests, [])

    def test_invalid_host_is_400(self) -> None:
        h = Headers({b"host": [b"../etc"]})
        response = self.successResultOf(self.get(b"https://a.test/", h))
        self.assertEqual(response.code, 400)

    def test_forwards_path_and_query(self) -> None:
        self.resource.require_sni_match = False
        self.assertNoResult(self.get(b"https://a.test/x/y?z=1&w=%20"))
        method, uri, headers, body, _ = self.agent.requests[0]
        self.assertEqual((method, uri), (b"GET", b"http://127.0.0.1:3000/x/y?z=1&w=%20"))
        self.assertEqual(headers.getRawHeaders(b"host"), [b"a.test"])
        self.assertIsNone(body)

    def test_timeout_is_504(self) -> None:
        self.resource.require_sni_match = False
        d = self.get(b"https://a.test/slow")
        self.clock.advance(5.1)
        self.client.flush()
        self.assertEqual(self.successResultOf(d).code, 504)

    def test_client_gone_cancels_backend_request(self) -> None:
        """A client that leaves before the backend answers cancels the backend request."""
        self.resource.require_sni_match = False
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"host", [b"a.test"])
        request.uri = b"/"
        request.content = None
        self.resource.render(request)
        self.assertEqual(self.agent.cancelled, [])
        request.processingFailed(Failure(ConnectionError("client gone")))
        self.assertEqual(self.agent.cancelled, [b"http://127.0.0.1:3000/"])
        self.assertEqual(request.written, [])

    def test_relay_back_pressure(self) -> None:
        """
        The body relay registers the backend transport as a streaming
        producer on the client request (so a slow client pauses the
        backend socket), and stops it when the client leaves.
        """
        from twisted.internet.testing import StringTransport

        from tenantedge.proxy import _BodyRelay

        class ClientRequest:
            producer = streaming = None
            written: list[bytes] = []

            def registerProducer(self, producer, streaming):
                self.producer, self.streaming = producer, streaming

            def unregisterProducer(self):
                self.producer = None

            def write(self, data):
                self.written.append(data)

        request = ClientRequest()
        relay = _BodyRelay(request, Deferred())  # type: ignore[arg-type]
        backend = StringTransport()
        relay.makeConnection(backend)
        self.assertIs(request.producer, backend)
        self.assertTrue(request.streaming)
        relay.dataReceived(b"chunk")
        self.assertEqual(request.written, [b"chunk"])
        relay.stop()
        self.assertEqual(backend.producerState, "stopped")
        relay.dataReceived(b"late")
        self.assertEqual(request.written, [b"chunk"])

    def test_backend_error_is_502(self) -> None:
        self.resource.require_sni_match = False
        d = self.get(b"https://a.test/")
        self.agent.requests[0][4].errback(ConnectionRefusedError())
        self.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 502)
        self.flushLoggedErrors()


class BalancedProxyResourceTests(SynchronousTestCase):
    """ProxyResource over several backends (L{Backends}): chosen, counted, failed over on connect errors."""

    def setUp(self) -> None:
        from treq.testing import RequestTraversalAgent

        from tenantedge.backend import BackendPool, Backends

        self.clock = MemoryReactorClock()
        self.agent = _RecordingAgent()
        self.pools = [BackendPool(self.clock, lambda: None, name=f"b{i}") for i in range(2)]
        self.backends = Backends(self.clock, self.pools)
        self.resource = ProxyResource(b"/base", self.agent, self.clock, timeout=5, require_sni_match=False,
                                      backends=self.backends)
        self.client = RequestTraversalAgent(self.resource)

    def test_balanced_and_counted(self) -> None:

        first = self.client.request(b"GET", b"https://a.test/x")
        second = self.client.request(b"GET", b"https://a.test/y")
        self.assertEqual([r[1] for r in self.agent.requests],
                         [b"http://backend-0/base/x", b"http://backend-1/base/y"])
        self.assertEqual([p.outstanding for p in self.pools], [1, 1])
        self.agent.requests[0][4].errback(Failure(ResponseNeverReceived([Failure(ConnectionResetError())])))
        self.client.flush()
        self.assertEqual(self.successResultOf(first).code, 502)
        self.assertEqual([(p.outstanding, p.failures) for p in self.pools], [(0, 1), (1, 0)])
        self.assertNoResult(second)
        self.flushLoggedErrors()

    def test_connect_refused_fails_over(self) -> None:
        from twisted.internet.error import ConnectionRefusedError

        d = self.client.request(b"POST", b"https://a.test/form", bodyProducer=None)
        self.agent.requests[0][4].errback(Failure(ConnectionRefusedError()))
        self.assertEqual([r[1] for r in self.agent.requests], [b"http://backend-0/base/form", b"http://backend-1/base/form"])
        self.assertFalse(self.pools[0].up)
        self.assertEqual([p.outstanding for p in self.pools], [0, 1])
        self.agent.requests[1][4].errback(Failure(ConnectionRefusedError()))
        self.client.flush()
        self.assertEqual(self.successResultOf(d).code, 502)
        self.assertEqual([p.outstanding for p in self.pools], [0, 0])
        self.assertEqual(self.backends.healthy(), 0)
        self.flushLoggedErrors()

    def test_metrics(self) -> None:
        """Per-backend counters, read at scrape time under the backend's label."""
        from prometheus_client import CollectorRegistry, generate_latest

        from tenantedge.metrics import BackendCollector

        registry = CollectorRegistry()
        registry.register(BackendCollector(self.pools))
        self.client.request(b"GET", b"https://a.test/x")
        text = generate_latest(registry).decode()
        self.assertIn('tenantedge_backend_requests_total{backend="b0"} 1.0', text)
        self.assertIn('tenantedge_backend_requests_total{backend="b1"} 0.0', text)
        self.assertIn('tenantedge_backend_up{backend="b1"} 1.0', text)
        self.assertIn('tenantedge_backend_outstanding_requests{backend="b0"} 1.0', text)
        self.assertIn('tenantedge_backend_failures_total{backend="b0"} 0.0', text)
