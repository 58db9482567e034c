"""
Prometheus metrics: histograms observed as things happen (L{Timings}), and
counters read at scrape time from the components' own counters
(L{EdgeCollector}), so nothing is counted twice and the hot path only bumps
a C{Counter}.

Each piece takes exactly what it reads: the collector gets counters and
two small callables, never a whole service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .backend import BackendPool

__all__ = [
    "Timings",
    "EdgeCollector",
    "RenewalGauges",
    "LimitCollector",
    "HostnameCollector",
    "BackendCollector",
    "UpgradeCollector",
    "WebhookCollector",
    "OcspCollector",
]


class Timings:
    """
    The histograms, and the registry every tenantedge metric lives in.

    Built before the pipeline and the proxy, which are given its
    C{observe_*} methods.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.issuance_seconds = Histogram(
            "tenantedge_issuance_seconds",
            "Time to obtain a certificate from the issuer chain, by purpose (issue, renew) and result.",
            ["result", "purpose"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 90, 180, 300),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "tenantedge_proxied_request_seconds",
            "Time from request to backend response headers, by status class.",
            ["status_class"],
            registry=self.registry,
        )
        self._request_children = {
            f"{n}xx": self.request_seconds.labels(f"{n}xx") for n in range(1, 6)
        }

    def observe_issuance(self, purpose: str, result: str, seconds: float) -> None:
        """For L{tenantedge.pipeline.IssuancePipeline.observe}."""
        self.issuance_seconds.labels(result, purpose).observe(seconds)

    def observe_request(self, status: int, seconds: float) -> None:
        """For L{tenantedge.proxy.ProxyResource.observe}."""
        label = f"{status // 100}xx"
        child = self._request_children.get(label)
        (child if child is not None else self.request_seconds.labels(label)).observe(seconds)


@attrs.define
class RenewalGauges:
    """What the renewal walk last saw: stored certificates and the soonest expiry."""

    stored: Callable[[], int]
    soonest_expiry: Callable[[], float | None]


@attrs.define(eq=False)
class EdgeCollector:
    """
    A Prometheus collector over the components' counters.

    @ivar handshakes: TLS handshake outcomes (L{tenantedge.tls.OnDemandTLSFactory}).
    @ivar lookups: certificate lookups and refusals (the resolver's events).
    @ivar issuance: the pipeline's C{"<purpose>:<result>"} counts.
    @ivar allow: allow-endpoint check results, if an endpoint is configured.
    @ivar renewals: renewal events.
    @ivar renewal_gauges: stored count and soonest expiry.
    @ivar cache_length: ready contexts in memory.
    @ivar prechecks: pre-check results by C{"<check>:<result>"}
        (L{tenantedge.precheck.PrecheckedIssuer.results}), if any is on.
    """

    handshakes: Mapping[str, int]
    lookups: Mapping[str, int]
    issuance: Mapping[str, int]
    allow: Mapping[str, int] | None
    renewals: Mapping[str, int]
    renewal_gauges: RenewalGauges
    cache_length: Callable[[], int]
    prechecks: Mapping[str, int] | None = None

    def collect(self) -> Iterator[Any]:
        handshakes = CounterMetricFamily("tenantedge_handshakes", "TLS handshakes by outcome.", labels=["outcome"])
        for outcome, count in sorted(self.handshakes.items()):
            handshakes.add_metric([outcome], count)
        yield handshakes
        lookups = CounterMetricFamily(
            "tenantedge_certificate_lookups", "Certificate lookups by result (cache, store, issuance).",
            labels=["result"],
        )
        refusals = CounterMetricFamily(
            "tenantedge_refusals", "Names refused a certificate, by reason.", labels=["reason"]
        )
        for key, count in sorted(self.lookups.items()):
            if key.startswith("refused:"):
                refusals.add_metric([key.split(":", 1)[1]], count)
            else:
                lookups.add_metric([key], count)
        yield lookups
        yield refusals
        issuance = CounterMetricFamily(
            "tenantedge_issuance", "Issuance attempts by purpose (issue, renew) and result.",
            labels=["purpose", "result"],
        )
        for key, count in sorted(self.issuance.items()):
            purpose, _, result = key.partition(":")
            issuance.add_metric([purpose, result], count)
        yield issuance
        allow = CounterMetricFamily("tenantedge_allow_checks", "Allow endpoint checks by result.", labels=["result"])
        for result, count in sorted((self.allow or {}).items()):
            allow.add_metric([result], count)
        yield allow
        prechecks = CounterMetricFamily(
            "tenantedge_precheck", "Pre-checks before an ACME order by check (dns, caa, reach) and result (ok, "
            "dns-not-pointing-here, caa-forbids, unreachable, error).", labels=["check", "result"],
        )
        for key, count in sorted((self.prechecks or {}).items()):
            check, _, result = key.partition(":")
            prechecks.add_metric([check, result], count)
        yield prechecks
        cached = GaugeMetricFamily("tenantedge_certificates_cached", "Ready TLS contexts in memory.")
        cached.add_metric([], self.cache_length())
        yield cached
        renewals = CounterMetricFamily("tenantedge_renewals", "Renewal events.", labels=["event"])
        for event, count in sorted(self.renewals.items()):
            renewals.add_metric([event], count)
        yield renewals
        stored = GaugeMetricFamily(
            "tenantedge_certificates_stored", "Certificates in the store at the last renewal walk."
        )
        stored.add_metric([], self.renewal_gauges.stored())
        yield stored
        soonest_value = self.renewal_gauges.soonest_expiry()
        if soonest_value is not None:
            soonest = GaugeMetricFamily(
                "tenantedge_certificate_soonest_expiry_timestamp_seconds",
                "Not-after (POSIX time) of the certificate that expires first.",
            )
            soonest.add_metric([], soonest_value)
            yield soonest


