"""
Tests for L{tenantedge.allow.AllowChecker} (through C{treq.testing}, with a
Clock for deadlines and expiry) and L{tenantedge.policy.EdgePolicy}.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tenantedge.allow import AllowChecker, Decision, build_check_url
from tenantedge.interfaces import PolicyRefusal
from tenantedge.policy import EdgePolicy, StaticPolicy, registered_domain, under_public_suffix


class Endpoint(Resource):
    """An allow endpoint answering each name with a configured status."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, int] = {}
        self.default = 404
        self.hang = False
        self.asked: list[bytes] = []

    def render_GET(self, request):
        self.asked.append(request.uri)
        if self.hang:
            return NOT_DONE_YET
        name = request.args.get(b"domain", [request.path.rsplit(b"/", 1)[-1]])[0].decode()
        request.setResponseCode(self.status.get(name, self.default))
        return b"body that is read and dropped"


class CheckerTestCase(SynchronousTestCase):
    caddy_style = False
    template = "https://api.saas.test/check-domain/{domain}"

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        self.http = StubTreq(self.endpoint)
        self.checker = AllowChecker(self.template, self.caddy_style, self.http, self.clock)

    def decide(self, name: str) -> Decision:
        d = self.checker.decide(name)
        self.http.flush()
        return self.successResultOf(d)


