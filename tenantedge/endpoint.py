r"""
The C{tenantedge:} server endpoint: on-demand TLS around any inner
endpoint, for any Twisted program that takes an endpoint string, as
txsni's C{txsni:} and txacme's C{le:} did::

    twistd -n web --path /srv --listen \
      'tenantedge:tcp\:443:store=/var/lib/tenantedge:ca=letsencrypt:allow-url=https\://api.example.com/check/{domain}:http=tcp\:80'

    serverFromString(reactor, "tenantedge:tcp\\:443:store=...").listen(Site(root))

    app.run(endpoint_description="tenantedge:tcp\\:443:store=...")   # Klein

Syntax
======

The first argument is the inner endpoint, where TLS is served, with its
colons escaped (C{tcp\:443}, C{tcp\:443\:interface\=192.0.2.1},
C{systemd\:domain\=INET\:index\=0}). An inner endpoint whose own C{=} is
left unescaped (C{tcp\:443\:interface=192.0.2.1}) is taken as written
too: Twisted's parser reads it as a key containing a colon, and no
setting's name contains one.

Then C{key=value} pairs. The keys are the settings of
L{tenantedge.config.OnDemandConfig} whose field metadata says
C{endpoint=True}, by their dashed names (C{store=}, C{ca=}, C{ca-root=},
C{allow-url=}, C{ask=}, C{allow-suffix=}, C{deny=}, C{challenge=},
C{renew-before=10d}, ...); values are written as on the command line of
C{twistd tenantedge}: durations C{90s}/C{10m}/C{7d}, flags C{=yes}/C{=no}
(C{allow-private-suffix=yes}), lists by repeating the key
(C{ca=letsencrypt:ca=internal}, C{deny=a.example:deny=.b.example}).
C{config=FILE} reads settings from a TOML file (the same file format as
C{twistd tenantedge --config}); keys in the endpoint string win, a list
given in the string replaces the file's. Every value is checked by
L{OnDemandConfig.from_settings}, so the endpoint fails with the same
one-line problems as the plugin, as a C{ValueError}
(L{EndpointStringError}) naming the key:
C{tenantedge endpoint: allow-url=ftp\://x: 'ftp://x' is not a http:// or
https:// URL with a host}. A key the endpoint does not take (C{backend=},
C{https=}, C{admin=}, ...: they belong to the plugin's reverse proxy and
listeners) is refused with the reason. Secrets stay out of endpoint
strings, which process lists and shell histories show: the EAB key is
given as C{eab-hmac-key-file=} (or in the C{config=} file), never inline.

Repeated keys: Twisted's endpoint parser folds C{key=value} pairs into a
keyword dictionary, so a repeated key would silently keep only its last
value (a deny list losing entries). When the parser is called by
C{serverFromString} (as C{twistd --listen}, Klein and programs do), the
description string is read back from that call and split again with the
repeats kept; it is used only if it splits to exactly the arguments
Twisted passed. A key that is not a list is refused when repeated.

Port 80: C{http=ENDPOINT} (default C{tcp:80}, as for the plugin) is a
second listener, started beside the TLS one, that answers ACME HTTP-01
challenges and redirects everything else to HTTPS (on the port the inner
endpoint bound). C{http=none} starts none; that is refused with an ACME CA
and C{challenge=http-01} (the default), because the pending answers are
held in this process and nothing else could serve them, so the CA could
never validate a name: use C{challenge=tls-alpn-01} (validated on the TLS
port itself) or only C{ca=internal}, which needs no challenge at all.

Lifetime
========

A parsed endpoint holds only the validated configuration. Each
L{OnDemandEndpoint.listen} builds a new L{tenantedge.service.OnDemandTLS}
service and ties it to the listening port's lifetime, because an endpoint
has no service parent to hang it from (and C{twistd web}'s port service
only calls C{listen} and C{stopListening}):

  1. C{startService}: every preparation (store, local CA, ACME account
     keys, backoff and limit state) and then renewal, cache refresh and
     the refusal summary;
  2. C{listen} on the inner endpoint with C{service.wrap(factory)};
  3. C{listen} on the C{http=} endpoint;
  4. the returned L{OnDemandPort}'s C{stopListening} closes both ports and
     then stops the service, and fires when all of it is done. It is also
     called before the reactor shuts down (a Klein C{app.run} never stops
     its port), so renewal never outlives its port and connection pools are
     closed.

A failure in any step undoes the steps before it and fails the C{listen}
Deferred with one line: L{tenantedge.service.StartupError} for the
preparation, L{tenantedge.listening.ListenFailed} for a port. Every step
runs synchronously on a TCP endpoint, so the Deferred has failed by the
time C{listen} returns and C{twistd} stops at start-up with that line (a
TLS port opened before the port-80 listener failed closes on the next
reactor turn; L{OnDemandEndpoint.undone} fires when it has).

One caveat of this choice: C{twistd} listens before dropping privileges
(C{-u}/C{-g}), so with the endpoint the store's files are created by the
user twistd started as. Run the program as the store's owner (with
C{setcap cap_net_bind_service}, authbind or an inherited C{systemd:}
socket), or use C{twistd tenantedge}, which prepares after the drop.

The plugin module, C{twisted/plugins/tenantedge_endpoint.py}, imports
nothing from C{tenantedge} until a C{tenantedge:} string is parsed: Twisted
loads it for every endpoint string plugin lookup. Here, the configuration
is imported when a string is parsed and the TLS stack when C{listen} is
called.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from .config import ConfigError, OnDemandConfig
    from .service import OnDemandTLS

__all__ = [
    "EndpointStringError",
    "OnDemandEndpoint",
    "OnDemandPort",
    "TenantEdgeParser",
    "endpoint_description",
    "endpoint_keys",
    "parse_items",
    "split_description",
]

PREFIX = "tenantedge"

#: Request bodies on port 80 are never large (the plugin's limit too).
SMALL_BODIES = 64 * 1024

#: One piece of a description: C{(None, argument)} or C{(key, value)}.
Item = tuple[str | None, str]

#: Why settings of the plugin are not endpoint keys.
_NOT_ENDPOINT_KEYS: Mapping[str, str] = {
    "https": "the inner endpoint (the first argument) is where TLS is served",
    "admin": "the admin listener belongs to twistd tenantedge; in a program, read the service's metrics yourself",
    "backend": "the endpoint serves the factory it listens with; the reverse proxy belongs to twistd tenantedge",
    "backend-timeout": "the reverse proxy belongs to twistd tenantedge",
    "max-body-size": "the reverse proxy belongs to twistd tenantedge",
    "trusted-proxy": "the reverse proxy belongs to twistd tenantedge",
    "header-timeout": "the reverse proxy belongs to twistd tenantedge",
    "idle-timeout": "the reverse proxy belongs to twistd tenantedge",
    "websocket-idle-timeout": "the reverse proxy belongs to twistd tenantedge",
    "access-log": "the program's site writes its own access log",
    "demo": "demo mode belongs to twistd tenantedge (for a local try: ca=internal:allow-suffix=.localhost)",
    "log-format": "the program chooses how logs are written (twistd --logger, ...)",
    "eab-hmac-key": "a secret does not belong in an endpoint string (process lists and shell histories show it): "
    "write the key to a file and give eab-hmac-key-file=FILE",
}


class EndpointStringError(ValueError):
    """
    A C{tenantedge:} description that cannot be used; the message is one
    line starting with C{tenantedge endpoint:} and naming the key.

    @ivar key: the key at fault (C{"allow-url"}, C{"config"}), or C{None}
        for the inner endpoint or a problem spanning several keys.
    """

    def __init__(self, key: str | None, detail: str) -> None:
        super().__init__(f"{PREFIX} endpoint: {detail}")
        self.key = key


def endpoint_keys() -> dict[str, Any]:
    """The settings the endpoint takes, by dashed name (the attrs fields)."""
    from .config import settings

    return {f.name.replace("_", "-"): f for f in settings() if f.metadata["endpoint"]}


def split_description(description: str) -> list[Item]:
    r"""
    Split an endpoint description exactly as Twisted's parser does
    (C{:} separates, the first C{=} of a piece assigns, a backslash escapes
    the next character), but keep every C{key=value} pair in order,
    repeats included.

    >>> split_description(r"tenantedge:tcp\:443:deny=a.test:deny=b.test")
    [(None, 'tenantedge'), (None, 'tcp:443'), ('deny', 'a.test'), ('deny', 'b.test')]
    """
    items: list[Item] = []
    parts: list[str] = []
    current: list[str] = []
    ops = ":="
    chars = iter(description)
    for char in chars:
        if char in ops:
            parts.append("".join(current))
            current = []
            if char == ":":
                items.append(_item(parts))
                parts, ops = [], ":="
            else:
                ops = ":"
        elif char == "\\":
            current.append(next(chars, ""))
        else:
            current.append(char)
    parts.append("".join(current))
    items.append(_item(parts))
    return items


def _item(parts: list[str]) -> Item:
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def endpoint_description(inner: str, **settings: str | bool | Iterable[str] | None) -> str:
    r"""
    A C{tenantedge:} description, escaped as it must be: keyword names
    with underscores (C{allow_suffix=[".test"]}), flags as booleans, lists
    as iterables (repeated keys), C{None} left out.

    >>> endpoint_description("tcp:443", store="/srv/certs", ca=["internal"], allow_private_suffix=True)
    'tenantedge:tcp\\:443:store=/srv/certs:ca=internal:allow-private-suffix=yes'
    """
    pieces = [PREFIX, _quote(inner)]
    for name, value in settings.items():
        key = name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            values: Iterable[str] = ["yes" if value else "no"]
        elif isinstance(value, str):
            values = [value]
        else:
            values = value
        pieces.extend(f"{key}={_quote(v)}" for v in values)
    return ":".join(pieces)


@implementer(IStreamServerEndpointStringParser)
class TenantEdgeParser:
    """
    The C{tenantedge:} endpoint string parser. The plugin that
    C{twisted.internet.endpoints.serverFromString} finds
    (C{twisted/plugins/tenantedge_endpoint.py}) hands its arguments here.
    """

    prefix = PREFIX

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> OnDemandEndpoint:
        """
        The endpoint for a description's arguments (see the module
        docstring for the syntax).

        @raise EndpointStringError: naming the key at fault.
        """
        texts = [str(a) for a in args]
        pairs = {key: str(value) for key, value in kwargs.items()}
        items = _items_from_caller(texts, pairs)
        if items is None:
            items = [(None, a) for a in texts] + list(pairs.items())
        return parse_items(reactor, items)


def _items_from_caller(args: Sequence[str], kwargs: Mapping[str, str]) -> list[Item] | None:
    """
    The description's items with repeated keys kept, read back from the
    C{serverFromString} call that is parsing it; C{None} when not called
    from there, or when the string does not split to exactly C{args} and
    C{kwargs} (then only those are trustworthy).
    """
    from twisted.internet import endpoints

    # Relies on serverFromString's argument being named "description" and on
    # it calling the parser within a few frames (pinned in
    # tests.test_private_apis.ReactorPrivateAPITests); otherwise the
    # description is not found and only the last of a repeated key counts.
    target = endpoints.serverFromString.__code__
    frame = sys._getframe(1)
    description: object = None
    try:
        for _ in range(4):
            if frame is None:
                return None
            if frame.f_code is target:
                description = frame.f_locals.get("description")
                break
            frame = frame.f_back  # type: ignore[assignment]
    finally:
        del frame
    if not isinstance(description, str):
        return None
    items = split_description(description)
    head, rest = items[0], items[1:]
    if head[0] is not None or head[1].lower() != PREFIX:
        return None
    if [v for k, v in rest if k is None] != list(args):
        return None
    if {k: v for k, v in rest if k is not None} != dict(kwargs):
        return None
    return rest


def parse_items(reactor: Any, items: Sequence[Item]) -> OnDemandEndpoint:
    """
    The endpoint for a split description (after the C{tenantedge} prefix):
    the inner endpoint, the settings and C{config=}, all checked.

    @raise EndpointStringError: naming the key at fault.
    """
    from twisted.internet.endpoints import serverFromString

    from .config import ConfigError, OnDemandConfig, load_toml

    keys = endpoint_keys()
    inner: str | None = None
    config_file: str | None = None
    given: dict[str, Any] = {}
    for key, value in items:
        if key is None or ":" in key:
            # A key with a colon is the inner endpoint with its "=" unescaped.
            text = value if key is None else f"{key}={value}"
            if inner is not None:
                raise EndpointStringError(None, _extra_argument(text))
            inner = text
            continue
        name = key.replace("_", "-")
        if name == "config":
            if config_file is not None:
                raise EndpointStringError("config", f"config= given twice ({config_file}, {value})")
            if not value:
                raise EndpointStringError("config", "config=: give a TOML file")
            config_file = value
            continue
        field = keys.get(name)
        if field is None:
            raise EndpointStringError(name, _refused_key(key, value, keys))
        if value == "":
            hint = " (http=none for no port-80 listener)" if name == "http" else ""
            raise EndpointStringError(name, f"{key}=: give a value{hint}")
        if field.metadata["kind"] == "list":
            given.setdefault(name, []).append(value)
        elif name in given:
            raise EndpointStringError(name, f"{key}= given twice ({given[name]}, {value}); it is not a list")
        else:
            given[name] = value
    if inner is None:
        raise EndpointStringError(
            None, "no inner endpoint: give the listening endpoint first, escaped, e.g. tenantedge:tcp\\:443:store=DIR"
        )

    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            from_file = load_toml(config_file)
        except ConfigError as e:
            problem = str(e).removeprefix(f"{config_file}: ")
            raise EndpointStringError("config", f"config={config_file}: {problem}") from None
        for name in from_file:
            if name not in keys and name != "eab-hmac-key":
                reason = _NOT_ENDPOINT_KEYS.get(name, "not an endpoint setting (twistd tenantedge only)")
                raise EndpointStringError(
                    "config", f"config={config_file}: '{name}' is not taken by the endpoint: {reason}"
                )
    try:
        config = OnDemandConfig.from_settings({**from_file, **given}, demo_defaults=False)
    except ConfigError as e:
        raise _setting_error(e, given, from_file, config_file) from None

    inner_endpoint = _inner_endpoint(reactor, inner, serverFromString)
    try:
        return OnDemandEndpoint(reactor, inner_endpoint, config, description=inner)
    except ConfigError as e:
        raise _setting_error(e, given, from_file, config_file) from None


def _extra_argument(text: str) -> str:
    if "=" not in text and text.replace("-", "_") in _flag_names():
        return f"{text}: flags take a value: {text}=yes"
    return f"unexpected argument {text!r}: only the inner endpoint is positional; settings are key=value"


def _flag_names() -> set[str]:
    return {name.replace("-", "_") for name, f in endpoint_keys().items() if f.metadata["kind"] == "flag"}


def _refused_key(key: str, value: str, keys: Mapping[str, Any]) -> str:
    from .config import settings

    name = key.replace("_", "-")
    shown = "..." if name == "eab-hmac-key" else value
    if name in _NOT_ENDPOINT_KEYS:
        return f"{key}={shown}: not taken by the endpoint: {_NOT_ENDPOINT_KEYS[name]}"
    if name in {f.name.replace("_", "-") for f in settings()}:
        return f"{key}={shown}: not taken by the endpoint (an option of twistd tenantedge only)"
    close = difflib.get_close_matches(name, [*keys, "config"], n=1)
    return f"{key}={shown}: unknown key" + (f" (did you mean {close[0]}=?)" if close else "")


def _setting_error(
    error: ConfigError, given: Mapping[str, Any], from_file: Mapping[str, Any], config_file: str | None
) -> EndpointStringError:
    """The endpoint's form of a configuration error: where the bad value was written."""
    key = error.key
    if key is None:
        return EndpointStringError(None, error.problem)
    if key in given:
        raw = given[key]
        values = [raw] if isinstance(raw, str) else list(raw)
        where = f"{key}={values[0]}" if len(values) == 1 else f"{key}="
    elif key in from_file:
        where = f"config={config_file}: {key}"
    else:
        where = key
    return EndpointStringError(key, f"{where}: {error.problem}")


