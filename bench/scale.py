"""
How tenantedge scales with the number of stored certificates.

For each store size N (default 1,000 and 50,000), a store in txacme's format
(<store>/<name>.pem, 0600, directory 0700) is filled with N leaves signed by
the project's own local CA (<store>/localca/), and `twist tenantedge --ca
internal` is started on it. Measured:

  1. start-up: from launching the process until its HTTPS port accepts a TCP
     connection (connect polled every 5 ms), median of 3 starts; also until
     a first TLS handshake (to a stored name) completes, for context;
  2. the TLS handshake for a stored, never-cached name (median over 20
     names), and for a cached name (the same 20 names again, 3 rounds);
  3. server RSS (VmRSS) right after start-up, and, for N >= 10,000, after
     10,000 distinct stored names have each completed one handshake (so
     10,000 contexts are cached; --cache-size is 10,000).

Handshakes are made with Python's ssl module over real loopback sockets,
verifying the server against <store>/localca/root.pem, SNI = the name. Only
the TLS handshake is timed (the TCP connect is not). Everything is on
127.0.0.1; ports are chosen at run time.

Run from the repository root:

    .venv/bin/python bench/scale.py [--sizes 1000,50000] [--keep-store DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, tail  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TWIST = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twist")

#: Files older than this are generated again when a kept store is reused
#: (local CA leaves live 7 days; the server would re-issue expired ones).
STALE_AFTER = 5 * 86400

#: The server's environment (--rev puts an exported tree first on PYTHONPATH).
SERVER_ENV = dict(os.environ)


class WallClock:
    def seconds(self) -> float:
        return time.time()


def name_for(i: int) -> str:
    return f"t{i:06d}.test"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for {pid}")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------


def generate_store(store: str, n: int) -> tuple[float, int]:
    """
    Make sure <store> holds t000000.test ... t<n-1>.test, signed by the local
    CA in <store>/localca (created if missing). Returns (seconds, files
    written); files already present and fresh are kept.
    """
    from tenantedge.localca import LocalCA  # after --rev has set sys.path

    started = time.perf_counter()
    os.makedirs(store, mode=0o700, exist_ok=True)
    os.chmod(store, 0o700)
    ca_dir = os.path.join(store, "localca")
    fresh_root = not os.path.exists(os.path.join(ca_dir, "root.pem"))
    ca = LocalCA(directory=ca_dir, clock=WallClock())
    ca.prepare()
    now = time.time()
    written = 0
    for i in range(n):
        name = name_for(i)
        path = os.path.join(store, name + ".pem")
        if not fresh_root:
            try:
                if now - os.stat(path).st_mtime < STALE_AFTER:
                    continue
            except FileNotFoundError:
                pass
        data = ca._sign(name).to_pem()
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        written += 1
    return time.perf_counter() - started, written


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------


class Server:
    def __init__(self, store: str, cache_size: int, log: str) -> None:
        self.store = store
        self.https = free_port()
        self.http = free_port()
        backend = free_port()  # nothing listens there; handshakes never reach the backend
        self.argv = [
            TWIST, "tenantedge",
            "--https", f"tcp:{self.https}:interface=127.0.0.1",
            "--http", f"tcp:{self.http}:interface=127.0.0.1",
            "--store", store,
            "--ca", "internal",
            "--allow-suffix", ".test",
            "--backend", f"http://127.0.0.1:{backend}",
            "--cache-size", str(cache_size),
            # One process: the RSS read below is the server's, not a
            # supervisor's that forked workers (the default is one per CPU).
            "--workers", "1",
        ]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: Any = None

    def start(self, timeout: float = 120.0) -> float:
        """Launch; return seconds until the HTTPS port accepts a TCP connection."""
        self._out = open(self.log, "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=SERVER_ENV,
                                     start_new_session=True)
        deadline = started + timeout
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.connect(("127.0.0.1", self.https))
                return time.perf_counter() - started
            except OSError:
                pass
            finally:
                s.close()
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}) before listening:\n{tail(self.log)}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"server not listening after {timeout}s:\n{tail(self.log)}")
            time.sleep(0.005)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if self._out is not None:
            self._out.close()
            self._out = None


# --------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------


def client_context(store: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.path.join(store, "localca", "root.pem"))
    ctx.check_hostname = True
    return ctx


def handshake(ctx: ssl.SSLContext, port: int, name: str, timeout: float = 60.0) -> float:
    """One TLS handshake with SNI = name (certificate verified); returns its seconds (TCP connect excluded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        tls = ctx.wrap_socket(sock, server_hostname=name)
        elapsed = time.perf_counter() - started
        tls.close()
        return elapsed
    finally:
        sock.close()


def bulk_handshakes(ctx: ssl.SSLContext, port: int, names: list[str], parallel: int) -> tuple[float, list[str]]:
    """One handshake per name, `parallel` at a time; returns (seconds, failures)."""
    failures: list[str] = []
    lock = threading.Lock()

    def one(name: str) -> None:
        try:
            handshake(ctx, port, name)
        except (OSError, ssl.SSLError) as e:
            with lock:
                failures.append(f"{name}: {e}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, names))
    return time.perf_counter() - started, failures


# --------------------------------------------------------------------------
# one store size
# --------------------------------------------------------------------------


def timed_start(store: str, cache_size: int, log: str, ctx: ssl.SSLContext, probe: str) -> tuple[Server, float, float]:
    """Start a server; return it with (seconds to TCP accept, seconds to a first completed TLS handshake)."""
    server = Server(store, cache_size, log)
    started = time.perf_counter()
    try:
        accept = server.start()
        handshake(ctx, server.https, probe)
    except BaseException:
        server.stop()
        raise
    ready = time.perf_counter() - started
    return server, accept, ready


def measure(n: int, store: str, work: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    print(f"\n== N = {n:,} ==", flush=True)
    gen_s, written = generate_store(store, n)
    print(f"store generated in {gen_s:.1f} s ({written:,} files written, {n - written:,} reused)", flush=True)

    bulk_target = args.handshakes if n >= args.handshakes else 0
    # Disjoint names: one probe per start, the first-handshake sample, then
    # the bulk. On the last start, probe + sample + bulk = bulk_target names.
    need = args.starts + args.samples + max(0, bulk_target - 1 - args.samples)
    if need > n:
        raise SystemExit(f"N = {n} is too small for {args.starts} starts and {args.samples} samples")
    order = [name_for(i) for i in rng.sample(range(n), need)]
    probes = order[: args.starts]
    sample = order[args.starts : args.starts + args.samples]
    bulk = order[args.starts + args.samples :]

    log = os.path.join(work, f"tenantedge-{n}.log")
    ctx = client_context(store)
    r: dict[str, Any] = {"n": n, "store": store, "generation_s": gen_s, "files_generated": written}
    accept_s: list[float] = []
    ready_s: list[float] = []
    server: Server | None = None
    try:
        for k in range(args.starts):
            server, accept, ready = timed_start(store, args.cache_size, log, ctx, probes[k])
            accept_s.append(accept)
            ready_s.append(ready)
            print(f"start {k + 1}: port accepts after {accept:.3f} s, first handshake done after {ready:.3f} s",
                  flush=True)
            if k < args.starts - 1:
                server.stop()
                server = None
        assert server is not None
        r["server_argv"] = server.argv
        time.sleep(args.settle)
        r["rss_after_start_mib"] = rss_mib(server.pid)

        first = [handshake(ctx, server.https, name) for name in sample]
        cached = [handshake(ctx, server.https, name) for _ in range(3) for name in sample]
        r["first_handshake_ms"] = [x * 1000 for x in first]
        r["cached_handshake_ms"] = [x * 1000 for x in cached]
        print(f"first handshake median {median(r['first_handshake_ms']):.2f} ms, "
              f"cached {median(r['cached_handshake_ms']):.2f} ms, RSS {r['rss_after_start_mib']:.1f} MiB",
              flush=True)

        if bulk_target:
            secs, failures = bulk_handshakes(ctx, server.https, bulk, args.parallel)
            time.sleep(args.settle)
            r["bulk"] = {"names": len(bulk), "distinct_names_handshaken": 1 + len(sample) + len(bulk),
                         "seconds": secs, "per_second": len(bulk) / secs, "parallel": args.parallel,
                         "failures": len(failures), "failure_examples": failures[:5]}
            r["rss_after_handshakes_mib"] = rss_mib(server.pid)
            print(f"{len(bulk):,} more distinct names in {secs:.1f} s ({len(bulk) / secs:.0f}/s, "
                  f"{args.parallel} threads, {len(failures)} failures); "
                  f"RSS {r['rss_after_handshakes_mib']:.1f} MiB", flush=True)
            for f in failures[:5]:
                print("  failed:", f)
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(log)}")
    finally:
        if server is not None:
            server.stop()
    r["startup_accept_s"] = accept_s
    r["startup_first_handshake_s"] = ready_s
    r["log_tail"] = tail(log, 2000)
    return r


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary(r: dict[str, Any]) -> dict[str, float | None]:
    return {
        "generation_s": r["generation_s"],
        "startup_s": median(r["startup_accept_s"]),
        "ready_s": median(r["startup_first_handshake_s"]),
        "first_ms": median(r["first_handshake_ms"]),
        "cached_ms": median(r["cached_handshake_ms"]),
        "rss_start_mib": r["rss_after_start_mib"],
        "rss_10k_mib": r.get("rss_after_handshakes_mib"),
    }


def print_table(results: list[dict[str, Any]], handshakes: int) -> None:
    head = ("N", "gen s", "start-up s", "start->1st TLS s", "1st stored hs ms", "cached hs ms",
            "RSS start MiB", f"RSS {handshakes // 1000}k hs MiB")
    rows = []
    for r in results:
        s = summary(r)
        rows.append((f"{r['n']:,}", fmt(s["generation_s"], ".1f"), fmt(s["startup_s"], ".3f"),
                     fmt(s["ready_s"], ".3f"), fmt(s["first_ms"], ".2f"), fmt(s["cached_ms"], ".2f"),
                     fmt(s["rss_start_mib"], ".1f"), fmt(s["rss_10k_mib"], ".1f")))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def ratios(results: list[dict[str, Any]]) -> dict[str, float | None]:
    small, large = summary(results[0]), summary(results[-1])
    out: dict[str, float | None] = {}
    for key in ("startup_s", "ready_s", "first_ms", "cached_ms", "rss_start_mib"):
        a, b = small[key], large[key]
        out[key] = (b / a) if a and b is not None else None
    return out


def source_description(rev: str | None) -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", REPO, *argv], capture_output=True, text=True).stdout.strip()

    if rev:
        return f"git revision {rev} ({git('rev-parse', '--short', rev)}), exported"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "tenantedge")
    return f"working tree at {git('rev-parse', '--short', 'HEAD')}" + (
        " with uncommitted changes under tenantedge/" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,50000", help="comma-separated store sizes (default 1000,50000)")
    parser.add_argument("--keep-store", metavar="DIR",
                        help="keep stores in DIR/n<N> and reuse them (generate only missing or stale files)")
    parser.add_argument("--json", metavar="FILE", help="also write every sample to FILE")
    parser.add_argument("--starts", type=int, default=3, help="timed starts per size (default 3)")
    parser.add_argument("--samples", type=int, default=20, help="never-cached names timed per size (default 20)")
    parser.add_argument("--handshakes", type=int, default=10000,
                        help="distinct names handshaken before the second RSS reading, for N >= this (default 10000)")
    parser.add_argument("--cache-size", type=int, default=10000, help="server --cache-size (default 10000)")
    parser.add_argument("--parallel", type=int, default=4, help="client threads for the bulk handshakes (default 4)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds to wait before each RSS reading")
    parser.add_argument("--rev", metavar="REV",
                        help="benchmark this git revision (exported with git archive to a temp dir and put "
                             "first on PYTHONPATH) instead of the working tree")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the name choice")
    args = parser.parse_args()
    sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    if args.cache_size < args.handshakes:
        parser.error("--cache-size must be at least --handshakes (all contexts must stay cached)")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)

    command = shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable,
                          os.path.relpath(os.path.abspath(__file__), REPO), *sys.argv[1:]])
    began = time.perf_counter()
    work = tempfile.mkdtemp(prefix="tenantedge-scale-")
    code = source_description(args.rev)
    if args.rev:
        src = os.path.join(work, "src")
        os.makedirs(src)
        archive = subprocess.run(["git", "-C", REPO, "archive", args.rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        sys.path.insert(0, src)
        SERVER_ENV["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    print(f"code under test: {code}", flush=True)
    base = os.path.abspath(args.keep_store) if args.keep_store else work
    results: list[dict[str, Any]] = []
    try:
        for n in sizes:
            results.append(measure(n, os.path.join(base, f"n{n}"), work, args, rng))
    finally:
        if args.keep_store:
            for name in os.listdir(work):  # keep only the stores, not the logs
                if name.startswith("tenantedge-") and name.endswith(".log"):
                    shutil.copy(os.path.join(work, name), os.path.join(base, name))
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - began

    print()
    print_table(results, args.handshakes)
    if len(results) > 1:
        q = ratios(results)
        a, b = results[0]["n"], results[-1]["n"]
        print(f"\nratio N={b:,} / N={a:,}: start-up {fmt(q['startup_s'], '.2f')}x, "
              f"start->first TLS {fmt(q['ready_s'], '.2f')}x, first stored-name handshake {fmt(q['first_ms'], '.2f')}x, "
              f"cached handshake {fmt(q['cached_ms'], '.2f')}x, RSS after start {fmt(q['rss_start_mib'], '.2f')}x")
    print(f"\ntotal run time {total:.0f} s (seed {seed})")
    print(f"command: {command}")
    print(f"code:    {code}")
    print("server:  " + shlex.join(["twist", "tenantedge", *results[-1]["server_argv"][2:]]).replace(
        results[-1]["store"], "<store>"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "code": code, "seed": seed, "total_s": total, "sizes": sizes,
                       "results": results, "summary": {str(r["n"]): summary(r) for r in results},
                       "ratios": ratios(results) if len(results) > 1 else None}, f, indent=2)
        print(f"wrote {args.json}")
    bad = any(r.get("bulk", {}).get("failures") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
