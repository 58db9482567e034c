"""
Tests for L{tenantedge.options.Options} and L{tenantedge.config}: defaults,
TOML config, the command line winning, the demo defaults, one-line errors
for bad values, and the configuration value on its own.
"""

from __future__ import annotations

import os

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.config import ConfigError, OnDemandConfig, parse_duration, parse_size
from tenantedge.options import Options


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
        self.assertEqual(o["backend"], ("http://127.0.0.1:3000",))
        self.assertEqual(o["backend-health-path"], None)
        self.assertEqual(o["backend-health-interval"], 5.0)
        self.assertEqual(o["store"], "/var/lib/tenantedge")
        self.assertEqual(o["ca"], ("https://acme-v02.api.letsencrypt.org/directory",))
        self.assertEqual(o["key-type"], "ecdsa-p256")
        self.assertEqual(o["challenge"], "http-01")
        self.assertEqual(o["allow-suffix"], ())
        self.assertEqual(o.config.static_policy.allow_suffixes, ())

    def test_repeatable(self) -> None:
        o = self.parse("--allow-suffix", ".a.example.com", "--allow-suffix", "b.example.com", "--deny", ".own.example.com", "--deny", "www.x.example.com")
        self.assertEqual(o.config.static_policy.allow_suffixes, (".a.example.com", ".b.example.com"))
        self.assertEqual(o.config.static_policy.deny, (".own.example.com", "www.x.example.com"))

    def test_several_backends(self) -> None:
        """--backend repeats (http:// and unix: sockets mix), in a TOML list too; the command line replaces the file's."""
        o = self.parse("--backend", "http://127.0.0.1:3001", "--backend", "unix:/run/app/2.sock",
                       "--backend-health-path", "/healthz", "--backend-health-interval", "2s")
        self.assertEqual(o.config.backend, ("http://127.0.0.1:3001", "unix:/run/app/2.sock"))
        self.assertEqual((o.config.backend_health_path, o.config.backend_health_interval), ("/healthz", 2.0))
        path = self.config('backend = ["http://127.0.0.1:3001", "http://127.0.0.1:3002"]\n')
        self.assertEqual(self.parse("--config", path).config.backend, ("http://127.0.0.1:3001", "http://127.0.0.1:3002"))
        self.assertEqual(self.parse("--config", path, "--backend", "http://10.0.0.1:3000").config.backend,
                         ("http://10.0.0.1:3000",))
        single = self.config('backend = "https://app.internal:8443"\n')
        self.assertEqual(self.parse("--config", single).config.backend, ("https://app.internal:8443",))

    def test_config_file(self) -> None:
        path = self.config(
            'https = "tcp:9443"\nallow_suffix = [".a.example.com", ".b.example.com"]\ncache-size = 5\n'
            'backend-timeout = "2m"\ndeny = "www.own.example.com"\n'
        )
        o = self.parse("--config", path)
        self.assertEqual(o["https"], "tcp:9443")
        self.assertEqual(o["allow-suffix"], (".a.example.com", ".b.example.com"))
        self.assertEqual(o["cache-size"], 5)
        self.assertEqual(o["backend-timeout"], 120.0)
        self.assertEqual(o["deny"], ("www.own.example.com",))

    def test_command_line_wins(self) -> None:
        """
        A command-line value beats the file's, and a repeated option given
        on the command line replaces the file's list instead of adding to it.
        """
        path = self.config('https = "tcp:9443"\nallow-suffix = [".a.example.com"]\n')
        o = self.parse("--config", path, "--https", "tcp:7443", "--allow-suffix", ".c.example.com")
        self.assertEqual(o["https"], "tcp:7443")
        self.assertEqual(o["allow-suffix"], (".c.example.com",))

    def test_demo(self) -> None:
        o = self.parse("--demo")
        self.assertEqual(o["https"], "tcp:8443:interface=127.0.0.1")
        self.assertEqual(o["http"], "tcp:8080:interface=127.0.0.1")
        self.assertEqual(o["store"], os.path.abspath("tenantedge-demo"))
        self.assertEqual(o.config.static_policy.allow_suffixes, (".localhost",))
        self.assertEqual(o["ca"], ("internal",))

    def test_public_suffix_rule(self) -> None:
        """
        The public-suffix rule is on whenever a public CA may be asked, off
        for the local CA alone or with --allow-private-suffix.
        """
        self.assertTrue(self.parse().config.static_policy.require_public_suffix)
        self.assertTrue(self.parse("--ca", "letsencrypt", "--ca", "internal").config.static_policy.require_public_suffix)
        self.assertFalse(self.parse("--ca", "internal").config.static_policy.require_public_suffix)
        self.assertFalse(self.parse("--allow-private-suffix").config.static_policy.require_public_suffix)

    def test_ca_list(self) -> None:
        """--ca repeats for fallback; aliases become directory URLs."""
        o = self.parse("--ca", "letsencrypt-staging", "--ca", "https://acme.zerossl.com/v2/DV90", "--ca", "internal")
        self.assertEqual(
            o["ca"],
            ("https://acme-staging-v02.api.letsencrypt.org/directory", "https://acme.zerossl.com/v2/DV90", "internal"),
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
            (["--backend", "http://127.0.0.1:3000", "--backend", "https://127.0.0.1:3001"], "all https:// or none"),
            (["--backend", "http://a.test/app", "--backend", "http://b.test/"], "the same path"),
            (["--backend", "unix:/run/a.sock", "--backend", "unix:/run/a.sock"], "twice"),
            (["--backend-health-path", "healthz"], "--backend-health-path"),
            (["--backend-health-interval", "0"], "more than zero"),
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
        self.assertEqual(self.parse()["max-body-size"], 0)  # no limit: bodies stream
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
        self.assertEqual(options["ca"], ("https://acme-staging-v02.api.letsencrypt.org/directory",))
        self.assertEqual(options.config.static_policy.allow_suffixes, (".tenants.example.net",))


class ConfigValueTests(SynchronousTestCase):
    """The configuration value on its own, as an embedder builds it."""

    def test_typed_construction(self) -> None:
        """Durations, sizes and lists take Python values or strings alike."""
        config = OnDemandConfig(
            store="/srv/certs", ca=["internal"], allow_suffix=[".localhost"], renew_before="10d",
            max_body_size="1M", hello_timeout=2,
        )
        self.assertEqual(config.renew_before, 10 * 86400)
        self.assertEqual(config.max_body_size, 1024 * 1024)
        self.assertEqual(config.hello_timeout, 2.0)
        self.assertEqual(config.ca, ("internal",))
        self.assertEqual(config.static_policy.allow_suffixes, (".localhost",))

    def test_frozen(self) -> None:
        import attrs

        config = OnDemandConfig(ca=["internal"])
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config, "store", "/x")

    def test_errors_name_the_setting(self) -> None:
        """Each bad value is one ConfigError naming its setting, however it was given."""
        cases = [
            ({"renew_before": "soon"}, "renew-before"),
            ({"max_body_size": "lots"}, "max-body-size"),
            ({"ca": ["ftp://x"]}, "ca"),
            ({"challenge": "dns-01"}, "challenge"),
            ({"https": "nonsense:1"}, "https"),
            ({"cache_size": 0}, "cache-size"),
        ]
        for kwargs, key in cases:
            e = self.assertRaises(ConfigError, OnDemandConfig, **kwargs)
            self.assertEqual(e.key, key, kwargs)
            self.assertNotIn("\n", str(e))
        e = self.assertRaises(ConfigError, OnDemandConfig.from_settings, {"no-such": "1"})
        self.assertEqual(e.key, "no-such")

    def test_dead_allow_suffix_is_a_start_up_error(self) -> None:
        """
        An allow rule no name can ever pass (a suffix outside every public
        suffix while a public CA may be asked) is refused, naming the rule.
        """
        e = self.assertRaises(ConfigError, OnDemandConfig, allow_suffix=[".localhost"])
        self.assertEqual(e.key, "allow-suffix")
        self.assertIn(".localhost", str(e))
        OnDemandConfig(allow_suffix=[".localhost"], allow_private_suffix=True)
        OnDemandConfig(allow_suffix=[".localhost"], ca=["internal"])

    def test_allow_suffix_denied_whole_is_a_start_up_error(self) -> None:
        """
        An allow suffix that a deny rule covers entirely (a suffix above it,
        or the same one) is refused, naming both; a deny rule inside it, or
        a single name, leaves the rest allowed.
        """
        for deny in (".example.com", ".tenants.example.com", ".EXAMPLE.com"):
            e = self.assertRaises(ConfigError, OnDemandConfig, allow_suffix=[".tenants.example.com"], deny=[deny])
            self.assertEqual(e.key, "allow-suffix")
            self.assertIn("deny=.", str(e))
        for deny in (".a.tenants.example.com", ".x.tenants.example.com", ".X.Tenants.Example.Com.",
                     "tenants.example.com", "www.example.com", ".example.org", ".ants.example.com"):
            OnDemandConfig(allow_suffix=[".tenants.example.com"], deny=[deny])

    def test_policy_description(self) -> None:
        """The banner states the effective policy, rules and conditions."""
        config = OnDemandConfig(allow_suffix=[".tenants.example.com"], deny=[".internal.tenants.example.com"])
        text = config.describe_policy()
        self.assertIn("names under .tenants.example.com", text)
        self.assertIn("under a public suffix", text)
        self.assertIn(".internal.tenants.example.com", text)
        self.assertIn("no name", OnDemandConfig().describe_policy())

    def test_eab_key_file(self) -> None:
        """The EAB HMAC key can come from a file and never shows in repr."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("c2VjcmV0LWhtYWMta2V5\n")
        os.chmod(path, 0o644)
        e = self.assertRaises(ConfigError, OnDemandConfig, eab_kid="kid-1", eab_hmac_key_file=path)
        self.assertIn("chmod 600", str(e))  # a secret others can read is refused
        os.chmod(path, 0o600)
        config = OnDemandConfig(eab_kid="kid-1", eab_hmac_key_file=path)
        self.assertEqual(config.eab, ("kid-1", "c2VjcmV0LWhtYWMta2V5"))
        self.assertNotIn("c2VjcmV0", repr(config))
        e = self.assertRaises(ConfigError, OnDemandConfig, eab_kid="k", eab_hmac_key_file="/nonexistent")
        self.assertEqual(e.key, "eab-hmac-key-file")

    def test_store_directory_made_absolute(self) -> None:
        self.assertEqual(OnDemandConfig(store="rel").store, os.path.abspath("rel"))


class HelpTests(SynchronousTestCase):
    def test_human_defaults_and_clean_text(self) -> None:
        """--help shows 30d and 0 (no body limit), not 2592000.0, and no docstring indentation."""
        text = str(Options())
        self.assertIn("[default: 30d]", text)
        self.assertIn("0: no limit (the default)", " ".join(text.split()))
        self.assertIn("[default: 12h]", text)
        self.assertNotIn("2592000", text)
        self.assertNotIn("67108864", text)
        self.assertNotIn("  CA)", text)
        self.assertIn("Durations are seconds or take a unit", text)

    def test_bad_toml_key_is_one_line(self) -> None:
        """A bad key in the TOML file is one line naming the file and the key, not the whole --help."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('renew-before = "soon"\n')
        e = self.assertRaises(UsageError, Options().parseOptions, ["--config", path])
        self.assertIn(path, str(e))
        self.assertIn("'renew-before'", str(e))
        self.assertNotIn("\n", str(e))


