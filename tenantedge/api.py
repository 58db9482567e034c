"""
The hostname API, version 1: JSON over the admin endpoint, described by
the OpenAPI 3.1 document L{OPENAPI} (served at C{GET /v1/openapi.json})::

  GET    /v1/hostnames[?state=&cursor=&limit=]   one page of names, by name
  GET    /v1/hostnames/{name}                    one name's lifecycle
  PUT    /v1/hostnames/{name}                    pre-issue (same policy and
                                                 limits as a first handshake)
  DELETE /v1/hostnames/{name}                    archive
  POST   /v1/hostnames/{name}/renew[?force=true] renew, if due (or forced)

Every call but the document needs C{Authorization: Bearer <token>}, the
token of C{--admin-token-file} (compared in constant time); without a
token file the API answers 403 to everything. The C{Host} check and the
token check happen in L{tenantedge.admin}; this module is the API itself.

C{POST .../renew} does not spend an order on a certificate that is not
due: repeated calls answer C{"renewed": false, "reason": "not-due"} until
the renewal point, unless C{?force=true}.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import attrs
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .certificates import CertificateBundle
from .hostnames import InvalidHostname, normalize
from .interfaces import BackedOff, ICertificateStore, IssuanceFailed, LimitExceeded, PolicyRefusal
from .lifecycle import ACTIVE, ARCHIVED, PENDING, STATES, HostnameLifecycle, HostnameRecord

__all__ = ["HostnameAPI", "HostnameResource", "OPENAPI", "APIError"]

#: Largest page of C{GET /v1/hostnames}.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


class APIError(Exception):
    """
    An answer other than 200, with its JSON body.

    @ivar code: the HTTP status.
    @ivar error: a short machine-friendly reason.
    @ivar detail: what a person should read.
    """

    def __init__(self, code: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.error = error
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": self.error, "detail": self.detail, **self.extra}


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat()


def _key_type(bundle: CertificateBundle) -> str:
    key = bundle.leaf.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name, f"ecdsa-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa{key.key_size}"
    return type(key).__name__


@attrs.define
class HostnameAPI:
    """
    What the API does, given the pieces it acts on.

    @ivar store: certificates (read for the active details; archive).
    @ivar lifecycle: the records.
    @ivar clock: for "is it due".
    @ivar context_for: the resolver's lookup: policy, limits and issuance,
        exactly as a first handshake.
    @ivar schedule: the renewal service's C{schedule(name, bundle)}
        (renewal point and ARI window).
    @ivar renew: the renewal service's C{renew(name, bundle)} (re-asks
        the policy; archives on a definite deny).
    @ivar forget: drops a name from the handshake cache.
    """

    store: ICertificateStore
    lifecycle: HostnameLifecycle
    clock: IReactorTime
    context_for: Callable[[str], Deferred[Any]]
    schedule: Callable[[str, CertificateBundle], Any]
    renew: Callable[[str, CertificateBundle], Any]
    forget: Callable[[str], None]

    async def _bundle(self, host: str) -> CertificateBundle | None:
        try:
            bundle: CertificateBundle = await self.store.get(host)
        except KeyError:
            return None
        return bundle

    async def describe(self, host: str, record: HostnameRecord | None = None,
                       bundle: CertificateBundle | None = None, read: bool = True) -> dict[str, Any]:
        """
        A name's lifecycle as the API shows it.

        @raise APIError: 404 for a name with neither a record nor a certificate.
        """
        record = record if record is not None else self.lifecycle.get(host)
        if bundle is None and read:
            bundle = await self._bundle(host)
        if record is None and bundle is None:
            raise APIError(404, "not-found", f"{host} has no record and no stored certificate")
        state = record.state if record is not None else ACTIVE
        if bundle is not None and state in (PENDING, ARCHIVED):
            state = ACTIVE  # stored since (by another process, the CLI)
        out: dict[str, Any] = {
            "name": host,
            "state": state,
            "since": _iso(record.since) if record is not None else None,
            "decision": record.decision if record is not None else None,
            "decided_at": _iso(record.decided_at) if record is not None else None,
            "attempts": record.attempts if record is not None else 0,
            "problem_type": record.problem_type if record is not None else None,
            "problem_detail": record.problem_detail if record is not None else None,
            "next_retry": _iso(record.next_retry) if record is not None else None,
            "certificate": None,
        }
        if bundle is not None:
            due, window = await self.schedule(host, bundle)
            out["certificate"] = {
                "not_before": _iso(bundle.not_before),
                "not_after": _iso(bundle.not_after),
                "issuer": bundle.issuer_name(),
                "key_type": _key_type(bundle),
                "serial": format(bundle.leaf.serial_number, "x"),
                "next_renewal": _iso(due),
                "ari_window": None if window is None else {"start": _iso(window[0]), "end": _iso(window[1])},
            }
        return out

    async def list(self, state: str | None, cursor: str | None, limit: int) -> dict[str, Any]:
        """One page of names after C{cursor} (a name), sorted, optionally of one state."""
        records = {r.host: r for r in self.lifecycle.records()}
        names = sorted(set(records) | set(await self.store.names()))
        if cursor is not None:
            names = [n for n in names if n > cursor]
        if state is not None:
            # Only names that can be in that state are described (each a
            # store read, maybe an ARI lookup): a rare state among 100,000
            # names must not cost 100,000 of them. A name without a record
            # is active; a pending or archived one with a certificate is
            # described as active too.
            def may_be(name: str) -> bool:
                record = records.get(name)
                if record is None:
                    return state == ACTIVE
                return record.state == state or (state == ACTIVE and record.state in (PENDING, ARCHIVED))

            names = [n for n in names if may_be(n)]
        items: list[dict[str, Any]] = []
        more = False
        for name in names:
            try:
                item = await self.describe(name, records.get(name))
            except APIError:
                continue  # removed meanwhile
            if state is not None and item["state"] != state:
                continue
            if len(items) == limit:
                more = True
                break
            items.append(item)
        return {"items": items, "next_cursor": items[-1]["name"] if more and items else None}

    async def put(self, host: str) -> dict[str, Any]:
        """Pre-issue: an API call revives a retired name; then as a first handshake would."""
        self.lifecycle.revive(host)
        before = await self._bundle(host)
        try:
            await self.context_for(host)
        except PolicyRefusal as e:
            raise APIError(403, "refused", f"the policy refuses {host}: {e.reason}", reason=e.reason) from None
        except (BackedOff, LimitExceeded) as e:
            retry = getattr(e, "until", None)
            retry = retry - self.clock.seconds() if retry is not None else getattr(e, "retry_after", None)
            raise APIError(429, "not-now", e.detail, retry_after=retry) from None
        except IssuanceFailed as e:
            raise APIError(502, "issuance-failed", e.detail,
                           problem_type=getattr(e, "problem_type", None)) from None
        after = await self._bundle(host)
        out = await self.describe(host, bundle=after)
        out["issued"] = after is not None and (before is None or after.leaf.serial_number != before.leaf.serial_number)
        return out

    async def delete(self, host: str) -> dict[str, Any]:
        """Archive the name: its certificate moves to the store's archive (keys are kept)."""
        record = self.lifecycle.get(host)
        try:
            await self.store.delete(host)
        except KeyError:
            if record is None:
                raise APIError(404, "not-found", f"{host} has no record and no stored certificate") from None
        self.forget(host)
        self.lifecycle.archived(host)
        return await self.describe(host, read=False)

    async def renew_now(self, host: str, force: bool) -> dict[str, Any]:
        """Renew, unless not due and not forced (so repeated calls do not spend orders)."""
        bundle = await self._bundle(host)
        if bundle is None:
            raise APIError(404, "not-found", f"no certificate is stored for {host}")
        due, _ = await self.schedule(host, bundle)
        if not force and self.clock.seconds() < due and bundle.is_valid_at(self.clock.seconds()):
            out = await self.describe(host, bundle=bundle)
            return {**out, "renewed": False, "reason": "not-due"}
        self.lifecycle.revive(host)
        not_after = await self.renew(host, bundle)
        if not_after is None:
            out = await self.describe(host, read=False)
            return {**out, "renewed": False, "reason": "archived"}
        current = await self._bundle(host)
        if current is None or current.leaf.serial_number == bundle.leaf.serial_number:
            record = self.lifecycle.get(host)
            raise APIError(502, "renewal-failed",
                           (record.problem_detail if record is not None else None) or "renewal failed; see the log",
                           problem_type=record.problem_type if record is not None else None)
        out = await self.describe(host, bundle=current)
        return {**out, "renewed": True}


