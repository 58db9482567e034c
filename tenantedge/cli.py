"""
The command line: C{tenantedge ...} (or C{python -m tenantedge ...})::

    certs list [--json]     every stored certificate: host, issuer, not-after,
                            days left, key type
    certs show HOST [--json]
    certs issue HOST [--json]   obtain one now, through the running server's
                                policy, limits and issuers (admin endpoint)
    certs renew HOST [--json]   renew now, through the running server
    certs remove HOST [--json]  move to <store>/archive/ (the key is kept)
    store copy SRC DST [--json]  a directory store into Redis, or back (byte for byte)
    serve [options]         run the server (same as C{twist tenantedge})

Every level takes C{--help} and C{--version}. Every C{certs} command also
takes the server's own options after it (C{--config FILE}, C{--store DIR},
C{--admin ENDPOINT}...), parsed by the server's own L{tenantedge.options.Options}, so it finds
the same store and admin endpoint as the server. list/show/remove work on
the store directly, safely beside a running server (writes take the
per-name lock; the server notices a removed or replaced entry within
C{--store-poll}); issue and renew ask the running server, which owns port
80 for HTTP-01 and the ACME account.

The commands are C{twisted.python.usage.Options} with C{subCommands}, as
C{twist} and C{twistd} are. Errors are one line on stderr: exit status 2
for a usage error, 1 for anything else.
"""

from __future__ import annotations

import getopt
import http.client
import ipaddress
import json
import os
import runpy
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, NamedTuple

from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.python import usage

from . import __version__
from .certificates import CertificateBundle
from .config import OnDemandConfig, format_duration
from .headers import ADMIN_HEADER
from .hostnames import InvalidHostname, normalize
from .options import Options as ServerOptions
from .store import DirectoryStore, StoreError

__all__ = ["main", "describe", "admin_address", "AdminAddress", "TenantedgeOptions", "CLIError"]

#: The name the help texts use; C{python -m tenantedge} is the same command.
PROGRAM = "tenantedge"


class CLIError(Exception):
    """A one-line error for the user; exit status 1."""


class CommandUsageError(usage.UsageError):
    """
    A usage error, with the command it belongs to, so that the one line on
    stderr can point at the right C{--help}.
    """

    def __init__(self, message: str, command: str) -> None:
        super().__init__(message)
        self.command = command


# -- what the commands show -------------------------------------------------


def describe(host: str, bundle: CertificateBundle, now: float) -> dict[str, Any]:
    """One certificate as the CLI shows it."""
    key = bundle.key
    key_type = f"ecdsa-{key.curve.name}" if hasattr(key, "curve") else f"rsa{key.key_size}"
    return {
        "host": host,
        "issuer": bundle.issuer_name(),
        "not_before": bundle.leaf.not_valid_before_utc.isoformat(),
        "not_after": bundle.leaf.not_valid_after_utc.isoformat(),
        "days_left": round((bundle.not_after - now) / 86400, 1),
        "key_type": key_type,
        "serial": format(bundle.leaf.serial_number, "x"),
        "names": bundle.dns_names(),
        "chain_length": len(bundle.chain),
    }


def _write_json(out: IO[str], value: Any) -> None:
    json.dump(value, out, indent=1)
    out.write("\n")


# -- the store ----------------------------------------------------------------


def _store(config: OnDemandConfig) -> Any:
    """
    The configured store, opened for the CLI: a directory, or a Redis
    store over a blocking connection (its Deferreds fire at once, so
    L{_result} reads them the same way).
    """
    path = config.store
    if path.startswith(("redis://", "rediss://")):
        from .redisstore import Keys, RedisStore
        from .resp import BlockingCommands, BlockingRedis, RedisAddress, RedisUnavailable

        try:
            address = RedisAddress.from_url(path, password_file=config.store_password_file, ca=config.store_ca)
            return RedisStore(BlockingCommands(BlockingRedis(address)), Keys(address.prefix))  # type: ignore[arg-type]
        except (ValueError, RedisUnavailable) as e:
            raise CLIError(str(e)) from None
    if not os.path.isdir(path):
        raise CLIError(f"no store at {path} (give --store or --config)")
    _become_store_owner(path)
    return DirectoryStore(path)


