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
  The in-process index of a gallery is (re)loaded when its generation differs from the file's, so a
  second process writing to the same file is seen on the next search; this process's own writes are
  applied to the index directly (no reload).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from facerec.gallery.index import Candidate, ExactIndex
from facerec.gallery.metadata import stored_json
from facerec.gallery.sql_base import SampleRow, SQLGalleryStore
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    NewSample,
    check_embedding,
    check_name,
    new_id,
    now,
)

log = logging.getLogger("facerec.gallery")

SCHEMA_VERSION = 1
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

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._indexes: dict[str, tuple[int, ExactIndex]] = {}
        self._index_lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
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
        with self._all_lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.ProgrammingError:  # made in another thread that is gone: still closes
                    pass
            self._all.clear()
        self._closed = True
        self._indexes.clear()

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
    def _after_write(self, gallery_id: str, before: int, apply) -> None:
        """Bring this process's index from generation ``before`` to ``before + 1`` with ``apply``
        (or forget it when it is at another generation: the next search reloads)."""
        with self._index_lock:
            cached = self._indexes.get(gallery_id)
            if cached is None:
                return
            if cached[0] == before:
                apply(cached[1])
                self._indexes[gallery_id] = (before + 1, cached[1])
            else:
                del self._indexes[gallery_id]

    def _added(self, gallery_id, token, added) -> None:
        self._after_write(
            gallery_id,
            token,
            lambda idx: idx.add(
                [r.id for r, _ in added], [r.person_id for r, _ in added], np.stack([v for _, v in added])
            ),
        )

    def _removed(self, gallery_id, token, person_id=None, sample_id=None) -> None:
        if person_id is not None:
            self._after_write(gallery_id, token, lambda idx: idx.remove(person_id=person_id))
        else:
            self._after_write(gallery_id, token, lambda idx: idx.remove(sample_ids={sample_id}))

    def _gallery_deleted(self, gallery_id: str) -> None:
        with self._index_lock:
            self._indexes.pop(gallery_id, None)

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
        """Many persons in one transaction (bulk import, benchmarks); returns their ids."""
        ids, rows_p, rows_s, vecs, pids = [], [], [], [], []
        with self._write() as con:
            size = self._size(con, gallery_id)
            before = self._count(con, gallery_id, len(persons), sum(len(p[2]) for p in persons))
            stamp = now()
            for name, metadata, samples in persons:
                if len(samples) > MAX_SAMPLES_PER_PERSON:
                    raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples")
                pid = new_id()
                ids.append(pid)
                rows_p.append(
                    (pid, gallery_id, check_name(name, "person name"), stored_json(metadata), stamp)
                )
                for s in samples:
                    vec = check_embedding(s.embedding, size)
                    sid = new_id()
                    rows_s.append((sid, pid, gallery_id, vec, json.dumps(s.info), stamp))
                    vecs.append(vec)
                    pids.append((sid, pid))
            con.executemany("INSERT INTO persons VALUES (?, ?, ?, ?, ?)", rows_p)
            self._store_samples(con, rows_s)
        if vecs:
            self._after_write(
                gallery_id,
                before,
                lambda idx: idx.add([s for s, _ in pids], [p for _, p in pids], np.stack(vecs)),
            )
        return ids

    def vacuum(self) -> None:
        """Rebuild the file without free pages (gives the space of deleted rows back to the disk)."""
        con = self._con()
        con.execute("VACUUM")
        self._after_delete()

    # ------------------------------------------------------------------ search
    def index(self, gallery_id: str) -> ExactIndex:
        """The gallery's in-process index, reloaded when another writer changed the gallery."""
        con = self._con()
        row = self._gallery_values(con, gallery_id, "generation, embedding_size")
        with self._index_lock:
            cached = self._indexes.get(gallery_id)
            if cached is not None and cached[0] == row[0]:
                return cached[1]
            lock = self._load_locks.setdefault(gallery_id, threading.Lock())
        with lock:  # one loader per gallery; the others wait for its result
            with self._index_lock:
                cached = self._indexes.get(gallery_id)
                if cached is not None and cached[0] >= row[0]:
                    return cached[1]
            size = int(row[1])
            with self._read() as rc:  # one snapshot: the generation and the rows it describes
                gen_row = self._gallery_values(rc, gallery_id, "generation, samples")
                idx = ExactIndex(size, capacity=max(1024, int(gen_row[1])))
                cur = rc.execute(
                    "SELECT id, person_id, embedding FROM samples WHERE gallery_id=?", (gallery_id,)
                )
                while rows := cur.fetchmany(20_000):  # in chunks: a million rows never sit twice in memory
                    vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), size)
                    idx.add([r[0] for r in rows], [r[1] for r in rows], vecs)
            with self._index_lock:
                cached = self._indexes.get(gallery_id)
                if cached is None or cached[0] < gen_row[0]:
                    self._indexes[gallery_id] = (int(gen_row[0]), idx)
            return idx

    def search(self, gallery_id, query, k, exclude_person=None) -> list[Candidate]:
        return self.index(gallery_id).search(query, k, exclude_person)
