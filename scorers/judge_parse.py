"""Reading a score or a pairwise verdict out of what a judge model actually writes.

Judges are asked for the score alone on the first line (AlpaGasus), and often do something else: "Score: 4.5/5",
"**4**", prose and then "I would rate it 4 out of 5", "评分：4分", "[[4]]", "8/10". `parse_score` looks, most
trusted first: a final/overall score anywhere; a double-bracketed score; then on the first non-empty line and, failing
that, in the whole reply: a labelled score ("Score: 4", "评分：4分", the dimension's own name), a line that is only a
number, a number with its scale ("4/5", "4 out of 5", "4分"), a Chinese numeral score ("四分"), a number opening the
first line ("4 - accurate") or said on it ("The answer is 3.5, ..."; a small model's habit), a verb phrase ("I'd
rate it 4"). A score written on another scale ("8/10", "满分10分")
is converted to the asked one. A range ("4-5"), a number outside the scale, or no number at all is no score: the
caller fails the row and quotes the reply, it never becomes a 0.

`parse_score_pair` reads the two scores of a pairwise judge that rates both answers (AlpaGasus/Cherry's evaluation:
"7 4" on the first line, or "[[7, 4]]", or "Answer A: 7 ... Answer B: 4").

Offsets are kept (full-width digits are folded one character for one), so the expected score can be read from the
token that wrote the score.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_CN = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_NUM = r"(?<![\d.])(?P<num>\d+(?:\.\d+)?)(?![\d])(?!\.\d)"
_DEN = r"(?:\s*(?:/|out\s+of\b|of\b)\s*(?P<den>\d+(?:\.\d+)?)|\s*(?P<fen>分|points?\b|pts\b))?"
_GAP = r"[^\w\n]{0,8}(?:(?:is|of|would\s+be|will\s+be|be|=|为|是|应为|应该是|给出|给|打)[^\w\n]{0,6})?"
_LABELS = r"(?:final\s+|overall\s+|total\s+)?(?:score|rating|grade|mark)s?|最终得分|最终评分|总分|总评分|评分|得分|分数|打分|分值"
_RANGE_AFTER = re.compile(r"\s*(?:-|–|~|to\b|至|到)\s*\d")
# scale indications, masked before any score is looked for: "(0-5)", "满分5分", "5分制", "on a scale of 1 to 10"
_SCALES = (
    re.compile(r"[(（\[]\s*\d+\s*(?:-|–|~|to|至|到)\s*(?P<max>\d+)\s*分?\s*[)）\]]", re.I),
    re.compile(r"满分\s*(?:为|是)?\s*(?P<max>\d+)\s*分?"),
    re.compile(r"(?P<max>\d+)\s*分制"),
    re.compile(r"(?:on\s+)?a\s+scale\s+(?:of|from)\s+\d+\s*(?:-|–|to)\s*(?P<max>\d+)", re.I),
)
_FINAL = re.compile(rf"(?i)(?:(?:final|overall|total)\s+(?:score|rating|grade)s?|最终得分|最终评分|总分|总评分){_GAP}{_NUM}{_DEN}")
_BRACKETS = re.compile(rf"\[\[\s*{_NUM}{_DEN}\s*\]\]")
_STANDALONE = re.compile(rf"(?m)^[^\w\n]*{_NUM}{_DEN}[^\w\n]*$")
_WITH_SCALE = re.compile(rf"(?i){_NUM}(?:\s*(?:/|out\s+of\b)\s*(?P<den>\d+(?:\.\d+)?)|\s*(?P<fen>分)(?!钟|之|析|类|别|布|成|开|段|数))")
_CN_SCORE = re.compile(r"(?:^|(?<=[给打得为是评：:\s]))(?P<cn>[零〇一二两三四五六七八九])\s*分(?!钟|之|析|类|别|布|成|开|段|数)")
_START = re.compile(rf"(?m)^[^\w\n]*{_NUM}{_DEN}(?=(?P<after>[^\n]*))")
_SAYS = re.compile(rf"(?i)\b(?:answer|result|verdict|judge?ment)\s+(?:is|would\s+be)\s*:?\s*{_NUM}{_DEN}")
_VERB = re.compile(rf"(?i)\b(?:give|rate|award|assign|score)[sd]?\b[^.\n\d]{{0,30}}?{_NUM}{_DEN}")


@dataclass(frozen=True)
class ParsedScore:
    """A score found in a reply: its value on the asked scale, where its number starts and ends, the explanation."""

    value: float
    start: int
    end: int
    reason: str


def fold(text: str) -> str:
    """NFKC, one character for one (full-width digits and colons become ASCII; offsets are kept)."""
    out = []
    for ch in text:
        n = unicodedata.normalize("NFKC", ch)
        out.append(n if len(n) == 1 else ch)
    return "".join(out)


def _mask_scales(text: str) -> tuple[str, float | None]:
    scale = None
    for rx in _SCALES:
        for m in rx.finditer(text):
            scale = float(m.group("max"))
            text = text[: m.start()] + " " * (m.end() - m.start()) + text[m.end() :]
    return text, scale


def _label_pattern(labels: Sequence[str]) -> re.Pattern[str]:
    extra = "|".join(re.escape(x) for x in labels if x)
    names = f"{_LABELS}|{extra}" if extra else _LABELS
    return re.compile(rf"(?i)(?:{names}){_GAP}(?:{_NUM}{_DEN}|(?P<cn>[零〇一二两三四五六七八九])\s*分)")


def _value(m: re.Match[str], text: str, low: float, high: float, scale: float | None) -> float | None:
    groups = m.groupdict()
    if groups.get("cn"):
        v = float(_CN[groups["cn"]])
    else:
        v = float(groups["num"])
        if groups.get("den") is None and _RANGE_AFTER.match(text, m.end("num")):
            return None  # "4-5", "3 to 4": no one score
    den = groups.get("den")
    if den is not None:
        d = float(den)
        if d <= 0 or v > d:
            return None
        v = v * high / d if d != high else v
    elif scale is not None and scale != high and scale > 0 and v <= scale:
        v = v * high / scale
    return v if low <= v <= high else None


def _first_line(text: str) -> tuple[int, int]:
    """Start and end offsets of the first line with any letter or digit."""
    at = 0
    for line in text.split("\n"):
        if any(c.isalnum() for c in line):
            return at, at + len(line)
        at += len(line) + 1
    return 0, 0


def _reason(text: str, start: int, end: int, line: tuple[int, int]) -> str:
    """The explanation: what follows a score that opens the first line (AlpaGasus's layout), else the whole reply."""
    if line[0] <= start < line[1] and not any(c.isalnum() for c in text[line[0] : start]):
        rest = text[end : line[1]].lstrip(" \t-–—:：,，;；.。*_`#)]）分").rstrip()
        return "\n".join(p for p in (rest, text[line[1] :].strip()) if p).strip()
    return text.strip()


def parse_score(
    text: str | None, low: float = 0, high: float = 5, labels: Sequence[str] = ()
) -> ParsedScore | None:
    """The score a judge reply gives on the scale [low, high], or None when it gives none (see the module docstring).
    `labels`: extra words that introduce a score (the dimension's name: "Accuracy: 4")."""
    if not text or not text.strip():
        return None
    original = text
    folded, scale = _mask_scales(fold(text))
    line = _first_line(folded)
    label = _label_pattern(labels)

    def found(m: re.Match[str] | None) -> ParsedScore | None:
        if m is None:
            return None
        v = _value(m, folded, low, high, scale)
        if v is None:
            return None
        key = "cn" if m.groupdict().get("cn") else "num"
        return ParsedScore(v, m.start(key), m.end(key), _reason(original, m.start(), m.end(), line))

    def first(rx: re.Pattern[str], lo: int = 0, hi: int | None = None) -> ParsedScore | None:
        for m in rx.finditer(folded, lo, len(folded) if hi is None else hi):
            got = found(m)
            if got is not None:
                return got
        return None

    for rx in (_FINAL, _BRACKETS):
        got = first(rx)
        if got is not None:
            return got
    for lo, hi in ((line[0], line[1]), (0, None)):
        for rx in (label, _STANDALONE, _WITH_SCALE, _CN_SCORE):
            got = first(rx, lo, hi)
            if got is not None:
                return got
        if hi is not None:
            got = _start_of_line(folded, line, found) or first(_SAYS, lo, hi)
            if got is not None:
                return got
    return first(_VERB)


def _start_of_line(folded: str, line: tuple[int, int], found: object) -> ParsedScore | None:
    """"4 - accurate", "4: ...", "4 The answer...": a number that opens the first line. "4. The answer" counts only
    when the next line does not go on with "5." (a numbered list, not a score)."""
    m = _START.match(folded, line[0], line[1])
    if m is None:
        return None
    after = m.group("after")
    if after and not re.match(r"\s*(?:[-–—:：,，;；)）|]|\s[A-Za-z\u4e00-\u9fff]|\.\s)", after):
        return None
    if re.match(r"\.\s", after) and "." not in m.group("num"):
        nxt = folded[line[1] :].lstrip("\n")
        if re.match(rf"\s*{int(float(m.group('num'))) + 1}\.\s", nxt):
            return None
    got = found(m)  # type: ignore[operator]
    return got if isinstance(got, ParsedScore) else None


_V_BRACKET = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)
_V_ALONE = re.compile(r"^(?:(?:verdict|winner|better|answer|result|结论|胜者|获胜者|更好的是|更好的回答|判断)\s*(?:is|:|：|为|是)?\s*)?(?:response|answer|assistant|output|回答|答案|回复|助手)?\s*(?P<v>A|B|1|2|tie|draw|equal|平局|平手|相当)\s*$", re.I)
_V_WINS = re.compile(
    r"(?:response|answer|assistant|output|回答|答案|回复|助手)\s*(?P<v>A|B|1|2)(?![A-Za-z0-9])\s*(?:is\s+|was\s+)?(?:better|wins|superior|preferred|更好|更优|较好|胜出|获胜|胜)"
    r"|(?<![\w])(?P<v2>A|B)\s+(?:is\s+)?(?:better|wins|superior|更好|更优|较好|胜出|获胜)"
    r"|(?:prefer(?:red)?|winner\s+is|better\s+(?:one|response|answer)\s+is|选择|更好的是|胜者是|胜者为|获胜的是)\W{0,6}(?:response|answer|assistant|回答|答案|回复)?\s*(?P<v3>A|B|1|2)(?![\w])",
    re.I,
)
_V_TIE = re.compile(r"\b(?:tie|draw|equally\s+good|equally\s+bad|both\s+(?:are\s+)?(?:equal|equally))\b|平局|平手|不相上下|同样好|一样好|两者相当", re.I)
_V_MAP = {"a": "A", "1": "A", "b": "B", "2": "B", "c": "tie", "tie": "tie", "draw": "tie", "equal": "tie",
          "平局": "tie", "平手": "tie", "相当": "tie"}  # fmt: skip


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from a pairwise judge's reply ("A" = the response shown first), or None when it names no
    winner or names both. The first line is read first, then the whole reply."""
    if not text or not text.strip():
        return None
    t = fold(text)
    m = _V_BRACKET.search(t)
    if m:
        return _V_MAP[m.group(1).lower()]
    start, end = _first_line(t)
    first = re.sub(r"[*_`#>\"'“”「」.。!！]", "", t[start:end]).strip()
    m = _V_ALONE.match(first)
    if m:
        return _V_MAP[m.group("v").lower()]
    for part in (t[start:end], t):
        said = set()
        for w in _V_WINS.finditer(part):
            said.add(_V_MAP[(w.group("v") or w.group("v2") or w.group("v3")).lower()])
        if _V_TIE.search(part):
            said.add("tie")
        if len(said) == 1:
            return said.pop()
        if len(said) > 1:
            return None
    return None


_PAIR_NUM = r"(\d+(?:\.\d+)?)"
_PAIR_BRACKETS = re.compile(rf"\[\[\s*{_PAIR_NUM}\s*[,，;；/ ]\s*{_PAIR_NUM}\s*\]\]")
_PAIR_OF_SCALE = re.compile(r"(?i)\s*(?:/|out\s+of)\s*(\d+)|\s*分")
_PAIR_LINE = re.compile(rf"^[^\w\n]*(?:(?:scores?|ratings?|评分|得分|分数)\s*[:：]?\s*)?{_PAIR_NUM}[^\w\n]{{1,6}}(?:and\s+|和\s*)?{_PAIR_NUM}[^\w\n]*$", re.I)
_PAIR_LABEL = r"(?:answer|response|assistant|output|回答|答案|回复|助手)\s*{which}\s*(?:[:：=]|(?:gets|scores?|得分|得)\s*[:：]?)\s*{num}"


def parse_score_pair(text: str | None, low: float = 1, high: float = 10) -> tuple[float, float] | None:
    """The (first answer's, second answer's) scores a pairwise judge gives on [low, high], or None when the reply
    gives no such pair. Read in order: "[[7, 4]]" anywhere; a first line holding just the two numbers ("7 4",
    "7/10, 4/10", "Scores: 7 and 4"); labels naming each answer ("Answer A: 7", "回答 B：4分"), A/1 first."""
    if not text or not text.strip():
        return None
    t = fold(text)

    def ok(a: str, b: str) -> tuple[float, float] | None:
        x, y = float(a), float(b)
        return (x, y) if low <= x <= high and low <= y <= high else None

    m = _PAIR_BRACKETS.search(t)
    if m:
        return ok(m.group(1), m.group(2))
    start, end = _first_line(t)
    scale = [s for s in _PAIR_OF_SCALE.findall(t[start:end]) if s]
    if all(float(s) == high for s in scale):  # "7/10 4/10": the scale, not a third and fourth number
        line = _PAIR_OF_SCALE.sub("", t[start:end])
        line = re.sub(r"[*_`]", "", line)
        m = _PAIR_LINE.match(line.strip())
        if m:
            return ok(m.group(1), m.group(2))
    got = []
    for which in ("(?:A|1)", "(?:B|2)"):
        rx = re.compile(_PAIR_LABEL.format(which=which, num=_PAIR_NUM) + r"(?![\d.])", re.I)
        lm = rx.search(t)
        if lm is None:
            return None
        got.append(lm.group(1))
    return ok(got[0], got[1])
