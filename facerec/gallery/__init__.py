"""Galleries for 1:N identification: storage (SQLite or PostgreSQL + pgvector), the in-process exact
and approximate (faiss HNSW, optional) indexes, the enrollment gate, open-set thresholds calibrated at a false-positive identification
rate, and the manager the service uses. See docs/gallery.md.

Nothing here imports psycopg unless the pgvector backend is opened, nor faiss unless a gallery
gets the approximate index.
"""

from __future__ import annotations

import os
from pathlib import Path

from facerec.gallery.ann_policy import IndexPolicy
from facerec.gallery.index import Candidate, ExactIndex
from facerec.gallery.manager import (
    Decision,
    Enrollment,
    GalleryConfig,
    GalleryManager,
    Offered,
    Outcome,
    SearchResult,
    ThresholdRequired,
)
from facerec.gallery.metadata import MetadataError, MetadataLimits, check_metadata
from facerec.gallery.openset import (
    OPENSET_FILE,
    OpenSetCalibration,
    calibrate,
    fpir_threshold,
    identification_metrics,
)
from facerec.gallery.policy import (
    EnrollmentPolicy,
    FaceEvidence,
    Reason,
    Refusal,
    assess,
)
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    AlreadyExists,
    GalleryError,
    GalleryRecord,
    GalleryStore,
    NewSample,
    NotFound,
    PersonRecord,
    SampleRecord,
    StoreUnavailable,
)


def default_sqlite_path() -> Path:
    """``FACEREC_GALLERY_PATH``, else ``$XDG_DATA_HOME/facerec/galleries.sqlite3``."""
    if os.environ.get("FACEREC_GALLERY_PATH"):
        return Path(os.environ["FACEREC_GALLERY_PATH"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "facerec" / "galleries.sqlite3"


def open_store(backend: str, path=None, dsn: str | None = None, **kw) -> GalleryStore:
    """``sqlite`` (``path``: the file) or ``pgvector`` (``dsn``: a PostgreSQL connection string)."""
    if backend == "sqlite":
        from facerec.gallery.sqlite_store import SQLiteStore

        if path is None:
            raise ValueError("the sqlite gallery backend needs a file path")
        return SQLiteStore(path, **kw)
    if backend == "pgvector":
        from facerec.gallery.pgvector_store import PgVectorStore

        if not dsn:
            raise ValueError("the pgvector gallery backend needs a DSN (FACEREC_GALLERY_DSN)")
        return PgVectorStore(dsn, **kw)
    raise ValueError(f"unknown gallery backend {backend!r}: sqlite or pgvector")


__all__ = [
    "MAX_SAMPLES_PER_PERSON",
    "OPENSET_FILE",
    "AlreadyExists",
    "Candidate",
    "Decision",
    "Enrollment",
    "EnrollmentPolicy",
    "ExactIndex",
    "FaceEvidence",
    "GalleryConfig",
    "GalleryError",
    "GalleryManager",
    "GalleryRecord",
    "GalleryStore",
    "IndexPolicy",
    "MetadataError",
    "MetadataLimits",
    "NewSample",
    "NotFound",
    "Offered",
    "OpenSetCalibration",
    "Outcome",
    "PersonRecord",
    "Reason",
    "Refusal",
    "SampleRecord",
    "SearchResult",
    "StoreUnavailable",
    "ThresholdRequired",
    "assess",
    "calibrate",
    "check_metadata",
    "default_sqlite_path",
    "fpir_threshold",
    "identification_metrics",
    "open_store",
]
