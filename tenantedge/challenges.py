"""
Port 80: ACME HTTP-01 answers and the redirect to HTTPS.

C{/.well-known/acme-challenge/<token>} answers with the key authorisation
while an order for it is pending (RFC 8555 section 8.3) and 404 otherwise;
every other request gets a 308 to the same host and path over HTTPS. The
redirect only ever names a valid host name, so port 80 cannot be used to
bounce users to arbitrary places.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .hostnames import InvalidHostname, host_from_header
from .interfaces import IChallengeStore

__all__ = ["MemoryChallengeStore", "ChallengeResource", "HTTPRedirectRoot"]

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
        if len(request.postpath) != 1 or not request.postpath[0]:
            return _plain(request, 404, b"no such challenge\n")
        try:
            token = request.postpath[0].decode("ascii")
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
        when it is 443.
    """

    def __init__(self, challenges: IChallengeStore, https_port: int = 443) -> None:
        super().__init__()
        self.https_port = https_port
        well_known = Resource()
        well_known.putChild(CHALLENGE_PATH[1], ChallengeResource(challenges))
        self._well_known = well_known

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == CHALLENGE_PATH[0] and request.postpath[:1] == [CHALLENGE_PATH[1]]:
            return self._well_known
        return self

    def render(self, request: Request) -> bytes:
        host = request.requestHeaders.getRawHeaders(b"host", [b""])[0]
        try:
            name = host_from_header(host)
        except InvalidHostname:
            return _plain(request, 400, b"a valid Host header is required\n")
        port = b"" if self.https_port == 443 else b":%d" % (self.https_port,)
        target = b"https://" + name.encode("ascii") + port + request.uri
        request.setResponseCode(308)
        request.setHeader(b"location", target)
        return _plain(request, 308, b"moved to " + target + b"\n")
