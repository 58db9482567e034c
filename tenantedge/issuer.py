"""
Issuers for on-demand certificates, and the wrappers that keep them in
line: an ACME issuer, fallback from one CA to the next (as Caddy falls back
from Let's Encrypt to ZeroSSL), and per-name failure backoff.

The resolver (L{tenantedge.resolver}) already guarantees one issuance per
name at a time; these classes only decide how that one issuance goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .acme import AcmeClient, AcmeProblem, ari_certificate_id
from .backoff import FailureBackoff
from .certificates import CertificateBundle, InvalidBundle
from .config import KEY_TYPES
from .interfaces import (
    BackedOff,
    IAccountStore,
    IChallengeResponder,
    IIssuer,
    IRenewalExemption,
    IReplacesRefused,
    IssuanceFailed,
    LimitExceeded,
    PrecheckFailed,
)
from .localca import ROOT_NAME_PREFIX
from .singleflight import SingleFlight
from .store import RunBlocking, run_inline
from .timeouts import is_cancellation

__all__ = [
    "AcmeIssuer",
    "BackedOff",
    "BackoffIssuer",
    "FallbackFailed",
    "FallbackIssuer",
    "KEY_TYPES",
    "new_private_key",
]

#: How long one ACME order may take in all, whether or not a handshake is
#: still waiting for it (the handshake's own limit is --issue-timeout).
ORDER_TIMEOUT = 300.0


def new_private_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """A fresh certificate key: ECDSA P-256 (default, cheaper handshakes) or RSA 2048."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


class FallbackFailed(IssuanceFailed):
    """
    Every issuer in a fallback chain failed.

    @ivar errors: each issuer's error, in order.
    @ivar retry_after: the longest wait any CA asked for, if any did.
    """

    def __init__(self, host: str, detail: str, errors: Sequence[IssuanceFailed]) -> None:
        super().__init__(host, detail)
        self.errors = tuple(errors)
        waits = [w for w in (getattr(e, "retry_after", None) for e in errors) if w is not None]
        self.retry_after = max(waits) if waits else None


@implementer(IIssuer, IRenewalExemption)
@attrs.define
class AcmeIssuer:
    """
    Issues through one ACME CA.

    @ivar client: the protocol client (its key is the account key, loaded
        by L{prepare}).
    @ivar accounts: where the account key and URL are kept.
    @ivar responder: answers the chosen challenge type.
    @ivar email: contact address for the account, if any.
    @ivar eab: External Account Binding (kid, HMAC key), if the CA needs it.
    @ivar key_type: certificate key type (see L{KEY_TYPES}).
    @ivar run_blocking: runs RSA key generation off the reactor thread.
    @ivar on_replaces_refused: told (and may refuse) when the CA turns an
        ARI renewal into a plain, counted order (the issuance limits).
    """

    client: AcmeClient
    accounts: IAccountStore
    responder: IChallengeResponder
    clock: IReactorTime
    email: str | None = None
    eab: tuple[str, str] | None = None
    key_type: str = "ecdsa-p256"
    run_blocking: RunBlocking = run_inline
    order_timeout: float = ORDER_TIMEOUT
    on_replaces_refused: IReplacesRefused | None = None
    _account: SingleFlight[str] = attrs.field(factory=SingleFlight, init=False)
    _log = Logger()

    @property
    def name(self) -> str:
        return self.client.directory_url

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        return Deferred.fromCoroutine(self._issue(server_name, replaces))

    async def renewal_exempt(self, replaces: CertificateBundle | None) -> bool:
        """
        Will an order replacing this certificate be an ARI renewal (which
        the CA exempts from its rate limits)?
        """
        if replaces is None or ari_certificate_id(replaces.leaf) is None:
            return False
        try:
            return await self.client.offers_renewal_info()
        except Exception as e:
            if is_cancellation(e):
                raise
            return False

    async def _issue(self, server_name: str, replaces: CertificateBundle | None = None) -> CertificateBundle:
        replaces_id = ari_certificate_id(replaces.leaf) if await self.renewal_exempt(replaces) else None  # type: ignore[union-attr]
        await self._ensure_account(server_name)
        if self.key_type == "rsa2048":
            key = await self.run_blocking(new_private_key, self.key_type)
        else:
            key = new_private_key(self.key_type)
        deadline = self.clock.seconds() + self.order_timeout
        try:
            chain = await self._order(server_name, key, deadline, replaces_id)
        except AcmeProblem as problem:
            if problem.short_type != "accountDoesNotExist":
                raise
            # The CA forgot the account (or it was deactivated): register
            # this key again (once, for all concurrent orders; the shared
            # account URL is replaced, never cleared) and retry once.
            await self._account.run("account", lambda: Deferred.fromCoroutine(self._register(server_name)))
            chain = await self._order(server_name, key, deadline, replaces_id)
        try:
            return CertificateBundle.build(key, chain)
        except InvalidBundle as e:
            raise IssuanceFailed(server_name, f"the CA's certificate is unusable: {e.reason}") from None

    def renewal_window(self, bundle: CertificateBundle) -> Deferred[tuple[float, float] | None]:
        """
        The CA's suggested renewal window for a certificate (RFC 9773), or
        None: for the local CA's certificates, at a CA without ARI, or on
        any error (the lifetime rule then applies).
        """
        if bundle.issuer_name().startswith(ROOT_NAME_PREFIX):
            return succeed(None)  # the local CA's: no CA to ask
        d = Deferred.fromCoroutine(self.client.renewal_window(bundle.leaf))
        return d.addErrback(lambda failure: None)

    def _replaces_refused(self, server_name: str) -> None:
        if self.on_replaces_refused is not None:
            self.on_replaces_refused.replaces_refused(self.name, server_name)

    def _order(self, server_name: str, key: Any, deadline: float, replaces: str | None) -> Any:
        return self.client.order(
            server_name,
            key,
            self.responder.challenge_type,
            self.responder.publish,
            self.responder.withdraw,
            deadline,
            replaces=replaces,
            on_replaces_refused=self._replaces_refused,
        )

    async def _ensure_account(self, server_name: str) -> str:
        if self.client.account_url is not None:
            return self.client.account_url
        return await self._account.run("account", lambda: Deferred.fromCoroutine(self._register(server_name)))

    async def _register(self, server_name: str) -> str:
        url = await self.client.register(self.email, self.eab, host=server_name)
        assert self.client.key is not None, "register() signs with the key"
        if url != self.accounts.load_url(self.client.key):
            await self.accounts.save_url(url, self.client.directory_url, self.client.key)
            self._log.info("ACME account {url} at {ca}", url=url, ca=self.client.directory_url)
        return url

    def prepare(self) -> None:
        """
        Load (or create) the account key and the remembered account URL.
        Runs at start-up, after privileges are dropped.
        """
        self.client.key = self.accounts.load_or_create_key()
        self.client.account_url = self.accounts.load_url(self.client.key)