def _become_store_owner(path: str) -> None:
    """
    Run as root against a store owned by the server's user (www-data), the
    CLI becomes that user first: files it creates (archive, lock files)
    must stay the server's, or the server could no longer write them.
    """
    st = os.stat(path)
    if os.geteuid() == 0 and st.st_uid != 0:
        os.setgroups([])  # none of root's supplementary groups
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)


def _result(d: Any) -> Any:
    """The result of a Deferred that the inline store has already fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


# -- the admin endpoint of the running server -------------------------------


class AdminAddress(NamedTuple):
    """Where the CLI connects to reach the admin endpoint."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The base URL, for messages (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def admin_address(description: str | None) -> AdminAddress:
    """
    The TCP address to connect to for the admin endpoint the server listens
    on, from its endpoint description (C{--admin}).

    The description is read by Twisted's own endpoint parser, exactly as the
    server reads it, rather than split by hand: escaped colons
    (C{interface=\\:\\:1}), C{port=} keywords, C{tcp6:} and whatever else
    the parser accepts all mean the same to both. The endpoint is made to
    "listen" on a C{MemoryReactor}, which binds nothing but records the
    port and interface it was asked for. A server listening on every
    address (C{0.0.0.0}, C{::} or no interface) is reached on loopback.

    @param description: an endpoint description, or None when the admin
        endpoint is disabled (C{--admin none}).
    @raise CLIError: when the CLI cannot tell where to connect.
    """
    if description is None:
        raise CLIError("the admin endpoint is disabled (--admin none): the running server cannot be asked")
    reactor = MemoryReactor()
    failures: list[Any] = []
    try:
        serverFromString(reactor, description).listen(Factory()).addErrback(failures.append)
    except Exception as e:  # any parser or endpoint plugin error
        raise CLIError(f"cannot read the admin endpoint {description!r}: {e}") from None
    if failures:
        raise CLIError(f"cannot read the admin endpoint {description!r}: {failures[0].getErrorMessage()}")
    if not reactor.tcpServers:
        raise CLIError(
            f"the admin endpoint {description!r} is not a plain TCP endpoint: the CLI reaches the running "
            "server over HTTP on TCP (use --admin tcp:PORT)"
        )
    port, _factory, _backlog, interface = reactor.tcpServers[0]
    if port == 0:
        raise CLIError(
            f"the admin endpoint {description!r} listens on a port chosen at start-up: give the CLI the port "
            "it got (--admin tcp:PORT)"
        )
    return AdminAddress(_loopback_for(interface), port)


def _loopback_for(interface: str) -> str:
    """A listening interface as a connectable address: loopback for 'any'."""
    if interface == "":
        return "127.0.0.1"  # Twisted's default interface: every IPv4 address
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        return interface  # a host name
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return interface


