"""
The directory certificate store, in txacme's format: C{<dir>/<name>.pem}
holds the private key, the leaf certificate and its chain.

What it promises beyond txacme's store:
  - writes are atomic and durable (temp file, fsync, rename, fsync of the
    directory), so a crash or a full disk leaves the previous file intact;
  - files are created 0600 and the directory 0700, and start-up refuses a
    store whose key files other users can read;
  - a corrupt or unreadable file is logged by name and treated as missing,
    and before it is replaced it is moved to C{quarantine/}, never silently
    overwritten;
  - L{delete} moves an entry to C{archive/}: a key is never destroyed;
  - a name is validated by L{tenantedge.hostnames.normalize} before it
    becomes a path, so C{..}, C{/} and NUL can never reach the file system.

Beside a certificate, C{<name>.ocsp} keeps its latest OCSP response (DER,
L{tenantedge.ocsp}), written atomically like the certificate and 0600 like
everything in the store (a response is public, but the directory's file
names are the tenant list, and nothing outside the edge needs to read it).
It is removed with its certificate and never read as one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .certificates import CertificateBundle, InvalidBundle
from .hostnames import InvalidHostname, normalize
from .interfaces import ICertificateStore, IOcspStore

__all__ = [
    "DirectoryStore",
    "StoreError",
    "atomic_write",
    "check_private_file",
    "run_inline",
]

T = TypeVar("T")
RunBlocking = Callable[..., "Deferred[Any]"]

_SUFFIX = ".pem"
_OCSP_SUFFIX = ".ocsp"
#: A key, a leaf and a long chain are a few KiB; anything near this is not
#: a certificate bundle, and reading it whole would only waste memory.
_MAX_FILE = 1024 * 1024
#: Read errors that say "this entry is unusable" (as opposed to a passing
#: condition such as EMFILE or EIO): the entry counts as missing.
_UNREADABLE = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG})
_TMP_PREFIX = "."


class StoreError(Exception):
    """
    The store cannot be used as it is; the message says what to do.
    """


def run_inline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    Run blocking file work right away in the calling thread.

    The default for unit tests; L{tenantedge.tap} passes a thread-pool
    runner so that an fsync on a slow disk never stalls other handshakes.
    """
    return maybeDeferred(f, *args)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} so that readers and crashes only ever see
    the old or the new content.

    The temporary file is created with C{mode} from the start (never
    briefly world-readable), fsynced, renamed over C{path}, and the
    directory is fsynced so the rename itself is durable. On any error
    (a full disk included) the temporary file is removed and the old
    content stays in place.
    """
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{base}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # a umask may have narrowed it; never widened
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_bundle(path: str) -> _Read:
    """
    Read and parse one store file (in whatever thread file work runs in).

    @raise FileNotFoundError: nothing stored.
    @raise OSError: the file cannot be read.
    @raise InvalidBundle: the file is corrupt.
    """
    with open(path, "rb") as f:
        data = f.read(_MAX_FILE)
        identity = _identity(os.fstat(f.fileno()))
    return _Read(CertificateBundle.from_pem(data), identity)


@attrs.frozen
class _Read:
    bundle: CertificateBundle
    identity: tuple[int, int, int]


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is replaced (inode) or rewritten (mtime, size)."""
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        return _identity(os.stat(path))
    except FileNotFoundError:
        return None


