"""Per-request sampling parameters and the per-row token choice.

Greedy rows without a penalty or top-n request are chosen in one batched `argmax` (no Python loop); the other rows
go through transformers' own logits processors/warpers (same order as `generate`: repetition penalty, then
temperature, top-k, top-p, typical-p), with OpenAI's frequency/presence penalty before the warpers, and draw with
the request's own `torch.Generator`, so a seeded request gives the same tokens alone or in any batch. Nothing
here reads a tensor back until the end of `choose_tokens`: one transfer per step (tokens, logprobs, top-n, flags).
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

from .errors import InvalidRequest
from .faults import finite_rows

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
MAX_TOP_N_TOKENS = 20  # OpenAI's top_logprobs limit; TGI's top_n_tokens and LoRAX's return_k_alternatives too
MAX_PENALTY = 2.0  # OpenAI's range for frequency/presence penalties: [-2, 2]
TopTokens = tuple[tuple[int, float], ...]  # (token id, finite logprob) pairs, most likely first
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

    def choose(self, scores: torch.Tensor, history: torch.Tensor | None) -> RowChoice:
        """scores: (1, V) float32 finite logits of this row; history: (1, n) prompt + generated ids (None when no
        processor reads it). Everything stays on the device (no host sync): the caller reads all rows at once."""
        scores = self.processors(history, scores)  # (1, V)
        usable = ~torch.isnan(scores).any() & torch.isfinite(scores).any()  # () bool: something a draw can use
        scores = torch.where(usable, scores, torch.zeros_like(scores))  # an unusable row's draw is discarded
        logprobs = torch.log_softmax(scores, dim=-1)[0]  # (V,)
        if self.sampling:
            token = torch.multinomial(logprobs.exp(), num_samples=1, generator=self.generator)[0]  # ()
        else:
            token = torch.argmax(logprobs)  # () same argmax as the scores
        top = torch.topk(logprobs, self.params.top_n_tokens) if self.params.top_n_tokens else None
        return RowChoice(token, logprobs[token], usable, top)


@dataclass
class RowChoice:
    """One row's choice, still on the device: token (), logprob (), usable () bool, top-n (values, ids) or None."""

    token: torch.Tensor
    logprob: torch.Tensor
    usable: torch.Tensor
    top: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Choices:
    """The host copy of a step's choices, per row. fault: None, "logits" (the model's logits were NaN/Inf or past
    faults.LOGIT_BOUND) or "processors" (the penalty/temperature/top-k/top-p processors left nothing finite)."""

    tokens: list[int]
    logprobs: list[float]
    tops: list[TopTokens]
    faults: list[str | None]


def choose_tokens(logits: torch.Tensor, samplers: list[RowSampler],
                  histories: list[torch.Tensor | None]) -> Choices:
    """Pick one token per row, with one device->host transfer for the whole step.

    Semantics: for b in range(B):
        if not finite_rows(logits)[b]: faults[b] = "logits"        # the row is ended; nothing is sampled from it
        else: tokens[b], logprobs[b], tops[b] = samplers[b].choose(logits[b:b+1], histories[b])
    Rows whose sampler is plain greedy are done together (argmax + log_softmax over those rows at once); every
    result (tokens, logprobs, top-n, finite flags) is written into one (B, 4 + 2n) float64 tensor on the device and
    read back with a single `tolist()` (token ids are exact in float64).
    logits: (B, V) last-position logits of the batch (any float dtype; computed in float32).
    """
    logits = logits.float()  # (B, V)
    batch = len(samplers)
    finite = finite_rows(logits)  # (B,) bool
    safe = torch.where(finite[:, None], logits, torch.zeros_like(logits))  # samplers never see a non-finite value
    n_top = max(s.params.top_n_tokens for s in samplers)
    # columns: token, logprob, finite, usable, top ids (n_top), top logprobs (n_top)
    packed = torch.zeros(batch, 4 + 2 * n_top, dtype=torch.float64, device=logits.device)  # (B, 4 + 2n)
    packed[:, 2] = finite.double()
    packed[:, 3] = 1.0
    greedy_rows = [b for b, s in enumerate(samplers) if s.batched_greedy]
    if greedy_rows:
        every = len(greedy_rows) == batch
        sub = safe if every else safe[greedy_rows]  # (G, V)
        best = torch.argmax(sub, dim=-1)  # (G,)
        best_lp = torch.log_softmax(sub, dim=-1).gather(1, best[:, None])[:, 0]  # (G,)
        target = slice(None) if every else torch.tensor(greedy_rows, device=logits.device)
        packed[target, 0] = best.double()
        packed[target, 1] = best_lp.double()
    for b, sampler in enumerate(samplers):
        if sampler.batched_greedy:
            continue
        choice = sampler.choose(safe[b:b + 1], histories[b])
        packed[b, 0], packed[b, 1], packed[b, 3] = choice.token, choice.logprob, choice.usable
        if choice.top is not None:
            values, ids = choice.top  # (n,), (n,)
            n = values.shape[0]
            packed[b, 4:4 + n], packed[b, 4 + n_top:4 + n_top + n] = ids.double(), values.double()
    host = packed.tolist()  # the step's one device -> host transfer
    out = Choices([], [], [], [])
    for row, sampler in zip(host, samplers):
        n = sampler.params.top_n_tokens
        out.tokens.append(int(row[0]))
        out.logprobs.append(row[1])
        out.tops.append(drawable_top(row[4:4 + n], row[4 + n_top:4 + n_top + n]))
        out.faults.append(None if row[2] and row[3] else "logits" if not row[2] else "processors")
    return out


def drawable_top(ids: list[float], logprobs: list[float]) -> TopTokens:
    """The top-n (id, logprob) pairs of the distribution a token was drawn from, without the tokens that
    distribution cannot produce: after top-k/top-p/typical-p masking their logprob is -inf (probability 0),
    which is neither an alternative nor a JSON number. So fewer than n pairs come back when fewer than n tokens
    survived the masking (OpenAI's top_logprobs and TGI's top_tokens allow fewer)."""
    return tuple((int(i), lp) for i, lp in zip(ids, logprobs) if math.isfinite(lp))


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int]) -> list[float | None]:
    """Log-probability of each prompt token after the first under the model's raw distribution (TGI's prefill
    details). logits: (T, V) logits of the prompt positions of one row. Returns T - 1 floats.

    Semantics: for t in 1..T-1: out[t-1] = log_softmax(logits[t-1])[prompt_ids[t]]  (None if not finite)
    """
    if len(prompt_ids) < 2:
        return []
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)  # (T-1,)
    lp = torch.log_softmax(logits[:len(prompt_ids) - 1].float(), dim=-1)  # (T-1, V)
    return [v if math.isfinite(v) else None for v in lp.gather(1, targets[:, None])[:, 0].tolist()]