@attrs.define(eq=False)
class HostnameCollector:
    """
    Hostnames by lifecycle state (L{tenantedge.lifecycle}):
    C{tenantedge_hostnames{state="active"}} and so on, every state present.
    The records are shared by every worker on a store, so with
    C{--workers} each worker reports the same numbers: aggregate with
    C{max without (worker)}, not C{sum}.

    @ivar counts: returns the records by state.
    """

    counts: Callable[[], Mapping[str, int]]

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("tenantedge_hostnames", "Hostnames by lifecycle state.", labels=["state"])
        for state, count in self.counts().items():
            family.add_metric([state], count)
        yield family


@attrs.define(eq=False)
class LimitCollector:
    """
    Connections and requests refused or closed by a limit of the request
    path, by reason: the HTTP/1.1 relay's (C{header-timeout} (408),
    C{idle-timeout}, C{head-too-large} (431), C{body-too-large} (413)), the
    HTTP/2 relay's (C{h2-rapid-reset}, C{h2-protocol-error}, C{h2-malformed},
    C{idle-timeout})
    and the PROXY header's (C{proxy-header-invalid}, C{proxy-header-timeout}).
    The connection caps are handshake outcomes
    (C{tenantedge_handshakes_total{outcome="refused-address-full"}}).

    @ivar limits: the counts (L{tenantedge.exchange.Relay.events}, shared
        with the PROXY header listeners).
    """

    limits: Mapping[str, int]

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "tenantedge_limits", "Connections and requests refused or closed by a limit, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.limits.items()):
            family.add_metric([reason], count)
        yield family


