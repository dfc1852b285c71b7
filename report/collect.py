"""What the HTML report shows, read from a run directory: plain Python data, no plotting and no HTML.

Each `collect_*` function returns None (or an empty list) when the run holds nothing for its section, so the page
shows a section only when its data exists. Tables are read column by column from the Parquet shards, and rows for
the browser are sampled shard by shard, so a report of a 10M-row run does not load the run into memory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from thresher.pipelines.runner import RunResult, list_shards

#: score columns a histogram is drawn for (numeric columns only), besides those a selection step ranks by
SCORE_COLUMN = re.compile(r"^(judge_\w+|ifd|deita_\w+|perplexity|reward|superfiltering\w*|\w+_score|quality|complexity)$")
#: selection steps: their `column`/`score` parameter names a score; Threshold/TopK/TopPercent draw a threshold
SELECTIONS = ("Threshold", "TopK", "TopPercent", "DiversitySelect", "MIGSelect", "LongestSelect", "KMeansSample")
USAGE_KEYS = ("requests", "prompt_tokens", "completion_tokens", "cache_hits", "cache_misses", "retries", "reasks",
              "errors", "cost_usd")  # fmt: skip
TEXT_LIMIT = 400  # characters of a text cell kept for the row browser and the examples
#: reasons are grouped after quoted names and numbers are blanked out ("near duplicate of kept row '…': cosine #")
_QUOTED = r"'[^']*'|\"[^\"]*\""
_NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def class_name(step: str) -> str:
    """`thresher.filters.select.TopK` -> `TopK` (the manifest keeps the dotted path)."""
    return step.rpartition(".")[2]


def clip(text: Any, limit: int = TEXT_LIMIT) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _numeric(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t)) and not pa.types.is_boolean(t)


# ---- reading ----------------------------------------------------------------------------------------


def schema_of(folder: Path) -> dict[str, pa.DataType]:
    """Column name -> type over every shard of a step's output (or side output)."""
    out: dict[str, pa.DataType] = {}
    for f in list_shards(folder):
        for fld in pq.read_schema(f):
            out.setdefault(fld.name, fld.type)
    return out


def read_columns(folder: Path, columns: list[str] | tuple[str, ...]) -> pa.Table:
    """The named columns of every shard in `folder` (a column a shard lacks is null there), in row order."""
    parts = []
    for f in list_shards(folder):
        names = set(pq.read_schema(f).names)
        t = pq.read_table(f, columns=[c for c in columns if c in names])
        for c in columns:
            if c not in names:
                t = t.append_column(c, pa.nulls(t.num_rows))
        parts.append(t.select(list(columns)))
    if not parts:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(parts, promote_options="permissive")


def sample_rows(folder: Path, columns: list[str], k: int) -> list[dict[str, Any]]:
    """Up to `k` rows spread evenly over the whole table; only the shards holding a chosen row are read."""
    files = list_shards(folder)
    counts = [pq.read_metadata(f).num_rows for f in files]
    total = sum(counts)
    if not total or k <= 0:
        return []
    picks = np.unique(np.linspace(0, total - 1, min(k, total)).astype(np.int64))
    rows: list[dict[str, Any]] = []
    start = 0
    for f, n in zip(files, counts, strict=True):
        local = picks[(picks >= start) & (picks < start + n)] - start
        if len(local):
            names = set(pq.read_schema(f).names)
            t = pq.read_table(f, columns=[c for c in columns if c in names]).take(pa.array(local))
            rows.extend(t.to_pylist())
        start += n
    return rows


