"""`thresher train` and `thresher export`: click commands the top-level CLI registers lazily.

Both import torch/transformers only inside the command body, so `thresher --help` stays fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from thresher.errors import ThresherError


@click.command(
    "train",
    help=(
        "Fine-tune a model with a LoRA (or prompt/prefix tuning) adapter on a dataset, as CONFIG.yaml describes.\n\n"
        "CONFIG.yaml holds trainer keys (model, dataset, lora_r, learning_rate, max_seq_len, packing, ...; see "
        "thresher.trainer.TrainConfig). A run resumes from the last checkpoint in output_dir unless --no-resume. "
        "Writes output_dir/adapter (safetensors), metrics.jsonl, TensorBoard logs, and output_dir/merged when "
        "save_merged is true."
    ),
)
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--resume/--no-resume", default=None, help="Continue from the last checkpoint (default: the config's `resume`).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after N optimizer steps in total.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None, help="Override the config's output_dir.")
@click.option(
    "--set", "assignments", multiple=True, metavar="KEY=VALUE",
    help="Override any config key, VALUE parsed as YAML (repeatable), e.g. --set lora_r=8.",
)
def train(
    config: Path, resume: bool | None, max_steps: int | None, output_dir: str | None, assignments: tuple[str, ...]
) -> None:
    import yaml

    from thresher.trainer.config import TrainConfig, load_config
    from thresher.trainer.sft import train as run_training

    _setup_logging()
    overrides: dict[str, object] = {"resume": resume, "max_steps": max_steps, "output_dir": output_dir}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise click.BadParameter(f"{assignment!r}: expected KEY=VALUE", param_hint="--set")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        cfg = load_config(TrainConfig.from_yaml(config).model_dump(), source=str(config), **overrides)
        result = run_training(cfg)
    except ThresherError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "adapter": str(result.adapter_dir),
                "merged": str(result.merged_dir) if result.merged_dir else None,
                "start_step": result.start_step,
                "steps": result.steps,
                "train_loss": result.train_loss,
                "eval_loss": result.eval_loss,
            }
        )
    )


@click.command(
    "export",
    help=(
        "Write the rows of IN (any format thresher reads) into OUT_DIR for another trainer.\n\n"
        "--for trl: JSONL in TRL's conversational `messages` layout (or --layout prompt_completion).\n"
        "--for llama-factory: alpaca (or --layout sharegpt) plus dataset_info.json.\n"
        "--for axolotl: JSONL in the `messages` layout for `type: chat_template`, plus axolotl.yaml, a config "
        "snippet that points at it."
    ),
)
@click.argument("source", metavar="IN", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--for", "target", type=click.Choice(["trl", "llama-factory", "axolotl"]), required=True,
              help="The trainer that will read the data.")
@click.option("--layout", default=None, help="Row layout (trl: messages|prompt_completion; llama-factory: alpaca|sharegpt).")
@click.option("--name", default="thresher_sft", show_default=True, help="Dataset name (file stem, dataset_info key).")
@click.option("--model", default=None, help="Base model to name in the axolotl snippet.")
@click.option("--config", "train_config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A thresher train CONFIG.yaml whose LoRA and sequence settings the axolotl snippet copies.")
def export(
    source: Path, out_dir: Path, target: str, layout: str | None, name: str, model: str | None,
    train_config: Path | None,
) -> None:
    from thresher.trainer.config import TrainConfig
    from thresher.trainer.export import export_dataset

    _setup_logging()
    try:
        cfg = TrainConfig.from_yaml(train_config) if train_config else None
        result = export_dataset(source, out_dir, target=target, layout=layout, name=name, model=model, config=cfg)
    except ThresherError as exc:
        raise click.ClickException(str(exc)) from None
    for path in result.files:
        click.echo(str(path))
    click.echo(f"{result.rows} rows written for {target}; use it with:\n{result.usage}")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@click.group(help="Trainer commands (the same as `thresher train` and `thresher export`).")
def main() -> None:
    pass


main.add_command(train)
main.add_command(export)
