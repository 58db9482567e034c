"""
The HTTPS listener: read the ClientHello, get the certificate, then start
TLS on the same connection.

pyOpenSSL's servername callback must return at once, so it cannot wait for a
certificate that does not exist yet (txsni and certmagic-style servers
answer a cache miss with a default certificate and issue in the background;
the client's first request then fails). Instead, L{SniffingProtocol} buffers
the raw bytes of the first flight (bounded in size and time), parses them
with L{tenantedge.clienthello}, pauses the socket while
L{tenantedge.resolver.CertificateResolver} finds or obtains the certificate,
and only then wraps the connection in a C{TLSMemoryBIOProtocol} built for
that one context and feeds it the buffered bytes. OpenSSL sees an ordinary
handshake; the client sees a slow but successful one.

Refusals end with a TLS alert before any TLS state exists: no SNI, an IP
literal or a malformed name get C{unrecognized_name} without touching the
store or the CA.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator

from .challenges import ACME_TLS_1
from .contexts import FixedTLS, TenantTLS, resumed_for_another_name, session_reused
from .writethrough import set_no_delay, write_through
from .clienthello import (
    MAX_HELLO_SIZE,
    Incomplete,
    MalformedHello,
    NotTLS,
    looks_like_http,
    parse_client_hello,
)
from .hostnames import InvalidHostname, normalize
from .interfaces import BackedOff, PolicyRefusal, PrecheckFailed
from .resolver import CertificateResolver

__all__ = [
    "OnDemandTLSFactory",
    "SniffingProtocol",
    "ALERT_UNRECOGNIZED_NAME",
    "ALERT_INTERNAL_ERROR",
    "ALERT_DECODE_ERROR",
    "tls_server_name",
]

ALERT_DECODE_ERROR = 50
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112


#: Raw bytes buffered before the hello is complete: the hello itself plus
#: the overhead of a client that splits it into many small records.
MAX_BUFFER = 2 * MAX_HELLO_SIZE

_PLAIN_HTTP_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 50\r\n"
    b"\r\n"
    b"This port speaks HTTPS: use an https:// URL here.\n"
)


def alert_record(description: int) -> bytes:
    """
    A plaintext fatal alert record, sent before any TLS state exists (the
    server has not spoken yet, so there is nothing to encrypt it with).
    """
    return bytes((21, 3, 3, 0, 2, 2, description))


def tls_server_name(request: Any) -> str | None:
    """
    The normalised SNI name the TLS connection under a twisted.web request
    was accepted for, or C{None} if it did not come through
    L{OnDemandTLSFactory}.

    Walks from the request's channel down the transport chain
    (C{HTTPChannel -> TLS protocol}, or C{H2Stream -> H2Connection -> TLS
    protocol}).
    """
    obj = getattr(request, "channel", None)
    for _ in range(6):
        if obj is None:
            return None
        name = getattr(obj, "tenantedge_server_name", None)
        if name is not None:
            return str(name)
        # H2Stream has no transport; its connection is the private _conn
        # (pinned in tests.test_private_apis.TwistedWebPrivateAPITests).
        obj = getattr(obj, "transport", None) or getattr(obj, "_conn", None)
    return None


@implementer(IOpenSSLServerConnectionCreator)
class _ChosenContextCreator:
    """
    Makes each TLS connection from what its sniffer already chose: the
    tenant's certificate on the shared contexts (L{tenantedge.contexts}),
    or a challenge context.
    """

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        # Only ever called for the factory's _EdgeTLSProtocol instances.
        return cast(_EdgeTLSProtocol, tlsProtocol).tenantedge_tls.connection()


class _EdgeTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS protocol that knows which certificate and name it was made for.

    Writes go to OpenSSL at once (Twisted's C{BufferingTLSTransport} defers
    small writes to the next reactor turn: a C{callLater(0)} per write,
    about 7% of the request path); the HTTP layers above write a response
    head in one piece and bodies in large pieces.
    """

    tenantedge_tls: TenantTLS | FixedTLS
    tenantedge_server_name: str
    #: The deadline for the handshake to complete (cancelled by the guard).
    tenantedge_handshake_timer: Any = None


