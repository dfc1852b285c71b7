"""Batch API mode against online mode: one N-row Respond (Load -> Respond), each mode in a fresh run directory with a
fresh request cache, against the scripted test server (`thresher.llms.testing`, its Files and Batches endpoints;
jobs finish on the first status poll). Same prices for both (online $/1M tokens; batch mode at half, the Batch
API's discount).

    python benchmarks/batch_api.py                 # 10,000 rows
    python benchmarks/batch_api.py --rows 2000 --latency 0.05

Prints per mode: wall time, HTTP calls to the server (by route), requests answered, tokens and cost, and the ratios
batch / online. Wall time here says what the client costs on this machine, not how long a real job takes (hours).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

PRICES = {"prompt": 2.5, "completion": 10.0}  # USD per 1M tokens online (gpt-4o's list price, for scale)


def run(mode: str, rows: Path, server: Any, work: Path) -> dict[str, Any]:
    from thresher.data.steps import Load
    from thresher.generators import Respond
    from thresher.pipelines.dag import Pipeline

    os.environ["THRESHER_CACHE"] = str(work / f"{mode}.sqlite")
    backend: dict[str, Any] = {"kind": "openai", "base_url": server.base_url, "model": "fake-model",
                               "max_concurrency": 64, "prices": PRICES}  # fmt: skip
    if mode == "batch":
        backend.update(batch=True, batch_poll_interval=0.05, batch_poll_max=0.5)
    pipe = Pipeline(f"bench-{mode}")
    pipe.add(Load(path=rows), name="load")
    pipe.add(Respond(backend=backend, max_tokens=64, batch_size=512), name="respond", after=["load"])
    server.reset()
    t0 = time.perf_counter()
    res = pipe.run(work / f"run-{mode}", progress=False)
    wall = time.perf_counter() - t0
    stats = server.stats()
    m = res.metrics("respond")
    return {"mode": mode, "wall_s": round(wall, 2), "http_calls": stats["http_calls"], "routes": stats["routes"],
            "rows_out": res.table("respond").num_rows, "answered_online": m["requests"],
            "answered_in_batch": m["batch_requests"], "jobs": m["batches"], "prompt_tokens": m["prompt_tokens"],
            "completion_tokens": m["completion_tokens"], "cost_usd": m["cost_usd"]}  # fmt: skip


def main() -> None:
    from thresher.llms.testing import FaultServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds the server takes per online request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="thresher-bench-batch-") as tmp, FaultServer(latency=args.latency) as server:
        work = Path(tmp)
        rows = work / "rows.jsonl"
        rows.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"Explain item number {i} in one line."}) + "\n"
                                for i in range(args.rows)))  # fmt: skip
        out = [run("online", rows, server, work), run("batch", rows, server, work)]
    for r in out:
        print(json.dumps(r))
    online, batch = out
    print(f"{args.rows} rows: cost batch/online = {batch['cost_usd'] / online['cost_usd']:.3f} "
          f"(${batch['cost_usd']:.4f} vs ${online['cost_usd']:.4f}); HTTP calls batch/online = "
          f"{batch['http_calls']}/{online['http_calls']} = {batch['http_calls'] / online['http_calls']:.5f}; "
          f"client wall time batch/online = {batch['wall_s'] / online['wall_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
