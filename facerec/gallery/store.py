"""What a gallery backend stores, and the interface every backend implements.

A gallery pins the embedding contract of the model it was built with (``contract_id``,
``embedding_size``); persons belong to one gallery; samples (one embedding each, never the image)
belong to one person. Deleting a gallery deletes its persons and samples, deleting a person its
samples: nothing of a deleted person remains in the store (see each backend for what that means
physically).

Two backends implement :class:`GalleryStore`: :class:`~facerec.gallery.sqlite_store.SQLiteStore`
(one file, embedded, with the in-process exact index) and
:class:`~facerec.gallery.pgvector_store.PgVectorStore` (PostgreSQL + pgvector, for deployments
that outgrow one machine). Both pass the same tests (``tests/test_gallery.py``), and both run the
same statements through :class:`~facerec.gallery.sql_base.SQLGalleryStore`, each supplying only its
dialect, connections and search.

Embeddings are never part of a record's ``repr`` and never logged.
"""

from __future__ import annotations

import abc
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from facerec.gallery.index import Candidate

MAX_NAME = 200
#: Samples one person may hold: bounds the candidates an exact top-k search must look at.
MAX_SAMPLES_PER_PERSON = 64
#: Ids of galleries, persons and samples (also the API's path-parameter pattern).
ID_PATTERN = r"^[0-9a-f]{32}$"
_ID = re.compile(ID_PATTERN)
# What a name may hold: anything but C0/C1 control characters and the line/paragraph separators
# (they would break log lines and one-line displays), with at least one non-space. Written so that
# Python's re and ECMA regexes (the OpenAPI schema's dialect) read it alike.
_FORBIDDEN = r"\x00-\x1f\x7f-\x9f\u2028\u2029"
NAME_PATTERN = rf"^[^{_FORBIDDEN}]*[^\s{_FORBIDDEN}][^{_FORBIDDEN}]*$"
_NAME = re.compile(NAME_PATTERN)


class GalleryError(Exception):
    """Base of the store's errors; ``code`` is stable (the service maps it to an HTTP status)."""

    code = "gallery_error"


class NotFound(GalleryError):
    code = "not_found"

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"no {what} {ident!r}")
        self.what = what
        self.ident = ident
        self.code = f"{what}_not_found"


class AlreadyExists(GalleryError):
    code = "gallery_exists"


class StoreUnavailable(GalleryError):
    code = "gallery_store_unavailable"


def new_id() -> str:
    return uuid.uuid4().hex


def new_ids(n: int) -> list[str]:
    """``n`` random ids (what :func:`new_id` makes, without the version bits): one system call."""
    text = os.urandom(16 * n).hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


def valid_id(ident: str) -> bool:
    return bool(_ID.match(ident or ""))


def now() -> str:
    # microseconds: rows created in one millisecond must still list in creation order
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class GalleryRecord:
    id: str
    name: str
    contract_id: str
    embedding_size: int
    model_name: str
    config: dict  # {"policy": {...}, "target_fpir": float | None, "match_threshold": float | None}
    created_at: str
    persons: int = 0
    samples: int = 0
    generation: int = 0


@dataclass
class PersonRecord:
    id: str
    gallery_id: str
    name: str
    metadata: dict
    created_at: str
    samples: int = 0
    #: Why ``metadata`` is ``{}`` although the row holds something: the stored value cannot be
    #: returned (written before writes were checked, see ``facerec.gallery.metadata``).
    metadata_error: str | None = None


@dataclass
class NewSample:
    embedding: np.ndarray = field(repr=False)
    info: dict  # measurements kept with the sample (detector score, face size, pose, quality)


@dataclass
class SampleRecord:
    id: str
    person_id: str
    info: dict
    created_at: str


class GalleryStore(abc.ABC):
    """Galleries, persons and samples; search returns the best persons by best-sample cosine."""

    backend: str = "abstract"

    # ---- galleries
    @abc.abstractmethod
    def create_gallery(
        self, name: str, contract_id: str, embedding_size: int, model_name: str, config: dict
    ) -> GalleryRecord: ...

    @abc.abstractmethod
    def list_galleries(self) -> list[GalleryRecord]: ...

    @abc.abstractmethod
    def get_gallery(self, gallery_id: str) -> GalleryRecord: ...

    @abc.abstractmethod
    def update_gallery(
        self, gallery_id: str, name: str | None = None, config: dict | None = None
    ) -> GalleryRecord: ...

    @abc.abstractmethod
    def delete_gallery(self, gallery_id: str) -> None: ...

    # ---- persons and samples
    @abc.abstractmethod
    def create_person(
        self, gallery_id: str, name: str, metadata: dict, samples: list[NewSample]
    ) -> tuple[PersonRecord, list[SampleRecord]]:
        """Person and its samples in one transaction (at least one sample)."""

    @abc.abstractmethod
    def add_samples(
        self, gallery_id: str, person_id: str, samples: list[NewSample]
    ) -> list[SampleRecord]: ...

    @abc.abstractmethod
    def list_persons(self, gallery_id: str, limit: int = 100, offset: int = 0) -> list[PersonRecord]: ...

    @abc.abstractmethod
    def get_person(self, gallery_id: str, person_id: str) -> PersonRecord: ...

    @abc.abstractmethod
    def list_samples(self, gallery_id: str, person_id: str) -> list[SampleRecord]: ...

    @abc.abstractmethod
    def update_person(
        self, gallery_id: str, person_id: str, name: str | None = None, metadata: dict | None = None
    ) -> PersonRecord: ...

    @abc.abstractmethod
    def delete_person(self, gallery_id: str, person_id: str) -> None: ...

    @abc.abstractmethod
    def delete_sample(self, gallery_id: str, person_id: str, sample_id: str) -> None: ...

    # ---- search
    @abc.abstractmethod
    def search(
        self, gallery_id: str, query: np.ndarray, k: int, exclude_person: str | None = None
    ) -> list[Candidate]:
        """The k best persons (best sample's cosine), best first; ``exclude_person`` left out."""

    def index_info(self, gallery_id: str, samples: int | None = None) -> dict:
        """What searches the gallery (kind, parameters, measured recall@1), without loading it."""
        return {"kind": "exact"}

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_name(name: str, what: str = "name") -> str:
    """``name`` stripped, if it matches :data:`NAME_PATTERN` (the rule the API schema publishes) and
    is encodable as UTF-8; else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        if not (name or "").strip():
            raise ValueError(f"{what} must not be empty")
        raise ValueError(f"{what} must not contain control characters or line separators")
    name = name.strip()
    if len(name) > MAX_NAME:
        raise ValueError(f"{what} is longer than {MAX_NAME} characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone UTF-16 surrogate (not encodable as UTF-8)") from None
    return name


def check_embeddings(vectors: np.ndarray, size: int) -> np.ndarray:
    """:func:`check_embedding` for a batch (rows)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] != size:
        raise ValueError(f"embedding has {v.shape[-1] if v.ndim else 1} values, the gallery's contract has {size}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("embedding must be finite and non-zero")
    return v / norms


def check_embedding(vector: np.ndarray, size: int) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape != (size,):
        raise ValueError(f"embedding has {v.size} values, the gallery's contract has {size}")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("embedding must be finite and non-zero")
    return v / norm
