"""
A real WebSocket client for tests/test_websocket.py (the C{websockets}
library, asyncio): runs one scenario against the edge and prints one JSON
line with what it saw; the test decides whether that is right.

Usage: wsclient.py SCENARIO NAME PORT CAFILE
(connects to 127.0.0.1:PORT over TLS, SNI and Host NAME, trusting CAFILE)

Scenarios:
  echo      a text and a binary message, each echoed
  headers   the handshake headers the backend saw
  big       a 10 MiB binary message echoed (10 MiB each way)
  close     the server's message and its close code and reason
  many      100 sockets open at once, each echoing its own message
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def _connect(name: str, port: int, cafile: str, path: str, **extra: Any) -> connect:
    context = ssl.create_default_context(cafile=cafile)
    return connect(f"wss://{name}:{port}{path}", ssl=context, host="127.0.0.1", port=port, max_size=None,
                   open_timeout=60, **extra)


async def echo(ws: ClientConnection, message: str | bytes) -> bool:
    await ws.send(message)
    return await ws.recv() == message


async def scenario(kind: str, name: str, port: int, cafile: str) -> dict[str, Any]:
    if kind == "echo":
        async with _connect(name, port, cafile, "/echo") as ws:
            return {"text": await echo(ws, "hello, tenant"), "binary": await echo(ws, b"\x00\x01\xff" * 100)}
    if kind == "headers":
        async with _connect(name, port, cafile, "/headers") as ws:
            return {"headers": json.loads(await ws.recv())}
    if kind == "big":
        payload = os.urandom(10 * 1024 * 1024)
        async with _connect(name, port, cafile, "/echo", compression=None) as ws:
            await ws.send(payload)
            back = await ws.recv()
        return {"sent": hashlib.sha256(payload).hexdigest(), "received": hashlib.sha256(back).hexdigest(),
                "length": len(back)}
    if kind == "close":
        async with _connect(name, port, cafile, "/close") as ws:
            first = await ws.recv()
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                received = closed.rcvd
                return {"message": first, "code": received.code if received else None,
                        "reason": received.reason if received else None}
        return {"message": first, "code": None}
    if kind == "many":
        sockets = list(await asyncio.gather(*(_connect(name, port, cafile, "/echo") for _ in range(100))))
        try:
            # All 100 open at once, then every one echoes its own message.
            results = await asyncio.gather(*(echo(ws, f"socket {i}") for i, ws in enumerate(sockets)))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        return {"open": len(sockets), "echoed": sum(results)}
    raise SystemExit(f"unknown scenario {kind}")


if __name__ == "__main__":
    kind, name, port, cafile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print(json.dumps(asyncio.run(scenario(kind, name, port, cafile))), flush=True)
