"""
Tests for L{tenantedge.localca.LocalCA}.
"""

from __future__ import annotations

import datetime
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.interfaces import IIssuer
from tenantedge.localca import LocalCA, local_ca_check
from tenantedge.testing import make_bundle
from tenantedge.store import StoreError


class LocalCATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.dir = os.path.join(self.mktemp(), "localca")
        self.ca = LocalCA(self.dir, self.clock, validity=datetime.timedelta(days=3))
        self.ca.prepare()

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IIssuer, self.ca))

    def test_root_created_once(self) -> None:
        """
        The root is created on first use with private modes and reused by
        the next start.
        """
        for path in (self.ca.root_path, self.ca.root_key_path):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = LocalCA(self.dir, self.clock)
        again.prepare()
        self.assertEqual(again.root, self.ca.root)

    def test_leaf(self) -> None:
        """
        Leaves are ECDSA P-256, name the host as their only SAN, are valid
        for the configured time and chain to the root.
        """
        bundle = self.successResultOf(self.ca.issue("shop.acme-corp.test"))
        self.assertIsInstance(bundle.key, ec.EllipticCurvePrivateKey)
        self.assertEqual(bundle.key.curve.name, "secp256r1")
        self.assertEqual(bundle.dns_names(), ["shop.acme-corp.test"])
        self.assertEqual(bundle.not_after - self.clock.seconds(), 3 * 86400)
        self.assertTrue(bundle.is_valid_at(self.clock.seconds()))
        bundle.leaf.verify_directly_issued_by(self.ca.root)
        eku = bundle.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, list(eku))
        self.assertEqual(self.ca.issued, 1)

    def test_readable_key_refused(self) -> None:
        os.chmod(self.ca.root_key_path, 0o644)
        e = self.assertRaises(StoreError, LocalCA(self.dir, self.clock).prepare)
        self.assertIn("chmod 600", str(e))

    def test_lost_certificate_refused(self) -> None:
        """
        A key without its certificate is refused, not silently replaced
        (clients may trust the old root).
        """
        os.unlink(self.ca.root_path)
        e = self.assertRaises(StoreError, LocalCA(self.dir, self.clock).prepare)
        self.assertIn("move", str(e))
        self.assertTrue(os.path.exists(self.ca.root_key_path))


class LocalCACheckTests(SynchronousTestCase):
    def test_accepts(self) -> None:
        """
        Leaves of the current local root are accepted; leaves of a replaced
        root, or of a local CA that is no longer configured, are not;
        leaves of other CAs are.
        """
        clock = Clock()
        clock.advance(1_800_000_000)
        ca = LocalCA(os.path.join(self.mktemp(), "a"), clock)
        ca.prepare()
        old = LocalCA(os.path.join(self.mktemp(), "b"), clock)
        old.prepare()
        mine = self.successResultOf(ca.issue("x.test"))
        theirs = self.successResultOf(old.issue("x.test"))
        accepts = local_ca_check(ca)
        self.assertTrue(accepts(mine))
        self.assertFalse(accepts(theirs))
        self.assertTrue(accepts(make_bundle("x.test")))
        self.assertFalse(local_ca_check(None)(mine))

    def test_long_name(self) -> None:
        """A valid name longer than X.509's 64-character CN limit still gets a certificate."""
        clock = Clock()
        clock.advance(1_800_000_000)
        ca = LocalCA(os.path.join(self.mktemp(), "a"), clock)
        ca.prepare()
        name = ("a" * 60) + ".tenant.example.test"
        bundle = self.successResultOf(ca.issue(name))
        self.assertEqual(bundle.dns_names(), [name])
