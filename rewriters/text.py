"""Text units shared by the rewriters: the token count of the checks and of "keep the longest", and passage sizes.

A token here is a run of letters or digits (with inner apostrophes), or one CJK character: a tokenizer-free count
that treats English and Chinese alike and needs no model, so the checks give the same answer on every backend.
"""

from __future__ import annotations

import re

_CJK_CLASS = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af\U00020000-\U0002ffff"
CJK = re.compile(f"[{_CJK_CLASS}]")
#: one token: a CJK character, or a run of other letters/digits
TOKEN = re.compile(f"[{_CJK_CLASS}]|(?:(?![{_CJK_CLASS}])[^\\W_])+(?:['’](?:(?![{_CJK_CLASS}])[^\\W_])+)*")


def tokens(text: str | None) -> list[str]:
    """The tokens of `text` (see the module docstring)."""
    return TOKEN.findall(text or "")


def count_tokens(text: str | None) -> int:
    """How many tokens `text` has."""
    return len(TOKEN.findall(text or ""))
