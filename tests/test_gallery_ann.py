"""The approximate gallery index (faiss HNSW, exact re-ranking) and bulk import, on small synthetic
galleries with fixed seeds: re-ranked scores are the exact ones, deleted people are never returned
(in memory, after a reload, and their vectors leave the index file), the switch from exact to
approximate at the configured size, the index file's reconcile with writes of another process,
rebuilds after deletions, a clear refusal without faiss, and `facerec gallery import`."""

from __future__ import annotations

import numpy as np
import pytest

from facerec.gallery import IndexPolicy, NewSample
from facerec.gallery import ann as ann_mod
from facerec.gallery import ann_file, ann_policy
from facerec.gallery.sqlite_store import SQLiteStore
from facerec.gallery.store import check_embedding

faiss = pytest.importorskip("faiss")
pytestmark = pytest.mark.timeout(180)
D = 32


def clustered(rng, n, d=D, clusters=20, spread=0.6):
    """Unit vectors around a few centres (face embeddings are clustered, not uniform)."""
    centres = rng.normal(size=(clusters, d))
    v = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def brute_force(vecs, owners, q, k, exclude=None):
    """(person, best-sample cosine) of the k best persons."""
    best: dict = {}
    for o, s in zip(owners, vecs @ q):
        if o != exclude and s > best.get(o, -2):
            best[o] = float(s)
    return sorted(best.items(), key=lambda x: -x[1])[:k]


def approx(tmp_path, **kw) -> IndexPolicy:
    return IndexPolicy(kind="approximate", ef_search=128, recall_queries=64, **kw)


def test_candidates_are_scored_exactly_and_top1_matches_exact():
    rng = np.random.default_rng(0)
    vecs = clustered(rng, 3000)
    owners = [f"p{i // 3}" for i in range(3000)]  # three samples per person
    idx = ann_mod.ApproxIndex(D, IndexPolicy(kind="approximate", ef_search=128))
    idx.add([f"s{i}" for i in range(3000)], owners, vecs)
    queries = clustered(rng, 60)
    agree = 0
    for q in queries:
        got = idx.search(q, 5)
        want = brute_force(vecs, owners, q / np.linalg.norm(q), 5)
        exact = dict(brute_force(vecs, owners, q / np.linalg.norm(q), 10**6))
        for c in got:  # every returned score is the person's exact best-sample cosine
            assert c.similarity == pytest.approx(exact[c.person_id], abs=1e-5)
        assert len({c.person_id for c in got}) == len(got) == 5
        agree += got[0].person_id == want[0][0]
        if want[0][0] in {c.person_id for c in got}:  # then the open-set decision is the exact one
            assert got[0].similarity == pytest.approx(want[0][1], abs=1e-5)
    assert agree >= 0.95 * len(queries)
    recall = idx.measure_recall(queries=200)
    assert recall["queries"] == 200 and recall["recall_at_1"] >= 0.95


def test_deleted_people_are_never_returned_nor_kept_in_the_file(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.sqlite3"
    s = SQLiteStore(path, index=approx(tmp_path))
    g = s.create_gallery("g", "c", D, "m", {})
    vecs = clustered(rng, 600)
    ids = s.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs)])
    assert s.index(g.id).kind == "hnsw"
    s.close()  # saves the index file
    s = SQLiteStore(path, index=approx(tmp_path))
    gone = [0, 7, 300]
    for i in gone:
        s.delete_person(g.id, ids[i])
    for i in gone:
        assert ids[i] not in {c.person_id for c in s.search(g.id, vecs[i], 50)}
    assert s.search(g.id, vecs[1], 1)[0].person_id == ids[1]

    def in_files(vec) -> bool:
        data = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("g.sqlite3"))
        return np.asarray(check_embedding(vec, D), "<f4").tobytes() in data

    assert in_files(vecs[1]) and not any(in_files(vecs[i]) for i in gone)
    header, loaded = ann_file.load(ann_file.ann_path(path, g.id), IndexPolicy())
    codes, state = loaded.storage_codes(), loaded.state()

    def labels(i):
        return np.flatnonzero(state["codes"] == state["persons"].index(ids[i]))

    assert header["generation"] == s.get_gallery(g.id).generation  # scrubs kept the file current
    assert codes[labels(1)].any()
    for i in gone:  # the quantised copies are zero too, and the labels dead
        assert not codes[labels(i)].any() and not state["alive"][labels(i)].any()
    s.close()
    s = SQLiteStore(path, index=approx(tmp_path))  # after a restart: still gone
    for i in gone:
        assert ids[i] not in {c.person_id for c in s.search(g.id, vecs[i], 50)}
    s.delete_gallery(g.id)
    assert not [f for f in tmp_path.iterdir() if "-ann-" in f.name]
    s.close()


