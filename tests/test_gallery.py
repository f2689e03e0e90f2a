"""facerec.gallery without HTTP: both stores (SQLite and a real PostgreSQL + pgvector server) on the
same tests, the exact index against brute force, the open-set threshold and metrics on hand-computed
cases, the enrollment gate, the manager (contract pinning, thresholds, duplicates) and head pose."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from facerec.contract import ContractMismatchError, EmbeddingContract
from facerec.data.align import ARCFACE_TEMPLATE
from facerec.data.pose import estimate_pose, head_poses, project
from facerec.gallery import (
    MAX_SAMPLES_PER_PERSON,
    AlreadyExists,
    EnrollmentPolicy,
    ExactIndex,
    FaceEvidence,
    GalleryConfig,
    GalleryManager,
    NewSample,
    NotFound,
    Offered,
    OpenSetCalibration,
    Reason,
    ThresholdRequired,
    assess,
    calibrate,
    fpir_threshold,
    identification_metrics,
)
from facerec.gallery.index import top_persons
from facerec.gallery.openset import pair_model_threshold, per_person_max
from facerec.gallery.sqlite_store import SQLiteStore
from facerec.gallery.store import check_embedding
from facerec.gallery.testing import (
    PgUnavailable,
    fresh_database,
    pg_required,
    pg_server,
)

pytestmark = pytest.mark.timeout(120)
D = 16


def unit(rng, n, d=D):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def pg(tmp_path_factory):
    try:
        return pg_server()
    except PgUnavailable as exc:
        if pg_required():
            raise
        pytest.skip(f"no PostgreSQL + pgvector server on this platform: {exc}")


@pytest.fixture(params=["sqlite", "pgvector"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "g.sqlite3")
    else:
        from facerec.gallery.pgvector_store import PgVectorStore

        s = PgVectorStore(fresh_database(request.getfixturevalue("pg")), purge="full")
    yield s
    s.close()


# ----------------------------------------------------------------------------------------- stores
def test_crud_counts_and_cascade(store):
    rng = np.random.default_rng(0)
    g = store.create_gallery("g", "c1", D, "m 1", {"target_fpir": 0.01})
    with pytest.raises(AlreadyExists):
        store.create_gallery("g", "c1", D, "m 1", {})
    other = store.create_gallery("other", "c1", D, "m 1", {})
    p1, s1 = store.create_person(g.id, "Ann", {"k": 1}, [NewSample(v, {"q": 1}) for v in unit(rng, 3)])
    p2, _ = store.create_person(g.id, "Bob", {}, [NewSample(unit(rng, 1)[0], {})])
    assert [s.info for s in s1] == [{"q": 1}] * 3
    rec = store.get_gallery(g.id)
    assert (rec.persons, rec.samples, rec.contract_id, rec.config) == (2, 4, "c1", {"target_fpir": 0.01})
    assert [p.name for p in store.list_persons(g.id)] == ["Ann", "Bob"]
    assert [p.name for p in store.list_persons(g.id, limit=1, offset=1)] == ["Bob"]
    assert store.get_person(g.id, p1.id).samples == 3
    with pytest.raises(NotFound):
        store.get_person(other.id, p1.id)  # a person is only reachable through its gallery
    store.update_person(g.id, p1.id, name="Anne", metadata={"k": 2})
    assert (store.get_person(g.id, p1.id).name, store.get_person(g.id, p1.id).metadata) == ("Anne", {"k": 2})
    store.add_samples(g.id, p2.id, [NewSample(unit(rng, 1)[0], {})])
    store.delete_sample(g.id, p1.id, s1[0].id)
    assert store.get_gallery(g.id).samples == 4 and len(store.list_samples(g.id, p1.id)) == 2
    with pytest.raises(NotFound):
        store.delete_sample(g.id, p1.id, s1[0].id)
    store.delete_person(g.id, p1.id)
    assert store.get_gallery(g.id).persons == 1 and store.get_gallery(g.id).samples == 2
    with pytest.raises(NotFound):
        store.get_person(g.id, p1.id)
    store.update_gallery(g.id, name="renamed", config={"x": 1})
    assert store.get_gallery(g.id).name == "renamed" and store.get_gallery(g.id).config == {"x": 1}
    store.delete_gallery(g.id)
    assert [x.name for x in store.list_galleries()] == ["other"]
    with pytest.raises(NotFound):
        store.list_persons(g.id)


def test_input_checks(store):
    rng = np.random.default_rng(1)
    g = store.create_gallery("g", "c1", D, "m", {})
    with pytest.raises(ValueError, match="embedding has 8 values"):
        store.create_person(g.id, "x", {}, [NewSample(unit(rng, 1, 8)[0], {})])
    with pytest.raises(ValueError, match="finite"):
        store.create_person(g.id, "x", {}, [NewSample(np.zeros(D), {})])
    with pytest.raises(ValueError, match="empty"):
        store.create_person(g.id, "  ", {}, [NewSample(unit(rng, 1)[0], {})])
    with pytest.raises(ValueError, match="at least one sample"):
        store.create_person(g.id, "x", {}, [])
    p, _ = store.create_person(g.id, "x", {}, [NewSample(v, {}) for v in unit(rng, MAX_SAMPLES_PER_PERSON)])
    with pytest.raises(ValueError, match=f"at most {MAX_SAMPLES_PER_PERSON}"):
        store.add_samples(g.id, p.id, [NewSample(unit(rng, 1)[0], {})])
    assert store.get_gallery(g.id).samples == MAX_SAMPLES_PER_PERSON  # the refused write left nothing


def test_search_is_exact_against_brute_force(store):
    rng = np.random.default_rng(2)
    g = store.create_gallery("g", "c1", D, "m", {})
    counts = rng.integers(1, 6, size=40)
    vecs, owners, ids = [], [], []
    for i, c in enumerate(counts):
        v = unit(rng, int(c))
        p, _ = store.create_person(g.id, f"p{i}", {}, [NewSample(x, {}) for x in v])
        vecs.append(v)
        owners += [i] * int(c)
        ids.append(p.id)
    vecs = np.concatenate(vecs)
    for q in unit(rng, 10):
        best = np.full(len(counts), -np.inf)
        np.maximum.at(best, np.array(owners), vecs @ q)
        order = np.argsort(-best)[:7]
        got = store.search(g.id, q, 7)
        assert [c.person_id for c in got] == [ids[i] for i in order]
        assert [c.similarity for c in got] == pytest.approx(best[order].tolist(), abs=1e-5)
        excluded = store.search(g.id, q, 3, exclude_person=ids[order[0]])
        assert [c.person_id for c in excluded] == [ids[i] for i in order[1:4]]
    assert store.search(store.create_gallery("empty", "c1", D, "m", {}).id, unit(rng, 1)[0], 3) == []


def test_concurrent_writers_and_readers(store):
    rng = np.random.default_rng(3)
    g = store.create_gallery("g", "c1", D, "m", {})
    vecs = unit(rng, 40)
    errors: list[BaseException] = []
    made: dict[int, str] = {}

    def writer(k):
        try:
            for i in range(k, 40, 4):
                made[i] = store.create_person(g.id, f"p{i}", {}, [NewSample(vecs[i], {})])[0].id
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader():
        try:
            for q in vecs[:20]:
                for c in store.search(g.id, q, 3):
                    assert -1.0 <= c.similarity <= 1.0
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert store.get_gallery(g.id).persons == 40
    for i in (0, 17, 39):  # every vector finds its own person at similarity 1
        top = store.search(g.id, vecs[i], 1)[0]
        assert top.person_id == made[i] and top.similarity == pytest.approx(1.0, abs=1e-5)


def test_sqlite_second_process_view_stays_in_sync(tmp_path):
    """Two stores on one file (as two server processes would be): writes of one are seen by the
    other's in-process index at its next search, deletions included."""
    rng = np.random.default_rng(4)
    a, b = SQLiteStore(tmp_path / "g.sqlite3"), SQLiteStore(tmp_path / "g.sqlite3")
    g = a.create_gallery("g", "c1", D, "m", {})
    v = unit(rng, 2)
    p, _ = a.create_person(g.id, "x", {}, [NewSample(v[0], {})])
    assert b.search(g.id, v[0], 1)[0].person_id == p.id  # b loads its index
    q, _ = b.create_person(g.id, "y", {}, [NewSample(v[1], {})])
    assert a.search(g.id, v[1], 1)[0].person_id == q.id  # a's index reloads (generation changed)
    b.delete_person(g.id, q.id)
    assert [c.person_id for c in a.search(g.id, v[1], 5)] == [p.id]
    a.close()
    b.close()


