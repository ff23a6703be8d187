"""The DecodeStream path of IncrementalDetokenizer gives exactly the text of the Python (TGI) algorithm."""
from __future__ import annotations

import random

from transformers import AutoTokenizer

from app.engine.text import IncrementalDetokenizer
from olora_core.default_model import default_model_path


def pieces(tok, prompt, ids, stream: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, use_decode_stream=stream)
    clean = "\ufffd" not in tok.decode(prompt[-5:], skip_special_tokens=True)
    assert (detok._stream is not None) == (stream and clean)
    return [detok.add(t) for t in ids] + [detok.flush()]


def test_decode_stream_equals_python_algorithm_on_the_embedded_tokenizer():
    tok = AutoTokenizer.from_pretrained(default_model_path())
    rng = random.Random(0)
    texts = ["Hello wörld, ça va? 日本語 🙂 test", "  leading spaces\n\nand\tnewlines ", "x" * 40]
    cases = [(tok(t)["input_ids"][:3], tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    specials = sorted(set(tok.all_special_ids))
    for _ in range(40):  # random ids, special tokens mixed in, random prompt context
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        ids += rng.sample(specials, k=min(2, len(specials)))
        rng.shuffle(ids)
        cases.append(([rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))], ids))
    assert sum("\ufffd" not in tok.decode(p[-5:], skip_special_tokens=True) for p, _ in cases) > 30
    for prompt, ids in cases:
        fast, slow = pieces(tok, prompt, ids, True), pieces(tok, prompt, ids, False)
        assert "".join(fast) == "".join(slow), (prompt, ids)
    # whole texts come back exactly, held-back bytes included
    for text, (prompt, ids) in zip(texts, cases):
        assert "".join(pieces(tok, prompt, ids, True)) == tok.decode(ids, skip_special_tokens=True)
