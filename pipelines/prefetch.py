"""Prefetch: produce the next items of an iterator on a background thread while the caller works on this one.

Used where the producer's work releases the GIL (Parquet decoding, Arrow compute, pinning tensors), so on two or
more cores reading and computing overlap. The queue is bounded (`depth`), so memory stays bounded; an exception in
the producer is raised in the consumer; closing the consumer early stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")

_DONE = object()


def prefetch(
    items: Iterable[T], depth: int = 2, prepare: Callable[[T], U] | None = None, name: str = "thresher-prefetch"
) -> Generator[Any, None, None]:
    """Yield `prepare(item)` (or the item) for each item, computed up to `depth` items ahead on a thread."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(prepare(item) if prepare is not None else item):
                    return
            put(_DONE)
        except BaseException as e:  # surfaced to the consumer, not lost in the thread
            put(e)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
