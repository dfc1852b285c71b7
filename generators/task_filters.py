"""Self-Instruct's text rules: reading tasks and instances out of a model's reply, and the filters they must pass.

Everything here is pure text work (no model, no I/O), so `SelfInstruct` stays a loop over requests and each rule
can be tested on its own. The facts come from the Self-Instruct paper and its reference code (the Alpaca variant
from Alpaca's): an instruction of <= 3 or > 150 words is dropped, so is one that names something a text model
cannot handle (a whole-word blacklist, plurals listed), one that starts with "Write a program", and one whose
first character is punctuation or (English only) not ASCII. For Chinese, lengths count characters (a run of
Latin letters or digits counts as one), the blacklist holds Chinese terms as well as the English words, and the
first-character rule looks for Chinese punctuation too.

Instances: a reply cut off by the length limit loses its last instance; an instance whose input equals its output,
whose output is empty, or whose input or output ends with a dangling colon is dropped; one input given two
different outputs drops the whole task; duplicates are dropped; at most `max_instances` are kept (a seeded
sample, as the reference code samples).
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Self-Instruct's blacklist (whole words, any case): things a text-only model cannot see, make or do.
BLACKLIST_EN: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to",
)  # fmt: skip
#: What Alpaca's generator adds to it.
ALPACA_EXTRA_EN: tuple[str, ...] = ("video", "audio", "music", "flowchart", "diagram")
#: The same ideas in Chinese (matched as substrings: Chinese has no spaces to mark whole words).
BLACKLIST_ZH: tuple[str, ...] = (
    "图片", "图像", "照片", "图表", "图形", "画图", "绘制", "画出", "画一", "文件", "地图", "前往",
)  # fmt: skip
ALPACA_EXTRA_ZH: tuple[str, ...] = ("视频", "音频", "音乐", "流程图", "示意图")

_WRITE_A_PROGRAM = {"en": ("write a program",), "zh": ("write a program", "写一个程序", "编写一个程序", "编写程序")}

#: Filter names: the `filter` column of rejected rows and the keys of the step's counts.
INSTRUCTION_FILTERS: tuple[str, ...] = (
    "unparsable", "cut_off", "length", "blacklist", "write_a_program", "punctuation", "non_ascii", "similarity",
)  # fmt: skip
INSTANCE_FILTERS: tuple[str, ...] = (
    "no_instances", "instance_cut_off", "instance_same_as_input", "instance_empty_output", "instance_dangling_colon",
    "instance_conflict", "instance_duplicate", "instance_over_limit",
)  # fmt: skip

_CJK_RANGE = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK = re.compile(f"[{_CJK_RANGE}]")
# one unit per CJK character, one per run of other letters or digits
_ZH_UNITS = re.compile(f"[{_CJK_RANGE}]|(?:(?![{_CJK_RANGE}])[^\\W_])+")


def is_punctuation(ch: str) -> bool:
    """ASCII punctuation (Python's `string.punctuation`, as the reference code) or any Unicode punctuation."""
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def length_units(text: str, language: str) -> int:
    """Words for English (whitespace split); for Chinese, CJK characters plus runs of other letters and digits."""
    if language == "zh":
        return len(_ZH_UNITS.findall(text))
    return len(text.split())


@dataclass(frozen=True)
class TaskRules:
    """The post-filters of one language and mode. `check(instruction)` gives (filter, reason) or None."""

    language: str = "en"
    blacklist: tuple[str, ...] = BLACKLIST_EN
    min_length: int = 3  # an instruction of at most this many words (characters for zh) is dropped
    max_length: int = 150  # and one of more than this many

    _blacklist_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        # one regex for the whole blacklist: English terms as whole words, CJK terms anywhere
        parts = [re.escape(w) if _CJK.search(w) else rf"\b{re.escape(w)}\b" for w in self.blacklist]
        object.__setattr__(self, "_blacklist_re", re.compile("|".join(parts), re.IGNORECASE) if parts else None)

    def check(self, instruction: str) -> tuple[str, str] | None:
        unit = "characters" if self.language == "zh" else "words"
        n = length_units(instruction, self.language)
        if n <= self.min_length:
            return "length", f"instruction has {n} {unit} (<= {self.min_length})"
        if n > self.max_length:
            return "length", f"instruction has {n} {unit} (> {self.max_length})"
        found = self._blacklist_re.search(instruction) if self._blacklist_re is not None else None
        if found:
            return "blacklist", f"instruction names {found.group(0)!r}, which a text model cannot handle (blacklist)"
        low = instruction.lower()
        for prefix in _WRITE_A_PROGRAM.get(self.language, _WRITE_A_PROGRAM["en"]):
            if low.startswith(prefix):
                return "write_a_program", f"instruction starts with {instruction[: len(prefix)]!r}"
        first = instruction[0]
        if is_punctuation(first):
            return "punctuation", f"instruction starts with punctuation {first!r}"
        if self.language == "en" and not first.isascii():
            return "non_ascii", f"instruction starts with a non-ASCII character {first!r}"
        return None


def task_rules(language: str, mode: str) -> TaskRules:
    """The rules for `language` ("en" | "zh") in `mode` ("self_instruct" | "alpaca": Alpaca's longer blacklist)."""
    words = BLACKLIST_EN + (ALPACA_EXTRA_EN if mode == "alpaca" else ())
    if language == "zh":
        words = BLACKLIST_ZH + (ALPACA_EXTRA_ZH if mode == "alpaca" else ()) + words
    return TaskRules(language=language, blacklist=words)


# ---- reading replies --------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"(?m)^[ \t]*(?:[*#]+[ \t]*)?(\d{1,3})[ \t]?[.．、)](?!\d)\**[ \t]*")
_MORE_NUMBERS = re.compile(r"^(?:\d{1,3}[ \t]?[.．、)](?!\d)[ \t]*)+")
_WS = re.compile(r"\s+")


def clean(text: str) -> str:
    """Whitespace runs (newlines too) become one space; ends stripped."""
    return _WS.sub(" ", text).strip()


def parse_numbered_list(reply: str) -> list[str]:
    """The items of a numbered list ("9. ...", "9、..."), in order, whitespace-normalised.

    An item runs until the next numbered line, so it may span lines. Text before the first number is a preamble
    ("Sure, here are more tasks:"), not a task; empty items are skipped (as the reference code skips them).
    """
    marks = list(_NUMBERED.finditer(reply))
    items = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(reply)
        # "9. 3) Plan a trip": a model that numbers twice; an item of numbers only is empty
        item = _MORE_NUMBERS.sub("", clean(reply[m.end() : end])).rstrip(":：").strip()
        if item:
            items.append(item)
    return items


_FIELD = re.compile(
    r"(?:^|\n)[ \t]*(?:#+[ \t]*)?(?:\d{1,3}[ \t]*[.．、][ \t]*)?(Instruction|Input|Output|指令|输入|输出)[ \t]*[:：]",
    re.IGNORECASE,
)
_FIELD_NAMES = {"instruction": "instruction", "input": "input", "output": "output",
                "指令": "instruction", "输入": "input", "输出": "output"}  # fmt: skip
NO_INPUT = ("<noinput>", "<no input>", "<无输入>", "无输入")


@dataclass
class AlpacaItem:
    """One task of an Alpaca-style reply: its three fields, or why it has none (`problem`)."""

    instruction: str | None
    input: str = ""
    output: str = ""
    problem: str | None = None


def parse_alpaca_reply(reply: str) -> list[AlpacaItem]:
    """The tasks of a reply in the Alpaca format: blocks separated by `###`, each with Instruction, Input and Output
    fields (English or Chinese names; an optional item number before each). A block with no field at all is chatter
    around the list and is skipped; a block with fields but not exactly those three, in that order, is an item that
    cannot be read (`problem` says why)."""
    items = []
    for block in reply.split("###"):
        marks = list(_FIELD.finditer(block))
        if not marks:
            continue
        names = [_FIELD_NAMES[m.group(1).lower()] for m in marks]
        values = [block[m.end() : (marks[k + 1].start() if k + 1 < len(marks) else len(block))]
                  for k, m in enumerate(marks)]  # fmt: skip
        found = dict(zip(names, values, strict=True))
        instruction = clean(found["instruction"]) if "instruction" in found else None
        if names != ["instruction", "input", "output"]:
            items.append(AlpacaItem(instruction or None, problem=f"fields {names}, not [instruction, input, output]"))
            continue
        inp = found["input"].strip()
        if inp.lower() in NO_INPUT:
            inp = ""
        items.append(AlpacaItem(instruction or None, inp, found["output"].strip(),
                                problem=None if instruction else "an empty instruction"))  # fmt: skip
    return items


# an example header at the start of a line: "Example 2", "Example 2:", "示例 2：", or a bare "Example"
_EXAMPLE = re.compile(r"(?m)^[ \t]*(?:Example|示例|例子)[ \t]?(?:\d+[ \t]*[.:：]?|[ \t]*[:：]?[ \t]*$)", re.IGNORECASE)
_OUTPUT = re.compile(r"(?:Output|输出)[ \t]*\d*[ \t]*[:：]", re.IGNORECASE)
_INPUT = re.compile(r"(?:Input|输入)[ \t]*\d*[ \t]*[:：]", re.IGNORECASE)
_LEADING_INPUT = re.compile(r"^\s*(?:Input|输入)[ \t]*\d*[ \t]*[:：]", re.IGNORECASE)
_LABEL = re.compile(r"(?:Class label|类别标签|类别)[ \t]*[:：]", re.IGNORECASE)
_NEXT_TASK = re.compile(r"(?m)^[ \t]*(?:Task|任务)[ \t]*[:：]")


def _until_next_task(reply: str, first_mark: int) -> str:
    """The reply up to a new "Task:" line after the first instance (a model that goes on to invent more tasks)."""
    m = _NEXT_TASK.search(reply, first_mark + 1)
    return reply[: m.start()] if m else reply


def _split_input_output(text: str) -> tuple[str, str]:
    parts = _OUTPUT.split(text, maxsplit=1)
    if len(parts) == 2:
        inp, out = parts
    else:
        inp, out = "", text
    out = _INPUT.split(out, maxsplit=1)[0]  # a second input/output pair run into this one
    inp = _LEADING_INPUT.sub("", inp)
    if inp.strip().lower() in NO_INPUT:
        inp = ""
    return inp.strip(), out.strip()


def parse_input_first(reply: str) -> list[tuple[str, str]]:
    """Instances of an input-first reply: "Example N / Input: ... / Output: ..." blocks, or a single
    "Input: ... Output: ..." pair without example headers. Nothing readable gives []."""
    marks = list(_EXAMPLE.finditer(reply))
    if marks:
        reply = _until_next_task(reply, marks[0].start())
        chunks = [c for c in _EXAMPLE.split(reply)[1:] if c.strip()]
        return [_split_input_output(c) for c in chunks]
    if _OUTPUT.search(reply):
        start = _INPUT.search(reply)
        return [_split_input_output(reply[start.start() if start else 0 :])]
    return []


def parse_output_first(reply: str) -> list[tuple[str, str]]:
    """Instances of an output-first (classification) reply: each "Class label: X" line, then its input."""
    first = _LABEL.search(reply)
    if not first:
        return []
    reply = _until_next_task(reply, first.start())
    out = []
    for chunk in _LABEL.split(reply)[1:]:
        label, _, rest = chunk.strip().partition("\n")
        out.append((_LEADING_INPUT.sub("", rest).strip(), label.strip()))
    return out


@dataclass
class InstanceVerdict:
    """What the instance filters made of one task's instances: those kept, and those dropped with why."""

    kept: list[tuple[str, str]]
    dropped: list[tuple[str, str, str, str]]  # (input, output, filter, reason)


def _dangling(text: str) -> bool:
    return text.strip().endswith((":", "："))


def filter_instances(
    instances: Sequence[tuple[str, str]], *, cut_off: bool, max_instances: int, rng: random.Random
) -> InstanceVerdict:
    """The reference code's instance filters, in its order (see the module docstring)."""
    items = list(instances)
    dropped: list[tuple[str, str, str, str]] = []
    if cut_off and items:
        inp, out = items.pop()
        dropped.append((inp, out, "instance_cut_off", "instance: the reply was cut off by the length limit here"))
    valid = []
    for inp, out in items:
        if inp == out:
            dropped.append((inp, out, "instance_same_as_input", "instance: the output equals the input"))
        elif out == "":
            dropped.append((inp, out, "instance_empty_output", "instance: the output is empty"))
        elif _dangling(inp) or _dangling(out):
            which = "input" if _dangling(inp) else "output"
            dropped.append((inp, out, "instance_dangling_colon", f"instance: the {which} ends with a dangling ':'"))
        else:
            valid.append((inp, out))
    outputs: dict[str, str] = {}
    for inp, out in valid:
        if inp and outputs.setdefault(inp, out) != out:
            reason = f"instance: the input {inp[:60]!r} has two different outputs, which drops the task"
            dropped += [(i, o, "instance_conflict", reason) for i, o in valid]
            return InstanceVerdict([], dropped)
    unique: list[tuple[str, str]] = []
    for pair in valid:
        if pair in unique:
            dropped.append((*pair, "instance_duplicate", "instance: a duplicate of an earlier instance"))
        else:
            unique.append(pair)
    if len(unique) > max_instances:
        keep = set(rng.sample(range(len(unique)), max_instances))
        for k, pair in enumerate(unique):
            if k not in keep:
                dropped.append((*pair, "instance_over_limit", f"instance: over the limit of {max_instances} per task"))
        unique = [p for k, p in enumerate(unique) if k in keep]
    return InstanceVerdict(unique, dropped)
