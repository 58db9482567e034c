"""
The allow checker: asks the SaaS "is this one of your tenants?" over HTTPS.

Two URL forms:
  - C{--allow-url 'https://api.example.com/check-domain/{domain}'}: the name
    is URL-encoded into the template (path or query); 200 allows, any
    other 4xx or 3xx denies (lua-resty-auto-ssl's contract);
  - C{--ask 'https://api.example.com/ask'}: Caddy's form,
    C{GET URL?domain=NAME}, any 2xx allows; so an operator moving from
    Caddy keeps the endpoint they have.

A timeout, a connection error or a 5xx is "unknown", and unknown is
treated as deny (fail closed) with a log line. The endpoint's certificate
is always verified (C{--allow-ca} adds a private CA; nothing turns
verification off).

Every check carries its purpose as a query parameter, C{purpose=}:

  - C{issue}: a name without a usable stored certificate, about to be
    issued one (L{AllowChecker.decide}, from a first handshake or the
    admin API's issue): answer authoritatively, it costs a CA order;
  - C{renew}: the renewal walk re-asking before it renews
    (L{AllowChecker.ask}, never cached);
  - C{serve}: only whether to keep serving a certificate the edge already
    has (C{decide(name, SERVE)}), which a SaaS may answer from a cache.
    tenantedge itself never sends it today: serving a stored certificate
    needs no allow check (renewal's re-ask archives names the SaaS drops);
    it is there for embedders and the hostname lifecycle.

Unlike Caddy and lua-resty-auto-ssl, answers are cached: allows for
C{--allow-ttl}, denies and unknowns for C{--deny-ttl}, in a bounded LRU,
per purpose: a C{serve} answer never authorises an C{issue} (an C{issue}
or C{renew} answer, being authoritative, also answers a C{serve}).
Concurrent checks for one name and purpose share a single request.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any
from urllib.parse import quote

import attrs
import treq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .interfaces import Decision
from .singleflight import SingleFlight
from .slots import NoSlot, Slots
from .timeouts import TimeoutError, describe_error, with_deadline

__all__ = ["AllowChecker", "Decision", "build_check_url", "DEFINITE_DENY", "SERVE", "ISSUE", "RENEW", "PURPOSES"]

#: The purposes an allow check carries (C{purpose=} in its URL).
SERVE = "serve"
ISSUE = "issue"
RENEW = "renew"
PURPOSES = (SERVE, ISSUE, RENEW)

#: The "status" of a check refused because too many were waiting.
_OVERFLOW = -1

#: The answers that mean "not a tenant any more" when a renewal re-asks.
DEFINITE_DENY = frozenset({403, 404, 410})


def build_check_url(template: str, server_name: str, caddy_style: bool, purpose: str = ISSUE) -> str:
    """
    The URL that asks about one name for one purpose.

    @param template: C{--allow-url} (with C{{domain}}) or C{--ask} (without).
    @param purpose: C{serve}, C{issue} or C{renew}, appended as the query
        parameter C{purpose=} (after C{domain=} in the C{--ask} form).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown allow-check purpose {purpose!r}")
    encoded = quote(server_name, safe="")
    url, hash_, fragment = template.partition("#")
    if caddy_style:
        url += ("&" if "?" in url else "?") + "domain=" + encoded
    else:
        url = url.replace("{domain}", encoded)
    url += ("&" if "?" in url else "?") + "purpose=" + purpose
    return url + hash_ + fragment.replace("{domain}", encoded)


