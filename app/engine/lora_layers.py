"""Multi-adapter LoRA layers: every served Linear computes `base(x) + delta`, each row's delta from its own slot.

Weights live in preallocated slot tensors per module (`A: (S+1, r_max, in)`, `B*scaling: (S+1, out, r_max)`;
slot 0 is all zeros forever = "no adapter"). Which row uses which slot is *not* stored with the weights: it lives in
one `LoRABatchMeta` shared by all layers and set once per forward by the scheduler (LoRAX's adapter segments).
Loading an adapter is a `copy_` into a slot; nothing is reallocated and the base weights are never touched.

Rank: a slot is zero-padded from its adapter's rank to r_max, so any leading slice `[:r]` with r at least the
largest rank of the batch's adapters gives the same delta. Each forward computes at `meta.rank` = that largest rank
rounded up to a bucket (`rank_bucket`: 8, 16, 32, ... up to r_max; a few fixed shapes), so `max_rank` 64 costs
nothing for rank-16 traffic.

Row buffers (the `rows` kernel) hold `row_buffer_rank` columns, the largest rank bucket whose copies for `max_rows` rows fit
in `ROW_BUFFER_BUDGET` (`choose_row_rank`), not necessarily r_max: 64 rows of rank-16 adapters keep the fast path
where 64 rows at r_max 64 would not fit. A batch whose bucket is above `row_buffer_rank` uses BGMV for that forward.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_files import ParsedAdapter

# A row group is (slot, rows): rows is a slice when the rows are consecutive (no gather), else an index tensor.
RowGroup = tuple[int, "slice | torch.Tensor"]
KERNELS = ("auto", "rows", "bgmv", "grouped", "reference")
ROW_BUFFER_BUDGET = 512 << 20  # auto mode keeps per-row weight copies only if they take at most this many bytes
MIN_RANK_BUCKET = 8


def rank_bucket(rank: int, max_rank: int) -> int:
    """The rank a forward computes at: the next power of two >= `rank` (at least 8), at most `max_rank`."""
    bucket = MIN_RANK_BUCKET
    while bucket < rank:
        bucket *= 2
    return min(bucket, max_rank)


def choose_row_rank(max_rows: int, max_rank: int, bytes_per_rank_row: int, budget: int) -> int:
    """Columns of the per-row buffers: the largest rank bucket (<= max_rank) whose `max_rows` copies take at most
    `budget` bytes; 0 when not even the smallest bucket fits (no row buffers, BGMV instead).

    bytes_per_rank_row: itemsize * sum(in + out) over the served modules (one row, one rank column).
    """
    buckets = sorted({rank_bucket(r, max_rank) for r in range(1, max_rank + 1)}, reverse=True)
    return next((b for b in buckets if max_rows * b * bytes_per_rank_row <= budget), 0) if max_rows else 0


def bgmv_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """Batched gather matrix-vector (Punica/LoRAX BGMV), one gather of each row's slot then two bmm.

    Semantics: for b in range(B): out[b] = x[b] @ lora_a[slot_index[b]].T @ lora_b[slot_index[b]].T
    x: (B, T, in); lora_a: (S+1, r, in); lora_b: (S+1, out, r); slot_index: (B,) long -> out: (B, T, out)
    """
    a = lora_a.index_select(0, slot_index)  # (B, r, in)
    b = lora_b.index_select(0, slot_index)  # (B, out, r)
    shrunk = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
    return torch.bmm(shrunk, b.transpose(1, 2))  # (B, T, out)


def rows_delta(x: torch.Tensor, row_a: torch.Tensor, row_b: torch.Tensor) -> torch.Tensor:
    """Row-aligned weights: row b's adapter was copied into row b of `row_a`/`row_b` when the row was bound, so
    the step reads each row's weights once and gathers nothing (what a BGMV kernel does, in two bmm).

    Semantics: for b in range(B): out[b] = x[b] @ row_a[b].T @ row_b[b].T  (row_a[b] == lora_a[slot[b]])
    x: (B, T, in); row_a: (B, r, in) view; row_b: (B, out, r) view -> out: (B, T, out)
    """
    return torch.bmm(torch.bmm(x, row_a.transpose(1, 2)), row_b.transpose(1, 2))


def grouped_delta_(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   groups: list[RowGroup]) -> None:
    """Segment-wise (SGMV-style): one pair of matmuls per distinct adapter over all of its rows, added in place.

    Semantics: for slot, rows in groups: out[rows] += x[rows] @ lora_a[slot].T @ lora_b[slot].T
    out: (B, T, out); x: (B, T, in); rows: slice or (n,) long index tensor. Slot 0 rows are absent (delta 0).
    """
    for slot, rows in groups:
        xs = x[rows]  # (n, T, in)
        delta = (xs @ lora_a[slot].T) @ lora_b[slot].T  # (n, T, r) -> (n, T, out)
        if isinstance(rows, slice):
            out[rows] += delta.to(out.dtype)
        else:
            out.index_add_(0, rows, delta.to(out.dtype))


def reference_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Plain PyTorch reference, one row at a time (kept to test the fast paths against).

    Semantics: for b in range(B): out[b] = x[b] @ lora_a[slots[b]].T @ lora_b[slots[b]].T
    """
    out = x.new_zeros(x.shape[0], x.shape[1], lora_b.shape[1])  # (B, T, out)
    for b, slot in enumerate(slots):
        out[b] = (x[b] @ lora_a[slot].T) @ lora_b[slot].T
    return out


