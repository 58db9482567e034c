"""
Unit tests for the ACME client and issuers against an in-memory CA
(L{tests.support.fakeca}) through C{treq.testing.StubTreq}: JWS and nonce
handling, badNonce retries, problem documents, Retry-After, timeouts,
External Account Binding, account reuse, fallback and backoff.
"""

from __future__ import annotations

from typing import Any

import datetime
import hashlib
import hmac
import json
import os

import josepy as jose
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tenantedge.accounts import AccountStore, account_directory
from tenantedge.acme import (
    AcmeClient,
    AcmeError,
    AcmeProblem,
    AcmeProtocolError,
    CAUnreachable,
    ValidationFailed,
    key_authorization,
    parse_retry_after,
)
from tenantedge.backoff import LADDER, FailureBackoff
from tenantedge.challenges import (
    ACME_IDENTIFIER_OID,
    HTTP01Responder,
    MemoryChallengeStore,
    TLSALPN01Responder,
)
from tenantedge.interfaces import BackedOff, IIssuer, IssuanceFailed
from tenantedge.interfaces import IRenewalExemption, IReplacesRefused
from tenantedge.issuer import AcmeIssuer, BackoffIssuer, FallbackFailed, FallbackIssuer
from tenantedge.testing import ControlledIssuer, make_bundle
from zope.interface.verify import verifyObject

from .support.fakeca import BASE, FakeCA, complete, problem

NOW = 1_800_000_000.0


def _signer():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fake CA")])
    utc = datetime.timezone.utc

    def issue(csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(name)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(NOW - 60, utc))
            .not_valid_after(datetime.datetime.fromtimestamp(NOW + 90 * 86400, utc))
            .add_extension(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
            .sign(key, hashes.SHA256())
        )
        root = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime.fromtimestamp(NOW - 60, utc))
            .not_valid_after(datetime.datetime.fromtimestamp(NOW + 900 * 86400, utc))
            .sign(key, hashes.SHA256())
        )
        return [cert, root]

    return issue


class AcmeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.ca = FakeCA(_signer())
        self.http = StubTreq(self.ca)
        self.key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        self.client = AcmeClient(f"{BASE}/dir", self.key, self.http, self.clock, request_timeout=10)
        self.challenges = MemoryChallengeStore()
        self.published: list[tuple[str, str, str]] = []

        def validate(name: str, typ: str, token: str, expected: str) -> dict | None:
            # The CA checks what the edge publishes, as a real VA would.
            answer = self.challenges._tokens.get(token)
            self.published.append((name, token, answer))
            if answer != expected:
                return {"type": "urn:ietf:params:acme:error:incorrectResponse", "detail": "wrong answer"}
            return None

        self.ca.validate = validate

    def drive(self, coroutine) -> Deferred:
        d = Deferred.fromCoroutine(coroutine)
        self.http.flush()
        return d

    def order(self, name: str = "a.test", responder=None):
        responder = responder or HTTP01Responder(self.challenges)
        key = ec.generate_private_key(ec.SECP256R1())
        return self.drive(
            self.client.order(name, key, responder.challenge_type, responder.publish, responder.withdraw, NOW + 300)
        )


