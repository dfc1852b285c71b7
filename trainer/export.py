"""Export a dataset for another trainer: TRL, LLaMA-Factory or axolotl.

The row layouts themselves (messages, prompt/completion, alpaca, ShareGPT) and LLaMA-Factory's dataset_info.json
come from thresher.data's writers; this module only picks the layout each trainer reads, drops rows with no
answer (a trainer cannot learn from them), and writes the trainer-side glue: a usage note for TRL and
LLaMA-Factory, and an axolotl YAML snippet whose LoRA and sequence settings mirror a thresher TrainConfig.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thresher.errors import ConfigError
from thresher.trainer.config import TrainConfig

log = logging.getLogger("thresher.trainer")

# Layouts each trainer reads, the first being the default.
TARGET_LAYOUTS: dict[str, tuple[str, ...]] = {
    "trl": ("messages", "prompt_completion"),
    "llama-factory": ("alpaca", "sharegpt", "messages"),
    "axolotl": ("messages",),
}


@dataclass
class ExportResult:
    """Files written (data first), rows written, rows dropped for having no answer, and how to use them."""

    files: list[Path]
    rows: int
    dropped_unanswered: int
    usage: str
    extra: dict[str, Any] = field(default_factory=dict)


def export_dataset(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: str,
    layout: str | None = None,
    name: str = "thresher_sft",
    model: str | None = None,
    config: TrainConfig | None = None,
) -> ExportResult:
    """Write the rows of `source` into `out_dir` in the layout `target` ("trl", "llama-factory", "axolotl") reads.

    `model` and `config` only shape the axolotl snippet (base model, LoRA and sequence settings).
    """
    import pyarrow.compute as pc

    from thresher.data import read_records, write_dataset_info, write_records

    if target not in TARGET_LAYOUTS:
        raise ConfigError(f"target={target!r}: expected one of {sorted(TARGET_LAYOUTS)}")
    layout = layout or TARGET_LAYOUTS[target][0]
    if layout not in TARGET_LAYOUTS[target]:
        raise ConfigError(f"layout={layout!r} is not read by {target}: expected one of {list(TARGET_LAYOUTS[target])}")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"name={name!r}: expected a plain file stem such as 'thresher_sft'")

    table = read_records(source)
    answered = table.filter(pc.is_valid(table["output"]))
    dropped = table.num_rows - answered.num_rows
    if dropped:
        log.warning("%s: %d of %d rows have no output and are not exported", source, dropped, table.num_rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{name}.jsonl"
    rows = write_records(answered, data_file, layout=layout, file_format="jsonl", extra_columns=False)
    files = [data_file]

    if target == "trl":
        usage = _trl_usage(data_file, layout)
    elif target == "llama-factory":
        files.append(write_dataset_info(out, name, data_file.name, layout))
        usage = f"in your LLaMA-Factory config:\n  dataset_dir: {out.resolve()}\n  dataset: {name}"
    else:
        snippet = axolotl_config(data_file, model=model, config=config)
        snippet_file = out / "axolotl.yaml"
        snippet_file.write_text(snippet)
        files.append(snippet_file)
        usage = f"axolotl train {snippet_file.resolve()}   (check base_model first)"
    return ExportResult(files, rows, dropped, usage)


def axolotl_config(data_file: Path, *, model: str | None = None, config: TrainConfig | None = None) -> str:
    """An axolotl YAML config for a `messages` JSONL file, mirroring `config`'s settings where it has them.

    Loss goes on assistant turns only, each including its end-of-turn token, as thresher's trainer does.
    """
    base_model = model or (config.model if config else None) or "CHANGE-ME/base-model"
    doc: dict[str, Any] = {
        "base_model": base_model,
        "chat_template": "tokenizer_default",
        "datasets": [
            {
                "path": str(data_file.resolve()),
                "ds_type": "json",
                "type": "chat_template",
                "field_messages": "messages",
                "message_property_mappings": {"role": "role", "content": "content"},
                "roles_to_train": ["assistant"],
                "train_on_eos": "turn",
            }
        ],
        "val_set_size": 0.0,
        "output_dir": "./outputs/axolotl-lora",
    }
    cfg = config or TrainConfig(model=base_model, dataset=str(data_file))
    if cfg.adapter != "lora":
        raise ConfigError(f"axolotl export mirrors LoRA settings; adapter={cfg.adapter!r} has no axolotl equivalent here")
    doc.update(
        {
            "adapter": "qlora" if cfg.quantization == "4bit" else "lora",
            "load_in_4bit": cfg.quantization == "4bit",
            "load_in_8bit": cfg.quantization == "8bit",
            "lora_r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
        }
    )
    if cfg.lora_target_modules == "all-linear":
        doc["lora_target_linear"] = True
    else:
        doc["lora_target_modules"] = list(cfg.lora_target_modules)
    if cfg.use_rslora:
        doc["peft_use_rslora"] = True
    if cfg.use_dora:
        doc["peft_use_dora"] = True
    doc.update(
        {
            "sequence_len": cfg.max_seq_len,
            "sample_packing": cfg.packing,
            # axolotl counts micro-batches in (packed) sequences of sequence_len tokens; we count tokens.
            "micro_batch_size": max(1, cfg.micro_batch_tokens // cfg.max_seq_len),
            "gradient_accumulation_steps": cfg.grad_accum_steps,
            "learning_rate": cfg.learning_rate,
            "lr_scheduler": cfg.lr_scheduler,
            "warmup_ratio": cfg.warmup_ratio,
            "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm,
            "optimizer": "adamw_torch_fused",
            "bf16": "auto",
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "flash_attention": True,
            "seed": cfg.seed,
        }
    )
    if cfg.max_steps:
        doc["max_steps"] = cfg.max_steps
    else:
        doc["num_epochs"] = cfg.epochs
    header = "# axolotl config written by `thresher export --for axolotl`; adjust base_model and output_dir.\n"
    return header + yaml.safe_dump(doc, sort_keys=False)


def _trl_usage(data_file: Path, layout: str) -> str:
    loss = (
        "the loss covers the completion only (TRL's default for prompt/completion data)"
        if layout == "prompt_completion"
        else "set SFTConfig(assistant_only_loss=True) to train on assistant turns only (the chat template must "
        "mark them with {% generation %})"
    )
    return (
        f'dataset = datasets.load_dataset("json", data_files="{data_file.resolve()}", split="train")\n'
        f"trl.SFTTrainer(model=..., train_dataset=dataset, args=trl.SFTConfig(...)).train()\n# {loss}"
    )
