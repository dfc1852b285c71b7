"""Chat rendering: canonical rows -> token ids with a loss mask on assistant tokens, and the checks that guard it.

How: each row becomes a list of chat messages (`thresher.data.messages`, the mapping Respond and the writers use
too), rendered with the tokenizer's chat template once in full and once per assistant turn up to that turn (with
and without the generation prompt). The character span between the two renderings is the assistant's reply; tokens
whose offsets start inside it are supervised, up to and including the end-of-turn token. Rendering text and mapping
back through offsets (rather than tokenizing pieces separately) keeps the ids exactly those the model sees at
inference. `encode_rendered` and `answer_texts` are the same rendering and tokenization for log-probability scoring
(IFD in `thresher.llms.hf`), so a scorer scores the tokens the trainer trains on.

Checks that fail loudly before the first step: a template whose renderings are not prefixes of each other, a
double BOS, an assistant turn that does not end with the end-of-turn token, a row with no output, and a row with
no supervised token left after truncation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thresher.errors import ConfigError, RecordError


@dataclass(frozen=True)
class Example:
    """One tokenized training row. `supervised[t]` is True where token t is a target of the loss."""

    row_id: str
    input_ids: list[int]
    supervised: list[bool]
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        # Token 0 can never be a target: nothing precedes it.
        return sum(self.supervised[1:])

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class RenderReport:
    """What rendering did to the rows: kept, truncated, and skipped with the reason per row id."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def row_to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A canonical row (alpaca layout) as chat messages: system, history pairs, then instruction(+input) -> output.

    The mapping is `thresher.data.messages.record_messages`, shared with Respond and the writers (an empty or
    whitespace-only system gives no system message; instruction and a non-empty input are joined by a newline).
    """
    from thresher.data.messages import record_messages  # here: thresher.data's package imports pyarrow

    if row.get("output") is None:
        raise RecordError(f"row id {row.get('id')!r} has no output (null): answer it before training", field="output")
    return record_messages(row)


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str:
    """The Jinja template to render with: the config's (inline or a .jinja path) or the tokenizer's own."""
    if chat_template is not None:
        path = Path(chat_template)
        if "{" not in chat_template and path.suffix in (".jinja", ".j2", ".txt") and path.is_file():
            return path.read_text()
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            "the tokenizer has no chat template: set chat_template in the config (a Jinja string or a .jinja file)"
        )
    if isinstance(template, dict):  # tokenizers that ship several named templates
        template = template.get("default") or next(iter(template.values()))
    return str(template)


def end_of_turn_ids(tokenizer: Any, eot_token: str | None, generation_eos: Iterable[int] = ()) -> set[int]:
    """Token ids that close an assistant turn: the configured token, else the tokenizer's and generation eos."""
    if eot_token is not None:
        tid = tokenizer.convert_tokens_to_ids(eot_token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ConfigError(f"eot_token={eot_token!r} is not a single token of this tokenizer")
        return {int(tid)}
    ids = {int(i) for i in generation_eos}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ConfigError("the tokenizer has no eos token: set eot_token in the config")
    return ids


def render_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    chat_template: str,
    max_seq_len: int,
    eot_ids: set[int],
    train_on_history: bool = True,
    on_bad_row: str = "fail",
) -> tuple[list[Example], RenderReport]:
    """Render, tokenize, mask and check every row. Returns the examples kept and a report."""
    report = RenderReport(rows=len(rows))
    texts, spans, ids = [], [], []
    for i, row in enumerate(rows):
        row_id = str(row.get("id") or i)
        if row.get("output") is None:
            _bad(report, on_bad_row, row_id, i, "output", "has no output (null): answer it before training")
            continue
        messages = row_to_messages(row)
        full, turn_spans = _render_with_spans(tokenizer, messages, chat_template, train_on_history, row_id)
        texts.append(full)
        spans.append(turn_spans)
        ids.append((i, row_id))

    encoded = encode_rendered(tokenizer, texts, names=[f"row {row_id!r}" for _, row_id in ids])

    examples = []
    for k, (i, row_id) in enumerate(ids):
        input_ids, offsets = encoded[k]
        supervised = _mask_from_spans(offsets, input_ids, spans[k], eot_ids, tokenizer, row_id)
        truncated = len(input_ids) > max_seq_len
        example = Example(row_id, input_ids[:max_seq_len], supervised[:max_seq_len], truncated)
        if example.n_supervised == 0:
            prompt_len = supervised.index(True) if any(supervised) else len(input_ids)
            _bad(
                report, on_bad_row, row_id, i, "output",
                f"has no supervised token after truncation to max_seq_len={max_seq_len} "
                f"(the prompt alone is {prompt_len} tokens): raise max_seq_len or shorten the row",
            )
            continue
        report.truncated += truncated
        examples.append(example)
    report.kept = len(examples)
    return examples, report


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS before plain text it encodes (so the model was trained with one)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x").input_ids[:1] == [bos]


