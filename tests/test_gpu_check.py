"""bench/gpu_check.py --smoke: the GPU script runs end to end on CPU with a tiny model and saves its JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_gpu_check_smoke(tmp_path):
    import gpu_check

    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    phases = report["phases"]
    assert [row["m"] for row in phases["matmul"]["rows"]] == [1, 8, 32, 128, 512]
    for quantize in ("none", "nf4"):
        run = phases[f"engine_{quantize}"]
        assert "error" not in run, run
        assert run["base"]["tokens"] == run["adapters"]["tokens"] == report["requests"] * report["new_tokens"]
        assert run["gemm_floor_ms"] > 0 and run["max_loras"] >= report["concurrency"]  # auto: from memory, >= rows
        assert run["decode_step_adapters"]["lora_mode"] in ("rows", "bgmv", "grouped")
        assert run["decode_step_base"]["lora_mode"] == "none"
        # LoRA adds work per step: more ops than the base step (the profiler did see the step)
        assert run["decode_step_adapters"]["aten_ops"] > run["decode_step_base"]["aten_ops"] > 0
    assert phases["anchor"]["target"] == 0.7 and report["vllm_anchor"]["lora_tokens_per_s"] == 1788