@attrs.define(eq=False)
class BackendCollector:
    """
    Per-backend metrics, read at scrape time from the counters each
    L{tenantedge.backend.BackendPool} keeps (plain integers the request
    path bumps: no label lookup per request). The label is the backend's
    URL without credentials (C{unix:/path} for a socket).

    @ivar pools: the backends, in C{--backend} order.
    """

    pools: Sequence[BackendPool]

    def collect(self) -> Iterator[Any]:
        labels = ["backend"]
        requests = CounterMetricFamily("tenantedge_backend_requests", "Requests given to each backend "
                                       "(a retry elsewhere counts on both).", labels=labels)
        failures = CounterMetricFamily("tenantedge_backend_failures", "Requests a backend failed before "
                                       "answering: no connection, reset or garbage.", labels=labels)
        up = GaugeMetricFamily("tenantedge_backend_up", "1 while the backend takes traffic, 0 while ejected "
                               "or failing its health check.", labels=labels)
        outstanding = GaugeMetricFamily("tenantedge_backend_outstanding_requests", "Requests in flight on each "
                                        "backend.", labels=labels)
        for pool in self.pools:
            name = [pool.name]
            requests.add_metric(name, pool.requests)
            failures.add_metric(name, pool.failures)
            up.add_metric(name, 1 if pool.up else 0)
            outstanding.add_metric(name, pool.outstanding)
        yield requests
        yield failures
        yield up
        yield outstanding


#: The results an upgrade request can have, each shown from zero.
UPGRADE_RESULTS = ("switched", "declined", "failed", "refused")


@attrs.define(eq=False)
class UpgradeCollector:
    """
    Upgrade (WebSocket) requests of the HTTP/1.1 relay by result, and the
    upgraded connections open now.

    @ivar results: L{tenantedge.exchange.Relay.upgrades}.
    @ivar open: how many upgraded connections are open.
    """

    results: Mapping[str, int]
    open: Callable[[], int]

    def collect(self) -> Iterator[Any]:
        upgrades = CounterMetricFamily(
            "tenantedge_upgrades", "HTTP/1.1 upgrade (WebSocket) requests by result.", labels=["result"]
        )
        for result in sorted(set(UPGRADE_RESULTS) | set(self.results)):
            upgrades.add_metric([result], self.results.get(result, 0))
        yield upgrades
        tunnels = GaugeMetricFamily(
            "tenantedge_upgraded_connections", "Upgraded (WebSocket) connections open, client to backend."
        )
        tunnels.add_metric([], self.open())
        yield tunnels


#: The results a webhook delivery can have, each shown from zero.
WEBHOOK_RESULTS = ("delivered", "failed-attempt", "gave-up", "dropped")


@attrs.define(eq=False)
class WebhookCollector:
    """
    Webhook deliveries by result and the events waiting
    (L{tenantedge.webhooks.WebhookOutbox}).

    @ivar results: the outbox's C{results}.
    @ivar queued: events waiting in this process's queues (0 in a worker
        that does not deliver).
    """

    results: Mapping[str, int]
    queued: Callable[[], int]

    def collect(self) -> Iterator[Any]:
        deliveries = CounterMetricFamily(
            "tenantedge_webhook_deliveries", "Webhook deliveries by result (failed-attempt: one try that will "
            "be retried; gave-up, dropped: an event lost).", labels=["result"],
        )
        for result in sorted(set(WEBHOOK_RESULTS) | set(self.results)):
            deliveries.add_metric([result], self.results.get(result, 0))
        yield deliveries
        queue = GaugeMetricFamily("tenantedge_webhook_queue", "Webhook events waiting for delivery, all URLs together.")
        queue.add_metric([], self.queued())
        yield queue


@attrs.define(eq=False)
class OcspCollector:
    """
    OCSP stapling: responder fetches by result (each result shown from
    zero) and how many certificates have a response stapled now.

    @ivar fetches: L{tenantedge.ocsp.OcspStapler.results}.
    @ivar stapled: how many certificates staple a response right now.
    """

    fetches: Mapping[str, int]
    stapled: Callable[[], int]

    def collect(self) -> Iterator[Any]:
        from .ocsp import RESULTS

        fetches = CounterMetricFamily(
            "tenantedge_ocsp_fetches", "OCSP responder fetches by result (good, revoked, unknown, failed, invalid).",
            labels=["result"],
        )
        for result in sorted(set(RESULTS) | set(self.fetches)):
            fetches.add_metric([result], self.fetches.get(result, 0))
        yield fetches
        stapled = GaugeMetricFamily(
            "tenantedge_ocsp_stapled_certificates", "Cached certificates with a valid OCSP response stapled."
        )
        stapled.add_metric([], self.stapled())
        yield stapled
