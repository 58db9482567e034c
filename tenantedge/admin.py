"""
The admin endpoint (C{--admin}, loopback by default): Prometheus metrics,
and the actions the admin CLI asks the running server to take.

  GET  /metrics                 Prometheus text format
  POST /certs/<host>/issue      obtain a certificate now, through the
                                server's policy, limits and issuers
  POST /certs/<host>/renew      renew now (re-asks the policy first)
  POST /certs/<host>/forget     drop the cached context (the next
                                handshake reads the store)

It listens on 127.0.0.1 unless told otherwise: anyone who can reach it can
trigger issuance, so keep it on loopback or behind a firewall.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .hostnames import InvalidHostname, normalize
from .interfaces import PolicyRefusal

__all__ = ["AdminResource", "EdgeMetrics", "ADMIN_HEADER"]

#: Required on every admin POST (a CSRF guard).
ADMIN_HEADER = b"X-Tenantedge-Admin"


class EdgeMetrics:
    """
    The metrics: counters read at scrape time from the components' own
    counters (so nothing is counted twice), histograms observed as things
    happen.
    """

    def __init__(self, edge: Any) -> None:
        self.edge = edge
        self.registry = CollectorRegistry(auto_describe=True)
        self.issuance_seconds = Histogram(
            "tenantedge_issuance_seconds",
            "Time to obtain a new certificate (store miss to certificate in hand).",
            ["result"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 90, 180, 300),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "tenantedge_proxied_request_seconds",
            "Time from request to backend response headers, by status class.",
            ["status_class"],
            registry=self.registry,
        )
        self.registry.register(self)

    def observe_issuance(self, seconds: float, ok: bool) -> None:
        self.issuance_seconds.labels("issued" if ok else "failed").observe(seconds)

    def observe_request(self, status: int, seconds: float) -> None:
        self.request_seconds.labels(f"{status // 100}xx").observe(seconds)

    def collect(self) -> Iterator[Any]:
        edge = self.edge
        resolver = edge.resolver
        handshakes = CounterMetricFamily("tenantedge_handshakes", "TLS handshakes by outcome.", labels=["outcome"])
        for outcome, count in sorted(edge.tls_factory.events.items()):
            handshakes.add_metric([outcome], count)
        yield handshakes
        issuance = CounterMetricFamily(
            "tenantedge_certificate_lookups", "Certificate lookups by result (cache, store, issuance).",
            labels=["result"],
        )
        refusals = CounterMetricFamily(
            "tenantedge_refusals", "Names refused a certificate, by reason.", labels=["reason"]
        )
        for key, count in sorted(resolver.events.items()):
            if key.startswith("refused:"):
                refusals.add_metric([key.split(":", 1)[1]], count)
            else:
                issuance.add_metric([key], count)
        yield issuance
        yield refusals
        checker = getattr(resolver.policy, "checker", None)
        allow = CounterMetricFamily("tenantedge_allow_checks", "Allow endpoint checks by result.", labels=["result"])
        if checker is not None:
            for result, count in sorted(checker.results.items()):
                allow.add_metric([result], count)
        yield allow
        cached = GaugeMetricFamily("tenantedge_certificates_cached", "Ready TLS contexts in memory.")
        cached.add_metric([], resolver.cache_length())
        yield cached
        renewal = edge.renewal
        if renewal is not None:
            renewals = CounterMetricFamily("tenantedge_renewals", "Renewal events.", labels=["event"])
            for event, count in sorted(renewal.events.items()):
                renewals.add_metric([event], count)
            yield renewals
            stored = GaugeMetricFamily(
                "tenantedge_certificates_stored", "Certificates in the store at the last renewal walk."
            )
            stored.add_metric([], renewal.stored_count)
            yield stored
            if renewal.soonest_expiry is not None:
                soonest = GaugeMetricFamily(
                    "tenantedge_certificate_soonest_expiry_timestamp_seconds",
                    "Not-after (POSIX time) of the certificate that expires first.",
                )
                soonest.add_metric([], renewal.soonest_expiry)
                yield soonest


class _CertAction(Resource):
    isLeaf = True
    _log = Logger()

    def __init__(self, actions: dict[str, Callable[[str], Deferred[Any]]]) -> None:
        super().__init__()
        self.actions = actions

    def render_POST(self, request: Request) -> bytes | int:
        if request.getHeader(ADMIN_HEADER) != b"1":
            # A browser on this host cannot set a custom header on a
            # cross-origin POST without a preflight, which this endpoint
            # never grants: web pages cannot trigger orders.
            return _json(request, 403, {"error": f"send {ADMIN_HEADER.decode()}: 1 (the CLI does)"})
        parts = [p.decode("ascii", "replace") for p in request.postpath]
        if len(parts) != 2 or parts[1] not in self.actions:
            return _json(request, 404, {"error": "use POST /certs/<host>/(issue|renew|forget)"})
        try:
            host = normalize(parts[0])
        except InvalidHostname as e:
            return _json(request, 400, {"error": f"invalid host name: {e.reason}"})

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda f: gone.append(True))

        def done(result: Any) -> None:
            if gone:
                return  # the CLI gave up; the action still happened
            request.write(_json(request, 200, {"host": host, "action": parts[1], **(result or {})}))
            request.finish()

        def failed(failure: Any) -> None:
            if gone:
                return
            if failure.check(PolicyRefusal):
                code, message = 403, f"refused: {failure.value.reason}"
            elif failure.check(KeyError):
                code, message = 404, "no certificate stored for this name"
            else:
                code, message = 502, getattr(failure.value, "detail", None) or failure.getErrorMessage()
            request.write(_json(request, code, {"host": host, "action": parts[1], "error": message}))
            request.finish()

        self.actions[parts[1]](host).addCallbacks(done, failed)
        return NOT_DONE_YET


def _json(request: Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode() + b"\n"


class AdminResource(Resource):
    """The admin site's root."""

    def __init__(self, metrics: EdgeMetrics, actions: dict[str, Callable[[str], Deferred[Any]]]) -> None:
        super().__init__()
        self.putChild(b"metrics", MetricsResource(registry=metrics.registry))
        self.putChild(b"certs", _CertAction(actions))

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"tenantedge admin: GET /metrics, POST /certs/<host>/(issue|renew|forget)\n"
