"""Held-out loss: the mean cross-entropy of a model (a base, or a base with a trained adapter) on reference rows.

The rows are rendered, masked and batched exactly as the trainer does (`thresher.trainer`: chat template, loss on the
answer tokens only, the same truncation), and the number is the trainer's own eval loss, so a run's `eval_loss` and
this function agree on the same rows, and two models (say, trained on two curated subsets) compare on equal terms.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from thresher.errors import RecordError


def heldout_loss(
    model: str,
    dataset: str | Path,
    *,
    adapter: str | Path | None = None,
    max_rows: int | None = None,
    max_seq_len: int = 512,
    micro_batch_tokens: int = 2048,
    device: str = "auto",
) -> float:
    """Mean loss over the answer tokens of `dataset`'s rows (any file thresher reads; rows need `output`).

    model: what the trainer takes ("bundled:smollm2", a model directory, a .gguf file); adapter: a peft adapter
    directory (`output_dir/adapter` of `thresher train`) put on it.
    """
    return _heldout(model, dataset, adapter=adapter, max_rows=max_rows, max_seq_len=max_seq_len,
                    micro_batch_tokens=micro_batch_tokens, device=device, per_row=False)[0][0]  # fmt: skip


def heldout_row_losses(
    model: str,
    dataset: str | Path,
    *,
    adapter: str | Path | None = None,
    max_rows: int | None = None,
    max_seq_len: int = 512,
    device: str = "auto",
) -> list[tuple[str, float, int]]:
    """(row id, summed loss, answer tokens) per row: the parts of `heldout_loss` (sum of sums / sum of tokens), for
    paired bootstrap confidence intervals between two models on the same rows."""
    got = _heldout(model, dataset, adapter=adapter, max_rows=max_rows, max_seq_len=max_seq_len,
                   micro_batch_tokens=max_seq_len, device=device, per_row=True)  # fmt: skip
    return [(str(row_id), total, n) for total, n, row_id in got]


def _heldout(
    model: str, dataset: str | Path, *, adapter: str | Path | None, max_rows: int | None, max_seq_len: int,
    micro_batch_tokens: int, device: str, per_row: bool,
) -> list[tuple[float, int, str]]:  # fmt: skip
    import torch

    from thresher.trainer import sft
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.config import TrainConfig
    from thresher.trainer.model import choose_attention, load_model, load_tokenizer, resolve_model_dir

    cfg = TrainConfig(model=model, dataset=str(dataset), max_rows=max_rows, max_seq_len=max_seq_len,
                      micro_batch_tokens=max(micro_batch_tokens, max_seq_len), packing=True, device=device,
                      precision="fp32" if device == "cpu" else "auto", progress_bar=False, tensorboard=False)  # fmt: skip
    dev = sft._device(cfg.device)
    dtype = sft._compute_dtype(cfg.precision, dev)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    rows, _ = sft._read_rows(cfg)
    examples, report = render_rows(
        rows, tokenizer, chat_template=resolve_chat_template(tokenizer, None), max_seq_len=cfg.max_seq_len,
        eot_ids=end_of_turn_ids(tokenizer, None, sft._generation_eos(model_dir)), on_bad_row="skip",
    )  # fmt: skip
    if not examples:
        raise RecordError(f"no row with an answer to score ({len(report.skipped)} skipped)", path=str(dataset))
    attn = choose_attention(cfg, dev, dtype)
    net: Any = load_model(cfg, model_dir, dev, dtype, attn)
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(adapter))
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    loss_fn = functools.partial(sft._loss_sum, attn=attn, dtype=dtype, fast_head=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not per_row:
        return [(float(sft._evaluate(net, examples, cfg, pad_id, dev, autocast, loss_fn)), 0, "")]
    out = []
    for ex in examples:  # one at a time: each row's own sum (packing makes a batch of one example exactly that row)
        mean = float(sft._evaluate(net, [ex], cfg, pad_id, dev, autocast, loss_fn))
        out.append((mean * ex.n_supervised, ex.n_supervised, ex.row_id))
    return out
