"""
The contracts between tenantedge's parts.

Only L{tenantedge.tap} knows concrete classes; everything else talks through
these interfaces, so the directory store and a shared store, the ACME issuer
and the local CA, a static policy and an allow-URL checker are
interchangeable, and each has a fake in L{tenantedge.testing} that passes the
same contract tests.

Methods here omit C{self}, as zope.interface expects. Every method that may
wait returns a C{Deferred}; the docstrings say what it fires with and how it
fails.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "ICertificateStore",
    "IOcspStore",
    "IIssuer",
    "IDomainPolicy",
    "IChallengeStore",
    "IChallengeResponder",
    "IRenewalExemption",
    "IReplacesRefused",
    "INameLock",
    "HeldLock",
    "ISharedState",
    "ISharedRecords",
    "IAccountStore",
    "ICacheObserver",
    "Decision",
    "PolicyRefusal",
    "IssuanceFailed",
    "BackedOff",
    "LimitExceeded",
    "IPrecheck",
    "PrecheckFailed",
]


class Decision(enum.Enum):
    """What the policy (or the allow endpoint) says about a name."""

    ALLOW = "allow"
    DENY = "deny"
    UNKNOWN = "unknown"


class PolicyRefusal(Exception):
    """
    The policy will not let this name have a certificate.

    A refusal is not a failure of the CA: issuer fallback and failure
    backoff do not apply, and the handshake ends with an
    C{unrecognized_name} alert.

    @ivar host: the normalised name.
    @ivar reason: a short machine-friendly reason (C{"deny-list"},
        C{"not-allowed"}, ...), used for logs and refusal counters.
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason


class IssuanceFailed(Exception):
    """
    An issuer could not produce a certificate for a name.

    @ivar host: the normalised name.
    @ivar detail: what went wrong, as the CA or local issuer said it.
    """

    def __init__(self, host: str, detail: str) -> None:
        super().__init__(f"{host}: {detail}")
        self.host = host
        self.detail = detail


class BackedOff(IssuanceFailed):
    """
    The name failed recently; no new order is placed before C{until}.
    """

    def __init__(self, host: str, until: float, failures: int) -> None:
        super().__init__(host, f"backing off after {failures} failed attempt(s)")
        self.until = until
        self.failures = failures


