"""
Tests for L{tenantedge.http1}, the fast HTTP/1.1 relay, driven byte by
byte: the client on a C{StringTransport}, the backend connections on
C{StringTransport}s made by a controllable endpoint. Every proxy rule
of the twisted.web path holds here too; end-to-end tests over TLS with
real curl and a real backend are in C{tests/test_e2e.py}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.backend import BackendPool, Backends
from tenantedge.http1 import H1Proxy, H1ProxyProtocol


class FakeEndpoint:
    """Connections the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda d: None)
        self.attempts.append((factory, d))
        return d

    def complete(self, index: int = -1) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[index]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.endpoint = FakeEndpoint()
        self.pool = BackendPool(self.clock, lambda: self.endpoint)
        self.observed: list[tuple[int, float]] = []
        self.proxy = H1Proxy(self.pool, self.clock, timeout=30, max_body_size=1000,
                             observe=lambda code, s: self.observed.append((code, s)))
        self.client, self.wire = self.connect()

    def connect(self) -> tuple[H1ProxyProtocol, StringTransport]:
        proto = H1ProxyProtocol(self.proxy, "shop.test")
        wire = StringTransport(peerAddress=_Peer("203.0.113.9"))
        proto.makeConnection(wire)
        return proto, wire

    def backend_request(self, transport: StringTransport) -> bytes:
        data = transport.value()
        transport.clear()
        return data

    def test_get_relayed_with_edge_headers(self) -> None:
        """
        Host kept, X-Forwarded-* set afresh (client copies dropped),
        hop-by-hop and edge-only headers dropped, the response relayed.
        """
        self.client.dataReceived(
            b"GET /a?b=1 HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil\r\n"
            b"X-Middleware-Subrequest: mw\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nAccept: */*\r\n\r\n"
        )
        backend, bwire = self.endpoint.complete()
        sent = self.backend_request(bwire)
        self.assertTrue(sent.startswith(b"GET /a?b=1 HTTP/1.1\r\n"))
        self.assertIn(b"Host: shop.test\r\n", sent)
        self.assertIn(b"X-Forwarded-For: 203.0.113.9\r\n", sent)
        self.assertIn(b"X-Forwarded-Proto: https\r\n", sent)
        self.assertIn(b"Accept: */*\r\n", sent)
        for bad in (b"6.6.6.6", b"evil", b"Middleware", b"X-Hop", b"Connection"):
            self.assertNotIn(bad, sent)
        self.clock.advance(0.5)
        backend.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Internal\r\nX-Internal: s\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello"
        )
        out = self.wire.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Length: 5\r\n", out)
        self.assertEqual(out.count(b"Set-Cookie"), 2)
        self.assertNotIn(b"X-Internal", out)
        self.assertTrue(out.endswith(b"\r\n\r\nhello"))
        self.assertEqual(self.observed, [(200, 0.5)])
        self.assertEqual(self.pool.idle_count(), 1)  # back in the pool
        self.assertFalse(self.wire.disconnecting)

    def test_connection_reused(self) -> None:
        for _ in range(3):
            self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            if not self.endpoint.attempts or len(self.endpoint.attempts) == 1 and self.pool.idle_count() == 0:
                pass
            if len(self.endpoint.attempts) == 1 and not hasattr(self, "backend"):
                self.backend, self.bwire = self.endpoint.complete()
            self.backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(self.wire.value().count(b"HTTP/1.1 204"), 3)

    def test_misdirected(self) -> None:
        """A Host other than the TLS name is 421 and never reaches the backend."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 421 "))
        self.assertEqual(self.endpoint.attempts, [])

    def test_two_hosts_and_no_host(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\nHost: shop.test\r\n\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 400 "))
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.endpoint.attempts, [])

    def test_header_limits(self) -> None:
        """A head over the size or count limit is 431, and the connection closes."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(self.wire.disconnecting)
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n" + b"X-N: 1\r\n" * 150 + b"\r\n")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 431 "))

    def test_malformed(self) -> None:
        self.client.dataReceived(b"NOT HTTP AT ALL\r\n\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.wire.disconnecting)

    def test_body_streamed_content_length(self) -> None:
        """A body is relayed as it arrives, with its length."""
        self.client.dataReceived(b"POST /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 10\r\n\r\n01234")
        backend, bwire = self.endpoint.complete()
        self.assertTrue(self.backend_request(bwire).endswith(b"Content-Length: 10\r\n\r\n") is False)
        self.client.dataReceived(b"56789")
        self.assertTrue(bwire.value().endswith(b"56789"))
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.wire.value().endswith(b"ok"))

    def test_chunked_upload(self) -> None:
        self.client.dataReceived(
            b"POST /up HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        backend, bwire = self.endpoint.complete()
        self.client.dataReceived(b"0\r\n\r\n")
        sent = bwire.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", sent)
        self.assertTrue(sent.endswith(b"5\r\nhello\r\n0\r\n\r\n"))

    def test_body_limit(self) -> None:
        """A declared length over the limit is 413 at once; a chunked body over it too."""
        self.client.dataReceived(b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5000\r\n\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(self.wire.disconnecting)
        self.assertEqual(self.endpoint.attempts, [])
        client, wire = self.connect()
        client.dataReceived(b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        client.dataReceived(b"%x\r\n%s\r\n" % (1200, b"x" * 1200))
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(bwire.disconnecting)  # the backend request is abandoned

    def test_expect_continue(self) -> None:
        self.client.dataReceived(
            b"PUT /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(self.wire.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        self.assertNotIn(b"Expect", bwire.value())

    def test_chunked_response_and_head(self) -> None:
        """A response without a length is chunked to the client; HEAD has no body."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        out = self.wire.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", out)
        self.assertTrue(out.endswith(b"3\r\nabc\r\n0\r\n\r\n"))
        self.wire.clear()
        self.client.dataReceived(b"HEAD / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        self.assertTrue(self.wire.value().endswith(b"Content-Length: 99\r\n\r\n"))
        self.wire.clear()
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.wire.value().endswith(b"\r\n\r\nok"))

    def test_backend_down_is_502(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.endpoint.attempts[0][1].errback(ConnectionRefusedError())
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(self.observed[0][0], 502)
        self.flushLoggedErrors()

    def test_backend_slow_is_504(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        self.clock.advance(31)
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 504 "))
        self.assertTrue(bwire.disconnecting)

    def test_truncated_response_cuts_the_client(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertTrue(self.wire.disconnecting or getattr(self.wire, "aborted", False))

    def test_client_gone_cancels_at_every_stage(self) -> None:
        """Connecting, waiting for headers, streaming: the backend side is dropped each time."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        _, connecting = self.endpoint.attempts[0]
        self.client.connectionLost(_failure(ConnectionResetError()))
        self.assertTrue(connecting.called)  # cancelled while connecting
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        client.connectionLost(_failure(ConnectionResetError()))
        self.assertTrue(getattr(bwire, "aborted", False) or bwire.disconnecting)
        self.assertEqual(self.pool.idle_count(), 0)
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        client.connectionLost(_failure(ConnectionResetError()))
        self.assertTrue(getattr(bwire, "aborted", False) or bwire.disconnecting)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_stale_pooled_connection_retried(self) -> None:
        """A pooled connection the backend closed under us: a GET is retried once on a new one."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.wire.clear()
        self.client.dataReceived(b"GET /again HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(len(self.endpoint.attempts), 2)
        fresh, fwire = self.endpoint.complete()
        self.assertTrue(fwire.value().startswith(b"GET /again "))
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.wire.value().endswith(b"ok"))

    def test_pipelined_requests_answered_in_order(self) -> None:
        self.client.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: shop.test\r\n\r\n"
        )
        backend, bwire = self.endpoint.complete()
        self.assertTrue(bwire.value().startswith(b"GET /1 "))
        self.assertNotIn(b"GET /2", bwire.value())
        bwire.clear()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        self.assertTrue(bwire.value().startswith(b"GET /2 "))
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        out = self.wire.value()
        self.assertLess(out.index(b"\r\n\r\n1"), out.index(b"\r\n\r\n2"))

    def test_http10_close_delimited(self) -> None:
        """An HTTP/1.0 client gets a close-delimited body when the backend gives no length."""
        self.client.dataReceived(b"GET / HTTP/1.0\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
        out = self.wire.value()
        self.assertNotIn(b"chunked", out)
        self.assertIn(b"Connection: close", out)
        self.assertTrue(out.endswith(b"hi"))
        self.assertTrue(self.wire.disconnecting)

    def test_idle_keep_alive_closed(self) -> None:
        self.clock.advance(self.proxy.idle_timeout + 1)
        self.assertTrue(self.wire.disconnecting)


class ReviewFixTests(RelayTests):
    """Defects found in review, each pinned."""

    def test_paused_backend_resumed_before_reuse(self) -> None:
        """A backend paused by a slow client is resumed before it goes back to the pool."""
        self.client.dataReceived(b"GET /big HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        bwire.pauseProducing()  # the client's buffer is full
        backend.dataReceived(b"cd")
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertEqual(bwire.producerState, "producing")

    def test_paused_client_resumed_after_upload(self) -> None:
        """A client paused by a slow backend reads its next request after the response."""
        self.client.dataReceived(b"POST /up HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n\r\nab")
        backend, bwire = self.endpoint.complete()
        self.wire.pauseProducing()  # the backend's buffer is full
        self.client.dataReceived(b"cd")
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.wire.producerState, "producing")

    def test_endless_header_line(self) -> None:
        """A header line that never ends is cut at the head limit (431), not buffered for ever."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Long: ")
        for _ in range(10):
            self.client.dataReceived(b"a" * 8192)
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(self.wire.disconnecting)

    def test_head_deadline(self) -> None:
        """A head trickled a byte at a time gets 408 when its deadline passes."""
        from tenantedge.http1 import HEADER_TIMEOUT

        for byte in b"GET / HT":
            self.client.dataReceived(bytes([byte]))
            self.clock.advance(1)
        self.clock.advance(HEADER_TIMEOUT)
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(self.wire.disconnecting)

    def test_pipelined_refusal_waits_its_turn(self) -> None:
        self.client.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: shop.test\r\nX-Big: "
            + b"a" * 40000 + b"\r\n\r\n"
        )
        self.assertEqual(self.wire.value(), b"")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        out = self.wire.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"HTTP/1.1 431 ", out)
        self.assertLess(out.index(b"\r\n\r\n1"), out.index(b"431"))

    def test_truncated_chunked_with_close_is_cut(self) -> None:
        """A chunked response whose backend dies mid-way is not made to look complete."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n")
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertFalse(self.wire.value().endswith(b"0\r\n\r\n"))
        self.assertTrue(self.wire.disconnecting or getattr(self.wire, "aborted", False))

    def test_only_chunked_coding(self) -> None:
        self.client.dataReceived(
            b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
        )
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 501 "))
        self.assertEqual(self.endpoint.attempts, [])

    def test_http10_keep_alive_said(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.0\r\nHost: shop.test\r\nConnection: keep-alive\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertIn(b"Connection: keep-alive\r\n", self.wire.value())
        self.assertFalse(self.wire.disconnecting)

    def test_canonical_host_and_underscore_variants(self) -> None:
        self.client.dataReceived(
            b"GET / HTTP/1.1\r\nHost: SHOP.TEST.:443\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Host: evil\r\n\r\n"
        )
        backend, bwire = self.endpoint.complete()
        sent = bwire.value()
        self.assertIn(b"Host: shop.test\r\n", sent)
        self.assertNotIn(b"6.6.6.6", sent)
        self.assertNotIn(b"evil", sent)

    def test_stray_backend_bytes_close_it(self) -> None:
        """Bytes after a complete response (nobody asked) mean the connection is never reused."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(getattr(bwire, "aborted", False) or bwire.disconnecting)


class SeveralBackendsTests(SynchronousTestCase):
    """The relay over three backends: balancing, failover and retries."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoints = [FakeEndpoint() for _ in range(3)]
        self.pools = [BackendPool(self.clock, (lambda e=e: e), name=f"b{i}") for i, e in enumerate(self.endpoints)]
        self.backends = Backends(self.clock, self.pools)
        self.proxy = H1Proxy(self.backends, self.clock, timeout=30)

    def connect(self) -> tuple[H1ProxyProtocol, StringTransport]:
        proto = H1ProxyProtocol(self.proxy, "shop.test")
        wire = StringTransport(peerAddress=_Peer("203.0.113.9"))
        proto.makeConnection(wire)
        return proto, wire

    def attempts(self) -> list[int]:
        return [len(e.attempts) for e in self.endpoints]

    def test_concurrent_requests_spread(self) -> None:
        """Three requests in flight at once go to three backends; all answered, all connections pooled."""
        clients = [self.connect() for _ in range(3)]
        for client, _ in clients:
            client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.assertEqual(self.attempts(), [1, 1, 1])
        self.assertEqual([p.outstanding for p in self.pools], [1, 1, 1])
        for endpoint in self.endpoints:
            backend, _ = endpoint.complete()
            backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        for _, wire in clients:
            self.assertTrue(wire.value().endswith(b"\r\n\r\nok"))
        self.assertEqual([(p.outstanding, p.idle_count(), p.requests) for p in self.pools], [(0, 1, 1)] * 3)

    def test_refused_get_retried_on_another(self) -> None:
        client, wire = self.connect()
        client.dataReceived(b"GET /x HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.endpoints[0].attempts[0][1].errback(ConnectionRefusedError())
        self.assertFalse(self.pools[0].up)
        self.assertEqual(self.attempts(), [1, 1, 0])
        backend, bwire = self.endpoints[1].complete()
        self.assertTrue(bwire.value().startswith(b"GET /x "))
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual([p.outstanding for p in self.pools], [0, 0, 0])
        self.flushLoggedErrors()

    def test_refused_post_with_body_retried(self) -> None:
        """
        A connection refused means nothing of the request left the edge
        (the body waits in memory): another backend gets all of it, whatever the method.
        """
        client, wire = self.connect()
        client.dataReceived(b"POST /form HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello")
        self.endpoints[0].attempts[0][1].errback(ConnectionRefusedError())
        backend, bwire = self.endpoints[1].complete()
        sent = bwire.value()
        self.assertTrue(sent.startswith(b"POST /form "))
        self.assertTrue(sent.endswith(b"\r\n\r\nhello"))
        backend.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 201 "))

    def test_reset_before_response_retried_if_idempotent(self) -> None:
        client, wire = self.connect()
        client.dataReceived(b"GET /y HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoints[0].complete()
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(self.attempts(), [1, 1, 0])
        fresh, fwire = self.endpoints[1].complete()
        self.assertTrue(fwire.value().startswith(b"GET /y "))
        self.assertEqual(self.pools[0].consecutive, 1)
        self.assertTrue(self.pools[0].up)  # one reset is not enough to eject

    def test_reset_after_body_sent_is_502(self) -> None:
        """A POST whose body reached a backend that then reset is not sent twice: 502."""
        client, wire = self.connect()
        client.dataReceived(b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\nhi")
        backend, bwire = self.endpoints[0].complete()
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(self.attempts(), [1, 0, 0])
        self.assertEqual(self.pools[0].failures, 1)
        self.flushLoggedErrors()

    def test_every_backend_refusing_is_502(self) -> None:
        """Each backend tried once, then 502; the next request still tries the one down longest."""
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        for endpoint in self.endpoints:
            self.clock.advance(1)
            endpoint.attempts[-1][1].errback(ConnectionRefusedError())
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(self.attempts(), [1, 1, 1])
        self.assertEqual(self.backends.healthy(), 0)
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.assertEqual(self.attempts(), [2, 1, 1])
        backend, _ = self.endpoints[0].complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.backends.healthy(), 1)
        self.assertEqual([p.outstanding for p in self.pools], [0, 0, 0])
        self.flushLoggedErrors()

    def test_client_gone_releases_the_backend(self) -> None:
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.assertEqual(self.pools[0].outstanding, 1)
        client.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(self.pools[0].outstanding, 0)
        self.assertEqual(self.pools[0].failures, 0)

    def test_timeout_releases_without_verdict(self) -> None:
        client, wire = self.connect()
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.endpoints[0].complete()
        self.clock.advance(31)
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual((self.pools[0].outstanding, self.pools[0].failures), (0, 0))
        self.flushLoggedErrors()


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 40000


def _failure(error: Exception) -> Any:
    from twisted.python.failure import Failure

    return Failure(error)


class LimitTests(RelayTests):
    """The relay's deadlines come from the configuration, and every limit is counted."""

    def setUp(self) -> None:
        super().setUp()
        self.proxy.header_timeout = 3.0
        self.proxy.idle_timeout = 7.0
        self.client, self.wire = self.connect()

    def test_head_deadline_configurable(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(2.9)
        self.assertEqual(self.wire.value(), b"")
        self.clock.advance(0.2)
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 408 "))
        self.assertEqual(self.proxy.events["header-timeout"], 1)

    def test_idle_timeout_configurable(self) -> None:
        self.clock.advance(6.9)
        self.assertFalse(self.wire.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.wire.disconnecting)
        self.assertEqual(self.proxy.events["idle-timeout"], 1)

    def test_idle_after_a_response(self) -> None:
        """The idle deadline starts again after each response."""
        self.clock.advance(5)
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, _bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.clock.advance(6.9)
        self.assertFalse(self.wire.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.wire.disconnecting)

    def test_head_and_body_limits_counted(self) -> None:
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 431 "))
        client, wire = self.connect()
        client.dataReceived(b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5000\r\n\r\n")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.proxy.events, {"head-too-large": 1, "body-too-large": 1})


class TrustedChainTests(RelayTests):
    """--trusted-proxy on the relay: the chain of a trusted peer is kept, anyone else's dropped."""

    REQUEST = (b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 198.51.100.1\r\n"
               b"X-Forwarded-For: 198.51.100.2\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: other.test\r\n"
               b"X-Real-IP: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n")

    def sent_from(self, peer: str, *cidrs: str) -> bytes:
        from tenantedge.forwarding import TrustedProxies

        self.proxy.trusted_proxies = TrustedProxies.from_cidrs(cidrs)
        client = H1ProxyProtocol(self.proxy, "shop.test")
        client.makeConnection(StringTransport(peerAddress=_Peer(peer)))
        client.dataReceived(self.REQUEST)
        _backend, bwire = self.endpoint.complete()
        return bwire.value()

    def assert_only_edge_values(self, sent: bytes, forwarded_for: bytes) -> None:
        self.assertIn(b"X-Forwarded-For: %s\r\n" % forwarded_for, sent)
        self.assertEqual(sent.lower().count(b"x-forwarded-for"), 1)
        self.assertIn(b"X-Forwarded-Proto: https\r\n", sent)
        self.assertIn(b"X-Forwarded-Host: shop.test\r\n", sent)
        for dropped in (b"other.test", b"1.2.3.4", b"6.6.6.6", b"Forwarded:"):
            self.assertNotIn(dropped, sent)

    def test_trusted_ipv4(self) -> None:
        sent = self.sent_from("10.0.0.5", "10.0.0.0/8")
        self.assert_only_edge_values(sent, b"198.51.100.1, 198.51.100.2, 10.0.0.5")

    def test_trusted_ipv6(self) -> None:
        sent = self.sent_from("2001:db8::5", "10.0.0.0/8", "2001:db8::/32")
        self.assert_only_edge_values(sent, b"198.51.100.1, 198.51.100.2, 2001:db8::5")

    def test_outside_dropped(self) -> None:
        self.assert_only_edge_values(self.sent_from("203.0.113.9", "10.0.0.0/8"), b"203.0.113.9")
        self.assert_only_edge_values(self.sent_from("2001:db9::5", "2001:db8::/32"), b"2001:db9::5")

    def test_none_configured_dropped(self) -> None:
        self.assert_only_edge_values(self.sent_from("10.0.0.5"), b"10.0.0.5")

    def test_host_still_checked(self) -> None:
        """A trusted peer gets no way around the Host check against the TLS name."""
        from tenantedge.forwarding import TrustedProxies

        self.proxy.trusted_proxies = TrustedProxies.from_cidrs(["10.0.0.0/8"])
        client = H1ProxyProtocol(self.proxy, "shop.test")
        wire = StringTransport(peerAddress=_Peer("10.0.0.5"))
        client.makeConnection(wire)
        client.dataReceived(b"GET / HTTP/1.1\r\nHost: other.test\r\nX-Forwarded-Host: shop.test\r\n\r\n")
        self.assertTrue(wire.value().startswith(b"HTTP/1.1 421 "))