@dataclass
class LoRABatchMeta:
    """Which rows of the *current* forward use which slot. Set once per forward; read by every LoRA layer."""

    device: torch.device
    slots: list[int] = field(default_factory=list)  # per row of this forward; 0 = no adapter
    row_start: int = 0  # KV/batch row of the forward's first row (rows mode reads row_A[row_start:...])
    slot_index: torch.Tensor | None = None  # (B,) long on device, only when mode == "bgmv"
    groups: list[RowGroup] = field(default_factory=list)
    mode: str = "none"  # "none" | "rows" | "bgmv" | "grouped" | "reference"
    rank: int = 0  # leading rank slice of the slot tensors this forward reads (the reference reads all of r_max)

    def set(self, mode: str, slots: list[int], row_start: int, rank: int = 0) -> None:
        self.mode, self.slots, self.row_start, self.rank = mode, list(slots), row_start, rank
        self.slot_index, self.groups = None, []
        if mode == "bgmv":
            self.slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        elif mode == "grouped":
            for slot in sorted({s for s in slots if s != 0}):
                rows = [b for b, s in enumerate(slots) if s == slot]
                if rows[-1] - rows[0] + 1 == len(rows):
                    self.groups.append((slot, slice(rows[0], rows[-1] + 1)))
                else:
                    self.groups.append((slot, torch.tensor(rows, dtype=torch.long, device=self.device)))

    def clear(self) -> None:
        self.slots, self.slot_index, self.groups, self.mode, self.row_start, self.rank = [], None, [], "none", 0, 0


