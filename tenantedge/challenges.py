"""
ACME challenge answers (HTTP-01 on port 80, TLS-ALPN-01 on the HTTPS port)
and the port-80 redirect to HTTPS.

C{/.well-known/acme-challenge/<token>} answers with the key authorisation
while an order for it is pending (RFC 8555 section 8.3) and 404 otherwise;
every other request gets a 308 to the same host and path over HTTPS. The
redirect only ever names a valid host name, so port 80 cannot be used to
bounce users to arbitrary places.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .certificates import CertificateBundle, common_name, make_server_context, sign_certificate, utc_now
from .hostnames import InvalidHostname, host_from_header
from .interfaces import IChallengeResponder, IChallengeStore

__all__ = [
    "MemoryChallengeStore",
    "ChallengeResource",
    "HTTPRedirectRoot",
    "HTTP01Responder",
    "TLSALPN01Responder",
    "tls_alpn_challenge_certificate",
]

CHALLENGE_PATH = (b".well-known", b"acme-challenge")


@implementer(IChallengeStore)
@attrs.define
class MemoryChallengeStore:
    """
    Pending HTTP-01 answers held in memory (one server; a fleet shares them
    through a shared store instead).
    """

    _tokens: dict[str, str] = attrs.field(factory=dict)

    def add(self, token: str, key_authorization: str) -> Deferred[None]:
        self._tokens[token] = key_authorization
        return succeed(None)

    def remove(self, token: str) -> Deferred[None]:
        self._tokens.pop(token, None)
        return succeed(None)

    def get(self, token: str) -> Deferred[str]:
        try:
            return succeed(self._tokens[token])
        except KeyError as e:
            return fail(e)


class ChallengeResource(Resource):
    """
    Answers C{GET /.well-known/acme-challenge/<token>} from an
    L{IChallengeStore}.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, challenges: IChallengeStore) -> None:
        super().__init__()
        self.challenges = challenges

    def render_GET(self, request: Request) -> bytes | int:
        postpath = request.postpath
        assert postpath is not None  # set by resource traversal
        if len(postpath) != 1 or not postpath[0]:
            return _plain(request, 404, b"no such challenge\n")
        try:
            token = postpath[0].decode("ascii")
        except UnicodeDecodeError:
            return _plain(request, 404, b"no such challenge\n")

        def found(key_authorization: str) -> None:
            request.write(_plain(request, 200, key_authorization.encode("ascii")))
            request.finish()

        def missing(reason: object) -> None:
            request.write(_plain(request, 404, b"no such challenge\n"))
            request.finish()

        self.challenges.get(token).addCallbacks(found, missing)
        return NOT_DONE_YET

    render_HEAD = render_GET


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


class HTTPRedirectRoot(Resource):
    """
    The port-80 site root: challenges under C{/.well-known/acme-challenge/},
    a 308 redirect to HTTPS for everything else.

    @ivar https_port: the public HTTPS port, left out of the redirect URL
        when it is 443; or a callable returning it (the port a listener
        actually bound).
    """

    def __init__(self, challenges: IChallengeStore, https_port: int | Callable[[], int] = 443) -> None:
        super().__init__()
        self.https_port = https_port
        well_known = Resource()
        well_known.putChild(CHALLENGE_PATH[1], ChallengeResource(challenges))
        self._well_known = well_known

    def getChild(self, path: bytes, request: Request) -> Resource:
        assert request.postpath is not None  # set by resource traversal
        if path == CHALLENGE_PATH[0] and request.postpath[:1] == [CHALLENGE_PATH[1]]:
            return self._well_known
        return self

    def render(self, request: Request) -> bytes:
        if not request.uri.startswith(b"/"):
            # Only origin-form targets: "@evil.example/x" or an absolute
            # URL appended to our host would redirect somewhere else.
            return _plain(request, 400, b"only origin-form request targets are accepted\n")
        host = request.requestHeaders.getRawHeaders(b"host", [b""])[0]
        try:
            name = host_from_header(host)
        except InvalidHostname:
            return _plain(request, 400, b"a valid Host header is required\n")
        https_port = self.https_port() if callable(self.https_port) else self.https_port
        port = b"" if https_port == 443 else b":%d" % (https_port,)
        target = b"https://" + name.encode("ascii") + port + request.uri
        request.setResponseCode(308)
        request.setHeader(b"location", target)
        return _plain(request, 308, b"moved to " + target + b"\n")


