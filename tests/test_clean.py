"""Teacher-based cleaning (facerec/teachers/clean.py, `facerec clean`, data.exclude): the fixed rule
finds exactly the planted wrong-person images, its threshold is the stated impostor quantile, and
the list it writes leaves those images out of training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.data.folders import Sample
from facerec.teachers.cache import CacheWriter, file_hash
from facerec.teachers.clean import CleaningRule, find_wrong_person_images, impostor_threshold


def clustered(n_ids: int = 80, per_id: int = 5, dim: int = 32, noise: float = 0.25, seed: int = 0):
    """Unit embeddings of n_ids people (centre + noise) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_ids), per_id)
    e = centres[labels] + noise * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return e / np.linalg.norm(e, axis=1, keepdims=True), labels, centres


def plant_wrong_persons(e, labels, centres, rows_and_true, seed: int = 1):
    """Rows given another person's face (a fresh sample of that person's cluster)."""
    rng = np.random.default_rng(seed)
    e = e.copy()
    for row, true in rows_and_true:
        v = centres[true] + 0.25 * rng.normal(size=e.shape[1]) / np.sqrt(e.shape[1])
        e[row] = v / np.linalg.norm(v)
    return e


def test_the_rule_flags_exactly_the_planted_images_and_names_their_person():
    e, labels, centres = clustered()
    planted = [(0, 5), (14, 9), (33, 2)]  # rows of people 0, 2 and 6
    e = plant_wrong_persons(e, labels, centres, planted)
    e[20] = np.nan  # no face found: never judged, never flagged
    result = find_wrong_person_images(e, labels, CleaningRule(far=1e-3, pairs=20_000))
    assert sorted(np.flatnonzero(result.flagged)) == [0, 14, 33]
    assert [int(result.nearest_other[r]) for r, _ in planted] == [t for _, t in planted]
    assert not result.judged[20] and np.isnan(result.cos_own[20])
    # cos_own is the cosine to the normalised mean of the OTHER rows of the identity (re-derived)
    for row in (0, 7, 33):
        others = [j for j in np.flatnonzero(labels == labels[row]) if j != row and np.isfinite(e[j]).all()]
        mean = e[others].sum(axis=0)
        assert result.cos_own[row] == pytest.approx(float(e[row] @ mean / np.linalg.norm(mean)), abs=1e-9)


def test_identities_too_small_to_judge_are_left_alone():
    e, labels, centres = clustered(n_ids=6, per_id=2)
    e = plant_wrong_persons(e, labels, centres, [(0, 3)])  # one of two images is someone else
    result = find_wrong_person_images(e, labels, CleaningRule(far=1e-2, pairs=1_000))
    assert not result.judged.any() and not result.flagged.any()


def test_threshold_is_the_stated_quantile_of_different_identity_cosines():
    e, labels, _ = clustered(n_ids=40, per_id=5, dim=16, noise=1.0, seed=3)
    far = 1e-2
    tau, n = impostor_threshold(e, labels, CleaningRule(far=far, pairs=100_000, seed=4))
    assert n == 100_000
    # all different-identity pairs, enumerated: about far of them lie above tau
    s = e @ e.T
    different = labels[:, None] != labels[None, :]
    above = (s[np.triu(different, 1)] > tau).mean()
    assert abs(above - far) < 0.3 * far


def summary_tau(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["threshold"]


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match="min_images"):
        CleaningRule(min_images=2)
    with pytest.raises(ValueError, match="far"):
        CleaningRule(far=0.0)
    with pytest.raises(ValueError, match="pairs"):
        CleaningRule(far=1e-3, pairs=100)


@pytest.mark.timeout(120)
def test_facerec_clean_writes_the_list_the_trainer_leaves_out(tmp_path):
    from facerec.cli import main
    from training.data import exclude_samples, folder_samples

    e, labels, centres = clustered(n_ids=60, per_id=4)
    planted = [(2, 6), (21, 1)]
    e = plant_wrong_persons(e, labels, centres, planted)
    data = tmp_path / "aligned"
    rng = np.random.default_rng(0)
    rels = []
    for i, label in enumerate(labels):
        folder = data / f"person{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        rel = f"person{label:02d}/{i:03d}.png"
        cv2.imwrite(str(data / rel), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
        rels.append(rel)
    with CacheWriter(tmp_path / "cache", "test-teacher-0", e.shape[1], {"name": "test"}) as w:
        w.add([file_hash(data / r) for r in rels], e.astype(np.float32))
    out = tmp_path / "clean"
    assert main(["clean", "--data", str(data), "--cache", str(tmp_path / "cache"), "--out", str(out),
                 "--pairs", "5000", "--no-progress"]) == 0
    flagged = [rels[r] for r, _ in planted]
    assert sorted(out.joinpath("exclude.txt").read_text().split()) == sorted(flagged)
    rows = list(csv.DictReader(open(out / "flagged.csv")))
    assert {r["path"]: r["nearest_other_identity"] for r in rows} == {
        rels[2]: "person06", rels[21]: "person01"}
    assert all(float(r["cos_own"]) < summary_tau(out) < float(r["cos_other"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["judged"], summary["flagged"]) == (240, 240, 2)
    assert "random different-identity pairs" in summary["rule"]
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet.shape == (2 * (112 + 18), 5 * 112, 3)

    samples = folder_samples(str(data))
    kept = exclude_samples(samples, str(out / "exclude.txt"))
    assert len(kept) == len(samples) - 2 and not {s.path for s in kept} & set(flagged)
    stray = tmp_path / "stray.txt"
    stray.write_text("# made for another dataset\nsomeone/else.png\n")
    with pytest.raises(ValueError, match="not in the dataset"):
        exclude_samples(samples, str(stray))
    with pytest.raises(FileNotFoundError):
        exclude_samples([Sample("a/b.png", 0, "a")], str(tmp_path / "missing.txt"))


def test_config_refuses_exclude_without_image_files():
    from training.config import load_config

    base = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_cpu.yaml"
    assert load_config(base, ["data.exclude=x.txt"]).data.exclude == "x.txt"
    with pytest.raises(Exception, match="data.exclude applies"):
        load_config(base, ["data.kind=synthetic", "data.exclude=x.txt"])
