"""
Tests for L{tenantedge.slots}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.slots import NoSlot, Slots


class SlotsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.slots = Slots(size=2, max_waiting=1)
        self.order: list[str] = []

    def hold(self, label: str, until: Deferred[None]) -> Deferred[None]:
        async def holder() -> None:
            async with self.slots.held():
                self.order.append(label)
                await until

        return Deferred.fromCoroutine(holder())

    def test_bounded_then_first_come(self) -> None:
        """
        Up to C{size} hold at once, C{max_waiting} more queue, the next is
        refused at once; a released slot goes to the first in the queue.
        """
        gates = [Deferred[None]() for _ in range(4)]
        held = [self.hold(str(i), gate) for i, gate in enumerate(gates)]
        self.assertEqual(self.order, ["0", "1"])
        self.assertEqual((self.slots.running, self.slots.waiting), (2, 1))
        self.failureResultOf(held[3], NoSlot)
        gates[1].callback(None)
        self.successResultOf(held[1])
        self.assertEqual(self.order, ["0", "1", "2"])
        self.assertEqual((self.slots.running, self.slots.waiting), (2, 0))
        gates[0].callback(None)
        gates[2].callback(None)
        self.assertEqual(self.slots.running, 0)

    def test_refusal_is_the_callers_exception(self) -> None:
        """C{held(full)} raises what C{full} makes of the description."""
        for _ in range(3):
            self.hold("x", Deferred())

        async def refused() -> None:
            async with self.slots.held(lambda why: ValueError(why)):
                pass

        f = self.failureResultOf(Deferred.fromCoroutine(refused()), ValueError)
        self.assertEqual(str(f.value), "2 running and 1 waiting")

    def test_failure_releases(self) -> None:
        """A body that fails gives its slot back."""
        gate: Deferred[None] = Deferred()
        d = self.hold("x", gate)
        gate.errback(RuntimeError("boom"))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.slots.running, 0)

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        for _ in range(2):
            self.hold("x", Deferred())
        waiting = self.hold("w", Deferred())
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.slots.waiting, 0)

    def test_closed_unfinished(self) -> None:
        """
        Coroutines closed unfinished (what the garbage collector does to
        ones waiting on something that can never fire) do not hand their
        slot to a waiter that was closed first: resuming a finished
        coroutine made Twisted log C{cannot reuse already awaited
        coroutine} as an unhandled error at a later, unrelated moment.
        """
        never: Deferred[None] = Deferred()

        async def holder() -> None:
            async with self.slots.held():
                await never

        coroutines = [holder() for _ in range(3)]
        waiting = [Deferred.fromCoroutine(c) for c in coroutines]
        self.assertEqual(self.slots.waiting, 1)
        coroutines[2].close()  # the waiter first, as a collection may
        coroutines[0].close()
        coroutines[1].close()
        for d in waiting:
            self.assertNoResult(d)