def _finite(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    x = np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    return x[np.isfinite(x)]


# ---- sections -------------------------------------------------------------------------------------


@dataclass
class StepInfo:
    name: str
    cls: str
    status: str
    parents: list[str]
    rows_in: int | None
    rows_out: int | None
    rows_rejected: int | None
    rows_failed: int | None
    candidates: int | None
    seconds: float | None
    params: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    dir: Path
    columns: dict[str, pa.DataType] = field(default_factory=dict)


def collect_steps(run: RunResult) -> list[StepInfo]:
    out = []
    for name, rec in run.steps.items():
        folder = run.run_dir / rec.dir
        out.append(StepInfo(
            name=name, cls=class_name(rec.step), status=rec.status, parents=list(rec.parents), rows_in=rec.rows_in,
            rows_out=rec.rows_out, rows_rejected=rec.rows_rejected, rows_failed=rec.rows_failed,
            candidates=rec.candidates, seconds=rec.seconds, params=dict(rec.params or {}),
            metrics=dict(rec.metrics or {}), error=rec.error, dir=folder, columns=schema_of(folder / "output"),
        ))  # fmt: skip
    return out


def depths(steps: list[StepInfo]) -> dict[str, int]:
    """Each step's layer in the DAG: 0 for a source, else one more than its deepest parent."""
    d: dict[str, int] = {}
    for s in steps:  # the manifest lists steps in a topological order
        d[s.name] = 1 + max((d.get(p, 0) for p in s.parents), default=-1)
    return d


def reason_key(reason: str) -> str:
    return re.sub(_NUMBER, "#", re.sub(_QUOTED, "'…'", reason))


@dataclass
class ReasonGroup:
    pattern: str
    count: int
    examples: list[dict[str, str]]  # id, instruction, reason


def collect_reasons(step: StepInfo, top: int = 6, examples: int = 2) -> list[ReasonGroup]:
    """The most frequent rejection reasons of a step (numbers and quoted names blanked out), with examples."""
    folder = step.dir / "rejected"
    if not step.rows_rejected or not list_shards(folder):
        return []
    t = read_columns(folder, ["id", "instruction", "reason"])
    reasons = pc.fill_null(pc.cast(t.column("reason"), pa.string()), "(no reason given)")
    keys = pc.replace_substring_regex(pc.replace_substring_regex(reasons, _QUOTED, "'…'"), _NUMBER, "#")
    counts = pc.value_counts(keys).to_pylist()
    counts.sort(key=lambda c: (-c["counts"], c["values"]))
    groups = []
    keys_np = np.asarray(keys.to_pylist(), dtype=object)
    for c in counts[:top]:
        rows = np.flatnonzero(keys_np == c["values"])[:examples]
        ex = [{"id": clip(t.column("id")[int(i)].as_py(), 80), "instruction": clip(t.column("instruction")[int(i)].as_py(), 200),
               "reason": clip(reasons[int(i)].as_py(), 300)} for i in rows]  # fmt: skip
        groups.append(ReasonGroup(c["values"], int(c["counts"]), ex))
    return groups


@dataclass
class ScoreHistogram:
    column: str
    step: str  # the step whose output first holds the column
    values: np.ndarray
    thresholds: list[tuple[float, str]]  # (value, label) lines to draw


def score_columns(steps: list[StepInfo]) -> list[str]:
    named = {s.params.get(k) for s in steps if s.cls in SELECTIONS for k in ("column", "score")}
    seen: list[str] = []
    for s in steps:
        for c, t in s.columns.items():
            if c not in seen and _numeric(t) and (SCORE_COLUMN.match(c) or c in named):
                seen.append(c)
    return seen


def _cutoff(step: StepInfo, column: str) -> float | None:
    """The score of the last row a TopK/TopPercent kept (its threshold in effect)."""
    if not step.rows_out or column not in step.columns:
        return None
    x = _finite(read_columns(step.dir / "output", [column]).column(0))
    if not len(x):
        return None
    return float(x.min() if step.params.get("descending", True) else x.max())


def collect_scores(steps: list[StepInfo]) -> list[ScoreHistogram]:
    out = []
    for col in score_columns(steps):
        src = next(s for s in steps if col in s.columns)
        values = _finite(read_columns(src.dir / "output", [col]).column(0))
        if not len(values):
            continue
        lines: list[tuple[float, str]] = []
        for s in steps:
            if s.params.get("column") != col:
                continue
            if s.cls == "Threshold":
                for key, sign in (("minimum", "≥"), ("maximum", "≤")):
                    v = s.params.get(key)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        lines.append((float(v), f"{s.name}: keep {sign} {v:g}"))
            elif s.cls in ("TopK", "TopPercent"):
                cut = _cutoff(s, col)
                if cut is not None:
                    what = f"k={s.params.get('k')}" if s.cls == "TopK" else f"{s.params.get('percent')}%"
                    lines.append((cut, f"{s.name} ({what}) cut-off {cut:.3g}"))
        out.append(ScoreHistogram(col, src.name, values, lines))
    return out


@dataclass
class Comparison:
    """Selections made from one pool, beside a random draw from it: each score's values per selection."""

    pool: str
    selections: list[str]  # step names, random baseline(s) included
    random: list[str]
    scores: dict[str, dict[str, np.ndarray]]  # column -> {"pool" or step name: values}


def collect_comparisons(steps: list[StepInfo]) -> list[Comparison]:
    by_name = {s.name: s for s in steps}
    out: list[Comparison] = []
    for rnd in (s for s in steps if s.cls == "RandomSelect" and s.rows_out):
        siblings = [s for s in steps if s.parents == rnd.parents and s.cls in SELECTIONS and s.rows_out]
        if not siblings or len(rnd.parents) != 1:
            continue
        pool = by_name.get(rnd.parents[0])
        if pool is None or any(c.pool == pool.name for c in out):
            continue
        randoms = [s for s in steps if s.parents == rnd.parents and s.cls == "RandomSelect" and s.rows_out]
        chosen = [*siblings, *randoms]
        scores: dict[str, dict[str, np.ndarray]] = {}
        for col in score_columns(steps):
            if col not in pool.columns or any(col not in s.columns for s in chosen):
                continue
            per = {"pool": _finite(read_columns(pool.dir / "output", [col]).column(0))}
            for s in chosen:
                per[s.name] = _finite(read_columns(s.dir / "output", [col]).column(0))
            scores[col] = per
        if scores:
            out.append(Comparison(pool.name, [s.name for s in siblings], [s.name for s in randoms], scores))
    return out


@dataclass
class EmbeddingMap:
    step: str
    xy: np.ndarray  # (n, 2) PCA coordinates of the sampled rows
    explained: tuple[float, float]
    group: np.ndarray  # dup_group per row (-1: none)
    removed: np.ndarray  # bool: removed as a near duplicate
    selected: np.ndarray | None  # bool: in the selection downstream
    random: np.ndarray | None  # bool: in the random baseline downstream
    selection_name: str | None
    random_name: str | None
    total: int


def _descendants(steps: list[StepInfo], name: str) -> list[StepInfo]:
    found = {name}
    out = []
    for s in steps:
        if any(p in found for p in s.parents):
            found.add(s.name)
            out.append(s)
    return out


def _ids(step: StepInfo, side: str = "output") -> set[Any]:
    return set(read_columns(step.dir / side, ["id"]).column(0).to_pylist())


def collect_embeddings(steps: list[StepInfo], max_points: int = 4000) -> list[EmbeddingMap]:
    from thresher.filters.near_dedup import VECTORS_FILE

    by_name = {s.name: s for s in steps}
    out = []
    for s in steps:
        path = s.dir / VECTORS_FILE
        if s.cls != "NearDedup" or not path.is_file() or len(s.parents) != 1 or s.parents[0] not in by_name:
            continue
        vectors = np.load(path, mmap_mode="r")
        ids = read_columns(by_name[s.parents[0]].dir / "output", ["id"]).column(0).to_pylist()
        if len(ids) != len(vectors) or len(ids) < 3:
            continue
        rows = np.arange(len(ids))
        if len(rows) > max_points:
            rows = np.sort(np.random.default_rng(0).choice(len(ids), max_points, replace=False))
        x = np.asarray(vectors[rows], dtype=np.float64)
        x = x - x.mean(axis=0)
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
        var = sv**2 / max(float((sv**2).sum()), 1e-12)
        group_of: dict[Any, int] = {}
        for side in ("output", "rejected"):
            t = read_columns(s.dir / side, ["id", "dup_group"])
            for i, g in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True):
                group_of[i] = -1 if g is None else int(g)
        removed_ids = _ids(s, "rejected")
        picked = [ids[r] for r in rows]
        later = _descendants(steps, s.name)
        rnd = next((d for d in later if d.cls == "RandomSelect"), None)
        # the selection shown is the one made beside the random baseline (from the same pool), else the last one
        picks = [d for d in later if d.cls in SELECTIONS]
        beside = [d for d in picks if rnd is not None and d.parents == rnd.parents]
        sel = (beside or picks[-1:])[0] if beside or picks else None
        sel_ids = _ids(sel) if sel is not None else None
        rnd_ids = _ids(rnd) if rnd is not None else None
        out.append(EmbeddingMap(
            step=s.name, xy=xy, explained=(float(var[0]), float(var[1]) if len(var) > 1 else 0.0),
            group=np.array([group_of.get(i, -1) for i in picked]),
            removed=np.array([i in removed_ids for i in picked]),
            selected=None if sel_ids is None else np.array([i in sel_ids for i in picked]),
            random=None if rnd_ids is None else np.array([i in rnd_ids for i in picked]),
            selection_name=sel.name if sel else None, random_name=rnd.name if rnd else None, total=len(ids),
        ))  # fmt: skip
    return out


