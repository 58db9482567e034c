r"""
The C{tenantedge:} endpoint string: the parser (every kind of key and every
kind of bad string), the plugin as C{serverFromString} finds it, the
lifetime of what C{listen} starts (on loopback, local CA), and C{twistd web
--listen 'tenantedge:...'} as a real process against Pebble.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    _parse,
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface import implementer
from zope.interface.verify import verifyObject

import tenantedge.endpoint
from tenantedge.config import OnDemandConfig
from tenantedge.endpoint import (
    EndpointStringError,
    OnDemandEndpoint,
    OnDemandPort,
    TenantEdgeParser,
    endpoint_description,
    endpoint_keys,
    split_description,
)
from tenantedge.listening import ListenFailed
from tenantedge.service import OnDemandTLS, StartupError
from tenantedge.testing import write_https_material

from .support.pebble import Pebble, free_port
from .support.processes import require_tool, run, terminate

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tenantedge.endpoint.__file__)))


class ServerProcess(protocol.ProcessProtocol):
    """
    A server under test in its own process: its output (stdout and stderr
    together), a wait for a line in it, and a stop by PID.
    """

    def __init__(self) -> None:
        self.output = b""
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.process: Any = None
        self._ended: defer.Deferred[None] = defer.Deferred()
        self._watch: list[tuple[re.Pattern[bytes], defer.Deferred[re.Match[bytes]]]] = []

    @classmethod
    def start(cls, testcase: TestCase, executable: str, args: list[str], cwd: str | None = None) -> ServerProcess:
        """Spawn it; stopped (SIGTERM by PID) at the test's cleanup."""
        server = cls()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        server.process = reactor.spawnProcess(server, executable, [executable, *args], env=env, path=cwd)
        testcase.addCleanup(server.stop)
        return server

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for entry in list(self._watch):
            match = entry[0].search(self.output)
            if match is not None:
                self._watch.remove(entry)
                entry[1].callback(match)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        watch, self._watch = self._watch, []
        for pattern, waiting in watch:
            waiting.errback(AssertionError(f"exited ({self.exit_code}) before printing {pattern.pattern!r}:\n"
                                           + self.text[-3000:]))
        self._ended.callback(None)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def wait_for(self, pattern: bytes, timeout: float = 60) -> re.Match[bytes]:
        """The first match of C{pattern} in the output, once it is there."""
        match = re.compile(pattern).search(self.output)
        if match is not None:
            return match
        if self._ended.called:
            raise AssertionError(f"exited ({self.exit_code}) without printing {pattern!r}:\n{self.text[-3000:]}")
        waiting: defer.Deferred[re.Match[bytes]] = defer.Deferred()
        self._watch.append((re.compile(pattern), waiting))
        waiting.addTimeout(timeout, reactor)
        try:
            return await waiting
        except defer.TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text[-3000:]}") from None

    def ended(self) -> defer.Deferred[None]:
        """Fires when the process has ended."""
        done: defer.Deferred[None] = defer.Deferred()

        def relay(result: object) -> object:
            done.callback(None)
            return result

        self._ended.addBoth(relay)
        return done

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM it (by PID) unless it has ended; fires once it has."""
        if self._ended.called:
            return defer.succeed(None)
        return terminate(self.process, self.ended())


def pem_file(testcase: TestCase) -> str:
    """A PEM certificate file (for ca-root= and allow-ca=)."""
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    return write_https_material(directory)[0]


def parse(description: str, reactor: Any = None) -> OnDemandEndpoint:
    endpoint = serverFromString(reactor or MemoryReactor(), description)
    assert isinstance(endpoint, OnDemandEndpoint)
    return endpoint


class PluginTests(TestCase):
    def test_found_and_provides_interface(self) -> None:
        """
        Twisted's plugin lookup finds a C{tenantedge} string parser that
        provides the interface, as does the parser it hands over to.
        """
        found = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "tenantedge"]
        self.assertEqual(len(found), 1)
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, found[0]))
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, TenantEdgeParser()))

    def test_server_from_string(self) -> None:
        """C{serverFromString} gives an endpoint around the inner one."""
        endpoint = parse(r"tenantedge:tcp\:8443\:interface\=127.0.0.1:store=/srv/certs:ca=internal")
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        self.assertIsInstance(endpoint.inner, TCP4ServerEndpoint)
        self.assertEqual((endpoint.inner._port, endpoint.inner._interface), (8443, "127.0.0.1"))
        self.assertEqual(endpoint.config.store, "/srv/certs")
        self.assertEqual(endpoint.config.ca, ("internal",))
        self.assertEqual(endpoint.description, "tcp:8443:interface=127.0.0.1")

    def test_prefix_case(self) -> None:
        """Twisted matches prefixes without case; so does the read-back of repeated keys."""
        endpoint = parse(r"TenantEdge:tcp\:0:ca=internal:deny=a.test:deny=b.test")
        self.assertEqual(endpoint.config.deny, ("a.test", "b.test"))

    def test_plugin_module_is_light(self) -> None:
        """
        Twisted loads the plugin module for every endpoint string plugin
        lookup: it imports nothing from tenantedge (whose package imports
        the TLS and ACME stack) until a tenantedge: string is parsed.
        """
        probe = (
            "import sys, twisted.plugins.tenantedge_endpoint as p\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tenantedge', 'cryptography', 'OpenSSL',"
            " 'acme', 'treq')))\n"
            "print(p.tenantedge_endpoint.prefix)\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", timeout=120)
        self.assertEqual(out.stdout.split("\n")[:2], ["[]", "tenantedge"], out.stderr)


    def test_regular_install(self) -> None:
        """
        A non-editable install carries C{twisted/plugins/tenantedge_endpoint.py}
        (there is no C{__init__.py} in C{twisted/plugins/}, the classic trap)
        and C{serverFromString} finds the parser from there. Built from a copy
        of the sources, so it cannot race another test's build directory.
        """
        source = os.path.abspath(self.mktemp())
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "_trial_temp*", "build", "dist", "*.egg-info", "apidocs", ".hypothesis", "tests.test_*",
            "__pycache__", "dropin.cache", "tenantedge-demo", "tenantedge-example"))
        target = os.path.abspath(self.mktemp())
        build = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--target", target, source],
            capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(build.returncode, 0, build.stderr)
        self.assertTrue(os.path.exists(os.path.join(target, "twisted", "plugins", "tenantedge_endpoint.py")))
        probe = (
            "import tenantedge, twisted.plugins.tenantedge_endpoint as p\n"
            "from twisted.internet.endpoints import serverFromString\n"
            "from twisted.internet.testing import MemoryReactor\n"
            "e = serverFromString(MemoryReactor(), r'tenantedge:tcp\\:0:ca=internal:deny=a.test:deny=b.test')\n"
            "print(p.__file__, tenantedge.__file__, e.config.deny)\n"
        )
        # -S: no site processing, so the editable install's path entry for
        # this checkout is not there; only the target and the dependencies.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, sysconfig.get_paths()["purelib"]]))
        out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd="/", env=env,
                             timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        plugin, package, deny = out.stdout.strip().split(" ", 2)
        self.assertTrue(plugin.startswith(target) and package.startswith(target), out.stdout)
        self.assertEqual(deny, "('a.test', 'b.test')")


class ParserTests(TestCase):
    """Every kind of key, written as in an endpoint string."""

    def test_values(self) -> None:
        endpoint = parse(
            r"tenantedge:tcp\:443:store=/var/lib/edge:ca=letsencrypt-staging:email=ops@example.com"
            r":key-type=rsa2048:challenge=tls-alpn-01:allow-url=https\://api.example.com/check/{domain}"
            r":http=none"
        )
        config = endpoint.config
        self.assertEqual(config.store, "/var/lib/edge")
        self.assertEqual(config.ca, ("https://acme-staging-v02.api.letsencrypt.org/directory",))
        self.assertEqual(config.email, "ops@example.com")
        self.assertEqual(config.key_type, "rsa2048")
        self.assertEqual(config.challenge, "tls-alpn-01")
        self.assertEqual(config.allow_url, "https://api.example.com/check/{domain}")

    def test_ask(self) -> None:
        config = parse(r"tenantedge:tcp\:443:ask=https\://api.example.com/ask").config
        self.assertEqual(config.ask, "https://api.example.com/ask")

    def test_durations_and_numbers(self) -> None:
        config = parse(
            r"tenantedge:tcp\:443:ca=internal:renew-before=10d:renew-check-interval=12h:allow-ttl=90s"
            r":deny-ttl=2m:issue-timeout=30:hello-timeout=250ms:internal-validity=3d:cache-size=5"
            r":max-concurrent-issuance=2:max-new-orders=10:max-certs-per-domain=7:store-poll=1s"
        ).config
        self.assertEqual(
            (config.renew_before, config.renew_check_interval, config.allow_ttl, config.deny_ttl),
            (864000.0, 43200.0, 90.0, 120.0),
        )
        self.assertEqual((config.issue_timeout, config.hello_timeout, config.internal_validity),
                         (30.0, 0.25, 259200.0))
        self.assertEqual(
            (config.cache_size, config.max_concurrent_issuance, config.max_new_orders, config.max_certs_per_domain),
            (5, 2, 10, 7),
        )
        self.assertEqual(config.store_poll, 1.0)

    def test_every_key(self) -> None:
        """
        Every key the endpoint takes, each on its own (with what it needs
        beside it), lands in the configuration; a new setting fails this
        test until it is listed here.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        secret = os.path.join(directory, "secret")
        with open(secret, "w") as f:
            f.write("c2VjcmV0LXZhbHVlLWZvci10ZXN0cw\n")
        os.chmod(secret, 0o600)
        pem = pem_file(self)
        redis = r"store=rediss\://127.0.0.1\:6380/0"
        # key: (value as written, what the configuration holds, other keys it needs)
        cases: dict[str, tuple[str, Any, str]] = {
            "http": (r"tcp\:8080", "tcp:8080", ""),
            "retire-after": ("2d", 172800.0, ""),
            "max-connections": ("100", 100, ""),
            "max-connections-per-address": ("10", 10, ""),
            "max-allow-checks": ("3", 3, ""),
            "store": ("/srv/edge", "/srv/edge", ""),
            "store-password-file": (secret, secret, redis),
            "store-ca": (pem, pem, redis),
            "store-lock-ttl": ("45s", 45.0, redis),
            "ca": ("letsencrypt-staging", ("https://acme-staging-v02.api.letsencrypt.org/directory",), ""),
            "ca-root": (pem, (pem,), ""),
            "email": ("ops@example.com", "ops@example.com", ""),
            "key-type": ("rsa2048", "rsa2048", ""),
            "challenge": ("tls-alpn-01", "tls-alpn-01", ""),
            "eab-kid": ("kid-1", "kid-1", f"eab-hmac-key-file={secret}"),
            "eab-hmac-key-file": (secret, secret, "eab-kid=kid-1"),
            "internal-validity": ("3d", 259200.0, ""),
            "allow-url": (r"https\://api.example.com/{domain}", "https://api.example.com/{domain}", ""),
            "ask": (r"https\://api.example.com/ask", "https://api.example.com/ask", ""),
            "allow-ca": (pem, (pem,), ""),
            "allow-timeout": ("2s", 2.0, ""),
            "allow-ttl": ("5m", 300.0, ""),
            "deny-ttl": ("30s", 30.0, ""),
            "allow-suffix": (".tenants.example.com", (".tenants.example.com",), ""),
            "deny": ("www.example.com", ("www.example.com",), ""),
            "allow-private-suffix": ("yes", True, ""),
            "max-concurrent-issuance": ("2", 2, ""),
            "max-new-orders": ("10", 10, ""),
            "max-certs-per-domain": ("7", 7, ""),
            "ca-limits": ("letsencrypt=none", ("https://acme-v02.api.letsencrypt.org/directory=none",), ""),
            "precheck": ("dns", ("dns",), "public-address=203.0.113.7"),
            "public-address": ("203.0.113.7", ("203.0.113.7",), ""),
            "precheck-resolver": ("127.0.0.1", ("127.0.0.1:53",), "precheck=dns:public-address=203.0.113.7"),
            "precheck-timeout": ("2s", 2.0, ""),
            "precheck-renewals": ("yes", True, "precheck=dns:public-address=203.0.113.7"),
            "caa-identity": ("letsencrypt=letsencrypt.org",
                             ("https://acme-v02.api.letsencrypt.org/directory=letsencrypt.org",), ""),
            "webhook": (r"https\://hooks.example.com/in", ("https://hooks.example.com/in",),
                        f"webhook-secret-file={secret}"),
            "webhook-secret-file": (secret, secret, ""),
            "webhook-outbox": ("/srv/outbox", "/srv/outbox", ""),
            "renew-check-interval": ("6h", 21600.0, ""),
            "renew-before": ("10d", 864000.0, ""),
            "store-poll": ("2s", 2.0, ""),
            "cache-size": ("5", 5, ""),
            "hello-timeout": ("250ms", 0.25, ""),
            "issue-timeout": ("30", 30.0, ""),
        }
        self.assertEqual(sorted(cases), sorted(endpoint_keys()))
        for key, (written, expected, needs) in cases.items():
            extra = f":{needs}" if needs else ""
            try:
                config = parse(rf"tenantedge:tcp\:443:{key}={written}{extra}").config
            except EndpointStringError as e:
                self.fail(f"{key}={written}: {e}")
            self.assertEqual(getattr(config, key.replace("-", "_")), expected, key)

    def test_repeated_lists(self) -> None:
        """A repeated list key keeps every value, in order."""
        first, second = pem_file(self), pem_file(self)
        config = parse(
            rf"tenantedge:tcp\:443:ca=https\://ca.example/dir:ca=internal:ca-root={first}:ca-root={second}"
            rf":allow-ca={second}:allow-ca={first}:allow-suffix=.a.test:allow-suffix=.b.test"
            r":deny=x.a.test:deny=.c.test:allow-private-suffix=yes"
        ).config
        self.assertEqual(config.ca, ("https://ca.example/dir", "internal"))
        self.assertEqual(config.ca_root, (first, second))
        self.assertEqual(config.allow_ca, (second, first))
        self.assertEqual(config.allow_suffix, (".a.test", ".b.test"))
        self.assertEqual(config.deny, ("x.a.test", ".c.test"))

    def test_single_list_value(self) -> None:
        config = parse(r"tenantedge:tcp\:443:ca=internal:deny=x.test").config
        self.assertEqual(config.deny, ("x.test",))

    def test_flags(self) -> None:
        """Flags are key=yes or key=no (true/false, on/off, 1/0 as everywhere)."""
        yes = parse(r"tenantedge:tcp\:443:ca=internal:allow-private-suffix=yes").config
        no = parse(r"tenantedge:tcp\:443:ca=internal:allow-private-suffix=no").config
        self.assertEqual((yes.allow_private_suffix, no.allow_private_suffix), (True, False))

    def test_underscores(self) -> None:
        """Underscored names are taken as the dashed ones, as by every front door."""
        config = parse(r"tenantedge:tcp\:443:ca=internal:allow_suffix=.test:renew_before=5d").config
        self.assertEqual((config.allow_suffix, config.renew_before), ((".test",), 432000.0))

    def test_http(self) -> None:
        """
        C{http=} is the port-80 endpoint, C{tcp:80} by default as for the
        plugin; C{http=none} means none, where no CA needs it.
        """
        endpoint = parse(r"tenantedge:tcp\:443:http=tcp\:8080\:interface\=127.0.0.1")
        self.assertIsInstance(endpoint.http, TCP4ServerEndpoint)
        self.assertEqual((endpoint.http._port, endpoint.http._interface), (8080, "127.0.0.1"))
        default = parse(r"tenantedge:tcp\:443")
        self.assertEqual((default.config.http, default.http._port), ("tcp:80", 80))
        self.assertIsNone(parse(r"tenantedge:tcp\:443:http=none:challenge=tls-alpn-01").http)
        self.assertIsNone(parse(r"tenantedge:tcp\:443:http=none:ca=internal").http)

    def test_http_none_with_http01(self) -> None:
        """
        C{http=none} with an ACME CA validating HTTP-01 is refused: the
        answers live in this process and nothing would serve them.
        """
        error = self.assertRaises(EndpointStringError, parse, r"tenantedge:tcp\:443:http=none")
        self.assertEqual(error.key, "http")
        self.assertTrue(str(error).startswith("tenantedge endpoint: http=none: "), str(error))
        self.assertIn("challenge=tls-alpn-01", str(error))
        # The same for a fallback chain with an ACME CA in it.
        self.assertRaises(EndpointStringError, parse, r"tenantedge:tcp\:443:http=none:ca=internal:ca=letsencrypt")

    def test_http_none_in_python(self) -> None:
        """The Python constructor refuses the same combination."""
        from tenantedge.config import ConfigError

        error = self.assertRaises(ConfigError, OnDemandConfig, http="none")
        self.assertEqual(error.key, "http")
        OnDemandConfig(http="none", challenge="tls-alpn-01")
        OnDemandConfig(http="none", ca=["internal"])

    def test_inner_with_unescaped_equals(self) -> None:
        """
        C{tcp\\:443\\:interface=127.0.0.1} (the inner endpoint's C{=} not
        escaped) is the inner endpoint as written.
        """
        endpoint = parse(r"tenantedge:tcp\:443\:backlog=7\:interface=127.0.0.1:ca=internal:deny=a.test:deny=b.test")
        self.assertEqual(endpoint.description, "tcp:443:backlog=7:interface=127.0.0.1")
        self.assertEqual((endpoint.inner._interface, endpoint.inner._backlog), ("127.0.0.1", 7))
        self.assertEqual(endpoint.config.deny, ("a.test", "b.test"))

    def test_other_inner_endpoints(self) -> None:
        """Any server endpoint can be inside: a UNIX socket, for one."""
        endpoint = parse(r"tenantedge:unix\:/run/edge.sock:ca=internal")
        self.assertEqual(endpoint.inner._address, "/run/edge.sock")

    def test_direct_call(self) -> None:
        """
        Called directly (not through C{serverFromString}), the parser takes
        its arguments as given.
        """
        endpoint = TenantEdgeParser().parseStreamServer(MemoryReactor(), "tcp:0", ca="internal", deny="a.test")
        self.assertEqual((endpoint.config.ca, endpoint.config.deny), (("internal",), ("a.test",)))

    def test_config_file(self) -> None:
        """
        C{config=FILE} reads TOML; the endpoint's keys win, and a list in the
        endpoint replaces the file's.
        """
        key_file = os.path.abspath(self.mktemp())
        with open(key_file, "w") as f:
            f.write("c2VjcmV0\n")
        os.chmod(key_file, 0o600)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(
                'store = "/from/file"\nca = ["internal"]\ndeny = ["a.test", "b.test"]\nallow-suffix = ".test"\n'
                'renew-before = "20d"\nallow-private-suffix = true\neab-kid = "kid"\n'
                f'eab-hmac-key-file = "{key_file}"\n'
            )
        config = parse(rf"tenantedge:tcp\:443:config={path}:store=/from/string:deny=c.test").config
        self.assertEqual(config.store, "/from/string")
        self.assertEqual(config.deny, ("c.test",))
        self.assertEqual(config.allow_suffix, (".test",))
        self.assertEqual(config.renew_before, 20 * 86400.0)
        self.assertTrue(config.allow_private_suffix)
        self.assertEqual(config.eab, ("kid", "c2VjcmV0"))

    def test_config_file_with_eab_key(self) -> None:
        """A file may hold the EAB key itself: it is not on a command line."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('eab-kid = "kid"\neab-hmac-key = "c2VjcmV0"\n')
        self.assertEqual(parse(rf"tenantedge:tcp\:443:config={path}").config.eab, ("kid", "c2VjcmV0"))

    def test_endpoint_description(self) -> None:
        """The helper escapes what it must; its strings parse back."""
        first = pem_file(self)
        text = endpoint_description(
            r"tcp:0:interface=\:\:1", store="/srv/a:b=c\\d", ca=["https://ca.example:8443/dir", "internal"],
            ca_root=[first], allow_suffix=[".test"], allow_private_suffix=True, http="tcp:80:interface=127.0.0.1",
            email=None,
        )
        config = parse(text).config
        self.assertEqual(config.store, "/srv/a:b=c\\d")
        self.assertEqual(config.ca, ("https://ca.example:8443/dir", "internal"))
        self.assertEqual(config.ca_root, (first,))
        self.assertEqual(config.http, "tcp:80:interface=127.0.0.1")
        self.assertIsNone(config.email)
        self.assertTrue(config.allow_private_suffix)
        self.assertEqual(parse(text).inner._interface, "::1")

    def test_doctests(self) -> None:
        result = doctest.testmod(tenantedge.endpoint)
        self.assertEqual((result.failed, result.attempted > 0), (0, True))

    @given(st.text(alphabet=":=\\ab", max_size=24))
    def test_split_like_twisted(self, description: str) -> None:
        """
        L{split_description} splits as Twisted does (its last value for a
        repeated key is Twisted's only one).
        """
        try:
            args, kwargs = _parse(description)
        except RuntimeError:  # Twisted's tokenizer on a trailing backslash
            return
        items = split_description(description)
        self.assertEqual([v for k, v in items if k is None], args)
        self.assertEqual({k: v for k, v in items if k is not None}, kwargs)


class BadStringTests(TestCase):
    """Each bad string is one ValueError, naming the key."""

    def refused(self, description: str, key: str | None, *fragments: str) -> EndpointStringError:
        error = self.assertRaises(EndpointStringError, parse, description)
        self.assertIsInstance(error, ValueError)
        self.assertEqual(error.key, key, str(error))
        message = str(error)
        self.assertTrue(message.startswith("tenantedge endpoint: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return error

    def test_unknown_key(self) -> None:
        self.refused(r"tenantedge:tcp\:443:colour=red", "colour", "colour=red: unknown key")
        self.refused(r"tenantedge:tcp\:443:alow-suffix=.test", "alow-suffix", "did you mean allow-suffix=?")

    def test_plugin_only_keys(self) -> None:
        """Settings of twistd tenantedge that the endpoint does not take say why."""
        self.refused(r"tenantedge:tcp\:443:backend=http\://127.0.0.1\:3000", "backend",
                     "backend=http://127.0.0.1:3000: not taken by the endpoint", "reverse proxy")
        self.refused(r"tenantedge:tcp\:443:https=tcp\:8443", "https", "https=tcp:8443", "inner endpoint")
        self.refused(r"tenantedge:tcp\:443:admin=tcp\:9180", "admin", "admin=tcp:9180", "not taken by the endpoint")
        self.refused(r"tenantedge:tcp\:443:demo=yes", "demo", "demo=yes")
        self.refused(r"tenantedge:tcp\:443:access-log=/tmp/x", "access-log", "access-log=/tmp/x")

    def test_secret_inline(self) -> None:
        """The EAB key is refused inline, and not repeated in the message."""
        error = self.refused(r"tenantedge:tcp\:443:eab-kid=k:eab-hmac-key=c2VjcmV0", "eab-hmac-key",
                             "eab-hmac-key-file=")
        self.assertNotIn("c2VjcmV0", str(error))

    def test_bad_values(self) -> None:
        self.refused(r"tenantedge:tcp\:443:allow-url=ftp\://x/{domain}", "allow-url",
                     "tenantedge endpoint: allow-url=ftp://x/{domain}: ", "is not a http:// or https:// URL")
        self.refused(r"tenantedge:tcp\:443:allow-url=https\://x/check", "allow-url", "no {domain} placeholder")
        self.refused(r"tenantedge:tcp\:443:renew-before=soon", "renew-before",
                     "renew-before=soon: 'soon' is not a duration")
        self.refused(r"tenantedge:tcp\:443:cache-size=0", "cache-size", "cache-size=0: '0' must be at least 1")
        self.refused(r"tenantedge:tcp\:443:challenge=dns-01", "challenge", "challenge=dns-01")
        self.refused(r"tenantedge:tcp\:443:ca=ftp\://x", "ca", "ca=ftp://x")
        self.refused(r"tenantedge:tcp\:443:ca-root=/no/such.pem", "ca-root", "ca-root=/no/such.pem")
        self.refused(r"tenantedge:tcp\:443:http=bogus\:1", "http", "http=bogus:1", "not a valid endpoint")
        self.refused(r"tenantedge:tcp\:443:eab-hmac-key-file=/no/such", "eab-hmac-key-file", "/no/such")

    def test_every_typed_key_refuses_garbage(self) -> None:
        """Each duration, number and flag key refuses a value of the wrong kind in one line naming the key."""
        garbage = {"float": "soon", "int": "many", "bool": "perhaps"}
        checked = 0
        for key, field in endpoint_keys().items():
            value = garbage.get(str(field.type))
            if value is None:
                continue
            self.refused(rf"tenantedge:tcp\:443:ca=internal:{key}={value}", key, f"{key}={value}: ")
            checked += 1
        self.assertGreaterEqual(checked, 21)  # every one of them, as of this writing

    def test_bad_value_in_a_list(self) -> None:
        self.refused(r"tenantedge:tcp\:443:ca=internal:ca=ftp\://x", "ca", "ca=: ", "'ftp://x'")

    def test_bad_flag(self) -> None:
        self.refused(r"tenantedge:tcp\:443:allow-private-suffix=maybe", "allow-private-suffix",
                     "allow-private-suffix=maybe: 'maybe' is not yes or no")

    def test_bare_flag(self) -> None:
        """A flag without =yes would be a positional argument: say so."""
        self.refused(r"tenantedge:tcp\:443:allow-private-suffix", None, "allow-private-suffix=yes")

    def test_empty_value(self) -> None:
        self.refused(r"tenantedge:tcp\:443:store=", "store", "store=: give a value")
        self.refused(r"tenantedge:tcp\:443:http=", "http", "http=none")

    def test_repeated_single_value(self) -> None:
        self.refused(r"tenantedge:tcp\:443:store=/a:store=/b", "store", "store= given twice (/a, /b)")

    def test_settings_that_contradict(self) -> None:
        self.refused(r"tenantedge:tcp\:443:allow-url=https\://x/{domain}:ask=https\://x/ask", None,
                     "give allow-url or ask, not both")
        self.refused(r"tenantedge:tcp\:443:ca=internal:ca=internal", "ca", "the same CA is given twice")

    def test_private_suffix_with_public_ca(self) -> None:
        self.refused(r"tenantedge:tcp\:443:allow-suffix=.test", "allow-suffix",
                     "allow-suffix=.test: no name under .test", "allow-private-suffix")

    def test_missing_inner_endpoint(self) -> None:
        self.refused(r"tenantedge:store=/srv/certs", None, "no inner endpoint")
        self.refused(r"tenantedge", None, "no inner endpoint")

    def test_bad_inner_endpoint(self) -> None:
        self.refused(r"tenantedge:nope\:1:ca=internal", None, "inner endpoint 'nope:1' is not a valid endpoint",
                     "Unknown endpoint type")
        self.refused(r"tenantedge:tcp\:x", None, "inner endpoint 'tcp:x' is not a valid endpoint")
        self.refused(r"tenantedge:tcp\:1\:bogus\=1", None, "inner endpoint 'tcp:1:bogus=1'")
        self.refused(r"tenantedge:tenantedge\:tcp\\\:443", None, "cannot wrap another")
        self.refused(r"tenantedge:ssl\:443", None, "tenantedge does the TLS")

    def test_two_inner_endpoints(self) -> None:
        self.refused(r"tenantedge:tcp\:443:tcp\:8443", None, "unexpected argument 'tcp:8443'")

    def test_config_file_problems(self) -> None:
        self.refused(r"tenantedge:tcp\:443:config=/no/such.toml", "config", "config=/no/such.toml",
                     "cannot read config file")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('backend = "http://127.0.0.1:3000"\n')
        self.refused(rf"tenantedge:tcp\:443:config={path}", "config", f"config={path}: 'backend' is not taken")
        with open(path, "w") as f:
            f.write("not toml [\n")
        self.refused(rf"tenantedge:tcp\:443:config={path}", "config", "is not valid TOML")
        with open(path, "w") as f:
            f.write('ca = ["internal", "internal"]\n')
        self.refused(rf"tenantedge:tcp\:443:config={path}", "config",
                     f"config={path}: invalid value for 'ca': the same CA is given twice")
        self.refused(rf"tenantedge:tcp\:443:config={path}:config={path}", "config", "config= given twice")


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """An inner endpoint that records whether it was listened on."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.factories: list[Any] = []

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        self.factories.append(factory)
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(FakePort())


@implementer(IListeningPort)
class FakePort:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.stopped = 0

    def startListening(self) -> None:
        pass

    def stopListening(self) -> defer.Deferred[None]:
        self.stopped += 1
        return defer.fail(self.error) if self.error is not None else defer.succeed(None)

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 4433)


