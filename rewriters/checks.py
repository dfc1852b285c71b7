"""The checks a rewrite must pass to replace the original response (ReAlign's filters, and ours for leaked prompts).

Pure functions of the original, the rewrite and a little context. Each returns None when the rewrite passes, or a
sentence a person can read saying why it fails:

- `check_length`: the rewrite has at least `min_ratio` (ReAlign: half) of the original's tokens
  (`thresher.rewriters.text`: words, and CJK characters one each).
- `check_code`: code in both or in neither (a fenced block, or two or more lines that read as code).
- `check_answer`: the original's final answer is still there: what follows "The answer is", "####", `\\boxed{}` or
  答案是; else an option letter the original opens with ("(B)", "B."); else a yes/no or True/False it opens with
  (是/否, 对/错, 正确/错误 in Chinese), matched by polarity; else its last number (list numbering aside), compared as
  a value, so "1,200" = "1200" and "0.50" = "0.5".
- `check_scaffolding`: no prompt scaffolding the original did not have: "Revised response:", "Reasoning:", their
  Chinese forms, our templates' section markers (`markers`), "Here is the rewritten response".

`run_checks` runs the named checks in order and returns the first failure as (check name, reason).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from thresher.rewriters.text import count_tokens

#: the checks, in the order `run_checks` runs them
CHECKS = ("length", "code", "answer", "scaffolding")

# ---- length ------------------------------------------------------------------------------------------------------


def check_length(original: str, rewrite: str, *, min_ratio: float = 0.5) -> str | None:
    """The rewrite keeps at least `min_ratio` of the original's tokens."""
    o, r = count_tokens(original), count_tokens(rewrite)
    if r < min_ratio * o:
        return f"the rewrite has {r} token{'' if r == 1 else 's'}, under {min_ratio:g} of the original's {o}"
    return None


# ---- code --------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)
_CODE_LINE = re.compile(
    r"""^[ \t]*(?:
        (?:def|class)\s+\w+.*:\s*$ | (?:import\s+[\w.]+|from\s+[\w.]+\s+import\s) | \#include\s*[<"] |
        (?:public|private|static|func|function|fn|const|let|var)\s+[\w$]+.*[=({;] |
        (?:return|print|console\.log|System\.out\.print\w*|printf)\s*\(.*\)\s*;?\s*$ |
        (?:if|for|while|switch)\s*\(.*\)\s*\{?\s*$ | (?:SELECT|INSERT\s+INTO|UPDATE|CREATE\s+TABLE)\s.+ |
        [\w.\[\]]+\s*(?:=|\+=|-=)\s*[^=].*;\s*$ | [}\])];?\s*$ | .*[{;]\s*$
    )""",
    re.VERBOSE | re.MULTILINE,
)


def find_code(text: str) -> str | None:
    """What makes `text` hold code: "a fenced block" or "N lines of code such as '...'", or None."""
    if _FENCE.search(text):
        return "a fenced code block"
    lines = [m.group(0).strip() for m in _CODE_LINE.finditer(text)]
    lines = [ln for ln in lines if ln and not ln.endswith(("。", "；")) and count_tokens(ln) <= 25]
    if len(lines) >= 2:
        return f"{len(lines)} lines of code such as {lines[0][:40]!r}"
    return None


def check_code(original: str, rewrite: str) -> str | None:
    """Code in both or in neither."""
    o, r = find_code(original), find_code(rewrite)
    if o and not r:
        return f"the original has code ({o}) and the rewrite has none"
    if r and not o:
        return f"the rewrite adds code ({r}) that the original does not have"
    return None


# ---- the final answer --------------------------------------------------------------------------------------------