def test_exact_below_the_size_then_approximate_built_in_the_background(tmp_path):
    rng = np.random.default_rng(2)
    policy = IndexPolicy(kind="auto", min_samples=400, ef_search=128, recall_queries=64)
    s = SQLiteStore(tmp_path / "g.sqlite3", index=policy)
    g = s.create_gallery("g", "c", D, "m", {})
    vecs = clustered(rng, 700)
    ids = s.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs[:300])])
    assert s.index(g.id).kind == "exact" and s.index_info(g.id)["kind"] == "exact"
    ids += s.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs[300:600])])
    s.indexes.wait()
    more, _ = s.create_person(g.id, "late", {}, [NewSample(vecs[600], {})])
    index = s.index(g.id)
    assert index.kind == "hnsw" and len(index) == 601
    info = s.index_info(g.id)
    assert info["recall"]["queries"] == 64 and info["recall"]["recall_at_1"] >= 0.9
    from service.routes.gallery_schemas import IndexOut

    shown = IndexOut(**info)  # what GET /v1/galleries/{id} answers
    assert shown.kind == "hnsw" and shown.recall.ef_search == 128 and shown.loaded
    for i in range(0, 600, 37):
        assert s.search(g.id, vecs[i], 1)[0].person_id == ids[i]
    assert s.search(g.id, vecs[600], 1)[0].person_id == more.id
    s.close()


def test_another_process_writes_are_reconciled(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "g.sqlite3"
    a, b = SQLiteStore(path, index=approx(tmp_path)), SQLiteStore(path, index=approx(tmp_path))
    g = a.create_gallery("g", "c", D, "m", {})
    vecs = clustered(rng, 500)
    ids = a.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs[:400])])
    assert a.search(g.id, vecs[3], 1)[0].person_id == ids[3]  # a builds and saves its index
    assert b.search(g.id, vecs[4], 1)[0].person_id == ids[4]  # b loads a's file
    new = b.import_persons(g.id, [(f"q{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs[400:])])
    b.delete_person(g.id, ids[5])
    assert a.search(g.id, vecs[450], 1)[0].person_id == new[50]  # a reconciles with the file
    assert ids[5] not in {c.person_id for c in a.search(g.id, vecs[5], 20)}
    a.close()
    b.close()


def test_rebuild_after_deletions(tmp_path):
    rng = np.random.default_rng(4)
    s = SQLiteStore(tmp_path / "g.sqlite3", index=approx(tmp_path, rebuild_dead_fraction=0.2))
    g = s.create_gallery("g", "c", D, "m", {})
    vecs = clustered(rng, 300)
    ids = s.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs)])
    s.index(g.id)
    for i in range(0, 300, 4):  # a quarter of them
        s.delete_person(g.id, ids[i])
    s.indexes.wait()
    index = s.index(g.id)
    # rebuilt once a fifth was dead (deletions during the build are tombstones in the new graph)
    assert len(index) == 225 and index.labels < 300 and index.dead_fraction() <= 0.2
    assert s.search(g.id, vecs[1], 1)[0].person_id == ids[1]
    assert ids[4] not in {c.person_id for c in s.search(g.id, vecs[4], 20)}
    s.close()


