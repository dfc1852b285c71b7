"""`runner: ray` against the local runner, measured in one run on one local Ray cluster.

1. Overhead: a cheap pipeline (Parquet input -> TextStats -> RegexFilter -> LengthFilter) over `--rows` rows (1M),
   run by the local runner and by the Ray runner (one actor per step on 2 CPUs, the cluster already up): the time
   ratio ray / local, the cluster's start time beside it, and per step the Ray runner's time to its first committed
   batch (pool start: a worker process, imports, the step's load()) apart from its time from first to last batch.
2. Scale-out of a model step: Respond against the fault server with a fixed latency (200 ms a request), run with 1, 2
   and 4 actors; each actor keeps `--per-actor` requests in flight (the spec's max_concurrency is divided among the
   actors). Reported: wall time, and the steady throughput (rows between the first and the last committed batch,
   over that time, so actor start-up is shown apart), as ratios to 1 actor and to the ideal
   (actors x per-actor / 0.2 s requests a second).
3. Sharded NearDedup search: `--dedup-rows` unit vectors (384 dimensions, a tenth of them planted near-duplicates)
   split into 8 k-means clusters, each searched exactly: one after another on the driver (the local runner's way)
   against a Ray task per cluster (the Ray runner's way), same pairs asserted, as a time ratio.

    python benchmarks/ray_runner.py [--rows 1000000] [--requests 1200] [--per-actor 8] [--parts 1,2,3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_overhead import REGEX, make_input  # the same synthetic rows as the engine benchmark


def cheap_pipeline(inp: Path) -> Any:
    from thresher.data.steps import Load
    from thresher.filters import LengthFilter, RegexFilter
    from thresher.scorers import TextStats

    return Load(path=inp) >> TextStats() >> RegexFilter(pattern=REGEX) >> LengthFilter(min_chars=20, max_chars=2000)


def model_pipeline(inp: Path, base_url: str, concurrency: int) -> Any:
    from thresher.data.steps import Load
    from thresher.generators import Respond

    spec = {"kind": "openai", "base_url": base_url, "model": "fake", "max_concurrency": concurrency, "cache": False}
    return Load(path=inp) >> Respond(backend=spec, max_tokens=16, batch_size=16)


def timed(pipe: Any, run_dir: Path, **kw: Any) -> tuple[float, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = pipe.run(run_dir, progress=False, **kw)
    return time.perf_counter() - t0, res


def steady_rate(res: Any, step: str) -> float:
    """Rows a second between the first and the last committed batch of `step` (actor start-up left out)."""
    from thresher.pipelines.runner import _shard_range, list_shards

    shards = list_shards(res.output_dir(step))
    times = sorted((p.stat().st_mtime, _shard_range(p)) for p in shards)
    rows = sum(b - a for _, (a, b) in times[1:])
    span = times[-1][0] - times[0][0]
    return rows / span if span > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--per-actor", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--dedup-rows", type=int, default=100_000)
    ap.add_argument("--parts", default="1,2,3", help="which measurements to run (1, 2, 3)")
    args = ap.parse_args()
    parts = {int(x) for x in args.parts.split(",")}

    import ray

    work = Path(tempfile.mkdtemp(prefix="thresher-ray-bench-"))
    os.environ["THRESHER_NO_CACHE"] = "1"
    try:
        print(f"{os.cpu_count()} CPUs (shared: figures vary with the machine's load)")
        t0 = time.perf_counter()
        ray.init(num_cpus=2, object_store_memory=int(2e8), include_dashboard=False, log_to_driver=False)
        start_s = time.perf_counter() - t0
        if 1 in parts:
            overhead(args, work, start_s)
        if 2 in parts:
            scale_out(args, work)
        if 3 in parts:
            sharded_search(args.dedup_rows, work)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def overhead(args: Any, work: Path, start_s: float) -> None:
    inp = work / "rows.parquet"
    make_input(inp, args.rows)
    print(f"input: {args.rows:,} rows")
    local_s, local = timed(cheap_pipeline(inp), work / "local")
    ray_s, on_ray = timed(cheap_pipeline(inp), work / "ray", runner="ray")
    for name in ("text_stats", "regex_filter", "length_filter"):
        assert on_ray.table(name).num_rows == local.table(name).num_rows, name
    print(f"\n1. cheap pipeline, {args.rows:,} rows, 3 row steps (1 actor per step)")
    print(f"   local runner {local_s:7.2f}s   ray runner {ray_s:7.2f}s   ratio ray/local {ray_s / local_s:.2f}x"
          f"   (Ray cluster start, not counted: {start_s:.1f}s)")
    print(f"   {'step':14s} {'local s':>8s} {'ray s':>8s} {'ray: to 1st batch':>18s} {'ray: 1st to last':>17s}")
    for name in ("text_stats", "regex_filter", "length_filter"):
        rec = on_ray.steps[name]
        times = sorted(p.stat().st_mtime for p in on_ray.output_dir(name).glob("part-*.parquet"))
        print(f"   {name:14s} {local.steps[name].seconds:8.2f} {rec.seconds:8.2f} "
              f"{times[0] - rec.started_at:18.2f} {times[-1] - times[0]:17.2f}")


def scale_out(args: Any, work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thresher.llms.testing import FaultServer

    prompts = work / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(args.requests)],
                             "instruction": [f"Say something about number {i}." for i in range(args.requests)],
                             "input": [""] * args.requests, "output": [None] * args.requests}), prompts)  # fmt: skip
    print(f"\n2. Respond, {args.requests} requests at {args.latency * 1000:.0f} ms, {args.per_actor} in flight "
          "per actor")
    print(f"   {'actors':>6s} {'wall s':>8s} {'steady rows/s':>14s} {'vs 1 actor':>11s} {'vs ideal':>9s}")
    base = None
    per_actor_rate = []
    with FaultServer(latency=args.latency) as server:
        for actors in (1, 2, 4):
            pipe = model_pipeline(prompts, server.base_url, args.per_actor * actors)
            pipe.ray_options = {"actors": actors, "num_cpus": 0.5}
            wall, res = timed(pipe, work / f"model-{actors}", runner="ray")
            assert res.table("respond").num_rows == args.requests
            rate = steady_rate(res, "respond")
            base = base or rate
            ideal = actors * args.per_actor / args.latency
            per_actor_rate.append(rate / actors)
            print(f"   {actors:6d} {wall:8.2f} {rate:14.1f} {rate / base:10.2f}x {rate / ideal:8.2f}x")
    print(f"   measured per-actor throughput: {', '.join(f'{r:.1f}' for r in per_actor_rate)} rows/s "
          f"(ideal {args.per_actor / args.latency:.1f})")


def sharded_search(n: int, work: Path) -> None:
    import numpy as np

    from thresher.filters.near_dedup import sharded_pairs
    from thresher.pipelines.ray_runner import cluster_search_on_ray

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 384), dtype=np.float32)
    rows = rng.permutation(n)
    twins, originals = rows[: n // 10], rows[n // 10 : n // 5]  # each twin a noisy copy of a row left as it is
    x[twins] = x[originals] + 0.2 * rng.standard_normal((len(twins), 384), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = work / "vectors.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    kw = {"shards": 8, "index": "flat", "exact_below": n + 1}
    t0 = time.perf_counter()
    here = sharded_pairs(mapped, 0.9, **kw)
    here_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tasks = sharded_pairs(mapped, 0.9, search_clusters=cluster_search_on_ray(path), **kw)
    tasks_s = time.perf_counter() - t0
    assert np.array_equal(here.i, tasks.i) and np.array_equal(here.j, tasks.j), "the two searches found other pairs"
    print(f"\n3. sharded NearDedup search, {n:,} vectors, 8 clusters (largest {here.stats['largest_shard']:,}), "
          f"{len(here.i):,} pairs")
    print(f"   one after another {here_s:7.2f}s   a Ray task each {tasks_s:7.2f}s   ratio tasks/sequential "
          f"{tasks_s / here_s:.2f}x (k-means on the driver in both: {here.stats['cluster_seconds']:.2f}s)")


if __name__ == "__main__":
    main()
