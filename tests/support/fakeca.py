"""
An in-memory ACME CA for unit tests of the ACME client, served through
C{treq.testing.StubTreq}: it verifies every JWS (signature, nonce, URL,
kid), runs orders through pending -> ready -> valid, validates challenges
by asking the test's responder what it published, and can be scripted to
answer any request with a canned error first (badNonce, 429, bad JSON...).
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import josepy as jose
from acme import jws as acme_jws
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tenantedge.acme import key_authorization

BASE = "https://ca.test"


def problem(status: int, short_type: str, detail: str, headers: dict[str, str] | None = None) -> tuple:
    body = json.dumps({"type": f"urn:ietf:params:acme:error:{short_type}", "detail": detail, "status": status})
    return (status, {"Content-Type": "application/problem+json", **(headers or {})}, body.encode())


class FakeCA(Resource):
    """
    @ivar script: path -> list of canned (status, headers, body) answers
        used (and removed) before normal handling.
    @ivar validate: C{validate(name, type, token, expected_key_authz)} ->
        error dict, None (valid) or C{"pending"} (the test completes it
        later with L{complete}); by default every challenge is valid.
    @ivar issue: C{issue(csr) -> list of certificates} for finalize.
    @ivar requests: (method, path) of every request, in order.
    @ivar hang: paths that never answer.
    """

    isLeaf = True

    def __init__(self, issue: Callable[[x509.CertificateSigningRequest], list[x509.Certificate]]) -> None:
        super().__init__()
        self.issue = issue
        self.script: dict[str, list[tuple]] = defaultdict(list)
        self.validate: Callable[..., dict | None] = lambda name, typ, token, expected: None
        self.requests: list[tuple[str, str]] = []
        self.payloads: dict[str, list[Any]] = defaultdict(list)
        self.hang: set[str] = set()
        self.nonces: set[str] = set()
        self.accounts: dict[str, jose.JWK] = {}
        self.account_keys: dict[str, str] = {}
        self.orders: dict[str, dict] = {}
        self.authzs: dict[str, dict] = {}
        self.retry_after: dict[str, int] = {}
        self.pending_polls = 0
        self.require_eab = False
        #: ARI: certificate id -> renewalInfo body; None disables renewalInfo.
        self.renewal_info: dict[str, dict] | None = None
        self.eab_keys: dict[str, bytes] = {}
        self._ids = itertools.count(1)

    def directory(self) -> dict:
        d = {
            "newNonce": f"{BASE}/nonce",
            "newAccount": f"{BASE}/account",
            "newOrder": f"{BASE}/order",
            "meta": {"termsOfService": f"{BASE}/tos", "externalAccountRequired": self.require_eab},
        }
        if self.renewal_info is not None:
            d["renewalInfo"] = f"{BASE}/renewal-info"
        return d

    def _nonce(self, request: Request) -> None:
        nonce = jose.encode_b64jose(secrets.token_bytes(16))
        self.nonces.add(nonce)
        request.setHeader(b"replay-nonce", nonce.encode())

    def _answer(self, request: Request, status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
        request.setResponseCode(status)
        for k, v in (headers or {}).items():
            request.setHeader(k.encode(), v.encode())
        if isinstance(body, (dict, list)):
            if not request.responseHeaders.hasHeader(b"content-type"):
                request.setHeader(b"content-type", b"application/json")
            body = json.dumps(body).encode()
        return body

    def _answer_problem(self, request: Request, answer: tuple) -> bytes:
        status, headers, body = answer
        return self._answer(request, status, body, headers)

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        method = request.method.decode()
        self.requests.append((method, path))
        self._nonce(request)
        if path in self.hang:
            return NOT_DONE_YET
        if self.script.get(path):
            return self._answer_problem(request, self.script[path].pop(0))
        if path == "/dir":
            return self._answer(request, 200, self.directory())
        if path == "/nonce":
            return self._answer(request, 200, b"")
        if path.startswith("/renewal-info/") and self.renewal_info is not None:
            info = self.renewal_info.get(path.rsplit("/", 1)[1])
            if info is None:
                return self._answer_problem(request, problem(404, "malformed", "no such certificate"))
            return self._answer(request, 200, info, {"Retry-After": "21600"})
        if method != "POST":
            return self._answer(request, 405, b"")
        try:
            payload, kid, key = self._verify(request, path)
        except _Problem as p:
            return self._answer_problem(request, p.answer)
        self.payloads[path].append(payload)
        return self._post(request, path, payload, kid, key)

    def _verify(self, request: Request, path: str) -> tuple[Any, str | None, jose.JWK]:
        body = request.content.read()
        signed = acme_jws.JWS.json_loads(body)
        header = signed.signature.combined
        nonce = jose.encode_b64jose(header.nonce)
        if nonce not in self.nonces:
            raise _Problem(problem(400, "badNonce", "unknown nonce"))
        self.nonces.discard(nonce)
        if header.url != BASE + path:
            raise _Problem(problem(400, "unauthorized", "url mismatch"))
        if header.kid is not None:
            if header.kid not in self.accounts:
                raise _Problem(problem(400, "accountDoesNotExist", "no such account"))
            key = self.accounts[header.kid]
        else:
            key = header.jwk
        if not signed.verify(key):
            raise _Problem(problem(400, "malformed", "bad signature"))
        payload = json.loads(signed.payload) if signed.payload else None
        return payload, header.kid, key

    def _post(self, request: Request, path: str, payload: Any, kid: str | None, key: jose.JWK) -> bytes:
        if path == "/account":
            thumb = jose.b64encode(key.thumbprint()).decode()
            if self.require_eab and "externalAccountBinding" not in (payload or {}):
                return self._answer_problem(request, problem(400, "externalAccountRequired", "EAB needed"))
            if thumb in self.account_keys:
                url = self.account_keys[thumb]
                return self._answer(request, 200, {"status": "valid"}, {"Location": url})
            url = f"{BASE}/acct/{next(self._ids)}"
            self.accounts[url] = key
            self.account_keys[thumb] = url
            return self._answer(request, 201, {"status": "valid", "contact": payload.get("contact", [])}, {"Location": url})
        if kid is None:
            return self._answer_problem(request, problem(400, "malformed", "kid required"))
        if path == "/order":
            name = payload["identifiers"][0]["value"]
            n = next(self._ids)
            authz_url = f"{BASE}/authz/{n}"
            self.authzs[authz_url] = {
                "identifier": {"type": "dns", "value": name},
                "status": "pending",
                "challenges": [
                    {"type": t, "url": f"{BASE}/chall/{n}/{t}", "status": "pending", "token": secrets.token_urlsafe(32)}
                    for t in ("http-01", "tls-alpn-01")
                ],
            }
            order = {
                "status": "pending",
                "identifiers": payload["identifiers"],
                "authorizations": [authz_url],
                "finalize": f"{BASE}/finalize/{n}",
            }
            self.orders[f"{BASE}/order/{n}"] = order
            return self._answer(request, 201, order, {"Location": f"{BASE}/order/{n}"})
        url = BASE + path
        if url in self.authzs:
            headers = {"Retry-After": str(self.retry_after[url])} if url in self.retry_after else None
            return self._answer(request, 200, self.authzs[url], headers)
        if path.startswith("/chall/"):
            _, _, n, typ = path.split("/")
            authz = self.authzs[f"{BASE}/authz/{n}"]
            challenge = next(c for c in authz["challenges"] if c["type"] == typ)
            name = authz["identifier"]["value"]
            error = self.validate(name, typ, challenge["token"], key_authorization(challenge["token"], key))
            if error == "pending":
                # Validation still running: the test decides when it ends.
                return self._answer(request, 200, challenge)
            if error is None:
                challenge["status"] = authz["status"] = "valid"
            else:
                challenge["status"] = authz["status"] = "invalid"
                challenge["error"] = error
            for order in self.orders.values():
                if url.rsplit("/", 1)[0].replace("/chall/", "/authz/") in order["authorizations"]:
                    order["status"] = "ready" if error is None else "invalid"
            return self._answer(request, 200, challenge)
        if url in self.orders:
            return self._answer(request, 200, self.orders[url])
        if path.startswith("/finalize/"):
            order_url = f"{BASE}/order/{path.rsplit('/', 1)[1]}"
            order = self.orders[order_url]
            csr = x509.load_der_x509_csr(jose.decode_b64jose(payload["csr"]))
            chain = self.issue(csr)
            cert_url = f"{BASE}/cert/{path.rsplit('/', 1)[1]}"
            self.certificates = getattr(self, "certificates", {})
            self.certificates[cert_url] = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            order["status"] = "valid"
            order["certificate"] = cert_url
            return self._answer(request, 200, order)
        if path.startswith("/cert/"):
            request.setHeader(b"content-type", b"application/pem-certificate-chain")
            return self._answer(request, 200, self.certificates[url])
        return self._answer(request, 404, b"")


def complete(ca: FakeCA, authz_url: str) -> None:
    """Finish a validation left pending: authorization valid, order ready."""
    authz = ca.authzs[authz_url]
    authz["status"] = "valid"
    for challenge in authz["challenges"]:
        challenge["status"] = "valid"
    for order in ca.orders.values():
        if authz_url in order["authorizations"]:
            order["status"] = "ready"


class _Problem(Exception):
    def __init__(self, answer: tuple) -> None:
        self.answer = answer
