"""Overlap producing the next piece of work with consuming the current one.

Used where the producer releases the GIL: tokenizing the next chunk of texts (Rust tokenizer) while the model runs
on the current one.
"""

from __future__ import annotations

import queue
import threading


def prefetch(make, items, depth: int = 4, name: str = "prefetch"):
    """Yield ``(item, make(item))`` for each item, ``make`` running ahead in a background thread. Errors are
    re-raised in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, make(item)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((done, exc))
            return
        q.put((done, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, value = q.get()
            if item is done:
                if value is not None:
                    raise value
                return
            yield item, value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
