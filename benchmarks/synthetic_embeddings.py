"""Synthetic 512-d embeddings for the gallery benchmarks, made by chunk (1M x 512 never in memory twice).

Two kinds:

- ``uniform``: unit vectors uniform on the sphere (the first search benchmark's data). The hardest
  case for graph indexes (intrinsic dimension 512) and unlike faces; a query is a stored vector plus
  noise (cosine ~0.9 to it).
- ``face``: shaped like the shipped model's embeddings of LFW-H2 (7,068 images of 2,914 people,
  measured once for this generator): a shared mean direction of length 0.305 (impostor cosine
  averages 0.09), the variance in a random 110-dimensional subspace with eigenvalues falling as
  1 / (1 + k/12) (half the variance in ~25 directions, 90% in ~85; measured: 23 and 78), split
  into a person part and a photo part. Person ``i``'s enrolled sample and a later photo of him (a
  *mated* query) share the person part; a *non-mated* query is a person never enrolled.
  ``within`` sets how alike two photos of a person are: 0.54 (the shipped model: mated cosine
  ~0.47, so at 100k people an impostor usually outscores the mate) or 0.30 (mated cosine ~0.70,
  a stronger model; the default).
"""

from __future__ import annotations

import numpy as np

DIM = 512
CHUNK = 20_000
RANK = 110
MEAN_LENGTH = 0.305
TOTAL = 1.0 - MEAN_LENGTH**2  # variance around the mean, so that vectors are about unit length


class Embeddings:
    def __init__(self, kind: str = "face", within: float = 0.30, seed: int = 0) -> None:
        if kind not in ("face", "uniform"):
            raise ValueError("kind is face or uniform")
        self.kind, self.within, self.seed = kind, float(within), seed
        rng = np.random.default_rng([seed, 99])
        basis, _ = np.linalg.qr(rng.standard_normal((DIM, RANK)))
        lam = 1.0 / (1.0 + np.arange(RANK) / 12.0)
        self.scale = np.sqrt(lam / lam.sum()).astype(np.float32)
        self.basis = basis.T.astype(np.float32)  # RANK x DIM
        mean = rng.standard_normal(DIM).astype(np.float32)
        self.mean = MEAN_LENGTH * mean / np.linalg.norm(mean)

    def describe(self) -> str:
        if self.kind == "uniform":
            return "uniform on the sphere"
        return f"face-like (photo variance {self.within:.2f}: mated cosine ~{1 - self.within:.2f})"

    def _part(self, key, n: int) -> np.ndarray:
        z = np.random.default_rng([self.seed, *key]).standard_normal((n, RANK), dtype=np.float32)
        return (z * self.scale) @ self.basis

    def _chunk(self, i: int, photo: int) -> np.ndarray:
        if self.kind == "uniform":
            return np.random.default_rng([self.seed, i]).standard_normal((CHUNK, DIM), dtype=np.float32)
        person = self.mean + np.sqrt(TOTAL - self.within) * self._part((i, 0), CHUNK)
        return person + np.sqrt(self.within) * self._part((i, 1 + photo), CHUNK)

    def rows(self, start: int, n: int, photo: int = 0) -> np.ndarray:
        """Persons start..start+n-1: photo 0 is the enrolled sample, 1, 2, ... later photos."""
        out = np.empty((n, DIM), np.float32)
        for i in range(start // CHUNK, (start + n - 1) // CHUNK + 1):
            block = self._chunk(i, photo)
            lo, hi = max(start, i * CHUNK), min(start + n, (i + 1) * CHUNK)
            out[lo - start : hi - start] = block[lo - i * CHUNK : hi - i * CHUNK]
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def picked(self, rows: np.ndarray, photo: int) -> np.ndarray:
        """Photo ``photo`` of the persons ``rows`` (sorted or not), chunk by chunk."""
        out = np.empty((len(rows), DIM), np.float32)
        for c in np.unique(rows // CHUNK):
            mine = np.flatnonzero(rows // CHUNK == c)
            out[mine] = self.rows(int(c) * CHUNK, CHUNK, photo)[rows[mine] - int(c) * CHUNK]
        return out

    def queries(self, size: int, n: int, seed: int = 123) -> tuple[np.ndarray, np.ndarray]:
        """(queries, enrolled row of each or -1): ``n`` mated queries of random enrolled persons
        then ``n`` non-mated ones (face); for uniform, stored vectors plus noise (all mated)."""
        rng = np.random.default_rng(seed)
        rows = rng.choice(size, n, replace=False)
        if self.kind == "uniform":
            base = self.picked(rows, 0)
            q = base + 0.5 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(DIM)
            return q / np.linalg.norm(q, axis=1, keepdims=True), rows
        strangers = self.rows(10**9, n)  # persons far beyond any gallery: never enrolled
        return np.concatenate([self.picked(rows, 1), strangers]), np.concatenate([rows, np.full(n, -1)])

    def exact_top1(self, queries: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(best stored row, its cosine) per query, by brute force over the generated gallery."""
        best = np.full(len(queries), -np.inf, np.float32)
        row = np.zeros(len(queries), np.int64)
        for lo in range(0, size, CHUNK):
            s = queries @ self.rows(lo, min(CHUNK, size - lo)).T
            col = s.argmax(axis=1)
            top = s[np.arange(len(s)), col]
            better = top > best
            best[better], row[better] = top[better], lo + col[better]
        return row, best