class PrecheckAndLimitSettingsTests(SynchronousTestCase):
    def config(self, **values):
        from tenantedge.config import OnDemandConfig

        return OnDemandConfig(store="/tmp/x", **values)

    def test_dns_precheck_needs_public_address(self) -> None:
        from tenantedge.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            self.config(precheck=["dns"])
        self.assertEqual(caught.exception.key, "public-address")
        config = self.config(precheck=["dns", "reach"], public_address=["203.0.113.1", "2001:DB8::1"],
                             precheck_resolver=["127.0.0.1:5353", "[::1]", "192.0.2.53"])
        self.assertEqual(config.public_address, ("203.0.113.1", "2001:db8::1"))
        self.assertEqual(config.precheck_servers, [("127.0.0.1", 5353), ("::1", 53), ("192.0.2.53", 53)])
        for bad in ({"precheck": ["ping"]}, {"public_address": ["nope"]}, {"precheck_resolver": ["1.2.3.4:x"]}):
            self.assertRaises(ConfigError, self.config, **bad)

    def test_reach_needs_http_01(self) -> None:
        from tenantedge.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            self.config(precheck=["reach"], challenge="tls-alpn-01")
        self.assertEqual(caught.exception.key, "precheck")

    def test_limits_per_ca_defaults(self) -> None:
        """Let's Encrypt's windows for its directories only, unless ca-limits says otherwise."""
        from tenantedge.config import CA_ALIASES, ConfigError

        pebble = "https://localhost:14000/dir"
        config = self.config(ca=["letsencrypt", "letsencrypt-staging", pebble])
        self.assertEqual([config.limits_profile(ca) for ca in config.ca], ["letsencrypt", "letsencrypt", "none"])
        config = self.config(ca=["letsencrypt", pebble], ca_limits=[f"{pebble}=letsencrypt", "letsencrypt=none"])
        self.assertEqual([config.limits_profile(ca) for ca in config.ca], ["none", "letsencrypt"])
        self.assertEqual(config.caa_identity_for(CA_ALIASES["letsencrypt"]), "letsencrypt.org")
        self.assertIsNone(config.caa_identity_for(pebble))
        config = self.config(ca=[pebble], caa_identity=[f"{pebble}=Pebble.Example."])
        self.assertEqual(config.caa_identity_for(pebble), "pebble.example")
        for bad in ({"ca_limits": ["letsencrypt=none"]}, {"ca_limits": [f"{pebble}=some"]},
                    {"caa_identity": [f"{pebble}=not a domain"]}):
            self.assertRaises(ConfigError, self.config, ca=[pebble], **bad)
