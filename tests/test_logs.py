"""
Structured logs: one JSON line per event, with the fields operators filter
on (event, host, reason, duration, problem).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.logs import json_observer
from tenantedge.policy import EdgePolicy, StaticPolicy
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle, memory_resolver


class JSONLogTests(SynchronousTestCase):
    def test_issuance_refusal_and_failure_events(self) -> None:
        stream = io.StringIO()
        observer = json_observer(stream)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = MemoryReactorClock()
        issuer = ControlledIssuer()
        resolver = memory_resolver(
            MemoryStore(), EdgePolicy(StaticPolicy(allow_suffixes=(".test",))), issuer, clock,
            make_context=lambda b: object(),
        )
        d = resolver.context_for("a.test")
        clock.advance(1.5)
        issuer.complete("a.test", make_bundle("a.test"))
        self.successResultOf(d)
        self.failureResultOf(resolver.context_for("nope.example"))
        d = resolver.context_for("b.test")
        issuer.fail_order("b.test", "CA said rateLimited")
        self.failureResultOf(d)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        ours = [line for line in lines if "event" in line]
        self.assertEqual([line["event"] for line in ours], ["issued", "refused", "issue-failed"])
        issued, refused, failed = ours
        self.assertEqual(issued["host"], "a.test")
        self.assertEqual(issued["duration"], 1.5)
        self.assertEqual(issued["level"], "info")
        self.assertEqual((refused["host"], refused["reason"]), ("nope.example", "not-allowed"))
        self.assertEqual(failed["level"], "error")
        self.assertIn("rateLimited", failed["error"])
        self.assertIn("a.test", issued["message"])

    def test_twistd_logger_option(self) -> None:
        """twistd --logger tenantedge.logs.json_observer prints JSON lines."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [twistd, "-n", "--pidfile=", "--logger", "tenantedge.logs.json_observer", "tenantedge",
             "--https", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1", "--admin", "none",
             "--store", "/proc/no-such-dir/store"],
            capture_output=True, text=True, timeout=60,
        )
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        self.assertTrue(lines, result.stdout + result.stderr)
        self.assertTrue(all("message" in line and "time" in line for line in lines))