def test_sqlite_deleted_embeddings_leave_the_file(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "g.sqlite3"
    s = SQLiteStore(path)
    g = s.create_gallery("g", "c1", D, "m", {})
    keep, gone = unit(rng, 2)
    s.create_person(g.id, "keep", {}, [NewSample(keep, {})])
    p, _ = s.create_person(g.id, "gone", {}, [NewSample(gone, {})])

    def on_disk(vec) -> bool:  # the bytes the store writes: the re-normalised float32 vector
        data = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("g.sqlite3"))
        return np.asarray(check_embedding(vec, D), "<f4").tobytes() in data

    assert on_disk(gone) and on_disk(keep)  # the check can see embeddings
    s.delete_person(g.id, p.id)
    assert not on_disk(gone) and on_disk(keep)
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 1
    assert con.execute("PRAGMA foreign_keys").fetchone() is not None
    con.close()
    s.close()


def test_pgvector_full_purge_and_hnsw(pg):
    from facerec.gallery.pgvector_store import PgVectorStore

    rng = np.random.default_rng(6)
    dsn = fresh_database(pg)
    s = PgVectorStore(dsn, purge="full")
    g = s.create_gallery("g", "c1", D, "m", {})
    vecs = unit(rng, 200)
    ids = s.import_persons(g.id, [(f"p{i}", {}, [NewSample(v, {})]) for i, v in enumerate(vecs)])
    exact = [s.search(g.id, q, 1, exact=True)[0].person_id for q in vecs[:20]]
    assert exact == ids[:20]
    s.create_hnsw_index(g.id)
    approx = [s.search(g.id, q, 1)[0].person_id for q in vecs[:20]]
    assert approx == ids[:20]  # the indexed search finds each stored vector itself
    s.delete_person(g.id, ids[0])
    assert s.search(g.id, vecs[0], 1, exact=True)[0].person_id != ids[0]
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as con:
        assert (
            con.execute("SELECT count(*) FROM facerec_samples WHERE person_id=%s", (ids[0],)).fetchone()[0]
            == 0
        )
        con.execute("CHECKPOINT")
        files = [
            r[0]
            for r in con.execute(
                "SELECT pg_relation_filepath(c.oid) FROM pg_class c WHERE c.relname LIKE 'facerec_%' "
                "OR c.oid IN (SELECT reltoastrelid FROM pg_class WHERE relname LIKE 'facerec_%')"
            )
            if r[0]
        ]
        datadir = con.execute("SHOW data_directory").fetchone()[0]
    data = b"".join((Path(datadir) / f).read_bytes() for f in files)
    stored = [np.asarray(check_embedding(v, D), "<f4").tobytes() for v in vecs[:2]]
    assert stored[1] in data  # a kept vector is visible to this scan
    assert stored[0] not in data  # the deleted one is gone (VACUUM FULL)
    s.delete_gallery(g.id)
    assert s.list_galleries() == []
    s.close()


