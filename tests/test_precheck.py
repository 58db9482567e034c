"""
Tests for L{tenantedge.precheck}: the DNS, CAA and reach pre-checks (DNS
through a real C{twisted.names} client against a C{twisted.names} server
on loopback, serving an authority held in memory), and
L{PrecheckedIssuer}, which places no order when one fails.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.names import client, dns
from twisted.names import error as dns_error
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from tenantedge.challenges import ChallengeResource, HTTPRedirectRoot, MemoryChallengeStore
from tenantedge.interfaces import IIssuer, IPrecheck, PrecheckFailed
from tenantedge.issuer import FallbackIssuer
from tenantedge.precheck import (
    CAA_FORBIDS,
    DNS_NOT_POINTING_HERE,
    MAX_CNAMES,
    UNREACHABLE,
    CAAPrecheck,
    DNSPrecheck,
    PrecheckedIssuer,
    ReachPrecheck,
    caa_permits,
    parse_caa,
)
from tenantedge.testing import ControlledIssuer, caa_record, listen_dns, make_bundle, memory_authority

HERE = frozenset({"203.0.113.1", "2001:db8::1"})

RECORDS = {
    "here.example.test": [dns.Record_A("203.0.113.1")],
    "both.example.test": [dns.Record_A("203.0.113.1"), dns.Record_AAAA("2001:db8::1")],
    "stray-v6.example.test": [dns.Record_A("203.0.113.1"), dns.Record_AAAA("2001:db8::99")],
    "elsewhere.example.test": [dns.Record_A("198.51.100.7")],
    "shop.example.test": [dns.Record_CNAME(b"tenant.example.test")],
    "tenant.example.test": [dns.Record_CNAME(b"edge.example.test")],
    "edge.example.test": [dns.Record_A("203.0.113.1")],
    "loop1.example.test": [dns.Record_CNAME(b"loop2.example.test")],
    "loop2.example.test": [dns.Record_CNAME(b"loop1.example.test")],
    "empty.example.test": [dns.Record_TXT(b"no address")],
    # CAA: the parent forbids Let's Encrypt; one child allows it again.
    "example.test": [caa_record("issue", "sectigo.com"), caa_record("iodef", "mailto:sec@example.test")],
    "allowed.example.test": [dns.Record_A("203.0.113.1"), caa_record("issue", "letsencrypt.org; validationmethods=http-01")],
    "nobody.example.test": [caa_record("issue", ";")],
    "critical.example.test": [caa_record("issue", "letsencrypt.org"), caa_record("tbs", "x", flags=128)],
    "iodef-only.example.test": [caa_record("iodef", "mailto:x@y.test")],
    "alias.example.test": [dns.Record_CNAME(b"allowed.example.test")],
}
# A chain one link longer than followed.
for i in range(MAX_CNAMES + 1):
    RECORDS[f"c{i}.example.test"] = [dns.Record_CNAME(f"c{i + 1}.example.test".encode())]
RECORDS[f"c{MAX_CNAMES + 1}.example.test"] = [dns.Record_A("203.0.113.1")]

OPEN = {"open.test": [dns.Record_A("203.0.113.1")]}


class LoopbackDNSTestCase(TestCase):
    """A twisted.names server on 127.0.0.1 and a client resolver asking it."""

    def setUp(self) -> None:
        port = listen_dns(reactor, memory_authority("example.test", RECORDS))
        self.addCleanup(port.stopListening)
        open_port = listen_dns(reactor, memory_authority("open.test", OPEN))
        self.addCleanup(open_port.stopListening)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port.getHost().port)], reactor=reactor)
        self.open_resolver = client.Resolver(servers=[("127.0.0.1", open_port.getHost().port)], reactor=reactor)

    async def reason(self, d: defer.Deferred[None]) -> str | None:
        try:
            await d
        except PrecheckFailed as e:
            self.assertTrue(e.detail)
            return e.reason
        return None


class DNSPrecheckTests(LoopbackDNSTestCase):
    def check(self, name: str) -> defer.Deferred[None]:
        return DNSPrecheck(self.resolver, HERE, reactor, timeout=2).check(name)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IPrecheck, DNSPrecheck(self.resolver, HERE, reactor)))

    async def test_pointing_here(self) -> None:
        """A and AAAA records that are all this edge's pass."""
        self.assertIsNone(await self.reason(self.check("here.example.test")))
        self.assertIsNone(await self.reason(self.check("both.example.test")))

    async def test_elsewhere(self) -> None:
        """An address that is not ours fails, naming it."""
        with self.assertRaises(PrecheckFailed) as caught:
            await self.check("elsewhere.example.test")
        self.assertEqual(caught.exception.reason, DNS_NOT_POINTING_HERE)
        self.assertEqual(caught.exception.host, "elsewhere.example.test")
        self.assertIn("198.51.100.7", caught.exception.detail)

    async def test_one_stray_address_fails(self) -> None:
        """A CA may validate over any address: a stray AAAA fails even when the A is ours."""
        self.assertEqual(await self.reason(self.check("stray-v6.example.test")), DNS_NOT_POINTING_HERE)

    async def test_cname_chain(self) -> None:
        """CNAMEs are followed, re-asking for a target the answer left out."""
        self.assertIsNone(await self.reason(self.check("shop.example.test")))

    async def test_cname_loop_and_long_chain(self) -> None:
        with self.assertRaises(PrecheckFailed) as caught:
            await self.check("loop1.example.test")
        self.assertIn("loop", caught.exception.detail)
        with self.assertRaises(PrecheckFailed) as caught:
            await self.check("c0.example.test")
        self.assertIn(f"longer than {MAX_CNAMES}", caught.exception.detail)
        self.assertIsNone(await self.reason(self.check("c1.example.test")))  # exactly MAX_CNAMES links

    async def test_no_address(self) -> None:
        """NXDOMAIN, or a name with no A or AAAA, is not pointing here."""
        self.assertEqual(await self.reason(self.check("missing.example.test")), DNS_NOT_POINTING_HERE)
        self.assertEqual(await self.reason(self.check("empty.example.test")), DNS_NOT_POINTING_HERE)

    async def test_resolver_failure_is_not_a_verdict(self) -> None:
        """SERVFAIL (or a timeout) is the check failing, not the name: not PrecheckFailed."""

        class Broken:
            def query(self, query, timeout=None):  # noqa: ARG002
                return defer.fail(dns_error.DNSServerError(None))

        with self.assertRaises(dns_error.DNSServerError):
            await DNSPrecheck(Broken(), HERE, reactor).check("here.example.test")


