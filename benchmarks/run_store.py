"""A run directory on an object store against one on local disk, measured in one run.

The engine benchmark's cheap pipeline (Parquet input -> TextStats -> RegexFilter -> LengthFilter, `--rows` rows, the
local runner, batches of 1,024 rows) run three ways, interleaved `--repeats` times:

- local disk:   the run directory is a folder;
- S3:           the run directory is `s3://bench/run` on an S3 server on 127.0.0.1 (moto's, in a process of its own),
                so every committed batch is uploaded as the run goes and each finished step's folder synced;
- other machine: the same S3 run read back by `open_run` from an empty local copy (what a resumed driver or a
                report on another machine fetches before it starts).

Reported: wall times, the ratio S3 / local disk, objects and MB on the store. moto is a Python server on the same
two cores as the run, so the figure is a ceiling on the overhead, not what S3 itself costs (its uploads run in
parallel on many servers, at 20-100 ms a request).

    python benchmarks/run_store.py [--rows 200000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_overhead import make_input  # the same synthetic rows as the engine benchmark
from ray_runner import cheap_pipeline  # the same cheap pipeline as the Ray runner's overhead figure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3() -> tuple[subprocess.Popen[bytes], str]:
    import pyarrow.fs as pafs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("bench")
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    import pyarrow.fs as pafs

    from thresher import open_run

    work = Path(tempfile.mkdtemp(prefix="thresher-run-store-"))
    proc, endpoint = start_s3()
    try:
        inp = work / "input.parquet"
        make_input(inp, a.rows)
        best: dict[str, float] = {}
        objects = size = 0
        for r in range(a.repeats):
            shutil.rmtree(work / "local", ignore_errors=True)
            t0 = time.perf_counter()
            local = cheap_pipeline(inp).run(work / "local", progress=False)
            best["local disk"] = min(best.get("local disk", 1e9), time.perf_counter() - t0)

            address = f"s3://bench/run{r}?endpoint_override={endpoint}&scheme=http"
            os.environ["THRESHER_MIRROR_DIR"] = str(work / f"driver{r}")
            t0 = time.perf_counter()
            on_s3 = cheap_pipeline(inp).run(address, progress=False)
            best["S3"] = min(best.get("S3", 1e9), time.perf_counter() - t0)
            last = list(on_s3.steps)[-1]
            assert on_s3.table(last).equals(local.table(last))

            os.environ["THRESHER_MIRROR_DIR"] = str(work / f"other{r}")
            t0 = time.perf_counter()
            read = open_run(address)
            best["other machine"] = min(best.get("other machine", 1e9), time.perf_counter() - t0)
            assert read.table(last).num_rows == local.table(last).num_rows

            fs, base = pafs.FileSystem.from_uri(address)
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = [i for i in infos if i.type == pafs.FileType.File]
            objects, size = len(files), sum(i.size for i in files)
        print(f"{a.rows:,} rows through {len(local.steps) - 1} row steps, local runner, best of {a.repeats}; "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        print(f"the run on the store: {objects} objects, {size / 1e6:.1f} MB")
        for name, t in best.items():
            ratio = f"{t / best['local disk']:.2f}x local disk" if name != "local disk" else ""
            print(f"  {name:<14} {t:7.2f} s  {ratio}")
    finally:
        proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
