"""
End-to-end issuance against a real ACME server (Debian's Pebble): the edge
obtains a certificate from Pebble at a never-seen name's first handshake,
over HTTP-01 or TLS-ALPN-01, and curl checks it against Pebble's root.
Under CI=true a missing pebble fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tenantedge.options import Options
from tenantedge.tap import EdgeService, build_edge

from .support.pebble import UNVALIDATABLE, Pebble
from .support.processes import Backend, require_tool, run


class PebbleTestCase(TestCase):
    timeout = 240
    challenge = "http-01"
    pebble_env: dict[str, str] = {}
    validity: int | None = None
    edge_options: tuple[str, ...] = ()

    async def _setUp(self) -> None:
        self.curl = require_tool(self, "curl")
        self.pebble = Pebble(self, self.pebble_env, self.validity)
        await self.pebble.start()
        self.backend = Backend()
        await self.backend.start()
        self.addCleanup(self.backend.stop)
        self.store = os.path.join(os.path.abspath(self.mktemp()), "store")
        self.edge = await self.start_edge(*self.edge_options)
        self.root = await self.pebble.root_pem(os.path.abspath(self.mktemp()))

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    async def start_edge(self, *extra: str) -> EdgeService:
        options = Options()
        options.parseOptions(
            [
                "--https", f"tcp:{self.pebble.tls_port}:interface=127.0.0.1",
                "--http", f"tcp:{self.pebble.http_port}:interface=127.0.0.1",
                "--admin", "tcp:0:interface=127.0.0.1",
                "--store", self.store,
                "--ca", self.pebble.directory_url,
                "--ca-root", self.pebble.ca_root,
                "--email", "ops@saas.test",
                "--challenge", self.challenge,
                "--allow-suffix", ".test",
                "--allow-private-suffix",  # .test is reserved, not a public suffix
                "--backend", self.backend.url,
                *extra,
            ]
        )
        edge = build_edge(options.config, reactor)
        edge.startService()
        self.addCleanup(edge.stopService)
        await edge.listening_ports()
        return edge

    async def fetch(self, host: str, path: str = "/echo", *extra: str) -> tuple[bytes, bytes, int]:
        port = self.pebble.tls_port
        return await run(
            self.curl,
            ["--silent", "--show-error", "--max-time", "120", "--resolve", f"{host}:{port}:127.0.0.1",
             "--cacert", self.root, *extra, f"https://{host}:{port}{path}"],
        )


class HTTP01Tests(PebbleTestCase):
    async def test_first_request_gets_pebble_certificate(self) -> None:
        """
        A never-seen name gets a certificate from Pebble at its first
        handshake, and the request goes through the proxy; curl verifies the
        chain against Pebble's root.
        """
        out, err, code = await self.fetch("shop.acme-corp.test", "/echo/first")
        self.assertEqual(code, 0, err + self.pebble.log[-3000:].encode())
        self.assertEqual(json.loads(out)["path"], "/echo/first")
        self.assertEqual(self.pebble.orders, 1)
        self.assertEqual(self.pebble.new_accounts, 1)
        bundle = await self.edge.on_demand.store.get("shop.acme-corp.test")
        self.assertIn("Pebble", bundle.issuer_name())
        self.assertEqual(len(bundle.chain), 2)
        # The HTTP-01 token was withdrawn when the order ended.
        out, err, code = await run(
            self.curl,
            ["--silent", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: shop.acme-corp.test",
             f"http://127.0.0.1:{self.pebble.http_port}/.well-known/acme-challenge/anything"],
        )
        self.assertEqual(out, b"404")

    async def test_restart_reuses_certificate_and_account(self) -> None:
        """
        After a restart on the same store, the stored certificate is served
        (no new order) and the same ACME account is used.
        """
        out, err, code = await self.fetch("restart.test")
        self.assertEqual(code, 0, err)
        account_file = os.path.join(self.edge.on_demand.acme_issuers[0].accounts.info_path)
        with open(account_file) as f:
            account_url = json.load(f)["url"]
        await self.edge.stopService()
        edge = await self.start_edge()
        out, err, code = await self.fetch("restart.test")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.pebble.orders, 1)
        self.assertEqual(edge.on_demand.pipeline.events["issue:issued"], 0)
        # A new name after the restart orders on the same account, without
        # registering again.
        out, err, code = await self.fetch("second.test")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.pebble.orders, 2)
        self.assertEqual(self.pebble.new_accounts, 1)
        self.assertEqual(edge.on_demand.acme_issuers[0].client.account_url, account_url)

    async def test_concurrent_first_requests_one_order(self) -> None:
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch("burst.test", "/echo", "-o", "/dev/null", "-w", "%{http_code}"))
             for _ in range(50)]
        )
        self.assertEqual([(out, code) for out, _, code in results], [(b"200", 0)] * 50)
        self.assertEqual(self.pebble.orders, 1)

    async def test_unvalidatable_name_fails_fast_and_backs_off(self) -> None:
        """
        A name Pebble cannot validate ends the handshake with an alert, the
        log names the CA's problem, and the next handshakes are refused from
        the backoff without a new order.
        """
        name = f"{UNVALIDATABLE}.test"
        out, err, code = await self.fetch(name)
        self.assertEqual(code, 35, err)
        self.assertEqual(self.pebble.orders, 1)
        self.assertIsNotNone(self.edge.on_demand.backoff.blocked_until(name))
        with open(os.path.join(self.store, "backoff.json")) as f:
            self.assertIn(name, json.load(f))
        for _ in range(3):
            out, err, code = await self.fetch(name)
            self.assertEqual(code, 35, err)
        self.assertEqual(self.pebble.orders, 1)
        # Other names are unaffected.
        out, err, code = await self.fetch("fine.test")
        self.assertEqual(code, 0, err)


class TLSALPN01Tests(PebbleTestCase):
    challenge = "tls-alpn-01"

    async def test_first_request_via_tls_alpn(self) -> None:
        """
        With --challenge tls-alpn-01, Pebble validates on the HTTPS port
        itself (acme-tls/1), and the first request still succeeds.
        """
        out, err, code = await self.fetch("alpn.test", "/echo/alpn")
        self.assertEqual(code, 0, err + self.pebble.log[-3000:].encode())
        self.assertEqual(json.loads(out)["path"], "/echo/alpn")
        self.assertEqual(self.pebble.orders, 1)
        # Pebble's validation handshakes (it validates from several
        # "perspectives") were answered with the challenge certificate.
        self.assertGreaterEqual(self.edge.on_demand.handshakes["acme-tls-challenge"], 1)
        self.assertIsNone(await self.edge.on_demand.tls_alpn.context_for("alpn.test"))

    async def test_concurrent_first_requests_one_order(self) -> None:
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.fetch("burst-alpn.test", "/echo", "-o", "/dev/null", "-w", "%{http_code}"))
             for _ in range(50)]
        )
        self.assertEqual([(out, code) for out, _, code in results], [(b"200", 0)] * 50)
        self.assertEqual(self.pebble.orders, 1)



class ShortLivedRenewalTests(PebbleTestCase):
    """
    Pebble issues 30-second certificates; the renewal service (checking
    every second) renews at a third of the lifetime left, while a client
    keeps connecting, and no request fails.
    """

    validity = 30
    edge_options = ("--renew-check-interval", "1")
    timeout = 120

    async def test_renewed_while_serving(self) -> None:
        out, err, code = await self.fetch("short.test", "/echo")
        self.assertEqual(code, 0, err)
        first = await self.edge.on_demand.store.get("short.test")
        lifetime = first.not_after - first.not_before
        self.assertLessEqual(lifetime, 31)
        served = set()
        deadline = reactor.seconds() + 60
        while reactor.seconds() < deadline:
            out, err, code = await self.fetch("short.test", "/echo", "-w", "%{certs}", "-o", "/dev/null")
            self.assertEqual(code, 0, err)
            served.add(x509.load_pem_x509_certificates(out)[0].serial_number)
            if len(served) >= 2:
                break
            await deferLater(reactor, 0.5, lambda: None)
        self.assertGreaterEqual(len(served), 2, "the renewed certificate was never served")
        self.assertGreaterEqual(self.edge.on_demand.renewal.events["renewed"], 1)
        renewed = await self.edge.on_demand.store.get("short.test")
        self.assertNotEqual(renewed.leaf.serial_number, first.leaf.serial_number)
        self.assertGreaterEqual(self.pebble.orders, 2)


class DNSPrecheckTests(PebbleTestCase):
    """
    --precheck dns against Pebble: the edge asks a twisted.names server on
    a loopback port (answering 127.0.0.1 for every name, as Pebble's own
    does) before ordering.
    """

    async def precheck_edge(self, public_address: str) -> EdgeService:
        from tenantedge.testing import listen_loopback_dns

        udp, tcp = listen_loopback_dns(reactor)
        self.addCleanup(udp.stopListening)
        if tcp is not None:
            self.addCleanup(tcp.stopListening)
        await self.edge.stopService()
        return await self.start_edge(
            "--precheck", "dns", "--public-address", public_address,
            "--precheck-resolver", f"127.0.0.1:{udp.getHost().port}",
        )

    async def test_dns_precheck_failure_spends_zero_orders(self) -> None:
        """
        A name that does not resolve to a --public-address is refused at
        its handshake with an alert, and Pebble counts zero orders.
        """
        edge = await self.precheck_edge("203.0.113.1")
        out, err, code = await self.fetch("elsewhere.test")
        self.assertEqual(code, 35, err)
        self.assertEqual(self.pebble.orders, 0)
        self.assertEqual(edge.on_demand.precheck_results["dns:dns-not-pointing-here"], 1)
        self.assertEqual(edge.on_demand.pipeline.counts("issue"), {"precheck-failed": 1})
        self.assertEqual(edge.on_demand.handshakes["precheck-failed"], 1)
        self.assertIsNotNone(edge.on_demand.backoff.blocked_until("elsewhere.test"))

    async def test_dns_precheck_passes_then_issues(self) -> None:
        """With the address the name resolves to as --public-address, the name is issued."""
        edge = await self.precheck_edge("127.0.0.1")
        out, err, code = await self.fetch("here.test")
        self.assertEqual(code, 0, err + self.pebble.log[-3000:].encode())
        self.assertEqual(self.pebble.orders, 1)
        self.assertEqual(edge.on_demand.precheck_results["dns:ok"], 1)
