"""
twistd/twist plugin for tenantedge.

The lazy L{ServiceMaker} keeps C{twistd --help} and the plugin cache from
importing the TLS, ACME and proxy stack: only C{twistd tenantedge} loads
L{tenantedge.tap}.
"""

from twisted.application.service import ServiceMaker

tenantedge = ServiceMaker(
    "tenantedge",
    "tenantedge.tap",
    "HTTPS edge with on-demand TLS certificates and a reverse proxy",
    "tenantedge",
)