class ClientTests(AcmeTestCase):
    def test_register_and_order(self) -> None:
        """
        A full order: account, order, HTTP-01 answer published while the CA
        validates and withdrawn afterwards, finalize, chain.
        """
        url = self.successResultOf(self.drive(self.client.register("ops@saas.test")))
        self.assertEqual(url, f"{BASE}/acct/1")
        self.assertEqual(self.ca.payloads["/account"][0]["contact"], ["mailto:ops@saas.test"])
        self.assertTrue(self.ca.payloads["/account"][0]["termsOfServiceAgreed"])
        d = self.order("shop.acme.test")
        self.clock.advance(1)
        chain = self.successResultOf(d)
        self.assertEqual(chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), ["shop.acme.test"])
        self.assertEqual(len(chain), 2)
        name, token, answer = self.published[0]
        self.assertEqual(name, "shop.acme.test")
        self.assertEqual(answer, key_authorization(token, self.key))
        self.assertEqual(self.challenges._tokens, {})

    def test_post_requires_account(self) -> None:
        self.assertRaises(RuntimeError, self.client.post("a.test", f"{BASE}/order", {}).send, None)

    def test_existing_account(self) -> None:
        """Registering the same key again finds the same account."""
        first = self.successResultOf(self.drive(self.client.register()))
        again = AcmeClient(f"{BASE}/dir", self.key, self.http, self.clock)
        self.assertEqual(self.successResultOf(self.drive(again.register())), first)

    def test_bad_nonce_retried(self) -> None:
        """A badNonce is retried with the fresh nonce the error carried."""
        self.ca.script["/account"] = [problem(400, "badNonce", "stale"), problem(400, "badNonce", "stale")]
        self.successResultOf(self.drive(self.client.register()))
        self.assertEqual([p for p in self.ca.requests if p[1] == "/account"], [("POST", "/account")] * 3)
        # The retries used the nonces the errors carried: no newNonce round trip.
        self.assertEqual(self.ca.requests.count(("HEAD", "/nonce")), 0)

    def test_bad_nonce_exhausted(self) -> None:
        self.ca.script["/account"] = [problem(400, "badNonce", "stale")] * 10
        f = self.failureResultOf(self.drive(self.client.register()), AcmeProblem)
        self.assertEqual(f.value.short_type, "badNonce")
        self.assertEqual(self.ca.requests.count(("POST", "/account")), self.client.max_nonce_retries + 1)

    def test_rate_limited(self) -> None:
        """
        A 429 rateLimited problem becomes an AcmeProblem that says what the
        CA said and carries Retry-After.
        """
        self.successResultOf(self.drive(self.client.register()))
        self.ca.script["/order"] = [
            problem(429, "rateLimited", "too many certificates for acme.test", {"Retry-After": "3600"})
        ]
        f = self.failureResultOf(self.order("x.acme.test"), AcmeProblem)
        self.assertEqual(f.value.short_type, "rateLimited")
        self.assertEqual(f.value.status, 429)
        self.assertEqual(f.value.retry_after, 3600)
        self.assertIn("too many certificates for acme.test", str(f.value))
        self.assertEqual(f.value.host, "x.acme.test")

    def test_malformed_json(self) -> None:
        self.ca.script["/dir"] = [(200, {"Content-Type": "application/json"}, b"{not json")]
        f = self.failureResultOf(self.drive(self.client.register()), AcmeProtocolError)
        self.assertIn("invalid JSON", str(f.value))

    def test_directory_missing_fields(self) -> None:
        self.ca.script["/dir"] = [(200, {"Content-Type": "application/json"}, b'{"newNonce": "x"}')]
        self.failureResultOf(self.drive(self.client.register()), AcmeProtocolError)

    def test_error_without_problem_document(self) -> None:
        self.successResultOf(self.drive(self.client.register()))
        self.ca.script["/order"] = [(503, {"Content-Type": "text/html"}, b"<h1>down</h1>")]
        f = self.failureResultOf(self.order(), AcmeProtocolError)
        self.assertIn("503", str(f.value))

    def test_timeout(self) -> None:
        """A CA that does not answer fails the request after its deadline."""
        self.ca.hang.add("/dir")
        d = self.drive(self.client.register())
        self.clock.advance(9)
        self.assertNoResult(d)
        self.clock.advance(2)
        f = self.failureResultOf(d, CAUnreachable)
        self.assertIn("within 10s", str(f.value))

    def test_validation_failed(self) -> None:
        """
        A challenge the CA cannot validate fails the order with the CA's
        problem, and the published answer is withdrawn.
        """
        self.successResultOf(self.drive(self.client.register()))
        self.ca.validate = lambda name, typ, token, expected: {
            "type": "urn:ietf:params:acme:error:connection", "detail": "Connection refused"}
        f = self.failureResultOf(self.order(), ValidationFailed)
        self.assertEqual(f.value.short_type, "connection")
        self.assertIn("Connection refused", str(f.value))
        self.assertEqual(self.challenges._tokens, {})

    def test_retry_after_honoured_when_polling(self) -> None:
        """
        While the CA says "pending, Retry-After: 5", the client waits five
        seconds between polls, not its own shorter interval.
        """
        self.successResultOf(self.drive(self.client.register()))
        self.ca.validate = lambda *args: "pending"
        d = self.order()
        authz_url = next(iter(self.ca.authzs))
        self.ca.retry_after[authz_url] = 5
        polls = lambda: self.ca.requests.count(("POST", authz_url.removeprefix(BASE)))
        self.clock.advance(0.2)  # the first poll after answering the challenge
        before = polls()
        self.clock.advance(4.8)
        self.assertEqual(polls(), before)
        self.clock.advance(0.3)
        self.assertEqual(polls(), before + 1)
        complete(self.ca, authz_url)
        self.clock.advance(5)
        self.successResultOf(d)

    def test_order_deadline(self) -> None:
        """A validation that never ends fails the order at its deadline."""
        self.successResultOf(self.drive(self.client.register()))
        self.ca.validate = lambda *args: "pending"
        d = self.order()
        self.clock.pump([1] * 400)
        f = self.failureResultOf(d, ValidationFailed)
        self.assertIn("at the deadline", str(f.value))
        self.assertEqual(self.challenges._tokens, {})

    def test_retry_after_parsing(self) -> None:
        self.assertEqual(parse_retry_after(b"120", 0), 120)
        self.assertEqual(parse_retry_after(b"Thu, 01 Jan 1970 00:02:00 GMT", 60), 60)
        self.assertIsNone(parse_retry_after(b"soon", 0))
        self.assertIsNone(parse_retry_after(None, 0))

    def test_external_account_binding(self) -> None:
        """
        With a CA that requires EAB, registering without it fails clearly;
        with it, the binding is a JWS over the account key, MACed with the
        HMAC key, for the newAccount URL.
        """
        self.ca.require_eab = True
        f = self.failureResultOf(self.drive(self.client.register()), AcmeError)
        self.assertIn("External Account Binding", str(f.value))
        hmac_key = jose.b64encode(b"0123456789abcdef0123456789abcdef").decode()
        self.successResultOf(self.drive(self.client.register(eab=("kid-1", hmac_key))))
        binding = self.ca.payloads["/account"][-1]["externalAccountBinding"]
        protected = json.loads(jose.b64decode(binding["protected"]))
        self.assertEqual(protected, {"alg": "HS256", "kid": "kid-1", "url": f"{BASE}/account"})
        self.assertEqual(json.loads(jose.b64decode(binding["payload"])), self.key.public_key().to_partial_json())
        mac = hmac.new(b"0123456789abcdef0123456789abcdef",
                       f"{binding['protected']}.{binding['payload']}".encode(), hashlib.sha256).digest()
        self.assertEqual(jose.b64decode(binding["signature"]), mac)

    def test_no_challenge_of_wanted_type(self) -> None:
        self.successResultOf(self.drive(self.client.register()))
        key = ec.generate_private_key(ec.SECP256R1())
        d = self.drive(self.client.order("a.test", key, "dns-01", None, None, NOW + 300))
        f = self.failureResultOf(d, ValidationFailed)
        self.assertIn("offers: http-01, tls-alpn-01", str(f.value))


