"""A dns_hook for the tests: `dns_hook.py present|cleanup NAME VALUE` publishes or removes a
TXT record through pebble-challtestsrv's management API ($CHALLTESTSRV_URL)."""

from __future__ import annotations

import json
import os
import sys
import urllib.request


def main() -> int:
    action, name, value = sys.argv[1:4]
    path = {"present": "/set-txt", "cleanup": "/clear-txt"}[action]
    body = {"host": name.rstrip(".") + "."}
    if action == "present":
        body["value"] = value
    request = urllib.request.Request(
        os.environ["CHALLTESTSRV_URL"] + path, data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return 0 if response.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