@contextmanager
def name_lock(store_path: str, server_name: str) -> Iterator[None]:
    """
    An exclusive lock (fcntl) on one name's entry, held while it is
    written, quarantined or archived, so that the server and the admin CLI
    (or several servers sharing a store) never interleave changes to one
    entry. Readers need no lock: every change is an atomic rename.
    """
    directory = os.path.join(store_path, "locks")
    ensure_private_directory(directory)
    fd = os.open(os.path.join(directory, server_name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_private_file(path: str) -> None:
    """
    Refuse a key-holding file that users other than its owner can read or
    write.

    @raise StoreError: naming the file and the command that fixes it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StoreError(
            f"{path} holds a private key but has mode {stat.S_IMODE(st.st_mode):04o}; "
            f"fix it with: chmod 600 {path}"
        )


def ensure_private_directory(path: str) -> None:
    """
    Create C{path} with mode 0700 if it does not exist, and every missing
    parent with 0700 too (C{os.makedirs} applies its mode to the last
    directory only: C{<store>/accounts/} came out 0755).

    @raise StoreError: if it cannot be created or is not a directory.
    """
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.exists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create directory {directory}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise StoreError(f"{path} exists but is not a directory")


def _read_small(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(_MAX_FILE)


@implementer(ICertificateStore, IOcspStore)
@attrs.define
class DirectoryStore:
    """
    An L{ICertificateStore} over one directory.

    @ivar path: the directory.
    @ivar run_blocking: how file work is run (see L{run_inline}).
    """

    path: str
    run_blocking: RunBlocking = run_inline
    _corrupt: set[str] = attrs.field(factory=set, init=False)
    _seen: dict[str, tuple[int, int, int]] = attrs.field(factory=dict, init=False)
    _log = Logger()

    def prepare(self) -> None:
        """
        Create the directory if needed and check that no key file in it is
        readable by others. Called once at start-up, before serving.

        Only file modes are read (one C{stat} per entry), never contents, so
        start-up stays fast with many stored certificates.

        @raise StoreError: with a message naming the bad file and the fix.
        """
        ensure_private_directory(self.path)
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StoreError(
                f"store directory {self.path} is not writable by this user (uid {os.getuid()}); "
                f"fix it with: chown -R {os.getuid()} {self.path}"
            )
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        if mode & 0o077:
            self._log.warn(
                "store directory {path} has mode {mode}; 0700 keeps tenant names private",
                path=self.path,
                mode=f"{mode:04o}",
            )
        with os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.endswith(_SUFFIX) and entry.is_file(follow_symlinks=False):
                    check_private_file(entry.path)

    def _file_for(self, server_name: str) -> str:
        try:
            if normalize(server_name) != server_name:
                raise InvalidHostname("name is not in normal form")
        except InvalidHostname as e:
            raise ValueError(f"refusing to turn an invalid name into a path: {e.reason}") from None
        return os.path.join(self.path, server_name + _SUFFIX)

    # File work may run in a thread (see run_blocking); the methods below
    # that run there only touch the file system and raise or return plain
    # values. State changes and logging happen back in the reactor thread.

    def get(self, server_name: str) -> Deferred[CertificateBundle]:
        try:
            path = self._file_for(server_name)
        except ValueError:
            return fail(KeyError(server_name))
        d = self.run_blocking(_read_bundle, path)
        d.addCallbacks(self._read_ok, self._read_failed, callbackArgs=(server_name,), errbackArgs=(server_name, path))
        return d

    def _read_ok(self, read: _Read, server_name: str) -> CertificateBundle:
        self._corrupt.discard(server_name)
        self._seen[server_name] = read.identity
        return read.bundle

    def _read_failed(self, failure: Failure, server_name: str, path: str) -> Failure:
        if failure.check(FileNotFoundError):
            return Failure(KeyError(server_name))
        if failure.check(OSError):
            os_error = cast(OSError, failure.value)
            if os_error.errno not in _UNREADABLE:
                # A passing condition (no file descriptors left, an I/O
                # error): fail this lookup, but never conclude the file is
                # bad, or a flood of handshakes would replace good
                # certificates with new orders.
                self._log.error(
                    "cannot read stored certificate {file} right now: {error}",
                    file=path,
                    error=os_error.strerror,
                )
                return failure
            self._log.error(
                "cannot read stored certificate {file}: {error}; treating it as missing",
                file=path,
                error=os_error.strerror,
            )
        elif failure.check(InvalidBundle):
            self._log.error(
                "corrupt stored certificate {file}: {reason}; treating it as missing "
                "(it will be moved to quarantine/ before a new one is written)",
                file=path,
                reason=cast(InvalidBundle, failure.value).reason,
            )
        else:
            return failure
        self._corrupt.add(server_name)
        return Failure(KeyError(server_name))

    def store(self, server_name: str, bundle: CertificateBundle) -> Deferred[None]:
        path = self._file_for(server_name)
        quarantine = server_name in self._corrupt
        d = self.run_blocking(self._write, server_name, path, bundle.to_pem(), quarantine)
        d.addCallbacks(
            self._stored, self._store_failed, callbackArgs=(server_name, path), errbackArgs=(server_name, path)
        )
        return d

    def _write(
        self, server_name: str, path: str, data: bytes, quarantine: bool
    ) -> tuple[str | None, tuple[int, int, int] | None]:
        with name_lock(self.path, server_name):
            moved = None
            if quarantine and os.path.exists(path):
                moved = self._move_aside(path, "quarantine", server_name)
            atomic_write(path, data)
            return moved, _file_identity(path)

    def _stored(
        self, result: tuple[str | None, tuple[int, int, int] | None], server_name: str, path: str
    ) -> None:
        moved, identity = result
        self._corrupt.discard(server_name)
        if identity is not None:
            self._seen[server_name] = identity
        if moved is not None:
            self._log.warn(
                "moved corrupt certificate file {file} to {moved} before replacing it",
                file=path,
                moved=moved,
            )

    def _store_failed(self, failure: Failure, server_name: str, path: str) -> Failure:
        if failure.check(OSError) and cast(OSError, failure.value).errno == errno.ENOSPC:
            self._log.critical(
                "disk full: could not store the certificate for {host} in {file}; "
                "the previous file (if any) is untouched",
                host=server_name,
                file=path,
            )
        return failure

    def _move_aside(self, path: str, folder: str, server_name: str) -> str:
        target_dir = os.path.join(self.path, folder)
        ensure_private_directory(target_dir)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = os.path.join(target_dir, f"{server_name}{_SUFFIX}.{stamp}.{secrets.token_hex(3)}")
        os.replace(path, target)
        return target

    def delete(self, server_name: str) -> Deferred[None]:
        try:
            path = self._file_for(server_name)
        except ValueError:
            return fail(KeyError(server_name))
        d = self.run_blocking(self._archive, server_name, path)
        d.addCallback(self._archived, server_name)
        return d

    def _archive(self, server_name: str, path: str) -> str:
        with name_lock(self.path, server_name):
            if not os.path.exists(path):
                raise KeyError(server_name)
            try:
                os.unlink(path[: -len(_SUFFIX)] + _OCSP_SUFFIX)
            except FileNotFoundError:
                pass
            return self._move_aside(path, "archive", server_name)

    def get_ocsp(self, server_name: str) -> Deferred[bytes]:
        """The stored OCSP response (C{<name>.ocsp}); C{KeyError} if none."""
        try:
            path = self._file_for(server_name)[: -len(_SUFFIX)] + _OCSP_SUFFIX
        except ValueError:
            return fail(KeyError(server_name))
        d = self.run_blocking(_read_small, path)

        def missing(failure: Failure) -> Failure:
            if failure.check(FileNotFoundError):
                return Failure(KeyError(server_name))
            return failure

        d.addErrback(missing)
        return d

    def store_ocsp(self, server_name: str, der: bytes) -> Deferred[None]:
        """Write C{<name>.ocsp} atomically (0600)."""
        try:
            path = self._file_for(server_name)[: -len(_SUFFIX)] + _OCSP_SUFFIX
        except ValueError as e:
            return fail(e)
        return self.run_blocking(atomic_write, path, der)

    def _archived(self, moved: str, server_name: str) -> None:
        self._corrupt.discard(server_name)
        self._seen.pop(server_name, None)
        self._log.info("archived {host} to {moved}", host=server_name, moved=moved)

    def changed(self, server_names: Sequence[str]) -> Deferred[list[str]]:
        """
        Which of these names' entries were replaced or removed by someone
        else (the admin CLI, another server on a shared store) since this
        store last read or wrote them. One C{stat} per name, off the
        reactor thread.
        """
        known = [(n, self._seen.get(n)) for n in server_names]

        def compare() -> list[str]:
            out = []
            for name, seen in known:
                if seen is None:
                    continue
                if _file_identity(os.path.join(self.path, name + _SUFFIX)) != seen:
                    out.append(name)
            return out

        d = self.run_blocking(compare)
        d.addCallback(self._forget_seen)
        return d

    def _forget_seen(self, names: list[str]) -> list[str]:
        for name in names:
            self._seen.pop(name, None)
        return names

    def names(self) -> Deferred[list[str]]:
        return self.run_blocking(lambda: list(self._iter_names()))

    def _iter_names(self) -> Iterator[str]:
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(_TMP_PREFIX) or not name.endswith(_SUFFIX):
                    continue
                host = name[: -len(_SUFFIX)]
                try:
                    if normalize(host) == host:
                        yield host
                except InvalidHostname:
                    continue