def _one(query: dict[bytes, list[bytes]], key: bytes) -> str | None:
    values = query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise APIError(400, "bad-request", f"give {key.decode()} once")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "bad-request", f"{key.decode()} is not UTF-8") from None


def _query(request: Request) -> dict[bytes, list[bytes]]:
    _, _, raw = (request.uri or b"").partition(b"?")
    try:
        parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise APIError(400, "bad-request", "the query string is not UTF-8") from None
    return {k.encode(): [v.encode() for v in vs] for k, vs in parsed.items()}


def _flag(value: str | None) -> bool:
    if value is None or value in ("false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise APIError(400, "bad-request", "force is true or false")


def _write(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


class HostnameResource(Resource):
    """
    C{/v1/...}: routes to L{HostnameAPI}. Authentication is checked by the
    caller (L{tenantedge.admin.AdminResource}).
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, api: HostnameAPI) -> None:
        super().__init__()
        self.api = api

    def render(self, request: Request) -> bytes | int:
        try:
            call = self._route(request)
        except APIError as e:
            return _write(request, e.code, e.body())
        if not isinstance(call, Deferred):
            return _write(request, 200, call)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda f: gone.append(True))

        def done(result: Any) -> None:
            if not gone:
                request.write(_write(request, 200, result))
                request.finish()

        def failed(failure: Any) -> None:
            if gone:
                return
            if failure.check(APIError):
                code, body = failure.value.code, failure.value.body()
            else:
                self._log.failure("hostname API call {method} {path} failed", failure,
                                  method=request.method, path=request.path)
                code, body = 500, {"error": "internal", "detail": failure.getErrorMessage()}
            request.write(_write(request, code, body))
            request.finish()

        call.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _route(self, request: Request) -> Any:
        assert request.postpath is not None
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        method = request.method
        if parts == ["openapi.json"]:
            if method not in (b"GET", b"HEAD"):
                raise APIError(405, "method-not-allowed", "GET only")
            return OPENAPI
        if not parts or parts[0] != "hostnames":
            raise APIError(404, "not-found", "see GET /v1/openapi.json")
        query = _query(request)
        if len(parts) == 1 or parts[1:] == [""]:
            if method != b"GET":
                raise APIError(405, "method-not-allowed", "GET only")
            state = _one(query, b"state")
            if state is not None and state not in STATES:
                raise APIError(400, "bad-request", f"state is one of {', '.join(STATES)}")
            limit_text = _one(query, b"limit")
            try:
                limit = DEFAULT_LIMIT if limit_text is None else int(limit_text)
            except ValueError:
                raise APIError(400, "bad-request", "limit is a number") from None
            if not 1 <= limit <= MAX_LIMIT:
                raise APIError(400, "bad-request", f"limit is from 1 to {MAX_LIMIT}")
            return Deferred.fromCoroutine(self.api.list(state, _one(query, b"cursor"), limit))
        try:
            host = normalize(parts[1])
        except InvalidHostname as e:
            raise APIError(400, "invalid-name", f"invalid host name: {e.reason}") from None
        if len(parts) == 2:
            if method == b"GET":
                return Deferred.fromCoroutine(self.api.describe(host))
            if method == b"PUT":
                return Deferred.fromCoroutine(self.api.put(host))
            if method == b"DELETE":
                return Deferred.fromCoroutine(self.api.delete(host))
            raise APIError(405, "method-not-allowed", "GET, PUT or DELETE")
        if parts[2:] == ["renew"]:
            if method != b"POST":
                raise APIError(405, "method-not-allowed", "POST only")
            force = _flag(_one(query, b"force"))
            return Deferred.fromCoroutine(self.api.renew_now(host, force))
        raise APIError(404, "not-found", "see GET /v1/openapi.json")


# -- the OpenAPI document -------------------------------------------------------------------------

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

_ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
}

_HOSTNAME = {
    "type": "object",
    "required": ["name", "state", "attempts", "certificate"],
    "properties": {
        "name": {"type": "string"},
        "state": {"type": "string", "enum": list(STATES)},
        "since": _NULLABLE_TIME,
        "decision": {"type": ["string", "null"], "enum": ["allow", "deny", "unknown", None]},
        "decided_at": _NULLABLE_TIME,
        "attempts": {"type": "integer", "minimum": 0},
        "problem_type": {"type": ["string", "null"]},
        "problem_detail": {"type": ["string", "null"]},
        "next_retry": _NULLABLE_TIME,
        "certificate": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["not_before", "not_after", "issuer", "key_type", "serial", "next_renewal"],
                    "properties": {
                        "not_before": {"type": "string", "format": "date-time"},
                        "not_after": {"type": "string", "format": "date-time"},
                        "issuer": {"type": "string"},
                        "key_type": {"type": "string"},
                        "serial": {"type": "string"},
                        "next_renewal": {"type": "string", "format": "date-time"},
                        "ari_window": {
                            "oneOf": [
                                {"type": "null"},
                                {"type": "object", "properties": {
                                    "start": {"type": "string", "format": "date-time"},
                                    "end": {"type": "string", "format": "date-time"},
                                }},
                            ]
                        },
                    },
                },
            ]
        },
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


#: The names the document promises the API takes: LDH labels (no double
#: hyphen) under a letter-led top label; upper case is folded. The API
#: also takes what this leaves out (IDNA A-labels, longer labels).
NAME_PATTERN = r"^([A-Za-z0-9]{1,20}(-[A-Za-z0-9]{1,20}){0,2}\.){1,6}[A-Za-z][A-Za-z0-9]{0,20}$"

_NAME = {"name": "name", "in": "path", "required": True,
         "description": "A host name (normalised: IDNA A-labels, lower case).",
         "schema": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 253}}
_HOST_REF = {"$ref": "#/components/schemas/Hostname"}
_COMMON = {"400": _error("An invalid name or parameter."), "401": _error("No or a wrong bearer token."),
           "403": _error("The API is disabled (no --admin-token-file)."),
           "405": _error("Method not allowed."),
           "421": _error("The Host header is not an admin name (DNS rebinding).")}

#: The OpenAPI 3.1 document, served at C{GET /v1/openapi.json}.
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "tenantedge hostname API", "version": "1",
             "description": "Each hostname's certificate lifecycle on a tenantedge server."},
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "The token in --admin-token-file."}},
        "schemas": {"Error": _ERROR, "Hostname": _HOSTNAME},
    },
    "paths": {
        "/v1/hostnames": {
            "get": {
                "operationId": "listHostnames",
                "summary": "One page of hostnames, sorted by name.",
                "parameters": [
                    {"name": "state", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": list(STATES)}},
                    {"name": "cursor", "in": "query", "required": False,
                     "description": "next_cursor of the previous page.", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}},
                ],
                "responses": {
                    "200": _ok("A page.", {
                        "type": "object", "required": ["items", "next_cursor"],
                        "properties": {"items": {"type": "array", "items": _HOST_REF},
                                       "next_cursor": {"type": ["string", "null"]}},
                    }),
                    **_COMMON,
                },
            }
        },
        "/v1/hostnames/{name}": {
            "parameters": [_NAME],
            "get": {
                "operationId": "getHostname",
                "summary": "One name's lifecycle.",
                "responses": {"200": _ok("The name.", _HOST_REF), "404": _error("Unknown name."), **_COMMON},
            },
            "put": {
                "operationId": "putHostname",
                "summary": "Pre-issue a certificate, under the policy and limits of a first handshake.",
                "responses": {
                    "200": _ok("Issued, or already had one.", {"allOf": [_HOST_REF, {
                        "type": "object", "required": ["issued"], "properties": {"issued": {"type": "boolean"}},
                    }]}),
                    "429": _error("Backing off after failures, or an issuance limit."),
                    "502": _error("The CA refused or failed."),
                    **_COMMON,
                },
            },
            "delete": {
                "operationId": "deleteHostname",
                "summary": "Archive the name (its certificate moves to the store's archive).",
                "responses": {"200": _ok("Archived.", _HOST_REF), "404": _error("Unknown name."), **_COMMON},
            },
        },
        "/v1/hostnames/{name}/renew": {
            "parameters": [_NAME],
            "post": {
                "operationId": "renewHostname",
                "summary": "Renew if due, or with force=true.",
                "parameters": [{"name": "force", "in": "query", "required": False,
                                "schema": {"type": "boolean", "default": False}}],
                "responses": {
                    "200": _ok("Renewed, or not due.", {"allOf": [_HOST_REF, {
                        "type": "object", "required": ["renewed"],
                        "properties": {"renewed": {"type": "boolean"},
                                       "reason": {"type": "string", "enum": ["not-due", "archived"]}},
                    }]}),
                    "404": _error("No certificate is stored for the name."),
                    "502": _error("The renewal failed."),
                    **_COMMON,
                },
            },
        },
    },
}
