"""Repairs: the named fixes a reader may make to a conversation that breaks the turn rules, as real exports do.

A conversation reads as an optional system turn, then user and assistant turns alternating, starting with a user
turn. Real ShareGPT dumps often break that: a conversation opens with the assistant's greeting, a user sent two
messages in a row, a turn is empty. Without a repair such a conversation is a bad record (fail, skip or
quarantine, as the reader was told). Each repair has a name, is off unless asked for, runs in the fixed order of
`REPAIRS` whatever order it was asked in, and is recorded on the row it changed (the `repairs` column) and counted
per kind in the read report, so a repaired row can always be found again.

- drop_empty_turns: drop turns whose content is missing, null or only whitespace.
- drop_leading_assistant: drop assistant turns before the first user turn (after the system turn, if any).
- merge_same_role: join consecutive turns of one role into one turn, their contents separated by a blank line
  ("\\n\\n").
- drop_trailing_user: drop the user turn(s) a conversation ends on when it has an answered exchange before them
  (a trailing question has no answer to train on). A conversation that is a single question stays one: it is a
  prompt whose answer is still to come (`output` null). Never applied to a prompt/completion prompt.

Presets: "none" (the default), "safe" (the first three: they keep every word of the conversation that can be kept
and only fix its shape) and "all".
"""

from __future__ import annotations

from collections.abc import Iterable

from thresher.errors import ConfigError

#: Every repair, in the order a reader applies them.
REPAIRS: tuple[str, ...] = ("drop_empty_turns", "drop_leading_assistant", "merge_same_role", "drop_trailing_user")

#: Named sets of repairs.
REPAIR_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "safe": ("drop_empty_turns", "drop_leading_assistant", "merge_same_role"),
    "all": REPAIRS,
}

#: The readers' default: a conversation is read as written, or is a bad record that names the repair that fixes it.
DEFAULT_REPAIR = "none"

#: Extra column of a conversation read with repairs on: the repairs made to that row (empty when none).
REPAIRS_COLUMN = "repairs"

#: What merge_same_role puts between the contents of the turns it joins.
MERGE_SEPARATOR = "\n\n"

#: A turn as the reader sees it: (its index in the row's list of turns, user|assistant|system, content or None).
Turn = tuple[int, str, str | None]


def normalize_repair(repair: str | Iterable[str] | None) -> frozenset[str]:
    """The set of repairs `repair` asks for: a preset ("none", "safe", "all"), a repair name, a comma-separated
    string of them, or a list of them. None is "none". Raises ConfigError listing the valid choices."""
    if repair is None:
        return frozenset()
    items = repair.split(",") if isinstance(repair, str) else list(repair)
    out: set[str] = set()
    for item in items:
        name = item.strip() if isinstance(item, str) else item
        if name in REPAIR_PRESETS:
            out.update(REPAIR_PRESETS[name])
        elif name in REPAIRS:
            out.add(name)
        else:
            raise ConfigError(
                f"unknown repair {name!r}; valid choices: the presets {', '.join(REPAIR_PRESETS)} or a list of "
                f"{', '.join(REPAIRS)}"
            )
    return frozenset(out)


def _empty(content: str | None) -> bool:
    return content is None or not content.strip()


def repair_turns(
    turns: list[Turn], repairs: frozenset[str], *, prompt_only: bool = False
) -> tuple[list[Turn], list[str]]:
    """The turns with the asked-for repairs made, and the names of those that changed something (in REPAIRS order).

    prompt_only: the turns are a prompt that must end on a user turn (prompt/completion), so drop_trailing_user
    does not apply. A merged turn keeps the index of its first part, so errors still point into the row.
    """
    done: list[str] = []
    if "drop_empty_turns" in repairs:
        kept = [t for t in turns if not _empty(t[2])]
        if len(kept) != len(turns):
            turns = kept
            done.append("drop_empty_turns")
    if "drop_leading_assistant" in repairs:
        start = 1 if turns and turns[0][1] == "system" else 0
        end = start
        while end < len(turns) and turns[end][1] == "assistant":
            end += 1
        if end > start:
            turns = turns[:start] + turns[end:]
            done.append("drop_leading_assistant")
    if "merge_same_role" in repairs:
        merged: list[Turn] = []
        for t in turns:
            if merged and merged[-1][1] == t[1]:
                j, kind, content = merged[-1]
                merged[-1] = (j, kind, MERGE_SEPARATOR.join(c for c in (content, t[2]) if c is not None))
            else:
                merged.append(t)
        if len(merged) != len(turns):
            turns = merged
            done.append("merge_same_role")
    if "drop_trailing_user" in repairs and not prompt_only:
        end = len(turns)
        while end and turns[end - 1][1] == "user":
            end -= 1
        answered = any(t[1] == "assistant" for t in turns[:end]) and any(t[1] == "user" for t in turns[:end])
        if end < len(turns) and answered:
            turns = turns[:end]
            done.append("drop_trailing_user")
    return turns, done
