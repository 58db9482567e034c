"""
The one way a certificate is obtained, whoever asks: a first handshake
(L{tenantedge.resolver}), the renewal walk (L{tenantedge.renewal}) or the
admin API::

    one run per name (single-flight) -> the name's lock (INameLock)
      -> re-read the store: someone holding the lock before us (another
         worker, a fleet peer, the CLI) may have stored what we want
      -> the issuer chain: backoff, the name's pre-checks (DNS, reach),
         then per CA in fallback order its CAA pre-check, limits, the CA
         (see L{tenantedge.precheck}; a failed pre-check places no order)
      -> store -> the caller caches it

The lock is an L{INameLock}: L{MemoryNameLock} within one process, or
the one a shared store brings.

Every outcome is counted here by purpose (C{issue}, C{renew}) and timed,
so first issuance and renewals feed the same metrics and log events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .certificates import CertificateBundle
from .interfaces import (
    BackedOff,
    HeldLock,
    ICertificateStore,
    IIssuer,
    INameLock,
    IssuanceFailed,
    LimitExceeded,
    PrecheckFailed,
)
from .lifecycle import HostnameLifecycle, Retired
from .singleflight import SingleFlight
from .timeouts import with_deadline

__all__ = ["IssuancePipeline", "CertificateCheck", "MemoryNameLock", "LockLost", "ISSUE", "RENEW"]

ISSUE = "issue"
RENEW = "renew"

#: Called with (purpose, result, seconds) after each attempt that reached
#: the issuer chain; result is C{"issued"} or C{"failed"}.
Observer = Callable[[str, str, float], None]


@implementer(INameLock)
@attrs.define
class MemoryNameLock:
    """
    The lock for one process: the pipeline already runs one issuance per
    name at a time, so within a process there is nothing to wait for. A
    store shared by processes or nodes brings its own L{INameLock}.
    """

    def acquire(self, server_name: str) -> Deferred[HeldLock]:
        return succeed(HeldLock(lambda: None))


@attrs.define
class CertificateCheck:
    """
    Is a stored certificate fit to serve a name right now? Valid at this
    moment, naming the host, and from an issuer this configuration trusts.

    @ivar clock: the time source.
    @ivar accepts: whether the bundle's issuer is acceptable (see
        L{tenantedge.localca.local_ca_check}).
    """

    clock: IReactorTime
    accepts: Callable[[CertificateBundle], bool] = lambda bundle: True
    _log = Logger()

    def __call__(self, server_name: str, bundle: CertificateBundle, quiet: bool = False) -> bool:
        problem = self.problem(server_name, bundle)
        if problem is not None and not quiet:
            self._log.warn("stored certificate for {host} {problem}; obtaining a new one",
                           host=server_name, problem=problem)
        return problem is None

    def problem(self, server_name: str, bundle: CertificateBundle) -> str | None:
        """What makes the bundle unfit, or None."""
        if not bundle.is_valid_at(self.clock.seconds()):
            return f"is outside its validity period (not after {bundle.leaf.not_valid_after_utc.isoformat()})"
        if not self.accepts(bundle):
            return f"was issued by {bundle.issuer_name()}, which this configuration does not issue from"
        if server_name not in bundle.dns_names():
            return "does not name it"
        return None


class _Stopped(Exception):
    """Inside the pipeline: the order was stopped because its lock was lost."""


@attrs.define
class _Order:
    """
    One order under one hold of the name's lock.

    @ivar lost: the lock was lost: stop.
    @ivar ordering: the issuer chain's Deferred while it works.
    """

    lost: bool = False
    ordering: Deferred[CertificateBundle] | None = None

    def lose(self) -> None:
        self.lost = True
        if self.ordering is not None and not self.ordering.called:
            self.ordering.cancel()


class LockLost(IssuanceFailed):
    """The name's issuance lock was lost twice in a row while ordering (the shared store keeps going away)."""

    def __init__(self, host: str) -> None:
        super().__init__(host, "the issuance lock was lost to another node twice while ordering")