def _ask_server(config: OnDemandConfig, host: str, action: str, timeout: float = 600.0) -> dict[str, Any]:
    """
    Ask the running server's admin endpoint for an action. With
    C{--admin-token-file} the CLI uses the hostname API (C{issue}: C{PUT
    /v1/hostnames/<host>}, C{renew}: C{POST /v1/hostnames/<host>/renew?force=true},
    the CLI's renew meaning "now"), with the bearer token; C{forget} has no
    API form and, like everything without a token file, goes to the
    deprecated C{POST /certs/<host>/<action>}.

    http.client rather than urllib: the admin endpoint is on loopback, and
    an C{http_proxy} in the environment must not be asked to reach it.
    """

    address = admin_address(config.admin)
    method, path = "POST", f"/certs/{host}/{action}"
    headers = {ADMIN_HEADER.decode(): "1"}
    if config.admin_token is not None:
        headers["Authorization"] = f"Bearer {config.admin_token}"
        if action == "issue":
            method, path = "PUT", f"/v1/hostnames/{host}"
        elif action == "renew":
            path = f"/v1/hostnames/{host}/renew?force=true"
    connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request(method, path, body=b"", headers=headers)
        response = connection.getresponse()
        status, body = response.status, response.read()
    except (OSError, http.client.HTTPException) as e:
        raise CLIError(f"cannot reach the running server at {address.url}: {e}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise CLIError(f"{action} {host}: {address.url}{path} answered HTTP {status} without a JSON object "
                       "(is --admin the right endpoint?)")
    if status != 200:
        raise CLIError(f"{action} {host}: {answer.get('detail') or answer.get('error', f'HTTP {status}')}")
    if path.startswith("/v1/"):
        # The API's answer, in the shape the commands print.
        certificate = answer.get("certificate") or {}
        answer = {**answer, "host": host, "action": action, "not_after": certificate.get("not_after"),
                  "archived": answer.get("reason") == "archived"}
    return answer


def _host(value: str) -> str:
    try:
        return normalize(value)
    except InvalidHostname as e:
        raise CLIError(f"{value!r} is not a valid host name: {e.reason}") from None


# -- the commands -------------------------------------------------------------


class _Command(usage.Options):
    """
    What every level of the command line shares: C{--version}, a synopsis
    naming the whole command (C{tenantedge certs show HOST ...}) and usage
    errors that remember which command they belong to.

    @cvar arguments: what follows the command's name in its synopsis.
    """

    arguments = ""

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"{PROGRAM} {__version__}")
        sys.exit(0)

    def command_path(self) -> str:
        """The command's full name, e.g. C{tenantedge certs show}."""
        parent = self.parent
        if not isinstance(parent, _Command):
            return PROGRAM
        return f"{parent.command_path()} {parent.subCommand}"

    def getSynopsis(self) -> str:
        return f"Usage: {self.command_path()} {self.arguments}".rstrip()

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            self._parse(list(sys.argv[1:] if options is None else options))
        except CommandUsageError:
            raise  # a subcommand's, already named
        except usage.UsageError as e:
            raise CommandUsageError(str(e), self.command_path()) from None

    def _parse(self, argv: list[str]) -> None:
        super().parseOptions(argv)


class _Group(_Command):
    """A command that only chooses a subcommand (C{tenantedge}, C{certs})."""

    arguments = "COMMAND [options]"
    subCommands: list[list[Any]] = []

    def _choices(self) -> str:
        names = [str(command[0]) for command in self.subCommands]
        return ", ".join(names[:-1]) + " or " + names[-1]

    def _parse(self, argv: list[str]) -> None:
        # A group has flags only, so the first argument that is not one names
        # the subcommand: refuse an unknown one with the choices, not with
        # usage.Options' bare "Unknown command".
        first = next((arg for arg in argv if not arg.startswith("-")), None)
        if first is not None and first not in (command[0] for command in self.subCommands):
            raise usage.UsageError(f"unknown command {first!r}: choose {self._choices()}")
        super()._parse(argv)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(f"choose a command: {self._choices()}")


_SERVER_OPTIONS_NOTE = (
    " Also takes the server's own options (--config FILE, --store DIR, --admin ENDPOINT and every other option "
    f"of `{PROGRAM} serve --help`), so that it finds the same store and admin endpoint as the server."
)


