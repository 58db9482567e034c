"""
Tests for L{tenantedge.journal.RecordJournal}: records changed one at a
time by several processes (each instance stands for one) on one store
directory, compaction, torn lines, unreadable or unwritable files, and the
C{lifecycle.json} of earlier versions read as the snapshot.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.interfaces import ISharedRecords
from tenantedge.journal import RecordJournal
from tenantedge.lifecycle import ACTIVE, PENDING, HostnameLifecycle


def _bump(record: dict[str, Any] | None) -> dict[str, Any]:
    return {"n": (record or {}).get("n", 0) + 1}


class RecordJournalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "lifecycle.json")
        self.journal = os.path.join(self.directory, "lifecycle.journal")

    def make(self, **kwargs: Any) -> RecordJournal:
        records = RecordJournal(self.path, **kwargs)
        records.load()
        return records

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISharedRecords, RecordJournal(self.path)))
        self.assertTrue(verifyObject(ISharedRecords, RecordJournal(None)))

    def test_one_line_per_change(self) -> None:
        """A change appends one line (0600); the snapshot is not rewritten."""
        records = self.make()
        self.assertEqual(records.update("a.test", _bump), {"n": 1})
        records.update("b.test", _bump)
        records.update("a.test", _bump)
        with open(self.journal, "rb") as f:
            header, *lines = f.read().splitlines()
        self.assertEqual(list(json.loads(header)), ["journal"])  # this journal's generation
        self.assertEqual([json.loads(line) for line in lines], [
            {"k": "a.test", "v": {"n": 1}}, {"k": "b.test", "v": {"n": 1}}, {"k": "a.test", "v": {"n": 2}},
        ])
        self.assertEqual(os.stat(self.journal).st_mode & 0o777, 0o600)
        self.assertFalse(os.path.exists(self.path))

    def test_unchanged_record_not_written(self) -> None:
        """A change that returns the record it was given writes nothing."""
        records = self.make()
        records.update("a.test", _bump)
        size = os.path.getsize(self.journal)
        self.assertEqual(records.update("a.test", lambda r: r), {"n": 1})
        self.assertEqual(os.path.getsize(self.journal), size)

    def test_removal(self) -> None:
        """C{None} removes the record, for this process and the next."""
        records = self.make()
        records.update("a.test", _bump)
        records.update("a.test", lambda r: None)
        self.assertIsNone(records.get("a.test"))
        self.assertEqual(self.make().items(), [])

    def test_processes_see_each_other(self) -> None:
        """
        Each change is made on the latest record: two processes counting on
        one name lose no count, and each reads the other's records.
        """
        one, two = self.make(), self.make()
        one.update("a.test", _bump)
        two.update("a.test", _bump)
        one.update("a.test", _bump)
        two.update("b.test", _bump)
        self.assertEqual(one.get("a.test"), {"n": 3})
        self.assertEqual(two.get("a.test"), {"n": 3})
        self.assertEqual(one.get("b.test"), {"n": 1})
        self.assertEqual(sorted(self.make().items()), [("a.test", {"n": 3}), ("b.test", {"n": 1})])

    def test_compaction(self) -> None:
        """
        Past the floor and the snapshot's size, the journal is folded into a
        new snapshot (0600) and starts again empty; another process reads
        across the compaction, before and after.
        """
        one = self.make(compact_floor=200)
        other = self.make(compact_floor=200)
        for i in range(40):
            one.update(f"n{i % 5}.test", _bump)
            if i == 20:
                self.assertEqual(other.get("n0.test"), {"n": 5})
        self.assertLess(os.path.getsize(self.journal), 400)
        with open(self.path, "rb") as f:
            snapshot = json.load(f)
        self.assertEqual(sorted(snapshot), [f"n{i}.test" for i in range(5)])  # the familiar format
        self.assertGreaterEqual(snapshot["n1.test"]["n"], 6)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        for records in (one, other, self.make()):
            self.assertEqual(sorted(records.items()), [(f"n{i}.test", {"n": 8}) for i in range(5)])
        other.update("n0.test", _bump)  # a change after the other's compaction lands on top of it
        self.assertEqual(one.get("n0.test"), {"n": 9})

    def test_journal_replaced(self) -> None:
        """
        A journal deleted (or emptied) and written again is a new one to a
        process that read the old, whatever inode and size it has: that
        process reads everything again and loses nobody's update.
        """
        one, two = self.make(), self.make()
        for _ in range(50):
            one.update("x.test", _bump)
        self.assertEqual(two.get("x.test"), {"n": 50})
        for how in ("delete", "truncate"):
            if how == "delete":
                os.unlink(self.journal)
            else:
                os.truncate(self.journal, 0)
            for _ in range(5):
                one.update("y.test", _bump)
            two.update("y.test", _bump)
            self.assertEqual(one.get("y.test"), two.get("y.test"))
            self.assertEqual(self.make().get("y.test"), two.get("y.test"))
        # (What the removed journal held is gone, for every process alike.)
        self.assertEqual(two.get("y.test"), {"n": 6})

    def test_journal_replaced_under_the_same_inode(self) -> None:
        """
        A journal replaced by one with another generation but the same
        inode and a size past this process's offset (a truncation in place,
        then another worker's appends) is read again under the exclusive
        lock the change holds: no second lock of its own to wait for.
        Run in a child process, so that a hang fails the test.
        """
        import subprocess
        import sys

        script = (
            "import json, os, sys\n"
            "from tenantedge.journal import RecordJournal\n"
            "path = sys.argv[1]\n"
            "bump = lambda r: {'n': (r or {}).get('n', 0) + 1}\n"
            "one, two = RecordJournal(path), RecordJournal(path)\n"
            "one.load(); two.load()\n"
            "one.update('x.test', bump)\n"
            "journal = path[:-len('.json')] + '.journal'\n"
            "inode = os.stat(journal).st_ino\n"
            "os.truncate(journal, 0)\n"
            "for _ in range(10):\n"
            "    two.update('y.test', bump)\n"
            "assert os.stat(journal).st_ino == inode\n"
            "one.update('y.test', bump)\n"
            "print(json.dumps([one.get('y.test'), two.get('y.test')]))\n"
        )
        done = subprocess.run([sys.executable, "-c", script, os.path.abspath(self.path)], capture_output=True, text=True,
                              timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout), [{"n": 11}, {"n": 11}])

    def test_failed_compaction_not_retried_at_every_change(self) -> None:
        """A compaction that fails (a full disk) is logged once and tried again only after as much growth again."""
        records = self.make(compact_floor=200)
        calls: list[int] = []

        def failing() -> None:
            calls.append(1)
            raise OSError(28, "No space left on device")

        records._compact = failing  # type: ignore[method-assign]
        for i in range(200):
            records.update(f"n{i % 5}.test", _bump)
        self.assertLess(len(calls), 40)  # 200 appends of about 30 bytes past a floor of 200
        self.assertEqual(self.make().get("n0.test"), {"n": 40})  # nothing lost

    def test_read_only_store(self) -> None:
        """Records are read from a store this process may not write (no lock file made)."""
        self.make().update("a.test", _bump)
        os.unlink(self.path + ".lock")
        os.chmod(self.directory, 0o500)
        self.addCleanup(os.chmod, self.directory, 0o700)
        if os.getuid() == 0:
            # root writes anyway; the absent lock file is what is tested
            pass
        reader = RecordJournal(self.path)
        reader.load()
        self.assertEqual(reader.items(), [("a.test", {"n": 1})])
        if os.getuid() != 0:
            self.assertFalse(os.path.exists(self.path + ".lock"))

    def test_torn_line(self) -> None:
        """
        A line a crashed writer left unfinished is not read, is ended
        before the next append, and costs only itself.
        """
        records = self.make()
        records.update("a.test", _bump)
        with open(self.journal, "ab") as f:
            f.write(b'{"k":"b.test","v":{"n"')
        other = self.make()
        self.assertIsNone(other.get("b.test"))
        other.update("c.test", _bump)
        records.update("a.test", _bump)
        self.assertEqual(sorted(self.make().items()), [("a.test", {"n": 2}), ("c.test", {"n": 1})])

    def test_snapshot_of_earlier_versions(self) -> None:
        """The C{lifecycle.json} an earlier version wrote whole is the snapshot."""
        with open(self.path, "w") as f:
            json.dump({"a.test": {"state": "active", "since": 5.0}, "bad": 3}, f)
        lifecycle = HostnameLifecycle(self.path, Clock())
        lifecycle.load()
        record = lifecycle.get("a.test")
        assert record is not None
        self.assertEqual((record.state, record.since), (ACTIVE, 5.0))
        lifecycle.pending("b.test")
        again = HostnameLifecycle(self.path, Clock())
        again.load()
        self.assertEqual([r.host for r in again.records()], ["a.test", "b.test"])

    def test_unreadable_snapshot(self) -> None:
        """A corrupt snapshot is logged and read as empty; the journal still counts."""
        self.make().update("a.test", _bump)
        with open(self.path, "w") as f:
            f.write("{not json")
        records = self.make()
        self.assertEqual(records.items(), [("a.test", {"n": 1})])

    def test_unwritable(self) -> None:
        """
        A journal that cannot be written (a full disk; here a directory in
        its place) keeps the change in memory, logged once, never raised.
        """
        os.mkdir(self.journal)
        records = RecordJournal(self.path)
        self.assertRaises(OSError, records.load)  # start-up says so (HostnameLifecycle.load logs it)
        messages: list[str] = []
        from twisted.logger import globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace", "").startswith("tenantedge.journal"):
                messages.append(event["log_format"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.assertEqual(records.update("a.test", _bump), {"n": 1})
        self.assertEqual(records.update("a.test", _bump), {"n": 2})  # applied once each, not twice
        self.assertEqual(records.get("a.test"), {"n": 2})
        self.assertEqual(len(messages), 1)

    def test_memory_only(self) -> None:
        records = RecordJournal(None)
        records.load()
        records.update("a.test", _bump)
        self.assertEqual(records.items(), [("a.test", {"n": 1})])


class LifecycleCostTests(SynchronousTestCase):
    def test_transition_writes_one_record(self) -> None:
        """
        A transition appends one record whatever the number of names (the
        whole state was rewritten at each one, 3 ms per new name at 300).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "lifecycle.json")
        lifecycle = HostnameLifecycle(path, Clock())
        lifecycle.load()
        for i in range(300):
            lifecycle.pending(f"n{i}.test")
        journal = os.path.join(directory, "lifecycle.journal")
        size = os.path.getsize(journal)
        lifecycle.issued("n1.test", 100.0, renewal=False)
        with open(journal, "rb") as f:
            f.seek(size)
            [line] = f.read().splitlines()
        self.assertEqual(json.loads(line)["k"], "n1.test")
        self.assertEqual(lifecycle.counts()[PENDING], 299)