@attrs.define
class AllowChecker:
    """
    @ivar template: the endpoint (see L{build_check_url}).
    @ivar caddy_style: C{--ask} semantics (any 2xx allows) instead of
        C{--allow-url} (only 200 allows).
    @ivar http: a treq C{HTTPClient} (verifying TLS), or C{StubTreq} in tests.
    @ivar clock: for deadlines and cache expiry.
    @ivar timeout: deadline for one check (connect, headers and body).
    @ivar allow_ttl: how long an allow is cached.
    @ivar deny_ttl: how long a deny or an unknown is cached.
    @ivar max_entries: bound on cached decisions (least recently used go).
    @ivar max_in_flight: requests to the endpoint at once.
    @ivar max_waiting: checks waiting for a free slot; beyond, unknown at once.
    @ivar results: checks by result, for metrics (C{overflow}: refused
        because too many were waiting).
    """

    template: str
    caddy_style: bool
    http: Any
    clock: IReactorTime
    timeout: float = 3.0
    allow_ttl: float = 600.0
    deny_ttl: float = 60.0
    max_entries: int = 100_000
    max_in_flight: int = 16
    max_waiting: int = 256
    results: Counter[str] = attrs.field(factory=Counter, init=False)
    _slots: Slots = attrs.field(
        init=False, default=attrs.Factory(lambda self: Slots(self.max_in_flight, self.max_waiting), takes_self=True)
    )
    _cache: OrderedDict[tuple[str, str], tuple[Decision, float]] = attrs.field(factory=OrderedDict, init=False)
    _flights: SingleFlight[Decision] = attrs.field(factory=SingleFlight, init=False)
    _log = Logger()

    def decide(self, server_name: str, purpose: str = ISSUE) -> Deferred[Decision]:
        """
        The (possibly cached) decision for a normalised name. Never fails:
        every error is L{Decision.UNKNOWN}.

        @param purpose: L{ISSUE} (the default: a certificate is about to
            be ordered) or L{SERVE} (only whether to keep serving one);
            a cached C{serve} answer is never used for C{issue}.
        """
        if purpose not in (SERVE, ISSUE):
            raise ValueError(f"decide() is for serve or issue, not {purpose!r} (renewal uses ask())")
        # An authoritative (issue) answer also answers a serve; never the reverse.
        for key in ((server_name, purpose), (server_name, ISSUE)):
            cached = self._cache.get(key)
            if cached is not None:
                decision, expires = cached
                if expires > self.clock.seconds():
                    self._cache.move_to_end(key)
                    self.results["cached"] += 1
                    return succeed(decision)
                del self._cache[key]
        return self._flights.run(
            (purpose, server_name), lambda: Deferred.fromCoroutine(self._ask_and_cache(server_name, purpose))
        )

    def ask(self, server_name: str) -> Deferred[Decision]:
        """
        Ask the endpoint afresh for a renewal, bypassing the cache.

        Stricter than L{decide} about what counts as a no, since a no
        archives a live certificate: only 403, 404 and 410 are
        L{Decision.DENY}; any other refusal (a 429 from a busy API, a
        redirect, a 204 under C{--allow-url}) is L{Decision.UNKNOWN}, and
        the certificate is renewed anyway.

        Sent with C{purpose=renew}; the answer, authoritative, is cached
        as an C{issue} answer.
        """
        return Deferred.fromCoroutine(self._recheck(server_name))

    async def _recheck(self, server_name: str) -> Decision:
        decision, code = await self._ask(server_name, RENEW)
        if code != _OVERFLOW:
            self._remember((server_name, ISSUE), decision)
        if decision is Decision.DENY and code not in DEFINITE_DENY:
            return Decision.UNKNOWN
        return decision

    async def _ask_and_cache(self, server_name: str, purpose: str) -> Decision:
        decision, code = await self._ask(server_name, purpose)
        if code != _OVERFLOW:
            # Refused for want of a slot is not an answer about the name:
            # it is not cached.
            self._remember((server_name, purpose), decision)
        return decision

    def _remember(self, key: tuple[str, str], decision: Decision) -> None:
        ttl = self.allow_ttl if decision is Decision.ALLOW else self.deny_ttl
        self._cache[key] = (decision, self.clock.seconds() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        self.results[decision.value] += 1

    async def _ask(self, server_name: str, purpose: str) -> tuple[Decision, int | None]:
        """
        One request to the endpoint, at most C{max_in_flight} at once: a
        flood of random names must not become a flood on the SaaS's API.
        Up to C{max_waiting} more wait their turn; beyond that the answer
        is unknown at once (fail closed, fast).
        """
        try:
            async with self._slots.held():
                return await self._request(server_name, purpose)
        except NoSlot:
            self.results["overflow"] += 1
            self._log.debug("too many allow checks waiting; refusing {host}", host=server_name)
            return Decision.UNKNOWN, _OVERFLOW

    async def _request(self, server_name: str, purpose: str) -> tuple[Decision, int | None]:
        url = build_check_url(self.template, server_name, self.caddy_style, purpose)

        async def exchange() -> int:
            # No redirects: a 3xx is an answer (deny), and following one
            # could send the check somewhere the operator did not name.
            response = await self.http.get(url, headers={b"Accept": [b"*/*"]}, allow_redirects=False)
            # Read (and drop) the body so the connection can be reused.
            await treq.collect(response, lambda chunk: None)
            return int(response.code)

        try:
            code = await with_deadline(Deferred.fromCoroutine(exchange()), self.timeout, self.clock)
        except TimeoutError:
            self._log.warn(
                "allow endpoint did not answer for {host} within {timeout}s; refusing (fail closed)",
                host=server_name,
                timeout=self.timeout,
            )
            return Decision.UNKNOWN, None
        except Exception as e:
            self._log.warn(
                "allow endpoint unreachable for {host}: {error}; refusing (fail closed)",
                host=server_name,
                error=describe_error(e),
            )
            return Decision.UNKNOWN, None
        if 500 <= code < 600:
            self._log.warn(
                "allow endpoint answered {code} for {host}; refusing (fail closed)", code=code, host=server_name
            )
            return Decision.UNKNOWN, code
        allowed = 200 <= code < 300 if self.caddy_style else code == 200
        return (Decision.ALLOW if allowed else Decision.DENY), code

    def cache_length(self) -> int:
        return len(self._cache)