@implementer(IIssuer)
@attrs.define
class FallbackIssuer:
    """
    Tries each issuer in turn until one succeeds; fails with the last
    error, whose detail lists what every issuer said.
    """

    issuers: Sequence[IIssuer]
    _log = Logger()

    @property
    def name(self) -> str:
        return " -> ".join(str(i.name) for i in self.issuers)

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        return Deferred.fromCoroutine(self._issue(server_name, replaces))

    async def _issue(self, server_name: str, replaces: CertificateBundle | None) -> CertificateBundle:
        errors: list[IssuanceFailed] = []
        for index, issuer in enumerate(self.issuers):
            try:
                return await issuer.issue(server_name, replaces=replaces)  # type: ignore[no-any-return]
            except IssuanceFailed as e:
                errors.append(e)
                if index + 1 < len(self.issuers):
                    self._log.warn(
                        "{issuer} could not issue for {host} ({error}); trying {next}",
                        issuer=issuer.name,
                        host=server_name,
                        error=e.detail,
                        next=self.issuers[index + 1].name,
                    )
        last = errors[-1]
        if len(errors) > 1 and all(isinstance(e, PrecheckFailed) for e in errors):
            # No CA was asked (each one's CAA forbids it, say): still a
            # pre-check failure, with what each said.
            first = errors[0]
            assert isinstance(first, PrecheckFailed)
            detail = "; ".join(f"{i.name}: {e.detail}" for i, e in zip(self.issuers, errors))
            raise PrecheckFailed(server_name, first.reason, detail)
        if len(errors) > 1:
            detail = "; ".join(f"{i.name}: {e.detail}" for i, e in zip(self.issuers, errors))
            raise FallbackFailed(server_name, detail, errors)
        raise last


@implementer(IIssuer)
@attrs.define
class BackoffIssuer:
    """
    Refuses, without contacting any CA, a name whose last attempts failed,
    until its backoff ends (see L{tenantedge.backoff}).
    """

    wrapped: IIssuer
    backoff: FailureBackoff
    _log = Logger()

    @property
    def name(self) -> str:
        return str(self.wrapped.name)

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        until = self.backoff.blocked_until(server_name)
        if until is not None:
            return fail(BackedOff(server_name, until, self.backoff.failures(server_name)))
        d: Deferred[CertificateBundle] = self.wrapped.issue(server_name, replaces=replaces)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(server_name,), errbackArgs=(server_name,))
        return d

    def _succeeded(self, bundle: CertificateBundle, server_name: str) -> CertificateBundle:
        self.backoff.record_success(server_name)
        return bundle

    def _failed(self, failure: Any, server_name: str) -> Any:
        if failure.check(LimitExceeded):
            # Our own limit refused it before any CA was asked: not a
            # failure of the name (the limiter refuses cheaply until it
            # has room).
            return failure
        if failure.check(IssuanceFailed):
            retry_after = getattr(failure.value, "retry_after", None)
            until = self.backoff.record_failure(server_name, retry_after)
            self._log.warn(
                "no new order for {host} for {wait:.0f}s (failure {count})",
                host=server_name,
                wait=until - self.backoff.clock.seconds(),
                count=self.backoff.failures(server_name),
            )
        return failure
