"""`SelfInstruct`: grow instruction data from a handful of seed tasks with a chat model (Self-Instruct, Alpaca mode).

How a run goes, batch by batch (`requests_per_batch` requests a batch), as the paper bootstraps:

1. Ask. Each request shows tasks from the pool as a numbered list, 8 of them: 2 machine tasks once the pool has
   some, seed tasks for the rest, shuffled, and asks the model to continue the list up to item 15 (it stops before
   "16.", or before "8." when a chat model numbers its new tasks from 1). Which tasks request r shows depends only on the step's `seed`, r, and the pool when its batch starts, so a
   re-run or a resumed run sends the same prompts and finds the answers in the request cache.
2. Filter. Every item of every reply goes through the post-filters of `task_filters` (a reply cut off by the length
   limit loses all its items; then length, blacklist, "Write a program", first character), then, in request and
   item order, through the similarity filter: ROUGE-L F1 (`thresher.filters.rouge.RougePool`: rouge_score's tokens,
   CJK characters as tokens for Chinese) against the whole pool (seeds, machine tasks, and the tasks this batch
   accepted before it), rejected above `similarity_threshold`; an accepted task joins the pool at once.
3. Instances. Is it a classification task (a few-shot yes/no question)? Classification tasks get output-first
   instances (the class label, then an input of that class), the others input-first (an input, then its output);
   the instance filters keep at most `max_instances` per task (see `task_filters`).
4. Commit. The batch is yielded with its state (the request counter and the counts per filter).

Alpaca mode (`mode="alpaca"`) asks for 20 tasks a request, each with instruction, input and output, shows 3 seed
tasks (with their first instance) and no machine tasks, drops only the last item of a cut-off reply, uses Alpaca's
longer blacklist, and takes each task's one instance from the same reply (no classification, no instance stage).

Rows. One output row per instance (the alpaca layout: `instruction`, `input`, `output`), with `id` (content hash),
`source` ("self_instruct" or "alpaca"), `task_id` (hash of the instruction; shared by a task's instances),
`parent_id` (null: a new task has no single parent; the tasks it was made from are in `demonstrations`),
`demonstrations` (ids of the tasks the request showed), `request` and `item` (which request, which item of its
reply), `is_classification`, and `rouge_l_max` / `rouge_l_nearest` (the task's most similar pool instruction when it
was accepted). Rejected rows carry the same columns plus `filter` (the rule's name) and `reason`; a similarity
rejection says the nearest pool instruction and the score. A request that failed after the backend's retries is a
`failed` row with its `stage` (generate, classify, instances) and `error`.

Pool and resume. The pool is the seeds plus the tasks of the committed output, which is what a resumed run rebuilds
from `checkpoint.output()`. A task that passed the similarity filter but ends its batch without a row (every instance
dropped, or a request failed) leaves the pool when its batch is committed; inside its batch it counted like any
accepted task. (The reference code keeps such a task in its pool for good; a resumed run could not rebuild that pool
from the committed output, so here it leaves, the same way in an unbroken and a resumed run.)

Accounting (candidates = output + rejected + failed) counts rows: an instruction the model proposed is one candidate,
a failed generation request or an unreadable reply is one, and a task that reached the instance stage counts once
per instance it was given (each kept instance an output row, each dropped one a rejected row), or once when it got
none. The step's state and metrics keep the instruction-level counts per filter (`counts_`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from thresher.data.record import record_id
from thresher.errors import ConfigError
from thresher.generators.task_filters import (
    NO_INPUT,
    AlpacaItem,
    TaskRules,
    clean,
    filter_instances,
    parse_alpaca_reply,
    parse_input_first,
    parse_numbered_list,
    parse_output_first,
    task_rules,
)
from thresher.pipelines.fingerprint import file_digest
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import LANGUAGES, Prompt, check_overrides, load_prompt, prompts_digest
from thresher.pipelines.step import Checkpoint, GeneratedBatch, Generator

log = logging.getLogger("thresher.generators")


@dataclass(frozen=True)
class _Mode:
    method: str  # the prompts folder
    prompts: tuple[str, ...]
    shown: int  # tasks a request shows
    machine_shown: int  # of which at most this many from the machine pool
    stop_at: int  # self_instruct: the item number the model stops before; alpaca: how many tasks to ask for
    temperature: float
    top_p: float
    max_tokens: int


MODES: dict[str, _Mode] = {
    # the reference code's sampling: temperature 0.7, top_p 0.5, 1024 tokens; Alpaca's: 1.0, 1.0, 3072
    "self_instruct": _Mode("self_instruct", ("continue_list", "is_classification", "instances_input_first",
                                             "instances_output_first"), 8, 2, 16, 0.7, 0.5, 1024),
    "alpaca": _Mode("alpaca", ("generate_tasks",), 3, 0, 20, 1.0, 1.0, 3072),
}  # fmt: skip

_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("id", pa.string()),
    ("instruction", pa.string()),
    ("input", pa.string()),
    ("output", pa.string()),
    ("source", pa.string()),
    ("task_id", pa.string()),
    ("parent_id", pa.string()),
    ("demonstrations", pa.list_(pa.string())),
    ("request", pa.int64()),
    ("item", pa.int64()),
    ("is_classification", pa.bool_()),
    ("rouge_l_max", pa.float64()),
    ("rouge_l_nearest", pa.string()),
)
OUTPUT_SCHEMA = pa.schema(list(_COLUMNS))
#: `reply`: the raw reply, kept only for a reply no task could be read from
REJECTED_SCHEMA = pa.schema([*_COLUMNS, ("filter", pa.string()), ("reason", pa.string()), ("reply", pa.string())])
FAILED_SCHEMA = pa.schema([*_COLUMNS, ("stage", pa.string()), ("error", pa.string())])

_YES = {"en": ("yes",), "zh": ("是", "yes")}
_LABELS = {
    "en": ("Instruction:", "Input:", "Output:", "<noinput>"),
    "zh": ("指令：", "输入：", "输出：", "<无输入>"),
}


@dataclass(frozen=True)
class SeedTask:
    """A human-written task: its id, instruction, instances ((input, output) pairs) and classification flag."""

    id: str
    instruction: str
    instances: tuple[tuple[str, str], ...] = ()
    is_classification: bool | None = None


@dataclass
class _Candidate:
    """One task the model proposed, on its way through the filters."""

    request: int
    item: int
    demonstrations: list[str]
    instruction: str
    input: str = ""
    output: str = ""
    rouge: float | None = None
    nearest: str | None = None
    is_classification: bool | None = None

    @property
    def task_id(self) -> str:
        return record_id(self.instruction)


@dataclass
class _Batch:
    output: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    candidates: int = 0


class SelfInstruct(ModelStep, Generator):
    """Grow instruction data from seed tasks with a chat model: the Self-Instruct method (or Alpaca's variant).

    backend: a spec dict (`{kind: openai, base_url: ..., model: ...}`), a backend object, or None for the embedded
    llama.cpp model. num_instructions: stop once this many new tasks have rows (the last batch is kept whole, as in
    the reference code, so a few more may come). mode: "self_instruct" or "alpaca". language: "en" or "zh" (prompt
    templates, post-filters, and ROUGE tokens: rouge_score's for English, characters for Chinese).
    seed_tasks: None (the shipped seeds of `language`), a file in the seed_tasks.jsonl layout
    (`{id, name, instruction, instances: [{input, output}], is_classification}`) or any layout thresher's readers
    take (rows with the same instruction are one task), or a list of instructions or task dicts.
    seed: decides which tasks each request shows and which instances are kept. max_requests: a guard for a model
    that never gives acceptable tasks (None: 10 per instruction asked for, at least 20).
    requests_per_batch: requests sent together, filtered and committed as one batch (it decides when new tasks
    can be shown, so it is a parameter of the method, not a runtime knob). similarity_threshold: ROUGE-L F1 above
    which a task is too similar to the pool (0.7). max_instances: instances kept per task (5).
    max_tokens, temperature, top_p: sampling of the task requests (None: the mode's reference values, 1024 / 0.7 /
    0.5 for self_instruct, 3072 / 1.0 / 1.0 for alpaca). stop: their stop sequences (None: before item 16 in
    self_instruct mode, or before item 8 for a model that numbers its new tasks from 1; none in alpaca mode. The
    reference code also stopped at a blank line, "\n\n", which ends a completion model's list but cuts short a chat
    model that opens with a preamble or puts blank lines between items).
    instance_max_tokens: the budget of an instance reply.
    prompts: {template name: file} overrides of the shipped templates; each must keep the shipped one's placeholders
    and its markers (numbered items; "Example N", "Input:", "Output:", "Class label:"; "###" blocks in alpaca mode).
    """

    n_inputs = 0
    outputs = tuple(name for name, _ in _COLUMNS)
    VERSION = "1"
    batch_api = False  # each request shows tasks the pool accepted from the answers before it

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        num_instructions: int = 100,
        mode: str = "self_instruct",
        language: str = "en",
        seed_tasks: str | os.PathLike[str] | Sequence[str | Mapping[str, Any]] | None = None,
        seed: int = 0,
        max_requests: int | None = None,
        requests_per_batch: int = 5,
        similarity_threshold: float = 0.7,
        max_instances: int = 5,
        max_tokens: int | None = None,
        instance_max_tokens: int = 350,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        api_key: str | None = secret(),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.num_instructions = num_instructions
        self.mode = mode
        self.language = language
        self.seed_tasks = seed_tasks
        self.seed = seed
        self.max_requests = max_requests
        self.requests_per_batch = requests_per_batch
        self.similarity_threshold = similarity_threshold
        self.max_instances = max_instances
        self.max_tokens = max_tokens
        self.instance_max_tokens = instance_max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stop = stop
        self.prompts = prompts
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    # ---- checking and identity ------------------------------------------------------------------

    def _mode(self) -> _Mode:
        if self.mode not in MODES:
            raise ConfigError(f"SelfInstruct: mode {self.mode!r} is not one of {list(MODES)}")
        return MODES[self.mode]

    def check(self) -> None:
        mode = self._mode()
        if self.language not in LANGUAGES:
            raise ConfigError(f"SelfInstruct: language {self.language!r} is not one of {list(LANGUAGES)}")
        for name in ("num_instructions", "requests_per_batch", "max_instances", "instance_max_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and name != "seed"):
                raise ConfigError(f"SelfInstruct: {name} must be {'an' if name == 'seed' else 'a positive'} "
                                  f"integer, got {value!r}")  # fmt: skip
        for name in ("max_requests", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"SelfInstruct: {name} must be a positive integer or None, got {value!r}")
        if self.stop is not None and (isinstance(self.stop, str) or not all(isinstance(x, str) for x in self.stop)):
            raise ConfigError(f"SelfInstruct: stop must be a list of strings or None, got {self.stop!r}")
        if not 0.0 <= self.similarity_threshold <= 1.0:
            raise ConfigError(f"SelfInstruct: similarity_threshold must be in [0, 1], got {self.similarity_threshold}")
        check_overrides(mode.method, self.prompts, mode.prompts)
        for name, prompt in self._prompts().items():  # a template with a hole or a stray placeholder fails here
            prompt.render(**_dummy_values(name))
        self._seeds()
        super().check()

    def semantic_params(self) -> dict[str, Any]:
        # files count by their content (fingerprint_extra), not by where they lie
        params = super().semantic_params()
        params.pop("prompts", None)
        if self.seed_tasks is None or isinstance(self.seed_tasks, (str, os.PathLike)):
            params.pop("seed_tasks", None)
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        mode = self._mode()
        extra: dict[str, Any] = {"prompts": prompts_digest("generators", mode.method, mode.prompts, self.language,
                                                           self.prompts)}  # fmt: skip
        path = self._seed_path()
        if path is not None:
            if not path.exists():
                raise ConfigError(f"SelfInstruct: seed_tasks {os.fspath(path)!r} does not exist")
            extra["seed_tasks"] = file_digest(path)
        return extra

    def metrics(self) -> dict[str, Any]:
        out = dict(super().metrics())
        counts = getattr(self, "counts_", None)
        if counts is not None:
            out["counts"] = dict(counts)
        return out

    # ---- inputs -----------------------------------------------------------------------------------

    def _seed_path(self) -> Path | None:
        if self.seed_tasks is None:
            return Path(__file__).parent / "seeds" / f"self_instruct.{self.language}.jsonl"
        if isinstance(self.seed_tasks, (str, os.PathLike)):
            return Path(self.seed_tasks).expanduser()
        return None

    def _seeds(self) -> list[SeedTask]:
        """The seed tasks, checked: from the file (any layout the readers take) or the inline list."""
        path = self._seed_path()
        if path is not None:
            if not path.exists():
                raise ConfigError(f"SelfInstruct: seed_tasks {os.fspath(path)!r} does not exist")
            seeds = _seeds_from_file(path)
        else:
            if isinstance(self.seed_tasks, Mapping) or not isinstance(self.seed_tasks, Sequence):
                raise ConfigError("SelfInstruct: seed_tasks must be None, a file path, or a list of instructions or "
                                  f"task dicts; got {type(self.seed_tasks).__name__}")  # fmt: skip
            seeds = _seeds_from_list(self.seed_tasks)
        where = os.fspath(path) if path is not None else "the seed_tasks list"
        if not seeds:
            raise ConfigError(f"SelfInstruct: {where} holds no seed task")
        if self.mode == "alpaca":
            bare = [s.id for s in seeds if not s.instances]
            if bare:
                raise ConfigError(f"SelfInstruct: alpaca mode shows each seed task with an instance, but {where} has "
                                  f"tasks without one: ids {bare[:5]}")  # fmt: skip
        return seeds

    def _prompts(self) -> dict[str, Prompt]:
        mode = self._mode()
        return {n: load_prompt("generators", mode.method, n, self.language, self.prompts) for n in mode.prompts}

    def _request_limit(self) -> int:
        return self.max_requests if self.max_requests is not None else max(20, 10 * self.num_instructions)

    # ---- the loop ---------------------------------------------------------------------------------

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint) -> Iterator[GeneratedBatch]:
        from thresher.filters.rouge import RougePool

        seeds = self._seeds()
        prompts = self._prompts()
        rules = task_rules(self.language, self.mode)
        state = checkpoint.state or {}
        requests = int(state.get("requests", 0))
        self.counts_: Counter[str] = Counter(state.get("counts") or {})
        pool = RougePool(tokenizer=self._tokenizer())
        for s in seeds:
            pool.add(s.instruction)
        machine = _committed_tasks(checkpoint)
        for _, text in machine:
            pool.add(text)
        limit = self._request_limit()
        while len(machine) < self.num_instructions and requests < limit:
            numbers = list(range(requests, min(requests + self.requests_per_batch, limit)))
            batch = _Batch()
            proposed = self._ask(numbers, seeds, machine, prompts, rules, batch)
            accepted = self._similar(proposed, pool, batch)
            if self.mode == "alpaca":
                for c in accepted:
                    batch.output.append(self._row(c))
            else:
                self._instances(accepted, prompts, batch)
            new = list(dict.fromkeys((r["task_id"], r["instruction"]) for r in batch.output))
            for task in new:
                pool.add(task[1])
                machine.append(task)
            self.counts_["accepted"] += len(new)
            self.counts_["rows"] += len(batch.output)
            requests = numbers[-1] + 1
            yield GeneratedBatch(
                output=pa.Table.from_pylist(batch.output, schema=OUTPUT_SCHEMA),
                rejected=pa.Table.from_pylist(batch.rejected, schema=REJECTED_SCHEMA),
                failed=pa.Table.from_pylist(batch.failed, schema=FAILED_SCHEMA),
                state={"requests": requests, "counts": dict(self.counts_)},
                candidates=batch.candidates,
            )
        if len(machine) < self.num_instructions:
            log.warning("SelfInstruct: stopped at max_requests=%d with %d of %d instructions; counts per filter: %s",
                        limit, len(machine), self.num_instructions, dict(self.counts_))  # fmt: skip

    # ---- the cost estimate -------------------------------------------------------------------------

    #: new tasks accepted per task request (a self_instruct reply holds at most 7 before the stop; an alpaca reply
    #: asks for 20), and rows per task (the Self-Instruct paper: 82,439 instances for 52,445 instructions); the
    #: estimate's assumptions, measured from the committed state instead when a run has one
    ESTIMATE_TASKS_PER_REQUEST: ClassVar[dict[str, float]] = {"self_instruct": 3.5, "alpaca": 10.0}
    ESTIMATE_ROWS_PER_TASK: ClassVar[float] = 1.6

    def estimate_requests(self, sample_rows: Sequence[Mapping[str, Any]], *, tokenizer: Any = "auto",
                          fill: float | None = None) -> list[Any]:  # fmt: skip
        return self.estimate_plan(sample_rows, 0, tokenizer=tokenizer, fill=fill)[0]

    def estimate_plan(
        self, sample_rows: Sequence[Mapping[str, Any]], rows_in: int, *, tokenizer: Any = "auto", fill: float | None = None
    ) -> tuple[list[Any], list[dict[str, Any]], int]:
        """Requests to reach `num_instructions` (the input rows play no part): task requests rendered as the next
        one would be, then, per accepted task, a classification and an instance request. Replies are counted as
        long as what they hold: tasks and instances the size of those already made (after a stop) or of the seeds.
        """
        from statistics import mean

        from thresher.pipelines.estimate import DEFAULT_FILL, PlannedRequest, token_counter

        counter, fill = token_counter(tokenizer), fill or DEFAULT_FILL
        mode, seeds, prompts = self._mode(), self._seeds(), self._prompts()
        per_request, per_task = self.ESTIMATE_TASKS_PER_REQUEST[self.mode], self.ESTIMATE_ROWS_PER_TASK
        done, made = self._committed_counts(), self._committed_rows()
        if done.get("accepted"):  # a run stopped part way: its own acceptance, and only the tasks still missing
            per_request = done["accepted"] / max(1, done.get("requests", 0))
            per_task = done.get("rows", 0) / done["accepted"]
        missing = max(0, self.num_instructions - done.get("accepted", 0))
        asks = math.ceil(missing / per_request) if missing else 0
        asks = min(self._request_limit() - done.get("requests", 0),
                   math.ceil(asks / self.requests_per_batch) * self.requests_per_batch)  # fmt: skip
        asks = max(0, asks)
        tasks = asks * per_request
        machine = list(dict.fromkeys((str(r["task_id"]), str(r["instruction"])) for r in made))
        prompt = self._request_prompt(prompts, self.demonstrations(done.get("requests", 0), seeds, machine))
        examples = [(str(r["instruction"]), str(r.get("input") or ""), str(r.get("output") or "")) for r in made]
        examples = examples or [(t.instruction, *(t.instances or (("", ""),))[0]) for t in seeds]
        if self.mode == "alpaca":  # a reply holds `stop_at` tasks, each with an input and an output
            task_tokens = mean(counter.count(f"###\n{i}\n{a}\n{b}") for i, a, b in examples)
            reply = task_tokens * mode.stop_at
        else:  # a reply holds the items after those shown, up to the stop
            reply = mean(counter.count(f"9. {i}") for i, _, _ in examples) * (mode.stop_at - mode.shown - 1)
        plan = [PlannedRequest([{"role": "user", "content": prompt}], self.max_tokens or mode.max_tokens, count=asks,
                               completion_tokens=reply)]  # fmt: skip
        rows = tasks
        if self.mode != "alpaca":
            task = examples[0][0]
            plan.append(PlannedRequest([{"role": "user", "content": prompts["is_classification"].render(
                instruction=task)}], 5, count=tasks, completion_tokens=1.0))  # fmt: skip
            pairs = [(a, b) for _, a, b in examples if b]
            instances = (per_task * mean(counter.count(f"Example 1\nInput: {a}\nOutput: {b}") for a, b in pairs)
                         if pairs else None)  # fmt: skip
            plan.append(PlannedRequest([{"role": "user", "content": prompts["instances_input_first"].render(
                instruction=task, max_instances=self.max_instances)}], self.instance_max_tokens, count=tasks,
                completion_tokens=instances))  # fmt: skip
            rows = tasks * per_task
        sample = [dict(r) for r in made[:8]]
        for t in seeds[: 8 - len(sample)]:  # seed tasks stand for the tasks it will make, in the next step's sample
            inp, out = (t.instances or (("", ""),))[0]
            sample.append(self._row(None, id=record_id(t.instruction, inp, out), instruction=t.instruction,
                                    input=inp, output=out, task_id=t.id))  # fmt: skip
        return plan, sample, round(rows + done.get("rows", 0))

    def _committed_rows(self) -> list[dict[str, Any]]:
        from thresher.pipelines.runner import read_folder

        if self.workdir_ is None or not (self.workdir_ / "output").is_dir():
            return []
        rows: list[dict[str, Any]] = read_folder(self.workdir_ / "output").to_pylist()
        return rows

    def _committed_counts(self) -> dict[str, int]:
        """The counters of the last committed batch in the step's run folder (empty on a fresh start)."""
        import json

        from thresher.pipelines.estimate import committed_end

        if self.workdir_ is None or not (batches := committed_end(self.workdir_)):
            return {}
        path = self.workdir_ / "state" / f"part-{batches - 1:012d}.json"
        if not path.is_file():
            return {}
        state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")).get("state") or {}
        counts: dict[str, Any] = dict(state.get("counts") or {})
        counts["requests"] = state.get("requests", counts.get("requests", 0))
        return {k: int(v) for k, v in counts.items() if isinstance(v, (int, float))}

    def _tokenizer(self) -> str:
        # rouge_score's tokenizer keeps only [a-z0-9]: Chinese text would score 0 against everything
        return "cjk" if self.language == "zh" else "rouge_score"

    # ---- 1. ask for tasks and read the replies ---------------------------------------------------

    def demonstrations(self, request: int, seeds: Sequence[SeedTask], machine: Sequence[tuple[str, str]]) -> list[Any]:
        """What request `request` shows: machine tasks ((id, instruction)) and seed tasks, in the order shown."""
        mode = self._mode()
        rng = self.rng("demonstrations", request)
        picked: list[Any] = rng.sample(list(machine), min(mode.machine_shown, len(machine)))
        picked += rng.sample(list(seeds), min(mode.shown - len(picked), len(seeds)))
        if mode.machine_shown:
            rng.shuffle(picked)
        return picked

    def _ask(
        self,
        numbers: list[int],
        seeds: list[SeedTask],
        machine: list[tuple[str, str]],
        prompts: dict[str, Prompt],
        rules: TaskRules,
        batch: _Batch,
    ) -> list[_Candidate]:
        mode = self._mode()
        shown = [self.demonstrations(r, seeds, machine) for r in numbers]
        convs = [[{"role": "user", "content": self._request_prompt(prompts, d)}] for d in shown]
        params: dict[str, Any] = {
            "max_tokens": self.max_tokens or mode.max_tokens,
            "temperature": mode.temperature if self.temperature is None else self.temperature,
            "top_p": mode.top_p if self.top_p is None else self.top_p,
            "seed": self.sample_seed("tasks"),
        }
        stop = self._stops()
        if stop:
            params["stop"] = stop
        replies = self.model().chat(convs, **params)
        self.counts_["requests"] += len(numbers)
        out: list[_Candidate] = []
        for r, demos, reply in zip(numbers, shown, replies, strict=True):
            ids = [d.id if isinstance(d, SeedTask) else d[0] for d in demos]
            if reply.error is not None:
                self.counts_["requests_failed"] += 1
                batch.candidates += 1
                batch.failed.append(self._row(None, request=r, demonstrations=ids, stage="generate",
                                              error=f"request {r}: {reply.error}", id=record_id(f"request {r}")))  # fmt: skip
                continue
            text = reply.text or ""
            cut = bool(reply.finish_reasons) and reply.finish_reasons[0] == "length"
            items = self._read_reply(text)
            if not items:
                self.counts_["unparsable"] += 1
                batch.candidates += 1
                batch.rejected.append(self._row(
                    None, request=r, demonstrations=ids, id=record_id(f"request {r}"), filter="unparsable",
                    reason=f"request {r}: no task could be read from the reply", reply=text[:4000]))  # fmt: skip
                continue
            for k, item in enumerate(items):
                batch.candidates += 1
                self.counts_["items"] += 1
                if isinstance(item, AlpacaItem):
                    c = _Candidate(r, k, ids, item.instruction or "", item.input, item.output)
                    if item.problem is not None:
                        self._reject(batch, c, "unparsable", f"item {k} of request {r} cannot be read: {item.problem}")
                        continue
                    last_cut = cut and k == len(items) - 1
                else:
                    c = _Candidate(r, k, ids, item)
                    last_cut = cut  # Self-Instruct drops every task of a cut-off reply
                if last_cut:
                    self._reject(batch, c, "cut_off", "the reply was cut off by the length limit"
                                 + (" here" if self.mode == "alpaca" else "; all its tasks are dropped"))  # fmt: skip
                    continue
                verdict = rules.check(c.instruction)
                if verdict is not None:
                    self._reject(batch, c, *verdict)
                    continue
                out.append(c)
        return out

    def _stops(self) -> list[str]:
        if self.stop is not None:
            return list(self.stop)
        if self.mode == "alpaca":
            return []
        # before item 16; a chat model that numbers its new tasks from 1 instead of 9 stops before its item 8, so
        # either way a reply holds at most 7 new tasks (4 sequences: the most the OpenAI API takes)
        n, m = self._mode().stop_at, self._mode().stop_at - self._mode().shown
        if self.language == "zh":
            return [f"\n{n}.", f"\n{n}、", f"\n{m}.", f"\n{m}、"]
        return [f"\n{n}.", f"\n{n} .", f"\n{m}.", f"\n{m} ."]

    def _read_reply(self, text: str) -> list[Any]:
        return list(parse_alpaca_reply(text)) if self.mode == "alpaca" else parse_numbered_list(text)

    def _request_prompt(self, prompts: dict[str, Prompt], shown: list[Any]) -> str:
        mode = self._mode()
        if self.mode == "alpaca":
            ins, inp, out, none = _LABELS[self.language]
            blocks = []
            for s in shown:
                a, b = s.instances[0]
                blocks.append(f"###\n{ins} {clean(s.instruction).rstrip(':')}\n{inp} {a.strip() or none}\n{out} {b.strip()}")
            return prompts["generate_tasks"].render(tasks="\n".join(blocks), count=mode.stop_at)
        lines = [f"{k}. {clean(d.instruction if isinstance(d, SeedTask) else d[1]).rstrip(':')}"
                 for k, d in enumerate(shown, 1)]  # fmt: skip
        return prompts["continue_list"].render(tasks="\n".join(lines), first=len(shown) + 1, last=mode.stop_at - 1)

    # ---- 2. the similarity filter -----------------------------------------------------------------

    def _similar(self, proposed: list[_Candidate], pool: Any, batch: _Batch) -> list[_Candidate]:
        """ROUGE-L F1 of each task against the pool and this batch's accepted tasks, in request and item order."""
        from thresher.filters.rouge import RougePool

        local = RougePool(tokenizer=self._tokenizer())
        accepted = []
        for c in proposed:
            score, near = 0.0, None
            for p in (pool, local):  # the pool first: on a tie, the older text is the nearest
                s, i = p.nearest(c.instruction)
                if s > score:
                    score, near = s, p.texts[i]
            c.rouge, c.nearest = float(score), near
            if score > self.similarity_threshold:
                self._reject(batch, c, "similarity", f"ROUGE-L F1 {score:.4f} > {self.similarity_threshold} with "
                                                     f"pool instruction {near!r}")  # fmt: skip
                continue
            local.add(c.instruction)
            accepted.append(c)
        self.counts_["passed"] += len(accepted)
        return accepted

    # ---- 3. classification and instances ----------------------------------------------------------

    def _instances(self, accepted: list[_Candidate], prompts: dict[str, Prompt], batch: _Batch) -> None:
        if not accepted:
            return
        backend = self.model()
        convs = [[{"role": "user", "content": prompts["is_classification"].render(instruction=c.instruction)}]
                 for c in accepted]  # fmt: skip
        answers = backend.chat(convs, max_tokens=5, temperature=0.0)
        ready = []
        for c, a in zip(accepted, answers, strict=True):
            if a.error is not None:
                self._fail(batch, c, "classify", a.error)
                continue
            c.is_classification = _is_yes(a.text or "", self.language)
            self.counts_["classification"] += c.is_classification
            ready.append(c)
        if not ready:
            return
        name = {True: "instances_output_first", False: "instances_input_first"}
        # sent grouped by template, so a server that reuses a shared prompt prefix (llama.cpp) reads it once a group
        order = sorted(range(len(ready)), key=lambda k: not ready[k].is_classification)
        convs = [[{"role": "user", "content": prompts[name[bool(ready[k].is_classification)]].render(
            instruction=ready[k].instruction, max_instances=self.max_instances)}] for k in order]  # fmt: skip
        sent = backend.chat(convs, max_tokens=self.instance_max_tokens, temperature=0.0, stop=self._instance_stops())
        answers = [sent[order.index(k)] for k in range(len(ready))]
        for c, a in zip(ready, answers, strict=True):
            if a.error is not None:
                self._fail(batch, c, "instances", a.error)
                continue
            text = a.text or ""
            parsed = parse_output_first(text) if c.is_classification else parse_input_first(text)
            if not parsed:
                self.counts_["tasks_dropped"] += 1
                self._reject(batch, c, "no_instances", "no instance could be read from the instance reply",
                             reply=text[:4000])
                continue
            batch.candidates += len(parsed) - 1  # the task's one candidate becomes one per instance
            cut = bool(a.finish_reasons) and a.finish_reasons[0] == "length"
            verdict = filter_instances(parsed, cut_off=cut, max_instances=self.max_instances,
                                       rng=self.rng("instances", c.task_id))  # fmt: skip
            for inp, out in verdict.kept:
                batch.output.append(self._row(c, input=inp, output=out))
            for inp, out, rule, reason in verdict.dropped:
                self.counts_[rule] += 1
                batch.rejected.append(self._row(c, input=inp, output=out, filter=rule, reason=reason))
            if not verdict.kept:
                self.counts_["tasks_dropped"] += 1

    def _instance_stops(self) -> list[str]:
        n = self.max_instances + 1
        if self.language == "zh":
            return [f"示例 {n}", f"示例{n}", "\n任务："]
        return [f"Example {n}", "\nTask:"]

    # ---- rows -------------------------------------------------------------------------------------

    def _row(self, c: _Candidate | None, **values: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"source": "alpaca" if self.mode == "alpaca" else "self_instruct", "parent_id": None}
        if c is not None:
            inp, out = values.get("input", c.input), values.get("output", c.output)
            row.update(
                id=record_id(c.instruction, inp, out), instruction=c.instruction, input=inp, output=out,
                task_id=c.task_id, demonstrations=c.demonstrations, request=c.request, item=c.item,
                is_classification=c.is_classification, rouge_l_max=c.rouge, rouge_l_nearest=c.nearest,
            )  # fmt: skip
        row.update(values)
        return row

    def _reject(self, batch: _Batch, c: _Candidate, rule: str, reason: str, *, reply: str | None = None) -> None:
        self.counts_[rule] += 1
        out = c.output if self.mode == "alpaca" else None
        batch.rejected.append(self._row(c, output=out, filter=rule, reason=reason, reply=reply))

    def _fail(self, batch: _Batch, c: _Candidate, stage: str, error: str) -> None:
        self.counts_["tasks_failed"] += 1
        batch.failed.append(self._row(c, output=None, stage=stage, error=f"{stage} request for task {c.task_id}: {error}"))


# ---- helpers ------------------------------------------------------------------------------------------------


def _dummy_values(name: str) -> dict[str, Any]:
    values: dict[str, dict[str, Any]] = {
        "continue_list": {"tasks": "1. x", "first": 2, "last": 15},
        "is_classification": {"instruction": "x"},
        "instances_input_first": {"instruction": "x", "max_instances": 5},
        "instances_output_first": {"instruction": "x", "max_instances": 5},
        "generate_tasks": {"tasks": "###", "count": 20},
    }
    return values[name]


def _is_yes(text: str, language: str) -> bool:
    """The reference code's reading of a yes/no answer: yes when the reply opens with yes (是 for Chinese)."""
    head = text.strip().lstrip("*\"'“‘「 ").lower()
    return head.startswith(_YES.get(language, _YES["en"]))


def _committed_tasks(checkpoint: Checkpoint) -> list[tuple[str, str]]:
    """The machine tasks (task_id, instruction) of the committed output, in the order they were committed."""
    if not checkpoint.rows:
        return []
    out = checkpoint.output()
    ids = out.column("task_id").to_pylist()
    texts = out.column("instruction").to_pylist()
    return list(dict.fromkeys(zip(ids, texts, strict=True)))


def _pairs(instances: Any, where: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for j, inst in enumerate(instances or ()):
        if not isinstance(inst, Mapping):
            raise ConfigError(f"SelfInstruct: {where}: instances[{j}] must be an {{input, output}} object, got {inst!r}")
        inp = inst.get("input") or ""
        out = inst.get("output")
        if out is None:
            raise ConfigError(f"SelfInstruct: {where}: instances[{j}] has no output")
        pairs.append(("" if str(inp).strip().lower() in NO_INPUT else str(inp), str(out)))
    return tuple(pairs)


def _seeds_from_list(items: Sequence[str | Mapping[str, Any]]) -> list[SeedTask]:
    tasks: dict[str, SeedTask] = {}
    for k, item in enumerate(items):
        where = f"seed_tasks[{k}]"
        if isinstance(item, str):
            item = {"instruction": item}
        if not isinstance(item, Mapping) or not str(item.get("instruction") or "").strip():
            raise ConfigError(f"SelfInstruct: {where} must be an instruction or a dict with one, got {item!r}")
        instruction = str(item["instruction"]).strip()
        instances = _pairs(item.get("instances"), where)
        if not instances and item.get("output") is not None:
            instances = _pairs([{"input": item.get("input"), "output": item["output"]}], where)
        _merge(tasks, SeedTask(str(item.get("id") or record_id(instruction)), instruction, instances,
                               _flag(item.get("is_classification"))))  # fmt: skip
    return list(tasks.values())


def _seeds_from_file(path: Path) -> list[SeedTask]:
    from thresher.data.readers import read_records

    table = read_records(path)
    cols = set(table.column_names)
    tasks: dict[str, SeedTask] = {}
    for row in table.to_pylist():
        instances: list[dict[str, Any]] = []
        if row.get("output") is not None:
            instances.append({"input": row.get("input"), "output": row["output"]})
        instances += list(row.get("extra_instances") or []) if "extra_instances" in cols else []
        where = f"{path}, task id={row['id']!r}"
        _merge(tasks, SeedTask(str(row["id"]), str(row["instruction"]).strip(), _pairs(instances, where),
                               _flag(row.get("is_classification"))))  # fmt: skip
    return list(tasks.values())


def _merge(tasks: dict[str, SeedTask], task: SeedTask) -> None:
    """Rows with the same instruction are one task (an alpaca file lists a task's instances as rows)."""
    old = tasks.get(task.instruction)
    if old is None:
        tasks[task.instruction] = task
    else:
        tasks[task.instruction] = SeedTask(old.id, old.instruction, old.instances + task.instances,
                                           old.is_classification if old.is_classification is not None
                                           else task.is_classification)  # fmt: skip


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "yes", "1")
