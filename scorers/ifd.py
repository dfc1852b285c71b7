"""`IFDScorer`: instruction-following difficulty (Cherry LLM), and its Superfiltering variant.

Cherry's IFD of a row is the mean cross-entropy of its answer given the instruction over the mean cross-entropy of
the answer alone, both over the answer's tokens only. An IFD near or above 1 says the instruction does not help the
model predict the answer: above 1 the pair is flagged (`ifd_above_1`; Cherry drops those rows, and selection steps
keep the top by IFD among the rest). A scorer removes nothing.

- `variant="cherry"`: the unconditioned text keeps the template's response header (the answer after "assistant\\n"
  or "### Response:\\n"), so both passes predict the same answer tokens in the same place; IFD = ratio of losses.
- `variant="superfiltering"` (Superfiltering, weak-to-strong filtering): a small scorer model (GPT-2 class), the bare
  answer as the unconditioned text (no header, tokenized on its own; with no BOS its first token has no score), and
  IFD = ratio of perplexities, exp(loss_conditioned) / exp(loss_answer).

The prompt is rendered as the trainer renders it (`template="chat"`: the model's chat template over
`thresher.data.messages.record_messages(row)`, the answer ending with the end-of-turn token the trainer supervises)
or by a named template (`"alpaca"`, as in both papers: our own preamble with the Alpaca section markers; the
response header is the template's last paragraph, "### Response:\\n"; override the files with
`prompts={"alpaca": path, "alpaca_input": path}`). The answer is cut to the same token budget in both passes: what
fits in `max_length` tokens (papers: 512) after the conditioned prompt.

The passes run through any backend with `score_answers` (`thresher.llms.token_scoring.TokenScorer`): the local
`Transformers` model (batched, sorted by length, right-padded so batched numbers equal one-at-a-time ones; bf16 on
CUDA unless the spec names a dtype) or `OpenAICompatible` against a vLLM server (`prompt_logprobs`), which scores
without loading the model in the job. Every pass is kept in the request cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from thresher.errors import ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import check_overrides, load_prompt, prompts_digest
from thresher.pipelines.step import RowStep

VARIANTS = ("cherry", "superfiltering")
TEMPLATES = ("chat", "alpaca")
_ALPACA = ("alpaca", "alpaca_input")


def _text(v: Any) -> str:
    return "" if v is None else str(v)


def column_or_nulls(batch: pa.Table, name: str) -> list[Any]:
    """A column as a Python list, or nulls when the batch lacks it (optional alpaca columns)."""
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def default_dtype(spec: Any) -> Any:
    """A `transformers` spec with no dtype gets bf16 where it will run on CUDA, fp32 elsewhere: the dtype then
    enters the fingerprint as it runs."""
    if not isinstance(spec, Mapping) or str(spec.get("kind", "")).lower() not in ("transformers", "hf"):
        return spec
    if "dtype" in spec:
        return spec
    device = str(spec.get("device", "auto"))
    try:
        import torch

        cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    except ImportError:
        cuda = False
    return {**spec, "dtype": "bfloat16" if cuda else "float32"}


class IFDScorer(ModelStep, RowStep):
    """Cherry LLM's IFD of each row's answer (or Superfiltering's, `variant="superfiltering"`); see the module
    docstring.

    backend: a spec (`{"kind": "transformers", "model": ...}`, `{"kind": "vllm", "base_url": ..., "model": ...,
    "tokenizer": ...}`) or a backend object with `score_answers`; None: the bundled SmolLM2-135M-Instruct in
    transformers. template: "chat" or "alpaca" (default: "chat" for cherry, "alpaca" for superfiltering, whose
    GPT-2-class models have no chat template). max_length: tokens of prompt + answer (papers: 512).
    batch_size: rows per call, and sequences per forward pass of a local model.

    Columns: `ifd`, `loss_conditioned` (mean NLL of the answer tokens given the prompt), `loss_answer` (given the
    header alone, or nothing), `n_answer_tokens` (answer tokens scored in the conditioned pass), `ifd_above_1`.
    A row with no instruction or no output, or whose prompt fills `max_length`, fails with the reason.
    """

    inputs = ("instruction", "output")
    outputs = ("ifd", "loss_conditioned", "loss_answer", "n_answer_tokens", "ifd_above_1")
    VERSION = "1"
    model_params = {"backend": "logprobs"}

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        variant: str = "cherry",
        template: str | None = None,
        max_length: int = 512,
        prompts: Mapping[str, str] | None = None,
        api_key: str | None = secret(),
        batch_size: int = runtime(16),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.variant = variant
        self.template = template
        self.max_length = max_length
        self.prompts = prompts
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    # ---- configuration --------------------------------------------------------------------------

    def _template(self) -> str:
        if self.template is not None:
            return self.template
        return "alpaca" if self.variant == "superfiltering" else "chat"

    def check(self) -> None:
        name = type(self).__name__
        if self.variant not in VARIANTS:
            raise ConfigError(f"{name}: unknown variant {self.variant!r}; valid: {list(VARIANTS)}")
        if self._template() not in TEMPLATES:
            raise ConfigError(f"{name}: unknown template {self.template!r}; valid: {list(TEMPLATES)}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"{name}: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.batch_size < 1:
            raise ConfigError(f"{name}: batch_size must be >= 1, got {self.batch_size}")
        check_overrides(name, self.prompts, _ALPACA)
        super().check()
        if not callable(getattr(self._build("backend"), "score_answers", None)):
            raise ConfigError(
                f"{name}: the backend has no score_answers() (IFD's two passes over one answer budget); use "
                "{'kind': 'transformers'} or an OpenAI-compatible vLLM server ({'kind': 'vllm', ...})"
            )

    def _spec(self, param: str) -> Any:
        return default_dtype(super()._spec(param))

    def backend_overrides(self) -> dict[str, Any]:
        return {**super().backend_overrides(), "batch_size": self.batch_size}

    def fingerprint_extra(self) -> dict[str, Any]:
        if self._template() != "alpaca":
            return {}
        return {"prompts": prompts_digest("scorers", "ifd", _ALPACA, "en", self.prompts)}

    # ---- rows -----------------------------------------------------------------------------------

    def _alpaca_texts(self, rows: list[dict[str, Any]]) -> list[Any]:
        from thresher.trainer.chat import AnswerTexts

        plain = load_prompt("scorers", "ifd", "alpaca", "en", self.prompts)
        with_input = load_prompt("scorers", "ifd", "alpaca_input", "en", self.prompts)
        out = []
        for row in rows:
            inp = _text(row.get("input"))
            if inp:
                prompt = with_input.render(instruction=_text(row["instruction"]), input=inp)
            else:
                prompt = plain.render(instruction=_text(row["instruction"]))
            system = _text(row.get("system"))
            if system.strip():
                prompt = system + "\n\n" + prompt
            header = prompt[prompt.rfind("\n\n") + 2 :] if "\n\n" in prompt else prompt
            out.append(AnswerTexts(prompt, header, _text(row["output"])))
        return out

    def _chat_texts(self, backend: Any, rows: list[dict[str, Any]], names: list[str]) -> list[Any]:
        from thresher.data.messages import record_messages

        convs = [record_messages(row) for row in rows]
        try:
            return list(backend.answer_texts(convs))
        except ConfigError:  # find the row(s) the template cannot render; the others go on
            out: list[Any] = []
            for conv, name in zip(convs, names, strict=True):
                try:
                    out.append(backend.answer_texts([conv])[0])
                except ConfigError as e:
                    out.append(ValueError(f"{name}: the chat template cannot render it: {e}"))
            return out

    def map_batch(self, batch: pa.Table) -> dict[str, Any]:
        backend = self.model()
        n = batch.num_rows
        ids = batch.column("id").to_pylist() if "id" in batch.column_names else None
        cols = {c: column_or_nulls(batch, c) for c in ("instruction", "input", "output", "system", "history")}
        errors: list[str | None] = [None] * n
        todo: list[int] = []
        rows: list[dict[str, Any]] = []
        for i in range(n):
            row = {c: v[i] for c, v in cols.items()}
            name = self.row_name(ids, i)
            if not _text(row["instruction"]).strip():
                errors[i] = f"{name}: field 'instruction' is empty: IFD scores an answer to an instruction"
            elif not _text(row["output"]).strip():
                errors[i] = f"{name}: field 'output' is {'null' if row['output'] is None else 'empty'}: no answer to score"
            elif self._template() == "alpaca" and row["history"]:
                errors[i] = f"{name}: field 'history' has turns; template='alpaca' scores single-turn rows (use 'chat')"
            else:
                todo.append(i)
                rows.append(row)
        if self._template() == "alpaca":
            texts: list[Any] = self._alpaca_texts(rows)
        else:
            texts = self._chat_texts(backend, rows, [self.row_name(ids, i) for i in todo])
        ok = [k for k, t in enumerate(texts) if not isinstance(t, Exception)]
        for k, t in enumerate(texts):
            if isinstance(t, Exception):
                errors[todo[k]] = str(t)
        unconditioned = "bare" if self.variant == "superfiltering" else "header"
        scored = backend.score_answers([texts[k] for k in ok], unconditioned=unconditioned, max_length=self.max_length)
        ifd: list[float | None] = [None] * n
        loss_c: list[float | None] = [None] * n
        loss_a: list[float | None] = [None] * n
        n_tok: list[int | None] = [None] * n
        for k, pair in zip(ok, scored, strict=True):
            i = todo[k]
            if pair.error is not None:
                errors[i] = f"{self.row_name(ids, i)}: {pair.error}"
                continue
            c, a = pair.conditioned.mean_nll, pair.unconditioned.mean_nll
            if math.isnan(c) or math.isnan(a) or a == 0:
                errors[i] = (
                    f"{self.row_name(ids, i)}: field 'output' leaves no answer token to score in "
                    f"{'the conditioned' if math.isnan(c) else 'the unconditioned'} pass"
                )
                continue
            loss_c[i], loss_a[i], n_tok[i] = c, a, len(pair.conditioned.logprobs)
            ifd[i] = math.exp(c - a) if self.variant == "superfiltering" else c / a
        above = [None if v is None else v > 1.0 for v in ifd]
        return {
            "ifd": pa.array(ifd, type=pa.float64()),
            "loss_conditioned": pa.array(loss_c, type=pa.float64()),
            "loss_answer": pa.array(loss_a, type=pa.float64()),
            "n_answer_tokens": pa.array(n_tok, type=pa.int64()),
            "ifd_above_1": pa.array(above, type=pa.bool_()),
            "error": errors,
        }

