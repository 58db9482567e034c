"""
Tests for L{tenantedge.redisstore} against a real redis-server: the same
L{ICertificateStore} contract as the directory store
(L{tests.test_store.SharedStoreContractMixin}), the shared challenges, the
fleet lock (on a L{Clock}: extension, expiry, wake-up by message), the
shared state's read-modify-write, the account key. Each instance stands
for one node.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.backoff import FailureBackoff
from tenantedge.interfaces import IChallengeStore, INameLock, ISharedRecords, ISharedState
from tenantedge.limits import IssuanceLimits
from tenantedge.policy import registered_domain
from tenantedge.redisstore import (
    Keys,
    RedisAccountStore,
    RedisChallengeStore,
    RedisEvents,
    RedisNameLock,
    RedisRecords,
    RedisState,
    RedisStore,
)
from tenantedge.interfaces import IOcspStore
from tenantedge.shared import StateFile
from tenantedge.testing import make_bundle

from .support.redis import BlockingClientAdapter, SyncRedis
from .test_store import SharedStoreContractMixin


class _OnRedis:
    def redis(self) -> SyncRedis:
        if not hasattr(self, "_redis"):
            self._redis = SyncRedis(self)
        return self._redis

    def client(self) -> Any:
        connection = self.redis().connect()
        self.addCleanup(connection.close)  # type: ignore[attr-defined]
        return BlockingClientAdapter(connection)


class RedisStoreTests(_OnRedis, SharedStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> RedisStore:
        return RedisStore(self.client(), Keys("t"))

    def make_peer(self) -> RedisStore:
        return RedisStore(self.client(), Keys("t"))

    def test_prefixes_separate(self) -> None:
        """Two prefixes on one server are two stores (environments sharing a Redis)."""
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        other = RedisStore(self.client(), Keys("staging"))
        self.assertEqual(self.successResultOf(other.names()), [])
        self.failureResultOf(other.get("a.example"), KeyError)

    def test_one_entry_and_archive(self) -> None:
        """Key, leaf and chain are one value; removal keeps the key in the archive."""
        bundle = make_bundle("a.example")
        self.successResultOf(self.store.store("a.example", bundle))
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        self.assertEqual(redis.execute("HGET", "t:cert:a.example", "pem"), bundle.to_pem())
        self.successResultOf(self.store.delete("a.example"))
        [archived] = redis.execute("LRANGE", "t:archive:a.example", 0, -1)
        self.assertTrue(archived.endswith(bundle.to_pem()))

    def test_change_messages(self) -> None:
        """
        A peer's write reaches this node as a message that drops the name
        from the cache; this node's own write does not.
        """
        forgotten: list[str] = []
        events = RedisEvents(self.store, None, forget=[forgotten.append])  # type: ignore[arg-type]
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        version = self.redis().connect().execute("HGET", "t:cert:a.example", "version")
        events.message(b"t:events", b"cert a.example " + version)
        self.assertEqual(forgotten, [])
        events.message(b"t:events", b"cert a.example " + str(int(version) + 1).encode())
        self.assertEqual(forgotten, ["a.example"])
        events.message(b"t:events", b"\xff garbage")

    def test_removed_and_stored_again_is_changed(self) -> None:
        """The version only grows: remove then store again is seen as a change (no ABA)."""
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        peer = self.make_peer()
        self.successResultOf(peer.delete("a.example"))
        self.successResultOf(peer.store("a.example", make_bundle("a.example")))
        self.assertEqual(self.successResultOf(self.store.changed(["a.example"])), ["a.example"])

    def test_corrupt_is_missing(self) -> None:
        self.redis().connect().execute("HSET", "t:cert:a.example", "pem", b"junk", "version", 1)
        self.failureResultOf(self.store.get("a.example"), KeyError)

    def test_ocsp_beside_the_certificate(self) -> None:
        """
        An OCSP response is kept on the certificate's entry, without
        counting as a change of the certificate; none for a name without
        one (C{KeyError}); gone with the certificate.
        """
        self.assertTrue(verifyObject(IOcspStore, self.store))
        self.successResultOf(self.store.store("a.example", make_bundle("a.example")))
        self.failureResultOf(self.store.get_ocsp("a.example"), KeyError)
        self.successResultOf(self.store.store_ocsp("a.example", b"\x30\x03der"))
        self.assertEqual(self.successResultOf(self.store.get_ocsp("a.example")), b"\x30\x03der")
        self.assertEqual(self.successResultOf(self.make_peer().changed(["a.example"])), [])
        self.successResultOf(self.store.store_ocsp("nothing.example", b"\x30\x00"))
        self.failureResultOf(self.store.get_ocsp("nothing.example"), KeyError)
        self.assertEqual(self.successResultOf(self.store.names()), ["a.example"])
        self.successResultOf(self.store.delete("a.example"))
        self.failureResultOf(self.store.get_ocsp("a.example"), KeyError)


class RedisChallengeStoreTests(_OnRedis, SynchronousTestCase):
    def setUp(self) -> None:
        self.one = RedisChallengeStore(self.client(), Keys("t"), ttl=60)
        self.other = RedisChallengeStore(self.client(), Keys("t"))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IChallengeStore, self.one))

    def test_shared_and_expiring(self) -> None:
        """An answer one node adds, another serves; it carries a TTL."""
        self.successResultOf(self.one.add("tok_en-1", "tok_en-1.thumb"))
        self.assertEqual(self.successResultOf(self.other.get("tok_en-1")), "tok_en-1.thumb")
        ttl = self.redis().connect().execute("PTTL", "t:challenge:tok_en-1")
        self.assertTrue(0 < ttl <= 60000, ttl)
        self.successResultOf(self.other.remove("tok_en-1"))
        self.failureResultOf(self.one.get("tok_en-1"), KeyError)
        self.successResultOf(self.one.add("tls-alpn-01:shop.test", "tok keyauth"))
        self.assertEqual(self.successResultOf(self.other.get("tls-alpn-01:shop.test")), "tok keyauth")

    def test_hostile_tokens(self) -> None:
        for bad in ("../x", "a b", "", "x" * 300, "tls-alpn-01:A.TEST", "a:b"):
            self.failureResultOf(self.one.get(bad), KeyError)
            self.failureResultOf(self.one.add(bad, "v"), KeyError)


class RedisNameLockTests(_OnRedis, SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.one = RedisNameLock(self.client(), Keys("t"), self.clock, ttl=3.0)
        self.other = RedisNameLock(self.client(), Keys("t"), self.clock, ttl=3.0, wait_timeout=60)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(INameLock, self.one))

    def test_one_holder_woken_by_release(self) -> None:
        """A second node waits; the release message wakes it at once, not a poll."""
        release = self.successResultOf(self.one.acquire("a.test"))
        waiting = self.other.acquire("a.test")
        self.assertNoResult(waiting)
        release()
        release()  # harmless
        self.assertNoResult(waiting)  # nothing polls: only the message (or the expiry) wakes it
        self.other.wake("a.test")  # what RedisEvents does with "unlock a.test"
        self.successResultOf(waiting)()

    def test_lost_while_held(self) -> None:
        """
        An extension that finds the lock gone (it expired; another node took
        it) tells the holder through C{lost}, once, and stops extending;
        releasing afterwards leaves the other node's lock alone.
        """
        held = self.successResultOf(self.one.acquire("a.test"))
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        redis.execute("SET", "t:lock:a.test", "someone-else", "PX", 30000)
        self.clock.advance(1.0)
        self.assertTrue(held.lost.called)
        self.clock.advance(5.0)
        held()
        self.assertEqual(redis.execute("GET", "t:lock:a.test"), b"someone-else")

    def test_unconfirmed_extensions_lose_it_before_it_expires(self) -> None:
        """
        No extension confirmed for 2/3 of the ttl (Redis away, or replies
        late): the lock counts as lost before it can expire in Redis, where
        a waiting node would take it; replies never arriving change nothing.
        """
        from twisted.internet.defer import Deferred as Pending
        from twisted.internet.defer import fail as failed

        from tenantedge.resp import RedisUnavailable

        for answer in (lambda: failed(RedisUnavailable("away")), Pending):
            held = self.successResultOf(self.one.acquire("a.test"))
            self.one.client.eval = lambda *a, answer=answer, **k: answer()  # type: ignore[method-assign]
            self.clock.advance(1.0)  # first extension, unconfirmed
            self.assertFalse(held.lost.called)
            self.clock.advance(1.0)  # 2 s of 3 without a confirmed one: lost, 1 s before the expiry
            self.assertTrue(held.lost.called)
            del self.one.client.eval
            held()
            self.redis().connect().execute("DEL", "t:lock:a.test")

    def test_extended_while_held(self) -> None:
        """The holder's LoopingCall keeps the lock alive past its TTL."""
        release = self.successResultOf(self.one.acquire("a.test"))
        redis = self.redis().connect()
        for _ in range(5):
            self.clock.advance(1.0)
        self.assertTrue(redis.execute("PTTL", "t:lock:a.test") > 1000)
        release()
        self.assertIsNone(redis.execute("GET", "t:lock:a.test"))

    def test_only_holder_releases(self) -> None:
        """A release by someone whose token is not the lock's does nothing."""
        release = self.successResultOf(self.one.acquire("a.test"))
        redis = self.redis().connect()
        redis.execute("SET", "t:lock:a.test", "someone-else")
        release()
        self.assertEqual(redis.execute("GET", "t:lock:a.test"), b"someone-else")

    def test_expires_if_holder_dies(self) -> None:
        """
        A holder that died (its extension loop gone, as with SIGKILL)
        leaves a lock that expires; the waiter, asleep until then, takes it.
        """
        redis = self.redis().connect()
        redis.execute("SET", "t:lock:a.test", "dead-node", "PX", 2000)
        waiting = self.other.acquire("a.test")
        self.clock.advance(1.0)
        self.assertNoResult(waiting)  # asleep until the lock's own expiry, no polling
        redis.execute("DEL", "t:lock:a.test")  # what the expiry does (silently: no message)
        self.clock.advance(1.1)
        self.successResultOf(waiting)

    def test_waiter_times_out_and_cancels(self) -> None:
        self.successResultOf(self.one.acquire("a.test"))
        waiting = self.other.acquire("a.test")
        self.clock.advance(61)
        self.failureResultOf(waiting)
        cancelled = self.other.acquire("a.test")
        cancelled.cancel()
        self.failureResultOf(cancelled)
        self.assertEqual(self.other._waiters, {})


