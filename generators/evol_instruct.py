"""`EvolInstruct`: grow harder and rarer instructions from input rows, WizardLM's Evol-Instruct.

Each round, every row of the pool gets one operation, drawn at random per (row, round) from the step's seed: five
in-depth ones that make the instruction harder (`add_constraints`, `deepen`, `concretize`, `increase_reasoning`,
`complicate_input`: add a table, JSON, code, ... the task must work on) and one in-breadth one (`in_breadth`: a new,
rarer task of the same domain). The model rewrites the instruction (the row's instruction and input joined as
LLaMA-Factory joins them, so the evolved instruction holds both and its `input` is ""), the responder answers it,
and the elimination rules decide:

- `no_information_gain`: the model, asked with our equality prompt, judges the evolution equal to its parent (text
  identical to the parent is equal without asking);
- `refusal`: the answer contains "sorry" (in Chinese also 抱歉 / 对不起) and is shorter than 80 words (Chinese: 120
  characters: our conversion, 1.5 characters a word; `refusal_max_length` changes it);
- `only_stop_words`: the answer is empty or only punctuation and stop words (our lists, English and Chinese);
- `copies_prompt`: the evolved instruction contains a marker of our evolution templates or its words: every `#...#`
  marker in the templates in use (shipped or the user's), with and without the #s, e.g. "#Rewritten Prompt#" and
  "rewritten prompt" (see `prompt_markers`).
Two rules are ours, for what a model of any size can send: `empty` (no instruction came back) and `truncated` (the
instruction was cut off at `max_tokens`). The checks run cheapest first, and a row is not sent on once one fails:
the instruction's rules (`RULES` order: empty, copies_prompt, truncated, then identical to its parent), the
equality question, then the answer and its rules.

A passing evolution becomes the row's new version: a new row with `parent_id` = the version it evolved from (an
input id or an earlier round's row), `evol_round`, `evol_operation`, the generated answer as `output`, and id
`<root id>-evol<round>`. A failing one goes to `rejected` with `reason` "<rule>: <why>" and the row keeps its
previous version for the next round; a request that failed for good goes to `failed` and the row likewise stays.
Output = every accepted version of every round: WizardLM's pool is the union across rounds (plus the inputs, which
are not repeated here: `[inputs, evolved] >> Concat()` gives the paper's set; `latest_versions` keeps the last
version of each lineage). Output rows hold the canonical columns (`system` and `history` from the parent) and the
lineage; the parent's other columns (scores, tags) describe the parent and are not copied.

Accounting: candidates = evolutions attempted = output + rejected + failed; an input row with an empty instruction
fails once, in round 1, and leaves the pool. Batches commit per (round, rows [a, b)) with state {round, next}; on
resume the current version of each lineage is rebuilt from the committed output (the latest row per lineage root),
so nothing accepted is asked again, and answered requests of the torn batch come from the request cache.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from thresher.data.messages import history_pairs, row_messages, user_text
from thresher.data.record import RECORD_SCHEMA, record_id
from thresher.errors import ConfigError, StepError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import LANGUAGES, Prompt, check_overrides, load_prompt, prompts_digest
from thresher.pipelines.step import Checkpoint, GeneratedBatch, Generator

IN_DEPTH = ("add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input")
OPERATIONS = (*IN_DEPTH, "in_breadth")
#: every template: the in-depth frame, one method text per in-depth operation, in-breadth, the equality question
PROMPT_NAMES = ("in_depth", *IN_DEPTH, "in_breadth", "equality")
#: the rules, in the order they run; a rejected row's `reason` starts with its rule's name
RULES = ("empty", "copies_prompt", "truncated", "no_information_gain", "refusal", "only_stop_words")
#: what `complicate_input` asks to add, drawn per (row, round) like the operation
DATA_FORMATS = {
    "en": ("a Markdown table", "a JSON object", "a Python function", "an SQL table schema with a few rows",
           "an XML snippet", "CSV data", "a shell command with its output"),
    "zh": ("一张 Markdown 表格", "一个 JSON 对象", "一个 Python 函数", "一个 SQL 表结构和几行数据",
           "一段 XML", "一段 CSV 数据", "一条 shell 命令及其输出"),
}  # fmt: skip
#: the refusal rule's length bound per language: words in English, characters in Chinese
REFUSAL_MAX_LENGTH = {"en": 80, "zh": 120}
REFUSAL_MARKERS = {"en": ("sorry",), "zh": ("sorry", "抱歉", "对不起")}

# Our own stop-word lists: function words that carry no answer on their own.
_EN_STOP = """
    a about above after again against all am an and any are aren't as at be because been before being below between
    both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each either else
    ever few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
    herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me might
    more most must mustn't my myself neither no nor not now of off oh ok okay on once only or other ought our ours
    ourselves out over own really same shall shan't she she'd she'll she's should shouldn't so some such than that
    that's the their theirs them themselves then there there's these they they'd they'll they're they've this those
    through to too under until up upon us very was wasn't we we'd we'll we're we've well were weren't what what's
    when when's where where's whether which while who who's whom whose why why's will with won't would wouldn't yes
    yet you you'd you'll you're you've your yours yourself yourselves also although however though thus hence
    """
_ZH_STOP = """
    的 了 是 在 我 你 您 他 她 它 们 这 那 个 吗 呢 吧 啊 呀 哦 嗯 哈 嘛 啦 和 与 及 或 也 都 就 而 着 过 把 被 让 给 对 从
    向 以 为 于 之 其 此 等 么 不 没 很 太 还 又 再 才 只 会 要 能 想 好 有 地 得 啥 哪 谁 吗 嘿 喔 噢 呃 唉 哎
    什么 怎么 怎样 这个 那个 这些 那些 这样 那样 这里 那里 我们 你们 您们 他们 她们 它们 咱们 自己 一个 一些 没有 已经
    可以 能够 应该 可能 如果 因为 所以 但是 然后 因此 而且 并且 或者 以及 关于 对于 还是 就是 不是 只是 也是 还有 以后
    之后 之前 以前 其实 当然 非常 比较 一样 一下 一直 这么 那么 多少 为什么 是的 好的 对的 不会 不能 不要 知道 觉得
    """
EN_STOP_WORDS = frozenset(_EN_STOP.split())
ZH_STOP_WORDS = frozenset(_ZH_STOP.split())

_MARKER = re.compile(r"#([^\s#](?:[^#\n]{0,40}[^\s#])?)#")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_VERDICT = {
    "en": re.compile(r"\b(not\s+equal|unequal|equal)\b", re.IGNORECASE),
    "zh": re.compile(r"(不相同|不一样|不同|not\s+equal|unequal|相同|一样|equal)", re.IGNORECASE),
}
_NOT_EQUAL = ("not", "unequal", "不")


def text_length(text: str, language: str = "en") -> int:
    """Words for English; for Chinese every CJK character counts one and every run of other letters or digits one."""
    if language == "zh":
        return len(_CJK.findall(text)) + len(_WORD.findall(_CJK.sub(" ", text)))
    return len(text.split())


def is_refusal(text: str, language: str = "en", max_length: int | None = None) -> bool:
    """WizardLM's rule: the answer contains "sorry" (Chinese: also 抱歉, 对不起) and is short."""
    bound = REFUSAL_MAX_LENGTH[language] if max_length is None else max_length
    lowered = text.casefold()
    return any(m in lowered for m in REFUSAL_MARKERS[language]) and text_length(text, language) < bound