@implementer(IChallengeResponder)
class HTTP01Responder:
    """
    Publishes HTTP-01 answers (RFC 8555 section 8.3) through an
    L{IChallengeStore}, which the port-80 L{ChallengeResource} reads.
    """

    challenge_type = "http-01"

    def __init__(self, challenges: IChallengeStore) -> None:
        self.challenges = challenges

    async def publish(self, server_name: str, token: str, key_authorization: str) -> None:
        await self.challenges.add(token, key_authorization)

    async def withdraw(self, server_name: str, token: str) -> None:
        await self.challenges.remove(token)


#: RFC 8737 section 3: the acmeIdentifier certificate extension.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ACME_TLS_1 = b"acme-tls/1"


def tls_alpn_challenge_certificate(
    server_name: str, key_authorization: str, now: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """
    The self-signed certificate that answers a TLS-ALPN-01 challenge: the
    name as its only SAN and a critical acmeIdentifier extension holding
    the SHA-256 digest of the key authorisation as a DER OCTET STRING.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    cert = sign_certificate(
        common_name(server_name),
        key.public_key(),
        now - datetime.timedelta(minutes=5),
        now + datetime.timedelta(days=1),
        key,
        dns_names=[server_name],
        extensions=[(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), True)],
    )
    return key, cert


#: Key under which a name's pending TLS-ALPN-01 answer sits in the
#: challenge store (tokens are base64url, so no token can look like it).
ALPN_KEY_PREFIX = "tls-alpn-01:"


@implementer(IChallengeResponder)
class TLSALPN01Responder:
    """
    Publishes TLS-ALPN-01 answers (RFC 8737): while a challenge for a name
    is pending, a ClientHello for that name offering only C{acme-tls/1} is
    answered with the challenge certificate (see
    L{tenantedge.tls.OnDemandTLSFactory}'s C{challenge_context}).

    The answer (token and key authorisation) lives in the challenge store,
    so whichever worker or node the CA's validation reaches can answer an
    order another one started; each builds the certificate from it once.
    """

    challenge_type = "tls-alpn-01"

    def __init__(self, clock: IReactorTime, challenges: IChallengeStore) -> None:
        self.clock = clock
        self.challenges = challenges
        self._contexts: dict[str, tuple[str, SSL.Context]] = {}

    async def publish(self, server_name: str, token: str, key_authorization: str) -> None:
        await self.challenges.add(ALPN_KEY_PREFIX + server_name, f"{token} {key_authorization}")

    async def withdraw(self, server_name: str, token: str) -> None:
        key = ALPN_KEY_PREFIX + server_name
        try:
            current = await self.challenges.get(key)
        except KeyError:
            current = None
        if current is not None and current.split(" ", 1)[0] == token:
            await self.challenges.remove(key)
        self._contexts.pop(server_name, None)

    def context_for(self, server_name: str) -> Deferred[SSL.Context | None]:
        """The challenge context for a name with a pending challenge, else None."""
        return Deferred.fromCoroutine(self._context_for(server_name))

    async def _context_for(self, server_name: str) -> SSL.Context | None:
        try:
            answer = await self.challenges.get(ALPN_KEY_PREFIX + server_name)
        except KeyError:
            self._contexts.pop(server_name, None)
            return None
        token, _, key_authorization = answer.partition(" ")
        cached = self._contexts.get(server_name)
        if cached is not None and cached[0] == answer:
            return cached[1]
        key, cert = tls_alpn_challenge_certificate(server_name, key_authorization, utc_now(self.clock.seconds()))
        context = make_server_context(CertificateBundle.build(key, [cert]), protocols=(ACME_TLS_1,))
        self._contexts[server_name] = (answer, context)
        return context
