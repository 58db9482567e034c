"""
Everything a fleet of edges shares, in one Redis under one key prefix
(C{--store redis://host:port/db?prefix=P}), so that several environments
can share a server::

    P:cert:<name>        hash: pem (key, leaf, chain), version (a counter
                         that only grows, removal included: a name removed
                         and stored again never looks unchanged)
    P:names              set of names with a certificate
    P:archive:<name>     list: removed bundles (keys are never destroyed)
    P:challenge:<key>    pending HTTP-01 / TLS-ALPN-01 answers (expire)
    P:lock:<name>        the issuance lock (random token, expires)
    P:state:<label>      hash: data (JSON), version: backoff and limit windows
    P:records:<label>    hash: one JSON record per name (the lifecycle)
    P:account:<ca>       hash: key (PEM), url, thumbprint: the ACME account
    P:events             pub/sub channel: "cert <name> <version>",
                         "unlock <name>", "state <label>",
                         "record <label> <name>", "record <label>" (all)

  - L{RedisStore} (L{ICertificateStore}): a bundle and its per-name version
    written by one Lua script (atomic: a reader sees the old bundle or the
    new one), which also publishes the change; L{RedisStore.changed} reads
    only the versions, never the PEMs.
  - L{RedisChallengeStore} (L{IChallengeStore}): answers with a TTL, so a
    node that dies mid-order leaves nothing behind for long.
  - L{RedisNameLock} (L{INameLock}): C{SET NX PX} with a random token,
    extended while held, released by its holder only (compare-and-delete),
    expiring if the holder dies; waiters are woken by the release message,
    or when the lock's own expiry is due, never by a tight poll.
  - L{RedisState} (L{ISharedState}): the backoff and limit windows, changed
    by optimistic read-modify-write (a compare-and-set script on a version).
  - L{RedisRecords} (L{ISharedRecords}): the lifecycle, one hash field
    per name, each changed by its own compare-and-set.
  - L{RedisAccountStore}: the ACME account key, created once fleet-wide.
  - L{RedisEvents}: the subscriber that turns messages into cache
    invalidations, lock wake-ups and state reloads, and catches up after a
    reconnection (messages sent while it was away are lost).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import josepy as jose
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .certificates import CertificateBundle, InvalidBundle
from .hostnames import InvalidHostname, normalize
from .journal import Change, Record, Stored
from .interfaces import (
    HeldLock,
    IAccountStore,
    IChallengeStore,
    ICertificateStore,
    INameLock,
    IOcspStore,
    ISharedRecords,
    ISharedState,
)
from .resp import BlockingRedis, RedisAddress, RedisClient, RedisError, RedisUnavailable
from .shared import challenge_key_valid
from .store import StoreError

__all__ = [
    "Keys",
    "RedisStore",
    "RedisChallengeStore",
    "RedisNameLock",
    "RedisState",
    "RedisAccountStore",
    "RedisEvents",
    "RedisConnections",
    "StoreUnavailable",
    "RenewalLeader",
]


class StoreUnavailable(RedisUnavailable):
    """Redis cannot be reached: new issuance is refused until it is back."""


@attrs.frozen
class Keys:
    """The key and channel names under one prefix."""

    prefix: str

    def cert(self, name: str) -> str:
        return f"{self.prefix}:cert:{name}"

    @property
    def names(self) -> str:
        return f"{self.prefix}:names"

    def archive(self, name: str) -> str:
        return f"{self.prefix}:archive:{name}"

    def challenge(self, key: str) -> str:
        return f"{self.prefix}:challenge:{key}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def state(self, label: str) -> str:
        return f"{self.prefix}:state:{label}"

    def records(self, label: str) -> str:
        return f"{self.prefix}:records:{label}"

    def account(self, ca: str) -> str:
        return f"{self.prefix}:account:{ca}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"


def _check_name(server_name: str) -> None:
    try:
        if normalize(server_name) != server_name:
            raise InvalidHostname("name is not in normal form")
    except InvalidHostname as e:
        raise ValueError(f"refusing to store an invalid name: {e.reason}") from None


_STORE = """
redis.call('HSET', KEYS[1], 'pem', ARGV[2])
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], 'cert ' .. ARGV[1] .. ' ' .. v)
return v
"""

_DELETE = """
local pem = redis.call('HGET', KEYS[1], 'pem')
if not pem then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2] .. '\\n' .. pem)
redis.call('HDEL', KEYS[1], 'pem', 'ocsp')
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', KEYS[4], 'cert ' .. ARGV[1] .. ' ' .. v)
return 1
"""


_STORE_OCSP = """
if redis.call('HEXISTS', KEYS[1], 'pem') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ocsp', ARGV[1])
return 1
"""


@implementer(ICertificateStore, IOcspStore)
@attrs.define(eq=False)
class RedisStore:
    """
    An L{ICertificateStore} in Redis; see the module docstring.

    @ivar client: the command connection.
    @ivar keys: key names under the prefix.
    """

    client: RedisClient
    keys: Keys
    _seen: dict[str, int] = attrs.field(factory=dict, init=False)
    _log = Logger()

    def get(self, server_name: str) -> Deferred[CertificateBundle]:
        try:
            _check_name(server_name)
        except ValueError:
            return fail(KeyError(server_name))
        return Deferred.fromCoroutine(self._get(server_name))

    async def _get(self, server_name: str) -> CertificateBundle:
        pem, version = await self.client.execute("HMGET", self.keys.cert(server_name), "pem", "version")
        if pem is None:
            raise KeyError(server_name)
        try:
            bundle = CertificateBundle.from_pem(pem)
        except InvalidBundle as e:
            self._log.error("corrupt stored certificate for {host} in Redis: {reason}; treating it as missing",
                            host=server_name, reason=e.reason)
            raise KeyError(server_name) from None
        self._seen[server_name] = int(version or 0)
        return bundle

    def store(self, server_name: str, bundle: CertificateBundle) -> Deferred[None]:
        _check_name(server_name)
        return Deferred.fromCoroutine(self._store(server_name, bundle.to_pem()))

    async def _store(self, server_name: str, pem: bytes) -> None:
        version = await self.client.eval(
            _STORE, [self.keys.cert(server_name), self.keys.names, self.keys.events], [server_name, pem]
        )
        self._seen[server_name] = int(version)

    def delete(self, server_name: str) -> Deferred[None]:
        try:
            _check_name(server_name)
        except ValueError:
            return fail(KeyError(server_name))
        return Deferred.fromCoroutine(self._delete(server_name))

    async def _delete(self, server_name: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        done = await self.client.eval(
            _DELETE,
            [self.keys.cert(server_name), self.keys.archive(server_name), self.keys.names, self.keys.events],
            [server_name, stamp],
        )
        if not done:
            raise KeyError(server_name)
        self._seen.pop(server_name, None)
        self._log.info("archived {host} to {key}", host=server_name, key=self.keys.archive(server_name))

    def changed(self, server_names: Sequence[str]) -> Deferred[list[str]]:
        """
        One pipelined C{HGET version} per name this store has read or
        written: the PEMs are not read.
        """
        known = [(n, self._seen[n]) for n in server_names if n in self._seen]
        return Deferred.fromCoroutine(self._changed(known))

    async def _changed(self, known: list[tuple[str, int]]) -> list[str]:
        if not known:
            return []
        replies = self.client.pipeline([["HGET", self.keys.cert(name), "version"] for name, _ in known])
        out = []
        for (name, seen), d in zip(known, replies):
            version = await d
            if int(version or 0) != seen:
                out.append(name)
                self._seen.pop(name, None)
        return out

    def notice(self, server_name: str, version: int) -> bool:
        """
        A change message from the fleet: is it news to this node (not its
        own write, which it has already seen)?
        """
        if self._seen.get(server_name) == version and version:
            return False
        self._seen.pop(server_name, None)
        return True

    def get_ocsp(self, server_name: str) -> Deferred[bytes]:
        """
        The C{ocsp} field of the name's hash: shared by the fleet, so one
        node's fetch serves every node until it is due. Not versioned: a
        new response is not a change of certificate.
        """
        try:
            _check_name(server_name)
        except ValueError:
            return fail(KeyError(server_name))
        d = self.client.execute("HGET", self.keys.cert(server_name), "ocsp")

        def found(value: bytes | None) -> bytes:
            if value is None:
                raise KeyError(server_name)
            return value

        d.addCallback(found)
        return d

    def store_ocsp(self, server_name: str, der: bytes) -> Deferred[None]:
        """Set the C{ocsp} field, only while a certificate is stored."""
        _check_name(server_name)
        d = self.client.eval(_STORE_OCSP, [self.keys.cert(server_name)], [der])
        d.addCallback(lambda _: None)
        return d

    def names(self) -> Deferred[list[str]]:
        d = self.client.execute("SMEMBERS", self.keys.names)
        d.addCallback(lambda members: sorted(m.decode("ascii") for m in members))
        return d


@implementer(IChallengeStore)
@attrs.define(eq=False)
class RedisChallengeStore:
    """
    Pending challenge answers in Redis, readable by every node; each
    expires after C{ttl} seconds (an order takes minutes), so a node that
    dies mid-order leaves nothing behind for long.
    """

    client: RedisClient
    keys: Keys
    ttl: float = 3600.0

    def add(self, token: str, key_authorization: str) -> Deferred[None]:
        if not challenge_key_valid(token):
            return fail(KeyError(token))
        d = self.client.execute("SET", self.keys.challenge(token), key_authorization, "PX", int(self.ttl * 1000))
        d.addCallback(lambda _: None)
        return d

    def remove(self, token: str) -> Deferred[None]:
        if not challenge_key_valid(token):
            return succeed(None)
        d = self.client.execute("DEL", self.keys.challenge(token))
        d.addCallback(lambda _: None)
        return d

    def get(self, token: str) -> Deferred[str]:
        if not challenge_key_valid(token):
            return fail(KeyError(token))
        d = self.client.execute("GET", self.keys.challenge(token))

        def found(value: bytes | None) -> str:
            if value is None:
                raise KeyError(token)
            return value.decode("ascii")

        d.addCallback(found)
        return d


_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', KEYS[2], 'unlock ' .. ARGV[2])
  return 1
end
return 0
"""


