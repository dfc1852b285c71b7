"""Pairwise evaluation of two models by a judge model: the protocol AlpaGasus and Cherry LLM report.

Both models answer every prompt of a test set (greedy by default). The judge sees the request and both answers and
rates each from 1 to 10 (our `compare` template: the two scores on the first line, the reasons after), once with
model A's answer shown first and once with model B's first, since judges favour a position. Each order gives A a
+1 (its score is higher), 0 (equal) or -1; the two are added, so A wins a prompt when it wins both orders or wins one
and ties the other, loses in the mirror cases, and ties when both orders tie or they disagree (one win, one loss).
Per test set: wins, ties, losses over the N prompts judged, and the winning score (wins - losses) / N + 1, which is
above 1 when A is better and 2 at most. A prompt whose answers or judgements failed (a request error, a reply with
no pair of scores) is left out of N and listed with its reason; the judge's replies are kept whole.

With `structured=True` the judge is asked for a JSON object (`compare_json` template: a reason, then `score_a` and
`score_b`) through the backend's structured output (a JSON schema whose scores are the integers 1-10), so every reply
that arrives carries two scores: use it with judges that serve structured output (OpenAI, vLLM, SGLang, the embedded
llama.cpp model and `thresher serve` through a grammar), and for small judges, which rarely keep a free-text format.

Every request goes through the backends' request cache, so a second run (or a killed one) pays only for what has no
answer yet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thresher.errors import ConfigError
from thresher.evaluation.test_sets import PromptSet, load_prompt_set
from thresher.pipelines.prompts import LANGUAGES, Prompt, load_prompt
from thresher.scorers.judge_parse import parse_score_pair

METHOD = "pairwise"
TEMPLATE = "compare"
TEMPLATE_JSON = "compare_json"  # structured=True
_FILLS = {"instruction", "first", "second"}
SCALE = (1, 10)


@dataclass
class PairOutcome:
    """One prompt: both answers, the judge's (score A, score B) in each order, the outcome for A, the reasons."""

    id: str
    instruction: str
    answer_a: str | None
    answer_b: str | None
    scores: list[list[float] | None] = field(default_factory=lambda: [None, None])  # [A-first, B-first], each [a, b]
    outcome: str | None = None  # "win", "tie", "loss" for model A; None when it failed
    reasons: list[str | None] = field(default_factory=lambda: [None, None])  # the judge's replies, A first then B
    error: str | None = None


@dataclass
class SetResult:
    """One test set's counts for model A against model B."""

    name: str
    n: int  # prompts judged (failed ones left out)
    wins: int
    ties: int
    losses: int
    failed: int
    winning_score: float | None  # (wins - losses) / n + 1; None when nothing was judged
    mean_score_a: float | None  # the judge's mean 1-10 score over both orders
    mean_score_b: float | None
    pairs: list[PairOutcome] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "pairs"}


@dataclass
class EvalResult:
    """Every set's result, the models' names, and the held-out losses when asked for."""

    model_a: str
    model_b: str
    sets: list[SetResult]
    heldout_loss: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"model_a": self.model_a, "model_b": self.model_b, "sets": [s.summary() for s in self.sets],
                "heldout_loss": self.heldout_loss}  # fmt: skip

    def table(self) -> str:
        """A plain-text table: one line per set."""
        lines = [f"{self.model_a} vs {self.model_b}",
                 f"{'set':<12} {'n':>4} {'win':>4} {'tie':>4} {'loss':>4} {'failed':>6} {'score':>6}"]  # fmt: skip
        for s in self.sets:
            score = f"{s.winning_score:.3f}" if s.winning_score is not None else "-"
            lines.append(f"{s.name:<12} {s.n:>4} {s.wins:>4} {s.ties:>4} {s.losses:>4} {s.failed:>6} {score:>6}")
        for name, loss in self.heldout_loss.items():
            lines.append(f"held-out loss {name}: {loss:.4f}")
        return "\n".join(lines)


def order_points(first: float, second: float) -> int:
    """+1 when the answer shown first scores higher, -1 when lower, 0 on equal scores."""
    return (first > second) - (first < second)


def outcome(points_a_first: int, points_b_first: int) -> str:
    """Model A's result from its points in the two orders (see the module docstring)."""
    total = points_a_first + points_b_first
    return "win" if total > 0 else "loss" if total < 0 else "tie"


def judge_template(language: str = "en", prompts: Mapping[str, str | os.PathLike[str]] | None = None,
                   *, structured: bool = False) -> Prompt:  # fmt: skip
    """The judge's template, `compare` or with structured=True `compare_json` (shipped, or the user's from
    prompts={"compare": path} / {"compare_json": path}), checked."""
    if language not in LANGUAGES:
        raise ConfigError(f"pairwise eval: unknown language {language!r}; valid: {list(LANGUAGES)}")
    unknown = sorted(set(prompts or {}) - {TEMPLATE, TEMPLATE_JSON})
    if unknown:
        raise ConfigError(f"pairwise eval: no template named {unknown}; valid: [{TEMPLATE!r}, {TEMPLATE_JSON!r}]")
    name = TEMPLATE_JSON if structured else TEMPLATE
    tpl = load_prompt("evaluation", METHOD, name, language, prompts)
    if tpl.placeholders != _FILLS:
        raise ConfigError(f"pairwise eval: prompt {tpl.path} has placeholders {sorted(tpl.placeholders)}; "
                          f"the {name!r} template takes exactly {sorted(_FILLS)}")  # fmt: skip
    return tpl


