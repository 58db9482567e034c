"""
First-request latency for never-seen host names: tenantedge vs Caddy's
On-Demand TLS, both against a real ACME server (Debian's pebble), in the same
run on the same machine.

For each server in turn: start a fresh Pebble (its own validation ports),
start the server on those ports, then for N distinct never-seen names run one
curl each (sequentially) and take curl's time_total: the handshake waits for
the whole ACME order (account on the first name, order, HTTP-01 validation,
finalize, download) and then the request is proxied to a shared backend. Then
one more ("warm") curl per name, for context. Everything is on 127.0.0.1 and
every port is chosen at run time.

Run from the repository root:

    .venv/bin/python bench/first_request.py [--names N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, tail  # noqa: E402

from tenantedge.testing import listen_loopback_dns, write_https_material

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TWIST = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twist")

# --------------------------------------------------------------------------
# small helpers (after tests/support/pebble.py)
# --------------------------------------------------------------------------


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {port}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s:\n{tail(log)}")


class Processes:
    """Every child process we start, so that all of them are stopped (by PID) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def start(self, argv: list[str], log: str, env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "wb")
        self.logs.append(out)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        for out in self.logs:
            out.close()


# --------------------------------------------------------------------------
# DNS for Pebble's VA: every A query is 127.0.0.1 (twisted.names, in a thread)
# --------------------------------------------------------------------------


