"""Per-request sampling parameters and the per-row token choice.

Greedy rows without a penalty or top-n request are chosen in one batched `argmax` (no Python loop); the other rows
go through transformers' own logits processors/warpers (same order as `generate`: repetition penalty, then
temperature, top-k, top-p, typical-p), with OpenAI's frequency/presence penalty before the warpers, and draw with
the request's own `torch.Generator`, so a seeded request gives the same tokens alone or in any batch.
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
    TypicalLogitsWarper,
)

from .errors import InvalidRequest, NonFiniteLogits

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
MAX_TOP_N_TOKENS = 20  # OpenAI's top_logprobs limit; TGI's top_n_tokens and LoRAX's return_k_alternatives too
MAX_PENALTY = 2.0  # OpenAI's range for frequency/presence penalties: [-2, 2]
TopTokens = tuple[tuple[int, float], ...]  # (token id, logprob) pairs, most likely first
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
    typical_p: float = 1.0  # 1.0 = disabled
    frequency_penalty: float = 0.0  # OpenAI's: logit -= penalty * count of the token among generated ones
    presence_penalty: float = 0.0  # OpenAI's: logit -= penalty if the token was generated already
    top_n_tokens: int = 0  # also report the n most likely tokens of each step's distribution
    prompt_logprobs: bool = False  # also report the log-probability of every prompt token but the first

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequest:
            return InvalidRequest(f"invalid sampling parameter: {msg}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "typical_p", "frequency_penalty",
                     "presence_penalty"):
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
        if not 0 < self.typical_p <= 1:
            raise bad(f"typical_p must be in (0, 1], got {self.typical_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise bad(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        if (isinstance(self.top_n_tokens, bool) or not isinstance(self.top_n_tokens, int)
                or not 0 <= self.top_n_tokens <= MAX_TOP_N_TOKENS):
            raise bad(f"top_n_tokens must be an integer in [0, {MAX_TOP_N_TOKENS}], got {self.top_n_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < _SEED_LIMIT):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or len(self.stop) > MAX_STOP_SEQUENCES:
            raise bad(f"stop must be a list of at most {MAX_STOP_SEQUENCES} strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise bad(f"each stop sequence must be a non-empty string of <= {MAX_STOP_CHARS} chars, got {s!r}")
        self.stop = list(self.stop)


class OpenAIPenaltyLogitsProcessor:
    """OpenAI's frequency and presence penalties over the tokens generated so far (not the prompt), as vLLM does.

    Semantics: for each token j: scores[j] -= frequency * count(j in generated) + presence * (count > 0)
    """

    def __init__(self, frequency: float, presence: float, prompt_len: int):
        self.frequency = frequency
        self.presence = presence
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len:]  # (1, g)
        counts = torch.zeros_like(scores)  # (1, V)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class RowSampler:
    """The token choice of one request: its processors and its generator (created once per request)."""

    def __init__(self, params: SamplingParams, device: torch.device, prompt_len: int = 0):
        self.params = params
        # A temperature under the floor (or a top_p so small that one token survives) is greedy decoding:
        # dividing by it would overflow the logits to inf and the draw would fail.
        self.sampling = params.do_sample and params.temperature >= TEMPERATURE_FLOOR and params.top_p >= TOP_P_FLOOR
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.frequency_penalty or params.presence_penalty:
            processors.append(OpenAIPenaltyLogitsProcessor(params.frequency_penalty, params.presence_penalty,
                                                           prompt_len))
        if self.sampling:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            if params.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(params.typical_p))
        self.processors = processors
        # processors that read the token history (the others only look at the scores)
        self.needs_history = params.repetition_penalty != 1.0 or bool(params.frequency_penalty
                                                                       or params.presence_penalty)
        # Batched argmax is only valid when nothing changes the logits, nothing is drawn and no top-n is asked.
        self.batched_greedy = not self.sampling and len(processors) == 0 and params.top_n_tokens == 0
        self.generator: torch.Generator | None = None
        self.seed: int | None = None
        if params.do_sample:
            self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(_SEED_LIMIT)
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

    def choose(self, scores: torch.Tensor, history: torch.Tensor | None) -> tuple[int, float, TopTokens]:
        """scores: (1, V) float32 logits of this row; history: (1, n) prompt + generated ids (None when no
        processor reads it). -> (token, logprob, top-n (id, logprob) pairs of the same distribution)."""
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
        top: TopTokens = ()
        if self.params.top_n_tokens:
            values, ids = torch.topk(logprobs[0], self.params.top_n_tokens)  # (n,), (n,)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return token_id, float(logprobs[0, token_id].item()), top


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler],
                  histories: list[torch.Tensor | None]) -> tuple[list[int], list[float], list[TopTokens]]:
    """Pick one token per row.

    Semantics: for b in range(B): tokens[b], logprobs[b], tops[b] = samplers[b].choose(logits[b:b+1], histories[b])
    (rows whose sampler is plain greedy are done together: argmax + log_softmax over those rows at once).
    logits: (B, V) last-position logits of the batch (any float dtype; computed in float32).
    """
    logits = logits.float()
    tokens: list[int] = [0] * len(samplers)
    logprobs: list[float] = [0.0] * len(samplers)
    tops: list[TopTokens] = [()] * len(samplers)
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
            tokens[b], logprobs[b], tops[b] = sampler.choose(logits[b:b + 1], histories[b])
    return tokens, logprobs, tops


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int]) -> list[float]:
    """Log-probability of each prompt token after the first under the model's raw distribution (TGI's prefill
    details). logits: (T, V) logits of the prompt positions of one row. Returns T - 1 floats.

    Semantics: for t in 1..T-1: out[t-1] = log_softmax(logits[t-1])[prompt_ids[t]]
    """
    if len(prompt_ids) < 2:
        return []
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)  # (T-1,)
    lp = torch.log_softmax(logits[:len(prompt_ids) - 1].float(), dim=-1)  # (T-1, V)
    return lp.gather(1, targets[:, None])[:, 0].tolist()
