"""
Tests for L{tenantedge.http2}, HTTP/2 on the relay, driven frame by frame:
a real C{h2} client on one side of a C{StringTransport}, the backend
connections on C{StringTransport}s made by a controllable endpoint (as in
C{tests/test_http1.py}). End-to-end tests with curl over TLS are in
C{tests/test_e2e.py}.
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset, WindowUpdated
from h2.settings import SettingCodes, Settings
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.backend import BackendPool
from tenantedge.exchange import Relay
from tenantedge.http2 import (
    CLOSE_GRACE,
    DISCARD_BYTES,
    DISCARD_SECONDS,
    MAX_RESETS,
    QUEUE_HIGH,
    H2ProxyProtocol,
    websocket_accept,
)

from .test_http1 import FakeEndpoint, _Peer


class Client:
    """An h2 client wired to the edge's protocol through StringTransport."""

    def __init__(self, proto: H2ProxyProtocol, wire: StringTransport, window: int | None = None) -> None:
        self.proto = proto
        self.wire = wire
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False))
        if window is not None:
            self.h2.local_settings = Settings(client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.h2.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            data = self.h2.data_to_send()
            if data:
                self.proto.dataReceived(data)
            self.proto.proxy.clock.advance(0)  # the end of the reactor turn: the edge writes
            out = self.wire.value()
            self.wire.clear()
            if out:
                self.events.extend(self.h2.receive_data(out))
            if not data and not out:
                return

    def request(self, method: bytes = b"GET", path: bytes = b"/", authority: bytes = b"shop.test",
                headers: list[tuple[bytes, bytes]] = (), end: bool = True) -> int:  # type: ignore[assignment]
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", method), (b":scheme", b"https"), (b":path", path),
                                   (b":authority", authority), *headers], end_stream=end)
        self.pump()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.h2.send_data(sid, data, end_stream=end)
        self.pump()

    def of(self, sid: int, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and getattr(e, "stream_id", sid) == sid]

    def status(self, sid: int) -> bytes:
        (response,) = self.of(sid, ResponseReceived)
        return dict(response.headers)[b":status"]

    def body(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.of(sid, DataReceived))