class LoopbackDNS:
    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        udp, _ = listen_loopback_dns(self.reactor)
        self.port = udp.getHost().port
        self.thread = threading.Thread(target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        self.thread.start()
        return self.port

    def stop(self) -> None:
        if self.thread is not None:
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(10)


# --------------------------------------------------------------------------
# backend and Caddy's "ask" endpoint: 200 "ok" for everything
# --------------------------------------------------------------------------


class OK(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"ok")

    do_HEAD = do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (Caddy's proxy or ask client) dropping a keep-alive
        # connection is not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def start_http_server() -> tuple[ThreadingHTTPServer, int]:
    httpd = QuietServer(("127.0.0.1", 0), OK)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


# --------------------------------------------------------------------------
# Pebble
# --------------------------------------------------------------------------


class Pebble:
    def __init__(self, procs: Processes, work: str, dns_port: int, https_ca: str, cert: str, key: str) -> None:
        self.procs, self.work, self.dns_port = procs, work, dns_port
        self.https_ca, self.cert, self.key = https_ca, cert, key
        self.port = free_port()
        self.management_port = free_port()
        self.http_port = free_port()   # where Pebble's VA sends HTTP-01 requests
        self.tls_port = free_port()    # where it sends TLS-ALPN-01 handshakes (= the server's HTTPS port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(work, "pebble.log")

    def start(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": self.cert,
                "privateKey": self.key,
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        path = os.path.join(self.work, "pebble.json")
        with open(path, "w") as f:
            json.dump(config, f)
        # NOSLEEP: validate at once; NONCEREJECT=0: no random badNonce retries
        # (Pebble's default rejects 5% of nonces), so both clients see the
        # same deterministic CA.
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.proc = self.procs.start(
            ["pebble", "-config", path, "-dnsserver", f"127.0.0.1:{self.dns_port}"], self.log, env=env,
        )
        deadline = time.monotonic() + 30
        while b"ACME directory available" not in open(self.log, "rb").read():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pebble did not start:\n" + tail(self.log))
            time.sleep(0.05)

    @property
    def directory_url(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def root_pem(self) -> str:
        """Pebble's issuing root (new for each instance), for curl --cacert."""
        context = ssl.create_default_context(cafile=self.https_ca)
        # Pebble logs "ACME directory available" once its main listener is
        # up; the management listener may come a moment later.
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"https://localhost:{self.management_port}/roots/0", context=context,
                                            timeout=10) as response:
                    body = response.read()
                break
            except urllib.error.URLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        path = os.path.join(self.work, "pebble-root.pem")
        with open(path, "wb") as f:
            f.write(body)
        return path

    def count(self, needle: str) -> int:
        return tail(self.log, 10**8).count(needle)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)


# --------------------------------------------------------------------------
# the two servers
# --------------------------------------------------------------------------


def start_tenantedge(procs: Processes, work: str, pebble: Pebble, backend_port: int) -> subprocess.Popen[bytes]:
    os.makedirs(work, exist_ok=True)
    argv = [
        TWIST, "tenantedge",
        "--https", f"tcp:{pebble.tls_port}:interface=127.0.0.1",
        "--http", f"tcp:{pebble.http_port}:interface=127.0.0.1",
        "--store", os.path.join(work, "store"),
        "--ca", pebble.directory_url,
        "--ca-root", pebble.https_ca,
        "--email", "ops@saas.test",
        "--challenge", "http-01",
        "--allow-suffix", ".test",
        "--backend", f"http://127.0.0.1:{backend_port}",
    ]
    log = os.path.join(work, "tenantedge.log")
    proc = procs.start(argv, log, cwd=work)
    wait_for_port(pebble.tls_port, proc, log)
    wait_for_port(pebble.http_port, proc, log)
    return proc


CADDYFILE = """\
{{
	admin off
	default_bind 127.0.0.1
	http_port {http_port}
	https_port {https_port}
	acme_ca {acme_ca}
	acme_ca_root {acme_ca_root}
	email ops@saas.test
	cert_issuer acme {{
		disable_tlsalpn_challenge
	}}
	on_demand_tls {{
		ask http://127.0.0.1:{ask_port}/check
	}}
}}

https:// {{
	tls {{
		on_demand
	}}
	reverse_proxy 127.0.0.1:{backend_port}
}}
"""


def start_caddy(procs: Processes, work: str, pebble: Pebble, backend_port: int, ask_port: int) -> subprocess.Popen[bytes]:
    for sub in ("data", "config", "home"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    caddyfile = os.path.join(work, "Caddyfile")
    with open(caddyfile, "w") as f:
        f.write(CADDYFILE.format(
            http_port=pebble.http_port, https_port=pebble.tls_port, acme_ca=pebble.directory_url,
            acme_ca_root=pebble.https_ca, ask_port=ask_port, backend_port=backend_port,
        ))
    env = dict(
        os.environ,
        XDG_DATA_HOME=os.path.join(work, "data"),
        XDG_CONFIG_HOME=os.path.join(work, "config"),
        HOME=os.path.join(work, "home"),
    )
    log = os.path.join(work, "caddy.log")
    proc = procs.start(["caddy", "run", "--config", caddyfile, "--adapter", "caddyfile"], log, env=env, cwd=work)
    wait_for_port(pebble.tls_port, proc, log)
    wait_for_port(pebble.http_port, proc, log)
    return proc


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------


def curl(name: str, port: int, root: str, timeout: float) -> tuple[float, str, int]:
    """(time_total seconds, HTTP code, curl exit code) for one request, new connection."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", "--max-time", str(timeout),
            "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", root, f"https://{name}:{port}/"]
    done = subprocess.run(argv, capture_output=True, timeout=timeout + 10)
    seconds, _, code = done.stdout.decode().strip().partition(" ")
    return float(seconds or "nan"), code or "000", done.returncode


def measure(label: str, names: list[str], port: int, root: str, timeout: float) -> dict[str, Any]:
    first: list[dict[str, Any]] = []
    for name in names:
        seconds, code, rc = curl(name, port, root, timeout)
        first.append({"name": name, "seconds": seconds, "http_code": code, "curl_exit": rc})
        print(f"  {label:10} first {name:28} {seconds:7.3f}s  http {code} curl {rc}", flush=True)
    warm: list[dict[str, Any]] = []
    for name in names:
        seconds, code, rc = curl(name, port, root, timeout)
        warm.append({"name": name, "seconds": seconds, "http_code": code, "curl_exit": rc})
    print(f"  {label:10} warm  (x{len(names)}) done", flush=True)
    return {"first": first, "warm": warm}


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s["seconds"] for s in samples if s["http_code"] == "200"]
    failures = [s for s in samples if s["http_code"] != "200"]
    return {
        "median": statistics.median(ok) if ok else None,
        "min": min(ok) if ok else None,
        "max": max(ok) if ok else None,
        "ok": len(ok),
        "failures": len(failures),
    }


def run_server(kind: str, procs: Processes, root_work: str, dns_port: int, material: tuple[str, str, str],
               backend_port: int, ask_port: int, n: int, timeout: float) -> dict[str, Any]:
    work = os.path.join(root_work, kind)
    pebble = Pebble(procs, os.path.join(work, "pebble"), dns_port, *material)
    pebble.start()
    server = None
    try:
        root = pebble.root_pem()
        if kind == "tenantedge":
            server = start_tenantedge(procs, os.path.join(work, "server"), pebble, backend_port)
        else:
            server = start_caddy(procs, os.path.join(work, "server"), pebble, backend_port, ask_port)
        tag = secrets.token_hex(3)
        names = [f"t{i}-{tag}.test" if kind == "tenantedge" else f"c{i}-{tag}.test" for i in range(1, n + 1)]
        results = measure(kind, names, pebble.tls_port, root, timeout)
        results["pebble_orders"] = pebble.count("Added order \"")
        results["pebble_new_accounts"] = pebble.count(" accounts in memory")
        results["work_dir"] = work
        return results
    finally:
        if server is not None:
            procs.stop(server)
        pebble.stop()


def fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=12, help="never-seen names per server (default 12, min 10)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    parser.add_argument("--timeout", type=float, default=60.0, help="curl --max-time per request (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores)")
    args = parser.parse_args()
    if args.names < 10:
        parser.error("--names must be at least 10 (the median of at least 10 first requests)")
    for tool in ("pebble", "caddy", "curl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found on PATH")
    if not os.path.exists(TWIST):
        parser.error(f"{TWIST} not found: run with the project's venv interpreter (.venv/bin/python)")

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, os.getcwd())
                                                if sys.executable.startswith(os.getcwd()) else sys.executable,
                                                *sys.argv])
    caddy_version = subprocess.run(["caddy", "version"], capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="tenantedge-bench-")
    procs = Processes()
    dns = LoopbackDNS()
    servers: list[ThreadingHTTPServer] = []
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        material = write_https_material(work, "tenantedge bench CA for pebble")
        dns_port = dns.start()
        backend, backend_port = start_http_server()
        ask, ask_port = start_http_server()
        servers += [backend, ask]
        print(f"work dir {work}; dns 127.0.0.1:{dns_port}; backend :{backend_port}; ask :{ask_port}", flush=True)
        for kind in ("tenantedge", "caddy"):
            results[kind] = run_server(kind, procs, work, dns_port, material, backend_port, ask_port,
                                       args.names, args.timeout)
    finally:
        procs.stop_all()
        for httpd in servers:
            httpd.shutdown()
            httpd.server_close()
        dns.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report: dict[str, Any] = {
        "command": command,
        "names_per_server": args.names,
        "caddy_version": caddy_version,
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "servers": {},
    }
    print()
    print(f"{'server':12} {'first median':>12} {'min':>7} {'max':>7} {'warm median':>12} {'failures':>9}")
    for kind, r in results.items():
        first, warm = summary(r["first"]), summary(r["warm"])
        report["servers"][kind] = {"first": first, "warm": warm, "samples": r["first"], "warm_samples": r["warm"],
                                   "pebble_orders": r["pebble_orders"],
                                   "pebble_new_accounts": r["pebble_new_accounts"]}
        print(f"{kind:12} {fmt(first['median']):>12} {fmt(first['min']):>7} {fmt(first['max']):>7} "
              f"{fmt(warm['median']):>12} {first['failures'] + warm['failures']:>9}")
    print(f"(seconds; curl time_total; {args.names} never-seen names per server; "
          f"pebble orders: " + ", ".join(f"{k} {r['pebble_orders']}" for k, r in results.items()) + ")")

    failed = {k: summary(r["first"])["failures"] for k, r in results.items()}
    te, cd = report["servers"]["tenantedge"]["first"]["median"], report["servers"]["caddy"]["first"]["median"]
    if any(failed.values()) or te is None or cd is None:
        print("NO RATIO: some first requests failed: " + ", ".join(f"{k} {v}" for k, v in failed.items()))
        report["ratio_first_median_tenantedge_over_caddy"] = None
        status = 1
    else:
        ratio = te / cd
        report["ratio_first_median_tenantedge_over_caddy"] = round(ratio, 4)
        print(f"ratio first-request median tenantedge/caddy = {ratio:.2f}")
        status = 0
    print(f"command: (cd {REPO} && {command})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"figures written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
