"""Names of services and tenants: DNS labels, because they become subdomains."""

from __future__ import annotations

import re
from typing import NamedTuple

LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_RULE = (
    "1 to 63 characters of lowercase letters, digits and '-', starting and ending with a "
    "letter or digit"
)


class InvalidName(ValueError):
    """A service name, instance id or key that is not a DNS label."""


def check_label(value: object, what: str = "instance id") -> str:
    """Return value if it is a valid DNS label, else raise InvalidName naming the rule."""
    if not isinstance(value, str) or not LABEL_RE.fullmatch(value):
        raise InvalidName(f"invalid {what} {value!r}: must be {LABEL_RULE}")
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
