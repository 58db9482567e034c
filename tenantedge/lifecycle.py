"""
Each hostname's lifecycle, as the hostname API (C{/v1/hostnames}) shows it
and the metrics count it::

    pending ---issued---> active ---renewal starts---> renewing
       |                    ^                              |
       |                    +-----------renewed------------+
       +--failed--> failing <----------failed--------------+
                      |  ^ (attempts, last CA problem, next retry)
     failing for      |  |  an API call (PUT, renew) or a changed
     --retire-after   v  |  allow answer revives it
                    retired
    DELETE, or a renewal the allow check denies: archived

C{pending}: the policy allowed the name (a first handshake, or C{PUT}) and
it has no certificate yet. C{active}: a certificate is stored (its
not-after, issuer and next renewal are read from the store when asked).
C{renewing}: a renewal is under way. C{failing}: the last attempt failed;
the record says how many attempts failed in a row, the CA's last problem
type and detail, and when the backoff lets the next one through.
C{retired}: the name kept failing for C{--retire-after}; renewal and
handshakes no longer order for it (a certificate still valid keeps
serving until it expires). C{archived}: the certificate was moved to the
store's archive (keys are never deleted).

The records persist through the same seam as the failure backoff
(L{tenantedge.interfaces.ISharedState}): C{<store>/lifecycle.json} for a
directory store (shared by the workers of one box), a Redis hash for a
fleet. Only names the policy allowed, or that have a certificate, get a
record: a flood of random names the allow check denies costs nothing here.

Observers (L{HostnameLifecycle.subscribe}) are told of transitions with
one dict per event; see L{HostnameLifecycle.subscribe} for its shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .interfaces import IssuanceFailed, ISharedState
from .shared import KEEP, StateFile

__all__ = [
    "HostnameLifecycle",
    "HostnameRecord",
    "Retired",
    "STATES",
    "PENDING",
    "ACTIVE",
    "RENEWING",
    "FAILING",
    "RETIRED",
    "ARCHIVED",
    "Event",
]

PENDING = "pending"
ACTIVE = "active"
RENEWING = "renewing"
FAILING = "failing"
RETIRED = "retired"
ARCHIVED = "archived"

#: Every state, in lifecycle order (the API's C{state} filter takes these).
STATES: tuple[str, ...] = (PENDING, ACTIVE, RENEWING, FAILING, RETIRED, ARCHIVED)

#: What an observer receives; see L{HostnameLifecycle.subscribe}.
Event = dict[str, Any]

#: Archived records are forgotten this long after archiving (the store's
#: archive keeps the keys; the API stops listing the name).
_FORGET_ARCHIVED_AFTER = 30 * 86400.0


class Retired(IssuanceFailed):
    """
    The name kept failing for C{--retire-after}: no order is placed for it
    until an API call or a changed allow answer revives it.

    @ivar since: when it was retired (POSIX time).
    """

    def __init__(self, host: str, since: float) -> None:
        super().__init__(host, "retired after failing repeatedly; revive it with the hostname API")
        self.since = since


@attrs.frozen
class HostnameRecord:
    """
    One name's lifecycle, as persisted.

    @ivar host: the normalised name.
    @ivar state: one of L{STATES}.
    @ivar since: when it entered C{state} (POSIX time).
    @ivar attempts: failed attempts in a row (0 unless failing or retired).
    @ivar failing_since: when the current run of failures began.
    @ivar problem_type: the CA's last problem type (an RFC 8555 URN), if any.
    @ivar problem_detail: what the last failure said.
    @ivar next_retry: when the failure backoff lets the next order through.
    @ivar decision: the last allow decision (C{allow}, C{deny}, C{unknown}).
    @ivar decided_at: when that decision was made.
    @ivar expiring_warned: the not-after an C{expiring-soon} event was
        last sent for (one event per certificate).
    """

    host: str
    state: str
    since: float
    attempts: int = 0
    failing_since: float | None = None
    problem_type: str | None = None
    problem_detail: str | None = None
    next_retry: float | None = None
    decision: str | None = None
    decided_at: float | None = None
    expiring_warned: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The persisted form (without C{host}, the key)."""
        data = attrs.asdict(self)
        del data["host"]
        return {k: v for k, v in data.items() if v is not None and (k != "attempts" or v)}

    @classmethod
    def from_json(cls, host: str, data: dict[str, Any]) -> HostnameRecord:
        """
        Read a persisted record.

        @raise ValueError: for one that does not make sense.
        """
        if not isinstance(data, dict) or data.get("state") not in STATES:
            raise ValueError(f"bad lifecycle record for {host}")
        fields = {f.name for f in attrs.fields(cls)} - {"host"}
        values = {k: v for k, v in data.items() if k in fields}
        for key in ("since", "failing_since", "next_retry", "decided_at"):
            value = values.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"bad {key} in the lifecycle record for {host}")
        if not isinstance(values.get("attempts", 0), int):
            raise ValueError(f"bad attempts in the lifecycle record for {host}")
        return cls(host=host, **values)


