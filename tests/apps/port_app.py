"""proxyapp (the proxy tests' ASGI app) as an upstream-style app: it listens on
127.0.0.1:$PORT only, never on $SOCKET_PATH, and dies with KeyError without a PORT."""

from __future__ import annotations

import os
import sys

import uvicorn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.apps.proxyapp import app

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
