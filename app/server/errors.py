"""The one error contract of the HTTP API: every error type -> (status, error_type), and the two body shapes.

Bodies are JSON, under 1 KB, and carry a message only: never configs, tensor values, stack traces or absolute
paths (`clean_message`). Routes under `/v1/` answer in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` (code = our error_type) so OpenAI clients show the message;
every other route answers `{"error": message, "error_type": kind}`. The README's error table is this table.
"""
from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass

from pydantic import ValidationError

from olora_core.errors import MergeError, NonFiniteError, OLoRAError

from app.adapters.upload_plan import UploadRefused
from app.engine.errors import (AdapterNotFound, AdapterRejected, AdapterUnavailable, EngineError, EngineNotRunning,
                               InputTooLong, InvalidRequest, NonFiniteLogits, QueueFull, StepFailed)
from app.server.generation import AdapterHeaderMismatch, DrainTimeout, GenerationTimeout, UnsupportedOption
from app.adapters.repository import RepositoryTimeout, RepositoryUnavailable
from app.adapters.store.adapter_store import AdapterExists, AdapterMissing, InvalidAdapterId, StoreError
from app.adapters.store.archive import ArchiveError

log = logging.getLogger("olora.server")

MAX_MESSAGE_CHARS = 400  # a body stays well under 1 KB with the envelope around it


@dataclass(frozen=True)
class ErrorKind:
    status: int
    error_type: str  # stable name, the `error_type` field (the OpenAI envelope's `code`)
    openai_type: str  # the OpenAI envelope's `type`


NOT_FOUND = ErrorKind(404, "adapter_not_found", "not_found_error")
INTERNAL = ErrorKind(500, "internal_error", "server_error")

# Looked up along the exception's MRO: the most specific class listed wins.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    InvalidRequest: ErrorKind(422, "invalid_request", "invalid_request_error"),
    InputTooLong: ErrorKind(422, "input_too_long", "invalid_request_error"),
    ValidationError: ErrorKind(422, "validation", "invalid_request_error"),
    UnicodeError: ErrorKind(422, "invalid_text", "invalid_request_error"),  # e.g. a lone surrogate "\ud800"
    AdapterNotFound: NOT_FOUND,
    AdapterMissing: NOT_FOUND,
    AdapterExists: ErrorKind(409, "adapter_exists", "invalid_request_error"),
    InvalidAdapterId: ErrorKind(422, "invalid_adapter_id", "invalid_request_error"),
    StoreError: ErrorKind(422, "store_refused", "invalid_request_error"),
    RepositoryUnavailable: ErrorKind(503, "adapter_source_unavailable", "server_error"),
    RepositoryTimeout: ErrorKind(504, "adapter_source_timeout", "timeout"),
    AdapterRejected: ErrorKind(422, "adapter_rejected", "invalid_request_error"),
    OLoRAError: ErrorKind(422, "invalid_adapter", "invalid_request_error"),
    NonFiniteError: ErrorKind(422, "non_finite", "invalid_request_error"),
    MergeError: ErrorKind(422, "merge_refused", "invalid_request_error"),
    NonFiniteLogits: ErrorKind(422, "non_finite_logits", "invalid_request_error"),
    QueueFull: ErrorKind(429, "overloaded", "rate_limit_error"),
    StepFailed: ErrorKind(500, "engine_step_failed", "server_error"),
    EngineNotRunning: ErrorKind(503, "engine_unavailable", "server_error"),
    AdapterUnavailable: ErrorKind(503, "adapter_unavailable", "server_error"),
    EngineError: INTERNAL,
    GenerationTimeout: ErrorKind(504, "timeout", "timeout"),
    DrainTimeout: ErrorKind(503, "shutting_down", "server_error"),
    AdapterHeaderMismatch: ErrorKind(400, "adapter_header_mismatch", "invalid_request_error"),
    UnsupportedOption: ErrorKind(422, "unsupported_option", "invalid_request_error"),
}

# Errors whose status travels on the instance (archive checks, HTTPException), by status.
BY_STATUS: dict[int, ErrorKind] = {
    400: ErrorKind(400, "bad_request", "invalid_request_error"),
    401: ErrorKind(401, "unauthorized", "authentication_error"),
    403: ErrorKind(403, "forbidden", "permission_error"),
    404: ErrorKind(404, "not_found", "not_found_error"),
    405: ErrorKind(405, "method_not_allowed", "invalid_request_error"),
    408: ErrorKind(408, "request_timeout", "timeout"),
    409: ErrorKind(409, "conflict", "invalid_request_error"),
    413: ErrorKind(413, "payload_too_large", "invalid_request_error"),
    415: ErrorKind(415, "unsupported_media_type", "invalid_request_error"),
    422: ErrorKind(422, "invalid_request", "invalid_request_error"),
    429: ErrorKind(429, "too_many_requests", "rate_limit_error"),
    500: INTERNAL,
    503: ErrorKind(503, "unavailable", "server_error"),
    504: ErrorKind(504, "timeout", "timeout"),
    507: ErrorKind(507, "insufficient_storage", "server_error"),
}

