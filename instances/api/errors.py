"""One JSON error shape for every API failure: {"error": {"status", "message", "fields"}}."""

from __future__ import annotations

import logging
from typing import Any

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler

log = logging.getLogger("tenement.api")


class Conflict(Exception):
    """A state change that conflicts with the current state (409)."""


def handle(exc: Exception, context: dict[str, Any]) -> Response:
    if isinstance(exc, Conflict):
        return _error(status.HTTP_409_CONFLICT, str(exc))
    response = exception_handler(exc, context)
    if response is None:
        # A bug: log it with its traceback, but the client gets one plain line.
        log.exception("API error in %s", context.get("view").__class__.__name__)
        return _error(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error; see the server log")
    response.data = {"error": _describe(response.status_code, response.data)}
    return response


def _describe(code: int, data: Any) -> dict[str, Any]:
    if isinstance(data, dict) and set(data) == {"detail"}:
        return {"status": code, "message": str(data["detail"])}
    if isinstance(data, dict):
        return {"status": code, "message": "invalid input", "fields": data}
    return {"status": code, "message": "invalid input", "fields": {"non_field_errors": data}}


def _error(code: int, message: str) -> Response:
    return Response({"error": {"status": code, "message": message}}, status=code)
