"""
Tests for port 80: HTTP-01 answers and the HTTPS redirect.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.challenges import HTTPRedirectRoot, MemoryChallengeStore
from tenantedge.interfaces import IChallengeStore


class PortEightyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.challenges = MemoryChallengeStore()
        self.treq = StubTreq(HTTPRedirectRoot(self.challenges, https_port=443))

    def get(self, url: str, **kw):
        response = self.successResultOf(self.treq.get(url, allow_redirects=False, **kw))
        return response, self.successResultOf(response.content())

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IChallengeStore, self.challenges))

    def test_redirect(self) -> None:
        """Everything else gets a 308 to the same host and path over HTTPS."""
        response, _ = self.get("http://Shop.Acme.test/a/b?c=d")
        self.assertEqual(response.code, 308)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"https://shop.acme.test/a/b?c=d"])

    def test_redirect_keeps_port(self) -> None:
        treq = StubTreq(HTTPRedirectRoot(self.challenges, https_port=8443))
        response = self.successResultOf(treq.get("http://a.test:8080/x", allow_redirects=False))
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"https://a.test:8443/x"])

    def test_redirect_needs_valid_host(self) -> None:
        """Port 80 never redirects to an invalid or IP-literal host."""
        response, _ = self.get("http://127.0.0.1/x")
        self.assertEqual(response.code, 400)

    def test_challenge(self) -> None:
        self.successResultOf(self.challenges.add("tok-en_1", "tok-en_1.thumb"))
        response, body = self.get("http://a.test/.well-known/acme-challenge/tok-en_1")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"tok-en_1.thumb")
        self.successResultOf(self.challenges.remove("tok-en_1"))
        response, _ = self.get("http://a.test/.well-known/acme-challenge/tok-en_1")
        self.assertEqual(response.code, 404)

    def test_unknown_challenge_not_redirected(self) -> None:
        """The challenge path is reserved: unknown tokens are 404, not redirects."""
        for path in ("/.well-known/acme-challenge/nope", "/.well-known/acme-challenge/", "/.well-known/acme-challenge/a/b"):
            response, _ = self.get("http://a.test" + path)
            self.assertEqual(response.code, 404, path)

    def test_other_well_known_redirected(self) -> None:
        response, _ = self.get("http://a.test/.well-known/security.txt")
        self.assertEqual(response.code, 308)
