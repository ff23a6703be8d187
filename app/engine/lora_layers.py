"""Multi-adapter LoRA layers: every served Linear computes `base(x) + delta`, each row's delta from its own slot.

Weights live in preallocated slot tensors per module (`A: (S+1, r_max, in)`, `B*scaling: (S+1, out, r_max)`;
slot 0 is all zeros forever = "no adapter"). Which row uses which slot is *not* stored with the weights: it lives in
the forward's `ForwardBatch.lora` (a `LoRAPlan`, forward_batch.py), set once per forward by the runner and read by
every layer, which hands it to the plan's kernel (lora_kernels.py: rows / bgmv / grouped / reference).
Loading an adapter is a `copy_` into a slot; nothing is reallocated and the base weights are never touched.

Rank: a slot is zero-padded from its adapter's rank to r_max, so any leading slice `[:r]` with r at least the
largest rank of the batch's adapters gives the same delta. Each forward computes at `plan.rank` = that largest rank
rounded up to a bucket (`rank_bucket`: 8, 16, 32, ... up to r_max; a few fixed shapes), so `max_rank` 64 costs
nothing for rank-16 traffic.

Row buffers (the `rows` kernel) hold `row_buffer_rank` columns, the largest rank bucket whose copies for `max_rows` rows fit
in `ROW_BUFFER_BUDGET` (`choose_row_rank`), not necessarily r_max: 64 rows of rank-16 adapters keep the fast path
where 64 rows at r_max 64 would not fit. A batch whose bucket is above `row_buffer_rank` uses BGMV for that forward.
"""
from __future__ import annotations

import re
import torch
from torch import nn

from .adapter_files import ParsedAdapter
from .architecture import layer_features
from .cpu_linear import onednn_linear, use_onednn
from .forward_batch import ForwardContext
from .lora_kernels import (KERNELS, LoRAPlan, bgmv_delta, grouped_delta_, rank_bucket, reference_delta,  # noqa: F401
                           rows_delta, select_kernel)

ROW_BUFFER_BUDGET = 512 << 20  # auto mode keeps per-row weight copies only if they take at most this many bytes


def choose_row_rank(max_rows: int, max_rank: int, bytes_per_rank_row: int, budget: int) -> int:
    """Columns of the per-row buffers: the largest rank bucket (<= max_rank) whose `max_rows` copies take at most
    `budget` bytes; 0 when not even the smallest bucket fits (no row buffers, BGMV instead).

    bytes_per_rank_row: itemsize * sum(in + out) over the served modules (one row, one rank column).
    """
    buckets = sorted({rank_bucket(r, max_rank) for r in range(1, max_rank + 1)}, reverse=True)
    return next((b for b in buckets if max_rows * b * bytes_per_rank_row <= budget), 0) if max_rows else 0


