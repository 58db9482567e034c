#!/usr/bin/env python3
"""
A plain twisted.web application serving many tenant domains, each with its
own certificate obtained at its first TLS handshake, through the tenantedge
API (no reverse proxy: the application runs in the same process).

Try it locally (local CA, every name under .localhost is a tenant)::

    python examples/web_app.py
    curl --cacert tenantedge-example/localca/root.pem https://shop.localhost:8443/

In production, as the owner of the store, something like::

    python examples/web_app.py --interface 0.0.0.0 --https-port 443 --http-port 80 \\
        --store /var/lib/myapp/certs --ca letsencrypt \\
        --allow-url 'https://api.example.com/check/{domain}'

Port 0 picks a free port; the ports actually bound are printed in one line
(``web_app: HTTPS on HOST:PORT, HTTP on HOST:PORT``) once both listen.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from tenantedge import ConfigError, OnDemandConfig, OnDemandTLS, StartupError, tls_server_name


class TenantGreeting(Resource):
    """
    The application: greets the tenant whose domain the request came for.
    The TLS server name is the name the certificate was chosen for; the Host
    header is the fallback (a request that did not come through tenantedge).
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        tenant = tls_server_name(request) or request.getRequestHostname().decode("ascii", "replace")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"Hello, {tenant}! (twisted.web, on-demand TLS)\n".encode()


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A twisted.web app with on-demand TLS for every tenant domain.")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    parser.add_argument("--https-port", type=int, default=8443, help="HTTPS port, 0 for any [8443]")
    parser.add_argument("--http-port", type=int, default=8080,
                        help="port-80 listener (HTTP-01 answers, redirects), 0 for any [8080]")
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


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    try:
        config = OnDemandConfig(
            store=args.store,
            ca=args.ca or ("internal",),
            ca_root=args.ca_root,
            allow_suffix=args.allow_suffix,
            allow_url=args.allow_url,
            allow_private_suffix=args.allow_private_suffix,
        )
    except ConfigError as e:
        print(f"web_app: {e}", file=sys.stderr)
        return 2
    edge = OnDemandTLS.from_config(config, reactor)
    exit_status = [0]

    async def start() -> None:
        # Prepares the store and the CA (this is where a bad store fails),
        # then starts renewal and cache refresh.
        edge.startService()
        reactor.addSystemEventTrigger("before", "shutdown", edge.stopService)
        site = Site(TenantGreeting())
        https = await TCP4ServerEndpoint(reactor, args.https_port, interface=args.interface).listen(edge.wrap(site))
        # Redirects from port 80 name the HTTPS port actually bound.
        port_80 = Site(edge.http_resource(https_port=lambda: https.getHost().port))
        http = await TCP4ServerEndpoint(reactor, args.http_port, interface=args.interface).listen(port_80)
        host = f"[{args.interface}]" if ":" in args.interface else args.interface
        print(f"web_app: HTTPS on {host}:{https.getHost().port}, HTTP on {host}:{http.getHost().port}", flush=True)

    def failed(failure: Failure) -> None:
        # A bad store or a busy port is one line; anything else, a traceback.
        message = str(failure.value) if failure.check(StartupError, CannotListenError) else failure.getTraceback()
        print(f"web_app: cannot start: {message}", file=sys.stderr, flush=True)
        exit_status[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()).addErrback(failed))
    reactor.run()
    return exit_status[0]


if __name__ == "__main__":
    sys.exit(main())
