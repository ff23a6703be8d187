"""The S3-compatible object store as the adapter repository, against a real S3-protocol HTTP server on loopback
(moto's server, started here; boto3 talks to it over HTTP, unpatched): two replicas with no shared folder."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer

from app.adapters.store.adapter_store import AdapterExists
from app.adapters.store.s3_repository import S3Repository
from app.server.main import create_app
from app.server.settings import Settings
from helpers import save_random_lora, save_tiny_checkpoint
from http_helpers import tar_gz, upload

PROMPT = "hello world"
BUCKET = "adapters"
PROPAGATION_S = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield server, f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)


@pytest.fixture()
def bucket(s3_server, request):
    _, url = s3_server
    name = f"b-{request.node.name.lower().replace('_', '-')[:40]}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", seed=0))


@pytest.fixture(scope="module")
def loras(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: Path(save_random_lora(base_dir, root / name, r=4, seed=seed, task_type="CAUSAL_LM"))
            for name, seed in (("a", 1), ("b", 2))}


def replica(tmp_path: Path, name: str, base_dir: Path, url: str, bucket: str, **overrides) -> TestClient:
    values = dict(model=str(base_dir), adapter_dir=tmp_path / name, demo_adapters=False, max_batch_size=4,
                  max_input_tokens=64, max_total_tokens=128, max_loras=2, max_cpu_adapters=4, max_rank=16,
                  store="s3", s3_bucket=bucket, s3_endpoint_url=url, s3_timeout_s=2.0, store_poll_s=0.1)
    values.update(overrides)
    return TestClient(create_app(Settings(**values)))


def gen(client, adapter_id):
    return client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": adapter_id,
                                                                          "max_new_tokens": 4}})


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_two_replicas_on_one_bucket(tmp_path, base_dir, loras, s3_server, bucket):
    _, url = s3_server
    with replica(tmp_path, "a", base_dir, url, bucket) as a, replica(tmp_path, "b", base_dir, url, bucket) as b:
        assert upload(a, "x", tar_gz(loras["a"])).status_code == 201
        text_a = gen(a, "x").json()["generated_text"]
        assert gen(b, "x").json()["generated_text"] == text_a  # no shared folder: fetched from the bucket
        assert not (tmp_path / "a" / "x").is_relative_to(tmp_path / "b")

        assert upload(a, "x", tar_gz(loras["b"]), overwrite=True).status_code == 201
        sha_b = a.get("/adapters/x").json()["sha256"]
        assert wait_until(lambda: b.get("/adapters/x").json()["sha256"] == sha_b, PROPAGATION_S)
        assert gen(b, "x").json()["generated_text"] == gen(a, "x").json()["generated_text"]

        assert a.delete("/adapters/x").status_code == 200
        assert wait_until(lambda: gen(b, "x").status_code == 404, PROPAGATION_S)
        assert b.get("/adapters/x").status_code == 404 and "x" not in str(b.get("/v1/models").json())


def test_racing_uploads_of_one_id(tmp_path, base_dir, loras, s3_server, bucket):
    _, url = s3_server
    with replica(tmp_path, "a", base_dir, url, bucket) as a, replica(tmp_path, "b", base_dir, url, bucket) as b:
        barrier = threading.Barrier(2)

        def send(args):
            client, lora = args
            barrier.wait()
            return upload(client, "raced", tar_gz(lora))
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(send, [(a, loras["a"]), (b, loras["b"])]))
        assert sorted(r.status_code for r in results) == [201, 409], [r.text for r in results]
        winner = next(r for r in results if r.status_code == 201).json()
        for client in (a, b):  # whole, and the same on both
            assert wait_until(lambda c=client: c.get("/adapters/raced").json().get("sha256") == winner["sha256"],
                              PROPAGATION_S)
            assert gen(client, "raced").status_code == 200


def test_the_live_version_switch_is_conditional(tmp_path, loras, s3_server, bucket):
    """A writer that read the pointer before another replica switched it: its conditional write fails (S3's
    412), it does not overwrite blindly. For a new id it loses (409); for an overwrite it reads again and wins."""
    _, url = s3_server
    first = S3Repository(bucket, "p", tmp_path / "one", endpoint_url=url)
    second = S3Repository(bucket, "p", tmp_path / "two", endpoint_url=url)
    first.put("id1", loras["a"], {"sha256": "x"})
    stale = second._pointer  # what `second` would have read before `first` wrote
    calls = []

    def pointer_read_too_early(adapter_id):  # both reads of `put` (its early check, then the switch's) too early
        calls.append(adapter_id)
        return None if len(calls) <= 2 else stale(adapter_id)
    second._pointer = pointer_read_too_early
    with pytest.raises(AdapterExists):
        second.put("id1", loras["b"], {"sha256": "y"})
    assert len(calls) == 2  # refused by the bucket's 412 on `If-None-Match: *`, not by a third read
    assert first.resolve("id1").version == first.get("id1").version  # still first's
    assert version_folders(second, "p", "id1") == {first.resolve("id1").version}  # the loser's objects removed
    before = first.resolve("id1")
    old_etag = stale("id1")[1]
    first.put("id1", loras["b"], {"sha256": "z"}, overwrite=True)
    with pytest.raises(Exception) as err:  # the etag `second` read is stale now
        second._s3.put_object(Bucket=bucket, Key="p/id1/CURRENT", Body=b"{}", IfMatch=old_etag)
    assert "PreconditionFailed" in str(err.value) or "412" in str(err.value)
    assert first.resolve("id1").version != before.version


def test_corrupt_or_missing_objects_are_503_for_that_adapter(tmp_path, base_dir, loras, s3_server, bucket):
    _, url = s3_server
    s3 = boto3.client("s3", endpoint_url=url)
    with replica(tmp_path, "a", base_dir, url, bucket) as a:
        for name in ("corrupt", "missing", "fine"):
            assert upload(a, name, tar_gz(loras["a"])).status_code == 201
        version = a.get("/adapters/corrupt").json()["version"]
        s3.put_object(Bucket=bucket, Key=f"adapters/corrupt/versions/{version}/adapter_model.safetensors",
                      Body=b"not the weights")
        version = a.get("/adapters/missing").json()["version"]
        s3.delete_object(Bucket=bucket, Key=f"adapters/missing/versions/{version}/adapter_model.safetensors")
    with replica(tmp_path, "b", base_dir, url, bucket) as b:  # a fresh cache: everything comes from the bucket
        r = gen(b, "corrupt")
        assert r.status_code == 503 and "digest" in r.json()["error"]
        r = gen(b, "missing")
        assert r.status_code == 503 and "missing" in r.json()["error"]
        assert gen(b, "fine").status_code == 200


def test_the_store_going_away_and_coming_back(tmp_path, base_dir, loras, s3_server, bucket):
    server, url = s3_server
    with replica(tmp_path, "a", base_dir, url, bucket) as a, replica(tmp_path, "b", base_dir, url, bucket) as b:
        for name in ("cached", "later"):
            assert upload(a, name, tar_gz(loras["a"])).status_code == 201
        assert gen(b, "cached").status_code == 200
        server.stop()
        try:
            assert gen(b, "cached").status_code == 200  # indexed and on local disk: no store needed
            r = gen(b, "never-uploaded")  # the store cannot say: 503, not 404
            assert r.status_code in (503, 504), r.text
            assert b.get("/health").status_code == 200
        finally:
            server.start()
        assert wait_until(lambda: gen(b, "later").status_code == 200, PROPAGATION_S)
        assert gen(b, "never-uploaded").status_code == 404


def test_on_demand_load_of_50_adapters_under_concurrency(tmp_path, base_dir, loras, s3_server, bucket):
    _, url = s3_server
    with replica(tmp_path, "a", base_dir, url, bucket) as a:
        assert upload(a, "seed", tar_gz(loras["a"])).status_code == 201
        stored = a.app.state.olora.adapters.stored("seed")
        writer = S3Repository(bucket, "adapters", tmp_path / "writer", endpoint_url=url)
        for i in range(50):  # the validated adapter under 50 ids, as 50 uploads would have stored it
            writer.put(f"n{i}", stored.path, dict(stored.metadata))
        expected = gen(a, "seed").json()["generated_text"]
    with replica(tmp_path, "b", base_dir, url, bucket, max_waiting=256) as b:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: gen(b, f"n{i}"), range(50)))
        assert [r.status_code for r in results] == [200] * 50
        assert {r.json()["generated_text"] for r in results} == {expected}


def version_folders(repo: S3Repository, prefix: str, adapter_id: str) -> set[str]:
    listed = repo._s3.list_objects_v2(Bucket=repo.bucket, Prefix=f"{prefix}/{adapter_id}/versions/")
    return {o["Key"].split("/")[3] for o in listed.get("Contents", [])}


def test_retired_versions_are_removed_after_their_grace(tmp_path, loras, s3_server, bucket, monkeypatch):
    """Overwritten and deleted versions leave the bucket once past RETIRED_GRACE_S, never the live one, and
    never before the grace; periodic sweeps find them from the change objects."""
    from app.adapters.store import s3_retired

    _, url = s3_server
    writer = S3Repository(bucket, "p", tmp_path / "w", endpoint_url=url)
    sweeper = S3Repository(bucket, "p", tmp_path / "s", endpoint_url=url)  # another replica
    assert sweeper.sweep(full=True) == []  # the start's full pass: nothing there yet
    writer.put("kept", loras["a"], {"sha256": "a"})
    writer.put("kept", loras["b"], {"sha256": "b"}, overwrite=True)
    writer.put("gone", loras["a"], {"sha256": "a"})
    writer.delete("gone")
    assert len(version_folders(writer, "p", "kept")) == 2 and len(version_folders(writer, "p", "gone")) == 1
    sweeper.sweep()  # within the grace: nothing removed (a replica may still be downloading the old version)
    assert len(version_folders(writer, "p", "kept")) == 2 and len(version_folders(writer, "p", "gone")) == 1
    monkeypatch.setattr(s3_retired, "RETIRED_GRACE_S", 0.0)
    time.sleep(1.1)  # LastModified has a resolution of one second
    sweeper.sweep()  # periodic: the ids are still pending from the sweep above
    assert version_folders(writer, "p", "kept") == {writer.resolve("kept").version}
    assert version_folders(writer, "p", "gone") == set()
    assert writer.get("kept") is not None  # the live version still served
