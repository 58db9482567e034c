"""
The one configuration value: L{OnDemandConfig}.

Every front door produces it: the twistd/twist plugin's options
(L{tenantedge.options}), a TOML file (C{--config}), the C{tenantedge:}
endpoint string (L{tenantedge.endpoint}) and Python code
(C{OnDemandConfig(store=..., ca=["internal"])}). Validation lives in the
value itself (each field's converter, then the checks that span fields),
so all of them accept the same values and fail with the same one-line
L{ConfigError}, which names the setting.

A setting's name is its field name with dashes (C{allow_url} is
C{--allow-url}, C{allow-url =} in TOML and C{allow-url=} in an endpoint
string); the field's metadata says how the front doors show it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from cryptography import x509
from hyperlink import URL

from .forwarding import TrustedProxies, parse_network
from .hostnames import InvalidHostname, matches_suffix
from .policy import StaticPolicy, under_public_suffix

__all__ = [
    "OnDemandConfig",
    "ConfigError",
    "CA_ALIASES",
    "DEMO_DEFAULTS",
    "KEY_TYPES",
    "parse_duration",
    "parse_size",
    "format_duration",
    "format_size",
    "load_toml",
    "settings",
]

KEY_TYPES = ("ecdsa-p256", "rsa2048")
CHALLENGES = ("http-01", "tls-alpn-01")
LOG_FORMATS = ("text", "json")

#: Short names for well-known ACME directories.
CA_ALIASES = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}

#: What C{--demo} changes, unless given explicitly.
DEMO_DEFAULTS: Mapping[str, Any] = {
    "https": "tcp:8443:interface=127.0.0.1",
    "http": "tcp:8080:interface=127.0.0.1",
    "admin": "tcp:9180:interface=127.0.0.1",
    "store": "./tenantedge-demo",
    "ca": ["internal"],
    "allow-suffix": [".localhost"],
}


class ConfigError(ValueError):
    """
    A setting has a bad value, or settings contradict each other.

    @ivar key: the setting's name with dashes (C{"allow-url"}), or
        C{None} for a problem that spans several settings.
    @ivar problem: one line saying what is wrong, with the value.
    """

    def __init__(self, key: str | None, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


# -- value parsers: strings (from a command line, TOML or an endpoint) or
# -- already-typed Python values -----------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_duration(value: str | float) -> float:
    """
    Seconds from C{90}, C{"90"}, C{"90s"}, C{"10m"}, C{"12h"}, C{"7d"} or
    C{"250ms"}.

    @raise ValueError: for anything else, or a value that is not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration (examples: 90, 90s, 10m, 12h, 7d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{value!r} must be more than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact form of a duration: C{30d}, C{12h}, C{90s}, C{250ms}."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and (seconds * 1000) == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def parse_size(value: str | int) -> int:
    """Bytes from C{1048576}, C{"512K"}, C{"64M"} or C{"2G"}; 0 means no limit."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value!r} must not be negative")
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, 512K, 64M, 2G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """C{64M}, C{512K}, C{0}."""
    for unit in ("G", "M", "K"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _duration_or_zero(value: str | float) -> float:
    """A duration (L{parse_duration}), or C{0} for none."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        zero = match is not None and float(match.group(1)) == 0
    else:
        zero = not isinstance(value, bool) and value == 0
    return 0.0 if zero else parse_duration(value)


def _show_duration_or_zero(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0"


def _positive_int(value: str | int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1")
    return number


def _flag(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "on", "1"):
        return True
    if text in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{value!r} is not yes or no")


def _choice(*choices: str) -> Callable[[str], str]:
    def coerce(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return coerce


def _http_url(value: str, schemes: Sequence[str] = ("http", "https")) -> URL:
    try:
        url = URL.from_text(value)
    except ValueError:
        url = None
    if url is None or url.scheme not in schemes or not url.host:
        raise ValueError(f"{value!r} is not a {' or '.join(s + '://' for s in schemes)} URL with a host")
    return url


def _backend(value: str) -> str:
    if value.startswith("unix:"):
        if not value[5:]:
            raise ValueError(f"{value!r}: give the socket's path, e.g. unix:/run/app.sock")
        return value
    url = _http_url(value)
    if url.query or url.fragment:
        raise ValueError(f"{value!r}: a backend URL takes no query or fragment")
    return value


def backend_family(backend: str) -> tuple[bool, str]:
    """
    What several backends must share: TLS or not, and the path put before
    every request's (C{unix:} sockets and C{http://} URLs are the same
    plain-HTTP family; C{https://} backends are verified TLS).
    """
    if backend.startswith("unix:"):
        return False, ""
    url = URL.from_text(backend)
    return url.scheme == "https", "/".join(url.path).rstrip("/")


def backend_label(backend: str) -> str:
    """A backend as logs and metrics name it: its URL without credentials."""
    if backend.startswith("unix:"):
        return backend
    return str(URL.from_text(backend).replace(userinfo="").to_text())


def _health_path(value: str) -> str:
    if not value.startswith("/") or any(c in value for c in " \r\n#"):
        raise ValueError(f"{value!r}: give an absolute path such as /healthz")
    return value


def _positive_duration(value: str | float) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r}: must be more than zero")
    return seconds


def _allow_url(value: str) -> str:
    _http_url(value)
    if "{domain}" not in value:
        raise ValueError(f"{value!r} has no {{domain}} placeholder")
    return value


def _ask_url(value: str) -> str:
    if _http_url(value).fragment:
        raise ValueError(f"{value!r}: no fragment allowed")
    return value


def _ca(value: str) -> str:
    value = value.strip()
    if value == "internal":
        return value
    value = CA_ALIASES.get(value, value)
    try:
        _http_url(value, schemes=("https",))
    except ValueError:
        raise ValueError(
            f"{value!r}: use internal, letsencrypt, letsencrypt-staging or an https:// ACME directory URL"
        ) from None
    return value


def _webhook_url(value: str) -> str:
    """
    A webhook URL: https, or plain http only to a loopback address (a local
    relay): the body is signed, not encrypted, so over plain http on a
    network anyone on the path reads every tenant's host name.
    """
    url = _http_url(value)
    if url.fragment:
        raise ValueError(f"{value!r}: no fragment allowed")
    if url.scheme == "http" and not _loopback(url.host):
        raise ValueError(
            f"{value!r}: use https:// (plain http:// only to a loopback address such as 127.0.0.1: "
            "a signed body is not a secret one)"
        )
    return value


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


PRECHECKS = ("dns", "reach")
LIMIT_PROFILES = ("letsencrypt", "none")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def _ca_pair(what: str, check: Callable[[str], str]) -> Callable[[str], str]:
    """A C{CA=VALUE} setting: the CA as C{--ca} spells it (aliases too), normalised to its URL."""

    def coerce(value: str) -> str:
        ca, sep, rest = value.strip().rpartition("=")
        if not sep or not ca:
            raise ValueError(f"{value!r}: give CA={what}, e.g. letsencrypt={what.split('|')[0]}")
        if ca.strip() == "internal":
            raise ValueError(f"{value!r}: the local CA (internal) has no ACME account, so no such setting")
        return f"{_ca(ca)}={check(rest.strip())}"

    return coerce


def _limit_profile(value: str) -> str:
    if value not in LIMIT_PROFILES:
        raise ValueError(f"{value!r} is not one of {', '.join(LIMIT_PROFILES)}")
    return value


def _caa_domain(value: str) -> str:
    value = value.rstrip(".").lower()
    if not _DOMAIN.match(value):
        raise ValueError(f"{value!r} is not a CAA issuer domain such as letsencrypt.org")
    return value


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


def _dns_server(value: str) -> str:
    """C{HOST}, C{HOST:PORT} or C{[V6]:PORT}: an address, as C{host:port} (or C{[v6]:port})."""
    text = value.strip()
    port = "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r}: give ADDRESS, ADDRESS:PORT or [IPV6]:PORT")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    address = _ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: bad port {port!r}")
    return f"[{address}]:{int(port)}" if ":" in address else f"{address}:{int(port)}"


def _pem_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            x509.load_pem_x509_certificates(f.read())
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate in it") from None
    return os.path.abspath(path)


def _readable_file(path: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    return os.path.abspath(path)


def _private_file(path: str) -> str:
    """A file only its owner may read (a secret); refused otherwise, at start-up."""
    try:
        st = os.stat(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ValueError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; chmod 600 it (it holds a secret)")
    return os.path.abspath(path)


def _admin_name(value: str) -> str:
    name = value.strip().lower().removeprefix("[").removesuffix("]")
    if not name or any(c in name for c in "/ @?#"):
        raise ValueError(f"{value!r} is not a host name or address")
    return name


def _endpoint(value: str) -> str:
    # Built against a memory reactor: this only checks the syntax; the
    # real endpoint is made from the same string when the server starts.
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), value)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{value!r} is not a valid endpoint: {e}") from None
    return value


def _network(value: str) -> str:
    return parse_network(value)


def _workers(value: str | int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if str(value).strip().lower() in ("auto", "0"):
        return 0
    return _positive_int(value)


def _optional_endpoint(value: str | None) -> str | None:
    if value is None or value == "none":
        return None
    return _endpoint(value)


def _store(value: str) -> str:
    # A directory becomes absolute: twistd may change directory later.
    if value.startswith(("redis://", "rediss://")):
        from .resp import RedisAddress

        RedisAddress.from_url(value, environ={})  # the syntax, and no password in it
        return value
    return value if "://" in value else os.path.abspath(value)


def _absolute_path(value: str | None) -> str | None:
    return None if value is None else os.path.abspath(value)


# -- fields ------------------------------------------------------------------------


def _setting(
    default: Any,
    doc: str,
    parse: Callable[[Any], Any] | None = None,
    *,
    kind: str = "value",
    endpoint: bool = False,
    show: Callable[[Any], str] | None = None,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """
    One setting: a field whose converter parses and checks the value and
    names the setting in its error, with what the front doors need to show
    it (C{doc}, how to show the default, whether the endpoint string takes
    it).
    """

    def convert(value: Any, field: attrs.Attribute[Any]) -> Any:
        key = field.name.replace("_", "-")
        try:
            if kind == "flag":
                return _flag(value)
            if kind == "list":
                values = [value] if isinstance(value, str) else list(value)
                if not all(isinstance(v, str) for v in values):
                    raise ValueError("must be a string or a list of strings")
                return tuple(parse(v) if parse else v for v in values)
            if value is None or parse is None:
                return value
            return parse(value)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(key, str(e)) from None

    metadata = {"doc": doc, "kind": kind, "endpoint": endpoint, "show": show, "metavar": metavar}
    return attrs.field(
        default=default,
        converter=attrs.Converter(convert, takes_field=True),
        metadata=metadata,
        repr=not secret,
    )


@attrs.frozen
class OnDemandConfig:
    """
    Everything tenantedge can be told, as one immutable, validated value.

    Construct it directly (C{OnDemandConfig(store="/srv/certs",
    ca=["internal"], allow_suffix=[".localhost"])}): durations take
    seconds or strings such as C{"10m"}, sizes bytes or C{"64M"}, lists
    any iterable of strings; or from a front door's raw strings with
    L{from_settings}. Each setting is documented in the README's option
    table, generated from the same field docs as C{--help}.

    @raise ConfigError: naming the first bad setting.
    """

    # -- listeners and the request path (the twistd plugin) -------------------
    https: str = _setting("tcp:443", "HTTPS listener (Twisted endpoint syntax).", _endpoint, metavar="ENDPOINT")
    http: str | None = _setting(
        "tcp:80", "HTTP listener for ACME HTTP-01 answers and redirects to HTTPS; 'none' for no listener.",
        _optional_endpoint, endpoint=True, metavar="ENDPOINT", show=lambda v: v or "none",
    )
    admin: str | None = _setting(
        "tcp:9180:interface=127.0.0.1", "Admin endpoint (metrics, CLI actions); 'none' to disable.",
        _optional_endpoint, metavar="ENDPOINT", show=lambda v: v or "none",
    )
    admin_token_file: str | None = _setting(
        None, "File holding the hostname API's bearer token (mode 0600); without it /v1 is refused and only "
        "/metrics and the deprecated /certs routes answer.", _private_file, metavar="FILE",
    )
    admin_name: tuple[str, ...] = _setting(
        ("localhost", "127.0.0.1", "::1"), "A Host name the admin endpoint answers to (besides the address it "
        "binds); anything else gets 421 (defeats DNS rebinding). Repeat for several.", _admin_name, kind="list",
        metavar="NAME",
    )
    retire_after: float = _setting(
        3 * 86400.0, "A name failing this long is retired: no more orders until the hostname API or a changed "
        "allow answer revives it; 0 never retires (duration).", _duration_or_zero, endpoint=True,
        show=_show_duration_or_zero, metavar="DURATION",
    )
    backend: tuple[str, ...] = _setting(
        ("http://127.0.0.1:3000",), "The application: an http(s):// base URL or unix:/path/to.sock; repeat for "
        "several processes, balanced by least outstanding requests.", _backend, kind="list", metavar="URL",
    )
    backend_health_path: str | None = _setting(
        None, "Check each backend with a GET to this path (after the backend URL's own path) every "
        "backend-health-interval; a status other than 2xx/3xx, or none within the interval, takes it out of "
        "rotation until it passes again.", _health_path, metavar="PATH",
    )
    backend_health_interval: float = _setting(
        5.0, "Time between two health checks of a backend, and the deadline of each (duration).",
        _positive_duration, show=format_duration, metavar="DURATION",
    )
    backend_timeout: float = _setting(
        60.0, "Wait this long for the backend's response headers, then 504 (duration).", parse_duration,
        show=format_duration, metavar="DURATION",
    )
    max_body_size: int = _setting(
        0, "Largest request body accepted (bytes, or with K, M, G); larger gets 413. 0: no limit (the default): "
        "bodies stream to the backend, nothing is held whole.",
        parse_size, show=format_size, metavar="SIZE",
    )
    websocket_idle_timeout: float = _setting(
        600.0, "Close an upgraded (WebSocket) connection after this long without a byte either way (duration); "
        "0: never.", _duration_or_zero, show=_show_duration_or_zero, metavar="DURATION",
    )
    access_log: str | None = _setting(
        None, "Write an access log of HTTPS requests (combined format) to this file.", _absolute_path,
        metavar="FILE",
    )
    demo: bool = _setting(
        False, "Demo mode: local CA, store ./tenantedge-demo, names under .localhost allowed, built-in demo "
        "backend, HTTPS 127.0.0.1:8443, HTTP 127.0.0.1:8080 (explicit options still win).", kind="flag",
    )
    workers: int = _setting(
        0, "Worker processes sharing the listening sockets; 0: one per CPU. 1 keeps one process.",
        lambda v: _workers(v), show=lambda v: str(v) if v else "one per CPU", metavar="N",
    )
    max_connections: int = _setting(
        20000, "Open HTTPS connections at most (per worker); beyond, new ones are closed at once.",
        _positive_int, endpoint=True, metavar="N",
    )
    max_connections_per_address: int = _setting(
        256, "Open HTTPS connections at most from one client address (per worker).", _positive_int,
        endpoint=True, metavar="N",
    )
    max_allow_checks: int = _setting(
        16, "Allow-endpoint checks in flight at once; up to 256 more wait, beyond that a name is refused at "
        "once (fail closed).", _positive_int, endpoint=True, metavar="N",
    )
    trusted_proxy: tuple[str, ...] = _setting(
        (), "Keep the X-Forwarded-For chain of requests whose peer (after the PROXY protocol) is in this network "
        "(CIDR or address, IPv4 or IPv6), and append the peer; from any other peer it is dropped.",
        _network, kind="list", metavar="CIDR",
    )
    header_timeout: float = _setting(
        15.0, "Time an HTTP/1.1 client has to send a whole request head once it began, then 408 (duration).",
        parse_duration, show=format_duration, metavar="DURATION",
    )
    idle_timeout: float = _setting(
        60.0, "Close an HTTP/1.1 keep-alive connection idle this long (duration).", parse_duration,
        show=format_duration, metavar="DURATION",
    )
    ticket_key_lifetime: float = _setting(
        86400.0, "How long TLS session-ticket keys are used; with workers, each is then replaced in turn "
        "(it finishes its connections) by one with new keys (duration).", parse_duration, show=format_duration,
        metavar="DURATION",
    )
    log_format: str = _setting("text", "Log format: text or json (one flat JSON object per line).",
                               _choice(*LOG_FORMATS), metavar="FORMAT")

    # -- storage -----------------------------------------------------------------
    store: str = _setting("/var/lib/tenantedge", "Certificate store: a directory (txacme format), or "
                          "redis://[user@]host:port/db?prefix=P (rediss:// for TLS) shared by a fleet.", _store,
                          endpoint=True, metavar="DIR|URL")
    store_password_file: str | None = _setting(
        None, "File holding the Redis store's password (else the TENANTEDGE_REDIS_PASSWORD environment "
        "variable; never in the URL).", _absolute_path, endpoint=True, metavar="FILE",
    )
    store_ca: str | None = _setting(None, "PEM file of the CA that signed a rediss:// store's certificate.",
                                    _absolute_path, endpoint=True, metavar="PEM")
    store_lock_ttl: float = _setting(
        30.0, "How long a fleet's per-name issuance lock outlives a node that died holding it (duration).",
        parse_duration, endpoint=True, show=format_duration, metavar="DURATION",
    )

    # -- issuers -------------------------------------------------------------------
    ca: tuple[str, ...] = _setting(
        ("letsencrypt",), "Issuer: letsencrypt, letsencrypt-staging, internal (local CA) or an ACME directory "
        "URL; repeat to fall back to the next when one fails for a name.", _ca, kind="list", endpoint=True,
        metavar="CA",
    )
    ca_root: tuple[str, ...] = _setting(
        (), "PEM file of extra trust anchors for the ACME server's HTTPS (private CA, Pebble).",
        _pem_file, kind="list", endpoint=True, metavar="PEM",
    )
    email: str | None = _setting(None, "Contact e-mail for the ACME account(s).", endpoint=True, metavar="ADDRESS")
    key_type: str = _setting("ecdsa-p256", "Certificate key type: ecdsa-p256 or rsa2048.", _choice(*KEY_TYPES),
                             endpoint=True, metavar="TYPE")
    challenge: str = _setting("http-01", "ACME challenge to answer: http-01 or tls-alpn-01.",
                              _choice(*CHALLENGES), endpoint=True, metavar="TYPE")
    eab_kid: str | None = _setting(None, "External Account Binding key identifier (CAs that require it).",
                                   endpoint=True, metavar="ID")
    eab_hmac_key_file: str | None = _setting(
        None, "File holding the External Account Binding HMAC key (base64url); keeps it off the command line.",
        _readable_file, endpoint=True, metavar="FILE",
    )
    eab_hmac_key: str | None = _setting(
        None, "External Account Binding HMAC key; prefer --eab-hmac-key-file or the TOML file (a command line "
        "is visible to every user).", secret=True, metavar="KEY",
    )
    internal_validity: float = _setting(
        7 * 86400.0, "Lifetime of local-CA leaf certificates (duration).", parse_duration, endpoint=True,
        show=format_duration, metavar="DURATION",
    )

    # -- policy ----------------------------------------------------------------------
    allow_url: str | None = _setting(
        None, "Allow endpoint, e.g. https://api.example.com/check/{domain}: 200 allows; other answers, errors "
        "and timeouts deny (fail closed).", _allow_url, endpoint=True, metavar="URL",
    )
    ask: str | None = _setting(None, "Caddy-style allow endpoint: GET URL?domain=NAME, any 2xx allows.", _ask_url,
                               endpoint=True, metavar="URL")
    allow_ca: tuple[str, ...] = _setting(
        (), "PEM file of extra trust anchors for the allow endpoint's HTTPS.", _pem_file,
        kind="list", endpoint=True, metavar="PEM",
    )
    allow_timeout: float = _setting(3.0, "Deadline for one allow check (duration).", parse_duration, endpoint=True,
                                    show=format_duration, metavar="DURATION")
    allow_ttl: float = _setting(600.0, "How long an allow decision is cached (duration).", parse_duration,
                                endpoint=True, show=format_duration, metavar="DURATION")
    deny_ttl: float = _setting(60.0, "How long a deny (or unknown) decision is cached (duration).",
                               parse_duration, endpoint=True, show=format_duration, metavar="DURATION")
    allow_suffix: tuple[str, ...] = _setting(
        (), "Issue for every name under this suffix without asking.", kind="list", endpoint=True,
        metavar="SUFFIX",
    )
    deny: tuple[str, ...] = _setting(
        (), "Never issue for this name; a leading '.' denies the whole suffix.", kind="list",
        endpoint=True, metavar="NAME",
    )
    allow_private_suffix: bool = _setting(
        False, "Also issue for names not under a public suffix (foo.internal): for private ACME CAs and tests.",
        kind="flag", endpoint=True,
    )

    # -- limits --------------------------------------------------------------------------
    max_concurrent_issuance: int = _setting(4, "ACME orders running at once (all CAs).", _positive_int,
                                            endpoint=True, metavar="N")
    max_new_orders: int = _setting(300, "ACME orders per account per 3 hours.", _positive_int, endpoint=True,
                                   metavar="N")
    max_certs_per_domain: int = _setting(50, "Certificates per registered domain per account per week.",
                                         _positive_int, endpoint=True, metavar="N")
    ca_limits: tuple[str, ...] = _setting(
        (), "CA=letsencrypt|none: whether Let's Encrypt's windows (max-new-orders, max-certs-per-domain, 5 "
        "failed validations per name per hour) apply to this CA; by default only Let's Encrypt's directories "
        "get them, any other CA only max-concurrent-issuance (repeatable).",
        _ca_pair("letsencrypt|none", _limit_profile), kind="list", endpoint=True, metavar="CA=PROFILE",
    )

    # -- pre-checks ------------------------------------------------------------------------
    precheck: tuple[str, ...] = _setting(
        (), "Check before an ACME order that validation can pass: dns (the name's A/AAAA point at a "
        "public-address, and CAA lets the CA issue) or reach (a nonce fetched from http://NAME/.well-known/"
        "acme-challenge/ comes back from this edge); repeatable. A failure places no order.",
        _choice(*PRECHECKS), kind="list", endpoint=True, metavar="CHECK",
    )
    public_address: tuple[str, ...] = _setting(
        (), "An address clients reach this edge (or fleet, or its load balancer) at; required by precheck=dns "
        "(repeatable).", _ip_address, kind="list", endpoint=True, metavar="ADDRESS",
    )
    precheck_resolver: tuple[str, ...] = _setting(
        (), "DNS server the pre-checks ask (ADDRESS[:PORT], repeatable); default: the system's (/etc/resolv.conf). "
        "Use a public resolver when the edge's own DNS is split-horizon.", _dns_server, kind="list",
        endpoint=True, metavar="ADDRESS",
    )
    precheck_timeout: float = _setting(
        5.0, "Deadline for each pre-check's DNS queries, and for the reach check's fetches (duration).",
        parse_duration, endpoint=True, show=format_duration, metavar="DURATION",
    )
    precheck_renewals: bool = _setting(
        False, "Also run the pre-checks before renewals (by default only before a first issuance).",
        kind="flag", endpoint=True,
    )
    caa_identity: tuple[str, ...] = _setting(
        (), "CA=DOMAIN: the CAA issuer domain of an ACME CA, for the CAA pre-check (Let's Encrypt's, "
        "letsencrypt.org, is known); a CA without one is not CAA-checked (repeatable).",
        _ca_pair("DOMAIN", _caa_domain), kind="list", endpoint=True, metavar="CA=DOMAIN",
    )

    # -- webhooks ------------------------------------------------------------------------
    webhook: tuple[str, ...] = _setting(
        (), "POST a signed JSON event to this URL when a certificate is issued, renewed, fails, is retired, "
        "archived or expiring soon: https://, or http:// to a loopback address.", _webhook_url, kind="list",
        endpoint=True, metavar="URL",
    )
    webhook_secret_file: str | None = _setting(
        None, "File (mode 0600) holding the webhooks' HMAC-SHA256 signing secret; two lines during a rotation.",
        _readable_file, endpoint=True, metavar="FILE",
    )
    webhook_outbox: str | None = _setting(
        None, "Directory of undelivered webhook events (default: <store>/webhooks; needed with a redis:// store).",
        _absolute_path, endpoint=True, metavar="DIR",
    )

    # -- renewal and caching ---------------------------------------------------------------
    renew_check_interval: float = _setting(
        43200.0, "Time between renewal walks of the store, plus up to 10% jitter (duration).", parse_duration,
        endpoint=True, show=format_duration, metavar="DURATION",
    )
    renew_before: float = _setting(
        30 * 86400.0, "Renew when less than this, or a third of the lifetime, is left; earlier inside the CA's "
        "ARI window (duration).", parse_duration, endpoint=True, show=format_duration, metavar="DURATION",
    )
    store_poll: float = _setting(
        5.0, "How often cached certificates are checked for changes made by others (duration).", parse_duration,
        endpoint=True, show=format_duration, metavar="DURATION",
    )
    cache_size: int = _setting(10000, "Ready TLS contexts kept in memory.", _positive_int, endpoint=True,
                               metavar="N")
    hello_timeout: float = _setting(10.0, "Time a client has to send its ClientHello (duration).", parse_duration,
                                    endpoint=True, show=format_duration, metavar="DURATION")
    issue_timeout: float = _setting(90.0, "Longest a handshake waits for a certificate (duration).",
                                    parse_duration, endpoint=True, show=format_duration, metavar="DURATION")

    static_policy: StaticPolicy = attrs.field(init=False, repr=False, eq=False)
    #: The webhook signing secrets read from C{webhook_secret_file} (never shown).
    webhook_secrets: tuple[bytes, ...] = attrs.field(init=False, repr=False, eq=False, default=())
    #: The hostname API's bearer token, read from C{admin_token_file}.
    admin_token: str | None = attrs.field(init=False, default=None, repr=False, eq=False)
    #: The C{trusted_proxy} networks, parsed once (C{None}: trust no peer's chain).
    trusted_proxies: TrustedProxies | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not self.backend:
            raise ConfigError("backend", "at least one backend is needed")
        if len(set(self.backend)) != len(self.backend):
            raise ConfigError("backend", "the same backend is given twice")
        families = {backend_family(b) for b in self.backend}
        if len(families) > 1:
            raise ConfigError(
                "backend", "all backends must be alike: all https:// or none, and the same path "
                f"({', '.join(self.backend)})",
            )
        if len(set(self.ca)) != len(self.ca):
            raise ConfigError("ca", "the same CA is given twice")
        if not self.ca:
            raise ConfigError("ca", "at least one issuer is needed")
        if self.eab_hmac_key_file is not None:
            if self.eab_hmac_key is not None:
                raise ConfigError("eab-hmac-key-file", "give the EAB key or its file, not both")
            try:
                _private_file(self.eab_hmac_key_file)  # a secret: only its owner may read it
                with open(self.eab_hmac_key_file, encoding="ascii") as f:
                    object.__setattr__(self, "eab_hmac_key", f.read().strip())
            except ValueError as e:
                raise ConfigError("eab-hmac-key-file", str(e)) from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError("eab-hmac-key-file", f"{self.eab_hmac_key_file}: {e}") from None
        if self.admin_token_file is not None:
            try:
                with open(self.admin_token_file, encoding="ascii") as f:
                    token = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError("admin-token-file", f"{self.admin_token_file}: {e}") from None
            if len(token) < 16 or any(c.isspace() for c in token):
                raise ConfigError("admin-token-file", "the token must be one line of at least 16 characters")
            object.__setattr__(self, "admin_token", token)
        if bool(self.eab_kid) != bool(self.eab_hmac_key):
            raise ConfigError(None, "eab-kid and eab-hmac-key (or eab-hmac-key-file) go together")
        if self.allow_url and self.ask:
            raise ConfigError(None, "give allow-url or ask, not both")
        self._check_webhooks()
        for key, pairs in (("ca-limits", self.ca_limits), ("caa-identity", self.caa_identity)):
            named = [pair.rpartition("=")[0] for pair in pairs]
            for ca in named:
                if ca not in self.ca:
                    raise ConfigError(key, f"{ca} is not one of the configured CAs ({', '.join(self.ca)})")
            if len(set(named)) != len(named):
                raise ConfigError(key, "the same CA is given twice")
        if "dns" in self.precheck and not self.public_address:
            raise ConfigError(
                "public-address", "precheck=dns compares the name's addresses with this edge's: give "
                "public-address (repeatable) with every address clients reach it at",
            )
        if "reach" in self.precheck and (self.challenge != "http-01" or self.http is None):
            raise ConfigError(
                "precheck", "reach fetches the name on port 80, which only challenge=http-01 with an http "
                "listener uses",
            )
        if self.http is None and self.challenge == "http-01" and any(ca != "internal" for ca in self.ca):
            raise ConfigError(
                "http",
                "no port-80 listener with an ACME CA and challenge=http-01: the CA validates names on port 80 and "
                "only this process could answer; give http=ENDPOINT, or challenge=tls-alpn-01, or only ca=internal",
            )
        try:
            static = StaticPolicy.from_config(self.deny, self.allow_suffix, self.require_public_suffix)
        except InvalidHostname as e:
            raise ConfigError("allow-suffix/deny", f"invalid name: {e.reason}") from None
        object.__setattr__(self, "static_policy", static)
        object.__setattr__(self, "trusted_proxies", TrustedProxies.from_cidrs(self.trusted_proxy))
        for suffix in static.allow_suffixes:
            # A deny suffix rule covers every name under the allow suffix
            # exactly when it covers the suffix's own name (it is the same
            # suffix or one above it).
            covering = [rule for rule in static.deny
                        if rule.startswith(".") and matches_suffix(suffix[1:], rule, include_apex=True)]
            if covering:
                raise ConfigError(
                    "allow-suffix",
                    f"no name under {suffix} can get a certificate: deny={covering[0]} refuses every one of them",
                )
            if static.require_public_suffix and not under_public_suffix("x" + suffix):
                raise ConfigError(
                    "allow-suffix",
                    f"no name under {suffix} can get a certificate: it is not under a public suffix and a "
                    "public CA may be asked (add allow-private-suffix for a private ACME CA, or use ca=internal)",
                )

    def _check_webhooks(self) -> None:
        from .webhooks import read_secrets

        if self.webhook_secret_file is not None:
            try:
                object.__setattr__(self, "webhook_secrets", read_secrets(self.webhook_secret_file))
            except ValueError as e:
                raise ConfigError("webhook-secret-file", str(e)) from None
        if not self.webhook:
            return
        if len(set(self.webhook)) != len(self.webhook):
            raise ConfigError("webhook", "the same URL is given twice")
        if not self.webhook_secrets:
            raise ConfigError("webhook-secret-file", "webhooks are always signed: give the secret's file")
        if self.webhook_outbox is None and "://" in self.store:
            raise ConfigError("webhook-outbox", "with a redis:// store, give a local directory for the outbox")

    @property
    def webhook_directory(self) -> str:
        """Where undelivered webhook events wait (C{webhook_outbox}, else C{<store>/webhooks})."""
        return self.webhook_outbox or os.path.join(self.store, "webhooks")

    @property
    def worker_count(self) -> int:
        """How many worker processes to run (C{workers}, 0 meaning one per CPU)."""
        return self.workers or max(1, os.cpu_count() or 1)

    @property
    def require_public_suffix(self) -> bool:
        """Whether names must be under a public suffix: whenever a public CA may be asked."""
        return not self.allow_private_suffix and any(ca != "internal" for ca in self.ca)

    def limits_profile(self, ca: str) -> str:
        """
        C{letsencrypt} (Let's Encrypt's windows) or C{none} (only the
        concurrency bound) for an ACME directory URL: C{ca-limits}, else
        C{letsencrypt} for Let's Encrypt's directories only.
        """
        from .limits import is_letsencrypt

        for pair in self.ca_limits:
            url, _, profile = pair.rpartition("=")
            if url == ca:
                return profile
        return "letsencrypt" if is_letsencrypt(ca) else "none"

    def caa_identity_for(self, ca: str) -> str | None:
        """The CAA issuer domain of an ACME directory URL, or None (its CAA is not pre-checked)."""
        from .precheck import CAA_IDENTITIES

        for pair in self.caa_identity:
            url, _, identity = pair.rpartition("=")
            if url == ca:
                return identity
        return CAA_IDENTITIES.get(ca.rstrip("/"))

    @property
    def precheck_servers(self) -> list[tuple[str, int]]:
        """C{precheck-resolver} as twisted.names wants it: (address, port) pairs."""
        servers = []
        for value in self.precheck_resolver:
            host, _, port = value.rpartition(":")
            servers.append((host.strip("[]"), int(port)))
        return servers

    @property
    def eab(self) -> tuple[str, str] | None:
        """The External Account Binding (kid, HMAC key), if configured."""
        if self.eab_kid and self.eab_hmac_key:
            return (self.eab_kid, self.eab_hmac_key)
        return None

    @property
    def has_allow_rule(self) -> bool:
        """Is any rule able to allow a name (else only stored certificates serve)?"""
        return bool(self.allow_suffix or self.allow_url or self.ask)

    def describe_policy(self) -> str:
        """The effective policy in one phrase, for the start-up banner."""
        rules = []
        if self.static_policy.allow_suffixes:
            rules.append(f"names under {', '.join(self.static_policy.allow_suffixes)}")
        if self.allow_url or self.ask:
            rules.append(f"names allowed by {self.allow_url or self.ask}")
        text = " or ".join(rules) or "no name (no allow rule: only stored certificates are served)"
        extra = []
        if self.static_policy.require_public_suffix:
            extra.append("under a public suffix")
        if self.static_policy.deny:
            extra.append(f"not denied ({', '.join(self.static_policy.deny)})")
        return text + (f", if {' and '.join(extra)}" if extra and rules else "")

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], *, demo_defaults: bool = True) -> OnDemandConfig:
        """
        Build from raw settings keyed by their dashed names (C{"allow-url"}),
        as the front doors collect them; settings left out take their
        defaults, or with C{demo=yes} the demo's (L{DEMO_DEFAULTS}).

        @raise ConfigError: for an unknown key or a bad value.
        """
        known = {f.name.replace("_", "-"): f.name for f in settings()}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = known.get(key.replace("_", "-"))
            if name is None:
                raise ConfigError(key, "unknown setting")
            kwargs[name] = value
        if demo_defaults and _flag(kwargs.get("demo", False)):
            for key, value in DEMO_DEFAULTS.items():
                kwargs.setdefault(known[key], value)
        return cls(**kwargs)


def settings() -> tuple[attrs.Attribute[Any], ...]:
    """The settings (fields of L{OnDemandConfig}), in their documented order."""
    return tuple(f for f in attrs.fields(OnDemandConfig) if f.init)


def show_default(field: attrs.Attribute[Any]) -> str | None:
    """A setting's default as a user writes it (C{30d}, C{64M}), or None."""
    default = field.default
    if default is None or field.metadata["kind"] == "flag":
        return None
    if field.metadata["kind"] == "list":
        return ", ".join(default) or None
    show = field.metadata["show"]
    return show(default) if show is not None else str(default)


def load_toml(path: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """
    Read settings from a TOML file: the same names (dashes or
    underscores), strings for everything, or TOML numbers, booleans and
    lists where they fit.

    @param allowed: the dashed names this front door takes (all if None).
    @raise ConfigError: one line naming the file, the key and the problem.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(None, f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(None, f"config file {path} is not valid TOML: {e}") from None
    fields = {f.name.replace("_", "-"): f for f in settings()}
    allowed_set = set(allowed) if allowed is not None else set(fields)
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("_", "-")
        if key == "config":
            raise ConfigError(None, f"{path}: 'config' cannot be set from a config file")
        field = fields.get(key)
        if field is None or key not in allowed_set:
            raise ConfigError(None, f"{path}: unknown option '{raw_key}'")
        kind = field.metadata["kind"]
        if kind == "list":
            if not isinstance(value, (str, list)):
                raise ConfigError(None, f"{path}: '{raw_key}' must be a string or a list of strings")
        elif kind == "flag":
            if not isinstance(value, bool):
                raise ConfigError(None, f"{path}: '{raw_key}' must be true or false")
        elif isinstance(value, (dict, list)):
            raise ConfigError(None, f"{path}: '{raw_key}' must be a single value")
        else:
            value = str(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else value
        # Check the value now, so the error names the file.
        try:
            OnDemandConfig.from_settings({key: value, **_CHECK_CONTEXT}, demo_defaults=False)
        except ConfigError as e:
            if e.key == key:
                raise ConfigError(None, f"{path}: invalid value for '{raw_key}': {e.problem}") from None
        out[key] = value
    return out


#: Settings that let a single TOML value be checked on its own without
#: tripping checks that span settings.
_CHECK_CONTEXT: Mapping[str, Any] = {"allow-private-suffix": True}
