"""
Who may get a certificate.

On-demand TLS is an open door: anyone can point a DNS name at the server or
send any SNI, and every accepted name costs a CA order. The static policy
here is evaluated before anything touches the network; without an allow rule
nothing is ever issued (fail closed).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from .hostnames import matches_suffix, normalize, normalize_suffix
from .interfaces import IDomainPolicy, PolicyRefusal

__all__ = ["StaticPolicy", "parse_deny_rule"]


def parse_deny_rule(rule: str) -> str:
    """
    Normalise one C{--deny} value: a leading dot means the name and
    everything under it, otherwise exactly that name.

    @raise tenantedge.hostnames.InvalidHostname: for an invalid rule.
    """
    if rule.strip().startswith("."):
        return normalize_suffix(rule)
    return normalize(rule.strip(), min_labels=1)


@implementer(IDomainPolicy)
@attrs.frozen
class StaticPolicy:
    """
    Deny rules first, then allowed suffixes; any other name is refused.

    @ivar deny: normalised names (C{"www.example.com"}) and suffixes
        (C{".example.com"}, which also covers C{example.com} itself): the
        operator's own domains, which must never get an on-demand
        certificate.
    @ivar allow_suffixes: normalised suffixes with a leading dot whose
        names need no further check (C{".localhost"} in the demo).
    """

    deny: tuple[str, ...] = ()
    allow_suffixes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, deny: Iterable[str], allow_suffixes: Iterable[str]) -> StaticPolicy:
        return cls(
            tuple(parse_deny_rule(d) for d in deny),
            tuple(normalize_suffix(s) for s in allow_suffixes),
        )

    def static_refusal(self, server_name: str) -> str | None:
        for rule in self.deny:
            if rule.startswith("."):
                if matches_suffix(server_name, rule, include_apex=True):
                    return "deny-list"
            elif server_name == rule:
                return "deny-list"
        return None

    def check(self, server_name: str) -> Deferred[None]:
        reason = self.static_refusal(server_name)
        if reason is not None:
            return fail(PolicyRefusal(server_name, reason))
        for suffix in self.allow_suffixes:
            if matches_suffix(server_name, suffix, include_apex=False):
                return succeed(None)
        return fail(PolicyRefusal(server_name, "not-allowed"))
