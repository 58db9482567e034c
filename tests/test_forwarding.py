"""
Tests for L{tenantedge.forwarding}: which peers may hand on an
C{X-Forwarded-For} chain (C{--trusted-proxy}), and the option's parsing.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from tenantedge.config import ConfigError, OnDemandConfig
from tenantedge.forwarding import TrustedProxies, forwarded_for, parse_network
from tenantedge.options import Options
from tenantedge.proxy import upstream_headers


def _trusted(*cidrs: str) -> TrustedProxies:
    trusted = TrustedProxies.from_cidrs(cidrs)
    assert trusted is not None
    return trusted


class TrustedProxiesTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        trusted = _trusted("10.0.0.0/8", "192.0.2.7/32")
        self.assertTrue(trusted.trusts("10.200.1.2"))
        self.assertTrue(trusted.trusts("192.0.2.7"))
        self.assertFalse(trusted.trusts("192.0.2.8"))
        self.assertFalse(trusted.trusts("11.0.0.1"))

    def test_ipv6(self) -> None:
        trusted = _trusted("2001:db8::/32")
        self.assertTrue(trusted.trusts("2001:db8:1::5"))
        self.assertFalse(trusted.trusts("2001:db9::5"))
        self.assertFalse(trusted.trusts("10.0.0.1"))

    def test_ipv4_mapped(self) -> None:
        """A dual-stack socket's ::ffff:a.b.c.d peer is its IPv4 address."""
        self.assertTrue(_trusted("10.0.0.0/8").trusts("::ffff:10.1.2.3"))

    def test_not_an_address(self) -> None:
        """A UNIX socket's peer (or nothing) is never trusted."""
        trusted = _trusted("0.0.0.0/0", "::/0")
        self.assertFalse(trusted.trusts(""))
        self.assertFalse(trusted.trusts("/run/x.sock"))

    def test_none_configured(self) -> None:
        self.assertIsNone(TrustedProxies.from_cidrs(()))

    def test_verdicts_remembered_and_bounded(self) -> None:
        trusted = _trusted("10.0.0.0/8")
        for i in range(5000):
            trusted.trusts(f"11.0.{i // 256}.{i % 256}")
        self.assertLessEqual(len(trusted._memo), 4096)
        self.assertTrue(trusted.trusts("10.0.0.1"))

    def test_chain_joined(self) -> None:
        self.assertEqual(forwarded_for([b"198.51.100.1, 10.0.0.2", b" ,10.0.0.3"], b"10.0.0.4"),
                         b"198.51.100.1, 10.0.0.2, 10.0.0.3, 10.0.0.4")

    @given(st.text(max_size=40))
    def test_parse_network_never_crashes(self, value: str) -> None:
        try:
            parse_network(value)
        except ValueError:
            pass


class OptionTests(SynchronousTestCase):
    def test_repeatable_and_canonical(self) -> None:
        options = Options()
        options.parseOptions(["--ca", "internal", "--trusted-proxy", "10.0.0.0/8",
                              "--trusted-proxy", "2001:DB8::/32", "--trusted-proxy", "192.0.2.7"])
        config = options.config
        assert config is not None
        self.assertEqual(config.trusted_proxy, ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"))
        assert config.trusted_proxies is not None
        self.assertTrue(config.trusted_proxies.trusts("192.0.2.7"))

    def test_errors_name_the_option(self) -> None:
        for bad, fragment in (("10.0.0.1/8", "did you mean 10.0.0.0/8?"), ("lb.example", "is not an IP network"),
                              ("10.0.0.0/33", "is not an IP network")):
            with self.assertRaises(ConfigError) as caught:
                OnDemandConfig(ca=["internal"], trusted_proxy=[bad])
            self.assertEqual(caught.exception.key, "trusted-proxy")
            self.assertIn(fragment, str(caught.exception))

    def test_timeouts(self) -> None:
        config = OnDemandConfig(ca=["internal"])
        self.assertEqual((config.header_timeout, config.idle_timeout), (15.0, 60.0))
        options = Options()
        options.parseOptions(["--ca", "internal", "--header-timeout", "5s", "--idle-timeout", "2m"])
        assert options.config is not None
        self.assertEqual((options.config.header_timeout, options.config.idle_timeout), (5.0, 120.0))
        with self.assertRaises(ConfigError) as caught:
            OnDemandConfig(ca=["internal"], idle_timeout="0")
        self.assertEqual(caught.exception.key, "idle-timeout")


class TwistedWebPathTests(SynchronousTestCase):
    """The twisted.web path (HTTP/2) applies the same rule as the relay."""

    def headers(self) -> Headers:
        return Headers({b"x-forwarded-for": [b"198.51.100.1"], b"x-forwarded-proto": [b"http"],
                        b"x-forwarded-host": [b"other.test"], b"x-real-ip": [b"1.2.3.4"],
                        b"forwarded": [b"for=1.2.3.4"]})

    def test_trusted_peer_chain_kept(self) -> None:
        out = upstream_headers(self.headers(), b"shop.test", "10.0.0.5", trusted_proxies=_trusted("10.0.0.0/8"))
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"198.51.100.1, 10.0.0.5"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"shop.test"])
        self.assertIsNone(out.getRawHeaders(b"x-real-ip"))
        self.assertIsNone(out.getRawHeaders(b"forwarded"))

    def test_other_peer_chain_dropped(self) -> None:
        out = upstream_headers(self.headers(), b"shop.test", "203.0.113.9", trusted_proxies=_trusted("10.0.0.0/8"))
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.9"])
