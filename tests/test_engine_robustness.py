"""Quantized serving of the embedded default model (fault isolation: tests/test_fault_isolation.py)."""
from __future__ import annotations

import tempfile

import pytest
import torch

from app.engine import Engine, EngineConfig
from app.engine.adapter_files import DirectoryAdapterSource
from olora_core.bnb_load import avoid_unsupported_cpu_4bit_packing
from app.engine.sampling import SamplingParams
from olora_core.default_model import default_model_path

PROMPT = "Return the"


def _hf_greedy(quant, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), quantization_config=quant,
                                                 device_map={"": "cpu"})
    avoid_unsupported_cpu_4bit_packing(model)
    t = torch.tensor([ids])
    out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                         eos_token_id=None)
    return out[0, t.shape[1]:].tolist()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_default_model_matches_transformers(quantize, caplog):
    """The embedded model's 688-wide MLP does not fit bitsandbytes' packed AVX512 4-bit CPU kernel; the engine
    keeps those layers on the generic 4-bit path instead of crashing, and generates what transformers does."""
    from transformers import BitsAndBytesConfig

    engine = Engine(EngineConfig(quantize=quantize, max_batch_size=2), DirectoryAdapterSource(tempfile.mkdtemp()))
    engine.start()
    try:
        ids = engine.tokenizer(PROMPT)["input_ids"]
        with caplog.at_level("WARNING"):
            got = engine.submit(ids, None, SamplingParams(max_new_tokens=8, ignore_eos=True)).result(120).token_ids
    finally:
        engine.shutdown()
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]  # no per-matmul log flood
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
             if quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    assert got == _hf_greedy(quant, ids, 8)
