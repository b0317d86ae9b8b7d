"""Batches prepared one step ahead in a background thread (docs/DESIGN.md §5).

With the images in the decoded-image cache, the loader runs in the main process: gathering a batch and copying
it into pinned memory (DataLoader's pin_memory, on CUDA) would otherwise sit between two GPU steps. `prefetched`
iterates the loader in a thread, `depth` batches ahead, so those copies overlap the step; the batches and their
order are the loader's own (the shuffle is drawn when the thread starts the loader's iterator, as it would be in
the main thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(loader: Iterable, depth: int = 2) -> Iterator[Any]:
    """The items of `loader`, produced by a background thread up to `depth` ahead; an exception raised while
    loading is raised here, at the item it stopped at. Leaving the loop early stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in loader:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
            return
        put(_END)

    worker = threading.Thread(target=produce, name="lora-cls-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
