"""
L{tenantedge.writethrough} on real loopback sockets: a write with nothing
queued goes straight to the socket (no writer registered with the reactor);
a large one that the socket cannot take at once is queued by Twisted as
usual and arrives whole, in order. Also pins the private names it reads.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor, tcp
from twisted.trial.unittest import TestCase

from tenantedge.writethrough import write_through


class _Collect(protocol.Protocol):
    def __init__(self, expected: int, done: defer.Deferred[bytes]) -> None:
        self.data = b""
        self.expected = expected
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(self.data)


class WriteThroughTests(TestCase):
    async def test_small_then_large(self) -> None:
        payload = b"a" * 10 + bytes(range(256)) * 40000  # about 10 MB: more than a socket buffer
        done: defer.Deferred[bytes] = defer.Deferred()
        server = protocol.ServerFactory()
        server.protocol = lambda: _Collect(len(payload), done)  # type: ignore[assignment,misc,return-value]
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        transport = client.transport
        self.addCleanup(transport.loseConnection)
        write_through(transport)
        # The private queue it reads (pinned: fails loudly if Twisted renames it).
        for name in ("dataBuffer", "_tempDataBuffer", "_writeDisconnected"):
            self.assertTrue(hasattr(transport, name), name)
        transport.write(payload[:10])
        # Sent at once: nothing queued, no writer registered.
        self.assertEqual(transport.dataBuffer, b"")
        self.assertEqual(transport._tempDataBuffer, [])
        self.assertNotIn(transport, reactor.getWriters())
        transport.write(payload[10:])
        received = await done
        self.assertEqual(received, payload)
