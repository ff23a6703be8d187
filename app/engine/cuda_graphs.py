"""CUDA graphs of the bucketed decode step (EngineConfig.decode_graph="cuda"): one graph per shape bucket and
LoRA mode/rank, captured on first use and replayed with the step's inputs copied into the graph's static buffers.

Semantics: for each decode step with key k = (B', L', lora mode, rank):
    if k not in graphs: warm up on a side stream, then capture runner.forward(static ids, mask, positions)
    static.copy_(inputs); graphs[k].replay(); logits = static output[:B]

What the capture bakes in: the addresses of the KV tensors (so graphs are dropped when the cache grows), of the
row buffers and slot tensors (loads write into them in place, so replays see new adapters), of the plan's
positions (a static buffer) and of BGMV's slot index (copied into the captured one before each replay). The
grouped and reference kernels (Python loops over the batch's adapters/rows, which a graph would freeze) are never
captured; on CUDA `auto` never picks them.
Not yet run on a GPU (none was lent when this was written): tests/test_decode_buckets.py has the GPU check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CAPTURABLE_MODES = ("none", "rows", "bgmv")  # LoRA modes whose forward has no per-batch Python control flow


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # (B', 1) long
    positions: torch.Tensor  # (B',) long
    mask: torch.Tensor  # (B', 1, 1, L') additive
    slot_index: torch.Tensor | None  # (B',) long, bgmv only
    logits: torch.Tensor  # (B', V) output of the captured forward


class DecodeGraphs:
    def __init__(self, forward):
        self.forward = forward  # (ids, mask, positions) -> logits (B', V), with the KV plan and LoRA meta set
        self.graphs: dict[tuple, CapturedStep] = {}
        self.pool = None  # one memory pool shared by all graphs
        self.kv_capacity = 0

    def run(self, key: tuple, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, meta,
            kv_capacity: int) -> torch.Tensor:
        """Replay (capturing first if needed) the graph of `key`. `meta`: the LoRA batch metadata already set for
        this step; `kv_capacity`: the cache's positions per row (a change means it grew, reallocated: recapture)."""
        if kv_capacity != self.kv_capacity:
            self.graphs.clear()
            self.kv_capacity = kv_capacity
        step = self.graphs.get(key)
        if step is None:
            step = self.graphs[key] = self._capture(ids, mask, positions, meta)
        step.ids.copy_(ids)
        step.positions.copy_(positions)
        step.mask.copy_(mask)
        if step.slot_index is not None:
            step.slot_index.copy_(meta.slot_index)
        step.graph.replay()
        return step.logits

    def _capture(self, ids, mask, positions, meta) -> CapturedStep:
        ids, mask, positions = ids.clone(), mask.clone(), positions.clone()
        slot_index = meta.slot_index.clone() if meta.slot_index is not None else None
        if slot_index is not None:
            meta.slot_index = slot_index
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(ids, mask, positions)  # warm-up: lazy inits and allocator state outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.forward(ids, mask, positions)
        self.pool = graph.pool()
        return CapturedStep(graph, ids, positions, mask, slot_index, logits)
