"""
Tests for L{tenantedge.shared}: what every process on one store shares.
Two instances on one directory stand for two workers (or servers).
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.backoff import FailureBackoff
from tenantedge.interfaces import IChallengeStore, INameLock, LimitExceeded
from tenantedge.limits import IssuanceLimits
from tenantedge.policy import registered_domain
from tenantedge.shared import DirectoryChallengeStore, DirectoryNameLock


class ChallengeStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(self.mktemp(), "challenges")
        self.one = DirectoryChallengeStore(self.directory)
        self.one.prepare()
        self.other = DirectoryChallengeStore(self.directory)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IChallengeStore, self.one))

    def test_shared(self) -> None:
        """An answer one process adds, another serves; removal is seen by both."""
        self.successResultOf(self.one.add("tok_en-1", "tok_en-1.thumb"))
        self.assertEqual(self.successResultOf(self.other.get("tok_en-1")), "tok_en-1.thumb")
        self.successResultOf(self.other.remove("tok_en-1"))
        self.failureResultOf(self.one.get("tok_en-1"), KeyError)
        self.successResultOf(self.one.remove("tok_en-1"))  # unknown: not an error
        self.successResultOf(self.one.add("tls-alpn-01:shop.test", "tok keyauth"))
        self.assertEqual(self.successResultOf(self.other.get("tls-alpn-01:shop.test")), "tok keyauth")

    def test_hostile_tokens(self) -> None:
        """A token from a URL path never becomes a path outside the folder."""
        for bad in ("../../etc/passwd", "a/b", "", "x" * 300, "tls-alpn-01:../x", "tls-alpn-01:A.TEST", "\x00"):
            self.failureResultOf(self.one.get(bad), KeyError)
            self.failureResultOf(self.one.add(bad, "v"))
        self.assertEqual(os.listdir(self.directory), [])

    def test_files_private(self) -> None:
        self.successResultOf(self.one.add("tok", "v"))
        [name] = os.listdir(self.directory)
        self.assertEqual(os.stat(os.path.join(self.directory, name)).st_mode & 0o777, 0o600)


class NameLockTests(SynchronousTestCase):
    def test_one_holder_across_processes(self) -> None:
        """
        A second holder (another process: here another lock object on the
        same directory) waits until the first releases.
        """
        clock = Clock()
        directory = self.mktemp()
        first, second = DirectoryNameLock(directory, clock), DirectoryNameLock(directory, clock)
        self.assertTrue(verifyObject(INameLock, first))
        release = self.successResultOf(first.acquire("a.test"))
        waiting = second.acquire("a.test")
        clock.advance(1)
        self.assertNoResult(waiting)
        other_name = second.acquire("b.test")
        self.successResultOf(other_name)()
        release()
        release()  # twice is harmless
        clock.advance(0.1)
        self.successResultOf(waiting)()

    def test_cancel_waiting(self) -> None:
        clock = Clock()
        directory = self.mktemp()
        release = self.successResultOf(DirectoryNameLock(directory, clock).acquire("a.test"))
        waiting = DirectoryNameLock(directory, clock).acquire("a.test")
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(clock.getDelayedCalls(), [])
        release()

    def test_invalid_name(self) -> None:
        self.failureResultOf(DirectoryNameLock(self.mktemp(), Clock()).acquire("../x"))


class SharedStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        os.makedirs(self.mktemp())
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_backoff_seen_by_the_other(self) -> None:
        """A failure one worker records blocks the name in the other at once."""
        path = os.path.join(self.directory, "backoff.json")
        one, other = FailureBackoff(path, self.clock), FailureBackoff(path, self.clock)
        one.load()
        other.load()
        until = one.record_failure("a.test")
        self.assertEqual(other.blocked_until("a.test"), until)
        # Both count failures on top of each other's, not over them.
        other.record_failure("a.test")
        self.assertEqual(one.failures("a.test") if one.blocked_until("a.test") else 0, 2)
        other.record_success("a.test")
        self.assertIsNone(one.blocked_until("a.test"))

    def test_lock_failure_keeps_the_state(self) -> None:
        """
        When the state file cannot be locked (no descriptors left), a change
        applies to what this process knows, never to an empty state.
        """
        path = os.path.join(self.directory, "limits.json")
        limits = IssuanceLimits(path, self.clock, registered_domain, max_new_orders=3)
        limits.load()
        for _ in range(3):
            limits.record_order("ca")
        import errno

        from tenantedge import shared

        def no_descriptors(fd: int, operation: int) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(shared.fcntl, "flock", no_descriptors)
        limits.record_failed_validation("ca", "x.example.com")
        self.assertRaises(LimitExceeded, limits.check, "ca", "y.example.com")
        self.flushLoggedErrors()

    def test_limits_count_across_workers(self) -> None:
        """Two workers together stop at the account's limit, not twice it."""
        path = os.path.join(self.directory, "limits.json")
        one = IssuanceLimits(path, self.clock, registered_domain, max_new_orders=3)
        other = IssuanceLimits(path, self.clock, registered_domain, max_new_orders=3)
        one.load()
        other.load()
        one.record_order("ca")
        other.record_order("ca")
        one.record_order("ca")
        self.assertRaises(LimitExceeded, other.check, "ca", "x.example.com")
        self.assertRaises(LimitExceeded, one.check, "ca", "x.example.com")
