"""The SQLite backend's in-process indexes, one per gallery, kept in step with the database.

Each gallery's index is held with the gallery generation it reflects. A search first reads the
generation (one indexed row): when it differs (another process wrote), the index is brought up to
date before searching; this process's own writes are applied directly (``after_write``).

Which index: :class:`~facerec.gallery.ann.IndexPolicy`. Below ``min_samples`` (or without faiss,
or ``kind="exact"``) the exact index; from there on the approximate one
(:class:`~facerec.gallery.ann.ApproxIndex`), which is

- loaded from its file beside the database (:mod:`facerec.gallery.ann_file`) when there is one,
  and reconciled with the database when the file is older (samples added since are added, samples
  gone are dropped); built from the database when there is none, then saved;
- built in a background thread when enrollments carry an exact index past ``min_samples``, or
  when deletions leave ``rebuild_dead_fraction`` of an approximate index's labels dead (or, for a
  gallery that started small, when it has doubled since its quantiser was trained); searches use
  the current index meanwhile and the new one replaces it when it is ready (with the writes made
  during the build applied first); its recall is measured again (and its ``ef_search`` chosen
  again) when the gallery has grown by half. :meth:`IndexCache.wait` waits for these threads;
- saved after a build or a reconcile, and at :meth:`IndexCache.close` when it is current;
  deletions are scrubbed from the file at once (:func:`~facerec.gallery.ann_file.scrub`).

A save first drops, under the file's lock, every sample the database no longer holds, and a
deletion scrubs the file under the same lock after its commit: whichever comes first, a deleted
sample's vectors do not stay in the file.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol


from facerec.gallery import ann_file
from facerec.gallery.ann import ApproxIndex
from facerec.gallery.ann_policy import IndexPolicy, build_threads
from facerec.gallery.index import ExactIndex

log = logging.getLogger("facerec.gallery")

STALE = -1  # an approximate index whose gallery changed elsewhere: reconcile before use
CHUNK = 20_000


def _add_all(index: ApproxIndex, chunks) -> None:
    """Add (sample ids, person ids, vectors) chunks to a new ``index``, recording the build's wall
    and CPU seconds (the process's: other threads' work during the build counts too)."""
    wall = cpu = 0.0
    for sids, pids, vecs in chunks:
        t, c = time.perf_counter(), time.process_time()
        index.add(sids, pids, vecs)
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
    index.build = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "threads": build_threads()}


class Source(Protocol):
    """What the cache reads from the database (each call is one read snapshot)."""

    def gallery_state(self, gallery_id: str) -> tuple[int, int, int]:
        """(generation, samples, embedding size); NotFound when there is no such gallery."""

    def live_samples(self, gallery_id: str) -> tuple[int, dict[str, str]]:
        """(generation, {sample id: person id}) of the gallery."""

    def sample_rows(self, gallery_id: str, sample_ids: list[str] | None = None):
        """Yield (generation, sample ids, person ids, vectors) chunks: all samples, or these."""


class IndexCache:
    def __init__(self, db_path: str | Path, policy: IndexPolicy, source: Source) -> None:
        self.db_path = Path(db_path)
        self.policy = policy
        self.source = source
        self._entries: dict[str, tuple[int, ExactIndex | ApproxIndex]] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._builds: dict[str, threading.Thread] = {}
        self._warned = False

    def path(self, gallery_id: str) -> Path:
        return ann_file.ann_path(self.db_path, gallery_id)

    # ------------------------------------------------------------------ reading
    def get(self, gallery_id: str):
        """The gallery's index, at the database's generation."""
        generation, samples, dim = self.source.gallery_state(gallery_id)
        with self._lock:
            cached = self._entries.get(gallery_id)
            if cached is not None and cached[0] == generation:
                return cached[1]
            lock = self._load_locks.setdefault(gallery_id, threading.Lock())
        with lock:  # one loader per gallery; the others wait for its result
            with self._lock:
                cached = self._entries.get(gallery_id)
                if cached is not None and cached[0] >= generation:
                    return cached[1]
            stale = cached[1] if cached is not None and isinstance(cached[1], ApproxIndex) else None
            gen, index = self._load(gallery_id, dim, samples, stale)
            with self._lock:
                current = self._entries.get(gallery_id)
                if current is None or current[0] < gen:
                    self._entries[gallery_id] = (gen, index)
            return index

    def _load(self, gallery_id: str, dim: int, samples: int, stale: ApproxIndex | None):
        if stale is not None:
            return self._reconcile(gallery_id, stale), stale
        if not self.policy.approximate(samples):
            if self.policy.kind == "auto" and samples >= self.policy.min_samples and not self._warned:
                self._warned = True
                log.warning("gallery %s has %d samples: searched exactly, faiss is not installed "
                            "(pip install 'facerec[search]' for the approximate index)", gallery_id, samples)
            return self._load_exact(gallery_id, dim, samples)
        path = self.path(gallery_id)
        with ann_file.locked(path):
            loaded = ann_file.load(path, self.policy)
        if loaded is not None and loaded[0]["dim"] == dim:
            header, index = loaded
            gen = self._reconcile(gallery_id, index, header["generation"])
            if gen != header["generation"]:
                self._save(gallery_id, index, gen)
            return gen, index
        gen, index = self._build_from_database(gallery_id, dim)
        self._save(gallery_id, index, gen)
        return gen, index

    def _load_exact(self, gallery_id: str, dim: int, samples: int):
        index, gen = ExactIndex(dim, capacity=max(1024, samples)), None
        for gen, sids, pids, vecs in self.source.sample_rows(gallery_id):
            index.add(sids, pids, vecs)
        if gen is None:  # no rows: the generation of the (empty) gallery
            gen = self.source.gallery_state(gallery_id)[0]
        return gen, index

    def _build_from_database(self, gallery_id: str, dim: int):
        log.info("gallery %s: building the approximate index", gallery_id)
        index, generations = ApproxIndex(dim, self.policy), []

        def chunks():
            for gen, sids, pids, vecs in self.source.sample_rows(gallery_id):
                generations.append(gen)  # the same for every chunk: one read snapshot
                yield sids, pids, vecs

        _add_all(index, chunks())
        gen = generations[0] if generations else self.source.gallery_state(gallery_id)[0]
        index.measure_recall()
        return gen, index

    def _reconcile(self, gallery_id: str, index: ApproxIndex, known: int | None = None) -> int:
        """Bring ``index`` to the database's content; returns the generation it now reflects."""
        gen, live = self.source.live_samples(gallery_id)
        if gen == known:
            return gen
        have = index.sample_ids()
        gone = have - live.keys()
        if gone:
            index.remove(sample_ids=gone)
        new = [s for s in live if s not in have]
        for _, sids, pids, vecs in self.source.sample_rows(gallery_id, new):
            index.add(sids, pids, vecs)
        return gen

    # ------------------------------------------------------------------ this process's writes
    def after_write(self, gallery_id: str, before: int, apply) -> None:
        """Bring the cached index from generation ``before`` to ``before + 1`` with ``apply`` (or
        mark it out of date: the next search catches up), then start a build if one is due."""
        with self._lock:
            cached = self._entries.get(gallery_id)
            if cached is None:
                return
            if cached[0] == before:
                apply(cached[1])
                self._entries[gallery_id] = (before + 1, cached[1])
            elif isinstance(cached[1], ApproxIndex):
                self._entries[gallery_id] = (STALE, cached[1])
            else:
                del self._entries[gallery_id]
                return
            index = cached[1]
        if isinstance(index, ExactIndex) and self.policy.approximate(len(index)):
            self._start(self._build, gallery_id, index)
        elif isinstance(index, ApproxIndex) and index.needs_rebuild():
            self._start(self._build, gallery_id, index)
        elif isinstance(index, ApproxIndex) and index.needs_recalibration():
            self._start(self._recalibrate, gallery_id, index)

    def removed(self, gallery_id: str, before: int, sample_ids=(), person_id: str | None = None) -> None:
        """After a committed deletion: out of the cached index and out of the index file."""
        self.after_write(gallery_id, before, lambda idx: idx.remove(set(sample_ids) or None, person_id))
        path = self.path(gallery_id)
        if path.exists():
            with ann_file.locked(path):
                ann_file.scrub(path, sample_ids, person_id, before)

    def forget(self, gallery_id: str) -> None:
        """Drop the gallery's index and its file (zeroed first): the next search starts afresh."""
        with self._lock:
            self._entries.pop(gallery_id, None)
        path = self.path(gallery_id)
        with ann_file.locked(path):
            ann_file.remove(path)

    # ------------------------------------------------------------------ builds
    def _start(self, work, gallery_id: str, index) -> None:
        """``work(gallery_id, index)`` in a background thread, unless one runs for the gallery."""
        with self._lock:
            running = self._builds.get(gallery_id)
            if running is not None and running.is_alive():
                return
            thread = threading.Thread(target=work, args=(gallery_id, index), daemon=True,
                                      name=f"gallery-index-{gallery_id[:8]}")
            self._builds[gallery_id] = thread
        thread.start()

    def _recalibrate(self, gallery_id: str, index: ApproxIndex) -> None:
        """Measure recall again (and choose ef_search again) on the grown gallery."""
        try:
            recall = index.measure_recall()
            log.info("gallery %s: recall@1 %s at ef_search %s (%d samples)", gallery_id, recall["recall_at_1"],
                     recall["ef_search"], len(index))
        except Exception:  # noqa: BLE001 - the index keeps serving with its earlier ef_search
            log.exception("gallery %s: measuring the approximate index's recall failed", gallery_id)

    def _build(self, gallery_id: str, source_index) -> None:
        try:
            sids, pids, vecs = source_index.contents()
            index = ApproxIndex(source_index.dim, self.policy)
            _add_all(index, ((sids[lo : lo + CHUNK], pids[lo : lo + CHUNK], vecs[lo : lo + CHUNK])
                             for lo in range(0, len(sids), CHUNK)))
            del vecs
            index.measure_recall()
            self._save(gallery_id, index, generation=STALE)  # content of no one generation: reconciled at load
            with self._lock:
                cached = self._entries.get(gallery_id)
                if cached is None or cached[1] is not source_index:
                    return  # the gallery was reloaded or deleted meanwhile: that path rules
                current = source_index.sample_ids()  # writes made during the build, applied now
                built = index.sample_ids()
                if built - current:
                    index.remove(sample_ids=built - current)
                if current - built:
                    index.add(*source_index.contents(current - built))
                self._entries[gallery_id] = (cached[0], index)
            log.info("gallery %s: approximate index ready (%d samples, recall@1 %s)", gallery_id, len(index),
                     index.recall["recall_at_1"])
        except Exception:  # noqa: BLE001 - a failed build leaves the current index serving
            log.exception("gallery %s: building the approximate index failed", gallery_id)

    def rebuild(self, gallery_id: str) -> None:
        """Build the gallery's approximate index afresh at its next search (new parameters)."""
        self.wait()
        self.forget(gallery_id)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the running builds (tests, the import command, shutdown)."""
        with self._lock:
            threads = list(self._builds.values())
        for t in threads:
            t.join(timeout)

    # ------------------------------------------------------------------ files
    def _save(self, gallery_id: str, index: ApproxIndex, generation: int) -> None:
        """Write the index file; first drop what the database no longer holds (under the lock that
        deletions scrub under, so no deleted sample reaches the file)."""
        if index.graph is None:  # nothing added yet: nothing to keep
            return
        path = self.path(gallery_id)
        with ann_file.locked(path):
            _, live = self.source.live_samples(gallery_id)
            gone = index.sample_ids() - live.keys()
            if gone:
                index.remove(sample_ids=gone)
            with index.reading():
                ann_file.save(index, path, gallery_id, generation)

    def save(self, gallery_id: str) -> bool:
        """Save the gallery's approximate index if it is current; returns whether it saved."""
        with self._lock:
            cached = self._entries.get(gallery_id)
        if cached is None or not isinstance(cached[1], ApproxIndex):
            return False
        if cached[0] != self.source.gallery_state(gallery_id)[0]:
            return False
        header = ann_file.read_header(self.path(gallery_id))
        if header is None or header.get("generation") != cached[0]:
            self._save(gallery_id, cached[1], cached[0])
        return True

    def info(self, gallery_id: str, samples: int) -> dict:
        """What the gallery's index is (without loading it)."""
        with self._lock:
            cached = self._entries.get(gallery_id)
            building = gallery_id in self._builds and self._builds[gallery_id].is_alive()
        if cached is not None:
            out = cached[1].info()
        else:
            header = ann_file.read_header(self.path(gallery_id)) if self.policy.approximate(samples) else None
            if header is not None:
                out = {"kind": "hnsw", **header["policy"], "recall": header.get("recall")}
            else:
                out = {"kind": "hnsw" if self.policy.approximate(samples) else "exact"}
            out["loaded"] = False
        out["building"] = building
        return out

    def close(self) -> None:
        self.wait()
        with self._lock:
            ids = list(self._entries)
        for gallery_id in ids:
            try:
                self.save(gallery_id)
            except Exception:  # noqa: BLE001 - a cache: the next load reconciles
                log.exception("gallery %s: saving the approximate index failed", gallery_id)
        with self._lock:
            self._entries.clear()
