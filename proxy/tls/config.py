"""`[settings.tls]`: upstream tenement's keys plus ours, validated and resolved.

Upstream's keys (enabled, acme_email, domain, cache_dir, staging, https_port, http_port)
mean what they mean there; upstream's `dns_provider` configured Caddy, which we do not
need, and is refused with what to use instead.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

Port = Annotated[int, Field(ge=1, le=65535)]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class TlsTable(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    enabled: bool = False
    acme_email: Text = ""
    domain: Text = ""
    cache_dir: Text = ""
    staging: bool = False
    https_port: Port = 443
    http_port: Port = 80
    dns_provider: Text = ""  # upstream's (Caddy); refused when set
    # Ours.
    directory_url: Text = ""
    on_demand: bool = True
    wildcard: bool = False
    dns_hook: Text = ""
    cert_file: Text = ""
    key_file: Text = ""
    redirect_http: bool = False
    # On-demand issuance: at most this many new orders an hour (a stranger cycling names
    # must not burn the CA's rate limits), and how long a handshake waits for one.
    orders_per_hour: Annotated[int, Field(ge=1, le=10_000)] = 30
    handshake_wait: Annotated[float, Field(gt=0, le=120)] = 10.0


@dataclass(frozen=True)
class TlsConfig:
    """A checked, enabled `[settings.tls]` with defaults applied."""

    domain: str
    email: str
    directory_url: str
    cache_dir: Path
    https_port: int
    http_port: int
    on_demand: bool
    wildcard: bool
    dns_hook: tuple[str, ...]
    cert_file: Path | None
    key_file: Path | None
    redirect_http: bool
    orders_per_hour: int
    handshake_wait: float
    staging: bool


def problems(table: TlsTable, control_domain: str) -> list[str]:
    """What makes an enabled table unusable, each naming its key."""
    if not table.enabled:
        return []
    out = []
    where = "settings.tls"
    if table.dns_provider:
        out.append(
            f"{where}.dns_provider: upstream's Caddy setting; tenement issues certificates "
            "itself: set wildcard = true and dns_hook = a script for your DNS provider "
            f"(got {table.dns_provider!r})"
        )
    domain = (table.domain or control_domain).lower().rstrip(".")
    if table.domain and domain != control_domain:
        out.append(
            f"{where}.domain: must be the control domain ({control_domain!r}, from --domain "
            f"or TENEMENT_DOMAIN), whose subdomains are the tenants (got {table.domain!r})"
        )
    if _not_public_name(domain):
        out.append(
            f"{where}.domain: a CA cannot issue for {domain!r}; set --domain (or "
            "TENEMENT_DOMAIN) to a DNS name that points at this server"
        )
    own_cert = bool(table.cert_file or table.key_file)
    if own_cert:
        out += _own_certificate(table)
    if not table.acme_email and not (own_cert and not table.on_demand and not table.wildcard):
        out.append(f"{where}.acme_email: required for ACME registration (e.g. ops@{domain})")
    if table.staging and table.directory_url:
        out.append(f"{where}.staging: give staging = true or directory_url, not both")
    if table.directory_url and not table.directory_url.startswith(("https://", "http://")):
        out.append(f"{where}.directory_url: must be an http(s) URL (got {table.directory_url!r})")
    if table.wildcard and not table.dns_hook:
        out.append(
            f"{where}.wildcard: wildcard certificates need DNS-01: set dns_hook to a command "
            "called as `HOOK present|cleanup NAME VALUE`"
        )
    if table.dns_hook:
        out += _hook_problems(table.dns_hook)
    return out


def _not_public_name(domain: str) -> bool:
    if domain in ("", "localhost") or domain.endswith(".localhost") or "." not in domain:
        return True
    try:
        ipaddress.ip_address(domain.strip("[]"))
    except ValueError:
        return False
    return True


def _own_certificate(table: TlsTable) -> list[str]:
    if not (table.cert_file and table.key_file):
        return ["settings.tls.cert_file: give both cert_file and key_file, or neither"]
    out = []
    for key in ("cert_file", "key_file"):
        path = getattr(table, key)
        if not os.path.isabs(path):
            out.append(f"settings.tls.{key}: must be an absolute path (got {path!r})")
        elif not os.access(path, os.R_OK):
            out.append(f"settings.tls.{key}: cannot read {path!r}")
    return out


def _hook_problems(hook: str) -> list[str]:
    try:
        argv = shlex.split(hook)
    except ValueError as e:
        return [f"settings.tls.dns_hook: {e} (got {hook!r})"]
    if not argv or not (
        shutil.which(argv[0]) if "/" not in argv[0] else os.access(argv[0], os.X_OK)
    ):
        return [f"settings.tls.dns_hook: {argv[0] if argv else hook!r} is not an executable"]
    return []


def resolve(
    table: TlsTable, control_domain: str, data_dir: Path, config_dir: Path
) -> TlsConfig | None:
    """The enabled config (None when disabled); `problems()` must have passed."""
    if not table.enabled:
        return None
    if table.directory_url:
        url = table.directory_url
    else:
        url = LETS_ENCRYPT_STAGING if table.staging else LETS_ENCRYPT
    return TlsConfig(
        domain=control_domain,
        email=table.acme_email,
        directory_url=url,
        # Relative to the config file, as data_dir is.
        cache_dir=config_dir / table.cache_dir if table.cache_dir else data_dir / "acme",
        https_port=table.https_port,
        http_port=table.http_port,
        on_demand=table.on_demand,
        wildcard=table.wildcard,
        dns_hook=tuple(shlex.split(table.dns_hook)),
        cert_file=Path(table.cert_file) if table.cert_file else None,
        key_file=Path(table.key_file) if table.key_file else None,
        redirect_http=table.redirect_http,
        orders_per_hour=table.orders_per_hour,
        handshake_wait=table.handshake_wait,
        staging=table.staging,
    )