class TLSALPNTests(AcmeTestCase):
    def test_order_via_tls_alpn(self) -> None:
        """
        The TLS-ALPN-01 responder publishes a challenge certificate with the
        acmeIdentifier extension while the CA validates, then withdraws it.
        """
        challenges = MemoryChallengeStore()
        responder = TLSALPN01Responder(self.clock, challenges)
        other_worker = TLSALPN01Responder(self.clock, challenges)
        seen = []

        def validate(name, typ, token, expected):
            # Whoever shares the challenge store answers, not only the
            # responder that published.
            context = self.successResultOf(other_worker.context_for(name))
            seen.append((typ, context))
            return None

        self.ca.validate = validate
        self.successResultOf(self.drive(self.client.register()))
        d = self.order("alpn.test", responder)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(seen[0][0], "tls-alpn-01")
        self.assertIsNotNone(seen[0][1])
        self.assertIsNone(self.successResultOf(responder.context_for("alpn.test")))
        self.assertIsNone(self.successResultOf(other_worker.context_for("alpn.test")))

    def test_challenge_certificate(self) -> None:
        from tenantedge.challenges import tls_alpn_challenge_certificate

        _, cert = tls_alpn_challenge_certificate("x.test", "tok.thumb", datetime.datetime.now(datetime.timezone.utc))
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
        self.assertTrue(ext.critical)
        self.assertEqual(ext.value.value, b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest())
        self.assertEqual(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                         .get_values_for_type(x509.DNSName), ["x.test"])


