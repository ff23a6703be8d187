"""A real `olora serve` process on a free loopback port, for the end-to-end and multi-replica tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from test_deploy_validation import free_port


class Replica:
    """One `olora serve` process on a free loopback port; started without waiting (two start in parallel)."""

    def __init__(self, name: str, base_dir: Path, store: Path, log_dir: Path, extra_env: dict | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OLORA_MODEL": str(base_dir), "OLORA_ADAPTER_DIR": str(store),
               "OLORA_DEMO_ADAPTERS": "false", "OLORA_MAX_BATCH_SIZE": "8", "OLORA_MAX_LORAS": "4",
               "OLORA_MAX_CPU_ADAPTERS": "16", **(extra_env or {})}  # extra_env wins
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "olora_core.cli", "serve", "--port", str(self.port)],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited: {self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout_s} s: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 20)
        self._log.close()


def stop_process(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Ask a process started by a test to stop with `sig`; killed if it is still there after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
