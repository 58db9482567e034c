"""
Tests for L{tenantedge.tap.Options}: defaults, TOML config, the command
line winning, the demo defaults, and one-line errors for bad values.
"""

from __future__ import annotations

import os

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.tap import Options, parse_duration, parse_size


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def config(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        o = self.parse()
        self.assertEqual(o["https"], "tcp:443")
        self.assertEqual(o["http"], "tcp:80")
        self.assertEqual(o["backend"], "http://127.0.0.1:3000")
        self.assertEqual(o["store"], "/var/lib/tenantedge")
        self.assertEqual(o["ca"], ["https://acme-v02.api.letsencrypt.org/directory"])
        self.assertEqual(o["key-type"], "ecdsa-p256")
        self.assertEqual(o["challenge"], "http-01")
        self.assertEqual(o["allow-suffix"], [])
        self.assertEqual(o["static-policy"].allow_suffixes, ())

    def test_repeatable(self) -> None:
        o = self.parse("--allow-suffix", ".a.test", "--allow-suffix", "b.test", "--deny", ".own.test", "--deny", "www.x.test")
        self.assertEqual(o["static-policy"].allow_suffixes, (".a.test", ".b.test"))
        self.assertEqual(o["static-policy"].deny, (".own.test", "www.x.test"))

    def test_config_file(self) -> None:
        path = self.config(
            'https = "tcp:9443"\nallow_suffix = [".a.test", ".b.test"]\ncache-size = 5\n'
            'backend-timeout = "2m"\ndeny = "www.own.test"\n'
        )
        o = self.parse("--config", path)
        self.assertEqual(o["https"], "tcp:9443")
        self.assertEqual(o["allow-suffix"], [".a.test", ".b.test"])
        self.assertEqual(o["cache-size"], 5)
        self.assertEqual(o["backend-timeout"], 120.0)
        self.assertEqual(o["deny"], ["www.own.test"])

    def test_command_line_wins(self) -> None:
        """
        A command-line value beats the file's, and a repeated option given
        on the command line replaces the file's list instead of adding to it.
        """
        path = self.config('https = "tcp:9443"\nallow-suffix = [".a.test"]\n')
        o = self.parse("--config", path, "--https", "tcp:7443", "--allow-suffix", ".c.test")
        self.assertEqual(o["https"], "tcp:7443")
        self.assertEqual(o["allow-suffix"], [".c.test"])

    def test_demo(self) -> None:
        o = self.parse("--demo")
        self.assertEqual(o["https"], "tcp:8443:interface=127.0.0.1")
        self.assertEqual(o["http"], "tcp:8080:interface=127.0.0.1")
        self.assertEqual(o["store"], os.path.abspath("tenantedge-demo"))
        self.assertEqual(o["static-policy"].allow_suffixes, (".localhost",))
        self.assertEqual(o["ca"], ["internal"])

    def test_public_suffix_rule(self) -> None:
        """
        The public-suffix rule is on whenever a public CA may be asked, off
        for the local CA alone or with --allow-private-suffix.
        """
        self.assertTrue(self.parse()["static-policy"].require_public_suffix)
        self.assertTrue(self.parse("--ca", "letsencrypt", "--ca", "internal")["static-policy"].require_public_suffix)
        self.assertFalse(self.parse("--ca", "internal")["static-policy"].require_public_suffix)
        self.assertFalse(self.parse("--allow-private-suffix")["static-policy"].require_public_suffix)

    def test_ca_list(self) -> None:
        """--ca repeats for fallback; aliases become directory URLs."""
        o = self.parse("--ca", "letsencrypt-staging", "--ca", "https://acme.zerossl.com/v2/DV90", "--ca", "internal")
        self.assertEqual(
            o["ca"],
            ["https://acme-staging-v02.api.letsencrypt.org/directory", "https://acme.zerossl.com/v2/DV90", "internal"],
        )

    def test_demo_explicit_wins(self) -> None:
        o = self.parse("--demo", "--https=tcp:9999")
        self.assertEqual(o["https"], "tcp:9999")

    def test_bad_values(self) -> None:
        """Each bad value is a UsageError with a message naming it."""
        cases = [
            (["--backend", "ftp://x"], "ftp://x"),
            (["--https", "nonsense:1"], "--https"),
            (["--cache-size", "0"], "at least 1"),
            (["--backend-timeout", "soon"], "duration"),
            (["--allow-suffix", "a..b"], "--allow-suffix"),
            (["--ca", "http://ca.example/dir"], "https://"),
            (["--ca", "letsencrypt", "--ca", "letsencrypt"], "twice"),
            (["--key-type", "dsa"], "not one of"),
            (["--challenge", "dns-01"], "not one of"),
            (["--eab-kid", "x"], "go together"),
            (["--ca-root", "/nonexistent.pem"], "--ca-root"),
            (["--ca-root", self.config("not a pem")], "no PEM certificate"),
            (["--allow-url", "https://api.test/check"], "{domain}"),
            (["--allow-url", "ftp://api.test/{domain}"], "http"),
            (["--allow-url", "https://a.test/{domain}", "--ask", "https://a.test/ask"], "not both"),
            (["--allow-ca", "/nonexistent.pem"], "--allow-ca"),
            (["--config", "/nonexistent/x.toml"], "cannot read"),
            (["--config", self.config("nope = 1\n")], "unknown option 'nope'"),
            (["--config", self.config("https = [1]\n")], "single value"),
            (["--config", self.config("this is not toml")], "not valid TOML"),
            (["--config", self.config("demo = 1\n")], "true or false"),
        ]
        for argv, needle in cases:
            e = self.assertRaises(UsageError, self.parse, *argv)
            self.assertIn(needle, str(e), argv)
            self.assertNotIn("\n", str(e))

    def test_sizes(self) -> None:
        self.assertEqual(parse_size("1048576"), 1048576)
        self.assertEqual(parse_size("512K"), 512 * 1024)
        self.assertEqual(parse_size("64M"), 64 * 1024**2)
        self.assertEqual(parse_size("2g"), 2 * 1024**3)
        self.assertEqual(parse_size("0"), 0)
        self.assertEqual(self.parse()["max-body-size"], 64 * 1024**2)
        for bad in ("", "x", "1T", "-1"):
            self.assertRaises(ValueError, parse_size, bad)

    def test_durations(self) -> None:
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("10m"), 600)
        self.assertEqual(parse_duration("7d"), 604800)
        for bad in ("", "0", "-1", "1w", "x"):
            self.assertRaises(ValueError, parse_duration, bad)


class SampleConfigTests(SynchronousTestCase):
    def test_sample_config_parses(self) -> None:
        """etc/tenantedge.toml stays a valid configuration."""
        sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "tenantedge.toml")
        options = Options()
        options.parseOptions(["--config", sample])
        self.assertEqual(options["ca"], ["https://acme-staging-v02.api.letsencrypt.org/directory"])
        self.assertEqual(options["static-policy"].allow_suffixes, (".tenants.example.net",))
