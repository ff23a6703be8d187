"""How many device slots (`max_loras`) the engine gets when the user does not say: from memory, not batch size.

A slot holds one adapter on the device; a request whose adapter is not in a slot waits for a host -> slot copy
and evicts another adapter. With as many slots as batch rows no row ever waits for a slot, but every adapter
beyond them thrashes: 32 adapters in rotation through 16 slots make nearly every request a miss, an eviction and a
copy. So the default is as many slots as the host-memory tier holds adapters (`max_cpu_adapters`; at least
`max_batch_size`), fewer only where their memory would take more than `SLOT_MEMORY_FRACTION` of the device (GPU
memory on CUDA, physical RAM on CPU):

    slot_bytes = max_rank * itemsize * sum(in + out over the targeted Linear modules)
    max_loras  = max(1, min(max(max_batch_size, max_cpu_adapters), SLOT_MEMORY_FRACTION * device_bytes // slot_bytes))

Examples (max_rank 64, every Linear of the blocks targeted, max_cpu_adapters 64): the embedded 27M model needs
20 MB per fp32 slot, so 64 slots where 10 % of RAM holds 1.3 GB (on CPU a slot's pages are only touched once an
adapter is copied in); a Llama-3-8B needs 336 MB per bf16 slot, so 23 slots on an 80 GB GPU, 7 on a 24 GB one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SLOT_MEMORY_FRACTION = 0.10


@dataclass(frozen=True)
class SlotChoice:
    max_loras: int
    reason: str  # one line for the start-up log


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device the slots live on (GPU memory, or the host's physical RAM for CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def slot_bytes(targets: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype) -> int:
    """Bytes of one slot: A (r_max, in) and B (out, r_max) for every targeted module (targets: name -> (in, out))."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max_rank * itemsize * sum(i + o for i, o in targets.values())


def choose_max_loras(requested: int, max_batch_size: int, one_slot_bytes: int, memory_bytes: int,
                     max_cpu_adapters: int = 0) -> SlotChoice:
    """`requested` >= 1 is taken as given; 0 means choose (see the module docstring)."""
    if requested >= 1:
        return SlotChoice(requested, f"max_loras={requested} (set by the user)")
    wanted = max(max_batch_size, max_cpu_adapters)
    affordable = int(SLOT_MEMORY_FRACTION * memory_bytes) // max(one_slot_bytes, 1)
    n = max(1, min(wanted, affordable))
    if n == wanted:
        why = (f"= max(max_batch_size={max_batch_size}, max_cpu_adapters={max_cpu_adapters}): every adapter in "
               f"host memory can keep a slot")
    else:
        why = (f"< {wanted}: {SLOT_MEMORY_FRACTION:.0%} of {memory_bytes / 2**30:.1f} GiB holds only {affordable} "
               f"slots" + ("" if n >= max_batch_size else f", fewer than max_batch_size={max_batch_size} rows"))
    return SlotChoice(n, f"max_loras={n} (auto: {one_slot_bytes / 2**20:.1f} MiB per slot, "
                         f"{n * one_slot_bytes / 2**20:.0f} MiB in all, {why})")
