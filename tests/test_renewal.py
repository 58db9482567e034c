"""
Tests for L{tenantedge.renewal}: when certificates are due, the renewal
walk on a Clock, hot swap, archive on deny, retry and panic, ARI.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.acme import AcmeClient, ari_certificate_id
from tenantedge.allow import Decision
from tenantedge.certificates import common_name, sign_certificate
from tenantedge.policy import EdgePolicy, StaticPolicy
from tenantedge.renewal import DAY, RenewalService, renewal_due
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle, memory_resolver

from .support.fakeca import BASE, FakeCA


class _Rechecks:
    """A policy whose renewal re-ask answers from a dict (ALLOW by default)."""

    def __init__(self, decisions: dict[str, Decision]) -> None:
        self.decisions = decisions

    def static_refusal(self, server_name: str) -> None:
        return None

    def check(self, server_name: str):  # type: ignore[no-untyped-def]
        return succeed(None)

    def recheck(self, server_name: str):  # type: ignore[no-untyped-def]
        return succeed(self.decisions.get(server_name, Decision.ALLOW))

NOW = 1_800_000_000.0


def bundle_aged(name: str, lifetime_days: float, left_days: float):
    return make_bundle(name, NOW - (lifetime_days - left_days) * DAY, NOW + left_days * DAY)


class DueTests(SynchronousTestCase):
    def test_lifetime_rule(self) -> None:
        """
        30 days before expiry or a third of the lifetime, whichever is
        shorter: 90-day certificates at 30 days left, 45-day at 15, 6-day
        at 2. Nothing assumes 90 days.
        """
        for lifetime, left_at_due in ((90, 30), (45, 15), (6, 2), (365, 30)):
            bundle = bundle_aged("a.test", lifetime, lifetime)
            self.assertAlmostEqual(bundle.not_after - renewal_due(bundle, 30 * DAY), left_at_due * DAY, places=3)

    def test_window_never_later_than_lifetime_rule(self) -> None:
        """A CA window near or past expiry cannot delay renewal beyond the lifetime rule."""
        bundle = bundle_aged("a.test", 90, 90)
        late = (bundle.not_after - DAY, bundle.not_after + 10 * DAY)
        self.assertEqual(renewal_due(bundle, 30 * DAY, late), bundle.not_after - 30 * DAY)

    def test_ari_window(self) -> None:
        """With a window, the due time lies in it and is stable for one certificate."""
        bundle = bundle_aged("a.test", 90, 90)
        window = (NOW + 10 * DAY, NOW + 12 * DAY)
        due = renewal_due(bundle, 30 * DAY, window)
        self.assertTrue(window[0] <= due <= window[1])
        self.assertEqual(due, renewal_due(bundle, 30 * DAY, window))


class RenewalServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.issuer = ControlledIssuer()
        self.decisions: dict[str, Decision] = {}
        self.resolver = memory_resolver(
            self.store, EdgePolicy(StaticPolicy(allow_suffixes=(".test",))), self.issuer, self.clock,
            make_context=lambda bundle: ("context", bundle),
        )
        self.service = RenewalService(
            self.store,
            self.resolver.pipeline,
            _Rechecks(self.decisions),
            self.resolver.remember,
            self.resolver.forget,
            self.clock,
            interval=3600,
            random=lambda: 0.0,
            batch=2,
        )
        self.logs: list[dict] = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    def test_only_due_renewed(self) -> None:
        """
        Certificates at different ages: exactly the due ones are renewed;
        the others are left alone.
        """
        self.store.bundles.update({
            "fresh.test": bundle_aged("fresh.test", 90, 60),
            "due.test": bundle_aged("due.test", 90, 29),
            "short-fresh.test": bundle_aged("short-fresh.test", 6, 3),
            "short-due.test": bundle_aged("short-due.test", 6, 1.9),
            "expired.test": bundle_aged("expired.test", 90, -1),
        })
        self.service.check()
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(sorted(self.issuer.requests), ["due.test", "expired.test", "short-due.test"])

    def test_only_the_leader_walks(self) -> None:
        """
        In a fleet, a node that is not the renewal leader does not walk the
        store at all (N nodes do not each read every key every interval).
        """
        from twisted.internet.defer import succeed

        self.store.bundles["due.test"] = bundle_aged("due.test", 90, 29)
        self.service.leader = lambda: succeed(False)
        self.service.check()
        self.clock.advance(0)
        self.assertEqual(self.issuer.requests, [])
        self.assertEqual(self.service.events["not-leader"], 1)
        self.service.leader = lambda: succeed(True)
        self.service.check()
        for _ in range(3):
            self.clock.advance(0)
        self.assertEqual(self.issuer.requests, ["due.test"])

    def test_hot_swap(self) -> None:
        """
        The old certificate serves while the renewal runs; once the new one
        is stored, the next handshake gets it.
        """
        old = bundle_aged("a.test", 90, 10)
        self.store.bundles["a.test"] = old
        self.assertEqual(self.successResultOf(self.resolver.context_for("a.test")), ("context", old))
        d = self.service.check()
        self.assertEqual(self.issuer.requests, ["a.test"])
        self.assertEqual(self.issuer.replaced, [old])  # the CA is told what is renewed (ARI)
        self.assertEqual(self.resolver.cached("a.test"), ("context", old))
        new = bundle_aged("a.test", 90, 90)
        self.issuer.complete("a.test", new)
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.store.bundles["a.test"], new)
        self.assertEqual(self.resolver.cached("a.test"), ("context", new))
        self.assertEqual(self.service.events["renewed"], 1)
        self.assertEqual(self.service.soonest_expiry, new.not_after)

    def test_deny_archives(self) -> None:
        """A definite deny at renewal archives the certificate; the key is kept."""
        bundle = bundle_aged("gone.test", 90, 10)
        self.store.bundles["gone.test"] = bundle
        self.successResultOf(self.resolver.context_for("gone.test"))
        self.decisions["gone.test"] = Decision.DENY
        d = self.service.check()
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.store.archive, [("gone.test", bundle)])
        self.assertIsNone(self.resolver.cached("gone.test"))
        self.assertEqual(self.issuer.requests, [])

    def test_unknown_renews(self) -> None:
        """An allow endpoint that is down does not stop renewal."""
        self.store.bundles["a.test"] = bundle_aged("a.test", 90, 10)
        self.decisions["a.test"] = Decision.UNKNOWN
        self.service.check()
        self.assertEqual(self.issuer.requests, ["a.test"])

    def test_failure_retried_and_panic(self) -> None:
        """
        A failed renewal is retried at the next check; inside the last 7
        days every failed check logs at critical level.
        """
        self.store.bundles["a.test"] = bundle_aged("a.test", 90, 10)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.issuer.fail_order("a.test")
        self.clock.advance(0)
        self.assertEqual(self.service.events["failed"], 1)
        self.assertEqual(self.service.events["panic"], 0)
        self.clock.advance(3600)
        self.assertEqual(len(self.issuer.requests), 2)
        self.issuer.fail_order("a.test")
        self.clock.advance(3 * DAY + 1 - 3600)  # now inside the last 7 days
        for _ in range(3):
            self.issuer.fail_order("a.test")
            self.clock.advance(3600)
        self.assertGreaterEqual(self.service.events["panic"], 3)
        critical = [e for e in self.logs if e.get("log_level") == LogLevel.critical]
        self.assertTrue(critical)
        self.assertIn("PANIC", critical[0]["log_format"])

    def test_expiring_told_inside_last_days(self) -> None:
        """
        C{expiring} (the expiring-soon webhook) is told of a failed renewal
        only inside the last C{panic_within}, with the certificate's serial.
        """
        told: list[tuple[str, int, float, str]] = []
        self.service.expiring = lambda *args: told.append(args)
        bundle = bundle_aged("a.test", 90, 10)
        self.store.bundles["a.test"] = bundle
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.issuer.fail_order("a.test")
        self.clock.advance(0)
        self.assertEqual(told, [])
        self.clock.advance(3 * DAY + 1)
        self.issuer.fail_order("a.test", "CA down")
        self.clock.advance(3600)
        self.assertTrue(told)
        name, serial, not_after, error = told[0]
        self.assertEqual((name, serial, not_after), ("a.test", bundle.leaf.serial_number, bundle.not_after))
        self.assertIn("CA down", error)

    def test_walk_is_incremental(self) -> None:
        """The store is walked a batch per reactor turn, never all at once."""
        for i in range(6):
            self.store.bundles[f"n{i}.test"] = bundle_aged(f"n{i}.test", 90, 60)
        gets = []
        original = self.store.get
        self.store.get = lambda name: (gets.append(name), original(name))[1]  # type: ignore[method-assign]
        d = self.service.check()
        # One batch read in this turn; the rest waits for the next turn.
        self.assertEqual(len(gets), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertNoResult(d)
        self.clock.advance(0)
        self.assertEqual(len(gets), 6)
        self.successResultOf(d)

    def test_loop_survives_errors(self) -> None:
        """A check that fails is logged, and the LoopingCall goes on."""
        self.store.names = lambda: succeed(["a.test"])  # type: ignore[method-assign]
        self.store.get = lambda name: 1 / 0  # type: ignore[method-assign]
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.clock.advance(0)
        self.clock.advance(3600)
        self.clock.advance(0)
        self.assertTrue(self.service._loop.running)
        self.assertEqual(self.service.events["checks"], 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    def test_jitter(self) -> None:
        """Each walk starts after up to 10% of the interval, at random."""
        self.service.random = lambda: 0.5
        self.store.bundles["a.test"] = bundle_aged("a.test", 90, 10)
        self.service.check()
        self.clock.advance(179)
        self.assertEqual(self.issuer.requests, [])
        self.clock.advance(2)
        self.assertEqual(self.issuer.requests, ["a.test"])


class ARITests(SynchronousTestCase):
    def test_window_from_fake_ca(self) -> None:
        """
        With a CA that offers renewalInfo, the client fetches the window for
        the certificate's ARI identifier, and the due time follows it.
        """
        clock = Clock()
        clock.advance(NOW)
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_key = ec.generate_private_key(ec.SECP256R1())
        utc = datetime.timezone.utc
        cert = sign_certificate(
            common_name("a.test"), key.public_key(),
            datetime.datetime.fromtimestamp(NOW - DAY, utc), datetime.datetime.fromtimestamp(NOW + 89 * DAY, utc),
            issuer_key, issuer=common_name("Fake CA"), dns_names=["a.test"],
            extensions=[(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)],
        )
        ca = FakeCA(lambda csr: [])
        cert_id = ari_certificate_id(cert)
        ca.renewal_info = {cert_id: {"suggestedWindow": {"start": "2027-02-01T00:00:00Z", "end": "2027-02-03T00:00:00Z"}}}
        http = StubTreq(ca)
        client = AcmeClient(f"{BASE}/dir", None, http, clock)
        d = client.renewal_window(cert)
        http.flush()
        start, end = self.successResultOf(d)
        self.assertEqual(start, datetime.datetime(2027, 2, 1, tzinfo=utc).timestamp())
        self.assertEqual(end, datetime.datetime(2027, 2, 3, tzinfo=utc).timestamp())
        # Cached: no second request.
        before = len(ca.requests)
        self.successResultOf(client.renewal_window(cert))
        self.assertEqual(len(ca.requests), before)

    def test_unreachable_window_cached(self) -> None:
        """A failed renewalInfo lookup is not retried for each walk (an hour's pause)."""
        clock = Clock()
        clock.advance(NOW)
        ca = FakeCA(lambda csr: [])
        ca.renewal_info = {}
        http = StubTreq(ca)
        client = AcmeClient(f"{BASE}/dir", None, http, clock)
        key = ec.generate_private_key(ec.SECP256R1())
        utc = datetime.timezone.utc
        cert = sign_certificate(
            common_name("a.test"), key.public_key(),
            datetime.datetime.fromtimestamp(NOW - DAY, utc), datetime.datetime.fromtimestamp(NOW + 89 * DAY, utc),
            key, dns_names=["a.test"],
            extensions=[(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)],
        )
        d = client.renewal_window(cert)
        http.flush()
        self.failureResultOf(d)  # 404: unknown certificate
        asked = len(ca.requests)
        self.assertIsNone(self.successResultOf(client.renewal_window(cert)))
        self.assertEqual(len(ca.requests), asked)

    def test_no_renewal_info(self) -> None:
        clock = Clock()
        ca = FakeCA(lambda csr: [])
        http = StubTreq(ca)
        client = AcmeClient(f"{BASE}/dir", None, http, clock)
        d = client.renewal_window(make_bundle("a.test").leaf)
        http.flush()
        self.assertIsNone(self.successResultOf(d))
