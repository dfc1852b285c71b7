"""Spending per backend spec across a run, so `max_cost_usd` bounds what a whole run pays, not one step's call.

Every step builds its own backend objects from the same spec, so a budget cannot live in one object. Backends add
what each answered request cost to a process-wide ledger keyed by where and what they ask (base URL and model);
a backend with `max_cost_usd` sends no new request once its key has spent that much. The runner starts a fresh
ledger at the start of each run (`start_run`), so the budget bounds one `thresher run` / `Pipeline.run`; what
earlier runs spent stays in their manifests. Outside a runner the ledger counts from the process start or the last
`start_run()`. Requests already in flight when the budget is reached still finish (their answers are paid for and
go to the request cache), so a run may overshoot by up to `max_concurrency` requests.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_SPENT: dict[tuple[str, str], float] = {}


def start_run() -> None:
    """Forget what was spent: a new run starts with its whole budget."""
    with _LOCK:
        _SPENT.clear()


def add(key: tuple[str, str], usd: float) -> None:
    if usd:
        with _LOCK:
            _SPENT[key] = _SPENT.get(key, 0.0) + usd


def spent(key: tuple[str, str]) -> float:
    with _LOCK:
        return _SPENT.get(key, 0.0)
