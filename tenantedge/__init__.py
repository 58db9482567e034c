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

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import ConfigError, OnDemandConfig
    from .service import OnDemandTLS, StartupError
    from .tls import tls_server_name

__all__ = [
    "__version__",
    "OnDemandConfig",
    "ConfigError",
    "OnDemandTLS",
    "StartupError",
    "tls_server_name",
]

#: Where each public name lives. They are imported on first use (PEP 562),
#: so that importing any tenantedge module (the endpoint plugin, the CLI,
#: the plugin cache) does not load the whole TLS, ACME and HTTP stack.
_PUBLIC = {
    "OnDemandConfig": "config",
    "ConfigError": "config",
    "OnDemandTLS": "service",
    "StartupError": "service",
    "tls_server_name": "tls",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tenantedge' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
