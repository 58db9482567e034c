"""
Per-name backoff after failed issuance, persisted in the store.

A name that cannot be validated (DNS not pointed at us yet, a typo'd CNAME)
must not cost a CA order at every handshake: Let's Encrypt allows 5 failed
validations per name per hour, and lua-resty-auto-ssl users burn through
that. After each consecutive failure the next attempt waits longer, along
the ladder Let's Encrypt's integration guide asks for (about 1 minute,
10 minutes, 100 minutes, then daily), or longer if the CA said so with
C{Retry-After}. The state lives in C{<store>/backoff.json}, so a restart
does not reset it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .interfaces import ISharedState
from .shared import KEEP, StateFile

__all__ = ["FailureBackoff", "LADDER"]

#: Seconds to wait after the 1st, 2nd, 3rd, 4th and later consecutive failures.
LADDER: tuple[float, ...] = (60.0, 600.0, 6000.0, 86400.0)

#: Entries whose wait ended this long ago are forgotten (the count restarts).
_FORGET_AFTER = 2 * 86400.0


@attrs.define
class FailureBackoff:
    """
    @ivar path: the JSON file, or C{None} to keep state in memory only.
    @ivar clock: the time source.
    @ivar ladder: waits after consecutive failures.
    @ivar shared: where the state lives instead of C{path} (a fleet's
        Redis); C{path} then only labels it.
    """

    path: str | None
    clock: IReactorTime
    ladder: Sequence[float] = LADDER
    shared: ISharedState | None = None
    _state: dict[str, tuple[int, float]] = attrs.field(factory=dict, init=False)
    _file: ISharedState = attrs.field(init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._file = self.shared if self.shared is not None else StateFile(self.path)

    def load(self) -> None:
        """Read persisted state; a corrupt file is logged and ignored."""
        try:
            self._parse(self._file.read())
        except (OSError, ValueError) as e:
            self._log.error("ignoring unreadable backoff state {file}: {error}", file=self.path, error=str(e))
            self._state = {}

    def _parse(self, data: Any) -> None:
        try:
            self._state = {
                str(name): (int(entry["failures"]), float(entry["until"])) for name, entry in (data or {}).items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._log.error("ignoring unreadable backoff state {file}: {error}", file=self.path, error=str(e))
            self._state = {}

    def _fresh(self) -> None:
        # Another worker (or server on the store) may have recorded a failure.
        if self._file.changed():
            self.load()

    def blocked_until(self, server_name: str) -> float | None:
        """The time before which no new order may be placed, or None."""
        self._fresh()
        entry = self._state.get(server_name)
        if entry is None or entry[1] <= self.clock.seconds():
            return None
        return entry[1]

    def failures(self, server_name: str) -> int:
        entry = self._state.get(server_name)
        return entry[0] if entry is not None else 0

    def record_failure(self, server_name: str, retry_after: float | None = None) -> float:
        """
        Count a failure and return until when the name is blocked.
        """

        def change() -> None:
            failures = self.failures(server_name) + 1
            wait = self.ladder[min(failures, len(self.ladder)) - 1]
            if retry_after is not None:
                wait = max(wait, retry_after)
            self._state[server_name] = (failures, self.clock.seconds() + wait)

        self._apply(change)
        return self._state[server_name][1]

    def record_success(self, server_name: str) -> None:
        self._fresh()
        if server_name in self._state:
            self._apply(lambda: self._forget(server_name))

    def _forget(self, server_name: str) -> None:
        self._state.pop(server_name, None)

    def _apply(self, mutate: Callable[[], None]) -> None:
        """Change the state on top of the latest persisted one, under the file's lock."""

        def change(data: Any) -> Any:
            if self.path is not None and data is not KEEP:
                self._parse(data)
            mutate()
            now = self.clock.seconds()
            self._state = {n: e for n, e in self._state.items() if e[1] > now - _FORGET_AFTER}
            return {n: {"failures": f, "until": u} for n, (f, u) in sorted(self._state.items())}

        self._file.update(change)