class _CertsCommand(_Command):
    """
    One C{certs} command. Its own options (C{--json}, C{--help},
    C{--version}) and its host may come in any order among the server's
    options, which go to the server's own L{ServerOptions}: the CLI then
    reads the same C{--config} file, defaults and validation as the server.

    @cvar takes_host: whether the command names a host (all but C{list}).
    @ivar host: the host argument, as given.
    @ivar config: the server's configuration, after parsing.
    """

    takes_host = True
    optFlags: list[list[Any]] = [["json", None, "Print JSON instead of text."]]

    def __init__(self) -> None:
        super().__init__()
        self.host: str | None = None
        self.config: OnDemandConfig | None = None
        self._server_argv: list[str] = []

    def _parse(self, argv: list[str]) -> None:
        own, self._server_argv = self._split(argv)
        super()._parse(own)

    def _split(self, argv: list[str]) -> tuple[list[str], list[str]]:
        """
        This command's own arguments, and the server's options.

        C{getopt.gnu_getopt} with both option tables finds which arguments
        are option values (C{--store DIR}) and which are positional (the
        host), wherever the host is; usage.Options' own getopt would stop at
        the host.
        """
        server = ServerOptions()
        long_options = list(dict.fromkeys([*self.longOpt, *server.longOpt]))
        try:
            found, positional = getopt.gnu_getopt(argv, self.shortOpt + server.shortOpt, long_options)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        own: list[str] = []
        server_argv: list[str] = []
        for option, value in found:
            name = option.lstrip("-")
            if name in self.synonyms or name.replace("-", "_") in self.synonyms:
                own.append(option)
            elif option.startswith("--"):
                server_argv.append(f"{option}={value}" if name + "=" in server.longOpt else option)
            else:
                server_argv.extend([option, value] if name + ":" in server.shortOpt else [option])
        return [*own, "--", *positional], server_argv

    def parseArgs(self, *args: str) -> None:
        if self.takes_host and not args:
            raise usage.UsageError("which host?")
        extra = args[1:] if self.takes_host else args
        if extra:
            raise usage.UsageError(f"unexpected argument {extra[0]!r}")
        if self.takes_host:
            self.host = args[0]

    def postOptions(self) -> None:
        server = ServerOptions()
        server.parseOptions(self._server_argv)
        self.config = server.config

    def run(self, out: IO[str]) -> int:
        """Do what the command says; 0 on success."""
        raise NotImplementedError

    def _write_answer(self, out: IO[str], answer: dict[str, Any], text: str) -> None:
        if self["json"]:
            _write_json(out, answer)
        else:
            out.write(text + "\n")


class _List(_CertsCommand):
    arguments = "[--json] [server options]"
    longdesc = (
        "Every certificate in the store: host, issuer, not-after, days left, key type. Reads the store "
        "directly." + _SERVER_OPTIONS_NOTE
    )
    takes_host = False

    def run(self, out: IO[str]) -> int:
        assert self.config is not None
        store = _store(self.config)
        now = time.time()
        rows = []
        for name in sorted(_result(store.names())):
            try:
                rows.append(describe(name, _result(store.get(name)), now))
            except KeyError:
                rows.append({"host": name, "issuer": "(unreadable: see the log)", "not_after": "", "days_left": None,
                             "key_type": ""})
        if self["json"]:
            _write_json(out, rows)
            return 0
        out.write(f"{'HOST':40} {'ISSUER':34} {'NOT AFTER':25} {'DAYS':>6} KEY\n")
        for r in rows:
            days = "" if r["days_left"] is None else f"{r['days_left']:.1f}"
            out.write(f"{r['host']:40} {r['issuer'][:34]:34} {r['not_after'][:25]:25} {days:>6} {r['key_type']}\n")
        return 0


class _Show(_CertsCommand):
    arguments = "HOST [--json] [server options]"
    longdesc = "One stored certificate in detail. Reads the store directly." + _SERVER_OPTIONS_NOTE

    def run(self, out: IO[str]) -> int:
        assert self.config is not None and self.host is not None
        host = _host(self.host)
        store = _store(self.config)
        try:
            info = describe(host, _result(store.get(host)), time.time())
        except KeyError:
            raise CLIError(f"no usable certificate stored for {host}") from None
        info["file"] = (os.path.join(store.path, host + ".pem") if isinstance(store, DirectoryStore)
                        else store.keys.cert(host))
        if self["json"]:
            _write_json(out, info)
        else:
            for key, value in info.items():
                out.write(f"{key:13} {value}\n")
        return 0


