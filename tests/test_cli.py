"""
The command line (C{python -m tenantedge ...}): as a real subprocess,
against a real store and a running server (in this process, on loopback
ports chosen at run time), and its parsing and admin-address reading in
process.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import signal
import socket
import sys
from typing import Any

from cryptography import x509
from twisted.internet import defer, protocol, reactor
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import provider

from tenantedge import __version__, cli
from tenantedge.cli import AdminAddress, CLIError, TenantedgeOptions, admin_address

from .support.processes import require_tool, run, terminate
from .test_e2e import EdgeTestCase, start_edge

#: Every command the CLI has, as the words after C{tenantedge}.
COMMANDS = [[], ["certs"], *[["certs", name] for name in ("list", "show", "issue", "renew", "remove")]]


def tenantedge(*args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """Run C{python -m tenantedge ARGS}."""
    return run(sys.executable, ["-m", "tenantedge", *args])


def has_ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class CLITests(EdgeTestCase):
    async def cli(self, *args: str, store: str | None = None, admin: str | None = None) -> tuple[bytes, bytes, int]:
        return await tenantedge(
            "certs", *args, "--store", store or self.edge.on_demand.store.path,
            "--admin", admin or f"tcp:{self.admin_port}:interface=127.0.0.1",
        )

    async def _setUp(self) -> None:
        await super()._setUp()
        ports = await self.edge.listening_ports()
        self.admin_port = ports["admin"].getHost().port

    async def test_list_and_show(self) -> None:
        for name in ("a.test", "b.test"):
            out, err, code = await self.fetch(name, "/echo")
            self.assertEqual(code, 0, err)
        out, err, code = await self.cli("list", "--json")
        self.assertEqual(code, 0, err)
        rows = json.loads(out)
        self.assertEqual([r["host"] for r in rows], ["a.test", "b.test"])
        self.assertTrue(rows[0]["issuer"].startswith("tenantedge local root"))
        self.assertEqual(rows[0]["key_type"], "ecdsa-secp256r1")
        self.assertGreater(rows[0]["days_left"], 6.9)
        out, err, code = await self.cli("list")
        self.assertIn(b"a.test", out)
        self.assertIn(b"DAYS", out)
        out, err, code = await self.cli("show", "b.test", "--json")
        self.assertEqual(json.loads(out)["names"], ["b.test"])
        out, err, code = await self.cli("show", "missing.test")
        self.assertEqual(code, 1)
        self.assertIn(b"no usable certificate", err)

    async def test_issue_and_renew_through_the_server(self) -> None:
        """
        issue and renew go through the running server (its policy and
        issuer), and the next handshake gets the renewed certificate.
        """
        out, err, code = await self.cli("issue", "cli.test")
        self.assertEqual(code, 0, err)
        first = await self.edge.on_demand.store.get("cli.test")
        self.assertEqual(out.decode(), f"cli.test: issued, valid until {first.leaf.not_valid_after_utc.isoformat()}\n")
        out, err, code = await self.cli("renew", "cli.test")
        self.assertEqual(code, 0, err)
        renewed = await self.edge.on_demand.store.get("cli.test")
        # Not "renewd": the renew answer has its own wording.
        self.assertEqual(out.decode(),
                         f"cli.test: renewed, valid until {renewed.leaf.not_valid_after_utc.isoformat()}\n")
        self.assertNotEqual(renewed.leaf.serial_number, first.leaf.serial_number)
        # The next handshake is served the renewed certificate (hot swap).
        out, err, code = await self.fetch("cli.test", "/echo", "-w", "%{certs}", "-o", "/dev/null")
        self.assertEqual(code, 0, err)
        served = x509.load_pem_x509_certificates(out)[0]
        self.assertEqual(served.serial_number, renewed.leaf.serial_number)
        # The policy still applies: a denied name is refused.
        out, err, code = await self.cli("issue", "www.own.test")
        self.assertEqual(code, 1)
        self.assertIn(b"refused: deny-list", err)

    async def test_remove_while_serving(self) -> None:
        """
        remove archives the entry while the server runs, and the server
        stops serving it from its cache (it obtains a new one at the next
        handshake).
        """
        out, err, code = await self.fetch("gone.test", "/echo")
        self.assertEqual(code, 0, err)
        old = await self.edge.on_demand.store.get("gone.test")
        self.assertIsNotNone(self.edge.on_demand.resolver.cached("gone.test"))
        out, err, code = await self.cli("remove", "gone.test")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(os.listdir(os.path.join(self.edge.on_demand.store.path, "archive"))), 1)
        self.assertIsNone(self.edge.on_demand.resolver.cached("gone.test"))
        out, err, code = await self.fetch("gone.test", "/echo")
        self.assertEqual(code, 0, err)
        new = await self.edge.on_demand.store.get("gone.test")
        self.assertNotEqual(new.leaf.serial_number, old.leaf.serial_number)

    async def test_server_notices_changes_without_admin(self) -> None:
        """
        With the admin endpoint unreachable, the server still notices a
        replaced entry within --store-poll.
        """
        edge, port, _ = await start_edge(self, "--store-poll", "0.2", backend=self.backend.url)
        self.root = edge.on_demand.local_ca.root_path
        out, err, code = await self.fetch("poll.test", "/echo", port=port)
        self.assertEqual(code, 0, err)
        self.admin_port = 1  # nothing listens there
        # The server's poll logs the change it noticed: wait for that event
        # rather than sleeping and looking.
        noticed: defer.Deferred[None] = defer.Deferred()

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("host") == "poll.test" and "changed" in event.get("log_format", "") and not noticed.called:
                # Not from inside the logging call: the test would go on (and
                # its cleanup stop the server) inside the server's own
                # running coroutine, which then could never resume.
                reactor.callLater(0, lambda: None if noticed.called else noticed.callback(None))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        out, err, code = await self.cli("remove", "poll.test", store=edge.on_demand.store.path)
        self.assertEqual(code, 0, err)
        self.assertIn(b"--store-poll", out)
        await noticed.addTimeout(30, reactor)
        self.assertIsNone(edge.on_demand.resolver.cached("poll.test"))

    async def test_admin_requires_header(self) -> None:
        """Admin POSTs without the CLI's header are refused (no cross-site orders)."""
        out, err, code = await run(self.curl, ["--silent", "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}",
                                               f"http://127.0.0.1:{self.admin_port}/certs/x.test/issue"])
        self.assertEqual(out, b"403")
        out, err, code = await run(self.curl, ["--silent", "-X", "POST", "-H", "X-Tenantedge-Admin: 1",
                                               f"http://127.0.0.1:{self.admin_port}/certs/..%2Fetc/issue"])
        self.assertIn(b"invalid host name", out)
        self.assertEqual(self.edge.on_demand.pipeline.events["issue:issued"], 0)

    async def test_issue_when_already_valid(self) -> None:
        """
        issue for a name that already has a valid certificate says so, from
        the server's C{issued} flag, and orders nothing.
        """
        out, err, code = await self.fetch("have.test", "/echo")
        self.assertEqual(code, 0, err)
        stored = await self.edge.on_demand.store.get("have.test")
        self.assertEqual(self.issued, 1)
        out, err, code = await self.cli("issue", "have.test")
        self.assertEqual(code, 0, err)
        self.assertEqual(
            out.decode(),
            f"have.test: already has a valid certificate, valid until {stored.leaf.not_valid_after_utc.isoformat()} "
            "(nothing was issued)\n",
        )
        out, err, code = await self.cli("issue", "have.test", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["issued"], False)
        self.assertEqual(self.issued, 1)

    async def test_json_for_every_action(self) -> None:
        """issue, renew and remove print one JSON object with --json."""
        out, err, code = await self.cli("issue", "--json", "js.test")
        self.assertEqual(code, 0, err)
        issued = await self.edge.on_demand.store.get("js.test")
        self.assertEqual(json.loads(out), {"host": "js.test", "action": "issue", "issued": True,
                                           "not_after": issued.leaf.not_valid_after_utc.isoformat()})
        out, err, code = await self.cli("renew", "js.test", "--json")
        self.assertEqual(code, 0, err)
        renewed = await self.edge.on_demand.store.get("js.test")
        self.assertEqual(json.loads(out), {"host": "js.test", "action": "renew", "renewed": True,
                                           "not_after": renewed.leaf.not_valid_after_utc.isoformat()})
        out, err, code = await self.cli("remove", "js.test", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {
            "host": "js.test", "action": "remove", "server_notified": True,
            "archive": os.path.join(self.edge.on_demand.store.path, "archive"),
        })
        out, err, code = await self.cli("remove", "js.test", "--json")
        self.assertEqual((out, code), (b"", 1))
        self.assertEqual(err, b"tenantedge certs remove: nothing stored for js.test\n")

    async def test_ipv6_admin_endpoint(self) -> None:
        """
        An admin endpoint on ::1 (escaped colons in the description) is
        reached by the CLI, in the C{tcp:PORT:interface=} and the
        C{tcp6:port=} forms (C{tcp6} listens on C{::}, reached on ::1).
        """
        if not has_ipv6_loopback():
            raise SkipTest("this machine has no IPv6 loopback")
        edge, _, _ = await start_edge(self, "--admin", r"tcp:0:interface=\:\:1", backend=self.backend.url)
        ports = await edge.listening_ports()
        self.assertEqual(ports["admin"].getHost().host, "::1")
        port = ports["admin"].getHost().port
        store = edge.on_demand.store.path
        out, err, code = await self.cli("issue", "v6.test", store=store, admin=rf"tcp:{port}:interface=\:\:1")
        self.assertEqual(code, 0, err)
        self.assertIn(b"v6.test: issued, valid until", out)
        out, err, code = await self.cli("renew", "v6.test", store=store, admin=f"tcp6:port={port}")
        self.assertEqual(code, 0, err)
        self.assertIn(b"v6.test: renewed, valid until", out)

    async def test_config_file(self) -> None:
        """
        A certs command reads --config like the server: the store and the
        admin endpoint come from the file.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f'store = "{self.edge.on_demand.store.path}"\n'
                    f'admin = "tcp:port={self.admin_port}:interface=127.0.0.1"\n'
                    'store-poll = "2s"\n')
        out, err, code = await tenantedge("certs", "issue", "conf.test", "--config", path)
        self.assertEqual(code, 0, err)
        self.assertIn(b"conf.test: issued", out)
        out, err, code = await tenantedge("certs", "list", "--json", "--config", path)
        self.assertEqual(code, 0, err)
        self.assertEqual([r["host"] for r in json.loads(out)], ["conf.test"])


class CommandLineTests(TestCase):
    """The command line itself, as a subprocess: no server needed."""

    timeout = 120

    async def test_help_and_version_everywhere(self) -> None:
        """--help and --version work at every level and exit 0."""
        runs = [(words, flag) for words in COMMANDS for flag in ("--help", "--version")]
        results = await defer.gatherResults([tenantedge(*words, flag) for words, flag in runs])
        for (words, flag), (out, err, code) in zip(runs, results):
            self.assertEqual((code, err), (0, b""), (words, flag))
            if flag == "--version":
                self.assertEqual(out.decode(), f"tenantedge {__version__}\n")
            else:
                self.assertTrue(out.decode().startswith(" ".join(["Usage: tenantedge", *words])), out)
        results = await defer.gatherResults([tenantedge("certs", name, "--help") for name in ("list", "show")])
        for out, _, _ in results:
            self.assertIn(b"--json", out)
            self.assertIn(b"--store DIR", out)

    async def test_usage_errors(self) -> None:
        """Usage errors: one line on stderr, exit status 2."""
        for args, message in [
            ([], b"choose a command: certs, store or serve"),
            (["frobnicate"], b"unknown command 'frobnicate': choose certs, store or serve"),
            (["certs"], b"choose a command: list, show, issue, renew or remove"),
            (["certs", "frobnicate"], b"unknown command 'frobnicate': choose list, show"),
            (["certs", "show"], b"which host?"),
            (["certs", "issue", "a.test", "b.test"], b"unexpected argument 'b.test'"),
            (["certs", "list", "extra.test"], b"unexpected argument 'extra.test'"),
            (["certs", "list", "--bogus"], b"option --bogus not recognized"),
            (["certs", "list", "--store-poll", "soon"], b"--store-poll: 'soon' is not a duration"),
            (["certs", "list", "--config", "/nonexistent.toml"], b"cannot read config file /nonexistent.toml"),
        ]:
            out, err, code = await tenantedge(*args)
            self.assertEqual(code, 2, (args, err))
            self.assertIn(message, err, args)
            self.assertEqual(err.count(b"\n"), 1, err)
            self.assertEqual(out, b"")

    async def test_errors(self) -> None:
        """Other errors: one line on stderr, exit status 1, never a traceback."""
        store = self.mktemp()
        os.makedirs(store)
        for args, message in [
            (["list", "--store", "/nonexistent"], b"tenantedge certs list: no store at /nonexistent"),
            (["show", "missing.test", "--store", store], b"no usable certificate stored for missing.test"),
            (["show", "..", "--store", store], b"'..' is not a valid host name"),
            (["issue", "x.test", "--admin", "none"], b"the admin endpoint is disabled (--admin none)"),
            (["renew", "x.test", "--admin", "unix:/nonexistent"], b"is not a plain TCP endpoint"),
            (["issue", "x.test", "--admin", "tcp:1:interface=127.0.0.1"],
             b"cannot reach the running server at http://127.0.0.1:1"),
        ]:
            out, err, code = await tenantedge("certs", *args)
            self.assertEqual(code, 1, (args, err))
            self.assertIn(message, err, args)
            self.assertEqual(err.count(b"\n"), 1, err)

    async def test_remove_without_admin(self) -> None:
        """remove with the admin endpoint disabled says the server notices within --store-poll."""
        from tenantedge.store import DirectoryStore
        from tenantedge.testing import make_bundle

        path = os.path.join(self.mktemp(), "store")
        store = DirectoryStore(path)
        store.prepare()
        await store.store("a.test", make_bundle("a.test"))
        out, err, code = await tenantedge("certs", "remove", "a.test", "--store", path, "--admin", "none",
                                          "--store-poll", "3s")
        self.assertEqual(code, 0, err)
        archive = os.path.join(os.path.abspath(path), "archive")
        self.assertEqual(out.decode(), f"a.test: moved to {archive}/ (the key is kept)\n"
                                       "(the running server will notice within its --store-poll interval, 3s)\n")

    async def test_serve_help(self) -> None:
        """serve --help is the server's own help (twist tenantedge --help), exit 0."""
        out, err, code = await tenantedge("serve", "--help")
        self.assertEqual(code, 0, err)
        for option in (b"--store=", b"--admin=", b"--store-poll=", b"--config="):
            self.assertIn(option, out)

    async def test_serve_runs_the_server(self) -> None:
        """
        serve runs twist tenantedge: the server listens and answers a
        handshake, and stops cleanly on SIGTERM (twist then ends by that
        signal, as a shell expects).
        """
        curl = require_tool(self, "curl")
        listening: defer.Deferred[int] = defer.Deferred()
        ended: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()

        class Watch(protocol.ProcessProtocol):
            output = b""

            def outReceived(self, data: bytes) -> None:
                self.output += data
                found = re.search(rb"listening: https on 127\.0\.0\.1:(\d+)", self.output)
                if found and not listening.called:
                    listening.callback(int(found.group(1)))

            def errReceived(self, data: bytes) -> None:
                self.output += data

            def processEnded(self, reason: Any) -> None:
                if not listening.called:
                    listening.errback(AssertionError(f"serve ended early: {self.output!r}"))
                ended.callback((reason.value.exitCode, reason.value.signal))

        watch = Watch()
        process = reactor.spawnProcess(
            watch, sys.executable,
            [sys.executable, "-m", "tenantedge", "serve", "--https", "tcp:0:interface=127.0.0.1", "--http", "none",
             "--admin", "none", "--store", os.path.join(self.mktemp(), "store"), "--ca", "internal",
             "--backend", "http://127.0.0.1:9"],
            env=os.environ.copy(),
        )
        self.addCleanup(lambda: terminate(process, ended.addCallback(lambda _: None)))
        port = await listening.addTimeout(60, reactor)
        # The server answers (a handshake without a name is refused with an
        # alert): its reactor runs, with twist's SIGTERM handler in place.
        out, err, code = await run(curl, ["--silent", "--show-error", "--insecure", f"https://127.0.0.1:{port}/"])
        self.assertEqual(code, 35, err)
        terminate(process, defer.Deferred())
        self.assertEqual(await ended, (None, signal.SIGTERM), watch.output)
        self.assertIn(b"Main loop terminated.", watch.output)

    def test_no_private_twisted_names(self) -> None:
        """
        The CLI uses Twisted's public interfaces only (serve used to import
        twist's private C{_twist.Twist}): no import of a twisted module or
        name whose path has a component starting with an underscore.
        """
        with open(cli.__file__) as f:
            tree = ast.parse(f.read())
        private = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                paths = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                paths = [alias.name for alias in node.names if alias.name.startswith("twisted")]
            else:
                continue
            private += [p for p in paths if any(part.startswith("_") for part in p.split("."))]
        self.assertEqual(private, [])

    def test_console_script(self) -> None:
        """The installed C{tenantedge} script is this command line."""
        [entry] = importlib.metadata.entry_points(group="console_scripts", name="tenantedge")
        self.assertIs(entry.load(), cli.main)