class RedisStateTests(_OnRedis, SynchronousTestCase):
    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ISharedState, RedisState("x", self.client(), Keys("t"))))
        self.assertTrue(verifyObject(ISharedState, StateFile(None)))

    def test_backoff_fleet_wide(self) -> None:
        """A failure recorded on one node blocks the name on another."""
        clock = Clock()
        clock.advance(1000)
        states = [RedisState("backoff", self.client(), Keys("t")) for _ in range(2)]
        one, other = (FailureBackoff("backoff", clock, shared=s) for s in states)
        until = one.record_failure("a.test")
        states[1].refresh()  # what the "state backoff" message does
        self.assertEqual(other.blocked_until("a.test"), until)

    def test_no_lost_update(self) -> None:
        """
        Two nodes counting orders at once: both counts land (compare-and-set
        on a version, retried on top of the other's write).
        """
        clock = Clock()
        clock.advance(1000)
        states = [RedisState("limits", self.client(), Keys("t")) for _ in range(2)]
        one, other = (IssuanceLimits("limits", clock, registered_domain, shared=s) for s in states)
        one.record_order("ca")
        other.record_order("ca")  # its memory copy did not see one's order
        redis = self.redis().connect()
        for state in states:
            state.load_blocking(redis)
        third = IssuanceLimits("limits", clock, registered_domain, shared=states[0])
        third.load()
        self.assertEqual(len(third._orders["ca"]), 2)


