"""
L{OnDemandTLS}: on-demand TLS as one Twisted service, for C{twistd
tenantedge}, the C{tenantedge:} endpoint and your own application alike.
In your own application::

    from twisted.internet import endpoints, reactor
    from twisted.web.server import Site
    from tenantedge import OnDemandConfig, OnDemandTLS

    edge = OnDemandTLS.from_config(
        OnDemandConfig(store="/var/lib/myapp/certs", allow_url="https://api.example.com/check/{domain}"),
        reactor,
    )
    edge.setServiceParent(application)          # or edge.startService()
    endpoints.serverFromString(reactor, "tcp:443").listen(edge.wrap(Site(root)))
    endpoints.serverFromString(reactor, "tcp:80").listen(Site(edge.http_resource()))

The service owns the store, the policy, the whole issuer chain (local CA or
ACME CAs with limits, fallback and backoff), the one issuance pipeline
(one order per name), the resolver and its cache, renewal, cache refresh
and the challenge responders. It is built by constructor injection
(L{from_config} picks the concrete classes; pass C{store=}, C{policy=} or
C{issuer=} to swap one piece), and L{OnDemandTLS.startService} prepares
everything in one fixed order (see there).
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from treq.client import HTTPClient

from . import __version__
from .accounts import AccountStore, account_directory
from .acme import AcmeClient
from .allow import AllowChecker
from .backoff import FailureBackoff
from .challenges import (
    ChallengeResource,
    HTTP01Responder,
    HTTPRedirectRoot,
    MemoryChallengeStore,
    TLSALPN01Responder,
)
from .config import ConfigError, OnDemandConfig
from .interfaces import (
    ICertificateStore,
    IChallengeStore,
    IDomainPolicy,
    IIssuer,
    INameLock,
    ISharedRecords,
    ISharedState,
)
from .issuer import AcmeIssuer, BackoffIssuer, FallbackIssuer
from .limits import IssuanceLimits, LimitedIssuer
from .localca import LocalCA, local_ca_check
from .journal import DocumentRecords
from .lifecycle import HostnameLifecycle
from .metrics import EdgeCollector, HostnameCollector, OcspCollector, RenewalGauges, Timings, WebhookCollector
from .ocsp import OcspStapler
from .pipeline import CertificateCheck, IssuancePipeline, MemoryNameLock
from .policy import EdgePolicy, registered_domain
from .pools import quiet_pool
from .precheck import CAAPrecheck, DNSPrecheck, LazyResolver, PrecheckedIssuer, ReachPrecheck
from .renewal import RenewalService
from .contexts import ServingContexts
from .resolver import CertificateResolver, RefusalSummary, periodic
from .shared import DirectoryChallengeStore, DirectoryNameLock
from .store import DirectoryStore, StoreError, run_inline
from .tls import OnDemandTLSFactory
from .trust import acme_http_client, https_policy
from .webhooks import ExpiryNotices, WebhookOutbox, lifecycle_webhook

__all__ = ["OnDemandTLS", "Storage", "open_storage", "StartupError"]

#: One start-up preparation: (what it is, for errors and logs; the call).
Preparation = tuple[str, Callable[[], None]]


class StartupError(Exception):
    """
    The service cannot start as configured (an unusable store, a local CA
    whose files do not match); the message says what to fix.
    """


@attrs.frozen
class Storage:
    """
    Where state lives, chosen by the C{store} setting: certificates, the
    pending HTTP-01 answers and the per-name lock (all three shared when
    the store is shared), and the directory for account keys and the
    small state files (backoff, limits).
    """

    store: ICertificateStore
    challenges: IChallengeStore
    lock: INameLock
    directory: str
    preparations: tuple[Preparation, ...] = ()
    #: A shared store's backoff and limit state, by label (else files).
    shared_state: Callable[[str], ISharedState] | None = None
    #: A shared store's records kept per name (the lifecycle), by label (else files).
    shared_records: Callable[[str], ISharedRecords] | None = None
    #: A shared store's ACME account stores, by CA slug (else files).
    accounts: Callable[[str], Any] | None = None
    #: Services started and stopped with the edge (a shared store's connections).
    services: tuple[Any, ...] = ()
    #: Told the resolver's forget and resync calls and the metrics
    #: registry, for a store that publishes its changes.
    attach: Callable[[Callable[[str], None], Callable[[], Any], Any], None] | None = None
    #: Asked before each renewal walk whether this node walks (a fleet's leader).
    leader: Callable[[], Deferred[bool]] | None = None


def _run_blocking(reactor: Any) -> Callable[..., Any]:
    """
    How blocking work (file writes with fsync, RSA key generation) runs: in
    the reactor's thread pool, or inline on a reactor without threads
    (memory reactors in tests).
    """
    if IReactorThreads.providedBy(reactor):
        return partial(deferToThreadPool, reactor, reactor.getThreadPool())
    return run_inline


def _lifecycle_records(storage: Storage) -> ISharedRecords | None:
    """
    Where a shared store keeps the hostname lifecycle: its per-name
    records, or (a store of an embedder's own offering only shared state)
    one shared document; C{None} for the directory's own files.
    """
    if storage.shared_records is not None:
        return storage.shared_records("lifecycle")
    if storage.shared_state is not None:
        return DocumentRecords(storage.shared_state("lifecycle"))
    return None


def open_storage(config: OnDemandConfig, reactor: Any) -> Storage:
    """
    Open the storage the configuration names: today a directory in
    txacme's format (L{DirectoryStore}), with the pending challenge answers
    and the per-name issuance lock in the same directory, so every process
    on it (the workers of one box, or several servers) shares them.

    A C{redis://} or C{rediss://} URL opens a Redis store instead
    (L{tenantedge.redisstore}): certificates, challenges, the lock, the
    backoff and limit state and the ACME accounts, shared by a fleet.

    @raise ConfigError: for a C{store} value that names no known kind.
    """
    if config.store.startswith(("redis://", "rediss://")):
        from .redisstore import open_redis_storage

        if "internal" in config.ca:
            raise ConfigError("ca", "the local CA keeps its root on disk: use it with a directory store")
        try:
            return Storage(**open_redis_storage(
                config.store, reactor, password_file=config.store_password_file, ca=config.store_ca,
                lock_ttl=config.store_lock_ttl, renew_interval=config.renew_check_interval,
            ))
        except ValueError as e:
            raise ConfigError("store", str(e)) from None
    if "://" in config.store:
        raise ConfigError("store", f"{config.store!r}: give a directory, or a redis:// URL")
    store = DirectoryStore(config.store, run_blocking=_run_blocking(reactor))
    challenges = DirectoryChallengeStore(os.path.join(config.store, "challenges"))
    return Storage(
        store=store,
        challenges=challenges,
        lock=DirectoryNameLock(os.path.join(config.store, "locks"), reactor),
        directory=config.store,
        preparations=(("the store", store.prepare), ("the challenge answers", challenges.prepare)),
    )


@attrs.define(eq=False, slots=False)
class OnDemandTLS(MultiService):
    """
    On-demand TLS for any Twisted server; see the module docstring.

    Use L{from_config} unless you assemble the pieces yourself.

    @ivar config: the configuration it was built from.
    @ivar store: the certificate store.
    @ivar challenges: pending HTTP-01 answers (read by L{http_resource}).
    @ivar policy: who may get a certificate.
    @ivar pipeline: the one way certificates are obtained.
    @ivar resolver: name to TLS context, with the in-memory cache.
    @ivar renewal: the renewal service (a child service).
    @ivar ocsp: the OCSP stapler (a child service), if any.
    @ivar tls_alpn: answers TLS-ALPN-01 challenges on the HTTPS port.
    @ivar timings: the metrics registry and histograms.
    @ivar handshakes: TLS handshake outcomes of every L{wrap}ped factory.
    @ivar local_ca: the local CA, if one is configured.
    @ivar contexts: the TLS contexts every tenant shares (ticket keys).
    @ivar acme_issuers: the ACME issuers, one per configured CA.
    @ivar backoff: the per-name failure backoff.
    @ivar lifecycle: each hostname's lifecycle (the hostname API's
        records; subscribe to its events).
    @ivar precheck_results: the pre-checks' results (C{"<check>:<result>"}),
        if any pre-check is configured.
    @ivar preparations: the start-up steps, run in order by L{startService}.
    @ivar children: further services started and stopped with this one
        (cache refresh, the refusal summary).
    @ivar on_stop: called when the service stops (connection pools).
    @ivar webhooks: the signed-webhook outbox (a child service), if
        C{webhook} URLs are configured: call its C{emit} on events.
    """

    config: OnDemandConfig
    reactor: Any
    store: ICertificateStore
    challenges: IChallengeStore
    policy: IDomainPolicy
    pipeline: IssuancePipeline
    resolver: CertificateResolver
    renewal: RenewalService
    tls_alpn: TLSALPN01Responder
    timings: Timings
    handshakes: Counter[str]
    allow_results: Counter[str] | None = None
    local_ca: LocalCA | None = None
    contexts: ServingContexts | None = None
    acme_issuers: Sequence[AcmeIssuer] = ()
    backoff: FailureBackoff | None = None
    lifecycle: HostnameLifecycle | None = None
    precheck_results: Counter[str] | None = None
    preparations: Sequence[Preparation] = ()
    children: Sequence[Any] = ()
    on_stop: Sequence[Callable[[], Any]] = ()
    webhooks: WebhookOutbox | None = None
    ocsp: OcspStapler | None = None
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.renewal.setName("renewal")
        self.renewal.setServiceParent(self)
        if self.webhooks is not None:
            self.webhooks.setName("webhooks")
            self.webhooks.setServiceParent(self)
            self.timings.registry.register(WebhookCollector(self.webhooks.results, self.webhooks.queued))
        if self.ocsp is not None:
            self.ocsp.setName("ocsp")
            self.ocsp.setServiceParent(self)
            self.timings.registry.register(OcspCollector(self.ocsp.results, self.ocsp.stapled_count))
        for child in self.children:
            child.setServiceParent(self)
        self.timings.registry.register(
            EdgeCollector(
                handshakes=self.handshakes,
                lookups=self.resolver.events,
                issuance=self.pipeline.events,
                allow=self.allow_results,
                renewals=self.renewal.events,
                renewal_gauges=RenewalGauges(
                    stored=lambda: self.renewal.stored_count,
                    soonest_expiry=lambda: self.renewal.soonest_expiry,
                ),
                cache_length=self.resolver.cache_length,
                prechecks=self.precheck_results,
            )
        )
        if self.lifecycle is not None:
            self.timings.registry.register(HostnameCollector(self.lifecycle.counts))

    @classmethod
    def from_config(
        cls,
        config: OnDemandConfig,
        reactor: Any,
        *,
        storage: Storage | None = None,
        store: ICertificateStore | None = None,
        policy: IDomainPolicy | None = None,
        issuer: IIssuer | None = None,
        contexts: ServingContexts | None = None,
    ) -> OnDemandTLS:
        """
        Build the service from a configuration: the only place that picks
        concrete classes.

        @param reactor: the reactor (nothing here imports the global one).
        @param storage: the storage to use instead of L{open_storage}'s.
        @param store: a certificate store to use instead of the
            configured one (you prepare it yourself).
        @param policy: a policy instead of the configured allow rules.
        @param issuer: an issuer instead of the configured CAs; failure
            backoff and one order per name still apply to it.
        @param contexts: the shared TLS contexts (pass ones made before
            forking workers, so that every worker resumes every other's
            sessions).
        @raise ConfigError: if the configuration names a store that cannot
            be opened.
        """
        return _build(
            cls, config, reactor, storage=storage, store=store, policy=policy, issuer=issuer, contexts=contexts
        )

    # -- what an application plugs in ---------------------------------------------

    def wrap(self, factory: IProtocolFactory) -> OnDemandTLSFactory:
        """
        The on-demand TLS factory around an application factory (a
        twisted.web C{Site}, a Klein app's C{Site}, any protocol factory):
        listen on it where HTTPS is served. Each accepted connection gets
        the certificate for its ClientHello's name, obtained first if
        needed, then speaks to a protocol from C{factory}; the Site
        negotiates HTTP/2 or HTTP/1.1 by ALPN.
        """
        return OnDemandTLSFactory(
            self.resolver,
            factory,  # type: ignore[arg-type]
            self.reactor,
            hello_timeout=self.config.hello_timeout,
            resolve_timeout=self.config.issue_timeout,
            challenge_context=self.tls_alpn.context_for,
            events=self.handshakes,
            max_connections=self.config.max_connections,
            max_per_address=self.config.max_connections_per_address,
        )

    def http_resource(self, https_port: int | Callable[[], int] = 443) -> HTTPRedirectRoot:
        """
        The port-80 root: ACME HTTP-01 answers under
        C{/.well-known/acme-challenge/}, a 308 redirect to HTTPS (on
        C{https_port}, or the port a callable returns at each request,
        such as the one a listener actually bound) for everything else.
        Serve it with C{Site(edge.http_resource())}.
        """
        return HTTPRedirectRoot(self.challenges, https_port=https_port)

    def challenge_resource(self) -> Resource:
        """
        Only the HTTP-01 answers, to mount at
        C{/.well-known/acme-challenge} in a port-80 site of your own.
        """
        return ChallengeResource(self.challenges)

    # -- lifetime -----------------------------------------------------------------------

    def startService(self) -> None:
        """
        Prepare, then start the child services, in this order:

          1. the store (directory created 0700; start-up refuses key
             files others can read);
          2. the local CA's root, created on first use;
          3. each ACME account key, created on first use, and its URL;
          4. the persisted failure backoff and issuance limits;
          5. a log line with the store, the issuers and the effective
             policy;
          6. renewal (its first walk runs at once, without jitter), cache
             refresh and the refusal summary.

        @raise StartupError: naming what is unusable and how to fix it.
        """
        self.prepare()
        self._log.info(
            "tenantedge {version} on-demand TLS: store {store}, issuer {issuer}",
            version=__version__, store=self.config.store, issuer=self.pipeline.name,
        )
        self._log_policy()
        super().startService()

    def prepare(self) -> None:
        """
        Steps 1 to 4 of L{startService} alone (idempotent): what a parent
        runs once before forking workers, so that they do not race to
        create the local CA's root or an account key.

        @raise StartupError: naming what is unusable and how to fix it.
        """
        for what, prepare in self.preparations:
            try:
                prepare()
            except StoreError as e:
                raise StartupError(str(e)) from None
            except OSError as e:
                raise StartupError(f"preparing {what}: {e}") from None

    def _log_policy(self) -> None:
        if not self.config.has_allow_rule:
            self._log.warn(
                "no allow-url, ask or allow-suffix is set: no certificate will ever be issued; "
                "only certificates already in the store are served"
            )
        else:
            self._log.info("certificates are issued on demand for {rules}", rules=self.config.describe_policy())
        if self.local_ca is not None:
            self._log.info(
                "local CA root certificate: {root} (give it to clients, e.g. curl --cacert {root})",
                root=self.local_ca.root_path,
            )

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
        for stop in self.on_stop:
            await stop()


def _precheck_resolver(config: OnDemandConfig, reactor: Any) -> Any:
    """
    The pre-checks' DNS resolver: C{precheck-resolver}'s servers, or the
    system's. A plain C{twisted.names.client.Resolver}, without
    C{createResolver}'s hosts file and cache: the checks must see what a
    CA sees, afresh.
    """
    from twisted.names import client

    servers = config.precheck_servers
    if servers:
        return client.Resolver(servers=servers, reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)


_log = Logger()


def _build(
    cls: type[OnDemandTLS],
    config: OnDemandConfig,
    reactor: Any,
    *,
    storage: Storage | None,
    store: ICertificateStore | None,
    policy: IDomainPolicy | None,
    issuer: IIssuer | None,
    contexts: ServingContexts | None = None,
) -> OnDemandTLS:
    if storage is None:
        if store is None:
            storage = open_storage(config, reactor)
        else:
            # The embedder's own store; challenges and the lock stay in this
            # process, and the state files beside the configured directory.
            storage = Storage(store, MemoryChallengeStore(), MemoryNameLock(), config.store)
    preparations: list[Preparation] = list(storage.preparations) if store is None else []
    store = store if store is not None else storage.store
    timings = Timings()
    # One pool for the CA and the allow endpoint (both verified HTTPS).
    api_pool = quiet_pool(HTTPConnectionPool(reactor, persistent=True))
    tls_alpn = TLSALPN01Responder(reactor, storage.challenges)
    responder = tls_alpn if config.challenge == "tls-alpn-01" else HTTP01Responder(storage.challenges)
    state = partial(os.path.join, storage.directory)

    local_ca: LocalCA | None = None
    acme_issuers: list[AcmeIssuer] = []
    shared = storage.shared_state
    backoff = FailureBackoff(state("backoff.json"), reactor, shared=shared("backoff") if shared else None)
    limits = IssuanceLimits(
        state("limits.json"),
        reactor,
        registered_domain,
        shared=shared("limits") if shared else None,
        max_concurrent=config.max_concurrent_issuance,
        max_new_orders=config.max_new_orders,
        max_per_domain=config.max_certs_per_domain,
    )
    precheck_results: Counter[str] = Counter()
    dns_resolver = LazyResolver(partial(_precheck_resolver, config, reactor))

    def prechecked(wrapped: IIssuer, checks: Sequence[Any]) -> IIssuer:
        if not checks:
            return wrapped
        return PrecheckedIssuer(wrapped, checks, precheck_results, renewals=config.precheck_renewals)

    if issuer is None:
        issuers: list[IIssuer] = []
        for ca in config.ca:
            if ca == "internal":
                local_ca = LocalCA(
                    state("localca"), reactor, validity=datetime.timedelta(seconds=config.internal_validity)
                )
                preparations.append(("the local CA", local_ca.prepare))
                issuers.append(local_ca)
                continue
            # Let's Encrypt's windows for its directories (or as configured);
            # any other CA gets only the concurrency bound.
            windows = config.limits_profile(ca) == "letsencrypt"
            acme = AcmeIssuer(
                AcmeClient(ca, None, acme_http_client(reactor, api_pool, config.ca_root), reactor,
                           user_agent=f"tenantedge/{__version__}"),
                storage.accounts(os.path.basename(account_directory("", ca))) if storage.accounts
                else AccountStore(account_directory(storage.directory, ca)),
                responder,
                reactor,
                email=config.email,
                eab=config.eab,
                key_type=config.key_type,
                run_blocking=_run_blocking(reactor),
                on_replaces_refused=limits if windows else None,
            )
            preparations.append((f"the ACME account for {ca}", acme.prepare))
            acme_issuers.append(acme)
            caa: list[Any] = []
            if "dns" in config.precheck:
                identity = config.caa_identity_for(ca)
                if identity is None:
                    _log.info("no CAA identity known for {ca}: its CAA is not pre-checked (give caa-identity)", ca=ca)
                else:
                    caa.append(CAAPrecheck(dns_resolver, identity, reactor, ca=ca, timeout=config.precheck_timeout))
            issuers.append(prechecked(LimitedIssuer(acme, limits, exemption=acme, windows=windows), caa))
        chain: IIssuer = issuers[0] if len(issuers) == 1 else FallbackIssuer(issuers)
    else:
        chain = issuer
    lifecycle = HostnameLifecycle(
        state("lifecycle.json"), reactor, retire_after=config.retire_after,
        shared=_lifecycle_records(storage),
        next_retry=backoff.blocked_until,
    )
    webhooks: WebhookOutbox | None = None
    if config.webhook:
        webhooks = WebhookOutbox(
            config.webhook,
            config.webhook_secrets,
            config.webhook_directory,
            HTTPClient(Agent(reactor, contextFactory=https_policy(), pool=api_pool)),
            reactor,
        )
        preparations.append(("the webhook outbox", webhooks.prepare))
        lifecycle.subscribe(lifecycle_webhook(webhooks.emit))
    checks: list[Any] = []
    if "dns" in config.precheck:
        checks.append(
            DNSPrecheck(dns_resolver, frozenset(config.public_address), reactor, timeout=config.precheck_timeout)
        )
    if "reach" in config.precheck:
        plain = HTTPClient(Agent(reactor, pool=api_pool))
        checks.append(
            ReachPrecheck(plain, storage.challenges, dns_resolver, reactor, timeout=config.precheck_timeout,
                          private=config.allow_private_suffix)
        )
    chain = prechecked(chain, checks)
    preparations.append(("the failure backoff", backoff.load))
    preparations.append(("the hostname lifecycle", lifecycle.load))
    preparations.append(("the issuance limits", limits.load))

    checker: AllowChecker | None = None
    if policy is None:
        if config.allow_url or config.ask:
            checker = AllowChecker(
                config.allow_url or config.ask,  # type: ignore[arg-type]
                caddy_style=bool(config.ask),
                http=HTTPClient(Agent(reactor, contextFactory=https_policy(config.allow_ca), pool=api_pool)),
                clock=reactor,
                timeout=config.allow_timeout,
                allow_ttl=config.allow_ttl,
                deny_ttl=config.deny_ttl,
                max_in_flight=config.max_allow_checks,
            )
        policy = EdgePolicy(config.static_policy, checker,
                            on_decision=lambda host, decision: lifecycle.decided(host, decision.value))

    check = CertificateCheck(reactor, local_ca_check(local_ca) if issuer is None else (lambda bundle: True))
    pipeline = IssuancePipeline(
        store, BackoffIssuer(chain, backoff), reactor, check, lock=storage.lock, observe=timings.observe_issuance,
        lifecycle=lifecycle,
    )
    rotation: list[Any] = []
    if contexts is None:
        contexts = ServingContexts()
        # Keys of our own: rotate them on schedule (a supervisor that passed
        # its contexts rotates them itself).
        rotation.append(periodic(config.ticket_key_lifetime, contexts.rotate, reactor, "ticket-keys"))
    # OCSP responders are plain HTTP as a rule (the response is signed);
    # an https:// one is verified like any other server.
    stapler = OcspStapler(
        store,
        HTTPClient(Agent(reactor, contextFactory=https_policy(), pool=api_pool)),
        reactor,
        # Bound late: the renewal service is built below, from the
        # resolver that tells this stapler what it caches.
        lambda name, bundle: renewal.renew_logged(name, bundle),
    )
    resolver = CertificateResolver(
        store, policy, pipeline, reactor, check, cache_size=config.cache_size, make_context=contexts.tenant,
        observer=stapler,
    )
    renewal = RenewalService(
        store,
        pipeline,
        policy,
        resolver.remember,
        resolver.forget,
        reactor,
        interval=config.renew_check_interval,
        renew_before=config.renew_before,
        window=acme_issuers[0].renewal_window if acme_issuers else None,
        leader=storage.leader,
        expiring=ExpiryNotices(webhooks.emit) if webhooks is not None else None,
        lifecycle=lifecycle,
    )
    refresher = periodic(config.store_poll, resolver.refresh_changed_logged, reactor, "store-refresher")
    if storage.attach is not None:
        storage.attach(resolver.forget, resolver.resync_logged, timings.registry)
    summary = RefusalSummary(resolver.events)
    summarising = periodic(summary.interval, summary.summarise, reactor, "refusal-summary")
    return cls(
        config=config,
        reactor=reactor,
        store=store,
        challenges=storage.challenges,
        policy=policy,
        pipeline=pipeline,
        resolver=resolver,
        renewal=renewal,
        tls_alpn=tls_alpn,
        timings=timings,
        handshakes=Counter(),
        allow_results=checker.results if checker is not None else None,
        local_ca=local_ca,
        acme_issuers=tuple(acme_issuers),
        backoff=backoff,
        lifecycle=lifecycle,
        precheck_results=precheck_results if config.precheck else None,
        preparations=tuple(preparations),
        contexts=contexts,
        children=(*storage.services, refresher, summarising, *rotation),
        on_stop=(api_pool.closeCachedConnections,),
        webhooks=webhooks,
        ocsp=stapler,
    )
