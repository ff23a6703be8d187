"""Typed errors of the serving engine. Every message names the problem (file, key, shapes).

The HTTP layer maps them to status codes; `status_code` is a hint for it (this module imports no web framework).
"""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    status_code = 500


class BaseModelError(EngineError):
    """The base model could not be loaded (missing files, pickle-only weights, bad dtype/quantization/device)."""

    status_code = 500


class AdapterNotFound(EngineError):
    """The adapter source has no adapter with this id (or it was deleted)."""

    status_code = 404


class AdapterRejected(EngineError):
    """An adapter exists but cannot be served on this base; the message says which file/key/feature/shape."""

    status_code = 422


class UnsupportedAdapterFeature(AdapterRejected):
    """DoRA, modules_to_save, embedding/lm_head targets, bias training, unconverted OLoRA/PiSSA/..."""


class AdapterShapeMismatch(AdapterRejected):
    """A lora_A/lora_B tensor does not fit the targeted base module (or the rank in the config)."""


class AdapterRankTooLarge(AdapterRejected):
    """The adapter's rank is above the engine's `max_rank` (slot tensors are preallocated at max_rank)."""


class AdapterBaseMismatch(AdapterRejected):
    """The adapter was bound (metadata.json `base_fingerprint`) to a different base model."""


class InvalidAdapterFiles(AdapterRejected):
    """Missing/corrupt adapter_config.json or adapter_model.safetensors, pickle-only weights, non-finite values."""


class AdapterUnavailable(EngineError):
    """A registered adapter's files could not be read now (missing, truncated, unreadable): a fault on the server's
    side, not the client's. The cache retries the load with backoff, and at once when the files change."""

    status_code = 503


class AdapterFilesUnreadable(InvalidAdapterFiles):
    """An adapter file is missing or cannot be read as a safetensors file (torn, truncated, gone). At upload this
    is the client's archive (422); for a registered adapter it is damage on the server's side (the cache turns it
    into AdapterUnavailable)."""


class InvalidRequest(EngineError):
    """Bad sampling parameters or prompt ids."""

    status_code = 422


class InputTooLong(InvalidRequest):
    """Prompt longer than `max_input_tokens`, or prompt + max_new_tokens above `max_total_tokens`."""


class QueueFull(EngineError):
    """The waiting queue already holds `max_waiting` requests (the client should retry later)."""

    status_code = 429


class NonFiniteLogits(EngineError):
    """This request's logits held NaN/Inf (e.g. an adapter or per-request merge with huge weights): the request
    ends with this error, the other rows of the batch go on."""

    status_code = 422


class StepFailed(EngineError):
    """An unexpected exception in the engine step that ran this request: the step's rows fail, the loop goes on."""

    status_code = 500


class EngineNotRunning(EngineError):
    """`submit` before `start()` or after `shutdown()`, or the engine loop died (the message says why)."""

    status_code = 503
