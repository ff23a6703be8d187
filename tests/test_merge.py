"""merge_adapters against PEFT's own add_weighted_adapter on a tiny Llama (tensors and logits)."""
from __future__ import annotations

import copy
import json

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from olora_core.adapter_io import AdapterFiles, load_adapter_dir
from olora_core.errors import MergeError
from olora_core.merge import merge_adapter_dirs, merge_adapters
from helpers import tiny_gpt2, tiny_llama
from tolerances import SAME_MODEL_LOGITS, SAME_WEIGHTS

CONFIGS = {  # different ranks, scalings (rsLoRA, patterns) and partly overlapping target modules
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "b": LoraConfig(r=4, lora_alpha=4, use_rslora=True, alpha_pattern={"v_proj": 12},
                    target_modules=["v_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM"),
    "c": LoraConfig(r=8, lora_alpha=16, rank_pattern={"down_proj": 2}, target_modules=["q_proj", "down_proj"],
                    task_type="CAUSAL_LM"),
}
EQUAL_RANK = [("a", 0.7), ("b", -0.4)]
MIXED_RANK = [("a", 0.7), ("b", -0.4), ("c", 1.3)]
SEED = 1234
CASES = [  # method, sources, options
    ("linear", EQUAL_RANK, {}),
    ("ties", EQUAL_RANK, {"density": 0.5}),
    ("ties", EQUAL_RANK, {"density": 0.6, "majority_sign_method": "frequency"}),
    ("dare_linear", EQUAL_RANK, {"density": 0.7}),
    ("dare_ties", EQUAL_RANK, {"density": 0.7}),
    ("magnitude_prune", EQUAL_RANK, {"density": 0.5}),
    ("cat", MIXED_RANK, {}),
    ("svd", MIXED_RANK, {}),
    ("svd", MIXED_RANK, {"svd_rank": 6, "svd_clamp": 0.9}),
    ("ties_svd", MIXED_RANK, {"density": 0.5}),
    ("dare_linear_svd", MIXED_RANK, {"density": 0.7}),
    ("dare_ties_svd", MIXED_RANK, {"density": 0.7}),
    ("magnitude_prune_svd", MIXED_RANK, {"density": 0.5}),
]
INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _save_adapter(path, config, seed):
    model = get_peft_model(tiny_llama(), copy.deepcopy(config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # trained-ish: B is non-zero
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: _save_adapter(root / name, cfg, seed) for seed, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def peft_model(adapter_dirs):
    model = PeftModel.from_pretrained(tiny_llama(), adapter_dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    return model


def _peft_merge(model, monkeypatch, name, method, sources, options):
    """PEFT's add_weighted_adapter, with torch seeded right before its first random pruning call (PEFT's own
    layer injection consumes random numbers first)."""
    seeded = []

    def seed_once(fn):
        def wrapper(*args, **kwargs):
            if not seeded:
                torch.manual_seed(SEED)
                seeded.append(True)
            return fn(*args, **kwargs)
        return wrapper

    for fn_name in ("dare_linear", "dare_ties"):
        monkeypatch.setattr(peft_lora_model, fn_name, seed_once(getattr(peft_lora_model, fn_name)))
    model.add_weighted_adapter([n for n, _ in sources], [w for _, w in sources], name, combination_type=method,
                               **options)
    monkeypatch.undo()
    return get_peft_model_state_dict(model, adapter_name=name)


def _logits(model):
    with torch.no_grad():
        return model(INPUT_IDS).logits


@pytest.mark.parametrize("method,sources,options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(adapter_dirs, peft_model, monkeypatch, tmp_path, method, sources,
                                           options):
    name = f"m{CASES.index((method, sources, options))}"
    expected = _peft_merge(peft_model, monkeypatch, name, method, sources, options)
    module_order = [n for n, _ in tiny_llama().named_modules()]
    ours_dir = merge_adapter_dirs([(adapter_dirs[n], w) for n, w in sources], tmp_path / "merged", method,
                                  seed=SEED, module_order=module_order, **options)
    ours = load_adapter_dir(ours_dir)
    assert sorted(ours.tensors) == sorted(expected)
    for key, tensor in expected.items():
        assert ours.tensors[key].shape == tensor.shape, key
        torch.testing.assert_close(ours.tensors[key], tensor, atol=SAME_WEIGHTS, rtol=0, msg=key)
    peft_config = peft_model.peft_config[name]
    assert ours.config["r"] == ours.config["lora_alpha"] == peft_config.r
    assert set(ours.config["target_modules"]) == set(peft_config.target_modules)
    assert ours.config["rank_pattern"] == ours.config["alpha_pattern"] == {}
    assert ours.config["init_lora_weights"] is True and ours.config["use_rslora"] is False

    peft_model.set_adapter(name)
    expected_logits = _logits(peft_model)
    reloaded = PeftModel.from_pretrained(tiny_llama(), ours_dir).eval()
    torch.testing.assert_close(_logits(reloaded), expected_logits, atol=SAME_MODEL_LOGITS, rtol=0)
    assert (expected_logits - _logits(tiny_llama())).abs().max() > 1e-3  # the merged adapter does something


def _base_plus_deltas(peft_model, sources):
    """base + Σ w_i·ΔW_i, with ΔW_i from PEFT's own get_delta_weight of each loaded source adapter."""
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in peft_model.base_model.model.named_modules():
            if isinstance(layer, LoraLayer):
                for adapter, weight in sources:
                    if adapter in layer.lora_A:
                        modules[name].weight += weight * layer.get_delta_weight(adapter)
    return reference


def test_cat_is_the_exact_weighted_sum_of_delta_weights(adapter_dirs, peft_model):
    config, tensors = merge_adapters([(adapter_dirs[n], w) for n, w in MIXED_RANK], "cat")
    assert config["r"] == 4 + 4 + 8
    merged = PeftModel.from_pretrained(tiny_llama(), _save(config, tensors, adapter_dirs["a"].parent / "cat"))
    torch.testing.assert_close(_logits(merged.eval()), _logits(_base_plus_deltas(peft_model, MIXED_RANK)),
                               atol=SAME_MODEL_LOGITS, rtol=0)


def test_single_source_is_linear_and_exact(adapter_dirs, peft_model):
    config, tensors = merge_adapters([(adapter_dirs["b"], -0.6)], "ties", density=0.5)  # PEFT: linear
    merged = PeftModel.from_pretrained(tiny_llama(), _save(config, tensors, adapter_dirs["a"].parent / "one"))
    torch.testing.assert_close(_logits(merged.eval()), _logits(_base_plus_deltas(peft_model, [("b", -0.6)])),
                               atol=SAME_MODEL_LOGITS, rtol=0)


def _save(config, tensors, path):
    from olora_core.adapter_io import save_adapter_dir
    return save_adapter_dir(path, config, tensors, overwrite=True)


def test_dare_seed_is_used_and_global_rng_untouched(adapter_dirs):
    sources = [(adapter_dirs[n], w) for n, w in EQUAL_RANK]
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = merge_adapters(sources, "dare_ties", density=0.5, seed=1)[1]
    assert torch.equal(torch.get_rng_state(), state)
    again = merge_adapters(sources, "dare_ties", density=0.5, seed=1)[1]
    other = merge_adapters(sources, "dare_ties", density=0.5, seed=2)[1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_modules_to_save_of_one_source_is_carried_over(tmp_path, adapter_dirs):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                     task_type="CAUSAL_LM")
    with_head = _save_adapter(tmp_path / "head", cfg, seed=5)
    config, tensors = merge_adapters([(adapter_dirs["a"], 1.0), (with_head, 1.0)], "cat")
    assert config["modules_to_save"] == ["lm_head"]
    head = load_adapter_dir(with_head).tensors["base_model.model.lm_head.weight"]
    assert torch.equal(tensors["base_model.model.lm_head.weight"], head)
    with pytest.raises(MergeError, match="modules_to_save"):
        merge_adapters([(with_head, 1.0), (with_head, 0.5)], "cat")


def _variant(path, config_update=None, tensor_update=None) -> AdapterFiles:
    files = load_adapter_dir(path)
    config = {**files.config, **(config_update or {})}
    return AdapterFiles(config=config, tensors={**files.tensors, **(tensor_update or {})}, path=files.path)


def test_refusals(adapter_dirs):
    a, b, c = (adapter_dirs[n] for n in "abc")
    with pytest.raises(MergeError, match="at least one"):
        merge_adapters([], "cat")
    with pytest.raises(MergeError, match="unknown merge method"):
        merge_adapters([(a, 1.0)], "average")
    with pytest.raises(MergeError, match="same rank"):
        merge_adapters([(a, 1.0), (c, 1.0)], "linear")
    with pytest.raises(MergeError, match="same rank"):
        merge_adapters([(a, 1.0), (c, 1.0)], "dare_ties", density=0.5)
    for method, density in [("ties", None), ("ties", 0.0), ("dare_linear", 1.5), ("magnitude_prune", -0.1),
                            ("dare_ties_svd", None)]:
        with pytest.raises(MergeError, match="density"):
            merge_adapters([(a, 1.0), (b, 1.0)], method, density=density)
    with pytest.raises(MergeError, match="density is only used"):
        merge_adapters([(a, 1.0), (b, 1.0)], "cat", density=0.5)
    with pytest.raises(MergeError, match="svd_rank is only used"):
        merge_adapters([(a, 1.0), (b, 1.0)], "linear", svd_rank=4)
    with pytest.raises(MergeError, match="exceeds min"):
        merge_adapters([(a, 1.0), (b, 1.0)], "svd", svd_rank=40)  # v_proj is 32×64
    with pytest.raises(MergeError, match="finite weight"):
        merge_adapters([(a, float("nan"))], "cat")
    for init in ("olora", "pissa_niter_4"):
        with pytest.raises(MergeError, match="unconverted"):
            merge_adapters([(a, 1.0), (_variant(b, {"init_lora_weights": init}), 1.0)], "cat")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong_in = _variant(c, tensor_update={key: torch.randn(8, 32)})
    with pytest.raises(MergeError, match="conflicting shapes"):
        merge_adapters([(a, 1.0), (wrong_in, 1.0)], "cat")
    with pytest.raises(MergeError, match="list and as a regex"):
        merge_adapters([(a, 1.0), (_variant(b, {"target_modules": ".*v_proj"}), 1.0)], "svd")


def test_merged_config_is_loadable_json(adapter_dirs, tmp_path):
    out = merge_adapter_dirs([(adapter_dirs["a"], 1.0), (adapter_dirs["c"], 0.5)], tmp_path / "m", "svd")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    with pytest.raises(Exception, match="not empty"):
        merge_adapter_dirs([(adapter_dirs["a"], 1.0)], out, "linear")


GPT2_CONFIGS = {  # Conv1D layers (weight stored in×out, fan_in_fan_out) and an Embedding LoRA
    "g1": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    "g2": LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                     task_type="CAUSAL_LM"),
}


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_adapters")
    dirs = {}
    for seed, (name, config) in enumerate(GPT2_CONFIGS.items()):
        model = get_peft_model(tiny_gpt2(), copy.deepcopy(config))
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn_like(param) * 0.2)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), dirs["g1"], adapter_name="g1")
    peft_model.load_adapter(dirs["g2"], adapter_name="g2")
    return dirs, peft_model.eval()


@pytest.mark.parametrize("method,options", [("linear", {}), ("cat", {}), ("svd", {}),
                                            ("dare_ties_svd", {"density": 0.6}), ("dare_linear", {"density": 0.6})])
def test_conv1d_and_embedding_match_peft(gpt2_setup, monkeypatch, method, options):
    dirs, peft_model = gpt2_setup
    sources = [("g1", 0.8), ("g2", -0.5)]
    expected = _peft_merge(peft_model, monkeypatch, f"m_{method}", method, sources, options)
    _, ours = merge_adapters([(dirs[n], w) for n, w in sources], method, seed=SEED,
                             module_order=[n for n, _ in tiny_gpt2().named_modules()], **options)
    assert sorted(ours) == sorted(expected) and any("lora_embedding_A" in k for k in ours)
    for key, tensor in expected.items():
        torch.testing.assert_close(ours[key], tensor, atol=SAME_WEIGHTS, rtol=0, msg=key)
