"""
An RFC 8555 (ACME) client on treq, for on-demand issuance.

certbot's C{acme} package supplies the message objects (directory, orders,
authorisations, problems) and the JWS signing; this module does the HTTP on
treq, so nothing blocks the reactor and no thread is needed: nonces (with
C{badNonce} retries), account registration (contact, terms, optional
External Account Binding), orders, one challenge per authorisation,
polling that honours C{Retry-After}, finalisation with a CSR, and the
certificate chain. Every ACME problem document becomes an L{AcmeProblem}
that carries what the CA said.

Timeouts: every HTTP exchange has one deadline covering connect, headers and
body (treq's own C{timeout=} only covers the headers); the order as a whole
has another.
"""

from __future__ import annotations

import datetime
import email.utils
import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import treq
import josepy as jose
from acme import jws as acme_jws
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .certificates import common_name
from .interfaces import IssuanceFailed
from .timeouts import describe_error, is_cancellation, with_deadline

__all__ = [
    "AcmeClient",
    "AcmeError",
    "AcmeProblem",
    "AcmeProtocolError",
    "CAUnreachable",
    "ValidationFailed",
    "OrderFailed",
    "key_authorization",
    "ari_certificate_id",
    "make_csr",
    "PROBLEM_PREFIX",
]

PROBLEM_PREFIX = "urn:ietf:params:acme:error:"

_JOSE = "application/jose+json"
_MAX_BODY = 1024 * 1024


class AcmeError(IssuanceFailed):
    """
    Base of the ACME client's errors.

    @ivar retry_after: seconds the CA asked us to wait, if it said.
    """

    retry_after: float | None = None


class CAUnreachable(AcmeError):
    """The CA could not be reached, or did not answer in time."""


class AcmeProtocolError(AcmeError):
    """The CA answered with something that is not valid ACME (bad JSON, no Location...)."""


class AcmeProblem(AcmeError):
    """
    The CA refused a request with an RFC 7807 problem document.

    @ivar problem_type: the full type URN, e.g.
        C{"urn:ietf:params:acme:error:rateLimited"}.
    @ivar status: the HTTP status.
    @ivar subproblems: (identifier, type, detail) of each subproblem.
    """

    def __init__(
        self,
        host: str,
        problem_type: str,
        detail: str,
        status: int,
        retry_after: float | None = None,
        subproblems: tuple[tuple[str, str, str], ...] = (),
    ) -> None:
        short = problem_type.removeprefix(PROBLEM_PREFIX)
        super().__init__(host, f"CA said {short} ({status}): {detail}")
        self.problem_type = problem_type
        self.problem_detail = detail
        self.status = status
        self.retry_after = retry_after
        self.subproblems = subproblems

    @property
    def short_type(self) -> str:
        """The type without the ACME URN prefix, e.g. C{"rateLimited"}."""
        return self.problem_type.removeprefix(PROBLEM_PREFIX)


class ValidationFailed(AcmeProblem):
    """The CA could not validate our control of the name (challenge invalid)."""


class OrderFailed(AcmeProblem):
    """The order became invalid, or did not complete in time."""


def key_authorization(token: str, account_key: jose.JWK) -> str:
    """RFC 8555 section 8.1: C{token || '.' || base64url(JWK thumbprint)}."""
    thumbprint = jose.b64encode(account_key.thumbprint(hash_function=hashes.SHA256)).decode("ascii")
    return f"{token}.{thumbprint}"


def make_csr(server_name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.CertificateSigningRequest:
    """
    A CSR for one name, with the name as its only SAN. No OCSP Must-Staple:
    Let's Encrypt ended OCSP in 2025.
    """
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(common_name(server_name))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def ari_certificate_id(cert: x509.Certificate) -> str | None:
    """
    RFC 9773 section 4.1: base64url(AKI keyIdentifier) "." base64url(DER
    serial number content), or None without an Authority Key Identifier.
    """
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None
    if not aki:
        return None
    serial = cert.serial_number
    serial_der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    return f"{jose.b64encode(aki).decode()}.{jose.b64encode(serial_der).decode()}"


def parse_retry_after(value: bytes | None, now: float) -> float | None:
    """
    Seconds to wait from a C{Retry-After} header (delta-seconds or an HTTP
    date), or C{None} if absent or unparseable.
    """
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _alg_for(key: jose.JWK) -> jose.JWASignature:
    if isinstance(key, jose.JWKEC):
        return jose.ES256
    return jose.RS256


@attrs.frozen
class _Reply:
    code: int
    headers: Any
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self, host: str) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise AcmeProtocolError(host, f"CA sent invalid JSON (HTTP {self.code})") from None
        if not isinstance(data, dict):
            raise AcmeProtocolError(host, f"CA sent JSON that is not an object (HTTP {self.code})")
        return data


