"""
The request relay both client protocols share: one L{Exchange} per request
(HTTP/1.1 on L{tenantedge.http1}, an HTTP/2 stream on L{tenantedge.http2})
from the client's request head to the last byte of the backend's response,
over the pooled, balanced backend connections of L{tenantedge.backend}.

Every proxy rule lives here once (with the header functions of
L{tenantedge.headers}): C{Host} kept, in canonical form, and checked
against the TLS name (421); C{X-Forwarded-*} set afresh (only a
C{--trusted-proxy} peer's C{X-Forwarded-For} chain is kept,
L{tenantedge.forwarding}); hop-by-hop and edge-only headers dropped both
ways; 502 when no backend answers, 504 when it is slow; request and
response bodies streamed with back-pressure; the body limit (413); and the
backend request abandoned (its connection closed) as soon as the client
goes away, at every stage. L{Relay} holds what every exchange shares.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import NO_RESPONSE_BODY, BackendConnection, BackendPool, Backends
from .forwarding import TrustedProxies, forwarded_for
from .headers import HOP_BY_HOP, LAST_CHUNK, connection_tokens, edge_only, error_body, trailer_block
from .hostnames import InvalidHostname, canonical_host_header, host_from_header
from .tunnel import Tunnel

__all__ = ["AccessLog", "DETAILS", "Exchange", "ExchangeClient", "REASONS", "Relay", "upstream_head"]

#: Seconds a client has to send a whole request head once it has begun
#: (a byte every few seconds must not hold a connection for ever); the
#: default of C{--header-timeout}.
HEADER_TIMEOUT = 15.0
#: Request body bytes held while the backend connection is being made;
#: beyond this the client is paused. Also what a client may send after an
#: upgrade request before the backend's answer.
PENDING_BODY = 256 * 1024
#: Seconds an upgraded (WebSocket) connection may carry nothing either way.
WEBSOCKET_IDLE_TIMEOUT = 600.0

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
REASONS = {101: b"Switching Protocols", 501: b"Not Implemented", 408: b"Request Timeout", 400: b"Bad Request", 413: b"Content Too Large", 421: b"Misdirected Request",
            431: b"Request Header Fields Too Large", 502: b"Bad Gateway", 504: b"Gateway Timeout"}


class AccessLog:
    """The combined log format, written to a file (C{--access-log})."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "ab", buffering=64 * 1024)
        self._second = -1
        self._stamp = b""

    def log(self, peer: str, method: bytes, path: bytes, version: bytes, code: int, length: int | None,
            referer: bytes, agent: bytes) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)).encode()
        self._file.write(
            b'%s - - [%s] "%s %s HTTP/%s" %d %s "%s" "%s"\n'
            % (peer.encode(), self._stamp, method, _escape(path), version, code,
               b"-" if length is None else b"%d" % length, _escape(referer) or b"-", _escape(agent) or b"-")
        )
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _escape(value: bytes) -> bytes:
    return value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


