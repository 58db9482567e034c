"""
C{twistd -u www-data -g www-data tenantedge ...} started as root binds its
ports first, drops privileges, and only then opens the store: every file it
creates belongs to the unprivileged user, and it keeps working.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from .support.processes import Backend, require_tool, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivilegeDropTests(TestCase):
    timeout = 120

    async def test_runs_as_www_data(self) -> None:
        if os.getuid() != 0:
            raise self.skipException("needs root to drop privileges")
        try:
            user = pwd.getpwnam("www-data")
        except KeyError:
            raise self.skipException("no www-data user on this machine") from None
        curl = require_tool(self, "curl")
        backend = Backend()
        await backend.start()
        self.addCleanup(backend.stop)

        base = tempfile.mkdtemp(prefix="tenantedge-priv-")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        store = os.path.join(base, "store")
        os.mkdir(store, 0o700)
        os.chown(store, user.pw_uid, user.pw_gid)
        https, http = free_port(), free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        ended = run(
            twistd,
            ["-n", "--pidfile=", "-u", "www-data", "-g", "www-data", "tenantedge",
             "--https", f"tcp:{https}:interface=127.0.0.1", "--http", f"tcp:{http}:interface=127.0.0.1",
             "--store", store, "--allow-suffix", ".test", "--backend", backend.url, "--ca", "internal",
             "--admin", "none"],
            timeout=100,
        )
        root = os.path.join(store, "localca", "root.pem")
        for _ in range(200):
            if os.path.exists(root) or ended.called:
                break
            await deferLater(reactor, 0.05, lambda: None)
        pid = None
        try:
            out, err, code = await run(
                curl,
                ["--silent", "--show-error", "--resolve", f"dropped.test:{https}:127.0.0.1",
                 "--cacert", root, f"https://dropped.test:{https}/echo"],
            )
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out)["path"], "/echo")
            for path in (store, root, os.path.join(store, "dropped.test.pem")):
                self.assertEqual(os.stat(path).st_uid, user.pw_uid, path)
            # The server's processes (the supervisor and its workers) run as www-data.
            pids = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/cmdline", "rb") as f:
                            cmdline = f.read()
                    except OSError:
                        continue
                    if store.encode() in cmdline and b"twistd" in cmdline:
                        pids.append(int(entry))
            self.assertTrue(pids)
            for each in pids:
                self.assertEqual(os.stat(f"/proc/{each}").st_uid, user.pw_uid)
            # SIGTERM to the supervisor (the first started) stops them all;
            # a worker's would only be restarted.
            pid = min(pids)
        finally:
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
            server_out, server_err, _ = await ended
        # The plugin cache was written at install (make, or the unit's
        # ExecStartPre): twistd, now www-data, has nothing to rewrite.
        self.assertNotIn(b"Unable to write to plugin cache", server_out + server_err)


class CLIOwnershipTests(TestCase):
    timeout = 60

    async def test_cli_as_root_keeps_store_files_the_servers(self) -> None:
        """
        Run as root against a store owned by www-data, the CLI becomes
        www-data first: what it creates (archive, locks) stays the server's.
        """
        if os.getuid() != 0:
            raise self.skipException("needs root")
        try:
            user = pwd.getpwnam("www-data")
        except KeyError:
            raise self.skipException("no www-data user on this machine") from None
        from tenantedge.store import DirectoryStore
        from tenantedge.testing import make_bundle

        base = tempfile.mkdtemp(prefix="tenantedge-cli-")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        store_path = os.path.join(base, "store")
        store = DirectoryStore(store_path)
        store.prepare()
        self.successResultOf(store.store("a.test", make_bundle("a.test")))
        for root, dirs, files in os.walk(store_path):
            for name in [root, *(os.path.join(root, f) for f in files), *(os.path.join(root, d) for d in dirs)]:
                os.chown(name, user.pw_uid, user.pw_gid)
        out, err, code = await run(
            sys.executable, ["-m", "tenantedge", "certs", "remove", "a.test", "--store", store_path, "--admin", "none"]
        )
        self.assertEqual(code, 0, err)
        for sub in ("archive", "locks"):
            self.assertEqual(os.stat(os.path.join(store_path, sub)).st_uid, user.pw_uid, sub)