class _Issue(_CertsCommand):
    arguments = "HOST [--json] [server options]"
    longdesc = (
        "Obtain a certificate now, through the running server's policy, limits and issuers (it owns port 80 "
        "for HTTP-01 and the ACME account; the CLI asks it on its admin endpoint). Nothing is ordered for a "
        "name that already has a valid certificate." + _SERVER_OPTIONS_NOTE
    )

    def run(self, out: IO[str]) -> int:
        assert self.config is not None and self.host is not None
        host = _host(self.host)
        answer = _ask_server(self.config, host, "issue")
        until = answer.get("not_after")
        if answer.get("issued", True):
            text = f"{host}: issued, valid until {until}"
        else:
            text = f"{host}: already has a valid certificate, valid until {until} (nothing was issued)"
        self._write_answer(out, answer, text)
        return 0


class _Renew(_CertsCommand):
    arguments = "HOST [--json] [server options]"
    longdesc = (
        "Renew now, through the running server (the allow check is asked again first); the next handshake "
        "gets the new certificate." + _SERVER_OPTIONS_NOTE
    )

    def run(self, out: IO[str]) -> int:
        assert self.config is not None and self.host is not None
        host = _host(self.host)
        answer = _ask_server(self.config, host, "renew")
        if answer.get("archived"):
            text = f"{host}: the allow check denies it now; its certificate was archived"
        else:
            text = f"{host}: renewed, valid until {answer.get('not_after')}"
        self._write_answer(out, answer, text)
        return 0


class _Remove(_CertsCommand):
    arguments = "HOST [--json] [server options]"
    longdesc = (
        "Move a certificate to <store>/archive/ (the key is kept), then tell the running server to forget it; "
        "a server that cannot be told notices within its --store-poll interval." + _SERVER_OPTIONS_NOTE
    )

    def run(self, out: IO[str]) -> int:
        assert self.config is not None and self.host is not None
        host = _host(self.host)
        store = _store(self.config)
        try:
            _result(store.delete(host))
        except KeyError:
            raise CLIError(f"nothing stored for {host}") from None
        archive = (os.path.join(store.path, "archive") if isinstance(store, DirectoryStore)
                   else store.keys.archive(host))
        try:
            _ask_server(self.config, host, "forget", timeout=5)
            notified = True
        except CLIError:
            notified = False
        if self["json"]:
            _write_json(out, {"host": host, "action": "remove", "archive": archive, "server_notified": notified})
            return 0
        out.write(f"{host}: moved to {archive}/ (the key is kept)\n")
        if not notified:
            poll = format_duration(self.config.store_poll)
            out.write(f"(the running server will notice within its --store-poll interval, {poll})\n")
        return 0


class _Certs(_Group):
    longdesc = "Manage the stored certificates: list and show them, and issue, renew or remove one."
    subCommands = [
        ["list", None, _List, "Every stored certificate."],
        ["show", None, _Show, "One stored certificate in detail."],
        ["issue", None, _Issue, "Obtain a certificate now, through the running server."],
        ["renew", None, _Renew, "Renew now, through the running server."],
        ["remove", None, _Remove, "Move a certificate to <store>/archive/."],
    ]