# ----------------------------------------------------------------------------------------- index
def test_top_persons_matches_per_person_reduction():
    rng = np.random.default_rng(7)
    for _ in range(50):
        n_people = int(rng.integers(1, 30))
        counts = rng.integers(1, 8, n_people)
        codes = np.repeat(np.arange(n_people), counts)
        rng.shuffle(codes)
        scores = rng.normal(size=len(codes)).astype(np.float32)
        k = int(rng.integers(1, 10))
        best = np.full(n_people, -np.inf)
        np.maximum.at(best, codes, scores)
        want = np.argsort(-best, kind="stable")[:k]
        got = top_persons(scores, codes, k, int(counts.max()))
        assert [c for c, _ in got] == want.tolist()
        assert [scores[r] for _, r in got] == pytest.approx(best[want].tolist())


def test_exact_index_add_remove_and_snapshots():
    rng = np.random.default_rng(8)
    idx = ExactIndex(D, capacity=2)
    v = unit(rng, 6)
    idx.add(["s0", "s1", "s2"], ["a", "a", "b"], v[:3])
    snapshot = idx.search(v[2], 5)
    idx.add(["s3"], ["c"], v[3])  # grows past the capacity
    assert len(idx) == 4 and idx.persons == 3
    assert [c.person_id for c in snapshot] == ["b", "a"]
    assert idx.search(v[3], 1)[0].sample_id == "s3"
    assert idx.remove(person_id="a") == 2 and len(idx) == 2
    assert idx.remove(sample_ids={"s3"}) == 1
    assert [c.person_id for c in idx.search(v[0], 5)] == ["b"]
    with pytest.raises(ValueError):
        idx.add(["x"], ["y"], np.zeros((1, D)))


