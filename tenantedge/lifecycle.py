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

The records persist one by one (L{tenantedge.interfaces.ISharedRecords}):
C{<store>/lifecycle.json} and its journal for a directory store (shared by
the workers of one box, L{tenantedge.journal}), a Redis hash for a fleet.
A transition writes its one record, never the whole state, so the first
handshakes of a thousand new names cost no more than those of one. Only names the policy allowed, or that have a certificate, get a
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

from .interfaces import IssuanceFailed, ISharedRecords
from .journal import RecordJournal

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
    (L{decided}) and the API (L{revive}, L{archived}). Each transition is
    a change of one record, made on the latest shared copy of it (another
    worker's or node's change to the same name is never overwritten).

    @ivar path: the JSON file, or C{None} to keep state in memory only.
    @ivar clock: the time source.
    @ivar retire_after: seconds of consecutive failure before a name is
        retired; C{0} never retires.
    @ivar shared: where the records live instead of C{path} (a fleet's Redis).
    @ivar next_retry: asked after a failure when the next order may be
        placed (the failure backoff's C{blocked_until}).
    """

    path: str | None
    clock: IReactorTime
    retire_after: float = 3 * 86400.0
    shared: ISharedRecords | None = None
    next_retry: Callable[[str], float | None] | None = None
    _observers: list[Callable[[Event], Any]] = attrs.field(factory=list, init=False)
    _store: ISharedRecords = attrs.field(init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._store = self.shared if self.shared is not None else RecordJournal(self.path)

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
        """Read persisted state; an unreadable file is logged and ignored."""
        try:
            self._store.load()
        except (OSError, ValueError) as e:
            self._log.error("ignoring unreadable lifecycle state {file}: {error}", file=self._store.path, error=str(e))

    def _parse(self, host: str, data: Any) -> HostnameRecord | None:
        if data is None:
            return None
        # Each record on its own: one a newer node wrote (or a hand edit)
        # is skipped, and every other name's still counts.
        try:
            return HostnameRecord.from_json(host, data)
        except (ValueError, TypeError, AttributeError) as e:
            self._log.error("skipping an unreadable lifecycle record for {host} in {file}: {error}",
                            host=host[:200], file=self._store.path, error=str(e))
            return None

    def _change(
        self,
        host: str,
        change: Callable[[HostnameRecord | None], HostnameRecord | None],
        then: Callable[[HostnameRecord], object] | None = None,
    ) -> None:
        """
        Change one record on top of its latest shared version; C{change}
        derives everything from the record it is given (it may be called
        again on a newer one: a fleet node's compare-and-set) and returns
        the new record, or the one it was given to leave it as it is.
        C{then} is called with the record as finally stored, so that what
        an event says is what was stored.
        """

        def update(data: Any) -> Any:
            old = self._parse(host, data)
            new = change(old)
            return data if new is old else (new.to_json() if new is not None else None)

        def stored(data: Any) -> None:
            record = self._parse(host, data)
            if then is not None and record is not None:
                then(record)

        self._store.update(host, update, stored if then is not None else None)

    def _evolve(self, old: HostnameRecord | None, host: str, now: float | None = None,
                **changes: Any) -> HostnameRecord:
        """A changed (or new, pending) record; C{since} moves when the state does."""
        now = self.clock.seconds() if now is None else now
        old = old or HostnameRecord(host, PENDING, now)
        if "state" in changes and changes["state"] != old.state:
            changes.setdefault("since", now)
        return attrs.evolve(old, **changes)

    # -- reading ------------------------------------------------------------------------------

    def get(self, host: str) -> HostnameRecord | None:
        """The name's record, or C{None} if it has none."""
        return self._parse(host, self._store.get(host))

    def records(self) -> list[HostnameRecord]:
        """Every record, sorted by name."""
        parsed = (self._parse(host, data) for host, data in sorted(self._store.items()))
        return [record for record in parsed if record is not None]

    def counts(self) -> Counter[str]:
        """Records by state (every state present, for metrics); reads only each record's state."""
        counts: Counter[str] = Counter({state: 0 for state in STATES})
        counts.update(state for _, data in self._store.items()
                      if isinstance(data, dict) and (state := data.get("state")) in STATES)
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
        old = self.get(host)
        if old is None and decision != "allow":
            return
        now = self.clock.seconds()
        if old is not None and old.decision == decision and old.decided_at is not None and now - old.decided_at < 60:
            return  # the same answer again within a minute: not worth a write

        def change(current: HostnameRecord | None) -> HostnameRecord | None:
            if current is None and decision != "allow":
                return None
            if current is not None and current.state == RETIRED and decision == "allow" and current.decision != "allow":
                # Only a new "allow" revives: an allow endpoint that fails
                # (unknown) or denies must not set orders going again.
                current = self._revived(current, host)
            elif current is not None and current.state == ARCHIVED and decision == "allow":
                current = self._evolve(current, host, state=PENDING)
            return self._evolve(current, host, decision=decision, decided_at=now)

        self._change(host, change)

    def _revived(self, current: HostnameRecord | None, host: str) -> HostnameRecord:
        return self._evolve(current, host, state=PENDING, attempts=0, failing_since=None, next_retry=None)

    def revive(self, host: str) -> None:
        """An API call asks for the name: a retired name may be ordered for again."""
        if self.is_retired(host):
            self._change(host, lambda r: self._revived(r, host) if r is not None and r.state == RETIRED else r)
            self._log.info("{host} revived by the hostname API", host=host)

    def pending(self, host: str) -> None:
        """The name was allowed and has no certificate yet (C{PUT}, a first handshake)."""
        current = self.get(host)
        if current is None or current.state == ARCHIVED:
            self._change(host, lambda r: self._evolve(r, host, state=PENDING) if r is None or r.state == ARCHIVED
                         else r)

    def renewing(self, host: str) -> None:
        """A renewal of the name's certificate began."""
        self._change(host, lambda r: self._evolve(r, host, state=RENEWING))

    def settle(self, host: str) -> None:
        """A renewal placed no order (backoff, a limit): back to active, or failing."""
        if self.get(host) is not None:
            self._change(host, lambda r: self._evolve(r, host, state=FAILING if r.attempts else ACTIVE)
                         if r is not None and r.state == RENEWING else r)

    def issued(self, host: str, not_after: float, renewal: bool) -> None:
        """A certificate was obtained (and stored) for the name."""
        self._change(host, lambda r: self._evolve(
            r, host, state=ACTIVE, attempts=0, failing_since=None, problem_type=None, problem_detail=None,
            next_retry=None,
        ), lambda record: self._emit("renewed" if renewal else "issued", record, not_after=not_after))

    def failed(self, host: str, error: BaseException) -> None:
        """
        An order for the name failed at the CA (or the local issuer); past
        C{retire_after} of consecutive failures, the name is retired.
        """
        now = self.clock.seconds()
        retry = self.next_retry(host) if self.next_retry is not None else None

        def change(old: HostnameRecord | None) -> HostnameRecord:
            since = old.failing_since if old is not None and old.failing_since is not None else now
            attempts = (old.attempts if old is not None else 0) + 1
            state = FAILING
            if self.retire_after > 0 and now - since >= self.retire_after:
                state = RETIRED
            return self._evolve(
                old, host, now, state=state, attempts=attempts, failing_since=since,
                problem_type=getattr(error, "problem_type", None),
                problem_detail=getattr(error, "detail", None) or str(error) or type(error).__name__,
                next_retry=None if state == RETIRED else retry,
            )

        def stored(record: HostnameRecord) -> None:
            self._emit("failed", record, **self._failure_fields(record))
            if record.state == RETIRED and record.since == now:
                self._log.warn(
                    "retiring {host}: it kept failing for {days:.1f} days ({attempts} attempts); no more orders "
                    "until the hostname API or a changed allow answer revives it",
                    event="retired", host=host, days=(now - (record.failing_since or now)) / 86400.0,
                    attempts=record.attempts,
                )
                self._emit("retired", record, **self._failure_fields(record))

        self._change(host, change, stored)

    def archived(self, host: str) -> None:
        """The name's certificate moved to the archive (C{DELETE}, or a renewal the allow check denied)."""
        self._change(host, lambda r: self._evolve(r, host, state=ARCHIVED, attempts=0, failing_since=None,
                                                  next_retry=None),
                     lambda record: self._emit("archived", record))

    def adopt(self, hosts: Iterable[str]) -> None:
        """
        Stored names without a record (certificates from before this
        version, or stored by the CLI) become C{active}; archived records
        older than 30 days are forgotten (the archive keeps the keys; the
        API stops listing the name). The renewal walk calls this.
        """
        known = dict(self._store.items())

        def adopted(host: str) -> Callable[[HostnameRecord | None], HostnameRecord | None]:
            return lambda r: self._evolve(r, host, state=ACTIVE) if r is None else r

        for host in hosts:
            if host not in known:
                self._change(host, adopted(host))
        cutoff = self.clock.seconds() - _FORGET_ARCHIVED_AFTER

        def expired(record: HostnameRecord | None) -> bool:
            return record is not None and record.state == ARCHIVED and record.since < cutoff

        for host, data in known.items():
            if isinstance(data, dict) and data.get("state") == ARCHIVED and expired(self._parse(host, data)):
                self._change(host, lambda r: None if expired(r) else r)

    def expiring(self, host: str, not_after: float) -> None:
        """
        The renewal walk found the name's certificate close to expiry and
        not yet renewed: one C{expiring-soon} event per certificate.
        """
        record = self.get(host)
        if record is not None and record.expiring_warned == not_after:
            return
        self._change(host, lambda r: self._evolve(r, host, expiring_warned=not_after),
                     lambda record: self._emit("expiring-soon", record, not_after=not_after))
