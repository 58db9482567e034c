"""
Fakes for tests of tenantedge and of applications that embed it.

Each fake implements the same interface as the real thing and passes the
same contract tests (see C{tests/test_store.py}), so a test that passes
against a fake means something for the real component.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from zope.interface import implementer

from .certificates import CertificateBundle, common_name, sign_certificate
from .hostnames import InvalidHostname, normalize
from .interfaces import ICertificateStore, IDomainPolicy, IIssuer, IOcspStore, IssuanceFailed
from .pipeline import CertificateCheck, IssuancePipeline
from .resolver import CertificateResolver
from .store import atomic_write

__all__ = [
    "MemoryStore",
    "ControlledIssuer",
    "CountingIssuer",
    "make_bundle",
    "memory_resolver",
    "write_https_material",
    "LoopbackResolver",
    "listen_loopback_dns",
    "UNRESOLVABLE",
    "OcspTestCA",
    "FakeOcspResponder",
    "memory_authority",
    "caa_record",
    "listen_dns",
]


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
    utc = datetime.timezone.utc
    cert = sign_certificate(
        common_name(server_name),
        key.public_key(),
        datetime.datetime.fromtimestamp(not_before, utc),
        datetime.datetime.fromtimestamp(not_after, utc),
        key,
        dns_names=names if names is not None else [server_name],
    )
    return CertificateBundle.build(key, [cert])


@implementer(ICertificateStore, IOcspStore)
@attrs.define(slots=False)  # tests may replace a method to inject a fault
class MemoryStore:
    """
    An in-memory L{ICertificateStore} (and L{IOcspStore}); C{archive} keeps
    deleted bundles, as the directory store's C{archive/} folder does.
    """

    bundles: dict[str, CertificateBundle] = attrs.field(factory=dict)
    archive: list[tuple[str, CertificateBundle]] = attrs.field(factory=list)
    calls: Counter[str] = attrs.field(factory=Counter)
    #: When set, L{store} fails with this error (a full disk, say).
    fail_writes: Exception | None = None
    ocsp: dict[str, bytes] = attrs.field(factory=dict)

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
        self.ocsp.pop(server_name, None)
        return succeed(None)

    def get_ocsp(self, server_name: str) -> Deferred[bytes]:
        try:
            return succeed(self.ocsp[server_name])
        except KeyError as e:
            return fail(e)

    def store_ocsp(self, server_name: str, der: bytes) -> Deferred[None]:
        self._check(server_name)
        self.ocsp[server_name] = der
        return succeed(None)

    def names(self) -> Deferred[list[str]]:
        return succeed(list(self.bundles))

    def changed(self, server_names: Any) -> Deferred[list[str]]:
        """One process owns a memory store: nothing changes behind its back."""
        return succeed([])


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
    replaced: list[CertificateBundle | None] = attrs.field(factory=list)
    _pending: dict[str, list[Deferred[CertificateBundle]]] = attrs.field(factory=dict)

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        self.requests.append(server_name)
        self.replaced.append(replaces)
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

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        self.counts[server_name] += 1
        return self.wrapped.issue(server_name, replaces=replaces)  # type: ignore[no-any-return]


def memory_resolver(
    store: ICertificateStore,
    policy: IDomainPolicy,
    issuer: IIssuer,
    clock: IReactorTime,
    accepts: Callable[[CertificateBundle], bool] = lambda bundle: True,
    **kwargs: Any,
) -> CertificateResolver:
    """
    A resolver over its own L{IssuancePipeline} (in-process lock), for
    tests that drive the issuer by hand; C{kwargs} go to the resolver.
    """
    check = CertificateCheck(clock, accepts)
    pipeline = IssuancePipeline(store, issuer, clock, check)
    return CertificateResolver(store, policy, pipeline, clock, check, **kwargs)


# -- helpers for tests against a real ACME server (Pebble) -------------------


def write_https_material(directory: str, ca_common_name: str = "tenantedge test CA") -> tuple[str, str, str]:
    """
    A throwaway CA and a C{localhost}/127.0.0.1 certificate it signed, for a
    test server's own HTTPS (Pebble's API). Writes C{ca.pem}, C{cert.pem}
    and C{key.pem} in C{directory}; returns their paths in that order. Give
    C{ca.pem} to clients (C{--ca-root}).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = common_name(ca_common_name)
    ca = sign_certificate(
        ca_name, ca_key.public_key(), now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2), ca_key,
        extensions=[(x509.BasicConstraints(ca=True, path_length=0), True)],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_certificate(
        common_name("localhost"), key.public_key(), now - datetime.timedelta(hours=1),
        now + datetime.timedelta(days=2), ca_key, issuer=ca_name,
        extensions=[(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)],
    )
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    atomic_write(paths[0], ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write(paths[1], cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    atomic_write(paths[2], key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths  # type: ignore[return-value]


#: Names containing this label get NXDOMAIN from L{LoopbackResolver}, so a
#: CA cannot validate them.
UNRESOLVABLE = "unvalidatable"


class LoopbackResolver:
    """
    A C{twisted.names} resolver for an ACME server's validation authority:
    every A query answers 127.0.0.1 (where the edge under test listens),
    other types answer nothing, names containing L{UNRESOLVABLE} are
    NXDOMAIN.
    """

    def query(self, query: Any, timeout: Any = None) -> Deferred[Any]:
        from twisted.names import dns, error

        name = query.name.name.decode("ascii", "replace")
        if UNRESOLVABLE in name:
            return fail(error.DomainError(name))
        if query.type == dns.A:
            answer = dns.RRHeader(name=query.name.name, type=dns.A, payload=dns.Record_A("127.0.0.1", ttl=0), ttl=0)
            return succeed(([answer], [], []))
        return succeed(([], [], []))


def listen_loopback_dns(reactor: Any) -> tuple[Any, Any]:
    """
    Serve L{LoopbackResolver} on 127.0.0.1 (UDP, and TCP on the same port
    when free); returns the two listening ports (TCP may be None).
    """
    from twisted.names import dns, server

    factory = server.DNSServerFactory(clients=[LoopbackResolver()])
    factory.noisy = False
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
    try:
        tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
    except Exception:
        tcp = None
    return udp, tcp


# -- OCSP: a private CA whose leaves name a responder, and a fake responder --


@attrs.define
class OcspTestCA:
    """
    A private CA for OCSP tests: an issuer, a delegated responder
    certificate (OCSP-signing EKU) and leaves whose AIA names C{url}.
    Build with L{OcspTestCA.create}.
    """

    url: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    responder_key: ec.EllipticCurvePrivateKey
    responder: x509.Certificate

    @classmethod
    def create(cls, url: str, now: float | None = None, common: str = "tenantedge OCSP test CA") -> OcspTestCA:
        from cryptography.x509.oid import ExtendedKeyUsageOID

        utc = datetime.timezone.utc
        start = datetime.datetime.fromtimestamp(now, utc) if now is not None else datetime.datetime.now(utc)
        start -= datetime.timedelta(hours=1)
        end = start + datetime.timedelta(days=30)
        key = ec.generate_private_key(ec.SECP256R1())
        name = common_name(common)
        cert = sign_certificate(name, key.public_key(), start, end, key, extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        ])
        responder_key = ec.generate_private_key(ec.SECP256R1())
        responder = sign_certificate(
            common_name(common + " responder"), responder_key.public_key(), start, end, key, issuer=name,
            extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)],
        )
        return cls(url, key, cert, responder_key, responder)

    def issue(self, server_name: str, not_before: float, not_after: float, ocsp: bool = True) -> CertificateBundle:
        """A leaf for C{server_name} (its AIA names the responder unless C{ocsp} is false), chain included."""
        from cryptography.x509.oid import AuthorityInformationAccessOID

        key = ec.generate_private_key(ec.SECP256R1())
        utc = datetime.timezone.utc
        extensions: list[tuple[x509.ExtensionType, bool]] = []
        if ocsp:
            extensions.append((x509.AuthorityInformationAccess([x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(self.url))]), False))
        leaf = sign_certificate(
            common_name(server_name), key.public_key(), datetime.datetime.fromtimestamp(not_before, utc),
            datetime.datetime.fromtimestamp(not_after, utc), self.key, issuer=self.cert.subject,
            dns_names=[server_name], extensions=extensions,
        )
        return CertificateBundle.build(key, [leaf, self.cert])

    def response(
        self, leaf: x509.Certificate, status: str, this_update: float, next_update: float | None,
        delegated: bool = True,
    ) -> bytes:
        """A DER OCSP response about C{leaf} ("good", "revoked", "unknown")."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509 import ocsp

        utc = datetime.timezone.utc
        cert_status = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
                       "unknown": ocsp.OCSPCertStatus.UNKNOWN}[status]
        revoked_at = datetime.datetime.fromtimestamp(this_update, utc) if status == "revoked" else None
        builder = ocsp.OCSPResponseBuilder().add_response(
            leaf, self.cert, hashes.SHA1(), cert_status, datetime.datetime.fromtimestamp(this_update, utc),
            datetime.datetime.fromtimestamp(next_update, utc) if next_update is not None else None,
            revoked_at, None,
        )
        if delegated:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self.responder).certificates(
                [self.responder])
            key = self.responder_key
        else:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.NAME, self.cert)
            key = self.key
        response = builder.sign(key, hashes.SHA256())
        return response.public_bytes(serialization.Encoding.DER)


class FakeOcspResponder(Resource):
    """
    A twisted.web resource answering OCSP POSTs for an L{OcspTestCA}:
    C{statuses[serial]} (default C{"good"}), valid for C{lifetime} seconds
    from the clock's now; C{code} other than 200 answers that HTTP status.
    Serve it with C{treq.testing.StubTreq(responder)}.

    @ivar requests: serial numbers asked about, in order.
    """

    isLeaf = True

    def __init__(self, ca: OcspTestCA, clock: IReactorTime, lifetime: float = 86400.0) -> None:
        super().__init__()
        self.ca = ca
        self.clock = clock
        self.lifetime = lifetime
        self.statuses: dict[int, str] = {}
        self.code = 200
        self.requests: list[int] = []
        self.leaves: dict[int, x509.Certificate] = {}

    def add(self, leaf: x509.Certificate, status: str = "good") -> None:
        self.leaves[leaf.serial_number] = leaf
        self.statuses[leaf.serial_number] = status

    def render(self, request: Any) -> bytes:
        from cryptography.x509 import ocsp

        asked = ocsp.load_der_ocsp_request(request.content.read())
        self.requests.append(asked.serial_number)
        if self.code != 200:
            request.setResponseCode(self.code)
            return b"no"
        request.setHeader(b"Content-Type", b"application/ocsp-response")
        now = self.clock.seconds()
        return self.ca.response(self.leaves[asked.serial_number], self.statuses[asked.serial_number],
                                now, now + self.lifetime)


def caa_record(tag: str, value: str, flags: int = 0, ttl: int = 60) -> Any:
    """
    A CAA record (RFC 8659) for L{memory_authority}: twisted.names has no
    class for the type, so its wire RDATA in an C{UnknownRecord} whose
    C{TYPE} is 257, which an authority can serve.
    """
    from twisted.names import dns

    class CAARecord(dns.UnknownRecord):
        TYPE = 257  # type: ignore[assignment]

    data = bytes([flags, len(tag)]) + tag.encode("ascii") + value.encode("utf-8")
    return CAARecord(data, ttl=ttl)


def memory_authority(zone: str, records: dict[str, list[Any]]) -> Any:
    """
    A C{twisted.names} authority for C{zone} held in memory: C{records}
    maps names (C{"shop.example.test"}) to record payloads
    (C{dns.Record_A("127.0.0.1")}, C{dns.Record_CNAME(b"edge.saas.test")},
    L{caa_record}). Names under the zone without records are NXDOMAIN.
    """
    from twisted.names import authority, dns

    class MemoryAuthority(authority.FileAuthority):
        def loadFile(self, filename: Any) -> None:
            soa = dns.Record_SOA(mname=b"ns." + zone.encode(), rname=b"root." + zone.encode(), serial=1,
                                 refresh=60, retry=60, expire=60, minimum=0, ttl=0)
            self.soa = (zone.encode(), soa)  # type: ignore[assignment]
            self.records = {name.lower().encode(): list(rs) for name, rs in records.items()}  # type: ignore[assignment]

    return MemoryAuthority(None)


def listen_dns(reactor: Any, resolver: Any) -> Any:
    """
    Serve a resolver (an authority from L{memory_authority}) on an
    ephemeral UDP port of 127.0.0.1 with C{twisted.names.server}; returns
    the listening port (C{getHost().port}, C{stopListening()}).
    """
    from twisted.names import dns, server

    factory = server.DNSServerFactory(authorities=[resolver])
    factory.noisy = False
    return reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
