"""
OCSP stapling: each served certificate that names an OCSP responder gets a
fresh, validated response, fetched in the background and stapled to the
handshakes whose client asks for the certificate status.

Where it matters: certificates from CAs that still run OCSP responders
(ZeroSSL, Google Trust Services, most private CAs). Let's Encrypt dropped
OCSP in 2025; its certificates carry no responder URL, and a certificate
without one costs nothing here: no request, no timer, no log line.

The life of one response (L{OcspStapler}):

  - the resolver tells the stapler what it caches (L{OcspStapler.remembered})
    and drops (L{OcspStapler.forgotten}); nothing runs inside a handshake;
  - a stored response (C{<store>/<name>.ocsp}, or the C{ocsp} field of the
    Redis hash) is used if it is still valid for this very certificate;
    else the responder is asked (HTTP POST, RFC 6960 appendix A), a few
    requests at a time, each under one deadline;
  - a response is used only if it is signed by the issuer or by a
    responder certificate the issuer delegated (OCSP-signing EKU), is
    about this certificate, its C{thisUpdate} is not in the future and
    its C{nextUpdate} is present and in the future;
  - it is refreshed at about half-way between C{thisUpdate} and
    C{nextUpdate} (plus jitter), retried with backoff on failure, and
    dropped at C{nextUpdate} if no newer one came: a lapsed response is
    never stapled;
  - only a C{good} answer is stapled. C{revoked} is logged once and a
    renewal is asked for through the renewal service (the same pipeline,
    policy check and issuer chain as any renewal), as Caddy does.

Fetches are counted by result (C{good}, C{revoked}, C{unknown}: the
responder does not know the certificate; C{failed}: no usable answer, a
timeout, an HTTP error or a non-successful OCSP status; C{invalid}: an
answer that failed validation), for C{tenantedge_ocsp_fetches_total}.
"""

from __future__ import annotations

import datetime
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import treq
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .certificates import CertificateBundle
from .contexts import TenantTLS
from .interfaces import ICacheObserver, IOcspStore
from .timeouts import describe_error, with_deadline

__all__ = [
    "OcspStapler",
    "OcspResult",
    "InvalidOcspResponse",
    "responder_url",
    "build_request",
    "validate_response",
    "RESULTS",
]

#: Every fetch result, each shown from zero in the metrics.
RESULTS = ("good", "revoked", "unknown", "failed", "invalid")

#: An OCSP response is a few KiB at most; anything larger is not one.
MAX_RESPONSE = 64 * 1024

#: Clock skew tolerated on C{thisUpdate} (OpenSSL's default for
#: C{OCSP_check_validity}).
CLOCK_SKEW = 300.0


