"""Training recipes: build a set with a pipeline, train on it, evaluate: one YAML file, one resumable run directory.

    name: explain_tuning
    kind: sft                     # or weak_to_strong
    data: explain.yaml            # a pipeline recipe (path relative to this file); its last step's rows are trained on
    train: {model: bundled:smollm2, max_steps: 4, max_seq_len: 256}   # TrainConfig keys; dataset/output_dir filled in
    eval: {heldout: ../data/heldout.json, heldout_max_rows: 16}       # held-out loss of the base and the trained model
    weak_to_strong: {weak_train: {lora_r: 1, max_steps: 1}, split: 0.5, label_max_tokens: 64}

Kinds:
- sft: the pipeline's rows are the training set. Explanation tuning (Orca) is this kind with a pipeline whose Respond
  draws one of the `explain` system instructions per row (recipes/explain.yaml).
- weak_to_strong (Burns et al., 2023): the pipeline gives gold rows, split in two. A weak model is trained on the
  first part's gold answers (`weak_train` overrides `train`: a smaller adapter, fewer steps) and answers the second
  part's prompts; the strong student trains (with `train`) on those weak labels, and the strong ceiling on the same
  prompts' gold answers. Performance is the negated held-out loss on `eval.heldout` (gold answers), so the performance
  gap recovered is PGR = (student - weak) / (ceiling - weak) = (loss_weak - loss_student) / (loss_weak - loss_ceiling).

Layout of the run directory: the data pipeline's run (manifest, steps/), `train.json`, `train/` (the trainer's output_dir),
for weak_to_strong `weak/`, `weak_labels.json`, `student/`, `ceiling/`, and `results.json`. Each training leaves a
`_done.json` and is not run again; a killed training resumes from its last checkpoint; the pipeline resumes as usual.
`report.html`, the run report, adds an Evaluation section (held-out losses, PGR, pairwise counts) to the pipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thresher.errors import ConfigError
from thresher.evaluation.iterate import IterateSpec

KINDS = ("sft", "weak_to_strong")


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Reference rows with gold answers: held-out loss of every model the recipe trains (and of the base).
    heldout: str | None = None
    heldout_max_rows: int | None = Field(default=None, ge=1)
    # Pairwise judge evaluation of the trained model against the base (thresher.evaluation.pairwise_eval keys:
    # test_sets, data_dir, judge, max_prompts, answer_max_tokens, judge_max_tokens, structured, language).
    pairwise: dict[str, Any] | None = None


class WeakToStrongSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # TrainConfig keys that make the weak model weaker than the strong one (given over `train`).
    weak_train: dict[str, Any] = Field(default_factory=dict)
    # Share of the gold rows that train the weak model; the rest are labelled by it for the student.
    split: float = Field(default=0.5, gt=0, lt=1)
    # Tokens the weak model writes per label (greedy).
    label_max_tokens: int = Field(default=128, ge=1)


class TrainRecipe(BaseModel):
    """One training recipe (see the module docstring); paths are resolved against the recipe file."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    kind: Literal["sft", "weak_to_strong"] = "sft"
    data: str
    train: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    weak_to_strong: WeakToStrongSpec | None = None
    # The iterative loop (thresher iterate; see thresher.evaluation.iterate).
    iterate: IterateSpec | None = None


