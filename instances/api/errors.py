"""One JSON error shape for every API failure: {"error": {"status", "message", "fields"}}."""

from __future__ import annotations

import logging
from typing import Any

from django.db import OperationalError
from rest_framework import status
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import exception_handler

from tenement_site.control import RETRY_AFTER_S

log = logging.getLogger("tenement.api")


class Conflict(Exception):
    """A state change that conflicts with the current state (409)."""


class Unavailable(Exception):
    """The instance could not be brought up (503): a failed or too slow start."""


def handle(exc: Exception, context: dict[str, Any]) -> Response:
    if isinstance(exc, Conflict):
        return _error(status.HTTP_409_CONFLICT, str(exc))
    if isinstance(exc, Unavailable):
        return _error(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))
    if isinstance(exc, OperationalError):
        # Locked (SQLite), full disk, or the server gone: the request may succeed later.
        log.warning("database unavailable: %s", exc, extra={"event": "database_error"})
        response = _error(503, "the database is busy or unavailable; retry shortly")
        response["Retry-After"] = str(RETRY_AFTER_S)
        return response
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


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, with nesting too deep for the decoder a 400 rather than a 500."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
