"""The multi-LoRA kernels behind one interface, and the selector that picks one per forward (vLLM's punica
wrapper: the layers call `plan.kernel.add_delta(...)` and never look at which kernel it is).

Every kernel computes, for the rows of one forward,

    Semantics: for b in range(B): out[b] += x[b] @ lora_A[slots[b], :r].T @ lora_B[slots[b], :, :r].T

with x: (B, T, in) and out: (B, T, out); slot 0 is all zeros ("no adapter"); r is the plan's rank bucket. They
differ in how they read the weights:

* `rows`: per-row copies bound when a row joins (`LoRASlotBank._bind`), two bmm, no gather;
* `bgmv`: one gather of each row's slot then two bmm (Punica/LoRAX BGMV);
* `grouped`: one matmul pair per distinct adapter over its rows (SGMV-style; a Python loop, never on CUDA auto);
* `reference`: one row at a time at the full r_max (the tests' yardstick).

`LoRAPlan` is the per-forward state a kernel needs (slots, rank bucket, BGMV's slot index, grouped's row groups);
the runner puts it in the forward's `ForwardBatch` (forward_batch.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .lora_layers import MultiLoRALinear

# A row group is (slot, rows): rows is a slice when the rows are consecutive (no gather), else an index tensor.
RowGroup = tuple[int, "slice | torch.Tensor"]
KERNELS = ("auto", "rows", "bgmv", "grouped", "reference")  # EngineConfig.kernel values
MIN_RANK_BUCKET = 8


def rank_bucket(rank: int, max_rank: int) -> int:
    """The rank a forward computes at: the next power of two >= `rank` (at least 8), at most `max_rank`."""
    bucket = MIN_RANK_BUCKET
    while bucket < rank:
        bucket *= 2
    return min(bucket, max_rank)


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
    """Row-aligned weights: row b's adapter was copied into row b of `row_a`/`row_b` when the row was bound.

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


class LoRAKernel:
    """One way to add the rows' LoRA deltas. `capturable`: no per-batch Python control flow (a CUDA graph can
    replay it)."""

    name = "none"
    capturable = True

    def prepare(self, plan: LoRAPlan, device: torch.device) -> None:
        """Per-forward state the kernel needs beyond slots and rank (set once, read by every layer)."""

    def add_delta(self, layer: MultiLoRALinear, x: torch.Tensor, out: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
        """out + the rows' deltas. x: (B, T, in) in the slot dtype; out: (B, T, out) the base layer's output."""
        return out


class RowsKernel(LoRAKernel):
    name = "rows"

    def add_delta(self, layer, x, out, plan):
        rows, r = slice(plan.row_start, plan.row_start + x.shape[0]), plan.rank
        return out + rows_delta(x, layer.row_A[rows, :r], layer.row_B[rows, :, :r]).to(out.dtype)


class BGMVKernel(LoRAKernel):
    name = "bgmv"

    def prepare(self, plan, device):
        plan.slot_index = torch.tensor(plan.slots, dtype=torch.long, device=device)

    def add_delta(self, layer, x, out, plan):
        r = plan.rank
        return out + bgmv_delta(x, layer.lora_A[:, :r], layer.lora_B[:, :, :r], plan.slot_index).to(out.dtype)


class GroupedKernel(LoRAKernel):
    name = "grouped"
    capturable = False

    def prepare(self, plan, device):
        plan.groups = []
        for slot in sorted({s for s in plan.slots if s != 0}):
            rows = [b for b, s in enumerate(plan.slots) if s == slot]
            if rows[-1] - rows[0] + 1 == len(rows):
                plan.groups.append((slot, slice(rows[0], rows[-1] + 1)))
            else:
                plan.groups.append((slot, torch.tensor(rows, dtype=torch.long, device=device)))

    def add_delta(self, layer, x, out, plan):
        r = plan.rank
        out = out.clone() if out._base is not None else out
        grouped_delta_(out, x, layer.lora_A[:, :r], layer.lora_B[:, :, :r], plan.groups)
        return out


class ReferenceKernel(LoRAKernel):
    name = "reference"
    capturable = False

    def add_delta(self, layer, x, out, plan):
        return out + reference_delta(x, layer.lora_A, layer.lora_B, plan.slots).to(out.dtype)


NO_LORA = LoRAKernel()
KERNEL_BY_NAME: dict[str, LoRAKernel] = {k.name: k for k in (RowsKernel(), BGMVKernel(), GroupedKernel(),
                                                              ReferenceKernel())}


@dataclass
class LoRAPlan:
    """The LoRA half of one forward: which slot each row uses, the kernel, and the kernel's state."""

    kernel: LoRAKernel = NO_LORA
    slots: list[int] = field(default_factory=list)  # per row of this forward; 0 = no adapter
    row_start: int = 0  # batch row of the forward's first row (the rows kernel reads row_A[row_start:...])
    rank: int = 0  # leading rank slice of the slot tensors this forward reads
    slot_index: torch.Tensor | None = None  # (B,) long on device: bgmv
    groups: list[RowGroup] = field(default_factory=list)  # grouped
    skip: frozenset[int] = frozenset()  # MultiLoRALinear.index of layers no adapter of this forward targets

    @property
    def active(self) -> bool:
        return self.kernel is not NO_LORA


def select_kernel(requested: str, slots: list[int], rank: int, row_buffer_rank: int,
                  device: torch.device) -> LoRAKernel:
    """The kernel of a forward whose rows use `slots` at rank bucket `rank`.

    `requested` is EngineConfig.kernel; "auto": few adapters over many rows -> grouped (one matmul pair per
    adapter, nothing copied; never on CUDA, where its Python loop launches kernels per adapter and layer);
    otherwise the row-aligned copies, or BGMV when the batch's rank is above the row buffers'."""
    distinct = {s for s in slots if s != 0}
    if not distinct:
        return NO_LORA
    if requested != "auto":
        return KERNEL_BY_NAME[requested]
    if device.type != "cuda" and (len(distinct) == 1 or len(distinct) * 4 <= len(slots)):
        return KERNEL_BY_NAME["grouped"]
    return KERNEL_BY_NAME["rows" if rank <= row_buffer_rank else "bgmv"]
