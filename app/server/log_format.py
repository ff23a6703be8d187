"""Log output of `olora serve`: plain text, or (`--log-format json`) one JSON object per line for every logger
(uvicorn, the engine, access lines, errors and Python warnings), each with the request id and trace id of the
request it was logged for.

Semantics: `request_context` holds the ids of the request being answered; the access-log middleware sets it, and
it follows the request into worker threads (asyncio.to_thread copies context). The trace id is the one of the
W3C `traceparent` header the request came with (None without one). Access lines, which are JSON already, are
merged into the line's object rather than nested as a string.
"""
from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar

request_context: ContextVar[dict | None] = ContextVar("olora_request_context", default=None)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), else None."""
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]) \
            and parts[1] != "0" * 32:
        return parts[1]
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = request_context.get() or {}
        line = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
                "request_id": context.get("request_id"), "trace_id": context.get("trace_id")}
        message = record.getMessage()
        parsed = None
        if message.startswith("{"):
            try:
                parsed = json.loads(message)
            except ValueError:
                parsed = None
        if isinstance(parsed, dict):
            line.update(parsed)
        else:
            line["message"] = message
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def logging_config(level: str, log_format: str) -> dict:
    """A `logging.config.dictConfig` for the whole process, uvicorn's loggers included (given to uvicorn, which
    applies it). JSON: progress bars are turned off (they are not log lines) and warnings go through logging."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": "%(message)s"}
    if log_format == "json":
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        logging.captureWarnings(True)
        from transformers.utils import logging as hf_logging  # its own stderr handler: route it through ours
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
    level = level.upper()
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {name: {"handlers": ["default"], "level": level, "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
        "root": {"handlers": ["default"], "level": level},
    }

