"""Request parsing helpers shared by the API views: bounded, documented, with clear 400s."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request


def json_object(request: Request) -> dict[str, Any]:
    if not isinstance(request.data, dict):
        raise ValidationError({"non_field_errors": ["the body must be a JSON object"]})
    return dict(request.data)


def int_param(name: str, most: int, description: str) -> OpenApiParameter:
    """A query parameter documented with its bounds (so clients and fuzzers know them)."""
    schema = {"type": "integer", "minimum": 1, "maximum": most}
    return OpenApiParameter(name, schema, description=description)


def bounded_int(raw: str | None, default: int, most: int, name: str) -> int:
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: ["must be an integer"]}) from None
    if not 1 <= value <= most:
        raise ValidationError({name: [f"must be between 1 and {most}"]})
    return value


def known_params(request: Request, allowed: set[str] | frozenset[str]) -> None:
    """A list or search with a parameter it does not know is a 400, never silently
    answered unfiltered (a typo'd filter would return other tenants' lines)."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        names = ", ".join(sorted(allowed)) or "none"
        raise ValidationError(
            {name: [f"unknown query parameter; this endpoint takes: {names}"] for name in unknown}
        )
