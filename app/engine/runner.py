"""One forward of the HF model over rows of the row KV cache, each row with its own LoRA slot.

The runner knows nothing about requests: the scheduler gives it rows, token ids, positions and slots. For each
forward it builds one `ForwardBatch` (forward_batch.py: rows, positions/lengths, the LoRA plan, the additive
mask of every attention window of the model) and sets it on the shared `ForwardContext` while the model runs; the
KV cache, the LoRA layers and the window hooks read it. How the masks reach the model's layers is the family's
`Architecture.mask_form` (architecture.py).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .architecture import MASK_BY_LAYER_TYPE, Architecture, window_modules
from .cpu_linear import wrap_output_head
from .cuda_graphs import DecodeGraphs
from .decode_buckets import batch_bucket, kv_bucket, pad_rows
from .forward_batch import DECODE, PREFILL, ForwardBatch
from .kv_cache import RowKVCache
from .lora_kernels import LoRAPlan
from .lora_layers import LoRASlotBank


class ModelRunner:
    def __init__(self, model: nn.Module, bank: LoRASlotBank, arch: Architecture, max_batch: int, max_tokens: int,
                 compile_decode: bool = False, decode_graph: str = "off", cpu_gemm: str = "aten"):
        cfg = model.config
        wrap_output_head(model, cpu_gemm)  # fp32 on CPU: the head through oneDNN (cpu_linear.py)
        embeddings = model.get_input_embeddings().weight
        self.model = model
        self.bank = bank
        self.arch = arch
        self.context = bank.context
        self.device = embeddings.device
        self.dtype = embeddings.dtype
        self.vocab_size = int(cfg.vocab_size)
        self.kv = RowKVCache(arch.n_layers, max_batch, arch.kv, max_tokens, self.dtype, self.device, self.context,
                             arch.layer_windows)
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self._masked = torch.finfo(self.dtype).min
        self._positions = torch.arange(max_tokens, device=self.device)  # (max_tokens,)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # With SDPA, a batch that needs no padding mask goes without one: transformers then lets SDPA apply the
        # causal rule itself (`is_causal`, or nothing for one query), which can use its flash/GQA kernels. Never
        # for a model with attention windows (the window is in the mask).
        self.mask_free = getattr(cfg, "_attn_implementation", None) == "sdpa" and arch.mask_free_ok
        for module, window in window_modules(model, arch):
            module.register_forward_pre_hook(self._window_hook(window), with_kwargs=True)
        # EngineConfig.compile="on": decode forwards go through torch.compile (inductor, dynamic shapes: B and L
        # change every step); prefill stays eager. One graph per (LoRA kernel, rank bucket, mask or not), each
        # compiled on first use (~1 min on 2 CPU cores): see docs/benchmarks.md "torch.compile".
        self.decode_model = torch.compile(model, dynamic=True) if compile_decode else model
        # EngineConfig.decode_graph: "buckets" pads decode steps to fixed shapes (decode_buckets.py); "cuda" also
        # captures one CUDA graph per bucket and replays it (cuda_graphs.py; CUDA devices only).
        self.bucketed = decode_graph in ("buckets", "cuda")
        use_graphs = decode_graph == "cuda" and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self._graph_forward) if use_graphs else None

    def _window_hook(self, window: int):
        """A pre-hook giving an attention module the forward's mask of its own window (Architecture MASK_PER_MODULE)."""
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = self.context.current().mask_for(window)
            return args, kwargs
        return hook

    def _model_mask(self, masks: dict[int | None, torch.Tensor | None]):
        """What the model's `attention_mask` argument gets: one tensor, or {layer type: tensor} (mask_form)."""
        arch = self.arch
        if arch.mask_form == MASK_BY_LAYER_TYPE and any(m is not None for m in masks.values()):
            return {kind: masks[window] for kind, window in zip(arch.layer_types, arch.layer_windows)}
        return masks[None] if None in masks else masks[arch.layer_windows[0]]

    def _forward(self, batch: ForwardBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_to_keep: int | torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = self.model if model is None else model
        with self.context.use(batch):
            out = model(input_ids=input_ids, attention_mask=self._model_mask(batch.masks), position_ids=position_ids,
                        use_cache=True, logits_to_keep=logits_to_keep, **{self._cache_kwarg: self.kv})
        return out.logits if isinstance(logits_to_keep, int) and logits_to_keep == 0 else out.logits[:, -1, :]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: (B, T, L) bool -> (B, 1, T, L) additive mask (0 where allowed, dtype min elsewhere)."""
        mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed[:, None], self._masked)

    def _prefill_masks(self, lengths: torch.Tensor, t: int) -> dict[int | None, torch.Tensor]:
        """Per window: query q of row i may see key k iff k <= q, k < lengths[i] and q - window < k."""
        pos = self._positions[:t]  # (T,)
        causal = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] < lengths[:, None, None])
        return {w: self._additive(causal if w is None else causal & (pos[None, None, :] > pos[None, :, None] - w))
                for w in self.arch.windows}

    def _decode_masks(self, pos: torch.Tensor, length: int) -> dict[int | None, torch.Tensor]:
        """Full attention: row b sees its keys k <= pos[b] (longer rows' tail is masked): (B, 1, 1, L).
        A window-w layer reads its ring's min(L, w) slots (kv_cache.py): slot j holds position
        pos[b] - ((pos[b] - j) % w), always within the window, visible iff >= 0: (B, 1, 1, min(L, w)).
        pos: (B,) -> per window an additive mask."""
        masks = {}
        for w in self.arch.windows:
            slots = self._positions[None, :length if w is None else min(length, w)]  # (1, K)
            seen = slots <= pos[:, None] if w is None else pos[:, None] - (pos[:, None] - slots) % w >= 0  # (B, K)
            masks[w] = self._additive(seen[:, None, :])
        return masks

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
        if self.mask_free and all(len(p) == t for p in prompts):
            masks = {None: None}  # every prompt has length T, no window: plain causal attention
        else:
            masks = self._prefill_masks(lengths, t)
        self.kv.reserve(t)
        batch = ForwardBatch(PREFILL, row_start, n, t, lengths=lengths, lora=self.bank.prepare(row_start, slots),
                             masks=masks)
        keep = 0 if all_positions else (lengths - 1)[:, None]  # 0 = keep every position
        return self._forward(batch, ids, self._positions[:t][None, :].expand(n, t), keep)

    def _decode_batch(self, pos: torch.Tensor, length: int, slots: list[int],
                      masks: dict[int | None, torch.Tensor | None], lora: LoRAPlan | None = None) -> ForwardBatch:
        self.kv.reserve(length)
        n = pos.shape[0]
        lora = self.bank.prepare(0, slots) if lora is None else lora
        return ForwardBatch(DECODE, 0, n, length, positions=pos, rows=self.kv.rows(n), lora=lora, masks=masks)

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Rows 0..B-1 each feed one token at their own position; returns logits (B, V)."""
        b = len(tokens)
        if self.bucketed:
            return self._decode_bucketed(tokens, positions, slots)[:b]
        length = max(positions) + 1
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)[:, None]  # (B, 1)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)  # (B,)
        if self.mask_free and min(positions) == length - 1:
            masks = {None: None}  # every row is at position L-1: it sees all L keys
        else:
            masks = self._decode_masks(pos, length)
        batch = self._decode_batch(pos, length, slots, masks)
        return self._forward(batch, ids, pos[:, None], 1, self.decode_model)

    def _decode_bucketed(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """The decode step padded to its shape bucket (decode_buckets.py): logits (B', V), rows >= B are padding."""
        rows = batch_bucket(len(tokens), self.max_batch)
        length = kv_bucket(max(positions) + 1, self.max_tokens)
        tokens, positions, slots = pad_rows(tokens, positions, slots, rows)
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)[:, None]  # (B', 1)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)  # (B',)
        masks = self._decode_masks(pos, length)  # per window (B', 1, 1, L')
        lora = self.bank.prepare(0, slots)
        if self.graphs is not None and lora.kernel.capturable:
            self.kv.reserve(length)
            key = (rows, length, lora.kernel.name, lora.rank)
            return self.graphs.run(key, ids, masks, pos, lora, self.kv.capacity)
        return self._forward(self._decode_batch(pos, length, slots, masks, lora), ids, pos[:, None], 1,
                             self.decode_model)

    def _graph_forward(self, ids: torch.Tensor, masks: dict, pos: torch.Tensor, lora: LoRAPlan,
                       length: int) -> torch.Tensor:
        """The decode forward as CUDA graphs capture it: the batch points at the graph's static tensors."""
        return self._forward(self._decode_batch(pos, length, lora.slots, masks, lora), ids, pos[:, None], 1)