@attrs.define
class HostnameLifecycle:
    """
    The lifecycle records of every name; see the module docstring.

    Fed by the issuance pipeline (L{renewing}, L{issued}, L{failed}), the
    renewal walk (L{adopt}, L{expiring}, L{archived}), the policy
    (L{decided}) and the API (L{revive}, L{archived}).

    @ivar path: the JSON file, or C{None} to keep state in memory only.
    @ivar clock: the time source.
    @ivar retire_after: seconds of consecutive failure before a name is
        retired; C{0} never retires.
    @ivar shared: where the state lives instead of C{path} (a fleet's Redis).
    @ivar next_retry: asked after a failure when the next order may be
        placed (the failure backoff's C{blocked_until}).
    """

    path: str | None
    clock: IReactorTime
    retire_after: float = 3 * 86400.0
    shared: ISharedState | None = None
    next_retry: Callable[[str], float | None] | None = None
    _records: dict[str, HostnameRecord] = attrs.field(factory=dict, init=False)
    _observers: list[Callable[[Event], Any]] = attrs.field(factory=list, init=False)
    _file: ISharedState = attrs.field(init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._file = self.shared if self.shared is not None else StateFile(self.path)

    # -- observers ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], Any]) -> Callable[[], None]:
        """
        Call C{callback(event)} after each transition this process makes
        (a webhook outbox's C{emit}, say). The event is a new dict each
        time::

            {"event": "issued" | "renewed" | "failed" | "retired"
                      | "archived" | "expiring-soon",
             "host": "shop.example.com",      # the normalised name
             "at": 1767225600.0,              # POSIX time of the transition
             "state": "active",               # the state it is now in
             # issued, renewed, expiring-soon:
             "not_after": 1775001600.0,
             # failed, retired:
             "attempts": 3, "problem_type": "urn:ietf:params:acme:error:dns"
                 or None, "detail": "...", "next_retry": 1767229200.0 or None}

        An observer that raises is logged and does not stop the others or
        the transition. Events are not replayed: a process sees its own
        transitions only (with C{--workers}, each worker emits what it did).

        @return: a callable that unsubscribes.
        """
        self._observers.append(callback)
        return lambda: self._observers.remove(callback) if callback in self._observers else None

    def _emit(self, kind: str, record: HostnameRecord, **extra: Any) -> None:
        event: Event = {"event": kind, "host": record.host, "at": self.clock.seconds(), "state": record.state,
                        **extra}
        for observer in list(self._observers):
            try:
                observer(dict(event))
            except Exception:
                self._log.failure("a lifecycle observer failed on {event} for {host}", event=kind, host=record.host)

    def _failure_fields(self, record: HostnameRecord) -> dict[str, Any]:
        return {"attempts": record.attempts, "problem_type": record.problem_type, "detail": record.problem_detail,
                "next_retry": record.next_retry}

    # -- persistence ------------------------------------------------------------------------

    def load(self) -> None:
        """Read persisted state; a corrupt file is logged and ignored."""
        try:
            self._parse(self._file.read())
        except (OSError, ValueError) as e:
            self._log.error("ignoring unreadable lifecycle state {file}: {error}", file=self._file.path, error=str(e))
            self._records = {}

    def _parse(self, data: Any) -> None:
        if not isinstance(data, dict):
            self._log.error("ignoring unreadable lifecycle state {file}", file=self._file.path)
            self._records = {}
            return
        records: dict[str, HostnameRecord] = {}
        for host, entry in data.items():
            # Each record on its own: one a newer node wrote (or a hand
            # edit) must not wipe every other name's on the next write.
            try:
                records[str(host)] = HostnameRecord.from_json(str(host), entry)
            except (ValueError, TypeError, AttributeError) as e:
                self._log.error("skipping an unreadable lifecycle record for {host} in {file}: {error}",
                                host=str(host)[:200], file=self._file.path, error=str(e))
        self._records = records

    def _fresh(self) -> None:
        if self._file.changed():
            self.load()

    def _apply(self, mutate: Callable[[], object]) -> None:
        """Change the records on top of the latest persisted ones, under the file's lock."""

        def change(data: Any) -> Any:
            if data is not KEEP and (self.path is not None or self.shared is not None):
                self._parse(data)
            mutate()
            now = self.clock.seconds()
            self._records = {
                h: r for h, r in self._records.items()
                if not (r.state == ARCHIVED and r.since < now - _FORGET_ARCHIVED_AFTER)
            }
            return {h: r.to_json() for h, r in sorted(self._records.items())}

        self._file.update(change)

    def _set(self, host: str, **changes: Any) -> HostnameRecord:
        """Within L{_apply}: change (or create, as pending) one record."""
        now = self.clock.seconds()
        old = self._records.get(host) or HostnameRecord(host, PENDING, now)
        if "state" in changes and changes["state"] != old.state:
            changes.setdefault("since", now)
        new = attrs.evolve(old, **changes)
        self._records[host] = new
        return new

    # -- reading ------------------------------------------------------------------------------

    def get(self, host: str) -> HostnameRecord | None:
        """The name's record, or C{None} if it has none."""
        self._fresh()
        return self._records.get(host)

    def records(self) -> list[HostnameRecord]:
        """Every record, sorted by name."""
        self._fresh()
        return [self._records[h] for h in sorted(self._records)]

    def counts(self) -> Counter[str]:
        """Records by state (every state present, for metrics)."""
        self._fresh()
        counts: Counter[str] = Counter({state: 0 for state in STATES})
        counts.update(r.state for r in self._records.values())
        return counts

    def is_retired(self, host: str) -> bool:
        """May no order be placed for this name (until it is revived)?"""
        record = self.get(host)
        return record is not None and record.state == RETIRED

    # -- transitions ------------------------------------------------------------------------

    def decided(self, host: str, decision: str) -> None:
        """
        The allow check (or the static policy) answered for a name. Only a
        name that has a record, or that was allowed, is recorded. A retired
        name whose answer changed is revived.
        """
        self._fresh()
        old = self._records.get(host)
        if old is None and decision != "allow":
            return
        now = self.clock.seconds()
        if old is not None and old.decision == decision and old.decided_at is not None and now - old.decided_at < 60:
            return  # the same answer again within a minute: not worth a write

        def change() -> None:
            current = self._records.get(host)
            if current is not None and current.state == RETIRED and decision == "allow" and current.decision != "allow":
                # Only a new "allow" revives: an allow endpoint that fails
                # (unknown) or denies must not set orders going again.
                self._revived(host)
            elif current is not None and current.state == ARCHIVED and decision == "allow":
                self._set(host, state=PENDING)
            self._set(host, decision=decision, decided_at=now)

        self._apply(change)

    def _revived(self, host: str) -> HostnameRecord:
        return self._set(host, state=PENDING, attempts=0, failing_since=None, next_retry=None)

    def revive(self, host: str) -> None:
        """An API call asks for the name: a retired name may be ordered for again."""
        if self.is_retired(host):
            self._apply(lambda: self._revived(host))
            self._log.info("{host} revived by the hostname API", host=host)

    def pending(self, host: str) -> None:
        """The name was allowed and has no certificate yet (C{PUT}, a first handshake)."""
        self._fresh()
        current = self._records.get(host)
        if current is None or current.state == ARCHIVED:
            self._apply(lambda: self._set(host, state=PENDING))

    def renewing(self, host: str) -> None:
        """A renewal of the name's certificate began."""
        self._apply(lambda: self._set(host, state=RENEWING))

    def settle(self, host: str) -> None:
        """A renewal placed no order (backoff, a limit): back to active, or failing."""
        record = self.get(host)
        if record is not None and record.state == RENEWING:
            self._apply(lambda: self._set(host, state=FAILING if record.attempts else ACTIVE))

    def issued(self, host: str, not_after: float, renewal: bool) -> None:
        """A certificate was obtained (and stored) for the name."""
        box: list[HostnameRecord] = []
        self._apply(lambda: box.append(self._set(
            host, state=ACTIVE, attempts=0, failing_since=None, problem_type=None, problem_detail=None,
            next_retry=None,
        )))
        self._emit("renewed" if renewal else "issued", box[0], not_after=not_after)

    def failed(self, host: str, error: BaseException) -> None:
        """
        An order for the name failed at the CA (or the local issuer); past
        C{retire_after} of consecutive failures, the name is retired.
        """
        now = self.clock.seconds()
        retry = self.next_retry(host) if self.next_retry is not None else None
        box: list[HostnameRecord] = []

        def change() -> None:
            old = self._records.get(host)
            since = old.failing_since if old is not None and old.failing_since is not None else now
            attempts = (old.attempts if old is not None else 0) + 1
            state = FAILING
            if self.retire_after > 0 and now - since >= self.retire_after:
                state = RETIRED
            box.append(self._set(
                host, state=state, attempts=attempts, failing_since=since,
                problem_type=getattr(error, "problem_type", None),
                problem_detail=getattr(error, "detail", None) or str(error) or type(error).__name__,
                next_retry=None if state == RETIRED else retry,
            ))

        self._apply(change)
        record = box[0]
        self._emit("failed", record, **self._failure_fields(record))
        if record.state == RETIRED and record.since == now:
            self._log.warn(
                "retiring {host}: it kept failing for {days:.1f} days ({attempts} attempts); no more orders "
                "until the hostname API or a changed allow answer revives it",
                event="retired", host=host, days=(now - (record.failing_since or now)) / 86400.0,
                attempts=record.attempts,
            )
            self._emit("retired", record, **self._failure_fields(record))

    def archived(self, host: str) -> None:
        """The name's certificate moved to the archive (C{DELETE}, or a renewal the allow check denied)."""
        box: list[HostnameRecord] = []
        self._apply(lambda: box.append(self._set(host, state=ARCHIVED, attempts=0, failing_since=None,
                                                 next_retry=None)))
        self._emit("archived", box[0])

    def adopt(self, hosts: Iterable[str]) -> None:
        """
        Stored names without a record (certificates from before this
        version, or stored by the CLI) become C{active}, in one write.
        """
        self._fresh()
        missing = [h for h in hosts if h not in self._records]
        if missing:
            def change() -> None:
                for host in missing:
                    if host not in self._records:
                        self._set(host, state=ACTIVE)

            self._apply(change)

    def expiring(self, host: str, not_after: float) -> None:
        """
        The renewal walk found the name's certificate close to expiry and
        not yet renewed: one C{expiring-soon} event per certificate.
        """
        record = self.get(host)
        if record is not None and record.expiring_warned == not_after:
            return
        box: list[HostnameRecord] = []
        self._apply(lambda: box.append(self._set(host, expiring_warned=not_after)))
        self._emit("expiring-soon", box[0], not_after=not_after)
