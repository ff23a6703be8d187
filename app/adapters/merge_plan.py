"""Bounds of a merge, checked before any source is loaded: how many sources, duplicates, the merged rank.

A merge's cost grows with its sources (each is read into memory, the result is computed, written and checked),
so both merge paths (POST /adapters/merge and a request's `merged_adapters`) run `plan_merge` first, on the
store's metadata only (ids and the rank recorded at commit):
  1. duplicate ids are combined into one source with the sum of their weights where the method is linear in
     each source's delta (`cat`, `svd`: the result only depends on Σ w_i·ΔW_i, so this is exact); methods that
     treat each source as a separate task (`linear` on A and B, TIES/DARE elections, magnitude pruning) would
     give another result, so a repeated id is refused there;
  2. at most `max_sources` distinct sources;
  3. the merged adapter's rank (`cat`: the sum; `svd*`: svd_rank or the largest; the others: the largest) must
     fit the engine's `max_rank`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from olora_core.errors import MergeError

DELTA_LINEAR_METHODS = ("cat", "svd")  # the merged delta is exactly Σ w_i·ΔW_i (before any truncation)


@dataclass(frozen=True)
class MergeLimits:
    max_sources: int  # distinct sources of one merge (the `max_merge_sources` setting)
    max_rank: int  # the engine's slot rank


def combine_duplicates(sources: list[tuple[str, float]], method: str) -> list[tuple[str, float]]:
    """One (id, weight) per id, first-seen order; a repeated id's weights are summed (delta-linear methods)."""
    combined: dict[str, float] = {}
    for adapter_id, weight in sources:
        if adapter_id in combined and method not in DELTA_LINEAR_METHODS:
            raise MergeError(f"adapter {adapter_id!r} is listed twice; method {method!r} treats each source as a "
                             f"separate adapter (only {', '.join(DELTA_LINEAR_METHODS)} combine repeats)")
        combined[adapter_id] = combined.get(adapter_id, 0.0) + float(weight)
    return list(combined.items())


def merged_rank(method: str, ranks: list[int], svd_rank: int | None) -> int:
    """The rank of the merged adapter (olora_core.merge's rule, from the ranks recorded in the store)."""
    if method == "cat":
        return sum(ranks)
    if method.endswith("svd"):
        return svd_rank or max(ranks)
    return max(ranks)


def plan_merge(sources: list[tuple[str, float]], method: str, svd_rank: int | None, limits: MergeLimits,
               rank_of: Callable[[str], int]) -> list[tuple[str, float]]:
    """The sources to load (duplicates combined), after the count and rank checks; `rank_of(id)` reads the
    store's metadata (and raises for an unknown id). Raises MergeError (422) naming the bound."""
    if len(sources) > limits.max_sources:  # before anything else: even combining is bounded work
        raise MergeError(f"a merge takes at most {limits.max_sources} sources (max_merge_sources), "
                         f"got {len(sources)}")
    combined = combine_duplicates(sources, method)
    rank = merged_rank(method, [rank_of(adapter_id) for adapter_id, _ in combined], svd_rank)
    if rank > limits.max_rank:
        raise MergeError(f"the merged adapter would have rank {rank} (method {method!r}), above max_rank "
                         f"{limits.max_rank}; merge fewer or lower-rank adapters, or use an svd method with a "
                         "smaller svd_rank")
    return combined