# the reply structured=True asks for: the reason first, so the scores follow from it
_SCORE = {"type": "integer", "enum": list(range(SCALE[0], SCALE[1] + 1))}
JUDGE_SCHEMA = {
    "title": "pairwise_judgement",
    "type": "object",
    # maxLength: a few sentences, and a bound on a small judge that would otherwise run on inside the string
    "properties": {"reason": {"type": "string", "maxLength": 300}, "score_a": _SCORE, "score_b": _SCORE},
    "required": ["reason", "score_a", "score_b"],
}


def _structured_pair(res: Any) -> tuple[float, float] | None:
    """The (shown first, shown second) scores of a structured reply, None when they are missing or off the scale."""
    value = (res.parsed or [None])[0]
    if not isinstance(value, Mapping):
        return None
    got = [value.get("score_a"), value.get("score_b")]
    scores = [float(x) for x in got if isinstance(x, int | float) and not isinstance(x, bool)]
    if len(scores) != 2 or not all(SCALE[0] <= x <= SCALE[1] for x in scores):
        return None
    return scores[0], scores[1]


def answer(backend: Any, rows: Sequence[Mapping[str, str]], *, max_tokens: int = 512,
           temperature: float | None = 0.0, seed: int | None = None, system_prompt: str | None = None,
           ) -> list[tuple[str | None, str | None]]:  # fmt: skip
    """(answer, error) per prompt row, from a chat backend."""
    from thresher.data.messages import row_messages

    convs = [row_messages(r["instruction"], r.get("input"), None, None, system_prompt=system_prompt) for r in rows]
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    if seed is not None:
        params["seed"] = seed
    results = backend.chat(convs, **params) if convs else []
    return [(None, str(r.error)) if r.error is not None else (r.text, None) for r in results]


def judge_pairs(
    judge: Any, rows: Sequence[Mapping[str, str]], answers_a: Sequence[str | None], answers_b: Sequence[str | None],
    *, template: Prompt, max_tokens: int = 256, temperature: float | None = 0.0, name: str = "set",
    structured: bool = False,
) -> SetResult:
    """Judge each prompt's two answers in both orders and count model A's wins, ties and losses; with structured=True
    the judge replies in JSON_SCHEMA's form (`template` should then be the `compare_json` one)."""
    from thresher.data.messages import user_text

    pairs = [PairOutcome(str(r["id"]), user_text(r["instruction"], r.get("input")), a, b)
             for r, a, b in zip(rows, answers_a, answers_b, strict=True)]  # fmt: skip
    convs, where = [], []
    for k, p in enumerate(pairs):
        if p.answer_a is None or p.answer_b is None:
            p.error = p.error or "no answer to judge"
            continue
        for order, (first, second) in enumerate(((p.answer_a, p.answer_b), (p.answer_b, p.answer_a))):
            text = template.render(instruction=p.instruction, first=first, second=second)
            convs.append([{"role": "user", "content": text}])
            where.append((k, order))
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    if structured:
        params["response_format"] = JUDGE_SCHEMA
    results = judge.chat(convs, **params) if convs else []
    for (k, order), res in zip(where, results, strict=True):
        p, shown = pairs[k], "A" if order == 0 else "B"
        if res.error is not None:
            p.error = _join(p.error, f"{p.id}: judging with {shown} first: {res.error}")
            continue
        p.reasons[order] = res.text
        got = _structured_pair(res) if structured else parse_score_pair(res.text, *SCALE)
        if got is None:
            p.error = _join(p.error, f"{p.id}: the judge's reply with {shown} first gives no two scores from 1 to 10: "
                                     f"{str(res.text)[:200]!r}")  # fmt: skip
            continue
        shown_first, shown_second = got
        p.scores[order] = [shown_first, shown_second] if order == 0 else [shown_second, shown_first]  # [A's, B's]
    counts = {"win": 0, "tie": 0, "loss": 0}
    sum_a = sum_b = 0.0
    for p in pairs:
        if p.error is not None or p.scores[0] is None or p.scores[1] is None:
            p.error = p.error or f"{p.id}: not judged"
            continue
        (a1, b1), (a2, b2) = p.scores  # type: ignore[misc]
        p.outcome = outcome(order_points(a1, b1), order_points(a2, b2))
        counts[p.outcome] += 1
        sum_a += a1 + a2
        sum_b += b1 + b2
    n = sum(counts.values())
    return SetResult(
        name=name, n=n, wins=counts["win"], ties=counts["tie"], losses=counts["loss"], failed=len(pairs) - n,
        winning_score=(counts["win"] - counts["loss"]) / n + 1 if n else None,
        mean_score_a=sum_a / (2 * n) if n else None, mean_score_b=sum_b / (2 * n) if n else None, pairs=pairs,
    )  # fmt: skip


