"""Quantization-aware OLoRA -> LoRA conversion (olora_core.quant_convert) against PEFT's own quantized OLoRA.

Reference = what PEFT trains: the base loaded with bitsandbytes on CPU, get_peft_model(init_lora_weights="olora")
(PEFT dequantizes, subtracts s·B0A0 and requantizes), then the adapter moved away from its init. Served = a fresh
quantized base + PeftModel.from_pretrained(converted adapter), for PEFT's conversion and for ours.

Two logit errors are measured: "raw" with bitsandbytes' CPU kernels (they add their own noise: int8 quantizes the
activations, 4-bit computes through bf16), and "weights" with every bitsandbytes layer replaced by a float32 Linear
holding its dequantized weight, which isolates what a conversion controls. Nothing runs a forward on a quantized
model before PEFT's init: on an AVX512-BF16 CPU the forward repacks 4-bit weights and PEFT's init then reads the
packed bytes (see olora_core/olora_init.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import quantized_tiny_llama, tiny_llama
from olora_core.convert import convert
from olora_core.errors import OLoRAError, RankError, UnsupportedInitError
from olora_core.olora_init import dense_weight, weight_format
from olora_core.quant_convert import (BaseWeights, dequantize_linears, BaseWeightsError, QuantSpec, Quantizer, convert_quant_aware,
                                      exact_served_delta)
from tolerances import SAME_MODEL_LOGITS, SAME_WEIGHTS

pytestmark = pytest.mark.numeric  # .ci/run repeats these under ATEN_CPU_CAPABILITY=default

R, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
BITS = {"nf4": 4, "int8": 8}
IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))  # (B, T)


dequantized = dequantize_linears


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_llama(seed=0).save_pretrained(path)
    return path


def _olora_pair(root: Path, model, perturb: float = 0.05):
    """Save PEFT's OLoRA init, move the adapter (B != B0), save it: (initial, trained, trained PeftModel)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                  init_lora_weights="olora", task_type="CAUSAL_LM"))
    peft_model.save_pretrained(root / "initial")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * perturb)
    peft_model.save_pretrained(root / "trained")
    return root / "initial", root / "trained", peft_model.eval()


@pytest.fixture(scope="module", params=["nf4", "int8"])
def quant_case(request, base_dir, tmp_path_factory):
    quantization = request.param
    root = tmp_path_factory.mktemp(quantization)
    initial, trained, peft_model = _olora_pair(root, quantized_tiny_llama(base_dir, BITS[quantization]))
    ref_weights = logits(dequantized(peft_model))  # before any quantized forward (see the module docstring)
    from peft import PeftModel  # PEFT re-runs the OLoRA init on a fresh base when it loads an OLoRA adapter

    ref_raw = logits(PeftModel.from_pretrained(quantized_tiny_llama(base_dir, BITS[quantization]), str(trained)).eval())
    convert(initial, trained, root / "peft")
    report = convert_quant_aware(initial, trained, root / "ours", base_dir, quantization)
    return dict(q=quantization, root=root, base=base_dir, initial=initial, trained=trained, ref_raw=ref_raw,
                ref_weights=ref_weights, report=report)


def served_errors(case, adapter_dir: Path) -> tuple[float, float]:
    """(raw, weights) max |logit error| of a fresh quantized base + adapter against the trained model."""
    from peft import PeftModel

    bits, base = BITS[case["q"]], case["base"]
    raw_model = PeftModel.from_pretrained(quantized_tiny_llama(base, bits), str(adapter_dir)).eval()
    raw = (logits(raw_model) - case["ref_raw"]).abs().max().item()
    weights_model = PeftModel.from_pretrained(dequantized(quantized_tiny_llama(base, bits)), str(adapter_dir)).eval()
    weights = (logits(weights_model) - case["ref_weights"]).abs().max().item()
    return raw, weights


