"""Per-request sampling parameters and the per-row token choice.

Greedy rows without a repetition penalty are chosen in one batched `argmax` (no Python loop); the other rows go
through transformers' own logits processors/warpers (same order as `generate`: repetition penalty, then
temperature, top-k, top-p) and draw with the request's own `torch.Generator`, so a seeded request gives the same
tokens alone or in any batch.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import InvalidRequest, NonFiniteLogits

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
_SEED_LIMIT = 2**63  # torch.Generator.manual_seed accepts [-2**63, 2**64); we keep it simple and non-negative.
# Bounds that keep every processed logit finite in float32 (logits are O(10..100)):
TEMPERATURE_FLOOR = 1e-5  # below it a sampled request decodes greedily (vLLM's _SAMPLING_EPS)
REPETITION_PENALTY_RANGE = (1e-2, 1e2)  # logits are multiplied or divided by it
TOP_P_FLOOR = 1e-8  # below it only the top token survives anyway


@dataclass
class SamplingParams:
    """How one request picks its tokens (TGI parameter names; validated on construction)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequest:
            return InvalidRequest(f"invalid sampling parameter: {msg}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))  # transformers' processors take floats only
        if not self.temperature > 0:
            raise bad(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise bad(f"repetition_penalty must be in [{low:g}, {high:g}], got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < _SEED_LIMIT):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or len(self.stop) > MAX_STOP_SEQUENCES:
            raise bad(f"stop must be a list of at most {MAX_STOP_SEQUENCES} strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise bad(f"each stop sequence must be a non-empty string of <= {MAX_STOP_CHARS} chars, got {s!r}")
        self.stop = list(self.stop)


class RowSampler:
    """The token choice of one request: its processors and its generator (created once per request)."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        # A temperature under the floor (or a top_p so small that one token survives) is greedy decoding:
        # dividing by it would overflow the logits to inf and the draw would fail.
        self.sampling = params.do_sample and params.temperature >= TEMPERATURE_FLOOR and params.top_p >= TOP_P_FLOOR
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if self.sampling:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.processors = processors
        # Batched argmax is only valid when nothing changes the logits and nothing is drawn.
        self.batched_greedy = not self.sampling and len(processors) == 0
        self.generator: torch.Generator | None = None
        self.seed: int | None = None
        if params.do_sample:
            self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(_SEED_LIMIT)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

    def choose(self, scores: torch.Tensor, history: torch.Tensor) -> tuple[int, float]:
        """scores: (1, V) float32 logits of this row; history: (1, n) prompt + generated ids. -> (token, logprob)."""
        scores = self.processors(history, scores)  # (1, V)
        if torch.isnan(scores).any() or not torch.isfinite(scores).any():  # nothing a draw could use
            raise NonFiniteLogits("the logits became non-finite after the repetition penalty/temperature/top-k/"
                                  "top-p processors")
        logprobs = torch.log_softmax(scores, dim=-1)  # (1, V)
        if self.sampling:
            token = torch.multinomial(logprobs.exp(), num_samples=1, generator=self.generator)  # (1, 1)
            token_id = int(token.item())
        else:
            token_id = int(torch.argmax(scores, dim=-1).item())
        return token_id, float(logprobs[0, token_id].item())


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler],
                  histories: list[torch.Tensor]) -> tuple[list[int], list[float]]:
    """Pick one token per row.

    Semantics: for b in range(B): tokens[b], logprobs[b] = samplers[b].choose(logits[b:b+1], histories[b])
    (rows whose sampler is plain greedy are done together: argmax + log_softmax over those rows at once).
    logits: (B, V) last-position logits of the batch (any float dtype; computed in float32).
    """
    logits = logits.float()
    tokens: list[int] = [0] * len(samplers)
    logprobs: list[float] = [0.0] * len(samplers)
    greedy_rows = [b for b, s in enumerate(samplers) if s.batched_greedy]
    if greedy_rows:
        sub = logits if len(greedy_rows) == len(samplers) else logits[greedy_rows]  # (G, V)
        best = torch.argmax(sub, dim=-1)  # (G,)
        best_lp = torch.log_softmax(sub, dim=-1).gather(1, best[:, None])[:, 0]  # (G,)
        # one device->host transfer for tokens and logprobs (token ids are exact in float64)
        for b, (tok, lp) in zip(greedy_rows, torch.stack((best.double(), best_lp.double()), 1).tolist()):
            tokens[b], logprobs[b] = int(tok), lp
    for b, sampler in enumerate(samplers):
        if not sampler.batched_greedy:
            tokens[b], logprobs[b] = sampler.choose(logits[b:b + 1], histories[b])
    return tokens, logprobs
