"""
Pre-checks: before an ACME order is placed for a new name, make sure the
CA's validation would succeed, so that a name that cannot pass costs no
order and no failed validation (Let's Encrypt counts failed validations
per hostname and pauses account/hostname pairs that keep failing).

Opt-in with C{--precheck dns} and/or C{--precheck reach}:

  - L{DNSPrecheck} (C{dns}): the name's A and AAAA records, following
    CNAME chains (at most L{MAX_CNAMES} links), must all be among
    C{--public-address}: C{dns-not-pointing-here} otherwise (no address
    at all, NXDOMAIN, a loop, or an address that is not ours);
  - L{CAAPrecheck} (with C{dns}, one per CA): RFC 8659's relevant CAA
    RRset (the first found climbing from the name towards the TLD) must
    let the CA issue: C{caa-forbids} otherwise;
  - L{ReachPrecheck} (C{reach}): a random nonce published in the
    challenge store under a token of its own is fetched from
    C{http://<name>/.well-known/acme-challenge/<token>} at each address
    the name resolves to, as the CA would: C{unreachable} unless each
    answers 200 with the nonce. The port-80 resource of this edge, or of
    any node sharing the store, answers it.

A check that cannot be made (the resolver does not answer, the challenge
store is down) is an C{error}: counted and logged, and the order goes
ahead, since the CA's own validation is the authority and our resolver's
outage must not stop onboarding. L{PrecheckedIssuer} runs the checks in
front of an issuer and counts each result.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error
from zope.interface import implementer

from .certificates import CertificateBundle
from .interfaces import IChallengeStore, IIssuer, IPrecheck, PrecheckFailed
from .timeouts import TimeoutError, describe_error, is_cancellation, with_deadline

__all__ = [
    "DNSPrecheck",
    "CAAPrecheck",
    "ReachPrecheck",
    "PrecheckedIssuer",
    "LazyResolver",
    "PrecheckFailed",
    "parse_caa",
    "caa_permits",
    "resolve_addresses",
    "CAA_IDENTITIES",
    "DNS_NOT_POINTING_HERE",
    "UNREACHABLE",
    "CAA_FORBIDS",
    "MAX_CNAMES",
    "REACH_TOKEN_PREFIX",
]

DNS_NOT_POINTING_HERE = "dns-not-pointing-here"
UNREACHABLE = "unreachable"
CAA_FORBIDS = "caa-forbids"

#: The CAA record type (RFC 8659); twisted.names has no record class for it.
CAA = 257

#: CNAME links followed at most (a longer chain, or a loop, fails).
MAX_CNAMES = 8

#: Addresses of one name fetched at most by the reach check.
MAX_REACH_ADDRESSES = 4

#: Bytes of a reach answer read at most (the nonce is 32 characters).
MAX_REACH_BODY = 4096

#: Challenge-store tokens of the reach check start with this; real ACME
#: tokens are base64url without it.
REACH_TOKEN_PREFIX = "tenantedge-reach-"

#: The CAA issuer domain of well-known ACME directories (RFC 8659 section
#: 4.2); other CAs need C{--caa-identity}, or their CAA check is skipped.
CAA_IDENTITIES: Mapping[str, str] = {
    "https://acme-v02.api.letsencrypt.org/directory": "letsencrypt.org",
    "https://acme-staging-v02.api.letsencrypt.org/directory": "letsencrypt.org",
}

#: CAA tags this code understands; an unknown tag with the critical flag
#: forbids issuance (RFC 8659 section 4.1).
_KNOWN_TAGS = frozenset({"issue", "issuewild", "iodef"})


def _text(name: Any) -> str:
    """A DNS name (C{dns.Name}, bytes or str) as lower-case text without the root dot."""
    if isinstance(name, dns.Name):
        name = name.name
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return str(name).rstrip(".").lower()


def _address(payload: Any) -> str | None:
    if isinstance(payload, dns.Record_A):
        return str(ipaddress.ip_address(payload.dottedQuad()))
    if isinstance(payload, dns.Record_AAAA):
        return str(ipaddress.ip_address(socket.inet_ntop(socket.AF_INET6, payload.address)))
    return None


@attrs.define
class LazyResolver:
    """
    A C{twisted.names} resolver made at its first query: the system
    resolver re-reads C{/etc/resolv.conf} every minute once made, which a
    configuration that never runs a pre-check should not start.
    """

    make: Callable[[], Any]
    _resolver: Any = attrs.field(default=None, init=False)

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred[Any]:
        if self._resolver is None:
            self._resolver = self.make()
        d: Deferred[Any] = self._resolver.query(query, timeout)
        return d


async def _query(resolver: Any, name: str, rtype: int, timeout: float, clock: IReactorTime) -> list[dns.RRHeader]:
    """
    The answer section for one query; [] for NXDOMAIN (the name does not
    exist: no records of any type).
    """
    try:
        answers, _, _ = await with_deadline(
            resolver.query(dns.Query(name, rtype, dns.IN), timeout=(timeout,)), timeout, clock
        )
    except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
        return []  # NXDOMAIN, from a server or from an authority asked directly
    except dns_error.DomainError as e:
        if type(e) is not dns_error.DomainError:
            raise  # SERVFAIL, REFUSED...: the question could not be answered
        return []  # an authority asked directly about a name outside its zone
    return list(answers)


async def _chase(
    resolver: Any, host: str, name: str, rtype: int, timeout: float, clock: IReactorTime, max_cnames: int
) -> tuple[list[tuple[dns.RRHeader, Any]], list[str]]:
    """
    The records of one type at the end of C{name}'s CNAME chain, whether
    the resolver included the chain's targets in its answer or not.

    @return: (record, payload) pairs, and the names of the chain.
    @raise PrecheckFailed: C{dns-not-pointing-here} (for C{host}) for a
        CNAME loop or a chain longer than C{max_cnames}.
    """
    current = name
    seen = [current]
    while True:
        answers = await _query(resolver, current, rtype, timeout, clock)
        payloads: list[tuple[dns.RRHeader, Any]] = [(r, r.payload) for r in answers]
        cnames = {_text(r.name): _text(p.name) for r, p in payloads if r.type == dns.CNAME and rtype != dns.CNAME}
        owners: dict[str, list[tuple[dns.RRHeader, Any]]] = {}
        for record, payload in payloads:
            if record.type == rtype:
                owners.setdefault(_text(record.name), []).append((record, payload))
        target = current
        while target not in owners and target in cnames:
            target = cnames[target]
            if target in seen:
                raise PrecheckFailed(host, DNS_NOT_POINTING_HERE, f"CNAME loop: {' -> '.join(seen)} -> {target}")
            seen.append(target)
            if len(seen) - 1 > max_cnames:
                raise PrecheckFailed(
                    host, DNS_NOT_POINTING_HERE, f"CNAME chain longer than {max_cnames}: {' -> '.join(seen)}"
                )
        if target in owners:
            return owners[target], seen
        if target == current:
            return [], seen  # no data (or NXDOMAIN) at the end of the chain
        current = target  # the resolver gave the CNAME without its target's records


async def resolve_addresses(
    resolver: Any, server_name: str, timeout: float, clock: IReactorTime, max_cnames: int = MAX_CNAMES
) -> tuple[list[str], str]:
    """
    The name's IPv4 and IPv6 addresses, following CNAMEs (at most
    C{max_cnames} links).

    @return: the addresses (IPv4 first) and a description of the chain
        (C{"a.example -> edge.saas.net"}) for messages.
    @raise PrecheckFailed: C{dns-not-pointing-here} for a CNAME loop or a
        chain too long.
    @raise Exception: whatever the resolver failed with (SERVFAIL, a
        timeout): the check could not be made.
    """
    found: list[str] = []
    chain = server_name
    for rtype in (dns.A, dns.AAAA):
        records, seen = await _chase(resolver, server_name, server_name, rtype, timeout, clock, max_cnames)
        for _, payload in records:
            address = _address(payload)
            if address is not None and address not in found:
                found.append(address)
        if len(seen) > 1:
            chain = " -> ".join(seen)
    return found, chain


@implementer(IPrecheck)
@attrs.define
class DNSPrecheck:
    """
    Does the name resolve to this edge (C{--public-address})? Every A and
    AAAA address must be ours: a CA may validate over any of them (Let's
    Encrypt prefers IPv6), so one stray record fails validation.

    @ivar resolver: a C{twisted.names} resolver (C{IResolver}'s C{query}).
    @ivar public_addresses: the addresses clients (and CAs) reach this
        edge or fleet at, normalised by C{ipaddress}.
    @ivar timeout: deadline for each DNS query.
    """

    resolver: Any
    public_addresses: frozenset[str]
    clock: IReactorTime
    timeout: float = 5.0
    name = "dns"

    def check(self, server_name: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check(server_name))

    async def _check(self, server_name: str) -> None:
        addresses, chain = await resolve_addresses(self.resolver, server_name, self.timeout, self.clock)
        if not addresses:
            raise PrecheckFailed(server_name, DNS_NOT_POINTING_HERE, f"{chain} has no A or AAAA record")
        foreign = [a for a in addresses if a not in self.public_addresses]
        if foreign:
            raise PrecheckFailed(
                server_name, DNS_NOT_POINTING_HERE,
                f"{chain} resolves to {', '.join(foreign)}, not to this edge ({', '.join(sorted(self.public_addresses))})",
            )


def parse_caa(data: bytes) -> tuple[int, str, str]:
    """
    One CAA record's RDATA (RFC 8659 section 4.1): flags, tag (lower-case)
    and value.

    @raise ValueError: for malformed data.
    """
    if len(data) < 2:
        raise ValueError("CAA record too short")
    flags, length = data[0], data[1]
    if length < 1 or len(data) < 2 + length:
        raise ValueError("CAA tag length out of range")
    tag = data[2:2 + length]
    if not tag.isalnum() or not tag.isascii():
        raise ValueError("CAA tag is not alphanumeric")
    return flags, tag.decode("ascii").lower(), data[2 + length:].decode("utf-8", "replace")


def caa_permits(records: Iterable[tuple[int, str, str]], identity: str) -> str | None:
    """
    Whether a relevant CAA RRset lets the CA with this issuer domain issue
    a certificate for a (non-wildcard) name.

    @return: None if it may, else why not.
    """
    identity = identity.rstrip(".").lower()
    issuers = []
    for flags, tag, value in records:
        if flags & 0x80 and tag not in _KNOWN_TAGS:
            return f"a critical CAA property {tag!r} this CA may not understand"
        if tag == "issue":
            issuers.append(value.split(";", 1)[0].strip().rstrip(".").lower())
    if not issuers:
        return None  # no issue property: CAs are not restricted
    if identity in issuers:
        return None
    named = ", ".join(i for i in issuers if i) or "no CA (issue \";\")"
    return f"CAA allows {named}, not {identity}"


@implementer(IPrecheck)
@attrs.define
class CAAPrecheck:
    """
    Would CAA (RFC 8659) let this CA issue? The relevant RRset is the
    first found querying the name, then each parent up to (not including)
    the root; CNAMEs are followed at each level, as the CA's resolver does.

    @ivar identity: the CA's CAA issuer domain (C{letsencrypt.org}).
    @ivar ca: the CA's directory URL, for messages.
    """

    resolver: Any
    identity: str
    clock: IReactorTime
    ca: str = ""
    timeout: float = 5.0
    name = "caa"

    def check(self, server_name: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check(server_name))

    async def _check(self, server_name: str) -> None:
        labels = server_name.split(".")
        for start in range(len(labels) - 1):
            node = ".".join(labels[start:])
            answers, _ = await _chase(self.resolver, server_name, node, CAA, self.timeout, self.clock, MAX_CNAMES)
            records = []
            for _, payload in answers:
                try:
                    records.append(parse_caa(payload.data))
                except (ValueError, AttributeError):
                    continue  # as if absent
            if records:
                problem = caa_permits(records, self.identity)
                if problem is not None:
                    raise PrecheckFailed(server_name, CAA_FORBIDS, f"{problem} (at {node}; CA {self.ca or self.identity})")
                return


@implementer(IPrecheck)
@attrs.define
class ReachPrecheck:
    """
    Does a request to the name on port 80 reach this edge (or fleet)? A
    random nonce is put in the challenge store under a token of its own
    (L{REACH_TOKEN_PREFIX}), then fetched from each address the name
    resolves to, with C{Host: <name>}, as an HTTP-01 validation would be;
    redirects are not followed. The token is withdrawn afterwards.

    @ivar http: a treq C{HTTPClient} for plain HTTP (C{StubTreq} in tests).
    @ivar challenges: the store the port-80 resource answers from (shared
        by a fleet, so any node can answer).
    @ivar resolver: a C{twisted.names} resolver.
    @ivar timeout: deadline for the lookups, and for all the fetches.
    @ivar port: where the CA connects (80; tests use a run-time port).
    """

    http: Any
    challenges: IChallengeStore
    resolver: Any
    clock: IReactorTime
    timeout: float = 5.0
    port: int = 80
    #: Also fetch from addresses that are not globally routable (loopback,
    #: private networks: C{--allow-private-suffix} setups). Off, a tenant
    #: pointing its name at 10.0.0.5 or 169.254.169.254 gets the edge to
    #: fetch nothing there: no probing of the internal network.
    private: bool = False
    name = "reach"

    def check(self, server_name: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check(server_name))

    async def _check(self, server_name: str) -> None:
        addresses, chain = await resolve_addresses(self.resolver, server_name, self.timeout, self.clock)
        if not addresses:
            raise PrecheckFailed(server_name, UNREACHABLE, f"{chain} has no A or AAAA record")
        if not self.private:
            internal = [a for a in addresses if not ipaddress.ip_address(a).is_global]
            if internal:
                raise PrecheckFailed(
                    server_name, UNREACHABLE, f"{chain} resolves to an address that is not public "
                    f"({', '.join(internal[:MAX_REACH_ADDRESSES])})",
                )
        token = REACH_TOKEN_PREFIX + secrets.token_hex(16)
        nonce = secrets.token_hex(16)
        await self.challenges.add(token, nonce)
        try:
            fetches = [Deferred.fromCoroutine(self._fetch(server_name, a, token)) for a in addresses[:MAX_REACH_ADDRESSES]]
            try:
                answers = await with_deadline(gatherResults(fetches, consumeErrors=True), self.timeout, self.clock)
            except TimeoutError:
                raise PrecheckFailed(
                    server_name, UNREACHABLE, f"no answer on port {self.port} within {self.timeout:g}s "
                    f"({', '.join(addresses[:MAX_REACH_ADDRESSES])})"
                ) from None
        finally:
            await self.challenges.remove(token)
        wrong = [f"{address} {what}" for address, what in zip(addresses, answers) if what != nonce]
        if wrong:
            raise PrecheckFailed(server_name, UNREACHABLE, f"port {self.port} is not this edge: {'; '.join(wrong)}")

    async def _fetch(self, server_name: str, address: str, token: str) -> str:
        """The body of a 200 answer, or what happened instead."""
        host = f"[{address}]" if ":" in address else address
        url = f"http://{host}:{self.port}/.well-known/acme-challenge/{token}"
        try:
            response = await self.http.get(url, headers={b"Host": [server_name.encode("ascii")]}, allow_redirects=False)
            body = bytearray()

            def collect(chunk: bytes) -> None:
                if len(body) < MAX_REACH_BODY:
                    body.extend(chunk[:MAX_REACH_BODY - len(body)])

            await treq.collect(response, collect)
        except Exception as e:
            if is_cancellation(e):
                raise
            return f"failed: {describe_error(e)}"
        if response.code != 200:
            return f"answered {response.code}"
        # The nonce, or a word: what another server answered is never
        # repeated (the detail reaches the API and webhooks).
        text = bytes(body).strip().decode("ascii", "replace")
        return text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else "answered something else"


@implementer(IIssuer)
@attrs.define
class PrecheckedIssuer:
    """
    Runs pre-checks, in order, before the wrapped issuer places an order.

    First issuances are always checked; renewals (C{replaces} given) only
    with C{renewals}: a renewal's name validated last time, and a wrong
    check (a reach check the network's hairpin NAT defeats) must not let
    an active certificate lapse.

    @ivar results: counts by C{"<check>:<result>"}, result C{ok}, a
        L{PrecheckFailed} reason, or C{error} (the check could not be
        made; the order goes ahead).
    """

    wrapped: IIssuer
    checks: Sequence[IPrecheck]
    results: Counter[str] = attrs.field(factory=Counter)
    renewals: bool = False
    _log = Logger()

    @property
    def name(self) -> str:
        return str(self.wrapped.name)

    def issue(self, server_name: str, replaces: CertificateBundle | None = None) -> Deferred[CertificateBundle]:
        return Deferred.fromCoroutine(self._issue(server_name, replaces))

    async def _issue(self, server_name: str, replaces: CertificateBundle | None) -> CertificateBundle:
        if replaces is None or self.renewals:
            for check in self.checks:
                await self._run(check, server_name)
        bundle: CertificateBundle = await self.wrapped.issue(server_name, replaces=replaces)
        return bundle

    async def _run(self, check: IPrecheck, server_name: str) -> None:
        label = str(check.name)
        try:
            await check.check(server_name)
        except PrecheckFailed as e:
            self.results[f"{label}:{e.reason}"] += 1
            self._log.warn(
                "no order for {host}: pre-check {check} failed: {reason}: {detail}",
                event="precheck-failed", host=server_name, check=label, reason=e.reason, detail=e.detail,
                issuer=self.name,
            )
            raise
        except Exception as e:
            if is_cancellation(e):
                raise
            self.results[f"{label}:error"] += 1
            self._log.warn(
                "pre-check {check} for {host} could not be made ({error}); ordering anyway",
                event="precheck-error", host=server_name, check=label, error=describe_error(e),
            )
            return
        self.results[f"{label}:ok"] += 1
