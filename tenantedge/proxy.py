"""
The streaming reverse proxy in front of the application backend (Next.js).

Unlike C{twisted.web.proxy.ReverseProxyResource}, this one keeps the
client's C{Host} (the tenant's name, which the backend routes on), reuses
backend connections from a persistent pool, streams the response with
back-pressure as it arrives, cancels the upstream request when the client
goes away, answers 502/504 when the backend is down or slow, and only ever
lets through a C{Host} that matches the name the TLS certificate was chosen
for (421 otherwise), so the backend sees nothing but validated tenant names.

Headers only the edge may set are stripped from client requests and set
afresh: C{X-Forwarded-*}, C{Forwarded}, C{X-Real-IP}, and Next.js's internal
C{x-middleware-subrequest}, whose pass-through let clients skip middleware
(CVE-2025-29927). The one exception: a C{--trusted-proxy} peer's
C{X-Forwarded-For} chain is kept, the peer appended
(L{tenantedge.forwarding}).

Request bodies: twisted.web reads the whole body before a resource runs
(spooling bodies over 100 KB to a temporary file), so uploads reach the
backend from that file, streamed with a C{FileBodyProducer}; memory use
stays bounded either way.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .backend import BackendPool, Backends
from .forwarding import TrustedProxies, forwarded_for
from .headers import EDGE_ONLY, HOP_BY_HOP, connection_tokens, edge_only, error_body
from .hostnames import InvalidHostname, canonical_host_header, host_from_header
from .pools import quiet_pool
from .timeouts import with_deadline
from .tls import tls_server_name

if TYPE_CHECKING:
    from twisted.web._http2 import H2Stream

__all__ = [
    "ProxyResource",
    "HOP_BY_HOP",
    "EDGE_ONLY",
    "upstream_headers",
    "downstream_headers",
    "make_backend_pool",
    "balanced_agent",
    "EdgeSite",
    "EdgeRequest",
]

#: Request headers twisted.web or the Agent manage themselves.
_MANAGED = frozenset({b"host", b"content-length", b"expect"})

#: Node's http server (and so Next.js) closes idle keep-alive connections
#: after 5 s; dropping ours a little sooner avoids reusing a socket the
#: backend is closing.
BACKEND_IDLE_TIMEOUT = 4.0

_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})


def _connection_tokens(headers: Headers) -> set[bytes]:
    return connection_tokens((name, value) for name, values in headers.getAllRawHeaders() for value in values)


def _forwarding_blocked(name: bytes, extra: set[bytes]) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower in extra


def upstream_headers(
    client_headers: Headers, host: bytes, client_ip: str, proto: bytes = b"https",
    trusted_proxies: TrustedProxies | None = None,
) -> Headers:
    """
    The headers to send to the backend for a client request.

    Drops hop-by-hop headers (and any the client listed in C{Connection}),
    every client-supplied C{X-Forwarded-*} and the other edge-only headers,
    then sets C{Host} (the client's, already validated), C{X-Forwarded-For},
    C{X-Forwarded-Proto} and C{X-Forwarded-Host}. C{X-Forwarded-For} is
    the client's address, or for a peer among C{trusted_proxies} the chain
    it sent followed by its address (L{tenantedge.forwarding}).
    """
    extra = _connection_tokens(client_headers)
    out = Headers()
    chain: list[bytes] = []
    for name, values in client_headers.getAllRawHeaders():
        lower = name.lower()
        if _forwarding_blocked(name, extra) or lower in _MANAGED:
            continue
        if edge_only(lower):
            if lower == b"x-forwarded-for" and trusted_proxies is not None:
                chain.extend(values)
            continue
        out.setRawHeaders(name, list(values))
    client = client_ip.encode("ascii", "replace")
    if chain and trusted_proxies is not None and trusted_proxies.trusts(client_ip):
        client = forwarded_for(chain, client)
    out.setRawHeaders(b"host", [host])
    out.setRawHeaders(b"x-forwarded-for", [client])
    out.setRawHeaders(b"x-forwarded-proto", [proto])
    out.setRawHeaders(b"x-forwarded-host", [host])
    return out


def downstream_headers(backend_headers: Headers, connection_headers: Headers | None = None) -> Headers:
    """
    The backend's response headers minus hop-by-hop ones (and any the
    backend named in its C{Connection} header); everything else (several
    C{Set-Cookie} lines included) passes unchanged.

    @param connection_headers: where Twisted's HTTP client keeps the
        connection-control headers it took out of C{backend_headers}
        (C{Connection}, C{Content-Length}...), if known.
    """
    extra = _connection_tokens(backend_headers)
    if connection_headers is not None:
        extra |= _connection_tokens(connection_headers)
    out = Headers()
    for name, values in backend_headers.getAllRawHeaders():
        if not _forwarding_blocked(name, extra):
            out.setRawHeaders(name, list(values))
    return out


def make_backend_pool(reactor: Any, max_per_host: int = 512) -> HTTPConnectionPool:
    """
    A persistent pool for backend connections: requests reuse idle
    connections instead of opening one per request.
    """
    pool = quiet_pool(HTTPConnectionPool(reactor, persistent=True))
    pool.maxPersistentPerHost = max_per_host
    # Twisted's class default (240) makes mypy infer int; it is seconds for callLater.
    pool.cachedConnectionTimeout = BACKEND_IDLE_TIMEOUT  # type: ignore[assignment]
    pool.retryAutomatically = True
    return pool


def _error_page(request: Request, code: int, title: str, detail: str) -> bytes:
    request.setResponseCode(code, title.encode("ascii"))
    request.responseHeaders = Headers()
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    body = error_body(code, title, detail)
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def _connection_headers(upstream: IResponse) -> Headers | None:
    """
    The connection-control headers Twisted's HTTP/1.1 client parsed for
    this response (the backend's C{Connection: X-Foo} tokens, which must
    not be forwarded). There is no public API for them; this reaches the
    private parser through the pooled connection and gives up (None) if
    Twisted's internals differ; C{tests.test_private_apis.
    ClientParserPrivateAPITests} then fails loudly.
    """
    try:
        protocol = upstream._transport._producer.protocol  # type: ignore[attr-defined]
        while hasattr(protocol, "_wrappedProtocol"):  # endpoint wrappers
            protocol = protocol._wrappedProtocol
        headers = protocol._parser.connHeaders
    except AttributeError:
        return None
    return headers if isinstance(headers, Headers) else None


class _BodyRelay(Protocol):
    """
    Streams a backend response body to the client, pausing the backend
    socket whenever the client's transport buffers are full.
    """

    def __init__(self, request: Request, finished: defer.Deferred[None]) -> None:
        self.request = request
        self.finished = finished
        self.client_gone = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.client_gone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if not self.client_gone:
            self.request.unregisterProducer()
            if reason.check(ResponseDone, PotentialDataLoss):
                self.request.finish()
            else:
                # The backend broke off mid-body. The status line is gone,
                # so the only honest signal left is to abort: no final
                # chunk on HTTP/1.1, RST_STREAM on HTTP/2 (where a plain
                # close would end the stream as if complete).
                channel = self.request.channel
                abort = getattr(channel, "abortConnection", None) or (
                    cast(ITCPTransport, channel.transport).abortConnection
                )
                abort()
        self.finished.callback(None)

    def stop(self) -> None:
        """The client went away: stop reading from the backend."""
        self.client_gone = True
        if self.transport is not None:
            # The backend response's transport, which pauses and stops.
            cast(IPushProducer, self.transport).stopProducing()


class ProxyResource(Resource):
    """
    Forwards every request to C{backend}, keeping the tenant's C{Host}.

    @ivar backend: base URL of the backend, e.g. C{b"http://127.0.0.1:3000"};
        the client's path and query are appended.
    @ivar agent: the HTTP client (a C{twisted.web.client.Agent} on a persistent pool).
    @ivar clock: for the backend deadline.
    @ivar timeout: seconds to wait for the backend's response headers
        before answering 504.
    @ivar require_sni_match: refuse (421) a request whose C{Host} names
        another host than the TLS connection's certificate.
    @ivar observe: called with (status, seconds to response headers) for
        every proxied request, for metrics.
    @ivar trusted_proxies: the peers whose C{X-Forwarded-For} chain is
        kept (C{--trusted-proxy}), or C{None}.
    @ivar backends: if given, each request goes to the backend
        L{Backends.choose} picks, through an agent from L{balanced_agent}
        (C{backend} then only gives the path put before the request's),
        is counted there, and a connection that cannot be made is tried on
        another backend (nothing was sent yet).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        backend: bytes,
        agent: IAgent,
        clock: IReactorTime,
        timeout: float = 60.0,
        require_sni_match: bool = True,
        observe: Callable[[int, float], None] | None = None,
        trusted_proxies: TrustedProxies | None = None,
        backends: Backends | None = None,
    ) -> None:
        super().__init__()
        self.observe = observe
        self.trusted_proxies = trusted_proxies
        self.backend = backend.rstrip(b"/")
        self.backends = backends
        if backends is not None:
            prefix = URI.fromBytes(self.backend).path if b"://" in self.backend else self.backend
            self._targets = {pool: _balanced_host(i) + prefix for i, pool in enumerate(backends.pools)}
        self.agent = agent
        self.clock = clock
        self.timeout = timeout
        self.require_sni_match = require_sni_match

    def render(self, request: Request) -> bytes | int:
        host = request.requestHeaders.getRawHeaders(b"host", [None])[0]
        if host is None:
            return _error_page(request, 400, "Bad Request", "The request has no Host header.")
        try:
            name = host_from_header(host)
        except InvalidHostname:
            return _error_page(request, 400, "Bad Request", "The Host header is not a valid host name.")
        if self.require_sni_match and tls_server_name(request) != name:
            return _error_page(
                request,
                421,
                "Misdirected Request",
                "This connection was opened for another host name.",
            )
        path = request.uri
        if not path.startswith(b"/"):
            return _error_page(request, 400, "Bad Request", "Only origin-form request targets are accepted.")
        headers = upstream_headers(
            request.requestHeaders, canonical_host_header(name, host), getattr(request.getClientAddress(), "host", "") or "",
            trusted_proxies=self.trusted_proxies,
        )
        backends = self.backends
        tried: list[BackendPool] = []
        state: dict[str, Any] = {"relay": None, "gone": False, "pool": None}

        def attempt(pool: BackendPool | None) -> defer.Deferred[IResponse]:
            state["pool"] = pool
            base = self.backend if pool is None else self._targets[pool]
            d = self.agent.request(request.method, base + path, headers, self._body_producer(request))
            if backends is None or pool is None:
                return d

            def connect_failed(reason: Failure) -> defer.Deferred[IResponse] | Failure:
                # Nothing was sent: another backend may take it, whatever the method.
                if state["gone"] or not reason.check(error.ConnectError, ConnectionRefusedError):
                    return reason
                refused = reason.check(error.ConnectionRefusedError, ConnectionRefusedError) is not None
                state["pool"] = None
                backends.done(pool, False, reason.getErrorMessage(), refused)
                tried.append(pool)
                other = backends.choose_other(tried)
                if other is None:
                    return reason
                return attempt(other)

            return d.addErrback(connect_failed)  # type: ignore[call-overload,no-any-return]

        def settle(ok: bool | None) -> None:
            pool = state["pool"]
            if pool is not None and backends is not None:
                state["pool"] = None
                backends.done(pool, ok)

        try:
            response = attempt(backends.choose() if backends is not None else None)
        except Exception:
            settle(None)
            return _error_page(request, 400, "Bad Request", "The request cannot be forwarded.")
        with_deadline(response, self.timeout, self.clock)
        relay_finished: defer.Deferred[None] = defer.Deferred()

        def client_gone(reason: Failure) -> None:
            state["gone"] = True
            relay = state["relay"]
            if relay is not None:
                relay.stop()
            elif not response.called:
                response.cancel()

        request.notifyFinish().addErrback(client_gone)

        started = self.clock.seconds()

        def got_response(upstream: IResponse) -> None:
            settle(True)
            if self.observe is not None:
                self.observe(upstream.code, self.clock.seconds() - started)
            if state["gone"]:
                upstream.deliverBody(_Discard())
                return
            request.setResponseCode(upstream.code, upstream.phrase)
            request.responseHeaders = downstream_headers(upstream.headers, _connection_headers(upstream))
            # Pass the backend's headers, not twisted.web's defaults: no
            # Content-Type the backend did not send (an upload served
            # without one must not turn into text/html), and the length
            # when the backend gave one (Twisted's client keeps
            # Content-Length out of the headers it hands over).
            request.defaultContentType = None
            if upstream.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
                request.setHeader(b"content-length", b"%d" % (upstream.length,))
            relay = state["relay"] = _BodyRelay(request, relay_finished)
            upstream.deliverBody(relay)

        def failed(reason: Failure) -> None:
            settle(None if state["gone"] or reason.check(defer.TimeoutError) else False)
            if state["gone"]:
                return
            if reason.check(defer.TimeoutError):
                code, title, detail = 504, "Gateway Timeout", "The application did not answer in time."
            else:
                code, title, detail = 502, "Bad Gateway", "The application is not reachable right now."
            if self.observe is not None:
                self.observe(code, self.clock.seconds() - started)
            self._log.warn(
                "backend request for {host}{path} failed with {code}: {error}",
                host=name,
                path=path.decode("ascii", "replace")[:200],
                code=code,
                error=reason.getErrorMessage(),
            )
            request.write(_error_page(request, code, title, detail))
            request.finish()

        response.addCallbacks(got_response, failed)
        response.addErrback(
            lambda f: self._log.failure("proxying {host} failed", f, host=name)
        )
        return NOT_DONE_YET

    @staticmethod
    def _body_producer(request: Request) -> FileBodyProducer | None:
        content = request.content
        if content is None:
            return None
        content.seek(0, io.SEEK_END)
        length = content.tell()
        content.seek(0)
        if length == 0 and request.method in _NO_BODY_METHODS:
            return None
        return FileBodyProducer(content)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@implementer(IAgentEndpointFactory)
