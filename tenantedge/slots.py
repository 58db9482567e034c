"""
A bounded number of slots with a bounded, first-come queue: how the allow
checker caps requests to the SaaS's API and the issuance limits cap ACME
orders at once.

Why not Twisted's C{DeferredSemaphore}: it queues without
bound (a flood of names must be refused at once, not queued), and the
slot is held with C{async with} so that a coroutine closed unfinished
(garbage-collected while it waits on something that will never fire)
does not hand its slot to a waiter the same collection already closed.
Handing it on from there resumed a finished coroutine: Twisted logged
C{RuntimeError: cannot reuse already awaited coroutine} as an unhandled
error at some later, unrelated moment.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from types import TracebackType

import attrs
from twisted.internet.defer import Deferred


class NoSlot(Exception):
    """Every slot is busy and the queue is full."""


@attrs.define
class Slots:
    """
    At most C{size} holders at once; up to C{max_waiting} more wait in
    order of arrival; beyond that, L{NoSlot} at once.

    Hold one with::

        async with slots.held():
            ...

    @ivar running: slots held now.
    """

    size: int
    max_waiting: int
    running: int = attrs.field(default=0, init=False)
    _waiting: deque[Deferred[None]] = attrs.field(factory=deque, init=False)

    @property
    def waiting(self) -> int:
        """Holders queued for a slot."""
        return len(self._waiting)

    def held(self, full: Callable[[str], BaseException] = NoSlot) -> _Held:
        """
        An async context manager holding one slot for its body.

        @param full: makes the exception raised on entry when all slots
            are busy and the queue is full, from a description such as
            C{"4 running and 64 waiting"}.
        """
        return _Held(self, full)

    async def _acquire(self, full: Callable[[str], BaseException]) -> None:
        if self.running < self.size:
            self.running += 1
            return
        if len(self._waiting) >= self.max_waiting:
            raise full(f"{self.running} running and {len(self._waiting)} waiting")
        # Cancelling the wait (the holder's caller gave up) leaves the queue.
        turn: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(turn)
        await turn  # the slot is handed over with `running` unchanged

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().callback(None)  # the slot passes on
        else:
            self.running -= 1


@attrs.frozen
class _Held:
    slots: Slots
    full: Callable[[str], BaseException]

    async def __aenter__(self) -> None:
        await self.slots._acquire(self.full)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is GeneratorExit:
            # Closed unfinished: the coroutine and everything that could
            # wait for this slot are garbage together (see the module doc).
            return
        self.slots._release()
