"""The batch phase of a step whose backend runs in Batch API mode (`thresher.llms.batch.OpenAIBatch`): all of the
step's requests go out as a few large batch jobs before the step runs, instead of one job per row batch.

How: the step runs over its whole (remaining) input with its batch backends *collecting*: answers in the request
cache are used, every other request is queued and its row fails with a placeholder; the outputs are thrown away.
The queued requests are submitted as batch jobs and waited for, and their answers land in the request cache. The
step runs again: rows whose first request is answered now ask their next one (a judge after a rewrite, a re-ask of
invalid JSON), which is queued in turn. When a pass queues nothing, the phase ends, the step's counters restart
(`ModelStep.begin_again`; the batch usage and cost stay), and the runner runs the step for real, batch by batch and
committed as always, with every answer a cache hit. A pass costs a cache read per request, no model call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def batch_backends(step: Any) -> list[Any]:
    """The step's live backends in Batch API mode (none for a step without models)."""
    from thresher.llms.batch import OpenAIBatch

    distinct = getattr(step, "_distinct", None)
    if not callable(distinct) or getattr(step, "backends_", None) is None:
        return []
    return [b for b in distinct() if isinstance(b, OpenAIBatch)]


def run_batch_phase(step: Any, name: str, run_once: Callable[[], Any], say: Callable[[str], None] | None = None) -> int:
    """Collect, submit and wait until `run_once()` (the step over its input, results discarded) queues nothing.
    Returns the number of collecting passes that queued requests (0: nothing was sent as a batch)."""
    from thresher.llms.batch import MAX_STAGES, Collector, restore_usage, too_many_stages

    backends = batch_backends(step)
    if not backends:
        return 0
    stages = 0
    while True:
        collectors = {id(b): Collector() for b in backends}
        before = {id(b): b.usage.copy() for b in backends}
        for b in backends:
            b.collector_ = collectors[id(b)]
        try:
            run_once()
        finally:
            for b in backends:
                b.collector_ = None
                restore_usage(b.usage, before[id(b)])  # a collecting pass sends nothing and counts nothing
        queued = [(b, collectors[id(b)]) for b in backends if collectors[id(b)].pending]
        if not queued:
            break
        stages += 1
        if stages > MAX_STAGES:
            raise too_many_stages(queued[0][0])
        for b, col in queued:
            if say is not None:
                say(f"{name}: {len(col.pending)} request(s) to the Batch API of {b.resolved_base_url} (stage {stages})")
            b.load()
            assert b._client is not None
            b._client.loop_thread.run(b.submit_and_wait(col))
    if stages:
        begin_again = getattr(step, "begin_again", None)
        if callable(begin_again):
            begin_again()
    return stages



def drain_rows(step: Any, name: str, batches: Iterable[Any]) -> None:
    """A row step over `batches`, its outputs thrown away (a collecting pass keeps only what its backends queued)."""
    from thresher.pipelines.execute import apply_row_step

    for batch in batches:
        apply_row_step(step, name, batch)
