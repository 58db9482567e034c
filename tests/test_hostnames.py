"""
Tests for L{tenantedge.hostnames}: the table of names that must be refused
before they reach the store or a CA, and the ones that normalise.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tenantedge.hostnames import (
    InvalidHostname,
    host_from_header,
    matches_suffix,
    normalize,
    normalize_suffix,
)

ACCEPTED = [
    (b"shop.acme-corp.com", "shop.acme-corp.com"),
    (b"SHOP.Acme-Corp.COM", "shop.acme-corp.com"),
    (b"shop.acme-corp.com.", "shop.acme-corp.com"),
    (b"a.b", "a.b"),
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
    (b"123.example", "123.example"),
    (b"a" * 63 + b".test", "a" * 63 + ".test"),
    (b".".join([b"a" * 63] * 3) + b"." + b"b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ("bücher.example", "xn--bcher-kva.example"),
]

REFUSED = [
    (b"../../etc/passwd", "empty label"),
    (b"a..b", "empty label"),
    (b"-a.com", "hyphen"),
    (b"a-.com", "hyphen"),
    (b"xn--zzzzzzzz-9999.example", "punycode"),
    (b"ab--cd.example", "reserved"),
    (b"a" * 300, "longer than 253"),
    (b"a" * 64 + b".test", "longer than 63"),
    (b"127.0.0.1", "IP literal"),
    (b"[::1]", "IP literal"),
    (b"::1", "IP literal"),
    (b"*.example.com", "wildcard"),
    (b"exa\x00mple.com", "NUL"),
    ("bücher.example".encode(), "non-ASCII"),
    (b"\xff\xfe.example", "non-ASCII"),
    (b"localhost", "single-label"),
    (b"", "empty"),
    (b".", "empty"),
    (b"under_score.example", "invalid character"),
    (b"a/b.example", "invalid character"),
    (b"a b.example", "invalid character"),
    (b"example.123", "all-numeric"),
    (b"a.b..", "empty label"),
    (b"a\n.b.test", "invalid character"),
    (b"evil.test\n", "invalid character"),
    (b"a\r.b.test", "invalid character"),
    (b"a\t.b.test", "invalid character"),
]


class NormalizeTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        for raw, expected in ACCEPTED:
            self.assertEqual(normalize(raw), expected, raw)

    def test_refused(self) -> None:
        """
        Each hostile or invalid name is refused with a reason that says why
        (and does not echo the name).
        """
        for raw, reason in REFUSED:
            try:
                normalize(raw)
            except InvalidHostname as e:
                self.assertIn(reason, e.reason, raw)
                self.assertNotIn("passwd", e.reason)
            else:
                self.fail(f"{raw!r} was accepted")

    def test_length_limit_counts_after_trailing_dot(self) -> None:
        name = ".".join(["a" * 63] * 3) + "." + "b" * 61
        self.assertEqual(len(name), 253)
        self.assertEqual(normalize(name + "."), name)
        self.assertRaises(InvalidHostname, normalize, name + "b")


class HostHeaderTests(SynchronousTestCase):
    def test_port_dropped(self) -> None:
        self.assertEqual(host_from_header(b"Shop.Example.com:8443"), "shop.example.com")

    def test_no_port(self) -> None:
        self.assertEqual(host_from_header(b"shop.example.com"), "shop.example.com")

    def test_bad_port(self) -> None:
        for value in (b"a.example:", b"a.example:x", b"a.example:123456", b"[::1]:443"):
            self.assertRaises(InvalidHostname, host_from_header, value)


class SuffixTests(SynchronousTestCase):
    def test_normalize_suffix(self) -> None:
        self.assertEqual(normalize_suffix(".LocalHost"), ".localhost")
        self.assertEqual(normalize_suffix("example.com"), ".example.com")
        self.assertRaises(InvalidHostname, normalize_suffix, "..")

    def test_matches(self) -> None:
        self.assertTrue(matches_suffix("a.example.com", ".example.com", include_apex=False))
        self.assertFalse(matches_suffix("example.com", ".example.com", include_apex=False))
        self.assertTrue(matches_suffix("example.com", ".example.com", include_apex=True))
        self.assertFalse(matches_suffix("badexample.com", ".example.com", include_apex=True))


class IPLiteralTests(SynchronousTestCase):
    def test_fast_path_agrees(self) -> None:
        """The character pre-check never changes the answer ipaddress gives."""
        import ipaddress

        from tenantedge.hostnames import _is_ip_literal

        def slow(name: str) -> bool:
            candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                return False
            return True

        for name in ("shop.acme-corp.com", "127.0.0.1", "[::1]", "::1", "fe80::1%eth0", "[fe80::1%25eth0]",
                     "dead.beef", "1.2.3.4.5", "abc", "0x7f.1", "::ffff:127.0.0.1", "1.2.3.04", ""):
            self.assertEqual(_is_ip_literal(name), slow(name), name)
