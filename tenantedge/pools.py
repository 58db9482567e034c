"""
Quiet HTTP connection pools for treq and Agent.

Twisted's pool builds one client factory per new connection, and every
factory logs C{Starting factory ...} / C{Stopping factory ...} at info
level: one pair of lines per allow check, ACME exchange or backend
connection. There is no public switch for it; L{quiet_pool} swaps the
pool's factory class for a non-noisy subclass.
"""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory  # private: see quiet_pool

__all__ = ["quiet_pool"]


class _QuietClientFactory(_HTTP11ClientFactory):
    """Twisted's pool factory, without a log line per connection."""

    noisy = False


def quiet_pool(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """
    Make a pool's connections start and stop without log lines.

    This sets the private C{HTTPConnectionPool._factory} (the class the
    pool instantiates per connection) to a subclass of the private
    C{_HTTP11ClientFactory}: Twisted offers no public way to silence them.
    C{tests/test_private_apis.py} fails loudly if either name changes.
    """
    pool._factory = _QuietClientFactory
    return pool
