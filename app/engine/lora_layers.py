"""Multi-adapter LoRA layers: every served Linear computes `base(x) + delta`, each row's delta from its own slot.

Weights live in preallocated slot tensors per module (`A: (S+1, r_max, in)`, `B*scaling: (S+1, out, r_max)`;
slot 0 is all zeros forever = "no adapter"). Which row uses which slot is *not* stored with the weights: it lives in
one `LoRABatchMeta` shared by all layers and set once per forward by the scheduler (LoRAX's adapter segments).
Loading an adapter is a `copy_` into a slot; nothing is reallocated and the base weights are never touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter_files import ParsedAdapter

# A row group is (slot, rows): rows is a slice when the rows are consecutive (no gather), else an index tensor.
RowGroup = tuple[int, "slice | torch.Tensor"]
KERNELS = ("auto", "bgmv", "grouped", "reference")


def bgmv_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """Batched gather matrix-vector (Punica/LoRAX BGMV), one gather of each row's slot then two bmm.

    Semantics: for b in range(B): out[b] = x[b] @ lora_a[slot_index[b]].T @ lora_b[slot_index[b]].T
    x: (B, T, in); lora_a: (S+1, r, in); lora_b: (S+1, out, r); slot_index: (B,) long -> out: (B, T, out)
    """
    a = lora_a.index_select(0, slot_index)  # (B, r, in)
    b = lora_b.index_select(0, slot_index)  # (B, out, r)
    shrunk = torch.bmm(x, a.transpose(1, 2))  # (B, T, r)
    return torch.bmm(shrunk, b.transpose(1, 2))  # (B, T, out)


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
    kernel: str = "auto"  # "auto" picks grouped for few distinct adapters, bgmv otherwise
    slots: list[int] = field(default_factory=list)  # per row; 0 = no adapter
    slot_index: torch.Tensor | None = None  # (B,) long on device, only when mode == "bgmv"
    groups: list[RowGroup] = field(default_factory=list)
    mode: str = "none"  # "none" | "bgmv" | "grouped" | "reference"

    def set_rows(self, slots: list[int]) -> None:
        """Record the slot of every row of the next forward and choose the kernel (no device sync)."""
        self.slots = list(slots)
        distinct = sorted({s for s in slots if s != 0})
        self.slot_index, self.groups = None, []
        if not distinct:
            self.mode = "none"
            return
        kernel = self.kernel
        if kernel == "auto":
            # Grouping reads each adapter's weights once and needs no gather; it wins while few adapters share
            # many rows. BGMV costs one gather per row but a fixed number of kernels whatever the mix.
            kernel = "grouped" if len(distinct) * 4 <= len(slots) or len(distinct) == 1 else "bgmv"
        self.mode = kernel
        if kernel == "bgmv":
            self.slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        elif kernel == "grouped":
            for slot in distinct:
                rows = [b for b, s in enumerate(slots) if s == slot]
                if rows[-1] - rows[0] + 1 == len(rows):
                    self.groups.append((slot, slice(rows[0], rows[-1] + 1)))
                else:
                    self.groups.append((slot, torch.tensor(rows, dtype=torch.long, device=self.device)))

    def clear(self) -> None:
        self.slots, self.slot_index, self.groups, self.mode = [], None, [], "none"


class MultiLoRALinear(nn.Module):
    """`base_layer(x) + delta(x)` where row b's delta uses the slot `meta.slots[b]` (works over nn.Linear and
    bitsandbytes Linear4bit/Linear8bitLt, which only see `base_layer(x)`)."""

    def __init__(self, base_layer: nn.Module, n_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, meta: LoRABatchMeta):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.meta = meta
        self.register_buffer("lora_A", torch.zeros(n_slots + 1, max_rank, self.in_features, dtype=dtype,
                                                   device=device), persistent=False)  # (S+1, r, in)
        self.register_buffer("lora_B", torch.zeros(n_slots + 1, self.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)  # (S+1, out, r)

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
        if meta.mode == "bgmv":
            return out + bgmv_delta(xa, self.lora_A, self.lora_B, meta.slot_index).to(out.dtype)
        if meta.mode == "grouped":
            out = out.clone() if out._base is not None else out
            grouped_delta_(out, xa, self.lora_A, self.lora_B, meta.groups)
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
    """All served LoRA layers of one model, with their shared batch metadata."""

    def __init__(self, model: nn.Module, target_names: list[str], n_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.meta = LoRABatchMeta(device=device, kernel=kernel)
        self.layers: dict[str, MultiLoRALinear] = {}
        for name in target_names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            if isinstance(base, MultiLoRALinear):
                raise ValueError(f"{name} is already wrapped")
            wrapped = MultiLoRALinear(base, n_slots, max_rank, dtype, device, self.meta)
            setattr(parent, child, wrapped)
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

    def clear(self, slot: int) -> None:
        if slot != 0:
            for layer in self.layers.values():
                layer.load_slot(slot, None)

    @property
    def nbytes(self) -> int:
        return sum(l.lora_A.numel() * l.lora_A.element_size() + l.lora_B.numel() * l.lora_B.element_size()
                   for l in self.layers.values())
