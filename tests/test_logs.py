"""
Structured logs: one JSON line per event, with the fields operators filter
on (event, host, reason, duration, problem).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tenantedge.logs import json_observer
from tenantedge.policy import EdgePolicy, StaticPolicy
from tenantedge.testing import ControlledIssuer, MemoryStore, make_bundle, memory_resolver

from .support.processes import run


class JSONLogTests(SynchronousTestCase):
    def test_issuance_refusal_and_failure_events(self) -> None:
        stream = io.StringIO()
        observer = json_observer(stream)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = MemoryReactorClock()
        issuer = ControlledIssuer()
        resolver = memory_resolver(
            MemoryStore(), EdgePolicy(StaticPolicy(allow_suffixes=(".test",))), issuer, clock,
            make_context=lambda b: object(),
        )
        d = resolver.context_for("a.test")
        clock.advance(1.5)
        issuer.complete("a.test", make_bundle("a.test"))
        self.successResultOf(d)
        self.failureResultOf(resolver.context_for("nope.example"))
        d = resolver.context_for("b.test")
        issuer.fail_order("b.test", "CA said rateLimited")
        self.failureResultOf(d)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        ours = [line for line in lines if "event" in line]
        self.assertEqual([line["event"] for line in ours], ["issued", "refused", "issue-failed"])
        issued, refused, failed = ours
        self.assertEqual(issued["host"], "a.test")
        self.assertEqual(issued["duration"], 1.5)
        self.assertEqual(issued["level"], "info")
        self.assertEqual((refused["host"], refused["reason"]), ("nope.example", "not-allowed"))
        self.assertEqual(failed["level"], "error")
        self.assertIn("rateLimited", failed["error"])
        self.assertIn("a.test", issued["message"])

    def test_twistd_logger_option(self) -> None:
        """twistd --logger tenantedge.logs.json_observer prints JSON lines."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [twistd, "-n", "--pidfile=", "--logger", "tenantedge.logs.json_observer", "tenantedge",
             "--https", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1", "--admin", "none",
             "--store", "/proc/no-such-dir/store"],
            capture_output=True, text=True, timeout=60,
        )
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        self.assertTrue(lines, result.stdout + result.stderr)
        self.assertTrue(all("message" in line and "time" in line for line in lines))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunnerJSONTests(TestCase):
    """
    The plugin's --log-format json gives the same flat records under twistd
    (daemonised, to --logfile) and twist, and twist's own --log-format=json
    gives them too.
    """

    timeout = 120

    def server_args(self) -> list[str]:
        store = os.path.join(os.path.abspath(self.mktemp()), "store")
        return ["tenantedge", "--https", f"tcp:{_free_port()}:interface=127.0.0.1", "--http",
                f"tcp:{_free_port()}:interface=127.0.0.1", "--admin", "none", "--store", store,
                "--ca", "internal", "--allow-suffix", ".test", "--log-format", "json"]

    def check_records(self, text: str) -> None:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        self.assertTrue(records, text)
        for record in records:
            self.assertEqual(set(record) & {"time", "level", "namespace", "message"},
                             {"time", "level", "namespace", "message"}, record)
            self.assertFalse(any(key.startswith("log_") for key in record), record)
        self.assertTrue(any(r.get("name") == "https" and "listening" in r["message"] for r in records), text)

    async def test_twistd_daemon_logfile(self) -> None:
        """A daemonised twistd --logfile X --log-format json keeps writing flat records to X."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        logfile, pidfile = os.path.join(base, "edge.log"), os.path.join(base, "edge.pid")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out, err, code = await run(twistd, ["--logfile", logfile, "--pidfile", pidfile, *self.server_args()])
        self.assertEqual(code, 0, err)
        try:
            for _ in range(200):
                if os.path.exists(logfile) and b"listening" in open(logfile, "rb").read():
                    break
                await deferLater(reactor, 0.05, lambda: None)
            with open(logfile) as f:
                self.check_records(f.read())
        finally:
            for _ in range(100):
                if os.path.exists(pidfile):
                    break
                await deferLater(reactor, 0.05, lambda: None)
            with open(pidfile) as f:
                os.kill(int(f.read()), signal.SIGTERM)

    async def test_twist(self) -> None:
        """twist --log-format=json tenantedge, and twist tenantedge --log-format json, print flat records."""
        twist = os.path.join(os.path.dirname(sys.executable), "twist")
        for runner_args, plugin_extra in ((["--log-format=json"], []), ([], [])):
            args = runner_args + self.server_args() + plugin_extra
            if runner_args:
                args.remove("--log-format")
                args.remove("json")
            seen: defer.Deferred[None] = defer.Deferred()

            def stdout(data: bytes, seen: defer.Deferred[None] = seen) -> None:
                if b"listening: https" in data and not seen.called:
                    seen.callback(None)

            ended = run(twist, args, on_stdout=stdout, timeout=60)
            await seen.addTimeout(60, reactor)
            pid = _pid_of(args)
            os.kill(pid, signal.SIGTERM)
            out, err, code = await ended
            self.check_records(out.decode())


def _pid_of(args: list[str]) -> int:
    """The PID of the twist process we started with these arguments (by its unique store path)."""
    store = args[args.index("--store") + 1].encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if store in f.read():
                        return int(entry)
            except OSError:
                continue
    raise AssertionError("process not found")
