"""
The backend side of the relay: pooled keep-alive HTTP/1.1 connections to
the Next.js backends, parsing responses with llhttp (C{httptools}) and
handing each to the exchange that asked (L{BackendExchange}), on the
client's HTTP/1.1 connection or an HTTP/2 stream alike.

Several backends (one Next.js process per core, say) are one
L{BackendPool} each, balanced by L{Backends}: least outstanding requests,
round robin among ties, a failing backend ejected for a while (passive
health) and, with L{HealthCheck}, a periodic C{GET} on a health path
(active health).

After a C{101
Switching Protocols} to a request that asked for an upgrade
(L{UpgradeExchange}), a connection parses nothing more: it is one end of
a L{tenantedge.tunnel.Tunnel} and never goes back to the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol as TypingProtocol, cast

import attrs
import httptools
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .tunnel import Tunnel
from .writethrough import set_no_delay, write_through

__all__ = [
    "BACKEND_IDLE", "NO_RESPONSE_BODY", "BackendConnection", "BackendExchange", "BackendPool", "Backends",
    "HealthCheck", "UpgradeExchange",
]

#: Node (and so Next.js) closes idle keep-alive connections after 5 s; a
#: pooled connection idle longer than this is not reused.
BACKEND_IDLE = 4.0

NO_RESPONSE_BODY = frozenset({204, 304})

#: Consecutive failures (connect failures, connections reset before a
#: response) that eject a backend; one refused connection is enough.
FAIL_AFTER = 3
#: Seconds an ejected backend gets no traffic at first; doubled each time it
#: fails again right after coming back, up to L{MAX_COOLDOWN}.
COOLDOWN = 10.0
MAX_COOLDOWN = 60.0


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

    def read_begin(self) -> None:
        """One read from the backend is about to be parsed (what it makes for the client may be held)."""

    def read_done(self) -> None:
        """That read is parsed: send what it made."""


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

    The counters below are kept by L{Backends}, which balances over pools;
    a pool used on its own leaves them alone.

    @ivar connect: makes the endpoint for a new connection.
    @ivar max_idle: idle connections kept at most.
    @ivar name: the backend as logs and metrics name it (its URL without
        credentials).
    @ivar outstanding: requests given this backend and not yet done.
    @ivar requests: requests given this backend, ever.
    @ivar failures: requests this backend failed (no connection, or reset
        before its response), ever.
    @ivar consecutive: failures since its last good answer.
    @ivar up: whether it takes traffic (False: ejected or checked down).
    """

    def __init__(
        self, clock: IReactorTime, connect: Callable[[], IStreamClientEndpoint], idle: float = BACKEND_IDLE,
        max_idle: int = 256, name: str = "backend",
    ) -> None:
        self.clock = clock
        self.connect = connect
        self.idle = idle
        self.max_idle = max_idle
        self.name = name
        self._idle: list[BackendConnection] = []
        self._factory = _ConnectionFactory(self)
        self.opened = 0
        self.outstanding = 0
        self.requests = 0
        self.failures = 0
        self.consecutive = 0
        self.up = True

    def __repr__(self) -> str:
        return f"<BackendPool {self.name}>"

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
        return cast("defer.Deferred[BackendConnection]", self.connect().connect(self._factory))

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


class _ConnectionFactory(Factory):
    """Builds a pool's connections, each knowing the pool it belongs to."""

    noisy = False

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> BackendConnection:
        conn = BackendConnection()
        conn.factory = self
        conn.home = self.pool
        return conn


class BackendConnection(Protocol):
    """
    One connection to the backend, carrying one exchange at a time; parses
    responses with llhttp and hands them to the exchange.

    @ivar home: the pool that opened it (where it goes back after use).
    @ivar pool: the pool it is idle in, if any.
    """

    exchange: BackendExchange | None = None
    pool: BackendPool | None = None
    home: BackendPool | None = None
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
        exchange = self.exchange
        if exchange is None:
            self._received(data)
            return
        # What this read makes for the client (a small response's head,
        # body and end) leaves in one write: one TLS record and one send.
        exchange.read_begin()
        try:
            self._received(data)
        finally:
            exchange.read_done()

    def _received(self, data: bytes) -> None:
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


