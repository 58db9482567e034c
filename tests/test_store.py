"""
Tests for L{tenantedge.store.DirectoryStore} and the L{ICertificateStore}
contract, which every store (fakes included) must pass.
"""

from __future__ import annotations

import errno
import os
import stat

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.certificates import CertificateBundle, InvalidBundle
from tenantedge.interfaces import ICertificateStore
from tenantedge.store import DirectoryStore, StoreError, atomic_write
from tenantedge.testing import MemoryStore, make_bundle


class StoreContractMixin:
    """
    The L{ICertificateStore} contract. Subclasses provide C{make_store}.
    """

    def make_store(self) -> ICertificateStore:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ICertificateStore, self.store))

    def test_missing_is_keyerror(self) -> None:
        self.failureResultOf(self.store.get("nothing.example"), KeyError)

    def test_round_trip(self) -> None:
        bundle = make_bundle("a.example")
        self.assertIsNone(self.successResultOf(self.store.store("a.example", bundle)))
        got = self.successResultOf(self.store.get("a.example"))
        self.assertEqual(got.to_pem(), bundle.to_pem())

    def test_replace(self) -> None:
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        newer = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", newer))
        self.assertEqual(self.successResultOf(self.store.get("a.example")).to_pem(), newer.to_pem())

    def test_names(self) -> None:
        for name in ("a.example", "b.example"):
            self.successResultOf(self.store.store(name, make_bundle(name)))
        self.assertEqual(sorted(self.successResultOf(self.store.names())), ["a.example", "b.example"])

    def test_delete(self) -> None:
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        self.successResultOf(self.store.delete("a.example"))
        self.failureResultOf(self.store.get("a.example"), KeyError)
        self.assertEqual(self.successResultOf(self.store.names()), [])
        self.failureResultOf(self.store.delete("a.example"), KeyError)

    def test_invalid_names_never_stored(self) -> None:
        """
        Names that are not normalised host names never become entries.
        """
        for name in ("../evil.example", "a/b.example", "x\x00.example", "UPPER.example"):
            self.assertRaises(ValueError, self.store.store, name, make_bundle("a.example"))


class SharedStoreContractMixin(StoreContractMixin):
    """
    The part of the contract a store shared by processes or nodes keeps:
    what one instance changes, another notices. Subclasses also provide
    C{make_peer}, another instance on the same storage.
    """

    def make_peer(self) -> ICertificateStore:
        raise NotImplementedError

    def test_changed(self) -> None:
        """
        Entries replaced or removed by another process are reported; the
        store's own writes are not.
        """
        for name in ("a.example", "b.example", "c.example"):
            self.successResultOf(self.store.store(name, make_bundle(name)))
        self.successResultOf(self.store.get("a.example"))
        self.assertEqual(self.successResultOf(self.store.changed(["a.example", "b.example", "c.example"])), [])
        other = self.make_peer()  # another process, e.g. the admin CLI, or a fleet peer
        self.successResultOf(other.store("a.example", make_bundle("a.example")))
        self.successResultOf(other.delete("b.example"))
        changed = self.successResultOf(self.store.changed(["a.example", "b.example", "c.example", "d.example"]))
        self.assertEqual(sorted(changed), ["a.example", "b.example"])
        # Reported once: after that the entry counts as unknown until read again.
        self.assertEqual(self.successResultOf(self.store.changed(["a.example"])), [])


class MemoryStoreTests(StoreContractMixin, SynchronousTestCase):
    def make_store(self) -> ICertificateStore:
        return MemoryStore()


