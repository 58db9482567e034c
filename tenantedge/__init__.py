"""
tenantedge: a Twisted HTTPS edge server for multi-tenant SaaS.

At the first TLS handshake for a host name it has never seen, tenantedge asks
its policy whether the name is a tenant's, obtains a certificate (from an ACME
CA or its local CA) while that very handshake waits, stores and caches it, and
reverse-proxies the tenant's requests to the application backend.

Nothing here imports the reactor: only L{tenantedge.tap} picks concrete
classes and touches the global reactor.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
