"""An asyncio micro-batcher: many concurrent requests, one model call per batch.

Semantics follow Triton's dynamic batcher / Ray's ``@serve.batch`` so that moving to either later is
mechanical: a batch runs as soon as it holds ``max_batch_size`` faces, or ``max_wait_ms`` after its
first face arrived, whichever comes first. While a batch runs (in a worker thread, so the event loop
keeps accepting requests), the next one fills up, which is where batching pays off under load.

Admission control lives here, in the engine, not in the web layer: ``max_pending`` bounds the faces
admitted and not yet answered (queued or running). A request that would exceed it is refused at
once with :class:`Overloaded`, carrying an estimate of when to retry (the service answers 429 with
``Retry-After``), instead of queueing until clients time out.

A failed batch fails every request that had a face in it, with the backend's exception. Requests
whose caller went away (cancelled) are dropped from the queue before they cost a model call.

Use from one event loop: ``submit`` is a plain function that enqueues synchronously and returns a
future (so callers and tests know the request is queued when it returns); ``run`` awaits it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# One lock per backend object: two batchers sharing a backend still run it one batch at a time.
_BACKEND_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _backend_lock(backend) -> threading.Lock:
    with _LOCKS_GUARD:
        try:
            return _BACKEND_LOCKS.setdefault(backend, threading.Lock())
        except TypeError:  # not weak-referenceable: a private lock is the best we can do
            return threading.Lock()


class Overloaded(RuntimeError):
    """``pending`` of ``limit`` units of work are admitted already (by default faces in the
    batcher; ``what`` names the limit that was hit); retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float, pending: int, limit: int,
                 what: str = "inference queue full", unit: str = "faces pending") -> None:
        super().__init__(f"{what} ({pending} of {limit} {unit}); retry in {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s
        self.pending = pending
        self.limit = limit


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more requests."""


@dataclass
class BatchInfo:
    """Handed to ``on_batch`` after every batch (for metrics: batch size, queue time, run time)."""

    size: int
    requests: int
    queue_wait_s: list[float]
    run_s: float
    error: BaseException | None = None


@dataclass
class _Request:
    future: asyncio.Future
    size: int
    results: list = field(default_factory=list)
    remaining: int = 0


@dataclass
class _Item:
    request: _Request
    index: int
    face: np.ndarray
    enqueued: float


class MicroBatcher:
    def __init__(
        self,
        backend,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_pending: int = 256,
        on_batch: Callable[[BatchInfo], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_pending < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_pending must be >= 1, max_wait_ms >= 0")
        self.backend = backend
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_pending = int(max_pending)
        self.on_batch = on_batch
        self.input_size = int(backend.contract.input_size)
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending = 0
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facerec-batch")
        self._lock = _backend_lock(backend)
        self._batch_s: float | None = None  # moving average of a batch's run time
        self._running: list[_Item] = []

    # ------------------------------------------------------------------ public
    @property
    def pending(self) -> int:
        """Faces admitted and not yet answered (queued or in the running batch)."""
        return self._pending

    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained by one batch's worth (1 s before any data)."""
        if self._batch_s is None:
            return 1.0
        batches = math.ceil(self._pending / self.max_batch_size)
        return float(min(60.0, max(0.05, batches * self._batch_s)))

    def submit(self, faces: np.ndarray) -> asyncio.Future:
        """Queue one face (S, S, 3) / (3, S, S) or several (k, ...); the future resolves to a dict of
        arrays with a leading axis of k (1 for a single face). Raises Overloaded / BatcherClosed."""
        if self._closed:
            raise BatcherClosed("the batcher is shut down")
        items = self._split(faces)
        k = len(items)
        if k > self.max_pending:
            raise ValueError(f"a request of {k} faces exceeds the queue limit of {self.max_pending}")
        if self._pending + k > self.max_pending:
            raise Overloaded(self.retry_after(), self._pending, self.max_pending)
        loop = asyncio.get_running_loop()
        self._start(loop)
        request = _Request(loop.create_future(), k, [None] * k, k)
        self._pending += k
        request.future.add_done_callback(lambda _f: self._release(k))  # result, error or cancel
        now = time.perf_counter()
        self._queue.extend(_Item(request, i, face, now) for i, face in enumerate(items))
        self._wakeup.set()
        return request.future

    async def run(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        return await self.submit(faces)

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests; answer the queued ones (``drain``) or fail them with BatcherClosed."""
        self._closed = True
        if not drain:
            self._fail_queued(BatcherClosed("the batcher shut down before this request ran"))
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=False)  # the loop awaited its last batch: nothing is running

    async def __aenter__(self) -> MicroBatcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals
    def _split(self, faces) -> list[np.ndarray]:
        a = np.asarray(faces)
        s = self.input_size
        crops = a.dtype == np.uint8 and a.shape[-3:] == (s, s, 3)
        tensors = a.dtype.kind == "f" and a.shape[-3:] == (3, s, s)
        if crops or tensors:
            if a.ndim == 3:
                return [a]
            if a.ndim == 4 and len(a) > 0:
                return list(a)
        raise ValueError(
            f"expected aligned uint8 crop(s) (k, {s}, {s}, 3) or normalised float (k, 3, {s}, {s}), "
            f"got {a.dtype} {a.shape}"
        )

    def _release(self, k: int) -> None:
        self._pending -= k

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="facerec-micro-batcher")

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            future = self._queue.popleft().request.future
            if not future.done():
                future.set_exception(exc)

    async def _collect(self) -> list[_Item] | None:
        """Wait for the first face, then up to ``max_wait`` for the batch to fill; None at shutdown."""
        while not self._queue:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self._queue) < self.max_batch_size and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if not item.request.future.done():  # cancelled by its caller, or failed already
                batch.append(item)
        return batch

    def _call_backend(self, faces: list[np.ndarray]) -> dict[str, np.ndarray]:
        if all(f.dtype == np.uint8 for f in faces):
            stacked = np.stack(faces)
        else:  # mixed input kinds: bring the uint8 crops to the normalised float form
            from facerec.runtime.backends import to_model_input

            stacked = np.concatenate([to_model_input(f[None], self.input_size) for f in faces])
        with self._lock:
            outputs = self.backend.run(stacked)
        for name, value in outputs.items():
            if len(value) != len(faces):
                raise RuntimeError(f"backend returned {len(value)} rows of {name!r} for {len(faces)} faces")
        return outputs

    def _deliver(self, batch: list[_Item], outputs: dict[str, np.ndarray]) -> None:
        for row, item in enumerate(batch):
            request = item.request
            if request.future.done():
                continue
            request.results[item.index] = {n: v[row] for n, v in outputs.items()}
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result({n: np.stack([r[n] for r in request.results]) for n in outputs})

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await self._collect()
                if batch is None:
                    return
                if not batch:
                    continue
                self._running = batch
                start = time.perf_counter()
                waits = [start - item.enqueued for item in batch]
                error: BaseException | None = None
                try:
                    outputs = await loop.run_in_executor(
                        self._executor, self._call_backend, [i.face for i in batch]
                    )
                except Exception as exc:  # noqa: BLE001 - handed to every waiter of this batch
                    error = exc
                    for item in batch:
                        if not item.request.future.done():
                            item.request.future.set_exception(exc)
                else:
                    self._deliver(batch, outputs)
                self._running = []
                run_s = time.perf_counter() - start
                self._batch_s = run_s if self._batch_s is None else 0.8 * self._batch_s + 0.2 * run_s
                self._report(BatchInfo(len(batch), len({id(i.request) for i in batch}), waits, run_s, error))
        finally:  # normally empty; not so when the task is cancelled (event loop shutting down)
            self._closed = True
            self._queue.extendleft(reversed(self._running))
            self._fail_queued(BatcherClosed("the batcher stopped"))

    def _report(self, info: BatchInfo) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(info)
        except Exception:  # a metrics hook must not break inference
            log.exception("on_batch hook failed")
