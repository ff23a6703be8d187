"""The one per-forward batch object: what every layer of the coming forward may need to know about its rows.

The runner builds a `ForwardBatch` for each forward (prefill or decode) and sets it on the engine's
`ForwardContext` for the duration of that forward (vLLM's forward context). The layers it passes through read it:

* the row KV cache (kv_cache.py): where to write the new K/V (phase, row_start, positions) and what to return;
* the LoRA layers (lora_layers.py): which slot each row uses, the kernel and rank bucket (`lora`: a LoRAPlan);
* the attention of windowed layers (architecture.py hooks): the additive mask of their window (`masks`).

Semantics: with context.use(batch): model(...)   # every layer reads context.batch; afterwards it is None again
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .lora_kernels import LoRAPlan

PREFILL, DECODE = "prefill", "decode"


@dataclass
class ForwardBatch:
    """Rows [row_start, row_start + n_rows) of the row cache in one forward.

    prefill: every row starts from empty and feeds its right-padded prompt (T tokens, `lengths` real ones);
    decode: rows 0..n-1 each feed one token at `positions[b]` and attend to key positions 0..kv_length-1.
    """

    phase: str  # PREFILL | DECODE
    row_start: int
    n_rows: int
    kv_length: int  # keys the attention reads: T (prefill) or L = max position + 1 (decode)
    positions: torch.Tensor | None = None  # decode: (B,) long, the write position of each row
    rows: torch.Tensor | None = None  # decode: (B,) long, arange(B) on the device
    lengths: torch.Tensor | None = None  # prefill: (n,) long, real prompt tokens per row
    lora: LoRAPlan = field(default_factory=LoRAPlan)
    # attention window (None = full attention) -> additive mask (B, 1, T, L), or None where no mask is needed
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def query_length(self) -> int:
        return self.kv_length if self.phase == PREFILL else 1

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        return self.masks[window]


class ForwardContext:
    """Holds the batch of the forward in progress (None between forwards). Shared by the runner, the KV cache and
    the LoRA layers of one engine."""

    def __init__(self, device: torch.device):
        self.device = device
        self.batch: ForwardBatch | None = None

    @contextmanager
    def use(self, batch: ForwardBatch):
        self.batch = batch
        try:
            yield batch
        finally:
            self.batch = None

    def current(self) -> ForwardBatch:
        if self.batch is None:
            raise RuntimeError("a model layer ran outside a runner forward (no ForwardBatch is set)")
        return self.batch
