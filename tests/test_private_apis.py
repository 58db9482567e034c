"""
The Twisted private names tenantedge still relies on, pinned: each test
fails loudly if Twisted renames or changes one, instead of tenantedge
quietly misbehaving. Each use carries a comment saying why no public way
exists. (The backend's Connection tokens, read from the HTTP client's
parser in L{tenantedge.proxy}, are pinned end to end by
C{tests.test_e2e.ProxyTests.test_backend_hop_by_hop_dropped}.)
"""

from __future__ import annotations

import os
from typing import Any

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

