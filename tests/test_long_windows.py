"""Sliding windows served, not refused: Gemma 3 with its real 512-token window serves a 1,500-token request
exactly (prompt log-probabilities and greedy tokens = transformers), alone and batched with a short row."""
from __future__ import annotations

import pytest
from family_matrix import (NEW_TOKENS, FamilyFiles, References, check_family, check_request, prompt_of, run_requests,
                           save_family, start_engine)
from model_families import BY_NAME, Family

pytestmark = pytest.mark.numeric  # .ci/run repeats these under ATEN_CPU_CAPABILITY=default

GEMMA3_WINDOW = 512  # google/gemma-3-*: sliding_window 512, five local layers to one global
GEMMA3 = Family("gemma3_text-512", "Gemma3TextConfig", dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False, sliding_window=GEMMA3_WINDOW,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
LONG = 1500


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-long")
    files = FamilyFiles(GEMMA3.save(root / "base"), root / "adapters")
    (root / "adapters").mkdir()
    engine = start_engine(files, max_total=LONG + 36, max_batch_tokens=2 * LONG)
    yield files, engine
    engine.shutdown()


def test_gemma3_window_512_serves_1500_tokens_exactly(served):
    files, engine = served
    assert engine.architecture.layer_windows == (GEMMA3_WINDOW, GEMMA3_WINDOW, None)
    refs = References(files)
    long_prompt, short_prompt = prompt_of(LONG, 0), prompt_of(20, 1)
    alone = run_requests(engine, [(long_prompt, None)])[0]
    check_request(refs, long_prompt, None, alone, "1,500 tokens alone")
    together = run_requests(engine, [(long_prompt, None), (short_prompt, None)])
    check_request(refs, long_prompt, None, together[0], "1,500 tokens with a short row")
    check_request(refs, short_prompt, None, together[1], "short row with a 1,500-token row")
    assert len(alone) == NEW_TOKENS
    # the local layers' KV rows stop at the window; the global layer's follow the longest request
    kv = engine.runner.kv
    assert kv.capacity >= LONG and [layer.keys.shape[2] for layer in kv.layers] == [GEMMA3_WINDOW] * 2 + [kv.capacity]


@pytest.mark.parametrize("name", ["gemma2", "gpt_neo"])
def test_windows_with_decode_buckets(name, tmp_path):
    """decode_graph="buckets" (padded rows, key length padded: every window layer reads min(L', window) ring
    slots) serves windowed families exactly too."""
    files = save_family(BY_NAME[name], tmp_path)
    engine = start_engine(files, decode_graph="buckets")
    try:
        assert engine.runner.bucketed
        check_family(files, engine)
    finally:
        engine.shutdown()
