"""Converting OLoRA/PiSSA adapters without their initial checkpoint (olora_core.recompute_init), the CLI flags of
`olora convert` for it and for the quantization-aware conversion, and both through the HTTP upload."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from app.server.main import create_app
from helpers import quantized_tiny_llama, save_tiny_checkpoint
from http_helpers import tar_gz
from olora_core.adapter_io import load_adapter_dir
from olora_core.cli import main as cli_main
from olora_core.convert import convert
from olora_core.errors import AdapterMismatchError, UnsupportedInitError
from olora_core.quant_convert import BaseWeights, QuantSpec, convert_quant_aware
from olora_core.recompute_init import BaseNameMismatch, check_base_name, convert_recomputed, recompute_initial
from test_http_api import make_settings
from tolerances import SAME_MODEL_LOGITS

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


def make_pair(root: Path, model, init: str = "olora", perturb: float = 0.1, **config):
    """PEFT adapter right after `init` (initial/) and moved away from it (trained/); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, init_lora_weights=init,
                                                  task_type="CAUSAL_LM", **config))
    peft_model.save_pretrained(root / "initial")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_((torch.randn(param.shape, generator=gen) * perturb).to(param.dtype))
    peft_model.save_pretrained(root / "trained")
    return peft_model.eval()


def load_base(base_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)


def assert_same_tensors(dir_a: Path, dir_b: Path, atol: float = 0.0):
    a, b = load_file(dir_a / "adapter_model.safetensors"), load_file(dir_b / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            assert (a[key] - b[key]).abs().max() <= atol, key
    assert json.loads((dir_a / "adapter_config.json").read_text()) == json.loads((dir_b / "adapter_config.json").read_text())


@pytest.mark.parametrize("case", [
    dict(init="olora", dtype="float32"),
    dict(init="olora", dtype="bfloat16"),
    dict(init="olora", dtype="float32", use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5}),
    dict(init="pissa", dtype="float32"),
], ids=["olora-fp32", "olora-bf16", "olora-patterns", "pissa-fp32"])
def test_recomputed_init_equals_the_real_one(base_dir, tmp_path, case):
    case = dict(case)
    init, dtype = case.pop("init"), case.pop("dtype")
    torch_dtype = getattr(torch, dtype)
    peft_model = make_pair(tmp_path, load_base(base_dir, torch_dtype), init=init, **case)
    recomputed, notes = recompute_initial(tmp_path / "trained", base_dir, init_dtype=dtype)
    assert notes == []  # the adapter names this very directory
    real = load_adapter_dir(tmp_path / "initial")
    assert recomputed.tensors.keys() == real.tensors.keys()
    for key, tensor in real.tensors.items():
        assert tensor.dtype == recomputed.tensors[key].dtype
        assert torch.equal(recomputed.tensors[key], tensor), key
    convert(tmp_path / "initial", tmp_path / "trained", tmp_path / "with_initial")
    report = convert_recomputed(tmp_path / "trained", base_dir, tmp_path / "recomputed", init_dtype=dtype)
    assert report.kind == init and report.n_layers == 4
    assert_same_tensors(tmp_path / "with_initial", tmp_path / "recomputed")
    if dtype == "float32":  # the served logits match the trained model
        from peft import PeftModel

        with torch.no_grad():
            ref = peft_model(IDS).logits
            served = PeftModel.from_pretrained(load_base(base_dir), str(tmp_path / "recomputed")).eval()(IDS).logits
        assert (served - ref).abs().max() <= SAME_MODEL_LOGITS


def test_recomputed_quantized_init_equals_the_real_one(base_dir, tmp_path):
    """nf4 training base: the init factors the dequantized weight; then the quantization-aware conversion."""
    make_pair(tmp_path, quantized_tiny_llama(base_dir, 4))
    recomputed, _ = recompute_initial(tmp_path / "trained", base_dir, quantization="nf4")
    real = load_adapter_dir(tmp_path / "initial")
    for key, tensor in real.tensors.items():
        assert torch.equal(recomputed.tensors[key], tensor), key
    convert_quant_aware(tmp_path / "initial", tmp_path / "trained", tmp_path / "with_initial", base_dir, "nf4")
    convert_recomputed(tmp_path / "trained", base_dir, tmp_path / "recomputed", quantization="nf4")
    assert_same_tensors(tmp_path / "with_initial", tmp_path / "recomputed")


