"""
The header rules of the reverse proxy, shared by both request paths (the
twisted.web resource in L{tenantedge.proxy} and the relay's exchanges in
L{tenantedge.exchange}, for HTTP/1.1 and HTTP/2), so that they cannot
drift apart.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

__all__ = [
    "HOP_BY_HOP", "EDGE_ONLY", "ADMIN_HEADER", "REFUSED_UPGRADES", "connection_tokens", "edge_only", "error_body",
    "upgrade_offer", "trailer_block", "LAST_CHUNK", "FIELD_NAME",
]

#: RFC 9110 section 7.6.1 connection-specific headers, plus the
#: non-standard ones clients and old proxies still send.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers that only the edge may set; a client's copy is dropped
#: (with every C{X-Forwarded-*}). C{x-middleware-subrequest}: Next.js's
#: internal header, whose pass-through let clients skip middleware
#: (CVE-2025-29927).
EDGE_ONLY = frozenset(
    {b"forwarded", b"x-real-ip", b"x-middleware-subrequest", b"x-middleware-prefetch"}
)


#: Fields never forwarded as request trailers (RFC 9110 section 6.5.1:
#: framing, routing, authentication, request modifiers and the content's
#: own metadata belong in the head, and a backend may act on them only
#: there), besides the hop-by-hop and edge-only ones.
NOT_TRAILERS = HOP_BY_HOP | {
    b"content-length", b"content-encoding", b"content-type", b"content-range", b"host", b"authorization",
    b"cookie", b"expect", b"max-forwards", b"range", b"cache-control", b"if-match", b"if-none-match",
    b"if-modified-since", b"if-unmodified-since", b"if-range",
}

#: An HTTP field name (RFC 9110 section 5.1: a token).
FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

#: The end of a chunked body without trailers.
LAST_CHUNK = b"0\r\n\r\n"


def trailer_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """
    The end of a chunked request body carrying the client's trailer
    fields (HTTP/1.1 chunked trailers, or HTTP/2 trailing HEADERS), less
    those a trailer must not carry (L{NOT_TRAILERS}, edge-only fields,
    pseudo-headers, values with line breaks).
    """
    lines = [b"0\r\n"]
    for name, value in fields:
        lower = name.lower()
        # The name is checked here too, whoever parsed it: a CR/LF in one
        # would end the body early and smuggle a request to the backend.
        if (not FIELD_NAME.match(name) or lower in NOT_TRAILERS or edge_only(lower)
                or b"\r" in value or b"\n" in value or b"\0" in value):
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


#: C{Upgrade} protocols never relayed. C{h2c} (cleartext HTTP/2 after an
#: HTTP/1.1 request) would let a client speak HTTP/2 to the backend past
#: every rule of the edge (request smuggling); such a request goes to the
#: backend as a plain one, without its upgrade headers.
REFUSED_UPGRADES = frozenset({b"h2c"})


#: Required on every admin POST (a CSRF guard: a web page cannot send it
#: cross-origin without a preflight, which the admin endpoint never grants).
ADMIN_HEADER = b"X-Tenantedge-Admin"


def edge_only(lower: bytes) -> bool:
    """
    Is this (lower-case) request header one only the edge may set? The
    C{X-Forwarded-*} family, C{Forwarded}, C{X-Real-IP}, Next.js's internal
    headers, and their underscore spellings (C{X_Forwarded_For}), which
    some frameworks fold into the dashed name.
    """
    dashed = lower.replace(b"_", b"-")
    return dashed in EDGE_ONLY or dashed.startswith(b"x-forwarded-")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names listed in C{Connection} (lower case): not to be forwarded."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def upgrade_offer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """
    The C{Upgrade} value of a request the edge relays as an upgrade
    (WebSocket foremost): C{Connection} lists C{upgrade}, there is exactly
    one C{Upgrade} header and none of its protocols is refused
    (L{REFUSED_UPGRADES}). None otherwise: the request is forwarded
    without its upgrade headers, as any other.
    """
    if b"upgrade" not in connection_tokens(headers):
        return None
    offers = [value for name, value in headers if name.lower() == b"upgrade"]
    if len(offers) != 1 or not offers[0].strip():
        return None
    for protocol in offers[0].split(b","):
        # A protocol may carry a version: "h2c/1" is still h2c.
        if protocol.strip().split(b"/")[0].lower() in REFUSED_UPGRADES:
            return None
    return offers[0].strip()


def error_body(code: int, title: str, detail: str) -> bytes:
    """The short HTML page the edge answers with when it cannot proxy."""
    return (
        f"<!doctype html><title>{code} {html.escape(title)}</title>"
        f"<h1>{code} {html.escape(title)}</h1><p>{html.escape(detail)}</p>\n"
    ).encode()
