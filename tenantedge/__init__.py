"""
tenantedge: a Twisted HTTPS edge server for multi-tenant SaaS.

At the first TLS handshake for a host name it has never seen, tenantedge asks
its policy whether the name is a tenant's, obtains a certificate (from an ACME
CA or its local CA) while that very handshake waits, stores and caches it, and
reverse-proxies the tenant's requests to the application backend.

The public API for Twisted applications is one configuration value and one
service::

    edge = OnDemandTLS.from_config(OnDemandConfig(store=..., allow_url=...), reactor)
    edge.setServiceParent(application)
    endpoints.serverFromString(reactor, "tcp:443").listen(edge.wrap(site))

or the C{tenantedge:} endpoint string (L{tenantedge.endpoint}). Nothing here
imports the global reactor: it is always an argument.
"""

__version__ = "0.1.0"

from .config import ConfigError, OnDemandConfig  # noqa: E402
from .service import OnDemandTLS, StartupError  # noqa: E402
from .tls import tls_server_name  # noqa: E402

__all__ = [
    "__version__",
    "OnDemandConfig",
    "ConfigError",
    "OnDemandTLS",
    "StartupError",
    "tls_server_name",
]