class BackendEndpointFactory:
    """
    Connects to the backend: straight to an IP literal (no resolver thread
    per new connection, the usual case of C{http://127.0.0.1:3000}), through
    the reactor's resolver for a host name, with verified TLS for an
    C{https://} backend, or to a UNIX socket (C{unix_path}) whatever the
    URL says.
    """

    def __init__(self, reactor: Any, connect_timeout: float = 10.0, unix_path: str | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.unix_path = unix_path

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if self.unix_path is not None:
            return UNIXClientEndpoint(self.reactor, self.unix_path, timeout=self.connect_timeout)
        host = uri.host.decode("ascii")
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                self.reactor, uri.host, uri.port, timeout=self.connect_timeout
            )
        else:
            endpoint_class = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = endpoint_class(self.reactor, str(address), uri.port, timeout=self.connect_timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


def backend_endpoints(
    reactor: Any, backend: str, endpoints: IAgentEndpointFactory | None = None
) -> Callable[[], IStreamClientEndpoint]:
    """
    How to open one connection to the backend (for the fast HTTP/1.1
    relay's pool): the URL parsed once, the endpoint made per connection.
    """
    unix_path = backend[5:] if backend.startswith("unix:") else None
    uri = URI.fromBytes((b"http://localhost" if unix_path is not None else backend.encode("ascii")))
    factory = endpoints if endpoints is not None else BackendEndpointFactory(reactor, unix_path=unix_path)
    return lambda: factory.endpointForURI(uri)


def backend_prefix(backend: str) -> bytes:
    """The path of a C{--backend} URL, put before each request's path (none for C{unix:})."""
    if backend.startswith("unix:"):
        return b""
    return bytes(URI.fromBytes(backend.encode("ascii")).path)


def _balanced_host(index: int) -> bytes:
    """The made-up URL host that stands for backend C{index} in a balanced agent's requests."""
    return b"http://backend-%d" % (index,)


@implementer(IAgentEndpointFactory)
class _BalancedEndpoints:
    """Endpoints for L{balanced_agent}: the made-up host names the pool."""

    def __init__(self, backends: Backends) -> None:
        self._connects = {_balanced_host(i)[7:]: pool.connect for i, pool in enumerate(backends.pools)}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self._connects[uri.host]()


def balanced_agent(reactor: Any, backends: Backends, pool: HTTPConnectionPool | None = None) -> Agent:
    """
    An agent for a L{ProxyResource} balancing over C{backends}: each
    backend is reached through its pool's own endpoints (TLS, UNIX socket
    or demo alike), with its own persistent connections in C{pool}.
    """
    return Agent.usingEndpointFactory(  # type: ignore[no-any-return]
        reactor, _BalancedEndpoints(backends), pool=pool if pool is not None else make_backend_pool(reactor)
    )


def backend_agent(
    reactor: Any, backend: str, pool: HTTPConnectionPool | None = None,
    endpoints: IAgentEndpointFactory | None = None,
) -> tuple[bytes, Agent]:
    """
    The base URL and the pooled agent for a C{--backend} value: an
    C{http(s)://} URL, or C{unix:/path} (then requests go to
    C{http://localhost} over that socket).
    """
    unix_path = backend[5:] if backend.startswith("unix:") else None
    url = "http://localhost" if unix_path is not None else backend
    agent = Agent.usingEndpointFactory(
        reactor,
        endpoints if endpoints is not None else BackendEndpointFactory(reactor, unix_path=unix_path),
        pool=pool if pool is not None else make_backend_pool(reactor),
    )
    return url.encode("ascii"), agent


class EdgeRequest(Request):
    """
    A request that refuses a body larger than its site's C{max_body_size}
    (413) as soon as the length is known or exceeded, instead of spooling
    it to a temporary file first: twisted.web reads whole bodies before a
    resource runs, so without a bound one upload could fill the disk.
    """

    _body_bytes = 0
    _refused = False
    _reset_pending = False

    def _limit(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body_size", 0) or 0)

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if limit and length is not None and length > limit:
            self._refuse_large(stream_ready=False)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            if self._reset_pending:
                self._reset_pending = False
                cast("H2Stream", self.channel).abortConnection()  # only set for HTTP/2 streams
            return
        self._body_bytes += len(data)
        limit = self._limit()
        if limit and self._body_bytes > limit:
            self._refuse_large(stream_ready=True)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse_large(self, stream_ready: bool) -> None:
        self._refused = True
        self.content = io.BytesIO()
        channel = self.channel
        # twisted.web's H2Stream keeps its connection as the private _conn
        # (no public way to tell the protocols apart; pinned in
        # tests.test_private_apis.TwistedWebPrivateAPITests).
        if hasattr(channel, "_conn"):
            # HTTP/2: reset this stream; the connection and its other
            # streams go on. While its headers are still being processed
            # the stream is not registered yet: reset it at its first data.
            if stream_ready:
                cast("H2Stream", channel).abortConnection()
            else:
                self._reset_pending = True
            return
        # HTTP/1.1: the request line is known but not yet handed to this
        # object, so answer on the wire directly, then close: the client
        # may still be sending the body.
        body = b"The request body is larger than this server accepts.\n"
        transport = channel.transport
        assert transport is not None  # a request is being received on it
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


class EdgeSite(Site):
    """
    The HTTPS site: L{EdgeRequest}s (bounded bodies), and an access log only
    where C{--access-log} asks (combined log format), never to the twistd
    log, where one line per request would cost more than proxying a small
    response.

    @ivar max_body_size: largest request body in bytes (0: no limit).
    """

    noisy = False
    requestFactory = EdgeRequest

    def __init__(self, resource: Resource, *args: Any, max_body_size: int = 0, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.max_body_size = max_body_size

    def log(self, request: Any) -> None:
        if self.logPath is not None:
            super().log(request)
