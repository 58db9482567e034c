"""
The header rules of the reverse proxy, shared by both request paths (the
twisted.web resource in L{tenantedge.proxy} and the fast HTTP/1.1 relay in
L{tenantedge.http1}), so that the two cannot drift apart.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

__all__ = ["HOP_BY_HOP", "EDGE_ONLY", "ADMIN_HEADER", "connection_tokens", "edge_only", "error_body"]

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


def error_body(code: int, title: str, detail: str) -> bytes:
    """The short HTML page the edge answers with when it cannot proxy."""
    return (
        f"<!doctype html><title>{code} {html.escape(title)}</title>"
        f"<h1>{code} {html.escape(title)}</h1><p>{html.escape(detail)}</p>\n"
    ).encode()
