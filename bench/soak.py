"""Mixed-traffic soak of a real `olora serve` process: no 5xx, every body and SSE event strict JSON, flat RSS and
file descriptors (run by hand for minutes; tests/test_campaign.py runs it for seconds).

    .venv/bin/python bench/soak.py --seconds 300 --workers 6     # writes bench/out/soak.json

The server runs a tiny random Llama (tests/helpers.py's checkpoint) with a few rank-4 adapters. Each worker loops
over a random mix: TGI /generate, /generate_stream and the compat route, OpenAI completions and chat (streamed and
not) with log-probabilities under top-p/top-k/temperature masks, per-request merges (new weights each time: the
merge cache churns), POST /adapters/merge, overwrite uploads and delete/re-upload of a churn adapter, reads
(/adapters, /cache, /metrics, /health) and hostile bodies (800 merge ids, broken JSON, unknown adapters). The
server's RSS (VmRSS) and open file descriptors are sampled every second.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Return the number of items"


def _refuse_constant(name: str):
    raise ValueError(f"non-JSON constant {name}")


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (what a strict client parser does)."""
    return json.loads(text, parse_constant=_refuse_constant)


@dataclass
class SoakReport:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # 5xx, non-JSON bodies or events, transport errors
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, RSS bytes, open fds)


def process_usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of a process, from /proc."""
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def adapter_archive(adapter_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(str(adapter_dir), arcname="adapter")
    return buf.getvalue()


def _sampling() -> dict:
    return random.choice([{}, {"top_p": 0.5, "temperature": 0.05}, {"top_k": 2}, {"typical_p": 0.5},
                          {"temperature": 2.0}, {"top_k": 3, "top_p": 0.9}])


def _requests(adapters: list[str], archive: bytes) -> list:
    """(method, path, kwargs, kind) factories; kind: "json", "sse" or "text"."""
    adapter = lambda: random.choice(adapters + [None])  # noqa: E731
    tgi = lambda: {"max_new_tokens": random.randint(1, 6), "details": True, "top_n_tokens": 5,  # noqa: E731
                   "do_sample": True, "adapter_id": adapter(), **_sampling()}
    openai = lambda: {"model": adapter() or "base", "max_tokens": 4,  # noqa: E731
                      **{k: v for k, v in _sampling().items() if k in ("top_p", "temperature")}}
    chat = [{"role": "user", "content": PROMPT}]
    merge_ids = lambda: random.sample(adapters, 2)  # noqa: E731
    return [
        lambda: ("POST", "/generate", {"json": {"inputs": PROMPT, "parameters": tgi()}}, "json"),
        lambda: ("POST", "/generate_stream", {"json": {"inputs": PROMPT, "parameters": tgi()}}, "sse"),
        lambda: ("POST", "/", {"json": {"inputs": PROMPT, "parameters": tgi(), "stream": True}}, "sse"),
        lambda: ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "logprobs": 5, **openai()}}, "json"),
        lambda: ("POST", "/v1/chat/completions", {"json": {"messages": chat, "logprobs": True, "top_logprobs": 5,
                                                           "stream": True, **openai()}}, "sse"),
        lambda: ("POST", "/generate", {"json": {"inputs": PROMPT, "parameters": {
            "max_new_tokens": 2, "merged_adapters": {"ids": merge_ids(), "weights": [random.random(), 0.5]}}}},
                 "json"),
        lambda: ("POST", "/adapters/merge", {"json": {"adapter_id": "soak-merged", "overwrite": True,
                                                      "sources": [{"id": i} for i in merge_ids()]}}, "json"),
        lambda: ("POST", "/adapters?overwrite=true", {"data": {"adapter_id": "soak-churn"}, "files": {
            "archive": ("a.tgz", archive, "application/gzip")}}, "json"),
        lambda: ("DELETE", "/adapters/soak-churn", {}, "json"),
        lambda: ("GET", random.choice(["/adapters", "/cache", "/health", "/adapters/soak-churn"]), {}, "json"),
        lambda: ("GET", "/metrics", {}, "text"),
        lambda: ("POST", "/generate", {"json": {"inputs": PROMPT, "parameters": {
            "merged_adapters": {"ids": [adapters[0]] * 800}}}}, "json"),
        lambda: ("POST", "/generate", {"content": b"{broken", "headers": {"content-type": "application/json"}},
                 "json"),
        lambda: ("POST", "/generate", {"json": {"inputs": PROMPT, "parameters": {"adapter_id": "no-such"}}},
                 "json"),
    ]


def _check(response: httpx.Response, kind: str) -> str | None:
    """Why this answer breaks the contract, or None."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:200]}"
    try:
        if kind == "sse" and response.status_code == 200:
            events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
            for payload in events:
                if payload != "[DONE]":
                    body = strict_json(payload)
                    if "error" in body:
                        return f"in-band error: {payload[:200]}"
            return None if events else "an empty stream"
        if kind != "text" or response.status_code != 200:
            strict_json(response.text)
    except ValueError as exc:
        return f"not JSON ({exc}): {response.text[:200]}"
    return None


