"""
Command-line options and service wiring for C{twistd tenantedge} and
C{twist tenantedge}.

This is the one module that picks concrete classes and touches the global
reactor. Everything a user can set is an option here, and every option can
also come from a TOML file (C{--config}); the command line wins.
"""

from __future__ import annotations

import datetime
import encodings.idna  # noqa: F401  (see below)
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

from cryptography import x509
from hyperlink import URL
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from . import __version__
from .accounts import AccountStore, account_directory
from .admin import AdminResource, EdgeMetrics
from .acme import AcmeClient
from .backoff import FailureBackoff
from .challenges import HTTP01Responder, HTTPRedirectRoot, MemoryChallengeStore, TLSALPN01Responder
from .demo import DemoBackendService
from .hostnames import InvalidHostname
from .issuer import KEY_TYPES, AcmeIssuer, BackoffIssuer, FallbackIssuer, OneOrderPerName
from .localca import ROOT_NAME_PREFIX, LocalCA, local_ca_check
from .trust import acme_http_client, https_policy
from .allow import AllowChecker
from .limits import IssuanceLimits, LimitedIssuer
from .policy import EdgePolicy, StaticPolicy, registered_domain
from .proxy import EdgeSite, ProxyResource, make_agent, make_backend_pool
from .renewal import RenewalService
from .resolver import CacheRefresher, CertificateResolver
from .store import DirectoryStore, StoreError
from .tls import OnDemandTLSFactory

__all__ = ["Options", "makeService", "TenantEdgeService", "parse_duration"]

# encodings.idna is imported above, before twistd drops privileges (-u/-g):
# the resolver needs it for host names, and an interpreter installed where
# the unprivileged user cannot read would fail to import it lazily later.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

DEMO_DEFAULTS = {
    "https": "tcp:8443:interface=127.0.0.1",
    "http": "tcp:8080:interface=127.0.0.1",
    "store": "./tenantedge-demo",
    "ca": ["internal"],
    "allow-suffix": [".localhost"],
}


def parse_duration(value: str) -> float:
    """
    Seconds from C{"90"}, C{"90s"}, C{"10m"}, C{"12h"}, C{"7d"} or C{"250ms"}.

    @raise ValueError: for anything else, or a value that is not positive.
    """
    match = _DURATION.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a duration (examples: 90, 90s, 10m, 12h, 7d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def parse_size(value: str) -> int:
    """Bytes from C{"1048576"}, C{"512K"}, C{"64M"} or C{"2G"}; 0 means no limit."""
    match = re.match(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", str(value), re.IGNORECASE)
    if match is None:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, 512K, 64M, 2G)")
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2).upper()]


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1")
    return number


def _http_url(value: str, schemes: Sequence[str] = ("http", "https")) -> URL:
    """
    Parse an option's URL.

    @raise ValueError: unless it is a URL with one of C{schemes} and a host.
    """
    try:
        url = URL.from_text(value)
    except ValueError:
        url = None
    if url is None or url.scheme not in schemes or not url.host:
        raise ValueError(f"{value!r} is not a {' or '.join(s + '://' for s in schemes)} URL with a host")
    return url