class AcmeIssuerTests(AcmeTestCase):
    def make_issuer(self, store: str) -> AcmeIssuer:
        issuer = AcmeIssuer(
            AcmeClient(f"{BASE}/dir", None, self.http, self.clock),
            AccountStore(account_directory(store, f"{BASE}/dir")),
            HTTP01Responder(self.challenges),
            self.clock,
            email="ops@saas.test",
        )
        issuer.prepare()
        return issuer

    def test_interface(self) -> None:
        issuer = self.make_issuer(self.mktemp())
        self.assertTrue(verifyObject(IIssuer, issuer))
        self.assertTrue(verifyObject(IRenewalExemption, issuer))
        self.assertTrue(verifyObject(IReplacesRefused, _Refusals()))

    def test_account_kept_across_restarts(self) -> None:
        """
        The account key is created once (0600) and the account URL is
        remembered: a new issuer on the same store orders without
        registering again.
        """
        store = self.mktemp()
        first = self.make_issuer(store)
        d = first.issue("a.test")
        self.http.flush()
        self.clock.advance(1)
        bundle = self.successResultOf(d)
        self.assertEqual(bundle.dns_names(), ["a.test"])
        self.assertEqual(os.stat(first.accounts.key_path).st_mode & 0o777, 0o600)
        accounts_before = self.ca.requests.count(("POST", "/account"))
        second = self.make_issuer(store)
        self.assertEqual(second.client.account_url, first.client.account_url)
        self.assertEqual(second.client.key.thumbprint(), first.client.key.thumbprint())
        d = second.issue("b.test")
        self.http.flush()
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(self.ca.requests.count(("POST", "/account")), accounts_before)

    def test_forgotten_account_registered_again(self) -> None:
        store = self.mktemp()
        issuer = self.make_issuer(store)
        issuer.client.account_url = f"{BASE}/acct/999"
        d = issuer.issue("a.test")
        self.http.flush()
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertNotEqual(issuer.client.account_url, f"{BASE}/acct/999")

    def test_ari_renewal_names_replaced_certificate(self) -> None:
        """
        Renewing at a CA that offers renewalInfo sends RFC 9773's
        C{replaces}; a CA that refuses it is asked again without.
        """
        self.ca.renewal_info = {}
        issuer = self.make_issuer(self.mktemp())
        d = issuer.issue("a.test")
        self.http.flush()
        self.clock.advance(1)
        old = self.successResultOf(d)
        self.assertNotIn("replaces", self.ca.payloads["/order"][-1])
        # The fake CA's leaves carry no AKI; give the old one an identifier.
        from tenantedge.acme import ari_certificate_id

        issuer_key = ec.generate_private_key(ec.SECP256R1())
        utc = datetime.timezone.utc
        from tenantedge.certificates import CertificateBundle, common_name, sign_certificate

        leaf = sign_certificate(
            common_name("a.test"), old.key.public_key(), datetime.datetime.fromtimestamp(NOW - 60, utc),
            datetime.datetime.fromtimestamp(NOW + 86400, utc), issuer_key, issuer=common_name("Fake CA"),
            dns_names=["a.test"],
            extensions=[(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)],
        )
        old = CertificateBundle.build(old.key, [leaf])
        self.assertTrue(self.successResultOf(issuer.renewal_exempt(old)))
        d = issuer.issue("a.test", replaces=old)
        self.http.flush()
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(self.ca.payloads["/order"][-1]["replaces"], ari_certificate_id(leaf))
        for status, kind in ((409, "alreadyReplaced"), (403, "unauthorized"), (404, "malformed")):
            self.ca.script["/order"] = [problem(status, kind, "cannot replace that")]
            refused = _Refusals()
            issuer.on_replaces_refused = refused
            d = issuer.issue("a.test", replaces=old)
            self.http.flush()
            self.clock.advance(1)
            self.successResultOf(d)
            self.assertNotIn("replaces", self.ca.payloads["/order"][-1])
            self.assertEqual(refused.names, [(issuer.name, "a.test")])
        # A rate limit is final, with or without replaces.
        self.ca.script["/order"] = [problem(429, "rateLimited", "slow down")]
        d = issuer.issue("a.test", replaces=old)
        self.http.flush()
        self.failureResultOf(d, AcmeProblem)

    def test_replaced_account_key_registers_again(self) -> None:
        """
        A remembered account URL belongs to its key: with a new key (the
        old file lost), the account is registered again, not reused.
        """
        store = self.mktemp()
        first = self.make_issuer(store)
        d = first.issue("a.test")
        self.http.flush()
        self.clock.advance(1)
        self.successResultOf(d)
        os.unlink(first.accounts.key_path)
        second = self.make_issuer(store)
        self.assertIsNone(second.client.account_url)

    def test_no_ari_no_replaces(self) -> None:
        issuer = self.make_issuer(self.mktemp())
        self.assertFalse(self.successResultOf(issuer.renewal_exempt(make_bundle("a.test"))))
        self.assertFalse(self.successResultOf(issuer.renewal_exempt(None)))

    def test_rsa_key_type(self) -> None:
        issuer = self.make_issuer(self.mktemp())
        issuer.key_type = "rsa2048"
        d = issuer.issue("rsa.test")
        self.http.flush()
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d).key.key_size, 2048)

    def test_account_directory_is_contained(self) -> None:
        path = account_directory("/store", "https://evil.test:8443/../../etc/dir")
        self.assertTrue(path.startswith("/store/accounts/"))
        self.assertNotIn("..", path[len("/store/accounts/"):].replace("_", ""))


