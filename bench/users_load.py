"""The load users measure with (shared by users_bench.py and profile_adapters.py).

Prompts of 24-64 common English words, request i on adapter `a{(7 * i) % K}` (so C clients in flight touch C
distinct adapters, and K > C adapters rotate through the slots), greedy, `ignore_eos`, a fixed number of new tokens.
"""
from __future__ import annotations

import random

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts of 24-64 common English words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(24, 64))) for _ in range(n)]


def adapter_for(i: int, k: int) -> str:
    """Request i's adapter name among K: a{7i mod K} (7 is coprime with the usual K = 8, 32, 1000)."""
    return f"a{(7 * i) % k}"


def phases(texts: list[str], k: int) -> dict[str, list[tuple[str, str | None]]]:
    """{"base": [(prompt, None)...], "adapters": [(prompt, adapter name)...]}."""
    return {"base": [(t, None) for t in texts], "adapters": [(t, adapter_for(i, k)) for i, t in enumerate(texts)]}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