def only_stop_words(text: str, language: str = "en") -> bool:
    """True when `text` is empty or nothing but punctuation, symbols, whitespace and stop words."""
    if language == "en":
        return all(w.casefold().replace("’", "'") in EN_STOP_WORDS for w in _WORD.findall(text))
    # Chinese has no spaces: cover every run of letters with stop words, longest first at each position
    longest = max(len(w) for w in ZH_STOP_WORDS)
    for run in _WORD.findall(text):
        if run.casefold().replace("’", "'") in EN_STOP_WORDS:
            continue
        i = 0
        while i < len(run):
            for k in range(min(longest, len(run) - i), 0, -1):
                if run[i : i + k] in ZH_STOP_WORDS:
                    i += k
                    break
            else:
                return False
    return True


def prompt_markers(templates: Sequence[str]) -> tuple[str, ...]:
    """The phrases that give away a copied evolution prompt: every `#...#` marker of the templates, as written and
    without its #s ("#Rewritten Prompt#", "rewritten prompt"), casefolded, longest first."""
    found: set[str] = set()
    for text in templates:
        for m in _MARKER.finditer(text):
            inner = " ".join(m.group(1).split()).casefold()
            found.update({f"#{inner}#", inner})
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def copied_marker(instruction: str, markers: Sequence[str]) -> str | None:
    """The first marker `instruction` contains (case and spacing ignored), or None."""
    text = " ".join(instruction.split()).casefold()
    return next((m for m in markers if m in text), None)


