"""The verification report's operating points (threshold table, operating threshold, score
histograms, DET plot), checked against a direct computation on synthetic scores."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from facerec.eval.operating import TABLE_FARS, operating_point, score_histogram, threshold_table
from facerec.eval.reports import PairList, verify_report


def direct_row(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float, float] | None:
    """Threshold, TAR, achieved FAR at a target FAR, from the definition: the highest threshold
    with at most floor(far * N) impostors strictly above it; None below one impostor."""
    allowed = math.floor(far * impostor.size + 1e-9)
    if allowed < 1:
        return None
    threshold = np.sort(impostor)[::-1][allowed]
    return float(threshold), float((genuine > threshold).mean()), float((impostor > threshold).mean())


def test_threshold_table_matches_the_definition():
    rng = np.random.default_rng(0)
    genuine = rng.normal(0.55, 0.12, 3000)
    impostor = rng.normal(0.05, 0.1, 20000)
    table = threshold_table(genuine, impostor)
    assert [r["far"] for r in table] == sorted(TABLE_FARS, reverse=True)
    for row in table:
        expected = direct_row(genuine, impostor, row["far"])
        if expected is None:  # 1e-5 and 1e-6 of 20,000 impostors: less than one false accept
            assert not row["supported"] and row["threshold"] is None and row["tar"] is None
            continue
        assert row["supported"]
        assert row["threshold"] == pytest.approx(expected[0], abs=1e-12)
        assert row["tar"] == pytest.approx(expected[1]) and row["frr"] == pytest.approx(1 - expected[1])
        assert row["achieved_far"] == pytest.approx(expected[2]) and row["achieved_far"] <= row["far"]
    assert [r["supported"] for r in table] == [True] * 4 + [False] * 2
    # the threshold rises and the TAR falls as the FAR target tightens
    kept = [r for r in table if r["supported"]]
    assert all(a["threshold"] <= b["threshold"] and a["tar"] >= b["tar"] for a, b in zip(kept, kept[1:]))


def test_operating_point_given_or_from_a_far():
    genuine = np.array([0.2, 0.4, 0.5, 0.5, 0.9])
    impostor = np.array([0.1, 0.3, 0.5, 0.05, 0.0, -0.2, 0.15, 0.2, 0.25, 0.35])
    given = operating_point(genuine, impostor, threshold=0.5)
    assert given["rule"] == ">=" and given["tar"] == 3 / 5 and given["far"] == 1 / 10  # ties accepted
    from_far = operating_point(genuine, impostor, far=0.1)
    assert from_far["threshold"] == 0.35 and from_far["tar"] == 4 / 5 and from_far["far"] == 1 / 10  # > 0.35
    hist = score_histogram(genuine, impostor)
    assert sum(hist["genuine"]) == 5 and sum(hist["impostor"]) == 10
    assert len(hist["edges"]) == len(hist["genuine"]) + 1


def _embeddings(rng, people: int, per_person: int, dim: int = 32, spread: float = 0.9) -> tuple[np.ndarray, list]:
    centres = rng.normal(size=(people, dim))
    emb = np.repeat(centres, per_person, axis=0) + spread * rng.normal(size=(people * per_person, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), [f"p{i:03d}" for i in range(people) for _ in range(per_person)]


def _table_rows(summary: str, heading: str) -> dict[str, list[str]]:
    """The threshold table under the summary's section that starts with ``heading``."""
    section = summary.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and re.fullmatch(r"[0-9.e-]+", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_verify_report_tables_and_plots_match_the_scores(tmp_path):
    rng = np.random.default_rng(1)
    emb, names = _embeddings(rng, people=40, per_person=5)
    n = len(emb)
    a, b = rng.integers(0, n, 3000), rng.integers(0, n, 3000)
    keep = a != b
    a, b = a[keep], b[keep]
    same = np.array([names[i] == names[j] for i, j in zip(a, b)])
    pairs = PairList(a, b, same, 5, name="synthetic pairs")
    report = verify_report(emb, tmp_path, names=names, pairs=pairs, fars=[1e-2, 1e-3], title="synthetic")
    summary = (tmp_path / "summary.md").read_text()

    # the pair list: scores computed here from the embeddings
    scores = np.sum(emb[a].astype(np.float64) * emb[b], axis=1)
    rows = _table_rows(summary, "## synthetic pairs")
    for far in TABLE_FARS:
        expected = direct_row(scores[same], scores[~same], far)
        cells = rows[f"{far:g}"]
        if expected is None:
            assert cells[1].startswith("unsupported")
            continue
        assert float(cells[1]) == pytest.approx(expected[0], abs=5e-5)
        assert float(cells[2].rstrip("%")) == pytest.approx(100 * expected[1], abs=0.005)
        assert float(cells[4].rstrip("%")) == pytest.approx(100 * expected[2], abs=0.005)

    # all pairs: every same-person pair genuine, every cross-person pair an impostor
    sim = emb.astype(np.float64) @ emb.T.astype(np.float64)
    i, j = np.triu_indices(n, k=1)
    ids = np.array(names)
    genuine, impostor = sim[i, j][ids[i] == ids[j]], sim[i, j][ids[i] != ids[j]]
    section = report["all_pairs"]
    assert section["genuine"] == genuine.size and section["impostors"] == impostor.size
    rows = _table_rows(summary, "## All pairs")
    expected = direct_row(genuine, impostor, 1e-3)
    assert float(rows["0.001"][1]) == pytest.approx(expected[0], abs=5e-5)
    assert float(rows["0.001"][2].rstrip("%")) == pytest.approx(100 * expected[1], abs=0.005)
    # the default operating threshold is the FAR 1e-3 row's, and the summary says so
    op = section["operating_point"]
    assert op["threshold"] == pytest.approx(expected[0], abs=1e-6) and op["tar"] == pytest.approx(expected[1])
    assert f"Operating threshold {expected[0]:.4f} (FAR 0.001 on these impostors" in summary

    histograms = __import__("json").loads((tmp_path / "scores.json").read_text())
    counts = {name: (sum(h["genuine"]), sum(h["impostor"])) for name, h in histograms.items()}
    assert sorted(counts.values()) == sorted([(int(same.sum()), int((~same).sum())),
                                              (genuine.size, impostor.size)])
    pytest.importorskip("matplotlib")
    for name in ("det.png", "scores.png", "roc.png"):
        assert (tmp_path / name).stat().st_size > 5000
        assert f"]({name})" in summary


def test_a_given_operating_threshold_is_reported_with_its_rates(tmp_path):
    rng = np.random.default_rng(2)
    emb, names = _embeddings(rng, people=12, per_person=4)
    report = verify_report(emb, tmp_path, names=names, operating_threshold=0.3)
    sim = emb.astype(np.float64) @ emb.T.astype(np.float64)
    i, j = np.triu_indices(len(emb), k=1)
    ids = np.array(names)
    genuine, impostor = sim[i, j][ids[i] == ids[j]], sim[i, j][ids[i] != ids[j]]
    op = report["all_pairs"]["operating_point"]
    assert op["source"] == "given" and op["threshold"] == 0.3
    assert op["tar"] == pytest.approx((genuine >= 0.3).mean()) and op["far"] == pytest.approx((impostor >= 0.3).mean())
    assert "Operating threshold 0.3000 (given; accept score >= threshold)" in (tmp_path / "summary.md").read_text()


# ------------------------------------------------------------------------------ open set
def test_openset_report_matches_a_direct_computation(tmp_path):
    from facerec.eval.openset_report import openset_report, split_gallery

    rng = np.random.default_rng(3)
    emb, names = _embeddings(rng, people=50, per_person=4, spread=1.1)
    report = openset_report(emb, names, tmp_path, fpirs=(0.1, 0.01, 0.001), ranks=10, seed=5)
    gallery, probes = split_gallery(names, seed=5)
    enrolled = [names[g] for g in gallery]
    assert len(enrolled) == len(set(enrolled)) == 25  # half the people, one image each
    mated_ranks, nonmated_best, mated_hit_scores = [], [], []
    for p in probes:  # one search at a time, from the definitions
        scores = {names[g]: float(emb[p] @ emb[g]) for g in gallery}
        best_person = max(scores, key=scores.get)
        if names[p] in scores:
            mated_ranks.append(1 + sum(s > scores[names[p]] for s in scores.values()))
            mated_hit_scores.append(scores[best_person] if best_person == names[p] else -np.inf)
        else:
            nonmated_best.append(scores[best_person])
    assert report["mated_searches"] == len(mated_ranks) == 25 * 3
    assert report["nonmated_searches"] == len(nonmated_best) == 25 * 4
    for k in range(1, 11):
        assert report["cmc"][k - 1] == pytest.approx(np.mean(np.array(mated_ranks) <= k), abs=1e-6)
    nonmated_best, hits = np.array(nonmated_best), np.array(mated_hit_scores)
    rows = {r["fpir"]: r for r in report["fpir_table"]}
    assert not rows[0.001]["supported"]  # 100 non-mated searches cannot measure 1 in 1,000
    for f in (0.1, 0.01):
        # the lowest threshold with at most floor(f * N) non-mated best scores at or above it
        allowed = int(np.floor(f * nonmated_best.size + 1e-9))
        t = np.nextafter(np.sort(nonmated_best)[::-1][allowed], np.inf)
        assert rows[f]["threshold"] == pytest.approx(t, abs=1e-6)
        assert rows[f]["achieved_fpir"] == pytest.approx(np.mean(nonmated_best >= t))
        assert rows[f]["achieved_fpir"] <= f
        assert rows[f]["dir"] == pytest.approx(np.mean(hits >= t), abs=1e-6)
        assert rows[f]["fnir"] == pytest.approx(1 - rows[f]["dir"])
    summary = (tmp_path / "summary.md").read_text()
    assert f"| 1 | {100 * report['cmc'][0]:.2f}% |" in summary
    assert f"| 0.1 | {rows[0.1]['threshold']:.4f} | {100 * rows[0.1]['dir']:.2f}% |" in summary
    curve = __import__("json").loads((tmp_path / "det_fpir.json").read_text())
    assert np.all(np.diff(curve["fpir"]) >= 0) and np.all(np.diff(curve["fnir"]) <= 0)  # thresholds descend
    pytest.importorskip("matplotlib")
    assert (tmp_path / "cmc.png").exists() and (tmp_path / "det_fpir.png").exists()
