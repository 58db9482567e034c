"""
One deadline for a whole asynchronous operation.

C{Deferred.addTimeout} turns a plain cancellation into C{TimeoutError}, but
many Deferreds (twisted.web's Agent, treq) fail their own way when
cancelled (C{ResponseNeverReceived}, C{ResponseFailed}...). Callers that
must tell "too slow" from "failed" (504 from 502, "CA did not answer" from
"CA unreachable") use L{with_deadline}, which always reports a passed
deadline as C{twisted.internet.defer.TimeoutError}.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

__all__ = ["with_deadline", "describe_error", "is_cancellation", "TimeoutError"]

T = TypeVar("T")


def with_deadline(d: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[T]:
    """
    Cancel C{d} if it has not fired after C{seconds}, and fail it with
    C{TimeoutError} whatever the cancelled operation failed with.
    """

    def timed_out(result: Any, timeout: float) -> Failure:
        return Failure(TimeoutError(f"no result within {timeout:g}s"))

    return d.addTimeout(seconds, clock, onTimeoutCancel=timed_out)


def describe_error(error: BaseException) -> str:
    """
    A one-line description of a network error for logs: twisted.web's
    C{ResponseFailed}/C{ResponseNeverReceived} wrap their causes in
    C{reasons}, which C{str()} would show as a list of Failure reprs.
    """
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(error) or error.__class__.__name__


def is_cancellation(error: BaseException) -> bool:
    """
    Was this failure a cancellation from above (the pipeline stopping an
    order), however the cancelled operation reported it? Layers that turn
    errors into their own (a CA unreachable, a pre-check that could not be
    made) must let a cancellation through instead, or the work they were
    part of would go on (the next CA, the order after the pre-check).
    """
    if isinstance(error, CancelledError):
        return True
    reasons = getattr(error, "reasons", None) or ()
    return any(getattr(r, "check", lambda *_: None)(CancelledError) for r in reasons)
