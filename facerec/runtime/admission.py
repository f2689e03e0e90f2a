"""Per-image admission by size: large images cannot take the CPU side of the service from small ones.

Decoding and detecting run in a thread pool. When every image shares one pool, a batch of eight
36 MP photos fills it, and a two-image verify that arrives next waits for all of them (issue 16:
107 s). Counting requests does not help: that batch is one request. So images are admitted by
their pixel count, read from the header before any decoding:

- an image of at most ``large_pixels`` runs in the shared pool (``small_executor``), as before;
- a larger one runs in a pool of its own with ``large_workers`` threads. However many large images
  arrive, they hold at most those threads (and, since a large image is bounded by the pixel limit,
  at most ``large_workers`` x its decode memory); small images never queue behind them;
- at most ``max_queued`` large images wait for those threads; beyond that the image is refused at
  once with :class:`LargeImagesOverloaded` (a 429 with ``Retry-After`` in the service), before any
  work, instead of queueing without limit.

The lane only schedules; the work per image is bounded by the pipeline (a detection copy of at
most ``detect_max_side`` pixels, reduced JPEG decoding), so a large image costs about a second.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from facerec.runtime.batcher import Overloaded


class LargeImagesOverloaded(Overloaded):
    """Too many large images are being processed or wait; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float, inflight: int, limit: int, large_pixels: int) -> None:
        RuntimeError.__init__(
            self,
            f"too many large images in progress ({inflight} of {limit} images over "
            f"{large_pixels} pixels); retry in {retry_after_s:.2f} s",
        )
        self.retry_after_s = retry_after_s
        self.pending = inflight
        self.limit = limit


def pixel_count(data) -> int | None:
    """Pixels of an RGB array, or of encoded bytes from their header; None when unknown (the
    pipeline then refuses the input itself, in microseconds). Runs on the event loop: every header
    parser reads a bounded part of the input (milliseconds at most, even for 100 MB of junk)."""
    if isinstance(data, np.ndarray):
        return int(data.shape[0] * data.shape[1]) if data.ndim >= 2 else None
    if isinstance(data, (bytes, bytearray, memoryview)):
        from facerec.data.image_headers import HeaderError, read_header

        try:
            return read_header(data if isinstance(data, bytes) else bytes(data)).pixels
        except HeaderError:
            return None
    return None


class ImageAdmission:
    def __init__(
        self,
        small_executor: Executor | None,
        large_pixels: int,
        large_workers: int,
        max_queued: int,
    ) -> None:
        if large_pixels < 1 or large_workers < 1 or max_queued < 0:
            raise ValueError("large_pixels and large_workers must be >= 1, max_queued >= 0")
        self.small_executor = small_executor
        self.large_executor = ThreadPoolExecutor(large_workers, thread_name_prefix="facerec-large")
        self.large_pixels = large_pixels
        self.large_workers = large_workers
        self.max_queued = max_queued
        self.large_inflight = 0  # running or waiting for a large-image thread
        self._seconds = 1.0  # moving average of one large image's time, for Retry-After

    @property
    def limit(self) -> int:
        return self.large_workers + self.max_queued

    def is_large(self, data) -> bool:
        pixels = pixel_count(data)
        return pixels is not None and pixels > self.large_pixels

    @contextlib.asynccontextmanager
    async def admit(self, data) -> AsyncIterator[Executor | None]:
        """The executor to decode and detect ``data`` in; raises LargeImagesOverloaded at once
        when the large-image lane is full. Used from one event loop (no lock needed)."""
        if not self.is_large(data):
            yield self.small_executor
            return
        if self.large_inflight >= self.limit:
            ahead = (self.large_inflight - self.large_workers) / self.large_workers + 1
            raise LargeImagesOverloaded(ahead * self._seconds, self.large_inflight, self.limit,
                                        self.large_pixels)
        waves = self.large_inflight // self.large_workers + 1  # rounds of work up to this image's
        self.large_inflight += 1
        start = time.perf_counter()
        try:
            yield self.large_executor
        finally:
            self.large_inflight -= 1
            # Time in the lane includes the wait for the images ahead; per round it is one image's.
            self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start) / waves

    def shutdown(self) -> None:
        self.large_executor.shutdown(wait=False)