class _StoreCopy(_Command):
    """C{store copy SRC DST}."""

    arguments = "SRC DST [--json] [--store-password-file FILE] [--store-ca PEM]"
    longdesc = (
        "Copy a store: a directory into Redis, or Redis into a directory (certificates, ACME accounts, "
        "failure backoff, limit windows, hostname lifecycle records), byte for byte, so that no certificate is issued again. SRC and DST "
        "are each a directory or a redis:// URL; the Redis password comes from --store-password-file or "
        "TENANTEDGE_REDIS_PASSWORD."
    )
    optFlags: list[list[Any]] = [["json", None, "Print JSON instead of text."]]
    optParameters = [
        ["store-password-file", None, None, "File holding the Redis password (either side)."],
        ["store-ca", None, None, "CA of a rediss:// side."],
    ]

    def parseArgs(self, source: str, target: str) -> None:  # type: ignore[override]
        self.source = source
        self.target = target

    def run(self, out: IO[str]) -> int:
        from .resp import RedisError, RedisUnavailable
        from .storecopy import copy_store, open_side

        try:
            source = open_side(self.source, self["store-password-file"], self["store-ca"])
            target = open_side(self.target, self["store-password-file"], self["store-ca"])
            copied = copy_store(source, target)
        except (ValueError, RedisUnavailable, RedisError) as e:
            raise CLIError(str(e)) from None
        if self["json"]:
            _write_json(out, copied.to_json())
            return 0
        out.write(f"copied {copied.certificates} certificate(s), {copied.accounts} account(s), "
                  f"{copied.states} state file(s), {copied.records} lifecycle record(s)\n")
        for name in copied.skipped:
            out.write(f"skipped {name}: its stored bundle does not parse\n")
        return 0


class _Stores(_Group):
    longdesc = "Work on a whole store: copy it between a directory and Redis."
    subCommands = [["copy", None, _StoreCopy, "Copy a store (directory to Redis, or back)."]]


class _Serve(_Command):
    """
    C{serve}: everything after it goes to C{twist tenantedge} untouched, so
    C{serve --help} is the server's own help.
    """

    arguments = "[server options]"

    def __init__(self) -> None:
        super().__init__()
        self.twist_argv: list[str] = []

    def _parse(self, argv: list[str]) -> None:
        self.twist_argv = argv


class TenantedgeOptions(_Group):
    """The whole command line, C{tenantedge COMMAND ...}."""

    longdesc = (
        f"HTTPS edge with on-demand TLS. `{PROGRAM} COMMAND --help` describes each command; "
        "`python -m tenantedge` is the same command line."
    )
    subCommands = [
        ["certs", None, _Certs, "List, show, issue, renew or remove certificates."],
        ["store", None, _Stores, "Copy a store between a directory and Redis."],
        ["serve", None, _Serve, "Run the server (as `twist tenantedge`); `serve --help` lists its options."],
    ]


def serve(argv: Sequence[str]) -> None:
    """
    Run the server as C{twist tenantedge ARGS}: C{python -m twisted} is
    C{twist}, so run that module as the main program, through runpy's
    public interface rather than twist's private classes. Nothing has
    imported the global reactor by now, so twist's C{--reactor} choice
    still applies. Ends with twist's own C{SystemExit}.
    """
    sys.argv = ["twist", "tenantedge", *argv]
    runpy.run_module("twisted", run_name="__main__", alter_sys=True)


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Entry point of C{python -m tenantedge} and the C{tenantedge} script."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = TenantedgeOptions()
    try:
        options.parseOptions(args)
    except CommandUsageError as e:
        sys.stderr.write(f"{e.command}: {e} (see {e.command} --help)\n")
        return 2
    if options.subCommand == "serve":
        serve(options.subOptions.twist_argv)
        return 0
    command: _CertsCommand = options.subOptions.subOptions
    try:
        return command.run(out if out is not None else sys.stdout)
    except (CLIError, StoreError, OSError) as e:
        sys.stderr.write(f"{command.command_path()}: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{command.command_path()}: interrupted\n")
        return 130
    except Exception as e:
        # Never a traceback at the user; one line that says it is a bug.
        sys.stderr.write(f"{command.command_path()}: internal error: {type(e).__name__}: {e}\n")
        return 1