# ----------------------------------------------------------------------------------------- open set
def test_fpir_threshold_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    t = fpir_threshold(scores, 0.1)  # one false positive of ten allowed: only 0.9 may match
    assert 0.8 < t <= np.nextafter(0.8, 1) and np.mean(scores >= t) == 0.1
    t = fpir_threshold(scores, 0.25)  # floor(2.5) = 2 allowed
    assert 0.7 < t < 0.7001 and np.mean(scores >= t) == 0.2
    tied = np.array([0.5, 0.5, 0.5, 0.1])
    assert np.mean(tied >= fpir_threshold(tied, 0.5)) == 0.0  # ties cannot be split: stay below target
    with pytest.raises(ValueError, match="needs at least 100"):
        fpir_threshold(scores, 0.01)


def test_identification_metrics_keep_the_fpir_they_set_on_float32_scores():
    """The FPIR threshold sits one float64 step above a float32 score; compared in float32 (NumPy 2
    casts a Python float down) that search would count as a false positive: 2/11 instead of 1/11."""
    rng = np.random.default_rng(0)
    gallery = np.eye(12, 16, dtype=np.float32)[:1]  # one enrolled person, "A"
    angles = rng.uniform(0.2, 1.2, 11)
    probes = np.zeros((11, 16), np.float32)
    probes[:, 0], probes[:, 1] = np.cos(angles), np.sin(angles)  # non-mated: 11 other people
    out = identification_metrics(gallery, ["A"], probes, [f"p{i}" for i in range(11)], fpirs=(0.1,))
    assert out["dir_at_fpir"]["0.1"] is not None
    t = out["dir_at_fpir"]["0.1"]["threshold"]
    out2 = identification_metrics(gallery, ["A"], probes, [f"p{i}" for i in range(11)], thresholds={"t": t})
    assert out2["at_threshold"]["t"]["fpir"] == pytest.approx(1 / 11)