class AllowURLTests(CheckerTestCase):
    def test_status_classes(self) -> None:
        """
        --allow-url: only 200 allows; other 2xx, 3xx and 4xx deny; 5xx is
        unknown.
        """
        cases = {200: Decision.ALLOW, 204: Decision.DENY, 301: Decision.DENY, 403: Decision.DENY,
                 404: Decision.DENY, 429: Decision.DENY, 500: Decision.UNKNOWN, 503: Decision.UNKNOWN}
        for status, expected in cases.items():
            name = f"s{status}.tenant.test"
            self.endpoint.status[name] = status
            self.assertEqual(self.decide(name), expected, status)
        self.flushLoggedErrors()

    def test_timeout_is_unknown(self) -> None:
        """An endpoint that does not answer within the timeout: unknown (deny)."""
        self.endpoint.hang = True
        d = self.checker.decide("slow.tenant.test")
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), Decision.UNKNOWN)

    def test_connection_error_is_unknown(self) -> None:
        class Down:
            def get(self, url, **kwargs):  # noqa: ARG002
                return fail(ConnectionRefusedError("refused"))

        checker = AllowChecker(self.template, False, Down(), self.clock)
        self.assertEqual(self.successResultOf(checker.decide("a.tenant.test")), Decision.UNKNOWN)

    def test_caching(self) -> None:
        """
        Allows are cached for allow_ttl, denies for deny_ttl; the endpoint
        is asked again only after they expire.
        """
        self.endpoint.status["yes.tenant.test"] = 200
        for _ in range(3):
            self.assertEqual(self.decide("yes.tenant.test"), Decision.ALLOW)
            self.assertEqual(self.decide("no.tenant.test"), Decision.DENY)
        self.assertEqual(len(self.endpoint.asked), 2)
        self.clock.advance(61)
        self.decide("yes.tenant.test")
        self.decide("no.tenant.test")
        self.assertEqual(len(self.endpoint.asked), 3)  # only the deny expired
        self.clock.advance(600)
        self.decide("yes.tenant.test")
        self.assertEqual(len(self.endpoint.asked), 4)
        self.assertEqual(self.checker.results["cached"], 5)

    def test_unknown_cached_like_deny(self) -> None:
        """An outage is not hammered: unknown is cached for deny_ttl too."""
        self.endpoint.default = 503
        self.decide("a.tenant.test")
        self.decide("a.tenant.test")
        self.assertEqual(len(self.endpoint.asked), 1)
        self.flushLoggedErrors()

    def test_single_flight(self) -> None:
        self.endpoint.hang = True
        waiters = [self.checker.decide("a.tenant.test") for _ in range(20)]
        self.http.flush()
        self.assertEqual(len(self.endpoint.asked), 1)
        for d in waiters:
            self.assertNoResult(d)

    def test_bounded(self) -> None:
        self.checker.max_entries = 10
        for i in range(25):
            self.decide(f"n{i}.tenant.test")
        self.assertEqual(self.checker.cache_length(), 10)

    def test_ask_bypasses_cache(self) -> None:
        """Renewal re-asks: ask() goes to the endpoint even with a cached allow."""
        self.endpoint.status["a.tenant.test"] = 200
        self.decide("a.tenant.test")
        self.endpoint.status["a.tenant.test"] = 404
        d = self.checker.ask("a.tenant.test")
        self.http.flush()
        self.assertEqual(self.successResultOf(d), Decision.DENY)
        self.assertEqual(self.decide("a.tenant.test"), Decision.DENY)

    def test_recheck_only_definite_denies(self) -> None:
        """
        Renewal re-asks archive a certificate only on 403, 404 or 410; a
        429 from a busy API, a redirect or a 204 renews anyway.
        """
        cases = {403: Decision.DENY, 404: Decision.DENY, 410: Decision.DENY, 429: Decision.UNKNOWN,
                 301: Decision.UNKNOWN, 204: Decision.UNKNOWN, 408: Decision.UNKNOWN, 503: Decision.UNKNOWN,
                 200: Decision.ALLOW}
        for status, expected in cases.items():
            name = f"r{status}.tenant.test"
            self.endpoint.status[name] = status
            d = self.checker.ask(name)
            self.http.flush()
            self.assertEqual(self.successResultOf(d), expected, status)
        self.flushLoggedErrors()

    def test_url_encoding(self) -> None:
        """The name is URL-encoded; purpose= follows as a query parameter in both forms."""
        self.assertEqual(
            build_check_url("https://x.test/c/{domain}?k=1", "xn--bcher-kva.example", False),
            "https://x.test/c/xn--bcher-kva.example?k=1&purpose=issue",
        )
        self.assertEqual(build_check_url("https://x.test/c?d={domain}", "a.b", False),
                         "https://x.test/c?d=a.b&purpose=issue")
        self.assertEqual(build_check_url("https://x.test/c/{domain}", "a.b", False, "serve"),
                         "https://x.test/c/a.b?purpose=serve")
        self.assertEqual(build_check_url("https://x.test/ask", "a.b", True), "https://x.test/ask?domain=a.b&purpose=issue")
        self.assertEqual(build_check_url("https://x.test/ask?k=1", "a.b", True, "renew"),
                         "https://x.test/ask?k=1&domain=a.b&purpose=renew")
        self.assertRaises(ValueError, build_check_url, "https://x.test/ask", "a.b", True, "other")

    def test_purpose_sent(self) -> None:
        """decide() sends purpose=issue by default, purpose=serve when asked; ask() sends purpose=renew."""
        self.endpoint.status["a.tenant.test"] = 200
        self.decide("a.tenant.test")
        d = self.checker.decide("b.tenant.test", "serve")
        self.http.flush()
        self.successResultOf(d)
        d = self.checker.ask("c.tenant.test")
        self.http.flush()
        self.successResultOf(d)
        self.assertEqual(self.endpoint.asked, [
            b"/check-domain/a.tenant.test?purpose=issue",
            b"/check-domain/b.tenant.test?purpose=serve",
            b"/check-domain/c.tenant.test?purpose=renew",
        ])

    def test_serve_answer_never_authorises_issue(self) -> None:
        """
        A cached serve allow does not answer an issue (asked afresh, and
        here denied); an issue answer, authoritative, answers a serve.
        """
        self.endpoint.status["a.tenant.test"] = 200
        d = self.checker.decide("a.tenant.test", "serve")
        self.http.flush()
        self.assertEqual(self.successResultOf(d), Decision.ALLOW)
        self.endpoint.status["a.tenant.test"] = 404
        self.assertEqual(self.decide("a.tenant.test"), Decision.DENY)
        self.assertEqual(len(self.endpoint.asked), 2)
        self.endpoint.status["b.tenant.test"] = 200
        self.decide("b.tenant.test")
        d = self.checker.decide("b.tenant.test", "serve")
        self.assertEqual(self.successResultOf(d), Decision.ALLOW)
        self.assertEqual(len(self.endpoint.asked), 3)
        self.assertRaises(ValueError, self.checker.decide, "b.tenant.test", "renew")


class ConcurrencyCapTests(CheckerTestCase):
    def test_bounded_in_flight_and_queue(self) -> None:
        """
        A flood of new names puts at most max_in_flight requests on the
        endpoint at once; a bounded number wait; the rest are refused at
        once (not cached: the name is asked properly next time).
        """
        self.checker = AllowChecker(
            self.template, self.caddy_style, self.http, self.clock, max_in_flight=3, max_waiting=2
        )
        self.endpoint.hang = True
        pending = [self.checker.decide(f"n{i}.example.com") for i in range(8)]
        self.http.flush()
        self.assertEqual(len(self.endpoint.asked), 3)
        refused = [self.successResultOf(d) for d in pending[5:]]
        self.assertEqual(refused, [Decision.UNKNOWN] * 3)
        self.assertEqual(self.checker.results["overflow"], 3)
        for d in pending[:5]:
            self.assertNoResult(d)
        self.assertEqual(self.checker.cache_length(), 0)


