"""Preallocated per-row KV cache, a `transformers.Cache` the HF model writes into during its own forward.

Every layer holds `keys/values: (max_batch, kv_heads, capacity, head_dim)`. The capacity grows with the real lengths
(starting at `INITIAL_TOKENS`, doubling up to `max_total_tokens` when a forward needs more, old contents copied), so
memory follows the longest request seen rather than the worst case. Running requests occupy rows
0..B-1 contiguously (a leaving request's row is refilled with the last row), so the decode step reads the views
`keys[:B, :, :L]` with no per-step gather. Before each forward the runner sets a `ForwardPlan`:

* prefill: rows [r0, r0+n) start from empty; their (right-padded) prompt K/V are written at positions 0..T-1 and
  the attention reads just these new K/V (pad positions are masked and later overwritten);
* decode: row b writes its one new K/V at `positions[b]` and attends to `keys[:B, :, :L]` (L = max length + 1).

Checked against transformers 5.24: LlamaAttention calls `cache.update(k, v, layer_idx, ...)` and uses what it
returns; `create_causal_mask` returns a 4D mask unchanged (masking_utils._preprocess_mask_arguments), so the
runner passes an explicit additive mask `(B, 1, T, L)` and `position_ids` per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

INITIAL_TOKENS = 256  # KV positions per row allocated at start (at most max_total_tokens)


@dataclass
class ForwardPlan:
    """Where the K/V of the coming forward go. mode: "prefill" | "decode"."""

    mode: str = "decode"
    row_start: int = 0  # prefill: first row; decode: always 0
    n_rows: int = 0
    kv_length: int = 0  # length of the K/V the attention reads (T for prefill, L for decode)
    positions: torch.Tensor | None = None  # decode: (B,) write position per row
    rows: torch.Tensor | None = None  # decode: arange(B)


class RowKVLayer(CacheLayerMixin):
    """One decoder layer's slice of the row cache."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, plan: ForwardPlan, max_tokens: int):
        super().__init__()
        self.keys = keys  # (max_batch, kv_heads, capacity, head_dim)
        self.values = values
        self.plan = plan
        self.max_tokens = max_tokens
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        """Reallocate to `capacity` positions per row, keeping what is cached."""
        old = self.keys.shape[2]
        for name in ("keys", "values"):
            current = getattr(self, name)
            bigger = current.new_zeros(*current.shape[:2], capacity, current.shape[3])
            bigger[:, :, :old].copy_(current)
            setattr(self, name, bigger)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # preallocated
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: (n, kv_heads, T, head_dim)
        plan = self.plan
        if plan.mode == "prefill":
            r0, r1, t = plan.row_start, plan.row_start + plan.n_rows, key_states.shape[2]
            self.keys[r0:r1, :, :t].copy_(key_states)
            self.values[r0:r1, :, :t].copy_(value_states)
            return key_states, value_states  # newcomers have no past: attend to their own prompt only
        # decode: one new token per row, each at its own position
        self.keys[plan.rows, :, plan.positions] = key_states[:, :, 0]  # (B, kv_heads, head_dim)
        self.values[plan.rows, :, plan.positions] = value_states[:, :, 0]
        n, length = plan.n_rows, plan.kv_length
        return self.keys[:n, :, :length], self.values[:n, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.kv_length, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly; there is no single length for a batch of rows

    def get_max_length(self) -> int:
        return self.max_tokens

    def reset(self) -> None:
        return None  # rows are overwritten on reuse; nothing to clear


class RowKVCache(Cache):
    """The engine's KV cache: `[layers][max_batch, kv_heads, max_total_tokens, head_dim]`, rows = requests."""

    def __init__(self, n_layers: int, max_batch: int, kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.plan = ForwardPlan()
        self.capacity = min(INITIAL_TOKENS, max_tokens)
        layers = []
        for _ in range(n_layers):
            keys = torch.zeros(max_batch, kv_heads, self.capacity, head_dim, dtype=dtype, device=device)
            values = torch.zeros_like(keys)
            layers.append(RowKVLayer(keys, values, self.plan, max_tokens))
        super().__init__(layers=layers)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self._arange = torch.arange(max_batch, device=device)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per row (capacity doubles, at most max_total_tokens)."""
        if length <= self.capacity:
            return
        if length > self.max_tokens:
            raise ValueError(f"{length} KV positions exceed max_total_tokens={self.max_tokens}")
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        self.capacity = min(capacity, self.max_tokens)
        for layer in self.layers:
            layer.grow(self.capacity)

    def plan_prefill(self, row_start: int, n_rows: int, length: int) -> None:
        self.reserve(length)
        self.plan.mode, self.plan.row_start, self.plan.n_rows, self.plan.kv_length = "prefill", row_start, n_rows, length

    def plan_decode(self, positions: torch.Tensor, kv_length: int) -> None:
        n = positions.shape[0]
        self.reserve(kv_length)
        self.plan.mode, self.plan.row_start, self.plan.n_rows, self.plan.kv_length = "decode", 0, n, kv_length
        self.plan.positions, self.plan.rows = positions, self._arange[:n]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of row `src` into row `dst` (compaction when a row leaves)."""
        if src == dst or length <= 0:
            return
        for layer in self.layers:
            layer.keys[dst, :, :length].copy_(layer.keys[src, :, :length])
            layer.values[dst, :, :length].copy_(layer.values[src, :, :length])

    @property
    def nbytes(self) -> int:
        return sum(2 * l.keys.numel() * l.keys.element_size() for l in self.layers)
