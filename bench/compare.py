"""
tenantedge vs Caddy (On-Demand TLS), side by side, on one machine: request
rates, latency, TLS handshakes, large transfers, first-request latency for
new names, and memory per cached tenant.

Everything runs on 127.0.0.1, on ports chosen at run time:

  - one Pebble (Debian's pebble) per server under test, with that server on
    Pebble's validation ports (as bench/first_request.py does), a throwaway
    CA for Pebble's own HTTPS and a twisted.names DNS server answering
    127.0.0.1 for every name;
  - nginx as the backend (and as Caddy's "ask" endpoint): "ok\\n" on /, a
    200 MiB file on /download, and /upload, which reads the whole request
    body before it answers 200 (checked at start-up);
  - tenantedge (`twist tenantedge`, optionally with --workers N) and Caddy
    (`caddy run`), both proxying to that nginx.

It then measures, in each of --runs runs, every measure for every server,
one server after the other (the order alternates from run to run), and
reports the median of the runs:

  h1          wrk -t2 -c50 -d10s --latency: keep-alive HTTP/1.1 req/s, p50/p99
  h2          h2load -t2 -c50 -m10 -D 10: HTTP/2 req/s, p50/p99
  handshakes  full and resumed TLS handshakes/s (one request per connection),
              with the fraction of sessions the server really resumed
  transfer    200 MiB upload and download with curl, HTTP/1.1 and HTTP/2
  first       first-request latency for never-seen names (ACME via Pebble)
  memory      RSS idle and after 1,000 / 10,000 cached tenants (each tenant
              a new name that handshakes once; local CA for both servers:
              `--ca internal` / Caddy's `tls internal`), measured once

Run from the repository root (see bench/README.md):

    .venv/bin/python bench/compare.py [--runs 3] [--quick] [--workers N ...] [--json FILE] [--only NAMES]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, tail  # noqa: E402
from first_request import LoopbackDNS, Pebble, Processes, wait_for_port  # noqa: E402

from tenantedge.testing import write_https_material  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(os.path.abspath(sys.executable))
TWIST = os.path.join(BIN, "twist")
HANDSHAKES = os.path.join(HERE, "handshakes.py")

#: The environment of tenantedge (--rev puts an exported tree first on PYTHONPATH).
SERVER_ENV = dict(os.environ)

MEASURES = ("h1", "h2", "handshakes", "transfer", "first", "memory")
BLOB_MIB = 200
BLOB_BYTES = BLOB_MIB * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------
# processes: every child in its own session, stopped by PID (and its group)
# --------------------------------------------------------------------------


def proc_stat() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name."""
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        table[int(entry)] = data.rsplit(")", 1)[1].split()
    return table


def tree(pid: int) -> list[int]:
    """pid and all its descendants that are alive now."""
    table = proc_stat()
    children: dict[int, list[int]] = {}
    for p, fields in table.items():
        children.setdefault(int(fields[1]), []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in table:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def group_members(pgid: int) -> list[int]:
    return [p for p, fields in proc_stat().items() if int(fields[2]) == pgid]


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024.0


def pss_mib(pids: list[int]) -> float | None:
    """Proportional set size, summed: pages shared between the processes
    (forked workers) are split between them instead of counted in each."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            return None
    return total / 1024.0


def cpu_seconds(pids: list[int]) -> float:
    table = proc_stat()
    return sum((int(table[p][11]) + int(table[p][12])) / CLK_TCK for p in pids if p in table)


def box_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal; guest is already in user


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Procs(Processes):
    """first_request.Processes, plus: the process group of each child is
    stopped too (nginx workers, tenantedge workers), and short-lived tools
    are run with a timeout and killed on any exception."""

    def start(self, argv: list[str], log: str, env: dict[str, str] | None = None,
              cwd: str | None = None, user: int | None = None) -> subprocess.Popen[bytes]:
        if user is None:
            return super().start(argv, log, env=env, cwd=cwd)
        out = open(log, "wb")
        self.logs.append(out)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True, user=user, group=user, extra_groups=[])
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        super().stop(proc, timeout)
        # The group is the child's own (start_new_session): whatever is
        # left in it is one of ours.
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            if not group_members(proc.pid):
                break
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + wait
            while group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None,
            sample: Callable[[], None] | None = None) -> tuple[int, str, str]:
        """Run a tool to completion (bounded by timeout); (exit code, stdout, stderr).
        With sample, call it every 0.1 s while the tool runs (peak RSS)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        self.procs.append(proc)
        try:
            if sample is not None:
                deadline = time.monotonic() + timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    sample()
                    time.sleep(0.1)
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()) if sample else timeout)
            return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        except subprocess.TimeoutExpired:
            self.stop(proc)
            out, err = proc.communicate()
            return -999, out.decode("utf-8", "replace"), err.decode("utf-8", "replace") + f"\nTIMEOUT after {timeout}s"
        finally:
            if proc.poll() is None:
                self.stop(proc)
            self.procs.remove(proc)

    def run_many(self, argvs: list[list[str]], timeout: float) -> list[tuple[int, str, str]]:
        """Run several tools at once (e.g. one handshake driver per core)."""
        procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  start_new_session=True) for a in argvs]
        self.procs.extend(procs)
        deadline = time.monotonic() + timeout
        results = []
        try:
            for proc in procs:
                try:
                    out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                    results.append((proc.returncode, out.decode(), err.decode()))
                except subprocess.TimeoutExpired:
                    self.stop(proc)
                    out, err = proc.communicate()
                    results.append((-999, out.decode(), err.decode() + f"\nTIMEOUT after {timeout}s"))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    self.stop(proc)
                self.procs.remove(proc)
        return results


# --------------------------------------------------------------------------
# nginx: the backend (and Caddy's ask endpoint, and the optional reference)
# --------------------------------------------------------------------------

NGINX_LOCATIONS = """\
default_type text/plain;
location / {{ return 200 "ok\\n"; }}
location = /check {{ return 200 "ok\\n"; }}
location = /download {{ alias {blob}; }}
# The mirror module reads the whole request body before the request goes
# on (a plain "return" answers at once and discards the body while the
# client is still sending). /sink gets no body; the main request then hits
# the static module (404/405 for a POST), which error_page turns into 200.
location = /upload {{
    mirror /sink;
    mirror_request_body on;
    error_page 404 405 =200 @ok;
}}
location = /sink {{ internal; return 204; }}
location @ok {{ return 200 "ok\\n"; }}
"""

