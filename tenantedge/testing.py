"""
Fakes for tests of tenantedge and of applications that embed it.

Each fake implements the same interface as the real thing and passes the
same contract tests (see C{tests/test_store.py}), so a test that passes
against a fake means something for the real component.
"""

from __future__ import annotations

import datetime
from collections import Counter

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from .certificates import CertificateBundle
from .hostnames import InvalidHostname, normalize
from .interfaces import ICertificateStore, IIssuer, IssuanceFailed

__all__ = ["MemoryStore", "ControlledIssuer", "CountingIssuer", "make_bundle"]


def make_bundle(
    server_name: str,
    not_before: float = 0.0,
    not_after: float = 2.0**31,
    names: list[str] | None = None,
) -> CertificateBundle:
    """
    A self-signed ECDSA bundle for C{server_name}, valid between two POSIX
    times (by default: from 1970 to 2038, so any test clock is inside it).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    utc = datetime.timezone.utc
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(not_before, utc))
        .not_valid_after(datetime.datetime.fromtimestamp(not_after, utc))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in (names if names is not None else [server_name])]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CertificateBundle.build(key, [cert])


@implementer(ICertificateStore)
@attrs.define
class MemoryStore:
    """
    An in-memory L{ICertificateStore}; C{archive} keeps deleted bundles, as
    the directory store's C{archive/} folder does.
    """

    bundles: dict[str, CertificateBundle] = attrs.field(factory=dict)
    archive: list[tuple[str, CertificateBundle]] = attrs.field(factory=list)
    calls: Counter[str] = attrs.field(factory=Counter)
    #: When set, L{store} fails with this error (a full disk, say).
    fail_writes: Exception | None = None

    def _check(self, server_name: str) -> None:
        try:
            ok = normalize(server_name) == server_name
        except InvalidHostname:
            ok = False
        if not ok:
            raise ValueError("refusing an invalid name")

    def get(self, server_name: str) -> Deferred[CertificateBundle]:
        self.calls["get"] += 1
        try:
            return succeed(self.bundles[server_name])
        except KeyError as e:
            return fail(e)

    def store(self, server_name: str, bundle: CertificateBundle) -> Deferred[None]:
        self.calls["store"] += 1
        self._check(server_name)
        if self.fail_writes is not None:
            return fail(self.fail_writes)
        self.bundles[server_name] = bundle
        return succeed(None)

    def delete(self, server_name: str) -> Deferred[None]:
        self.calls["delete"] += 1
        try:
            bundle = self.bundles.pop(server_name)
        except KeyError as e:
            return fail(e)
        self.archive.append((server_name, bundle))
        return succeed(None)

    def names(self) -> Deferred[list[str]]:
        return succeed(list(self.bundles))


@implementer(IIssuer)
@attrs.define
class ControlledIssuer:
    """
    An issuer whose orders the test completes by hand: L{issue} returns a
    Deferred that stays pending until L{complete} or L{fail_order}.

    @ivar requests: the names asked for, in order.
    """

    name: str = "controlled"
    requests: list[str] = attrs.field(factory=list)
    _pending: dict[str, list[Deferred[CertificateBundle]]] = attrs.field(factory=dict)

    def issue(self, server_name: str) -> Deferred[CertificateBundle]:
        self.requests.append(server_name)
        d: Deferred[CertificateBundle] = Deferred()
        self._pending.setdefault(server_name, []).append(d)
        return d

    def complete(self, server_name: str, bundle: CertificateBundle) -> None:
        for d in self._pending.pop(server_name):
            d.callback(bundle)

    def fail_order(self, server_name: str, detail: str = "CA said no") -> None:
        for d in self._pending.pop(server_name):
            d.errback(IssuanceFailed(server_name, detail))


@implementer(IIssuer)
@attrs.define
class CountingIssuer:
    """
    Wraps a real issuer and counts its orders per name: end-to-end tests
    use it to prove that fifty concurrent handshakes caused one issuance.
    """

    wrapped: IIssuer
    counts: Counter[str] = attrs.field(factory=Counter)

    @property
    def name(self) -> str:
        return str(self.wrapped.name)

    def issue(self, server_name: str) -> Deferred[CertificateBundle]:
        self.counts[server_name] += 1
        return self.wrapped.issue(server_name)  # type: ignore[no-any-return]
