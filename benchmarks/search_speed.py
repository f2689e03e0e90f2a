"""Gallery search at 1k to 1M stored embeddings: latency, recall@1 against exact search, build time,
memory and the open-set decision, for each backend and index.

    nice -n 15 python benchmarks/search_speed.py --sizes 100000 1000000 --data face \\
        --label "face-like, 2026-12" [--backends sqlite pgvector] [--ivf]

Data (``benchmarks/synthetic_embeddings.py``): ``face`` (default) is shaped like the shipped model's
embeddings (a shared mean direction, ~100 effective dimensions); ``uniform`` is uniform on the
sphere (the first run's data, the worst case for graph indexes). One sample per person. Queries:
``--queries`` mated (a later photo of an enrolled person) and as many non-mated (a person never
enrolled); exact answers by brute force over the generated vectors.

Per size, through the stores' own ``search`` (top-10 persons, what the service calls):

- ``sqlite exact``: the in-process exact index (its first search after a restart loads it);
- ``sqlite hnsw``: the approximate index (faiss HNSW over 8-bit codes, candidates re-ranked on the
  float32 vectors): its build (wall and CPU seconds), file size, load after a restart, and per
  ``--ef`` value the latency with faiss on 2 threads and on 1 (``faiss.omp_set_num_threads``),
  recall@1 against exact search (mated, non-mated), and the open-set result: DIR at FPIR 1e-1 and
  1e-2 with the threshold set on its own non-mated scores, next to exact search's;
- ``--ivf``: a faiss IVF index (8-bit codes, nlist = 4 sqrt(N)) on the same vectors, outside the
  store, to compare with HNSW (build, latency, recall per nprobe);
- ``pgvector``: exact scan, then an HNSW index per ``--pg-hnsw m:ef_construction`` (built after
  the import with ``--pg-work-mem``) and per ``--pg-ef`` value its latency and recall@1.

The import rate is rows per wall second and per CPU second (the machine is shared: say so when
reporting). Writes benchmarks/results/search_speed.{json,md}, keeping earlier runs under their labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facerec.gallery import IndexPolicy, NewSample, fpir_threshold
from facerec.gallery.ann_file import ann_path
from facerec.sysinfo import cpu_name

from synthetic_embeddings import CHUNK, DIM, Embeddings  # noqa: I001 - benchmarks/ is the script's folder

K = 10
FPIRS = (0.1, 0.01)


def fill(store, gallery_id: str, size: int, data: Embeddings, budget_s: float) -> dict:
    """Import ``size`` persons in chunks; the rates count the store's time only (not the data's)."""
    wall = cpu = 0.0
    ids: list[str] = []
    for start in tqdm(range(0, size, CHUNK), desc=f"{store.backend} import {size:,}", unit="chunk", leave=False):
        n = min(CHUNK, size - start)
        v = data.rows(start, n)
        t, c = time.perf_counter(), time.process_time()
        ids += store.import_persons(gallery_id, [(f"p{start + i}", {}, [NewSample(v[i], {})]) for i in range(n)])
        wall, cpu = wall + time.perf_counter() - t, cpu + time.process_time() - c
        if start + n < size and wall / (start + n) * size > budget_s:
            return {"completed": False, "imported": start + n, "seconds": wall, "projected_s": wall / (start + n) * size}
    return {"completed": True, "imported": size, "seconds": round(wall, 2), "rows_per_s": round(size / wall),
            "rows_per_cpu_s": round(size / cpu), "ids": ids}


def timed(fn, qs) -> tuple[dict, list]:
    """Wall latency per query (p50, p95) and the process's CPU time per query (mean): on a shared
    machine the wall clock also counts the time other jobs hold the cores."""
    times, answers = [], []
    c = time.process_time()
    for q in qs:
        t = time.perf_counter()
        answers.append(fn(q))
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - c) / len(qs) * 1e3
    ms = np.array(times) * 1e3
    return {"queries": len(qs), "median_ms": round(float(np.median(ms)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3), "mean_ms": round(float(ms.mean()), 3),
            "cpu_ms_per_query": round(cpu, 3)}, answers


def quality(answers, truth: dict) -> dict:
    """recall@1 against exact search (mated, non-mated) and DIR at FPIR vs exact search's."""
    top = [a[0].person_id if a else None for a in answers]
    score = np.array([a[0].similarity if a else -1.0 for a in answers], np.float64)
    mated, exact_top, mate = truth["mated"], truth["exact_person"], truth["mate"]
    same = np.array([t == e for t, e in zip(top, exact_top)])
    out = {"exact_dir_at_fpir": truth.get("exact_quality", {}).get("dir_at_fpir"),
           "recall_at_1_mated": float(same[mated].mean()) if mated.any() else None,
           "recall_at_1_nonmated": float(same[~mated].mean()) if (~mated).any() else None,
           "top1_is_mate": float(np.mean([t == m for t, m in zip(np.array(top)[mated], mate[mated])]))}
    if (~mated).any():
        out["dir_at_fpir"] = {}
        for f in FPIRS:
            if (~mated).sum() * f < 1:
                continue
            t = fpir_threshold(score[~mated], f)
            hit = np.array([tp == m for tp, m in zip(top, mate)]) & (score >= t)
            out["dir_at_fpir"][f"{f:g}"] = {"threshold": t, "dir": float(hit[mated].mean())}
    return out


