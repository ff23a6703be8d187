"""The embedded default model: fingerprint, offline loading, size limits, and that it is really pretrained."""
from __future__ import annotations

import ast
import pathlib
import re
import shutil
import sysconfig

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from olora_core.default_model import (
    DEFAULT_MODEL_SHA256, WEIGHTS_FILE, DefaultModelError, default_model_path, sha256_of_file,
    verify_default_model)

PROMPTS = ["Return the", "Create a new", "If the file", "This module provides", "The default is"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model():
    m = AutoModelForCausalLM.from_pretrained(default_model_path())
    m.eval()
    return m


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def docstring_words() -> set[str]:
    """Lower-cased words of the docstrings of the top-level stdlib modules (~6k words, ~1 s)."""
    words: set[str] = set()
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                words.update(w.lower() for w in re.findall(r"[A-Za-z]+", ast.get_docstring(node) or ""))
    assert len(words) > 3000, "stdlib docstrings not found; the word check would be meaningless"
    return words


def greedy_continuations(model, tokenizer) -> list[tuple[str, list[int]]]:
    """(generated text without the prompt, generated token ids) per prompt."""
    results = []
    with torch.no_grad():
        for prompt in PROMPTS:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
            results.append((tokenizer.decode(new_ids, skip_special_tokens=True), new_ids))
    return results


def looks_like_corpus_text(continuations: list[tuple[str, list[int]]], vocabulary: set[str]) -> tuple[bool, str]:
    """≥ 70% of generated words are docstring words, ≥ 15 different such words overall, and no prompt's
    output is one or two tokens repeated (an untrained model loops on a few tokens)."""
    words = [w.lower() for text, _ in continuations for w in re.findall(r"[A-Za-z]+", text)]
    known = [w for w in words if w in vocabulary]
    share = len(known) / len(words) if words else 0.0
    distinct_known = len(set(known))
    varied = all(len(set(ids)) > 2 for _, ids in continuations)
    ok = len(words) >= 20 and share >= 0.7 and distinct_known >= 15 and varied
    return ok, f"{len(known)}/{len(words)} known words, {distinct_known} distinct, varied={varied}: {continuations}"


def test_fingerprint_matches_constant():
    assert verify_default_model() == default_model_path()
    assert sha256_of_file(default_model_path() / WEIGHTS_FILE) == DEFAULT_MODEL_SHA256


def test_verify_rejects_modified_weights(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(default_model_path(), copy)
    with open(copy / WEIGHTS_FILE, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(DefaultModelError, match="SHA-256"):
        verify_default_model(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(DefaultModelError, match="missing tokenizer.json"):
        verify_default_model(copy)


def test_path_is_absolute_package_data():
    path = default_model_path()
    assert path.is_absolute() and path.is_dir()
    assert path.parent.name == "assets" and path.parent.parent.name == "olora_core"


def test_architecture_and_size_limits(model):
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA: k/v narrower than q
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 <= n_params <= 10_000_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    weights = default_model_path() / WEIGHTS_FILE
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert next(model.parameters()).dtype == torch.float32


def test_loads_offline_with_auto_classes(model, tokenizer):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("text", [
    "Return the number of items in the queue.",
    "  def f(x, *args, **kw):\n\treturn {'a': [1, 2.5e-3]}  # ~`|\\^@$%&\r\n\n",
    "UPPER lower MiXeD 0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "",
])
def test_tokenizer_round_trip_is_exact(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What does len() return?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|user|>\nWhat does len() return?\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_greedy_generation_is_docstring_english(model, tokenizer, docstring_words):
    ok, detail = looks_like_corpus_text(greedy_continuations(model, tokenizer), docstring_words)
    assert ok, detail


def test_word_check_rejects_a_random_model(model, tokenizer, docstring_words):
    """The check above must fail for an untrained model of the same shape, or it proves nothing."""
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(model.config).eval()
    ok, detail = looks_like_corpus_text(greedy_continuations(random_model, tokenizer), docstring_words)
    assert not ok, detail
