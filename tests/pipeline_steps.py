"""Steps used by the pipeline tests: they count their work in files, so tests (and killed subprocesses) can prove
which steps ran and how many batches each processed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from thresher.pipelines import Filter, Generator, RowStep, runtime


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
