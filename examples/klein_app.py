#!/usr/bin/env python3
r"""
A Klein application serving many tenant domains with on-demand TLS, through
the C{tenantedge:} endpoint string: Klein's C{app.run} takes any endpoint
description, so on-demand TLS is one string (see L{tenantedge.endpoint})::

    app.run(endpoint_description=
        "tenantedge:tcp\\:443:store=/var/lib/myapp/certs:ca=letsencrypt"
        ":allow-url=https\\://api.example.com/check/{domain}:http=tcp\\:80")

Try it locally (local CA, every name under .localhost is a tenant)::

    pip install klein        # or: pip install 'tenantedge[examples]'
    python examples/klein_app.py
    curl --cacert tenantedge-example/localca/root.pem https://shop.localhost:8443/

Port 0 picks a free port; the endpoint logs the ports it bound in one line
(C{tenantedge endpoint: on-demand TLS on HOST:PORT; HTTP-01 answers and
redirects on HOST:PORT}).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from klein import Klein
from twisted.internet.endpoints import quoteStringArgument

from tenantedge import tls_server_name
from tenantedge.endpoint import endpoint_description

app = Klein()


@app.route("/")
def home(request: Any) -> str:
    """Greets the tenant by the TLS server name (the Host header as a fallback)."""
    tenant = tls_server_name(request) or request.getRequestHostname().decode("ascii", "replace")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return f"Hello, {tenant}! (Klein, on-demand TLS)\n"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A Klein app with on-demand TLS for every tenant domain.")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    parser.add_argument("--https-port", type=int, default=8443, help="HTTPS port, 0 for any [8443]")
    parser.add_argument("--http-port", type=int, default=8080,
                        help="port-80 listener (HTTP-01 answers, redirects), 0 for any, -1 for none [8080]")
    parser.add_argument("--store", default="./tenantedge-example", help="certificate store [./tenantedge-example]")
    parser.add_argument("--ca", action="append", help="internal, letsencrypt, ... (repeatable) [internal]")
    parser.add_argument("--ca-root", action="append", default=[], help="extra trust anchor for the ACME server")
    parser.add_argument("--allow-suffix", action="append", default=[], help="names under it are tenants (repeatable)")
    parser.add_argument("--allow-url", help="allow endpoint, e.g. https://api.example.com/check/{domain}")
    parser.add_argument("--allow-private-suffix", action="store_true", help="also names like shop.test")
    args = parser.parse_args(argv)
    if not args.allow_suffix and not args.allow_url:
        args.allow_suffix = [".localhost"]
    return args


def description(args: argparse.Namespace) -> str:
    """
    The C{tenantedge:} string for the arguments: the helper escapes each
    value; the inner and http endpoints are endpoint strings themselves, so
    an IPv6 interface is quoted inside them first.
    """
    interface = quoteStringArgument(args.interface)
    return endpoint_description(
        f"tcp:{args.https_port}:interface={interface}",
        store=args.store,
        ca=args.ca or ["internal"],
        ca_root=args.ca_root,
        allow_suffix=args.allow_suffix,
        allow_url=args.allow_url,
        allow_private_suffix=args.allow_private_suffix or None,
        http=f"tcp:{args.http_port}:interface={interface}" if args.http_port >= 0 else "none",
    )


def main(argv: list[str] | None = None) -> int:
    text = description(arguments(argv))
    print(f"klein_app: listening on {text}", flush=True)
    try:
        # Listens, runs the reactor until SIGTERM/SIGINT. A listen that
        # fails (port in use, unusable store) is only logged by app.run.
        app.run(endpoint_description=text)
    except ValueError as e:  # the string's settings were refused
        print(f"klein_app: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
