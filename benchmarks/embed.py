"""Texts per second of the default embedder (bundled all-MiniLM-L6-v2, sentence-transformers, CPU): the bound on how
fast NearDedup, DiversitySelect and KMeansSample take new text. Over batch sizes and torch thread counts, on real
instructions (+ input) from ../shared/data, longest first as the backend sends them; the request cache is off, so
every text is computed. The multilingual encoder for Chinese (`language="zh"`) is measured too when installed.

    python benchmarks/embed.py [--texts 1000] [--batches 16 32 64 128] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def texts(n: int) -> list[str]:
    rows = json.loads((SHARED / "cherry-llm" / "cherry_alpaca_5_percent.json").read_text())
    rows += json.loads((SHARED / "llama-factory-demo" / "alpaca_en_demo.json").read_text())
    out = ["\n\n".join(v for v in (r.get("instruction"), r.get("input")) if v) for r in rows]
    return [t for t in out if t.strip()][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    import torch

    from thresher.llms import SentenceTransformerEmbeddings

    sample = texts(args.texts)
    chars = sum(len(t) for t in sample) / len(sample)
    print(f"cpus: {os.cpu_count()}, {len(sample)} texts, {chars:.0f} characters on average, cache off")
    model = SentenceTransformerEmbeddings(cache=False).load().model_  # loaded once, shared by every setting
    best = (0.0, 0, 0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            emb = SentenceTransformerEmbeddings(batch_size=batch, cache=False)
            emb.model_ = model
            emb.embed(sample[:batch])  # warm up
            t0 = time.perf_counter()
            emb.embed(sample)
            rate = len(sample) / (time.perf_counter() - t0)
            best = max(best, (rate, batch, threads))
            print(f"MiniLM  threads {threads}  batch {batch:4d}: {rate:7.1f} texts/s")
    print(f"best: {best[0]:.1f} texts/s at batch {best[1]}, {best[2]} thread(s)")
    try:
        from thresher.llms import MultilingualUSEEmbeddings

        use = MultilingualUSEEmbeddings(cache=False).load()
        use.embed(sample[:64])
        t0 = time.perf_counter()
        use.embed(sample)
        print(f"multilingual USE (zh default), batch {use.batch_size}: {len(sample) / (time.perf_counter() - t0):.1f} texts/s")
    except Exception as e:  # an optional extra: say why it was not measured
        print(f"multilingual USE: not measured ({e})")


if __name__ == "__main__":
    main()
