"""`ServingLoop`: LitServe's batched loop, fed by a receiver thread that blocks on the request queue.

LitServe's own batch collector polls the request queue every millisecond, even when no request comes (13-17% of a
core on an idle server). Here one thread blocks on the queue (one wake-up a second when idle) and hands each request
to the inference thread through a local queue; on the way it tells the store which tasks are coming
(`AdapterStore.prefetch`), so a cold adapter is read and checked while the batch before it runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop

IDLE_WAIT = 1.0  # seconds a blocking get waits before it looks again (the only cost of an idle worker)


class ServingLoop(BatchedLoop):
    """Batches of at most ``max_batch_size`` requests, gathered for at most ``batch_timeout`` after the first one."""

    def __init__(self) -> None:
        """Nothing runs until the worker's first `get_batch_requests` (the loop is pickled into the worker)."""
        super().__init__()
        self._local: queue.Queue | None = None

    def _receive(self, request_queue: Any, announce: Callable[[Any], None] | None) -> None:
        """Move requests from LitServe's (inter-process) queue to the local one, announcing each."""
        while True:
            try:
                item = request_queue.get(timeout=IDLE_WAIT)
            except queue.Empty:
                continue
            except (EOFError, OSError, BrokenPipeError):  # the manager is gone: the server is stopping
                self._local.put(_SENTINEL_VALUE)
                return
            self._local.put(item)
            if item == _SENTINEL_VALUE:
                return
            if announce is not None:
                try:
                    announce(item[3])
                except Exception:  # noqa: BLE001 - a prefetch hint must never lose a request
                    pass

    def get_batch_requests(self, lit_api: Any, request_queue: Any, transport: Any) -> tuple[list, list]:
        """Block for the first request, then gather until the batch is full or ``batch_timeout`` has passed."""
        if self._local is None:
            self._local = queue.Queue()
            # ``announce(payload)``: the API's hint of what a request will need, given as it arrives
            threading.Thread(target=self._receive, args=(request_queue, getattr(lit_api, "announce", None)),
                             name="mtl-receiver", daemon=True).start()
        items = [self._local.get()]
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(items) < lit_api.max_batch_size and items[-1] != _SENTINEL_VALUE:
            try:
                items.append(self._local.get(timeout=max(0.0, deadline - time.monotonic()))
                             if lit_api.batch_timeout > 0 else self._local.get_nowait())
            except queue.Empty:
                break
        payloads, timed_out = [], []
        limit = lit_api.request_timeout
        for item in items:
            if item == _SENTINEL_VALUE:
                if not payloads and not timed_out:
                    raise _StopLoopError()
                self._local.put(item)  # answer what was gathered, stop at the next call
                break
            response_queue_id, uid, submitted, payload = item
            if limit not in (-1, False, None) and time.monotonic() - submitted > limit:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, payload))
        return payloads, timed_out