def run_traffic(url: str, seconds: float, workers: int, adapters: list[str], archive: bytes, pid: int,
                seed: int = 0) -> SoakReport:
    """`workers` closed-loop clients for `seconds` against `url`; the server process `pid` is sampled each second."""
    report = SoakReport()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    factories = _requests(adapters, archive)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                method, path, kwargs, kind = rng.choice(factories)()
                try:
                    problem = _check(client.request(method, path, **kwargs), kind)
                    status = "ok" if problem is None else "bad"
                except httpx.HTTPError as exc:
                    problem, status = f"{type(exc).__name__}: {exc}", "transport"
                with lock:
                    report.requests += 1
                    report.statuses[status] += 1
                    if problem is not None:
                        report.failures.append(f"{method} {path}: {problem}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        report.samples.append((time.monotonic() - started, *process_usage(pid)))
        time.sleep(1.0)
    return report


class SoakServer:
    """`olora serve` on a free loopback port over a fresh store, with `n_adapters` uploaded."""

    def __init__(self, base_dir: Path, adapter_dirs: list[Path], work: Path, **env: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "server.log", "ab")
        environ = dict(os.environ, OLORA_MODEL=str(base_dir), OLORA_ADAPTER_DIR=str(work / "store"),
                       OLORA_DEMO_ADAPTERS="false", OLORA_MAX_BATCH_SIZE="8", OLORA_MAX_LORAS="4",
                       OLORA_MAX_RANK="16", **env)
        self.proc = subprocess.Popen([sys.executable, "-m", "olora_core.cli", "serve", "--port", str(self.port)],
                                     env=environ, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self._wait_ready()
        self.adapters = []
        for i, adapter_dir in enumerate(adapter_dirs):
            r = httpx.post(self.url + "/adapters", data={"adapter_id": f"soak-{i}"}, timeout=120,
                           files={"archive": ("a.tgz", adapter_archive(adapter_dir), "application/gzip")})
            assert r.status_code == 201, r.text
            self.adapters.append(f"soak-{i}")

    def _wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the server exited at start"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("the server was not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def summary(report: SoakReport, warmup_s: float) -> dict:
    """Numbers for docs/benchmarks.md: RSS and fds after warm-up and at the end."""
    warm = [s for s in report.samples if s[0] >= warmup_s] or report.samples
    rss = [s[1] for s in warm]
    fds = [s[2] for s in warm]
    return {"requests": report.requests, "statuses": dict(report.statuses), "failures": report.failures[:20],
            "rss_mib_first": round(rss[0] / 2**20, 1), "rss_mib_last": round(rss[-1] / 2**20, 1),
            "rss_mib_max": round(max(rss) / 2**20, 1), "fds_first": fds[0], "fds_last": fds[-1],
            "fds_max": max(fds), "samples": len(report.samples),
            # RSS and fds at the end of each quarter of the measured part: a leak shows as a steady climb
            "rss_mib_by_quarter": [round(rss[min(len(rss) - 1, len(rss) * q // 4)] / 2**20, 1) for q in (1, 2, 3, 4)],
            "fds_by_quarter": [fds[min(len(fds) - 1, len(fds) * q // 4)] for q in (1, 2, 3, 4)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS/fds count as the start")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import save_random_lora, save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = Path(save_tiny_checkpoint(work / "base", seed=0))
        loras = [Path(save_random_lora(base, work / f"lora{i}", r=4, seed=i + 1, task_type="CAUSAL_LM"))
                 for i in range(3)]
        server = SoakServer(base, loras, work)
        try:
            report = run_traffic(server.url, args.seconds, args.workers, server.adapters,
                                 adapter_archive(loras[0]), server.proc.pid)
        finally:
            server.stop()
    result = {"seconds": args.seconds, "workers": args.workers, **summary(report, args.warmup)}
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if not report.failures and math.isfinite(result["rss_mib_last"]) else 1


if __name__ == "__main__":
    sys.exit(main())