@attrs.define
class IssuancePipeline:
    """
    Obtains, stores and reports certificates; see the module docstring.

    @ivar store: where certificates persist.
    @ivar issuer: the issuer chain (backoff, fallback, limits, CAs).
    @ivar clock: for durations.
    @ivar check: decides whether a re-read certificate can be used as is.
    @ivar lock: one order per name across whatever shares the store.
    @ivar observe: told the duration of each attempt, for metrics.
    @ivar work_timeout: deadline for one run (lock, re-read, issuance,
        store), so that a hung lock, store or issuer cannot keep a name in
        flight forever.
    @ivar lifecycle: told each renewal start, issuance and CA failure
        (L{tenantedge.lifecycle}); a retired name gets no order.
    @ivar events: counts by C{"<purpose>:<result>"}: C{issued},
        C{failed}, C{rate-limit}, C{backoff}, C{retired}, C{precheck-failed},
        C{store-failed}, C{found} (another holder of the lock had stored it
        already) and C{lock-lost} (an order stopped because the lock was
        lost to another node).
    """

    store: ICertificateStore
    issuer: IIssuer
    clock: IReactorTime
    check: CertificateCheck
    lock: INameLock = attrs.field(factory=MemoryNameLock)
    observe: Observer | None = None
    work_timeout: float = 600.0
    lifecycle: HostnameLifecycle | None = None
    events: Counter[str] = attrs.field(factory=Counter, init=False)
    _flights: SingleFlight[CertificateBundle] = attrs.field(factory=SingleFlight, init=False)
    _log = Logger()

    @property
    def name(self) -> str:
        """The issuer chain's label, for logs."""
        return str(self.issuer.name)

    def in_flight(self, server_name: str) -> bool:
        """Is an issuance for this name under way in this process?"""
        return server_name in self._flights

    def obtain(
        self, server_name: str, purpose: str = ISSUE, replaces: CertificateBundle | None = None
    ) -> Deferred[CertificateBundle]:
        """
        A new (or newly found) certificate for a name the policy allowed.

        Concurrent calls for one name share one run, whatever their
        purpose.

        @param replaces: the certificate a renewal replaces (ARI).
        @return: a Deferred firing with the stored bundle, or failing
            with what the issuer chain failed with (L{BackedOff},
            L{LimitExceeded}, L{PrecheckFailed} when a pre-check found
            the name would fail validation and no order was placed,
            L{tenantedge.interfaces.IssuanceFailed}), or with L{Retired} for a
            retired name (revive it first).
        """
        return self._flights.run(
            server_name,
            lambda: with_deadline(
                Deferred.fromCoroutine(self._locked(server_name, purpose, replaces)), self.work_timeout, self.clock
            ),
        )

    async def _locked(self, server_name: str, purpose: str, replaces: CertificateBundle | None) -> CertificateBundle:
        for _ in range(2):
            held = await self.lock.acquire(server_name)
            # A lock lost mid-order (a fleet lock that expired while its
            # holder could not reach the store): another node may order
            # now; ours stops rather than race it for a second certificate,
            # then the lock is waited for again and the store looked at.
            order = _Order()
            held.lost.addCallback(lambda _, order=order: order.lose())
            try:
                found = await self._found(server_name, replaces)
                if found is not None:
                    self.events[f"{purpose}:found"] += 1
                    return found
                try:
                    return await self._issue(server_name, purpose, replaces, order)
                except _Stopped:
                    self.events[f"{purpose}:lock-lost"] += 1
                    self._log.warn("stopped the order for {host}: its issuance lock was lost to another node; "
                                   "waiting for the lock again", event="lock-lost", host=server_name)
            finally:
                held()
        raise LockLost(server_name)

    async def _found(self, server_name: str, replaces: CertificateBundle | None) -> CertificateBundle | None:
        """A usable certificate someone else stored while we waited for the lock."""
        try:
            current: CertificateBundle = await self.store.get(server_name)
        except KeyError:
            return None
        if not self.check(server_name, current, quiet=True):
            return None
        if replaces is not None and current.leaf.serial_number == replaces.leaf.serial_number:
            return None  # still the one being renewed
        if replaces is None or current.not_after > replaces.not_after:
            return current
        return None

    async def _issue(
        self, server_name: str, purpose: str, replaces: CertificateBundle | None, order: _Order
    ) -> CertificateBundle:
        if order.lost:
            raise _Stopped()
        if self.lifecycle is not None:
            record = self.lifecycle.get(server_name)
            if record is not None and record.state == "retired":
                self.events[f"{purpose}:retired"] += 1
                raise Retired(server_name, record.since)
            if purpose == RENEW:
                self.lifecycle.renewing(server_name)
        started = self.clock.seconds()
        try:
            # Cancellable while the issuer chain works (not once the
            # certificate is in hand: that one is stored whatever happens).
            order.ordering = self.issuer.issue(server_name, replaces=replaces)
            bundle: CertificateBundle = await order.ordering
        except Exception as e:
            order.ordering = None
            if order.lost:
                # Whatever the stopped chain failed with: not a CA failure.
                self._settle(server_name)
                raise _Stopped() from None
            self._failed(server_name, purpose, e, started)
            raise
        order.ordering = None
        elapsed = self.clock.seconds() - started
        self.events[f"{purpose}:issued"] += 1
        self._observe(purpose, "issued", elapsed)
        self._log.info(
            "{verb} {host} by {issuer} in {duration:.3f}s, valid until {not_after}",
            verb="issued a certificate for" if purpose == ISSUE else "renewed",
            event="issued" if purpose == ISSUE else "renewed",
            host=server_name, issuer=self.name, duration=elapsed,
            not_after=bundle.leaf.not_valid_after_utc.isoformat(),
        )
        try:
            await self.store.store(server_name, bundle)
        except Exception as e:
            # The certificate is good and in memory: serve it rather than
            # fail, but shout, since a restart would need a new order.
            self.events[f"{purpose}:store-failed"] += 1
            self._log.critical(
                "could not store the new certificate for {host}: {error}; serving it from memory only",
                host=server_name, error=str(e),
            )
        # Announced once stored: a webhook receiver that reads the name
        # back through the API finds the certificate.
        if self.lifecycle is not None:
            self.lifecycle.issued(server_name, bundle.not_after, renewal=purpose == RENEW)
        return bundle

    def _failed(self, server_name: str, purpose: str, e: Exception, started: float) -> None:
        """Count, record and log a failed attempt by what failed it."""
        if isinstance(e, BackedOff):
            # Refused without contacting a CA; the failure that started the
            # backoff was logged when it happened.
            self.events[f"{purpose}:backoff"] += 1
            self._settle(server_name)
        elif isinstance(e, LimitExceeded):
            self.events[f"{purpose}:rate-limit"] += 1
            self._settle(server_name)
            self._log.warn("no order for {host}: {error}", event="refused", reason="rate-limit",
                           host=server_name, purpose=purpose, error=e.detail)
        elif isinstance(e, PrecheckFailed):
            # No order was placed; the pre-check logged it (event
            # "precheck-failed") and the backoff recorded it. The name is
            # failing, with the pre-check's reason as its problem.
            self.events[f"{purpose}:precheck-failed"] += 1
            if self.lifecycle is not None:
                self.lifecycle.failed(server_name, e)
        else:
            elapsed = self.clock.seconds() - started
            self.events[f"{purpose}:failed"] += 1
            self._observe(purpose, "failed", elapsed)
            if self.lifecycle is not None:
                self.lifecycle.failed(server_name, e)
            if purpose == ISSUE:
                # Renewal logs its own failures, with the days left.
                self._log.error(
                    "could not obtain a certificate for {host} from {issuer} after {duration:.3f}s: {error}",
                    event="issue-failed", host=server_name, issuer=self.name, duration=elapsed,
                    error=getattr(e, "detail", None) or str(e), problem=getattr(e, "problem_type", None),
                )

    def _settle(self, server_name: str) -> None:
        """No order was placed after all: a name marked renewing goes back to what it was."""
        if self.lifecycle is not None:
            self.lifecycle.settle(server_name)

    def _observe(self, purpose: str, result: str, seconds: float) -> None:
        if self.observe is not None:
            self.observe(purpose, result, seconds)

    def counts(self, purpose: str) -> dict[str, int]:
        """This purpose's outcomes, keyed by result."""
        prefix = purpose + ":"
        return {k[len(prefix):]: v for k, v in self.events.items() if k.startswith(prefix)}
