"""
A client behind a pretend load balancer, for the end-to-end tests: it
connects to the edge, writes a PROXY protocol header, then speaks TLS
(Python's ssl module) or plain HTTP on the same socket, and prints one
JSON object with what happened.

    python proxyclient.py PORT HEADER NAME [CAFILE] [--plain] [--xff VALUE]

HEADER is C{v1:SOURCE}, C{v2:SOURCE}, C{garbled} or C{none}.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
import time


def header(kind: str) -> bytes:
    if kind == "none":
        return b""
    if kind == "garbled":
        return b"PROXY TCP4 not-an-address 127.0.0.1 40001 443\r\n"
    version, source = kind.split(":", 1)
    six = ":" in source
    if version == "v1":
        family, dest = ("TCP6", "::1") if six else ("TCP4", "127.0.0.1")
        return f"PROXY {family} {source} {dest} 40001 443\r\n".encode()
    if six:
        body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, "::1")
        fam = 0x21
    else:
        body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
        fam = 0x11
    body += struct.pack("!HH", 40001, 443)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def main(argv: list[str]) -> None:
    port, kind, name = int(argv[0]), argv[1], argv[2]
    rest = argv[3:]
    plain = "--plain" in rest
    xff = rest[rest.index("--xff") + 1] if "--xff" in rest else None
    cafile = rest[0] if rest and not rest[0].startswith("--") else None
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(header(kind))
    request = f"GET /echo HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n"
    if xff:
        request += f"X-Forwarded-For: {xff}\r\n"
    request += "\r\n"
    started = time.monotonic()
    try:
        if plain:
            conn: socket.socket = sock
        else:
            context = ssl.create_default_context(cafile=cafile)
            conn = context.wrap_socket(sock, server_hostname=name)
        conn.sendall(request.encode())
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except (OSError, ssl.SSLError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started}))
        return
    head, _, body = data.partition(b"\r\n\r\n")
    print(json.dumps({"head": head.decode("latin-1"), "body": body.decode("latin-1"),
                      "seconds": time.monotonic() - started}))


if __name__ == "__main__":
    main(sys.argv[1:])