class CAAPrecheckTests(LoopbackDNSTestCase):
    def check(self, name: str, identity: str = "letsencrypt.org") -> defer.Deferred[None]:
        return CAAPrecheck(self.resolver, identity, reactor, timeout=2).check(name)

    async def test_climbs_to_the_first_rrset(self) -> None:
        """The parent's CAA applies to a name without its own; the name's own wins over it."""
        self.assertEqual(await self.reason(self.check("here.example.test")), CAA_FORBIDS)
        self.assertIsNone(await self.reason(self.check("here.example.test", "sectigo.com")))
        self.assertIsNone(await self.reason(self.check("allowed.example.test")))
        self.assertEqual(await self.reason(self.check("allowed.example.test", "sectigo.com")), CAA_FORBIDS)

    async def test_cname_followed(self) -> None:
        """The resolver follows a CNAME at the name, as the CA's does."""
        self.assertIsNone(await self.reason(self.check("alias.example.test")))

    async def test_forbidding_sets(self) -> None:
        """issue ";" forbids every CA; an unknown critical tag forbids too; iodef alone restricts nobody."""
        self.assertEqual(await self.reason(self.check("nobody.example.test")), CAA_FORBIDS)
        self.assertEqual(await self.reason(self.check("critical.example.test")), CAA_FORBIDS)
        self.assertIsNone(await self.reason(self.check("iodef-only.example.test")))

    async def test_no_caa_anywhere(self) -> None:
        self.assertIsNone(await self.reason(CAAPrecheck(self.open_resolver, "letsencrypt.org", reactor).check("open.test")))

    def test_identity_matching(self) -> None:
        self.assertIsNone(caa_permits([(0, "issue", " LetsEncrypt.org. ; accounturi=x")], "letsencrypt.org"))
        self.assertIsNotNone(caa_permits([(0, "issue", "pki.goog")], "letsencrypt.org"))
        self.assertIsNone(caa_permits([(0, "issuewild", "pki.goog")], "letsencrypt.org"))