_NUM = r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?"
_NUMBER = re.compile(rf"(?<![\w.]){_NUM}|(?<=[^\W\d_]){_NUM}")
_ENUMERATOR = re.compile(r"^[ \t]*(?:#+\s*)?(?:step\s+)?\d+[.)、:](?=\s|$)", re.IGNORECASE | re.MULTILINE)
_EXPLICIT = (  # (pattern, how the reason names it)
    (re.compile(r"^[ \t]*####\s*(?P<a>[^\n]+)", re.MULTILINE), "after '####'"),
    (re.compile(r"\\boxed\{(?P<a>[^{}]+)\}"), "in \\boxed{}"),
    (re.compile(r"\b(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is|:|=)\s*:?\s*(?P<a>[^\n]+)", re.IGNORECASE),
     "after 'the answer is'"),
    (re.compile(r"(?:最终)?答案\s*(?:是|为|:)\s*(?P<a>[^\n]+)"), "after '答案是'"),
)
_OPTION_START = re.compile(r"^\s*(?:\*\*)?(?:\((?P<a>[A-H])\)|(?P<b>[A-H])(?:[.):：]|\s*$)(?=\s|$|\*))")
_OPTION_IN = re.compile(r"^\s*\(?(?P<a>[A-H])\)?(?:[.):：]|\s*$)")
_BOOL_EN = {"yes": True, "true": True, "correct": True, "no": False, "false": False, "incorrect": False}
_BOOL_ZH = (("不是", False), ("不对", False), ("错误", False), ("正确", True), ("是", True), ("否", False),
            ("对", True), ("错", False))  # fmt: skip


@dataclass(frozen=True)
class FinalAnswer:
    """The answer a rewrite must keep: its kind ("number", "option", "boolean", "text"), its value, what it looks
    like in the original, and how it was found (for the reason)."""

    kind: str
    value: object
    shown: str
    how: str


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _number_value(s: str) -> Fraction | None:
    s = s.replace("−", "-").replace(",", "").replace(" ", "")
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return Fraction(a) / Fraction(b) if Fraction(b) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numbers(text: str, *, skip_enumerators: bool = False) -> list[tuple[str, Fraction]]:
    """The numbers in `text` as (text, value), in order; list numbering ("1.", "2)" at a line start) left out when
    asked."""
    text = _nfkc(text)
    skip = {m.end() for m in _ENUMERATOR.finditer(text)} if skip_enumerators else set()
    out = []
    for m in _NUMBER.finditer(text):
        if skip and any(m.start() < e <= m.end() + 1 for e in skip):
            continue
        v = _number_value(m.group(0))
        if v is not None:
            out.append((m.group(0), v))
    return out


def _boolean(text: str) -> tuple[bool, str] | None:
    """The yes/no a text opens with, and the word."""
    t = _nfkc(text).strip().lstrip("*_ \"'")
    m = re.match(r"[A-Za-z]+", t)
    if m and m.group(0).casefold() in _BOOL_EN:
        return _BOOL_EN[m.group(0).casefold()], m.group(0)
    for word, value in _BOOL_ZH:
        if t.startswith(word) and (word != "是" or t[1:2] in ("的", "，", ",", "。", "!", "！", "")):
            return value, word
    return None


def _classify(answer: str, how: str) -> FinalAnswer | None:
    answer = answer.strip().strip("*_ ").rstrip(".。")
    if not answer:
        return None
    m = _OPTION_IN.match(answer)
    if m:
        return FinalAnswer("option", m.group("a"), m.group("a"), how)
    b = _boolean(answer)
    if b is not None:
        return FinalAnswer("boolean", b[0], b[1], how)
    nums = numbers(answer)
    if nums:
        return FinalAnswer("number", nums[0][1], nums[0][0], how)
    text = " ".join(re.split(r"[,.;!?，。；！？]", answer)[0].split())
    if not text or count_tokens(text) > 6:  # a sentence, not an answer to look for word for word
        return None
    return FinalAnswer("text", text.casefold(), text, how)


def final_answer(original: str) -> FinalAnswer | None:
    """The final answer of a response (see the module docstring), or None when it has none to check."""
    text = _nfkc(original)
    for pattern, how in _EXPLICIT:
        found = list(pattern.finditer(text))
        if found:
            got = _classify(found[-1].group("a"), how)
            if got is not None:
                return got
    m = _OPTION_START.match(text)
    if m:
        letter = m.group("a") or m.group("b")
        return FinalAnswer("option", letter, letter, "the option letter it opens with")
    b = _boolean(text)
    if b is not None:
        return FinalAnswer("boolean", b[0], b[1], "the yes/no it opens with")
    nums = numbers(text, skip_enumerators=True)
    if nums:
        return FinalAnswer("number", nums[-1][1], nums[-1][0], "its last number")
    return None


