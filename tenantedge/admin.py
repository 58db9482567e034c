"""
The admin endpoint (C{--admin}, loopback by default): Prometheus metrics,
and the actions the admin CLI asks the running server to take::

  GET  /metrics                 Prometheus text format
  POST /certs/<host>/issue      obtain a certificate now, through the
                                server's policy, limits and issuers
                                (nothing is ordered for a name that
                                already has a valid one)
  POST /certs/<host>/renew      renew now (re-asks the policy first)
  POST /certs/<host>/forget     drop the cached context (the next
                                handshake reads the store)

It listens on 127.0.0.1 unless told otherwise: anyone who can reach it can
trigger issuance, so keep it on loopback or behind a firewall.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .headers import ADMIN_HEADER
from .hostnames import InvalidHostname, normalize
from .interfaces import ICertificateStore, PolicyRefusal

__all__ = ["AdminResource", "AdminActions", "ADMIN_HEADER"]



@attrs.define
class AdminActions:
    """
    What C{POST /certs/<host>/<action>} does, given the pieces it acts on.

    @ivar store: read before and after, to report what changed.
    @ivar context_for: the resolver's lookup (policy, limits, issuance).
    @ivar renew: the renewal service's C{renew(host, bundle)}.
    @ivar forget: drops a name from the handshake cache.
    """

    store: ICertificateStore
    context_for: Callable[[str], Deferred[Any]]
    renew: Callable[[str, Any], Any]
    forget: Callable[[str], None]

    def table(self) -> dict[str, Callable[[str], Deferred[Any]]]:
        """The actions by name, each returning a Deferred of a JSON-able dict."""
        return {
            name: (lambda f: lambda host: Deferred.fromCoroutine(f(host)))(f)
            for name, f in (("issue", self.issue), ("renew", self.renew_now), ("forget", self.forget_now))
        }

    async def _current(self, host: str) -> Any:
        try:
            return await self.store.get(host)
        except KeyError:
            return None

    async def issue(self, host: str) -> dict[str, Any]:
        before = await self._current(host)
        await self.context_for(host)
        after = await self._current(host)
        if after is None:
            raise RuntimeError("the certificate was obtained but could not be stored; see the server log")
        issued = before is None or after.leaf.serial_number != before.leaf.serial_number
        return {"issued": issued, "not_after": after.leaf.not_valid_after_utc.isoformat()}

    async def renew_now(self, host: str) -> dict[str, Any]:
        bundle = await self.store.get(host)
        not_after = await self.renew(host, bundle)
        if not_after is None:
            return {"archived": True}
        current = await self.store.get(host)
        if current.leaf.serial_number == bundle.leaf.serial_number:
            raise RuntimeError("renewal failed; see the server log")
        return {"renewed": True, "not_after": current.leaf.not_valid_after_utc.isoformat()}

    async def forget_now(self, host: str) -> dict[str, Any]:
        self.forget(host)
        return {}


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
        assert request.postpath is not None  # set by resource traversal
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


class MetricsResource(Resource):
    """
    The Prometheus text exposition of a registry, rendered in the reactor
    thread (prometheus_client's own Twisted resource goes through WSGI and
    a thread pool, and cannot serve a UNIX socket, which a worker's admin
    endpoint is).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class AdminResource(Resource):
    """The admin site's root."""

    def __init__(self, registry: CollectorRegistry, actions: dict[str, Callable[[str], Deferred[Any]]]) -> None:
        super().__init__()
        self.putChild(b"metrics", MetricsResource(registry))
        self.putChild(b"certs", _CertAction(actions))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self  # GET / is the index below, not a 404
        child: Resource = super().getChild(path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"tenantedge admin: GET /metrics, POST /certs/<host>/(issue|renew|forget)\n"
