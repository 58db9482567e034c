"""
Certificate bundles: a private key, a leaf certificate and its chain, as one
value that can be parsed from and written to txacme's C{<name>.pem} format,
checked for consistency, and turned into a ready OpenSSL context.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion

__all__ = [
    "CertificateBundle",
    "InvalidBundle",
    "HTTP_PROTOCOLS",
    "make_server_context",
    "sign_certificate",
    "common_name",
]

#: ALPN protocols the HTTPS listener offers, in our order of preference.
HTTP_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1")

_KEY_BLOCK = re.compile(
    rb"-----BEGIN (?:EC |RSA )?PRIVATE KEY-----\r?\n.+?-----END (?:EC |RSA )?PRIVATE KEY-----\r?\n?",
    re.DOTALL,
)


class InvalidBundle(ValueError):
    """
    Bytes that should hold a key, a leaf certificate and its chain do not.

    @ivar reason: what is wrong, safe to log (never includes key material).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _public_bytes(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@attrs.frozen
class CertificateBundle:
    """
    A private key with its leaf certificate and chain.

    Build one with L{CertificateBundle.from_pem} or L{CertificateBundle.build};
    both check that the key matches the leaf, so a bundle in hand is always
    servable (though perhaps expired: see L{is_valid_at}).

    @ivar key: the private key.
    @ivar chain: the leaf certificate first, then the intermediates.
    """

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...]

    @classmethod
    def build(
        cls,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        chain: Sequence[x509.Certificate],
    ) -> CertificateBundle:
        """
        Make a bundle from parsed objects, checking that they belong together.

        @raise InvalidBundle: if the chain is empty or the key does not match
            the leaf.
        """
        if not chain:
            raise InvalidBundle("no certificate")
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise InvalidBundle("unsupported private key type")
        if _public_bytes(key.public_key()) != _public_bytes(chain[0].public_key()):
            raise InvalidBundle("private key does not match the leaf certificate")
        return cls(key, tuple(chain))

    @classmethod
    def from_pem(cls, data: bytes) -> CertificateBundle:
        """
        Parse txacme's format: a PEM private key and PEM certificates, leaf
        first, in one file (the key may come before or after them).

        @raise InvalidBundle: if anything is missing, unparseable or
            inconsistent.
        """
        keys = _KEY_BLOCK.findall(data)
        if len(keys) != 1:
            raise InvalidBundle(f"expected one private key, found {len(keys)}")
        try:
            key = serialization.load_pem_private_key(keys[0], password=None)
        except (ValueError, TypeError):
            raise InvalidBundle("unparseable private key") from None
        try:
            certs = x509.load_pem_x509_certificates(_KEY_BLOCK.sub(b"", data))
        except ValueError:
            raise InvalidBundle("unparseable or missing certificate") from None
        return cls.build(key, certs)  # type: ignore[arg-type]

    def to_pem(self) -> bytes:
        """
        Serialise in txacme's format: key, leaf, chain.
        """
        key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> float:
        """The leaf's notBefore as a POSIX timestamp."""
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        """The leaf's notAfter as a POSIX timestamp."""
        return self.leaf.not_valid_after_utc.timestamp()

    def is_valid_at(self, when: float) -> bool:
        """
        Is the leaf inside its validity period at POSIX time C{when}?

        An expired certificate is never served: the resolver treats it as
        missing and obtains a new one.
        """
        return self.not_before <= when < self.not_after

    def dns_names(self) -> list[str]:
        """The leaf's DNS subjectAltNames."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return []
        return san.value.get_values_for_type(x509.DNSName)

    def issuer_name(self) -> str:
        """The leaf issuer's common name (or full RFC 4514 name)."""
        cns = self.leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if cns:
            return str(cns[0].value)
        return self.leaf.issuer.rfc4514_string()


def make_server_context(
    bundle: CertificateBundle, protocols: Sequence[bytes] = HTTP_PROTOCOLS
) -> SSL.Context:
    """
    Build a ready server context for one bundle: TLS 1.2 minimum,
    Twisted's vetted cipher list, ALPN, no compression, single-use ECDH keys.

    Building one costs a few hundred microseconds, so the resolver caches
    them; handshakes only ever pick a cached context.
    """
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(bundle.key),
        certificate=crypto.X509.from_cryptography(bundle.leaf),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in bundle.chain[1:]],
        acceptableProtocols=list(protocols),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    return options.getContext()


def sign_certificate(
    subject: x509.Name,
    public_key: Any,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: x509.Name | None = None,
    dns_names: Sequence[str] = (),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """
    One place that builds certificates (local CA root and leaves, TLS-ALPN
    challenge certificates, test certificates): random serial, SHA-256,
    the DNS names as subjectAltName, then any further (extension,
    critical) pairs. Self-signed when C{issuer} is None.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def common_name(value: str) -> x509.Name:
    """
    An X.509 name with just a common name, or an empty name when the value
    is longer than the 64 characters X.509 allows a CN (a valid host name
    may have 253): the subjectAltName carries the name either way.
    """
    if len(value) > 64:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


def utc_now(seconds: float) -> datetime.datetime:
    """A clock's C{seconds()} as an aware UTC datetime."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
