"""Hostile adapter uploads and merges: every one is a short JSON 4xx naming the problem,
nothing is stored, and the server still serves PEFT's output afterwards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.server.main import create_app
from http_helpers import peft_greedy_text, tar_gz, upload
from test_http_api import PROMPT, gen, make_settings
from test_http_uploads import base_dir, good_lora  # noqa: F401  (module-scoped fixtures: the tiny base, a LoRA)


@pytest.fixture(scope="module")
def client(tmp_path_factory, base_dir, good_lora):
    root = tmp_path_factory.mktemp("server")
    with TestClient(create_app(make_settings(root, base_dir, max_upload_bytes=4_000_000,
                                             max_unpacked_bytes=8_000_000))) as c:
        assert upload(c, "good", tar_gz(good_lora)).status_code == 201
        yield c


def tar_of(members: list[tuple[str, bytes | None]]) -> bytes:
    """A .tgz with exactly these members (None: a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def adapter_members(adapter_dir: Path, prefix: str = "", config: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(prefix + "adapter_config.json", config if config is not None else
             (adapter_dir / "adapter_config.json").read_bytes()),
            (prefix + "adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())]


def edited_copy(src: Path, dst: Path, config_update=None, tensor_update=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_update or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(src / "adapter_model.safetensors")
    if tensor_update:
        tensor_update(tensors)
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def assert_clean_refusal(client, response, statuses=(422,), must_name=""):
    assert response.status_code in statuses, response.text
    body = response.json()
    assert isinstance(body["error"], str) and must_name in body["error"], body
    assert len(response.content) < 1024
    root = str(client.app.state.olora.adapters.repository.root)
    assert root not in response.text and "/tmp" not in response.text
    assert [a["id"] for a in client.get("/adapters").json()["adapters"]] == ["good"]


def test_archive_rooted_at_dot_is_accepted(client, base_dir, good_lora, tmp_path):
    """`tar czf a.tgz -C dir .`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(str(good_lora), arcname=".")
    assert any(m.name == "." for m in tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getmembers())
    r = upload(client, "dot", buf.getvalue())
    assert r.status_code == 201, r.text
    assert gen(client, "dot").json()["generated_text"] == peft_greedy_text(base_dir, good_lora, PROMPT, 8)
    assert client.delete("/adapters/dot").status_code == 200


def hostile_archives(good: Path) -> dict[str, tuple[bytes, tuple[int, ...], str]]:
    whole = tar_gz(good)
    deep = "/".join(["d"] * 2000) + "/adapter_config.json"
    return {
        "two_byte_gzip": (b"\x1f\x8b", (422,), "archive"),
        "half_a_tgz": (whole[: len(whole) // 2], (422,), "truncated or corrupt"),
        "dot_x_and_x": (tar_of(adapter_members(good) + [("./adapter_config.json", b"{}")]), (422,), "twice"),
        "a_and_a_b": (tar_of(adapter_members(good) + [("a", b"x"), ("a/b", b"y")]), (422,), "which is a file"),
        "dir_and_file": (tar_of(adapter_members(good) + [("a/b", b"y"), ("a", b"x")]), (422,), "twice"),
        "2000_dirs_deep": (tar_of([(deep, b"{}")]), (422,), "folders deep"),
        "300_char_name": (tar_of([("x" * 300, b"{}")] + adapter_members(good)), (422,), "255 characters"),
        "config_100k_deep": (tar_of(adapter_members(good, config=b"[" * 100_000 + b"]" * 100_000)), (422,),
                             "nested deeper"),
        "config_5000_digits": (tar_of(adapter_members(good, config=b'{"r": ' + b"7" * 5000 + b"}")), (422,),
                               "5000 digits"),
        "config_2_mib": (tar_of(adapter_members(good, config=b"{" + b" " * (2 << 20) + b"}")), (413,),
                         "adapter_config.json"),
    }


@pytest.mark.parametrize("case", [
    "two_byte_gzip", "half_a_tgz", "dot_x_and_x", "a_and_a_b", "dir_and_file", "2000_dirs_deep", "300_char_name",
    "config_100k_deep", "config_5000_digits", "config_2_mib"])
def test_hostile_archive_is_a_json_4xx(client, good_lora, case):
    archive, statuses, must_name = hostile_archives(good_lora)[case]
    assert_clean_refusal(client, upload(client, "evil", archive), statuses, must_name)


OVERFLOWS = {
    "lora_alpha_3e38": ({"lora_alpha": 3e38}, None),
    "alpha_pattern_1e38": ({"alpha_pattern": {"v_proj": 1e38}}, None),
    "lora_B_3e38": ({}, lambda t: t[next(k for k in t if "lora_B" in k)].fill_(3e38)),
    "delta_1000x_base": ({"lora_alpha": 8e4}, None),
    "rslora_pattern_huge": ({"use_rslora": True, "alpha_pattern": {"q_proj": 1e30}}, None),
}


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_weights_are_checked_after_scaling(client, good_lora, tmp_path, case):
    config_update, tensor_update = OVERFLOWS[case]
    bad = edited_copy(good_lora, tmp_path / "bad", config_update, tensor_update)
    r = upload(client, "big", tar_gz(bad))
    assert_clean_refusal(client, r, (422,), "s·B·A")


def test_merge_weights_are_checked_after_scaling(client, base_dir, good_lora):
    r = client.post("/adapters/merge", json={"adapter_id": "blend", "sources": [{"id": "good", "weight": 1e20}]})
    assert_clean_refusal(client, r, (422,), "s·B·A")
    for weights in ([1e20, 1e20], [float("nan"), 1.0]):
        r = client.post("/generate", content=json.dumps(
            {"inputs": PROMPT, "parameters": {"merged_adapters": {"ids": ["good", "good"], "weights": weights},
                                              "do_sample": True, "max_new_tokens": 4}}),
            headers={"content-type": "application/json"})
        assert r.status_code == 422 and len(r.content) < 1024, r.text
        assert "lora_A" not in r.text and "tensor(" not in r.text and "/tmp" not in r.text
    # the server still serves PEFT's output
    assert gen(client, "good").json()["generated_text"] == peft_greedy_text(base_dir, good_lora, PROMPT, 8)


def test_target_module_that_does_not_exist_is_refused_like_peft(client, good_lora, tmp_path):
    """PEFT refuses a config whose target_modules match nothing in the base ('not found in the base model');
    a tensor for a module the config does not select is not served from its name either."""
    bad = edited_copy(good_lora, tmp_path / "nomod", {"target_modules": ["qq_proj"]})
    assert_clean_refusal(client, upload(client, "nomod", tar_gz(bad)), (422,), "not found in the base model")
    half = edited_copy(good_lora, tmp_path / "half", {"target_modules": ["q_proj"]})  # tensors hold v_proj too
    assert_clean_refusal(client, upload(client, "half", tar_gz(half)), (422,), "do not select")


def test_merge_seed_out_of_range_is_a_json_422(client):
    r = client.post("/adapters/merge", json={"adapter_id": "blend", "sources": [{"id": "good"}, {"id": "good"}],
                                             "method": "dare_linear", "density": 0.5, "seed": 2**63})
    assert_clean_refusal(client, r, (422,), "seed")
