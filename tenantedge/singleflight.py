"""
Single-flight: many callers asking for the same key share one piece of work.

Fifty browsers opening their first connection to a new tenant at once must
cause one store read, one policy check and one certificate order, not fifty.
Each caller gets its own Deferred, so one impatient caller can cancel (or
time out) without cancelling the shared work the others still wait for.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _Call(Generic[T]):
    __slots__ = ("waiters", "result", "done")

    def __init__(self) -> None:
        self.waiters: list[Deferred[T]] = []
        self.result: T | Failure | None = None
        self.done = False

    def wait(self) -> Deferred[T]:
        if self.done:
            if isinstance(self.result, Failure):
                return fail(self.result)
            return succeed(self.result)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred(self.waiters.remove)
        self.waiters.append(waiter)
        return waiter


class SingleFlight(Generic[T]):
    """
    De-duplicate concurrent calls by key.

    While a call for a key is running, further L{run} calls for that key
    wait for its result instead of starting another. Once it finishes, the
    next L{run} starts afresh: results are not cached here.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, _Call[T]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    def run(self, key: Hashable, work: Callable[[], Deferred[T] | T]) -> Deferred[T]:
        """
        Run C{work()} for C{key} unless a run for C{key} is already under
        way, and return a new Deferred for its result.
        """
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = _Call()
            maybeDeferred(work).addBoth(self._finish, key, call)
        return call.wait()

    def _finish(self, result: Any, key: Hashable, call: _Call[T]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        call.result = result
        call.done = True
        waiters, call.waiters = call.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
