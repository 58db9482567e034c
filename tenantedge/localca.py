"""
The local CA issuer (C{--ca internal}): tenantedge's equivalent of Caddy's
C{tls internal}, for development, demos, tests and private networks.

A root key and certificate are created once under the store
(C{<store>/localca/}, both 0600) and reused after restarts; leaves are ECDSA
P-256 with the host name as their only subjectAltName. Signing an ECDSA leaf
costs well under a millisecond, so it runs inline; no thread is needed.
"""

from __future__ import annotations

import datetime
import os
import secrets

from collections.abc import Callable

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .certificates import CertificateBundle, InvalidBundle, common_name, sign_certificate, utc_now
from .interfaces import IIssuer, IssuanceFailed
from .store import StoreError, atomic_write, check_private_file, ensure_private_directory

__all__ = ["LocalCA", "ROOT_NAME_PREFIX", "local_ca_check"]

#: Every local root's common name starts with this, which is how a stored
#: leaf is recognised as the local CA's.
ROOT_NAME_PREFIX = "tenantedge local root"

_ROOT_VALIDITY = datetime.timedelta(days=3650)
_BACKDATE = datetime.timedelta(minutes=5)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@implementer(IIssuer)
@attrs.define
class LocalCA:
    """
    Issues leaf certificates signed by a root kept in C{directory}.

    @ivar directory: where C{root.pem} and C{root-key.pem} live.
    @ivar clock: the time source for validity periods.
    @ivar validity: lifetime of each leaf.
    """

    directory: str
    clock: IReactorTime
    validity: datetime.timedelta = datetime.timedelta(days=7)
    name: str = "internal"
    issued: int = 0
    _root_key: ec.EllipticCurvePrivateKey | None = attrs.field(default=None, init=False)
    _root: x509.Certificate | None = attrs.field(default=None, init=False)
    _log = Logger()

    @property
    def root_path(self) -> str:
        """The root certificate to give to clients (C{curl --cacert}...)."""
        return os.path.join(self.directory, "root.pem")

    @property
    def root_key_path(self) -> str:
        return os.path.join(self.directory, "root-key.pem")

    @property
    def root(self) -> x509.Certificate:
        if self._root is None:
            raise RuntimeError("LocalCA.prepare() has not run")
        return self._root

    def prepare(self) -> None:
        """
        Load the root, creating it on first use.

        @raise StoreError: if the key file is readable by others, or the
            files exist but do not hold a matching key and certificate
            (they are never overwritten: the operator may have handed that
            root to clients).
        """
        ensure_private_directory(self.directory)
        if not os.path.exists(self.root_key_path) and not os.path.exists(self.root_path):
            self._create_root()
        check_private_file(self.root_key_path)
        try:
            with open(self.root_key_path, "rb") as f:
                key_pem = f.read()
            with open(self.root_path, "rb") as f:
                cert_pem = f.read()
            bundle = CertificateBundle.from_pem(key_pem + cert_pem)
        except OSError as e:
            raise StoreError(
                f"cannot read the local CA in {self.directory} ({e.strerror}: {e.filename}); "
                f"restore the file, or move {self.directory} away to create a new root"
            ) from None
        except InvalidBundle as e:
            raise StoreError(
                f"the local CA in {self.directory} is unusable ({e.reason}); "
                f"move {self.directory} away to create a new root"
            ) from None
        if not isinstance(bundle.key, ec.EllipticCurvePrivateKey):
            raise StoreError(f"the local CA key in {self.root_key_path} is not an EC key")
        self._root_key = bundle.key
        self._root = bundle.leaf

    def _create_root(self) -> None:
        key = _new_key()
        now = utc_now(self.clock.seconds())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tenantedge"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"{ROOT_NAME_PREFIX} {secrets.token_hex(4)}"
                ),
            ]
        )
        cert = sign_certificate(
            name,
            key.public_key(),
            now - _BACKDATE,
            now + _ROOT_VALIDITY,
            key,
            extensions=[
                (x509.BasicConstraints(ca=True, path_length=0), True),
                (_key_usage(ca=True), True),
                (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
            ],
        )
        # Key first: if we crash between the two writes, prepare() finds a
        # key without a certificate and refuses, rather than a root whose
        # key is lost.
        atomic_write(
            self.root_key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        atomic_write(self.root_path, cert.public_bytes(serialization.Encoding.PEM))
        self._log.info("created local CA root {path}", path=self.root_path)

    def signed(self, bundle: CertificateBundle) -> bool:
        """Was this leaf signed by the current root?"""
        try:
            bundle.leaf.verify_directly_issued_by(self.root)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        try:
            bundle = self._sign(server_name)
        except Exception as e:
            return fail(IssuanceFailed(server_name, f"local CA could not sign: {e}"))
        self.issued += 1
        return succeed(bundle)

    def _sign(self, server_name: str) -> CertificateBundle:
        root = self.root
        assert self._root_key is not None
        key = _new_key()
        now = utc_now(self.clock.seconds())
        not_after = min(now + self.validity, root.not_valid_after_utc)
        cert = sign_certificate(
            common_name(server_name),
            key.public_key(),
            now - _BACKDATE,
            not_after,
            self._root_key,
            issuer=root.subject,
            dns_names=[server_name],
            extensions=[
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_key_usage(ca=False), True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                (x509.AuthorityKeyIdentifier.from_issuer_public_key(self._root_key.public_key()), False),
            ],
        )
        return CertificateBundle.build(key, [cert])


def local_ca_check(local_ca: LocalCA | None) -> Callable[[CertificateBundle], bool]:
    """
    For L{tenantedge.pipeline.CertificateCheck.accepts}: a stored leaf
    from a local CA is usable only if the local CA is configured and it is
    this root's (after the root was replaced, or when moving from the demo
    to Let's Encrypt on the same store, such leaves are obtained anew).
    Leaves from other CAs are accepted.
    """

    def accepts(bundle: CertificateBundle) -> bool:
        if not bundle.issuer_name().startswith(ROOT_NAME_PREFIX):
            return True
        return local_ca is not None and local_ca.signed(bundle)

    return accepts
