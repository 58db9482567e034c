"""
End-to-end tests of the hostname API on loopback: a real edge (local CA)
built by L{build_edge}, its admin endpoint on a run-time port, and a real
HTTP client; a schema-based fuzz from the API's own OpenAPI document
(schemathesis, in a thread, so the reactor keeps serving).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from .support.processes import Backend
from .test_e2e import start_edge

TOKEN = "fuzz-token-0123456789abcdef"


def _token_file(testcase: TestCase) -> str:
    path = testcase.mktemp()
    with open(path, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(path, 0o600)
    return path


class HostnameAPIEndToEnd(TestCase):
    timeout = 300

    async def _setUp(self) -> None:
        self.backend = Backend()
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.edge, self.https_port, _ = await start_edge(
            self, "--admin-token-file", _token_file(self), backend=self.backend.url,
        )
        ports = await self.edge.listening_ports()
        self.admin = f"http://127.0.0.1:{ports['admin'].getHost().port}"

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    def test_schema_fuzz_finds_no_5xx(self) -> None:
        """schemathesis, from /v1/openapi.json itself: no 5xx, and every answer matches the document."""
        import requests
        import schemathesis
        from hypothesis import HealthCheck, given, settings

        base = self.admin

        def fuzz() -> list[str]:
            document = requests.get(base + "/v1/openapi.json", timeout=10).json()
            schema = schemathesis.openapi.from_dict(document)
            problems: list[str] = []
            session = requests.Session()
            for result in schema.get_all_operations():
                operation = result.ok()

                @settings(max_examples=40, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy())
                def check(case: Any) -> None:
                    response = case.call(base_url=base, session=session,
                                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
                    assert response.status_code < 500, (
                        f"{case.method} {case.formatted_path} {case.query}: {response.status_code} {response.text}")
                    case.validate_response(response)  # schemathesis' checks: answers match the document

                try:
                    check()
                except BaseException as e:  # an assertion, or schemathesis' FailureGroup
                    if not isinstance(e, (AssertionError, Exception, BaseExceptionGroup)):
                        raise
                    problems.append(f"{operation.method.upper()} {operation.path}: {str(e)[:600]}")
            session.close()
            return problems

        d = threads.deferToThread(fuzz)
        d.addCallback(lambda problems: self.assertEqual(problems, [], "\n\n".join(problems)))
        return d  # type: ignore[return-value]

    async def _get(self, path: str, method: bytes = b"GET", token: str | None = TOKEN,
                   host: bytes | None = None) -> tuple[int, Any]:
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        headers = Headers()
        if token is not None:
            headers.addRawHeader(b"authorization", b"Bearer " + token.encode())
        if host is not None:
            headers.addRawHeader(b"host", host)
        response = await Agent(reactor).request(method, (self.admin + path).encode(), headers)
        body = await readBody(response)
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body

    def test_refuses_token_and_rebinding(self) -> None:
        """A real client without the token, with a wrong one, or with a rebinding Host is refused."""
        async def run() -> None:
            self.assertEqual((await self._get("/v1/hostnames", token=None))[0], 401)
            self.assertEqual((await self._get("/v1/hostnames", token="wrong-wrong-wrong"))[0], 401)
            self.assertEqual((await self._get("/v1/hostnames", host=b"rebind.attacker.example"))[0], 421)
            code, body = await self._get("/v1/hostnames/shop.test", method=b"PUT")
            self.assertEqual((code, body["state"], body["issued"]), (200, "active", True))
            code, body = await self._get("/v1/hostnames/shop.test/renew", method=b"POST")
            self.assertEqual((code, body["renewed"], body["reason"]), (200, False, "not-due"))
            code, body = await self._get("/v1/hostnames?state=active")
            self.assertEqual([i["name"] for i in body["items"]], ["shop.test"])

        return defer.Deferred.fromCoroutine(run())  # type: ignore[return-value]
