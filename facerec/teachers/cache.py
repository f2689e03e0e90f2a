"""The teacher cache: a teacher's embedding of every image, computed once, keyed by content.

Layout of a cache folder (one teacher per folder):

    teacher.json            the teacher's id, embedding size and description (written first)
    shard-NNNNN.f32         raw float32 rows, embedding_size each, appended
    shard-NNNNN.idx         one line per image: "<sha256 of the image bytes> <row>" (row -1: the
                            teacher found no face; recorded so a resumed run does not retry it)

Append-only: every run of ``facerec teach`` opens a new shard and a single writer appends to it
(worker processes only compute). A row's bytes are written and flushed before its index line,
and an index line counts only once its newline is there and its row lies inside the ``.f32``
file, so a run killed at any moment leaves a cache whose readable part is exactly what was
finished, and the next run computes only the rest. Keys are the sha256 of the bytes the trainer
reads (the aligned crop's file, a ``.rec`` record's encoded image), so the same bytes under two
names are one entry and a renamed file keeps its embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

FORMAT = "facerec.teacher-cache"
FORMAT_VERSION = 1
META_NAME = "teacher.json"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    return content_hash(Path(path).read_bytes())


class TeacherCacheError(ValueError):
    pass


def _read_meta(path: Path) -> dict:
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise TeacherCacheError(f"{path} is not a teacher cache (no {META_NAME}; make one with `facerec teach`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise TeacherCacheError(f"{meta_path}: not a teacher cache file")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise TeacherCacheError(f"{meta_path}: cache format {meta['format_version']} is newer than this "
                                f"facerec reads ({FORMAT_VERSION})")
    return meta


def _shard_entries(idx: Path, rows_available: int) -> Iterable[tuple[str, int]]:
    """Complete, in-range lines of one shard index; a torn last line or a row beyond the data is
    what a killed writer leaves behind, and is skipped."""
    text = idx.read_bytes().decode("ascii", errors="replace")
    lines = text.split("\n")[:-1]  # the part after the last newline is torn (or empty)
    for line in lines:
        parts = line.split(" ")
        if len(parts) != 2 or len(parts[0]) != 64:
            continue
        try:
            row = int(parts[1])
        except ValueError:
            continue
        if row < rows_available:
            yield parts[0], row


class TeacherCache:
    """Read a cache: ``lookup(hashes) -> (embeddings (N, D) float32, found (N,) bool)``.

    The whole cache is loaded into memory (128-d float32: 0.5 kB per image, ~20 MB for the pool).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        self.teacher_id = str(self.meta["teacher_id"])
        self.embedding_size = int(self.meta["embedding_size"])
        self.reload()

    def reload(self) -> None:
        d = self.embedding_size
        blocks: list[np.ndarray] = []
        self._row: dict[str, int] = {}
        self.no_face: set[str] = set()
        offset = 0
        for idx in sorted(self.path.glob("shard-*.idx")):
            data = idx.with_suffix(".f32")
            rows = np.fromfile(data, dtype=np.float32) if data.exists() else np.zeros(0, np.float32)
            n = rows.size // d
            block = rows[: n * d].reshape(n, d)
            for key, row in _shard_entries(idx, n):
                if key in self._row or key in self.no_face:
                    continue  # the first entry wins: concurrent runs may both have computed it
                if row < 0:
                    self.no_face.add(key)
                else:
                    self._row[key] = offset + row
            blocks.append(block)
            offset += n
        self._matrix = np.concatenate(blocks) if blocks else np.zeros((0, d), np.float32)

    def __len__(self) -> int:
        """Images with an entry (an embedding or a recorded no-face)."""
        return len(self._row) + len(self.no_face)

    def __contains__(self, key: str) -> bool:
        return key in self._row or key in self.no_face

    def keys(self) -> set[str]:
        return set(self._row) | self.no_face

    def lookup(self, hashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the images with these sha256 hex digests; rows not found (never computed,
        or no face found by the teacher) are zero and False in the mask."""
        rows = np.array([self._row.get(h, -1) for h in hashes], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((len(rows), self.embedding_size), np.float32)
        out[found] = self._matrix[rows[found]]
        return out, found


class CacheWriter:
    """Appends to a new shard of a cache folder; creates the folder for a first run and refuses
    one made by another teacher."""

    def __init__(self, path: str | os.PathLike, teacher_id: str, embedding_size: int, describe: dict):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / META_NAME
        if meta_path.exists():
            meta = _read_meta(self.path)
            if meta["teacher_id"] != teacher_id:
                raise TeacherCacheError(
                    f"{self.path} holds embeddings of teacher {meta['teacher_id']}, not {teacher_id}: "
                    "use another --out folder (one teacher per cache)")
        else:
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "teacher_id": teacher_id,
                    "embedding_size": int(embedding_size), "teacher": describe}
            tmp = meta_path.with_name(META_NAME + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)
        self.embedding_size = int(embedding_size)
        self._data = self._index = None
        self.rows = 0
        self.written = 0

    def _open(self) -> None:
        # exclusive create: two runs never share a shard, whatever order they start in
        number = len(list(self.path.glob("shard-*.idx")))
        while True:
            stem = self.path / f"shard-{number:05d}"
            try:
                self._index = open(stem.with_suffix(".idx"), "xb")
                break
            except FileExistsError:
                number += 1
        self._data = open(stem.with_suffix(".f32"), "xb")

    def add(self, keys: Sequence[str], embeddings: np.ndarray) -> None:
        """Append one batch; NaN rows are recorded as 'no face' (row -1)."""
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(keys), self.embedding_size)
        if self._index is None:
            self._open()
        good = np.isfinite(embeddings).all(axis=1)
        self._data.write(np.ascontiguousarray(embeddings[good]).tobytes())
        self._data.flush()
        lines = []
        for key, ok in zip(keys, good):
            lines.append(f"{key} {self.rows if ok else -1}\n")
            self.rows += int(ok)
        self._index.write("".join(lines).encode("ascii"))
        self._index.flush()
        self.written += len(keys)

    def close(self) -> None:
        for f in (self._data, self._index):
            if f is not None:
                f.close()
        self._data = self._index = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
