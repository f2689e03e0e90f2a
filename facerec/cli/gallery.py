"""``facerec gallery``: bulk import into a gallery, and its search index, without the service.

    facerec gallery import people.npz --gallery office [--create]          # embeddings file
    facerec gallery import photos/ --gallery office --model models/default # <person>/<photo> tree
    facerec gallery index --gallery office                                 # build / show the index

The store is the service's: ``--db`` (SQLite file; default ``FACEREC_GALLERY_PATH`` or
``$XDG_DATA_HOME/facerec/galleries.sqlite3``) or ``--dsn`` (PostgreSQL + pgvector; default
``FACEREC_GALLERY_DSN`` when ``FACEREC_GALLERY_BACKEND=pgvector``). See docs/gallery.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

EPILOG = """\
An embeddings file is an .npz with `embeddings` (N x D), `names` (N; rows with one name become one
person) and `contract_id` (the model's embedding contract; it must be the gallery's). A folder tree
is <person>/<photo>; its photos go through --model's pipeline and the default enrollment gate
(--no-gate: all photos with a face). After the import the gallery's index is built: the SQLite
store's approximate index (from FACEREC_GALLERY_INDEX_MIN_SAMPLES samples on) or pgvector's HNSW
index (--pg-hnsw), so the first search does not wait for it.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="gallery_command", metavar="{import,index}", required=True)
    imp = sub.add_parser("import", help="import an embeddings file or a <person>/<photo> tree into a gallery",
                         description="Import persons in bulk (batched transactions, a progress bar).",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("source", help="an embeddings .npz, or a folder of <person>/<photo>")
    _store_arguments(imp)
    imp.add_argument("--create", action="store_true",
                     help="create the gallery when there is none of that name (contract from --model or the file)")
    imp.add_argument("--model", default=None,
                     help="model folder: embeds a folder tree; pins a created gallery to its contract")
    imp.add_argument("--no-gate", action="store_true", help="folder tree: keep every photo with a face")
    imp.add_argument("--batch", type=int, default=20_000, help="rows per transaction (default: %(default)d)")
    imp.add_argument("--no-index", action="store_true", help="do not build the search index after the import")
    idx = sub.add_parser("index", help="build (or rebuild) a gallery's search index and print what it is",
                         description="Build the gallery's search index now and print its kind, "
                         "parameters and measured recall@1.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _store_arguments(idx)
    idx.add_argument("--rebuild", action="store_true",
                     help="SQLite: build the approximate index afresh (new parameters, after many deletions)")


def _store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", required=True, help="gallery name (or id)")
    p.add_argument("--db", default=None, help="SQLite gallery file (default: FACEREC_GALLERY_PATH or the service's)")
    p.add_argument("--dsn", default=None, help="PostgreSQL DSN: the pgvector backend instead of SQLite")
    p.add_argument("--index-kind", choices=["auto", "exact", "approximate"], default=None,
                   help="SQLite index (default: FACEREC_GALLERY_INDEX or auto)")
    p.add_argument("--min-samples", type=int, default=None,
                   help="auto: approximate index from this many samples (default: "
                   "FACEREC_GALLERY_INDEX_MIN_SAMPLES or 50000)")
    p.add_argument("--pg-hnsw", action="store_true",
                   help="pgvector: build the HNSW index (m, ef_construction as docs/gallery.md chose them); "
                   "an import rebuilds an index the gallery had anyway")
    p.add_argument("--pg-work-mem", default="1GB",
                   help="pgvector: maintenance_work_mem for the HNSW build (default: %(default)s)")


def _open(args):
    from facerec.gallery import IndexPolicy, default_sqlite_path, open_store

    dsn = args.dsn or (os.environ.get("FACEREC_GALLERY_DSN")
                       if os.environ.get("FACEREC_GALLERY_BACKEND") == "pgvector" else None)
    if dsn:
        return open_store("pgvector", dsn=dsn, purge="none")
    kind = args.index_kind or os.environ.get("FACEREC_GALLERY_INDEX", "auto")
    min_samples = args.min_samples if args.min_samples is not None else int(
        os.environ.get("FACEREC_GALLERY_INDEX_MIN_SAMPLES", 50_000))
    try:
        policy = IndexPolicy(kind=kind, min_samples=min_samples)
    except RuntimeError as err:  # approximate without faiss
        raise SystemExit(str(err)) from None
    return open_store("sqlite", path=Path(args.db) if args.db else default_sqlite_path(), index=policy)


def _find(store, name: str):
    for g in store.list_galleries():
        if name in (g.name, g.id):
            return g
    return None


def _contract_of(model_dir: str):
    from facerec.bundle import ModelBundle

    return ModelBundle(model_dir).contract()


def run(args) -> int:
    from facerec.gallery.store import GalleryError

    store = _open(args)
    try:
        if args.gallery_command == "import":
            return _import(args, store)
        return _index(args, store)
    except GalleryError as err:
        raise SystemExit(str(err)) from None
    finally:
        store.close()


def _import(args, store) -> int:
    from facerec.gallery import GalleryConfig
    from facerec.gallery import bulk

    source = Path(args.source)
    if not source.exists():
        raise SystemExit(f"no such file or folder: {source}")
    model = None
    if source.is_dir():
        if args.model is None:
            raise SystemExit("a folder tree is embedded by a model: pass --model MODEL_DIR")
        from facerec.gallery.measure import OfflineModel

        model = OfflineModel(args.model)
        contract = model.contract
        contract_id, size = contract.contract_id, contract.embedding_size
        model_name = f"{contract.model_name} {contract.model_version}"
    else:
        try:
            data = bulk.read_embeddings(source)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        contract_id, size, model_name = data.contract_id, data.embeddings.shape[1], data.model_name
        if args.model is not None:
            contract = _contract_of(args.model)
            if contract.contract_id != contract_id:
                raise SystemExit(f"{source} holds embeddings of contract {contract_id}; --model {args.model} "
                                 f"has {contract.contract_id}")
            model_name = f"{contract.model_name} {contract.model_version}"
    gallery = _find(store, args.gallery)
    if gallery is None:
        if not args.create:
            raise SystemExit(f"no gallery {args.gallery!r} (pass --create to make it)")
        gallery = store.create_gallery(args.gallery, contract_id, size, model_name, GalleryConfig().model_dump())
        print(f"created gallery {gallery.name!r} ({gallery.id}), contract {contract_id}")
    if gallery.contract_id != contract_id or gallery.embedding_size != size:
        raise SystemExit(f"gallery {gallery.name!r} holds contract {gallery.contract_id} ({gallery.embedding_size}-d); "
                         f"the import is contract {contract_id} ({size}-d): embeddings of different models "
                         "are not comparable")
    if model is not None:
        emb, names, infos, refused = bulk.measure_folder(model, source, gate=not args.no_gate)
        if refused:
            print("left out: " + ", ".join(f"{k} {v}" for k, v in sorted(refused.items())))
    else:
        emb, names, infos = data.embeddings, data.names, None
    had_hnsw = store.backend == "pgvector" and store.index_info(gallery.id)["kind"] == "pgvector_hnsw"
    if had_hnsw:
        store.drop_hnsw_index(gallery.id)  # built again after the rows: one build, not row by row
    t0 = time.perf_counter()
    try:
        persons = bulk.import_embeddings(store, gallery.id, emb, names, infos, batch_rows=args.batch)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    seconds = time.perf_counter() - t0
    print(f"imported {persons:,} persons, {len(emb):,} samples in {seconds:.1f} s "
          f"({len(emb) / max(seconds, 1e-9):,.0f} rows/s)")
    if not args.no_index or had_hnsw:
        _index(args, store, gallery, pg_hnsw=had_hnsw)
    return 0


def _index(args, store, gallery=None, pg_hnsw: bool = False) -> int:
    gallery = gallery or _find(store, args.gallery)
    if gallery is None:
        raise SystemExit(f"no gallery {args.gallery!r}")
    gallery = store.get_gallery(gallery.id)
    t0 = time.perf_counter()
    if store.backend == "pgvector":
        if args.pg_hnsw or pg_hnsw:
            store.create_hnsw_index(gallery.id, maintenance_work_mem=args.pg_work_mem)
    elif gallery.samples:
        if getattr(args, "rebuild", False):
            store.indexes.rebuild(gallery.id)
        store.index(gallery.id)  # loads, reconciles or builds it
        store.indexes.wait()
        store.indexes.save(gallery.id)
    info = store.index_info(gallery.id, gallery.samples)
    print(f"index of {gallery.name!r} ({gallery.samples:,} samples, {time.perf_counter() - t0:.1f} s): "
          + json.dumps(info))
    return 0
