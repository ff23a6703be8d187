"""Which conversion an upload needs, chosen once from the request and the served base, before any work is done.

    kind plain (LoRA, ...)             -> PLAIN            stored as sent
    OLoRA/PiSSA + initial_archive      -> PEFT_CONVERSION  olora_core.convert: exact plain LoRA of rank 2r
    OLoRA on a quantized base + initial -> QUANT_AWARE     olora_core.quant_convert: exact on the served layers
    OLoRA/PiSSA + recompute_init       -> RECOMPUTED_INIT  olora_core.recompute_init: the init rebuilt from
                                                           this base (quantization-aware on a quantized one)

Every refusal of a combination that makes no sense (recompute_init or initial_archive with a plain adapter,
both at once, an OLoRA/PiSSA adapter with neither, quant_aware=true for another kind) is raised here, with the
messages the service always gave (docs/beyond-peft.md).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from olora_core.adapter_io import MUTATED_INIT_KINDS

if TYPE_CHECKING:
    from olora_core.quant_convert import QuantSpec


class UploadRefused(ValueError):
    """A well-formed upload that cannot be served as it is (the message says what to send instead)."""

    status_code = 422


class UploadPath(enum.Enum):
    PLAIN = "plain"
    PEFT_CONVERSION = "peft_conversion"
    QUANT_AWARE = "quant_aware"
    RECOMPUTED_INIT = "recomputed_init"


@dataclass(frozen=True)
class UploadRequest:
    """What the client asked for, apart from the archives' contents."""

    adapter_id: str
    has_initial: bool  # an 'initial_archive' was sent
    recompute_init: bool = False
    init_dtype: str | None = None  # torch dtype name of the init (float32 when None, or the quantized compute dtype)
    quant_aware: bool | None = None  # None: quantization-aware on a quantized base for OLoRA, False: never


@dataclass(frozen=True)
class UploadPlan:
    path: UploadPath
    kind: str  # adapter_kind() of the trained adapter: "lora", "olora", "pissa", ...
    quantization: QuantSpec | None = None  # the layers the conversion is exact for; None: the unquantized base
    init_dtype: str | None = None  # as requested (None: each conversion's default)

    @property
    def stored_kind(self) -> str:
        return self.kind if self.path is UploadPath.PLAIN else f"{self.kind}-converted"


def choose_plan(request: UploadRequest, kind: str, init_lora_weights: object, served: QuantSpec | None) -> UploadPlan:
    """The plan for a trained adapter of `kind` (its config's `init_lora_weights`, for the messages) on a base
    served with quantization `served` (None: unquantized)."""
    name = request.adapter_id
    if kind not in MUTATED_INIT_KINDS:
        if request.recompute_init:
            raise UploadRefused(f"adapter {name!r} is a plain {kind} adapter: recompute_init is only for "
                                "OLoRA/PiSSA adapters")
        if request.has_initial:
            raise UploadRefused(f"adapter {name!r} is a plain {kind} adapter: 'initial_archive' is only "
                                "for OLoRA/PiSSA adapters; send the adapter alone")
        return UploadPlan(UploadPath.PLAIN, kind)
    spec = _quant_aware_spec(request, kind, served)
    if request.recompute_init:
        if request.has_initial:
            raise UploadRefused(f"adapter {name!r}: send either initial_archive or recompute_init=true")
        return UploadPlan(UploadPath.RECOMPUTED_INIT, kind, spec, request.init_dtype)
    if spec is not None:
        if not request.has_initial:
            raise UploadRefused(f"adapter {name!r} is an unconverted {kind.upper()} adapter: send its "
                                "initial checkpoint as 'initial_archive', or set recompute_init=true")
        return UploadPlan(UploadPath.QUANT_AWARE, kind, spec, request.init_dtype)
    if not request.has_initial:
        raise UploadRefused(
            f"adapter {name!r} is an unconverted {kind.upper()} adapter (init_lora_weights="
            f"{init_lora_weights!r}): it was trained on a base from which "
            f"s*B0*A0 was subtracted, so it cannot be served on the shared base as it is. Send its "
            f"untrained initial checkpoint as 'initial_archive' and the server converts it to a plain "
            f"LoRA (rank 2r), or set recompute_init=true if it was initialised on exactly this base.")
    return UploadPlan(UploadPath.PEFT_CONVERSION, kind, None, request.init_dtype)


def _quant_aware_spec(request: UploadRequest, kind: str, served: QuantSpec | None) -> QuantSpec | None:
    """OLoRA on a quantized base: the served QuantSpec (its dtype set to init_dtype when given), unless the
    client said quant_aware=false; None otherwise. quant_aware=true for another kind is refused."""
    if request.quant_aware is False or served is None:
        return None
    if kind != "olora":
        if request.quant_aware:
            raise UploadRefused(f"quant_aware=true is for OLoRA adapters only, this one is {kind}")
        return None
    if request.init_dtype is None:
        return served
    from olora_core.dtypes import torch_dtype

    return replace(served, dtype=torch_dtype(request.init_dtype))