class MultiLoRALinear(nn.Module):
    """`base_layer(x) + delta(x)` where row b's delta uses its slot (the forward's `ForwardBatch.lora`).

    The base layer is an nn.Linear (also bitsandbytes Linear4bit/Linear8bitLt, which only see `base_layer(x)`) or
    a transformers Conv1D (GPT-2: weight stored in x out; PEFT's LoRA on it computes the same x @ A.T @ B.T).
    x may have any leading shape whose first elements are the forward's rows in order: (B, T, in) for most layers,
    (B*T, in) where a model flattens tokens (OPT's MLP, Qwen2-MoE's shared expert), (B, 1, L, in) for DeepSeek's
    kv_b_proj over the cached latents; the delta is computed on the view (B, -1, in).
    Outside a runner forward (no batch set) the layer is its base layer.
    """

    def __init__(self, base_layer: nn.Module, n_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, context: ForwardContext, row_capacity: int = 0, row_rank: int = 0,
                 cpu_gemm: str = "aten"):
        super().__init__()
        self.base_layer = base_layer
        self.onednn = use_onednn(base_layer, cpu_gemm)  # base_layer(x) through oneDNN (cpu_linear.py)
        self.in_features, self.out_features = layer_features(base_layer)
        self.context = context
        self.register_buffer("lora_A", torch.zeros(n_slots + 1, max_rank, self.in_features, dtype=dtype,
                                                   device=device), persistent=False)  # (S+1, r, in)
        self.register_buffer("lora_B", torch.zeros(n_slots + 1, self.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)  # (S+1, out, r)
        self.slot_written = [0] * (n_slots + 1)  # per slot: rank columns [0, n) that may be non-zero
        self.index = -1  # position in the bank (LoRAPlan.skip names layers by it)
        # Per-row copies of the slot each batch row uses (rows kernel); empty when not affordable.
        self.register_buffer("row_A", torch.zeros(row_capacity, row_rank, self.in_features, dtype=dtype,
                                                  device=device), persistent=False)  # (max_batch, r_row, in)
        self.register_buffer("row_B", torch.zeros(row_capacity, self.out_features, row_rank, dtype=dtype,
                                                  device=device), persistent=False)  # (max_batch, out, r_row)

    def load_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Copy (A (r, in), B*scaling (out, r)) into `slot`, zero-padding to r_max; None = zeros (not targeted).
        Only the rank columns the slot's previous adapter wrote are cleared (`slot_written`): a rank-16 adapter
        costs its own 16 columns, not r_max, and pages of a slot never written stay untouched (CPU: uncommitted)."""
        r = 0 if weights is None else weights[0].shape[0]
        dirty = self.slot_written[slot]
        if weights is not None:
            a, b = weights
            self.lora_A[slot, :r].copy_(a, non_blocking=True)
            self.lora_B[slot, :, :r].copy_(b, non_blocking=True)
        if dirty > r:
            self.lora_A[slot, r:dirty].zero_()
            self.lora_B[slot, :, r:dirty].zero_()
        self.slot_written[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in), rows first
        out = onednn_linear(self.base_layer, x) if self.onednn else self.base_layer(x)  # (..., out)
        batch = self.context.batch
        if batch is None or not batch.lora.active or self.index in batch.lora.skip:
            return out
        rows = batch.n_rows
        if x.numel() % (rows * self.in_features):
            raise RuntimeError(f"LoRA input of shape {tuple(x.shape)} does not split into the forward's {rows} rows")
        x3 = x.reshape(rows, -1, self.in_features)  # (B, T', in)
        xa = x3 if x3.dtype == self.lora_A.dtype else x3.to(self.lora_A.dtype)
        out3 = batch.lora.kernel.add_delta(self, xa, out.reshape(rows, -1, self.out_features), batch.lora)
        return out3.reshape(out.shape)


def _is_target_kind(module: nn.Module) -> bool:
    # nn.Linear (bitsandbytes Linear4bit / Linear8bitLt subclass it) or transformers' Conv1D (GPT-2 family).
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_target_modules(model: nn.Module, kinds: tuple[str, ...] | None) -> list[str]:
    """Linear / Conv1D layers inside the numbered decoder blocks (never lm_head/embeddings), optionally only the
    given kinds (last name part, e.g. "q_proj"). Per-expert modules of an MoE block (`...experts.<i>...`) are not
    targets: they see only the tokens routed to them, which cannot be matched to the forward's rows."""
    names = []
    for name, module in model.named_modules():
        if not _is_target_kind(module) or not re.search(r"\.\d+\.", name) or re.search(r"\.experts\.\d+(\.|$)", name):
            continue
        if kinds is None or name.rsplit(".", 1)[-1] in kinds:
            names.append(name)
    return names


class LoRASlotBank:
    """All served LoRA layers of one model, and the per-row bindings of the row buffers.

    load(slot, adapter) / clear(slot): copy an adapter into a device slot (or zero it);
    prepare(row_start, slots) -> LoRAPlan: pick the kernel and rank bucket of a forward over those rows (binding
    the row buffers when the rows kernel is chosen); the runner puts the plan in the forward's ForwardBatch.
    """

    def __init__(self, model: nn.Module, target_names: list[str], n_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, kernel: str = "auto", max_rows: int = 0,
                 row_budget: int | None = None, context: ForwardContext | None = None, cpu_gemm: str = "aten"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.kernel = kernel
        self.context = context if context is not None else ForwardContext(device)
        modules = {name: model.get_submodule(name) for name in target_names}
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_rank_row = itemsize * sum(sum(layer_features(m)) for m in modules.values())
        budget = ROW_BUFFER_BUDGET if row_budget is None else row_budget
        # kernel "rows" always gets full-rank row buffers; "auto" the largest rank bucket the budget holds
        self.row_buffer_rank = {"rows": max_rank,
                                "auto": choose_row_rank(max_rows, max_rank, per_rank_row, budget)}.get(kernel, 0)
        self.row_capacity = max_rows if self.row_buffer_rank else 0
        self.row_slot = [-1] * self.row_capacity  # slot whose weights each row buffer holds (-1: none)
        self.row_rank = [0] * self.row_capacity  # columns [row_rank:] of each row buffer are zero
        self.slot_rank = [0] * (n_slots + 1)  # largest module rank of the adapter in each slot (0: empty)
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, base in modules.items():
            parent_name, _, child = name.rpartition(".")
            if isinstance(base, MultiLoRALinear):
                raise ValueError(f"{name} is already wrapped")
            wrapped = MultiLoRALinear(base, n_slots, max_rank, dtype, device, self.context, self.row_capacity,
                                      self.row_buffer_rank, cpu_gemm)
            setattr(model.get_submodule(parent_name), child, wrapped)
            wrapped.index = len(self.layers)
            self.layers[name] = wrapped

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        """module name -> (in_features, out_features)."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    def load(self, slot: int, adapter: ParsedAdapter) -> None:
        if not 1 <= slot <= self.n_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.n_slots} (slot 0 is the permanent no-adapter slot)")
        for name, layer in self.layers.items():
            layer.load_slot(slot, adapter.modules.get(name))
        self.slot_rank[slot] = max((a.shape[0] for a, _ in adapter.modules.values()), default=0)
        self._unbind(slot)

    def _unbind(self, slot: int) -> None:
        self.row_slot = [-1 if s == slot else s for s in self.row_slot]

    def prepare(self, row_start: int, slots: list[int]) -> LoRAPlan:
        """The LoRA plan of a forward over rows [row_start, row_start + len(slots)): kernel (lora_kernels.py
        `select_kernel`), rank bucket and the kernel's per-forward state."""
        distinct = {s for s in slots if s != 0}
        rank = rank_bucket(max(self.slot_rank[s] for s in distinct), self.max_rank) if distinct else 0
        kernel = select_kernel(self.kernel, slots, rank, self.row_buffer_rank, self.device)
        plan = LoRAPlan(kernel=kernel, slots=list(slots), row_start=row_start,
                        rank=self.max_rank if kernel.name == "reference" else rank)
        if kernel.name == "rows":
            self._bind(row_start, slots)
        plan.skip = self._inactive_layers(distinct)
        kernel.prepare(plan, self.device)
        return plan

    def _inactive_layers(self, distinct: set[int]) -> frozenset[int]:
        """Layers none of this forward's adapters targets (their slots are all zeros) skip their delta: adapters on
        q,k,v,o served with slots on every Linear no longer compute zero deltas for the MLP. Not on CUDA, where
        a captured decode graph holds the set of layers it ran (its key does not include this set)."""
        if self.device.type == "cuda" or not distinct:
            return frozenset()
        return frozenset(layer.index for layer in self.layers.values()
                         if not any(layer.slot_written[s] for s in distinct))

    def _bind(self, row_start: int, slots: list[int]) -> None:
        """Copy each row's slot into its row buffer unless it holds it already (rows that joined or moved): the
        slot's own rank r is copied and only the columns a previous binding left non-zero are cleared, so the
        buffer equals the zero-padded slot at a cost in the ranks actually used."""
        for i, slot in enumerate(slots):
            row = row_start + i
            if self.row_slot[row] != slot:
                r, dirty = self.slot_rank[slot], self.row_rank[row]
                for layer in self.layers.values():
                    layer.row_A[row, :r].copy_(layer.lora_A[slot, :r])  # (r, in)
                    layer.row_B[row, :, :r].copy_(layer.lora_B[slot, :, :r])  # (out, r)
                    if dirty > r:
                        layer.row_A[row, r:dirty].zero_()
                        layer.row_B[row, :, r:dirty].zero_()
                self.row_slot[row], self.row_rank[row] = slot, r
