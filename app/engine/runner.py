"""One forward of the HF model over rows of the row KV cache, each row with its own LoRA slot.

The runner knows nothing about requests: the scheduler gives it rows, token ids, positions and slots.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .cuda_graphs import CAPTURABLE_MODES, DecodeGraphs
from .decode_buckets import batch_bucket, kv_bucket, pad_rows
from .kv_cache import RowKVCache
from .lora_layers import LoRASlotBank


class ModelRunner:
    def __init__(self, model: nn.Module, bank: LoRASlotBank, max_batch: int, max_tokens: int,
                 compile_decode: bool = False, decode_graph: str = "off"):
        cfg = model.config
        embeddings = model.get_input_embeddings().weight
        self.model = model
        self.bank = bank
        self.device = embeddings.device
        self.dtype = embeddings.dtype
        self.vocab_size = int(cfg.vocab_size)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.kv = RowKVCache(int(cfg.num_hidden_layers), max_batch, kv_heads, max_tokens, head_dim, self.dtype,
                             self.device)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self._masked = torch.finfo(self.dtype).min
        self._positions = torch.arange(max_tokens, device=self.device)  # (max_tokens,)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # With SDPA, a batch that needs no padding mask goes without one: transformers then lets SDPA apply the
        # causal rule itself (`is_causal`, or nothing for one query), which can use its flash/GQA kernels.
        self.mask_free = getattr(cfg, "_attn_implementation", None) == "sdpa"
        # EngineConfig.compile="on": decode forwards go through torch.compile (inductor, dynamic shapes: B and L
        # change every step); prefill stays eager. One graph per (LoRA mode, rank bucket, mask or not), each
        # compiled on first use (~1 min on 2 CPU cores): see docs/benchmarks.md "torch.compile".
        self.decode_model = torch.compile(model, dynamic=True) if compile_decode else model
        # EngineConfig.decode_graph: "buckets" pads decode steps to fixed shapes (decode_buckets.py); "cuda" also
        # captures one CUDA graph per bucket and replays it (cuda_graphs.py; CUDA devices only).
        self.bucketed = decode_graph in ("buckets", "cuda")
        use_graphs = decode_graph == "cuda" and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self._graph_forward) if use_graphs else None

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor,
                 logits_to_keep: int | torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = self.model if model is None else model
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=logits_to_keep, **{self._cache_kwarg: self.kv})
        return out.logits if isinstance(logits_to_keep, int) and logits_to_keep == 0 else out.logits[:, -1, :]

    @torch.inference_mode()
    def prefill(self, row_start: int, prompts: list[list[int]], slots: list[int],
                all_positions: bool = False) -> torch.Tensor:
        """Run the prompts of newcomers placed at rows [row_start, row_start+n); returns last-token logits (n, V),
        or with `all_positions` the logits of every position (n, T, V) (prompt log-probabilities)."""
        n, t = len(prompts), max(len(p) for p in prompts)
        if row_start + n > self.max_batch or t > self.max_tokens:
            raise ValueError(f"prefill of rows {row_start}..{row_start + n} x {t} tokens exceeds the cache")
        ids = torch.zeros(n, t, dtype=torch.long)  # right-padded with token 0 (masked out)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids = ids.to(self.device, non_blocking=True)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # (n,)
        pos = self._positions[:t]  # (T,)
        mask = None  # every prompt has length T: plain causal attention
        if not (self.mask_free and all(len(p) == t for p in prompts)):
            # query q may see key k iff k <= q (causal) and k is a real prompt token of its row.
            allowed = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])
            mask = torch.zeros(n, 1, t, t, dtype=self.dtype, device=self.device)  # (n, 1, T, T) additive
            mask.masked_fill_(~allowed[:, None], self._masked)
        self.kv.plan_prefill(row_start, n, t)
        self.bank.prepare(row_start, slots)
        try:
            keep = 0 if all_positions else (lengths - 1)[:, None]  # 0 = keep every position
            return self._forward(ids, mask, pos[None, :].expand(n, t), keep)
        finally:
            self.bank.meta.clear()

    def _decode_mask(self, pos: torch.Tensor, length: int) -> torch.Tensor:
        """Row b sees its cached tokens 0..pos[b]-1 and the new one at pos[b]; longer rows' tail is masked.
        pos: (B,) -> (B, 1, 1, L) additive."""
        mask = torch.zeros(pos.shape[0], 1, 1, length, dtype=self.dtype, device=self.device)  # (B, 1, 1, L)
        mask.masked_fill_((self._positions[None, :length] > pos[:, None])[:, None, None, :], self._masked)
        return mask

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Rows 0..B-1 each feed one token at their own position; returns logits (B, V)."""
        b = len(tokens)
        if self.bucketed:
            return self._decode_bucketed(tokens, positions, slots)[:b]
        length = max(positions) + 1
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)[:, None]  # (B, 1)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)  # (B,)
        mask = None  # every row is at position L-1: it sees all L keys
        if not (self.mask_free and min(positions) == length - 1):
            mask = self._decode_mask(pos, length)
        self.kv.plan_decode(pos, length)
        self.bank.prepare(0, slots)
        try:
            return self._forward(ids, mask, pos[:, None], 1, self.decode_model)
        finally:
            self.bank.meta.clear()

    def _decode_bucketed(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """The decode step padded to its shape bucket (decode_buckets.py): logits (B', V), rows >= B are padding."""
        rows = batch_bucket(len(tokens), self.max_batch)
        length = kv_bucket(max(positions) + 1, self.max_tokens)
        tokens, positions, slots = pad_rows(tokens, positions, slots, rows)
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)[:, None]  # (B', 1)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)  # (B',)
        mask = self._decode_mask(pos, length)  # (B', 1, 1, L')
        self.kv.plan_decode(pos, length)
        self.bank.prepare(0, slots)
        meta = self.bank.meta
        try:
            if self.graphs is not None and meta.mode in CAPTURABLE_MODES:
                return self.graphs.run((rows, length, meta.mode, meta.rank), ids, mask, pos, meta, self.kv.capacity)
            return self._forward(ids, mask, pos[:, None], 1, self.decode_model)
        finally:
            meta.clear()

    def _graph_forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The decode forward as CUDA graphs capture it: the KV plan points at the graph's static positions."""
        self.kv.plan_decode(pos, mask.shape[-1])
        return self._forward(ids, mask, pos[:, None], 1)