@implementer(IReplacesRefused)
class _Refusals:
    """Records the renewals whose ARI replaces the CA refused."""

    def __init__(self) -> None:
        self.names: list[tuple[str, str]] = []

    def replaces_refused(self, ca: str, server_name: str) -> None:
        self.names.append((ca, server_name))


class BackoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.path = os.path.join(self.mktemp())
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.backoff = FailureBackoff(self.path, self.clock)
        self.issuer = ControlledIssuer()
        self.guarded = BackoffIssuer(self.issuer, self.backoff)

    def fail_once(self, name: str = "a.test", retry_after: float | None = None) -> None:
        d = self.guarded.issue(name)
        error = IssuanceFailed(name, "CA said no")
        error.retry_after = retry_after  # type: ignore[attr-defined]
        self.issuer._pending.pop(name)[0].errback(error)
        self.failureResultOf(d, IssuanceFailed)

    def test_ladder(self) -> None:
        """
        Consecutive failures wait about 1 min, 10 min, 100 min, then daily;
        while waiting, no order is placed.
        """
        for wait in (*LADDER, LADDER[-1]):
            self.fail_once()
            self.assertEqual(self.backoff.blocked_until("a.test"), self.clock.seconds() + wait)
            f = self.failureResultOf(self.guarded.issue("a.test"), BackedOff)
            self.assertEqual(f.value.until, self.clock.seconds() + wait)
            self.clock.advance(wait)
        self.assertEqual(len(self.issuer.requests), len(LADDER) + 1)

    def test_own_limits_are_not_failures(self) -> None:
        """A refusal by our own issuance limits does not push the name up the ladder."""
        from tenantedge.interfaces import LimitExceeded

        for _ in range(4):
            d = self.guarded.issue("a.test")
            self.issuer._pending.pop("a.test")[0].errback(LimitExceeded("a.test", "concurrent", "queue full"))
            self.failureResultOf(d, LimitExceeded)
        self.assertIsNone(self.backoff.blocked_until("a.test"))
        self.assertEqual(self.backoff.failures("a.test"), 0)

    def test_retry_after_longer_wins(self) -> None:
        self.fail_once(retry_after=7200)
        self.assertEqual(self.backoff.blocked_until("a.test"), self.clock.seconds() + 7200)

    def test_other_names_unaffected(self) -> None:
        self.fail_once("a.test")
        self.guarded.issue("b.test")
        self.assertEqual(self.issuer.requests[-1], "b.test")

    def test_success_clears(self) -> None:
        self.fail_once()
        self.clock.advance(LADDER[0])
        d = self.guarded.issue("a.test")
        self.issuer.complete("a.test", make_bundle("a.test"))
        self.successResultOf(d)
        self.assertEqual(self.backoff.failures("a.test"), 0)

    def test_persisted(self) -> None:
        """A restart (a new backoff object on the same file) keeps the state."""
        self.fail_once()
        self.fail_once("b.test")
        again = FailureBackoff(self.path, self.clock)
        again.load()
        self.assertEqual(again.blocked_until("a.test"), self.backoff.blocked_until("a.test"))
        self.assertEqual(again.failures("b.test"), 1)

    def test_corrupt_file_ignored(self) -> None:
        with open(self.path, "w") as f:
            f.write("{nope")
        again = FailureBackoff(self.path, self.clock)
        again.load()
        self.assertIsNone(again.blocked_until("a.test"))
        self.flushLoggedErrors()


