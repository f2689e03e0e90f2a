"""What the two SQL backends share: every statement of the store interface except search.

:class:`~facerec.gallery.sqlite_store.SQLiteStore` and
:class:`~facerec.gallery.pgvector_store.PgVectorStore` hold the same three tables (galleries,
persons, samples) and answer the interface with the same statements, in the same order, under the
same checks. :class:`SQLGalleryStore` runs them once; a backend says only what differs:

- the SQL it speaks: its tables' name prefix (``_prefix``), the driver's placeholder (``_param``: ``?`` or
  ``%s``), how a JSON value is written (``_json_param``: text, or text cast to ``jsonb``), how a
  row that a write must hold is locked (``_lock_clause``) and how a gallery's generation is read
  (``_generation``: a column, or ``0`` where the backend keeps none). Statements here are written
  with ``?`` and ``{galleries}``, ``{persons}``, ``{samples}``, ``{json}``, ``{generation}``;
  :meth:`SQLGalleryStore._sql` renders them for the backend;
- how a JSON column comes back (:meth:`_json_in`: text to decode, or already decoded);
- its transactions (:meth:`_read`, :meth:`_write`: context managers yielding a connection whose
  ``execute`` returns a cursor), the error a duplicate gallery name raises
  (:meth:`_unique_violation`), how sample rows with their embeddings are inserted
  (:meth:`_store_samples`) and what a deletion is followed by (:meth:`_after_delete`);
- optionally, what it keeps besides the tables: :meth:`_count` returns a token (SQLite: the
  gallery's generation before the write) handed after the commit to :meth:`_added` /
  :meth:`_removed` / :meth:`_gallery_deleted` (SQLite: its in-process index), and
  :meth:`_gallery_deleting` runs inside the transaction that deletes a gallery (pgvector: its
  HNSW index).

Schema, connections, bulk import, vacuum and search stay in each backend's module.
"""

from __future__ import annotations

import abc
import functools
import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from facerec.gallery.metadata import STORE_LIMITS, check_metadata, read_metadata
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    AlreadyExists,
    GalleryRecord,
    GalleryStore,
    NotFound,
    PersonRecord,
    SampleRecord,
    check_embedding,
    check_name,
    new_id,
    now,
)

if TYPE_CHECKING:
    from facerec.gallery.store import NewSample

log = logging.getLogger(__name__)

#: Largest OFFSET of a listing: both databases take a signed 64-bit integer; a larger one is a
#: caller's error (ValueError), not a driver overflow.
MAX_OFFSET = 2**63 - 1

#: One sample row as inserted: (id, person_id, gallery_id, unit embedding, info as JSON text, created_at).
SampleRow = tuple[str, str, str, np.ndarray, str, str]


@functools.cache
def _render(cls: type, text: str) -> str:
    tables = {t: cls._prefix + t for t in ("galleries", "persons", "samples")}
    return text.format(json=cls._json_param, generation=cls._generation, **tables).replace("?", cls._param)