def _inner_endpoint(reactor: Any, description: str, parse: Callable[[Any, str], Any]) -> IStreamServerEndpoint:
    kind = description.split(":", 1)[0].lower()
    if kind == PREFIX:
        raise EndpointStringError(None, f"inner endpoint {description!r}: a tenantedge: endpoint cannot wrap another")
    if kind == "ssl":
        raise EndpointStringError(
            None, f"inner endpoint {description!r}: give a plain stream endpoint (tcp:, unix:, systemd:); "
            "tenantedge does the TLS"
        )
    try:
        endpoint: IStreamServerEndpoint = parse(reactor, description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise EndpointStringError(None, f"inner endpoint {description!r} is not a valid endpoint: {e}") from None
    return endpoint


def _listen_problem(error: BaseException, description: str, purpose: str) -> str:
    from twisted.internet.error import CannotListenError

    if isinstance(error, CannotListenError):
        where = f"port {error.port}" + (f" of {error.interface}" if error.interface else "")
        return f"cannot listen on {where} ({purpose}): {error.socketError}"
    return f"cannot listen on {description} ({purpose}): {error}"


def _cause(error: BaseException) -> BaseException | None:
    """
    What to chain a one-line error to: nothing when that line says it all
    (a port in use, an unusable store), the original error otherwise, so
    its traceback is kept.
    """
    from twisted.internet.error import CannotListenError

    from .service import StartupError

    return None if isinstance(error, (CannotListenError, StartupError)) else error


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        name = getattr(host, "host", "")
        return f"[{name}]:{host.port}" if ":" in name else f"{name}:{host.port}"
    return str(getattr(host, "name", host))


@implementer(IStreamServerEndpoint)
class OnDemandEndpoint:
    """
    On-demand TLS around an inner endpoint: what a C{tenantedge:} string
    parses to, or, in Python, C{OnDemandEndpoint(reactor,
    TCP4ServerEndpoint(reactor, 443), OnDemandConfig(...))}. See the module
    docstring for the lifetime of what L{listen} starts.

    @ivar config: the validated configuration.
    @ivar inner: where TLS is served.
    @ivar http: the port-80 endpoint (C{config.http}), or C{None}.
    @ivar make_service: builds the service for each listen
        (L{OnDemandTLS.from_config} unless given, e.g. a C{partial} of it
        with C{policy=}).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        inner: IStreamServerEndpoint,
        config: OnDemandConfig,
        *,
        description: str | None = None,
        make_service: Callable[[OnDemandConfig, Any], OnDemandTLS] | None = None,
    ) -> None:
        """
        @param description: the inner endpoint as written, for messages.
        """
        from twisted.internet.endpoints import serverFromString

        self.reactor = reactor
        self.inner = inner
        self.config = config
        self.description = description if description is not None else repr(inner)
        self.http: IStreamServerEndpoint | None = (
            serverFromString(reactor, config.http) if config.http is not None else None
        )
        self.make_service = make_service
        self._port: OnDemandPort | None = None
        self._starting = False
        self._undoing: Deferred[Any] | None = None

    def __repr__(self) -> str:
        return f"<OnDemandEndpoint {self.description} http={self.config.http or 'none'} store={self.config.store}>"

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[OnDemandPort]:  # type: ignore[override]
        """
        Start the on-demand TLS service, then listen on the inner endpoint
        with C{protocolFactory} wrapped in it, then on the port-80
        endpoint.

        @return: a Deferred firing with the L{OnDemandPort}, or failing
            with L{tenantedge.service.StartupError} or
            L{tenantedge.listening.ListenFailed} after undoing whatever had
            started.
        """
        return Deferred.fromCoroutine(self._listen(protocolFactory))

    async def _listen(self, factory: IProtocolFactory) -> OnDemandPort:
        from .listening import ListenFailed

        if self._starting or self._port is not None:
            # Two services on one store in one process would race for the
            # same names and the same port 80.
            raise ListenFailed(f"{PREFIX} endpoint: already listening on {self.description}; stop that port first")
        self._starting = True
        try:
            if self._undoing is not None:
                # A failed listen's TLS port may still be closing.
                await self.undone()
            port = await self._start(factory)
        finally:
            self._starting = False
        self._port = port
        port.stopped.addBoth(self._forget, port)
        return port

    def _forget(self, result: object, port: OnDemandPort) -> object:
        if self._port is port:
            self._port = None
        return result

    def undone(self) -> Deferred[None]:
        """
        Fires once whatever a failed L{listen} had started is stopped again.
        The failure itself is reported at once, without waiting for that
        (C{twistd} needs it synchronously to stop at start-up), while a TCP
        port it had opened closes on the next reactor turn.
        """
        if self._undoing is None:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def relay(result: object) -> object:
            done.callback(None)
            return result

        self._undoing.addBoth(relay)
        return done

    def _undo(self, *steps: tuple[str, Callable[[], Any]]) -> None:
        """Start undoing C{steps}, in order, each failure logged, not raised."""

        def failed(failure: Failure, what: str) -> None:
            self._log.failure("tenantedge endpoint: {what} failed after a failed listen", failure, what=what)

        pending = [maybeDeferred(step).addErrback(failed, what) for what, step in steps]
        undoing: Deferred[Any] = DeferredList(pending)
        self._undoing = undoing

        def finished(result: object) -> None:
            if self._undoing is undoing:
                self._undoing = None

        undoing.addCallback(finished)

    async def _start(self, factory: IProtocolFactory) -> OnDemandPort:
        from .listening import ListenFailed
        from .proxy import EdgeSite
        from .service import OnDemandTLS, StartupError

        make = self.make_service or OnDemandTLS.from_config
        try:
            service = make(self.config, self.reactor)
        except Exception as e:
            raise StartupError(f"{PREFIX} endpoint: cannot build on-demand TLS: {e}") from e
        stop_service = ("stopping the on-demand TLS service", service.stopService)
        try:
            service.startService()
        except Exception as e:
            if service.running:
                self._undo(stop_service)
            detail = str(e) if isinstance(e, StartupError) else f"starting on-demand TLS failed: {e!r}"
            raise StartupError(f"{PREFIX} endpoint: {detail}") from _cause(e)

        try:
            https: IListeningPort = await self.inner.listen(service.wrap(factory))
        except Exception as e:
            self._undo(stop_service)
            problem = _listen_problem(e, self.description, "TLS with on-demand certificates")
            raise ListenFailed(f"{PREFIX} endpoint: {problem}") from _cause(e)

        http: IListeningPort | None = None
        if self.http is not None:
            resource = service.http_resource(https_port=lambda: int(getattr(https.getHost(), "port", 443)))
            site = EdgeSite(resource, reactor=self.reactor, max_body_size=SMALL_BODIES)
            try:
                http = await self.http.listen(site)
            except Exception as e:
                self._undo(("closing the TLS port", https.stopListening), stop_service)
                problem = _listen_problem(e, str(self.config.http), "ACME HTTP-01 answers and redirects to HTTPS")
                raise ListenFailed(f"{PREFIX} endpoint: {problem}") from _cause(e)

        port = OnDemandPort(self.reactor, https, http, service)
        self._log.info(
            "tenantedge endpoint: on-demand TLS on {https}; {http}",
            https=port.https_address,
            http=f"HTTP-01 answers and redirects on {port.http_address}" if http is not None else "no port-80 listener",
        )
        return port


@implementer(IListeningPort)
class OnDemandPort:
    """
    The listening port an L{OnDemandEndpoint} gives back: the TLS port,
    the port-80 port and the service they share, stopped together.

    @ivar https: the inner endpoint's port (its C{getHost} is this port's).
    @ivar http: the port-80 listener's port, or C{None}.
    @ivar service: the running L{tenantedge.service.OnDemandTLS} (its store,
        metrics registry, resolver...).
    @ivar stopped: fires (with C{None}, whatever the outcome) once
        L{stopListening} has finished.
    """

    _log = Logger()

    def __init__(self, reactor: Any, https: IListeningPort, http: IListeningPort | None, service: OnDemandTLS) -> None:
        self.reactor = reactor
        self.https = https
        self.http = http
        self.service = service
        self.stopped: Deferred[None] = Deferred()
        # Addresses are read now: a closed TCP port can no longer tell.
        self.https_address = _address(https)
        self.http_address = _address(http) if http is not None else None
        self._outcome: object = None
        self._waiting: list[Deferred[None]] | None = None
        add_trigger = getattr(reactor, "addSystemEventTrigger", None)
        self._trigger = add_trigger("before", "shutdown", self._shutting_down) if add_trigger else None

    def __repr__(self) -> str:
        return f"<OnDemandPort https={self.https_address} http={self.http_address or 'none'}>"

    def getHost(self) -> Any:
        """The TLS port's address (what C{tcp:0} bound, for instance)."""
        return self.https.getHost()

    def startListening(self) -> None:
        """
        Nothing to do: L{OnDemandEndpoint.listen} returns this port already
        listening. A stopped port is not restarted (its service is gone):
        listen on the endpoint again.
        """
        if self._waiting is not None:
            raise RuntimeError("this tenantedge port has stopped; listen on the endpoint again")

    def stopListening(self) -> Deferred[None]:
        """
        Close the TLS and port-80 ports, then stop the service (renewal,
        cache refresh, connection pools). Fires when all of it is done;
        calling it again gives the same outcome.
        """
        if self._waiting is None:
            self._waiting = []
            Deferred.fromCoroutine(self._stop()).addBoth(self._finished)
        if self.stopped.called:
            return fail(self._outcome) if isinstance(self._outcome, Failure) else succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def _shutting_down(self) -> Deferred[None]:
        # The trigger is firing: it must not be removed any more.
        self._trigger = None
        return self.stopListening()

    def _finished(self, outcome: object) -> None:
        self._outcome = outcome
        # First the endpoint (it may be listened on again), then the callers.
        self.stopped.callback(None)
        waiting, self._waiting = self._waiting or [], []
        for waiter in waiting:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(None)

    async def _stop(self) -> None:
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except NotImplementedError:
                pass  # a fake reactor
            self._trigger = None
        errors: list[BaseException] = []
        for port in (self.https, self.http):
            if port is None:
                continue
            try:
                await maybeDeferred(port.stopListening)
            except Exception as e:
                errors.append(e)
        try:
            await maybeDeferred(self.service.stopService)
        except Exception as e:
            errors.append(e)
        self._log.info("tenantedge endpoint: stopped (on-demand TLS on {https})", https=self.https_address)
        if errors:
            raise errors[0]
