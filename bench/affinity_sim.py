"""Routing simulation: adapter-affinity (consistent hashing, optionally with bounded load) vs round-robin vs
random, for K adapters with Zipf(s) popularity over N replicas with S device slots each (LRU).

Requests arrive as a Poisson process at `--rate` per second and each occupies its replica for an exponential
service time (mean `--service-s`); the in-flight count per replica is the load that bounded-load hashing caps
at ceil(c * (in-flight + 1) / N) (Mirrokni, Thorup, Zadimoghaddam 2018: the request walks the ring past full
replicas). A request whose adapter is not in its replica's slots is a miss: one adapter load into a slot
(the least recently used adapter is evicted). Reported per policy: device-slot hit rate, adapter loads per
second at the given rate, and load imbalance (mean over time of the busiest replica's in-flight count divided
by the mean replica's).

    python bench/affinity_sim.py                      # default scenario table + sweep over S, writes the PNG
    python bench/affinity_sim.py --adapters 5000 --zipf 1.1 --replicas 8 --slots 16 --rate 200

Pure Python + numpy (matplotlib for the plot); deterministic for a given --seed. Writes
bench/out/affinity_sim.png and a copy to docs/img/affinity_sim.png (numbers: docs/scaling.md).
"""
from __future__ import annotations

import argparse
import bisect
import heapq
import math
import shutil
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("affinity", "affinity-bounded", "round-robin", "random")


@dataclass(frozen=True)
class Scenario:
    adapters: int = 1000
    zipf: float = 1.0
    replicas: int = 4
    slots: int = 8
    host_slots: int = 64  # host-memory LRU per replica (OLORA_MAX_CPU_ADAPTERS); a miss there reads the store
    rate: float = 100.0  # requests per second, whole cluster
    service_s: float = 2.0  # mean time a request occupies its replica
    requests: int = 100_000
    bound: float = 1.25  # bounded-load factor c
    vnodes: int = 160  # ring points per replica (nginx uses 160 per weight unit)
    seed: int = 0


@dataclass
class Result:
    policy: str
    hit_rate: float
    loads_per_s: float
    disk_loads_per_s: float
    imbalance: float
    spilled: float  # share of requests sent past their hashed replica (bounded load only)


def _h32(text: str) -> int:
    return zlib.crc32(text.encode())


def ring_preferences(n_adapters: int, n_replicas: int, vnodes: int) -> list[list[int]]:
    """For each adapter, the distinct replicas in ring order from its hash point (first = its owner)."""
    points = sorted((_h32(f"replica-{r}-{v}"), r) for r in range(n_replicas) for v in range(vnodes))
    hashes = [p[0] for p in points]
    prefs = []
    for a in range(n_adapters):
        i = bisect.bisect_left(hashes, _h32(f"adapter-{a}")) % len(points)
        order: list[int] = []
        while len(order) < n_replicas:
            r = points[i][1]
            if r not in order:
                order.append(r)
            i = (i + 1) % len(points)
        prefs.append(order)
    return prefs


