"""
End-to-end tests on loopback: the service built by L{build_edge}, real
sockets on run-time ports, real TLS clients (curl, openssl s_client) and a
real backend HTTP server in its own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tenantedge.options import Options
from tenantedge.tap import EdgeService, build_edge

from .support.processes import Backend, require_tool, run


async def start_edge(
    testcase: TestCase, *extra: str, backend: str, suffix: bool = True
) -> tuple[EdgeService, int, int]:
    """
    Start an edge (local CA) on free loopback ports; stopped at test
    cleanup. With C{suffix}, every name under .test is allowed.
    """
    options = Options()
    options.parseOptions(
        [
            "--https", "tcp:0:interface=127.0.0.1",
            "--http", "tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
            "--store", os.path.join(testcase.mktemp(), "store"),
            "--ca", "internal",
            *(["--allow-suffix", ".test"] if suffix else []),
            "--deny", ".own.test",
            "--backend", backend,
            *extra,
        ]
    )
    edge = build_edge(options.config, reactor)
    edge.startService()
    testcase.addCleanup(edge.stopService)
    ports = await edge.listening_ports()
    return edge, ports["https"].getHost().port, ports["http"].getHost().port


class EdgeTestCase(TestCase):
    timeout = 180

    async def _setUp(self) -> None:
        self.curl = require_tool(self, "curl")
        self.openssl = require_tool(self, "openssl")
        self.backend = Backend()
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.edge, self.https_port, self.http_port = await start_edge(self, backend=self.backend.url)
        self.root = self.edge.on_demand.local_ca.root_path

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    @property
    def issued(self) -> int:
        """Certificates obtained from the issuer chain so far."""
        return self.edge.on_demand.pipeline.events["issue:issued"]

    def curl_args(self, host: str, path: str = "/", *extra: str, port: int | None = None) -> list[str]:
        port = port or self.https_port
        return [
            "--silent", "--show-error", "--max-time", "60",
            "--resolve", f"{host}:{port}:127.0.0.1",
            "--cacert", self.root,
            *extra,
            f"https://{host}:{port}{path}",
        ]

    async def fetch(self, host: str, path: str = "/", *extra: str, port: int | None = None) -> tuple[bytes, bytes, int]:
        return await run(self.curl, self.curl_args(host, path, *extra, port=port))

    async def fetch_json(self, host: str, path: str = "/echo", *extra: str) -> dict:
        out, err, code = await self.fetch(host, path, *extra)
        self.assertEqual(code, 0, err)
        return json.loads(out)


class OnDemandTests(EdgeTestCase):
    async def test_first_request(self) -> None:
        """
        The first request for a never-seen name succeeds on its first
        handshake, through the proxy, with the tenant's Host intact.
        """
        info = await self.fetch_json("tenant-a.test", "/echo/path?q=1")
        headers = dict(info["headers"])
        self.assertEqual(info["path"], "/echo/path?q=1")
        self.assertEqual(headers["host"], f"tenant-a.test:{self.https_port}")
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(headers["x-forwarded-proto"], "https")
        self.assertEqual(self.issued, 1)
        self.assertTrue(os.path.exists(os.path.join(self.edge.on_demand.store.path, "tenant-a.test.pem")))
        # The second request is served from the cache: no new issuance.
        await self.fetch_json("tenant-a.test")
        self.assertEqual(self.issued, 1)

    async def test_concurrent_first_requests(self) -> None:
        """
        Fifty concurrent first requests for one new name all succeed, and
        the issuer ran once.
        """
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch("burst.test", "/echo", "-o", "/dev/null", "-w", "%{http_code}"))
             for _ in range(50)]
        )
        self.assertEqual([(out, code) for out, _, code in results], [(b"200", 0)] * 50)
        self.assertEqual(self.issued, 1)

    async def test_http2(self) -> None:
        out, err, code = await self.fetch("h2.test", "/echo", "--http2", "-o", "/dev/null", "-w", "%{http_version}")
        self.assertEqual((out, code), (b"2", 0), err)
        info = await self.fetch_json("h2.test", "/echo/h2", "--http2")
        self.assertEqual(dict(info["headers"])["host"], f"h2.test:{self.https_port}")

    async def test_no_sni_alert(self) -> None:
        """openssl s_client without SNI gets an unrecognized_name alert."""
        out, err, code = await run(
            self.openssl, ["s_client", "-connect", f"127.0.0.1:{self.https_port}", "-noservername"], timeout=20
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"alert number 112", out + err)
        self.assertEqual(self.issued, 0)

    async def s_client(self, name: str, *extra: str) -> bytes:
        """One HTTP/1.0 request through openssl s_client; its whole output."""
        out, err, code = await run(
            self.openssl,
            ["s_client", "-connect", f"127.0.0.1:{self.https_port}", "-servername", name, "-CAfile", self.root,
             "-ign_eof", *extra],
            stdin=f"GET /echo HTTP/1.0\r\nHost: {name}\r\n\r\n".encode(), timeout=30,
        )
        return out + err

    async def test_refusal_closes_at_once_over_tls(self) -> None:
        """
        A connection the edge decides to close (413, a head over the limit)
        is closed as soon as the answer is out, over TLS too: s_client,
        waiting for the server to close, ends well within its time limit.
        """
        # No body limit by default: this edge has one.
        edge, port, _ = await start_edge(self, "--max-body-size", "1M", backend=self.backend.url)
        root = edge.on_demand.local_ca.root_path
        for head in (
            "POST /echo HTTP/1.1\r\nHost: close.test\r\nContent-Length: 999999999999\r\n\r\n",
            "GET /echo HTTP/1.1\r\nHost: close.test\r\nX-Big: " + "a" * 40000 + "\r\n\r\n",
        ):
            out, err, code = await run(
                self.openssl,
                ["s_client", "-connect", f"127.0.0.1:{port}", "-servername", "close.test",
                 "-CAfile", root, "-ign_eof", "-quiet"],
                stdin=head.encode(), timeout=15,
            )
            self.assertRegex(out, rb"HTTP/1.1 (413|431) ")
            self.assertNotEqual(code, -1)  # not killed at the time limit: the server closed

    async def test_session_resumption(self) -> None:
        """
        openssl s_client -sess_out, then -sess_in: the second handshake is
        Reused, over TLS 1.3 and TLS 1.2; the session offered for another
        name is refused (the connection is cut before any request).
        """
        for version in ("-tls1_3", "-tls1_2"):
            session = os.path.join(self.mktemp())
            first = await self.s_client("resume.test", version, "-sess_out", session)
            self.assertIn(b"New, TLSv1.", first)
            second = await self.s_client("resume.test", version, "-sess_in", session)
            self.assertIn(b"Reused, TLSv1.", second, version)
            self.assertIn(b"HTTP/1.1 200", second)
            other = await self.s_client("other-resume.test", version, "-sess_in", session)
            self.assertNotIn(b"HTTP/1.1 200", other, version)
        self.assertEqual(self.edge.on_demand.handshakes["resumed"], 2)
        self.assertEqual(self.edge.on_demand.handshakes["resumed-other-name"], 2)

    async def test_denied_name(self) -> None:
        out, err, code = await self.fetch("www.own.test")
        self.assertEqual(code, 35, err)  # curl: TLS handshake failed
        self.assertIn(b"unrecognized name", err)
        out, err, code = await self.fetch("not-a-tenant.example")
        self.assertEqual(code, 35, err)
        self.assertEqual(self.issued, 0)

    async def test_restart_reuses_store(self) -> None:
        """A new edge on the same store serves the stored certificate."""
        await self.fetch_json("keep.test")
        options_store = self.edge.on_demand.store.path
        await self.edge.stopService()
        options = Options()
        options.parseOptions(["--https", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
                              "--store", options_store, "--allow-suffix", ".test", "--backend", self.backend.url,
                              "--ca", "internal"])
        edge = build_edge(options.config, reactor)
        edge.startService()
        self.addCleanup(edge.stopService)
        ports = await edge.listening_ports()
        out, err, code = await self.fetch("keep.test", "/echo", port=ports["https"].getHost().port)
        self.assertEqual(code, 0, err)
        self.assertEqual(edge.on_demand.pipeline.events["issue:issued"], 0)
        self.assertEqual(edge.on_demand.resolver.events["store-hit"], 1)

    async def test_store_gauges_from_start_up(self) -> None:
        """
        After a restart the stored-certificate gauges exist at once (the
        first renewal walk runs at start-up, without jitter), not after the
        first jittered walk up to 72 minutes later.
        """
        await self.fetch_json("gauge.test")
        store = self.edge.on_demand.store.path
        await self.edge.stopService()
        options = Options()
        options.parseOptions(["--https", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
                              "--admin", "tcp:0:interface=127.0.0.1", "--store", store, "--allow-suffix", ".test",
                              "--backend", self.backend.url, "--ca", "internal"])
        self.edge = build_edge(options.config, reactor)
        self.edge.startService()
        self.addCleanup(self.edge.stopService)
        for _ in range(100):
            if await self.metric("tenantedge_certificate_soonest_expiry_timestamp_seconds"):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(await self.metric("tenantedge_certificates_stored"), 1)
        bundle = await self.edge.on_demand.store.get("gauge.test")
        self.assertEqual(await self.metric("tenantedge_certificate_soonest_expiry_timestamp_seconds"), bundle.not_after)

    async def metric(self, name: str, labels: str = "") -> float:
        ports = await self.edge.listening_ports()
        out, err, code = await run(self.curl, ["--silent", f"http://127.0.0.1:{ports['admin'].getHost().port}/metrics"])
        self.assertEqual(code, 0, err)
        for line in out.decode().splitlines():
            if line.startswith(name + (("{" + labels + "}") if labels else "") + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def test_admin_index(self) -> None:
        """GET / on the admin port is its index, not a 404."""
        ports = await self.edge.listening_ports()
        out, err, code = await run(
            self.curl, ["--silent", "--fail", f"http://127.0.0.1:{ports['admin'].getHost().port}/"]
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"GET /metrics", out)

    async def test_banner_names_every_listener(self) -> None:
        """The start-up log names each listener, where it listens and what it is for."""
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        edge, https, http = await start_edge(self, "--demo", backend=self.backend.url)
        listening = {e["name"]: e for e in events if str(e.get("log_format", "")).startswith("listening:")}
        self.assertEqual(sorted(listening), ["admin", "http", "https"])
        self.assertEqual(listening["https"]["address"], f"127.0.0.1:{https}")
        self.assertIn("metrics", listening["admin"]["purpose"])
        self.assertTrue(any("demo backend" in str(e.get("log_format", "")) for e in events))
        self.assertTrue(any(str(e.get("rules", "")).startswith("names under .test") for e in events))

    async def test_metrics(self) -> None:
        """A scrape of /metrics shows the counters moving."""
        self.assertEqual(await self.metric("tenantedge_certificate_lookups_total", 'result="issued"'), 0)
        await self.fetch_json("metrics.test")
        await self.fetch_json("metrics.test")
        await self.fetch("www.own.test")
        self.assertEqual(await self.metric("tenantedge_certificate_lookups_total", 'result="issued"'), 1)
        self.assertEqual(await self.metric("tenantedge_handshakes_total", 'outcome="cache-hit"'), 1)
        self.assertEqual(await self.metric("tenantedge_refusals_total", 'reason="deny-list"'), 1)
        self.assertEqual(
            await self.metric("tenantedge_issuance_seconds_count", 'purpose="issue",result="issued"'), 1
        )
        self.assertEqual(await self.metric("tenantedge_issuance_total", 'purpose="issue",result="issued"'), 1)
        self.assertEqual(await self.metric("tenantedge_proxied_request_seconds_count", 'status_class="2xx"'), 2)
        self.assertEqual(await self.metric("tenantedge_certificates_cached"), 1)

    async def test_issuer_fallback(self) -> None:
        """
        With --ca given twice, a CA that cannot be reached falls back to the
        next one for the same name, within the same first handshake.
        """
        # start_edge already passes --ca internal; put an unreachable ACME CA first.
        options = Options()
        options.parseOptions([
            "--https", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1", "--admin", "tcp:0:interface=127.0.0.1",
            "--store", os.path.join(self.mktemp(), "store"), "--allow-suffix", ".test",
            "--backend", self.backend.url, "--ca", "https://localhost:1/directory", "--ca", "internal",
            "--allow-private-suffix",
        ])
        edge = build_edge(options.config, reactor)
        edge.startService()
        self.addCleanup(edge.stopService)
        ports = await edge.listening_ports()
        self.root = edge.on_demand.local_ca.root_path
        out, err, code = await self.fetch("fallback.test", "/echo", port=ports["https"].getHost().port)
        self.assertEqual(code, 0, err)
        self.assertEqual(edge.on_demand.resolver.events["issued"], 1)
        self.assertEqual(edge.on_demand.local_ca.issued, 1)

    async def test_port_80_redirect(self) -> None:
        out, err, code = await run(
            self.curl,
            ["--silent", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
             f"http://127.0.0.1:{self.http_port}/a/b?c=d", "-H", "Host: tenant-a.test"],
        )
        self.assertEqual(out, f"308 https://tenant-a.test:{self.https_port}/a/b?c=d".encode())
        out, err, code = await run(
            self.curl,
            ["--silent", "-o", "/dev/null", "-w", "%{http_code}",
             f"http://127.0.0.1:{self.http_port}/.well-known/acme-challenge/unknown", "-H", "Host: tenant-a.test"],
        )
        self.assertEqual(out, b"404")


class ProxyTests(EdgeTestCase):
    async def test_misdirected(self) -> None:
        """A Host other than the name the certificate was chosen for is 421."""
        out, err, code = await self.fetch("tenant-a.test", "/echo", "-H", "Host: tenant-b.test",
                                          "-o", "/dev/null", "-w", "%{http_code}")
        self.assertEqual(out, b"421")

    async def test_spoofed_headers_replaced(self) -> None:
        """
        Client-supplied forwarding headers and Next.js's internal header
        never reach the backend; neither do headers named in Connection
        (HTTP/1.1, where Connection exists).
        """
        info = await self.fetch_json(
            "tenant-a.test", "/echo", "--http1.1",
            "-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Forwarded-Host: evil.test",
            "-H", "x-middleware-subrequest: middleware", "-H", "Forwarded: for=6.6.6.6",
            "-H", "Connection: X-Hop", "-H", "X-Hop: 1",
        )
        headers = info["headers"]
        self.assertIn(["x-forwarded-for", "127.0.0.1"], headers)
        self.assertNotIn("6.6.6.6", json.dumps(headers))
        names = [name for name, _ in headers]
        for gone in ("x-middleware-subrequest", "forwarded", "x-hop"):
            self.assertNotIn(gone, names)
        self.assertEqual(names.count("x-forwarded-for"), 1)

    async def test_set_cookies(self) -> None:
        out, err, code = await self.fetch("tenant-a.test", "/cookies", "-D", "-")
        self.assertEqual(code, 0, err)
        cookies = [line.lower() for line in out.split(b"\r\n") if line.lower().startswith(b"set-cookie:")]
        self.assertEqual(cookies, [b"set-cookie: a=1; path=/", b"set-cookie: b=2; httponly"])

    async def test_large_download(self) -> None:
        """Bodies of any size arrive whole, over HTTP/2 and HTTP/1.1."""
        for path, n, version in (
            ("/big?n=", 30_000_000, "--http2"),
            ("/big?n=", 30_000_000, "--http1.1"),
            ("/chunked?n=", 5_000_000, "--http1.1"),
        ):
            out, err, code = await self.fetch("tenant-a.test", f"{path}{n}", version)
            self.assertEqual(code, 0, err)
            self.assertEqual(len(out), n)
            if path == "/big?n=":
                self.assertEqual(out, (bytes(range(256)) * 256 * (n // 65536 + 1))[:n])

    async def test_large_upload(self) -> None:
        body_file = os.path.join(self.mktemp())
        body = os.urandom(3_000_000)
        with open(body_file, "wb") as f:
            f.write(body)
        for version in ("--http2", "--http1.1"):
            info = await self.fetch_json("tenant-a.test", "/echo", "--data-binary", f"@{body_file}", version)
            self.assertEqual(info["method"], "POST")
            self.assertEqual(info["body_length"], len(body))
            self.assertEqual(info["body_sha256"], hashlib.sha256(body).hexdigest())

    async def test_truncated_backend_response_is_cut(self) -> None:
        """
        A backend that breaks off mid-body: the client sees an error, never
        a complete-looking response, over HTTP/1.1 and HTTP/2.
        """
        for version in ("--http1.1", "--http2"):
            out, err, code = await self.fetch("tenant-a.test", "/truncate", version)
            self.assertNotEqual(code, 0, version)
            self.assertLess(len(out), 100000)

    async def test_length_and_type_passed_unchanged(self) -> None:
        """
        The backend's Content-Length reaches the client, and no
        Content-Type is invented for a body that had none.
        """
        for version in ("--http1.1", "--http2"):
            out, err, code = await self.fetch("tenant-a.test", "/untyped", version, "-D", "-")
            self.assertEqual(code, 0, err)
            head = out.split(b"\r\n\r\n")[0].lower()
            self.assertIn(b"content-length: 7", head)
            self.assertNotIn(b"content-type", head)
            self.assertNotIn(b"transfer-encoding", head)

    async def test_backend_hop_by_hop_dropped(self) -> None:
        """A header the backend names in Connection is not forwarded."""
        for version in ("--http1.1", "--http2"):
            out, err, code = await self.fetch("tenant-a.test", "/hop", version, "-D", "-")
            self.assertEqual(code, 0, err)
            self.assertNotIn(b"x-internal", out.lower())
            self.assertNotIn(b"secret", out)

    async def test_body_size_limit(self) -> None:
        """
        A body over --max-body-size is refused with 413 before it is
        forwarded (over HTTP/2 on its own stream: the others on the
        connection go on); smaller bodies pass.
        """
        edge, port, _ = await start_edge(self, "--max-body-size", "1M", backend=self.backend.url)
        self.root = edge.on_demand.local_ca.root_path
        big = os.path.abspath(self.mktemp())
        with open(big, "wb") as f:
            f.write(b"x" * (2 * 1024 * 1024))
        out, err, code = await self.fetch("upload.test", "/echo", "--http1.1", "--data-binary", f"@{big}",
                                          "-o", "/dev/null", "-w", "%{http_code}", port=port)
        self.assertEqual(out, b"413")
        # A chunked body streams to the backend until it crosses the limit,
        # then 413 (the backend reads the whole body before it answers).
        out, err, code = await self.fetch("upload.test", "/echo", "--http1.1", "-H", "Transfer-Encoding: chunked",
                                          "--data-binary", f"@{big}", "-o", "/dev/null", "-w", "%{http_code}",
                                          port=port)
        self.assertEqual(out, b"413")
        # HTTP/2: 413 on that stream only; a GET multiplexed beside it on
        # the same connection gets its answer.
        url = f"https://upload.test:{port}/echo"
        common = ["--silent", "--show-error", "--max-time", "60", "--resolve", f"upload.test:{port}:127.0.0.1",
                  "--cacert", self.root, "--http2", "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n"]
        for extra in ((), ("-H", "Content-Length:")):  # with a declared length, then without one
            out, err, code = await run(self.curl, [
                "--parallel", *common, *extra, "--data-binary", f"@{big}", url,
                "--next", *common, url,
            ])
            self.assertEqual(code, 0, err)
            answers = sorted(out.split())
            self.assertEqual(answers[2:], [b"200", b"413"], out)
            self.assertEqual(sum(int(n) for n in answers[:2]), 1, out)  # one connection for both
        info = json.loads((await self.fetch("upload.test", "/echo", "--data-binary", "small", port=port))[0])
        self.assertEqual(info["body_length"], 5)

    async def test_status_passed(self) -> None:
        for status in (201, 304, 404, 503):
            out, err, code = await self.fetch("tenant-a.test", f"/status/{status}", "-o", "/dev/null", "-w", "%{http_code}")
            self.assertEqual(out, str(status).encode())

    async def test_streamed(self) -> None:
        """
        The response is passed on as it arrives: the client has the first
        chunk while the backend still holds the rest.
        """
        first = defer.Deferred()

        def seen(out: bytes) -> None:
            if b"first" in out and not first.called:
                first.callback(None)

        done = run(self.curl, self.curl_args("tenant-a.test", "/drip", "--no-buffer"), on_stdout=seen)
        first.addTimeout(30, reactor)
        await first
        self.assertFalse(done.called)
        out, err, code = await run(self.curl, ["--silent", f"{self.backend.url}/release"])
        self.assertEqual(out, b"released")
        out, err, code = await done
        self.assertEqual(out, b"first\nsecond\n")

    async def test_pooled_connections(self) -> None:
        """Twenty requests reuse backend connections instead of opening twenty."""
        for _ in range(20):
            await self.fetch_json("tenant-a.test")
        out, err, code = await run(self.curl, ["--silent", f"{self.backend.url}/connections"])
        self.assertLessEqual(int(out), 3)

    async def test_backend_slow(self) -> None:
        edge, https_port, _ = await start_edge(self, "--backend-timeout", "1", backend=self.backend.url)
        self.root = edge.on_demand.local_ca.root_path
        out, err, code = await self.fetch("slow.test", "/slow?s=3", "-o", "/dev/null", "-w", "%{http_code}", port=https_port)
        self.assertEqual(out, b"504")

    async def test_access_log(self) -> None:
        """--access-log writes one combined-format line per request."""
        log = os.path.abspath(self.mktemp())
        edge, https_port, _ = await start_edge(self, "--access-log", log, backend=self.backend.url)
        self.root = edge.on_demand.local_ca.root_path
        await self.fetch("logged.test", "/echo/logged?x=1", "-o", "/dev/null", port=https_port)
        await self.fetch("logged.test", "/echo/h1", "--http1.1", "-o", "/dev/null", port=https_port)
        await edge.stopService()
        with open(log) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn('"GET /echo/logged?x=1 HTTP/2" 200', lines[0])
        self.assertIn('"GET /echo/h1 HTTP/1.1" 200', lines[1])

    async def test_backend_down(self) -> None:
        edge, https_port, _ = await start_edge(self, backend="http://127.0.0.1:1")
        self.root = edge.on_demand.local_ca.root_path
        out, err, code = await self.fetch("down.test", "/", "-D", "-", port=https_port)
        self.assertIn(b" 502 ", out.split(b"\r\n")[0])
        self.assertIn(b"Bad Gateway", out)


def established(port: int) -> int:
    """TCP connections to C{port} on this machine that are open both ways (the kernel's count)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


class _HoldingClient(protocol.ProcessProtocol):
    """A client script that prints one JSON line, then waits for its stdin to close."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.report: defer.Deferred[Any] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.report.called:
            self.report.callback(json.loads(self.out.split(b"\n")[0]))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        if not self.report.called:
            self.report.errback(RuntimeError(f"client ended: {self.err.decode(errors='replace')[-2000:]}"))
        self.ended.callback(None)


class AttackTests(EdgeTestCase):
    async def test_slowed_rapid_reset(self) -> None:
        """
        One HTTP/2 connection keeps 3 streams open and opens and resets 60
        more, each 50 ms after opening it, all to a backend route that
        takes 30 s: the backend never has more connections open than the
        client has live streams (each reset abandons its backend request;
        before, 700 stayed open until the backend timeout).
        """
        live = 3
        client = _HoldingClient()
        process = reactor.spawnProcess(
            client, sys.executable,
            [sys.executable, os.path.join(os.path.dirname(__file__), "support", "h2reset.py"), "reset.test",
             str(self.https_port), self.root, "/slow?s=30", str(live), "60", "0.05"],
            env=os.environ.copy(),
        )

        def stop() -> defer.Deferred[None]:
            if not client.ended.called:
                process.closeStdin()
            return client.ended

        self.addCleanup(stop)
        report = await client.report.addTimeout(120, reactor)
        self.assertFalse(report["goaway"])  # 60 resets in 3 s stays under the cap
        assert self.backend.port is not None
        open_now = established(self.backend.port)
        # The live streams' requests are still at the backend; nothing else is.
        self.assertEqual(open_now, live)


class _RecordingBackend(protocol.Protocol):
    """A raw backend that keeps each request's bytes whole, trailers included, and answers 200."""

    def connectionMade(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep or not body.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in b"\r\n" + body:
            return
        self.factory.requests.append(self.data)  # type: ignore[attr-defined]
        self.data = b""
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nreceived")  # type: ignore[union-attr]


class TrailerTests(TestCase):
    """
    A request body's trailer fields, from a real HTTP/2 client (trailing
    HEADERS) and a real HTTP/1.1 one (chunked trailers) over TLS, reach a
    real backend socket at the end of the chunked body, less the fields a
    trailer must not carry.
    """

    timeout = 120

    async def test_trailers_reach_the_backend(self) -> None:
        factory = protocol.Factory.forProtocol(_RecordingBackend)
        factory.requests = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        edge, https, _ = await start_edge(self, backend=f"http://127.0.0.1:{port.getHost().port}")
        root = edge.on_demand.local_ca.root_path
        client = os.path.join(os.path.dirname(__file__), "support", "trailersclient.py")
        for mode in ("h2", "h1"):
            out, err, code = await run(sys.executable, [client, mode, "trailers.test", str(https), root])
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out), {"status": "200", "body": "received"}, mode)
            sent = factory.requests[-1]  # type: ignore[attr-defined]
            self.assertIn(b"Transfer-Encoding: chunked\r\n", sent, mode)
            self.assertTrue(sent.endswith(b"\r\n0\r\nx-checksum: ab12\r\ngrpc-status: 0\r\n\r\n"), (mode, sent))
            self.assertNotIn(b"evil.test", sent, mode)
        self.assertEqual(len(factory.requests), 2)  # type: ignore[attr-defined]


