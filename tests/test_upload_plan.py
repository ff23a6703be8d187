"""The upload plan: one choice per (request, adapter kind, served quantization), every refusal named."""
from __future__ import annotations

import pytest
import torch

from olora_core.quant_convert import QuantSpec

from app.adapters.upload_plan import UploadPath, UploadRefused, UploadRequest, choose_plan

NF4 = QuantSpec(kind="nf4", dtype=torch.bfloat16)


def plan(kind="olora", served=None, **request):
    request = {"has_initial": False, **request}
    return choose_plan(UploadRequest("a1", **request), kind, kind, served)


@pytest.mark.parametrize("kind, served, asked, path, stored", [
    ("lora", None, {}, UploadPath.PLAIN, "lora"),
    ("lora", NF4, {"quant_aware": True}, UploadPath.PLAIN, "lora"),  # quant_aware is about conversions only
    ("olora", None, {"has_initial": True}, UploadPath.PEFT_CONVERSION, "olora-converted"),
    ("pissa", NF4, {"has_initial": True}, UploadPath.PEFT_CONVERSION, "pissa-converted"),  # PiSSA: exact PEFT form
    ("olora", NF4, {"has_initial": True, "quant_aware": False}, UploadPath.PEFT_CONVERSION, "olora-converted"),
    ("olora", NF4, {"has_initial": True}, UploadPath.QUANT_AWARE, "olora-converted"),
    ("olora", None, {"recompute_init": True}, UploadPath.RECOMPUTED_INIT, "olora-converted"),
    ("pissa", NF4, {"recompute_init": True}, UploadPath.RECOMPUTED_INIT, "pissa-converted"),
])
def test_each_path(kind, served, asked, path, stored):
    chosen = plan(kind, served, **asked)
    assert (chosen.path, chosen.stored_kind, chosen.kind) == (path, stored, kind)


def test_quantization_follows_the_served_base_and_init_dtype():
    assert plan("olora", NF4, has_initial=True).quantization == NF4
    assert plan("olora", NF4, recompute_init=True).quantization == NF4
    assert plan("olora", NF4, recompute_init=True, init_dtype="float16").quantization.dtype == torch.float16
    assert plan("olora", NF4, recompute_init=True, quant_aware=False).quantization is None
    assert plan("pissa", NF4, recompute_init=True).quantization is None  # quantization-aware is OLoRA's only
    assert plan("olora", None, has_initial=True, init_dtype="bfloat16").init_dtype == "bfloat16"


@pytest.mark.parametrize("kind, served, asked, words", [
    ("lora", None, {"recompute_init": True}, ["plain lora", "recompute_init is only for"]),
    ("lora", None, {"has_initial": True}, ["plain lora", "'initial_archive' is only"]),
    ("olora", None, {"has_initial": True, "recompute_init": True}, ["either initial_archive or recompute_init"]),
    ("olora", None, {}, ["unconverted OLORA", "init_lora_weights='olora'", "initial_archive"]),
    ("olora", NF4, {}, ["unconverted OLORA", "initial_archive", "recompute_init=true"]),
    ("pissa", NF4, {"has_initial": True, "quant_aware": True}, ["quant_aware=true is for OLoRA adapters only"]),
    ("pissa", NF4, {"recompute_init": True, "quant_aware": True}, ["quant_aware=true is for OLoRA adapters only"]),
])
def test_refusals(kind, served, asked, words):
    with pytest.raises(UploadRefused) as refused:
        plan(kind, served, **asked)
    assert all(word in str(refused.value) for word in words), str(refused.value)
    assert refused.value.status_code == 422