def _backend_url(value: str) -> str:
    url = _http_url(value)
    if url.query or url.fragment:
        raise ValueError(f"{value!r}: a backend URL takes no query or fragment")
    return value


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def coerce(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    coerce.coerceDoc = f"One of {', '.join(choices)}."  # type: ignore[attr-defined]
    return coerce


def _allow_url(value: str) -> str:
    _http_url(value)
    if "{domain}" not in value:
        raise ValueError(f"{value!r} has no {{domain}} placeholder")
    return value


def _ask_url(value: str) -> str:
    if _http_url(value).fragment:
        raise ValueError(f"{value!r}: no fragment allowed")
    return value


class Options(usage.Options):
    """
    Options for C{twistd tenantedge}. See the README for the full story of
    each one.
    """

    synopsis = "[options]"
    longdesc = (
        "HTTPS edge with on-demand TLS: certificates for tenants' own domains are "
        "obtained at the first handshake and the requests reverse-proxied to the backend."
    )

    optFlags = [
        ["allow-private-suffix", None, "Also issue for names not under a public suffix (foo.internal): "
         "for private ACME CAs and tests."],
        ["demo", None, "Demo mode: local CA, store in ./tenantedge-demo, every name under "
         ".localhost allowed, built-in demo backend, https on 127.0.0.1:8443 and http on 127.0.0.1:8080."],
    ]

    optParameters = [
        ["config", None, None, "TOML file with option values; command-line options win."],
        ["https", None, "tcp:443", "Endpoint for HTTPS (twisted endpoint syntax)."],
        ["http", None, "tcp:80", "Endpoint for HTTP: ACME HTTP-01 challenges and redirects to HTTPS."],
        ["backend", None, "http://127.0.0.1:3000", "Base URL of the application backend.", _backend_url],
        ["store", None, "/var/lib/tenantedge", "Certificate store directory (txacme format)."],
        ["access-log", None, None, "Write an access log of HTTPS requests (combined format) to this file."],
        ["email", None, None, "Contact e-mail for the ACME account(s)."],
        ["key-type", None, "ecdsa-p256", "Certificate key type: ecdsa-p256 or rsa2048.", _choice(KEY_TYPES)],
        ["challenge", None, "http-01", "ACME challenge to answer: http-01 or tls-alpn-01.",
         _choice(("http-01", "tls-alpn-01"))],
        ["eab-kid", None, None, "External Account Binding key identifier (for CAs that require it)."],
        ["eab-hmac-key", None, None, "External Account Binding HMAC key (base64url)."],
        ["allow-url", None, None, "Allow endpoint: 'https://api.example.com/check-domain/{domain}'; "
         "200 allows, 4xx denies, errors and 5xx deny (fail closed).", _allow_url],
        ["ask", None, None, "Caddy-style allow endpoint: GET URL?domain=NAME, any 2xx allows.", _ask_url],
        ["allow-timeout", None, 3.0, "Deadline for one allow check.", parse_duration],
        ["allow-ttl", None, 600.0, "How long an allow decision is cached.", parse_duration],
        ["deny-ttl", None, 60.0, "How long a deny (or unknown) decision is cached.", parse_duration],
        ["max-concurrent-issuance", None, 4, "ACME orders running at once (all CAs).", _positive_int],
        ["max-new-orders", None, 300, "ACME orders per account per 3 hours.", _positive_int],
        ["max-certs-per-domain", None, 50, "Certificates per registered domain per account per week.", _positive_int],
        ["renew-check-interval", None, 43200.0, "Seconds between renewal checks (plus up to 10% jitter).",
         parse_duration],
        ["renew-before", None, 30 * 86400.0, "Renew when less than this (or a third of the lifetime, "
         "whichever is shorter) is left, unless the CA suggests a window (ARI).", parse_duration],
        ["admin", None, "tcp:9180:interface=127.0.0.1", "Admin endpoint (metrics, CLI actions); 'none' to disable."],
        ["store-poll", None, 5.0, "How often cached certificates are checked for changes made by others "
         "(the admin CLI, a fleet peer).", parse_duration],
        ["cache-size", None, 10000, "Number of ready TLS contexts kept in memory.", _positive_int],
        ["max-body-size", None, 64 * 1024 * 1024, "Largest request body accepted (bytes; K, M, G suffixes); "
         "larger ones get 413 before they are spooled. 0: no limit.", parse_size],
        ["backend-timeout", None, 60.0, "Seconds to wait for backend response headers before 504.", parse_duration],
        ["hello-timeout", None, 10.0, "Seconds a client has to send its ClientHello.", parse_duration],
        ["issue-timeout", None, 90.0, "Longest a handshake waits for a certificate.", parse_duration],
        ["internal-validity", None, 7 * 86400.0, "Lifetime of local-CA leaf certificates.", parse_duration],
    ]

    #: Repeatable options.
    _LISTS = ("allow-suffix", "deny", "ca", "ca-root", "allow-ca")

    def __init__(self) -> None:
        super().__init__()
        self["allow-suffix"] = []
        self["deny"] = []
        self["ca"] = ["letsencrypt"]
        self["ca-root"] = []
        self["allow-ca"] = []
        self.explicit: set[str] = set()
        self._from_cli: set[str] = set()

    def opt_allow_suffix(self, value: str) -> None:
        """Allow certificates for every name under this suffix (repeatable)."""
        self._add_list_value("allow-suffix", value)

    def opt_deny(self, value: str) -> None:
        """Never issue for this name; a leading '.' denies the whole suffix (repeatable)."""
        self._add_list_value("deny", value)

    def opt_ca(self, value: str) -> None:
        """
        Issuer: letsencrypt (default), letsencrypt-staging, internal (local
        CA) or an ACME directory URL. Repeat to fall back to the next CA when
        one fails for a name.
        """
        self._add_list_value("ca", value)

    def opt_ca_root(self, value: str) -> None:
        """PEM file of extra trust anchors for the ACME server's HTTPS (private CA, Pebble); repeatable."""
        self._add_list_value("ca-root", value)

    def opt_allow_ca(self, value: str) -> None:
        """PEM file of extra trust anchors for the allow endpoint's HTTPS (repeatable)."""
        self._add_list_value("allow-ca", value)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"tenantedge {__version__}")
        sys.exit(0)

    def _add_list_value(self, key: str, value: str) -> None:
        if key not in self._from_cli:
            # The command line replaces a list from the config file.
            self._from_cli.add(key)
            self[key] = []
        self[key].append(value)
        self.explicit.add(key)

    # -- config file --------------------------------------------------------

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        config = _find_config_argument(argv)
        if config is not None:
            self._load_config(config)
        for arg in argv:
            if arg.startswith("--"):
                self.explicit.add(arg[2:].split("=", 1)[0])
        super().parseOptions(argv)

    def _load_config(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise usage.UsageError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise usage.UsageError(f"config file {path} is not valid TOML: {e}") from None
        coercers = {p[0]: (p[4] if len(p) > 4 else None) for p in self.optParameters}
        flags = {f[0] for f in self.optFlags}
        for raw_key, value in data.items():
            key = raw_key.replace("_", "-")
            if key == "config":
                raise usage.UsageError(f"{path}: 'config' cannot be set from a config file")
            if key in self._LISTS:
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str) for v in values):
                    raise usage.UsageError(f"{path}: '{raw_key}' must be a string or a list of strings")
                self[key] = list(values)
            elif key in flags:
                if not isinstance(value, bool):
                    raise usage.UsageError(f"{path}: '{raw_key}' must be true or false")
                self[key] = int(value)
            elif key in coercers:
                if isinstance(value, (dict, list)):
                    raise usage.UsageError(f"{path}: '{raw_key}' must be a single value")
                coerce = coercers[key]
                try:
                    self[key] = coerce(str(value)) if coerce else str(value)
                except ValueError as e:
                    raise usage.UsageError(f"{path}: invalid value for '{raw_key}': {e}") from None
            else:
                raise usage.UsageError(f"{path}: unknown option '{raw_key}'")
            self.explicit.add(key)

    # -- validation -----------------------------------------------------------

    def postOptions(self) -> None:
        if self["demo"]:
            for key, value in DEMO_DEFAULTS.items():
                if key not in self.explicit:
                    self[key] = list(value) if isinstance(value, list) else value
        self["ca"] = [_ca_url(value) for value in self["ca"]]
        if len(set(self["ca"])) != len(self["ca"]):
            raise usage.UsageError("--ca: the same CA is given twice")
        if bool(self["eab-kid"]) != bool(self["eab-hmac-key"]):
            raise usage.UsageError("--eab-kid and --eab-hmac-key go together")
        for key in ("ca-root", "allow-ca"):
            for path in self[key]:
                _check_pem_certificates(key, path)
            self[key] = [os.path.abspath(p) for p in self[key]]
        if self["allow-url"] and self["ask"]:
            raise usage.UsageError("give --allow-url or --ask, not both")
        from twisted.internet import reactor

        keys = ("https", "http") if self["admin"] == "none" else ("https", "http", "admin")
        for key in keys:
            try:
                endpoints.serverFromString(reactor, self[key])
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--{key} {self[key]!r} is not a valid endpoint: {e}") from None
        try:
            self["static-policy"] = StaticPolicy.from_config(
                self["deny"],
                self["allow-suffix"],
                # A public CA can only validate names under a public suffix.
                require_public_suffix=not self["allow-private-suffix"] and self["ca"] != ["internal"],
            )
        except InvalidHostname as e:
            raise usage.UsageError(f"invalid --deny or --allow-suffix value: {e.reason}") from None
        self["store"] = os.path.abspath(self["store"])
        if self["access-log"] is not None:
            self["access-log"] = os.path.abspath(self["access-log"])


