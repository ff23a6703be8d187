"""Adapter sources at scale: a store of N (default 10,000) registered adapters on the embedded default model.

Measures: the time to write the store, server start (lifespan: index rebuild + engine), `/v1/models` p50/p95,
the watcher's cost (one `index.refresh()` with nothing changed, per poll, as a share of one core at the default
1 s poll; one full `index.rebuild()`, amortized over the default 60 s rescan), and the first request for a
rank-16 adapter that is only in an S3-compatible store (moto's S3 server on loopback) vs. the next one.
With --sweep-only: the store's sweep (retired versions, damage) at N adapters, full vs. the watcher's periodic one
that follows the journal (nothing changed; 10 adapters overwritten since the last sweep), no server.

    .venv/bin/python bench/sources_bench.py [--adapters 10000] [--skip-s3] [--sweep-only]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _upload(client, adapter_id: str, lora: Path):
    from http_helpers import tar_gz, upload

    r = upload(client, adapter_id, tar_gz(lora))
    assert r.status_code == 201, r.text
    return r


def bench_many(work: Path, lora: Path, n: int) -> dict:
    from fastapi.testclient import TestClient

    from app.adapters.store.local_repository import LocalDirectoryRepository
    from app.server.main import create_app
    from app.server.settings import Settings

    settings = Settings(adapter_dir=work / "store", demo_adapters=False)
    with TestClient(create_app(settings)) as c:
        _upload(c, "seed", lora)
        stored = c.app.state.olora.adapters.stored("seed")
    repository = LocalDirectoryRepository(work / "store")
    started = time.perf_counter()
    for i in range(n):
        repository.put(f"a{i:05d}", stored.path, dict(stored.metadata))
    write_s = time.perf_counter() - started

    started = time.perf_counter()
    with TestClient(create_app(settings)) as c:
        start_s = time.perf_counter() - started
        index = c.app.state.olora.adapters.index
        models = []
        for _ in range(30):
            t = time.perf_counter()
            r = c.get("/v1/models")
            models.append(time.perf_counter() - t)
            assert r.status_code == 200 and len(r.json()["data"]) >= n
        refresh = []
        for _ in range(200):
            t = time.process_time()
            index.refresh()
            refresh.append(time.process_time() - t)
        t = time.perf_counter()
        index.rebuild()
        rebuild_s = time.perf_counter() - t
    poll_cpu = statistics.mean(refresh)  # CPU seconds per poll, one poll a second
    return {"adapters": n + 1, "write_store_s": round(write_s, 1), "start_s": round(start_s, 2),
            "v1_models_p50_ms": round(1000 * statistics.median(models), 1),
            "v1_models_p95_ms": round(1000 * sorted(models)[int(0.95 * len(models)) - 1], 1),
            "watcher_poll_cpu_ms": round(1000 * poll_cpu, 3),
            "watcher_share_of_a_core_at_1s_poll_pct": round(100 * poll_cpu / 1.0, 4),
            "full_rebuild_s": round(rebuild_s, 2),
            "rebuild_share_of_a_core_at_60s_rescan_pct": round(100 * rebuild_s / 60.0, 2)}


def bench_sweep(work: Path, lora: Path, n: int) -> dict:
    """CPU seconds of one sweep (the watcher runs one every 30 s): full, and following the journal."""
    from app.adapters.store.local_repository import LocalDirectoryRepository

    (work / "plain").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (work / "plain" / name).write_bytes((lora / name).read_bytes())
    writer = LocalDirectoryRepository(work / "sweep-store")
    for i in range(n):
        writer.put(f"a{i:05d}", work / "plain", {})
    sweeper = LocalDirectoryRepository(work / "sweep-store")

    def timed(**kwargs) -> float:
        t = time.process_time()
        sweeper.sweep(**kwargs)
        return time.process_time() - t
    first = timed()  # no cursor yet: a full pass
    full = statistics.median(timed(full=True) for _ in range(3))
    idle = statistics.median(timed() for _ in range(20))
    changed = []
    for round_ in range(5):
        for i in range(10):
            writer.put(f"a{(round_ * 10 + i) * 7 % n:05d}", work / "plain", {}, overwrite=True)
        changed.append(timed())
    return {"adapters": n, "first_sweep_cpu_s": round(first, 3), "full_sweep_cpu_s": round(full, 3),
            "periodic_sweep_nothing_changed_cpu_ms": round(1000 * idle, 3),
            "periodic_sweep_10_changed_cpu_ms": round(1000 * statistics.median(changed), 2),
            "full_sweep_share_of_a_core_every_30s_pct": round(100 * full / 30.0, 3),
            "periodic_sweep_share_of_a_core_every_30s_pct": round(100 * idle / 30.0, 5)}


def bench_s3_first_request(work: Path, lora: Path) -> dict:
    from fastapi.testclient import TestClient
    from moto.server import ThreadedMotoServer
    import boto3

    from app.server.main import create_app
    from app.server.settings import Settings

    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's access log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        common = dict(demo_adapters=False, store="s3", s3_bucket="bench", s3_endpoint_url=url)
        with TestClient(create_app(Settings(adapter_dir=work / "s3-a", **common))) as a:
            _upload(a, "cold", lora)
        body = {"inputs": "hello", "parameters": {"adapter_id": "cold", "max_new_tokens": 1}}
        with TestClient(create_app(Settings(adapter_dir=work / "s3-b", **common))) as b:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                r = b.post("/generate", json=body)
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
    finally:
        server.stop()
    return {"first_request_only_in_s3_s": round(times[0], 3), "next_requests_s": [round(x, 3) for x in times[1:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--sweep-only", action="store_true", help="only the store's sweep (no server)")
    args = parser.parse_args()
    from helpers import save_random_lora
    from olora_core.default_model import default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lora = Path(save_random_lora(default_model_path(), work / "lora16", r=16, seed=1, task_type="CAUSAL_LM"))
        if args.sweep_only:
            print(json.dumps({"sweep": bench_sweep(work, lora, args.adapters)}, indent=2))
            return
        out = {"many": bench_many(work, lora, args.adapters), "sweep": bench_sweep(work, lora, args.adapters)}
        if not args.skip_s3:
            out["s3"] = bench_s3_first_request(work, lora)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
