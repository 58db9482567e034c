"""
The built-in demo backend for C{--demo}: a page that shows which tenant host
and path the edge forwarded, so a new user can see on-demand TLS and the
proxy at work without running their own application.
"""

from __future__ import annotations

import html
import json
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["DemoBackend", "DemoBackendService"]


class DemoBackend(Resource):
    """
    Answers every request with the forwarded host, path and proxy headers
    (HTML, or JSON when asked with C{Accept: application/json}).
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        def header(name: bytes) -> str:
            value = request.getHeader(name)
            return value.decode("latin-1") if value is not None else ""

        info = {
            "host": header(b"host"),
            "method": request.method.decode("ascii", "replace"),
            "path": request.uri.decode("latin-1"),
            "x-forwarded-for": header(b"x-forwarded-for"),
            "x-forwarded-proto": header(b"x-forwarded-proto"),
            "x-forwarded-host": header(b"x-forwarded-host"),
        }
        if b"application/json" in (request.getHeader(b"accept") or b""):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(info, indent=2).encode() + b"\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>"
            for k, v in info.items()
        )
        return (
            "<!doctype html><meta charset=utf-8><title>tenantedge demo</title>"
            f"<h1>Hello, {html.escape(info['host'])}</h1>"
            "<p>This page comes from tenantedge's demo backend, through its reverse proxy, "
            "over a certificate issued on demand for this host name.</p>"
            f"<table>{rows}</table>\n"
        ).encode()


@implementer(IAgentEndpointFactory)
class DemoBackendService(Service):
    """
    Runs L{DemoBackend} on a free loopback port, and is the proxy's way of
    reaching it (an C{IAgentEndpointFactory} connecting to whatever port it
    got), so nothing is rewired at start-up.

    A real listening socket, so the demo goes through the same proxy path
    (pooled HTTP client, header rules, streaming) as a real backend would.
    """

    #: The URL the proxy is given; the host part is never resolved.
    url = "http://demo-backend"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        if self.port is None:
            site = Site(DemoBackend(), reactor=self.reactor)
            site.noisy = False
            site.log = lambda request: None  # type: ignore[method-assign]  # the edge logs requests, if asked to
            self.port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        super().privilegedStartService()

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def address(self) -> str:
        """Where the demo backend listens."""
        return f"127.0.0.1:{_port_number(self.port)}" if self.port is not None else "(not started)"

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if self.port is None:
            raise ConnectError("the demo backend is not running")
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", _port_number(self.port))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


def _port_number(port: IListeningPort) -> int:
    """The port number a C{listenTCP} port got (its host is an IPv4 address)."""
    return cast(IPv4Address, port.getHost()).port
