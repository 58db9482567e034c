"""
TLS contexts shared by every tenant, and the per-tenant part set on each
connection.

One OpenSSL C{SSL_CTX} per tenant costs about 23 KiB (an empty one alone
about 15 KiB), so ten thousand cached tenants cost 230 MiB. Instead:

  - one I{base} context owns the session-ticket keys and the session
    cache: every connection starts on it, so tickets issued for any tenant
    can be decrypted by any connection of this process, and by every
    worker forked after it was made (OpenSSL makes the ticket keys when
    the context is created; see L{tenantedge.workers});
  - one I{chain} context per distinct intermediate chain (Let's Encrypt
    has a handful) carries the TLS settings, ALPN and the chain; each
    connection is switched to its tenant's (C{Connection.set_context}:
    the ticket keys stay the base's);
  - the tenant's own leaf and key are set on the connection
    (C{Connection.use_certificate} and C{use_privatekey}): a few KiB per
    cached tenant.

Session tickets and the session cache are on (Twisted's defaults turn
both off, which turned every resumption into a full handshake). Both
contexts get a fixed session-ID context, so that sessions survive across
workers. Because one base context serves every tenant, a client could
offer tenant A's session in a handshake for tenant B; OpenSSL would accept
it, so L{resumed_for_another_name} lets the TLS layer refuse such a
connection before any request is read.

OCSP stapling: every serving context has the same OCSP server callback
(L{_staple}). The contexts are shared, so the callback finds the tenant
through the connection's app data: Twisted's TLS protocol
(L{tenantedge.tls}'s, which knows its L{TenantTLS}), or the L{TenantTLS}
itself outside Twisted (L{TenantTLS.connection}); its L{OcspStaple} cell
holds the DER
response to staple (filled and emptied by L{tenantedge.ocsp.OcspStapler},
in the background). The callback only reads that cell.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import attrs
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger

from .certificates import HTTP_PROTOCOLS, CertificateBundle

__all__ = [
    "ServingContexts",
    "TenantTLS",
    "OcspStaple",
    "FixedTLS",
    "make_base_context",
    "session_reused",
    "resumed_for_another_name",
]

# pyOpenSSL deprecates passing its own X509/PKey objects to
# use_certificate/use_privatekey in favour of cryptography's, but converting
# cryptography objects costs about 50 us per handshake (7 us with these),
# measured on this kind of machine; tests/test_contexts.py notices if
# pyOpenSSL stops accepting them.
warnings.filterwarnings(
    "ignore", message=r"Passing pyOpenSSL (X509|PKey) objects is deprecated", category=DeprecationWarning,
    module=__name__,
)

#: Session-ID context of every serving context: the same in every worker
#: and across restarts, so that a session is accepted wherever it lands.
SESSION_ID_CONTEXT = b"tenantedge/1"


def _options(protocols: Sequence[bytes]) -> CertificateOptions:
    return CertificateOptions(
        acceptableProtocols=list(protocols),
        raiseMinimumTo=TLSVersion.TLSv1_2,
        enableSessions=True,
        enableSessionTickets=True,
    )


def _serving_context(protocols: Sequence[bytes]) -> SSL.Context:
    context = _options(protocols).getContext()
    context.set_session_id(SESSION_ID_CONTEXT)
    # With a server-name callback that accepts, OpenSSL records the name
    # in each new session, which resumed_for_another_name reads back. (The
    # certificate itself was chosen before the handshake began.)
    context.set_tlsext_servername_callback(_accept_name)
    # On the base context and on every chain context: OpenSSL reads the
    # status callback from the connection's current context, which
    # set_context switched to the chain context (both are pinned by
    # tests/test_contexts.py).
    context.set_ocsp_server_callback(_staple)
    return context


def _accept_name(connection: SSL.Connection) -> None:
    return None


_log = Logger()
_staple_failed = False


def _staple(connection: SSL.Connection, data: object) -> bytes:
    """
    The OCSP server callback, called by OpenSSL during a handshake whose
    client asked for the certificate status: the DER response of the
    connection's tenant, or C{b""} for none. A dictionary-free attribute
    read; it never raises (pyOpenSSL turns an exception into a fatal
    alert, which would fail the handshake): a failure is logged once per
    process and nothing is stapled.
    """
    global _staple_failed
    try:
        # Twisted's TLS layer replaces the app data with its protocol
        # (twisted.protocols._tls_legacy), which carries the TenantTLS it
        # was made for (tenantedge.tls._EdgeTLSProtocol); outside Twisted
        # it is the TenantTLS itself (TenantTLS.connection).
        app = connection.get_app_data()
        tls = getattr(app, "tenantedge_tls", app)
        if isinstance(tls, TenantTLS):
            return tls.ocsp.der
        return b""
    except Exception:
        if not _staple_failed:
            _staple_failed = True
            _log.failure("OCSP stapling callback failed; stapling nothing (logged once)")
        return b""


def make_base_context(protocols: Sequence[bytes] = HTTP_PROTOCOLS) -> SSL.Context:
    """
    The context every connection starts on: it holds the session-ticket
    keys (made by OpenSSL when this is called) and the session cache.
    """
    return _serving_context(protocols)


@attrs.define(slots=True, eq=False)
class OcspStaple:
    """
    The OCSP response one tenant's handshakes staple (mutable: refreshed in
    the background by L{tenantedge.ocsp.OcspStapler}).

    @ivar der: the DER-encoded response, or C{b""} for none.
    """

    der: bytes = b""


@attrs.frozen(slots=True)
class TenantTLS:
    """
    What one tenant's connections need: its leaf certificate and key, the
    shared context for its chain, and the base context.

    @ivar ocsp: the OCSP response its handshakes staple, if any.
    """

    cert: crypto.X509
    key: crypto.PKey
    context: SSL.Context
    contexts: ServingContexts
    ocsp: OcspStaple = attrs.field(factory=OcspStaple, eq=False)

    def connection(self) -> SSL.Connection:
        """
        A server connection presenting this tenant's certificate; its app
        data is this object (for the OCSP callback) until Twisted's TLS
        layer replaces it with its protocol, which knows this object too.
        """
        connection = SSL.Connection(self.contexts.base, None)
        connection.set_app_data(self)
        connection.set_context(self.context)
        connection.use_certificate(self.cert)
        connection.use_privatekey(self.key)
        return connection


@attrs.frozen(slots=True)
class FixedTLS:
    """A connection source with a context of its own (TLS-ALPN-01 answers)."""

    context: SSL.Context

    def connection(self) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class ServingContexts:
    """
    The base context and the chain contexts, shared by every tenant of this
    process (see the module docstring).

    @ivar base: the context owning the ticket keys; pass one made before
        forking workers so that all of them share the keys.
    """

    def __init__(self, base: SSL.Context | None = None, protocols: Sequence[bytes] = HTTP_PROTOCOLS) -> None:
        self.protocols = tuple(protocols)
        self.base = base if base is not None else make_base_context(self.protocols)
        self._chains: dict[bytes, SSL.Context] = {}

    def tenant(self, bundle: CertificateBundle) -> TenantTLS:
        """The per-tenant part for a bundle (cheap: the chain context is shared)."""
        return TenantTLS(
            crypto.X509.from_cryptography(bundle.leaf),
            crypto.PKey.from_cryptography_key(bundle.key),
            self._chain_context(bundle),
            self,
        )

    def _chain_context(self, bundle: CertificateBundle) -> SSL.Context:
        chain = bundle.chain[1:]
        digest = hashlib.sha256()
        for certificate in chain:
            digest.update(certificate.fingerprint(hashes.SHA256()))
        key = digest.digest()
        context = self._chains.get(key)
        if context is None:
            context = _serving_context(self.protocols)
            for certificate in chain:
                context.add_extra_chain_cert(crypto.X509.from_cryptography(certificate))
            self._chains[key] = context
        return context

    def rotate(self) -> None:
        """
        New session-ticket keys for this process: a new base context for
        the next connections (sessions issued before are not resumed any
        more; each client does one full handshake). Workers rotate through
        their supervisor instead (L{tenantedge.workers}), so that they keep
        sharing keys.
        """
        self.base = make_base_context(self.protocols)

    def chain_count(self) -> int:
        """Distinct chain contexts made so far."""
        return len(self._chains)


def session_reused(connection: SSL.Connection) -> bool:
    """
    Did this handshake resume a session? pyOpenSSL has no accessor for
    C{SSL_session_reused}; this calls the binding on its C{_ssl} pointer
    (pinned by C{tests/test_contexts.py}).
    """
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))


def resumed_for_another_name(connection: SSL.Connection, server_name: str) -> bool:
    """
    Did this (completed) handshake resume a session first made for another
    server name? One base context holds every tenant's sessions, and
    OpenSSL would resume tenant A's session in a handshake for tenant B.

    The name comes from the session itself (the host name field of its
    ASN.1 form, C{i2d_SSL_SESSION}): pyOpenSSL exposes the session but not
    that field, so this goes through its C{_session} pointer and the
    C{i2d_SSL_SESSION} binding; C{tests/test_contexts.py} pins both.
    """
    if not session_reused(connection):
        return False
    session = connection.get_session()
    if session is None:
        return True
    name = _session_host_name(_session_der(session))
    if name is None:
        return False
    # The session keeps the SNI as the client sent it; ours is normalised.
    return name.lower().rstrip(b".") != server_name.encode("ascii")


def _session_der(session: SSL.Session) -> bytes:
    from OpenSSL._util import ffi, lib

    pointer = session._session  # pyOpenSSL's SSL_SESSION*: no public accessor
    length = lib.i2d_SSL_SESSION(pointer, ffi.NULL)
    if length <= 0:
        return b""
    buffer = ffi.new("unsigned char[]", length)
    out = ffi.new("unsigned char **", buffer)
    lib.i2d_SSL_SESSION(pointer, out)
    return bytes(ffi.buffer(buffer, length))


def _session_host_name(der: bytes) -> bytes | None:
    """
    The C{tlsext_hostname [6] EXPLICIT OCTET STRING} of an OpenSSL
    C{SSL_SESSION_ASN1} sequence, or None (no name, or not parseable).
    """
    try:
        tag, body, _ = _der_item(der, 0)
        if tag != 0x30:
            return None
        offset = 0
        while offset < len(body):
            tag, value, offset = _der_item(body, offset)
            if tag == 0xA6:  # [6] constructed
                inner_tag, name, _ = _der_item(value, 0)
                return name if inner_tag == 0x04 else None
    except IndexError:
        return None
    return None


def _der_item(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """(tag, contents, next offset) of the DER item at C{offset}."""
    tag = data[offset]
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    end = offset + length
    if end > len(data):
        raise IndexError("truncated DER")
    return tag, data[offset:end], end

