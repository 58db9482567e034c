"""
Signed webhooks: tell the SaaS what happened to its tenants' certificates.

An event (C{hostname.issued}, C{hostname.renewed}, C{hostname.failed},
C{hostname.retired}, C{hostname.archived}, C{hostname.expiring-soon}) is
given to L{WebhookOutbox.emit}, which writes it to a persisted outbox and
returns at once; a delivery loop POSTs it as JSON to every C{--webhook}
URL::

    {"id": "7c0f...", "type": "hostname.issued", "created": 1767225600,
     "data": {"hostname": "shop.example.com", ...}}

signed the way Stripe signs its webhooks (GitHub's C{X-Hub-Signature-256}
is the same HMAC-SHA256 without the timestamp)::

    Tenantedge-Signature: t=1767225600,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
    Tenantedge-Event-Id: 7c0f...

The timestamp is the time of the attempt (each retry is signed afresh), so
a receiver can refuse replays older than a few minutes; L{verify_signature}
is the check. With several secrets (one per line of
C{--webhook-secret-file}, for a rotation) there is one C{v1=} per secret.

Delivery is at least once: an event is removed from the outbox only after a
2xx, so a crash between the receiver's 2xx and the removal sends it again.
Receivers deduplicate on C{id}.

The outbox is C{<store>/webhooks/} (0700): one directory per URL (named by
a hash of the URL, with the URL in its C{destination} file), one file per
event in it (0600), written with L{tenantedge.store.atomic_write} (temp
file, fsync, rename, fsync of the directory), so a crash mid-write leaves
either the whole event or nothing, and a full disk fails the write, never
a half-written file. Every process on one store (C{--workers}) writes
events into it; the one holding C{deliver.lock} (an C{fcntl} lock) delivers
them all, the others take over within C{poll} seconds if it dies.

Per URL, events go out one at a time, in the order they were written (from
several processes: within C{poll} seconds of it); a failure (no answer
within the deadline, a connection error, any non-2xx but 410) retries that
event after an exponential backoff with jitter, and the events behind it
wait (a receiver that is down is down for all of them). An event older than
C{give_up_after} is given up, logged and counted. 410 Gone means the
receiver asks not to be called again: that URL is not called again until
the next start (its events stay queued, bounded, in case it was a
mistake). At most C{max_queued} events wait per URL; past that the oldest
is dropped, logged and counted.

Nothing here is on the handshake path: C{emit} is one small file write, and
delivery runs on its own timers with at most C{max_in_flight} requests at
once, each with a deadline; a dead receiver only makes its queue longer.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import random
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import treq
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .slots import Slots
from .store import atomic_write, ensure_private_directory
from .timeouts import TimeoutError, describe_error, with_deadline

__all__ = [
    "EVENT_TYPES",
    "SIGNATURE_HEADER",
    "EVENT_ID_HEADER",
    "WebhookOutbox",
    "sign",
    "verify_signature",
    "read_secrets",
    "ExpiryNotices",
]

#: The event types tenantedge sends (others may be added; receivers should
#: ignore types they do not know).
EVENT_TYPES = (
    "hostname.issued",
    "hostname.renewed",
    "hostname.failed",
    "hostname.retired",
    "hostname.archived",
    "hostname.expiring-soon",
)

SIGNATURE_HEADER = "Tenantedge-Signature"
EVENT_ID_HEADER = "Tenantedge-Event-Id"

#: An event's JSON body larger than this is refused by L{WebhookOutbox.emit}
#: (a host name, a problem type and its detail are a few hundred bytes).
MAX_EVENT_SIZE = 16 * 1024

_SUFFIX = ".json"


def sign(secrets_: Sequence[bytes], timestamp: int, body: bytes) -> str:
    """
    The C{Tenantedge-Signature} value: C{t=<timestamp>}, then one
    C{v1=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>} per secret.
    """
    signed = b"%d." % timestamp + body
    return ",".join(
        [f"t={timestamp}"] + [f"v1={hmac.new(s, signed, hashlib.sha256).hexdigest()}" for s in secrets_]
    )


def verify_signature(
    secret: bytes | str,
    header: bytes | str | None,
    body: bytes,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """
    Is C{header} (a C{Tenantedge-Signature} value) a valid signature of
    C{body} by C{secret}, made less than C{tolerance} seconds from C{now}?
    What a receiver checks before it trusts a delivery.

    The digests are compared in constant time; a timestamp outside the
    tolerance (either way) is refused, so a captured delivery cannot be
    replayed later. Any of several C{v1=} entries may match (secret
    rotation). Never raises on a malformed header: it is simply not valid.

    @param body: the request body exactly as received (not re-serialised).
    @param now: the current POSIX time (default: C{time.time()}).
    """
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    key = secret.encode() if isinstance(secret, str) else secret
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) < 20:
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = hmac.new(key, b"%d." % timestamp + body, hashlib.sha256).hexdigest().encode("ascii")
    matched = False
    for candidate in candidates:
        # Every candidate is compared (no early exit on a match), as bytes:
        # compare_digest refuses str with non-ASCII characters (a forged
        # header must not make the receiver's check raise).
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    return matched


def read_secrets(path: str) -> tuple[bytes, ...]:
    """
    The signing secrets in C{path}: one per non-empty line (the first
    signs alone in normal times; two during a rotation).

    @raise ValueError: if the file cannot be read, other users can read or
        write it, or a secret is shorter than 16 bytes. The message never
        contains the secret.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"{path} holds the webhook secret but has mode {mode:04o}; fix it with: chmod 600 {path}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(64 * 1024)
    finally:
        os.close(fd)
    found = tuple(line.strip() for line in data.splitlines() if line.strip())
    if not found:
        raise ValueError(f"{path}: no secret in it")
    if any(len(s) < 16 for s in found):
        raise ValueError(f"{path}: a secret must be at least 16 bytes (e.g. openssl rand -hex 32)")
    return found


