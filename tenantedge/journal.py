"""
L{RecordJournal}: records by key (each hostname's lifecycle) that the
processes on one store directory share, changed one record at a time.

Two files: a snapshot C{<name>.json} (one JSON object, key to record: the
format C{lifecycle.json} always had) and a journal C{<name>.journal}, one
JSON line per change appended after it. A change is one C{write} of one
line under an exclusive C{flock}, a few microseconds whatever the number
of records; the snapshot is rewritten only when the journal has grown past
both a floor and the snapshot's own size (compaction), so the cost of a
rewrite is spread over at least as many changes as there are records.

Every process reads the lines the others appended since its last look
(a C{stat} says whether there are any) and re-reads both files when a
compaction replaced them. A journal's first line names its generation (a
random token): one deleted or truncated and written again is never taken
for the file a process was reading, whatever its inode and size. Reading the whole pair happens under a shared
lock, so it never sees a compaction half done. A line torn by a crash is
skipped and terminated before the next append; appends are not fsync'd
(a record is lost only with the machine, and the certificate it describes
is in the store regardless), compactions are.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import ISharedRecords, ISharedState
from .shared import KEEP
from .store import atomic_write

__all__ = ["RecordJournal", "DocumentRecords", "COMPACT_FLOOR", "Record", "Change", "Stored"]

#: The journal is folded into the snapshot once it is larger than this and
#: than the snapshot.
COMPACT_FLOOR = 1 << 20

_Identity = tuple[int, int, int]

#: One record, as JSON.
Record = dict[str, Any]
#: How a record changes (L{tenantedge.interfaces.ISharedRecords.update}).
Change = Callable[[Record | None], Record | None]
#: Told the record as stored.
Stored = Callable[[Record | None], object]


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@implementer(ISharedRecords)
class RecordJournal:
    """
    Records in a snapshot file and a journal; see the module docstring.

    @ivar path: the snapshot (C{<store>/lifecycle.json}), or C{None} to
        keep the records in memory only.
    """

    _log = Logger()

    def __init__(self, path: str | None, compact_floor: int = COMPACT_FLOOR) -> None:
        self.path = path
        self.compact_floor = compact_floor
        self._records: dict[str, dict[str, Any]] = {}
        self._snapshot: _Identity | None = None
        self._journal: int | None = None  # the journal's inode
        #: The journal's first line, naming this generation of the file:
        #: one truncated or deleted and made again is never taken for the
        #: one this process was reading, whatever inode it gets.
        self._header: bytes | None = None
        self._offset = 0
        self._failing = False
        #: No compaction is tried before the journal reaches this offset
        #: (after one failed, a full disk say, not at every change).
        self._compact_after = 0
        self._compact_failing = False

    @property
    def _journal_path(self) -> str:
        assert self.path is not None
        return os.path.splitext(self.path)[0] + ".journal"

    # -- reading -----------------------------------------------------------------------------

    def load(self) -> None:
        if self.path is None:
            return
        with self._locked(fcntl.LOCK_SH):
            self._reload()

    def get(self, key: str) -> dict[str, Any] | None:
        self._catch_up()
        return self._records.get(key)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        self._catch_up()
        return list(self._records.items())

    def _stale(self) -> bool | None:
        """C{True}: re-read both files; C{False}: read the new lines; C{None}: nothing new."""
        try:
            journal = os.stat(self._journal_path)
        except FileNotFoundError:
            journal = None
        try:
            snapshot: _Identity | None = _identity(os.stat(self.path))  # type: ignore[arg-type]
        except FileNotFoundError:
            snapshot = None
        if snapshot != self._snapshot or (journal.st_ino if journal else None) != self._journal:
            return True
        if journal is not None and journal.st_size < self._offset:
            return True  # truncated (by hand, or made again under the same inode)
        if journal is not None and journal.st_size > self._offset:
            return False
        return None

    def _catch_up(self) -> None:
        if self.path is None:
            return
        try:
            self._refresh(locked=False)
        except OSError as e:
            # Passing trouble (EMFILE, EIO): answer from what this process has.
            self._log_failure("read", e)

    def _reload(self) -> None:
        """
        Both files from the start (under the lock, so never mid-compaction);
        nothing changes here unless both could be read.
        """
        assert self.path is not None
        records: dict[str, dict[str, Any]] = {}
        snapshot = None
        try:
            with open(self.path, "rb") as f:
                snapshot = _identity(os.fstat(f.fileno()))
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except ValueError as e:
            self._log.error("ignoring unreadable records {file}: {error}", file=self.path, error=str(e))
            data = {}
        if not isinstance(data, dict):
            self._log.error("ignoring unreadable records {file}", file=self.path)
            data = {}
        for key, value in data.items():
            if isinstance(value, dict):
                records[str(key)] = value
        journal, header, offset = self._read_journal(records, None, None, 0)
        self._records, self._snapshot = records, snapshot
        self._journal, self._header, self._offset = journal, header, offset

    def _refresh(self, locked: bool) -> None:
        """
        Catch up with the files: the lines appended since the last read, or
        both files again if they were replaced (under the shared lock,
        unless the caller holds the exclusive one: a second flock of this
        process's own would wait for itself).
        """
        stale = self._stale()
        if stale is False:
            try:
                self._journal, self._header, self._offset = self._read_journal(
                    self._records, self._journal, self._header, self._offset)
                return
            except _Replaced:
                stale = True
        if not stale:
            return
        if locked:
            self._reload()
        else:
            with self._locked(fcntl.LOCK_SH):
                self._reload()

    def _read_journal(
        self, records: dict[str, dict[str, Any]], journal: int | None, header: bytes | None, offset: int
    ) -> tuple[int | None, bytes | None, int]:
        """
        Apply to C{records} the complete lines after C{offset} (from the
        start if the journal is a new file).

        @return: the journal's inode, its header line and the new offset.
        @raise _Replaced: if it does not start with C{header} any more.
        """
        try:
            f = open(self._journal_path, "rb")
        except FileNotFoundError:
            return None, None, 0
        with f:
            inode = os.fstat(f.fileno()).st_ino
            if inode != journal:
                offset, header = 0, None
            if offset and header is not None and os.pread(f.fileno(), len(header), 0) != header:
                raise _Replaced()
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written (or torn) waits
        lines = chunk[:end].splitlines(keepends=True)
        if offset == 0 and lines and lines[0].startswith(_HEADER_START):
            header = lines.pop(0)
        for line in lines:
            self._apply_line(records, line)
        return inode, header, offset + end

    def _apply_line(self, records: dict[str, dict[str, Any]], line: bytes) -> None:
        if line.startswith(_HEADER_START):
            return  # a header where a torn line was ended: nothing to apply
        try:
            entry = json.loads(line)
            key, value = entry["k"], entry.get("v")
            if not isinstance(key, str) or not (value is None or isinstance(value, dict)):
                raise ValueError("not a record")
        except (ValueError, KeyError, TypeError) as e:
            if line.strip():
                self._log.error("skipping an unreadable line in {file}: {error}", file=self._journal_path,
                                error=str(e))
            return
        if value is None:
            records.pop(key, None)
        else:
            records[key] = value

    # -- changing ----------------------------------------------------------------------------

    def update(
        self,
        key: str,
        change: Change,
        stored: Stored | None = None,
    ) -> Any:
        new = self._update(key, change)
        if stored is not None:
            stored(new)
        return new

    def _update(self, key: str, change: Change) -> Any:
        if self.path is None:
            return self._set(key, change(self._records.get(key)))
        applied: list[dict[str, Any] | None] = []
        try:
            with self._locked(fcntl.LOCK_EX):
                self._refresh(locked=True)
                current = self._records.get(key)
                applied.append(change(current))
                if applied[0] is not current:  # the same object: nothing to write
                    self._set(key, applied[0])
                    self._append(key, applied[0])
        except OSError as e:
            # No lock or no room (a full disk, no descriptors left): the
            # change stands in this process's memory.
            self._log_failure("save", e)
            if not applied:
                applied.append(self._set(key, change(self._records.get(key))))
            return applied[0]
        self._failing = False
        return applied[0]

    def _set(self, key: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            self._records.pop(key, None)
        else:
            self._records[key] = value
        return value

    def _append(self, key: str, value: dict[str, Any] | None) -> None:
        """One line, under the exclusive lock, after a torn line (if any) is ended."""
        line = json.dumps({"k": key, "v": value}, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_ino != self._journal:
                self._journal, self._header, self._offset = st.st_ino, None, 0
            if st.st_size == 0:
                self._header = _new_header()
                line = self._header + line  # a new journal: its generation first
            elif st.st_size > self._offset:
                line = b"\n" + line  # a writer died mid-line: end it (it is skipped)
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self._journal_path}")
            self._offset = st.st_size + written
        finally:
            os.close(fd)
        snapshot_size = self._snapshot[2] if self._snapshot else 0
        if self._offset > max(self.compact_floor, snapshot_size, self._compact_after):
            try:
                self._compact()
            except OSError as e:
                # Try again only once the journal has grown by as much
                # again: a failed compaction costs a whole snapshot write.
                self._compact_after = self._offset + max(self.compact_floor, snapshot_size)
                if not self._compact_failing:
                    self._compact_failing = True
                    self._log.error("cannot fold {journal} into {file}: {error}; the journal grows until it can",
                                    journal=self._journal_path, file=self.path, error=str(e))
            else:
                self._compact_after = 0
                self._compact_failing = False

    def compact(self) -> None:
        """
        Fold the journal into the snapshot now (C{store copy} leaves a
        copied store so). Unlike L{update}, a failure raises.

        @raise OSError: if the files cannot be written.
        """
        if self.path is None:
            return
        with self._locked(fcntl.LOCK_EX):
            self._refresh(locked=True)
            self._compact()

    def _compact(self) -> None:
        """Fold the journal into a new snapshot, then start an empty journal (still under the lock)."""
        assert self.path is not None
        atomic_write(self.path, json.dumps(dict(sorted(self._records.items())), separators=(",", ":")).encode())
        header = _new_header()
        atomic_write(self._journal_path, header)
        self._snapshot = _identity(os.stat(self.path))
        self._journal = os.stat(self._journal_path).st_ino
        self._header, self._offset = header, len(header)

    def _locked(self, how: int) -> _Flock:
        assert self.path is not None
        return _Flock(self.path + ".lock", how)

    def _log_failure(self, what: str, error: OSError) -> None:
        if not self._failing:
            self._failing = True
            self._log.error("cannot {what} records {file}: {error}; kept in memory", what=what, file=self.path,
                            error=str(error))


@implementer(ISharedRecords)
class DocumentRecords:
    """
    Records kept in one L{ISharedState} document (key to record), rewritten
    whole at each change: for a shared store of an embedder's own that
    offers shared state but not per-name records. Correct, and as costly
    per change as the document is large. What C{stored} is told is the
    change as applied to this process's copy: a state that applies it
    again later to a newer document (as L{tenantedge.redisstore.RedisState}
    does) may store a newer record than the event says.
    """

    def __init__(self, state: ISharedState) -> None:
        self.state = state
        self.path = state.path
        self._records: dict[str, dict[str, Any]] = {}

    def _take(self, data: Any) -> None:
        if data is not KEEP:
            self._records = {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def load(self) -> None:
        self._take(self.state.read())

    def _fresh(self) -> None:
        if self.state.changed():
            try:
                self._take(self.state.read())
            except (OSError, ValueError):
                pass

    def get(self, key: str) -> dict[str, Any] | None:
        self._fresh()
        return self._records.get(key)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        self._fresh()
        return list(self._records.items())

    def update(
        self,
        key: str,
        change: Change,
        stored: Stored | None = None,
    ) -> Any:
        box: list[dict[str, Any] | None] = []

        def whole(data: Any) -> Any:
            self._take(data)
            new = change(self._records.get(key))
            if new is None:
                self._records.pop(key, None)
            else:
                self._records[key] = new
            box[:] = [new]
            return dict(self._records)

        self.state.update(whole)
        if stored is not None:
            stored(box[0])
        return box[0]


_HEADER_START = b'{"journal":'


def _new_header() -> bytes:
    return b'{"journal":"%s"}\n' % secrets.token_hex(8).encode()


class _Replaced(Exception):
    """The journal read so far was replaced by another file (under the same inode)."""


class _Flock:
    """C{with}: an exclusive or shared C{flock} on a lock file, released on exit."""

    def __init__(self, path: str, how: int) -> None:
        self.path = path
        self.how = how
        self.fd: int | None = None

    def __enter__(self) -> _Flock:
        if self.how == fcntl.LOCK_SH:
            # Reading needs no write access (store copy from a read-only
            # store or a backup): a lock file that is absent or cannot be
            # opened means reading unlocked; a compaction met midway shows
            # as a changed identity, and the next look reads again.
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, PermissionError):
                return self
        else:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, self.how)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