class FakeService:
    """Stands in for the on-demand TLS service where only its stop matters."""

    running = True

    def stopService(self) -> defer.Deferred[None]:
        self.running = False
        return defer.succeed(None)


class TriggerReactor(MemoryReactor):
    """A memory reactor whose system event triggers can be removed."""

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any, **kwargs: Any) -> Any:
        super().addSystemEventTrigger(phase, event, f, *args, **kwargs)
        return (phase, event, len(self.triggers[phase][event]) - 1)

    def removeSystemEventTrigger(self, trigger: Any) -> None:
        phase, event, index = trigger
        self.triggers[phase][event][index] = None


class ListenTests(TestCase):
    """
    What C{listen} starts and C{stopListening} stops, on the real reactor
    with loopback ports and the local CA. Nothing may be left behind: trial
    fails a test that leaves a timer (renewal, cache refresh) or a port.
    """

    timeout = 120

    def setUp(self) -> None:
        self.store = os.path.join(os.path.abspath(self.mktemp()), "store")
        self.services: list[OnDemandTLS] = []

    def make_service(self, config: OnDemandConfig, reactor: Any) -> OnDemandTLS:
        service = OnDemandTLS.from_config(config, reactor)
        self.services.append(service)
        return service

    def endpoint(self, https: str = "tcp:0:interface=127.0.0.1", http: str = "tcp:0:interface=127.0.0.1",
                 **settings: Any) -> OnDemandEndpoint:
        text = endpoint_description(https, store=self.store, ca="internal", allow_suffix=".test", http=http,
                                    **settings)
        endpoint = parse(text, reactor)
        endpoint.make_service = self.make_service
        return endpoint

    def site(self) -> Site:
        root = Resource()
        root.putChild(b"hello", Data(b"hello from the app\n", "text/plain"))
        return Site(root)

    async def refused(self, port: int) -> bool:
        """Whether connecting to the loopback port is refused."""
        try:
            connection = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                protocol.Factory.forProtocol(protocol.Protocol))
        except ConnectionRefusedError:
            return True
        connection.transport.loseConnection()
        return False

    async def test_listen_and_stop(self) -> None:
        """
        C{listen} prepares and starts the service, listens on both ports
        (synchronously on TCP) and serves the wrapped factory with an
        on-demand certificate; C{stopListening} closes both ports and stops
        the service.
        """
        curl = require_tool(self, "curl")
        d = self.endpoint().listen(self.site())
        port = self.successResultOf(d)
        self.assertIsInstance(port, OnDemandPort)
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertTrue(port.service.running)
        self.assertTrue(port.service.renewal.running)
        root = os.path.join(self.store, "localca", "root.pem")
        self.assertTrue(os.path.exists(root))
        https_port, http_port = port.getHost().port, port.http.getHost().port
        self.assertEqual(port.https_address, f"127.0.0.1:{https_port}")

        out, err, code = await run(curl, [
            "--silent", "--show-error", "--max-time", "60", "--resolve", f"shop.test:{https_port}:127.0.0.1",
            "--cacert", root, f"https://shop.test:{https_port}/hello"])
        self.assertEqual((out, code), (b"hello from the app\n", 0), err)
        out, err, code = await run(curl, [
            "--silent", "--show-error", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
            "-H", "Host: shop.test", f"http://127.0.0.1:{http_port}/hello"])
        self.assertEqual(out.decode(), f"308 https://shop.test:{https_port}/hello", err)

        await port.stopListening()
        self.assertFalse(port.service.running)
        self.assertFalse(port.service.renewal.running)
        self.assertTrue(await self.refused(https_port))
        self.assertTrue(await self.refused(http_port))
        # Stopping again gives the same outcome.
        self.assertIsNone(self.successResultOf(port.stopListening()))

    async def test_no_http_listener(self) -> None:
        port = await self.endpoint(http="none").listen(self.site())
        self.addCleanup(port.stopListening)
        self.assertIsNone(port.http)
        self.assertIn("http=none", repr(port))

    async def test_listen_again(self) -> None:
        """
        One endpoint is one listener at a time (a second service on the same
        store would race the first); after a stop it listens again, with a
        new service.
        """
        endpoint = self.endpoint()
        port = await endpoint.listen(self.site())
        failure = self.failureResultOf(endpoint.listen(self.site()), ListenFailed)
        self.assertIn("already listening", str(failure.value))
        await port.stopListening()
        again = await endpoint.listen(self.site())
        self.addCleanup(again.stopListening)
        self.assertIsNot(again.service, port.service)
        self.assertEqual(len(self.services), 2)

    def test_preparation_failure(self) -> None:
        """
        An unusable store fails C{listen} at once with one line; no port was
        listened on and nothing keeps running.
        """
        self.store = os.path.abspath(self.mktemp())
        with open(self.store, "w") as f:
            f.write("a file, not a directory\n")
        inner, http = RecordingEndpoint(), RecordingEndpoint()
        endpoint = self.endpoint()
        endpoint.inner, endpoint.http = inner, http
        failure = self.failureResultOf(endpoint.listen(self.site()), StartupError)
        self.assertTrue(str(failure.value).startswith("tenantedge endpoint: "), str(failure.value))
        self.assertIn(self.store, str(failure.value))
        self.assertEqual((inner.factories, http.factories), ([], []))
        self.assertFalse(self.services[0].running)

    def test_build_failure(self) -> None:
        """A store that cannot even be opened fails the same way."""
        self.store = "s3://bucket"
        failure = self.failureResultOf(self.endpoint().listen(self.site()), StartupError)
        self.assertIn("cannot build on-demand TLS", str(failure.value))

    async def test_inner_listen_failure(self) -> None:
        """
        The TLS port in use: C{listen} fails naming the port; the service
        is stopped and port 80 was never listened on.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            number = taken.getsockname()[1]
            http = RecordingEndpoint()
            endpoint = self.endpoint(https=f"tcp:{number}:interface=127.0.0.1")
            endpoint.http = http
            failure = self.failureResultOf(endpoint.listen(self.site()), ListenFailed)
        self.assertEqual(
            str(failure.value).split(": [Errno")[0],
            f"tenantedge endpoint: cannot listen on port {number} of 127.0.0.1 (TLS with on-demand certificates)",
        )
        self.assertEqual(http.factories, [])
        self.assertFalse(self.services[0].running)
        self.assertFalse(self.services[0].renewal.running)

    async def test_http_listen_failure(self) -> None:
        """
        Port 80 in use: C{listen} fails naming it; the TLS port is closed
        again and the service stopped.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            number = taken.getsockname()[1]
            https = free_port()
            endpoint = self.endpoint(https=f"tcp:{https}:interface=127.0.0.1", http=f"tcp:{number}:interface=127.0.0.1")
            d = endpoint.listen(self.site())
            failure = self.failureResultOf(d, ListenFailed)
        self.assertIn(f"cannot listen on port {number} of 127.0.0.1 (ACME HTTP-01 answers", str(failure.value))
        self.assertFalse(self.services[0].running)
        # The TLS port closes on the next reactor turn.
        await endpoint.undone()
        self.assertTrue(await self.refused(https))
        # And the endpoint may be listened on again.
        port = await endpoint.listen(self.site())
        await port.stopListening()

    def test_stopped_before_shutdown(self) -> None:
        """
        The port registers its C{stopListening} to run before the reactor
        shuts down (Klein's C{app.run} never stops its port) and withdraws
        it when stopped first.
        """
        fake = TriggerReactor()
        service = FakeService()
        port = OnDemandPort(fake, FakePort(), FakePort(), service)  # type: ignore[arg-type]
        (trigger,) = fake.triggers["before"]["shutdown"]
        self.successResultOf(trigger[0]())
        self.assertFalse(service.running)
        self.assertEqual((port.https.stopped, port.http.stopped), (1, 1))
        # A trigger that has fired is not removed (Twisted warns about that).
        self.assertEqual(fake.triggers["before"]["shutdown"], [trigger])
        # Stopped first, the port withdraws its trigger.
        second = OnDemandPort(fake, FakePort(), None, FakeService())  # type: ignore[arg-type]
        self.successResultOf(second.stopListening())
        self.assertEqual(fake.triggers["before"]["shutdown"], [trigger, None])

    def test_stop_failure(self) -> None:
        """
        A port that fails to stop does not keep the service running; the
        failure is reported to every caller.
        """
        service = FakeService()
        stuck = FakePort(RuntimeError("stuck"))
        port = OnDemandPort(MemoryReactor(), stuck, FakePort(), service)  # type: ignore[arg-type]
        self.failureResultOf(port.stopListening(), RuntimeError)
        self.failureResultOf(port.stopListening(), RuntimeError)
        self.assertFalse(service.running)
        self.assertEqual(port.http.stopped, 1)
        self.assertRaises(RuntimeError, port.startListening)


