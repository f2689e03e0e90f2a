"""Run a teacher over many images, in worker processes, into a teacher cache (resumable).

An image is named by a *source*: ``("file", path)`` or ``("rec", rec_path, index)`` (a ``.rec``
record's encoded image). An item pairs the source whose bytes key the cache (what the trainer
reads) with the source the teacher sees (often the same; for a photo teacher on an aligned pool,
the original photo the crop was cut from).

Worker processes are spawned (not forked: onnxruntime and torch thread pools do not survive a
fork), each builds its own teacher from ``(name, kwargs)`` and uses one thread; only the parent
writes the cache.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from facerec.teachers.cache import CacheWriter, TeacherCache, content_hash

Source = tuple


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    kwargs: dict

    def build(self):
        from facerec.teachers import create_teacher

        return create_teacher(self.name, **self.kwargs)


_READERS: dict[str, object] = {}


def read_bytes(source: Source) -> bytes:
    kind = source[0]
    if kind == "file":
        with open(source[1], "rb") as f:
            return f.read()
    if kind == "rec":
        from facerec.data.recordio import FaceRecReader

        reader = _READERS.get(source[1])
        if reader is None:
            reader = _READERS[source[1]] = FaceRecReader(source[1])
        return reader.read_raw(int(source[2]))[0]
    raise ValueError(f"unknown image source {source!r}")


def decode(data: bytes) -> np.ndarray | None:
    """RGB uint8 (H, W, 3), or None for bytes that are not a decodable image."""
    from facerec.data.align import ensure_three_channels
    from facerec.data.image_io import ImageDecodeError, load_image

    try:
        return ensure_three_channels(load_image(data))
    except ImageDecodeError:
        return None


def one_thread() -> None:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


_TEACHER = None


def _init_worker(spec: TeacherSpec) -> None:
    global _TEACHER
    one_thread()
    _TEACHER = spec.build()


def _embed_sources(teacher, sources: Sequence[Source]) -> np.ndarray:
    images = [decode(read_bytes(s)) for s in sources]
    ok = [i for i, im in enumerate(images) if im is not None]
    out = np.full((len(sources), teacher.embedding_size), np.nan, np.float32)
    if ok:
        out[ok] = teacher.embed([images[i] for i in ok])
    return out


def _work(job: tuple[int, list[Source]]) -> tuple[int, np.ndarray]:
    start, sources = job
    return start, _embed_sources(_TEACHER, sources)


def embed_all(spec: TeacherSpec, sources: Sequence[Source], workers: int = 1, batch_size: int = 16,
              teacher=None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first index, embeddings) per batch of ``sources``, in completion order.

    ``workers`` <= 1 runs in this process (with ``teacher`` if given, else ``spec.build()``).
    """
    jobs = [(i, list(sources[i : i + batch_size])) for i in range(0, len(sources), batch_size)]
    if workers <= 1:  # this process's thread settings are the caller's (the CLI sets one thread)
        teacher = teacher or spec.build()
        for start, batch in jobs:
            yield start, _embed_sources(teacher, batch)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        yield from pool.imap_unordered(_work, jobs)


@dataclass
class TeachSummary:
    teacher_id: str
    items: int  # items asked for
    unique: int  # distinct image contents among them
    cached: int  # already in the cache before this run
    computed: int  # computed by this run
    no_face: int  # of those, the teacher found no face (recorded, not retried)
    seconds: float

    def line(self) -> str:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return (f"teacher {self.teacher_id}: {self.items:,} images ({self.unique:,} distinct), "
                f"{self.cached:,} already cached, {self.computed:,} computed ({self.no_face:,} without "
                f"a face) in {self.seconds:.1f} s ({rate:.1f} images/s)")


def teach(spec: TeacherSpec, items: Sequence[tuple[Source, Source]], out: str | os.PathLike,
          workers: int = 1, batch_size: int = 16, stop_after: int | None = None,
          progress: bool = True, teacher=None) -> TeachSummary:
    """Compute the teacher's embeddings of ``items`` ((key source, teacher source) pairs) into
    the cache at ``out``, skipping every image content already there. ``stop_after`` ends the run
    after that many new images (whole batches), as an interruption would."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    teacher = teacher or spec.build()
    writer = CacheWriter(out, teacher.teacher_id, teacher.embedding_size, teacher.describe())
    known = TeacherCache(out).keys()
    todo_keys: list[str] = []
    todo_sources: list[Source] = []
    seen: set[str] = set()
    for key_source, teacher_source in items:
        key = content_hash(read_bytes(key_source))
        if key in seen:
            continue
        seen.add(key)
        if key not in known:
            todo_keys.append(key)
            todo_sources.append(teacher_source)
    if stop_after is not None:
        limit = -(-int(stop_after) // batch_size) * batch_size
        todo_keys, todo_sources = todo_keys[:limit], todo_sources[:limit]
    no_face = 0
    bar = tqdm(total=len(todo_keys), disable=not progress, unit="img", desc="teach", smoothing=0.1)
    try:
        with writer:
            for start, emb in embed_all(spec, todo_sources, workers, batch_size,
                                        teacher=teacher if workers <= 1 else None):
                writer.add(todo_keys[start : start + len(emb)], emb)
                no_face += int((~np.isfinite(emb).all(axis=1)).sum())
                bar.update(len(emb))
    finally:
        bar.close()
    return TeachSummary(teacher.teacher_id, len(items), len(seen), len(seen & known), writer.written,
                        no_face, time.perf_counter() - t0)