class MultiLoRALinear(nn.Module):
    """`base_layer(x) + delta(x)` where row b's delta uses the slot `meta.slots[b]` (works over nn.Linear and
    bitsandbytes Linear4bit/Linear8bitLt, which only see `base_layer(x)`)."""

    def __init__(self, base_layer: nn.Module, n_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, meta: LoRABatchMeta, row_capacity: int = 0, row_rank: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.meta = meta
        self.register_buffer("lora_A", torch.zeros(n_slots + 1, max_rank, self.in_features, dtype=dtype,
                                                   device=device), persistent=False)  # (S+1, r, in)
        self.register_buffer("lora_B", torch.zeros(n_slots + 1, self.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)  # (S+1, out, r)
        # Per-row copies of the slot each batch row uses (rows mode); empty when not affordable.
        self.register_buffer("row_A", torch.zeros(row_capacity, row_rank, self.in_features, dtype=dtype,
                                                  device=device), persistent=False)  # (max_batch, r_row, in)
        self.register_buffer("row_B", torch.zeros(row_capacity, self.out_features, row_rank, dtype=dtype,
                                                  device=device), persistent=False)  # (max_batch, out, r_row)

    def load_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Copy (A (r, in), B*scaling (out, r)) into `slot`, zero-padding to r_max; None = zeros (not targeted)."""
        if weights is None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            return
        a, b = weights
        r = a.shape[0]
        self.lora_A[slot, :r].copy_(a, non_blocking=True)
        self.lora_A[slot, r:].zero_()
        self.lora_B[slot, :, :r].copy_(b, non_blocking=True)
        self.lora_B[slot, :, r:].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        out = self.base_layer(x)  # (B, T, out)
        meta = self.meta
        if meta.mode == "none":
            return out
        xa = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        r = meta.rank
        if meta.mode == "rows":
            rows = slice(meta.row_start, meta.row_start + x.shape[0])
            return out + rows_delta(xa, self.row_A[rows, :r], self.row_B[rows, :, :r]).to(out.dtype)
        if meta.mode == "bgmv":
            return out + bgmv_delta(xa, self.lora_A[:, :r], self.lora_B[:, :, :r], meta.slot_index).to(out.dtype)
        if meta.mode == "grouped":
            out = out.clone() if out._base is not None else out
            grouped_delta_(out, xa, self.lora_A[:, :r], self.lora_B[:, :, :r], meta.groups)
            return out
        return out + reference_delta(xa, self.lora_A, self.lora_B, meta.slots).to(out.dtype)


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def find_target_modules(model: nn.Module, kinds: tuple[str, ...] | None) -> list[str]:
    """Linear layers inside the numbered decoder blocks (never lm_head/embeddings), optionally only the given
    kinds (last name part, e.g. "q_proj")."""
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or not re.search(r"\.\d+\.", name):
            continue
        if kinds is None or name.rsplit(".", 1)[-1] in kinds:
            names.append(name)
    return names


class LoRASlotBank:
    """All served LoRA layers of one model, their shared batch metadata, and the per-row bindings."""

    def __init__(self, model: nn.Module, target_names: list[str], n_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, kernel: str = "auto", max_rows: int = 0,
                 row_budget: int | None = None):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.kernel = kernel
        self.meta = LoRABatchMeta(device=device)
        modules = {name: model.get_submodule(name) for name in target_names}
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_rank_row = itemsize * sum(m.in_features + m.out_features for m in modules.values())
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
            wrapped = MultiLoRALinear(base, n_slots, max_rank, dtype, device, self.meta, self.row_capacity,
                                      self.row_buffer_rank)
            setattr(model.get_submodule(parent_name), child, wrapped)
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

    def prepare(self, row_start: int, slots: list[int]) -> None:
        """Set the metadata for a forward over rows [row_start, row_start + len(slots)) and pick the kernel."""
        distinct = {s for s in slots if s != 0}
        if not distinct:
            self.meta.set("none", slots, row_start)
            return
        mode = self.kernel
        rank = rank_bucket(max(self.slot_rank[s] for s in distinct), self.max_rank)
        if mode == "auto":
            # Few adapters over many rows: one matmul pair per adapter, nothing copied (grouped). Otherwise the
            # row-aligned copies (no per-step gather), or BGMV when the batch's rank is above the row buffers'.
            # On CUDA never grouped: its Python loop over adapters launches kernels per adapter and layer.
            if self.meta.device.type != "cuda" and (len(distinct) == 1 or len(distinct) * 4 <= len(slots)):
                mode = "grouped"
            else:
                mode = "rows" if rank <= self.row_buffer_rank else "bgmv"
        if mode == "rows":
            self._bind(row_start, slots)
        self.meta.set(mode, slots, row_start, self.max_rank if mode == "reference" else rank)

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
