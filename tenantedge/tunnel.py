"""
Upgraded connections: after the backend's C{101 Switching Protocols}
(WebSocket, or any other HTTP/1.1 C{Upgrade} the edge relays), the
client's connection and the backend's are one byte pipe, L{Tunnel}.

Nothing is parsed any more: bytes go through as they come, each transport
the producer of the other (a full write buffer on one side pauses reading
on the other, as the relay does for bodies), either side's end closes the
other once what it was sent is flushed, and a connection on which nothing
has moved for the idle timeout is closed on both sides. The HTTP/1.1
timers of the client connection (head deadline, keep-alive idle) are off
by then; the tunnel's own idle timer is its only one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["Tunnel"]


class Tunnel:
    """
    Two connections joined after a protocol switch.

    @ivar client: the client's transport (TLS).
    @ivar backend: the backend connection's transport.
    @ivar idle_timeout: seconds without a byte in either direction after
        which both connections are closed; 0 for no limit.
    @ivar timed_out: whether the idle timeout ended it.
    """

    def __init__(
        self, client: Any, backend: Any, clock: IReactorTime, idle_timeout: float,
        on_closed: Callable[[Tunnel], None],
    ) -> None:
        self.client = client
        self.backend = backend
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.timed_out = False
        self._on_closed = on_closed
        self._client_open = True
        self._backend_open = True
        self._joined = False
        self._last = 0.0
        self._timer: Any = None

    def start(self, to_backend: bytes, to_client: bytes) -> None:
        """
        Join the two: register each transport as the other's producer,
        arm the idle timer and pass on what either side sent past its head.
        """
        self._joined = True
        # The backend's bytes fill the client's buffer: a full one pauses
        # the backend (and the other way round).
        self.client.registerProducer(self.backend, True)
        self.backend.registerProducer(self.client, True)
        # Whatever paused either for HTTP's sake is over.
        self.client.resumeProducing()
        self.backend.resumeProducing()
        self._last = self.clock.seconds()
        if self.idle_timeout:
            self._timer = self.clock.callLater(self.idle_timeout, self._check_idle)
        if to_client:
            self.client.write(to_client)
        if to_backend:
            self.backend.write(to_backend)

    # -- bytes ----------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        """Bytes from the client: to the backend, while it is there."""
        if self._backend_open and self._client_open:
            self._last = self.clock.seconds()
            self.backend.write(data)

    def from_backend(self, data: bytes) -> None:
        """Bytes from the backend: to the client, while it is there."""
        if self._client_open and self._backend_open:
            self._last = self.clock.seconds()
            self.client.write(data)

    # -- endings ------------------------------------------------------------------------

    def client_lost(self) -> None:
        """The client's connection ended (closed or aborted): close the backend's after flushing."""
        if self._client_open:
            self._client_open = False
            self._lost(self.backend, self._backend_open)

    def backend_lost(self) -> None:
        """The backend's connection ended (closed or aborted): close the client's after flushing."""
        if self._backend_open:
            self._backend_open = False
            self._lost(self.client, self._client_open)

    def _lost(self, other: Any, other_open: bool) -> None:
        if self._joined:
            self._joined = False
            # Unregistered first: a TLS transport waits for its producer to
            # go before it closes.
            self.client.unregisterProducer()
            self.backend.unregisterProducer()
        if other_open:
            other.loseConnection()
        else:
            self._end()

    def _check_idle(self) -> None:
        self._timer = None
        quiet = self.clock.seconds() - self._last
        if quiet < self.idle_timeout:
            self._timer = self.clock.callLater(self.idle_timeout - quiet, self._check_idle)
            return
        # Nothing moved for that long, flushing included: whatever is still
        # buffered is not going anywhere, so abort rather than wait on it.
        self.timed_out = True
        if self._client_open:
            self.client.abortConnection()
        if self._backend_open:
            self.backend.abortConnection()

    def _end(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self._on_closed(self)
