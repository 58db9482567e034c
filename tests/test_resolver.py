"""
Tests for L{tenantedge.resolver.CertificateResolver}: the cache -> store ->
policy -> issuer -> store path, single-flight, expiry and failures.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.certificates import CertificateBundle
from tenantedge.interfaces import IssuanceFailed, PolicyRefusal
from tenantedge.policy import EdgePolicy, StaticPolicy
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle, memory_resolver

DAY = 86400.0


class ResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_000_000)
        self.store = MemoryStore()
        self.issuer = ControlledIssuer()
        self.policy = EdgePolicy(StaticPolicy.from_config(deny=[".own.example"], allow_suffixes=[".tenants.test"]))
        self.contexts: list[CertificateBundle] = []
        self.accepted = True
        self.resolver = memory_resolver(
            self.store, self.policy, self.issuer, self.clock, accepts=lambda bundle: self.accepted,
            cache_size=3, make_context=self._context,
        )

    def _context(self, bundle: CertificateBundle) -> object:
        self.contexts.append(bundle)
        return ("context", bundle)

    def bundle(self, name: str, lifetime: float = 30 * DAY) -> CertificateBundle:
        now = self.clock.seconds()
        return make_bundle(name, now - 60, now + lifetime)

    def test_single_flight(self) -> None:
        """
        Fifty concurrent first handshakes for one new name cause one store
        read (and one re-read under the name's lock) and one issuance, and
        all fifty get the same context.
        """
        waiters = [self.resolver.context_for("a.tenants.test") for _ in range(50)]
        for d in waiters:
            self.assertNoResult(d)
        self.assertEqual(self.issuer.requests, ["a.tenants.test"])
        self.assertEqual(self.store.calls["get"], 2)
        bundle = self.bundle("a.tenants.test")
        self.issuer.complete("a.tenants.test", bundle)
        results = {id(self.successResultOf(d)) for d in waiters}
        self.assertEqual(len(results), 1)
        self.assertEqual(self.store.bundles["a.tenants.test"], bundle)
        self.assertEqual(self.resolver.events["issued"], 1)

    def test_cache_hit(self) -> None:
        self.store.bundles["a.tenants.test"] = self.bundle("a.tenants.test")
        first = self.successResultOf(self.resolver.context_for("a.tenants.test"))
        self.assertIs(self.resolver.cached("a.tenants.test"), first)
        self.assertIs(self.successResultOf(self.resolver.context_for("a.tenants.test")), first)
        self.assertEqual(self.store.calls["get"], 1)
        self.assertEqual(self.issuer.requests, [])

    def test_lru_bound(self) -> None:
        """
        Only C{cache_size} contexts are kept; the least recently used go
        (not the oldest: a name used since stays).
        """
        for name in ("a", "b", "c", "d"):
            self.store.bundles[f"{name}.tenants.test"] = self.bundle(f"{name}.tenants.test")
        for name in ("a", "b", "c"):
            self.successResultOf(self.resolver.context_for(f"{name}.tenants.test"))
        self.assertIsNotNone(self.resolver.cached("a.tenants.test"))  # a is now the most recent
        self.successResultOf(self.resolver.context_for("d.tenants.test"))
        self.assertEqual(self.resolver.cache_length(), 3)
        self.assertIsNone(self.resolver.cached("b.tenants.test"))
        self.assertIsNotNone(self.resolver.cached("a.tenants.test"))
        self.assertIsNotNone(self.resolver.cached("d.tenants.test"))

    def test_untrusted_stored_certificate(self) -> None:
        """
        A stored certificate from an issuer the configuration no longer
        trusts is obtained anew.
        """
        self.accepted = False
        self.store.bundles["a.tenants.test"] = self.bundle("a.tenants.test")
        self.resolver.context_for("a.tenants.test")
        self.assertEqual(self.issuer.requests, ["a.tenants.test"])

    def test_stuck_work_abandoned(self) -> None:
        """
        An issuance that never ends is abandoned after C{work_timeout}, so
        later handshakes start afresh instead of joining it forever.
        """
        first = self.resolver.context_for("a.tenants.test")
        self.clock.advance(self.resolver.work_timeout + 1)
        self.failureResultOf(first, TimeoutError)
        self.assertFalse(self.resolver.in_flight("a.tenants.test"))
        self.resolver.context_for("a.tenants.test")
        self.assertEqual(self.issuer.requests, ["a.tenants.test", "a.tenants.test"])

    def test_cached_expiry(self) -> None:
        """
        A cached certificate that expires is never served: the next
        handshake reads the store and, finding it expired too, issues anew.
        """
        old = self.bundle("a.tenants.test", lifetime=DAY)
        self.store.bundles["a.tenants.test"] = old
        self.successResultOf(self.resolver.context_for("a.tenants.test"))
        self.clock.advance(DAY + 1)
        self.assertIsNone(self.resolver.cached("a.tenants.test"))
        d = self.resolver.context_for("a.tenants.test")
        self.assertEqual(self.issuer.requests, ["a.tenants.test"])
        fresh = self.bundle("a.tenants.test")
        self.issuer.complete("a.tenants.test", fresh)
        self.assertEqual(self.successResultOf(d), ("context", fresh))

    def test_stored_for_other_name(self) -> None:
        self.store.bundles["a.tenants.test"] = self.bundle("b.tenants.test")
        self.resolver.context_for("a.tenants.test")
        self.assertEqual(self.issuer.requests, ["a.tenants.test"])

    def test_static_refusal_touches_nothing(self) -> None:
        """A denied name is refused before the store or the issuer is asked."""
        f = self.failureResultOf(self.resolver.context_for("www.own.example"), PolicyRefusal)
        self.assertEqual(f.value.reason, "deny-list")
        self.assertEqual(self.store.calls["get"], 0)
        self.assertEqual(self.issuer.requests, [])

    def test_policy_refusal(self) -> None:
        f = self.failureResultOf(self.resolver.context_for("random.example"), PolicyRefusal)
        self.assertEqual(f.value.reason, "not-allowed")
        self.assertEqual(self.issuer.requests, [])
        self.assertEqual(self.resolver.events["refused:not-allowed"], 1)

    def test_issuer_failure_reaches_every_waiter(self) -> None:
        waiters = [self.resolver.context_for("a.tenants.test") for _ in range(3)]
        self.issuer.fail_order("a.tenants.test")
        for d in waiters:
            self.failureResultOf(d, IssuanceFailed)
        # The next attempt starts afresh.
        self.resolver.context_for("a.tenants.test")
        self.assertEqual(len(self.issuer.requests), 2)

    def test_one_waiter_times_out(self) -> None:
        """
        A handshake that gives up does not cancel the issuance others wait
        for.
        """
        impatient = self.resolver.context_for("a.tenants.test")
        impatient.addTimeout(5, self.clock)
        patient = self.resolver.context_for("a.tenants.test")
        self.clock.advance(6)
        self.failureResultOf(impatient, TimeoutError)
        self.assertNoResult(patient)
        self.issuer.complete("a.tenants.test", self.bundle("a.tenants.test"))
        self.successResultOf(patient)

    def test_store_failure_still_serves(self) -> None:
        """
        If the new certificate cannot be stored (disk full), the handshake
        still gets it, and the failure is counted.
        """
        self.store.fail_writes = OSError(28, "No space left on device")
        d = self.resolver.context_for("a.tenants.test")
        self.issuer.complete("a.tenants.test", self.bundle("a.tenants.test"))
        self.successResultOf(d)
        self.assertEqual(self.resolver.pipeline.events["issue:store-failed"], 1)
        self.flushLoggedErrors()

    def test_forget(self) -> None:
        self.store.bundles["a.tenants.test"] = self.bundle("a.tenants.test")
        self.successResultOf(self.resolver.context_for("a.tenants.test"))
        self.resolver.forget("a.tenants.test")
        self.assertIsNone(self.resolver.cached("a.tenants.test"))

    def test_in_flight(self) -> None:
        d: Deferred = self.resolver.context_for("a.tenants.test")
        self.assertTrue(self.resolver.in_flight("a.tenants.test"))
        self.issuer.complete("a.tenants.test", self.bundle("a.tenants.test"))
        self.successResultOf(d)
        self.assertFalse(self.resolver.in_flight("a.tenants.test"))


class RefusalSummaryTests(SynchronousTestCase):
    def test_one_line_per_interval(self) -> None:
        """
        A flood of refused names is one info line per interval, counted by
        reason; the per-name lines are debug only; a quiet interval logs
        nothing.
        """
        from collections import Counter

        from twisted.logger import LogLevel, globalLogPublisher

        from tenantedge.resolver import RefusalSummary, periodic

        clock = MemoryReactorClock()
        store, issuer = MemoryStore(), ControlledIssuer()
        resolver = memory_resolver(
            store, EdgePolicy(StaticPolicy.from_config(deny=[".own.example"], allow_suffixes=[".tenants.test"])),
            issuer, clock,
        )
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        summary = periodic(60, RefusalSummary(resolver.events, interval=60).summarise, clock, "summary")
        summary.startService()
        self.addCleanup(summary.stopService)
        for i in range(500):
            self.failureResultOf(resolver.context_for(f"random{i}.example"), PolicyRefusal)
        for i in range(3):
            self.failureResultOf(resolver.context_for(f"x{i}.own.example"), PolicyRefusal)
        info = [e for e in events if e.get("log_level") is LogLevel.info]
        self.assertEqual(info, [])
        clock.advance(60)
        lines = [e for e in events if e.get("event") == "refused-summary"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["count"], 503)
        self.assertEqual(lines[0]["reasons"], "not-allowed 500, deny-list 3")
        clock.advance(60)
        self.assertEqual(len([e for e in events if e.get("event") == "refused-summary"]), 1)
        self.assertEqual(Counter(e["log_level"] for e in events if e.get("event") == "refused")[LogLevel.info], 0)


class WarmTests(SynchronousTestCase):
    """L{resolver.warm}: a fleet node fills its cache from the shared store."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_000_000)
        self.store = MemoryStore()
        policy = EdgePolicy(StaticPolicy.from_config(deny=[], allow_suffixes=[".tenants.test"]))
        self.resolver = memory_resolver(self.store, policy, ControlledIssuer(), self.clock, cache_size=3,
                                        make_context=lambda bundle: ("context", bundle))
        now = self.clock.seconds()
        for name in ("a.tenants.test", "b.tenants.test", "c.tenants.test", "d.tenants.test"):
            self.successResultOf(self.store.store(name, make_bundle(name, now - 60, now + 30 * DAY)))
        self.successResultOf(self.store.store("old.tenants.test", make_bundle("old.tenants.test", 0, now - 1)))

    def test_fills_the_room_left(self) -> None:
        """
        Valid stored certificates are loaded up to the cache's free room;
        what is cached stays, an expired one is not loaded.
        """
        self.successResultOf(self.resolver.context_for("d.tenants.test"))
        loaded = self.successResultOf(Deferred.fromCoroutine(self.resolver.warm()))
        self.assertEqual(loaded, 2)
        self.assertEqual(sorted(self.resolver.cached_names()), ["a.tenants.test", "b.tenants.test", "d.tenants.test"])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(self.resolver.warm())), 0)  # full

    def test_resync_forgets_changed_then_warms(self) -> None:
        self.successResultOf(self.resolver.context_for("a.tenants.test"))
        now = self.clock.seconds()
        self.successResultOf(self.store.store("a.tenants.test", make_bundle("a.tenants.test", now - 1, now + DAY)))
        self.successResultOf(self.resolver.resync_logged())
        cached = self.resolver.cached("a.tenants.test")
        self.assertIsNotNone(cached)
        self.assertEqual(len(self.resolver.cached_names()), 3)
