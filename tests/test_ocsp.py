"""
Tests for L{tenantedge.ocsp}: the responder URL, validation of responses,
the stapler's schedule (refresh half-way, backoff, lapse), revoked leading
to a renewal, a certificate without a responder costing nothing, and the
OCSP callback stapling through the shared contexts. A fake responder
built with cryptography's OCSP builder behind C{StubTreq}; the real
C{openssl ocsp} responder is in C{tests/test_ocsp_e2e.py}.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.certificates import CertificateBundle, common_name, sign_certificate
from tenantedge.contexts import ServingContexts, TenantTLS
from tenantedge.interfaces import IOcspStore
from tenantedge.ocsp import InvalidOcspResponse, OcspStapler, responder_url, validate_response
from tenantedge.store import DirectoryStore
from tenantedge.testing import FakeOcspResponder, MemoryStore, OcspTestCA, make_bundle

from .support.tlsmemory import pump_handshake

NOW = 1_700_000_000.0
DAY = 86400.0
URL = "http://ocsp.test/"


class ValidationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = OcspTestCA.create(URL, NOW)
        self.bundle = self.ca.issue("a.test", NOW - DAY, NOW + 30 * DAY)
        self.leaf = self.bundle.leaf

    def check(self, der: bytes) -> Any:
        return validate_response(der, self.leaf, self.ca.cert, NOW)

    def reason(self, der: bytes) -> str:
        return self.assertRaises(InvalidOcspResponse, self.check, der).reason

    def test_responder_url(self) -> None:
        """The AIA's OCSP URL is found; a leaf without one has none."""
        self.assertEqual(responder_url(self.leaf), URL)
        self.assertIsNone(responder_url(self.ca.issue("b.test", NOW, NOW + DAY, ocsp=False).leaf))
        self.assertIsNone(responder_url(make_bundle("c.test").leaf))

    def test_good_delegated(self) -> None:
        """A response signed by a delegated responder certificate (OCSP-signing EKU) is accepted."""
        result = self.check(self.ca.response(self.leaf, "good", NOW - 60, NOW + DAY))
        self.assertEqual((result.status, result.next_update), ("good", NOW + DAY))

    def test_good_by_issuer(self) -> None:
        """A response signed by the issuer itself is accepted."""
        self.assertEqual(self.check(self.ca.response(self.leaf, "revoked", NOW - 60, NOW + DAY, delegated=False)).status,
                         "revoked")

    def test_no_next_update(self) -> None:
        self.assertIn("nextUpdate", self.reason(self.ca.response(self.leaf, "good", NOW - 60, None)))

    def test_lapsed(self) -> None:
        self.assertIn("nextUpdate has passed", self.reason(self.ca.response(self.leaf, "good", NOW - DAY, NOW - 1)))

    def test_this_update_in_future(self) -> None:
        self.assertIn("future", self.reason(self.ca.response(self.leaf, "good", NOW + 3600, NOW + DAY)))

    def test_other_certificate(self) -> None:
        other = self.ca.issue("b.test", NOW - DAY, NOW + DAY).leaf
        self.assertIn("not about this certificate", self.reason(self.ca.response(other, "good", NOW - 60, NOW + DAY)))

    def test_bad_signature(self) -> None:
        """A signature that does not verify (last byte changed) is refused."""
        der = self.ca.response(self.leaf, "good", NOW - 60, NOW + DAY, delegated=False)
        self.assertEqual(self.reason(der[:-1] + bytes([der[-1] ^ 1])), "bad signature")

    def test_responder_not_delegated(self) -> None:
        """A responder certificate without the OCSP-signing EKU cannot speak for the issuer."""
        utc = datetime.timezone.utc
        self.ca.responder = sign_certificate(
            common_name("not a responder"), self.ca.responder_key.public_key(),
            datetime.datetime.fromtimestamp(NOW - DAY, utc), datetime.datetime.fromtimestamp(NOW + DAY, utc),
            self.ca.key, issuer=self.ca.cert.subject,
        )
        self.assertIn("OCSP-signing", self.reason(self.ca.response(self.leaf, "good", NOW - 60, NOW + DAY)))

    def test_responder_of_another_ca(self) -> None:
        """A responder certificate issued by another CA is refused."""
        other = OcspTestCA.create(URL, NOW)
        self.ca.responder, self.ca.responder_key = other.responder, other.responder_key
        self.assertIn("not issued by", self.reason(self.ca.response(self.leaf, "good", NOW - 60, NOW + DAY)))

    def test_garbage(self) -> None:
        self.assertEqual(self.reason(b"\x30\x03\x0a\x01\x00"), "unparseable OCSP response")
        self.assertEqual(self.reason(b"not der"), "unparseable OCSP response")


class StaplerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.ca = OcspTestCA.create(URL, NOW)
        self.responder = FakeOcspResponder(self.ca, self.clock, lifetime=4 * DAY)
        self.http = StubTreq(self.responder)
        self.store = MemoryStore()
        self.renewals: list[tuple[str, CertificateBundle]] = []
        self.contexts = ServingContexts()
        self.stapler = OcspStapler(self.store, self.http, self.clock, self.renew, random=lambda: 0.0)
        self.stapler.startService()
        self.addCleanup(self.stapler.stopService)

    def renew(self, name: str, bundle: CertificateBundle) -> Deferred[Any]:
        self.renewals.append((name, bundle))
        return succeed(None)

    def serve(self, name: str = "a.test", status: str = "good") -> tuple[CertificateBundle, TenantTLS]:
        bundle = self.ca.issue(name, NOW - DAY, NOW + 60 * DAY)
        self.responder.add(bundle.leaf, status)
        tls = self.contexts.tenant(bundle)
        self.stapler.remembered(name, bundle, tls)
        return bundle, tls

    def turn(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.http.flush()

    def test_fetched_in_background(self) -> None:
        """Nothing happens inside remembered(); on the next turn the response is fetched, stapled and stored."""
        bundle, tls = self.serve()
        self.assertEqual((self.responder.requests, tls.ocsp.der), ([], b""))
        self.turn()
        self.assertEqual(self.responder.requests, [bundle.leaf.serial_number])
        self.assertEqual(validate_response(tls.ocsp.der, bundle.leaf, self.ca.cert, NOW).status, "good")
        self.assertEqual(self.store.ocsp["a.test"], tls.ocsp.der)
        self.assertEqual(self.stapler.results["good"], 1)
        self.assertEqual(self.stapler.stapled_count(), 1)

    def test_refreshed_half_way(self) -> None:
        """The next fetch is half-way between thisUpdate and nextUpdate (jitter 0 here), not before."""
        self.serve()
        self.turn()
        self.turn(2 * DAY - 1)
        self.assertEqual(len(self.responder.requests), 1)
        self.turn(1)
        self.assertEqual(len(self.responder.requests), 2)

    def test_backoff_and_lapse(self) -> None:
        """
        When the responder fails, retries back off (60 s, 120 s...) and the
        response is dropped at its nextUpdate: never stapled once lapsed.
        """
        _, tls = self.serve()
        self.turn()
        self.responder.code = 500
        self.turn(2 * DAY)
        self.assertEqual((len(self.responder.requests), self.stapler.results["failed"]), (2, 1))
        self.turn(59)
        self.assertEqual(len(self.responder.requests), 2)
        self.turn(1)
        self.assertEqual(len(self.responder.requests), 3)
        self.turn(120)
        self.assertEqual(len(self.responder.requests), 4)
        self.assertTrue(tls.ocsp.der)
        self.turn(2 * DAY)
        self.assertEqual(tls.ocsp.der, b"")
        self.assertEqual(self.stapler.stapled_count(), 0)

    def test_revoked_renews(self) -> None:
        """A revoked answer is not stapled, is logged once, and asks for a renewal of that certificate."""
        with capturedLogs() as events:
            bundle, tls = self.serve(status="revoked")
            self.turn()
        self.assertEqual(self.renewals, [("a.test", bundle)])
        self.assertEqual(tls.ocsp.der, b"")
        self.assertEqual(self.stapler.results["revoked"], 1)
        self.assertEqual([e.get("event") for e in events], ["ocsp-revoked"])
        # The renewal failed (the same certificate is still served): asked
        # again later, without a second log line.
        with capturedLogs() as events:
            self.turn(3600)
        self.assertEqual(len(self.renewals), 2)
        self.assertEqual(list(events), [])

    def test_renewed_certificate_replaces(self) -> None:
        """A new certificate for the name replaces the old one's tracking."""
        self.serve()
        self.turn()
        bundle, tls = self.serve()
        self.turn()
        self.assertEqual(self.responder.requests[-1], bundle.leaf.serial_number)
        self.assertTrue(tls.ocsp.der)
        self.assertEqual(self.stapler.tracked_names(), ["a.test"])

    def test_no_responder_costs_nothing(self) -> None:
        """A certificate without a responder URL: no request, no timer, no log line."""
        with capturedLogs() as events:
            for bundle in (make_bundle("self.test"), self.ca.issue("plain.test", NOW - DAY, NOW + DAY, ocsp=False)):
                self.stapler.remembered(bundle.dns_names()[0], bundle, self.contexts.tenant(bundle))
            self.turn()
        self.assertEqual((self.responder.requests, self.clock.getDelayedCalls(), list(events)), ([], [], []))
        self.assertEqual(self.stapler.tracked_names(), [])

    def test_forgotten_stops(self) -> None:
        self.serve()
        self.turn()
        self.stapler.forgotten("a.test")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stored_response_used(self) -> None:
        """A stored response still fresh (before a restart, or a peer's) is used without a request."""
        bundle = self.ca.issue("a.test", NOW - DAY, NOW + 60 * DAY)
        self.store.ocsp["a.test"] = self.ca.response(bundle.leaf, "good", NOW - 60, NOW + 4 * DAY)
        self.responder.add(bundle.leaf)
        tls = self.contexts.tenant(bundle)
        self.stapler.remembered("a.test", bundle, tls)
        self.turn()
        self.assertEqual(self.responder.requests, [])
        self.assertEqual(tls.ocsp.der, self.store.ocsp["a.test"])

    def test_stored_response_due_stapled_while_responder_down(self) -> None:
        """
        After a restart, a stored response past its refresh time but still
        valid is stapled at once; a responder that is down changes nothing
        until the response itself lapses.
        """
        bundle = self.ca.issue("a.test", NOW - DAY, NOW + 60 * DAY)
        stored = self.ca.response(bundle.leaf, "good", NOW - 3 * DAY, NOW + DAY)
        self.store.ocsp["a.test"] = stored
        self.responder.add(bundle.leaf)
        self.responder.code = 503
        tls = self.contexts.tenant(bundle)
        self.stapler.remembered("a.test", bundle, tls)
        self.turn()
        self.assertEqual(self.responder.requests, [bundle.leaf.serial_number])
        self.assertEqual(tls.ocsp.der, stored)
        for _ in range(8):  # retries fail; the stored one stays stapled
            self.turn(600)
        self.assertGreater(len(self.responder.requests), 2)
        self.assertEqual(tls.ocsp.der, stored)
        self.turn(DAY)
        self.assertEqual(tls.ocsp.der, b"")  # lapsed: never a stale staple

    def test_forgotten_while_the_store_reads(self) -> None:
        """A name forgotten while its stored response is being read gets no timer and no request."""
        bundle = self.ca.issue("a.test", NOW - DAY, NOW + 60 * DAY)
        self.responder.add(bundle.leaf)
        pending: Deferred[bytes] = Deferred()
        self.store.get_ocsp = lambda name: pending  # type: ignore[method-assign]
        self.stapler.remembered("a.test", bundle, self.contexts.tenant(bundle))
        self.turn()
        self.stapler.forgotten("a.test")
        pending.callback(self.ca.response(bundle.leaf, "good", NOW - 3 * DAY, NOW + DAY))
        self.turn()
        self.assertEqual((self.responder.requests, self.clock.getDelayedCalls()), ([], []))

    def test_stored_response_for_old_certificate_ignored(self) -> None:
        old = self.ca.issue("a.test", NOW - DAY, NOW + DAY)
        self.store.ocsp["a.test"] = self.ca.response(old.leaf, "good", NOW - 60, NOW + 4 * DAY)
        bundle, tls = self.serve()
        self.turn()
        self.assertEqual(self.responder.requests, [bundle.leaf.serial_number])

    def test_unknown_not_stapled(self) -> None:
        _, tls = self.serve(status="unknown")
        self.turn()
        self.assertEqual((tls.ocsp.der, self.stapler.results["unknown"]), (b"", 1))
        self.assertEqual(self.renewals, [])


class DirectoryStoreOcspTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """<name>.ocsp is written 0600, read back, and removed with the certificate."""
        store = DirectoryStore(self.mktemp())
        store.prepare()
        verifyObject(IOcspStore, store)
        self.assertIsInstance(self.failureResultOf(store.get_ocsp("a.test")).value, KeyError)
        store.store("a.test", make_bundle("a.test"))
        self.successResultOf(store.store_ocsp("a.test", b"der"))
        path = os.path.join(store.path, "a.test.ocsp")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(self.successResultOf(store.get_ocsp("a.test")), b"der")
        self.assertEqual(self.successResultOf(store.names()), ["a.test"])
        self.successResultOf(store.delete("a.test"))
        self.assertFalse(os.path.exists(path))

    def test_memory_store(self) -> None:
        verifyObject(IOcspStore, MemoryStore())


def _handshake(server: SSL.Connection) -> list[bytes]:
    """An in-memory handshake whose client asks for the status; what it got stapled."""
    got: list[bytes] = []
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_ocsp_client_callback(lambda connection, data, _: (got.append(data), True)[1])
    client = SSL.Connection(context, None)
    client.set_tlsext_host_name(b"a.test")
    client.request_ocsp()
    pump_handshake(client, server)
    return got


class CallbackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = OcspTestCA.create(URL, None)
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
        self.bundle = self.ca.issue("a.test", now - DAY, now + DAY)
        self.der = self.ca.response(self.bundle.leaf, "good", now - 60, now + DAY)
        self.contexts = ServingContexts()

    def test_stapled_through_shared_contexts(self) -> None:
        """The callback on the shared contexts staples the connection's own tenant's response."""
        tls = self.contexts.tenant(self.bundle)
        other = self.contexts.tenant(self.ca.issue("b.test", NOW, NOW + DAY))
        self.assertEqual(_handshake(tls.connection()), [b""])
        tls.ocsp.der = self.der
        self.assertEqual(_handshake(tls.connection()), [self.der])
        self.assertEqual(_handshake(other.connection()), [b""])

    def test_callback_never_raises(self) -> None:
        """A failing lookup staples nothing, logs once, and the handshake succeeds."""
        tls = self.contexts.tenant(self.bundle)
        broken = TenantTLS(tls.cert, tls.key, tls.context, tls.contexts, None)  # type: ignore[arg-type]
        with capturedLogs() as events:
            self.assertEqual(_handshake(broken.connection()), [b""])
            self.assertEqual(_handshake(broken.connection()), [b""])
        import tenantedge.contexts

        tenantedge.contexts._staple_failed = False
        self.assertEqual(len([e for e in events if e.get("log_failure")]), 1)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)


class ResolverObserverTests(SynchronousTestCase):
    def test_remembered_and_forgotten(self) -> None:
        """The resolver tells its observer what it caches, forgets and evicts."""
        from tenantedge.policy import EdgePolicy, StaticPolicy
        from tenantedge.testing import ControlledIssuer, memory_resolver

        seen: list[tuple[str, str]] = []

        class Observer:
            def remembered(self, name: str, bundle: CertificateBundle, tls: TenantTLS) -> None:
                seen.append(("remembered", name))

            def forgotten(self, name: str) -> None:
                seen.append(("forgotten", name))

        clock = Clock()
        resolver = memory_resolver(MemoryStore(), EdgePolicy(StaticPolicy()), ControlledIssuer(), clock,
                                   cache_size=1, observer=Observer())
        resolver.remember("a.test", make_bundle("a.test"))
        resolver.remember("b.test", make_bundle("b.test"))
        resolver.forget("b.test")
        resolver.forget("b.test")
        self.assertEqual(seen, [("remembered", "a.test"), ("remembered", "b.test"), ("forgotten", "a.test"),
                                ("forgotten", "b.test")])