def _bump(record: dict[str, Any] | None) -> dict[str, Any]:
    return {"n": (record or {}).get("n", 0) + 1}


class RedisRecordsTests(_OnRedis, SynchronousTestCase):
    def nodes(self, count: int = 2) -> list[RedisRecords]:
        nodes = [RedisRecords("lifecycle", self.client(), Keys("t")) for _ in range(count)]
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        for node in nodes:
            node.load_blocking(redis)
        return nodes

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISharedRecords, RedisRecords("x", self.client(), Keys("t"))))

    def test_one_field_per_name(self) -> None:
        """Each name is its own hash field; another node loads them all."""
        one, = self.nodes(1)
        self.assertEqual(one.update("a.test", _bump), {"n": 1})
        one.update("b.test", _bump)
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        self.assertEqual(json.loads(redis.execute("HGET", "t:records:lifecycle", "a.test")), {"n": 1})
        other, = self.nodes(1)
        self.assertEqual(sorted(other.items()), [("a.test", {"n": 1}), ("b.test", {"n": 1})])

    def test_no_lost_update(self) -> None:
        """
        Two nodes change one name, each from its stale copy: the second
        compare-and-set fails, is applied again to what Redis holds, and
        both counts land.
        """
        one, other = self.nodes()
        one.update("a.test", _bump)
        self.assertEqual(other.update("a.test", _bump), {"n": 1})  # its copy had not seen one's
        self.assertEqual(other.get("a.test"), {"n": 2})  # after the retry, memory follows Redis
        again, = self.nodes(1)
        self.assertEqual(again.get("a.test"), {"n": 2})

    def test_message_refreshes_one_record(self) -> None:
        """A C{record lifecycle <name>} message reads that field again, through the events."""
        one, other = self.nodes()
        events = RedisEvents(RedisStore(self.client(), Keys("t")), RedisNameLock(self.client(), Keys("t"), Clock()))
        events.records["lifecycle"] = other
        one.update("a.test", _bump)
        self.assertIsNone(other.get("a.test"))
        events.message(b"t:events", b"record lifecycle a.test")
        self.assertEqual(other.get("a.test"), {"n": 1})
        one.update("a.test", lambda r: None)
        events.message(b"t:events", b"record lifecycle a.test")
        self.assertIsNone(other.get("a.test"))
        one.update("b.test", _bump)
        events._catch_up()  # after a reconnection: every record again
        self.assertEqual(other.items(), [("b.test", {"n": 1})])
        self.redis().connect().execute("HSET", "t:records:lifecycle", "c.test", json.dumps({"n": 7}))
        events.message(b"t:events", b"record lifecycle")  # store copy: all of them again
        self.assertEqual(other.get("c.test"), {"n": 7})

    def test_lifecycle_events_say_what_was_stored(self) -> None:
        """
        A node whose copy is stale (the other node's failures not heard of
        yet) applies its failure to the newer record Redis holds, and its
        event says what was stored: four attempts, not one.
        """
        from tenantedge.lifecycle import HostnameLifecycle

        one, other = self.nodes()
        clock = Clock()
        clock.advance(1000)
        first = HostnameLifecycle(None, clock, shared=one)
        second = HostnameLifecycle(None, clock, shared=other)
        events: list[dict[str, Any]] = []
        second.subscribe(events.append)
        for _ in range(3):
            first.failed("a.test", RuntimeError("no"))
        second.failed("a.test", RuntimeError("no"))
        self.assertEqual([(e["event"], e["attempts"]) for e in events], [("failed", 4)])
        self.assertEqual(json.loads(self.redis().connect().execute("HGET", "t:records:lifecycle", "a.test"))
                         ["attempts"], 4)

    def test_events_in_order_when_redis_fails(self) -> None:
        """Writes queued behind one in flight tell their results after it, in order, even when all fail."""
        from twisted.internet.defer import Deferred as Pending

        from tenantedge.resp import RedisUnavailable

        class Client:
            def __init__(self) -> None:
                self.calls: list[Pending[Any]] = []

            def eval(self, *args: Any) -> Pending[Any]:
                d: Pending[Any] = Pending()
                self.calls.append(d)
                return d

        client = Client()
        records = RedisRecords("lifecycle", client, Keys("t"))  # type: ignore[arg-type]
        told: list[tuple[str, Any]] = []
        records.update("a.test", lambda r: {"state": "active"}, lambda r: told.append(("a", r)))
        records.update("a.test", lambda r: {"state": "archived"}, lambda r: told.append(("a", r)))
        records.update("b.test", lambda r: {"state": "failing"}, lambda r: told.append(("b", r)))
        self.assertEqual(len(client.calls), 1)  # one write at a time
        while client.calls:
            client.calls.pop(0).errback(RedisUnavailable("gone"))
        self.assertEqual(told, [("a", {"state": "active"}), ("a", {"state": "archived"}),
                                ("b", {"state": "failing"})])
        self.flushLoggedErrors()

    def test_unchanged_not_written(self) -> None:
        one, = self.nodes(1)
        self.assertIsNone(one.update("a.test", lambda r: r))
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        self.assertEqual(redis.execute("EXISTS", "t:records:lifecycle"), 0)

    def test_moved_from_the_state_blob(self) -> None:
        """A fleet's lifecycle kept as one state document (earlier versions) is moved to the per-name hash."""
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        redis.execute("HSET", "t:state:lifecycle", "data", json.dumps({"a.test": {"state": "active", "since": 1}}),
                      "version", 3)
        one, = self.nodes(1)
        self.assertEqual(one.get("a.test"), {"state": "active", "since": 1})
        # Moved once: the document is kept aside, and a hash emptied later
        # (every record forgotten) is not filled from it again.
        one.update("a.test", lambda r: None)
        self.assertEqual(redis.execute("EXISTS", "t:records:lifecycle"), 0)
        self.assertEqual(redis.execute("EXISTS", "t:state:lifecycle:migrated"), 1)
        again, = self.nodes(1)
        self.assertEqual(again.items(), [])

    def test_bad_field_skipped(self) -> None:
        redis = self.redis().connect()
        self.addCleanup(redis.close)
        redis.execute("HSET", "t:records:lifecycle", "a.test", "{not json", "b.test", json.dumps({"n": 1}))
        one, = self.nodes(1)
        self.assertEqual(one.items(), [("b.test", {"n": 1})])