class InvalidOcspResponse(Exception):
    """
    A response that must not be stapled.

    @ivar reason: what is wrong, for logs.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class OcspResult:
    """
    A validated OCSP response for one certificate.

    @ivar der: the whole response as received (what is stapled).
    @ivar status: C{"good"}, C{"revoked"} or C{"unknown"}.
    @ivar this_update: POSIX time.
    @ivar next_update: POSIX time; never stapled after it.
    """

    der: bytes
    status: str
    this_update: float
    next_update: float

    def refresh_at(self, jitter: float) -> float:
        """
        When to ask for the next one: half-way through the validity
        window, plus up to a fifth of it more as C{jitter} goes from 0 to
        1 (so that a fleet does not ask all at once); always well before
        C{next_update}.
        """
        window = self.next_update - self.this_update
        return self.this_update + window * (0.5 + 0.2 * min(max(jitter, 0.0), 1.0))


def responder_url(certificate: x509.Certificate) -> str | None:
    """
    The first HTTP OCSP responder URL of the certificate's Authority
    Information Access extension, or None (no AIA, no OCSP entry, or only
    non-HTTP ones).
    """
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        return None
    for description in aia.value:
        if description.access_method != AuthorityInformationAccessOID.OCSP:
            continue
        location = description.access_location
        if isinstance(location, x509.UniformResourceIdentifier):
            url = str(location.value)
            if url.lower().startswith(("http://", "https://")):
                return url
    return None


def build_request(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """
    The DER OCSP request for one certificate: SHA-1 cert id (what RFC 5019
    responders, and OpenSSL's, expect), no nonce (responders built for
    scale, as CAs' are, ignore nonces and serve cached responses).
    """
    builder = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def _key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of the subjectPublicKey bits (the OCSP responder key hash)."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _verify_signature(signer: x509.Certificate, response: ocsp.OCSPResponse) -> None:
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    data = response.tbs_response_bytes
    signature = response.signature
    if isinstance(key, rsa.RSAPublicKey):
        if algorithm is None:
            raise InvalidOcspResponse("no signature hash algorithm")
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if algorithm is None:
            raise InvalidOcspResponse("no signature hash algorithm")
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(signature, data)
    else:
        raise InvalidOcspResponse("unsupported responder key type")


def _names_signer(response: ocsp.OCSPResponse, certificate: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return bool(response.responder_name == certificate.subject)
    return response.responder_key_hash == _key_hash(certificate)


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> x509.Certificate:
    """The certificate whose key must have signed the response."""
    if _names_signer(response, issuer):
        return issuer
    for candidate in response.certificates:
        if not _names_signer(response, candidate):
            continue
        try:
            candidate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidOcspResponse("the responder certificate was not issued by the certificate's issuer")
        try:
            usage = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise InvalidOcspResponse("the responder certificate has no OCSP-signing extended key usage")
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
            raise InvalidOcspResponse("the responder certificate has no OCSP-signing extended key usage")
        if not candidate.not_valid_before_utc.timestamp() <= now < candidate.not_valid_after_utc.timestamp():
            raise InvalidOcspResponse("the responder certificate is outside its validity period")
        return candidate
    raise InvalidOcspResponse("signed by neither the issuer nor a responder certificate it issued")


def _single(response: ocsp.OCSPResponse, certificate: x509.Certificate, issuer: x509.Certificate) -> Any:
    """The single response about this certificate (matched on the whole cert id)."""
    for single in response.responses:
        if single.serial_number != certificate.serial_number:
            continue
        expected = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, single.hash_algorithm).build()
        if (single.issuer_name_hash, single.issuer_key_hash) == (expected.issuer_name_hash, expected.issuer_key_hash):
            return single
    raise InvalidOcspResponse("the response is not about this certificate")


def validate_response(
    der: bytes, certificate: x509.Certificate, issuer: x509.Certificate, now: float
) -> OcspResult:
    """
    Parse and check a DER OCSP response for C{certificate}.

    @raise InvalidOcspResponse: unparseable, not successful (the reason
        starts with C{"responder status"}), badly signed, about another
        certificate, or outside its validity window.
    """
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise InvalidOcspResponse("unparseable OCSP response") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise InvalidOcspResponse(f"responder status {response.response_status.name.lower()}")
    signer = _signer(response, issuer, now)
    try:
        _verify_signature(signer, response)
    except InvalidSignature:
        raise InvalidOcspResponse("bad signature") from None
    single = _single(response, certificate, issuer)
    this_update = single.this_update_utc.timestamp()
    if this_update > now + CLOCK_SKEW:
        raise InvalidOcspResponse("thisUpdate is in the future")
    if single.next_update_utc is None:
        raise InvalidOcspResponse("no nextUpdate (such a response could be replayed for ever)")
    next_update = single.next_update_utc.timestamp()
    if next_update <= now:
        raise InvalidOcspResponse("nextUpdate has passed")
    status = {
        ocsp.OCSPCertStatus.GOOD: "good",
        ocsp.OCSPCertStatus.REVOKED: "revoked",
        ocsp.OCSPCertStatus.UNKNOWN: "unknown",
    }[single.certificate_status]
    return OcspResult(der, status, this_update, next_update)


@attrs.define(eq=False, repr=False)
class _Tracked:
    """One served certificate with a responder URL, and its OCSP state."""

    name: str
    bundle: CertificateBundle
    issuer: x509.Certificate
    url: str
    tls: TenantTLS
    result: OcspResult | None = None
    failures: int = 0
    revoked_logged: bool = False
    refresh: IDelayedCall | None = None
    lapse: IDelayedCall | None = None
    busy: bool = False
    dropped: bool = False

    def __repr__(self) -> str:
        return f"<OCSP state of {self.name} serial {self.bundle.leaf.serial_number:x}>"

    def cancel(self) -> None:
        for call in (self.refresh, self.lapse):
            if call is not None and call.active():
                call.cancel()
        self.refresh = self.lapse = None


@attrs.define(eq=False)
@implementer(ICacheObserver)
class OcspStapler(Service):
    """
    Keeps an OCSP response stapled for every cached certificate that names
    a responder; see the module docstring.

    @ivar store: the certificate store; if it provides L{IOcspStore},
        responses are kept there too.
    @ivar http: a treq C{HTTPClient} (C{StubTreq} in tests).
    @ivar clock: the reactor.
    @ivar renew: asked to renew a revoked certificate:
        C{renew(name, bundle)} (L{tenantedge.renewal.RenewalService.renew},
        which never fails).
    @ivar timeout: one deadline for a whole request (connect, headers, body).
    @ivar concurrency: requests to responders at once.
    @ivar retry_min: first retry after a failed fetch (doubling after each).
    @ivar retry_max: longest wait between retries.
    @ivar random: jitter source (0 to 1).
    @ivar results: fetches by result (see L{RESULTS}).
    """

    store: Any
    http: Any
    clock: IReactorTime
    renew: Callable[[str, CertificateBundle], Deferred[Any]]
    timeout: float = 10.0
    concurrency: int = 4
    retry_min: float = 60.0
    retry_max: float = 3600.0
    random: Callable[[], float] = random.random
    results: Counter[str] = attrs.field(factory=Counter, init=False)
    _tracked: dict[str, _Tracked] = attrs.field(factory=dict, init=False)
    _slots: DeferredSemaphore = attrs.field(init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._slots = DeferredSemaphore(self.concurrency)

    # -- what the resolver tells us -----------------------------------------

    def remembered(self, server_name: str, bundle: CertificateBundle, tls: TenantTLS) -> None:
        """
        The resolver cached C{tls} for C{bundle}. Cheap and synchronous: a
        certificate without a responder URL stops at one extension lookup;
        any I/O starts on a later reactor turn.
        """
        current = self._tracked.get(server_name)
        if current is not None and current.bundle.leaf == bundle.leaf:
            # The same certificate again (a reload): carry the staple over.
            current.tls = tls
            self._apply(current)
            return
        self.forgotten(server_name)
        url = responder_url(bundle.leaf)
        if url is None or len(bundle.chain) < 2:
            return
        entry = _Tracked(server_name, bundle, bundle.chain[1], url, tls)
        self._tracked[server_name] = entry
        if self.running:
            self._schedule(entry, 0)

    def forgotten(self, server_name: str) -> None:
        """The resolver dropped the name: stop refreshing its response."""
        entry = self._tracked.pop(server_name, None)
        if entry is not None:
            entry.dropped = True
            entry.cancel()

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for entry in self._tracked.values():
            self._schedule(entry, 0)

    def stopService(self) -> None:
        super().stopService()
        for entry in self._tracked.values():
            entry.cancel()

    # -- introspection (metrics, admin, tests) -------------------------------

    def stapled_count(self) -> int:
        """How many certificates have a response stapled right now."""
        return sum(1 for e in self._tracked.values() if e.tls.ocsp.der)

    def tracked_names(self) -> list[str]:
        """Names whose certificate names a responder."""
        return list(self._tracked)

    def status(self, server_name: str) -> str | None:
        """The last validated status for a name, or None."""
        entry = self._tracked.get(server_name)
        return entry.result.status if entry is not None and entry.result is not None else None

    def refresh(self, server_name: str) -> Deferred[None]:
        """Fetch a name's response now (the admin API, tests)."""
        entry = self._tracked.get(server_name)
        if entry is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        if entry.refresh is not None and entry.refresh.active():
            entry.refresh.cancel()
        entry.refresh = None
        return Deferred.fromCoroutine(self._update(entry, use_stored=False))

    # -- the work -------------------------------------------------------------

    def _schedule(self, entry: _Tracked, delay: float) -> None:
        if entry.refresh is not None and entry.refresh.active():
            entry.refresh.cancel()
        entry.refresh = self.clock.callLater(max(delay, 0.0), self._fire, entry)

    def _fire(self, entry: _Tracked) -> None:
        entry.refresh = None
        Deferred.fromCoroutine(self._update(entry, use_stored=True))

    async def _update(self, entry: _Tracked, use_stored: bool) -> None:
        """
        One refresh of one entry. Never fails: every error is counted and
        logged, and the next attempt is scheduled.
        """
        if entry.busy or entry.dropped:
            return
        entry.busy = True
        try:
            await self._update_once(entry, use_stored)
        except Exception:
            self._log.failure("OCSP refresh for {host} failed", host=entry.name)
            self._retry(entry)
        finally:
            entry.busy = False

    async def _update_once(self, entry: _Tracked, use_stored: bool) -> None:
        if use_stored:
            stored = await self._stored(entry)
            if entry.dropped:
                return  # forgotten while the store answered: no timer, no request
            if stored is not None and stored.refresh_at(self.random()) > self.clock.seconds():
                # Ours from before a restart, or a peer's (another worker,
                # a fleet node): fresh enough, no request.
                self._adopt(entry, stored)
                return
            if stored is not None and (entry.result is None or entry.result.next_update < stored.next_update):
                # Due for a refresh but still valid: staple it meanwhile,
                # so a responder that is down after a restart costs nothing
                # until the response itself lapses.
                entry.result = stored
                self._apply(entry)
        result = await self._fetch(entry)
        if entry.dropped:
            return
        if result is None:
            self._retry(entry)
            return
        self._adopt(entry, result)
        if result.status != "unknown" and IOcspStore.providedBy(self.store):
            try:
                await self.store.store_ocsp(entry.name, result.der)
            except Exception as e:
                self._log.warn("could not store the OCSP response for {host}: {error}",
                               host=entry.name, error=str(e))
        if result.status == "revoked":
            await self._revoked(entry)

    async def _stored(self, entry: _Tracked) -> OcspResult | None:
        if not IOcspStore.providedBy(self.store):
            return None
        try:
            der = await self.store.get_ocsp(entry.name)
        except KeyError:
            return None
        except Exception as e:
            self._log.warn("could not read the stored OCSP response for {host}: {error}",
                           host=entry.name, error=str(e))
            return None
        try:
            result = validate_response(der, entry.bundle.leaf, entry.issuer, self.clock.seconds())
        except InvalidOcspResponse:
            return None  # for an older certificate, or lapsed: fetch anew
        return result if result.status == "good" else None

    async def _fetch(self, entry: _Tracked) -> OcspResult | None:
        """Ask the responder, a few at a time; the result, or None."""
        await self._slots.acquire()
        try:
            der = await with_deadline(
                Deferred.fromCoroutine(self._post(entry)), self.timeout, self.clock
            )
        except Exception as e:
            self.results["failed"] += 1
            self._log.warn("OCSP responder {url} for {host} failed: {error}",
                           url=entry.url, host=entry.name, error=describe_error(e))
            return None
        finally:
            self._slots.release()
        try:
            result = validate_response(der, entry.bundle.leaf, entry.issuer, self.clock.seconds())
        except InvalidOcspResponse as e:
            kind = "failed" if e.reason.startswith("responder status") else "invalid"
            self.results[kind] += 1
            self._log.warn("unusable OCSP response for {host} from {url}: {reason}",
                           host=entry.name, url=entry.url, reason=e.reason)
            return None
        self.results[result.status] += 1
        if result.status == "unknown":
            self._log.warn("the OCSP responder {url} does not know the certificate for {host}",
                           url=entry.url, host=entry.name)
            return None
        entry.failures = 0
        return result

    async def _post(self, entry: _Tracked) -> bytes:
        response = await self.http.post(
            entry.url,
            data=build_request(entry.bundle.leaf, entry.issuer),
            headers={b"Content-Type": [b"application/ocsp-request"], b"Accept": [b"application/ocsp-response"]},
            allow_redirects=False,
        )
        body: list[bytes] = []
        size = [0]

        def collect(chunk: bytes) -> None:
            size[0] += len(chunk)
            if size[0] > MAX_RESPONSE:
                raise ValueError(f"response larger than {MAX_RESPONSE} bytes")
            body.append(chunk)

        await treq.collect(response, collect)
        if response.code != 200:
            raise ValueError(f"HTTP {response.code}")
        return b"".join(body)

    def _adopt(self, entry: _Tracked, result: OcspResult) -> None:
        entry.result = result
        self._apply(entry)
        if result.status == "revoked":
            return
        self._schedule(entry, result.refresh_at(self.random()) - self.clock.seconds())

    def _apply(self, entry: _Tracked) -> None:
        """Staple the current response (if good and not lapsed), and time its lapse."""
        result = entry.result
        now = self.clock.seconds()
        if entry.lapse is not None and entry.lapse.active():
            entry.lapse.cancel()
        entry.lapse = None
        if result is None or result.status != "good" or result.next_update <= now:
            entry.tls.ocsp.der = b""
            return
        entry.tls.ocsp.der = result.der
        entry.lapse = self.clock.callLater(result.next_update - now, self._lapsed, entry)

    def _lapsed(self, entry: _Tracked) -> None:
        entry.lapse = None
        entry.tls.ocsp.der = b""
        entry.result = None
        self._log.warn("the OCSP response for {host} lapsed (no fresh one could be had); stapling nothing",
                       host=entry.name)

    def _retry(self, entry: _Tracked) -> None:
        if entry.dropped:
            return
        delay = min(self.retry_max, self.retry_min * 2 ** entry.failures)
        entry.failures += 1
        self._schedule(entry, delay * (1 + 0.1 * self.random()))

    async def _revoked(self, entry: _Tracked) -> None:
        if not entry.revoked_logged:
            entry.revoked_logged = True
            self._log.error(
                "the OCSP responder says the certificate for {host} (serial {serial:x}) is revoked; renewing it",
                event="ocsp-revoked", host=entry.name, serial=entry.bundle.leaf.serial_number,
            )
        await self.renew(entry.name, entry.bundle)
        if not entry.dropped and self._tracked.get(entry.name) is entry:
            # Still this certificate: the renewal failed (it logged why).
            # Ask again later, and the responder too.
            self._retry(entry)
