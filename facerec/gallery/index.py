"""The in-process exact vector index: every stored embedding in one float32 matrix.

Search is one matrix-vector product over all samples, then the best persons. A person's score is
the best of its samples' cosine similarities. The exact top-k persons come from the top
``k * (most samples of one person)`` samples: any sample ranked above the k-th person's best
belongs to one of the k best persons, so no full per-person reduction is needed (checked against a
brute-force reduction in the tests).

Thread safety: writers hold a lock; readers take a snapshot (views of the first ``n`` rows) under
it and compute outside it. Appends write rows past ``n`` (invisible to existing snapshots) or move
to a new buffer; removals build new arrays. So a search never sees half an update, and searches run
in parallel with each other and with enrollment.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    person_id: str
    similarity: float
    sample_id: str  # the person's best-matching sample


def normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("embeddings must be finite and non-zero")
    return v / norms


def top_persons(
    scores: np.ndarray, person_codes: np.ndarray, k: int, max_per_person: int, exclude_code: int | None = None
) -> list[tuple[int, int]]:
    """(person code, sample row) of the k best persons by their best sample, best first."""
    n = len(scores)
    if n == 0 or k <= 0:
        return []
    extra = 1 if exclude_code is not None else 0
    m = min(n, (k + extra) * max(1, max_per_person))
    if m < n:
        rows = np.argpartition(-scores, m - 1)[:m]
        rows = rows[np.argsort(-scores[rows], kind="stable")]
    else:
        rows = np.argsort(-scores, kind="stable")
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for row in rows:
        code = int(person_codes[row])
        if code in seen or code == exclude_code:
            continue
        seen.add(code)
        out.append((code, int(row)))
        if len(out) == k:
            break
    return out


class ExactIndex:
    kind = "exact"

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = int(dim)
        self._vecs = np.empty((capacity, self.dim), np.float32)
        self._codes = np.empty(capacity, np.int64)
        self._sample_ids: list[str] = []
        self._n = 0
        self._person_ids: list[str] = []  # code -> person id
        self._code_of: dict[str, int] = {}
        self._counts: dict[int, int] = {}  # person code -> samples
        self._most = 0  # most samples of one person
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    @property
    def persons(self) -> int:
        return len(self._counts)

    def info(self) -> dict:
        return {"kind": self.kind, "samples": self._n}

    def sample_ids(self) -> set[str]:
        with self._lock:
            return set(self._sample_ids[: self._n])

    def contents(self, sample_ids: set[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
        """(sample ids, person ids, vectors) of every sample, or of those in ``sample_ids``: copies."""
        with self._lock:
            n = self._n
            rows = (np.arange(n) if sample_ids is None
                    else np.array([i for i, s in enumerate(self._sample_ids[:n]) if s in sample_ids], np.int64))
            return ([self._sample_ids[r] for r in rows], [self._person_ids[c] for c in self._codes[rows]],
                    self._vecs[rows].copy())

    def add(self, sample_ids: list[str], person_ids: list[str], vectors: np.ndarray) -> None:
        vectors = normalise(np.asarray(vectors, np.float32).reshape(-1, self.dim))
        if not len(sample_ids) == len(person_ids) == len(vectors):
            raise ValueError("sample_ids, person_ids and vectors differ in length")
        with self._lock:
            n, m = self._n, len(vectors)
            if n + m > len(self._vecs):
                cap = max(n + m, 2 * len(self._vecs))
                vecs = np.empty((cap, self.dim), np.float32)
                codes = np.empty(cap, np.int64)
                vecs[:n], codes[:n] = self._vecs[:n], self._codes[:n]
                self._vecs, self._codes = vecs, codes
            for i, pid in enumerate(person_ids):
                code = self._code_of.get(pid)
                if code is None:
                    code = self._code_of[pid] = len(self._person_ids)
                    self._person_ids.append(pid)
                self._codes[n + i] = code
                self._counts[code] = self._counts.get(code, 0) + 1
                self._most = max(self._most, self._counts[code])
            self._vecs[n : n + m] = vectors
            self._sample_ids.extend(sample_ids)  # in place: snapshots read only their first n
            self._n = n + m

    def remove(self, sample_ids: set[str] | None = None, person_id: str | None = None) -> int:
        """Drop samples by id and/or every sample of a person; returns how many were dropped."""
        with self._lock:
            n = self._n
            keep = np.ones(n, bool)
            if sample_ids:
                keep &= np.array([s not in sample_ids for s in self._sample_ids], bool)
            if person_id is not None and person_id in self._code_of:
                keep &= self._codes[:n] != self._code_of[person_id]
            dropped = int(n - keep.sum())
            if dropped == 0:
                return 0
            # New arrays (not in place): snapshots taken by running searches stay valid.
            vecs = np.empty((max(1024, int(keep.sum()) * 2), self.dim), np.float32)
            codes = np.empty(len(vecs), np.int64)
            m = int(keep.sum())
            vecs[:m], codes[:m] = self._vecs[:n][keep], self._codes[:n][keep]
            self._vecs, self._codes = vecs, codes
            self._sample_ids = [s for s, k in zip(self._sample_ids, keep) if k]
            self._n = m
            self._counts = {}
            for code in codes[:m]:
                self._counts[int(code)] = self._counts.get(int(code), 0) + 1
            self._most = max(self._counts.values(), default=0)
            return dropped

    def search(self, query: np.ndarray, k: int, exclude_person: str | None = None) -> list[Candidate]:
        q = normalise(np.asarray(query, np.float32).reshape(self.dim))
        with self._lock:
            n = self._n
            vecs, codes, sample_ids = self._vecs[:n], self._codes[:n], self._sample_ids
            person_ids, most = self._person_ids, self._most  # person_ids only grows
            exclude = self._code_of.get(exclude_person) if exclude_person is not None else None
        scores = vecs @ q
        return [
            Candidate(person_ids[c], float(min(1.0, max(-1.0, scores[r]))), sample_ids[r])
            for c, r in top_persons(scores, codes, k, most, exclude)
        ]
