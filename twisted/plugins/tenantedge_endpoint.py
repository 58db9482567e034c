"""
The C{tenantedge:} server endpoint string (see L{tenantedge.endpoint}):
on-demand TLS around any inner endpoint, for C{twistd web --listen},
C{serverFromString} and Klein's C{app.run(endpoint_description=...)}.

Kept tiny and lazy: Twisted loads this module whenever any endpoint string
plugin is looked up (C{systemd:}, C{tls:}, ... too) and whenever it
rebuilds the plugin cache, so it imports nothing from C{tenantedge} (whose
package imports the whole TLS and ACME stack) until a C{tenantedge:}
string is actually parsed.
"""

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TenantEdgeEndpointPlugin:
    """Hands C{tenantedge:} descriptions to L{tenantedge.endpoint.TenantEdgeParser}."""

    prefix = "tenantedge"

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> Any:
        from tenantedge.endpoint import TenantEdgeParser

        return TenantEdgeParser().parseStreamServer(reactor, *args, **kwargs)


tenantedge_endpoint = TenantEdgeEndpointPlugin()
