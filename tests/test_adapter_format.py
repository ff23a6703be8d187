"""olora_core.adapter_format: PEFT's own key resolution reproduced with RE2, hostile configs refused in bounded time."""
from __future__ import annotations

import json
import time

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from helpers import tiny_llama
from olora_core.adapter_format import (MAX_JSON_DEPTH, check_config, delta_norm, layer_rank, parse_json,
                                       pattern_key, read_config, targets_module)
from olora_core.errors import AdapterFormatError, UnsupportedConfigError

NAMES = [name for name, _ in tiny_llama(layers=3).named_modules() if name]
PATTERNS = ["q_proj", "v_proj", "layers.0.self_attn.q_proj", r"layers\.1\..*", "mlp.*", r"model\.layers\.2\.mlp",
            "q_proj|o_proj", "up_proj$", "self_attn", "(k|v)_proj", r"\d\.mlp\.down_proj", "nothing", ".*"]


def peft_pattern_key(patterns, name):
    key = get_pattern_key(list(patterns), name)
    return key if key in patterns else None  # PEFT returns the name itself when nothing matches


@pytest.mark.parametrize("order", [PATTERNS, PATTERNS[::-1], PATTERNS[3:7]])
def test_pattern_key_is_peft_get_pattern_key(order):
    for name in NAMES:
        assert pattern_key(order, name) == peft_pattern_key(order, name), name


TARGET_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "down_proj"]),
    dict(target_modules=r".*\.layers\.[01]\.self_attn\.(q|k)_proj"),
    dict(target_modules="q_proj"),  # a string is a full-match regex: matches nothing here
    dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=["model.layers.1.self_attn.v_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0.*"),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
]


@pytest.mark.parametrize("kwargs", TARGET_CONFIGS, ids=lambda k: json.dumps(k)[:60])
def test_targets_module_is_peft_check_target_module_exists(kwargs):
    peft_config = LoraConfig(r=4, **kwargs)
    saved = json.loads(json.dumps(peft_config.to_dict(), default=sorted))  # what save_pretrained writes
    for name in NAMES:
        assert targets_module(saved, name) == bool(check_target_module_exists(peft_config, name)), name


def test_rank_pattern_resolution_matches_peft_models():
    """The ranks PEFT really gives each layer (a model built with rank_pattern) = layer_rank of the saved config."""
    from peft import get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={r"layers\.1\..*": 2, "down_proj": 6, "^model.layers.0.self_attn.q_proj": 3})
    model = get_peft_model(tiny_llama(layers=3), config)
    saved = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            assert layer_rank(saved, name) == module.r["default"], name


def test_catastrophic_regex_is_linear_time():
    """The pattern that froze the server for 35 s with Python's re (and exponentially more with a larger bound)."""
    evil = "(?:[a-z_.0-9]|[a-z_.0-9]){0,60}X"
    config = check_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {evil: 2},
                           "target_modules": evil}, "adapter_config.json")
    start = time.perf_counter()
    for name in NAMES:
        assert pattern_key(config["rank_pattern"], name + "_" * 40) is None
        assert not targets_module(config, name + "_" * 40)
    assert time.perf_counter() - start < 5.0  # re: minutes; RE2: milliseconds


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=q)q_proj", "(?<!x)q_proj", "q_proj(", "x" * 5000])
def test_patterns_re2_cannot_run_are_refused(pattern):
    with pytest.raises(AdapterFormatError, match="pattern|characters"):
        check_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {pattern: 2}}, "c.json")


def test_pattern_count_is_bounded():
    patterns = {f"p{i}": 2 for i in range(5000)}
    with pytest.raises(AdapterFormatError, match="5000 patterns"):
        check_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": patterns}, "c.json")


PEFT_AUTO_MAPPING = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"}


@pytest.mark.parametrize("value, accepted", [
    (PEFT_AUTO_MAPPING, True), (None, True), ({}, True),
    ({"base_model_class": "LlamaForCausalLM", "parent_library": "os"}, False),
    ({"base_model_class": "system", "parent_library": "transformers_evil.x"}, False),
    ({"base_model_class": "os.system", "parent_library": "transformers.models"}, False),
    ({"base_model_class": "X", "parent_library": "transformers.models", "code": "import os"}, False),
    ("transformers.LlamaForCausalLM", False),
])
def test_auto_mapping_rule(value, accepted):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "auto_mapping": value}
    if accepted:
        assert check_config(config, "c.json")["r"] == 4
    else:
        with pytest.raises(UnsupportedConfigError, match="auto_mapping"):
            check_config(config, "c.json")


def test_peft_written_auto_mapping_is_read(tmp_path):
    """What PEFT really writes for the paper's quick start (no task_type) passes the one reader."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights="olora"))
    model.save_pretrained(str(tmp_path / "a"))
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["auto_mapping"]["parent_library"].startswith("transformers.")
    assert read_config(tmp_path / "a")["init_lora_weights"] == "olora"


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_JSON_DEPTH}"),
    ('{"r": ' + "9" * 5000 + "}", "an integer of 5000 digits"),
    ('{"r": 4, "lora_alpha": NaN}', "not a JSON number"),
    ('{"r": 4, "lora_alpha": 1e999}', "out of range"),
    ('{"r": 4,', "invalid JSON"),
    ("\udcff", "not UTF-8"),
])
def test_bounded_json(text, message):
    data = text.encode("utf-8", "surrogateescape")
    with pytest.raises(AdapterFormatError, match=message) as info:
        parse_json(data, "adapter_config.json")
    assert len(str(info.value)) < 200  # no echo of the hostile input


def test_strings_do_not_count_as_nesting():
    assert parse_json(json.dumps({"k": "[" * 1000}).encode(), "c.json") == {"k": "[" * 1000}


def test_delta_norm_is_frobenius_norm_of_the_product():
    import torch

    a, b = torch.randn(3, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert delta_norm(a, b, 0.5) == pytest.approx(float((0.5 * b @ a).norm()), rel=1e-12)
    assert delta_norm(torch.full((2, 4), 3e38), torch.full((4, 2), 3e38), 1.0) > 1e77  # float64: no overflow
    assert delta_norm(torch.ones(2, 4), torch.ones(4, 2), float("inf")) == float("inf")
