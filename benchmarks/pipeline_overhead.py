"""Engine overhead: 1,000,000 rows through 5 cheap row steps, against the same work as a plain pandas script.

Each variant runs in a fresh subprocess (so peak RSS is its own): the thresher pipeline (which also persists every
step's output, rejected rows with reasons and the manifest, i.e. everything resume needs), and pandas doing the
same column work and filters in memory, reading the same Parquet input and writing the final Parquet output.
Memory must not grow with the number of steps: the pipeline is also run with 10 steps.

    python benchmarks/pipeline_overhead.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["the", "model", "answer", "data", "set", "train", "instruction", "explain", "write", "list", "give", "describe", "compare", "python", "code", "story", "poem", "summary", "table", "value", "number", "time", "people", "world", "example", "question", "reason", "step", "result", "because", "however", "which"]

# the five steps, said once for both variants
REGEX = r"as an ai|i cannot|sorry"
MIN_CHARS, MAX_CHARS = 20, 2000


def make_input(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    chunk = 100_000
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        outputs = [text(1, 60) for _ in range(n)]
        for i in range(0, n, 23):
            outputs[i] = "Sorry, as an AI I cannot do that."
        table = pa.table({
            "id": [f"r{start + i}" for i in range(n)],
            "instruction": [text(3, 20) for _ in range(n)],
            "input": ["" if rng.random() < 0.6 else text(2, 15) for _ in range(n)],
            "output": outputs,
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def run_thresher(inp: str, out_dir: str, n_steps: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thresher.filters import LengthFilter, RegexFilter
    from thresher.pipelines import Generator
    from thresher.scorers import SetValue, TextStats

    class ReadParquet(Generator):
        outputs = ("id", "instruction", "input", "output")

        def __init__(self, *, path: str):
            self.path = path

        def generate(self, tables: list[pa.Table]) -> pa.Table:
            return pq.read_table(self.path)

    five = [
        TextStats(),
        SetValue(column="source", value="synthetic"),
        RegexFilter(pattern=REGEX),
        LengthFilter(min_chars=MIN_CHARS, max_chars=MAX_CHARS),
        RegexFilter(field="instruction", pattern=r"^\s*$"),
    ]
    extra = [SetValue(column=f"tag{i}", value=i) for i in range(n_steps - 5)]
    pipe = ReadParquet(path=inp)
    for s in [*five, *extra][:n_steps]:
        pipe = pipe >> s
    t0 = time.perf_counter()
    result = pipe.run(out_dir, progress=False)
    seconds = time.perf_counter() - t0
    last = list(result.steps)[-1]
    rows_out = result.steps[last].rows_out
    return {"seconds": seconds, "rows_out": rows_out}


def run_pandas(inp: str, out_dir: str, n_steps: int) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    df = pd.read_parquet(inp)
    df["instruction_words"] = df["instruction"].str.count(r"\S+") + df["input"].str.count(r"\S+")
    df["output_words"] = df["output"].str.count(r"\S+").fillna(0)
    df["output_chars"] = df["output"].str.len().fillna(0)
    df["source"] = "synthetic"
    df = df[~df["output"].str.contains(REGEX, case=False, regex=True, na=False)]
    n = df["output"].str.len().fillna(0)
    df = df[(n >= MIN_CHARS) & (n <= MAX_CHARS)]
    df = df[~df["instruction"].str.contains(r"^\s*$", regex=True, na=False)]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    df.to_parquet(Path(out_dir) / "out.parquet", index=False)
    return {"seconds": time.perf_counter() - t0, "rows_out": len(df)}


def child(kind: str, inp: str, out_dir: str, n_steps: int) -> None:
    import resource

    fn = run_thresher if kind == "thresher" else run_pandas
    res = fn(inp, out_dir, n_steps)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def measure(kind: str, inp: Path, work: Path, n_steps: int) -> dict:
    out_dir = work / f"{kind}-{n_steps}-{time.time_ns()}"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--input", str(inp), "--out", str(out_dir), "--steps", str(n_steps)],
        capture_output=True, text=True, check=True,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant; the best (least disturbed) is used")
    ap.add_argument("--child", choices=["thresher", "pandas"])
    ap.add_argument("--input")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.input, args.out, args.steps)
        return

    work = Path(tempfile.mkdtemp(prefix="thresher-bench-"))
    try:
        inp = work / "input.parquet"
        t0 = time.perf_counter()
        make_input(inp, args.rows)
        print(f"input: {args.rows:,} rows, {inp.stat().st_size / 1e6:.0f} MB parquet ({time.perf_counter() - t0:.1f}s)")
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, so both variants see the same machine noise
            for kind, steps in (("pandas", 5), ("thresher", 5), ("thresher", 10)):
                r = measure(kind, inp, work, steps)
                key = f"{kind}-{steps}"
                if key not in best or r["seconds"] < best[key]["seconds"]:
                    best[key] = r
        pd5, th5, th10 = best["pandas-5"], best["thresher-5"], best["thresher-10"]
        assert pd5["rows_out"] == th5["rows_out"], (pd5, th5)
        print(f"{'variant':28s} {'seconds':>8s} {'rows/s':>12s} {'peak RSS MB':>12s} {'rows out':>10s}")
        for name, r in (("pandas, 5 steps in memory", pd5), ("thresher, 5 steps persisted", th5),
                        ("thresher, 10 steps persisted", th10)):
            print(f"{name:28s} {r['seconds']:8.2f} {args.rows / r['seconds']:12,.0f} {r['peak_rss_mb']:12.0f} "
                  f"{r['rows_out']:10,}")
        ratio = th5["seconds"] / pd5["seconds"]
        growth = th10["peak_rss_mb"] / th5["peak_rss_mb"]
        print(f"time ratio thresher/pandas (5 steps): {ratio:.2f}x  (goal < 1.5x)")
        print(f"peak memory 10 steps / 5 steps: {growth:.2f}x  (goal: no growth with steps)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