def test_pair_model_threshold_hand_computed():
    desc = np.linspace(1.0, 0.0, 1000)  # impostor pair scores, highest first
    t = pair_model_threshold(desc, 0.1, 1)  # one sample: FAR = FPIR = 0.1, 100 pairs may pass
    assert desc[100] < t <= np.nextafter(desc[100], 2)
    t = pair_model_threshold(desc, 0.1, 10)  # FAR = 1 - 0.9 ** 0.1 = 0.010481: 10 pairs
    assert desc[10] < t <= np.nextafter(desc[10], 2)
    assert pair_model_threshold(desc, 0.1, 100) is None  # FAR 0.00105: 1 pair, fewer than min_pairs
    assert pair_model_threshold(desc, 0.1, 100, min_pairs=1) is not None


def test_identification_metrics_hand_computed():
    e = np.eye(4, dtype=np.float32)
    gallery, g_labels = e[[0, 1, 1]], ["A", "B", "B"]
    s = np.sqrt(0.5)
    probes = np.array(
        [
            [0.8, 0.6, 0, 0],  # A: rank-1 right, score 0.8
            [0.6, 0.8, 0, 0],  # B: right, 0.8
            [0.9, 0.1, 0.42, 0],  # B: wrong (A wins)
            [0, 0, s, s],  # C (non-mated): best 0.0
            [0.5, 0, 0, 0.866],
        ],
        np.float32,
    )  # D (non-mated): best 0.5
    out = identification_metrics(
        gallery, g_labels, probes, ["A", "B", "B", "C", "D"], fpirs=(0.5,), thresholds={"t": 0.7}
    )
    assert out["rank1"] == pytest.approx(2 / 3)
    assert out["mated_searches"] == 3 and out["nonmated_searches"] == 2 and out["gallery_persons"] == 2
    point = out["dir_at_fpir"]["0.5"]  # one of two non-mated may match: t just above 0.0
    assert 0.0 < point["threshold"] < 1e-6 and point["dir"] == pytest.approx(2 / 3)
    assert out["at_threshold"]["t"] == {"threshold": 0.7, "fpir": 0.0, "dir": pytest.approx(2 / 3)}
    best, people = per_person_max(np.array([[0.1, 0.3, 0.2]]), np.array(["B", "A", "B"]))
    assert people.tolist() == ["A", "B"] and best.tolist() == [[0.3, 0.2]]


def test_calibration_thresholds_grow_with_gallery_and_lookup():
    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(120), 2)
    emb = unit(rng, len(labels), 32)
    cal = calibrate(
        emb, labels, "cid", "synthetic", sizes=(1, 10, 60), fpirs=(0.1, 0.01), repeats=5, min_probe_people=20
    )
    for row in cal.thresholds.values():
        known = [t for t in row if t is not None]
        assert known == sorted(known) and len(known) >= 3
    assert cal.thresholds["0.01"][0] > cal.thresholds["0.1"][0]
    # Re-derive the size-10 threshold from the definition: FPIR over these random galleries.
    point = cal.lookup(0.1, 7)
    assert (point.calibrated_gallery_size, point.beyond_calibration, point.calibration_method) == (
        10,
        False,
        "searches",
    )
    assert point.threshold == cal.thresholds["0.1"][1]
    beyond = cal.lookup(0.1, 10**7)  # 28,680 pairs support no size past the searched ones at FPIR 0.1
    assert beyond.beyond_calibration and beyond.calibrated_gallery_size == 60
    with pytest.raises(ValueError, match="calibrated: 0.1, 0.01"):
        cal.lookup(0.05, 3)
    again = OpenSetCalibration.model_validate_json(cal.model_dump_json())
    assert again.lookup(0.01, 60) == cal.lookup(0.01, 60)
    # Independent random faces: the pair model (independence) agrees with the searched thresholds.
    searched = cal.thresholds["0.1"][: len(cal.pair_model_check["0.1"])]
    assert cal.pair_model_check["0.1"] == pytest.approx(searched, abs=0.03)
    assert cal.size_method[:3] == ["searches"] * 3 and set(cal.size_method[3:]) <= {"pairs"}


