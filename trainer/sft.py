"""Supervised fine-tuning with a peft adapter: the training loop, read top to bottom.

config -> device and precision -> tokenizer and data (rendered and checked before the model loads) -> model and
adapter -> optimizer and schedule -> resume from the last checkpoint -> loop (forward, loss, backward, clip, step,
log, eval, checkpoint) -> save the adapter (and the merged model).

The loss of an optimizer step is the mean cross-entropy over every supervised token of all its micro-batches, so
packing, micro-batch size and gradient accumulation do not change what is optimized. Logits are computed only at
supervised positions (prompt tokens never reach the output head) when the model's head is a plain linear layer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from thresher.errors import ConfigError, RecordError
from thresher.pipelines.prefetch import prefetch
from thresher.trainer import attention
from thresher.trainer.chat import Example, end_of_turn_ids, render_rows, resolve_chat_template
from thresher.trainer.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    replace_dir,
    save_checkpoint,
)
from thresher.trainer.config import TrainConfig, load_config
from thresher.trainer.metrics import MetricsWriter, mfu, peak_memory_gb, peak_tflops
from thresher.trainer.model import (
    attach_adapter,
    choose_attention,
    count_matmul_params,
    load_model,
    load_tokenizer,
    merge_and_save,
    resolve_model_dir,
)
from thresher.trainer.packing import Batch, block_causal_mask, collate, plan_micro_batches

log = logging.getLogger("thresher.trainer")

# Config attributes that make the output head more than a linear layer; such models take the plain forward path.
_HEAD_MODIFIERS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class TrainResult:
    """What a run produced and measured."""

    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    start_step: int  # 0 for a fresh run, the checkpoint's step when resumed
    steps: int  # optimizer steps completed in total
    train_loss: float | None  # loss of the last logged step
    eval_loss: float | None  # last eval loss, if there were eval rows
    history: list[dict[str, Any]] = field(default_factory=list)  # every record written to metrics.jsonl


@dataclass(frozen=True)
class DataCursor:
    """Position in the stream of micro-batches: the next one to take is plan(epoch)[index]."""

    epoch: int = 0
    index: int = 0


def train(config: TrainConfig | dict[str, Any] | str | Path, **overrides: Any) -> TrainResult:
    """Run (or resume) supervised fine-tuning as `config` describes; keyword overrides win over the config."""
    cfg = load_config(config, **overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # --- 1. device, precision, seed ---------------------------------------------------------------------------
    device = _device(cfg.device)
    dtype = _compute_dtype(cfg.precision, device)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # --- 2. tokenizer and data: every row is rendered and checked before the model loads ---------------------
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    train_rows, eval_rows = _read_rows(cfg)
    render = {
        "tokenizer": tokenizer,
        "chat_template": resolve_chat_template(tokenizer, cfg.chat_template),
        "max_seq_len": cfg.max_seq_len,
        "eot_ids": end_of_turn_ids(tokenizer, cfg.eot_token, _generation_eos(model_dir)),
        "train_on_history": cfg.train_on_history,
        "on_bad_row": cfg.on_bad_row,
    }
    train_examples, report = render_rows(train_rows, **render)
    eval_examples, _ = render_rows(eval_rows, **render)
    if not train_examples:
        raise RecordError(f"{cfg.dataset}: no trainable rows ({len(report.skipped)} skipped, e.g. {report.skipped[:1]})")
    log.info(
        "rendered %d rows: %d kept, %d truncated to %d tokens, %d skipped; %d eval rows",
        report.rows, report.kept, report.truncated, cfg.max_seq_len, len(report.skipped), len(eval_examples),
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(ex) for ex in train_examples]

    # --- 3. model and adapter ---------------------------------------------------------------------------------
    attn = choose_attention(cfg, device, dtype)
    base = load_model(cfg, model_dir, device, dtype, attn)
    matmul_params = count_matmul_params(base)  # before the adapter: MFU counts the base model's matmuls
    model = attach_adapter(cfg, base)
    base = model.get_base_model()
    if dtype != torch.float32:
        _let_autocast_pick_adapter_dtype(model)
    if cfg.compile:
        for layer in base.get_decoder().layers:
            layer.compile(dynamic=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fast_head = _plain_linear_head(cfg, base)
    peak = peak_tflops(device, "bf16" if dtype != torch.float32 else "fp32", cfg.peak_tflops)
    log.info(
        "model %s on %s (%s, attention %s): %d trainable of %d matmul parameters",
        cfg.model, device, str(dtype).removeprefix("torch."), attn, sum(p.numel() for p in trainable), matmul_params,
    )

    # --- 4. optimizer and schedule ----------------------------------------------------------------------------
    micro_per_epoch = len(plan_micro_batches(lengths, budget=cfg.micro_batch_tokens, packing=cfg.packing,
                                             seed=cfg.seed, epoch=0))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum_steps))
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(cfg.lr_scheduler, warmup_steps, total_steps)
    )

    # --- 5. resume from the last checkpoint -------------------------------------------------------------------
    step, cursor, tokens_seen = 0, DataCursor(), 0
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        _check_resumable(cfg, checkpoint)
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        step, cursor, tokens_seen = state["step"], DataCursor(**state["cursor"]), state["tokens_seen"]
        log.info("resumed from %s at step %d", checkpoint, step)
    elif not cfg.resume and list_checkpoints(out):
        log.warning("resume is off: deleting the old checkpoints in %s", out / "checkpoints")
        shutil.rmtree(out / "checkpoints")
    start_step = step
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    # --- 6. the loop ------------------------------------------------------------------------------------------
    writer = MetricsWriter(out, tensorboard=cfg.tensorboard, resume_step=start_step)
    history: list[dict[str, Any]] = []
    stream = _prefetch(_micro_batches(train_examples, lengths, cfg, cursor, pad_id), device)
    progress = _progress(cfg, total_steps, step)
    loss_fn = functools.partial(_loss_sum, attn=attn, dtype=dtype, fast_head=fast_head)
    window = _Window(device)  # what happened since the last log line
    train_loss = eval_loss = None
    model.train()
    while step < total_steps:
        # Gather the step's micro-batches first: the loss is normalised by all their supervised tokens.
        micro = [next(stream) for _ in range(cfg.grad_accum_steps)]
        n_supervised = sum(batch.n_supervised for batch, _ in micro)
        for batch, _ in micro:
            with autocast:
                batch_loss = loss_fn(model, batch.to(device))
            (batch_loss / n_supervised).backward()
            window.loss_sum += batch_loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        cursor = micro[-1][1]
        window.tokens += sum(batch.n_tokens for batch, _ in micro)
        window.supervised += n_supervised
        progress.update(1)

        if step % cfg.log_every == 0 or step == total_steps:
            seconds = window.seconds()
            train_loss = (window.loss_sum / window.supervised).item()
            record = {
                "kind": "train",
                "step": step,
                "epoch": cursor.epoch + cursor.index / max(micro_per_epoch, 1),
                "loss": train_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm.item(),
                "tokens": window.tokens,
                "supervised_tokens": window.supervised,
                "tokens_per_s": window.tokens / seconds,
                "supervised_tokens_per_s": window.supervised / seconds,
                "mfu": mfu(window.tokens / seconds, matmul_params, peak),
                "peak_memory_gb": peak_memory_gb(device),
                "seconds": seconds,
            }
            writer.write(record)
            history.append(record)
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            tokens_seen += window.tokens
            window = _Window(device)

        if eval_examples and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            with window.paused():  # eval time is not training throughput
                eval_loss = _evaluate(model, eval_examples, cfg, pad_id, device, autocast, loss_fn)
            record = {"kind": "eval", "step": step, "eval_loss": eval_loss}
            writer.write(record)
            history.append(record)

        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            state = {"cursor": cursor.__dict__, "tokens_seen": tokens_seen + window.tokens, "config": cfg.model_dump()}
            with window.paused():
                save_checkpoint(out, step, model, optimizer, scheduler, state, keep=cfg.keep_checkpoints)
    stream.close()
    progress.close()
    writer.close()

    # --- 7. save the adapter (and the merged model) -----------------------------------------------------------
    adapter_dir = _save_adapter(model, tokenizer, out / "adapter")
    merged_dir = None
    if cfg.save_merged:
        merged_dir = merge_and_save(model_dir, adapter_dir, out / "merged", dtype)
    return TrainResult(out, adapter_dir, merged_dir, start_step, step, train_loss, eval_loss, history)


def _loss_sum(model: Any, batch: Batch, *, attn: str, dtype: torch.dtype, fast_head: bool) -> torch.Tensor:
    """Sum of cross-entropy over the supervised tokens of one micro-batch (fp32)."""
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.packed:
        inputs["position_ids"] = batch.position_ids
        if attn in (attention.NAME, "flash_attention_2"):
            cu = batch.cu_seqlens(batch.input_ids.device)
            longest = max(batch.seq_lens)
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        else:  # a block-diagonal causal mask: bool for SDPA, additive for eager
            inputs["attention_mask"] = block_causal_mask(
                batch.seq_lens, device=batch.input_ids.device, dtype=None if attn == "sdpa" else dtype
            )
    else:
        inputs["attention_mask"] = batch.attention_mask
    if fast_head:
        base = model.get_base_model()
        hidden = base.get_decoder()(**inputs).last_hidden_state
        logits = base.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_index))
    else:  # prompt/prefix tuning or an unusual head: the model's own forward, then our loss
        logits = model(**inputs).logits[:, -batch.input_ids.shape[1] :]  # prompt tuning prepends virtual tokens
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.loss_index)
    return F.cross_entropy(logits.float(), batch.loss_targets, reduction="sum")


@torch.no_grad()
def _evaluate(
    model: Any, examples: Sequence[Example], cfg: TrainConfig, pad_id: int, device: torch.device,
    autocast: Any, loss_fn: Callable[[Any, Batch], torch.Tensor],
) -> float:
    """Mean cross-entropy over every supervised token of the eval rows."""
    model.eval()
    lengths = [len(ex) for ex in examples]
    total, count = torch.zeros((), device=device), 0
    for indices in plan_micro_batches(lengths, budget=cfg.micro_batch_tokens, packing=cfg.packing, seed=0, epoch=0):
        batch = collate([examples[i] for i in indices], packing=cfg.packing, pad_id=pad_id)
        with autocast:
            total += loss_fn(model, batch.to(device))
        count += batch.n_supervised
    model.train()
    return (total / max(count, 1)).item()


class _Window:
    """Tokens, supervised tokens, summed loss and training time since the last log line (eval and saving excluded)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tokens = self.supervised = 0
        self.loss_sum = torch.zeros((), device=device)
        self.start = _now(device)
        self.excluded = 0.0

    def seconds(self) -> float:
        return max(_now(self.device) - self.start - self.excluded, 1e-9)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        begin = _now(self.device)
        try:
            yield
        finally:
            self.excluded += _now(self.device) - begin


