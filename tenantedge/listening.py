"""
A listening port as a service, with the two things twistd's own
C{StreamServerEndpointService} keeps private: a port that cannot be bound
fails start-up (instead of being logged while the server runs on without
it), and the bound port can be asked for (tests and banners need it when
the description says port 0).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

__all__ = ["ListeningService", "ListenFailed"]


class ListenFailed(Exception):
    """
    A port could not be bound; the message is one line naming the port,
    the listener's purpose and the reason.
    """


class ListeningService(Service):
    """
    Listens on C{endpoint} with C{factory} from C{privilegedStartService}
    (before twistd drops privileges) until the service stops.

    @ivar purpose: what the port is for, for the start-up banner.
    @ivar port: the bound port, once listening.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, purpose: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.purpose = purpose
        self.port: IListeningPort | None = None
        self._waiting: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._waiting is not None:
            return
        outcome: list[Any] = []
        self._waiting = self.endpoint.listen(self.factory)
        self._waiting.addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            self._waiting = None
            error = outcome[0].value
            if isinstance(error, CannotListenError):
                where = f"port {error.port}" + (f" of {error.interface}" if error.interface else "")
                raise ListenFailed(f"cannot listen on {where} ({self.purpose}): {error.socketError}") from None
            raise ListenFailed(f"cannot listen ({self.purpose}): {error}") from None
        if outcome:
            self.port = outcome[0]
            self._waiting = succeed(outcome[0])
        else:
            self._waiting.addCallback(self._bound)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def startService(self) -> None:
        self.privilegedStartService()
        super().startService()

    def listening(self) -> Deferred[IListeningPort]:
        """The bound port, once listening (start the service first)."""
        if self._waiting is None:
            raise RuntimeError("the listening service has not been started")
        result: Deferred[IListeningPort] = Deferred()

        def relay(port: IListeningPort) -> IListeningPort:
            result.callback(port)
            return port

        self._waiting.addCallback(relay)
        return result

    def address(self) -> str:
        """Where it listens, as host:port, or the endpoint if not bound yet."""
        if self.port is None:
            return repr(self.endpoint)
        host = self.port.getHost()
        if hasattr(host, "port"):
            name = getattr(host, "host", "")
            return f"[{name}]:{host.port}" if ":" in name else f"{name}:{host.port}"
        name = getattr(host, "name", host)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port, self._waiting = self.port, None, None
        if port is not None:
            return port.stopListening()
        return None