@attrs.define(eq=False)
class _Health:
    """What L{Backends} knows of one backend beyond its pool's counters."""

    cooldown: float
    #: Ejected by passive health (failures), until C{timer} fires.
    ejected: bool = False
    #: Marked down by the last active health check.
    checked_down: bool = False
    #: When it last stopped taking traffic (the oldest goes first when all are down).
    down_since: float = 0.0
    timer: IDelayedCall | None = None


class Backends:
    """
    Several backends (one L{BackendPool} each) balanced by least
    outstanding requests, round robin among ties; the pools are given in
    C{--backend} order.

    What an exchange does, on whatever protocol (the HTTP/1.1 relay, an
    HTTP/2 stream, L{tenantedge.proxy.ProxyResource}):

      1. C{pool = backends.choose()}: the backend for this request
         (counted as outstanding from now on);
      2. C{pool.take()} or C{pool.open()} for a connection, and
         C{pool.give_back(conn)} (or L{give_back}) after a clean exchange;
      3. exactly once per C{choose()}, C{backends.done(pool, ok)}: C{True}
         when the backend answered, C{False} when it failed before its
         response (no connection, reset, garbage), C{None} when there is no
         verdict (client gone, 504, a body cut off mid-way);
      4. after a failure that never reached the backend, or an idempotent
         bodiless request's reset,
         C{backends.choose_other(tried)} for another backend to retry on
         (None: no healthy one left, answer 502).

    Passive health: L{FAIL_AFTER} consecutive failures, or one refused
    connection, eject a backend for L{COOLDOWN} seconds, doubled (up to
    L{MAX_COOLDOWN}) each time it fails again on its first request back;
    one good answer resets that. An ejection and a return are logged once
    each, never a request. While every backend is down, requests still go
    to the one that has been down longest (like Envoy's panic threshold):
    a lone backend is tried on every request exactly as before there were
    several, a recovered one serves at once, and a wrong health path does
    not take the site down. So 502 means that the backends tried for this
    request all failed.
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, pools: Sequence[BackendPool], fail_after: int = FAIL_AFTER,
        cooldown: float = COOLDOWN, max_cooldown: float = MAX_COOLDOWN,
    ) -> None:
        if not pools:
            raise ValueError("at least one backend is needed")
        self.clock = clock
        self.pools = tuple(pools)
        self.fail_after = fail_after
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._health = {pool: _Health(cooldown) for pool in self.pools}
        self._next = 0

    # -- the request path -------------------------------------------------------------

    def choose(self) -> BackendPool:
        """The backend for a new request: fewest outstanding of those up, round robin among ties."""
        pools = self.pools
        n = len(pools)
        if n == 1:
            pool = pools[0]
        else:
            i = start = self._next
            best: BackendPool | None = None
            load = at = 0
            while True:
                candidate = pools[i]
                if candidate.up and (best is None or candidate.outstanding < load):
                    best, load, at = candidate, candidate.outstanding, i
                    if not load:
                        break
                i += 1
                if i == n:
                    i = 0
                if i == start:
                    break
            if best is None:
                best = self._down_longest()
                at = pools.index(best)
            pool = best
            self._next = at + 1 if at + 1 < n else 0
        pool.outstanding += 1
        pool.requests += 1
        return pool

    def choose_other(self, tried: Sequence[BackendPool]) -> BackendPool | None:
        """
        A backend to retry a failed request on: the least loaded of those
        up and not in C{tried}, or None. Like L{choose}, it counts.
        """
        best: BackendPool | None = None
        for pool in self.pools:
            if pool.up and pool not in tried and (best is None or pool.outstanding < best.outstanding):
                best = pool
        if best is not None:
            best.outstanding += 1
            best.requests += 1
        return best

    def again(self, pool: BackendPool) -> BackendPool:
        """Count one more request on C{pool} (a retry on the same backend)."""
        pool.outstanding += 1
        pool.requests += 1
        return pool

    def done(self, pool: BackendPool, ok: bool | None = True, detail: str = "", refused: bool = False) -> None:
        """
        A request L{choose} gave C{pool} ended: C{ok} is C{True} if the
        backend answered, C{False} if it failed before answering (C{detail}
        says how; C{refused}: the connection was refused, which ejects at
        once), C{None} for no verdict.
        """
        pool.outstanding -= 1
        if ok:
            if pool.consecutive or not pool.up:
                self._answered(pool)
        elif ok is not None:
            pool.failures += 1
            pool.consecutive += 1
            health = self._health[pool]
            if health.ejected:
                # Down already and tried anyway (every backend is down):
                # the next request tries another.
                health.down_since = self.clock.seconds()
            elif refused or pool.consecutive >= self.fail_after:
                self._eject(pool, health, detail)

    def give_back(self, conn: BackendConnection) -> None:
        """Return a connection whose exchange ended cleanly to the pool that opened it."""
        home = conn.home
        if home is None:
            conn.close()
        else:
            home.give_back(conn)

    # -- health -------------------------------------------------------------------------

    def healthy(self) -> int:
        """How many backends take traffic."""
        return sum(1 for pool in self.pools if pool.up)

    def checked(self, pool: BackendPool, ok: bool, detail: str = "") -> None:
        """An active health check's verdict on C{pool}."""
        health = self._health[pool]
        if ok:
            if health.checked_down or health.ejected:
                self._back(pool, health, "its health check passes")
            return
        if not health.checked_down:
            health.checked_down = True
            if pool.up:
                pool.up = False
                health.down_since = self.clock.seconds()
                self._log.warn("backend {backend} is down: its health check failed ({error})",
                               backend=pool.name, error=detail)

    def _answered(self, pool: BackendPool) -> None:
        health = self._health[pool]
        pool.consecutive = 0
        health.cooldown = self.cooldown
        if health.ejected:
            self._back(pool, health, "it answered")

    def _eject(self, pool: BackendPool, health: _Health, detail: str) -> None:
        seconds = health.cooldown
        health.cooldown = min(seconds * 2, self.max_cooldown)
        health.ejected = True
        health.timer = self.clock.callLater(seconds, self._cooled_down, pool)
        if pool.up:
            pool.up = False
            health.down_since = self.clock.seconds()
        self._log.warn(
            "backend {backend} ejected for {seconds:g}s after {failures} failure(s): {error}",
            backend=pool.name, seconds=seconds, failures=pool.consecutive, error=detail,
        )

    def _cooled_down(self, pool: BackendPool) -> None:
        health = self._health[pool]
        health.timer = None
        health.ejected = False
        # On probation: one more failure ejects it again, for longer.
        pool.consecutive = max(self.fail_after - 1, 0)
        if not health.checked_down:
            pool.up = True
            self._log.info("backend {backend} back in rotation after its cooldown", backend=pool.name)

    def _back(self, pool: BackendPool, health: _Health, why: str) -> None:
        if health.timer is not None:
            if health.timer.active():
                health.timer.cancel()
            health.timer = None
        health.ejected = health.checked_down = False
        health.cooldown = self.cooldown
        pool.consecutive = 0
        if not pool.up:
            pool.up = True
            self._log.info("backend {backend} back in rotation: {why}", backend=pool.name, why=why)

    def _down_longest(self) -> BackendPool:
        return min(self.pools, key=lambda pool: self._health[pool].down_since)

    def close(self) -> None:
        """Close every idle connection and forget pending returns (at shutdown)."""
        for pool, health in self._health.items():
            if health.timer is not None and health.timer.active():
                health.timer.cancel()
            health.timer = None
            pool.close()


