"""What the approximate gallery index is made of: its settings (:class:`IndexPolicy`), FAISS when it
is installed, and the FAISS index a graph starts as (:func:`make_graph`). The index itself is
:class:`facerec.gallery.ann.ApproxIndex`; nothing here imports faiss until a graph is made.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

INSTALL_HINT = "pip install 'facerec[search]' (faiss-cpu)"
#: sq8 learns each dimension's range from the first vectors added; an index trained on fewer is
#: rebuilt (and so retrained) each time it doubles, until it was trained on this many.
TRAIN_ENOUGH = 10_000
#: The ef_search values tried, in order, when the index chooses its own (IndexPolicy.ef_search None):
#: steps of about 1.5x, since latency grows about linearly with ef_search (at 1M face-like samples
#: recall@1 0.99 needed ~768, where doubling steps would have taken 1024 and 35% more time).
EF_LADDER = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
#: Fewer vectors than this say too little about the principal components: no PCA yet.
PCA_MIN_VECTORS = 2_000


def faiss_module():
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_threads() -> int:
    """OpenMP threads for adding to a graph: ``OMP_NUM_THREADS``, else every core. Set per call,
    since a thread that searched was left at ``search_threads``."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


def require_faiss():
    faiss = faiss_module()
    if faiss is None:
        raise RuntimeError(f"the approximate gallery index needs faiss, which is not installed: {INSTALL_HINT}")
    return faiss


@dataclass(frozen=True)
class IndexPolicy:
    """Which index a gallery gets, and the HNSW parameters of the approximate one."""

    kind: str = "auto"  # auto: approximate from min_samples on (when faiss is there) | exact | approximate
    min_samples: int = 50_000
    m: int = 48  # graph degree (96 links per node on the bottom layer)
    ef_construction: int = 64
    # Candidates a search explores. None: the smallest of EF_LADDER whose measured recall@1 reaches
    # target_recall, chosen at build (and again when the gallery has grown by half since).
    ef_search: int | None = None
    target_recall: float = 0.99
    storage: str = "sq8"  # what the graph search compares: sq8 | fp16 | flat (float32)
    # The graph works in the principal components holding this share of the variance, when they are
    # at most half the dimensions (face embeddings: ~160 of 512); 0: never.
    pca_variance: float = 0.995
    # OpenMP threads of one search: 1, since a search is one query (concurrent requests are the
    # parallelism) and on busy cores threads that wait for each other cost far more than they give
    search_threads: int = 1
    recall_queries: int = 512  # leave-one-out searches that measure recall@1 at build
    rebuild_dead_fraction: float = 0.2  # deleted share of the labels that triggers a rebuild

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "exact", "approximate"):
            raise ValueError(f"index kind must be auto, exact or approximate, not {self.kind!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError("target_recall must be in (0, 1]")
        if self.storage not in ("sq8", "fp16", "flat"):
            raise ValueError(f"index storage must be sq8, fp16 or flat, not {self.storage!r}")
        if self.kind == "approximate":
            require_faiss()

    def approximate(self, samples: int) -> bool:
        """Whether a gallery of ``samples`` samples gets the approximate index."""
        if self.kind == "exact":
            return False
        if self.kind == "approximate":
            return True
        return samples >= self.min_samples and faiss_module() is not None

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("kind", "min_samples")}


def pca_dims(vectors: np.ndarray, variance: float) -> int | None:
    """Principal components (a multiple of 16) holding ``variance`` of ``vectors``' variance, or
    None where that is more than half the dimensions, or too few vectors to tell."""
    n, dim = vectors.shape
    if not variance or n < PCA_MIN_VECTORS:
        return None
    centred = vectors - vectors.mean(axis=0)
    spectrum = np.linalg.eigvalsh(centred.T @ centred / n)[::-1]
    dims = int(np.searchsorted(np.cumsum(spectrum) / spectrum.sum(), variance) + 1)
    dims = -(-dims // 16) * 16
    return dims if dims <= dim // 2 else None


def make_graph(dim: int, policy: IndexPolicy, train: np.ndarray):
    """An untrained FAISS index for ``policy``; with PCA the graph compares L2 distances of the
    projected vectors (the projection centres them, which would bias inner products; for unit
    vectors L2 orders as the cosine does)."""
    faiss = require_faiss()
    dims = pca_dims(train, policy.pca_variance)
    metric = faiss.METRIC_L2 if dims else faiss.METRIC_INNER_PRODUCT
    if policy.storage == "flat":
        index = faiss.IndexHNSWFlat(dims or dim, policy.m, metric)
    else:
        qtype = faiss.ScalarQuantizer.QT_8bit if policy.storage == "sq8" else faiss.ScalarQuantizer.QT_fp16
        index = faiss.IndexHNSWSQ(dims or dim, qtype, policy.m, metric)
    index.hnsw.efConstruction = policy.ef_construction
    return faiss.IndexPreTransform(faiss.PCAMatrix(dim, dims), index) if dims else index
