"""
L{EdgeService}: the whole edge the twistd plugin runs, as one service
(L{tenantedge.tap.build_edge} assembles it): on-demand TLS, the demo
backend if any, and the listeners, with the start-up order that lets
twistd bind ports as root and drop privileges before any file is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from .config import OnDemandConfig
from .demo import DemoBackendService
from .listening import ListenFailed, ListeningService
from .logs import use_json_logs, wants_json
from .service import OnDemandTLS, StartupError
from .tls import OnDemandTLSFactory

__all__ = ["EdgeService", "log_as_asked"]


class EdgeService(MultiService):
    """
    The whole edge: on-demand TLS, then the demo backend (if any), then the
    listeners. Ports are bound in C{privilegedStartService}, before twistd
    drops to C{-u/-g}; the store and the local CA are opened in
    C{startService}, after the drop, so every file they create belongs to
    the user the server runs as. Start-up problems end it with one line.

    @ivar on_demand: the on-demand TLS service.
    @ivar listeners: the listening services by name (C{https}, C{http},
        C{admin}).
    @ivar demo_backend: the built-in backend of C{--demo}, if running.

    C{children} are further services started and stopped with it (the
    limits summary).
    """

    _log = Logger()

    def __init__(
        self,
        on_demand: OnDemandTLS,
        listeners: Sequence[tuple[str, ListeningService]],
        demo_backend: DemoBackendService | None = None,
        on_stop: Sequence[Callable[[], Any]] = (),
        runner_options: Any = None,
        children: Sequence[IService] = (),
    ) -> None:
        super().__init__()
        self.on_demand = on_demand
        self.demo_backend = demo_backend
        self.listeners = dict(listeners)
        self._on_stop = tuple(on_stop)
        self._runner_options = runner_options
        on_demand.setServiceParent(self)
        if demo_backend is not None:
            demo_backend.setName("demo-backend")
            demo_backend.setServiceParent(self)
        for name, listener in listeners:
            listener.setName(name)
            listener.setServiceParent(self)
        for child in children:
            child.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        log_as_asked(self.on_demand.config, self._runner_options, parent)

    def listening_ports(self) -> Deferred[dict[str, Any]]:
        """The bound ports by listener name, once listening."""
        names = list(self.listeners)
        return gatherResults([self.listeners[n].listening() for n in names]).addCallback(
            lambda ports: dict(zip(names, ports))
        )

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenFailed as e:
            raise SystemExit(f"tenantedge: {e}") from None

    def startService(self) -> None:
        try:
            super().startService()
        except (StartupError, ListenFailed) as e:
            raise SystemExit(f"tenantedge: {e}") from None
        for name, listener in self.listeners.items():
            self._log.info("listening: {name} on {address} ({purpose})", name=name,
                           address=listener.address(), purpose=listener.purpose)
        if self.demo_backend is not None:
            self._log.info("demo backend (built in) on {address}", address=self.demo_backend.address())

    async def stop_listening(self) -> None:
        """Stop accepting tenant traffic (HTTPS and port 80); open connections go on."""
        for name in ("https", "http"):
            listener = self.listeners.get(name)
            if listener is not None and listener.running:
                stopped = listener.stopService()
                if stopped is not None:
                    await stopped

    def open_connections(self) -> int:
        """HTTPS connections open right now."""
        factory = self.listeners["https"].factory
        return factory.open if isinstance(factory, OnDemandTLSFactory) else 0

    async def _stop(self) -> None:
        await super().stopService()
        for stop in self._on_stop:
            await stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def log_as_asked(config: OnDemandConfig, runner_options: Any, parent: Any) -> None:
    """JSON logs when --log-format json (or twist's own) asks for them."""
    if config.log_format == "json" or wants_json(runner_options):
        use_json_logs(runner_options, parent)