class FallbackTests(SynchronousTestCase):
    def test_second_issuer_used(self) -> None:
        first, second = ControlledIssuer(name="first"), ControlledIssuer(name="second")
        fallback = FallbackIssuer([first, second])
        self.assertEqual(fallback.name, "first -> second")
        d = fallback.issue("a.test")
        first.fail_order("a.test", "rateLimited")
        self.assertEqual(second.requests, ["a.test"])
        bundle = make_bundle("a.test")
        second.complete("a.test", bundle)
        self.assertIs(self.successResultOf(d), bundle)

    def test_all_fail(self) -> None:
        first, second = ControlledIssuer(name="first"), ControlledIssuer(name="second")
        d = FallbackIssuer([first, second]).issue("a.test")
        first.fail_order("a.test", "one")
        second.fail_order("a.test", "two")
        f = self.failureResultOf(d, FallbackFailed)
        self.assertIn("first: one", str(f.value))
        self.assertIn("second: two", str(f.value))


class CancellationTests(SynchronousTestCase):
    def test_cancelled_request_is_a_cancellation(self) -> None:
        """
        A request cancelled from above (the pipeline stopping an order whose
        lock was lost) fails as a cancellation, not as "CA unreachable",
        which the fallback chain would answer by asking the next CA.
        """
        from twisted.internet.defer import CancelledError

        class Hanging:
            def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
                return Deferred()

        client = AcmeClient(f"{BASE}/dir", None, Hanging(), Clock(), request_timeout=10)  # type: ignore[arg-type]
        d = Deferred.fromCoroutine(client.directory())
        d.cancel()
        self.failureResultOf(d, CancelledError)
