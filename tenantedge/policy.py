"""
Who may get a certificate.

On-demand TLS is an open door: anyone can point a DNS name at the server or
send any SNI, and every accepted name costs a CA order. Caddy refuses to run
on-demand TLS without an C{ask} endpoint for this reason. tenantedge checks,
in this order, and stops at the first answer:

  1. static rules, before any I/O (L{StaticPolicy.static_refusal}): the
     operator's own domains (C{--deny}), and names no public CA could
     validate because they are not under a public suffix (C{foo.internal},
     C{foo.localhost}); IP literals, wildcards, bad syntax and lengths were
     already refused by L{tenantedge.hostnames.normalize};
  2. C{--allow-suffix}: names under these need no further check;
  3. the allow endpoint (L{tenantedge.allow.AllowChecker}), cached, asked
     with C{purpose=issue} (L{EdgePolicy.recheck}: C{purpose=renew});
  4. nothing else allows: refused. Without an allow rule, nothing is issued.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

import attrs
from publicsuffixlist import PublicSuffixList
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from .allow import AllowChecker, Decision
from .hostnames import matches_suffix, normalize, normalize_suffix
from .interfaces import IDomainPolicy, PolicyRefusal

_log = Logger()

__all__ = [
    "StaticPolicy",
    "EdgePolicy",
    "parse_deny_rule",
    "under_public_suffix",
    "registered_domain",
]


@lru_cache(maxsize=1)
def _icann_list() -> PublicSuffixList:
    return PublicSuffixList(accept_unknown=False, only_icann=True)


@lru_cache(maxsize=1)
def _full_list() -> PublicSuffixList:
    return PublicSuffixList()


def under_public_suffix(server_name: str) -> bool:
    """
    Is the name strictly below a known ICANN public suffix (so a public CA
    can validate it)? C{shop.example.com}: yes; C{foo.internal},
    C{foo.localhost}, C{co.uk}: no.
    """
    return _icann_list().privatesuffix(server_name) is not None


def registered_domain(server_name: str) -> str:
    """
    The registered domain a CA's per-domain limits count against
    (C{shop.acme-corp.com} -> C{acme-corp.com}; private suffixes such as
    C{github.io} count too, as Let's Encrypt does).
    """
    return _full_list().privatesuffix(server_name) or server_name


def parse_deny_rule(rule: str) -> str:
    """
    Normalise one C{--deny} value: a leading dot means the name and
    everything under it, otherwise exactly that name.

    @raise tenantedge.hostnames.InvalidHostname: for an invalid rule.
    """
    if rule.strip().startswith("."):
        return normalize_suffix(rule)
    return normalize(rule.strip(), min_labels=1)


@attrs.frozen
class StaticPolicy:
    """
    The rules that need no I/O.

    @ivar deny: normalised names (C{"www.example.com"}) and suffixes
        (C{".example.com"}, which also covers C{example.com} itself): the
        operator's own domains, which must never get an on-demand
        certificate.
    @ivar allow_suffixes: normalised suffixes with a leading dot whose
        names need no further check (C{".localhost"} in the demo).
    @ivar require_public_suffix: refuse names not under a public suffix
        (on whenever a public CA may be asked; C{--allow-private-suffix}
        turns it off).
    """

    deny: tuple[str, ...] = ()
    allow_suffixes: tuple[str, ...] = ()
    require_public_suffix: bool = False

    @classmethod
    def from_config(
        cls, deny: Iterable[str], allow_suffixes: Iterable[str], require_public_suffix: bool = False
    ) -> StaticPolicy:
        return cls(
            tuple(parse_deny_rule(d) for d in deny),
            tuple(normalize_suffix(s) for s in allow_suffixes),
            require_public_suffix,
        )

    def static_refusal(self, server_name: str) -> str | None:
        for rule in self.deny:
            if rule.startswith("."):
                if matches_suffix(server_name, rule, include_apex=True):
                    return "deny-list"
            elif server_name == rule:
                return "deny-list"
        if self.require_public_suffix and not under_public_suffix(server_name):
            return "not-public-suffix"
        return None

    def allowed_by_suffix(self, server_name: str) -> bool:
        return any(matches_suffix(server_name, s, include_apex=False) for s in self.allow_suffixes)


@implementer(IDomainPolicy)
@attrs.define
class EdgePolicy:
    """
    The full policy: static rules, allowed suffixes, then the allow
    endpoint.

    @ivar static: the I/O-free rules.
    @ivar checker: the allow endpoint, if configured.
    @ivar on_decision: told each answer, C{on_decision(name, decision)}
        (the hostname lifecycle records the last one and when).
    """

    static: StaticPolicy
    checker: AllowChecker | None = None
    on_decision: Callable[[str, Decision], None] | None = None

    def _tell(self, server_name: str, decision: Decision) -> Decision:
        if self.on_decision is not None:
            try:
                self.on_decision(server_name, decision)
            except Exception:
                _log.failure("recording the allow decision for {host} failed", host=server_name)
        return decision

    @property
    def issues_anything(self) -> bool:
        """False when no rule could ever allow a name (fail closed)."""
        return bool(self.static.allow_suffixes) or self.checker is not None

    def static_refusal(self, server_name: str) -> str | None:
        return self.static.static_refusal(server_name)

    def check(self, server_name: str) -> Deferred[None]:
        reason = self.static_refusal(server_name)
        if reason is not None:
            if reason == "deny-list":
                self._tell(server_name, Decision.DENY)
            return fail(PolicyRefusal(server_name, reason))
        if self.static.allowed_by_suffix(server_name):
            self._tell(server_name, Decision.ALLOW)
            return succeed(None)
        if self.checker is None:
            return fail(PolicyRefusal(server_name, "not-allowed"))
        return self.checker.decide(server_name).addCallback(self._tell_decided, server_name)

    def _tell_decided(self, decision: Decision, server_name: str) -> None:
        self._decided(self._tell(server_name, decision), server_name)

    @staticmethod
    def _decided(decision: Decision, server_name: str) -> None:
        if decision is Decision.DENY:
            raise PolicyRefusal(server_name, "allow-check-deny")
        if decision is Decision.UNKNOWN:
            raise PolicyRefusal(server_name, "allow-check-unknown")

    def recheck(self, server_name: str) -> Deferred[Decision]:
        """
        Ask again before renewing a stored certificate, bypassing cached
        allow decisions.

        L{Decision.DENY} only for a definite no: the deny list or the allow
        endpoint's 4xx. A name that no rule covers any more, or an endpoint
        that is down, is L{Decision.UNKNOWN}: renewing anyway keeps tenants
        online through a configuration slip or an outage of the SaaS API.
        """
        if self.static_refusal(server_name) == "deny-list":
            return succeed(self._tell(server_name, Decision.DENY))
        if self.static.allowed_by_suffix(server_name):
            return succeed(self._tell(server_name, Decision.ALLOW))
        if self.checker is None:
            return succeed(Decision.UNKNOWN)
        return self.checker.ask(server_name).addCallback(lambda decision: self._tell(server_name, decision))
