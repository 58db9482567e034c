"""
The admin command line: C{python -m tenantedge certs ...} (or
C{tenantedge certs ...}).

    certs list [--json]     every stored certificate: host, issuer, not-after,
                            days left, key type
    certs show HOST [--json]
    certs issue HOST        obtain one now, through the running server's
                            policy, limits and issuers (admin endpoint)
    certs renew HOST        renew now, through the running server
    certs remove HOST       move to <store>/archive/ (the key is kept)
    serve [options]         run the server (same as `twist tenantedge`)

Every command takes the server's own options after it (C{--config FILE},
C{--store DIR}, C{--admin ENDPOINT}...), so it finds the same store and
admin endpoint as the server. list/show/remove work on the store directly,
safely beside a running server (writes take the per-name lock; the server
notices a removed or replaced entry within C{--store-poll}); issue and
renew ask the running server, which owns port 80 for HTTP-01 and the ACME
account.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from .certificates import CertificateBundle
from .hostnames import InvalidHostname, normalize
from .store import DirectoryStore, StoreError

__all__ = ["main", "describe"]

USAGE = """\
usage: python -m tenantedge certs list [--json] [server options]
       python -m tenantedge certs show HOST [--json] [server options]
       python -m tenantedge certs (issue|renew|remove) HOST [server options]
       python -m tenantedge serve [server options]
server options: those of `twistd tenantedge --help` (--config, --store, --admin, ...)
"""


class CLIError(Exception):
    """A one-line error for the user; exit status 1."""


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


def _server_options(argv: Sequence[str]) -> Any:
    from .tap import Options

    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        raise CLIError(str(e)) from None
    return options


def _store(options: Any) -> DirectoryStore:
    path = options["store"]
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


def _admin_url(options: Any) -> str:
    description = options["admin"]
    if description == "none":
        raise CLIError("the admin endpoint is disabled (--admin none): the running server cannot be asked")
    from .tap import endpoint_port

    parts = description.split(":")
    port = endpoint_port(description)
    interface = next((p.split("=", 1)[1] for p in parts if p.startswith("interface=")), "127.0.0.1")
    if port is None or not parts[0].startswith("tcp"):
        raise CLIError(f"cannot reach the admin endpoint {description!r}: use a tcp:PORT endpoint")
    if interface in ("0.0.0.0", "::", ""):
        interface = "127.0.0.1"
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{port}"


def _ask_server(options: Any, host: str, action: str, timeout: float = 600.0) -> dict[str, Any]:
    url = f"{_admin_url(options)}/certs/{host}/{action}"
    request = urllib.request.Request(url, data=b"", method="POST", headers={"X-Tenantedge-Admin": "1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", str(e))
        except ValueError:
            detail = str(e)
        raise CLIError(f"{action} {host}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CLIError(f"cannot reach the running server at {url}: {reason}") from None


def _host(value: str) -> str:
    try:
        return normalize(value)
    except InvalidHostname as e:
        raise CLIError(f"{value!r} is not a valid host name: {e.reason}") from None


def certs(argv: list[str], out: Any) -> int:
    if not argv or argv[0] not in ("list", "show", "issue", "renew", "remove"):
        raise CLIError("certs: choose list, show, issue, renew or remove")
    command, rest = argv[0], argv[1:]
    as_json = "--json" in rest
    rest = [a for a in rest if a != "--json"]
    host = None
    if command != "list":
        if not rest or rest[0].startswith("-"):
            raise CLIError(f"certs {command}: which host?")
        host, rest = _host(rest[0]), rest[1:]
    options = _server_options(rest)
    now = time.time()
    if command == "list":
        store = _store(options)
        rows = []
        for name in sorted(_result(store.names())):
            try:
                rows.append(describe(name, _result(store.get(name)), now))
            except KeyError:
                rows.append({"host": name, "issuer": "(unreadable: see the log)", "not_after": "", "days_left": None,
                             "key_type": ""})
        if as_json:
            json.dump(rows, out, indent=1)
            out.write("\n")
        else:
            out.write(f"{'HOST':40} {'ISSUER':34} {'NOT AFTER':25} {'DAYS':>6} KEY\n")
            for r in rows:
                days = "" if r["days_left"] is None else f"{r['days_left']:.1f}"
                out.write(f"{r['host']:40} {r['issuer'][:34]:34} {r['not_after'][:25]:25} {days:>6} {r['key_type']}\n")
        return 0
    assert host is not None
    if command == "show":
        store = _store(options)
        try:
            info = describe(host, _result(store.get(host)), now)
        except KeyError:
            raise CLIError(f"no usable certificate stored for {host}") from None
        info["file"] = os.path.join(store.path, host + ".pem")
        if as_json:
            json.dump(info, out, indent=1)
            out.write("\n")
        else:
            for key, value in info.items():
                out.write(f"{key:13} {value}\n")
        return 0
    if command == "remove":
        store = _store(options)
        try:
            _result(store.delete(host))
        except KeyError:
            raise CLIError(f"nothing stored for {host}") from None
        out.write(f"{host}: moved to {os.path.join(store.path, 'archive')}/ (the key is kept)\n")
        try:
            _ask_server(options, host, "forget", timeout=5)
        except CLIError:
            out.write("(the running server will notice within its --store-poll interval)\n")
        return 0
    result = _ask_server(options, host, command)
    if result.get("archived"):
        out.write(f"{host}: the allow check denies it now; its certificate was archived\n")
    else:
        out.write(f"{host}: {command}d, valid until {result.get('not_after')}\n")
    return 0


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """Entry point of C{python -m tenantedge} and the C{tenantedge} script."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = out if out is not None else sys.stdout
    if not args or args[0] in ("-h", "--help", "help"):
        out.write(USAGE)
        return 0 if args else 2
    if args[0] == "serve":
        from twisted.application.twist._twist import Twist

        Twist.main([sys.argv[0], "tenantedge", *args[1:]])
        return 0
    if args[0] != "certs":
        sys.stderr.write(USAGE)
        return 2
    try:
        return certs(args[1:], out)
    except (CLIError, StoreError) as e:
        sys.stderr.write(f"tenantedge: {e}\n")
        return 1