@dataclass
class Lineage:
    step: str
    chains: list[list[dict[str, Any]]]  # seed first: {id, instruction, round, operation}
    per_round: dict[int, dict[str, int]]  # round -> operation -> accepted rows


def collect_lineage(steps: list[StepInfo], chains: int = 4) -> list[Lineage]:
    by_name = {s.name: s for s in steps}
    out = []
    lineage_cols = {"parent_id", "evol_round", "evol_operation"}
    for s in steps:
        # the step that made the lineage, not every step downstream that carries its columns along
        if not lineage_cols <= set(s.columns) or not s.rows_out:
            continue
        if any(lineage_cols <= set(by_name[p].columns) for p in s.parents if p in by_name):
            continue
        t = read_columns(s.dir / "output", ["id", "parent_id", "evol_round", "evol_operation", "instruction"])
        rows = {r["id"]: r for r in t.to_pylist()}
        seeds: dict[Any, str] = {}
        for p in s.parents:
            if p in by_name:
                pt = read_columns(by_name[p].dir / "output", ["id", "instruction"])
                seeds.update(zip(pt.column(0).to_pylist(), pt.column(1).to_pylist(), strict=True))
        per_round: dict[int, dict[str, int]] = {}
        for r in rows.values():
            rd = per_round.setdefault(int(r["evol_round"] or 0), {})
            rd[r["evol_operation"] or "?"] = rd.get(r["evol_operation"] or "?", 0) + 1
        deepest = sorted(rows.values(), key=lambda r: (-(r["evol_round"] or 0), str(r["id"])))
        found = []
        for r in deepest[:chains]:
            chain: list[dict[str, Any]] = []
            cur: dict[str, Any] | None = r
            while cur is not None and len(chain) < 50:
                chain.append({"id": cur["id"], "instruction": clip(cur["instruction"], 500),
                              "round": cur["evol_round"], "operation": cur["evol_operation"]})
                pid = cur["parent_id"]
                if pid in rows:
                    cur = rows[pid]
                else:
                    if pid is not None:
                        chain.append({"id": pid, "instruction": clip(seeds.get(pid, "(not in the input)"), 500),
                                      "round": 0, "operation": None})
                    cur = None
            found.append(chain[::-1])
        out.append(Lineage(s.name, found, dict(sorted(per_round.items()))))
    return out