def test_calibrated_threshold_meets_its_fpir_on_fresh_galleries():
    """The size-20 threshold at FPIR 0.1, applied to new random galleries of 20 drawn the same way,
    gives an FPIR near 0.1 (it is a quantile of that very distribution)."""
    rng = np.random.default_rng(10)
    labels = np.arange(400)
    emb = unit(rng, 400, 24)
    cal = calibrate(emb, labels, "cid", "synthetic", sizes=(20,), fpirs=(0.1,), repeats=40, seed=1)
    t = cal.lookup(0.1, 20).threshold
    hits, total = 0, 0
    for _ in range(40):
        chosen = rng.permutation(400)[:20]
        rest = np.setdiff1d(labels, chosen)
        best = (emb[rest] @ emb[chosen].T).max(axis=1)
        hits, total = hits + int((best >= t).sum()), total + len(rest)
    assert 0.07 < hits / total < 0.13


# ----------------------------------------------------------------------------------------- gate
def _evidence(**kw) -> FaceEvidence:
    base = {
        "embedding": np.ones(D, np.float32) / 4,
        "det_score": 0.99,
        "box": (10.0, 10.0, 110.0, 130.0),
        "landmarks": project(0, 0, 0, scale=1.2, offset=(60, 70)),
        "quality_score": 50.0,
        "ood_flagged": False,
    }
    base.update(kw)
    return FaceEvidence(**base)


def test_gate_reasons_one_by_one():
    policy = EnrollmentPolicy()
    assert assess(policy, _evidence()) == []
    cases = {
        Reason.MULTIPLE_FACES: {"other_boxes": [(200.0, 10.0, 260.0, 80.0)]},  # side 60 >= 0.5 * 100
        Reason.FACE_TOO_SMALL: {"box": (0.0, 0.0, 30.0, 40.0)},
        Reason.LOW_QUALITY: {"quality_score": 5.0},
        Reason.EXTREME_POSE: {"landmarks": project(60, 0, 0, scale=1.2, offset=(60, 70))},
        Reason.OOD_FLAGGED: {"ood_flagged": True},
    }
    for reason, kw in cases.items():
        assert [r.reason for r in assess(policy, _evidence(**kw))] == [reason], reason
    low_det = assess(policy, _evidence(det_score=0.5))
    assert [r.reason for r in low_det] == [Reason.LOW_QUALITY] and "detector score" in low_det[0].message
    assert assess(policy, _evidence(other_boxes=[(200.0, 10.0, 240.0, 40.0)])) == []  # small background face
    assert (
        assess(policy, _evidence(landmarks=project(0, 50, 0, scale=1.2, offset=(60, 70))))[0].reason
        == Reason.EXTREME_POSE
    )  # pitch
    # A missing measurement skips its check; None switches a check off.
    assert assess(policy, _evidence(quality_score=None, ood_flagged=None)) == []
    lax = EnrollmentPolicy(min_face_size=None, max_yaw=None, reject_ood=False, max_faces=2)
    assert (
        assess(
            lax,
            _evidence(
                box=(0.0, 0.0, 30.0, 40.0),
                ood_flagged=True,
                landmarks=project(70, 0, 0),
                other_boxes=[(50.0, 0.0, 80.0, 40.0)],
            ),
        )
        == []
    )
    all_bad = _evidence(
        det_score=0.1,
        box=(0.0, 0.0, 20.0, 20.0),
        quality_score=0.0,
        ood_flagged=True,
        landmarks=project(80, 0, 0, scale=0.3, offset=(10, 10)),
        other_boxes=[(30.0, 0.0, 50.0, 20.0)],
    )
    assert [r.reason.value for r in assess(policy, all_bad)] == [
        "multiple_faces",
        "face_too_small",
        "low_quality",
        "extreme_pose",
        "low_quality",
        "ood_flagged",
    ]


# ----------------------------------------------------------------------------------------- manager
CONTRACT = EmbeddingContract("toy", "1", D)
OTHER = EmbeddingContract("toy", "2", D)


