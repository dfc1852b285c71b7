"""`RewardScorer`: a reward model's score of each (instruction, response) pair.

Any `AutoModelForSequenceClassification` checkpoint on disk or in the local Hugging Face cache (nothing is
downloaded) with one output (a reward head), or several with `label` naming the one to read. The pair goes in as the
model was trained to read it: `format="chat"` renders the row's conversation (`record_messages`, the trainer's
mapping) with the tokenizer's chat template, as decoder reward models (Skywork, ArmoRM, Llama-based RMs) expect;
`format="pair"` encodes the user turn and the response as a text pair, as encoder reward models (DeBERTa, BERT)
expect; "auto" picks chat when the tokenizer has a template. Rows are sorted by length and batched with right
padding, so each row's score is the one it gets alone.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from thresher.errors import BackendError, ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime
from thresher.pipelines.step import RowStep
from thresher.scorers.ifd import column_or_nulls

FORMATS = ("auto", "chat", "pair")


class RewardScorer(RowStep):
    """Score each row with a sequence-classification reward model; writes `output_column` (default "reward").

    model: a local checkpoint directory (or a hub id already in the local cache). max_length: tokens per row (longer
    rows are cut from the end). label: which output to read when the head has several (an index or a label name).
    dtype: "float32", "bfloat16" or "auto" (default: bf16 on CUDA, fp32 elsewhere). A row with no output fails.
    """

    inputs = ("instruction", "output")
    outputs = ("reward",)
    VERSION = "1"
    model_: Any = None
    tokenizer_: Any = None

    def __init__(
        self,
        *,
        model: str | os.PathLike[str],
        format: str = "auto",
        max_length: int = 2048,
        label: int | str | None = None,
        output_column: str = "reward",
        dtype: str | None = None,
        device: str = runtime("auto"),
        batch_size: int = runtime(16),
    ) -> None:
        self.model = model
        self.format = format
        self.max_length = max_length
        self.label = label
        self.output_column = output_column
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size

    def writes(self) -> tuple[str, ...]:
        return (self.output_column,)

    def fingerprint_extra(self) -> dict[str, Any]:
        from thresher.llms.bundled import model_digest

        path = os.path.expanduser(os.fspath(self.model))
        return {"weights": model_digest(path)} if os.path.exists(path) else {}

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"RewardScorer: unknown format {self.format!r}; valid: {list(FORMATS)}")
        if self.dtype not in (None, "float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"RewardScorer: dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"RewardScorer: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.batch_size < 1:
            raise ConfigError(f"RewardScorer: batch_size must be >= 1, got {self.batch_size}")

    # ---- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        if getattr(self, "model_", None) is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from thresher.llms.hf import dtype_kwarg

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        name = self.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        dtype: Any = "auto" if name == "auto" else getattr(torch, name)
        src = os.path.expanduser(os.fspath(self.model))
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            model: Any = AutoModelForSequenceClassification.from_pretrained(
                src, local_files_only=True, **dtype_kwarg(dtype)
            )
        except OSError as e:
            raise BackendError(f"RewardScorer: cannot load {src} (no downloads here; give a local directory): {e}") from e
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        self.column_ = self._label_index(model.config)
        fmt = self.format
        if fmt == "auto":
            fmt = "chat" if getattr(tok, "chat_template", None) else "pair"
        self.format_ = fmt
        model.to(device).eval()
        self.model_, self.tokenizer_, self.device_ = model, tok, torch.device(device)

    def _label_index(self, config: Any) -> int:
        n = int(config.num_labels)
        if self.label is None:
            if n != 1:
                raise ConfigError(
                    f"RewardScorer: {self.model} has {n} outputs {config.id2label}; name the reward with label="
                )
            return 0
        if isinstance(self.label, int) and 0 <= self.label < n:
            return self.label
        by_name = {str(v): int(k) for k, v in (config.id2label or {}).items()}
        if str(self.label) in by_name:
            return by_name[str(self.label)]
        raise ConfigError(f"RewardScorer: label {self.label!r} is not one of {n} outputs {config.id2label}")

    def unload(self) -> None:
        self.model_ = self.tokenizer_ = None

    # ---- rows -----------------------------------------------------------------------------------

    def _encode(self, rows: list[dict[str, Any]]) -> list[list[int]]:
        from thresher.data.messages import record_messages, user_text

        tok = self.tokenizer_
        if self.format_ == "chat":
            texts = [tok.apply_chat_template(record_messages(r), tokenize=False) for r in rows]
            enc = tok(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)
        else:
            users = [user_text(r.get("instruction"), r.get("input")) for r in rows]
            answers = [str(r["output"]) for r in rows]
            enc = tok(users, answers, truncation=True, max_length=self.max_length)
        return [list(x) for x in enc["input_ids"]]

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        import torch

        self.load()
        n = batch.num_rows
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else None
        cols = {c: column_or_nulls(batch, c) for c in ("instruction", "input", "output", "system", "history")}
        errors: list[str | None] = [None] * n
        todo, rows = [], []
        for i in range(n):
            row = {c: v[i] for c, v in cols.items()}
            if row["output"] is None:
                errors[i] = f"{ModelStep.row_name(ids, i)}: field 'output' is null: no response to score"
                continue
            todo.append(i)
            rows.append(row)
        seqs = self._encode(rows) if rows else []
        scores: list[float | None] = [None] * n
        pad = self.tokenizer_.pad_token_id
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            width = max(len(seqs[k]) for k in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, k in enumerate(chunk):
                input_ids[r, : len(seqs[k])] = torch.tensor(seqs[k], dtype=torch.long)
                mask[r, : len(seqs[k])] = 1
            with torch.inference_mode():
                logits = self.model_(input_ids=input_ids.to(self.device_), attention_mask=mask.to(self.device_)).logits
            values = logits[:, self.column_].float().cpu().tolist()
            for k, v in zip(chunk, values, strict=True):
                scores[todo[k]] = float(v)
        return {self.output_column: pa.array(scores, type=pa.float64()), "error": errors}
