"""
Behind a load balancer: the PROXY protocol (v1 and v2) on the HTTPS and
HTTP listeners, C{--https haproxy:tcp:443}.

The syntax is Twisted's own C{haproxy:} endpoint prefix, and the header is
read with Twisted's own parsers; what differs from Twisted's
C{HAProxyWrappingFactory} is when the application's protocol is made and
what happens to a bad header:

  - the application's factory builds its protocol only once the header
    has been read, with the client's address (the one in the header), so
    everything that keys on the peer sees the client, not the load
    balancer: the per-address connection cap, the ClientHello sniffer's
    log lines, C{X-Forwarded-For}, the access log;
  - a connection whose first bytes are not a PROXY header, or whose
    header is garbled, is aborted at once, before any byte reaches the
    application, and counted (C{proxy-header-invalid}); one that sends no
    complete header within the deadline too (C{proxy-header-timeout});
    Twisted's wrapper closes such connections without a trace, and
    refuses a first read shorter than 8 bytes even when a header follows;
  - once the header is read the wrapper stays in place only for
    C{getPeer}/C{getHost}; reads and writes go straight through (and the
    socket keeps tenantedge's write-through tuning).

A PROXY v2 C{LOCAL} header (a load balancer's own health check) or a v1
C{UNKNOWN} one carries no client address: the connection is served as the
load balancer's own, as the specification says.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

# Private modules: twisted.protocols.haproxy exports only proxyEndpoint,
# whose wrapper builds the application's protocol before the header is
# read (see the module docstring). The parsers are what we need from it;
# tests/test_private_apis.py pins their behaviour.
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from .writethrough import set_no_delay, write_through

__all__ = ["PREFIX", "ProxyHeaderEndpoint", "ProxyHeaderFactory", "ProxyHeaderProtocol", "split_proxy_prefix"]

#: The endpoint prefix that asks for the PROXY protocol (Twisted's name).
PREFIX = "haproxy:"

_V2_SIGNATURE = V2Parser.PREFIX
_V1_SIGNATURE = b"PROXY "
#: Longest possible header: v2's 16 fixed bytes and a 16-bit length.
MAX_HEADER = 16 + 0xFFFF


def split_proxy_prefix(description: str) -> tuple[bool, str]:
    """
    Whether an endpoint description asks for the PROXY protocol, and the
    inner description: C{("haproxy:tcp:443")} gives C{(True, "tcp:443")}.
    """
    if description.startswith(PREFIX):
        return True, description[len(PREFIX):]
    return False, description


def _checked(address: IAddress | None) -> IAddress | None:
    """
    An address from a header, checked and in canonical form (Twisted's v1
    parser takes any word for an address, its v2 parser writes IPv6
    addresses in full): what reaches X-Forwarded-For, logs and the
    per-address cap.

    @raise ValueError: for an address or port that is not one.
    """
    if address is None:
        return None
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad address {address!r}")
    parsed = ipaddress.ip_address(host)  # ValueError for a word that is no address
    if isinstance(address, IPv6Address):
        if parsed.version != 6:
            raise ValueError(f"{host!r} is not an IPv6 address")
        return IPv6Address("TCP", str(parsed), port)
    if parsed.version != 4:
        raise ValueError(f"{host!r} is not an IPv4 address")
    return IPv4Address("TCP", str(parsed), port)


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    One connection from the load balancer: reads the PROXY header, then
    hands the connection to a protocol the application's factory builds
    for the client's address.
    """

    _log = Logger()

    def __init__(self, factory: ProxyHeaderFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.wrappedProtocol = None  # type: ignore[assignment]
        self._addr = addr
        self._buffer = b""
        self._parser: V1Parser | V2Parser | None = None
        self._timer: Any = None
        self._source: IAddress | None = None
        self._destination: IAddress | None = None

    def logPrefix(self) -> str:
        return "ProxyHeaderProtocol"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        transport = self.transport
        set_no_delay(transport)
        write_through(transport)
        # Writes go straight to the socket (write-through included).
        self.write = transport.write  # type: ignore[method-assign,union-attr]
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    # -- the header ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.transport is None or self._timer is None:
            return  # refused already
        parser = self._parser
        if parser is None:
            self._buffer += data
            head = self._buffer
            if head.startswith(_V2_SIGNATURE):
                if len(head) < 16:
                    return
                parser = self._parser = V2Parser()
            elif head.startswith(_V1_SIGNATURE):
                parser = self._parser = V1Parser()
            elif _V2_SIGNATURE.startswith(head) or _V1_SIGNATURE.startswith(head):
                return  # a header's first bytes: wait for more
            else:
                self._refuse("not a PROXY protocol header")
                return
            data, self._buffer = head, b""
        try:
            info, remaining = parser.feed(data)
        except InvalidProxyHeader as e:
            self._refuse(type(e).__name__)
            return
        except Exception as e:  # untrusted bytes: any parser failure is a bad header
            self._refuse(f"{type(e).__name__}: {e}")
            return
        if info is None:
            if len(parser.buffer) > MAX_HEADER:
                self._refuse("header too long")
            return
        try:
            self._source = _checked(info.source)
            self._destination = _checked(info.destination)
        except ValueError as e:
            self._refuse(str(e))
            return
        self._cancel_timer()
        self._start(remaining or b"")

    def _start(self, remaining: bytes) -> None:
        proto = self.factory.wrapped_factory.buildProtocol(self.getPeer())
        if proto is None:
            # The application refused it (a connection cap): it counted why.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.wrappedProtocol = proto
        proto.makeConnection(self)
        # From now on the wrapped protocol reads straight from the socket.
        self.dataReceived = proto.dataReceived  # type: ignore[method-assign]
        if remaining:
            proto.dataReceived(remaining)

    def _refuse(self, reason: str) -> None:
        self.factory.events["proxy-header-invalid"] += 1
        self._log.debug("refused a connection from {peer}: bad PROXY header ({reason})",
                        peer=self._addr, reason=reason)
        self._close()

    def _timed_out(self) -> None:
        self._timer = None
        self.factory.events["proxy-header-timeout"] += 1
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        self._buffer = b""
        self._parser = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- what the application sees ------------------------------------------------------

    def getPeer(self) -> IAddress:
        """The client's address from the header (the load balancer's if it gave none)."""
        if self._source is not None:
            return self._source
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        """The address the client connected to, from the header (else this socket's)."""
        if self._destination is not None:
            return self._destination
        return self.transport.getHost()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._cancel_timer()
        proto, self.wrappedProtocol = self.wrappedProtocol, None  # type: ignore[assignment]
        if proto is not None:
            proto.connectionLost(reason)


class ProxyHeaderFactory(Factory):
    """
    Wraps the application's factory: each connection first reads a PROXY
    header (L{ProxyHeaderProtocol}).

    @ivar wrapped_factory: the application's factory.
    @ivar clock: for the header deadline.
    @ivar timeout: seconds a connection has to send its whole header.
    @ivar events: C{proxy-header-invalid} and C{proxy-header-timeout}
        counts, for metrics and the limits summary.
    """

    noisy = False

    def __init__(self, wrapped_factory: IProtocolFactory, clock: IReactorTime, timeout: float,
                 events: Counter[str]) -> None:
        self.wrapped_factory = wrapped_factory
        self.clock = clock
        self.timeout = timeout
        self.events = events

    def doStart(self) -> None:
        self.wrapped_factory.doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self, addr)


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """
    Listens on an inner endpoint; every connection starts with a PROXY
    header (L{ProxyHeaderFactory}).
    """

    def __init__(self, wrapped: IStreamServerEndpoint, clock: IReactorTime, timeout: float,
                 events: Counter[str]) -> None:
        self.wrapped = wrapped
        self.clock = clock
        self.timeout = timeout
        self.events = events

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.wrapped.listen(ProxyHeaderFactory(factory, self.clock, self.timeout, self.events))

    def __repr__(self) -> str:
        return f"haproxy:{self.wrapped!r}"
