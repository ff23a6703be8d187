"""A bucket prefix of plain PEFT saves as an adapter source (OLORA_PEFT_S3_URIS), loaded on demand through the
upload path, and vLLM's /v1/load_lora_adapter naming `s3://bucket/prefix/<id>` inside it (never another bucket
or key). Against moto's S3-protocol server on loopback (tests/test_s3_store.py's fixtures), boto3 unpatched."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from fastapi.testclient import TestClient

from app.server.main import create_app
from helpers import save_trained_olora
from http_helpers import tar_gz, upload
from test_adapter_sources import gen, make_settings
from test_s3_store import aws_env, base_dir, bucket, loras, s3_server  # noqa: F401 (fixtures)

PROMPT = "hello world"


def put_save(url: str, bucket_name: str, prefix: str, folder: Path) -> None:
    """Every file under `folder` as `<prefix>/<relative path>` (a PEFT save as `aws s3 sync` would put it)."""
    s3 = boto3.client("s3", endpoint_url=url)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket_name, f"{prefix}/{path.relative_to(folder).as_posix()}")


def server(tmp_path, base_dir, url, bucket_name, **overrides) -> TestClient:  # noqa: F811
    return TestClient(create_app(make_settings(tmp_path, base_dir, peft_s3_uris=[f"s3://{bucket_name}/peft"],
                                               s3_endpoint_url=url, s3_timeout_s=2.0, **overrides)))


def test_on_demand_load_from_a_bucket_of_peft_saves(tmp_path, base_dir, loras, s3_server, bucket):  # noqa: F811
    _, url = s3_server
    put_save(url, bucket, "peft/cust", loras["a"])
    put_save(url, bucket, "elsewhere/outside", loras["a"])
    with server(tmp_path, base_dir, url, bucket) as c:
        assert upload(c, "uploaded", tar_gz(loras["a"])).status_code == 201
        expected = gen(c, "uploaded").json()["generated_text"]
        with ThreadPoolExecutor(4) as pool:  # concurrent first requests share one load
            results = list(pool.map(lambda _: gen(c, "cust"), range(4)))
        assert [r.status_code for r in results] == [200] * 4
        assert {r.json()["generated_text"] for r in results} == {expected}
        assert c.app.state.olora.loader.loads == 1
        assert c.get("/adapters/cust").json()["sha256"] == c.get("/adapters/uploaded").json()["sha256"]
        origin = c.app.state.olora.adapters.stored("cust").metadata["origin"]
        assert origin["source"] == f"s3://{bucket}/peft/"
        assert gen(c, "outside").status_code == 404  # not under the configured prefix
        assert gen(c, "not-there").status_code == 404


def test_an_olora_save_in_a_bucket_with_initial_or_recomputed(tmp_path, base_dir, s3_server, bucket):  # noqa: F811
    _, url = s3_server
    expected = save_trained_olora(base_dir, tmp_path / "ol" / "initial", tmp_path / "ol", PROMPT)
    put_save(url, bucket, "peft/ol", tmp_path / "ol")  # with initial/
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # without: its init recomputed
        boto3.client("s3", endpoint_url=url).upload_file(str(tmp_path / "ol" / name), bucket, f"peft/olr/{name}")
    with server(tmp_path, base_dir, url, bucket) as c:
        for adapter_id in ("ol", "olr"):
            r = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": adapter_id,
                                                                          "max_new_tokens": 8}})
            assert r.status_code == 200, r.text
            assert r.json()["generated_text"] == expected
            shown = c.get(f"/adapters/{adapter_id}").json()
            assert shown["kind"] == "olora-converted" and shown["rank"] == 8
        metadata = c.app.state.olora.adapters.stored("olr").metadata
        assert metadata["init"] == "recomputed" and "init" not in c.app.state.olora.adapters.stored("ol").metadata


def test_load_lora_adapter_accepts_only_uris_inside_a_configured_bucket(tmp_path, base_dir, loras, s3_server,
                                                                        bucket):  # noqa: F811
    _, url = s3_server
    put_save(url, bucket, "peft/one", loras["a"])
    put_save(url, bucket, "other/one", loras["a"])
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=f"{bucket}-x")
    put_save(url, f"{bucket}-x", "peft/one", loras["a"])
    admin = {"Authorization": "Bearer admin"}
    with server(tmp_path, base_dir, url, bucket, api_keys="user", admin_keys="admin") as c:
        def load(name, path):
            return c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=admin)
        for path in (f"s3://{bucket}-x/peft/one", f"s3://{bucket}/other/one", f"s3://{bucket}/peft",
                     f"s3://{bucket}/peft/", f"s3://{bucket}/peft/one/initial", f"s3://{bucket}/peft/../other/one",
                     f"s3://{bucket}/peftone", "s3:///peft/one", f"s3://{bucket}/peft/one?versionId=1"):
            r = load("two", path)
            assert r.status_code == 400, (path, r.text)
        assert load("two", f"s3://{bucket}/peft/missing").status_code == 404
        r = load("two", f"s3://{bucket}/peft/one")
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'two' added successfully."
        assert load("two", f"s3://{bucket}/peft/one").status_code == 400  # already loaded
        assert load("two", f"s3://{bucket}/peft/one").status_code == 400
        r = c.post("/v1/load_lora_adapter", headers=admin,
                   json={"lora_name": "two", "lora_path": f"s3://{bucket}/peft/one", "load_inplace": True})
        assert r.status_code == 200
        assert c.post("/generate", headers={"Authorization": "Bearer user"},
                      json={"inputs": PROMPT, "parameters": {"adapter_id": "two", "max_new_tokens": 2}}
                      ).status_code == 200
        assert c.app.state.olora.loader.copies is not None and ("two", c.get(
            "/adapters/two", headers=admin).json()["version"]) not in c.app.state.olora.loader.copies


def test_a_bucket_that_cannot_be_read_is_503_for_its_adapters_only(tmp_path, base_dir, loras, s3_server):  # noqa: F811
    _, url = s3_server
    with server(tmp_path, base_dir, url, "no-such-bucket") as c:
        assert upload(c, "fine", tar_gz(loras["a"])).status_code == 201
        r = gen(c, "wanted")
        assert r.status_code == 503 and r.json()["error_type"] == "adapter_source_unavailable", r.text
        assert "no-such-bucket" in r.json()["error"]
        assert gen(c, "fine").status_code == 200
