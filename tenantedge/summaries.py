"""
Log lines that cannot flood: one line per interval summing up what some
counters counted since the last one, by reason.

Refusals and limits can be set off by anyone on the internet at any rate
(random names, idle sockets, garbled PROXY headers); a line for each would
let them fill the disk and bury everything else. The counters are bumped
on the hot path anyway (for metrics); a L{CounterSummary} run every minute
by L{tenantedge.resolver.periodic} on the injected reactor reads their
difference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import attrs
from twisted.logger import Logger

__all__ = ["CounterSummary", "LimitSummary", "LIMIT_HANDSHAKE_OUTCOMES"]


@attrs.define
class CounterSummary:
    """
    One info line per interval with the counts since the last call, by
    reason, if anything was counted (a quiet interval logs nothing). The
    first call only takes the baseline.

    Subclasses say what is counted (L{counts}) and how the line reads
    (C{message}, with C{{count}}, C{{interval}} and C{{reasons}}), and its
    C{event} field.
    """

    interval: float = attrs.field(default=60.0, kw_only=True)
    _last: Counter[str] | None = attrs.field(default=None, init=False)
    _log = Logger()
    message = "counted {count} event(s) in the last {interval:g}s: {reasons}"
    event = "summary"

    def counts(self) -> Counter[str]:
        """The counts so far, by reason."""
        raise NotImplementedError

    def summarise(self) -> None:
        """Log what was counted since the last call, if anything."""
        now = self.counts()
        last, self._last = self._last, now
        if last is None:
            return
        delta = now - last
        if delta:
            self._log.info(
                self.message,
                event=self.event,
                count=sum(delta.values()),
                interval=self.interval,
                reasons=", ".join(f"{reason} {n}" for reason, n in delta.most_common()),
            )


#: The handshake outcomes that are limits (connection caps, deadlines,
#: oversize hellos), summed up with the relay's and the PROXY header's.
LIMIT_HANDSHAKE_OUTCOMES = frozenset(
    {"refused-connections-full", "refused-address-full", "hello-timeout", "handshake-timeout", "oversize"}
)


@attrs.define
class LimitSummary(CounterSummary):
    """
    Connections and requests a limit refused or closed: the HTTP/1.1
    relay's deadlines and size limits and the PROXY header's errors
    (C{limits}), and the connection caps and handshake deadlines among the
    handshake outcomes (C{handshakes}).
    """

    limits: Mapping[str, int]
    handshakes: Mapping[str, int] = attrs.field(factory=Counter)
    outcomes: Iterable[str] = LIMIT_HANDSHAKE_OUTCOMES
    message = "limits refused or closed {count} connection(s) or request(s) in the last {interval:g}s: {reasons}"
    event = "limits-summary"

    def counts(self) -> Counter[str]:
        counts = Counter(self.limits)
        for outcome in self.outcomes:
            seen = self.handshakes.get(outcome, 0)
            if seen:
                counts[outcome] = seen
        return counts