class RedisAccountStoreTests(_OnRedis, SynchronousTestCase):
    def test_one_key_for_the_fleet(self) -> None:
        """The first node creates the account key; the next one loads the same key and URL."""
        one = RedisAccountStore("ca_1", self.redis().connect, self.client(), Keys("t"))
        key = one.load_or_create_key()
        self.assertIsNone(one.load_url(key))
        self.successResultOf(one.save_url("https://ca/acct/1", "https://ca/dir", key))
        other = RedisAccountStore("ca_1", self.redis().connect, self.client(), Keys("t"))
        again = other.load_or_create_key()
        self.assertEqual(again.thumbprint(), key.thumbprint())
        self.assertEqual(other.load_url(again), "https://ca/acct/1")


class RenewalLeaderTests(_OnRedis, SynchronousTestCase):
    def test_one_leader(self) -> None:
        """One node walks; the others skip until its lease runs out."""
        from tenantedge.redisstore import RenewalLeader

        nodes = [RenewalLeader(self.client(), Keys("t"), lease=60) for _ in range(3)]
        self.assertEqual([self.successResultOf(n()) for n in nodes], [True, False, False])
        self.assertTrue(self.successResultOf(nodes[0]()))  # keeps it by walking
        self.redis().connect().execute("DEL", "t:renewal-leader")  # the lease ran out
        self.assertTrue(self.successResultOf(nodes[2]()))
        self.assertFalse(self.successResultOf(nodes[0]()))


class StartupTests(SynchronousTestCase):
    def test_unreachable_is_one_line(self) -> None:
        """Redis unreachable at start: StartupError with one line naming the address."""
        from twisted.internet.testing import MemoryReactorClock

        from tenantedge.config import OnDemandConfig
        from tenantedge.service import OnDemandTLS, StartupError

        config = OnDemandConfig(store="redis://127.0.0.1:1/0?prefix=x", ca=["https://acme.test/dir"])
        edge = OnDemandTLS.from_config(config, MemoryReactorClock())
        e = self.assertRaises(StartupError, edge.prepare)
        self.assertEqual(str(e), "cannot reach Redis at redis://127.0.0.1:1/0?prefix=x: Connection refused")

    def test_local_ca_refused(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from tenantedge.config import ConfigError, OnDemandConfig
        from tenantedge.service import OnDemandTLS

        config = OnDemandConfig(store="redis://127.0.0.1:1/0", ca=["internal"])
        self.assertRaises(ConfigError, OnDemandTLS.from_config, config, MemoryReactorClock())
