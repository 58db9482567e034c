"""
The application protocol the HTTPS listener wraps: after the TLS handshake,
ALPN picks HTTP/2 (L{tenantedge.http2}) or HTTP/1.1 (L{tenantedge.http1}),
both relaying through one L{tenantedge.exchange.Relay}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .exchange import Relay
from .http1 import H1ProxyProtocol
from .http2 import H2ProxyProtocol

__all__ = ["EdgeHTTPFactory"]


@implementer(IHandshakeListener)
class _ALPNDispatch(Protocol):
    """
    The first protocol on a TLS connection: once the handshake is done, it
    puts the right one in its place, the fast HTTP/1.1 relay or the
    twisted.web channel (HTTP/2).
    """

    def __init__(self, factory: EdgeHTTPFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr

    def handshakeCompleted(self) -> None:
        self._choose()

    def dataReceived(self, data: bytes) -> None:
        real = self._choose()
        if real is not None:
            real.dataReceived(data)

    def _choose(self) -> Any:
        tls = self.transport
        if getattr(tls, "wrappedProtocol", None) is not self:
            return getattr(tls, "wrappedProtocol", None)
        negotiated = getattr(tls, "negotiatedProtocol", None)
        name = str(getattr(tls, "tenantedge_server_name", ""))
        if negotiated == b"h2":
            real: Protocol = H2ProxyProtocol(self.factory.proxy, name)
        else:
            real = H1ProxyProtocol(self.factory.proxy, name)
        tls.wrappedProtocol = real  # type: ignore[union-attr]
        real.makeConnection(tls)
        if IHandshakeListener.providedBy(real):
            real.handshakeCompleted()
        return real

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        pass


class EdgeHTTPFactory(Factory):
    """
    The application factory the HTTPS listener wraps: by ALPN, HTTP/1.1
    (L{H1ProxyProtocol}) or HTTP/2 (L{tenantedge.http2.H2ProxyProtocol}),
    both relaying to C{proxy}'s backend.
    """

    noisy = False

    def __init__(self, proxy: Relay) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> _ALPNDispatch:
        return _ALPNDispatch(self, addr)
