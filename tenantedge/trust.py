"""
HTTPS clients that verify their peer: the ACME CA's API and the allow
endpoint. Verification is always on; C{--ca-root} only adds trust anchors
(for a private CA or a test CA such as Pebble's) to the platform's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL
from treq.client import HTTPClient
# Private module, public contract: CertificateOptions and optionsForClientTLS
# document their trustRoot as "an IOpenSSLTrustRoot provider", but Twisted
# exports no public alias of the interface, and the platform store plus extra
# PEM files (what --ca-root and --allow-ca need) is not one of its stock trust
# roots. Pinned by tests/test_private_apis.py.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

__all__ = ["PlatformTrustPlus", "acme_http_client", "https_policy"]


@implementer(IOpenSSLTrustRoot)
class PlatformTrustPlus:
    """
    The platform's trust store plus the certificates in some PEM files.
    """

    def __init__(self, extra_pem_files: Sequence[str] = ()) -> None:
        self.extra_pem_files = tuple(extra_pem_files)

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        for path in self.extra_pem_files:
            context.load_verify_locations(path)


def https_policy(extra_pem_files: Sequence[str] = ()) -> BrowserLikePolicyForHTTPS:
    """A browser-like (verifying) TLS policy with the extra anchors."""
    return BrowserLikePolicyForHTTPS(trustRoot=PlatformTrustPlus(extra_pem_files))


def acme_http_client(reactor: Any, pool: HTTPConnectionPool, extra_pem_files: Sequence[str] = ()) -> HTTPClient:
    """A treq client for talking to ACME CAs."""
    return HTTPClient(Agent(reactor, contextFactory=https_policy(extra_pem_files), pool=pool))