# OSErrors of the store's filesystem.
OS_ERRORS: dict[int, tuple[ErrorKind, str]] = {
    errno.ENOSPC: (ErrorKind(507, "insufficient_storage", "server_error"), "the adapter store's disk is full"),
    errno.EDQUOT: (ErrorKind(507, "insufficient_storage", "server_error"), "the adapter store's quota is used up"),
    errno.EROFS: (ErrorKind(503, "store_read_only", "server_error"), "the adapter store is read-only"),
    errno.EACCES: (ErrorKind(503, "store_read_only", "server_error"), "the adapter store is not writable"),
    errno.EPERM: (ErrorKind(503, "store_read_only", "server_error"), "the adapter store is not writable"),
}

# Errors whose status is on the instance, with a more telling name than the status alone gives.
INSTANCE_STATUS_NAMES: dict[tuple[type[BaseException], int], ErrorKind] = {
    (ArchiveError, 422): ErrorKind(422, "invalid_archive", "invalid_request_error"),
    (UploadRefused, 422): ErrorKind(422, "upload_refused", "invalid_request_error"),
}

DOCUMENTED_STATUSES = sorted({k.status for k in ERROR_TABLE.values()} | set(BY_STATUS))

_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/,;:()\[\]{}]+/)+[^\s'\"/,;:()\[\]{}]*")


def clean_message(message: str) -> str:
    """No absolute paths (replaced by their last component) and no long dumps (cut)."""
    message = _ABS_PATH.sub(lambda m: "<…>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 1] + "…"
    return message


def classify(exc: BaseException) -> tuple[ErrorKind, str]:
    """The kind of an exception and the message a client may see."""
    if isinstance(exc, OSError):
        kind, message = OS_ERRORS.get(exc.errno, (INTERNAL, "internal server error (an I/O operation failed)"))
        return kind, message
    if isinstance(exc, ValidationError):
        return ERROR_TABLE[ValidationError], _validation_message(exc.errors(include_input=False, include_url=False))
    if isinstance(exc, UnicodeError):
        return ERROR_TABLE[UnicodeError], "the text is not valid Unicode (a lone surrogate such as \\ud800?)"
    for cls in type(exc).__mro__:  # the most specific of: a class in the table, a class's own status_code hint
        kind = ERROR_TABLE.get(cls) or _hinted_kind(cls)
        if kind is not None:
            return kind, clean_message(str(exc))
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and status in BY_STATUS:  # ArchiveError, UploadRefused, HTTPException
        kind = INSTANCE_STATUS_NAMES.get((type(exc), status), BY_STATUS[status])
        return kind, clean_message(str(getattr(exc, "detail", None) or exc))
    return INTERNAL, "internal server error (see the server log)"


def _hinted_kind(cls: type) -> ErrorKind | None:
    """The kind a class's own `status_code` hint names (the engine and the store declare one on their errors, as
    they import no web framework): a subclass not in the table with `status_code = 409` answers 409."""
    status = vars(cls).get("status_code")
    return BY_STATUS.get(status) if isinstance(status, int) else None


def _validation_message(errors) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return clean_message(f"invalid request: {problems}")


def validation_kind(errors) -> tuple[ErrorKind, str, str | None]:
    """A request body/query that failed validation: (kind, message, the first offending parameter)."""
    first = next((".".join(str(p) for p in e["loc"] if p != "body") for e in errors), None)
    return ERROR_TABLE[ValidationError], _validation_message(errors), first or None


def body(kind: ErrorKind, message: str, *, openai: bool, param: str | None = None) -> dict:
    if openai:
        return {"error": {"message": message, "type": kind.openai_type, "param": param, "code": kind.error_type}}
    return {"error": message, "error_type": kind.error_type}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openapi_error_responses() -> dict:
    """The statuses any route may answer, for the OpenAPI description (schemathesis checks against it)."""
    schema = {"type": "object", "properties": {"error": {}, "error_type": {"type": "string"}}, "required": ["error"]}
    return {status: {"description": BY_STATUS[status].error_type,
                     "content": {"application/json": {"schema": schema}}}
            for status in DOCUMENTED_STATUSES if status != 422}


def stream_error(exc: BaseException, *, openai: bool) -> dict:
    """The in-band error event of a stream whose headers were already sent (same table, same bodies)."""
    kind, message = classify(exc)
    if kind.status >= 500:
        log.error("stream failed: %s: %s", type(exc).__name__, exc, exc_info=exc if kind is INTERNAL else None)
    return body(kind, message, openai=openai)
