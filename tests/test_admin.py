"""
Tests for L{tenantedge.admin} and L{tenantedge.api}: the admin endpoint's
Host and token checks and the hostname API, in memory (StubTreq).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.admin import AdminGuard, AdminResource, bound_names, host_of
from tenantedge.api import OPENAPI, HostnameAPI
from tenantedge.interfaces import PolicyRefusal
from tenantedge.lifecycle import HostnameLifecycle
from tenantedge.renewal import renewal_due
from tenantedge.testing import MemoryStore, make_bundle

NOW = 1_800_000_000.0
DAY = 86400.0
TOKEN = "t0ken-t0ken-t0ken-t0ken"
AUTH = {b"Authorization": [b"Bearer " + TOKEN.encode()], b"Host": [b"localhost:9180"]}


class AdminAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.lifecycle = HostnameLifecycle(None, self.clock)
        self.renewed: list[str] = []
        self.api = HostnameAPI(self.store, self.lifecycle, self.clock, self.context_for, self.schedule,
                               self.renew, lambda host: None)
        self.root = AdminResource(CollectorRegistry(), {}, self.api,
                                  AdminGuard(TOKEN, ("localhost", "127.0.0.1", "::1")))
        self.http = StubTreq(self.root)

    def context_for(self, host: str) -> Deferred[Any]:
        if host.startswith("no."):
            return Deferred.fromCoroutine(self._refuse(host))
        self.lifecycle.decided(host, "allow")
        if host in self.store.bundles:
            return succeed(None)  # as the resolver: a valid stored one is used
        self.successResultOf(self.store.store(host, make_bundle(host, NOW - 60, NOW + 90 * DAY)))
        self.lifecycle.issued(host, NOW + 90 * DAY, renewal=False)
        return succeed(None)

    async def _refuse(self, host: str) -> None:
        raise PolicyRefusal(host, "not-allowed")

    async def schedule(self, host: str, bundle: Any) -> tuple[float, None]:
        return renewal_due(bundle, 30 * DAY), None

    async def renew(self, host: str, bundle: Any) -> float:
        self.renewed.append(host)
        new = make_bundle(host, NOW, NOW + 90 * DAY)
        await self.store.store(host, new)
        return new.not_after

    def call(self, method: str, path: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, Any]:
        response = self.successResultOf(self.http.request(method, "http://localhost:9180" + path,
                                                          headers=AUTH if headers is None else headers))
        body = self.successResultOf(response.content())
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body

    def test_refuses_missing_and_wrong_token(self) -> None:
        """No token, another scheme or a wrong token: 401, on the API and the deprecated routes."""
        host = {b"Host": [b"localhost"]}
        self.assertEqual(self.call("GET", "/v1/hostnames", host)[0], 401)
        self.assertEqual(self.call("GET", "/v1/hostnames", {**host, b"Authorization": [b"Bearer nope"]})[0], 401)
        self.assertEqual(self.call("GET", "/v1/hostnames", {**host, b"Authorization": [b"Basic " + TOKEN.encode()]})[0],
                         401)
        self.assertEqual(self.call("POST", "/certs/a.test/issue", {**host, b"X-Tenantedge-Admin": [b"1"]})[0], 401)
        self.assertEqual(self.call("GET", "/v1/hostnames")[0], 200)

    def test_refuses_rebinding_host(self) -> None:
        """A Host that is not an admin name gets 421, even with the token, on every path."""
        evil = {**AUTH, b"Host": [b"attacker.example:9180"]}
        self.assertEqual(self.call("GET", "/v1/hostnames", evil)[0], 421)
        self.assertEqual(self.call("GET", "/metrics", evil)[0], 421)
        self.assertEqual(self.call("GET", "/", evil)[0], 421)
        self.assertEqual(self.call("GET", "/v1/hostnames", {**AUTH, b"Host": [b"[::1]:9180"]})[0], 200)

    def test_no_token_configured(self) -> None:
        """Without --admin-token-file the API answers 403; metrics and the document still answer."""
        self.http = StubTreq(AdminResource(CollectorRegistry(), {}, self.api, AdminGuard(None, ("localhost",))))
        code, body = self.call("GET", "/v1/hostnames")
        self.assertEqual((code, body["error"]), (403, "disabled"))
        self.assertEqual(self.call("GET", "/metrics")[0], 200)
        self.assertEqual(self.call("GET", "/v1/openapi.json")[0], 200)

    def test_openapi_document(self) -> None:
        """The document is served without the token, as OpenAPI 3.1."""
        code, body = self.call("GET", "/v1/openapi.json", {b"Host": [b"127.0.0.1"]})
        self.assertEqual((code, body), (200, json.loads(json.dumps(OPENAPI))))
        self.assertEqual(body["openapi"], "3.1.0")

    def test_put_get_list_delete(self) -> None:
        """PUT pre-issues (active), GET and the list show it, DELETE archives it."""
        code, body = self.call("PUT", "/v1/hostnames/Shop.Example.test")
        self.assertEqual((code, body["state"], body["issued"], body["name"]), (200, "active", True, "shop.example.test"))
        self.assertEqual(body["certificate"]["key_type"], "ecdsa-p256")
        self.assertEqual(self.call("PUT", "/v1/hostnames/shop.example.test")[1]["issued"], False)
        code, body = self.call("GET", "/v1/hostnames/shop.example.test")
        self.assertEqual((code, body["decision"]), (200, "allow"))
        code, body = self.call("GET", "/v1/hostnames?state=active")
        self.assertEqual([i["name"] for i in body["items"]], ["shop.example.test"])
        code, body = self.call("DELETE", "/v1/hostnames/shop.example.test")
        self.assertEqual((code, body["state"], body["certificate"]), (200, "archived", None))
        self.assertEqual(self.call("GET", "/v1/hostnames?state=active")[1]["items"], [])

    def test_put_refused(self) -> None:
        """PUT goes through the policy: a refused name is 403 with the reason."""
        code, body = self.call("PUT", "/v1/hostnames/no.example.test")
        self.assertEqual((code, body["reason"]), (403, "not-allowed"))

    def test_pagination(self) -> None:
        """The list is paged by name with next_cursor."""
        for n in range(5):
            self.call("PUT", f"/v1/hostnames/n{n}.test")
        code, body = self.call("GET", "/v1/hostnames?limit=2")
        self.assertEqual([i["name"] for i in body["items"]], ["n0.test", "n1.test"])
        seen = [i["name"] for i in body["items"]]
        while body["next_cursor"]:
            body = self.call("GET", f"/v1/hostnames?limit=2&cursor={body['next_cursor']}")[1]
            seen += [i["name"] for i in body["items"]]
        self.assertEqual(seen, [f"n{n}.test" for n in range(5)])

    def test_state_filter_describes_only_candidates(self) -> None:
        """
        ?state= reads the store only for names that can be in that state:
        a rare state among many stored names costs a few reads, not all.
        """
        for n in range(20):
            self.successResultOf(self.store.store(f"s{n}.test", make_bundle(f"s{n}.test")))
        self.lifecycle.decided("f.test", "allow")
        self.lifecycle.failed("f.test", RuntimeError("x"))
        reads: list[str] = []
        get = self.store.get

        def counting(name: str) -> Any:
            reads.append(name)
            return get(name)

        self.store.get = counting  # type: ignore[method-assign]
        code, body = self.call("GET", "/v1/hostnames?state=failing")
        self.assertEqual([i["name"] for i in body["items"]], ["f.test"])
        self.assertEqual(reads, ["f.test"])

    def test_renew_not_due_unless_forced(self) -> None:
        """Renew does not order for a certificate that is not due, unless force=true."""
        self.call("PUT", "/v1/hostnames/a.test")
        for _ in range(3):
            code, body = self.call("POST", "/v1/hostnames/a.test/renew")
            self.assertEqual((code, body["renewed"], body["reason"]), (200, False, "not-due"))
        self.assertEqual(self.renewed, [])
        code, body = self.call("POST", "/v1/hostnames/a.test/renew?force=true")
        self.assertEqual((code, body["renewed"]), (200, True))
        self.clock.advance(70 * DAY)
        code, body = self.call("POST", "/v1/hostnames/a.test/renew")
        self.assertEqual((code, body["renewed"]), (200, True))
        self.assertEqual(self.renewed, ["a.test", "a.test"])

    def test_errors(self) -> None:
        """Unknown names are 404, bad names and parameters 400, wrong methods 405: always JSON."""
        self.assertEqual(self.call("GET", "/v1/hostnames/unknown.test")[0], 404)
        self.assertEqual(self.call("POST", "/v1/hostnames/unknown.test/renew")[0], 404)
        self.assertEqual(self.call("DELETE", "/v1/hostnames/unknown.test")[0], 404)
        self.assertEqual(self.call("GET", "/v1/hostnames/bad..name")[0], 400)
        self.assertEqual(self.call("GET", "/v1/hostnames?state=bogus")[0], 400)
        self.assertEqual(self.call("GET", "/v1/hostnames?limit=0")[0], 400)
        self.assertEqual(self.call("POST", "/v1/hostnames/a.test/renew?force=maybe")[0], 400)
        self.assertEqual(self.call("POST", "/v1/hostnames")[0], 405)
        self.assertEqual(self.call("GET", "/v1/nothing")[0], 404)

    def test_host_parsing(self) -> None:
        """Host headers: port and brackets dropped, case folded."""
        self.assertEqual(host_of(b"LocalHost:80"), "localhost")
        self.assertEqual(host_of(b"[::1]:9180"), "::1")
        self.assertEqual(host_of(b"[::1"), None)
        self.assertEqual(host_of(b""), None)
        self.assertEqual(bound_names("tcp:9180:interface=10.0.0.5"), ("10.0.0.5",))
        self.assertEqual(bound_names("tcp:9180"), ())


class TokenFileTests(SynchronousTestCase):
    def write(self, text: str, mode: int) -> str:
        import os

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_refuses_readable_token_file(self) -> None:
        """A token file group or others can read is refused at start-up, with one line naming the setting."""
        from tenantedge.config import ConfigError, OnDemandConfig

        with self.assertRaises(ConfigError) as caught:
            OnDemandConfig(admin_token_file=self.write(TOKEN, 0o644))
        self.assertIn("admin-token-file", str(caught.exception))
        self.assertIn("chmod 600", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_reads_private_token_file(self) -> None:
        """A 0600 file's one line is the token; a short one is refused."""
        from tenantedge.config import ConfigError, OnDemandConfig

        self.assertEqual(OnDemandConfig(admin_token_file=self.write(TOKEN + "\n", 0o600)).admin_token, TOKEN)
        self.assertRaises(ConfigError, OnDemandConfig, admin_token_file=self.write("short", 0o600))