def equality_verdict(reply: str | None, language: str = "en") -> bool | None:
    """The equality question's answer: True (equal), False (not equal), or None when the reply says neither.
    The first verdict word in the reply counts ("Not Equal" before "Equal")."""
    m = _VERDICT[language].search(unicodedata.normalize("NFKC", reply or ""))
    if m is None:
        return None
    return not m.group(1).casefold().startswith(_NOT_EQUAL)


def latest_versions(table: pa.Table) -> pa.Table:
    """The last version of each lineage in an EvolInstruct output (the rows no other row evolved from)."""
    parents = set(table.column("parent_id").to_pylist())
    keep = [i not in parents for i in table.column("id").to_pylist()]
    return table.filter(pa.array(keep, type=pa.bool_()))


#: an output row: the canonical columns, then the lineage
ROW_SCHEMA = pa.schema([
    *RECORD_SCHEMA,
    pa.field("parent_id", pa.string()),
    pa.field("evol_round", pa.int64()),
    pa.field("evol_operation", pa.string()),
])


class EvolInstruct(ModelStep, Generator):
    """Evolve each input row over `rounds` rounds (see the module docstring for the method and the rules).

    backend: the model that rewrites instructions and answers the equality question (a spec dict, a backend object,
    or None for the embedded llama.cpp model). responder: the model that answers evolved instructions (None: the
    backend). rounds: evolution rounds (the paper: 4). operations: the operations drawn from, uniformly (None: all
    six). language: "en" or "zh": the shipped templates, data formats, refusal markers, length unit and stop words.
    prompts: {template name: file} to replace shipped templates (names: `PROMPT_NAMES`). max_tokens /
    answer_max_tokens: the bounds for an evolved instruction / an answer. refusal_max_length: the refusal rule's
    bound (None: 80 words, or 120 characters in Chinese). seed: decides every operation and data format drawn.
    """

    n_inputs = 1
    inputs = ("instruction",)
    outputs = tuple(ROW_SCHEMA.names)
    model_params = {"backend": "chat", "responder": "chat"}
    VERSION = "1"
    _evolver_: Any = None  # the backend object, shared with the responder when there is none of its own

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        responder: Mapping[str, Any] | Any | None = None,
        rounds: int = 4,
        operations: Sequence[str] | None = None,
        language: str = "en",
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        max_tokens: int = 512,
        answer_max_tokens: int = 1024,
        temperature: float | None = 0.7,
        refusal_max_length: int | None = None,
        seed: int = 0,
        api_key: str | None = secret(),
        batch_size: int = runtime(64),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.responder = responder
        self.rounds = rounds
        self.operations = operations
        self.language = language
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.answer_max_tokens = answer_max_tokens
        self.temperature = temperature
        self.refusal_max_length = refusal_max_length
        self.seed = seed
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    # ---- configuration --------------------------------------------------------------------------

    def _spec(self, param: str) -> Any:
        # no responder of its own: the backend answers too (the same spec, so the same identity and cache keys)
        if param == "responder" and self.responder is None:
            return super()._spec("backend")
        return super()._spec(param)

    def _build(self, param: str) -> Any:
        # ... and is the same object, not a second client or a second embedded model: ModelStep builds the
        # parameters in `model_params` order, so the backend built just before is the one to share
        if param == "responder" and self.responder is None and self._evolver_ is not None:
            return self._evolver_
        built = super()._build(param)
        if param == "backend":
            self._evolver_ = built
        return built

    def _ops(self) -> tuple[str, ...]:
        return OPERATIONS if self.operations is None else tuple(self.operations)

    def _names(self) -> tuple[str, ...]:
        ops = self._ops()
        names = [n for n in PROMPT_NAMES if n in ops]
        if any(op in IN_DEPTH for op in ops):
            names.insert(0, "in_depth")
        return (*names, "equality")

    def check(self) -> None:
        name = type(self).__name__
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"{name}: rounds must be a positive integer, got {self.rounds!r}")
        ops = self._ops()
        if isinstance(self.operations, str) or not ops:
            raise ConfigError(f"{name}: operations must be a non-empty list; valid: {list(OPERATIONS)}")
        for op in ops:
            if op not in OPERATIONS:
                raise ConfigError(f"{name}: unknown operation {op!r}; valid: {list(OPERATIONS)}")
        if len(set(ops)) != len(ops):
            raise ConfigError(f"{name}: operations lists an operation twice: {list(ops)}")
        for key in ("max_tokens", "answer_max_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
        if self.refusal_max_length is not None and (
            isinstance(self.refusal_max_length, bool) or not isinstance(self.refusal_max_length, int)
        ):
            raise ConfigError(f"{name}: refusal_max_length must be an integer or None, got {self.refusal_max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{name}: seed must be an integer, got {self.seed!r}")
        check_overrides("evol_instruct", self.prompts, PROMPT_NAMES)
        self._templates()  # every template there, with the placeholders the step fills
        super().check()

    def _templates(self) -> dict[str, Prompt]:
        templates = {n: load_prompt("generators", "evol_instruct", n, self.language, self.prompts) for n in self._names()}
        fills = {
            "in_depth": {"method", "instruction"}, "in_breadth": {"instruction"}, "equality": {"first", "second"},
            "complicate_input": {"data_format"},
        }  # fmt: skip
        for n, t in templates.items():
            if t.placeholders != fills.get(n, set()):
                raise ConfigError(
                    f"{type(self).__name__}: prompt {t.path} has placeholders {sorted(t.placeholders)}; "
                    f"the {n!r} template takes exactly {sorted(fills.get(n, set()))}"
                )
        return templates

    def fingerprint_extra(self) -> dict[str, Any]:
        return {"prompts": prompts_digest("generators", "evol_instruct", self._names(), self.language, self.prompts)}

    def output_columns(self, input_columns: Sequence[Sequence[str]]) -> list[str]:
        return list(ROW_SCHEMA.names)  # the parent's other columns are not copied

    def begin(self) -> None:
        super().begin()
        self._zero_counts()

    def _zero_counts(self) -> None:
        self.rule_counts_: dict[str, int] = dict.fromkeys(RULES, 0)
        self.accepted_ = 0
        self.unclear_verdicts_ = 0

    def metrics(self) -> dict[str, Any]:
        out = dict(super().metrics())
        counts = getattr(self, "rule_counts_", None)
        if counts is not None:
            out.update(accepted=self.accepted_, rejected_by_rule=dict(counts), unclear_equality=self.unclear_verdicts_)
        return out

    # ---- the rounds -----------------------------------------------------------------------------

    def generate_batches(self, tables: list[pa.Table], checkpoint: Checkpoint) -> Iterator[GeneratedBatch]:
        if getattr(self, "rule_counts_", None) is None:  # driven directly, without the engine's begin()
            self._zero_counts()
        templates = self._templates()
        self.markers_ = prompt_markers([templates[n].text for n in templates if n != "equality"])
        roots = self._roots(tables[0])
        current = {r["id"]: r for r in roots}
        state = checkpoint.state or {"round": 1, "next": 0}
        if checkpoint.rows:
            self._restore(current, checkpoint.output())
        for round_, a, b, nxt in self.batch_plan(len(roots), state):
            yield self._batch(*self._evolve(templates, roots[a:b], current, round_), nxt)

    # ---- row-parallel rounds (the Ray runner: a round's batches on many workers) ------------------------

    def batch_plan(self, n: int, state: Mapping[str, Any] | None = None) -> list[tuple[int, int, int, dict[str, int]]]:
        """The batches left from `state` (a committed batch's state; None: the start) over `n` input rows, in commit
        order: (round, first row, end row, the state after it). The batches of one round are independent of each
        other: each evolves its own rows from their versions after the round before."""
        state = state or {"round": 1, "next": 0}
        round_, start = int(state["round"]), int(state["next"])
        plan = []
        while round_ <= self.rounds:
            for a in range(start, n, self.batch_size):
                b = min(a + self.batch_size, n)
                plan.append((round_, a, b, {"round": round_, "next": b} if b < n else {"round": round_ + 1, "next": 0}))
            round_, start = round_ + 1, 0
        return plan

    def round_inputs(self, tables: list[pa.Table], committed: pa.Table, round_: int) -> Any:
        """What every batch of `round_` starts from: the lineage roots and their versions committed before it."""
        templates = self._templates()
        self.markers_ = prompt_markers([templates[n].text for n in templates if n != "equality"])
        roots = self._roots(tables[0])
        current = {r["id"]: r for r in roots}
        if committed.num_rows and "evol_round" in committed.column_names:
            import pyarrow.compute as pc

            self._restore(current, committed.filter(pc.less(committed.column("evol_round"), round_)))
        return templates, roots, current

    def evolve_batch(self, prepared: Any, round_: int, a: int, b: int, state: dict[str, int]) -> GeneratedBatch:
        """Batch [a, b) of `round_` from `round_inputs`: what `generate_batches` yields for it."""
        templates, roots, current = prepared
        return self._batch(*self._evolve(templates, roots[a:b], current, round_), state)

    @staticmethod
    def _batch(out: list[dict[str, Any]], rejected: list[dict[str, Any]], failed: list[dict[str, Any]],
               state: dict[str, int]) -> GeneratedBatch:  # fmt: skip
        return GeneratedBatch(
            output=pa.Table.from_pylist(out, schema=ROW_SCHEMA),
            rejected=rejected or None,
            failed=failed or None,
            state=state,
            candidates=len(out) + len(rejected) + len(failed),
        )

    def _roots(self, table: pa.Table) -> list[dict[str, Any]]:
        """The input rows as lineage roots (canonical columns only), with their ids; ids must be unique."""
        cols = table.column_names
        n = table.num_rows

        def col(c: str) -> list[Any]:
            return table.column(c).to_pylist() if c in cols else [None] * n

        ids, instr, inp, out, system, history = (col(c) for c in ("id", "instruction", "input", "output", "system", "history"))
        roots: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        for i in range(n):
            try:
                hist = [list(p) for p in history_pairs(history[i])]
            except ValueError as e:
                raise StepError(f"{type(self).__name__}: input row {i} (id={ids[i]!r}), field 'history': {e}") from e
            rid = ids[i]
            if rid is None or rid == "":
                rid = record_id(instr[i] or "", inp[i] or "", out[i], system[i], hist)
            rid = str(rid)
            if rid in seen:
                raise StepError(
                    f"{type(self).__name__}: input rows {seen[rid]} and {i} share the id {rid!r}; lineage is kept by "
                    "id, so ids must be unique (run ExactDedup first, or give the rows distinct ids)"
                )
            seen[rid] = i
            roots.append({"id": rid, "instruction": instr[i], "input": inp[i], "system": system[i], "history": hist})
        return roots

    def _restore(self, current: dict[str, dict[str, Any]], committed: pa.Table) -> None:
        """Set each lineage's current version to its latest committed row (rows are committed round by round)."""
        root_of: dict[str, str] = {}
        for row in committed.to_pylist():
            parent = row["parent_id"]
            root = root_of.get(parent, parent)
            root_of[row["id"]] = root
            if root in current:
                current[root] = {k: row[k] for k in ("id", "instruction", "input", "system", "history")}

    def _evolve(
        self, templates: dict[str, Prompt], roots: list[dict[str, Any]], current: dict[str, dict[str, Any]], round_: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """One attempt for each row of a batch: evolve, check, answer, check; accepted versions replace `current`."""
        ops = self._ops()
        lang = self.language
        out: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        todo: list[dict[str, Any]] = []  # attempts still in the running, in row order
        for root in roots:
            parent = current[root["id"]]
            op = ops[self.rng("op", root["id"], round_).randrange(len(ops))]
            attempt = {
                "id": f"{root['id']}-evol{round_}", "instruction": None, "input": "", "output": None,
                "system": parent["system"], "history": parent["history"], "parent_id": parent["id"],
                "evol_round": round_, "evol_operation": op,
            }  # fmt: skip
            given = user_text(parent["instruction"], parent["input"])
            if not given.strip():
                if round_ == 1:  # an empty input row fails once and leaves the pool
                    failed.append({**attempt, "error": f"input row id={root['id']!r}: the instruction is empty"})
                continue
            attempt["_given"] = given
            attempt["_root"] = root["id"]
            if op == "in_breadth":
                attempt["_prompt"] = templates["in_breadth"].render(instruction=given)
            else:
                fills = {}
                if op == "complicate_input":
                    fmts = DATA_FORMATS[lang]
                    fills["data_format"] = fmts[self.rng("format", root["id"], round_).randrange(len(fmts))]
                method = templates[op].render(**fills).strip()
                attempt["_prompt"] = templates["in_depth"].render(method=method, instruction=given)
            todo.append(attempt)

        def drop(a: dict[str, Any], side: list[dict[str, Any]], **why: str) -> None:
            side.append({**{k: v for k, v in a.items() if not k.startswith("_")}, **why})

        def reject(a: dict[str, Any], rule: str, why: str) -> None:
            self.rule_counts_[rule] = self.rule_counts_.get(rule, 0) + 1
            drop(a, rejected, reason=f"{rule}: {why}")

        # 1. the evolution
        evolver = self.model()
        replies = self._chat(
            evolver, [[{"role": "user", "content": a["_prompt"]}] for a in todo], "evolve", round_,
            max_tokens=self.max_tokens, temperature=self.temperature,
        )  # fmt: skip
        survivors = []
        for a, res in zip(todo, replies, strict=True):
            if res.error is not None:
                drop(a, failed, error=f"row id={a['_root']!r}, round {round_}, evolving: {res.error}")
                continue
            text = (res.text or "").strip()
            a["instruction"] = text
            if not text:
                reject(a, "empty", "the model returned no instruction")
            elif (marker := copied_marker(text, self.markers_)) is not None:
                reject(a, "copies_prompt", f"the evolved instruction copies {marker!r} from the evolution prompt")
            elif (res.finish_reasons or [None])[0] == "length":
                reject(a, "truncated", f"the evolved instruction was cut off at max_tokens={self.max_tokens}")
            elif " ".join(text.split()).casefold() == " ".join(a["_given"].split()).casefold():
                reject(a, "no_information_gain", "the evolved instruction is identical to its parent")
            else:
                survivors.append(a)

        # 2. the equality question: does the evolution add anything over its parent?
        todo, survivors = survivors, []
        convs = [
            [{"role": "user", "content": templates["equality"].render(first=a["_given"], second=a["instruction"])}]
            for a in todo
        ]
        replies = self._chat(evolver, convs, "equality", round_, max_tokens=16, temperature=0.0)
        for a, res in zip(todo, replies, strict=True):
            if res.error is not None:
                drop(a, failed, error=f"row id={a['_root']!r}, round {round_}, equality check: {res.error}")
                continue
            verdict = equality_verdict(res.text, lang)
            if verdict is None:
                self.unclear_verdicts_ += 1  # neither word: the evolution is not eliminated on a reply it did not give
            if verdict:
                reject(a, "no_information_gain", f"the model judged it equal to its parent ({(res.text or '').strip()[:40]!r})")
            else:
                survivors.append(a)

        # 3. the answer, and the rules on it
        todo = survivors
        convs = [row_messages(a["instruction"], "", a["system"], a["history"]) for a in todo]
        replies = self._chat(
            self._responder(), convs, "answer", round_,
            max_tokens=self.answer_max_tokens, temperature=self.temperature,
        )  # fmt: skip
        bound = REFUSAL_MAX_LENGTH[lang] if self.refusal_max_length is None else self.refusal_max_length
        unit = "characters" if lang == "zh" else "words"
        for a, res in zip(todo, replies, strict=True):
            if res.error is not None:
                drop(a, failed, error=f"row id={a['_root']!r}, round {round_}, answering: {res.error}")
                continue
            answer = res.text or ""
            a["output"] = answer
            if is_refusal(answer, lang, bound):
                reject(a, "refusal", f"the answer says sorry in {text_length(answer, lang)} {unit} (< {bound})")
            elif only_stop_words(answer, lang):
                reject(a, "only_stop_words", "the answer is empty or only punctuation and stop words")
            else:
                row = {k: v for k, v in a.items() if not k.startswith("_")}
                out.append(row)
                current[a["_root"]] = row
                self.accepted_ += 1
        return out, rejected, failed

    def _responder(self) -> Any:
        return self.model("responder") if self.responder is not None else self.model()

    def _chat(self, backend: Any, convs: list[list[dict[str, str]]], purpose: str, round_: int, **params: Any) -> list[Any]:
        if not convs:
            return []
        # a seed per (purpose, round): reproducible where the server honours seeds, and a row that failed in one round
        # and asks the same again in the next gets a new sample, not the cached one (one seed for the whole batch, so
        # the batch stays one call and the backend keeps its window of requests full)
        if params.get("temperature") != 0.0:
            params["seed"] = self.sample_seed(purpose, round_)
        return list(backend.chat(convs, **{k: v for k, v in params.items() if v is not None}))
