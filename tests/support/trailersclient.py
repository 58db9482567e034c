"""
A request whose body ends with trailer fields, as a real client over TLS:
HTTP/2 (trailing HEADERS, as gRPC sends them) or HTTP/1.1 (a chunked body
with trailer fields). Prints one JSON line: the response status and body.

    python trailersclient.py h2|h1 HOST PORT CAFILE
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded

TRAILERS = [(b"x-checksum", b"ab12"), (b"grpc-status", b"0"), (b"host", b"evil.test")]


def h2(sock: ssl.SSLSocket, host: str) -> dict[str, object]:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/trailers"),
                            (b":authority", host.encode()), (b"te", b"trailers")])
    conn.send_data(sid, b"hello")
    conn.send_headers(sid, TRAILERS, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body = None, b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, ResponseReceived):
                status = dict(event.headers)[b":status"].decode()
            elif isinstance(event, DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                return {"status": status, "body": body.decode()}
        sock.sendall(conn.data_to_send())
    return {"status": status, "body": body.decode()}


def h1(sock: ssl.SSLSocket, host: str) -> dict[str, object]:
    trailers = b"".join(b"%s: %s\r\n" % field for field in TRAILERS)
    sock.sendall(b"POST /trailers HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n"
                 b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n%s\r\n" % (host.encode(), trailers))
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return {"status": head.split(b" ")[1].decode(), "body": body.decode()}


def main() -> None:
    mode, host, port, cafile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2" if mode == "h2" else "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=host) as sock:
            print(json.dumps(h2(sock, host) if mode == "h2" else h1(sock, host)), flush=True)


if __name__ == "__main__":
    main()
