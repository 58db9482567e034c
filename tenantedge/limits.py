"""
Issuance limits that keep an ACME account inside its CA's published limits.

Let's Encrypt's limits (2025): 300 new orders per account per 3 hours,
50 certificates per registered domain per week, 5 failed validations per
name per hour. Hitting them locks an account out for hours, so tenantedge
stops short of them itself, per ACME account, and refuses a name over a
limit at once (a fast TLS alert and a log line), never queueing it:

  - at most C{max_concurrent} orders at once (all CAs together); a few more
    may wait for a free slot (C{max_waiting}), the rest are refused;
  - at most C{max_new_orders} orders per account per 3 hours;
  - at most C{max_per_domain} certificates per registered domain per week
    (renewals the CA's ARI marks exempt do not count);
  - at most C{max_failed_validations} failed validations per name per hour.

Windows are sliding and kept in C{<store>/limits.json}, so a restart does
not reset them.

The windows are Let's Encrypt's, so by default they apply only to Let's
Encrypt's directories (production and staging, L{LETSENCRYPT_DIRECTORIES});
any other CA gets only the concurrency bound unless configured
(C{--ca-limits CA=letsencrypt}; L{LimitedIssuer.windows}).
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractAsyncContextManager
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .acme import ValidationFailed
from .certificates import CertificateBundle
from .interfaces import IIssuer, IRenewalExemption, IReplacesRefused, LimitExceeded
from .interfaces import ISharedState
from .shared import KEEP, StateFile
from .slots import Slots

__all__ = ["IssuanceLimits", "LimitedIssuer", "LimitExceeded", "LETSENCRYPT_DIRECTORIES", "is_letsencrypt"]

#: Let's Encrypt's ACME directories, whose published limits the windows are.
LETSENCRYPT_DIRECTORIES = frozenset({
    "https://acme-v02.api.letsencrypt.org/directory",
    "https://acme-staging-v02.api.letsencrypt.org/directory",
})


def is_letsencrypt(directory_url: str) -> bool:
    """Is this one of Let's Encrypt's directories (production or staging)?"""
    return directory_url.rstrip("/") in LETSENCRYPT_DIRECTORIES

HOUR = 3600.0
ORDER_WINDOW = 3 * HOUR
DOMAIN_WINDOW = 7 * 24 * HOUR
FAILURE_WINDOW = HOUR


@implementer(IReplacesRefused)
@attrs.define
class IssuanceLimits:
    """
    Shared state of all limits.

    @ivar path: JSON file for the sliding windows, or C{None} (memory only).
    @ivar shared: where the windows live instead of C{path} (a fleet's
        Redis, so that N nodes do not spend N times the CA's budget).
    @ivar registered_domain: maps a name to the domain the per-domain limit
        counts against.
    """

    path: str | None
    clock: IReactorTime
    registered_domain: Callable[[str], str]
    max_concurrent: int = 4
    max_waiting: int = 64
    max_new_orders: int = 300
    max_per_domain: int = 50
    max_failed_validations: int = 5
    shared: ISharedState | None = None
    slots: Slots = attrs.field(
        init=False, default=attrs.Factory(lambda self: Slots(self.max_concurrent, self.max_waiting), takes_self=True)
    )
    _inflight: Counter[tuple[str, str]] = attrs.field(factory=Counter, init=False)
    _orders: dict[str, list[float]] = attrs.field(factory=dict, init=False)
    _domains: dict[str, dict[str, list[float]]] = attrs.field(factory=dict, init=False)
    _failures: dict[str, dict[str, list[float]]] = attrs.field(factory=dict, init=False)
    _downgraded: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    _file: ISharedState = attrs.field(init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._file = self.shared if self.shared is not None else StateFile(self.path)

    # -- persistence (shared by every process on the store) -----------------------

    def load(self) -> None:
        """Read the persisted windows (at start-up, and when another process changed them)."""
        try:
            self._parse(self._file.read())
        except (OSError, ValueError) as e:
            self._log.error("ignoring unreadable limit state {file}: {error}", file=self.path, error=str(e))
            self._parse(None)

    def _parse(self, data: Any) -> None:
        try:
            data = data or {}
            self._orders = {str(k): [float(t) for t in v] for k, v in data.get("orders", {}).items()}
            self._domains = _nested(data.get("domains", {}))
            self._failures = _nested(data.get("failures", {}))
        except (ValueError, TypeError, AttributeError) as e:
            self._log.error("ignoring unreadable limit state {file}: {error}", file=self.path, error=str(e))
            self._orders, self._domains, self._failures = {}, {}, {}

    def _fresh(self) -> None:
        if self._file.changed():
            self.load()

    def _apply(self, mutate: Callable[[], None]) -> None:
        """Change the windows on top of the latest persisted ones, under the file's lock."""

        def change(data: Any) -> Any:
            if self.path is not None and data is not KEEP:
                self._parse(data)
            mutate()
            self._prune()
            return {"orders": self._orders, "domains": self._domains, "failures": self._failures}

        self._file.update(change)

    def _prune(self) -> None:
        now = self.clock.seconds()
        self._orders = {k: _recent(v, now, ORDER_WINDOW) for k, v in self._orders.items()}
        self._orders = {k: v for k, v in self._orders.items() if v}
        for table, window in ((self._domains, DOMAIN_WINDOW), (self._failures, FAILURE_WINDOW)):
            for ca in list(table):
                kept = {k: _recent(v, now, window) for k, v in table[ca].items()}
                table[ca] = {k: v for k, v in kept.items() if v}
                if not table[ca]:
                    del table[ca]

    # -- checks ------------------------------------------------------------------

    def check(self, ca: str, server_name: str, exempt: bool = False) -> None:
        """
        @param exempt: an ARI renewal, which the CA does not count against
            its order and per-domain limits.
        @raise LimitExceeded: if an order for this name at this CA now would
            break a window limit.
        """
        self._fresh()
        now = self.clock.seconds()
        if exempt:
            self._check_failures(ca, server_name, now)
            return
        orders = _recent(self._orders.get(ca, []), now, ORDER_WINDOW)
        if len(orders) >= self.max_new_orders:
            raise LimitExceeded(
                server_name, "new-orders", f"{len(orders)} orders at {ca} in 3 hours",
                orders[0] + ORDER_WINDOW - now,
            )
        domain = self.registered_domain(server_name)
        issued = _recent(self._domains.get(ca, {}).get(domain, []), now, DOMAIN_WINDOW)
        # Orders in flight for the domain count too, or concurrent orders
        # would all pass the check.
        if len(issued) + self._inflight[(ca, domain)] >= self.max_per_domain:
            raise LimitExceeded(
                server_name, "domain-week", f"{len(issued)} certificates for {domain} at {ca} this week",
                issued[0] + DOMAIN_WINDOW - now if issued else None,
            )
        self._check_failures(ca, server_name, now)

    def _check_failures(self, ca: str, server_name: str, now: float) -> None:
        failed = _recent(self._failures.get(ca, {}).get(server_name, []), now, FAILURE_WINDOW)
        if len(failed) >= self.max_failed_validations:
            raise LimitExceeded(
                server_name, "failed-validations", f"{len(failed)} failed validations in the last hour",
                failed[0] + FAILURE_WINDOW - now,
            )

    def reserve(self, ca: str, server_name: str) -> None:
        """Count an order in flight against its registered domain."""
        self._inflight[(ca, self.registered_domain(server_name))] += 1

    def unreserve(self, ca: str, server_name: str) -> None:
        key = (ca, self.registered_domain(server_name))
        self._inflight[key] -= 1
        if self._inflight[key] <= 0:
            del self._inflight[key]

    def record_order(self, ca: str) -> None:
        now = self.clock.seconds()
        self._apply(lambda: self._orders.setdefault(ca, []).append(now))

    def record_issued(self, ca: str, server_name: str, exempt: bool = False) -> None:
        if not exempt:
            domain = self.registered_domain(server_name)
            now = self.clock.seconds()
            self._apply(lambda: self._domains.setdefault(ca, {}).setdefault(domain, []).append(now))

    def record_failed_validation(self, ca: str, server_name: str) -> None:
        now = self.clock.seconds()
        self._apply(lambda: self._failures.setdefault(ca, {}).setdefault(server_name, []).append(now))

    def replaces_refused(self, ca: str, server_name: str) -> None:
        """
        The CA turned an ARI renewal into a plain order: check and count it
        (L{IReplacesRefused}).

        @raise LimitExceeded: if the plain order would break a limit.
        """
        self.check(ca, server_name)
        self.record_order(ca)
        self._downgraded.add((ca, server_name))

    def take_downgraded(self, ca: str, server_name: str) -> bool:
        """Was this order downgraded from a renewal? (Forgets it.)"""
        key = (ca, server_name)
        found = key in self._downgraded
        self._downgraded.discard(key)
        return found

    # -- concurrency -------------------------------------------------------------

    @property
    def running(self) -> int:
        """Orders running now."""
        return self.slots.running

    def slot(self, server_name: str) -> AbstractAsyncContextManager[None]:
        """
        Hold one of the C{max_concurrent} order slots for the body of an
        C{async with}; waits (bounded) when all are busy.

        @raise LimitExceeded: on entry, if too many are waiting already.
        """
        return self.slots.held(lambda why: LimitExceeded(server_name, "concurrent", f"orders: {why}"))


def _recent(times: list[float], now: float, window: float) -> list[float]:
    return [t for t in times if t > now - window]


def _nested(data: Any) -> dict[str, dict[str, list[float]]]:
    return {str(ca): {str(k): [float(t) for t in v] for k, v in names.items()} for ca, names in data.items()}


@implementer(IIssuer)
@attrs.define
class LimitedIssuer:
    """
    Applies L{IssuanceLimits} to one ACME issuer (one account).

    @ivar windows: whether the order, per-domain and failed-validation
        windows apply, or only the concurrency bound; C{None} (the
        default): only for Let's Encrypt's directories (L{is_letsencrypt}
        of the wrapped issuer's name).
    @ivar exemption: tells ARI renewals (exempt from the CA's order and
        per-domain limits, so from ours) from plain orders; usually the
        wrapped L{tenantedge.issuer.AcmeIssuer} itself.
    """

    wrapped: IIssuer
    limits: IssuanceLimits
    exemption: IRenewalExemption | None = None
    windows: bool | None = None
    _log = Logger()

    @property
    def windowed(self) -> bool:
        """Do the windows apply to this CA (see C{windows})?"""
        return self.windows if self.windows is not None else is_letsencrypt(self.name)

    @property
    def name(self) -> str:
        return str(self.wrapped.name)

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        return Deferred.fromCoroutine(self._issue(server_name, replaces))

    async def _issue(self, server_name: str, replaces: CertificateBundle | None) -> CertificateBundle:
        ca = self.name
        if not self.windowed:
            async with self.limits.slot(server_name):
                bundle: CertificateBundle = await self.wrapped.issue(server_name, replaces=replaces)
                return bundle
        # An ARI renewal is exempt from the CA's order and per-domain
        # limits, so it is from ours; concurrency and failed validations
        # still count. If the CA refuses the "replaces", the plain order it
        # gets instead is checked and counted (IssuanceLimits.replaces_refused).
        exempt = bool(self.exemption is not None and await self.exemption.renewal_exempt(replaces))
        self.limits.check(ca, server_name, exempt=exempt)
        async with self.limits.slot(server_name):
            try:
                self.limits.check(ca, server_name, exempt=exempt)  # the window may have filled while waiting
                if not exempt:
                    self.limits.record_order(ca)
                    self.limits.reserve(ca, server_name)
                try:
                    bundle = await self.wrapped.issue(server_name, replaces=replaces)
                except ValidationFailed:
                    self.limits.record_failed_validation(ca, server_name)
                    raise
                finally:
                    if not exempt:
                        self.limits.unreserve(ca, server_name)
                downgraded = self.limits.take_downgraded(ca, server_name)
                self.limits.record_issued(ca, server_name, exempt=exempt and not downgraded)
                return bundle
            finally:
                self.limits.take_downgraded(ca, server_name)
