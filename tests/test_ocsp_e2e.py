"""
OCSP stapling end to end: a private CA whose leaf names a real OCSP
responder on loopback (C{openssl ocsp -index ... -port}), an edge serving
that leaf from its store, and C{openssl s_client -status} reading the
stapled response; then the leaf is revoked in the responder's index, the
refresh sees C{revoked}, and the edge renews (here from its local CA).
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tenantedge.options import Options
from tenantedge.store import atomic_write, ensure_private_directory
from tenantedge.tap import build_edge
from tenantedge.testing import OcspTestCA

from .support.processes import Backend, require_tool, run, terminate

NAME = "stapled.test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _index_line(leaf: Any, revoked: bool) -> str:
    """One line of an C{openssl ca} index for C{leaf}."""
    expiry = leaf.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    serial = format(leaf.serial_number, "X")
    serial = serial if len(serial) % 2 == 0 else "0" + serial
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%y%m%d%H%M%SZ") if revoked else ""
    return f"{'R' if revoked else 'V'}\t{expiry}\t{when}\t{serial}\tunknown\t/CN={NAME}\n"


class _Ended(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


async def _until(check: Any, what: str, seconds: float = 30.0) -> None:
    for _ in range(int(seconds * 10)):
        if check():
            return
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class OcspStaplingTests(TestCase):
    timeout = 120

    async def test_stapled_then_revoked(self) -> None:
        """
        s_client -status shows the responder's good answer stapled; after
        revocation the refresh sees revoked, and the certificate is renewed
        (no staple any more: the new local-CA leaf names no responder).
        """
        openssl = require_tool(self, "openssl")
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        port = _free_port()
        ca = OcspTestCA.create(f"http://127.0.0.1:{port}/")
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
        bundle = ca.issue(NAME, now - 3600, now + 20 * 86400)
        pem = serialization.Encoding.PEM
        paths = {n: os.path.join(work, n) for n in ("ca.pem", "responder.pem", "responder-key.pem", "index.txt")}
        atomic_write(paths["ca.pem"], ca.cert.public_bytes(pem), mode=0o644)
        atomic_write(paths["responder.pem"], ca.responder.public_bytes(pem), mode=0o644)
        atomic_write(paths["responder-key.pem"], ca.responder_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        atomic_write(paths["index.txt"], _index_line(bundle.leaf, False).encode(), mode=0o644)
        store = os.path.join(work, "store")
        ensure_private_directory(store)
        atomic_write(os.path.join(store, NAME + ".pem"), bundle.to_pem())

        responder = _Ended()
        process = reactor.spawnProcess(responder, openssl, [
            openssl, "ocsp", "-index", paths["index.txt"], "-port", str(port), "-CA", paths["ca.pem"],
            "-rsigner", paths["responder.pem"], "-rkey", paths["responder-key.pem"], "-ndays", "1",
        ], env=os.environ.copy())
        self.addCleanup(terminate, process, responder.ended)

        backend = Backend()
        await backend.start()
        self.addCleanup(backend.stop)
        options = Options()
        options.parseOptions([
            "--https", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
            "--admin", "tcp:0:interface=127.0.0.1", "--store", store, "--ca", "internal",
            "--allow-suffix", ".test", "--backend", backend.url,
        ])
        edge = build_edge(options.config, reactor)
        edge.startService()
        self.addCleanup(edge.stopService)
        https = (await edge.listening_ports())["https"].getHost().port
        stapler = edge.on_demand.ocsp

        async def s_client() -> bytes:
            out, err, code = await run(openssl, [
                "s_client", "-connect", f"127.0.0.1:{https}", "-servername", NAME, "-status",
                "-CAfile", paths["ca.pem"],
            ], stdin=b"", timeout=30)
            return out + err

        # The first handshake caches the stored certificate; the response
        # is fetched after it, in the background.
        first = await s_client()
        self.assertIn(f"CN = {NAME}".encode(), first)
        await _until(lambda: stapler.status(NAME) == "good", "a good OCSP response")
        stapled = await s_client()
        self.assertIn(b"OCSP Response Status: successful", stapled)
        self.assertIn(b"Cert Status: good", stapled)
        self.assertEqual(stapler.results["good"], 1)
        self.assertTrue(os.path.exists(os.path.join(store, NAME + ".ocsp")))

        # Revoke it at the responder (which re-reads a changed index).
        atomic_write(paths["index.txt"], _index_line(bundle.leaf, True).encode(), mode=0o644)
        later = os.stat(paths["index.txt"]).st_mtime + 5
        os.utime(paths["index.txt"], (later, later))
        # openssl ocsp checks its index for changes before it waits for the
        # next request, so the request right after the change may still be
        # answered from the old index: refresh until the answer changes.
        for _ in range(3):
            await stapler.refresh(NAME)
            if stapler.results["revoked"]:
                break
        self.assertEqual(stapler.results["revoked"], 1, responder.output)
        pipeline = edge.on_demand.pipeline
        await _until(lambda: pipeline.events["renew:issued"] == 1, "the renewal")
        after = await s_client()
        self.assertIn(b"OCSP response: no response sent", after)
        self.assertIn(b"tenantedge local root", after)