def pairwise_eval(
    model_a: Mapping[str, Any] | Any | None,
    model_b: Mapping[str, Any] | Any | None,
    *,
    judge: Mapping[str, Any] | Any | None,
    test_sets: Sequence[str | Path | PromptSet],
    data_dir: str | Path | None = None,
    max_prompts: int | None = None,
    names: tuple[str, str] = ("a", "b"),
    language: str = "en",
    prompts: Mapping[str, str | os.PathLike[str]] | None = None,
    answer_max_tokens: int = 512,
    judge_max_tokens: int = 256,
    structured: bool = False,
    seed: int | None = None,
    heldout: str | Path | None = None,
    heldout_max_rows: int | None = None,
    heldout_max_seq_len: int = 512,
    out_dir: str | Path | None = None,
) -> EvalResult:
    """Compare model A with model B on each test set (see the module docstring).

    model_a, model_b, judge: backend specs (`{kind: transformers, model: ..., adapter: ...}`, `{kind: openai, ...}`;
    None is the embedded llama.cpp model) or backend objects. test_sets: short names of the Cherry test sets (found in
    `data_dir`), files, or PromptSets. heldout: a reference file with responses; the mean token loss of each model
    that is a local transformers model (a base model, or one with an `adapter`) is added, rows cut to
    `heldout_max_seq_len` tokens as the trainer cuts them. out_dir: where
    `eval.json` (the counts) and `pairs-<set>.jsonl` (every prompt, both answers, scores and the judge's replies) go.
    structured: the judge replies in JSON through structured output (see the module docstring).
    """
    from thresher.llms.config import make_backend

    tpl = judge_template(language, prompts, structured=structured)
    if not test_sets:
        raise ConfigError("pairwise eval: give at least one test set")
    sets = [s if isinstance(s, PromptSet) else load_prompt_set(s, data_dir=data_dir, max_prompts=max_prompts)
            for s in test_sets]  # fmt: skip
    backends = [make_backend(model_a), make_backend(model_b), make_backend(judge)]
    for b in backends:
        load = getattr(b, "load", None)
        if callable(load):
            load()
    a, b, j = backends
    results = []
    try:
        for ps in sets:
            got_a = answer(a, ps.rows, max_tokens=answer_max_tokens, seed=seed)
            got_b = answer(b, ps.rows, max_tokens=answer_max_tokens, seed=seed)
            res = judge_pairs(j, ps.rows, [x for x, _ in got_a], [x for x, _ in got_b], template=tpl,
                              max_tokens=judge_max_tokens, name=ps.name, structured=structured)  # fmt: skip
            for p, (_, ea), (_, eb) in zip(res.pairs, got_a, got_b, strict=True):
                if ea or eb:
                    p.error = "; ".join(f"{p.id}: model {who} failed to answer: {e}"
                                        for who, e in ((names[0], ea), (names[1], eb)) if e)  # fmt: skip
            results.append(res)
    finally:
        for spec, backend in zip((model_a, model_b, judge), backends, strict=True):
            close = getattr(backend, "close", None)
            if callable(close) and (spec is None or isinstance(spec, Mapping)):  # built here: ours to close
                close()
    result = EvalResult(names[0], names[1], results)
    if heldout is not None:
        from thresher.evaluation.heldout import heldout_loss

        for name, spec in zip(names, (model_a, model_b), strict=True):
            local = _local_model(spec)
            if local is not None:
                result.heldout_loss[name] = heldout_loss(local[0], heldout, adapter=local[1], max_rows=heldout_max_rows,
                                                    max_seq_len=heldout_max_seq_len)
    if out_dir is not None:
        write_result(result, out_dir)
    return result


def _join(old: str | None, new: str) -> str:
    return new if old is None else f"{old}; {new}"


def _local_model(spec: Any) -> tuple[str, str | None] | None:
    """(model, adapter) of a spec that is a local transformers model; None for served or other backends."""
    if isinstance(spec, Mapping):
        if str(spec.get("kind", "")).lower() not in ("transformers", "hf"):
            return None
        model, adapter = spec.get("model"), spec.get("adapter")
    elif type(spec).__name__ == "Transformers":
        model, adapter = spec.model, spec.adapter
    else:
        return None
    return (str(model) if model is not None else "bundled:smollm2", str(adapter) if adapter is not None else None)


def write_result(result: EvalResult, out_dir: str | Path) -> Path:
    """`eval.json` and one `pairs-<set>.jsonl` per set under out_dir, written atomically; returns eval.json's path."""
    from thresher.pipelines.runner import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in result.sets:
        lines = "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in s.pairs)
        atomic_write_text(out / f"pairs-{s.name}.jsonl", lines)
    path = out / "eval.json"
    atomic_write_text(path, json.dumps(result.summary(), indent=1, ensure_ascii=False))
    return path
