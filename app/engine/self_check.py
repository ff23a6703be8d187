"""Start-time self-check: a small probe served by the engine's own path, compared with transformers and PEFT.

    harness = ProbeHarness(adapter_source, observer)       # the engine's AdapterSource and observer, gated
    engine = Engine(config, harness, harness); engine.start()
    report = run_self_check(engine, harness)               # raises SelfCheckFailed; the server does not start

Semantics: six rows go through `Engine.submit` together: the base and two random probe LoRAs (ranks 4 and 8, on
every module the engine serves, made in memory with a fixed seed), each once alone in prefill with the
log-probability of every prompt position, and once in one padded prefill group with rows of other lengths; one
row is longer than the model's sliding window when the limits allow. Every row then decodes a few greedy steps
in a batch of all six. The engine's prompt log-probs, greedy tokens, their log-probs and the top-n log-probs are
compared, position by position, with a plain forward of the full sequence (no cache, no padding, eager
attention) of the same model, the LoRA rows with the probe adapter applied by PEFT.

The reference (reference_model.py) shares the engine's weights: a copy of the module tree whose parameters are
the engine's own tensors, with PEFT's LoRA layers injected into it; it runs while the engine is idle.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterSource
from .errors import BaseModelError, EngineError
from .observer import NullObserver
from .reference_model import reference_logprobs, reference_model
from .sampling import SamplingParams

PROBE_IDS = ("self-check:a", "self-check:b")  # ':' is outside the adapter id pattern: no user adapter has these ids
PROBE_RANKS = (4, 8)
PROBE_DELTA_RATIO = 0.1  # ||B·A·scaling||_F / ||W||_F per module: moves log-probs well past the tolerance
DECODE_STEPS = 4
TOP_N = 5
RESULT_TIMEOUT_S = 300.0
# Tolerance on a log-probability: 2·C·u·sqrt(L+1)·max(1, S). u: the unit roundoff of the compute dtype (eps/2;
# for LLM.int8 half the activation quantization step, 1/254); L decoder layers, whose rounding errors add in
# quadrature along the residual stream; S: the largest |logit| of the reference at that position (a relative logit
# error becomes an absolute one through S); 2: a log-softmax moves by at most twice the largest logit change.
# C: how many roundings one layer's output differs by between two paths. In fp32 the paths reassociate sums of
# K ~ 10^3 terms (padding, batching, kernels, SDPA vs eager), ~sqrt(K) = 32 roundings; in half precision the
# sums accumulate in fp32 and the two paths differ by the one rounding of each stored activation (C = 1).
# Measured on the default model (docs/design.md): fp32 5e-6 against a tolerance of 1.6e-4, bf16 0.06 against 0.32.
HEADROOM = {torch.float32: 32.0, torch.float64: 32.0}
HALF_HEADROOM = 1.0
INT8_EPS = 1.0 / 127


class SelfCheckFailed(BaseModelError):
    """The engine's output for the probe differs from transformers/PEFT, or the probe raised: refuse to serve."""


@dataclass(frozen=True)
class ProbeRow:
    name: str
    adapter_id: str | None  # None = the base
    prompt: tuple[int, ...]
    prompt_logprobs: bool  # True: prefilled alone, every prompt position compared


@dataclass
class SelfCheckReport:
    model_type: str
    dtype: str
    rows: int
    compared: int  # log-probabilities compared
    max_distance: float
    max_tolerance: float
    lora_effect: float  # largest |PEFT LoRA log-prob - base log-prob| over the probe: the check's sensitivity
    seconds: float
    notes: list[str] = field(default_factory=list)


class ProbeHarness:
    """The engine's AdapterSource and observer, with the probe adapters served and the observer muted while the
    self-check runs (its requests are not user traffic)."""

    def __init__(self, adapters: AdapterSource, observer=None):
        self.adapters = adapters
        self.observer = observer if observer is not None else NullObserver()
        self.probe_dirs: dict[str, Path] = {}

    def path_for(self, adapter_id: str) -> Path | None:
        if adapter_id in self.probe_dirs:
            return self.probe_dirs[adapter_id]
        return self.adapters.path_for(adapter_id)

    def _forward(self, name: str, *args) -> None:
        method = getattr(self.observer, name, None)  # an observer may implement only some events
        if not self.probe_dirs and method is not None:
            method(*args)

    def on_cache_event(self, tier: str, event: str, adapter_id: str) -> None:
        if adapter_id not in PROBE_IDS:
            self._forward("on_cache_event", tier, event, adapter_id)

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        self._forward("on_adapter_load", tier, seconds)

    def on_step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int) -> None:
        self._forward("on_step", running, waiting, prefill_tokens, decode_tokens)

    def on_request_done(self, stats) -> None:
        self._forward("on_request_done", stats)