#: Short names for well-known ACME directories.
CA_ALIASES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}


def _ca_url(value: str) -> str:
    """
    'internal', an alias, or an https:// directory URL.

    @raise usage.UsageError: otherwise.
    """
    value = value.strip()
    if value == "internal":
        return value
    value = CA_ALIASES.get(value, value)
    try:
        _http_url(value, schemes=("https",))
    except ValueError:
        raise usage.UsageError(
            f"--ca {value!r}: use internal, letsencrypt, letsencrypt-staging or an https:// ACME directory URL"
        ) from None
    return value


def _check_pem_certificates(option: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            x509.load_pem_x509_certificates(f.read())
    except OSError as e:
        raise usage.UsageError(f"--{option} {path}: {e.strerror}") from None
    except ValueError:
        raise usage.UsageError(f"--{option} {path}: no PEM certificate in it") from None


def _find_config_argument(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def endpoint_port(description: str) -> int | None:
    """The port number of a C{tcp:PORT...}/C{ssl:PORT} style description."""
    parts = description.split(":")
    for part in parts[1:]:
        if part.isdigit():
            return int(part)
        if part.startswith("port="):
            return int(part[5:])
    return None


@contextmanager
def _one_line_listen_errors() -> Iterator[None]:
    """
    A port that cannot be bound (in use, or below 1024 without privilege)
    ends start-up with one line that says which, not a traceback.
    """
    try:
        yield
    except CannotListenError as e:
        raise SystemExit(
            f"tenantedge: cannot listen on port {e.port}"
            f"{' of ' + e.interface if e.interface else ''}: {e.socketError}"
        ) from None


class TenantEdgeService(service.MultiService):
    """
    The whole edge: listeners, store, issuer, resolver, proxy.

    Ports are bound in C{privilegedStartService} (before twistd drops to
    C{-u/-g}); the store and the local CA are opened in C{startService},
    after the drop, so that every file they create belongs to the user the
    server runs as.
    """

    _log = Logger()

    def __init__(
        self,
        options: Options,
        store: DirectoryStore,
        local_ca: LocalCA | None,
        resolver: CertificateResolver,
        proxy: ProxyResource,
        tls_factory: OnDemandTLSFactory,
    ) -> None:
        super().__init__()
        self.options = options
        self.store = store
        self.local_ca = local_ca
        self.resolver = resolver
        self.proxy = proxy
        self.tls_factory = tls_factory
        self.https_service: StreamServerEndpointService | None = None
        self.http_service: StreamServerEndpointService | None = None
        self.demo_backend: DemoBackendService | None = None
        self.http_root: HTTPRedirectRoot | None = None
        self.backend_pool: HTTPConnectionPool | None = None
        self.acme_issuers: list[AcmeIssuer] = []
        self.backoff: FailureBackoff | None = None
        self.tls_alpn: TLSALPN01Responder | None = None
        self.acme_pool: HTTPConnectionPool | None = None
        self.limits: IssuanceLimits | None = None
        self.renewal: RenewalService | None = None
        self.metrics: EdgeMetrics | None = None
        self.admin_service: StreamServerEndpointService | None = None

    def listening_ports(self) -> Deferred[dict[str, Any]]:
        """
        The bound HTTPS and HTTP ports, once listening (for tests and tools
        that start the edge on port 0).
        """
        names = [("https", self.https_service), ("http", self.http_service), ("admin", self.admin_service)]
        names = [(name, svc) for name, svc in names if svc is not None]
        waiting = [svc._waitingForPort for _, svc in names]
        return gatherResults(waiting).addCallback(
            lambda ports: {name: port for (name, _), port in zip(names, ports)}
        )

    def _follow_https_port(self) -> None:
        # Redirects from port 80 name the HTTPS port actually bound.
        if self.https_service is not None and self.https_service._waitingForPort is not None:
            self.https_service._waitingForPort.addCallback(self._set_redirect_port)

    def _set_redirect_port(self, port: Any) -> Any:
        if self.http_root is not None:
            self.http_root.https_port = port.getHost().port
        return port

    def privilegedStartService(self) -> None:
        with _one_line_listen_errors():
            super().privilegedStartService()

    def startService(self) -> None:
        try:
            self.store.prepare()
            if self.local_ca is not None:
                self.local_ca.prepare()
            for issuer in self.acme_issuers:
                issuer.prepare()
        except StoreError as e:
            raise SystemExit(f"tenantedge: {e}") from None
        if self.backoff is not None:
            self.backoff.load()
        policy: EdgePolicy = self.resolver.policy  # type: ignore[assignment]
        self._log.info(
            "tenantedge {version}: store {store}, issuer {issuer}, backend {backend}",
            version=__version__,
            store=self.store.path,
            issuer=self.resolver.issuer.name,
            backend=self.proxy.backend.decode() if self.demo_backend is None else "built-in demo",
        )
        if self.local_ca is not None:
            self._log.info(
                "local CA root certificate: {root} (give it to clients, e.g. curl --cacert {root})",
                root=self.local_ca.root_path,
            )
        if not policy.issues_anything:
            self._log.warn(
                "no --allow-url, --ask or --allow-suffix is set: no certificate will ever be issued; "
                "only certificates already in the store are served"
            )
        else:
            self._log.info(
                "certificates are issued on demand for names {rules}",
                rules=" or ".join(
                    ([f"under {', '.join(policy.static.allow_suffixes)}"] if policy.static.allow_suffixes else [])
                    + ([f"allowed by {policy.checker.template}"] if policy.checker is not None else [])
                ),
            )
        if self.limits is not None:
            self.limits.load()
        with _one_line_listen_errors():
            super().startService()
        self._follow_https_port()

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        for pool in (self.backend_pool, self.acme_pool):
            if pool is not None:
                d.addCallback(lambda _, pool=pool: pool.closeCachedConnections())
        return d


def makeService(options: Options) -> TenantEdgeService:
    """
    Build the edge from parsed options; the only place that picks concrete
    classes.
    """
    from twisted.internet import reactor

    run_blocking: Callable[..., Any] = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    store = DirectoryStore(options["store"], run_blocking=run_blocking)
    challenges = MemoryChallengeStore()
    tls_alpn = TLSALPN01Responder(reactor)
    responder = tls_alpn if options["challenge"] == "tls-alpn-01" else HTTP01Responder(challenges)
    local_ca = None
    acme_pool = HTTPConnectionPool(reactor, persistent=True)
    limits = IssuanceLimits(
        os.path.join(options["store"], "limits.json"),
        reactor,
        registered_domain,
        max_concurrent=options["max-concurrent-issuance"],
        max_new_orders=options["max-new-orders"],
        max_per_domain=options["max-certs-per-domain"],
    )
    acme_issuers: list[AcmeIssuer] = []
    issuers: list[Any] = []
    for ca in options["ca"]:
        if ca == "internal":
            local_ca = LocalCA(
                os.path.join(options["store"], "localca"),
                reactor,
                validity=datetime.timedelta(seconds=options["internal-validity"]),
            )
            issuers.append(local_ca)
            continue
        issuer = AcmeIssuer(
            AcmeClient(ca, None, acme_http_client(reactor, acme_pool, options["ca-root"]), reactor,
                       user_agent=f"tenantedge/{__version__}"),
            AccountStore(account_directory(options["store"], ca)),
            responder,
            reactor,
            email=options["email"],
            eab=(options["eab-kid"], options["eab-hmac-key"]) if options["eab-kid"] else None,
            key_type=options["key-type"],
            run_blocking=run_blocking,
        )
        acme_issuers.append(issuer)
        issuers.append(LimitedIssuer(issuer, limits))
    backoff = FailureBackoff(os.path.join(options["store"], "backoff.json"), reactor)
    chain = issuers[0] if len(issuers) == 1 else FallbackIssuer(issuers)
    checker = None
    if options["allow-url"] or options["ask"]:
        checker = AllowChecker(
            options["allow-url"] or options["ask"],
            caddy_style=bool(options["ask"]),
            http=HTTPClient(Agent(reactor, contextFactory=https_policy(options["allow-ca"]), pool=acme_pool)),
            clock=reactor,
            timeout=options["allow-timeout"],
            allow_ttl=options["allow-ttl"],
            deny_ttl=options["deny-ttl"],
        )
    policy = EdgePolicy(options["static-policy"], checker)
    resolver = CertificateResolver(
        store,
        policy,
        OneOrderPerName(BackoffIssuer(chain, backoff)),
        reactor,
        cache_size=options["cache-size"],
        accepts=local_ca_check(local_ca),
    )
    pool = make_backend_pool(reactor)
    proxy = ProxyResource(
        options["backend"].encode("ascii"),
        make_agent(reactor, pool),
        reactor,
        timeout=options["backend-timeout"],
    )
    site = EdgeSite(proxy, logPath=options["access-log"], reactor=reactor)
    site.max_body_size = options["max-body-size"]
    tls_factory = OnDemandTLSFactory(
        resolver,
        site,
        reactor,
        hello_timeout=options["hello-timeout"],
        resolve_timeout=options["issue-timeout"],
        challenge_context=tls_alpn.context_for,
    )
    renewal = RenewalService(
        store,
        resolver.issuer,
        policy.recheck,
        resolver.remember,
        resolver.forget,
        reactor,
        interval=options["renew-check-interval"],
        renew_before=options["renew-before"],
        window=_ari_lookup(acme_issuers),
    )
    edge = TenantEdgeService(options, store, local_ca, resolver, proxy, tls_factory)
    edge.renewal = renewal
    refresher = CacheRefresher(resolver, reactor, interval=options["store-poll"])
    refresher.setName("store-refresher")
    refresher.setServiceParent(edge)
    metrics = EdgeMetrics(edge)
    edge.metrics = metrics
    resolver.on_issuance = metrics.observe_issuance
    proxy.observe = metrics.observe_request
    if options["admin"] != "none":
        edge.admin_service = _listener(
            edge, "admin", reactor, options["admin"],
            _small_bodies(EdgeSite(AdminResource(metrics, _admin_actions(edge)), reactor=reactor)),
        )
    edge.backend_pool = pool
    edge.acme_pool = acme_pool
    edge.acme_issuers = acme_issuers
    edge.backoff = backoff
    edge.limits = limits
    edge.tls_alpn = tls_alpn

    edge.https_service = _listener(edge, "https", reactor, options["https"], tls_factory)
    http_root = HTTPRedirectRoot(challenges, https_port=endpoint_port(options["https"]) or 443)
    edge.http_root = http_root
    edge.http_service = _listener(
        edge, "http", reactor, options["http"], _small_bodies(EdgeSite(http_root, reactor=reactor))
    )

    renewal.setName("renewal")
    renewal.setServiceParent(edge)

    if options["demo"]:
        demo = DemoBackendService(reactor, proxy)
        demo.setName("demo-backend")
        demo.setServiceParent(edge)
        edge.demo_backend = demo
    return edge


def _listener(
    edge: TenantEdgeService, name: str, reactor: Any, description: str, factory: Any
) -> StreamServerEndpointService:
    """A named listening service under the edge; it binds in privilegedStartService."""
    service = StreamServerEndpointService(endpoints.serverFromString(reactor, description), factory)
    service.setName(name)
    # Fail start-up (not just log) when the port cannot be bound.
    service._raiseSynchronously = True
    service.setServiceParent(edge)
    return service


def _small_bodies(site: EdgeSite) -> EdgeSite:
    """Port 80 and the admin endpoint take no request bodies worth the name."""
    site.max_body_size = 64 * 1024
    return site


def _admin_actions(edge: TenantEdgeService) -> dict[str, Callable[[str], Deferred[Any]]]:
    """What the admin endpoint's POST /certs/<host>/<action> does."""

    async def issue(host: str) -> dict[str, Any]:
        await edge.resolver.context_for(host)
        bundle = await edge.store.get(host)
        return {"not_after": bundle.leaf.not_valid_after_utc.isoformat()}

    async def renew(host: str) -> dict[str, Any]:
        bundle = await edge.store.get(host)
        assert edge.renewal is not None
        not_after = await edge.renewal.renew(host, bundle)
        current = await edge.store.get(host)
        if not_after is None:
            return {"archived": True}
        if current.leaf.serial_number == bundle.leaf.serial_number:
            raise RuntimeError("renewal failed; see the server log")
        return {"not_after": current.leaf.not_valid_after_utc.isoformat()}

    async def forget(host: str) -> dict[str, Any]:
        edge.resolver.forget(host)
        return {}

    return {
        name: (lambda f: lambda host: Deferred.fromCoroutine(f(host)))(f)
        for name, f in (("issue", issue), ("renew", renew), ("forget", forget))
    }


def _ari_lookup(acme_issuers: Sequence[AcmeIssuer]) -> Callable[[Any], Deferred[Any]] | None:
    """
    The renewal window lookup: the first ACME CA's renewalInfo (RFC 9773),
    or None with no ACME CA. A CA without ARI, or an error, means "no
    window" (the lifetime rule applies).
    """
    if not acme_issuers:
        return None
    client = acme_issuers[0].client

    def window(bundle: Any) -> Deferred[Any]:
        if bundle.issuer_name().startswith(ROOT_NAME_PREFIX):
            return succeed(None)  # the local CA's: no CA to ask
        d = Deferred.fromCoroutine(client.renewal_window(bundle.leaf))
        return d.addErrback(lambda failure: None)

    return window
