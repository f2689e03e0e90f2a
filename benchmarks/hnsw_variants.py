"""What the HNSW graph's storage, degree and projection cost and buy, outside the store.

    python benchmarks/hnsw_variants.py --size 1000000 --configs sq8:48:64:112 flat:48:64:112 flat:48:64:64

Each config is ``storage:m:ef_construction:pca_dims`` (storage ``sq8`` or ``flat``): a FAISS HNSW
graph over the PCA projection of the face-like synthetic embeddings (``synthetic_embeddings.py``),
built on 2 threads, then searched one query at a time on one thread for each ``--ef`` and
``--want`` (candidates taken from the graph and re-ranked on the float32 vectors, as the store's
index does). Per setting: CPU ms per search, p50, and recall@1 against exact search on 200 mated
and 200 non-mated queries. This is the experiment behind the store's choices (docs/gallery.md,
"Search at scale"); the store's own numbers come from ``search_speed.py``. Appends its lines to
``--out`` (default benchmarks/results/hnsw_variants.log).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from synthetic_embeddings import CHUNK, Embeddings

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--configs", nargs="+", default=["sq8:48:64:112", "flat:48:64:112"])
    ap.add_argument("--ef", type=int, nargs="+", default=[256, 384, 512, 768, 1024])
    ap.add_argument("--want", type=int, nargs="+", default=[44, 200], help="candidates re-ranked exactly")
    ap.add_argument("--queries", type=int, default=200, help="mated queries (and as many non-mated)")
    ap.add_argument("--out", type=Path, default=RESULTS / "hnsw_variants.log")
    args = ap.parse_args()
    import faiss

    data = Embeddings("face", within=0.30)
    n = args.size
    x = np.concatenate([data.rows(lo, min(CHUNK, n - lo)) for lo in range(0, n, CHUNK)])
    qs, _ = data.queries(n, args.queries)
    exact_row, _ = data.exact_top1(qs, n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as log:
        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        say(f"# {time.strftime('%Y-%m-%d %H:%M')} size {n:,}, load average {os.getloadavg()[0]:.1f}, "
            f"configs {' '.join(args.configs)}")
        for cfg in args.configs:
            storage, m, efc, dims = cfg.split(":")
            m, efc, dims = int(m), int(efc), int(dims)
            faiss.omp_set_num_threads(2)
            c, t = time.process_time(), time.time()
            inner = (faiss.IndexHNSWFlat(dims, m, faiss.METRIC_L2) if storage == "flat" else
                     faiss.IndexHNSWSQ(dims, faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_L2))
            inner.hnsw.efConstruction = efc
            index = faiss.IndexPreTransform(faiss.PCAMatrix(x.shape[1], dims), inner)
            index.train(x[:50_000])
            index.add(x)
            say(f"{cfg} build wall {time.time() - t:.0f} s, cpu {time.process_time() - c:.0f} s")
            faiss.omp_set_num_threads(1)
            for ef in args.ef:
                for want in args.want:
                    inner_params = faiss.SearchParametersHNSW()
                    inner_params.efSearch = max(ef, want)
                    params = faiss.SearchParametersPreTransform()
                    params.index_params = inner_params
                    top, lat, c = [], [], time.process_time()
                    for q in qs:
                        t0 = time.perf_counter()
                        _, found = index.search(q[None], want, params=params)
                        got = found[0][found[0] >= 0]
                        top.append(got[np.argmax(x[got] @ q)])
                        lat.append(time.perf_counter() - t0)
                    cpu = (time.process_time() - c) / len(qs) * 1e3
                    ok = np.array(top) == exact_row
                    half = len(qs) // 2
                    say(f"  {cfg} ef {ef} want {want}: cpu/search {cpu:.2f} ms p50 {np.median(lat) * 1e3:.2f} ms "
                        f"recall@1 mated {ok[:half].mean():.3f} non-mated {ok[half:].mean():.3f}")
            del index, inner


if __name__ == "__main__":
    main()
