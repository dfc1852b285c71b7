"""The iterative data <-> training loop: each round the current model makes the data, curation keeps the best, the
trainer trains, and the new model is compared with the one before; the loop stops when it stops improving.

A training recipe (`thresher.evaluation.recipes`) with an `iterate:` section:

    iterate:
      model_steps: [respond]   # steps of the data recipe whose `backend` becomes the current model each round
      metric: heldout_loss     # or pairwise (eval.pairwise: the round's model against the previous one)
      min_improvement: 0.0     # a round must beat the previous model by more than this, or the loop stops
      backend: {dtype: float32, max_length: 1024}   # extra Transformers arguments for the current model
      serve: transformers      # or vllm: a running vLLM server answers, each round's adapter loaded into it
      vllm: {base_url: http://127.0.0.1:8000/v1, model: Qwen2.5-1.5B-Instruct}   # the server and its base model

Round r (0-based) runs in `round-<r>/` (a pipeline run, with its report.html): the data recipe with the model steps' backend set to the current model (the
base in round 0, then the previous round's adapter, served by the Transformers backend, which merges it at load),
`train.json`, `train/` (a fresh adapter on the base, trained on this round's curated rows, as STaR restarts from the
base each iteration), and `round.json` (the comparison). `iterate.json` holds every finished round, the best round
and why the loop stopped. Resume: a finished round (its `round.json`) is read back; inside a killed round the
pipeline continues after its last committed batch, the trainer from its last checkpoint, and the comparison re-asks
only what the request cache lacks.

With `serve: vllm` the current model answers from a vLLM server (started by you with `--enable-lora`,
`--max-lora-rank` of at least the recipe's `lora_r`, and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, on the machine or
filesystem that holds the run directory): round 0 asks the base model it serves, and each later round first loads the
previous round's adapter into it (`/v1/load_lora_adapter`) under the name `<recipe>-round-<r>-<digest>`, the digest
of the adapter's files, so the request cache never answers a retrained adapter from an older one's replies.
Generation then runs at vLLM's speed instead of the Transformers backend's, and so do a pairwise comparison's
answers (the round's adapter is loaded to answer against the model before); held-out loss stays local.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from thresher.errors import ConfigError


class IterateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Steps of the data recipe whose `backend` is replaced by the current model each round.
    model_steps: list[str] = Field(min_length=1)
    # What says a round improved: lower held-out loss (eval.heldout), or a pairwise winning score against the
    # previous model above 1 (eval.pairwise).
    metric: Literal["heldout_loss", "pairwise"] = "heldout_loss"
    # The gain a round must make over the previous model (loss drop, or winning score above 1) to go on.
    min_improvement: float = 0.0
    # Extra arguments of the Transformers backend that serves the current model (dtype, device, max_length, ...).
    backend: dict[str, Any] = Field(default_factory=dict)
    # Who answers as the current model: the Transformers backend in process, or a running vLLM server into which
    # each round's adapter is loaded (see the module docstring).
    serve: Literal["transformers", "vllm"] = "transformers"
    # serve: vllm: the server's backend spec keys (base_url, model: the base model's served name, api_key_env,
    # max_concurrency, ...).
    vllm: dict[str, Any] = Field(default_factory=dict)


def iterate(recipe: Any, run_dir: str | Path, *, rounds: int, progress: bool = False) -> dict[str, Any]:
    """Run up to `rounds` rounds of the loop in `run_dir` (resuming what is there); returns `iterate.json`'s content."""
    from thresher.evaluation.recipes import TrainRecipe, build_rows, load_train_recipe, train_once
    from thresher.pipelines.runner import atomic_write_text
    from thresher.trainer.model import resolve_model_dir

    if rounds < 1:
        raise ConfigError(f"iterate: rounds must be >= 1, got {rounds}")
    if not isinstance(recipe, TrainRecipe):
        recipe = load_train_recipe(recipe)
    spec = recipe.iterate
    if spec is None:
        raise ConfigError(f"training recipe {recipe.name!r} has no `iterate:` section (model_steps, metric, ...)")
    if spec.metric == "heldout_loss" and not recipe.eval.heldout:
        raise ConfigError(f"training recipe {recipe.name!r}: iterate.metric heldout_loss needs eval.heldout")
    if spec.metric == "pairwise" and not recipe.eval.pairwise:
        raise ConfigError(f"training recipe {recipe.name!r}: iterate.metric pairwise needs eval.pairwise")
    if spec.serve == "vllm" and not (spec.vllm.get("base_url") and spec.vllm.get("model")):
        raise ConfigError(f"training recipe {recipe.name!r}: iterate.serve vllm needs iterate.vllm.base_url and "
                          "iterate.vllm.model (the base model's name on that server)")  # fmt: skip
    data = yaml.safe_load(Path(recipe.data).read_text(encoding="utf-8"))
    missing = [s for s in spec.model_steps if s not in (data.get("steps") or {})]
    if missing:
        raise ConfigError(f"iterate.model_steps names {missing}, not steps of {recipe.data}; "
                          f"its steps: {sorted(data.get('steps') or {})}")  # fmt: skip
    run = Path(run_dir)
    base_dir = str(resolve_model_dir(str(recipe.train.get("model"))))
    state_path = run / "iterate.json"
    done: list[dict[str, Any]] = []
    adapter: str | None = None  # the current model: the base, then the best round's adapter
    previous_loss: float | None = None
    stopped = f"ran the {rounds} rounds asked for"
    for r in range(rounds):
        folder = run / f"round-{r}"
        record_path = folder / "round.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
        else:
            record = _round(recipe, spec, data, folder, r, base_dir, adapter, previous_loss,
                            build_rows=build_rows, train_once=train_once, progress=progress)  # fmt: skip
            atomic_write_text(record_path, json.dumps(record, indent=1))
        done.append(record)
        if not record["improved"]:
            stopped = f"round {r} did not improve on the model before it ({record['comparison']})"
            break
        adapter, previous_loss = record["adapter"], record.get("heldout_loss")
    best = max((rec["round"] for rec in done if rec["improved"]), default=None)
    state = {"name": recipe.name, "rounds": done, "best_round": best,
             "best_adapter": done[best]["adapter"] if best is not None else None, "stopped": stopped}  # fmt: skip
    atomic_write_text(state_path, json.dumps(state, indent=1))
    from thresher.evaluation.recipes import write_run_report

    write_run_report(run / f"round-{done[-1]['round']}")  # the last round's report also shows every round
    return state


