"""
The admin endpoint (C{--admin}, loopback by default): Prometheus metrics,
the hostname API (L{tenantedge.api}, C{/v1/...}) and the deprecated
actions the admin CLI used before it::

  GET  /metrics                 Prometheus text format
  GET  /v1/openapi.json         the hostname API's OpenAPI document
  ...  /v1/hostnames...         the hostname API (bearer token)
  POST /certs/<host>/issue      (deprecated: PUT /v1/hostnames/<host>)
                                obtain a certificate now, through the
                                server's policy, limits and issuers
                                (nothing is ordered for a name that
                                already has a valid one)
  POST /certs/<host>/renew      renew now (re-asks the policy first)
  POST /certs/<host>/forget     drop the cached context (the next
                                handshake reads the store)

It listens on 127.0.0.1 unless told otherwise. Every request is checked
first:

  - its C{Host} must be one of the admin names (C{--admin-name}, by
    default C{localhost}, C{127.0.0.1}, C{::1} and the address it binds),
    or it gets 421: a web page whose name an attacker points at 127.0.0.1
    (DNS rebinding) cannot talk to it. (A worker's private UNIX socket
    skips this check; the supervisor makes it.)
  - with C{--admin-token-file}, everything but C{/metrics} and
    C{/v1/openapi.json} needs C{Authorization: Bearer <token>}, compared
    in constant time (401 otherwise), the deprecated C{/certs} routes
    included. Without a token file C{/v1} answers 403 and the C{/certs}
    routes keep their old rule (the C{X-Tenantedge-Admin: 1} header):
    anyone who can reach the endpoint can trigger issuance then, so keep it
    on loopback.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .api import HostnameAPI, HostnameResource
from .headers import ADMIN_HEADER
from .hostnames import InvalidHostname, normalize
from .interfaces import ICertificateStore, PolicyRefusal

__all__ = ["AdminResource", "AdminActions", "ADMIN_HEADER", "AdminGuard", "host_of", "bound_names"]



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


def host_of(header: bytes | None) -> str | None:
    """The host part of a C{Host} header, lower case, without port or brackets (C{None} if unreadable)."""
    if not header:
        return None
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else None
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text or None


def bound_names(description: str | None) -> tuple[str, ...]:
    """
    The address an admin endpoint description binds (its C{interface=}),
    as read by Twisted's own parser, for the Host check; nothing for a
    wildcard or non-TCP endpoint.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    if description is None:
        return ()
    reactor = MemoryReactor()
    try:
        serverFromString(reactor, description).listen(Factory())
    except Exception:
        return ()
    if not reactor.tcpServers:
        return ()
    interface = reactor.tcpServers[0][3]
    return () if interface in ("", "0.0.0.0", "::") else (interface.lower(),)


class AdminGuard:
    """
    The checks every admin request passes first (see the module docstring).

    @ivar token: the bearer token, or C{None} (no token file).
    @ivar names: the accepted C{Host} names, or C{None} not to check (a
        worker's private UNIX socket).
    """

    def __init__(self, token: str | None, names: Iterable[str] | None) -> None:
        self.token = token.encode("ascii") if token is not None else None
        self.names = None if names is None else frozenset(n.lower() for n in names)

    def host_refusal(self, request: Request) -> tuple[int, dict[str, Any]] | None:
        """421 for a C{Host} that is not an admin name."""
        if self.names is None:
            return None
        host = host_of(request.getHeader(b"host"))
        if host is None or host not in self.names:
            return 421, {"error": "misdirected", "detail": "the Host header is not an admin name (--admin-name)"}
        return None

    def token_refusal(self, request: Request) -> tuple[int, dict[str, Any]] | None:
        """401 without the right bearer token (403 when no token is configured)."""
        if self.token is None:
            return 403, {"error": "disabled",
                         "detail": "the hostname API needs a token: start the server with --admin-token-file"}
        given = request.getHeader(b"authorization") or b""
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self.token):
            request.setHeader(b"www-authenticate", b'Bearer realm="tenantedge"')
            return 401, {"error": "unauthorized", "detail": "send Authorization: Bearer <the --admin-token-file token>"}
        return None


class _Refused(Resource):
    isLeaf = True

    def __init__(self, code: int, body: dict[str, Any]) -> None:
        super().__init__()
        self.code = code
        self.body = body

    def render(self, request: Request) -> bytes:
        return _json(request, self.code, self.body)


class AdminResource(Resource):
    """
    The admin site's root.

    @param api: the hostname API, or C{None} for none.
    @param guard: the Host and token checks; by default none (tests,
        embedders that put their own in front).
    """

    def __init__(self, registry: CollectorRegistry, actions: dict[str, Callable[[str], Deferred[Any]]],
                 api: HostnameAPI | None = None, guard: AdminGuard | None = None) -> None:
        super().__init__()
        self.guard = guard if guard is not None else AdminGuard(None, None)
        self.putChild(b"metrics", MetricsResource(registry))
        self.putChild(b"certs", _CertAction(actions))
        if api is not None:
            self.putChild(b"v1", HostnameResource(api))

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        refusal = self.guard.host_refusal(request)
        if refusal is None and path == b"certs" and self.guard.token is not None:
            refusal = self.guard.token_refusal(request)
        if refusal is None and path == b"v1" and request.postpath != [b"openapi.json"]:
            refusal = self.guard.token_refusal(request)
        if refusal is not None:
            return _Refused(*refusal)
        if path == b"":
            return self  # GET / is the index below, not a 404
        child: Resource = super().getChildWithDefault(path, request)
        return child

    def render(self, request: Request) -> bytes:
        refusal = self.guard.host_refusal(request)
        if refusal is not None:
            return _json(request, *refusal)
        result: bytes = super().render(request)
        return result

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return (b"tenantedge admin: GET /metrics, the hostname API under /v1 (GET /v1/openapi.json), "
                b"deprecated: POST /certs/<host>/(issue|renew|forget)\n")
