"""Decode steps padded to fixed shape buckets (EngineConfig.decode_graph="buckets") give the unpadded step's
tokens and logits; on CUDA the captured graphs (decode_graph="cuda") give the CPU engine's tokens."""
from __future__ import annotations

import pytest
import torch
from helpers import save_adapter_set
from test_engine_rank import ADAPTERS, PROMPTS, make_engine, run_rows

from app.engine.decode_buckets import KV_BUCKET_STEP, batch_bucket, kv_bucket, pad_rows
from app.engine.sampling import SamplingParams
from tolerances import SAME_MODEL_LOGITS

# numeric equivalence: .ci/run runs these a second time under ATEN_CPU_CAPABILITY=default
pytestmark = pytest.mark.numeric

ROWS = {  # batch sizes 3 and 5: padded to 4 and 8 rows
    "three rows": ["r12", None, "r2"],
    "five rows": ["r24", "r2", "r12", "r8-pattern", None],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_adapter_set(tmp_path_factory.mktemp("buckets"), ADAPTERS)


def test_buckets():
    assert [batch_bucket(b, 16) for b in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert batch_bucket(5, 6) == 6
    assert [kv_bucket(n, 1536) for n in (1, 128, 129, 1500)] == [128, 128, 256, 1536]
    assert kv_bucket(70, 64 + KV_BUCKET_STEP) == KV_BUCKET_STEP and kv_bucket(10, 64) == 64
    assert pad_rows([5, 6], [3, 4], [1, 0], 4) == ([5, 6, 0, 0], [3, 4, 0, 0], [1, 0, 0, 0])


@pytest.mark.parametrize("kernel", ["auto", "rows", "bgmv", "grouped"])
@pytest.mark.parametrize("batch", list(ROWS))
def test_bucketed_decode_equals_unpadded(files, kernel, batch):
    base, adapters = files
    rows = ROWS[batch]
    plain, plain_seqs, _ = run_rows(make_engine(base, adapters, kernel), adapters, rows, steps=4)
    engine = make_engine(base, adapters, kernel, decode_graph="buckets")
    shapes = []
    forward = engine.runner._forward

    def spy(batch, ids, *args):
        mask = batch.masks[None]  # the full-attention mask (the tiny Llama has no window)
        shapes.append((tuple(ids.shape), None if mask is None else tuple(mask.shape)))
        return forward(batch, ids, *args)

    engine.runner._forward = spy
    padded, seqs, _ = run_rows(engine, adapters, rows, steps=4)
    bucket = batch_bucket(len(rows), engine.config.max_batch_size)
    assert bucket > len(rows) and shapes[1:] == [((bucket, 1), (bucket, 1, 1, 64))] * 4, shapes
    assert seqs == plain_seqs
    for p, q in zip(plain, padded):
        torch.testing.assert_close(q, p, atol=SAME_MODEL_LOGITS, rtol=0)


def served_tokens(base, adapters, device: str, decode_graph: str) -> list[list[int]]:
    engine = make_engine(base, adapters, "auto", device=device, decode_graph=decode_graph)
    engine.start()
    try:
        handles = [engine.submit(p, a, SamplingParams(max_new_tokens=8, ignore_eos=True))
                   for p, a in zip(PROMPTS, ROWS["five rows"])]
        return [h.result(timeout=120).token_ids for h in handles]
    finally:
        engine.shutdown()


def test_bucketed_engine_serves_the_same_tokens(files):
    base, adapters = files
    assert served_tokens(base, adapters, "cpu", "buckets") == served_tokens(base, adapters, "cpu", "off")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_gives_the_cpu_tokens(files):
    base, adapters = files
    engine = make_engine(base, adapters, "auto", device="cuda", decode_graph="cuda")
    assert engine.runner.graphs is not None
    assert served_tokens(base, adapters, "cuda", "cuda") == served_tokens(base, adapters, "cpu", "off")


def test_auto_decode_graph_is_cuda_graphs_only_on_cuda_with_unquantized_weights():
    from app.engine.cuda_graphs import choose_decode_graph

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_decode_graph("auto", cuda, "none") == "cuda"
    assert choose_decode_graph("auto", cpu, "none") == "off"
    for quantize in ("nf4", "fp4", "int8"):
        assert choose_decode_graph("auto", cuda, quantize) == "off"
    for asked in ("off", "buckets", "cuda"):
        assert choose_decode_graph(asked, cpu, "none") == asked


def test_engine_reports_the_resolved_decode_graph(files):
    base, adapters = files
    engine = make_engine(base, adapters, "auto")
    assert engine.config.decode_graph == "off"  # auto on CPU
    assert engine.runner.graphs is None and not engine.runner.bucketed
