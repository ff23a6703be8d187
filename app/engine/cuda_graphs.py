"""CUDA graphs of the bucketed decode step (EngineConfig.decode_graph="cuda"): one graph per shape bucket and
LoRA kernel/rank, captured on first use and replayed with the step's inputs copied into the graph's static buffers.

Semantics: for each decode step with key k = (B', L', LoRA kernel name, rank):
    if k not in graphs: warm up on a side stream, then capture runner.forward(static ids, masks, positions)
    static.copy_(inputs); graphs[k].replay(); logits = static output[:B]

What the capture bakes in: the addresses of the KV tensors (so graphs are dropped when the cache grows), of the
row buffers and slot tensors (loads write into them in place, so replays see new adapters), of the batch's
positions and window masks (static buffers) and of BGMV's slot index (copied into the captured one before each
replay). Kernels with per-batch Python control flow (`LoRAKernel.capturable` False: grouped, reference) are never
captured; on CUDA `auto` never picks them.
Measured on a lent H200 (docs/benchmarks.md "GPU"): a random Llama-3-8B-shaped model in bf16, 32 rows, decode step
9.8 ms with graphs against 75-86 ms eager (the GEMM floor of the step is 6-7 ms: eager steps are launch-bound), and
tests/test_decode_buckets.py's GPU check (graph tokens = CPU tokens) passed there. Hence `decode_graph="auto"`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .lora_kernels import LoRAPlan


def choose_decode_graph(requested: str, device: torch.device, quantize: str) -> str:
    """The decode-graph mode an engine runs with.

    Semantics: "auto" -> "cuda" on a CUDA device when the weights are not quantized (eager decode steps there are
    bound by kernel launches: ~8x slower than replayed graphs at an 8B shape), else "off" (on CPU, padding to
    buckets only costs; bitsandbytes' 4/8-bit kernels under graph capture were never run on a GPU here).
    Any other value is kept as asked."""
    if requested != "auto":
        return requested
    return "cuda" if device.type == "cuda" and quantize in ("none", None, "") else "off"


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # (B', 1) long
    positions: torch.Tensor  # (B',) long
    masks: dict  # window -> (B', 1, 1, L') additive
    slot_index: torch.Tensor | None  # (B',) long, bgmv only
    logits: torch.Tensor  # (B', V) output of the captured forward


class DecodeGraphs:
    def __init__(self, forward):
        self.forward = forward  # (ids, masks, positions, lora plan, key length L') -> logits (B', V)
        self.graphs: dict[tuple, CapturedStep] = {}
        self.pool = None  # one memory pool shared by all graphs
        self.kv_capacity = 0

    def run(self, key: tuple, ids: torch.Tensor, masks: dict, positions: torch.Tensor, lora: LoRAPlan,
            kv_capacity: int) -> torch.Tensor:
        """Replay (capturing first if needed) the graph of `key` = (B', L', kernel name, rank). `lora`: this step's
        LoRA plan; `kv_capacity`: the cache's positions per row (a change means it grew, reallocated: recapture)."""
        if kv_capacity != self.kv_capacity:
            self.graphs.clear()
            self.kv_capacity = kv_capacity
        step = self.graphs.get(key)
        if step is None:
            step = self.graphs[key] = self._capture(ids, masks, positions, lora, key[1])
        step.ids.copy_(ids)
        step.positions.copy_(positions)
        for window, mask in masks.items():
            step.masks[window].copy_(mask)
        if step.slot_index is not None:
            step.slot_index.copy_(lora.slot_index)
        step.graph.replay()
        return step.logits

    def _capture(self, ids, masks, positions, lora: LoRAPlan, length: int) -> CapturedStep:
        ids, positions = ids.clone(), positions.clone()
        masks = {window: mask.clone() for window, mask in masks.items()}
        slot_index = lora.slot_index.clone() if lora.slot_index is not None else None
        lora = replace(lora, slot_index=slot_index)  # the captured forward reads the static slot index
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(ids, masks, positions, lora, length)  # warm-up: lazy inits, allocator state
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(ids, masks, positions, lora, length)
        self.pool = graph.pool()
        return CapturedStep(graph, ids, positions, masks, slot_index, logits)