class DocumentRecordsTests(SynchronousTestCase):
    def test_over_shared_state(self) -> None:
        """
        A shared store of an embedder's own that offers only shared state
        keeps the lifecycle in one document: both processes see each
        other's records, and the stored record reaches the callback.
        """
        from tenantedge.journal import DocumentRecords
        from tenantedge.shared import StateFile

        path = os.path.join(self.mktemp())
        one, two = DocumentRecords(StateFile(path)), DocumentRecords(StateFile(path))
        self.assertTrue(verifyObject(ISharedRecords, one))
        one.load()
        two.load()
        seen: list[Any] = []
        one.update("a.test", _bump, seen.append)
        two.update("a.test", _bump)
        self.assertEqual((one.get("a.test"), seen), ({"n": 2}, [{"n": 1}]))
        two.update("a.test", lambda r: None)
        self.assertEqual(one.items(), [])

    def test_chosen_for_such_a_store(self) -> None:
        from tenantedge.journal import DocumentRecords
        from tenantedge.service import Storage, _lifecycle_records
        from tenantedge.shared import StateFile
        from tenantedge.pipeline import MemoryNameLock
        from tenantedge.challenges import MemoryChallengeStore
        from tenantedge.testing import MemoryStore

        storage = Storage(MemoryStore(), MemoryChallengeStore(), MemoryNameLock(), "",
                          shared_state=lambda label: StateFile(None))
        self.assertIsInstance(_lifecycle_records(storage), DocumentRecords)
