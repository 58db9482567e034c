"""
Socket-level tuning of accepted and backend TCP connections: Nagle off,
and writes that go to the socket at once when nothing is queued.

Twisted's TCP transport queues every write and asks the reactor to tell it
when the socket is writable: two C{epoll_ctl} calls per write (register,
then unregister once sent). Profiled under keep-alive load (py-spy,
C{bench/README.md}), that was the largest single cost of a proxied request
after the socket reads and writes themselves. A write made while the
transport's queue is empty is sent straight away here; whatever the socket
does not take right away is queued the usual way, so back-pressure and
ordering are Twisted's own.

This reads the transport's private queue (C{dataBuffer},
C{_tempDataBuffer}); C{tests/test_writethrough.py} fails loudly if Twisted
changes them, and any other transport is left alone.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

__all__ = ["set_no_delay", "write_through"]


def set_no_delay(transport: Any) -> None:
    """Nagle off: a response must not wait for the client's delayed ACK."""
    set_delay = getattr(transport, "setTcpNoDelay", None)
    if set_delay is not None:
        try:
            set_delay(True)
        except OSError:
            pass


def write_through(transport: Any) -> None:
    """Make C{transport.write} send at once when nothing is queued (TCP transports only)."""
    if not isinstance(transport, tcp.Connection) or not hasattr(transport, "_tempDataBuffer"):
        return
    sock: socket.socket = transport.getHandle()
    queued_write = transport.write

    def write(data: bytes) -> None:
        if (
            transport._tempDataBuffer
            or transport.dataBuffer
            or not transport.connected
            or transport.disconnecting
            or transport._writeDisconnected
        ):
            queued_write(data)
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            queued_write(data)  # Twisted notices and reports the error its own way
            return
        if sent < len(data):
            queued_write(data[sent:])

    transport.write = write  # type: ignore[method-assign]