@implementer(INameLock)
@attrs.define(eq=False)
class RedisNameLock:
    """
    One holder per name across the fleet; see the module docstring.

    @ivar ttl: how long the lock outlives a holder that died (it is
        extended every C{ttl / 3} while held).
    @ivar wait_timeout: a waiter gives up after this long (the pipeline's
        own deadline is longer).
    """

    client: RedisClient
    keys: Keys
    clock: IReactorTime
    ttl: float = 30.0
    wait_timeout: float = 300.0
    _waiters: dict[str, list[Callable[[], None]]] = attrs.field(factory=dict, init=False)
    _log = Logger()

    def acquire(self, server_name: str) -> Deferred[HeldLock]:
        try:
            _check_name(server_name)
        except ValueError as e:
            return fail(e)
        token = secrets.token_hex(16)
        key = self.keys.lock(server_name)
        timer: list[Any] = []
        state = {"done": False}

        def forget() -> None:
            if timer and timer[0].active():
                timer[0].cancel()
            timer.clear()
            waiting = self._waiters.get(server_name, [])
            if attempt in waiting:
                waiting.remove(attempt)
            if not waiting:
                self._waiters.pop(server_name, None)

        def cancel(d: Deferred[HeldLock]) -> None:
            state["done"] = True
            forget()

        d: Deferred[HeldLock] = Deferred(cancel)

        def attempt() -> None:
            if state["done"]:
                return
            forget()
            taken = self.client.execute("SET", key, token, "NX", "PX", int(self.ttl * 1000))
            taken.addCallbacks(answered, failed)

        def answered(reply: Any) -> Any:
            if state["done"]:
                if reply is not None:
                    self._release(key, token, server_name)
                return None
            if reply is not None:
                state["done"] = True
                d.callback(self._held(key, token, server_name))
                return None
            self._waiters.setdefault(server_name, []).append(attempt)
            ttl = self.client.execute("PTTL", key)
            ttl.addCallbacks(sleep, failed)
            return None

        def sleep(milliseconds: int) -> None:
            # Woken by the release message; failing that (the holder died,
            # or the message was missed), when the lock would expire.
            if state["done"] or timer:
                return
            delay = max(0.05, min(self.ttl, (milliseconds if milliseconds > 0 else 50) / 1000 + 0.02))
            timer.append(self.clock.callLater(delay, attempt))

        def failed(failure: Failure) -> None:
            if not state["done"]:
                state["done"] = True
                forget()
                d.errback(failure)

        attempt()
        d.addTimeout(self.wait_timeout, self.clock)
        return d

    def wake(self, server_name: str) -> None:
        """A lock was released (a message): its waiters try again now."""
        for attempt in list(self._waiters.get(server_name, [])):
            attempt()

    def wake_all(self) -> None:
        """After a reconnection (messages may have been lost): everyone tries again."""
        for name in list(self._waiters):
            self.wake(name)

    def _held(self, key: str, token: str, server_name: str) -> HeldLock:
        # When the last extension that Redis confirmed was sent: the lock
        # runs at least until then + ttl. Unconfirmed for 2/3 of a ttl, it
        # counts as lost before it can expire there (a waiting node would
        # take it at once), whatever the replies are doing.
        extended = [self.clock.seconds()]

        def lost(why: str) -> None:
            self._log.warn("lost the issuance lock for {host} ({why}); stopping its order, another node may "
                           "place one", event="lock-lost", host=server_name, why=why)
            if loop.running:
                loop.stop()
            held.lose()

        def extend() -> None:
            sent = self.clock.seconds()
            if sent - extended[0] >= self.ttl * 2 / 3:
                lost(f"no extension confirmed for {sent - extended[0]:.0f}s of its {self.ttl:.0f}s")
                return
            d = self.client.eval(_EXTEND, [key], [token, int(self.ttl * 1000)])

            def checked(kept: Any) -> None:
                if held.released or held.lost.called:
                    return
                if kept:
                    extended[0] = max(extended[0], sent)
                else:
                    lost("it expired and is gone, or another node holds it")

            def unreachable(f: Failure) -> None:
                if not held.released:
                    self._log.warn("could not extend the issuance lock for {host}: {error}", host=server_name,
                                   error=f.getErrorMessage())

            d.addCallbacks(checked, unreachable)

        loop = LoopingCall(extend)
        loop.clock = self.clock

        def release() -> None:
            if loop.running:
                loop.stop()
            self._release(key, token, server_name)

        held = HeldLock(release)
        loop.start(self.ttl / 3, now=False)
        return held

    def _release(self, key: str, token: str, server_name: str) -> None:
        d = self.client.eval(_RELEASE, [key, self.keys.events], [token, server_name])
        d.addErrback(lambda f: self._log.warn(
            "could not release the issuance lock for {host} ({error}); it expires by itself",
            host=server_name, error=f.getErrorMessage()))


_LEAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


@attrs.define(eq=False)
class RenewalLeader:
    """
    Which node walks the store for renewals: the holder of
    C{P:renewal-leader}, taken with C{SET NX PX} and kept by walking
    (each walk extends it to C{lease} seconds). If the leader dies, the
    first node to walk after the lease runs out leads. The per-name lock
    still guards each renewal, so a leader change mid-walk is harmless.
    """

    client: RedisClient
    keys: Keys
    lease: float
    token: str = attrs.field(factory=lambda: secrets.token_hex(16))

    def __call__(self) -> Deferred[bool]:
        d = self.client.eval(_LEAD, [f"{self.keys.prefix}:renewal-leader"], [self.token, int(self.lease * 1000)])
        d.addCallbacks(bool, lambda f: False)  # Redis away: nobody walks (renewal has weeks of margin)
        return d


_CAS = """
local v = redis.call('HGET', KEYS[1], 'version') or '0'
if v ~= ARGV[1] then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'data', ARGV[2])
redis.call('PUBLISH', KEYS[2], 'state ' .. ARGV[3])
return n
"""


@implementer(ISharedState)
class RedisState:
    """
    A small JSON state (the failure backoff, the limit windows) shared by
    the fleet. Reads are answered from memory (the backoff is consulted on
    every order, synchronously); the copy is loaded at start-up and
    reloaded when another node announces a change. A change is applied to
    the memory copy at once and then to Redis by optimistic
    read-modify-write: read data and version, apply the change to what was
    read, write it only if the version is unchanged (a script), else again.
    No node's count is ever overwritten by another's.
    """

    _log = Logger()

    def __init__(self, label: str, client: RedisClient, keys: Keys) -> None:
        self.label = label
        self.path = f"redis:{keys.state(label)}"
        self.client = client
        self.keys = keys
        self._data: Any = None
        self._dirty = False
        self._writes = DeferredLock()
        self._failing = False

    def load_blocking(self, redis: BlockingRedis) -> None:
        """Start-up: read the current state."""
        data, _ = redis.execute("HMGET", self.keys.state(self.label), "data", "version")
        self._data = json.loads(data) if data else None
        self._dirty = True

    def changed(self) -> bool:
        return self._dirty

    def read(self) -> Any:
        self._dirty = False
        return json.loads(json.dumps(self._data))

    def update(self, change: Callable[[Any], Any]) -> Any:
        new = change(self.read())
        self._data = new
        d = self._writes.run(lambda: Deferred.fromCoroutine(self._write(change)))
        d.addErrback(self._write_failed)
        return new

    async def _write(self, change: Callable[[Any], Any]) -> None:
        key = self.keys.state(self.label)
        for _ in range(20):
            data, version = await self.client.execute("HMGET", key, "data", "version")
            current = json.loads(data) if data else None
            new = change(current)
            if await self.client.eval(_CAS, [key, self.keys.events],
                                      [version or b"0", json.dumps(new), self.label]):
                self._data = new
                self._failing = False
                return
        raise RedisError(f"state {self.label} kept changing under us")

    def _write_failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self._log.error("could not save the shared {label} state to Redis: {error}; kept in memory",
                            label=self.label, error=failure.getErrorMessage())

    def refresh(self) -> Deferred[None]:
        """Another node changed it: reload (in the background)."""
        d = self.client.execute("HGET", self.keys.state(self.label), "data")

        def loaded(data: bytes | None) -> None:
            self._data = json.loads(data) if data else None
            self._dirty = True

        d.addCallbacks(loaded, lambda f: None)
        return d


