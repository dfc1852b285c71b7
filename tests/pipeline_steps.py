"""Steps used by the pipeline tests: they count their work in files, so tests (and killed subprocesses) can prove
which steps ran and how many batches each processed. Also the checks and the Ray cluster those tests share."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from thresher.pipelines import Filter, Generator, RowStep, runtime, secret
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.step import Checkpoint, GeneratedBatch


def bump(counter_dir: str | None, name: str, n: int = 1) -> None:
    if not counter_dir:
        return
    # one append per call: O_APPEND writes are atomic for short lines, so processes can share the file
    with open(Path(counter_dir) / f"{name}.count", "a") as fh:
        fh.write(f"{n}\n")


def count(counter_dir: str | Path, name: str) -> int:
    p = Path(counter_dir) / f"{name}.count"
    return sum(int(x) for x in p.read_text().split()) if p.exists() else 0


def calls(counter_dir: str | Path, name: str) -> int:
    p = Path(counter_dir) / f"{name}.count"
    return len(p.read_text().split()) if p.exists() else 0


class Numbers(Generator):
    """n synthetic instruction rows."""

    outputs = ("id", "instruction", "input", "output")

    def __init__(self, *, n: int = 100, counter_dir: str | None = runtime(None)):
        self.n, self.counter_dir = n, counter_dir

    def generate(self, tables: list[pa.Table]) -> pa.Table:
        bump(self.counter_dir, "numbers")
        n = self.n
        return pa.table({
            "id": [f"row{i}" for i in range(n)],
            "instruction": [f"Add {i} and {i % 7}." for i in range(n)],
            "input": ["" if i % 3 else f"context {i}" for i in range(n)],
            "output": [str(i + i % 7) * (1 + i % 5) for i in range(n)],
        })


class Square(RowStep):
    """Adds `square` = (number in the instruction)^2; optionally sleeps per batch (to be killed mid-step)."""

    inputs = ("instruction",)
    outputs = ("square",)

    def __init__(self, *, offset: int = 0, sleep: float = runtime(0.0), batch_size: int = runtime(10),
                 counter_dir: str | None = runtime(None)):
        self.offset, self.sleep, self.batch_size, self.counter_dir = offset, sleep, batch_size, counter_dir
        self.rows_done_ = 0

    def metrics(self) -> dict[str, Any]:
        return {"rows_processed": self.rows_done_, "model": "arithmetic"}

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        if self.sleep:
            time.sleep(self.sleep)
        bump(self.counter_dir, "square", batch.num_rows)
        self.rows_done_ += batch.num_rows
        nums = [int(s.split()[1]) for s in batch.column("instruction").to_pylist()]
        return {"square": [x * x + self.offset for x in nums]}


class EvenOnly(Filter):
    """Keeps rows whose square is even."""

    inputs = ("square",)

    def __init__(self, *, counter_dir: str | None = runtime(None), batch_size: int = runtime(16)):
        self.counter_dir, self.batch_size = counter_dir, batch_size

    def keep(self, batch: pa.Table) -> tuple[list[bool], list[str]]:
        bump(self.counter_dir, "even_only", batch.num_rows)
        sq = batch.column("square").to_pylist()
        return [x % 2 == 0 for x in sq], [f"square {x} is odd" for x in sq]


class WhereAmI(RowStep):
    """A step for a CUDA device: notes, per row, the GPUs Ray gave its actor (CUDA_VISIBLE_DEVICES) and its process.
    It touches no device, so a cluster of logical GPUs (Ray's resources are counts) tests where actors are placed."""

    inputs = ("id",)
    outputs = ("gpus", "pid")

    def __init__(self, *, device: str = "cuda", batch_size: int = runtime(5)):
        self.device, self.batch_size = device, batch_size

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        n = batch.num_rows
        return {"gpus": [os.environ.get("CUDA_VISIBLE_DEVICES")] * n, "pid": [os.getpid()] * n}


class Flaky(RowStep):
    """Fails every row whose id ends in 7 (per-row errors, not a crashed batch)."""

    inputs = ("id",)
    outputs = ("checked",)

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        ids = batch.column("id").to_pylist()
        return {
            "checked": [True] * len(ids),
            "error": [f"backend refused {i}" if i.endswith("7") else None for i in ids],
        }


def pid_file(counter_dir: str) -> Path:
    return Path(counter_dir) / f"pid.{os.getpid()}"


class Expand(ModelStep, Generator):
    """Grows new tasks from seed rows with a chat model, a batch of candidates at a time, each batch committed with
    its state: the engine's stand-in for Self-Instruct. Which seed each candidate imitates comes from the step's seeded
    RNG (keyed by batch number), so a resumed run asks exactly what an unbroken one would. Every seventh candidate
    is turned down (rejected with a reason); a failed request fails its candidate."""

    n_inputs = 1
    inputs = ("instruction",)
    outputs = ("id", "instruction", "parent_id", "batch")

    def __init__(self, *, backend: Any = None, target: int = 100, per_batch: int = 20, seed: int = 0,
                 max_batches: int = 100, api_key: str | None = secret(), max_concurrency: int | None = runtime(None),
                 cache: bool = runtime(True), progress: bool = runtime(False), counter_dir: str | None = runtime(None),
                 crash_at_batch: int | None = runtime(None)):
        self.backend, self.target, self.per_batch, self.seed = backend, target, per_batch, seed
        self.max_batches = max_batches
        self.api_key, self.max_concurrency, self.cache, self.progress = api_key, max_concurrency, cache, progress
        self.counter_dir, self.crash_at_batch = counter_dir, crash_at_batch

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint) -> Iterator[GeneratedBatch]:
        seeds = tables[0].column("instruction").to_pylist()
        seed_ids = tables[0].column("id").to_pylist()
        state = checkpoint.state or {"made": 0, "asked": 0, "batch": 0}
        made, asked, number = state["made"], state["asked"], state["batch"]
        assert checkpoint.rows == made  # the committed output is what the state says
        while made < self.target and number < self.max_batches:
            if number == self.crash_at_batch:
                self.crash_at_batch = None  # crash once
                raise RuntimeError(f"crash at batch {number}")
            pick = self.rng("pick", number)
            picks = [pick.randrange(len(seeds)) for _ in range(self.per_batch)]
            convs = [[{"role": "user", "content": f"Write a task like #{asked + j}: {seeds[p]}"}]
                     for j, p in enumerate(picks)]
            answers = self.model().chat(convs, max_tokens=32)
            out, rejected, failed = [], [], []
            for j, (p, answer) in enumerate(zip(picks, answers, strict=True)):
                k = asked + j
                row = {"id": f"gen{k}", "instruction": answer.text, "parent_id": seed_ids[p], "batch": number}
                if answer.error is not None:
                    failed.append({**row, "error": answer.error})
                elif k % 7 == 3:
                    rejected.append({**row, "reason": f"candidate {k}: every seventh is turned down"})
                else:
                    out.append(row)
            made, asked, number = made + len(out), asked + len(picks), number + 1
            bump(self.counter_dir, "expand_batches")
            yield GeneratedBatch(output=out, rejected=rejected, failed=failed, candidates=len(picks),
                                 state={"made": made, "asked": asked, "batch": number})


def same_tables(a: Any, b: Any, steps: list[str]) -> None:
    """Two runs gave the same output, rejected and failed tables for `steps` (sorted by id: Ray commits out of order)."""
    for s in steps:
        for side in ("table", "rejected", "failed"):
            ta, tb = getattr(a, side)(s), getattr(b, side)(s)
            if "id" in ta.column_names:
                ta, tb = ta.sort_by("id"), tb.sort_by("id")
            assert ta.equals(tb), f"{s} {side} differs"


def start_test_ray(num_gpus: int = 0) -> Any:
    """A local Ray cluster for one test module (2 CPUs, `num_gpus` logical GPUs, 200 MB object store) whose workers
    import these steps; returns the ray module (the caller shuts it down)."""
    import ray

    tests = str(Path(__file__).parent)
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, num_gpus=num_gpus, object_store_memory=int(2e8), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip
    return ray
