"""Chat rendering with the real SmolLM2 tokenizer: assistant-only loss mask and the pre-train checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from thresher.errors import ConfigError, RecordError
from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template, row_to_messages

SMOL_TEMPLATE_NO_DEFAULT_SYSTEM = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from thresher.trainer.model import BUNDLED, resolve_model_dir

    return resolve_model_dir(BUNDLED)  # converted once, then cached under ~/.cache/thresher/hf-from-gguf


@pytest.fixture(scope="module")
def tokenizer(smol_dir: Path) -> Any:
    from thresher.trainer.model import load_tokenizer

    return load_tokenizer(smol_dir)


def _render(tokenizer: Any, rows: list[dict], template: str | None = None, **kw: Any) -> Any:
    options = {"max_seq_len": 256, "train_on_history": True, "on_bad_row": "fail", **kw}
    return render_rows(
        rows,
        tokenizer,
        chat_template=resolve_chat_template(tokenizer, template),
        eot_ids=end_of_turn_ids(tokenizer, None),
        **options,
    )


def _supervised_text(tokenizer: Any, example: Any) -> str:
    return tokenizer.decode([t for t, s in zip(example.input_ids, example.supervised, strict=True) if s])


def test_row_to_messages_joins_instruction_and_input() -> None:
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief.",
           "history": [["hi", "hello"]]}
    assert row_to_messages(row) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Translate\nchat"},
        {"role": "assistant", "content": "cat"},
    ]


def test_loss_only_on_the_answer_and_its_end_of_turn(tokenizer: Any, shared_data: Path) -> None:
    from thresher.data import read_records

    rows = read_records(shared_data / "llama-factory-demo" / "alpaca_en_demo.json", limit=20).to_pylist()
    short = [r for r in rows if len(r["output"]) < 300][:3]
    examples, report = _render(tokenizer, short)
    assert report.kept == 3 and report.truncated == 0
    for row, ex in zip(short, examples, strict=True):
        assert _supervised_text(tokenizer, ex) == row["output"] + "<|im_end|>"
        assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\n")  # the template's own system turn
        assert ex.input_ids[:2] != [tokenizer.bos_token_id] * 2


def test_history_turns_are_supervised_unless_disabled(tokenizer: Any) -> None:
    row = {"id": "h", "instruction": "And 3+3?", "input": "", "output": "6", "history": [["2+2?", "4"]]}
    (with_history,), _ = _render(tokenizer, [row])
    assert _supervised_text(tokenizer, with_history) == "4<|im_end|>6<|im_end|>"
    (last_only,), _ = _render(tokenizer, [row], train_on_history=False)
    assert _supervised_text(tokenizer, last_only) == "6<|im_end|>"


def test_double_bos_fails_loudly(tokenizer: Any) -> None:
    # SmolLM2's BOS is <|im_start|>: a template that writes bos_token before its first turn doubles it.
    template = "{{ bos_token }}" + SMOL_TEMPLATE_NO_DEFAULT_SYSTEM
    with pytest.raises(ConfigError, match="double BOS"):
        _render(tokenizer, [{"id": "r1", "instruction": "Hi", "input": "", "output": "Hello"}], template)


def test_assistant_turn_without_end_of_turn_fails_loudly(tokenizer: Any) -> None:
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(ConfigError, match=r"assistant turn 1 does not end with an end-of-turn token \['<\|im_end\|>'\]"):
        _render(tokenizer, [{"id": "r1", "instruction": "Hi", "input": "", "output": "Hello"}], template)


def test_row_without_supervised_token_after_truncation(tokenizer: Any) -> None:
    rows = [
        {"id": "long-prompt", "instruction": "word " * 80, "input": "", "output": "ok"},
        {"id": "fine", "instruction": "Hi", "input": "", "output": "Hello"},
    ]
    with pytest.raises(RecordError, match="row id 'long-prompt' has no supervised token after truncation") as err:
        _render(tokenizer, rows, max_seq_len=48)
    assert err.value.row == 0 and err.value.field == "output"
    examples, report = _render(tokenizer, rows, max_seq_len=48, on_bad_row="skip")
    assert [ex.row_id for ex in examples] == ["fine"]
    assert report.skipped[0][0] == "long-prompt"


def test_truncation_keeps_the_prompt_and_cuts_the_answer(tokenizer: Any) -> None:
    row = {"id": "t", "instruction": "Count", "input": "", "output": " ".join(str(i) for i in range(200))}
    (ex,), report = _render(tokenizer, [row], max_seq_len=64)
    assert len(ex) == 64 and ex.truncated and report.truncated == 1 and ex.n_supervised > 0


def test_row_without_output(tokenizer: Any) -> None:
    row = {"id": "q", "instruction": "Unanswered?", "input": "", "output": None}
    with pytest.raises(RecordError, match="row id 'q' has no output"):
        _render(tokenizer, [row])
    examples, report = _render(tokenizer, [row], on_bad_row="skip")
    assert examples == [] and report.skipped == [("q", "has no output (null): answer it before training")]


def test_template_from_file_and_missing_template(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text(SMOL_TEMPLATE_NO_DEFAULT_SYSTEM)
    assert resolve_chat_template(tokenizer, str(path)) == SMOL_TEMPLATE_NO_DEFAULT_SYSTEM

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        resolve_chat_template(NoTemplate(), None)
