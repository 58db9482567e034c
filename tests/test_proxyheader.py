"""
Tests for L{tenantedge.proxyheader}: the PROXY protocol (v1 and v2) in
front of the ClientHello sniffer and port 80, driven on
C{StringTransport}s with a memory clock. The real-socket test (a PROXY
header, then a real TLS handshake for a new name) is in
C{tests/test_e2e.py}.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.proxyheader import ProxyHeaderFactory, split_proxy_prefix

LB = IPv4Address("TCP", "10.0.0.2", 51000)


def v1(source: str = "203.0.113.9", dest: str = "192.0.2.1", family: str = "TCP4") -> bytes:
    return f"PROXY {family} {source} {dest} 40001 443\r\n".encode()


def v2(source: str = "203.0.113.9", dest: str = "192.0.2.1", command: int = 1, tlvs: bytes = b"") -> bytes:
    if ":" in source:
        addresses = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, dest)
        family = 0x21
    else:
        addresses = socket.inet_aton(source) + socket.inet_aton(dest)
        family = 0x11
    body = addresses + struct.pack("!HH", 40001, 443) + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


class Recorder(Protocol):
    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.received = b""
        self.peer: Any = None
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self, refuse: bool = False) -> None:
        self.built: list[Recorder] = []
        self.refuse = refuse

    def buildProtocol(self, addr: Any) -> Recorder | None:  # type: ignore[override]
        if self.refuse:
            return None
        proto = Recorder(addr)
        self.built.append(proto)
        return proto


class ProxyHeaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.events: Counter[str] = Counter()
        self.app = RecordingFactory()
        self.factory = ProxyHeaderFactory(self.app, self.clock, 10.0, self.events)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(LB)
        transport = StringTransport(peerAddress=LB, hostAddress=IPv4Address("TCP", "10.0.0.1", 443))
        proto.makeConnection(transport)
        return proto, transport

    def assertRefused(self, transport: StringTransport, kind: str = "proxy-header-invalid") -> None:
        self.assertTrue(transport.disconnected)  # aborted, not closed politely
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.app.built, [])
        self.assertEqual(self.events, {kind: 1})

    def test_v1(self) -> None:
        """
        The application's protocol is built after the header, for the
        client's address; it sees the client as its peer and the bytes
        after the header; its writes reach the socket.
        """
        proto, transport = self.connect()
        self.assertEqual(self.app.built, [])
        proto.dataReceived(v1() + b"\x16\x03\x01rest")
        [app] = self.app.built
        self.assertEqual(app.addr, IPv4Address("TCP", "203.0.113.9", 40001))
        self.assertEqual(app.peer, app.addr)
        self.assertEqual(proto.getHost(), IPv4Address("TCP", "192.0.2.1", 443))
        self.assertEqual(app.received, b"\x16\x03\x01rest")
        self.assertEqual(transport.value(), b"hello")
        proto.dataReceived(b"more")
        self.assertEqual(app.received, b"\x16\x03\x01restmore")
        self.assertEqual(self.events, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the header deadline is gone

    def test_v1_ipv6_byte_by_byte(self) -> None:
        """A header split anywhere (even its first bytes) is read whole."""
        proto, _transport = self.connect()
        for byte in v1("2001:db8::5", "2001:db8::1", "TCP6"):
            proto.dataReceived(bytes([byte]))
        [app] = self.app.built
        self.assertEqual(app.addr, IPv6Address("TCP", "2001:db8::5", 40001))

    def test_v2(self) -> None:
        proto, _transport = self.connect()
        header = v2("2001:db8::5", "2001:db8::1", tlvs=b"\x04\x00\x01x")
        proto.dataReceived(header[:10])
        proto.dataReceived(header[10:] + b"data")
        [app] = self.app.built
        self.assertEqual(app.addr, IPv6Address("TCP", "2001:db8::5", 40001))
        self.assertEqual(app.received, b"data")

    def test_v2_local(self) -> None:
        """A LOCAL header (the balancer's own health check) is the balancer's connection."""
        proto, _transport = self.connect()
        header = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
        proto.dataReceived(header)
        [app] = self.app.built
        self.assertEqual(app.addr, LB)

    def test_missing_header(self) -> None:
        """A ClientHello with no PROXY header before it: aborted at once, never served."""
        proto, transport = self.connect()
        proto.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertRefused(transport)

    def test_garbled(self) -> None:
        for garbled in (b"PROXY TCP4 nonsense\r\n", b"PROXY TCP4 evil 192.0.2.1 1 443\r\n",
                        b"PROXY TCP6 203.0.113.9 192.0.2.1 1 443\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 x 443\r\n",
                        b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 443\r\n", b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY " + b"x" * 200,
                        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x02ab", b"\r\n\r\n\x00\r\nQUIT\n\x30\x11\x00\x00"):
            self.events.clear()
            proto, transport = self.connect()
            proto.dataReceived(garbled)
            self.assertRefused(transport)

    def test_deadline(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"PROXY TCP4 1.2.")
        self.clock.advance(10)
        self.assertRefused(transport, "proxy-header-timeout")

    def test_application_refuses(self) -> None:
        """A factory that refuses the client (a connection cap) gets the connection aborted."""
        self.app.refuse = True
        proto, transport = self.connect()
        proto.dataReceived(v1())
        self.assertTrue(transport.disconnected)

    def test_lost_after_header(self) -> None:
        proto, _transport = self.connect()
        proto.dataReceived(v1())
        proto.connectionLost(None)
        self.assertTrue(self.app.built[0].lost)

    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        """Whatever arrives, the wrapper serves a parsed header or aborts; it never raises."""
        self.events.clear()
        self.app.built.clear()
        proto, transport = self.connect()
        proto.dataReceived(data)
        self.assertTrue(self.app.built or transport.disconnected or not self.events)

    def test_prefix(self) -> None:
        self.assertEqual(split_proxy_prefix("haproxy:tcp:443"), (True, "tcp:443"))
        self.assertEqual(split_proxy_prefix("tcp:443"), (False, "tcp:443"))


class BehindTheBalancerTests(SynchronousTestCase):
    """The sniffer behind the PROXY header keys its per-address cap on the client, not the balancer."""

    def test_per_address_cap_counts_clients(self) -> None:
        from tenantedge.testing import ControlledIssuer, MemoryStore, memory_resolver
        from tenantedge.policy import EdgePolicy, StaticPolicy
        from tenantedge.tls import OnDemandTLSFactory

        clock = MemoryReactorClock()
        resolver = memory_resolver(MemoryStore(), EdgePolicy(StaticPolicy.from_config(deny=[], allow_suffixes=[".test"])),
                                   ControlledIssuer(), clock)
        tls = OnDemandTLSFactory(resolver, Factory.forProtocol(Protocol), clock, max_per_address=1)
        factory = ProxyHeaderFactory(tls, clock, 10.0, Counter())
        transports = []
        for client in ("203.0.113.9", "203.0.113.10", "203.0.113.9"):
            proto = factory.buildProtocol(LB)
            transport = StringTransport(peerAddress=LB)
            proto.makeConnection(transport)
            proto.dataReceived(v1(client))
            transports.append(transport)
        self.assertEqual([t.disconnected for t in transports], [False, False, True])
        self.assertEqual(tls.events["refused-address-full"], 1)
        self.assertEqual(dict(tls.per_address), {"203.0.113.9": 1, "203.0.113.10": 1})


class WiringTests(SynchronousTestCase):
    """haproxy: in --https/--http, with one process or with --workers."""

    def test_workers_bind_the_inner_socket(self) -> None:
        from tenantedge.workers import bind_listening_socket

        sock = bind_listening_socket("haproxy:tcp:0:interface=127.0.0.1", "tenant traffic")
        self.addCleanup(sock.close)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")

    def test_adopted_endpoints_wrapped(self) -> None:
        """A worker's adopted sockets get the PROXY header reader when the description asks for it."""
        import os

        from twisted.internet.testing import MemoryReactorClock

        from tenantedge.config import OnDemandConfig
        from tenantedge.proxyheader import ProxyHeaderEndpoint
        from tenantedge.tap import build_edge

        config = OnDemandConfig(ca=["internal"], store=os.path.abspath(self.mktemp()),
                                https="haproxy:tcp:0:interface=127.0.0.1", http="tcp:0:interface=127.0.0.1",
                                admin=None, hello_timeout=4)
        adopted = {"https": object(), "http": object()}
        edge = build_edge(config, MemoryReactorClock(), endpoints=adopted)  # type: ignore[arg-type]
        https = edge.listeners["https"].endpoint
        assert isinstance(https, ProxyHeaderEndpoint)
        self.assertIs(https.wrapped, adopted["https"])
        self.assertEqual(https.timeout, 4)
        self.assertIs(edge.listeners["http"].endpoint, adopted["http"])
