"""Engine additions for the protocols: top-n tokens, prompt log-probabilities, typical_p, OpenAI penalties.
A request gets the same tokens and numbers alone or batched with others that ask for them."""
from __future__ import annotations

import asyncio

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, InvalidRequest, SamplingParams

PROMPTS = [[5, 9, 200, 31, 7], [100, 3, 44], [17, 18, 19, 20, 21, 22, 23], [64, 65]]
PARAMS = [dict(prompt_logprobs=True, top_n_tokens=3), dict(do_sample=True, typical_p=0.5, seed=7),
          dict(frequency_penalty=-1.0, presence_penalty=0.5, top_n_tokens=2), dict()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    base = save_tiny_checkpoint(root / "base")
    save_random_lora(base, root / "adapters" / "x", r=4, seed=1)
    eng = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=4,
                              max_input_tokens=32, max_total_tokens=96, max_batch_tokens=64),
                 DirectoryAdapterSource(root / "adapters"))
    eng.start()
    yield eng, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    eng.shutdown()


def events_of(handles) -> list[list]:
    async def one(handle):
        return [event async for event in handle]

    async def every():
        return await asyncio.gather(*(one(h) for h in handles))

    return asyncio.run(every())


def submit(engine, i, adapter="x"):
    return engine.submit(PROMPTS[i], adapter, SamplingParams(max_new_tokens=10, ignore_eos=True, **PARAMS[i]))


def test_alone_equals_batched(setup):
    engine, _ = setup
    solo = [events_of([submit(engine, i)])[0] for i in range(4)]
    together = events_of([submit(engine, i) for i in range(4)])
    for a, b in zip(solo, together):
        assert [e.token_id for e in a] == [e.token_id for e in b]
        assert [e.logprob for e in a] == pytest.approx([e.logprob for e in b], abs=1e-5)
        assert [[i for i, _ in e.top_tokens] for e in a] == [[i for i, _ in e.top_tokens] for e in b]
    first = together[0][0]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(PROMPTS[0]) - 1
    assert all(e.prompt_logprobs is None for e in together[0][1:])
    assert [len(e.top_tokens) for e in together[2]] == [2] * 10 and all(not e.top_tokens for e in together[3])


def test_prompt_logprobs_and_top_tokens_match_the_model(setup):
    engine, model = setup
    [events] = events_of([submit(engine, 0, adapter=None)])
    ids = PROMPTS[0] + [e.token_id for e in events]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)  # (T, V)
    n = len(PROMPTS[0])
    assert list(events[0].prompt_logprobs) == pytest.approx([lp[t - 1, ids[t]].item() for t in range(1, n)],
                                                            abs=1e-4)
    for step, e in enumerate(events):
        values, best = torch.topk(lp[n - 1 + step], 3)
        assert [i for i, _ in e.top_tokens] == best.tolist() and e.token_id == best[0].item()
        assert [v for _, v in e.top_tokens] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("bad", [dict(typical_p=0), dict(typical_p=1.5), dict(frequency_penalty=2.5),
                                 dict(presence_penalty=-3), dict(top_n_tokens=21), dict(top_n_tokens=-1)])
def test_new_parameters_are_validated(bad):
    with pytest.raises(InvalidRequest):
        SamplingParams(**bad)
