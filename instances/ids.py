"""Names of services and tenants: DNS labels, because they become subdomains."""

from __future__ import annotations

import re
from typing import NamedTuple

LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_RULE = (
    "1 to 63 characters of lowercase letters, digits and '-', starting and ending with a "
    "letter or digit"
)


# Upstream accepts '_' in ids; we refuse it, saying why: an id is the first label of the
# tenant's host name, where '_' is not allowed (RFC 952/1123; browsers and ACME refuse it).
UNDERSCORE_HINT = (
    "; '_' cannot appear in a host name (the id becomes ID.SERVICE.DOMAIN, and browsers, "
    "DNS tools and certificate authorities refuse '_' there): use '-', e.g. {suggestion!r}"
)


class InvalidName(ValueError):
    """A service name, instance id or key that is not a DNS label."""


def check_label(value: object, what: str = "instance id") -> str:
    """Return value if it is a valid DNS label, else raise InvalidName naming the rule."""
    if not isinstance(value, str) or not LABEL_RE.fullmatch(value):
        hint = ""
        if isinstance(value, str) and "_" in value:
            suggestion = value.replace("_", "-")
            if LABEL_RE.fullmatch(suggestion):
                hint = UNDERSCORE_HINT.format(suggestion=suggestion)
        raise InvalidName(f"invalid {what} {value!r}: must be {LABEL_RULE}{hint}")
    return value


class InstanceKey(NamedTuple):
    service: str
    instance_id: str

    def __str__(self) -> str:
        return f"{self.service}:{self.instance_id}"


def parse_key(key: str) -> InstanceKey:
    """Parse 'service:id' as used by the CLI, the API and logs."""
    service, sep, instance_id = key.partition(":")
    if not sep:
        raise InvalidName(f"invalid instance key {key!r}: expected SERVICE:ID, e.g. notes:alice")
    return InstanceKey(check_label(service, "service name"), check_label(instance_id))
