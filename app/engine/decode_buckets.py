"""Fixed shape buckets for the decode step, so each bucket's forward has static shapes (what CUDA graphs need).

A decode batch of B rows whose longest row has L cached tokens + 1 runs as `batch_bucket(B)` rows (padded rows
feed token 0 at position 0 with slot 0 into the free KV rows B..B'-1, and their logits are dropped) over
`kv_bucket(L)` key positions (the positions past each row's own are masked, as in the unbucketed step). Every
bucketed step carries the additive mask, even when all rows have the same length: one graph shape per bucket.

Semantics: for b in range(B): logits[b] = decode_unpadded(...)[b]   (padded rows and masked keys add nothing)
"""
from __future__ import annotations

KV_BUCKET_STEP = 128  # key positions are padded to a multiple of this (12 buckets at max_total_tokens 1536)


def batch_bucket(rows: int, max_batch: int) -> int:
    """Padded batch size: the next power of two >= rows, at most max_batch (1, 2, 4, 8, 16, ... max_batch)."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return min(bucket, max_batch)


def kv_bucket(length: int, max_tokens: int) -> int:
    """Padded key length: the next multiple of KV_BUCKET_STEP >= length, at most max_tokens."""
    return min(-(-length // KV_BUCKET_STEP) * KV_BUCKET_STEP, max_tokens)


def pad_rows(tokens: list[int], positions: list[int], slots: list[int], rows: int):
    """The decode inputs padded to `rows` rows (token 0, position 0, slot 0: no adapter)."""
    pad = rows - len(tokens)
    return tokens + [0] * pad, positions + [0] * pad, slots + [0] * pad
