"""
Tests for L{tenantedge.backend}'s balancing and health: L{Backends} (least
outstanding requests, ejection, cooldowns, every backend down) and
L{HealthCheck}, on a L{MemoryReactorClock} with connections on
C{StringTransport}s; nothing sleeps.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.backend import COOLDOWN, MAX_COOLDOWN, BackendPool, Backends, HealthCheck

from .test_http1 import FakeEndpoint


class _Logged:
    """Log events at warn and info level while installed."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("tenantedge.backend"):
            self.events.append(event)

    def formats(self) -> list[str]:
        return [e["log_format"].split(" ", 2)[2] for e in self.events]


class BackendsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoints = [FakeEndpoint() for _ in range(3)]
        self.pools = [BackendPool(self.clock, (lambda e=e: e), name=f"http://b{i}") for i, e in enumerate(self.endpoints)]
        self.backends = Backends(self.clock, self.pools)
        self.logged = _Logged(self)

    def test_round_robin_when_idle(self) -> None:
        """Requests that end before the next one starts go round in order."""
        chosen = []
        for _ in range(6):
            pool = self.backends.choose()
            chosen.append(pool)
            self.backends.done(pool)
        self.assertEqual(chosen, self.pools * 2)
        self.assertEqual([p.requests for p in self.pools], [2, 2, 2])
        self.assertEqual([p.outstanding for p in self.pools], [0, 0, 0])

    def test_least_outstanding(self) -> None:
        """A backend still busy with a long request is passed over for idle ones."""
        first = self.backends.choose()
        second = self.backends.choose()
        third = self.backends.choose()
        self.assertEqual([first, second, third], self.pools)
        self.backends.done(second)
        self.assertIs(self.backends.choose(), second)
        self.backends.done(first)
        self.backends.done(third)
        # b0 and b2 idle, b1 busy: the two idle ones take turns.
        got = [self.backends.choose() for _ in range(2)]
        self.assertEqual(sorted(p.name for p in got), ["http://b0", "http://b2"])
        self.assertEqual([p.outstanding for p in self.pools], [1, 1, 1])

    def test_refused_ejects_at_once_and_logs_once(self) -> None:
        """One refused connection ejects; the ejected backend gets no traffic; one log line."""
        pool = self.backends.choose()
        self.backends.done(pool, False, "refused", refused=True)
        self.assertFalse(pool.up)
        self.assertEqual(pool.failures, 1)
        for _ in range(10):
            other = self.backends.choose()
            self.assertIsNot(other, pool)
            self.backends.done(other)
        self.assertEqual(self.logged.formats(), ["ejected for {seconds:g}s after {failures} failure(s): {error}"])
        self.assertEqual(self.backends.healthy(), 2)

    def test_three_failures_eject(self) -> None:
        pool = self.pools[0]
        for n in range(3):
            self.backends.again(pool)
            self.assertTrue(pool.up, n)
            self.backends.done(pool, False, "reset")
        self.assertFalse(pool.up)

    def test_success_resets_the_count(self) -> None:
        pool = self.pools[0]
        for ok in (False, False, True, False, False):
            self.backends.again(pool)
            self.backends.done(pool, ok, "reset")
        self.assertTrue(pool.up)
        self.assertEqual(pool.consecutive, 2)

    def test_no_verdict_changes_nothing(self) -> None:
        """A client gone or a 504 neither ejects nor vouches for a backend."""
        pool = self.pools[0]
        for ok in (False, False, None, None):
            self.backends.again(pool)
            self.backends.done(pool, ok, "reset")
        self.assertEqual(pool.consecutive, 2)
        self.assertEqual(pool.failures, 2)

    def test_cooldown_grows_while_failing(self) -> None:
        """Back after 10 s; failing again at once, out for 20 s, 40 s, then at most a minute."""
        pool = self.pools[0]
        waits = []
        for _ in range(4):
            self.backends.again(pool)
            self.backends.done(pool, False, "refused", refused=True)
            self.assertFalse(pool.up)
            start = self.clock.seconds()
            while not pool.up:
                self.clock.advance(1)
            waits.append(self.clock.seconds() - start)
        self.assertEqual(waits, [COOLDOWN, 2 * COOLDOWN, 4 * COOLDOWN, MAX_COOLDOWN])
        # Back, and answering: the next ejection is short again.
        self.backends.again(pool)
        self.backends.done(pool)
        self.backends.again(pool)
        self.backends.done(pool, False, "refused", refused=True)
        self.clock.advance(COOLDOWN)
        self.assertTrue(pool.up)
        self.assertEqual(self.logged.formats().count("back in rotation after its cooldown"), 5)

    def test_probation_after_cooldown(self) -> None:
        """Back from a cooldown, one failure is enough to eject it again."""
        pool = self.pools[0]
        for _ in range(3):
            self.backends.again(pool)
            self.backends.done(pool, False, "reset")
        self.clock.advance(COOLDOWN)
        self.assertTrue(pool.up)
        self.backends.again(pool)
        self.backends.done(pool, False, "reset")
        self.assertFalse(pool.up)

    def test_all_down_tries_the_longest_down(self) -> None:
        """With every backend ejected, requests go to the one down longest, in turn; a success brings it back."""
        for pool in self.pools:
            self.backends.again(pool)
            self.backends.done(pool, False, "refused", refused=True)
            self.clock.advance(1)
        self.assertEqual(self.backends.healthy(), 0)
        tried = []
        for _ in range(3):
            pool = self.backends.choose()
            tried.append(pool)
            self.backends.done(pool, False, "refused", refused=True)
            self.clock.advance(0.1)
        self.assertEqual(tried, self.pools)
        self.assertEqual(len(self.logged.events), 3)  # still one line per ejection
        pool = self.backends.choose()
        self.backends.done(pool)
        self.assertTrue(pool.up)
        self.assertEqual(self.logged.formats()[-1], "back in rotation: {why}")

    def test_choose_other_skips_tried_and_down(self) -> None:
        a, b, c = self.pools
        self.backends.again(c)
        self.backends.done(c, False, "refused", refused=True)
        self.assertIs(self.backends.choose_other([a]), b)
        self.assertIsNone(self.backends.choose_other([a, b]))
        self.assertEqual(b.outstanding, 1)

    def test_single_backend_always_chosen(self) -> None:
        """One backend, down or not, gets every request: the behaviour from before several existed."""
        pool = BackendPool(self.clock, lambda: self.endpoints[0])
        backends = Backends(self.clock, [pool])
        backends.done(backends.choose(), False, "refused", refused=True)
        self.assertFalse(pool.up)
        self.assertIs(backends.choose(), pool)
        self.assertIsNone(backends.choose_other([pool]))

    def test_close_forgets_timers(self) -> None:
        pool = self.backends.choose()
        self.backends.done(pool, False, "refused", refused=True)
        self.backends.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_give_back_to_its_own_pool(self) -> None:
        pool = self.pools[1]
        d = pool.open()
        conn, _ = self.endpoints[1].complete()
        self.assertIs(self.successResultOf(d), conn)
        self.backends.give_back(conn)
        self.assertEqual([p.idle_count() for p in self.pools], [0, 1, 0])


class HealthCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoints = [FakeEndpoint() for _ in range(2)]
        self.pools = [BackendPool(self.clock, (lambda e=e: e), name=f"http://b{i}") for i, e in enumerate(self.endpoints)]
        self.backends = Backends(self.clock, self.pools)
        self.check = HealthCheck(self.backends, self.clock, b"/healthz", interval=5.0, hosts=[b"127.0.0.1:3000"] * 2)
        self.logged = _Logged(self)
        self.check.startService()
        self.addCleanup(self.check.stopService)

    def answer(self, index: int, response: bytes) -> StringTransport:
        conn, wire = self.endpoints[index].complete()
        self.assertEqual(
            wire.value(),
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nUser-Agent: tenantedge-health-check\r\n"
            b"Connection: close\r\n\r\n",
        )
        conn.dataReceived(response)
        return wire

    def test_bad_status_marks_down_good_brings_back(self) -> None:
        self.assertEqual([len(e.attempts) for e in self.endpoints], [1, 1])
        self.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        wire = self.answer(1, b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(wire.disconnecting or getattr(wire, "aborted", False))
        self.assertEqual([p.up for p in self.pools], [True, False])
        self.assertEqual([self.backends.choose() for _ in range(2)], [self.pools[0]] * 2)
        self.clock.advance(5)
        self.answer(0, b"HTTP/1.1 204 No Content\r\n\r\n")
        self.answer(1, b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([p.up for p in self.pools], [True, True])
        self.assertEqual(
            self.logged.formats(),
            ["is down: its health check failed ({error})", "back in rotation: {why}"],
        )

    def test_no_answer_in_time_and_no_connection(self) -> None:
        """Silence until the deadline, or a refused connection: down. No overlapping checks."""
        self.endpoints[1].attempts[0][1].errback(Failure(ConnectionRefusedError()))
        self.assertFalse(self.pools[1].up)
        self.endpoints[0].complete()
        self.clock.advance(4.9)
        self.assertTrue(self.pools[0].up)
        self.clock.advance(0.1)  # the deadline, and the next round
        self.assertFalse(self.pools[0].up)
        self.assertEqual([len(e.attempts) for e in self.endpoints], [2, 2])

    def test_good_answer_ends_an_ejection(self) -> None:
        pool = self.pools[0]
        self.backends.again(pool)
        self.backends.done(pool, False, "refused", refused=True)
        self.assertFalse(pool.up)
        self.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(pool.up)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 5.0)  # only the next round is pending

    def test_stop_abandons_probes(self) -> None:
        self.check.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual([p.up for p in self.pools], [True, True])
