"""
C{twistd tenantedge} / C{twist tenantedge}: options to configuration to
services, and nothing else.

L{Options} (in L{tenantedge.options}) yields an
L{tenantedge.config.OnDemandConfig}; L{build_edge} turns it into an
L{tenantedge.edge.EdgeService}: the L{tenantedge.service.OnDemandTLS} service (store,
policy, issuers, renewal...) plus what the plugin adds around it, the
reverse proxy to the backend, the HTTPS, HTTP and admin listeners and the
demo backend. This module and L{tenantedge.service} are the only places
that pick concrete classes. Only L{makeService} touches the global
reactor, and L{tenantedge.workers.fresh_reactor}, which replaces it in a
forked worker; everything else is given the reactor it uses.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401  (see below)
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web.client import URI

from .admin import AdminActions, AdminGuard, AdminResource, bound_names
from .api import HostnameAPI
from .backend import BackendPool, Backends, HealthCheck
from .config import OnDemandConfig, backend_label
from .demo import DemoBackendService
from .edge import EdgeService, log_as_asked
from .edgehttp import EdgeHTTPFactory
from .exchange import AccessLog, Relay
from .listening import ListeningService
from .metrics import BackendCollector, LimitCollector, UpgradeCollector
from .options import PluginOptions as Options
from .proxy import EdgeSite, backend_endpoints, backend_prefix
from .proxyheader import ProxyHeaderEndpoint, split_proxy_prefix
from .resolver import periodic
from .service import OnDemandTLS
from .summaries import LimitSummary
from .workers import Supervisor, run_worker

__all__ = ["Options", "makeService", "build_edge", "EdgeService"]

# encodings.idna is imported above, before twistd drops privileges (-u/-g):
# the resolver needs it for host names, and an interpreter installed where
# the unprivileged user cannot read would fail to import it lazily later.

#: Request bodies on port 80 and the admin endpoint are never large.
SMALL_BODIES = 64 * 1024


def build_edge(
    config: OnDemandConfig,
    reactor: Any,
    runner_options: Any = None,
    endpoints: Mapping[str, IStreamServerEndpoint] | None = None,
    **overrides: Any,
) -> EdgeService:
    """
    The edge for a configuration: L{OnDemandTLS} (C{overrides} go to
    L{OnDemandTLS.from_config}) wrapped around the reverse proxy, and the
    listeners.

    @param endpoints: endpoints to listen on instead of the configured
        descriptions, by listener name (C{https}, C{http}, C{admin}): a
        worker adopts the sockets its parent bound.
    """
    chosen = dict(endpoints or {})
    #: What the request path's limits refused or closed (the relay's and
    #: the PROXY headers'), for metrics and the limits summary.
    limits: Counter[str] = Counter()

    def _listener(description: str, factory: Any, purpose: str, name: str) -> ListeningService:
        # haproxy: is read here rather than by Twisted's endpoint parser:
        # see tenantedge.proxyheader. A worker's adopted socket is the inner
        # endpoint, so the PROXY protocol works with --workers too.
        proxied, inner = split_proxy_prefix(description)
        endpoint = chosen.get(name) or serverFromString(reactor, inner)
        if proxied:
            endpoint = ProxyHeaderEndpoint(endpoint, reactor, config.hello_timeout, limits)
        return ListeningService(endpoint, factory, purpose)

    on_demand = OnDemandTLS.from_config(config, reactor, **overrides)
    demo = DemoBackendService(reactor) if config.demo else None
    urls = (demo.url,) if demo is not None else config.backend
    # HTTP/1.1 and HTTP/2 through the relay (tenantedge.exchange, .http1, .http2):
    # one set of rules, balanced over the backends.
    observe = on_demand.timings.observe_request
    backends = Backends(reactor, [
        BackendPool(reactor, backend_endpoints(reactor, url, demo), name=backend_label(url)) for url in urls
    ])
    on_demand.timings.registry.register(BackendCollector(backends.pools))
    # Every backend has the same path (checked by the configuration).
    prefix = backend_prefix(urls[0])
    h1 = Relay(
        backends, reactor, prefix=prefix, timeout=config.backend_timeout,
        max_body_size=config.max_body_size, observe=observe,
        access_log=AccessLog(config.access_log) if config.access_log else None,
        header_timeout=config.header_timeout, idle_timeout=config.idle_timeout,
        trusted_proxies=config.trusted_proxies, events=limits,
        websocket_idle_timeout=config.websocket_idle_timeout,
    )
    on_demand.timings.registry.register(LimitCollector(limits))
    on_demand.timings.registry.register(UpgradeCollector(h1.upgrades, lambda: len(h1.tunnels)))
    summary = LimitSummary(limits, on_demand.handshakes)
    https = _listener(config.https, on_demand.wrap(EdgeHTTPFactory(h1)), "tenant traffic", "https")
    listeners = [("https", https)]
    if config.http is not None:
        port_80 = on_demand.http_resource(https_port=_https_port(https))
        listeners.append(("http", _listener(
            config.http, EdgeSite(port_80, reactor=reactor, max_body_size=SMALL_BODIES),
            "ACME HTTP-01 answers and redirects to HTTPS", "http",
        )))
    if config.admin is not None:
        actions = AdminActions(on_demand.store, on_demand.resolver.context_for, on_demand.renewal.renew,
                               on_demand.resolver.forget)
        api = None
        if on_demand.lifecycle is not None:
            api = HostnameAPI(on_demand.store, on_demand.lifecycle, reactor, on_demand.resolver.context_for,
                              on_demand.renewal.schedule, on_demand.renewal.renew, on_demand.resolver.forget)
        # A worker's admin endpoint is a private UNIX socket that only the
        # supervisor reaches (and checks Host for); no browser can.
        names = None if config.admin.startswith("unix:") else (*config.admin_name, *bound_names(config.admin))
        admin_site = EdgeSite(
            AdminResource(on_demand.timings.registry, actions.table(), api, AdminGuard(config.admin_token, names)),
            reactor=reactor, max_body_size=SMALL_BODIES,
        )
        listeners.append(("admin", _listener(config.admin, admin_site, "metrics and the hostname API", "admin")))
    edge = EdgeService(on_demand, listeners, demo, on_stop=(_closing(backends, h1),),
                       runner_options=runner_options,
                       children=[periodic(summary.interval, summary.summarise, reactor, "limits-summary")])
    if config.backend_health_path is not None:
        check = HealthCheck(backends, reactor, prefix.rstrip(b"/") + config.backend_health_path.encode("ascii"),
                            interval=config.backend_health_interval, hosts=[_health_host(url) for url in urls])
        check.setName("backend-health")
        check.setServiceParent(edge)
    return edge


def _health_host(url: str) -> bytes:
    """The Host header of health checks: the backend URL's authority (C{localhost} for a UNIX socket)."""
    if url.startswith("unix:"):
        return b"localhost"
    uri = URI.fromBytes(url.encode("ascii"))
    default = 443 if uri.scheme == b"https" else 80
    return uri.host if uri.port == default else b"%s:%d" % (uri.host, uri.port)


def _closing(pool: Backends, proxy: Relay) -> Callable[[], Deferred[None]]:
    """At shutdown: close the relay's client connections and its idle backend connections."""

    def close() -> Deferred[None]:
        proxy.close_all()
        pool.close()
        return succeed(None)

    return close


def _https_port(https: ListeningService) -> Callable[[], int]:
    """Redirects from port 80 name the HTTPS port actually bound (443 until then)."""

    def port() -> int:
        if https.port is not None:
            return int(getattr(https.port.getHost(), "port", 443))
        return 443

    return port


def makeService(options: Options) -> EdgeService | Supervisor:
    """
    twistd's entry point, on the global reactor: the edge for parsed
    options, or with more than one worker the supervisor that forks them
    (L{tenantedge.workers}).
    """
    from twisted.internet import reactor

    config = options.config
    assert config is not None
    runner_options = getattr(options, "parent", None)
    count = config.worker_count
    if count == 1:
        return build_edge(config, reactor, runner_options=runner_options)
    return Supervisor(
        config, reactor, count, partial(run_worker, build_edge),
        prepare=lambda: OnDemandTLS.from_config(config, reactor).prepare(),
        on_parent=lambda parent: log_as_asked(config, runner_options, parent),
    )
