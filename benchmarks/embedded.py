"""The embedded llama.cpp model: aggregate completion tokens/s with 1, 4, 8 and 16 sequences decoded together
(`LlamaCpp(n_parallel=...)`) against the same prompts answered one at a time, as ratios measured in one run.

Backends, all on the bundled SmolLM2-135M, same prompts (real Vicuna test-set questions), temperature 0:

- before               `LlamaCpp(n_parallel=1, requantize=None)`: the embedded backend before batched decoding
                        (llama-cpp-python's one-at-a-time path, shipped Q4_1 weights, half the CPUs)
- one at a time Q4_1 ×N  llama-cpp-python's path at its fastest here: Q4_1 and N threads (N: the usable physical
                        cores, or --threads); batched ÷ this is what batching gains at equal threads
- one at a time Q8_0 ×N  the same path on the weights the batched default loads
- batched               `LlamaCpp(n_parallel=16)` given k requests at once, so k sequences are live; threads chosen
                        while decoding (`cpu_threads.ThreadTuner`; the count it ended on is printed) or --threads

Each figure is the best of `--repeats` runs, the backends interleaved, so a burst of other load on a shared machine
hits all of them alike.

Then the slots kept full (`--sustained`, default 32): that many prompts through `LlamaCpp(n_parallel=8)`, so a
sequence that finishes makes room for a waiting one (continuous batching), as a step over many rows runs, against the
same prompts one at a time. With exactly k prompts for k slots, the last answers decode with fewer companions.

    python benchmarks/embedded.py                          # 64 tokens an answer, 2 repeats, threads tuned
    python benchmarks/embedded.py --threads 2 --threads-batch 2 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from thresher.llms import LlamaCpp
from thresher.llms.cpu_threads import usable_cores

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prompts(n: int) -> list[list[dict[str, str]]]:
    lines = (SHARED / "cherry-llm" / "vicuna_test_set.jsonl").read_text().splitlines()
    return [[{"role": "user", "content": json.loads(x)["text"]}] for x in lines[:n]]


def run(backend: LlamaCpp, convs: list[list[dict[str, str]]], max_tokens: int) -> tuple[float, int]:
    t = time.perf_counter()
    out = backend.chat(convs, max_tokens=max_tokens, temperature=0)
    dt = time.perf_counter() - t
    assert all(o.ok for o in out), [o.error for o in out if not o.ok][:3]
    return dt, sum(o.completion_tokens for o in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="LlamaCpp n_threads (default: its own)")
    ap.add_argument("--threads-batch", type=int, default=None, help="LlamaCpp n_threads_batch (default: its own)")
    ap.add_argument("--sustained", type=int, default=32, help="prompts through 8 slots kept full (0: skip)")
    a = ap.parse_args()
    os.environ["THRESHER_NO_CACHE"] = "1"
    kw = {"n_threads": a.threads, "n_threads_batch": a.threads_batch, "cache": False}
    cores = usable_cores()
    n = a.threads or cores
    each = {"n_threads": n, "n_threads_batch": a.threads_batch or n, "cache": False}
    backends = {
        "before": LlamaCpp(n_parallel=1, requantize=None, **kw),
        f"one at a time Q4_1 ×{n}": LlamaCpp(n_parallel=1, requantize=None, **each),
        f"one at a time Q8_0 ×{n}": LlamaCpp(n_parallel=1, **each),
        "batched": LlamaCpp(n_parallel=max(a.sizes), **kw),
    }
    if a.sustained:
        backends["8 slots kept full"] = LlamaCpp(n_parallel=8, **kw)
    for b in backends.values():
        b.load()
        b.chat(prompts(1), max_tokens=4, temperature=0)  # warm: first-call allocations, the decoder
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {a.max_tokens} tokens an answer at most, "
          f"threads {a.threads or 'default'} / batch {a.threads_batch or 'default'}, best of {a.repeats}")  # fmt: skip
    print(f"{'sequences':>9}  {'backend':<22} {'tokens':>6} {'wall s':>7} {'tok/s':>7}  batched ÷ this")
    one_at_a_time = [name for name in backends if name not in ("batched", "8 slots kept full")]
    rounds = [(k, "batched") for k in a.sizes] + ([(a.sustained, "8 slots kept full")] if a.sustained else [])
    for k, batched in rounds:
        convs = prompts(k)
        best: dict[str, tuple[float, int]] = {}
        for _ in range(a.repeats):
            for name in [*one_at_a_time, batched]:
                dt, toks = run(backends[name], convs, a.max_tokens)
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, toks)
        rate = {name: toks / dt for name, (dt, toks) in best.items()}
        for name, (dt, toks) in best.items():
            ratio = "" if name == batched else f"{rate[batched] / rate[name]:.2f}x"
            print(f"{k:>9}  {name:<22} {toks:>6} {dt:>7.2f} {rate[name]:>7.1f}  {ratio}")
    dec = backends["batched"]._decoder
    tuned = f", {dec.tuner.trials} thread trials" if dec is not None and dec.tuner is not None else ""
    print(f"batched decoder ended on {dec.threads if dec else '?'} threads{tuned}; {cores} usable cores")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    for b in backends.values():
        b.close()


if __name__ == "__main__":
    main()
