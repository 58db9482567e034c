"""
Tests for L{tenantedge.contexts}: shared contexts with the tenant's
certificate set per connection, session tickets that resume, and a session
never resumed for another name. In-memory handshakes (no sockets) with
pyOpenSSL on both sides; the end-to-end version with C{openssl s_client}
is in C{tests/test_e2e.py}.
"""

from __future__ import annotations

import time

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.contexts import (
    ServingContexts,
    _session_host_name,
    resumed_for_another_name,
    session_reused,
)
from tenantedge.testing import make_bundle

from .support.tlsmemory import pump_handshake


#: One client context, as a browser has: sessions are per client context.
CLIENT = SSL.Context(SSL.TLS_METHOD)


def handshake(server: SSL.Connection, name: bytes, session: SSL.Session | None = None) -> SSL.Connection:
    """Run a TLS handshake between C{server} and a fresh client in memory."""
    client = SSL.Connection(CLIENT, None)
    client.set_tlsext_host_name(name)
    if session is not None:
        client.set_session(session)
    pump_handshake(client, server)
    # TLS 1.3 tickets come after the handshake: let the client read them.
    server.send(b"x")
    client.bio_write(server.bio_read(65536))
    client.recv(1)
    return client


class ContextTests(SynchronousTestCase):
    def setUp(self) -> None:
        now = time.time()
        self.contexts = ServingContexts()
        self.a = self.contexts.tenant(make_bundle("a.test", now - 60, now + 86400))
        self.b = self.contexts.tenant(make_bundle("b.test", now - 60, now + 86400))

    def test_one_chain_context_for_many_tenants(self) -> None:
        """Tenants with the same chain share one context; only leaf and key are theirs."""
        self.assertIs(self.a.context, self.b.context)
        self.assertEqual(self.contexts.chain_count(), 1)

    def test_tenant_certificate_presented(self) -> None:
        server = self.a.connection()
        client = handshake(server, b"a.test")
        presented = client.get_peer_certificate()
        assert presented is not None
        self.assertEqual(presented.get_subject().CN, "a.test")

    def test_resumed(self) -> None:
        """A session from one handshake resumes in the next (tickets are on)."""
        first = handshake(self.a.connection(), b"a.test")
        server = self.a.connection()
        handshake(server, b"a.test", first.get_session())
        self.assertTrue(session_reused(server))
        self.assertFalse(resumed_for_another_name(server, "a.test"))

    def test_resumed_in_another_process_context(self) -> None:
        """
        Contexts built from the same base context (as workers forked after
        it was made are) resume each other's sessions.
        """
        other = ServingContexts(base=self.contexts.base)
        now = time.time()
        a_elsewhere = other.tenant(make_bundle("a.test", now - 60, now + 86400))
        first = handshake(self.a.connection(), b"a.test")
        server = a_elsewhere.connection()
        handshake(server, b"a.test", first.get_session())
        self.assertTrue(session_reused(server))

    def test_other_name_detected(self) -> None:
        """A's session offered for B resumes in OpenSSL, and is recognised as A's."""
        first = handshake(self.a.connection(), b"a.test")
        server = self.b.connection()
        handshake(server, b"b.test", first.get_session())
        self.assertTrue(session_reused(server))
        self.assertTrue(resumed_for_another_name(server, "b.test"))

    def test_same_name_in_other_case(self) -> None:
        """A client sending its SNI in capitals or with a trailing dot resumes its own session."""
        first = handshake(self.a.connection(), b"A.Test.")
        server = self.a.connection()
        handshake(server, b"A.Test.", first.get_session())
        self.assertTrue(session_reused(server))
        self.assertFalse(resumed_for_another_name(server, "a.test"))

    def test_session_host_name_parser(self) -> None:
        self.assertIsNone(_session_host_name(b""))
        self.assertIsNone(_session_host_name(b"\x30\x03\x02\x01\x01"))
        self.assertEqual(_session_host_name(b"\x30\x08\x02\x01\x01\xa6\x03\x04\x01a"), b"a")
        self.assertIsNone(_session_host_name(b"\x30\x08\x02\x01\x01\xa6\x03\x04\x09a"))  # truncated


class PrivatePyOpenSSLTests(SynchronousTestCase):
    """The pyOpenSSL internals the contexts rely on, pinned."""

    def test_names_exist(self) -> None:
        from OpenSSL._util import lib

        self.assertTrue(hasattr(lib, "SSL_session_reused"))
        self.assertTrue(hasattr(lib, "i2d_SSL_SESSION"))
        tenant = ServingContexts().tenant(make_bundle("a.test", time.time() - 60, time.time() + 86400))
        server = tenant.connection()
        self.assertTrue(hasattr(server, "_ssl"))
        client = handshake(server, b"a.test")
        session = client.get_session()
        self.assertTrue(hasattr(session, "_session"))

    def test_pyopenssl_objects_accepted(self) -> None:
        """use_certificate/use_privatekey still take pyOpenSSL's own X509 and PKey (7x cheaper per handshake)."""
        tenant = ServingContexts().tenant(make_bundle("a.test"))
        tenant.connection()