class Relay:
    """
    What every L{H1ProxyProtocol} shares: the backends, limits and hooks.

    @ivar backends: the backends requests are balanced over (given one
        L{BackendPool}, the only one).
    @ivar prefix: the backend URL's path, put before each request path.
    @ivar timeout: seconds to wait for the backend's response headers (504).
    @ivar max_body_size: largest request body (0: no limit), else 413.
    @ivar observe: C{observe(status, seconds)} for each request, for metrics.
    @ivar access_log: where to log requests, if anywhere.
    @ivar header_timeout: seconds a client has to send a whole request
        head once it began (408; C{--header-timeout}).
    @ivar idle_timeout: seconds a keep-alive connection may stay idle
        between requests (C{--idle-timeout}).
    @ivar trusted_proxies: the peers whose C{X-Forwarded-For} chain is
        kept (C{--trusted-proxy}), or C{None}.
    @ivar events: requests and connections refused or closed by a limit,
        by reason (C{header-timeout}, C{idle-timeout}, C{head-too-large},
        C{body-too-large}), for metrics and the limits summary.
    @ivar websocket_idle_timeout: seconds an upgraded connection may carry
        nothing in either direction before both sides are closed; 0 for
        no limit.
    @ivar upgrades: upgrade requests by result: C{switched} (the backend
        answered 101), C{declined} (it answered anything else), C{failed}
        (502 or 504), C{refused} (relayed without the upgrade: h2c, a
        body, HTTP/1.0, or refused by the edge as any request may be).
    @ivar tunnels: upgraded connections open now.
    """

    _log = Logger()

    def __init__(
        self, pool: BackendPool | Backends, clock: IReactorTime, prefix: bytes = b"", timeout: float = 60.0,
        max_body_size: int = 0, observe: Callable[[int, float], None] | None = None,
        access_log: AccessLog | None = None, idle_timeout: float = 60.0,
        header_timeout: float = HEADER_TIMEOUT, trusted_proxies: TrustedProxies | None = None,
        events: Counter[str] | None = None,
        websocket_idle_timeout: float = WEBSOCKET_IDLE_TIMEOUT,
    ) -> None:
        self.backends = pool if isinstance(pool, Backends) else Backends(clock, [pool])
        self.clock = clock
        self.prefix = prefix.rstrip(b"/")
        self.timeout = timeout
        self.max_body_size = max_body_size
        self.observe = observe
        self.access_log = access_log
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.trusted_proxies = trusted_proxies
        self.events: Counter[str] = events if events is not None else Counter()
        self.websocket_idle_timeout = websocket_idle_timeout
        #: Open client connections, closed when the server stops.
        self.connections: set[Any] = set()  # H1ProxyProtocol and H2ProxyProtocol: abort()
        self.upgrades: Counter[str] = Counter()
        self.tunnels: set[Tunnel] = set()

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        """Both ends of an upgraded connection are gone."""
        self.tunnels.discard(tunnel)

    def close_all(self) -> None:
        """Close every client connection (the server is stopping)."""
        for connection in list(self.connections):
            connection.abort()




class ExchangeClient(TypingProtocol):
    """
    What an L{Exchange} needs of the client side it answers: an HTTP/1.1
    connection (L{tenantedge.http1.H1ProxyProtocol}) or an HTTP/2 stream.
    """

    #: What every exchange of this client shares.
    proxy: Relay
    #: The client's address, for X-Forwarded-For and the access log.
    peer: str
    #: What the backend transport pauses when the upload outruns it (a
    #: push producer: the client's transport, or the stream).
    transport: Any

    def pause_reading(self) -> None:
        """Stop taking request bytes for now."""

    def resume_reading(self) -> None:
        """Take request bytes again."""

    def resume_paused_transport(self) -> None:
        """Resume what back-pressure paused, unless the client itself paused it."""

    def write(self, data: bytes) -> None:
        """Bytes for the client (HTTP/1.1 framing; an HTTP/2 exchange sends its own frames)."""

    def sent_past_upgrade(self) -> bool:
        """Did the client send bytes after an upgrade request (so not HTTP)?"""

    def exchange_finished(self, exchange: Exchange) -> None:
        """The response is complete."""

    def exchange_aborted(self, exchange: Exchange) -> None:
        """The response was cut: the client must not take it as complete."""

    def switch_protocols(self, exchange: Exchange, backend: BackendConnection, from_backend: bytes) -> None:
        """The backend switched protocols (101): join the two connections."""