def _micro_batches(
    examples: Sequence[Example], lengths: list[int], cfg: TrainConfig, cursor: DataCursor, pad_id: int
) -> Generator[tuple[Batch, DataCursor], None, None]:
    """Endless micro-batches from `cursor` on, epoch after epoch, each with the cursor just past it."""
    epoch, index = cursor.epoch, cursor.index
    while True:
        plan = plan_micro_batches(lengths, budget=cfg.micro_batch_tokens, packing=cfg.packing, seed=cfg.seed,
                                  epoch=epoch)
        for i in range(index, len(plan)):
            batch = collate([examples[j] for j in plan[i]], packing=cfg.packing, pad_id=pad_id)
            yield batch, DataCursor(epoch, i + 1)
        epoch, index = epoch + 1, 0


def _prefetch(
    stream: Generator[Any, None, None], device: torch.device, depth: int = 2
) -> Generator[Any, None, None]:
    """On CUDA, collate and pin the next micro-batches on a thread while the GPU computes the current one."""
    if device.type != "cuda":
        return stream
    return prefetch(stream, depth, prepare=lambda item: (item[0].pin_memory(), item[1]))


def _schedule(kind: str, warmup: int, total: int) -> Any:
    """Learning-rate multiplier for the update after `step` updates: linear warm-up, then cosine/linear/constant."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return multiplier


def _read_rows(cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows and eval rows (a separate file, or a seeded hold-out of the training file)."""
    from thresher.data import read_records

    rows = read_records(cfg.dataset, layout=cfg.dataset_layout).to_pylist()
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if cfg.eval_dataset is not None:
        return rows, read_records(cfg.eval_dataset, layout=cfg.dataset_layout).to_pylist()
    if cfg.eval_fraction == 0 or len(rows) < 2:
        return rows, []
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * cfg.eval_fraction)))
    held_out = set(random.Random(cfg.seed).sample(range(len(rows)), n_eval))
    return [r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out]