@pytest.fixture(scope="module")
def olora_fp32(base_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("olora")
    make_pair(root, load_base(base_dir))
    return root


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_refusals(base_dir, olora_fp32, tmp_path):
    trained = olora_fp32 / "trained"
    niter = _edit_config(trained, tmp_path / "niter", init_lora_weights="pissa_niter_4")
    with pytest.raises(UnsupportedInitError, match="randomized SVD"):
        convert_recomputed(niter, base_dir, tmp_path / "o1")
    for kind in ("corda", "loftq", True):
        with pytest.raises(UnsupportedInitError):
            recompute_initial(_edit_config(trained, tmp_path / f"k{kind}", init_lora_weights=kind), base_dir)
    other = Path(save_tiny_checkpoint(tmp_path / "wider", seed=0, hidden=96, heads=4, kv_heads=2))
    with pytest.raises(AdapterMismatchError, match="do not fit base weight"):
        convert_recomputed(_edit_config(trained, tmp_path / "nocheck", base_model_name_or_path=None), other,
                           tmp_path / "o2")
    with pytest.raises(BaseNameMismatch, match="different local model"):  # names the tiny dir: another local model
        convert_recomputed(trained, other, tmp_path / "o3")
    with pytest.raises(UnsupportedInitError, match="only defined for OLoRA"):
        recompute_initial(_edit_config(trained, tmp_path / "pq", init_lora_weights="pissa"), base_dir,
                          quantization="nf4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 4))


def test_base_name_check(base_dir, tmp_path):
    base = BaseWeights(base_dir)
    assert check_base_name(str(base_dir), base) is None
    assert "same name" in check_base_name("/elsewhere/models/tiny", base)  # only the path differs: a warning
    assert "cannot be checked" in check_base_name("someone/byte-model", base)
    assert "names no base" in check_base_name(None, base)
    with pytest.raises(BaseNameMismatch, match="parameters"):
        check_base_name("meta-llama/Llama-2-7b-hf", base)
    with pytest.raises(BaseNameMismatch, match="'llama' model"):
        check_base_name("mistralai/Mistral-Tiny", base)
    twin = tmp_path / "twin"
    shutil.copytree(base_dir, twin)
    assert "same config.json" in check_base_name(str(twin), base)


def test_cli_flags(base_dir, olora_fp32, tmp_path, capsys):
    trained, initial = olora_fp32 / "trained", olora_fp32 / "initial"
    code = cli_main(["convert", "--recompute-init", "--base", str(base_dir), "--trained", str(trained),
                     "--out", str(tmp_path / "rec")])
    assert code == 0, capsys.readouterr().err
    convert(initial, trained, tmp_path / "real")
    assert_same_tensors(tmp_path / "real", tmp_path / "rec")
    code = cli_main(["convert", "--quantization", "nf4", "--base", str(base_dir), "--initial", str(initial),
                     "--trained", str(trained), "--out", str(tmp_path / "q"), "--max-rel-error", "0.05"])
    out = capsys.readouterr().out
    assert code == 0 and "rel_error" in out and "model.layers.0.self_attn.q_proj" in out
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["init_lora_weights"] is True
    bad = [["--recompute-init", "--trained", str(trained)],  # no --base
           ["--recompute-init", "--base", str(base_dir), "--initial", str(initial), "--trained", str(trained)],
           ["--initial", str(initial), "--trained", str(trained), "--rank", "4"],  # --rank without --quantization
           ["--quantization", "int8", "--base", str(base_dir), "--trained", str(trained)],  # no --initial
           ["--recompute-init", "--base", str(base_dir), "--trained", str(_edit_config(
               trained, tmp_path / "niter", init_lora_weights="pissa_niter_2"))]]
    for i, args in enumerate(bad):
        assert cli_main(["convert", *args, "--out", str(tmp_path / f"bad{i}")]) == 2, args
        assert "error" in capsys.readouterr().err
        assert not (tmp_path / f"bad{i}").exists()


# ---- HTTP -------------------------------------------------------------------------------------------------

def _upload(client, adapter_id: str, trained: Path, initial: Path | None = None, query: str = "", **form):
    files = {"archive": ("adapter.tgz", tar_gz(trained), "application/gzip")}
    if initial is not None:
        files["initial_archive"] = ("initial.tgz", tar_gz(initial), "application/gzip")
    return client.post("/adapters" + query, data={"adapter_id": adapter_id, **form}, files=files)


def _stored(client, adapter_id: str) -> Path:
    return Path(client.app.state.olora.adapters.repository.get(adapter_id).path)


def test_http_upload_with_recompute_init(base_dir, olora_fp32, tmp_path):
    convert(olora_fp32 / "initial", olora_fp32 / "trained", tmp_path / "real")
    with TestClient(create_app(make_settings(tmp_path, base_dir))) as client:
        r = _upload(client, "rec-form", olora_fp32 / "trained", recompute_init="true")
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "olora-converted" and r.json()["rank"] == 8
        assert_same_tensors(tmp_path / "real", _stored(client, "rec-form"))
        r = _upload(client, "rec-query", olora_fp32 / "trained", query="?recompute_init=true")
        assert r.status_code == 201, r.text
        r = _upload(client, "both", olora_fp32 / "trained", olora_fp32 / "initial", recompute_init="true")
        assert r.status_code == 422 and "either" in r.json()["error"]
        niter = _edit_config(olora_fp32 / "trained", tmp_path / "niter", init_lora_weights="pissa_niter_4")
        r = _upload(client, "niter", niter, recompute_init="true")
        assert r.status_code == 422 and "randomized" in r.json()["error"]
        r = _upload(client, "plain", olora_fp32 / "trained")
        assert r.status_code == 422 and "recompute_init" in r.json()["error"]
        moved = _edit_config(olora_fp32 / "trained", tmp_path / "moved", base_model_name_or_path="/elsewhere/tiny")
        r = _upload(client, "moved", moved, recompute_init="true")
        assert r.status_code == 201, r.text
        metadata = client.app.state.olora.adapters.repository.get("moved").metadata
        assert metadata["init"] == "recomputed" and "same name" in metadata["warnings"][0]
        other = _edit_config(olora_fp32 / "trained", tmp_path / "other", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
        r = _upload(client, "other", other, recompute_init="true")
        assert r.status_code == 422 and "parameters" in r.json()["error"]


def test_http_quant_aware_upload_on_nf4_server(base_dir, tmp_path):
    make_pair(tmp_path / "pair", quantized_tiny_llama(base_dir, 4))
    initial, trained = tmp_path / "pair" / "initial", tmp_path / "pair" / "trained"
    with TestClient(create_app(make_settings(tmp_path, base_dir, quantize="nf4"))) as client:
        spec = QuantSpec.from_model(client.app.state.olora.engine.model, device="cpu")
        assert spec.kind == "nf4"
        convert_quant_aware(initial, trained, tmp_path / "expected", base_dir, spec)
        r = _upload(client, "qa", trained, initial)
        assert r.status_code == 201, r.text
        assert r.json()["rank"] == 8  # 2r, within max_rank
        assert_same_tensors(tmp_path / "expected", _stored(client, "qa"))
        r = _upload(client, "qa-rec", trained, recompute_init="true")
        assert r.status_code == 201, r.text
        assert_same_tensors(tmp_path / "expected", _stored(client, "qa-rec"))
        r = _upload(client, "peft", trained, initial, quant_aware="false")  # opt out: PEFT's conversion
        assert r.status_code == 201, r.text
        convert(initial, trained, tmp_path / "peft")
        assert_same_tensors(tmp_path / "peft", _stored(client, "peft"))
        r = client.post("/generate", json={"inputs": "text: hi\nshout:", "parameters": {"adapter_id": "qa",
                                                                                        "max_new_tokens": 4}})
        assert r.status_code == 200, r.text