def test_without_faiss_exact_search_or_a_clear_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(ann_policy, "faiss_module", lambda: None)
    with pytest.raises(RuntimeError, match=r"needs faiss.*facerec\[search\]"):
        IndexPolicy(kind="approximate")
    s = SQLiteStore(tmp_path / "g.sqlite3", index=IndexPolicy(kind="auto", min_samples=10))
    g = s.create_gallery("g", "c", D, "m", {})
    vecs = clustered(np.random.default_rng(5), 50)
    ids = s.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs)])
    assert s.index(g.id).kind == "exact" and s.search(g.id, vecs[9], 1)[0].person_id == ids[9]
    s.close()


def test_gallery_import_command(tmp_path, capsys):
    from facerec.cli import main
    from facerec.cli.usage import CommandError
    from facerec.gallery.bulk import write_embeddings

    vecs = clustered(np.random.default_rng(6), 500)
    names = [f"person {i // 2}" for i in range(500)]  # two samples each
    source = write_embeddings(tmp_path / "people.npz", vecs, names, "c1", "m 1")
    db = tmp_path / "g.sqlite3"
    args = ["gallery", "import", str(source), "--gallery", "g", "--db", str(db), "--min-samples", "100"]
    with pytest.raises(CommandError, match="no gallery 'g' .pass --create"):
        main(args)
    assert main([*args, "--create"]) == 0
    out = capsys.readouterr().out
    assert "imported 250 persons, 500 samples" in out and '"kind": "hnsw"' in out  # index built after it
    s = SQLiteStore(db, index=IndexPolicy(min_samples=100))
    g = s.list_galleries()[0]
    assert (g.name, g.contract_id, g.persons, g.samples) == ("g", "c1", 250, 500)
    assert ann_file.read_header(ann_file.ann_path(db, g.id))["generation"] == g.generation
    top = s.search(g.id, vecs[6], 1)[0]
    assert s.get_person(g.id, top.person_id).name == "person 3" and top.similarity == pytest.approx(1.0)
    s.close()
    other = write_embeddings(tmp_path / "other.npz", vecs[:3], names[:3], "c2")
    with pytest.raises(CommandError, match="contract c1.*contract c2.*not comparable"):
        main(["gallery", "import", str(other), "--gallery", "g", "--db", str(db)])
    np.savez(tmp_path / "bad.npz", embeddings=vecs[:3], names=np.array(names[:3]))
    with pytest.raises(CommandError, match="missing contract_id"):
        main(["gallery", "import", str(tmp_path / "bad.npz"), "--gallery", "g", "--db", str(db)])


def test_gallery_import_of_a_photo_tree(tmp_path, capsys):
    import shutil
    from pathlib import Path

    from facerec.cli import main

    root = Path(__file__).parent / "data" / "lfw_sample"
    people = ["Al_Sharpton", "David_Beckham", "Boris_Becker"]
    for name in people:
        shutil.copytree(root / name, tmp_path / "photos" / name)
    model = Path(__file__).parents[1] / "models" / "default"
    db = tmp_path / "g.sqlite3"
    assert main(["gallery", "import", str(tmp_path / "photos"), "--gallery", "g", "--create", "--db", str(db),
                 "--model", str(model), "--no-gate"]) == 0
    s = SQLiteStore(db)
    g = s.list_galleries()[0]
    photos = sum(len(list((tmp_path / "photos" / n).iterdir())) for n in people)
    assert sorted(p.name for p in s.list_persons(g.id)) == sorted(people) and g.samples == photos
    assert "imported 3 persons" in capsys.readouterr().out
    s.close()


def test_a_gallery_enrolled_one_by_one_is_retrained_as_it_grows(tmp_path):
    """sq8 learns its ranges from the first vectors: from one vector every code would be alike."""
    rng = np.random.default_rng(7)
    s = SQLiteStore(tmp_path / "g.sqlite3", index=approx(tmp_path))
    g = s.create_gallery("g", "c", D, "m", {})
    vecs = clustered(rng, 201)
    ids = []
    for i, v in enumerate(vecs[:200]):
        ids.append(s.create_person(g.id, f"p{i}", {}, [NewSample(v, {})])[0].id)
        s.index(g.id)  # the index exists from the first person on
    s.indexes.wait()  # the rebuilds that ran while enrolling have finished; one more write
    ids.append(s.create_person(g.id, "p200", {}, [NewSample(vecs[200], {})])[0].id)  # starts any still due
    s.indexes.wait()
    index = s.index(g.id)
    assert index.kind == "hnsw" and index.trained_on >= 100
    assert sum(s.search(g.id, vecs[i], 1)[0].person_id == ids[i] for i in range(200)) >= 198
    s.close()


