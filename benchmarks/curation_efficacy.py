"""Does curation help? Equal-budget LoRA runs on subsets of one pool, chosen four ways, against the random subset.

From one pool (the LLaMA-Factory alpaca demo rows; `--pool`), select `--budget` rows by (a) RandomSelect, (b) Cherry
LLM's IFD (IFDScorer, IFD > 1 dropped, TopK by IFD), (c) DEITA (DeitaScorer's complexity x quality, then
DiversitySelect), (d) LongestSelect (the longest responses). Train one LoRA adapter per subset with the same config
and steps, then measure on held-out gold rows (Cherry's 5% Alpaca file, disjoint from the pool's source):
- held-out loss, with the ratio to random's (the reference measured in the same run) and a 95% paired bootstrap
  confidence interval of the difference (resampling held-out rows; the loss is token-weighted, as the trainer's);
- with `--judge-prompts N`, the pairwise judge protocol (thresher.evaluation) of each subset's model against random's
  on N Vicuna prompts: win/tie/loss, winning score and a bootstrap interval over prompts. The judge is the bundled
  llama.cpp model unless `--judge` gives a spec. The judge replies in JSON through structured output (a grammar on
  llama.cpp), so every reply carries two scores; `--free-text-judge` uses the free-text template instead, where a
  135M judge rarely writes two scores (the table shows prompts judged as n).

CPU defaults are small (the bundled SmolLM2-135M, pool 64, budget 16, 8 steps): the differences can be noise, and
the intervals say how much. With CUDA: `--model <a 0.5-1.5B dir> --pool 4000 --budget 1000 --steps 300`.

    python benchmarks/curation_efficacy.py --out runs/bench-curation
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
METHODS = ("random", "ifd", "deita", "longest")


def select_subsets(pool: Path, budget: int, run_dir: Path, model_dir: str, seed: int) -> dict[str, list[dict[str, Any]]]:
    from thresher.data import Load
    from thresher.filters import DiversitySelect, LongestSelect, RandomSelect, Threshold, TopK
    from thresher.pipelines.dag import Pipeline
    from thresher.scorers import DeitaScorer, IFDScorer

    scorer = {"kind": "transformers", "model": model_dir}
    p = Pipeline("curation-efficacy")
    p.add(Load(path=str(pool)), name="pool")
    p.add(RandomSelect(budget=budget, seed=seed), name="random", after=["pool"])
    p.add(IFDScorer(backend=scorer, max_length=256), name="ifd_score", after=["pool"])
    p.add(Threshold(column="ifd", maximum=1.0), name="ifd_le_1", after=["ifd_score"])
    p.add(TopK(column="ifd", k=budget), name="ifd", after=["ifd_le_1"])
    p.add(DeitaScorer(backend=scorer, max_tokens=8), name="deita_score", after=["pool"])
    p.add(DiversitySelect(score="deita_score", budget=budget), name="deita", after=["deita_score"])
    p.add(LongestSelect(budget=budget), name="longest", after=["pool"])
    result = p.run(run_dir, progress=False)
    return {m: result.table(m).to_pylist() for m in METHODS}


def bootstrap(values: list[Any], stat: Any, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(resample) over n resamples of values (with replacement)."""
    rng = random.Random(seed)
    k = len(values)
    draws = sorted(stat([values[rng.randrange(k)] for _ in range(k)]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def token_mean(rows: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in rows) / max(1, sum(t for _, t in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-curation")
    ap.add_argument("--model", default="bundled:smollm2")
    ap.add_argument("--pool", type=int, default=64, help="rows of the pool")
    ap.add_argument("--budget", type=int, default=16, help="rows each subset keeps")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps of every run")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=32, help="held-out gold rows")
    ap.add_argument("--judge-prompts", type=int, default=0, help="Vicuna prompts for the pairwise judge (0: none)")
    ap.add_argument("--judge", default=None, help="judge backend spec as JSON (default: the bundled llama.cpp model)")
    ap.add_argument("--free-text-judge", action="store_true", help="the free-text judge template, not JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from thresher.evaluation.heldout import heldout_row_losses
    from thresher.evaluation.recipes import train_once
    from thresher.trainer.model import resolve_model_dir

    t0 = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(resolve_model_dir(args.model))
    rows = json.loads((DATA / "llama-factory-demo" / "alpaca_en_demo.json").read_text())
    pool = out / "pool.json"
    pool.write_text(json.dumps(rows[: args.pool]))
    heldout = out / "heldout.json"
    gold = json.loads((DATA / "cherry-llm" / "cherry_alpaca_5_percent.json").read_text())
    heldout.write_text(json.dumps(gold[: args.heldout]))

    subsets = select_subsets(pool, args.budget, out / "select", model_dir, args.seed)
    losses: dict[str, dict[str, tuple[float, int]]] = {}
    adapters: dict[str, str] = {}
    for m in METHODS:
        data = out / f"{m}.json"
        data.write_text(json.dumps([{k: r.get(k) for k in ("instruction", "input", "output")} for r in subsets[m]]))
        cfg = {"model": model_dir, "dataset": str(data), "max_steps": args.steps, "max_seq_len": args.max_seq_len,
               "micro_batch_tokens": 2 * args.max_seq_len, "lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4,
               "seed": args.seed, "on_bad_row": "skip", "save_every": 2}  # fmt: skip
        trained = train_once(cfg, out / "train" / m)  # a killed benchmark resumes from the last checkpoint
        adapters[m] = trained["adapter"]
        saved = out / "train" / m / "heldout_rows.json"  # each model's losses kept as they come: a kill loses none
        if saved.is_file():
            per_row = json.loads(saved.read_text())
        else:
            per_row = heldout_row_losses(model_dir, heldout, adapter=trained["adapter"], max_seq_len=args.max_seq_len)
            saved.write_text(json.dumps(per_row))
        losses[m] = {rid: (s, n) for rid, s, n in per_row}

    ids = sorted(losses["random"])
    ref = token_mean([losses["random"][i] for i in ids])
    print(f"pool {args.pool} rows, budget {args.budget}, {args.steps} steps, held-out {len(ids)} rows; model {args.model}")
    print(f"{'subset':<8} {'mean len':>8} {'held-out loss':>13} {'ratio vs random':>15} {'diff 95% CI (bootstrap)':>26}")
    table = []
    for m in METHODS:
        mean_len = sum(len(r.get("output") or "") for r in subsets[m]) / max(1, len(subsets[m]))
        loss = token_mean([losses[m][i] for i in ids])

        def diff(sample: list[str], m: str = m) -> float:
            return token_mean([losses[m][i] for i in sample]) - token_mean([losses["random"][i] for i in sample])

        lo, hi = bootstrap(ids, diff, seed=args.seed)
        table.append({"subset": m, "rows": len(subsets[m]), "mean_output_chars": mean_len, "heldout_loss": loss,
                      "ratio_vs_random": loss / ref, "diff_ci95": [lo, hi]})  # fmt: skip
        print(f"{m:<8} {mean_len:>8.0f} {loss:>13.4f} {loss / ref:>15.4f} {f'[{lo:+.4f}, {hi:+.4f}]':>26}")

    if args.judge_prompts:
        from thresher.evaluation.pairwise import pairwise_eval

        judge = json.loads(args.judge) if args.judge else None
        print(f"\npairwise against random on {args.judge_prompts} Vicuna prompts (judge: {args.judge or 'bundled'})")
        for m in METHODS[1:]:
            res = pairwise_eval({"kind": "transformers", "model": model_dir, "adapter": adapters[m]},
                                {"kind": "transformers", "model": model_dir, "adapter": adapters["random"]},
                                judge=judge, test_sets=["vicuna"], data_dir=DATA / "cherry-llm",
                                max_prompts=args.judge_prompts, names=(m, "random"), answer_max_tokens=96,
                                judge_max_tokens=48 if args.free_text_judge else 400,
                                structured=not args.free_text_judge, out_dir=out / "pairwise" / m)  # fmt: skip
            (s,) = res.sets
            points = [{"win": 1, "tie": 0, "loss": -1}[p.outcome] for p in s.pairs if p.outcome]
            ci = bootstrap(points, lambda xs: sum(xs) / len(xs) + 1, seed=args.seed) if points else None
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
            score = f"{s.winning_score:.3f}" if s.winning_score is not None else "-"
            print(f"{m:<8} n={s.n} win={s.wins} tie={s.ties} loss={s.losses} failed={s.failed} "
                  f"winning score {score} 95% CI {ci_text}")  # fmt: skip
            next(t for t in table if t["subset"] == m)["pairwise"] = {**s.summary(), "ci95": ci}
    (out / "results.json").write_text(json.dumps(table, indent=1))
    print(f"\n{time.perf_counter() - t0:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
