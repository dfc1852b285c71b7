"""Row -> chat messages: the one mapping from an alpaca-layout record to a conversation.

Respond (what a model is asked), the trainer (what it learns from), the conversation writers (what other trainers
read) and the log-probability scorers (IFD, DEITA) all build a row's turns here, so they never disagree. The rule:

- `system` null, empty or only whitespace: no system message (a step's default `system_prompt` may stand in; the
  chat template may still write its own default system turn, as LLaMA-Factory's templates do for an empty system);
  any other `system` is the first message, as is.
- `history`: (user, assistant) pairs before the last turn, in order.
- the last user turn is LLaMA-Factory's alpaca join: the non-empty ones of instruction and input, joined by "\n"
  (so instruction + "\n" + input, or the instruction alone when input is empty).
- `output`, when given (not null), is the final assistant message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def system_text(system: Any, system_prompt: str | None = None) -> str | None:
    """The system message's content for a row's `system`, or None for no system message.

    A null, empty or whitespace-only `system` counts as none; `system_prompt` (a step's default) then stands in,
    under the same rule.
    """
    for candidate in (system, system_prompt):
        text = _text(candidate)
        if text.strip():
            return text
    return None


def user_text(instruction: Any, input: Any = None) -> str:
    """The last user turn: instruction and a non-empty input joined by a newline (LLaMA-Factory's alpaca join)."""
    return "\n".join(part for part in (_text(instruction), _text(input)) if part)


def history_pairs(history: Any) -> list[tuple[str, str]]:
    """`history` as (user, assistant) pairs; a pair may also be a mapping with user/assistant (or "0"/"1") keys."""
    pairs = []
    for turn in history or ():
        if isinstance(turn, Mapping):
            turn = [turn.get("user", turn.get("0")), turn.get("assistant", turn.get("1"))]
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise ValueError(f"history turns must be [user, assistant] pairs, got {turn!r}")
        pairs.append((_text(turn[0]), _text(turn[1])))
    return pairs


def row_messages(
    instruction: Any,
    input: Any = None,
    system: Any = None,
    history: Any = None,
    *,
    output: Any = None,
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """The chat messages of one alpaca-layout row: [system], history turns, the user turn, [output].

    The conversation ends on the user turn when `output` is None (what a model is asked to answer) and on the
    assistant turn otherwise (what a trainer learns from). Raises ValueError for a malformed history.
    """
    messages: list[dict[str, str]] = []
    sys_text = system_text(system, system_prompt)
    if sys_text is not None:
        messages.append({"role": "system", "content": sys_text})
    for user, assistant in history_pairs(history):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": user_text(instruction, input)})
    if output is not None:
        messages.append({"role": "assistant", "content": _text(output)})
    return messages


def record_messages(
    row: Mapping[str, Any], *, with_output: bool = True, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """`row_messages` of a record given as a mapping (missing columns count as null)."""
    return row_messages(
        row.get("instruction"),
        row.get("input"),
        row.get("system"),
        row.get("history"),
        output=row.get("output") if with_output else None,
        system_prompt=system_prompt,
    )
