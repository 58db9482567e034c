"""
A real HTTP/1.1 backend for the end-to-end tests, standing in for Next.js.

Built on the standard library's HTTP server (not Twisted), so the proxy is
tested against an implementation other than its own. Prints its port on the
first line of stdout, then serves until killed. C{--port N} listens on that
port (a restarted backend comes back where it was), C{--unix PATH} on a
UNIX socket instead (printing 0), C{--name NAME} is what C{/whoami} says.

Routes:
  /echo...          JSON: method, path, headers, body length and sha256
  /cookies          two Set-Cookie headers
  /big?n=N          N bytes (Content-Length)
  /chunked?n=N      N bytes, chunked
  /drip             one chunk now, the rest after /release is requested
  /release          lets a waiting /drip finish
  /slow?s=S         sleeps S seconds before answering
  /status/NNN       that status code
  /truncate         promises 100000 bytes, sends 5000, closes
  /untyped          a body without Content-Type
  /hop              X-Internal named in Connection (must not be forwarded)
  /check-domain/N   allow endpoint: 200 for names starting with "ok-", else 404
  /ask?domain=N     Caddy-style allow endpoint: 204 for "ok-" names, else 403
  /allow-checks     JSON list of every name the allow endpoints were asked about
  /connections      how many TCP connections this server has accepted
  /whoami           this backend's --name (which of several answered)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_connections = 0
_lock = threading.Lock()
_release = threading.Event()
_allow_checks: list[str] = []
_name = "backend"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        global _connections
        with _lock:
            _connections += 1
        super().setup()

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        data = b""
        while len(data) < length:
            chunk = self.rfile.read(min(65536, length - len(data)))
            if not chunk:
                break
            data += chunk
        return data

    def _chunked_body(self) -> bytes:
        data = b""
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                break
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            data += self.rfile.read(size)
            self.rfile.readline(1024)
        return data

    def _send(self, code: int, body: bytes, content_type: str = "application/json", extra: list[tuple[str, str]] = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self._body()
        if url.path.startswith("/echo"):
            info = {
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            self._send(200, json.dumps(info).encode())
        elif url.path == "/cookies":
            self._send(200, b"ok", "text/plain", [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly")])
        elif url.path == "/big":
            n = int(query["n"][0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = bytes(range(256)) * 256
            sent = 0
            while sent < n:
                piece = block[: min(len(block), n - sent)]
                self.wfile.write(piece)
                sent += len(piece)
        elif url.path == "/chunked":
            n = int(query["n"][0])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"x" * 10000
            sent = 0
            while sent < n:
                piece = block[: min(len(block), n - sent)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/drip":
            _release.clear()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nfirst\n\r\n")
            self.wfile.flush()
            _release.wait(60)
            self.wfile.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
        elif url.path == "/release":
            _release.set()
            self._send(200, b"released", "text/plain")
        elif url.path == "/slow":
            time.sleep(float(query["s"][0]))
            self._send(200, b"slow", "text/plain")
        elif url.path.startswith("/status/"):
            self._send(int(url.path.rsplit("/", 1)[1]), b"status", "text/plain")
        elif url.path == "/truncate":
            # Promises 100000 bytes, sends 5000, then closes.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"t" * 5000)
            self.wfile.flush()
            self.close_connection = True
        elif url.path == "/untyped":
            # A body with a length but no Content-Type.
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"untyped")
        elif url.path == "/hop":
            # X-Internal is hop-by-hop: named in Connection, never forwarded.
            self._send(200, b"hop", "text/plain", [("Connection", "keep-alive, X-Internal"), ("X-Internal", "secret")])
        elif url.path.startswith("/check-domain/"):
            # The allow endpoint (lua-resty-auto-ssl style): names starting
            # with "ok-" are tenants.
            name = url.path.rsplit("/", 1)[1]
            with _lock:
                _allow_checks.append(name)
            self._send(200 if name.startswith("ok-") else 404, b"", "text/plain")
        elif url.path == "/ask":
            # Caddy's form: ?domain=NAME, any 2xx allows.
            name = query.get("domain", [""])[0]
            with _lock:
                _allow_checks.append(name)
            self._send(204 if name.startswith("ok-") else 403, b"", "text/plain")
        elif url.path == "/allow-checks":
            with _lock:
                self._send(200, json.dumps(_allow_checks).encode())
        elif url.path == "/whoami":
            self._send(200, _name.encode(), "text/plain")
        elif url.path == "/connections":
            self._send(200, str(_connections).encode(), "text/plain")
        else:
            self._send(404, b"not found", "text/plain")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = handle_any


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 256

    def get_request(self) -> tuple[object, tuple[str, int]]:
        request, _ = super().get_request()
        return request, ("unix", 0)  # what BaseHTTPRequestHandler expects of a client address


def main() -> None:
    global _name
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    _name = args.name
    # The default listen backlog (5) drops connections under the tests'
    # bursts of 50 concurrent clients.
    ThreadingHTTPServer.request_queue_size = 256
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        server: socketserver.BaseServer = _UnixServer(args.unix, Handler)
        print(0, flush=True)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
        server.daemon_threads = True  # type: ignore[attr-defined]
        print(server.server_address[1], flush=True)  # type: ignore[attr-defined]
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
