"""EngineConfig.compile="on" (torch.compile of the decode forward) gives the eager engine's tokens and logits.

Compiling takes tens of seconds even for the tiny model on 2 cores, so the test runs only when
OLORA_TEST_COMPILE=1 is set (CI keeps compile time out); the eager path is what every other test covers."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_engine_rank import ADAPTERS, BATCHES, make_engine, run_rows

from app.engine.engine import EngineConfig
from app.engine.errors import InvalidRequest
from helpers import save_adapter_set
from tolerances import SAME_MODEL_LOGITS

needs_compile = pytest.mark.skipif(os.environ.get("OLORA_TEST_COMPILE") != "1" or shutil.which("g++") is None,
                                   reason="set OLORA_TEST_COMPILE=1 (inductor needs a C++ compiler; ~1 min)")


def test_compile_setting_is_validated():
    with pytest.raises(InvalidRequest, match="compile"):
        EngineConfig(compile="max-autotune").validate()
    assert EngineConfig().compile == "off"


@needs_compile
def test_compiled_decode_equals_eager(tmp_path):
    base, adapters = save_adapter_set(tmp_path, ADAPTERS)
    rows, _ = BATCHES["mixed 2..12"]  # rows kernel at rank bucket 16, a base row, varying lengths (masked decode)
    eager, eager_seqs, _ = run_rows(make_engine(base, adapters, "auto"), adapters, rows, steps=4)
    engine = make_engine(base, adapters, "auto", compile="on")
    assert engine.runner.decode_model is not engine.model
    compiled, seqs, _ = run_rows(engine, adapters, rows, steps=4)
    assert seqs == eager_seqs
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=SAME_MODEL_LOGITS, rtol=0)