def _has_option(text: str, letter: str) -> bool:
    t = _nfkc(text)
    patterns = (
        rf"\({letter}\)", rf"(?<![A-Za-z]){letter}\)", rf"(?<![A-Za-z]){letter}[.:](?=\s|$)",
        rf"(?:option|choice|answer)\s*(?:is\s*)?:?\s*\(?{letter}(?![A-Za-z])", rf"^\s*{letter}\s*$",
        rf"(?:选项?|答案\s*[是为:]?)\s*\(?{letter}(?![A-Za-z])", rf"\*\*{letter}\*\*",
    )  # fmt: skip
    return any(re.search(p, t, re.IGNORECASE if len(p) > 40 else re.MULTILINE) for p in patterns)


def _has_boolean(text: str, value: bool) -> bool:
    t = _nfkc(text)
    words = {w.casefold() for w in re.findall(r"[A-Za-z]+", t)}
    if any(w in words for w, v in _BOOL_EN.items() if v == value):
        return True
    if value:
        return bool(re.search(r"(?<!不)(是|对|正确)", t))
    return bool(re.search(r"不是|不对|否|错", t))


def answer_kept(answer: FinalAnswer, rewrite: str) -> bool:
    """Whether `rewrite` still gives `answer`."""
    if answer.kind == "number":
        return any(v == answer.value for _, v in numbers(rewrite))
    if answer.kind == "option":
        return _has_option(rewrite, str(answer.value))
    if answer.kind == "boolean":
        return _has_boolean(rewrite, bool(answer.value))
    squash = " ".join(_nfkc(rewrite).split()).casefold()
    return str(answer.value) in squash


def check_answer(original: str, rewrite: str) -> str | None:
    """The original's final answer is still in the rewrite."""
    answer = final_answer(original)
    if answer is None or answer_kept(answer, rewrite):
        return None
    return f"the original's final answer {answer.shown!r} ({answer.how}) is not in the rewrite"


# ---- leaked scaffolding ------------------------------------------------------------------------------------------

#: labels a rewriting prompt asks for, or that models add around a rewrite (ReAlign's and the usual ones), en and zh
SCAFFOLDING = (
    "revised response:", "rewritten response:", "revised answer:", "rewritten answer:", "reasoning:",
    "[response start]", "[response end]", "[question start]", "[format start]", "[evidence start]",
    "修改后的回答:", "修改后的回复:", "改写后的回答:", "改写后的回复:", "修订后的回答:", "推理:", "理由:",
)  # fmt: skip
_PREAMBLE = re.compile(
    r"here(?:'s| is) (?:the|a|my|your) (?:revised|rewritten|reformatted|improved|polished|updated) "
    r"(?:response|answer|version|text)|以下是(?:改写|修改|润色|修订)后的",
    re.IGNORECASE,
)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", _nfkc(text)).casefold()


def leaked_marker(original: str, rewrite: str, markers: Sequence[str] = ()) -> str | None:
    """The first scaffolding label or template marker the rewrite holds and the original does not, or None."""
    o, r = _squash(original), _squash(rewrite)
    for marker in (*SCAFFOLDING, *markers):
        m = _squash(marker).strip()
        if m and m in r and m not in o:
            return marker
    found = _PREAMBLE.search(r)
    if found and not _PREAMBLE.search(o):
        return found.group(0)
    return None


def check_scaffolding(original: str, rewrite: str, *, markers: Sequence[str] = ()) -> str | None:
    """No prompt scaffolding in the rewrite that the original did not have."""
    leaked = leaked_marker(original, rewrite, markers)
    if leaked is not None:
        return f"the rewrite holds prompt scaffolding {leaked!r}"
    return None


# ---- all of them -------------------------------------------------------------------------------------------------


def run_checks(
    original: str,
    rewrite: str,
    *,
    checks: Sequence[str] = CHECKS,
    min_ratio: float = 0.5,
    markers: Sequence[str] = (),
) -> tuple[str, str] | None:
    """The first check (in `checks` order) the rewrite fails, as (name, reason); None when it passes them all."""
    for name in checks:
        if name == "length":
            why = check_length(original, rewrite, min_ratio=min_ratio)
        elif name == "code":
            why = check_code(original, rewrite)
        elif name == "answer":
            why = check_answer(original, rewrite)
        elif name == "scaffolding":
            why = check_scaffolding(original, rewrite, markers=markers)
        else:
            raise ValueError(f"unknown check {name!r}; valid: {list(CHECKS)}")
        if why is not None:
            return name, why
    return None