class Exchange:
    """
    One request and its response: from the client's request head to the
    last byte of the backend's response (or the error that replaced it).
    """

    __slots__ = (
        "client", "proxy", "method", "path", "version", "keep_alive", "head", "chunked", "started",
        "backend", "connecting", "pending", "pending_size", "request_done", "response_started",
        "response_chunked", "response_close", "timer", "code", "sent", "finished", "retried",
        "referer", "agent", "body_limit", "body_seen", "close_delimited", "expect_continue", "up", "down",
        "problem", "backend_framed", "pool", "tried", "upgrade", "last_chunk", "out",
    )

    def __init__(self, client: ExchangeClient, method: bytes, path: bytes, version: bytes, keep_alive: bool,
                 head: bytes, chunked: bool, referer: bytes, agent: bytes) -> None:
        self.client = client
        self.proxy = client.proxy
        self.method = method
        self.path = path
        self.version = version
        self.keep_alive = keep_alive
        self.head = head
        self.chunked = chunked
        #: What ends a chunked body: the last chunk, with the client's trailers if it sent any.
        self.last_chunk = LAST_CHUNK
        #: Bytes for the client held while one backend read is parsed
        #: (L{read_begin}), so that a response's head, body and end leave
        #: as one TLS write; C{None} outside a read.
        self.out: list[bytes] | None = None
        self.started = self.proxy.clock.seconds()
        self.backend: BackendConnection | None = None
        self.connecting: defer.Deferred[BackendConnection] | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.request_done = False
        self.response_started = False
        self.response_chunked = False
        self.response_close = False
        self.close_delimited = False
        self.timer: Any = None
        self.code = 0
        self.sent: int | None = None
        self.finished = False
        self.retried = False
        self.referer = referer
        self.agent = agent
        self.body_seen = 0
        self.body_limit = self.proxy.max_body_size
        self.expect_continue = False
        #: The backend transport has the client as its producer (upload
        #: back-pressure), and the client transport the backend (download).
        self.up: Any = None
        self.down: Any = None
        #: (code, detail) when the request is refused without the backend.
        self.problem: tuple[int, str] | None = None
        #: The backend's response had its own framing (chunked): its end is
        #: the last chunk, never the connection closing.
        self.backend_framed = False
        #: The backend chosen for this request, until its outcome is told
        #: (L{Backends.done}).
        self.pool: BackendPool | None = None
        #: The backends that failed this request, once one has.
        self.tried: tuple[BackendPool, ...] = ()
        #: The request went to the backend with its upgrade headers.
        self.upgrade = False

    def release_producers(self) -> None:
        """
        Undo any producer registration this exchange made, and resume what
        back-pressure had paused: Twisted resumes a paused producer only
        when the consumer's buffer drains, and an unregistered one never,
        so a kept-alive connection would otherwise stay paused for good.
        """
        up, self.up = self.up, None
        if up is not None:
            up.unregisterProducer()
            self.client.resume_paused_transport()
        down, self.down = self.down, None
        if down is not None:
            down.unregisterProducer()
            backend = self.backend
            if backend is not None and backend.transport is not None:
                backend.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- request direction ---------------------------------------------------------

    def start(self) -> None:
        pool = self.pool = self.proxy.backends.choose()
        conn = pool.take()
        if conn is not None:
            self._connected(conn)
            return
        self._open(pool)

    def _open(self, pool: BackendPool) -> None:
        d = pool.open()
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: BackendConnection) -> None:
        self.connecting = None
        if self.finished:
            self.proxy.backends.give_back(conn)
            return
        self.backend = conn
        conn.pool = None
        data = [self.head, *self.pending]
        if self.request_done and self.chunked:
            data.append(self.last_chunk)
        self.pending = []
        conn.send(self, b"".join(data))
        if self.pending_size:
            self.pending_size = 0
            self.client.resume_reading()
        self.timer = self.proxy.clock.callLater(self.proxy.timeout, self._timed_out)
        if not self.request_done:
            # Back-pressure: a slow backend slows the upload.
            self.up = conn.transport
            self.up.registerProducer(self.client.transport, True)

    def _connect_failed(self, reason: Failure) -> None:
        self.connecting = None
        if self.finished or reason.check(defer.CancelledError):
            return
        detail = f"cannot connect to the backend: {reason.getErrorMessage()}"
        refused = reason.check(error.ConnectionRefusedError, ConnectionRefusedError) is not None
        # Nothing of the request left the edge (its body waits in
        # self.pending): another backend may take it, whatever the method.
        if not self._failed_over(detail, refused):
            self.fail(502, detail)

    def _failed_over(self, detail: str, refused: bool = False, same_again: bool = False) -> bool:
        """
        Tell the balancer this request's backend failed it, and start it
        again on another (or, with C{same_again}, once more on the same one
        on a fresh connection when no other is up). False: nowhere left.
        """
        failed, self.pool = self.pool, None
        backends = self.proxy.backends
        if failed is None:
            return False
        backends.done(failed, False, detail, refused)
        self.tried = tried = (*self.tried, failed)
        pool = backends.choose_other(tried)
        if pool is None:
            if not same_again or self.retried:
                return False
            self.retried = True
            pool = backends.again(failed)
        self.pool = pool
        conn = pool.take() if pool is not failed else None
        if conn is not None:
            self._connected(conn)
        else:
            self._open(pool)
        return True

    def _release(self, ok: bool | None, detail: str = "") -> None:
        """Tell the balancer how this request's backend did."""
        pool = self.pool
        if pool is not None:
            self.pool = None
            self.proxy.backends.done(pool, ok, detail)

    def body(self, data: bytes) -> None:
        self.body_seen += len(data)
        if self.body_limit and self.body_seen > self.body_limit:
            if self.finished:
                # Answered early (the backend did not wait for the body):
                # the rest is read and dropped, up to the limit.
                self.read_done()
                self.client.exchange_aborted(self)
            else:
                self.fail(413, "request body over the limit", quiet=True)
            return
        if self.finished:
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.backend is not None:
            self.backend.transport.write(data)  # type: ignore[union-attr]
        else:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_BODY:
                self.client.pause_reading()

    def body_done(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """
        The request body is complete; C{trailers} are the fields the
        client sent after it. They reach the backend at the end of a
        chunked body; a body sent with its length has no place for them
        (HTTP/1.1), so they are dropped and counted (C{trailers-dropped}).
        """
        self.request_done = True
        if trailers:
            if self.chunked:
                self.last_chunk = trailer_block(trailers)
            else:
                self.proxy.events["trailers-dropped"] += 1
        if self.backend is not None:
            if self.chunked:
                self.backend.transport.write(self.last_chunk)  # type: ignore[union-attr]
            up, self.up = self.up, None
            if up is not None:
                up.unregisterProducer()
                self.client.resume_paused_transport()

    # -- response direction ---------------------------------------------------------

    def _head_arrived(self, code: int) -> None:
        """The backend's response head is in: no more deadline; time it."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.code = code
        proxy = self.proxy
        if proxy.observe is not None:
            proxy.observe(code, proxy.clock.seconds() - self.started)

    def backend_interim(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if code == 100 and self.expect_continue:
            self.expect_continue = False
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def response_headers(self, headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """
        The backend's final response headers as the client gets them, for
        either protocol: hop-by-hop ones and those its C{Connection} names
        dropped (an unparsable C{Content-Length} too); and the declared
        length. Notes whether the backend framed the body itself, and
        counts an upgrade request this answer declines.
        """
        if self.upgrade:
            # Declined: an ordinary response, after which the connection
            # goes on as HTTP unless the client already sent more.
            self.proxy.upgrades["declined"] += 1
            if self.client.sent_past_upgrade():
                self.keep_alive = False
        extra = connection_tokens(headers)
        kept: list[tuple[bytes, bytes]] = []
        length: int | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                self.backend_framed = True
            if lower in HOP_BY_HOP or lower in extra:
                continue
            if lower == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    continue
            kept.append((name, value))
        return kept, length

    def backend_head(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self._head_arrived(code)
        kept, length = self.response_headers(headers)
        out = [b"HTTP/1.1 %d %s\r\n" % (code, reason or REASONS.get(code, b"OK"))]
        for name, value in kept:
            out.append(b"%s: %s\r\n" % (name, value))
        has_body = self.method != b"HEAD" and code not in NO_RESPONSE_BODY
        if has_body and length is None:
            if self.version == b"1.1":
                self.response_chunked = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.close_delimited = True
                self.keep_alive = False
        if not keep_alive:
            self.response_close = True  # the backend closes: its body may end with the connection
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        elif self.version == b"1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.sent = length
        self.response_started = True
        self._send(b"".join(out))
        if self.backend is not None and has_body:
            self.down = self.client.transport
            self.down.registerProducer(self.backend.transport, True)

    def backend_switched(
        self, conn: BackendConnection, reason: bytes, headers: list[tuple[bytes, bytes]], rest: bytes
    ) -> None:
        """
        The backend answered the upgrade with C{101}: relay that head
        (hop-by-hop headers dropped, C{Connection: upgrade} and C{Upgrade}
        kept), and join the two connections.
        """
        if self.finished:
            conn.close()
            return
        self._head_arrived(101)
        extra = connection_tokens(headers) - {b"upgrade"}
        out = [b"HTTP/1.1 101 %s\r\n" % (reason or REASONS[101])]
        for name, value in headers:
            lower = name.lower()
            if lower == b"upgrade":
                out.append(b"Upgrade: %s\r\n" % (value,))
                continue
            if lower in HOP_BY_HOP or lower in extra:
                continue
            out.append(b"%s: %s\r\n" % (name, value))
        out.append(b"Connection: Upgrade\r\n\r\n")
        self._send(b"".join(out))
        self.read_done()  # the 101 head, before any tunnelled byte and the producers go
        self.response_started = True
        self.release_producers()
        self.backend = None
        self.finished = True
        self.proxy.upgrades["switched"] += 1
        self._log_access()
        self.client.switch_protocols(self, conn, rest)

    def backend_body(self, data: bytes) -> None:
        if self.finished:
            return
        if self.response_chunked:
            self._send(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._send(data)

    def backend_closed_complete(self) -> bool:
        """Did a close-delimited response (no length, not chunked) just end normally?"""
        return self.response_started and self.response_close and self.sent is None and not self.backend_framed

    def backend_done(self, conn: BackendConnection | None) -> None:
        if self.finished:
            return
        if self.response_chunked:
            self._send(b"0\r\n\r\n")
        # Out before the client transport loses its producer: a closing TLS
        # transport drops what is written once it has none.
        self.read_done()
        self.backend = conn
        self.release_producers()
        self.backend = None
        if conn is not None:
            if self.request_done and not self.response_close and conn.home is not None:
                conn.home.give_back(conn)
            else:
                conn.close()
        self._finished()

    def backend_failed(self, detail: str, head_done: bool) -> None:
        if self.finished:
            return
        self.backend = None
        if not self.response_started:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
            if not head_done and self.method in _IDEMPOTENT and not self.body_seen:
                # A pooled connection the backend closed under us, or a
                # backend gone: once more on another backend, else on a
                # fresh connection to this one.
                if self._failed_over(detail, same_again=True):
                    return
            else:
                self._release(False, detail)
            self.fail(502, detail)
        else:
            # Part of the response is out: cut the client off rather than
            # let a truncated body look complete.
            self.finished = True
            self.read_done()  # what the read made, before the producers go
            self._release(None)
            self.release_producers()
            self.client.exchange_aborted(self)

    def _timed_out(self) -> None:
        self.timer = None
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.exchange = None
            backend.close()
        self.fail(504, f"no response headers within {self.proxy.timeout:g}s")

    # -- endings ---------------------------------------------------------------------

    def _failing(self, code: int, detail: str, quiet: bool) -> bool:
        """
        The part of a failure common to every client: log, drop the backend
        side, and cut a response already begun. True if an error page is
        still to be sent.
        """
        if self.finished:
            return False
        if not quiet and code >= 500:
            self.proxy._log.warn(
                "backend request for {path} failed with {code}: {error}",
                path=self.path.decode("ascii", "replace")[:200], code=code, error=detail,
            )
        self.read_done()  # what the read made, before the producers go
        self.abandon_backend()
        if self.upgrade:
            self.proxy.upgrades["failed"] += 1
            if self.client.sent_past_upgrade():
                self.keep_alive = False  # what it sent cannot be read as HTTP
        if self.response_started:
            self.finished = True
            self.client.exchange_aborted(self)
            return False
        if self.proxy.observe is not None and code >= 500:
            self.proxy.observe(code, self.proxy.clock.seconds() - self.started)
        self.code = code
        return True

    def _error_page(self, code: int, detail: str, quiet: bool) -> bytes | None:
        """
        The body of the error page to answer with (both protocols), or
        None when there is none to send (finished, or the response began
        and the client was cut off).
        """
        if not self._failing(code, detail, quiet):
            return None
        if code == 413:
            self.proxy.events["body-too-large"] += 1
        return error_body(code, REASONS[code].decode(), DETAILS.get(code, detail))

    def fail(self, code: int, detail: str, quiet: bool = False) -> None:
        """Answer with an error page (or cut the connection if the response began)."""
        body = self._error_page(code, detail, quiet)
        if body is None:
            return
        closing = code in (400, 408, 413, 431, 501) or not self.request_done or not self.keep_alive
        if closing:
            self.keep_alive = False
        self.sent = len(body)
        self._send(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\n"
            b"Content-Length: %d\r\n%s\r\n%s"
            % (code, REASONS[code], len(body), b"Connection: close\r\n" if closing else b"", body)
        )
        self.response_started = True
        self._finished()

    def abandon_backend(self) -> None:
        """Stop whatever the backend side is doing (client gone, error)."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.pool is not None:
            self._release(None)
        self.release_producers()
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.exchange = None
            backend.close()

    def _finished(self) -> None:
        self.finished = True
        self._log_access()
        self.read_done()  # before the client may go on to the next request, or close
        self.client.exchange_finished(self)

    def _send(self, data: bytes) -> None:
        if self.out is not None:
            self.out.append(data)
        else:
            self.client.write(data)

    def read_begin(self) -> None:
        """The backend connection is about to parse one read: hold what it makes for the client."""
        if self.out is None:
            self.out = []

    def read_done(self) -> None:
        """Send what the read made, in one write (and write directly again)."""
        out, self.out = self.out, None
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))

    def _log_access(self) -> None:
        proxy = self.proxy
        pool = self.pool
        if pool is not None:
            self.pool = None
            proxy.backends.done(pool)
        if proxy.access_log is not None:
            proxy.access_log.log(self.client.peer, self.method, self.path, self.version, self.code, self.sent,
                                 self.referer, self.agent)


