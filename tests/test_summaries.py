"""
Tests for L{tenantedge.summaries}: the limits' log lines are one per
interval whatever the rate, driven by the injected clock; and for their
metric family (L{tenantedge.metrics.LimitCollector}).
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.metrics import LimitCollector
from tenantedge.resolver import periodic
from tenantedge.summaries import LimitSummary


class LimitSummaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = MemoryReactorClock()
        self.limits: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()
        service = periodic(60, LimitSummary(self.limits, self.handshakes, interval=60).summarise, self.clock, "s")
        service.startService()
        self.addCleanup(service.stopService)

    def lines(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "limits-summary"]

    def test_one_line_per_interval(self) -> None:
        """
        Thousands of refusals in a minute are one info line, counted by
        reason, limits of the relay, the PROXY header and the connection
        caps together; handshake outcomes that are no limit are left out;
        a quiet minute logs nothing.
        """
        self.limits["idle-timeout"] += 2000
        self.limits["proxy-header-invalid"] += 30
        self.limits["header-timeout"] += 5
        self.handshakes["refused-address-full"] += 7
        self.handshakes["cache-hit"] += 10000
        self.assertEqual(self.lines(), [])
        self.clock.advance(60)
        [line] = self.lines()
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual(line["count"], 2042)
        self.assertEqual(line["reasons"], "idle-timeout 2000, proxy-header-invalid 30, refused-address-full 7, "
                                          "header-timeout 5")
        self.clock.advance(60)
        self.assertEqual(len(self.lines()), 1)
        self.limits["head-too-large"] += 1
        self.clock.advance(60)
        self.assertEqual(self.lines()[-1]["reasons"], "head-too-large 1")

    def test_baseline_at_start(self) -> None:
        """What was counted before the summary started is not reported as new."""
        self.clock.advance(60)
        self.assertEqual(self.lines(), [])


class LimitCollectorTests(SynchronousTestCase):
    def test_family(self) -> None:
        registry = CollectorRegistry()
        limits: Counter[str] = Counter({"header-timeout": 3, "proxy-header-invalid": 2})
        registry.register(LimitCollector(limits))
        text = generate_latest(registry).decode()
        self.assertIn('tenantedge_limits_total{reason="header-timeout"} 3.0', text)
        self.assertIn('tenantedge_limits_total{reason="proxy-header-invalid"} 2.0', text)
