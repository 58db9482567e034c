"""
A real WebSocket backend for tests/test_websocket.py: the C{websockets}
library's asyncio server (not Twisted, so the relay is tested against
another implementation). Prints its port on the first line of stdout,
then serves until killed.

Paths:
  /echo      every message sent back as it came (text or binary)
  /headers   one JSON message: the handshake request's headers, lower-cased
  /close     sends "bye soon", then closes with code 4000, reason "bye"
"""

from __future__ import annotations

import asyncio
import json
import sys

from websockets.asyncio.server import ServerConnection, serve


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else ""
    if path == "/echo":
        async for message in ws:
            await ws.send(message)
    elif path == "/headers":
        assert ws.request is not None
        await ws.send(json.dumps({name.lower(): value for name, value in ws.request.headers.raw_items()}))
        await ws.wait_closed()
    elif path == "/close":
        await ws.send("bye soon")
        await ws.close(4000, "bye")
    else:
        await ws.close(4404, "no such path")


async def main() -> None:
    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
