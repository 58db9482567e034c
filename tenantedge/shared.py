"""
State that every process using one store directory shares: the workers of
one box (C{--workers}), or several servers on one file system.

  - L{DirectoryChallengeStore}: pending HTTP-01 and TLS-ALPN-01 answers as
    small files under C{<store>/challenges/}, so whichever process the CA's
    validation reaches can answer an order another one started;
  - L{DirectoryNameLock}: one issuance per name across processes (an
    C{fcntl} lock on C{<store>/locks/<name>.issue}); whoever takes it
    re-reads the store first (L{tenantedge.pipeline});
  - L{StateFile}: the small JSON state files (failure backoff, issuance
    limits) read again when another process changed them, and changed
    under a lock, read-modify-write, so no process overwrites another's
    counts.

All file work here is small and local (a few hundred bytes), done in the
reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .hostnames import InvalidHostname, normalize
from .interfaces import HeldLock, IChallengeStore, INameLock, ISharedState
from .store import atomic_write, ensure_private_directory

__all__ = ["DirectoryChallengeStore", "DirectoryNameLock", "StateFile", "KEEP", "challenge_key_valid"]

#: Passed to a L{StateFile.update} change when the file could not be
#: locked or read: keep the state in memory as it is and change that.
KEEP = object()

#: ACME tokens are base64url (RFC 8555 section 8.1).
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
#: Leftover answers (a process that died mid-order) older than this are
#: removed at start-up; an order takes minutes at most.
_STALE = 86400.0


def _challenge_file(directory: str, key: str) -> str:
    """
    The file for a challenge key: an ACME token, or C{tls-alpn-01:<name>}.

    @raise KeyError: for anything else (a URL path can hold any bytes).
    """
    if _TOKEN.match(key):
        return os.path.join(directory, "http-01." + key)
    prefix, _, name = key.partition(":")
    if prefix == "tls-alpn-01":
        try:
            if normalize(name) == name:
                return os.path.join(directory, "tls-alpn-01." + name)
        except InvalidHostname:
            pass
    raise KeyError(key)


def challenge_key_valid(key: str) -> bool:
    """Is this a challenge key any store may keep (an ACME token, or C{tls-alpn-01:<name>})?"""
    try:
        _challenge_file("", key)
    except KeyError:
        return False
    return True


@implementer(IChallengeStore)
@attrs.define
class DirectoryChallengeStore:
    """
    Pending challenge answers in C{<store>/challenges/}, one file each
    (written atomically, 0600), shared by every process on the store.

    @ivar directory: the folder.
    """

    directory: str
    _log = Logger()

    def prepare(self) -> None:
        """Create the folder and drop answers a dead process left behind."""
        ensure_private_directory(self.directory)
        now = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    if now - entry.stat().st_mtime > _STALE:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def add(self, token: str, key_authorization: str) -> Deferred[None]:
        try:
            atomic_write(_challenge_file(self.directory, token), key_authorization.encode("ascii"))
        except (KeyError, OSError, UnicodeEncodeError) as e:
            return fail(e)
        return succeed(None)

    def remove(self, token: str) -> Deferred[None]:
        try:
            os.unlink(_challenge_file(self.directory, token))
        except (KeyError, FileNotFoundError):
            pass
        except OSError as e:
            return fail(e)
        return succeed(None)

    def get(self, token: str) -> Deferred[str]:
        try:
            with open(_challenge_file(self.directory, token), "rb") as f:
                return succeed(f.read(4096).decode("ascii"))
        except (KeyError, FileNotFoundError, UnicodeDecodeError):
            return fail(KeyError(token))
        except OSError as e:
            self._log.error("cannot read challenge answer {token}: {error}", token=token, error=e.strerror)
            return fail(KeyError(token))


@implementer(INameLock)
@attrs.define
class DirectoryNameLock:
    """
    An exclusive C{fcntl} lock per name, held across processes while one of
    them issues or renews it. A busy lock is tried again every C{poll}
    seconds (processes on one box; a fleet uses a lock with notifications).
    A process that dies releases its locks with its file descriptors.

    @ivar directory: where the lock files live (C{<store>/locks}).
    """

    directory: str
    clock: IReactorTime
    poll: float = 0.1

    def acquire(self, server_name: str) -> Deferred[HeldLock]:
        try:
            if normalize(server_name) != server_name:
                raise InvalidHostname("not in normal form")
            ensure_private_directory(self.directory)
            fd = os.open(os.path.join(self.directory, server_name + ".issue"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (InvalidHostname, OSError, ValueError) as e:
            return fail(e)
        waiting: list[Any] = []

        def cancel(d: Deferred[HeldLock]) -> None:
            if waiting and waiting[0].active():
                waiting[0].cancel()
            os.close(fd)

        d: Deferred[HeldLock] = Deferred(cancel)

        def attempt() -> None:
            waiting.clear()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    waiting.append(self.clock.callLater(self.poll, attempt))
                    return
                os.close(fd)
                d.errback(e)
                return
            d.callback(HeldLock(_releaser(fd)))  # an flock is never lost while its descriptor is open

        attempt()
        return d


def _releaser(fd: int) -> Callable[[], None]:
    released: list[bool] = []

    def release() -> None:
        if not released:
            released.append(True)
            os.close(fd)  # closing the descriptor drops the flock

    return release


@implementer(ISharedState)
class StateFile:
    """
    A small JSON file that several processes read and change: read again
    whenever another process replaced it, changed under an exclusive lock
    (read, change, write back), so no process overwrites another's update.

    @ivar path: the file, or C{None} for state kept in memory only.
    """

    _log = Logger()

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._identity: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        """Has another process written the file since this one read it?"""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._identity is not None
        except OSError:
            return False
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self._identity

    def read(self) -> Any:
        """
        The file's data (C{None} if there is none).

        @raise OSError: if it cannot be read.
        @raise ValueError: if it is not JSON.
        """
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = json.load(f)
        except FileNotFoundError:
            self._identity = None
            return None
        self._identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        return data

    def update(self, change: Callable[[Any], Any]) -> Any:
        """
        Under the file's lock: read it, C{change(data)} (which returns the
        new data), write it back. Returns the new data. A failure to write
        (a full disk) is logged, not raised: losing a counter update must
        never fail an issuance.
        """
        if self.path is None:
            return change(None)
        lock_fd = None
        current = None
        try:
            lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                current = self.read()
            except OSError as e:
                # Passing trouble (EMFILE, EIO): keep what this process has.
                self._log.error("cannot read state {file}: {error}", file=self.path, error=str(e))
                current = KEEP
            except ValueError as e:
                self._log.error("ignoring unreadable state {file}: {error}", file=self.path, error=str(e))
            new = change(current)
            try:
                atomic_write(self.path, json.dumps(new).encode())
                st = os.stat(self.path)
                self._identity = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError as e:
                self._log.error("cannot save state to {file}: {error}", file=self.path, error=str(e))
            return new
        except OSError as e:
            # The lock itself is unavailable (no descriptors left, a
            # read-only disk): change the state this process has, never an
            # empty one, or the limits would be forgotten.
            self._log.error("cannot lock state {file}: {error}", file=self.path, error=str(e))
            return change(KEEP)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