def encode_rendered(
    tokenizer: Any, texts: Sequence[str], *, names: Sequence[str] | None = None
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of rendered chat texts, as the trainer feeds them to the model.

    A text is tokenized whole, without special tokens (the chat template writes its own), and the tokenizer's BOS
    goes first only when the tokenizer adds one to plain text and the text does not already start with it (that
    BOS gets the offsets (-1, -1), outside every character span). A text that starts with two BOS tokens is a
    ConfigError, named by `names[k]`. Needs a fast tokenizer (offsets map tokens back to characters).
    """
    if not texts:
        return []
    # One batched call: the fast tokenizer encodes in parallel.
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    bos = tokenizer.bos_token_id
    prepend = adds_bos(tokenizer)
    out = []
    for k in range(len(texts)):
        ids = [int(t) for t in encoded["input_ids"][k]]
        offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"][k]]
        if prepend and ids[:1] != [bos]:  # the model expects a BOS the template did not write
            ids, offsets = [bos, *ids], [(-1, -1), *offsets]
        if bos is not None and ids[:2] == [bos, bos]:
            name = names[k] if names is not None else f"text {k}"
            raise ConfigError(
                f"{name} starts with a double BOS ({tokenizer.bos_token!r} twice): the chat template writes "
                "a BOS and the text already has one; remove bos_token from the template"
            )
        out.append((ids, offsets))
    return out


@dataclass(frozen=True)
class AnswerTexts:
    """A conversation's last assistant reply as the chat template writes it, split for log-probability scoring.

    - prompt: the rendering before the reply, ending with the response header (the generation prompt);
    - header: the response header alone (with the template's BOS when it writes one first): IFD's unconditioned
      prefix, which keeps the header but drops the instruction;
    - answer: the reply up to and including its end-of-turn token: exactly the characters of the tokens the trainer
      supervises in that turn.
    """

    prompt: str
    header: str
    answer: str


def answer_texts(
    tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, Any]]], *, chat_template: str, eot_ids: set[int]
) -> list[AnswerTexts]:
    """`AnswerTexts` of each conversation (which ends with an assistant turn), rendered as `render_rows` renders."""
    fulls, starts = [], []
    for k, messages in enumerate(conversations):
        msgs = [dict(m) for m in messages]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ConfigError(f"conversation {k} does not end with an assistant turn: there is no answer to score")
        full, spans = _render_with_spans(tokenizer, msgs, chat_template, False, f"conversation {k}")
        fulls.append(full)
        starts.append(spans[-1])
    encoded = encode_rendered(tokenizer, fulls, names=[f"conversation {k}" for k in range(len(fulls))])
    out = []
    for k, (messages, full, (start, end)) in enumerate(zip(conversations, fulls, starts, strict=True)):
        ids, offsets = encoded[k]
        supervised = _mask_from_spans(offsets, ids, [(start, end)], eot_ids, tokenizer, f"conversation {k}")
        last = max(t for t, s in enumerate(supervised) if s)
        before = [dict(m) for m in messages[:-1]]
        bare = tokenizer.apply_chat_template(before, chat_template=chat_template, tokenize=False)
        with_header = full[:start]
        if not with_header.startswith(bare):
            raise ConfigError(
                f"conversation {k}: the chat template's generation prompt does not extend the conversation's "
                "rendering, so the response header cannot be told apart; set chat_template"
            )
        header = with_header[len(bare) :]
        bos_text = tokenizer.bos_token
        if bos_text and full.startswith(bos_text) and not header.startswith(bos_text):
            header = bos_text + header  # the template opens every text with its BOS; the header alone keeps it
        out.append(AnswerTexts(with_header, header, full[start : offsets[last][1]]))
    return out


def _render_with_spans(
    tokenizer: Any, messages: list[dict[str, str]], template: str, train_on_history: bool, row_id: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character span of each supervised assistant reply in it."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages, False)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (i != last and not train_on_history):
            continue
        start_text, end_text = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(start_text) and full.startswith(end_text) and len(start_text) <= len(end_text)):
            raise ConfigError(
                f"row {row_id!r}: the chat template renders a conversation differently from its first turns, so "
                "assistant tokens cannot be located; use a template whose renderings extend each other "
                "(set chat_template)"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def _mask_from_spans(
    offsets: Sequence[tuple[int, int]],
    input_ids: list[int],
    spans: list[tuple[int, int]],
    eot_ids: set[int],
    tokenizer: Any,
    row_id: str,
) -> list[bool]:
    supervised = [False] * len(input_ids)
    for turn, (start, end) in enumerate(spans):
        inside = [t for t, (s, _) in enumerate(offsets) if start <= s < end]
        ends = [t for t in inside if input_ids[t] in eot_ids]
        if not ends:
            names = sorted(tokenizer.convert_ids_to_tokens(sorted(eot_ids)))
            raise ConfigError(
                f"row {row_id!r}: assistant turn {turn + 1} does not end with an end-of-turn token {names}: the "
                "model would never learn to stop; fix the chat template or set eot_token"
            )
        for t in inside:
            if t > ends[-1]:
                break
            supervised[t] = True
    return supervised


def _bad(report: RenderReport, on_bad_row: str, row_id: str, row: int, field_name: str, message: str) -> None:
    if on_bad_row == "fail":
        raise RecordError(f"row id {row_id!r} {message} (set on_bad_row: skip to drop such rows)", row=row,
                          field=field_name)
    report.skipped.append((row_id, message))
