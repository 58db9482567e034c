"""
The backend side of the relay: pooled keep-alive HTTP/1.1 connections to
the Next.js backend, parsing responses with llhttp (C{httptools}) and
handing each to the exchange that asked (L{BackendExchange}), on the
client's HTTP/1.1 connection or an HTTP/2 stream alike. After a C{101
Switching Protocols} to a request that asked for an upgrade
(L{UpgradeExchange}), a connection parses nothing more: it is one end of
a L{tenantedge.tunnel.Tunnel} and never goes back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol, cast

import httptools
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from .tunnel import Tunnel
from .writethrough import set_no_delay, write_through

__all__ = [
    "BACKEND_IDLE", "NO_RESPONSE_BODY", "BackendConnection", "BackendExchange", "BackendPool", "UpgradeExchange",
]

#: Node (and so Next.js) closes idle keep-alive connections after 5 s; a
#: pooled connection idle longer than this is not reused.
BACKEND_IDLE = 4.0

NO_RESPONSE_BODY = frozenset({204, 304})


class BackendExchange(TypingProtocol):
    """What a L{BackendConnection} tells the request it carries."""

    #: The request method (a HEAD response has no body).
    method: bytes

    def backend_interim(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """An interim (1xx other than 101) response arrived."""

    def backend_head(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        """The final response head arrived."""

    def backend_body(self, data: bytes) -> None:
        """Response body bytes (de-chunked)."""

    def backend_done(self, conn: BackendConnection | None) -> None:
        """The response is complete; C{conn} may be reused (None: it closed)."""

    def backend_failed(self, detail: str, head_done: bool) -> None:
        """The connection failed or sent garbage, before or after the head."""

    def backend_closed_complete(self) -> bool:
        """The connection closed after the head: is the body complete?"""


class UpgradeExchange(BackendExchange, TypingProtocol):
    """
    An exchange that asked the backend for a protocol switch (HTTP/1.1
    C{Upgrade}); only such an exchange is told of a C{101}, any other gets
    L{BackendExchange.backend_failed}.
    """

    #: True if the request carried the upgrade headers to the backend.
    upgrade: bool

    def backend_switched(
        self, conn: BackendConnection, reason: bytes, headers: list[tuple[bytes, bytes]], rest: bytes
    ) -> None:
        """
        The backend answered C{101}: C{conn} is no longer HTTP (and no
        longer pooled); C{rest} is what it sent after the head.
        """


class BackendPool:
    """
    Keep-alive connections to one backend, reused last-in first-out (the
    warmest socket first); a connection idle longer than C{idle} is closed
    instead of reused, so a socket the backend is about to close is never
    picked.

    @ivar connect: makes the endpoint for a new connection.
    @ivar max_idle: idle connections kept at most.
    """

    def __init__(
        self, clock: IReactorTime, connect: Callable[[], IStreamClientEndpoint], idle: float = BACKEND_IDLE,
        max_idle: int = 256,
    ) -> None:
        self.clock = clock
        self.connect = connect
        self.idle = idle
        self.max_idle = max_idle
        self._idle: list[BackendConnection] = []
        self.opened = 0

    def take(self) -> BackendConnection | None:
        """An idle connection fit for reuse, or None."""
        now = self.clock.seconds()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.idle and conn.connected:
                return conn
            conn.close()
        return None

    def open(self) -> defer.Deferred[BackendConnection]:
        """A new connection (cancellable while connecting)."""
        self.opened += 1
        factory = Factory.forProtocol(BackendConnection)
        factory.noisy = False
        return cast("defer.Deferred[BackendConnection]", self.connect().connect(factory))

    def give_back(self, conn: BackendConnection) -> None:
        """Return a connection whose exchange ended cleanly."""
        if not conn.connected or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.clock.seconds()
        conn.pool = self
        # Back-pressure may have paused it (a slow client); idle, it must read.
        conn.transport.resumeProducing()  # type: ignore[union-attr]
        self._idle.append(conn)

    def forget(self, conn: BackendConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def idle_count(self) -> int:
        return len(self._idle)


class BackendConnection(Protocol):
    """
    One connection to the backend, carrying one exchange at a time; parses
    responses with llhttp and hands them to the exchange.
    """

    exchange: BackendExchange | None = None
    pool: BackendPool | None = None
    #: Set once the connection carries an upgraded one: bytes go there.
    tunnel: Tunnel | None = None
    idle_since = 0.0
    connected = False

    def connectionMade(self) -> None:
        self.connected = True
        set_no_delay(self.transport)
        write_through(self.transport)
        self._new_parser()

    def _new_parser(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._head_done = False
        self._skip_body = False
        self._stray = False
        self._switching = False

    def send(self, exchange: BackendExchange, head: bytes) -> None:
        self.exchange = exchange
        if self._head_done or self._headers:
            self._new_parser()
        self.transport.write(head)  # type: ignore[union-attr]

    # -- llhttp callbacks ---------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # An interim response (100 Continue, 103 Early Hints): forward
            # it, then wait for the real one on a fresh parser.
            headers, self._headers = self._headers, []
            if self.exchange is not None:
                self.exchange.backend_interim(code, self._reason, headers)
            self._reason = b""
            return
        self._head_done = True
        exchange = self.exchange
        if exchange is None:
            return
        if code == 101:
            # What follows the head is another protocol: the switch happens
            # once llhttp says where the head ended (HttpParserUpgrade).
            self._switching = True
            return
        self._skip_body = exchange.method == b"HEAD" or code in NO_RESPONSE_BODY
        exchange.backend_head(code, self._reason, self._headers, self._parser.should_keep_alive())
        if self._skip_body:
            # llhttp cannot be told a HEAD response has no body: end the
            # exchange here and parse the next response afresh.
            self._finish()

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None and not self._skip_body:
            self.exchange.backend_body(data)

    def on_message_complete(self) -> None:
        if not self._skip_body and self._head_done and not self._switching:
            self._finish()

    def _finish(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.backend_done(self)

    # -- transport ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_backend(data)
            return
        if self.exchange is None:
            # Bytes while idle (after a HEAD, or unasked): the backend is
            # confused; never reuse the connection, or a later request could
            # take these bytes for its response.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._switch(data[e.args[0]:])
            return
        except httptools.HttpParserError as e:
            self._failed(f"malformed response from the backend: {e}")
            return
        if self._switching:
            # llhttp switches only when the 101 names its Upgrade (and
            # Connection: upgrade); without, it went on parsing as HTTP.
            self._failed("a 101 response without Upgrade and Connection: upgrade")
            return
        if self._stray:
            self.close()

    def _failed(self, detail: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()
        if exchange is not None:
            exchange.backend_failed(detail, self._head_done)

    def _switch(self, rest: bytes) -> None:
        """The backend switched protocols: hand the connection to the exchange that asked, if it did."""
        switching, self._switching = self._switching, False
        exchange = self.exchange
        if exchange is None or not switching or not getattr(exchange, "upgrade", False):
            # A 101 nobody asked for (or an upgrade in an interim answer):
            # the backend is confused, and this is no longer HTTP.
            self._failed("the backend switched protocols without being asked")
            return
        self.exchange = None
        cast(UpgradeExchange, exchange).backend_switched(self, self._reason, self._headers, rest)

    def on_message_begin(self) -> None:
        if self.exchange is None:
            self._stray = True  # a response nobody asked for, right after one

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.connected = False
        if self.tunnel is not None:
            self.tunnel.backend_lost()
            return
        if self.pool is not None:
            self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._head_done and not self._skip_body:
            try:
                # A close-delimited body ends with the connection.
                self._parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if exchange.backend_closed_complete():
                exchange.backend_done(None)
                return
        exchange.backend_failed(reason.getErrorMessage(), self._head_done)

    def close(self) -> None:
        self.connected = False
        if self.pool is not None:
            self.pool.forget(self)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
