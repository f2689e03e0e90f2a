"""The in-process approximate index for large galleries: FAISS HNSW candidates, exact re-ranking.

Why HNSW, and these parameters: ``benchmarks/search_speed.py`` compared HNSW with IVF on face-like
synthetic embeddings (docs/gallery.md, "Search speed"): at 100k samples IVF (nlist 4 sqrt(N))
reached recall@1 0.80 at nprobe 64 where HNSW reached 0.995 at about 2 ms of CPU per search. The
graph (``m`` 32, ``ef_construction`` 40) works on the principal components that hold 99.5% of the
variance, when they are at most half the dimensions (face embeddings hold it in ~110-160 of 512),
stored as 8-bit codes (``storage="sq8"``); every candidate it returns is then scored exactly
against its float32 vector, so a returned similarity is the exact cosine and the open-set decision
on the top candidate is the exact one whenever the true best sample is among the candidates
(recall@1, measured at build and stated in the gallery's ``GET`` answer).

Labels are insertion order and never reused. A deletion tombstones its labels: they leave the
candidate set at once (a FAISS ID selector filters them inside the graph search, and the re-ranking
checks again), and their vectors are overwritten with zeros in memory (float32 rows and quantised
codes; :mod:`facerec.gallery.ann_file` does the same in the file). The graph keeps the dead nodes'
links; :meth:`ApproxIndex.needs_rebuild` tells the owner when a rebuild pays off (many dead labels,
or a quantiser and PCA learnt from too few vectors).

Thread safety: searches share a read lock (FAISS searches are read-only); adds and removals take
the write lock. FAISS releases the GIL while it searches or builds; a search uses one OpenMP
thread (``search_threads``), a build every core.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import numpy as np

from facerec.gallery.ann_policy import (
    EF_LADDER,
    TRAIN_ENOUGH,
    IndexPolicy,
    build_threads,
    make_graph,
    require_faiss,
)
from facerec.gallery.index import Candidate, normalise, top_persons

log = logging.getLogger("facerec.gallery")


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writing or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class ApproxIndex:
    """The interface of :class:`~facerec.gallery.index.ExactIndex` over an HNSW graph."""

    kind = "hnsw"

    def __init__(self, dim: int, policy: IndexPolicy, graph=None, capacity: int = 1024) -> None:
        self.faiss = require_faiss()
        self.dim = int(dim)
        self.policy = policy
        self.graph = graph  # made by the first ``train`` (it chooses the PCA from the data)
        self._vecs = np.zeros((capacity, self.dim), np.float32)
        self._codes = np.zeros(capacity, np.int64)  # label -> person code
        self._alive = np.zeros(capacity, bool)
        self._bits = np.zeros((capacity + 7) // 8, np.uint8)  # _alive as FAISS's bitmap
        self._selector = None
        self._sample_ids: list[str] = []  # label -> sample id
        self._label_of: dict[str, int] = {}  # live samples only
        self._person_ids: list[str] = []  # code -> person id
        self._code_of: dict[str, int] = {}
        self._counts: dict[int, int] = {}  # person code -> live samples
        self._n = 0
        self._lock = ReadWriteLock()
        self.recall: dict | None = None  # what measure_recall found
        self.ef_search = policy.ef_search or EF_LADDER[-1]  # until measure_recall chooses
        # measure_recall found the graph slower at the target recall than comparing every sample
        self.exact_fallback = False
        self.build: dict | None = None  # how long the graph took to build (wall, CPU seconds, threads)
        # vectors the quantiser learnt its ranges from (a loaded index: its file says)
        self.trained_on = 0 if policy.storage == "sq8" else TRAIN_ENOUGH

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        return len(self._label_of)

    @property
    def labels(self) -> int:
        """Labels used, dead ones included (the graph's size)."""
        return self._n

    @property
    def persons(self) -> int:
        return len(self._counts)

    def dead_fraction(self) -> float:
        return 0.0 if self._n == 0 else 1.0 - len(self._label_of) / self._n

    def needs_recalibration(self) -> bool:
        """The gallery has grown by half since recall was measured (recall falls as it grows)."""
        measured = (self.recall or {}).get("samples") or 0
        return len(self) >= max(1.5 * measured, measured + 1000)

    def needs_rebuild(self) -> bool:
        """Too many dead labels, or quantiser ranges learnt from too few vectors."""
        undertrained = self.trained_on < TRAIN_ENOUGH and len(self) >= 2 * max(1, self.trained_on)
        return undertrained or self.dead_fraction() > self.policy.rebuild_dead_fraction

    def contents(self, sample_ids: set[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
        """(sample ids, person ids, float32 vectors) of the live samples (or of those in
        ``sample_ids``), in label order: copies."""
        with self._lock.read():
            if sample_ids is None:
                rows = np.flatnonzero(self._alive[: self._n])
            else:
                rows = np.array(sorted(self._label_of[s] for s in sample_ids if s in self._label_of), np.int64)
            return (
                [self._sample_ids[r] for r in rows],
                [self._person_ids[c] for c in self._codes[rows]],
                self._vecs[rows].copy(),
            )

    def sample_ids(self) -> set[str]:
        with self._lock.read():
            return set(self._label_of)

    def reading(self):
        """Context: no add or removal runs meanwhile (searches do); for saving."""
        return self._lock.read()

    def state(self) -> dict:
        """The label-indexed arrays and ids (views: use under :meth:`reading`)."""
        n = self._n
        return {
            "alive": self._alive[:n],
            "samples": self._sample_ids[:n],
            "codes": self._codes[:n],
            "persons": list(self._person_ids),
            "vectors": self._vecs[:n],
        }

    def restore(self, samples: list[str], codes: np.ndarray, persons: list[str], vectors: np.ndarray,
                alive: np.ndarray) -> None:
        """Take over a saved state (labels as the graph numbers them)."""
        n = len(samples)
        if self.graph is None or not (len(codes) == len(vectors) == len(alive) == n == self.graph.ntotal):
            raise ValueError("the saved index is inconsistent with its graph")
        with self._lock.write():
            self._grow(n)
            self._vecs[:n], self._codes[:n], self._alive[:n] = vectors, codes, alive
            self._sample_ids = list(samples)
            self._person_ids = list(persons)
            self._code_of = {p: i for i, p in enumerate(persons)}
            rows = np.flatnonzero(alive)
            self._label_of = {samples[r]: int(r) for r in rows}
            self._counts = {}
            for code, count in zip(*np.unique(codes[rows], return_counts=True)):
                self._counts[int(code)] = int(count)
            self._n = n
            self._refresh_selector()

    # ------------------------------------------------------------------ writes
    def _grow(self, need: int) -> None:
        cap = len(self._vecs)
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        n = self._n
        vecs = np.zeros((cap, self.dim), np.float32)
        vecs[:n] = self._vecs[:n]
        codes = np.zeros(cap, np.int64)
        codes[:n] = self._codes[:n]
        alive = np.zeros(cap, bool)
        alive[:n] = self._alive[:n]
        self._vecs, self._codes, self._alive = vecs, codes, alive

    def train(self, vectors: np.ndarray) -> None:
        """The first vectors decide the graph: its PCA (if the variance sits in few components) and
        its quantiser's ranges (sq8). Later calls do nothing (a rebuild retrains)."""
        if self.graph is None:
            vectors = normalise(vectors)
            self.graph = make_graph(self.dim, self.policy, vectors)
            self.graph.train(vectors)
            self.trained_on = len(vectors)

    def add(self, sample_ids: list[str], person_ids: list[str], vectors: np.ndarray) -> None:
        vectors = normalise(np.asarray(vectors, np.float32).reshape(-1, self.dim))
        if not len(sample_ids) == len(person_ids) == len(vectors):
            raise ValueError("sample_ids, person_ids and vectors differ in length")
        if not len(vectors):
            return
        with self._lock.write():
            self.train(vectors)
            n, m = self._n, len(vectors)
            self._grow(n + m)
            for i, (sid, pid) in enumerate(zip(sample_ids, person_ids)):
                code = self._code_of.get(pid)
                if code is None:
                    code = self._code_of[pid] = len(self._person_ids)
                    self._person_ids.append(pid)
                self._codes[n + i] = code
                self._counts[code] = self._counts.get(code, 0) + 1
                self._label_of[sid] = n + i
            self._sample_ids.extend(sample_ids)
            self._vecs[n : n + m] = vectors
            self.faiss.omp_set_num_threads(build_threads())  # this thread's OpenMP setting
            self.graph.add(vectors)  # labels n .. n+m-1: FAISS numbers in insertion order
            self._alive[n : n + m] = True
            self._n = n + m
            self._refresh_selector()

    def _refresh_selector(self) -> None:
        """FAISS's view of ``_alive`` (bit i of byte i // 8, little-endian): it reads this memory."""
        self._bits = np.packbits(self._alive[: self._n], bitorder="little")
        self._selector = self.faiss.IDSelectorBitmap(len(self._bits), self.faiss.swig_ptr(self._bits))

    def labels_of(self, sample_ids=None, person_id: str | None = None) -> np.ndarray:
        """Live labels of these samples and/or of every sample of this person."""
        found = [self._label_of[s] for s in sample_ids or () if s in self._label_of]
        if person_id is not None and person_id in self._code_of:
            code = self._code_of[person_id]
            found += np.flatnonzero((self._codes[: self._n] == code) & self._alive[: self._n]).tolist()
        return np.unique(np.asarray(found, np.int64))

    def remove(self, sample_ids: set[str] | None = None, person_id: str | None = None) -> int:
        """Tombstone samples by id and/or every sample of a person, their vectors zeroed; returns
        how many were dropped."""
        with self._lock.write():
            labels = self.labels_of(sample_ids, person_id)
            if not len(labels):
                return 0
            self._alive[labels] = False
            self._refresh_selector()
            self._vecs[labels] = 0.0
            codes = self.storage_codes()
            codes[labels] = 0
            for label in labels.tolist():
                del self._label_of[self._sample_ids[label]]
                code = int(self._codes[label])
                self._counts[code] -= 1
                if self._counts[code] == 0:
                    del self._counts[code]
            return len(labels)

    def storage_codes(self) -> np.ndarray:
        """The graph's stored vectors as a writable (labels, bytes) view of FAISS's memory."""
        storage = self.faiss.downcast_index(self.hnsw().storage)
        flat = self.faiss.rev_swig_ptr(storage.codes.data(), self.graph.ntotal * storage.code_size)
        return flat.reshape(self.graph.ntotal, storage.code_size)

    def hnsw(self):
        """The HNSW index (inside the PCA transform, where there is one)."""
        if isinstance(self.graph, self.faiss.IndexPreTransform):
            return self.faiss.downcast_index(self.graph.index)
        return self.graph

    def pca_dims(self) -> int | None:
        return self.hnsw().d if isinstance(self.graph, self.faiss.IndexPreTransform) else None

    # ------------------------------------------------------------------ search
    def _candidates(self, q: np.ndarray, want: int, ef_search: int) -> np.ndarray:
        params = self.faiss.SearchParametersHNSW()
        params.efSearch = max(ef_search, want)
        params.sel = self._selector
        outer = params
        if isinstance(self.graph, self.faiss.IndexPreTransform):
            outer = self.faiss.SearchParametersPreTransform()
            outer.index_params = params  # ``params`` stays referenced until the search returns
        self.faiss.omp_set_num_threads(self.policy.search_threads)  # this thread's OpenMP setting
        _, found = self.graph.search(q[None], want, params=outer)
        labels = found[0][found[0] >= 0]
        return labels[self._alive[labels]]  # the selector already filtered; a deletion never slips by

    def search(self, query: np.ndarray, k: int, exclude_person: str | None = None,
               ef_search: int | None = None, exact: bool | None = None) -> list[Candidate]:
        """``ef_search``: this search's, instead of the index's; ``exact``: compare every live
        sample (default: when the graph was measured slower than that, see :meth:`measure_recall`)."""
        q = normalise(np.asarray(query, np.float32).reshape(self.dim))
        ef = ef_search or self.ef_search
        with self._lock.read():
            live = len(self._label_of)
            exclude = self._code_of.get(exclude_person) if exclude_person is not None else None
            if self.exact_fallback if exact is None else exact:
                n = self._n
                labels = np.arange(n)
                scores = self._vecs[:n] @ q  # the rows in place: no copy of the matrix
                scores[~self._alive[:n]] = -np.inf
                most = max(self._counts.values(), default=1)
                best = [(c, r) for c, r in top_persons(scores, self._codes[:n], k, most, exclude)
                        if scores[r] > -np.inf]
            else:
                want = min(live, 4 * (k + 1))  # a few samples per wanted person
                while True:
                    labels = self._candidates(q, want, ef) if want else np.zeros(0, np.int64)
                    scores = self._vecs[labels] @ q  # exact, as ExactIndex computes them
                    best = top_persons(scores, self._codes[labels], k, len(labels), exclude)
                    if len(best) >= k or want >= live:
                        break
                    want = min(live, want * 4)  # persons with many samples crowd the candidates out
            return [
                Candidate(self._person_ids[int(self._codes[labels[r]])], float(min(1.0, max(-1.0, scores[r]))),
                          self._sample_ids[int(labels[r])])
                for _, r in best
            ]

    def measure_recall(self, queries: int | None = None, seed: int = 0, chunk: int = 65_536) -> dict:
        """recall@1 against exact search, on leave-one-out searches: stored samples as queries with
        their own person excluded (the duplicate check's search, and a non-mated search for the
        index: the hard case). The exact answers come from one pass over the float32 rows."""
        rng = np.random.default_rng(seed)
        with self._lock.read():
            n = self._n
            rows = np.flatnonzero(self._alive[:n])
            picked = rng.choice(rows, min(len(rows), queries or self.policy.recall_queries), replace=False)
            q = self._vecs[picked].copy()
            own = self._codes[picked]
            best = np.full(len(picked), -np.inf, np.float32)
            best_code = np.full(len(picked), -1, np.int64)
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                s = q @ self._vecs[lo:hi].T
                s[:, ~self._alive[lo:hi]] = -np.inf
                s[own[:, None] == self._codes[None, lo:hi]] = -np.inf
                col = s.argmax(axis=1)
                top = s[np.arange(len(picked)), col]
                better = top > best
                best[better], best_code[better] = top[better], self._codes[lo + col[better]]
            exact = [self._person_ids[c] if c >= 0 else None for c in best_code]
            owners = [self._person_ids[c] for c in own]
        ladder = [self.policy.ef_search] if self.policy.ef_search else list(EF_LADDER)
        by_ef = {}
        for ef in ladder:  # the smallest ef_search that reaches the target (or the last)
            hits, times = 0, []
            for v, owner, want in zip(q, owners, exact):
                t = time.perf_counter()
                got = self.search(v, 1, exclude_person=owner, ef_search=ef, exact=False)
                times.append(time.perf_counter() - t)
                hits += (got[0].person_id if got else None) == want
            by_ef[str(ef)] = round(hits / max(1, len(picked)), 4)  # str keys: as JSON gives them back
            if by_ef[str(ef)] >= self.policy.target_recall:
                break
        exact_times = []
        for v, owner in list(zip(q, owners))[:16]:
            t = time.perf_counter()
            self.search(v, 1, exclude_person=owner, exact=True)
            exact_times.append(time.perf_counter() - t)
        graph_ms = 1e3 * float(np.median(times)) if times else 0.0
        exact_ms = 1e3 * float(np.median(exact_times)) if exact_times else 0.0
        self.ef_search = ef
        self.exact_fallback = bool(times) and graph_ms >= exact_ms
        if self.exact_fallback:
            log.warning("approximate index: at ef_search %d (recall@1 %.3f) the graph takes %.1f ms, comparing "
                        "every sample %.1f ms: searching exactly", ef, by_ef[str(ef)], graph_ms, exact_ms)
        self.recall = {
            "recall_at_1": None if not len(picked) else (1.0 if self.exact_fallback else by_ef[str(ef)]),
            "searching": "exact" if self.exact_fallback else "graph",
            "graph_ms": round(graph_ms, 3),
            "exact_ms": round(exact_ms, 3),
            "ef_search": ef,
            "target": None if self.policy.ef_search else self.policy.target_recall,
            "by_ef_search": by_ef,
            "queries": int(len(picked)),
            "samples": len(self._label_of),
            "how": "leave-one-out: stored samples searched with their own person excluded, against exact search",
        }
        return self.recall

    def info(self) -> dict:
        return {"kind": self.kind, "loaded": True, "samples": len(self), "dead_labels": self._n - len(self),
                **self.policy.params(), "ef_search": self.ef_search, "pca_dims": None if self.graph is None else self.pca_dims(),
                "recall": self.recall, "build": self.build}