def test_open_set_metrics_through_the_index_equal_exact_ones():
    """openset_eval --index hnsw: DIR at FPIR and rank-1 as the approximate index answers them."""
    from facerec.gallery import identification_metrics
    from facerec.gallery.openset import approximate_top1

    rng = np.random.default_rng(8)
    centres = clustered(rng, 400)  # 400 people; 200 enrolled
    photos = centres[np.repeat(np.arange(400), 3)] + 0.08 * rng.normal(size=(1200, D)).astype(np.float32)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    names = np.repeat([f"n{i}" for i in range(400)], 3)
    enrolled = np.arange(0, 600, 3)  # the first photo of the first 200 people
    probes = np.setdiff1d(np.arange(1200), enrolled)
    args = (photos[enrolled], names[enrolled], photos[probes], names[probes], (0.1, 0.01), {"t": 0.8})
    exact = identification_metrics(*args)
    approx = identification_metrics(*args, top1=approximate_top1(photos[enrolled], names[enrolled]))
    assert approx["rank1"] == pytest.approx(exact["rank1"], abs=0.003)
    for f in ("0.1", "0.01"):
        assert approx["dir_at_fpir"][f]["dir"] == pytest.approx(exact["dir_at_fpir"][f]["dir"], abs=0.005)
    assert approx["at_threshold"]["t"] == pytest.approx(exact["at_threshold"]["t"], abs=0.005)


def test_low_rank_embeddings_get_a_pca_graph_that_saves_loads_and_scrubs(tmp_path):
    """Face embeddings hold their variance in a fraction of the dimensions: the graph then works on
    the principal components (L2, so the projection's centring does not bias the order)."""
    rng = np.random.default_rng(9)
    basis = np.linalg.qr(rng.normal(size=(64, 12)))[0].T  # a 12-dimensional subspace of 64
    vecs = (0.5 + clustered(rng, 3000, d=12)) @ basis + 0.001 * rng.normal(size=(3000, 64))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    owners = [f"{10**6 + i:032x}" for i in range(3000)]  # the file keeps ids as 16 bytes: hex ones
    idx = ann_mod.ApproxIndex(64, IndexPolicy(kind="approximate", ef_search=128))
    idx.add([f"{i:032x}" for i in range(3000)], owners, vecs)
    assert idx.pca_dims() == 16
    queries = vecs[:100] + 0.05 * rng.normal(size=(100, 64)).astype(np.float32)
    hits = sum(idx.search(q, 1)[0].person_id == brute_force(vecs, owners, q / np.linalg.norm(q), 1)[0][0]
               for q in queries)
    assert hits >= 97
    path = tmp_path / "index"
    ann_file.save(idx, path, "g", generation=3)
    assert ann_file.scrub(path, [f"{5:032x}"], before=3) == 1
    header, loaded = ann_file.load(path, IndexPolicy(ef_search=128))
    assert header["generation"] == 4 and loaded.pca_dims() == 16 and len(loaded) == 2999
    assert not loaded.storage_codes()[5].any() and loaded.storage_codes()[6].any()
    assert owners[5] not in {c.person_id for c in loaded.search(vecs[5], 20)}
    assert loaded.search(vecs[6], 1)[0].person_id == owners[6]


