"""
Tests for L{tenantedge.limits}: the limits that keep an ACME account inside
its CA's published limits, with a Clock.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.acme import PROBLEM_PREFIX, ValidationFailed
from tenantedge.interfaces import IIssuer, LimitExceeded
from tenantedge.limits import DOMAIN_WINDOW, FAILURE_WINDOW, ORDER_WINDOW, IssuanceLimits, LimitedIssuer
from tenantedge.policy import registered_domain
from tenantedge.testing import ControlledIssuer, make_bundle

CA = "controlled"


class LimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.path = os.path.abspath(self.mktemp())
        self.limits = IssuanceLimits(
            self.path, self.clock, registered_domain,
            max_concurrent=2, max_waiting=2, max_new_orders=5, max_per_domain=3, max_failed_validations=2,
        )
        self.issuer = ControlledIssuer()
        self.limited = LimitedIssuer(self.issuer, self.limits, windows=True)  # the windows on, as for Let's Encrypt

    def issue_ok(self, name: str) -> None:
        d = self.limited.issue(name)
        self.issuer.complete(name, make_bundle(name))
        self.successResultOf(d)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IIssuer, self.limited))

    def test_concurrency(self) -> None:
        """
        At most max_concurrent orders run; a few more wait for a slot, and
        beyond that a name is refused at once (nothing queued without bound).
        """
        running = [self.limited.issue(f"r{i}.corp-r{i}.com") for i in range(2)]
        self.assertEqual(len(self.issuer.requests), 2)
        waiting = [self.limited.issue(f"w{i}.corp-w{i}.com") for i in range(2)]
        self.assertEqual(len(self.issuer.requests), 2)
        refused = self.limited.issue("x.corp-x.com")
        f = self.failureResultOf(refused, LimitExceeded)
        self.assertEqual(f.value.limit, "concurrent")
        self.issuer.complete("r0.corp-r0.com", make_bundle("r0.corp-r0.com"))
        self.successResultOf(running[0])
        self.assertEqual(self.issuer.requests[-1], "w0.corp-w0.com")
        self.assertEqual(self.limits.running, 2)
        for d in waiting:
            self.assertNoResult(d)
        # Let everything finish: no order is left suspended.
        for name in ("r1.corp-r1.com", "w0.corp-w0.com", "w1.corp-w1.com"):
            self.issuer.complete(name, make_bundle(name))
        for d in [running[1], *waiting]:
            self.successResultOf(d)
        self.assertEqual(self.limits.running, 0)

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        for i in range(2):
            self.limited.issue(f"r{i}.acme.com")
        waiting = self.limited.issue("w.acme.com")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.issuer.complete("r0.acme.com", make_bundle("r0.acme.com"))
        self.assertEqual(self.limits.running, 1)
        self.issuer.complete("r1.acme.com", make_bundle("r1.acme.com"))
        self.assertEqual(self.limits.running, 0)

    def test_new_orders_window(self) -> None:
        """At most max_new_orders orders per 3 hours; the window slides."""
        for i in range(5):
            self.issue_ok(f"n{i}.example{i}.com")
        f = self.failureResultOf(self.limited.issue("n5.other.com"), LimitExceeded)
        self.assertEqual(f.value.limit, "new-orders")
        self.assertEqual(f.value.retry_after, ORDER_WINDOW)
        self.assertEqual(len(self.issuer.requests), 5)
        self.clock.advance(ORDER_WINDOW + 1)
        self.issue_ok("n5.other.com")

    def test_registered_domain_week(self) -> None:
        """At most max_per_domain certificates per registered domain per week."""
        for sub in ("a", "b", "c"):
            self.issue_ok(f"{sub}.acme-corp.com")
        f = self.failureResultOf(self.limited.issue("d.acme-corp.com"), LimitExceeded)
        self.assertEqual(f.value.limit, "domain-week")
        self.assertIn("acme-corp.com", str(f.value))
        self.issue_ok("a.other-corp.com")  # other domains unaffected
        self.clock.advance(DOMAIN_WINDOW + 1)
        self.issue_ok("d.acme-corp.com")

    def test_orders_in_flight_count_against_the_domain(self) -> None:
        """
        Concurrent orders for one registered domain cannot all pass the
        per-domain check: those in flight are counted.
        """
        orders = [self.limited.issue(f"{sub}.same-corp.com") for sub in ("a", "b", "c", "d")]
        self.assertEqual(len(self.issuer.requests), 2)  # the concurrency limit lets 2 run
        for sub in ("a", "b"):
            self.issuer.complete(f"{sub}.same-corp.com", make_bundle(f"{sub}.same-corp.com"))
        # c started after a finished (1 issued + 1 in flight + ...); d is over the limit of 3.
        self.assertEqual(self.issuer.requests, ["a.same-corp.com", "b.same-corp.com", "c.same-corp.com"])
        f = self.failureResultOf(orders[3], LimitExceeded)
        self.assertEqual(f.value.limit, "domain-week")
        self.issuer.complete("c.same-corp.com", make_bundle("c.same-corp.com"))
        for d in orders[:3]:
            self.successResultOf(d)

    def test_limit_rechecked_after_waiting(self) -> None:
        """A name that waited for a slot is checked again: the window may have filled meanwhile."""
        self.limits.max_new_orders = 3
        first = [self.limited.issue(f"n{i}.corp{i}.com") for i in range(2)]
        waiting = self.limited.issue("late.other.com")
        self.limits.record_order(CA)  # another account user filled the window meanwhile
        self.issuer.complete("n0.corp0.com", make_bundle("n0.corp0.com"))
        f = self.failureResultOf(waiting, LimitExceeded)
        self.assertEqual(f.value.limit, "new-orders")
        self.issuer.complete("n1.corp1.com", make_bundle("n1.corp1.com"))
        for d in first:
            self.successResultOf(d)

    def test_exempt_renewals_not_counted(self) -> None:
        for _ in range(5):
            self.limits.record_issued(CA, "a.acme-corp.com", exempt=True)
        self.limits.check(CA, "b.acme-corp.com")

    def test_failed_validations(self) -> None:
        """At most max_failed_validations failed validations per name per hour."""
        for _ in range(2):
            d = self.limited.issue("bad.acme.com")
            self.issuer._pending.pop("bad.acme.com")[0].errback(
                ValidationFailed("bad.acme.com", PROBLEM_PREFIX + "dns", "NXDOMAIN", 400))
            self.failureResultOf(d, ValidationFailed)
        f = self.failureResultOf(self.limited.issue("bad.acme.com"), LimitExceeded)
        self.assertEqual(f.value.limit, "failed-validations")
        self.issue_ok("good.acme.com")
        self.clock.advance(FAILURE_WINDOW + 1)
        self.limited.issue("bad.acme.com")
        self.assertEqual(self.issuer.requests.count("bad.acme.com"), 3)

    def test_persisted(self) -> None:
        """A restart keeps the windows (limits.json)."""
        for sub in ("a", "b", "c"):
            self.issue_ok(f"{sub}.acme-corp.com")
        again = IssuanceLimits(self.path, self.clock, registered_domain, max_per_domain=3)
        again.load()
        self.assertRaises(LimitExceeded, again.check, CA, "d.acme-corp.com")

    def test_corrupt_state_ignored(self) -> None:
        with open(self.path, "w") as f:
            f.write("[broken")
        again = IssuanceLimits(self.path, self.clock, registered_domain)
        again.load()
        again.check(CA, "a.acme.com")
        self.flushLoggedErrors()


class ExemptRenewalTests(SynchronousTestCase):
    def test_ari_renewals_not_counted(self) -> None:
        """
        Renewals the CA's ARI marks exempt pass the order and per-domain
        limits and are not counted against them.
        """
        clock = Clock()
        clock.advance(1_800_000_000)
        limits = IssuanceLimits(None, clock, registered_domain, max_new_orders=1, max_per_domain=1)

        class AriIssuer(ControlledIssuer):
            def renewal_exempt(self, replaces):
                from twisted.internet.defer import succeed

                return succeed(replaces is not None)

        issuer = AriIssuer()
        limited = LimitedIssuer(issuer, limits, exemption=issuer, windows=True)
        old = make_bundle("a.acme.com")
        d = limited.issue("a.acme.com")
        issuer.complete("a.acme.com", old)
        self.successResultOf(d)
        self.assertRaises(LimitExceeded, limits.check, CA, "b.acme.com")
        for _ in range(3):
            d = limited.issue("a.acme.com", replaces=old)
            issuer.complete("a.acme.com", make_bundle("a.acme.com"))
            self.successResultOf(d)
        self.assertEqual(issuer.replaced[-1], old)
        self.assertEqual(len(limits._orders[CA]), 1)
        self.assertEqual(len(limits._domains[CA]["acme.com"]), 1)
        f = self.failureResultOf(limited.issue("b.acme.com"), LimitExceeded)
        self.assertEqual(f.value.limit, "new-orders")

    def test_refused_replaces_is_counted(self) -> None:
        """
        When the CA refuses an ARI "replaces" and gets a plain order
        instead, that order is checked and counted like any other.
        """
        clock = Clock()
        clock.advance(1_800_000_000)
        limits = IssuanceLimits(None, clock, registered_domain, max_new_orders=2, max_per_domain=5)

        class RefusingAriIssuer(ControlledIssuer):
            def renewal_exempt(self, replaces):
                from twisted.internet.defer import succeed

                return succeed(replaces is not None)

            def issue(self, server_name, replaces=None):
                if replaces is not None:
                    limits.replaces_refused(CA, server_name)  # the CA said no to "replaces"
                return super().issue(server_name, replaces)

        issuer = RefusingAriIssuer()
        limited = LimitedIssuer(issuer, limits, exemption=issuer, windows=True)
        old = make_bundle("a.acme.com")
        for _ in range(2):
            d = limited.issue("a.acme.com", replaces=old)
            issuer.complete("a.acme.com", make_bundle("a.acme.com"))
            self.successResultOf(d)
        self.assertEqual(len(limits._orders[CA]), 2)
        self.assertEqual(len(limits._domains[CA]["acme.com"]), 2)
        # The window is now full: the next refused replacement is not ordered.
        f = self.failureResultOf(limited.issue("a.acme.com", replaces=old), LimitExceeded)
        self.assertEqual(f.value.limit, "new-orders")


class PerCATests(SynchronousTestCase):
    """Let's Encrypt's windows apply to Let's Encrypt's directories only, unless configured."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.limits = IssuanceLimits(None, self.clock, registered_domain, max_concurrent=1, max_waiting=0,
                                     max_new_orders=1)

    def orders(self, name: str, windows: bool | None = None) -> list[str]:
        issuer = ControlledIssuer(name)
        limited = LimitedIssuer(issuer, self.limits, windows=windows)
        for sub in ("a", "b"):
            d = limited.issue(f"{sub}.acme.com")
            if issuer._pending:
                issuer.complete(f"{sub}.acme.com", make_bundle(f"{sub}.acme.com"))
                self.successResultOf(d)
            else:
                self.failureResultOf(d, LimitExceeded)
        return issuer.requests

    def test_letsencrypt_directories_windowed(self) -> None:
        from tenantedge.limits import LETSENCRYPT_DIRECTORIES, is_letsencrypt

        for url in LETSENCRYPT_DIRECTORIES:
            self.assertTrue(is_letsencrypt(url))
            self.assertEqual(self.orders(url), ["a.acme.com"])  # max_new_orders=1

    def test_other_cas_only_concurrency(self) -> None:
        """Pebble, ZeroSSL, a private CA: no windows, but still one order at a time."""
        self.assertEqual(self.orders("https://localhost:14000/dir"), ["a.acme.com", "b.acme.com"])
        issuer = ControlledIssuer("https://acme.zerossl.com/v2/DV90")
        limited = LimitedIssuer(issuer, self.limits)
        limited.issue("c.acme.com")
        f = self.failureResultOf(limited.issue("d.acme.com"), LimitExceeded)
        self.assertEqual(f.value.limit, "concurrent")

    def test_configured_either_way(self) -> None:
        self.assertEqual(self.orders("https://acme.zerossl.com/v2/DV90", windows=True), ["a.acme.com"])
        self.assertEqual(self.orders("https://acme-v02.api.letsencrypt.org/directory", windows=False),
                         ["a.acme.com", "b.acme.com"])
