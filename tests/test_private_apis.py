"""
The Twisted private names tenantedge still relies on, pinned: each test
fails loudly if Twisted renames or changes one, instead of tenantedge
quietly misbehaving. Each use carries a comment saying why no public way
exists.
"""

from __future__ import annotations

import os
from typing import Any
from unittest.mock import MagicMock

from twisted.internet.defer import Deferred
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from tenantedge.pools import _QuietClientFactory, quiet_pool
from tenantedge.testing import write_https_material
from tenantedge.trust import PlatformTrustPlus


class _RecordingEndpoint:
    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


class PrivateAPITests(SynchronousTestCase):
    def test_pool_factory_class(self) -> None:
        """
        HTTPConnectionPool._factory is the class it builds per connection;
        quiet_pool's subclass of _HTTP11ClientFactory is what it uses.
        """
        self.assertTrue(hasattr(HTTPConnectionPool, "_factory"))
        pool = quiet_pool(HTTPConnectionPool(MemoryReactorClock()))
        endpoint = _RecordingEndpoint()
        pool.getConnection(("http", b"backend", 80), endpoint)
        [factory] = endpoint.factories
        self.assertIsInstance(factory, _QuietClientFactory)
        self.assertFalse(factory.noisy)

    def test_trust_root_interface(self) -> None:
        """
        twisted.internet._sslverify.IOpenSSLTrustRoot (no public alias) is
        what CertificateOptions adapts a trust root to, and it calls our
        _addCACertsToContext.
        """
        from twisted.internet._sslverify import IOpenSSLTrustRoot

        directory = self.mktemp()
        os.makedirs(directory)
        ca, _, _ = write_https_material(directory)
        root = PlatformTrustPlus([ca])
        self.assertTrue(IOpenSSLTrustRoot.providedBy(root))
        calls: list[Any] = []
        original = root._addCACertsToContext
        root._addCACertsToContext = lambda context: (calls.append(context), original(context))  # type: ignore[method-assign]
        CertificateOptions(trustRoot=root).getContext()
        self.assertEqual(len(calls), 1)


class HAProxyParserTests(SynchronousTestCase):
    """
    L{tenantedge.proxyheader} reads PROXY headers with Twisted's private
    parsers: C{feed} returns (info, rest) or (None, None), keeps what it
    has in C{buffer}, raises C{InvalidProxyHeader}; the v2 signature is
    C{V2Parser.PREFIX}.
    """

    def test_parsers(self) -> None:
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
        from twisted.protocols.haproxy._v1parser import V1Parser
        from twisted.protocols.haproxy._v2parser import V2Parser

        self.assertEqual(V2Parser.PREFIX, b"\r\n\r\n\x00\r\nQUIT\n")
        parser = V1Parser()
        self.assertEqual(parser.feed(b"PROXY TCP4 1.2.3.4 "), (None, None))
        self.assertEqual(parser.buffer, b"PROXY TCP4 1.2.3.4 ")
        info, rest = parser.feed(b"5.6.7.8 1000 443\r\nrest")
        self.assertEqual((info.source.host, info.source.port, rest), ("1.2.3.4", 1000, b"rest"))
        self.assertRaises(InvalidProxyHeader, V1Parser().feed, b"PROXY TCP9 1 2 3 4\r\n")
        self.assertRaises(InvalidProxyHeader, V2Parser().feed, V2Parser.PREFIX + b"\x30\x11\x00\x00")


class H2PrivateAPITests(SynchronousTestCase):
    """
    L{tenantedge.http2} turns h2's own Content-Length check off per stream
    (it is a connection error there; RFC 9113 wants a stream error, which
    the edge gives itself) by clearing C{H2Stream._expected_content_length}.
    """

    def test_expected_content_length(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.exceptions import ProtocolError

        def exchange(clear: bool) -> None:
            client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
            client.initiate_connection()
            server.initiate_connection()
            server.receive_data(client.data_to_send())
            client.receive_data(server.data_to_send())
            client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                                    (b":authority", b"a.test"), (b"content-length", b"10")])
            server.receive_data(client.data_to_send())
            self.assertEqual(server.streams[1]._expected_content_length, 10)
            if clear:
                server.streams[1]._expected_content_length = None
            client.send_data(1, b"abc", end_stream=True)
            server.receive_data(client.data_to_send())

        self.assertRaises(ProtocolError, exchange, False)  # h2's own check, a connection error
        exchange(True)  # cleared: no error from h2

    def test_data_frame_repr(self) -> None:
        """
        h2 formats every received frame with C{repr} (for a trace log), and
        C{tenantedge.http2._H2Connection} makes a DATA frame's cheap by
        setting C{_body_repr} on the instance.
        """
        import inspect

        from h2.connection import H2Connection
        from hyperframe.frame import DataFrame

        self.assertIn("repr(frame)", inspect.getsource(H2Connection._receive_frame))
        frame = DataFrame(1, data=b"x" * 16384)
        frame._body_repr = lambda: "data=..."
        self.assertEqual(repr(frame), "DataFrame(stream_id=1, flags=[]): data=...")



