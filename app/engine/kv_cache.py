"""Preallocated per-row KV cache, a `transformers.Cache` the HF model writes into during its own forward.

Every layer holds `keys: (max_batch, heads, capacity, key_dim)` and `values: (max_batch, heads, capacity,
value_dim)` (the family's `KVLayout`, architecture.py: most models cache kv_heads x head_dim for both; DeepSeek's
MLA caches one "head" of compressed latent and one of rotary key). The capacity grows with the real lengths
(starting at `INITIAL_TOKENS`, doubling up to `max_total_tokens` when a forward needs more, old contents copied), so
memory follows the longest request seen rather than the worst case. Running requests occupy rows
0..B-1 contiguously (a leaving request's row is refilled with the last row), so the decode step reads the views
`keys[:B, :, :L]` with no per-step gather. Each forward's rows are the runner's `ForwardBatch`
(forward_batch.py), read from the shared `ForwardContext`:

* prefill: rows [r0, r0+n) start from empty; their (right-padded) prompt K/V are written at positions 0..T-1 and
  the attention reads just these new K/V (pad positions are masked and later overwritten);
* decode: row b writes its one new K/V at `positions[b]` and attends to `keys[:B, :, :L]` (L = max length + 1).

A layer with an attention window W (architecture.py `layer_windows`) is a ring of at most W positions per row:
position p lives in slot p % W, so its memory stops growing at the window. A prompt longer than the ring keeps its
last W positions; a decode step reads min(L, W) slots, and the runner's window mask (runner._decode_masks) sees
slot j of row b as position pos[b] - ((pos[b] - j) % W), visible iff that is >= 0.

Checked against transformers 5.24: the attention calls `cache.update(k, v, layer_idx, ...)` and uses what it
returns; `create_causal_mask` returns a 4D mask unchanged (masking_utils._preprocess_mask_arguments), so the
runner passes an explicit additive mask `(B, 1, T, L)` and `position_ids` per row. Where it passes no mask (SDPA,
no padding, no window) a model that builds its own mask anyway (Falcon) asks the cache for the past length:
`get_seq_length` answers it (0 in prefill, L - 1 in a decode step whose rows all sit at L - 1).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .architecture import KVLayout
from .forward_batch import PREFILL, ForwardContext

INITIAL_TOKENS = 256  # KV positions per row allocated at start (at most max_total_tokens)


class RowKVLayer(CacheLayerMixin):
    """One decoder layer's slice of the row cache."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, context: ForwardContext, max_tokens: int,
                 window: int | None = None):
        super().__init__()
        self.keys = keys  # (max_batch, heads, capacity, key_dim); a windowed layer: min(capacity, window) slots
        self.values = values  # (max_batch, heads, capacity, value_dim)
        self.context = context
        self.max_tokens = max_tokens
        self.window = window  # None: full attention; else position p lives in slot p % window (a ring)
        self.is_initialized = True

    def slots(self, capacity: int) -> int:
        """Positions per row this layer holds at cache capacity `capacity` (a ring never exceeds its window)."""
        return capacity if self.window is None else min(capacity, self.window)

    def grow(self, capacity: int) -> None:
        """Reallocate to `capacity` positions per row (a ring: at most its window), keeping what is cached. A ring
        below its window has never wrapped (position p is in slot p), so the copy keeps the mapping."""
        old, capacity = self.keys.shape[2], self.slots(capacity)
        if capacity == old:
            return
        for name in ("keys", "values"):
            current = getattr(self, name)
            bigger = current.new_zeros(*current.shape[:2], capacity, current.shape[3])
            bigger[:, :, :old].copy_(current)
            setattr(self, name, bigger)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # preallocated
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: (n, heads, T, key_dim); value_states: (n, heads, T, value_dim)
        batch = self.context.current()
        if batch.phase == PREFILL:
            r0, r1, t = batch.row_start, batch.row_start + batch.n_rows, key_states.shape[2]
            if t <= self.keys.shape[2]:
                self.keys[r0:r1, :, :t].copy_(key_states)
                self.values[r0:r1, :, :t].copy_(value_states)
            else:  # a ring shorter than the prompts: each row keeps its last `window` positions
                self._write_ring(batch, key_states, value_states)
            return key_states, value_states  # newcomers have no past: attend to their own prompt only
        # decode: one new token per row, each at its own position (its ring slot in a windowed layer)
        slot = batch.positions if self.window is None else batch.positions % self.window  # (B,)
        self.keys[batch.rows, :, slot] = key_states[:, :, 0]  # (B, heads, key_dim)
        self.values[batch.rows, :, slot] = value_states[:, :, 0]
        n, length = batch.n_rows, self.slots(batch.kv_length)
        return self.keys[:n, :, :length], self.values[:n, :, :length]

    def _write_ring(self, batch, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Row i (lengths[i] real tokens) stores positions max(0, len - W) .. max(0, len - W) + W - 1 at slots
        p % W (positions past its length are padding: masked until decode overwrites them)."""
        window, n = self.window, batch.n_rows
        start = (batch.lengths - window).clamp(min=0)  # (n,)
        positions = start[:, None] + torch.arange(window, device=start.device)[None, :]  # (n, W)
        rows = torch.arange(n, device=start.device)[:, None]  # (n, 1)
        dst = batch.row_start + rows
        self.keys[dst, :, positions % window] = key_states[rows, :, positions]  # (n, W, heads, key_dim)
        self.values[dst, :, positions % window] = value_states[rows, :, positions]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots(self.context.current().kv_length), 0

    def get_seq_length(self) -> int:
        """The past length of the forward's rows: 0 in prefill, L - 1 in decode (exact when every row sits at
        L - 1, the only case in which the runner lets a model build its own mask; otherwise positions and the
        mask are passed explicitly)."""
        batch = self.context.batch
        return 0 if batch is None or batch.phase == PREFILL else batch.kv_length - 1

    def get_max_length(self) -> int:
        return self.max_tokens

    def reset(self) -> None:
        return None  # rows are overwritten on reuse; nothing to clear


class RowKVCache(Cache):
    """The engine's KV cache: `[layers][max_batch, heads, capacity, key/value dim]`, rows = requests."""

    def __init__(self, n_layers: int, max_batch: int, layout: KVLayout, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, context: ForwardContext, windows: tuple[int | None, ...] | None = None):
        self.context = context
        self.capacity = min(INITIAL_TOKENS, max_tokens)
        layers = []
        for window in windows or (None,) * n_layers:
            slots = self.capacity if window is None else min(self.capacity, window)
            keys = torch.zeros(max_batch, layout.heads, slots, layout.key_dim, dtype=dtype, device=device)
            values = torch.zeros(max_batch, layout.heads, slots, layout.value_dim, dtype=dtype, device=device)
            layers.append(RowKVLayer(keys, values, context, max_tokens, window))
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

    def rows(self, n: int) -> torch.Tensor:
        """arange(n) on the cache's device (the decode step's row index)."""
        return self._arange[:n]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of row `src` into row `dst` (compaction when a row leaves)."""
        if src == dst or length <= 0:
            return
        for layer in self.layers:
            held = layer.slots(length)  # a ring holds its last `window` positions in slots independent of the row
            layer.keys[dst, :, :held].copy_(layer.keys[src, :, :held])
            layer.values[dst, :, :held].copy_(layer.values[src, :, :held])

    @property
    def nbytes(self) -> int:
        return sum((l.keys.numel() + l.values.numel()) * l.keys.element_size() for l in self.layers)
