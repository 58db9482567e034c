"""
Validation and normalisation of host names taken from untrusted input.

Every name that reaches the certificate store, the policy or a CA comes
through L{normalize} first. A server name in a ClientHello (RFC 6066 section
3) is an ASCII A-label name; a C{Host} header is the same plus an optional
port. Anything else (IP literals, wildcards, path tricks, NUL bytes, raw
UTF-8, garbage punycode) is refused here, so that no later stage has to be
careful about turning a name into a file name, a URL or an ACME identifier.
"""

from __future__ import annotations

import ipaddress
import re

import idna

__all__ = [
    "InvalidHostname",
    "MAX_NAME_LENGTH",
    "MAX_LABEL_LENGTH",
    "normalize",
    "host_from_header",
    "matches_suffix",
    "normalize_suffix",
]

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

# Used with fullmatch: "$" alone would accept a label ending in a newline.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class InvalidHostname(ValueError):
    """
    A host name was refused.

    @ivar reason: a short, log-safe description of why (the offending name
        itself is never echoed, since it is attacker-controlled).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: What an IP literal can be made of (IPv4 dotted digits, IPv6 hex and
#: colons, brackets, a zone): a name with any other character is not one,
#: found without raising (this runs at every handshake).
_IP_CHARACTERS = frozenset("0123456789abcdefABCDEF.:[]%")


def _is_ip_literal(name: str) -> bool:
    if "%" not in name and not _IP_CHARACTERS.issuperset(name):
        return False
    candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def normalize(raw: bytes | str, *, min_labels: int = 2) -> str:
    """
    Turn an untrusted server name into the canonical form used as a key.

    Lower-cases, strips one trailing dot, then requires RFC 1123 syntax:
    ASCII letters, digits and inner hyphens, labels of 1-63 characters, at
    least two labels, 253 characters at most, a last label that is not all
    digits, and C{xn--} labels that decode as valid IDNA 2008.

    @param raw: the name as it came off the wire (C{bytes}) or from
        configuration (C{str}).
    @param min_labels: 2 for host names; 1 for configured suffixes such as
        C{localhost}.
    @return: the normalised name, e.g. C{"shop.acme-corp.com"}.
    @raise InvalidHostname: if the name must not be served or issued for.
    """
    if isinstance(raw, bytes):
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidHostname("non-ASCII bytes in server name") from None
    else:
        name = raw
        if not name.isascii():
            # Configuration may use U-labels; convert them like a browser would.
            try:
                name = idna.encode(name.rstrip("."), uts46=True).decode("ascii")
            except idna.IDNAError:
                raise InvalidHostname("invalid internationalised name") from None
    if "\x00" in name:
        raise InvalidHostname("NUL byte in server name")
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise InvalidHostname("empty server name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidHostname("server name longer than 253 characters")
    if _is_ip_literal(name):
        raise InvalidHostname("IP literal instead of a host name")
    labels = name.split(".")
    if len(labels) < min_labels:
        raise InvalidHostname("single-label server name")
    for label in labels:
        if label == "*":
            raise InvalidHostname("wildcard label in server name")
        if not label:
            raise InvalidHostname("empty label in server name")
        if len(label) > MAX_LABEL_LENGTH:
            raise InvalidHostname("label longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise InvalidHostname("invalid character or hyphen placement in label")
        if label[2:4] == "--":
            if not label.startswith("xn--"):
                raise InvalidHostname("reserved '--' in third and fourth position")
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise InvalidHostname("invalid punycode label") from None
    if labels[-1].isdigit() and len(labels) > 1:
        raise InvalidHostname("all-numeric top-level label")
    return name


def host_from_header(value: bytes) -> str:
    """
    Normalise the host part of an HTTP C{Host} header (or HTTP/2
    C{:authority}), dropping an optional port.

    @raise InvalidHostname: if the header does not name a valid host.
    """
    if value.startswith(b"["):
        raise InvalidHostname("IP literal instead of a host name")
    host, sep, port = value.rpartition(b":")
    if sep:
        if not port.isdigit() or len(port) > 5:
            raise InvalidHostname("invalid port in Host header")
    else:
        host = value
    return normalize(host)


def canonical_host_header(name: str, value: bytes) -> bytes:
    """
    The C{Host} header as the backend should see it: the normalised name
    (lower case, no trailing dot), and the port only when it is not 443.

    @param name: C{host_from_header(value)}, which the caller already has.
    @param value: the header as the client sent it.
    """
    _, sep, port = value.rpartition(b":")
    if sep and port.isdigit() and int(port) != 443:
        return b"%s:%d" % (name.encode("ascii"), int(port))
    return name.encode("ascii")


def normalize_suffix(raw: str) -> str:
    """
    Normalise a configured domain suffix such as C{".localhost"} or
    C{"example.com"}, keeping (or adding) exactly one leading dot.

    @raise InvalidHostname: if the part after the dot is not a valid name.
    """
    return "." + normalize(raw.strip().removeprefix("."), min_labels=1)


def matches_suffix(name: str, suffix: str, *, include_apex: bool) -> bool:
    """
    Does C{name} lie under C{suffix} (as returned by L{normalize_suffix})?

    @param include_apex: whether the suffix's own name (C{example.com} for
        C{.example.com}) matches too. Deny lists include it; allow lists do
        not, so that allowing C{.tenants.example.com} never allows the
        operator's own C{tenants.example.com}.
    """
    return name.endswith(suffix) or (include_apex and name == suffix[1:])