class H2TestCase(SynchronousTestCase):
    """An edge's HTTP/2 protocol, a client and controllable backend connections."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.endpoint = FakeEndpoint()
        self.pool = BackendPool(self.clock, lambda: self.endpoint)
        self.proxy = Relay(self.pool, self.clock, timeout=30, max_body_size=1000, idle_timeout=60)
        self.client = self.connect()

    def connect(self, window: int | None = None) -> Client:
        proto = H2ProxyProtocol(self.proxy, "shop.test")
        wire = StringTransport(peerAddress=_Peer("203.0.113.9"))
        proto.makeConnection(wire)
        self.proto = proto
        return Client(proto, wire, window)

    def backend(self) -> tuple[Any, StringTransport]:
        return self.endpoint.complete()


class H2RelayTests(H2TestCase):
    def test_get_relayed(self) -> None:
        """
        :authority becomes Host, X-Forwarded-* are set, cookies are one
        header again; the response comes back with hop-by-hop headers
        dropped and names in lower case, and the connection is pooled.
        """
        sid = self.client.request(headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2"),
                                           (b"x-forwarded-for", b"6.6.6.6")])
        backend, bwire = self.backend()
        sent = bwire.value()
        self.assertTrue(sent.startswith(b"GET / HTTP/1.1\r\n"), sent)
        self.assertIn(b"Host: shop.test\r\n", sent)
        self.assertIn(b"X-Forwarded-For: 203.0.113.9\r\n", sent)
        self.assertIn(b"cookie: a=1; b=2\r\n", sent)
        self.assertNotIn(b"6.6.6.6", sent)
        self.assertNotIn(b"Transfer-Encoding", sent)
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Internal\r\n"
                             b"X-Internal: s\r\nX-App: yes\r\n\r\nhello")
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"200")
        (response,) = self.client.of(sid, ResponseReceived)
        names = [name for name, _ in response.headers]
        self.assertIn(b"x-app", names)
        self.assertNotIn(b"x-internal", names)
        self.assertNotIn(b"connection", names)
        self.assertEqual(self.client.body(sid), b"hello")
        self.assertTrue(self.client.of(sid, StreamEnded))
        self.assertEqual(self.pool.idle_count(), 1)
        self.assertEqual(self.proto.streams, {})
        self.assertEqual((self.pool.outstanding, self.pool.requests), (0, 1))  # the balancer's count

    def test_streamed_upload(self) -> None:
        """
        A body without a declared length goes to the backend chunked, each
        DATA frame as it arrives, before the stream ends.
        """
        sid = self.client.request(b"POST", end=False)
        backend, bwire = self.backend()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", bwire.value())
        bwire.clear()
        self.client.send(sid, b"part one")
        self.assertEqual(bwire.value(), b"8\r\npart one\r\n")
        bwire.clear()
        self.client.send(sid, b"", end=True)
        self.assertEqual(bwire.value(), b"0\r\n\r\n")
        backend.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"201")

    def test_request_trailers(self) -> None:
        """
        Trailing HEADERS (gRPC-style) end the chunked body to the backend as
        its trailer fields, less those a trailer must not carry; with a
        declared length there is no place for them: dropped and counted.
        """
        sid = self.client.request(b"POST", headers=[(b"te", b"trailers")], end=False)
        backend, bwire = self.backend()
        self.client.send(sid, b"abc")
        bwire.clear()
        self.client.h2.send_headers(sid, [(b"grpc-status", b"0"), (b"x-checksum", b"ab12"),
                                          (b"content-length", b"9"), (b"x-forwarded-for", b"6.6.6.6")],
                                    end_stream=True)
        self.client.pump()
        self.assertEqual(bwire.value(), b"0\r\ngrpc-status: 0\r\nx-checksum: ab12\r\n\r\n")
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"200")
        bwire.clear()  # the pooled connection carries the next request
        sid = self.client.request(b"PUT", headers=[(b"content-length", b"3")], end=False)
        self.client.send(sid, b"abc")
        self.client.h2.send_headers(sid, [(b"x-checksum", b"ab12")], end_stream=True)
        self.client.pump()
        self.assertTrue(bwire.value().endswith(b"\r\n\r\nabc"))
        self.assertEqual(self.proxy.events["trailers-dropped"], 1)

    def test_trailer_names_cannot_smuggle(self) -> None:
        """
        A trailer name with CR/LF (a second request for another tenant,
        smuggled after the body) resets the stream: nothing of it reaches
        the backend, whose connection is not given back for reuse.
        """
        smuggled = (b"x-a: b\r\n\r\nGET /admin HTTP/1.1\r\nHost: other-tenant.test\r\n"
                    b"X-Forwarded-For: 10.0.0.1\r\nx-c")
        for name in (smuggled, b"bad name", b":path", b""):
            sid = self.client.request(b"POST", end=False)
            backend, bwire = self.backend()
            self.client.send(sid, b"abc")
            bwire.clear()
            self.client.h2.send_headers(sid, [(name, b"y")], end_stream=True)
            self.client.pump()
            self.assertNotIn(b"GET /admin", bwire.value(), name)
            self.assertNotIn(b"0\r\n", bwire.value(), name)
            self.assertTrue(self.client.of(sid, StreamReset), name)
            self.assertEqual(self.pool.idle_count(), 0, name)
        self.assertEqual(self.proxy.events["h2-malformed"], 4)

    def test_trailers_before_backend_connects(self) -> None:
        """A whole body with trailers that arrives before the backend connection goes out with them."""
        sid = self.client.request(b"POST", end=False)
        self.client.send(sid, b"abc")
        self.client.h2.send_headers(sid, [(b"x-checksum", b"ab12")], end_stream=True)
        self.client.pump()
        backend, bwire = self.backend()
        self.assertTrue(bwire.value().endswith(b"3\r\nabc\r\n0\r\nx-checksum: ab12\r\n\r\n"), bwire.value())

    def test_declared_length_forwarded(self) -> None:
        sid = self.client.request(b"PUT", headers=[(b"content-length", b"3")], end=False)
        backend, bwire = self.backend()
        self.assertIn(b"Content-Length: 3\r\n", bwire.value())
        bwire.clear()
        self.client.send(sid, b"abc", end=True)
        self.assertEqual(bwire.value(), b"abc")

    def test_upload_back_pressure(self) -> None:
        """
        While the backend connection cannot take more (it paused its
        producer, the stream), the stream's window is not reopened; once
        it resumes, it is.
        """
        self.proxy.max_body_size = 0  # no limit
        sid = self.client.request(b"POST", end=False)
        backend, bwire = self.backend()
        bwire.producer.pauseProducing()
        for _ in range(4):
            self.client.send(sid, b"x" * 160_000)  # more than half the window: due an update
        self.assertEqual([e for e in self.client.of(sid, WindowUpdated) if e.stream_id == sid], [])
        bwire.producer.resumeProducing()
        self.client.pump()
        self.assertTrue([e for e in self.client.of(sid, WindowUpdated) if e.stream_id == sid])

    def test_oversize_body_resets_only_its_stream(self) -> None:
        """
        A declared length over the limit is 413 at once; an undeclared one
        413 once it crosses it, then RST_STREAM (NO_ERROR) to stop the
        upload if it goes on. A GET on the same connection is answered.
        """
        declared = self.client.request(b"POST", headers=[(b"content-length", b"5000")], end=False)
        self.assertEqual(self.client.status(declared), b"413")
        self.assertEqual(self.endpoint.attempts, [])
        undeclared = self.client.request(b"POST", end=False)
        _, upload_wire = self.backend()
        other = self.client.request()
        backend, bwire = self.backend()
        self.client.send(undeclared, b"y" * 600)
        self.client.send(undeclared, b"y" * 600)
        self.assertEqual(self.client.status(undeclared), b"413")
        self.assertTrue(upload_wire.disconnecting)  # the backend request abandoned
        # The rest is read and dropped for a while (a client still sending
        # reads its answer), then RST_STREAM NO_ERROR stops it.
        self.client.send(undeclared, b"y" * 600)
        self.assertEqual([e for e in self.client.events if isinstance(e, StreamReset)], [])
        self.clock.advance(DISCARD_SECONDS)
        self.client.pump()
        resets = {e.stream_id: e.error_code for e in self.client.events if isinstance(e, StreamReset)}
        self.assertEqual(resets.get(undeclared), ErrorCodes.NO_ERROR)
        # The declared one too: its client sent nothing more, and gets the
        # same reset when the time is up.
        self.assertEqual(resets.get(declared), ErrorCodes.NO_ERROR)
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.client.pump()
        self.assertEqual(self.client.status(other), b"200")
        self.assertEqual(self.client.body(other), b"ok")
        self.assertFalse(self.client.wire.disconnecting)

    def test_discard_budget(self) -> None:
        """
        Past DISCARD_BYTES after the answer, the reset comes at once; a
        body that ends within the budget ends the stream without one.
        """
        self.proxy.max_body_size = 10
        sid = self.client.request(b"POST", headers=[(b"content-length", b"20000000")], end=False)
        self.assertEqual(self.client.status(sid), b"413")
        chunk = b"z" * 1_000_000
        for _ in range(DISCARD_BYTES // len(chunk) + 1):
            self.client.send(sid, chunk)
        resets = {e.stream_id: e.error_code for e in self.client.events if isinstance(e, StreamReset)}
        self.assertEqual(resets.get(sid), ErrorCodes.NO_ERROR)
        sid = self.client.request(b"POST", headers=[(b"content-length", b"20")], end=False)
        self.client.send(sid, b"z" * 20, end=True)
        self.assertEqual(self.client.status(sid), b"413")
        self.clock.advance(DISCARD_SECONDS)
        self.client.pump()
        self.assertNotIn(sid, {e.stream_id for e in self.client.events if isinstance(e, StreamReset)})
        self.assertEqual(self.proto.streams, {})

    def test_host_disagreeing_with_authority(self) -> None:
        sid = self.client.request(headers=[(b"host", b"other.test")])
        self.assertEqual(self.client.status(sid), b"400")
        sid = self.client.request(authority=b"other.test")
        self.assertEqual(self.client.status(sid), b"421")
        sid = self.client.request(b"CONNECT")
        self.assertEqual(self.client.status(sid), b"501")
        self.assertEqual(self.endpoint.attempts, [])

    def test_header_injection_refused(self) -> None:
        """
        h2 carries any bytes in a header; CR, LF or NUL would split the
        HTTP/1.1 request to the backend (and a colon in a name forge one):
        400, never forwarded.
        """
        for header in [(b"x-a", b"1\r\nX-Forwarded-For: 6.6.6.6"), (b"x-b\nx-c", b"1"), (b"x-d:e", b"1"),
                       (b"x-f", b"a\0b")]:
            sid = self.client.request(headers=[header])
            self.assertEqual(self.client.status(sid), b"400", header)
        self.assertEqual(self.endpoint.attempts, [])

    def test_reset_abandons_backend(self) -> None:
        """A stream the client resets closes its backend connection, at once."""
        sid = self.client.request()
        backend, bwire = self.backend()
        self.client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        self.client.pump()
        self.assertTrue(bwire.disconnecting)
        self.assertEqual(self.proto.streams, {})
        # Resetting while the backend connection is still being made cancels it.
        sid = self.client.request()
        self.client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        self.client.pump()
        self.assertTrue(self.endpoint.attempts[-1][1].called)
        self.assertEqual(self.pool.outstanding, 0)

    def test_rapid_reset(self) -> None:
        """More than MAX_RESETS resets within the window: GOAWAY, closed."""
        for _ in range(MAX_RESETS + 1):
            sid = self.client.request()
            self.client.h2.reset_stream(sid, ErrorCodes.CANCEL)
            self.client.pump()
        (goaway,) = [e for e in self.client.events if isinstance(e, ConnectionTerminated)]
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.client.wire.disconnecting)
        self.assertEqual(self.proxy.events["h2-rapid-reset"], 1)

    def test_response_flow_control(self) -> None:
        """
        A client whose window is small gets the response as it reopens it;
        meanwhile, past QUEUE_HIGH queued bytes, the backend is paused.
        """
        client = self.connect(window=1000)
        sid = client.request()
        backend, bwire = self.backend()
        size = QUEUE_HIGH + 100_000
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        backend.dataReceived(b"z" * (size - 10))
        client.pump()
        self.assertEqual(len(client.body(sid)), 1000)
        self.assertEqual(bwire.producerState, "paused")
        client.h2.increment_flow_control_window(size, stream_id=sid)
        client.h2.increment_flow_control_window(size)
        client.pump()
        self.assertEqual(bwire.producerState, "producing")
        backend.dataReceived(b"z" * 10)
        client.pump()
        self.assertEqual(len(client.body(sid)), size)
        self.assertTrue(client.of(sid, StreamEnded))

    def test_backend_failures(self) -> None:
        """Down: 502 on that stream. Cut mid-body: RST_STREAM on that stream only."""
        sid = self.client.request()
        self.endpoint.attempts[-1][1].errback(ConnectionRefusedError())
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"502")
        sid = self.client.request()
        backend, bwire = self.backend()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        backend.connectionLost()
        self.client.pump()
        resets = {e.stream_id: e.error_code for e in self.client.events if isinstance(e, StreamReset)}
        self.assertEqual(resets[sid], ErrorCodes.INTERNAL_ERROR)
        self.assertFalse(self.client.wire.disconnecting)

    def test_idle_connection_closed(self) -> None:
        sid = self.client.request()
        backend, _ = self.backend()
        backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.client.pump()
        self.clock.advance(59)
        self.assertFalse(self.client.wire.disconnecting)
        self.clock.advance(2)
        self.client.pump()
        self.assertTrue(self.client.wire.disconnecting)
        self.assertTrue([e for e in self.client.events if isinstance(e, ConnectionTerminated)])
        self.assertEqual(self.proxy.events["idle-timeout"], 1)

    def test_settings(self) -> None:
        """The edge announces its stream cap and large windows for bulk transfers."""
        remote = self.client.h2.remote_settings
        self.assertEqual(remote[SettingCodes.MAX_CONCURRENT_STREAMS], 100)
        self.assertGreaterEqual(remote[SettingCodes.INITIAL_WINDOW_SIZE], 1 << 20)


class WebSocketOverH2Tests(H2TestCase):
    """RFC 8441: a WebSocket on an HTTP/2 stream, an HTTP/1.1 upgrade at the backend."""

    def open(self) -> tuple[int, Any, StringTransport, bytes]:
        sid = self.client.request(b"CONNECT", b"/chat", headers=[
            (b":protocol", b"websocket"), (b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat"),
            (b"sec-websocket-key", b"client-chosen"),
        ], end=False)
        backend, bwire = self.backend()
        sent = bwire.value()
        bwire.clear()
        key = [line.split(b": ", 1)[1] for line in sent.split(b"\r\n") if line.startswith(b"sec-websocket-key: ")]
        self.assertEqual(len(key), 1, sent)
        return sid, backend, bwire, sent

    def test_settings_announce_extended_connect(self) -> None:
        self.assertEqual(self.client.h2.remote_settings[SettingCodes.ENABLE_CONNECT_PROTOCOL], 1)

    def test_relayed_as_an_upgrade(self) -> None:
        """
        The backend gets a GET with the RFC 6455 upgrade headers and a key
        of the edge's own; after its 101 (with the matching accept) the
        stream answers 200 and carries the bytes both ways; the client
        ending the stream closes the backend connection, and the backend
        closing ends the stream.
        """
        sid, backend, bwire, sent = self.open()
        self.assertTrue(sent.startswith(b"GET /chat HTTP/1.1\r\n"), sent)
        for line in (b"Connection: Upgrade\r\n", b"Upgrade: websocket\r\n", b"sec-websocket-version: 13\r\n",
                     b"sec-websocket-protocol: chat\r\n", b"Host: shop.test\r\n"):
            self.assertIn(line, sent)
        self.assertNotIn(b"client-chosen", sent)
        key = [line.split(b": ", 1)[1] for line in sent.split(b"\r\n") if line.startswith(b"sec-websocket-key: ")][0]
        backend.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\nSec-WebSocket-Protocol: chat\r\n\r\nfirst"
        )
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"200")
        (response,) = self.client.of(sid, ResponseReceived)
        names = dict(response.headers)
        self.assertEqual(names[b"sec-websocket-protocol"], b"chat")
        self.assertNotIn(b"sec-websocket-accept", names)
        self.assertNotIn(b"upgrade", names)
        self.assertEqual(self.client.body(sid), b"first")
        backend.dataReceived(b"\x81\x02hi")
        self.client.pump()
        self.assertEqual(self.client.body(sid), b"first\x81\x02hi")
        self.client.send(sid, b"\x81\x82mask")
        self.assertEqual(bwire.value(), b"\x81\x82mask")
        self.assertEqual(self.proxy.upgrades["switched"], 1)
        self.assertEqual(len(self.proxy.tunnels), 1)
        self.client.send(sid, b"", end=True)
        self.assertTrue(bwire.disconnecting)
        backend.connectionLost()
        self.client.pump()
        self.assertTrue(self.client.of(sid, StreamEnded))
        self.assertEqual(self.proto.streams, {})
        self.assertEqual(self.proxy.tunnels, set())

    def test_backend_closes_first(self) -> None:
        sid, backend, bwire, sent = self.open()
        key = [line.split(b": ", 1)[1] for line in sent.split(b"\r\n") if line.startswith(b"sec-websocket-key: ")][0]
        backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n\r\n")
        backend.connectionLost()
        self.client.pump()
        self.assertTrue(self.client.of(sid, StreamEnded))
        self.client.send(sid, b"", end=True)
        self.assertEqual(self.proto.streams, {})

    def test_wrong_accept_is_502(self) -> None:
        sid, backend, bwire, sent = self.open()
        backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: forged\r\n\r\n")
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"502")
        self.assertTrue(bwire.disconnecting)
        self.assertEqual(self.proxy.upgrades["failed"], 1)

    def test_refused_websocket_is_an_answer(self) -> None:
        """A backend that answers 403 instead of 101: the client gets the 403."""
        sid, backend, bwire, sent = self.open()
        backend.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"403")
        self.assertEqual(self.client.body(sid), b"no")

    def test_other_protocols_refused(self) -> None:
        sid = self.client.request(b"CONNECT", b"/x", headers=[(b":protocol", b"something")], end=False)
        self.assertEqual(self.client.status(sid), b"501")


class ContentLengthTests(H2TestCase):
    """RFC 9113 8.1.1: a body that disagrees with Content-Length is a stream error, not a connection one."""

    def test_short_body(self) -> None:
        sid = self.client.request(b"POST", headers=[(b"content-length", b"10")], end=False)
        backend, bwire = self.backend()
        other = self.client.request()
        self.client.send(sid, b"abc", end=True)
        resets = {e.stream_id: e.error_code for e in self.client.events if isinstance(e, StreamReset)}
        self.assertEqual(resets.get(sid), ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(bwire.disconnecting)
        self.assertEqual(self.proxy.events["h2-malformed"], 1)
        self.assertEqual([e for e in self.client.events if isinstance(e, ConnectionTerminated)], [])
        backend2, _ = self.backend()
        backend2.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.client.pump()
        self.assertEqual(self.client.status(other), b"204")

    def test_long_body(self) -> None:
        sid = self.client.request(b"POST", headers=[(b"content-length", b"2")], end=False)
        backend, bwire = self.backend()
        bwire.clear()
        self.client.send(sid, b"abc")
        resets = {e.stream_id: e.error_code for e in self.client.events if isinstance(e, StreamReset)}
        self.assertEqual(resets.get(sid), ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(bwire.value(), b"")  # nothing of it forwarded
        self.assertEqual([e for e in self.client.events if isinstance(e, ConnectionTerminated)], [])

    def test_answered_then_short(self) -> None:
        """After a 413, a client ending its upload short (as curl does) is fine."""
        self.proxy.max_body_size = 10
        sid = self.client.request(b"POST", headers=[(b"content-length", b"100")], end=False)
        self.assertEqual(self.client.status(sid), b"413")
        self.client.send(sid, b"x" * 5, end=True)
        self.assertEqual([e for e in self.client.events if isinstance(e, (ConnectionTerminated, StreamReset))], [])
        self.assertEqual(self.proto.streams, {})


class ReviewRegressionTests(H2TestCase):
    """Defects a review found, each reproduced first."""

    def accept_for(self, sent: bytes) -> bytes:
        key = [line.split(b": ", 1)[1] for line in sent.split(b"\r\n") if line.startswith(b"sec-websocket-key: ")][0]
        return websocket_accept(key)

    def open_websocket(self) -> tuple[int, Any, StringTransport, bytes]:
        sid = self.client.request(b"CONNECT", b"/chat", headers=[(b":protocol", b"websocket"),
                                                              (b"sec-websocket-version", b"13")], end=False)
        backend, bwire = self.backend()
        sent = bwire.value()
        bwire.clear()
        return sid, backend, bwire, sent

    def test_websocket_bytes_before_101_are_held(self) -> None:
        """
        Bytes a client sends on a WebSocket stream before the backend's 101
        never enter the HTTP/1.1 connection (the backend would read them
        as a request of the client's making); a declined upgrade's
        connection is not pooled; an accepted one gets them first.
        """
        sid, backend, bwire, sent = self.open_websocket()
        self.client.send(sid, b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n")
        self.assertEqual(bwire.value(), b"")
        backend.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        self.client.pump()
        self.assertEqual(self.client.status(sid), b"404")
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertTrue(bwire.disconnecting)
        sid, backend, bwire, sent = self.open_websocket()
        self.client.send(sid, b"early")
        backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + self.accept_for(sent) + b"\r\n\r\n")
        self.assertEqual(bwire.value(), b"early")

    def test_content_length_without_body(self) -> None:
        for name in (b"content-length", b"Content-Length"):
            sid = self.client.request(b"GET", headers=[(name, b"5")], end=True)
            self.assertEqual(self.client.status(sid), b"400", name)
        self.assertEqual(self.endpoint.attempts, [])

    def test_bad_method_or_path(self) -> None:
        for method, path in ((b"GET /x HTTP/1.1\r\n", b"/"), (b"G T", b"/"), (b"GET", b"/a b"), (b"GET", b"/\x7f")):
            sid = self.client.request(method, path)
            self.assertEqual(self.client.status(sid), b"400", (method, path))
        self.assertEqual(self.endpoint.attempts, [])

    def test_cancelled_paused_uploads_give_the_window_back(self) -> None:
        self.proxy.max_body_size = 0
        for _ in range(40):  # 20 MB: more than the connection's window, were it never given back
            sid = self.client.request(b"POST", end=False)
            backend, bwire = self.backend()
            bwire.producer.pauseProducing()
            self.client.send(sid, b"u" * 500_000)
            self.client.h2.reset_stream(sid, ErrorCodes.CANCEL)
            self.client.pump()
        # h2 sends WINDOW_UPDATE in batches of half the window: what is
        # given back may lag by that much, never more.
        self.assertGreater(self.client.h2.outbound_flow_control_window, 7 << 20)

    def test_close_unregisters_and_aborts_late(self) -> None:
        """
        Closing (idle, GOAWAY) unregisters the protocol as the transport's
        producer (a TLS transport waits for that before it closes), and
        aborts a client that never takes the last bytes.
        """
        self.clock.advance(61)
        self.assertIsNone(self.client.wire.producer)
        self.assertTrue(self.client.wire.disconnecting)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.client.wire.disconnected)  # aborted

    def test_websocket_idle_timeout_forgets_the_tunnel(self) -> None:
        self.proxy.websocket_idle_timeout = 30
        sid, backend, bwire, sent = self.open_websocket()
        backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + self.accept_for(sent) + b"\r\n\r\n")
        self.assertEqual(len(self.proxy.tunnels), 1)
        self.clock.advance(31)
        backend.connectionLost()
        self.client.pump()
        self.assertEqual(self.proxy.tunnels, set())
        self.assertEqual(self.proto.streams, {})

    def test_idle_timer_after_a_stream_gone_at_once(self) -> None:
        sid = self.client.request(authority=b"other.test", end=False)  # 421 at once
        self.client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        self.client.pump()
        self.assertEqual(self.proto.streams, {})
        self.clock.advance(61)
        self.assertTrue(self.client.wire.disconnecting)

    def test_discard_budget_shuts_the_window(self) -> None:
        """
        Past the discard budget, while the answer is still queued (the
        client reads nothing), the stream's bytes are no longer
        acknowledged: the client cannot go on uploading through the edge.
        """
        client = self.connect(window=50)  # the 413's body cannot go out
        self.proxy.max_body_size = 10
        sid = client.request(b"POST", headers=[(b"content-length", b"100000000")], end=False)
        before = len([e for e in client.events if isinstance(e, WindowUpdated) and e.stream_id == sid])
        chunk = b"d" * 900_000
        sent = 0
        while sent < DISCARD_BYTES + 2_000_000 and client.h2.local_flow_control_window(sid) >= len(chunk):
            client.send(sid, chunk)
            sent += len(chunk)
        self.assertLess(sent, DISCARD_BYTES + 2_000_000)  # the window shut
        self.assertGreater(len([e for e in client.events if isinstance(e, WindowUpdated) and e.stream_id == sid]),
                           before)
