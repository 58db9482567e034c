"""
Tests for L{tenantedge.pipeline}: one issuance pipeline for first requests
and renewals, one run per name whoever asks, the re-read under the name's
lock, and counting by purpose.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tenantedge.interfaces import HeldLock, INameLock, IssuanceFailed
from tenantedge.pipeline import ISSUE, RENEW, CertificateCheck, IssuancePipeline, MemoryNameLock
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle

NOW = 1_800_000_000.0
DAY = 86400.0


@implementer(INameLock)
class HandLock:
    """A lock the test grants by hand, as another node would release it."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[HeldLock]] = []
        self.held: list[HeldLock] = []
        self.released = 0

    def acquire(self, server_name: str) -> Deferred[HeldLock]:
        d: Deferred[HeldLock] = Deferred()
        self.waiting.append(d)
        return d

    def grant(self) -> HeldLock:
        def release() -> None:
            self.released += 1

        held = HeldLock(release)
        self.held.append(held)
        self.waiting.pop(0).callback(held)
        return held


class PipelineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.issuer = ControlledIssuer()
        self.observed: list[tuple[str, str, float]] = []
        self.lock = HandLock()
        self.pipeline = IssuancePipeline(
            self.store, self.issuer, self.clock, CertificateCheck(self.clock), lock=self.lock,
            observe=lambda *args: self.observed.append(args),
        )

    def bundle(self, name: str, lifetime: float = 30 * DAY) -> object:
        return make_bundle(name, NOW - 60, NOW + lifetime)

    def test_locks_verify(self) -> None:
        self.assertTrue(verifyObject(INameLock, MemoryNameLock()))
        self.assertTrue(verifyObject(INameLock, self.lock))

    def test_lock_lost_mid_order(self) -> None:
        """
        A lock lost while ordering (a fleet lock that expired) stops the
        order, without counting a CA failure; the pipeline waits for the
        lock again and serves what the new holder stored.
        """
        d = self.pipeline.obtain("a.test")
        held = self.lock.grant()
        self.assertEqual(self.issuer.requests, ["a.test"])
        [order] = self.issuer._pending["a.test"]
        held.lose()
        self.assertTrue(order.called)  # the order in flight was cancelled (the pipeline took its failure)
        self.assertEqual(self.lock.released, 1)
        self.assertEqual(len(self.lock.waiting), 1)  # waiting for the lock again
        theirs = self.bundle("a.test")
        self.successResultOf(self.store.store("a.test", theirs))  # the new holder's certificate
        self.lock.grant()
        self.assertIs(self.successResultOf(d), theirs)
        self.assertEqual(self.issuer.requests, ["a.test"])
        self.assertEqual(self.pipeline.counts(ISSUE), {"lock-lost": 1, "found": 1})

    def test_lock_lost_stops_the_whole_chain(self) -> None:
        """
        With two CAs, a lock lost during the first one's order stops there:
        the second CA is not asked; an issuer that reports the cancellation
        as its own failure still counts as lock-lost, not failed. (A
        cancellation that comes up as such leaves no backoff either.)
        """
        from tenantedge.backoff import FailureBackoff
        from tenantedge.issuer import BackoffIssuer, FallbackIssuer
        from tenantedge.testing import ControlledIssuer

        first, second = ControlledIssuer(name="first"), ControlledIssuer(name="second")
        backoff = FailureBackoff(None, self.clock)
        pipeline = IssuancePipeline(self.store, BackoffIssuer(FallbackIssuer([first, second]), backoff), self.clock,
                                    CertificateCheck(self.clock), lock=self.lock)
        d = pipeline.obtain("a.test")
        self.lock.grant().lose()
        self.assertEqual((first.requests, second.requests), (["a.test"], []))
        self.assertEqual(len(self.lock.waiting), 1)
        self.assertIsNone(backoff.blocked_until("a.test"))

        class Swallowing:
            name = "swallowing"

            def issue(self, server_name: str, replaces: Any = None) -> Deferred[Any]:
                return Deferred(lambda d: d.errback(IssuanceFailed(server_name, "cannot reach the CA")))

        self.lock.waiting.pop(0).cancel()
        self.failureResultOf(d)
        pipeline = IssuancePipeline(self.store, BackoffIssuer(Swallowing(), backoff), self.clock,  # type: ignore[arg-type]
                                    CertificateCheck(self.clock), lock=self.lock)
        d = pipeline.obtain("b.test")
        self.lock.grant().lose()
        self.assertEqual(pipeline.counts(ISSUE), {"lock-lost": 1})
        self.lock.waiting.pop(0).cancel()
        self.failureResultOf(d)

    def test_lock_lost_twice(self) -> None:
        from tenantedge.pipeline import LockLost

        d = self.pipeline.obtain("a.test")
        for _ in range(2):
            self.lock.grant().lose()
        self.failureResultOf(d, LockLost)
        self.assertEqual(self.pipeline.counts(ISSUE), {"lock-lost": 2})

    def test_lock_lost_after_release_is_nothing(self) -> None:
        d = self.pipeline.obtain("a.test")
        held = self.lock.grant()
        self.issuer.complete("a.test", self.bundle("a.test"))
        self.successResultOf(d)
        held.lose()
        self.assertFalse(held.lost.called)

    def test_one_run_whoever_asks(self) -> None:
        """A handshake, the renewal walk and the admin API asking at once share one order."""
        old = self.bundle("a.test")
        runs = [
            self.pipeline.obtain("a.test", ISSUE),
            self.pipeline.obtain("a.test", RENEW, replaces=old),
            self.pipeline.obtain("b.test"),
        ]
        self.assertEqual(len(self.lock.waiting), 2)
        self.lock.grant()
        self.lock.grant()
        self.assertEqual(self.issuer.requests, ["a.test", "b.test"])
        new = self.bundle("a.test")
        self.clock.advance(2)
        self.issuer.complete("a.test", new)
        self.assertIs(self.successResultOf(runs[0]), new)
        self.assertIs(self.successResultOf(runs[1]), new)
        self.assertIs(self.store.bundles["a.test"], new)
        self.assertEqual(self.observed, [(ISSUE, "issued", 2.0)])
        self.assertEqual(self.lock.released, 1)

    def test_reread_under_the_lock(self) -> None:
        """
        A certificate another holder of the lock stored meanwhile is used:
        no order is placed.
        """
        d = self.pipeline.obtain("a.test")
        theirs = self.bundle("a.test")
        self.store.bundles["a.test"] = theirs  # another worker or node finished first
        self.lock.grant()
        self.assertIs(self.successResultOf(d), theirs)
        self.assertEqual(self.issuer.requests, [])
        self.assertEqual(self.pipeline.events["issue:found"], 1)
        self.assertEqual(self.lock.released, 1)

    def test_renewal_reread(self) -> None:
        """
        A renewal orders unless the store now holds a newer certificate
        than the one it replaces.
        """
        old = self.bundle("a.test", lifetime=DAY)
        self.store.bundles["a.test"] = old
        d = self.pipeline.obtain("a.test", RENEW, replaces=old)
        self.lock.grant()
        self.assertEqual(self.issuer.requests, ["a.test"])  # still the old one: order
        self.issuer.complete("a.test", self.bundle("a.test"))
        self.successResultOf(d)
        renewed_elsewhere = self.bundle("a.test", lifetime=60 * DAY)
        self.store.bundles["a.test"] = renewed_elsewhere
        d = self.pipeline.obtain("a.test", RENEW, replaces=old)
        self.lock.grant()
        self.assertIs(self.successResultOf(d), renewed_elsewhere)
        self.assertEqual(self.issuer.requests, ["a.test"])

    def test_failures_counted_by_purpose(self) -> None:
        d = self.pipeline.obtain("a.test", RENEW, replaces=self.bundle("a.test"))
        self.lock.grant()
        self.issuer.fail_order("a.test")
        self.failureResultOf(d, IssuanceFailed)
        self.assertEqual(self.pipeline.counts(RENEW), {"failed": 1})
        self.assertEqual(self.observed, [(RENEW, "failed", 0.0)])
        self.assertEqual(self.lock.released, 1)

    def test_unusable_stored_certificate_is_replaced(self) -> None:
        """An expired certificate found under the lock does not count as found."""
        self.store.bundles["a.test"] = make_bundle("a.test", NOW - 10 * DAY, NOW - DAY)
        self.pipeline.obtain("a.test")
        self.lock.grant()
        self.assertEqual(self.issuer.requests, ["a.test"])

    def test_stuck_run_abandoned(self) -> None:
        """A lock that is never granted ends the run after work_timeout; the next starts afresh."""
        d = self.pipeline.obtain("a.test")
        self.clock.advance(self.pipeline.work_timeout + 1)
        self.failureResultOf(d)
        self.assertFalse(self.pipeline.in_flight("a.test"))


