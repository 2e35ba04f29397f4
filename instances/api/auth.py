"""Bearer tokens for DRF, with a per-address limit on failed attempts."""

from __future__ import annotations

import math
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from instances import tokens
from instances.models import ApiToken

# TENEMENT_AUTH_FAILURE_LIMIT failed attempts per client address within this many
# seconds, then 429 until the window ends.
FAILURE_WINDOW = 60


class TokenUser:
    """The principal behind a bearer token (DRF wants a user-like object)."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, token: ApiToken) -> None:
        self.token = token
        self.username = f"token:{token.name}"
        self.is_staff = token.scope == ApiToken.Scope.ADMIN

    def __str__(self) -> str:
        return self.username


class BearerAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[TokenUser, ApiToken] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer":
            return None  # not ours: session auth may still apply
        address = request.META.get("REMOTE_ADDR") or "unknown"
        refuse_if_throttled(address)
        token = tokens.verify(secret.strip())
        if token is None:
            record_failure(address)
            raise exceptions.AuthenticationFailed("invalid, expired or revoked token")
        return TokenUser(token), token

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (with this challenge) rather than 403 when unauthenticated.
        return 'Bearer realm="tenement"'


def _key(address: str) -> str:
    return f"tenement:auth-failures:{address}"


def retry_after(address: str) -> int | None:
    """Seconds until `address` may try again, or None when it is not limited.

    Counted per client address, which behind a trusted proxy is the real client's
    (proxy/forwarded.py): one guesser never locks anyone else out.
    """
    if (cache.get(_key(address)) or 0) < settings.TENEMENT_AUTH_FAILURE_LIMIT:
        return None
    ends = cache.get(_key(address) + ":ends") or time.time() + FAILURE_WINDOW
    return max(math.ceil(ends - time.time()), 1)


def refuse_if_throttled(address: str) -> None:
    if (wait := retry_after(address)) is not None:
        # Throttled(wait=...) would append DRF's own sentence to ours; set the header's
        # figure on the exception instead, and say it once in our words.
        refused = exceptions.Throttled(
            detail=f"too many failed attempts from {address}; retry in {wait} s"
        )
        refused.wait = wait
        raise refused


def record_failure(address: str) -> None:
    key = _key(address)
    if cache.add(key, 1, FAILURE_WINDOW):
        cache.set(key + ":ends", time.time() + FAILURE_WINDOW, FAILURE_WINDOW)
        return
    try:
        cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.add(key, 1, FAILURE_WINDOW)
        cache.set(key + ":ends", time.time() + FAILURE_WINDOW, FAILURE_WINDOW)


def token_of(request: Request) -> ApiToken | None:
    return request.auth if isinstance(request.auth, ApiToken) else None


def tenant_of(request: Request) -> str | None:
    """The tenant a restricted token is limited to, or None for unrestricted callers."""
    token = token_of(request)
    return token.tenant or None if token is not None else None


class ScopePermission(BasePermission):
    """read for safe methods, write otherwise, or the view's `required_scope`.

    Session users (the dashboard) need to be staff; tokens need the scope.
    """

    message = "this token's scope does not allow that"

    def has_permission(self, request: Request, view: Any) -> bool:
        needed = getattr(view, "required_scope", None) or (
            ApiToken.Scope.READ if request.method in SAFE_METHODS else ApiToken.Scope.WRITE
        )
        token = token_of(request)
        if token is not None:
            if needed == ApiToken.Scope.ADMIN and token.tenant:
                return False  # defence in depth: mint() refuses such tokens anyway
            return tokens.allows(token, needed)
        user = request.user
        return bool(user and user.is_authenticated and user.is_staff)
