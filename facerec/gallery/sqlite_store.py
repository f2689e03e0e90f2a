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
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    AlreadyExists,
    GalleryRecord,
    GalleryStore,
    NewSample,
    NotFound,
    PersonRecord,
    SampleRecord,
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


class SQLiteStore(GalleryStore):
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

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _bump(con, gallery_id: str, persons: int = 0, samples: int = 0) -> int:
        """Increment the gallery's generation (and move its counts) inside the write; returns the
        generation before."""
        row = con.execute("SELECT generation FROM galleries WHERE id=?", (gallery_id,)).fetchone()
        if row is None:
            raise NotFound("gallery", gallery_id)
        con.execute(
            "UPDATE galleries SET generation=generation+1, persons=persons+?, samples=samples+? WHERE id=?",
            (persons, samples, gallery_id),
        )
        return int(row[0])

    @staticmethod
    def _person_in(con, gallery_id: str, person_id: str) -> None:
        if (
            con.execute(
                "SELECT 1 FROM persons WHERE id=? AND gallery_id=?", (person_id, gallery_id)
            ).fetchone()
            is None
        ):
            raise NotFound("person", person_id)

    def _gallery_row(self, con, gallery_id: str) -> GalleryRecord:
        row = con.execute(
            "SELECT id, name, contract_id, embedding_size, model_name, config, created_at, persons, samples, "
            "generation FROM galleries WHERE id=?",
            (gallery_id,),
        ).fetchone()
        if row is None:
            raise NotFound("gallery", gallery_id)
        return GalleryRecord(
            row[0],
            row[1],
            row[2],
            int(row[3]),
            row[4],
            json.loads(row[5]),
            row[6],
            int(row[7]),
            int(row[8]),
            int(row[9]),
        )

    def _insert_samples(
        self, con, gallery: tuple[str, int], person_id: str, samples: list[NewSample]
    ) -> list[tuple[SampleRecord, np.ndarray]]:
        gallery_id, size = gallery
        have = con.execute("SELECT count(*) FROM samples WHERE person_id=?", (person_id,)).fetchone()[0]
        if have + len(samples) > MAX_SAMPLES_PER_PERSON:
            raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples ({have} stored)")
        out = []
        for s in samples:
            vec = check_embedding(s.embedding, size)
            rec = SampleRecord(new_id(), person_id, dict(s.info), now())
            con.execute(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)",
                (rec.id, person_id, gallery_id, _blob(vec), json.dumps(rec.info), rec.created_at),
            )
            out.append((rec, vec))
        return out

    def _size(self, con, gallery_id: str) -> int:
        row = con.execute("SELECT embedding_size FROM galleries WHERE id=?", (gallery_id,)).fetchone()
        if row is None:
            raise NotFound("gallery", gallery_id)
        return int(row[0])

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

    def _purge_deleted(self) -> None:
        """Checkpoint and truncate the WAL, so deleted rows' old pages leave the log file too."""
        con = self._con()
        busy, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                "gallery store: WAL checkpoint after a deletion was blocked by a reader; "
                "it completes at the next checkpoint"
            )

    # ------------------------------------------------------------------ galleries
    def create_gallery(self, name, contract_id, embedding_size, model_name, config) -> GalleryRecord:
        name = check_name(name, "gallery name")
        rec = GalleryRecord(new_id(), name, contract_id, int(embedding_size), model_name, dict(config), now())
        try:
            with self._write() as con:
                con.execute(
                    "INSERT INTO galleries VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0)",
                    (
                        rec.id,
                        name,
                        contract_id,
                        rec.embedding_size,
                        model_name,
                        json.dumps(rec.config),
                        rec.created_at,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"a gallery named {name!r} exists already") from None
        return rec

    def list_galleries(self) -> list[GalleryRecord]:
        with self._read() as con:
            ids = [r[0] for r in con.execute("SELECT id FROM galleries ORDER BY created_at, id")]
            return [self._gallery_row(con, i) for i in ids]

    def get_gallery(self, gallery_id: str) -> GalleryRecord:
        with self._read() as con:
            return self._gallery_row(con, gallery_id)

    def update_gallery(self, gallery_id, name=None, config=None) -> GalleryRecord:
        try:
            with self._write() as con:
                self._gallery_row(con, gallery_id)
                if name is not None:
                    con.execute(
                        "UPDATE galleries SET name=? WHERE id=?",
                        (check_name(name, "gallery name"), gallery_id),
                    )
                if config is not None:
                    con.execute("UPDATE galleries SET config=? WHERE id=?", (json.dumps(config), gallery_id))
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"a gallery named {name!r} exists already") from None
        return self.get_gallery(gallery_id)

    def delete_gallery(self, gallery_id: str) -> None:
        with self._write() as con:
            if con.execute("DELETE FROM galleries WHERE id=?", (gallery_id,)).rowcount == 0:
                raise NotFound("gallery", gallery_id)
        with self._index_lock:
            self._indexes.pop(gallery_id, None)
        self._purge_deleted()

    # ------------------------------------------------------------------ persons
    def create_person(self, gallery_id, name, metadata, samples):
        name = check_name(name, "person name")
        if not samples:
            raise ValueError("a person is created with at least one sample")
        person = PersonRecord(new_id(), gallery_id, name, dict(metadata or {}), now())
        with self._write() as con:
            size = self._size(con, gallery_id)
            before = self._bump(con, gallery_id, 1, len(samples))
            con.execute(
                "INSERT INTO persons VALUES (?, ?, ?, ?, ?)",
                (person.id, gallery_id, name, json.dumps(person.metadata), person.created_at),
            )
            added = self._insert_samples(con, (gallery_id, size), person.id, samples)
        person.samples = len(added)
        self._after_write(
            gallery_id,
            before,
            lambda idx: idx.add(
                [r.id for r, _ in added], [person.id] * len(added), np.stack([v for _, v in added])
            ),
        )
        return person, [r for r, _ in added]

    def import_persons(self, gallery_id: str, persons: list[tuple[str, dict, list[NewSample]]]) -> list[str]:
        """Many persons in one transaction (bulk import, benchmarks); returns their ids."""
        ids, rows_p, rows_s, vecs, pids = [], [], [], [], []
        with self._write() as con:
            size = self._size(con, gallery_id)
            before = self._bump(con, gallery_id, len(persons), sum(len(p[2]) for p in persons))
            stamp = now()
            for name, metadata, samples in persons:
                if len(samples) > MAX_SAMPLES_PER_PERSON:
                    raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples")
                pid = new_id()
                ids.append(pid)
                rows_p.append(
                    (pid, gallery_id, check_name(name, "person name"), json.dumps(metadata or {}), stamp)
                )
                for s in samples:
                    vec = check_embedding(s.embedding, size)
                    sid = new_id()
                    rows_s.append((sid, pid, gallery_id, _blob(vec), json.dumps(s.info), stamp))
                    vecs.append(vec)
                    pids.append((sid, pid))
            con.executemany("INSERT INTO persons VALUES (?, ?, ?, ?, ?)", rows_p)
            con.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)", rows_s)
        if vecs:
            self._after_write(
                gallery_id,
                before,
                lambda idx: idx.add([s for s, _ in pids], [p for _, p in pids], np.stack(vecs)),
            )
        return ids

    def add_samples(self, gallery_id, person_id, samples):
        if not samples:
            return []
        with self._write() as con:
            size = self._size(con, gallery_id)
            self._person_in(con, gallery_id, person_id)
            before = self._bump(con, gallery_id, 0, len(samples))
            added = self._insert_samples(con, (gallery_id, size), person_id, samples)
        self._after_write(
            gallery_id,
            before,
            lambda idx: idx.add(
                [r.id for r, _ in added], [person_id] * len(added), np.stack([v for _, v in added])
            ),
        )
        return [r for r, _ in added]

    def _person_rows(self, con, where: str, args: tuple) -> list[PersonRecord]:
        rows = con.execute(
            "SELECT p.id, p.gallery_id, p.name, p.metadata, p.created_at, "
            "(SELECT count(*) FROM samples s WHERE s.person_id=p.id) FROM persons p " + where,
            args,
        )
        return [PersonRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], int(r[5])) for r in rows]

    def list_persons(self, gallery_id, limit=100, offset=0):
        with self._read() as con:
            self._gallery_row(con, gallery_id)
            return self._person_rows(
                con,
                "WHERE p.gallery_id=? ORDER BY p.created_at, p.id LIMIT ? OFFSET ?",
                (gallery_id, int(limit), int(offset)),
            )

    def get_person(self, gallery_id, person_id):
        with self._read() as con:
            self._gallery_row(con, gallery_id)
            found = self._person_rows(con, "WHERE p.id=? AND p.gallery_id=?", (person_id, gallery_id))
        if not found:
            raise NotFound("person", person_id)
        return found[0]

    def list_samples(self, gallery_id, person_id):
        with self._read() as con:
            self._gallery_row(con, gallery_id)
            self._person_in(con, gallery_id, person_id)
            rows = con.execute(
                "SELECT id, person_id, info, created_at FROM samples WHERE person_id=? "
                "ORDER BY created_at, id",
                (person_id,),
            )
            return [SampleRecord(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def update_person(self, gallery_id, person_id, name=None, metadata=None):
        with self._write() as con:
            self._gallery_row(con, gallery_id)
            self._person_in(con, gallery_id, person_id)
            if name is not None:
                con.execute(
                    "UPDATE persons SET name=? WHERE id=?", (check_name(name, "person name"), person_id)
                )
            if metadata is not None:
                con.execute("UPDATE persons SET metadata=? WHERE id=?", (json.dumps(metadata), person_id))
        return self.get_person(gallery_id, person_id)

    def delete_person(self, gallery_id, person_id):
        with self._write() as con:
            self._gallery_row(con, gallery_id)
            self._person_in(con, gallery_id, person_id)
            n = con.execute("SELECT count(*) FROM samples WHERE person_id=?", (person_id,)).fetchone()[0]
            before = self._bump(con, gallery_id, -1, -n)
            con.execute("DELETE FROM persons WHERE id=?", (person_id,))  # samples: ON DELETE CASCADE
        self._after_write(gallery_id, before, lambda idx: idx.remove(person_id=person_id))
        self._purge_deleted()

    def delete_sample(self, gallery_id, person_id, sample_id):
        with self._write() as con:
            self._gallery_row(con, gallery_id)
            self._person_in(con, gallery_id, person_id)
            before = self._bump(con, gallery_id, 0, -1)
            if (
                con.execute("DELETE FROM samples WHERE id=? AND person_id=?", (sample_id, person_id)).rowcount
                == 0
            ):
                raise NotFound("sample", sample_id)
        self._after_write(gallery_id, before, lambda idx: idx.remove(sample_ids={sample_id}))
        self._purge_deleted()

    def vacuum(self) -> None:
        """Rebuild the file without free pages (gives the space of deleted rows back to the disk)."""
        con = self._con()
        con.execute("VACUUM")
        self._purge_deleted()

    # ------------------------------------------------------------------ search
    def index(self, gallery_id: str) -> ExactIndex:
        """The gallery's in-process index, reloaded when another writer changed the gallery."""
        con = self._con()
        row = con.execute(
            "SELECT generation, embedding_size FROM galleries WHERE id=?", (gallery_id,)
        ).fetchone()
        if row is None:
            raise NotFound("gallery", gallery_id)
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
                gen_row = rc.execute(
                    "SELECT generation, samples FROM galleries WHERE id=?", (gallery_id,)
                ).fetchone()
                if gen_row is None:
                    raise NotFound("gallery", gallery_id)
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