def load_train_recipe(path: str | Path, **overrides: Any) -> TrainRecipe:
    """Read and check a training recipe; `overrides` replace top-level keys (train={...} merges into train)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read training recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with name, data, train, eval")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    base = path.resolve().parent
    data["data"] = _resolve(base, data.get("data"))
    ev = data.get("eval")
    if isinstance(ev, dict) and ev.get("heldout"):
        ev["heldout"] = _resolve(base, ev["heldout"])
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("model"), str) and ":" not in train["model"]:
        candidate = base / train["model"]
        if candidate.exists():
            train["model"] = str(candidate.resolve())
    try:
        recipe = TrainRecipe(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: invalid training recipe: {problems}") from None
    if recipe.kind == "weak_to_strong" and recipe.weak_to_strong is None:
        recipe.weak_to_strong = WeakToStrongSpec()
    if recipe.kind == "weak_to_strong" and not recipe.eval.heldout:
        raise ConfigError(f"{path}: kind weak_to_strong needs eval.heldout (gold rows to measure the gap on)")
    if not Path(recipe.data).is_file():
        raise ConfigError(f"{path}: data recipe {recipe.data} not found")
    return recipe


def _resolve(base: Path, value: Any) -> Any:
    if isinstance(value, str) and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def run_train_recipe(recipe: TrainRecipe | str | Path, run_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Run a training recipe in `run_dir` (resuming what is there) and return the results written to results.json."""
    from thresher.pipelines.recipe import load_recipe
    from thresher.pipelines.runner import atomic_write_text

    if not isinstance(recipe, TrainRecipe):
        recipe = load_train_recipe(recipe)
    run = Path(run_dir)
    rows = build_rows(load_recipe(recipe.data), run, run / "train.json", progress=progress)
    if recipe.kind == "weak_to_strong":
        results = _weak_to_strong(recipe, run, rows)
    else:
        trained = train_once({**recipe.train, "dataset": str(run / "train.json")}, run / "train")
        results = {"kind": "sft", "rows": rows, "train": trained}
        if recipe.eval.heldout:
            results["heldout_loss"] = {
                "base": _loss(recipe, None),
                "trained": _loss(recipe, trained["adapter"]),
            }
        if recipe.eval.pairwise:
            results["pairwise"] = _pairwise(recipe, trained["adapter"], run / "eval")
    results["name"] = recipe.name
    atomic_write_text(run / "results.json", json.dumps(results, indent=1))
    write_run_report(run)
    return results


def write_run_report(run: Path) -> Path | None:
    """The run report (report.html) with the training curves and the evaluation; a report that cannot be written is
    logged, never fails the run that made the results."""
    import logging

    try:
        from thresher.report import write_report

        return write_report(run)
    except Exception as e:  # the results are written; the report is only a view of them
        logging.getLogger("thresher.evaluation").warning("run report of %s not written: %s: %s", run, type(e).__name__, e)
        return None


def build_rows(pipeline: Any, run_dir: Path, out: Path, *, progress: bool = False) -> int:
    """Run a data pipeline and write its last step's rows (every column, `system` included) to `out`."""
    from thresher.data import write_records

    result = pipeline.run(run_dir, progress=progress)
    final = list(pipeline.nodes)[-1]
    n = write_records(result.table(final), out, layout="alpaca")
    if n == 0:
        raise ConfigError(f"the data pipeline's last step {final!r} left no rows to train on ({run_dir})")
    return n