def workload(sc: Scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival times, adapter ids, service times): Zipf(s) over K adapters, rank -> id shuffled so popularity
    is unrelated to the hash."""
    rng = np.random.default_rng(sc.seed)
    weights = 1.0 / np.arange(1, sc.adapters + 1) ** sc.zipf
    ids = rng.permutation(sc.adapters)[rng.choice(sc.adapters, size=sc.requests, p=weights / weights.sum())]
    arrivals = np.cumsum(rng.exponential(1.0 / sc.rate, size=sc.requests))
    service = rng.exponential(sc.service_s, size=sc.requests)
    return arrivals, ids, service


def simulate(sc: Scenario, policy: str, prefs: list[list[int]], wl) -> Result:
    arrivals, ids, service = wl
    rng = np.random.default_rng(sc.seed + 1)
    random_choice = rng.integers(0, sc.replicas, size=sc.requests)
    slots = [OrderedDict() for _ in range(sc.replicas)]
    host = [OrderedDict() for _ in range(sc.replicas)]
    in_flight = [0] * sc.replicas
    departures: list[tuple[float, int]] = []
    warm = sc.requests // 10  # the first 10% of requests warm the caches: measured from there on
    hits = disk_loads = spilled = 0
    imbalance_sum = 0.0
    for i in range(sc.requests):
        now = arrivals[i]
        while departures and departures[0][0] <= now:
            in_flight[heapq.heappop(departures)[1]] -= 1
        adapter = int(ids[i])
        if policy == "affinity":
            replica = prefs[adapter][0]
        elif policy == "affinity-bounded":
            cap = math.ceil(sc.bound * (sum(in_flight) + 1) / sc.replicas)
            replica = next((r for r in prefs[adapter] if in_flight[r] < cap), prefs[adapter][0])
            spilled += i >= warm and replica != prefs[adapter][0]
        elif policy == "round-robin":
            replica = i % sc.replicas
        else:
            replica = int(random_choice[i])
        cache = slots[replica]
        if adapter in cache:
            hits += i >= warm
            cache.move_to_end(adapter)
        else:
            cache[adapter] = None
            if len(cache) > sc.slots:
                cache.popitem(last=False)
            held = host[replica]  # the device slot is filled from host memory, or from the store on disk
            if adapter in held:
                held.move_to_end(adapter)
            else:
                disk_loads += i >= warm
                held[adapter] = None
                if len(held) > sc.host_slots:
                    held.popitem(last=False)
        in_flight[replica] += 1
        heapq.heappush(departures, (now + service[i], replica))
        if i >= warm:
            imbalance_sum += max(in_flight) / (sum(in_flight) / sc.replicas)
    measured = sc.requests - warm
    duration = arrivals[-1] - arrivals[warm]
    return Result(policy, hits / measured, (measured - hits) / duration, disk_loads / duration,
                  imbalance_sum / measured, spilled / measured)


def run(sc: Scenario) -> list[Result]:
    prefs = ring_preferences(sc.adapters, sc.replicas, sc.vnodes)
    wl = workload(sc)
    return [simulate(sc, p, prefs, wl) for p in POLICIES]


def table(sc: Scenario, results: list[Result]) -> str:
    lines = [f"K={sc.adapters} adapters, Zipf s={sc.zipf}, N={sc.replicas} replicas x S={sc.slots} device slots "
             f"(host LRU {sc.host_slots}), {sc.rate:g} req/s, mean service {sc.service_s:g} s, {sc.requests} "
             f"requests, bound c={sc.bound}, seed {sc.seed}",
             "",
             "| policy | device hit rate | adapter loads/s (into slots) | store reads/s (host misses) "
             "| imbalance (max/mean in-flight) | spilled |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.policy} | {r.hit_rate:.1%} | {r.loads_per_s:.1f} | {r.disk_loads_per_s:.1f} "
                     f"| {r.imbalance:.2f} | {r.spilled:.1%} |")
    return "\n".join(lines)


def plot(base: Scenario, sweep_slots: list[int], sweep_zipf: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    by_slots = {p: [] for p in POLICIES}
    for s in sweep_slots:
        for r in run(Scenario(**{**base.__dict__, "slots": s})):
            by_slots[r.policy].append(r)
    by_zipf = {p: [] for p in POLICIES}
    for z in sweep_zipf:
        for r in run(Scenario(**{**base.__dict__, "zipf": z})):
            by_zipf[r.policy].append(r)
    styles = {"affinity": "o-", "affinity-bounded": "s--", "round-robin": "^-", "random": "x:"}
    for p in POLICIES:
        axes[0].plot(sweep_slots, [r.hit_rate for r in by_slots[p]], styles[p], label=p)
        axes[1].plot(sweep_slots, [r.loads_per_s for r in by_slots[p]], styles[p], label=p)
        axes[2].plot(sweep_zipf, [r.imbalance for r in by_zipf[p]], styles[p], label=p)
    axes[0].set(xscale="log", xlabel="device slots per replica (S)", ylabel="device-slot hit rate",
                title=f"hit rate (Zipf s={base.zipf})")
    axes[1].set(xscale="log", xlabel="device slots per replica (S)", ylabel="adapter loads / s",
                title=f"adapter loads at {base.rate:g} req/s")
    axes[2].set(xlabel="Zipf s (popularity skew)", ylabel="busiest / mean in-flight",
                title=f"load imbalance (S={base.slots})")
    for ax in axes:
        ticks = sweep_slots if ax is not axes[2] else sweep_zipf
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"K={base.adapters} adapters over N={base.replicas} replicas, LRU device slots "
                 f"({base.requests} requests, seed {base.seed})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=d.adapters)
    p.add_argument("--zipf", type=float, default=d.zipf)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--slots", type=int, default=d.slots)
    p.add_argument("--host-slots", type=int, default=d.host_slots)
    p.add_argument("--rate", type=float, default=d.rate)
    p.add_argument("--service-s", type=float, default=d.service_s)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--bound", type=float, default=d.bound)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    sc = Scenario(adapters=a.adapters, zipf=a.zipf, replicas=a.replicas, slots=a.slots, host_slots=a.host_slots,
                  rate=a.rate, service_s=a.service_s, requests=a.requests, bound=a.bound, seed=a.seed)
    start = time.perf_counter()
    print(table(sc, run(sc)))
    if not a.no_plot:
        out = ROOT / "bench" / "out" / "affinity_sim.png"
        plot(sc, [2, 4, 8, 16, 32, 64], [0.6, 0.8, 1.0, 1.2, 1.4], out)
        doc_copy = ROOT / "docs" / "img" / "affinity_sim.png"
        doc_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, doc_copy)
        print(f"\nplot: {out.relative_to(ROOT)} (copy: {doc_copy.relative_to(ROOT)})")
    print(f"took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
