"""`python -m instances.cli`: the same as the `ten` script."""

from __future__ import annotations

import sys

from instances.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
