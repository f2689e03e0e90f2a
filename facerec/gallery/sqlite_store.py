"""The embedded default backend: one SQLite file (WAL) plus the in-process exact index.

- One connection per thread, WAL journal, ``busy_timeout``: readers never block the writer and
  concurrent requests (threads, or several processes on one file) are safe; every write is one
  ``BEGIN IMMEDIATE`` transaction.
- Foreign keys ON with ``ON DELETE CASCADE``: deleting a gallery or a person deletes what hangs
  from it in the same transaction.
- ``secure_delete=ON`` overwrites deleted rows with zeros, and after every deletion the WAL is
  checkpointed and truncated, so a deleted person's embeddings are gone from the file's bytes, not
  only from its tables (``tests/test_service_gallery.py`` scans the files). ``vacuum()`` also
  rebuilds the file to give the space back.
- Each gallery has a ``generation`` counter, incremented by every write in the same transaction.
  The in-process index of a gallery is brought up to date when its generation differs from the
  file's, so a second process writing to the same file is seen on the next search; this process's
  own writes are applied to the index directly (no reload). The indexes, exact or approximate (from
  ``index.min_samples`` samples on, with faiss), are kept by :mod:`facerec.gallery.index_cache`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from facerec.gallery.ann_policy import IndexPolicy
from facerec.gallery.index import Candidate
from facerec.gallery.index_cache import CHUNK, IndexCache
from facerec.gallery.metadata import stored_json
from facerec.gallery.sql_base import SampleRow, SQLGalleryStore
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    NewSample,
    check_embeddings,
    check_name,
    new_ids,
    now,
)

log = logging.getLogger("facerec.gallery")

SCHEMA_VERSION = 1
#: Page cache of a bulk import's connection (KiB; SQLite's default is 2 MB).
BULK_CACHE_KIB = 256 * 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS galleries (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    contract_id TEXT NOT NULL,
    embedding_size INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    persons INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS persons (
    id TEXT PRIMARY KEY,
    gallery_id TEXT NOT NULL REFERENCES galleries(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS persons_by_gallery ON persons(gallery_id, created_at, id);
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY,
    person_id TEXT NOT NULL REFERENCES persons(id) ON DELETE CASCADE,
    gallery_id TEXT NOT NULL REFERENCES galleries(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL,
    info TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_person ON samples(person_id);
CREATE INDEX IF NOT EXISTS samples_by_gallery ON samples(gallery_id);
"""


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


