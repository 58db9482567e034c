"""
Who may tell the edge where a request came from (C{--trusted-proxy}).

The edge sets C{X-Forwarded-For} to the address of the peer it accepted
the connection from (after the PROXY protocol, L{tenantedge.proxyheader}:
the client's own address behind a layer-4 load balancer). A client's
C{X-Forwarded-For} is dropped, since anyone can write one; only a peer
inside a C{--trusted-proxy} network (a CDN or a layer-7 proxy that
terminates TLS again towards the edge) may hand on the chain it received,
and the edge appends that peer to it.

Only C{X-Forwarded-For} is kept from a trusted peer. C{X-Forwarded-Proto}
stays C{https} (the edge itself terminated TLS, whatever the proxy in
front did), C{X-Forwarded-Host} stays the C{Host} checked against the TLS
name (a proxy must not make the backend act for another tenant), and
C{Forwarded} and C{X-Real-IP} stay dropped (one forwarding header, in one
syntax, reaches the backend).

The networks are parsed once, at configuration time; the per-request cost
is nothing when no trusted proxy is configured, and one dictionary lookup
(cached per peer address) when one is and the request carries a chain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["TrustedProxies", "parse_network", "forwarded_for"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Peer addresses whose verdict is remembered; beyond, the memo starts over.
_MEMO_SIZE = 4096


def parse_network(value: str) -> str:
    """
    A CIDR (C{10.0.0.0/8}, C{2001:db8::/32}) or a single address, in
    canonical form.

    @raise ValueError: for anything else, or a network with host bits set
        (C{10.0.0.1/8}: probably a typo, the message says which network).
    """
    text = value.strip()
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (examples: 10.0.0.0/8, 2001:db8::/32, 192.0.2.7)") from None
    raise ValueError(f"{value!r} has host bits set: did you mean {loose}?")


class TrustedProxies:
    """
    The networks whose peers may pass on an C{X-Forwarded-For} chain.

    @ivar networks: the parsed networks.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks: tuple[Network, ...] = tuple(networks)
        self._memo: dict[str, bool] = {}

    @classmethod
    def from_cidrs(cls, cidrs: Sequence[str]) -> TrustedProxies | None:
        """The trusted networks for C{--trusted-proxy} values, or C{None} for none."""
        if not cidrs:
            return None
        return cls(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def trusts(self, host: str) -> bool:
        """
        Is this peer address (as C{getPeer().host} gives it) inside one of
        the networks? An IPv4-mapped IPv6 address counts as its IPv4
        address; anything that is not an IP address (a UNIX socket) is not
        trusted.
        """
        verdict = self._memo.get(host)
        if verdict is None:
            verdict = self._check(host)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[host] = verdict
        return verdict

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def forwarded_for(chain: Sequence[bytes], peer: bytes) -> bytes:
    """
    The C{X-Forwarded-For} value for a trusted peer's request: the chain
    it sent (several header lines joined in order, empty entries dropped),
    then the peer itself.
    """
    entries = [entry.strip() for value in chain for entry in value.split(b",")]
    return b", ".join([*(entry for entry in entries if entry), peer])
