"""
Tests for L{tenantedge.service.OnDemandTLS}: built from a configuration by
constructor injection, pieces swapped one at a time, every preparation in
its documented order, and what an application plugs in.
"""

from __future__ import annotations

import os

from treq.testing import StubTreq
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tenantedge import OnDemandConfig, OnDemandTLS, StartupError
from tenantedge.challenges import HTTPRedirectRoot, MemoryChallengeStore
from tenantedge.interfaces import PolicyRefusal
from tenantedge.pipeline import MemoryNameLock
from tenantedge.service import Storage
from tenantedge.store import DirectoryStore
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle
from tenantedge.tls import OnDemandTLSFactory


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.directory = os.path.abspath(self.mktemp())

    def config(self, **kwargs: object) -> OnDemandConfig:
        defaults: dict[str, object] = {"store": self.directory, "ca": ["internal"], "allow_suffix": [".test"]}
        defaults.update(kwargs)
        return OnDemandConfig(**defaults)  # type: ignore[arg-type]

    def directory_storage(self) -> Storage:
        store = DirectoryStore(self.directory)
        return Storage(store, MemoryChallengeStore(), MemoryNameLock(), self.directory, (("the store", store.prepare),))

    def test_preparations_in_order(self) -> None:
        """startService prepares the store, the local CA, then the backoff and limits, in that order."""
        edge = OnDemandTLS.from_config(self.config(), self.reactor, storage=self.directory_storage())
        self.assertEqual(
            [what for what, _ in edge.preparations],
            ["the store", "the local CA", "the failure backoff", "the hostname lifecycle", "the issuance limits"],
        )
        edge.startService()
        self.addCleanup(edge.stopService)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "localca", "root.pem")))
        self.assertTrue(edge.renewal.running)
        self.assertEqual(
            sorted(s.name for s in edge), ["ocsp", "refusal-summary", "renewal", "store-refresher", "ticket-keys"]
        )

    def test_acme_accounts_prepared(self) -> None:
        """With an ACME CA, its account key is created at start-up, 0600, under accounts/ (0700)."""
        edge = OnDemandTLS.from_config(
            self.config(ca=["https://ca.test/dir"], allow_private_suffix=True), self.reactor,
            storage=self.directory_storage(),
        )
        self.assertIn("the ACME account for https://ca.test/dir", [what for what, _ in edge.preparations])
        edge.startService()
        self.addCleanup(edge.stopService)
        key = edge.acme_issuers[0].accounts.key_path
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.join(self.directory, "accounts")).st_mode & 0o777, 0o700)

    def test_own_ticket_keys_rotate(self) -> None:
        """
        A service that made its own TLS contexts rotates their ticket keys
        on schedule; one given contexts (a supervisor's, shared by workers)
        leaves that to their owner.
        """
        from tenantedge.contexts import ServingContexts

        edge = OnDemandTLS.from_config(self.config(ticket_key_lifetime="1h"), self.reactor, store=MemoryStore())
        edge.startService()
        self.addCleanup(edge.stopService)
        assert edge.contexts is not None
        first = edge.contexts.base
        self.reactor.advance(3600)
        self.assertIsNot(edge.contexts.base, first)
        shared = ServingContexts()
        given = OnDemandTLS.from_config(self.config(), self.reactor, store=MemoryStore(), contexts=shared)
        self.assertNotIn("ticket-keys", [s.name for s in given])

    def test_startup_error(self) -> None:
        """An unusable store is a StartupError with one line, not a traceback from deep inside."""
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "a.test.pem"), "w") as f:
            f.write("x")
        os.chmod(os.path.join(self.directory, "a.test.pem"), 0o644)
        edge = OnDemandTLS.from_config(self.config(), self.reactor, storage=self.directory_storage())
        e = self.assertRaises(StartupError, edge.startService)
        self.assertIn("chmod 600", str(e))
        self.assertNotIn("\n", str(e))

    def test_swap_one_piece(self) -> None:
        """
        An injected store and issuer are used as they are, behind the same
        pipeline (one order per name) and resolver; nothing is prepared for
        the injected store.
        """
        store, issuer = MemoryStore(), ControlledIssuer()
        edge = OnDemandTLS.from_config(self.config(), self.reactor, store=store, issuer=issuer)
        self.assertEqual([what for what, _ in edge.preparations],
                         ["the failure backoff", "the hostname lifecycle", "the issuance limits"])
        self.assertIs(edge.store, store)
        first = edge.resolver.context_for("a.test")
        second = edge.resolver.context_for("a.test")
        self.assertEqual(issuer.requests, ["a.test"])
        issuer.complete("a.test", make_bundle("a.test"))
        self.assertIs(self.successResultOf(first), self.successResultOf(second))
        self.assertIn("a.test", store.bundles)
        self.assertEqual(edge.pipeline.events["issue:issued"], 1)

    def test_injected_policy(self) -> None:
        class Nobody:
            def static_refusal(self, server_name: str) -> str:
                return "nobody"

            def check(self, server_name: str):  # type: ignore[no-untyped-def]
                raise AssertionError("not reached")

            def recheck(self, server_name: str):  # type: ignore[no-untyped-def]
                raise AssertionError("not reached")

        edge = OnDemandTLS.from_config(self.config(), self.reactor, store=MemoryStore(), policy=Nobody())
        f = self.failureResultOf(edge.resolver.context_for("a.test"), PolicyRefusal)
        self.assertEqual(f.value.reason, "nobody")

    def test_wrap_and_port_80(self) -> None:
        """wrap() gives the on-demand TLS factory; several share one handshake counter; port 80 answers HTTP-01."""
        edge = OnDemandTLS.from_config(self.config(), self.reactor, store=MemoryStore())
        app = Factory.forProtocol(Protocol)
        one, two = edge.wrap(app), edge.wrap(app)
        self.assertIsInstance(one, OnDemandTLSFactory)
        self.assertIs(one.wrapped_factory, app)
        self.assertIs(one.events, two.events)
        self.assertIs(one.events, edge.handshakes)
        root = edge.http_resource(https_port=8443)
        self.assertIsInstance(root, HTTPRedirectRoot)
        self.successResultOf(edge.challenges.add("tok", "tok.key-authorization"))
        http = StubTreq(root)
        response = self.successResultOf(http.get("http://a.test/.well-known/acme-challenge/tok"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"tok.key-authorization")
        response = self.successResultOf(http.get("http://a.test/x", allow_redirects=False))
        self.assertEqual(response.headers.getRawHeaders("location"), ["https://a.test:8443/x"])
        challenge_only = StubTreq(edge.challenge_resource())
        response = self.successResultOf(challenge_only.get("http://a.test/tok"))
        self.assertEqual(self.successResultOf(response.content()), b"tok.key-authorization")
