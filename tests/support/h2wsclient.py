"""
A WebSocket client over HTTP/2 (RFC 8441 extended CONNECT), for
tests/test_websocket.py: no library offers one, so the h2 state machine
and RFC 6455 framing by hand. Sends a text message and a binary one of
SIZE bytes to /echo, checks both come back, closes; prints one JSON line.

    python h2wsclient.py HOST PORT CAFILE SIZE
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import struct
import sys

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RemoteSettingsChanged, ResponseReceived, StreamEnded
from h2.settings import SettingCodes


def frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (FIN set)."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask(payload, mask)
    return head + mask + masked


def _mask(payload: bytes, mask: bytes) -> bytes:
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def parse(buffer: bytes) -> tuple[tuple[int, bytes] | None, bytes]:
    """One unmasked server frame off the front of buffer, if complete."""
    if len(buffer) < 2:
        return None, buffer
    opcode, n, at = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
    if n == 126:
        if len(buffer) < 4:
            return None, buffer
        n, at = struct.unpack("!H", buffer[2:4])[0], 4
    elif n == 127:
        if len(buffer) < 10:
            return None, buffer
        n, at = struct.unpack("!Q", buffer[2:10])[0], 10
    if len(buffer) < at + n:
        return None, buffer
    return (opcode, buffer[at:at + n]), buffer[at + n:]


def main() -> None:
    host, port, cafile, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=host)
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    events: list = []

    def pump() -> None:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("the edge closed the connection")
        events.extend(conn.receive_data(data))
        out = conn.data_to_send()
        if out:
            sock.sendall(out)

    while not any(isinstance(e, RemoteSettingsChanged) for e in events):
        pump()
    enabled = conn.remote_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 1
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                            (b":path", b"/echo"), (b":authority", f"{host}:{port}".encode()),
                            (b"sec-websocket-version", b"13")])
    sock.sendall(conn.data_to_send())
    while not any(isinstance(e, ResponseReceived) for e in events):
        pump()
    status = dict(next(e for e in events if isinstance(e, ResponseReceived)).headers)[b":status"].decode()
    received: list[tuple[int, bytes]] = []
    buffer = b""
    binary = os.urandom(size)

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                pump()
                continue
            conn.send_data(sid, view[:window].tobytes())
            view = view[window:]
            sock.sendall(conn.data_to_send())

    def receive(count: int) -> None:
        nonlocal buffer
        while len(received) < count:
            for event in [e for e in events if isinstance(e, (DataReceived, StreamEnded))]:
                events.remove(event)
                if isinstance(event, StreamEnded):
                    raise SystemExit("the stream ended early")
                buffer += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            while True:
                message, buffer = parse(buffer)
                if message is None:
                    break
                received.append(message)
            if len(received) < count:
                pump()

    if status == "200":
        send(frame(0x1, b"hello over h2"))
        receive(1)
        send(frame(0x2, binary))
        receive(2)
        send(frame(0x8, struct.pack("!H", 1000)))
        receive(3)
        conn.end_stream(sid)
        sock.sendall(conn.data_to_send())
    print(json.dumps({
        "enabled": enabled, "status": status,
        "text": received[0] == (0x1, b"hello over h2") if received else False,
        "binary": hashlib.sha256(received[1][1]).hexdigest() == hashlib.sha256(binary).hexdigest()
        if len(received) > 1 else False,
        "close": received[2][0] == 0x8 if len(received) > 2 else False,
    }), flush=True)


if __name__ == "__main__":
    main()