def train_once(config: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Train (or resume) into output_dir; a finished training (its `_done.json`) is read back, not run again."""
    from thresher.pipelines.runner import atomic_write_text
    from thresher.trainer.config import load_config

    config = {"progress_bar": False, "tensorboard": False, **config, "output_dir": str(output_dir)}
    cfg = load_config(config, source=str(output_dir))
    done = output_dir / "_done.json"
    if done.is_file():
        summary: dict[str, Any] = json.loads(done.read_text())
        if "config" in summary:  # a finished training counts only for the same experiment
            diff = cfg.semantic_diff(load_config(summary["config"], source=str(done)))
            if diff:
                changes = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (new, old) in diff.items())
                raise ConfigError(f"{output_dir} holds a finished training with another config ({changes}); use "
                                  "another run directory")  # fmt: skip
        return summary
    from thresher.trainer import train

    res = train(cfg)
    summary = {"steps": res.steps, "start_step": res.start_step, "train_loss": res.train_loss,
               "eval_loss": res.eval_loss, "adapter": str(res.adapter_dir), "config": cfg.model_dump()}  # fmt: skip
    atomic_write_text(done, json.dumps(summary, indent=1))
    return summary


def _model(recipe: TrainRecipe) -> str:
    model = recipe.train.get("model")
    if not isinstance(model, str):
        raise ConfigError(f"training recipe {recipe.name!r}: train.model is required")
    return model


def _loss(recipe: TrainRecipe, adapter: str | None) -> float:
    from thresher.evaluation.heldout import heldout_loss

    assert recipe.eval.heldout is not None
    return heldout_loss(_model(recipe), recipe.eval.heldout, adapter=adapter, max_rows=recipe.eval.heldout_max_rows,
                        max_seq_len=int(recipe.train.get("max_seq_len", 512)), device="cpu"
                        if recipe.train.get("device") == "cpu" else "auto")  # fmt: skip


def _pairwise(recipe: TrainRecipe, adapter: str, out: Path) -> dict[str, Any]:
    from thresher.evaluation.pairwise import pairwise_eval
    from thresher.trainer.model import resolve_model_dir

    spec = dict(recipe.eval.pairwise or {})
    base_dir = str(resolve_model_dir(_model(recipe)))
    trained = {"kind": "transformers", "model": base_dir, "adapter": adapter}
    base = {"kind": "transformers", "model": base_dir}
    result = pairwise_eval(trained, base, judge=spec.pop("judge", None), test_sets=spec.pop("test_sets", []),
                           names=("trained", "base"), out_dir=out, **spec)  # fmt: skip
    return result.summary()


def _weak_to_strong(recipe: TrainRecipe, run: Path, n_rows: int) -> dict[str, Any]:
    from thresher.data import read_records, write_records
    from thresher.evaluation.pairwise import answer
    from thresher.llms.hf import Transformers
    from thresher.trainer.model import resolve_model_dir

    w2s = recipe.weak_to_strong or WeakToStrongSpec()
    rows = read_records(run / "train.json").to_pylist()
    cut = max(1, min(len(rows) - 1, round(len(rows) * w2s.split)))
    if len(rows) < 2:
        raise ConfigError(f"training recipe {recipe.name!r}: weak_to_strong needs at least 2 gold rows, got {len(rows)}")
    weak_rows, transfer = rows[:cut], rows[cut:]
    write_records(weak_rows, run / "weak_gold.json", layout="alpaca")
    write_records(transfer, run / "transfer_gold.json", layout="alpaca")
    weak = train_once({**recipe.train, **w2s.weak_train, "dataset": str(run / "weak_gold.json")}, run / "weak")

    labels_path = run / "weak_labels.json"
    if not labels_path.is_file():  # the weak model answers the transfer prompts (cached per request, so resumable)
        backend = Transformers(model=str(resolve_model_dir(_model(recipe))), adapter=weak["adapter"],
                               device=str(recipe.train.get("device", "auto")))  # fmt: skip
        got = answer(backend.load(), [{"instruction": r["instruction"], "input": r.get("input") or ""} for r in transfer],
                     max_tokens=w2s.label_max_tokens)  # fmt: skip
        backend.close()
        labelled = [{**r, "output": text, "label_source": "weak"} for r, (text, err) in zip(transfer, got, strict=True)
                    if err is None and text and text.strip()]  # fmt: skip
        if not labelled:
            raise ConfigError(f"training recipe {recipe.name!r}: the weak model answered none of the transfer prompts: "
                              f"{[e for _, e in got][:1]}")  # fmt: skip
        write_records(labelled, labels_path, layout="alpaca")
    student = train_once({**recipe.train, "dataset": str(labels_path)}, run / "student")
    ceiling = train_once({**recipe.train, "dataset": str(run / "transfer_gold.json")}, run / "ceiling")
    loss = {"weak": _loss(recipe, weak["adapter"]), "student": _loss(recipe, student["adapter"]),
            "ceiling": _loss(recipe, ceiling["adapter"]), "base": _loss(recipe, None)}  # fmt: skip
    return {"kind": "weak_to_strong", "rows": n_rows, "weak_rows": len(weak_rows), "transfer_rows": len(transfer),
            "heldout_loss": loss, "pgr": pgr(loss["weak"], loss["student"], loss["ceiling"]),
            "train": {"weak": weak, "student": student, "ceiling": ceiling}}  # fmt: skip


def pgr(loss_weak: float, loss_student: float, loss_ceiling: float) -> float | None:
    """Performance gap recovered with performance = -loss: (weak - student) / (weak - ceiling) in loss terms; None
    when the ceiling is no better than the weak model (no gap to recover)."""
    gap = loss_weak - loss_ceiling
    return (loss_weak - loss_student) / gap if gap > 0 else None
