"""The served = transformers / PEFT check of one model family (tests/test_model_families*.py).

For a family: save its tiny checkpoint and three adapters made by the real PEFT (a plain LoRA on the family's
attention projections, an all-linear LoRA, and the OLoRA quick-start adapter trained one step's worth of noise and
converted to plain LoRA with `olora convert`), start an in-process Engine (fp32, CPU), and run requests of a long
row (longer than any window), a medium and a short one, each with its adapter or the base:

* mixed: all requests submitted together (shared decode steps, padded prefill groups);
* alone: each request by itself.

Every request asks for prompt log-probabilities (TGI's decoder_input_details) and decodes greedily; its tokens
must equal transformers/PEFT's greedy tokens and every log-probability (prompt and generated) must be within TOL.

Before those requests, the engine runs the server's start-time self-check (app/engine/self_check.py), as the
server would: it must pass on every served family (its reference is a weight-sharing copy of the engine's model
with PEFT injected; the requests below compare with a fresh model loaded from disk).
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import save_random_lora
from model_families import Family
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, SamplingParams
from app.engine.errors import AdapterRejected, BaseModelError
from app.engine.lora_layers import MultiLoRALinear, find_target_modules
from app.engine.observer import EngineObserver
from app.engine.self_check import ProbeHarness, run_self_check
from olora_core.convert import convert
from olora_core.olora_init import apply_olora

# fp32 log-probabilities of the engine vs transformers: the two run the same ops on the same weights but with
# different batch shapes (padding, other rows, row-wise LoRA bmm vs PEFT's per-adapter matmuls), so only the
# summation order differs. Each dot product of length K <= 256 carries a relative error <= K * eps32 (1.2e-7)
# ~ 3e-5 in the worst case and ~ sqrt(K) * eps32 ~ 2e-6 typically; over 2 layers and a log-softmax of logits of
# magnitude ~ 1 this stays ~ 1e-5. 1e-4 leaves a 10x margin, and is far below any real mistake (a wrong window,
# mask or adapter row moves log-probs by >= 1e-2 on these models).
TOL = 1e-4
NEW_TOKENS = 5
MAX_TOTAL = 64
# (prompt length, adapter, prompt log-probabilities asked): long rows (longer than the tiny models' window of 8),
# medium and short ones. In the mixed batch a request asking for prompt log-probabilities is prefilled alone; the
# others are prefilled in padded groups of near-equal lengths (36+38, 11+12: engine._padding_groups).
REQUESTS = [(40, "olora", True), (38, None, False), (36, "plain", False), (12, "plain", False),
            (11, "all-linear", False), (5, None, True), (3, "olora", False)]


_MLP_KINDS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


@dataclass
class FamilyFiles:
    base: str
    adapters: Path


def save_olora(family: Family, base: str, out: Path, seed: int = 5) -> None:
    """The OLoRA quick start (PEFT's example: r=8 on the attention projections), 'trained' by a random step on
    A and B, then converted to a plain LoRA of the original base with `olora convert`."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = apply_olora(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(family.plain_targets)))
    peft_model.save_pretrained(str(out / "olora-initial"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(out / "olora-trained"))
    convert(out / "olora-initial", out / "olora-trained", out / "adapters" / "olora")


def linear_modules(base: str) -> tuple[str, ...]:
    """The full names of every Linear/Conv1D module of the decoder blocks (full names: a kind such as down_proj
    would also make PEFT target the MoE experts' fused parameters of that name)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # PEFT rewrites MLP kinds of MoE models into the experts' target_parameters (even for a dense layer's MLP)
    return tuple(n for n in find_target_modules(model, None) if n.rsplit(".", 1)[-1] not in _MLP_KINDS)


def save_family(family: Family, root: Path) -> FamilyFiles:
    """The checkpoint and its adapters: plain, all-linear, olora (and for MoE families PEFT's own all-linear,
    which also targets the fused expert weights, as all-linear-experts: refused by the engine)."""
    base = family.save(root / "base")
    adapters = root / "adapters"
    save_random_lora(base, adapters / "plain", r=4, targets=family.plain_targets, seed=1)
    all_linear = linear_modules(base) if family.expert_parameters else "all-linear"
    save_random_lora(base, adapters / "all-linear", r=8, targets=all_linear, seed=2, a_std=0.05, b_std=0.05)
    if family.expert_parameters:
        save_random_lora(base, adapters / "all-linear-experts", r=8, targets="all-linear", seed=2)
    save_olora(family, base, root)
    return FamilyFiles(base, adapters)


def start_engine(files: FamilyFiles, max_total: int = MAX_TOTAL, self_check: bool = False, **overrides) -> Engine:
    """A started engine over the family's files, its adapter source and observer wrapped by the self-check's
    ProbeHarness as in the server; `self_check`: run the start-time self-check first (SelfCheckFailed propagates)."""
    config = dict(model=files.base, dtype="fp32", device="cpu", max_loras=3, max_rank=16, max_batch_size=8,
                  max_input_tokens=max_total - NEW_TOKENS, max_total_tokens=max_total, max_batch_tokens=8 * max_total)
    harness = ProbeHarness(DirectoryAdapterSource(files.adapters))
    engine = Engine(EngineConfig(**{**config, **overrides}), harness, harness)
    engine.start()
    if self_check:
        before = model_tensors(engine.model)
        try:
            report = run_self_check(engine, harness)
        except BaseException:
            engine.shutdown()
            raise
        # no note: a probe row passes the window (MAX_TOTAL > WINDOW) and the probe LoRAs move log-probs by more
        # than 3x the tolerance, so the check is sensitive on this family
        assert report.compared > 0 and not report.notes, report
        # the reference shares the engine's tensors: undoing the engine's overrides on it must not write them
        after = model_tensors(engine.model)
        changed = [name for name in before if not torch.equal(before[name], after[name])]
        assert after.keys() == before.keys() and not changed, f"the self-check changed the engine's {changed}"
    return engine


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's parameters and buffers, except the LoRA slot buffers (which the probe fills)."""
    tensors = {name: p.detach().clone() for name, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        if not isinstance(module, MultiLoRALinear):
            tensors.update({f"{prefix}.{name}".lstrip("."): b.clone()
                            for name, b in module.named_buffers(recurse=False)})
    return tensors


def prompt_of(length: int, salt: int) -> list[int]:
    gen = torch.Generator().manual_seed(1000 + 31 * length + salt)
    return torch.randint(0, 256, (length,), generator=gen).tolist()


class _HoldAfterStep(EngineObserver):
    """Holds the engine loop after its first step until released (so requests submitted meanwhile are admitted
    together by the next step)."""

    def __init__(self):
        self.held, self.release = threading.Event(), threading.Event()

    def on_cache_event(self, tier, event, adapter_id):
        pass

    def on_adapter_load(self, tier, seconds):
        pass

    def on_request_done(self, stats):
        pass

    def on_step(self, running, waiting, prefill_tokens, decode_tokens):
        self.held.set()
        self.release.wait(timeout=30)


def run_requests(engine: Engine, requests: list[tuple[list[int], str | None]],
                 prompt_logprobs: list[bool] | None = None, together: bool = False) -> list[list]:
    """Submit the requests; their token events (greedy; prompt log-probabilities asked unless `prompt_logprobs`
    says otherwise per request). `together`: the loop is held while they are submitted, so one step admits all of
    them (their adapters must already be in device slots) next to a running base row."""
    asks = prompt_logprobs or [True] * len(requests)
    gate, previous = _HoldAfterStep(), engine.observer.inner
    if together:
        engine.observer.inner = gate
        engine.submit(prompt_of(7, 99), None, SamplingParams(max_new_tokens=NEW_TOKENS + 3, ignore_eos=True))
        assert gate.held.wait(timeout=30), "the engine did not run its first step"
    try:
        handles = [engine.submit(prompt, adapter, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                                                prompt_logprobs=ask))
                   for (prompt, adapter), ask in zip(requests, asks)]
    finally:
        engine.observer.inner = previous
        gate.release.set()

    async def events(handle):
        return [event async for event in handle]

    async def every():
        return await asyncio.gather(*(events(h) for h in handles))

    return asyncio.run(every())


class References:
    """transformers (base) and PEFT (one adapter at a time) log-probabilities of a token sequence."""

    def __init__(self, files: FamilyFiles):
        self.files = files
        self.models: dict[str | None, torch.nn.Module] = {}

    def model(self, adapter: str | None) -> torch.nn.Module:
        if adapter not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.files.base, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(self.files.adapters / adapter))
            self.models[adapter] = model.eval()
        return self.models[adapter]

    @torch.no_grad()
    def logprobs(self, tokens: list[int], adapter: str | None) -> torch.Tensor:
        """(len(tokens) - 1 + 1, V): log-softmax of the next-token logits at every position."""
        logits = self.model(adapter)(torch.tensor([tokens])).logits[0].float()  # (T, V)
        return torch.log_softmax(logits, dim=-1)


def check_request(refs: References, prompt: list[int], adapter: str | None, events: list, where: str,
                  prompt_logprobs: bool = True) -> None:
    generated = [e.token_id for e in events]
    assert len(generated) == NEW_TOKENS, where
    logprobs = refs.logprobs(prompt + generated[:-1], adapter)  # (T + n - 1, V)
    n = len(prompt)
    expected_tokens = logprobs[n - 1:].argmax(-1).tolist()
    # the greedy choice at each step given the engine's own previous tokens: equal tokens, step by step
    assert generated == expected_tokens, f"{where}: tokens {generated} != transformers/PEFT {expected_tokens}"
    served = torch.tensor([e.logprob for e in events])
    want = logprobs[n - 1:].gather(1, torch.tensor(generated)[:, None])[:, 0]
    assert torch.allclose(served, want, atol=TOL, rtol=0), f"{where}: logprobs {(served - want).abs().max():.2e}"
    if not prompt_logprobs:
        assert events[0].prompt_logprobs is None, where
        return
    prompt_served = torch.tensor(events[0].prompt_logprobs)  # prompt tokens 1..n-1
    prompt_want = logprobs[:n - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert torch.allclose(prompt_served, prompt_want, atol=TOL, rtol=0), \
        f"{where}: prompt logprobs {(prompt_served - prompt_want).abs().max():.2e}"


def check_family(files: FamilyFiles, engine: Engine) -> None:
    """Each request alone (which also loads the adapters into slots), then all in one mixed batch: equal to
    transformers/PEFT (module docstring)."""
    refs = References(files)
    requests = [(prompt_of(length, i), adapter) for i, (length, adapter, _) in enumerate(REQUESTS)]
    for prompt, adapter in requests:
        alone = run_requests(engine, [(prompt, adapter)])[0]
        check_request(refs, prompt, adapter, alone, f"alone, {len(prompt)} tokens, adapter {adapter}")
    asks = [ask for _, _, ask in REQUESTS]
    mixed = run_requests(engine, requests, asks, together=True)
    for (prompt, adapter), events, ask in zip(requests, mixed, asks):
        check_request(refs, prompt, adapter, events, f"mixed batch, {len(prompt)} tokens, adapter {adapter}", ask)


def check_family_or_refusal(family: Family, root: Path) -> None:
    """A served family equals transformers/PEFT (check_family; MoE families: PEFT's all-linear adapter on the fused
    expert weights is refused by name); a refused one fails to start with its message."""
    if not family.served:
        base = family.save(root / "base")
        with pytest.raises(BaseModelError) as refused:
            start_engine(FamilyFiles(base, root / "adapters"))
        assert family.refusal in str(refused.value)
        return
    files = save_family(family, root)
    engine = start_engine(files, self_check=True)
    try:
        check_family(files, engine)
        if family.expert_parameters:
            with pytest.raises(AdapterRejected, match="target_parameters"):
                engine.validate_adapter(files.adapters / "all-linear-experts")
    finally:
        engine.shutdown()