def _round(recipe: Any, spec: IterateSpec, data: dict[str, Any], folder: Path, r: int, base_dir: str,
           adapter: str | None, previous_loss: float | None, *, build_rows: Any, train_once: Any,
           progress: bool) -> dict[str, Any]:  # fmt: skip
    from thresher.pipelines.recipe import recipe_from_text

    current = current_model(spec, base_dir, adapter, name=f"{recipe.name}-round-{r - 1}")
    round_data = json.loads(json.dumps(data))
    round_data["name"] = f"{data.get('name', 'data')}-round-{r}"
    for name in spec.model_steps:
        round_data["steps"][name].setdefault("params", {})["backend"] = current
    pipeline = recipe_from_text(yaml.safe_dump(round_data, sort_keys=False, allow_unicode=True),
                                source=f"{recipe.data} (round {r})", base_dir=Path(recipe.data).parent)  # fmt: skip
    rows = build_rows(pipeline, folder, folder / "train.json", progress=progress)
    trained = train_once({**recipe.train, "dataset": str(folder / "train.json")}, folder / "train")
    record: dict[str, Any] = {"round": r, "rows": rows, "train": trained, "adapter": trained["adapter"],
                              "made_by": "base" if adapter is None else adapter}  # fmt: skip
    if recipe.eval.heldout:
        from thresher.evaluation.recipes import _loss

        record["heldout_loss"] = _loss(recipe, trained["adapter"])
        if previous_loss is None:
            previous_loss = _loss(recipe, adapter)
        record["previous_heldout_loss"] = previous_loss
    if spec.metric == "heldout_loss":
        gain = record["previous_heldout_loss"] - record["heldout_loss"]
        record["comparison"] = f"held-out loss {record['heldout_loss']:.4f} vs {previous_loss:.4f} before"
    else:
        from thresher.evaluation.pairwise import pairwise_eval

        ev = dict(recipe.eval.pairwise or {})
        after = current_model(spec, base_dir, trained["adapter"], name=f"{recipe.name}-round-{r}")
        res = pairwise_eval(after, current, judge=ev.pop("judge", None),
                            test_sets=ev.pop("test_sets", []), names=(f"round-{r}", "before"),
                            out_dir=folder / "eval", **ev)  # fmt: skip
        scores = [s.winning_score for s in res.sets if s.winning_score is not None]
        score = sum(scores) / len(scores) if scores else 1.0
        record["pairwise"] = res.summary()
        gain = score - 1.0
        record["comparison"] = f"winning score {score:.3f} against the model before"
    record["gain"] = gain
    record["improved"] = gain > spec.min_improvement
    record["answered_by"] = current.get("model")
    return record


def current_model(spec: IterateSpec, base_dir: str, adapter: str | None, *, name: str) -> dict[str, Any]:
    """The backend spec of the model that answers this round: the base, or the base with the previous adapter,
    in process (Transformers) or loaded into a vLLM server under `name` plus the adapter's digest."""
    if spec.serve == "vllm":
        server = {**spec.vllm, "kind": "vllm"}
        if adapter is None:
            return server
        from thresher.llms.bundled import model_digest
        from thresher.llms.vllm_lora import load_lora_adapter

        return load_lora_adapter(server, f"{name}-{model_digest(adapter)[:12]}", adapter)
    current: dict[str, Any] = {**spec.backend, "kind": "transformers", "model": base_dir}
    if adapter is not None:
        current["adapter"] = adapter
    return current