def exact_truth(data: Embeddings, size: int, qs, rows, ids) -> dict:
    exact_row, exact_score = data.exact_top1(qs, size)
    mated = rows >= 0
    truth = {"mated": mated, "exact_person": [ids[r] for r in exact_row],
             "mate": np.array([ids[r] if r >= 0 else None for r in rows], dtype=object)}
    fake = [[type("C", (), {"person_id": ids[r], "similarity": float(s)})()] for r, s in zip(exact_row, exact_score)]
    truth["exact_quality"] = quality(fake, truth)  # DIR at FPIR of exact search itself
    return truth


def bench_sqlite(size, data, args, folder: Path) -> list[dict]:
    from facerec.gallery.sqlite_store import SQLiteStore

    path = folder / f"speed_{size}.sqlite3"
    store = SQLiteStore(path, index=IndexPolicy(kind="exact"))
    g = store.create_gallery("speed", "synthetic", DIM, "synthetic", {})
    load = fill(store, g.id, size, data, args.budget_s)
    base = {"backend": "sqlite", "size": size, "data": data.describe(),
            "import": {k: v for k, v in load.items() if k != "ids"}}
    if not load["completed"]:
        store.close()
        return [{**base, "method": "in-process exact (numpy)"}]
    ids = load["ids"]
    store.close()
    qs, rows = data.queries(size, args.queries)
    truth = exact_truth(data, size, qs, rows, ids)
    out = []
    store = SQLiteStore(path, index=IndexPolicy(kind="exact"))  # a restarted service
    t = time.perf_counter()
    store.search(g.id, qs[0], K)
    exact_q = qs[:: max(1, len(qs) // args.exact_queries)]
    search, _ = timed(lambda q: store.search(g.id, q, K), exact_q)
    out.append({**base, "method": "in-process exact (numpy)", "index_load_s": round(time.perf_counter() - t, 2),
                "search": search, "quality": truth["exact_quality"],
                "file_mb": round(sum(p.stat().st_size for p in folder.glob(path.name + "*")) / 2**20, 1)})
    store.close()
    if args.hnsw:
        out += bench_hnsw(path, g.id, size, base, qs, truth, args)
    if args.ivf and size <= args.ivf_max:
        out.append(bench_ivf(data, size, base, qs, truth, ids))
    for p in folder.glob(path.name + "*"):
        p.unlink()
    return out


def bench_hnsw(path, gallery_id, size, base, qs, truth, args) -> list[dict]:
    from facerec.gallery.sqlite_store import SQLiteStore

    policy = IndexPolicy(kind="approximate", m=args.m, ef_construction=args.ef_construction,
                         recall_queries=args.recall_queries, target_recall=args.target_recall)
    store = SQLiteStore(path, index=policy)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    store.search(gallery_id, qs[0], K)  # reads the rows, builds, measures recall, saves the file
    first = time.perf_counter() - t
    info = store.index_info(gallery_id)
    file_mb = ann_path(path, gallery_id).stat().st_size / 2**20
    store.close()
    store = SQLiteStore(path, index=policy)
    t = time.perf_counter()
    store.search(gallery_id, qs[0], K)
    reload_s = time.perf_counter() - t
    index = store.index(gallery_id)
    common = {**base, "build": info["build"], "first_search_s": round(first, 1), "index_file_mb": round(file_mb, 1),
              "max_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1),
              "index_load_s": round(reload_s, 2), "leave_one_out": info["recall"]}
    out = []
    pca = f"PCA {info['pca_dims']}, " if info.get("pca_dims") else ""
    chosen, fallback = index.ef_search, index.exact_fallback
    for i, ef in enumerate([chosen] + [e for e in args.ef if e != chosen]):
        how = f"ef_search {ef}" + (f" (its own choice for recall {args.target_recall})" if i == 0 else "")
        if i == 0 and fallback:
            how = f"its own choice for recall {args.target_recall}: every sample compared (the graph needed " \
                  f"ef_search {ef}, slower)"
        row = {**common, "method": f"in-process HNSW (faiss, m {args.m}, ef_construction {args.ef_construction}, "
               f"{pca}sq8, exact re-ranking), {how}", "ef_search": ef, "search_by_threads": {}}
        index.ef_search, index.exact_fallback = ef, fallback and i == 0
        for threads in (2, 1):  # 1 (the default): what the service runs
            index.policy = dataclasses.replace(policy, search_threads=threads)
            row["search_by_threads"][threads], answers = timed(lambda q: store.search(gallery_id, q, K), qs)
        row["search"] = row["search_by_threads"][1]
        row["quality"] = quality(answers, truth)
        out.append(row)
    store.close()
    return out


def bench_ivf(data: Embeddings, size, base, qs, truth, ids) -> dict:
    """IVF with 8-bit codes on the same vectors (outside the store), exact re-ranking of 40 candidates."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # the build on every core (searches set 1)
    nlist = int(4 * np.sqrt(size))
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    t, c = time.perf_counter(), time.process_time()
    train = np.random.default_rng(0).choice(size, min(size, 64 * nlist), replace=False)
    ivf.train(data.picked(np.sort(train), 0))
    vecs = np.concatenate([data.rows(lo, min(CHUNK, size - lo)) for lo in range(0, size, CHUNK)])
    ivf.add(vecs)
    build = {"seconds": round(time.perf_counter() - t, 2), "cpu_seconds": round(time.process_time() - c, 2),
             "threads": faiss.omp_get_max_threads()}
    row = {**base, "method": f"IVF (faiss, nlist {nlist}, sq8, exact re-ranking of 40), outside the store",
           "build": build, "by_nprobe": {}}
    faiss.omp_set_num_threads(1)
    for nprobe in (8, 16, 32, 64):
        params = faiss.SearchParametersIVF(nprobe=nprobe)

        def search(q):
            _, found = ivf.search(q[None], 40, params=params)
            cand = found[0][found[0] >= 0]
            best = cand[np.argmax(vecs[cand] @ q)]
            return [type("C", (), {"person_id": ids[best], "similarity": float(vecs[best] @ q)})()]

        stats, answers = timed(search, qs)
        row["by_nprobe"][nprobe] = {"search": stats, "quality": quality(answers, truth)}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return row


def bench_pg(size, data, args, dsn) -> list[dict]:
    from facerec.gallery.pgvector_store import PgVectorStore

    store = PgVectorStore(dsn, purge="none")
    g = store.create_gallery(f"speed{size}", "synthetic", DIM, "synthetic", {})
    load = fill(store, g.id, size, data, args.budget_s)
    base = {"backend": "pgvector", "size": size, "data": data.describe(),
            "import": {k: v for k, v in load.items() if k != "ids"}}
    if not load["completed"]:
        store.delete_gallery(g.id)
        store.close()
        return [{**base, "method": "exact (sequential scan)"}]
    ids = load["ids"]
    with store._pool.connection() as con:
        con.execute("VACUUM ANALYZE facerec_samples")
        base["table_mb"] = round(con.execute("SELECT pg_total_relation_size('facerec_samples')").fetchone()[0] / 2**20, 1)
    qs, rows = data.queries(size, args.queries)
    truth = exact_truth(data, size, qs, rows, ids)
    exact_q = qs[:: max(1, len(qs) // args.exact_queries)]
    search, _ = timed(lambda q: store.search(g.id, q, K, exact=True), exact_q)
    results = [{**base, "method": "exact (sequential scan)", "search": search, "quality": truth["exact_quality"]}]
    if size <= args.hnsw_max:
        for spec in args.pg_hnsw:
            m, efc = (int(x) for x in spec.split(":"))
            store.drop_hnsw_index(g.id)
            t = time.perf_counter()  # the build's CPU is the server's, not this process's
            store.create_hnsw_index(g.id, m=m, ef_construction=efc, maintenance_work_mem=args.pg_work_mem)
            build = round(time.perf_counter() - t, 1)
            for ef in args.pg_ef:
                stats, answers = timed(lambda q: store.search(g.id, q, K, ef_search=ef), qs)
                results.append({**base, "method": f"HNSW (m {m}, ef_construction {efc}, ef_search {ef})",
                                "build_s": build, "maintenance_work_mem": args.pg_work_mem, "ef_search": ef,
                                "search": stats, "quality": quality(answers, truth)})
    store.delete_gallery(g.id)
    store.close()
    return results


def _cell(r: dict) -> list[str]:
    imp = r["import"]
    rate = f"{imp['rows_per_s']:,}" + (f" ({imp['rows_per_cpu_s']:,} per CPU-s)" if "rows_per_cpu_s" in imp else "")
    load = f"{r['index_load_s']:.2f} s" if "index_load_s" in r else "-"
    q = r.get("quality", {})
    if "recall_at_1_mated" in q:
        nm = q["recall_at_1_nonmated"]
        quality = f"{q['recall_at_1_mated']:.3f} / {'-' if nm is None else f'{nm:.3f}'}"
    elif "recall_at_1" in r:
        quality = f"{r['recall_at_1']:.2f} (all mated)"
    else:
        quality = f"top-1 = source {r.get('top1_is_source', 1.0):.2f}" if "top1_is_source" in r else "-"
    dir_ = q.get("dir_at_fpir", {}).get("0.01")
    exact_dir = (q.get("exact_dir_at_fpir") or {}).get("0.01")
    build = r.get("build") or ({"seconds": r["build_s"]} if "build_s" in r else None)
    build = "-" if not build else f"{build['seconds']:.0f} s" + (f" ({build['cpu_seconds']:.0f} CPU-s)" if "cpu_seconds" in build else "")
    mem = (f"{r['index_file_mb']:,.0f} MB" if "index_file_mb" in r else
           f"{r['table_mb']:,.0f} MB table" if "table_mb" in r else
           f"{r['file_mb']:,.0f} MB file" if "file_mb" in r else "-")
    s = r["search"]
    two = r.get("search_by_threads", {}).get(2) or r.get("search_by_threads", {}).get("2")
    p50 = f"{s['median_ms']:.2f}" + (f" ({two['median_ms']:.2f})" if two else "")
    cpu = f"{s['cpu_ms_per_query']:.2f}" if "cpu_ms_per_query" in s else "-"
    return [r["backend"], r["method"], f"{r['size']:,}", rate, load, p50, f"{s['p95_ms']:.2f}", cpu, quality,
            "-" if dir_ is None else f"{100 * dir_['dir']:.1f}%" + (
                f" ({100 * exact_dir['dir']:.1f}%)" if exact_dir and exact_dir is not dir_ else ""), build, mem]


def render(results: dict) -> str:
    lines = ["# Gallery search speed", "",
             "Runs newest first, each with its command, its CPU and the load average at its start. The "
             "development machine has 2 cores, at times shared with a training job at higher priority "
             "(those runs ran at `nice 15`: their latencies and build times are pessimistic, and their p95 "
             "measures the other jobs). CPU milliseconds per search move least with the load.", ""]
    for label, report in results["runs"].items():
        lines += [f"## {label}", "", f"Command: `{report['command']}`", "",
                  f"CPU: {report['cpu']} ({report['cores']} cores, load average {report['load_average_at_start'][0]:.1f} "
                  f"at the start); data: {report.get('data', 'uniform random unit vectors')}; {report['dim']}-d, one "
                  "sample per person, top-10 persons per search through the store's `search`.", "",
                  "| backend | method | stored | import rows/s | index load | p50 ms, 1 thread (2) | p95 ms "
                  "| CPU ms / search | recall@1 vs exact: mated / non-mated | DIR @ FPIR 1e-2 (exact search) | build "
                  "| memory / size |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if not r["import"]["completed"]:
                imp = r["import"]
                lines.append(f"| {r['backend']} | {r['method']} | {r['size']:,} | not reached: {imp['imported']:,} rows "
                             f"in {imp['seconds']:.0f} s, projected {imp['projected_s'] / 60:.0f} min > budget |"
                             " | | | | | | | |")
            elif "by_nprobe" in r:
                for nprobe, x in r["by_nprobe"].items():
                    row = {**r, "method": r["method"].replace("outside", f"nprobe {nprobe}, outside"), **x}
                    lines.append("| " + " | ".join(_cell(row)) + " |")
            else:
                lines.append("| " + " | ".join(_cell(r)) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "pgvector"], choices=["sqlite", "pgvector"])
    ap.add_argument("--data", choices=["face", "uniform"], default="face", help="synthetic embeddings (see above)")
    ap.add_argument("--within", type=float, default=0.30, help="face data: photo variance (0.54: the shipped model)")
    ap.add_argument("--label", default=None, help="the run's name in the results (default: data and date)")
    ap.add_argument("--queries", type=int, default=200, help="mated queries (and as many non-mated)")
    ap.add_argument("--exact-queries", type=int, default=50, help="queries timed with exact search")
    ap.add_argument("--no-hnsw", dest="hnsw", action="store_false", help="skip the in-process HNSW index")
    ap.add_argument("--ivf", action="store_true", help="also a faiss IVF index, to compare with HNSW")
    ap.add_argument("--ivf-max", type=int, default=100_000, help="the IVF comparison up to this size")
    ap.add_argument("--ef", type=int, nargs="+", default=[256, 512, 1024, 2048],
                    help="HNSW ef_search values measured besides the index's own choice")
    ap.add_argument("--m", type=int, default=IndexPolicy.m, help="HNSW degree")
    ap.add_argument("--ef-construction", type=int, default=IndexPolicy.ef_construction, help="HNSW ef_construction")
    ap.add_argument("--target-recall", type=float, default=IndexPolicy.target_recall,
                    help="recall@1 the index chooses its ef_search for")
    ap.add_argument("--recall-queries", type=int, default=IndexPolicy.recall_queries,
                    help="leave-one-out searches measured at build")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="largest import time per backend and size")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="pgvector: HNSW indexes up to this size")
    ap.add_argument("--pg-hnsw", nargs="+", default=["16:64"], help="pgvector HNSW builds, m:ef_construction")
    ap.add_argument("--pg-ef", type=int, nargs="+", default=[40, 100, 200, 400], help="pgvector ef_search values")
    ap.add_argument("--pg-work-mem", default="1GB", help="maintenance_work_mem for the pgvector HNSW build")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    data = Embeddings(args.data, within=args.within)
    report = {"command": "python benchmarks/search_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k not in ("out", "hnsw", "ivf", "label")) +
              ("" if args.hnsw else " --no-hnsw") + (" --ivf" if args.ivf else ""),
              "cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine(), "nice": os.nice(0),
              "load_average_at_start": os.getloadavg(), "dim": DIM, "data": data.describe(), "results": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or f"{data.describe()}, {time.strftime('%Y-%m-%d')}"
    old = json.loads((out / "search_speed.json").read_text()) if (out / "search_speed.json").exists() else {}
    if old and "runs" not in old:  # the first run's file: kept as a run of its own
        old = {"runs": {"uniform random vectors, exact search and pgvector HNSW (before the in-process HNSW "
                        "index)": old}}
    runs = {label: report, **{k: v for k, v in old.get("runs", {}).items() if k != label}}

    def save() -> None:
        (out / "search_speed.json").write_text(json.dumps({"runs": runs}, indent=1, default=str))
        (out / "search_speed.md").write_text(render({"runs": runs}))

    with tempfile.TemporaryDirectory(prefix="facerec-speed-") as tmp:
        if "sqlite" in args.backends:
            for size in args.sizes:
                report["results"] += bench_sqlite(size, data, args, Path(tmp))
                save()
        if "pgvector" in args.backends:
            from facerec.gallery.testing import fresh_database, pg_server

            server = pg_server(Path(tmp) / "pg")
            for size in args.sizes:
                report["results"] += bench_pg(size, data, args, fresh_database(server))
                save()
    print(render({"runs": {label: report}}))


if __name__ == "__main__":
    main()
