"""
Tests for C{tenantedge store copy} (L{tenantedge.storecopy}) and the CLI on
a Redis store, against a real redis-server: a directory store copied into
Redis and back comes out byte for byte identical, and C{certs list} reads
either.
"""

from __future__ import annotations

import io
import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.accounts import AccountStore, account_directory
from tenantedge.backoff import FailureBackoff
from tenantedge.cli import main
from tenantedge.lifecycle import HostnameLifecycle
from tenantedge.store import DirectoryStore
from tenantedge.testing import make_bundle

from .support.redis import SyncRedis


def _tree(path: str) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".lock") or name.startswith("lifecycle."):
                continue  # lock files are not state; lifecycle records are compared as records
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


class StoreCopyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = SyncRedis(self)
        self.source = os.path.join(self.mktemp(), "store")
        store = DirectoryStore(self.source)
        store.prepare()
        for name in ("a.test", "b.test"):
            self.successResultOf(store.store(name, make_bundle(name)))
        accounts = AccountStore(account_directory(self.source, "https://acme.test/dir"))
        key = accounts.load_or_create_key()
        accounts.save_url("https://acme.test/acct/7", "https://acme.test/dir", key)
        clock = Clock()
        clock.advance(10**6)
        FailureBackoff(os.path.join(self.source, "backoff.json"), clock).record_failure("c.test")
        lifecycle = HostnameLifecycle(os.path.join(self.source, "lifecycle.json"), clock)
        lifecycle.load()
        lifecycle.issued("a.test", 2e6, renewal=False)
        lifecycle.failed("c.test", RuntimeError("no DNS"))

    def lifecycle(self, store: str) -> dict[str, tuple[str, int]]:
        lifecycle = HostnameLifecycle(os.path.join(store, "lifecycle.json"), Clock())
        lifecycle.load()
        return {r.host: (r.state, r.attempts) for r in lifecycle.records()}

    def cli(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        return main(list(argv), out=out), out.getvalue()

    def test_round_trip(self) -> None:
        """Directory -> Redis -> a new directory: the same files, byte for byte."""
        code, text = self.cli("store", "copy", self.source, self.redis.url("prod"))
        self.assertEqual(code, 0, text)
        self.assertIn("copied 2 certificate(s), 1 account(s), 1 state file(s), 2 lifecycle record(s)", text)
        fields = self.redis.connect().execute("HKEYS", "prod:records:lifecycle")
        self.assertEqual(sorted(fields), [b"a.test", b"c.test"])
        back = os.path.join(self.mktemp(), "back")
        os.makedirs(back)
        code, text = self.cli("store", "copy", self.redis.url("prod"), back)
        self.assertEqual(code, 0, text)
        self.assertEqual(_tree(back), _tree(self.source))
        self.assertEqual(self.lifecycle(back), {"a.test": ("active", 0), "c.test": ("failing", 1)})
        self.assertEqual(self.lifecycle(back), self.lifecycle(self.source))
        for path in _tree(back):
            self.assertEqual(os.stat(os.path.join(back, path)).st_mode & 0o777, 0o600, path)

    def test_json(self) -> None:
        code, text = self.cli("store", "copy", "--json", self.source, self.redis.url("prod"))
        self.assertEqual(code, 0, text)
        self.assertEqual(json.loads(text), {"certificates": 2, "accounts": 1, "states": 1, "records": 2,
                                            "skipped": []})

    def test_certs_list_on_either(self) -> None:
        self.cli("store", "copy", self.source, self.redis.url("prod"))
        lists = []
        for store in (self.source, self.redis.url("prod")):
            code, text = self.cli("certs", "list", "--json", "--store", store)
            self.assertEqual(code, 0, text)
            lists.append([row["host"] for row in json.loads(text)])
        self.assertEqual(lists, [["a.test", "b.test"]] * 2)

    def test_prefixes_stay_apart(self) -> None:
        """
        A prefix with glob characters copies its own accounts only (not
        those of a prefix its pattern would match), found with SCAN.
        """
        for prefix in ("env*", "envX"):
            code, text = self.cli("store", "copy", self.source, self.redis.url(prefix))
            self.assertEqual(code, 0, text)
        self.redis.connect().execute("HSET", "envX:account:other", "key", "not ours")
        back = os.path.join(self.mktemp(), "back")
        os.makedirs(back)
        code, text = self.cli("store", "copy", self.redis.url("env*"), back)
        self.assertEqual(code, 0, text)
        self.assertIn("1 account(s)", text)

    def test_hostile_names_refused(self) -> None:
        """A Redis entry whose name would become a path outside the store is refused, not written."""
        from tenantedge.storecopy import _check_name, _check_slug

        for name in ("../x", "a/b.test", "UPPER.test", ".."):
            self.assertRaises(ValueError, _check_name, name)
        for slug in ("../x", ".hidden", "a/b", ""):
            self.assertRaises(ValueError, _check_slug, slug)
        _check_name("a.test")
        _check_slug("acme-v02.api.letsencrypt.org")

    def test_unreachable(self) -> None:
        code, text = self.cli("store", "copy", self.source, "redis://127.0.0.1:1/0")
        self.assertEqual(code, 1)