@attrs.define
class AcmeClient:
    """
    One account at one ACME CA.

    @ivar directory_url: the CA's directory.
    @ivar key: the account key (a josepy JWK with its private key); C{None}
        until the account store loads it (see
        L{tenantedge.issuer.AcmeIssuer.prepare}).
    @ivar http: a treq C{HTTPClient} (or C{treq.testing.StubTreq}).
    @ivar clock: for polling delays and deadlines.
    @ivar account_url: the account's URL (C{kid}), once known.
    @ivar request_timeout: deadline for one HTTP exchange.
    @ivar poll_interval: the longest delay between polls when the CA gives
        no C{Retry-After}; polling starts at L{first_poll} and doubles up to
        it, since most validations finish within a second and the first
        handshake is waiting.
    @ivar max_nonce_retries: how often a C{badNonce} is retried with the
        fresh nonce the error carried.
    """

    directory_url: str
    key: jose.JWK | None
    http: Any
    clock: IReactorTime
    account_url: str | None = None
    request_timeout: float = 30.0
    poll_interval: float = 2.0
    first_poll: float = 0.2
    max_nonce_retries: int = 5
    user_agent: str = "tenantedge"
    ari_timeout: float = 5.0
    _directory: messages.Directory | None = attrs.field(default=None, init=False)
    _nonces: list[bytes] = attrs.field(factory=list, init=False)
    _windows: dict[str, tuple[tuple[float, float] | None, float]] = attrs.field(factory=dict, init=False)
    _log = Logger()

    # -- HTTP -----------------------------------------------------------------

    async def _exchange(self, host: str, method: str, url: str, timeout: float | None = None, **kwargs: Any) -> _Reply:
        timeout = self.request_timeout if timeout is None else timeout
        headers = kwargs.pop("headers", {})
        headers.setdefault(b"User-Agent", [self.user_agent.encode()])

        async def go() -> _Reply:
            response = await self.http.request(method, url, headers=headers, **kwargs)
            body = await treq.content(response) if method != "HEAD" else b""
            return _Reply(response.code, response.headers, body)

        d = with_deadline(defer.Deferred.fromCoroutine(go()), timeout, self.clock)
        try:
            reply: _Reply = await d
        except defer.TimeoutError:
            raise CAUnreachable(host, f"no answer from {url} within {timeout:g}s") from None
        except Exception as e:
            if is_cancellation(e):
                raise defer.CancelledError() from None  # stopped from above: not the CA's failure
            raise CAUnreachable(host, f"cannot reach {url}: {describe_error(e)}") from None
        if len(reply.body) > _MAX_BODY:
            raise AcmeProtocolError(host, f"CA sent an oversized response from {url}")
        nonce = reply.header(b"replay-nonce")
        if nonce:
            try:
                self._nonces.append(jose.decode_b64jose(nonce.decode("ascii")))
            except (jose.DeserializationError, UnicodeDecodeError):
                pass
        return reply

    def _problem(self, host: str, reply: _Reply, error_class: type[AcmeProblem] = AcmeProblem) -> AcmeError:
        retry_after = parse_retry_after(reply.header(b"retry-after"), self.clock.seconds())
        content_type = (reply.header(b"content-type") or b"").split(b";")[0].strip()
        if content_type == b"application/problem+json":
            try:
                error = messages.Error.from_json(reply.json(host))
            except (jose.DeserializationError, AcmeProtocolError):
                error = None
            if error is not None:
                return error_class(
                    host,
                    error.typ or "about:blank",
                    error.detail or error.title or "",
                    reply.code,
                    retry_after,
                    _subproblems(error),
                )
        problem = AcmeProtocolError(host, f"CA answered HTTP {reply.code} without a problem document")
        problem.retry_after = retry_after
        return problem

    async def directory(self, host: str = "") -> messages.Directory:
        """The CA's directory (fetched once, then cached)."""
        if self._directory is None:
            reply = await self._exchange(host, "GET", self.directory_url)
            if reply.code != 200:
                raise self._problem(host, reply)
            try:
                self._directory = messages.Directory.from_json(reply.json(host))
                for field in ("newNonce", "newAccount", "newOrder"):
                    self._directory[field]
            except (jose.DeserializationError, KeyError) as e:
                raise AcmeProtocolError(host, f"invalid ACME directory at {self.directory_url}: {e}") from None
        return self._directory

    async def _nonce(self, host: str) -> bytes:
        if self._nonces:
            return self._nonces.pop()
        directory = await self.directory(host)
        reply = await self._exchange(host, "HEAD", directory["newNonce"])
        if not self._nonces:
            raise AcmeProtocolError(host, f"no Replay-Nonce from newNonce (HTTP {reply.code})")
        return self._nonces.pop()

    async def post(
        self,
        host: str,
        url: str,
        payload: Any,
        *,
        use_jwk: bool = False,
        accept: bytes | None = None,
    ) -> _Reply:
        """
        A signed POST (RFC 8555 section 6.2). C{payload} is a message
        object or dict, or C{None} for POST-as-GET.

        @raise AcmeProblem: for an error response (after C{badNonce}
            retries).
        """
        if payload is None:
            body = b""
        elif isinstance(payload, jose.JSONDeSerializable):
            body = payload.json_dumps().encode()
        else:
            body = json.dumps(payload).encode()
        if not use_jwk and self.account_url is None:
            raise RuntimeError("no account yet: call register() first")
        assert self.key is not None, "no account key yet"
        for attempt in range(self.max_nonce_retries + 1):
            nonce = await self._nonce(host)
            signed = acme_jws.JWS.sign(
                body,
                key=self.key,
                alg=_alg_for(self.key),
                nonce=nonce,
                url=url,
                kid=None if use_jwk else self.account_url,
            )
            headers: dict[bytes, list[str | bytes]] = {b"Content-Type": [_JOSE]}
            if accept is not None:
                headers[b"Accept"] = [accept]
            reply = await self._exchange(host, "POST", url, data=signed.json_dumps().encode(), headers=headers)
            if reply.code < 400:
                return reply
            problem = self._problem(host, reply)
            if (
                isinstance(problem, AcmeProblem)
                and problem.short_type == "badNonce"
                and attempt < self.max_nonce_retries
            ):
                self._log.debug("badNonce from {url}; retrying with a fresh nonce", url=url)
                continue
            raise problem
        raise AssertionError("unreachable")

    # -- renewal information (RFC 9773) -----------------------------------------

    async def offers_renewal_info(self) -> bool:
        """Does the CA's directory offer renewalInfo (RFC 9773)?"""
        directory = await self.directory()
        try:
            directory["renewalInfo"]
        except KeyError:
            return False
        return True

    async def renewal_window(self, cert: x509.Certificate) -> tuple[float, float] | None:
        """
        The CA's suggested renewal window for a certificate, as POSIX
        (start, end), or None if the CA offers no ACME Renewal Information
        or the certificate has no Authority Key Identifier. Answers are
        cached until the CA's C{Retry-After} (default 6 hours).
        """
        directory = await self.directory()
        try:
            base = directory["renewalInfo"]
        except KeyError:
            return None
        cert_id = ari_certificate_id(cert)
        if cert_id is None:
            return None
        cached = self._windows.get(cert_id)
        now = self.clock.seconds()
        if cached is not None and cached[1] > now:
            return cached[0]  # may be None: a recent failure
        try:
            reply = await self._exchange("", "GET", f"{base.rstrip('/')}/{cert_id}", timeout=self.ari_timeout)
        except AcmeError:
            # Unreachable: no window for now (the lifetime rule applies),
            # and not asked again for an hour, so a renewal walk over many
            # certificates never waits on a dead endpoint name by name.
            self._windows[cert_id] = (None, now + 3600.0)
            raise
        if reply.code != 200:
            self._windows[cert_id] = (None, now + 3600.0)
            raise self._problem("", reply)
        try:
            window = reply.json("")["suggestedWindow"]
            start = datetime.datetime.fromisoformat(window["start"]).timestamp()
            end = datetime.datetime.fromisoformat(window["end"]).timestamp()
        except (KeyError, TypeError, ValueError) as e:
            raise AcmeProtocolError("", f"invalid renewalInfo answer: {e}") from None
        if end < start:
            raise AcmeProtocolError("", "renewalInfo window ends before it starts")
        retry_after = parse_retry_after(reply.header(b"retry-after"), now)
        self._windows[cert_id] = ((start, end), now + (retry_after if retry_after is not None else 6 * 3600.0))
        return (start, end)

    # -- account ----------------------------------------------------------------

    async def register(
        self,
        email: str | None = None,
        eab: tuple[str, str] | None = None,
        host: str = "",
    ) -> str:
        """
        Create the account, or find the existing one for this key (RFC 8555
        section 7.3: the CA answers 200 with the same URL).

        @param eab: (key identifier, base64url HMAC key) for CAs that
            require External Account Binding.
        @return: the account URL, also kept in C{account_url}.
        """
        directory = await self.directory(host)
        meta = directory.meta
        if eab is None and meta is not None and meta.external_account_required:
            raise AcmeError(host, f"{self.directory_url} requires External Account Binding (--eab-kid, --eab-hmac-key)")
        binding = None
        if eab is not None:
            assert self.key is not None, "no account key yet"
            binding = messages.ExternalAccountBinding.from_data(self.key.public_key(), eab[0], eab[1], directory)
        registration = messages.NewRegistration.from_data(
            email=email, external_account_binding=binding, terms_of_service_agreed=True
        )
        reply = await self.post(host, directory["newAccount"], registration, use_jwk=True)
        location = reply.header(b"location")
        if not location:
            raise AcmeProtocolError(host, "newAccount answered without a Location")
        self.account_url = location.decode("ascii")
        return self.account_url

    # -- issuance ---------------------------------------------------------------

    async def order(
        self,
        server_name: str,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        challenge_type: str,
        publish: Callable[[str, str, str], Awaitable[None]],
        withdraw: Callable[[str, str], Awaitable[None]],
        deadline: float,
        replaces: str | None = None,
        on_replaces_refused: Callable[[str], None] | None = None,
    ) -> list[x509.Certificate]:
        """
        Order a certificate for one name and return its chain, leaf first.

        @param replaces: the RFC 9773 identifier of the certificate this
            order renews (sent as C{replaces}; a CA that refuses it is asked
            again without).
        @param on_replaces_refused: called before that plain order, which
            the CA counts against its limits; it may raise to stop it.

        @param publish: C{publish(name, token, key_authorization)} makes the
            challenge answerable (HTTP-01 token or TLS-ALPN-01 certificate).
        @param withdraw: C{withdraw(name, token)} takes it down again; it
            is called whatever the outcome.
        @param deadline: clock time by which the order must be complete.
        """
        directory = await self.directory(server_name)
        new_order = messages.NewOrder(
            identifiers=(messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=server_name),)
        )
        if replaces is not None:
            payload = {**new_order.to_json(), "replaces": replaces}
            try:
                reply = await self.post(server_name, directory["newOrder"], payload)
            except AcmeProblem as problem:
                # Whatever the CA objects to about "replaces" (another
                # account's certificate, one it does not know, one already
                # replaced), a plain order still renews; only a rate limit
                # is final.
                if problem.short_type == "rateLimited":
                    raise
                if on_replaces_refused is not None:
                    on_replaces_refused(server_name)
                self._log.info(
                    "the CA refused to mark the order for {host} as a renewal ({type}); ordering plainly",
                    host=server_name,
                    type=problem.short_type,
                )
                reply = await self.post(server_name, directory["newOrder"], new_order)
        else:
            reply = await self.post(server_name, directory["newOrder"], new_order)
        order_url = (reply.header(b"location") or b"").decode("ascii")
        if not order_url:
            raise AcmeProtocolError(server_name, "newOrder answered without a Location")
        order = self._parse(server_name, messages.Order, reply)
        self._log.info(
            "ACME order {order} for {host} at {ca}", order=order_url, host=server_name, ca=self.directory_url
        )
        for authz_url in order.authorizations:
            await self._authorize(server_name, authz_url, challenge_type, publish, withdraw, deadline)
        order = await self._poll(server_name, order_url, messages.Order, ("ready", "valid"), deadline, OrderFailed)
        if order.status.name == "ready":
            csr = make_csr(server_name, key)
            reply = await self.post(server_name, order.finalize, messages.CertificateRequest(csr=csr))
            order = self._parse(server_name, messages.Order, reply)
            if order.status.name != "valid":
                order = await self._poll(server_name, order_url, messages.Order, ("valid",), deadline, OrderFailed)
        if not order.certificate:
            raise AcmeProtocolError(server_name, "valid order without a certificate URL")
        reply = await self.post(server_name, order.certificate, None, accept=b"application/pem-certificate-chain")
        try:
            chain = x509.load_pem_x509_certificates(reply.body)
        except ValueError:
            raise AcmeProtocolError(server_name, "the CA's certificate download is not a PEM chain") from None
        return chain

    async def _authorize(
        self,
        server_name: str,
        authz_url: str,
        challenge_type: str,
        publish: Callable[[str, str, str], Awaitable[None]],
        withdraw: Callable[[str, str], Awaitable[None]],
        deadline: float,
    ) -> None:
        authz = self._parse(server_name, messages.Authorization, await self.post(server_name, authz_url, None))
        if authz.status.name == "valid":
            return  # the CA remembers an earlier validation
        if authz.status.name != "pending":
            raise ValidationFailed(
                server_name, PROBLEM_PREFIX + "unauthorized", f"authorization is {authz.status.name}", 0
            )
        chosen = [c for c in authz.challenges if _challenge_type(c) == challenge_type]
        if not chosen:
            offered = ", ".join(_challenge_type(c) for c in authz.challenges)
            raise ValidationFailed(
                server_name,
                PROBLEM_PREFIX + "unsupportedIdentifier",
                f"the CA offers no {challenge_type} challenge (offers: {offered})",
                0,
            )
        challenge = chosen[0]
        token = challenge.chall.to_partial_json().get("token")
        if not isinstance(token, str) or not token:
            raise AcmeProtocolError(server_name, "challenge without a token")
        assert self.key is not None, "no account key yet"
        await publish(server_name, token, key_authorization(token, self.key))
        try:
            await self.post(server_name, challenge.uri, {})
            authz = await self._poll(
                server_name, authz_url, messages.Authorization, ("valid",), deadline, ValidationFailed, challenge_type
            )
        finally:
            await withdraw(server_name, token)

    def _parse(self, host: str, message_class: Any, reply: _Reply) -> Any:
        try:
            return message_class.from_json(reply.json(host))
        except (jose.DeserializationError, TypeError, KeyError, ValueError) as e:
            if isinstance(e, AcmeError):
                raise
            raise AcmeProtocolError(host, f"CA sent an invalid {message_class.__name__}: {e}") from None

    async def _poll(
        self,
        host: str,
        url: str,
        message_class: Any,
        wanted: tuple[str, ...],
        deadline: float,
        error_class: type[AcmeProblem],
        challenge_type: str | None = None,
    ) -> Any:
        interval = self.first_poll
        while True:
            reply = await self.post(host, url, None)
            resource = self._parse(host, message_class, reply)
            status = resource.status.name
            if status in wanted:
                return resource
            if status == "invalid" or status in ("deactivated", "expired", "revoked"):
                raise self._failure(host, resource, error_class, challenge_type, reply)
            delay = parse_retry_after(reply.header(b"retry-after"), self.clock.seconds())
            if delay is None:
                delay = interval
                interval = min(interval * 2, self.poll_interval)
            else:
                delay = min(max(delay, 0.1), 60.0)
            if self.clock.seconds() + delay > deadline:
                raise error_class(
                    host, PROBLEM_PREFIX + "serverInternal", f"still {status} at the deadline ({url})", 0
                )
            await deferLater(self.clock, delay, lambda: None)

    def _failure(
        self, host: str, resource: Any, error_class: type[AcmeProblem], challenge_type: str | None, reply: _Reply
    ) -> AcmeProblem:
        error = getattr(resource, "error", None)
        if error is None and challenge_type is not None:
            for challenge in getattr(resource, "challenges", ()):
                if _challenge_type(challenge) == challenge_type and challenge.error is not None:
                    error = challenge.error
        if error is None:
            return error_class(host, PROBLEM_PREFIX + "unauthorized", f"{resource.status.name} without a reason", 0)
        return error_class(
            host,
            error.typ or "about:blank",
            error.detail or error.title or "",
            reply.code,
            parse_retry_after(reply.header(b"retry-after"), self.clock.seconds()),
            _subproblems(error),
        )


def _challenge_type(challenge: messages.ChallengeBody) -> str:
    """
    The challenge's type; the acme package parses types it no longer
    implements (tls-alpn-01 since acme 3) as UnrecognizedChallenge, whose
    C{typ} is not a string.
    """
    typ = challenge.chall.typ
    if isinstance(typ, str):
        return typ
    return str(challenge.chall.to_partial_json().get("type", "unknown"))


def _subproblems(error: messages.Error) -> tuple[tuple[str, str, str], ...]:
    out = []
    for sub in error.subproblems or ():
        identifier = getattr(getattr(sub, "identifier", None), "value", "") or ""
        out.append((identifier, sub.typ or "", sub.detail or ""))
    return tuple(out)


