"""
Tests for L{tenantedge.tls}: the ClientHello sniffer that holds a
connection while its certificate is obtained, then starts TLS on it.
"""

from __future__ import annotations

import datetime
import os
import time

from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.localca import LocalCA
from tenantedge.policy import EdgePolicy, StaticPolicy
from tenantedge.testing import ControlledIssuer, MemoryStore, memory_resolver
from tenantedge.tls import (
    ALERT_DECODE_ERROR,
    ALERT_INTERNAL_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    OnDemandTLSFactory,
    alert_record,
)

from .test_clienthello import alpn, build_hello, captured, sni


class Echo(Protocol):
    """Server application: echoes, and remembers the negotiated ALPN."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.handshake_done = False

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _Settle:
    """
    Pumps bytes both ways and runs the clock's zero-delay calls (TLS
    write aggregation) until nothing moves.
    """

    def __init__(self, pump: iosim.IOPump, clock: MemoryReactorClock) -> None:
        self.pump = pump
        self.clock = clock

    def flush(self) -> None:
        for _ in range(20):
            moved = self.pump.pump()
            self.clock.advance(0)
            if not moved and not any(c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls()):
                if not self.pump.pump():
                    return


class SnifferTestsMixin:
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        # Real time: the in-memory TLS client checks validity against it.
        self.clock.advance(time.time())
        self.ca = LocalCA(os.path.join(self.mktemp(), "ca"), self.clock, datetime.timedelta(days=7))
        self.ca.prepare()
        self.issuer = ControlledIssuer()
        self.store = MemoryStore()
        self.resolver = memory_resolver(
            self.store,
            EdgePolicy(StaticPolicy.from_config(deny=["denied.test"], allow_suffixes=[".test"])),
            self.issuer,
            self.clock,
        )
        self.factory = OnDemandTLSFactory(
            self.resolver, Factory.forProtocol(Echo), self.clock, hello_timeout=10, resolve_timeout=30
        )

    def connect(self) -> tuple[Protocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


class RefusalTests(SnifferTestsMixin, SynchronousTestCase):
    """
    Hellos that cannot get a certificate end with an alert, fast, and touch
    neither the store nor the issuer.
    """

    def assertAlert(self, data: bytes, alert: int | None, kind: str) -> StringTransport:
        proto, transport = self.connect()
        proto.dataReceived(data)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), alert_record(alert) if alert is not None else b"")
        self.assertEqual(self.factory.events[kind], 1)
        self.assertEqual(self.store.calls["get"], 0)
        self.assertEqual(self.issuer.requests, [])
        return transport

    def test_no_sni(self) -> None:
        self.assertAlert(captured("openssl-noservername"), ALERT_UNRECOGNIZED_NAME, "no-sni")

    def test_ip_literal(self) -> None:
        self.assertAlert(build_hello(sni(b"127.0.0.1")), ALERT_UNRECOGNIZED_NAME, "invalid-name")

    def test_hostile_name(self) -> None:
        self.assertAlert(build_hello(sni(b"../../etc/passwd")), ALERT_UNRECOGNIZED_NAME, "invalid-name")

    def test_denied(self) -> None:
        self.assertAlert(build_hello(sni(b"denied.test")), ALERT_UNRECOGNIZED_NAME, "refused")

    def test_malformed(self) -> None:
        self.assertAlert(build_hello(sni(b"a.test", b"b.test")), ALERT_DECODE_ERROR, "malformed")

    def test_not_tls(self) -> None:
        self.assertAlert(b"\x00\x01\x02garbage", None, "not-tls")

    def test_plain_http(self) -> None:
        """Plain HTTP on the HTTPS port gets a readable 400, not an alert."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b"https://", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_acme_tls_without_challenge(self) -> None:
        """
        An C{acme-tls/1}-only hello is a CA validating TLS-ALPN-01: it never
        triggers issuance, and without a pending challenge it is refused.
        """
        self.assertAlert(
            build_hello(sni(b"a.test") + alpn(b"acme-tls/1")), ALERT_UNRECOGNIZED_NAME, "acme-tls-no-challenge"
        )

    def test_hello_timeout(self) -> None:
        """A client that never finishes its hello is dropped after the timeout."""
        proto, transport = self.connect()
        proto.dataReceived(captured("curl-http1")[:100])
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.events["hello-timeout"], 1)

    def test_dribbled_records(self) -> None:
        """
        A client that splits its hello into many tiny records (each costing
        a re-scan) is refused after a few dozen, not buffered without bound.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"\x16\x03\x01\x00\x04\x01\x00\xff\xff")
        tiny = b"\x16\x03\x01\x00\x01\x00"
        for sent in range(1000):
            if transport.disconnecting:
                break
            proto.dataReceived(tiny)
        self.assertLess(sent, 40)
        self.assertEqual(transport.value(), alert_record(ALERT_DECODE_ERROR))
        self.assertEqual(self.factory.events["malformed"], 1)

    def test_issuer_failure(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(captured("curl-http1"))
        self.assertEqual(transport.value(), b"")
        self.issuer.fail_order("tenant-a.test")
        self.assertEqual(transport.value(), alert_record(ALERT_INTERNAL_ERROR))
        self.assertTrue(transport.disconnecting)

    def test_resolve_timeout(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(captured("curl-http1"))
        self.clock.advance(31)
        self.assertEqual(transport.value(), alert_record(ALERT_INTERNAL_ERROR))
        self.assertEqual(self.factory.events["timeout"], 1)

    def test_paused_while_resolving(self) -> None:
        """
        The socket is paused while the certificate is obtained and resumed
        once TLS starts; a client going away cancels only its own wait.
        """
        proto, transport = self.connect()
        proto.dataReceived(captured("curl-http1"))
        self.assertEqual(transport.producerState, "paused")
        other, other_transport = self.connect()
        other.dataReceived(captured("curl-http1"))
        proto.connectionLost(iosim.Failure(ConnectionError()))
        self.assertIsNone(proto._pending)
        self.assertTrue(self.resolver.in_flight("tenant-a.test"))
        self.assertEqual(self.issuer.requests, ["tenant-a.test"])
        self.issuer.complete("tenant-a.test", self.successResultOf(self.ca.issue("tenant-a.test")))
        # The survivor's handshake went on (ServerHello written), resumed.
        self.assertTrue(other_transport.value().startswith(b"\x16\x03\x03"))
        self.assertEqual(other_transport.producerState, "producing")
        self.assertEqual(transport.value(), b"")

    def test_tls_start_failure_ends_connection(self) -> None:
        """
        If starting TLS fails after the lookup, the connection gets an
        alert and is closed, not left paused.
        """
        self.resolver.make_context = lambda bundle: "not a context"
        proto, transport = self.connect()
        proto.dataReceived(captured("curl-http1"))
        self.issuer.complete("tenant-a.test", self.successResultOf(self.ca.issue("tenant-a.test")))
        self.assertEqual(transport.value(), alert_record(ALERT_INTERNAL_ERROR))
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors()


class HandshakeTests(SnifferTestsMixin, SynchronousTestCase):
    """
    Full in-memory handshakes: the client's very first handshake succeeds on
    the same connection after the certificate arrives.
    """

    def handshake(self, name: str, protocols: list[bytes] | None = None):
        client_options = ssl.optionsForClientTLS(
            name,
            trustRoot=ssl.Certificate.loadPEM(open(self.ca.root_path, "rb").read()),
            acceptableProtocols=protocols,
        )
        client_factory = TLSMemoryBIOFactory(
            client_options, True, Factory.forProtocol(Recorder), clock=self.clock
        )
        client = client_factory.buildProtocol(None)
        server = self.factory.buildProtocol(None)
        server_transport = iosim.FakeTransport(server, isServer=True)
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
        return client, server, _Settle(pump, self.clock)

    def test_first_handshake_waits_for_issuance(self) -> None:
        client, server, pump = self.handshake("new-tenant.test")
        pump.flush()
        self.assertEqual(client.wrappedProtocol.received, b"")
        self.assertEqual(self.issuer.requests, ["new-tenant.test"])
        self.successResultOf(self.ca.issue("new-tenant.test").addCallback(
            lambda bundle: self.issuer.complete("new-tenant.test", bundle)))
        pump.flush()
        self.assertEqual(client.wrappedProtocol.received, b"ping")
        peer = client.getPeerCertificate()
        self.assertIn("new-tenant.test", str(peer.get_subject()))

    def test_handshake_deadline(self) -> None:
        """
        A client that sends its ClientHello for a known name and then
        nothing is cut off after the hello timeout; a completed handshake
        leaves no timer behind.
        """
        self.store.bundles["slow.test"] = self.successResultOf(self.ca.issue("slow.test"))
        proto, transport = self.connect()
        proto.dataReceived(build_hello(sni(b"slow.test")))
        self.successResultOf(self.resolver.context_for("slow.test"))
        self.assertIsNotNone(proto._tls)
        self.clock.advance(self.factory.hello_timeout + 1)
        self.assertEqual(self.factory.events["handshake-timeout"], 1)
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        client, server, pump = self.handshake("slow.test")
        pump.flush()
        self.assertEqual(client.wrappedProtocol.received, b"ping")
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if "handshake" in repr(c)], []
        )

    def test_connection_caps(self) -> None:
        """
        Beyond the caps (overall, per client address) new connections get
        no protocol (closed at once); established ones are untouched, and a
        closed one frees its place.
        """
        from twisted.internet.address import IPv4Address

        self.factory.max_connections = 3
        self.factory.max_per_address = 2
        a, b = IPv4Address("TCP", "198.51.100.1", 1), IPv4Address("TCP", "198.51.100.2", 1)
        first = self.factory.buildProtocol(a)
        assert first is not None
        first.makeConnection(StringTransport())
        second = self.factory.buildProtocol(a)
        assert second is not None
        second.makeConnection(StringTransport())
        self.assertIsNone(self.factory.buildProtocol(a))
        self.assertEqual(self.factory.events["refused-address-full"], 1)
        third = self.factory.buildProtocol(b)
        assert third is not None
        third.makeConnection(StringTransport())
        self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "198.51.100.3", 1)))
        self.assertEqual(self.factory.events["refused-connections-full"], 1)
        first.connectionLost(Failure(ConnectionError()))
        self.assertIsNotNone(self.factory.buildProtocol(a))
        self.assertEqual(self.factory.per_address["198.51.100.1"], 1)

    def test_cached_handshake(self) -> None:
        self.store.bundles["cached.test"] = self.successResultOf(self.ca.issue("cached.test"))
        client, server, pump = self.handshake("cached.test", [b"h2", b"http/1.1"])
        pump.flush()
        self.assertEqual(client.wrappedProtocol.received, b"ping")
        self.assertEqual(client.negotiatedProtocol, b"h2")
        client2, _, pump2 = self.handshake("cached.test")
        pump2.flush()
        self.assertEqual(client2.wrappedProtocol.received, b"ping")
        self.assertEqual(self.store.calls["get"], 1)
        self.assertEqual(self.factory.events["cache-hit"], 1)
