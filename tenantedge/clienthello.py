"""
A pure parser for the first flight of a TLS client: bytes in, the server name
and ALPN protocols out.

pyOpenSSL's servername callback must answer synchronously, but obtaining a
certificate for a new name takes a network round trip. So tenantedge reads
the ClientHello itself before TLS starts, decides which certificate to use
(waiting as long as that takes), and only then hands the very same bytes to
OpenSSL. This module is the reading half: it never touches a socket, never
allocates more than the input, and answers every input with either a
L{ClientHello}, L{Incomplete} (send more bytes), or L{MalformedHello}.

Handled: TLS 1.0-1.3 ClientHellos, handshake messages fragmented across
several records (RFC 8446 section 5.1 allows it; large post-quantum key
shares make it likelier), duplicate-extension detection, and the RFC 6066
rule of at most one C{host_name} entry.
"""

from __future__ import annotations

import attrs

__all__ = [
    "ClientHello",
    "ClientHelloError",
    "Incomplete",
    "MalformedHello",
    "NotTLS",
    "parse_client_hello",
    "MAX_HELLO_SIZE",
    "looks_like_http",
]

#: Largest ClientHello message body we accept. Real ones are 200 bytes to
#: about 2 KiB (Chrome with an ML-KEM key share), a few KiB with many PSK
#: identities; 64 KiB bounds memory per connection without refusing anyone.
MAX_HELLO_SIZE = 65536

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
#: Real clients send their hello in one record, rarely two; a client that
#: splits it into dozens is probing us (each record costs a re-scan).
MAX_HELLO_RECORDS = 32
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_SNI_HOST_NAME = 0
_MAX_RECORD = 2**14 + 2048  # plaintext limit plus the slack RFC 8446 tolerates

_HTTP_METHODS = (
    b"GET ",
    b"POST",
    b"HEAD",
    b"PUT ",
    b"DELE",
    b"OPTI",
    b"PATC",
    b"CONN",
    b"TRAC",
    b"PRI ",
)


class ClientHelloError(Exception):
    """
    Base class of everything L{parse_client_hello} raises.
    """


class Incomplete(ClientHelloError):
    """
    The bytes so far are a valid prefix of a ClientHello; more are needed.
    """


