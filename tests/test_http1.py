"""
Tests for L{tenantedge.http1}, the fast HTTP/1.1 relay, driven byte by
byte: the client on a C{StringTransport}, the backend connections on
C{StringTransport}s made by a controllable endpoint. Every proxy rule
of the twisted.web path holds here too; end-to-end tests over TLS with
real curl and a real backend are in C{tests/test_e2e.py}.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.backend import BackendPool, Backends
from tenantedge.exchange import Relay
from tenantedge.http1 import H1ProxyProtocol


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
        self.proxy = Relay(self.pool, self.clock, timeout=30, max_body_size=1000,
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

    def test_chunked_trailers(self) -> None:
        """A chunked body's trailer fields reach the backend (not as request headers), less forbidden ones."""
        self.client.dataReceived(
            b"POST /up HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        backend, bwire = self.endpoint.complete()
        self.client.dataReceived(b"0\r\nX-Checksum: ab12\r\nHost: evil.test\r\n\r\n")
        sent = bwire.value()
        self.assertTrue(sent.endswith(b"5\r\nhello\r\n0\r\nX-Checksum: ab12\r\n\r\n"), sent)
        self.assertNotIn(b"evil.test", sent)
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.wire.value().endswith(b"ok"))

    def test_too_many_trailers_close(self) -> None:
        """Trailer fields past the head's limits close the connection (and the unfinished backend request)."""
        from tenantedge.http1 import MAX_HEADERS

        self.client.dataReceived(
            b"POST /up HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        backend, bwire = self.endpoint.complete()
        self.client.dataReceived(b"0\r\n" + b"".join(b"X-T%d: v\r\n" % i for i in range(MAX_HEADERS + 2)))
        self.assertTrue(self.wire.disconnecting or self.wire.disconnected)
        self.assertEqual(self.proxy.events["head-too-large"], 1)
        self.assertNotIn(b"X-T0", bwire.value())

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
        from tenantedge.exchange import HEADER_TIMEOUT

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


class _ClosingTLSTransport(StringTransport):
    """
    Twisted's TLS transport's rule: once closing, and without a producer,
    it drops what is written (it has begun its TLS shutdown).
    """

    def write(self, data: bytes) -> None:
        if self.disconnecting and self.producer is None:
            return
        super().write(data)


class ClosingClientTests(RelayTests):
    """The end of a response reaches a client whose connection is closing."""

    def connect(self) -> tuple[H1ProxyProtocol, StringTransport]:
        proto = H1ProxyProtocol(self.proxy, "shop.test")
        wire = _ClosingTLSTransport(peerAddress=_Peer("203.0.113.9"))
        proto.makeConnection(wire)
        return proto, wire

    def check(self, head: bytes, rest: bytes, whole: bytes) -> None:
        self.client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, _ = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\n" + head)
        self.client.dataReceived(b"GET /2 HTTP/1.1\r\nHo")  # a head that never ends
        self.clock.advance(self.proxy.header_timeout + 1)  # closing now: after the response in flight
        self.assertTrue(self.wire.disconnecting)
        backend.dataReceived(rest)
        self.assertTrue(self.wire.value().endswith(whole), self.wire.value())

    def test_chunked_end_after_the_client_started_closing(self) -> None:
        self.check(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"5\r\nworld\r\n0\r\n\r\n",
                   b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n")

    def test_length_end_after_the_client_started_closing(self) -> None:
        self.check(b"Content-Length: 10\r\n\r\nhello", b"world", b"\r\n\r\nhelloworld")


class SeveralBackendsTests(SynchronousTestCase):
    """The relay over three backends: balancing, failover and retries."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoints = [FakeEndpoint() for _ in range(3)]
        self.pools = [BackendPool(self.clock, (lambda e=e: e), name=f"b{i}") for i, e in enumerate(self.endpoints)]
        self.backends = Backends(self.clock, self.pools)
        self.proxy = Relay(self.backends, self.clock, timeout=30)

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


_UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: shop.test\r\nConnection: keep-alive, Upgrade, X-Hop\r\nUpgrade: websocket\r\n"
    b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
_SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Internal\r\nX-Internal: s\r\n"
    b"Keep-Alive: timeout=5\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


class UpgradeTests(SynchronousTestCase):
    """HTTP/1.1 upgrades (WebSocket) through the relay, both sides on C{StringTransport}s."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.endpoint = FakeEndpoint()
        self.pool = BackendPool(self.clock, lambda: self.endpoint)
        self.proxy = Relay(self.pool, self.clock, timeout=30, websocket_idle_timeout=600)
        self.client = H1ProxyProtocol(self.proxy, "shop.test")
        self.wire = StringTransport(peerAddress=_Peer("203.0.113.9"))
        self.client.makeConnection(self.wire)

    def switched(self, request: bytes = _UPGRADE, answer: bytes = _SWITCHED) -> tuple[Any, StringTransport]:
        """Send an upgrade request, answer it with C{answer}; the wires are cleared."""
        self.client.dataReceived(request)
        backend, bwire = self.endpoint.complete()
        self.assertTrue(bwire.value().startswith(b"GET /chat HTTP/1.1\r\n"))
        bwire.clear()
        backend.dataReceived(answer)
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.wire.clear()
        return backend, bwire

    def test_upgrade_headers_forwarded(self) -> None:
        """
        Connection: upgrade and Upgrade reach the backend; every other
        hop-by-hop header (and any named in Connection) is still dropped,
        X-Forwarded-* set afresh.
        """
        self.client.dataReceived(_UPGRADE)
        _backend, bwire = self.endpoint.complete()
        sent = bwire.value()
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", sent)
        self.assertEqual(sent.lower().count(b"connection:"), 1)
        self.assertIn(b"Host: shop.test\r\n", sent)
        self.assertIn(b"X-Forwarded-For: 203.0.113.9\r\n", sent)
        self.assertIn(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", sent)
        self.assertIn(b"Sec-WebSocket-Version: 13\r\n", sent)
        for bad in (b"6.6.6.6", b"X-Hop", b"Keep-Alive", b"keep-alive"):
            self.assertNotIn(bad, sent)

    def test_101_relayed_then_bytes_both_ways(self) -> None:
        """
        The 101 head goes to the client with Upgrade and Connection: upgrade
        (the backend's other hop-by-hop headers dropped); then bytes go
        through unparsed both ways, and the backend connection is not pooled.
        """
        self.client.dataReceived(_UPGRADE)
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(_SWITCHED)
        head = self.wire.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        self.assertIn(b"\r\nUpgrade: websocket\r\n", head)
        self.assertIn(b"\r\nConnection: Upgrade\r\n", head)
        self.assertIn(b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n", head)
        for bad in (b"X-Internal", b"Keep-Alive"):
            self.assertNotIn(bad, head)
        self.wire.clear()
        bwire.clear()
        self.client.dataReceived(b"\x81\x05hello")
        self.client.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: just bytes
        self.assertEqual(bwire.value(), b"\x81\x05helloGET / HTTP/1.1\r\n\r\n")
        backend.dataReceived(b"\x81\x02hi")
        backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(self.wire.value(), b"\x81\x02hiHTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertEqual(self.proxy.upgrades["switched"], 1)
        self.assertEqual(len(self.proxy.tunnels), 1)

    def test_bytes_past_the_heads_forwarded(self) -> None:
        """
        Bytes that came with the heads, and what the client sent while the
        backend was answering, are forwarded in order once switched;
        nothing after the upgrade request is parsed as HTTP.
        """
        pipelined = b"GET /next HTTP/1.1\r\nHost: shop.test\r\n\r\n"
        self.client.dataReceived(_UPGRADE + b"\x81\x01a" + pipelined)
        backend, bwire = self.endpoint.complete()
        self.client.dataReceived(b"\x81\x01b")
        self.assertNotIn(b"/next", bwire.value())
        bwire.clear()
        backend.dataReceived(_SWITCHED + b"\x81\x03srv")
        self.assertTrue(self.wire.value().endswith(b"\r\n\r\n\x81\x03srv"))
        self.assertEqual(bwire.value(), b"\x81\x01a" + pipelined + b"\x81\x01b")
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_back_pressure_both_ways(self) -> None:
        """
        Each transport is the other's streaming producer, so a full write
        buffer on one side pauses reading on the other.
        """
        backend, bwire = self.switched()
        self.assertIs(self.wire.producer, bwire)
        self.assertTrue(self.wire.streaming)
        self.assertIs(bwire.producer, self.wire)
        self.assertTrue(bwire.streaming)

    def test_client_paused_while_waiting_is_resumed(self) -> None:
        """
        A client sending more than the relay holds while the backend
        answers is paused, then resumed by the switch with every byte
        forwarded.
        """
        self.client.dataReceived(_UPGRADE)
        backend, bwire = self.endpoint.complete()
        bwire.clear()
        early = b"x" * (300 * 1024)
        self.client.dataReceived(early)
        self.assertEqual(self.wire.producerState, "paused")
        backend.dataReceived(_SWITCHED)
        self.assertEqual(self.wire.producerState, "producing")
        self.assertEqual(bwire.value(), early)

    def test_client_close_closes_backend(self) -> None:
        """The client's close (or abort) closes the backend connection after what it was sent."""
        backend, bwire = self.switched()
        self.client.dataReceived(b"last")
        self.client.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(bwire.value(), b"last")
        self.assertTrue(bwire.disconnecting)
        self.assertFalse(bwire.disconnected)  # closed, not aborted: what was written is flushed
        self.assertIsNone(bwire.producer)
        self.assertEqual(len(self.proxy.tunnels), 1)
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(len(self.proxy.tunnels), 0)
        self.assertEqual(self.pool.idle_count(), 0)

    def test_backend_close_closes_client(self) -> None:
        """The backend's close (a server-initiated close) closes the client's connection after flushing."""
        backend, bwire = self.switched()
        backend.dataReceived(b"\x88\x00")
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(self.wire.value(), b"\x88\x00")
        self.assertTrue(self.wire.disconnecting)
        self.assertFalse(self.wire.disconnected)
        self.assertIsNone(self.wire.producer)
        self.client.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(len(self.proxy.tunnels), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_the_tunnel_timer_runs(self) -> None:
        """
        Once switched, no HTTP timer of the connection (head deadline,
        keep-alive idle) nor the backend deadline is armed: only the
        tunnel's idle timer.
        """
        self.switched()
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getTime(), self.clock.seconds() + 600)
        self.clock.advance(self.proxy.idle_timeout + 1)
        self.clock.advance(30 + 1)  # past the head deadline and the backend timeout
        self.assertFalse(self.wire.disconnecting)

    def test_idle_timeout(self) -> None:
        """
        No byte either way for --websocket-idle-timeout closes both sides;
        a byte in either direction starts the wait afresh.
        """
        backend, bwire = self.switched()
        self.clock.advance(599)
        self.client.dataReceived(b"ping")
        self.clock.advance(599)
        backend.dataReceived(b"pong")
        self.clock.advance(599)
        self.assertFalse(self.wire.disconnecting or bwire.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.wire.disconnected)
        self.assertTrue(bwire.disconnected)
        self.client.connectionLost(_failure(ConnectionResetError()))
        backend.connectionLost(_failure(ConnectionResetError()))
        self.assertEqual(len(self.proxy.tunnels), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_idle_timeout(self) -> None:
        """With the idle timeout 0, an upgraded connection has no timer at all."""
        self.proxy.websocket_idle_timeout = 0
        _backend, bwire = self.switched()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(86400 * 7)
        self.assertFalse(self.wire.disconnecting or bwire.disconnecting)

    def test_non_101_keeps_http(self) -> None:
        """
        An upgrade the backend declines is an ordinary response: relayed,
        the backend connection pooled again, the next request parsed as HTTP.
        """
        self.client.dataReceived(_UPGRADE)
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
        out = self.wire.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 426 Upgrade Required\r\n"))
        self.assertTrue(out.endswith(b"\r\n\r\nno"))
        self.assertNotIn(b"Connection: close", out)
        self.assertFalse(self.wire.disconnecting)
        self.assertEqual(self.pool.idle_count(), 1)
        bwire.clear()
        self.client.dataReceived(b"GET /after HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        self.assertTrue(bwire.value().startswith(b"GET /after HTTP/1.1\r\n"))
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertIn(b"HTTP/1.1 204 No Content\r\n", self.wire.value())
        self.assertEqual(self.proxy.upgrades["declined"], 1)
        self.assertEqual(self.proxy.tunnels, set())

    def test_non_101_after_early_bytes_closes(self) -> None:
        """
        Declined after the client already sent bytes past the upgrade
        request: those cannot be read as HTTP, so the response says
        Connection: close and the connection closes after it.
        """
        self.client.dataReceived(_UPGRADE + b"\x81\x01a")
        backend, bwire = self.endpoint.complete()
        bwire.clear()
        backend.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        out = self.wire.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertIn(b"Connection: close\r\n", out)
        self.assertTrue(self.wire.disconnecting)
        self.assertEqual(bwire.value(), b"")

    def test_h2c_refused(self) -> None:
        """
        An h2c upgrade (alone or among others) reaches the backend as a
        plain request, without Upgrade, HTTP2-Settings or Connection:
        upgrade; the connection closes after the answer, what followed unread.
        """
        for offer in (b"h2c", b"websocket, H2C", b"h2c/1"):
            self.setUp()
            self.client.dataReceived(
                b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: %s\r\n"
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" % (offer,)
            )
            backend, bwire = self.endpoint.complete()
            sent = bwire.value()
            self.assertTrue(sent.startswith(b"GET / HTTP/1.1\r\n"))
            for bad in (b"Upgrade", b"upgrade", b"HTTP2-Settings", b"h2c", b"H2C", b"PRI"):
                self.assertNotIn(bad, sent)
            backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
            self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 502 "), offer)
            self.assertEqual(self.proxy.upgrades, {"refused": 1})
            self.assertEqual(len(self.endpoint.attempts), 1)

    def test_upgrade_with_body_or_http10_not_relayed(self) -> None:
        """Only a bodiless HTTP/1.1 request is relayed as an upgrade."""
        for request in (
            b"POST /chat HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 2\r\n\r\nab",
            b"GET /chat HTTP/1.0\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        ):
            self.setUp()
            self.client.dataReceived(request)
            _backend, bwire = self.endpoint.complete()
            self.assertNotIn(b"Upgrade", bwire.value())
            self.assertEqual(self.proxy.upgrades, {"refused": 1})

    def test_unasked_101_is_502(self) -> None:
        """A 101 to a request that did not ask for an upgrade is a broken backend: 502, connection dropped."""
        self.client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(_SWITCHED + b"\x81\x01a")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(bwire.disconnected)
        self.assertEqual(self.proxy.tunnels, set())

    def test_101_without_upgrade_header_is_502(self) -> None:
        self.client.dataReceived(_UPGRADE)
        backend, bwire = self.endpoint.complete()
        backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(bwire.disconnected)
        self.assertEqual(self.proxy.upgrades["failed"], 1)

    def test_misdirected_upgrade(self) -> None:
        """The Host check applies to an upgrade as to any request: 421, no backend."""
        self.client.dataReceived(_UPGRADE.replace(b"Host: shop.test", b"Host: other.test"))
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 421 "))
        self.assertEqual(self.endpoint.attempts, [])
        self.assertEqual(self.proxy.upgrades, {"refused": 1})

    def test_backend_slow_is_504(self) -> None:
        self.client.dataReceived(_UPGRADE)
        self.endpoint.complete()
        self.clock.advance(31)
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(self.proxy.upgrades["failed"], 1)

    def test_server_stop_closes_tunnels(self) -> None:
        """Stopping the server aborts the client side, which closes the backend side."""
        backend, bwire = self.switched()
        self.proxy.close_all()
        self.assertTrue(self.wire.disconnected)
        self.client.connectionLost(_failure(ConnectionResetError()))
        self.assertTrue(bwire.disconnecting)

    def test_metrics(self) -> None:
        """tenantedge_upgrades_total by result (every result from zero) and the open count."""
        from prometheus_client import CollectorRegistry, generate_latest

        from tenantedge.metrics import UpgradeCollector

        self.switched()
        registry = CollectorRegistry()
        registry.register(UpgradeCollector(self.proxy.upgrades, lambda: len(self.proxy.tunnels)))
        text = generate_latest(registry).decode()
        self.assertIn('tenantedge_upgrades_total{result="switched"} 1.0', text)
        self.assertIn('tenantedge_upgrades_total{result="declined"} 0.0', text)
        self.assertIn("tenantedge_upgraded_connections 1.0", text)


class UpgradeOfferTests(SynchronousTestCase):
    """L{tenantedge.headers.upgrade_offer}, on the client's (untrusted) headers."""

    def test_offers(self) -> None:
        from tenantedge.headers import upgrade_offer

        for headers, offer in [
            ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], b"websocket"),
            ([(b"connection", b"keep-alive, UPGRADE"), (b"upgrade", b" WebSocket ")], b"WebSocket"),
            ([(b"Upgrade", b"websocket")], None),  # Connection does not name it
            ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Upgrade", b"x")], None),
            ([(b"Connection", b"Upgrade"), (b"Upgrade", b"")], None),
            ([(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")], None),
            ([(b"Connection", b"Upgrade"), (b"Upgrade", b"foo/2, H2C/1")], None),
        ]:
            self.assertEqual(upgrade_offer(headers), offer, headers)

    @given(st.lists(st.tuples(st.sampled_from([b"Connection", b"Upgrade", b"upgrade", b"X"]), st.binary(max_size=40))))
    def test_never_h2c(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Whatever the headers, the offer (if any) never names h2c and never raises."""
        from tenantedge.headers import upgrade_offer

        offer = upgrade_offer(headers)
        if offer is not None:
            tokens = [t.strip().split(b"/")[0].lower() for t in offer.split(b",")]
            self.assertNotIn(b"h2c", tokens)
