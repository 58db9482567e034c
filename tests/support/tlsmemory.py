"""
TLS handshakes in memory (no sockets), pyOpenSSL on both sides: for tests
of what the server side chooses (contexts, stapled OCSP responses).
"""

from __future__ import annotations

from OpenSSL import SSL


def pump_handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Move bytes between the two memory connections until both handshakes are done."""
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for source, sink in ((client, server), (server, client)):
            try:
                source.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
