"""
Regenerate Twisted's plugin cache (C{twisted/plugins/dropin.cache}) for
the installed tenantedge plugins: C{python -m tenantedge.plugincache}.

Twisted rewrites the cache whenever a plugin file is newer than it. Run as
an unprivileged user (www-data) against an installation owned by root,
that write fails and every start logs C{Unable to write to plugin cache}.
Run this once as the installing user after C{pip install} (the systemd
unit in C{etc/} runs it as root before each start, with C{ExecStartPre=+}).
"""

from __future__ import annotations

import os
import sys

__all__ = ["regenerate", "main"]


def regenerate() -> list[str]:
    """
    Rebuild the cache of every C{twisted.plugins} directory that holds a
    tenantedge plugin; return the cache files written or confirmed fresh.

    @raise OSError: if a cache cannot be written (run it as the owner).
    """
    import twisted.plugins
    from twisted.plugin import IPlugin, getPlugins

    list(getPlugins(IPlugin, twisted.plugins))
    caches: list[str] = []
    for directory in dict.fromkeys(twisted.plugins.__path__):  # once each, in order
        if not os.path.isdir(directory):
            continue  # sys.path entries without a twisted/plugins of their own
        if any(name.startswith("tenantedge_") for name in os.listdir(directory)):
            cache = os.path.join(directory, "dropin.cache")
            if not os.access(directory, os.W_OK) and not os.path.exists(cache):
                raise OSError(f"cannot write the plugin cache in {directory}: run this as its owner")
            caches.append(cache)
    return caches


def main() -> int:
    try:
        caches = regenerate()
    except OSError as e:
        sys.stderr.write(f"tenantedge: {e}\n")
        return 1
    for cache in caches:
        print(f"plugin cache: {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