class ParsingTests(SynchronousTestCase):
    """How a certs command splits its own arguments from the server's."""

    def parse(self, *args: str) -> Any:
        options = TenantedgeOptions()
        options.parseOptions(list(args))
        return options.subOptions.subOptions

    def test_host_and_json_anywhere(self) -> None:
        """The host and --json may come before, between or after the server's options."""
        for args in [
            ("a.test", "--json", "--store", "/srv/x", "--admin", "tcp:9999"),
            ("--json", "a.test", "--store=/srv/x", "--admin=tcp:9999"),
            ("--store", "/srv/x", "a.test", "--admin", "tcp:9999", "--json"),
        ]:
            command = self.parse("certs", "show", *args)
            self.assertEqual((command.host, command["json"]), ("a.test", True), args)
            self.assertEqual((command.config.store, command.config.admin), ("/srv/x", "tcp:9999"), args)

    def test_json_on_every_certs_command(self) -> None:
        for name in ("list", "show", "issue", "renew", "remove"):
            command = self.parse("certs", name, *([] if name == "list" else ["a.test"]), "--json")
            self.assertTrue(command["json"], name)
            self.assertFalse(self.parse("certs", name, *([] if name == "list" else ["a.test"]))["json"], name)

    def test_every_server_option(self) -> None:
        """Any server option is taken (and validated) as the server would."""
        command = self.parse("certs", "issue", "a.test", "--ca", "internal", "--allow-suffix", ".test",
                             "--allow-suffix", ".example", "--store-poll", "1m", "--allow-private-suffix",
                             "--admin", "none")
        self.assertEqual(command.config.allow_suffix, (".test", ".example"))
        self.assertEqual(command.config.store_poll, 60.0)
        self.assertTrue(command.config.allow_private_suffix)
        self.assertIsNone(command.config.admin)

    def test_config_file(self) -> None:
        """--config is read; the command line wins over it."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('store = "/from/file"\nadmin = "tcp:9191"\n')
        command = self.parse("certs", "list", "--config", path)
        self.assertEqual((command.config.store, command.config.admin), ("/from/file", "tcp:9191"))
        command = self.parse("certs", "list", f"--config={path}", "--store", "/from/cli")
        self.assertEqual((command.config.store, command.config.admin), ("/from/cli", "tcp:9191"))

    def test_serve_passes_everything_on(self) -> None:
        """serve parses nothing itself: twist tenantedge gets every argument."""
        options = TenantedgeOptions()
        options.parseOptions(["serve", "--store", "/x", "--help", "--frobnicate"])
        self.assertEqual(options.subOptions.twist_argv, ["--store", "/x", "--help", "--frobnicate"])


class AdminAddressTests(SynchronousTestCase):
    """The admin endpoint description, read with Twisted's endpoint parser."""

    def test_tcp_forms(self) -> None:
        for description, expected in [
            ("tcp:9180", ("127.0.0.1", 9180)),
            ("tcp:port=9180", ("127.0.0.1", 9180)),
            ("tcp:9180:interface=127.0.0.2", ("127.0.0.2", 9180)),
            ("tcp:interface=127.0.0.2:port=9180", ("127.0.0.2", 9180)),
            ("tcp:9180:interface=0.0.0.0", ("127.0.0.1", 9180)),
            (r"tcp:9180:interface=\:\:1", ("::1", 9180)),
            (r"tcp:9180:interface=\:\:", ("::1", 9180)),
            ("tcp6:9180", ("::1", 9180)),
            (r"tcp6:port=9180:interface=fd00\:\:5", ("fd00::5", 9180)),
            ("tcp:9180:interface=localhost", ("localhost", 9180)),
            ("tcp:9180:backlog=10", ("127.0.0.1", 9180)),
        ]:
            self.assertEqual(admin_address(description), expected, description)

    def test_url(self) -> None:
        self.assertEqual(AdminAddress("::1", 9180).url, "http://[::1]:9180")
        self.assertEqual(AdminAddress("127.0.0.1", 9180).url, "http://127.0.0.1:9180")

    def test_not_reachable(self) -> None:
        """What the CLI cannot connect to is one clear error."""
        for description, message in [
            (None, "disabled (--admin none)"),
            ("unix:/run/tenantedge.sock", "is not a plain TCP endpoint"),
            ("tcp:0", "listens on a port chosen at start-up"),
            ("tcp:notaport", "cannot read the admin endpoint"),
            ("nosuchendpoint:1", "cannot read the admin endpoint"),
        ]:
            e = self.assertRaises(CLIError, admin_address, description)
            self.assertIn(message, str(e), description)