class AskTests(CheckerTestCase):
    caddy_style = True
    template = "https://api.saas.test/ask"

    def test_any_2xx_allows(self) -> None:
        """Caddy's contract: GET URL?domain=NAME, any 2xx allows."""
        for status, expected in {200: Decision.ALLOW, 204: Decision.ALLOW, 404: Decision.DENY,
                                 500: Decision.UNKNOWN}.items():
            name = f"s{status}.tenant.test"
            self.endpoint.status[name] = status
            self.assertEqual(self.decide(name), expected)
        self.assertIn(b"/ask?domain=s200.tenant.test&purpose=issue", self.endpoint.asked)
        self.flushLoggedErrors()


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        self.http = StubTreq(self.endpoint)
        self.checker = AllowChecker("https://api.saas.test/check/{domain}", False, self.http, self.clock)
        self.policy = EdgePolicy(
            StaticPolicy.from_config(deny=[".saas.com"], allow_suffixes=[".pages.saas.net"], require_public_suffix=True),
            self.checker,
        )

    def check(self, name: str):
        d = self.policy.check(name)
        self.http.flush()
        return d

    def test_order(self) -> None:
        """
        Deny list and public-suffix rule first (no network), then allowed
        suffixes (no network), then the endpoint.
        """
        self.assertEqual(self.failureResultOf(self.check("app.saas.com"), PolicyRefusal).value.reason, "deny-list")
        self.assertEqual(self.failureResultOf(self.check("saas.com"), PolicyRefusal).value.reason, "deny-list")
        self.assertEqual(
            self.failureResultOf(self.check("foo.internal"), PolicyRefusal).value.reason, "not-public-suffix")
        self.assertEqual(
            self.failureResultOf(self.check("foo.localhost"), PolicyRefusal).value.reason, "not-public-suffix")
        self.assertEqual(self.failureResultOf(self.check("co.uk"), PolicyRefusal).value.reason, "not-public-suffix")
        self.successResultOf(self.check("shop.pages.saas.net"))
        self.assertEqual(self.endpoint.asked, [])
        self.endpoint.status["shop.acme.com"] = 200
        self.successResultOf(self.check("shop.acme.com"))
        self.assertEqual(
            self.failureResultOf(self.check("other.acme.com"), PolicyRefusal).value.reason, "allow-check-deny")
        self.endpoint.status["down.acme.com"] = 502
        self.assertEqual(
            self.failureResultOf(self.check("down.acme.com"), PolicyRefusal).value.reason, "allow-check-unknown")
        self.assertEqual(len(self.endpoint.asked), 3)
        self.flushLoggedErrors()

    def test_fail_closed_without_rules(self) -> None:
        policy = EdgePolicy(StaticPolicy())
        self.assertFalse(policy.issues_anything)
        self.assertEqual(self.failureResultOf(policy.check("shop.acme.com"), PolicyRefusal).value.reason, "not-allowed")

    def test_recheck(self) -> None:
        """
        Renewal re-asks: a definite deny is DENY, an endpoint outage is
        UNKNOWN (renew anyway), the deny list is DENY.
        """
        self.endpoint.status["gone.acme.com"] = 404
        self.endpoint.status["down.acme.com"] = 503
        self.endpoint.status["ok.acme.com"] = 200
        results = {}
        for name in ("gone.acme.com", "down.acme.com", "ok.acme.com", "app.saas.com", "x.pages.saas.net"):
            d = self.policy.recheck(name)
            self.http.flush()
            results[name] = self.successResultOf(d)
        self.assertEqual(results, {
            "gone.acme.com": Decision.DENY, "down.acme.com": Decision.UNKNOWN, "ok.acme.com": Decision.ALLOW,
            "app.saas.com": Decision.DENY, "x.pages.saas.net": Decision.ALLOW,
        })
        self.assertEqual(self.successResultOf(EdgePolicy(StaticPolicy()).recheck("a.acme.com")), Decision.UNKNOWN)
        self.flushLoggedErrors()

    def test_public_suffix_helpers(self) -> None:
        self.assertTrue(under_public_suffix("shop.acme-corp.com"))
        self.assertTrue(under_public_suffix("a.b.co.uk"))
        self.assertFalse(under_public_suffix("foo.internal"))
        self.assertEqual(registered_domain("shop.acme-corp.com"), "acme-corp.com")
        self.assertEqual(registered_domain("a.b.co.uk"), "b.co.uk")
        self.assertEqual(registered_domain("me.github.io"), "me.github.io")

