"""Tells drf-spectacular how our bearer tokens appear in the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "message"],
            "properties": {
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "fields": {"type": "object"},
            },
        }
    },
}
ERRORS = {
    "400": "Invalid input; `fields` says which.",
    "401": "Missing, invalid, expired or revoked token.",
    "403": "The token's scope or tenant does not allow this.",
    "404": "No such object (or not visible to this token).",
    "409": "Conflicts with the current state.",
    "429": "Too many failed attempts from this address; see Retry-After.",
}


class TenementSchema(AutoSchema):
    """Every operation documents the shared error responses."""

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        for code, description in ERRORS.items():
            responses.setdefault(
                code,
                {
                    "description": description,
                    "content": {"application/json": {"schema": ERROR_SCHEMA}},
                },
            )
        return responses


class BearerScheme(OpenApiAuthenticationExtension):
    target_class = "instances.api.auth.BearerAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer"}


def service_body(*, with_name: bool, partial: bool = False) -> dict[str, Any]:
    """The request body of service writes: [service.NAME]'s own JSON Schema (pydantic's),
    so the documented rules are the loader's: unknown keys are refused, types are strict."""
    from instances.config import HEALTH_PATH_RE, ServiceTable
    from instances.ids import LABEL_RE

    schema = ServiceTable.model_json_schema()
    schema["properties"]["command"]["minLength"] = 1
    schema["properties"]["health"]["pattern"] = f"^({HEALTH_PATH_RE.pattern})?$"
    schema["properties"].pop("always_on", None)  # per instance, not per service
    schema["properties"]["env"]["propertyNames"] = {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}
    schema["required"] = [] if partial else ["command"]
    if with_name:
        label = {"type": "string", "pattern": f"^{LABEL_RE.pattern}$"}
        schema["properties"]["name"] = label
        schema["required"].append("name")
    return {"application/json": schema}