def _calibration(contract=CONTRACT) -> OpenSetCalibration:
    return OpenSetCalibration(
        contract_id=contract.contract_id,
        calibrated_on="hand-made",
        gallery_sizes=[1, 10],
        fpirs=[0.1, 0.01],
        thresholds={"0.1": [0.3, 0.4], "0.01": [0.5, 0.6]},
        searches=[1000, 1000],
        repeats=1,
    )


def test_manager_thresholds_and_contract(tmp_path):
    rng = np.random.default_rng(11)
    m = GalleryManager(SQLiteStore(tmp_path / "g.sqlite3"), CONTRACT, _calibration())
    g = m.create("g")
    rec = m.store.get_gallery(g.id)
    assert (rec.contract_id, rec.embedding_size) == (CONTRACT.contract_id, D)
    d = m.decision(rec)
    assert (d.threshold, d.source, d.fpir, d.calibrated_gallery_size) == (0.5, "model", 0.01, 1)
    v = unit(rng, 12)
    for i in range(3):
        m.enroll(g.id, [Offered(evidence=_evidence(embedding=v[i]))], name=f"p{i}")
    rec = m.store.get_gallery(g.id)
    assert m.decision(rec).threshold == 0.6 and m.decision(rec).calibrated_gallery_size == 10  # 3 samples
    assert m.decision(rec, fpir=0.1).threshold == 0.4 and m.decision(rec, fpir=0.1).source == "request"
    assert m.decision(rec, threshold=0.2).threshold == 0.2
    m.store.import_persons(g.id, [(f"x{i}", {}, [NewSample(x, {})]) for i, x in enumerate(v[3:12])])
    d = m.decision(m.store.get_gallery(g.id))
    assert d.beyond_calibration and d.threshold == 0.6  # 12 samples > the largest calibrated size
    res = m.search(g.id, v[1], k=2)
    assert res.match is not None and res.candidates[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert m.search(g.id, -v[1], k=2).match is None
    fixed = m.create("fixed", GalleryConfig(match_threshold=0.9))
    assert m.decision(m.store.get_gallery(fixed.id)).source == "gallery"
    # Another model: the gallery is refused for search and enrollment, with both contracts named.
    other = GalleryManager(m.store, OTHER, None)
    with pytest.raises(ContractMismatchError, match=CONTRACT.contract_id) as info:
        other.search(g.id, v[0])
    assert OTHER.contract_id in str(info.value)
    with pytest.raises(ContractMismatchError):
        other.enroll(g.id, [Offered(evidence=_evidence())], name="z")
    with pytest.raises(ThresholdRequired):
        other.create("needs-threshold")
    with pytest.raises(ContractMismatchError):
        GalleryManager(m.store, OTHER, _calibration(CONTRACT))  # calibration of another model
    with pytest.raises(ValueError, match="calibrated: 0.1, 0.01"):
        m.create("bad", GalleryConfig(target_fpir=0.05))


def test_manager_enrollment_gate_and_duplicates(tmp_path):
    rng = np.random.default_rng(12)
    m = GalleryManager(SQLiteStore(tmp_path / "g.sqlite3"), CONTRACT, _calibration())
    g = m.create("g")
    v = unit(rng, 4)
    refused = m.enroll(g.id, [Offered(evidence=_evidence(embedding=v[0], quality_score=1.0))], name="a")
    assert refused.person is None and not refused.created and m.store.get_gallery(g.id).persons == 0
    assert refused.outcomes[0].refusals[0].reason == Reason.LOW_QUALITY
    a = m.enroll(
        g.id,
        [
            Offered(evidence=_evidence(embedding=v[0])),
            Offered(error=("decode_error", "not an image")),
            Offered(refusals=[]),  # e.g. no_face decided by the caller
            Offered(evidence=_evidence(embedding=v[1], ood_flagged=True)),
        ],
        name="a",
    )
    assert a.created and [o.status for o in a.outcomes] == ["enrolled", "error", "refused", "refused"]
    assert a.person.samples == 1 and a.outcomes[0].sample_id is not None
    # The same face under another name is a duplicate; under the same person it is not.
    dup = m.enroll(g.id, [Offered(evidence=_evidence(embedding=v[0]))], name="b")
    assert dup.person is None and dup.outcomes[0].refusals[0].reason == Reason.DUPLICATE_OF_OTHER_PERSON
    assert dup.outcomes[0].duplicate_of["person_id"] == a.person.id
    more = m.enroll(g.id, [Offered(evidence=_evidence(embedding=v[0]))], person_id=a.person.id)
    assert more.enrolled == 1 and more.person.samples == 2
    # Duplicates off: a gallery may allow it.
    m.update(g.id, config=GalleryConfig(policy=EnrollmentPolicy(reject_duplicates=False)))
    assert m.enroll(g.id, [Offered(evidence=_evidence(embedding=v[0]))], name="b").created
    with pytest.raises(ValueError, match="no images"):
        m.enroll(g.id, [], name="c")


# ----------------------------------------------------------------------------------------- pose
def test_pose_recovers_synthetic_rotations():
    rng = np.random.default_rng(13)
    for _ in range(50):
        yaw, pitch, roll = rng.uniform(-60, 60), rng.uniform(-40, 40), rng.uniform(-45, 45)
        pts = project(yaw, pitch, roll, scale=rng.uniform(0.5, 3), offset=tuple(rng.uniform(0, 300, 2)))
        p = estimate_pose(pts)
        assert (p.yaw, p.pitch, p.roll) == pytest.approx((yaw, pitch, roll), abs=1e-6)
    p = estimate_pose(ARCFACE_TEMPLATE)  # the (symmetrised) template is the frontal mean face
    assert abs(p.yaw) < 1.0 and abs(p.pitch) < 1.0 and abs(p.roll) < 1.0
    noisy = project(30, 0, 0, scale=2.0) + rng.normal(0, 0.5, (5, 2))
    assert 20 < estimate_pose(noisy).yaw < 40
    assert np.isnan(head_poses(np.full((1, 5, 2), np.nan))).all()
    with pytest.raises(ValueError):
        estimate_pose(np.zeros((4, 2)))


def test_pose_signs_on_real_landmarks_and_their_mirror():
    from facerec.data.detect import create_detector, detect_faces
    from facerec.data.image_io import load_image
    from service.testing import SAMPLES

    detector = create_detector("mtcnn", backend="onnx", device="cpu")
    image = load_image(SAMPLES / "Adrien_Brody" / "Adrien_Brody_0001.jpg")
    face = detect_faces(detector, image, "largest", 20.0, 0.0)[0]
    mirrored = detect_faces(detector, np.ascontiguousarray(image[:, ::-1]), "largest", 20.0, 0.0)[0]
    p, q = estimate_pose(face.landmarks), estimate_pose(mirrored.landmarks)
    assert abs(p.yaw) > 10  # this photo is visibly turned
    # Re-detected on the mirror image: the detector is not exactly mirror-symmetric.
    assert q.yaw == pytest.approx(-p.yaw, abs=5.0) and q.pitch == pytest.approx(p.pitch, abs=5.0)
    # The same landmarks mirrored (x -> W - x, left and right swapped): exactly the mirrored pose.
    flipped = face.landmarks[[1, 0, 2, 4, 3]].astype(np.float64)
    flipped[:, 0] = image.shape[1] - flipped[:, 0]
    r = estimate_pose(flipped)
    assert (r.yaw, r.pitch, r.roll) == pytest.approx((-p.yaw, p.pitch, -p.roll), abs=1e-4)
    # Turned towards the viewer's right: the nose tip lies right of the eyes' midpoint.
    nose_offset = face.landmarks[2][0] - face.landmarks[:2, 0].mean()
    assert np.sign(nose_offset) == np.sign(p.yaw)
