"""
HTTP/1.1 on the relay: a raw Twisted protocol on each client connection,
parsing requests with llhttp (through C{httptools}, as uvicorn does), each
request an L{tenantedge.exchange.Exchange} to the backend, answered in
order (pipelining), with the limits a public edge needs: head size and
line count (431), a deadline for the whole head (408), an idle keep-alive
timeout, transfer codings other than chunked refused (501).

Why not twisted.web here: measured on this kind of machine, a
C{Site} + C{Agent} proxy spent about half its time in the Agent (URL
parsing, endpoint creation, producer churn per request) and most of the
rest building C{Request} and C{Headers} objects nobody reads. Embedders'
own sites use the twisted.web resource (L{tenantedge.proxy.ProxyResource}),
with the same header rules.

An HTTP/1.1 C{Upgrade} request (WebSocket) keeps its C{Connection:
upgrade} and C{Upgrade} headers to the backend (C{h2c} excepted, see
L{tenantedge.headers.REFUSED_UPGRADES}); nothing the client sends after
it is parsed as HTTP. On the backend's C{101} both connections become a
L{tenantedge.tunnel.Tunnel}; any other answer is an ordinary response.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import httptools
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import BackendConnection
from .exchange import PENDING_BODY, Exchange, Relay, upstream_head
from .headers import upgrade_offer
from .tunnel import Tunnel
from .writethrough import set_no_delay

__all__ = ["H1ProxyProtocol", "MAX_HEAD", "MAX_HEADERS"]

#: Largest request head (request line and headers) accepted: 431 beyond.
MAX_HEAD = 32 * 1024
#: Most request header lines accepted: 431 beyond.
MAX_HEADERS = 100
class H1ProxyProtocol(Protocol):
    """
    One client connection speaking HTTP/1.1 (over TLS, after ALPN chose
    it), relayed request by request to the backend.

    @ivar server_name: the name the TLS certificate was chosen for; a
        request for another C{Host} gets 421.
    """

    _log = Logger()

    def __init__(self, proxy: Relay, server_name: str) -> None:
        self.proxy = proxy
        self.server_name = server_name
        self.peer = ""
        self._parser = httptools.HttpRequestParser(self)
        self._exchange: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._closing = False
        self._stopped = False
        self._paused = False
        self._idle_timer: Any = None
        self._in_head = False
        self._head_bytes = 0
        #: The upgrade request whose answer decides what the bytes after
        #: it are; C{_held} keeps those bytes (None: not there yet).
        self._upgrade: Exchange | None = None
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._tunnel: Tunnel | None = None
        self._reset_head()

    def _reset_head(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        #: Fields after a chunked body (llhttp reports them as headers).
        self._trailers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._current: Exchange | None = None
        self._refused = False

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.proxy.connections.add(self)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = str(getattr(peer, "host", ""))
        set_no_delay(self.transport)
        self._arm_idle()

    def dataReceived(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.from_client(data)
            return
        if self._closing:
            return
        if self._held is not None:
            self._hold(data)
            return
        if self._stopped:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            waiting = self._upgrade
            if waiting is None or waiting.finished:
                # An upgrade the edge does not relay (h2c, a refused
                # request): it went as a plain request; close after it.
                self._closing_after_current()
                return
            # What follows is not HTTP, whatever it looks like: held until
            # the backend's answer says what it is.
            self._held = []
            self._hold(data[e.args[0]:])
            return
        except httptools.HttpParserError:
            self._stop_reading()
            if self._refused:
                return  # the refusal is queued and answers in its turn
            if self._exchange is None and self._current is None:
                self._answer_now(400, "malformed request")
            elif self._current is not None and not self._current.finished:
                # Broken mid-body: nothing sensible can follow.
                self._closing = True
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                # Broken after its answer went out (or between requests in a
                # pipeline): answer what is pending, then close.
                self._closing_after_current()
            return
        if self._in_head:
            # llhttp reports a header only once its line is complete, so a
            # never-ending line must be counted here.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._stop_reading()
                self._refused = True
                self.proxy.events["head-too-large"] += 1
                self._answer_now(431, "")

    def _stop_reading(self) -> None:
        """No more input will be parsed on this connection."""
        self._stopped = True
        if not self._closing:
            self.pause_reading()

    def _hold(self, data: bytes) -> None:
        """Keep bytes sent after an upgrade request (bounded: beyond, the client waits)."""
        assert self._held is not None
        if data:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > PENDING_BODY:
                self.pause_reading()

    def sent_past_upgrade(self) -> bool:
        """Did the client send anything after its upgrade request (not HTTP, then)?"""
        return bool(self._held_size)

    def switch_protocols(self, exchange: Exchange, backend: BackendConnection, from_backend: bytes) -> None:
        """
        The backend switched protocols for C{exchange}: from now on this
        connection and C{backend} are one byte pipe (L{Tunnel}). No HTTP
        timer of this connection runs any more; the tunnel has its own.
        """
        self._exchange = None
        self._upgrade = None
        self._cancel_idle()
        held, self._held = self._held or [], None
        self._held_size = 0
        self._paused = False  # the tunnel resumes the transport
        proxy = self.proxy
        tunnel = Tunnel(self.transport, backend.transport, proxy.clock, proxy.websocket_idle_timeout,
                        proxy.tunnel_closed)
        self._tunnel = backend.tunnel = tunnel
        proxy.tunnels.add(tunnel)
        tunnel.start(b"".join(held), from_backend)

    def abort(self) -> None:
        self._closing = True
        self._cancel_idle()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.proxy.connections.discard(self)
        self._closing = True
        self._cancel_idle()
        if self._tunnel is not None:
            self._tunnel.client_lost()
        for exchange in [self._exchange, *self._queue, self._current]:
            if exchange is not None and not exchange.finished:
                exchange.finished = True
                exchange.abandon_backend()
        self._exchange = None
        self._queue.clear()

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def resume_paused_transport(self) -> None:
        """Resume reading after back-pressure, unless this protocol itself paused it."""
        if not self._paused and not self._closing:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _arm_idle(self) -> None:
        self._arm_timer(self.proxy.idle_timeout, self._idle_timed_out)

    def _arm_timer(self, seconds: float, call: Callable[[], None]) -> None:
        if self._closing or self._tunnel is not None:
            return
        self._cancel_idle()
        self._idle_timer = self.proxy.clock.callLater(seconds, call)

    def _head_timed_out(self) -> None:
        self._idle_timer = None
        self.proxy.events["header-timeout"] += 1
        if self._exchange is None and not self._queue:
            self._stop_reading()
            self._refused = True
            self._answer_now(408, "")
        else:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        self.proxy.events["idle-timeout"] += 1
        self._closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    # -- llhttp callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()
        self._in_head = True
        self._head_bytes = 0
        # The idle timer becomes the head's deadline.
        self._arm_timer(self.proxy.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            self._refuse(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        fields = self._headers if self._current is None else self._trailers
        fields.append((name, value))
        if self._head_size > MAX_HEAD or len(fields) > MAX_HEADERS:
            self._refuse(431)

    def _refuse(self, code: int) -> None:
        if not self._refused:
            self._refused = True
            self.proxy.events["head-too-large"] += 1
            if self._current is not None:
                # Too many trailer fields: the request's body was under
                # way, its backend request cannot be finished, and no
                # answer can be put in order behind it: close (which
                # abandons the backend request).
                self._closing = True
                self.transport.abortConnection()  # type: ignore[union-attr]
            else:
                self._answer_now(code, "")
            raise httptools.HttpParserCallbackError("refused")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_idle()
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version().encode("ascii")
        upgrade: bytes | None = None
        if parser.should_upgrade():
            upgrade = self._upgrade_relayed(method, version)
            if upgrade is None:
                self.proxy.upgrades["refused"] += 1
        # An upgrade not relayed leaves the parser stopped: close after it.
        keep_alive = parser.should_keep_alive() and (upgrade is not None or not parser.should_upgrade())
        problem, head, chunked, referer, agent, expect = self._upstream_head(method, version, upgrade)
        exchange = Exchange(self, method, self._url, version, keep_alive, head, chunked, referer, agent)
        self._current = exchange
        if problem is not None:
            exchange.problem = problem
            exchange.request_done = True
            if upgrade is not None:
                self.proxy.upgrades["refused"] += 1
        else:
            if expect:
                exchange.expect_continue = True
            if upgrade is not None:
                exchange.upgrade = True
                self._upgrade = exchange
        self._enqueue(exchange)

    def _upgrade_relayed(self, method: bytes, version: bytes) -> bytes | None:
        """
        The C{Upgrade} to relay for the request whose head just ended, or
        None: only HTTP/1.1 (an HTTP/1.0 C{Upgrade} must be ignored, RFC
        9110 7.8), not CONNECT, no body (what would follow it is another
        protocol's), and a protocol the edge relays (never h2c).
        """
        if version != b"1.1" or method == b"CONNECT":
            return None
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"transfer-encoding" or (lower == b"content-length" and value.strip() != b"0"):
                return None
        return upgrade_offer(self._headers)

    def on_body(self, data: bytes) -> None:
        current = self._current
        if current is not None and current.problem is None:
            current.body(data)

    def on_message_complete(self) -> None:
        exchange, self._current = self._current, None
        if exchange is None:
            return
        if not exchange.finished:
            exchange.body_done(self._trailers)
        else:
            exchange.request_done = True
            if exchange is self._exchange:
                # Its response went out before its body was all in.
                self._advance(exchange)

    # -- requests -----------------------------------------------------------------------------

    def _upstream_head(
        self, method: bytes, version: bytes, upgrade: bytes | None = None
    ) -> tuple[tuple[int, str] | None, bytes, bool, bytes, bytes, bool]:
        return upstream_head(method, self._url, self._headers, self.peer, self.server_name, self.proxy,
                             upgrade=upgrade)

    def _enqueue(self, exchange: Exchange) -> None:
        if self._exchange is None:
            self._exchange = exchange
            if not exchange.finished:
                self._begin(exchange)
        else:
            # Pipelined: answered in order, one at a time.
            self._queue.append(exchange)
            self.pause_reading()

    def _begin(self, exchange: Exchange) -> None:
        if exchange.problem is not None:
            exchange.fail(*exchange.problem, quiet=True)
            return
        if exchange.expect_continue:
            # The body is acceptable (its length passed the limit): ask for it.
            exchange.expect_continue = False
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        exchange.start()

    def _answer_now(self, code: int, detail: str) -> None:
        """Refuse the request being read: at once, or in its turn behind those in flight."""
        exchange = Exchange(self, b"GET", self._url or b"-", b"1.1", False, b"", False, b"", b"")
        exchange.request_done = True
        exchange.problem = (code, detail)
        self._current = None
        self._enqueue(exchange)

    def _closing_after_current(self) -> None:
        if self._exchange is None:
            self._close()
        else:
            for exchange in [self._exchange, *self._queue]:
                exchange.keep_alive = False

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is not self._exchange:
            # Finished out of turn (an error answered before its turn is
            # impossible: errors answer in order); keep it queued.
            return
        if not exchange.request_done and exchange.keep_alive:
            # The response is out but the request body is still coming:
            # the next request starts after it (on_message_complete).
            return
        self._advance(exchange)

    def _advance(self, exchange: Exchange) -> None:
        self._exchange = None
        if exchange is self._upgrade:
            # Answered without a switch: HTTP goes on, on a fresh parser
            # (the old one stopped at the upgrade), unless the client sent
            # more already, which cannot be read as HTTP.
            self._upgrade = None
            held, self._held = self._held, None
            if self._held_size:
                self._close()
                return
            if held is not None:
                self._parser = httptools.HttpRequestParser(self)
        if not exchange.keep_alive:
            self._close()
            return
        while self._queue:
            nxt = self._queue.popleft()
            self._exchange = nxt
            if not self._queue:
                self.resume_reading()
            if nxt.finished:
                continue
            self._begin(nxt)
            return
        self._arm_idle()

    def exchange_aborted(self, exchange: Exchange) -> None:
        self._closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _close(self) -> None:
        # Every exchange has released its producer by now, so a TLS
        # transport closes at once once its buffer is flushed.
        self._closing = True
        self.transport.loseConnection()  # type: ignore[union-attr]