def collect_rows(steps: list[StepInfo], scores: list[str], per_side: int = 25) -> list[dict[str, Any]]:
    """A sample of kept, rejected and failed rows of every step, for the searchable row browser."""
    texts = ["id", "instruction", "input", "output"]
    lists: list[list[dict[str, Any]]] = []
    for s in steps:
        for side, status in (("output", "kept"), ("rejected", "rejected"), ("failed", "failed")):
            cols = [*texts, *scores, "reason", "error"]
            out: list[dict[str, Any]] = []
            lists.append(out)
            for r in sample_rows(s.dir / side, cols, per_side):
                sc = {c: round(float(r[c]), 4) for c in scores if isinstance(r.get(c), (int, float))
                      and not isinstance(r.get(c), bool) and math.isfinite(float(r[c]))}  # fmt: skip
                prompt = r.get("instruction") or ""
                if r.get("input"):
                    prompt = f"{prompt}\n{r['input']}"
                out.append({
                    "step": s.name, "status": status, "id": clip(r.get("id"), 80), "instruction": clip(prompt),
                    "output": clip(r.get("output")), "scores": sc,
                    "reason": clip(r.get("reason") or r.get("error") or "", 300),
                })  # fmt: skip
    # interleaved, a row of each step and side in turn: the first page of the browser shows every step
    return [x for group in zip_longest(*lists) for x in group if x is not None]


def usage_rows(steps: list[StepInfo]) -> list[dict[str, Any]]:
    return [{"step": s.name, **{k: s.metrics.get(k, 0) for k in USAGE_KEYS}, "seconds": s.seconds}
            for s in steps if any(k in s.metrics for k in USAGE_KEYS)]


@dataclass
class Training:
    path: str  # relative to the run directory
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def collect_training(run_dir: Path) -> list[Training]:
    """Every trainer log (`metrics.jsonl`, see thresher.trainer.metrics) under the run directory."""
    out = []
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        train, ev = [], []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            if rec.get("kind") == "eval":
                ev.append(rec)
            elif "loss" in rec:
                train.append(rec)
        if train or ev:
            out.append(Training(str(path.relative_to(run_dir)), train, ev))
    return out


@dataclass
class Evaluation:
    """What `thresher.evaluation` wrote under the run directory: pairwise counts (`eval.json`), a training recipe's
    held-out losses and PGR (`results.json`), the iterative loop's rounds (`iterate.json`)."""

    pairwise: list[tuple[str, dict[str, Any]]]  # (path relative to the run directory, eval.json's content)
    results: dict[str, Any] | None
    rounds: dict[str, Any] | None


def collect_evaluation(run_dir: Path) -> Evaluation | None:
    def load(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    pairwise = [(str(p.relative_to(run_dir)), d) for p in sorted(run_dir.rglob("eval.json"))
                if isinstance(d := load(p), dict) and "sets" in d]  # fmt: skip
    # a round of the iterative loop is a run of its own inside the loop's directory, which holds iterate.json
    results, rounds = load(run_dir / "results.json"), load(run_dir / "iterate.json") or load(run_dir.parent / "iterate.json")
    if not pairwise and not isinstance(results, dict) and not isinstance(rounds, dict):
        return None
    return Evaluation(pairwise, results if isinstance(results, dict) else None,
                      rounds if isinstance(rounds, dict) else None)  # fmt: skip