class DirectoryStoreTests(SharedStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> DirectoryStore:
        self.path = os.path.join(self.mktemp(), "store")
        store = DirectoryStore(self.path)
        store.prepare()
        return store

    def make_peer(self) -> DirectoryStore:
        return DirectoryStore(self.path)

    def files(self) -> list[str]:
        """The plain files in the store directory (no temporary file may linger)."""
        return sorted(n for n in os.listdir(self.path) if os.path.isfile(os.path.join(self.path, n)))

    def test_name_lock(self) -> None:
        """
        Writers hold an exclusive fcntl lock per name: another process (here,
        another open file description) cannot take it meanwhile.
        """
        import fcntl

        from tenantedge.store import name_lock

        lock_file = os.path.join(self.path, "locks", "a.example.lock")
        with name_lock(self.path, "a.example"):
            fd = os.open(lock_file, os.O_RDWR)
            self.addCleanup(os.close, fd)
            self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def capture_logs(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_format_is_txacme(self) -> None:
        """
        C{<dir>/<name>.pem} holds the key, then the leaf, then the chain.
        """
        bundle = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", bundle))
        with open(os.path.join(self.path, "a.example.pem"), "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"-----BEGIN PRIVATE KEY-----"))
        self.assertEqual(data.count(b"-----BEGIN CERTIFICATE-----"), 1)
        self.assertEqual(CertificateBundle.from_pem(data).to_pem(), data)

    def test_modes(self) -> None:
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.path, "a.example.pem")).st_mode), 0o600)

    def test_created_parents_are_private(self) -> None:
        """
        Every directory the store creates is 0700, not only the last one
        (the account folder under a new accounts/ used to leave it 0755).
        """
        from tenantedge.store import ensure_private_directory

        base = self.mktemp()
        os.mkdir(base)
        ensure_private_directory(os.path.join(base, "accounts", "ca.example_443_dir"))
        for sub in ("accounts", os.path.join("accounts", "ca.example_443_dir")):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(base, sub)).st_mode), 0o700, sub)

    def test_mode_despite_umask(self) -> None:
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.path, "a.example.pem")).st_mode), 0o600)

    def test_failed_write_keeps_old_file(self) -> None:
        """
        A write that fails half way (here: fsync fails, as on an I/O error)
        leaves the previous certificate in place and no temporary file.
        """
        old = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", old))

        def broken_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        self.patch(os, "fsync", broken_fsync)
        self.failureResultOf(self.store.store("a.example", make_bundle("a.example")), OSError)
        self.assertEqual(self.files(), ["a.example.pem"])
        self.assertEqual(self.successResultOf(self.store.get("a.example")).to_pem(), old.to_pem())

    def test_disk_full(self) -> None:
        """
        A full disk fails the store with ENOSPC, logs it critically, and
        loses nothing.
        """
        events = self.capture_logs()
        old = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", old))

        def full(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", full)
        f = self.failureResultOf(self.store.store("a.example", make_bundle("a.example")), OSError)
        self.assertEqual(f.value.errno, errno.ENOSPC)
        self.assertEqual(self.files(), ["a.example.pem"])
        self.assertEqual(self.successResultOf(self.store.get("a.example")).to_pem(), old.to_pem())
        self.assertTrue(any(e.get("log_level") == LogLevel.critical for e in events))

    def test_corrupt_file_is_missing_and_logged(self) -> None:
        """
        A corrupt file counts as missing, with a log line naming it; when a
        new certificate is stored, the corrupt file is moved to
        C{quarantine/} first, never silently overwritten.
        """
        events = self.capture_logs()
        path = os.path.join(self.path, "a.example.pem")
        atomic_write(path, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        self.failureResultOf(self.store.get("a.example"), KeyError)
        errors = [e for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["file"], path)

        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        quarantined = os.listdir(os.path.join(self.path, "quarantine"))
        self.assertEqual(len(quarantined), 1)
        with open(os.path.join(self.path, "quarantine", quarantined[0]), "rb") as f:
            self.assertIn(b"garbage", f.read())
        self.assertTrue(any("quarantine" in str(e.get("moved", "")) for e in events))
        self.successResultOf(self.store.get("a.example"))

    def test_mismatched_key_is_corrupt(self) -> None:
        one, two = make_bundle("a.example"), make_bundle("a.example")
        key_of_two = two.to_pem().split(b"-----BEGIN CERTIFICATE-----")[0]
        cert_of_one = b"-----BEGIN CERTIFICATE-----" + one.to_pem().split(b"-----BEGIN CERTIFICATE-----")[1]
        atomic_write(os.path.join(self.path, "a.example.pem"), key_of_two + cert_of_one)
        self.failureResultOf(self.store.get("a.example"), KeyError)

    def test_unreadable_file_is_missing(self) -> None:
        os.mkdir(os.path.join(self.path, "a.example.pem"))  # EISDIR on read
        self.failureResultOf(self.store.get("a.example"), KeyError)

    def test_passing_read_error_is_not_corruption(self) -> None:
        """
        Running out of file descriptors fails the lookup but does not make
        the file count as corrupt: no new certificate replaces it, nothing
        is quarantined.
        """
        bundle = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", bundle))
        real_open = open

        def no_fds(path, *args, **kwargs):
            if str(path).endswith("a.example.pem"):
                raise OSError(errno.EMFILE, "Too many open files")
            return real_open(path, *args, **kwargs)

        import builtins

        self.patch(builtins, "open", no_fds)
        f = self.failureResultOf(self.store.get("a.example"), OSError)
        self.assertEqual(f.value.errno, errno.EMFILE)
        self.patch(builtins, "open", real_open)
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        self.assertFalse(os.path.exists(os.path.join(self.path, "quarantine")))
        self.flushLoggedErrors()

    def test_prepare_refuses_readable_keys(self) -> None:
        """
        Start-up refuses a store whose key files others can read, naming
        the file and the fix.
        """
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        path = os.path.join(self.path, "a.example.pem")
        os.chmod(path, 0o644)
        e = self.assertRaises(StoreError, DirectoryStore(self.path).prepare)
        self.assertIn(path, str(e))
        self.assertIn("chmod 600", str(e))

    def test_delete_archives(self) -> None:
        """Removing a name moves its file (and key) to C{archive/}."""
        bundle = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", bundle))
        self.successResultOf(self.store.delete("a.example"))
        archived = os.listdir(os.path.join(self.path, "archive"))
        self.assertEqual(len(archived), 1)
        with open(os.path.join(self.path, "archive", archived[0]), "rb") as f:
            self.assertEqual(f.read(), bundle.to_pem())

    def test_names_ignores_other_files(self) -> None:
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        for junk in (".a.example.pem.1234.tmp", "notes.txt", "UPPER.example.pem", "x.pem"):
            with open(os.path.join(self.path, junk), "w"):
                pass
        os.mkdir(os.path.join(self.path, "archive"))
        self.assertEqual(self.successResultOf(self.store.names()), ["a.example"])

    def test_invalid_name_get_is_missing(self) -> None:
        self.failureResultOf(self.store.get("../../etc/passwd"), KeyError)


class BundleTests(SynchronousTestCase):
    def test_garbage(self) -> None:
        for data in (b"", b"hello", b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"):
            self.assertRaises(InvalidBundle, CertificateBundle.from_pem, data)

    def test_two_keys(self) -> None:
        pem = make_bundle("a.example").to_pem()
        key = pem.split(b"-----BEGIN CERTIFICATE-----")[0]
        e = self.assertRaises(InvalidBundle, CertificateBundle.from_pem, key + pem)
        self.assertIn("found 2", e.reason)

    def test_validity(self) -> None:
        bundle = make_bundle("a.example", not_before=1000, not_after=2000)
        self.assertFalse(bundle.is_valid_at(999))
        self.assertTrue(bundle.is_valid_at(1000))
        self.assertFalse(bundle.is_valid_at(2000))
        self.assertEqual(bundle.dns_names(), ["a.example"])