@implementer(IHandshakeListener)
class _HandshakeGuard(Protocol):
    """
    The first protocol on every TLS connection. When the handshake is done
    it refuses a session resumed for another server name (one base context
    holds every tenant's sessions; see L{tenantedge.contexts}), then puts
    the application's protocol in its place, so nothing of the application
    runs, not even a timer, before the handshake has succeeded, and nothing
    stays in between afterwards.
    """

    def __init__(self, factory: OnDemandTLSFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.addr = addr

    def handshakeCompleted(self) -> None:
        tls = cast(_EdgeTLSProtocol, self.transport)
        timer, tls.tenantedge_handshake_timer = tls.tenantedge_handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        events = self.factory.events
        connection = tls.getHandle()
        if session_reused(connection):
            if resumed_for_another_name(connection, tls.tenantedge_server_name):
                events["resumed-other-name"] += 1
                tls.abortConnection()
                return
            events["resumed"] += 1
        real = self.factory.wrapped_factory.buildProtocol(self.addr)
        if real is None:
            events["app-refused"] += 1
            tls.abortConnection()
            return
        tls.wrappedProtocol = real
        real.makeConnection(tls)
        if IHandshakeListener.providedBy(real):
            real.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        # Plaintext only ever follows a completed handshake, which replaced
        # this protocol; anything else is dropped.
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        pass


class _GuardFactory(Factory):
    """Builds the L{_HandshakeGuard} that TLS wraps first."""

    noisy = False

    def __init__(self, factory: OnDemandTLSFactory) -> None:
        self.factory = factory

    def buildProtocol(self, addr: IAddress | None) -> _HandshakeGuard:
        return _HandshakeGuard(self.factory, addr)


class OnDemandTLSFactory(Factory):
    """
    Accepts connections on the HTTPS port and gives each the certificate for
    the name in its ClientHello, obtaining one first if needed.

    @ivar resolver: maps a normalised name to a context.
    @ivar wrapped_factory: the application factory (a twisted.web C{Site}).
    @ivar clock: for the hello and resolve deadlines.
    @ivar hello_timeout: seconds a client has to send its whole ClientHello.
    @ivar resolve_timeout: seconds a handshake may wait for a certificate.
    @ivar challenge_context: given a name, the TLS-ALPN-01 challenge context
        to answer an C{acme-tls/1}-only hello with, or C{None}.
    @ivar events: handshake outcomes by kind, for metrics and tests
        (several factories may share one counter).
    """

    noisy = False
    _log = Logger()

    def __init__(
        self,
        resolver: CertificateResolver,
        wrapped_factory: Factory,
        clock: IReactorTime,
        hello_timeout: float = 10.0,
        resolve_timeout: float = 90.0,
        challenge_context: Callable[[str], defer.Deferred[SSL.Context | None]] | None = None,
        events: Counter[str] | None = None,
        max_connections: int = 0,
        max_per_address: int = 0,
    ) -> None:
        self.resolver = resolver
        self.wrapped_factory = wrapped_factory
        self.clock = clock
        self.hello_timeout = hello_timeout
        self.resolve_timeout = resolve_timeout
        self.challenge_context = challenge_context
        self.events: Counter[str] = events if events is not None else Counter()
        #: Connections open right now (a worker being replaced waits for 0).
        self.open = 0
        #: Caps on open connections, overall and per client address (0: none).
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.per_address: Counter[str] = Counter()
        self._tls_factory = TLSMemoryBIOFactory(
            _ChosenContextCreator(), False, _GuardFactory(self), clock=clock
        )
        self._tls_factory.protocol = _EdgeTLSProtocol

    def doStart(self) -> None:
        self.wrapped_factory.doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> SniffingProtocol | None:
        """
        A protocol for a new connection, or None (Twisted then closes it at
        once, before anything is read) when a connection cap is reached: a
        flood of idle sockets from one address, or overall, costs one
        accept and one close each, while established connections go on.
        """
        if self.max_connections and self.open >= self.max_connections:
            self.events["refused-connections-full"] += 1
            return None
        host = str(getattr(addr, "host", ""))
        if self.max_per_address and host and self.per_address[host] >= self.max_per_address:
            self.events["refused-address-full"] += 1
            return None
        return SniffingProtocol(self, addr)

    def tls_protocol(
        self, addr: IAddress | None, server_name: str, tls: TenantTLS | FixedTLS
    ) -> _EdgeTLSProtocol:
        """
        Build the TLS protocol for one connection; the application's
        protocol is built once its handshake succeeds (L{_HandshakeGuard}).
        """
        # The factory builds _EdgeTLSProtocol (see __init__).
        proto = cast(_EdgeTLSProtocol, self._tls_factory.buildProtocol(addr))
        proto.tenantedge_tls = tls
        proto.tenantedge_server_name = server_name
        return proto


class SniffingProtocol(Protocol):
    """
    One accepted HTTPS connection: first the ClientHello sniffer, then a
    transparent pipe to the TLS protocol it starts.
    """

    _log = Logger()

    def __init__(self, factory: OnDemandTLSFactory, addr: IAddress | None) -> None:
        self.factory = factory
        self.addr = addr
        self._buffer = b""
        self._tls: _EdgeTLSProtocol | None = None
        self._hello_timer: Any = None
        self._pending: defer.Deferred[SSL.Context] | None = None
        self._done = False
        self.server_name: str | None = None

    # -- connection lifetime ------------------------------------------------

    def connectionMade(self) -> None:
        # Nagle off: with it, the response waited behind the session-ticket
        # flight for the client's delayed ACK (45 ms per new connection).
        self.factory.open += 1
        self._host = str(getattr(self.addr, "host", ""))
        if self._host:
            self.factory.per_address[self._host] += 1
        set_no_delay(self.transport)
        write_through(self.transport)
        self._hello_timer = self.factory.clock.callLater(
            self.factory.hello_timeout, self._hello_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
            return
        if self._done:
            return
        self._buffer += data
        if self._pending is not None:
            # Bytes that were in flight when we paused; TLS gets them later.
            if len(self._buffer) > MAX_BUFFER:
                self._refuse("oversize", None)
            return
        self._try_parse()

    def _handshake_timed_out(self) -> None:
        tls = self._tls
        if tls is not None:
            tls.tenantedge_handshake_timer = None
        if not self._done:
            self.factory.events["handshake-timeout"] += 1
            self._done = True
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.factory.open -= 1
        host = getattr(self, "_host", "")
        if host:
            per_address = self.factory.per_address
            per_address[host] -= 1
            if per_address[host] <= 0:
                del per_address[host]
        self._done = True
        self._cancel_hello_timer()
        if self._tls is not None:
            timer, self._tls.tenantedge_handshake_timer = self._tls.tenantedge_handshake_timer, None
            if timer is not None and timer.active():
                timer.cancel()
            self._tls.connectionLost(reason)
            self._tls = None
        elif self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()

    # -- reading the hello --------------------------------------------------

    def _try_parse(self) -> None:
        events = self.factory.events
        try:
            hello = parse_client_hello(self._buffer)
        except Incomplete:
            if len(self._buffer) > MAX_BUFFER:
                self._refuse("oversize", ALERT_DECODE_ERROR)
            return
        except NotTLS:
            if looks_like_http(self._buffer):
                events["plain-http"] += 1
                self._finish(_PLAIN_HTTP_RESPONSE)
            else:
                self._refuse("not-tls", None)
            return
        except MalformedHello as e:
            self._log.debug("malformed ClientHello from {peer}: {reason}", peer=self.addr, reason=e.reason)
            self._refuse("malformed", ALERT_DECODE_ERROR)
            return
        self._cancel_hello_timer()
        if hello.server_name is None:
            self._refuse("no-sni", ALERT_UNRECOGNIZED_NAME)
            return
        try:
            name = normalize(hello.server_name)
        except InvalidHostname as e:
            self._log.debug("refused server name from {peer}: {reason}", peer=self.addr, reason=e.reason)
            self._refuse("invalid-name", ALERT_UNRECOGNIZED_NAME)
            return
        self.server_name = name
        if hello.alpn == (ACME_TLS_1,):
            self._answer_challenge(name)
            return
        context = self.factory.resolver.cached(name)
        if context is not None:
            events["cache-hit"] += 1
            self._start_tls(context)
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        pending = self.factory.resolver.context_for(name)
        if not pending.called:
            pending.addTimeout(self.factory.resolve_timeout, self.factory.clock)
            self._pending = pending
        pending.addCallbacks(self._resolved, self._resolve_failed)

    def _answer_challenge(self, name: str) -> None:
        lookup = self.factory.challenge_context
        if lookup is None:
            self._refuse("acme-tls-no-challenge", ALERT_UNRECOGNIZED_NAME)
            return
        self.transport.pauseProducing()  # type: ignore[union-attr]
        pending = lookup(name)
        if not pending.called:
            pending.addTimeout(self.factory.hello_timeout, self.factory.clock)
            self._pending = pending
        pending.addCallbacks(self._challenge_found, self._challenge_failed)

    def _challenge_found(self, context: SSL.Context | None) -> None:
        self._pending = None
        if self._done:
            return
        if context is None:
            self._refuse("acme-tls-no-challenge", ALERT_UNRECOGNIZED_NAME)
            return
        self.factory.events["acme-tls-challenge"] += 1
        self._start_tls(FixedTLS(context))
        if not self._done and not getattr(self.transport, "disconnecting", False):
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _challenge_failed(self, failure: Failure) -> None:
        self._pending = None
        if not self._done:
            self._log.failure("looking up the TLS-ALPN-01 answer for {host} failed", failure, host=self.server_name)
            self._refuse("acme-tls-no-challenge", ALERT_INTERNAL_ERROR)

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        self._refuse("hello-timeout", None)

    def _cancel_hello_timer(self) -> None:
        if self._hello_timer is not None:
            if self._hello_timer.active():
                self._hello_timer.cancel()
            self._hello_timer = None

    # -- after the certificate lookup ---------------------------------------

    def _resolved(self, context: TenantTLS) -> None:
        self._pending = None
        if self._done:
            return
        self.factory.events["resolved"] += 1
        try:
            self._start_tls(context)
        except Exception:
            # Never leave a paused connection behind with no timer running.
            self._log.failure("starting TLS for {host} failed", host=self.server_name)
            self._refuse("failed", ALERT_INTERNAL_ERROR)
            return
        if not self._done and not getattr(self.transport, "disconnecting", False):
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _resolve_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._done:
            return None
        if failure.check(PolicyRefusal):
            self._refuse("refused", ALERT_UNRECOGNIZED_NAME)
        elif failure.check(BackedOff):
            self._refuse("backoff", ALERT_INTERNAL_ERROR)
        elif failure.check(PrecheckFailed):
            self._refuse("precheck-failed", ALERT_INTERNAL_ERROR)
        elif failure.check(defer.TimeoutError):
            self._log.warn(
                "gave up waiting for a certificate for {host} after {timeout}s",
                host=self.server_name,
                timeout=self.factory.resolve_timeout,
            )
            self._refuse("timeout", ALERT_INTERNAL_ERROR)
        else:
            self._refuse("failed", ALERT_INTERNAL_ERROR)
        return None

    def _start_tls(self, context: TenantTLS | FixedTLS) -> None:
        assert self.server_name is not None
        tls = self.factory.tls_protocol(self.addr, self.server_name, context)
        self._tls = tls
        # The handshake has the hello's time limit too: a client that sends
        # its ClientHello and then nothing must not hold the connection.
        tls.tenantedge_handshake_timer = self.factory.clock.callLater(
            self.factory.hello_timeout, self._handshake_timed_out
        )
        buffered, self._buffer = self._buffer, b""
        tls.makeConnection(self.transport)
        tls.dataReceived(buffered)

    # -- ending ---------------------------------------------------------------

    def _refuse(self, kind: str, alert: int | None) -> None:
        self.factory.events[kind] += 1
        self._finish(alert_record(alert) if alert is not None else b"")

    def _finish(self, last_words: bytes) -> None:
        self._done = True
        self._cancel_hello_timer()
        self._buffer = b""
        if last_words:
            self.transport.write(last_words)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
