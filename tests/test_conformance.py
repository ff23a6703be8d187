"""The conformance matrix: adapters saved by the real PEFT in every way users save them, each uploaded to a
real server (TestClient) and generated with. Every cell either serves exactly what PEFT computes (same greedy
tokens, logprobs within 1e-4 in fp32) or is refused with a message naming the unsupported feature.
docs/compatibility.md shows the same table; test_compatibility_doc_lists_every_cell keeps the two in step."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.server.main import create_app
from helpers import save_tiny_checkpoint
from http_helpers import tar_gz, upload, zip_bytes
from test_http_api import PROMPT, make_settings
from tolerances import ENGINE_VS_PEFT_LOGPROBS

QUICK_START = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights="olora")  # the paper's
PLAIN = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
SERVED = "served = PEFT"
NEW_TOKENS = 8
DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


@dataclass(frozen=True)
class Cell:
    config: dict  # LoraConfig keyword arguments
    outcome: str = SERVED  # or a substring of the refusal message
    archive: str = "folder"  # folder | contents | dot | tar | zip
    weights: str = "peft"  # peft | no_metadata | pickle
    send: str = "trained"  # trained | trained+initial | recompute_init | peft_converted
    extra: dict = field(default_factory=dict)


CELLS = {
    "quick start (no task_type, auto_mapping) + initial_archive": Cell(QUICK_START, send="trained+initial"),
    "quick start + recompute_init": Cell(QUICK_START, send="recompute_init"),
    "quick start, PEFT's own converted dir": Cell(QUICK_START, send="peft_converted"),
    "quick start without its initial checkpoint": Cell(QUICK_START, "initial_archive"),
    "task_type CAUSAL_LM": Cell(PLAIN),
    "task_type None": Cell(dict(PLAIN, task_type=None)),
    "target_modules regex string": Cell(dict(PLAIN, target_modules=r".*\.self_attn\.(q|k)_proj")),
    "target_modules all-linear": Cell(dict(PLAIN, target_modules="all-linear")),
    "rank_pattern + alpha_pattern": Cell(dict(PLAIN, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                              alpha_pattern={"q_proj": 20})),
    "use_rslora": Cell(dict(PLAIN, use_rslora=True)),
    "use_rslora + patterns": Cell(dict(PLAIN, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3})),
    "layers_to_transform": Cell(dict(PLAIN, layers_to_transform=[1])),
    "modules_to_save": Cell(dict(PLAIN, modules_to_save=["lm_head"]), "modules_to_save"),
    "bias lora_only": Cell(dict(PLAIN, bias="lora_only"), "bias='lora_only'"),
    "bias all": Cell(dict(PLAIN, bias="all"), "bias='all'"),
    "use_dora": Cell(dict(PLAIN, use_dora=True), "DoRA"),
    "lora_bias": Cell(dict(PLAIN, lora_bias=True), "lora_bias"),
    "init_lora_weights true": Cell(dict(PLAIN, init_lora_weights=True)),
    "init_lora_weights gaussian": Cell(dict(PLAIN, init_lora_weights="gaussian")),
    "init_lora_weights olora + initial_archive": Cell(dict(PLAIN, init_lora_weights="olora"), send="trained+initial"),
    "init_lora_weights pissa + initial_archive": Cell(dict(PLAIN, init_lora_weights="pissa"), send="trained+initial"),
    "init_lora_weights pissa_niter_4 + initial_archive": Cell(dict(PLAIN, init_lora_weights="pissa_niter_4"),
                                                              send="trained+initial"),
    "init_lora_weights pissa_niter_4 + recompute_init": Cell(dict(PLAIN, init_lora_weights="pissa_niter_4"),
                                                             "randomized SVD", send="recompute_init"),
    "safetensors without metadata": Cell(PLAIN, weights="no_metadata"),
    "safe_serialization=False (.bin pickle)": Cell(PLAIN, "pickle", weights="pickle"),
    "archive: tar.gz rooted at the folder": Cell(PLAIN, archive="folder"),
    "archive: tar.gz of the contents": Cell(PLAIN, archive="contents"),
    "archive: tar.gz rooted at .": Cell(PLAIN, archive="dot"),
    "archive: plain tar": Cell(PLAIN, archive="tar"),
    "archive: zip": Cell(PLAIN, archive="zip"),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir):
    root = tmp_path_factory.mktemp("server")
    with TestClient(create_app(make_settings(root, base_dir, max_rank=32, max_loras=2))) as c:
        yield c


def _greedy_reference(model, tok) -> tuple[list[int], list[float]]:
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        logits = model(input_ids=out).logits[0, ids.shape[1] - 1:-1].float()  # (new, vocab)
    tokens = out[0, ids.shape[1]:].tolist()
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    return tokens, logprobs


def save_with_peft(base_dir: Path, out: Path, config: dict, weights: str = "peft"):
    """get_peft_model with `config`, save the initial checkpoint, 'train' (perturb every LoRA weight), save the
    trained one as users do, and return PEFT's greedy tokens/logprobs of the trained model (on its mutated base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**config))
    peft_model.save_pretrained(str(out / "initial"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.eval()
    peft_model.save_pretrained(str(out / "trained"), safe_serialization=weights != "pickle")
    if weights == "no_metadata":
        path = out / "trained" / "adapter_model.safetensors"
        save_file(load_file(path), path)
    reference = _greedy_reference(peft_model, AutoTokenizer.from_pretrained(str(base_dir)))
    return peft_model, reference


def archive_of(adapter_dir: Path, kind: str) -> bytes:
    files = {p.name: p.read_bytes() for p in sorted(adapter_dir.iterdir()) if p.is_file()}
    if kind == "folder":
        return tar_gz(adapter_dir)
    if kind == "zip":
        return zip_bytes(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w" if kind == "tar" else "w:gz") as tar:
        if kind == "dot":
            tar.add(str(adapter_dir), arcname=".")
        else:
            for name in files:
                tar.add(str(adapter_dir / name), arcname=name)
    return buf.getvalue()


def served(client, adapter_id: str) -> tuple[list[int], list[float], str]:
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": adapter_id, "max_new_tokens": NEW_TOKENS, "details": True}})
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    return [t["id"] for t in details["tokens"]], [t["logprob"] for t in details["tokens"]], details["finish_reason"]


@pytest.mark.parametrize("name", list(CELLS))
def test_cell(name, client, base_dir, tmp_path):
    cell = CELLS[name]
    peft_model, (ref_tokens, ref_logprobs) = save_with_peft(base_dir, tmp_path, cell.config, cell.weights)
    trained = tmp_path / "trained"
    initial = None
    form = {}
    if cell.send == "trained+initial":
        initial = archive_of(tmp_path / "initial", cell.archive)
    elif cell.send == "recompute_init":
        form = {"recompute_init": "true", "init_dtype": "float32"}
    elif cell.send == "peft_converted":
        peft_model.save_pretrained(str(tmp_path / "converted"),
                                   path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
        trained = tmp_path / "converted"
    adapter_id = f"cell-{list(CELLS).index(name)}"
    r = upload(client, adapter_id, archive_of(trained, cell.archive), initial, form=form)
    if cell.outcome != SERVED:
        assert r.status_code == 422, r.text
        assert cell.outcome in r.json()["error"], r.json()
        assert len(r.content) < 1024 and str(tmp_path) not in r.text
        return
    assert r.status_code == 201, r.text
    tokens, logprobs, finish = served(client, adapter_id)
    assert tokens == ref_tokens[:len(tokens)] and (len(tokens) == NEW_TOKENS or finish == "eos_token")
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= ENGINE_VS_PEFT_LOGPROBS
    assert client.delete(f"/adapters/{adapter_id}").status_code == 200


def test_quick_start_convert_equals_peft_conversion(base_dir, tmp_path):
    """`olora convert` on the paper's quick-start pair (no task_type) writes tensors torch.equal to PEFT's own
    conversion (save_pretrained(path_initial_model_for_weight_conversion=...))."""
    from olora_core.cli import main

    peft_model, _ = save_with_peft(base_dir, tmp_path, QUICK_START)
    peft_model.save_pretrained(str(tmp_path / "peft_converted"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert main(["convert", "--initial", str(tmp_path / "initial"), "--trained", str(tmp_path / "trained"),
                 "--out", str(tmp_path / "ours")]) == 0
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft_converted" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 64 and config["auto_mapping"]["base_model_class"]


def test_compatibility_doc_lists_every_cell():
    text = DOC.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| case") and not line.startswith("|---")}
    for name, cell in CELLS.items():
        assert name in rows, f"docs/compatibility.md has no row for {name!r}"
        assert cell.outcome in rows[name], f"docs/compatibility.md: {name!r} should say {cell.outcome!r}"
