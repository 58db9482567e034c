"""
TLS handshake driver for bench/compare.py (one client process; compare.py
starts several of them, each in its own session, and adds up their output).

Two modes, both over real loopback sockets with Python's ssl module, SNI =
the given name, no certificate verification (the harness checks the
certificates once with curl; here only the servers' cost is of interest):

  rate  For --duration seconds, --threads threads each loop: TCP connect,
        TLS handshake, one "GET / HTTP/1.1" with "Connection: close", read
        the response to EOF, close. With --mode full no session is offered
        (a full handshake every time); with --mode resume each thread
        offers the session (TLS 1.3 ticket) of its previous connection, as
        a browser would, and counts how many the server actually resumed
        (SSLSocket.session_reused).
  fill  Handshake once (no request) with each of --count distinct names
        <prefix><i>.test (i from --start), --threads at a time, stopping at
        --timeout (a failed name is retried, see fill()). For the memory
        figures: each name makes the server obtain (from its CA) and cache
        one more certificate.

The result is one JSON object on stdout.

    python bench/handshakes.py rate --port P --name NAME --mode full --duration 10 --threads 4
    python bench/handshakes.py fill --port P --prefix m- --start 0 --count 1000 --threads 8
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
from collections import Counter, deque
from typing import Any


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def one_request(context: ssl.SSLContext, port: int, name: str, session: ssl.SSLSession | None,
                timeout: float) -> tuple[bool, bool, ssl.SSLSession | None]:
    """(HTTP 200?, session resumed?, the session to offer next time)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = context.wrap_socket(raw, server_hostname=name, session=session)
        try:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                chunks.append(data)
            response = b"".join(chunks)
            # The session is read after the response: TLS 1.3 tickets come
            # after the handshake, so this is the newest one.
            return response.startswith(b"HTTP/1.1 200"), bool(tls.session_reused), tls.session
        finally:
            tls.close()
    finally:
        raw.close()


def rate(port: int, name: str, mode: str, duration: float, threads: int, timeout: float) -> dict[str, Any]:
    context = client_context()
    lock = threading.Lock()
    totals: Counter[str] = Counter()
    latencies: list[float] = []
    examples: list[str] = []
    start = time.monotonic() + 0.05
    deadline = start + duration

    def loop() -> None:
        session: ssl.SSLSession | None = None
        mine: Counter[str] = Counter()
        times: list[float] = []
        while time.monotonic() < start:
            time.sleep(0.001)
        while True:
            began = time.monotonic()
            if began >= deadline:
                break
            try:
                ok, reused, new_session = one_request(context, port, name, session if mode == "resume" else None,
                                                      timeout)
            except (OSError, ssl.SSLError) as e:
                mine["error:" + type(e).__name__] += 1
                with lock:
                    if len(examples) < 5:
                        examples.append(str(e))
                session = None
                continue
            ended = time.monotonic()
            mine["connections"] += 1
            if ok:
                mine["ok"] += 1
                times.append(ended - began)
            else:
                mine["bad_response"] += 1
            if reused:
                mine["reused"] += 1
            if mode == "resume":
                session = new_session
        with lock:
            totals.update(mine)
            latencies.extend(times)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration + timeout + 30)
    elapsed = time.monotonic() - start
    latencies.sort()
    return {
        "mode": mode,
        "threads": threads,
        "elapsed": elapsed,
        "connections": totals["connections"],
        "ok": totals["ok"],
        "reused": totals["reused"],
        "errors": {k: v for k, v in totals.items() if k.startswith("error:") or k == "bad_response"},
        "error_examples": examples,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
    }


def fill(port: int, prefix: str, first: int, count: int, threads: int, timeout: float,
         per_connection_timeout: float, retries: int) -> dict[str, Any]:
    """
    A name whose handshake fails is tried again (after 50 ms x attempt), up
    to `retries` more times: Caddy 2.6 refuses some concurrent first
    handshakes with "on-demand rate limit exceeded" even with no rate limit
    configured (certmagic's limiter hands out one ticket at a time through
    an unbuffered channel); the memory figure needs every name cached.
    """
    context = client_context()
    lock = threading.Lock()
    todo: deque[tuple[int, int]] = deque((i, 0) for i in range(first, first + count))
    in_flight = [0]
    totals: Counter[str] = Counter()
    examples: list[str] = []
    started = time.monotonic()
    deadline = started + timeout

    def loop() -> None:
        mine: Counter[str] = Counter()
        while time.monotonic() < deadline:
            with lock:
                if todo:
                    i, attempt = todo.popleft()
                    in_flight[0] += 1
                elif in_flight[0] == 0:
                    break
                else:
                    i = -1
            if i < 0:  # others may still put a retry back
                time.sleep(0.01)
                continue
            name = f"{prefix}{i}.test"
            if attempt:
                time.sleep(0.05 * attempt)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=per_connection_timeout) as raw:
                    with context.wrap_socket(raw, server_hostname=name):
                        pass
                mine["ok"] += 1
                if attempt:
                    mine["ok_after_retry"] += 1
            except (OSError, ssl.SSLError) as e:
                mine["attempt_failed:" + type(e).__name__] += 1
                with lock:
                    if len(examples) < 5:
                        examples.append(f"{name}: {e}")
                    if attempt < retries:
                        todo.append((i, attempt + 1))
                    else:
                        mine["failed"] += 1
            finally:
                with lock:
                    in_flight[0] -= 1
        with lock:
            totals.update(mine)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout + (retries + 1) * per_connection_timeout + 30)
    return {
        "elapsed": time.monotonic() - started,
        "requested": count,
        "ok": totals["ok"],
        "ok_after_retry": totals["ok_after_retry"],
        "failed": totals["failed"],
        "failed_attempts": {k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("attempt_failed:")},
        "error_examples": examples,
        "timed_out": time.monotonic() >= deadline,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rate")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--mode", choices=("full", "resume"), required=True)
    r.add_argument("--duration", type=float, default=10.0)
    r.add_argument("--threads", type=int, default=4)
    r.add_argument("--timeout", type=float, default=10.0, help="per connection")
    f = sub.add_parser("fill")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--prefix", required=True)
    f.add_argument("--start", type=int, default=0)
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--threads", type=int, default=8)
    f.add_argument("--timeout", type=float, default=300.0, help="for the whole fill")
    f.add_argument("--connection-timeout", type=float, default=30.0)
    f.add_argument("--retries", type=int, default=5, help="more attempts for a name whose handshake failed")
    args = parser.parse_args()
    if args.command == "rate":
        result = rate(args.port, args.name, args.mode, args.duration, args.threads, args.timeout)
    else:
        result = fill(args.port, args.prefix, args.start, args.count, args.threads, args.timeout,
                      args.connection_timeout, args.retries)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
