"""
Tests for L{tenantedge.clienthello}: real captured hellos, fragmentation,
every malformation we know of, and property-based garbage.
"""

from __future__ import annotations

import binascii
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tenantedge.clienthello import (
    MAX_HELLO_SIZE,
    ClientHelloError,
    Incomplete,
    MalformedHello,
    NotTLS,
    looks_like_http,
    parse_client_hello,
)

HELLOS = os.path.join(os.path.dirname(__file__), "hellos")


def captured(name: str) -> bytes:
    """A ClientHello captured from a real client (see tests/hellos/README)."""
    with open(os.path.join(HELLOS, name + ".hex")) as f:
        return binascii.unhexlify(f.read().strip())


def records(message: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """Split a handshake message into records of the given sizes."""
    out = b""
    pos = 0
    for size in sizes:
        chunk = message[pos : pos + size]
        pos += size
        out += b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
    assert pos >= len(message)
    return out


def build_hello(extensions: bytes | None, session_id: bytes = b"", suites: bytes = b"\x13\x01") -> bytes:
    """A syntactically valid ClientHello record with the given extensions block."""
    body = b"\x03\x03" + b"\x00" * 32
    body += bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites
    body += b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(message, [len(message)])


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def alpn(*protocols: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(16, struct.pack("!H", len(entries)) + entries)


class CapturedHelloTests(SynchronousTestCase):
    """
    Hellos captured from curl, openssl s_client and Chromium parse to the
    name and protocols those clients sent.
    """

    def test_curl_http1(self) -> None:
        hello = parse_client_hello(captured("curl-http1"))
        self.assertEqual(hello.server_name, b"tenant-a.test")
        self.assertEqual(hello.alpn, (b"http/1.1",))

    def test_curl_http2(self) -> None:
        hello = parse_client_hello(captured("curl-http2"))
        self.assertEqual(hello.server_name, b"shop.acme-corp.com")
        self.assertEqual(hello.alpn, (b"h2", b"http/1.1"))

    def test_openssl(self) -> None:
        hello = parse_client_hello(captured("openssl-s_client"))
        self.assertEqual(hello.server_name, b"tenant-b.example")
        self.assertEqual(hello.alpn, ())

    def test_openssl_without_sni(self) -> None:
        """C{openssl s_client -noservername} sends no SNI at all."""
        hello = parse_client_hello(captured("openssl-noservername"))
        self.assertIsNone(hello.server_name)

    def test_chromium(self) -> None:
        """
        Chromium's hello (GREASE values, an ML-KEM key share, nearly 2 KB)
        offers h2 first.
        """
        data = captured("chromium")
        self.assertGreater(len(data), 1500)
        hello = parse_client_hello(data)
        self.assertEqual(hello.server_name, b"www.tenant-c.example")
        self.assertEqual(hello.alpn, (b"h2", b"http/1.1"))
        self.assertEqual(hello.size, len(data))

    def test_every_prefix_is_incomplete(self) -> None:
        """
        A hello that arrives a byte at a time is never refused early and
        never parsed before it is whole.
        """
        for name in ("curl-http2", "chromium"):
            data = captured(name)
            for cut in range(len(data)):
                self.assertRaises(Incomplete, parse_client_hello, data[:cut])

    def test_fragmented_across_records(self) -> None:
        """
        RFC 8446 lets a client split the ClientHello across records; the
        parser reassembles it.
        """
        data = captured("chromium")
        message = data[5:]
        split = records(message, [3, 1, 500, 700, len(message) - 1204])
        hello = parse_client_hello(split)
        self.assertEqual(hello.server_name, b"www.tenant-c.example")
        self.assertEqual(hello.size, len(split))
        for cut in range(len(split)):
            self.assertRaises(Incomplete, parse_client_hello, split[:cut])

    def test_data_after_hello_is_left_alone(self) -> None:
        """
        Bytes after the hello's records (TLS 1.3 early data, a
        ChangeCipherSpec) are not part of it and do not confuse it.
        """
        data = captured("curl-http1")
        hello = parse_client_hello(data + b"\x14\x03\x03\x00\x01\x01")
        self.assertEqual(hello.size, len(data))


class MalformedHelloTests(SynchronousTestCase):
    """
    Each kind of invalid first flight is refused with L{MalformedHello}.
    """

    def assertMalformed(self, data: bytes, reason: str) -> None:
        e = self.assertRaises(MalformedHello, parse_client_hello, data)
        self.assertIn(reason, e.reason)

    def test_plain_http(self) -> None:
        e = self.assertRaises(NotTLS, parse_client_hello, b"GET / HTTP/1.1\r\n")
        self.assertIsInstance(e, MalformedHello)
        self.assertTrue(looks_like_http(b"GET / HTTP/1.1\r\n"))
        self.assertFalse(looks_like_http(captured("curl-http1")))

    def test_wrong_record_version(self) -> None:
        self.assertMalformed(b"\x16\x02\x00", "record-layer version")

    def test_not_client_hello(self) -> None:
        self.assertMalformed(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello")

    def test_declared_length_too_large(self) -> None:
        """A hello claiming more than the bound is refused at its header."""
        header = b"\x01" + (MAX_HELLO_SIZE + 1).to_bytes(3, "big")
        self.assertMalformed(b"\x16\x03\x01\x00\x04" + header, "larger than")

    def test_oversize_record(self) -> None:
        self.assertMalformed(b"\x16\x03\x01\xff\xff", "longer than TLS allows")

    def test_empty_record(self) -> None:
        self.assertMalformed(b"\x16\x03\x01\x00\x00", "empty handshake record")

    def test_alert_inside_hello(self) -> None:
        message = captured("curl-http1")[5:]
        data = records(message[:10], [10]) + b"\x15\x03\x01\x00\x02\x02\x28"
        self.assertMalformed(data, "non-handshake record")

    def test_duplicate_extension(self) -> None:
        self.assertMalformed(build_hello(sni(b"a.test") + sni(b"b.test")), "duplicate extension")

    def test_two_host_names(self) -> None:
        self.assertMalformed(build_hello(sni(b"a.test", b"b.test")), "more than one host_name")

    def test_empty_host_name(self) -> None:
        self.assertMalformed(build_hello(sni(b"")), "empty host_name")

    def test_empty_server_name_list(self) -> None:
        self.assertMalformed(build_hello(ext(0, b"\x00\x00")), "empty server_name_list")

    def test_empty_alpn(self) -> None:
        self.assertMalformed(build_hello(ext(16, b"\x00\x00")), "empty ALPN protocol list")

    def test_empty_alpn_name(self) -> None:
        self.assertMalformed(build_hello(alpn(b"h2", b"")), "empty ALPN protocol name")

    def test_extension_overrun(self) -> None:
        self.assertMalformed(build_hello(b"\x00\x00\x00\x10\x00"), "truncated")

    def test_session_id_too_long(self) -> None:
        self.assertMalformed(build_hello(None, session_id=b"x" * 33), "session id")

    def test_odd_cipher_suites(self) -> None:
        self.assertMalformed(build_hello(None, suites=b"\x13\x01\x00"), "cipher_suites")

    def test_trailing_handshake_message(self) -> None:
        record = build_hello(sni(b"a.test"))
        message = record[5:] + b"\x14\x00\x00\x00"
        self.assertMalformed(records(message, [len(message)]), "trailing data")

    def test_no_extensions(self) -> None:
        """An old-style hello without extensions parses, with no name."""
        hello = parse_client_hello(build_hello(None))
        self.assertIsNone(hello.server_name)
        self.assertEqual(hello.alpn, ())

    def test_other_name_types_ignored(self) -> None:
        """Unknown SNI name types are skipped, as RFC 6066 asks."""
        hello = parse_client_hello(build_hello(sni(b"whatever", name_type=7)))
        self.assertIsNone(hello.server_name)

    def test_built_hello(self) -> None:
        hello = parse_client_hello(build_hello(sni(b"x.test") + alpn(b"acme-tls/1")))
        self.assertEqual((hello.server_name, hello.alpn), (b"x.test", (b"acme-tls/1",)))


class PropertyTests(SynchronousTestCase):
    """
    Whatever bytes arrive, the parser answers with a hello or one of its own
    errors, never anything else.
    """

    def _parse(self, data: bytes) -> None:
        try:
            parse_client_hello(data)
        except ClientHelloError:
            pass

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=4096))
    def test_random_bytes(self, data: bytes) -> None:
        self._parse(data)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=2048))
    def test_random_bytes_in_a_handshake_record(self, body: bytes) -> None:
        header = b"\x16\x03\x01" + struct.pack("!H", len(body)) if body else b"\x16\x03\x01\x00\x01"
        self._parse(header + body)

    @settings(max_examples=1000, deadline=None)
    @given(
        st.sampled_from(["curl-http1", "curl-http2", "openssl-s_client", "chromium"]),
        st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
        st.integers(0, 4000),
    )
    def test_mutated_real_hellos(self, name: str, flips: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(captured(name))
        for pos, value in flips:
            data[pos % len(data)] = value
        self._parse(bytes(data[: max(cut, 1)]))
        self._parse(bytes(data))
