"""
From a validated host name to a ready TLS context:
memory cache -> store -> policy -> issuer -> store.

This is the on-demand part of on-demand TLS. It runs while the client's
first handshake is parked (see L{tenantedge.tls}), so it may take as long
as an ACME order takes; concurrent misses for one name share one run
(L{SingleFlight}); a stored or cached certificate that has expired counts as
missing and is obtained again, exactly as on the first request.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .certificates import CertificateBundle
from .contexts import ServingContexts, TenantTLS
from .interfaces import (
    BackedOff,
    ICacheObserver,
    ICertificateStore,
    IDomainPolicy,
    LimitExceeded,
    PolicyRefusal,
    PrecheckFailed,
)
from .lifecycle import Retired
from .pipeline import ISSUE, CertificateCheck, IssuancePipeline
from .singleflight import SingleFlight
from .summaries import CounterSummary
from .timeouts import with_deadline

__all__ = ["CertificateResolver", "RefusalSummary", "periodic"]


@attrs.frozen
class _Entry:
    context: TenantTLS
    not_before: float
    not_after: float


@attrs.define
class CertificateResolver:
    """
    Finds, or obtains, the certificate context for a host name.

    @ivar store: where certificates persist.
    @ivar policy: who may get a new certificate.
    @ivar pipeline: how a new certificate is obtained (shared with
        renewal and the admin API).
    @ivar clock: for validity checks.
    @ivar check: whether a stored certificate can serve as is.
    @ivar cache_size: how many ready contexts to keep (least recently used
        are dropped first; a dropped one is re-read from the store).
    @ivar work_timeout: deadline for the shared work of one lookup (store
        read, policy, issuance, store write), so that a hung store or
        issuer cannot keep a name in flight forever; each handshake also
        has its own, shorter, limit.
    @ivar make_context: prepares a bundle for serving (its leaf and key on
        the shared contexts, L{tenantedge.contexts.ServingContexts.tenant}).
    @ivar observer: told what is cached and dropped, if set.
    @ivar events: counters by outcome (C{"cache-hit"}, C{"store-hit"},
        C{"issued"}, C{"refused:<reason>"}, C{"failed"}...), for metrics.
    """

    store: ICertificateStore
    policy: IDomainPolicy
    pipeline: IssuancePipeline
    clock: IReactorTime
    check: CertificateCheck
    cache_size: int = 10000
    work_timeout: float = 600.0
    make_context: Callable[[CertificateBundle], TenantTLS] = attrs.field(factory=lambda: ServingContexts().tenant)
    observer: ICacheObserver | None = None
    events: Counter[str] = attrs.field(factory=Counter, init=False)
    _cache: OrderedDict[str, _Entry] = attrs.field(factory=OrderedDict, init=False)
    _flights: SingleFlight[TenantTLS] = attrs.field(factory=SingleFlight, init=False)
    _log = Logger()

    def cached(self, server_name: str) -> TenantTLS | None:
        """
        The cached context for a name, if one is valid right now.

        Synchronous and cheap: the hot path for every handshake after the
        first.
        """
        entry = self._cache.get(server_name)
        if entry is None:
            return None
        now = self.clock.seconds()
        if not entry.not_before <= now < entry.not_after:
            del self._cache[server_name]
            self._dropped(server_name)
            return None
        self._cache.move_to_end(server_name)
        return entry.context

    def context_for(self, server_name: str) -> Deferred[TenantTLS]:
        """
        @param server_name: a name already normalised by
            L{tenantedge.hostnames.normalize}.
        @return: a Deferred firing with an C{TenantTLS} for the name, or
            failing with L{PolicyRefusal} (no certificate may be had) or with
            whatever the store or issuer failed with.
        """
        context = self.cached(server_name)
        if context is not None:
            self.events["cache-hit"] += 1
            return succeed(context)
        reason = self.policy.static_refusal(server_name)
        if reason is not None:
            self.events[f"refused:{reason}"] += 1
            return fail(PolicyRefusal(server_name, reason))
        return self._flights.run(
            server_name,
            lambda: with_deadline(Deferred.fromCoroutine(self._obtain(server_name)), self.work_timeout, self.clock),
        )

    def forget(self, server_name: str) -> None:
        """
        Drop a name's cached context, so the next handshake reads the store
        again (after a renewal or removal done elsewhere).
        """
        if self._cache.pop(server_name, None) is not None:
            self._dropped(server_name)

    def _dropped(self, server_name: str) -> None:
        if self.observer is not None:
            self.observer.forgotten(server_name)

    def cache_length(self) -> int:
        return len(self._cache)

    def cached_names(self) -> list[str]:
        return list(self._cache)

    def refresh_changed_logged(self) -> Deferred[Any]:
        """L{refresh_changed}, with its failures logged (for L{periodic})."""
        d = Deferred.fromCoroutine(self.refresh_changed())
        d.addErrback(lambda f: self._log.failure("checking the store for changes failed", f))
        return d

    async def refresh_changed(self) -> list[str]:
        """
        Forget cached names whose store entry someone else replaced or
        removed (the admin CLI, a fleet peer): their next handshake reads
        the store again. Run periodically by L{periodic}.
        """
        changed: list[str] = await self.store.changed(self.cached_names())
        for name in changed:
            self.forget(name)
            self._log.info("the stored certificate for {host} changed; reloading it", host=name)
        return changed


    async def warm(self) -> int:
        """
        Load stored certificates into the cache, as many as it has room for
        (recently used entries are never pushed out). For a store shared by
        a fleet, run when it (re)connects: each worker of each node then
        serves every tenant from memory while the store is away, whichever
        worker the tenant's next handshake reaches.

        @return: how many were loaded.
        """
        room = self.cache_size - len(self._cache)
        loaded = 0
        if room <= 0:
            return loaded
        names: list[str] = sorted(await self.store.names())
        for name in names:
            if loaded >= room:
                break
            if name in self._cache:
                continue
            try:
                bundle = await self.store.get(name)
            except KeyError:
                continue
            if name not in self._cache and self.check(name, bundle, quiet=True):
                self.remember(name, bundle)
                loaded += 1
        return loaded

    def resync_logged(self) -> Deferred[Any]:
        """
        After a shared store (re)connects: forget what changed meanwhile
        (messages may have been missed), then warm the cache.
        """

        async def resync() -> None:
            await self.refresh_changed()
            loaded = await self.warm()
            if loaded:
                self._log.info("loaded {count} stored certificate(s) into the cache", count=loaded)

        d = Deferred.fromCoroutine(resync())
        d.addErrback(lambda f: self._log.failure("catching up with the shared store failed", f))
        return d

    def in_flight(self, server_name: str) -> bool:
        """Is a lookup or issuance for this name under way?"""
        return server_name in self._flights or self.pipeline.in_flight(server_name)

    async def _obtain(self, server_name: str) -> TenantTLS:
        try:
            bundle = await self.store.get(server_name)
        except KeyError:
            pass
        else:
            if self.check(server_name, bundle):
                self.events["store-hit"] += 1
                return self.remember(server_name, bundle)
        try:
            await self.policy.check(server_name)
        except PolicyRefusal as refusal:
            self.events[f"refused:{refusal.reason}"] += 1
            self._log.debug(
                "refused a certificate for {host}: {reason}",
                event="refused",
                host=server_name,
                reason=refusal.reason,
            )
            raise
        try:
            bundle = await self.pipeline.obtain(server_name, ISSUE)
        except BackedOff:
            self.events["refused:backoff"] += 1
            raise
        except LimitExceeded:
            self.events["refused:rate-limit"] += 1
            raise
        except Retired:
            self.events["refused:retired"] += 1
        except PrecheckFailed as e:
            self.events[f"refused:{e.reason}"] += 1
            raise
        except Exception:
            self.events["failed"] += 1
            raise
        self.events["issued"] += 1
        return self.remember(server_name, bundle)

    def remember(self, server_name: str, bundle: CertificateBundle) -> TenantTLS:
        """
        Build and cache the context for a bundle (also used for hot swaps
        after a renewal).
        """
        context = self.make_context(bundle)
        self._cache[server_name] = _Entry(context, bundle.not_before, bundle.not_after)
        self._cache.move_to_end(server_name)
        if self.observer is not None:
            self.observer.remembered(server_name, bundle, context)
        while len(self._cache) > self.cache_size:
            evicted, _ = self._cache.popitem(last=False)
            self._dropped(evicted)
        return context


def periodic(interval: float, call: Callable[[], Any], clock: IReactorTime, name: str) -> TimerService:
    """
    A service calling C{call} every C{interval} seconds on C{clock}
    (Twisted's C{TimerService}; the first call at start). C{call} must
    catch its own failures: a failed call would stop the loop for good.
    """
    service = TimerService(interval, call)
    service.clock = clock
    service.setName(name)
    return service


@attrs.define
class RefusalSummary(CounterSummary):
    """
    One log line per interval with the names refused since the last one,
    counted by reason: a flood of random names costs one line a minute, not
    one per handshake (each refusal is logged at debug level). Run by
    L{periodic}; the first call only takes the baseline.
    """

    events: Counter[str]
    message = "refused a certificate to {count} name(s) in the last {interval:g}s: {reasons}"
    event = "refused-summary"

    def counts(self) -> Counter[str]:
        return Counter({k.split(":", 1)[1]: v for k, v in self.events.items() if k.startswith("refused:")})