def test_quantizer_reproduces_served_and_trained_bases(base_dir):
    """deq(Q(W)) of the checkpoint == the served base's dequantized weight, and deq(Q(W' - s·B0A0)) == PEFT's
    requantized residual, bit for bit (nf4, fp4, int8)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = BaseWeights(base_dir)
    configs = {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
               "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32,
                                         bnb_4bit_use_double_quant=True),
               "int8": BitsAndBytesConfig(load_in_8bit=True)}
    for kind, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu")
        spec = QuantSpec.from_model(model)
        assert spec.kind == kind and spec.dtype == torch.float32
        assert spec.compress_statistics == (kind == "fp4")
        quantizer = Quantizer(spec)
        layer = model.model.layers[1].self_attn.v_proj
        served = dense_weight(layer, weight_format(layer)).float()
        assert torch.equal(quantizer.roundtrip(base.weight("model.layers.1.self_attn.v_proj")), served), kind
        peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["v_proj"],
                                                      init_lora_weights="olora"))
        wrapped = peft_model.base_model.model.model.layers[1].self_attn.v_proj
        A0, B0 = wrapped.lora_A["default"].weight.detach(), wrapped.lora_B["default"].weight.detach()
        trained_base = dense_weight(wrapped.base_layer, weight_format(wrapped.base_layer)).float()
        residual = served - (wrapped.scaling["default"] * B0) @ A0
        assert torch.equal(quantizer.roundtrip(residual, source_dtype=torch.float32), trained_base), kind
        logits(peft_model)  # a CPU forward may repack 4-bit weights (bf16 scales): the spec must not change
        assert QuantSpec.from_model(peft_model) == spec, kind


def test_full_rank_is_exact(quant_case, base_dir, tmp_path):
    """At full rank the written delta IS ΔW*: the served model reproduces PEFT's trained quantized model up to
    float32 rounding, where PEFT's conversion is off by the requantization error."""
    out = tmp_path / "full"
    report = convert_quant_aware(quant_case["initial"], quant_case["trained"], out, base_dir, quant_case["q"],
                                 rank=64)
    assert max(layer.rel_error for layer in report.layers) < SAME_WEIGHTS  # relative: fp32 eps x sqrt(rank 64)
    _, ours = served_errors(quant_case, out)
    _, peft = served_errors(quant_case, quant_case["root"] / "peft")
    print(f"\n{quant_case['q']} full rank: weights-only max logit error ours {ours:.2e}, PEFT {peft:.2e}")
    assert ours < SAME_MODEL_LOGITS and peft > 100 * ours


def test_rank_2r_beats_peft(quant_case):
    """At PEFT's rank 2r: every layer's Frobenius error is below PEFT's (Eckart–Young: PEFT's delta has rank
    2r too) and the served logits are closer to the trained model; nf4 by a clear margin."""
    report = quant_case["report"]
    assert report.r_out == 2 * R and all(layer.rank == 2 * R for layer in report.layers)
    for layer in report.layers:
        assert layer.rel_error < layer.peft_rel_error, layer
    raw_ours, w_ours = served_errors(quant_case, quant_case["root"] / "ours")
    raw_peft, w_peft = served_errors(quant_case, quant_case["root"] / "peft")
    print(f"\n{quant_case['q']} rank 2r max logit error: raw ours {raw_ours:.2e} PEFT {raw_peft:.2e} "
          f"(x{raw_peft / raw_ours:.2f}); weights-only ours {w_ours:.2e} PEFT {w_peft:.2e} (x{w_peft / w_ours:.2f})")
    print("\n".join(f"  {x.module}: rel_error {x.rel_error:.3e}  PEFT {x.peft_rel_error:.3e}" for x in report.layers))
    assert w_ours < w_peft
    if quant_case["q"] == "nf4":  # int8's weight error is tiny next to its activation quantization (see docs)
        assert 1.5 * w_ours < w_peft and 1.5 * raw_ours < raw_peft


