"""What a pipeline will cost before anything is paid for: requests, prompt and completion tokens and USD per step.

How it works. The pipeline is walked in order with a small sample of real rows (`sample`, 8 by default) and the
number of rows each step is expected to receive. Sources without a model (Load) run for real, so the row count and
the sample are the data's own. A model step says which requests it would send for the sample
(`ModelStep.estimate_requests`): by default it runs on the sample against a dry-run backend (`DryRunBackend`) that
records every request, with the step's own prompts rendered on the real rows, and answers without sending anything;
a step whose requests do not follow its rows (SelfInstruct grows to `num_instructions`) says so itself. Each planned
request carries `count`, how many like it the whole step sends, so the sample's requests scale to the rows expected.
A step that is finished in the run directory costs nothing (its real rows and sample are read back instead); one
stopped part way (a crash, a budget) is counted from where it resumes: a row step's rows after its committed
batches, SelfInstruct's missing tasks at the acceptance its committed batches measured.

Tokens. Prompt tokens are counted on the rendered messages with `tokenizer`: "auto" (tiktoken's o200k_base when
installed and loadable offline, else the chars/4 rule), "chars4" (one token per 4 characters, OpenAI's rule of
thumb, plus 3 tokens of chat framing per message and 3 per request), "words" (whitespace-separated words, what the
scripted test server counts) or a callable. Completion tokens are measured where the request cache already holds
answers to the sample's requests (an earlier or interrupted run, a smaller trial): the mean length of those answers,
per step and max_tokens; elsewhere `fill` × max_tokens per sample (default 0.5: models rarely write to their budget).
The dry-run answers are the cached ones or filler that long, so a step downstream (a judge that reads the answer)
renders prompts of the expected size.

Assumptions, kept simple and printed with the table: filters keep every row (an upper bound downstream of them);
answers already in the request cache are counted as paid; a step whose dry run fails is marked and left out of the
total rather than guessed.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thresher.errors import ConfigError
from thresher.llms.base import Completion, Usage

if TYPE_CHECKING:
    from thresher.pipelines.dag import Pipeline
    from thresher.pipelines.step import Step

DEFAULT_FILL = 0.5
DEFAULT_MAX_TOKENS = 256  # what a request without max_tokens is assumed to be allowed
_FILLER = ("data", "model", "answer", "value", "result", "method", "sample", "token", "field", "score", "record")


@dataclass
class PlannedRequest:
    """One request a step would send: the rendered messages, its sampling budget, and how many like it."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    n: int = 1
    #: how many requests like this one the whole step sends (the sample's requests scaled to the expected rows)
    count: float = 1.0
    #: the model parameter that sends it (its backend's prices apply)
    param: str = "backend"
    #: expected completion tokens per sample, when the step knows better than fill × max_tokens
    completion_tokens: float | None = None
    #: completion_tokens was measured on an answer in the request cache, not assumed
    measured: bool = False


# ---- counting tokens ------------------------------------------------------------------------------


@dataclass
class TokenCounter:
    """Counts a text's tokens, and what the chat format adds per message and per request."""

    name: str
    count: Callable[[str], int]
    per_message: int = 0
    per_request: int = 0

    def messages(self, messages: Sequence[Mapping[str, Any]]) -> int:
        return self.per_request + sum(self.per_message + self.count(str(m.get("content") or "")) for m in messages)


def token_counter(tokenizer: str | Callable[[str], int] | TokenCounter = "auto") -> TokenCounter:
    """A TokenCounter from a name ("auto", "tiktoken", "chars4", "words") or a callable text -> tokens."""
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    if callable(tokenizer):
        return TokenCounter(getattr(tokenizer, "__name__", "custom"), tokenizer)
    if tokenizer in ("auto", "tiktoken"):
        try:
            import tiktoken

            enc = tiktoken.get_encoding("o200k_base")  # loads from tiktoken's cache; offline without one, it fails
            return TokenCounter("tiktoken:o200k_base", lambda t: len(enc.encode(t, disallowed_special=())), 3, 3)
        except Exception as e:  # not installed, or its encoding file cannot be fetched here
            if tokenizer == "tiktoken":
                raise ConfigError(f"tokenizer='tiktoken' is not usable here ({type(e).__name__}: {e}); use 'chars4'") from e
    if tokenizer in ("auto", "chars4"):
        return TokenCounter("chars4", lambda t: math.ceil(len(t) / 4), 3, 3)
    if tokenizer == "words":
        return TokenCounter("words", lambda t: len(t.split()))
    raise ConfigError(f"tokenizer must be 'auto', 'tiktoken', 'chars4', 'words' or a callable, got {tokenizer!r}")


