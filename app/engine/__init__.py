"""Serving engine: one base model, many LoRA adapters in the same batch (no web framework here).

Public API (see docs/design.md): Engine, EngineConfig, EngineStats, SamplingParams, RequestHandle, TokenEvent,
GenerationResult, EngineObserver, NullObserver, RequestStats, AdapterSource, DirectoryAdapterSource, AdapterInfo,
and the typed errors of app.engine.errors.
"""
from .adapter_files import AdapterInfo, AdapterSource, DirectoryAdapterSource
from .engine import Engine, EngineConfig, EngineStats
from .errors import (
    AdapterBaseMismatch,
    AdapterNotFound,
    AdapterRankTooLarge,
    AdapterRejected,
    AdapterShapeMismatch,
    BaseModelError,
    EngineError,
    EngineNotRunning,
    InputTooLong,
    InvalidAdapterFiles,
    InvalidRequest,
    QueueFull,
    UnsupportedAdapterFeature,
)
from .handle import GenerationResult, RequestHandle, TokenEvent
from .observer import EngineObserver, NullObserver, RequestStats
from .sampling import SamplingParams

__all__ = [
    "AdapterBaseMismatch", "AdapterInfo", "AdapterNotFound", "AdapterRankTooLarge", "AdapterRejected",
    "AdapterShapeMismatch", "AdapterSource", "BaseModelError", "DirectoryAdapterSource", "Engine", "EngineConfig",
    "EngineError", "EngineNotRunning", "EngineObserver", "EngineStats", "GenerationResult", "InputTooLong",
    "InvalidAdapterFiles", "InvalidRequest", "NullObserver", "QueueFull", "RequestHandle", "RequestStats",
    "SamplingParams", "TokenEvent", "UnsupportedAdapterFeature",
]