class _Probe:
    """One health check request, a L{BackendExchange} of its own."""

    method = b"GET"

    def __init__(self, check: HealthCheck, pool: BackendPool) -> None:
        self.check = check
        self.pool = pool
        self.conn: BackendConnection | None = None
        self.finished = False
        self.connecting: defer.Deferred[BackendConnection] | None = None
        self.timer: IDelayedCall | None = check.clock.callLater(check.timeout, self._timed_out)

    def start(self) -> None:
        d = self.connecting = self.pool.open()
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: BackendConnection) -> None:
        self.connecting = None
        if self.finished:
            conn.close()
            return
        self.conn = conn
        conn.send(self, self.check.heads[self.pool])

    def _connect_failed(self, reason: Failure) -> None:
        self.connecting = None
        if not reason.check(defer.CancelledError):
            self._end(False, f"cannot connect: {reason.getErrorMessage()}")

    def _timed_out(self) -> None:
        self.timer = None
        self._end(False, f"no answer within {self.check.timeout:g}s")

    def _end(self, ok: bool, detail: str) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.close()
        self.check.result(self.pool, ok, detail)

    def abandon(self) -> None:
        """Stop without a verdict (the check is stopping)."""
        self.finished = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None:
            self.conn.exchange = None
            self.conn.close()

    # -- BackendExchange ---------------------------------------------------------------

    def read_begin(self) -> None:
        pass

    def read_done(self) -> None:
        pass

    def backend_interim(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def backend_head(self, code: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self._end(200 <= code < 400, f"status {code}")

    def backend_body(self, data: bytes) -> None:
        pass

    def backend_done(self, conn: BackendConnection | None) -> None:
        pass

    def backend_failed(self, detail: str, head_done: bool) -> None:
        self._end(False, detail)

    def backend_closed_complete(self) -> bool:
        return True


class HealthCheck(Service):
    """
    Active health checks: every C{interval} seconds, a C{GET path} to each
    backend on a fresh connection, through the same endpoints and
    connection code as the requests (so TLS and UNIX sockets are checked
    as they are used). A status other than 2xx or 3xx, or no answer within
    C{timeout} (the interval, by default), marks the backend down; a good
    answer brings it back, ejected or not.

    @ivar path: the request target, the backend URL's path included.
    @ivar hosts: the C{Host} header sent to each backend, in the order of
        C{backends.pools} (C{localhost} for those left out).
    """

    _log = Logger()

    def __init__(
        self, backends: Backends, clock: IReactorTime, path: bytes, interval: float = 5.0,
        timeout: float | None = None, hosts: Sequence[bytes] = (),
    ) -> None:
        self.backends = backends
        self.clock = clock
        self.path = path
        self.interval = interval
        self.timeout = interval if timeout is None else timeout
        self.heads = {
            pool: b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: tenantedge-health-check\r\nConnection: close\r\n\r\n"
            % (path, hosts[i] if i < len(hosts) else b"localhost")
            for i, pool in enumerate(backends.pools)
        }
        self._probes: dict[BackendPool, _Probe] = {}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = self._loop = LoopingCall(self.check_all)
        loop.clock = self.clock
        loop.start(self.interval, now=True).addErrback(
            lambda f: self._log.failure("backend health checks stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        probes, self._probes = self._probes, {}
        for probe in probes.values():
            probe.abandon()

    def check_all(self) -> None:
        """Check every backend not still being checked."""
        for pool in self.backends.pools:
            if pool in self._probes:
                continue
            probe = self._probes[pool] = _Probe(self, pool)
            try:
                probe.start()
            except Exception as e:
                self._log.failure("backend health check of {backend} could not start", backend=pool.name)
                probe._end(False, str(e))

    def result(self, pool: BackendPool, ok: bool, detail: str) -> None:
        """A probe's verdict."""
        self._probes.pop(pool, None)
        self.backends.checked(pool, ok, detail)