def _slug(url: str) -> str:
    """A destination's directory name: stable for a URL, safe as a path."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


@attrs.define(eq=False)
class _Destination:
    """One URL's queue: the file names waiting, oldest first."""

    url: str
    directory: str
    pending: deque[str] = attrs.field(factory=deque)
    failures: int = 0
    retry: IDelayedCall | None = None
    sending: Deferred[None] | None = None
    gone: bool = False

    @property
    def shown(self) -> str:
        """The URL for logs: scheme, host and path only (a query or user:pass@ may carry a token)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    scanned: int | None = None
    scanned_at: float = 0.0


@attrs.define(eq=False)
class WebhookOutbox(Service):
    """
    The persisted outbox and its delivery loop; see the module docstring.

    @ivar urls: where every event is POSTed (C{--webhook}).
    @ivar secrets: the signing secrets (L{read_secrets}); the first is
        the current one.
    @ivar directory: the outbox (C{<store>/webhooks}).
    @ivar http: a treq C{HTTPClient} (verifying TLS), or C{StubTreq} in tests.
    @ivar clock: for timers, deadlines, backoff, signatures' timestamps
        and events' C{created}.
    @ivar timeout: deadline of one delivery attempt (connect, response and
        its body).
    @ivar max_queued: events waiting per URL at most; the oldest go first.
    @ivar max_in_flight: deliveries at once, all URLs together.
    @ivar backoff_base: the delay after a first failure; doubled after each
        further one, up to C{backoff_cap}, each delay between half and all
        of that (jitter, so a fleet's retries spread out).
    @ivar backoff_cap: the longest delay between two attempts.
    @ivar give_up_after: an event older than this is not tried again.
    @ivar poll: how often a process that does not deliver tries to take
        over, and the one that does looks for events other processes wrote.
    @ivar random: C{random.random}, or a fixed value in tests.
    @ivar write: how an event file is written (L{atomic_write}; a test
        passes one that fails with ENOSPC).
    @ivar results: deliveries by result, for metrics: C{delivered},
        C{failed-attempt}, C{gave-up}, C{dropped} (queue full, the outbox
        unwritable, or an event that is not one).
    """

    urls: Sequence[str]
    secrets: Sequence[bytes]
    directory: str
    http: Any
    clock: IReactorTime
    timeout: float = 10.0
    max_queued: int = 10_000
    max_in_flight: int = 4
    backoff_base: float = 5.0
    backoff_cap: float = 3600.0
    give_up_after: float = 3 * 86400.0
    poll: float = 2.0
    random: Callable[[], float] = random.random
    write: Callable[[str, bytes], None] = atomic_write
    results: Counter[str] = attrs.field(factory=Counter, init=False)
    _destinations: list[_Destination] = attrs.field(init=False)
    _slots: Slots = attrs.field(init=False)
    _lock_fd: int | None = attrs.field(default=None, init=False)
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _sequence: int = attrs.field(default=0, init=False)
    _instance: str = attrs.field(factory=lambda: secrets.token_hex(3), init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if not self.secrets:
            raise ValueError("webhooks are always signed: give at least one secret")
        self._destinations = [_Destination(url, os.path.join(self.directory, _slug(url))) for url in self.urls]
        self._slots = Slots(self.max_in_flight, max(len(self.urls), 1))

    # -- what the edge calls -------------------------------------------------------

    def emit(self, event: Mapping[str, Any]) -> None:
        """
        Queue an event for every URL. Never blocks on the network and never
        raises: a bad event, a full queue or an unwritable outbox is
        logged and counted (C{dropped}), and the caller goes on.

        @param event: C{{"type": "hostname.issued", "data": {...}}}: a
            non-empty C{type} string and a JSON-serialisable C{data}
            mapping (default C{{}}); optionally C{id} (a string: give the
            same one for the same fact, and receivers deduplicate it) and
            C{created} (POSIX time); both are filled in when missing
            (a random UUID, the clock's time).
        """
        try:
            body, event_id = self._body(event)
        except Exception as e:
            self.results["dropped"] += 1
            self._log.error("webhook event dropped: not a valid event: {error}", error=str(e))
            return
        written: list[tuple[_Destination, str]] = []
        errors: list[str] = []
        for destination in self._destinations:
            # Written even for a receiver that answered 410 Gone: it is not
            # called again until restart, but what it would have got waits
            # on disk (bounded by the queue limit), as the docstring says.
            name = self._next_name()
            try:
                self.write(os.path.join(destination.directory, name), body)
            except Exception as e:
                self.results["dropped"] += 1
                errors.append(getattr(e, "strerror", None) or str(e))
                continue
            written.append((destination, name))
        if errors:
            self._log.error(
                "webhook event {id} dropped for {count} URL(s): cannot write to the outbox {directory}: {error}",
                id=event_id, count=len(errors), directory=self.directory, error=errors[0],
            )
        if self._lock_fd is None:
            return  # another process delivers; it finds the file at its next look
        for destination, name in written:
            destination.pending.append(name)
            self._trim(destination)
            self._send_next(destination)

    def queued(self) -> int:
        """Events waiting, all URLs together (an event for two URLs counts twice), in this process."""
        return sum(len(d.pending) for d in self._destinations)

    def _body(self, event: Mapping[str, Any]) -> tuple[bytes, str]:
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"no type in {sorted(event)!r}")
        data = event.get("data", {})
        if not isinstance(data, Mapping):
            raise ValueError(f"{kind}: data is not a mapping")
        event_id = event.get("id")
        if event_id is None:
            event_id = str(uuid.uuid4())
        elif not isinstance(event_id, str) or not event_id.isprintable() or len(event_id) > 200:
            raise ValueError(f"{kind}: id must be a short printable string")
        created = event.get("created")
        body = json.dumps(
            {
                "id": event_id,
                "type": kind,
                "created": int(self.clock.seconds() if created is None else created),
                "data": dict(data),
            },
            separators=(",", ":"),
            sort_keys=True,
            allow_nan=False,
        ).encode("utf-8")
        if len(body) > MAX_EVENT_SIZE:
            raise ValueError(f"{kind}: {len(body)} bytes, more than {MAX_EVENT_SIZE}")
        return body, event_id

    def _next_name(self) -> str:
        # Sorted by name is the order of writing: the time first (to the
        # microsecond), then this instance's sequence number.
        self._sequence += 1
        micros = int(self.clock.seconds() * 1_000_000)
        return f"{micros:017d}-{self._sequence:09d}-{self._instance}{_SUFFIX}"

    # -- lifetime ------------------------------------------------------------------

    def prepare(self) -> None:
        """
        Create the outbox (0700), one directory per URL with the URL in its
        C{destination} file, and log events left for URLs no longer
        configured. Idempotent; run at start-up before the service starts.

        @raise OSError: if the outbox cannot be created.
        @raise tenantedge.store.StoreError: likewise.
        """
        ensure_private_directory(self.directory)
        for destination in self._destinations:
            ensure_private_directory(destination.directory)
            marker = os.path.join(destination.directory, "destination")
            try:
                with open(marker, "rb") as f:
                    known = f.read().decode("utf-8", "replace")
            except OSError:
                known = None
            if known != destination.url:
                try:
                    atomic_write(marker, destination.url.encode("utf-8"))
                except OSError as e:
                    self._log.warn("cannot write {file}: {error}", file=marker, error=e.strerror)
        self._log_orphans()

    def startService(self) -> None:
        """
        Take the delivery lock if no other process has it, then deliver
        what an earlier run left behind; else try again every C{poll}
        seconds. L{prepare} must have run.
        """
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.poll, now=True)

    def stopService(self) -> None:
        """Stop delivering (attempts under way are cancelled: sent again next time) and let go of the lock."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        fd, self._lock_fd = self._lock_fd, None
        for destination in self._destinations:
            if destination.retry is not None and destination.retry.active():
                destination.retry.cancel()
            destination.retry = None
            if destination.sending is not None:
                destination.sending.cancel()
            destination.pending.clear()
            destination.scanned = None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def _log_orphans(self) -> None:
        configured = {_slug(url) for url in self.urls}
        try:
            entries = [e for e in os.scandir(self.directory) if e.is_dir() and e.name not in configured]
        except OSError:
            return
        for entry in entries:
            try:
                count = sum(1 for name in os.listdir(entry.path) if name.endswith(_SUFFIX))
            except OSError:
                continue
            if count:
                self._log.warn(
                    "{count} undelivered webhook events in {path} are for a URL no longer configured "
                    "(see its destination file); delete the directory if they are not wanted",
                    count=count, path=entry.path,
                )

    def _tick(self) -> None:
        # A LoopingCall whose call fails stops for good: catch everything.
        try:
            if self._lock_fd is None:
                self._take_lock()
            if self._lock_fd is not None:
                for destination in self._destinations:
                    self._scan(destination)
        except Exception:
            self._log.failure("webhook outbox check failed")

    def _take_lock(self) -> None:
        path = os.path.join(self.directory, "deliver.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return  # another process delivers
            raise
        self._lock_fd = fd

    def _scan(self, destination: _Destination) -> None:
        """Queue the event files not queued yet (an earlier run's, another process's)."""
        try:
            changed = os.stat(destination.directory).st_mtime_ns
        except OSError as e:
            self._log.error("cannot read the outbox {path}: {error}", path=destination.directory, error=e.strerror)
            return
        now = self.clock.seconds()
        # The directory's mtime says when to look again; every 30 s anyway,
        # since a file created within the same tick of the file system's
        # clock as the last look leaves the mtime as it was.
        if changed == destination.scanned and now - destination.scanned_at < 30:
            return
        destination.scanned, destination.scanned_at = changed, now
        names = sorted(n for n in os.listdir(destination.directory) if n.endswith(_SUFFIX) and not n.startswith("."))
        queued = set(destination.pending)
        new = [n for n in names if n not in queued]
        if not new:
            return
        destination.pending.extend(new)
        self._trim(destination)
        self._send_next(destination)

    # -- delivery ------------------------------------------------------------------

    def _trim(self, destination: _Destination) -> None:
        while len(destination.pending) > self.max_queued:
            # The oldest goes, unless it is being sent right now.
            index = 1 if destination.sending is not None else 0
            name = destination.pending[index]
            del destination.pending[index]
            self._remove(destination, name)
            self.results["dropped"] += 1
            self._log.warn(
                "webhook queue for {url} is full ({max} events): the oldest event ({file}) is dropped",
                url=destination.shown, max=self.max_queued, file=name,
            )

    def _send_next(self, destination: _Destination) -> None:
        if (
            self._lock_fd is None
            or destination.gone
            or destination.sending is not None
            or destination.retry is not None
            or not destination.pending
        ):
            return
        d = Deferred.fromCoroutine(self._send_head(destination))
        destination.sending = d

        def done(result: object) -> None:
            if destination.sending is d:
                destination.sending = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self._log.failure("webhook delivery to {url} failed", result, url=destination.shown)
            if self._lock_fd is not None and destination.retry is None:
                # The next event on the next reactor turn, not from inside
                # this callback: a queue of thousands answered at once (a
                # synchronous test client) must not recurse that deep.
                self._schedule(destination, 0)

        d.addBoth(done)

    async def _send_head(self, destination: _Destination) -> None:
        name = destination.pending[0]
        path = os.path.join(destination.directory, name)
        try:
            with open(path, "rb") as f:
                body = f.read(MAX_EVENT_SIZE + 1)
            event = json.loads(body)
            event_id, created = str(event["id"]), float(event["created"])
        except FileNotFoundError:
            destination.pending.popleft()  # removed by hand, or by a process that delivered before us
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EISDIR, errno.EACCES, errno.EPERM):
                # Passing trouble (EMFILE, EIO): try again later.
                self._failed(destination, f"cannot read {path}: {e.strerror}")
                return
            destination.pending.popleft()
            self._remove(destination, name)
            self.results["dropped"] += 1
            self._log.error("webhook event file {file} is unreadable ({error}); dropped", file=path, error=str(e))
            return
        now = self.clock.seconds()
        if now - created > self.give_up_after:
            destination.pending.popleft()
            self._remove(destination, name)
            self.results["gave-up"] += 1
            self._log.error(
                "gave up delivering webhook event {id} to {url}: undelivered for {hours:.0f} hours",
                id=event_id, url=destination.shown, hours=(now - created) / 3600,
            )
            return
        async with self._slots.held():
            if self._lock_fd is None:
                return
            try:
                code = await with_deadline(
                    Deferred.fromCoroutine(self._post(destination.url, body, event_id)), self.timeout, self.clock
                )
            except CancelledError:
                return  # stopping
            except TimeoutError:
                self._failed(destination, f"no answer within {self.timeout:g}s", event_id)
                return
            except Exception as e:
                self._failed(destination, describe_error(e), event_id)
                return
        if 200 <= code < 300:
            destination.pending.popleft()
            destination.failures = 0
            self._remove(destination, name)
            self.results["delivered"] += 1
            self._log.debug("webhook event {id} delivered to {url}", id=event_id, url=destination.shown)
        elif code == 410:
            self.results["failed-attempt"] += 1
            destination.gone = True
            self._log.error(
                "webhook receiver {url} answered 410 Gone: not calling it again until restart; its {count} "
                "queued events are kept in {path}",
                url=destination.shown, count=len(destination.pending), path=destination.directory,
            )
        else:
            self._failed(destination, f"answered {code}", event_id)

    async def _post(self, url: str, body: bytes, event_id: str) -> int:
        timestamp = int(self.clock.seconds())
        headers = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [f"tenantedge/{__version__}".encode()],
            SIGNATURE_HEADER.encode(): [sign(self.secrets, timestamp, body).encode()],
            EVENT_ID_HEADER.encode(): [event_id.encode("utf-8")],
        }
        # No redirects: a 3xx is a failed attempt; following one would send
        # the signed event somewhere the operator did not name.
        response = await self.http.post(url, data=body, headers=headers, allow_redirects=False)
        # Read (and drop) the answer so the connection can be reused; the
        # deadline covers it.
        await treq.collect(response, lambda chunk: None)
        return int(response.code)

    def _failed(self, destination: _Destination, why: str, event_id: str | None = None) -> None:
        self.results["failed-attempt"] += 1
        destination.failures += 1
        delay = self.retry_delay(destination.failures)
        self._log.warn(
            "webhook delivery to {url} failed ({error}); attempt {attempt} for event {id}, next in {delay:.0f}s",
            url=destination.shown, error=why, attempt=destination.failures, id=event_id, delay=delay,
        )
        self._schedule(destination, delay)

    def _schedule(self, destination: _Destination, delay: float) -> None:
        def again() -> None:
            destination.retry = None
            self._send_next(destination)

        destination.retry = self.clock.callLater(delay, again)

    def retry_delay(self, failures: int) -> float:
        """
        The delay after the C{failures}-th failure in a row:
        C{min(backoff_cap, backoff_base * 2 ** (failures - 1))}, times a
        random factor between 0.5 and 1.
        """
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** min(failures - 1, 64))
        return ceiling * (0.5 + self.random() / 2)

    def _remove(self, destination: _Destination, name: str) -> None:
        try:
            os.unlink(os.path.join(destination.directory, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            # Sent again after a restart: at least once, not at most once.
            self._log.error("cannot remove webhook event file {file}: {error}", file=name, error=e.strerror)


@attrs.define
class ExpiryNotices:
    """
    C{hostname.expiring-soon}, once per certificate: what the renewal
    service calls when renewing a certificate failed and it has less than
    its C{panic_within} (7 days) left.

    Once per certificate in this process; the event's C{id} is derived
    from the name and the serial, so the same notice from another worker,
    or after a restart, is the same event to a receiver that deduplicates.

    @ivar emit: L{WebhookOutbox.emit}.
    """

    emit: Callable[[Mapping[str, Any]], None]
    _seen: set[tuple[str, int]] = attrs.field(factory=set, init=False)

    def __call__(self, name: str, serial: int, not_after: float, error: str) -> None:
        if (name, serial) in self._seen:
            return
        self._seen.add((name, serial))
        self.emit({
            "type": "hostname.expiring-soon",
            "id": f"hostname.expiring-soon:{name}:{serial:x}",
            "data": {"hostname": name, "serial": f"{serial:x}", "not_after": int(not_after), "error": error},
        })


def lifecycle_webhook(emit: Callable[[Mapping[str, Any]], None]) -> Callable[[Mapping[str, Any]], None]:
    """
    The bridge from the hostname lifecycle's events
    (L{tenantedge.lifecycle.HostnameLifecycle.subscribe}) to webhook events:
    C{{"event": "failed", "host": ..., ...}} becomes C{hostname.failed} with
    C{data.hostname}, C{data.problem} (the CA's problem type, or a
    pre-check's reason) and the rest of the record. C{expiring-soon} is not
    bridged: L{ExpiryNotices} sends it once per certificate, with an id a
    receiver can deduplicate across workers and restarts.
    """

    def bridge(event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        if kind == "expiring-soon" or not isinstance(kind, str):
            return
        data = {key: value for key, value in event.items() if key not in ("event", "host", "problem_type")}
        data["hostname"] = event.get("host")
        if kind in ("failed", "retired"):
            data["problem"] = event.get("problem_type")
        emit({"type": f"hostname.{kind}", "data": data})

    return bridge