class PrecheckInPipelineTests(SynchronousTestCase):
    def test_failed_precheck_places_no_order(self) -> None:
        """
        A pre-check failure inside the issuer chain fails the obtain with
        PrecheckFailed, places no order, is counted as precheck-failed (not
        failed) and starts the name's backoff; the next attempt is refused
        from the backoff without running the checks again.
        """
        from collections import Counter

        from twisted.internet.defer import fail

        from tenantedge.backoff import FailureBackoff
        from tenantedge.interfaces import BackedOff, PrecheckFailed
        from tenantedge.issuer import BackoffIssuer
        from tenantedge.precheck import PrecheckedIssuer

        class NotHere:
            name = "dns"
            asked = 0

            def check(self, server_name: str) -> Deferred[None]:
                self.asked += 1
                return fail(PrecheckFailed(server_name, "dns-not-pointing-here", "resolves to 192.0.2.9"))

        clock = Clock()
        clock.advance(NOW)
        issuer = ControlledIssuer()
        check = NotHere()
        backoff = FailureBackoff(None, clock)
        results: Counter[str] = Counter()
        from tenantedge.lifecycle import HostnameLifecycle

        lifecycle = HostnameLifecycle(None, clock)
        pipeline = IssuancePipeline(
            MemoryStore(), BackoffIssuer(PrecheckedIssuer(issuer, [check], results), backoff), clock,
            CertificateCheck(clock), lifecycle=lifecycle,
        )
        f = self.failureResultOf(pipeline.obtain("a.test"), PrecheckFailed)
        self.assertEqual(f.value.reason, "dns-not-pointing-here")
        # The name is failing, with the pre-check's reason as its problem.
        record = lifecycle.get("a.test")
        assert record is not None
        self.assertEqual((record.state, record.problem_type), ("failing", "dns-not-pointing-here"))
        self.assertEqual(issuer.requests, [])
        self.assertEqual(pipeline.counts(ISSUE), {"precheck-failed": 1})
        self.assertIsNotNone(backoff.blocked_until("a.test"))
        self.failureResultOf(pipeline.obtain("a.test"), BackedOff)
        self.assertEqual((check.asked, issuer.requests), (1, []))
