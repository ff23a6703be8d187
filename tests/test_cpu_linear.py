"""fp32 Linear layers through oneDNN on CPU (app/engine/cpu_linear.py): the engine's forwards use it for the
LoRA-wrapped layers and the output head, agree with torch's F.linear path up to fp32 reordering, and the
self-check's reference keeps plain F.linear layers."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import save_random_lora, save_tiny_checkpoint
from tolerances import FP32_EPS, SAME_MODEL_LOGITS
from torch import nn

from app.engine import DirectoryAdapterSource, Engine, EngineConfig
from app.engine.cpu_linear import OutputHead, onednn_applies, onednn_linear
from app.engine.reference_model import reference_model

pytestmark = [pytest.mark.numeric,
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")]


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_is_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape)
    got, want = onednn_linear(layer, x), nn.functional.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape
    # one dot product of K = 64 terms summed in another order: eps x sum|w x| x sqrt(K)
    bound = FP32_EPS * float((x.abs() @ layer.weight.abs().T).max()) * math.sqrt(64)
    assert (got - want).abs().max().item() <= bound


def test_only_plain_fp32_cpu_linears():
    assert onednn_applies(nn.Linear(4, 4))
    assert not onednn_applies(nn.Linear(4, 4).to(torch.bfloat16))
    assert not onednn_applies(nn.Embedding(4, 4))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_linear")
    base = save_tiny_checkpoint(root / "base")
    save_random_lora(base, root / "adapters" / "x", r=4, targets=("q_proj", "v_proj", "down_proj"), seed=1)
    return base, root / "adapters"


def make_engine(model_dirs, cpu_gemm: str) -> Engine:
    base, adapters = model_dirs
    engine = Engine(EngineConfig(model=base, dtype="fp32", device="cpu", max_loras=2, max_rank=8, max_batch_size=4,
                                 max_input_tokens=32, max_total_tokens=64, max_batch_tokens=64, cpu_gemm=cpu_gemm),
                    DirectoryAdapterSource(adapters))
    engine.bank.load(1, engine.parser.parse(adapters / "x"))
    return engine


def step_logits(engine: Engine) -> torch.Tensor:
    """A prefill of three rows (two with the adapter) and one decode step of them: logits (6, V)."""
    prompts, slots = [[5, 9, 200, 31, 7], [100, 3, 44], [17, 18, 19, 20, 21, 22]], [1, 0, 1]
    first = engine.runner.prefill(0, prompts, slots)  # (3, V)
    step = engine.runner.decode([11, 12, 13], [len(p) for p in prompts], slots)  # (3, V)
    return torch.cat([first, step])


def test_the_engine_runs_its_linears_through_onednn_and_agrees_with_f_linear(model_dirs):
    fast, plain = make_engine(model_dirs, "onednn"), make_engine(model_dirs, "aten")
    assert isinstance(fast.model.get_output_embeddings(), OutputHead)
    assert all(layer.onednn for layer in fast.bank.layers.values())
    assert not isinstance(plain.model.get_output_embeddings(), OutputHead)
    assert not any(layer.onednn for layer in plain.bank.layers.values())
    got, want = step_logits(fast), step_logits(plain)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= SAME_MODEL_LOGITS  # one model, two fp32 kernels (tolerances.py)


def test_the_reference_keeps_plain_linears(model_dirs):
    engine = make_engine(model_dirs, "onednn")
    name, (fan_in, fan_out) = next(iter(engine.parser.targets.items()))
    probe = {"r": 1, "lora_alpha": 1, "target_modules": [name]}, {name: (torch.zeros(1, fan_in), torch.zeros(fan_out, 1))}
    ref = reference_model(engine.model, engine.parser.targets, {"probe": probe})
    head = ref.get_output_embeddings()
    assert type(head) is nn.Linear
    assert head.weight is engine.model.get_output_embeddings().weight  # shared, not copied
    assert not any(isinstance(m, OutputHead) for m in ref.modules())