_RECORD_CAS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return {0, cur} end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
redis.call('PUBLISH', KEYS[2], 'record ' .. ARGV[4] .. ' ' .. ARGV[1])
return {1, ''}
"""


_MIGRATE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('RENAME', KEYS[2], KEYS[2] .. ':migrated')
return 1
"""


@implementer(ISharedRecords)
class RedisRecords:
    """
    Records by name (the lifecycle) shared by the fleet, in one hash with a
    field per name. Reads are answered from memory, loaded at start-up and
    kept fresh by the fleet's messages (C{record <label> <name>}: that one
    field is read again). A change is applied to memory at once, then to
    Redis by a compare-and-set on that field alone (a script: write only if
    the field still holds what this node last saw, else apply the change
    again to what it holds); another name's change never conflicts, so a
    burst of new names on several nodes costs one round trip each.
    """

    _log = Logger()

    def __init__(self, label: str, client: RedisClient, keys: Keys) -> None:
        self.label = label
        self.key = keys.records(label)
        self.path = f"redis:{self.key}"
        self.client = client
        self.keys = keys
        self._records: dict[str, dict[str, Any]] = {}
        self._raw: dict[str, bytes] = {}  # each field as Redis last held it
        self._writing: dict[str, int] = {}  # names with writes in flight
        self._writes = DeferredLock()
        self._failing = False

    def load_blocking(self, redis: BlockingRedis) -> None:
        """
        Start-up: read every record. A fleet's lifecycle from before records
        were kept per name (one C{P:state:lifecycle} document) is moved over
        first, in one script (a node starting meanwhile sees all of it or
        none), and the document is renamed C{...:migrated}, so that it is
        never moved again.
        """
        old_key = self.keys.state(self.label)
        old = redis.execute("HGET", old_key, "data")
        if old:
            try:
                data = json.loads(old)
            except ValueError:
                data = None
            fields: list[Any] = []
            for name, record in (data.items() if isinstance(data, dict) else ()):
                fields += [name, json.dumps(record)]
            redis.eval(_MIGRATE, [self.key, old_key], fields)
        flat = redis.execute("HGETALL", self.key) or []
        self._replace(dict(zip(flat[0::2], flat[1::2])))

    def _replace(self, fields: dict[bytes, bytes]) -> None:
        raw: dict[str, bytes] = {}
        records: dict[str, dict[str, Any]] = {}
        for name, value in fields.items():
            key = name.decode("utf-8", "replace")
            parsed = self._parse(key, value)
            if parsed is not None:
                raw[key], records[key] = value, parsed
        for key in self._writing:  # ours, in flight: memory is ahead of Redis
            if key in self._records:
                records[key] = self._records[key]
            else:
                records.pop(key, None)
            if key in self._raw:
                raw[key] = self._raw[key]
        self._raw, self._records = raw, records

    def _parse(self, key: str, value: bytes | None) -> dict[str, Any] | None:
        if not value:
            return None
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            self._log.error("skipping an unreadable record for {name} in {key}", name=key[:200], key=self.key)
            return None
        return parsed

    def load(self) -> None:
        """Nothing: L{load_blocking} ran in the store's start-up check."""

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return list(self._records.items())

    def update(
        self,
        key: str,
        change: Change,
        stored: Stored | None = None,
    ) -> Any:
        current = self._records.get(key)
        new = change(current)
        if new is current:
            if stored is not None:
                stored(current)
            return current
        if new is None:
            self._records.pop(key, None)
        else:
            self._records[key] = new
        self._writing[key] = self._writing.get(key, 0) + 1

        async def write_then_tell() -> None:
            # The callback runs inside the write lock, so events leave in
            # the order of the changes, even when Redis fails under them.
            try:
                result = await self._write(key, change)
            except Exception:
                self._write_failed(Failure())
                result = new  # kept in memory
            finally:
                self._written(key)
            if stored is not None:
                try:
                    stored(result)
                except Exception:
                    self._log.failure("after saving the {label} record of {name}", label=self.label, name=key)

        self._writes.run(lambda: Deferred.fromCoroutine(write_then_tell()))
        return new

    async def _write(self, key: str, change: Change) -> Record | None:
        """Compare-and-set until it holds; the record as stored."""
        for _ in range(20):
            seen = self._raw.get(key, b"")
            new = change(self._parse(key, seen))
            value = json.dumps(new).encode() if new is not None else b""
            done, held = await self.client.eval(_RECORD_CAS, [self.key, self.keys.events],
                                                [key, seen, value, self.label])
            if done:
                self._settle(key, value)
                self._failing = False
                return new
            self._settle(key, held or b"")
        raise RedisError(f"record {key} in {self.key} kept changing under us")

    def _settle(self, key: str, value: bytes) -> None:
        """What Redis holds for a name now (memory follows it unless a change of ours is still on its way)."""
        if value:
            self._raw[key] = value
        else:
            self._raw.pop(key, None)
        if self._writing.get(key, 0) <= 1:
            parsed = self._parse(key, value)
            if parsed is None:
                self._records.pop(key, None)
            else:
                self._records[key] = parsed

    def _written(self, key: str) -> None:
        left = self._writing.get(key, 1) - 1
        if left:
            self._writing[key] = left
        else:
            self._writing.pop(key, None)

    def _write_failed(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self._log.error("could not save the shared {label} records to Redis: {error}; kept in memory",
                            label=self.label, error=failure.getErrorMessage())

    def refresh(self, key: str) -> Deferred[None]:
        """Another node changed one record: read it again (in the background)."""
        d = self.client.execute("HGET", self.key, key)

        def loaded(value: bytes | None) -> None:
            if not self._writing.get(key):
                self._settle(key, value or b"")

        d.addCallbacks(loaded, lambda f: None)
        return d

    def refresh_all(self) -> Deferred[None]:
        """After a reconnection (messages may have been lost): read every record again."""
        d = self.client.execute("HGETALL", self.key)
        d.addCallbacks(lambda flat: self._replace(dict(zip(flat[0::2], flat[1::2]))), lambda f: None)
        return d


@implementer(IAccountStore)
@attrs.define(eq=False)
class RedisAccountStore:
    """
    One ACME account per CA for the whole fleet: the key is created by the
    first node to start (C{HSETNX}: when two start together, both adopt the
    winner's key) and read by the others; the account URL is remembered
    beside it. Same methods as L{tenantedge.accounts.AccountStore}.
    """

    ca: str
    connect: Callable[[], BlockingRedis]
    client: RedisClient
    keys: Keys
    _info: dict[str, str] = attrs.field(factory=dict, init=False)
    _log = Logger()

    @property
    def path(self) -> str:
        return self.keys.account(self.ca)

    def load_or_create_key(self) -> jose.JWK:
        key_name = self.keys.account(self.ca)
        try:
            with self.connect() as redis:
                pem = redis.execute("HGET", key_name, "key")
                if pem is None:
                    new_key = ec.generate_private_key(ec.SECP256R1())
                    created = redis.execute("HSETNX", key_name, "key", new_key.private_bytes(
                        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption()))
                    if created:
                        self._log.info("created ACME account key in {key}", key=key_name)
                    pem = redis.execute("HGET", key_name, "key")
                url, thumbprint = redis.execute("HMGET", key_name, "url", "thumbprint")
        except (RedisUnavailable, RedisError) as e:
            raise StoreError(str(e)) from None
        if url and thumbprint:
            self._info = {"url": url.decode(), "key": thumbprint.decode()}
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise StoreError(f"cannot load the ACME account key in {key_name}: {e}") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return jose.JWKEC(key=key)
        return jose.JWKRSA(key=key)

    def load_url(self, key: jose.JWK) -> str | None:
        if self._info.get("key") != _thumbprint(key):
            return None
        return self._info.get("url") or None

    def save_url(self, url: str, directory_url: str, key: jose.JWK) -> Deferred[Any]:
        self._info = {"url": url, "key": _thumbprint(key)}
        d = self.client.execute("HSET", self.keys.account(self.ca), "url", url, "thumbprint", _thumbprint(key),
                                "directory", directory_url)
        d.addErrback(lambda f: self._log.warn("could not save the ACME account URL to Redis: {error}",
                                              error=f.getErrorMessage()))
        return d


def _thumbprint(key: jose.JWK) -> str:
    return jose.b64encode(key.thumbprint()).decode("ascii")


@attrs.define(eq=False)
class RedisEvents:
    """
    The fleet's messages, dispatched: a certificate changed (forget it from
    the cache), a lock released (wake its waiters), a state changed
    (reload it). After a reconnection, when messages may have been lost,
    everything is caught up: cached names checked against the store,
    waiters retried, states reloaded.
    """

    store: RedisStore
    lock: RedisNameLock
    states: dict[str, RedisState] = attrs.field(factory=dict)
    records: dict[str, RedisRecords] = attrs.field(factory=dict)
    forget: list[Callable[[str], None]] = attrs.field(factory=list)
    resync: list[Callable[[], Any]] = attrs.field(factory=list)
    _log = Logger()

    def message(self, channel: bytes, data: bytes) -> None:
        try:
            kind, _, rest = data.decode("ascii").partition(" ")
            if kind == "cert":
                name, _, version = rest.partition(" ")
                if self.store.notice(name, int(version)):
                    for forget in self.forget:
                        forget(name)
            elif kind == "unlock":
                self.lock.wake(rest)
            elif kind == "state" and rest in self.states:
                self.states[rest].refresh()
            elif kind == "record":
                label, _, name = rest.partition(" ")
                if label in self.records:
                    if name:
                        self.records[label].refresh(name)
                    else:  # many changed at once (store copy): all of them again
                        self.records[label].refresh_all()
        except (UnicodeDecodeError, ValueError):
            self._log.warn("ignoring a malformed message on {channel}", channel=channel.decode("ascii", "replace"))

    def reconnected(self) -> None:
        """
        The subscriber is back: catch up on what was missed, once the
        command connection is back too (the two reconnect on their own
        schedules; a catch-up on a command client still away would fail
        at once and be lost until the next store poll).
        """
        d = self.store.client.when_connected(CATCH_UP_WAIT)
        d.addCallbacks(lambda _: self._catch_up(), lambda f: self._log.warn(
            "Redis events are back but commands are not ({error}); the store poll will catch up",
            error=f.getErrorMessage()))

    def _catch_up(self) -> None:
        self.lock.wake_all()
        for state in self.states.values():
            state.refresh()
        for records in self.records.values():
            records.refresh_all()
        for call in self.resync:
            call()


#: How long a reconnected subscriber waits for the command connection
#: before its catch-up is left to the store poll.
CATCH_UP_WAIT = 30.0


@attrs.define(eq=False, slots=False)
class RedisConnections(Service):
    """
    The node's two Redis connections (commands, and the subscriber), as a
    service: connected at start, closed at stop. Logs one line when Redis
    goes away and one when it is back (not one per refused handshake), and
    exports C{tenantedge_store_connected} and
    C{tenantedge_store_unavailable_total} (commands refused while away).
    """

    address: RedisAddress
    client: RedisClient
    subscriber: RedisClient
    _down_since: float | None = attrs.field(default=None, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self.client.on_disconnect = self._lost
        self.client.on_connect = self._back

    def startService(self) -> None:
        Service.startService(self)
        self.client.start()
        self.subscriber.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        d = self.client.stop()
        d.addCallback(lambda _: self.subscriber.stop())
        return d

    def _lost(self) -> None:
        if self.running and self._down_since is None:
            self._down_since = time.monotonic()
            self._log.error(
                "lost the connection to Redis at {address}: serving cached certificates, refusing new issuance "
                "until it is back (reconnecting)", address=self.address.describe(), event="store-unavailable")

    def _back(self) -> None:
        if self._down_since is not None:
            self._log.info("reconnected to Redis at {address} after {seconds:.1f}s",
                           address=self.address.describe(), seconds=time.monotonic() - self._down_since)
            self._down_since = None

    def collect(self) -> Iterator[Any]:
        """A prometheus collector: register the object with a registry."""
        gauge = GaugeMetricFamily("tenantedge_store_connected", "1 while the shared store (Redis) is reachable.")
        gauge.add_metric([], 1.0 if self.client.connected else 0.0)
        yield gauge
        counter = CounterMetricFamily("tenantedge_store_unavailable",
                                      "Store commands refused at once because Redis was unreachable.")
        counter.add_metric([], float(self.client.unavailable))
        yield counter


def open_redis_storage(
    url: str,
    reactor: Any,
    *,
    password_file: str | None = None,
    ca: str | None = None,
    lock_ttl: float = 30.0,
    renew_interval: float = 43200.0,
) -> dict[str, Any]:
    """
    The pieces of a Redis-backed L{tenantedge.service.Storage}, as keyword
    arguments for it: the certificate store, challenges, lock, shared
    states and account stores, the connections service, and the start-up
    check (one blocking C{PING}: an unreachable Redis is one clear line
    before anything listens).

    @raise ValueError: for a bad URL or an unreadable password file.
    """
    address = RedisAddress.from_url(url, password_file=password_file, ca=ca)
    keys = Keys(address.prefix)
    client = RedisClient(address, reactor)
    store = RedisStore(client, keys)
    lock = RedisNameLock(client, keys, reactor, ttl=lock_ttl)
    events = RedisEvents(store, lock)
    subscriber = RedisClient(address, reactor, channels=[keys.events], on_message=events.message,
                             on_connect=events.reconnected)
    connections = RedisConnections(address, client, subscriber)
    states: dict[str, RedisState] = events.states

    def shared_state(label: str) -> RedisState:
        if label not in states:
            states[label] = RedisState(label, client, keys)
        return states[label]

    def shared_records(label: str) -> RedisRecords:
        if label not in events.records:
            events.records[label] = RedisRecords(label, client, keys)
        return events.records[label]

    def connect() -> BlockingRedis:
        return BlockingRedis(address)

    def check() -> None:
        try:
            with connect() as redis:
                redis.execute("PING")
                for state in states.values():
                    state.load_blocking(redis)
                for records in events.records.values():
                    records.load_blocking(redis)
        except (RedisUnavailable, RedisError) as e:
            raise StoreError(str(e)) from None

    def accounts(slug: str) -> RedisAccountStore:
        return RedisAccountStore(slug, connect, client, keys)

    def attach(forget: Callable[[str], None], resync: Callable[[], Any], registry: Any) -> None:
        events.forget.append(forget)
        events.resync.append(resync)
        registry.register(connections)

    return dict(
        store=store,
        challenges=RedisChallengeStore(client, keys),
        lock=lock,
        directory="",
        preparations=((f"the Redis store at {address.describe()}", check),),
        shared_state=shared_state,
        shared_records=shared_records,
        accounts=accounts,
        services=(connections,),
        attach=attach,
        leader=RenewalLeader(client, keys, lease=2.5 * renew_interval),
    )