DETAILS = {
    502: "The application is not reachable right now.",
    504: "The application did not answer in time.",
    413: "The request body is larger than this server accepts.",
    431: "The request headers are too large.",
}


def upstream_head(
    method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], peer: str, server_name: str, proxy: Relay,
    upgrade: bytes | None = None,
) -> tuple[tuple[int, str] | None, bytes, bool, bytes, bytes, bool]:
    """
    Validate a request head and build the backend's: (problem, head,
    chunked, referer, user agent, expects 100-continue). C{problem} is
    (status, detail) for a request refused without the backend.

    C{X-Forwarded-For} is C{peer}, or, when C{peer} is one of the
    proxy's trusted proxies, the chain the request carried followed by
    C{peer} (L{tenantedge.forwarding}); every other forwarding header is
    the edge's own.

    @param upgrade: the C{Upgrade} value to relay (with C{Connection:
        upgrade}); every other hop-by-hop header is dropped all the same.
    """
    hosts: list[bytes] = []
    chain: list[bytes] = []
    extra = connection_tokens(headers)
    out = [b"%s %s%s HTTP/1.1\r\n" % (method, proxy.prefix, url)]
    chunked = False
    length = None
    referer = agent = b""
    expect = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            hosts.append(value)
            continue
        if lower == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                return (501, "Only the chunked transfer coding is accepted."), b"", False, referer, agent, False
            chunked = True
            continue
        if lower == b"content-length":
            length = value
            continue
        if lower == b"expect":
            expect = value.strip().lower() == b"100-continue"
            continue
        if lower == b"referer":
            referer = value
        elif lower == b"user-agent":
            agent = value
        if lower in HOP_BY_HOP or lower in extra:
            continue
        if edge_only(lower):
            if lower == b"x-forwarded-for" and proxy.trusted_proxies is not None:
                chain.append(value)
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    if not url.startswith(b"/"):
        return (400, "Only origin-form request targets are accepted."), b"", False, referer, agent, False
    if len(hosts) != 1:
        return (400, "The request needs exactly one Host header."), b"", False, referer, agent, False
    try:
        host_name = host_from_header(hosts[0])
        # Forwarded in canonical form: lower case, no trailing dot, no :443.
        host = canonical_host_header(host_name, hosts[0])
    except InvalidHostname:
        return (400, "The Host header is not a valid host name."), b"", False, referer, agent, False
    if host_name != server_name:
        return (421, "This connection was opened for another host name."), b"", False, referer, agent, False
    limit = proxy.max_body_size
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            return (400, "Bad Content-Length."), b"", False, referer, agent, False
        if limit and declared > limit:
            return (413, ""), b"", False, referer, agent, False
        if not chunked:
            out.append(b"Content-Length: %s\r\n" % (length,))
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    client = peer.encode("ascii", "replace")
    if chain and proxy.trusted_proxies is not None and proxy.trusted_proxies.trusts(peer):
        client = forwarded_for(chain, client)
    if upgrade is not None:
        out.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % (upgrade,))
    out.append(b"Host: %s\r\nX-Forwarded-For: %s\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: %s\r\n\r\n"
               % (host, client, host))
    return None, b"".join(out), chunked, referer, agent, expect and (chunked or length is not None)
