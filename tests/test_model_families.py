"""Served = transformers / PEFT for the popular decoder families (first half of the matrix; the rest in
test_model_families_more.py): tiny random checkpoints built with transformers' own classes, a plain LoRA, an
all-linear LoRA and the converted OLoRA quick-start adapter made by PEFT, alone and in mixed batches with rows
longer and shorter than the attention window (tests/family_matrix.py). A family the engine cannot run is
refused at start with a message naming the model type."""
from __future__ import annotations

import pytest
from family_matrix import check_family_or_refusal
from model_families import FAMILIES

pytestmark = pytest.mark.numeric  # .ci/run repeats these under ATEN_CPU_CAPABILITY=default

HALF = FAMILIES[:len(FAMILIES) // 2]


@pytest.mark.parametrize("family", HALF, ids=[f.name for f in HALF])
def test_family_served_exactly_or_refused(family, tmp_path):
    check_family_or_refusal(family, tmp_path)