class TwistedWebPrivateAPITests(SynchronousTestCase):
    """
    twisted.web's HTTP/2 stream keeps its connection as C{H2Stream._conn}
    (no public attribute): L{tenantedge.tls.tls_server_name} walks it to
    the TLS connection's chosen name, and the embedders' L{ProxyResource}
    request tells HTTP/2 from HTTP/1.1 by it (L{tenantedge.proxy}).
    """

    def test_h2stream_conn(self) -> None:
        from twisted.web._http2 import H2Stream

        connection = object()
        stream = H2Stream(1, connection, [], lambda *a, **k: MagicMock(), None, None)  # type: ignore[arg-type]
        self.assertIs(stream._conn, connection)

    def test_tls_server_name_through_h2(self) -> None:
        """request.channel (an H2Stream) -> _conn -> transport (the edge's TLS protocol) -> its name."""
        from twisted.web._http2 import H2Stream

        from tenantedge.tls import tls_server_name

        class TLS:
            tenantedge_server_name = "shop.test"

        class Connection:
            transport = TLS()

        class Request:
            channel = H2Stream(1, Connection(), [], lambda *a, **k: MagicMock(), None, None)  # type: ignore[arg-type]

        self.assertEqual(tls_server_name(Request()), "shop.test")


class ClientParserPrivateAPITests(SynchronousTestCase):
    """
    The embedders' L{ProxyResource} reads the backend's C{Connection:}
    tokens from Twisted's HTTP/1.1 client parser (C{connHeaders}), reached
    through the response's private transport (L{tenantedge.proxy.
    _connection_headers}); if Twisted changed that path, the backend's
    connection-specific headers would be forwarded. Pinned on a real
    client connection over a memory transport.
    """

    def test_connection_headers(self) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.web._newclient import HTTP11ClientProtocol, Request
        from twisted.web.http_headers import Headers

        from tenantedge.proxy import _connection_headers

        protocol = HTTP11ClientProtocol()
        transport = StringTransport()
        transport.protocol = protocol  # type: ignore[attr-defined]  # as a TCP transport has it
        protocol.makeConnection(transport)
        found: list[Any] = []
        d = protocol.request(Request(b"GET", b"/", Headers({b"host": [b"backend"]}), None))
        # Read as ProxyResource does: when the response head is in.
        d.addCallback(lambda response: found.append(_connection_headers(response)))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: s\r\n"
                              b"Content-Length: 2\r\n\r\nok")
        [headers] = found
        self.assertIsNotNone(headers)
        assert headers is not None
        self.assertEqual(headers.getRawHeaders(b"connection"), [b"X-Internal"])


class ReactorPrivateAPITests(SynchronousTestCase):
    def test_epoll_poller(self) -> None:
        """
        L{tenantedge.workers.fresh_reactor} closes the inherited reactor's
        epoll descriptor as C{EPollReactor._poller} (a forked worker must
        not keep the parent's); renamed, it would leak one descriptor.
        """
        import select

        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        try:
            self.assertIsInstance(reactor._poller, select.epoll)
        finally:
            reactor._poller.close()
            for reader in (reactor.waker,):
                reader.connectionLost(None)

    def test_server_from_string_frame(self) -> None:
        """
        The endpoint parser reads the whole description back from
        C{serverFromString}'s frame (its C{description} argument), because
        Twisted hands plugins a dict in which a repeated key keeps only its
        last value (L{tenantedge.endpoint._items_from_caller}).
        """
        from twisted.internet import endpoints

        code = endpoints.serverFromString.__code__
        self.assertEqual(code.co_varnames[:2], ("reactor", "description"))
