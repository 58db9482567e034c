"""
Certificates never lapse: the renewal service.

A C{LoopingCall} (every C{--renew-check-interval}, default 12 hours, plus
up to 10% jitter so a fleet does not renew in lock-step) walks the store a
batch of names per reactor turn, never all files at once, and renews each
certificate that is due:

  - by default when its remaining life falls below C{--renew-before}
    (30 days) or one third of its total lifetime, whichever is shorter, so
    that a 90-day certificate renews at 30 days left, Let's Encrypt's
    45-day ones at 15 days left and 6-day ones at 2 days left (nothing here
    assumes 90 days);
  - where the CA offers ACME Renewal Information (RFC 9773), at a point in
    the window the CA suggests instead.

Before renewing, the policy is asked again (L{EdgePolicy.recheck}): a
definite deny moves the certificate to the archive (keys are never
deleted); an unknown answer renews anyway. The old certificate keeps serving
until the new one is stored, then the next handshake gets the new one (hot
swap, no restart). A failed renewal is retried at the next checks (with the
issuer's per-name backoff); a certificate inside its last 7 days is logged
at critical level at every check until renewed ("panic", in txacme's
terms).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .certificates import CertificateBundle
from .interfaces import Decision, ICertificateStore, IDomainPolicy
from .lifecycle import HostnameLifecycle
from .pipeline import RENEW, IssuancePipeline

__all__ = ["RenewalService", "renewal_due", "DAY"]

DAY = 86400.0

#: (start, end) POSIX times of a CA-suggested renewal window, or None.
Window = tuple[float, float] | None


def renewal_due(bundle: CertificateBundle, renew_before: float, window: Window = None) -> float:
    """
    When a certificate should be renewed (a POSIX time).

    C{not_after - min(renew_before, lifetime / 3)}; with an ARI window, a
    point inside it that is stable for this certificate (derived from its
    serial, so repeated checks agree and a fleet spreads out), if that is
    earlier.
    """
    lifetime = bundle.not_after - bundle.not_before
    by_lifetime = bundle.not_after - min(renew_before, lifetime / 3)
    if window is not None:
        start, end = window
        fraction = int.from_bytes(hashlib.sha256(str(bundle.leaf.serial_number).encode()).digest()[:4], "big")
        # Never later than the lifetime rule: a window that a CA (or a
        # clock problem) puts near or past expiry must not let it lapse.
        return min(start + (end - start) * fraction / 2**32, by_lifetime)
    return by_lifetime


@attrs.define(eq=False)
class RenewalService(Service):
    """
    @ivar store: where certificates live.
    @ivar pipeline: where renewals come from (the same pipeline, issuer
        chain and metrics as first issuance).
    @ivar policy: re-asked before each renewal (L{IDomainPolicy.recheck}).
    @ivar remember: puts a renewed bundle in the handshake cache (hot swap).
    @ivar forget: drops a name from the handshake cache (after archiving).
    @ivar clock: the reactor.
    @ivar interval: seconds between checks.
    @ivar jitter: up to this fraction of C{interval} is added before each walk.
    @ivar renew_before: see L{renewal_due}.
    @ivar panic_within: log critical when less than this is left.
    @ivar batch: names read per reactor turn.
    @ivar window: optional ARI lookup, C{window(bundle) -> Deferred[Window]}.
    @ivar concurrency: renewals running at once (the issuance limits
        apply on top).
    @ivar leader: in a fleet, asked before each walk whether this node is
        the one that walks (so N nodes do not each read every key every
        interval); C{None}: always walk.
    @ivar expiring: told C{(name, serial, not_after, error)} when renewing
        a certificate failed with less than C{panic_within} left (the
        C{hostname.expiring-soon} webhook, L{tenantedge.webhooks.ExpiryNotices}).
    @ivar lifecycle: the hostname lifecycle: stored names without a
        record are adopted as active, retired names are skipped, archives
        and certificates about to lapse are reported to it.
    @ivar events: counters (C{renewed}, C{archived}, C{failed}, C{panic},
        C{retired}...).
    """

    store: ICertificateStore
    pipeline: IssuancePipeline
    policy: IDomainPolicy
    remember: Callable[[str, CertificateBundle], Any]
    forget: Callable[[str], None]
    clock: IReactorTime
    interval: float = 43200.0
    jitter: float = 0.1
    renew_before: float = 30 * DAY
    panic_within: float = 7 * DAY
    batch: int = 100
    window: Callable[[CertificateBundle], Deferred[Window]] | None = None
    random: Callable[[], float] = random.random
    concurrency: int = 4
    leader: Callable[[], Deferred[bool]] | None = None
    expiring: Callable[[str, int, float, str], None] | None = None
    lifecycle: HostnameLifecycle | None = None
    events: Counter[str] = attrs.field(factory=Counter, init=False)
    soonest_expiry: float | None = attrs.field(default=None, init=False)
    stored_count: int = attrs.field(default=0, init=False)
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _running_check: Deferred[None] | None = attrs.field(default=None, init=False)
    _renewing: DeferredSemaphore = attrs.field(init=False)
    _sleep: Deferred[None] | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _first: bool = attrs.field(default=False, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._renewing = DeferredSemaphore(self.concurrency)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        # The first walk runs right away and without jitter: a certificate
        # may have come due while the server was down, and the stored-count
        # and soonest-expiry metrics should exist from start-up.
        self._first = True
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # A walk under way stops at its next batch; a walk still in its
        # jitter delay is woken now (only that plain delay is cancelled,
        # never the walk's own coroutine).
        self._stopping = True
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()
        return None

    def check(self) -> Deferred[None]:
        """
        One pass over the store. Never fails (a LoopingCall whose call fails
        stops for good): every error is logged and counted.
        """
        d = Deferred.fromCoroutine(self._check())
        self._running_check = d

        def done(result: Any) -> None:
            self._running_check = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.events["check-failed"] += 1
                self._log.failure("renewal check failed", result)

        d.addBoth(done)
        return d

    async def _check(self) -> None:
        delay = 0.0 if self._first else self.interval * self.jitter * self.random()
        self._first = False
        if delay > 0:
            self._sleep = deferLater(self.clock, delay, lambda: None)
            try:
                await self._sleep
            finally:
                self._sleep = None
        if self._stopping:
            return
        if self.leader is not None and not await self.leader():
            self.events["not-leader"] += 1
            return
        names = await self.store.names()
        self.stored_count = len(names)
        if self.lifecycle is not None:
            self.lifecycle.adopt(names)
        renewals: list[Deferred[float | None]] = []
        expiries: list[float] = []
        for start in range(0, len(names), self.batch):
            for name in names[start : start + self.batch]:
                try:
                    bundle, due = await self._due(name)
                except CancelledError:
                    raise
                except Exception:
                    # One bad entry must not stop the walk for the others.
                    self.events["failed"] += 1
                    self._log.failure("renewal check of {host} failed", host=name)
                    continue
                if bundle is None:
                    continue
                if due and self.lifecycle is not None and self.lifecycle.is_retired(name):
                    # Retired: no more orders; what is stored serves until it lapses.
                    self.events["retired"] += 1
                    expiries.append(bundle.not_after)
                    continue
                if due:
                    # Renewals run alongside the walk, a few at a time.
                    renewals.append(self._renewing.run(self.renew, name, bundle))
                else:
                    expiries.append(bundle.not_after)
            # Yield to the reactor between batches: handshakes go on.
            await deferLater(self.clock, 0, lambda: None)
            if self._stopping:
                break
        for result in await gatherResults(renewals, consumeErrors=True) if renewals else []:
            if result is not None:
                expiries.append(result)
        self.soonest_expiry = min(expiries) if expiries else None
        self.events["checks"] += 1

    async def _due(self, name: str) -> tuple[CertificateBundle | None, bool]:
        try:
            bundle = await self.store.get(name)
        except KeyError:
            return None, False
        due, _ = await self.schedule(name, bundle)
        now = self.clock.seconds()
        return bundle, now >= due or now >= bundle.not_after

    async def schedule(self, name: str, bundle: CertificateBundle) -> tuple[float, Window]:
        """
        When a certificate is due for renewal (see L{renewal_due}), and the
        CA's ARI window used for it, if any (a lookup that fails is logged
        and ignored).
        """
        window = None
        if self.window is not None:
            try:
                window = await self.window(bundle)
            except Exception as e:
                self._log.warn("no renewal window for {host}: {error}", host=name, error=str(e))
        return renewal_due(bundle, self.renew_before, window), window

    async def renew(self, name: str, bundle: CertificateBundle) -> float | None:
        """
        Re-ask the policy, then renew (or archive) one name. Returns the
        not-after of the certificate serving the name afterwards. Never
        fails: errors are logged and counted.
        """
        try:
            return await self._renew(name, bundle)
        except CancelledError:
            raise
        except Exception:
            self.events["failed"] += 1
            self._log.failure("renewing {host} failed", host=name)
            return bundle.not_after

    def renew_logged(self, name: str, bundle: CertificateBundle) -> Deferred[float | None]:
        """
        L{renew} as a Deferred, at most C{concurrency} at once with the
        walk's own renewals: for a renewal asked for from outside the
        walk (a revoked certificate, L{tenantedge.ocsp}). Never fails.
        """
        return self._renewing.run(lambda: Deferred.fromCoroutine(self.renew(name, bundle)))

    async def _renew(self, name: str, bundle: CertificateBundle) -> float | None:
        decision = await self.policy.recheck(name)
        if decision is Decision.DENY:
            await self.store.delete(name)
            self.forget(name)
            if self.lifecycle is not None:
                self.lifecycle.archived(name)
            self.events["archived"] += 1
            self._log.info(
                "not renewing {host}: the allow check now denies it; its certificate is archived",
                event="archived",
                host=name,
            )
            return None
        if decision is Decision.UNKNOWN:
            self._log.info("renewing {host} although the allow check could not answer", host=name)
        try:
            new = await self.pipeline.obtain(name, RENEW, replaces=bundle)
        except Exception as e:
            self.events["failed"] += 1
            left = bundle.not_after - self.clock.seconds()
            if left < self.panic_within:
                self.events["panic"] += 1
                if self.lifecycle is not None:
                    self.lifecycle.expiring(name, bundle.not_after)
                self._log.critical(
                    "PANIC: renewing {host} failed and its certificate expires in {days:.1f} days: {error}",
                    event="renew-failed",
                    panic=True,
                    host=name,
                    days=left / DAY,
                    error=getattr(e, "detail", None) or str(e),
                )
                if self.expiring is not None:
                    self.expiring(name, bundle.leaf.serial_number, bundle.not_after,
                                  getattr(e, "detail", None) or str(e))
            else:
                self._log.warn(
                    "renewing {host} failed ({days:.1f} days left); will retry: {error}",
                    event="renew-failed",
                    host=name,
                    days=left / DAY,
                    error=getattr(e, "detail", None) or str(e),
                )
            return bundle.not_after
        self.remember(name, new)
        self.events["renewed"] += 1
        return new.not_after