class SQLiteStore(SQLGalleryStore):
    backend = "sqlite"

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0, index: IndexPolicy | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self.indexes = IndexCache(self.path, index or IndexPolicy(), self)
        self._closed = False
        con = self._con()
        # A new file only (ignored later): 16 KiB pages hold seven 512-d samples; 4 KiB pages hold one
        # (a 2.3 KB row) and waste almost half the file.
        con.execute("PRAGMA page_size=16384")
        con.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
        with self._write() as c:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
        if int(found) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: gallery schema version {found}, this facerec reads {SCHEMA_VERSION}"
            )

    # ------------------------------------------------------------------ connections
    def _con(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("the gallery store is closed")
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA secure_delete=ON")
            con.execute("PRAGMA synchronous=FULL")
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            self._local.con = con
            with self._all_lock:
                self._all.append(con)
        return con

    @contextmanager
    def _write(self):
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    @contextmanager
    def _read(self):
        con = self._con()
        con.execute("BEGIN")  # one snapshot for every statement inside
        try:
            yield con
        finally:
            con.execute("COMMIT")

    def close(self) -> None:
        if not self._closed:
            self.indexes.close()  # saves current approximate indexes
        with self._all_lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.ProgrammingError:  # made in another thread that is gone: still closes
                    pass
            self._all.clear()
        self._closed = True

    # ------------------------------------------------------------------ dialect (see sql_base)
    @staticmethod
    def _json_in(value):
        return json.loads(value)

    @staticmethod
    def _unique_violation() -> type[Exception]:
        return sqlite3.IntegrityError

    def _store_samples(self, con, rows: list[SampleRow]) -> None:
        con.executemany(
            "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)",
            [(sid, pid, gid, _blob(vec), info, at) for sid, pid, gid, vec, info, at in rows],
        )

    def _count(self, con, gallery_id: str, persons: int = 0, samples: int = 0) -> int:
        """Increment the gallery's generation (and move its counts) inside the write; returns the
        generation before."""
        row = self._gallery_values(con, gallery_id, "generation")
        con.execute(
            "UPDATE galleries SET generation=generation+1, persons=persons+?, samples=samples+? WHERE id=?",
            (persons, samples, gallery_id),
        )
        return int(row[0])

    # ------------------------------------------------------------------ the in-process index
    def _added(self, gallery_id, token, added) -> None:
        self.indexes.after_write(
            gallery_id,
            token,
            lambda idx: idx.add(
                [r.id for r, _ in added], [r.person_id for r, _ in added], np.stack([v for _, v in added])
            ),
        )

    def _removed(self, gallery_id, token, person_id=None, sample_id=None) -> None:
        self.indexes.removed(gallery_id, token, [sample_id] if sample_id else [], person_id)

    def _gallery_deleted(self, gallery_id: str) -> None:
        self.indexes.forget(gallery_id)

    # what the index cache reads (facerec.gallery.index_cache.Source)
    def gallery_state(self, gallery_id: str) -> tuple[int, int, int]:
        row = self._gallery_values(self._con(), gallery_id, "generation, samples, embedding_size")
        return int(row[0]), int(row[1]), int(row[2])

    def live_samples(self, gallery_id: str) -> tuple[int, dict[str, str]]:
        with self._read() as con:
            gen = int(self._gallery_values(con, gallery_id, "generation")[0])
            rows = con.execute("SELECT id, person_id FROM samples WHERE gallery_id=?", (gallery_id,))
            return gen, dict(rows.fetchall())

    def sample_rows(self, gallery_id: str, sample_ids: list[str] | None = None):
        with self._read() as con:  # one snapshot: the generation and the rows it describes
            gen, size = (int(v) for v in self._gallery_values(con, gallery_id, "generation, embedding_size"))
            select = "SELECT id, person_id, embedding FROM samples WHERE gallery_id=?"
            if sample_ids is None:
                batches = _batches(con.execute(select, (gallery_id,)))
            else:
                batches = (
                    con.execute(f"{select} AND id IN ({','.join('?' * len(part))})", (gallery_id, *part)).fetchall()
                    for part in (sample_ids[lo : lo + 500] for lo in range(0, len(sample_ids), 500))
                )
            for rows in batches:  # in chunks: a million rows never sit twice in memory
                if rows:
                    vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), size)
                    yield gen, [r[0] for r in rows], [r[1] for r in rows], vecs

    def _after_delete(self) -> None:
        """Checkpoint and truncate the WAL, so deleted rows' old pages leave the log file too."""
        con = self._con()
        busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                "gallery store: WAL checkpoint after a deletion was blocked by a reader; "
                "it completes at the next checkpoint"
            )

    # ------------------------------------------------------------------ persons
    def import_persons(self, gallery_id: str, persons: list[tuple[str, dict, list[NewSample]]]) -> list[str]:
        """Many persons in one transaction (bulk import, benchmarks); returns their ids.

        Per batch, not per row: ids from one call of the random source, embeddings checked as one
        matrix, and the rows inserted in key order with a large page cache, so the random keys'
        B-trees are walked once in order instead of being hit at random (``facerec gallery import``)."""
        counts = [len(samples) for _, _, samples in persons]
        if any(c > MAX_SAMPLES_PER_PERSON for c in counts):
            raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples")
        ids, sids = new_ids(len(persons)), new_ids(sum(counts))
        owners = [pid for pid, c in zip(ids, counts) for _ in range(c)]
        samples = [s for _, _, group in persons for s in group]
        stamp = now()
        rows_p = sorted(
            (pid, gallery_id, check_name(name, "person name"), stored_json(metadata) if metadata else "{}", stamp)
            for pid, (name, metadata, _) in zip(ids, persons)
        )
        with self._write() as con:
            size = self._size(con, gallery_id)
            vecs = check_embeddings(np.stack([s.embedding for s in samples]), size) if samples else None
            before = self._count(con, gallery_id, len(persons), len(samples))
            con.execute(f"PRAGMA cache_size={-BULK_CACHE_KIB}")
            try:
                con.executemany("INSERT INTO persons VALUES (?, ?, ?, ?, ?)", rows_p)
                order = sorted(range(len(samples)), key=sids.__getitem__)
                con.executemany(
                    "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)",
                    ((sids[i], owners[i], gallery_id, _blob(vecs[i]),
                      json.dumps(samples[i].info) if samples[i].info else "{}", stamp) for i in order),
                )
            finally:
                con.execute("PRAGMA cache_size=-2000")  # SQLite's default
        if samples:
            self.indexes.after_write(gallery_id, before, lambda idx: idx.add(sids, owners, vecs))
        return ids

    def vacuum(self) -> None:
        """Rebuild the file without free pages (gives the space of deleted rows back to the disk)."""
        con = self._con()
        con.execute("VACUUM")
        self._after_delete()

    # ------------------------------------------------------------------ search
    def index(self, gallery_id: str):
        """The gallery's in-process index (exact or approximate), up to date with the file."""
        return self.indexes.get(gallery_id)

    def index_info(self, gallery_id: str, samples: int | None = None) -> dict:
        return self.indexes.info(gallery_id, self.gallery_state(gallery_id)[1] if samples is None else samples)

    def search(self, gallery_id, query, k, exclude_person=None) -> list[Candidate]:
        return self.index(gallery_id).search(query, k, exclude_person)


def _batches(cursor):
    while rows := cursor.fetchmany(CHUNK):
        yield rows
