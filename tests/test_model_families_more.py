"""Served = transformers / PEFT for the popular decoder families, second half of the matrix (see
test_model_families.py and tests/family_matrix.py)."""
from __future__ import annotations

import pytest
from family_matrix import check_family_or_refusal
from model_families import FAMILIES

pytestmark = pytest.mark.numeric  # .ci/run repeats these under ATEN_CPU_CAPABILITY=default

SECOND_HALF = FAMILIES[len(FAMILIES) // 2:]


@pytest.mark.parametrize("family", SECOND_HALF, ids=[f.name for f in SECOND_HALF])
def test_family_served_exactly_or_refused(family, tmp_path):
    check_family_or_refusal(family, tmp_path)
