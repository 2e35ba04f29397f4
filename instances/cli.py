"""The `ten` command-line client. The REST-backed verbs arrive with the API (issue 4)."""

from __future__ import annotations

import sys


def main() -> int:
    sys.stderr.write(
        "ten: the REST client is not available in this version yet.\n"
        "Use `python manage.py spawn|stop|restart|ps|logs` on the server meanwhile.\n"
    )
    return 2
