"""
Tests for L{tenantedge.resp}: the RESP2 parser (property-tested, since it
reads bytes from the network), the Twisted client on in-memory transports,
and both clients against a real C{redis-server}.
"""

from __future__ import annotations

import os
import signal

from hypothesis import given, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tenantedge.resp import (
    BlockingRedis,
    ProtocolError,
    RedisAddress,
    RedisClient,
    RedisError,
    RedisProtocol,
    RedisUnavailable,
    ReplyParser,
    encode,
)

from .support.redis import RedisServer


def _serialise(value: object) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    assert isinstance(value, list)
    return b"*%d\r\n" % len(value) + b"".join(_serialise(v) for v in value)


replies = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=200),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


class ParserTests(SynchronousTestCase):
    @given(st.lists(replies, max_size=5), st.integers(1, 50))
    def test_any_split(self, values: list[object], chunk: int) -> None:
        """Replies come back whole and in order however the bytes are split."""
        data = b"".join(_serialise(v) for v in values)
        parser = ReplyParser()
        out = []
        for i in range(0, len(data), chunk):
            out.extend(parser.feed(data[i:i + chunk]))
        self.assertEqual(out, values)

    @given(st.binary(max_size=300))
    def test_garbage(self, data: bytes) -> None:
        """Arbitrary bytes give replies, wait for more, or raise ProtocolError; nothing else."""
        try:
            ReplyParser().feed(data)
        except ProtocolError:
            pass

    def test_simple_and_error(self) -> None:
        [ok, err] = ReplyParser().feed(b"+OK\r\n-ERR no\r\n")
        self.assertEqual(ok, b"OK")
        self.assertIsInstance(err, RedisError)

    def test_encode(self) -> None:
        self.assertEqual(encode(["SET", b"k", 1]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n")


class AddressTests(SynchronousTestCase):
    def test_parse(self) -> None:
        a = RedisAddress.from_url("rediss://edge@r.example:6380/2?prefix=prod", ca="/ca.pem", environ={})
        self.assertEqual((a.host, a.port, a.db, a.prefix, a.tls, a.username, a.ca),
                         ("r.example", 6380, 2, "prod", True, "edge", "/ca.pem"))
        self.assertEqual(a.describe(), "rediss://edge@r.example:6380/2?prefix=prod")

    def test_password_refused_in_url(self) -> None:
        """A password on the command line would show in ps: refused, naming the alternatives."""
        e = self.assertRaises(ValueError, RedisAddress.from_url, "redis://u:secret@h:1/0", environ={})
        self.assertNotIn("secret", str(e))
        self.assertIn("--store-password-file", str(e))

    def test_password_from_environment_or_file(self) -> None:
        a = RedisAddress.from_url("redis://h/0", environ={"TENANTEDGE_REDIS_PASSWORD": "pw"})
        self.assertEqual(a.handshake(), [["AUTH", "pw"]])
        self.assertNotIn("pw", repr(a))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("filepw\n")
        a = RedisAddress.from_url("redis://me@h/3", password_file=path, environ={"TENANTEDGE_REDIS_PASSWORD": "x"})
        self.assertEqual(a.handshake(), [["AUTH", "me", "filepw"], ["SELECT", 3]])

    def test_bad(self) -> None:
        for url in ("http://h", "redis://h/x", "redis:///0", "redis://h/0?bogus=1"):
            self.assertRaises(ValueError, RedisAddress.from_url, url, environ={})


class ProtocolTests(SynchronousTestCase):
    def test_pipelined_replies_in_order(self) -> None:
        p = RedisProtocol()
        t = StringTransport()
        p.makeConnection(t)
        a, b = p.send([["GET", "a"], ["GET", "b"]])
        self.assertEqual(t.value(), encode(["GET", "a"]) + encode(["GET", "b"]))
        p.dataReceived(b"$1\r\nx\r\n-ERR")
        self.assertEqual(self.successResultOf(a), b"x")
        self.assertNoResult(b)
        p.dataReceived(b" bad\r\n")
        self.failureResultOf(b, RedisError)

    def test_lost_fails_waiting(self) -> None:
        p = RedisProtocol()
        p.makeConnection(StringTransport())
        [d] = p.send([["PING"]])
        p.connectionLost(None)
        self.failureResultOf(d, RedisUnavailable)

    def test_messages(self) -> None:
        p = RedisProtocol()
        p.makeConnection(StringTransport())
        got = []
        p.on_message = lambda c, m: got.append((c, m))
        [d] = p.send([["SUBSCRIBE", "ch"]])
        p.dataReceived(_serialise([b"subscribe", b"ch", 1]) + _serialise([b"message", b"ch", b"hi"]))
        self.assertEqual(self.successResultOf(d), [b"subscribe", b"ch", 1])
        self.assertEqual(got, [(b"ch", b"hi")])

    def test_not_connected_fails_fast(self) -> None:
        """
        Before the first connection a command waits for it (bounded by the
        timeout: start-up work such as renewal's first walk); once a
        connection has been up and is lost, a command fails at once, never
        queues behind the outage (the fleet test shows it on a real one).
        """
        reactor = MemoryReactorClock()
        client = RedisClient(RedisAddress.from_url("redis://127.0.0.1:1/0", environ={}), reactor, timeout=5)
        client.start()
        waiting = client.execute("PING")
        self.assertNoResult(waiting)
        reactor.advance(5)
        self.failureResultOf(waiting, RedisUnavailable)
        client._ever_connected = True  # as after a connection that was lost
        self.failureResultOf(client.execute("PING"), RedisUnavailable)
        self.assertEqual(client.unavailable, 1)
        stopped = client.stop()
        reactor.advance(0)
        self.successResultOf(stopped)


class RealRedisTests(TestCase):
    """Both clients against a real redis-server."""

    timeout = 60

    async def _setUp(self) -> None:
        self.server = RedisServer(self, password="pw-not-logged")
        await self.server.start()
        self.client = RedisClient(self.server.address(db=1), reactor)
        self.client.start()
        self.addCleanup(self.client.stop)
        await self.client.when_connected(10)

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    async def test_commands(self) -> None:
        """AUTH and SELECT happen at connect; SET/GET, MULTI/EXEC and EVAL work."""
        self.assertEqual(await self.client.execute("SET", "k", b"\x00\xff"), b"OK")
        self.assertEqual(await self.client.execute("GET", "k"), b"\x00\xff")
        self.assertEqual(await self.client.transaction([["INCR", "n"], ["INCR", "n"]]), [1, 2])
        self.assertEqual(await self.client.eval("return redis.call('GET', KEYS[1])", ["n"], []), b"2")
        with self.server.client(db=1) as blocking:
            self.assertEqual(blocking.execute("GET", "n"), b"2")
        with self.server.client(db=0) as blocking:
            self.assertIsNone(blocking.execute("GET", "n"))
        with self.assertRaises(RedisError):
            await self.client.execute("INCR", "k")

    async def test_pubsub_and_reconnect(self) -> None:
        """A subscriber gets messages, and resubscribes by itself after Redis restarts."""
        got: defer.Deferred[tuple[bytes, bytes]] = defer.Deferred()
        connects = []
        sub = RedisClient(self.server.address(db=1), reactor, channels=["ch"],
                          on_message=lambda c, m: got.callback((c, m)) if not got.called else None,
                          on_connect=lambda: connects.append(1))
        sub.start()
        self.addCleanup(sub.stop)
        await sub.when_connected(10)
        await self.client.execute("PUBLISH", "ch", "hello")
        self.assertEqual(await got, (b"ch", b"hello"))
        await self.server.restart()
        for _ in range(100):
            if len(connects) >= 2 and self.client.connected:
                break
            await _sleep(0.1)
        self.assertEqual(len(connects), 2)
        self.assertEqual(await self.client.execute("PING"), b"PONG")

    async def test_silent_subscriber_connection_noticed(self) -> None:
        """
        A subscriber whose server goes silent (SIGSTOP: a peer gone without
        a reset, as behind a NAT or a failover) notices by its heartbeat,
        and subscribes again once the server answers.
        """
        lost: list[int] = []
        connects: list[int] = []
        sub = RedisClient(self.server.address(db=1), reactor, channels=["ch"], on_message=lambda c, m: None,
                          on_connect=lambda: connects.append(1), on_disconnect=lambda: lost.append(1),
                          heartbeat=0.2, timeout=0.5)
        sub.start()
        self.addCleanup(sub.stop)
        await sub.when_connected(10)
        pid = self.server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(50):
                if lost:
                    break
                await _sleep(0.1)
        finally:
            os.kill(pid, signal.SIGCONT)
        self.assertEqual(lost, [1])
        for _ in range(100):
            if len(connects) >= 2:
                break
            await _sleep(0.1)
        self.assertEqual(len(connects), 2)

    def test_unreachable_blocking(self) -> None:
        """The start-up client names the address, never the password."""
        address = RedisAddress.from_url("redis://127.0.0.1:1/0", environ={"TENANTEDGE_REDIS_PASSWORD": "pw"})
        e = self.assertRaises(RedisUnavailable, BlockingRedis, address)
        self.assertIn("127.0.0.1:1", str(e))
        self.assertNotIn("pw", str(e))


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class TLSRedisTests(TestCase):
    """
    C{rediss://} with an ACL user, against a real redis-server serving TLS
    only (its certificate from a throwaway CA, given as C{--store-ca}).
    """

    timeout = 60

    async def test_tls_and_acl_user(self) -> None:
        server = RedisServer(self, password="acl-pw-not-logged", username="edge", tls=True)
        await server.start()
        address = server.address(db=2)
        self.assertTrue(address.tls)
        self.assertEqual(address.username, "edge")
        self.assertNotIn("acl-pw-not-logged", repr(address))
        got: defer.Deferred[tuple[bytes, bytes]] = defer.Deferred()
        client = RedisClient(address, reactor)
        sub = RedisClient(address, reactor, channels=["ch"],
                          on_message=lambda c, m: got.callback((c, m)) if not got.called else None)
        for each in (client, sub):
            each.start()
            self.addCleanup(each.stop)
        await client.when_connected(10)
        await sub.when_connected(10)
        self.assertEqual(await client.execute("SET", "k", "v"), b"OK")
        self.assertEqual(await client.execute("GET", "k"), b"v")
        await client.execute("PUBLISH", "ch", "over tls")
        self.assertEqual(await got, (b"ch", b"over tls"))
        blocking = BlockingRedis(address)
        self.assertEqual(blocking.execute("GET", "k"), b"v")
        # Without the CA, the server's certificate is not trusted.
        untrusted = RedisAddress.from_url(server.url(db=2), environ={"TENANTEDGE_REDIS_PASSWORD": "acl-pw-not-logged"})
        self.assertRaises(RedisUnavailable, BlockingRedis, untrusted)
        # A wrong password for the ACL user is refused.
        wrong = RedisAddress.from_url(server.url(db=2), environ={"TENANTEDGE_REDIS_PASSWORD": "nope"}, ca=server.ca)
        self.assertRaises((RedisError, RedisUnavailable), BlockingRedis, wrong)