def test_max_rel_error_picks_smallest_rank(quant_case, base_dir, tmp_path):
    target = 0.02 if quant_case["q"] == "nf4" else 5e-4
    report = convert_quant_aware(quant_case["initial"], quant_case["trained"], tmp_path / "tol", base_dir,
                                 quant_case["q"], max_rel_error=target)
    config = json.loads((tmp_path / "tol" / "adapter_config.json").read_text())
    assert report.rank_mode == "max_rel_error" and config["r"] == config["lora_alpha"] == report.r_out
    from safetensors.torch import load_file

    from olora_core.adapter_io import load_adapter_dir

    tensors = load_file(tmp_path / "tol" / "adapter_model.safetensors")
    base = BaseWeights(base_dir)
    init_files, trained = load_adapter_dir(quant_case["initial"]), load_adapter_dir(quant_case["trained"])
    for layer in report.layers:
        assert layer.rel_error <= target
        key = f"base_model.model.{layer.module}"
        delta, _ = exact_served_delta(base.weight(layer.module), init_files.tensors[key + ".lora_A.weight"],
                                      init_files.tensors[key + ".lora_B.weight"], trained.tensors[key + ".lora_A.weight"],
                                      trained.tensors[key + ".lora_B.weight"], ALPHA / R,
                                      Quantizer(QuantSpec(quant_case["q"])))
        S = torch.linalg.svdvals(delta)
        tail = lambda k: float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())  # noqa: E731
        assert tail(layer.rank) <= target < tail(layer.rank - 1), layer  # smallest k reaching the target
        assert tensors[key + ".lora_A.weight"].shape[0] == layer.rank
        expected_r = config["rank_pattern"].get(layer.module.replace(".", r"\."), config["r"])
        assert expected_r == layer.rank
    ranks = {layer.rank for layer in report.layers}
    print(f"\n{quant_case['q']} max_rel_error={target}: ranks {sorted(ranks)}")
    # the per-layer ranks load in PEFT and the served model is at least as close as at rank 2r
    _, w_tol = served_errors(quant_case, tmp_path / "tol")
    _, w_2r = served_errors(quant_case, quant_case["root"] / "ours")
    assert w_tol < w_2r
    with pytest.raises(RankError, match="needs rank"):
        convert_quant_aware(quant_case["initial"], quant_case["trained"], tmp_path / "cap", base_dir, quant_case["q"],
                            max_rel_error=1e-9, rank=4)
    assert not (tmp_path / "cap").exists()


def test_fp32_is_no_worse_than_peft(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # noqa: E731
    initial, trained, peft_model = _olora_pair(tmp_path, load(), perturb=0.2)
    ref = logits(peft_model)
    convert(initial, trained, tmp_path / "peft")
    report = convert_quant_aware(initial, trained, tmp_path / "ours", base_dir, "none")
    assert report.max_rel_error < SAME_WEIGHTS and report.r_out == 2 * R
    errors = {name: (logits(PeftModel.from_pretrained(load(), str(tmp_path / name)).eval()) - ref).abs().max().item()
              for name in ("peft", "ours")}
    print(f"\nfp32 max logit error: ours {errors['ours']:.2e}, PEFT {errors['peft']:.2e}")
    assert errors["ours"] <= max(2 * errors["peft"], SAME_MODEL_LOGITS)


def test_refusals_write_nothing(quant_case, base_dir, tmp_path):
    case = quant_case
    other = tmp_path / "other"
    tiny_llama(seed=0, hidden=32, intermediate=64).save_pretrained(other)
    with pytest.raises(BaseWeightsError, match="is this the adapter's base"):
        convert_quant_aware(case["initial"], case["trained"], tmp_path / "o1", other, case["q"])
    with pytest.raises(OLoRAError, match="quantization must be"):
        convert_quant_aware(case["initial"], case["trained"], tmp_path / "o2", base_dir, "q3")
    pissa = tmp_path / "pissa"
    for name in ("initial", "trained"):
        shutil.copytree(case[name], pissa / name)
        config_path = pissa / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["init_lora_weights"] = "pissa"
        config_path.write_text(json.dumps(config))
    with pytest.raises(UnsupportedInitError, match="OLoRA adapters only"):
        convert_quant_aware(pissa / "initial", pissa / "trained", tmp_path / "o3", base_dir, case["q"])
    with pytest.raises(BaseWeightsError, match="no model.safetensors"):
        convert_quant_aware(case["initial"], case["trained"], tmp_path / "o4", tmp_path / "pissa", case["q"])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
