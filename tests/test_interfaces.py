"""
Every implementation of a side contract provides its interface
(L{zope.interface.verify.verifyObject}): challenge responders, policies
(with the renewal re-ask), issuers and their wrappers, the issuance
limits' "replaces refused" hook, locks and stores. The store contract
tests themselves live in C{tests/test_store.py}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.backoff import FailureBackoff
from tenantedge.challenges import HTTP01Responder, MemoryChallengeStore, TLSALPN01Responder
from tenantedge.interfaces import (
    ICertificateStore,
    IChallengeResponder,
    IChallengeStore,
    IDomainPolicy,
    IIssuer,
    INameLock,
    IReplacesRefused,
)
from tenantedge.issuer import BackoffIssuer, FallbackIssuer
from tenantedge.limits import IssuanceLimits
from tenantedge.pipeline import MemoryNameLock
from tenantedge.policy import EdgePolicy, StaticPolicy, registered_domain
from tenantedge.testing import ControlledIssuer, CountingIssuer, MemoryStore


class InterfaceTests(SynchronousTestCase):
    def test_challenge_responders(self) -> None:
        self.assertTrue(verifyObject(IChallengeResponder, HTTP01Responder(MemoryChallengeStore())))
        self.assertTrue(verifyObject(IChallengeResponder, TLSALPN01Responder(Clock(), MemoryChallengeStore())))
        self.assertTrue(verifyObject(IChallengeStore, MemoryChallengeStore()))

    def test_policy_has_recheck(self) -> None:
        self.assertTrue(verifyObject(IDomainPolicy, EdgePolicy(StaticPolicy())))

    def test_issuers(self) -> None:
        inner = ControlledIssuer()
        for issuer in (
            inner,
            CountingIssuer(inner),
            FallbackIssuer([inner]),
            BackoffIssuer(inner, FailureBackoff(None, Clock())),
        ):
            self.assertTrue(verifyObject(IIssuer, issuer), issuer)

    def test_limits_hear_refused_replaces(self) -> None:
        self.assertTrue(verifyObject(IReplacesRefused, IssuanceLimits(None, Clock(), registered_domain)))

    def test_lock_and_store(self) -> None:
        self.assertTrue(verifyObject(INameLock, MemoryNameLock()))
        self.assertTrue(verifyObject(ICertificateStore, MemoryStore()))
