"""API tokens: minted once, stored as a hash, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from instances.ids import check_label
from instances.models import ApiToken

TOKEN_PREFIX = "ten_"
# Scope ranks: a token may do what its scope and every lower scope allow.
RANKS = {ApiToken.Scope.READ: 0, ApiToken.Scope.WRITE: 1, ApiToken.Scope.ADMIN: 2}


class TokenError(ValueError):
    """Bad input for creating or revoking a token, with a message for the operator and
    the input it is about (name, scope, tenant, expires), for forms to place it."""

    def __init__(self, message: str, field: str = "name") -> None:
        super().__init__(message)
        self.field = field


class TokenExists(TokenError):
    """The name is taken (the API answers 409)."""


@dataclass(frozen=True)
class Minted:
    token: ApiToken
    secret: str  # shown once; never stored


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(
    name: str, scope: str = "read", tenant: str = "", expires_days: float | None = None
) -> Minted:
    """Create a token. The plaintext is in the result and nowhere else."""
    name = name.strip()
    if not name or len(name) > 100:
        raise TokenError("a token needs a name of 1 to 100 characters")
    if "/" in name:
        raise TokenError("a token name must not contain '/' (it is part of the API's URLs)")
    if scope not in RANKS:
        raise TokenError(f"invalid scope {scope!r}: use read, write or admin", "scope")
    if tenant:
        try:
            check_label(tenant, "tenant")
        except ValueError as e:
            raise TokenError(str(e), "tenant") from None
        if scope == ApiToken.Scope.ADMIN:
            # Admin acts on services and tokens, which belong to no tenant.
            raise TokenError("a tenant-restricted token cannot have admin scope", "scope")
    if ApiToken.objects.filter(name=name).exists():
        raise TokenExists(f"a token named {name!r} already exists")
    if expires_days is not None and not 0 < expires_days <= 3650:
        raise TokenError("expiry must be between 0 and 3650 days", "expires")
    prefix = secrets.token_hex(6)
    secret = f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    expires = timezone.now() + timedelta(days=expires_days) if expires_days else None
    token = ApiToken.objects.create(
        name=name,
        prefix=prefix,
        digest=digest(secret),
        scope=scope,
        tenant=tenant,
        expires_at=expires,
    )
    return Minted(token, secret)


def revoke(name: str) -> ApiToken:
    token = ApiToken.objects.filter(name=name, revoked_at__isnull=True).first()
    if token is None:
        raise TokenError(f"no active token named {name!r}")
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    return token


def verify(secret: str) -> ApiToken | None:
    """The live token `secret` belongs to, or None (unknown, wrong, revoked, expired)."""
    prefix = _prefix_of(secret)
    if prefix is None:
        return None
    token = ApiToken.objects.filter(prefix=prefix).first()
    # Compare even when there is no row, so timing does not tell which prefixes exist.
    stored = token.digest if token is not None else "0" * 64
    if not hmac.compare_digest(stored, digest(secret)) or token is None:
        return None
    now = timezone.now()
    if token.revoked_at is not None or (token.expires_at and token.expires_at <= now):
        return None
    if token.last_used_at is None or now - token.last_used_at > timedelta(seconds=60):
        # At most one write a minute per token: a busy script must not hammer the DB.
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def _prefix_of(secret: str) -> str | None:
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    prefix, sep, _ = secret[len(TOKEN_PREFIX) :].partition("_")
    return prefix if sep and len(prefix) == 12 else None


def allows(token: ApiToken, needed: str) -> bool:
    return RANKS[token.scope] >= RANKS[needed]