class ParseCAATests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(parse_caa(b"\x80\x05ISSUEletsencrypt.org"), (128, "issue", "letsencrypt.org"))
        for bad in (b"", b"\x00", b"\x00\x00", b"\x00\x09issue", b"\x00\x02i-x"):
            self.assertRaises(ValueError, parse_caa, bad)

    @given(st.binary(max_size=64))
    def test_any_bytes(self, data: bytes) -> None:
        """Untrusted RDATA either parses or raises ValueError."""
        try:
            flags, tag, value = parse_caa(data)
        except ValueError:
            return
        self.assertTrue(tag.isalnum())
        self.assertLess(flags, 256)


class Hang(Resource):
    isLeaf = True

    def render_GET(self, request):
        return NOT_DONE_YET


class Foreign(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setResponseCode(404)
        return b"not here"


class ReachPrecheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.challenges = MemoryChallengeStore()
        self.authority = memory_authority("example.test", RECORDS)

    def reach(self, resource: Resource) -> tuple[ReachPrecheck, StubTreq]:
        http = StubTreq(resource)
        # 203.0.113.0/24 (the test zone's addresses) is a documentation
        # network, not global: private=True, as --allow-private-suffix sets.
        return ReachPrecheck(http, self.challenges, self.authority, self.clock, timeout=5, private=True), http

    def test_internal_addresses_not_fetched(self) -> None:
        """
        Without private, a name resolving to a non-public address is
        unreachable at once: the edge fetches nothing inside the network.
        """
        http = StubTreq(Foreign())
        check = ReachPrecheck(http, self.challenges, self.authority, self.clock, timeout=5)
        d = check.check("here.example.test")
        http.flush()
        f = self.failureResultOf(d, PrecheckFailed)
        self.assertEqual(f.value.reason, UNREACHABLE)
        self.assertIn("not public", f.value.detail)
        self.assertEqual(self.challenges._tokens, {})  # nothing was even published

    def test_nonce_comes_back(self) -> None:
        """The edge's own challenge resource answers the nonce; the token is withdrawn afterwards."""
        check, http = self.reach(HTTPRedirectRoot(self.challenges))
        d = check.check("here.example.test")
        http.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.challenges._tokens, {})
        self.assertTrue(verifyObject(IPrecheck, check))

    def test_someone_else_answers(self) -> None:
        check, http = self.reach(Foreign())
        d = check.check("here.example.test")
        http.flush()
        f = self.failureResultOf(d, PrecheckFailed)
        self.assertEqual(f.value.reason, UNREACHABLE)
        self.assertIn("203.0.113.1 answered 404", f.value.detail)
        self.assertEqual(self.challenges._tokens, {})

    def test_no_answer_within_the_deadline(self) -> None:
        check, http = self.reach(Hang())
        d = check.check("here.example.test")
        http.flush()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, PrecheckFailed).value.reason, UNREACHABLE)
        self.assertEqual(self.challenges._tokens, {})

    def test_no_address(self) -> None:
        check, _ = self.reach(ChallengeResource(self.challenges))
        self.assertEqual(self.failureResultOf(check.check("missing.example.test"), PrecheckFailed).value.reason,
                         UNREACHABLE)


class FixedCheck:
    """A pre-check with a set outcome."""

    def __init__(self, name: str, outcome: Exception | None = None) -> None:
        self.name = name
        self.outcome = outcome
        self.asked: list[str] = []

    def check(self, server_name: str) -> defer.Deferred[None]:
        self.asked.append(server_name)
        return defer.fail(self.outcome) if self.outcome is not None else defer.succeed(None)


class PrecheckedIssuerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.issuer = ControlledIssuer()
        self.results: Counter[str] = Counter()

    def prechecked(self, *checks: FixedCheck, renewals: bool = False) -> PrecheckedIssuer:
        return PrecheckedIssuer(self.issuer, checks, self.results, renewals=renewals)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IIssuer, self.prechecked()))

    def test_failure_places_no_order(self) -> None:
        """A failed pre-check fails the issuance with it, logged as event precheck-failed, and no order."""
        failing = FixedCheck("dns", PrecheckFailed("a.test", DNS_NOT_POINTING_HERE, "a.test resolves to 192.0.2.9"))
        later = FixedCheck("reach")
        logged: list[dict] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        f = self.failureResultOf(self.prechecked(failing, later).issue("a.test"), PrecheckFailed)
        self.assertEqual((f.value.host, f.value.reason), ("a.test", DNS_NOT_POINTING_HERE))
        self.assertEqual(self.issuer.requests, [])
        self.assertEqual(later.asked, [])
        self.assertEqual(self.results, Counter({"dns:dns-not-pointing-here": 1}))
        events = [e for e in logged if e.get("event") == "precheck-failed"]
        self.assertEqual([(e["host"], e["reason"]) for e in events], [("a.test", DNS_NOT_POINTING_HERE)])

    def test_passing_checks_then_order(self) -> None:
        d = self.prechecked(FixedCheck("dns"), FixedCheck("reach")).issue("a.test")
        self.assertEqual(self.issuer.requests, ["a.test"])
        self.issuer.complete("a.test", make_bundle("a.test"))
        self.successResultOf(d)
        self.assertEqual(self.results, Counter({"dns:ok": 1, "reach:ok": 1}))

    def test_error_orders_anyway(self) -> None:
        """A check that could not be made counts an error and does not stop the order (fail open)."""
        self.prechecked(FixedCheck("dns", dns_error.DNSServerError(None))).issue("a.test")
        self.assertEqual(self.issuer.requests, ["a.test"])
        self.assertEqual(self.results, Counter({"dns:error": 1}))

    def test_renewals_unchecked_by_default(self) -> None:
        failing = FixedCheck("dns", PrecheckFailed("a.test", DNS_NOT_POINTING_HERE, "x"))
        old = make_bundle("a.test")
        self.prechecked(failing).issue("a.test", replaces=old)
        self.assertEqual((failing.asked, self.issuer.requests), ([], ["a.test"]))
        self.failureResultOf(self.prechecked(failing, renewals=True).issue("a.test", replaces=old), PrecheckFailed)
        self.assertEqual(failing.asked, ["a.test"])

    def test_every_ca_forbidden(self) -> None:
        """With several CAs, when each one's CAA pre-check fails, the chain fails with a PrecheckFailed."""
        one = PrecheckedIssuer(ControlledIssuer("ca-one"), [FixedCheck("caa", PrecheckFailed("a.test", CAA_FORBIDS, "no one"))])
        two = PrecheckedIssuer(ControlledIssuer("ca-two"), [FixedCheck("caa", PrecheckFailed("a.test", CAA_FORBIDS, "no two"))])
        f = self.failureResultOf(FallbackIssuer([one, two]).issue("a.test"), PrecheckFailed)
        self.assertEqual(f.value.reason, CAA_FORBIDS)
        self.assertIn("ca-one: no one; ca-two: no two", f.value.detail)
        self.flushLoggedErrors()

    def test_one_ca_forbidden_falls_back(self) -> None:
        forbidden = PrecheckedIssuer(ControlledIssuer("ca-one"), [FixedCheck("caa", PrecheckFailed("a.test", CAA_FORBIDS, "no"))])
        second = ControlledIssuer("ca-two")
        FallbackIssuer([forbidden, second]).issue("a.test")
        self.assertEqual(second.requests, ["a.test"])
