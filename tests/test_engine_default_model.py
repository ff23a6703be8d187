"""The engine on the embedded default model (model=None): same greedy tokens, text and EOS stop as
transformers/PEFT generate, with and without an adapter in the same batch."""
from __future__ import annotations

import pytest
import torch
from helpers import save_random_lora
from peft import PeftModel
from transformers import AutoModelForCausalLM

from app.engine import DirectoryAdapterSource, Engine, EngineConfig, SamplingParams

PROMPTS = ['def add(a, b):\n    """', "The quick brown fox", "import os\n\n# Räksmörgås 日本 "]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("default-adapters")
    eng = Engine(EngineConfig(device="cpu", max_total_tokens=128, max_input_tokens=64, max_batch_tokens=256,
                              max_rank=8, max_loras=2), DirectoryAdapterSource(root))
    save_random_lora(eng.base.path, root / "docs", r=8, targets=("q_proj", "v_proj", "down_proj"), seed=3)
    eng.start()
    yield eng, root
    eng.shutdown()


def test_default_model_greedy_text_matches_generate(engine):
    eng, root = engine
    assert eng.base.name == "default" and eng.base.fingerprint.startswith("sha256:")
    tok = eng.tokenizer
    plain = AutoModelForCausalLM.from_pretrained(str(eng.base.path), dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(eng.base.path), dtype=torch.float32),
                                      str(root / "docs")).eval()
    handles = [(p, a, eng.submit(tok.encode(p, add_special_tokens=False), a,
                                 SamplingParams(max_new_tokens=24)))
               for p in PROMPTS for a in (None, "docs")]
    for prompt, adapter, handle in handles:
        ids = tok.encode(prompt, add_special_tokens=False)
        model = tuned if adapter else plain
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tok.pad_token_id or 0)[0, len(ids):].tolist()
        res = handle.result(timeout=60)
        assert res.token_ids == ref, (prompt, adapter)
        assert res.finish_reason == ("eos_token" if ref[-1] == tok.eos_token_id else "length")
        assert res.text == tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)