class SeveralBackendsTests(EdgeTestCase):
    """
    Three real backends (two on loopback ports, one on a UNIX socket)
    behind one edge: requests spread over them; one stopped mid-test is
    ejected while every request keeps succeeding, and serves again once
    restarted.
    """

    async def _setUp(self) -> None:
        import shutil
        import tempfile

        self.curl = require_tool(self, "curl")
        sockets = tempfile.mkdtemp(prefix="te-")  # short: a UNIX socket path has a length limit
        self.addCleanup(shutil.rmtree, sockets, True)
        self.backends = [Backend(name="one"), Backend(name="two"), Backend(unix=os.path.join(sockets, "3.sock"), name="three")]
        for backend in self.backends:
            await backend.start()
            self.addCleanup(backend.stop)
        extra = [arg for backend in self.backends[1:] for arg in ("--backend", backend.url)]
        self.edge, self.https_port, _ = await start_edge(
            self, *extra, "--backend-health-path", "/status/204", "--backend-health-interval", "0.5s",
            backend=self.backends[0].url,
        )
        self.admin_port = (await self.edge.listening_ports())["admin"].getHost().port
        self.root = self.edge.on_demand.local_ca.root_path

    async def who(self, *extra: str) -> str:
        out, err, code = await self.fetch("pool.test", "/whoami", "--fail", *extra)
        self.assertEqual(code, 0, err)
        return out.decode()

    async def up(self, url: str) -> str:
        out, err, code = await run(self.curl, ["--silent", f"http://127.0.0.1:{self.admin_port}/metrics"])
        for line in out.decode().splitlines():
            if line.startswith("tenantedge_backend_up{") and f'backend="{url}"' in line:
                return line.rsplit(" ", 1)[1]
        self.fail(f"no tenantedge_backend_up for {url} in {out!r}")

    async def until(self, check: Any, what: str) -> None:
        for _ in range(100):
            if await check():
                return
            await deferLater(reactor, 0.1, lambda: None)
        self.fail(f"never: {what}")

    async def test_balanced_ejected_and_back(self) -> None:
        seen = {await self.who("--http1.1") for _ in range(6)} | {await self.who("--http2") for _ in range(6)}
        self.assertEqual(seen, {"one", "two", "three"})
        one = self.backends[0]
        await one.stop()
        # Every request still succeeds, on the two others.
        answers = [await self.who("--http1.1") for _ in range(6)] + [await self.who("--http2") for _ in range(6)]
        self.assertEqual(set(answers), {"two", "three"})
        self.assertEqual(await self.up(one.url), "0.0")
        self.assertEqual(await self.up(self.backends[2].url), "1.0")
        await one.start()  # the same port again

        async def back() -> bool:
            return await self.up(one.url) == "1.0"

        await self.until(back, "the restarted backend back in rotation")
        seen = {await self.who("--http1.1") for _ in range(6)}
        self.assertIn("one", seen)
