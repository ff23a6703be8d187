"""Adapter uploads through the HTTP API: OLoRA conversion on upload, and every bad input (4xx, nothing written)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.server.main import create_app
from helpers import save_random_lora, save_tiny_checkpoint, save_trained_olora
from http_helpers import tar_gz, upload, zip_bytes
from test_http_api import PROMPT, gen, make_settings


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def good_lora(base_dir, tmp_path_factory) -> Path:
    return Path(save_random_lora(base_dir, tmp_path_factory.mktemp("lora") / "good", r=4, seed=1,
                                 task_type="CAUSAL_LM"))


@pytest.fixture(scope="module")
def olora_pair(base_dir, tmp_path_factory):
    """A real PEFT OLoRA adapter: initial checkpoint, then 'trained' (perturbed) weights, and the trained model's
    greedy output on its mutated base (the reference the converted adapter must reproduce)."""
    root = tmp_path_factory.mktemp("olora")
    expected = save_trained_olora(base_dir, root / "initial", root / "trained", PROMPT)
    return root / "initial", root / "trained", expected


@pytest.fixture()
def client(tmp_path, base_dir):
    with TestClient(create_app(make_settings(tmp_path, base_dir, max_upload_bytes=200_000,
                                             max_unpacked_bytes=2_000_000, max_request_bytes=10_000))) as c:
        yield c


def store_is_empty(client) -> bool:
    root = Path(client.app.state.olora.adapters.repository.root)
    staging = list((root / ".staging").iterdir())
    return client.get("/adapters").json()["adapters"] == [] and staging == []


def test_olora_upload_needs_initial_and_is_converted(client, olora_pair):
    initial, trained, expected = olora_pair
    r = upload(client, "ol", tar_gz(trained))
    assert r.status_code == 422 and "initial_archive" in r.json()["error"] and "OLORA" in r.json()["error"]
    assert store_is_empty(client)
    r = upload(client, "ol", tar_gz(trained), initial=tar_gz(initial))
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "olora-converted" and r.json()["rank"] == 8
    assert gen(client, "ol").json()["generated_text"] == expected


def _variant(src: Path, tmp_path: Path, name: str, config_edit=None, tensors_edit=None) -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    if config_edit:
        cfg = json.loads((out / "adapter_config.json").read_text())
        config_edit(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors_edit:
        tensors = load_file(out / "adapter_model.safetensors")
        tensors_edit(tensors)
        save_file(tensors, out / "adapter_model.safetensors")
    return out


def _first_key(tensors, part):
    return next(k for k in tensors if part in k)


BAD_VARIANTS = {
    "auto_mapping": (lambda c: c.update(auto_mapping={"base_model_class": "Evil", "parent_library": "os"}), None,
                     "auto_mapping"),
    "not_lora": (lambda c: c.update(peft_type="PREFIX_TUNING"), None, "LORA"),
    "absent_target": (lambda c: c.update(target_modules=["nonexistent_proj"]),
                      lambda t: [t.update({k.replace("q_proj", "nonexistent_proj"): t.pop(k)}) for k in list(t)],
                      "nonexistent_proj"),
    "rank_too_big": (lambda c: c.update(r=32, lora_alpha=64),
                     lambda t: [t.update({k: torch.randn(32, v.shape[1]) if "lora_A" in k else torch.randn(v.shape[0], 32)})
                                for k, v in list(t.items())], "rank"),
    "wrong_shape": (None, lambda t: t.update({_first_key(t, "lora_A"): torch.randn(4, 7)}), None),
    "non_finite": (None, lambda t: t[_first_key(t, "lora_B")].__setitem__((0, 0), float("nan")), None),
    "non_float": (None, lambda t: t.update({_first_key(t, "lora_A"): torch.ones(4, 64, dtype=torch.int32)}), None),
}


@pytest.mark.parametrize("variant", sorted(BAD_VARIANTS))
def test_bad_adapter_contents_are_422(client, good_lora, tmp_path, variant):
    config_edit, tensors_edit, needle = BAD_VARIANTS[variant]
    bad = _variant(good_lora, tmp_path, variant, config_edit, tensors_edit)
    r = upload(client, "bad", tar_gz(bad))
    assert r.status_code == 422, r.text
    assert r.json()["error"] and r.json()["error_type"]
    if needle:
        assert needle.lower() in r.json()["error"].lower()
    assert store_is_empty(client)


def test_pickle_weights_are_refused_unopened(client, good_lora, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(good_lora / "adapter_config.json", bad)
    # a file that would run code if unpickled: it must never be opened
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/olora-pwned'\ntR.")
    r = upload(client, "bad", tar_gz(bad))
    assert r.status_code == 422 and "safetensors" in r.json()["error"]
    assert not Path("/tmp/olora-pwned").exists()
    assert store_is_empty(client)


def _tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name, data=b"", type_=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    return info, (data if type_ == tarfile.REGTYPE else None)


@pytest.mark.parametrize("member", [
    _member("../escape.json", b"{}"), _member("/abs.json", b"{}"),
    _member("link", type_=tarfile.SYMTYPE, linkname="/etc/passwd"),
    _member("dev", type_=tarfile.CHRTYPE),
], ids=["dotdot", "absolute", "symlink", "device"])
def test_hostile_archive_members_are_422(client, good_lora, member):
    files = [(_member(n, (good_lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = upload(client, "bad", _tar_with(files + [member]))
    assert r.status_code == 422, r.text
    assert store_is_empty(client)


def test_not_an_archive_bombs_and_sizes(client, good_lora):
    r = upload(client, "bad", b"plain text, not an archive")
    assert r.status_code == 422 and "archive" in r.json()["error"]
    bomb = zip_bytes({"adapter_config.json": (good_lora / "adapter_config.json").read_bytes(),
                      "adapter_model.safetensors": b"\0" * 5_000_000})
    assert len(bomb) < 200_000
    r = upload(client, "bad", bomb)
    assert r.status_code == 413 and "bytes" in r.json()["error"]
    r = upload(client, "bad", b"\0" * 300_000)  # compressed over max_upload_bytes
    assert r.status_code == 413
    assert store_is_empty(client)


@pytest.mark.parametrize("bad_id", ["../x", ".hidden", "a b", "x" * 129, "~merged-x"])
def test_bad_adapter_ids_are_422(client, good_lora, bad_id):
    r = upload(client, bad_id, tar_gz(good_lora))
    assert r.status_code == 422 and "adapter id" in r.json()["error"]
    assert store_is_empty(client)


def test_bad_generation_requests(client):
    assert gen(client, "unknown").status_code == 404
    r = gen(client, None, prompt="word " * 200)
    assert r.status_code == 422 and "token" in r.json()["error"].lower()
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = client.post("/generate", json={"inputs": "x", "parameters": {"temperature": -1}})
    assert r.status_code == 422 and "temperature" in r.json()["error"]
    r = client.post("/generate", json={"inputs": "x" * 20_000})
    assert r.status_code == 413
    r = client.post("/generate", json={"inputs": "x", "parameters": {"adapter_source": "hub", "adapter_id": "a"}})
    assert r.status_code == 422 and "adapter_source" in r.json()["error"]


def test_adapter_for_another_base_is_422(client, tmp_path, good_lora, base_dir):
    """An adapter bound to another base fingerprint (metadata written by an olora-serve store) is refused."""
    other = _variant(good_lora, tmp_path, "other")
    (other / "metadata.json").write_text(json.dumps({"base_fingerprint": "f" * 64}))
    r = upload(client, "other", tar_gz(other))
    assert r.status_code == 422
    assert "f" * 64 in r.json()["error"] and client.get("/info").json()["base_fingerprint"] in r.json()["error"]
