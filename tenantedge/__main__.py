"""C{python -m tenantedge}: the command line (see L{tenantedge.cli})."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