class SQLGalleryStore(GalleryStore):
    """The store interface over a SQL database; subclasses supply the dialect and the connections."""

    _prefix = ""
    _param = "?"
    _json_param = "?"
    _lock_clause = ""
    _generation = "generation"

    # ------------------------------------------------------------------ what a backend supplies
    @abc.abstractmethod
    def _read(self):
        """Context manager: a connection inside one read transaction (one snapshot)."""

    @abc.abstractmethod
    def _write(self):
        """Context manager: a connection inside one write transaction (rolled back on an error)."""

    @staticmethod
    @abc.abstractmethod
    def _json_in(value):
        """A JSON column's value as the driver returns it, decoded."""

    @staticmethod
    @abc.abstractmethod
    def _unique_violation() -> type[Exception]:
        """The driver's error for a duplicate gallery name."""

    @abc.abstractmethod
    def _store_samples(self, con, rows: list[SampleRow]) -> None:
        """Insert sample rows (embeddings in the backend's own format)."""

    @abc.abstractmethod
    def _after_delete(self) -> None:
        """After a committed deletion: make the deleted rows' bytes go (as far as the backend can)."""

    def _count(self, con, gallery_id: str, persons: int, samples: int):
        """Move the gallery's counts inside the write; returns the token the after-commit hooks get."""
        con.execute(
            self._sql("UPDATE {galleries} SET persons=persons+?, samples=samples+? WHERE id=?"),
            (persons, samples, gallery_id),
        )

    def _added(self, gallery_id: str, token, added: list[tuple[SampleRecord, np.ndarray]]) -> None:
        """After the commit: samples were added (nothing to do unless the backend keeps an index)."""

    def _removed(
        self, gallery_id: str, token, person_id: str | None = None, sample_id: str | None = None
    ) -> None:
        """After the commit: a person (with its samples) or one sample was deleted."""

    def _gallery_deleting(self, con, gallery_id: str) -> None:
        """Inside the transaction that deletes the gallery (its rows are gone already)."""

    def _gallery_deleted(self, gallery_id: str) -> None:
        """After the commit that deleted the gallery, before :meth:`_after_delete`."""

    # ------------------------------------------------------------------ helpers
    def _sql(self, text: str) -> str:
        return _render(type(self), text)

    def _gallery_values(self, con, gallery_id: str, columns: str, lock: bool = False) -> tuple:
        """``columns`` of the gallery's row (locked for the write when ``lock``); NotFound if none."""
        row = con.execute(
            self._sql(f"SELECT {columns} FROM {{galleries}} WHERE id=?")
            + (self._lock_clause if lock else ""),
            (gallery_id,),
        ).fetchone()
        if row is None:
            raise NotFound("gallery", gallery_id)
        return row

    def _size(self, con, gallery_id: str, lock: bool = False) -> int:
        """The gallery's embedding size (and so: that the gallery exists)."""
        return int(self._gallery_values(con, gallery_id, "embedding_size", lock)[0])

    def _person_in(self, con, gallery_id: str, person_id: str, lock: bool = False) -> None:
        row = con.execute(
            self._sql("SELECT 1 FROM {persons} WHERE id=? AND gallery_id=?")
            + (self._lock_clause if lock else ""),
            (person_id, gallery_id),
        ).fetchone()
        if row is None:
            raise NotFound("person", person_id)

    def _gallery_row(self, con, gallery_id: str) -> GalleryRecord:
        row = self._gallery_values(
            con,
            gallery_id,
            "id, name, contract_id, embedding_size, model_name, config, created_at, persons, samples, "
            "{generation}",
        )
        return GalleryRecord(
            row[0],
            row[1],
            row[2],
            int(row[3]),
            row[4],
            self._json_in(row[5]),
            row[6],
            int(row[7]),
            int(row[8]),
            int(row[9]),
        )

    def _sample_count(self, con, person_id: str) -> int:
        return con.execute(
            self._sql("SELECT count(*) FROM {samples} WHERE person_id=?"), (person_id,)
        ).fetchone()[0]

    def _insert_samples(
        self, con, gallery_id: str, size: int, person_id: str, samples: list[NewSample]
    ) -> list[tuple[SampleRecord, np.ndarray]]:
        have = self._sample_count(con, person_id)
        if have + len(samples) > MAX_SAMPLES_PER_PERSON:
            raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples ({have} stored)")
        out = []
        for s in samples:
            vec = check_embedding(s.embedding, size)
            out.append((SampleRecord(new_id(), person_id, dict(s.info), now()), vec))
        self._store_samples(
            con, [(r.id, person_id, gallery_id, v, json.dumps(r.info), r.created_at) for r, v in out]
        )
        return out

    def _set_fields(
        self, con, table: str, row_id: str, name: str | None, what: str, column: str, value: dict | None
    ) -> None:
        """``name`` (checked as ``what``) and the JSON ``column`` of one row, each when not None."""
        if name is not None:
            con.execute(
                self._sql(f"UPDATE {{{table}}} SET name=? WHERE id=?"), (check_name(name, what), row_id)
            )
        if value is not None:
            con.execute(
                self._sql(f"UPDATE {{{table}}} SET {column}={{json}} WHERE id=?"), (json.dumps(value), row_id)
            )

    def _person_rows(self, con, where: str, args: tuple) -> list[PersonRecord]:
        rows = con.execute(
            self._sql(
                "SELECT p.id, p.gallery_id, p.name, p.metadata, p.created_at, "
                "(SELECT count(*) FROM {samples} s WHERE s.person_id=p.id) FROM {persons} p " + where
            ),
            args,
        ).fetchall()
        out = []
        for r in rows:
            # A row written before metadata was checked may not be returnable: it is shown as {}
            # with the reason, so one bad row cannot break every listing and search.
            metadata, error = read_metadata(r[3])
            if error is not None:
                log.warning("gallery %s: person %s has unreadable metadata: %s", r[1], r[0], error)
            out.append(PersonRecord(r[0], r[1], r[2], metadata, r[4], int(r[5]), error))
        return out

    # ------------------------------------------------------------------ galleries
    def create_gallery(self, name, contract_id, embedding_size, model_name, config) -> GalleryRecord:
        duplicate = self._unique_violation()
        name = check_name(name, "gallery name")
        rec = GalleryRecord(new_id(), name, contract_id, int(embedding_size), model_name, dict(config), now())
        try:
            with self._write() as con:
                con.execute(
                    self._sql(
                        "INSERT INTO {galleries} (id, name, contract_id, embedding_size, model_name, config, "
                        "created_at) VALUES (?, ?, ?, ?, ?, {json}, ?)"
                    ),
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
        except duplicate:
            raise AlreadyExists(f"a gallery named {name!r} exists already") from None
        return rec

    def list_galleries(self) -> list[GalleryRecord]:
        with self._read() as con:
            ids = [r[0] for r in con.execute(self._sql("SELECT id FROM {galleries} ORDER BY created_at, id"))]
            return [self._gallery_row(con, i) for i in ids]

    def get_gallery(self, gallery_id: str) -> GalleryRecord:
        with self._read() as con:
            return self._gallery_row(con, gallery_id)

    def update_gallery(self, gallery_id, name=None, config=None) -> GalleryRecord:
        duplicate = self._unique_violation()
        try:
            with self._write() as con:
                self._size(con, gallery_id, lock=True)
                self._set_fields(con, "galleries", gallery_id, name, "gallery name", "config", config)
        except duplicate:
            raise AlreadyExists(f"a gallery named {name!r} exists already") from None
        return self.get_gallery(gallery_id)

    def delete_gallery(self, gallery_id: str) -> None:
        with self._write() as con:
            if con.execute(self._sql("DELETE FROM {galleries} WHERE id=?"), (gallery_id,)).rowcount == 0:
                raise NotFound("gallery", gallery_id)
            self._gallery_deleting(con, gallery_id)
        self._gallery_deleted(gallery_id)
        self._after_delete()

    # ------------------------------------------------------------------ persons
    def create_person(self, gallery_id, name, metadata, samples):
        name = check_name(name, "person name")
        metadata = dict(check_metadata({} if metadata is None else metadata, STORE_LIMITS))
        if not samples:
            raise ValueError("a person is created with at least one sample")
        person = PersonRecord(new_id(), gallery_id, name, metadata, now())
        with self._write() as con:
            size = self._size(con, gallery_id)
            con.execute(
                self._sql("INSERT INTO {persons} VALUES (?, ?, ?, {json}, ?)"),
                (person.id, gallery_id, name, json.dumps(person.metadata), person.created_at),
            )
            added = self._insert_samples(con, gallery_id, size, person.id, samples)
            token = self._count(con, gallery_id, 1, len(added))
        person.samples = len(added)
        self._added(gallery_id, token, added)
        return person, [r for r, _ in added]

    def add_samples(self, gallery_id, person_id, samples):
        if not samples:
            return []
        with self._write() as con:
            size = self._size(con, gallery_id)
            self._person_in(con, gallery_id, person_id, lock=True)
            added = self._insert_samples(con, gallery_id, size, person_id, samples)
            token = self._count(con, gallery_id, 0, len(added))
        self._added(gallery_id, token, added)
        return [r for r, _ in added]

    def list_persons(self, gallery_id, limit=100, offset=0):
        if not (1 <= int(limit) <= MAX_OFFSET and 0 <= int(offset) <= MAX_OFFSET):
            raise ValueError(f"limit must be 1..{MAX_OFFSET} and offset 0..{MAX_OFFSET}")
        with self._read() as con:
            self._size(con, gallery_id)
            return self._person_rows(
                con,
                "WHERE p.gallery_id=? ORDER BY p.created_at, p.id LIMIT ? OFFSET ?",
                (gallery_id, int(limit), int(offset)),
            )

    def get_person(self, gallery_id, person_id):
        with self._read() as con:
            self._size(con, gallery_id)
            found = self._person_rows(con, "WHERE p.id=? AND p.gallery_id=?", (person_id, gallery_id))
        if not found:
            raise NotFound("person", person_id)
        return found[0]

    def list_samples(self, gallery_id, person_id):
        with self._read() as con:
            self._size(con, gallery_id)
            self._person_in(con, gallery_id, person_id)
            rows = con.execute(
                self._sql(
                    "SELECT id, person_id, info, created_at FROM {samples} WHERE person_id=? "
                    "ORDER BY created_at, id"
                ),
                (person_id,),
            ).fetchall()
        return [SampleRecord(r[0], r[1], self._json_in(r[2]), r[3]) for r in rows]

    def update_person(self, gallery_id, person_id, name=None, metadata=None):
        if metadata is not None:
            check_metadata(metadata, STORE_LIMITS)
        with self._write() as con:
            self._size(con, gallery_id)
            self._person_in(con, gallery_id, person_id, lock=True)
            self._set_fields(con, "persons", person_id, name, "person name", "metadata", metadata)
        return self.get_person(gallery_id, person_id)

    def delete_person(self, gallery_id, person_id):
        with self._write() as con:
            self._size(con, gallery_id)
            self._person_in(con, gallery_id, person_id, lock=True)
            n = self._sample_count(con, person_id)
            # samples: ON DELETE CASCADE
            con.execute(self._sql("DELETE FROM {persons} WHERE id=?"), (person_id,))
            token = self._count(con, gallery_id, -1, -n)
        self._removed(gallery_id, token, person_id=person_id)
        self._after_delete()

    def delete_sample(self, gallery_id, person_id, sample_id):
        with self._write() as con:
            self._size(con, gallery_id)
            self._person_in(con, gallery_id, person_id, lock=True)
            deleted = con.execute(
                self._sql("DELETE FROM {samples} WHERE id=? AND person_id=?"), (sample_id, person_id)
            ).rowcount
            if deleted == 0:
                raise NotFound("sample", sample_id)
            token = self._count(con, gallery_id, 0, -1)
        self._removed(gallery_id, token, sample_id=sample_id)
        self._after_delete()