class MalformedHello(ClientHelloError):
    """
    The bytes cannot be the start of a valid TLS ClientHello.

    @ivar reason: a short description, safe to log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotTLS(MalformedHello):
    """
    The first byte is not a TLS handshake record at all (for example
    plain HTTP sent to the HTTPS port).
    """


@attrs.frozen
class ClientHello:
    """
    What tenantedge needs from a ClientHello.

    @ivar server_name: the raw C{host_name} from the SNI extension, or
        C{None} if the client sent none. Not yet validated: pass it through
        L{tenantedge.hostnames.normalize}.
    @ivar alpn: the protocols the client offers, in its order of preference;
        empty if it sent no ALPN extension.
    @ivar size: how many bytes of the input the records carrying the hello
        occupy.
    """

    server_name: bytes | None
    alpn: tuple[bytes, ...]
    size: int


def looks_like_http(data: bytes) -> bool:
    """
    Does this look like a plaintext HTTP request sent to the TLS port?

    Lets the server answer with a readable error instead of an opaque alert.
    """
    return data[:4] in _HTTP_METHODS


class _Reader:
    """
    Bounds-checked cursor over a bytes object; every overrun is a
    L{MalformedHello} naming the field.
    """

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise MalformedHello(f"truncated {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def take_all(self) -> bytes:
        return self.take(self.end - self.pos, "vector")

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def vector(self, width: int, what: str) -> _Reader:
        length = self.uint(width, what + " length")
        if length > self.end - self.pos:
            raise MalformedHello(f"truncated {what}")
        sub = _Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return sub


def _reassemble(data: bytes) -> tuple[bytes, int]:
    """
    Collect the first handshake message from as many records as it spans.

    Checks what it can as early as it can (record type, version, the
    message type and declared length), so that garbage is refused at its
    first bytes instead of after a timeout. Walks record headers without
    copying, and copies the payload only once the message is whole, so
    re-parsing a growing buffer stays cheap.

    @return: the handshake message (header included) and the number of
        input bytes its records used.
    @raise Incomplete: if more records are needed.
    """
    if not data:
        raise Incomplete("no data")
    if data[0] != _CONTENT_HANDSHAKE:
        raise NotTLS("first record is not a TLS handshake record")
    spans: list[tuple[int, int]] = []
    have = 0
    needed: int | None = None
    pos = 0
    while True:
        header = data[pos : pos + 5]
        if header[:1] and header[0] != _CONTENT_HANDSHAKE:
            raise MalformedHello("non-handshake record inside the ClientHello")
        if header[1:2] and header[1] != 3:
            raise MalformedHello("unknown record-layer version")
        if len(header) < 5:
            raise Incomplete("record header")
        if len(spans) >= MAX_HELLO_RECORDS:
            raise MalformedHello("ClientHello split into too many records")
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise MalformedHello("empty handshake record")
        if length > _MAX_RECORD:
            raise MalformedHello("record longer than TLS allows")
        available = min(length, len(data) - pos - 5)
        spans.append((pos + 5, pos + 5 + available))
        have += available
        if needed is None and have >= 4:
            first4 = b"".join(data[a:b] for a, b in spans)[:4] if len(spans) > 1 else data[pos + 5 : pos + 9]
            needed = _check_header(first4) + 4
        if available < length:
            raise Incomplete("record body")
        pos += 5 + length
        if needed is not None and have >= needed:
            if have > needed:
                # Another handshake message coalesced into the hello's
                # record: impossible before the server has spoken.
                raise MalformedHello("trailing data after the ClientHello")
            return b"".join(data[a:b] for a, b in spans), pos


def _check_header(header: bytes) -> int:
    if header[0] != _HANDSHAKE_CLIENT_HELLO:
        raise MalformedHello("first handshake message is not a ClientHello")
    body_length = int.from_bytes(header[1:4], "big")
    if body_length > MAX_HELLO_SIZE:
        raise MalformedHello("ClientHello larger than the configured bound")
    if body_length < 38:
        raise MalformedHello("ClientHello too short")
    return body_length


def parse_client_hello(data: bytes) -> ClientHello:
    """
    Parse the ClientHello at the start of C{data}.

    @param data: everything the client has sent so far.
    @raise Incomplete: if C{data} is a valid prefix; call again with more.
    @raise NotTLS: if the first byte does not start a handshake record.
    @raise MalformedHello: for anything that is not a valid ClientHello.
    """
    message, size = _reassemble(data)
    r = _Reader(message, 4)
    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise MalformedHello("unknown ClientHello version")
    r.take(32, "random")
    session_id = r.vector(1, "legacy_session_id")
    if session_id.remaining() > 32:
        raise MalformedHello("session id longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    if suites.remaining() < 2 or suites.remaining() % 2:
        raise MalformedHello("bad cipher_suites length")
    compression = r.vector(1, "compression_methods")
    if compression.remaining() < 1:
        raise MalformedHello("no compression methods")
    server_name: bytes | None = None
    alpn: tuple[bytes, ...] = ()
    if r.remaining() == 0:
        # TLS 1.0-style hello with no extensions: no SNI, no ALPN.
        return ClientHello(None, (), size)
    extensions = r.vector(2, "extensions")
    if r.remaining():
        raise MalformedHello("bytes after the extensions block")
    seen: set[int] = set()
    while extensions.remaining():
        ext_type = extensions.uint(2, "extension type")
        body = extensions.vector(2, "extension body")
        if ext_type in seen:
            raise MalformedHello("duplicate extension")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(body)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(body)
    return ClientHello(server_name, alpn, size)


def _parse_server_name(body: _Reader) -> bytes | None:
    if body.remaining() == 0:
        # Servers send an empty SNI extension; a client must not, but an
        # empty one carries no name either way.
        return None
    names = body.vector(2, "server_name_list")
    if body.remaining():
        raise MalformedHello("bytes after server_name_list")
    if names.remaining() == 0:
        raise MalformedHello("empty server_name_list")
    host_name: bytes | None = None
    while names.remaining():
        name_type = names.uint(1, "server name type")
        name = names.vector(2, "server name").take_all()
        if name_type == _SNI_HOST_NAME:
            if host_name is not None:
                raise MalformedHello("more than one host_name in SNI")
            if not name:
                raise MalformedHello("empty host_name in SNI")
            host_name = name
    return host_name


def _parse_alpn(body: _Reader) -> tuple[bytes, ...]:
    protocols = body.vector(2, "protocol_name_list")
    if body.remaining():
        raise MalformedHello("bytes after protocol_name_list")
    if protocols.remaining() == 0:
        raise MalformedHello("empty ALPN protocol list")
    result = []
    while protocols.remaining():
        name = protocols.vector(1, "protocol name").take_all()
        if not name:
            raise MalformedHello("empty ALPN protocol name")
        result.append(name)
    return tuple(result)

