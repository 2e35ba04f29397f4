"""tenement's own log lines: one line per event, plain (logfmt-style) or JSON.

Every line carries the logger's `extra=` fields (event, pid, reason...), the instance key
and, while the proxy handles a request, its request id. Those two come from context
variables, so a 502 logged deep inside the proxy needs no arguments threaded through.

    2026-11-22T21:00:00.000Z INFO tenement.supervisor event=state instance=web:alice ...
    {"time": "2026-11-22T21:00:00.000Z", "level": "INFO", "logger": "tenement.supervisor",
     "message": "...", "event": "state", "instance": "web:alice", ...}
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import logging.handlers
import queue
import re
import sys
import time
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from pythonjsonlogger.json import JsonFormatter

# Set by the proxy for the duration of one request (see bind/unbind).
request_id: contextvars.ContextVar[bytes | str | None] = contextvars.ContextVar(
    "tenement_request_id", default=None
)
instance: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "tenement_instance", default=None
)

# A LogRecord's own attributes; anything else on a record came from `extra=`.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
# Fields shown first, in this order, when present.
_FIRST = ("event", "instance", "request_id")
_BARE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f]+")
FORMATS = ("plain", "json")

Tokens = tuple[contextvars.Token[Any], contextvars.Token[Any]]


def bind(rid: bytes | str | None, key: object | None) -> Tokens:
    """Attach a request id and instance key to every line logged until unbind()."""
    return request_id.set(rid), instance.set(key)


def unbind(tokens: Tokens) -> None:
    request_id.reset(tokens[0])
    instance.reset(tokens[1])


class ContextFilter(logging.Filter):
    """Copies the context's instance key and request id onto records that lack them."""

    def filter(self, record: logging.LogRecord) -> bool:
        _fill(record, "instance", instance.get())
        _fill(record, "request_id", request_id.get())
        return True


def _fill(record: logging.LogRecord, name: str, fallback: object | None) -> None:
    value = getattr(record, name, None)
    if value is None:
        value = fallback
    if value is None:
        return
    # Keys (InstanceKey) and the proxy's byte ids become plain strings for the line.
    setattr(record, name, value.decode("latin-1") if isinstance(value, bytes) else str(value))


def utc_iso(created: float) -> str:
    millis = int(created % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields, the well-known ones first."""
    extra = {k: v for k, v in vars(record).items() if k not in _RESERVED and v is not None}
    ordered = {k: extra.pop(k) for k in _FIRST if k in extra}
    return ordered | extra


def logfmt(value: Any) -> str:
    """A value as logfmt: bare when safe, else a JSON string (newlines escaped)."""
    text = value if isinstance(value, str) else str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER key=value ... msg="..."`, always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [utc_iso(record.created), record.levelname, record.name]
        parts += [f"{k}={logfmt(v)}" for k, v in fields_of(record).items()]
        parts.append(f"msg={logfmt(record.getMessage())}")
        if record.exc_info:
            parts.append(f"exc={logfmt(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
            json_default=str,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_iso(record.created)


class QueuedStderrHandler(logging.handlers.QueueHandler):
    """Formats on the caller's thread (the context variables live there), writes to
    stderr on a thread of its own: a slow journald or a full pipe never stalls the event
    loop, and a 503 storm's lines cost the proxy a queue put each. Past QUEUE_SIZE lines
    waiting, new ones are dropped and counted (one line says how many), never blocking."""

    QUEUE_SIZE = 10_000

    def __init__(self) -> None:
        super().__init__(queue.Queue(self.QUEUE_SIZE))
        self.dropped = 0
        writer = logging.StreamHandler(sys.stderr)
        writer.setFormatter(logging.Formatter("%(message)s"))  # already formatted here
        self.listener = logging.handlers.QueueListener(self.queue, writer)
        self.listener.start()
        self.writing = True  # close() runs twice (dictConfig, then atexit); stop() once
        atexit.register(self.close)

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(self._dropped_record())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _dropped_record(self) -> logging.LogRecord:
        text = f"{utc_iso(time.time())} WARNING tenement.logging event=log_lines_dropped "
        return logging.makeLogRecord({"msg": f"{text}dropped={self.dropped}"})

    def close(self) -> None:
        # Writes out what is queued (the lines that explain a shutdown) before exit.
        if self.writing:
            self.writing = False
            if self.dropped:
                self.queue.put(self._dropped_record())
                self.dropped = 0
            self.listener.stop()
        super().close()


def check_level(level: str, where: str) -> str:
    name = level.strip().upper()
    if name not in logging.getLevelNamesMapping() or name == "NOTSET":
        raise ImproperlyConfigured(
            f"{where}: unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    return name


def parse_overrides(spec: str) -> dict[str, str]:
    """'tenement.proxy=DEBUG,django=INFO' -> {logger: level}, with a clear error."""
    levels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, eq, level = item.partition("=")
        if not eq or not name.strip():
            raise ImproperlyConfigured(
                f"TENEMENT_LOG_LEVELS: {item!r} is not LOGGER=LEVEL "
                "(e.g. tenement.proxy=DEBUG,django=INFO)"
            )
        levels[name.strip()] = check_level(level, f"TENEMENT_LOG_LEVELS ({name.strip()})")
    return levels


def config(fmt: str, level: str, overrides: str = "") -> dict[str, Any]:
    """The LOGGING dict for settings.py, from TENEMENT_LOG_FORMAT/_LEVEL/_LEVELS."""
    fmt = (fmt or "plain").strip().lower()
    if fmt not in FORMATS:
        raise ImproperlyConfigured(f"TENEMENT_LOG_FORMAT: {fmt!r} is not 'plain' or 'json'")
    console = {"handlers": ["console"], "propagate": False}
    loggers: dict[str, dict[str, Any]] = {
        "tenement": {**console, "level": check_level(level, "TENEMENT_LOG_LEVEL")},
        "django": {**console, "level": "WARNING"},
    }
    for name, override in parse_overrides(overrides).items():
        loggers.setdefault(name, {})["level"] = override
    formatter = JsonLineFormatter if fmt == "json" else PlainFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": f"{__name__}.{formatter.__name__}"}},
        "filters": {"context": {"()": f"{__name__}.ContextFilter"}},
        "handlers": {
            "console": {
                "()": f"{__name__}.QueuedStderrHandler",
                "formatter": "line",
                "filters": ["context"],
            }
        },
        "root": {"handlers": ["console"], "level": "WARNING"},
        "loggers": loggers,
    }