NGINX_CONF = """\
# generated by bench/compare.py
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_max_body_size 0;
    client_body_buffer_size 256m;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        include {dir}/locations.conf;
    }}
{reference}}}
"""

NGINX_REFERENCE = """\
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:10m;
        include {dir}/locations.conf;
    }}
"""


class Nginx:
    def __init__(self, procs: Procs, directory: str, workers: str, reference: tuple[str, str] | None) -> None:
        self.procs, self.dir, self.workers = procs, directory, workers
        self.port = free_port()
        self.reference_port = free_port() if reference else None
        self.reference = reference
        self.blob = os.path.join(directory, "blob.bin")
        self.conf = os.path.join(directory, "nginx.conf")
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_text = ""
        self.argv = ["nginx", "-p", directory, "-e", os.path.join(directory, "error.log"), "-c", self.conf,
                     "-g", "daemon off;"]

    def start(self) -> None:
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        with open(self.blob, "wb") as f:
            for _ in range(BLOB_MIB):
                f.write(os.urandom(1024 * 1024))
        with open(os.path.join(self.dir, "locations.conf"), "w") as f:
            f.write(NGINX_LOCATIONS.format(blob=self.blob))
        user = None
        if os.geteuid() == 0:
            # Run nginx itself unprivileged (as root its default would be a
            # root master and "nobody" workers): it gets its own directory.
            user = 65534
        reference = ""
        if self.reference:
            copies = []
            for path in self.reference:
                shutil.copy(path, self.dir)
                copies.append(os.path.join(self.dir, os.path.basename(path)))
            reference = NGINX_REFERENCE.format(port=self.reference_port, cert=copies[0], key=copies[1],
                                               dir=self.dir)
        self.conf_text = NGINX_CONF.format(workers=self.workers, dir=self.dir, port=self.port, reference=reference)
        with open(self.conf, "w") as f:
            f.write(self.conf_text)
        if user is not None:
            for root, dirs, files in os.walk(self.dir):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), user, user)
            os.chown(self.dir, user, user)
            os.chmod(self.dir, 0o755)
        log = os.path.join(self.dir, "nginx.out")
        self.proc = self.procs.start(self.argv, log, user=user)
        wait_for_port(self.port, self.proc, log)
        if self.reference_port:
            wait_for_port(self.reference_port, self.proc, log)

    def check_upload_reads_body(self) -> None:
        """/upload must answer only after the whole body arrived (else the
        upload figure would measure nothing)."""
        size = 8 * 1024 * 1024
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            s.sendall(b"x" * (size // 2))
            s.settimeout(0.5)
            try:
                early = s.recv(100)
            except socket.timeout:
                early = b""
            if early:
                raise RuntimeError(f"nginx answered /upload before the body was complete: {early!r}")
            s.settimeout(10)
            s.sendall(b"x" * (size - size // 2))
            answer = s.recv(100)
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"nginx /upload answered {answer!r}")


# --------------------------------------------------------------------------
# the servers under test
# --------------------------------------------------------------------------

CADDYFILE_ACME = """\
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
		ask http://127.0.0.1:{backend_port}/check
	}}
}}

https:// {{
	tls {{
		on_demand
	}}
	reverse_proxy 127.0.0.1:{backend_port}
}}
"""

CADDYFILE_INTERNAL = """\
{{
	admin off
	default_bind 127.0.0.1
	http_port {http_port}
	https_port {https_port}
	skip_install_trust
	on_demand_tls {{
		ask http://127.0.0.1:{backend_port}/check
	}}
}}

https:// {{
	tls internal {{
		on_demand
	}}
	reverse_proxy 127.0.0.1:{backend_port}
}}
"""


class Target:
    """One server under test (or the nginx reference)."""

    def __init__(self, label: str, kind: str, workers: int | None = None) -> None:
        self.label, self.kind, self.workers = label, kind, workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.pebble: Pebble | None = None
        self.port = 0
        self.http_port = 0
        self.root = ""         # CA file to verify the server's certificates with (curl)
        self.name = ""         # the host name the load tests use
        self.argv: list[str] = []
        self.log = ""
        self.config_text = ""  # the Caddyfile

    @property
    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc and self.proc.poll() is None else []


def tenantedge_argv(t: Target, store: str, ca: list[str], backend_port: int) -> list[str]:
    argv = [TWIST, "tenantedge",
            "--https", f"tcp:{t.port}:interface=127.0.0.1",
            "--http", f"tcp:{t.http_port}:interface=127.0.0.1",
            "--admin", "none",
            "--store", store,
            *ca,
            "--allow-suffix", ".test",
            "--backend", f"http://127.0.0.1:{backend_port}",
            "--max-body-size", "0"]
    if t.workers is not None:
        argv += ["--workers", str(t.workers)]
    return argv


def start_server(procs: Procs, t: Target, work: str, backend_port: int, pebble: Pebble | None) -> None:
    """Start t on Pebble's validation ports (pebble given) or, with the local
    CA, on fresh ports (pebble None)."""
    os.makedirs(work, exist_ok=True)
    t.pebble = pebble
    if pebble is not None:
        t.port, t.http_port = pebble.tls_port, pebble.http_port
    else:
        t.port, t.http_port = free_port(), free_port()
    env = None
    if t.kind == "tenantedge":
        if pebble is not None:
            ca = ["--ca", pebble.directory_url, "--ca-root", pebble.https_ca, "--allow-private-suffix"]
        else:
            ca = ["--ca", "internal"]
        t.argv = tenantedge_argv(t, os.path.join(work, "store"), ca, backend_port)
        t.log = os.path.join(work, "tenantedge.log")
        env = SERVER_ENV
    else:
        for sub in ("data", "config", "home"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        caddyfile = os.path.join(work, "Caddyfile")
        template = CADDYFILE_ACME if pebble is not None else CADDYFILE_INTERNAL
        t.config_text = template.format(
            http_port=t.http_port, https_port=t.port, backend_port=backend_port,
            acme_ca=pebble.directory_url if pebble else "", acme_ca_root=pebble.https_ca if pebble else "")
        with open(caddyfile, "w") as f:
            f.write(t.config_text)
        env = dict(os.environ, XDG_DATA_HOME=os.path.join(work, "data"),
                   XDG_CONFIG_HOME=os.path.join(work, "config"), HOME=os.path.join(work, "home"))
        check = subprocess.run(["caddy", "adapt", "--config", caddyfile, "--adapter", "caddyfile"],
                               capture_output=True, text=True, env=env, timeout=30,
                               start_new_session=True)
        if check.returncode != 0:
            raise RuntimeError(f"caddy adapt rejected {caddyfile}:\n{check.stderr}")
        t.argv = ["caddy", "run", "--config", caddyfile, "--adapter", "caddyfile"]
        t.log = os.path.join(work, "caddy.log")
    t.proc = procs.start(t.argv, t.log, env=env, cwd=work)
    wait_for_port(t.port, t.proc, t.log, timeout=60)
    wait_for_port(t.http_port, t.proc, t.log, timeout=60)


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------

WRK_LUA = """\
-- bench/compare.py: connect to 127.0.0.1 whatever the URL's host is.
-- wrk still sends the URL's host as SNI (SSL_set_tlsext_host_name) and in
-- the Host header, so no DNS entry (and no /etc/hosts change) is needed.
wrk.resolve = function(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Procs, work: str, nginx: Nginx) -> None:
        self.args, self.procs, self.work, self.nginx = args, procs, work, nginx
        self.samples: list[dict[str, Any]] = []
        self.commands: dict[str, str] = {}
        self.wrk_lua = os.path.join(work, "resolve.lua")
        with open(self.wrk_lua, "w") as f:
            f.write(WRK_LUA)
        self.blob = nginx.blob

    def note_command(self, key: str, argv: list[str]) -> None:
        self.commands.setdefault(key, " ".join(shlex.quote(a) for a in argv))

    def wait_idle(self) -> float | None:
        """With --wait-idle S: wait (up to S seconds) until the box is quiet
        (under 25% of one core busy over 1 s; nothing of ours is running
        between measurements). Returns the last busy % seen."""
        if not self.args.wait_idle:
            return None
        deadline = time.monotonic() + self.args.wait_idle
        while True:
            b0 = box_busy_seconds()
            time.sleep(1.0)
            busy = 100 * (box_busy_seconds() - b0)
            if busy < 25 or time.monotonic() >= deadline:
                return round(busy, 1)

    def loaded(self, t: Target, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run fn, adding the CPU the server, nginx and the client used."""
        busy_before = self.wait_idle()
        server_pids, nginx_pids = t.pids, tree(self.nginx.proc.pid)  # type: ignore[union-attr]
        s0, n0, c0, b0 = cpu_seconds(server_pids), cpu_seconds(nginx_pids), children_cpu(), box_busy_seconds()
        w0 = time.monotonic()
        result = fn()
        wall = time.monotonic() - w0
        s1, n1, c1, b1 = cpu_seconds(server_pids), cpu_seconds(nginx_pids), children_cpu(), box_busy_seconds()
        server = None if t.kind == "nginx" else round(100 * (s1 - s0) / wall, 1)
        nginx, client, box = (round(100 * v / wall, 1) for v in (n1 - n0, c1 - c0, b1 - b0))
        # "other": everything else on the box (Pebble, this script, other
        # users' jobs): if it is large, the figure is disturbed.
        other = round(box - (server or 0) - nginx - client, 1)
        result["cpu_pct"] = {"server": server, "nginx": nginx, "client": client, "other": other, "box": box}
        if busy_before is not None:
            result["box_busy_before_pct"] = busy_before
        return result

    # --- 1. HTTP/1.1 keep-alive ------------------------------------------
    def h1(self, t: Target) -> dict[str, Any]:
        d = self.args.duration
        argv = ["wrk", "-t2", "-c50", f"-d{d}s", "--latency", "--timeout", "5s", "-s", self.wrk_lua,
                f"https://{t.name}:{t.port}/"]
        self.note_command(f"h1 {t.label}", argv)
        rc, out, err = self.procs.run(argv, timeout=d + 60)
        r: dict[str, Any] = {"rc": rc}
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        r["rps"] = float(m.group(1)) if m and rc == 0 else None
        for pct in ("50", "99"):
            m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
            r[f"p{pct}_ms"] = to_ms(float(m.group(1)), m.group(2)) if m else None
        m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        r["non_2xx"] = int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: (.*)", out)
        r["socket_errors"] = m.group(1).strip() if m else ""
        m = re.search(r"(\d+) requests in", out)
        r["requests"] = int(m.group(1)) if m else None
        if r["non_2xx"] or rc != 0:
            r["output"] = (out + err)[-2000:]
        return r

    # --- 2. HTTP/2 ---------------------------------------------------------
    def h2(self, t: Target) -> dict[str, Any]:
        d = self.args.duration
        log = os.path.join(self.work, f"h2load-{t.label}.tsv")
        argv = ["h2load", "-t2", "-c50", "-m10", "-D", str(d), "--warm-up-time", "1",
                "--connect-to", f"127.0.0.1:{t.port}", "--log-file", log, f"https://{t.name}:{t.port}/"]
        self.note_command(f"h2 {t.label}", argv)
        rc, out, err = self.procs.run(argv, timeout=d + 60)
        r: dict[str, Any] = {"rc": rc}
        m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
        proto = re.search(r"Application protocol: (\S+)", out)
        r["protocol"] = proto.group(1) if proto else None
        r["rps"] = float(m.group(1)) if m and rc == 0 and r["protocol"] == "h2" else None
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                      r"(\d+) errored, (\d+) timeout", out)
        if m:
            r.update(total=int(m.group(1)), succeeded=int(m.group(4)), failed=int(m.group(5)),
                     errored=int(m.group(6)), timeout=int(m.group(7)))
        m = re.search(r"status codes: (.*)", out)
        r["status_codes"] = m.group(1).strip() if m else ""
        times: list[int] = []
        try:
            with open(log) as f:
                for line in f:
                    fields = line.split("\t")
                    if len(fields) >= 3 and fields[1] == "200":
                        times.append(int(fields[2]))
            os.unlink(log)
        except OSError:
            pass
        times.sort()
        r["p50_ms"] = times[len(times) // 2] / 1000 if times else None
        r["p99_ms"] = times[min(len(times) - 1, int(len(times) * 0.99))] / 1000 if times else None
        if r["rps"] is None or r.get("failed") or r.get("errored"):
            r["output"] = (out + err)[-2000:]
        return r

    # --- 3. handshakes -----------------------------------------------------
    def handshakes(self, t: Target, mode: str) -> dict[str, Any]:
        d = self.args.duration
        argv = [sys.executable, HANDSHAKES, "rate", "--port", str(t.port), "--name", t.name, "--mode", mode,
                "--duration", str(d), "--threads", str(self.args.hs_threads)]
        self.note_command(f"handshakes {mode} {t.label}", [os.path.relpath(a, REPO) if a.startswith(REPO) else a
                                                            for a in argv] + [f"(x{self.args.hs_procs} processes)"])
        outs = self.procs.run_many([argv] * self.args.hs_procs, timeout=d + 90)
        parts = []
        for rc, out, err in outs:
            try:
                parts.append(json.loads(out))
            except ValueError:
                parts.append({"rc": rc, "error": (out + err)[-1000:]})
        ok = sum(p.get("ok", 0) for p in parts)
        conns = sum(p.get("connections", 0) for p in parts)
        reused = sum(p.get("reused", 0) for p in parts)
        rate = sum(p["ok"] / p["elapsed"] for p in parts if "ok" in p)
        p50s: list[float] = [p["p50_ms"] for p in parts if p.get("p50_ms") is not None]
        return {"per_s": rate if ok else None, "ok": ok, "connections": conns,
                "reused_fraction": reused / conns if conns else None,
                "p50_ms": statistics.median(p50s) if p50s else None, "processes": parts}

    # --- 4. transfers --------------------------------------------------------
    def transfer(self, t: Target, direction: str, http: str) -> dict[str, Any]:
        flag = "--http1.1" if http == "1.1" else "--http2"
        argv = ["curl", "-sS", flag, "--max-time", "300", "--resolve", f"{t.name}:{t.port}:127.0.0.1",
                "--cacert", t.root, "-o", "/dev/null"]
        if direction == "up":
            # No "Expect: 100-continue" round trip: the figure is throughput.
            # -T streams the file (--data-binary would read it all into
            # curl's memory first, which a 1 GiB run makes slow).
            argv += ["-H", "Expect:", "-H", "Content-Type: application/octet-stream",
                     "-X", "POST", "-T", self.blob,
                     "-w", "%{http_code} %{size_upload} %{time_total} %{http_version}",
                     f"https://{t.name}:{t.port}/upload"]
        else:
            argv += ["-w", "%{http_code} %{size_download} %{time_total} %{http_version}",
                     f"https://{t.name}:{t.port}/download"]
        self.note_command(f"{direction} h{http} {t.label}", argv)
        before = rss_mib(t.pids)
        peak = [before]

        def sample() -> None:
            peak[0] = max(peak[0], rss_mib(t.pids))

        rc, out, err = self.procs.run(argv, timeout=30 + BLOB_MIB * 1.5, sample=sample)
        fields = out.split()
        r: dict[str, Any] = {"rc": rc, "raw": out.strip(), "rss_before_mib": before, "rss_peak_mib": peak[0]}
        if len(fields) == 4:
            code, size, seconds, version = fields[0], int(fields[1]), float(fields[2]), fields[3]
            r.update(http_code=code, bytes=size, seconds=seconds, http_version=version)
            good = (rc == 0 and code == "200" and size == BLOB_BYTES
                    and version == ("1.1" if http == "1.1" else "2"))
            r["mib_s"] = BLOB_MIB / seconds if good and seconds > 0 else None
            if not good:
                r["seconds"] = None
                r["error"] = (err or out)[-500:]
        else:
            r.update(mib_s=None, seconds=None, error=(err or out)[-500:])
        return r

    # --- 5. first request --------------------------------------------------
    def curl(self, name: str, port: int, root: str, timeout: float) -> tuple[float, str, int]:
        """bench/first_request.py's curl(), in its own session: (time_total, HTTP code, curl exit)."""
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", "--max-time", str(timeout),
                "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", root, f"https://{name}:{port}/"]
        rc, out, _ = self.procs.run(argv, timeout=timeout + 10)
        seconds, _, code = out.strip().partition(" ")
        return float(seconds or "nan"), code or "000", rc

    def first(self, t: Target, run: int) -> dict[str, Any]:
        tag = secrets.token_hex(3)
        prefix = "t" if t.kind == "tenantedge" else "c"
        samples: list[dict[str, Any]] = []
        for i in range(self.args.first_names):
            name = f"{prefix}{run}-{i}-{tag}.test"
            seconds, code, rc = self.curl(name, t.port, t.root, 90.0)
            samples.append({"name": name, "seconds": seconds, "http_code": code, "curl_exit": rc})
        self.note_command(f"first {t.label}", [
            "curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{http_code}", "--max-time", "90",
            "--resolve", f"NAME:{t.port}:127.0.0.1", "--cacert", t.root, f"https://NAME:{t.port}/"])
        ok = [s["seconds"] for s in samples if s["http_code"] == "200"]
        return {"median_s": statistics.median(ok) if len(ok) == len(samples) else None, "samples": samples}


def to_ms(value: float, unit: str) -> float:
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


# --------------------------------------------------------------------------
# memory: cached tenants, with the local CA of each server
# --------------------------------------------------------------------------


def fill(bench: Bench, t: Target, prefix: str, start: int, count: int, timeout: float) -> dict[str, Any]:
    n = bench.args.hs_procs
    argvs = []
    share = [count // n + (1 if i < count % n else 0) for i in range(n)]
    first = start
    for i in range(n):
        argvs.append([sys.executable, HANDSHAKES, "fill", "--port", str(t.port), "--prefix", prefix,
                      "--start", str(first), "--count", str(share[i]), "--threads", "8",
                      "--timeout", str(timeout)])
        first += share[i]
    bench.note_command(f"fill {t.label}", [os.path.relpath(a, REPO) if a.startswith(REPO) else a
                                           for a in argvs[0]] + [f"(x{n} processes, names split)"])
    started = time.monotonic()
    outs = bench.procs.run_many(argvs, timeout=timeout + 90)
    elapsed = time.monotonic() - started
    parts = []
    for rc, out, err in outs:
        try:
            parts.append(json.loads(out))
        except ValueError:
            parts.append({"rc": rc, "error": (out + err)[-1000:], "ok": 0})
    ok = sum(p.get("ok", 0) for p in parts)
    refused: dict[str, int] = {}
    for p in parts:
        for k, v in p.get("failed_attempts", {}).items():
            refused[k] = refused.get(k, 0) + v
    return {"requested": count, "ok": ok, "seconds": elapsed, "per_s": ok / elapsed if elapsed else None,
            "ok_after_retry": sum(p.get("ok_after_retry", 0) for p in parts),
            "failed_attempts": refused,
            "timed_out": any(p.get("timed_out") for p in parts), "processes": parts}


def settle_rss(t: Target, r: dict[str, Any], key: str, seconds: float = 3.0) -> float:
    """RSS (and, in r, PSS and the process count) after a pause."""
    time.sleep(seconds)
    pids = t.pids
    r[f"{key}_pss"] = pss_mib(pids)
    r[f"{key}_processes"] = len(pids)
    return rss_mib(pids)


def memory(bench: Bench, t: Target, work: str) -> dict[str, Any]:
    start_server(bench.procs, t, work, bench.nginx.port, None)
    try:
        r: dict[str, Any] = {"argv": t.argv, "config": t.config_text}
        r["rss_idle"] = settle_rss(t, r, "rss_idle")
        print(f"  memory {t.label}: idle {r['rss_idle']:.1f} MiB ({r['rss_idle_processes']} processes, "
              f"PSS {fmt(r['rss_idle_pss'], '{:.1f}')} MiB)", flush=True)
        stages = [1000] if bench.args.quick else [1000, 10000]
        done = 0
        prefix = f"m{secrets.token_hex(2)}-"
        for target_count in stages:
            f = fill(bench, t, prefix, done, target_count - done, bench.args.fill_timeout)
            done += f["ok"]
            rss = settle_rss(t, r, f"rss_{target_count}")
            r[f"fill_{target_count}"] = f
            r[f"rss_{target_count}"] = rss if f["ok"] == f["requested"] else None
            r[f"rss_{target_count}_reached"] = {"tenants": done, "rss": rss}
            retried = (f" ({f['ok_after_retry']} needed a retry; failed attempts {f['failed_attempts']})"
                       if f["failed_attempts"] else "")
            print(f"  memory {t.label}: {done} tenants ({f['per_s']:.0f} new names/s) {rss:.1f} MiB{retried}"
                  + ("  (TIMED OUT / FAILURES)" if f["ok"] != f["requested"] else ""), flush=True)
            if f["ok"] != f["requested"]:
                break
        return r
    finally:
        if t.proc is not None:
            bench.procs.stop(t.proc)


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------

#: (key, label, better, format)
ROWS: list[tuple[str, str, str | None, str]] = [
    ("h1_rps", "HTTP/1.1 keep-alive req/s (wrk)", "higher", "{:.0f}"),
    ("h1_p50_ms", "  p50 latency ms", "lower", "{:.2f}"),
    ("h1_p99_ms", "  p99 latency ms", "lower", "{:.2f}"),
    ("h1_cpu_us", "  server CPU us per request", "lower", "{:.0f}"),
    ("h2_rps", "HTTP/2 req/s (h2load -m10)", "higher", "{:.0f}"),
    ("h2_p50_ms", "  p50 latency ms", "lower", "{:.2f}"),
    ("h2_p99_ms", "  p99 latency ms", "lower", "{:.2f}"),
    ("h2_cpu_us", "  server CPU us per request", "lower", "{:.0f}"),
    ("hs_full_per_s", "full TLS handshakes/s", "higher", "{:.0f}"),
    ("hs_full_reused", "  sessions resumed (should be 0)", None, "{:.0%}"),
    ("hs_full_cpu_us", "  server CPU us per handshake", "lower", "{:.0f}"),
    ("hs_resume_per_s", "resumed-offer handshakes/s", "higher", "{:.0f}"),
    ("hs_resume_reused", "  sessions actually resumed", None, "{:.0%}"),
    ("hs_resume_cpu_us", "  server CPU us per handshake", "lower", "{:.0f}"),
    ("up_h1_mib_s", "upload 200 MiB HTTP/1.1 MiB/s", "higher", "{:.0f}"),
    ("up_h1_s", "  seconds", "lower", "{:.2f}"),
    ("up_h1_rss_peak", "  server peak RSS MiB (all processes)", "lower", "{:.0f}"),
    ("down_h1_mib_s", "download 200 MiB HTTP/1.1 MiB/s", "higher", "{:.0f}"),
    ("down_h1_s", "  seconds", "lower", "{:.2f}"),
    ("down_h1_rss_peak", "  server peak RSS MiB (all processes)", "lower", "{:.0f}"),
    ("up_h2_mib_s", "upload 200 MiB HTTP/2 MiB/s", "higher", "{:.0f}"),
    ("up_h2_s", "  seconds", "lower", "{:.2f}"),
    ("up_h2_rss_peak", "  server peak RSS MiB (all processes)", "lower", "{:.0f}"),
    ("down_h2_mib_s", "download 200 MiB HTTP/2 MiB/s", "higher", "{:.0f}"),
    ("down_h2_s", "  seconds", "lower", "{:.2f}"),
    ("down_h2_rss_peak", "  server peak RSS MiB (all processes)", "lower", "{:.0f}"),
    ("first_s", "first request, new name (ACME) s", "lower", "{:.3f}"),
    ("rss_after_load", "RSS after the load tests MiB", "lower", "{:.1f}"),
    ("rss_idle", "RSS idle (local CA) MiB", "lower", "{:.1f}"),
    ("rss_idle_pss", "  PSS (shared pages split) MiB", "lower", "{:.1f}"),
    ("rss_1000", "RSS 1,000 tenants MiB", "lower", "{:.1f}"),
    ("rss_1000_pss", "  PSS MiB", "lower", "{:.1f}"),
    ("rss_10000", "RSS 10,000 tenants MiB", "lower", "{:.1f}"),
    ("rss_10000_pss", "  PSS MiB", "lower", "{:.1f}"),
    ("fill_per_s", "new tenants/s (local CA, incl. retries)", "higher", "{:.0f}"),
]

def set_transfer_size(mib: int) -> None:
    """The transfer measure moves a file of this many MiB (the table's labels say so)."""
    global BLOB_MIB, BLOB_BYTES
    BLOB_MIB, BLOB_BYTES = mib, mib * 1024 * 1024
    ROWS[:] = [(key, label.replace("200 MiB", f"{mib} MiB"), better, pattern)
               for key, label, better, pattern in ROWS]


CPU_ROWS = [("h1", "HTTP/1.1 keep-alive"), ("h2", "HTTP/2"), ("hs_full", "full handshakes"),
            ("hs_resume", "resumed handshakes"), ("up_h1", "upload h1"), ("down_h1", "download h1"),
            ("up_h2", "upload h2"), ("down_h2", "download h2")]


def cpu_us(r: dict[str, Any], rate: float | None) -> float | None:
    """Server CPU microseconds per request (or handshake): independent of
    how hard the client could push, unlike the rate itself."""
    server = r["cpu_pct"]["server"]
    return server * 1e4 / rate if server and rate else None


def med(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))


def versions() -> dict[str, str]:
    import importlib.metadata

    import OpenSSL
    import twisted
    from OpenSSL import SSL

    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable ({e})"
        return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else ""

    return {
        "tenantedge": importlib.metadata.version("tenantedge"),
        "Twisted": twisted.__version__,
        "pyOpenSSL": OpenSSL.__version__,
        "OpenSSL (pyOpenSSL, the server)": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "OpenSSL (python ssl, the handshake client)": __import__("ssl").OPENSSL_VERSION,
        "OpenSSL (system, wrk/h2load/curl)": out(["openssl", "version"]),
        "Python": platform.python_version(),
        "caddy": out(["caddy", "version"]),
        "nginx": out(["nginx", "-v"]),
        "wrk": out(["wrk", "-v"]),
        "h2load": out(["h2load", "--version"]),
        "curl": out(["curl", "--version"]),
        "pebble": "Debian package " + out(["dpkg-query", "-W", "-f", "${Version}", "pebble"]),
    }


def source_description(rev: str | None) -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", REPO, *argv], capture_output=True, text=True, timeout=60,
                              start_new_session=True).stdout.strip()

    if rev:
        return f"git revision {rev} ({git('rev-parse', '--short', rev)}), exported"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "tenantedge")
    return f"working tree at {git('rev-parse', '--short', 'HEAD')}" + (
        " with uncommitted changes under tenantedge/" if dirty else "")


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg(),
            "system": platform.platform(), "memory": mem}


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_only(value: str | None, parser: argparse.ArgumentParser) -> list[str]:
    if not value:
        return list(MEASURES)
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in MEASURES]
    if bad:
        parser.error(f"--only: unknown {', '.join(bad)} (choose from {', '.join(MEASURES)})")
    return names


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs; each figure is the median (default 3)")
    parser.add_argument("--quick", action="store_true", help="skip the 10,000-tenant memory point")
    parser.add_argument("--workers", type=int, nargs="+", metavar="N",
                        help="tenantedge variants with --workers N (one per value), if twist tenantedge has it")
    parser.add_argument("--json", metavar="FILE", help="write every sample and the figures to FILE")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {','.join(MEASURES)}")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load measurement (default 10)")
    parser.add_argument("--first-names", type=int, default=3, help="never-seen names per server per run (3)")
    parser.add_argument("--hs-procs", type=int, default=os.cpu_count() or 2,
                        help="handshake client processes (default: one per core)")
    parser.add_argument("--hs-threads", type=int, default=4, help="threads per handshake process (default 4)")
    parser.add_argument("--fill-timeout", type=float, default=300.0,
                        help="time box in seconds for each memory fill stage (default 300)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each load measurement, wait up to S seconds for the box to be quiet "
                             "(on a shared machine; default 0: do not wait)")
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes (default 1)")
    parser.add_argument("--reference", action="store_true",
                        help="also measure nginx terminating TLS itself (h1/h2/handshakes/transfer): the "
                             "ceiling of this client on this box, not a competitor")
    parser.add_argument("--rev", metavar="REV",
                        help="run this git revision of tenantedge (exported with git archive to a temp dir and put "
                             "first on PYTHONPATH) instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    parser.add_argument("--transfer-mib", type=int, default=BLOB_MIB, metavar="N",
                        help=f"size of the transfer measure's file in MiB (default {BLOB_MIB}; 1024 for the "
                             "1 GiB upload memory figure)")
    args = parser.parse_args()
    measures = parse_only(args.only, parser)
    set_transfer_size(args.transfer_mib)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    for tool in ("pebble", "caddy", "nginx", "wrk", "h2load", "curl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found on PATH")
    if not os.path.exists(TWIST):
        parser.error(f"{TWIST} not found: run with the project's venv interpreter (.venv/bin/python)")

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    started = time.monotonic()
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, os.getcwd())
                                                if sys.executable.startswith(os.getcwd()) else sys.executable,
                                                *sys.argv])
    notes: list[str] = []
    work = tempfile.mkdtemp(prefix="tenantedge-compare-")
    source = source_description(args.rev)
    if args.rev:
        src = os.path.join(work, "src")
        os.makedirs(src)
        try:
            archive = subprocess.run(["git", "-C", REPO, "archive", args.rev], check=True, capture_output=True,
                                     timeout=120, start_new_session=True).stdout
            subprocess.run(["tar", "-x", "-C", src], input=archive, check=True, timeout=120, start_new_session=True)
        except subprocess.CalledProcessError as e:
            shutil.rmtree(work, ignore_errors=True)
            parser.error(f"--rev {args.rev}: {e.stderr.decode(errors='replace').strip() if e.stderr else e}")
        SERVER_ENV["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    help_text = subprocess.run([TWIST, "tenantedge", "--help"], capture_output=True, text=True, timeout=60,
                               env=SERVER_ENV, start_new_session=True).stdout
    targets: list[Target] = []
    if args.workers:
        if "--workers" in help_text:
            targets += [Target(f"tenantedge w{n}", "tenantedge", n) for n in args.workers]
        else:
            notes.append("twist tenantedge --help does not list --workers: worker variants skipped; "
                         "tenantedge runs as one process")
            print("NOTE: " + notes[-1], flush=True)
    if not targets:
        targets.append(Target("tenantedge", "tenantedge"))
    caddy = Target("Caddy", "caddy")
    targets.append(caddy)
    te_targets = [t for t in targets if t.kind == "tenantedge"]

    info: dict[str, Any] = {"machine": machine(), "versions": versions(), "tenantedge_source": source}
    print(f"tenantedge under test: {source}")
    print(f"machine: {info['machine']['cpus']} CPUs ({info['machine']['cpu_model']}), kernel "
          f"{info['machine']['kernel']}, {info['machine']['memory']} RAM")
    for k, v in info["versions"].items():
        print(f"  {k}: {v}")
    print(f"nginx worker_processes {args.nginx_workers}; handshake client {args.hs_procs} processes x "
          f"{args.hs_threads} threads; measures: {', '.join(measures)}; runs: {args.runs}", flush=True)

    procs = Procs()
    dns = LoopbackDNS()
    results: dict[str, dict[str, list[Any]]] = {t.label: {} for t in targets}
    raw: list[dict[str, Any]] = []
    mem: dict[str, Any] = {}
    reference: Target | None = None
    nginx: Nginx | None = None
    bench: Bench | None = None
    status = 0
    try:
        material = write_https_material(work, "tenantedge compare CA for pebble")
        nginx_dir = tempfile.mkdtemp(prefix="nginx-", dir=work)
        os.chmod(work, 0o711)  # nginx may run as nobody: it must reach its own directory
        nginx = Nginx(procs, nginx_dir, args.nginx_workers, (material[1], material[2]) if args.reference else None)
        nginx.start()
        nginx.check_upload_reads_body()
        bench = Bench(args, procs, work, nginx)
        print(f"work dir {work}; nginx 127.0.0.1:{nginx.port} (pid {nginx.proc.pid})", flush=True)  # type: ignore
        if args.reference:
            reference = Target("nginx TLS (ref)", "nginx")
            reference.proc, reference.port = nginx.proc, nginx.reference_port or 0
            reference.name, reference.root = "localhost", material[0]
            results[reference.label] = {}

        needs_servers = any(m != "memory" for m in measures)
        if needs_servers:
            dns_port = dns.start()
            tag = secrets.token_hex(3)
            for i, t in enumerate(targets):
                pebble = Pebble(procs, os.path.join(work, f"s{i}", "pebble"), dns_port, *material)
                pebble.start()
                t.root = pebble.root_pem()
                start_server(procs, t, os.path.join(work, f"s{i}", "server"), nginx.port, pebble)
                t.name = f"load{i}-{tag}.test"
                seconds, code, rc = bench.curl(t.name, t.port, t.root, 90.0)
                if code != "200":
                    raise RuntimeError(f"{t.label}: first request for {t.name} gave HTTP {code} (curl {rc}):\n"
                                       + tail(t.log))
                print(f"{t.label}: pid {t.proc.pid} ({len(t.pids)} processes) on 127.0.0.1:{t.port}, certificate for {t.name} "  # type: ignore
                      f"in {seconds:.2f}s", flush=True)
            # Warm-up (not measured): code paths, connection pools, JIT-less caches.
            for t in targets + ([reference] if reference else []):
                procs.run(["wrk", "-t2", "-c50", "-d2s", "-s", bench.wrk_lua, f"https://{t.name}:{t.port}/"], 60)

        load_targets = targets + ([reference] if reference else [])

        def record(run: int, t: Target, measure: str, r: dict[str, Any]) -> None:
            raw.append({"run": run, "server": t.label, "measure": measure, **r})

        def add(t: Target, key: str, value: Any) -> None:
            results[t.label].setdefault(key, []).append(value)

        for run in range(args.runs if needs_servers else 0):
            order = load_targets if run % 2 == 0 else list(reversed(targets)) + ([reference] if reference else [])
            print(f"run {run + 1}/{args.runs}: order {', '.join(t.label for t in order)}", flush=True)
            if "h1" in measures:
                for t in order:
                    r = bench.loaded(t, lambda: bench.h1(t))
                    record(run, t, "h1", r)
                    add(t, "h1_rps", r["rps"])
                    add(t, "h1_p50_ms", r["p50_ms"])
                    add(t, "h1_p99_ms", r["p99_ms"])
                    add(t, "cpu_h1", r["cpu_pct"])
                    add(t, "h1_cpu_us", cpu_us(r, r["rps"]))
                    print(f"  h1  {t.label:16} {fmt(r['rps'], '{:8.0f}')} req/s  p50 {fmt(r['p50_ms'], '{:.2f}')}"
                          f" p99 {fmt(r['p99_ms'], '{:.2f}')} ms  non-2xx {r['non_2xx']}  cpu {r['cpu_pct']}",
                          flush=True)
                    time.sleep(1)
            if "h2" in measures:
                for t in order:
                    r = bench.loaded(t, lambda: bench.h2(t))
                    record(run, t, "h2", r)
                    add(t, "h2_rps", r["rps"])
                    add(t, "h2_p50_ms", r["p50_ms"])
                    add(t, "h2_p99_ms", r["p99_ms"])
                    add(t, "cpu_h2", r["cpu_pct"])
                    add(t, "h2_cpu_us", cpu_us(r, r["rps"]))
                    print(f"  h2  {t.label:16} {fmt(r['rps'], '{:8.0f}')} req/s  p50 {fmt(r['p50_ms'], '{:.2f}')}"
                          f" p99 {fmt(r['p99_ms'], '{:.2f}')} ms  proto {r['protocol']} failed "
                          f"{r.get('failed')} errored {r.get('errored')}  cpu {r['cpu_pct']}", flush=True)
                    time.sleep(1)
            if "handshakes" in measures:
                for mode in ("full", "resume"):
                    for t in order:
                        r = bench.loaded(t, lambda: bench.handshakes(t, mode))
                        record(run, t, f"handshakes-{mode}", r)
                        add(t, f"hs_{mode}_per_s", r["per_s"])
                        add(t, f"hs_{mode}_reused", r["reused_fraction"])
                        add(t, f"cpu_hs_{mode}", r["cpu_pct"])
                        add(t, f"hs_{mode}_cpu_us", cpu_us(r, r["per_s"]))
                        errors = sum(sum(p.get("errors", {}).values()) for p in r["processes"])
                        print(f"  hs {mode:6} {t.label:16} {fmt(r['per_s'], '{:6.0f}')}/s  resumed "
                              f"{fmt(r['reused_fraction'], '{:.0%}')}  errors {errors}  cpu {r['cpu_pct']}",
                              flush=True)
                        time.sleep(2)
            if "transfer" in measures:
                for http in ("1.1", "2"):
                    for direction in ("up", "down"):
                        for t in order:
                            r = bench.loaded(t, lambda: bench.transfer(t, direction, http))
                            key = f"{direction}_h{http[0]}"
                            record(run, t, key, r)
                            add(t, f"{key}_mib_s", r["mib_s"])
                            add(t, f"{key}_s", r["seconds"])
                            add(t, f"{key}_rss_peak", r["rss_peak_mib"])
                            add(t, f"cpu_{key}", r["cpu_pct"])
                            print(f"  {direction:4} h{http:3} {t.label:16} {fmt(r['seconds'], '{:6.2f}')} s "
                                  f"{fmt(r['mib_s'], '{:6.0f}')} MiB/s  {r.get('error', '')}  cpu {r['cpu_pct']}",
                                  flush=True)
            if "first" in measures:
                for t in [t for t in order if t.kind != "nginx"]:
                    r = bench.first(t, run)
                    record(run, t, "first", r)
                    add(t, "first_s", r["median_s"])
                    print(f"  first {t.label:16} median {fmt(r['median_s'], '{:.3f}')} s  "
                          + " ".join(f"{s['seconds']:.3f}/{s['http_code']}" for s in r["samples"]), flush=True)
        if needs_servers:
            for t in targets:
                add(t, "rss_after_load", rss_mib(t.pids))
                procs.stop(t.proc)  # type: ignore[arg-type]
                t.pebble.stop()  # type: ignore[union-attr]
            dns.stop()

        if "memory" in measures:
            print("memory (local CA for both servers: tenantedge --ca internal, Caddy tls internal)", flush=True)
            for i, t in enumerate(targets):
                mt = Target(t.label, t.kind, t.workers)
                r = memory(bench, mt, os.path.join(work, f"mem{i}"))
                mem[t.label] = r
                record(0, t, "memory", r)
                for key in ("rss_idle", "rss_1000", "rss_10000"):
                    if key in r:
                        add(t, key, r[key])
                        add(t, key + "_pss", r.get(key + "_pss") if r[key] is not None else None)
                stage = "fill_10000" if "fill_10000" in r else "fill_1000"
                if stage in r:
                    total_ok = sum(r[s]["ok"] for s in ("fill_1000", "fill_10000") if s in r)
                    total_s = sum(r[s]["seconds"] for s in ("fill_1000", "fill_10000") if s in r)
                    add(t, "fill_per_s", total_ok / total_s if total_s else None)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e}): stopping everything", flush=True)
        status = 130
    finally:
        procs.stop_all()
        dns.stop() if dns.thread is not None and dns.thread.is_alive() else None
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started

    figures = {label: {k: med(v) for k, v in d.items() if not k.startswith("cpu_")} for label, d in results.items()}
    columns = [t.label for t in targets] + ([reference.label] if reference else [])
    print()
    if status:
        print("=== INTERRUPTED: partial figures ===")
    print(f"=== tenantedge vs Caddy: median of {args.runs} run(s); {info['machine']['cpus']} CPUs, kernel "
          f"{info['machine']['kernel']}; elapsed {elapsed:.0f} s ===")
    headers = ["measure", "better"] + columns + [f"ratio {t.label}/Caddy" for t in te_targets]
    rows = []
    for key, label, better, pattern in ROWS:
        if not any(figures[c].get(key) is not None for c in columns):
            continue
        row = [label, better or ""]
        row += [fmt(figures[c].get(key), pattern) for c in columns]
        for t in te_targets:
            a, b = figures[t.label].get(key), figures[caddy.label].get(key)
            row.append(f"{a / b:.2f}" if better and a is not None and b else "")
        rows.append(row)
    if rows:
        print_table(headers, rows)
    print("ratio = tenantedge / Caddy. Where better is 'higher', a ratio > 1 means tenantedge wins; "
          "where it is 'lower' (latency, seconds, memory), a ratio < 1 means tenantedge wins.")
    cpu_rows = []
    for key, label in CPU_ROWS:
        cells = []
        for c in columns:
            samples = results[c].get(f"cpu_{key}")
            if not samples:
                cells.append("")
                continue
            parts = [med([s[p] for s in samples]) for p in ("server", "nginx", "client", "other")]
            cells.append("/".join("-" if p is None else f"{p:.0f}" for p in parts))
        if any(cells):
            cpu_rows.append([label] + cells)
    if cpu_rows:
        print()
        print(f"CPU during each measurement, % of one core, server/nginx/client/other (the box has "
              f"{info['machine']['cpus']} cores = {100 * (info['machine']['cpus'] or 1)}%):")
        print_table(["measure"] + columns, cpu_rows)
    others = [s["other"] for d in results.values() for k, v in d.items() if k.startswith("cpu_") for s in v]
    if others and max(others) > 20:
        warning = (f"other processes (not the server, nginx or the client) used up to {max(others):.0f}% CPU "
                   f"(median {statistics.median(others):.0f}%) during the measurements: the box was not idle, "
                   f"figures are disturbed (load average at start {info['machine']['loadavg_at_start']})")
        notes.append(warning)
        print("WARNING: " + warning)
    if mem:
        print()
        for label, r in mem.items():
            reached = [r[k] for k in r if k.endswith("_reached")]
            if any(r.get(k.replace("_reached", "")) is None for k in r if k.endswith("_reached")):
                print(f"memory {label}: fill incomplete: {reached}")
    for n in notes:
        if not n.startswith("other processes"):
            print("NOTE: " + n)
    print()
    print("commands:")
    print(f"  (cd {REPO} && {command})")
    for t in targets:
        print(f"  {t.label}: {' '.join(shlex.quote(a) for a in t.argv)}")
    for label, r in mem.items():
        print(f"  {label} (memory, local CA): {' '.join(shlex.quote(a) for a in r['argv'])}")
    if nginx is not None:
        print(f"  nginx: {' '.join(shlex.quote(a) for a in nginx.argv)}  (config: see --keep or --json)")
    for key, cmd in (bench.commands.items() if bench is not None else []):
        print(f"  {key}: {cmd}")

    if args.json:
        report = {
            "command": command, "elapsed_seconds": round(elapsed, 1), "runs": args.runs, "quick": args.quick,
            "measures": measures, "notes": notes, **info,
            "settings": {"duration": args.duration, "wait_idle": args.wait_idle, "nginx_workers": args.nginx_workers,
                         "hs_procs": args.hs_procs, "hs_threads": args.hs_threads,
                         "first_names": args.first_names, "fill_timeout": args.fill_timeout},
            "servers": {t.label: {"argv": t.argv, "config": t.config_text} for t in targets},
            "commands": bench.commands if bench is not None else {},
            "nginx_conf": nginx.conf_text if nginx is not None else None,
            "figures": figures,
            "per_run": results,
            "samples": raw,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"every sample written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