def _check_resumable(cfg: TrainConfig, checkpoint: Path) -> None:
    saved = TrainConfig(**read_state(checkpoint)["config"])
    diff = cfg.semantic_diff(saved)
    if diff:
        changes = ", ".join(f"{k}: checkpoint {old!r} -> config {new!r}" for k, (new, old) in diff.items())
        raise ConfigError(
            f"{checkpoint} was made with a different config ({changes}); use another output_dir, or resume: false "
            "(--no-resume) to start over"
        )
    if (saved.max_steps, saved.epochs) != (cfg.max_steps, cfg.epochs):
        # Allowed (extending a run is common), but the schedule is rebuilt for the new length: the remaining steps
        # follow a warm-up/decay curve the finished ones did not, as in HF Trainer.
        log.warning(
            "resuming with max_steps=%s epochs=%s where the checkpoint had max_steps=%s epochs=%s: the learning-rate "
            "schedule is recomputed for the new length from the checkpoint's step on",
            cfg.max_steps, cfg.epochs, saved.max_steps, saved.epochs,
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here")
    return device


def _compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16")
        return torch.bfloat16
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_ok else torch.float32


def _let_autocast_pick_adapter_dtype(model: Any) -> None:
    """Under autocast, peft's cast of every LoRA input to fp32 only copies activations: turn it off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # type: ignore[attr-defined]


def _plain_linear_head(cfg: TrainConfig, base: Any) -> bool:
    if cfg.adapter != "lora" or not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return False
    config = base.config
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_MODIFIERS)


def _generation_eos(model_dir: Path) -> list[int]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        return []
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _save_adapter(model: Any, tokenizer: Any, target: Path) -> Path:
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _progress(cfg: TrainConfig, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not cfg.progress_bar)
