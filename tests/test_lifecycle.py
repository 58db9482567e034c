"""
Tests for L{tenantedge.lifecycle}: the hostname state machine, retirement
and its persistence, driven by a L{Clock} through the real pipeline.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.interfaces import Decision
from tenantedge.lifecycle import ACTIVE, ARCHIVED, FAILING, PENDING, RENEWING, RETIRED, HostnameLifecycle, Retired
from tenantedge.pipeline import ISSUE, RENEW, CertificateCheck, IssuancePipeline
from tenantedge.policy import EdgePolicy, StaticPolicy
from tenantedge.renewal import RenewalService
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle

NOW = 1_800_000_000.0
DAY = 86400.0


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.issuer = ControlledIssuer()
        self.lifecycle = HostnameLifecycle(None, self.clock, retire_after=3 * DAY,
                                           next_retry=lambda host: self.clock.seconds() + 60)
        self.events: list[dict[str, Any]] = []
        self.lifecycle.subscribe(self.events.append)
        self.pipeline = IssuancePipeline(self.store, self.issuer, self.clock, CertificateCheck(self.clock),
                                         lifecycle=self.lifecycle)

    def state(self, host: str = "a.test") -> str | None:
        record = self.lifecycle.get(host)
        return record.state if record is not None else None

    def walk(self, renewal: RenewalService) -> None:
        d = renewal.check()
        for _ in range(5):
            self.clock.advance(0)
        self.successResultOf(d)

    def test_pending_active_renewing_active(self) -> None:
        """An allowed name is pending, active once issued, renewing during a renewal, active after it."""
        self.lifecycle.decided("a.test", "allow")
        self.assertEqual(self.state(), PENDING)
        d = self.pipeline.obtain("a.test", ISSUE)
        first = make_bundle("a.test", NOW - 60, NOW + 90 * DAY)
        self.issuer.complete("a.test", first)
        self.successResultOf(d)
        self.assertEqual(self.state(), ACTIVE)
        d = self.pipeline.obtain("a.test", RENEW, replaces=first)
        self.assertEqual(self.state(), RENEWING)
        self.issuer.complete("a.test", make_bundle("a.test", NOW, NOW + 91 * DAY))
        self.successResultOf(d)
        self.assertEqual(self.state(), ACTIVE)
        self.assertEqual([e["event"] for e in self.events], ["issued", "renewed"])
        self.assertEqual(self.events[0]["host"], "a.test")
        self.assertEqual(self.events[0]["not_after"], first.not_after)

    def test_denied_unknown_names_leave_no_record(self) -> None:
        """A name the allow check denies, never seen before, costs no record (random-name floods)."""
        self.lifecycle.decided("random.test", "deny")
        self.assertIsNone(self.lifecycle.get("random.test"))

    def test_failing_records_problem(self) -> None:
        """A failed order makes the name failing, with attempts, the problem and the next retry."""
        d = self.pipeline.obtain("a.test")
        self.issuer.fail_order("a.test", "DNS problem")
        self.failureResultOf(d)
        record = self.lifecycle.get("a.test")
        assert record is not None
        self.assertEqual((record.state, record.attempts, record.problem_detail, record.next_retry),
                         (FAILING, 1, "DNS problem", NOW + 60))
        self.assertEqual(self.events[-1]["event"], "failed")
        self.assertEqual(self.events[-1]["attempts"], 1)

    def fail_once(self) -> Any:
        d = self.pipeline.obtain("a.test")
        self.issuer.fail_order("a.test")
        return self.failureResultOf(d)

    def test_retired_after_failing_long_enough(self) -> None:
        """Failing for retire-after retires the name: no more orders, until revived."""
        self.fail_once()
        self.clock.advance(2 * DAY)
        self.fail_once()
        self.assertEqual(self.state(), FAILING)
        self.clock.advance(1 * DAY)
        self.fail_once()
        self.assertEqual(self.state(), RETIRED)
        self.assertEqual([e["event"] for e in self.events][-2:], ["failed", "retired"])
        asked = len(self.issuer.requests)
        self.failureResultOf(self.pipeline.obtain("a.test"), Retired)
        self.assertEqual(len(self.issuer.requests), asked)
        self.lifecycle.revive("a.test")
        self.assertEqual(self.state(), PENDING)
        self.pipeline.obtain("a.test")
        self.assertEqual(len(self.issuer.requests), asked + 1)

    def test_changed_allow_answer_revives(self) -> None:
        """
        A retired name is revived by a new "allow" (it was denied or unknown
        since); the same answer, a deny or an allow endpoint failing
        (unknown) keep it retired.
        """
        self.lifecycle = HostnameLifecycle(None, self.clock, retire_after=1.0)
        self.lifecycle.decided("a.test", "allow")
        self.clock.advance(1)
        self.lifecycle.failed("a.test", RuntimeError("x"))
        self.clock.advance(2)
        self.lifecycle.failed("a.test", RuntimeError("x"))
        self.assertTrue(self.lifecycle.is_retired("a.test"))
        self.clock.advance(120)
        self.lifecycle.decided("a.test", "allow")
        self.assertTrue(self.lifecycle.is_retired("a.test"))
        self.lifecycle.decided("a.test", "unknown")
        self.assertTrue(self.lifecycle.is_retired("a.test"))
        self.clock.advance(120)
        self.lifecycle.decided("a.test", "deny")
        self.assertTrue(self.lifecycle.is_retired("a.test"))
        self.clock.advance(120)
        self.lifecycle.decided("a.test", "allow")
        self.assertFalse(self.lifecycle.is_retired("a.test"))

    def test_never_retires_with_zero(self) -> None:
        """retire-after 0 never retires a name."""
        lifecycle = HostnameLifecycle(None, self.clock, retire_after=0)
        for _ in range(5):
            lifecycle.failed("a.test", RuntimeError("x"))
            self.clock.advance(10 * DAY)
        self.assertFalse(lifecycle.is_retired("a.test"))

    def test_renewal_skips_retired(self) -> None:
        """The renewal walk places no order for a retired name; its certificate stays in the store."""
        bundle = make_bundle("a.test", NOW - 80 * DAY, NOW + 2 * DAY)
        self.successResultOf(self.store.store("a.test", bundle))
        self.lifecycle = HostnameLifecycle(None, self.clock, retire_after=1.0)
        self.lifecycle.failed("a.test", RuntimeError("x"))
        self.clock.advance(2)
        self.lifecycle.failed("a.test", RuntimeError("x"))
        renewal = RenewalService(self.store, self.pipeline, EdgePolicy(StaticPolicy.from_config((), (), False)),
                                 lambda *a: None, lambda h: None, self.clock, jitter=0, lifecycle=self.lifecycle)
        self.walk(renewal)
        self.assertEqual(self.issuer.requests, [])
        self.assertEqual(renewal.events["retired"], 1)
        self.assertIs(self.successResultOf(self.store.get("a.test")), bundle)

    def test_renewal_adopts_and_archives(self) -> None:
        """Stored names without a record are adopted as active; a denied renewal archives the name."""
        self.successResultOf(self.store.store("a.test", make_bundle("a.test", NOW - 80 * DAY, NOW + 2 * DAY)))
        policy = EdgePolicy(StaticPolicy.from_config(("a.test",), (), False))
        renewal = RenewalService(self.store, self.pipeline, policy, lambda *a: None, lambda h: None, self.clock,
                                 jitter=0, lifecycle=self.lifecycle)
        self.lifecycle.adopt(["a.test"])
        self.assertEqual(self.state(), ACTIVE)
        self.walk(renewal)
        self.assertEqual(self.state(), ARCHIVED)
        self.assertEqual(self.events[-1]["event"], "archived")

    def test_policy_tells_decisions(self) -> None:
        """The policy reports each answer, so the record shows the last decision and when."""
        policy = EdgePolicy(StaticPolicy.from_config((), ("example.test",), False),
                            on_decision=lambda host, d: self.lifecycle.decided(host, d.value))
        self.successResultOf(policy.check("a.example.test"))
        record = self.lifecycle.get("a.example.test")
        assert record is not None
        self.assertEqual((record.state, record.decision, record.decided_at), (PENDING, "allow", NOW))
        self.assertEqual(self.successResultOf(policy.recheck("a.example.test")), Decision.ALLOW)

    def test_persisted_and_shared(self) -> None:
        """Records persist in a state file, and a second process on it sees the first one's changes."""
        path = os.path.join(self.mktemp())
        one = HostnameLifecycle(path, self.clock)
        two = HostnameLifecycle(path, self.clock)
        one.load()
        two.load()
        one.failed("a.test", RuntimeError("boom"))
        record = two.get("a.test")
        assert record is not None
        self.assertEqual((record.state, record.problem_detail), (FAILING, "boom"))
        three = HostnameLifecycle(path, self.clock)
        three.load()
        self.assertEqual(three.counts()[FAILING], 1)

    def test_issued_once_stored(self) -> None:
        """The issued event comes after the store has the certificate (a receiver reading it back finds it)."""
        stored: list[bool] = []
        self.lifecycle.subscribe(lambda event: stored.append("a.test" in self.store.bundles))
        d = self.pipeline.obtain("a.test", ISSUE)
        self.issuer.complete("a.test", make_bundle("a.test", NOW - 60, NOW + 90 * DAY))
        self.successResultOf(d)
        self.assertEqual(stored, [True])

    def test_transitions_on_the_latest_record(self) -> None:
        """
        Each transition is decided on the record as it is now, not on what
        this process last read: worker two's stale copy says renewing, but
        worker one has meanwhile renewed (active), so two's settle (its
        renewal placed no order) leaves it active; a revive of a name
        another worker already revived and issued does nothing.
        """
        path = os.path.join(self.mktemp())
        one = HostnameLifecycle(path, self.clock)
        two = HostnameLifecycle(path, self.clock)
        one.load()
        two.load()
        one.issued("a.test", 100.0, renewal=False)
        two.renewing("a.test")
        self.assertEqual(one.get("a.test").state, RENEWING)  # type: ignore[union-attr]
        one.issued("a.test", 200.0, renewal=True)
        stale = two._store._records["a.test"]  # type: ignore[attr-defined]
        self.assertEqual(stale["state"], RENEWING)  # two has not looked since
        two.settle("a.test")
        self.assertEqual(one.get("a.test").state, ACTIVE)  # type: ignore[union-attr]
        self.assertEqual(one.get("a.test").since, two.get("a.test").since)  # type: ignore[union-attr]

    def test_corrupt_state_ignored(self) -> None:
        """An unreadable state file is logged and ignored, never fatal."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"a.test": {"state": "bogus"}}')
        lifecycle = HostnameLifecycle(path, self.clock)
        lifecycle.load()
        self.assertEqual(lifecycle.records(), [])

    def test_observer_failure_isolated(self) -> None:
        """An observer that raises does not stop the others or the transition."""
        def broken(event: dict[str, Any]) -> None:
            raise ValueError("observer bug")

        unsubscribe = self.lifecycle.subscribe(broken)
        self.lifecycle.archived("a.test")
        self.assertEqual(self.state(), ARCHIVED)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.events[-1]["event"], "archived")
        unsubscribe()
        self.lifecycle.archived("b.test")
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    def test_expiring_once_per_certificate(self) -> None:
        """expiring-soon is sent once per certificate, not at every walk."""
        self.lifecycle.expiring("a.test", NOW + DAY)
        self.lifecycle.expiring("a.test", NOW + DAY)
        self.assertEqual([e["event"] for e in self.events], ["expiring-soon"])


class UnreadableRecordTests(SynchronousTestCase):
    def test_one_bad_record_is_skipped(self) -> None:
        """A record this version cannot read (a newer node's state, a hand edit) loses only itself."""
        import json

        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"good.test": {"state": "active", "since": 1.0, "attempts": 0},
                       "newer.test": {"state": "hibernating", "since": 1.0},
                       "typed.test": {"state": "active", "since": "yesterday"}}, f)
        lifecycle = HostnameLifecycle(path, Clock())
        lifecycle.load()
        self.assertEqual([r.host for r in lifecycle.records()], ["good.test"])