def model_window(config) -> int | None:
    """The smallest attention window the config declares (sliding_window / window_size / attention_window)."""
    found = [v for k in ("sliding_window", "window_size", "attention_window")
             for v in [getattr(config, k, None)] if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(found) if found else None


def tolerance(dtype: torch.dtype, quantize: str, layers: int, scale: float) -> float:
    """The largest log-probability distance accepted at a position whose reference logits reach |scale|."""
    unit = INT8_EPS / 2 if quantize == "int8" else torch.finfo(dtype).eps / 2
    headroom = HALF_HEADROOM if quantize == "int8" else HEADROOM.get(dtype, HALF_HEADROOM)  # nf4/fp4: dequantized
    return 2.0 * headroom * unit * math.sqrt(layers + 1) * max(1.0, scale)


def run_self_check(engine, harness: ProbeHarness, seed: int = 0) -> SelfCheckReport:
    """Serve the probe through `engine` (started, idle) and compare it with transformers/PEFT. Raises
    SelfCheckFailed naming the model type, the probe row, the step and the distance."""
    started = time.perf_counter()
    model_type = str(getattr(engine.model.config, "model_type", type(engine.model).__name__))
    tmp = Path(tempfile.mkdtemp(prefix="olora-self-check-"))
    try:
        adapters = _write_probe_adapters(engine, tmp, seed)
        harness.probe_dirs = {pid: tmp / pid.replace(":", "-") for pid in PROBE_IDS}
        rows, notes = _probe_rows(engine, seed)
        outputs = _serve(engine, rows, model_type)
        report = _compare(engine, rows, outputs, adapters, model_type)
    finally:
        for pid in PROBE_IDS:
            engine.invalidate(pid)
        harness.probe_dirs = {}
        shutil.rmtree(tmp, ignore_errors=True)
    report.notes += notes
    report.seconds = time.perf_counter() - started
    return report


# ---- probe adapters and rows -----------------------------------------------------------------------------------
def _write_probe_adapters(engine, root: Path, seed: int) -> dict[str, dict]:
    """Two random PEFT LoRA directories on every served module; returns per probe id its PEFT config and
    state dict (module name -> (A (r, in), B (out, r)), fp32) for the reference."""
    from safetensors.torch import save_file

    targets = dict(engine.parser.targets)  # module name -> (in, out)
    norms = dict(engine.parser.base_norms or {})
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for pid, rank in zip(PROBE_IDS, PROBE_RANKS):
        rank = min(rank, int(engine.config.max_rank))
        tensors, weights = {}, {}
        for name, (n_in, n_out) in sorted(targets.items()):
            a = torch.randn(rank, n_in, generator=gen) / math.sqrt(n_in)  # (r, in)
            b = torch.randn(n_out, rank, generator=gen) / math.sqrt(rank)  # (out, r)
            target = PROBE_DELTA_RATIO * norms.get(name, math.sqrt(n_in * n_out) / math.sqrt(n_in))
            b *= target / float((b @ a).norm())  # scaling = lora_alpha / r = 1
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
            weights[name] = (a, b)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                  "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                  "init_lora_weights": True, "fan_in_fan_out": False, "base_model_name_or_path": None}
        folder = root / pid.replace(":", "-")
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        save_file(tensors, str(folder / WEIGHTS_FILE))
        out[pid] = {"config": config, "weights": weights}
    return out


def decode_steps(config) -> int:
    """Greedy tokens per probe row: DECODE_STEPS, fewer when max_total_tokens leaves no room."""
    return max(1, min(DECODE_STEPS, config.max_total_tokens - 2))


def _probe_rows(engine, seed: int) -> tuple[list[ProbeRow], list[str]]:
    cfg = engine.config
    steps = decode_steps(cfg)
    vocab = min(int(engine.model.config.vocab_size), len(engine.tokenizer))
    gen = torch.Generator().manual_seed(seed + 1)
    longest = max(1, min(cfg.max_input_tokens, cfg.max_total_tokens - steps, cfg.max_batch_tokens))
    window = model_window(engine.model.config)
    notes = []
    if window is None:
        long_len = min(longest, 48)
    else:
        long_len = min(longest, window + 8)
        if long_len + steps <= window:
            notes.append(f"no probe row passes the attention window {window}: max_total_tokens/max_input_tokens "
                         f"allow {long_len + steps} tokens")
    lengths = {"alone-short": 3, "alone-mid": 11, "alone-long": long_len, "group-21": 21, "group-23": 23,
               "group-25": 25}  # 3·25 <= 1.2·(21+23+25): one padded prefill group (engine's padding rule)
    adapters = {"alone-short": None, "alone-mid": PROBE_IDS[1], "alone-long": PROBE_IDS[0],
                "group-21": PROBE_IDS[0], "group-23": None, "group-25": PROBE_IDS[1]}
    rows = []
    for name, n in lengths.items():
        n = min(n, longest)
        prompt = tuple(int(t) for t in torch.randint(0, vocab, (n,), generator=gen))
        rows.append(ProbeRow(name, adapters[name], prompt, prompt_logprobs=name.startswith("alone")))
    return rows, notes


def _label(row: ProbeRow) -> str:
    adapter = "base" if row.adapter_id is None else f"probe LoRA {row.adapter_id}"
    return f"probe row {row.name!r} ({adapter}, {len(row.prompt)} prompt tokens)"


def _serve(engine, rows: list[ProbeRow], model_type: str) -> list:
    """Warm the probe adapters (so that all rows are admitted together), then submit the rows at once (in waves
    of max_waiting when the queue is shorter than the probe)."""
    current = None
    steps = decode_steps(engine.config)
    wave = max(1, min(len(rows), engine.config.max_waiting))
    try:
        for pid in PROBE_IDS:
            current = f"the warm-up request of probe LoRA {pid}"
            engine.submit(list(rows[0].prompt[:1]), pid, SamplingParams(max_new_tokens=1)).result(RESULT_TIMEOUT_S)
        results = []
        for start in range(0, len(rows), wave):
            handles = []
            for row in rows[start:start + wave]:
                current = _label(row)
                params = SamplingParams(max_new_tokens=steps, ignore_eos=True, top_n_tokens=TOP_N,
                                        prompt_logprobs=row.prompt_logprobs)
                handles.append(engine.submit(list(row.prompt), row.adapter_id, params))
            for row, handle in zip(rows[start:start + wave], handles):
                current = _label(row)
                results.append(handle.result(RESULT_TIMEOUT_S))
        return results
    except (EngineError, TimeoutError, RuntimeError, ValueError) as exc:
        raise SelfCheckFailed(f"self-check of model type {model_type!r}: {current} raised in the engine: "
                              f"{type(exc).__name__}: {exc}") from exc


@dataclass
class _Distance:
    worst: float = 0.0
    worst_tol: float = 0.0
    compared: int = 0
    misses: list[tuple[tuple, str]] = field(default_factory=list)  # (order key, description)


def _compare(engine, rows: list[ProbeRow], outputs: list, adapters: dict, model_type: str) -> SelfCheckReport:
    quantize = engine.base.quantization.kind if engine.base.quantization is not None else "none"
    layers = int(getattr(engine.model.config, "num_hidden_layers", 1) or 1)
    dist = _Distance()
    lora_effect = 0.0
    try:
        peft_model = reference_model(engine.model, engine.parser.targets,
                                     {pid: (p["config"], p["weights"]) for pid, p in adapters.items()})
    except Exception as exc:  # the check cannot vouch for a model PEFT cannot wrap: refuse, say how to skip
        raise SelfCheckFailed(f"self-check of model type {model_type!r}: cannot build the transformers + PEFT "
                              f"reference ({type(exc).__name__}: {exc}); OLORA_SELF_CHECK=off skips the check") from exc
    try:
        with torch.inference_mode():
            for row, out in zip(rows, outputs):
                ids = list(row.prompt) + out.token_ids[:-1]  # the last token's successor is never compared
                ref, scale = reference_logprobs(peft_model, ids, row.adapter_id)
                tols = [tolerance(engine.dtype, quantize, layers, float(s)) for s in scale]
                _check_row(row, out, ref, tols, dist, model_type, decode_steps(engine.config))
                if row.adapter_id is not None:
                    base, _ = reference_logprobs(peft_model, ids, None)
                    lora_effect = max(lora_effect, float((ref - base).abs().amax()))
    finally:
        del peft_model
    _raise_first_miss(dist, model_type, engine.dtype)
    notes = []
    if lora_effect < 3 * dist.worst_tol:
        notes.append(f"the probe LoRA moves log-probs by {lora_effect:.3g} only (tolerance {dist.worst_tol:.3g}): "
                     "LoRA rows are weakly checked on this model")
    return SelfCheckReport(model_type=model_type, dtype=str(engine.dtype).replace("torch.", ""), rows=len(rows),
                           compared=dist.compared, max_distance=dist.worst, max_tolerance=dist.worst_tol,
                           lora_effect=lora_effect, seconds=0.0, notes=notes)


def _check_row(row: ProbeRow, out, ref: torch.Tensor, tols: list[float], dist: _Distance, model_type: str,
               steps: int) -> None:
    """Compare one row's engine outputs with the reference log-probs `ref` (T, V); misses go to `dist`."""
    n = len(row.prompt)
    if row.prompt_logprobs and n > 1:
        if out.prompt_logprobs is None or len(out.prompt_logprobs) != n - 1:
            got = None if out.prompt_logprobs is None else len(out.prompt_logprobs)
            raise SelfCheckFailed(f"self-check of model type {model_type!r}: {_label(row)}: the engine returned "
                                  f"{got} prompt log-probs, expected {n - 1}")
        for i, lp in enumerate(out.prompt_logprobs):
            _logprob(row, (0, i + 1), f"prefill position {i + 1}", ref[i], row.prompt[i + 1], lp, tols[i], dist)
    if len(out.tokens) != steps:
        raise SelfCheckFailed(f"self-check of model type {model_type!r}: {_label(row)}: the engine generated "
                              f"{len(out.tokens)} tokens, expected {steps} (finish: {out.finish_reason})")
    for k, event in enumerate(out.tokens):
        where, pos = "first token (prefill)" if k == 0 else f"decode step {k}", n - 1 + k
        _logprob(row, (1, k), where, ref[pos], event.token_id, event.logprob, tols[pos], dist)
        gap = float(ref[pos].max() - ref[pos, event.token_id])  # greedy: the engine's token is the argmax
        _record(row, (1, k), where + " (greedy choice)", gap, tols[pos], dist,
                f"token {event.token_id} is {gap:.3g} below the reference's best token {int(ref[pos].argmax())}")
        for token, lp in event.top_tokens:
            _logprob(row, (1, k), f"{where} (top-{TOP_N} token {token})", ref[pos], token, lp, tols[pos], dist)


def _logprob(row: ProbeRow, order: tuple, where: str, ref: torch.Tensor, token: int, engine_lp: float | None,
             tol: float, dist: _Distance) -> None:
    want = float(ref[token])
    got = float("-inf") if engine_lp is None else float(engine_lp)
    distance = abs(got - want) if math.isfinite(got) else math.inf
    _record(row, order, where, distance, tol, dist, f"engine log-prob {got:.6g} vs reference {want:.6g}")


def _record(row: ProbeRow, order: tuple, where: str, distance: float, tol: float, dist: _Distance,
            detail: str) -> None:
    dist.compared += 1
    dist.worst = max(dist.worst, distance)
    dist.worst_tol = max(dist.worst_tol, tol)
    if not distance <= tol:
        reference = "transformers" if row.adapter_id is None else "transformers + PEFT"
        dist.misses.append((order, f"{_label(row)} at {where}: {detail}; distance {distance:.3g} > tolerance "
                                   f"{tol:.3g} against {reference}"))


def _raise_first_miss(dist: _Distance, model_type: str, dtype: torch.dtype) -> None:
    """The earliest miss (prefill before decode, earlier steps first) names where the path goes wrong."""
    if not dist.misses:
        return
    first = min(dist.misses, key=lambda miss: miss[0])[1]
    raise SelfCheckFailed(
        f"self-check failed for model type {model_type!r} ({str(dtype).replace('torch.', '')}): {first} "
        f"({len(dist.misses)} of {dist.compared} log-probs out of tolerance, largest distance {dist.worst:.3g}). "
        "The engine's path does not compute this model correctly; refusing to serve it (OLORA_SELF_CHECK=off "
        "skips this check)")
