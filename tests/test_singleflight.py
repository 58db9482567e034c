"""
Tests for L{tenantedge.singleflight.SingleFlight}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.singleflight import SingleFlight


class SingleFlightTests(SynchronousTestCase):
    def test_shared(self) -> None:
        flights: SingleFlight[str] = SingleFlight()
        calls: list[Deferred[str]] = []

        def work() -> Deferred[str]:
            calls.append(Deferred())
            return calls[-1]

        a, b = flights.run("k", work), flights.run("k", work)
        self.assertEqual(len(calls), 1)
        calls[0].callback("v")
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), ("v", "v"))
        flights.run("k", work)
        self.assertEqual(len(calls), 2)

    def test_cancel_one_waiter(self) -> None:
        """
        Cancelling one waiter removes only it; the work and the other
        waiters go on.
        """
        flights: SingleFlight[str] = SingleFlight()
        work: Deferred[str] = Deferred(lambda d: self.fail("shared work cancelled"))
        a, b = flights.run("k", lambda: work), flights.run("k", lambda: work)
        a.cancel()
        self.failureResultOf(a, CancelledError)
        self.assertEqual(len(flights._calls["k"].waiters), 1)
        work.callback("v")
        self.assertEqual(self.successResultOf(b), "v")

    def test_synchronous_failure(self) -> None:
        flights: SingleFlight[str] = SingleFlight()
        d = flights.run("k", lambda: 1 / 0)
        self.failureResultOf(d, ZeroDivisionError)
        self.assertNotIn("k", flights)
