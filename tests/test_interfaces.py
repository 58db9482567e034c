"""
Every implementation of a side contract provides its interface
(L{zope.interface.verify.verifyObject}): challenge responders, policies
(with the renewal re-ask), issuers and their wrappers, the issuance
limits' "replaces refused" hook, locks, stores, account stores, shared
state and records. The store contract
tests themselves live in C{tests/test_store.py}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tenantedge.backoff import FailureBackoff
from tenantedge.challenges import HTTP01Responder, MemoryChallengeStore, TLSALPN01Responder
from tenantedge.interfaces import (
    IAccountStore,
    ICertificateStore,
    IChallengeResponder,
    IChallengeStore,
    IDomainPolicy,
    IIssuer,
    INameLock,
    IPrecheck,
    IReplacesRefused,
    ISharedRecords,
    ISharedState,
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

    def test_directory_implementations(self) -> None:
        """The one-box implementations: files under the store directory."""
        from tenantedge.accounts import AccountStore
        from tenantedge.journal import RecordJournal
        from tenantedge.shared import DirectoryChallengeStore, DirectoryNameLock, StateFile

        directory = self.mktemp()
        self.assertTrue(verifyObject(IAccountStore, AccountStore(directory)))
        self.assertTrue(verifyObject(IChallengeStore, DirectoryChallengeStore(directory)))
        self.assertTrue(verifyObject(INameLock, DirectoryNameLock(directory, Clock())))
        self.assertTrue(verifyObject(ISharedState, StateFile(None)))
        self.assertTrue(verifyObject(ISharedRecords, RecordJournal(None)))

    def test_redis_account_store(self) -> None:
        from tenantedge.redisstore import Keys, RedisAccountStore

        self.assertTrue(verifyObject(IAccountStore, RedisAccountStore("ca", lambda: None, None, Keys("t"))))  # type: ignore[arg-type]

    def test_caa_precheck(self) -> None:
        from tenantedge.precheck import CAAPrecheck

        check = CAAPrecheck(None, "letsencrypt.org", Clock(), ca="https://ca.example/dir")  # type: ignore[arg-type]
        self.assertTrue(verifyObject(IPrecheck, check))

    def test_cache_observer(self) -> None:
        from twisted.internet.defer import succeed

        from tenantedge.interfaces import ICacheObserver
        from tenantedge.ocsp import OcspStapler

        stapler = OcspStapler(MemoryStore(), None, Clock(), lambda name, bundle: succeed(None))  # type: ignore[arg-type]
        self.assertTrue(verifyObject(ICacheObserver, stapler))