class TwistdWebTests(TestCase):
    r"""
    C{twistd -n web --listen 'tenantedge:...' --path FOLDER} as a real
    process: a never-seen name gets Pebble's certificate at its first
    handshake and the static file is served; bad strings and busy ports
    stop twistd at start-up with the endpoint's line.
    """

    timeout = 240

    def folder(self) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(os.path.join(folder, "hello.txt"), "w") as f:
            f.write("hello from twistd web\n")
        return folder

    async def test_first_handshake_against_pebble(self) -> None:
        curl = require_tool(self, "curl")
        pebble = Pebble(self)
        await pebble.start()
        root = await pebble.root_pem(os.path.abspath(self.mktemp()))
        store = os.path.join(os.path.abspath(self.mktemp()), "store")
        description = (
            rf"tenantedge:tcp\:{pebble.tls_port}\:interface=127.0.0.1:store={store}"
            rf":ca={quoteStringArgument(pebble.directory_url)}:ca-root={pebble.ca_root}"
            r":allow-suffix=.test:allow-private-suffix=yes"
            rf":http=tcp\:{pebble.http_port}\:interface=127.0.0.1"
        )
        server = ServerProcess.start(
            self, TWISTD, ["-n", "--pidfile=", "web", "--listen", description, "--path", self.folder()])
        await server.wait_for(rb"tenantedge endpoint: on-demand TLS on 127\.0\.0\.1:\d+")

        name = "shop.tenant.test"
        out, err, code = await run(curl, [
            "--silent", "--show-error", "--max-time", "120", "--resolve", f"{name}:{pebble.tls_port}:127.0.0.1",
            "--cacert", root, f"https://{name}:{pebble.tls_port}/hello.txt"])
        self.assertEqual((out, code), (b"hello from twistd web\n", 0), err + pebble.log[-3000:].encode()
                         + server.output[-3000:])
        self.assertEqual(pebble.orders, 1)
        self.assertTrue(os.path.exists(os.path.join(store, f"{name}.pem")))
        # Port 80 redirects to the TLS port.
        out, err, code = await run(curl, [
            "--silent", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", f"Host: {name}",
            f"http://127.0.0.1:{pebble.http_port}/hello.txt"])
        self.assertEqual(out.decode(), f"308 https://{name}:{pebble.tls_port}/hello.txt")

        # SIGTERM: twistd stops its port service, which stops the ports and
        # the on-demand service (then twistd ends by the same signal).
        await server.stop()
        self.assertIn("tenantedge endpoint: stopped", server.text)
        self.assertIn("Server Shut Down.", server.text)
        self.assertNotIn("Traceback", server.text)

    async def test_bad_string_stops_start_up(self) -> None:
        server = ServerProcess.start(self, TWISTD, [
            "-n", "--pidfile=", "web", "--listen", r"tenantedge:tcp\:0:allow-url=nope", "--path", self.folder()])
        await server.ended()
        self.assertNotEqual(server.exit_code, 0)
        self.assertIn("tenantedge endpoint: allow-url=nope: 'nope' is not a http:// or https:// URL", server.text)

    async def test_busy_port_stops_start_up(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            number = taken.getsockname()[1]
            store = os.path.join(os.path.abspath(self.mktemp()), "store")
            server = ServerProcess.start(self, TWISTD, [
                "-n", "--pidfile=", "web", "--listen",
                rf"tenantedge:tcp\:{number}\:interface=127.0.0.1:store={store}:ca=internal:http=none",
                "--path", self.folder()])
            await server.ended()
        self.assertNotEqual(server.exit_code, 0)
        self.assertIn(f"tenantedge endpoint: cannot listen on port {number} of 127.0.0.1", server.text)