class LimitExceeded(IssuanceFailed):
    """
    A limit of our own refused the order before it reached the CA.

    @ivar limit: which (C{"concurrent"}, C{"new-orders"}, C{"domain-week"},
        C{"failed-validations"}).
    @ivar retry_after: seconds until the window has room, if known.
    """

    def __init__(self, host: str, limit: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(host, f"issuance limit {limit}: {detail}")
        self.limit = limit
        self.retry_after = retry_after


class PrecheckFailed(IssuanceFailed):
    """
    A pre-check found that the CA's validation of a name would fail, so no
    order was placed (L{IPrecheck}).

    A failure of the name, not of a CA: the failure backoff records it (no
    order is spent, no failed validation counted), and with several CAs a
    CAA refusal of one moves on to the next.

    @ivar host: the normalised name.
    @ivar reason: one of C{"dns-not-pointing-here"}, C{"unreachable"},
        C{"caa-forbids"}: short, stable, for metrics and the hostname's
        C{failing} state.
    @ivar detail: one line for people: what was found (the addresses the
        name resolves to, the CAA record, what answered on port 80).
    """

    retry_after: float | None = None

    def __init__(self, host: str, reason: str, detail: str) -> None:
        super().__init__(host, f"pre-check {reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def problem_type(self) -> str:
        """The hostname's C{failing} reason (the lifecycle records it as the problem type)."""
        return self.reason


class ICertificateStore(Interface):
    """
    Persistent storage of certificate bundles, keyed by normalised host name.

    The on-disk implementation keeps txacme's format: one
    C{<server-name>.pem} per name holding the private key, the leaf
    certificate and its chain.

    A missing name is a C{KeyError} (as in txacme), so callers can tell
    "never stored" from "the store is broken".
    """

    def get(server_name):
        """
        Fetch the bundle stored for a name.

        @param server_name: a normalised host name.
        @return: a Deferred firing with a
            L{tenantedge.certificates.CertificateBundle}, or failing with
            C{KeyError} if nothing usable is stored for that name (a corrupt
            entry is logged and counts as missing).
        """

    def store(server_name, bundle):
        """
        Store (or replace) the bundle for a name, atomically: a reader sees
        either the old bundle or the new one, never a mix, and a crash at
        any point leaves one of them on disk.

        @return: a Deferred firing with C{None} once the bundle is durable.
        """

    def delete(server_name):
        """
        Remove a name's bundle from service. Keys are never destroyed:
        implementations move the entry to an archive.

        @return: a Deferred firing with C{None}, or failing with C{KeyError}
            if nothing is stored for the name.
        """

    def changed(server_names):
        """
        Which of the given names' entries changed (replaced or removed by
        another process) since this store last read or wrote them; lets a
        running server notice what the admin CLI or a fleet peer did.

        @return: a Deferred firing with a list of names.
        """

    def names():
        """
        List the names that have an entry.

        @return: a Deferred firing with a list of normalised host names;
            no entry is read or parsed to produce it.
        """


class IOcspStore(Interface):
    """
    A certificate store that can also keep each name's latest OCSP
    response beside its certificate. Optional: without it, responses are
    kept in memory only and fetched again after a restart.
    """

    def get_ocsp(server_name):
        """
        @return: a Deferred firing with the stored DER response, or
            failing with C{KeyError} if none is stored. It may be for an
            older certificate of the name: callers validate it.
        """

    def store_ocsp(server_name, der):
        """
        Keep the DER response for a name (replacing any before it).

        @return: a Deferred firing with C{None}.
        """


class IIssuer(Interface):
    """
    Something that can produce a new certificate for a name: an ACME CA or
    the local CA. It is not responsible for policy, caching, storage or
    de-duplication; L{tenantedge.resolver.CertificateResolver} is.
    """

    name = Attribute("A short label for logs, e.g. C{'internal'} or a CA URL.")

    def issue(server_name, replaces=None):
        """
        Obtain a new certificate for one name.

        @param server_name: a normalised host name the policy has allowed.
        @param replaces: the L{tenantedge.certificates.CertificateBundle}
            this one renews, if any: an ACME CA with renewal information
            (RFC 9773) is told which certificate is replaced, and such
            renewals are exempt from its rate limits.
        @return: a Deferred firing with a
            L{tenantedge.certificates.CertificateBundle}, or failing with
            L{IssuanceFailed} (or a subclass carrying the CA's problem).
        """


class IDomainPolicy(Interface):
    """
    Decides whether a name may get a certificate at all.
    """

    def static_refusal(server_name):
        """
        The checks that need no I/O, run at every cache miss before even the
        store is read: a name the operator denies must not be served from an
        old stored certificate either.

        @param server_name: a normalised host name.
        @return: a refusal reason (C{str}) or C{None}; never a Deferred.
        """

    def check(server_name):
        """
        @param server_name: a normalised host name.
        @return: a Deferred firing with C{None} if the name may have a
            certificate, or failing with L{PolicyRefusal}.
        """

    def recheck(server_name):
        """
        Ask again before renewing a stored certificate, bypassing any
        cached answer.

        @param server_name: a normalised host name.
        @return: a Deferred firing with a L{Decision}: C{DENY} only for a
            definite no (renewal then archives the certificate), C{UNKNOWN}
            when the answer could not be had (renewal goes ahead, so an
            outage of the SaaS's API never takes tenants offline). Never
            fails.
        """


class IPrecheck(Interface):
    """
    A cheap test, run before an ACME order is placed, that the CA's
    validation of a name would succeed (L{tenantedge.precheck}).
    """

    name = Attribute("A short label for metrics and logs: C{'dns'}, C{'caa'} or C{'reach'}.")

    def check(server_name):
        """
        @param server_name: a normalised host name the policy allowed.
        @return: a Deferred firing with C{None} if the name would pass;
            failing with L{PrecheckFailed} if it would not; failing with
            any other exception if the check itself could not be made (a
            resolver that does not answer): the caller then counts an
            C{error} and lets the order go ahead (the CA's own validation
            decides).
        """


class IChallengeStore(Interface):
    """
    Pending ACME HTTP-01 challenge responses, shared between the issuer that
    creates them and the port-80 resource that answers the CA.
    """

    def add(token, key_authorization):
        """
        Make C{token} answerable with C{key_authorization} (both C{str}).

        @return: a Deferred firing with C{None}.
        """

    def remove(token):
        """
        Stop answering C{token}; removing an unknown token is not an error.

        @return: a Deferred firing with C{None}.
        """

    def get(token):
        """
        @return: a Deferred firing with the key authorisation for C{token},
            or failing with C{KeyError} if none is pending.
        """


class IChallengeResponder(Interface):
    """
    Makes one ACME challenge type answerable while an order is pending:
    HTTP-01 through an L{IChallengeStore} read by the port-80 resource,
    TLS-ALPN-01 through the HTTPS listener.
    """

    challenge_type = Attribute("The ACME challenge type answered, e.g. C{'http-01'}.")

    def publish(server_name, token, key_authorization):
        """
        Start answering a challenge.

        @return: an awaitable (a coroutine or a Deferred) that completes
            once the CA may validate.
        """

    def withdraw(server_name, token):
        """
        Stop answering a challenge; called whatever the order's outcome.

        @return: an awaitable completing once the answer is gone.
        """


class IRenewalExemption(Interface):
    """
    Knows whether an order replacing a certificate will be an ARI renewal
    (RFC 9773 C{replaces}), which the CA exempts from its rate limits, so
    our own limits exempt it too.
    """

    def renewal_exempt(replaces):
        """
        @param replaces: the L{tenantedge.certificates.CertificateBundle}
            being renewed, or C{None} for a first issuance.
        @return: an awaitable firing with C{bool}; never fails (an unknown
            answer is C{False}: the order is counted).
        """


class IReplacesRefused(Interface):
    """
    Told when a CA refuses an ARI C{replaces} and the renewal goes on as a
    plain order, which the CA counts against its limits.
    """

    def replaces_refused(ca, server_name):
        """
        Called synchronously, before the plain order is placed.

        @param ca: the CA's directory URL.
        @raise LimitExceeded: to stop the plain order (the limits are full).
        """


class HeldLock:
    """
    A per-name lock, held: call it to release it (a second call does
    nothing). C{lost} fires (with C{None}) if the lock is lost while held
    (a fleet lock that expired because its holder could not extend it in
    time): another process may hold it now, and whoever held this one
    stops the order it was placing rather than race the new holder.
    """

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self.released = False
        self.lost: Deferred[None] = Deferred()

    def __call__(self) -> None:
        if not self.released:
            self.released = True
            self._release()

    def lose(self) -> None:
        """The implementation found the lock gone: tell the holder (once; not after release)."""
        if not self.released and not self.lost.called:
            self.lost.callback(None)


class INameLock(Interface):
    """
    Mutual exclusion per name for issuance and renewal, so that one order
    per name runs at a time across everything sharing the lock: one
    process (in memory), the workers of one box, or a fleet (a shared
    store's lock). Whoever takes it re-reads the store before ordering.
    """

    def acquire(server_name):
        """
        Wait for the name's lock.

        @return: a Deferred firing with a L{HeldLock} (call it to
            release); cancelling the Deferred abandons the wait.
        """


class ISharedState(Interface):
    """
    A small JSON document (the failure backoff, the issuance limit windows)
    that every process or node on one store shares. Synchronous, because
    the backoff and limits are consulted synchronously on every order: an
    implementation over the network answers from a copy it keeps fresh.
    """

    path = Attribute("Where it lives, for log lines (a file path, or a Redis key).")

    def changed():
        """
        @return: C{True} if someone else changed the state since this one
            last read it (then the caller reads it again).
        """

    def read():
        """
        @return: the data (C{None} if there is none).
        @raise OSError: if it cannot be read.
        @raise ValueError: if it is not JSON.
        """

    def update(change):
        """
        Read-modify-write without losing anyone else's update: C{change} is
        called with the current data (or L{tenantedge.shared.KEEP} when it
        could not be read) and returns the new data; it may be called more
        than once (an implementation retrying on a concurrent change), so
        it must derive everything from its argument.

        @return: the new data. A failure to save is logged, never raised.
        """


class ISharedRecords(Interface):
    """
    Small JSON records by key (each hostname's lifecycle) that every
    process or node on one store shares, changed one record at a time: a
    change costs the same with ten names or a hundred thousand, where an
    L{ISharedState} document is rewritten whole. Synchronous, like
    L{ISharedState}: reads are answered from a copy kept fresh.
    """

    path = Attribute("Where it lives, for log lines (a file path, or a Redis key).")

    def load():
        """
        Read every record (at start-up).

        @raise OSError: if they cannot be read.
        """

    def get(key):
        """
        @return: the key's record (a dict the caller may keep but not
            change), or C{None}.
        """

    def items():
        """
        @return: a new list of every (key, record) pair, fresh.
        """

    def update(key, change, stored=None):
        """
        Read-modify-write one record without losing anyone else's update:
        C{change} is called with the current record (or C{None}) and
        returns the new one, or C{None} to remove it (or the very record it
        was given, to leave it as it is). It may be called more than once
        (an implementation retrying on a concurrent change), so it must
        derive everything from its argument.

        @param stored: if given, called once with the record as it was
            finally stored (which may differ from the return value, for an
            implementation over the network that applies C{change} again
            to a newer record): what an event about the change must say.
            With a failure to save, called with what is kept in memory.
        @return: the new record as this process sees it now. A failure to
            save is logged, never raised (the change is kept in memory).
        """


class IAccountStore(Interface):
    """
    Where one CA's ACME account key and account URL are kept: files under
    C{<store>/accounts/} (L{tenantedge.accounts.AccountStore}), or the
    fleet's Redis (L{tenantedge.redisstore.RedisAccountStore}), where the
    first node to start creates the key the others adopt.
    """

    path = Attribute("Where it lives, for log lines.")

    def load_or_create_key():
        """
        At start-up (blocking, after privileges are dropped): the account
        key, created once.

        @return: a C{josepy.JWK}.
        @raise tenantedge.interfaces.StoreError: if it cannot be read or is
            exposed.
        """

    def load_url(key):
        """
        @return: the remembered account URL if it belongs to C{key} (a
            replaced key must register again), else C{None}.
        """

    def save_url(url, directory_url, key):
        """
        Remember the account URL registered for C{key}.

        @return: a Deferred firing when it is saved (a shared store logs a
            failure to save and fires anyway: the account registers again
            at the next start).
        """


class ICacheObserver(Interface):
    """
    Told what the resolver's handshake cache holds (the OCSP stapler,
    L{tenantedge.ocsp.OcspStapler}). Both calls are synchronous and must be
    cheap: they run on the resolver's path.
    """

    def remembered(server_name, bundle, tls):
        """
        A context for C{bundle} (a L{tenantedge.certificates.CertificateBundle})
        is cached now (first use, reload, renewal); C{tls} is its
        L{tenantedge.contexts.TenantTLS}.
        """

    def forgotten(server_name):
        """The name's cached context was dropped (forgotten, evicted, expired)."""