def test_pgvector_import_builds_its_hnsw_index_after_the_rows(tmp_path, capsys):
    from facerec.cli import main
    from facerec.gallery.bulk import write_embeddings
    from facerec.gallery.pgvector_store import HNSW_EF_SEARCH, HNSW_M, PgVectorStore
    from facerec.gallery.testing import PgUnavailable, fresh_database, pg_required, pg_server

    try:
        dsn = fresh_database(pg_server())
    except PgUnavailable as exc:
        if pg_required():
            raise
        pytest.skip(f"no PostgreSQL + pgvector server on this platform: {exc}")
    vecs = clustered(np.random.default_rng(10), 300)
    source = write_embeddings(tmp_path / "p.npz", vecs, [f"n{i}" for i in range(300)], "c1")
    args = ["gallery", "import", str(source), "--gallery", "g", "--dsn", dsn, "--pg-work-mem", "64MB"]
    assert main([*args, "--create", "--pg-hnsw"]) == 0
    assert '"kind": "pgvector_hnsw"' in capsys.readouterr().out
    assert main(args) == 0  # the second import drops the index and builds it again after its rows
    s = PgVectorStore(dsn)
    g = s.list_galleries()[0]
    assert g.samples == 600
    info = s.index_info(g.id)
    assert (info["kind"], info["m"], info["ef_search"]) == ("pgvector_hnsw", HNSW_M, HNSW_EF_SEARCH)
    assert s.get_person(g.id, s.search(g.id, vecs[7], 1)[0].person_id).name == "n7"
    s.drop_hnsw_index(g.id)
    assert s.index_info(g.id) == {"kind": "exact"}
    with pytest.raises(ValueError, match="maintenance_work_mem"):
        s.create_hnsw_index(g.id, maintenance_work_mem="1GB; DROP TABLE x")
    s.close()


def test_the_index_chooses_the_smallest_ef_search_that_reaches_its_target_recall(tmp_path):
    rng = np.random.default_rng(11)
    vecs = clustered(rng, 3000, clusters=300, spread=1.5)  # near-uniform, and a sparse graph: a hard case
    policy = IndexPolicy(kind="approximate", m=4, ef_construction=8, target_recall=0.99, recall_queries=300)
    idx = ann_mod.ApproxIndex(D, policy)
    idx.add([f"{i:032x}" for i in range(3000)], [f"{10**6 + i:032x}" for i in range(3000)], vecs)
    recall = idx.measure_recall()
    tried = [int(ef) for ef in recall["by_ef_search"]]
    assert len(tried) >= 3 and tried == list(ann_mod.EF_LADDER[: len(tried)]) and idx.ef_search == recall["ef_search"] == tried[-1]
    assert recall["recall_at_1"] >= 0.99 and all(r < 0.99 for r in list(recall["by_ef_search"].values())[:-1])
    ann_file.save(idx, tmp_path / "index", "g", generation=1)
    assert ann_file.load(tmp_path / "index", policy)[1].ef_search == idx.ef_search  # kept with the graph
    assert ann_file.load(tmp_path / "index", IndexPolicy(ef_search=40))[1].ef_search == 40  # a fixed one rules


def test_where_the_graph_is_slower_than_comparing_everything_the_index_searches_exactly():
    """On embeddings without structure (uniform) the ef_search a recall needs can cost more than
    comparing every sample: measure_recall then switches the index to that exact comparison."""
    rng = np.random.default_rng(12)
    vecs = clustered(rng, 2000)
    owners = [f"p{i // 2}" for i in range(2000)]
    idx = ann_mod.ApproxIndex(D, IndexPolicy(kind="approximate"))
    idx.add([f"s{i}" for i in range(2000)], owners, vecs)
    recall = idx.measure_recall(queries=50)
    assert recall["searching"] in ("graph", "exact") and recall["graph_ms"] > 0 and recall["exact_ms"] > 0
    idx.exact_fallback = True
    idx.remove(person_id="p3")
    for q in clustered(rng, 20):
        u = q / np.linalg.norm(q)
        want = brute_force(vecs[[o != "p3" for o in owners]], [o for o in owners if o != "p3"], u, 5, "p0")
        got = idx.search(q, 5, exclude_person="p0")
        assert [(c.person_id, round(c.similarity, 5)) for c in got] == [(p, round(x, 5)) for p, x in want]