def filler_text(tokens: int, counter: TokenCounter, salt: str = "") -> str:
    """Plain words that count as about `tokens` tokens (not stop words, not a refusal: checks let them through),
    different for each `salt`, so an answer never equals the text it was asked about (an evolution of a filler)."""
    import hashlib

    h = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=4).digest(), "little")
    words: list[str] = [f"v{h % 100000}"]
    while len(words) < 100_000 and counter.count(" ".join(words)) < tokens:
        words.append(_FILLER[(h + len(words)) % len(_FILLER)])
    return " ".join(words)


# ---- the dry-run backend --------------------------------------------------------------------------


def _instance(schema: Any, text: str) -> Any:
    """A small value of a JSON schema (strings get the filler text), so structured replies parse."""
    if not isinstance(schema, Mapping):
        return text
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _instance(schema[key][0], text)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object" or "properties" in schema:
        return {k: _instance(v, text) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_instance(schema.get("items") or {}, text) for _ in range(max(1, int(schema.get("minItems") or 1)))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    return text


class DryRunBackend:
    """A chat backend that records what it is asked and answers with filler, sending nothing.

    It stands in for one model parameter of a step during an estimate: same `kind` and identity as the real backend
    (so the step takes the same code path), answers `fill` × max_tokens tokens long, structured replies that fit the
    schema asked for.
    """

    def __init__(self, real: Any, *, param: str, counter: TokenCounter, fill: float) -> None:
        self.real, self.param, self.counter, self.fill = real, param, counter, fill
        self.kind = getattr(real, "kind", None)
        self.usage = Usage()
        self.requests: list[PlannedRequest] = []
        self._lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        ident = getattr(self.real, "identity", None)
        return dict(ident()) if callable(ident) else {"kind": "dry_run"}

    def chat(self, conversations: Sequence[Sequence[Mapping[str, Any]]], **params: Any) -> list[Completion]:
        from thresher.llms.structured import Schema

        max_tokens = params.get("max_tokens")
        n = int(params.get("n") or 1)
        budget = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS
        schema = Schema.of(params["response_format"]) if params.get("response_format") is not None else None
        cached = self._cached(conversations, params)
        out = []
        for conv, hit in zip(conversations, cached, strict=True):
            if hit:  # answered before: its real length, and its real text for the steps downstream
                text, tokens = hit[0], sum(self.counter.count(t) for t in hit) / len(hit)
            else:
                text = filler_text(max(1, round(self.fill * budget)), self.counter, salt=json.dumps(conv, default=str))
                if schema is not None:
                    text = json.dumps(_instance(schema.json_schema, text), ensure_ascii=False)
                tokens = float(self.counter.count(text))
            parsed = None
            if schema is not None:
                try:
                    parsed = [schema.validate(text)] * n
                except ValueError:
                    parsed = [None] * n
            planned = PlannedRequest([dict(m) for m in conv], max_tokens, n, param=self.param,
                                     completion_tokens=tokens, measured=bool(hit))  # fmt: skip
            with self._lock:
                self.requests.append(planned)
            out.append(Completion(texts=[text] * n, finish_reasons=["stop"] * n, parsed=parsed))
        return out

    def complete(self, prompts: Sequence[str], **params: Any) -> list[Completion]:
        return self.chat([[{"role": "user", "content": p}] for p in prompts], **params)

    def _cached(self, conversations: Sequence[Any], params: Mapping[str, Any]) -> list[list[str] | None]:
        """Per conversation, its answers in the real backend's request cache when every sample is there."""
        lookup = getattr(self.real, "cached_texts", None)
        if not callable(lookup):
            return [None] * len(conversations)
        try:
            got = lookup(conversations, **{k: v for k, v in params.items() if k != "progress"})
        except Exception:  # no cache, or one that cannot be read: the estimate falls back to the fill ratio
            return [None] * len(conversations)
        return [[t for t in texts if t is not None] if all(t is not None for t in texts) else None for texts in got]

    def close(self) -> None:
        close = getattr(self.real, "close", None)
        if callable(close):
            close()


class _HashEmbedder:
    """Unit vectors from a hash of each text: embedding steps run during an estimate without loading a model."""

    kind = "dry_run"

    def identity(self) -> dict[str, Any]:
        return {"kind": "dry_run_embedder"}

    def embed(self, texts: Sequence[str]) -> Any:
        import hashlib

        import numpy as np

        out = np.zeros((len(texts), 32), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(str(t).encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(32).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


@dataclass
class DryRun:
    """What a step did on the sample against dry-run backends: the requests, and every row it gave back."""

    requests: list[PlannedRequest]
    rows: list[dict[str, Any]]


def dry_run(step: Any, sample_rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = "auto",
            fill: float = DEFAULT_FILL) -> DryRun:  # fmt: skip
    """Run a model step on `sample_rows` with every chat backend replaced by a DryRunBackend (embedders by hash
    vectors); a step that scores with a local logprob model sends no paid request and is not run."""
    import pyarrow as pa

    from thresher.llms.config import make_backend

    counter = token_counter(tokenizer)
    overrides: dict[str, Any] = {}
    recorders: list[DryRunBackend] = []
    for param, need in step.model_params.items():
        if need == "chat":
            real = make_backend(step._spec(param), **step.backend_overrides())  # the step's own cache setting
            rec = DryRunBackend(real, param=param, counter=counter, fill=fill)
            overrides[param] = rec
            recorders.append(rec)
        elif need == "embed":
            overrides[param] = _HashEmbedder()
        else:
            return DryRun([], [dict(r) for r in sample_rows])
    if not recorders:
        return DryRun([], [dict(r) for r in sample_rows])
    twin = step.clone(**overrides)
    twin.progress = False
    tables = [pa.Table.from_pylist([dict(r) for r in sample_rows])] if step.n_inputs != 0 else []
    res = twin.apply(*tables)
    rows = res.output.to_pylist() + res.rejected.to_pylist() + res.failed.to_pylist()
    drop = ("rejected_by", "reason", "failed_by", "error")
    rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    for rec in recorders:
        rec.close()
    requests = [q for rec in recorders for q in rec.requests]
    # answers in the request cache measure how long this step's answers are: the others are counted that long too
    measured: dict[tuple[str, int | None], list[float]] = {}
    for q in requests:
        if q.measured and q.completion_tokens is not None:
            measured.setdefault((q.param, q.max_tokens), []).append(q.completion_tokens)
    for q in requests:
        seen = measured.get((q.param, q.max_tokens))
        if seen and not q.measured:
            q.completion_tokens, q.measured = sum(seen) / len(seen), True
    return DryRun(requests, rows)


# ---- the estimate ---------------------------------------------------------------------------------


@dataclass
class StepEstimate:
    name: str
    step: str
    status: str  # "estimated" | "cached" | "no model" | "not estimated: <why>"
    rows_in: int = 0
    rows_out: int = 0
    requests: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    cost_usd: float = 0.0
    #: USD per 1M tokens of the backend(s), and max_cost_usd where set
    prices: dict[str, Any] = field(default_factory=dict)


@dataclass
class Estimate:
    """Per-step and total expected requests, tokens and cost of a pipeline run; `str()` is the table."""

    steps: list[StepEstimate]
    tokenizer: str
    fill: float
    sample: int
    #: budgets (max_cost_usd) the estimated run would reach, naming the step where it would stop
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> StepEstimate:
        t = StepEstimate("total", "", "")
        for s in self.steps:
            t.requests += s.requests
            t.prompt_tokens += s.prompt_tokens
            t.completion_tokens += s.completion_tokens
            t.cost_usd += s.cost_usd
        return t

    def step(self, name: str) -> StepEstimate:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no step named {name!r}; steps: {[s.name for s in self.steps]}")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"steps": [asdict(s) for s in self.steps], "total": asdict(self.total), "tokenizer": self.tokenizer,
                "fill": self.fill, "sample": self.sample, "warnings": list(self.warnings)}  # fmt: skip

    def table(self) -> str:
        head = ("step", "rows in", "rows out", "requests", "prompt tok", "compl. tok", "cost USD", "status")
        lines = [head]
        for s in [*self.steps, self.total]:
            priced = any(x.prices.get("priced") for x in self.steps) if s.name == "total" else s.prices.get("priced")
            cost = f"{s.cost_usd:.4f}" if priced else "-"
            rows = ("", "") if s.name == "total" else (str(s.rows_in), str(s.rows_out))
            lines.append((s.name, *rows, f"{s.requests:,.0f}", f"{s.prompt_tokens:,.0f}",
                          f"{s.completion_tokens:,.0f}", cost, s.status))  # fmt: skip
        widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
               for r in lines]  # fmt: skip
        out.insert(1, "  ".join("-" * w for w in widths))
        out.append(f"(tokens: {self.tokenizer}; completions at {self.fill:.0%} of max_tokens; prompts rendered on "
                   f"{self.sample} sample rows; filters assumed to keep every row)")  # fmt: skip
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _prices(step: Any, param: str) -> tuple[Mapping[str, float] | None, float | None, Any]:
    """The prices, the max_cost_usd and the budget key of the backend a step's model parameter builds."""
    from thresher.llms.config import make_backend

    try:
        real = make_backend(step._spec(param))
    except Exception:
        return None, None, None
    key = real.budget_key() if callable(getattr(real, "budget_key", None)) else None
    # a Batch API backend charges its batch prices (thresher.llms.batch.OpenAIBatch.request_prices)
    request_prices = getattr(real, "request_prices", None)
    prices = request_prices() if callable(request_prices) else getattr(real, "prices", None)
    return prices, getattr(real, "max_cost_usd", None), key


def _local_only(step: Any) -> bool:
    """Whether every model a step calls runs in-process (nothing is paid for)."""
    from thresher.llms.config import make_backend

    try:
        return all(getattr(make_backend(step._spec(p)), "kind", None) != "openai"
                   for p, need in step.model_params.items() if need == "chat")  # fmt: skip
    except Exception:
        return False


def _step_dir(run_dir: Path | None, name: str, fp: str) -> Path | None:
    return None if run_dir is None else run_dir / "steps" / f"{name}-{fp[:16]}"


def committed_end(step_dir: Path) -> int:
    """Where a stopped step resumes: its output shards tile [0, n), n input rows of a row step or n batches of a
    generator (the runner's rule: anything after a gap is a torn commit)."""
    from thresher.pipelines.runner import list_shards

    end = 0
    for shard in list_shards(step_dir / "output"):
        _, a, b = shard.stem.split("-")
        if int(a) != end:
            break
        end = int(b)
    return end


def _ranges(step_dir: Path) -> list[tuple[int, int]]:
    from thresher.pipelines.runner import _shard_range, list_shards

    return [_shard_range(p) for p in list_shards(step_dir / "output")]


def estimate(
    pipeline: Pipeline,
    *,
    run_dir: str | Path | None = None,
    sample: int = 8,
    tokenizer: str | Callable[[str], int] = "auto",
    fill: float = DEFAULT_FILL,
) -> Estimate:
    """Expected requests, tokens and cost of running `pipeline` (in `run_dir`: its finished steps cost nothing)."""
    from thresher.pipelines.model_step import ModelStep
    from thresher.pipelines.runner import check_pipeline, fingerprints, local_run_dir, read_folder

    if sample < 1:
        raise ConfigError(f"estimate: sample must be >= 1, got {sample}")
    if not 0 < fill <= 1:
        raise ConfigError(f"estimate: fill must be in (0, 1], got {fill}")
    check_pipeline(pipeline)
    counter = token_counter(tokenizer)
    fps = fingerprints(pipeline)
    rdir = local_run_dir(run_dir) if run_dir is not None else None  # an object store's run: its local copy
    samples: dict[str, list[dict[str, Any]]] = {}
    rows: dict[str, int] = {}
    steps: list[StepEstimate] = []
    budgets: dict[Any, list[float]] = {}
    warnings: list[str] = []
    for node in pipeline.nodes.values():
        step: Step = node.step
        est = StepEstimate(node.name, type(step).__name__, "no model")
        parent_rows = [samples[p] for p in node.parents]
        est.rows_in = sum(rows[p] for p in node.parents)
        sample_in = [r for group in parent_rows for r in group][:sample]
        step_dir = _step_dir(rdir, node.name, fps[node.name])
        done = step_dir if step_dir is not None and (step_dir / "_done.json").is_file() else None
        if done is not None:
            doc = json.loads((done / "_done.json").read_text(encoding="utf-8"))
            est.status, est.rows_out = "cached", int(doc.get("rows_out") or 0)
            samples[node.name] = read_folder(done / "output").slice(0, sample).to_pylist()
        elif isinstance(step, ModelStep):
            # a run stopped part way (a crash, a budget): what it committed is paid for and is not sent again
            left = est.rows_in
            if step_dir is not None and step_dir.is_dir():
                step.workdir_ = step_dir  # as the runner sets it: a generator reads its committed state there
                if step.kind == "row":
                    # every committed range counts, gaps or not (the Ray runner commits batches out of order)
                    left = max(0, est.rows_in - sum(b - a for a, b in _ranges(step_dir)))
            try:
                planned, out_rows, rows_out = step.estimate_plan(sample_in, left, tokenizer=counter, fill=fill)
                if step.kind != "generator":
                    rows_out = est.rows_in
            except Exception as e:  # a step we cannot rehearse is reported, never guessed
                est.status = f"not estimated: {type(e).__name__}: {str(e)[:60]}"
                if _local_only(step):  # e.g. DEITA's scores from a local model's token distribution
                    est.status = "no paid requests (local model)"
                planned, out_rows, rows_out = [], sample_in, est.rows_in
            else:
                est.status = "estimated" if planned else "no paid requests"
                if left < est.rows_in:
                    est.status += f" (resumes after {est.rows_in - left} committed rows)"
            est.rows_out = rows_out
            samples[node.name] = out_rows[:sample]
            _add_requests(est, step, planned, counter, fill, budgets, warnings)
        elif step.n_inputs == 0:  # a source without a model (Load): read for real
            table = step.apply().output
            est.rows_out = table.num_rows
            samples[node.name] = table.slice(0, sample).to_pylist()
        else:  # a step without a model: run on the sample, rows pass through (filters: an upper bound)
            est.rows_out = est.rows_in
            try:
                import pyarrow as pa

                res = step.apply(*[pa.Table.from_pylist(g) if g else pa.table({}) for g in parent_rows])
                got = res.output.to_pylist() + res.rejected.to_pylist()
                samples[node.name] = [{k: v for k, v in r.items() if k not in ("rejected_by", "reason")} for r in got]
            except Exception:
                samples[node.name] = sample_in
        rows[node.name] = est.rows_out
        steps.append(est)
    return Estimate(steps, counter.name, fill, sample, warnings)


def _add_requests(est: StepEstimate, step: Any, planned: list[PlannedRequest], counter: TokenCounter, fill: float,
                  budgets: dict[Any, list[float]], warnings: list[str]) -> None:  # fmt: skip
    prices: dict[str, tuple[Mapping[str, float] | None, float | None, Any]] = {}
    for q in planned:
        if q.param not in prices:
            prices[q.param] = _prices(step, q.param)
        price, cap, key = prices[q.param]
        prompt = counter.messages(q.messages) * q.count
        per_sample = q.completion_tokens
        if per_sample is None:
            per_sample = fill * (q.max_tokens if q.max_tokens is not None else DEFAULT_MAX_TOKENS)
        completion = per_sample * q.n * q.count
        est.requests += q.count
        est.prompt_tokens += prompt
        est.completion_tokens += completion
        if price:
            cost = (prompt * float(price.get("prompt", 0.0)) + completion * float(price.get("completion", 0.0))) / 1e6
            est.cost_usd += cost
            est.prices["priced"] = True
            est.prices[q.param] = dict(price)
            if cap is not None and key is not None:  # max_cost_usd counts a server+model over the whole run
                spent = budgets.setdefault(key, [0.0, 0.0])
                spent[0] += cost
                if spent[0] > float(cap) and not spent[1]:
                    spent[1] = 1.0
                    warnings.append(f"max_cost_usd={cap} of {key[1]!r} at {key[0]} is reached in step {est.name!r}: "
                                    "the run would stop there (re-run with a larger budget to go on)")  # fmt: skip
        if cap is not None:
            est.prices[f"{q.param}.max_cost_usd"] = cap
