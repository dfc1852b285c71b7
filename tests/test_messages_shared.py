"""One row -> messages mapping: Respond, the trainer and the conversation writers show a model the same turns.

Rule (thresher.data.messages): a `system` that is null, empty or only whitespace gives no system message; the
last user turn is LLaMA-Factory's alpaca join, instruction + "\n" + input when input is not empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from thresher.data import read_records, write_records
from thresher.generators import Respond, row_messages
from thresher.llms.base import Completion, Usage
from thresher.trainer.chat import row_to_messages

ROWS: list[dict[str, Any]] = [
    {
        "id": "empty-system",
        "instruction": "Translate.",
        "input": "chat",
        "output": "cat",
        "system": "",
        "history": [["hi", "hello"]],
    },
    {
        "id": "null-system",
        "instruction": "And 3+3?",
        "input": "",
        "output": "6",
        "system": None,
        "history": [["2+2?", "4"], ["1+1?", "2"]],
    },
    {"id": "system", "instruction": "Q?", "input": "more", "output": "A.", "system": "x", "history": []},
    {
        "id": "blank-system",
        "instruction": "Q?",
        "input": "",
        "output": "A.",
        "system": " \n ",
        "history": [["hi", "hello"]],
    },
]


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


EXPECTED = [
    [_m("user", "hi"), _m("assistant", "hello"), _m("user", "Translate.\nchat"), _m("assistant", "cat")],
    [
        _m("user", "2+2?"),
        _m("assistant", "4"),
        _m("user", "1+1?"),
        _m("assistant", "2"),
        _m("user", "And 3+3?"),
        _m("assistant", "6"),
    ],
    [_m("system", "x"), _m("user", "Q?\nmore"), _m("assistant", "A.")],
    [_m("user", "hi"), _m("assistant", "hello"), _m("user", "Q?"), _m("assistant", "A.")],
]


def test_the_shared_function_is_exported_from_data() -> None:
    from thresher.data import record_messages
    from thresher.data import row_messages as shared

    for row, want in zip(ROWS, EXPECTED, strict=True):
        assert record_messages(row) == want
        assert record_messages(row, with_output=False) == want[:-1]
        args = (row["instruction"], row["input"], row["system"], row["history"])
        assert shared(*args, output=row["output"]) == want
    # a step's default system prompt fills in only where the row has none
    assert record_messages(ROWS[0], system_prompt="Be brief.")[0] == _m("system", "Be brief.")
    assert record_messages(ROWS[2], system_prompt="Be brief.")[0] == _m("system", "x")
    # LLaMA-Factory joins only the non-empty parts
    assert shared("", "only input")[-1] == _m("user", "only input")


def test_respond_and_trainer_agree_on_system_and_input() -> None:
    for row, want in zip(ROWS, EXPECTED, strict=True):
        respond = row_messages(row["instruction"], row["input"], row["system"], row["history"])
        assert [*respond, _m("assistant", row["output"])] == want, row["id"]
        assert row_to_messages(row) == want, row["id"]


class _Recorder:
    """A chat backend that answers "ok" and keeps the conversations it was sent."""

    kind = "recorder"

    def __init__(self) -> None:
        self.usage = Usage()
        self.sent: list[list[dict[str, str]]] = []

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def chat(self, conversations: Any, **params: Any) -> list[Completion]:
        self.sent.extend([dict(m) for m in c] for c in conversations)
        return [Completion(texts=["ok"]) for _ in conversations]


def test_the_respond_step_sends_the_shared_messages() -> None:
    backend = _Recorder()
    step = Respond(backend=backend)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "output"} for r in ROWS])
    out = step.map_batch(table)
    assert out["output"].to_pylist() == ["ok"] * len(ROWS)
    assert backend.sent == [want[:-1] for want in EXPECTED]


def test_writers_write_the_shared_messages(tmp_path: Path) -> None:
    def lines(path: Path) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in path.read_bytes().splitlines()]

    write_records(ROWS, tmp_path / "m.jsonl", layout="messages")
    write_records(ROWS, tmp_path / "pc.jsonl", layout="prompt_completion")
    write_records(ROWS, tmp_path / "sg.jsonl", layout="sharegpt")
    assert [r["messages"] for r in lines(tmp_path / "m.jsonl")] == EXPECTED
    assert [r["prompt"] + r["completion"] for r in lines(tmp_path / "pc.jsonl")] == EXPECTED
    # ShareGPT keeps the system in its top-level column (LLaMA-Factory's `system` mapping), not as a turn
    roles = {"human": "user", "gpt": "assistant"}
    for r, want in zip(lines(tmp_path / "sg.jsonl"), EXPECTED, strict=True):
        turns = [_m(roles[t["from"]], t["value"]) for t in r["conversations"]]
        assert turns == [m for m in want if m["role"] != "system"]
    # a messages file without a system turn still reads back as the very same rows, empty system included
    for name in ("m.jsonl", "pc.jsonl", "sg.jsonl"):
        back = read_records(tmp_path / name).to_pylist()
        assert [r["system"] for r in back] == [r["system"] for r in ROWS], name
        assert [r["history"] for r in back] == [r["history"] for r in ROWS], name
