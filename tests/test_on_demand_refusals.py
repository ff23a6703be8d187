"""Every refusal an upload gives, an on-demand load gives too: the upload refusal matrix (bad configs, non-finite
or non-float or misshapen weights, absent or unselected targets, rank over max_rank, pickles, unsupported PEFT
features, weights that overflow once scaled, hostile configs, an OLoRA init that is not this base's, a PiSSA
variant whose init cannot be recomputed), each case sent three ways to one server: uploaded as an archive, loaded
on demand from a folder of PEFT saves, and loaded on demand from a bucket of PEFT saves (moto's S3-protocol server
on loopback). The status, error_type and message must be the same (the adapter's id aside) and nothing stored.

By design, one case differs and is not here: an OLoRA/PiSSA save without its initial checkpoint is refused by
an upload that does not ask for recompute_init, and recomputed by an on-demand load (a folder has no form
fields); the recompute's own refusals are compared against an upload with recompute_init (the PiSSA case)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient

from app.server.main import create_app
from http_helpers import tar_gz, upload
from test_adapter_sources import gen, make_settings
from test_hostile_adapters import OVERFLOWS, edited_copy
from test_http_uploads import BAD_VARIANTS, _variant, base_dir, good_lora  # noqa: F401 (fixtures)
from test_s3_peft_source import put_save
from test_s3_store import s3_server  # noqa: F401 (fixture)

BUCKET = "refusals"
CASE_NAMES = [*sorted(BAD_VARIANTS), *sorted(OVERFLOWS), "absent_module", "unselected_tensors", "modules_to_save",
              "bias_all", "bias_lora_only", "use_dora", "lora_bias", "pickle", "config_100k_deep",
              "config_5000_digits", "config_2_mib", "olora_init_not_of_this_base", "pissa_niter_recompute"]


def _pickled(good: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy(good / "adapter_config.json", out)
    (out / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/olora-pwned'\ntR.")
    return out


def _raw_config(good: Path, out: Path, config: bytes) -> Path:
    out.mkdir()
    shutil.copy(good / "adapter_model.safetensors", out)
    (out / "adapter_config.json").write_bytes(config)
    return out


def _not_this_bases_init(good: Path, out: Path) -> Path:
    """An OLoRA save whose initial/ is random weights, not OLoRA's init of the served base (provenance)."""
    edited_copy(good, out, {"init_lora_weights": "olora"})
    edited_copy(good, out / "initial", {"init_lora_weights": "olora"})
    return out


def cases(good: Path, root: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (a PEFT save folder, the upload's form fields for the same adapter)."""
    out: dict[str, tuple[Path, dict]] = {}
    for name, (config_edit, tensors_edit, _) in BAD_VARIANTS.items():
        out[name] = (_variant(good, root, name, config_edit, tensors_edit), {})
    for name, (config_update, tensor_update) in OVERFLOWS.items():
        out[name] = (edited_copy(good, root / name, config_update, tensor_update), {})
    for name, update in (("absent_module", {"target_modules": ["qq_proj"]}),
                         ("unselected_tensors", {"target_modules": ["q_proj"]}),
                         ("modules_to_save", {"modules_to_save": ["lm_head"]}), ("bias_all", {"bias": "all"}),
                         ("bias_lora_only", {"bias": "lora_only"}), ("use_dora", {"use_dora": True}),
                         ("lora_bias", {"lora_bias": True})):
        out[name] = (edited_copy(good, root / name, update), {})
    out["pickle"] = (_pickled(good, root / "pickle"), {})
    out["config_100k_deep"] = (_raw_config(good, root / "deep", b"[" * 100_000 + b"]" * 100_000), {})
    out["config_5000_digits"] = (_raw_config(good, root / "digits", b'{"r": ' + b"7" * 5000 + b"}"), {})
    out["config_2_mib"] = (_raw_config(good, root / "big", b"{" + b" " * (2 << 20) + b"}"), {})
    out["olora_init_not_of_this_base"] = (_not_this_bases_init(good, root / "provenance"), {})
    out["pissa_niter_recompute"] = (edited_copy(good, root / "pissa", {"init_lora_weights": "pissa_niter_4"}),
                                    {"recompute_init": "true"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, base_dir, good_lora, s3_server):  # noqa: F811
    _, url = s3_server
    root = tmp_path_factory.mktemp("refusals")
    saves = cases(good_lora, root / "peft")
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(name, value)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        for folder, _ in saves.values():
            put_save(url, BUCKET, f"peft/s3-{folder.name}", folder)
        settings = make_settings(root, base_dir, peft_dirs=[root / "peft"], peft_s3_uris=[f"s3://{BUCKET}/peft"],
                                 s3_endpoint_url=url, s3_timeout_s=5.0, max_rank=16)
        with TestClient(create_app(settings)) as c:
            yield c, saves


def _initial_archive(folder: Path) -> bytes | None:
    return tar_gz(folder / "initial") if (folder / "initial").is_dir() else None


def _trained_archive(folder: Path, work: Path) -> bytes:
    trained = work / "trained"
    shutil.copytree(folder, trained, ignore=shutil.ignore_patterns("initial"))
    return tar_gz(trained)


def _refusal(response, adapter_id: str) -> tuple[int, str, str]:
    """(status, error_type, message) with the adapter's id and the name of the private folder the files were
    unpacked into (an upload's archive root, the loader's work folder) left out."""
    body = response.json()
    message = str(body.get("error")).replace(repr(adapter_id), "<id>")
    message = re.sub(r"^(trained|adapter): ", "<folder>: ", message)
    return response.status_code, body.get("error_type"), re.sub(r"[\w.-]+/(adapter_\w+\.\w+)", r"\1", message)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_an_on_demand_load_refuses_as_the_upload_does(setup, case, tmp_path):
    client, saves = setup
    folder, form = saves[case]
    uploaded = upload(client, "uploaded", _trained_archive(folder, tmp_path), _initial_archive(folder), form=form)
    expected = _refusal(uploaded, "uploaded")
    assert expected[0] in (413, 422), uploaded.text
    for adapter_id in (folder.name, f"s3-{folder.name}"):  # from the folder on disk, from the bucket
        on_demand = gen(client, adapter_id)
        assert _refusal(on_demand, adapter_id) == expected, (adapter_id, on_demand.text, uploaded.text)
        assert client.get(f"/adapters/{adapter_id}").status_code == 404  # nothing stored
    assert client.get("/adapters/uploaded").status_code == 404
    assert not Path("/tmp/olora-pwned").exists()


def test_the_matrix_covers_every_case(good_lora, tmp_path):  # noqa: F811
    assert sorted(cases(good_lora, tmp_path)) == sorted(CASE_NAMES)
