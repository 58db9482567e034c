"""
A small Redis client of our own: the RESP2 wire format, a Twisted client
that reconnects by itself, and a blocking client for start-up and the CLI.

Why not C{txredisapi}: it imports the global reactor at module level and
uses it for its connections, reconnection delays and reply timeouts, so it
cannot run on an injected reactor (a C{MemoryReactorClock} in unit tests, or
the reactor an embedder passes), and its MULTI/pool bookkeeping hides which
connection a transaction runs on. What tenantedge needs is small: pipelined
commands on one connection (a MULTI ... EXEC written in one piece is atomic
and never interleaved), EVAL, AUTH with a user, SELECT, SUBSCRIBE on a
second connection, TLS. That is this module.

  - L{encode} and L{ReplyParser}: pure functions of bytes (property-tested).
  - L{RedisClient}: one connection kept up by Twisted's C{ClientService}
    (reconnects with backoff on the injected clock), AUTH and SELECT (and
    SUBSCRIBE, for a subscriber) done before it counts as connected; a
    command while disconnected fails at once with L{RedisUnavailable}, so
    callers can refuse fast instead of queueing behind an outage.
  - L{BlockingRedis}: a plain socket, for what runs before the reactor
    serves (preparing the store, reading account keys) and for the CLI.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "RedisAddress",
    "RedisError",
    "RedisUnavailable",
    "ReplyParser",
    "encode",
    "RedisClient",
    "BlockingRedis",
    "BlockingCommands",
    "PASSWORD_ENVIRONMENT",
]

#: Where the Redis password is read from when no C{--store-password-file}
#: is given (never from the URL: a command line is visible in C{ps}).
PASSWORD_ENVIRONMENT = "TENANTEDGE_REDIS_PASSWORD"

#: A reply larger than this is not one of ours (bundles are a few KiB).
MAX_BULK = 64 * 1024 * 1024

Reply = Union[bytes, int, None, list[Any], "RedisError"]
Arg = Union[bytes, str, int, float]


class RedisError(Exception):
    """An error reply from the server (C{-ERR ...}, C{-WRONGTYPE ...})."""


class RedisUnavailable(Exception):
    """No connection to Redis right now (or it went away mid-command)."""


class ProtocolError(Exception):
    """The server sent bytes that are not RESP2."""


def encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, bool):
            raise TypeError("a bool is not a Redis argument")
        else:
            data = str(arg).encode("ascii")
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class _Incomplete(Exception):
    pass


@attrs.frozen
class _ArrayHead:
    """The start of an array reply: C{count} elements follow."""

    count: int


class ReplyParser:
    """
    Incremental RESP2 reply parser: feed it bytes as they arrive, get whole
    replies back. Bulk and simple strings are C{bytes}, integers C{int}, a
    nil C{None}, arrays lists, error replies L{RedisError} instances (as
    values: an error inside an EXEC result is one element, not a failure).

    Each element is parsed once: arrays being filled wait on a stack, and
    the buffer is a C{bytearray} read from an offset, so a large reply
    (C{SMEMBERS} of every name) read in many pieces costs linear time on
    the reactor thread, not quadratic.

    @raise ProtocolError: from L{feed}, on anything that is not RESP2.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0
        #: Arrays being filled, innermost last: [elements still to come, elements].
        self._stack: list[list[Any]] = []

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        stack = self._stack
        while self._pos < len(self._buffer):
            try:
                value, self._pos = self._element(self._pos)
            except _Incomplete:
                break
            if isinstance(value, _ArrayHead):
                if value.count > 0:
                    stack.append([value.count, []])
                    continue
                value = None if value.count < 0 else []
            # A complete value: it fills the arrays waiting for it.
            while stack:
                top = stack[-1]
                top[1].append(value)
                top[0] -= 1
                if top[0]:
                    break
                stack.pop()
                value = top[1]
            else:
                replies.append(value)
        if self._pos and (self._pos == len(self._buffer) or self._pos > 65536):
            del self._buffer[:self._pos]
            self._pos = 0
        return replies

    def _line(self, start: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", start)
        if end < 0:
            if len(self._buffer) - start > 65536:
                raise ProtocolError("line too long")
            raise _Incomplete()
        return bytes(self._buffer[start:end]), end + 2

    def _element(self, start: int) -> tuple[Reply | _ArrayHead, int]:
        kind = self._buffer[start:start + 1]
        line, after = self._line(start + 1)
        if kind == b"+":
            return line, after
        if kind == b"-":
            return RedisError(line.decode("utf-8", "replace")), after
        try:
            number = int(line)
        except ValueError:
            raise ProtocolError(f"bad length or integer {line[:40]!r}") from None
        if kind == b":":
            return number, after
        if kind == b"$":
            if number < 0:
                return None, after
            if number > MAX_BULK:
                raise ProtocolError(f"bulk reply of {number} bytes")
            if len(self._buffer) < after + number + 2:
                raise _Incomplete()
            if self._buffer[after + number:after + number + 2] != b"\r\n":
                raise ProtocolError("bulk reply not followed by CRLF")
            return bytes(self._buffer[after:after + number]), after + number + 2
        if kind == b"*":
            if number > 1024 * 1024:
                raise ProtocolError(f"array reply of {number} elements")
            return _ArrayHead(number), after
        raise ProtocolError(f"unknown reply type {kind!r}")


@attrs.frozen
class RedisAddress:
    """
    Where a Redis store is, parsed from C{redis://[user@]host:port/db?prefix=P}
    (or C{rediss://} for TLS).

    @ivar prefix: prepended to every key and channel, so that several
        environments (or tenants of a managed Redis) share one server.
    """

    host: str
    port: int
    db: int
    prefix: str
    tls: bool
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ca: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        password_file: str | None = None,
        ca: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> RedisAddress:
        """
        Parse a store URL. The password comes from C{password_file} or else
        the C{TENANTEDGE_REDIS_PASSWORD} environment variable; a password in
        the URL is refused, since a command line is readable by every user
        of the box (C{ps}) and ends up in shell histories and unit files.

        @raise ValueError: naming what is wrong.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{url!r}: a Redis store URL starts with redis:// or rediss://")
        if parts.password is not None:
            raise ValueError(
                "a password in the store URL would be visible in ps and logs; put it in a file given by "
                f"--store-password-file, or in the {PASSWORD_ENVIRONMENT} environment variable"
            )
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        path = parts.path.strip("/")
        try:
            db = int(path) if path else 0
        except ValueError:
            raise ValueError(f"{url!r}: the path is the database number, not {path!r}") from None
        query = parse_qs(parts.query)
        prefix = query.get("prefix", ["tenantedge"])[-1]
        if not prefix or any(c in prefix for c in " \r\n{}"):
            raise ValueError(f"bad prefix {prefix!r}")
        unknown = set(query) - {"prefix"}
        if unknown:
            raise ValueError(f"unknown store URL parameter(s): {', '.join(sorted(unknown))}")
        environ = os.environ if environ is None else environ  # type: ignore[assignment]
        password: str | None
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as f:
                    password = f.read().strip("\r\n")
            except OSError as e:
                raise ValueError(f"cannot read the Redis password file {password_file}: {e.strerror}") from None
        else:
            password = environ.get(PASSWORD_ENVIRONMENT) or None  # type: ignore[union-attr]
        if parts.scheme != "rediss" and ca is not None:
            raise ValueError("--store-ca is for a rediss:// (TLS) store")
        return cls(
            host=parts.hostname, port=port, db=db, prefix=prefix, tls=parts.scheme == "rediss",
            username=unquote(parts.username) if parts.username else None, password=password, ca=ca,
        )

    def describe(self) -> str:
        """The URL without any secret, for logs and errors."""
        user = f"{self.username}@" if self.username else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{self.host}:{self.port}/{self.db}?prefix={self.prefix}"

    def handshake(self) -> list[list[Arg]]:
        """The commands that open a session: AUTH (if any), SELECT."""
        commands: list[list[Arg]] = []
        if self.password is not None:
            commands.append(["AUTH", self.username, self.password] if self.username else ["AUTH", self.password])
        if self.db:
            commands.append(["SELECT", self.db])
        return commands


class RedisProtocol(Protocol):
    """
    One connection: commands are written as they come (pipelined) and
    replies matched to them in order. Messages of a subscribed connection
    go to C{on_message}.
    """

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._waiting: deque[Deferred[Reply]] = deque()
        self.on_message: Callable[[bytes, bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None

    def set_handlers(
        self, on_message: Callable[[bytes, bytes], None] | None, on_lost: Callable[[], None] | None
    ) -> None:
        """
        Where messages and the loss of the connection are reported. A
        method, not attributes, because C{ClientService} hands
        C{prepareConnection} a proxy whose attribute writes stay on the proxy.
        """
        self.on_message = on_message
        self.on_lost = on_lost

    def connectionMade(self) -> None:
        # The kernel notices a peer gone without a reset too (slowly: the
        # subscriber's heartbeat is the quick way).
        keep_alive = getattr(self.transport, "setTcpKeepAlive", None)
        if keep_alive is not None:
            keep_alive(True)

    def send(self, commands: Iterable[Sequence[Arg]]) -> list[Deferred[Reply]]:
        """Write commands in one piece; one Deferred per reply, in order."""
        data = []
        out: list[Deferred[Reply]] = []
        for command in commands:
            data.append(encode(command))
            d: Deferred[Reply] = Deferred()
            self._waiting.append(d)
            out.append(d)
        self.transport.write(b"".join(data))  # type: ignore[union-attr]
        return out

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        for reply in replies:
            if self.on_message is not None and isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self.on_message(reply[1], reply[2])
                continue
            if not self._waiting:
                continue
            d = self._waiting.popleft()
            if isinstance(reply, RedisError):
                d.errback(reply)
            else:
                d.callback(reply)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(RedisUnavailable("the connection to Redis was lost"))
        if self.on_lost is not None:
            self.on_lost()


class _QuietFactory(Factory):
    """No "Starting factory" line at every reconnection."""

    noisy = False


@attrs.define(eq=False)
class RedisClient:
    """
    One Redis connection, kept up by C{ClientService} on the injected
    reactor: reconnected with backoff whenever it drops, and AUTH, SELECT
    (and, for a subscriber, SUBSCRIBE to C{channels}) sent before it is
    used.

    @ivar address: where, and the credentials.
    @ivar reactor: the reactor (connections and timers).
    @ivar channels: channels to subscribe to; a client with channels is a
        subscriber and takes no other commands.
    @ivar on_message: called with (channel, data) for each message.
    @ivar on_connect: called each time the connection is (re)established
        and ready (a subscriber uses it to catch up on what it missed).
    @ivar on_disconnect: called when it is lost.
    @ivar timeout: a reply not received within this many seconds aborts
        the connection (a hung server must not hold issuance forever).
    @ivar heartbeat: a subscriber PINGs this often (seconds; 0: never) to
        find a dead connection (see L{_beat}).
    """

    address: RedisAddress
    reactor: Any
    channels: Sequence[str] = ()
    on_message: Callable[[bytes, bytes], None] | None = None
    on_connect: Callable[[], None] | None = None
    on_disconnect: Callable[[], None] | None = None
    timeout: float = 10.0
    heartbeat: float = 15.0
    _heartbeat: Any = attrs.field(default=None, init=False)
    _service: ClientService | None = attrs.field(default=None, init=False)
    _current: RedisProtocol | None = attrs.field(default=None, init=False)
    #: Commands refused at once because no connection was up (a metric).
    unavailable: int = attrs.field(default=0, init=False)
    _ever_connected: bool = attrs.field(default=False, init=False)
    _log = Logger()

    def _endpoint(self) -> Any:
        endpoint: Any = HostnameEndpoint(self.reactor, self.address.host, self.address.port, timeout=self.timeout)
        if self.address.tls:
            trust = None
            if self.address.ca is not None:
                with open(self.address.ca, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            endpoint = wrapClientTLS(optionsForClientTLS(self.address.host, trustRoot=trust), endpoint)
        return endpoint

    def start(self) -> None:
        """Start connecting (and reconnecting) in the background."""
        if self._service is not None:
            return
        self._service = ClientService(
            self._endpoint(),
            _QuietFactory.forProtocol(RedisProtocol),
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
            clock=self.reactor,
            prepareConnection=lambda protocol: Deferred.fromCoroutine(self._prepare(protocol)),  # type: ignore[arg-type]
        )
        self._service.startService()

    async def _prepare(self, protocol: RedisProtocol) -> None:
        protocol.set_handlers(self.on_message if self.channels else None, lambda: self._lost(protocol))
        for command in self.address.handshake():
            await self._timed(protocol.send([command])[0], protocol)
        if self.channels:
            for channel in self.channels:
                await self._timed(protocol.send([["SUBSCRIBE", channel]])[0], protocol)
        self._current = protocol
        self._ever_connected = True
        if self.channels and self.heartbeat:
            self._beat(protocol)
        if self.on_connect is not None:
            self.on_connect()

    def _beat(self, protocol: RedisProtocol) -> None:
        """
        A subscriber only ever receives: a connection that died without a
        reset (a NAT, a failover) would go quiet unnoticed, and with it
        every invalidation and lock wake-up. A PING each C{heartbeat}
        seconds, answered within C{timeout} or the connection is aborted
        (and remade).
        """

        def ping() -> None:
            if self._current is not protocol:
                return
            d = self._timed(protocol.send([["PING"]])[0], protocol)
            d.addErrback(lambda f: None)  # the loss is handled by _lost
            self._heartbeat = self.reactor.callLater(self.heartbeat, ping)

        self._heartbeat = self.reactor.callLater(self.heartbeat, ping)

    def _lost(self, protocol: RedisProtocol) -> None:
        if self._current is protocol:
            self._current = None
            beat, self._heartbeat = self._heartbeat, None
            if beat is not None and beat.active():
                beat.cancel()
            if self.on_disconnect is not None:
                self.on_disconnect()

    @property
    def connected(self) -> bool:
        """Is a ready connection up right now?"""
        return self._current is not None

    def when_connected(self, timeout: float) -> Deferred[None]:
        """Fires once connected, or fails with L{RedisUnavailable} after C{timeout}."""
        assert self._service is not None, "start() first"
        d: Deferred[Any] = self._service.whenConnected()
        d.addTimeout(timeout, self.reactor)
        d.addCallbacks(lambda _: None, lambda f: Failure(RedisUnavailable(
            f"cannot reach Redis at {self.address.describe()}: {f.getErrorMessage() or f.type.__name__}")))
        return d

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting."""
        if self._service is None:
            return Deferred.fromCoroutine(_nothing())
        service, self._service = self._service, None
        self._current = None
        beat, self._heartbeat = self._heartbeat, None
        if beat is not None and beat.active():
            beat.cancel()
        # On a later turn: a caller reacting to this client's own events
        # (a connection just made or lost) would otherwise re-enter the
        # ClientService state machine, which refuses it.
        return deferLater(self.reactor, 0, service.stopService)  # type: ignore[arg-type]

    def _timed(self, d: Deferred[Reply], protocol: RedisProtocol) -> Deferred[Reply]:
        def expired(failure: Failure) -> Failure:
            from twisted.internet.defer import TimeoutError as Timeout

            if failure.check(Timeout):
                protocol.transport.abortConnection()  # type: ignore[union-attr]
                return Failure(RedisUnavailable(f"Redis did not answer within {self.timeout:g}s"))
            return failure

        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(expired)
        return d

    def execute(self, *args: Arg) -> Deferred[Any]:
        """
        One command; fires with its reply, fails with L{RedisError} (an
        error reply) or L{RedisUnavailable} (at once, when not connected).
        """
        return self.pipeline([args])[0]

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Deferred[Any]]:
        """Several commands written at once on the one connection."""
        protocol = self._current
        if protocol is None and self._service is not None and not self._ever_connected:
            # Just started (the first walk of renewal, the first handshake):
            # wait for the first connection rather than fail.
            return [self._after_connect(command) for command in commands]
        if protocol is None:
            self.unavailable += len(commands)
            return [fail(RedisUnavailable(f"not connected to Redis at {self.address.describe()}")) for _ in commands]
        return [self._timed(d, protocol) for d in protocol.send(commands)]

    async def _first(self, command: Sequence[Arg]) -> Any:
        await self.when_connected(self.timeout)
        return await self.pipeline([command])[0]

    def _after_connect(self, command: Sequence[Arg]) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._first(command))

    async def transaction(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """
        C{MULTI}, the commands, C{EXEC}, written in one piece on the one
        connection, so nothing interleaves: all of them are applied or none.

        @return: the replies of the commands (an error reply among them is a
            L{RedisError} value).
        """
        replies = self.pipeline([["MULTI"], *commands, ["EXEC"]])
        for d in replies[:-1]:
            d.addErrback(lambda f: None)  # EXEC says what failed
        result = await replies[-1]
        if result is None:
            raise RedisError("transaction aborted")
        return list(result)

    def eval(self, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Deferred[Any]:
        """
        Run a Lua script atomically (EVALSHA, falling back to EVAL the first
        time the server sees it, or after a restart emptied its cache).
        """
        return Deferred.fromCoroutine(self._eval(script, keys, args))

    async def _eval(self, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        import hashlib

        sha = hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RedisError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script, len(keys), *keys, *args)


async def _nothing() -> None:
    return None


class BlockingRedis:
    """
    A plain-socket client for what runs outside the event loop: preparing
    the store before the server starts serving (a clear error if Redis is
    unreachable) and the admin CLI's one-off reads and writes.
    """

    def __init__(self, address: RedisAddress, timeout: float = 5.0) -> None:
        self.address = address
        try:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        except OSError as e:
            raise RedisUnavailable(f"cannot reach Redis at {address.describe()}: {e.strerror or e}") from None
        if address.tls:
            context = ssl.create_default_context(cafile=address.ca)
            try:
                sock = context.wrap_socket(sock, server_hostname=address.host)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise RedisUnavailable(f"TLS to Redis at {address.describe()} failed: {e}") from None
        self._sock = sock
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        for command in address.handshake():
            self.execute(*command)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> BlockingRedis:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def execute(self, *args: Arg) -> Any:
        """One command's reply; L{RedisError} raised for an error reply."""
        try:
            self._sock.sendall(encode(args))
            while not self._replies:
                data = self._sock.recv(65536)
                if not data:
                    raise RedisUnavailable("Redis closed the connection")
                self._replies.extend(self._parser.feed(data))
        except OSError as e:
            raise RedisUnavailable(f"Redis at {self.address.describe()}: {e.strerror or e}") from None
        reply = self._replies.popleft()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def transaction(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """MULTI, the commands, EXEC; the replies of the commands."""
        self.execute("MULTI")
        for command in commands:
            self.execute(*command)
        result = self.execute("EXEC")
        if result is None:
            raise RedisError("transaction aborted")
        return list(result)

    def eval(self, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        return self.execute("EVAL", script, len(keys), *keys, *args)


class BlockingCommands:
    """
    L{RedisClient}'s command methods over a L{BlockingRedis}, each
    returning an already-fired Deferred: the Redis store's own code then
    serves the CLI (which runs no reactor) and the synchronous contract
    tests against a real server.
    """

    def __init__(self, redis: BlockingRedis) -> None:
        self.redis = redis
        self.connected = True
        self.unavailable = 0

    def execute(self, *args: Arg) -> Deferred[Any]:
        return maybeDeferred(self.redis.execute, *args)

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Deferred[Any]]:
        return [self.execute(*command) for command in commands]

    def eval(self, script: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Deferred[Any]:
        return maybeDeferred(self.redis.eval, script, keys, args)

    def transaction(self, commands: Sequence[Sequence[Arg]]) -> Deferred[Any]:
        return maybeDeferred(self.redis.transaction, commands)
