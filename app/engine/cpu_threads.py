"""How many intra-op threads the engine's forwards use on CPU (`cpu_threads`; 0 = auto): one CPU is left free.

torch's default is one thread per core, and one thread pool (OpenMP) per process. In the server that pool's
threads share the cores with the HTTP event loop (tokenizing, detokenizing, SSE), and on a shared machine with
everything else. Every parallel region of a forward (hundreds per decode step: each GEMM, each elementwise op)
ends at a barrier that waits for its slowest thread; a thread the OS has preempted for another runnable thread
holds the whole step for a scheduler slice. Measured on the 2-core machine of docs/benchmarks.md (section "The
base path at the 0.5B shape"): the decode step of a 0.5B model took 4.4 s with 2 threads and 0.85 s with 1 while
other processes ran, so auto leaves one CPU to the event loop and the neighbours:

    threads = max(1, usable_cpus - 1)     usable_cpus: the CPUs this process may run on (sched_getaffinity),
                                          at most its cgroup's CPU quota rounded up (a container's CPU limit)

On CUDA the forwards run on the GPU and torch's default is kept. The setting is process-wide (torch has one
intra-op pool per process): it is applied when the engine is built and again by the engine's loop thread
(OpenMP's thread count is a per-thread setting).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # intra-op threads of the engine's forwards
    reason: str  # one line for the start-up log


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """The CPU quota of this process's cgroup (Kubernetes `resources.limits.cpu`, `docker run --cpus`) rounded up
    to whole CPUs; None without a quota or a readable cgroup v2 file."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on (its affinity mask; a container's cpuset), capped by its cgroup's CPU quota
    (a limit of 4 CPUs on a 64-core node is 4: 63 threads would each get a sliver of the quota), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity on this platform
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    return max(1, min(cpus, limit) if limit is not None else cpus)


def choose_cpu_threads(requested: int, device: torch.device, cpus: int | None = None) -> ThreadChoice:
    """`requested` > 0 is used as given; 0 = auto (module docstring)."""
    if requested > 0:
        return ThreadChoice(requested, f"{requested} intra-op threads (cpu_threads={requested})")
    if device.type != "cpu":
        current = torch.get_num_threads()
        return ThreadChoice(current, f"{current} intra-op threads (torch's default; the forwards run on {device})")
    cpus = usable_cpus() if cpus is None else cpus
    threads = max(1, cpus - 1)
    return ThreadChoice(threads, f"{threads} intra-op threads (auto: {cpus} usable CPUs, one left to the event loop)")


def apply_cpu_threads(threads: int) -> None:
    """Set torch's intra-op thread count for the process and for the calling thread."""
    torch.set_num_threads(threads)
