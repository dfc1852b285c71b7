"""RougeFilter against the reference method: Self-Instruct's ROUGE-L similarity filter as a pool grows to 50,000.

Candidates: every instruction in ../shared/data (Alpaca subsets, LLaMA-Factory demo, ReAlign, the cherry-llm test
sets, Self-Instruct's user-oriented tasks, WizardLM's test set), then synthetic instruction-like rows (a seeded word
bigram model of those instructions) until the pool holds `--pool` texts. The pool starts with the 175 seed tasks;
threshold 0.7, decided online as Self-Instruct does (a kept candidate joins the pool at once).

- RougeFilter: the step itself, `RougeFilter(reference=seeds).apply(table)`, over every candidate: candidates/s
  for the whole run, as the pool grows from 175 to `--pool`.
- Reference: rouge_score's ROUGE-L (its `_score_lcs`, the function `RougeScorer.score` ends in) of a candidate
  against every pool text, max > 0.7 rejects, with a `multiprocessing` worker pool as Self-Instruct and Alpaca
  do. Made as fast as it fairly can be: the pool is tokenized once, the workers are started once and hold the pool
  (the original code starts a new process pool per candidate and, in Self-Instruct, tokenizes both texts of every
  pair), and each worker sends back only its share's max. Even so it takes seconds per candidate at 50,000, so it
  is measured on `--sample` held-out candidates against the full pool, and RougePool (the index inside the filter)
  on many more of the same kind against the same pool. The two must agree on every decision, score and nearest
  pool text of the sample. The whole-run figure for the reference is extrapolated from its per-pair cost (it
  grows linearly with the pool), and says so.

    python benchmarks/rouge_filter.py [--pool 50000] [--sample 12] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():  # run from a checkout beside ../shared
    SHARED = Path.cwd().parent / "shared" / "data"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def real_instructions() -> tuple[list[str], list[str]]:
    """(the 175 seed tasks, every other instruction in ../shared/data, in a fixed order)."""
    seeds = [r["instruction"] for r in _jsonl(SHARED / "self-instruct" / "seed_tasks.jsonl")]
    texts: list[str] = []
    for name in ("cherry_alpaca_5_percent.json",):
        texts += [r["instruction"] for r in json.loads((SHARED / "cherry-llm" / name).read_text())]
    texts += [r["instruction"] for r in json.loads((SHARED / "llama-factory-demo" / "alpaca_en_demo.json").read_text())]
    for name in ("task_classifier_train_dataset.json", "task_classifier_test_dataset.json"):
        texts += [r["instruction"] for r in json.loads((SHARED / "realign" / name).read_text())]
    for name, key in (("koala_test_set.jsonl", "prompt"), ("lima_test_set.jsonl", "conversations"),
                      ("vicuna_test_set.jsonl", "text"), ("wizardlm_test_set.jsonl", "Instruction")):  # fmt: skip
        texts += [r[key] for r in _jsonl(SHARED / "cherry-llm" / name)]
    texts += [r["instruction"] for r in _jsonl(SHARED / "self-instruct" / "user_oriented_instructions.jsonl")]
    return seeds, [t for t in texts if isinstance(t, str) and t.strip()]


class Bigrams:
    """A seeded word bigram model of real instructions: text that reads like an instruction, words and lengths
    distributed as theirs, without being a copy of any."""

    def __init__(self, texts: list[str], seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.next: dict[str, list[str]] = defaultdict(list)
        self.starts: list[str] = []
        self.lengths: list[int] = []
        for t in texts:
            words = t.split()
            if len(words) < 4 or len(words) > 60:
                continue
            self.starts.append(words[0])
            self.lengths.append(len(words))
            for a, b in itertools.pairwise(words):
                self.next[a].append(b)

    def text(self) -> str:
        rng = self.rng
        n = rng.choice(self.lengths)
        words = [rng.choice(self.starts)]
        while len(words) < n:
            options = self.next.get(words[-1])
            words.append(rng.choice(options) if options else rng.choice(self.starts))
        return " ".join(words)


# ---- the reference: rouge_score against the whole pool, in worker processes ----------------------------

_POOL_TOKENS: list[list[str]] = []


def _init_worker(tokens: list[list[str]]) -> None:
    global _POOL_TOKENS
    _POOL_TOKENS = tokens


def _best_in_share(args: tuple[list[str], int, int]) -> tuple[float, int]:
    from rouge_score import rouge_scorer

    cand, lo, hi = args
    best, best_i = -1.0, -1
    for i in range(lo, hi):
        f = rouge_scorer._score_lcs(cand, _POOL_TOKENS[i]).fmeasure
        if f > best:
            best, best_i = f, i
    return best, best_i


def reference_nearest(pool: mp.pool.Pool, cand_tokens: list[str], n_pool: int, shares: int) -> tuple[float, int]:
    step = -(-n_pool // shares)
    parts = pool.map(_best_in_share, [(cand_tokens, lo, min(n_pool, lo + step)) for lo in range(0, n_pool, step)])
    best, best_i = -1.0, -1
    for f, i in parts:  # shares in pool order: the first index reaching the max wins, as list.index would
        if f > best:
            best, best_i = f, i
    return best, best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=50_000, help="grow the pool to this many texts")
    ap.add_argument("--sample", type=int, default=12, help="held-out candidates the reference is timed on")
    ap.add_argument("--ours-sample", type=int, default=2000, help="held-out candidates RougePool is timed on")
    ap.add_argument("--workers", type=int, default=2, help="reference worker processes")
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    from rouge_score import tokenize

    from thresher.filters.rouge import RougeFilter, RougePool

    seeds, real = real_instructions()
    gen = Bigrams(real + seeds)
    # enough candidates for the pool to reach its size: synthetic rows are rarely near-copies (checked below)
    n_cand = int((args.pool - len(seeds)) * 1.08) + 1000
    cands = real + [gen.text() for _ in range(max(0, n_cand - len(real)))]
    print(f"candidates: {len(cands):,} ({len(real):,} real from ../shared/data, the rest synthetic); "
          f"pool starts with {len(seeds)} seed tasks; threshold 0.7", flush=True)  # fmt: skip

    # ---- RougeFilter over the whole stream ----
    step = RougeFilter(reference=seeds, threshold=0.7)
    table = pa.table({"id": [f"c{i}" for i in range(len(cands))], "instruction": cands})
    t0 = time.perf_counter()
    res = step.apply(table)
    t_filter = time.perf_counter() - t0
    kept = res.output.column("instruction").to_pylist()
    pool_size = len(seeds) + len(kept)
    print(f"RougeFilter: {len(cands):,} candidates in {t_filter:.1f} s = {len(cands) / t_filter:,.0f} candidates/s; "
          f"kept {len(kept):,}, rejected {res.rows_rejected:,}; pool grew from {len(seeds)} to {pool_size:,}", flush=True)  # fmt: skip
    if pool_size < args.pool:
        sys.exit(f"the pool reached only {pool_size:,} texts, not {args.pool:,}: make more candidates")
    m = res.metrics
    print(f"  posting entries read {m['postings']:,}, LCS computed {m['lcs']:,} "
          f"({m['lcs'] / max(1, m['queries']):.0f} per candidate, of {pool_size / 2:,.0f} on average in the pool)")  # fmt: skip

    # ---- both methods at the full pool, on held-out candidates ----
    pool = RougePool()
    pool.extend(seeds + kept)
    # new synthetic rows, and every fourth a near-copy of a pool text (one word changed): rejections to agree on
    rng = random.Random(1)
    held_out: list[str] = []
    for i in range(args.ours_sample):
        words = rng.choice(pool.texts).split()
        if i % 4 or len(words) < 5:
            held_out.append(gen.text())
            continue
        words[rng.randrange(len(words))] = rng.choice(gen.starts)
        held_out.append(" ".join(words))
    t0 = time.perf_counter()
    ours = [pool.nearest(t) for t in held_out]
    t_ours = time.perf_counter() - t0
    rate_ours = len(held_out) / t_ours
    print(f"RougePool at {len(pool):,} texts: {len(held_out):,} held-out candidates (about a fourth of them "
          f"near-copies of pool texts) in {t_ours:.2f} s = "
          f"{rate_ours:,.0f} candidates/s", flush=True)  # fmt: skip

    pool_tokens = [tokenize.tokenize(t, None) for t in pool.texts]
    sample = list(range(0, len(held_out), max(1, len(held_out) // args.sample)))[: args.sample]
    shares = args.workers * 4
    with mp.get_context("fork").Pool(args.workers, initializer=_init_worker, initargs=(pool_tokens,)) as workers:
        reference_nearest(workers, ["warm", "up"], len(pool_tokens), shares)
        t0 = time.perf_counter()
        refs = [reference_nearest(workers, tokenize.tokenize(held_out[i], None), len(pool_tokens), shares) for i in sample]
        t_ref = time.perf_counter() - t0
    rate_ref = len(sample) / t_ref
    for i, (f_ref, i_ref) in zip(sample, refs, strict=True):
        f_ours, i_ours = ours[i]
        # rouge_score gives 0 against every text when nothing is shared; its first such text is index 0, as ours
        assert (f_ours > 0.7) == (f_ref > 0.7), (held_out[i], f_ours, f_ref)
        assert f_ours == f_ref and i_ours == i_ref, (held_out[i], f_ours, i_ours, f_ref, i_ref)
    n_rej = sum(f > 0.7 for f, _ in refs)
    print(f"reference (rouge_score, {args.workers} worker processes) at {len(pool):,} texts: {len(sample)} candidates "
          f"in {t_ref:.1f} s = {rate_ref:.3f} candidates/s; same decisions ({n_rej} rejected), scores and nearest texts "
          "as RougePool on all of them", flush=True)  # fmt: skip
    print(f"ratio at a {len(pool):,}-text pool: {rate_ours / rate_ref:,.0f}x (goal >= 100x)")

    # the whole run for the reference: its cost per pair is flat, so a candidate's cost grows with the pool
    per_pair = t_ref / (len(sample) * len(pool))
    kept_at = np.zeros(len(cands), dtype=np.int64)
    kept_at[[int(i[1:]) for i in res.output.column("id").to_pylist()]] = 1
    pool_before = len(seeds) + np.cumsum(kept_at) - kept_at  # pool size each candidate was scored against
    pairs = int(pool_before.sum())
    est = pairs * per_pair
    print(f"whole run, reference extrapolated from its measured per-pair cost ({per_pair * 1e6:.1f} us with "
          f"{args.workers} workers): {est / 60:,.0f} min = {len(cands) / est:.2f} candidates/s; "
          f"ratio {est / t_filter:,.0f}x (estimate)")  # fmt: skip


if __name__ == "__main__":
    main()
